/* SPDX-License-Identifier: Apache-2.0 */
/*
 * CreateSandbox, GetSandbox, ListSandboxes, DestroySandbox and WatchSandboxes: validation
 * (node.proto's rules, with messages that say what to fix), the protobuf mapping, and the
 * waits. A handler never does lifecycle work itself: it starts or joins an operation on the
 * manager's workers and waits for its outcome, so a client that goes away abandons only its
 * wait.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>

#include "common/id.h"
#include "common/log.h"
#include "messages.h"
#include "node-sandbox.h"
#include "probe.h"

/* The latest end time taken (2200-01-01): records keep times as int64 nanoseconds. */
#define END_TIME_MAX_S 7258118400LL

/* ---- arena ---- */

struct Arena {
	void **ptrs;
	size_t n, cap;
};

Arena *arena_new(void)
{
	return calloc(1, sizeof(Arena));
}

void arena_free(Arena *a)
{
	if (!a)
		return;
	for (size_t i = 0; i < a->n; i++)
		free(a->ptrs[i]);
	free(a->ptrs);
	free(a);
}

void *arena_alloc(Arena *a, size_t size)
{
	void *p;

	if (a->n == a->cap) {
		size_t cap = a->cap ? a->cap * 2 : 64;
		void **n = realloc(a->ptrs, cap * sizeof(void *));
		if (!n)
			return NULL;
		a->ptrs = n;
		a->cap = cap;
	}
	p = calloc(1, size ?: 1);
	if (p)
		a->ptrs[a->n++] = p;
	return p;
}

char *arena_strdup(Arena *a, const char *s)
{
	size_t len = strlen(s ?: "");
	char *p = arena_alloc(a, len + 1);

	if (p)
		memcpy(p, s ?: "", len);
	return p;
}

/* ---- mapping ---- */

Google__Protobuf__Timestamp *timestamp_to_pb(Arena *a, const struct timespec *ts)
{
	Google__Protobuf__Timestamp *t;

	if (!ts->tv_sec && !ts->tv_nsec)
		return NULL;
	t = arena_alloc(a, sizeof(*t));
	if (!t)
		return NULL;
	google__protobuf__timestamp__init(t);
	t->seconds = ts->tv_sec;
	t->nanos = (int32_t)ts->tv_nsec;
	return t;
}

int kv_to_pb(Arena *a, const KvList *l, const ProtobufCMessageDescriptor *d, void *ret,
	     size_t *ret_n)
{
	PbMapEntry **entries = arena_alloc(a, (l->n + 1) * sizeof(PbMapEntry *));

	if (!entries)
		return -ENOMEM;
	for (size_t i = 0; i < l->n; i++) {
		PbMapEntry *e = arena_alloc(a, d->sizeof_message);
		if (!e)
			return -ENOMEM;
		protobuf_c_message_init(d, e);
		e->key = arena_strdup(a, l->items[i].key);
		e->value = arena_strdup(a, l->items[i].value);
		entries[i] = e;
	}
	*(PbMapEntry ***)ret = entries;
	*ret_n = l->n;
	return 0;
}

static int str_list_to_pb(Arena *a, const StrList *l, char ***ret, size_t *ret_n)
{
	char **items = arena_alloc(a, (l->n + 1) * sizeof(char *));

	if (!items)
		return -ENOMEM;
	for (size_t i = 0; i < l->n; i++)
		if (!(items[i] = arena_strdup(a, l->items[i])))
			return -ENOMEM;
	*ret = items;
	*ret_n = l->n;
	return 0;
}

static Ember__V1__SandboxSpec *spec_to_pb(Arena *a, const SbSpec *s)
{
	Ember__V1__SandboxSpec *p = arena_alloc(a, sizeof(*p));
	Ember__V1__NetworkPolicy *net = arena_alloc(a, sizeof(*net));

	if (!p || !net)
		return NULL;
	ember__v1__sandbox_spec__init(p);
	ember__v1__network_policy__init(net);
	if (s->template_id) {
		p->source_case = EMBER__V1__SANDBOX_SPEC__SOURCE_TEMPLATE_ID;
		p->template_id = arena_strdup(a, s->template_id);
	} else {
		p->source_case = EMBER__V1__SANDBOX_SPEC__SOURCE_SNAPSHOT_ID;
		p->snapshot_id = arena_strdup(a, s->snapshot_id);
	}
	p->vcpu_count = s->vcpu_count;
	p->memory_mib = s->memory_mib;
	p->disk_size_mib = s->disk_size_mib;
	net->allow_internet = s->allow_internet;
	if (str_list_to_pb(a, &s->allow_cidrs, &net->allow_cidrs, &net->n_allow_cidrs) < 0 ||
	    str_list_to_pb(a, &s->deny_cidrs, &net->deny_cidrs, &net->n_deny_cidrs) < 0 ||
	    kv_to_pb(a, &s->labels, &ember__v1__sandbox_spec__labels_entry__descriptor, &p->labels,
		     &p->n_labels) < 0 ||
	    kv_to_pb(a, &s->env, &ember__v1__sandbox_spec__env_entry__descriptor, &p->env,
		     &p->n_env) < 0)
		return NULL;
	p->network = net;
	if (sb_spec_has_end(s) && !(p->end_time = timestamp_to_pb(a, &s->end_time)))
		return NULL;
	p->on_expiry = s->on_expiry;
	p->huge_pages = s->huge_pages;
	return p;
}

Ember__V1__Sandbox *sandbox_to_pb(Arena *a, Sandbox *sb)
{
	Ember__V1__Sandbox *p = arena_alloc(a, sizeof(*p));

	if (!p)
		return NULL;
	ember__v1__sandbox__init(p);
	p->id = arena_strdup(a, sb->id);
	p->spec = spec_to_pb(a, &sb->spec);
	p->state = sb->state;
	p->state_reason = arena_strdup(a, sb->state_reason);
	p->sandbox_ip = arena_strdup(a, sb->sandbox_ip);
	p->revision = sb->revision;
	p->create_time = timestamp_to_pb(a, &sb->create_time);
	p->update_time = timestamp_to_pb(a, &sb->update_time);
	p->firecracker_version = arena_strdup(a, sb->fc_version);
	p->template_id = arena_strdup(a, sb->template_id);
	if (!p->id || !p->spec || !p->state_reason || !p->sandbox_ip || !p->firecracker_version ||
	    !p->template_id)
		return NULL;
	if (sb->last_op.op[0]) {
		const OpTiming *t = &sb->last_op;
		Ember__V1__OperationTiming *o = arena_alloc(a, sizeof(*o));
		Ember__V1__StepTiming **steps =
			arena_alloc(a, (t->n_steps + 1) * sizeof(Ember__V1__StepTiming *));
		if (!o || !steps)
			return NULL;
		ember__v1__operation_timing__init(o);
		o->op = arena_strdup(a, t->op);
		o->failed_step = arena_strdup(a, t->failed);
		o->total_us = t->total_us;
		o->end_time = timestamp_to_pb(a, &t->end);
		for (size_t i = 0; i < t->n_steps; i++) {
			Ember__V1__StepTiming *st = arena_alloc(a, sizeof(*st));
			if (!st)
				return NULL;
			ember__v1__step_timing__init(st);
			st->name = arena_strdup(a, t->steps[i].name);
			st->duration_us = t->steps[i].us;
			steps[i] = st;
		}
		o->steps = steps;
		o->n_steps = t->n_steps;
		if (!o->op || !o->failed_step)
			return NULL;
		p->last_operation = o;
	}
	/* disk_used_bytes is sampled where the lock is not held (sandbox_sample_usage). */
	return p;
}

