/* SPDX-License-Identifier: Apache-2.0 */
#include "memory.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <json-c/json.h>
#include <linux/userfaultfd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/log.h"
#include "common/macro.h"

/* Firecracker's x86_64 layout: guest RAM below the 32-bit MMIO gap (which starts 768 MiB below
 * 4 GiB) is one region, anything beyond goes into a second one above 4 GiB. */
#define GMEM_REGION0_MAX 0xD0000000ull
#define GMEM_HUGE_PAGE   (2ull << 20)
#define GMEM_WORDS       (GMEM_PAGE / sizeof(uint64_t))
/* The bytes "FCSIMPG1" as a little-endian word: tools that scan memory files look for them. */
#define GMEM_MAGIC 0x3147504D49534346ull
#define GMEM_K     0x9E3779B97F4A7C15ull
/* Bad pages described in a verification error; the count covers the rest. */
#define GMEM_REPORT_MAX 4
/* pwrite() of one run of non-zero pages is capped so that no single call nears Linux's
 * 0x7ffff000-byte limit per write. */
#define GMEM_WRITE_CHUNK (8u << 20)
/* <linux/mman.h> has it, but clashes with <sys/mman.h>; log2(2 MiB) in the size field. */
#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << MAP_HUGE_SHIFT)
#endif

typedef enum GmemBackend {
	GMEM_BACKEND_ANON,
	GMEM_BACKEND_FILE,
	GMEM_BACKEND_UFFD,
} GmemBackend;

typedef struct GmemRange {
	uint64_t start, end; /* offsets into guest memory, end exclusive */
} GmemRange;

struct GuestMemory {
	GmemRegion regions[2];
	size_t n_regions;
	uint64_t size;
	uint64_t page_size;
	GmemBackend backend;
	int uffd;
	int sock; /* to the UFFD handler: kept open so that it sees POLLHUP when we go */
	GmemRange *discards;
	size_t n_discards;
};

DEFINE_POINTER_CLEANUP(GuestMemory, gmem_free)

static void json_object_putp(json_object **p)
{
	if (*p)
		json_object_put(*p);
}

static void gmem_error_internal(char **ret_error, int r, const char *format, ...) _printf_(3, 4);
static void gmem_error_internal(char **ret_error, int r, const char *format, ...)
{
	va_list ap;

	if (!ret_error)
		return;
	errno = r < 0 ? -r : r; /* for %m */
	va_start(ap, format);
	if (vasprintf(ret_error, format, ap) < 0)
		*ret_error = NULL;
	va_end(ap);
	log_debug("guest memory: %s", *ret_error ? *ret_error : "(out of memory)");
}

/* Sets *ret_error (when wanted) and evaluates to r. A macro, so that the static analyzer sees
 * the value returned: it does not follow variadic calls. */
#define gmem_error(ret_error, r, ...)                                                              \
	({                                                                                         \
		int _r_ = (r);                                                                     \
		gmem_error_internal(ret_error, _r_, __VA_ARGS__);                                  \
		_r_;                                                                               \
	})

/* The finalizer of splitmix64 applied to x + golden ratio: the first output of a splitmix64
 * generator seeded with x. */
