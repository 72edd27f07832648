/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Prometheus text exposition helpers: histograms with fixed buckets that any thread may
 * observe into without a lock, and the writers /metrics uses. Each layer keeps its own
 * counters and writes them (rpc_server_write_metrics, manager_write_metrics).
 */
#pragma once

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>

/* Upper bounds in seconds, then +Inf: from a millisecond RPC to a five-minute stream or a
 * slow create. */
#define METRICS_BUCKETS 16

typedef struct Histogram {
	_Atomic uint64_t bucket[METRICS_BUCKETS]; /* not cumulative; the last is +Inf */
	_Atomic uint64_t sum_usec;
} Histogram;

void metrics_histogram_observe(Histogram *h, uint64_t usec);
uint64_t metrics_histogram_count(const Histogram *h);

/* "# HELP" and "# TYPE" lines. */
void metrics_header(FILE *f, const char *name, const char *type, const char *help);
/* One histogram series: <name>_bucket{<labels>,le=…}, _sum, _count. `labels` is the label
 * list without braces ("method=\"GetNode\""), values already escaped; may be empty. */
void metrics_histogram(FILE *f, const char *name, const char *labels, const Histogram *h);
