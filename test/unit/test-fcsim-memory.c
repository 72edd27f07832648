/* SPDX-License-Identifier: Apache-2.0 */
/*
 * fcsim/memory: page content, boot and verification (sequential, random, sampled), corruption
 * detection, memory files (sparse, exact content, MAP_PRIVATE restore), discards, and the Uffd
 * backend against a reference fault handler thread that checks Firecracker's handshake byte for
 * byte and serves faults from the memory file (or computes them, for memory too large to write
 * out in a unit test).
 *
 * The handler thread never calls cmocka's asserts (they longjmp, which only works on the test's
 * own thread): it records what it saw and its first error, and the test asserts on those.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/fileio.h"
#include "common/macro.h"
#include "fcsim/memory.h"

#define BOOT       0x1234abcd5678ef01ull
#define K          0x9E3779B97F4A7C15ull
#define MAGIC      0x3147504D49534346ull /* "FCSIMPG1" */
#define MIB        (1ull << 20)
#define REGION0    0xD0000000ull
#define LARGE_MIB  3400u /* above 3328 MiB: two regions */
#define TIMEOUT_MS 10000
#define PAGE       ((uint64_t)GMEM_PAGE)

static char tmpdir[] = "/tmp/fcsim-test-memory.XXXXXX";

static char *tpath(const char *name)
{
	char *p;

	if (asprintf(&p, "%s/%s", tmpdir, name) < 0)
		return NULL;
	return p;
}

static void gmem_freep(GuestMemory **m)
{
	gmem_free(*m);
}

/* The content definition, written out again independently of fcsim/memory.c. */
static uint64_t ref_splitmix64(uint64_t x)
{
	uint64_t z = x + 0x9E3779B97F4A7C15ull;

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

static bool ref_page_has_content(uint64_t boot_id, uint64_t index)
{
	return ref_splitmix64(boot_id ^ (index * K)) % 4 != 0;
}

/* First page at or after `from` that has content. */
static uint64_t content_page(uint64_t boot_id, uint64_t from)
{
	while (!ref_page_has_content(boot_id, from))
		from++;
	return from;
}

static uint64_t zero_page(uint64_t boot_id, uint64_t from)
{
	while (ref_page_has_content(boot_id, from))
		from++;
	return from;
}

static uint8_t *page_ptr(const GuestMemory *m, uint64_t index)
{
	uint64_t off = index * PAGE;

	for (size_t i = 0; i < gmem_n_regions(m); i++) {
		const GmemRegion *r = gmem_region(m, i);

		if (off >= r->offset && off < r->offset + r->size)
			return (uint8_t *)r->host_addr + (off - r->offset);
	}
	return NULL;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---------------------------------------------------------------------------------------- */
/* reference UFFD handler */

typedef struct HRegion {
	uint64_t base, size, offset, page_size, page_size_kib;
} HRegion;

typedef struct Handler {
	/* set by the test before the thread starts */
	char path[sizeof(((struct sockaddr_un *)NULL)->sun_path)];
	int listen_fd;
	int stop_fd; /* eventfd: give up (the load failed, or the test is over) */
	int mem_fd;  /* serve pages from this memory file; < 0: compute them for boot_id */
	uint64_t boot_id;
	uint64_t bad_page; /* served with a flipped word; UINT64_MAX for none */
	uint64_t expect_size;
	pthread_t thread;

	/* results, under lock */
	pthread_mutex_t lock;
	char raw[4096];
	size_t raw_len;
	int n_fds;
	int n_messages; /* recvmsg calls that returned data */
	pid_t peer_pid;
	HRegion regions[4];
	size_t n_regions;
	bool handshake_done;
	struct {
		uint64_t start, end;
	} removes[64];
	size_t n_removes;
	uint64_t n_faults, n_zero_faults, n_eagain; /* pages placed, EAGAIN retries */
	bool exited_on_hup;
	bool exited;
	char error[512]; /* the first one */
} Handler;

static void handler_fail(Handler *h, const char *format, ...) _printf_(2, 3);
static void handler_fail(Handler *h, const char *format, ...)
{
	va_list ap;

	pthread_mutex_lock(&h->lock);
	if (!h->error[0]) {
		va_start(ap, format);
		vsnprintf(h->error, sizeof(h->error), format, ap);
		va_end(ap);
	}
	pthread_mutex_unlock(&h->lock);
}

/* Parses and checks the handshake the way a strict handler would: an array of objects with
 * exactly Firecracker's keys, in Firecracker's order, each an integer. */
static int handler_parse(Handler *h, const char *raw, size_t len)
{
	static const char *const keys[] = {"base_host_virt_addr", "size", "offset", "page_size",
					   "page_size_kib"};
	json_tokener *tok = json_tokener_new();
	json_object *root;
	int r = -EINVAL;

	if (!tok)
		return -ENOMEM;
	root = json_tokener_parse_ex(tok, raw, (int)len);
	if (!root || json_tokener_get_error(tok) != json_tokener_success ||
	    json_tokener_get_parse_end(tok) != len) {
		handler_fail(h, "handshake is not one complete JSON value: %.*s", (int)len, raw);
		goto out;
	}
	if (!json_object_is_type(root, json_type_array)) {
		handler_fail(h, "handshake is not a JSON array");
		goto out;
	}
	if (json_object_array_length(root) < 1 || json_object_array_length(root) > 4) {
		handler_fail(h, "handshake has %zu regions", json_object_array_length(root));
		goto out;
	}
	for (size_t i = 0; i < json_object_array_length(root); i++) {
		json_object *o = json_object_array_get_idx(root, i);
		uint64_t v[ELEMENTSOF(keys)];
		size_t n = 0;

		if (!json_object_is_type(o, json_type_object)) {
			handler_fail(h, "region %zu is not an object", i);
			goto out;
		}
		json_object_object_foreach(o, key, val)
		{
			if (n >= ELEMENTSOF(keys) || strcmp(key, keys[n]) != 0) {
				handler_fail(h, "region %zu: key %zu is \"%s\"", i, n, key);
				goto out;
			}
			if (!json_object_is_type(val, json_type_int)) {
				handler_fail(h, "region %zu: %s is not an integer", i, key);
				goto out;
			}
			v[n++] = json_object_get_uint64(val);
		}
		if (n != ELEMENTSOF(keys)) {
			handler_fail(h, "region %zu has %zu keys", i, n);
			goto out;
		}
		h->regions[i] = (HRegion){v[0], v[1], v[2], v[3], v[4]};
	}
	h->n_regions = json_object_array_length(root);
	r = 0;
out:
	json_object_put(root);
	json_tokener_free(tok);
	return r;
}

static int handler_handshake(Handler *h, int conn)
{
	char raw[sizeof(h->raw)];
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(8 * sizeof(int))];
	} control;
	struct iovec iov = {.iov_base = raw, .iov_len = sizeof(raw)};
	struct msghdr msg = {
		.msg_iov = &iov,
		.msg_iovlen = 1,
		.msg_control = control.buf,
		.msg_controllen = sizeof(control.buf),
	};
	struct ucred cred;
	socklen_t cred_len = sizeof(cred);
	int uffd = -EBADF, n_fds = 0;
	ssize_t k;
	char extra;

	if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &cred_len) < 0) {
		handler_fail(h, "SO_PEERCRED: %m");
		return -errno;
	}
	do
		k = recvmsg(conn, &msg, MSG_CMSG_CLOEXEC);
	while (k < 0 && errno == EINTR);
	if (k <= 0) {
		handler_fail(h, "recvmsg: %zd (%m)", k);
		return -EIO;
	}
	if (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC))
		handler_fail(h, "handshake truncated (flags %#x)", (unsigned)msg.msg_flags);
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
			int fd;

			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			if (n_fds++ == 0)
				uffd = fd;
			else
				close(fd);
		}
	}
	/* Nothing may follow: Firecracker sends one message, then stays silent. */
	if (recv(conn, &extra, 1, MSG_DONTWAIT | MSG_PEEK) != -1 || errno != EAGAIN)
		handler_fail(h, "more than one message in the handshake");

	pthread_mutex_lock(&h->lock);
	memcpy(h->raw, raw, (size_t)k);
	h->raw_len = (size_t)k;
	h->n_fds = n_fds;
	h->n_messages = 1;
	h->peer_pid = cred.pid;
	pthread_mutex_unlock(&h->lock);

	if (n_fds != 1)
		handler_fail(h, "%d fds in the handshake", n_fds);
	if (handler_parse(h, raw, (size_t)k) < 0) {
		safe_close(uffd);
		return -EINVAL;
	}

	/* The layout we expect for expect_size: Firecracker's x86_64 regions, contiguous in the
	 * file, 4 KiB pages. */
	{
		uint64_t left = h->expect_size, off = 0;
		size_t n = 0;

		for (; left > 0 && n < 2; n++) {
			uint64_t sz = n == 0 && left > REGION0 ? REGION0 : left;

			if (n >= h->n_regions || h->regions[n].size != sz ||
			    h->regions[n].offset != off || h->regions[n].page_size != PAGE ||
			    h->regions[n].page_size_kib != PAGE)
				handler_fail(h,
					     "region %zu is not {size %" PRIu64 ", offset %" PRIu64
					     ", 4096, 4096}",
					     n, sz, off);
			left -= sz;
			off += sz;
		}
		if (n != h->n_regions)
			handler_fail(h, "%zu regions, expected %zu", h->n_regions, n);
	}
	pthread_mutex_lock(&h->lock);
	h->handshake_done = true;
	pthread_mutex_unlock(&h->lock);
	return uffd;
}

