/* SPDX-License-Identifier: Apache-2.0 */
/* Framing for the guest protocol: 4-byte big-endian length + one serialized Frame. */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "frame.h"

/* What one read() takes from a socket: large enough that 100 MiB streams do not cost a
 * system call per small piece, small enough to keep the buffer bounded. */
#define FILL_STEP (256u << 10)

void guest_buf_free(GuestBuf *b)
{
	free(b->data);
	*b = (GuestBuf){0};
}

int guest_buf_reserve(GuestBuf *b, size_t n)
{
	if (b->off > 0 && (b->off == b->len || b->cap - b->len < n)) {
		memmove(b->data, b->data + b->off, b->len - b->off);
		b->len -= b->off;
		b->off = 0;
	}
	if (b->cap - b->len >= n)
		return 0;
	size_t cap = b->cap ? b->cap : 4096;
	while (cap - b->len < n)
		cap *= 2;
	uint8_t *d = realloc(b->data, cap);
	if (!d)
		return -ENOMEM;
	b->data = d;
	b->cap = cap;
	return 0;
}

void guest_frame_free(GuestFrame *f)
{
	if (f)
		ember__guest__v1__frame__free_unpacked(f, NULL);
}

int guest_frame_append(GuestBuf *out, const GuestFrame *f)
{
	size_t size = ember__guest__v1__frame__get_packed_size(f);
	int r;

	if (size > GUEST_FRAME_MAX)
		return -EMSGSIZE;
	r = guest_buf_reserve(out, GUEST_FRAME_HEADER + size);
	if (r < 0)
		return r;
	uint8_t *p = out->data + out->len;
	p[0] = (uint8_t)(size >> 24);
	p[1] = (uint8_t)(size >> 16);
	p[2] = (uint8_t)(size >> 8);
	p[3] = (uint8_t)size;
	(void)ember__guest__v1__frame__pack(f, p + GUEST_FRAME_HEADER);
	out->len += GUEST_FRAME_HEADER + size;
	return 0;
}

/* protobuf-c allocator with a budget; frees are plain free(), so that a frame it unpacked is
 * freed like any other (guest_frame_free()). */
typedef struct ParseBudget {
	size_t left;
	bool exhausted;
} ParseBudget;

static void *budget_alloc(void *data, size_t size)
{
	ParseBudget *b = data;
	if (size > b->left) {
		b->exhausted = true;
		return NULL;
	}
	b->left -= size;
	return malloc(size);
}

static void budget_free(void *data, void *p)
{
	(void)data;
	free(p);
}

int guest_frame_parse(const uint8_t *data, size_t size, size_t max, GuestFrame **ret)
{
	if (size < GUEST_FRAME_HEADER)
		return 0;
	uint32_t n = (uint32_t)data[0] << 24 | (uint32_t)data[1] << 16 | (uint32_t)data[2] << 8 |
		     (uint32_t)data[3];
	/* Refused on the header alone: a peer announcing 4 GiB must not make us wait for (or
	 * buffer) it. */
	if (n > (max ?: GUEST_FRAME_MAX))
		return -EMSGSIZE;
	if (size - GUEST_FRAME_HEADER < n)
		return 0;
	ParseBudget b = {.left = (size_t)n * GUEST_PARSE_BUDGET_FACTOR + GUEST_PARSE_BUDGET_FLOOR};
	ProtobufCAllocator a = {.alloc = budget_alloc, .free = budget_free, .allocator_data = &b};
	GuestFrame *f = ember__guest__v1__frame__unpack(&a, n, data + GUEST_FRAME_HEADER);
	if (!f)
		return b.exhausted ? -ENOBUFS : -EBADMSG;
	*ret = f;
	return (int)(GUEST_FRAME_HEADER + n);
}

int guest_buf_fill(GuestBuf *in, int fd, size_t max)
{
	size_t step = max < FILL_STEP ? max : FILL_STEP;
	int r;

	if (step == 0)
		return -ENOBUFS;
	r = guest_buf_reserve(in, step);
	if (r < 0)
		return r;
	for (;;) {
		ssize_t n = read(fd, in->data + in->len, step);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return errno == EWOULDBLOCK ? -EAGAIN : -errno;
		if (n == 0)
			return -ECONNRESET;
		in->len += (size_t)n;
		return (int)n;
	}
}

