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
 *       hold NAME OWNER              keeps a reference (netns_slot_find) under NAME
 *       held NAME                    -> ok index=N owner=O path=P, read through it
 *       policy-held NAME [...]       netns_slot_set_policy through the held reference
 *       release-held NAME            netns_slot_release through it (gives it back)
 *       unref NAME                   gives it back
 *       race OWNER N                 N threads acquire OWNER at once
 *                                    -> ok won=N eexist=N failed=N
 *       burst PREFIX N               N threads acquire PREFIX0..PREFIX<N-1> at once
 *                                    -> ok ok=N distinct=N p50_ms=X max_ms=X wall_ms=X
 *       stats                        -> ok ready=N in_use=N max=N broken=N saves=N ...
 *       fds                          -> ok fds=N
 *       wait-ready MS
 *       quit
 *   netns-tool OPTS reclaim [KEEP_OWNER...]
 *   netns-tool OPTS cycles N         acquire/release N times; fds before and after
 *   netns-tool OPTS bench N          cold (--pool 0) or pooled hand-out, p50/p99
 *   netns-tool OPTS burst N          N concurrent acquires, then N concurrent releases
 *   netns-tool OPTS steady SECONDS   slots/s with 8 slots alive
 */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
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

/* ---- many threads at once, as a sandbox manager does ---- */

typedef struct Racer {
	NetnsPool *pool;
	pthread_barrier_t *go;
	char owner[64];
	int r;
	double ms;
	NetnsSlot *slot;
	char *err;
} Racer;

static void *racer_acquire(void *arg)
{
	Racer *x = arg;
	pthread_barrier_wait(x->go);
	double t = now_ms();
	x->r = netns_slot_acquire(x->pool, x->owner, NULL, &x->slot, &x->err);
	x->ms = now_ms() - t;
	return NULL;
}

static void *racer_release(void *arg)
{
	Racer *x = arg;
	pthread_barrier_wait(x->go);
	double t = now_ms();
	x->r = netns_slot_release(x->pool, x->slot, &x->err);
	x->slot = NULL;
	x->ms = now_ms() - t;
	return NULL;
}

/* Runs fn on n threads released together. A thread that cannot start would leave the
 * barrier closed: not worth recovering from in a test tool. */
static void run_together(Racer *x, int n, void *(*fn)(void *))
{
	pthread_barrier_t go;
	pthread_t *t = calloc((size_t)n, sizeof(pthread_t));

	if (!t || pthread_barrier_init(&go, NULL, (unsigned)n) != 0) {
		fprintf(stderr, "netns-tool: out of memory\n");
		exit(1);
	}
	for (int i = 0; i < n; i++) {
		x[i].go = &go;
		if (pthread_create(&t[i], NULL, fn, &x[i]) != 0) {
			fprintf(stderr, "netns-tool: cannot start %d threads\n", n);
			exit(1);
		}
	}
	for (int i = 0; i < n; i++)
		pthread_join(t[i], NULL);
	pthread_barrier_destroy(&go);
	free(t);
}

static void racers_free(Racer *x, int n)
{
	for (int i = 0; i < n && x; i++) {
		netns_slot_unref(x[i].slot);
		free(x[i].err);
	}
	free(x);
}

/* N acquires of one owner at once: exactly one may win. */
static int race(NetnsPool *pool, const char *owner, int n)
{
	Racer *x = calloc((size_t)n, sizeof(Racer));
	int won = 0, eexist = 0, failed = 0;

	if (!x)
		return -ENOMEM;
	for (int i = 0; i < n; i++) {
		x[i].pool = pool;
		snprintf(x[i].owner, sizeof(x[i].owner), "%s", owner);
	}
	run_together(x, n, racer_acquire);
	for (int i = 0; i < n; i++) {
		if (x[i].r >= 0)
			won++;
		else if (x[i].r == -EEXIST)
			eexist++;
		else {
			failed++;
			fprintf(stderr, "netns-tool: race: %s\n", x[i].err ?: strerror(-x[i].r));
		}
	}
	printf("ok won=%d eexist=%d failed=%d\n", won, eexist, failed);
	racers_free(x, n); /* the winner's slot stays in use */
	return 0;
}

static void pct(const char *what, double *v, int n)
{
	qsort(v, (size_t)n, sizeof(double), cmp_double);
	printf("%s_p50_ms=%.3f %s_p99_ms=%.3f ", what, v[(n - 1) / 2], what,
	       v[(int)((n - 1) * 0.99)]);
}

