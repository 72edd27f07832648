/* SPDX-License-Identifier: Apache-2.0 */
/*
 * libFuzzer target for the proto3 JSON transcoder (agent/pbjson.c). The first byte picks a
 * message type: a request or response of the Node service, or the test root
 * ember.pbjsontest.Kinds (every field kind). The rest is taken two ways:
 *
 *   - as JSON: parse → message → JSON text → message again; what was accepted must encode,
 *     the text must parse again, and both messages must pack to the same bytes;
 *   - as a binary message (Node types only: Kinds nests without bound, and protobuf-c's unpack
 *     has no depth limit): unpack → JSON text → message → JSON text; what encodes must decode,
 *     and both texts must be equal.
 *
 * Every refusal must come with a message. Anything else aborts.
 *
 *   make fuzz-pbjson FUZZ_RUNS=...                 (clang + libFuzzer)
 *   make check-pbjson-fuzz                          (the seed corpus, no libFuzzer needed)
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent/pbjson.h"
#include "common/macro.h"
#include "ember/v1/node.pb-c.h"
#include "pbjson_kinds.pb-c.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_TYPES 128

static const ProtobufCMessageDescriptor *types[MAX_TYPES];
static size_t n_types;

static void add_type(const ProtobufCMessageDescriptor *d)
{
	for (size_t i = 0; i < n_types; i++)
		if (types[i] == d)
			return;
	if (n_types == MAX_TYPES)
		abort();
	types[n_types++] = d;
}

/* In the service's order, so a corpus file keeps its type as long as node.proto only grows. */
static void init_types(void)
{
	const ProtobufCServiceDescriptor *s = &ember__v1__node__descriptor;

	if (n_types > 0)
		return;
	add_type(&ember__pbjsontest__kinds__descriptor);
	for (unsigned i = 0; i < s->n_methods; i++) {
		add_type(s->methods[i].input);
		add_type(s->methods[i].output);
	}
}

static char *to_text(const ProtobufCMessage *m)
{
	_cleanup_(pbjson_json_putp) struct json_object *o = NULL;
	int r = pbjson_to_json(m, &o);

	if (r < 0)
		return NULL;
	return strdup(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN));
}

/* Text → message; NULL when refused, which must come with a reason. */
static ProtobufCMessage *from_text(const ProtobufCMessageDescriptor *d, const char *text,
				   size_t size)
{
	_cleanup_(pbjson_json_putp) struct json_object *o = NULL;
	_cleanup_free_ char *error = NULL;
	ProtobufCMessage *m = NULL;
	int r;

	r = pbjson_parse(text, size, &o, NULL, &error);
	if (r >= 0)
		r = pbjson_from_json(d, o, &m, &error);
	if (r == -EINVAL && !error)
		abort();
	if (r < 0 && r != -EINVAL)
		abort(); /* no other failure is expected here, out of memory aside */
	return r < 0 ? NULL : m;
}

static uint8_t *pack(const ProtobufCMessage *m, size_t *ret_size)
{
	size_t n = protobuf_c_message_get_packed_size(m);
	uint8_t *out = malloc(n + 1);

	if (!out || protobuf_c_message_pack(m, out) != n)
		abort();
	*ret_size = n;
	return out;
}

static void json_round_trip(const ProtobufCMessageDescriptor *d, const char *text, size_t size)
{
	_cleanup_(pbjson_message_freep) ProtobufCMessage *m1 = NULL, *m2 = NULL;
	_cleanup_free_ char *t1 = NULL;
	_cleanup_free_ uint8_t *b1 = NULL, *b2 = NULL;
	size_t n1, n2;

	m1 = from_text(d, text, size);
	if (!m1)
		return;
	/* whatever was accepted can be said again, and reads back as the same message */
	t1 = to_text(m1);
	if (!t1)
		abort();
	m2 = from_text(d, t1, strlen(t1));
	if (!m2)
		abort();
	b1 = pack(m1, &n1);
	b2 = pack(m2, &n2);
	if (n1 != n2 || memcmp(b1, b2, n1) != 0)
		abort();
}

static void binary_round_trip(const ProtobufCMessageDescriptor *d, const uint8_t *data, size_t size)
{
	_cleanup_(pbjson_message_freep) ProtobufCMessage *m1 = NULL, *m2 = NULL;
	_cleanup_free_ char *t1 = NULL, *t2 = NULL;

	m1 = protobuf_c_message_unpack(d, NULL, size, data);
	if (!m1)
		return;
	t1 = to_text(m1);
	if (!t1)
		return; /* not UTF-8, a Timestamp out of range, ...: JSON cannot say it */
	m2 = from_text(d, t1, strlen(t1));
	if (!m2)
		abort();
	t2 = to_text(m2);
	if (!t2 || strcmp(t1, t2) != 0)
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const ProtobufCMessageDescriptor *d;

	if (size == 0)
		return 0;
	init_types();
	d = types[data[0] % n_types];
	json_round_trip(d, (const char *)data + 1, size - 1);
	if (d != &ember__pbjsontest__kinds__descriptor)
		binary_round_trip(d, data + 1, size - 1);
	return 0;
}

#ifdef FUZZ_REPLAY_MAIN
/* Replays files (a corpus, crashes) without libFuzzer: for `make check-pbjson-fuzz`. */
int main(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		_cleanup_fclose_ FILE *f = fopen(argv[i], "re");
		_cleanup_free_ uint8_t *buf = NULL;
		long size;

		if (!f || fseek(f, 0, SEEK_END) < 0 || (size = ftell(f)) < 0 ||
		    fseek(f, 0, SEEK_SET) < 0) {
			fprintf(stderr, "cannot read %s\n", argv[i]);
			return 1;
		}
		buf = malloc((size_t)size + 1);
		if (!buf || fread(buf, 1, (size_t)size, f) != (size_t)size) {
			fprintf(stderr, "cannot read %s\n", argv[i]);
			return 1;
		}
		LLVMFuzzerTestOneInput(buf, (size_t)size);
	}
	printf("%d inputs replayed\n", argc - 1);
	return 0;
}
#endif
