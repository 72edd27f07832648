/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Slots: building and destroying them, the allocator of slot numbers (persisted, so that a
 * restarted agent never hands out a slot in use twice), and the pool that keeps a few slots
 * ready so that creating a sandbox does not wait for namespace setup.
 *
 * Locking (a sandbox manager acquires from many threads at once):
 * - p->mu guards the bookkeeping: the owner table, the number bitmaps, the ready list, the
 *   counters and every slot's state. It is held for pointer and bit updates and to turn the
 *   recorded slots into a JSON tree, never across netlink, nftables or file I/O: an acquire
 *   never waits for a slot being built or destroyed, or for the state file being written.
 * - s->op_mu orders a policy change against the release of the same slot, so that a change
 *   through a stale reference never lands in a later slot that got the same number.
 * - p->save_mu serializes the writers of the state file.
 * Order: s->op_mu before p->mu, p->save_mu before p->mu.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <json-c/json.h>
#include <pthread.h>
#include <sched.h>
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

#define USEC_PER_SEC      1000000ULL
#define RETRY_DELAY_MIN   (1 * USEC_PER_SEC)
#define RETRY_DELAY_MAX   (60 * USEC_PER_SEC)
#define OWNER_BUCKETS_MIN 64u
#define BROKEN_BATCH      64u

typedef enum SlotState {
	SLOT_READY,    /* built, in the ready list, nobody's */
	SLOT_PENDING,  /* its owner is taken: being built, given its policy, recorded */
	SLOT_IN_USE,   /* recorded; netns_slot_find() returns it */
	SLOT_RELEASED, /* out of the owner table; the memory lives while references do */
	_SLOT_STATE_MAX,
	_SLOT_STATE_INVALID = -EINVAL,
} SlotState;

struct NetnsSlot {
	_Atomic unsigned n_ref;
	pthread_mutex_t op_mu; /* a policy change against the release, see the top */
	SlotState state;       /* under the pool's mu */
	bool leftovers;        /* the last destroy could not remove everything */
	unsigned index;
	char *owner; /* NULL while ready; fixed from the moment it is in the owner table */
	char *path;
	NetnsSlot *next; /* in the ready list, or in an owner-table bucket */
	char name[64];
	char host_link[16];
	char sandbox_ip[INET_ADDRSTRLEN];
};

struct NetnsPool {
	NetnsConfig cfg; /* strings below are our copies */
	char *netns_dir, *prefix, *uplink, *state_file;
	char boot_id[40]; /* the kernel's, written into the state file */
	unsigned max_slots;
	int host_ns; /* the namespace the pool was created in: "the host" */

	pthread_mutex_t mu;
	pthread_cond_t cond; /* CLOCK_MONOTONIC; work for the worker, ready slots for waiters */
	NetnsSlot *ready;
	unsigned n_ready, n_building, n_in_use, n_broken;
	NetnsSlot **buckets; /* owner -> slot, for pending and in-use slots */
	size_t n_buckets, n_owners;
	NetnsSlot **by_index; /* what the state file lists: slots in use or being recorded */
	uint64_t *taken;      /* bitmap: number reserved (ready, building, in use or broken) */
	uint64_t *broken;     /* bitmap: its slot could not be removed; waits for a retry */
	size_t n_words;
	size_t free_hint;   /* taken[] has no clear bit below this word */
	uint64_t state_gen; /* bumped with every change the state file records */
	unsigned *dirty;    /* numbers changed since the last write, each once */
	uint64_t *dirty_bits;
	size_t n_dirty;
	uint64_t refill_after, retry_at, retry_delay; /* CLOCK_MONOTONIC, µs */
	bool compact_wanted; /* the journal is long: the worker writes a snapshot */
	bool stop;
	bool worker_running;
	pthread_t worker;

	pthread_mutex_t save_mu; /* guards the rest */
	uint64_t saved_gen;      /* every change up to this one is in the files */
	unsigned *writing;       /* the dirty numbers being written */
	size_t n_writing;
	uint64_t journal_lines;
	int journal_fd;
	bool journal_torn; /* a failed append could not be cut off: write snapshots only */
	uint64_t appends, append_us_total, append_us_max;
	uint64_t snapshots, snapshot_us_total, snapshot_us_max;
};

static uint64_t now_usec(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * USEC_PER_SEC + (uint64_t)ts.tv_nsec / 1000;
}

static struct timespec timespec_at(uint64_t usec)
{
	return (struct timespec){.tv_sec = (time_t)(usec / USEC_PER_SEC),
				 .tv_nsec = (long)(usec % USEC_PER_SEC) * 1000};
}

static void nlsock_closep(NlSock **s)
{
	netns_nlsock_close(*s);
}

static void strv_freep(char ***v)
{
	netns_strv_free(*v);
}

static void json_putp(json_object **o)
{
	if (*o)
		json_object_put(*o);
}

/* ---- slots as objects ---- */

static NetnsSlot *slot_alloc(const char *owner)
{
	NetnsSlot *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	if (owner) {
		s->owner = strdup(owner);
		if (!s->owner) {
			free(s);
			return NULL;
		}
	}
	atomic_init(&s->n_ref, 1);
	pthread_mutex_init(&s->op_mu, NULL);
	return s;
}

NetnsSlot *netns_slot_ref(NetnsSlot *s)
{
	if (s)
		atomic_fetch_add(&s->n_ref, 1);
	return s;
}

