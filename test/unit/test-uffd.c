/* SPDX-License-Identifier: Apache-2.0 */
/*
 * fcctl/uffd: the handshake parser (valid and refused handshakes, fd ownership), then the
 * whole server end to end against a stand-in "VMM" that behaves as Firecracker does: a
 * userfaultfd with UFFD_FEATURE_EVENT_REMOVE, anonymous (or hugetlb) memory registered in
 * MISSING mode, one sendmsg() carrying the JSON array and the uffd.
 *
 * Where the server must kill the VMM, the VMM is a forked child and the server runs on the
 * test's thread; where the server's own memory is measured, the server is the child.
 * Otherwise the server runs in a thread of the test process (cmocka's asserts stay on the
 * test's own thread: they longjmp).
 *
 * UFFD_TEST_FAULTS=N changes the number of faults of the memory-growth test (default 100000).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <limits.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
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
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/fileio.h"
#include "common/macro.h"
#include "fcctl/uffd.h"

#define MIB        (1ull << 20)
#define PAGE       4096ull
#define HPAGE      (2ull << 20)
#define MEM_SIZE   (256 * MIB) /* the shared memory file */
#define WAIT_MS    20000
#define CHILD_SECS 60 /* a VMM child that was not killed gives up */

static char tmpdir[] = "/tmp/test-uffd.XXXXXX";
static char mem_path[PATH_MAX];

static void tpath(char *buf, const char *name)
{
	snprintf(buf, PATH_MAX, "%s/%s", tmpdir, name);
}

/* Every 8-byte word of file page i holds this: pages are told apart, and from zero pages. */
static uint64_t page_word(uint64_t file_page)
{
	return 0xA5A5000000000000ull | file_page;
}

static int write_memfile(const char *path, uint64_t size)
{
	_cleanup_close_ int fd = -EBADF;
	_cleanup_free_ uint64_t *buf = malloc(MIB);

	if (!buf)
		return -ENOMEM;
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -errno;
	for (uint64_t off = 0; off < size; off += MIB) {
		for (uint64_t w = 0; w < MIB / 8; w++)
			buf[w] = page_word((off + w * 8) / PAGE);
		if (pwrite(fd, buf, MIB, (off_t)off) != (ssize_t)MIB)
			return -EIO;
	}
	return 0;
}

/* What a guest page should hold: the file page's words, or zeros. */
static bool page_ok(const uint8_t *p, uint64_t file_page, bool zero)
{
	const volatile uint64_t *w = (const volatile uint64_t *)p;
	uint64_t want = zero ? 0 : page_word(file_page);

	for (size_t k = 0; k < PAGE / 8; k++)
		if (w[k] != want)
			return false;
	return true;
}

static uint64_t xorshift(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void shuffle(uint64_t *a, uint64_t n, uint64_t seed)
{
	for (uint64_t i = 0; i < n; i++)
		a[i] = i;
	for (uint64_t i = n - 1; i > 0; i--) {
		uint64_t j = xorshift(&seed) % (i + 1), t = a[i];

		a[i] = a[j];
		a[j] = t;
	}
}

static int wait_for_path(const char *path)
{
	for (int i = 0; i < WAIT_MS; i++) {
		if (access(path, F_OK) == 0)
			return 0;
		usleep(1000);
	}
	return -ETIMEDOUT;
}

/* ------------------------------------------------------------------------------------------ */
/* handshake parsing */

static char *region_json(uint64_t base, uint64_t size, uint64_t offset, uint64_t ps, uint64_t kib)
{
	char *s;

	if (asprintf(&s,
		     "{\"base_host_virt_addr\":%" PRIu64 ",\"size\":%" PRIu64 ",\"offset\":%" PRIu64
		     ",\"page_size\":%" PRIu64 ",\"page_size_kib\":%" PRIu64 "}",
		     base, size, offset, ps, kib) < 0)
		return NULL;
	return s;
}

static int dup_null(void)
{
	int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);

	assert_true(fd >= 0);
	return fd;
}

static bool fd_closed(int fd)
{
	return fcntl(fd, F_GETFD) < 0 && errno == EBADF;
}

static void test_parse_valid(void **state)
{
	_cleanup_free_ char *r0 = region_json(0x7f0000000000, 128 * MIB, 0, PAGE, PAGE);
	_cleanup_free_ char *h0 = region_json(0x7e0000000000, 64 * MIB, 0, HPAGE, HPAGE);
	_cleanup_free_ char *h1 = region_json(0x7f0000200000, 8 * HPAGE, 64 * MIB, HPAGE, HPAGE);
	_cleanup_free_ char *r1 = region_json(0x7f0000000000, 128 * MIB, 64 * MIB, PAGE, PAGE);
	_cleanup_free_ char *one = NULL, *two = NULL, *mixed = NULL, *err = NULL;
	UffdHandshake h;
	int fd, r;

	(void)state;
	assert_true(asprintf(&one, "[%s]", r0) > 0);
	assert_true(asprintf(&two, " [%s, %s]\n", h0, h1) > 0);
	assert_true(asprintf(&mixed, "[%s,%s]", h0, r1) > 0);

	fd = dup_null();
	r = uffd_handshake_parse(one, strlen(one), &fd, 1, &h, &err);
	assert_int_equal(r, 0);
	assert_null(err);
	assert_int_equal(h.uffd, fd);
	assert_int_equal(h.n_regions, 1);
	assert_int_equal(h.regions[0].base_host_virt_addr, 0x7f0000000000);
	assert_int_equal(h.regions[0].size, 128 * MIB);
	assert_int_equal(h.regions[0].offset, 0);
	assert_int_equal(h.regions[0].page_size, PAGE);
	close(h.uffd);

	fd = dup_null();
	r = uffd_handshake_parse(two, strlen(two), &fd, 1, &h, &err);
	assert_int_equal(r, 0);
	assert_int_equal(h.n_regions, 2);
	assert_int_equal(h.regions[1].base_host_virt_addr, 0x7f0000200000);
	assert_int_equal(h.regions[1].size, 16 * MIB);
	assert_int_equal(h.regions[1].offset, 64 * MIB);
	assert_int_equal(h.regions[1].page_size, HPAGE);
	close(h.uffd);

	fd = dup_null();
	r = uffd_handshake_parse(mixed, strlen(mixed), &fd, 1, &h, &err);
	assert_int_equal(r, 0);
	assert_int_equal(h.regions[0].page_size, HPAGE);
	assert_int_equal(h.regions[1].page_size, PAGE);
	close(h.uffd);

	/* not NUL-terminated: only len bytes count */
	fd = dup_null();
	{
		_cleanup_free_ char *buf = NULL;

		assert_true(asprintf(&buf, "%sgarbage", one) > 0);
		r = uffd_handshake_parse(buf, strlen(one), &fd, 1, &h, &err);
		assert_int_equal(r, 0);
		close(h.uffd);
	}
}

