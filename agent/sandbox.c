/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The sandbox registry and its machinery: a hash table by id, reference counts, the state
 * machine's single place of change (sandbox_set_state_locked: record the event, wake the
 * waiters), a fixed pool of worker threads for lifecycle operations, and one event-loop thread
 * that learns of VMM exits through their pidfds (epoll): nothing here scans all sandboxes or
 * polls one.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/error.h"
#include "common/fileio.h"
#include "common/log.h"
#include "messages.h"
#include "node-sandbox.h"

static size_t hash_id(const char *id, size_t n)
{
	uint64_t h = 1469598103934665603ULL; /* FNV-1a */

	for (const unsigned char *p = (const unsigned char *)id; *p; p++)
		h = (h ^ *p) * 1099511628211ULL;
	return (size_t)(h % n);
}

Sandbox *manager_find_locked(Manager *m, const char *id)
{
	for (Sandbox *sb = m->buckets[hash_id(id, m->n_buckets)]; sb; sb = sb->hnext)
		if (strcmp(sb->id, id) == 0)
			return sb;
	return NULL;
}

static void rehash_locked(Manager *m, size_t n)
{
	Sandbox **b = calloc(n, sizeof(Sandbox *));

	if (!b)
		return; /* chains just grow longer */
	for (size_t i = 0; i < m->n_buckets; i++)
		for (Sandbox *sb = m->buckets[i], *next; sb; sb = next) {
			next = sb->hnext;
			size_t h = hash_id(sb->id, n);
			sb->hnext = b[h];
			b[h] = sb;
		}
	free(m->buckets);
	m->buckets = b;
	m->n_buckets = n;
}

void manager_insert_locked(Manager *m, Sandbox *sb)
{
	if (m->n_sandboxes + 1 > m->n_buckets)
		rehash_locked(m, m->n_buckets * 2);
	size_t h = hash_id(sb->id, m->n_buckets);
	sb->hnext = m->buckets[h];
	m->buckets[h] = sb;
	m->n_sandboxes++;
	sb->refs++;
	if (sb->tmpl)
		sb->tmpl->sandbox_count++;
	if (sb->snap)
		sb->snap->dependents++;
}

void manager_remove_locked(Manager *m, Sandbox *sb)
{
	for (Sandbox **p = &m->buckets[hash_id(sb->id, m->n_buckets)]; *p; p = &(*p)->hnext)
		if (*p == sb) {
			*p = sb->hnext;
			sb->hnext = NULL;
			m->n_sandboxes--;
			sb->removed = true;
			expiry_remove_locked(m, sb);
			if (sb->tmpl)
				sb->tmpl->sandbox_count--;
			if (sb->snap)
				sb->snap->dependents--;
			sandbox_wake_locked(sb);
			sandbox_unref_locked(m, sb);
			return;
		}
}

Sandbox *sandbox_new(const char *id)
{
	Sandbox *sb = calloc(1, sizeof(*sb));

	if (!sb)
		return NULL;
	snprintf(sb->id, sizeof(sb->id), "%s", id);
	sb->vmm_pid = -1;
	sb->uffd_pid = -1;
	sb->expiry_index = SIZE_MAX;
	sb->console_wd = -1;
	return sb;
}

static void sandbox_free(Sandbox *sb)
{
	sb_spec_done(&sb->spec);
	free(sb->template_id);
	free(sb->state_reason);
	free(sb->fc_version);
	free(sb->sandbox_ip);
	free(sb->device);
	free(sb->run_dir);
	free(sb->data_dir);
	free(sb->cow_path);
	free(sb->create_error);
	free(sb->op_reason);
	for (size_t i = 0; i < _OUT_MAX; i++)
		free(sb->outcome[i].error);
	free(sb->watch); /* only at manager_free: a watched sandbox holds a reference */
	if (sb->vm)
		fcctl_vm_free(sb->vm);
	if (sb->uffd)
		fcctl_vm_free(sb->uffd);
	free(sb);
}

void sandbox_ref_locked(Sandbox *sb)
{
	sb->refs++;
}

void sandbox_unref_locked(Manager *m, Sandbox *sb)
{
	(void)m;
	if (--sb->refs == 0)
		sandbox_free(sb);
}

void sandbox_unref(Manager *m, Sandbox *sb)
{
	pthread_mutex_lock(&m->lock);
	sandbox_unref_locked(m, sb);
	pthread_mutex_unlock(&m->lock);
}