NetnsSlot *netns_slot_unref(NetnsSlot *s)
{
	if (!s || atomic_fetch_sub(&s->n_ref, 1) != 1)
		return NULL;
	pthread_mutex_destroy(&s->op_mu);
	free(s->owner);
	free(s->path);
	free(s);
	return NULL;
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

static int slot_names(const NetnsPool *p, NetnsSlot *s, unsigned index)
{
	s->index = index;
	snprintf(s->name, sizeof(s->name), "%s%u", p->prefix, index);
	free(s->path);
	if (asprintf(&s->path, "%s/%s", p->netns_dir, s->name) < 0) {
		s->path = NULL;
		return -ENOMEM;
	}
	snprintf(s->host_link, sizeof(s->host_link), "em-%u", index);
	/* The range's network address is never a sandbox IP. */
	addr_at(&p->cfg.sandbox_range, index + 1, s->sandbox_ip, sizeof(s->sandbox_ip));
	return 0;
}

/* ---- the owner table: owner -> slot, for pending and in-use slots; caller holds p->mu ---- */

static size_t owner_hash(const char *owner)
{
	uint64_t h = 14695981039346656037ULL; /* FNV-1a */
	for (const unsigned char *c = (const unsigned char *)owner; *c; c++)
		h = (h ^ *c) * 1099511628211ULL;
	return (size_t)h;
}

static NetnsSlot *owner_find_locked(const NetnsPool *p, const char *owner)
{
	for (NetnsSlot *s = p->buckets[owner_hash(owner) & (p->n_buckets - 1)]; s; s = s->next)
		if (strcmp(s->owner, owner) == 0)
			return s;
	return NULL;
}

static void owner_insert_locked(NetnsPool *p, NetnsSlot *s)
{
	/* Doubling keeps chains short; without memory for it, longer chains still work. */
	if (p->n_owners >= p->n_buckets) {
		size_t n = p->n_buckets * 2;
		NetnsSlot **b = calloc(n, sizeof(NetnsSlot *));
		if (b) {
			for (size_t i = 0; i < p->n_buckets; i++)
				for (NetnsSlot *x = p->buckets[i], *nx; x; x = nx) {
					nx = x->next;
					size_t k = owner_hash(x->owner) & (n - 1);
					x->next = b[k];
					b[k] = x;
				}
			free(p->buckets);
			p->buckets = b;
			p->n_buckets = n;
		}
	}
	NetnsSlot **head = &p->buckets[owner_hash(s->owner) & (p->n_buckets - 1)];
	s->next = *head;
	*head = s;
	p->n_owners++;
}

static void owner_remove_locked(NetnsPool *p, NetnsSlot *s)
{
	for (NetnsSlot **pp = &p->buckets[owner_hash(s->owner) & (p->n_buckets - 1)]; *pp;
	     pp = &(*pp)->next)
		if (*pp == s) {
			*pp = s->next;
			s->next = NULL;
			p->n_owners--;
			return;
		}
}

/* ---- slot numbers; caller holds p->mu ---- */

static bool bit_test(const uint64_t *map, unsigned i)
{
	return map[i / 64] & (1ULL << (i % 64));
}

static void bit_set(uint64_t *map, unsigned i)
{
	map[i / 64] |= 1ULL << (i % 64);
}

static void bit_clear(uint64_t *map, unsigned i)
{
	map[i / 64] &= ~(1ULL << (i % 64));
}

/* The lowest free number, reserved; -ENOSPC when every number is taken. */
static int index_reserve_locked(NetnsPool *p)
{
	for (size_t w = p->free_hint; w < p->n_words; w++) {
		if (p->taken[w] == UINT64_MAX)
			continue;
		p->free_hint = w;
		unsigned i = (unsigned)(w * 64) + (unsigned)__builtin_ctzll(~p->taken[w]);
		bit_set(p->taken, i);
		return (int)i;
	}
	p->free_hint = p->n_words;
	return -ENOSPC;
}

static void index_free_locked(NetnsPool *p, unsigned i)
{
	bit_clear(p->taken, i);
	if (i / 64 < p->free_hint)
		p->free_hint = i / 64;
}

/* Caller holds p->mu. Marks number i for the next journal write; returns the change's gen. */
static uint64_t state_changed_locked(NetnsPool *p, unsigned i)
{
	if (!bit_test(p->dirty_bits, i)) {
		bit_set(p->dirty_bits, i);
		p->dirty[p->n_dirty++] = i;
	}
	return ++p->state_gen;
}

static int state_commit(NetnsPool *p, uint64_t gen);

/* Gives a number back; or, when what its slot left behind could not be removed, keeps it out
 * of use (and says so in the state file) until the worker's retry or a reclaim removes that:
 * a new slot there would collide with the leftovers, or worse, share them. */
static void index_put(NetnsPool *p, unsigned index, bool broken)
{
	uint64_t gen = 0;

	pthread_mutex_lock(&p->mu);
	if (!broken)
		index_free_locked(p, index);
	else if (!bit_test(p->broken, index)) {
		bit_set(p->broken, index);
		if (p->n_broken++ == 0) {
			p->retry_delay = RETRY_DELAY_MIN;
			p->retry_at = now_usec() + p->retry_delay;
		}
		gen = state_changed_locked(p, index);
	}
	pthread_cond_broadcast(&p->cond);
	pthread_mutex_unlock(&p->mu);
	/* Best effort: in memory the number is out of use either way. */
	if (gen > 0)
		(void)state_commit(p, gen);
}

/* ---- building and destroying ---- */

/* The inside of a slot, on a thread that has entered it. */
static int slot_build_inside(const NetnsSlot *s, const char *host_addr, const char *slot_cidr,
			     char **ret_error)
{
	_cleanup_(nlsock_closep) NlSock *nl = NULL;
	char tap_cidr[32];
	int r;

	r = netns_nlsock_open(&nl);
	if (r < 0)
		return error_set(ret_error, r, "netlink in %s: %s", s->name, strerror(-r));
	if ((r = netns_link_up(nl, "lo", ret_error)) < 0 ||
	    (r = netns_addr_add(nl, NETNS_SLOT_IF, slot_cidr, ret_error)) < 0 ||
	    (r = netns_link_up(nl, NETNS_SLOT_IF, ret_error)) < 0)
		return r;
	/* A persistent TAP: the VMM opens it by name later (and again after a restore). */
	r = netns_tap_create(NETNS_TAP_NAME);
	if (r < 0)
		return error_set(ret_error, r, "cannot create %s in %s: %s", NETNS_TAP_NAME,
				 s->name, strerror(-r));
	snprintf(tap_cidr, sizeof(tap_cidr), "%s/%d", NETNS_TAP_IP, NETNS_TAP_PREFIX);
	if ((r = netns_addr_add(nl, NETNS_TAP_NAME, tap_cidr, ret_error)) < 0 ||
	    (r = netns_link_up(nl, NETNS_TAP_NAME, ret_error)) < 0 ||
	    (r = netns_route_add(nl, "default", host_addr, NETNS_SLOT_IF, ret_error)) < 0)
		return r;
	r = netns_sysctl_write("/proc/sys/net/ipv4/ip_forward", "1");
	if (r < 0)
		return error_set(ret_error, r, "cannot enable forwarding in %s: %s", s->name,
				 strerror(-r));
	/* Best effort: without IPv6 in the kernel there is nothing to disable. */
	(void)netns_sysctl_write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1");
	(void)netns_sysctl_write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
	/* With the default policy in place: a slot handed out with it needs nothing more. */
	return netns_nft_slot_setup(s->sandbox_ip, ret_error);
}

/* Idempotent: what is already gone is no failure. */
static int slot_destroy(const NetnsSlot *s)
{
	_cleanup_(nlsock_closep) NlSock *nl = NULL;
	int r;

	if (!s->path)
		return 0; /* never named, never built */
	/* Deleting the host end takes the peer, its addresses and the host route with it. */
	r = netns_nlsock_open(&nl);
	if (r >= 0) {
		r = netns_link_delete(nl, s->host_link);
		if (r == -ENODEV || r == -ENOENT)
			r = 0;
	}
	int k = netns_remove_at(s->path);
	return r < 0 ? r : k;
}

/* Builds slot s (named) from nothing. The calling thread must be in the host namespace. A
 * failure removes whatever was made, and sets s->leftovers when that failed too. */
static int slot_build(const NetnsPool *p, NetnsSlot *s, char **ret_error)
{
	_cleanup_(nlsock_closep) NlSock *nl = NULL;
	_cleanup_close_ int ns = -EBADF;
	char host_addr[INET_ADDRSTRLEN], slot_addr[INET_ADDRSTRLEN];
	char host_cidr[32], slot_cidr[32], route[32];
	int r, saved;

	addr_at(&p->cfg.veth_range, 2 * s->index, host_addr, sizeof(host_addr));
	addr_at(&p->cfg.veth_range, 2 * s->index + 1, slot_addr, sizeof(slot_addr));
	snprintf(host_cidr, sizeof(host_cidr), "%s/31", host_addr);
	snprintf(slot_cidr, sizeof(slot_cidr), "%s/31", slot_addr);
	snprintf(route, sizeof(route), "%s/32", s->sandbox_ip);

	r = netns_create_at(s->path);
	if (r < 0) {
		r = error_set(ret_error, r, "cannot create namespace %s: %s", s->path,
			      strerror(-r));
		goto fail;
	}
	ns = open(s->path, O_RDONLY | O_CLOEXEC);
	if (ns < 0) {
		r = error_set(ret_error, -errno, "cannot open %s: %m", s->path);
		goto fail;
	}
	r = netns_nlsock_open(&nl);
	if (r < 0) {
		r = error_set(ret_error, r, "netlink: %s", strerror(-r));
		goto fail;
	}
	if ((r = netns_link_add_veth(nl, s->host_link, NETNS_SLOT_IF, ns, ret_error)) < 0 ||
	    (r = netns_addr_add(nl, s->host_link, host_cidr, ret_error)) < 0 ||
	    (r = netns_link_up(nl, s->host_link, ret_error)) < 0)
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
	r = netns_route_add(nl, route, slot_addr, s->host_link, ret_error);
	if (r < 0)
		goto fail;
	return 0;
fail:
	/* Also when the namespace could not be created: what sits at our name is a leftover
	 * of ours (a crash, a failed destroy), which reclaim would remove as well. */
	s->leftovers = slot_destroy(s) < 0;
	return r;
}

/* slot_build() from any thread: enter the host namespace for the duration. */
static int slot_build_in_host(const NetnsPool *p, NetnsSlot *s, char **ret_error)
{
	int saved = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC), r;

	if (saved < 0)
		return error_set(ret_error, -errno, "cannot open our namespace: %m");
	if (setns(p->host_ns, CLONE_NEWNET) < 0) {
		r = error_set(ret_error, -errno, "cannot enter the host namespace: %m");
		close(saved);
		return r;
	}
	r = slot_build(p, s, ret_error);
	int k = netns_leave(saved);
	return r < 0 ? r : k;
}

