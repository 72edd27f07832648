/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ember-uffd's logic (DESIGN.md §7, notes/firecracker.md "UFFD handshake").
 *
 * Threads. The caller's thread accepts Firecracker, receives the handshake and then serves
 * faults and events. With prefetch or a working set to replay, copier threads (two where
 * there are two CPUs) copy pages in large batches while the first keeps serving faults on its
 * own: a fault never waits for a copier's queue, at most for the copies in flight (see the
 * copy lock).
 *
 * The copy lock. A REMOVE event is read by the fault thread; reading it releases the thread
 * that called madvise(), which then zaps the range. If a copier decided to copy a range (it
 * was not removed yet) and its UFFDIO_COPY lands after that zap, stale file content would sit
 * in pages the guest gave away, and nothing outside Firecracker's mm can take it back. So a
 * copier holds the lock (shared with the other copier) from checking the removed bitmap until
 * its copy returns, and the fault thread holds it (exclusively) around every read() of the
 * userfaultfd and the bitmap update that follows. The fault thread's own copies need no lock:
 * they are ordered with its reads.
 *
 * Memory. Nothing is allocated per fault: faults go through a fixed ring, latencies into a
 * fixed log-scale histogram, removed pages into one bitmap per region sized at the handshake.
 */
#include "uffd.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <limits.h>
#include <linux/futex.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/macro.h"
#include "fcctl-internal.h"

#define PAGE_4K (4096ull)
#define PAGE_2M (2ull << 20)
/* 64 regions of about 150 bytes each fit many times over; anything longer is not Firecracker. */
#define HANDSHAKE_MAX     (64u << 10)
#define HANDSHAKE_MAX_FDS 16
/* uffd_msg read per read(): one syscall for a burst of faults from several vCPUs. */
#define READ_BATCH 64
/* Pending faults. A faulting thread blocks until served, so distinct pending pages are bounded
 * by the threads touching guest memory; duplicates are merged on entry. */
#define QUEUE_SIZE 256
/* One prefetch UFFDIO_COPY: large enough for the copy rate of big batches (notes/test-machines:
 * 2 MiB ~3.9 GiB/s against 64 KiB ~2.7 GiB/s), small enough that a fault waiting for copy_lock
 * waits a fraction of a millisecond. */
#define PREFETCH_CHUNK (2ull << 20)
/* Latency histogram: 4 buckets per power of two of nanoseconds (±12%), up to ~8 s. */
#define HIST_SUB_SHIFT 2
#define HIST_SUB       (1u << HIST_SUB_SHIFT)
#define HIST_BUCKETS   128
/* A page that faults again and again although UFFDIO_COPY says it is present (EEXIST) is a
 * livelock, not a race: seen with hugetlb memory mapped MAP_NORESERVE (as Firecracker maps it)
 * when the huge page pool is empty. Tracked per page in a small table. */
#define STUCK_SLOTS 64
#define STUCK_MAX   1000
/* Firecracker's mm goes away (UFFDIO_COPY: ESRCH) a little before its pidfd says it exited. */
#define EXIT_GRACE_MS 1000

/* Linux 6.5: a pidfd for the socket's peer, taken at connect(): no pid reuse race. */
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

static void json_object_putp(json_object **p)
{
	if (*p)
		json_object_put(*p);
}

static void json_tokener_freep(json_tokener **p)
{
	if (*p)
		json_tokener_free(*p);
}

static void uffd_error_internal(char **ret_error, int r, const char *format, ...) _printf_(3, 4);
static void uffd_error_internal(char **ret_error, int r, const char *format, ...)
{
	char *msg = NULL;
	va_list ap;

	errno = r < 0 ? -r : r; /* for %m */
	va_start(ap, format);
	if (vasprintf(&msg, format, ap) < 0)
		msg = NULL;
	va_end(ap);
	log_debug("uffd: %s", msg ? msg : "(out of memory)");
	if (ret_error)
		*ret_error = msg;
	else
		free(msg);
}

/* Sets *ret_error (when wanted) and evaluates to r. A macro, so that the static analyzer sees
 * the value returned: it does not follow variadic calls. */
#define uffd_error(ret_error, r, ...)                                                              \
	({                                                                                         \
		int _r_ = (r);                                                                     \
		uffd_error_internal(ret_error, _r_, __VA_ARGS__);                                  \
		_r_;                                                                               \
	})

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------------------------------ */
/* handshake */

static void close_fds(const int *fds, size_t n_fds)
{
	for (size_t i = 0; fds && i < n_fds; i++)
		safe_close(fds[i]);
}

static int region_get_u64(json_object *o, size_t i, const char *key, uint64_t *ret,
			  char **ret_error)
{
	json_object *v = NULL;

	if (!json_object_object_get_ex(o, key, &v))
		return uffd_error(ret_error, -EINVAL, "region %zu: \"%s\" is missing", i, key);
	if (!json_object_is_type(v, json_type_int))
		return uffd_error(ret_error, -EINVAL, "region %zu: \"%s\" is not an integer", i,
				  key);
	if (json_object_get_int64(v) < 0)
		return uffd_error(ret_error, -EINVAL, "region %zu: \"%s\" is negative", i, key);
	/* json-c clamps what exceeds 64 bits to UINT64_MAX, which no check below accepts. */
	*ret = json_object_get_uint64(v);
	return 0;
}

static bool ranges_overlap(uint64_t a, uint64_t a_len, uint64_t b, uint64_t b_len)
{
	return a < b + b_len && b < a + a_len;
}

static int region_parse(json_object *o, size_t i, UffdRegion *ret, char **ret_error)
{
	uint64_t page_size_kib;
	UffdRegion reg;
	int r;

	if (!json_object_is_type(o, json_type_object))
		return uffd_error(ret_error, -EINVAL, "region %zu is not a JSON object", i);
	r = region_get_u64(o, i, "base_host_virt_addr", &reg.base_host_virt_addr, ret_error);
	if (r < 0)
		return r;
	r = region_get_u64(o, i, "size", &reg.size, ret_error);
	if (r < 0)
		return r;
	r = region_get_u64(o, i, "offset", &reg.offset, ret_error);
	if (r < 0)
		return r;
	r = region_get_u64(o, i, "page_size", &reg.page_size, ret_error);
	if (r < 0)
		return r;
	r = region_get_u64(o, i, "page_size_kib", &page_size_kib, ret_error);
	if (r < 0)
		return r;

	if (reg.page_size != PAGE_4K && reg.page_size != PAGE_2M)
		return uffd_error(ret_error, -EINVAL,
				  "region %zu: page_size %" PRIu64 " is neither 4096 nor 2097152",
				  i, reg.page_size);
	/* In bytes despite its name: Firecracker sends the same number twice. */
	if (page_size_kib != reg.page_size)
		return uffd_error(ret_error, -EINVAL,
				  "region %zu: page_size_kib %" PRIu64
				  " differs from page_size %" PRIu64,
				  i, page_size_kib, reg.page_size);
	if (reg.size == 0)
		return uffd_error(ret_error, -EINVAL, "region %zu: size is zero", i);
	if (reg.base_host_virt_addr % reg.page_size || reg.size % reg.page_size ||
	    reg.offset % reg.page_size)
		return uffd_error(ret_error, -EINVAL,
				  "region %zu: base_host_virt_addr %#" PRIx64 ", size %" PRIu64
				  " or offset %" PRIu64
				  " is not a multiple of the page size %" PRIu64,
				  i, reg.base_host_virt_addr, reg.size, reg.offset, reg.page_size);
	if (reg.base_host_virt_addr > UINT64_MAX - reg.size)
		return uffd_error(ret_error, -EINVAL,
				  "region %zu: base_host_virt_addr + size overflows", i);
	if (reg.offset > (uint64_t)INT64_MAX - reg.size)
		return uffd_error(ret_error, -EINVAL,
				  "region %zu: offset + size is beyond any file size", i);
	*ret = reg;
	return 0;
}

