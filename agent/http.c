/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The HTTP listener: libmicrohttpd, one thread per connection.
 *
 * A thread per connection because every API request blocks: it is an in-process gRPC call
 * that the thread drives until the handler answers (a create takes seconds), and a stream's
 * content callback waits for the next message. Connections are few (an operator's browser,
 * a script) and capped (CONNECTION_LIMIT).
 *
 * Security: this is an administrative door to the node. Every request needs the token (a
 * bearer header, or the cookie the page gets from GET /test?token=…); requests that carry the
 * token in a cookie are ones a browser sends on its own, so those that could change state
 * (POST) must come from the page itself: an Origin equal to the listener's own and a JSON
 * content type, which no cross-site form can produce. GET never changes state.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <json-c/json.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>

#include "common/fileio.h"
#include "common/log.h"
#include "common/macro.h"
#include "http.h"
#include "pbjson.h"

#define CONNECTION_LIMIT   64
#define CONNECTION_TIMEOUT 120 /* s without traffic; streams send keepalives more often */
#define BODY_MAX           (16u << 20)
#define KEEPALIVE_MS       15000
#define TOKEN_COOKIE       "ember_token"
#define TOKEN_MIN_LEN      16

extern const char ember_test_page[];
extern const unsigned long ember_test_page_size;

struct HttpServer {
	HttpOptions opts;
	char *listen;
	char *service;
	char *run_dir;
	char *token;
	struct MHD_Daemon *daemon;
	int port;

	/* Requests by outcome, for /metrics. */
	_Atomic uint64_t requests_ok, requests_unauthorized, requests_forbidden;
};

typedef enum StreamFormat {
	FORMAT_SSE,
	FORMAT_NDJSON,
} StreamFormat;

typedef struct Request {
	HttpServer *h;
	char *body;
	size_t size, cap;
	bool too_big;
} Request;

typedef struct Stream {
	HttpServer *h;
	struct MHD_Connection *conn;
	RpcLocalCall *call;
	StreamFormat format;
	char *out; /* formatted, not yet handed to libmicrohttpd */
	size_t out_len, out_pos;
	bool done;
} Stream;

unsigned http_status_for(RpcCode code)
{
	switch (code) {
	case RPC_OK:
		return 200;
	case RPC_CANCELLED:
		return 499;
	case RPC_INVALID_ARGUMENT:
	case RPC_FAILED_PRECONDITION:
	case RPC_OUT_OF_RANGE:
		return 400;
	case RPC_DEADLINE_EXCEEDED:
		return 504;
	case RPC_NOT_FOUND:
		return 404;
	case RPC_ALREADY_EXISTS:
	case RPC_ABORTED:
		return 409;
	case RPC_PERMISSION_DENIED:
		return 403;
	case RPC_UNAUTHENTICATED:
		return 401;
	case RPC_RESOURCE_EXHAUSTED:
		return 429;
	case RPC_UNIMPLEMENTED:
		return 501;
	case RPC_UNAVAILABLE:
		return 503;
	case RPC_UNKNOWN:
	case RPC_INTERNAL:
	case RPC_DATA_LOSS:
	default:
		return 500;
	}
}

/* ------------------------------------------------------------------------------------------ */
/* responses */

static enum MHD_Result queue(struct MHD_Connection *conn, unsigned status, const char *type,
			     const void *data, size_t size)
{
	struct MHD_Response *resp =
		MHD_create_response_from_buffer(size, (void *)data, MHD_RESPMEM_MUST_COPY);
	if (!resp)
		return MHD_NO;
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
	enum MHD_Result r = MHD_queue_response(conn, status, resp);
	MHD_destroy_response(resp);
	return r;
}

static enum MHD_Result queue_text(struct MHD_Connection *conn, unsigned status, const char *text)
{
	return queue(conn, status, "text/plain; charset=utf-8", text, strlen(text));
}

static json_object *status_json(RpcCode code, const char *message)
{
	json_object *o = json_object_new_object();
	json_object_object_add(o, "code", json_object_new_int((int)code));
	json_object_object_add(o, "status", json_object_new_string(rpc_code_to_string(code)));
	json_object_object_add(o, "message", json_object_new_string(message ?: ""));
	return o;
}

static enum MHD_Result queue_json(struct MHD_Connection *conn, unsigned status, json_object *o)
{
	size_t len;
	const char *s = json_object_to_json_string_length(o, JSON_C_TO_STRING_PLAIN, &len);
	enum MHD_Result r = queue(conn, status, "application/json", s, len);
	json_object_put(o);
	return r;
}

static enum MHD_Result queue_error(struct MHD_Connection *conn, RpcCode code, const char *format,
				   ...) __attribute__((format(printf, 3, 4)));