/* ---- state file ---- */

/*
 * A snapshot, <state_file>:
 *   {"boot_id": "...", "gen": G, "slots": [{"index": N, "owner": "..."}, ...], "broken": [N]}
 * and a journal, <state_file>.journal, one line per change of a number since the snapshot:
 *   {"gen": G, "index": N, "owner": "..."}   in use by owner
 *   {"gen": G, "index": N, "broken": true}   kept out of use
 *   {"gen": G, "index": N}                   free
 * Loading replays the lines with a gen above the snapshot's, so a snapshot written and a
 * journal not yet emptied (a crash in between) still mean the same.
 *
 * Why a journal: on ext4, rename() over an existing file costs ~0.8 ms (it starts writeback
 * of the new file), more than all the rest of a hand-out from the pool, and a whole state of
 * 1,000 slots is ~60 KB to build and write per change. A journal line is one small append.
 * The worker writes a snapshot once the journal has ~2n lines for n slots, and the pool
 * writes one when it starts and when it is freed.
 *
 * Nothing is fsynced: what the file describes (namespaces, links) dies with the kernel, so it
 * must survive our own crashes and restarts only, which never tear a rename() or a write()
 * that returned. After a reboot the boot id shows that nothing listed can still exist; a
 * snapshot that a power loss left torn is older than the boot.
 */

static void boot_id_get(char *buf, size_t size)
{
	_cleanup_free_ char *text = NULL;

	buf[0] = 0;
	if (read_full_file("/proc/sys/kernel/random/boot_id", 64, &text, NULL) >= 0)
		snprintf(buf, size, "%.*s", (int)strcspn(text, "\n"), text);
}

/* Whether the file was last written before this boot (the kernel's btime). */
static bool file_from_earlier_boot(const char *path)
{
	_cleanup_free_ char *text = NULL;
	struct stat st;
	const char *b;

	if (stat(path, &st) < 0 || read_full_file("/proc/stat", 1 << 20, &text, NULL) < 0 ||
	    !(b = strstr(text, "\nbtime ")))
		return false;
	return st.st_mtime < (time_t)strtoll(b + 7, NULL, 10);
}

static char *journal_path(const char *state_file)
{
	char *j = NULL;
	return asprintf(&j, "%s.journal", state_file) < 0 ? NULL : j;
}

/* Adds `value` (taken over) to an object, or to an array when key is NULL; -ENOMEM when
 * either failed. */
static int json_add(json_object *obj, const char *key, json_object *value)
{
	if (!value)
		return -ENOMEM;
	if ((key ? json_object_object_add(obj, key, value) : json_object_array_add(obj, value)) <
	    0) {
		json_object_put(value);
		return -ENOMEM;
	}
	return 0;
}

static int snapshot_new(const char *boot_id, uint64_t gen, json_object **ret_root,
			json_object **ret_slots, json_object **ret_broken)
{
	_cleanup_(json_putp) json_object *root = json_object_new_object();
	json_object *slots = json_object_new_array(), *broken = json_object_new_array();
	int r;

	if (!root || (*boot_id && json_add(root, "boot_id", json_object_new_string(boot_id)) < 0) ||
	    json_add(root, "gen", json_object_new_int64((int64_t)gen)) < 0) {
		json_object_put(slots);
		json_object_put(broken);
		return -ENOMEM;
	}
	if ((r = json_add(root, "slots", slots)) < 0) {
		json_object_put(broken);
		return r;
	}
	if ((r = json_add(root, "broken", broken)) < 0)
		return r;
	*ret_root = TAKE_PTR(root);
	*ret_slots = slots;
	*ret_broken = broken;
	return 0;
}

static int snapshot_add_slot(json_object *slots, unsigned index, const char *owner)
{
	_cleanup_(json_putp) json_object *o = json_object_new_object();
	int r;

	if (!o)
		return -ENOMEM;
	if ((r = json_add(o, "index", json_object_new_int64(index))) < 0 ||
	    (r = json_add(o, "owner", json_object_new_string(owner))) < 0)
		return r;
	return json_add(slots, NULL, TAKE_PTR(o));
}

/* Through a temporary file and rename(): a reader sees the old snapshot or the new one. */
static int snapshot_write(const char *path, json_object *root)
{
	_cleanup_free_ char *tmp = NULL;
	_cleanup_close_ int fd = -EBADF;
	const char *text = json_object_to_json_string_ext(root, JSON_C_TO_STRING_PRETTY);
	int r;

	if (!text)
		return -ENOMEM;
	/* A unique temporary name: a pool and a reclaim in another process may both write. */
	if (asprintf(&tmp, "%s.XXXXXX", path) < 0)
		return -ENOMEM;
	fd = mkostemp(tmp, O_CLOEXEC); /* mode 0600 */
	if (fd < 0)
		return -errno;
	r = write_full(fd, text, strlen(text));
	if (r >= 0 && rename(tmp, path) < 0)
		r = -errno;
	if (r < 0)
		(void)unlink(tmp);
	return r;
}

/* Caller holds p->mu and p->save_mu. Hands the dirty numbers over to the writer (in
 * p->writing) and clears them. */
static void dirty_take_locked(NetnsPool *p)
{
	unsigned *w = p->writing;

	for (size_t k = 0; k < p->n_dirty; k++)
		bit_clear(p->dirty_bits, p->dirty[k]);
	p->writing = p->dirty;
	p->n_writing = p->n_dirty;
	p->dirty = w;
	p->n_dirty = 0;
}

/* After a failed write: what was taken is dirty again. Caller holds p->save_mu. */
static void dirty_restore(NetnsPool *p)
{
	pthread_mutex_lock(&p->mu);
	for (size_t k = 0; k < p->n_writing; k++)
		if (!bit_test(p->dirty_bits, p->writing[k])) {
			bit_set(p->dirty_bits, p->writing[k]);
			p->dirty[p->n_dirty++] = p->writing[k];
		}
	pthread_mutex_unlock(&p->mu);
	p->n_writing = 0;
}

/* The whole state, in number order. Caller holds p->mu. */
static int snapshot_of_locked(const NetnsPool *p, json_object **ret)
{
	_cleanup_(json_putp) json_object *root = NULL;
	json_object *slots, *broken;
	int r;

	r = snapshot_new(p->boot_id, p->state_gen, &root, &slots, &broken);
	if (r < 0)
		return r;
	for (size_t w = 0; w < p->n_words; w++)
		for (uint64_t bits = p->taken[w]; bits; bits &= bits - 1) {
			unsigned i = (unsigned)(w * 64) + (unsigned)__builtin_ctzll(bits);
			if (i >= p->max_slots)
				break;
			if (p->by_index[i])
				r = snapshot_add_slot(slots, i, p->by_index[i]->owner);
			else if (bit_test(p->broken, i))
				r = json_add(broken, NULL, json_object_new_int64(i));
			if (r < 0)
				return r;
		}
	*ret = TAKE_PTR(root);
	return 0;
}

