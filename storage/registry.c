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
 *
 * Locking: the registry's lock covers only list work and counts. Attaching (which may retry
 * for a while when other processes race for free loop devices) happens under the entry's own
 * lock, so it holds up only the disks over that same image. An entry is "pinned" while an
 * acquirer works on it without the registry lock, and is freed only when it has neither
 * references nor pins.
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
	BaseKey key;
	pthread_mutex_t lock; /* held while the device is attached or adopted */
	/* Set once, under `lock`, before the first reference is counted; fixed from then on. */
	char *device; /* /dev/loopN */
	dev_t rdev;
	uint64_t sectors;
	int fd;
	/* Registry.lock */
	unsigned refs;
	unsigned pins;
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
	pthread_mutex_destroy(&e->lock);
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

static BaseEntry **find(Registry *r, BaseKey key)
{
	BaseEntry **p;
	for (p = &r->entries; *p; p = &(*p)->next)
		if ((*p)->key.dev == key.dev && (*p)->key.ino == key.ino)
			break;
	return p;
}

/* Frees an entry nobody holds or works on any more. Caller holds r->lock. */
static void settle(Registry *r, BaseEntry *e)
{
	if (e->refs > 0 || e->pins > 0)
		return;
	for (BaseEntry **p = &r->entries; *p; p = &(*p)->next)
		if (*p == e) {
			*p = e->next;
			break;
		}
	if (e->device)
		log_debug("last user of base %s gone, releasing it", e->device);
	entry_free(e);
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

/* Gives the entry its device: adopts one or attaches one. Caller holds e->lock. */
static int entry_attach(BaseEntry *e, const char *image, const struct stat *st, char **ret_error)
{
	_cleanup_free_ char *device = NULL;
	_cleanup_close_ int fd = -EBADF;
	struct stat dst;
	uint64_t bytes;

	fd = adopt(image, st, &device);
	if (fd >= 0) {
		log_debug("adopted %s for base %s", device, image);
	} else {
		fd = storage_loop_attach(image, STORAGE_LOOP_READ_ONLY, &device);
		if (fd < 0)
			return error_set(ret_error, fd, "cannot attach base image %s: %s", image,
					 strerror(-fd));
	}
	if (fstat(fd, &dst) < 0 || ioctl(fd, BLKGETSIZE64, &bytes) < 0)
		return error_set(ret_error, -errno, "cannot inspect %s: %m", device);
	e->rdev = dst.st_rdev;
	e->sectors = bytes / 512;
	e->device = TAKE_PTR(device);
	e->fd = TAKE_FD(fd);
	return 0;
}

int registry_acquire(Registry *r, const char *image, char **ret_device, dev_t *ret_dev,
		     uint64_t *ret_sectors, BaseKey *ret_key, char **ret_error)
{
	_cleanup_free_ char *device = NULL;
	struct stat st;
	BaseEntry *e;
	BaseKey key;
	int ret = 0;

	if (stat(image, &st) < 0)
		return error_set(ret_error, -errno, "base image %s: %m", image);
	if (!S_ISREG(st.st_mode))
		return error_set(ret_error, -EINVAL, "base image %s is not a regular file", image);
	if (st.st_size == 0 || st.st_size % 512 != 0)
		return error_set(ret_error, -EINVAL,
				 "base image %s is %lld bytes, not a non-zero multiple of 512",
				 image, (long long)st.st_size);
	key = (BaseKey){st.st_dev, st.st_ino};

	pthread_mutex_lock(&r->lock);
	e = *find(r, key);
	if (!e) {
		e = calloc(1, sizeof(*e));
		if (!e) {
			pthread_mutex_unlock(&r->lock);
			return -ENOMEM;
		}
		e->key = key;
		e->fd = -EBADF;
		pthread_mutex_init(&e->lock, NULL);
		e->next = r->entries;
		r->entries = e;
	}
	e->pins++;
	pthread_mutex_unlock(&r->lock);

	pthread_mutex_lock(&e->lock);
	if (e->fd < 0)
		ret = entry_attach(e, image, &st, ret_error);
	if (ret >= 0) {
		device = strdup(e->device);
		if (!device)
			ret = -ENOMEM;
	}
	pthread_mutex_unlock(&e->lock);

	pthread_mutex_lock(&r->lock);
	e->pins--;
	if (ret >= 0) {
		e->refs++;
		*ret_device = TAKE_PTR(device);
		if (ret_dev)
			*ret_dev = e->rdev;
		if (ret_sectors)
			*ret_sectors = e->sectors;
		if (ret_key)
			*ret_key = key;
	}
	settle(r, e);
	pthread_mutex_unlock(&r->lock);
	return ret;
}

static void unref(Registry *r, BaseEntry *e)
{
	if (e->refs > 0)
		e->refs--;
	settle(r, e);
}

void registry_release_key(Registry *r, BaseKey key)
{
	_cleanup_(mutex_unlockp) pthread_mutex_t *locked = mutex_take(&r->lock);
	BaseEntry *e = *find(r, key);

	/* None: not ours (another process, or before a restart): the kernel detaches the
	 * auto-clearing device when its last dm user goes. */
	if (e)
		unref(r, e);
}

int registry_release(Registry *r, const char *image)
{
	struct stat st;
	BaseEntry *e = NULL;

	/* The image may be gone from disk already (template deleted): the inode is then unknown
	 * and the device can only be found by the path it was attached with. */
	bool have_stat = stat(image, &st) == 0;

	_cleanup_(mutex_unlockp) pthread_mutex_t *locked = mutex_take(&r->lock);
	if (have_stat)
		e = *find(r, (BaseKey){st.st_dev, st.st_ino});
	else
		for (e = r->entries; e; e = e->next) {
			struct loop_info64 info;
			/* Only counted entries: their fd is set and fixed. */
			if (e->refs > 0 && loop_get_status(e->fd, &info) == 0 &&
			    strncmp((const char *)info.lo_file_name, image,
				    sizeof(info.lo_file_name)) == 0)
				break;
		}
	if (e)
		unref(r, e);
	return 0;
}

unsigned registry_count(Registry *r)
{
	_cleanup_(mutex_unlockp) pthread_mutex_t *locked = mutex_take(&r->lock);
	unsigned n = 0;

	for (BaseEntry *e = r->entries; e; e = e->next)
		if (e->refs > 0)
			n++;
	return n;
}

int registry_refs(Registry *r, const char *image)
{
	struct stat st;

	if (stat(image, &st) < 0)
		return -errno;
	_cleanup_(mutex_unlockp) pthread_mutex_t *locked = mutex_take(&r->lock);
	BaseEntry *e = *find(r, (BaseKey){st.st_dev, st.st_ino});
	return e && e->refs > 0 ? (int)e->refs : -ENOENT;
}
