/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The descriptor index over the embedded FileDescriptorSet: the gRPC layer takes streaming
 * kinds from it (a wrong kind hangs or breaks a call) and server reflection hands out its files
 * (grpcurl needs every import exactly once), so both lookups and closures are checked against
 * what the .proto files say.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "agent/descriptor-set.h"
#include "agent/rpc-internal.h"
#include "common/macro.h"
#include "google/protobuf/descriptor.pb-c.h"

#define NODE_PROTO       "ember/v1/node.proto"
#define HEALTH_PROTO     "grpc/health/v1/health.proto"
#define TIMESTAMP_PROTO  "google/protobuf/timestamp.proto"
#define DURATION_PROTO   "google/protobuf/duration.proto"
#define FIELD_MASK_PROTO "google/protobuf/field_mask.proto"

static int group_setup(void **state)
{
	RpcDescIndex *idx = NULL;

	if (rpc_desc_index_new(ember_descriptor_set, ember_descriptor_set_size, &idx) < 0)
		return -1;
	*state = idx;
	return 0;
}

static int group_teardown(void **state)
{
	rpc_desc_index_free(*state);
	return 0;
}

static void test_index_new(void **state)
{
	RpcDescIndex *idx = NULL;
	(void)state;

	/* Also done by the group setup; here so that a failure has a test name and a code. */
	assert_int_equal(rpc_desc_index_new(ember_descriptor_set, ember_descriptor_set_size, &idx),
			 0);
	assert_non_null(idx);
	/* node.proto, its three well-known imports, health, reflection v1 and v1alpha. */
	assert_int_equal(idx->n_files, 7);
	assert_true(idx->n_symbols > 0);
	assert_true(idx->n_methods > 0);
	rpc_desc_index_free(idx);
}

static void test_find_file(void **state)
{
	const RpcDescIndex *idx = *state;
	static const char *const names[] = {
		NODE_PROTO,
		TIMESTAMP_PROTO,
		DURATION_PROTO,
		FIELD_MASK_PROTO,
		HEALTH_PROTO,
		"grpc/reflection/v1/reflection.proto",
		"grpc/reflection/v1alpha/reflection.proto",
	};

	for (size_t i = 0; i < ELEMENTSOF(names); i++) {
		const RpcDescFile *f = rpc_desc_find_file(idx, names[i]);
		if (!f)
			fail_msg("%s not in the descriptor set", names[i]);
		assert_string_equal(f->name, names[i]);
	}
	assert_null(rpc_desc_find_file(idx, "ember/v1/nope.proto"));
	assert_null(rpc_desc_find_file(idx, "node.proto"));
	assert_null(rpc_desc_find_file(idx, ""));
	assert_null(rpc_desc_find_file(idx, NULL));
}

/* Reflection sends these bytes as they are: they must be the whole FileDescriptorProto of that
 * file, services and streaming flags included. */
static void test_file_data(void **state)
{
	const RpcDescIndex *idx = *state;
	const RpcDescFile *f = rpc_desc_find_file(idx, NODE_PROTO);
	Google__Protobuf__FileDescriptorProto *fd;
	bool found_exec = false;

	assert_non_null(f);
	assert_non_null(f->data);
	fd = google__protobuf__file_descriptor_proto__unpack(NULL, f->size, f->data);
	assert_non_null(fd);
	assert_string_equal(fd->name, NODE_PROTO);
	assert_string_equal(fd->package, "ember.v1");
	assert_int_equal(fd->n_dependency, 3);
	assert_int_equal(fd->n_service, 1);
	assert_string_equal(fd->service[0]->name, "Node");
	for (size_t i = 0; i < fd->service[0]->n_method; i++) {
		const Google__Protobuf__MethodDescriptorProto *m = fd->service[0]->method[i];
		if (strcmp(m->name, "Exec") == 0) {
			found_exec = true;
			assert_true(m->has_client_streaming && m->client_streaming);
			assert_true(m->has_server_streaming && m->server_streaming);
		}
	}
	google__protobuf__file_descriptor_proto__free_unpacked(fd, NULL);
	assert_true(found_exec);
}