/* The journal lines for the dirty numbers, as they are now. Caller holds p->mu. */
static int journal_lines_locked(const NetnsPool *p, char **ret, size_t *ret_len)
{
	_cleanup_free_ char *buf = NULL;
	_cleanup_fclose_ FILE *f = NULL;
	size_t len = 0;
	int r = 0;

	f = open_memstream(&buf, &len);
	if (!f)
		return -ENOMEM;
	for (size_t k = 0; k < p->n_dirty && r >= 0; k++) {
		_cleanup_(json_putp) json_object *o = json_object_new_object();
		unsigned i = p->dirty[k];
		const char *text;

		if (!o)
			return -ENOMEM;
		if ((r = json_add(o, "gen", json_object_new_int64((int64_t)p->state_gen))) < 0 ||
		    (r = json_add(o, "index", json_object_new_int64(i))) < 0)
			return r;
		if (p->by_index[i])
			r = json_add(o, "owner", json_object_new_string(p->by_index[i]->owner));
		else if (bit_test(p->broken, i))
			r = json_add(o, "broken", json_object_new_boolean(1));
		if (r < 0)
			return r;
		text = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN);
		if (!text || fputs(text, f) < 0 || fputc('\n', f) < 0)
			return -ENOMEM;
	}
	if (fclose(TAKE_PTR(f)) != 0)
		return -ENOMEM;
	*ret = TAKE_PTR(buf);
	*ret_len = len;
	return 0;
}

static void stat_add(uint64_t *count, uint64_t *total, uint64_t *max, uint64_t start)
{
	uint64_t us = now_usec() - start;
	(*count)++;
	*total += us;
	if (us > *max)
		*max = us;
}

/* Writes the whole state and empties the journal. Caller holds p->save_mu. */
static int snapshot_save_save_mu(NetnsPool *p)
{
	_cleanup_(json_putp) json_object *root = NULL;
	uint64_t start = now_usec(), g;
	int r;

	pthread_mutex_lock(&p->mu);
	g = p->state_gen;
	r = snapshot_of_locked(p, &root);
	if (r >= 0)
		dirty_take_locked(p); /* the snapshot holds them */
	pthread_mutex_unlock(&p->mu);
	if (r >= 0)
		r = snapshot_write(p->state_file, root);
	if (r < 0) {
		dirty_restore(p);
		return r;
	}
	p->n_writing = 0;
	p->saved_gen = g;
	/* Every line there is covered by the snapshot now. Should the journal stay as it is,
	 * loading skips those lines by their gen; but a torn line must go, or the journal is
	 * unreadable: failing to empty it, start a new one. */
	stat_add(&p->snapshots, &p->snapshot_us_total, &p->snapshot_us_max, start);
	if (ftruncate(p->journal_fd, 0) < 0) {
		_cleanup_free_ char *j = journal_path(p->state_file);
		int fd = j ? open(j, O_WRONLY | O_APPEND | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)
			   : -EBADF;
		if (fd < 0)
			return 0; /* a torn journal stays so: commits go on writing snapshots */
		safe_close(p->journal_fd);
		p->journal_fd = fd;
	}
	p->journal_lines = 0;
	p->journal_torn = false;
	return 0;
}

static int snapshot_save(NetnsPool *p)
{
	pthread_mutex_lock(&p->save_mu);
	int r = snapshot_save_save_mu(p);
	pthread_mutex_unlock(&p->save_mu);
	return r;
}

/* Makes the file hold at least change `gen`. A group commit: whoever writes takes every
 * change made so far, and those whose change is in by then return at once. */
static int state_commit(NetnsPool *p, uint64_t gen)
{
	_cleanup_free_ char *text = NULL;
	uint64_t start, g;
	size_t len = 0;
	bool compact = false;
	int r;

	pthread_mutex_lock(&p->save_mu);
	if (p->saved_gen >= gen) {
		pthread_mutex_unlock(&p->save_mu);
		return 0;
	}
	if (p->journal_torn) {
		r = snapshot_save_save_mu(p);
		pthread_mutex_unlock(&p->save_mu);
		return r;
	}
	start = now_usec();
	pthread_mutex_lock(&p->mu);
	g = p->state_gen;
	r = journal_lines_locked(p, &text, &len);
	if (r >= 0)
		dirty_take_locked(p);
	/* Once the journal has twice the lines the snapshot would, the worker writes one. */
	compact = p->journal_lines + p->n_writing >= 64 + 2 * (uint64_t)(p->n_in_use + p->n_broken);
	pthread_mutex_unlock(&p->mu);
	if (r >= 0) {
		struct stat st;
		if (fstat(p->journal_fd, &st) < 0)
			r = -errno;
		else if ((r = write_full(p->journal_fd, text, len)) < 0 &&
			 ftruncate(p->journal_fd, st.st_size) < 0)
			p->journal_torn = true; /* no torn line may stay before the next one */
		if (r < 0)
			dirty_restore(p);
	}
	if (r >= 0) {
		p->journal_lines += p->n_writing;
		p->n_writing = 0;
		p->saved_gen = g;
		stat_add(&p->appends, &p->append_us_total, &p->append_us_max, start);
	}
	pthread_mutex_unlock(&p->save_mu);
	if (r >= 0 && compact) {
		pthread_mutex_lock(&p->mu);
		p->compact_wanted = true;
		pthread_cond_broadcast(&p->cond);
		pthread_mutex_unlock(&p->mu);
	}
	return r;
}

typedef struct State {
	unsigned max_slots;
	char **owner;    /* per number: the owner of the slot in use there, or NULL */
	uint8_t *broken; /* per number */
	uint64_t gen;    /* the last change the files hold */
	size_t n_stale;  /* slots listed by files from an earlier boot, left out */
} State;

static void state_done(State *st)
{
	for (unsigned i = 0; st->owner && i < st->max_slots; i++)
		free(st->owner[i]);
	free(st->owner);
	free(st->broken);
	*st = (State){};
}

static int state_set(State *st, int64_t index, const char *owner, bool broken)
{
	if (index < 0 || index >= st->max_slots)
		return 0; /* the ranges were made smaller since */
	char *o = owner ? strdup(owner) : NULL;
	if (owner && !o)
		return -ENOMEM;
	free(st->owner[index]);
	st->owner[index] = o;
	st->broken[index] = broken;
	return 0;
}

static int state_bad(char **ret_error, const char *path, const char *why)
{
	return error_set(ret_error, -EBADMSG, "%s is not a slot state file (%s); fix or remove it",
			 path, why);
}

static bool json_get(json_object *o, const char *key, json_type type, json_object **ret)
{
	return json_object_object_get_ex(o, key, ret) && json_object_is_type(*ret, type);
}

