/* SPDX-License-Identifier: Apache-2.0 */
/*
 * gRPC core server: one completion queue, one poller thread, handlers on a worker pool.
 *
 * Every completion-queue tag is a `Tag` whose callback runs on the poller. Callbacks never block:
 * they update state under the call's mutex, start the next batch if one is due, and signal the
 * worker that may be waiting. Batches on one call are serialized per direction (one send batch
 * and one receive batch at most in flight, grpc-core.md trap 4/5), which is what the per-call
 * send queue is for.
 *
 * Call lifetime is a reference count: one for the handler (or the immediate reply), one per
 * batch in flight. The grpc_call is unref'ed when the last one goes.
 */
#include <errno.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/log.h>
#include <grpc/support/time.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/fileio.h"
#include "common/log.h"
#include "common/macro.h"
#include "metrics.h"
#include "pbjson.h"
#include "rpc-internal.h"

#define REQUESTS_PER_METHOD    4
#define WORKER_IDLE_EXIT_SEC   30
#define STREAM_MAX_QUEUED_MSGS 1024
#define STREAM_RECV_WINDOW     (1 << 20)
/* Stream handlers wait most of their life: a small stack keeps a thousand of them cheap in
 * address space. ASan's redzones need the default. */
#if defined(__SANITIZE_ADDRESS__)
#define STREAM_THREAD_STACK 0
#else
#define STREAM_THREAD_STACK (512u << 10)
#endif

typedef struct Tag Tag;
struct Tag {
	void (*done)(Tag *tag, bool ok);
};

typedef struct RpcMethod {
	RpcServer *server;
	char *path; /* "/ember.v1.Node/GetNode" */
	const ProtobufCMessageDescriptor *input, *output;
	bool client_streaming, server_streaming;
	RpcHandler handler; /* NULL: UNIMPLEMENTED */
	void *userdata;
	void *registered;
	/* How calls ended and how long they took, from accept to status (/metrics). */
	_Atomic uint64_t handled[_RPC_CODE_MAX];
	Histogram seconds[_RPC_CODE_MAX];
} RpcMethod;

typedef struct RpcService {
	char *name;
	RpcMethod *methods;
	size_t n_methods;
} RpcService;

/* One outstanding "give me the next call" request, reused after each call it yields. */
typedef struct RequestSlot {
	Tag tag;
	RpcServer *server;
	RpcMethod *method; /* NULL: the catch-all for unregistered methods */
	grpc_call *call;
	gpr_timespec deadline;
	grpc_metadata_array metadata;
	grpc_byte_buffer *payload;
	grpc_call_details details;
	struct RequestSlot *next; /* all slots, for freeing */
} RequestSlot;

typedef struct SendItem {
	grpc_byte_buffer *buf;
	size_t size;
	struct SendItem *next;
} SendItem;

struct RpcCall {
	RpcServer *server;
	RpcMethod *method; /* NULL for unregistered methods */
	char *path;
	grpc_call *call;
	gpr_timespec deadline; /* GPR_CLOCK_MONOTONIC */
	uint64_t start_usec;
	ProtobufCMessage *request;
	atomic_int ref;

	pthread_mutex_t mu;
	pthread_cond_t cond;

	Tag close_tag;
	int cancelled_flag; /* written by gRPC core for RECV_CLOSE_ON_SERVER */
	bool dead;          /* cancelled, deadline passed, peer gone, or a send failed */

	Tag send_tag;
	SendItem *queue_head, *queue_tail;
	size_t queued_bytes, queued_msgs; /* including the one in flight */
	SendItem *in_flight;
	bool send_in_flight;
	bool initial_metadata_sent;
	bool reply_sent; /* unary: one reply only */
	bool status_queued, status_in_flight, status_sent;
	RpcCode status;
	char *status_message;
	grpc_slice status_slice;

	Tag recv_tag;
	grpc_byte_buffer *recv_buf;
	bool recv_in_flight, recv_ok, recv_eof;
	bool recv_ready; /* a receive completed and its result was not taken yet */

	int notify_fd;     /* eventfd for rpc_call_notify_fd(), -1 until asked for */
	bool send_refused; /* rpc_call_send_nowait() said -EAGAIN: room is news to it */

	bool end_on_drain; /* rpc_call_end_on_drain() */

	unsigned wake_gen;   /* bumped by every wake */
	unsigned wake_seen;  /* wake_gen when rpc_call_wait() last returned */
	char *error_message; /* from rpc_call_error() */

	RpcCall *prev, *next; /* server->calls */
	RpcCall *job_next;    /* pool queue */
};

/* A pool of worker threads: grows on demand up to `max`, idle threads retire. There are two:
 * unary calls are short and many; streams (Exec, watches, reflection) can stay open for hours
 * and must never take the threads the unary calls need, so they have a pool and a limit of
 * their own. */
typedef struct RpcPool {
	RpcServer *server;
	const char *what;       /* "calls", "streams": for messages */
	const char *config_key; /* the setting that sets max */
	unsigned max;
	size_t stack_size;              /* 0: the default */
	pthread_cond_t cond;            /* work for the workers, or pool stopping */
	RpcCall *jobs_head, *jobs_tail; /* all under RpcServer.mu */
	unsigned n_threads, n_idle, n_active;
	unsigned n_queued; /* jobs no worker has taken yet */
	pthread_t *exited; /* exited workers awaiting pthread_join; room for max */
	size_t n_exited;
} RpcPool;

struct RpcServer {
	RpcServerOptions opts;
	grpc_server *server;
	grpc_completion_queue *cq;
	pthread_t poller;
	bool poller_running;
	bool started;
	_Atomic uint64_t heartbeat_usec;
	RpcDescIndex *desc;

	RpcService *services;
	size_t n_services;
	RequestSlot *slots;

	pthread_mutex_t mu;  /* guards everything below */
	pthread_cond_t cond; /* calls, handlers or threads finished; shutdown tag arrived */
	_Atomic RpcServerState state; /* read without the lock by rpc_call_wait() */
	bool shutdown_started, shutdown_done;
	Tag shutdown_tag;
	RpcCall *calls; /* every live call, for waking and ending them */

	RpcPool unary, streams;
	bool pool_stopping;

	char *unix_path;             /* the unix listener, which in-process calls go through */
	grpc_channel *local_channel; /* created by the first in-process call; under mu */
};

static const char *const code_names[_RPC_CODE_MAX] = {
	"OK",
	"CANCELLED",
	"UNKNOWN",
	"INVALID_ARGUMENT",
	"DEADLINE_EXCEEDED",
	"NOT_FOUND",
	"ALREADY_EXISTS",
	"PERMISSION_DENIED",
	"RESOURCE_EXHAUSTED",
	"FAILED_PRECONDITION",
	"ABORTED",
	"OUT_OF_RANGE",
	"UNIMPLEMENTED",
	"INTERNAL",
	"UNAVAILABLE",
	"DATA_LOSS",
	"UNAUTHENTICATED",
};

const char *rpc_code_to_string(RpcCode code)
{
	return (unsigned)code < _RPC_CODE_MAX ? code_names[code] : "INVALID";
}

static uint64_t now_usec(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000ULL + (uint64_t)ts.tv_nsec / 1000ULL;
}

static struct timespec abs_timeout(int64_t timeout_ms)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	ts.tv_sec += timeout_ms / 1000;
	ts.tv_nsec += (timeout_ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	return ts;
}

static void cond_init_monotonic(pthread_cond_t *c)
{
	pthread_condattr_t a;
	pthread_condattr_init(&a);
	pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
	pthread_cond_init(c, &a);
	pthread_condattr_destroy(&a);
}

