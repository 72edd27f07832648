/* SPDX-License-Identifier: Apache-2.0 */
/* Host side of the guest protocol: requests, exec event pump, file transfers. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "fcctl/fcctl.h"
#include "guest-client.h"
#include "guest/proto/frame.h"

#ifndef EMBER_VERSION
#define EMBER_VERSION "unknown"
#endif

#define DEFAULT_TIMEOUT_MS (30 * 1000)
/* Stdin frames queued here before guest_exec_write_stdin() says -EAGAIN: enough to keep the
 * pipe full, little enough that a process that does not read its stdin costs little. */
#define STDIN_QUEUE_LIMIT (256u << 10)

struct GuestConn {
	int fd; /* non-blocking */
	GuestBuf in, out;
	int timeout_ms;
	bool hello_seen, broken;
	bool refused;      /* the last failure was the guest's own Error frame */
	bool write_closed; /* the guest stopped reading: sends fail with -EPIPE, reads go on */
	bool exec_started, exec_over;
	unsigned guest_protocol;
	char *guest_version;
	GuestFrame *last;   /* the frame the last event's (or file chunk's) data points into */
	GuestFrame *peeked; /* the next event, when guest_exec_peek_event() read it */
	/* a file transfer in progress (guest_file_*_begin until its end) */
	bool file_op;
	uint64_t file_size;     /* bytes sent or received so far */
	uint64_t file_declared; /* read: the size the guest declared */
	GuestFrame *file_reply; /* write: the guest's answer, when it came before FileEnd */
	char error[512];
};

typedef Ember__Guest__V1__Frame__KindCase FrameKind;

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

_printf_(2, 3) static void set_error(GuestConn *c, const char *format, ...)
{
	va_list ap;

	c->refused = false;
	va_start(ap, format);
	(void)vsnprintf(c->error, sizeof(c->error), format, ap);
	va_end(ap);
	log_debug("guest connection: %s", c->error);
}

/* Records the message, evaluates to r (a macro, so that the analyzer sees the value). */
#define fail(c, r, ...)                                                                            \
	({                                                                                         \
		int _r_ = (r);                                                                     \
		set_error((c), __VA_ARGS__);                                                       \
		_r_;                                                                               \
	})

/* The stream is out of step with the guest (a frame half-sent, a protocol error): only
 * closing it is safe. */
static int fail_broken(GuestConn *c, int r, const char *what)
{
	c->broken = true;
	return fail(c, r, "%s: %s", what, strerror(-r));
}

/* Turns the guest's Error frame into our return value and message. */
static int guest_error(GuestConn *c, const GuestFrame *f)
{
	const Ember__Guest__V1__Error *e = f->error;
	int r = e->errnum > 0 ? -e->errnum : -EIO;
	r = fail(c, r, "%s", e->message && e->message[0] ? e->message : strerror(-r));
	c->refused = true;
	return r;
}

bool guest_conn_refused(const GuestConn *c)
{
	return c->refused;
}

static int unexpected(GuestConn *c, const GuestFrame *f, const char *expected)
{
	if (f->kind_case == EMBER__GUEST__V1__FRAME__KIND_ERROR) {
		int r = guest_error(c, f);
		return r < 0 ? r : -EIO;
	}
	c->broken = true;
	return fail(c, -EPROTO, "guest sent a %s frame, expected %s", guest_frame_kind_name(f),
		    expected);
}

void guest_conn_free(GuestConn *c)
{
	if (!c)
		return;
	safe_close(c->fd);
	guest_buf_free(&c->in);
	guest_buf_free(&c->out);
	guest_frame_free(c->last);
	guest_frame_free(c->peeked);
	guest_frame_free(c->file_reply);
	free(c->guest_version);
	free(c);
}