void manager_promise_locked(Manager *m, Sandbox *sb, bool take)
{
	if (!sb->spec.huge_pages) {
		if (take)
			m->creating_mib += sb->spec.memory_mib;
		else
			m->creating_mib -= sb->spec.memory_mib;
	} else if (take) {
		sandbox_huge_hold_locked(m, sb); /* until its VMM is gone */
	}
}

void sandbox_huge_hold_locked(Manager *m, Sandbox *sb)
{
	if (sb->spec.huge_pages && !sb->huge_held) {
		sb->huge_held = true;
		m->huge_mib += sb->spec.memory_mib;
	}
}

void sandbox_huge_release_locked(Manager *m, Sandbox *sb)
{
	if (sb->huge_held) {
		sb->huge_held = false;
		m->huge_mib -= sb->spec.memory_mib;
	}
}

void sandbox_waiter_add_locked(Sandbox *sb, Waiter *w, RpcCall *call)
{
	*w = (Waiter){.call = call, .next = sb->waiters};
	sb->waiters = w;
}

void sandbox_waiter_remove_locked(Sandbox *sb, Waiter *w)
{
	for (Waiter **p = &sb->waiters; *p; p = &(*p)->next)
		if (*p == w) {
			*p = w->next;
			return;
		}
}

void sandbox_wake_locked(Sandbox *sb)
{
	for (Waiter *w = sb->waiters; w; w = w->next)
		rpc_call_wake(w->call);
}

void sandbox_wake_console_locked(Sandbox *sb)
{
	for (Waiter *w = sb->waiters; w; w = w->next)
		if (w->console)
			rpc_call_wake(w->call);
}

void sandbox_set_state_locked(Manager *m, Sandbox *sb, Ember__V1__SandboxState state,
			      const char *reason)
{
	_cleanup_(arena_freep) Arena *a = arena_new();
	char *r = reason ? strdup(reason) : NULL;

	sb->state = state;
	free(sb->state_reason);
	sb->state_reason = r;
	clock_gettime(CLOCK_REALTIME, &sb->update_time);
	Ember__V1__Sandbox *p = a ? sandbox_to_pb(a, sb) : NULL;
	if (p)
		sb->revision = events_record(m->events, p, NULL);
	else
		log_sandbox(LOG_ERR, sb, ": out of memory recording its change to %s",
			    protobuf_c_enum_descriptor_get_value(
				    &ember__v1__sandbox_state__descriptor, (int)state)
				    ->name);
	sandbox_wake_locked(sb);
}

/* ---- worker pool ---- */

static void jobs_push_locked(Manager *m, Job *j)
{
	if (m->jobs_tail)
		m->jobs_tail->next = j;
	else
		m->jobs_head = j;
	m->jobs_tail = j;
	pthread_cond_signal(&m->jobs_cond);
}

void manager_submit_locked(Manager *m, Sandbox *sb, SbOp op)
{
	Job *j = calloc(1, sizeof(*j));

	/* Without memory for a job the operation cannot run: the waiters learn it from the
	 * state, which stays as it is, and the sandbox is marked FAILED with the reason. */
	if (!j && (op == SB_OP_PAUSE || op == SB_OP_RESUME || op == SB_OP_SNAPSHOT)) {
		/* Not started: the sandbox stays as it was, its waiters learn why, and what the
		 * caller counted for it is given back. */
		int out = op == SB_OP_PAUSE    ? OUT_PAUSE
			  : op == SB_OP_RESUME ? OUT_RESUME
					       : OUT_SNAPSHOT;
		OpOutcome *o = &sb->outcome[out];
		free(o->error);
		o->error = strdup("out of memory starting the operation");
		o->code = RPC_RESOURCE_EXHAUSTED;
		o->ended++;
		if (op == SB_OP_RESUME) {
			manager_promise_locked(m, sb, false);
			sandbox_huge_release_locked(m, sb);
			if (sb->slot_user) {
				sb->slot_user = false;
				m->n_slot_users--;
			}
		}
		if (op == SB_OP_SNAPSHOT && sb->taking) {
			snapshot_discard_locked(m, sb->taking);
			sb->taking = NULL;
		}
		sb->op = SB_OP_NONE;
		free(sb->op_reason);
		sb->op_reason = NULL;
		if (op != SB_OP_SNAPSHOT)
			sandbox_set_state_locked(
				m, sb,
				op == SB_OP_PAUSE ? EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING
						  : EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSED,
				NULL);
		else
			sandbox_wake_locked(sb);
		return;
	}
	if (!j) {
		/* Whoever waits for this operation learns that it did not run. */
		if (op == SB_OP_CREATE) {
			sb->create_done = true;
			sb->create_code = RPC_RESOURCE_EXHAUSTED;
			manager_promise_locked(m, sb, false);
			sandbox_huge_release_locked(m, sb);
		} else {
			sb->destroy_failed = true;
			sb->abort = false;
		}
		sb->op = SB_OP_NONE;
		sandbox_set_state_locked(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_FAILED,
					 "out of memory starting an operation");
		return;
	}
	sandbox_ref_locked(sb);
	j->sb = sb;
	j->op = op;
	sb->op = op;
	jobs_push_locked(m, j);
}