/* ------------------------------------------------------------------------------------------ */
/* gRPC core's own log lines go through ours: errors stay visible, chatter goes to debug. */

static void grpc_log_to_ember(gpr_log_func_args *a)
{
	int level = a->severity == GPR_LOG_SEVERITY_ERROR ? LOG_WARNING : LOG_DEBUG;
	log_struct(level, 0, LOG_FIELDS({"GRPC_FILE", a->file}), "grpc: %s", a->message);
}

/* ------------------------------------------------------------------------------------------ */
/* calls */

/* Wakes the handler: whatever it waits for in this call may have changed. Caller holds c->mu. */
static void call_signal_locked(RpcCall *c)
{
	pthread_cond_broadcast(&c->cond);
	if (c->notify_fd >= 0)
		(void)eventfd_write(c->notify_fd, 1);
}

static void call_unref(RpcCall *c)
{
	RpcServer *s;

	if (atomic_fetch_sub(&c->ref, 1) != 1)
		return;

	s = c->server;
	pthread_mutex_lock(&s->mu);
	if (c->prev)
		c->prev->next = c->next;
	else
		s->calls = c->next;
	if (c->next)
		c->next->prev = c->prev;
	pthread_mutex_unlock(&s->mu);

	for (SendItem *i = c->queue_head, *n; i; i = n) {
		n = i->next;
		grpc_byte_buffer_destroy(i->buf);
		free(i);
	}
	if (c->recv_buf)
		grpc_byte_buffer_destroy(c->recv_buf);
	if (c->request)
		protobuf_c_message_free_unpacked(c->request, NULL);
	grpc_slice_unref(c->status_slice);
	grpc_call_unref(c->call);
	pthread_mutex_destroy(&c->mu);
	pthread_cond_destroy(&c->cond);
	free(c->status_message);
	free(c->error_message);
	free(c->path);
	safe_close(c->notify_fd);
	free(c);
}

static void call_ref(RpcCall *c)
{
	atomic_fetch_add(&c->ref, 1);
}

static void drop_queue_locked(RpcCall *c)
{
	for (SendItem *i = c->queue_head, *n; i; i = n) {
		n = i->next;
		c->queued_bytes -= i->size;
		c->queued_msgs--;
		grpc_byte_buffer_destroy(i->buf);
		free(i);
	}
	c->queue_head = c->queue_tail = NULL;
}

/* Marks the call dead and drops what is queued: nobody will read it. Caller holds c->mu. */
static void call_kill_locked(RpcCall *c)
{
	c->dead = true;
	drop_queue_locked(c);
	call_signal_locked(c);
}

static void on_send_done(Tag *tag, bool ok);

/* Starts the next send batch if none is in flight. Caller holds c->mu. */
static void call_pump_locked(RpcCall *c)
{
	grpc_op ops[3] = {};
	size_t n = 0;
	SendItem *item;
	bool with_status = false;

	if (c->send_in_flight || c->status_sent || c->status_in_flight)
		return;
	if (c->dead) {
		/* Nothing can reach the client any more; status is moot (RECV_CLOSE has fired or
		 * will fire with cancelled set). */
		return;
	}
	/* A unary reply waits for the status so that both leave in one batch. */
	if (c->method && !c->method->server_streaming && !c->status_queued)
		return;

	item = c->queue_head;
	if (!item && !c->status_queued)
		return;

	if (!c->initial_metadata_sent) {
		ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
		n++;
	}
	if (item) {
		ops[n].op = GRPC_OP_SEND_MESSAGE;
		ops[n].data.send_message.send_message = item->buf;
		n++;
		c->queue_head = item->next;
		if (!c->queue_head)
			c->queue_tail = NULL;
	}
	if (c->status_queued && !c->queue_head) {
		c->status_slice = grpc_slice_from_copied_string(c->status_message ?: "");
		ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
		ops[n].data.send_status_from_server.status = (grpc_status_code)c->status;
		ops[n].data.send_status_from_server.status_details =
			c->status_message ? &c->status_slice : NULL;
		n++;
		with_status = true;
	}

	call_ref(c);
	c->in_flight = item;
	c->send_in_flight = true;
	c->status_in_flight = with_status;
	grpc_call_error e = grpc_call_start_batch(c->call, ops, n, &c->send_tag, NULL);
	if (e != GRPC_CALL_OK) {
		/* No tag will arrive for this batch (grpc-core.md): undo by hand. */
		log_debug("%s: send batch refused: %d", c->path, (int)e);
		c->send_in_flight = c->status_in_flight = false;
		c->in_flight = NULL;
		if (item) {
			c->queued_bytes -= item->size;
			c->queued_msgs--;
			grpc_byte_buffer_destroy(item->buf);
			free(item);
		}
		call_kill_locked(c);
		atomic_fetch_sub(&c->ref, 1); /* cannot be the last: the caller holds one */
		return;
	}
	c->initial_metadata_sent = true;
}

static void on_send_done(Tag *tag, bool ok)
{
	RpcCall *c = (RpcCall *)((char *)tag - offsetof(RpcCall, send_tag));

	pthread_mutex_lock(&c->mu);
	if (c->in_flight) {
		c->queued_bytes -= c->in_flight->size;
		c->queued_msgs--;
		grpc_byte_buffer_destroy(c->in_flight->buf);
		free(c->in_flight);
		c->in_flight = NULL;
	}
	c->send_in_flight = false;
	if (c->status_in_flight) {
		c->status_in_flight = false;
		c->status_sent = true;
	}
	if (!ok)
		call_kill_locked(c);
	else
		call_pump_locked(c);
	/* Blocked senders wait on the condition; a poll-loop handler is woken through its
	 * notify fd only when it was refused room (or the call died): a send that simply
	 * completed is nothing it waits for, and waking it for each would cost a context
	 * switch per message. */
	pthread_cond_broadcast(&c->cond);
	if (c->notify_fd >= 0 && c->send_refused) {
		c->send_refused = false;
		(void)eventfd_write(c->notify_fd, 1);
	}
	pthread_mutex_unlock(&c->mu);
	call_unref(c);
}

static void on_close(Tag *tag, bool ok)
{
	RpcCall *c = (RpcCall *)((char *)tag - offsetof(RpcCall, close_tag));

	pthread_mutex_lock(&c->mu);
	if (!ok || c->cancelled_flag) {
		log_debug("%s: cancelled (deadline, client cancel or disconnect)", c->path);
		call_kill_locked(c);
	}
	call_signal_locked(c);
	pthread_mutex_unlock(&c->mu);
	call_unref(c);
}

static void on_recv_done(Tag *tag, bool ok)
{
	RpcCall *c = (RpcCall *)((char *)tag - offsetof(RpcCall, recv_tag));

	pthread_mutex_lock(&c->mu);
	c->recv_in_flight = false;
	c->recv_ready = true;
	c->recv_ok = ok;
	call_signal_locked(c);
	pthread_mutex_unlock(&c->mu);
	call_unref(c);
}

/* Queues the final status and lets the pump send it after what is queued. */
static void call_finish(RpcCall *c, RpcCode code, const char *message)
{
	pthread_mutex_lock(&c->mu);
	if (!c->status_queued && c->method && (unsigned)code < _RPC_CODE_MAX) {
		atomic_fetch_add_explicit(&c->method->handled[code], 1, memory_order_relaxed);
		metrics_histogram_observe(&c->method->seconds[code], now_usec() - c->start_usec);
	}
	if (!c->status_queued) {
		/* A failed unary call sends its status alone, not a half-built reply. */
		if (code != RPC_OK && c->method && !c->method->server_streaming)
			drop_queue_locked(c);
		c->status_queued = true;
		c->status = code;
		c->status_message = message ? strdup(message) : NULL;
		call_pump_locked(c);
	}
	pthread_mutex_unlock(&c->mu);
}

