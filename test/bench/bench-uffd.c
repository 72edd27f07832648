/* SPDX-License-Identifier: Apache-2.0 */
/*
 * How fast ember-uffd brings a snapshot's memory in, against the limits, in one run:
 *   raw      UFFDIO_COPY of every page into a registered region, no faults at all: from a
 *            mapping of the memory file with 4 KiB, 64 KiB and 2 MiB per ioctl, and in 2 MiB
 *            steps through a read buffer (what ember-uffd does): the ceiling of any handler
 *   access   the stand-in VMM reading every page once they are all present: what the VMM's
 *            own first access costs, which no handler can take away (on a VM with shadow
 *            page tables, a hypervisor exit per page)
 *   prefetch uffd_serve() in a thread of this process, the stand-in VMM touching every page
 *            (sequentially, randomly) while the prefetch sweep runs: "all present" is when the
 *            sweep finished (the server's own clock), "VMM done" when the VMM touched all
 *   demand   no prefetch, the VMM touching the first --demand-mib of memory, fault-around off
 *            (one page per fault) and on: per-fault latency and throughput
 *   replay   the same 10 % of pages touched in a random order (another order each time): on
 *            demand, and replaying the working set an earlier resume recorded
 *   file     Firecracker's File backend: the memory file mapped MAP_PRIVATE, every page touched
 *            (page-in from the page cache; a write makes a private copy)
 * The memory file is read once first, so that every case finds it in the page cache.
 *
 *   bench-uffd [--size-mib N] [--demand-mib N] [--runs N] [--hog N] [--fault-around N]
 *              [--dir DIR] [--only CASE]
 *
 * --runs repeats everything and prints min, median and max of each ratio; --hog N runs N
 * CPU-bound processes throughout (a busy node); --only runs the cases whose name contains CASE
 * (for a profile). Compare ratios within one run: these machines
 * are VMs, absolute figures vary. No timed window contains a sleep or a poll for the socket.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <limits.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/macro.h"
#include "fcctl/uffd.h"

#define PAGE     UINT64_C(4096)
#define KIB      UINT64_C(1024)
#define MIB      (UINT64_C(1) << 20)
#define GIB      (UINT64_C(1) << 30)

#define MAX_RUNS 100

static uint64_t mem_size = 1024 * MIB, demand_size = 128 * MIB;
static unsigned fault_around = UFFD_FAULT_AROUND_DEFAULT;
static char dir[PATH_MAX - 64], mem_path[PATH_MAX], sock_path[PATH_MAX], ws_path[PATH_MAX];
static uint64_t *order_seq, *order_rand, *order_dseq, *order_drand, *ws_set, *ws_order;
static uint64_t n_pages, n_demand, n_ws;
static unsigned errors;
static const char *only; /* --only: the cases whose name contains it */

typedef struct Row {
	const char *name;
	double ms, gibps;     /* the VMM's view: until it touched what it touches */
	double present_ms;    /* the server's view: until the sweep (or replay) was done */
	double present_gibps; /* memory size over present_ms */
	uint64_t faults, p50_ns, p99_ns, eexist, around;
	bool has_stats;
} Row;

static Row rows[32];
static size_t n_rows;

typedef struct Ratio {
	const char *name, *target;
	double v[MAX_RUNS];
	int n;
} Ratio;