static bool handler_removed(Handler *h, uint64_t addr)
{
	bool r = false;

	pthread_mutex_lock(&h->lock);
	for (size_t i = 0; i < h->n_removes && !r; i++)
		r = addr >= h->removes[i].start && addr < h->removes[i].end;
	pthread_mutex_unlock(&h->lock);
	return r;
}

/* Serves one fault: 0 done, -EAGAIN retry after the pending events are read, < 0 failed. */
static int handler_serve(Handler *h, int uffd, uint64_t addr)
{
	uint64_t page = addr & ~(uint64_t)(PAGE - 1), off, index;
	uint64_t buf[PAGE / sizeof(uint64_t)];
	const HRegion *r = NULL;

	for (size_t i = 0; i < h->n_regions; i++)
		if (page >= h->regions[i].base && page < h->regions[i].base + h->regions[i].size)
			r = &h->regions[i];
	if (!r) {
		handler_fail(h, "fault at %#" PRIx64 " outside every region", addr);
		return -EFAULT;
	}
	off = page - r->base + r->offset;
	index = off / PAGE;

	if (handler_removed(h, page)) {
		struct uffdio_zeropage z = {.range = {.start = page, .len = PAGE}};

		if (ioctl(uffd, UFFDIO_ZEROPAGE, &z) < 0) {
			if (errno == EEXIST) /* someone else's fault on it was served first */
				return 0;
			if (errno == EAGAIN)
				return -EAGAIN;
			handler_fail(h, "UFFDIO_ZEROPAGE: %m");
			return -errno;
		}
		pthread_mutex_lock(&h->lock);
		h->n_zero_faults++;
		pthread_mutex_unlock(&h->lock);
		return 0;
	}

	if (h->mem_fd >= 0) {
		if (pread(h->mem_fd, buf, PAGE, (off_t)off) != (ssize_t)PAGE) {
			handler_fail(h, "cannot read page %" PRIu64 " of the memory file", index);
			return -EIO;
		}
	} else
		gmem_page_content(h->boot_id, index, (uint8_t *)buf);
	if (index == h->bad_page)
		buf[7] ^= htole64(0xff00);

	struct uffdio_copy c = {.dst = page, .src = (uintptr_t)buf, .len = PAGE};

	if (ioctl(uffd, UFFDIO_COPY, &c) < 0) {
		if (errno == EEXIST)
			return 0;
		if (errno == EAGAIN)
			return -EAGAIN;
		handler_fail(h, "UFFDIO_COPY at %#" PRIx64 ": %m", page);
		return -errno;
	}
	pthread_mutex_lock(&h->lock);
	h->n_faults++;
	pthread_mutex_unlock(&h->lock);
	return 0;
}

