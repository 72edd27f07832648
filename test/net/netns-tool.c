/* SPDX-License-Identifier: Apache-2.0 */
/*
 * netns-tool: the netns/ library from the command line, for the tests and `make bench-net`.
 * Run it in the namespace that plays "the host" (nsenter --net=...).
 *
 * Common options:
 *   --netns-dir DIR --state FILE --sandbox-cidr CIDR --veth-cidr CIDR [--uplink IF] [--pool N]
 *
 *   netns-tool OPTS serve            commands on stdin, one answer line each:
 *       acquire OWNER [internet] [allow=CIDR,...] [deny=CIDR,...]
 *                                    -> ok index=N path=P ip=IP link=L | error MESSAGE
 *       policy OWNER [internet] [allow=...] [deny=...]
 *       release OWNER
 *       stats                        -> ok ready=N in_use=N max=N
 *       fds                          -> ok fds=N
 *       wait-ready MS
 *       quit
 *   netns-tool OPTS reclaim [KEEP_OWNER...]
 *   netns-tool OPTS cycles N         acquire/release N times; fds before and after
 *   netns-tool OPTS bench N          cold vs pooled hand-out, and steady-state slots/s
 */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/macro.h"
#include "netns/netns.h"

static NetnsConfig cfg = {.netns_dir = "/run/netns", .name_prefix = "ember-"};

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *de;
	int n = 0;

	while (d && (de = readdir(d)))
		if (de->d_name[0] != '.')
			n++;
	if (d)
		closedir(d);
	return n - 1;
}

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

/* "a,b,c" into a NULL-terminated array pointing into s (modified). */
static size_t split(char *s, const char **out, size_t max)
{
	size_t n = 0;
	char *save = NULL;
	for (char *t = strtok_r(s, ",", &save); t && n < max; t = strtok_r(NULL, ",", &save))
		out[n++] = t;
	return n;
}

typedef struct Parsed {
	NetnsPolicy policy;
	const char *allow[64], *deny[64];
} Parsed;

static void parse_policy(char **words, int n, Parsed *p)
{
	memset(p, 0, sizeof(*p));
	p->policy.allow = p->allow;
	p->policy.deny = p->deny;
	for (int i = 0; i < n; i++) {
		if (strcmp(words[i], "internet") == 0)
			p->policy.internet = true;
		else if (strncmp(words[i], "allow=", 6) == 0)
			p->policy.n_allow = split(words[i] + 6, p->allow, 64);
		else if (strncmp(words[i], "deny=", 5) == 0)
			p->policy.n_deny = split(words[i] + 5, p->deny, 64);
	}
}

static int serve(NetnsPool *pool)
{
	char line[4096];

	setvbuf(stdout, NULL, _IOLBF, 0);
	while (fgets(line, sizeof(line), stdin)) {
		char *words[32], *save = NULL, *err = NULL;
		int n = 0, r = 0;
		for (char *t = strtok_r(line, " \t\n", &save); t && n < 32;
		     t = strtok_r(NULL, " \t\n", &save))
			words[n++] = t;
		if (n == 0)
			continue;
		const char *cmd = words[0];
		NetnsSlot *s = NULL;
		Parsed pp;

		if (strcmp(cmd, "quit") == 0) {
			printf("ok\n");
			return 0;
		} else if (strcmp(cmd, "acquire") == 0 && n >= 2) {
			parse_policy(words + 2, n - 2, &pp);
			r = netns_slot_acquire(pool, words[1], &pp.policy, &s, &err);
			if (r >= 0)
				printf("ok index=%u path=%s ip=%s link=%s\n", netns_slot_index(s),
				       netns_slot_path(s), netns_slot_sandbox_ip(s),
				       netns_slot_host_link(s));
		} else if (strcmp(cmd, "policy") == 0 && n >= 2) {
			parse_policy(words + 2, n - 2, &pp);
			r = netns_slot_find(pool, words[1], &s);
			if (r >= 0)
				r = netns_slot_set_policy(pool, s, &pp.policy, &err);
			if (r >= 0)
				printf("ok\n");
		} else if (strcmp(cmd, "release") == 0 && n == 2) {
			r = netns_slot_find(pool, words[1], &s);
			if (r >= 0)
				r = netns_slot_release(pool, s, &err);
			if (r >= 0)
				printf("ok\n");
		} else if (strcmp(cmd, "stats") == 0) {
			NetnsPoolStats st;
			netns_pool_stats(pool, &st);
			printf("ok ready=%u in_use=%u max=%u\n", st.ready, st.in_use, st.max_slots);
		} else if (strcmp(cmd, "fds") == 0) {
			printf("ok fds=%d\n", count_fds());
		} else if (strcmp(cmd, "wait-ready") == 0 && n == 2) {
			r = netns_pool_wait_ready(pool, atoi(words[1]));
			if (r >= 0)
				printf("ok\n");
		} else {
			r = -EINVAL;
		}
		if (r < 0)
			printf("error %s\n", err ?: strerror(-r));
		free(err);
	}
	return 0;
}