int manager_remove_later_locked(Manager *m, char *path)
{
	Job *j = calloc(1, sizeof(*j));

	if (!j)
		return -ENOMEM;
	j->path = path;
	jobs_push_locked(m, j);
	return 0;
}

static void *worker_main(void *p)
{
	Manager *m = p;

	pthread_mutex_lock(&m->lock);
	for (;;) {
		while (!m->jobs_head && !m->stopping)
			pthread_cond_wait(&m->jobs_cond, &m->lock);
		if (!m->jobs_head)
			break;
		Job *j = m->jobs_head;
		m->jobs_head = j->next;
		if (!m->jobs_head)
			m->jobs_tail = NULL;
		pthread_mutex_unlock(&m->lock);

		if (!j->sb) {
			int r = rm_rf(j->path);
			if (r < 0)
				log_warning_errno(r, "cannot remove %s", j->path);
			free(j->path);
			free(j);
			pthread_mutex_lock(&m->lock);
			continue;
		}
		switch (j->op) {
		case SB_OP_CREATE:
			sandbox_op_create(m, j->sb);
			break;
		case SB_OP_REAP:
			sandbox_op_reap(m, j->sb);
			break;
		case SB_OP_PAUSE:
			sandbox_op_pause(m, j->sb);
			break;
		case SB_OP_RESUME:
			sandbox_op_resume(m, j->sb);
			break;
		case SB_OP_SNAPSHOT:
			sandbox_op_snapshot(m, j->sb);
			break;
		default:
			sandbox_op_destroy(m, j->sb);
			break;
		}

		pthread_mutex_lock(&m->lock);
		sandbox_unref_locked(m, j->sb);
		free(j);
	}
	pthread_mutex_unlock(&m->lock);
	return NULL;
}

/* ---- VMM exits ----
 *
 * epoll hands back the pointer it was given, possibly in a batch taken just before another
 * thread stopped watching that VMM. So epoll gets a WatchToken, not the sandbox: unwatching
 * clears token->sb under the lock and queues the token, and only the loop thread frees tokens,
 * at the top of its loop, when no batch it took can still name them. */

struct WatchToken {
	Sandbox *sb; /* (L) NULL once unwatched */
	WatchToken *next;
};

int manager_watch_vmm(Manager *m, Sandbox *sb)
{
	WatchToken *t = calloc(1, sizeof(*t));
	/* Edge-triggered: a pidfd stays readable once the process has exited, and one
	 * notification is all the reaper needs. The VMM and its memory server share the token:
	 * either one ending is the sandbox's end. */
	struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.ptr = t};
	int fd = sb->vm ? fcctl_vm_pidfd(sb->vm) : -1;
	int ufd = sb->uffd ? fcctl_vm_pidfd(sb->uffd) : -1;

	if (!t)
		return -ENOMEM;
	if (fd < 0) {
		free(t);
		return -EBADF;
	}
	pthread_mutex_lock(&m->lock);
	sandbox_ref_locked(sb);
	t->sb = sb;
	sb->watch = t;
	if (epoll_ctl(m->epoll_fd, EPOLL_CTL_ADD, fd, &ev) < 0 ||
	    (ufd >= 0 && epoll_ctl(m->epoll_fd, EPOLL_CTL_ADD, ufd, &ev) < 0)) {
		int r = -errno;
		(void)epoll_ctl(m->epoll_fd, EPOLL_CTL_DEL, fd, NULL);
		sb->watch = NULL;
		sandbox_unref_locked(m, sb);
		pthread_mutex_unlock(&m->lock);
		free(t);
		return r;
	}
	pthread_mutex_unlock(&m->lock);
	return 0;
}

