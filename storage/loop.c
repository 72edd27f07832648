/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Loop devices, in the manner of systemd's loop-util.c: LOOP_CONFIGURE in one step where the
 * kernel has it (5.8+), LOOP_SET_FD + LOOP_SET_STATUS64 otherwise; retry when another process
 * takes the free device first; auto-clear so that nothing outlives its last user.
 */
#include <dirent.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/macro.h"
#include "storage-internal.h"

#define ATTACH_ATTEMPTS 256

static uint32_t random_u32(void)
{
	uint32_t v;
	if (getrandom(&v, sizeof(v), GRND_NONBLOCK) != sizeof(v))
		v = (uint32_t)getpid() * 2654435761u ^ (uint32_t)time(NULL);
	return v;
}

static void sleep_ms(unsigned ms)
{
	struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
	nanosleep(&ts, NULL);
}

/* Opens /dev/loopN; the node may lag behind LOOP_CTL_GET_FREE when udev creates it. */
static int open_loop_node(int nr, char *path, size_t size)
{
	snprintf(path, size, "/dev/loop%d", nr);
	for (int i = 0; i < 50; i++) {
		int fd = open(path, O_RDWR | O_CLOEXEC);
		if (fd >= 0 || errno != ENOENT)
			return fd >= 0 ? fd : -errno;
		sleep_ms(10);
	}
	return -ENOENT;
}

static int configure(int lfd, int backing, const char *path, uint32_t lo_flags)
{
	struct loop_config cfg = {.fd = (uint32_t)backing};

	cfg.info.lo_flags = lo_flags;
	snprintf((char *)cfg.info.lo_file_name, sizeof(cfg.info.lo_file_name), "%s", path);
	if (ioctl(lfd, LOOP_CONFIGURE, &cfg) == 0)
		return 0;
	return -errno;
}

/* The pre-5.8 way: two ioctls, so a failure in the second must undo the first. */
static int configure_legacy(int lfd, int backing, const char *path, uint32_t lo_flags)
{
	struct loop_info64 info = {.lo_flags = lo_flags & LO_FLAGS_AUTOCLEAR};
	int r;

	if (ioctl(lfd, LOOP_SET_FD, backing) < 0)
		return -errno;
	snprintf((char *)info.lo_file_name, sizeof(info.lo_file_name), "%s", path);
	if (ioctl(lfd, LOOP_SET_STATUS64, &info) < 0) {
		r = -errno;
		(void)ioctl(lfd, LOOP_CLR_FD);
		return r;
	}
	/* Read-only comes from the backing fd's mode with LOOP_SET_FD. */
	if (lo_flags & LO_FLAGS_DIRECT_IO)
		(void)ioctl(lfd, LOOP_SET_DIRECT_IO, 1UL);
	return 0;
}

