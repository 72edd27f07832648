/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The guest protocol's framing (proto/ember/v1/guest.proto), shared by ember-guest and the
 * host's client library: a 4-byte big-endian length, then one serialized Frame. Everything
 * here works on non-blocking fds and bounded buffers; the blocking helpers wait with poll().
 *
 * Internal to guest/: the client library's public header hides these types.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/macro.h"
#include "ember/v1/guest.pb-c.h"

#define GUEST_PROTOCOL_VERSION 1u
#define GUEST_FRAME_HEADER     4u
/* The largest serialized Frame either side accepts by default. Chunks are far smaller
 * (GUEST_CHUNK_MAX); the limit only bounds what a broken or hostile peer can make the other
 * side buffer. The host's ExecStart (argv, env) is what needs the room. */
#define GUEST_FRAME_MAX (4u << 20)
/* What the host accepts from the guest, which it does not trust: a data chunk and its framing
 * fit with room to spare, nothing the protocol sends that way is larger. */
#define GUEST_FRAME_FROM_GUEST_MAX (256u << 10)
/* Memory one parse may allocate: this many times the frame's size, plus a floor for small
 * frames. A frame of tiny fields (unknown ones above all, which protobuf-c keeps) costs far
 * more to unpack than its size; such a frame is refused instead. */
#define GUEST_PARSE_BUDGET_FACTOR 16u
#define GUEST_PARSE_BUDGET_FLOOR  (64u << 10)
/* Data chunks (stdin, stdout, stderr, file data) carry at most this much. */
#define GUEST_CHUNK_MAX  (128u << 10)
#define GUEST_VSOCK_PORT 1024u
#define GUEST_SIM_SOCKET "/run/vsock/1024.sock"

typedef Ember__Guest__V1__Frame GuestFrame;

/* A byte buffer with a consumed prefix: data[off..len) is pending. */
typedef struct GuestBuf {
	uint8_t *data;
	size_t off, len, cap;
	size_t max_frame; /* frames read from it: at most this big; 0 means GUEST_FRAME_MAX */
} GuestBuf;

static inline size_t guest_buf_pending(const GuestBuf *b)
{
	return b->len - b->off;
}
void guest_buf_free(GuestBuf *b);
/* Makes room for n more bytes after len (compacting the consumed prefix first). */
int guest_buf_reserve(GuestBuf *b, size_t n);

void guest_frame_free(GuestFrame *f);
DEFINE_POINTER_CLEANUP(GuestFrame, guest_frame_free);

/* Appends f, with its header, to out. -EMSGSIZE above GUEST_FRAME_MAX. */
int guest_frame_append(GuestBuf *out, const GuestFrame *f);

/* Parses one frame from data[0..size):
 *   > 0   a frame in *ret; the return value is the number of bytes it took
 *   0     incomplete: more bytes are needed
 *   -EMSGSIZE  the header announces more than max bytes (known before the body comes)
 *   -ENOBUFS   unpacking it needs more memory than its allocation budget
 *   -EBADMSG   the body is not a Frame
 * A frame with no kind set parses fine (a newer peer's unknown kind looks like that): the
 * receiver decides. */
int guest_frame_parse(const uint8_t *data, size_t size, size_t max, GuestFrame **ret);

/* Reads what the fd has, at most max bytes, into in: > 0 bytes read, -ECONNRESET at EOF,
 * -EAGAIN when nothing is there, -errno. */
int guest_buf_fill(GuestBuf *in, int fd, size_t max);
/* The next complete frame in `in` (at most in->max_frame bytes), consumed: 1 and *ret, 0 when
 * incomplete, < 0 as guest_frame_parse(). */
int guest_buf_next_frame(GuestBuf *in, GuestFrame **ret);
/* Writes pending bytes: 0 when all are out, -EAGAIN when the fd is full, -errno (-EPIPE when
 * the peer is gone). */
int guest_buf_flush(GuestBuf *out, int fd);

/* Blocking, on a non-blocking fd: waits up to timeout_ms (< 0: forever) for each step. */
int guest_frame_recv(int fd, GuestBuf *in, int timeout_ms, GuestFrame **ret);
int guest_frame_send(int fd, GuestBuf *out, const GuestFrame *f, int timeout_ms);
/* Flushes all of out, waiting for the fd as needed. */
int guest_buf_flush_wait(GuestBuf *out, int fd, int timeout_ms);

/* Builders for the frames both sides send. */
int guest_send_hello(int fd, GuestBuf *out, const char *agent_version, int timeout_ms);
int guest_send_error(int fd, GuestBuf *out, int errnum, const char *message, int timeout_ms);

/* "hello", "exec_start", ...; "unknown" for a kind this build does not know. */
const char *guest_frame_kind_name(const GuestFrame *f);
