/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Exec (node.proto): the bidirectional stream, relayed to ember-guest over the sandbox's vsock.
 *
 * One thread per call (from the stream pool, never a unary worker), one poll loop over two fds:
 * the call's notify fd and the guest connection. Back-pressure is by not asking:
 *   guest -> client: the guest's next frame is read only once the previous output went into
 *     the call's send queue (1 MiB, the gRPC layer's stream high-water mark), so a slow client
 *     leaves the bytes in the guest's pipes and the process blocks writing;
 *   client -> guest: the client's next message is asked for only once the guest took the
 *     previous stdin bytes (and no more than 256 KiB of frames wait for it).
 * So besides the send queue, at most one gathered message (1 MiB) and one stdin message wait
 * in emberd per call, whatever the two ends do. Output is not copied on its way: the guest's
 * chunks go to gRPC in the buffers they were read into (rpc_call_send_pieces_nowait()).
 *
 * The call waits on its sandbox like the lifecycle calls (a Waiter): every state change wakes
 * it, and a sandbox that is no longer RUNNING ends it with ABORTED and no `exit`. Closing the
 * guest connection makes ember-guest SIGKILL the process's whole session, which is how
 * cancellation, ABORTED and errors after `start` kill the process.
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "guest/client/guest-client.h"
#include "node-sandbox.h"

#define EXEC_CHUNK_MAX   (1u << 20) /* node.proto: chunks and stdin messages of at most 1 MiB */
#define GUEST_CONNECT_MS 5000
#define EXEC_EVENT_BURST 16 /* guest frames per turn before stdin gets its turn */
/* Output gathered into one message: at most an API chunk (gathering stops short of it); one
 * message per send-queue's worth is what makes the gRPC side cheapest. */
#define EXEC_GATHER_MAX EXEC_CHUNK_MAX
#define EXEC_OUT_PIECES 32 /* guest chunks in one message (tiny ones come one by one) */
_Static_assert(EXEC_OUT_PIECES <= RPC_PIECES_MAX, "a message's pieces");
/* a first chunk is taken whatever its size: the guest's largest frame, too, is within a chunk */
_Static_assert(GUEST_EVENT_DATA_MAX <= EXEC_CHUNK_MAX, "a guest chunk fits in an API chunk");
/* Frames for the guest (stdin, signals, resizes) queued before the client's next request
 * waits: what the guest does not read must not pile up in emberd. */
#define EXEC_CONTROL_QUEUE_MAX (256u << 10)
#define EXEC_ARG_MAX           ((size_t)128 << 10) /* one argument (Linux's MAX_ARG_STRLEN) */
#define EXEC_ARGS_TOTAL_MAX    ((size_t)2 << 20)   /* argv and env together */
/* A broken guest connection while the sandbox is still RUNNING: how long to wait for the
 * manager to notice the VMM's exit (ABORTED) before calling the guest unreachable. */
#define GUEST_SETTLE_MS 1000
#define DEFAULT_PATH    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

typedef struct ExecCall {
	GuestSession s;
	RpcCall *call;
	GuestConn *g;  /* s.g */
	char *program; /* argv[0], for messages */

	bool want_stdin;  /* ExecStart.stdin */
	bool stdin_open;  /* the process's stdin is open and we may write it */
	bool stdin_close; /* close it once `in` is written (close_stdin or half-close) */
	bool tty;
	bool client_done;  /* the client half-closed: no more requests */
	bool write_closed; /* the guest stopped reading: nothing more is sent to it */
	uint8_t *in;       /* stdin bytes the guest has not taken yet */
	size_t in_off, in_len;

	/* Output gathered for the client and not queued yet: the guest's chunks themselves,
	 * one message's worth (out_size bytes of stdout or of stderr). */
	RpcPiece out[EXEC_OUT_PIECES];
	size_t n_out, out_size;
	bool out_stderr;
	bool exited; /* the guest reported the exit; `status` is it */
	Ember__V1__ExecExit status;
} ExecCall;

/* ---- a call's session with a sandbox's guest agent (Exec, WriteFile, ReadFile) ---- */