static void handler_loop(Handler *h, int conn, int uffd)
{
	uint64_t pending[256];
	size_t n_pending = 0;

	for (;;) {
		struct pollfd p[] = {
			{.fd = uffd, .events = POLLIN},
			{.fd = conn, .events = POLLIN},
			{.fd = h->stop_fd, .events = POLLIN},
		};
		/* EAGAIN from UFFDIO_COPY: the madvise() behind a REMOVE event may not have
		 * finished even after we read the event, so retry soon rather than wait. */
		int r = poll(p, ELEMENTSOF(p), n_pending > 0 ? 1 : -1);

		if (r < 0 && errno != EINTR) {
			handler_fail(h, "poll: %m");
			return;
		}
		if (p[2].revents)
			return;
		if (p[1].revents & (POLLHUP | POLLIN | POLLERR)) {
			char c;

			if (recv(conn, &c, 1, MSG_DONTWAIT) <= 0) {
				pthread_mutex_lock(&h->lock);
				h->exited_on_hup = true;
				pthread_mutex_unlock(&h->lock);
				return;
			}
			handler_fail(h, "unexpected data after the handshake");
		}
		if (p[0].revents & POLLIN) {
			struct uffd_msg msgs[16];
			ssize_t k;

			while ((k = read(uffd, msgs, sizeof(msgs))) > 0) {
				for (size_t i = 0; i < (size_t)k / sizeof(msgs[0]); i++) {
					const struct uffd_msg *m = &msgs[i];

					if (m->event == UFFD_EVENT_PAGEFAULT) {
						if (n_pending == ELEMENTSOF(pending)) {
							handler_fail(h, "too many pending faults");
							return;
						}
						pending[n_pending++] = m->arg.pagefault.address;
					} else if (m->event == UFFD_EVENT_REMOVE) {
						pthread_mutex_lock(&h->lock);
						if (h->n_removes < ELEMENTSOF(h->removes)) {
							h->removes[h->n_removes].start =
								m->arg.remove.start;
							h->removes[h->n_removes].end =
								m->arg.remove.end;
							h->n_removes++;
						}
						pthread_mutex_unlock(&h->lock);
					} else
						handler_fail(h, "unexpected uffd event %u",
							     (unsigned)m->event);
				}
			}
			if (k < 0 && errno != EAGAIN) {
				handler_fail(h, "read from the userfaultfd: %m");
				return;
			}
		}
		while (n_pending > 0) {
			r = handler_serve(h, uffd, pending[0]);
			if (r == -EAGAIN) {
				pthread_mutex_lock(&h->lock);
				h->n_eagain++;
				pthread_mutex_unlock(&h->lock);
				break;
			}
			if (r < 0)
				return;
			memmove(pending, pending + 1, --n_pending * sizeof(pending[0]));
		}
	}
}

