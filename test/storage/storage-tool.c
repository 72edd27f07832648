/* SPDX-License-Identifier: Apache-2.0 */
/*
 * storage-tool: the storage/ library from the command line, for the VM tests, the host tests
 * of the file backend and `make bench-storage`. Each command prints one line of key=value
 * results. Every invocation is a new process, as a restarted agent is.
 *
 * Options: --backend dm|file (default dm), --udev-timeout-ms N,
 *          --before-dm-create CMD (runs `sh -c CMD` right before the dm device is made, with
 *          EMBER_DM_NAME set: a test plays a racing creator with it).
 *
 *   storage-tool [--backend dm|file] create  ID BASE COW SIZE
 *   storage-tool [--backend dm|file] restore ID BASE COW
 *   storage-tool [--backend dm|file] remove  ID BASE COW
 *   storage-tool [--backend dm|file] flatten ID BASE COW DEST
 *   storage-tool [--backend dm|file] status  ID BASE COW [SIZE]
 *   storage-tool reclaim STATE_DIR [KEEP_ID...]
 *   storage-tool usage PATH
 *   storage-tool [--backend dm|file] multi   N BASE DIR SIZE [PREFIX]  (N disks in one process)
 *   storage-tool [--backend dm|file] cycles  N BASE DIR SIZE [PREFIX]  (create/remove N times)
 *   storage-tool [--backend dm|file] bench   N BASE DIR SIZE [PREFIX]  (timings, p50/p99)
 *   storage-tool [--backend dm|file] session  (commands from stdin, one process; see below)
 * Disks made by multi/cycles/bench are named PREFIX-0, PREFIX-1, … (default prefix "st").
 *
 * session: one Storage for many commands, as the agent has; one line of input each, one line
 * of output each (flushed), `ok ms=N end=N [key=value...]` or
 * `fail ms=N end=N errno=N message=TEXT` (end: ms since the session started):
 *   create/restore/remove/flatten/status ARGS   as above
 *   refs BASE        references this process holds on the base's loop device (0: none)
 *   held             disks this process holds a base reference for, and registry entries
 *   reclaim STATE_DIR [KEEP_ID...]   with this process's Storage: it spares the copies
 *                    (file backend) of kept disks this session created or restored
 *   exists PATH      whether PATH exists (a /dev/mapper node, say) right now
 *   sleep MS
 *   bg COMMAND...    runs COMMAND on a thread of its own; its result comes with `wait`
 *   wait             joins the bg commands, one line each: `bg N ` and the result
 */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/macro.h"
#include "storage/storage-internal.h"
#include "storage/storage.h"

static StorageBackend backend = STORAGE_BACKEND_DM;

static int fail(const char *what, int r, char *err)
{
	fprintf(stderr, "storage-tool: %s: %s\n", what, err ?: strerror(-r));
	free(err);
	return 1;
}

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

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
	return n - 1; /* the directory's own fd */
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double pct(double *v, size_t n, double p)
{
	return n ? v[(size_t)((double)(n - 1) * p)] : 0;
}

static const char *id_prefix = "st";

static void spec_for(char *id, size_t idsz, char *cow, size_t cowsz, const char *dir, int i)
{
	snprintf(id, idsz, "%s-%d", id_prefix, i);
	snprintf(cow, cowsz, "%s/cow-%d.img", dir, i);
}

/* N disks over one base in this process; prints the devices. */
static int cmd_multi(Storage *s, int n, const char *base, const char *dir, uint64_t size)
{
	for (int i = 0; i < n; i++) {
		char id[32], cow[4096];
		char *dev = NULL, *err = NULL;
		spec_for(id, sizeof(id), cow, sizeof(cow), dir, i);
		StorageDiskSpec spec = {id, base, cow, size};
		int r = storage_disk_create(s, &spec, &dev, &err);
		if (r < 0)
			return fail("create", r, err);
		printf("%s %s\n", id, dev);
		free(dev);
	}
	return 0;
}