static void test_parse_refused(void **state)
{
	char *bad[64] = {0};
	size_t n = 0;
	char *r0 = region_json(0x7f0000000000, 16 * MIB, 0, PAGE, PAGE);
	const char *keys[] = {"base_host_virt_addr", "size", "offset", "page_size",
			      "page_size_kib"};

	(void)state;
#define ADD(...) assert_true(asprintf(&bad[n++], __VA_ARGS__) > 0)
#define ADD_REGION(...)                                                                            \
	do {                                                                                       \
		_cleanup_free_ char *o_ = region_json(__VA_ARGS__);                                \
		ADD("[%s]", o_);                                                                   \
	} while (0)
#define ADD_SECOND(...)                                                                            \
	do {                                                                                       \
		_cleanup_free_ char *o_ = region_json(__VA_ARGS__);                                \
		ADD("[%s,%s]", r0, o_);                                                            \
	} while (0)
	ADD("%s", "not json");
	ADD("%s", "{\"a\": 1}");
	ADD("%s", "null");
	ADD("%s", "42 ");
	ADD("%s", "[]");
	ADD("%s", "[1]");
	ADD("%s", "[[]]");
	ADD("[%s", r0);
	ADD("[%s] x", r0);
	ADD("[%s][%s]", r0, r0);
	/* missing keys: the valid object with one key renamed */
	for (size_t k = 0; k < ELEMENTSOF(keys); k++) {
		char *s = strdup(r0), *p = strstr(s, keys[k]);

		p[strlen(keys[k]) - 1] = 'X';
		ADD("[%s]", s);
		free(s);
	}
	/* wrong types */
	ADD("%s", "[{\"base_host_virt_addr\":\"4096\",\"size\":4096,\"offset\":0,\"page_size\":"
		  "4096,\"page_size_kib\":4096}]");
	ADD("%s", "[{\"base_host_virt_addr\":4096,\"size\":4096.0,\"offset\":0,\"page_size\":"
		  "4096,\"page_size_kib\":4096}]");
	ADD("%s", "[{\"base_host_virt_addr\":4096,\"size\":4096,\"offset\":true,\"page_size\":"
		  "4096,\"page_size_kib\":4096}]");
	ADD("%s", "[{\"base_host_virt_addr\":4096,\"size\":4096,\"offset\":0,\"page_size\":"
		  "null,\"page_size_kib\":4096}]");
	ADD("%s", "[{\"base_host_virt_addr\":4096,\"size\":4096,\"offset\":0,\"page_size\":"
		  "4096,\"page_size_kib\":[4096]}]");
	/* negative, zero */
	ADD("%s", "[{\"base_host_virt_addr\":4096,\"size\":-4096,\"offset\":0,\"page_size\":"
		  "4096,\"page_size_kib\":4096}]");
	ADD("%s", "[{\"base_host_virt_addr\":-4096,\"size\":4096,\"offset\":0,\"page_size\":"
		  "4096,\"page_size_kib\":4096}]");
	ADD_REGION(4096, 0, 0, PAGE, PAGE);
	/* page sizes */
	ADD_REGION(8192, 8192, 0, 8192, 8192);
	ADD_REGION(4096, 4096, 0, PAGE, 4); /* KiB, as the name says: not sent */
	ADD_REGION(HPAGE, HPAGE, 0, HPAGE, PAGE);
	ADD_REGION(HPAGE, HPAGE, 0, 0, 0);
	/* alignment */
	ADD_REGION(4097, 4096, 0, PAGE, PAGE);
	ADD_REGION(4096, 4097, 0, PAGE, PAGE);
	ADD_REGION(4096, 4096, 100, PAGE, PAGE);
	ADD_REGION(PAGE, HPAGE, 0, HPAGE, HPAGE);
	ADD_REGION(HPAGE, HPAGE, PAGE, HPAGE, HPAGE);
	/* overflow */
	ADD_REGION(UINT64_MAX - PAGE + 1, 2 * PAGE, 0, PAGE, PAGE);
	ADD_REGION(PAGE, PAGE, (uint64_t)INT64_MAX - PAGE + 1, PAGE, PAGE);
	ADD("%s", "[{\"base_host_virt_addr\":18446744073709551616,\"size\":4096,\"offset\":0,"
		  "\"page_size\":4096,\"page_size_kib\":4096}]");
	/* overlap, in memory and in the file */
	ADD_SECOND(0x7f0000000000 + 8 * MIB, 16 * MIB, 16 * MIB, PAGE, PAGE);
	ADD_SECOND(0x7f0000000000 - PAGE, 2 * PAGE, 16 * MIB, PAGE, PAGE);
	ADD_SECOND(0x7e0000000000, 16 * MIB, 8 * MIB, PAGE, PAGE);
	/* too many regions */
	{
		size_t len = 0, cap = (size_t)200 * (UFFD_MAX_REGIONS + 1);
		char *s = malloc(cap);

		len += (size_t)snprintf(s + len, cap - len, "[");
		for (uint64_t i = 0; i <= UFFD_MAX_REGIONS; i++) {
			char *o = region_json(0x10000000 + i * PAGE, PAGE, i * PAGE, PAGE, PAGE);

			len += (size_t)snprintf(s + len, cap - len, "%s%s", i ? "," : "", o);
			free(o);
		}
		snprintf(s + len, cap - len, "]");
		bad[n++] = s;
	}
#undef ADD
#undef ADD_REGION
#undef ADD_SECOND
	assert_true(n < ELEMENTSOF(bad));

	for (size_t i = 0; i < n; i++) {
		_cleanup_free_ char *err = NULL;
		UffdHandshake h, before;
		int fd = dup_null(), r;

		memset(&h, 0x5a, sizeof(h));
		before = h;
		r = uffd_handshake_parse(bad[i], strlen(bad[i]), &fd, 1, &h, &err);
		if (r >= 0)
			fail_msg("accepted: %s", bad[i]);
		assert_non_null(err);
		assert_true(fd_closed(fd));
		assert_memory_equal(&h, &before, sizeof(h)); /* untouched */
		free(bad[i]);
	}
	free(r0);

	/* embedded NUL, and an empty message */
	{
		static const char nul[] = "[{\"size\":4096}\0]";
		_cleanup_free_ char *err = NULL, *err2 = NULL;
		UffdHandshake h;
		int fd = dup_null(), fd2 = dup_null();

		assert_true(uffd_handshake_parse(nul, sizeof(nul) - 1, &fd, 1, &h, &err) < 0);
		assert_true(fd_closed(fd));
		assert_true(uffd_handshake_parse("", 0, &fd2, 1, &h, &err2) < 0);
		assert_true(fd_closed(fd2));
	}
}

static void test_parse_fds(void **state)
{
	_cleanup_free_ char *r0 = region_json(0x7f0000000000, 16 * MIB, 0, PAGE, PAGE);
	_cleanup_free_ char *good = NULL, *err0 = NULL, *err2 = NULL, *err3 = NULL;
	UffdHandshake h;
	int fds[3];

	(void)state;
	assert_true(asprintf(&good, "[%s]", r0) > 0);

	assert_int_equal(uffd_handshake_parse(good, strlen(good), NULL, 0, &h, &err0), -EBADMSG);
	assert_non_null(strstr(err0, "0 file descriptors"));

	fds[0] = dup_null();
	fds[1] = dup_null();
	assert_int_equal(uffd_handshake_parse(good, strlen(good), fds, 2, &h, &err2), -EBADMSG);
	assert_non_null(strstr(err2, "2 file descriptors"));
	assert_true(fd_closed(fds[0]));
	assert_true(fd_closed(fds[1]));

	/* also when the JSON is bad as well */
	for (size_t i = 0; i < 3; i++)
		fds[i] = dup_null();
	assert_true(uffd_handshake_parse("x", 1, fds, 3, &h, &err3) < 0);
	for (size_t i = 0; i < 3; i++)
		assert_true(fd_closed(fds[i]));

	/* no error wanted: still refused, still closed */
	fds[0] = dup_null();
	fds[1] = dup_null();
	assert_true(uffd_handshake_parse(good, strlen(good), fds, 2, &h, NULL) < 0);
	assert_true(fd_closed(fds[0]) && fd_closed(fds[1]));
}

/* ------------------------------------------------------------------------------------------ */
/* the stand-in VMM */

typedef struct VmmRegion {
	uint8_t *addr;
	uint64_t size;     /* mapped and registered */
	uint64_t declared; /* in the handshake */
	uint64_t offset;
} VmmRegion;