static void *handler_thread(void *userdata)
{
	Handler *h = userdata;
	_cleanup_close_ int conn = -EBADF;
	_cleanup_close_ int uffd = -EBADF;
	struct pollfd p[] = {
		{.fd = h->listen_fd, .events = POLLIN},
		{.fd = h->stop_fd, .events = POLLIN},
	};

	if (poll(p, ELEMENTSOF(p), -1) < 0)
		handler_fail(h, "poll: %m");
	else if (p[0].revents & POLLIN) {
		conn = accept4(h->listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (conn < 0)
			handler_fail(h, "accept: %m");
		else {
			uffd = handler_handshake(h, conn);
			if (uffd >= 0)
				handler_loop(h, conn, uffd);
		}
	}
	pthread_mutex_lock(&h->lock);
	h->exited = true;
	pthread_mutex_unlock(&h->lock);
	return NULL;
}

static void handler_start(Handler *h, const char *name, int mem_fd, uint64_t expect_size)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	_cleanup_free_ char *path = tpath(name);

	memset(h, 0, sizeof(*h));
	assert_non_null(path);
	assert_true(strlen(path) < sizeof(h->path));
	memcpy(h->path, path, strlen(path) + 1);
	memcpy(sa.sun_path, path, strlen(path) + 1);
	h->mem_fd = mem_fd;
	h->boot_id = BOOT;
	h->bad_page = UINT64_MAX;
	h->expect_size = expect_size;
	pthread_mutex_init(&h->lock, NULL);
	h->stop_fd = eventfd(0, EFD_CLOEXEC);
	assert_true(h->stop_fd >= 0);
	h->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(h->listen_fd >= 0);
	(void)unlink(path);
	assert_int_equal(bind(h->listen_fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	assert_int_equal(listen(h->listen_fd, 1), 0);
	assert_int_equal(pthread_create(&h->thread, NULL, handler_thread, h), 0);
}

static void handler_stop(Handler *h)
{
	uint64_t one = 1;

	assert_int_equal(write(h->stop_fd, &one, sizeof(one)), sizeof(one));
	assert_int_equal(pthread_join(h->thread, NULL), 0);
	close(h->stop_fd);
	close(h->listen_fd);
	(void)unlink(h->path);
	pthread_mutex_destroy(&h->lock);
}

/* Waits until `cond` holds for h (under its lock); false after TIMEOUT_MS. */
static bool handler_wait(Handler *h, bool (*cond)(const Handler *h, uint64_t arg), uint64_t arg)
{
	for (int ms = 0; ms < TIMEOUT_MS; ms++) {
		bool ok;

		pthread_mutex_lock(&h->lock);
		ok = cond(h, arg);
		pthread_mutex_unlock(&h->lock);
		if (ok)
			return true;
		usleep(1000);
	}
	return false;
}

static bool cond_handshake(const Handler *h, uint64_t arg)
{
	(void)arg;
	return h->handshake_done || h->error[0];
}

static bool cond_removes(const Handler *h, uint64_t n)
{
	return h->n_removes >= n;
}

/* The handler counts a fault after UFFDIO_COPY returns, which is after the faulting thread
 * was woken: the count can lag the verification that caused it by a moment. */
static bool cond_faults(const Handler *h, uint64_t n)
{
	return h->n_faults >= n;
}

static bool cond_zero_faults(const Handler *h, uint64_t n)
{
	return h->n_zero_faults >= n;
}

static bool cond_exited(const Handler *h, uint64_t arg)
{
	(void)arg;
	return h->exited;
}

/* A copy of what the handler recorded, so that a failing assert (a longjmp) never leaves the
 * lock held. */
static Handler *handler_snapshot(Handler *h, Handler *copy)
{
	pthread_mutex_lock(&h->lock);
	*copy = *h;
	pthread_mutex_unlock(&h->lock);
	return copy;
}

/* The handshake must be exactly what Firecracker sends for m's regions. */
static void check_handshake(Handler *handler, const GuestMemory *m)
{
	char expected[4096];
	size_t n = 0;
	Handler copy, *h = &copy;

	assert_true(handler_wait(handler, cond_handshake, 0));
	handler_snapshot(handler, &copy);
	if (h->error[0])
		fail_msg("handler: %s", h->error);
	assert_int_equal(h->n_fds, 1);
	assert_int_equal(h->n_messages, 1);
	assert_int_equal(h->peer_pid, getpid());
	assert_int_equal(h->n_regions, gmem_n_regions(m));
	for (size_t i = 0; i < gmem_n_regions(m); i++) {
		const GmemRegion *r = gmem_region(m, i);

		assert_int_equal(h->regions[i].base, (uint64_t)(uintptr_t)r->host_addr);
		assert_int_equal(h->regions[i].size, r->size);
		assert_int_equal(h->regions[i].offset, r->offset);
		assert_int_equal(h->regions[i].page_size, r->page_size);
		n += (size_t)snprintf(expected + n, sizeof(expected) - n,
				      "%s{\"base_host_virt_addr\":%" PRIu64 ",\"size\":%" PRIu64
				      ",\"offset\":%" PRIu64 ",\"page_size\":4096,"
				      "\"page_size_kib\":4096}",
				      i == 0 ? "[" : ",", (uint64_t)(uintptr_t)r->host_addr,
				      r->size, r->offset);
	}
	n += (size_t)snprintf(expected + n, sizeof(expected) - n, "]");
	assert_int_equal(h->raw_len, n);
	assert_memory_equal(h->raw, expected, n);
}

static void check_handler_clean(Handler *h)
{
	Handler copy;

	if (handler_snapshot(h, &copy)->error[0])
		fail_msg("handler: %s", copy.error);
}

/* ---------------------------------------------------------------------------------------- */

static void test_page_content(void **state)
{
	uint8_t raw[PAGE + 1], *buf = raw + 1; /* deliberately unaligned */
	unsigned zeros = 0;
	const uint64_t extra[] = {1u << 20, REGION0 / PAGE + 3, UINT64_MAX};

	(void)state;
	for (uint64_t j = 0; j < 4096 + ELEMENTSOF(extra); j++) {
		uint64_t i = j < 4096 ? j : extra[j - 4096];
		uint64_t seed = BOOT ^ (i * K), h = ref_splitmix64(seed ^ 0x5bd1e995);
		bool want = ref_splitmix64(seed) % 4 != 0;

		memset(raw, 0xaa, sizeof(raw));
		assert_int_equal(gmem_page_content(BOOT, i, buf), want);
		for (size_t k = 0; k < PAGE / 8; k++) {
			uint64_t w, e;

			memcpy(&w, buf + k * 8, 8);
			w = le64toh(w);
			e = !want    ? 0
			    : k == 0 ? MAGIC
			    : k == 1 ? BOOT
			    : k == 2 ? i
			    : k == 3 ? h
				     : h + k * K;
			if (w != e)
				fail_msg("page %" PRIu64 " word %zu: %#" PRIx64 " != %#" PRIx64, i,
					 k, w, e);
		}
		zeros += !want && j < 4096;
	}
	/* a quarter of the pages are free memory */
	assert_in_range(zeros, 900, 1150);
	assert_true(gmem_page_content(BOOT, content_page(BOOT, 0), buf));
	assert_memory_equal(buf, "FCSIMPG1", 8);
	/* another boot, other content */
	gmem_page_content(BOOT + 1, content_page(BOOT + 1, 0), buf);
	assert_int_equal(buf[8], (uint8_t)(BOOT + 1));
}

static void test_boot_verify(void **state)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL;
	_cleanup_free_ char *error = NULL;
	const GmemRegion *r;
	uint64_t c = content_page(BOOT, 100), z = zero_page(BOOT, 100);

	(void)state;
	assert_int_equal(gmem_boot(64, false, BOOT, &m, &error), 0);
	assert_int_equal(gmem_size(m), 64 * MIB);
	assert_int_equal(gmem_n_regions(m), 1);
	r = gmem_region(m, 0);
	assert_non_null(r);
	assert_null(gmem_region(m, 1));
	assert_int_equal(r->size, 64 * MIB);
	assert_int_equal(r->offset, 0);
	assert_int_equal(r->page_size, 4096);

	/* content pages written, free pages never touched */
	assert_memory_equal(page_ptr(m, c), "FCSIMPG1", 8);
	{
		unsigned char vec = 0xff;

		assert_int_equal(mincore(page_ptr(m, z), PAGE, &vec), 0);
		assert_int_equal(vec & 1, 0);
	}

	assert_int_equal(gmem_verify(m, BOOT, 0, GMEM_ORDER_SEQUENTIAL, 0, &error), 0);
	assert_int_equal(gmem_verify(m, BOOT, 0, GMEM_ORDER_RANDOM, 1, &error), 0);
	assert_int_equal(gmem_verify(m, BOOT, 0, GMEM_ORDER_RANDOM, 0, &error), 0);
	assert_int_equal(gmem_verify(m, BOOT, 5000, GMEM_ORDER_RANDOM, 7, &error), 0);
	assert_int_equal(gmem_verify(m, BOOT, 100, GMEM_ORDER_SEQUENTIAL, 7, NULL), 0);
	assert_null(error);

	/* memory of another boot */
	assert_int_equal(gmem_verify(m, BOOT + 1, 0, GMEM_ORDER_SEQUENTIAL, 0, &error), -EBADMSG);
	assert_non_null(error);
	assert_non_null(strstr(error, "page of boot 0x1234abcd5678ef01 index "));
	assert_non_null(strstr(error, "of 16384 checked pages are wrong"));
	assert_non_null(strstr(error, "; ..."));
}

static void expect_bad(GuestMemory *m, GmemOrder order, uint64_t page, const char *what)
{
	_cleanup_free_ char *error = NULL, *name = NULL;

	assert_int_equal(gmem_verify(m, BOOT, 0, order, 3, &error), -EBADMSG);
	assert_non_null(error);
	assert_true(asprintf(&name, "page %" PRIu64 " (offset %#" PRIx64 "): %s", page, page * PAGE,
			     what) > 0);
	if (!strstr(error, name) || !strstr(error, "1 of 16384 checked pages are wrong"))
		fail_msg("\"%s\" does not name \"%s\"", error, name);
}

static void test_corruption(void **state)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL;
	uint8_t saved[PAGE];
	uint64_t p = content_page(BOOT, 1234), q = content_page(BOOT, p + 1);
	uint64_t z = zero_page(BOOT, 2000);
	uint8_t *pp;
	char what[64];

	(void)state;
	assert_int_equal(gmem_boot(64, false, BOOT, &m, NULL), 0);
	pp = page_ptr(m, p);
	memcpy(saved, pp, PAGE);

	/* one word */
	pp[100 * 8 + 3] ^= 0x10;
	expect_bad(m, GMEM_ORDER_SEQUENTIAL, p, "corrupt word 100 (");
	expect_bad(m, GMEM_ORDER_RANDOM, p, "corrupt word 100 (");
	memcpy(pp, saved, PAGE);
	assert_int_equal(gmem_verify(m, BOOT, 0, GMEM_ORDER_SEQUENTIAL, 0, NULL), 0);

	/* a page zeroed */
	memset(pp, 0, PAGE);
	expect_bad(m, GMEM_ORDER_SEQUENTIAL, p, "zero page");
	memcpy(pp, saved, PAGE);

	/* a page swapped for another */
	memcpy(pp, page_ptr(m, q), PAGE);
	snprintf(what, sizeof(what), "page of boot %#" PRIx64 " index %" PRIu64, (uint64_t)BOOT, q);
	expect_bad(m, GMEM_ORDER_RANDOM, p, what);
	memcpy(pp, saved, PAGE);

	/* a free page that is not zero */
	page_ptr(m, z)[4095] = 1;
	expect_bad(m, GMEM_ORDER_SEQUENTIAL, z, "corrupt word 511 (0x100000000000000, expected 0)");
	page_ptr(m, z)[4095] = 0;
	assert_int_equal(gmem_verify(m, BOOT, 0, GMEM_ORDER_RANDOM, 9, NULL), 0);
}

