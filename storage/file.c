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
#include <libgen.h>
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

/* Renames tmp to dest unless dest exists (link + unlink is the atomic "no replace"), then syncs
 * the directory so that the name survives a crash as well as the data. */
static int commit_temp(int fd, const char *tmp, const char *dest)
{
	_cleanup_free_ char *dir = NULL;
	_cleanup_close_ int dfd = -EBADF;

	if (fsync(fd) < 0)
		return -errno;
	if (link(tmp, dest) < 0)
		return -errno;
	(void)unlink(tmp);
	dir = strdup(dest);
	if (!dir)
		return -ENOMEM;
	dfd = open(dirname(dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd >= 0)
		(void)fsync(dfd);
	return 0;
}

/* storage_copy_sparse() with the copy's mode given: (mode_t)-1 keeps the source's. */
static int copy_sparse(const char *src, const char *dest, bool try_reflink, mode_t mode)
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
	if (fchmod(out, mode == (mode_t)-1 ? st.st_mode & 07777 : mode) < 0) {
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

int storage_copy_sparse(const char *src, const char *dest, bool try_reflink)
{
	return copy_sparse(src, dest, try_reflink, (mode_t)-1);
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
		/* The copy is the disk: whatever process made it, it is there or it is not. */
		if (stat(spec->cow_path, &st) < 0)
			return error_set(ret_error, -errno, "disk %s: %m", spec->cow_path);
		if (!S_ISREG(st.st_mode))
			return error_set(ret_error, -EINVAL, "disk %s is not a regular file",
					 spec->cow_path);
	} else {
		/* The sandbox's own disk, written by its VMM: private to the owner whatever the
		 * base's mode. */
		r = copy_sparse(spec->base_image, spec->cow_path, true, 0600);
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

int file_disk_status(const StorageDiskSpec *spec, StorageDiskStatus *ret, char **ret_error)
{
	struct stat st, bst;
	uint64_t used, base = 0;

	if (stat(spec->cow_path, &st) < 0)
		return error_set(ret_error, -errno, "disk %s: %m", spec->cow_path);
	if (!S_ISREG(st.st_mode))
		return error_set(ret_error, -EINVAL, "disk %s is not a regular file",
				 spec->cow_path);
	used = (uint64_t)st.st_blocks * 512;
	/* The changes are what the copy allocated beyond what the base has: a sparse copy starts
	 * with the base's allocation. (A reflinked copy does too, and rewriting shared blocks
	 * does not grow it: the allowance is reported, not enforced, by this backend.) */
	if (spec->base_image && stat(spec->base_image, &bst) == 0)
		base = (uint64_t)bst.st_blocks * 512;
	*ret = (StorageDiskStatus){
		.used_bytes = used,
		.capacity_bytes = spec->cow_size,
		.size_bytes = (uint64_t)st.st_size,
		.overflow = spec->cow_size > 0 && used > base && used - base > spec->cow_size,
	};
	return 0;
}