/* N acquires for different owners at once (and, with release, N releases at once). */
static int burst(NetnsPool *pool, const char *prefix, int n, bool release, bool serve_format)
{
	Racer *x = calloc((size_t)n, sizeof(Racer));
	double *ms = calloc((size_t)n, sizeof(double));
	int ok = 0, distinct = 0, r = 0;
	uint8_t *seen = NULL;

	if (!x || !ms) {
		r = -ENOMEM;
		goto out;
	}
	for (int i = 0; i < n; i++) {
		x[i].pool = pool;
		snprintf(x[i].owner, sizeof(x[i].owner), "%s%d", prefix, i);
	}
	double t = now_ms();
	run_together(x, n, racer_acquire);
	double wall = now_ms() - t;
	NetnsPoolStats st;
	netns_pool_stats(pool, &st);
	seen = calloc(st.max_slots, 1);
	if (!seen) {
		r = -ENOMEM;
		goto out;
	}
	for (int i = 0; i < n; i++) {
		ms[i] = x[i].ms;
		if (x[i].r < 0) {
			fprintf(stderr, "netns-tool: burst %s: %s\n", x[i].owner,
				x[i].err ?: strerror(-x[i].r));
			continue;
		}
		ok++;
		unsigned idx = netns_slot_index(x[i].slot);
		distinct += !seen[idx];
		seen[idx] = 1;
	}
	if (serve_format)
		printf("ok ok=%d distinct=%d ", ok, distinct);
	else
		printf("pool_size=%u concurrent=%d ok=%d distinct=%d ", cfg.pool_size, n, ok,
		       distinct);
	qsort(ms, (size_t)n, sizeof(double), cmp_double);
	printf("p50_ms=%.2f max_ms=%.2f wall_ms=%.2f", ms[(n - 1) / 2], ms[n - 1], wall);
	if (release) {
		for (int i = 0; i < n; i++) {
			free(x[i].err);
			x[i].err = NULL;
		}
		t = now_ms();
		run_together(x, n, racer_release);
		printf(" release_wall_ms=%.2f", now_ms() - t);
	}
	printf("\n");
	if (ok != n && !serve_format)
		r = -EIO;
out:
	racers_free(x, n);
	free(ms);
	free(seen);
	return r;
}

/* ---- serve ---- */

#define MAX_HELD 64

typedef struct Held {
	char name[32];
	NetnsSlot *slot;
} Held;

static Held *held_get(Held *held, const char *name, bool create)
{
	for (size_t i = 0; i < MAX_HELD; i++)
		if (held[i].slot && strcmp(held[i].name, name) == 0)
			return &held[i];
	for (size_t i = 0; create && i < MAX_HELD; i++)
		if (!held[i].slot) {
			snprintf(held[i].name, sizeof(held[i].name), "%s", name);
			return &held[i];
		}
	return NULL;
}