int uffd_handshake_parse(const char *data, size_t len, const int *fds, size_t n_fds,
			 UffdHandshake *ret, char **ret_error)
{
	_cleanup_(json_tokener_freep) json_tokener *tok = NULL;
	_cleanup_(json_object_putp) json_object *array = NULL;
	_cleanup_close_ int uffd = -EBADF;
	UffdHandshake h = {.uffd = -EBADF};
	enum json_tokener_error jerr;
	size_t end, n;
	int r;

	/* Every fd handed in is ours from here: kept on success, closed on any refusal, so that a
	 * caller never has to work out which ones are left. */
	if (n_fds != 1 || !fds) {
		close_fds(fds, n_fds);
		return uffd_error(
			ret_error, -EBADMSG,
			"the handshake carries %zu file descriptors, expected exactly one "
			"(the userfaultfd)",
			n_fds);
	}
	uffd = fds[0];
	if (uffd < 0)
		return uffd_error(ret_error, -EBADF, "the handshake's file descriptor is invalid");
	if (!ret)
		return uffd_error(ret_error, -EINVAL, "no place for the handshake");
	if (!data || len == 0)
		return uffd_error(ret_error, -EBADMSG, "the handshake is empty");
	if (len > INT_MAX)
		return uffd_error(ret_error, -EMSGSIZE, "the handshake is too long (%zu bytes)",
				  len);
	if (memchr(data, '\0', len))
		return uffd_error(ret_error, -EBADMSG, "the handshake contains a NUL byte");

	tok = json_tokener_new();
	if (!tok)
		return uffd_error(ret_error, -ENOMEM, "cannot parse the handshake: %m");
	array = json_tokener_parse_ex(tok, data, (int)len);
	jerr = json_tokener_get_error(tok);
	if (!array && jerr == json_tokener_success) /* the document is JSON null */
		return uffd_error(ret_error, -EBADMSG, "the handshake is not a JSON array");
	if (jerr == json_tokener_continue)
		return uffd_error(ret_error, -EBADMSG, "the handshake is incomplete JSON");
	if (jerr != json_tokener_success)
		return uffd_error(ret_error, -EBADMSG, "the handshake is not valid JSON: %s",
				  json_tokener_error_desc(jerr));
	for (end = json_tokener_get_parse_end(tok); end < len; end++)
		if (!strchr(" \t\r\n", data[end]))
			return uffd_error(
				ret_error, -EBADMSG,
				"the handshake has data after the JSON array (offset %zu)", end);
	if (!json_object_is_type(array, json_type_array))
		return uffd_error(ret_error, -EBADMSG, "the handshake is not a JSON array");
	n = json_object_array_length(array);
	if (n == 0)
		return uffd_error(ret_error, -EBADMSG, "the handshake describes no memory region");
	if (n > UFFD_MAX_REGIONS)
		return uffd_error(
			ret_error, -EBADMSG,
			"the handshake describes %zu memory regions, at most %d are allowed", n,
			UFFD_MAX_REGIONS);

	for (size_t i = 0; i < n; i++) {
		UffdRegion *reg = &h.regions[i];

		r = region_parse(json_object_array_get_idx(array, i), i, reg, ret_error);
		if (r < 0)
			return r == -EINVAL ? -EBADMSG : r;
		for (size_t j = 0; j < i; j++) {
			const UffdRegion *o = &h.regions[j];

			if (ranges_overlap(reg->base_host_virt_addr, reg->size,
					   o->base_host_virt_addr, o->size))
				return uffd_error(ret_error, -EBADMSG,
						  "regions %zu and %zu overlap in memory", j, i);
			/* Harmless to serve, but no memory file Firecracker writes has it. */
			if (ranges_overlap(reg->offset, reg->size, o->offset, o->size))
				return uffd_error(ret_error, -EBADMSG,
						  "regions %zu and %zu overlap in the memory file",
						  j, i);
		}
	}
	h.n_regions = n;
	h.uffd = TAKE_FD(uffd);
	*ret = h;
	return 0;
}

int uffd_handshake_recv(int sock, UffdHandshake *ret, char **ret_error)
{
	_cleanup_free_ char *buf = NULL;
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int) * HANDSHAKE_MAX_FDS)];
	} control;
	struct iovec iov;
	struct msghdr msg = {
		.msg_iov = &iov,
		.msg_iovlen = 1,
		.msg_control = control.buf,
		.msg_controllen = sizeof(control.buf),
	};
	int fds[HANDSHAKE_MAX_FDS];
	size_t n_fds = 0;
	ssize_t n;

	buf = malloc(HANDSHAKE_MAX);
	if (!buf)
		return uffd_error(ret_error, -ENOMEM, "cannot receive the handshake: %m");
	iov = (struct iovec){.iov_base = buf, .iov_len = HANDSHAKE_MAX};
	memset(&control, 0, sizeof(control));

	/* Firecracker sends the whole handshake with one sendmsg() and nothing after it. */
	do
		n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return uffd_error(ret_error, -errno, "cannot receive the handshake: %m");

	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		size_t k;

		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < k; i++) {
			int fd;

			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			if (n_fds < ELEMENTSOF(fds))
				fds[n_fds++] = fd;
			else
				safe_close(fd);
		}
	}
	if (msg.msg_flags & MSG_CTRUNC) {
		/* The kernel dropped (and closed) what did not fit: far more than one fd. */
		close_fds(fds, n_fds);
		return uffd_error(ret_error, -EBADMSG,
				  "the handshake carries more than %d file descriptors",
				  HANDSHAKE_MAX_FDS);
	}
	if (n == 0 && n_fds == 0)
		return uffd_error(ret_error, -ECONNRESET,
				  "the peer closed the connection before sending the handshake");
	if ((size_t)n >= HANDSHAKE_MAX) {
		close_fds(fds, n_fds);
		return uffd_error(ret_error, -EMSGSIZE,
				  "the handshake is too long (at least %u bytes)", HANDSHAKE_MAX);
	}
	return uffd_handshake_parse(buf, (size_t)n, fds, n_fds, ret, ret_error);
}

/* ------------------------------------------------------------------------------------------ */
/* latency histogram */

typedef struct Histogram {
	uint64_t count[HIST_BUCKETS];
	uint64_t n, max;
} Histogram;

static unsigned hist_bucket(uint64_t v)
{
	unsigned e, b;

	if (v < HIST_SUB)
		return (unsigned)v;
	e = 63u - (unsigned)__builtin_clzll(v); /* >= HIST_SUB_SHIFT */
	b = (e - HIST_SUB_SHIFT + 1) * HIST_SUB +
	    (unsigned)((v >> (e - HIST_SUB_SHIFT)) & (HIST_SUB - 1));
	return b < HIST_BUCKETS ? b : HIST_BUCKETS - 1;
}

static uint64_t hist_bucket_max(unsigned b)
{
	unsigned e, sub;

	if (b < HIST_SUB)
		return b;
	e = b / HIST_SUB + HIST_SUB_SHIFT - 1;
	sub = b % HIST_SUB;
	return ((uint64_t)(HIST_SUB + sub + 1) << (e - HIST_SUB_SHIFT)) - 1;
}

static void hist_add(Histogram *h, uint64_t v)
{
	h->count[hist_bucket(v)]++;
	h->n++;
	if (v > h->max)
		h->max = v;
}

/* The upper bound of the bucket holding the value of rank ceil(n * permille / 1000). */
static uint64_t hist_percentile(const Histogram *h, unsigned permille)
{
	uint64_t rank, seen = 0;

	if (h->n == 0)
		return 0;
	rank = (h->n * permille + 999) / 1000;
	if (rank == 0)
		rank = 1;
	for (unsigned b = 0; b < HIST_BUCKETS; b++) {
		seen += h->count[b];
		if (seen >= rank) {
			uint64_t v = hist_bucket_max(b);

			return v < h->max ? v : h->max;
		}
	}
	return h->max;
}

/* ------------------------------------------------------------------------------------------ */
/* the server */

typedef struct Fault {
	uint64_t addr;
	uint64_t t_read; /* ns, when read() returned it */
} Fault;

/* Copiers: more than one only to get more of the CPU on a busy machine (a copier shares its
 * CPU with the vCPUs and everything else; two of them get twice the share). */
#define COPIERS_MAX 2

struct Server;
typedef struct Copier {
	struct Server *s;
	unsigned k; /* this one's share: sweep chunks and replay runs k, k + n, k + 2n, … */
	pthread_t thread;
	uint8_t *buf;   /* PREFETCH_CHUNK, while it runs: an ember-uffd lives as long as its VM */
	bool replaying; /* counts what it copies as replay */
	/* its own counters, added to the server's once it is joined */
	uint64_t pages, bytes, eexist, eagain, replay_pages;
} Copier;

/* Ordered by size for clang-tidy's padding check: 8-byte fields and arrays of them, then
 * 4-byte ones, then flags. */
