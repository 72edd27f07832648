/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Revisions and the event log behind WatchSandboxes.
 *
 * Revisions must never go backwards, also across restarts, yet writing a file for every
 * event would put a synchronous disk write on every state change. So the log reserves
 * revisions in blocks: <state_dir>/revision holds a ceiling that no revision handed out has
 * reached; when the counter gets there a new ceiling is written first. A restart continues
 * above the stored ceiling (node.proto allows the gap).
 *
 * The last [sandboxes] event_log_size events are kept in memory, packed, in a ring; a watcher that
 * asks for anything older gets a resync. Recording an event never waits for a watcher: each watcher
 * copies what it needs and sends at its own pace.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/fileio.h"
#include "common/log.h"
#include "manager-internal.h"

#define REVISION_BLOCK 1024

typedef struct WatchEntry WatchEntry;
struct WatchEntry {
	RpcCall *call;
	WatchEntry *next;
};

struct Events {
	pthread_mutex_t lock;
	char *path;
	uint64_t revision; /* last handed out */
	uint64_t ceiling;  /* stored: no revision reaches it */
	PackedEvent *ring;
	size_t capacity;
	size_t head; /* index of the oldest */
	size_t n;
	WatchEntry *watchers;
};

static int ceiling_store(Events *e, uint64_t ceiling)
{
	char buf[32];
	int n = snprintf(buf, sizeof(buf), "%" PRIu64 "\n", ceiling);
	int r = write_file_atomic(e->path, buf, (size_t)n, 0600);

	if (r >= 0)
		e->ceiling = ceiling;
	return r;
}

int events_new(const char *state_dir, size_t capacity, Events **ret, char **ret_error)
{
	_cleanup_free_ char *text = NULL;
	Events *e;
	int r;

	e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	pthread_mutex_init(&e->lock, NULL);
	e->capacity = capacity ?: 1;
	e->ring = calloc(e->capacity, sizeof(PackedEvent));
	if (!e->ring || asprintf(&e->path, "%s/revision", state_dir) < 0) {
		free(e->ring);
		free(e);
		return -ENOMEM;
	}
	r = read_full_file(e->path, 64, &text, NULL);
	if (r >= 0) {
		char *end;
		errno = 0;
		unsigned long long v = strtoull(text, &end, 10);
		if (errno || end == text || (*end && *end != '\n')) {
			r = error_set(ret_error, -EBADMSG,
				      "%s does not hold a revision; remove it only if every "
				      "watcher may resync",
				      e->path);
			events_free(e);
			return r;
		}
		e->revision = v;
	} else if (r != -ENOENT) {
		r = error_set(ret_error, r, "cannot read %s: %m", e->path);
		events_free(e);
		return r;
	}
	r = ceiling_store(e, e->revision + REVISION_BLOCK);
	if (r < 0) {
		r = error_set(ret_error, r, "cannot write %s: %m", e->path);
		events_free(e);
		return r;
	}
	*ret = e;
	return 0;
}

void events_free(Events *e)
{
	if (!e)
		return;
	for (size_t i = 0; i < e->n; i++)
		free(e->ring[(e->head + i) % e->capacity].data);
	while (e->watchers) {
		WatchEntry *w = e->watchers;
		e->watchers = w->next;
		free(w);
	}
	pthread_mutex_destroy(&e->lock);
	free(e->ring);
	free(e->path);
	free(e);
}

static uint64_t next_revision(Events *e)
{
	uint64_t rev = e->revision + 1;

	if (rev >= e->ceiling) {
		int r = ceiling_store(e, rev + REVISION_BLOCK);
		/* Not fatal for the change itself: the revision is still right in this run; only
		 * after a crash could a reused revision confuse a watcher, so say so loudly. */
		if (r < 0)
			log_error_errno(r,
					"cannot store the revision ceiling in %s: %m; revisions "
					"may repeat after a restart",
					e->path);
	}
	e->revision = rev;
	return rev;
}