static inline uint64_t splitmix64(uint64_t x)
{
	uint64_t z = x + GMEM_K;

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

/* Whether page `index` has content, and its w[3] (from which every later word follows). */
static inline bool page_header(uint64_t boot_id, uint64_t index, uint64_t *ret_h)
{
	uint64_t seed = boot_id ^ (index * GMEM_K);

	if (splitmix64(seed) % 4 == 0)
		return false;
	*ret_h = splitmix64(seed ^ 0x5bd1e995);
	return true;
}

static inline void page_fill(uint64_t *w, uint64_t boot_id, uint64_t index, uint64_t h)
{
	uint64_t v = h + 4 * GMEM_K;

	w[0] = htole64(GMEM_MAGIC);
	w[1] = htole64(boot_id);
	w[2] = htole64(index);
	w[3] = htole64(h);
	for (size_t k = 4; k < GMEM_WORDS; k++, v += GMEM_K)
		w[k] = htole64(v);
}

bool gmem_page_content(uint64_t boot_id, uint64_t index, uint8_t *buf)
{
	uint64_t w[GMEM_WORDS], h;

	if (!page_header(boot_id, index, &h)) {
		memset(buf, 0, GMEM_PAGE);
		return false;
	}
	/* buf may be unaligned: build the page in words, then copy it. */
	page_fill(w, boot_id, index, h);
	memcpy(buf, w, GMEM_PAGE);
	return true;
}

static inline bool page_is_zero(const uint64_t *w)
{
	uint64_t acc = 0;

	for (size_t k = 0; k < GMEM_WORDS; k++)
		acc |= w[k];
	return acc == 0;
}

/* Host address of the 4 KiB page at guest offset `offset` (< m->size). */
static inline uint64_t *gmem_addr(const GuestMemory *m, uint64_t offset)
{
	const GmemRegion *r = &m->regions[0];

	if (offset >= r->size)
		r = &m->regions[1];
	return (uint64_t *)((uint8_t *)r->host_addr + (offset - r->offset));
}

static int gmem_new(uint64_t size_mib, bool huge, GuestMemory **ret, char **ret_error)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL;
	uint64_t size;

	if (size_mib == 0 || size_mib > (UINT64_MAX >> 20) || (size_mib << 20) > SIZE_MAX / 2)
		return gmem_error(ret_error, -EINVAL, "invalid guest memory size %" PRIu64 " MiB",
				  size_mib);
	size = size_mib << 20;
	if (huge && size % GMEM_HUGE_PAGE != 0)
		return gmem_error(ret_error, -EINVAL,
				  "guest memory of %" PRIu64
				  " MiB is not a multiple of the 2 MiB huge page size",
				  size_mib);

	m = calloc(1, sizeof(*m));
	if (!m)
		return gmem_error(ret_error, -ENOMEM, "out of memory");
	m->uffd = -EBADF;
	m->sock = -EBADF;
	m->size = size;
	m->page_size = huge ? GMEM_HUGE_PAGE : GMEM_PAGE;
	m->regions[0] = (GmemRegion){
		.size = size < GMEM_REGION0_MAX ? size : GMEM_REGION0_MAX,
		.offset = 0,
		.page_size = m->page_size,
	};
	m->n_regions = 1;
	if (size > GMEM_REGION0_MAX) {
		/* Contiguous in the memory file, as Firecracker writes it. */
		m->regions[1] = (GmemRegion){
			.size = size - GMEM_REGION0_MAX,
			.offset = GMEM_REGION0_MAX,
			.page_size = m->page_size,
		};
		m->n_regions = 2;
	}
	*ret = TAKE_PTR(m);
	return 0;
}

/* Anonymous memory for every region. Huge pages are mapped without MAP_NORESERVE: then a
 * shortage of huge pages fails here, clearly, instead of as SIGBUS on some later touch. */
static int gmem_map_anon(GuestMemory *m, char **ret_error)
{
	int flags = MAP_PRIVATE | MAP_ANONYMOUS;

	if (m->page_size == GMEM_HUGE_PAGE)
		flags |= MAP_HUGETLB | MAP_HUGE_2MB;
	else
		flags |= MAP_NORESERVE;

	for (size_t i = 0; i < m->n_regions; i++) {
		GmemRegion *r = &m->regions[i];
		void *p = mmap(NULL, r->size, PROT_READ | PROT_WRITE, flags, -1, 0);

		if (p == MAP_FAILED) {
			if (m->page_size == GMEM_HUGE_PAGE)
				return gmem_error(
					ret_error, -errno,
					"cannot map %" PRIu64 " MiB of 2 MiB huge pages: %m (are "
					"enough huge pages reserved? see HugePages_Free in "
					"/proc/meminfo and vm.nr_hugepages)",
					r->size >> 20);
			return gmem_error(ret_error, -errno,
					  "cannot map %" PRIu64 " MiB of guest memory: %m",
					  r->size >> 20);
		}
		r->host_addr = p;
	}
	return 0;
}

int gmem_boot(uint64_t size_mib, bool huge, uint64_t boot_id, GuestMemory **ret, char **ret_error)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL;
	int r;

	if (!ret)
		return gmem_error(ret_error, -EINVAL, "no place for the guest memory");
	r = gmem_new(size_mib, huge, &m, ret_error);
	if (r < 0)
		return r;
	m->backend = GMEM_BACKEND_ANON;
	r = gmem_map_anon(m, ret_error);
	if (r < 0)
		return r;

	/* Zero pages are never written: they stay unpopulated, like a guest's free memory. */
	for (uint64_t off = 0; off < m->size; off += GMEM_PAGE) {
		uint64_t h, index = off / GMEM_PAGE;

		if (page_header(boot_id, index, &h))
			page_fill(gmem_addr(m, off), boot_id, index, h);
	}
	log_debug("guest memory: booted %" PRIu64 " MiB in %zu region(s), %s pages, boot %#" PRIx64,
		  size_mib, m->n_regions, huge ? "2 MiB" : "4 KiB", boot_id);
	*ret = TAKE_PTR(m);
	return 0;
}

