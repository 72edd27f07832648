/* SPDX-License-Identifier: Apache-2.0 */
/*
 * WriteFile and ReadFile (node.proto): files in and out of a RUNNING sandbox through
 * ember-guest's file operations, on a stream thread each. Both are plain blocking loops:
 * a WriteFile takes the client's next chunk only once the guest took the last one, a ReadFile
 * asks the guest for the next chunk only once the call's send queue took the last one, so a
 * transfer holds at most a chunk in emberd besides the send queue, whatever its size.
 *
 * The guest is not trusted: a ReadFile never passes on more bytes than the size the guest
 * declared first (guest_file_read_next() enforces it), and that size must be within
 * [api] max_file_mib before any byte is sent.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "guest/client/guest-client.h"
#include "node-sandbox.h"

#define FILE_CHUNK_MAX         (1u << 20) /* node.proto: data chunks of at most 1 MiB */
#define FILE_STEP_TIMEOUT_MS   30000      /* for the guest to take or send one chunk */
#define FILE_SYNC_BYTES_PER_MS 10000      /* 10 MB/s: the slowest disk fsync waits for */

static RpcCode path_check(RpcCall *call, const char *path)
{
	if (!path || path[0] != '/')
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "path \"%.200s\" is not an absolute path", path ?: "");
	if (strlen(path) >= PATH_MAX)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "path is longer than %d bytes",
				      PATH_MAX - 1);
	return RPC_OK;
}

static uint64_t max_file_bytes(const Manager *m)
{
	return (uint64_t)m->config->max_file_mib << 20;
}

RpcCode node_write_file(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	Ember__V1__WriteFileRequest *req = NULL;
	Ember__V1__WriteFileResponse resp = EMBER__V1__WRITE_FILE_RESPONSE__INIT;
	_cleanup_free_ char *what = NULL;
	GuestSession s = {};
	uint64_t size = 0;
	RpcCode code;
	int r;

	(void)request;
	r = rpc_call_recv(call, (ProtobufCMessage **)&req);
	if (r == 0)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "no header message");
	if (r == -EBADMSG)
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "a request that does not parse as WriteFileRequest");
	if (r < 0)
		return RPC_CANCELLED;
	if (req->msg_case != EMBER__V1__WRITE_FILE_REQUEST__MSG_HEADER) {
		code = rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "the first message must be header");
		goto out;
	}
	const Ember__V1__WriteFileHeader *h = req->header;
	if ((code = node_id_check(call, "header.sandbox_id", h->sandbox_id)) != RPC_OK ||
	    (code = path_check(call, h->path)) != RPC_OK)
		goto out;
	if (h->mode > 07777) {
		code = rpc_call_error(call, RPC_INVALID_ARGUMENT, "mode %#o: at most 07777",
				      h->mode);
		goto out;
	}
	/* known before anything is written: a size past the limit fails at once */
	bool sized = h->has_size_case == EMBER__V1__WRITE_FILE_HEADER__HAS_SIZE_SIZE;
	uint64_t want = h->size;
	if (sized && want > max_file_bytes(m)) {
		code = rpc_call_error(call, RPC_RESOURCE_EXHAUSTED,
				      "header.size %" PRIu64 " is larger than %u MiB ([api] "
				      "max_file_mib); nothing was written",
				      want, m->config->max_file_mib);
		goto out;
	}
	if (asprintf(&what, "writing %.300s", h->path) < 0) {
		what = NULL;
		code = rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
		goto out;
	}
	if ((code = guest_session_open(&s, m, call, h->sandbox_id, what)) != RPC_OK)
		goto out;
	/* Each chunk goes to the guest's page cache: it should take it at once, but a guest
	 * writing back a lot may be slow to, and that is no reason to give up. */
	guest_conn_set_timeout(s.g, FILE_STEP_TIMEOUT_MS);
	GuestFileAttrs attrs = {.mode = h->mode ? (int)h->mode : 0644,
				.set_owner = true,
				.uid = h->uid,
				.gid = h->gid};
	if ((r = guest_file_write_begin(s.g, h->path, &attrs)) < 0) {
		code = guest_session_failed(&s, r);
		goto out;
	}
	protobuf_c_message_free_unpacked(&req->base, NULL);
	req = NULL;

	for (;;) {
		r = rpc_call_recv(call, (ProtobufCMessage **)&req);
		if (r == 0)
			break;
		if (r == -EBADMSG) {
			code = rpc_call_error(call, RPC_INVALID_ARGUMENT,
					      "a request that does not parse as WriteFileRequest");
			goto out;
		}
		/* gRPC may report a cancellation as the end of the stream: only a call that is
		 * still alive commits the file (below). */
		if (r < 0) {
			code = RPC_CANCELLED;
			goto out;
		}
		if (req->msg_case != EMBER__V1__WRITE_FILE_REQUEST__MSG_DATA) {
			code = rpc_call_error(
				call, RPC_INVALID_ARGUMENT,
				req->msg_case == EMBER__V1__WRITE_FILE_REQUEST__MSG_HEADER
					? "a second header"
					: "a request with neither header nor data");
			goto out;
		}
		if (req->data.len > FILE_CHUNK_MAX) {
			code = rpc_call_error(
				call, RPC_INVALID_ARGUMENT,
				"a data chunk of %zu bytes: at most 1 MiB per message",
				req->data.len);
			goto out;
		}
		if (sized && size + req->data.len > want) {
			code = rpc_call_error(call, RPC_INVALID_ARGUMENT,
					      "more than the %" PRIu64 " bytes of header.size; "
					      "nothing was written",
					      want);
			goto out;
		}
		if (size + req->data.len > max_file_bytes(m)) {
			code = rpc_call_error(
				call, RPC_RESOURCE_EXHAUSTED,
				"the file is larger than %u MiB ([api] max_file_mib); "
				"nothing was written",
				m->config->max_file_mib);
			goto out;
		}
		if (!guest_session_running(&s)) {
			code = guest_session_aborted(&s);
			goto out;
		}
		if ((r = guest_file_write_data(s.g, req->data.data, req->data.len)) < 0) {
			code = guest_session_failed(&s, r);
			goto out;
		}
		size += req->data.len;
		protobuf_c_message_free_unpacked(&req->base, NULL);
		req = NULL;
	}
	if (rpc_call_is_cancelled(call)) {
		code = RPC_CANCELLED;
		goto out;
	}
	/* A cancellation that came as the end of the stream is caught here when the client gave
	 * the size (not above: is_cancelled() may not know it yet). */
	if (sized && size != want) {
		code = rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "the stream ended after %" PRIu64 " of the %" PRIu64
				      " bytes of header.size; nothing was written",
				      size, want);
		goto out;
	}
	/* The guest fsyncs the whole file before it answers: time for that, at a slow disk's
	 * pace. Were the wait cut short, the call would fail while the guest may still
	 * rename the file into place. */
	guest_conn_set_timeout(s.g, FILE_STEP_TIMEOUT_MS + (int)(size / FILE_SYNC_BYTES_PER_MS));
	if ((r = guest_file_write_end(s.g, &resp.size)) < 0) {
		code = guest_session_failed(&s, r);
		goto out;
	}
	log_debug("sandbox %s: wrote %s (%" PRIu64 " bytes)", s.sb->id, what + strlen("writing "),
		  resp.size);
	code = rpc_call_send(call, &resp.base) < 0 ? RPC_CANCELLED : RPC_OK;
