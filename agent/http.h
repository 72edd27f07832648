/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The HTTP listener (libmicrohttpd): the operator's page at GET /test, the Node API as JSON
 * (POST /v1/<Method>, streams as Server-Sent Events or NDJSON) and /metrics. Every request
 * needs the node's token. API calls go into the gRPC server as in-process calls
 * (rpc_local_call_*), so they run the very same handlers as gRPC clients' calls.
 */
#pragma once

#include <stdbool.h>
#include <stdio.h>

#include "common/macro.h"
#include "rpc.h"

typedef struct HttpServer HttpServer;

typedef struct HttpOptions {
	const char *listen;     /* HOST:PORT, numeric or localhost; the caller checked it may */
	const char *token_file; /* empty/NULL: a random token */
	bool metrics_public;    /* /metrics without the token, from loopback peers */
	/* Methods that only read (NULL-terminated): they also answer GET, with the query as
	 * the request. Every other method is POST only: GET never changes anything. */
	const char *const *get_methods;
	const char *run_dir; /* <run_dir>/http-token */
	const char *service; /* "ember.v1.Node": /v1/<Method> is /<service>/<Method> */
	RpcServer *rpc;
	/* Writes the Prometheus text exposition of everything but the HTTP layer's own. */
	void (*metrics)(FILE *f, void *userdata);
	void *metrics_userdata;
} HttpOptions;

/* Starts serving. *ret_error says why not (caller frees). The log gets the URL to open. */
int http_server_start(const HttpOptions *opts, HttpServer **ret, char **ret_error);
/* Stops accepting and waits for the requests in flight (streams end when the gRPC server
 * drains them: stop the HTTP server after rpc_server_shutdown()). */
void http_server_free(HttpServer *h);
DEFINE_POINTER_CLEANUP(HttpServer, http_server_free)

/* The port bound (useful with port 0), and the token. */
int http_server_port(const HttpServer *h);
const char *http_server_token(const HttpServer *h);

/* HTTP status for a gRPC code, as Google's API design guide maps them. */
unsigned http_status_for(RpcCode code);