static RpcCall *call_new(RpcServer *s, RpcMethod *m, const char *path, grpc_call *gc,
			 gpr_timespec deadline)
{
	RpcCall *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	c->path = strdup(path);
	if (!c->path) {
		free(c);
		return NULL;
	}
	c->server = s;
	c->method = m;
	c->call = gc;
	c->deadline = gpr_convert_clock_type(deadline, GPR_CLOCK_MONOTONIC);
	c->start_usec = now_usec();
	c->status_slice = grpc_empty_slice();
	c->notify_fd = -1;
	atomic_init(&c->ref, 1);
	pthread_mutex_init(&c->mu, NULL);
	cond_init_monotonic(&c->cond);
	c->close_tag.done = on_close;
	c->send_tag.done = on_send_done;
	c->recv_tag.done = on_recv_done;

	pthread_mutex_lock(&s->mu);
	c->next = s->calls;
	if (s->calls)
		s->calls->prev = c;
	s->calls = c;
	pthread_mutex_unlock(&s->mu);
	return c;
}

/* RECV_CLOSE_ON_SERVER in its own batch right away: it is how cancellation, deadlines and
 * disconnects become visible (grpc-core.md). */
static int call_watch_close(RpcCall *c)
{
	grpc_op close_op = {.op = GRPC_OP_RECV_CLOSE_ON_SERVER};

	close_op.data.recv_close_on_server.cancelled = &c->cancelled_flag;
	call_ref(c);
	if (grpc_call_start_batch(c->call, &close_op, 1, &c->close_tag, NULL) != GRPC_CALL_OK) {
		atomic_fetch_sub(&c->ref, 1);
		pthread_mutex_lock(&c->mu);
		call_kill_locked(c);
		pthread_mutex_unlock(&c->mu);
		return -EIO;
	}
	return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* worker pools */

static void reap_exited_locked(RpcPool *p)
{
	for (size_t i = 0; i < p->n_exited; i++)
		pthread_join(p->exited[i], NULL);
	p->n_exited = 0;
}

static void run_call(RpcCall *c)
{
	RpcMethod *m = c->method;
	RpcCode code;

	code = m->handler(c, c->request, m->userdata);
	if (code == RPC_OK && !m->server_streaming) {
		pthread_mutex_lock(&c->mu);
		bool replied = c->reply_sent, dead = c->dead;
		pthread_mutex_unlock(&c->mu);
		if (!replied && !dead) {
			log_error("%s: handler returned OK without a reply", c->path);
			code = rpc_call_error(c, RPC_INTERNAL, "handler returned no reply");
		}
	}
	if (code != RPC_OK)
		log_debug("%s: %s: %s", c->path, rpc_code_to_string(code),
			  c->error_message ?: "(no message)");
	call_finish(c, code,
		    code == RPC_OK ? NULL : (c->error_message ?: rpc_code_to_string(code)));
	call_unref(c);
}

/* Worker accounting, per pool, all under RpcServer.mu:
 *   n_threads  workers that exist (started or starting), never above max
 *   n_idle     workers free to take a job, including ones created but not yet running
 *   n_queued   jobs not yet taken; a job "claims" one idle worker
 *   n_active   calls handed to the pool and not finished (queued + running)
 * A job needs a new thread when every idle worker is already claimed (n_queued >= n_idle). */
static void *worker_main(void *arg)
{
	RpcPool *p = arg;
	RpcServer *s = p->server;

	pthread_mutex_lock(&s->mu);
	for (;;) {
		RpcCall *c = p->jobs_head;
		if (c) {
			p->jobs_head = c->job_next;
			if (!p->jobs_head)
				p->jobs_tail = NULL;
			p->n_queued--;
			p->n_idle--;
			pthread_mutex_unlock(&s->mu);
			run_call(c);
			pthread_mutex_lock(&s->mu);
			p->n_idle++;
			p->n_active--;
			pthread_cond_broadcast(&s->cond); /* drain waiters */
			continue;
		}
		if (s->pool_stopping)
			break;
		struct timespec ts = abs_timeout((int64_t)WORKER_IDLE_EXIT_SEC * 1000);
		int r = pthread_cond_timedwait(&p->cond, &s->mu, &ts);
		if (r == ETIMEDOUT && !p->jobs_head && p->n_idle > 1)
			break;
	}
	/* Retire: the next pool operation (or free) joins us. `exited` has room for max
	 * threads, and at most that many exist between two reaps. */
	p->n_idle--;
	p->exited[p->n_exited++] = pthread_self();
	p->n_threads--;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->mu);
	return NULL;
}

/* Hands a call to a worker; -EBUSY when the pool's limit of calls is already running, -EAGAIN
 * when no worker is free and no thread can be started. */
static int pool_submit(RpcPool *p, RpcCall *c)
{
	RpcServer *s = p->server;
	int r = 0;

	pthread_mutex_lock(&s->mu);
	reap_exited_locked(p);
	if (p->n_active >= p->max || s->pool_stopping) {
		r = -EBUSY;
		goto out;
	}
	/* Idle workers already claimed by queued jobs do not count: otherwise a burst of long
	 * calls (streams) would queue behind each other while the pool believes it has spare
	 * threads. n_active < max bounds n_threads by max as well. */
	if (p->n_queued >= p->n_idle) {
		pthread_attr_t attr;
		pthread_t t;
		int e;

		pthread_attr_init(&attr);
		if (p->stack_size)
			(void)pthread_attr_setstacksize(&attr, p->stack_size);
		e = pthread_create(&t, &attr, worker_main, p);
		pthread_attr_destroy(&attr);
		if (e != 0) {
			/* Queueing would make the call wait behind calls that may never end. */
			r = -EAGAIN;
			goto out;
		}
		p->n_threads++;
		p->n_idle++;
	}
	c->job_next = NULL;
	if (p->jobs_tail)
		p->jobs_tail->job_next = c;
	else
		p->jobs_head = c;
	p->jobs_tail = c;
	p->n_queued++;
	p->n_active++;
	pthread_cond_signal(&p->cond);
out:
	pthread_mutex_unlock(&s->mu);
	return r;
}

static int pool_init(RpcPool *p, RpcServer *s, const char *what, const char *config_key,
		     unsigned max, size_t stack_size)
{
	*p = (RpcPool){
		.what = what, .config_key = config_key, .max = max, .stack_size = stack_size};
	p->exited = calloc(max, sizeof(pthread_t));
	if (!p->exited)
		return -ENOMEM;
	cond_init_monotonic(&p->cond);
	p->server = s; /* set last: pool_done() knows an initialized pool by it */
	return 0;
}

static void pool_done(RpcPool *p)
{
	if (!p->server)
		return;
	free(p->exited);
	pthread_cond_destroy(&p->cond);
}

/* ------------------------------------------------------------------------------------------ */
/* accepting calls */

static void on_request(Tag *tag, bool ok);

static int slot_arm(RequestSlot *slot)
{
	RpcServer *s = slot->server;
	grpc_call_error e;

	slot->call = NULL;
	slot->payload = NULL;
	grpc_metadata_array_init(&slot->metadata);
	if (slot->method) {
		bool with_payload = !slot->method->client_streaming;
		e = grpc_server_request_registered_call(
			s->server, slot->method->registered, &slot->call, &slot->deadline,
			&slot->metadata, with_payload ? &slot->payload : NULL, s->cq, s->cq,
			&slot->tag);
	} else {
		grpc_call_details_init(&slot->details);
		e = grpc_server_request_call(s->server, &slot->call, &slot->details,
					     &slot->metadata, s->cq, s->cq, &slot->tag);
	}
	if (e != GRPC_CALL_OK) {
		grpc_metadata_array_destroy(&slot->metadata);
		if (!slot->method)
			grpc_call_details_destroy(&slot->details);
		return -EIO;
	}
	return 0;
}

