/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Server reflection, grpc.reflection.v1 and v1alpha (grpcurl tries v1 first and falls back).
 * Everything is answered from the embedded descriptor set. Errors are reported inside the
 * stream (ErrorResponse), which stays open for the next request, as the protocol asks.
 *
 * v1alpha is wire-identical to v1 (v1 was published as a copy), so v1alpha requests are
 * re-read as v1 messages and v1 responses go out unchanged.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/macro.h"
#include "grpc/reflection/v1/reflection.pb-c.h"
#include "grpc/reflection/v1alpha/reflection.pb-c.h"
#include "rpc-internal.h"

typedef Grpc__Reflection__V1__ServerReflectionRequest Request;
typedef Grpc__Reflection__V1__ServerReflectionResponse Response;

static void set_error(Response *resp, Grpc__Reflection__V1__ErrorResponse *err, RpcCode code,
		      const char *message)
{
	err->error_code = (int32_t)code;
	err->error_message = (char *)message;
	resp->message_response_case =
		GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
	resp->error_response = err;
}

static int answer(RpcCall *call, Request *req)
{
	RpcServer *s = rpc_call_server(call);
	const RpcDescIndex *idx = rpc_server_descriptors(s);
	Response resp = GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__INIT;
	Grpc__Reflection__V1__ErrorResponse err = GRPC__REFLECTION__V1__ERROR_RESPONSE__INIT;
	Grpc__Reflection__V1__FileDescriptorResponse files =
		GRPC__REFLECTION__V1__FILE_DESCRIPTOR_RESPONSE__INIT;
	Grpc__Reflection__V1__ListServiceResponse list =
		GRPC__REFLECTION__V1__LIST_SERVICE_RESPONSE__INIT;
	Grpc__Reflection__V1__ExtensionNumberResponse ext =
		GRPC__REFLECTION__V1__EXTENSION_NUMBER_RESPONSE__INIT;
	_cleanup_free_ Grpc__Reflection__V1__ServiceResponse *svcs = NULL;
	_cleanup_free_ Grpc__Reflection__V1__ServiceResponse **svc_ptrs = NULL;
	_cleanup_free_ const RpcDescFile **closure = NULL;
	_cleanup_free_ ProtobufCBinaryData *blobs = NULL;
	_cleanup_free_ char *msg = NULL;
	const RpcDescFile *file = NULL;
	const char *what = NULL;

	resp.valid_host = req->host;
	resp.original_request = req;

	switch (req->message_request_case) {
	case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES: {
		size_t n = rpc_server_n_services(s);
		svcs = calloc(n ?: 1, sizeof(*svcs));
		svc_ptrs = calloc(n ?: 1, sizeof(Grpc__Reflection__V1__ServiceResponse *));
		if (!svcs || !svc_ptrs)
			return -ENOMEM;
		for (size_t i = 0; i < n; i++) {
			grpc__reflection__v1__service_response__init(&svcs[i]);
			svcs[i].name = (char *)rpc_server_service_name(s, i);
			svc_ptrs[i] = &svcs[i];
		}
		list.n_service = n;
		list.service = svc_ptrs;
		resp.message_response_case =
			GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE;
		resp.list_services_response = &list;
		return rpc_call_send(call, &resp.base);
	}
	case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME:
		what = req->file_by_filename;
		file = rpc_desc_find_file(idx, what);
		break;
	case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL:
		what = req->file_containing_symbol;
		file = rpc_desc_find_symbol(idx, what);
		break;
	case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_EXTENSION:
		/* No file in the set declares extensions of anything. */
		if (asprintf(&msg, "no extension %d of %s is known",
			     req->file_containing_extension->extension_number,
			     req->file_containing_extension->containing_type ?: "") < 0)
			return -ENOMEM;
		set_error(&resp, &err, RPC_NOT_FOUND, msg);
		return rpc_call_send(call, &resp.base);
	case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_ALL_EXTENSION_NUMBERS_OF_TYPE:
		if (!rpc_desc_find_symbol(idx, req->all_extension_numbers_of_type)) {
			if (asprintf(&msg, "unknown type %s", req->all_extension_numbers_of_type) <
			    0)
				return -ENOMEM;
			set_error(&resp, &err, RPC_NOT_FOUND, msg);
			return rpc_call_send(call, &resp.base);
		}
		ext.base_type_name = req->all_extension_numbers_of_type;
		resp.message_response_case =
			GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ALL_EXTENSION_NUMBERS_RESPONSE;
		resp.all_extension_numbers_response = &ext;
		return rpc_call_send(call, &resp.base);
	default:
		set_error(&resp, &err, RPC_INVALID_ARGUMENT, "empty or unknown reflection request");
		return rpc_call_send(call, &resp.base);
	}

	if (!file) {
		if (asprintf(&msg, "%s not found", what ?: "") < 0)
			return -ENOMEM;
		set_error(&resp, &err, RPC_NOT_FOUND, msg);
		return rpc_call_send(call, &resp.base);
	}

	/* The file and all it imports, transitively: a client without any .proto files must be
	 * able to build every type the file mentions from this one answer. */
	int n = rpc_desc_closure(idx, file, &closure);
	if (n < 0)
		return n;
	blobs = calloc((size_t)n, sizeof(*blobs));
	if (!blobs)
		return -ENOMEM;
	for (int i = 0; i < n; i++)
		blobs[i] = (ProtobufCBinaryData){.len = closure[i]->size, .data = closure[i]->data};
	files.n_file_descriptor_proto = (size_t)n;
	files.file_descriptor_proto = blobs;
	resp.message_response_case =
		GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE;
	resp.file_descriptor_response = &files;
	return rpc_call_send(call, &resp.base);
}