typedef struct Server {
	UffdOptions opt;
	UffdHandshake hs; /* hs.uffd is ours once received */
	struct stat mem_st;
	UffdStats st;
	Histogram hist;
	Fault queue[QUEUE_SIZE];
	struct {
		uint64_t page, count;
	} stuck[STUCK_SLOTS];
	size_t q_head, q_len;
	uint64_t fault_bytes; /* copied by faults (st.bytes_copied counts prefetch too) */
	uint64_t t_handshake; /* ns */
	char *socket_path;    /* to unlink, until Firecracker has connected */
	char *error;
	/* Copies come from the memory file through pread() into a buffer (this one, and each
	 * copier's own), not from a mapping of it: a fresh mapping costs a page fault per 16
	 * pages and, on a VM, a hypervisor exit per page on first access, three times the copy
	 * itself (README.md, "ember-uffd: where the time goes"). */
	uint8_t *fault_buf; /* the fault thread's: a fault-around block or a 2 MiB page */
	size_t fault_buf_len;
	const uint8_t *zero_huge; /* a zero 2 MiB source for removed huge pages */
	/* One bit per page. removed: written by the fault thread under the copy lock. present: set
	 * by whoever copied the page, read by both to skip what is there (a hint that saves EEXIST
	 * round trips; the kernel's EEXIST stays the truth). Both accessed atomically. */
	uint64_t *removed[UFFD_MAX_REGIONS];
	uint64_t *present[UFFD_MAX_REGIONS];

	/* working set: replayed by the copiers when loaded, else recorded by the fault thread */
	UffdWorkingSet ws;
	uint32_t *rec;
	uint64_t rec_deadline; /* ns */

	/* the copiers: replay, then prefetch */
	Copier copiers[COPIERS_MAX];
	/* Their buffers, allocated and touched while Firecracker is not connected yet: a first
	 * touch costs a fault per page, which would otherwise compete with the guest's first
	 * faults (seen: a first fault served after 10 ms). Each copier takes its own. */
	uint8_t *copy_bufs[COPIERS_MAX];
	_Atomic uint64_t replay_ns, prefetch_ns;
	char *prefetch_msg;

	int listen_fd, sock, pidfd, mem_fd, efd;
	pid_t peer;
	unsigned fault_around; /* pages, a power of two; 1: off */
	uint32_t rec_n, rec_page_size;
	unsigned n_copiers;
	atomic_uint copiers_in;     /* copiers inside the copy lock */
	atomic_uint want_read;      /* 1: the fault thread wants (or holds) the copy lock */
	atomic_uint copiers_asleep; /* copiers waiting (futex) for want_read to go 0 */
	atomic_uint replay_left, sweep_left; /* copiers not done with their share yet */
	int prefetch_error;

	bool replay, recording, prefetch_deferred;
	atomic_bool stop, failed; /* failed: the first failure's message is being written */
	atomic_bool sweep_cut;    /* a copier stopped before its share was done */
	atomic_bool replay_cut;   /* the same for the replay */
	bool prefetching;
} Server;

static void live_store(uint64_t *field, uint64_t value)
{
	__atomic_store_n(field, value, __ATOMIC_RELAXED);
}

int uffd_live_stats_create(const char *path, UffdLiveStats **ret)
{
	_cleanup_close_ int fd = -EBADF;
	UffdLiveStats *live;

	(void)unlink(path);
	fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0)
		return -errno;
	if (ftruncate(fd, sizeof(UffdLiveStats)) < 0)
		return -errno;
	live = mmap(NULL, sizeof(UffdLiveStats), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (live == MAP_FAILED)
		return -errno;
	live->size = sizeof(UffdLiveStats);
	__atomic_store_n(&live->magic, UFFD_LIVE_MAGIC, __ATOMIC_RELEASE);
	*ret = live;
	return 0;
}

void uffd_live_stats_unmap(UffdLiveStats *live)
{
	if (live)
		(void)munmap(live, sizeof(*live));
}

static void server_stop_prefetch(Server *s)
{
	if (!s->prefetching)
		return;
	atomic_store(&s->stop, true);
	for (unsigned k = 0; k < s->n_copiers; k++) {
		Copier *c = &s->copiers[k];

		pthread_join(c->thread, NULL);
		s->st.pages_copied += c->pages;
		s->st.bytes_copied += c->bytes;
		s->st.eexist += c->eexist;
		s->st.eagain += c->eagain;
		s->st.replay_pages += c->replay_pages;
	}
	s->prefetching = false;
	s->st.replay_ns = atomic_load(&s->replay_ns);
	s->st.prefetch_ns = atomic_load(&s->prefetch_ns);
}

static void server_free(Server *s)
{
	server_stop_prefetch(s);
	if (s->socket_path) {
		(void)unlink(s->socket_path);
		free(s->socket_path);
	}
	safe_close(s->listen_fd);
	safe_close(s->sock);
	safe_close(s->pidfd);
	safe_close(s->mem_fd);
	safe_close(s->efd);
	safe_close(s->hs.uffd);
	free(s->fault_buf);
	if (s->zero_huge)
		(void)munmap((void *)s->zero_huge, PAGE_2M);
	for (size_t i = 0; i < ELEMENTSOF(s->removed); i++) {
		free(s->removed[i]);
		free(s->present[i]);
	}
	uffd_working_set_done(&s->ws);
	free(s->rec);
	for (size_t k = 0; k < ELEMENTSOF(s->copy_bufs); k++)
		free(s->copy_bufs[k]);
	free(s->error);
	free(s->prefetch_msg);
	free(s);
}
DEFINE_POINTER_CLEANUP(Server, server_free)

static int server_new(const UffdOptions *opt, Server **ret)
{
	Server *s = calloc(1, sizeof(*s));

	if (!s)
		return -ENOMEM;
	s->listen_fd = s->sock = s->pidfd = s->mem_fd = s->efd = s->hs.uffd = -EBADF;
	s->opt = opt ? *opt : (UffdOptions){.prefetch = false, .timeout_ms = -1};
	s->fault_around = s->opt.fault_around > 1 ? s->opt.fault_around : 1;
	atomic_init(&s->copiers_in, 0);
	atomic_init(&s->want_read, 0);
	atomic_init(&s->copiers_asleep, 0);
	atomic_init(&s->failed, false);
	atomic_init(&s->stop, false);
	*ret = s;
	return 0;
}

static void server_set_reason(Server *s, const char *reason)
{
	if (s->st.end_reason[0] == '\0')
		snprintf(s->st.end_reason, sizeof(s->st.end_reason), "%s", reason);
}

/* Whether Firecracker has exited, waiting up to timeout_ms for it. */
static bool server_peer_exited(Server *s, int timeout_ms)
{
	struct pollfd p = {.fd = s->pidfd, .events = POLLIN};
	int r;

	if (s->pidfd < 0) {
		/* No pidfd: the socket closes when the process does. */
		if (s->sock < 0)
			return false;
		p = (struct pollfd){.fd = s->sock, .events = POLLRDHUP};
	}
	do
		r = poll(&p, 1, timeout_ms);
	while (r < 0 && errno == EINTR);
	return r > 0;
}

/* SIGKILL for Firecracker: a guest whose memory cannot be served would otherwise hang forever
 * on its next fault. Appends what happened to *msg. */
static void server_kill_peer(Server *s, char **msg)
{
	const char *what;
	char *m = NULL;
	int r = 0;

	if (s->pidfd < 0 && s->peer <= 0)
		return;
	if (s->peer == getpid())
		/* A test drives us from its own process: never kill ourselves. */
		what = "not killing the peer: it is this process";
	else if (server_peer_exited(s, 0))
		what = "firecracker had already exited";
	else {
		if (s->pidfd >= 0)
			r = (int)syscall(SYS_pidfd_send_signal, s->pidfd, SIGKILL, NULL, 0);
		else
			/* Only without pidfd support: the pid could in theory have been reused. */
			r = kill(s->peer, SIGKILL);
		if (r < 0 && errno == ESRCH)
			what = "firecracker had already exited";
		else if (r < 0)
			what = "cannot kill firecracker";
		else
			what = "killed firecracker";
	}
	if (asprintf(&m, "%s; %s (pid %d)", *msg, what, (int)s->peer) >= 0) {
		free(*msg);
		*msg = m;
	}
	log_debug("uffd: %s (pid %d)", what, (int)s->peer);
}

static void server_fail_internal(Server *s, bool kill_peer, const char *reason, int r,
				 const char *format, ...) _printf_(5, 6);
static void server_fail_internal(Server *s, bool kill_peer, const char *reason, int r,
				 const char *format, ...)
{
	char *msg = NULL;
	va_list ap;

	if (s->error) /* the first failure is the one to report */
		return;
	errno = r < 0 ? -r : r; /* for %m */
	va_start(ap, format);
	if (vasprintf(&msg, format, ap) < 0)
		msg = NULL;
	va_end(ap);
	if (!msg)
		msg = strdup(reason);
	if (kill_peer && msg)
		server_kill_peer(s, &msg);
	log_debug("uffd: %s", msg ? msg : reason);
	server_set_reason(s, reason);
	s->error = msg;
}

/* Records the failure (killing Firecracker when kill_peer) and evaluates to r (< 0). */
#define server_fail(s, kill_peer, reason, r, ...)                                                  \
	({                                                                                         \
		int _r_ = (r);                                                                     \
		server_fail_internal(s, kill_peer, reason, _r_, __VA_ARGS__);                      \
		_r_;                                                                               \
	})

