/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Network slots (DESIGN.md §6): one network namespace per sandbox in which the guest always
 * has the same address, so that a memory snapshot taken in one sandbox restores in any other.
 *
 * Slot N:
 *   netns  <prefix>N, bind-mounted at <netns_dir>/<prefix>N (`ip netns exec` works when
 *          netns_dir is /run/netns)
 *   veth   em-N in the host namespace <-> eth0 in the slot, a /31 from the veth range
 *          (host side the even address, slot side the odd one)
 *   tap0   in the slot, 169.254.0.22/30; the guest behind it is always 169.254.0.21
 *   sandbox IP: unique per slot, from the sandbox range, routed by the host into the slot;
 *          inside, DNAT sandbox IP -> guest and SNAT guest -> sandbox IP
 *   egress: decided inside the slot (nftables table "ember"): deny list, allow list, the
 *          private ranges and the host's own addresses denied by default, then internet
 *          access on or off. The host masquerades the sandbox range on the uplink.
 *
 * "Host" is the network namespace of the thread that creates the pool (the real root namespace
 * for emberd; a namespace of their own for the tests). Everything is done through rtnetlink
 * (libnl-route-3) and libnftables; nothing is shelled out. Functions return >= 0 or -errno and,
 * where they take ret_error, a message for a person. Nothing here logs above debug level.
 */
#pragma once

#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define NETNS_GUEST_IP   "169.254.0.21"
#define NETNS_TAP_IP     "169.254.0.22"
#define NETNS_TAP_PREFIX 30
#define NETNS_TAP_NAME   "tap0"
#define NETNS_SLOT_IF    "eth0"

typedef struct NetnsCidr {
	struct in_addr addr; /* network byte order, host bits cleared */
	unsigned prefix;
} NetnsCidr;

/* "10.0.0.0/8", "1.2.3.4" (= /32). Host bits set are refused: say what you mean. */
int netns_cidr_parse(const char *s, NetnsCidr *ret);
/* "a.b.c.d/len" into buf (at least 19 bytes). */
const char *netns_cidr_format(const NetnsCidr *c, char *buf, size_t size);

typedef struct NetnsConfig {
	const char *netns_dir;   /* where namespaces are bind-mounted, e.g. /run/netns */
	const char *name_prefix; /* namespaces are <prefix>N; default "ember-" */
	NetnsCidr sandbox_range; /* sandbox IPs: the range's N+1-th address for slot N */
	NetnsCidr veth_range;    /* /31 per slot: range + 2N (host) and + 2N + 1 (slot) */
	const char *uplink;      /* masquerade interface for internet access; NULL/"": none */
	const char *state_file;  /* slots in use, JSON; survives restarts */
	unsigned pool_size;      /* slots kept ready (0: every acquire builds one) */
} NetnsConfig;

/* Egress policy of one slot. CIDRs as text ("203.0.113.0/24", "1.2.3.4"). Order of decision:
 * deny list, allow list, then the private ranges (RFC 1918, 100.64/10, 169.254/16 with the
 * metadata address) and the host's own addresses are denied, then internet decides. */
typedef struct NetnsPolicy {
	bool internet;
	const char *const *allow;
	size_t n_allow;
	const char *const *deny;
	size_t n_deny;
} NetnsPolicy;

typedef struct NetnsPool NetnsPool;
typedef struct NetnsSlot NetnsSlot;

/* Loads the state file (slots in use survive), makes the host side ready (forwarding, the
 * masquerade table) and starts keeping pool_size slots ready in the background. */
int netns_pool_new(const NetnsConfig *config, NetnsPool **ret, char **ret_error);
/* Stops the background work and destroys the ready slots; slots in use stay as they are. */
void netns_pool_free(NetnsPool *p);

/* A slot for `owner` (a sandbox id) with `policy` applied; from the ready pool when there is
 * one. The slot is recorded in the state file before it is returned. */
int netns_slot_acquire(NetnsPool *p, const char *owner, const NetnsPolicy *policy, NetnsSlot **ret,
		       char **ret_error);
/* Destroys the slot (namespace, links, routes, rules) and frees its number. */
int netns_slot_release(NetnsPool *p, NetnsSlot *slot, char **ret_error);
/* Replaces the slot's egress policy at once (one nftables transaction). */
int netns_slot_set_policy(NetnsPool *p, NetnsSlot *slot, const NetnsPolicy *policy,
			  char **ret_error);
/* The slot in use by owner (e.g. after a restart), or -ENOENT. */
int netns_slot_find(NetnsPool *p, const char *owner, NetnsSlot **ret);

unsigned netns_slot_index(const NetnsSlot *s);
const char *netns_slot_owner(const NetnsSlot *s);
const char *netns_slot_path(const NetnsSlot *s);       /* <netns_dir>/<prefix>N */
const char *netns_slot_sandbox_ip(const NetnsSlot *s); /* dotted quad */
const char *netns_slot_host_link(const NetnsSlot *s);  /* em-N */

typedef struct NetnsPoolStats {
	unsigned ready;
	unsigned in_use;
	unsigned max_slots;
} NetnsPoolStats;
void netns_pool_stats(NetnsPool *p, NetnsPoolStats *ret);
/* Waits until the pool holds pool_size ready slots (or timeout_ms passes: -ETIMEDOUT). */
int netns_pool_wait_ready(NetnsPool *p, int timeout_ms);

typedef struct NetnsReclaimResult {
	unsigned namespaces_removed;
	unsigned links_removed;
	unsigned slots_forgotten; /* in the state file, owner not kept */
} NetnsReclaimResult;

/* For start-up, before netns_pool_new(): keeps the slots of the given owners and removes every
 * other <prefix>N namespace, em-N link and the host masquerade table when no slot is kept; the
 * state file is rewritten to the kept slots. */
int netns_reclaim(const NetnsConfig *config, const char *const *keep_owners, size_t n_keep,
		  NetnsReclaimResult *ret, char **ret_error);

/* ---- namespaces and TAP devices, shared with fcsim and the guest stand-in ---- */

/* The calling thread enters the network namespace at `path` (or fd); returns an fd for
 * netns_leave(), which returns the thread to where it was. */
int netns_enter(const char *path);
int netns_leave(int saved);
/* Creates a new network namespace bind-mounted at `path` (the file must not exist). */
int netns_create_at(const char *path);
/* Unmounts and removes it. The namespace itself goes when its last user does. */
int netns_remove_at(const char *path);

/* Opens TAP device `name` in the current namespace (IFF_TAP | IFF_NO_PI), creating it if it
 * does not exist. persistent: it stays when the fd closes. Returns the fd. */
int netns_tap_open(const char *name, bool persistent);

/* In the current namespace: lo up, and `ifname` up with address `cidr` ("a.b.c.d/len") and,
 * when gateway is not NULL, a default route through it. What a guest's network setup does
 * (the kernel's ip= argument under Firecracker, fcsim's container, the guest stand-in). */
int netns_iface_setup(const char *ifname, const char *cidr, const char *gateway, char **ret_error);

/* Relays Ethernet frames between two TAP fds until one side ends or *stop is set (checked at
 * least every 200 ms). What a VMM does between its TAP and the guest's NIC. */
int netns_relay(int fd_a, int fd_b, volatile bool *stop);