static void requestp(Request **p)
{
	if (*p)
		grpc__reflection__v1__server_reflection_request__free_unpacked(*p, NULL);
}

static void messagep(ProtobufCMessage **p)
{
	if (*p)
		protobuf_c_message_free_unpacked(*p, NULL);
}

/* Same bytes, read as v1 (see the top of the file). */
static Request *as_v1(ProtobufCMessage *m)
{
	if (m->descriptor == &grpc__reflection__v1__server_reflection_request__descriptor)
		return (Request *)m;
	size_t size = protobuf_c_message_get_packed_size(m);
	_cleanup_free_ uint8_t *buf = malloc(size ?: 1);
	if (!buf)
		return NULL;
	protobuf_c_message_pack(m, buf);
	protobuf_c_message_free_unpacked(m, NULL);
	return grpc__reflection__v1__server_reflection_request__unpack(NULL, size, buf);
}

static RpcCode reflection_info(RpcCall *call, const ProtobufCMessage *request, void *userdata)
{
	(void)request;
	(void)userdata;

	/* A reflection session (grpcurl, grpcui) idles between requests: it must not hold up a
	 * shutdown for the whole grace period. */
	rpc_call_end_on_drain(call);
	for (;;) {
		_cleanup_(messagep) ProtobufCMessage *m = NULL;
		_cleanup_(requestp) Request *req = NULL;
		int r = rpc_call_recv(call, &m);
		if (r == 0)
			return RPC_OK;
		if (r == -EBADMSG)
			return rpc_call_error(call, RPC_INVALID_ARGUMENT,
					      "reflection request does not parse");
		if (r < 0)
			return RPC_CANCELLED;
		req = as_v1(TAKE_PTR(m));
		if (!req)
			return rpc_call_error(call, RPC_INTERNAL, "cannot convert request");
		r = answer(call, req);
		if (r == -ECANCELED)
			return RPC_CANCELLED;
		if (r < 0)
			return rpc_call_error(call, RPC_INTERNAL, "cannot answer: %s",
					      strerror(-r));
	}
}

int rpc_reflection_register(RpcServer *s)
{
	static const RpcMethodHandler handlers[] = {
		{"ServerReflectionInfo", reflection_info},
	};
	int r = rpc_server_add_service(s, &grpc__reflection__v1__server_reflection__descriptor,
				       handlers, ELEMENTSOF(handlers), NULL);
	if (r < 0)
		return r;
	return rpc_server_add_service(s, &grpc__reflection__v1alpha__server_reflection__descriptor,
				      handlers, ELEMENTSOF(handlers), NULL);
}
