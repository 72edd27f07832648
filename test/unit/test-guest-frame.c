/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The guest protocol's framing (guest/proto/frame.c): both ends parse what the other sends,
 * so a truncated, oversized or garbled frame must be told apart from a good one without
 * reading past it or waiting for a body that can never be accepted.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/macro.h"
#include "guest/proto/frame.h"

static void put_be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

/* An exec start with every kind of field set, binary data in a chunk after it. */
static void encode_sample(GuestBuf *out)
{
	static char *argv[] = {(char *)"sh", (char *)"-c", (char *)"echo hi"};
	static char *env[] = {(char *)"A=1"};
	static uint8_t bytes[] = {0, 1, 2, 0xff, '\n', 0};
	Ember__Guest__V1__ExecStart start = EMBER__GUEST__V1__EXEC_START__INIT;
	Ember__Guest__V1__Tty tty = EMBER__GUEST__V1__TTY__INIT;
	Ember__Guest__V1__Chunk chunk = EMBER__GUEST__V1__CHUNK__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;

	start.n_argv = ELEMENTSOF(argv);
	start.argv = argv;
	start.n_env = ELEMENTSOF(env);
	start.env = env;
	start.cwd = (char *)"/tmp";
	tty.rows = 40;
	tty.cols = 132;
	start.tty = &tty;
	start.stdin = true;
	start.timeout_ms = 1500;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_EXEC_START;
	f.exec_start = &start;
	assert_int_equal(guest_frame_append(out, &f), 0);

	chunk.data.data = bytes;
	chunk.data.len = sizeof(bytes);
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_STDOUT_CHUNK;
	f.stdout_chunk = &chunk;
	assert_int_equal(guest_frame_append(out, &f), 0);
}

static void test_round_trip(void **state)
{
	GuestBuf b = {0};
	size_t total;
	int r;
	(void)state;

	encode_sample(&b);
	total = guest_buf_pending(&b);

	_cleanup_(guest_frame_freep) GuestFrame *f = NULL;
	r = guest_frame_parse(b.data, total, 0, &f);
	assert_true(r > 0 && (size_t)r < total);
	assert_int_equal(f->kind_case, EMBER__GUEST__V1__FRAME__KIND_EXEC_START);
	assert_int_equal(f->exec_start->n_argv, 3);
	assert_string_equal(f->exec_start->argv[2], "echo hi");
	assert_string_equal(f->exec_start->env[0], "A=1");
	assert_string_equal(f->exec_start->cwd, "/tmp");
	assert_non_null(f->exec_start->tty);
	assert_int_equal(f->exec_start->tty->rows, 40);
	assert_int_equal(f->exec_start->tty->cols, 132);
	assert_true(f->exec_start->stdin);
	assert_int_equal(f->exec_start->timeout_ms, 1500);
	assert_null(f->exec_start->user);
	assert_string_equal(guest_frame_kind_name(f), "exec_start");

	_cleanup_(guest_frame_freep) GuestFrame *g = NULL;
	int r2 = guest_frame_parse(b.data + r, total - (size_t)r, 0, &g);
	assert_int_equal((size_t)r + (size_t)r2, total);
	assert_int_equal(g->kind_case, EMBER__GUEST__V1__FRAME__KIND_STDOUT_CHUNK);
	assert_int_equal(g->stdout_chunk->data.len, 6);
	assert_memory_equal(g->stdout_chunk->data.data, "\0\1\2\377\n\0", 6);
	guest_buf_free(&b);
}

/* Every proper prefix of a frame is "need more", never a frame and never an error. */
static void test_truncated(void **state)
{
	GuestBuf b = {0};
	(void)state;

	encode_sample(&b);
	uint32_t first = (uint32_t)b.data[0] << 24 | (uint32_t)b.data[1] << 16 |
			 (uint32_t)b.data[2] << 8 | b.data[3];
	for (size_t n = 0; n < GUEST_FRAME_HEADER + first; n++) {
		GuestFrame *f = NULL;
		assert_int_equal(guest_frame_parse(b.data, n, 0, &f), 0);
		assert_null(f);
	}
	guest_buf_free(&b);
}

