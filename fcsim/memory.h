/* SPDX-License-Identifier: Apache-2.0 */
/*
 * fcsim's guest memory: real memory of mem_size_mib, laid out in regions like Firecracker's,
 * filled with content derived from a per-boot id so that any wrong, swapped or zeroed page is
 * detected when it is verified; snapshot memory files; and restoring from a memory file
 * (MAP_PRIVATE, Firecracker's File backend) or through a userfaultfd handler (the Uffd
 * backend, with Firecracker's exact handshake).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GMEM_PAGE 4096u

typedef struct GuestMemory GuestMemory;

typedef struct GmemRegion {
	void *host_addr;    /* where the region is mapped in this process */
	uint64_t size;      /* bytes */
	uint64_t offset;    /* into the memory file */
	uint64_t page_size; /* 4096, or 2 MiB with huge pages */
} GmemRegion;

/* A fresh boot: allocates size_mib of memory (MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE, or
 * MAP_HUGETLB with 2 MiB pages when huge) and writes every page's content for boot_id. */
int gmem_boot(uint64_t size_mib, bool huge, uint64_t boot_id, GuestMemory **ret, char **ret_error);

/* Writes the memory file for a snapshot: every region in order, pages that are all zero left
 * as holes. The file is created (truncated if it exists), like Firecracker's. */
int gmem_write_file(GuestMemory *m, const char *path, char **ret_error);

/* Restore, File backend: maps `path` MAP_PRIVATE (the file must not change meanwhile). */
int gmem_load_file(const char *path, uint64_t size_mib, bool huge, GuestMemory **ret,
		   char **ret_error);

/* Restore, Uffd backend: maps anonymous memory, registers it with a userfaultfd (MISSING mode,
 * UFFD_FEATURE_EVENT_REMOVE), connects to the unix socket `socket_path` and sends, in ONE
 * sendmsg, the JSON array
 *   [{"base_host_virt_addr":N,"size":N,"offset":N,"page_size":N,"page_size_kib":N}, ...]
 * (page_size_kib is in bytes, as Firecracker sends it) with the userfaultfd as SCM_RIGHTS.
 * The connection stays open for the memory's lifetime (the handler sees POLLHUP when we go). */
int gmem_load_uffd(const char *socket_path, uint64_t size_mib, bool huge, GuestMemory **ret,
		   char **ret_error);

typedef enum GmemOrder {
	GMEM_ORDER_SEQUENTIAL,
	GMEM_ORDER_RANDOM,
} GmemOrder;

/* Touches and checks pages against the content of boot_id: all of them (sample == 0) or
 * `sample` pages chosen at random. Returns 0, or -EBADMSG with *ret_error naming the first
 * bad pages (and how many were bad). */
int gmem_verify(GuestMemory *m, uint64_t boot_id, uint64_t sample, GmemOrder order, uint64_t seed,
		char **ret_error);

/* Gives pages back (MADV_DONTNEED), as a balloon would: with the Uffd backend the handler
 * receives UFFD_EVENT_REMOVE, and these pages read as zero afterwards. Offsets into guest
 * memory. Verification expects zeros there from now on. */
int gmem_discard(GuestMemory *m, uint64_t offset, uint64_t length);

size_t gmem_n_regions(const GuestMemory *m);
const GmemRegion *gmem_region(const GuestMemory *m, size_t i);
uint64_t gmem_size(const GuestMemory *m);
void gmem_free(GuestMemory *m);

/* The content of guest page `index` for `boot_id`, into buf (GMEM_PAGE bytes); false when
 * the page is meant to be all zero. Exposed for the tests' reference fault handler. */
bool gmem_page_content(uint64_t boot_id, uint64_t index, uint8_t *buf);