/* Real disk use of the sandbox's own layer, and of its saved state while it is PAUSED or
 * FAILED, sampled outside the manager lock. */
static void sample_usage(Ember__V1__Sandbox *p, const char *cow_path, const char *data_dir)
{
	uint64_t used = 0;

	if (cow_path && storage_usage_file(cow_path, &used) >= 0)
		p->disk_used_bytes = used;
	if (data_dir && (p->state == EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSED ||
			 p->state == EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_FAILED)) {
		_cleanup_free_ char *dir = NULL;
		if (asprintf(&dir, "%s/snapshot", data_dir) >= 0 &&
		    storage_usage_tree(dir, &used) >= 0)
			p->saved_state_used_bytes = used;
	}
}

/* ---- validation ---- */

static bool label_key_valid(const char *k)
{
	size_t len = strlen(k);

	if (len < 1 || len > 63)
		return false;
	for (const char *c = k; *c; c++)
		if (!isalnum((unsigned char)*c) && !strchr("._/-", *c))
			return false;
	return true;
}

static bool utf8_valid(const char *s)
{
	const unsigned char *p = (const unsigned char *)s;

	while (*p) {
		int n = *p < 0x80             ? 0
			: (*p & 0xe0) == 0xc0 ? 1
			: (*p & 0xf0) == 0xe0 ? 2
			: (*p & 0xf8) == 0xf0 ? 3
					      : -1;
		if (n < 0)
			return false;
		p++;
		for (int i = 0; i < n; i++, p++)
			if ((*p & 0xc0) != 0x80)
				return false;
	}
	return true;
}

static bool env_name_valid(const char *k)
{
	if (!(isalpha((unsigned char)k[0]) || k[0] == '_'))
		return false;
	for (const char *c = k; *c; c++)
		if (!isalnum((unsigned char)*c) && *c != '_')
			return false;
	return strlen(k) <= 255;
}

static int kv_cmp(const void *a, const void *b)
{
	return strcmp(((const KeyValue *)a)->key, ((const KeyValue *)b)->key);
}

RpcCode kv_from_pb(RpcCall *call, const char *what, KvKind kind, const void *entries, size_t n,
		   KvList *ret)
{
	PbMapEntry *const *e = entries;
	KvList l = {};

	if (kind == KV_LABELS && n > 64)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "%s: %zu entries, at most 64",
				      what, n);
	if (kind == KV_ENV && n > 1024)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "%s: %zu entries, at most 1024",
				      what, n);
	for (size_t i = 0; i < n; i++) {
		const char *k = e[i]->key ?: "", *v = e[i]->value ?: "";
		if (kind == KV_LABELS && !label_key_valid(k))
			return rpc_call_error(call, RPC_INVALID_ARGUMENT,
					      "%s: key \"%.80s\" must be 1-63 bytes of "
					      "[A-Za-z0-9._/-]",
					      what, k);
		if (kind == KV_LABELS && (strlen(v) > 255 || !utf8_valid(v)))
			return rpc_call_error(
				call, RPC_INVALID_ARGUMENT,
				"%s: the value of \"%s\" must be at most 255 bytes of "
				"UTF-8",
				what, k);
		if (kind == KV_ENV && !env_name_valid(k))
			return rpc_call_error(call, RPC_INVALID_ARGUMENT,
					      "%s: \"%.80s\" is not a variable name "
					      "([A-Za-z_][A-Za-z0-9_]*)",
					      what, k);
		if (kind == KV_ENV && strlen(v) > 65536)
			return rpc_call_error(call, RPC_INVALID_ARGUMENT,
					      "%s: the value of %s is longer than 64 KiB", what, k);
	}
	l.items = calloc(n + 1, sizeof(KeyValue));
	if (!l.items)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	for (size_t i = 0; i < n; i++) {
		l.items[i].key = strdup(e[i]->key ?: "");
		l.items[i].value = strdup(e[i]->value ?: "");
		l.n++;
		if (!l.items[i].key || !l.items[i].value) {
			kv_list_done(&l);
			return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
		}
	}
	qsort(l.items, l.n, sizeof(KeyValue), kv_cmp);
	for (size_t i = 1; i < l.n; i++)
		if (strcmp(l.items[i - 1].key, l.items[i].key) == 0) {
			RpcCode c = rpc_call_error(call, RPC_INVALID_ARGUMENT,
						   "%s: key \"%s\" appears twice", what,
						   l.items[i].key);
			kv_list_done(&l);
			return c;
		}
	*ret = l;
	return RPC_OK;
}

static RpcCode cidrs_from_pb(RpcCall *call, const char *what, char *const *items, size_t n,
			     StrList *ret)
{
	StrList l = {};

	if (n > 256)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "%s: %zu entries, at most 256",
				      what, n);
	l.items = calloc(n + 1, sizeof(char *));
	if (!l.items)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	for (size_t i = 0; i < n; i++) {
		NetnsCidr c;
		if (netns_cidr_parse(items[i], &c) < 0) {
			str_list_done(&l);
			return rpc_call_error(
				call, RPC_INVALID_ARGUMENT,
				"%s: \"%.80s\" is not an IPv4 CIDR a.b.c.d/n with the "
				"host bits clear (or a bare address)",
				what, items[i]);
		}
		l.items[l.n++] = strdup(items[i]);
		if (!l.items[l.n - 1]) {
			str_list_done(&l);
			return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
		}
	}
	*ret = l;
	return RPC_OK;
}

RpcCode node_id_check(RpcCall *call, const char *field, const char *id)
{
	if (!id_is_valid(id))
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "%s \"%.100s\" is not a valid id ([a-z0-9][a-z0-9-]{0,62})",
				      field, id ?: "");
	return RPC_OK;
}

/* spec.end_time (when `end`) and spec.on_expiry (when `action`), checked, into s (on_expiry
 * UNSPECIFIED is DESTROY). A create takes both; an update what its mask names. */
static RpcCode expiry_from_pb(RpcCall *call, const Ember__V1__SandboxSpec *p, bool end, bool action,
			      SbSpec *s)
{
	if (end && p->end_time &&
	    (p->end_time->seconds <= 0 || p->end_time->seconds > END_TIME_MAX_S ||
	     p->end_time->nanos < 0 || p->end_time->nanos > 999999999))
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "spec.end_time is out of range (after 1970, before 2200)");
	if (action && p->on_expiry != EMBER__V1__EXPIRY_ACTION__EXPIRY_ACTION_UNSPECIFIED &&
	    p->on_expiry != EMBER__V1__EXPIRY_ACTION__EXPIRY_ACTION_DESTROY &&
	    p->on_expiry != EMBER__V1__EXPIRY_ACTION__EXPIRY_ACTION_PAUSE)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "spec.on_expiry %d is unknown",
				      (int)p->on_expiry);
	s->end_time = p->end_time ? (struct timespec){.tv_sec = (time_t)p->end_time->seconds,
						      .tv_nsec = p->end_time->nanos}
				  : (struct timespec){};
	s->on_expiry = p->on_expiry == EMBER__V1__EXPIRY_ACTION__EXPIRY_ACTION_PAUSE
			       ? EMBER__V1__EXPIRY_ACTION__EXPIRY_ACTION_PAUSE
			       : EMBER__V1__EXPIRY_ACTION__EXPIRY_ACTION_DESTROY;
	return RPC_OK;
}