static int pwrite_all(int fd, const uint8_t *p, size_t n, uint64_t offset)
{
	while (n > 0) {
		ssize_t k = pwrite(fd, p, n, (off_t)offset);

		if (k < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (k == 0)
			return -EIO;
		p += k;
		n -= (size_t)k;
		offset += (uint64_t)k;
	}
	return 0;
}

static int gmem_write_pages(GuestMemory *m, int fd, const char *path, char **ret_error)
{
	int r;

	if (ftruncate(fd, (off_t)m->size) < 0)
		return gmem_error(ret_error, -errno, "cannot size memory file %s: %m", path);

	for (size_t i = 0; i < m->n_regions; i++) {
		const GmemRegion *reg = &m->regions[i];
		const uint8_t *base = reg->host_addr;
		uint64_t run = 0, run_len = 0; /* pending non-zero pages, region-relative */

		/* Each page is read (so a userfaultfd sees a user-mode fault) before pwrite()
		 * copies it: a USER_MODE_ONLY userfaultfd would fail the kernel's own access. */
		for (uint64_t off = 0; off <= reg->size; off += GMEM_PAGE) {
			bool flush = off == reg->size || run_len == GMEM_WRITE_CHUNK;
			bool zero = false;

			if (off < reg->size) {
				zero = page_is_zero((const uint64_t *)(base + off));
				flush = flush || zero;
			}
			if (flush && run_len > 0) {
				r = pwrite_all(fd, base + run, run_len, reg->offset + run);
				if (r < 0)
					return gmem_error(ret_error, r,
							  "cannot write memory file %s: %m", path);
				run_len = 0;
			}
			if (off < reg->size && !zero) {
				if (run_len == 0)
					run = off;
				run_len += GMEM_PAGE;
			}
		}
	}
	if (fsync(fd) < 0)
		return gmem_error(ret_error, -errno, "cannot sync memory file %s: %m", path);
	return 0;
}

int gmem_write_file(GuestMemory *m, const char *path, char **ret_error)
{
	_cleanup_close_ int fd = -EBADF;
	int r;

	if (!m || !path)
		return gmem_error(ret_error, -EINVAL, "no guest memory or no path");
	fd = open(path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
	if (fd < 0)
		return gmem_error(ret_error, -errno, "cannot create memory file %s: %m", path);
	r = gmem_write_pages(m, fd, path, ret_error);
	if (r < 0) {
		/* A partial memory file must not pass for a snapshot. */
		(void)unlink(path);
		return r;
	}
	log_debug("guest memory: wrote %s (%" PRIu64 " MiB)", path, m->size >> 20);
	return 0;
}

int gmem_load_file(const char *path, uint64_t size_mib, bool huge, GuestMemory **ret,
		   char **ret_error)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL;
	_cleanup_close_ int fd = -EBADF;
	struct stat st;
	int r;

	if (!path || !ret)
		return gmem_error(ret_error, -EINVAL, "no memory file or no place for the memory");
	if (huge)
		return gmem_error(ret_error, -EOPNOTSUPP,
				  "the File memory backend does not support huge pages "
				  "(Firecracker's File backend with hugetlbfs): use the Uffd "
				  "backend");
	r = gmem_new(size_mib, huge, &m, ret_error);
	if (r < 0)
		return r;
	m->backend = GMEM_BACKEND_FILE;

	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0)
		return gmem_error(ret_error, -errno, "cannot open memory file %s: %m", path);
	if (fstat(fd, &st) < 0)
		return gmem_error(ret_error, -errno, "cannot stat memory file %s: %m", path);
	if (!S_ISREG(st.st_mode))
		return gmem_error(ret_error, -EINVAL, "memory file %s is not a regular file", path);
	if ((uint64_t)st.st_size != m->size)
		return gmem_error(ret_error, -EINVAL,
				  "memory file %s has %" PRIu64
				  " bytes, but guest memory of %" PRIu64
				  " MiB needs exactly %" PRIu64,
				  path, (uint64_t)st.st_size, size_mib, m->size);

	for (size_t i = 0; i < m->n_regions; i++) {
		GmemRegion *reg = &m->regions[i];
		void *p = mmap(NULL, reg->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE,
			       fd, (off_t)reg->offset);

		if (p == MAP_FAILED)
			return gmem_error(ret_error, -errno, "cannot map memory file %s: %m", path);
		reg->host_addr = p;
	}
	log_debug("guest memory: mapped %s privately (%" PRIu64 " MiB)", path, size_mib);
	*ret = TAKE_PTR(m);
	return 0;
}