static enum MHD_Result queue_error(struct MHD_Connection *conn, RpcCode code, const char *format,
				   ...)
{
	_cleanup_free_ char *msg = NULL;
	va_list ap;

	va_start(ap, format);
	if (vasprintf(&msg, format, ap) < 0)
		msg = NULL;
	va_end(ap);
	return queue_json(conn, http_status_for(code), status_json(code, msg ?: "out of memory"));
}

/* ------------------------------------------------------------------------------------------ */
/* authentication */

static bool token_equal(const HttpServer *h, const char *given)
{
	size_t n = strlen(h->token);
	return given && strlen(given) == n && CRYPTO_memcmp(given, h->token, n) == 0;
}

typedef enum Auth {
	AUTH_NONE,
	AUTH_BEARER,
	AUTH_COOKIE,
} Auth;

static Auth authenticate(HttpServer *h, struct MHD_Connection *conn)
{
	const char *a = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
	if (a && strncasecmp(a, "Bearer ", 7) == 0)
		return token_equal(h, a + 7) ? AUTH_BEARER : AUTH_NONE;
	if (token_equal(h, MHD_lookup_connection_value(conn, MHD_COOKIE_KIND, TOKEN_COOKIE)))
		return AUTH_COOKIE;
	return AUTH_NONE;
}

/* A request the browser sent with the cookie may change state only when the page itself sent
 * it: same origin, JSON. Returns NULL when it may, else why not. */
static const char *cookie_post_refusal(struct MHD_Connection *conn)
{
	const char *origin = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Origin");
	const char *host = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Host");
	const char *type = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Type");
	const char *site = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Sec-Fetch-Site");

	if (site && strcmp(site, "same-origin") != 0)
		return "cross-site request refused";
	if (!origin || !host || strncmp(origin, "http://", 7) != 0 || strcmp(origin + 7, host) != 0)
		return "cross-origin request refused: a POST with the cookie must come from the "
		       "page itself (or send Authorization: Bearer)";
	if (!type || strncasecmp(type, "application/json", 16) != 0)
		return "a POST with the cookie must be application/json";
	return NULL;
}

static bool peer_is_loopback(struct MHD_Connection *conn)
{
	const union MHD_ConnectionInfo *ci =
		MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
	if (!ci || !ci->client_addr)
		return false;
	if (ci->client_addr->sa_family == AF_INET) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)ci->client_addr;
		return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
	}
	if (ci->client_addr->sa_family == AF_INET6) {
		const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ci->client_addr;
		return IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr) ||
		       (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr) && in6->sin6_addr.s6_addr[12] == 127);
	}
	return false;
}