static int queue(GuestConn *c, const GuestFrame *f)
{
	int r = guest_frame_append(&c->out, f);
	/* Ours, not the guest's: a request too large for the protocol (-E2BIG, so that it is
	 * not mistaken for a frame too large from the guest). */
	if (r == -EMSGSIZE)
		return fail(c, -E2BIG, "a %s frame larger than the guest protocol's %u MiB",
			    guest_frame_kind_name(f), GUEST_FRAME_MAX >> 20);
	if (r < 0)
		return fail(c, r, "cannot queue a %s frame: %s", guest_frame_kind_name(f),
			    strerror(-r));
	return 0;
}

int guest_conn_from_fd(int fd, GuestConn **ret)
{
	Ember__Guest__V1__Hello hello = EMBER__GUEST__V1__HELLO__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
	_cleanup_(guest_conn_freep) GuestConn *c = NULL;
	int flags, r;

	if (fd < 0)
		return -EBADF;
	c = calloc(1, sizeof(*c));
	if (!c) {
		safe_close(fd);
		return -ENOMEM;
	}
	c->fd = fd;
	c->timeout_ms = DEFAULT_TIMEOUT_MS;
	/* The guest is not trusted: nothing it sends may be larger than the protocol needs. */
	c->in.max_frame = GUEST_FRAME_FROM_GUEST_MAX;
	flags = fcntl(fd, F_GETFL);
	if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
		return negative_errno();
	/* Queued, not waited for: it goes out with the first request, and the guest's own
	 * Hello is read whenever it arrives. */
	hello.protocol_version = GUEST_PROTOCOL_VERSION;
	hello.agent_version = (char *)EMBER_VERSION;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_HELLO;
	f.hello = &hello;
	r = queue(c, &f);
	if (r < 0)
		return r;
	*ret = TAKE_PTR(c);
	return 0;
}

int guest_conn_open_vsock(const char *uds_path, unsigned port, int timeout_ms, GuestConn **ret,
			  char **ret_error)
{
	int fd = fcctl_vsock_dial(uds_path, port, timeout_ms, ret_error);
	if (fd < 0)
		return fd;
	return guest_conn_from_fd(fd, ret);
}

int guest_conn_open_unix(const char *path, GuestConn **ret, char **ret_error)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	_cleanup_close_ int fd = -EBADF;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		if (ret_error && asprintf(ret_error, "%s: path too long", path) < 0)
			*ret_error = NULL;
		return -ENAMETOOLONG;
	}
	memcpy(sa.sun_path, path, strlen(path) + 1);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int r = -errno;
		if (ret_error && asprintf(ret_error, "%s: %s", path, strerror(-r)) < 0)
			*ret_error = NULL;
		return r;
	}
	return guest_conn_from_fd(TAKE_FD(fd), ret);
}

void guest_conn_set_timeout(GuestConn *c, int timeout_ms)
{
	c->timeout_ms = timeout_ms;
}

const char *guest_conn_error(const GuestConn *c)
{
	return c->error;
}

int guest_conn_fd(const GuestConn *c)
{
	return c->fd;
}

short guest_conn_poll_events(const GuestConn *c)
{
	return (short)(POLLIN | (guest_buf_pending(&c->out) > 0 ? POLLOUT : 0));
}

int guest_conn_flush(GuestConn *c)
{
	if (c->write_closed) {
		c->out.off = c->out.len = 0;
		return -EPIPE;
	}
	int r = guest_buf_flush(&c->out, c->fd);
	if (r == -EPIPE || r == -ECONNRESET) {
		/* The guest stopped reading (it is closing the connection): what we would send
		 * is dropped, but what it sent before is still to be read, such as the exit of
		 * the process. Reads go on until its end of the stream. */
		c->write_closed = true;
		c->out.off = c->out.len = 0;
		return fail(c, -EPIPE, "the guest closed the connection for writing");
	}
	if (r < 0 && r != -EAGAIN)
		return fail_broken(c, r, "cannot send to the guest");
	return r;
}

size_t guest_conn_pending_out(const GuestConn *c)
{
	return guest_buf_pending(&c->out);
}