/* The userfaultfd Firecracker would create. USER_MODE_ONLY first: it needs no privilege
 * (vm.unprivileged_userfaultfd=0) and fcsim touches guest memory only from user space;
 * kernels before 5.11 do not know the flag. */
static int uffd_open(char **ret_error)
{
	_cleanup_close_ int fd = -EBADF;
	struct uffdio_api api = {
		.api = UFFD_API,
		.features = UFFD_FEATURE_EVENT_REMOVE,
	};

	fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
	if (fd < 0 && errno == EINVAL)
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) {
		if (errno == ENOSYS)
			return gmem_error(ret_error, -ENOSYS, "the kernel lacks userfaultfd");
		if (errno == EPERM)
			return gmem_error(ret_error, -EPERM,
					  "cannot create a userfaultfd: %m "
					  "(vm.unprivileged_userfaultfd is 0)");
		return gmem_error(ret_error, -errno, "cannot create a userfaultfd: %m");
	}
	if (ioctl(fd, UFFDIO_API, &api) < 0) {
		if (errno == EINVAL)
			return gmem_error(ret_error, -EOPNOTSUPP,
					  "the kernel's userfaultfd lacks "
					  "UFFD_FEATURE_EVENT_REMOVE, which Firecracker requires");
		return gmem_error(ret_error, -errno, "UFFDIO_API failed: %m");
	}
	if (!(api.features & UFFD_FEATURE_EVENT_REMOVE))
		return gmem_error(ret_error, -EOPNOTSUPP,
				  "the kernel's userfaultfd lacks UFFD_FEATURE_EVENT_REMOVE, which "
				  "Firecracker requires");
	return TAKE_FD(fd);
}

/* Firecracker's handshake message: one object per region, keys in this order. */
static int uffd_handshake_json(const GuestMemory *m, json_object **ret)
{
	_cleanup_(json_object_putp) json_object *array = json_object_new_array();

	if (!array)
		return -ENOMEM;
	for (size_t i = 0; i < m->n_regions; i++) {
		const GmemRegion *reg = &m->regions[i];
		const struct {
			const char *key;
			uint64_t value;
		} fields[] = {
			{"base_host_virt_addr", (uint64_t)(uintptr_t)reg->host_addr},
			{"size", reg->size},
			{"offset", reg->offset},
			{"page_size", reg->page_size},
			/* bytes despite the name, as Firecracker sends it */
			{"page_size_kib", reg->page_size},
		};
		json_object *o = json_object_new_object();

		if (!o)
			return -ENOMEM;
		if (json_object_array_add(array, o) < 0) {
			json_object_put(o);
			return -ENOMEM;
		}
		for (size_t f = 0; f < ELEMENTSOF(fields); f++) {
			json_object *v = json_object_new_uint64(fields[f].value);

			if (!v || json_object_object_add(o, fields[f].key, v) < 0) {
				json_object_put(v);
				return -ENOMEM;
			}
		}
	}
	*ret = TAKE_PTR(array);
	return 0;
}

