/* SPDX-License-Identifier: Apache-2.0 */
/*
 * exec-bench TARGET SANDBOX true N | cat MIB
 *
 * emberd's Exec from a plain gRPC core client (as rpc-bench is for unary calls), so that the
 * figures measure emberd's relay rather than a client runtime:
 *   true N    N sequential Exec calls of `true`: start, started, exit; p50/p99 in µs
 *   cat MIB   one Exec of `dd if=/dev/zero bs=1M count=MIB`: stdout MiB/s
 * Prints one line in the format guest-tool's bench-true and bench-cat print, which
 * bench-exec.py parses the same way.
 */
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ember/v1/node.pb-c.h"

static int64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void *tag(intptr_t n)
{
	return (void *)n;
}

static void wait_tag(grpc_completion_queue *cq, void *t)
{
	grpc_event ev =
		grpc_completion_queue_pluck(cq, t, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
	if (ev.type != GRPC_OP_COMPLETE) {
		fprintf(stderr, "exec-bench: completion queue: %d\n", (int)ev.type);
		exit(1);
	}
}

/* One Exec of argv; returns its exit code (-1 on a call error) and the stdout bytes. */
static int exec_once(grpc_channel *ch, grpc_completion_queue *cq, const char *sandbox, char **argv,
		     size_t argc, uint64_t *ret_bytes)
{
	Ember__V1__ExecStart start = EMBER__V1__EXEC_START__INIT;
	Ember__V1__ExecRequest req = EMBER__V1__EXEC_REQUEST__INIT;
	grpc_metadata_array initial, trailing;
	grpc_status_code status = GRPC_STATUS_UNKNOWN;
	grpc_slice details = grpc_empty_slice();
	grpc_op ops[4];
	int code = -1;
	uint64_t bytes = 0;

	start.sandbox_id = (char *)sandbox;
	start.argv = argv;
	start.n_argv = argc;
	req.msg_case = EMBER__V1__EXEC_REQUEST__MSG_START;
	req.start = &start;
	size_t size = ember__v1__exec_request__get_packed_size(&req);
	grpc_slice s = grpc_slice_malloc(size);
	ember__v1__exec_request__pack(&req, GRPC_SLICE_START_PTR(s));
	grpc_byte_buffer *out = grpc_raw_byte_buffer_create(&s, 1);
	grpc_slice_unref(s);

	grpc_slice method = grpc_slice_from_static_string("/ember.v1.Node/Exec");
	grpc_call *call =
		grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method, NULL,
					 gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
						      gpr_time_from_seconds(600, GPR_TIMESPAN)),
					 NULL);
	grpc_metadata_array_init(&initial);
	grpc_metadata_array_init(&trailing);
	memset(ops, 0, sizeof(ops));
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = out;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[3].data.recv_initial_metadata.recv_initial_metadata = &initial;
	if (grpc_call_start_batch(call, ops, 4, tag(1), NULL) != GRPC_CALL_OK)
		goto out;
	wait_tag(cq, tag(1));
	for (;;) {
		grpc_byte_buffer *in = NULL;
		grpc_op op = {.op = GRPC_OP_RECV_MESSAGE};
		op.data.recv_message.recv_message = &in;
		if (grpc_call_start_batch(call, &op, 1, tag(2), NULL) != GRPC_CALL_OK)
			goto out;
		wait_tag(cq, tag(2));
		if (!in)
			break;
		grpc_byte_buffer_reader reader;
		grpc_byte_buffer_reader_init(&reader, in);
		grpc_slice all = grpc_byte_buffer_reader_readall(&reader);
		grpc_byte_buffer_reader_destroy(&reader);
		grpc_byte_buffer_destroy(in);
		Ember__V1__ExecResponse *r = ember__v1__exec_response__unpack(
			NULL, GRPC_SLICE_LENGTH(all), GRPC_SLICE_START_PTR(all));
		grpc_slice_unref(all);
		if (!r)
			goto out;
		if (r->msg_case == EMBER__V1__EXEC_RESPONSE__MSG_STDOUT_DATA)
			bytes += r->stdout_data.len;
		else if (r->msg_case == EMBER__V1__EXEC_RESPONSE__MSG_EXIT)
			code = r->exit->exit_code + (r->exit->signal ? 128 + r->exit->signal : 0);
		ember__v1__exec_response__free_unpacked(r, NULL);
	}
	memset(ops, 0, sizeof(ops));
	ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	ops[0].data.recv_status_on_client.trailing_metadata = &trailing;
	ops[0].data.recv_status_on_client.status = &status;
	ops[0].data.recv_status_on_client.status_details = &details;
	if (grpc_call_start_batch(call, ops, 1, tag(3), NULL) != GRPC_CALL_OK)
		goto out;
	wait_tag(cq, tag(3));
	if (status != GRPC_STATUS_OK) {
		char *d = grpc_slice_to_c_string(details);
		fprintf(stderr, "exec-bench: Exec %s: status %d: %s\n", argv[0], (int)status, d);
		gpr_free(d);
		code = -1;
	}