RpcCode guest_session_open(GuestSession *s, Manager *m, RpcCall *call, const char *sandbox_id,
			   const char *what)
{
	_cleanup_free_ char *uds = NULL;
	_cleanup_free_ char *err = NULL;
	Sandbox *sb;
	int r;

	*s = (GuestSession){.m = m, .call = call, .what = what};
	pthread_mutex_lock(&m->lock);
	sb = manager_find_locked(m, sandbox_id);
	if (!sb) {
		pthread_mutex_unlock(&m->lock);
		return rpc_call_error(call, RPC_NOT_FOUND, "no sandbox %s", sandbox_id);
	}
	if (sb->state != EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING) {
		const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(
			&ember__v1__sandbox_state__descriptor, (int)sb->state);
		pthread_mutex_unlock(&m->lock);
		return rpc_call_error(call, RPC_FAILED_PRECONDITION,
				      "sandbox %s is %s, not RUNNING", sandbox_id,
				      v ? v->name + strlen("SANDBOX_STATE_") : "?");
	}
	sandbox_ref_locked(sb);
	s->sb = sb;
	/* Unlinked by guest_session_close(): every state change of the sandbox wakes the call. */
	sandbox_waiter_add_locked(sb, &s->waiter, call);
	r = asprintf(&uds, "%s/v.sock", sb->run_dir);
	pthread_mutex_unlock(&m->lock);
	if (r < 0)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");

	r = guest_conn_open_vsock(uds, GUEST_CLIENT_PORT, GUEST_CONNECT_MS, &s->g, &err);
	if (r < 0)
		return guest_session_running(s)
			       ? rpc_call_error(call, RPC_UNAVAILABLE,
						"sandbox %s: cannot reach the guest agent: %s",
						sandbox_id, err ?: strerror(-r))
			       : guest_session_aborted(s);
	guest_conn_set_timeout(s->g, GUEST_CONNECT_MS);
	return RPC_OK;
}

void guest_session_close(GuestSession *s)
{
	Manager *m = s->m;

	if (s->sb) {
		pthread_mutex_lock(&m->lock);
		sandbox_waiter_remove_locked(s->sb, &s->waiter);
		pthread_mutex_unlock(&m->lock);
		sandbox_unref(m, s->sb);
		s->sb = NULL;
	}
	/* Closing the connection ends what it was doing in the guest: a process's session is
	 * SIGKILLed, a file write's temporary file removed. */
	guest_conn_free(TAKE_PTR(s->g));
}

RpcCode guest_session_aborted(GuestSession *s)
{
	pthread_mutex_lock(&s->m->lock);
	Ember__V1__SandboxState st = s->sb->state;
	pthread_mutex_unlock(&s->m->lock);
	const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(
		&ember__v1__sandbox_state__descriptor, (int)st);
	return rpc_call_error(s->call, RPC_ABORTED, "sandbox %s is %s: %s ended with it", s->sb->id,
			      v ? v->name + strlen("SANDBOX_STATE_") : "gone", s->what);
}

bool guest_session_running(GuestSession *s)
{
	if (!s->sb)
		return false;
	pthread_mutex_lock(&s->m->lock);
	bool running =
		!s->sb->removed && s->sb->state == EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING;
	pthread_mutex_unlock(&s->m->lock);
	return running;
}

RpcCode guest_session_failed(GuestSession *s, int r)
{
	const char *why = s->g ? guest_conn_error(s->g) : strerror(-r);

	/* our own failures first: they say nothing about the guest */
	if (r == -ENOMEM)
		return rpc_call_error(s->call, RPC_RESOURCE_EXHAUSTED, "sandbox %s: %s: %s",
				      s->sb->id, s->what, why);
	if (r == -E2BIG)
		return rpc_call_error(s->call, RPC_INVALID_ARGUMENT, "sandbox %s: %s: %s",
				      s->sb->id, s->what, why);
	bool refused = s->g && guest_conn_refused(s->g);
	if (refused && !s->streaming) {
		/* The guest answered the request: the request's fault, in the guest's words. */
		RpcCode code = r == -ENOENT                                 ? RPC_NOT_FOUND
			       : r == -EACCES || r == -EPERM || r == -EROFS ? RPC_PERMISSION_DENIED
			       : r == -ENOSPC || r == -EDQUOT || r == -EFBIG
				       ? RPC_RESOURCE_EXHAUSTED
				       : RPC_FAILED_PRECONDITION;
		return rpc_call_error(s->call, code, "sandbox %s: %s: %s", s->sb->id, s->what, why);
	}
	if (!guest_session_running(s))
		return guest_session_aborted(s);
	/* The guest broke the protocol (a frame too large or too costly to parse, garbage, a
	 * second Hello, an error in the middle of a stream, more file bytes than declared):
	 * its fault, said as such. */
	if (refused || r == -EMSGSIZE || r == -ENOBUFS || r == -EBADMSG || r == -EPROTO ||
	    r == -EOVERFLOW)
		return rpc_call_error(
			s->call, RPC_UNAVAILABLE,
			"sandbox %s: the guest agent broke the protocol during %s: %s "
			"(the connection was closed)",
			s->sb->id, s->what, why);
	/* The connection broke. When that is because the sandbox stopped running, say so (its
	 * VMM's exit may reach the manager a moment after the connection broke). */
	int fd = rpc_call_notify_fd(s->call);
	int64_t deadline = (int64_t)now_ms() + GUEST_SETTLE_MS;
	for (;;) {
		int64_t left = deadline - (int64_t)now_ms();
		if (fd < 0 || left <= 0 || rpc_call_is_cancelled(s->call))
			break;
		struct pollfd p = {.fd = fd, .events = POLLIN};
		(void)rpc_call_notify_clear(s->call);
		if (!guest_session_running(s))
			break;
		(void)poll(&p, 1, (int)left);
	}
	if (!guest_session_running(s))
		return guest_session_aborted(s);
	return rpc_call_error(s->call, RPC_UNAVAILABLE,
			      "sandbox %s: lost the guest agent during %s: %s", s->sb->id, s->what,
			      why);
}

