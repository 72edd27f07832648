/* SPDX-License-Identifier: Apache-2.0 */
/*
 * In-process calls: a gRPC client of the server's own unix listener, driven by the caller's
 * thread through a completion queue of the call's own.
 *
 * A receive stays armed while the caller sends, and what arrives meanwhile is kept: a handler
 * that answers while it reads (Exec echoing stdin) then never waits for a caller that is still
 * sending, which would otherwise deadlock once both directions' windows are full. What is kept
 * is bounded (LOCAL_BUFFER_MAX): past it the call is cancelled rather than the node's memory
 * spent on a caller that does not read.
 */
#include <errno.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/macro.h"
#include "rpc-internal.h"

#define LOCAL_BUFFER_MAX (64u << 20)

typedef struct LocalMsg {
	ProtobufCMessage *msg;
	size_t size;
	struct LocalMsg *next;
} LocalMsg;

struct RpcLocalCall {
	RpcMethodInfo method;
	grpc_completion_queue *cq;
	grpc_call *call;
	grpc_metadata_array initial_md, trailing_md;
	grpc_slice details;
	char *status_message;
	grpc_byte_buffer *send_buf, *recv_buf;
	LocalMsg *head, *tail;
	size_t buffered;

	/* Why this side cancelled the call, when it did for a reason of its own: the status
	 * gRPC reports is then only "Cancelled". */
	const char *local_message;
	RpcCode local_code;

	bool (*aborted)(void *userdata);
	void *aborted_userdata;

	grpc_status_code status;
	unsigned in_flight; /* batches started whose tag has not come back */
	/* Tags: the addresses of these bytes. */
	char tag_start, tag_send, tag_close, tag_recv, tag_status;
	bool status_done;
	bool send_in_flight, send_ok;
	bool recv_in_flight, recv_eof;
};

static void cancel_because(RpcLocalCall *c, RpcCode code, const char *message)
{
	if (!c->local_code) {
		c->local_code = code;
		c->local_message = message;
	}
	grpc_call_cancel(c->call, NULL);
}

static int start_batch(RpcLocalCall *c, const grpc_op *ops, size_t n, void *tag)
{
	if (grpc_call_start_batch(c->call, ops, n, tag, NULL) != GRPC_CALL_OK)
		return -EIO;
	c->in_flight++;
	return 0;
}

static void arm_recv(RpcLocalCall *c)
{
	grpc_op recv_op = {.op = GRPC_OP_RECV_MESSAGE};

	if (c->recv_in_flight || c->recv_eof || c->buffered > LOCAL_BUFFER_MAX)
		return;
	recv_op.data.recv_message.recv_message = &c->recv_buf;
	if (start_batch(c, &recv_op, 1, &c->tag_recv) < 0) {
		c->recv_eof = true;
		return;
	}
	c->recv_in_flight = true;
}

static void took_message(RpcLocalCall *c)
{
	grpc_byte_buffer_reader reader;
	grpc_slice slice;
	ProtobufCMessage *msg = NULL;
	LocalMsg *m;

	if (!c->recv_buf) {
		c->recv_eof = true; /* the server's side is closed: the status follows */
		return;
	}
	if (grpc_byte_buffer_reader_init(&reader, c->recv_buf)) {
		slice = grpc_byte_buffer_reader_readall(&reader);
		grpc_byte_buffer_reader_destroy(&reader);
		msg = protobuf_c_message_unpack(c->method.output, NULL, GRPC_SLICE_LENGTH(slice),
						GRPC_SLICE_START_PTR(slice));
		grpc_slice_unref(slice);
	}
	size_t size = grpc_byte_buffer_length(c->recv_buf);
	grpc_byte_buffer_destroy(TAKE_PTR(c->recv_buf));
	m = msg ? calloc(1, sizeof(*m)) : NULL;
	if (!m) {
		if (msg)
			protobuf_c_message_free_unpacked(msg, NULL);
		c->recv_eof = true;
		cancel_because(c, msg ? RPC_RESOURCE_EXHAUSTED : RPC_INTERNAL,
			       msg ? "out of memory" : "a response does not parse as its type");
		return;
	}
	m->msg = msg;
	m->size = size;
	if (c->tail)
		c->tail->next = m;
	else
		c->head = m;
	c->tail = m;
	c->buffered += size;
	if (c->buffered > LOCAL_BUFFER_MAX) {
		log_debug("%s: more than %u bytes of responses not taken: cancelling",
			  c->method.path, LOCAL_BUFFER_MAX);
		cancel_because(c, RPC_RESOURCE_EXHAUSTED,
			       "more than 64 MiB of responses arrived while requests were sent");
	}
}