static int server_open_memory(Server *s, const char *mem_path)
{
	struct stat st;

	s->mem_fd = open(mem_path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (s->mem_fd < 0)
		return server_fail(s, false, "memory file missing", -errno,
				   "cannot open memory file %s: %m", mem_path);
	if (fstat(s->mem_fd, &st) < 0)
		return server_fail(s, false, "memory file unreadable", -errno,
				   "cannot stat memory file %s: %m", mem_path);
	if (!S_ISREG(st.st_mode))
		return server_fail(s, false, "memory file unreadable", -EINVAL,
				   "memory file %s is not a regular file", mem_path);
	return 0;
}

/* The socket appears under its name only once it listens (bind to a private name, listen,
 * then link it into place): whoever waits for the path may send /snapshot/load at once, and
 * Firecracker's connect() cannot be refused. */
static int server_listen(Server *s, const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	_cleanup_free_ char *tmp = NULL;
	int r;

	if (strlen(path) >= sizeof(sa.sun_path))
		return server_fail(s, false, "bad socket path", -ENAMETOOLONG,
				   "socket path %s is too long", path);
	if (asprintf(&tmp, "%s.%d", path, (int)getpid()) < 0)
		return server_fail(s, false, "out of memory", -ENOMEM, "out of memory");
	if (strlen(tmp) >= sizeof(sa.sun_path))
		return server_fail(s, false, "bad socket path", -ENAMETOOLONG,
				   "socket path %s is too long (its temporary name %s must fit in "
				   "%zu bytes)",
				   path, tmp, sizeof(sa.sun_path) - 1);
	memcpy(sa.sun_path, tmp, strlen(tmp) + 1);

	s->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s->listen_fd < 0)
		return server_fail(s, false, "socket error", -errno, "cannot create a socket: %m");
	(void)unlink(tmp); /* a leftover of a dead process that had our pid */
	if (bind(s->listen_fd, (const struct sockaddr *)&sa, sizeof(sa)) < 0)
		return server_fail(s, false, "socket error", -errno, "cannot bind %s: %m", tmp);
	if (listen(s->listen_fd, 1) < 0) {
		r = -errno;
		(void)unlink(tmp);
		return server_fail(s, false, "socket error", r, "cannot listen on %s: %m", tmp);
	}
	/* link() refuses an existing target: an old socket is never replaced. */
	r = link(tmp, path) < 0 ? -errno : 0;
	(void)unlink(tmp);
	if (r == -EEXIST)
		return server_fail(s, false, "socket path exists", r,
				   "socket path %s already exists", path);
	if (r < 0)
		return server_fail(s, false, "socket error", r, "cannot create socket %s: %m",
				   path);
	s->socket_path = strdup(path);
	if (!s->socket_path) {
		(void)unlink(path);
		return server_fail(s, false, "out of memory", -ENOMEM, "out of memory");
	}
	log_debug("uffd: listening on %s", path);
	return 0;
}

static int remaining_ms(uint64_t deadline)
{
	uint64_t now;

	if (deadline == UINT64_MAX)
		return -1;
	now = now_ns();
	if (now >= deadline)
		return 0;
	return (int)((deadline - now + 999999) / 1000000);
}

#define SERVE_PEER_GONE 1
#define SERVE_STOPPED   2

/* Waits for fd to become readable before the deadline: 0, SERVE_STOPPED when the stop fd
 * became readable first, -ETIMEDOUT. */
static int wait_readable(const Server *s, int fd, uint64_t deadline)
{
	struct pollfd p[] = {
		{.fd = fd, .events = POLLIN},
		{.fd = s->opt.has_stop_fd ? s->opt.stop_fd : -1, .events = POLLIN},
	};
	int r;

	for (;;) {
		r = poll(p, ELEMENTSOF(p), remaining_ms(deadline));
		if (r > 0)
			return p[1].revents ? SERVE_STOPPED : 0;
		if (r == 0)
			return -ETIMEDOUT;
		if (errno != EINTR)
			return -errno;
	}
}

static int server_accept(Server *s, uint64_t deadline)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);
	int r, pidfd = -EBADF;

	r = wait_readable(s, s->listen_fd, deadline);
	if (r == SERVE_STOPPED)
		return r;
	if (r == -ETIMEDOUT)
		return server_fail(s, false, "no connection", r,
				   "firecracker did not connect within %d ms", s->opt.timeout_ms);
	if (r < 0)
		return server_fail(s, false, "socket error", r, "cannot wait for firecracker: %m");
	s->sock = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC);
	if (s->sock < 0)
		return server_fail(s, false, "socket error", -errno,
				   "cannot accept firecracker's connection: %m");
	/* One connection only: nobody else may connect after Firecracker. */
	s->listen_fd = safe_close(s->listen_fd);
	(void)unlink(s->socket_path);
	free(s->socket_path);
	s->socket_path = NULL;

	if (getsockopt(s->sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
		return server_fail(s, false, "socket error", -errno,
				   "cannot learn firecracker's pid (SO_PEERCRED): %m");
	s->peer = cred.pid;
	len = sizeof(pidfd);
	if (getsockopt(s->sock, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) < 0) {
		/* Before Linux 6.5: by pid. Wrong only if Firecracker exited and its pid was reused
		 * since connect(), a few microseconds ago. */
		pidfd = s->peer > 0 ? (int)syscall(SYS_pidfd_open, s->peer, 0) : -1;
		if (pidfd < 0)
			log_debug("uffd: no pidfd for pid %d: %m", (int)s->peer);
	}
	s->pidfd = pidfd < 0 ? -EBADF : pidfd;
	if (s->pidfd >= 0)
		(void)fcntl(s->pidfd, F_SETFD, FD_CLOEXEC);
	s->st.peer = s->peer;
	/* Before anything it sends is read: the socket's directory keeps others out, this makes
	 * sure of it. Not killed: a refused peer may be anyone. */
	if (s->opt.check_peer_uid && cred.uid != s->opt.peer_uid)
		return server_fail(s, false, "peer refused", -EPERM,
				   "refused pid %d: uid %u, only uid %u may connect", (int)cred.pid,
				   (unsigned)cred.uid, (unsigned)s->opt.peer_uid);
	if (s->opt.peer_id && !process_has_id(cred.pid, s->opt.peer_id))
		return server_fail(s, false, "peer refused", -EPERM,
				   "refused pid %d: not the VMM of %s (no --id %s)", (int)cred.pid,
				   s->opt.peer_id, s->opt.peer_id);
	log_debug("uffd: firecracker connected (pid %d)", (int)s->peer);
	return 0;
}

static int server_receive_handshake(Server *s, uint64_t deadline)
{
	_cleanup_free_ char *err = NULL;
	int r, fl;

	r = wait_readable(s, s->sock, deadline);
	if (r == SERVE_STOPPED)
		return r;
	if (r == -ETIMEDOUT)
		return server_fail(s, true, "invalid handshake", r,
				   "firecracker sent no handshake within %d ms", s->opt.timeout_ms);
	if (r < 0)
		return server_fail(s, true, "socket error", r, "cannot wait for the handshake: %m");
	r = uffd_handshake_recv(s->sock, &s->hs, &err);
	if (r < 0)
		return server_fail(s, true, "invalid handshake", r, "invalid handshake: %s",
				   err ? err : "?");

	/* A userfaultfd, not some other fd a confused or hostile peer passed: ioctls on anything
	 * else would do something else entirely. */
	char link[64], target[64];
	ssize_t n;
	snprintf(link, sizeof(link), "/proc/self/fd/%d", s->hs.uffd);
	n = readlink(link, target, sizeof(target) - 1);
	if (n < 0 || (target[n] = 0, strcmp(target, "anon_inode:[userfaultfd]") != 0))
		return server_fail(s, true, "invalid handshake", -EBADF,
				   "the fd received is not a userfaultfd (%s)",
				   n < 0 ? "unreadable" : target);

	/* The file description is shared with Firecracker, which creates it non-blocking anyway
	 * and never reads it. We need it so: after a REMOVE, a read must not wait for more. */
	fl = fcntl(s->hs.uffd, F_GETFL);
	if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(s->hs.uffd, F_SETFL, fl | O_NONBLOCK) < 0))
		return server_fail(s, true, "invalid handshake", -errno,
				   "cannot use the userfaultfd: %m");
	for (size_t i = 0; i < s->hs.n_regions; i++) {
		const UffdRegion *reg = &s->hs.regions[i];

		log_debug("uffd: region %zu: %#" PRIx64 " +%" PRIu64 " at file offset %" PRIu64
			  ", pages of %" PRIu64,
			  i, reg->base_host_virt_addr, reg->size, reg->offset, reg->page_size);
	}
	return 0;
}

/* Checks the memory file against the handshake and allocates what serving needs. The file
 * stays open: every copy reads it (see fault_buf). */