static void assert_symbol_in(const RpcDescIndex *idx, const char *symbol, const char *file)
{
	const RpcDescFile *f = rpc_desc_find_symbol(idx, symbol);

	if (!f)
		fail_msg("symbol %s not found", symbol);
	if (strcmp(f->name, file) != 0)
		fail_msg("symbol %s found in %s, expected %s", symbol, f->name, file);
}

static void test_find_symbol(void **state)
{
	const RpcDescIndex *idx = *state;

	assert_symbol_in(idx, "ember.v1.Node", NODE_PROTO);
	/* grpcurl and other clients send fully qualified names with the leading dot. */
	assert_symbol_in(idx, ".ember.v1.Node", NODE_PROTO);
	assert_symbol_in(idx, "ember.v1.Node.GetNode", NODE_PROTO);
	assert_symbol_in(idx, "ember.v1.Node.Exec", NODE_PROTO);
	assert_symbol_in(idx, "ember.v1.NodeInfo", NODE_PROTO);
	assert_symbol_in(idx, "ember.v1.NodeInfo.node_id", NODE_PROTO);
	assert_symbol_in(idx, "ember.v1.SandboxState", NODE_PROTO);
	/* Enum values are scoped like C++ enumerators: in the enum's parent, not in the enum. */
	assert_symbol_in(idx, "ember.v1.SANDBOX_STATE_RUNNING", NODE_PROTO);
	assert_symbol_in(idx, "google.protobuf.Timestamp", TIMESTAMP_PROTO);
	assert_symbol_in(idx, ".google.protobuf.Duration", DURATION_PROTO);
	assert_symbol_in(idx, "grpc.health.v1.Health", HEALTH_PROTO);
	assert_symbol_in(idx, "grpc.health.v1.Health.Watch", HEALTH_PROTO);
	/* A nested enum and its value. */
	assert_symbol_in(idx, "grpc.health.v1.HealthCheckResponse.ServingStatus", HEALTH_PROTO);
	assert_symbol_in(idx, "grpc.health.v1.HealthCheckResponse.SERVING", HEALTH_PROTO);
	assert_symbol_in(idx, "grpc.reflection.v1.ServerReflection",
			 "grpc/reflection/v1/reflection.proto");
	assert_symbol_in(idx, "grpc.reflection.v1alpha.ServerReflection",
			 "grpc/reflection/v1alpha/reflection.proto");

	assert_null(rpc_desc_find_symbol(idx, "ember.v1.NoSuchThing"));
	assert_null(rpc_desc_find_symbol(idx, "ember.v1"));
	assert_null(rpc_desc_find_symbol(idx, "ember.v1.Node."));
	assert_null(rpc_desc_find_symbol(idx, "ember.v1.SandboxState.SANDBOX_STATE_RUNNING"));
	assert_null(rpc_desc_find_symbol(idx, "Node"));
	assert_null(rpc_desc_find_symbol(idx, "..ember.v1.Node"));
	assert_null(rpc_desc_find_symbol(idx, ""));
	assert_null(rpc_desc_find_symbol(idx, "."));
	assert_null(rpc_desc_find_symbol(idx, NULL));
}

/* Lookups are binary searches: they silently miss entries unless the arrays are sorted, and a
 * duplicate would make the answer depend on where the search lands. */
static void test_sorted_unique(void **state)
{
	const RpcDescIndex *idx = *state;

	for (size_t i = 1; i < idx->n_symbols; i++)
		if (strcmp(idx->symbols[i - 1].name, idx->symbols[i].name) >= 0)
			fail_msg("symbols out of order or duplicated: %s, %s",
				 idx->symbols[i - 1].name, idx->symbols[i].name);
	for (size_t i = 1; i < idx->n_methods; i++)
		if (strcmp(idx->methods[i - 1].name, idx->methods[i].name) >= 0)
			fail_msg("methods out of order or duplicated: %s, %s",
				 idx->methods[i - 1].name, idx->methods[i].name);
	for (size_t i = 0; i < idx->n_symbols; i++) {
		assert_true(idx->symbols[i].file < idx->n_files);
		if (rpc_desc_find_symbol(idx, idx->symbols[i].name) !=
		    &idx->files[idx->symbols[i].file])
			fail_msg("symbol %s not found by lookup", idx->symbols[i].name);
	}
}