/* Waits for one completion until `deadline`; -ETIMEDOUT when none came. */
static int pump(RpcLocalCall *c, gpr_timespec deadline)
{
	grpc_event ev = grpc_completion_queue_next(c->cq, deadline, NULL);

	if (ev.type == GRPC_QUEUE_TIMEOUT)
		return -ETIMEDOUT;
	if (ev.type != GRPC_OP_COMPLETE)
		return -EIO;
	c->in_flight--;
	if (ev.tag == &c->tag_send) {
		c->send_in_flight = false;
		c->send_ok = ev.success;
		grpc_byte_buffer_destroy(TAKE_PTR(c->send_buf));
	} else if (ev.tag == &c->tag_recv) {
		c->recv_in_flight = false;
		if (ev.success)
			took_message(c);
		else
			c->recv_eof = true;
		/* Keep reading while a send waits: see the top of the file. */
		if (c->send_in_flight)
			arm_recv(c);
	} else if (ev.tag == &c->tag_status) {
		c->status_done = true;
		c->status_message = grpc_slice_to_c_string(c->details);
	}
	return 0;
}

static gpr_timespec deadline_in(int64_t timeout_ms)
{
	if (timeout_ms < 0)
		return gpr_inf_future(GPR_CLOCK_MONOTONIC);
	return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
			    gpr_time_from_millis(timeout_ms, GPR_TIMESPAN));
}

int rpc_local_call_start(RpcServer *s, const char *path, int64_t timeout_ms, RpcLocalCall **ret)
{
	grpc_channel *ch = rpc_server_local_channel(s);
	RpcLocalCall *c;
	grpc_op ops[2] = {{.op = GRPC_OP_SEND_INITIAL_METADATA},
			  {.op = GRPC_OP_RECV_INITIAL_METADATA}};
	grpc_op status_op = {.op = GRPC_OP_RECV_STATUS_ON_CLIENT};
	int r;

	if (!ch)
		return -EAGAIN;
	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	r = rpc_server_find_method(s, path, &c->method);
	if (r < 0) {
		free(c);
		return r;
	}
	grpc_metadata_array_init(&c->initial_md);
	grpc_metadata_array_init(&c->trailing_md);
	c->details = grpc_empty_slice();
	c->cq = grpc_completion_queue_create_for_next(NULL);
	grpc_slice method = grpc_slice_from_static_string(c->method.path);
	gpr_timespec deadline = timeout_ms < 0 ? gpr_inf_future(GPR_CLOCK_REALTIME)
					       : gpr_convert_clock_type(deadline_in(timeout_ms),
									GPR_CLOCK_REALTIME);
	c->call = c->cq ? grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq, method,
						   NULL, deadline, NULL)
			: NULL;
	if (!c->call) {
		rpc_local_call_free(c);
		return -ENOMEM;
	}
	ops[1].data.recv_initial_metadata.recv_initial_metadata = &c->initial_md;
	status_op.data.recv_status_on_client.trailing_metadata = &c->trailing_md;
	status_op.data.recv_status_on_client.status = &c->status;
	status_op.data.recv_status_on_client.status_details = &c->details;
	if (start_batch(c, ops, ELEMENTSOF(ops), &c->tag_start) < 0 ||
	    start_batch(c, &status_op, 1, &c->tag_status) < 0) {
		rpc_local_call_free(c);
		return -EIO;
	}
	*ret = c;
	return 0;
}

