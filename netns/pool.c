/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Slots: building and destroying them, the allocator of slot numbers (persisted, so that a
 * restarted agent never hands out a slot in use twice), and the pool that keeps a few slots
 * ready so that creating a sandbox does not wait for namespace setup.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <json-c/json.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/fileio.h"
#include "common/id.h"
#include "common/log.h"
#include "common/macro.h"
#include "netns-internal.h"

struct NetnsSlot {
	unsigned index;
	char *owner; /* NULL while in the ready pool */
	char name[64];
	char path[4096];
	char host_link[16];
	char sandbox_ip[INET_ADDRSTRLEN];
	NetnsSlot *next;
};

struct NetnsPool {
	NetnsConfig cfg; /* strings below are our copies */
	char *netns_dir, *prefix, *uplink, *state_file;
	unsigned max_slots;
	int host_ns; /* the namespace the pool was created in: "the host" */

	pthread_mutex_t mu;
	pthread_cond_t cond;
	NetnsSlot *ready, *used;
	unsigned n_ready, n_building;
	uint8_t *taken; /* per index: reserved (ready, in use or being built) */
	bool stop;
	pthread_t refill;
	bool refill_running;
	char *refill_error;
};

static void slotp(NetnsSlot **s)
{
	if (*s) {
		free((*s)->owner);
		free(*s);
	}
}

static unsigned range_size(const NetnsCidr *c)
{
	return c->prefix >= 32 ? 1 : (c->prefix == 0 ? UINT32_MAX : 1u << (32 - c->prefix));
}

static void addr_at(const NetnsCidr *c, uint32_t offset, char *buf, size_t size)
{
	struct in_addr a = {.s_addr = htonl(ntohl(c->addr.s_addr) + offset)};
	inet_ntop(AF_INET, &a, buf, size);
}

static void slot_names(const NetnsPool *p, NetnsSlot *s, unsigned index)
{
	s->index = index;
	snprintf(s->name, sizeof(s->name), "%s%u", p->prefix, index);
	snprintf(s->path, sizeof(s->path), "%s/%s", p->netns_dir, s->name);
	snprintf(s->host_link, sizeof(s->host_link), "em-%u", index);
	/* The range's network address is never a sandbox IP. */
	addr_at(&p->cfg.sandbox_range, index + 1, s->sandbox_ip, sizeof(s->sandbox_ip));
}

static void nlsock_closep(NlSock **s)
{
	nlsock_close(*s);
}

/* The inside of a slot, on a thread that has entered it. */
static int slot_build_inside(const NetnsSlot *s, const char *host_addr, const char *slot_cidr,
			     char **ret_error)
{
	_cleanup_(nlsock_closep) NlSock *nl = NULL;
	_cleanup_close_ int tap = -EBADF;
	char tap_cidr[32];
	int r;

	r = nlsock_open(&nl);
	if (r < 0)
		return error_set(ret_error, r, "netlink in %s: %s", s->name, strerror(-r));
	if ((r = link_up(nl, "lo", ret_error)) < 0 ||
	    (r = addr_add(nl, NETNS_SLOT_IF, slot_cidr, ret_error)) < 0 ||
	    (r = link_up(nl, NETNS_SLOT_IF, ret_error)) < 0)
		return r;
	/* A persistent TAP: the VMM opens it by name later (and again after a restore). */
	tap = netns_tap_open(NETNS_TAP_NAME, true);
	if (tap < 0)
		return error_set(ret_error, tap, "cannot create %s in %s: %s", NETNS_TAP_NAME,
				 s->name, strerror(-tap));
	snprintf(tap_cidr, sizeof(tap_cidr), "%s/%d", NETNS_TAP_IP, NETNS_TAP_PREFIX);
	if ((r = addr_add(nl, NETNS_TAP_NAME, tap_cidr, ret_error)) < 0 ||
	    (r = link_up(nl, NETNS_TAP_NAME, ret_error)) < 0 ||
	    (r = route_add(nl, "default", host_addr, NETNS_SLOT_IF, ret_error)) < 0)
		return r;
	r = sysctl_write("/proc/sys/net/ipv4/ip_forward", "1");
	if (r < 0)
		return error_set(ret_error, r, "cannot enable forwarding in %s: %s", s->name,
				 strerror(-r));
	/* Best effort: without IPv6 in the kernel there is nothing to disable. */
	(void)sysctl_write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1");
	(void)sysctl_write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
	r = nft_slot_setup(s->sandbox_ip, ret_error);
	if (r < 0)
		return r;
	return nft_slot_policy(NULL, NULL, NULL, 0, ret_error); /* deny until acquired */
}