static int snapshot_load(const char *path, const char *boot_id, State *st, char **ret_error)
{
	_cleanup_(json_putp) json_object *root = NULL;
	_cleanup_free_ char *text = NULL;
	enum json_tokener_error jerr = json_tokener_success;
	json_object *arr = NULL, *brk = NULL, *j = NULL;
	int r;

	r = read_full_file(path, 64 << 20, &text, NULL);
	if (r == -ENOENT)
		return 0;
	if (r < 0)
		return error_set(ret_error, r, "cannot read %s: %s", path, strerror(-r));
	root = json_tokener_parse_verbose(text, &jerr);
	if (!root && file_from_earlier_boot(path)) {
		log_debug("%s is torn but from an earlier boot: nothing it listed exists", path);
		return 1;
	}
	if (!root)
		return state_bad(ret_error, path, json_tokener_error_desc(jerr));
	if (!json_object_is_type(root, json_type_object) ||
	    !json_get(root, "slots", json_type_array, &arr))
		return state_bad(ret_error, path, "no \"slots\" array");
	/* Without a boot id (an older file) it is taken as this boot's. */
	if (json_object_object_get_ex(root, "boot_id", &j)) {
		if (!json_object_is_type(j, json_type_string))
			return state_bad(ret_error, path, "\"boot_id\" is not a string");
		if (*boot_id && strcmp(json_object_get_string(j), boot_id) != 0) {
			st->n_stale = json_object_array_length(arr);
			return 1;
		}
	}
	if (json_object_object_get_ex(root, "gen", &j)) {
		if (!json_object_is_type(j, json_type_int) || json_object_get_int64(j) < 0)
			return state_bad(ret_error, path, "\"gen\" is not a count");
		st->gen = (uint64_t)json_object_get_int64(j);
	}
	if (json_object_object_get_ex(root, "broken", &brk) &&
	    !json_object_is_type(brk, json_type_array))
		return state_bad(ret_error, path, "\"broken\" is not an array");

	for (size_t i = 0, n = json_object_array_length(arr); i < n; i++) {
		json_object *o = json_object_array_get_idx(arr, i), *jidx, *jown;
		if (!json_object_is_type(o, json_type_object) ||
		    !json_get(o, "index", json_type_int, &jidx) ||
		    !json_get(o, "owner", json_type_string, &jown))
			return state_bad(ret_error, path, "a slot without an index and an owner");
		if (!id_is_valid(json_object_get_string(jown)))
			return state_bad(ret_error, path, "an invalid owner");
		r = state_set(st, json_object_get_int64(jidx), json_object_get_string(jown), false);
		if (r < 0)
			return r;
	}
	for (size_t i = 0, n = brk ? json_object_array_length(brk) : 0; i < n; i++) {
		json_object *o = json_object_array_get_idx(brk, i);
		if (!json_object_is_type(o, json_type_int))
			return state_bad(ret_error, path, "a broken number that is not a number");
		r = state_set(st, json_object_get_int64(o), NULL, true);
		if (r < 0)
			return r;
	}
	return 0;
}

/* Replays the lines newer than the snapshot. A last line without its newline was never
 * finished (nor acknowledged): it is ignored. */
static int journal_load(const char *path, State *st, char **ret_error)
{
	_cleanup_free_ char *text = NULL;
	uint64_t snapshot_gen = st->gen;
	int r;

	r = read_full_file(path, 64 << 20, &text, NULL);
	if (r == -ENOENT)
		return 0;
	if (r < 0)
		return error_set(ret_error, r, "cannot read %s: %s", path, strerror(-r));
	for (char *line = text, *nl; (nl = strchr(line, '\n')); line = nl + 1) {
		_cleanup_(json_putp) json_object *o = NULL;
		json_object *jgen, *jidx, *j;

		*nl = 0;
		o = json_tokener_parse(line);
		if (!o || !json_object_is_type(o, json_type_object) ||
		    !json_get(o, "gen", json_type_int, &jgen) ||
		    !json_get(o, "index", json_type_int, &jidx))
			return state_bad(ret_error, path, "a line that is not a change");
		int64_t gen = json_object_get_int64(jgen);
		if (gen < 0 || (uint64_t)gen <= snapshot_gen)
			continue;
		if (json_object_object_get_ex(o, "owner", &j)) {
			if (!json_object_is_type(j, json_type_string) ||
			    !id_is_valid(json_object_get_string(j)))
				return state_bad(ret_error, path, "an invalid owner");
			r = state_set(st, json_object_get_int64(jidx), json_object_get_string(j),
				      false);
		} else
			r = state_set(st, json_object_get_int64(jidx), NULL,
				      json_get(o, "broken", json_type_boolean, &j) &&
					      json_object_get_boolean(j));
		if (r < 0)
			return r;
		if ((uint64_t)gen > st->gen)
			st->gen = (uint64_t)gen;
	}
	return 0;
}

/* Reads the snapshot and replays the journal. Missing files, or files from an earlier boot,
 * are an empty state; a file that does not parse, or whose entries are not what we write, is
 * an error: never guess what is in use. */
static int state_load(const char *path, unsigned max_slots, const char *boot_id, State *ret,
		      char **ret_error)
{
	_cleanup_(state_done) State st = {.max_slots = max_slots};
	_cleanup_free_ char *j = journal_path(path);
	int r;

	st.owner = calloc(max_slots ?: 1, sizeof(char *));
	st.broken = calloc(max_slots ?: 1, 1);
	if (!j || !st.owner || !st.broken)
		return -ENOMEM;
	r = snapshot_load(path, boot_id, &st, ret_error);
	if (r < 0)
		return r;
	if (r == 0) {
		r = journal_load(j, &st, ret_error);
		if (r < 0)
			return r;
	}
	*ret = st;
	st = (State){};
	return 0;
}

/* ---- the worker: keeps the pool full, retries the destroy of broken slots ---- */

static void worker_refill_one(NetnsPool *p, unsigned index)
{
	_cleanup_(netns_slot_unrefp) NetnsSlot *s = slot_alloc(NULL);
	_cleanup_free_ char *err = NULL;
	int r;

	r = s ? slot_names(p, s, index) : -ENOMEM;
	if (r >= 0)
		r = slot_build(p, s, &err);
	pthread_mutex_lock(&p->mu);
	p->n_building--;
	if (r >= 0) {
		s->state = SLOT_READY;
		s->next = p->ready;
		p->ready = TAKE_PTR(s);
		p->n_ready++;
		pthread_cond_broadcast(&p->cond);
		pthread_mutex_unlock(&p->mu);
		return;
	}
	/* Do not spin on a persistent failure; acquire still builds cold. */
	p->refill_after = now_usec() + USEC_PER_SEC;
	pthread_mutex_unlock(&p->mu);
	log_debug("refill: slot %u: %s", index, err ?: strerror(-r));
	index_put(p, index, s && s->leftovers);
}

static void worker_retry_broken(NetnsPool *p)
{
	unsigned batch[BROKEN_BATCH];
	size_t n = 0;
	uint64_t gen = 0;

	pthread_mutex_lock(&p->mu);
	for (size_t w = 0; w < p->n_words && n < BROKEN_BATCH; w++)
		for (uint64_t bits = p->broken[w]; bits && n < BROKEN_BATCH; bits &= bits - 1)
			batch[n++] = (unsigned)(w * 64) + (unsigned)__builtin_ctzll(bits);
	pthread_mutex_unlock(&p->mu);

	for (size_t i = 0; i < n; i++) {
		NetnsSlot tmp = {};
		int k = slot_names(p, &tmp, batch[i]);
		if (k >= 0)
			k = slot_destroy(&tmp);
		free(tmp.path);
		if (k < 0) {
			log_debug("slot %u still not removed: %s", batch[i], strerror(-k));
			continue;
		}
		pthread_mutex_lock(&p->mu);
		bit_clear(p->broken, batch[i]);
		p->n_broken--;
		index_free_locked(p, batch[i]);
		gen = state_changed_locked(p, batch[i]);
		pthread_mutex_unlock(&p->mu);
	}
	if (gen > 0)
		(void)state_commit(p, gen);

	pthread_mutex_lock(&p->mu);
	if (p->n_broken > 0) {
		p->retry_delay *= 2;
		if (p->retry_delay > RETRY_DELAY_MAX)
			p->retry_delay = RETRY_DELAY_MAX;
		p->retry_at = now_usec() + p->retry_delay;
	}
	pthread_cond_broadcast(&p->cond);
	pthread_mutex_unlock(&p->mu);
}