out:
	grpc_byte_buffer_destroy(out);
	grpc_slice_unref(details);
	grpc_metadata_array_destroy(&initial);
	grpc_metadata_array_destroy(&trailing);
	grpc_call_unref(call);
	*ret_bytes = bytes;
	return code;
}

static int cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

int main(int argc, char *argv[])
{
	uint64_t bytes;
	int rc = 0;

	if (argc != 5 || (strcmp(argv[3], "true") != 0 && strcmp(argv[3], "cat") != 0)) {
		fprintf(stderr, "usage: exec-bench TARGET SANDBOX true N | cat MIB\n");
		return 2;
	}
	long n = atol(argv[4]);
	if (n <= 0)
		return 2;
	grpc_init();
	grpc_channel_credentials *creds = grpc_insecure_credentials_create();
	grpc_arg arg = {.type = GRPC_ARG_INTEGER,
			.key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
			.value.integer = 64 << 20};
	grpc_channel_args args = {.num_args = 1, .args = &arg};
	grpc_channel *ch = grpc_channel_create(argv[1], creds, &args);
	grpc_channel_credentials_release(creds);
	grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);

	if (strcmp(argv[3], "true") == 0) {
		char *t[] = {(char *)"true"};
		int64_t *us = calloc((size_t)n, sizeof(int64_t));
		double sum = 0;
		if (!us)
			return 1;
		for (int i = 0; i < 20; i++) /* warm-up: the connection, the guest's page cache */
			(void)exec_once(ch, cq, argv[2], t, 1, &bytes);
		for (long i = 0; i < n; i++) {
			int64_t t0 = now_us();
			if (exec_once(ch, cq, argv[2], t, 1, &bytes) != 0) {
				rc = 1;
				break;
			}
			us[i] = now_us() - t0;
			sum += (double)us[i];
		}
		qsort(us, (size_t)n, sizeof(int64_t), cmp_i64);
		if (rc == 0)
			printf("exec true: n=%ld p50=%" PRId64 " us p99=%" PRId64
			       " us mean=%.0f us\n",
			       n, us[n / 2], us[(n * 99) / 100 < n ? (n * 99) / 100 : n - 1],
			       sum / (double)n);
		free(us);
	} else {
		char count[32];
		snprintf(count, sizeof(count), "count=%ld", n);
		char *dd[] = {(char *)"dd", (char *)"if=/dev/zero", (char *)"bs=1048576", count};
		int64_t t0 = now_us();
		int code = exec_once(ch, cq, argv[2], dd, 4, &bytes);
		double s = (double)(now_us() - t0) / 1e6;
		if (code != 0 || bytes != (uint64_t)n << 20) {
			fprintf(stderr, "exec-bench: dd: exit %d, %" PRIu64 " bytes\n", code,
				bytes);
			rc = 1;
		} else {
			printf("stdout: %" PRIu64 " bytes in %.3f s = %.1f MiB/s\n", bytes, s,
			       (double)bytes / s / (1 << 20));
		}
	}
	grpc_channel_destroy(ch);
	grpc_completion_queue_shutdown(cq);
	while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
		       .type != GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(cq);
	grpc_shutdown();
	return rc;
}