/* The peer closed its side (browser tab gone): nothing will read what a call produces. */
static bool peer_gone(struct MHD_Connection *conn)
{
	const union MHD_ConnectionInfo *ci =
		MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
	if (!ci)
		return false;
	struct pollfd p = {.fd = ci->connect_fd, .events = POLLRDHUP};
	return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

/* ------------------------------------------------------------------------------------------ */
/* requests to JSON messages */

static const ProtobufCFieldDescriptor *field_by_json_name(const ProtobufCMessageDescriptor *d,
							  const char *name)
{
	for (unsigned i = 0; i < d->n_fields; i++) {
		const ProtobufCFieldDescriptor *f = &d->fields[i];
		char camel[256];
		size_t j = 0;
		bool up = false;

		if (strcmp(f->name, name) == 0)
			return f;
		for (const char *p = f->name; *p && j + 1 < sizeof(camel); p++) {
			if (*p == '_') {
				up = true;
				continue;
			}
			camel[j++] = up ? (char)(*p >= 'a' && *p <= 'z' ? *p - 32 : *p) : *p;
			up = false;
		}
		camel[j] = 0;
		if (strcmp(camel, name) == 0)
			return f;
	}
	return NULL;
}

typedef struct QueryBuild {
	const ProtobufCMessageDescriptor *desc;
	json_object *json;
	char *error;
} QueryBuild;

/* GET's query parameters as the request's top-level scalar fields (?sinceRevision=5). */
static enum MHD_Result query_arg(void *cls, enum MHD_ValueKind kind, const char *key,
				 const char *value)
{
	QueryBuild *q = cls;
	const ProtobufCFieldDescriptor *f = field_by_json_name(q->desc, key);
	json_object *v;

	(void)kind;
	if (!f || f->type == PROTOBUF_C_TYPE_MESSAGE) {
		if (asprintf(&q->error, "%s: not a scalar field of %s", key, q->desc->name) < 0)
			q->error = NULL;
		return MHD_NO;
	}
	value = value ?: "";
	if (f->type == PROTOBUF_C_TYPE_BOOL)
		v = json_object_new_boolean(strcmp(value, "true") == 0 || strcmp(value, "1") == 0);
	else if (f->type == PROTOBUF_C_TYPE_INT32 || f->type == PROTOBUF_C_TYPE_SINT32 ||
		 f->type == PROTOBUF_C_TYPE_SFIXED32 || f->type == PROTOBUF_C_TYPE_UINT32 ||
		 f->type == PROTOBUF_C_TYPE_FIXED32 || f->type == PROTOBUF_C_TYPE_FLOAT ||
		 f->type == PROTOBUF_C_TYPE_DOUBLE) {
		/* Numbers in JSON form; the transcoder checks them. */
		v = json_tokener_parse(value);
		if (!v || (!json_object_is_type(v, json_type_int) &&
			   !json_object_is_type(v, json_type_double))) {
			json_object_put(v);
			v = json_object_new_string(value);
		}
	} else {
		v = json_object_new_string(value);
	}
	if (f->label == PROTOBUF_C_LABEL_REPEATED) {
		json_object *arr;
		if (!json_object_object_get_ex(q->json, key, &arr)) {
			arr = json_object_new_array();
			json_object_object_add(q->json, key, arr);
		}
		json_object_array_add(arr, v);
	} else {
		json_object_object_add(q->json, key, v);
	}
	return MHD_YES;
}

/* The body's JSON values, one after another (whitespace or newlines between them). An empty
 * body is one empty message. */
static int parse_body(const Request *rq, json_object ***ret, size_t *ret_n, char **ret_error)
{
	json_object **v = NULL;
	size_t n = 0, off = 0;
	int r = 0;

	for (;;) {
		while (off < rq->size && strchr(" \t\r\n", rq->body[off]))
			off++;
		if (off >= rq->size)
			break;
		json_object *o = NULL;
		size_t used = 0;
		_cleanup_free_ char *err = NULL;
		r = pbjson_parse(rq->body + off, rq->size - off, &o, &used, &err);
		if (r < 0) {
			if (r == -EINVAL && asprintf(ret_error, "request body: JSON value %zu: %s",
						     n + 1, err ?: "does not parse") < 0)
				*ret_error = NULL;
			goto fail;
		}
		off += used;
		json_object **nv = reallocarray(v, n + 1, sizeof(json_object *));
		if (!nv) {
			json_object_put(o);
			r = -ENOMEM;
			goto fail;
		}
		v = nv;
		/* `null` is the message with every field at its default, as {} is. */
		v[n++] = o ?: json_object_new_object();
	}
	if (n == 0) {
		v = calloc(1, sizeof(json_object *));
		if (!v)
			return -ENOMEM;
		v[n++] = json_object_new_object();
	}
	*ret = v;
	*ret_n = n;
	return 0;
fail:
	for (size_t i = 0; i < n; i++)
		json_object_put(v[i]);
	free(v);
	return r;
}

/* ------------------------------------------------------------------------------------------ */
/* streams */

static int out_append(Stream *st, const char *s, size_t n)
{
	if (st->out_pos == st->out_len)
		st->out_pos = st->out_len = 0;
	char *nb = realloc(st->out, st->out_len + n + 1);
	if (!nb)
		return -ENOMEM;
	st->out = nb;
	memcpy(st->out + st->out_len, s, n);
	st->out_len += n;
	return 0;
}

/* One stream entry: a message ("result") or the call's end ("status"). */
static int out_entry(Stream *st, const char *what, json_object *o)
{
	size_t len;
	const char *s;
	int r;

	if (st->format == FORMAT_SSE) {
		s = json_object_to_json_string_length(o, JSON_C_TO_STRING_PLAIN, &len);
		if (strcmp(what, "status") == 0)
			r = out_append(st, "event: status\n", 14);
		else
			r = 0;
		if (r >= 0)
			r = out_append(st, "data: ", 6);
		if (r >= 0)
			r = out_append(st, s, len);
		if (r >= 0)
			r = out_append(st, "\n\n", 2);
	} else {
		json_object *w = json_object_new_object();
		json_object_object_add(w, what, json_object_get(o));
		s = json_object_to_json_string_length(w, JSON_C_TO_STRING_PLAIN, &len);
		r = out_append(st, s, len);
		if (r >= 0)
			r = out_append(st, "\n", 1);
		json_object_put(w);
	}
	json_object_put(o);
	return r;
}

static int out_message(Stream *st, ProtobufCMessage *msg)
{
	json_object *o = NULL;
	int r = pbjson_to_json(msg, &o);
	protobuf_c_message_free_unpacked(msg, NULL);
	if (r < 0)
		return r;
	return out_entry(st, "result", o);
}

static void out_status(Stream *st)
{
	const char *message;
	RpcCode code = rpc_local_call_status(st->call, &message);
	(void)out_entry(st, "status", status_json(code, message));
	st->done = true;
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
	Stream *st = cls;
	unsigned waited_ms = 0;

	(void)pos;
	while (st->out_pos == st->out_len) {
		ProtobufCMessage *msg;
		int r;

		if (st->done)
			return MHD_CONTENT_READER_END_OF_STREAM;
		r = rpc_local_call_recv(st->call, 1000, &msg);
		if (r == 1) {
			if (out_message(st, msg) < 0) {
				rpc_local_call_cancel(st->call);
				return MHD_CONTENT_READER_END_WITH_ERROR;
			}
		} else if (r == 0 || r == -EBADMSG) {
			out_status(st);
		} else if (r == -ETIMEDOUT) {
			if (peer_gone(st->conn))
				return MHD_CONTENT_READER_END_WITH_ERROR; /* freeing cancels */
			waited_ms += 1000;
			/* Proxies and browsers drop a silent connection; a comment (SSE) or a
			 * blank line (NDJSON readers skip them) keeps it, and finds a gone peer. */
			if (waited_ms >= KEEPALIVE_MS) {
				if (st->format == FORMAT_SSE)
					(void)out_append(st, ": keepalive\n\n", 13);
				else
					(void)out_append(st, "\n", 1);
			}
		} else {
			return MHD_CONTENT_READER_END_WITH_ERROR;
		}
	}
	size_t n = st->out_len - st->out_pos;
	if (n > max)
		n = max;
	memcpy(buf, st->out + st->out_pos, n);
	st->out_pos += n;
	return (ssize_t)n;
}

static void stream_free(void *cls)
{
	Stream *st = cls;
	rpc_local_call_free(st->call);
	free(st->out);
	free(st);
}

/* ------------------------------------------------------------------------------------------ */
/* API calls */

static StreamFormat stream_format(struct MHD_Connection *conn, const RpcMethodInfo *mi)
{
	const char *accept = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Accept");
	if (accept && strstr(accept, "text/event-stream"))
		return FORMAT_SSE;
	if (accept && strstr(accept, "application/x-ndjson"))
		return FORMAT_NDJSON;
	/* Exec and WriteFile send streams too: their answers read best line by line. */
	return mi->client_streaming ? FORMAT_NDJSON : FORMAT_SSE;
}

/* Waits for the call's first response or its end, giving up when the peer goes away. A
 * stream's headers cannot wait for its first message (a watch from the latest revision may
 * be quiet for hours): after STREAM_HEAD_MS it answers -ETIMEDOUT and the stream starts
 * without one. The wait before lets errors that come at once (NOT_FOUND, INVALID_ARGUMENT)
 * still be HTTP statuses. */
#define STREAM_HEAD_MS 1000
static int first_response(struct MHD_Connection *conn, RpcLocalCall *call, bool stream,
			  ProtobufCMessage **ret)
{
	for (int64_t waited = 0;; waited += 1000) {
		if (stream && waited >= STREAM_HEAD_MS)
			return -ETIMEDOUT;
		int r = rpc_local_call_recv(call, 1000, ret);
		if (r != -ETIMEDOUT)
			return r;
		if (peer_gone(conn)) {
			rpc_local_call_cancel(call);
			return -ECONNRESET;
		}
	}
}

static enum MHD_Result api_call(HttpServer *h, struct MHD_Connection *conn, const char *method,
				const char *name, Request *rq)
{
	_cleanup_free_ char *path = NULL, *err = NULL;
	json_object **bodies = NULL;
	size_t n_bodies = 0;
	RpcMethodInfo mi;
	RpcLocalCall *call = NULL;
	ProtobufCMessage *resp = NULL;
	enum MHD_Result ret;
	int r;

	if (asprintf(&path, "/%s/%s", h->service, name) < 0)
		return MHD_NO;
	if (rpc_server_find_method(h->opts.rpc, path, &mi) < 0)
		return queue_error(conn, RPC_UNIMPLEMENTED, "unknown method %s", name);

	if (strcmp(method, "GET") == 0) {
		/* GET changes nothing: only methods that only read, with the query as request. */
		if (strncmp(name, "Get", 3) != 0 && strncmp(name, "List", 4) != 0 &&
		    strncmp(name, "Watch", 5) != 0 && strncmp(name, "Read", 4) != 0)
			return queue_text(conn, 405, "use POST for this method\n");
		QueryBuild q = {.desc = mi.input, .json = json_object_new_object()};
		MHD_get_connection_values(conn, MHD_GET_ARGUMENT_KIND, query_arg, &q);
		if (q.error) {
			json_object_put(q.json);
			ret = queue_error(conn, RPC_INVALID_ARGUMENT, "%s", q.error);
			free(q.error);
			return ret;
		}
		bodies = calloc(1, sizeof(json_object *));
		if (!bodies) {
			json_object_put(q.json);
			return MHD_NO;
		}
		bodies[0] = q.json;
		n_bodies = 1;
	} else {
		r = parse_body(rq, &bodies, &n_bodies, &err);
		if (r < 0)
			return queue_error(conn, RPC_INVALID_ARGUMENT, "%s",
					   err ?: "out of memory");
	}

	if (n_bodies > 1 && !mi.client_streaming) {
		ret = queue_error(conn, RPC_INVALID_ARGUMENT,
				  "%s takes one request message, not %zu", name, n_bodies);
		goto out;
	}
	r = rpc_local_call_start(h->opts.rpc, path, -1, &call);
	if (r < 0) {
		ret = queue_error(conn, RPC_UNAVAILABLE, "cannot start the call: %s", strerror(-r));
		goto out;
	}
	for (size_t i = 0; i < n_bodies; i++) {
		ProtobufCMessage *req = NULL;
		free(err);
		err = NULL;
		r = pbjson_from_json(mi.input, bodies[i], &req, &err);
		if (r < 0) {
			ret = n_bodies > 1 ? queue_error(conn, RPC_INVALID_ARGUMENT,
							 "request message %zu: %s", i + 1,
							 err ?: strerror(-r))
					   : queue_error(conn, RPC_INVALID_ARGUMENT, "%s",
							 err ?: strerror(-r));
			goto out;
		}
		r = rpc_local_call_send(call, req);
		protobuf_c_message_free_unpacked(req, NULL);
		if (r < 0)
			break; /* the call ended: its status says why */
	}
	(void)rpc_local_call_close_send(call);

	r = first_response(conn, call, mi.server_streaming, &resp);
	if (r == -ECONNRESET) {
		ret = MHD_NO;
		goto out;
	}
	if (r == -ETIMEDOUT)
		goto stream; /* no message yet: the headers go now, messages as they come */
	if (r <= 0) {
		const char *message;
		RpcCode code = rpc_local_call_status(call, &message);
		if (r < 0 && code == RPC_OK)
			code = RPC_INTERNAL;
		if (code == RPC_OK && !mi.server_streaming)
			ret = queue_error(conn, RPC_INTERNAL, "the call ended without a response");
		else if (code == RPC_OK)
			goto stream; /* a stream that ended at once, empty */
		else
			ret = queue_error(conn, code, "%s", message);
		goto out;
	}

	if (!mi.server_streaming) {
		json_object *o = NULL;
		r = pbjson_to_json(resp, &o);
		if (r < 0) {
			ret = queue_error(conn, RPC_INTERNAL, "cannot encode the response: %s",
					  strerror(-r));
			goto out;
		}
		/* The status follows the single response; a failure after it cannot be. */
		ret = queue_json(conn, 200, o);
		goto out;
	}

stream : {
	Stream *st = calloc(1, sizeof(*st));
	if (!st) {
		ret = MHD_NO;
		goto out;
	}
	st->h = h;
	st->conn = conn;
	st->call = TAKE_PTR(call);
	st->format = stream_format(conn, &mi);
	if (resp)
		r = out_message(st, TAKE_PTR(resp));
	else if (r == -ETIMEDOUT)
		/* Something to send with the headers, so that they leave now: a comment, or
		 * the blank line NDJSON readers skip. */
		r = st->format == FORMAT_SSE ? out_append(st, ": ok\n\n", 6)
					     : out_append(st, "\n", 1);
	else {
		out_status(st);
		r = 0;
	}
	struct MHD_Response *mr =
		r < 0 ? NULL
		      : MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 64 << 10, stream_read,
							  st, stream_free);
	if (!mr) {
		stream_free(st);
		ret = MHD_NO;
		goto out;
	}
	MHD_add_response_header(mr, MHD_HTTP_HEADER_CONTENT_TYPE,
				st->format == FORMAT_SSE ? "text/event-stream"
							 : "application/x-ndjson");
	MHD_add_response_header(mr, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	MHD_add_response_header(mr, "X-Content-Type-Options", "nosniff");
	ret = MHD_queue_response(conn, 200, mr);
	MHD_destroy_response(mr);
}
out:
	if (resp)
		protobuf_c_message_free_unpacked(resp, NULL);
	rpc_local_call_free(call);
	for (size_t i = 0; i < n_bodies; i++)
		json_object_put(bodies[i]);
	free(bodies);
	return ret;
}

/* ------------------------------------------------------------------------------------------ */
/* routing */

static enum MHD_Result page(HttpServer *h, struct MHD_Connection *conn)
{
	const char *token = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "token");
	struct MHD_Response *resp;
	enum MHD_Result r;

	if (token) {
		/* The token moves from the address into a cookie the page's requests carry; the
		 * redirect takes it out of the address bar and the history. */
		_cleanup_free_ char *cookie = NULL;
		if (!token_equal(h, token)) {
			atomic_fetch_add(&h->requests_unauthorized, 1);
			return queue_text(conn, 401, "wrong token\n");
		}
		if (asprintf(&cookie, TOKEN_COOKIE "=%s; Path=/; HttpOnly; SameSite=Strict",
			     h->token) < 0)
			return MHD_NO;
		resp = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
		if (!resp)
			return MHD_NO;
		MHD_add_response_header(resp, MHD_HTTP_HEADER_SET_COOKIE, cookie);
		MHD_add_response_header(resp, MHD_HTTP_HEADER_LOCATION, "/test");
		MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
		MHD_add_response_header(resp, "Referrer-Policy", "no-referrer");
		r = MHD_queue_response(conn, 303, resp);
		MHD_destroy_response(resp);
		return r;
	}
	resp = MHD_create_response_from_buffer(ember_test_page_size, (void *)ember_test_page,
					       MHD_RESPMEM_PERSISTENT);
	if (!resp)
		return MHD_NO;
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/html; charset=utf-8");
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
	MHD_add_response_header(resp, "X-Frame-Options", "DENY");
	MHD_add_response_header(resp, "Referrer-Policy", "no-referrer");
	/* Everything the page needs is inside it; it talks to this listener only. */
	MHD_add_response_header(resp, "Content-Security-Policy",
				"default-src 'none'; script-src 'unsafe-inline'; "
				"style-src 'unsafe-inline'; img-src data:; connect-src 'self'; "
				"base-uri 'none'; form-action 'none'; frame-ancestors 'none'");
	r = MHD_queue_response(conn, 200, resp);
	MHD_destroy_response(resp);
	return r;
}