/* The next frame that is not the guest's Hello: 1 and *ret; 0 when none came within
 * timeout_ms (0: none is buffered); -errno. Queued frames are sent meanwhile. The Hello is
 * recorded on the way; with stop_at_hello its arrival returns 2. */
static int conn_next_frame(GuestConn *c, int timeout_ms, bool stop_at_hello, GuestFrame **ret)
{
	int64_t deadline = timeout_ms >= 0 ? now_ms() + timeout_ms : -1;
	bool filled = false;

	if (c->broken)
		return fail(c, -ENOTCONN, "connection unusable after an earlier error");
	for (;;) {
		GuestFrame *f = NULL;
		int r = guest_buf_next_frame(&c->in, &f);
		if (r == -EMSGSIZE) {
			c->broken = true;
			return fail(
				c, r,
				"the guest announced a frame larger than %zu KiB, the most it may "
				"send",
				c->in.max_frame >> 10);
		}
		if (r == -ENOBUFS) {
			c->broken = true;
			return fail(
				c, r,
				"the guest sent a frame that needs far more memory to parse than "
				"its size justifies");
		}
		if (r < 0) {
			c->broken = true;
			return fail(c, r, "the guest sent bytes that are not a frame");
		}
		if (r > 0) {
			if (f->kind_case != EMBER__GUEST__V1__FRAME__KIND_HELLO) {
				*ret = f;
				return 1;
			}
			if (c->hello_seen) {
				guest_frame_free(f);
				return fail_broken(c, -EPROTO, "the guest sent a second hello");
			}
			c->hello_seen = true;
			c->guest_protocol = f->hello->protocol_version;
			free(c->guest_version);
			c->guest_version = strdup(f->hello->agent_version);
			guest_frame_free(f);
			if (stop_at_hello)
				return 2;
			/* A guest of another protocol answers our Hello with an Error, which
			 * comes next. */
			continue;
		}

		r = guest_conn_flush(c);
		if (r < 0 && r != -EAGAIN && r != -EPIPE)
			return r;
		/* A guest that keeps the socket readable must not keep us past the deadline:
		 * checked once something was read in this call (timeout 0 still reads). */
		if (filled && deadline >= 0 && now_ms() >= deadline)
			return 0;
		r = guest_buf_fill(&c->in, c->fd, c->in.max_frame + GUEST_FRAME_HEADER);
		filled = true;
		if (r > 0)
			continue;
		if (r == -ECONNRESET) {
			/* In the middle of a frame too: a connection that ends is a connection
			 * lost (a VMM that died while output flowed), not a malformed frame. */
			c->broken = true;
			return fail(c, -ECONNRESET, "the guest closed the connection%s",
				    guest_buf_pending(&c->in) ? " in the middle of a frame" : "");
		}
		if (r != -EAGAIN)
			return fail_broken(c, r, "cannot read from the guest");

		int64_t left = deadline < 0 ? -1 : deadline - now_ms();
		if (deadline >= 0 && left <= 0)
			return 0;
		struct pollfd p = {.fd = c->fd, .events = guest_conn_poll_events(c)};
		if (poll(&p, 1, left > 60000 || left < 0 ? 60000 : (int)left) < 0 && errno != EINTR)
			return fail_broken(c, negative_errno(), "poll");
	}
}

static int conn_next(GuestConn *c, int timeout_ms, GuestFrame **ret)
{
	return conn_next_frame(c, timeout_ms, false, ret);
}

/* conn_next() for request/response calls: a frame, or an error (-ETIMEDOUT). */
static int conn_wait(GuestConn *c, GuestFrame **ret)
{
	int r = conn_next(c, c->timeout_ms, ret);
	if (r == 0 || (r > 0 && !*ret)) {
		c->broken = true;
		return fail(c, -ETIMEDOUT, "no answer from the guest in %d ms", c->timeout_ms);
	}
	return r < 0 ? r : 0;
}