static int cmd_cycles(Storage *s, int n, const char *base, const char *dir, uint64_t size)
{
	int fds_before = -1;

	for (int i = 0; i < n; i++) {
		/* Counted after the first cycle: libdevmapper opens its control fd once and keeps
		 * it. Any growth after that is a leak per cycle. */
		if (i == 1)
			fds_before = count_fds();
		char id[32], cow[4096];
		char *dev = NULL, *err = NULL;
		spec_for(id, sizeof(id), cow, sizeof(cow), dir, 0);
		StorageDiskSpec spec = {id, base, cow, size};
		int r = storage_disk_create(s, &spec, &dev, &err);
		if (r < 0)
			return fail("create", r, err);
		free(dev);
		r = storage_disk_remove(s, &spec, &err);
		if (r < 0)
			return fail("remove", r, err);
		unlink(cow);
	}
	printf("cycles=%d fds_before=%d fds_after=%d\n", n, fds_before, count_fds());
	return 0;
}

static int cmd_bench(Storage *s, int n, const char *base, const char *dir, uint64_t size)
{
	_cleanup_free_ double *create = calloc((size_t)n, sizeof(double));
	_cleanup_free_ double *removal = calloc((size_t)n, sizeof(double));
	uint64_t cow_bytes = 0, base_bytes = 0;
	struct stat st;

	if (!create || !removal)
		return 1;
	for (int i = 0; i < n; i++) {
		char id[32], cow[4096];
		char *dev = NULL, *err = NULL;
		spec_for(id, sizeof(id), cow, sizeof(cow), dir, i);
		StorageDiskSpec spec = {id, base, cow, size};
		double t = now_ms();
		int r = storage_disk_create(s, &spec, &dev, &err);
		create[i] = now_ms() - t;
		if (r < 0)
			return fail("create", r, err);
		free(dev);
		if (i == 0)
			(void)storage_usage_file(cow, &cow_bytes);
	}
	for (int i = 0; i < n; i++) {
		char id[32], cow[4096];
		char *err = NULL;
		spec_for(id, sizeof(id), cow, sizeof(cow), dir, i);
		StorageDiskSpec spec = {id, base, cow, size};
		double t = now_ms();
		int r = storage_disk_remove(s, &spec, &err);
		removal[i] = now_ms() - t;
		if (r < 0)
			return fail("remove", r, err);
		unlink(cow);
	}
	qsort(create, (size_t)n, sizeof(double), cmp_double);
	qsort(removal, (size_t)n, sizeof(double), cmp_double);
	(void)storage_usage_file(base, &base_bytes);
	if (stat(base, &st) < 0)
		return 1;
	printf("backend=%s disks=%d create_p50_ms=%.2f create_p99_ms=%.2f remove_p50_ms=%.2f "
	       "remove_p99_ms=%.2f fresh_disk_bytes=%llu base_apparent_bytes=%lld "
	       "base_allocated_bytes=%llu\n",
	       storage_backend_to_string(backend), n, pct(create, (size_t)n, 0.5),
	       pct(create, (size_t)n, 0.99), pct(removal, (size_t)n, 0.5),
	       pct(removal, (size_t)n, 0.99), (unsigned long long)cow_bytes, (long long)st.st_size,
	       (unsigned long long)base_bytes);
	return 0;
}

/* The result of one command, for the session's output. */
typedef struct Result {
	int r;
	char *message;
	char *extra; /* "key=value ..." on success */
	double ms, end;
} Result;

static double session_start;