static void assert_method(const RpcDescIndex *idx, const char *service, const char *method,
			  bool client_streaming, bool server_streaming)
{
	const RpcDescMethod *m = rpc_desc_find_method(idx, service, method);

	if (!m)
		fail_msg("method %s/%s not found", service, method);
	if (m->client_streaming != client_streaming || m->server_streaming != server_streaming)
		fail_msg("method %s/%s: client_streaming=%d server_streaming=%d, expected %d %d",
			 service, method, m->client_streaming, m->server_streaming,
			 client_streaming, server_streaming);
}

static void test_find_method(void **state)
{
	const RpcDescIndex *idx = *state;
	const RpcDescMethod *m;

	m = rpc_desc_find_method(idx, "ember.v1.Node", "GetNode");
	assert_non_null(m);
	assert_string_equal(m->name, "ember.v1.Node.GetNode");

	assert_method(idx, "ember.v1.Node", "GetNode", false, false);
	assert_method(idx, "ember.v1.Node", "CreateSandbox", false, false);
	assert_method(idx, "ember.v1.Node", "Exec", true, true);
	assert_method(idx, "ember.v1.Node", "WatchSandboxes", false, true);
	assert_method(idx, "ember.v1.Node", "PullTemplate", false, true);
	assert_method(idx, "grpc.health.v1.Health", "Check", false, false);
	assert_method(idx, "grpc.health.v1.Health", "Watch", false, true);
	assert_method(idx, "grpc.reflection.v1.ServerReflection", "ServerReflectionInfo", true,
		      true);
	assert_method(idx, "grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo", true,
		      true);

	assert_null(rpc_desc_find_method(idx, "ember.v1.Node", "NoSuchMethod"));
	assert_null(rpc_desc_find_method(idx, "ember.v1.Nope", "GetNode"));
	assert_null(rpc_desc_find_method(idx, "grpc.health.v1.Health", "GetNode"));
	/* A message is not a service. */
	assert_null(rpc_desc_find_method(idx, "ember.v1", "NodeInfo"));
}

static size_t count_in(const RpcDescFile **files, size_t n, const char *name)
{
	size_t c = 0;

	for (size_t i = 0; i < n; i++)
		c += strcmp(files[i]->name, name) == 0;
	return c;
}

/* Every file in the closure appears once, and every import of a member is a member. */
static void assert_closure_complete(const RpcDescIndex *idx, const RpcDescFile **files, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		assert_true(files[i] >= idx->files && files[i] < idx->files + idx->n_files);
		if (count_in(files, n, files[i]->name) != 1)
			fail_msg("%s appears more than once in the closure", files[i]->name);
		for (size_t j = 0; j < files[i]->n_deps; j++) {
			const RpcDescFile *dep = &idx->files[files[i]->deps[j]];
			if (count_in(files, n, dep->name) != 1)
				fail_msg("%s imports %s, which is missing from the closure",
					 files[i]->name, dep->name);
		}
	}
}

static void test_closure_node(void **state)
{
	const RpcDescIndex *idx = *state;
	const RpcDescFile *node = rpc_desc_find_file(idx, NODE_PROTO);
	_cleanup_free_ const RpcDescFile **files = NULL;
	int n;

	assert_non_null(node);
	assert_int_equal(node->n_deps, 3);
	n = rpc_desc_closure(idx, node, &files);
	assert_int_equal(n, 4);
	assert_non_null(files);
	assert_ptr_equal(files[0], node);
	assert_int_equal(count_in(files, (size_t)n, NODE_PROTO), 1);
	assert_int_equal(count_in(files, (size_t)n, TIMESTAMP_PROTO), 1);
	assert_int_equal(count_in(files, (size_t)n, DURATION_PROTO), 1);
	assert_int_equal(count_in(files, (size_t)n, FIELD_MASK_PROTO), 1);
	assert_closure_complete(idx, files, (size_t)n);
}

static void test_closure_leaf(void **state)
{
	const RpcDescIndex *idx = *state;
	const RpcDescFile *health = rpc_desc_find_file(idx, HEALTH_PROTO);
	_cleanup_free_ const RpcDescFile **files = NULL;

	assert_non_null(health);
	assert_int_equal(rpc_desc_closure(idx, health, &files), 1);
	assert_ptr_equal(files[0], health);
}