void manager_unwatch_vmm(Manager *m, Sandbox *sb)
{
	pthread_mutex_lock(&m->lock);
	WatchToken *t = sb->watch;
	if (t) {
		(void)epoll_ctl(m->epoll_fd, EPOLL_CTL_DEL, fcctl_vm_pidfd(sb->vm), NULL);
		if (sb->uffd)
			(void)epoll_ctl(m->epoll_fd, EPOLL_CTL_DEL, fcctl_vm_pidfd(sb->uffd), NULL);
		sb->watch = NULL;
		t->sb = NULL;
		t->next = m->dead_tokens;
		m->dead_tokens = t;
		sandbox_unref_locked(m, sb);
	}
	pthread_mutex_unlock(&m->lock);
}

/* The loop only hands the work to a worker: releasing a disk or a slot can take seconds, and
 * the loop must stay free to notice the next exit. */
static void vmm_exited(Manager *m, WatchToken *t)
{
	pthread_mutex_lock(&m->lock);
	Sandbox *sb = t->sb;
	/* An operation that runs (destroy, a create's unwind) owns the VMM and its exit. */
	if (sb && sb->op == SB_OP_NONE && !sb->removed)
		manager_submit_locked(m, sb, SB_OP_REAP);
	pthread_mutex_unlock(&m->lock);
}

static void free_dead_tokens_locked(Manager *m)
{
	while (m->dead_tokens) {
		WatchToken *t = m->dead_tokens;
		m->dead_tokens = t->next;
		free(t);
	}
}

static void *loop_main(void *p)
{
	Manager *m = p;
	struct epoll_event evs[64];

	for (;;) {
		pthread_mutex_lock(&m->lock);
		free_dead_tokens_locked(m);
		pthread_mutex_unlock(&m->lock);
		int n = epoll_wait(m->epoll_fd, evs, ELEMENTSOF(evs), console_rearm(m));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			log_error_errno(errno,
					"epoll_wait failed; VMM exits are no longer noticed");
			return NULL;
		}
		for (int i = 0; i < n; i++) {
			if (evs[i].data.ptr == NULL)
				return NULL; /* the stop eventfd */
			if (evs[i].data.ptr == &m->timer_fd)
				expiry_fire(m);
			else if (evs[i].data.ptr == &m->console_fd)
				console_events(m);
			else
				vmm_exited(m, evs[i].data.ptr);
		}
	}
}

unsigned manager_sandbox_count(Manager *m)
{
	pthread_mutex_lock(&m->lock);
	unsigned n = (unsigned)m->n_sandboxes;
	pthread_mutex_unlock(&m->lock);
	return n;
}

int manager_destroy_all(Manager *m, int timeout_ms, char **ret_error)
{
	struct timespec tick = {.tv_nsec = 50L * 1000 * 1000};
	_cleanup_free_ char *left = NULL;
	size_t len = 0;
	bool failed = false;

	pthread_mutex_lock(&m->lock);
	m->teardown = true;
	for (size_t i = 0; i < m->n_buckets; i++)
		for (Sandbox *sb = m->buckets[i]; sb; sb = sb->hnext) {
			if (sb->state == EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_DESTROYING)
				continue;
			sb->abort = true;
			sb->destroy_failed = false;
			sandbox_set_state_locked(
				m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_DESTROYING, NULL);
			if (sb->op == SB_OP_NONE)
				manager_submit_locked(m, sb, SB_OP_DESTROY);
			else if (sb->op != SB_OP_DESTROY)
				sb->destroy_next = true;
		}
	for (int waited = 0; m->n_sandboxes > 0 && waited < timeout_ms; waited += 50) {
		bool busy = false;
		for (size_t i = 0; i < m->n_buckets && !busy; i++)
			for (Sandbox *sb = m->buckets[i]; sb && !busy; sb = sb->hnext)
				busy = sb->op != SB_OP_NONE || !sb->destroy_failed;
		if (!busy)
			break; /* every one left failed to go: waiting longer changes nothing */
		pthread_mutex_unlock(&m->lock);
		nanosleep(&tick, NULL);
		pthread_mutex_lock(&m->lock);
	}
	for (size_t i = 0; i < m->n_buckets; i++)
		for (Sandbox *sb = m->buckets[i]; sb; sb = sb->hnext) {
			failed |= sb->destroy_failed;
			size_t add = strlen(sb->id) + 2;
			char *n = realloc(left, len + add + 1);
			if (!n)
				break;
			left = n;
			len += (size_t)sprintf(left + len, "%s%s", len ? ", " : "", sb->id);
		}
	unsigned n_left = (unsigned)m->n_sandboxes;
	pthread_mutex_unlock(&m->lock);
	if (n_left == 0)
		return 0;
	return error_set(ret_error, failed ? -EIO : -ETIMEDOUT, "%u sandbox(es) left (%s): %s",
			 n_left, left ?: "?",
			 failed ? "their destroy failed (see the log)"
				: "their destroy did not end in time");
}

