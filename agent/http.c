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

#include "common/error.h"
#include "common/fileio.h"
#include "common/log.h"
#include "common/macro.h"
#include "http.h"
#include "pbjson.h"

#define CONNECTION_LIMIT   64
#define CONNECTION_TIMEOUT 120 /* s without traffic; streams send keepalives more often */
#define BODY_MAX           (16u << 20)
#define KEEPALIVE_MS       15000
#define TOKEN_MIN_LEN      16

extern const char ember_test_page[];
extern const unsigned long ember_test_page_size;

struct HttpServer {
	HttpOptions opts;
	char *listen;
	char *service;
	char *run_dir;
	char *token;
	/* The page's cookie holds a secret of its own, made at each start, not the token: a
	 * browser sends cookies to every port of the host, so a cookie is the easier secret to
	 * lose, and losing it must not give away the token. Its name carries the port, so that
	 * two listeners on one host do not overwrite each other's. */
	char *session;
	char cookie_name[32];
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

static enum MHD_Result queue_unauthorized(struct MHD_Connection *conn, const char *text)
{
	struct MHD_Response *resp =
		MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_MUST_COPY);
	if (!resp)
		return MHD_NO;
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; charset=utf-8");
	MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer realm=\"emberd\"");
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	enum MHD_Result r = MHD_queue_response(conn, 401, resp);
	MHD_destroy_response(resp);
	return r;
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

static bool secret_equal(const char *secret, const char *given)
{
	size_t n = strlen(secret);
	return given && strlen(given) == n && CRYPTO_memcmp(given, secret, n) == 0;
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
		return secret_equal(h->token, a + 7) ? AUTH_BEARER : AUTH_NONE;
	if (secret_equal(h->session,
			 MHD_lookup_connection_value(conn, MHD_COOKIE_KIND, h->cookie_name)))
		return AUTH_COOKIE;
	return AUTH_NONE;
}

/* A request the browser sent with the cookie on its own is one the page may not have made.
 * Any such request must come from the page's origin (Sec-Fetch-Site, which browsers send
 * and pages cannot forge; "none" is an address typed or opened from a terminal); one that
 * could change state (not GET) also needs the page's own Origin and a JSON body, which no
 * cross-site form can produce — and browsers without Sec-Fetch-Site still send Origin on
 * POST. Returns NULL when it may go on, else why not. */
static const char *cookie_refusal(struct MHD_Connection *conn, bool get)
{
	const char *origin = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Origin");
	const char *host = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Host");
	const char *type = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Type");
	const char *site = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Sec-Fetch-Site");

	if (site && strcmp(site, "same-origin") != 0 && strcmp(site, "none") != 0)
		return "cross-site request refused\n";
	if (get)
		return NULL;
	if (!origin || !host || strncmp(origin, "http://", 7) != 0 || strcmp(origin + 7, host) != 0)
		return "cross-origin request refused: a POST with the cookie must come from the "
		       "page itself (or send Authorization: Bearer)\n";
	if (!type || strncasecmp(type, "application/json", 16) != 0)
		return "a POST with the cookie must be application/json\n";
	return NULL;
}

/* A Host that names this machine by address or as localhost: what /metrics without a token
 * needs, so that a web page whose name was rebound to 127.0.0.1 cannot read it. */
static bool host_is_local_literal(struct MHD_Connection *conn)
{
	const char *host = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Host");
	char name[64];
	struct in6_addr a6;
	struct in_addr a4;

	size_t n = host ? strlen(host) : sizeof(name);
	if (n >= sizeof(name))
		return false;
	memcpy(name, host, n + 1);
	if (name[0] == '[') { /* [v6]:port */
		char *end = strchr(name, ']');
		if (!end)
			return false;
		*end = 0;
		return inet_pton(AF_INET6, name + 1, &a6) == 1;
	}
	char *colon = strchr(name, ':');
	if (colon)
		*colon = 0;
	return strcmp(name, "localhost") == 0 || inet_pton(AF_INET, name, &a4) == 1;
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
	const ProtobufCFieldDescriptor *f = pbjson_field_by_key(q->desc, key);
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
			if ((r = out_message(st, msg)) < 0) {
				/* Said in the stream's own status, so that a client does not
				 * reconnect into the same message for ever. */
				rpc_local_call_cancel(st->call);
				(void)out_entry(st, "status",
						status_json(RPC_INTERNAL,
							    r == -ENOMEM ? "out of memory"
									 : "a response cannot be "
									   "written as JSON"));
				st->done = true;
			}
		} else if (r == 0) {
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
	/* Exec's answers, a process's output, read best line by line. */
	return mi->client_streaming ? FORMAT_NDJSON : FORMAT_SSE;
}