static int conn_send_wait(GuestConn *c, const GuestFrame *f)
{
	int r = queue(c, f);
	if (r < 0)
		return r;
	r = guest_buf_flush_wait(&c->out, c->fd, c->timeout_ms);
	if (r < 0)
		return fail_broken(c, r, "cannot send to the guest");
	return 0;
}

int guest_hello(GuestConn *c, GuestHello *ret)
{
	if (!c->hello_seen) {
		_cleanup_(guest_frame_freep) GuestFrame *f = NULL;
		int r = conn_next_frame(c, c->timeout_ms, true, &f);
		if (r < 0)
			return r;
		if (r == 0)
			return fail(c, -ETIMEDOUT, "no hello from the guest in %d ms",
				    c->timeout_ms);
		if (r == 1)
			return unexpected(c, f, "hello");
	}
	if (c->guest_protocol != GUEST_PROTOCOL_VERSION)
		return fail(c, -EPROTONOSUPPORT, "guest speaks protocol %u, we speak %u",
			    c->guest_protocol, GUEST_PROTOCOL_VERSION);
	*ret = (GuestHello){.protocol_version = c->guest_protocol,
			    .agent_version = c->guest_version ?: ""};
	return 0;
}

/* Sends a request, waits for the answer of kind `want`. */
static int request(GuestConn *c, const GuestFrame *req, FrameKind want, const char *want_name,
		   GuestFrame **ret)
{
	_cleanup_(guest_frame_freep) GuestFrame *f = NULL;
	int r;

	if (c->exec_started)
		return fail(c, -EBUSY, "the connection runs a process");
	r = conn_send_wait(c, req);
	if (r < 0)
		return r;
	r = conn_wait(c, &f);
	if (r < 0)
		return r;
	if (f->kind_case != want)
		return unexpected(c, f, want_name);
	*ret = TAKE_PTR(f);
	return 0;
}

int guest_ping(GuestConn *c)
{
	Ember__Guest__V1__Ping ping = EMBER__GUEST__V1__PING__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
	_cleanup_(guest_frame_freep) GuestFrame *reply = NULL;
	int r;

	ping.token = (uint64_t)now_ms();
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_PING;
	f.ping = &ping;
	r = request(c, &f, EMBER__GUEST__V1__FRAME__KIND_PONG, "pong", &reply);
	if (r < 0)
		return r;
	if (reply->pong->token != ping.token)
		return fail(c, -EPROTO, "pong for another ping");
	return 0;
}

int guest_set_clock(GuestConn *c, int64_t realtime_ns, bool *ret_applied, int64_t *ret_previous_ns)
{
	Ember__Guest__V1__SetClock sc = EMBER__GUEST__V1__SET_CLOCK__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
	_cleanup_(guest_frame_freep) GuestFrame *reply = NULL;
	int r;

	sc.realtime_ns = realtime_ns;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_SET_CLOCK;
	f.set_clock = &sc;
	r = request(c, &f, EMBER__GUEST__V1__FRAME__KIND_SET_CLOCK_DONE, "set_clock_done", &reply);
	if (r < 0)
		return r;
	if (ret_applied)
		*ret_applied = reply->set_clock_done->applied;
	if (ret_previous_ns)
		*ret_previous_ns = reply->set_clock_done->previous_realtime_ns;
	return 0;
}

/* ---- exec ---- */

static size_t strv_length(const char *const *v)
{
	size_t n = 0;
	while (v && v[n])
		n++;
	return n;
}