typedef struct Vmm {
	int uffd, sock;
	uint64_t page_size;
	size_t n;
	VmmRegion r[2];
} Vmm;

/* Firecracker maps hugetlb guest memory MAP_NORESERVE: the pool can run dry at fault time. */
static bool vmm_hugetlb_noreserve;

static void vmm_destroy(Vmm *v)
{
	/* The uffd first: once closed, touching the memory no longer waits for a server. */
	safe_close(v->uffd);
	safe_close(v->sock);
	for (size_t i = 0; i < v->n; i++)
		if (v->r[i].addr)
			munmap(v->r[i].addr, v->r[i].size);
	*v = (Vmm){.uffd = -EBADF, .sock = -EBADF};
}

/* Firecracker's userfaultfd: non-blocking, with REMOVE events. */
static int vmm_uffd(void)
{
	struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE};
	int fd;

	fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
	if (fd < 0 && errno == EINVAL)
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		return -errno;
	if (ioctl(fd, UFFDIO_API, &api) < 0) {
		int r = -errno;

		close(fd);
		return r;
	}
	return fd;
}

/* Maps and registers n regions of sizes[i] bytes, at file offsets offsets[i]. -EOPNOTSUPP
 * when huge pages are wanted but none are available. */
static int vmm_create(Vmm *v, uint64_t page_size, size_t n, const uint64_t *sizes,
		      const uint64_t *offsets)
{
	*v = (Vmm){.uffd = -EBADF, .sock = -EBADF, .page_size = page_size, .n = n};
	v->uffd = vmm_uffd();
	if (v->uffd < 0)
		return v->uffd;
	for (size_t i = 0; i < n; i++) {
		/* hugetlb without MAP_NORESERVE: mmap() fails when the pool is too small, rather
		 * than a copy later */
		int flags = MAP_PRIVATE | MAP_ANONYMOUS;
		struct uffdio_register reg;
		void *p;

		if (page_size == HPAGE)
			flags |= MAP_HUGETLB | (vmm_hugetlb_noreserve ? MAP_NORESERVE : 0);
		else
			flags |= MAP_NORESERVE;
		p = mmap(NULL, sizes[i], PROT_READ | PROT_WRITE, flags, -1, 0);
		if (p == MAP_FAILED) {
			vmm_destroy(v);
			return page_size == HPAGE ? -EOPNOTSUPP : -ENOMEM;
		}
		v->r[i] = (VmmRegion){
			.addr = p, .size = sizes[i], .declared = sizes[i], .offset = offsets[i]};
		reg = (struct uffdio_register){
			.range = {.start = (uintptr_t)p, .len = sizes[i]},
			.mode = UFFDIO_REGISTER_MODE_MISSING,
		};
		if (ioctl(v->uffd, UFFDIO_REGISTER, &reg) < 0) {
			int r = -errno;

			vmm_destroy(v);
			return r;
		}
	}
	return 0;
}

static int vmm_connect(Vmm *v, const char *sock_path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};

	if (wait_for_path(sock_path) < 0)
		return -ETIMEDOUT;
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", sock_path);
	v->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (v->sock < 0)
		return -errno;
	if (connect(v->sock, (const struct sockaddr *)&sa, sizeof(sa)) < 0)
		return -errno;
	return 0;
}

/* One sendmsg, no newline, no length prefix, as Firecracker does. */
static int send_raw(int sock, const char *text, const int *fds, size_t n_fds)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int) * 4)];
	} control;
	struct iovec iov = {.iov_base = (void *)text, .iov_len = strlen(text)};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
	ssize_t k;

	assert_true(n_fds <= 4);
	memset(&control, 0, sizeof(control));
	if (n_fds > 0) {
		struct cmsghdr *c;

		msg.msg_control = control.buf;
		msg.msg_controllen = CMSG_SPACE(sizeof(int) * n_fds);
		c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * n_fds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * n_fds);
	}
	k = sendmsg(sock, &msg, MSG_NOSIGNAL);
	if (k < 0)
		return -errno;
	return (size_t)k == iov.iov_len ? 0 : -EIO;
}

static char *vmm_handshake_json(const Vmm *v)
{
	json_object *array = json_object_new_array();
	char *s;

	for (size_t i = 0; i < v->n; i++) {
		json_object *o = json_object_new_object();

		json_object_object_add(o, "base_host_virt_addr",
				       json_object_new_uint64((uintptr_t)v->r[i].addr));
		json_object_object_add(o, "size", json_object_new_uint64(v->r[i].declared));
		json_object_object_add(o, "offset", json_object_new_uint64(v->r[i].offset));
		json_object_object_add(o, "page_size", json_object_new_uint64(v->page_size));
		json_object_object_add(o, "page_size_kib", json_object_new_uint64(v->page_size));
		json_object_array_add(array, o);
	}
	s = strdup(json_object_to_json_string_ext(array, JSON_C_TO_STRING_PLAIN));
	json_object_put(array);
	return s;
}

static int vmm_send_handshake(Vmm *v, size_t n_fds)
{
	_cleanup_free_ char *text = vmm_handshake_json(v);
	int fds[2] = {v->uffd, v->uffd};

	return send_raw(v->sock, text, fds, n_fds);
}

/* Create + connect + handshake. */
static int vmm_start(Vmm *v, const char *sock_path, uint64_t page_size, size_t n,
		     const uint64_t *sizes, const uint64_t *offsets)
{
	int r = vmm_create(v, page_size, n, sizes, offsets);

	if (r < 0)
		return r;
	r = vmm_connect(v, sock_path);
	if (r < 0)
		return r;
	return vmm_send_handshake(v, 1);
}

static bool wait_resident(const uint8_t *addr, uint64_t size, uint64_t skip_from, uint64_t skip_to)
{
	uint64_t n = size / PAGE;
	_cleanup_free_ unsigned char *vec = n > 0 ? malloc(n) : NULL;

	if (!vec)
		return false;
	for (int t = 0; t < WAIT_MS; t++) {
		bool all = true;

		if (mincore((void *)addr, size, vec) < 0)
			return false;
		for (uint64_t i = 0; i < n && all; i++)
			if (!(vec[i] & 1) && !(i * PAGE >= skip_from && i * PAGE < skip_to))
				all = false;
		if (all)
			return true;
		usleep(1000);
	}
	return false;
}

/* ------------------------------------------------------------------------------------------ */
/* the server, in a thread of this process */

typedef struct ServerRun {
	pthread_t thread;
	char sock[PATH_MAX];
	char mem[PATH_MAX];
	UffdOptions opt;
	int r;
	UffdStats st;
	char *error;
} ServerRun;

static void *server_thread(void *userdata)
{
	ServerRun *s = userdata;

	s->r = uffd_serve(s->sock, s->mem, &s->opt, &s->st, &s->error);
	return NULL;
}

static void server_start(ServerRun *s, const char *sock_name, const char *mem, bool prefetch)
{
	*s = (ServerRun){.opt = {.prefetch = prefetch, .timeout_ms = WAIT_MS}};
	tpath(s->sock, sock_name);
	snprintf(s->mem, sizeof(s->mem), "%s", mem);
	(void)unlink(s->sock);
	assert_int_equal(pthread_create(&s->thread, NULL, server_thread, s), 0);
}

static void server_join(ServerRun *s)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += WAIT_MS / 1000;
	assert_int_equal(pthread_timedjoin_np(s->thread, NULL, &ts), 0);
}

static void server_check_stats(const UffdStats *st)
{
	assert_true(st->p50_ns <= st->p99_ns);
	assert_true(st->p99_ns <= st->max_ns);
	if (st->faults > 0)
		assert_true(st->max_ns > 0);
}