static int server_prepare(Server *s)
{
	uint64_t needed = 0;
	size_t fault_len = 0;
	void *p;

	for (size_t i = 0; i < s->hs.n_regions; i++) {
		const UffdRegion *reg = &s->hs.regions[i];
		size_t len = reg->page_size == PAGE_2M ? PAGE_2M : s->fault_around * PAGE_4K;

		if (reg->offset + reg->size > needed)
			needed = reg->offset + reg->size;
		if (len > fault_len)
			fault_len = len;
	}
	if (fstat(s->mem_fd, &s->mem_st) < 0)
		return server_fail(s, true, "memory file unreadable", -errno,
				   "cannot stat the memory file: %m");
	if ((uint64_t)s->mem_st.st_size < needed)
		return server_fail(s, true, "memory file truncated", -EIO,
				   "memory file truncated: needs %" PRIu64 " bytes, has %" PRIu64,
				   needed, (uint64_t)s->mem_st.st_size);
	/* Sequential from the start: readahead at its largest for the prefetch sweep. */
	(void)posix_fadvise(s->mem_fd, 0, 0, POSIX_FADV_SEQUENTIAL);

	if (fault_len > s->fault_buf_len) { /* 2 MiB pages: larger than allocated before */
		free(s->fault_buf);
		s->fault_buf = aligned_alloc(PAGE_4K, fault_len);
		s->fault_buf_len = s->fault_buf ? fault_len : 0;
	}
	if (!s->fault_buf)
		return server_fail(s, true, "out of memory", -ENOMEM,
				   "out of memory for the copy buffers");
	for (size_t i = 0; i < s->hs.n_regions; i++) {
		const UffdRegion *reg = &s->hs.regions[i];
		uint64_t pages = reg->size / reg->page_size;

		s->removed[i] = calloc((pages + 63) / 64, sizeof(uint64_t));
		s->present[i] = calloc((pages + 63) / 64, sizeof(uint64_t));
		if (!s->removed[i] || !s->present[i])
			return server_fail(s, true, "out of memory", -ENOMEM,
					   "out of memory for the page bitmaps");
		if (reg->page_size == PAGE_2M && !s->zero_huge) {
			/* Never written: reads come from the kernel's zero page. */
			p = mmap(NULL, PAGE_2M, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (p == MAP_FAILED)
				return server_fail(s, true, "out of memory", -errno,
						   "cannot map a zero page: %m");
			s->zero_huge = p;
		}
	}
	return 0;
}

/* Reads pages [p, p + n) of region reg from the memory file into buf: 0, -ENODATA when the
 * file ends before them (it shrank after the check), or -errno. */
static int source_read(const Server *s, const UffdRegion *reg, uint64_t p, uint64_t n, uint8_t *buf)
{
	uint64_t off = reg->offset + p * reg->page_size, len = n * reg->page_size, done = 0;

	while (done < len) {
		ssize_t k = pread(s->mem_fd, buf + done, len - done, (off_t)(off + done));

		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0)
			return -errno;
		if (k == 0)
			return -ENODATA;
		done += (uint64_t)k;
	}
	return 0;
}

/* Evaluates to the failure recorded for a source_read() error r at page p of reg. */
#define source_fail(s, kill_peer, r, reg, p)                                                       \
	server_fail(s, kill_peer, "memory file unreadable", (r) == -ENODATA ? -EIO : (r),          \
		    "cannot read the memory file at offset %" PRIu64 ": %s",                       \
		    (reg)->offset + (p) * (reg)->page_size,                                        \
		    (r) == -ENODATA ? "it ends there (truncated while serving)" : strerror(-(r)))

static bool bit_test(const uint64_t *map, uint64_t i)
{
	return __atomic_load_n(&map[i / 64], __ATOMIC_RELAXED) & (1ull << (i % 64));
}

static void bits_set(uint64_t *map, uint64_t from, uint64_t n)
{
	for (uint64_t i = from; i < from + n;) {
		uint64_t bit = i % 64, k = 64 - bit < from + n - i ? 64 - bit : from + n - i;
		uint64_t mask = k == 64 ? ~0ull : ((1ull << k) - 1) << bit;

		__atomic_fetch_or(&map[i / 64], mask, __ATOMIC_RELAXED);
		i += k;
	}
}

static int region_find(const Server *s, uint64_t addr)
{
	for (size_t i = 0; i < s->hs.n_regions; i++) {
		const UffdRegion *reg = &s->hs.regions[i];

		if (addr >= reg->base_host_virt_addr && addr - reg->base_host_virt_addr < reg->size)
			return (int)i;
	}
	return -ENOENT;
}

/* Called with the copy lock held. */
static void server_mark_removed(Server *s, uint64_t start, uint64_t end)
{
	s->st.removes++;
	for (size_t i = 0; i < s->hs.n_regions; i++) {
		const UffdRegion *reg = &s->hs.regions[i];
		uint64_t base = reg->base_host_virt_addr, lo, hi;

		lo = start > base ? start : base;
		hi = end < base + reg->size ? end : base + reg->size;
		if (lo >= hi)
			continue;
		uint64_t p = (lo - base) / reg->page_size,
			 last = (hi - base + reg->page_size - 1) / reg->page_size;

		bits_set(s->removed[i], p, last - p);
	}
	log_debug("uffd: removed %#" PRIx64 "-%#" PRIx64, start, end);
}

static void uffd_wake(int uffd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = {.start = start, .len = len};

	(void)ioctl(uffd, UFFDIO_WAKE, &range);
}

static void server_queue_fault(Server *s, uint64_t addr, uint64_t t)
{
	uint64_t page = addr & ~(PAGE_4K - 1);

	/* A vCPU woken by a signal faults again on the same page: one entry is enough. */
	for (size_t k = 0; k < s->q_len; k++)
		if ((s->queue[(s->q_head + k) % QUEUE_SIZE].addr & ~(PAGE_4K - 1)) == page)
			return;
	if (s->q_len == QUEUE_SIZE) {
		/* Cannot happen with fewer threads than slots. Waking the thread makes it fault
		 * again later, with a new message: nothing is lost. */
		int i = region_find(s, addr);

		if (i >= 0) {
			uint64_t ps = s->hs.regions[i].page_size;

			uffd_wake(s->hs.uffd, addr & ~(ps - 1), ps);
		}
		return;
	}
	s->queue[(s->q_head + s->q_len) % QUEUE_SIZE] = (Fault){.addr = addr, .t_read = t};
	s->q_len++;
}

/* The copy lock is spun for first (a few sched_yield()s) and slept on (futex) only after: the
 * copies waited for mostly end within a fraction of a millisecond, and a futex wake-up costs
 * tens of microseconds on a VM, which once per fault made 1 GiB sequential with prefetch take
 * 463 instead of 335 ms. Sequentially consistent: the fault thread announces itself, then
 * looks for copiers; a copier announces itself, then looks for the fault thread; at least one
 * of them sees the other. */
static void futex_wait(atomic_uint *addr, unsigned value)
{
	(void)syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}

static void futex_wake(atomic_uint *addr, int n)
{
	(void)syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}

static void copy_lock_fault_thread(Server *s)
{
	unsigned v, spins = 0;

	atomic_store(&s->want_read, 1);
	/* A few yields cover a copy about to end; longer, the CPU is better left to the copiers
	 * (on a busy machine they are what we wait for): sleep until the last one leaves. */
	while ((v = atomic_load(&s->copiers_in)) > 0) {
		if (spins++ < 16)
			sched_yield();
		else
			futex_wait(&s->copiers_in, v);
	}
}

static void copy_unlock_fault_thread(Server *s)
{
	atomic_store(&s->want_read, 0);
	if (atomic_load(&s->copiers_asleep) > 0)
		futex_wake(&s->want_read, INT_MAX);
}

/* Reads what the userfaultfd has queued: REMOVE ranges are recorded at once, faults queued.
 * Returns the number of messages read, 0 when there were none. */
static int server_read_events(Server *s)
{
	struct uffd_msg msgs[READ_BATCH];
	ssize_t n;
	uint64_t t;
	int r = 0;

	copy_lock_fault_thread(s);
	n = read(s->hs.uffd, msgs, sizeof(msgs));
	if (n < 0)
		r = -errno;
	for (ssize_t k = 0; k < n / (ssize_t)sizeof(msgs[0]); k++)
		if (msgs[k].event == UFFD_EVENT_REMOVE)
			server_mark_removed(s, msgs[k].arg.remove.start, msgs[k].arg.remove.end);
	copy_unlock_fault_thread(s);

	if (r == -EAGAIN)
		return 0;
	if (r < 0)
		return server_fail(s, true, "userfaultfd error", r,
				   "cannot read the userfaultfd: %m");
	t = now_ns();
	for (ssize_t k = 0; k < n / (ssize_t)sizeof(msgs[0]); k++) {
		const struct uffd_msg *m = &msgs[k];

		switch (m->event) {
		case UFFD_EVENT_PAGEFAULT:
			server_queue_fault(s, m->arg.pagefault.address, t);
			break;
		case UFFD_EVENT_FORK:
			/* Firecracker does not ask for it; should it come, the child's uffd is
			 * not ours to serve. */
			safe_close((int)m->arg.fork.ufd);
			break;
		default: /* REMOVE done above; REMAP and UNMAP need nothing */
			break;
		}
	}
	return (int)(n / (ssize_t)sizeof(msgs[0]));
}

static int uffd_copy(int uffd, uint64_t dst, const void *src, uint64_t len, uint64_t *ret_copied)
{
	struct uffdio_copy c = {.dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len};

	if (ioctl(uffd, UFFDIO_COPY, &c) >= 0) {
		*ret_copied = len;
		return 0;
	}
	/* A partial copy fails with EAGAIN and says in .copy how far it got. */
	*ret_copied = c.copy > 0 ? (uint64_t)c.copy : 0;
	return -errno;
}

