/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The gRPC server layer: the only code in ember that touches gRPC core (see
 * ../shared/notes/grpc-core.md for the traps this layer exists to contain).
 *
 * Handlers see protobuf-c messages and this small call API, nothing of gRPC core. Each accepted
 * call runs its handler on a worker thread (never on the completion-queue poller), so a handler
 * may block: in rpc_call_send() when the client reads slowly (back-pressure), in rpc_call_recv()
 * waiting for the next client message, or in rpc_call_wait(). All of these return -ECANCELED as
 * soon as the call is cancelled, its deadline passes or the client goes away.
 *
 * A handler returns a status code; for errors it records a message with rpc_call_error(), which
 * returns the code so that `return rpc_call_error(call, RPC_NOT_FOUND, "…", …);` reads naturally.
 * Unary handlers send exactly one reply with rpc_call_send() and return RPC_OK; the reply and the
 * status then leave in one batch.
 */
#pragma once

#include <protobuf-c/protobuf-c.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include "common/macro.h"

/* gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html); the numbers are
 * part of the wire protocol. */
typedef enum RpcCode {
	RPC_OK = 0,
	RPC_CANCELLED = 1,
	RPC_UNKNOWN = 2,
	RPC_INVALID_ARGUMENT = 3,
	RPC_DEADLINE_EXCEEDED = 4,
	RPC_NOT_FOUND = 5,
	RPC_ALREADY_EXISTS = 6,
	RPC_PERMISSION_DENIED = 7,
	RPC_RESOURCE_EXHAUSTED = 8,
	RPC_FAILED_PRECONDITION = 9,
	RPC_ABORTED = 10,
	RPC_OUT_OF_RANGE = 11,
	RPC_UNIMPLEMENTED = 12,
	RPC_INTERNAL = 13,
	RPC_UNAVAILABLE = 14,
	RPC_DATA_LOSS = 15,
	RPC_UNAUTHENTICATED = 16,
	_RPC_CODE_MAX,
} RpcCode;

const char *rpc_code_to_string(RpcCode code);

typedef enum RpcServerState {
	RPC_SERVER_STARTING, /* listening; health says NOT_SERVING */
	RPC_SERVER_SERVING,
	RPC_SERVER_DRAINING, /* no new calls; in-flight calls get the grace period */
	_RPC_SERVER_STATE_MAX,
} RpcServerState;

typedef struct RpcServer RpcServer;
typedef struct RpcCall RpcCall;

/* `request` is the unpacked request for unary and server-streaming methods, NULL for
 * client-streaming and bidi methods (use rpc_call_recv()). It is owned by the call. */
typedef RpcCode (*RpcHandler)(RpcCall *call, const ProtobufCMessage *request, void *userdata);

typedef struct RpcMethodHandler {
	const char *name; /* method name as in the .proto, e.g. "GetNode" */
	RpcHandler handler;
} RpcMethodHandler;

typedef struct RpcServerOptions {
	/* A FileDescriptorSet (protoc --descriptor_set_out --include_imports) covering every
	 * service added: the source of streaming kinds and of server reflection. Not copied. */
	const uint8_t *descriptor_set;
	size_t descriptor_set_size;
	size_t max_message_bytes;      /* both directions */
	unsigned keepalive_time_ms;    /* server pings an idle connection this often */
	unsigned keepalive_timeout_ms; /* and closes it when the ping is not answered */
	unsigned min_ping_interval_ms; /* clients may ping this often without data */
	unsigned max_concurrent_calls; /* unary calls; above it new ones get RESOURCE_EXHAUSTED */
	/* Streaming calls (any method with a stream) run on a pool of their own, so that open
	 * streams never take the threads unary calls need; above it RESOURCE_EXHAUSTED. */
	unsigned max_concurrent_streams;
	size_t stream_high_water_bytes; /* queued per call before rpc_call_send() blocks */
	const char *version;            /* shown in UNIMPLEMENTED messages */
} RpcServerOptions;

typedef struct RpcTlsFiles {
	const char *cert_file;      /* server certificate chain, PEM */
	const char *key_file;       /* its private key, PEM */
	const char *client_ca_file; /* CA bundle that client certificates must chain to, PEM */
} RpcTlsFiles;

int rpc_server_new(const RpcServerOptions *opts, RpcServer **ret);
void rpc_server_free(RpcServer *s);