static RpcCode spec_from_pb(RpcCall *call, Manager *m, const Ember__V1__SandboxSpec *p, SbSpec *ret)
{
	const Config *c = m->config;
	SbSpec s = {};
	RpcCode code;

	if (!p)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "spec is required");
	bool fork = p->source_case == EMBER__V1__SANDBOX_SPEC__SOURCE_SNAPSHOT_ID;
	if (!fork && p->source_case != EMBER__V1__SANDBOX_SPEC__SOURCE_TEMPLATE_ID)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "spec needs a source: template_id or snapshot_id");
	if ((code = node_id_check(call, fork ? "spec.snapshot_id" : "spec.template_id",
				  fork ? p->snapshot_id : p->template_id)) != RPC_OK)
		return code;
	if (p->vcpu_count > 32)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "spec.vcpu_count %u is out of range (1..32, 0 means 1)",
				      p->vcpu_count);
	if (p->memory_mib && p->memory_mib < 128)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "spec.memory_mib %u is below 128 (0 means 512)",
				      p->memory_mib);
	if (p->memory_mib > 1048576)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "spec.memory_mib %u is above 1048576", p->memory_mib);
	if (p->disk_size_mib > c->max_disk_mib)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "spec.disk_size_mib %llu is above this node's limit of %u "
				      "([storage] max_disk_mib)",
				      (unsigned long long)p->disk_size_mib, c->max_disk_mib);
	if ((code = expiry_from_pb(call, p, true, true, &s)) != RPC_OK)
		return code;
	if (fork)
		s.snapshot_id = strdup(p->snapshot_id);
	else
		s.template_id = strdup(p->template_id);
	if (!s.template_id && !s.snapshot_id)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	/* A fork's machine is the snapshot's: 0 takes it (filled in by the create). */
	s.vcpu_count = fork ? p->vcpu_count : p->vcpu_count ?: 1;
	s.memory_mib = fork ? p->memory_mib : p->memory_mib ?: 512;
	s.disk_size_mib = p->disk_size_mib ?: c->default_disk_mib;
	s.huge_pages = p->huge_pages;
	if (s.huge_pages && s.memory_mib % 2) {
		sb_spec_done(&s);
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "spec.memory_mib %u is not a multiple of 2: huge_pages backs "
				      "memory with 2 MiB pages",
				      p->memory_mib);
	}
	if (p->network) {
		s.allow_internet = p->network->allow_internet;
		if ((code = cidrs_from_pb(call, "spec.network.allow_cidrs", p->network->allow_cidrs,
					  p->network->n_allow_cidrs, &s.allow_cidrs)) != RPC_OK ||
		    (code = cidrs_from_pb(call, "spec.network.deny_cidrs", p->network->deny_cidrs,
					  p->network->n_deny_cidrs, &s.deny_cidrs)) != RPC_OK) {
			sb_spec_done(&s);
			return code;
		}
	} else {
		s.allow_internet = c->default_allow_internet;
	}
	if ((code = kv_from_pb(call, "spec.labels", KV_LABELS, p->labels, p->n_labels,
			       &s.labels)) != RPC_OK ||
	    (code = kv_from_pb(call, "spec.env", KV_ENV, p->env, p->n_env, &s.env)) != RPC_OK) {
		sb_spec_done(&s);
		return code;
	}
	*ret = s;
	return RPC_OK;
}

/* The end time a create applies: the one asked for, else (with `use_default`)
 * [sandboxes] default_lifetime_s after the create; capped at max_lifetime_s after it. Relative
 * to the sandbox's create time, so that a retry of the create resolves to the same end time
 * and joins it. UpdateSandbox applies the cap alone: an end time cleared is none. */
static void end_time_resolve(const Config *c, SbSpec *s, const struct timespec *created,
			     bool use_default)
{
	bool set = sb_spec_has_end(s);

	if (!set && use_default && c->default_lifetime_s) {
		s->end_time = *created;
		s->end_time.tv_sec += c->default_lifetime_s;
		set = true;
	}
	if (c->max_lifetime_s) {
		struct timespec cap = *created;
		cap.tv_sec += c->max_lifetime_s;
		if (!set || s->end_time.tv_sec > cap.tv_sec ||
		    (s->end_time.tv_sec == cap.tv_sec && s->end_time.tv_nsec > cap.tv_nsec))
			s->end_time = cap;
	}
}

/* ---- waiting ---- */

/* With the lock held and a reference on sb: waits until done(sb). 0, or -ECANCELED (the
 * client went away) or -ESHUTDOWN (emberd drains). */
int sandbox_wait_locked(Manager *m, RpcCall *call, Sandbox *sb, bool (*done)(Sandbox *, uint64_t),
			uint64_t arg)
{
	Waiter w;
	int r = 0;

	/* On our stack, and unlinked below before we return. */
	sandbox_waiter_add_locked(sb, &w, call);
	while (!done(sb, arg)) {
		pthread_mutex_unlock(&m->lock);
		r = rpc_call_wait(call, -1);
		if (r == -ESHUTDOWN) {
			/* Draining: the operation may still finish within the grace period, and
			 * its caller should see it. Wakes no longer come through rpc_call_wait, so
			 * look every 50 ms until done or cancelled. */
			struct timespec ts = {.tv_nsec = 50L * 1000 * 1000};
			(void)nanosleep(&ts, NULL);
			r = rpc_call_is_cancelled(call) ? -ECANCELED : 0;
		}
		pthread_mutex_lock(&m->lock);
		if (r < 0)
			break;
	}
	sandbox_waiter_remove_locked(sb, &w);
	return done(sb, arg) ? 0 : r;
}

static bool create_done(Sandbox *sb, uint64_t unused)
{
	(void)unused;
	return sb->create_done || sb->removed;
}

static bool destroy_done(Sandbox *sb, uint64_t unused)
{
	(void)unused;
	return sb->removed || sb->destroy_failed;
}

static RpcCode send_sandbox(RpcCall *call, Manager *m, Sandbox *sb)
{
	_cleanup_(arena_freep) Arena *a = arena_new();
	Ember__V1__Sandbox *p;

	if (!a)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	pthread_mutex_lock(&m->lock);
	p = sandbox_to_pb(a, sb);
	pthread_mutex_unlock(&m->lock);
	if (!p)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	sample_usage(p, sb->cow_path, sb->data_dir);
	return rpc_call_send(call, &p->base) < 0 ? RPC_CANCELLED : RPC_OK;
}

/* ---- handlers ---- */

/* Admission of a create (new_sandbox) or a resume of `s`: NULL when the node has room, else
 * why not (in why). Creates and resumes in flight have not touched their memory yet: they
 * count. */