/* Answers a call that will never reach a handler (unknown method, overload, bad request). */
static void reply_now(RpcServer *s, RpcMethod *m, const char *path, grpc_call *gc,
		      gpr_timespec deadline, RpcCode code, const char *message)
{
	RpcCall *c = call_new(s, m, path, gc, deadline);
	if (!c) {
		grpc_call_cancel_with_status(gc, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory",
					     NULL);
		grpc_call_unref(gc);
		return;
	}
	(void)call_watch_close(c);
	call_finish(c, code, message);
	call_unref(c);
}

/* Unpacks the request that came with the call; returns NULL or what is wrong with it. */
/* NULL when every string of msg is UTF-8, as proto3 requires (protobuf-c's unpack does not
 * check): else why not, in `why`. Handlers, the log and JSON then only see valid text. */
static const char *strings_unchecked(const ProtobufCMessage *msg, char *why, size_t why_size)
{
	char field[128];

	if (pbjson_check_utf8(msg, field, sizeof(field)) >= 0)
		return NULL;
	snprintf(why, why_size, "request field %s: not UTF-8 (proto3 strings must be)",
		 field[0] ? field : "?");
	return why;
}

static const char *request_unpack(RpcCall *c, grpc_byte_buffer *payload, char *why, size_t why_size)
{
	grpc_byte_buffer_reader reader;
	grpc_slice slice;

	/* NULL payload: the client half-closed without sending the request. */
	if (!payload)
		return "no request message";
	if (!grpc_byte_buffer_reader_init(&reader, payload)) {
		grpc_byte_buffer_destroy(payload);
		return "request cannot be decompressed";
	}
	slice = grpc_byte_buffer_reader_readall(&reader);
	grpc_byte_buffer_reader_destroy(&reader);
	grpc_byte_buffer_destroy(payload);
	c->request = protobuf_c_message_unpack(c->method->input, NULL, GRPC_SLICE_LENGTH(slice),
					       GRPC_SLICE_START_PTR(slice));
	grpc_slice_unref(slice);
	if (!c->request)
		return "request does not parse as its protobuf message type";
	return strings_unchecked(c->request, why, why_size);
}

static void accept_call(RequestSlot *slot)
{
	RpcServer *s = slot->server;
	RpcMethod *m = slot->method;
	grpc_call *gc = TAKE_PTR(slot->call);
	_cleanup_free_ char *msg = NULL;
	RpcCall *c;

	if (!m) {
		char *method = grpc_slice_to_c_string(slot->details.method);
		log_debug("call to unknown method %s", method);
		if (asprintf(&msg, "unknown method %s", method) < 0)
			msg = NULL;
		reply_now(s, NULL, method, gc, slot->details.deadline, RPC_UNIMPLEMENTED,
			  msg ?: "unknown method");
		gpr_free(method);
		return;
	}

	c = call_new(s, m, m->path, gc, slot->deadline);
	if (!c) {
		grpc_call_cancel_with_status(gc, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory",
					     NULL);
		grpc_call_unref(gc);
		if (slot->payload)
			grpc_byte_buffer_destroy(slot->payload);
		return;
	}

	if (!m->client_streaming) {
		char why[256];
		const char *bad = request_unpack(c, TAKE_PTR(slot->payload), why, sizeof(why));
		if (bad) {
			(void)call_watch_close(c);
			call_finish(c, RPC_INVALID_ARGUMENT, bad);
			call_unref(c);
			return;
		}
	}

	if (call_watch_close(c) < 0) {
		call_unref(c);
		return;
	}

	if (!m->handler) {
		if (asprintf(&msg, "%s is not implemented in emberd %s yet", m->path,
			     s->opts.version ?: "") < 0)
			msg = NULL;
		call_finish(c, RPC_UNIMPLEMENTED, msg ?: "not implemented");
		call_unref(c);
		return;
	}

	RpcPool *p = m->client_streaming || m->server_streaming ? &s->streams : &s->unary;
	int r = pool_submit(p, c);
	if (r < 0) {
		if (r == -EBUSY &&
		    asprintf(&msg, "emberd is already handling %u %s (api.%s); retry later", p->max,
			     p->what, p->config_key) < 0)
			msg = NULL;
		call_finish(c, r == -EBUSY ? RPC_RESOURCE_EXHAUSTED : RPC_UNAVAILABLE,
			    msg ?: "cannot start a worker thread");
		call_unref(c);
	}
	/* else: the job owns our reference now */
}

static void on_request(Tag *tag, bool ok)
{
	RequestSlot *slot = (RequestSlot *)tag;

	if (!ok) {
		/* Server shutting down: the slot is not re-armed. */
		grpc_metadata_array_destroy(&slot->metadata);
		if (!slot->method)
			grpc_call_details_destroy(&slot->details);
		return;
	}
	accept_call(slot);
	grpc_metadata_array_destroy(&slot->metadata);
	if (!slot->method)
		grpc_call_details_destroy(&slot->details);
	/* Re-arm at once so that concurrency is not limited by the number of slots. */
	if (slot_arm(slot) < 0)
		log_debug("cannot re-arm request slot (server shutting down?)");
}

/* ------------------------------------------------------------------------------------------ */
/* poller */

static void *poller_main(void *p)
{
	RpcServer *s = p;

	for (;;) {
		gpr_timespec dl = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
					       gpr_time_from_millis(1000, GPR_TIMESPAN));
		grpc_event ev = grpc_completion_queue_next(s->cq, dl, NULL);
		atomic_store(&s->heartbeat_usec, now_usec());
		if (ev.type == GRPC_QUEUE_SHUTDOWN)
			break;
		if (ev.type == GRPC_OP_COMPLETE)
			((Tag *)ev.tag)->done(ev.tag, ev.success);
	}
	return NULL;
}

static void on_shutdown(Tag *tag, bool ok)
{
	RpcServer *s = (RpcServer *)((char *)tag - offsetof(RpcServer, shutdown_tag));
	(void)ok;
	pthread_mutex_lock(&s->mu);
	s->shutdown_done = true;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->mu);
}

/* ------------------------------------------------------------------------------------------ */
/* public API */

static pthread_once_t grpc_log_once = PTHREAD_ONCE_INIT;
static void grpc_log_setup(void)
{
	gpr_set_log_function(grpc_log_to_ember);
	gpr_set_log_verbosity(GPR_LOG_SEVERITY_INFO);
}

