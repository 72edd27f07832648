/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The proto3 JSON transcoder (agent/pbjson.c) on the command line, for test_pbjson.py, which
 * holds it to Python's json_format:
 *
 *   pbjson-tool to-json <full.message.Name>     binary message on stdin, JSON on stdout
 *   pbjson-tool from-json <full.message.Name>   JSON on stdin (pbjson_parse()), binary on stdout
 *   pbjson-tool list                             every message type it knows, one a line
 *
 * It knows every message the Node service reaches (requests, responses and what they hold), the
 * test messages of pbjson_kinds.proto and google.protobuf.FileDescriptorSet's (proto2, for
 * has_ flags and defaults). Exit status 1, with the reason on stderr, when the input is
 * refused; 2 for a usage error.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent/pbjson.h"
#include "common/macro.h"
#include "ember/v1/node.pb-c.h"
#include "google/protobuf/descriptor.pb-c.h"
#include "pbjson_kinds.pb-c.h"

#define MAX_TYPES 512

static const ProtobufCMessageDescriptor *types[MAX_TYPES];
static size_t n_types;

static void add_type(const ProtobufCMessageDescriptor *d)
{
	for (size_t i = 0; i < n_types; i++)
		if (types[i] == d)
			return;
	if (n_types == MAX_TYPES) {
		fprintf(stderr, "pbjson-tool: more than %d message types\n", MAX_TYPES);
		exit(2);
	}
	types[n_types++] = d;
	for (unsigned i = 0; i < d->n_fields; i++)
		if (d->fields[i].type == PROTOBUF_C_TYPE_MESSAGE)
			add_type(d->fields[i].descriptor);
}

static void add_types(void)
{
	const ProtobufCServiceDescriptor *s = &ember__v1__node__descriptor;

	for (unsigned i = 0; i < s->n_methods; i++) {
		add_type(s->methods[i].input);
		add_type(s->methods[i].output);
	}
	add_type(&ember__pbjsontest__kinds__descriptor);
	add_type(&google__protobuf__file_descriptor_set__descriptor);
}

static const ProtobufCMessageDescriptor *find_type(const char *name)
{
	for (size_t i = 0; i < n_types; i++)
		if (strcmp(types[i]->name, name) == 0)
			return types[i];
	return NULL;
}

static int read_all(FILE *f, char **ret, size_t *ret_size)
{
	_cleanup_free_ char *buf = NULL;
	size_t size = 0, cap = 0;

	for (;;) {
		if (size == cap) {
			char *n = realloc(buf, cap ? 2 * cap : 4096);
			if (!n)
				return -ENOMEM;
			buf = n;
			cap = cap ? 2 * cap : 4096;
		}
		size_t k = fread(buf + size, 1, cap - size, f);
		size += k;
		if (k == 0) {
			if (ferror(f))
				return -EIO;
			break;
		}
	}
	*ret = TAKE_PTR(buf);
	*ret_size = size;
	return 0;
}

static int to_json(const ProtobufCMessageDescriptor *d, const char *in, size_t size)
{
	_cleanup_(pbjson_message_freep) ProtobufCMessage *m = NULL;
	_cleanup_(pbjson_json_putp) struct json_object *o = NULL;
	int r;

	m = protobuf_c_message_unpack(d, NULL, size, (const uint8_t *)in);
	if (!m) {
		fprintf(stderr, "pbjson-tool: cannot decode the binary %s\n", d->name);
		return 1;
	}
	r = pbjson_to_json(m, &o);
	if (r < 0) {
		fprintf(stderr, "pbjson-tool: cannot encode in JSON: %s\n", strerror(-r));
		return 1;
	}
	puts(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN |
						       JSON_C_TO_STRING_NOSLASHESCAPE));
	return 0;
}

static int from_json(const ProtobufCMessageDescriptor *d, const char *in, size_t size)
{
	_cleanup_(pbjson_message_freep) ProtobufCMessage *m = NULL;
	_cleanup_(pbjson_json_putp) struct json_object *o = NULL;
	_cleanup_free_ uint8_t *out = NULL;
	_cleanup_free_ char *error = NULL;
	size_t n;
	int r;

	r = pbjson_parse(in, size, &o, NULL, &error);
	if (r >= 0)
		r = pbjson_from_json(d, o, &m, &error);
	if (r < 0) {
		fprintf(stderr, "pbjson-tool: %s\n", error ?: strerror(-r));
		return 1;
	}
	n = protobuf_c_message_get_packed_size(m);
	out = malloc(n + 1);
	if (!out)
		return 2;
	if (protobuf_c_message_pack(m, out) != n || fwrite(out, 1, n, stdout) != n)
		return 2;
	return 0;
}

int main(int argc, char **argv)
{
	_cleanup_free_ char *in = NULL;
	const ProtobufCMessageDescriptor *d;
	size_t size;
	int r;

	add_types();
	if (argc == 2 && strcmp(argv[1], "list") == 0) {
		for (size_t i = 0; i < n_types; i++)
			puts(types[i]->name);
		return 0;
	}
	if (argc != 3 || (strcmp(argv[1], "to-json") != 0 && strcmp(argv[1], "from-json") != 0)) {
		fprintf(stderr, "usage: pbjson-tool to-json|from-json <message type>\n"
				"       pbjson-tool list\n");
		return 2;
	}
	d = find_type(argv[2]);
	if (!d) {
		fprintf(stderr, "pbjson-tool: unknown message type %s\n", argv[2]);
		return 2;
	}
	r = read_all(stdin, &in, &size);
	if (r < 0) {
		fprintf(stderr, "pbjson-tool: cannot read stdin: %s\n", strerror(-r));
		return 2;
	}
	r = strcmp(argv[1], "to-json") == 0 ? to_json(d, in, size) : from_json(d, in, size);
	if (fflush(stdout) != 0)
		return 2;
	return r;
}