static void test_discard_anon(void **state)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL;
	_cleanup_free_ char *error = NULL;
	uint64_t p = content_page(BOOT, 300);

	(void)state;
	assert_int_equal(gmem_boot(64, false, BOOT, &m, NULL), 0);
	assert_int_equal(gmem_discard(m, p * PAGE, 32 * PAGE), 0);
	assert_int_equal(gmem_discard(m, (p + 32) * PAGE, 8 * PAGE), 0);
	for (uint64_t i = p; i < p + 40; i++)
		for (size_t k = 0; k < PAGE; k++)
			assert_int_equal(page_ptr(m, i)[k], 0);
	assert_int_equal(gmem_verify(m, BOOT, 0, GMEM_ORDER_SEQUENTIAL, 0, &error), 0);
	assert_int_equal(gmem_verify(m, BOOT, 0, GMEM_ORDER_RANDOM, 4, &error), 0);
	/* content where zeros are expected is wrong */
	page_ptr(m, p)[0] = 0x46;
	assert_int_equal(gmem_verify(m, BOOT, 0, GMEM_ORDER_SEQUENTIAL, 0, &error), -EBADMSG);
	assert_non_null(strstr(error, "should be zero"));

	assert_int_equal(gmem_discard(m, 1, PAGE), -EINVAL);
	assert_int_equal(gmem_discard(m, 0, PAGE + 1), -EINVAL);
	assert_int_equal(gmem_discard(m, 64 * MIB, PAGE), -EINVAL);
	assert_int_equal(gmem_discard(m, 64 * MIB - PAGE, 2 * PAGE), -EINVAL);
	assert_int_equal(gmem_discard(m, 0, 0), 0);
	assert_int_equal(gmem_discard(NULL, 0, PAGE), -EINVAL);
}