static int slot_destroy(const NetnsPool *p, const NetnsSlot *s)
{
	_cleanup_(nlsock_closep) NlSock *nl = NULL;
	int r = 0;
	(void)p;

	/* Deleting the host end takes the peer, its addresses and the host route with it. */
	if (nlsock_open(&nl) >= 0) {
		int k = link_delete(nl, s->host_link);
		if (k < 0 && k != -ENODEV && k != -ENOENT)
			r = k;
	}
	int k = netns_remove_at(s->path);
	return r < 0 ? r : k;
}

/* Builds slot `index` from nothing. The calling thread must be in the host namespace. A
 * failure removes whatever was made. */
static int slot_build(const NetnsPool *p, unsigned index, NetnsSlot **ret, char **ret_error)
{
	_cleanup_(slotp) NetnsSlot *s = calloc(1, sizeof(*s));
	_cleanup_(nlsock_closep) NlSock *nl = NULL;
	_cleanup_close_ int ns = -EBADF;
	char host_addr[INET_ADDRSTRLEN], slot_addr[INET_ADDRSTRLEN];
	char host_cidr[32], slot_cidr[32], route[32];
	int r, saved;

	if (!s)
		return -ENOMEM;
	slot_names(p, s, index);
	addr_at(&p->cfg.veth_range, 2 * index, host_addr, sizeof(host_addr));
	addr_at(&p->cfg.veth_range, 2 * index + 1, slot_addr, sizeof(slot_addr));
	snprintf(host_cidr, sizeof(host_cidr), "%s/31", host_addr);
	snprintf(slot_cidr, sizeof(slot_cidr), "%s/31", slot_addr);
	snprintf(route, sizeof(route), "%s/32", s->sandbox_ip);

	r = netns_create_at(s->path);
	if (r < 0)
		return error_set(ret_error, r, "cannot create namespace %s: %s", s->path,
				 strerror(-r));
	ns = open(s->path, O_RDONLY | O_CLOEXEC);
	if (ns < 0) {
		r = error_set(ret_error, -errno, "cannot open %s: %m", s->path);
		goto fail;
	}
	r = nlsock_open(&nl);
	if (r < 0) {
		r = error_set(ret_error, r, "netlink: %s", strerror(-r));
		goto fail;
	}
	if ((r = link_add_veth(nl, s->host_link, NETNS_SLOT_IF, ns, ret_error)) < 0 ||
	    (r = addr_add(nl, s->host_link, host_cidr, ret_error)) < 0 ||
	    (r = link_up(nl, s->host_link, ret_error)) < 0)
		goto fail;

	saved = netns_enter(s->path);
	if (saved < 0) {
		r = error_set(ret_error, saved, "cannot enter %s: %s", s->path, strerror(-saved));
		goto fail;
	}
	r = slot_build_inside(s, host_addr, slot_cidr, ret_error);
	int k = netns_leave(saved);
	if (r >= 0 && k < 0)
		r = error_set(ret_error, k, "cannot leave %s: %s", s->path, strerror(-k));
	if (r < 0)
		goto fail;

	/* Last: the sandbox IP becomes reachable only once the slot is complete. */
	r = route_add(nl, route, slot_addr, s->host_link, ret_error);
	if (r < 0)
		goto fail;
	*ret = TAKE_PTR(s);
	return 0;
fail:
	(void)slot_destroy(p, s);
	return r;
}

/* slot_build() from any thread: enter the host namespace for the duration. */
static int slot_build_in_host(const NetnsPool *p, unsigned index, NetnsSlot **ret, char **ret_error)
{
	int saved = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC), r;

	if (saved < 0)
		return error_set(ret_error, -errno, "cannot open our namespace: %m");
	if (setns(p->host_ns, 0) < 0) {
		r = error_set(ret_error, -errno, "cannot enter the host namespace: %m");
		close(saved);
		return r;
	}
	r = slot_build(p, index, ret, ret_error);
	int k = netns_leave(saved);
	return r < 0 ? r : k;
}