static const char *admission_locked(Manager *m, const HostMemory *mem, const SbSpec *s,
				    bool new_sandbox, char *why, size_t size)
{
	const Config *c = m->config;
	NetnsPoolStats ps;

	netns_pool_stats(m->pool, &ps);
	if (new_sandbox && m->n_sandboxes >= c->max_sandboxes) {
		snprintf(why, size,
			 "the node holds %zu sandboxes, its limit ([sandboxes] max_sandboxes)",
			 m->n_sandboxes);
		return why;
	}
	if (m->n_slot_users >= ps.max_slots) {
		snprintf(why, size, "all %u network slots are in use", ps.max_slots);
		return why;
	}
	uint64_t huge_total_mib = mem->huge_total >> 20, huge_free_mib = mem->huge_free >> 20;
	uint64_t avail_mib = mem->available >> 20;

	/* Huge pages: Firecracker takes them as the guest touches them (MAP_NORESERVE), so what
	 * is free now says little about what the sandboxes here will take. They count with all
	 * their memory, running or starting; what is free is checked too, for other users of
	 * the pool. */
	if (s->huge_pages && huge_total_mib < m->huge_mib + s->memory_mib) {
		snprintf(why, size,
			 "not enough huge pages: the host's pool (vm.nr_hugepages) has %llu 2 MiB "
			 "pages, the huge-page sandboxes here hold or are about to take %llu, and "
			 "%u are needed (memory_mib %u)",
			 (unsigned long long)huge_total_mib / 2,
			 (unsigned long long)m->huge_mib / 2, s->memory_mib / 2, s->memory_mib);
		return why;
	}
	if (s->huge_pages && huge_free_mib < s->memory_mib) {
		snprintf(
			why, size,
			"not enough huge pages: %llu of the host's 2 MiB pages are free (something "
			"else uses the pool), and %u are needed (memory_mib %u)",
			(unsigned long long)huge_free_mib / 2, s->memory_mib / 2, s->memory_mib);
		return why;
	}
	if (!s->huge_pages && mem->available_known &&
	    avail_mib < (uint64_t)c->memory_reserve_mib + m->creating_mib + s->memory_mib) {
		snprintf(why, size,
			 "not enough memory: %llu MiB available, %llu MiB promised to creates and "
			 "resumes in flight, %u MiB asked and %u MiB kept in reserve ([sandboxes] "
			 "memory_reserve_mib)",
			 (unsigned long long)avail_mib, (unsigned long long)m->creating_mib,
			 s->memory_mib, c->memory_reserve_mib);
		return why;
	}
	return NULL;
}

RpcCode node_create_sandbox(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__CreateSandboxRequest *req = (const void *)request;
	SbSpec spec = {};
	Sandbox *sb;
	RpcCode code;
	int r;

	if ((code = node_id_check(call, "sandbox_id", req->sandbox_id)) != RPC_OK)
		return code;
	if ((code = spec_from_pb(call, m, req->spec, &spec)) != RPC_OK)
		return code;

	/* Read before taking the lock: /proc is slow enough to matter under load. */
	HostMemory mem;
	probe_memory(&mem);

	pthread_mutex_lock(&m->lock);
	Snapshot *snap = NULL;
	if (spec.snapshot_id) {
		const char *bad = NULL;
		unsigned want = 0, has = 0;
		snap = manager_snapshot_find_locked(m, spec.snapshot_id);
		if (!snap || !snap->ready) {
			pthread_mutex_unlock(&m->lock);
			code = rpc_call_error(call, RPC_NOT_FOUND, "no snapshot %s",
					      spec.snapshot_id);
			sb_spec_done(&spec);
			return code;
		}
		if (spec.vcpu_count && spec.vcpu_count != snap->vcpu_count)
			bad = "vcpu_count", want = spec.vcpu_count, has = snap->vcpu_count;
		else if (spec.memory_mib && spec.memory_mib != snap->memory_mib)
			bad = "memory_mib", want = spec.memory_mib, has = snap->memory_mib;
		if (bad) {
			pthread_mutex_unlock(&m->lock);
			code = rpc_call_error(
				call, RPC_INVALID_ARGUMENT,
				"spec.%s %u differs from snapshot %s's %u: a sandbox "
				"created from a snapshot has its machine (0 takes it)",
				bad, want, spec.snapshot_id, has);
			sb_spec_done(&spec);
			return code;
		}
		if (spec.huge_pages && !snap->huge_pages) {
			pthread_mutex_unlock(&m->lock);
			code = rpc_call_error(
				call, RPC_INVALID_ARGUMENT,
				"spec.huge_pages: snapshot %s's memory is not in huge "
				"pages, and a sandbox created from it has its memory",
				spec.snapshot_id);
			sb_spec_done(&spec);
			return code;
		}
		spec.vcpu_count = snap->vcpu_count;
		spec.memory_mib = snap->memory_mib;
		spec.huge_pages = snap->huge_pages;
	}
	sb = manager_find_locked(m, req->sandbox_id);
	struct timespec now;
	clock_gettime(CLOCK_REALTIME, &now);
	bool asked_end = sb_spec_has_end(&spec);
	end_time_resolve(m->config, &spec, sb ? &sb->create_time : &now, true);
	if (sb) {
		if (!sb_spec_equal(&sb->spec, &spec)) {
			pthread_mutex_unlock(&m->lock);
			sb_spec_done(&spec);
			return rpc_call_error(call, RPC_ALREADY_EXISTS,
					      "sandbox %s exists with a different spec",
					      req->sandbox_id);
		}
		sb_spec_done(&spec);
		goto join;
	}

	if (asked_end &&
	    (spec.end_time.tv_sec < now.tv_sec ||
	     (spec.end_time.tv_sec == now.tv_sec && spec.end_time.tv_nsec <= now.tv_nsec))) {
		pthread_mutex_unlock(&m->lock);
		sb_spec_done(&spec);
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "spec.end_time has passed");
	}
	if (snap && strcmp(snap->fc_version, m->vmm.version) != 0) {
		pthread_mutex_unlock(&m->lock);
		code = rpc_call_error(
			call, RPC_FAILED_PRECONDITION,
			"snapshot %s was taken with Firecracker %s and this node runs "
			"%s: it restores only with the same version",
			spec.snapshot_id, snap->fc_version, m->vmm.version);
		sb_spec_done(&spec);
		return code;
	}
	if (snap && !m->vmm.uffd) {
		pthread_mutex_unlock(&m->lock);
		sb_spec_done(&spec);
		return rpc_call_error(
			call, RPC_FAILED_PRECONDITION,
			"ember-uffd, which serves a restored sandbox's memory, is not "
			"found on this node (set [vmm] uffd_bin)");
	}
	Template *t = snap ? snap->tmpl : manager_template_find_locked(m, spec.template_id);
	if (!t) {
		pthread_mutex_unlock(&m->lock);
		code = rpc_call_error(call, RPC_NOT_FOUND, "no template %s", spec.template_id);
		sb_spec_done(&spec);
		return code;
	}
	if (t->state != EMBER__V1__TEMPLATE_STATE__TEMPLATE_STATE_READY) {
		pthread_mutex_unlock(&m->lock);
		code = rpc_call_error(call, RPC_FAILED_PRECONDITION, "template %s is not READY",
				      t->id);
		sb_spec_done(&spec);
		return code;
	}
	/* Admission, before any work: a refused create leaves no trace. */
	char why[256];
	const char *full = admission_locked(m, &mem, &spec, true, why, sizeof(why));
	if (full) {
		pthread_mutex_unlock(&m->lock);
		sb_spec_done(&spec);
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "cannot create sandbox %s: %s",
				      req->sandbox_id, full);
	}

	sb = sandbox_new(req->sandbox_id);
	if (!sb || !(sb->template_id = strdup(t->id)) ||
	    asprintf(&sb->data_dir, "%s/%s", m->sandboxes_dir, sb->id) < 0 ||
	    asprintf(&sb->run_dir, "%s/%s", m->run_sandboxes_dir, sb->id) < 0 ||
	    asprintf(&sb->cow_path, "%s/%s/cow.img", m->sandboxes_dir, sb->id) < 0 ||
	    !(sb->fc_version = strdup(m->vmm.version))) {
		pthread_mutex_unlock(&m->lock);
		if (sb) {
			sb->refs = 1;
			sandbox_unref(m, sb);
		}
		sb_spec_done(&spec);
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	}
	sb->spec = spec;
	sb->tmpl = t;
	sb->snap = snap;
	/* The template's boot snapshot, when it has one of this machine that this node can
	 * restore: a restore instead of a boot. */
	sb->boot_restore = !snap && t->boot.present && m->vmm.uffd && !sb->spec.huge_pages &&
			   sb->spec.vcpu_count == t->boot.vcpu_count &&
			   sb->spec.memory_mib == t->boot.memory_mib &&
			   strcmp(t->boot.fc_version ?: "", m->vmm.version) == 0;
	sb->create_time = now;
	manager_insert_locked(m, sb);
	expiry_update_locked(m, sb);
	sb->slot_user = true;
	m->n_slot_users++;
	manager_promise_locked(m, sb, true);
	sandbox_set_state_locked(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_CREATING, NULL);
	manager_submit_locked(m, sb, SB_OP_CREATE);