static void *worker_main(void *arg)
{
	NetnsPool *p = arg;

	/* Slots are built in the host namespace, whatever the creating thread does later. */
	if (setns(p->host_ns, CLONE_NEWNET) < 0)
		log_debug("pool worker: cannot enter the host namespace: %m");
	pthread_mutex_lock(&p->mu);
	while (!p->stop) {
		uint64_t now = now_usec(), wake = UINT64_MAX;
		bool short_of_ready = p->n_ready + p->n_building < p->cfg.pool_size;

		if (p->compact_wanted) {
			p->compact_wanted = false;
			pthread_mutex_unlock(&p->mu);
			(void)snapshot_save(p); /* failing, the journal just goes on */
			pthread_mutex_lock(&p->mu);
			continue;
		}
		if (p->n_broken > 0 && now >= p->retry_at) {
			pthread_mutex_unlock(&p->mu);
			worker_retry_broken(p);
			pthread_mutex_lock(&p->mu);
			continue;
		}
		if (short_of_ready && now >= p->refill_after) {
			int index = index_reserve_locked(p);
			if (index >= 0) {
				/* Built with the lock dropped: acquires go on meanwhile. */
				p->n_building++;
				pthread_mutex_unlock(&p->mu);
				worker_refill_one(p, (unsigned)index);
				pthread_mutex_lock(&p->mu);
				continue;
			}
			/* Every number in use: a release wakes us. */
		} else if (short_of_ready)
			wake = p->refill_after;
		if (p->n_broken > 0 && p->retry_at < wake)
			wake = p->retry_at;
		if (wake == UINT64_MAX)
			pthread_cond_wait(&p->cond, &p->mu);
		else {
			struct timespec ts = timespec_at(wake);
			pthread_cond_timedwait(&p->cond, &p->mu, &ts);
		}
	}
	pthread_mutex_unlock(&p->mu);
	return NULL;
}

/* ---- the pool ---- */

static void config_done(NetnsPool *p)
{
	free(p->netns_dir);
	free(p->prefix);
	free(p->uplink);
	free(p->state_file);
}

static int config_copy(NetnsPool *p, const NetnsConfig *c, char **ret_error)
{
	p->cfg = *c;
	p->netns_dir = strdup(c->netns_dir ?: "/run/netns");
	p->prefix = strdup(c->name_prefix ?: "ember-");
	p->uplink = c->uplink && *c->uplink ? strdup(c->uplink) : NULL;
	p->state_file = c->state_file ? strdup(c->state_file) : NULL;
	if (!c->state_file) {
		/* Spelled out (not `return error_set()`): the analyzer cannot see that it
		 * returns its r, and would follow a NULL state file on. */
		(void)error_set(ret_error, -EINVAL, "a state file is required");
		return -EINVAL;
	}
	if (!p->netns_dir || !p->prefix || (c->uplink && *c->uplink && !p->uplink) ||
	    !p->state_file)
		return -ENOMEM;
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

/* The slots and broken numbers of the state file, taken up as they were. */
static int pool_adopt(NetnsPool *p, const State *st)
{
	for (unsigned i = 0; i < st->max_slots; i++) {
		if (st->broken[i]) {
			bit_set(p->taken, i);
			bit_set(p->broken, i);
			p->n_broken++;
			continue;
		}
		/* Owners twice, in a hand-edited file: the first claim wins. */
		if (!st->owner[i] || owner_find_locked(p, st->owner[i]))
			continue;
		NetnsSlot *s = slot_alloc(st->owner[i]);
		if (!s)
			return -ENOMEM;
		if (slot_names(p, s, i) < 0) {
			netns_slot_unref(s);
			return -ENOMEM;
		}
		s->state = SLOT_IN_USE;
		owner_insert_locked(p, s);
		p->by_index[i] = s;
		bit_set(p->taken, i);
		p->n_in_use++;
	}
	p->state_gen = st->gen;
	p->retry_delay = RETRY_DELAY_MIN;
	p->retry_at = now_usec() + p->retry_delay;
	return 0;
}

int netns_pool_new(const NetnsConfig *config, NetnsPool **ret, char **ret_error)
{
	_cleanup_(netns_pool_freep) NetnsPool *p = NULL;
	_cleanup_(state_done) State st = {};
	pthread_condattr_t attr;
	int r;

	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->host_ns = -EBADF;
	p->journal_fd = -EBADF;
	pthread_mutex_init(&p->mu, NULL);
	pthread_mutex_init(&p->save_mu, NULL);
	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&p->cond, &attr);
	pthread_condattr_destroy(&attr);
	r = config_copy(p, config, ret_error);
	if (r < 0)
		return r;
	boot_id_get(p->boot_id, sizeof(p->boot_id));
	p->n_words = (p->max_slots + 63) / 64 ?: 1;
	p->taken = calloc(p->n_words, sizeof(uint64_t));
	p->broken = calloc(p->n_words, sizeof(uint64_t));
	p->dirty_bits = calloc(p->n_words, sizeof(uint64_t));
	p->dirty = calloc(p->max_slots ?: 1, sizeof(unsigned));
	p->writing = calloc(p->max_slots ?: 1, sizeof(unsigned));
	p->by_index = calloc(p->max_slots ?: 1, sizeof(NetnsSlot *));
	p->n_buckets = OWNER_BUCKETS_MIN;
	p->buckets = calloc(p->n_buckets, sizeof(NetnsSlot *));
	if (!p->taken || !p->broken || !p->dirty_bits || !p->dirty || !p->writing || !p->by_index ||
	    !p->buckets)
		return -ENOMEM;
	/* The bits past the last slot are never free. */
	for (unsigned i = p->max_slots; i < p->n_words * 64; i++)
		bit_set(p->taken, i);

	p->host_ns = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	if (p->host_ns < 0)
		return error_set(ret_error, -errno, "cannot open our network namespace: %m");
	r = netns_dir_prepare(p->netns_dir);
	if (r < 0)
		return error_set(ret_error, r, "cannot prepare %s: %s", p->netns_dir, strerror(-r));
	/* Forwarding between the slots and the uplink. */
	r = netns_sysctl_write("/proc/sys/net/ipv4/ip_forward", "1");
	if (r < 0)
		return error_set(ret_error, r, "cannot enable IPv4 forwarding: %s", strerror(-r));
	if (p->uplink) {
		r = netns_nft_host_setup(p->uplink, &p->cfg.sandbox_range, ret_error);
		if (r < 0)
			return r;
	}

	/* Slots in use before a restart stay in use; their namespaces are expected to exist
	 * (netns_reclaim() removed the rest). */
	r = state_load(p->state_file, p->max_slots, p->boot_id, &st, ret_error);
	if (r < 0)
		return r;
	r = pool_adopt(p, &st);
	if (r < 0)
		return r;
	/* A snapshot of what was adopted, and a journal of our own from here on. */
	_cleanup_free_ char *j = journal_path(p->state_file);
	if (!j)
		return -ENOMEM;
	p->journal_fd = open(j, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	if (p->journal_fd < 0)
		return error_set(ret_error, -errno, "cannot open %s: %m", j);
	r = snapshot_save(p);
	if (r < 0)
		return error_set(ret_error, r, "cannot write %s: %s", p->state_file, strerror(-r));

	/* Always: besides keeping the pool full it retries what could not be removed. */
	r = -pthread_create(&p->worker, NULL, worker_main, p);
	if (r < 0)
		return error_set(ret_error, r, "cannot start the pool thread: %s", strerror(-r));
	p->worker_running = true;
	*ret = TAKE_PTR(p);
	return 0;
}

void netns_pool_free(NetnsPool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->mu);
	p->stop = true;
	pthread_cond_broadcast(&p->cond);
	pthread_mutex_unlock(&p->mu);
	if (p->worker_running) {
		pthread_join(p->worker, NULL);
		/* After a clean stop the snapshot alone says everything. */
		(void)snapshot_save(p);
	}
	/* Ready slots belong to nobody: take them down (what cannot be is left to reclaim).
	 * Slots in use stay. */
	for (NetnsSlot *s = p->ready, *n; s; s = n) {
		n = s->next;
		(void)slot_destroy(s);
		netns_slot_unref(s);
	}
	for (size_t i = 0; p->buckets && i < p->n_buckets; i++)
		for (NetnsSlot *s = p->buckets[i], *n; s; s = n) {
			n = s->next;
			s->next = NULL;
			netns_slot_unref(s);
		}
	safe_close(p->host_ns);
	safe_close(p->journal_fd);
	free(p->buckets);
	free(p->by_index);
	free(p->dirty_bits);
	free(p->dirty);
	free(p->writing);
	free(p->taken);
	free(p->broken);
	config_done(p);
	pthread_mutex_destroy(&p->mu);
	pthread_mutex_destroy(&p->save_mu);
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
	if (setns(p->host_ns, CLONE_NEWNET) < 0) {
		r = -errno;
		close(saved);
		return r;
	}
	r = netns_nlsock_open(&nl);
	if (r >= 0)
		r = netns_addr_list_ipv4(nl, ret);
	netns_nlsock_close(TAKE_PTR(nl));
	int k = netns_leave(saved);
	return r < 0 ? r : k;
}