/* ---- state file ---- */

/* Caller holds p->mu. The file lists the slots in use, so that a restarted agent knows them. */
static int state_save_locked(NetnsPool *p)
{
	json_object *root = json_object_new_object(), *arr = json_object_new_array();
	int r;

	if (!root || !arr) {
		json_object_put(root);
		json_object_put(arr);
		return -ENOMEM;
	}
	json_object_object_add(root, "slots", arr);
	for (NetnsSlot *s = p->used; s; s = s->next) {
		json_object *o = json_object_new_object();
		if (!o) {
			json_object_put(root);
			return -ENOMEM;
		}
		json_object_object_add(o, "index", json_object_new_int64(s->index));
		json_object_object_add(o, "owner", json_object_new_string(s->owner));
		json_object_array_add(arr, o);
	}
	const char *text = json_object_to_json_string_ext(root, JSON_C_TO_STRING_PRETTY);
	r = write_file_atomic(p->state_file, text, strlen(text), 0600);
	json_object_put(root);
	return r;
}

typedef struct StateEntry {
	unsigned index;
	char *owner;
} StateEntry;

/* Reads the state file: entries with a valid owner and an index in range. A missing file is
 * an empty state; a file that does not parse is an error (never guess what is in use). */
static int state_load(const char *path, unsigned max_slots, StateEntry **ret, size_t *ret_n,
		      char **ret_error)
{
	_cleanup_free_ char *text = NULL;
	StateEntry *out = NULL;
	size_t n = 0;
	json_object *root, *arr;
	int r;

	*ret = NULL;
	*ret_n = 0;
	r = read_full_file(path, 16 << 20, &text, NULL);
	if (r == -ENOENT)
		return 0;
	if (r < 0)
		return error_set(ret_error, r, "cannot read %s: %s", path, strerror(-r));
	root = json_tokener_parse(text);
	if (!root || !json_object_object_get_ex(root, "slots", &arr) ||
	    !json_object_is_type(arr, json_type_array)) {
		json_object_put(root);
		return error_set(ret_error, -EBADMSG,
				 "%s is not a slot state file; fix or remove it", path);
	}
	size_t len = json_object_array_length(arr);
	out = calloc(len ?: 1, sizeof(*out));
	if (!out) {
		json_object_put(root);
		return -ENOMEM;
	}
	for (size_t i = 0; i < len; i++) {
		json_object *o = json_object_array_get_idx(arr, i), *jidx, *jown;
		if (!json_object_object_get_ex(o, "index", &jidx) ||
		    !json_object_object_get_ex(o, "owner", &jown))
			continue;
		int64_t idx = json_object_get_int64(jidx);
		const char *owner = json_object_get_string(jown);
		if (idx < 0 || idx >= max_slots || !id_is_valid(owner))
			continue;
		out[n].index = (unsigned)idx;
		out[n].owner = strdup(owner);
		if (!out[n].owner)
			break;
		n++;
	}
	json_object_put(root);
	*ret = out;
	*ret_n = n;
	return 0;
}

static void state_entries_free(StateEntry *e, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(e[i].owner);
	free(e);
}

/* ---- the pool ---- */

/* Lowest free index, reserved; -ENOSPC when every slot is taken. Caller holds p->mu. */
static int reserve_locked(NetnsPool *p)
{
	for (unsigned i = 0; i < p->max_slots; i++)
		if (!p->taken[i]) {
			p->taken[i] = 1;
			return (int)i;
		}
	return -ENOSPC;
}