static Ratio ratios[16];
static size_t n_ratios;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static _noreturn_ void die(const char *what)
{
	fprintf(stderr, "bench-uffd: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t page_word(uint64_t page)
{
	return 0xA5A5000000000000ull | page;
}

static Row *add_row(const char *name, uint64_t ns, uint64_t bytes)
{
	Row *r = &rows[n_rows++];

	*r = (Row){.name = name,
		   .ms = (double)ns / 1e6,
		   .gibps = (double)bytes / GIB / ((double)ns / 1e9)};
	fprintf(stderr, "  %-44s %8.1f ms\n", name, r->ms);
	return r;
}

static void row_stats(Row *r, const UffdStats *st, uint64_t present_ns)
{
	r->has_stats = true;
	r->faults = st->faults;
	r->p50_ns = st->p50_ns;
	r->p99_ns = st->p99_ns;
	r->eexist = st->eexist;
	r->around = st->around_pages;
	if (present_ns) {
		r->present_ms = (double)present_ns / 1e6;
		r->present_gibps = (double)mem_size / GIB / ((double)present_ns / 1e9);
	}
}

static void make_memfile(void)
{
	_cleanup_close_ int fd = -EBADF;
	_cleanup_free_ uint64_t *buf = malloc(MIB);

	if (!buf)
		die("malloc");
	fd = open(mem_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		die("cannot create the memory file");
	for (uint64_t off = 0; off < mem_size; off += MIB) {
		for (uint64_t w = 0; w < MIB / 8; w++)
			buf[w] = page_word((off + w * 8) / PAGE);
		if (pwrite(fd, buf, MIB, (off_t)off) != (ssize_t)MIB)
			die("cannot write the memory file");
	}
	/* read once: every case starts with the file in the page cache */
	for (uint64_t off = 0; off < mem_size; off += MIB)
		if (pread(fd, buf, MIB, (off_t)off) != (ssize_t)MIB)
			die("cannot read the memory file");
}

static const void *map_file(int flags, int prot)
{
	_cleanup_close_ int fd = open(mem_path, O_RDONLY | O_CLOEXEC);
	void *p;

	if (fd < 0)
		die("open");
	p = mmap(NULL, mem_size, prot, flags, fd, 0);
	if (p == MAP_FAILED)
		die("mmap");
	return p;
}

/* Untimed, before each case: the memory every case is about to allocate made warm. These
 * machines are VMs whose own memory their host backs lazily and takes back when idle: a first
 * write to such a "cold" page costs ~10 us instead of ~0.5 (README.md, "ember-uffd: where the
 * time goes"), and which case met cold pages used to be luck (the one right after a case that
 * freed memory got warm ones). Allocating, writing and freeing twice the guest's size leaves
 * warm pages at the head of the free lists for whichever case comes next. */
static void warm_free_memory(void)
{
	void *w = mmap(NULL, 2 * mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
		       0);

	if (w == MAP_FAILED)
		die("mmap");
	if (madvise(w, 2 * mem_size, MADV_POPULATE_WRITE) < 0)
		memset(w, 1, 2 * mem_size);
	munmap(w, 2 * mem_size);
}

typedef struct Guest {
	int uffd;
	uint8_t *mem;
} Guest;

/* What Firecracker sets up: a userfaultfd with REMOVE events, anonymous memory registered. */
static Guest guest_new(void)
{
	struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE};
	struct uffdio_register reg;
	Guest g;

	g.uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
	if (g.uffd < 0 && errno == EINVAL)
		g.uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (g.uffd < 0 || ioctl(g.uffd, UFFDIO_API, &api) < 0)
		die("userfaultfd");
	g.mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (g.mem == MAP_FAILED)
		die("mmap guest memory");
	reg = (struct uffdio_register){
		.range = {.start = (uintptr_t)g.mem, .len = mem_size},
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};
	if (ioctl(g.uffd, UFFDIO_REGISTER, &reg) < 0)
		die("UFFDIO_REGISTER");
	return g;
}

static void guest_free(Guest *g)
{
	close(g->uffd);
	munmap(g->mem, mem_size);
}

/* Reads one word of each page in the given order; counts pages that are not the file's. */
static void touch(const uint8_t *mem, const uint64_t *order, uint64_t n, bool write)
{
	uint64_t bad = 0;

	for (uint64_t k = 0; k < n; k++) {
		uint64_t p = order[k];
		volatile uint64_t *w = (volatile uint64_t *)(mem + p * PAGE + 8 * (p % 512));

		if (*w != page_word(p))
			bad++;
		if (write)
			*w = page_word(p);
	}
	if (bad) {
		fprintf(stderr, "bench-uffd: %" PRIu64 " pages with wrong content\n", bad);
		errors++;
	}
}

/* Every page copied with `chunk` bytes per UFFDIO_COPY, from a mapping of the file or through
 * a read buffer; then, timed apart, the VMM's first read of every page. */
static bool skip(const char *name)
{
	return only && !strstr(name, only);
}

static void bench_raw(const char *name, uint64_t chunk, bool via_read, const char *access_name)
{
	const uint8_t *src;
	_cleanup_close_ int fd = -EBADF;
	_cleanup_free_ uint8_t *buf = NULL;
	Guest g;
	uint64_t t0;

	if (skip(name))
		return;
	src = via_read ? NULL : map_file(MAP_SHARED, PROT_READ);
	fd = via_read ? open(mem_path, O_RDONLY | O_CLOEXEC) : -EBADF;
	buf = via_read ? aligned_alloc(PAGE, chunk) : NULL;
	warm_free_memory();
	g = guest_new();

	if (via_read && (fd < 0 || !buf))
		die("cannot open the memory file");
	if (buf)
		memset(buf, 0, chunk);
	t0 = now_ns();
	for (uint64_t off = 0; off < mem_size; off += chunk) {
		uint64_t len = chunk < mem_size - off ? chunk : mem_size - off;
		struct uffdio_copy c = {.dst = (uintptr_t)g.mem + off,
					.src = via_read ? (uintptr_t)buf : (uintptr_t)src + off,
					.len = len};

		if (via_read && pread(fd, buf, len, (off_t)off) != (ssize_t)len)
			die("pread");
		if (ioctl(g.uffd, UFFDIO_COPY, &c) < 0)
			die("UFFDIO_COPY");
	}
	add_row(name, now_ns() - t0, mem_size);
	t0 = now_ns();
	touch(g.mem, order_seq, n_pages, false); /* and the copies are right */
	if (access_name)
		add_row(access_name, now_ns() - t0, mem_size);
	guest_free(&g);
	if (src)
		munmap((void *)src, mem_size);
}

typedef struct Server {
	pthread_t thread;
	UffdOptions opt;
	UffdStats st;
	char *error;
	int r;
} Server;

static void *server_thread(void *userdata)
{
	Server *s = userdata;

	s->r = uffd_serve(sock_path, mem_path, &s->opt, &s->st, &s->error);
	return NULL;
}

/* Untimed: the server's socket appears once it listens. */
static void wait_for_socket(void)
{
	for (int i = 0; access(sock_path, F_OK) < 0; i++) {
		if (i > 10000)
			die("the server does not listen");
		(void)nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
	}
}

static int connect_and_send(const Guest *g)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int))];
	} control;
	struct iovec iov;
	struct msghdr msg = {.msg_iov = &iov,
			     .msg_iovlen = 1,
			     .msg_control = control.buf,
			     .msg_controllen = sizeof(control.buf)};
	json_object *array = json_object_new_array(), *o = json_object_new_object();
	struct cmsghdr *c;
	const char *text;
	int sock;

	json_object_object_add(o, "base_host_virt_addr", json_object_new_uint64((uintptr_t)g->mem));
	json_object_object_add(o, "size", json_object_new_uint64(mem_size));
	json_object_object_add(o, "offset", json_object_new_uint64(0));
	json_object_object_add(o, "page_size", json_object_new_uint64(PAGE));
	json_object_object_add(o, "page_size_kib", json_object_new_uint64(PAGE));
	json_object_array_add(array, o);
	text = json_object_to_json_string_ext(array, JSON_C_TO_STRING_PLAIN);

	if (strlen(sock_path) >= sizeof(sa.sun_path)) {
		errno = ENAMETOOLONG;
		die(sock_path);
	}
	memcpy(sa.sun_path, sock_path, strlen(sock_path) + 1);
	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0 || connect(sock, (const struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("connect");
	iov = (struct iovec){.iov_base = (void *)text, .iov_len = strlen(text)};
	memset(&control, 0, sizeof(control));
	c = CMSG_FIRSTHDR(&msg);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &g->uffd, sizeof(int));
	if (sendmsg(sock, &msg, MSG_NOSIGNAL) != (ssize_t)iov.iov_len)
		die("sendmsg");
	json_object_put(array);
	return sock;
}