static int apply_policy(NetnsPool *p, const NetnsSlot *s, const NetnsPolicy *policy,
			char **ret_error)
{
	_cleanup_(strv_freep) char **host = NULL;
	int r, saved;

	/* The whole sandbox and veth ranges: other guests and every slot's gateway. */
	NetnsCidr extra[] = {p->cfg.sandbox_range, p->cfg.veth_range};

	/* Only a guest with internet access needs them spelled out (see netns_nft_slot_policy()).
	 */
	if (policy && policy->internet) {
		r = host_addresses(p, &host);
		if (r < 0)
			return error_set(ret_error, r, "cannot list the host's addresses: %s",
					 strerror(-r));
	}
	saved = netns_enter(s->path);
	if (saved < 0)
		return error_set(ret_error, saved, "cannot enter %s: %s", s->path,
				 strerror(-saved));
	r = netns_nft_slot_policy(policy, host, extra, ELEMENTSOF(extra), ret_error);
	int k = netns_leave(saved);
	return r < 0 ? r : k;
}

/* Undoes a failed acquire: destroys what was built (when `destroy`), frees the owner and the
 * number, and drops the owner table's reference. */
static void slot_discard(NetnsPool *p, NetnsSlot *s, bool destroy)
{
	if (destroy)
		s->leftovers = slot_destroy(s) < 0;
	pthread_mutex_lock(&p->mu);
	owner_remove_locked(p, s);
	s->state = SLOT_RELEASED;
	pthread_mutex_unlock(&p->mu);
	index_put(p, s->index, s->leftovers);
	netns_slot_unref(s);
}

/* Into the state file, then in use: a crash before the write leaves a namespace that no
 * record claims (reclaim removes it), never a slot in use that the file does not know. */
static int slot_record(NetnsPool *p, NetnsSlot *s, char **ret_error)
{
	uint64_t gen;
	int r;

	pthread_mutex_lock(&p->mu);
	p->by_index[s->index] = s;
	gen = state_changed_locked(p, s->index);
	pthread_mutex_unlock(&p->mu);
	r = state_commit(p, gen);
	pthread_mutex_lock(&p->mu);
	if (r < 0) {
		/* The next write drops it again, should this one have got there after all. */
		p->by_index[s->index] = NULL;
		(void)state_changed_locked(p, s->index);
	} else {
		s->state = SLOT_IN_USE;
		p->n_in_use++;
	}
	pthread_mutex_unlock(&p->mu);
	if (r < 0)
		return error_set(ret_error, r, "cannot write %s: %s", p->state_file, strerror(-r));
	return 0;
}

int netns_slot_acquire(NetnsPool *p, const char *owner, const NetnsPolicy *policy, NetnsSlot **ret,
		       char **ret_error)
{
	_cleanup_(netns_slot_unrefp) NetnsSlot *fresh = NULL;
	NetnsSlot *s, *other;
	bool cold = false;
	int r;

	if (!p || !ret)
		return -EINVAL;
	if (!id_is_valid(owner))
		return error_set(ret_error, -EINVAL, "invalid owner \"%s\"", owner ?: "");
	/* A policy that cannot be applied is refused before it costs a slot. */
	r = netns_nft_policy_check(policy, ret_error);
	if (r < 0)
		return r;
	/* Allocated before the lock: used when no slot is ready. */
	fresh = slot_alloc(owner);
	if (!fresh)
		return -ENOMEM;

	/* The owner check and the reservation in one critical section: a second acquire for
	 * the same owner finds the first one's entry, pending or in use. */
	pthread_mutex_lock(&p->mu);
	other = owner_find_locked(p, owner);
	if (other) {
		bool pending = other->state == SLOT_PENDING;
		unsigned index = other->index;
		pthread_mutex_unlock(&p->mu);
		if (pending)
			return error_set(ret_error, -EEXIST, "%s already has a slot (being set up)",
					 owner);
		return error_set(ret_error, -EEXIST, "%s already has slot %u", owner, index);
	}
	if (p->ready) {
		s = p->ready;
		p->ready = s->next;
		p->n_ready--;
		s->owner = TAKE_PTR(fresh->owner);
	} else {
		int index = index_reserve_locked(p);
		if (index < 0) {
			pthread_mutex_unlock(&p->mu);
			return error_set(ret_error, -ENOSPC, "all %u network slots are in use",
					 p->max_slots);
		}
		s = TAKE_PTR(fresh);
		s->index = (unsigned)index;
		cold = true;
	}
	s->state = SLOT_PENDING;
	owner_insert_locked(p, s);        /* s's reference is the table's from here on */
	pthread_cond_broadcast(&p->cond); /* the worker replaces a ready slot at once */
	pthread_mutex_unlock(&p->mu);

	if (cold) {
		/* Built on this thread, in the host namespace. */
		r = slot_names(p, s, s->index);
		if (r >= 0)
			r = slot_build_in_host(p, s, ret_error);
		if (r < 0) {
			slot_discard(p, s, false); /* slot_build() unwound itself */
			return r;
		}
	}
	/* A slot is built with the default policy: nothing to do for it. */
	r = netns_nft_policy_is_default(policy) ? 0 : apply_policy(p, s, policy, ret_error);
	if (r >= 0)
		r = slot_record(p, s, ret_error);
	if (r < 0) {
		slot_discard(p, s, true);
		return r;
	}
	*ret = netns_slot_ref(s);
	return 0;
}