static void test_oversize(void **state)
{
	uint8_t hdr[GUEST_FRAME_HEADER];
	GuestFrame *f = NULL;
	(void)state;

	/* Refused on the header alone, before any of the body is there. */
	put_be32(hdr, GUEST_FRAME_MAX + 1);
	assert_int_equal(guest_frame_parse(hdr, sizeof(hdr), 0, &f), -EMSGSIZE);
	put_be32(hdr, UINT32_MAX);
	assert_int_equal(guest_frame_parse(hdr, sizeof(hdr), 0, &f), -EMSGSIZE);
	/* Exactly the maximum is still "need more". */
	put_be32(hdr, GUEST_FRAME_MAX);
	assert_int_equal(guest_frame_parse(hdr, sizeof(hdr), 0, &f), 0);
	assert_null(f);

	/* And nobody can send one. */
	_cleanup_free_ uint8_t *big = calloc(1, GUEST_FRAME_MAX);
	assert_non_null(big);
	Ember__Guest__V1__Chunk chunk = EMBER__GUEST__V1__CHUNK__INIT;
	GuestFrame out = EMBER__GUEST__V1__FRAME__INIT;
	GuestBuf b = {0};
	chunk.data.data = big;
	chunk.data.len = GUEST_FRAME_MAX;
	out.kind_case = EMBER__GUEST__V1__FRAME__KIND_FILE_DATA;
	out.file_data = &chunk;
	assert_int_equal(guest_frame_append(&b, &out), -EMSGSIZE);
	assert_int_equal(guest_buf_pending(&b), 0);
	guest_buf_free(&b);
}

/* The host's limit for frames from the guest, and the allocation budget of a parse. */
static void test_guest_limit_and_budget(void **state)
{
	_cleanup_free_ uint8_t *buf = NULL;
	GuestFrame *f = NULL;
	GuestBuf b = {0};
	(void)state;

	/* A full data chunk from the guest is within the host's limit... */
	_cleanup_free_ uint8_t *data = calloc(1, GUEST_CHUNK_MAX);
	assert_non_null(data);
	Ember__Guest__V1__Chunk chunk = EMBER__GUEST__V1__CHUNK__INIT;
	GuestFrame out = EMBER__GUEST__V1__FRAME__INIT;
	chunk.data.data = data;
	chunk.data.len = GUEST_CHUNK_MAX;
	out.kind_case = EMBER__GUEST__V1__FRAME__KIND_STDOUT_CHUNK;
	out.stdout_chunk = &chunk;
	assert_int_equal(guest_frame_append(&b, &out), 0);
	int r = guest_frame_parse(b.data, b.len, GUEST_FRAME_FROM_GUEST_MAX, &f);
	assert_int_equal(r, (int)b.len);
	guest_frame_free(f);
	f = NULL;
	guest_buf_free(&b);

	/* ... one byte over it is refused on the header alone */
	uint8_t hdr[GUEST_FRAME_HEADER];
	put_be32(hdr, GUEST_FRAME_FROM_GUEST_MAX + 1);
	assert_int_equal(guest_frame_parse(hdr, sizeof(hdr), GUEST_FRAME_FROM_GUEST_MAX, &f),
			 -EMSGSIZE);

	/* 200 KiB of two-byte unknown fields (field 1000, varint 0): valid protobuf, but
	 * protobuf-c keeps each one, at many times its size. Refused by the budget. */
	size_t n = 200u << 10;
	buf = malloc(GUEST_FRAME_HEADER + n);
	assert_non_null(buf);
	put_be32(buf, (uint32_t)n);
	for (size_t i = 0; i < n; i += 3) {
		/* tag (1000 << 3 | 0) as a two-byte varint, then the value 0 */
		buf[GUEST_FRAME_HEADER + i] = 0xc0;
		if (i + 1 < n)
			buf[GUEST_FRAME_HEADER + i + 1] = 0x3e;
		if (i + 2 < n)
			buf[GUEST_FRAME_HEADER + i + 2] = 0;
	}
	n -= n % 3;
	put_be32(buf, (uint32_t)n);
	assert_int_equal(
		guest_frame_parse(buf, GUEST_FRAME_HEADER + n, GUEST_FRAME_FROM_GUEST_MAX, &f),
		-ENOBUFS);
	assert_null(f);
	/* the same few fields in a small frame are fine (the floor) */
	put_be32(buf, 300);
	r = guest_frame_parse(buf, GUEST_FRAME_HEADER + 300, GUEST_FRAME_FROM_GUEST_MAX, &f);
	assert_int_equal(r, GUEST_FRAME_HEADER + 300);
	guest_frame_free(f);
}