OpMetric *op_metric_locked(Manager *m, const char *op, const char *step)
{
	for (size_t i = 0; i < m->n_op_metrics; i++)
		if (strcmp(m->op_metrics[i].op, op) == 0 &&
		    strcmp(m->op_metrics[i].step, step) == 0)
			return &m->op_metrics[i];
	/* Few: a handful of operations times their steps. Pointers are not kept across the
	 * lock, so the array may move. */
	OpMetric *n = reallocarray(m->op_metrics, m->n_op_metrics + 1, sizeof(*n));
	if (!n)
		return NULL;
	m->op_metrics = n;
	n = &m->op_metrics[m->n_op_metrics++];
	*n = (OpMetric){};
	snprintf(n->op, sizeof(n->op), "%s", op);
	snprintf(n->step, sizeof(n->step), "%s", step);
	return n;
}

void op_outcome_locked(Manager *m, const char *op, RpcCode code)
{
	OpMetric *om = op_metric_locked(m, op, "");
	if (om && (unsigned)code < _RPC_CODE_MAX)
		om->outcomes[code]++;
}

int manager_pulls_start(Manager *m)
{
	return pull_engine_start(m->pulls);
}

int manager_pull_status(Manager *m, char *buf, size_t size)
{
	return pull_status(m->pulls, buf, size);
}