int guest_exec_start(GuestConn *c, const GuestExecSpec *spec, pid_t *ret_pid)
{
	Ember__Guest__V1__ExecStart start = EMBER__GUEST__V1__EXEC_START__INIT;
	Ember__Guest__V1__Credentials user = EMBER__GUEST__V1__CREDENTIALS__INIT;
	Ember__Guest__V1__Tty tty = EMBER__GUEST__V1__TTY__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
	_cleanup_(guest_frame_freep) GuestFrame *reply = NULL;
	int r;

	if (strv_length(spec->argv) == 0)
		return fail(c, -EINVAL, "exec: empty argv");
	if (c->exec_started)
		return fail(c, -EBUSY, "the connection runs a process already");
	start.n_argv = strv_length(spec->argv);
	start.argv = (char **)spec->argv;
	start.n_env = strv_length(spec->env);
	start.env = (char **)spec->env;
	start.env_replace = spec->env_replace;
	start.cwd = (char *)(spec->cwd ?: "");
	if (spec->set_user) {
		user.uid = spec->uid;
		user.gid = spec->gid;
		start.user = &user;
	}
	if (spec->tty) {
		tty.rows = spec->rows;
		tty.cols = spec->cols;
		start.tty = &tty;
	}
	start.stdin = spec->stdin;
	start.timeout_ms = spec->timeout_ms;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_EXEC_START;
	f.exec_start = &start;
	r = request(c, &f, EMBER__GUEST__V1__FRAME__KIND_EXEC_STARTED, "exec_started", &reply);
	if (r < 0)
		return r;
	c->exec_started = true;
	log_debug("guest exec %s: pid %d", spec->argv[0], reply->exec_started->pid);
	if (ret_pid)
		*ret_pid = reply->exec_started->pid;
	return 0;
}

int guest_exec_peek_event(GuestConn *c, GuestEventType *ret_type, size_t *ret_size)
{
	if (!c->exec_started || c->exec_over)
		return fail(c, -ECHILD, "no process runs on this connection");
	if (!c->peeked) {
		int r = conn_next(c, 0, &c->peeked);
		if (r <= 0)
			return r;
	}
	switch (c->peeked->kind_case) {
	case EMBER__GUEST__V1__FRAME__KIND_STDOUT_CHUNK:
		*ret_type = GUEST_EVENT_STDOUT;
		*ret_size = c->peeked->stdout_chunk->data.len;
		break;
	case EMBER__GUEST__V1__FRAME__KIND_STDERR_CHUNK:
		*ret_type = GUEST_EVENT_STDERR;
		*ret_size = c->peeked->stderr_chunk->data.len;
		break;
	case EMBER__GUEST__V1__FRAME__KIND_EXEC_EXIT:
		*ret_type = GUEST_EVENT_EXIT;
		*ret_size = 0;
		break;
	default:
		/* guest_exec_next_event() says what is wrong with it */
		*ret_type = _GUEST_EVENT_INVALID;
		*ret_size = 0;
		break;
	}
	return 1;
}

int guest_exec_next_event(GuestConn *c, GuestEvent *ret, int timeout_ms)
{
	GuestFrame *f = NULL;
	int r;

	guest_frame_free(TAKE_PTR(c->last));
	if (!c->exec_started || c->exec_over)
		return fail(c, -ECHILD, "no process runs on this connection");
	if (c->peeked)
		f = TAKE_PTR(c->peeked);
	else if ((r = conn_next(c, timeout_ms, &f)) <= 0)
		return r;
	c->last = f;
	switch (f->kind_case) {
	case EMBER__GUEST__V1__FRAME__KIND_STDOUT_CHUNK:
		*ret = (GuestEvent){.type = GUEST_EVENT_STDOUT,
				    .data = f->stdout_chunk->data.data,
				    .size = f->stdout_chunk->data.len};
		return 1;
	case EMBER__GUEST__V1__FRAME__KIND_STDERR_CHUNK:
		*ret = (GuestEvent){.type = GUEST_EVENT_STDERR,
				    .data = f->stderr_chunk->data.data,
				    .size = f->stderr_chunk->data.len};
		return 1;
	case EMBER__GUEST__V1__FRAME__KIND_EXEC_EXIT:
		c->exec_over = true;
		*ret = (GuestEvent){.type = GUEST_EVENT_EXIT,
				    .code = f->exec_exit->code,
				    .signal = f->exec_exit->signal,
				    .timed_out = f->exec_exit->timed_out,
				    .core_dumped = f->exec_exit->core_dumped};
		return 1;
	default:
		c->exec_over = true;
		return unexpected(c, f, "process output or exit");
	}
}