int rpc_local_call_send(RpcLocalCall *c, const ProtobufCMessage *msg)
{
	grpc_op send_op = {.op = GRPC_OP_SEND_MESSAGE};
	size_t size = protobuf_c_message_get_packed_size(msg);
	grpc_slice slice;
	int r;

	if (c->status_done)
		return -ECANCELED;
	slice = grpc_slice_malloc(size);
	protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(slice));
	c->send_buf = grpc_raw_byte_buffer_create(&slice, 1);
	grpc_slice_unref(slice);
	send_op.data.send_message.send_message = c->send_buf;
	if (start_batch(c, &send_op, 1, &c->tag_send) < 0) {
		grpc_byte_buffer_destroy(TAKE_PTR(c->send_buf));
		return -ECANCELED;
	}
	c->send_in_flight = true;
	arm_recv(c);
	while (c->send_in_flight) {
		r = pump(c, deadline_in(1000));
		if (r == -ETIMEDOUT && c->aborted && c->aborted(c->aborted_userdata))
			cancel_because(c, RPC_CANCELLED, "the client went away");
		else if (r < 0 && r != -ETIMEDOUT)
			return r;
	}
	return c->send_ok ? 0 : -ECANCELED;
}

int rpc_local_call_close_send(RpcLocalCall *c)
{
	grpc_op close_op = {.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT};

	if (c->status_done)
		return 0;
	return start_batch(c, &close_op, 1, &c->tag_close) < 0 ? -ECANCELED : 0;
}

int rpc_local_call_recv(RpcLocalCall *c, int64_t timeout_ms, ProtobufCMessage **ret)
{
	gpr_timespec deadline = deadline_in(timeout_ms);
	int r;

	for (;;) {
		if (c->head) {
			LocalMsg *m = c->head;
			c->head = m->next;
			if (!c->head)
				c->tail = NULL;
			c->buffered -= m->size;
			*ret = m->msg;
			free(m);
			return 1;
		}
		if (c->recv_eof && c->status_done)
			return 0;
		arm_recv(c);
		if ((r = pump(c, deadline)) < 0)
			return r;
	}
}

RpcCode rpc_local_call_status(RpcLocalCall *c, const char **ret_message)
{
	if (c->local_code) {
		if (ret_message)
			*ret_message = c->local_message;
		return c->local_code;
	}
	if (ret_message)
		*ret_message = c->status_message ?: "";
	if (!c->status_done)
		return RPC_UNKNOWN;
	return (unsigned)c->status < _RPC_CODE_MAX ? (RpcCode)c->status : RPC_UNKNOWN;
}

void rpc_local_call_set_abort(RpcLocalCall *c, bool (*aborted)(void *userdata), void *userdata)
{
	c->aborted = aborted;
	c->aborted_userdata = userdata;
}

void rpc_local_call_cancel(RpcLocalCall *c)
{
	if (c->call && !c->status_done)
		grpc_call_cancel(c->call, NULL);
}

void rpc_local_call_free(RpcLocalCall *c)
{
	if (!c)
		return;
	if (c->call) {
		rpc_local_call_cancel(c);
		/* Every batch's tag comes back after a cancel; the queue must give them all up
		 * before it and the call go. */
		while (c->in_flight > 0)
			if (pump(c, gpr_inf_future(GPR_CLOCK_MONOTONIC)) < 0)
				break;
		grpc_call_unref(c->call);
	}
	if (c->cq) {
		grpc_completion_queue_shutdown(c->cq);
		while (grpc_completion_queue_next(c->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL)
			       .type != GRPC_QUEUE_SHUTDOWN)
			;
		grpc_completion_queue_destroy(c->cq);
	}
	for (LocalMsg *m = c->head, *n; m; m = n) {
		n = m->next;
		protobuf_c_message_free_unpacked(m->msg, NULL);
		free(m);
	}
	if (c->send_buf)
		grpc_byte_buffer_destroy(c->send_buf);
	if (c->recv_buf)
		grpc_byte_buffer_destroy(c->recv_buf);
	grpc_metadata_array_destroy(&c->initial_md);
	grpc_metadata_array_destroy(&c->trailing_md);
	grpc_slice_unref(c->details);
	gpr_free(c->status_message);
	free(c);
}