static bool conn_gone(void *userdata)
{
	return peer_gone(userdata);
}

/* Waits for the call's next response or its end, giving up when the peer goes away
 * (-ECONNRESET) or, with stream_head, after STREAM_HEAD_MS (-ETIMEDOUT): a stream's headers
 * cannot wait for its first message (a watch from the latest revision may be quiet for
 * hours), but the wait lets errors that come at once (NOT_FOUND, INVALID_ARGUMENT) still be
 * HTTP statuses. */
#define STREAM_HEAD_MS 1000
static int next_response(struct MHD_Connection *conn, RpcLocalCall *call, bool stream_head,
			 ProtobufCMessage **ret)
{
	for (int64_t waited = 0;; waited += 1000) {
		if (stream_head && waited >= STREAM_HEAD_MS)
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

typedef struct Bodies {
	json_object **v;
	size_t n;
} Bodies;

static void bodies_done(Bodies *b)
{
	for (size_t i = 0; i < b->n; i++)
		json_object_put(b->v[i]);
	free(b->v);
}

/* The request messages as JSON: the body's, or for GET the query's. false when the request
 * was answered instead (*answered: how queueing that went). */
static bool request_bodies(HttpServer *h, struct MHD_Connection *conn, bool get, const char *name,
			   const RpcMethodInfo *mi, Request *rq, Bodies *ret,
			   enum MHD_Result *answered)
{
	_cleanup_free_ char *err = NULL;

	if (get) {
		/* GET changes nothing: only the methods named as reading, with the query as
		 * the request. */
		bool reads = false;
		for (const char *const *m = h->opts.get_methods; m && *m && !reads; m++)
			reads = strcmp(*m, name) == 0;
		if (!reads) {
			*answered = queue_text(conn, 405, "use POST for this method\n");
			return false;
		}
		QueryBuild q = {.desc = mi->input, .json = json_object_new_object()};
		MHD_get_connection_values(conn, MHD_GET_ARGUMENT_KIND, query_arg, &q);
		if (q.error) {
			json_object_put(q.json);
			*answered = queue_error(conn, RPC_INVALID_ARGUMENT, "%s", q.error);
			free(q.error);
			return false;
		}
		ret->v = calloc(1, sizeof(json_object *));
		if (!ret->v) {
			json_object_put(q.json);
			*answered = MHD_NO;
			return false;
		}
		ret->v[0] = q.json;
		ret->n = 1;
		return true;
	}
	int r = parse_body(rq, &ret->v, &ret->n, &err);
	if (r < 0) {
		*answered = queue_error(
			conn, r == -ENOMEM ? RPC_RESOURCE_EXHAUSTED : RPC_INVALID_ARGUMENT, "%s",
			err ?: strerror(-r));
		return false;
	}
	if (ret->n > 1 && !mi->client_streaming) {
		*answered = queue_error(conn, RPC_INVALID_ARGUMENT,
					"%s takes one request message, not %zu", name, ret->n);
		return false;
	}
	return true;
}

typedef struct Requests {
	ProtobufCMessage **v;
	size_t n;
} Requests;

static void requests_done(Requests *q)
{
	for (size_t i = 0; i < q->n; i++)
		protobuf_c_message_free_unpacked(q->v[i], NULL);
	free(q->v);
}

/* All the request messages, converted before any is sent: a bad one later in a stream must
 * not leave a call half made (an Exec started, its stdin cut). false when one does not
 * convert and the request was answered instead. */
static bool convert_requests(struct MHD_Connection *conn, const RpcMethodInfo *mi, const Bodies *b,
			     Requests *ret, enum MHD_Result *answered)
{
	ret->v = calloc(b->n, sizeof(ProtobufCMessage *));
	if (!ret->v) {
		*answered = MHD_NO;
		return false;
	}
	for (size_t i = 0; i < b->n; i++) {
		_cleanup_free_ char *err = NULL;
		int r = pbjson_from_json(mi->input, b->v[i], &ret->v[i], &err);
		if (r < 0) {
			*answered = b->n > 1 ? queue_error(conn, RPC_INVALID_ARGUMENT,
							   "request message %zu: %s", i + 1,
							   err ?: strerror(-r))
					     : queue_error(conn, RPC_INVALID_ARGUMENT, "%s",
							   err ?: strerror(-r));
			return false;
		}
		ret->n++;
	}
	return true;
}

/* The answer of a stream: `first` its first message, NULL when none came yet (`ended`:
 * none will). Takes both. */
static enum MHD_Result queue_stream(HttpServer *h, struct MHD_Connection *conn,
				    const RpcMethodInfo *mi, RpcLocalCall *call,
				    ProtobufCMessage *first, bool ended)
{
	Stream *st = calloc(1, sizeof(*st));
	int r;

	if (!st) {
		rpc_local_call_free(call);
		if (first)
			protobuf_c_message_free_unpacked(first, NULL);
		return MHD_NO;
	}
	st->h = h;
	st->conn = conn;
	st->call = call;
	st->format = stream_format(conn, mi);
	if (first)
		r = out_message(st, first);
	else if (!ended)
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
		return MHD_NO;
	}
	MHD_add_response_header(mr, MHD_HTTP_HEADER_CONTENT_TYPE,
				st->format == FORMAT_SSE ? "text/event-stream"
							 : "application/x-ndjson");
	MHD_add_response_header(mr, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	MHD_add_response_header(mr, "X-Content-Type-Options", "nosniff");
	enum MHD_Result ret = MHD_queue_response(conn, 200, mr);
	MHD_destroy_response(mr);
	return ret;
}

static enum MHD_Result queue_status(struct MHD_Connection *conn, RpcLocalCall *call)
{
	const char *message;
	RpcCode code = rpc_local_call_status(call, &message);
	if (code == RPC_OK)
		return queue_error(conn, RPC_INTERNAL, "the call ended without a response");
	return queue_error(conn, code, "%s", message);
}

static enum MHD_Result api_call(HttpServer *h, struct MHD_Connection *conn, bool get,
				const char *name, Request *rq)
{
	_cleanup_free_ char *path = NULL;
	_cleanup_(bodies_done) Bodies bodies = {};
	_cleanup_(requests_done) Requests requests = {};
	_cleanup_(rpc_local_call_freep) RpcLocalCall *call = NULL;
	_cleanup_(pbjson_message_freep) ProtobufCMessage *resp = NULL;
	enum MHD_Result answered;
	RpcMethodInfo mi;
	int r;

	if (asprintf(&path, "/%s/%s", h->service, name) < 0)
		return MHD_NO;
	if (rpc_server_find_method(h->opts.rpc, path, &mi) < 0)
		return queue_error(conn, RPC_UNIMPLEMENTED, "unknown method %s", name);
	if (!request_bodies(h, conn, get, name, &mi, rq, &bodies, &answered))
		return answered;

	if (!convert_requests(conn, &mi, &bodies, &requests, &answered))
		return answered;
	r = rpc_local_call_start(h->opts.rpc, path, -1, &call);
	if (r < 0)
		return queue_error(conn, RPC_UNAVAILABLE, "cannot start the call: %s",
				   strerror(-r));
	rpc_local_call_set_abort(call, conn_gone, conn);
	/* Until the call ends early: then its status says why. */
	for (size_t i = 0; i < requests.n; i++)
		if (rpc_local_call_send(call, requests.v[i]) < 0)
			break;
	(void)rpc_local_call_close_send(call);

	r = next_response(conn, call, mi.server_streaming, &resp);
	if (r == -ECONNRESET)
		return MHD_NO;
	if (mi.server_streaming) {
		if (r == 0 && rpc_local_call_status(call, NULL) != RPC_OK)
			return queue_status(conn, call);
		return queue_stream(h, conn, &mi, TAKE_PTR(call), TAKE_PTR(resp), r == 0);
	}
	if (r == 0)
		return queue_status(conn, call);

	/* A unary answer is its message and the status after it: a handler may still fail
	 * after replying (gRPC clients would see the failure, so must we). */
	_cleanup_(pbjson_message_freep) ProtobufCMessage *extra = NULL;
	while ((r = next_response(conn, call, false, &extra)) == 1) {
		protobuf_c_message_free_unpacked(extra, NULL);
		extra = NULL;
	}
	if (r < 0)
		return MHD_NO;
	if (rpc_local_call_status(call, NULL) != RPC_OK)
		return queue_status(conn, call);
	json_object *o = NULL;
	r = pbjson_to_json(resp, &o);
	if (r < 0)
		return queue_error(conn, r == -ENOMEM ? RPC_RESOURCE_EXHAUSTED : RPC_INTERNAL,
				   "the response cannot be written as JSON: %s", strerror(-r));
	return queue_json(conn, 200, o);
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
		if (!secret_equal(h->token, token)) {
			atomic_fetch_add(&h->requests_unauthorized, 1);
			return queue_unauthorized(conn, "401: wrong token\n");
		}
		if (asprintf(&cookie, "%s=%s; Path=/; HttpOnly; SameSite=Strict", h->cookie_name,
			     h->session) < 0)
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

static bool is_get(const char *method)
{
	return strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
}

/* Decides on a request from its headers alone, before any of its body is read (a body can be
 * 16 MiB, and only authorized clients may make emberd hold one): false to go on and read
 * it, true when it was answered already (*ret: how queueing that went). */
static bool refuse_early(HttpServer *h, struct MHD_Connection *conn, const char *url,
			 const char *method, enum MHD_Result *ret)
{
	bool get = is_get(method);
	const char *why, *length;

	if (get && strcmp(url, "/test") == 0 &&
	    MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "token")) {
		*ret = page(h, conn);
		return true;
	}
	if (get && strcmp(url, "/metrics") == 0 && h->opts.metrics_public &&
	    peer_is_loopback(conn) && host_is_local_literal(conn)) {
		*ret = metrics(h, conn);
		return true;
	}
	Auth auth = authenticate(h, conn);
	if (auth == AUTH_NONE) {
		atomic_fetch_add(&h->requests_unauthorized, 1);
		*ret = queue_unauthorized(
			conn, "401: this needs emberd's HTTP token: open the URL emberd logged at "
			      "start (…/test?token=…), or send \"Authorization: Bearer <token>\" "
			      "(the token is in <run_dir>/http-token)\n");
		return true;
	}
	if (auth == AUTH_COOKIE && (why = cookie_refusal(conn, get))) {
		atomic_fetch_add(&h->requests_forbidden, 1);
		*ret = queue_text(conn, 403, why);
		return true;
	}
	length = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
	if (length && strtoull(length, NULL, 10) > BODY_MAX) {
		*ret = queue_text(conn, 413, "request body too large\n");
		return true;
	}
	atomic_fetch_add(&h->requests_ok, 1);
	return false;
}

static enum MHD_Result route(HttpServer *h, struct MHD_Connection *conn, const char *url,
			     const char *method, Request *rq)
{
	bool get = is_get(method);

	if (rq->too_big)
		return queue_text(conn, 413, "request body too large\n");
	if (strcmp(url, "/test") == 0)
		return get ? page(h, conn) : queue_text(conn, 405, "method not allowed\n");
	if (strcmp(url, "/") == 0) {
		struct MHD_Response *resp =
			MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
		if (!resp)
			return MHD_NO;
		MHD_add_response_header(resp, MHD_HTTP_HEADER_LOCATION, "/test");
		enum MHD_Result r = MHD_queue_response(conn, 303, resp);
		MHD_destroy_response(resp);
		return r;
	}
	if (strcmp(url, "/metrics") == 0)
		return get ? metrics(h, conn) : queue_text(conn, 405, "method not allowed\n");
	if (strncmp(url, "/v1/", 4) == 0 && url[4] && !strchr(url + 4, '/')) {
		if (!get && strcmp(method, "POST") != 0)
			return queue_text(conn, 405, "method not allowed\n");
		return api_call(h, conn, get, url + 4, rq);
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
	enum MHD_Result ret;

	(void)version;
	if (!rq) {
		if (refuse_early(h, conn, url, method, &ret))
			return ret;
		rq = calloc(1, sizeof(*rq));
		if (!rq)
			return MHD_NO;
		*con_cls = rq;
		return MHD_YES;
	}
	if (*upload_data_size > 0) {
		size_t n = *upload_data_size;
		*upload_data_size = 0;
		if (rq->too_big)
			return MHD_YES;
		if (rq->size + n > BODY_MAX) {
			/* Without a Content-Length (chunked): found out as it comes. */
			rq->too_big = true;
			free(TAKE_PTR(rq->body));
			rq->size = rq->cap = 0;
			return MHD_YES;
		}
		if (rq->size + n > rq->cap) {
			size_t cap = (rq->size + n) * 2;
			if (cap > BODY_MAX)
				cap = BODY_MAX;
			char *nb = realloc(rq->body, cap);
			if (!nb)
				return MHD_NO;
			rq->body = nb;
			rq->cap = cap;
		}
		memcpy(rq->body + rq->size, upload_data, n);
		rq->size += n;
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

/* HOST:PORT with a numeric host (or localhost, [v6]) into an address. */
static int parse_listen(const char *listen, struct sockaddr_storage *ret, socklen_t *ret_len,
			char **ret_error)
{
	_cleanup_free_ char *host = NULL;
	const char *colon = strrchr(listen, ':');
	struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_NUMERICSERV | AI_NUMERICHOST};
	struct addrinfo *ai = NULL;

	if (!colon || colon == listen || !colon[1])
		return error_set(ret_error, -EINVAL, "[http] listen = %s: expected HOST:PORT",
				 listen);
	if (listen[0] == '[' && colon[-1] == ']')
		host = strndup(listen + 1, (size_t)(colon - listen - 2));
	else
		host = strndup(listen, (size_t)(colon - listen));
	if (!host)
		return -ENOMEM;
	if (strcmp(host, "localhost") == 0) {
		free(host);
		host = strdup("127.0.0.1");
		if (!host)
			return -ENOMEM;
	}
	int e = getaddrinfo(host, colon + 1, &hints, &ai);
	if (e != 0 || !ai)
		return error_set(ret_error, -EINVAL, "[http] listen = %s: %s", listen,
				 gai_strerror(e));
	memcpy(ret, ai->ai_addr, ai->ai_addrlen);
	*ret_len = ai->ai_addrlen;
	freeaddrinfo(ai);
	return 0;
}

/* The listening socket is ours, not libmicrohttpd's: its error says why it cannot bind, and
 * the port (with port 0) is known before the first request, for the cookie's name. */
static int listen_socket(const char *addr, int *ret_port, char **ret_error)
{
	struct sockaddr_storage ss = {};
	socklen_t len = 0;
	int one = 1, r;

	r = parse_listen(addr, &ss, &len, ret_error);
	if (r < 0)
		return r;
	_cleanup_close_ int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return error_set(ret_error, -errno, "socket: %m");
	(void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&ss, len) < 0)
		return error_set(ret_error, -errno, "[http] listen = %s: cannot bind: %m", addr);
	union {
		struct sockaddr sa;
		struct sockaddr_in in;
		struct sockaddr_in6 in6;
		struct sockaddr_storage ss;
	} bound = {};
	socklen_t blen = sizeof(bound);
	if (listen(fd, 64) < 0 || getsockname(fd, &bound.sa, &blen) < 0)
		return error_set(ret_error, -errno, "[http] listen = %s: %m", addr);
	*ret_port = ntohs(bound.sa.sa_family == AF_INET ? bound.in.sin_port : bound.in6.sin6_port);
	return TAKE_FD(fd);
}

static int random_hex(size_t bytes, char **ret)
{
	uint8_t raw[32];
	char *s;

	if (bytes > sizeof(raw))
		return -EINVAL;
	if (getrandom(raw, bytes, 0) != (ssize_t)bytes)
		return negative_errno();
	s = malloc(bytes * 2 + 1);
	if (!s)
		return -ENOMEM;
	for (size_t i = 0; i < bytes; i++)
		sprintf(s + 2 * i, "%02x", raw[i]);
	*ret = s;
	return 0;
}

/* A token the operator chose: its characters must be safe in a header and in the URL the
 * log shows. */
static bool token_chars_ok(const char *t)
{
	for (const char *p = t; *p; p++)
		if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._~-",
			    *p))
			return false;
	return true;
}

static int load_token(HttpServer *h, const char *token_file, char **ret_error)
{
	_cleanup_free_ char *path = NULL;
	int r;

	if (token_file && token_file[0]) {
		size_t n;
		r = read_full_file(token_file, 4096, &h->token, &n);
		if (r < 0)
			return error_set(ret_error, r, "[http] token_file = %s: %s", token_file,
					 strerror(-r));
		while (n > 0 && strchr(" \t\r\n", h->token[n - 1]))
			h->token[--n] = 0;
		if (n < TOKEN_MIN_LEN || strlen(h->token) != n || !token_chars_ok(h->token))
			return error_set(ret_error, -EINVAL,
					 "[http] token_file = %s: the token must be at least %d "
					 "characters of A-Z, a-z, 0-9, '.', '_', '~' and '-'",
					 token_file, TOKEN_MIN_LEN);
	} else if ((r = random_hex(24, &h->token)) < 0) {
		return r;
	}
	if (asprintf(&path, "%s/http-token", h->opts.run_dir) < 0)
		return -ENOMEM;
	r = write_file_atomic(path, h->token, strlen(h->token), 0600);
	if (r < 0)
		return error_set(ret_error, r, "cannot write %s: %s", path, strerror(-r));
	return 0;
}

int http_server_start(const HttpOptions *opts, HttpServer **ret, char **ret_error)
{
	_cleanup_(http_server_freep) HttpServer *h = NULL;
	_cleanup_close_ int fd = -EBADF;
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
	h->opts.token_file = NULL; /* read now, not kept */

	fd = listen_socket(opts->listen, &h->port, ret_error);
	if (fd < 0)
		return fd;
	snprintf(h->cookie_name, sizeof(h->cookie_name), "ember_session_%d", h->port);
	if ((r = random_hex(24, &h->session)) < 0 ||
	    (r = load_token(h, opts->token_file, ret_error)) < 0)
		return r;

	h->daemon = MHD_start_daemon(MHD_USE_THREAD_PER_CONNECTION |
					     MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG,
				     0, NULL, NULL, access_handler, h, MHD_OPTION_LISTEN_SOCKET, fd,
				     MHD_OPTION_CONNECTION_LIMIT, (unsigned)CONNECTION_LIMIT,
				     MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)CONNECTION_TIMEOUT,
				     MHD_OPTION_NOTIFY_COMPLETED, request_done, h,
				     MHD_OPTION_EXTERNAL_LOGGER, mhd_log, h, MHD_OPTION_END);
	if (!h->daemon)
		return error_set(ret_error, -EIO, "[http] listen = %s: libmicrohttpd did not start",
				 opts->listen);
	TAKE_FD(fd); /* the daemon's now */
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
	if (h->daemon) {
		MHD_stop_daemon(h->daemon);
		/* A token that opens nothing any more is not left lying around. */
		_cleanup_free_ char *path = NULL;
		if (asprintf(&path, "%s/http-token", h->run_dir) >= 0)
			(void)unlink(path);
	}
	if (h->token)
		OPENSSL_cleanse(h->token, strlen(h->token));
	if (h->session)
		OPENSSL_cleanse(h->session, strlen(h->session));
	free(h->token);
	free(h->session);
	free(h->listen);
	free(h->service);
	free(h->run_dir);
	free(h);
}