int rpc_server_new(const RpcServerOptions *opts, RpcServer **ret)
{
	RpcServer *s;
	int r;

	pthread_once(&grpc_log_once, grpc_log_setup);
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->opts = *opts;
	if (s->opts.max_concurrent_calls == 0)
		s->opts.max_concurrent_calls = 256;
	if (s->opts.max_concurrent_streams == 0)
		s->opts.max_concurrent_streams = 1024;
	if (s->opts.stream_high_water_bytes == 0)
		s->opts.stream_high_water_bytes = 1 << 20;
	if (pool_init(&s->unary, s, "calls", "max_concurrent_calls", s->opts.max_concurrent_calls,
		      0) < 0 ||
	    pool_init(&s->streams, s, "streams", "max_concurrent_streams",
		      s->opts.max_concurrent_streams, STREAM_THREAD_STACK) < 0) {
		pool_done(&s->unary);
		pool_done(&s->streams);
		free(s);
		return -ENOMEM;
	}
	pthread_mutex_init(&s->mu, NULL);
	cond_init_monotonic(&s->cond);
	atomic_store(&s->state, RPC_SERVER_STARTING);
	s->shutdown_tag.done = on_shutdown;
	atomic_store(&s->heartbeat_usec, now_usec());

	r = rpc_desc_index_new(opts->descriptor_set, opts->descriptor_set_size, &s->desc);
	if (r < 0) {
		pthread_mutex_destroy(&s->mu);
		pthread_cond_destroy(&s->cond);
		pool_done(&s->unary);
		pool_done(&s->streams);
		free(s);
		return r;
	}

	grpc_init();

	int max_msg =
		s->opts.max_message_bytes > INT_MAX ? INT_MAX : (int)s->opts.max_message_bytes;
#define INT_ARG(k, v) {.type = GRPC_ARG_INTEGER, .key = (char *)(k), .value.integer = (v)}
	grpc_arg args[] = {
		INT_ARG(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, max_msg),
		INT_ARG(GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, max_msg),
		/* A second daemon must not silently share the port (grpc-core.md trap 2). */
		INT_ARG(GRPC_ARG_ALLOW_REUSEPORT, 0),
		/* Server pings notice dead schedulers (half-open TCP) long before the 2 h
		 * default; they go on without calls and without data. */
		INT_ARG(GRPC_ARG_KEEPALIVE_TIME_MS, (int)s->opts.keepalive_time_ms),
		INT_ARG(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, (int)s->opts.keepalive_timeout_ms),
		INT_ARG(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1),
		INT_ARG(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0),
		/* Clients may keep channels warm with pings this often without being sent
		 * GOAWAY too_many_pings (trap 7). */
		INT_ARG(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
			(int)s->opts.min_ping_interval_ms),
		/* What a client may send on a stream before emberd reads it is what emberd
		 * buffers for that stream. gRPC's BDP probing grows that window to many MiB per
		 * stream (8 MiB measured with a process that did not read its stdin); a fixed
		 * window keeps it at STREAM_RECV_WINDOW, which still fills a local link. */
		INT_ARG(GRPC_ARG_HTTP2_BDP_PROBE, 0),
		INT_ARG(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, STREAM_RECV_WINDOW),
	};
#undef INT_ARG
	grpc_channel_args cargs = {.num_args = ELEMENTSOF(args), .args = args};

	s->cq = grpc_completion_queue_create_for_next(NULL);
	s->server = grpc_server_create(&cargs, NULL);
	if (!s->cq || !s->server) {
		rpc_server_free(s);
		return -ENOMEM;
	}
	grpc_server_register_completion_queue(s->server, s->cq, NULL);

	r = rpc_health_register(s);
	if (r >= 0)
		r = rpc_reflection_register(s);
	if (r < 0) {
		rpc_server_free(s);
		return r;
	}
	*ret = s;
	return 0;
}

int rpc_server_add_service(RpcServer *s, const ProtobufCServiceDescriptor *service,
			   const RpcMethodHandler *handlers, size_t n_handlers, void *userdata)
{
	RpcService *svc;
	RpcService *n;

	if (s->started)
		return -EBUSY;
	n = reallocarray(s->services, s->n_services + 1, sizeof(*n));
	if (!n)
		return -ENOMEM;
	s->services = n;
	svc = &s->services[s->n_services];
	*svc = (RpcService){};
	svc->name = strdup(service->name);
	svc->methods = calloc(service->n_methods, sizeof(RpcMethod));
	if (!svc->name || !svc->methods) {
		free(svc->name);
		free(svc->methods);
		return -ENOMEM;
	}
	s->n_services++;

	for (unsigned i = 0; i < service->n_methods; i++) {
		const ProtobufCMethodDescriptor *md = &service->methods[i];
		const RpcDescMethod *dm = rpc_desc_find_method(s->desc, service->name, md->name);
		RpcMethod *m = &svc->methods[svc->n_methods];

		/* Every method must be in the descriptor set: it is where streaming kinds and
		 * reflection come from. A mismatch is a build error, not a runtime surprise. */
		if (!dm)
			return log_debug_errno(ENOENT, "%s.%s missing from the descriptor set",
					       service->name, md->name);
		m->server = s;
		if (asprintf(&m->path, "/%s/%s", service->name, md->name) < 0)
			return -ENOMEM;
		svc->n_methods++;
		m->input = md->input;
		m->output = md->output;
		m->client_streaming = dm->client_streaming;
		m->server_streaming = dm->server_streaming;
		m->userdata = userdata;
		for (size_t j = 0; j < n_handlers; j++)
			if (strcmp(handlers[j].name, md->name) == 0)
				m->handler = handlers[j].handler;
		m->registered = grpc_server_register_method(
			s->server, m->path, NULL,
			m->client_streaming ? GRPC_SRM_PAYLOAD_NONE
					    : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER,
			0);
		if (!m->registered)
			return -EEXIST;
	}
	for (size_t j = 0; j < n_handlers; j++) {
		bool found = false;
		for (size_t i = 0; i < svc->n_methods; i++)
			found = found || strcmp(strrchr(svc->methods[i].path, '/') + 1,
						handlers[j].name) == 0;
		if (!found)
			return log_debug_errno(ENOENT, "handler for unknown method %s.%s",
					       service->name, handlers[j].name);
	}
	return 0;
}

int rpc_server_listen_unix(RpcServer *s, const char *path, mode_t mode)
{
	_cleanup_free_ char *addr = NULL;
	grpc_server_credentials *creds;
	mode_t old;
	int port;

	if (asprintf(&addr, "unix:%s", path) < 0)
		return -ENOMEM;
	creds = grpc_insecure_server_credentials_create();
	/* gRPC binds here; the umask keeps the socket from ever being wider than `mode`. The
	 * umask is process-wide, but nothing else creates files while we start up. */
	old = umask((mode_t)~mode & 0777);
	port = grpc_server_add_http2_port(s->server, addr, creds);
	umask(old);
	grpc_server_credentials_release(creds);
	if (port == 0)
		return -EADDRNOTAVAIL;
	if (chmod(path, mode) < 0)
		return -errno;
	free(s->unix_path);
	s->unix_path = strdup(path);
	return s->unix_path ? 0 : -ENOMEM;
}

int rpc_server_listen_tcp(RpcServer *s, const char *addr, const RpcTlsFiles *tls)
{
	grpc_server_credentials *creds;
	int port;

	if (tls) {
		_cleanup_free_ char *cert = NULL, *key = NULL, *ca = NULL;
		int r;

		if ((r = read_full_file(tls->cert_file, 1 << 20, &cert, NULL)) < 0 ||
		    (r = read_full_file(tls->key_file, 1 << 20, &key, NULL)) < 0 ||
		    (r = read_full_file(tls->client_ca_file, 1 << 20, &ca, NULL)) < 0)
			return r;
		grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
		creds = grpc_ssl_server_credentials_create_ex(
			ca, &pair, 1, GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY,
			NULL);
		if (!creds)
			return -EINVAL;
	} else {
		creds = grpc_insecure_server_credentials_create();
	}
	port = grpc_server_add_http2_port(s->server, addr, creds);
	grpc_server_credentials_release(creds);
	if (port == 0)
		return -EADDRNOTAVAIL;
	return port;
}