/* equal today; the assertion keeps the header's promise true if the frame limit grows */
/* NOLINTNEXTLINE(misc-redundant-expression) */
_Static_assert(GUEST_FRAME_FROM_GUEST_MAX <= GUEST_EVENT_DATA_MAX, "an event's data fits");

void *guest_exec_take_data(GuestConn *c)
{
	Ember__Guest__V1__Chunk *chunk = NULL;
	void *data;

	if (!c->last)
		return NULL;
	if (c->last->kind_case == EMBER__GUEST__V1__FRAME__KIND_STDOUT_CHUNK)
		chunk = c->last->stdout_chunk;
	else if (c->last->kind_case == EMBER__GUEST__V1__FRAME__KIND_STDERR_CHUNK)
		chunk = c->last->stderr_chunk;
	if (!chunk)
		return NULL;
	/* protobuf-c gave the bytes a malloc() of their own (guest_frame_parse()'s allocator);
	 * cleared here, guest_frame_free() leaves them alone */
	data = chunk->data.data;
	chunk->data = (ProtobufCBinaryData){0};
	return data;
}

static int exec_control(GuestConn *c, GuestFrame *f)
{
	if (!c->exec_started || c->exec_over)
		return fail(c, -ECHILD, "no process runs on this connection");
	if (c->write_closed)
		return fail(c, -EPIPE, "the guest closed the connection for writing");
	int r = queue(c, f);
	if (r < 0)
		return r;
	r = guest_conn_flush(c);
	return r == -EAGAIN ? 0 : r;
}

ssize_t guest_exec_write_stdin(GuestConn *c, const void *data, size_t size)
{
	Ember__Guest__V1__Chunk chunk = EMBER__GUEST__V1__CHUNK__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
	int r;

	if (guest_buf_pending(&c->out) >= STDIN_QUEUE_LIMIT) {
		r = guest_conn_flush(c);
		if (r < 0 && r != -EAGAIN)
			return r;
		if (guest_buf_pending(&c->out) >= STDIN_QUEUE_LIMIT)
			return -EAGAIN;
	}
	if (size > GUEST_CHUNK_MAX)
		size = GUEST_CHUNK_MAX;
	chunk.data.data = (uint8_t *)data;
	chunk.data.len = size;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_STDIN_CHUNK;
	f.stdin_chunk = &chunk;
	r = exec_control(c, &f);
	return r < 0 ? r : (ssize_t)size;
}

int guest_exec_close_stdin(GuestConn *c)
{
	Ember__Guest__V1__CloseStdin cs = EMBER__GUEST__V1__CLOSE_STDIN__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;

	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_CLOSE_STDIN;
	f.close_stdin = &cs;
	return exec_control(c, &f);
}

int guest_exec_resize(GuestConn *c, unsigned rows, unsigned cols)
{
	Ember__Guest__V1__Resize rs = EMBER__GUEST__V1__RESIZE__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;

	rs.rows = rows;
	rs.cols = cols;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_RESIZE;
	f.resize = &rs;
	return exec_control(c, &f);
}

int guest_exec_signal(GuestConn *c, int sig)
{
	Ember__Guest__V1__Signal s = EMBER__GUEST__V1__SIGNAL__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;

	s.signal = sig;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_SIGNAL;
	f.signal = &s;
	return exec_control(c, &f);
}

/* ---- files ---- */

static int write_all(int fd, const uint8_t *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN) {
			struct pollfd pf = {.fd = fd, .events = POLLOUT};
			(void)poll(&pf, 1, -1);
			continue;
		}
		if (w < 0)
			return -errno;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