static void test_closure_every_file(void **state)
{
	const RpcDescIndex *idx = *state;

	for (size_t i = 0; i < idx->n_files; i++) {
		_cleanup_free_ const RpcDescFile **files = NULL;
		int n = rpc_desc_closure(idx, &idx->files[i], &files);

		assert_true(n >= 1);
		assert_ptr_equal(files[0], &idx->files[i]);
		assert_closure_complete(idx, files, (size_t)n);
	}
}

/* ---- hand-built sets: shapes the embedded one does not have ---- */

/* protobuf-c's structs take char *; these arrays keep -Wwrite-strings happy. */
static char n_a[] = "a.proto", n_b[] = "b.proto", n_c[] = "c.proto", n_d[] = "d.proto";
static char n_pkg[] = "pkg", n_outer[] = "Outer", n_inner[] = "Inner", n_enum[] = "E",
	    n_value[] = "V", n_field[] = "f", n_oneof[] = "choice", n_service[] = "S",
	    n_method[] = "Upload", n_type[] = ".pkg.Outer";

static uint8_t *pack_set(Google__Protobuf__FileDescriptorProto **files, size_t n, size_t *ret_size)
{
	Google__Protobuf__FileDescriptorSet set = GOOGLE__PROTOBUF__FILE_DESCRIPTOR_SET__INIT;
	uint8_t *buf;

	set.n_file = n;
	set.file = files;
	*ret_size = google__protobuf__file_descriptor_set__get_packed_size(&set);
	buf = malloc(*ret_size ?: 1);
	assert_non_null(buf);
	google__protobuf__file_descriptor_set__pack(&set, buf);
	return buf;
}

/* Gives `f` a service with one method. The import tests add it so that their sets have
 * symbols and methods like any real one; an index with neither is test_empty_set's case. */
static void add_service(Google__Protobuf__FileDescriptorProto *f,
			Google__Protobuf__ServiceDescriptorProto **services,
			Google__Protobuf__ServiceDescriptorProto *svc,
			Google__Protobuf__MethodDescriptorProto **methods,
			Google__Protobuf__MethodDescriptorProto *m)
{
	m->name = n_method;
	m->input_type = n_type;
	m->output_type = n_type;
	methods[0] = m;
	svc->name = n_service;
	svc->n_method = 1;
	svc->method = methods;
	services[0] = svc;
	f->n_service = 1;
	f->service = services;
}

/* a imports b and c, both import d: d must appear once in a's closure, not twice. */
static void test_closure_diamond(void **state)
{
	Google__Protobuf__FileDescriptorProto a = GOOGLE__PROTOBUF__FILE_DESCRIPTOR_PROTO__INIT,
					      b = GOOGLE__PROTOBUF__FILE_DESCRIPTOR_PROTO__INIT,
					      c = GOOGLE__PROTOBUF__FILE_DESCRIPTOR_PROTO__INIT,
					      d = GOOGLE__PROTOBUF__FILE_DESCRIPTOR_PROTO__INIT;
	char *a_deps[] = {n_b, n_c}, *d_dep[] = {n_d};
	Google__Protobuf__FileDescriptorProto *files[] = {&d, &b, &c, &a};
	Google__Protobuf__ServiceDescriptorProto
		svc = GOOGLE__PROTOBUF__SERVICE_DESCRIPTOR_PROTO__INIT,
		*services[1];
	Google__Protobuf__MethodDescriptorProto m = GOOGLE__PROTOBUF__METHOD_DESCRIPTOR_PROTO__INIT,
						*methods[1];
	_cleanup_free_ uint8_t *data = NULL;
	_cleanup_free_ const RpcDescFile **closure = NULL;
	RpcDescIndex *idx = NULL;
	size_t size;
	int n;
	(void)state;

	a.name = n_a;
	a.n_dependency = 2;
	a.dependency = a_deps;
	b.name = n_b;
	b.n_dependency = 1;
	b.dependency = d_dep;
	c.name = n_c;
	c.n_dependency = 1;
	c.dependency = d_dep;
	d.name = n_d;
	add_service(&d, services, &svc, methods, &m);
	data = pack_set(files, ELEMENTSOF(files), &size);

	assert_int_equal(rpc_desc_index_new(data, size, &idx), 0);
	n = rpc_desc_closure(idx, rpc_desc_find_file(idx, n_a), &closure);
	if (n == 4) {
		assert_string_equal(closure[0]->name, n_a);
		assert_int_equal(count_in(closure, 4, n_d), 1);
		assert_closure_complete(idx, closure, 4);
	}
	rpc_desc_index_free(idx);
	assert_int_equal(n, 4);
}