int rpc_server_start(RpcServer *s)
{
	int r;

	grpc_server_start(s->server);
	s->started = true;
	for (size_t i = 0; i <= s->n_services; i++) {
		size_t n = i < s->n_services ? s->services[i].n_methods : 1;
		for (size_t j = 0; j < n; j++)
			for (int k = 0; k < (i < s->n_services ? REQUESTS_PER_METHOD : 2); k++) {
				RequestSlot *slot = calloc(1, sizeof(*slot));
				if (!slot)
					return -ENOMEM;
				slot->tag.done = on_request;
				slot->server = s;
				slot->method =
					i < s->n_services ? &s->services[i].methods[j] : NULL;
				slot->next = s->slots;
				s->slots = slot;
				if ((r = slot_arm(slot)) < 0)
					return r;
			}
	}
	r = pthread_create(&s->poller, NULL, poller_main, s);
	if (r != 0)
		return -r;
	s->poller_running = true;
	return 0;
}

void rpc_server_set_state(RpcServer *s, RpcServerState state)
{
	atomic_store(&s->state, state);
	rpc_server_wake_all(s);
}

RpcServerState rpc_server_get_state(RpcServer *s)
{
	return atomic_load(&s->state);
}

void rpc_server_wake_all(RpcServer *s)
{
	pthread_mutex_lock(&s->mu);
	for (RpcCall *c = s->calls; c; c = c->next) {
		pthread_mutex_lock(&c->mu);
		c->wake_gen++;
		call_signal_locked(c);
		pthread_mutex_unlock(&c->mu);
	}
	pthread_mutex_unlock(&s->mu);
}

static void call_end_now(RpcCall *c)
{
	/* Sends the status and makes every pending batch of the call complete: a handler
	 * blocked in rpc_call_recv() returns -ECANCELED. Thread-safe in gRPC core. */
	grpc_call_cancel_with_status(c->call, GRPC_STATUS_UNAVAILABLE, "emberd is shutting down",
				     NULL);
}

static void end_marked_calls(RpcServer *s)
{
	pthread_mutex_lock(&s->mu);
	for (RpcCall *c = s->calls; c; c = c->next) {
		pthread_mutex_lock(&c->mu);
		bool end = c->end_on_drain;
		pthread_mutex_unlock(&c->mu);
		if (end)
			call_end_now(c);
	}
	pthread_mutex_unlock(&s->mu);
}

void rpc_server_drain_begin(RpcServer *s)
{
	pthread_mutex_lock(&s->mu);
	bool first = !s->shutdown_started;
	s->shutdown_started = true;
	pthread_mutex_unlock(&s->mu);
	if (!first)
		return;
	rpc_server_set_state(s, RPC_SERVER_DRAINING);
	end_marked_calls(s);
	/* Also when never started: gRPC refuses to destroy a server with listeners otherwise. */
	grpc_server_shutdown_and_notify(s->server, s->cq, &s->shutdown_tag);
}

int rpc_server_drain_wait(RpcServer *s, int64_t timeout_ms)
{
	struct timespec ts = abs_timeout(timeout_ms < 0 ? 0 : timeout_ms);
	int r = 0;

	pthread_mutex_lock(&s->mu);
	/* Done when gRPC has seen every call finish and every handler has returned. */
	while (!s->shutdown_done || s->unary.n_active > 0 || s->streams.n_active > 0)
		if (pthread_cond_timedwait(&s->cond, &s->mu, &ts) == ETIMEDOUT) {
			r = -ETIMEDOUT;
			break;
		}
	pthread_mutex_unlock(&s->mu);
	return r;
}

void rpc_server_cancel_all(RpcServer *s)
{
	grpc_server_cancel_all_calls(s->server);
	rpc_server_wake_all(s);
}

int rpc_server_shutdown(RpcServer *s, int64_t grace_ms, const sigset_t *interrupt)
{
	uint64_t deadline = now_usec() + (uint64_t)(grace_ms > 0 ? grace_ms : 0) * 1000ULL;
	bool idle_closed = false;
	int r;

	rpc_server_drain_begin(s);
	for (;;) {
		if (rpc_server_drain_wait(s, 100) == 0)
			return 0;
		/* Every call is done and gRPC still waits: for connections that stay open, which
		 * only their clients close after the GOAWAY (an idle scheduler's channel kept
		 * every stop 5 s long). With no call left, cancelling closes them, and loses
		 * nothing. */
		if (!idle_closed) {
			pthread_mutex_lock(&s->mu);
			bool calls_done = !s->calls;
			pthread_mutex_unlock(&s->mu);
			if (calls_done) {
				grpc_server_cancel_all_calls(s->server);
				idle_closed = true;
			}
		}
		if (interrupt) {
			struct timespec zero = {};
			int sig = sigtimedwait(interrupt, NULL, &zero);
			if (sig > 0) {
				r = -EINTR;
				break;
			}
		}
		if (now_usec() >= deadline) {
			r = -ETIMEDOUT;
			break;
		}
	}
	rpc_server_cancel_all(s);
	if (rpc_server_drain_wait(s, 5000) < 0)
		return -EBUSY;
	return r;
}

uint64_t rpc_server_heartbeat_usec(RpcServer *s)
{
	return atomic_load(&s->heartbeat_usec);
}

void rpc_server_free(RpcServer *s)
{
	if (!s)
		return;

	if (s->server) {
		rpc_server_drain_begin(s);
		if (s->poller_running) {
			if (rpc_server_drain_wait(s, 0) < 0) {
				rpc_server_cancel_all(s);
				if (rpc_server_drain_wait(s, 5000) < 0) {
					/* A handler ignores cancellation. Freeing the server under
					 * it would crash; the process is on its way out, so leave
					 * everything as it is. */
					log_debug(
						"handlers still running after cancel: not freeing "
						"the server");
					return;
				}
			}
		} else {
			/* Never started (a listener failed): no poller, so collect the shutdown
			 * tag here. Only request slots and it can be queued. */
			while (!s->shutdown_done) {
				grpc_event ev = grpc_completion_queue_next(
					s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
				if (ev.type != GRPC_OP_COMPLETE)
					break;
				((Tag *)ev.tag)->done(ev.tag, ev.success);
			}
		}
	}

	/* No handler runs any more (n_active == 0): idle workers exit at once. */
	pthread_mutex_lock(&s->mu);
	s->pool_stopping = true;
	pthread_cond_broadcast(&s->unary.cond);
	pthread_cond_broadcast(&s->streams.cond);
	while (s->unary.n_threads > 0 || s->streams.n_threads > 0)
		pthread_cond_wait(&s->cond, &s->mu);
	reap_exited_locked(&s->unary);
	reap_exited_locked(&s->streams);
	pthread_mutex_unlock(&s->mu);

	if (s->local_channel)
		grpc_channel_destroy(s->local_channel);
	if (s->server)
		grpc_server_destroy(s->server);
	if (s->cq) {
		grpc_completion_queue_shutdown(s->cq);
		if (s->poller_running)
			pthread_join(s->poller, NULL);
		else
			while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME),
							  NULL)
				       .type != GRPC_QUEUE_SHUTDOWN)
				;
		grpc_completion_queue_destroy(s->cq);
	}
	for (RequestSlot *sl = s->slots, *n; sl; sl = n) {
		n = sl->next;
		free(sl);
	}
	for (size_t i = 0; i < s->n_services; i++) {
		for (size_t j = 0; j < s->services[i].n_methods; j++)
			free(s->services[i].methods[j].path);
		free(s->services[i].methods);
		free(s->services[i].name);
	}
	free(s->services);
	free(s->unix_path);
	pool_done(&s->unary);
	pool_done(&s->streams);
	rpc_desc_index_free(s->desc);
	pthread_mutex_destroy(&s->mu);
	pthread_cond_destroy(&s->cond);
	free(s);
	grpc_shutdown();
}

size_t rpc_server_n_services(RpcServer *s)
{
	return s->n_services;
}