int guest_file_write_begin(GuestConn *c, const char *path, const GuestFileAttrs *attrs)
{
	Ember__Guest__V1__FileWrite fw = EMBER__GUEST__V1__FILE_WRITE__INIT;
	Ember__Guest__V1__Credentials owner = EMBER__GUEST__V1__CREDENTIALS__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;

	if (c->exec_started)
		return fail(c, -EBUSY, "the connection runs a process");
	if (c->file_op)
		return fail(c, -EBUSY, "a file transfer is in progress on the connection");
	fw.path = (char *)path;
	if (attrs && attrs->mode >= 0) {
		fw.mode = (uint32_t)attrs->mode;
		fw.has_mode = true;
	}
	if (attrs && attrs->set_owner) {
		owner.uid = attrs->uid;
		owner.gid = attrs->gid;
		fw.owner = &owner;
	}
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_FILE_WRITE;
	f.file_write = &fw;
	int r = conn_send_wait(c, &f);
	if (r < 0)
		return r;
	c->file_op = true;
	c->file_size = 0;
	return 0;
}

/* The guest answers a failure of a write (no such directory, disk full) at once, before
 * FileEnd: collects such an early answer without waiting. */
static int file_write_early_answer(GuestConn *c)
{
	if (c->file_reply)
		return 0;
	int r = conn_next(c, 0, &c->file_reply);
	if (r < 0)
		return r;
	if (c->file_reply && c->file_reply->kind_case == EMBER__GUEST__V1__FRAME__KIND_ERROR) {
		c->file_op = false;
		r = guest_error(c, c->file_reply);
		guest_frame_free(TAKE_PTR(c->file_reply));
		return r;
	}
	return 0;
}

int guest_file_write_data(GuestConn *c, const void *data, size_t size)
{
	Ember__Guest__V1__Chunk chunk = EMBER__GUEST__V1__CHUNK__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
	const uint8_t *p = data;
	int r;

	if (!c->file_op)
		return fail(c, -EINVAL, "no file write in progress");
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_FILE_DATA;
	f.file_data = &chunk;
	while (size > 0) {
		if ((r = file_write_early_answer(c)) < 0)
			return r;
		if (c->file_reply)
			/* anything else before FileEnd is out of step */
			return unexpected(c, c->file_reply, "nothing before file_end");
		chunk.data.data = (uint8_t *)p;
		chunk.data.len = size < GUEST_CHUNK_MAX ? size : GUEST_CHUNK_MAX;
		r = conn_send_wait(c, &f);
		if (r < 0)
			return r;
		c->file_size += chunk.data.len;
		p += chunk.data.len;
		size -= chunk.data.len;
	}
	return 0;
}

int guest_file_write_end(GuestConn *c, uint64_t *ret_size)
{
	Ember__Guest__V1__FileEnd end = EMBER__GUEST__V1__FILE_END__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
	_cleanup_(guest_frame_freep) GuestFrame *reply = NULL;
	int r;

	if (!c->file_op)
		return fail(c, -EINVAL, "no file write in progress");
	if ((r = file_write_early_answer(c)) < 0)
		return r;
	c->file_op = false;
	/* The guest waits for FileEnd even after an early error, to stay in step. */
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_FILE_END;
	f.file_end = &end;
	r = conn_send_wait(c, &f);
	if (r < 0)
		return r;
	reply = TAKE_PTR(c->file_reply);
	if (!reply && (r = conn_wait(c, &reply)) < 0)
		return r;
	if (reply->kind_case != EMBER__GUEST__V1__FRAME__KIND_FILE_WRITTEN)
		return unexpected(c, reply, "file_written");
	if (reply->file_written->size != c->file_size)
		return fail(c, -EPROTO, "the guest says it wrote %llu bytes of %llu",
			    (unsigned long long)reply->file_written->size,
			    (unsigned long long)c->file_size);
	if (ret_size)
		*ret_size = c->file_size;
	return 0;
}