join:
	sandbox_ref_locked(sb);
	r = sandbox_wait_locked(m, call, sb, create_done, 0);
	RpcCode outcome = RPC_OK;
	_cleanup_free_ char *message = NULL;
	if (r >= 0 && sb->create_done && sb->create_code != RPC_OK) {
		outcome = sb->create_code;
		message = strdup(sb->create_error ?: "create failed");
	} else if (r >= 0 && sb->removed) {
		outcome = RPC_ABORTED;
		if (asprintf(&message, "sandbox %s was destroyed", sb->id) < 0)
			message = NULL;
	}
	pthread_mutex_unlock(&m->lock);
	if (r < 0) {
		code = RPC_CANCELLED; /* the create goes on; a retry sees its outcome */
	} else if (outcome != RPC_OK) {
		code = rpc_call_error(call, outcome, "%s", message ?: "create failed");
	} else {
		code = send_sandbox(call, m, sb);
	}
	sandbox_unref(m, sb);
	return code;
}

RpcCode node_get_sandbox(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__GetSandboxRequest *req = (const void *)request;
	Sandbox *sb;
	RpcCode code;

	if ((code = node_id_check(call, "sandbox_id", req->sandbox_id)) != RPC_OK)
		return code;
	pthread_mutex_lock(&m->lock);
	sb = manager_find_locked(m, req->sandbox_id);
	if (sb)
		sandbox_ref_locked(sb);
	pthread_mutex_unlock(&m->lock);
	if (!sb)
		return rpc_call_error(call, RPC_NOT_FOUND, "no sandbox %s", req->sandbox_id);
	code = send_sandbox(call, m, sb);
	sandbox_unref(m, sb);
	return code;
}

typedef struct ListItem {
	Ember__V1__Sandbox *pb;
	const char *cow_path; /* copies: the sandbox may go once the lock is released */
	const char *data_dir;
} ListItem;

static int list_item_cmp(const void *a, const void *b)
{
	return strcmp(((const ListItem *)a)->pb->id, ((const ListItem *)b)->pb->id);
}

/* Every sandbox matching the filters, built under the lock so that the set and `revision`
 * agree, sorted by id. Usage is sampled afterwards (file system calls stay out of the lock). */
static int collect_sandboxes(Manager *m, Arena *a, Ember__V1__SandboxState state,
			     const KvList *selector, Ember__V1__Sandbox ***ret, size_t *ret_n,
			     uint64_t *ret_revision)
{
	Ember__V1__Sandbox **list;
	ListItem *items;
	size_t n = 0;
	int r = 0;

	pthread_mutex_lock(&m->lock);
	list = arena_alloc(a, (m->n_sandboxes + 1) * sizeof(Ember__V1__Sandbox *));
	items = arena_alloc(a, (m->n_sandboxes + 1) * sizeof(*items));
	for (size_t i = 0; list && items && i < m->n_buckets && r >= 0; i++)
		for (Sandbox *sb = m->buckets[i]; sb; sb = sb->hnext) {
			if (state && sb->state != state)
				continue;
			if (selector && !kv_list_matches(&sb->spec.labels, selector))
				continue;
			items[n].pb = sandbox_to_pb(a, sb);
			items[n].cow_path = arena_strdup(a, sb->cow_path);
			items[n].data_dir = arena_strdup(a, sb->data_dir);
			if (!items[n].pb || !items[n].cow_path || !items[n].data_dir) {
				r = -ENOMEM;
				break;
			}
			n++;
		}
	*ret_revision = events_revision(m->events);
	pthread_mutex_unlock(&m->lock);
	if (!list || !items)
		return -ENOMEM;
	if (r < 0)
		return r;
	qsort(items, n, sizeof(*items), list_item_cmp);
	for (size_t i = 0; i < n; i++) {
		sample_usage(items[i].pb, items[i].cow_path, items[i].data_dir);
		list[i] = items[i].pb;
	}
	*ret = list;
	*ret_n = n;
	return 0;
}

RpcCode node_list_sandboxes(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__ListSandboxesRequest *req = (const void *)request;
	Ember__V1__ListSandboxesResponse resp = EMBER__V1__LIST_SANDBOXES_RESPONSE__INIT;
	_cleanup_(arena_freep) Arena *a = arena_new();
	KvList selector = {};
	RpcCode code;
	int r;

	if (!a)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	if (!protobuf_c_enum_descriptor_get_value(&ember__v1__sandbox_state__descriptor,
						  (int)req->state))
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "state %d is not a SandboxState",
				      (int)req->state);
	code = kv_from_pb(call, "label_selector", KV_LABELS, req->label_selector,
			  req->n_label_selector, &selector);
	if (code != RPC_OK)
		return code;
	r = collect_sandboxes(m, a, req->state, &selector, &resp.sandboxes, &resp.n_sandboxes,
			      &resp.revision);
	kv_list_done(&selector);
	if (r < 0)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	return rpc_call_send(call, &resp.base) < 0 ? RPC_CANCELLED : RPC_OK;
}

/* ---- pause and resume ---- */

static const char *state_short(Ember__V1__SandboxState s)
{
	const ProtobufCEnumValue *v =
		protobuf_c_enum_descriptor_get_value(&ember__v1__sandbox_state__descriptor, (int)s);
	return v ? v->name + strlen("SANDBOX_STATE_") : "?";
}

bool sandbox_not_snapshotting(Sandbox *sb, uint64_t unused)
{
	(void)unused;
	return sb->removed || (sb->op != SB_OP_SNAPSHOT && sb->op != SB_OP_UPDATE);
}

/* The pause or resume that was running (or queued) when the waiter joined has ended. */
static bool op_ended(Sandbox *sb, uint64_t joined_at)
{
	/* arg: the outcome slot in the top byte, its count when the waiter joined below */
	return sb->removed || sb->outcome[joined_at >> 56].ended > (joined_at & ~(0xffull << 56));
}

/* Free space where the saved state goes: a pause that cannot write its memory file fails
 * before the VM is even paused. */