static enum MHD_Result metrics(HttpServer *h, struct MHD_Connection *conn)
{
	_cleanup_free_ char *buf = NULL;
	size_t size = 0;
	FILE *f = open_memstream(&buf, &size);

	if (!f)
		return MHD_NO;
	if (h->opts.metrics)
		h->opts.metrics(f, h->opts.metrics_userdata);
	fprintf(f,
		"# HELP ember_http_requests_total HTTP requests by outcome.\n"
		"# TYPE ember_http_requests_total counter\n"
		"ember_http_requests_total{outcome=\"authorized\"} %llu\n"
		"ember_http_requests_total{outcome=\"unauthorized\"} %llu\n"
		"ember_http_requests_total{outcome=\"forbidden\"} %llu\n",
		(unsigned long long)atomic_load(&h->requests_ok),
		(unsigned long long)atomic_load(&h->requests_unauthorized),
		(unsigned long long)atomic_load(&h->requests_forbidden));
	if (fclose(f) != 0)
		return MHD_NO;
	return queue(conn, 200, "text/plain; version=0.0.4; charset=utf-8", buf, size);
}

static enum MHD_Result route(HttpServer *h, struct MHD_Connection *conn, const char *url,
			     const char *method, Request *rq)
{
	bool get = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
	bool post = strcmp(method, "POST") == 0;
	Auth auth;

	if (get && strcmp(url, "/test") == 0 &&
	    MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "token"))
		return page(h, conn);
	if (get && strcmp(url, "/metrics") == 0 && h->opts.metrics_public && peer_is_loopback(conn))
		return metrics(h, conn);

	auth = authenticate(h, conn);
	if (auth == AUTH_NONE) {
		atomic_fetch_add(&h->requests_unauthorized, 1);
		return queue_text(conn, 401,
				  "401: this needs emberd's HTTP token: open the URL emberd "
				  "logged at start (…/test?token=…), or send \"Authorization: "
				  "Bearer <token>\" (the token is in <run_dir>/http-token)\n");
	}
	if (auth == AUTH_COOKIE && !get) {
		const char *why = cookie_post_refusal(conn);
		if (why) {
			atomic_fetch_add(&h->requests_forbidden, 1);
			return queue_text(conn, 403, why);
		}
	}
	atomic_fetch_add(&h->requests_ok, 1);

	if (rq->too_big)
		return queue_error(conn, RPC_RESOURCE_EXHAUSTED, "request body over %u bytes",
				   BODY_MAX);
	if (strcmp(url, "/test") == 0 || strcmp(url, "/") == 0) {
		if (!get)
			return queue_text(conn, 405, "method not allowed\n");
		if (strcmp(url, "/") == 0) {
			struct MHD_Response *resp = MHD_create_response_from_buffer(
				0, (void *)"", MHD_RESPMEM_PERSISTENT);
			if (!resp)
				return MHD_NO;
			MHD_add_response_header(resp, MHD_HTTP_HEADER_LOCATION, "/test");
			enum MHD_Result r = MHD_queue_response(conn, 303, resp);
			MHD_destroy_response(resp);
			return r;
		}
		return page(h, conn);
	}
	if (strcmp(url, "/metrics") == 0)
		return get ? metrics(h, conn) : queue_text(conn, 405, "method not allowed\n");
	if (strncmp(url, "/v1/", 4) == 0 && url[4] && !strchr(url + 4, '/')) {
		if (!get && !post)
			return queue_text(conn, 405, "method not allowed\n");
		return api_call(h, conn, strcmp(method, "HEAD") == 0 ? "GET" : method, url + 4, rq);
	}
	return queue_text(conn, 404, "not found\n");
}

