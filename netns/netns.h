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
#include <stdatomic.h>
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
 * metadata address), the sandbox and veth ranges and the host's own addresses are denied, then
 * internet decides. The default policy (NULL, or internet off with both lists empty: nothing
 * outbound) is the one every slot is built with. */
typedef struct NetnsPolicy {
	bool internet;
	const char *const *allow;
	size_t n_allow;
	const char *const *deny;
	size_t n_deny;
} NetnsPolicy;

typedef struct NetnsPool NetnsPool;
typedef struct NetnsSlot NetnsSlot;

/* Loads the state file and its journal, <state_file>.journal (slots in use survive, and so do
 * numbers whose slot could not be removed), makes the host side ready (forwarding, the
 * masquerade table) and starts keeping pool_size slots ready in the background. */
int netns_pool_new(const NetnsConfig *config, NetnsPool **ret, char **ret_error);
/* Stops the background work and destroys the ready slots; slots in use stay as they are (their
 * namespaces, links and references: a NetnsSlot * still held stays valid memory, but must not
 * be passed to a function that takes the pool any more). */
void netns_pool_free(NetnsPool *p);

/*
 * Slot references. Every NetnsSlot * handed out (by netns_slot_acquire(), netns_slot_find() or
 * netns_slot_ref()) is a reference that belongs to the caller: the slot's memory, and the
 * strings its getters return, stay valid until that reference is given back, exactly once, to
 * netns_slot_unref() or netns_slot_release() (both consume it, whatever they return). The pool
 * keeps a reference of its own while the slot is in use, so a slot found on one thread is never
 * freed under it by a release on another.
 *
 * A release takes the slot out of use for every holder at once: through the other references,
 * netns_slot_set_policy() and netns_slot_release() then fail with -ENOENT and change nothing
 * (they never reach a later slot that got the same number), and netns_slot_path() names a
 * namespace that is gone or, once the number is handed out again, another sandbox's.
 *
 * All functions are thread-safe. Acquires for different owners run in parallel; an acquire
 * never waits for a slot being built in the background, destroyed, or for netlink or nftables
 * work of another slot.
 */

/* A slot for `owner` (a sandbox id) with `policy` applied (NULL: the default, nothing
 * outbound), as a new reference. From the ready pool when there is one: with the default
 * policy that costs no netlink or nftables work at all, with another policy one small nftables
 * transaction. The owner check and the reservation are one step: of two concurrent acquires
 * for one owner, one gets the slot and the other -EEXIST (also while the first is still being
 * set up). -ENOSPC when every slot number is in use. The slot is recorded in the state file
 * before it is returned. */
int netns_slot_acquire(NetnsPool *p, const char *owner, const NetnsPolicy *policy, NetnsSlot **ret,
		       char **ret_error);
/* Takes the slot out of use (out of the state file first), then destroys it (namespace, links,
 * routes, rules) and frees its number. Consumes the caller's reference, also on failure.
 * -ENOENT: already released (through another reference). When the slot cannot be fully
 * removed, its number stays out of use (recorded as broken in the state file, counted in
 * NetnsPoolStats.broken) until a background retry removes what is left or netns_reclaim()
 * does; the slot is out of use either way. */
int netns_slot_release(NetnsPool *p, NetnsSlot *slot, char **ret_error);
/* Replaces the slot's egress policy at once (one nftables transaction). -ENOENT once the slot
 * has been released. Ordered against a concurrent release of the same slot. */
int netns_slot_set_policy(NetnsPool *p, NetnsSlot *slot, const NetnsPolicy *policy,
			  char **ret_error);
/* A new reference to the slot in use by owner (e.g. after a restart), or -ENOENT (also while
 * the owner's acquire is still in progress). */
int netns_slot_find(NetnsPool *p, const char *owner, NetnsSlot **ret);
/* Another reference to a slot the caller holds one to; returns s. */
NetnsSlot *netns_slot_ref(NetnsSlot *s);
/* Gives a reference back; frees the slot's memory (never its namespace) with the last one.
 * NULL is fine. Returns NULL. */
NetnsSlot *netns_slot_unref(NetnsSlot *s);
static inline void netns_slot_unrefp(NetnsSlot **s)
{
	if (*s)
		(void)netns_slot_unref(*s);
}
static inline void netns_pool_freep(NetnsPool **p)
{
	if (*p)
		netns_pool_free(*p);
}

/* Valid as long as the caller holds its reference. */
unsigned netns_slot_index(const NetnsSlot *s);
const char *netns_slot_owner(const NetnsSlot *s);
const char *netns_slot_path(const NetnsSlot *s);       /* <netns_dir>/<prefix>N */
const char *netns_slot_sandbox_ip(const NetnsSlot *s); /* dotted quad */
const char *netns_slot_host_link(const NetnsSlot *s);  /* em-N */

typedef struct NetnsPoolStats {
	unsigned ready;
	unsigned in_use;
	unsigned max_slots;
	unsigned broken; /* numbers kept out of use: their slot could not be removed (yet) */
	/* State file writes and their time: journal appends (one per change, or per group of
	 * changes made at once) and snapshots (the whole state, every ~2n changes for n slots). */
	uint64_t journal_writes, journal_us_total, journal_us_max;
	uint64_t snapshot_writes, snapshot_us_total, snapshot_us_max;
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
 * state file is rewritten to the kept slots (numbers recorded as broken are forgotten: their
 * leftovers are removed here like any other). */
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
 * does not exist. Returns the fd; only one may be open (no multi-queue). */
int netns_tap_open(const char *name);
/* Creates TAP device `name` in the current namespace, persistent: it stays, attached to no
 * fd, for a VMM to open by name. */
int netns_tap_create(const char *name);

/* In the current namespace: lo up, and `ifname` up with address `cidr` ("a.b.c.d/len") and,
 * when gateway is not NULL, a default route through it. What a guest's network setup does
 * (the kernel's ip= argument under Firecracker, fcsim's container, the guest stand-in). */
int netns_iface_setup(const char *ifname, const char *cidr, const char *gateway, char **ret_error);

/* Relays Ethernet frames between two TAP fds until one side ends or *stop is set by another
 * thread or a signal handler (checked at least every 200 ms). What a VMM does between its TAP
 * and the guest's NIC. */
int netns_relay(int fd_a, int fd_b, _Atomic bool *stop);