static void *refill_main(void *arg)
{
	NetnsPool *p = arg;

	/* Slots are built in the host namespace, whatever the creating thread does later. */
	if (setns(p->host_ns, 0) < 0)
		log_debug("refill: cannot enter the host namespace: %m");
	pthread_mutex_lock(&p->mu);
	while (!p->stop) {
		if (p->n_ready + p->n_building >= p->cfg.pool_size) {
			pthread_cond_wait(&p->cond, &p->mu);
			continue;
		}
		int index = reserve_locked(p);
		if (index < 0) {
			pthread_cond_wait(&p->cond, &p->mu);
			continue;
		}
		p->n_building++;
		pthread_mutex_unlock(&p->mu);
		NetnsSlot *s = NULL;
		char *err = NULL;
		int r = slot_build(p, (unsigned)index, &s, &err);
		pthread_mutex_lock(&p->mu);
		p->n_building--;
		if (r < 0 || !s) {
			p->taken[index] = 0;
			log_debug("refill: %s", err ?: strerror(-r));
			free(p->refill_error);
			p->refill_error = err;
			/* Do not spin on a persistent failure; acquire still builds cold. */
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_sec += 1;
			pthread_cond_timedwait(&p->cond, &p->mu, &ts);
			continue;
		}
		s->next = p->ready;
		p->ready = s;
		p->n_ready++;
		pthread_cond_broadcast(&p->cond);
	}
	pthread_mutex_unlock(&p->mu);
	return NULL;
}

static int config_copy(NetnsPool *p, const NetnsConfig *c, char **ret_error)
{
	p->cfg = *c;
	p->netns_dir = strdup(c->netns_dir ?: "/run/netns");
	p->prefix = strdup(c->name_prefix ?: "ember-");
	p->uplink = c->uplink && *c->uplink ? strdup(c->uplink) : NULL;
	p->state_file = c->state_file ? strdup(c->state_file) : NULL;
	if (!p->netns_dir || !p->prefix || (c->uplink && *c->uplink && !p->uplink) ||
	    !p->state_file)
		return c->state_file ? -ENOMEM
				     : error_set(ret_error, -EINVAL, "a state file is required");
	unsigned by_sandbox = range_size(&c->sandbox_range);
	unsigned by_veth = range_size(&c->veth_range) / 2;
	/* Sandbox IPs skip the network and broadcast addresses. */
	p->max_slots = by_sandbox > 2 ? by_sandbox - 2 : 0;
	if (by_veth < p->max_slots)
		p->max_slots = by_veth;
	if (p->max_slots == 0)
		return error_set(ret_error, -EINVAL, "the sandbox and veth ranges leave no slots");
	if (p->max_slots > 65536)
		p->max_slots = 65536; /* em-N must fit IFNAMSIZ, and nobody runs more */
	return 0;
}

int netns_pool_new(const NetnsConfig *config, NetnsPool **ret, char **ret_error)
{
	NetnsPool *p;
	StateEntry *entries = NULL;
	size_t n = 0;
	int r;

	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->host_ns = -EBADF;
	pthread_mutex_init(&p->mu, NULL);
	pthread_cond_init(&p->cond, NULL);
	r = config_copy(p, config, ret_error);
	if (r < 0)
		goto fail;
	p->taken = calloc(p->max_slots ?: 1, 1);
	if (!p->taken) {
		r = -ENOMEM;
		goto fail;
	}
	p->host_ns = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	if (p->host_ns < 0) {
		r = error_set(ret_error, -errno, "cannot open our network namespace: %m");
		goto fail;
	}
	r = netns_dir_prepare(p->netns_dir);
	if (r < 0) {
		r = error_set(ret_error, r, "cannot prepare %s: %s", p->netns_dir, strerror(-r));
		goto fail;
	}
	/* Forwarding between the slots and the uplink. */
	r = sysctl_write("/proc/sys/net/ipv4/ip_forward", "1");
	if (r < 0) {
		r = error_set(ret_error, r, "cannot enable IPv4 forwarding: %s", strerror(-r));
		goto fail;
	}
	if (p->uplink) {
		r = nft_host_setup(p->uplink, &p->cfg.sandbox_range, ret_error);
		if (r < 0)
			goto fail;
	}

	/* Slots in use before a restart stay in use; their namespaces are expected to exist
	 * (netns_reclaim() removed the rest). */
	r = state_load(p->state_file, p->max_slots, &entries, &n, ret_error);
	if (r < 0)
		goto fail;
	for (size_t i = 0; i < n; i++) {
		NetnsSlot *s;
		if (p->taken[entries[i].index])
			continue; /* a duplicate in a hand-edited file */
		s = calloc(1, sizeof(*s));
		if (!s) {
			r = -ENOMEM;
			goto fail;
		}
		slot_names(p, s, entries[i].index);
		s->owner = TAKE_PTR(entries[i].owner);
		p->taken[s->index] = 1;
		s->next = p->used;
		p->used = s;
	}
	state_entries_free(entries, n);
	entries = NULL;

	if (p->cfg.pool_size > 0) {
		r = -pthread_create(&p->refill, NULL, refill_main, p);
		if (r < 0) {
			r = error_set(ret_error, r, "cannot start the pool thread");
			goto fail;
		}
		p->refill_running = true;
	}
	*ret = p;
	return 0;
fail:
	state_entries_free(entries, n);
	netns_pool_free(p);
	return r;
}