void manager_write_metrics(Manager *m, FILE *f)
{
	const ProtobufCEnumDescriptor *states = &ember__v1__sandbox_state__descriptor;
	unsigned by_state[32] = {};

	if (!m)
		return;
	pull_write_metrics(m->pulls, f);
	pthread_mutex_lock(&m->lock);
	for (size_t i = 0; i < m->n_buckets; i++)
		for (Sandbox *sb = m->buckets[i]; sb; sb = sb->hnext)
			if ((unsigned)sb->state < ELEMENTSOF(by_state))
				by_state[sb->state]++;
	metrics_header(f, "ember_sandboxes", "gauge", "Sandboxes on the node by state.");
	for (unsigned i = 0; i < states->n_values; i++) {
		const ProtobufCEnumValue *v = &states->values[i];
		const char *name = v->name; /* "SANDBOX_STATE_RUNNING" → "RUNNING" */
		if (v->value == 0 || (unsigned)v->value >= ELEMENTSOF(by_state))
			continue;
		if (strncmp(name, "SANDBOX_STATE_", 14) == 0)
			name += 14;
		fprintf(f, "ember_sandboxes{state=\"%s\"} %u\n", name, by_state[v->value]);
	}
	/* The live counters of each ember-uffd: small reads of tmpfs files, under the lock so
	 * that one ending meanwhile is counted once, in its file or in the totals. */
	FcUffdCounters sum = m->uffd_done;
	for (size_t i = 0; i < m->n_buckets; i++)
		for (Sandbox *sb = m->buckets[i]; sb; sb = sb->hnext) {
			char path[PATH_MAX];
			FcUffdCounters uc;
			if (!sb->uffd_counted ||
			    snprintf(path, sizeof(path), "%s/" UFFD_STATS_FILE, sb->run_dir) >=
				    (int)sizeof(path) ||
			    fcctl_uffd_counters_read(path, &uc) < 0)
				continue;
			sum.faults += uc.faults;
			sum.fault_bytes += uc.fault_bytes;
			sum.prefetch_bytes += uc.prefetch_bytes;
			sum.replay_bytes += uc.replay_bytes;
		}
	metrics_header(f, "ember_uffd_faults_total", "counter",
		       "Guest page faults ember-uffd served (resumed sandboxes and forks).");
	fprintf(f, "ember_uffd_faults_total %llu\n", (unsigned long long)sum.faults);
	metrics_header(
		f, "ember_uffd_served_bytes_total", "counter",
		"Bytes of guest memory ember-uffd copied in: on faults (with the pages around "
		"them), by the prefetch sweep, or from a working set replayed.");
	fprintf(f, "ember_uffd_served_bytes_total{how=\"fault\"} %llu\n",
		(unsigned long long)sum.fault_bytes);
	fprintf(f, "ember_uffd_served_bytes_total{how=\"prefetch\"} %llu\n",
		(unsigned long long)sum.prefetch_bytes);
	fprintf(f, "ember_uffd_served_bytes_total{how=\"replay\"} %llu\n",
		(unsigned long long)sum.replay_bytes);
	metrics_header(f, "ember_operation_duration_seconds", "histogram",
		       "Lifecycle operations (create, pause, resume) from start to end, failed "
		       "ones included.");
	for (size_t i = 0; i < m->n_op_metrics; i++) {
		char labels[64];
		if (m->op_metrics[i].step[0] ||
		    metrics_histogram_count(&m->op_metrics[i].seconds) == 0)
			continue;
		snprintf(labels, sizeof(labels), "operation=\"%s\"", m->op_metrics[i].op);
		metrics_histogram(f, "ember_operation_duration_seconds", labels,
				  &m->op_metrics[i].seconds);
	}
	metrics_header(f, "ember_operation_step_duration_seconds", "histogram",
		       "Each step of a lifecycle operation (steps as in Sandbox.last_operation).");
	for (size_t i = 0; i < m->n_op_metrics; i++) {
		char labels[96];
		if (!m->op_metrics[i].step[0])
			continue;
		snprintf(labels, sizeof(labels), "operation=\"%s\",step=\"%s\"",
			 m->op_metrics[i].op, m->op_metrics[i].step);
		metrics_histogram(f, "ember_operation_step_duration_seconds", labels,
				  &m->op_metrics[i].seconds);
	}
	metrics_header(f, "ember_operations_total", "counter",
		       "Lifecycle operations (create, pause, resume, snapshot) by how they ended.");
	for (size_t i = 0; i < m->n_op_metrics; i++)
		for (int code = 0; code < _RPC_CODE_MAX; code++)
			if (!m->op_metrics[i].step[0] && m->op_metrics[i].outcomes[code])
				fprintf(f,
					"ember_operations_total{operation=\"%s\",code=\"%s\"} "
					"%llu\n",
					m->op_metrics[i].op, rpc_code_to_string((RpcCode)code),
					(unsigned long long)m->op_metrics[i].outcomes[code]);
	metrics_header(f, "ember_operation_errors_total", "counter",
		       "Lifecycle operations that failed, by status code.");
	for (size_t i = 0; i < m->n_op_metrics; i++)
		for (int code = 1; code < _RPC_CODE_MAX; code++)
			if (!m->op_metrics[i].step[0] && m->op_metrics[i].outcomes[code])
				fprintf(f,
					"ember_operation_errors_total{operation=\"%s\",code=\"%s\"}"
					" "
					"%llu\n",
					m->op_metrics[i].op, rpc_code_to_string((RpcCode)code),
					(unsigned long long)m->op_metrics[i].outcomes[code]);
	pthread_mutex_unlock(&m->lock);
}

const VmmInfo *manager_vmm(const Manager *m)
{
	return &m->vmm;
}

const char *manager_storage_backend(const Manager *m)
{
	return storage_backend_to_string(storage_get_backend(m->storage));
}

/* ---- start and stop ---- */

static int setup_network_config(Manager *m, char **ret_error)
{
	const Config *c = m->config;
	int r;

	if (asprintf(&m->netns_state, "%s/network.json", c->run_dir) < 0)
		return -ENOMEM;
	m->netcfg.netns_dir = c->netns_dir;
	m->netcfg.name_prefix = "ember-";
	m->netcfg.state_file = m->netns_state;
	m->netcfg.pool_size = c->pool_size;
	if ((r = netns_cidr_parse(c->sandbox_range, &m->netcfg.sandbox_range)) < 0 ||
	    (r = netns_cidr_parse(c->veth_range, &m->netcfg.veth_range)) < 0)
		return error_set(ret_error, r, "bad [network] range");
	if (strcmp(c->uplink, "none") == 0) {
		m->uplink = NULL;
	} else if (strcmp(c->uplink, "auto") == 0) {
		/* The interface of the IPv4 default route, from the kernel's route table. */
		_cleanup_fclose_ FILE *f = fopen("/proc/net/route", "re");
		char line[256], ifname[32];
		unsigned long dest, mask;
		while (f && fgets(line, sizeof(line), f))
			if (sscanf(line, "%31s %lx %*x %*x %*d %*d %*d %lx", ifname, &dest,
				   &mask) == 3 &&
			    dest == 0 && mask == 0) {
				m->uplink = strdup(ifname);
				break;
			}
		if (!m->uplink)
			log_notice("[network] uplink = auto: no default route, so sandboxes get no "
				   "internet access");
	} else {
		m->uplink = strdup(c->uplink);
	}
	m->netcfg.uplink = m->uplink;
	return 0;
}