/* ---- Exec ---- */

/* The start of an ExecResponse whose stdout_data or stderr_data holds `size` bytes: the
 * field's tag and length, as protobuf encodes a bytes field (wire type 2). What follows it is
 * the data itself, so that output is sent without being packed (copied) once more. */
static size_t out_head(uint8_t head[16], bool is_stderr, size_t size)
{
	/* protobuf-c numbers a oneof's cases by their field numbers */
	uint64_t field = is_stderr ? EMBER__V1__EXEC_RESPONSE__MSG_STDERR_DATA
				   : EMBER__V1__EXEC_RESPONSE__MSG_STDOUT_DATA;
	uint64_t v[2] = {field << 3 | 2, size}; /* wire type 2: length-delimited */
	size_t n = 0;

	for (size_t i = 0; i < 2; i++) {
		while (v[i] >= 0x80) {
			head[n++] = (uint8_t)(v[i] | 0x80);
			v[i] >>= 7;
		}
		head[n++] = (uint8_t)v[i];
	}
	return n;
}

/* Sends the gathered output as one message if the send queue has room: 0 (out, or it waits
 * for room), -ECANCELED, -ENOMEM. */
static int flush_out(ExecCall *e)
{
	uint8_t head[16];
	int r;

	if (e->n_out == 0)
		return 0;
	r = rpc_call_send_pieces_nowait(e->call, head, out_head(head, e->out_stderr, e->out_size),
					e->out, e->n_out);
	if (r == -EAGAIN)
		return 0;
	if (r < 0)
		return r;
	e->n_out = e->out_size = 0;
	return 0;
}

static void out_free(ExecCall *e)
{
	for (size_t i = 0; i < e->n_out; i++)
		free(e->out[i].data);
	e->n_out = e->out_size = 0;
}

/* Takes the guest's events that are already here: output of one stream is gathered into one
 * message of up to EXEC_GATHER_MAX (fewer, larger messages are what makes the gRPC side fast;
 * nothing waits for more to come), in the buffers the chunks arrived in. Stops at a change of
 * stream, at the exit (taken only once the output before it is out) or when nothing more is
 * there. *ret_more: it stopped while events may be waiting in the connection's buffer, where
 * polling its fd would not see them. RPC_OK, or the code to end the call with. */