void netns_pool_free(NetnsPool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->mu);
	p->stop = true;
	pthread_cond_broadcast(&p->cond);
	pthread_mutex_unlock(&p->mu);
	if (p->refill_running)
		pthread_join(p->refill, NULL);
	/* Ready slots belong to nobody: take them down. Slots in use stay. */
	for (NetnsSlot *s = p->ready, *n; s; s = n) {
		n = s->next;
		(void)slot_destroy(p, s);
		free(s);
	}
	for (NetnsSlot *s = p->used, *n; s; s = n) {
		n = s->next;
		free(s->owner);
		free(s);
	}
	safe_close(p->host_ns);
	free(p->taken);
	free(p->netns_dir);
	free(p->prefix);
	free(p->uplink);
	free(p->state_file);
	free(p->refill_error);
	pthread_mutex_destroy(&p->mu);
	pthread_cond_destroy(&p->cond);
	free(p);
}

/* The host's IPv4 addresses, which guests must not reach unless allowed. */
static int host_addresses(NetnsPool *p, char ***ret)
{
	_cleanup_(nlsock_closep) NlSock *nl = NULL;
	int saved, r;

	saved = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	if (saved < 0)
		return -errno;
	if (setns(p->host_ns, 0) < 0) {
		r = -errno;
		close(saved);
		return r;
	}
	r = nlsock_open(&nl);
	if (r >= 0)
		r = addr_list_ipv4(nl, ret);
	nlsock_close(TAKE_PTR(nl));
	int k = netns_leave(saved);
	return r < 0 ? r : k;
}

static int apply_policy(NetnsPool *p, NetnsSlot *s, const NetnsPolicy *policy, char **ret_error)
{
	char **host = NULL;
	int r, saved;

	/* The whole sandbox and veth ranges: other guests and every slot's gateway. */
	NetnsCidr extra[] = {p->cfg.sandbox_range, p->cfg.veth_range};

	r = host_addresses(p, &host);
	if (r < 0)
		return error_set(ret_error, r, "cannot list the host's addresses: %s",
				 strerror(-r));
	saved = netns_enter(s->path);
	if (saved < 0) {
		strv_free(host);
		return error_set(ret_error, saved, "cannot enter %s: %s", s->path,
				 strerror(-saved));
	}
	r = nft_slot_policy(policy, host, extra, ELEMENTSOF(extra), ret_error);
	int k = netns_leave(saved);
	strv_free(host);
	return r < 0 ? r : k;
}

int netns_slot_acquire(NetnsPool *p, const char *owner, const NetnsPolicy *policy, NetnsSlot **ret,
		       char **ret_error)
{
	NetnsSlot *s = NULL;
	int r;

	if (!id_is_valid(owner))
		return error_set(ret_error, -EINVAL, "invalid owner \"%s\"", owner ?: "");
	pthread_mutex_lock(&p->mu);
	for (NetnsSlot *u = p->used; u; u = u->next)
		if (strcmp(u->owner, owner) == 0) {
			pthread_mutex_unlock(&p->mu);
			return error_set(ret_error, -EEXIST, "%s already has slot %u", owner,
					 u->index);
		}
	if (p->ready) {
		/* The refill thread is told once this hand-out is done: building the replacement
		 * now would compete with it for the CPU. */
		s = p->ready;
		p->ready = s->next;
		p->n_ready--;
		pthread_mutex_unlock(&p->mu);
	} else {
		int index = reserve_locked(p);
		pthread_mutex_unlock(&p->mu);
		if (index < 0)
			return error_set(ret_error, -ENOSPC, "all %u network slots are in use",
					 p->max_slots);
		/* Cold: built on this thread, in the host namespace. */
		r = slot_build_in_host(p, (unsigned)index, &s, ret_error);
		if (r < 0 || !s) {
			pthread_mutex_lock(&p->mu);
			p->taken[index] = 0;
			pthread_mutex_unlock(&p->mu);
			return r < 0 ? r : -EIO;
		}
	}

	s->owner = strdup(owner);
	r = s->owner ? apply_policy(p, s, policy, ret_error) : -ENOMEM;
	if (r >= 0) {
		pthread_mutex_lock(&p->mu);
		s->next = p->used;
		p->used = s;
		/* Recorded before anyone sees it: a crash now leaves a known slot, not a leak. */
		r = state_save_locked(p);
		if (r < 0) {
			p->used = s->next;
			(void)error_set(ret_error, r, "cannot write %s: %s", p->state_file,
					strerror(-r));
		}
		pthread_cond_broadcast(&p->cond); /* refill */
		pthread_mutex_unlock(&p->mu);
	}
	if (r < 0) {
		(void)slot_destroy(p, s);
		pthread_mutex_lock(&p->mu);
		p->taken[s->index] = 0;
		pthread_cond_broadcast(&p->cond);
		pthread_mutex_unlock(&p->mu);
		free(s->owner);
		free(s);
		return r;
	}
	*ret = s;
	return 0;
}