static int uffd_send_handshake(GuestMemory *m, const char *socket_path, char **ret_error)
{
	_cleanup_(json_object_putp) json_object *json = NULL;
	_cleanup_close_ int sock = -EBADF;
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int))];
	} control;
	struct iovec iov;
	struct msghdr msg = {
		.msg_iov = &iov,
		.msg_iovlen = 1,
		.msg_control = control.buf,
		.msg_controllen = sizeof(control.buf),
	};
	struct cmsghdr *cmsg;
	const char *text;
	size_t len;
	ssize_t k;
	int r;

	if (strlen(socket_path) >= sizeof(sa.sun_path))
		return gmem_error(ret_error, -ENAMETOOLONG, "UFFD handler socket path too long: %s",
				  socket_path);
	strncpy(sa.sun_path, socket_path, sizeof(sa.sun_path) - 1);

	r = uffd_handshake_json(m, &json);
	if (r < 0)
		return gmem_error(ret_error, r, "cannot build the UFFD handshake: %m");
	text = json_object_to_json_string_ext(json, JSON_C_TO_STRING_PLAIN);
	if (!text)
		return gmem_error(ret_error, -ENOMEM, "cannot build the UFFD handshake: %m");
	len = strlen(text);

	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		return gmem_error(ret_error, -errno, "cannot create a unix socket: %m");
	if (connect(sock, (const struct sockaddr *)&sa, sizeof(sa)) < 0)
		return gmem_error(ret_error, -errno, "cannot connect to the UFFD handler at %s: %m",
				  socket_path);

	/* One sendmsg, no newline, no length prefix: handlers written for Firecracker read the
	 * message with a single recvmsg. */
	iov = (struct iovec){.iov_base = (void *)text, .iov_len = len};
	memset(&control, 0, sizeof(control));
	cmsg = CMSG_FIRSTHDR(&msg);
	cmsg->cmsg_level = SOL_SOCKET;
	cmsg->cmsg_type = SCM_RIGHTS;
	cmsg->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cmsg), &m->uffd, sizeof(int));
	do
		k = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (k < 0 && errno == EINTR);
	if (k < 0)
		return gmem_error(ret_error, -errno, "cannot send the handshake to %s: %m",
				  socket_path);
	if ((size_t)k != len)
		return gmem_error(ret_error, -EIO,
				  "the handshake to %s was cut short (%zd of %zu bytes)",
				  socket_path, k, len);
	log_debug("guest memory: sent UFFD handshake to %s: %s", socket_path, text);
	m->sock = TAKE_FD(sock);
	return 0;
}

int gmem_load_uffd(const char *socket_path, uint64_t size_mib, bool huge, GuestMemory **ret,
		   char **ret_error)
{
	_cleanup_(gmem_freep) GuestMemory *m = NULL;
	int r;

	if (!socket_path || !ret)
		return gmem_error(ret_error, -EINVAL,
				  "no handler socket or no place for the guest memory");
	r = gmem_new(size_mib, huge, &m, ret_error);
	if (r < 0)
		return r;
	m->backend = GMEM_BACKEND_UFFD;
	r = uffd_open(ret_error);
	if (r < 0)
		return r;
	m->uffd = r;
	r = gmem_map_anon(m, ret_error);
	if (r < 0)
		return r;

	for (size_t i = 0; i < m->n_regions; i++) {
		struct uffdio_register reg = {
			.range = {.start = (uintptr_t)m->regions[i].host_addr,
				  .len = m->regions[i].size},
			.mode = UFFDIO_REGISTER_MODE_MISSING,
		};

		if (ioctl(m->uffd, UFFDIO_REGISTER, &reg) < 0)
			return gmem_error(ret_error, -errno,
					  "cannot register guest memory with the userfaultfd: %m");
		if (!(reg.ioctls & (1ull << _UFFDIO_COPY)))
			return gmem_error(ret_error, -EOPNOTSUPP,
					  "the userfaultfd does not offer UFFDIO_COPY for guest "
					  "memory");
	}

	r = uffd_send_handshake(m, socket_path, ret_error);
	if (r < 0)
		return r;
	*ret = TAKE_PTR(m);
	return 0;
}

static bool gmem_is_discarded(const GuestMemory *m, uint64_t offset)
{
	for (size_t i = 0; i < m->n_discards; i++)
		if (offset >= m->discards[i].start && offset < m->discards[i].end)
			return true;
	return false;
}

/* What page `index` holds instead of what it should, for the error message. */
static void page_describe(const uint64_t *w, uint64_t boot_id, uint64_t index, bool expect_zero,
			  char *buf, size_t size)
{
	uint64_t expected[GMEM_WORDS] = {0}, h;

	if (page_is_zero(w)) {
		snprintf(buf, size, "zero page");
		return;
	}
	if (le64toh(w[0]) == GMEM_MAGIC && (le64toh(w[1]) != boot_id || le64toh(w[2]) != index)) {
		snprintf(buf, size, "page of boot %#" PRIx64 " index %" PRIu64, le64toh(w[1]),
			 le64toh(w[2]));
		return;
	}
	if (!expect_zero && page_header(boot_id, index, &h))
		page_fill(expected, boot_id, index, h);
	for (size_t k = 0; k < GMEM_WORDS; k++)
		if (w[k] != expected[k]) {
			snprintf(buf, size,
				 "corrupt word %zu (%#" PRIx64 ", expected %#" PRIx64 ")%s", k,
				 le64toh(w[k]), le64toh(expected[k]),
				 expect_zero ? " in a page that should be zero" : "");
			return;
		}
	snprintf(buf, size, "changed while being checked");
}