int netns_slot_release(NetnsPool *p, NetnsSlot *slot, char **ret_error)
{
	_cleanup_(netns_slot_unrefp) NetnsSlot *s = slot; /* the caller's, whatever happens */
	uint64_t gen;
	int r, k;

	if (!p || !s)
		return -EINVAL;
	pthread_mutex_lock(&s->op_mu);
	pthread_mutex_lock(&p->mu);
	if (s->state != SLOT_IN_USE) {
		pthread_mutex_unlock(&p->mu);
		pthread_mutex_unlock(&s->op_mu);
		return error_set(ret_error, -ENOENT, "slot %u of %s is not in use any more",
				 s->index, s->owner ?: "nobody");
	}
	s->state = SLOT_RELEASED;
	owner_remove_locked(p, s);
	p->by_index[s->index] = NULL;
	p->n_in_use--;
	gen = state_changed_locked(p, s->index);
	pthread_mutex_unlock(&p->mu);
	pthread_mutex_unlock(&s->op_mu);

	/* Out of the file before the namespace goes: a crash in between leaves a namespace
	 * that no record claims, which reclaim removes. */
	r = state_commit(p, gen);
	k = slot_destroy(s);
	index_put(p, s->index, k < 0);
	netns_slot_unref(s); /* the owner table's */
	if (k < 0)
		return error_set(ret_error, k,
				 "slot %u (%s) not fully removed: %s; its number stays out of use "
				 "until a retry or a reclaim removes what is left",
				 s->index, s->owner, strerror(-k));
	if (r < 0)
		return error_set(ret_error, r, "slot %u removed, but cannot write %s: %s", s->index,
				 p->state_file, strerror(-r));
	return 0;
}

int netns_slot_set_policy(NetnsPool *p, NetnsSlot *slot, const NetnsPolicy *policy,
			  char **ret_error)
{
	bool in_use;
	int r;

	if (!p || !slot)
		return -EINVAL;
	r = netns_nft_policy_check(policy, ret_error);
	if (r < 0)
		return r;
	/* Held across the change: a release waits for it, and after a release the number may
	 * belong to another slot whose namespace is at the same path. */
	pthread_mutex_lock(&slot->op_mu);
	pthread_mutex_lock(&p->mu);
	in_use = slot->state == SLOT_IN_USE;
	pthread_mutex_unlock(&p->mu);
	if (in_use)
		r = apply_policy(p, slot, policy, ret_error);
	else
		r = error_set(ret_error, -ENOENT, "slot %u of %s is not in use any more",
			      slot->index, slot->owner ?: "nobody");
	pthread_mutex_unlock(&slot->op_mu);
	return r;
}

int netns_slot_find(NetnsPool *p, const char *owner, NetnsSlot **ret)
{
	NetnsSlot *s;

	if (!p || !ret)
		return -EINVAL;
	if (!owner)
		return -ENOENT;
	pthread_mutex_lock(&p->mu);
	s = owner_find_locked(p, owner);
	if (s && s->state == SLOT_IN_USE)
		netns_slot_ref(s); /* taken under the lock: a release cannot free it meanwhile */
	else
		s = NULL;
	pthread_mutex_unlock(&p->mu);
	if (!s)
		return -ENOENT;
	*ret = s;
	return 0;
}

void netns_pool_stats(NetnsPool *p, NetnsPoolStats *ret)
{
	NetnsPoolStats st;

	pthread_mutex_lock(&p->mu);
	st = (NetnsPoolStats){.ready = p->n_ready,
			      .in_use = p->n_in_use,
			      .max_slots = p->max_slots,
			      .broken = p->n_broken};
	pthread_mutex_unlock(&p->mu);
	pthread_mutex_lock(&p->save_mu);
	st.journal_writes = p->appends;
	st.journal_us_total = p->append_us_total;
	st.journal_us_max = p->append_us_max;
	st.snapshot_writes = p->snapshots;
	st.snapshot_us_total = p->snapshot_us_total;
	st.snapshot_us_max = p->snapshot_us_max;
	pthread_mutex_unlock(&p->save_mu);
	*ret = st;
}

int netns_pool_wait_ready(NetnsPool *p, int timeout_ms)
{
	uint64_t wait_us = timeout_ms > 0 ? (uint64_t)timeout_ms * 1000 : 0;
	struct timespec ts = timespec_at(now_usec() + wait_us);
	int r = 0;

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

static int strcmp_ptr(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

int netns_reclaim(const NetnsConfig *config, const char *const *keep_owners, size_t n_keep,
		  NetnsReclaimResult *ret, char **ret_error)
{
	_cleanup_(nlsock_closep) NlSock *nl = NULL;
	_cleanup_(json_putp) json_object *root = NULL;
	_cleanup_(state_done) State st = {};
	_cleanup_(strv_freep) char **links = NULL;
	_cleanup_free_ const char **keep_sorted = NULL;
	_cleanup_free_ uint8_t *keep = NULL;
	_cleanup_free_ char *journal = NULL;
	NetnsReclaimResult res = {};
	NetnsPool tmp = {};
	json_object *slots, *broken;
	DIR *d = NULL;
	int r;

	r = config_copy(&tmp, config, ret_error);
	if (r < 0)
		goto out;
	boot_id_get(tmp.boot_id, sizeof(tmp.boot_id));
	keep = calloc(tmp.max_slots ?: 1, 1);
	keep_sorted = calloc(n_keep ?: 1, sizeof(char *));
	if (!keep || !keep_sorted) {
		r = -ENOMEM;
		goto out;
	}
	size_t n_sorted = 0;
	for (size_t j = 0; j < n_keep; j++)
		if (keep_owners[j])
			keep_sorted[n_sorted++] = keep_owners[j];
	qsort(keep_sorted, n_sorted, sizeof(char *), strcmp_ptr);
	r = state_load(tmp.state_file, tmp.max_slots, tmp.boot_id, &st, ret_error);
	if (r < 0)
		goto out;
	res.slots_forgotten = st.n_stale;
	r = snapshot_new(tmp.boot_id, st.gen, &root, &slots, &broken);
	if (r < 0)
		goto out;
	/* Keep what the file says is in use by an owner the caller still knows; what was
	 * broken is forgotten, and its leftovers go with the rest below. */
	for (unsigned i = 0; i < st.max_slots; i++) {
		const char *o = st.owner[i];
		if (!o)
			continue;
		if (bsearch(&o, keep_sorted, n_sorted, sizeof(char *), strcmp_ptr)) {
			keep[i] = 1;
			r = snapshot_add_slot(slots, i, o);
			if (r < 0)
				goto out;
		} else
			res.slots_forgotten++;
	}
	size_t kept = (size_t)json_object_array_length(slots);

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
		_cleanup_free_ char *path = NULL;
		if (asprintf(&path, "%s/%s", tmp.netns_dir, de->d_name) < 0) {
			r = -ENOMEM;
			goto out;
		}
		if (netns_remove_at(path) >= 0)
			res.namespaces_removed++;
	}

	/* Host links em-N not kept (a namespace gone takes its veth along, but not always at
	 * once, and a crash can leave the host end of a half-built slot). */
	r = netns_nlsock_open(&nl);
	if (r < 0) {
		r = error_set(ret_error, r, "netlink: %s", strerror(-r));
		goto out;
	}
	r = netns_link_list(nl, "em-", &links);
	if (r < 0) {
		r = error_set(ret_error, r, "cannot list links: %s", strerror(-r));
		goto out;
	}
	for (size_t i = 0; links[i]; i++) {
		char *end;
		unsigned long idx = strtoul(links[i] + 3, &end, 10);
		if (*end || end == links[i] + 3 || (idx < tmp.max_slots && keep[idx]))
			continue;
		int k = netns_link_delete(nl, links[i]);
		if (k >= 0 || k == -ENODEV || k == -ENOENT)
			res.links_removed += k >= 0;
	}
	if (kept == 0)
		(void)netns_nft_host_remove();

	/* The file now says exactly what is kept; its gen covers every journal line. */
	r = snapshot_write(tmp.state_file, root);
	if (r < 0) {
		(void)error_set(ret_error, r, "cannot write %s: %s", tmp.state_file, strerror(-r));
		goto out;
	}
	journal = journal_path(tmp.state_file);
	if (journal && unlink(journal) < 0 && errno != ENOENT)
		log_debug("cannot remove %s: %m", journal);
out:
	if (d)
		closedir(d);
	config_done(&tmp);
	if (ret)
		*ret = res;
	return r < 0 ? r : 0;
}