static void test_file(void **state)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL, *l = NULL;
	_cleanup_free_ char *path = tpath("mem"), *error = NULL;
	_cleanup_free_ uint8_t *buf = malloc(MIB);
	_cleanup_close_ int fd = -EBADF;
	const GmemRegion *r;
	uint64_t p = content_page(BOOT, 5000);
	struct stat st;

	(void)state;
	assert_non_null(path);
	assert_non_null(buf);
	assert_int_equal(gmem_boot(64, false, BOOT, &m, NULL), 0);
	/* an existing file is replaced */
	fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, 100 * MIB), 0);
	safe_close(TAKE_FD(fd));

	assert_int_equal(gmem_write_file(m, path, &error), 0);
	assert_null(error);
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_size, 64 * MIB);
	/* free pages are holes: about 3/4 of the size is allocated */
	assert_in_range((uint64_t)st.st_blocks * 512, 64 * MIB * 70 / 100, 64 * MIB * 80 / 100);

	/* byte for byte the memory */
	r = gmem_region(m, 0);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	assert_true(fd >= 0);
	for (uint64_t off = 0; off < 64 * MIB; off += MIB) {
		assert_int_equal(pread(fd, buf, MIB, (off_t)off), MIB);
		assert_memory_equal(buf, (uint8_t *)r->host_addr + off, MIB);
	}
	safe_close(TAKE_FD(fd));

	assert_int_equal(gmem_load_file(path, 64, false, &l, &error), 0);
	assert_int_equal(gmem_n_regions(l), 1);
	assert_int_equal(gmem_size(l), 64 * MIB);
	assert_ptr_not_equal(gmem_region(l, 0)->host_addr, r->host_addr);
	assert_int_equal(gmem_verify(l, BOOT, 0, GMEM_ORDER_SEQUENTIAL, 0, &error), 0);
	assert_int_equal(gmem_verify(l, BOOT, 0, GMEM_ORDER_RANDOM, 11, &error), 0);

	/* a discard in a private file mapping reads as zeros, and the file keeps its pages */
	assert_int_equal(gmem_discard(l, p * PAGE, 16 * PAGE), 0);
	assert_int_equal(page_ptr(l, p)[0], 0);
	assert_int_equal(gmem_verify(l, BOOT, 0, GMEM_ORDER_SEQUENTIAL, 0, &error), 0);
	assert_null(error);
	gmem_free(TAKE_PTR(l));
	assert_int_equal(gmem_load_file(path, 64, false, &l, &error), 0);
	assert_int_equal(gmem_verify(l, BOOT, 0, GMEM_ORDER_SEQUENTIAL, 0, &error), 0);
	/* writing a restored memory gives the same file */
	{
		_cleanup_free_ char *path2 = tpath("mem2");
		_cleanup_free_ uint8_t *buf2 = malloc(MIB);
		_cleanup_close_ int fd2 = -EBADF;

		assert_non_null(buf2);
		assert_int_equal(gmem_write_file(l, path2, &error), 0);
		assert_int_equal(stat(path2, &st), 0);
		assert_int_equal(st.st_mode & 0777, 0600);
		fd = open(path, O_RDONLY | O_CLOEXEC);
		fd2 = open(path2, O_RDONLY | O_CLOEXEC);
		assert_true(fd >= 0 && fd2 >= 0);
		for (uint64_t off = 0; off < 64 * MIB; off += MIB) {
			assert_int_equal(pread(fd, buf, MIB, (off_t)off), MIB);
			assert_int_equal(pread(fd2, buf2, MIB, (off_t)off), MIB);
			assert_memory_equal(buf, buf2, MIB);
		}
		assert_int_equal(unlink(path2), 0);
	}
	assert_int_equal(unlink(path), 0);
}

static void test_file_errors(void **state)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL;
	_cleanup_free_ char *path = tpath("short"), *error = NULL, *missing = tpath("missing");
	_cleanup_close_ int fd = -EBADF;

	(void)state;
	assert_non_null(path);
	fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, 63 * MIB), 0);

	assert_int_equal(gmem_load_file(path, 64, false, &m, &error), -EINVAL);
	assert_null(m);
	assert_non_null(error);
	assert_non_null(strstr(error, path));
	assert_non_null(strstr(error, "66060288 bytes"));
	free(TAKE_PTR(error));

	assert_int_equal(gmem_load_file(missing, 64, false, &m, &error), -ENOENT);
	assert_non_null(strstr(error, missing));
	free(TAKE_PTR(error));

	assert_int_equal(gmem_load_file(path, 64, true, &m, &error), -EOPNOTSUPP);
	assert_non_null(strstr(error, "huge pages"));
	free(TAKE_PTR(error));

	assert_int_equal(gmem_load_file(path, 0, false, &m, NULL), -EINVAL);
	assert_int_equal(gmem_write_file(NULL, path, NULL), -EINVAL);
	assert_int_equal(unlink(path), 0);
}

static void test_layout_large(void **state)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL;
	_cleanup_free_ char *path = tpath("large"), *error = NULL;
	_cleanup_close_ int fd = -EBADF;
	const GmemRegion *r0, *r1;

	(void)state;
	fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)(LARGE_MIB * MIB)), 0);
	assert_int_equal(gmem_load_file(path, LARGE_MIB, false, &m, &error), 0);
	assert_int_equal(gmem_size(m), LARGE_MIB * MIB);
	assert_int_equal(gmem_n_regions(m), 2);
	r0 = gmem_region(m, 0);
	r1 = gmem_region(m, 1);
	assert_int_equal(r0->size, REGION0);
	assert_int_equal(r0->offset, 0);
	assert_int_equal(r1->size, LARGE_MIB * MIB - REGION0);
	assert_int_equal(r1->offset, REGION0);
	assert_int_equal(r1->page_size, 4096);
	assert_ptr_not_equal(r0->host_addr, r1->host_addr);
	assert_null(gmem_region(m, 2));
	/* a file of holes: every page reads as zero (few pages: each fault reads ahead) */
	assert_int_equal(gmem_verify(m, BOOT, 16, GMEM_ORDER_RANDOM, 5, &error), -EBADMSG);
	assert_non_null(strstr(error, "zero page"));
	gmem_free(TAKE_PTR(m));
	assert_int_equal(unlink(path), 0);
}