typedef struct VerifyState {
	GuestMemory *m;
	uint64_t boot_id;
	uint64_t checked, bad;
	char report[GMEM_REPORT_MAX][192];
} VerifyState;

static void verify_page(VerifyState *s, uint64_t index)
{
	uint64_t offset = index * GMEM_PAGE;
	const uint64_t *w = gmem_addr(s->m, offset);
	bool expect_zero, ok;
	uint64_t h = 0;

	expect_zero = (s->m->n_discards > 0 && gmem_is_discarded(s->m, offset)) ||
		      !page_header(s->boot_id, index, &h);
	s->checked++;

	/* Plain loads: with the Uffd backend they are what raises the faults. */
	if (expect_zero)
		ok = page_is_zero(w);
	else {
		uint64_t acc = (le64toh(w[0]) ^ GMEM_MAGIC) | (le64toh(w[1]) ^ s->boot_id) |
			       (le64toh(w[2]) ^ index) | (le64toh(w[3]) ^ h);
		uint64_t v = h + 4 * GMEM_K;

		for (size_t k = 4; k < GMEM_WORDS; k++, v += GMEM_K)
			acc |= le64toh(w[k]) ^ v;
		ok = acc == 0;
	}
	if (ok)
		return;

	if (s->bad < GMEM_REPORT_MAX) {
		char what[128];

		page_describe(w, s->boot_id, index, expect_zero, what, sizeof(what));
		snprintf(s->report[s->bad], sizeof(s->report[0]),
			 "page %" PRIu64 " (offset %#" PRIx64 "): %s", index, offset, what);
	}
	s->bad++;
}

static inline uint64_t xorshift64(uint64_t *state)
{
	uint64_t x = *state;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *state = x;
}

/* Uniform enough in [0, n): the high half of a 64x64 product. */
static inline uint64_t random_below(uint64_t *state, uint64_t n)
{
	return (uint64_t)(((unsigned __int128)xorshift64(state) * n) >> 64);
}

int gmem_verify(GuestMemory *m, uint64_t boot_id, uint64_t sample, GmemOrder order, uint64_t seed,
		char **ret_error)
{
	_cleanup_free_ VerifyState *s = NULL;
	uint64_t n_pages, state;

	if (!m)
		return gmem_error(ret_error, -EINVAL, "no guest memory");
	if (order != GMEM_ORDER_SEQUENTIAL && order != GMEM_ORDER_RANDOM)
		return gmem_error(ret_error, -EINVAL, "invalid page order %d", (int)order);
	s = calloc(1, sizeof(*s));
	if (!s)
		return gmem_error(ret_error, -ENOMEM, "out of memory");
	s->m = m;
	s->boot_id = boot_id;
	n_pages = m->size / GMEM_PAGE;
	state = splitmix64(seed);
	if (state == 0) /* xorshift's one fixed point */
		state = GMEM_K;

	if (sample > 0)
		for (uint64_t i = 0; i < sample; i++)
			verify_page(s, random_below(&state, n_pages));
	else if (order == GMEM_ORDER_SEQUENTIAL)
		for (uint64_t i = 0; i < n_pages; i++)
			verify_page(s, i);
	else {
		/* Fisher–Yates: every page exactly once. */
		_cleanup_free_ uint32_t *perm = NULL;

		if (n_pages > UINT32_MAX)
			return gmem_error(ret_error, -E2BIG,
					  "guest memory too large for a random order");
		perm = malloc(n_pages * sizeof(*perm));
		if (!perm)
			return gmem_error(ret_error, -ENOMEM, "out of memory");
		for (uint64_t i = 0; i < n_pages; i++)
			perm[i] = (uint32_t)i;
		for (uint64_t i = n_pages - 1; i > 0; i--) {
			uint64_t j = random_below(&state, i + 1);
			uint32_t t = perm[i];

			perm[i] = perm[j];
			perm[j] = t;
		}
		for (uint64_t i = 0; i < n_pages; i++)
			verify_page(s, perm[i]);
	}

	if (s->bad > 0) {
		const char *r[GMEM_REPORT_MAX];

		for (size_t i = 0; i < GMEM_REPORT_MAX; i++)
			r[i] = i < s->bad ? s->report[i] : NULL;
		return gmem_error(ret_error, -EBADMSG,
				  "%" PRIu64 " of %" PRIu64
				  " checked pages are wrong: %s%s%s%s%s%s%s%s",
				  s->bad, s->checked, r[0], r[1] ? "; " : "", r[1] ?: "",
				  r[2] ? "; " : "", r[2] ?: "", r[3] ? "; " : "", r[3] ?: "",
				  s->bad > GMEM_REPORT_MAX ? "; ..." : "");
	}
	log_debug("guest memory: %" PRIu64 " pages verified for boot %#" PRIx64, s->checked,
		  boot_id);
	return 0;
}