/* One resume: the server in a thread, the VMM touching n pages in the given order. Returns
 * the VMM's time; *st gets the server's statistics. */
static uint64_t resume(const UffdOptions *opt, const uint64_t *order, uint64_t n, UffdStats *st)
{
	Server s = {.opt = *opt};
	Guest g = guest_new();
	uint64_t t0, t;
	int sock;

	s.opt.timeout_ms = 10000;
	warm_free_memory();
	if (pthread_create(&s.thread, NULL, server_thread, &s) != 0)
		die("pthread_create");
	wait_for_socket();
	t0 = now_ns();
	sock = connect_and_send(&g);
	touch(g.mem, order, n, false);
	t = now_ns() - t0;
	/* Untimed. With a prefetch, "all present" is the server's own figure, taken when its
	 * sweep ends: every page is there once the VMM touched them all, but the sweep may still
	 * be looking, and a VMM that goes away stops it before it can say. */
	if (opt->prefetch)
		(void)nanosleep(&(struct timespec){.tv_nsec = 200000000}, NULL);
	close(sock);
	pthread_join(s.thread, NULL);
	if (s.r < 0) {
		fprintf(stderr, "bench-uffd: server failed: %s\n", s.error);
		errors++;
	}
	free(s.error);
	*st = s.st;
	guest_free(&g);
	return t;
}

