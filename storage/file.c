/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The file backend (a sandbox's disk is its own copy of the base image), sparse copies and
 * flattening (a disk's content into a sparse image).
 *
 * Copies keep holes: a reflink (FICLONE) shares every extent where the filesystem can (btrfs,
 * XFS with reflink); otherwise only the data ranges (SEEK_DATA/SEEK_HOLE) are copied, with
 * copy_file_range so that the kernel moves the bytes.
 */
#include <fcntl.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/macro.h"
#include "storage-internal.h"

#define FLATTEN_BUF   (1U << 20)
#define FLATTEN_BLOCK 4096U

/* Copies [off, off+len) with copy_file_range, falling back to read/write where the kernel or
 * filesystem refuses (EXDEV before 5.3, some network filesystems). */
static int copy_range(int in, int out, off_t off, off_t len)
{
	char buf[1 << 16];
	bool no_cfr = false;

	while (len > 0) {
		if (!no_cfr) {
			loff_t ioff = off, ooff = off;
			ssize_t k = copy_file_range(in, &ioff, out, &ooff, (size_t)len, 0);
			if (k > 0) {
				off += k;
				len -= k;
				continue;
			}
			if (k == 0)
				return -EIO; /* source shorter than it said */
			if (errno != EXDEV && errno != EINVAL && errno != ENOSYS &&
			    errno != EOPNOTSUPP)
				return -errno;
			no_cfr = true;
		}
		size_t want = len < (off_t)sizeof(buf) ? (size_t)len : sizeof(buf);
		ssize_t k = pread(in, buf, want, off);
		if (k <= 0)
			return k < 0 ? -errno : -EIO;
		for (ssize_t done = 0; done < k;) {
			ssize_t w = pwrite(out, buf + done, (size_t)(k - done), off + done);
			if (w < 0)
				return -errno;
			done += w;
		}
		off += k;
		len -= k;
	}
	return 0;
}

/* Work happens in dest.tmp-XXXXXX, renamed at the end: a crash leaves no half-written image
 * under dest. */
static int open_temp_beside(const char *dest, char **ret_tmp)
{
	if (asprintf(ret_tmp, "%s.tmp-XXXXXX", dest) < 0) {
		*ret_tmp = NULL;
		return -ENOMEM;
	}
	int fd = mkostemp(*ret_tmp, O_CLOEXEC);
	return fd >= 0 ? fd : negative_errno();
}

/* Renames tmp to dest unless dest exists (link + unlink is the atomic "no replace"). */
static int commit_temp(int fd, const char *tmp, const char *dest)
{
	if (fsync(fd) < 0)
		return -errno;
	if (link(tmp, dest) < 0)
		return -errno;
	(void)unlink(tmp);
	return 0;
}

int storage_copy_sparse(const char *src, const char *dest, bool try_reflink)
{
	_cleanup_close_ int in = -EBADF, out = -EBADF;
	_cleanup_free_ char *tmp = NULL;
	struct stat st;
	int r, reflinked = 0;

	in = open(src, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (in < 0)
		return -errno;
	if (fstat(in, &st) < 0)
		return -errno;
	if (!S_ISREG(st.st_mode))
		return -EINVAL;
	if (access(dest, F_OK) == 0)
		return -EEXIST;
	out = open_temp_beside(dest, &tmp);
	if (out < 0)
		return out;

	if (try_reflink && ioctl(out, FICLONE, in) == 0) {
		reflinked = 1;
	} else {
		off_t pos = 0;
		if (ftruncate(out, st.st_size) < 0) {
			r = -errno;
			goto fail;
		}
		for (;;) {
			off_t data = lseek(in, pos, SEEK_DATA);
			if (data < 0) {
				if (errno == ENXIO) /* no data after pos */
					break;
				r = -errno;
				goto fail;
			}
			off_t hole = lseek(in, data, SEEK_HOLE);
			if (hole < 0) {
				r = -errno;
				goto fail;
			}
			r = copy_range(in, out, data, hole - data);
			if (r < 0)
				goto fail;
			pos = hole;
		}
	}
	if (fchmod(out, st.st_mode & 07777) < 0) {
		r = -errno;
		goto fail;
	}
	r = commit_temp(out, tmp, dest);
	if (r < 0)
		goto fail;
	return reflinked;
fail:
	(void)unlink(tmp);
	return r;
}

static bool all_zero(const char *p, size_t n)
{
	/* Compare the block with itself shifted by one: all bytes equal, and the first is 0. */
	return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

int storage_flatten_image(const char *src, const char *dest, char **ret_error)
{
	_cleanup_close_ int in = -EBADF, out = -EBADF;
	_cleanup_free_ char *tmp = NULL, *buf = NULL;
	uint64_t size, off = 0;
	struct stat st;
	int r;

	in = open(src, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (in < 0)
		return error_set(ret_error, -errno, "cannot open %s: %m", src);
	if (fstat(in, &st) < 0)
		return error_set(ret_error, -errno, "cannot stat %s: %m", src);
	if (S_ISBLK(st.st_mode)) {
		if (ioctl(in, BLKGETSIZE64, &size) < 0)
			return error_set(ret_error, -errno, "cannot size %s: %m", src);
	} else {
		size = (uint64_t)st.st_size;
	}
	if (access(dest, F_OK) == 0)
		return error_set(ret_error, -EEXIST, "%s exists already", dest);
	buf = malloc(FLATTEN_BUF);
	if (!buf)
		return -ENOMEM;
	out = open_temp_beside(dest, &tmp);
	if (out < 0)
		return error_set(ret_error, out, "cannot create a file beside %s: %s", dest,
				 strerror(-out));
	if (ftruncate(out, (off_t)size) < 0) {
		r = error_set(ret_error, -errno, "cannot size %s: %m", tmp);
		goto fail;
	}
	while (off < size) {
		size_t want = size - off < FLATTEN_BUF ? (size_t)(size - off) : FLATTEN_BUF;
		ssize_t k = pread(in, buf, want, (off_t)off);
		if (k < 0) {
			r = error_set(ret_error, -errno, "cannot read %s at %llu: %m", src,
				      (unsigned long long)off);
			goto fail;
		}
		if (k == 0) {
			r = error_set(ret_error, -EIO, "%s ended at %llu of %llu bytes", src,
				      (unsigned long long)off, (unsigned long long)size);
			goto fail;
		}
		/* Zero blocks stay holes: a mostly empty disk flattens to a mostly empty file. */
		for (size_t b = 0; b < (size_t)k; b += FLATTEN_BLOCK) {
			size_t n = (size_t)k - b < FLATTEN_BLOCK ? (size_t)k - b : FLATTEN_BLOCK;
			if (all_zero(buf + b, n))
				continue;
			for (size_t done = 0; done < n;) {
				ssize_t w = pwrite(out, buf + b + done, n - done,
						   (off_t)(off + b + done));
				if (w < 0) {
					r = error_set(ret_error, -errno, "cannot write %s: %m",
						      tmp);
					goto fail;
				}
				done += (size_t)w;
			}
		}
		off += (uint64_t)k;
	}
	r = fchmod(out, 0644) < 0 ? negative_errno() : commit_temp(out, tmp, dest);
	if (r < 0) {
		r = error_set(ret_error, r, "cannot finish %s: %s", dest, strerror(-r));
		goto fail;
	}
	return 0;
fail:
	(void)unlink(tmp);
	return r;
}

int file_disk_create(const StorageDiskSpec *spec, bool restore, char **ret_device, char **ret_error)
{
	char *device;
	struct stat st;
	int r;

	if (!spec->base_image || !spec->cow_path)
		return error_set(ret_error, -EINVAL, "base image and disk path are required");
	if (restore) {
		if (stat(spec->cow_path, &st) < 0)
			return error_set(ret_error, -errno, "disk %s: %m", spec->cow_path);
	} else {
		r = storage_copy_sparse(spec->base_image, spec->cow_path, true);
		if (r < 0)
			return error_set(ret_error, r, "cannot copy %s to %s: %s", spec->base_image,
					 spec->cow_path, strerror(-r));
		log_debug("%s %s to %s", r ? "reflinked" : "copied", spec->base_image,
			  spec->cow_path);
	}
	device = strdup(spec->cow_path);
	if (!device)
		return -ENOMEM;
	*ret_device = device;
	return 0;
}

/* Bytes of the file's extents that no other file shares: with a reflinked copy, what the
 * sandbox wrote; with a plain copy, all of it. FIEMAP reports shared extents on btrfs/XFS. */
static int unshared_bytes(int fd, uint64_t *ret)
{
	_cleanup_free_ struct fiemap *fm = NULL;
	const unsigned n = 256;
	uint64_t start = 0, total = 0;

	fm = calloc(1, sizeof(*fm) + n * sizeof(struct fiemap_extent));
	if (!fm)
		return -ENOMEM;
	for (;;) {
		fm->fm_start = start;
		fm->fm_length = FIEMAP_MAX_OFFSET - start;
		fm->fm_flags = FIEMAP_FLAG_SYNC;
		fm->fm_extent_count = n;
		fm->fm_mapped_extents = 0;
		if (ioctl(fd, FS_IOC_FIEMAP, fm) < 0)
			return -errno;
		if (fm->fm_mapped_extents == 0)
			break;
		bool last = false;
		for (unsigned i = 0; i < fm->fm_mapped_extents; i++) {
			struct fiemap_extent *e = &fm->fm_extents[i];
			if (!(e->fe_flags & (FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_UNWRITTEN)))
				total += e->fe_length;
			start = e->fe_logical + e->fe_length;
			last = last || (e->fe_flags & FIEMAP_EXTENT_LAST);
		}
		if (last)
			break;
	}
	*ret = total;
	return 0;
}

int file_disk_status(const StorageDiskSpec *spec, StorageDiskStatus *ret, char **ret_error)
{
	_cleanup_close_ int fd = -EBADF;
	struct stat st;
	uint64_t own = 0;
	int r;

	fd = open(spec->cow_path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return error_set(ret_error, -errno, "disk %s: %m", spec->cow_path);
	if (fstat(fd, &st) < 0)
		return error_set(ret_error, -errno, "disk %s: %m", spec->cow_path);
	r = unshared_bytes(fd, &own);
	if (r < 0) /* no FIEMAP (tmpfs): all allocated blocks are the disk's own */
		own = (uint64_t)st.st_blocks * 512;
	*ret = (StorageDiskStatus){
		.used_bytes = own,
		.capacity_bytes = spec->cow_size,
		.size_bytes = (uint64_t)st.st_size,
		/* Not enforced by the file backend, only reported. */
		.overflow = spec->cow_size > 0 && own > spec->cow_size,
	};
	return 0;
}
