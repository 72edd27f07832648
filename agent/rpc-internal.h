/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Shared between agent/rpc*.c only. Nothing outside the gRPC layer includes this.
 */
#pragma once

#include <grpc/grpc.h>
#include <pthread.h>

#include "rpc.h"

/* ---- descriptor index (rpc-descriptors.c): no gRPC core in here, unit-testable ---- */

typedef struct RpcDescFile {
	char *name;    /* "ember/v1/node.proto" */
	uint8_t *data; /* serialized FileDescriptorProto */
	size_t size;
	size_t *deps; /* indexes into RpcDescIndex.files */
	size_t n_deps;
} RpcDescFile;

typedef struct RpcDescSymbol {
	char *name; /* fully qualified without leading dot: "ember.v1.Node", "ember.v1.Node.GetNode"
		     */
	size_t file;
} RpcDescSymbol;

typedef struct RpcDescMethod {
	char *name; /* "ember.v1.Node.GetNode" */
	bool client_streaming;
	bool server_streaming;
} RpcDescMethod;

typedef struct RpcDescIndex {
	RpcDescFile *files;
	size_t n_files;
	RpcDescSymbol *symbols; /* sorted by name */
	size_t n_symbols;
	RpcDescMethod *methods; /* sorted by name */
	size_t n_methods;
} RpcDescIndex;

int rpc_desc_index_new(const uint8_t *data, size_t size, RpcDescIndex **ret);
void rpc_desc_index_free(RpcDescIndex *idx);
const RpcDescFile *rpc_desc_find_file(const RpcDescIndex *idx, const char *name);
const RpcDescFile *rpc_desc_find_symbol(const RpcDescIndex *idx, const char *symbol);
const RpcDescMethod *rpc_desc_find_method(const RpcDescIndex *idx, const char *service,
					  const char *method);
/* The file and everything it imports, transitively, each once, the file itself first. Returns
 * the count; *ret is malloc'ed. */
int rpc_desc_closure(const RpcDescIndex *idx, const RpcDescFile *file, const RpcDescFile ***ret);

/* ---- server internals ---- */

typedef struct RpcServer RpcServer;

/* Services registered so far, for health (known service names) and reflection (list). */
size_t rpc_server_n_services(RpcServer *s);
const char *rpc_server_service_name(RpcServer *s, size_t i);
const RpcDescIndex *rpc_server_descriptors(RpcServer *s);
/* The channel in-process calls use (to the unix listener), made on first use; NULL before the
 * server started or without a unix listener. Destroyed with the server. */
grpc_channel *rpc_server_local_channel(RpcServer *s);

/* Handlers of the built-in services, registered by rpc_server_new(). */
int rpc_health_register(RpcServer *s);
int rpc_reflection_register(RpcServer *s);