static enum MHD_Result access_handler(void *cls, struct MHD_Connection *conn, const char *url,
				      const char *method, const char *version,
				      const char *upload_data, size_t *upload_data_size,
				      void **con_cls)
{
	HttpServer *h = cls;
	Request *rq = *con_cls;

	(void)version;
	if (!rq) {
		rq = calloc(1, sizeof(*rq));
		if (!rq)
			return MHD_NO;
		rq->h = h;
		*con_cls = rq;
		return MHD_YES;
	}
	if (*upload_data_size > 0) {
		if (!rq->too_big && rq->size + *upload_data_size > BODY_MAX) {
			rq->too_big = true;
			free(rq->body);
			rq->body = NULL;
			rq->size = rq->cap = 0;
		}
		if (!rq->too_big) {
			if (rq->size + *upload_data_size > rq->cap) {
				size_t cap = (rq->size + *upload_data_size) * 2;
				char *nb = realloc(rq->body, cap);
				if (!nb)
					return MHD_NO;
				rq->body = nb;
				rq->cap = cap;
			}
			memcpy(rq->body + rq->size, upload_data, *upload_data_size);
			rq->size += *upload_data_size;
		}
		*upload_data_size = 0;
		return MHD_YES;
	}
	return route(h, conn, url, method, rq);
}

