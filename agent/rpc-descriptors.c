/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Index over the FileDescriptorSet that protoc writes: which file defines which symbol, which
 * files import which, and which methods stream. protobuf-c's own descriptors do not record
 * streaming kinds, and server reflection has to hand out the exact FileDescriptorProtos, so the
 * descriptor set is the single source of truth for both.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/macro.h"
#include "google/protobuf/descriptor.pb-c.h"
#include "rpc-internal.h"

typedef struct Builder {
	RpcDescIndex *idx;
	size_t cap_symbols, cap_methods;
} Builder;

static int add_symbol(Builder *b, const char *prefix, const char *name, size_t file)
{
	RpcDescIndex *idx = b->idx;
	char *full;

	if (!name)
		return -EBADMSG;
	if (idx->n_symbols == b->cap_symbols) {
		size_t cap = b->cap_symbols ? b->cap_symbols * 2 : 64;
		RpcDescSymbol *n = reallocarray(idx->symbols, cap, sizeof(*n));
		if (!n)
			return -ENOMEM;
		idx->symbols = n;
		b->cap_symbols = cap;
	}
	if (asprintf(&full, "%s%s%s", prefix ?: "", prefix && *prefix ? "." : "", name) < 0)
		return -ENOMEM;
	idx->symbols[idx->n_symbols++] = (RpcDescSymbol){.name = full, .file = file};
	return 0;
}

static int add_enum(Builder *b, const char *scope, const Google__Protobuf__EnumDescriptorProto *e,
		    size_t file)
{
	/* Enum values live in the enclosing scope, as in C++ (protobuf scoping rules). */
	int r = add_symbol(b, scope, e->name, file);
	for (size_t i = 0; r >= 0 && i < e->n_value; i++)
		r = add_symbol(b, scope, e->value[i]->name, file);
	return r;
}

static int add_message(Builder *b, const char *scope, const Google__Protobuf__DescriptorProto *m,
		       size_t file)
{
	_cleanup_free_ char *full = NULL;
	int r;

	r = add_symbol(b, scope, m->name, file);
	if (r < 0)
		return r;
	full = strdup(b->idx->symbols[b->idx->n_symbols - 1].name);
	if (!full)
		return -ENOMEM;
	for (size_t i = 0; i < m->n_field; i++)
		if ((r = add_symbol(b, full, m->field[i]->name, file)) < 0)
			return r;
	for (size_t i = 0; i < m->n_nested_type; i++)
		if ((r = add_message(b, full, m->nested_type[i], file)) < 0)
			return r;
	for (size_t i = 0; i < m->n_enum_type; i++)
		if ((r = add_enum(b, full, m->enum_type[i], file)) < 0)
			return r;
	for (size_t i = 0; i < m->n_oneof_decl; i++)
		if ((r = add_symbol(b, full, m->oneof_decl[i]->name, file)) < 0)
			return r;
	for (size_t i = 0; i < m->n_extension; i++)
		if ((r = add_symbol(b, full, m->extension[i]->name, file)) < 0)
			return r;
	return 0;
}

static int add_service(Builder *b, const char *pkg,
		       const Google__Protobuf__ServiceDescriptorProto *s, size_t file)
{
	RpcDescIndex *idx = b->idx;
	_cleanup_free_ char *full = NULL;
	int r;

	r = add_symbol(b, pkg, s->name, file);
	if (r < 0)
		return r;
	full = strdup(idx->symbols[idx->n_symbols - 1].name);
	if (!full)
		return -ENOMEM;
	for (size_t i = 0; i < s->n_method; i++) {
		const Google__Protobuf__MethodDescriptorProto *m = s->method[i];
		if ((r = add_symbol(b, full, m->name, file)) < 0)
			return r;
		if (idx->n_methods == b->cap_methods) {
			size_t cap = b->cap_methods ? b->cap_methods * 2 : 32;
			RpcDescMethod *n = reallocarray(idx->methods, cap, sizeof(*n));
			if (!n)
				return -ENOMEM;
			idx->methods = n;
			b->cap_methods = cap;
		}
		char *name = strdup(idx->symbols[idx->n_symbols - 1].name);
		if (!name)
			return -ENOMEM;
		idx->methods[idx->n_methods++] = (RpcDescMethod){
			.name = name,
			.client_streaming = m->has_client_streaming && m->client_streaming,
			.server_streaming = m->has_server_streaming && m->server_streaming,
		};
	}
	return 0;
}

static int cmp_symbol(const void *a, const void *b)
{
	return strcmp(((const RpcDescSymbol *)a)->name, ((const RpcDescSymbol *)b)->name);
}

static int cmp_method(const void *a, const void *b)
{
	return strcmp(((const RpcDescMethod *)a)->name, ((const RpcDescMethod *)b)->name);
}

static int index_file(Builder *b, const Google__Protobuf__FileDescriptorProto *f, size_t i)
{
	const char *pkg = f->package ?: "";
	int r;

	for (size_t j = 0; j < f->n_message_type; j++)
		if ((r = add_message(b, pkg, f->message_type[j], i)) < 0)
			return r;
	for (size_t j = 0; j < f->n_enum_type; j++)
		if ((r = add_enum(b, pkg, f->enum_type[j], i)) < 0)
			return r;
	for (size_t j = 0; j < f->n_service; j++)
		if ((r = add_service(b, pkg, f->service[j], i)) < 0)
			return r;
	for (size_t j = 0; j < f->n_extension; j++)
		if ((r = add_symbol(b, pkg, f->extension[j]->name, i)) < 0)
			return r;
	return 0;
}