static void test_garbage(void **state)
{
	/* Field 1 (hello) as a length-delimited field claiming 100 bytes, with 3 there. */
	static const uint8_t bad_length[] = {0x0a, 100, 1, 2, 3};
	/* A wire type 7 field: no such wire type. */
	static const uint8_t bad_wire_type[] = {0x0f, 0, 0};
	/* A truncated varint. */
	static const uint8_t bad_varint[] = {0x18, 0xff, 0xff};
	const struct {
		const uint8_t *p;
		size_t n;
	} cases[] = {
		{bad_length, sizeof(bad_length)},
		{bad_wire_type, sizeof(bad_wire_type)},
		{bad_varint, sizeof(bad_varint)},
	};
	(void)state;

	for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
		uint8_t buf[64];
		GuestFrame *f = NULL;
		put_be32(buf, (uint32_t)cases[i].n);
		memcpy(buf + GUEST_FRAME_HEADER, cases[i].p, cases[i].n);
		assert_int_equal(guest_frame_parse(buf, GUEST_FRAME_HEADER + cases[i].n, 0, &f),
				 -EBADMSG);
		assert_null(f);
	}
}

/* An empty body is a Frame with no kind: what a newer peer's unknown kind looks like. */
static void test_unknown_kind(void **state)
{
	/* Field 99, varint 1: unknown to this build. */
	static const uint8_t body[] = {0x98, 0x06, 0x01};
	uint8_t buf[16];
	(void)state;

	put_be32(buf, 0);
	_cleanup_(guest_frame_freep) GuestFrame *f = NULL;
	assert_int_equal(guest_frame_parse(buf, GUEST_FRAME_HEADER, 0, &f), GUEST_FRAME_HEADER);
	assert_int_equal(f->kind_case, EMBER__GUEST__V1__FRAME__KIND__NOT_SET);
	assert_string_equal(guest_frame_kind_name(f), "unknown");

	put_be32(buf, sizeof(body));
	memcpy(buf + GUEST_FRAME_HEADER, body, sizeof(body));
	_cleanup_(guest_frame_freep) GuestFrame *g = NULL;
	assert_int_equal(guest_frame_parse(buf, GUEST_FRAME_HEADER + sizeof(body), 0, &g),
			 (int)(GUEST_FRAME_HEADER + sizeof(body)));
	assert_int_equal(g->kind_case, EMBER__GUEST__V1__FRAME__KIND__NOT_SET);
}

/* Through a socket pair, one byte at a time: the reader assembles frames across reads and
 * tells a stream cut inside a frame from one that ended between frames. */
static void test_stream(void **state)
{
	GuestBuf out = {0}, in = {0};
	int sv[2];
	(void)state;

	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
	encode_sample(&out);
	size_t total = guest_buf_pending(&out);
	for (size_t i = 0; i < total; i++)
		assert_int_equal(write(sv[0], out.data + i, 1), 1);

	int frames = 0;
	for (;;) {
		GuestFrame *f = NULL;
		int r = guest_buf_next_frame(&in, &f);
		assert_true(r >= 0);
		if (r > 0) {
			frames++;
			guest_frame_free(f);
			continue;
		}
		r = guest_buf_fill(&in, sv[1], 1);
		if (r == -EAGAIN)
			break;
		assert_int_equal(r, 1);
	}
	assert_int_equal(frames, 2);
	assert_int_equal(guest_buf_pending(&in), 0);

	/* Half a frame, then EOF: the blocking reader calls that a bad message. */
	assert_int_equal(write(sv[0], out.data, 7), 7);
	close(sv[0]);
	GuestFrame *f = NULL;
	assert_int_equal(guest_frame_recv(sv[1], &in, 1000, &f), -EBADMSG);
	assert_null(f);
	close(sv[1]);

	/* EOF between frames is the peer closing. */
	GuestBuf in2 = {0};
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
	close(sv[0]);
	assert_int_equal(guest_frame_recv(sv[1], &in2, 1000, &f), -ECONNRESET);
	close(sv[1]);

	/* Nothing comes: a timeout. */
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
	assert_int_equal(guest_frame_recv(sv[1], &in2, 50, &f), -ETIMEDOUT);
	close(sv[0]);
	close(sv[1]);

	guest_buf_free(&out);
	guest_buf_free(&in);
	guest_buf_free(&in2);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_round_trip),
		cmocka_unit_test(test_truncated),
		cmocka_unit_test(test_oversize),
		cmocka_unit_test(test_garbage),
		cmocka_unit_test(test_guest_limit_and_budget),
		cmocka_unit_test(test_unknown_kind),
		cmocka_unit_test(test_stream),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