/* Registers every method of `service`; methods without an entry in `handlers` answer
 * UNIMPLEMENTED with a message naming the method. Call before rpc_server_start(). */
int rpc_server_add_service(RpcServer *s, const ProtobufCServiceDescriptor *service,
			   const RpcMethodHandler *handlers, size_t n_handlers, void *userdata);

/* The socket is created with `mode` (never wider, not even for a moment). The caller holds
 * whatever lock guards the path: gRPC unlinks an existing socket before binding. */
int rpc_server_listen_unix(RpcServer *s, const char *path, mode_t mode);
/* `tls` NULL means plaintext. Returns the bound port (useful with port 0). */
int rpc_server_listen_tcp(RpcServer *s, const char *addr, const RpcTlsFiles *tls);

int rpc_server_start(RpcServer *s);
void rpc_server_set_state(RpcServer *s, RpcServerState state);
RpcServerState rpc_server_get_state(RpcServer *s);

/* Graceful shutdown, in steps so that the caller can keep handling signals in between:
 * drain_begin stops accepting calls and tells long-poll handlers (rpc_call_wait → -ESHUTDOWN);
 * drain_wait returns 0 once every call has finished, -ETIMEDOUT after timeout_ms;
 * cancel_all cancels what is left. */
void rpc_server_drain_begin(RpcServer *s);
int rpc_server_drain_wait(RpcServer *s, int64_t timeout_ms);
void rpc_server_cancel_all(RpcServer *s);
/* All three: drain, wait up to grace_ms (cut short when a signal in `interrupt` arrives; the
 * caller has it blocked), cancel the rest and wait up to 5 s for their handlers. Returns 0 when
 * everything finished in the grace period, -EINTR or -ETIMEDOUT when calls had to be cancelled,
 * -EBUSY when handlers were still running after that. */
int rpc_server_shutdown(RpcServer *s, int64_t grace_ms, const sigset_t *interrupt);

/* The Prometheus text of the server's RPC counters and latency histograms. */
void rpc_server_write_metrics(RpcServer *s, FILE *f);

/* CLOCK_MONOTONIC µs of the poller's last turn: it turns at least once a second while alive. */
uint64_t rpc_server_heartbeat_usec(RpcServer *s);

/* Queue a message. Blocks while more than stream_high_water_bytes are queued for this call and
 * the client has not taken them. -ECANCELED when the call is gone, -EINVAL for a second reply of
 * a unary method, -ENOMEM/-EMSGSIZE on packing failure. */
int rpc_call_send(RpcCall *call, const ProtobufCMessage *msg);

/* Next client message of a client-streaming or bidi call: 1 and *ret (free with
 * protobuf_c_message_free_unpacked) on a message, 0 when the client half-closed, -ECANCELED,
 * -EBADMSG when the bytes do not parse as the method's input type. gRPC core may also report a
 * cancellation as the end of the stream (0); where the difference matters (stdin EOF versus a
 * vanished client), the next rpc_call_send() or rpc_call_is_cancelled() tells. */
/* One reader at a time (not checked: two would each take some of the messages). */
int rpc_call_recv(RpcCall *call, ProtobufCMessage **ret);

/* For handlers that wait on the call and on fds of their own (Exec: the guest connection) in
 * one poll loop, on one thread:
 *   rpc_call_notify_fd()    an eventfd that becomes readable whenever something the handler may
 *                           wait for happened: a message arrived, room in the send queue after
 *                           rpc_call_send_nowait() was refused it, cancellation,
 *                           rpc_call_wake(). Owned by the call; readable at first.
 *   rpc_call_notify_clear() resets it, saying whether it was set; clear first, then try the
 *                           calls below, then poll.
 *   rpc_call_send_nowait()  as rpc_call_send(), but -EAGAIN instead of blocking (not queued).
 *   rpc_call_recv_nowait()  as rpc_call_recv(), but -EAGAIN while the next message is on its
 *                           way (the first call asks for it: no message is read ahead). */
int rpc_call_notify_fd(RpcCall *call);
bool rpc_call_notify_clear(RpcCall *call);
int rpc_call_send_nowait(RpcCall *call, const ProtobufCMessage *msg);

/* rpc_call_send_nowait() for a message the handler serialized itself: `head` (copied), then
 * each piece's bytes, sent as they are without a copy (Exec's output goes out in the very
 * buffers the guest's chunks arrived in). Pieces are malloc()ed; those the call took are
 * cleared (it free()s them once sent, or on failure), the caller keeps the rest: all of them on
 * -EAGAIN and on errors found before anything was queued, none on 0. At most RPC_PIECES_MAX. */