int netns_slot_release(NetnsPool *p, NetnsSlot *slot, char **ret_error)
{
	NetnsSlot **pp;
	int r;

	pthread_mutex_lock(&p->mu);
	for (pp = &p->used; *pp && *pp != slot; pp = &(*pp)->next)
		;
	if (!*pp) {
		pthread_mutex_unlock(&p->mu);
		return error_set(ret_error, -ENOENT, "not a slot in use");
	}
	*pp = slot->next;
	r = state_save_locked(p);
	pthread_mutex_unlock(&p->mu);
	if (r < 0)
		log_debug("cannot write %s: %s", p->state_file, strerror(-r));

	int k = slot_destroy(p, slot);
	pthread_mutex_lock(&p->mu);
	p->taken[slot->index] = 0;
	pthread_cond_broadcast(&p->cond);
	pthread_mutex_unlock(&p->mu);
	if (k < 0)
		(void)error_set(ret_error, k, "slot %u (%s) not fully removed: %s", slot->index,
				slot->owner, strerror(-k));
	free(slot->owner);
	free(slot);
	return k < 0 ? k : r;
}

int netns_slot_set_policy(NetnsPool *p, NetnsSlot *slot, const NetnsPolicy *policy,
			  char **ret_error)
{
	return apply_policy(p, slot, policy, ret_error);
}

int netns_slot_find(NetnsPool *p, const char *owner, NetnsSlot **ret)
{
	int r = -ENOENT;

	pthread_mutex_lock(&p->mu);
	for (NetnsSlot *s = p->used; s; s = s->next)
		if (owner && strcmp(s->owner, owner) == 0) {
			*ret = s;
			r = 0;
			break;
		}
	pthread_mutex_unlock(&p->mu);
	return r;
}

void netns_pool_stats(NetnsPool *p, NetnsPoolStats *ret)
{
	unsigned used = 0;

	pthread_mutex_lock(&p->mu);
	for (NetnsSlot *s = p->used; s; s = s->next)
		used++;
	*ret = (NetnsPoolStats){.ready = p->n_ready, .in_use = used, .max_slots = p->max_slots};
	pthread_mutex_unlock(&p->mu);
}

int netns_pool_wait_ready(NetnsPool *p, int timeout_ms)
{
	struct timespec ts;
	int r = 0;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += timeout_ms / 1000;
	ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&p->mu);
	while (p->n_ready < p->cfg.pool_size && r == 0)
		if (pthread_cond_timedwait(&p->cond, &p->mu, &ts) != 0)
			r = -ETIMEDOUT;
	pthread_mutex_unlock(&p->mu);
	return r;
}

unsigned netns_slot_index(const NetnsSlot *s)
{
	return s->index;
}

const char *netns_slot_owner(const NetnsSlot *s)
{
	return s->owner;
}

const char *netns_slot_path(const NetnsSlot *s)
{
	return s->path;
}

const char *netns_slot_sandbox_ip(const NetnsSlot *s)
{
	return s->sandbox_ip;
}

const char *netns_slot_host_link(const NetnsSlot *s)
{
	return s->host_link;
}