/* Imports cannot be circular in valid protobuf, but the set comes from a file: a cycle must
 * end the walk, not loop or overflow. */
static void test_closure_cycle(void **state)
{
	Google__Protobuf__FileDescriptorProto a = GOOGLE__PROTOBUF__FILE_DESCRIPTOR_PROTO__INIT,
					      b = GOOGLE__PROTOBUF__FILE_DESCRIPTOR_PROTO__INIT;
	char *a_dep[] = {n_b}, *b_dep[] = {n_a};
	Google__Protobuf__FileDescriptorProto *files[] = {&a, &b};
	Google__Protobuf__ServiceDescriptorProto
		svc = GOOGLE__PROTOBUF__SERVICE_DESCRIPTOR_PROTO__INIT,
		*services[1];
	Google__Protobuf__MethodDescriptorProto m = GOOGLE__PROTOBUF__METHOD_DESCRIPTOR_PROTO__INIT,
						*methods[1];
	_cleanup_free_ uint8_t *data = NULL;
	_cleanup_free_ const RpcDescFile **closure = NULL;
	RpcDescIndex *idx = NULL;
	size_t size;
	int n;
	(void)state;

	a.name = n_a;
	a.n_dependency = 1;
	a.dependency = a_dep;
	b.name = n_b;
	b.n_dependency = 1;
	b.dependency = b_dep;
	add_service(&a, services, &svc, methods, &m);
	data = pack_set(files, ELEMENTSOF(files), &size);

	assert_int_equal(rpc_desc_index_new(data, size, &idx), 0);
	n = rpc_desc_closure(idx, rpc_desc_find_file(idx, n_b), &closure);
	rpc_desc_index_free(idx);
	assert_int_equal(n, 2);
}

/* Nested types, enum value scoping, oneofs, and a client-streaming-only method (ember's API
 * has none, but the index must not assume that). */
