/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The working set file of ember-uffd (uffd.h, DESIGN.md §7): which pages of a memory file a
 * guest wanted first after a resume, in that order, so that the next resume from the same
 * file copies them before anything else. The file is a hint: one that does not parse, or
 * was recorded from another memory file, is ignored and recorded again, never trusted.
 */
#include "uffd.h"

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/fileio.h"
#include "common/macro.h"

#define PAGE_4K (4096u)
#define PAGE_2M (2u << 20)

static uint64_t mtime_ns(const struct stat *st)
{
	return (uint64_t)st->st_mtim.tv_sec * 1000000000ull + (uint64_t)st->st_mtim.tv_nsec;
}

int uffd_working_set_parse(const void *data, size_t len, const struct stat *mem,
			   UffdWorkingSet *ret, char **ret_error)
{
	UffdWorkingSetHeader h;
	uint32_t *pages;
	uint64_t n_file_pages;

	if (!data || !mem || !ret)
		return error_set(ret_error, -EINVAL, "no data, memory file or result");
	if (len < sizeof(h))
		return error_set(ret_error, -EBADMSG, "shorter than its header (%zu bytes)", len);
	memcpy(&h, data, sizeof(h));
	h.version = le32toh(h.version);
	h.page_size = le32toh(h.page_size);
	h.count = le32toh(h.count);
	h.reserved = le32toh(h.reserved);
	h.mem_size = le64toh(h.mem_size);
	h.mem_ino = le64toh(h.mem_ino);
	h.mem_mtime_ns = le64toh(h.mem_mtime_ns);
	if (memcmp(h.magic, UFFD_WS_MAGIC, sizeof(h.magic)) != 0)
		return error_set(ret_error, -EBADMSG, "not a working set file");
	if (h.version != UFFD_WS_VERSION)
		return error_set(ret_error, -EBADMSG, "version %" PRIu32 ", not %d", h.version,
				 UFFD_WS_VERSION);
	if (h.page_size != PAGE_4K && h.page_size != PAGE_2M)
		return error_set(ret_error, -EBADMSG, "page size %" PRIu32, h.page_size);
	if (h.reserved != 0)
		return error_set(ret_error, -EBADMSG, "reserved field set");
	if (h.count == 0 || h.count > UFFD_RECORD_MAX_PAGES)
		return error_set(ret_error, -EBADMSG, "%" PRIu32 " pages", h.count);
	if (len != sizeof(h) + (size_t)h.count * sizeof(uint32_t))
		return error_set(ret_error, -EBADMSG, "%zu bytes for %" PRIu32 " pages", len,
				 h.count);
	if (h.mem_size != (uint64_t)mem->st_size || h.mem_ino != (uint64_t)mem->st_ino ||
	    h.mem_mtime_ns != mtime_ns(mem))
		return error_set(ret_error, -ESTALE,
				 "recorded from another memory file (or one since changed)");

	pages = malloc((size_t)h.count * sizeof(uint32_t));
	if (!pages)
		return error_set(ret_error, -ENOMEM, "out of memory");
	memcpy(pages, (const uint8_t *)data + sizeof(h), (size_t)h.count * sizeof(uint32_t));
	n_file_pages = h.mem_size / h.page_size;
	for (uint32_t k = 0; k < h.count; k++) {
		pages[k] = le32toh(pages[k]);
		if (pages[k] >= n_file_pages) {
			uint32_t p = pages[k];

			free(pages);
			return error_set(ret_error, -EBADMSG,
					 "page %" PRIu32 " is beyond the memory file", p);
		}
	}
	*ret = (UffdWorkingSet){.h = h, .pages = pages};
	return 0;
}

int uffd_working_set_load(const char *path, const struct stat *mem, UffdWorkingSet *ret,
			  char **ret_error)
{
	const size_t max = sizeof(UffdWorkingSetHeader) + UFFD_RECORD_MAX_PAGES * sizeof(uint32_t);
	_cleanup_free_ char *data = NULL;
	_cleanup_free_ char *why = NULL;
	size_t len = 0;
	int r;

	r = read_full_file(path, max, &data, &len);
	if (r < 0)
		return error_set(ret_error, r, "cannot read %s: %m", path);
	r = uffd_working_set_parse(data, len, mem, ret, &why);
	if (r < 0)
		return error_set(ret_error, r, "%s: %s", path, why ?: "invalid");
	return 0;
}

int uffd_working_set_write(const char *path, const UffdWorkingSet *ws, const struct stat *mem,
			   char **ret_error)
{
	size_t len = sizeof(UffdWorkingSetHeader) + (size_t)ws->h.count * sizeof(uint32_t);
	_cleanup_free_ uint8_t *buf = malloc(len);
	UffdWorkingSetHeader h = ws->h;
	int r;

	if (!buf)
		return error_set(ret_error, -ENOMEM, "out of memory");
	memcpy(h.magic, UFFD_WS_MAGIC, sizeof(h.magic));
	h.version = htole32(UFFD_WS_VERSION);
	h.page_size = htole32(h.page_size);
	h.count = htole32(h.count);
	h.reserved = 0;
	h.mem_size = htole64((uint64_t)mem->st_size);
	h.mem_ino = htole64((uint64_t)mem->st_ino);
	h.mem_mtime_ns = htole64(mtime_ns(mem));
	memcpy(buf, &h, sizeof(h));
	for (uint32_t k = 0; k < ws->h.count; k++) {
		uint32_t v = htole32(ws->pages[k]);

		memcpy(buf + sizeof(h) + (size_t)k * sizeof(v), &v, sizeof(v));
	}
	r = write_file_atomic(path, buf, len, 0600);
	if (r < 0)
		return error_set(ret_error, r, "cannot write %s: %m", path);
	return 0;
}

void uffd_working_set_done(UffdWorkingSet *ws)
{
	free(ws->pages);
	ws->pages = NULL;
}