int storage_loop_attach(const char *path, StorageLoopFlags flags, char **ret_device)
{
	_cleanup_close_ int backing = -EBADF, ctl = -EBADF;
	bool ro = flags & STORAGE_LOOP_READ_ONLY;
	uint32_t lo_flags = LO_FLAGS_AUTOCLEAR;
	bool legacy = flags & STORAGE_LOOP_LEGACY;
	char dev[32];

	if (ro)
		lo_flags |= LO_FLAGS_READ_ONLY;
	if (flags & STORAGE_LOOP_DIRECT_IO)
		lo_flags |= LO_FLAGS_DIRECT_IO;

	backing = open(path, (ro ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOCTTY);
	if (backing < 0)
		return -errno;
	ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
	if (ctl < 0)
		return -errno;

	for (int attempt = 0; attempt < ATTACH_ATTEMPTS; attempt++) {
		_cleanup_close_ int lfd = -EBADF;
		int nr, r;

		nr = ioctl(ctl, LOOP_CTL_GET_FREE);
		if (nr < 0)
			return -errno;
		lfd = open_loop_node(nr, dev, sizeof(dev));
		if (lfd < 0)
			return lfd;

		r = legacy ? -ENOTTY : configure(lfd, backing, path, lo_flags);
		if (r == -EINVAL || r == -ENOTTY) {
			/* EINVAL from LOOP_CONFIGURE can mean an old kernel that does not know it:
			 * the legacy path answers EBUSY if the device was in fact taken. */
			legacy = true;
			r = configure_legacy(lfd, backing, path, lo_flags);
		}
		if (r == -EBUSY) {
			/* Another process took this free device between GET_FREE and our ioctl.
			 * Many attaching at once all get the same free number: back off for a
			 * random while (growing), as systemd does, so that they spread out. */
			log_debug("loop%d taken by someone else, retrying", nr);
			unsigned cap = 1u + 2u * (unsigned)(attempt < 16 ? attempt : 16);
			sleep_ms((unsigned)random_u32() % cap);
			continue;
		}
		if (r < 0)
			return r;
		log_debug("attached %s to %s%s", path, dev, ro ? " (read-only)" : "");
		*ret_device = strdup(dev);
		if (!*ret_device) {
			/* Closing the fd detaches the auto-clearing device again. */
			return -ENOMEM;
		}
		return TAKE_FD(lfd);
	}
	return -EBUSY;
}

int storage_loop_detach(const char *device)
{
	_cleanup_close_ int fd = open(device, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	if (ioctl(fd, LOOP_CLR_FD) < 0) {
		/* ENXIO: not bound (any more); with auto-clear that is success. */
		if (errno == ENXIO)
			return 0;
		return -errno;
	}
	return 0;
}

int loop_get_status(int fd, struct loop_info64 *ret)
{
	if (ioctl(fd, LOOP_GET_STATUS64, ret) < 0)
		return -errno;
	return 0;
}

int loop_foreach_bound(int (*fn)(int nr, const char *device, void *userdata), void *userdata)
{
	_cleanup_(closedirp) DIR *d = opendir("/sys/block");
	struct dirent *de;

	if (!d)
		return -errno;
	while ((de = readdir(d))) {
		char p[PATH_MAX], dev[32];
		int nr;

		if (sscanf(de->d_name, "loop%d", &nr) != 1)
			continue;
		/* loop/ appears in sysfs only while the device is bound. */
		snprintf(p, sizeof(p), "/sys/block/%s/loop", de->d_name);
		if (access(p, F_OK) < 0)
			continue;
		snprintf(dev, sizeof(dev), "/dev/loop%d", nr);
		int r = fn(nr, dev, userdata);
		if (r != 0)
			return r;
	}
	return 0;
}

typedef struct FindCtx {
	dev_t dev;
	ino_t ino;
	int read_only;
	char *found;
} FindCtx;

static int find_one(int nr, const char *device, void *userdata)
{
	FindCtx *ctx = userdata;
	_cleanup_close_ int fd = open(device, O_RDONLY | O_CLOEXEC);
	struct loop_info64 info;
	(void)nr;

	if (fd < 0 || loop_get_status(fd, &info) < 0)
		return 0; /* detached meanwhile */
	if (info.lo_device != ctx->dev || info.lo_inode != ctx->ino)
		return 0;
	if (ctx->read_only >= 0 && !!(info.lo_flags & LO_FLAGS_READ_ONLY) != ctx->read_only)
		return 0;
	ctx->found = strdup(device);
	return ctx->found ? 1 : -ENOMEM;
}

int storage_loop_find(const char *path, int read_only, char **ret_device)
{
	FindCtx ctx = {.read_only = read_only};
	struct stat st;
	int r;

	if (stat(path, &st) < 0)
		return -errno;
	ctx.dev = st.st_dev;
	ctx.ino = st.st_ino;
	r = loop_foreach_bound(find_one, &ctx);
	if (r < 0)
		return r;
	if (!ctx.found)
		return -ENOENT;
	*ret_device = ctx.found;
	return 0;
}

int loop_dev_backed_by(dev_t dev, const struct stat *file, bool *ret_read_only)
{
	char sys[64], link[PATH_MAX], node[32];
	_cleanup_close_ int fd = -EBADF;
	struct loop_info64 info;
	struct stat st;
	ssize_t n;
	int nr;

	/* Opening and closing the device is harmless for the devices this is asked about: a dm
	 * table holds them, so our close is never the last one that would auto-clear them.
	 * The kernel's name for the device: /sys/dev/block/M:m -> ../../devices/.../block/loopN */
	snprintf(sys, sizeof(sys), "/sys/dev/block/%u:%u", major(dev), minor(dev));
	n = readlink(sys, link, sizeof(link) - 1);
	if (n < 0)
		return errno == ENOENT ? 0 : -errno;
	link[n] = 0;
	const char *base = strrchr(link, '/');
	if (sscanf(base ? base + 1 : link, "loop%d", &nr) != 1)
		return 0;
	snprintf(node, sizeof(node), "/dev/loop%d", nr);
	fd = open(node, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT || errno == ENXIO ? 0 : -errno;
	/* The node must be that device (a /dev out of step with sysfs would fool us otherwise). */
	if (fstat(fd, &st) < 0)
		return -errno;
	if (!S_ISBLK(st.st_mode) || st.st_rdev != dev)
		return 0;
	if (ioctl(fd, LOOP_GET_STATUS64, &info) < 0)
		return errno == ENXIO ? 0 : -errno; /* ENXIO: not bound */
	if (info.lo_device != file->st_dev || info.lo_inode != file->st_ino)
		return 0;
	if (ret_read_only)
		*ret_read_only = info.lo_flags & LO_FLAGS_READ_ONLY;
	return 1;
}
