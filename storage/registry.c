/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The loop registry: one read-only loop device per base image, shared by every sandbox disk
 * over that image. Keyed by the image's (st_dev, st_ino), so a path that now names a new file
 * (an image replaced on disk) gets a new device while disks over the old one keep theirs.
 *
 * Each entry holds an fd on its auto-clearing loop device. Dropping the last reference closes
 * it; the kernel then detaches the device as soon as no dm device uses it either. After an
 * agent restart the first acquire adopts the device a previous process attached (found by
 * inode), so the one-device-per-image rule survives restarts.
 */
#include <fcntl.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/macro.h"
#include "storage-internal.h"

struct BaseEntry {
	dev_t dev;
	ino_t ino;
	char *device; /* /dev/loopN */
	dev_t rdev;
	uint64_t sectors;
	int fd;
	unsigned refs;
	BaseEntry *next;
};

void registry_init(Registry *r)
{
	pthread_mutex_init(&r->lock, NULL);
	r->entries = NULL;
}

static void entry_free(BaseEntry *e)
{
	safe_close(e->fd);
	free(e->device);
	free(e);
}

void registry_done(Registry *r)
{
	/* Closing our fds does not detach devices dm still uses (auto-clear waits for them). */
	for (BaseEntry *e = r->entries, *n; e; e = n) {
		n = e->next;
		entry_free(e);
	}
	r->entries = NULL;
	pthread_mutex_destroy(&r->lock);
}

static BaseEntry *find(Registry *r, dev_t dev, ino_t ino)
{
	for (BaseEntry *e = r->entries; e; e = e->next)
		if (e->dev == dev && e->ino == ino)
			return e;
	return NULL;
}

/* Opens an existing device for `image` if one is bound read-only to the same inode. The check
 * is repeated on our own fd: the device may have been detached and reused in between. */
static int adopt(const char *image, const struct stat *st, char **ret_device)
{
	_cleanup_free_ char *device = NULL;
	_cleanup_close_ int fd = -EBADF;
	struct loop_info64 info;
	int r;

	r = storage_loop_find(image, 1, &device);
	if (r < 0)
		return r;
	fd = open(device, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	r = loop_get_status(fd, &info);
	if (r < 0)
		return r;
	if (info.lo_device != st->st_dev || info.lo_inode != st->st_ino)
		return -ENOENT;
	*ret_device = TAKE_PTR(device);
	return TAKE_FD(fd);
}

int registry_acquire(Registry *r, const char *image, char **ret_device, dev_t *ret_dev,
		     uint64_t *ret_sectors, char **ret_error)
{
	_cleanup_free_ char *device = NULL;
	_cleanup_close_ int fd = -EBADF;
	struct stat st, dst;
	uint64_t bytes;
	BaseEntry *e;
	int ret;

	if (stat(image, &st) < 0)
		return error_set(ret_error, -errno, "base image %s: %m", image);
	if (!S_ISREG(st.st_mode))
		return error_set(ret_error, -EINVAL, "base image %s is not a regular file", image);
	if (st.st_size == 0 || st.st_size % 512 != 0)
		return error_set(ret_error, -EINVAL,
				 "base image %s is %lld bytes, not a non-zero multiple of 512",
				 image, (long long)st.st_size);

	pthread_mutex_lock(&r->lock);
	e = find(r, st.st_dev, st.st_ino);
	if (e) {
		e->refs++;
		goto found;
	}

	fd = adopt(image, &st, &device);
	if (fd >= 0) {
		log_debug("adopted %s for base %s", device, image);
	} else {
		fd = storage_loop_attach(image, STORAGE_LOOP_READ_ONLY, &device);
		if (fd < 0) {
			ret = error_set(ret_error, fd, "cannot attach base image %s: %s", image,
					strerror(-fd));
			goto out;
		}
	}
	if (fstat(fd, &dst) < 0 || ioctl(fd, BLKGETSIZE64, &bytes) < 0) {
		ret = error_set(ret_error, -errno, "cannot inspect %s: %m", device);
		goto out;
	}
	e = calloc(1, sizeof(*e));
	if (!e) {
		ret = -ENOMEM;
		goto out;
	}
	e->dev = st.st_dev;
	e->ino = st.st_ino;
	e->rdev = dst.st_rdev;
	e->sectors = bytes / 512;
	e->device = TAKE_PTR(device);
	e->fd = TAKE_FD(fd);
	e->refs = 1;
	e->next = r->entries;
	r->entries = e;

found:
	*ret_device = strdup(e->device);
	if (!*ret_device) {
		e->refs--; /* the entry stays; a later release or acquire settles it */
		ret = -ENOMEM;
		goto out;
	}
	if (ret_dev)
		*ret_dev = e->rdev;
	if (ret_sectors)
		*ret_sectors = e->sectors;
	ret = 0;
out:
	pthread_mutex_unlock(&r->lock);
	return ret;
}

int registry_release(Registry *r, const char *image)
{
	struct stat st;
	BaseEntry **p, *e;

	/* The image may be gone from disk already (template deleted): the inode is then unknown
	 * and the device can only be found by the path it was attached with. */
	bool have_stat = stat(image, &st) == 0;

	pthread_mutex_lock(&r->lock);
	for (p = &r->entries; (e = *p); p = &e->next) {
		if (have_stat ? (e->dev == st.st_dev && e->ino == st.st_ino) : false)
			break;
	}
	if (!e && !have_stat) {
		for (p = &r->entries; (e = *p); p = &e->next) {
			struct loop_info64 info;
			if (loop_get_status(e->fd, &info) == 0 &&
			    strncmp((const char *)info.lo_file_name, image,
				    sizeof(info.lo_file_name)) == 0)
				break;
		}
	}
	if (!e) {
		/* Not ours (another process, or before a restart): the kernel detaches the
		 * auto-clearing device when its last dm user goes. */
		pthread_mutex_unlock(&r->lock);
		return 0;
	}
	if (e->refs > 0)
		e->refs--;
	if (e->refs == 0) {
		*p = e->next;
		log_debug("last user of %s gone, releasing %s", image, e->device);
		entry_free(e);
	}
	pthread_mutex_unlock(&r->lock);
	return 0;
}

unsigned registry_count(Registry *r)
{
	unsigned n = 0;

	pthread_mutex_lock(&r->lock);
	for (BaseEntry *e = r->entries; e; e = e->next)
		n++;
	pthread_mutex_unlock(&r->lock);
	return n;
}