/* Touches every page of region i in order (or shuffled) and checks it against the file. */
static void touch_check(const Vmm *v, size_t i, bool random, uint64_t zero_from, uint64_t zero_to)
{
	const VmmRegion *reg = &v->r[i];
	uint64_t n = reg->size / PAGE;
	_cleanup_free_ uint64_t *order = NULL;

	if (n == 0 || !reg->addr || !(order = malloc(n * sizeof(uint64_t)))) {
		fail_msg("no region %zu", i);
		return; /* fail_msg() does not return: for the analyzer */
	}
	if (random)
		shuffle(order, n, 0x1234567 + i);
	else
		for (uint64_t k = 0; k < n; k++)
			order[k] = k;
	for (uint64_t k = 0; k < n; k++) {
		uint64_t p = order[k], off = p * PAGE;
		bool zero = off >= zero_from && off < zero_to;

		if (!page_ok(reg->addr + off, (reg->offset + off) / PAGE, zero))
			fail_msg("region %zu page %" PRIu64 ": wrong content (expected %s)", i, p,
				 zero ? "zeros" : "the file's page");
	}
}

static void test_serve_basic(void **state)
{
	const uint64_t sizes[] = {8 * MIB, 4 * MIB}, offsets[] = {0, 16 * MIB};
	ServerRun s;
	Vmm v;

	(void)state;
	server_start(&s, "basic.sock", mem_path, false);
	assert_int_equal(vmm_start(&v, s.sock, PAGE, 2, sizes, offsets), 0);
	touch_check(&v, 0, false, 0, 0);
	/* the socket name is gone once Firecracker is connected */
	assert_int_equal(access(s.sock, F_OK), -1);
	touch_check(&v, 1, true, 0, 0);
	touch_check(&v, 0, true, 0, 0); /* present now: no more faults */

	v.sock = safe_close(v.sock); /* Firecracker goes away */
	server_join(&s);
	assert_int_equal(s.r, 0);
	assert_null(s.error);
	assert_string_equal(s.st.end_reason, "firecracker closed the connection");
	assert_int_equal(s.st.peer, getpid());
	assert_int_equal(s.st.faults, (8 + 4) * MIB / PAGE);
	assert_int_equal(s.st.pages_copied, (8 + 4) * MIB / PAGE);
	assert_int_equal(s.st.bytes_copied, (8 + 4) * MIB);
	assert_int_equal(s.st.zero_pages, 0);
	assert_int_equal(s.st.removes, 0);
	server_check_stats(&s.st);
	assert_true(s.st.p50_ns > 0);
	vmm_destroy(&v);
}

static void test_serve_prefetch(void **state)
{
	const uint64_t size = 64 * MIB, off = 32 * MIB;
	ServerRun s;
	Vmm v;

	(void)state;
	/* untouched: prefetch alone brings every page in */
	server_start(&s, "prefetch.sock", mem_path, true);
	assert_int_equal(vmm_start(&v, s.sock, PAGE, 1, &size, &off), 0);
	assert_true(wait_resident(v.r[0].addr, size, 0, 0));
	touch_check(&v, 0, true, 0, 0);
	v.sock = safe_close(v.sock);
	server_join(&s);
	assert_int_equal(s.r, 0);
	assert_int_equal(s.st.faults, 0);
	assert_int_equal(s.st.pages_copied, size / PAGE);
	assert_int_equal(s.st.bytes_copied, size);
	vmm_destroy(&v);

	/* touched at once, sequentially and randomly: faults race the prefetcher */
	for (int random = 0; random < 2; random++) {
		server_start(&s, "prefetch.sock", mem_path, true);
		assert_int_equal(vmm_start(&v, s.sock, PAGE, 1, &size, &off), 0);
		touch_check(&v, 0, random, 0, 0);
		assert_true(wait_resident(v.r[0].addr, size, 0, 0));
		v.sock = safe_close(v.sock);
		server_join(&s);
		assert_int_equal(s.r, 0);
		/* every page exactly once, by a fault or by the prefetcher */
		assert_int_equal(s.st.pages_copied, size / PAGE);
		assert_true(s.st.faults <= size / PAGE);
		server_check_stats(&s.st);
		print_message(
			"prefetch %s: %" PRIu64 " faults, %" PRIu64 " eexist, %" PRIu64 " eagain\n",
			random ? "random" : "sequential", s.st.faults, s.st.eexist, s.st.eagain);
		vmm_destroy(&v);
	}
}

static void test_remove(void **state)
{
	const uint64_t size = 4 * MIB, off = 0;
	ServerRun s;
	Vmm v;

	(void)state;
	server_start(&s, "remove.sock", mem_path, false);
	assert_int_equal(vmm_start(&v, s.sock, PAGE, 1, &size, &off), 0);
	/* pages 0..255 present, 256.. never touched */
	for (uint64_t p = 0; p < 256; p++)
		assert_true(page_ok(v.r[0].addr + p * PAGE, p, false));
	/* the balloon gives back pages 100..299: touched ones and never touched ones */
	assert_int_equal(madvise(v.r[0].addr + 100 * PAGE, 200 * PAGE, MADV_DONTNEED), 0);
	touch_check(&v, 0, false, 100 * PAGE, 300 * PAGE);
	/* zero pages stay as written once present */
	memset(v.r[0].addr + 150 * PAGE, 0x77, PAGE);
	assert_int_equal(v.r[0].addr[150 * PAGE + 4095], 0x77);
	/* removed again: zero again */
	assert_int_equal(madvise(v.r[0].addr + 150 * PAGE, PAGE, MADV_DONTNEED), 0);
	assert_true(page_ok(v.r[0].addr + 150 * PAGE, 150, true));

	v.sock = safe_close(v.sock);
	server_join(&s);
	assert_int_equal(s.r, 0);
	assert_int_equal(s.st.removes, 2);
	assert_int_equal(s.st.zero_pages, 201);
	/* 256 before the REMOVE, then all but the 300 pages present or removed */
	assert_int_equal(s.st.pages_copied, 256 + size / PAGE - 300);
	vmm_destroy(&v);
}

static void test_remove_prefetch(void **state)
{
	const uint64_t size = 128 * MIB, off = 0;
	const uint64_t from = 100 * MIB, to = 116 * MIB;
	ServerRun s;
	Vmm v;

	(void)state;
	/* REMOVE while the prefetcher runs: the range must read as zeros, whichever came first */
	for (int i = 0; i < 3; i++) {
		server_start(&s, "remove-prefetch.sock", mem_path, true);
		assert_int_equal(vmm_start(&v, s.sock, PAGE, 1, &size, &off), 0);
		if (i > 0)
			usleep(i == 1 ? 5000 : 25000); /* let the prefetcher get near */
		assert_int_equal(madvise(v.r[0].addr + from, to - from, MADV_DONTNEED), 0);
		assert_true(wait_resident(v.r[0].addr, size, from, to));
		touch_check(&v, 0, false, from, to);
		v.sock = safe_close(v.sock);
		server_join(&s);
		assert_int_equal(s.r, 0);
		assert_int_equal(s.st.removes, 1);
		assert_int_equal(s.st.zero_pages, (to - from) / PAGE);
		vmm_destroy(&v);
	}
}

