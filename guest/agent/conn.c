/* SPDX-License-Identifier: Apache-2.0 */
/* One connection: hello, then requests until the host closes it or an exec ends it. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

int conn_send(Conn *c, const GuestFrame *f)
{
	return guest_frame_send(c->fd, &c->out, f, AGENT_SEND_TIMEOUT_MS);
}

int conn_send_error(Conn *c, int errnum, const char *format, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, format);
	(void)vsnprintf(msg, sizeof(msg), format, ap);
	va_end(ap);
	return guest_send_error(c->fd, &c->out, errnum, msg, AGENT_SEND_TIMEOUT_MS);
}

static int64_t timespec_ns(const struct timespec *ts)
{
	return (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec;
}

static int set_clock(Conn *c, const Ember__Guest__V1__SetClock *req)
{
	Ember__Guest__V1__SetClockDone done = EMBER__GUEST__V1__SET_CLOCK_DONE__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
	struct timespec prev, ts = {
				      .tv_sec = req->realtime_ns / 1000000000,
				      .tv_nsec = req->realtime_ns % 1000000000,
			      };

	if (req->realtime_ns <= 0)
		return conn_send_error(c, EINVAL, "set clock: %lld ns is not a time",
				       (long long)req->realtime_ns);
	clock_gettime(CLOCK_REALTIME, &prev);
	done.previous_realtime_ns = timespec_ns(&prev);
	/* fcsim's guest is a container: its clock is the host's, which is not ours to set. */
	done.applied = !agent_sim;
	if (done.applied && clock_settime(CLOCK_REALTIME, &ts) < 0) {
		int r = -errno;
		agent_log("set clock: %s", strerror(-r));
		return conn_send_error(c, r, "set clock: %s", strerror(-r));
	}
	agent_log("clock %s: off by %+.3f s", done.applied ? "set" : "not set (fcsim)",
		  (double)(done.previous_realtime_ns - req->realtime_ns) / 1e9);
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_SET_CLOCK_DONE;
	f.set_clock_done = &done;
	return conn_send(c, &f);
}

static int pong(Conn *c, const Ember__Guest__V1__Ping *req)
{
	Ember__Guest__V1__Pong p = EMBER__GUEST__V1__PONG__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;

	p.token = req->token;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_PONG;
	f.pong = &p;
	return conn_send(c, &f);
}

/* Closing a socket that still has unread data resets the connection, and a reset can
 * overtake the last frames we sent (fcsim's relay drops them when its write to us fails; a
 * vsock RST ends Firecracker's side at once). A host may well have frames in flight when the
 * process exits (stdin, CloseStdin). So: half-close, then read and drop until the host closes
 * its end, for a while. */
static void conn_linger(Conn *c)
{
	int64_t deadline = agent_now_ms() + LINGER_CLOSE_MS;
	char buf[16384];

	if (shutdown(c->fd, SHUT_WR) < 0)
		return;
	for (;;) {
		int64_t left = deadline - agent_now_ms();
		struct pollfd p = {.fd = c->fd, .events = POLLIN};
		if (left <= 0 || poll(&p, 1, (int)left) <= 0)
			return;
		ssize_t n = read(c->fd, buf, sizeof(buf));
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
			return;
	}
}

static void conn_done(Conn *c)
{
	guest_buf_free(&c->in);
	guest_buf_free(&c->out);
	if (c->fd >= 0)
		conn_linger(c);
	c->fd = safe_close(c->fd);
}

int agent_serve(int fd)
{
	_cleanup_(conn_done) Conn c = {.fd = fd};
	struct sigaction sa = {.sa_handler = SIG_DFL};
	int r;

	/* The listener's SA_NOCLDWAIT would make our own children vanish unwaited. */
	sigaction(SIGCHLD, &sa, NULL);
	r = fcntl(fd, F_GETFL);
	if (r < 0 || fcntl(fd, F_SETFL, r | O_NONBLOCK) < 0)
		return 1;

	/* Ours goes first, unasked: the host need not wait for it before its first request. */
	r = guest_send_hello(fd, &c.out, EMBER_VERSION, AGENT_SEND_TIMEOUT_MS);
	if (r < 0)
		return 0;

	for (bool hello = false;;) {
		_cleanup_(guest_frame_freep) GuestFrame *f = NULL;

		r = guest_frame_recv(fd, &c.in, -1, &f);
		if (r == -ECONNRESET)
			return 0;
		if (r < 0) {
			agent_log("connection: %s", strerror(-r));
			if (r == -EMSGSIZE || r == -EBADMSG)
				(void)conn_send_error(&c, -r, "bad frame: %s", strerror(-r));
			return 1;
		}
		if (!hello) {
			if (f->kind_case != EMBER__GUEST__V1__FRAME__KIND_HELLO) {
				(void)conn_send_error(&c, EPROTO, "expected hello, got %s",
						      guest_frame_kind_name(f));
				return 1;
			}
			if (f->hello->protocol_version != GUEST_PROTOCOL_VERSION) {
				agent_log("host speaks protocol %u, we speak %u",
					  f->hello->protocol_version, GUEST_PROTOCOL_VERSION);
				(void)conn_send_error(&c, EPROTONOSUPPORT,
						      "protocol %u not supported (ember-guest "
						      "%s speaks %u)",
						      f->hello->protocol_version, EMBER_VERSION,
						      GUEST_PROTOCOL_VERSION);
				return 1;
			}
			hello = true;
			continue;
		}

		switch (f->kind_case) {
		case EMBER__GUEST__V1__FRAME__KIND_PING:
			r = pong(&c, f->ping);
			break;
		case EMBER__GUEST__V1__FRAME__KIND_SET_CLOCK:
			r = set_clock(&c, f->set_clock);
			break;
		case EMBER__GUEST__V1__FRAME__KIND_EXEC_START:
			/* A process owns its connection: it ends with it. */
			r = agent_exec(&c, f->exec_start);
			if (r < 0 && r != -ECONNRESET)
				agent_log("exec: %s", strerror(-r));
			return r < 0 ? 1 : 0;
		case EMBER__GUEST__V1__FRAME__KIND_FILE_WRITE:
			r = agent_file_write(&c, f->file_write);
			break;
		case EMBER__GUEST__V1__FRAME__KIND_FILE_READ:
			r = agent_file_read(&c, f->file_read);
			break;
		default:
			/* Unknown kinds (a newer host) get an answer, so the host is not left
			 * waiting; the connection stays usable. */
			r = conn_send_error(&c, EOPNOTSUPP, "unexpected %s frame",
					    guest_frame_kind_name(f));
			break;
		}
		if (r < 0) {
			if (r != -EPIPE && r != -ECONNRESET)
				agent_log("connection: %s", strerror(-r));
			return 1;
		}
	}
}