static void request_done(void *cls, struct MHD_Connection *conn, void **con_cls,
			 enum MHD_RequestTerminationCode toe)
{
	Request *rq = *con_cls;

	(void)cls;
	(void)conn;
	(void)toe;
	if (rq) {
		free(rq->body);
		free(rq);
		*con_cls = NULL;
	}
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
	_cleanup_free_ char *msg = NULL;

	(void)cls;
	if (vasprintf(&msg, fmt, ap) >= 0)
		log_debug("http: %s", msg);
}

/* ------------------------------------------------------------------------------------------ */
/* setup */

static int parse_listen(const char *listen, struct sockaddr_storage *ret, char **ret_error)
{
	_cleanup_free_ char *host = NULL;
	const char *colon = strrchr(listen, ':');
	struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
	struct addrinfo *ai = NULL;

	if (!colon || colon == listen || !colon[1]) {
		if (asprintf(ret_error, "[http] listen = %s: expected HOST:PORT", listen) < 0)
			*ret_error = NULL;
		return -EINVAL;
	}
	if (listen[0] == '[' && colon[-1] == ']')
		host = strndup(listen + 1, (size_t)(colon - listen - 2));
	else
		host = strndup(listen, (size_t)(colon - listen));
	if (!host)
		return -ENOMEM;
	int e = getaddrinfo(host, colon + 1, &hints, &ai);
	if (e != 0 || !ai) {
		if (asprintf(ret_error, "[http] listen = %s: %s", listen, gai_strerror(e)) < 0)
			*ret_error = NULL;
		return -EINVAL;
	}
	memcpy(ret, ai->ai_addr, ai->ai_addrlen);
	freeaddrinfo(ai);
	return 0;
}