static void bench_uffd(const char *name, const UffdOptions *opt, const uint64_t *order, uint64_t n)
{
	UffdStats st;
	uint64_t t;
	Row *r;

	if (skip(name))
		return;
	t = resume(opt, order, n, &st);
	r = add_row(name, t, n * PAGE);

	row_stats(r, &st, opt->prefetch ? st.prefetch_ns : st.replay_ns);
	if (opt->prefetch && st.prefetch_ns == 0) {
		fprintf(stderr, "bench-uffd: %s: the prefetch did not finish\n", name);
		errors++;
	}
}

static void bench_file(const char *name, const uint64_t *order, bool write)
{
	const uint8_t *mem;
	uint64_t t0;

	if (skip(name))
		return;
	warm_free_memory();
	mem = map_file(MAP_PRIVATE, PROT_READ | PROT_WRITE);
	t0 = now_ns();

	touch(mem, order, n_pages, write);
	add_row(name, now_ns() - t0, mem_size);
	munmap((void *)mem, mem_size);
}

static void shuffle(uint64_t *a, uint64_t n, uint64_t seed)
{
	uint64_t s = seed;

	for (uint64_t i = n - 1; n > 1 && i > 0; i--) {
		uint64_t j, t;

		s ^= s << 13;
		s ^= s >> 7;
		s ^= s << 17;
		j = s % (i + 1);
		t = a[i];
		a[i] = a[j];
		a[j] = t;
	}
}

static const Row *find_row(const char *name)
{
	for (size_t i = 0; name && i < n_rows; i++)
		if (strcmp(rows[i].name, name) == 0)
			return &rows[i];
	return NULL;
}