int guest_file_write(GuestConn *c, const char *path, const GuestFileAttrs *attrs, int fd,
		     uint64_t *ret_size)
{
	_cleanup_free_ uint8_t *buf = NULL;
	int r;

	buf = malloc(GUEST_CHUNK_MAX);
	if (!buf)
		return fail(c, -ENOMEM, "out of memory");
	if ((r = guest_file_write_begin(c, path, attrs)) < 0)
		return r;
	for (;;) {
		ssize_t n = read(fd, buf, GUEST_CHUNK_MAX);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			/* FileEnd would commit a partial file: closing the connection makes
			 * the guest drop its temporary file instead. */
			return fail_broken(c, negative_errno(), "cannot read the local file");
		}
		if (n == 0)
			break;
		if ((r = guest_file_write_data(c, buf, (size_t)n)) < 0)
			return r;
	}
	return guest_file_write_end(c, ret_size);
}

int guest_file_read_begin(GuestConn *c, const char *path, GuestFileInfo *ret_info)
{
	Ember__Guest__V1__FileRead fr = EMBER__GUEST__V1__FILE_READ__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
	_cleanup_(guest_frame_freep) GuestFrame *info = NULL;
	int r;

	if (c->file_op)
		return fail(c, -EBUSY, "a file transfer is in progress on the connection");
	fr.path = (char *)path;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_FILE_READ;
	f.file_read = &fr;
	r = request(c, &f, EMBER__GUEST__V1__FRAME__KIND_FILE_INFO, "file_info", &info);
	if (r < 0)
		return r;
	c->file_op = true;
	c->file_size = 0;
	c->file_declared = info->file_info->size;
	if (ret_info)
		*ret_info = (GuestFileInfo){.size = info->file_info->size,
					    .mode = info->file_info->mode,
					    .uid = info->file_info->uid,
					    .gid = info->file_info->gid};
	return 0;
}

int guest_file_read_next(GuestConn *c, const uint8_t **ret_data, size_t *ret_size)
{
	GuestFrame *d = NULL;
	int r;

	guest_frame_free(TAKE_PTR(c->last));
	if (!c->file_op)
		return fail(c, -EINVAL, "no file read in progress");
	r = conn_wait(c, &d);
	if (r < 0)
		return r;
	c->last = d;
	if (d->kind_case == EMBER__GUEST__V1__FRAME__KIND_FILE_END) {
		c->file_op = false;
		if (c->file_size != c->file_declared)
			return fail(c, -ENODATA,
				    "the guest sent %llu bytes of a file it said has %llu (did it "
				    "change while it was read?)",
				    (unsigned long long)c->file_size,
				    (unsigned long long)c->file_declared);
		return 0;
	}
	if (d->kind_case != EMBER__GUEST__V1__FRAME__KIND_FILE_DATA) {
		c->file_op = false;
		return unexpected(c, d, "file data");
	}
	/* Never more than declared: the caller sized its limits by the declared size. */
	if (d->file_data->data.len > c->file_declared - c->file_size) {
		c->file_op = false;
		c->broken = true;
		return fail(c, -EOVERFLOW, "the guest sent more than the %llu bytes it declared",
			    (unsigned long long)c->file_declared);
	}
	/* An empty chunk carries nothing; endless ones would keep the reader busy for ever. */
	if (d->file_data->data.len == 0) {
		c->file_op = false;
		c->broken = true;
		return fail(c, -EPROTO, "the guest sent an empty file chunk");
	}
	c->file_size += d->file_data->data.len;
	*ret_data = d->file_data->data.data;
	*ret_size = d->file_data->data.len;
	return 1;
}

int guest_file_read(GuestConn *c, const char *path, int fd, GuestFileInfo *ret_info,
		    uint64_t *ret_size)
{
	int r;

	if ((r = guest_file_read_begin(c, path, ret_info)) < 0)
		return r;
	for (;;) {
		const uint8_t *data;
		size_t n;
		r = guest_file_read_next(c, &data, &n);
		if (r < 0)
			return r;
		if (r == 0)
			break;
		r = write_all(fd, data, n);
		if (r < 0)
			/* The rest is still coming: the stream is no use any more. */
			return fail_broken(c, r, "cannot write the local file");
	}
	if (ret_size)
		*ret_size = c->file_size;
	return 0;
}