static void test_huge(void **state)
{
	const uint64_t size = 16 * MIB, off = 8 * MIB;
	ServerRun s;
	Vmm v;
	int r;

	(void)state;
	r = vmm_create(&v, HPAGE, 1, &size, &off);
	if (r == -EOPNOTSUPP) {
		print_message("no 2 MiB huge pages (vm.nr_hugepages): skipped\n");
		skip();
	}
	assert_int_equal(r, 0);
	vmm_destroy(&v);

	for (int prefetch = 0; prefetch < 2; prefetch++) {
		server_start(&s, "huge.sock", mem_path, prefetch);
		assert_int_equal(vmm_start(&v, s.sock, HPAGE, 1, &size, &off), 0);
		touch_check(&v, 0, true, 0, 0);
		/* one huge page removed: zero afterwards */
		assert_int_equal(madvise(v.r[0].addr + 2 * HPAGE, HPAGE, MADV_DONTNEED), 0);
		touch_check(&v, 0, false, 2 * HPAGE, 3 * HPAGE);
		v.sock = safe_close(v.sock);
		server_join(&s);
		assert_int_equal(s.r, 0);
		assert_int_equal(s.st.pages_copied, size / HPAGE);
		assert_int_equal(s.st.bytes_copied, size);
		assert_int_equal(s.st.zero_pages, 1);
		if (!prefetch)
			assert_int_equal(s.st.faults, size / HPAGE + 1);
		vmm_destroy(&v);
	}
}

/* ------------------------------------------------------------------------------------------ */
/* the VMM as a child: for the cases where the server kills it */

typedef struct ChildSpec {
	const char *sock;
	uint64_t size;     /* mapped, registered, touched */
	uint64_t declared; /* in the handshake */
	size_t n_fds;
	int ready_fd, go_fd; /* >= 0: say when the handshake is sent, wait before touching */
	uint64_t touch;      /* bytes touched, then exit(0) */
	bool huge_noreserve; /* 2 MiB pages, mapped MAP_NORESERVE */
} ChildSpec;

static pid_t vmm_child(const ChildSpec *c)
{
	pid_t pid = fork();

	assert_true(pid >= 0);
	if (pid == 0) {
		const uint64_t off = 0;
		char b = 0;
		Vmm v;

		alarm(CHILD_SECS);
		vmm_hugetlb_noreserve = c->huge_noreserve;
		if (vmm_create(&v, c->huge_noreserve ? HPAGE : PAGE, 1, &c->size, &off) < 0 ||
		    !v.r[0].addr || vmm_connect(&v, c->sock) < 0)
			_exit(3);
		v.r[0].declared = c->declared;
		if (vmm_send_handshake(&v, c->n_fds) < 0)
			_exit(4);
		if (c->ready_fd >= 0 &&
		    (write(c->ready_fd, "h", 1) != 1 || read(c->go_fd, &b, 1) != 1))
			_exit(5);
		for (uint64_t o = 0; o < c->touch; o += PAGE)
			if (!page_ok(v.r[0].addr + o, o / PAGE, false))
				_exit(6);
		_exit(0);
	}
	return pid;
}

static int wait_child(pid_t pid)
{
	int status;

	assert_int_equal(waitpid(pid, &status, 0), pid);
	return status;
}

static void assert_killed(pid_t pid)
{
	int status = wait_child(pid);

	if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
		fail_msg("the VMM was not killed by SIGKILL (status %#x)", status);
}

static void test_truncated(void **state)
{
	char sock[PATH_MAX], mem[PATH_MAX];
	_cleanup_free_ char *err = NULL;
	UffdOptions opt = {.timeout_ms = WAIT_MS};
	UffdStats st;
	pid_t pid;
	int r;

	(void)state;
	tpath(sock, "truncated.sock");
	tpath(mem, "short.mem");
	assert_int_equal(write_memfile(mem, 4 * MIB), 0);
	pid = vmm_child(&(ChildSpec){.sock = sock,
				     .size = 8 * MIB,
				     .declared = 8 * MIB,
				     .n_fds = 1,
				     .ready_fd = -1,
				     .go_fd = -1,
				     .touch = 8 * MIB});
	r = uffd_serve(sock, mem, &opt, &st, &err);
	assert_true(r < 0);
	assert_non_null(err);
	print_message("%s\n", err);
	assert_non_null(strstr(err, "memory file truncated: needs 8388608 bytes, has 4194304"));
	assert_non_null(strstr(err, "killed firecracker"));
	assert_string_equal(st.end_reason, "memory file truncated");
	assert_int_equal(st.peer, pid);
	assert_killed(pid);
	assert_int_equal(access(sock, F_OK), -1);
}

static void test_file_shrinks(void **state)
{
	char sock[PATH_MAX], mem[PATH_MAX];
	_cleanup_free_ char *err = NULL;
	UffdOptions opt = {.timeout_ms = WAIT_MS};
	int ready[2], go[2];
	UffdStats st;
	pid_t pid;
	int r;

	(void)state;
	tpath(sock, "shrink.sock");
	tpath(mem, "shrink.mem");
	assert_int_equal(write_memfile(mem, 8 * MIB), 0);
	assert_int_equal(pipe2(ready, O_CLOEXEC), 0);
	assert_int_equal(pipe2(go, O_CLOEXEC), 0);
	pid = vmm_child(&(ChildSpec){.sock = sock,
				     .size = 8 * MIB,
				     .declared = 8 * MIB,
				     .n_fds = 1,
				     .ready_fd = ready[1],
				     .go_fd = go[0],
				     .touch = 8 * MIB});
	/* the file loses its second half after the server checked and mapped it */
	{
		ServerRun s = {.opt = opt};
		char b;

		snprintf(s.sock, sizeof(s.sock), "%s", sock);
		snprintf(s.mem, sizeof(s.mem), "%s", mem);
		assert_int_equal(pthread_create(&s.thread, NULL, server_thread, &s), 0);
		assert_int_equal(read(ready[0], &b, 1), 1);
		usleep(100000);
		assert_int_equal(truncate(mem, 4 * MIB), 0);
		assert_int_equal(write(go[1], "g", 1), 1);
		server_join(&s);
		r = s.r;
		st = s.st;
		err = s.error;
	}
	assert_true(r < 0);
	print_message("%s\n", err);
	assert_non_null(strstr(err, "cannot read the memory file at offset 4194304"));
	assert_non_null(strstr(err, "killed firecracker"));
	assert_string_equal(st.end_reason, "memory file unreadable");
	assert_int_equal(st.faults, 4 * MIB / PAGE);
	assert_killed(pid);
	close(ready[0]);
	close(ready[1]);
	close(go[0]);
	close(go[1]);
}

static void test_fault_outside(void **state)
{
	char sock[PATH_MAX];
	_cleanup_free_ char *err = NULL;
	UffdOptions opt = {.timeout_ms = WAIT_MS};
	UffdStats st;
	pid_t pid;

	(void)state;
	tpath(sock, "outside.sock");
	/* registers 2 MiB, declares 1 MiB: the second half is nobody's */
	pid = vmm_child(&(ChildSpec){.sock = sock,
				     .size = 2 * MIB,
				     .declared = MIB,
				     .n_fds = 1,
				     .ready_fd = -1,
				     .go_fd = -1,
				     .touch = 2 * MIB});
	assert_true(uffd_serve(sock, mem_path, &opt, &st, &err) < 0);
	print_message("%s\n", err);
	assert_non_null(strstr(err, "outside every region"));
	assert_int_equal(st.faults, MIB / PAGE);
	assert_killed(pid);
}

static long meminfo_value(const char *key)
{
	char line[256];
	_cleanup_fclose_ FILE *f = fopen("/proc/meminfo", "re");
	size_t len = strlen(key);
	long v = -1;

	while (f && fgets(line, sizeof(line), f))
		if (strncmp(line, key, len) == 0 && line[len] == ':') {
			v = strtol(line + len + 1, NULL, 10);
			break;
		}
	return v;
}

