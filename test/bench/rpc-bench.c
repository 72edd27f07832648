/* SPDX-License-Identifier: Apache-2.0 */
/*
 * rpc-bench TARGET METHOD CLIENTS SECONDS
 *
 * Unary calls with an empty request, from CLIENTS threads (each with its own channel, so each
 * is a separate connection like separate scheduler processes) for SECONDS after a short
 * warm-up. Prints one line: calls, calls/s, p50/p90/p99/max latency in µs, errors.
 * A plain gRPC core client, so the figures measure the server rather than a client runtime.
 */
#include <errno.h>
#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct Client {
	pthread_t thread;
	const char *target;
	const char *method;
	double seconds;
	double *lat_us;
	size_t n, cap;
	size_t errors;
	int first_error;
} Client;

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* One call; returns the gRPC status (0 = OK) or -1 when the batch could not start. */
static int one_call(grpc_channel *ch, grpc_completion_queue *cq, grpc_slice method)
{
	grpc_metadata_array initial, trailing;
	grpc_byte_buffer *reply = NULL;
	grpc_status_code status = GRPC_STATUS_UNKNOWN;
	grpc_slice details = grpc_empty_slice();
	grpc_slice empty = grpc_empty_slice();
	grpc_byte_buffer *request = grpc_raw_byte_buffer_create(&empty, 1);
	grpc_op ops[6];
	int r;

	grpc_call *call = grpc_channel_create_call(
		ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method, NULL,
		gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_seconds(10, GPR_TIMESPAN)),
		NULL);
	grpc_metadata_array_init(&initial);
	grpc_metadata_array_init(&trailing);
	memset(ops, 0, sizeof(ops));
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = request;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[3].data.recv_initial_metadata.recv_initial_metadata = &initial;
	ops[4].op = GRPC_OP_RECV_MESSAGE;
	ops[4].data.recv_message.recv_message = &reply;
	ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	ops[5].data.recv_status_on_client.trailing_metadata = &trailing;
	ops[5].data.recv_status_on_client.status = &status;
	ops[5].data.recv_status_on_client.status_details = &details;

	if (grpc_call_start_batch(call, ops, 6, (void *)1, NULL) != GRPC_CALL_OK) {
		r = -1;
	} else {
		grpc_completion_queue_pluck(cq, (void *)1, gpr_inf_future(GPR_CLOCK_REALTIME),
					    NULL);
		r = (int)status;
		/* An OK status without a reply would be a broken server: count it. */
		if (r == 0 && !reply)
			r = -2;
	}
	if (reply)
		grpc_byte_buffer_destroy(reply);
	grpc_byte_buffer_destroy(request);
	grpc_slice_unref(details);
	grpc_metadata_array_destroy(&initial);
	grpc_metadata_array_destroy(&trailing);
	grpc_call_unref(call);
	return r;
}

static void *client_main(void *p)
{
	Client *c = p;
	grpc_channel_credentials *creds = grpc_insecure_credentials_create();
	grpc_channel *ch = grpc_channel_create(c->target, creds, NULL);
	grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
	grpc_slice method = grpc_slice_from_static_string(c->method);
	double warm_end = now_s() + 0.5, end;

	grpc_channel_credentials_release(creds);
	while (now_s() < warm_end)
		(void)one_call(ch, cq, method);
	end = now_s() + c->seconds;
	while (now_s() < end) {
		double t = now_s();
		int r = one_call(ch, cq, method);
		double us = (now_s() - t) * 1e6;
		if (r != 0) {
			if (c->errors++ == 0)
				c->first_error = r;
			continue;
		}
		if (c->n == c->cap) {
			c->cap = c->cap ? c->cap * 2 : 4096;
			c->lat_us = realloc(c->lat_us, c->cap * sizeof(double));
			if (!c->lat_us)
				abort();
		}
		c->lat_us[c->n++] = us;
	}
	grpc_channel_destroy(ch);
	grpc_completion_queue_shutdown(cq);
	while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
		       .type != GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(cq);
	return NULL;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

int main(int argc, char *argv[])
{
	Client *clients;
	size_t total = 0, errors = 0, k = 0;
	double *all, elapsed;
	int n, first_error = 0;

	if (argc != 5) {
		fprintf(stderr, "usage: rpc-bench TARGET /pkg.Service/Method CLIENTS SECONDS\n");
		return 2;
	}
	n = atoi(argv[3]);
	if (n <= 0)
		return 2;
	grpc_init();
	clients = calloc((size_t)n, sizeof(*clients));
	if (!clients)
		return 1;
	for (int i = 0; i < n; i++) {
		clients[i] =
			(Client){.target = argv[1], .method = argv[2], .seconds = atof(argv[4])};
		pthread_create(&clients[i].thread, NULL, client_main, &clients[i]);
	}
	for (int i = 0; i < n; i++) {
		pthread_join(clients[i].thread, NULL);
		total += clients[i].n;
		errors += clients[i].errors;
		if (!first_error && clients[i].first_error)
			first_error = clients[i].first_error;
	}
	/* Every client measures for exactly SECONDS after its own warm-up. */
	elapsed = atof(argv[4]);
	all = malloc((total ?: 1) * sizeof(double));
	if (!all)
		return 1;
	for (int i = 0; i < n; i++) {
		memcpy(all + k, clients[i].lat_us, clients[i].n * sizeof(double));
		k += clients[i].n;
		free(clients[i].lat_us);
	}
	qsort(all, total, sizeof(double), cmp_double);
#define PCT(p) (total ? all[(size_t)((double)(total - 1) * (p))] : 0.0)
	printf("%-32s clients=%-3d calls=%-7zu calls/s=%-8.0f p50=%.0fus p90=%.0fus p99=%.0fus "
	       "max=%.0fus errors=%zu",
	       argv[2], n, total, (double)total / elapsed, PCT(0.50), PCT(0.90), PCT(0.99),
	       total ? all[total - 1] : 0.0, errors);
	if (errors)
		printf(" (first status %d)", first_error);
	printf("\n");
	free(all);
	free(clients);
	grpc_shutdown();
	return errors ? 1 : 0;
}