static long meminfo(const char *key)
{
	_cleanup_fclose_ FILE *f = fopen("/proc/meminfo", "re");
	char line[256];
	size_t n = strlen(key);

	while (f && fgets(line, sizeof(line), f))
		if (strncmp(line, key, n) == 0 && line[n] == ':')
			return strtol(line + n + 1, NULL, 10);
	return -1;
}

static void test_huge(void **state)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL;
	_cleanup_free_ char *error = NULL;
	int r;

	(void)state;
	assert_int_equal(gmem_boot(3, true, BOOT, &m, &error), -EINVAL);
	assert_null(m);
	assert_non_null(strstr(error, "not a multiple of the 2 MiB huge page size"));
	free(TAKE_PTR(error));
	assert_int_equal(gmem_boot(0, false, BOOT, &m, NULL), -EINVAL);

	r = gmem_boot(4, true, BOOT, &m, &error);
	if (meminfo("HugePages_Free") >= 2) {
		assert_int_equal(r, 0);
		assert_int_equal(gmem_region(m, 0)->page_size, 2 * MIB);
		assert_int_equal(gmem_verify(m, BOOT, 0, GMEM_ORDER_RANDOM, 1, NULL), 0);
		assert_int_equal(gmem_discard(m, PAGE, PAGE), -EINVAL);
		assert_int_equal(gmem_discard(m, 2 * MIB, 2 * MIB), 0);
		assert_int_equal(gmem_verify(m, BOOT, 0, GMEM_ORDER_SEQUENTIAL, 1, NULL), 0);
	} else {
		/* no huge pages reserved on this machine: a clear refusal */
		assert_true(r < 0);
		assert_null(m);
		assert_non_null(error);
		assert_non_null(strstr(error, "huge pages"));
	}
}

static void test_uffd(void **state)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL, *l = NULL;
	_cleanup_free_ char *path = tpath("uffd-mem"), *error = NULL;
	_cleanup_close_ int fd = -EBADF;
	uint64_t p = content_page(BOOT, 777), base;
	Handler h, c;

	(void)state;
	assert_int_equal(gmem_boot(64, false, BOOT, &m, NULL), 0);
	assert_int_equal(gmem_write_file(m, path, NULL), 0);
	gmem_free(TAKE_PTR(m));
	fd = open(path, O_RDONLY | O_CLOEXEC);
	assert_true(fd >= 0);

	handler_start(&h, "uffd.sock", fd, 64 * MIB);
	if (gmem_load_uffd(h.path, 64, false, &l, &error) < 0) {
		handler_stop(&h);
		fail_msg("gmem_load_uffd: %s", error);
	}
	check_handshake(&h, l);

	assert_int_equal(gmem_verify(l, BOOT, 0, GMEM_ORDER_RANDOM, 21, &error), 0);
	/* every page came through the handler, once: fcsim touched nothing before */
	assert_true(handler_wait(&h, cond_faults, 16384));
	assert_int_equal(handler_snapshot(&h, &c)->n_faults, 16384);
	assert_int_equal(gmem_verify(l, BOOT, 0, GMEM_ORDER_SEQUENTIAL, 0, &error), 0);

	/* a balloon inflates: the handler hears of it and serves zeros there from now on */
	base = (uint64_t)(uintptr_t)gmem_region(l, 0)->host_addr;
	assert_int_equal(gmem_discard(l, p * PAGE, 16 * PAGE), 0);
	assert_true(handler_wait(&h, cond_removes, 1));
	handler_snapshot(&h, &c);
	assert_int_equal(c.n_removes, 1);
	assert_int_equal(c.removes[0].start, base + p * PAGE);
	assert_int_equal(c.removes[0].end, base + (p + 16) * PAGE);
	assert_int_equal(gmem_verify(l, BOOT, 0, GMEM_ORDER_SEQUENTIAL, 0, &error), 0);
	assert_int_equal(gmem_verify(l, BOOT, 0, GMEM_ORDER_RANDOM, 22, &error), 0);
	assert_null(error);
	assert_true(handler_wait(&h, cond_zero_faults, 16));
	assert_int_equal(handler_snapshot(&h, &c)->n_zero_faults, 16);

	/* a snapshot of restored memory: its pages come through the handler too */
	{
		_cleanup_free_ char *path2 = tpath("uffd-mem2"), *want = NULL;
		_cleanup_(gmem_freep) GuestMemory *l2 = NULL;

		assert_int_equal(gmem_write_file(l, path2, &error), 0);
		assert_int_equal(gmem_load_file(path2, 64, false, &l2, &error), 0);
		/* the discarded pages are zeros in the file */
		assert_int_equal(gmem_verify(l2, BOOT, 0, GMEM_ORDER_SEQUENTIAL, 0, &error),
				 -EBADMSG);
		assert_true(asprintf(&want, "page %" PRIu64 " (offset %#" PRIx64 "): zero page", p,
				     p * PAGE) > 0);
		if (!strstr(error, want))
			fail_msg("\"%s\" does not name \"%s\"", error, want);
		free(TAKE_PTR(error));
		assert_int_equal(gmem_discard(l2, p * PAGE, 16 * PAGE), 0);
		assert_int_equal(gmem_verify(l2, BOOT, 0, GMEM_ORDER_SEQUENTIAL, 0, &error), 0);
		assert_int_equal(unlink(path2), 0);
	}

	/* our going away is the handler's signal to exit */
	gmem_free(TAKE_PTR(l));
	assert_true(handler_wait(&h, cond_exited, 0));
	assert_true(handler_snapshot(&h, &c)->exited_on_hup);
	check_handler_clean(&h);
	handler_stop(&h);
	assert_int_equal(unlink(path), 0);
}