/* More huge pages than the pool has: the server must not spin on EEXIST for ever. */
static void test_huge_pool_exhausted(void **state)
{
	long free_pages = meminfo_value("HugePages_Free");
	_cleanup_free_ char *err = NULL;
	UffdOptions opt = {.timeout_ms = WAIT_MS};
	char sock[PATH_MAX];
	uint64_t size;
	UffdStats st;
	pid_t pid;

	(void)state;
	if (free_pages < 0 || (uint64_t)(free_pages + 2) * HPAGE > MEM_SIZE) {
		print_message("no hugetlb, or a pool larger than the test file: skipped\n");
		skip();
	}
	size = (uint64_t)(free_pages + 2) * HPAGE;
	tpath(sock, "pool.sock");
	pid = vmm_child(&(ChildSpec){.sock = sock,
				     .size = size,
				     .declared = size,
				     .n_fds = 1,
				     .ready_fd = -1,
				     .go_fd = -1,
				     .touch = size,
				     .huge_noreserve = true});
	assert_true(uffd_serve(sock, mem_path, &opt, &st, &err) < 0);
	print_message("%s\n", err);
	assert_non_null(strstr(err, "huge page pool exhausted"));
	assert_true(st.pages_copied <= (uint64_t)free_pages);
	assert_killed(pid);
}

static void test_bad_handshake(void **state)
{
	char sock[PATH_MAX];
	UffdOptions opt = {.timeout_ms = WAIT_MS};

	(void)state;
	tpath(sock, "bad.sock");
	for (size_t n_fds = 0; n_fds <= 2; n_fds += 2) {
		_cleanup_free_ char *err = NULL;
		UffdStats st;
		pid_t pid;

		pid = vmm_child(&(ChildSpec){.sock = sock,
					     .size = MIB,
					     .declared = MIB,
					     .n_fds = n_fds,
					     .ready_fd = -1,
					     .go_fd = -1,
					     .touch = MIB});
		assert_true(uffd_serve(sock, mem_path, &opt, &st, &err) < 0);
		print_message("%s\n", err);
		assert_non_null(strstr(err, "invalid handshake"));
		assert_non_null(strstr(err, "file descriptors"));
		assert_string_equal(st.end_reason, "invalid handshake");
		assert_killed(pid);
	}
}

static void test_vmm_exits(void **state)
{
	char sock[PATH_MAX];
	UffdOptions opt = {.timeout_ms = WAIT_MS};

	(void)state;
	tpath(sock, "exit.sock");
	for (int prefetch = 0; prefetch < 2; prefetch++) {
		_cleanup_free_ char *err = NULL;
		UffdStats st;
		pid_t pid;
		int status;

		/* 256 MiB: with prefetch, the VMM is gone before the prefetcher is done */
		pid = vmm_child(&(ChildSpec){.sock = sock,
					     .size = MEM_SIZE,
					     .declared = MEM_SIZE,
					     .n_fds = 1,
					     .ready_fd = -1,
					     .go_fd = -1,
					     .touch = MIB});
		opt.prefetch = prefetch;
		assert_int_equal(uffd_serve(sock, mem_path, &opt, &st, &err), 0);
		assert_null(err);
		print_message("prefetch %d: %s, %" PRIu64 " pages copied\n", prefetch,
			      st.end_reason, st.pages_copied);
		assert_true(strcmp(st.end_reason, "firecracker exited") == 0 ||
			    strcmp(st.end_reason, "firecracker closed the connection") == 0);
		if (!prefetch)
			assert_int_equal(st.faults, MIB / PAGE);
		status = wait_child(pid);
		assert_true(WIFEXITED(status));
		assert_int_equal(WEXITSTATUS(status), 0);
	}
}

static void test_listen_errors(void **state)
{
	char sock[PATH_MAX], mem[PATH_MAX];
	UffdOptions opt = {.timeout_ms = 100};
	struct stat st0, st1;
	int fd;

	(void)state;
	/* an existing path is never replaced */
	tpath(sock, "exists.sock");
	fd = open(sock, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
	assert_true(fd >= 0);
	close(fd);
	assert_int_equal(stat(sock, &st0), 0);
	{
		_cleanup_free_ char *err = NULL;
		UffdStats st;

		assert_int_equal(uffd_serve(sock, mem_path, &opt, &st, &err), -EEXIST);
		assert_non_null(strstr(err, "already exists"));
		assert_string_equal(st.end_reason, "socket path exists");
	}
	assert_int_equal(stat(sock, &st1), 0);
	assert_true(S_ISREG(st1.st_mode) && st0.st_ino == st1.st_ino);

	/* nobody connects */
	tpath(sock, "timeout.sock");
	{
		_cleanup_free_ char *err = NULL;
		UffdStats st;

		assert_int_equal(uffd_serve(sock, mem_path, &opt, &st, &err), -ETIMEDOUT);
		assert_non_null(strstr(err, "did not connect within 100 ms"));
		assert_string_equal(st.end_reason, "no connection");
		assert_int_equal(access(sock, F_OK), -1); /* cleaned up */
	}

	/* a missing memory file fails before listening */
	tpath(mem, "missing.mem");
	{
		_cleanup_free_ char *err = NULL;
		UffdStats st;

		assert_int_equal(uffd_serve(sock, mem, &opt, &st, &err), -ENOENT);
		assert_non_null(strstr(err, "cannot open memory file"));
		assert_int_equal(access(sock, F_OK), -1);
	}
	{
		_cleanup_free_ char *err = NULL;

		assert_int_equal(uffd_serve(NULL, mem, &opt, NULL, &err), -EINVAL);
	}
}

/* ------------------------------------------------------------------------------------------ */
/* memory: the server's own does not grow with faults */

static long rss_anon_kib(pid_t pid)
{
	char path[64], line[256];
	_cleanup_fclose_ FILE *f = NULL;
	long v = -1;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	f = fopen(path, "re");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "RssAnon: %ld kB", &v) == 1)
			break;
	return v;
}

static void test_memory_flat(void **state)
{
	const char *env = getenv("UFFD_TEST_FAULTS");
	uint64_t faults = env ? strtoull(env, NULL, 10) : 100000, size, off = 0, warm = 2000;
	char sock[PATH_MAX], mem[PATH_MAX];
	long rss0, rss1;
	int pipefd[2], status;
	UffdStats st;
	pid_t pid;
	Vmm v;
	int fd;

	(void)state;
	if (faults < 2 * warm)
		faults = 2 * warm;
	size = faults * PAGE;
	tpath(sock, "flat.sock");
	tpath(mem, "flat.mem");
	/* sparse: holes read as zeros, and the content is not the point here */
	fd = open(mem, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)size), 0);
	close(fd);
	assert_int_equal(pipe2(pipefd, O_CLOEXEC), 0);

	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		UffdOptions opt = {.timeout_ms = WAIT_MS};
		UffdStats cst;
		char *err = NULL;
		int r;

		alarm(CHILD_SECS * 5);
		r = uffd_serve(sock, mem, &opt, &cst, &err);
		if (write(pipefd[1], &cst, sizeof(cst)) != sizeof(cst))
			_exit(3);
		_exit(r < 0 ? 1 : 0);
	}
	close(pipefd[1]);
	if (vmm_start(&v, sock, PAGE, 1, &size, &off) < 0 || !v.r[0].addr) {
		fail_msg("cannot start the VMM");
		return; /* fail_msg() does not return: for the analyzer */
	}
	for (uint64_t p = 0; p < warm; p++)
		assert_int_equal(((volatile uint8_t *)v.r[0].addr)[p * PAGE], 0);
	rss0 = rss_anon_kib(pid);
	for (uint64_t p = warm; p < faults; p++)
		assert_int_equal(((volatile uint8_t *)v.r[0].addr)[p * PAGE], 0);
	rss1 = rss_anon_kib(pid);
	v.sock = safe_close(v.sock);
	status = wait_child(pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	assert_int_equal(read(pipefd[0], &st, sizeof(st)), sizeof(st));
	close(pipefd[0]);
	vmm_destroy(&v);

	print_message("server RssAnon after %" PRIu64 " faults: %ld KiB, after %" PRIu64
		      ": %ld KiB; fault p50 %.1f us, p99 %.1f us, max %.1f us\n",
		      warm, rss0, st.faults, rss1, (double)st.p50_ns / 1e3, (double)st.p99_ns / 1e3,
		      (double)st.max_ns / 1e3);
	assert_int_equal(st.faults, faults);
	assert_true(rss0 > 0 && rss1 > 0);
	/* a byte per fault would be 100 KiB; anything per-fault-sized would be megabytes */
	assert_true(rss1 - rss0 < 512);
	server_check_stats(&st);
}