/* One region's part of a discard. A private file mapping would read the file's page again after
 * MADV_DONTNEED, so, like Firecracker's balloon, map fresh anonymous memory over it instead. */
static int gmem_discard_region(GuestMemory *m, const GmemRegion *reg, uint64_t start, uint64_t end)
{
	uint8_t *p = (uint8_t *)reg->host_addr + (start - reg->offset);
	size_t len = end - start;

	if (m->backend == GMEM_BACKEND_FILE) {
		if (mmap(p, len, PROT_READ | PROT_WRITE,
			 MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1,
			 0) == MAP_FAILED)
			return -errno;
		return 0;
	}
	/* With a userfaultfd this blocks until the handler has read UFFD_EVENT_REMOVE. */
	if (madvise(p, len, MADV_DONTNEED) < 0)
		return -errno;
	return 0;
}

int gmem_discard(GuestMemory *m, uint64_t offset, uint64_t length)
{
	uint64_t end;
	int r;

	if (!m)
		return -EINVAL;
	if (length == 0)
		return 0;
	if (offset % m->page_size != 0 || length % m->page_size != 0 || offset >= m->size ||
	    length > m->size - offset)
		return -EINVAL;
	end = offset + length;

	/* Remembered first, so that a failure to remember never leaves pages zeroed that
	 * verification would still expect content in. */
	if (m->n_discards > 0 && m->discards[m->n_discards - 1].end == offset)
		m->discards[m->n_discards - 1].end = end;
	else {
		GmemRange *d = reallocarray(m->discards, m->n_discards + 1, sizeof(*d));

		if (!d)
			return -ENOMEM;
		m->discards = d;
		m->discards[m->n_discards++] = (GmemRange){offset, end};
	}

	for (size_t i = 0; i < m->n_regions; i++) {
		const GmemRegion *reg = &m->regions[i];
		uint64_t s = offset > reg->offset ? offset : reg->offset;
		uint64_t e = end < reg->offset + reg->size ? end : reg->offset + reg->size;

		if (s >= e)
			continue;
		/* On failure the range stays listed: part of it may be discarded already, and
		 * expecting zeros there reports the failure again at verification. */
		r = gmem_discard_region(m, reg, s, e);
		if (r < 0)
			return log_debug_errno(
				r, "guest memory: cannot discard %#" PRIx64 "+%#" PRIx64 ": %m", s,
				e - s);
	}
	log_debug("guest memory: discarded %#" PRIx64 "+%#" PRIx64, offset, length);
	return 0;
}

size_t gmem_n_regions(const GuestMemory *m)
{
	return m ? m->n_regions : 0;
}

const GmemRegion *gmem_region(const GuestMemory *m, size_t i)
{
	return m && i < m->n_regions ? &m->regions[i] : NULL;
}

uint64_t gmem_size(const GuestMemory *m)
{
	return m ? m->size : 0;
}

void gmem_free(GuestMemory *m)
{
	if (!m)
		return;
	for (size_t i = 0; i < m->n_regions; i++)
		if (m->regions[i].host_addr)
			(void)munmap(m->regions[i].host_addr, m->regions[i].size);
	safe_close(m->uffd);
	/* Last: the handler takes POLLHUP here as "Firecracker is gone". */
	safe_close(m->sock);
	free(m->discards);
	free(m);
}