bool sandbox_room_for_saved_state(const Sandbox *sb, uint64_t *ret_free_mib)
{
	struct statvfs v;

	if (statvfs(sb->data_dir, &v) < 0)
		return true; /* let the pause find out, with the real error */
	*ret_free_mib = (uint64_t)v.f_bavail * v.f_frsize >> 20;
	/* The memory file, the device state (small) and a margin. */
	return *ret_free_mib >= (uint64_t)sb->spec.memory_mib + 16;
}

/* PauseSandbox and ResumeSandbox: start the operation, or join the one running, and wait. */
static RpcCode pause_or_resume(RpcCall *call, Manager *m, const char *id, bool pause)
{
	const Ember__V1__SandboxState
		from = pause ? EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING
			     : EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSED,
		during = pause ? EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSING
			       : EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RESUMING,
		to = pause ? EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSED
			   : EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING;
	const char *call_name = pause ? "PauseSandbox" : "ResumeSandbox";
	_cleanup_free_ char *message = NULL;
	HostMemory mem = {};
	uint64_t free_mib = 0;
	RpcCode code, outcome = RPC_OK;
	Sandbox *sb;
	int r;

	if ((code = node_id_check(call, "sandbox_id", id)) != RPC_OK)
		return code;
	/* Read before taking the lock: /proc is slow enough to matter under load. */
	if (!pause)
		probe_memory(&mem);
again:
	pthread_mutex_lock(&m->lock);
	sb = manager_find_locked(m, id);
	if (!sb) {
		pthread_mutex_unlock(&m->lock);
		return rpc_call_error(call, RPC_NOT_FOUND, "no sandbox %s", id);
	}
	sandbox_ref_locked(sb);
	if (sb->op == SB_OP_SNAPSHOT || sb->op == SB_OP_UPDATE) {
		/* Lifecycle calls wait for a snapshot being taken of the sandbox, or an update. */
		r = sandbox_wait_locked(m, call, sb, sandbox_not_snapshotting, 0);
		pthread_mutex_unlock(&m->lock);
		sandbox_unref(m, sb);
		if (r < 0)
			return RPC_CANCELLED;
		goto again;
	}
	if (sb->state == to && sb->op == SB_OP_NONE) {
		/* Already there: returned unchanged (node.proto). */
		pthread_mutex_unlock(&m->lock);
		code = send_sandbox(call, m, sb);
		sandbox_unref(m, sb);
		return code;
	}
	if (sb->state != during && (sb->state != from || sb->op != SB_OP_NONE)) {
		Ember__V1__SandboxState st = sb->state;
		pthread_mutex_unlock(&m->lock);
		sandbox_unref(m, sb);
		if (st == from) /* its VMM just died: the cleanup runs */
			return rpc_call_error(call, RPC_FAILED_PRECONDITION,
					      "sandbox %s is being cleaned up after its VMM exited",
					      id);
		return rpc_call_error(call, RPC_FAILED_PRECONDITION,
				      "sandbox %s is %s; %s needs it %s", id, state_short(st),
				      call_name, state_short(from));
	}
	const int out = pause ? OUT_PAUSE : OUT_RESUME;
	uint64_t joined_at = sb->outcome[out].ended;
	if (sb->state == from) {
		/* Start it. */
		const char *refuse = NULL;
		char why[256];
		RpcCode refuse_code = RPC_FAILED_PRECONDITION;
		if (!m->vmm.uffd) {
			refuse = "ember-uffd, which serves the memory of resumed sandboxes, is not "
				 "found on this node (set [vmm] uffd_bin)";
		} else if (!pause && sb_spec_ended(&sb->spec)) {
			char when[32];
			timespec_format(&sb->spec.end_time, when, sizeof(when));
			snprintf(why, sizeof(why),
				 "its end time %s has passed (spec.end_time); give it a later one "
				 "with UpdateSandbox first",
				 when);
			refuse = why;
		} else if (!pause && strcmp(sb->fc_version ?: "", m->vmm.version) != 0) {
			snprintf(
				why, sizeof(why),
				"it was paused by Firecracker %s and this node runs %s: a snapshot "
				"resumes only with the same version",
				sb->fc_version ?: "?", m->vmm.version);
			refuse = why;
		} else if (pause && !sandbox_room_for_saved_state(sb, &free_mib)) {
			snprintf(
				why, sizeof(why),
				"not enough disk for its memory file: %u MiB needed, %llu MiB free "
				"in %s",
				sb->spec.memory_mib, (unsigned long long)free_mib, sb->data_dir);
			refuse = why;
			refuse_code = RPC_RESOURCE_EXHAUSTED;
		} else if (!pause && (refuse = admission_locked(m, &mem, &sb->spec, false, why,
								sizeof(why)))) {
			refuse_code = RPC_RESOURCE_EXHAUSTED;
		}
		if (refuse) {
			pthread_mutex_unlock(&m->lock);
			sandbox_unref(m, sb);
			return rpc_call_error(call, refuse_code, "cannot %s sandbox %s: %s",
					      pause ? "pause" : "resume", id, refuse);
		}
		if (!pause) {
			sb->slot_user = true;
			m->n_slot_users++;
			manager_promise_locked(m, sb, true);
		}
		sandbox_set_state_locked(m, sb, during, NULL);
		manager_submit_locked(m, sb, pause ? SB_OP_PAUSE : SB_OP_RESUME);
	}
	r = sandbox_wait_locked(m, call, sb, op_ended, (uint64_t)out << 56 | joined_at);
	if (r >= 0 && sb->removed) {
		outcome = RPC_ABORTED;
		if (asprintf(&message, "sandbox %s was destroyed", id) < 0)
			message = NULL;
	} else if (r >= 0 && sb->outcome[out].code != RPC_OK) {
		outcome = sb->outcome[out].code;
		message = strdup(sb->outcome[out].error ?: "failed");
	}
	pthread_mutex_unlock(&m->lock);
	if (r < 0)
		code = RPC_CANCELLED; /* the operation goes on; a retry sees its outcome */
	else if (outcome != RPC_OK)
		code = rpc_call_error(call, outcome, "%s", message ?: "failed");
	else
		code = send_sandbox(call, m, sb);
	sandbox_unref(m, sb);
	return code;
}

RpcCode node_pause_sandbox(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	return pause_or_resume(call, m,
			       ((const Ember__V1__PauseSandboxRequest *)request)->sandbox_id, true);
}

RpcCode node_resume_sandbox(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	return pause_or_resume(
		call, m, ((const Ember__V1__ResumeSandboxRequest *)request)->sandbox_id, false);
}