/* ------------------------------------------------------------------------------------------ */
/* fault-around, the working set, stopping */

static bool resident(const uint8_t *addr)
{
	unsigned char v = 0;

	return mincore((void *)addr, PAGE, &v) == 0 && (v & 1);
}

static void test_fault_around(void **state)
{
	const uint64_t size = 4 * MIB, off = 8 * MIB;
	ServerRun s;
	Vmm v;

	(void)state;
	server_start(&s, "around.sock", mem_path, false);
	s.opt.fault_around = 16;
	assert_int_equal(vmm_start(&v, s.sock, PAGE, 1, &size, &off), 0);
	/* one fault in the middle of a block brings the whole aligned block */
	assert_true(page_ok(v.r[0].addr + 5 * PAGE, off / PAGE + 5, false));
	for (uint64_t p = 0; p < 16; p++)
		assert_true(resident(v.r[0].addr + p * PAGE));
	assert_false(resident(v.r[0].addr + 16 * PAGE));
	touch_check(&v, 0, false, 0, 0);
	v.sock = safe_close(v.sock);
	server_join(&s);
	assert_int_equal(s.r, 0);
	/* the 16 pages of the first block with one fault, each later block with one */
	assert_int_equal(s.st.faults, size / PAGE / 16);
	assert_int_equal(s.st.pages_copied, size / PAGE);
	assert_int_equal(s.st.around_pages, size / PAGE - s.st.faults);
	vmm_destroy(&v);

	/* a block with pages the guest gave back: never served around a fault, only as zeros
	 * when they fault themselves; a run stops at them */
	server_start(&s, "around.sock", mem_path, false);
	s.opt.fault_around = 16;
	assert_int_equal(vmm_start(&v, s.sock, PAGE, 1, &size, &off), 0);
	assert_int_equal(madvise(v.r[0].addr + 50 * PAGE, 2 * PAGE, MADV_DONTNEED), 0);
	assert_true(page_ok(v.r[0].addr + 48 * PAGE, off / PAGE + 48, false));
	assert_true(resident(v.r[0].addr + 49 * PAGE));
	assert_false(resident(v.r[0].addr + 50 * PAGE));
	assert_false(resident(v.r[0].addr + 52 * PAGE));
	assert_true(page_ok(v.r[0].addr + 50 * PAGE, 0, true));
	assert_true(page_ok(v.r[0].addr + 51 * PAGE, 0, true));
	assert_true(page_ok(v.r[0].addr + 63 * PAGE, off / PAGE + 63, false));
	assert_true(resident(v.r[0].addr + 52 * PAGE));
	v.sock = safe_close(v.sock);
	server_join(&s);
	assert_int_equal(s.r, 0);
	assert_int_equal(s.st.faults, 4); /* 48, 50, 51 and 63 (which brought 52..63) */
	assert_int_equal(s.st.zero_pages, 2);
	assert_int_equal(s.st.pages_copied, 14);
	vmm_destroy(&v);
}

static void test_fault_around_refused(void **state)
{
	UffdOptions opt = {.fault_around = 12};
	_cleanup_free_ char *err = NULL;
	UffdStats st;
	char sock[PATH_MAX];

	(void)state;
	tpath(sock, "never.sock");
	assert_int_equal(uffd_serve(sock, mem_path, &opt, &st, &err), -EINVAL);
	assert_non_null(strstr(err, "fault-around of 12 pages"));
	assert_int_equal(access(sock, F_OK), -1);
}

/* Pages touched in this order: the working set a resume records. */
static const uint64_t ws_touch[] = {700, 3, 512, 513, 514, 90, 1023, 4, 300, 301};

static void ws_run(ServerRun *s, const char *ws, Vmm *v, uint64_t size, uint64_t off)
{
	server_start(s, "ws.sock", mem_path, false);
	s->opt.fault_around = 16; /* off while recording: the record is exact anyway */
	s->opt.working_set = ws;
	s->opt.record_ms = 60000;
	assert_int_equal(vmm_start(v, s->sock, PAGE, 1, &size, &off), 0);
}

static void test_working_set(void **state)
{
	const uint64_t size = 4 * MIB, off = 16 * MIB;
	UffdWorkingSet ws = {0};
	_cleanup_free_ char *err = NULL;
	char path[PATH_MAX];
	struct stat st;
	ServerRun s;
	Vmm v;

	(void)state;
	tpath(path, "guest.mem.ws");
	(void)unlink(path);
	assert_int_equal(stat(mem_path, &st), 0);

	/* no working set yet: this resume records one, each page as it faults, and nothing
	 * around the faults */
	ws_run(&s, path, &v, size, off);
	for (size_t k = 0; k < ELEMENTSOF(ws_touch); k++)
		assert_true(
			page_ok(v.r[0].addr + ws_touch[k] * PAGE, off / PAGE + ws_touch[k], false));
	assert_false(resident(v.r[0].addr + 5 * PAGE));
	v.sock = safe_close(v.sock);
	server_join(&s);
	assert_int_equal(s.r, 0);
	assert_int_equal(s.st.recorded, ELEMENTSOF(ws_touch));
	assert_int_equal(s.st.around_pages, 0);
	vmm_destroy(&v);
	assert_int_equal(uffd_working_set_load(path, &st, &ws, &err), 0);
	assert_int_equal(ws.h.count, ELEMENTSOF(ws_touch));
	assert_int_equal(ws.h.page_size, PAGE);
	for (size_t k = 0; k < ELEMENTSOF(ws_touch); k++)
		assert_int_equal(ws.pages[k], off / PAGE + ws_touch[k]);
	uffd_working_set_done(&ws);

	/* the next resume copies those pages before the guest asks, and nothing else */
	ws_run(&s, path, &v, size, off);
	for (size_t k = 0; k < ELEMENTSOF(ws_touch); k++)
		assert_true(wait_resident(v.r[0].addr + ws_touch[k] * PAGE, PAGE, 0, 0));
	assert_false(resident(v.r[0].addr + 5 * PAGE));
	assert_false(resident(v.r[0].addr + 515 * PAGE));
	for (size_t k = 0; k < ELEMENTSOF(ws_touch); k++)
		assert_true(
			page_ok(v.r[0].addr + ws_touch[k] * PAGE, off / PAGE + ws_touch[k], false));
	v.sock = safe_close(v.sock);
	server_join(&s);
	assert_int_equal(s.r, 0);
	assert_int_equal(s.st.faults, 0);
	assert_int_equal(s.st.replay_pages, ELEMENTSOF(ws_touch));
	assert_true(s.st.replay_ns > 0);
	assert_int_equal(s.st.recorded, 0);
	vmm_destroy(&v);

	/* two resumes at once with no working set yet: one records, the other is served as
	 * usual (with fault-around) */
	{
		ServerRun s2;
		Vmm v2;

		assert_int_equal(unlink(path), 0);
		ws_run(&s, path, &v, size, off);
		assert_true(page_ok(v.r[0].addr + 7 * PAGE, off / PAGE + 7, false));
		server_start(&s2, "ws2.sock", mem_path, false);
		s2.opt.fault_around = 16;
		s2.opt.working_set = path;
		s2.opt.record_ms = 60000;
		assert_int_equal(vmm_start(&v2, s2.sock, PAGE, 1, &size, &off), 0);
		assert_true(page_ok(v2.r[0].addr + 7 * PAGE, off / PAGE + 7, false));
		assert_true(resident(v2.r[0].addr + 8 * PAGE)); /* fault-around: not recording */
		v2.sock = safe_close(v2.sock);
		server_join(&s2);
		assert_int_equal(s2.st.recorded, 0);
		v.sock = safe_close(v.sock);
		server_join(&s);
		assert_int_equal(s.st.recorded, 1);
		vmm_destroy(&v2);
		vmm_destroy(&v);
	}

	/* a memory file changed since: the working set is stale, recorded again */
	assert_int_equal(utimensat(AT_FDCWD, mem_path, NULL, 0), 0);
	ws_run(&s, path, &v, size, off);
	assert_true(page_ok(v.r[0].addr + 42 * PAGE, off / PAGE + 42, false));
	v.sock = safe_close(v.sock);
	server_join(&s);
	assert_int_equal(s.r, 0);
	assert_int_equal(s.st.replay_pages, 0);
	assert_int_equal(s.st.recorded, 1);
	vmm_destroy(&v);
	assert_int_equal(unlink(path), 0);
}