static int setup_storage(Manager *m, char **ret_error)
{
	const char *want = m->config->storage_backend;
	StorageBackend b;

	if (strcmp(want, "auto") == 0) {
		b = storage_backend_detect();
		log_info("storage: %s backend (%s)", storage_backend_to_string(b),
			 b == STORAGE_BACKEND_DM ? "device-mapper answers"
						 : "no device-mapper on this host");
	} else {
		b = storage_backend_from_string(want);
		if (b == STORAGE_BACKEND_DM && storage_backend_detect() != STORAGE_BACKEND_DM)
			return error_set(
				ret_error, -ENODEV,
				"[storage] backend = dm, but device-mapper does not answer "
				"on /dev/mapper/control (modprobe dm-snapshot?)");
	}
	return storage_new(b, &m->storage);
}

int manager_new(const Config *config, bool kvm_usable, Manager **ret, char **ret_error)
{
	Manager *m;
	int r;

	m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	m->config = config;
	m->epoll_fd = m->stop_fd = m->timer_fd = m->console_fd = -1;
	pthread_mutex_init(&m->lock, NULL);
	pthread_cond_init(&m->jobs_cond, NULL);
	m->n_buckets = 64;
	m->buckets = calloc(m->n_buckets, sizeof(Sandbox *));
	if (!m->buckets || asprintf(&m->templates_dir, "%s/templates", config->state_dir) < 0 ||
	    asprintf(&m->sandboxes_dir, "%s/sandboxes", config->state_dir) < 0 ||
	    asprintf(&m->snapshots_dir, "%s/snapshots", config->state_dir) < 0 ||
	    asprintf(&m->run_sandboxes_dir, "%s/sandboxes", config->run_dir) < 0) {
		manager_free(m);
		return -ENOMEM;
	}
	if ((r = mkdir_p(m->templates_dir, 0700)) < 0 ||
	    (r = mkdir_p(m->sandboxes_dir, 0700)) < 0 ||
	    (r = mkdir_p(m->snapshots_dir, 0700)) < 0 ||
	    (r = mkdir_p(m->run_sandboxes_dir, 0700)) < 0) {
		manager_free(m);
		return error_set(ret_error, r, "cannot create the state directories: %m");
	}

	r = vmm_choose(config, kvm_usable, &m->vmm, ret_error);
	if (r < 0)
		goto fail;
	log_struct(LOG_INFO, 0,
		   LOG_FIELDS({"OP", "start"}, {"VMM", vmm_kind_to_string(m->vmm.kind)}),
		   "VMM: %s %s (%s): %s", vmm_kind_to_string(m->vmm.kind), m->vmm.version,
		   m->vmm.binary, m->vmm.reason);
	if (m->vmm.uffd)
		log_info("memory server for resumed sandboxes: %s", m->vmm.uffd);
	else
		log_warning("ember-uffd is not found (set [vmm] uffd_bin): sandboxes cannot be "
			    "paused or resumed");
	r = systemd_open(config->systemd, &m->systemd, ret_error);
	if (r < 0)
		goto fail;
	r = setup_storage(m, ret_error);
	if (r < 0)
		goto fail;
	r = setup_network_config(m, ret_error);
	if (r < 0)
		goto fail;
	r = events_new(config->state_dir, config->event_log_size, &m->events, ret_error);
	if (r < 0)
		goto fail;
	r = pull_engine_new(m, &m->pulls);
	if (r < 0) {
		r = error_set(ret_error, r, "cannot set up the template downloads: %m");
		goto fail;
	}
	r = manager_templates_load(m);
	if (r < 0) {
		r = error_set(ret_error, r, "cannot load templates: %m");
		goto fail;
	}
	r = manager_snapshots_load(m);
	if (r < 0) {
		r = error_set(ret_error, r, "cannot load snapshots: %m");
		goto fail;
	}

	m->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
	m->stop_fd = eventfd(0, EFD_CLOEXEC);
	if (m->epoll_fd < 0 || m->stop_fd < 0) {
		r = error_set(ret_error, -errno, "epoll/eventfd: %m");
		goto fail;
	}
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
	if (epoll_ctl(m->epoll_fd, EPOLL_CTL_ADD, m->stop_fd, &ev) < 0) {
		r = error_set(ret_error, -errno, "epoll_ctl: %m");
		goto fail;
	}
	/* end times: the timer's events carry the address of its fd */
	struct epoll_event tev = {.events = EPOLLIN, .data.ptr = &m->timer_fd};
	if ((r = expiry_init(m)) < 0 ||
	    epoll_ctl(m->epoll_fd, EPOLL_CTL_ADD, m->timer_fd, &tev) < 0) {
		r = error_set(ret_error, r < 0 ? r : -errno, "end-time timer: %m");
		goto fail;
	}
	/* before the recovery, which watches the consoles of the VMMs it adopts */
	if ((r = console_init(m)) < 0) {
		r = error_set(ret_error, r, "inotify for the consoles: %m");
		goto fail;
	}

	/* Records, adoption and reclaim; creates the network pool. */
	r = manager_recover(m, ret_error);
	if (r < 0)
		goto fail;

	if (pthread_create(&m->loop_thread, NULL, loop_main, m) != 0) {
		r = error_set(ret_error, -EAGAIN, "cannot start the VMM watch thread");
		goto fail;
	}
	m->loop_started = true;
	m->workers = calloc(config->worker_threads, sizeof(pthread_t));
	if (!m->workers) {
		r = -ENOMEM;
		goto fail;
	}
	for (unsigned i = 0; i < config->worker_threads; i++) {
		if (pthread_create(&m->workers[i], NULL, worker_main, m) != 0) {
			r = error_set(ret_error, -EAGAIN, "cannot start worker threads");
			goto fail;
		}
		m->n_workers++;
	}
	*ret = m;
	return 0;
fail:
	manager_free(m);
	return r;
}