RpcCode node_destroy_sandbox(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__DestroySandboxRequest *req = (const void *)request;
	Ember__V1__DestroySandboxResponse resp = EMBER__V1__DESTROY_SANDBOX_RESPONSE__INIT;
	_cleanup_free_ char *failure = NULL;
	Sandbox *sb;
	RpcCode code;
	int r;

	if ((code = node_id_check(call, "sandbox_id", req->sandbox_id)) != RPC_OK)
		return code;
	pthread_mutex_lock(&m->lock);
	sb = manager_find_locked(m, req->sandbox_id);
	if (!sb) {
		pthread_mutex_unlock(&m->lock);
		resp.found = false;
		return rpc_call_send(call, &resp.base) < 0 ? RPC_CANCELLED : RPC_OK;
	}
	sandbox_ref_locked(sb);
	resp.found = true;
	if (sb->state != EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_DESTROYING) {
		sb->abort = true;
		sb->destroy_failed = false;
		sandbox_set_state_locked(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_DESTROYING,
					 NULL);
		if (sb->op == SB_OP_NONE)
			manager_submit_locked(m, sb, SB_OP_DESTROY);
		else if (sb->op != SB_OP_DESTROY)
			sb->destroy_next = true; /* the running operation gives up, then destroys */
	}
	r = sandbox_wait_locked(m, call, sb, destroy_done, 0);
	if (r >= 0 && !sb->removed)
		failure = strdup(sb->state_reason ?: "destroy failed");
	pthread_mutex_unlock(&m->lock);
	sandbox_unref(m, sb);
	if (r < 0)
		return RPC_CANCELLED; /* the destroy goes on; a retry sees its outcome */
	if (failure)
		return rpc_call_error(call, RPC_INTERNAL, "sandbox %s: %s; retry DestroySandbox",
				      req->sandbox_id, failure);
	return rpc_call_send(call, &resp.base) < 0 ? RPC_CANCELLED : RPC_OK;
}

/* ---- UpdateSandbox ---- */

enum {
	UPD_END = 1 << 0,
	UPD_EXPIRY = 1 << 1,
	UPD_LABELS = 1 << 2,
	UPD_NETWORK = 1 << 3,
};

/* update_mask's paths: what they change, or why they cannot. */
static RpcCode update_paths(RpcCall *call, const Google__Protobuf__FieldMask *mask, unsigned *ret)
{
	static const struct {
		const char *path;
		unsigned bit;
		const char *fixed; /* why it cannot change */
	} paths[] = {
		{"end_time", UPD_END, NULL},
		{"on_expiry", UPD_EXPIRY, NULL},
		{"labels", UPD_LABELS, NULL},
		{"network", UPD_NETWORK, NULL},
		{"template_id", 0, "a sandbox's source is what its disk and memory came from"},
		{"snapshot_id", 0, "a sandbox's source is what its disk and memory came from"},
		{"vcpu_count", 0,
		 "the machine's shape is fixed while it runs and in its saved state"},
		{"memory_mib", 0,
		 "the machine's shape is fixed while it runs and in its saved state"},
		{"huge_pages", 0,
		 "the machine's memory is fixed while it runs and in its saved state"},
		{"disk_size_mib", 0, "the copy-on-write allowance is set when its disk is made"},
		{"env", 0, "it is fixed at create; ExecStart.env sets an Exec's own"},
	};
	unsigned what = 0;

	if (!mask || mask->n_paths == 0)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "update_mask names no field (end_time, on_expiry, labels, "
				      "network)");
	for (size_t i = 0; i < mask->n_paths; i++) {
		size_t k = 0;
		while (k < ELEMENTSOF(paths) && strcmp(paths[k].path, mask->paths[i]) != 0)
			k++;
		if (k == ELEMENTSOF(paths))
			return rpc_call_error(call, RPC_INVALID_ARGUMENT,
					      "update_mask: \"%.64s\" is not a field UpdateSandbox "
					      "changes (end_time, on_expiry, labels, network)",
					      mask->paths[i]);
		if (paths[k].fixed)
			return rpc_call_error(call, RPC_INVALID_ARGUMENT,
					      "update_mask: %s cannot change: %s", paths[k].path,
					      paths[k].fixed);
		what |= paths[k].bit;
	}
	*ret = what;
	return RPC_OK;
}

static bool timespec_equal(const struct timespec *a, const struct timespec *b)
{
	return a->tv_sec == b->tv_sec && a->tv_nsec == b->tv_nsec;
}

static bool op_none(Sandbox *sb, uint64_t unused)
{
	(void)unused;
	return sb->removed || sb->op == SB_OP_NONE;
}

/* The operation's end: a destroy or a reap that waited for it goes on. (L) */
static void update_end_locked(Manager *m, Sandbox *sb)
{
	sb->op = SB_OP_NONE;
	if (sb->destroy_next) {
		sb->destroy_next = false;
		manager_submit_locked(m, sb, SB_OP_DESTROY);
	} else if (sb->vm && vmm_or_uffd_exited(sb)) {
		/* the event loop leaves an exit during an operation to the operation */
		manager_submit_locked(m, sb, SB_OP_REAP);
	}
	sandbox_wake_locked(sb);
}

/* Exchanges the parts of two specs that `what` (UPD_*) names: UpdateSandbox swaps the new
 * values in, and the same call again puts the old ones back. */
static void spec_swap_parts(SbSpec *a, SbSpec *b, unsigned what)
{
#define SWAP(field)                                                                                \
	do {                                                                                       \
		__typeof__(a->field) t_ = a->field;                                                \
		a->field = b->field;                                                               \
		b->field = t_;                                                                     \
	} while (0)
	if (what & UPD_END)
		SWAP(end_time);
	if (what & UPD_EXPIRY)
		SWAP(on_expiry);
	if (what & UPD_LABELS)
		SWAP(labels);
	if (what & UPD_NETWORK) {
		SWAP(allow_internet);
		SWAP(allow_cidrs);
		SWAP(deny_cidrs);
	}
#undef SWAP
}