static int cycles(NetnsPool *pool, int n)
{
	int before = -1;
	for (int i = 0; i < n; i++) {
		NetnsSlot *s;
		char *err = NULL;
		/* Counted once the pool and libraries have opened what they keep. */
		if (i == 1)
			before = count_fds();
		if (netns_slot_acquire(pool, "cycle", NULL, &s, &err) < 0 ||
		    netns_slot_release(pool, s, &err) < 0) {
			fprintf(stderr, "netns-tool: cycle %d: %s\n", i, err ?: "failed");
			free(err);
			return 1;
		}
	}
	printf("cycles=%d fds_before=%d fds_after=%d\n", n, before, count_fds());
	return 0;
}

static void pct(const char *what, double *v, int n)
{
	qsort(v, (size_t)n, sizeof(double), cmp_double);
	printf("%s_p50_ms=%.2f %s_p99_ms=%.2f ", what, v[(n - 1) / 2], what,
	       v[(int)((n - 1) * 0.99)]);
}

/* Pooled: the pool is full before each acquire, as it is for a sandbox created at a calm
 * moment. */
static int bench(NetnsPool *pool, int n)
{
	_cleanup_free_ double *pooled = calloc((size_t)n, sizeof(double));
	char *err = NULL;
	char owner[32];

	if (!pooled)
		return 1;
	for (int i = 0; i < n; i++) {
		NetnsSlot *s;
		netns_pool_wait_ready(pool, 10000);
		snprintf(owner, sizeof(owner), "b%d", i);
		double t = now_ms();
		if (netns_slot_acquire(pool, owner, NULL, &s, &err) < 0) {
			fprintf(stderr, "netns-tool: bench: %s\n", err ?: "failed");
			free(err);
			return 1;
		}
		pooled[i] = now_ms() - t;
		netns_slot_release(pool, s, NULL);
	}
	printf("pool_size=%u slots=%d ", cfg.pool_size, n);
	pct("pooled_acquire", pooled, n);
	printf("\n");
	return 0;
}

/* Cold: no pool at all; and steady demand with the pool refilling in the background. */
static int bench_cold(NetnsPool *pool, int n)
{
	_cleanup_free_ double *cold = calloc((size_t)n, sizeof(double));
	char *err = NULL, owner[32];

	if (!cold)
		return 1;
	for (int i = 0; i < n; i++) {
		NetnsSlot *s;
		snprintf(owner, sizeof(owner), "c%d", i);
		double t = now_ms();
		if (netns_slot_acquire(pool, owner, NULL, &s, &err) < 0) {
			fprintf(stderr, "netns-tool: bench: %s\n", err ?: "failed");
			free(err);
			return 1;
		}
		cold[i] = now_ms() - t;
		netns_slot_release(pool, s, NULL);
	}
	printf("pool_size=0 slots=%d ", n);
	pct("cold_acquire", cold, n);
	printf("\n");
	return 0;
}