out:
	if (req)
		protobuf_c_message_free_unpacked(&req->base, NULL);
	/* Before the end, closing the connection makes the guest drop its temporary file. */
	guest_session_close(&s);
	return code;
}

RpcCode node_read_file(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__ReadFileRequest *req = (const void *)request;
	Ember__V1__ReadFileResponse resp = EMBER__V1__READ_FILE_RESPONSE__INIT;
	Ember__V1__FileInfo info_pb = EMBER__V1__FILE_INFO__INIT;
	_cleanup_free_ char *what = NULL;
	GuestSession s = {};
	GuestFileInfo info;
	RpcCode code;
	int r;

	if ((code = node_id_check(call, "sandbox_id", req->sandbox_id)) != RPC_OK ||
	    (code = path_check(call, req->path)) != RPC_OK)
		return code;
	if (asprintf(&what, "reading %.300s", req->path) < 0)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	if ((code = guest_session_open(&s, m, call, req->sandbox_id, what)) != RPC_OK)
		goto out;
	guest_conn_set_timeout(s.g, FILE_STEP_TIMEOUT_MS);
	if ((r = guest_file_read_begin(s.g, req->path, &info)) < 0) {
		code = guest_session_failed(&s, r);
		goto out;
	}
	if (info.size > max_file_bytes(m)) {
		code = rpc_call_error(call, RPC_RESOURCE_EXHAUSTED,
				      "%s is %" PRIu64
				      " bytes, more than %u MiB ([api] max_file_mib)",
				      req->path, info.size, m->config->max_file_mib);
		goto out;
	}
	info_pb.size = info.size;
	info_pb.mode = info.mode & 07777;
	info_pb.uid = info.uid;
	info_pb.gid = info.gid;
	resp.msg_case = EMBER__V1__READ_FILE_RESPONSE__MSG_INFO;
	resp.info = &info_pb;
	if (rpc_call_send(call, &resp.base) < 0) {
		code = RPC_CANCELLED;
		goto out;
	}
	for (;;) {
		const uint8_t *data;
		size_t n;

		if (rpc_call_is_cancelled(call)) {
			code = RPC_CANCELLED;
			goto out;
		}
		r = guest_file_read_next(s.g, &data, &n);
		if (r == 0)
			break;
		/* the guest sent more or fewer bytes than it declared */
		if ((r == -EOVERFLOW || r == -ENODATA) && !guest_conn_refused(s.g)) {
			code = rpc_call_error(call, RPC_DATA_LOSS, "sandbox %s: %s", s.sb->id,
					      guest_conn_error(s.g));
			goto out;
		}
		if (r < 0) {
			code = guest_session_failed(&s, r);
			goto out;
		}
		/* guest chunks are far smaller than 1 MiB; a larger one is split all the same */
		while (n > 0) {
			size_t k = n < FILE_CHUNK_MAX ? n : FILE_CHUNK_MAX;
			resp.msg_case = EMBER__V1__READ_FILE_RESPONSE__MSG_DATA;
			resp.data = (ProtobufCBinaryData){.len = k, .data = (uint8_t *)data};
			if (rpc_call_send(call, &resp.base) < 0) {
				code = RPC_CANCELLED;
				goto out;
			}
			data += k;
			n -= k;
		}
	}
	code = RPC_OK;
out:
	guest_session_close(&s);
	return code;
}