#define RPC_PIECES_MAX 64
typedef struct RpcPiece {
	void *data;
	size_t size;
} RpcPiece;
int rpc_call_send_pieces_nowait(RpcCall *call, const void *head, size_t head_size, RpcPiece *pieces,
				size_t n);
int rpc_call_recv_nowait(RpcCall *call, ProtobufCMessage **ret);

/* Sleep until rpc_call_wake(), the timeout (-1: none), cancellation (-ECANCELED) or server
 * drain (-ESHUTDOWN). Returns 0 when woken or timed out. */
int rpc_call_wait(RpcCall *call, int64_t timeout_ms);
void rpc_call_wake(RpcCall *call);

/* For calls that would otherwise stay open through the whole shutdown grace period waiting for
 * the client (reflection sessions, watches): end the call with UNAVAILABLE as soon as the
 * server starts draining. Blocked rpc_call_recv()/rpc_call_send() then return -ECANCELED. */
void rpc_call_end_on_drain(RpcCall *call);
/* Wakes every call of the server (for state that many long-poll handlers watch). */
void rpc_server_wake_all(RpcServer *s);

bool rpc_call_is_cancelled(RpcCall *call);
/* Milliseconds left before the client's deadline, -1 when it set none, 0 when passed. */
int64_t rpc_call_remaining_ms(RpcCall *call);
const char *rpc_call_method(RpcCall *call); /* "/ember.v1.Node/GetNode" */
RpcServer *rpc_call_server(RpcCall *call);

RpcCode rpc_call_error(RpcCall *call, RpcCode code, const char *format, ...)
	__attribute__((format(printf, 3, 4)));

/* ---- in-process calls ----
 * A call into this server's own methods from inside emberd: the HTTP gateway's way in. It goes
 * through the server's unix listener, so it reaches the very handlers a remote client reaches,
 * with the same limits, deadlines, cancellation and drain, and counts in the same metrics.
 * The caller's thread drives it (no callbacks); a call is used by one thread at a time. */

typedef struct RpcMethodInfo {
	const char *path; /* "/ember.v1.Node/GetNode" */
	const ProtobufCMessageDescriptor *input, *output;
	bool client_streaming, server_streaming;
} RpcMethodInfo;
/* A registered method by path; -ENOENT when there is none. */
int rpc_server_find_method(RpcServer *s, const char *path, RpcMethodInfo *ret);

typedef struct RpcLocalCall RpcLocalCall;
/* timeout_ms < 0: no deadline. Fails with -EAGAIN before rpc_server_start(). */
int rpc_local_call_start(RpcServer *s, const char *path, int64_t timeout_ms, RpcLocalCall **ret);
/* Sends one request message; returns once gRPC took it, receiving meanwhile (a handler that
 * answers while it reads never waits for us). -ECANCELED when the call already ended. */
int rpc_local_call_send(RpcLocalCall *c, const ProtobufCMessage *msg);
/* Half-closes: no more requests (for Exec, the end of stdin). */
int rpc_local_call_close_send(RpcLocalCall *c);
/* The next response: 1 and *ret (free with protobuf_c_message_free_unpacked), 0 when the call
 * ended (see rpc_local_call_status: a response that did not parse cancels the call, and the
 * status says so), -ETIMEDOUT when nothing came within timeout_ms (-1: wait). */
int rpc_local_call_recv(RpcLocalCall *c, int64_t timeout_ms, ProtobufCMessage **ret);
/* Valid once rpc_local_call_recv() returned 0. The message lives as long as the call. */
RpcCode rpc_local_call_status(RpcLocalCall *c, const char **ret_message);
/* Cancels the call (the handler sees rpc_call_is_cancelled()); recv then ends with CANCELLED. */
void rpc_local_call_cancel(RpcLocalCall *c);
/* While rpc_local_call_send() waits for gRPC to take a message, it asks `aborted` every
 * second; true cancels the call (the caller's own client went away). */
void rpc_local_call_set_abort(RpcLocalCall *c, bool (*aborted)(void *userdata), void *userdata);
/* Cancels the call if it has not ended and waits for gRPC to let go of it. */
void rpc_local_call_free(RpcLocalCall *c);
DEFINE_POINTER_CLEANUP(RpcLocalCall, rpc_local_call_free)