static RpcCode gather_output(ExecCall *e, bool *ret_more)
{
	int r;

	*ret_more = false;
	for (int i = 0; !e->exited; i++) {
		GuestEventType type;
		GuestEvent ev;
		size_t size;

		r = guest_exec_peek_event(e->g, &type, &size);
		if (r == 0)
			break;
		if (r < 0)
			return guest_session_failed(&e->s, r);
		bool data = type == GUEST_EVENT_STDOUT || type == GUEST_EVENT_STDERR;
		if (i == EXEC_EVENT_BURST ||
		    (e->n_out > 0 &&
		     (!data || (type == GUEST_EVENT_STDERR) != e->out_stderr ||
		      e->out_size + size > EXEC_GATHER_MAX || e->n_out == EXEC_OUT_PIECES))) {
			*ret_more = true; /* what is gathered goes first */
			break;
		}
		r = guest_exec_next_event(e->g, &ev, 0);
		if (r == 0)
			break;
		if (r < 0)
			return guest_session_failed(&e->s, r);
		if (ev.type == GUEST_EVENT_EXIT) {
			e->exited = true;
			e->status.exit_code = ev.signal ? 0 : ev.code;
			e->status.signal = ev.signal;
			e->status.timed_out = ev.timed_out;
			e->status.core_dumped = ev.core_dumped;
			break;
		}
		if (ev.size == 0)
			continue; /* an empty chunk: nothing to send */
		e->out[e->n_out++] =
			(RpcPiece){.data = guest_exec_take_data(e->g), .size = ev.size};
		e->out_size += ev.size;
		e->out_stderr = ev.type == GUEST_EVENT_STDERR;
	}
	return RPC_OK;
}

/* Validates ExecStart and fills spec; the strings stay owned by `start` and `env`. */
static RpcCode start_spec(RpcCall *call, const Ember__V1__ExecStart *start, GuestExecSpec *spec,
			  KvList *ret_env)
{
	const Google__Protobuf__Duration *t = start->timeout;
	RpcCode code;

	size_t total = 0;

	if (start->n_argv == 0)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "start.argv is empty");
	for (size_t i = 0; i < start->n_argv; i++) {
		size_t len = strlen(start->argv[i]);
		if (len > EXEC_ARG_MAX)
			return rpc_call_error(call, RPC_INVALID_ARGUMENT,
					      "start.argv[%zu] is longer than 128 KiB", i);
		total += len + 1;
	}
	if (start->argv[0][0] == '\0')
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "start.argv[0] is empty");
	if (t && (t->seconds < 0 || t->nanos < 0))
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "start.timeout is negative");
	if (t && t->nanos > 999999999)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "start.timeout.nanos is above 999999999");
	if (start->rows > 65535 || start->cols > 65535)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "start.rows and start.cols are at most 65535");
	if (start->cwd && strlen(start->cwd) >= PATH_MAX)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "start.cwd is too long");
	code = kv_from_pb(call, "start.env", KV_ENV, start->env, start->n_env, ret_env);
	if (code != RPC_OK)
		return code;
	for (size_t i = 0; i < ret_env->n; i++)
		total += strlen(ret_env->items[i].key) + strlen(ret_env->items[i].value) + 2;
	/* Linux's own limit on what execve takes is about this (a quarter of an 8 MiB stack) */
	if (total > EXEC_ARGS_TOTAL_MAX) {
		kv_list_done(ret_env);
		return rpc_call_error(
			call, RPC_INVALID_ARGUMENT,
			"start.argv and start.env add up to %zu bytes, more than 2 MiB", total);
	}

	*spec = (GuestExecSpec){
		.cwd = start->cwd && start->cwd[0] ? start->cwd : NULL,
		.set_user = true,
		.uid = start->uid,
		.gid = start->gid,
		.tty = start->tty,
		.rows = start->rows,
		.cols = start->cols,
		.stdin = start->stdin,
		.env_replace = true,
	};
	if (t && (t->seconds > 0 || t->nanos > 0)) {
		/* Rounded up to whole milliseconds; a limit beyond ~49 days is none in practice */
		uint64_t ms = (uint64_t)t->seconds > UINT_MAX / 1000
				      ? UINT_MAX
				      : (uint64_t)t->seconds * 1000 +
						((uint64_t)t->nanos + 999999) / 1000000;
		spec->timeout_ms = ms > UINT_MAX ? UINT_MAX : (unsigned)ms;
	}
	return RPC_OK;
}

/* The process's environment: the minimal default, the sandbox's spec.env, then start.env,
 * later entries overriding earlier ones (ember-guest applies them in order). */
static char **exec_env(const KvList *spec_env, const KvList *start_env, bool tty)
{
	size_t n = 0, cap = 2 + spec_env->n + start_env->n + 1;
	char **env = calloc(cap, sizeof(char *));
	const KvList *lists[] = {spec_env, start_env};

	if (!env)
		return NULL;
	if (!(env[n++] = strdup(DEFAULT_PATH)))
		goto oom;
	if (tty && !(env[n++] = strdup("TERM=xterm-256color")))
		goto oom;
	for (size_t l = 0; l < ELEMENTSOF(lists); l++)
		for (size_t i = 0; i < lists[l]->n; i++)
			if (asprintf(&env[n++], "%s=%s", lists[l]->items[i].key,
				     lists[l]->items[i].value) < 0) {
				env[--n] = NULL;
				goto oom;
			}
	return env;
oom:
	for (size_t i = 0; i < n; i++)
		free(env[i]);
	free(env);
	return NULL;
}

