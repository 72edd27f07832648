/* SPDX-License-Identifier: Apache-2.0 */
/*
 * rpctestd SOCKET [--grace-ms N] [--high-water BYTES] [--max-calls N] [--max-streams N]
 *                  [--max-msg BYTES]
 *                  [--serve-after-ms N] [--http HOST:PORT --http-dir DIR]
 *
 * The gRPC layer of emberd (agent/rpc*) with the rpctest.Test service: prints "READY" once
 * listening (health still NOT_SERVING for --serve-after-ms, like an agent still starting up),
 * shuts down gracefully on SIGTERM like emberd does. With --http, emberd's HTTP listener
 * (agent/http.c) serves the service too, its token in DIR/http-token, and "HTTP <port>" is
 * printed after READY.
 */
#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "agent/descriptor-set.h"
#include "agent/http.h"
#include "agent/rpc.h"
#include "common/log.h"
#include "rpctest.pb-c.h"

static atomic_ulong cancellations_seen, stream_sent, sleeps_finished, shutdowns_seen;
static atomic_long last_cancel_after_ms;

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static RpcCode reply(RpcCall *call, const char *text)
{
	Rpctest__EchoReply r = RPCTEST__ECHO_REPLY__INIT;
	r.text = (char *)text;
	r.remaining_ms = rpc_call_remaining_ms(call);
	r.method = (char *)rpc_call_method(call);
	return rpc_call_send(call, &r.base) < 0 ? RPC_CANCELLED : RPC_OK;
}

static RpcCode echo(RpcCall *call, const ProtobufCMessage *request, void *userdata)
{
	const Rpctest__EchoRequest *req = (const void *)request;
	(void)userdata;
	return reply(call, req->text);
}

static RpcCode sleep_handler(RpcCall *call, const ProtobufCMessage *request, void *userdata)
{
	const Rpctest__SleepRequest *req = (const void *)request;
	int64_t start = now_ms(), end = start + req->ms;
	(void)userdata;

	for (int64_t left; (left = end - now_ms()) > 0;) {
		int r = rpc_call_wait(call, left);
		if (r == -ECANCELED) {
			atomic_fetch_add(&cancellations_seen, 1);
			atomic_store(&last_cancel_after_ms, now_ms() - start);
			return RPC_CANCELLED;
		}
		if (r == -ESHUTDOWN) {
			/* Keep sleeping: an in-flight call is meant to finish during the grace
			 * period. Plain sleep so that the wait does not spin. */
			atomic_fetch_add(&shutdowns_seen, 1);
			while (now_ms() < end && !rpc_call_is_cancelled(call))
				usleep(10000);
			if (rpc_call_is_cancelled(call)) {
				atomic_fetch_add(&cancellations_seen, 1);
				atomic_store(&last_cancel_after_ms, now_ms() - start);
				return RPC_CANCELLED;
			}
		}
	}
	atomic_fetch_add(&sleeps_finished, 1);
	return reply(call, "slept");
}

static RpcCode stream(RpcCall *call, const ProtobufCMessage *request, void *userdata)
{
	const Rpctest__StreamRequest *req = (const void *)request;
	Rpctest__Chunk chunk = RPCTEST__CHUNK__INIT;
	uint8_t *data = malloc(req->size ?: 1);
	(void)userdata;

	if (!data)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	for (uint32_t i = 0; i < req->count; i++) {
		/* Content depends on seq so the client can check order and integrity. */
		for (uint32_t j = 0; j < req->size; j++)
			data[j] = (uint8_t)(i * 31 + j);
		chunk.seq = i;
		chunk.data = (ProtobufCBinaryData){.len = req->size, .data = data};
		if (rpc_call_send(call, &chunk.base) < 0) {
			atomic_fetch_add(&cancellations_seen, 1);
			free(data);
			return RPC_CANCELLED;
		}
		atomic_fetch_add(&stream_sent, 1);
	}
	free(data);
	return RPC_OK;
}

/* Echoes with the non-blocking call API in a poll loop, as Exec does: one message in hand at
 * most, the next asked for only once it went out (back-pressure both ways). */
static RpcCode bidi(RpcCall *call, const ProtobufCMessage *request, void *userdata)
{
	ProtobufCMessage *held = NULL;
	RpcCode code = RPC_OK;
	int fd = rpc_call_notify_fd(call);

	(void)request;
	(void)userdata;
	if (fd < 0)
		return rpc_call_error(call, RPC_INTERNAL, "no notify fd: %s", strerror(-fd));
	for (;;) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		int r;

		rpc_call_notify_clear(call);
		if (held) {
			r = rpc_call_send_nowait(call, held);
			if (r == 0) {
				protobuf_c_message_free_unpacked(held, NULL);
				held = NULL;
			} else if (r != -EAGAIN) {
				code = RPC_CANCELLED;
				break;
			}
		}
		if (!held) {
			r = rpc_call_recv_nowait(call, &held);
			if (r == 0)
				break;
			if (r < 0 && r != -EAGAIN) {
				atomic_fetch_add(&cancellations_seen, 1);
				code = r == -EBADMSG ? rpc_call_error(call, RPC_INVALID_ARGUMENT,
								      "bad chunk")
						     : RPC_CANCELLED;
				break;
			}
			if (r > 0)
				continue; /* try to send it at once */
		}
		(void)poll(&p, 1, -1);
	}
	if (held)
		protobuf_c_message_free_unpacked(held, NULL);
	return code;
}