static int result_set(Result *res, int r, char *message, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static int result_set(Result *res, int r, char *message, const char *fmt, ...)
{
	va_list ap;

	res->r = r;
	res->message = message;
	if (r >= 0 && fmt) {
		va_start(ap, fmt);
		if (vasprintf(&res->extra, fmt, ap) < 0)
			res->extra = NULL;
		va_end(ap);
	}
	return r;
}

static void result_print(const char *prefix, Result *res)
{
	if (res->r >= 0)
		printf("%sok ms=%.1f end=%.1f%s%s\n", prefix, res->ms, res->end,
		       res->extra ? " " : "", res->extra ?: "");
	else
		printf("%sfail ms=%.1f end=%.1f errno=%d message=%s\n", prefix, res->ms, res->end,
		       -res->r, res->message ?: strerror(-res->r));
	fflush(stdout);
	free(res->message);
	free(res->extra);
	res->message = res->extra = NULL;
}

/* One disk command (argv[0] is its name). */
static int run_disk_command(Storage *s, int argc, char **argv, Result *res)
{
	_cleanup_free_ char *dev = NULL;
	char *err = NULL;
	int r;

	if (argc < 4)
		return result_set(res, -EINVAL, strdup("usage: CMD ID BASE COW ..."), NULL);
	StorageDiskSpec spec = {argv[1], argv[2], argv[3], 0};
	const char *cmd = argv[0];
	if (strcmp(cmd, "create") == 0 && argc == 5) {
		spec.cow_size = strtoull(argv[4], NULL, 0);
		r = storage_disk_create(s, &spec, &dev, &err);
		return result_set(res, r, err, "device=%s", dev);
	}
	if (strcmp(cmd, "restore") == 0 && argc == 4) {
		r = storage_disk_restore(s, &spec, &dev, &err);
		return result_set(res, r, err, "device=%s", dev);
	}
	if (strcmp(cmd, "remove") == 0 && argc == 4) {
		r = storage_disk_remove(s, &spec, &err);
		return result_set(res, r, err, NULL);
	}
	if (strcmp(cmd, "flatten") == 0 && argc == 5) {
		r = storage_disk_flatten(s, &spec, argv[4], &err);
		return result_set(res, r, err, NULL);
	}
	if (strcmp(cmd, "status") == 0 && (argc == 4 || argc == 5)) {
		StorageDiskStatus st = {};
		if (argc == 5)
			spec.cow_size = strtoull(argv[4], NULL, 0);
		r = storage_disk_status(s, &spec, &st, &err);
		return result_set(
			res, r, err, "used=%llu capacity=%llu size=%llu invalid=%d overflow=%d",
			(unsigned long long)st.used_bytes, (unsigned long long)st.capacity_bytes,
			(unsigned long long)st.size_bytes, st.invalid, st.overflow);
	}
	return result_set(res, -EINVAL, strdup("unknown command or wrong arguments"), NULL);
}

static int run_session_command(Storage *s, int argc, char **argv, Result *res)
{
	const char *cmd = argv[0];

	if (strcmp(cmd, "refs") == 0 && argc == 2) {
		int n = registry_refs(&s->registry, argv[1]);
		return result_set(res, n == -ENOENT ? 0 : n, NULL, "refs=%d", n == -ENOENT ? 0 : n);
	}
	if (strcmp(cmd, "held") == 0 && argc == 1)
		return result_set(res, 0, NULL, "disks=%u bases=%u", storage_disks_held(s),
				  registry_count(&s->registry));
	if (strcmp(cmd, "reclaim") == 0 && argc >= 2) {
		StorageReclaimResult rr = {};
		char *err = NULL;
		int r = storage_reclaim(s, argv[1], (const char *const *)argv + 2, (size_t)argc - 2,
					&rr, &err);
		return result_set(res, r, err, "dm_removed=%u loops_detached=%u failures=%u",
				  rr.dm_removed, rr.loops_detached, rr.failures);
	}
	if (strcmp(cmd, "exists") == 0 && argc == 2)
		return result_set(res, 0, NULL, "exists=%d", access(argv[1], F_OK) == 0);
	if (strcmp(cmd, "sleep") == 0 && argc == 2) {
		unsigned ms = (unsigned)atoi(argv[1]);
		struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
		nanosleep(&ts, NULL);
		return result_set(res, 0, NULL, NULL);
	}
	return run_disk_command(s, argc, argv, res);
}

static void timed(Storage *s, int argc, char **argv, Result *res)
{
	double t = now_ms();
	(void)run_session_command(s, argc, argv, res);
	res->ms = now_ms() - t;
	res->end = now_ms() - session_start;
}

typedef struct Background {
	pthread_t thread;
	Storage *storage;
	int argc;
	char *argv[16];
	char *line;
	Result res;
} Background;

static void *background_run(void *userdata)
{
	Background *b = userdata;
	timed(b->storage, b->argc, b->argv, &b->res);
	return NULL;
}

static int split(char *line, char **argv, int max)
{
	int argc = 0;
	for (char *save = NULL, *w = strtok_r(line, " \t\n", &save); w && argc < max;
	     w = strtok_r(NULL, " \t\n", &save))
		argv[argc++] = w;
	return argc;
}

static int cmd_session(Storage *s)
{
	Background *bg[64];
	size_t n_bg = 0, len = 0;
	char *line = NULL;

	session_start = now_ms();
	while (getline(&line, &len, stdin) > 0) {
		char *argv[16];
		Result res = {};

		if (strncmp(line, "bg ", 3) == 0 && n_bg < ELEMENTSOF(bg)) {
			Background *b = calloc(1, sizeof(*b));
			/* The thread gets its own copy: the line buffer is read into again. */
			if (!b || !(b->line = strdup(line + 3)))
				return 1;
			b->storage = s;
			b->argc = split(b->line, b->argv, (int)ELEMENTSOF(b->argv));
			if (b->argc == 0 ||
			    pthread_create(&b->thread, NULL, background_run, b) != 0)
				return 1;
			bg[n_bg++] = b;
			printf("ok started=%zu\n", n_bg);
			fflush(stdout);
			continue;
		}
		int argc = split(line, argv, (int)ELEMENTSOF(argv));
		if (argc == 0)
			continue;
		if (strcmp(argv[0], "wait") == 0) {
			for (size_t i = 0; i < n_bg; i++) {
				char prefix[32];
				pthread_join(bg[i]->thread, NULL);
				snprintf(prefix, sizeof(prefix), "bg %zu ", i + 1);
				result_print(prefix, &bg[i]->res);
				free(bg[i]->line);
				free(bg[i]);
			}
			printf("ok waited=%zu\n", n_bg);
			n_bg = 0;
			fflush(stdout);
			continue;
		}
		timed(s, argc, argv, &res);
		result_print("", &res);
	}
	free(line);
	for (size_t i = 0; i < n_bg; i++) {
		pthread_join(bg[i]->thread, NULL);
		free(bg[i]->line);
		free(bg[i]);
	}
	return 0;
}

static const char *before_dm_create_cmd;

static void before_dm_create(const char *name)
{
	setenv("EMBER_DM_NAME", name, 1);
	int r = system(before_dm_create_cmd);
	if (r != 0)
		fprintf(stderr, "storage-tool: --before-dm-create command exited with %d\n", r);
}

static void usage(void)
{
	fprintf(stderr, "see the comment at the top of test/storage/storage-tool.c\n");
	exit(2);
}

int main(int argc, char *argv[])
{
	static const struct option options[] = {
		{"backend", required_argument, NULL, 'b'},
		{"udev-timeout-ms", required_argument, NULL, 'u'},
		{"before-dm-create", required_argument, NULL, 'c'},
		{},
	};
	_cleanup_free_ char *dev = NULL;
	char *err = NULL;
	Storage *s = NULL;
	int c, r, ret = 0;

	while ((c = getopt_long(argc, argv, "+", options, NULL)) >= 0) {
		if (c == 'u') {
			storage_set_udev_timeout((unsigned)atoi(optarg));
			continue;
		}
		if (c == 'c') {
			before_dm_create_cmd = optarg;
			storage_test_before_dm_create = before_dm_create;
			continue;
		}
		if (c != 'b')
			usage();
		backend = storage_backend_from_string(optarg);
		if ((int)backend < 0)
			usage();
	}
	argc -= optind;
	argv += optind;
	if (argc < 1 || (argc < 2 && strcmp(argv[0], "session") != 0))
		usage();
	const char *cmd = argv[0];

	if (strcmp(cmd, "usage") == 0) {
		uint64_t bytes;
		struct stat st;
		if (stat(argv[1], &st) < 0)
			return fail("usage", -errno, NULL);
		r = S_ISDIR(st.st_mode) ? storage_usage_tree(argv[1], &bytes)
					: storage_usage_file(argv[1], &bytes);
		if (r < 0)
			return fail("usage", r, NULL);
		printf("%llu\n", (unsigned long long)bytes);
		return 0;
	}

	r = storage_new(backend, &s);
	if (r < 0)
		return fail("storage_new", r, NULL);

	if (strcmp(cmd, "session") == 0) {
		ret = cmd_session(s);
		goto out;
	}
	if (strcmp(cmd, "reclaim") == 0) {
		StorageReclaimResult res = {};
		r = storage_reclaim(s, argv[1], (const char *const *)argv + 2, (size_t)argc - 2,
				    &res, &err);
		printf("dm_removed=%u loops_detached=%u failures=%u\n", res.dm_removed,
		       res.loops_detached, res.failures);
		ret = r < 0 ? fail("reclaim", r, err) : 0;
		goto out;
	}
	if (strcmp(cmd, "multi") == 0 || strcmp(cmd, "cycles") == 0 || strcmp(cmd, "bench") == 0) {
		if (argc != 5 && argc != 6)
			usage();
		if (argc == 6)
			id_prefix = argv[5];
		int n = atoi(argv[1]);
		uint64_t size = strtoull(argv[4], NULL, 0);
		ret = strcmp(cmd, "multi") == 0    ? cmd_multi(s, n, argv[2], argv[3], size)
		      : strcmp(cmd, "cycles") == 0 ? cmd_cycles(s, n, argv[2], argv[3], size)
						   : cmd_bench(s, n, argv[2], argv[3], size);
		goto out;
	}

	if (argc < 4)
		usage();
	StorageDiskSpec spec = {argv[1], argv[2], argv[3], 0};
	if (strcmp(cmd, "create") == 0) {
		if (argc != 5)
			usage();
		spec.cow_size = strtoull(argv[4], NULL, 0);
		r = storage_disk_create(s, &spec, &dev, &err);
		if (r < 0)
			ret = fail("create", r, err);
		else
			printf("device=%s\n", dev);
	} else if (strcmp(cmd, "restore") == 0) {
		r = storage_disk_restore(s, &spec, &dev, &err);
		if (r < 0)
			ret = fail("restore", r, err);
		else
			printf("device=%s\n", dev);
	} else if (strcmp(cmd, "remove") == 0) {
		r = storage_disk_remove(s, &spec, &err);
		if (r < 0)
			ret = fail("remove", r, err);
	} else if (strcmp(cmd, "flatten") == 0) {
		if (argc != 5)
			usage();
		r = storage_disk_flatten(s, &spec, argv[4], &err);
		if (r < 0)
			ret = fail("flatten", r, err);
	} else if (strcmp(cmd, "status") == 0) {
		StorageDiskStatus st;
		if (argc == 5)
			spec.cow_size = strtoull(argv[4], NULL, 0);
		r = storage_disk_status(s, &spec, &st, &err);
		if (r < 0)
			ret = fail("status", r, err);
		else
			printf("used=%llu capacity=%llu size=%llu invalid=%d overflow=%d\n",
			       (unsigned long long)st.used_bytes,
			       (unsigned long long)st.capacity_bytes,
			       (unsigned long long)st.size_bytes, st.invalid, st.overflow);
	} else {
		usage();
	}
out:
	storage_free(s);
	return ret;
}