static int serve(NetnsPool *pool)
{
	Held held[MAX_HELD] = {};
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
		Held *h;
		Parsed pp;

		if (strcmp(cmd, "quit") == 0) {
			printf("ok\n");
			break;
		} else if (strcmp(cmd, "acquire") == 0 && n >= 2) {
			parse_policy(words + 2, n - 2, &pp);
			r = netns_slot_acquire(pool, words[1], &pp.policy, &s, &err);
			if (r >= 0)
				printf("ok index=%u path=%s ip=%s link=%s\n", netns_slot_index(s),
				       netns_slot_path(s), netns_slot_sandbox_ip(s),
				       netns_slot_host_link(s));
			netns_slot_unref(s); /* the pool keeps it in use */
		} else if (strcmp(cmd, "policy") == 0 && n >= 2) {
			parse_policy(words + 2, n - 2, &pp);
			r = netns_slot_find(pool, words[1], &s);
			if (r >= 0)
				r = netns_slot_set_policy(pool, s, &pp.policy, &err);
			if (r >= 0)
				printf("ok\n");
			netns_slot_unref(s);
		} else if (strcmp(cmd, "release") == 0 && n == 2) {
			r = netns_slot_find(pool, words[1], &s);
			if (r >= 0)
				r = netns_slot_release(pool, s, &err);
			if (r >= 0)
				printf("ok\n");
		} else if (strcmp(cmd, "hold") == 0 && n == 3) {
			h = held_get(held, words[1], true);
			r = h ? netns_slot_find(pool, words[2], &h->slot) : -ENOSPC;
			if (r >= 0)
				printf("ok\n");
		} else if (strcmp(cmd, "held") == 0 && n == 2) {
			h = held_get(held, words[1], false);
			r = h ? 0 : -ENOENT;
			if (h)
				printf("ok index=%u owner=%s path=%s\n", netns_slot_index(h->slot),
				       netns_slot_owner(h->slot), netns_slot_path(h->slot));
		} else if (strcmp(cmd, "policy-held") == 0 && n >= 2) {
			parse_policy(words + 2, n - 2, &pp);
			h = held_get(held, words[1], false);
			r = h ? netns_slot_set_policy(pool, h->slot, &pp.policy, &err) : -ENOENT;
			if (r >= 0)
				printf("ok\n");
		} else if (strcmp(cmd, "release-held") == 0 && n == 2) {
			h = held_get(held, words[1], false);
			r = h ? netns_slot_release(pool, TAKE_PTR(h->slot), &err) : -ENOENT;
			if (r >= 0)
				printf("ok\n");
		} else if (strcmp(cmd, "unref") == 0 && n == 2) {
			h = held_get(held, words[1], false);
			r = h ? 0 : -ENOENT;
			if (h) {
				h->slot = netns_slot_unref(h->slot);
				printf("ok\n");
			}
		} else if (strcmp(cmd, "race") == 0 && n == 3) {
			r = race(pool, words[1], atoi(words[2]));
		} else if (strcmp(cmd, "burst") == 0 && n == 3) {
			r = burst(pool, words[1], atoi(words[2]), false, true);
		} else if (strcmp(cmd, "stats") == 0) {
			NetnsPoolStats st;
			netns_pool_stats(pool, &st);
			printf("ok ready=%u in_use=%u max=%u broken=%u journal_writes=%" PRIu64
			       " snapshot_writes=%" PRIu64 "\n",
			       st.ready, st.in_use, st.max_slots, st.broken, st.journal_writes,
			       st.snapshot_writes);
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
	for (size_t i = 0; i < MAX_HELD; i++)
		netns_slot_unref(held[i].slot);
	return 0;
}

static int cycles(NetnsPool *pool, int n)
{
	int before = -1;
	for (int i = 0; i < n; i++) {
		NetnsSlot *s;
		char *err = NULL;
		/* Counted once the pool and libraries have opened what they keep, and while the
		 * pool's worker is not building (its sockets and fds come and go). */
		if (i == 1) {
			netns_pool_wait_ready(pool, 10000);
			before = count_fds();
		}
		if (netns_slot_acquire(pool, "cycle", NULL, &s, &err) < 0 ||
		    netns_slot_release(pool, s, &err) < 0) {
			fprintf(stderr, "netns-tool: cycle %d: %s\n", i, err ?: "failed");
			free(err);
			return 1;
		}
	}
	netns_pool_wait_ready(pool, 10000);
	printf("cycles=%d fds_before=%d fds_after=%d\n", n, before, count_fds());
	return 0;
}

static double avg_ms(uint64_t us_total, uint64_t n)
{
	return n ? (double)us_total / (double)n / 1e3 : 0;
}

/* What writing the state file cost so far, with how many slots in use now. */
static void print_saves(NetnsPool *pool)
{
	NetnsPoolStats st;
	netns_pool_stats(pool, &st);
	printf("in_use=%u journal_writes=%" PRIu64 " journal_avg_ms=%.3f journal_max_ms=%.3f "
	       "snapshots=%" PRIu64 " snapshot_avg_ms=%.3f snapshot_max_ms=%.3f ",
	       st.in_use, st.journal_writes, avg_ms(st.journal_us_total, st.journal_writes),
	       (double)st.journal_us_max / 1e3, st.snapshot_writes,
	       avg_ms(st.snapshot_us_total, st.snapshot_writes), (double)st.snapshot_us_max / 1e3);
}

/* Hand-outs timed one at a time; with a pool, the pool is full before each, as it is for a
 * sandbox created at a calm moment. Pooled: with the default policy, then with another. */
static int bench(NetnsPool *pool, int n)
{
	static const char *const allow[] = {"198.51.100.0/24"}, *const deny[] = {"203.0.113.7"};
	const NetnsPolicy other = {
		.internet = true, .allow = allow, .n_allow = 1, .deny = deny, .n_deny = 1};
	_cleanup_free_ double *ms = calloc((size_t)n, sizeof(double));
	char *err = NULL;
	char owner[32];

	if (!ms)
		return 1;
	for (int round = 0; round < (cfg.pool_size ? 2 : 1); round++) {
		for (int i = 0; i < n; i++) {
			NetnsSlot *s;
			if (cfg.pool_size)
				netns_pool_wait_ready(pool, 10000);
			snprintf(owner, sizeof(owner), "b%d", i);
			double t = now_ms();
			if (netns_slot_acquire(pool, owner, round ? &other : NULL, &s, &err) < 0) {
				fprintf(stderr, "netns-tool: bench: %s\n", err ?: "failed");
				free(err);
				return 1;
			}
			ms[i] = now_ms() - t;
			netns_slot_release(pool, s, NULL);
		}
		printf("pool_size=%u slots=%d ", cfg.pool_size, n);
		const char *what = round ? "pooled_policy_acquire" : "pooled_acquire";
		pct(cfg.pool_size ? what : "cold_acquire", ms, n);
		print_saves(pool);
		printf("\n");
	}
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
		ret = bench(pool, atoi(argv[optind + 1]));
	else if (strcmp(cmd, "burst") == 0 && optind + 1 < argc)
		ret = burst(pool, "burst", atoi(argv[optind + 1]), true, false) < 0;
	else if (strcmp(cmd, "steady") == 0 && optind + 1 < argc)
		ret = bench_steady(pool, atof(argv[optind + 1]));
	else
		ret = 2;
	netns_pool_free(pool);
	return ret;
}
