/* SPDX-License-Identifier: Apache-2.0 */
#include "metrics.h"

#include <string.h>

static const double bounds[METRICS_BUCKETS - 1] = {
	0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 300,
};

void metrics_histogram_observe(Histogram *h, uint64_t usec)
{
	size_t i = 0;

	while (i < METRICS_BUCKETS - 1 && (double)usec > bounds[i] * 1e6)
		i++;
	atomic_fetch_add_explicit(&h->bucket[i], 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&h->sum_usec, usec, memory_order_relaxed);
}

uint64_t metrics_histogram_count(const Histogram *h)
{
	uint64_t n = 0;

	for (size_t i = 0; i < METRICS_BUCKETS; i++)
		n += atomic_load_explicit(&h->bucket[i], memory_order_relaxed);
	return n;
}

void metrics_header(FILE *f, const char *name, const char *type, const char *help)
{
	fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void metrics_histogram(FILE *f, const char *name, const char *labels, const Histogram *h)
{
	const char *sep = labels && labels[0] ? "," : "";
	uint64_t cum = 0;

	labels = labels ?: "";
	/* Buckets are read one by one while others observe: _count is the cumulative +Inf
	 * bucket as written, so the series stays consistent in itself. */
	for (size_t i = 0; i < METRICS_BUCKETS; i++) {
		cum += atomic_load_explicit(&h->bucket[i], memory_order_relaxed);
		if (i < METRICS_BUCKETS - 1)
			fprintf(f, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep, bounds[i],
				(unsigned long long)cum);
		else
			fprintf(f, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep,
				(unsigned long long)cum);
	}
	fprintf(f, "%s_sum{%s} %.6f\n", name, labels,
		(double)atomic_load_explicit(&h->sum_usec, memory_order_relaxed) / 1e6);
	fprintf(f, "%s_count{%s} %llu\n", name, labels, (unsigned long long)cum);
}