/* ---- reclaim ---- */

int netns_reclaim(const NetnsConfig *config, const char *const *keep_owners, size_t n_keep,
		  NetnsReclaimResult *ret, char **ret_error)
{
	_cleanup_(nlsock_closep) NlSock *nl = NULL;
	NetnsReclaimResult res = {};
	NetnsPool tmp = {};
	StateEntry *entries = NULL;
	size_t n = 0, kept = 0;
	uint8_t *keep = NULL;
	char **links = NULL;
	DIR *d = NULL;
	int r;

	r = config_copy(&tmp, config, ret_error);
	if (r < 0)
		goto out;
	keep = calloc(tmp.max_slots ?: 1, 1);
	if (!keep) {
		r = -ENOMEM;
		goto out;
	}
	r = state_load(tmp.state_file, tmp.max_slots, &entries, &n, ret_error);
	if (r < 0)
		goto out;
	/* Keep what the file says is in use by an owner the caller still knows. */
	for (size_t i = 0; i < n; i++) {
		bool k = false;
		for (size_t j = 0; j < n_keep && !k; j++)
			k = keep_owners[j] && strcmp(keep_owners[j], entries[i].owner) == 0;
		if (k && !keep[entries[i].index]) {
			keep[entries[i].index] = 1;
			entries[kept].index = entries[i].index;
			char *o = entries[kept].owner;
			entries[kept].owner = entries[i].owner;
			entries[i].owner = o;
			kept++;
		} else {
			res.slots_forgotten++;
		}
	}

	/* Namespaces: <prefix>N not kept. */
	d = opendir(tmp.netns_dir);
	struct dirent *de;
	size_t plen = strlen(tmp.prefix);
	while (d && (de = readdir(d))) {
		char *end;
		if (strncmp(de->d_name, tmp.prefix, plen) != 0)
			continue;
		unsigned long idx = strtoul(de->d_name + plen, &end, 10);
		if (*end || end == de->d_name + plen || (idx < tmp.max_slots && keep[idx]))
			continue;
		char path[4096];
		snprintf(path, sizeof(path), "%s/%s", tmp.netns_dir, de->d_name);
		if (netns_remove_at(path) >= 0)
			res.namespaces_removed++;
	}

	/* Host links em-N not kept (a namespace gone takes its veth along, but not always at
	 * once, and a crash can leave the host end of a half-built slot). */
	r = nlsock_open(&nl);
	if (r < 0) {
		r = error_set(ret_error, r, "netlink: %s", strerror(-r));
		goto out;
	}
	r = link_list(nl, "em-", &links);
	if (r < 0) {
		r = error_set(ret_error, r, "cannot list links: %s", strerror(-r));
		goto out;
	}
	for (size_t i = 0; links[i]; i++) {
		char *end;
		unsigned long idx = strtoul(links[i] + 3, &end, 10);
		if (*end || end == links[i] + 3 || (idx < tmp.max_slots && keep[idx]))
			continue;
		int k = link_delete(nl, links[i]);
		if (k >= 0 || k == -ENODEV || k == -ENOENT)
			res.links_removed += k >= 0;
	}
	if (kept == 0)
		(void)nft_host_remove();

	/* The file now says exactly what is kept. */
	tmp.used = NULL;
	for (size_t i = 0; i < kept; i++) {
		NetnsSlot *s = calloc(1, sizeof(*s));
		if (!s) {
			r = -ENOMEM;
			break;
		}
		s->index = entries[i].index;
		s->owner = entries[i].owner;
		s->next = tmp.used;
		tmp.used = s;
	}
	if (r >= 0) {
		r = state_save_locked(&tmp);
		if (r < 0)
			(void)error_set(ret_error, r, "cannot write %s: %s", tmp.state_file,
					strerror(-r));
	}
	for (NetnsSlot *s = tmp.used, *nx; s; s = nx) {
		nx = s->next;
		free(s);
	}
out:
	if (d)
		closedir(d);
	strv_free(links);
	state_entries_free(entries, n);
	free(keep);
	free(tmp.netns_dir);
	free(tmp.prefix);
	free(tmp.uplink);
	free(tmp.state_file);
	if (ret)
		*ret = res;
	return r < 0 ? r : 0;
}