RpcCode node_update_sandbox(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__UpdateSandboxRequest *req = (const void *)request;
	Ember__V1__SandboxSpec empty = EMBER__V1__SANDBOX_SPEC__INIT;
	const Ember__V1__SandboxSpec *p = req->spec ?: &empty;
	const Config *c = m->config;
	/* The new values of the fields named; swapped with the sandbox's (and then freed). */
	SbSpec nu = {};
	_cleanup_free_ char *err = NULL;
	unsigned what = 0;
	RpcCode code;
	Sandbox *sb;
	int r;

	if ((code = node_id_check(call, "sandbox_id", req->sandbox_id)) != RPC_OK ||
	    (code = update_paths(call, req->update_mask, &what)) != RPC_OK)
		return code;
	if ((code = expiry_from_pb(call, p, what & UPD_END, what & UPD_EXPIRY, &nu)) != RPC_OK)
		return code;
	if ((what & UPD_LABELS) && (code = kv_from_pb(call, "spec.labels", KV_LABELS, p->labels,
						      p->n_labels, &nu.labels)) != RPC_OK)
		return code;
	if (what & UPD_NETWORK) {
		/* unset: the node's default, as on a create */
		nu.allow_internet =
			p->network ? p->network->allow_internet : c->default_allow_internet;
		if (p->network &&
		    ((code = cidrs_from_pb(call, "spec.network.allow_cidrs",
					   p->network->allow_cidrs, p->network->n_allow_cidrs,
					   &nu.allow_cidrs)) != RPC_OK ||
		     (code = cidrs_from_pb(call, "spec.network.deny_cidrs", p->network->deny_cidrs,
					   p->network->n_deny_cidrs, &nu.deny_cidrs)) != RPC_OK)) {
			sb_spec_done(&nu);
			return code;
		}
	}

again:
	pthread_mutex_lock(&m->lock);
	sb = manager_find_locked(m, req->sandbox_id);
	if (!sb) {
		pthread_mutex_unlock(&m->lock);
		sb_spec_done(&nu);
		return rpc_call_error(call, RPC_NOT_FOUND, "no sandbox %s", req->sandbox_id);
	}
	sandbox_ref_locked(sb);
	if (sb->state == EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_DESTROYING ||
	    sb->state == EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_DESTROYED) {
		pthread_mutex_unlock(&m->lock);
		sandbox_unref(m, sb);
		sb_spec_done(&nu);
		return rpc_call_error(call, RPC_FAILED_PRECONDITION,
				      "sandbox %s is being destroyed", req->sandbox_id);
	}
	if (sb->op != SB_OP_NONE) {
		/* a create, pause, resume, snapshot or another update: after it */
		r = sandbox_wait_locked(m, call, sb, op_none, 0);
		pthread_mutex_unlock(&m->lock);
		sandbox_unref(m, sb);
		if (r < 0) {
			sb_spec_done(&nu);
			return RPC_CANCELLED;
		}
		goto again;
	}
	if (what & UPD_END)
		end_time_resolve(c, &nu, &sb->create_time, false);
	bool net_changed =
		(what & UPD_NETWORK) && (nu.allow_internet != sb->spec.allow_internet ||
					 !str_list_equal(&nu.allow_cidrs, &sb->spec.allow_cidrs) ||
					 !str_list_equal(&nu.deny_cidrs, &sb->spec.deny_cidrs));
	bool changed = net_changed ||
		       ((what & UPD_END) && !timespec_equal(&nu.end_time, &sb->spec.end_time)) ||
		       ((what & UPD_EXPIRY) && nu.on_expiry != sb->spec.on_expiry) ||
		       ((what & UPD_LABELS) && !kv_list_equal(&nu.labels, &sb->spec.labels));
	if (!changed) {
		/* the same update again: nothing to do, no event */
		pthread_mutex_unlock(&m->lock);
		sb_spec_done(&nu);
		code = send_sandbox(call, m, sb);
		sandbox_unref(m, sb);
		return code;
	}
	/* An operation of its own while the slot and the record change: others wait for it
	 * (a destroy or a reap meanwhile goes on after it). */
	sb->op = SB_OP_UPDATE;
	NetnsSlot *slot = net_changed && sb->slot ? netns_slot_ref(sb->slot) : NULL;
	pthread_mutex_unlock(&m->lock);

	r = 0;
	if (slot) {
		NetnsPolicy policy = sb_spec_policy(&nu);
		r = netns_slot_set_policy(m->pool, slot, &policy, &err);
		if (r == -ENOENT)
			r = 0; /* released meanwhile (its VMM died): the spec is what counts */
	}

	/* Swap the new values in; `nu` then holds the old ones, for a rollback. */
	if (r >= 0) {
		pthread_mutex_lock(&m->lock);
		spec_swap_parts(&sb->spec, &nu, what);
		pthread_mutex_unlock(&m->lock);
	}
	if (r >= 0 && (r = sandbox_record_write(m, sb, 0, NULL)) < 0) {
		/* Not persisted: all of it goes back, the slot's policy too. */
		_cleanup_free_ char *rerr = NULL;
		if (asprintf(&err, "cannot write its record: %s", strerror(-r)) < 0)
			err = NULL;
		pthread_mutex_lock(&m->lock);
		spec_swap_parts(&sb->spec, &nu, what);
		pthread_mutex_unlock(&m->lock);
		NetnsPolicy old = sb_spec_policy(&sb->spec);
		if (slot && netns_slot_set_policy(m->pool, slot, &old, &rerr) < 0 && rerr)
			log_sandbox(LOG_ERR, sb, ": cannot restore its egress policy: %s", rerr);
	}
	if (slot)
		netns_slot_unref(slot);

	pthread_mutex_lock(&m->lock);
	if (r >= 0) {
		/* one `changed` event for the whole update, and the timer moved */
		sandbox_set_state_locked(m, sb, sb->state, sb->state_reason);
		expiry_update_locked(m, sb);
	}
	update_end_locked(m, sb);
	pthread_mutex_unlock(&m->lock);
	sb_spec_done(&nu);
	if (r < 0) {
		code = rpc_call_error(call, RPC_INTERNAL, "sandbox %s: nothing changed: %s",
				      req->sandbox_id, err ?: strerror(-r));
	} else {
		sandbox_log_event(
			sb, LOG_INFO, EMBER_MESSAGE_SANDBOX_UPDATED, "update", NULL, -1,
			"sandbox %s updated (%s%s%s%s)", sb->id, what & UPD_END ? " end_time" : "",
			what & UPD_EXPIRY ? " on_expiry" : "", what & UPD_LABELS ? " labels" : "",
			what & UPD_NETWORK ? " network" : "");
		code = send_sandbox(call, m, sb);
	}
	sandbox_unref(m, sb);
	return code;
}

static RpcCode send_resync(RpcCall *call, Manager *m, uint64_t *since)
{
	Ember__V1__SandboxEvent ev = EMBER__V1__SANDBOX_EVENT__INIT;
	Ember__V1__SandboxResync resync = EMBER__V1__SANDBOX_RESYNC__INIT;
	_cleanup_(arena_freep) Arena *a = arena_new();
	struct timespec now;
	int r;

	if (!a)
		return RPC_RESOURCE_EXHAUSTED;
	r = collect_sandboxes(m, a, 0, NULL, &resync.sandboxes, &resync.n_sandboxes, &ev.revision);
	if (r < 0)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	clock_gettime(CLOCK_REALTIME, &now);
	ev.time = timestamp_to_pb(a, &now);
	ev.event_case = EMBER__V1__SANDBOX_EVENT__EVENT_RESYNC;
	ev.resync = &resync;
	if (rpc_call_send(call, &ev.base) < 0)
		return RPC_CANCELLED;
	*since = ev.revision;
	return RPC_OK;
}

RpcCode node_watch_sandboxes(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__WatchSandboxesRequest *req = (const void *)request;
	uint64_t since = req->since_revision;
	bool resync = since == 0;
	RpcCode code = RPC_OK;

	if (events_watch_add(m->events, call) < 0)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	rpc_call_end_on_drain(call);
	for (;;) {
		PackedEvent *evs = NULL;
		size_t n = 0;
		int r;

		if (resync) {
			code = send_resync(call, m, &since);
			if (code != RPC_OK)
				break;
			resync = false;
		}
		r = events_since(m->events, since, 256, &evs, &n);
		if (r < 0) {
			code = rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
			break;
		}
		if (r == 0) {
			resync = true;
			continue;
		}
		for (size_t i = 0; i < n && code == RPC_OK; i++) {
			Ember__V1__SandboxEvent *ev =
				ember__v1__sandbox_event__unpack(NULL, evs[i].size, evs[i].data);
			if (!ev) {
				code = rpc_call_error(call, RPC_INTERNAL, "cannot unpack an event");
				break;
			}
			if (rpc_call_send(call, &ev->base) < 0)
				code = RPC_CANCELLED;
			ember__v1__sandbox_event__free_unpacked(ev, NULL);
			since = evs[i].revision;
		}
		packed_events_free(evs, n);
		if (code != RPC_OK)
			break;
		if (n == 0) {
			r = rpc_call_wait(call, -1);
			if (r == -ESHUTDOWN) {
				code = rpc_call_error(call, RPC_UNAVAILABLE,
						      "emberd is shutting down");
				break;
			}
			if (r < 0) {
				code = RPC_CANCELLED;
				break;
			}
		}
	}
	events_watch_remove(m->events, call);
	return code;
}