static void test_uffd_wrong_page(void **state)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL;
	_cleanup_free_ char *error = NULL, *name = NULL;
	uint64_t p = content_page(BOOT, 3210);
	Handler h;

	(void)state;
	handler_start(&h, "uffd-bad.sock", -1, 16 * MIB);
	h.bad_page = p;
	if (gmem_load_uffd(h.path, 16, false, &m, &error) < 0) {
		handler_stop(&h);
		fail_msg("gmem_load_uffd: %s", error);
	}
	check_handshake(&h, m);
	assert_int_equal(gmem_verify(m, BOOT, 0, GMEM_ORDER_SEQUENTIAL, 0, &error), -EBADMSG);
	assert_true(asprintf(&name,
			     "1 of 4096 checked pages are wrong: page %" PRIu64 " (offset %#" PRIx64
			     "): corrupt word 7 (",
			     p, p * PAGE) > 0);
	if (!strstr(error, name))
		fail_msg("\"%s\" does not name \"%s\"", error, name);
	gmem_free(TAKE_PTR(m));
	assert_true(handler_wait(&h, cond_exited, 0));
	check_handler_clean(&h);
	handler_stop(&h);
}

/* Two regions through the handshake, faults on both sides of the boundary, and a discard
 * across it, on memory too large to write out: the handler computes the pages. */
static void test_uffd_large(void **state)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL;
	_cleanup_free_ char *error = NULL;
	const uint64_t first = REGION0 / PAGE - 8; /* 8 pages each side of the boundary */
	const GmemRegion *r0, *r1;
	Handler h, c;

	(void)state;
	handler_start(&h, "uffd-large.sock", -1, LARGE_MIB * MIB);
	if (gmem_load_uffd(h.path, LARGE_MIB, false, &m, &error) < 0) {
		handler_stop(&h);
		fail_msg("gmem_load_uffd: %s", error);
	}
	check_handshake(&h, m);
	r0 = gmem_region(m, 0);
	r1 = gmem_region(m, 1);
	assert_int_equal(gmem_n_regions(m), 2);
	assert_int_equal(r1->offset, REGION0);

	assert_int_equal(gmem_verify(m, BOOT, 2000, GMEM_ORDER_RANDOM, 31, &error), 0);
	/* the first page of region 1 is page REGION0 / 4096 of the whole memory */
	{
		uint8_t want[PAGE];
		uint64_t i = content_page(BOOT, REGION0 / PAGE);

		gmem_page_content(BOOT, i, want);
		assert_memory_equal(page_ptr(m, i), want, PAGE);
		assert_ptr_equal(page_ptr(m, i), (uint8_t *)r1->host_addr + (i * PAGE - REGION0));
	}

	assert_int_equal(gmem_discard(m, first * PAGE, 16 * PAGE), 0);
	assert_true(handler_wait(&h, cond_removes, 2));
	handler_snapshot(&h, &c);
	assert_int_equal(c.n_removes, 2);
	assert_int_equal(c.removes[0].start, (uintptr_t)r0->host_addr + REGION0 - 8 * PAGE);
	assert_int_equal(c.removes[0].end, (uintptr_t)r0->host_addr + REGION0);
	assert_int_equal(c.removes[1].start, (uintptr_t)r1->host_addr);
	assert_int_equal(c.removes[1].end, (uintptr_t)r1->host_addr + 8 * PAGE);
	for (uint64_t i = first; i < first + 16; i++)
		for (size_t k = 0; k < PAGE; k++)
			assert_int_equal(page_ptr(m, i)[k], 0);
	assert_int_equal(gmem_verify(m, BOOT, 2000, GMEM_ORDER_RANDOM, 32, &error), 0);
	assert_null(error);

	gmem_free(TAKE_PTR(m));
	assert_true(handler_wait(&h, cond_exited, 0));
	check_handler_clean(&h);
	handler_stop(&h);
}

static void test_uffd_errors(void **state)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL;
	_cleanup_free_ char *error = NULL, *path = tpath("nobody.sock"), *want = NULL;

	(void)state;
	assert_int_equal(gmem_load_uffd(path, 16, false, &m, &error), -ENOENT);
	assert_null(m);
	assert_true(asprintf(&want, "cannot connect to the UFFD handler at %s: ", path) > 0);
	assert_non_null(error);
	assert_non_null(strstr(error, want));
	free(TAKE_PTR(error));

	assert_int_equal(gmem_load_uffd(path, 3, true, &m, &error), -EINVAL);
	free(TAKE_PTR(error));
	assert_int_equal(gmem_load_uffd(NULL, 16, false, &m, NULL), -EINVAL);
	gmem_free(NULL);
}

/* Not a pass/fail test: the figures a change of the fill or check loops should be judged by. */
static void test_timing(void **state)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL;
	double t0, t1, t2;

	(void)state;
	t0 = now_s();
	assert_int_equal(gmem_boot(256, false, BOOT, &m, NULL), 0);
	t1 = now_s();
	assert_int_equal(gmem_verify(m, BOOT, 0, GMEM_ORDER_SEQUENTIAL, 0, NULL), 0);
	t2 = now_s();
	print_message("256 MiB: boot %.3f s, verify %.3f s\n", t1 - t0, t2 - t1);
}

static int group_setup(void **state)
{
	(void)state;
	return mkdtemp(tmpdir) ? 0 : -1;
}

static int group_teardown(void **state)
{
	(void)state;
	return rm_rf(tmpdir) == 0 ? 0 : -1;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_page_content), cmocka_unit_test(test_boot_verify),
		cmocka_unit_test(test_corruption),   cmocka_unit_test(test_discard_anon),
		cmocka_unit_test(test_file),         cmocka_unit_test(test_file_errors),
		cmocka_unit_test(test_layout_large), cmocka_unit_test(test_huge),
		cmocka_unit_test(test_uffd),         cmocka_unit_test(test_uffd_wrong_page),
		cmocka_unit_test(test_uffd_large),   cmocka_unit_test(test_uffd_errors),
		cmocka_unit_test(test_timing),
	};

	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