const char *rpc_server_service_name(RpcServer *s, size_t i)
{
	return i < s->n_services ? s->services[i].name : NULL;
}

const RpcDescIndex *rpc_server_descriptors(RpcServer *s)
{
	return s->desc;
}

void rpc_server_write_metrics(RpcServer *s, FILE *f)
{
	static const char *const types[2][2] = {{"unary", "server_stream"},
						{"client_stream", "bidi_stream"}};

	/* The names and labels of go-grpc-prometheus, which dashboards already know. */
	metrics_header(f, "grpc_server_handled_total", "counter",
		       "RPCs completed on the server, by method and status code (calls over HTTP "
		       "included).");
	for (size_t i = 0; i < s->n_services; i++)
		for (size_t j = 0; j < s->services[i].n_methods; j++) {
			RpcMethod *m = &s->services[i].methods[j];
			for (int code = 0; code < _RPC_CODE_MAX; code++) {
				uint64_t n = atomic_load_explicit(&m->handled[code],
								  memory_order_relaxed);
				if (n == 0)
					continue;
				fprintf(f,
					"grpc_server_handled_total{grpc_service=\"%s\","
					"grpc_method=\"%s\",grpc_type=\"%s\",grpc_code=\"%s\"} "
					"%llu\n",
					s->services[i].name, strrchr(m->path, '/') + 1,
					types[m->client_streaming][m->server_streaming],
					rpc_code_to_string((RpcCode)code), (unsigned long long)n);
			}
		}
	metrics_header(f, "grpc_server_handling_seconds", "histogram",
		       "Time from accepting an RPC to its status, by method and status code.");
	for (size_t i = 0; i < s->n_services; i++)
		for (size_t j = 0; j < s->services[i].n_methods; j++) {
			RpcMethod *m = &s->services[i].methods[j];
			for (int code = 0; code < _RPC_CODE_MAX; code++) {
				char labels[256];
				if (metrics_histogram_count(&m->seconds[code]) == 0)
					continue;
				snprintf(labels, sizeof(labels),
					 "grpc_service=\"%s\",grpc_method=\"%s\",grpc_type=\"%s\","
					 "grpc_code=\"%s\"",
					 s->services[i].name, strrchr(m->path, '/') + 1,
					 types[m->client_streaming][m->server_streaming],
					 rpc_code_to_string((RpcCode)code));
				metrics_histogram(f, "grpc_server_handling_seconds", labels,
						  &m->seconds[code]);
			}
		}
}

int rpc_server_find_method(RpcServer *s, const char *path, RpcMethodInfo *ret)
{
	for (size_t i = 0; i < s->n_services; i++)
		for (size_t j = 0; j < s->services[i].n_methods; j++) {
			const RpcMethod *m = &s->services[i].methods[j];
			if (strcmp(m->path, path) != 0)
				continue;
			*ret = (RpcMethodInfo){
				.path = m->path,
				.input = m->input,
				.output = m->output,
				.client_streaming = m->client_streaming,
				.server_streaming = m->server_streaming,
			};
			return 0;
		}
	return -ENOENT;
}

grpc_channel *rpc_server_local_channel(RpcServer *s)
{
	grpc_channel *ch;

	pthread_mutex_lock(&s->mu);
	if (!s->local_channel && s->unix_path && s->started) {
		_cleanup_free_ char *target = NULL;
		int max_msg = s->opts.max_message_bytes > INT_MAX ? INT_MAX
								  : (int)s->opts.max_message_bytes;
		grpc_arg args[] = {
			{.type = GRPC_ARG_INTEGER,
			 .key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
			 .value.integer = max_msg},
			{.type = GRPC_ARG_INTEGER,
			 .key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH,
			 .value.integer = max_msg},
		};
		grpc_channel_args cargs = {.num_args = ELEMENTSOF(args), .args = args};
		if (asprintf(&target, "unix:%s", s->unix_path) >= 0) {
			grpc_channel_credentials *creds = grpc_insecure_credentials_create();
			s->local_channel = grpc_channel_create(target, creds, &cargs);
			grpc_channel_credentials_release(creds);
		}
	}
	ch = s->local_channel;
	pthread_mutex_unlock(&s->mu);
	return ch;
}

/* ------------------------------------------------------------------------------------------ */
/* call API */

/* Waits (or, without `wait`, -EAGAIN) until the call's send queue has room for a message of
 * `size` bytes: 0, -EINVAL (a second reply of a unary call), -ECANCELED. The room found stays
 * until call_enqueue(): only the call's one sender adds to the queue. */
static int call_reserve(RpcCall *c, size_t size, bool wait)
{
	if (size > c->server->opts.max_message_bytes)
		return -EMSGSIZE;

	pthread_mutex_lock(&c->mu);
	if (!c->method->server_streaming && c->reply_sent) {
		pthread_mutex_unlock(&c->mu);
		return -EINVAL;
	}
	/* Back-pressure: wait for the client to take what is queued. One message always fits so
	 * that a message larger than the high-water mark still goes out. */
	while (!c->dead && c->queued_msgs > 0 &&
	       (c->queued_bytes + size > c->server->opts.stream_high_water_bytes ||
		c->queued_msgs >= STREAM_MAX_QUEUED_MSGS)) {
		if (!wait) {
			c->send_refused = true;
			pthread_mutex_unlock(&c->mu);
			return -EAGAIN;
		}
		pthread_cond_wait(&c->cond, &c->mu);
	}
	bool dead = c->dead;
	pthread_mutex_unlock(&c->mu);
	return dead ? -ECANCELED : 0;
}

/* Queues a message made after call_reserve() (outside the lock, which the poller takes for
 * every completion of this call). Takes buf in every case: 0 or -ECANCELED. */
static int call_enqueue(RpcCall *c, grpc_byte_buffer *buf, size_t size)
{
	SendItem *item = calloc(1, sizeof(*item));

	if (!item) {
		grpc_byte_buffer_destroy(buf);
		return -ENOMEM;
	}
	item->buf = buf;
	item->size = size;
	pthread_mutex_lock(&c->mu);
	if (c->dead) {
		pthread_mutex_unlock(&c->mu);
		grpc_byte_buffer_destroy(item->buf);
		free(item);
		return -ECANCELED;
	}
	if (c->queue_tail)
		c->queue_tail->next = item;
	else
		c->queue_head = item;
	c->queue_tail = item;
	c->queued_bytes += size;
	c->queued_msgs++;
	c->reply_sent = true;
	call_pump_locked(c);
	pthread_mutex_unlock(&c->mu);
	return 0;
}

static int call_send(RpcCall *c, const ProtobufCMessage *msg, bool wait)
{
	size_t size = protobuf_c_message_get_packed_size(msg);
	grpc_byte_buffer *buf;
	grpc_slice slice;
	int r;

	r = call_reserve(c, size, wait);
	if (r < 0)
		return r;
	slice = grpc_slice_malloc(size);
	protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(slice));
	buf = grpc_raw_byte_buffer_create(&slice, 1);
	grpc_slice_unref(slice);
	return call_enqueue(c, buf, size);
}

static void piece_free(void *p)
{
	free(p);
}