static void test_nested_symbols(void **state)
{
	Google__Protobuf__FileDescriptorProto f = GOOGLE__PROTOBUF__FILE_DESCRIPTOR_PROTO__INIT;
	Google__Protobuf__DescriptorProto outer = GOOGLE__PROTOBUF__DESCRIPTOR_PROTO__INIT,
					  inner = GOOGLE__PROTOBUF__DESCRIPTOR_PROTO__INIT;
	Google__Protobuf__FieldDescriptorProto field =
		GOOGLE__PROTOBUF__FIELD_DESCRIPTOR_PROTO__INIT;
	Google__Protobuf__OneofDescriptorProto oneof =
		GOOGLE__PROTOBUF__ONEOF_DESCRIPTOR_PROTO__INIT;
	Google__Protobuf__EnumDescriptorProto en = GOOGLE__PROTOBUF__ENUM_DESCRIPTOR_PROTO__INIT;
	Google__Protobuf__EnumValueDescriptorProto val =
		GOOGLE__PROTOBUF__ENUM_VALUE_DESCRIPTOR_PROTO__INIT;
	Google__Protobuf__ServiceDescriptorProto svc =
		GOOGLE__PROTOBUF__SERVICE_DESCRIPTOR_PROTO__INIT;
	Google__Protobuf__MethodDescriptorProto m = GOOGLE__PROTOBUF__METHOD_DESCRIPTOR_PROTO__INIT;
	Google__Protobuf__DescriptorProto *nested[] = {&inner}, *messages[] = {&outer};
	Google__Protobuf__FieldDescriptorProto *fields[] = {&field};
	Google__Protobuf__OneofDescriptorProto *oneofs[] = {&oneof};
	Google__Protobuf__EnumDescriptorProto *enums[] = {&en};
	Google__Protobuf__EnumValueDescriptorProto *values[] = {&val};
	Google__Protobuf__ServiceDescriptorProto *services[] = {&svc};
	Google__Protobuf__MethodDescriptorProto *methods[] = {&m};
	Google__Protobuf__FileDescriptorProto *files[] = {&f};
	_cleanup_free_ uint8_t *data = NULL;
	const RpcDescMethod *upload;
	RpcDescIndex *idx = NULL;
	size_t size;
	(void)state;

	inner.name = n_inner;
	val.name = n_value;
	en.name = n_enum;
	en.n_value = 1;
	en.value = values;
	field.name = n_field;
	oneof.name = n_oneof;
	outer.name = n_outer;
	outer.n_field = 1;
	outer.field = fields;
	outer.n_nested_type = 1;
	outer.nested_type = nested;
	outer.n_enum_type = 1;
	outer.enum_type = enums;
	outer.n_oneof_decl = 1;
	outer.oneof_decl = oneofs;
	m.name = n_method;
	m.input_type = n_type;
	m.output_type = n_type;
	m.has_client_streaming = true;
	m.client_streaming = true;
	svc.name = n_service;
	svc.n_method = 1;
	svc.method = methods;
	f.name = n_d;
	f.package = n_pkg;
	f.n_message_type = 1;
	f.message_type = messages;
	f.n_service = 1;
	f.service = services;
	data = pack_set(files, ELEMENTSOF(files), &size);

	assert_int_equal(rpc_desc_index_new(data, size, &idx), 0);
	assert_non_null(rpc_desc_find_symbol(idx, "pkg.Outer"));
	assert_non_null(rpc_desc_find_symbol(idx, "pkg.Outer.Inner"));
	assert_non_null(rpc_desc_find_symbol(idx, ".pkg.Outer.Inner"));
	assert_non_null(rpc_desc_find_symbol(idx, "pkg.Outer.f"));
	assert_non_null(rpc_desc_find_symbol(idx, "pkg.Outer.choice"));
	assert_non_null(rpc_desc_find_symbol(idx, "pkg.Outer.E"));
	assert_non_null(rpc_desc_find_symbol(idx, "pkg.Outer.V"));
	assert_null(rpc_desc_find_symbol(idx, "pkg.Outer.E.V"));
	assert_null(rpc_desc_find_symbol(idx, "pkg.Inner"));
	assert_null(rpc_desc_find_symbol(idx, "pkg.V"));
	assert_non_null(rpc_desc_find_symbol(idx, "pkg.S"));
	assert_non_null(rpc_desc_find_symbol(idx, "pkg.S.Upload"));
	upload = rpc_desc_find_method(idx, "pkg.S", "Upload");
	assert_non_null(upload);
	assert_true(upload->client_streaming);
	assert_false(upload->server_streaming);
	rpc_desc_index_free(idx);
}

static void test_garbage(void **state)
{
	/* A tag whose varint never ends; wire type 7, which does not exist; a length running
	 * past the end; a group never closed. */
	static const uint8_t endless_varint[] = {0xff, 0xff, 0xff, 0xff};
	static const uint8_t wire_type_7[] = {0x0f, 0x00};
	static const uint8_t overlong[] = {0x0a, 0x7f, 0x0a, 0x01, 'x'};
	static const uint8_t open_group[] = {0x0b};
	static const struct {
		const uint8_t *data;
		size_t size;
	} cases[] = {
		{endless_varint, sizeof(endless_varint)},
		{wire_type_7, sizeof(wire_type_7)},
		{overlong, sizeof(overlong)},
		{open_group, sizeof(open_group)},
	};
	(void)state;

	for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
		RpcDescIndex *idx = NULL;
		int r = rpc_desc_index_new(cases[i].data, cases[i].size, &idx);
		if (r >= 0) {
			rpc_desc_index_free(idx);
			fail_msg("garbage case %zu was accepted", i);
		}
		assert_int_equal(r, -EBADMSG);
		assert_null(idx);
	}
}

/* Well-formed protobuf that is not a usable descriptor set: the index must refuse it and unwind
 * what it built so far (LeakSanitizer checks the unwinding). */
static void test_bad_descriptors(void **state)
{
	/* One file without a name. */
	static const uint8_t nameless[] = {0x0a, 0x00};
	/* "a.proto" importing "b.proto", which is not in the set. */
	static const uint8_t missing_dep[] = {0x0a, 0x12, 0x0a, 0x07, 'a', '.', 'p', 'r', 'o', 't',
					      'o',  0x1a, 0x07, 'b',  '.', 'p', 'r', 'o', 't', 'o'};
	RpcDescIndex *idx = NULL;
	(void)state;

	assert_int_equal(rpc_desc_index_new(nameless, sizeof(nameless), &idx), -EBADMSG);
	assert_null(idx);
	assert_int_equal(rpc_desc_index_new(missing_dep, sizeof(missing_dep), &idx), -ENOENT);
	assert_null(idx);
}