void manager_free(Manager *m)
{
	if (!m)
		return;
	pthread_mutex_lock(&m->lock);
	m->stopping = true;
	pthread_cond_broadcast(&m->jobs_cond);
	pthread_mutex_unlock(&m->lock);
	/* Workers finish the operation they run (node.proto: operations outlive calls) and
	 * then the queue; nothing is abandoned half-done. */
	for (size_t i = 0; i < m->n_workers; i++)
		pthread_join(m->workers[i], NULL);
	free(m->workers);
	if (m->loop_started) {
		uint64_t one = 1;
		if (write(m->stop_fd, &one, sizeof(one)) != sizeof(one))
			log_warning("cannot stop the VMM watch thread");
		else
			pthread_join(m->loop_thread, NULL);
	}
	/* Pulls stop where they are (their records stay: the next start resumes them). */
	pull_engine_free(m->pulls);
	m->pulls = NULL;
	/* Sandboxes keep running: only our view of them goes. */
	for (size_t i = 0; i < m->n_buckets; i++)
		for (Sandbox *sb = m->buckets[i], *next; sb; sb = next) {
			next = sb->hnext;
			/* Our reference goes; the slot itself stays in use (netns.h). */
			sb->slot = netns_slot_unref(sb->slot);
			sandbox_free(sb);
		}
	free(m->buckets);
	free(m->op_metrics);
	systemd_free(m->systemd);
	free_dead_tokens_locked(m);
	for (size_t i = 0; i < m->n_snapshots; i++)
		snapshot_free(m->snapshots[i]);
	free(m->snapshots);
	free(m->snapshots_dir);
	for (size_t i = 0; i < m->n_templates; i++)
		template_free(m->templates[i]);
	free(m->templates);
	if (m->pool)
		netns_pool_free(m->pool);
	if (m->teardown && m->n_sandboxes == 0) {
		/* Nothing of ours is left on the network: the host side (masquerade table, state
		 * file's slots) goes too, as a start with no sandbox would reclaim it. */
		NetnsReclaimResult res = {};
		_cleanup_free_ char *err = NULL;
		if (netns_reclaim(&m->netcfg, NULL, 0, &res, &err) < 0)
			log_warning("network reclaim: %s", err ?: "failed");
	}
	if (m->storage)
		storage_free(m->storage);
	events_free(m->events);
	vmm_info_done(&m->vmm);
	expiry_done(m);
	console_done(m);
	safe_close(m->epoll_fd);
	safe_close(m->stop_fd);
	free(m->netns_state);
	free(m->uplink);
	free(m->templates_dir);
	free(m->sandboxes_dir);
	free(m->run_sandboxes_dir);
	pthread_mutex_destroy(&m->lock);
	pthread_cond_destroy(&m->jobs_cond);
	free(m);
}