int rpc_call_send_pieces_nowait(RpcCall *c, const void *head, size_t head_size, RpcPiece *pieces,
				size_t n)
{
	grpc_slice slices[1 + RPC_PIECES_MAX];
	grpc_byte_buffer *buf;
	size_t size = head_size;
	int r;

	if (n > RPC_PIECES_MAX || (head_size == 0 && n == 0))
		return -EINVAL;
	for (size_t i = 0; i < n; i++)
		size += pieces[i].size;
	r = call_reserve(c, size, false);
	if (r < 0)
		return r;
	/* The pieces become slices that own their memory: gRPC writes them to the socket as
	 * they are, and frees each once it is sent. */
	slices[0] = grpc_slice_from_copied_buffer(head, head_size);
	for (size_t i = 0; i < n; i++) {
		slices[1 + i] = grpc_slice_new(pieces[i].data, pieces[i].size, piece_free);
		pieces[i] = (RpcPiece){0};
	}
	buf = grpc_raw_byte_buffer_create(slices, 1 + n);
	for (size_t i = 0; i <= n; i++)
		grpc_slice_unref(slices[i]);
	return call_enqueue(c, buf, size);
}

int rpc_call_send(RpcCall *c, const ProtobufCMessage *msg)
{
	return call_send(c, msg, true);
}

int rpc_call_send_nowait(RpcCall *c, const ProtobufCMessage *msg)
{
	return call_send(c, msg, false);
}

int rpc_call_recv_nowait(RpcCall *c, ProtobufCMessage **ret)
{
	grpc_op recv_op = {.op = GRPC_OP_RECV_MESSAGE};
	grpc_byte_buffer *buf;
	grpc_byte_buffer_reader reader;
	grpc_slice slice;
	bool ok;

	if (!c->method->client_streaming)
		return -EINVAL;

	pthread_mutex_lock(&c->mu);
	if (c->recv_in_flight) {
		pthread_mutex_unlock(&c->mu);
		return -EAGAIN;
	}
	if (!c->recv_ready) {
		if (c->recv_eof) {
			pthread_mutex_unlock(&c->mu);
			return 0;
		}
		if (c->dead) {
			pthread_mutex_unlock(&c->mu);
			return -ECANCELED;
		}
		/* gRPC allows one receive in flight per call: the next starts only once this
		 * one's result was taken, which is the back-pressure on the client. */
		recv_op.data.recv_message.recv_message = &c->recv_buf;
		call_ref(c);
		c->recv_in_flight = true;
		if (grpc_call_start_batch(c->call, &recv_op, 1, &c->recv_tag, NULL) !=
		    GRPC_CALL_OK) {
			c->recv_in_flight = false;
			atomic_fetch_sub(&c->ref, 1);
			pthread_mutex_unlock(&c->mu);
			return -ECANCELED;
		}
		pthread_mutex_unlock(&c->mu);
		return -EAGAIN;
	}
	/* The batch completed: on a message, on half-close (NULL buffer) or on cancellation. */
	c->recv_ready = false;
	buf = TAKE_PTR(c->recv_buf);
	ok = c->recv_ok;
	if (ok && !buf)
		c->recv_eof = true;
	pthread_mutex_unlock(&c->mu);

	if (!ok) {
		if (buf)
			grpc_byte_buffer_destroy(buf);
		return -ECANCELED;
	}
	if (!buf)
		return 0;
	if (!grpc_byte_buffer_reader_init(&reader, buf)) {
		grpc_byte_buffer_destroy(buf);
		return -EBADMSG;
	}
	slice = grpc_byte_buffer_reader_readall(&reader);
	grpc_byte_buffer_reader_destroy(&reader);
	grpc_byte_buffer_destroy(buf);
	*ret = protobuf_c_message_unpack(c->method->input, NULL, GRPC_SLICE_LENGTH(slice),
					 GRPC_SLICE_START_PTR(slice));
	grpc_slice_unref(slice);
	char why[256];
	if (*ret && strings_unchecked(*ret, why, sizeof(why))) {
		log_debug("%s: %s", c->path, why);
		protobuf_c_message_free_unpacked(*ret, NULL);
		*ret = NULL;
	}
	return *ret ? 1 : -EBADMSG;
}

int rpc_call_recv(RpcCall *c, ProtobufCMessage **ret)
{
	for (;;) {
		int r = rpc_call_recv_nowait(c, ret);
		if (r != -EAGAIN)
			return r;
		pthread_mutex_lock(&c->mu);
		while (c->recv_in_flight)
			pthread_cond_wait(&c->cond, &c->mu);
		pthread_mutex_unlock(&c->mu);
	}
}

int rpc_call_notify_fd(RpcCall *c)
{
	int r;

	pthread_mutex_lock(&c->mu);
	if (c->notify_fd < 0) {
		c->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		/* Set when anything may already have happened that the handler waits for. */
		if (c->notify_fd >= 0)
			(void)eventfd_write(c->notify_fd, 1);
	}
	r = c->notify_fd >= 0 ? c->notify_fd : -errno;
	pthread_mutex_unlock(&c->mu);
	return r;
}

bool rpc_call_notify_clear(RpcCall *c)
{
	eventfd_t v = 0;

	pthread_mutex_lock(&c->mu);
	if (c->notify_fd >= 0 && eventfd_read(c->notify_fd, &v) < 0)
		v = 0;
	pthread_mutex_unlock(&c->mu);
	return v > 0;
}

int rpc_call_wait(RpcCall *c, int64_t timeout_ms)
{
	struct timespec ts;
	int r = 0;

	if (timeout_ms >= 0)
		ts = abs_timeout(timeout_ms);
	pthread_mutex_lock(&c->mu);
	/* Compared with the generation seen when the previous wait returned, not with the one
	 * at entry: a wake between the handler reading its state and calling us is not lost. */
	for (;;) {
		if (c->dead) {
			r = -ECANCELED;
			break;
		}
		if (rpc_server_get_state(c->server) == RPC_SERVER_DRAINING) {
			r = -ESHUTDOWN;
			break;
		}
		if (c->wake_gen != c->wake_seen)
			break;
		if (timeout_ms < 0)
			pthread_cond_wait(&c->cond, &c->mu);
		else if (pthread_cond_timedwait(&c->cond, &c->mu, &ts) == ETIMEDOUT)
			break;
	}
	c->wake_seen = c->wake_gen;
	pthread_mutex_unlock(&c->mu);
	return r;
}

void rpc_call_end_on_drain(RpcCall *c)
{
	pthread_mutex_lock(&c->mu);
	c->end_on_drain = true;
	pthread_mutex_unlock(&c->mu);
	/* drain_begin sets the state before it looks at the flags: one of us ends the call. */
	if (rpc_server_get_state(c->server) == RPC_SERVER_DRAINING)
		call_end_now(c);
}

void rpc_call_wake(RpcCall *c)
{
	pthread_mutex_lock(&c->mu);
	c->wake_gen++;
	call_signal_locked(c);
	pthread_mutex_unlock(&c->mu);
}

bool rpc_call_is_cancelled(RpcCall *c)
{
	pthread_mutex_lock(&c->mu);
	bool dead = c->dead;
	pthread_mutex_unlock(&c->mu);
	return dead;
}

int64_t rpc_call_remaining_ms(RpcCall *c)
{
	gpr_timespec now = gpr_now(GPR_CLOCK_MONOTONIC);

	if (gpr_time_cmp(c->deadline, gpr_inf_future(GPR_CLOCK_MONOTONIC)) == 0)
		return -1;
	if (gpr_time_cmp(c->deadline, now) <= 0)
		return 0;
	return gpr_time_to_millis(gpr_time_sub(c->deadline, now));
}

const char *rpc_call_method(RpcCall *c)
{
	return c->path;
}

RpcServer *rpc_call_server(RpcCall *c)
{
	return c->server;
}

RpcCode rpc_call_error(RpcCall *c, RpcCode code, const char *format, ...)
{
	va_list ap;
	char *m = NULL;

	va_start(ap, format);
	if (vasprintf(&m, format, ap) < 0)
		m = NULL;
	va_end(ap);
	free(c->error_message);
	c->error_message = m;
	return code;
}