/* Offsets just past each top-level `file` entry (field 1, length-delimited) of the set: the
 * places where a cut leaves a shorter but well-formed FileDescriptorSet. */
static size_t file_ends(const uint8_t *data, size_t size, size_t *ends, size_t max)
{
	size_t pos = 0, n = 0;

	while (pos < size && n < max) {
		uint64_t len = 0;
		unsigned shift = 0;

		assert_int_equal(data[pos++], 0x0a);
		do {
			assert_true(pos < size && shift < 64);
			len |= (uint64_t)(data[pos] & 0x7f) << shift;
			shift += 7;
		} while (data[pos++] & 0x80);
		assert_true(len <= size - pos);
		pos += len;
		ends[n++] = pos;
	}
	assert_int_equal(pos, size);
	return n;
}

static bool is_file_end(const size_t *ends, size_t n, size_t len)
{
	for (size_t i = 0; i < n; i++)
		if (ends[i] == len)
			return true;
	return false;
}

static void test_truncated(void **state)
{
	const RpcDescIndex *full = *state;
	size_t ends[16], n_ends;

	n_ends = file_ends(ember_descriptor_set, ember_descriptor_set_size, ends, ELEMENTSOF(ends));
	assert_int_equal(n_ends, full->n_files);

	/* Every prefix: a cut inside a file must be refused, a cut between files must give
	 * exactly the files before it (protoc writes imports before their importers). */
	for (size_t len = 1; len < ember_descriptor_set_size; len++) {
		RpcDescIndex *idx = NULL;
		int r = rpc_desc_index_new(ember_descriptor_set, len, &idx);

		if (!is_file_end(ends, n_ends, len)) {
			if (r >= 0) {
				rpc_desc_index_free(idx);
				fail_msg("a cut at byte %zu, inside a file, was accepted", len);
			}
			assert_null(idx);
			continue;
		}
		if (r < 0)
			fail_msg("a cut at byte %zu, between files, was refused: %d", len, r);
		assert_true(idx->n_files < full->n_files);
		for (size_t i = 0; i < idx->n_files; i++) {
			assert_true(ends[i] <= len);
			assert_string_equal(idx->files[i].name, full->files[i].name);
		}
		assert_int_equal(ends[idx->n_files - 1], len);
		rpc_desc_index_free(idx);
	}
}

/* Zero bytes are a valid, empty FileDescriptorSet: nothing to find, nothing to crash on. */
static void test_empty_set(void **state)
{
	RpcDescIndex *idx = NULL;
	(void)state;

	assert_int_equal(rpc_desc_index_new(ember_descriptor_set, 0, &idx), 0);
	assert_non_null(idx);
	assert_int_equal(idx->n_files, 0);
	assert_null(rpc_desc_find_file(idx, NODE_PROTO));
	assert_null(rpc_desc_find_symbol(idx, "ember.v1.Node"));
	assert_null(rpc_desc_find_method(idx, "ember.v1.Node", "GetNode"));
	rpc_desc_index_free(idx);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		/* the embedded set */
		cmocka_unit_test(test_index_new),
		cmocka_unit_test(test_find_file),
		cmocka_unit_test(test_file_data),
		cmocka_unit_test(test_find_symbol),
		cmocka_unit_test(test_sorted_unique),
		cmocka_unit_test(test_find_method),
		/* imports, as reflection hands them out */
		cmocka_unit_test(test_closure_node),
		cmocka_unit_test(test_closure_leaf),
		cmocka_unit_test(test_closure_every_file),
		/* hand-built sets */
		cmocka_unit_test(test_closure_diamond),
		cmocka_unit_test(test_closure_cycle),
		cmocka_unit_test(test_nested_symbols),
		/* input that is not a good descriptor set */
		cmocka_unit_test(test_garbage),
		cmocka_unit_test(test_bad_descriptors),
		cmocka_unit_test(test_truncated),
		cmocka_unit_test(test_empty_set),
	};

	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