static bool addr_is_loopback(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET)
		return (ntohl(((const struct sockaddr_in *)ss)->sin_addr.s_addr) >> 24) == 127;
	if (ss->ss_family == AF_INET6)
		return IN6_IS_ADDR_LOOPBACK(&((const struct sockaddr_in6 *)ss)->sin6_addr);
	return false;
}

static int load_token(HttpServer *h, char **ret_error)
{
	_cleanup_free_ char *path = NULL;
	int r;

	if (h->opts.token_file && h->opts.token_file[0]) {
		size_t n;
		r = read_full_file(h->opts.token_file, 4096, &h->token, &n);
		if (r < 0) {
			if (asprintf(ret_error, "[http] token_file = %s: %s", h->opts.token_file,
				     strerror(-r)) < 0)
				*ret_error = NULL;
			return r;
		}
		while (n > 0 && strchr(" \t\r\n", h->token[n - 1]))
			h->token[--n] = 0;
		for (size_t i = 0; i < n; i++)
			if ((unsigned char)h->token[i] <= ' ' || h->token[i] == ';' ||
			    h->token[i] == ',' || (unsigned char)h->token[i] >= 0x7f)
				n = 0;
		if (n < TOKEN_MIN_LEN) {
			if (asprintf(ret_error,
				     "[http] token_file = %s: the token must be at least %d "
				     "printable characters without spaces, ';' or ','",
				     h->opts.token_file, TOKEN_MIN_LEN) < 0)
				*ret_error = NULL;
			return -EINVAL;
		}
	} else {
		uint8_t raw[24];
		if (getrandom(raw, sizeof(raw), 0) != (ssize_t)sizeof(raw))
			return negative_errno();
		h->token = malloc(sizeof(raw) * 2 + 1);
		if (!h->token)
			return -ENOMEM;
		for (size_t i = 0; i < sizeof(raw); i++)
			sprintf(h->token + 2 * i, "%02x", raw[i]);
	}
	if (asprintf(&path, "%s/http-token", h->opts.run_dir) < 0)
		return -ENOMEM;
	r = write_file_atomic(path, h->token, strlen(h->token), 0600);
	if (r < 0) {
		if (asprintf(ret_error, "cannot write %s: %s", path, strerror(-r)) < 0)
			*ret_error = NULL;
		return r;
	}
	return 0;
}