uint64_t events_record(Events *e, const Ember__V1__Sandbox *sandbox, const char *removed_id)
{
	Ember__V1__SandboxEvent ev = EMBER__V1__SANDBOX_EVENT__INIT;
	Ember__V1__SandboxRemoved rm = EMBER__V1__SANDBOX_REMOVED__INIT;
	Google__Protobuf__Timestamp ts = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
	struct timespec now;
	uint64_t rev;

	/* A changed sandbox carries the time of its change: the event has the same. */
	if (sandbox && sandbox->update_time) {
		ts = *sandbox->update_time;
	} else {
		clock_gettime(CLOCK_REALTIME, &now);
		ts.seconds = now.tv_sec;
		ts.nanos = (int32_t)now.tv_nsec;
	}

	pthread_mutex_lock(&e->lock);
	rev = next_revision(e);
	ev.revision = rev;
	ev.time = &ts;
	if (sandbox) {
		/* The message's own revision is this event's (node.proto). */
		((Ember__V1__Sandbox *)sandbox)->revision = rev;
		((Ember__V1__Sandbox *)sandbox)->update_time = &ts;
		ev.event_case = EMBER__V1__SANDBOX_EVENT__EVENT_CHANGED;
		ev.changed = (Ember__V1__Sandbox *)sandbox;
	} else {
		rm.sandbox_id = (char *)removed_id;
		ev.event_case = EMBER__V1__SANDBOX_EVENT__EVENT_REMOVED;
		ev.removed = &rm;
	}
	size_t size = ember__v1__sandbox_event__get_packed_size(&ev);
	uint8_t *data = malloc(size ?: 1);
	if (data) {
		ember__v1__sandbox_event__pack(&ev, data);
		if (e->n == e->capacity) {
			free(e->ring[e->head].data);
			e->head = (e->head + 1) % e->capacity;
			e->n--;
		}
		e->ring[(e->head + e->n) % e->capacity] =
			(PackedEvent){.revision = rev, .data = data, .size = size};
		e->n++;
	} else {
		/* Without memory the event cannot be kept: drop what is retained, so that every
		 * watcher that has not seen it resyncs instead of missing it. */
		for (size_t i = 0; i < e->n; i++)
			free(e->ring[(e->head + i) % e->capacity].data);
		e->n = 0;
	}
	for (WatchEntry *w = e->watchers; w; w = w->next)
		rpc_call_wake(w->call);
	pthread_mutex_unlock(&e->lock);
	return rev;
}

uint64_t events_revision(Events *e)
{
	pthread_mutex_lock(&e->lock);
	uint64_t rev = e->revision;
	pthread_mutex_unlock(&e->lock);
	return rev;
}

int events_since(Events *e, uint64_t since, size_t max, PackedEvent **ret, size_t *ret_n)
{
	PackedEvent *out = NULL;
	size_t n = 0;
	int r = 1;

	pthread_mutex_lock(&e->lock);
	if (since > e->revision) {
		r = 0; /* from a node whose state was wiped, or a made-up revision */
	} else if (since < e->revision) {
		/* Within one run revisions are consecutive, and the ring starts empty after a
		 * restart (whose revisions continue above a gap). So everything after `since` is
		 * retained exactly when the oldest retained event is the one right after it, or
		 * older. */
		if (e->n == 0 || e->ring[e->head].revision > since + 1)
			r = 0;
		else {
			out = calloc(e->n < max ? e->n : max, sizeof(PackedEvent));
			if (!out) {
				pthread_mutex_unlock(&e->lock);
				return -ENOMEM;
			}
			for (size_t i = 0; i < e->n && n < max; i++) {
				PackedEvent *p = &e->ring[(e->head + i) % e->capacity];
				if (p->revision <= since)
					continue;
				out[n].data = malloc(p->size ?: 1);
				if (!out[n].data) {
					pthread_mutex_unlock(&e->lock);
					packed_events_free(out, n);
					return -ENOMEM;
				}
				memcpy(out[n].data, p->data, p->size);
				out[n].size = p->size;
				out[n].revision = p->revision;
				n++;
			}
		}
	}
	pthread_mutex_unlock(&e->lock);
	*ret = out;
	*ret_n = n;
	return r;
}

void packed_events_free(PackedEvent *ev, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(ev[i].data);
	free(ev);
}

int events_watch_add(Events *e, RpcCall *call)
{
	WatchEntry *w = calloc(1, sizeof(*w));

	if (!w)
		return -ENOMEM;
	w->call = call;
	pthread_mutex_lock(&e->lock);
	w->next = e->watchers;
	e->watchers = w;
	pthread_mutex_unlock(&e->lock);
	return 0;
}

void events_watch_remove(Events *e, RpcCall *call)
{
	pthread_mutex_lock(&e->lock);
	for (WatchEntry **p = &e->watchers; *p; p = &(*p)->next)
		if ((*p)->call == call) {
			WatchEntry *w = *p;
			*p = w->next;
			free(w);
			break;
		}
	pthread_mutex_unlock(&e->lock);
}
