/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Network namespaces as iproute2 makes them: a new namespace is created by unshare() on the
 * calling thread and kept alive by a bind mount of /proc/thread-self/ns/net onto a file; the
 * thread then returns to where it was. Only the calling thread ever changes namespace, so this
 * works in a multithreaded daemon.
 */
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/fileio.h"
#include "common/log.h"
#include "common/macro.h"
#include "netns-internal.h"

int netns_enter(const char *path)
{
	_cleanup_close_ int saved = -EBADF, target = -EBADF;

	saved = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	if (saved < 0)
		return -errno;
	target = open(path, O_RDONLY | O_CLOEXEC);
	if (target < 0)
		return -errno;
	if (setns(target, CLONE_NEWNET) < 0)
		return -errno;
	return TAKE_FD(saved);
}

int netns_leave(int saved)
{
	int r = 0;

	if (saved < 0)
		return -EBADF;
	if (setns(saved, CLONE_NEWNET) < 0)
		r = -errno;
	close(saved);
	return r;
}

int netns_dir_prepare(const char *dir)
{
	int r = mkdir_p(dir, 0755);
	if (r < 0)
		return r;
	if (mount(NULL, dir, NULL, MS_SHARED | MS_REC, NULL) == 0)
		return 0;
	if (errno != EINVAL)
		return -errno;
	/* Not a mount point yet: make it one (a bind mount on itself), then shared. */
	if (mount(dir, dir, "none", MS_BIND | MS_REC, NULL) < 0)
		return -errno;
	if (mount(NULL, dir, NULL, MS_SHARED | MS_REC, NULL) < 0)
		return -errno;
	return 0;
}

int netns_create_at(const char *path)
{
	_cleanup_close_ int saved = -EBADF;
	int fd, r = 0;

	saved = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	if (saved < 0)
		return -errno;
	fd = open(path, O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	close(fd);

	if (unshare(CLONE_NEWNET) < 0) {
		r = -errno;
		goto fail;
	}
	if (mount("/proc/thread-self/ns/net", path, "none", MS_BIND, NULL) < 0)
		r = -errno;
	/* Back home whatever happened; failing that, this thread is unusable: say so loudly
	 * through the error, the caller cannot carry on in the wrong namespace. */
	if (setns(saved, CLONE_NEWNET) < 0) {
		log_debug("cannot return to the original namespace: %m");
		if (r == 0)
			r = -errno;
	}
	if (r == 0)
		return 0;
fail:
	(void)umount2(path, MNT_DETACH);
	(void)unlink(path);
	return r;
}

int netns_remove_at(const char *path)
{
	if (umount2(path, MNT_DETACH) < 0 && errno != EINVAL && errno != ENOENT)
		return -errno;
	if (unlink(path) < 0 && errno != ENOENT)
		return -errno;
	return 0;
}

int netns_sysctl_write(const char *path, const char *value)
{
	_cleanup_close_ int fd = open(path, O_WRONLY | O_CLOEXEC);
	size_t n = strlen(value);

	if (fd < 0)
		return -errno;
	if (write(fd, value, n) != (ssize_t)n)
		return negative_errno();
	return 0;
}