/* Records the first fault of a page while the working set is recorded. */
static void server_record(Server *s, const UffdRegion *reg, uint64_t index)
{
	if (!s->recording || s->rec_n >= UFFD_RECORD_MAX_PAGES ||
	    reg->page_size != s->rec_page_size)
		return;
	s->rec[s->rec_n++] = (uint32_t)(reg->offset / reg->page_size + index);
}

/* Copies pages [lo, hi) of region i, already read into fault_buf from page `from` on: the
 * pages the kernel had not filled are marked present and counted. */
static int server_copy_pages(Server *s, size_t i, uint64_t from, uint64_t lo, uint64_t hi,
			     uint64_t *ret_pages)
{
	const UffdRegion *reg = &s->hs.regions[i];
	uint64_t ps = reg->page_size, copied = 0;
	int r;

	r = uffd_copy(s->hs.uffd, reg->base_host_virt_addr + lo * ps,
		      s->fault_buf + (lo - from) * ps, (hi - lo) * ps, &copied);
	if (copied > 0) {
		bits_set(s->present[i], lo, copied / ps);
		s->st.pages_copied += copied / ps;
		s->st.bytes_copied += copied;
		s->fault_bytes += copied;
	}
	*ret_pages = copied / ps;
	return r;
}

/* Serves one fault: 0 when the page is there, -EAGAIN to retry after reading events,
 * SERVE_PEER_GONE when Firecracker went away, < 0 on failure (recorded, Firecracker killed).
 *
 * Fault-around: the pages of the aligned block around a 4 KiB fault that are neither present
 * nor removed are read and copied along with it, the faulting page and those after it in the
 * first copy (it wakes the vCPU), those before it in a second. */
static int server_serve_fault(Server *s, uint64_t addr)
{
	const UffdRegion *reg;
	uint64_t ps, page, index, lo, hi, copied = 0;
	typeof(&s->stuck[0]) stuck;
	bool zero;
	int i, r;

	i = region_find(s, addr);
	if (i < 0)
		return server_fail(s, true, "fault outside guest memory", -EFAULT,
				   "fault at %#" PRIx64 " outside every region of the handshake",
				   addr);
	reg = &s->hs.regions[i];
	ps = reg->page_size;
	page = addr & ~(ps - 1);
	index = (page - reg->base_host_virt_addr) / ps;
	zero = bit_test(s->removed[i], index);
	lo = index;
	hi = index + 1;

	if (zero && ps == PAGE_4K) {
		struct uffdio_zeropage z = {.range = {.start = page, .len = ps}};

		r = ioctl(s->hs.uffd, UFFDIO_ZEROPAGE, &z) < 0 ? -errno : 0;
	} else if (zero)
		/* hugetlb has no UFFDIO_ZEROPAGE */
		r = uffd_copy(s->hs.uffd, page, s->zero_huge, ps, &copied);
	else {
		/* Not while recording (a neighbour served now would never fault, nor be
		 * recorded), nor while the working set is replayed (the replay brings what the
		 * guest wants next; neighbours would only compete with it). */
		if (ps == PAGE_4K && s->fault_around > 1 && !s->recording &&
		    !(s->replay &&
		      atomic_load_explicit(&s->replay_left, memory_order_relaxed) > 0)) {
			uint64_t first = index & ~(uint64_t)(s->fault_around - 1),
				 end = first + s->fault_around;

			if (end > reg->size / ps)
				end = reg->size / ps;
			while (hi < end && !bit_test(s->present[i], hi) &&
			       !bit_test(s->removed[i], hi))
				hi++;
			while (lo > first && !bit_test(s->present[i], lo - 1) &&
			       !bit_test(s->removed[i], lo - 1))
				lo--;
		}
		r = source_read(s, reg, lo, hi - lo, s->fault_buf);
		if (r < 0)
			return source_fail(s, true, r, reg, lo);
		r = server_copy_pages(s, (size_t)i, lo, index, hi, &copied);
		/* Stopped short at a page present meanwhile: the faulting one is in. */
		if (r == -EAGAIN && copied > 0)
			r = 0;
		if (r == 0) {
			s->st.around_pages += copied - 1;
			server_record(s, reg, index);
			if (lo < index) {
				/* best effort: a page this misses is served by its own fault */
				(void)server_copy_pages(s, (size_t)i, lo, lo, index, &copied);
				s->st.around_pages += copied;
			}
		}
	}

	stuck = &s->stuck[(page / PAGE_4K) % STUCK_SLOTS];
	if (r != -EEXIST && stuck->page == page)
		stuck->count = 0;
	switch (r) {
	case 0:
		/* copies from the file were counted as they were made */
		if (zero)
			s->st.zero_pages++;
		return 0;
	case -EEXIST:
		/* The prefetcher (or an earlier duplicate) was first; its copy woke the range,
		 * waking again costs nothing and covers any waiter it missed. */
		s->st.eexist++;
		bits_set(s->present[i], index, 1);
		if (stuck->page != page)
			*stuck = (typeof(*stuck)){.page = page, .count = 0};
		if (++stuck->count >= STUCK_MAX)
			return server_fail(s, true, "copy failed", r,
					   "the page at %#" PRIx64
					   " keeps faulting although the kernel "
					   "says it is present (%s)",
					   page,
					   ps == PAGE_2M ? "is the huge page pool exhausted?"
							 : "unexpected kernel behaviour");
		uffd_wake(s->hs.uffd, page, ps);
		return 0;
	case -EAGAIN:
		return -EAGAIN;
	case -ESRCH:
	case -ENOENT:
		if (server_peer_exited(s, EXIT_GRACE_MS))
			return SERVE_PEER_GONE;
		return server_fail(
			s, true, "copy failed", r,
			"cannot serve the fault at %#" PRIx64 " while firecracker runs: %m", addr);
	default:
		return server_fail(
			s, true, "copy failed", r,
			"cannot serve the fault at %#" PRIx64 ": %s: %m%s", addr,
			zero ? "UFFDIO_ZEROPAGE" : "UFFDIO_COPY",
			r == -ENOMEM && ps == PAGE_2M ? " (is the huge page pool exhausted?)" : "");
	}
}

static void backoff(unsigned *spins)
{
	if ((*spins)++ < 64)
		sched_yield();
	else
		(void)nanosleep(&(struct timespec){.tv_nsec = 50000}, NULL);
}