static int bench_steady(NetnsPool *pool, double seconds)
{
	NetnsSlot *held[8] = {};
	unsigned done = 0, h = 0;
	char *err = NULL, owner[32];
	double end;

	/* Each sandbox lives a moment: keep 8 slots in use, release the oldest per acquire. */
	netns_pool_wait_ready(pool, 10000);
	end = now_ms() + seconds * 1000;
	double start = now_ms();
	while (now_ms() < end) {
		if (held[h]) {
			netns_slot_release(pool, held[h], NULL);
			held[h] = NULL;
		}
		snprintf(owner, sizeof(owner), "s%u", done);
		if (netns_slot_acquire(pool, owner, NULL, &held[h], &err) < 0) {
			fprintf(stderr, "netns-tool: steady: %s\n", err ?: "failed");
			free(err);
			return 1;
		}
		h = (h + 1) % 8;
		done++;
	}
	double elapsed = (now_ms() - start) / 1000;
	for (unsigned i = 0; i < 8; i++)
		if (held[i])
			netns_slot_release(pool, held[i], NULL);
	printf("pool_size=%u steady_slots_per_s=%.1f over %.1fs\n", cfg.pool_size, done / elapsed,
	       elapsed);
	return 0;
}

int main(int argc, char *argv[])
{
	static const struct option options[] = {
		{"netns-dir", required_argument, NULL, 'd'},
		{"state", required_argument, NULL, 's'},
		{"sandbox-cidr", required_argument, NULL, 'S'},
		{"veth-cidr", required_argument, NULL, 'V'},
		{"uplink", required_argument, NULL, 'u'},
		{"pool", required_argument, NULL, 'p'},
		{},
	};
	NetnsPool *pool = NULL;
	char *err = NULL;
	int c, r, ret = 0;

	netns_cidr_parse("10.200.0.0/16", &cfg.sandbox_range);
	netns_cidr_parse("10.201.0.0/16", &cfg.veth_range);
	while ((c = getopt_long(argc, argv, "+", options, NULL)) >= 0) {
		switch (c) {
		case 'd':
			cfg.netns_dir = optarg;
			break;
		case 's':
			cfg.state_file = optarg;
			break;
		case 'S':
			if (netns_cidr_parse(optarg, &cfg.sandbox_range) < 0)
				return 2;
			break;
		case 'V':
			if (netns_cidr_parse(optarg, &cfg.veth_range) < 0)
				return 2;
			break;
		case 'u':
			cfg.uplink = optarg;
			break;
		case 'p':
			cfg.pool_size = (unsigned)atoi(optarg);
			break;
		default:
			return 2;
		}
	}
	if (optind >= argc) {
		fprintf(stderr, "see the comment at the top of test/net/netns-tool.c\n");
		return 2;
	}
	const char *cmd = argv[optind];

	if (strcmp(cmd, "reclaim") == 0) {
		NetnsReclaimResult res;
		r = netns_reclaim(&cfg, (const char *const *)argv + optind + 1,
				  (size_t)(argc - optind - 1), &res, &err);
		printf("namespaces_removed=%u links_removed=%u slots_forgotten=%u\n",
		       res.namespaces_removed, res.links_removed, res.slots_forgotten);
		if (r < 0) {
			fprintf(stderr, "netns-tool: reclaim: %s\n", err ?: strerror(-r));
			ret = 1;
		}
		free(err);
		return ret;
	}

	r = netns_pool_new(&cfg, &pool, &err);
	if (r < 0) {
		fprintf(stderr, "netns-tool: %s\n", err ?: strerror(-r));
		free(err);
		return 1;
	}
	if (strcmp(cmd, "serve") == 0)
		ret = serve(pool);
	else if (strcmp(cmd, "cycles") == 0 && optind + 1 < argc)
		ret = cycles(pool, atoi(argv[optind + 1]));
	else if (strcmp(cmd, "bench") == 0 && optind + 1 < argc)
		ret = cfg.pool_size ? bench(pool, atoi(argv[optind + 1]))
				    : bench_cold(pool, atoi(argv[optind + 1]));
	else if (strcmp(cmd, "steady") == 0 && optind + 1 < argc)
		ret = bench_steady(pool, atof(argv[optind + 1]));
	else
		ret = 2;
	netns_pool_free(pool);
	return ret;
}