static void strv_free(char **v)
{
	if (!v)
		return;
	for (char **p = v; *p; p++)
		free(*p);
	free(v);
}

/* The guest stopped reading (-EPIPE from a write): the process is on its way out, its last
 * output and exit may still come. Nothing more goes to it. */
static void guest_write_closed(ExecCall *e)
{
	e->write_closed = true;
	e->stdin_open = false;
	free(e->in);
	e->in = NULL;
	e->in_len = e->in_off = 0;
}

/* What a failed write to the guest means: 0 to go on (the guest stopped reading; its
 * output is read to the end), or the code to end the call with. */
static RpcCode write_failed(ExecCall *e, int r)
{
	if (r == -EPIPE) {
		guest_write_closed(e);
		return RPC_OK;
	}
	return guest_session_failed(&e->s, r);
}

/* One client message after `start`. RPC_OK to go on. */
static RpcCode handle_request(ExecCall *e, Ember__V1__ExecRequest *req)
{
	int r = 0;

	switch (req->msg_case) {
	case EMBER__V1__EXEC_REQUEST__MSG_START:
		return rpc_call_error(e->call, RPC_INVALID_ARGUMENT,
				      "a second start: the process is running already");
	case EMBER__V1__EXEC_REQUEST__MSG_STDIN_DATA:
		if (!e->want_stdin)
			return rpc_call_error(e->call, RPC_INVALID_ARGUMENT,
					      "stdin_data, but start.stdin was false (the "
					      "process's stdin is /dev/null)");
		if (!e->stdin_open || e->stdin_close)
			return rpc_call_error(e->call, RPC_INVALID_ARGUMENT,
					      "stdin_data after close_stdin");
		if (req->stdin_data.len > EXEC_CHUNK_MAX)
			return rpc_call_error(e->call, RPC_INVALID_ARGUMENT,
					      "stdin_data of %zu bytes: at most 1 MiB per message",
					      req->stdin_data.len);
		if (req->stdin_data.len == 0)
			return RPC_OK;
		/* Kept until the guest takes it all; the next request waits for that. */
		e->in = malloc(req->stdin_data.len);
		if (!e->in)
			return rpc_call_error(e->call, RPC_RESOURCE_EXHAUSTED, "out of memory");
		memcpy(e->in, req->stdin_data.data, req->stdin_data.len);
		e->in_off = 0;
		e->in_len = req->stdin_data.len;
		return RPC_OK;
	case EMBER__V1__EXEC_REQUEST__MSG_CLOSE_STDIN:
		/* A repeated close, or one without stdin, changes nothing */
		if (e->stdin_open)
			e->stdin_close = true;
		return RPC_OK;
	case EMBER__V1__EXEC_REQUEST__MSG_RESIZE:
		/* node.proto: ignored without a tty (clients forward window changes blindly) */
		if (!e->tty)
			return RPC_OK;
		if (req->resize->rows < 1 || req->resize->cols < 1 || req->resize->rows > 65535 ||
		    req->resize->cols > 65535)
			return rpc_call_error(e->call, RPC_INVALID_ARGUMENT,
					      "resize to %u x %u: rows and cols must be 1-65535",
					      req->resize->rows, req->resize->cols);
		r = guest_exec_resize(e->g, req->resize->rows, req->resize->cols);
		break;
	case EMBER__V1__EXEC_REQUEST__MSG_SIGNAL:
		if (req->signal->signal < 1 || req->signal->signal > 64)
			return rpc_call_error(e->call, RPC_INVALID_ARGUMENT,
					      "signal %d: Linux signals are 1-64",
					      req->signal->signal);
		r = guest_exec_signal(e->g, req->signal->signal);
		break;
	default:
		return rpc_call_error(e->call, RPC_INVALID_ARGUMENT,
				      "a request with none of start, stdin_data, close_stdin, "
				      "resize or signal set");
	}
	return r < 0 ? write_failed(e, r) : RPC_OK;
}