static void set_freep(Google__Protobuf__FileDescriptorSet **p)
{
	if (*p)
		google__protobuf__file_descriptor_set__free_unpacked(*p, NULL);
}

int rpc_desc_index_new(const uint8_t *data, size_t size, RpcDescIndex **ret)
{
	_cleanup_(set_freep) Google__Protobuf__FileDescriptorSet *set = NULL;
	RpcDescIndex *idx;
	Builder b = {};
	int r = 0;

	set = google__protobuf__file_descriptor_set__unpack(NULL, size, data);
	if (!set)
		return -EBADMSG;

	idx = calloc(1, sizeof(*idx));
	if (!idx)
		return -ENOMEM;
	b.idx = idx;
	idx->files = calloc(set->n_file ?: 1, sizeof(*idx->files));
	if (!idx->files) {
		r = -ENOMEM;
		goto fail;
	}

	for (size_t i = 0; i < set->n_file; i++) {
		const Google__Protobuf__FileDescriptorProto *f = set->file[i];
		RpcDescFile *df = &idx->files[idx->n_files++];

		if (!f->name) {
			r = -EBADMSG;
			goto fail;
		}
		df->name = strdup(f->name);
		df->size = google__protobuf__file_descriptor_proto__get_packed_size(f);
		df->data = malloc(df->size ?: 1);
		if (!df->name || !df->data) {
			r = -ENOMEM;
			goto fail;
		}
		google__protobuf__file_descriptor_proto__pack(f, df->data);
		r = index_file(&b, f, i);
		if (r < 0)
			goto fail;
	}

	/* Dependencies by name; --include_imports puts every import in the set. */
	for (size_t i = 0; i < set->n_file; i++) {
		const Google__Protobuf__FileDescriptorProto *f = set->file[i];
		RpcDescFile *df = &idx->files[i];

		df->deps = calloc(f->n_dependency ?: 1, sizeof(size_t));
		if (!df->deps) {
			r = -ENOMEM;
			goto fail;
		}
		for (size_t j = 0; j < f->n_dependency; j++) {
			const RpcDescFile *dep = rpc_desc_find_file(idx, f->dependency[j]);
			if (!dep) {
				r = -ENOENT;
				goto fail;
			}
			df->deps[df->n_deps++] = (size_t)(dep - idx->files);
		}
	}

	/* qsort/bsearch want a non-NULL array even for 0 elements. */
	if (idx->n_symbols > 0)
		qsort(idx->symbols, idx->n_symbols, sizeof(*idx->symbols), cmp_symbol);
	if (idx->n_methods > 0)
		qsort(idx->methods, idx->n_methods, sizeof(*idx->methods), cmp_method);
	*ret = idx;
	return 0;
fail:
	rpc_desc_index_free(idx);
	return r;
}

void rpc_desc_index_free(RpcDescIndex *idx)
{
	if (!idx)
		return;
	for (size_t i = 0; i < idx->n_files; i++) {
		free(idx->files[i].name);
		free(idx->files[i].data);
		free(idx->files[i].deps);
	}
	for (size_t i = 0; i < idx->n_symbols; i++)
		free(idx->symbols[i].name);
	for (size_t i = 0; i < idx->n_methods; i++)
		free(idx->methods[i].name);
	free(idx->files);
	free(idx->symbols);
	free(idx->methods);
	free(idx);
}

const RpcDescFile *rpc_desc_find_file(const RpcDescIndex *idx, const char *name)
{
	for (size_t i = 0; name && i < idx->n_files; i++)
		if (idx->files[i].name && strcmp(idx->files[i].name, name) == 0)
			return &idx->files[i];
	return NULL;
}

const RpcDescFile *rpc_desc_find_symbol(const RpcDescIndex *idx, const char *symbol)
{
	RpcDescSymbol key = {.name = (char *)symbol}, *hit;

	if (!symbol || idx->n_symbols == 0)
		return NULL;
	if (symbol[0] == '.') /* clients may send fully qualified names with the leading dot */
		key.name++;
	hit = bsearch(&key, idx->symbols, idx->n_symbols, sizeof(*idx->symbols), cmp_symbol);
	return hit ? &idx->files[hit->file] : NULL;
}

const RpcDescMethod *rpc_desc_find_method(const RpcDescIndex *idx, const char *service,
					  const char *method)
{
	_cleanup_free_ char *full = NULL;
	if (idx->n_methods == 0 || asprintf(&full, "%s.%s", service, method) < 0)
		return NULL;
	RpcDescMethod key = {.name = full};
	return bsearch(&key, idx->methods, idx->n_methods, sizeof(*idx->methods), cmp_method);
}

int rpc_desc_closure(const RpcDescIndex *idx, const RpcDescFile *file, const RpcDescFile ***ret)
{
	/* Breadth-first over imports; `seen` keeps each file once even with diamond imports. */
	_cleanup_free_ const RpcDescFile **out = calloc(idx->n_files, sizeof(const RpcDescFile *));
	_cleanup_free_ bool *seen = calloc(idx->n_files, sizeof(bool));
	size_t n = 0;

	if (!out || !seen)
		return -ENOMEM;
	out[n++] = file;
	seen[file - idx->files] = true;
	for (size_t i = 0; i < n; i++)
		for (size_t j = 0; j < out[i]->n_deps; j++) {
			size_t d = out[i]->deps[j];
			if (!seen[d]) {
				seen[d] = true;
				out[n++] = &idx->files[d];
			}
		}
	*ret = TAKE_PTR(out);
	return (int)n;
}