int http_server_start(const HttpOptions *opts, HttpServer **ret, char **ret_error)
{
	_cleanup_(http_server_freep) HttpServer *h = NULL;
	struct sockaddr_storage ss = {};
	unsigned flags =
		MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG;
	int r;

	*ret_error = NULL;
	h = calloc(1, sizeof(*h));
	if (!h)
		return -ENOMEM;
	h->opts = *opts;
	h->listen = strdup(opts->listen);
	h->service = strdup(opts->service);
	h->run_dir = strdup(opts->run_dir);
	if (!h->listen || !h->service || !h->run_dir)
		return -ENOMEM;
	h->opts.listen = h->listen;
	h->opts.service = h->service;
	h->opts.run_dir = h->run_dir;
	h->opts.token_file = NULL; /* not kept */

	r = parse_listen(opts->listen, &ss, ret_error);
	if (r < 0)
		return r;
	if (!addr_is_loopback(&ss) && !opts->allow_remote) {
		if (asprintf(ret_error,
			     "[http] listen = %s is not a loopback address: the listener "
			     "controls the node, so this needs [http] allow_remote = true (and "
			     "a network you trust: it is plain HTTP)",
			     opts->listen) < 0)
			*ret_error = NULL;
		return -EPERM;
	}
	h->opts.token_file = opts->token_file;
	r = load_token(h, ret_error);
	h->opts.token_file = NULL;
	if (r < 0)
		return r;

	if (ss.ss_family == AF_INET6)
		flags |= MHD_USE_IPv6;
	h->daemon = MHD_start_daemon(flags, 0, NULL, NULL, access_handler, h, MHD_OPTION_SOCK_ADDR,
				     (struct sockaddr *)&ss, MHD_OPTION_CONNECTION_LIMIT,
				     (unsigned)CONNECTION_LIMIT, MHD_OPTION_CONNECTION_TIMEOUT,
				     (unsigned)CONNECTION_TIMEOUT, MHD_OPTION_NOTIFY_COMPLETED,
				     request_done, h, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, h,
				     MHD_OPTION_END);
	if (!h->daemon) {
		if (asprintf(ret_error,
			     "[http] listen = %s: cannot listen (address in use, or not an "
			     "address of this host)",
			     opts->listen) < 0)
			*ret_error = NULL;
		return -EADDRNOTAVAIL;
	}
	const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->daemon, MHD_DAEMON_INFO_BIND_PORT);
	h->port = di ? di->port : 0;
	*ret = TAKE_PTR(h);
	return 0;
}

int http_server_port(const HttpServer *h)
{
	return h->port;
}

const char *http_server_token(const HttpServer *h)
{
	return h->token;
}

void http_server_free(HttpServer *h)
{
	if (!h)
		return;
	if (h->daemon)
		MHD_stop_daemon(h->daemon);
	if (h->token)
		OPENSSL_cleanse(h->token, strlen(h->token));
	free(h->token);
	free(h->listen);
	free(h->service);
	free(h->run_dir);
	free(h);
}