static void ratio_add(const char *name, const char *target, double v)
{
	Ratio *r = NULL;

	for (size_t i = 0; i < n_ratios; i++)
		if (strcmp(ratios[i].name, name) == 0)
			r = &ratios[i];
	if (!r) {
		r = &ratios[n_ratios++];
		*r = (Ratio){.name = name, .target = target};
	}
	if (r->n < MAX_RUNS)
		r->v[r->n++] = v;
	printf("  %-72s %7.1f%%%s%s\n", name, 100.0 * v, target ? "  target " : "",
	       target ? target : "");
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static void print_table(void)
{
	printf("\n%-44s %9s %7s %9s %7s %7s %7s %8s %7s %7s\n", "case (page cache warm)", "VMM ms",
	       "GiB/s", "present", "GiB/s", "faults", "eexist", "around", "p50 us", "p99 us");
	for (size_t i = 0; i < n_rows; i++) {
		const Row *r = &rows[i];

		printf("%-44s %9.1f %7.2f", r->name, r->ms, r->gibps);
		if (r->present_ms > 0)
			printf(" %9.1f %7.2f", r->present_ms, r->present_gibps);
		else
			printf(" %9s %7s", "", "");
		if (r->has_stats)
			printf(" %7" PRIu64 " %7" PRIu64 " %8" PRIu64 " %7.1f %7.1f", r->faults,
			       r->eexist, r->around, (double)r->p50_ns / 1e3,
			       (double)r->p99_ns / 1e3);
		printf("\n");
	}
}

static const struct {
	const char *name, *target, *num, *den;
} time_ratios[] = {
	{"VMM first access alone / sequential + prefetch VMM done", NULL,
	 "VMM first access, all present", "sequential + prefetch"},
	{"demand sequential: throughput with fault-around / without", NULL,
	 "demand sequential, 1 page per fault", "demand sequential, fault-around"},
	{"demand random: throughput with fault-around / without", NULL,
	 "demand random, 1 page per fault", "demand random, fault-around"},
	{"10% working set: time on demand / time replayed", ">= 300%",
	 "10% working set, on demand (fault-around)", "10% working set, replayed"},
};

static void run_once(int run, int runs)
{
	const UffdOptions on_demand = {.fault_around = 1}, around = {.fault_around = fault_around},
			  prefetch = {.prefetch = true, .fault_around = fault_around},
			  record = {.fault_around = fault_around,
				    .working_set = ws_path,
				    .record_ms = 60000},
			  replay = {.fault_around = fault_around, .working_set = ws_path};
	const Row *best = NULL, *a, *b;
	UffdStats st;

	n_rows = 0;
	fprintf(stderr, "bench-uffd: run %d of %d\n", run + 1, runs);
	bench_raw("raw UFFDIO_COPY 4 KiB", 4 * KIB, false, NULL);
	bench_raw("raw UFFDIO_COPY 64 KiB", 64 * KIB, false, NULL);
	bench_raw("raw UFFDIO_COPY 2 MiB", 2 * MIB, false, NULL);
	bench_raw("raw UFFDIO_COPY 2 MiB via read buffer", 2 * MIB, true,
		  "VMM first access, all present");

	bench_uffd("sequential + prefetch", &prefetch, order_seq, n_pages);
	bench_uffd("random + prefetch", &prefetch, order_rand, n_pages);

	bench_uffd("demand sequential, 1 page per fault", &on_demand, order_dseq, n_demand);
	bench_uffd("demand sequential, fault-around", &around, order_dseq, n_demand);
	bench_uffd("demand random, 1 page per fault", &on_demand, order_drand, n_demand);
	bench_uffd("demand random, fault-around", &around, order_drand, n_demand);

	/* The working set: recorded by one resume (untimed), replayed by the next; each resume
	 * touches the same pages in an order of its own. */
	(void)unlink(ws_path);
	shuffle(ws_order, n_ws, 0xC0FFEEull + (uint64_t)run * 2);
	if (!skip("10% working set")) {
		(void)resume(&record, ws_order, n_ws, &st);
		if (st.recorded == 0) {
			fprintf(stderr, "bench-uffd: no working set was recorded\n");
			errors++;
		}
	}
	shuffle(ws_order, n_ws, 0xC0FFEEull + (uint64_t)run * 2 + 1);
	bench_uffd("10% working set, on demand (fault-around)", &around, ws_order, n_ws);
	bench_uffd("10% working set, replayed", &replay, ws_order, n_ws);
	(void)unlink(ws_path);

	bench_file("File backend sequential read", order_seq, false);
	bench_file("File backend random read", order_rand, false);
	bench_file("File backend sequential write (CoW)", order_seq, true);

	print_table();

	/* The raw limit is the best of the raw rows: comparing against a slower one would
	 * flatter ember-uffd. */
	for (size_t i = 0; i < n_rows; i++)
		if (strncmp(rows[i].name, "raw ", 4) == 0 && (!best || rows[i].gibps > best->gibps))
			best = &rows[i];
	if (best)
		printf("\nrun %d (best raw: %s, %.2f GiB/s):\n", run + 1, best->name, best->gibps);
	else
		printf("\nrun %d:\n", run + 1);
	a = find_row("sequential + prefetch");
	if (a && best && a->present_gibps > 0)
		ratio_add("sequential + prefetch, all present / best raw copy", ">= 70%",
			  a->present_gibps / best->gibps);
	a = find_row("random + prefetch");
	if (a && best && a->present_gibps > 0)
		ratio_add("random + prefetch, all present / best raw copy", NULL,
			  a->present_gibps / best->gibps);
	a = find_row("sequential + prefetch");
	b = find_row("File backend sequential read");
	if (a && b && a->present_ms > 0) {
		ratio_add("File sequential read time / sequential + prefetch all present time",
			  "> 100%", b->ms / a->present_ms);
		ratio_add("File sequential read time / sequential + prefetch VMM done time", NULL,
			  b->ms / a->ms);
	}
	/* Time of one row over time of another, both touching the same pages: for the demand rows
	 * it is their throughput with fault-around over without. */
	for (size_t i = 0; i < ELEMENTSOF(time_ratios); i++) {
		a = find_row(time_ratios[i].num);
		b = find_row(time_ratios[i].den);
		if (a && b)
			ratio_add(time_ratios[i].name, time_ratios[i].target, a->ms / b->ms);
	}
}

static void summary(int runs, int hog)
{
	printf("\nover %d run%s%s (min / median / max):\n", runs, runs == 1 ? "" : "s",
	       hog ? ", with CPU hogs running" : "");
	for (size_t i = 0; i < n_ratios; i++) {
		Ratio *r = &ratios[i];
		double sorted[MAX_RUNS];

		memcpy(sorted, r->v, (size_t)r->n * sizeof(double));
		qsort(sorted, (size_t)r->n, sizeof(double), cmp_double);
		printf("  %-72s %6.1f%% %6.1f%% %6.1f%%%s%s\n", r->name, 100.0 * sorted[0],
		       100.0 * (r->n % 2 ? sorted[r->n / 2]
					 : (sorted[r->n / 2 - 1] + sorted[r->n / 2]) / 2),
		       100.0 * sorted[r->n - 1], r->target ? "  target " : "",
		       r->target ? r->target : "");
	}
}

/* A CPU-bound process, ended with us. */
static pid_t start_hog(void)
{
	pid_t pid = fork();

	if (pid < 0)
		die("fork");
	if (pid == 0) {
		volatile uint64_t x = 0;

		(void)prctl(PR_SET_PDEATHSIG, SIGKILL);
		for (;;)
			x = x * 6364136223846793005ull + 1442695040888963407ull;
	}
	return pid;
}

static uint64_t parse_u64(const char *s, const char *what)
{
	char *end = NULL;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || !end || end == s || *end) {
		fprintf(stderr, "bench-uffd: invalid %s: %s\n", what, s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	static const struct option options[] = {
		{"size-mib", required_argument, NULL, 's'},
		{"demand-mib", required_argument, NULL, 'D'},
		{"runs", required_argument, NULL, 'r'},
		{"hog", required_argument, NULL, 'H'},
		{"fault-around", required_argument, NULL, 'f'},
		{"dir", required_argument, NULL, 'd'},
		{"only", required_argument, NULL, 'o'},
		{},
	};
	const char *base = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
	pid_t hogs[16];
	int c, runs = 1, n_hogs = 0;

	while ((c = getopt_long(argc, argv, "", options, NULL)) >= 0)
		switch (c) {
		case 's':
			mem_size = parse_u64(optarg, "--size-mib") * MIB;
			break;
		case 'D':
			demand_size = parse_u64(optarg, "--demand-mib") * MIB;
			break;
		case 'r':
			runs = (int)parse_u64(optarg, "--runs");
			break;
		case 'H':
			n_hogs = (int)parse_u64(optarg, "--hog");
			break;
		case 'f':
			fault_around = (unsigned)parse_u64(optarg, "--fault-around");
			break;
		case 'd':
			base = optarg;
			break;
		case 'o':
			only = optarg;
			break;
		default:
			fprintf(stderr,
				"usage: bench-uffd [--size-mib N] [--demand-mib N] [--runs N] "
				"[--hog N] [--fault-around N] [--dir DIR] [--only CASE]\n");
			return 2;
		}
	if (mem_size < 2 * MIB || mem_size % (2 * MIB) || demand_size == 0 ||
	    demand_size > mem_size || runs < 1 || runs > MAX_RUNS || n_hogs > 16 ||
	    fault_around < 1 || fault_around > UFFD_FAULT_AROUND_MAX ||
	    (fault_around & (fault_around - 1))) {
		fprintf(stderr, "bench-uffd: --size-mib must be a positive multiple of 2, "
				"--demand-mib at most that, --runs 1..100, --hog 0..16, "
				"--fault-around a power of two up to 512\n");
		return 2;
	}
	snprintf(dir, sizeof(dir), "%s/bench-uffd.XXXXXX", base);
	if (!mkdtemp(dir))
		die("mkdtemp");
	snprintf(mem_path, sizeof(mem_path), "%s/mem", dir);
	snprintf(sock_path, sizeof(sock_path), "%s/uffd.sock", dir);
	snprintf(ws_path, sizeof(ws_path), "%s/mem.ws", dir);

	n_pages = mem_size / PAGE;
	n_demand = demand_size / PAGE;
	n_ws = n_pages / 10;
	order_seq = malloc(n_pages * sizeof(uint64_t));
	order_rand = malloc(n_pages * sizeof(uint64_t));
	order_dseq = malloc(n_demand * sizeof(uint64_t));
	order_drand = malloc(n_demand * sizeof(uint64_t));
	ws_set = malloc(n_pages * sizeof(uint64_t));
	ws_order = malloc(n_ws * sizeof(uint64_t));
	if (!order_seq || !order_rand || !order_dseq || !order_drand || !ws_set || !ws_order)
		die("malloc");
	for (uint64_t i = 0; i < n_pages; i++)
		order_seq[i] = order_rand[i] = ws_set[i] = i;
	shuffle(order_rand, n_pages, 0x9E3779B97F4A7C15ull);
	for (uint64_t i = 0; i < n_demand; i++)
		order_dseq[i] = order_drand[i] = i;
	shuffle(order_drand, n_demand, 0x5DEECE66Dull);
	/* the working set: the first tenth of a shuffle, the same pages in every resume */
	shuffle(ws_set, n_pages, 0x2545F4914F6CDD1Dull);
	memcpy(ws_order, ws_set, n_ws * sizeof(uint64_t));

	fprintf(stderr,
		"bench-uffd: %" PRIu64 " MiB guest, memory file %s (read once first: "
		"every case finds it in the page cache), fault-around %u pages, %d CPU hog%s\n",
		mem_size / MIB, mem_path, fault_around, n_hogs, n_hogs == 1 ? "" : "s");
	make_memfile();
	for (int i = 0; i < n_hogs; i++)
		hogs[i] = start_hog();

	for (int run = 0; run < runs; run++)
		run_once(run, runs);
	summary(runs, n_hogs);

	for (int i = 0; i < n_hogs; i++) {
		(void)kill(hogs[i], SIGKILL);
		(void)waitpid(hogs[i], NULL, 0);
	}
	unlink(mem_path);
	rmdir(dir);
	free(order_seq);
	free(order_rand);
	free(order_dseq);
	free(order_drand);
	free(ws_set);
	free(ws_order);
	return errors ? 1 : 0;
}