static RpcCode fail(RpcCall *call, const ProtobufCMessage *request, void *userdata)
{
	const Rpctest__FailRequest *req = (const void *)request;
	(void)userdata;
	/* Queue a reply first: a failing unary call must send its status alone. */
	(void)reply(call, "should not be seen");
	return rpc_call_error(call, (RpcCode)req->code, "%s", req->message);
}

static RpcCode stats(RpcCall *call, const ProtobufCMessage *request, void *userdata)
{
	Rpctest__StatsReply r = RPCTEST__STATS_REPLY__INIT;
	(void)request;
	(void)userdata;
	r.cancellations_seen = atomic_load(&cancellations_seen);
	r.stream_sent = atomic_load(&stream_sent);
	r.sleeps_finished = atomic_load(&sleeps_finished);
	r.last_cancel_after_ms = atomic_load(&last_cancel_after_ms);
	r.shutdowns_seen = atomic_load(&shutdowns_seen);
	return rpc_call_send(call, &r.base) < 0 ? RPC_CANCELLED : RPC_OK;
}

static void write_metrics(FILE *f, void *userdata)
{
	rpc_server_write_metrics(userdata, f);
}

int main(int argc, char *argv[])
{
	static const RpcMethodHandler handlers[] = {
		{"Echo", echo}, {"Sleep", sleep_handler}, {"Stream", stream},
		{"Bidi", bidi}, {"Fail", fail},           {"Stats", stats},
	};
	static const struct option options[] = {
		{"grace-ms", required_argument, NULL, 'g'},
		{"high-water", required_argument, NULL, 'w'},
		{"max-calls", required_argument, NULL, 'c'},
		{"max-streams", required_argument, NULL, 'S'},
		{"max-msg", required_argument, NULL, 'm'},
		{"serve-after-ms", required_argument, NULL, 's'},
		{"http", required_argument, NULL, 'H'},
		{"http-dir", required_argument, NULL, 'D'},
		{},
	};
	RpcServerOptions opts = {
		.descriptor_set = ember_descriptor_set,
		.descriptor_set_size = ember_descriptor_set_size,
		.max_message_bytes = 4 << 20,
		.keepalive_time_ms = 30000,
		.keepalive_timeout_ms = 10000,
		.min_ping_interval_ms = 10000,
		.max_concurrent_calls = 64,
		.version = "test",
	};
	long grace_ms = 5000, serve_after_ms = 0;
	const char *http_listen = NULL, *http_dir = "/tmp";
	HttpServer *http = NULL;
	RpcServer *s = NULL;
	sigset_t mask;
	int c, r, sig;

	while ((c = getopt_long(argc, argv, "", options, NULL)) >= 0) {
		switch (c) {
		case 'g':
			grace_ms = atol(optarg);
			break;
		case 'w':
			opts.stream_high_water_bytes = (size_t)atol(optarg);
			break;
		case 'c':
			opts.max_concurrent_calls = (unsigned)atoi(optarg);
			break;
		case 'S':
			opts.max_concurrent_streams = (unsigned)atoi(optarg);
			break;
		case 'm':
			opts.max_message_bytes = (size_t)atol(optarg);
			break;
		case 's':
			serve_after_ms = atol(optarg);
			break;
		case 'H':
			http_listen = optarg;
			break;
		case 'D':
			http_dir = optarg;
			break;
		default:
			return 2;
		}
	}
	if (optind != argc - 1) {
		fprintf(stderr, "usage: rpctestd SOCKET [--grace-ms N] [--high-water B] "
				"[--max-calls N] [--max-msg B]\n");
		return 2;
	}

	log_setup("rpctestd", LOG_TARGET_STDERR);
	log_set_max_level(getenv("RPCTEST_DEBUG") ? LOG_DEBUG : LOG_INFO);
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	pthread_sigmask(SIG_BLOCK, &mask, NULL);

	if ((r = rpc_server_new(&opts, &s)) < 0 ||
	    (r = rpc_server_add_service(s, &rpctest__test__descriptor, handlers,
					ELEMENTSOF(handlers), NULL)) < 0 ||
	    (r = rpc_server_listen_unix(s, argv[optind], 0600)) < 0 ||
	    (r = rpc_server_start(s)) < 0) {
		fprintf(stderr, "rpctestd: %s\n", strerror(-r));
		rpc_server_free(s);
		return 1;
	}
	printf("READY\n");
	if (http_listen) {
		static const char *const reads[] = {"Echo", "Stats", NULL};
		HttpOptions ho = {.listen = http_listen,
				  .get_methods = reads,
				  .run_dir = http_dir,
				  .service = rpctest__test__descriptor.name,
				  .rpc = s,
				  .metrics = write_metrics,
				  .metrics_userdata = s};
		char *err = NULL;
		if ((r = http_server_start(&ho, &http, &err)) < 0) {
			fprintf(stderr, "rpctestd: http: %s\n", err ?: strerror(-r));
			free(err);
			rpc_server_free(s);
			return 1;
		}
		printf("HTTP %d\n", http_server_port(http));
	}
	fflush(stdout);

	struct timespec serve_at = {.tv_sec = serve_after_ms / 1000,
				    .tv_nsec = (serve_after_ms % 1000) * 1000000L};
	sig = sigtimedwait(&mask, NULL, &serve_at);
	if (sig < 0) {
		rpc_server_set_state(s, RPC_SERVER_SERVING);
		while (sigwait(&mask, &sig) != 0)
			;
	}
	r = rpc_server_shutdown(s, grace_ms, &mask);
	printf("SHUTDOWN %s\n", r == 0 ? "clean" : r == -ETIMEDOUT ? "timeout" : "cancelled");
	fflush(stdout);
	http_server_free(http);
	rpc_server_free(s);
	return 0;
}