static void test_working_set_parse(void **state)
{
	struct stat st = {.st_size = 64 * (off_t)PAGE, .st_ino = 77};
	UffdWorkingSet ws = {.h = {.page_size = PAGE, .count = 3}, .pages = (uint32_t[]){1, 2, 63}};
	UffdWorkingSet got = {0};
	char path[PATH_MAX];
	_cleanup_free_ char *data = NULL;
	size_t len = 0;
	struct {
		const char *what;
		size_t at; /* byte changed, or the new length when len_only */
		uint8_t value;
		bool len_only;
		int r;
	} cases[] = {
		{"not a working set file", 0, 'X', false, -EBADMSG},
		{"version", 8, 2, false, -EBADMSG},
		{"page size", 12, 1, false, -EBADMSG},
		{"pages", 16, 0, false, -EBADMSG},          /* count 0 */
		{"bytes for", 16, 4, false, -EBADMSG},      /* count 4, 3 there */
		{"reserved field", 20, 1, false, -EBADMSG}, /* reserved */
		{"another memory file", 24, 1, false, -ESTALE},
		{"another memory file", 32, 1, false, -ESTALE},
		{"beyond the memory file", 48 + 8, 64, false, -EBADMSG},
		{"shorter than its header", 47, 0, true, -EBADMSG},
		{"bytes for", 48 + 11, 0, true, -EBADMSG},
	};

	(void)state;
	st.st_mtim.tv_sec = 1234;
	tpath(path, "parse.ws");
	assert_int_equal(uffd_working_set_write(path, &ws, &st, NULL), 0);
	assert_int_equal(read_full_file(path, 1 << 20, &data, &len), 0);
	assert_int_equal(len, sizeof(UffdWorkingSetHeader) + 3 * sizeof(uint32_t));
	assert_int_equal(uffd_working_set_parse(data, len, &st, &got, NULL), 0);
	assert_int_equal(got.h.count, 3);
	assert_int_equal(got.pages[2], 63);
	uffd_working_set_done(&got);

	for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
		_cleanup_free_ char *bad = malloc(len), *err = NULL;
		size_t n = cases[i].len_only ? cases[i].at : len;

		assert_non_null(bad);
		memcpy(bad, data, len);
		if (!cases[i].len_only)
			bad[cases[i].at] = (char)cases[i].value;
		assert_int_equal(uffd_working_set_parse(bad, n, &st, &got, &err), cases[i].r);
		if (!strstr(err ? err : "", cases[i].what))
			fail_msg("case %zu: \"%s\" does not say \"%s\"", i, err ? err : "",
				 cases[i].what);
		assert_null(got.pages);
	}
	assert_int_equal(unlink(path), 0);
}

static void test_stop_fd(void **state)
{
	const uint64_t size = 4 * MIB, off = 0;
	ServerRun s;
	Vmm v;
	int efd = eventfd(0, EFD_CLOEXEC);

	(void)state;
	assert_true(efd >= 0);
	/* before Firecracker connects */
	server_start(&s, "stop.sock", mem_path, false);
	s.opt.has_stop_fd = true;
	s.opt.stop_fd = efd;
	for (int i = 0; i < WAIT_MS && access(s.sock, F_OK) < 0; i++)
		usleep(1000);
	assert_int_equal(eventfd_write(efd, 1), 0);
	server_join(&s);
	assert_int_equal(s.r, 0);
	assert_string_equal(s.st.end_reason, "stopped");
	assert_int_equal(access(s.sock, F_OK), -1);
	assert_int_equal(eventfd_read(efd, &(eventfd_t){0}), 0);

	/* while serving, with the statistics of what was served */
	server_start(&s, "stop.sock", mem_path, true);
	s.opt.has_stop_fd = true;
	s.opt.stop_fd = efd;
	assert_int_equal(vmm_start(&v, s.sock, PAGE, 1, &size, &off), 0);
	assert_true(page_ok(v.r[0].addr, 0, false));
	assert_int_equal(eventfd_write(efd, 1), 0);
	server_join(&s);
	assert_int_equal(s.r, 0);
	assert_string_equal(s.st.end_reason, "stopped");
	assert_true(s.st.pages_copied >= 1);
	vmm_destroy(&v);
	close(efd);
}

/* ------------------------------------------------------------------------------------------ */

static int group_setup(void **state)
{
	(void)state;
	if (!mkdtemp(tmpdir))
		return -1;
	tpath(mem_path, "guest.mem");
	return write_memfile(mem_path, MEM_SIZE) < 0 ? -1 : 0;
}

static int group_teardown(void **state)
{
	(void)state;
	return rm_rf(tmpdir) == 0 ? 0 : -1;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parse_valid),
		cmocka_unit_test(test_parse_refused),
		cmocka_unit_test(test_parse_fds),
		cmocka_unit_test(test_serve_basic),
		cmocka_unit_test(test_serve_prefetch),
		cmocka_unit_test(test_remove),
		cmocka_unit_test(test_remove_prefetch),
		cmocka_unit_test(test_huge),
		cmocka_unit_test(test_huge_pool_exhausted),
		cmocka_unit_test(test_truncated),
		cmocka_unit_test(test_file_shrinks),
		cmocka_unit_test(test_fault_outside),
		cmocka_unit_test(test_bad_handshake),
		cmocka_unit_test(test_vmm_exits),
		cmocka_unit_test(test_listen_errors),
		cmocka_unit_test(test_memory_flat),
		cmocka_unit_test(test_fault_around),
		cmocka_unit_test(test_fault_around_refused),
		cmocka_unit_test(test_working_set),
		cmocka_unit_test(test_working_set_parse),
		cmocka_unit_test(test_stop_fd),
	};

	signal(SIGPIPE, SIG_IGN);
	/* The VM test (test/vm/test_uffd_huge.py) runs only the huge page tests: under TCG the
	 * whole file takes minutes. */
	if (getenv("TEST_FILTER"))
		cmocka_set_test_filter(getenv("TEST_FILTER"));
	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