/* Serves every queued fault, oldest first. */
static int server_serve_queue(Server *s)
{
	unsigned spins = 0;
	int r;

	while (s->q_len > 0) {
		Fault f = s->queue[s->q_head];

		r = server_serve_fault(s, f.addr);
		if (r == -EAGAIN) {
			/* A REMOVE is pending: it has to be read before any copy succeeds. */
			s->st.eagain++;
			r = server_read_events(s);
			if (r < 0)
				return r;
			if (r == 0)
				backoff(&spins);
			continue;
		}
		if (r != 0)
			return r;
		spins = 0;
		s->q_head = (s->q_head + 1) % QUEUE_SIZE;
		s->q_len--;
		s->st.faults++;
		hist_add(&s->hist, now_ns() - f.t_read);
		if (s->opt.live) {
			live_store(&s->opt.live->faults, s->st.faults);
			live_store(&s->opt.live->fault_bytes, s->fault_bytes);
		}
	}
	return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* prefetch */

/* The last copier out wakes a fault thread asleep in copy_lock_fault_thread(). */
static void copy_unlock_copier(Server *s)
{
	if (atomic_fetch_sub(&s->copiers_in, 1) == 1 && atomic_load(&s->want_read))
		futex_wake(&s->copiers_in, 1);
}

static void copy_lock_copier(Server *s)
{
	for (;;) {
		unsigned spins = 0;

		/* The fault thread goes first: it asks, we step aside. Asleep rather than
		 * spinning when it takes long: on a busy machine a spinning copier takes the
		 * CPU from the very thread it waits for (measured: 2.3 s lost per GiB with a
		 * CPU hog running). */
		while (atomic_load(&s->want_read)) {
			if (spins++ < 16) {
				sched_yield();
				continue;
			}
			atomic_fetch_add(&s->copiers_asleep, 1);
			futex_wait(&s->want_read, 1);
			atomic_fetch_sub(&s->copiers_asleep, 1);
		}
		atomic_fetch_add(&s->copiers_in, 1);
		if (!atomic_load(&s->want_read))
			return;
		/* out again, as any copier leaves: the fault thread may have seen us come in */
		copy_unlock_copier(s);
	}
}

static void prefetch_fail(Server *s, int r, const char *format, ...) _printf_(3, 4);
static void prefetch_fail(Server *s, int r, const char *format, ...)
{
	va_list ap;

	/* The first failure is the one reported; the fault thread reads it once woken. */
	if (atomic_exchange(&s->failed, true))
		return;
	errno = -r;
	va_start(ap, format);
	if (vasprintf(&s->prefetch_msg, format, ap) < 0)
		s->prefetch_msg = NULL;
	va_end(ap);
	s->prefetch_error = r;
	/* wakes the fault thread's poll() */
	(void)eventfd_write(s->efd, 1);
}

#define COPIER_GONE 1

/* A copier's copy of pages [p, p + n) of region i (pages of ps bytes), chosen as neither
 * present nor removed: read outside the copy lock, copied under it once the removed bitmap is
 * checked again. Sets *ret_next to the page to look at next. 0, COPIER_GONE when Firecracker's
 * memory is gone, < 0 on failure (reported to the fault thread). */
static int copier_copy(Copier *c, size_t i, uint64_t ps, uint64_t p, uint64_t n, uint64_t *ret_next)
{
	Server *s = c->s;
	const UffdRegion *reg = &s->hs.regions[i];
	uint64_t m = 0, copied = 0;
	int r;

	*ret_next = p;
	r = source_read(s, reg, p, n, c->buf);
	if (r < 0) {
		prefetch_fail(s, r == -ENODATA ? -EIO : r,
			      "prefetch cannot read the memory file at offset %" PRIu64 ": %s",
			      reg->offset + p * ps,
			      r == -ENODATA ? "it ends there (truncated while serving)"
					    : strerror(-r));
		return r;
	}
	copy_lock_copier(s);
	/* A REMOVE read since the run was chosen: its pages are served as zero, never copied. */
	while (m < n && !bit_test(s->removed[i], p + m))
		m++;
	r = m == 0 ? 0
		   : uffd_copy(s->hs.uffd, reg->base_host_virt_addr + p * ps, c->buf, m * ps,
			       &copied);
	copy_unlock_copier(s);

	if (copied > 0)
		bits_set(s->present[i], p, copied / ps);
	c->pages += copied / ps;
	c->bytes += copied;
	if (c->replaying)
		c->replay_pages += copied / ps;
	if (s->opt.live && copied > 0)
		__atomic_fetch_add(c->replaying ? &s->opt.live->replay_bytes
						: &s->opt.live->prefetch_bytes,
				   copied, __ATOMIC_RELAXED);
	*ret_next = p + (m == 0 ? 1 : copied / ps);
	switch (r) {
	case 0:
		return 0;
	case -EEXIST: /* the first page was there: a fault won it */
		c->eexist++;
		bits_set(s->present[i], p, 1);
		*ret_next = p + 1;
		return 0;
	case -EAGAIN:
		if (copied == 0) { /* a REMOVE is pending: let it be read, then try again */
			c->eagain++;
			sched_yield();
		}
		/* else stopped at a present page: skipped on the next round */
		return 0;
	case -ESRCH:
	case -ENOENT:
		log_debug("uffd: prefetch stopped: firecracker's memory is gone");
		return COPIER_GONE;
	default:
		prefetch_fail(s, r,
			      "prefetch: UFFDIO_COPY of %" PRIu64 " bytes at %#" PRIx64
			      " failed: %m",
			      m * ps, reg->base_host_virt_addr + p * ps);
		return r;
	}
}

static bool page_wanted(const Server *s, size_t i, uint64_t p)
{
	return !bit_test(s->present[i], p) && !bit_test(s->removed[i], p);
}

/* Copies pages [from, to) of region i that are not there yet, in runs of at most
 * PREFETCH_CHUNK that do not cross a chunk boundary (of the VMM's addresses). With `share`,
 * only the chunks that are this copier's. 0, COPIER_GONE, or < 0 on failure; the stop flag
 * ends it early with 0. */
static int copier_range(Copier *c, size_t i, uint64_t from, uint64_t to, bool share)
{
	Server *s = c->s;
	const uint64_t ps = s->hs.regions[i].page_size,
		       chunk = PREFETCH_CHUNK > ps ? PREFETCH_CHUNK / ps : 1,
		       va_page = s->hs.regions[i].base_host_virt_addr / ps;
	uint64_t p = from;
	int r;

	while (p < to) {
		uint64_t n = 0, ci, end;

		if (atomic_load(&s->stop))
			return 0;
		ci = (va_page + p) / chunk;
		end = (ci + 1) * chunk - va_page;
		if (share && ci % s->n_copiers != c->k) {
			p = end;
			continue;
		}
		if (end > to)
			end = to;
		while (p < end && !page_wanted(s, i, p))
			p++;
		while (p + n < end && page_wanted(s, i, p + n))
			n++;
		if (n == 0)
			continue;
		r = copier_copy(c, i, ps, p, n, &p);
		if (r != 0)
			return r;
	}
	return 0;
}

/* This copier's share of the working set, in its order: runs of pages that follow each other
 * in it and in memory, every n-th run. */
static int copier_replay(Copier *c)
{
	Server *s = c->s;
	const UffdWorkingSetHeader *h = &s->ws.h;
	const uint64_t chunk =
		PREFETCH_CHUNK / h->page_size > 0 ? PREFETCH_CHUNK / h->page_size : 1;
	int r = 0;

	c->replaying = true;
	for (uint32_t k = 0, run = 0; r == 0 && k < h->count; run++) {
		uint64_t fp = s->ws.pages[k], n = 1;

		while (k + n < h->count && n < chunk && s->ws.pages[k + n] == fp + n)
			n++;
		k += (uint32_t)n;
		if (run % s->n_copiers != c->k)
			continue;
		for (size_t i = 0; i < s->hs.n_regions; i++) {
			const UffdRegion *reg = &s->hs.regions[i];
			uint64_t first = reg->offset / h->page_size,
				 pages = reg->size / reg->page_size;

			if (reg->page_size != h->page_size || fp < first || fp - first >= pages)
				continue;
			r = copier_range(c, i, fp - first,
					 fp - first + n < pages ? fp - first + n : pages, false);
			break;
		}
		if (atomic_load(&s->stop))
			break;
	}
	c->replaying = false;
	if (r != 0 || atomic_load(&s->stop))
		atomic_store(&s->replay_cut, true);
	if (atomic_fetch_sub(&s->replay_left, 1) == 1 && !atomic_load(&s->replay_cut)) {
		atomic_store(&s->replay_ns, now_ns() - s->t_handshake);
		log_debug("uffd: working set replayed: %" PRIu32 " entries", h->count);
	}
	/* No sweep before the whole working set is in: the other copier's share too. */
	while (r == 0 && atomic_load(&s->replay_left) > 0 && !atomic_load(&s->stop))
		(void)nanosleep(&(struct timespec){.tv_nsec = 100000}, NULL);
	return r;
}

static void *copier_run(void *userdata)
{
	Copier *c = userdata;
	Server *s = c->s;
	int r = 0;

	if (s->replay)
		r = copier_replay(c);
	for (size_t i = 0; s->opt.prefetch && r == 0 && i < s->hs.n_regions; i++)
		r = copier_range(c, i, 0, s->hs.regions[i].size / s->hs.regions[i].page_size, true);
	if (s->opt.prefetch) {
		if (r != 0 || atomic_load(&s->stop))
			atomic_store(&s->sweep_cut, true);
		if (atomic_fetch_sub(&s->sweep_left, 1) == 1 && !atomic_load(&s->sweep_cut)) {
			atomic_store(&s->prefetch_ns, now_ns() - s->t_handshake);
			log_debug("uffd: prefetch done in %" PRIu64 " ms",
				  (now_ns() - s->t_handshake) / 1000000);
		}
	}
	free(c->buf);
	c->buf = NULL;
	return NULL;
}

static int server_start_prefetch(Server *s)
{
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	unsigned n;
	int r;

	if (s->prefetching || (!s->replay && (!s->opt.prefetch || s->prefetch_deferred)))
		return 0;
	s->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (s->efd < 0)
		return server_fail(s, true, "out of memory", -errno,
				   "cannot create an eventfd: %m");
	n = cpus >= COPIERS_MAX ? COPIERS_MAX : 1;
	for (unsigned k = 0; k < n; k++)
		if (!s->copy_bufs[k] && !(s->copy_bufs[k] = aligned_alloc(PAGE_4K, PREFETCH_CHUNK)))
			return server_fail(s, true, "out of memory", -ENOMEM,
					   "cannot allocate the copiers' buffers");
	atomic_store(&s->replay_left, n);
	atomic_store(&s->sweep_left, n);
	s->n_copiers = n;
	for (unsigned k = 0; k < n; k++) {
		Copier *c = &s->copiers[k];

		*c = (Copier){.s = s, .k = k, .buf = s->copy_bufs[k]};
		s->copy_bufs[k] = NULL; /* the copier's now */
		r = c->buf ? -pthread_create(&c->thread, NULL, copier_run, c) : -ENOMEM;
		if (r < 0) {
			/* Those started stop at once (their shares assume n copiers); serving
			 * fails as for any other copier failure. */
			free(c->buf);
			c->buf = NULL;
			atomic_store(&s->stop, true);
			s->n_copiers = k;
			s->prefetching = k > 0;
			return server_fail(s, true, "out of memory", r,
					   "cannot start the copiers: %m");
		}
		(void)pthread_setname_np(c->thread, "uffd-copier"); /* for top -H and perf */
	}
	s->prefetching = true;
	return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* the working set */

/* A valid working set is replayed; without one, this resume records it, holding the prefetch
 * sweep back until the recording ends so that the faults show what the guest wants first. */
static void server_setup_working_set(Server *s)
{
	_cleanup_free_ char *err = NULL;

	if (!s->opt.working_set)
		return;
	if (uffd_working_set_load(s->opt.working_set, &s->mem_st, &s->ws, &err) >= 0) {
		s->replay = true;
		log_debug("uffd: replaying the working set %s: %" PRIu32 " pages",
			  s->opt.working_set, s->ws.h.count);
		return;
	}
	/* One recorder per memory file: the resumes that start meanwhile (a burst of forks) are
	 * served as usual, and the lock goes with the fd when serving ends. */
	if (flock(s->mem_fd, LOCK_EX | LOCK_NB) < 0) {
		log_debug("uffd: the working set is being recorded by another resume");
		return;
	}
	log_debug("uffd: recording the working set (%s)", err ? err : "none");
	s->recording = true;
	s->rec_page_size = (uint32_t)s->hs.regions[0].page_size;
	s->rec_deadline = now_ns() + (uint64_t)(s->opt.record_ms > 0 ? s->opt.record_ms
								     : UFFD_RECORD_MS_DEFAULT) *
					     1000000;
	s->prefetch_deferred = s->opt.prefetch;
	/* At most 4 MiB, allocated once: the fault path allocates nothing. Untouched pages of it
	 * cost nothing. */
	s->rec = malloc(UFFD_RECORD_MAX_PAGES * sizeof(uint32_t));
	if (!s->rec) {
		s->recording = s->prefetch_deferred = false;
		(void)flock(s->mem_fd, LOCK_UN);
		log_debug("uffd: no memory to record the working set");
	}
}

/* Writes what was recorded and lets the prefetch sweep start. */
static int server_finish_recording(Server *s, bool start_prefetch)
{
	_cleanup_free_ char *err = NULL;

	if (!s->recording)
		return 0;
	s->recording = false;
	if (s->rec_n > 0) {
		UffdWorkingSet ws = {
			.h = {.page_size = s->rec_page_size, .count = s->rec_n},
			.pages = s->rec,
		};

		/* Losing it costs the next resume its head start, nothing more. */
		if (uffd_working_set_write(s->opt.working_set, &ws, &s->mem_st, &err) >= 0)
			s->st.recorded = s->rec_n;
		else
			log_debug("uffd: %s", err ? err : "cannot write the working set");
	}
	free(s->rec);
	s->rec = NULL;
	(void)flock(s->mem_fd, LOCK_UN);
	log_debug("uffd: working set recorded: %" PRIu32 " pages", s->rec_n);
	s->prefetch_deferred = false;
	return start_prefetch ? server_start_prefetch(s) : 0;
}

/* ------------------------------------------------------------------------------------------ */

/* Serves until Firecracker goes away: 0, SERVE_STOPPED, or < 0 when it could not serve. */
static int server_loop(Server *s)
{
	char buf[256];
	ssize_t n;
	int r;

	for (;;) {
		struct pollfd p[] = {
			{.fd = s->hs.uffd, .events = POLLIN},
			{.fd = s->sock, .events = POLLIN | POLLRDHUP},
			{.fd = s->pidfd, .events = POLLIN}, /* ignored when -EBADF */
			{.fd = s->efd, .events = POLLIN},
			{.fd = s->opt.has_stop_fd ? s->opt.stop_fd : -1, .events = POLLIN},
		};

		r = poll(p, ELEMENTSOF(p), s->recording ? remaining_ms(s->rec_deadline) : -1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return server_fail(s, true, "poll error", -errno, "poll failed: %m");
		if (p[4].revents)
			return SERVE_STOPPED;
		if (s->recording &&
		    (now_ns() >= s->rec_deadline || s->rec_n >= UFFD_RECORD_MAX_PAGES)) {
			r = server_finish_recording(s, true);
			if (r < 0)
				return r;
		}

		/* Faults first: a guest waits on each. */
		if (p[0].revents & POLLIN) {
			r = server_read_events(s);
			if (r < 0)
				return r;
			r = server_serve_queue(s);
			if (r == SERVE_PEER_GONE)
				break;
			if (r < 0)
				return r;
		} else if (p[0].revents & (POLLERR | POLLNVAL))
			return server_fail(s, true, "userfaultfd error", -EIO,
					   "the userfaultfd reports an error");

		if (p[2].revents)
			break;
		if (p[1].revents & POLLIN) {
			/* Firecracker sends nothing after the handshake: drain, and see EOF. */
			do
				n = recv(s->sock, buf, sizeof(buf), MSG_DONTWAIT);
			while (n < 0 && errno == EINTR);
			if (n == 0 || (n < 0 && errno != EAGAIN)) {
				server_set_reason(s, "firecracker closed the connection");
				return 0;
			}
		} else if (p[1].revents & (POLLHUP | POLLRDHUP | POLLERR)) {
			server_set_reason(s, "firecracker closed the connection");
			return 0;
		}
		if (p[3].revents & POLLIN) {
			server_stop_prefetch(s); /* joined: its message is complete */
			return server_fail(s, true, "prefetch failed", s->prefetch_error, "%s",
					   s->prefetch_msg ? s->prefetch_msg : "prefetch failed");
		}
	}
	server_set_reason(s, "firecracker exited");
	return 0;
}

static int server_run(Server *s, const char *socket_path, const char *mem_path)
{
	uint64_t deadline = s->opt.timeout_ms < 0
				    ? UINT64_MAX
				    : now_ns() + (uint64_t)s->opt.timeout_ms * 1000000;
	int r;

	/* The memory file first: a missing one fails before Firecracker is involved. */
	r = server_open_memory(s, mem_path);
	if (r < 0)
		return r;
	r = server_listen(s, socket_path);
	if (r < 0)
		return r;
	/* The buffers now, touched, not once the guest waits on faults (a first touch costs a
	 * fault per page). A failure here is tried again when they are needed, and reported
	 * then. Copiers may run: theirs too. */
	s->fault_buf = aligned_alloc(PAGE_4K, s->fault_around * PAGE_4K);
	if (s->fault_buf) {
		s->fault_buf_len = s->fault_around * PAGE_4K;
		memset(s->fault_buf, 0, s->fault_buf_len);
	}
	for (size_t k = 0; (s->opt.prefetch || s->opt.working_set) && k < COPIERS_MAX; k++) {
		s->copy_bufs[k] = aligned_alloc(PAGE_4K, PREFETCH_CHUNK);
		if (s->copy_bufs[k])
			memset(s->copy_bufs[k], 0, PREFETCH_CHUNK);
	}
	r = server_accept(s, deadline);
	if (r != 0)
		return r;
	r = server_receive_handshake(s, deadline);
	if (r != 0)
		return r;
	s->t_handshake = now_ns();
	r = server_prepare(s);
	if (r < 0)
		return r;
	server_setup_working_set(s);
	r = server_start_prefetch(s);
	if (r < 0)
		return r;
	return server_loop(s);
}

int uffd_serve(const char *socket_path, const char *mem_path, const UffdOptions *opt,
	       UffdStats *ret_stats, char **ret_error)
{
	_cleanup_(server_freep) Server *s = NULL;
	int r;

	if (!socket_path || !mem_path)
		return uffd_error(ret_error, -EINVAL, "no socket path or no memory file");
	if (opt && (opt->fault_around > UFFD_FAULT_AROUND_MAX ||
		    (opt->fault_around & (opt->fault_around - 1))))
		return uffd_error(ret_error, -EINVAL,
				  "fault-around of %u pages: a power of two up to %d is needed",
				  opt->fault_around, UFFD_FAULT_AROUND_MAX);
	r = server_new(opt, &s);
	if (r < 0)
		return uffd_error(ret_error, r, "out of memory");

	r = server_run(s, socket_path, mem_path);
	if (r == SERVE_STOPPED) {
		server_set_reason(s, "stopped");
		r = 0;
	}
	server_stop_prefetch(s);
	/* A guest that went away within the recording window leaves what it showed. */
	(void)server_finish_recording(s, false);
	s->st.p50_ns = hist_percentile(&s->hist, 500);
	s->st.p99_ns = hist_percentile(&s->hist, 990);
	s->st.max_ns = s->hist.max;
	log_debug("uffd: done (%s): %" PRIu64 " faults, %" PRIu64 " pages copied", s->st.end_reason,
		  s->st.faults, s->st.pages_copied);

	/* The statistics describe the run whatever its end, so they are returned on failure
	 * too: ember-uffd prints them either way. */
	if (ret_stats)
		*ret_stats = s->st;
	if (r < 0 && ret_error)
		*ret_error = s->error ? TAKE_PTR(s->error) : strdup("failed");
	return r;
}