int guest_buf_next_frame(GuestBuf *in, GuestFrame **ret)
{
	int r = guest_frame_parse(in->data + in->off, guest_buf_pending(in), in->max_frame, ret);
	if (r <= 0)
		return r;
	in->off += (size_t)r;
	if (in->off == in->len)
		in->off = in->len = 0;
	return 1;
}

int guest_buf_flush(GuestBuf *out, int fd)
{
	while (guest_buf_pending(out) > 0) {
		/* send() with MSG_NOSIGNAL where it is a socket: a host that went away must be an
		 * EPIPE here, not a SIGPIPE for the whole process. */
		ssize_t n = send(fd, out->data + out->off, guest_buf_pending(out), MSG_NOSIGNAL);
		if (n < 0 && errno == ENOTSOCK)
			n = write(fd, out->data + out->off, guest_buf_pending(out));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return errno == EWOULDBLOCK ? -EAGAIN : -errno;
		out->off += (size_t)n;
	}
	out->off = out->len = 0;
	return 0;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for fd; -ETIMEDOUT. POLLHUP/POLLERR count as ready: the next read or write says what
 * happened. */
static int wait_fd(int fd, short events, int64_t deadline)
{
	for (;;) {
		int timeout = -1;
		if (deadline >= 0) {
			int64_t left = deadline - now_ms();
			if (left <= 0)
				return -ETIMEDOUT;
			timeout = left > 60000 ? 60000 : (int)left;
		}
		struct pollfd p = {.fd = fd, .events = events};
		int r = poll(&p, 1, timeout);
		if (r < 0 && errno != EINTR)
			return -errno;
		if (r > 0)
			return 0;
	}
}

int guest_frame_recv(int fd, GuestBuf *in, int timeout_ms, GuestFrame **ret)
{
	int64_t deadline = timeout_ms >= 0 ? now_ms() + timeout_ms : -1;

	for (;;) {
		int r = guest_buf_next_frame(in, ret);
		if (r != 0)
			return r < 0 ? r : 0;
		r = guest_buf_fill(in, fd, (in->max_frame ?: GUEST_FRAME_MAX) + GUEST_FRAME_HEADER);
		if (r == -ECONNRESET && guest_buf_pending(in) > 0)
			return -EBADMSG; /* the stream ended inside a frame */
		if (r == -EAGAIN)
			r = wait_fd(fd, POLLIN, deadline);
		if (r < 0)
			return r;
	}
}

int guest_buf_flush_wait(GuestBuf *out, int fd, int timeout_ms)
{
	int64_t deadline = timeout_ms >= 0 ? now_ms() + timeout_ms : -1;

	for (;;) {
		int r = guest_buf_flush(out, fd);
		if (r != -EAGAIN)
			return r;
		r = wait_fd(fd, POLLOUT, deadline);
		if (r < 0)
			return r;
	}
}

int guest_frame_send(int fd, GuestBuf *out, const GuestFrame *f, int timeout_ms)
{
	int r = guest_frame_append(out, f);
	if (r < 0)
		return r;
	return guest_buf_flush_wait(out, fd, timeout_ms);
}

int guest_send_hello(int fd, GuestBuf *out, const char *agent_version, int timeout_ms)
{
	Ember__Guest__V1__Hello hello = EMBER__GUEST__V1__HELLO__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;

	hello.protocol_version = GUEST_PROTOCOL_VERSION;
	hello.agent_version = (char *)agent_version;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_HELLO;
	f.hello = &hello;
	return guest_frame_send(fd, out, &f, timeout_ms);
}

int guest_send_error(int fd, GuestBuf *out, int errnum, const char *message, int timeout_ms)
{
	Ember__Guest__V1__Error error = EMBER__GUEST__V1__ERROR__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;

	error.errnum = errnum < 0 ? -errnum : errnum;
	error.message = (char *)message;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_ERROR;
	f.error = &error;
	return guest_frame_send(fd, out, &f, timeout_ms);
}

const char *guest_frame_kind_name(const GuestFrame *f)
{
	const ProtobufCFieldDescriptor *d;

	if (f->kind_case == EMBER__GUEST__V1__FRAME__KIND__NOT_SET)
		return "unknown";
	d = protobuf_c_message_descriptor_get_field(&ember__guest__v1__frame__descriptor,
						    (unsigned)f->kind_case);
	return d ? d->name : "unknown";
}