static RpcCode queue_failed(ExecCall *e, int r)
{
	return r == -ECANCELED ? RPC_CANCELLED
			       : rpc_call_error(e->call, RPC_INTERNAL, "cannot queue output: %s",
						strerror(-r));
}

static RpcCode relay(ExecCall *e)
{
	int notify = rpc_call_notify_fd(e->call);
	bool check_state = true;
	RpcCode code;

	if (notify < 0)
		return rpc_call_error(e->call, RPC_RESOURCE_EXHAUSTED, "cannot make an eventfd: %s",
				      strerror(-notify));
	for (;;) {
		int r;

		/* The sandbox's state changes wake the call through its notify fd (a Waiter):
		 * the manager's lock is taken only then, not on every turn. */
		if (rpc_call_notify_clear(e->call))
			check_state = true;
		if (rpc_call_is_cancelled(e->call))
			return RPC_CANCELLED;
		if (check_state && !guest_session_running(&e->s))
			return guest_session_aborted(&e->s);
		check_state = false;

		/* client <- guest: what waits goes first; only then is more taken */
		if ((r = flush_out(e)) < 0)
			return queue_failed(e, r);
		bool more = false;
		if (e->n_out == 0) {
			if ((code = gather_output(e, &more)) != RPC_OK)
				return code;
			if ((r = flush_out(e)) < 0)
				return queue_failed(e, r);
		}
		if (e->exited && e->n_out == 0) {
			Ember__V1__ExecResponse resp = EMBER__V1__EXEC_RESPONSE__INIT;
			resp.msg_case = EMBER__V1__EXEC_RESPONSE__MSG_EXIT;
			resp.exit = &e->status;
			r = rpc_call_send_nowait(e->call, &resp.base);
			if (r == 0)
				return RPC_OK;
			if (r != -EAGAIN)
				return queue_failed(e, r);
		}

		/* client -> guest, while the process runs: what waits in the connection's
		 * buffer goes first, so that stdin the guest refused earlier (-EAGAIN) is
		 * retried after it */
		bool writing = !e->exited && !e->write_closed;
		if (writing && (r = guest_conn_flush(e->g)) < 0 && r != -EAGAIN &&
		    (code = write_failed(e, r)) != RPC_OK)
			return code;
		writing = !e->exited && !e->write_closed;
		if (writing && e->in_len > 0) {
			ssize_t n = guest_exec_write_stdin(e->g, e->in + e->in_off,
							   e->in_len - e->in_off);
			if (n > 0) {
				e->in_off += (size_t)n;
				if (e->in_off == e->in_len) {
					free(e->in);
					e->in = NULL;
					e->in_len = e->in_off = 0;
				}
			} else if (n != -EAGAIN && (code = write_failed(e, (int)n)) != RPC_OK) {
				return code;
			}
		}
		writing = !e->exited && !e->write_closed;
		if (writing && e->in_len == 0 && e->stdin_close && e->stdin_open) {
			if ((r = guest_exec_close_stdin(e->g)) < 0 &&
			    (code = write_failed(e, r)) != RPC_OK)
				return code;
			e->stdin_open = false;
		}
		/* The client's next request only once the guest took what came before (stdin
		 * and control frames both: a flood of signals must not pile up here either),
		 * and none after the exit: nothing could be done with it. */
		if (e->in_len == 0 && !e->client_done && !e->exited &&
		    guest_conn_pending_out(e->g) < EXEC_CONTROL_QUEUE_MAX) {
			Ember__V1__ExecRequest *req = NULL;
			r = rpc_call_recv_nowait(e->call, (ProtobufCMessage **)&req);
			if (r == 0) {
				/* Half-close: stdin ends, nothing more (the process goes on). */
				e->client_done = true;
				if (e->stdin_open)
					e->stdin_close = true;
				continue;
			}
			if (r == -EBADMSG)
				return rpc_call_error(
					e->call, RPC_INVALID_ARGUMENT,
					"a request that does not parse as ExecRequest");
			if (r < 0 && r != -EAGAIN)
				return RPC_CANCELLED;
			if (r > 0) {
				code = handle_request(e, req);
				protobuf_c_message_free_unpacked(&req->base, NULL);
				if (code != RPC_OK)
					return code;
				continue;
			}
		}

		writing = !e->exited && !e->write_closed;
		if (writing && (r = guest_conn_flush(e->g)) < 0 && r != -EAGAIN &&
		    (code = write_failed(e, r)) != RPC_OK)
			return code;
		writing = !e->exited && !e->write_closed;
		/* stdin still waiting and the connection's buffer empty, or guest events already
		 * read and the send queue has room: go on now rather than wait for an event
		 * that would not come */
		if (writing && e->in_len > 0 && !(guest_conn_poll_events(e->g) & POLLOUT))
			continue;
		if (more && e->n_out == 0)
			continue;

		/* The guest's fd only when its readiness is something to act on: poll reports
		 * a closed peer (POLLHUP) whatever is asked, and would return at once for ever
		 * while output waits for the client or the exit is already in hand. */
		short want = guest_conn_poll_events(e->g);
		if (e->n_out > 0 || e->exited)
			want &= (short)~POLLIN;
		if (!writing)
			want &= (short)~POLLOUT;
		struct pollfd p[2] = {{.fd = notify, .events = POLLIN},
				      {.fd = want ? guest_conn_fd(e->g) : -1, .events = want}};
		(void)poll(p, 2, -1);
	}
}

RpcCode node_exec(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	Ember__V1__ExecRequest *first = NULL;
	Ember__V1__ExecResponse resp = EMBER__V1__EXEC_RESPONSE__INIT;
	Ember__V1__ExecStarted started = EMBER__V1__EXEC_STARTED__INIT;
	const Ember__V1__ExecStart *start;
	KvList start_env = {};
	GuestExecSpec spec = {};
	ExecCall e = {.call = call, .status = EMBER__V1__EXEC_EXIT__INIT};
	_cleanup_free_ char *what = NULL;
	char **argv = NULL, **env = NULL;
	pid_t pid;
	RpcCode code;
	int r;

	(void)request;
	r = rpc_call_recv(call, (ProtobufCMessage **)&first);
	if (r == 0)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "no start message");
	if (r == -EBADMSG)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "a request that does not parse as ExecRequest");
	if (r < 0)
		return RPC_CANCELLED;
	if (first->msg_case != EMBER__V1__EXEC_REQUEST__MSG_START) {
		code = rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "the first message must be start");
		goto out;
	}
	start = first->start;
	if ((code = node_id_check(call, "start.sandbox_id", start->sandbox_id)) != RPC_OK ||
	    (code = start_spec(call, start, &spec, &start_env)) != RPC_OK)
		goto out;
	e.program = strdup(start->argv[0]);
	if (!e.program || asprintf(&what, "the process %.200s", start->argv[0]) < 0) {
		what = NULL;
		code = rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
		goto out;
	}
	code = guest_session_open(&e.s, m, call, start->sandbox_id, what);
	if (code != RPC_OK || !e.s.sb)
		goto out;
	e.g = e.s.g;

	argv = calloc(start->n_argv + 1, sizeof(char *));
	/* A sandbox's spec never changes after its create: read without the lock. */
	env = exec_env(&e.s.sb->spec.env, &start_env, spec.tty);
	if (!argv || !env) {
		code = rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
		goto out;
	}
	memcpy(argv, start->argv, start->n_argv * sizeof(char *));
	spec.argv = (const char *const *)argv;
	spec.env = (const char *const *)env;
	r = guest_exec_start(e.g, &spec, &pid);
	if (r < 0) {
		if (guest_conn_refused(e.g))
			code = rpc_call_error(call, RPC_FAILED_PRECONDITION,
					      "cannot start %s in sandbox %s: %s", e.program,
					      e.s.sb->id, guest_conn_error(e.g));
		else
			code = guest_session_failed(&e.s, r);
		goto out;
	}
	e.tty = spec.tty;
	e.want_stdin = e.stdin_open = spec.stdin;
	e.s.streaming = true;

	started.pid = (uint32_t)pid;
	resp.msg_case = EMBER__V1__EXEC_RESPONSE__MSG_STARTED;
	resp.started = &started;
	if (rpc_call_send(call, &resp.base) < 0) {
		code = RPC_CANCELLED;
		goto out;
	}
	code = relay(&e);
	if (code == RPC_CANCELLED)
		log_debug("exec %s in %s: cancelled by the client; the process is killed",
			  e.program, e.s.sb->id);
out:
	if (first)
		protobuf_c_message_free_unpacked(&first->base, NULL);
	guest_session_close(&e.s);
	free(e.program);
	free(e.in);
	out_free(&e);
	kv_list_done(&start_env);
	free(argv);
	strv_free(env);
	return code;
}
