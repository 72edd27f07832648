/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The dm backend: sandbox disks as device-mapper snapshots (libdevmapper).
 *
 * udev: every create/remove carries a cookie and waits for udev to finish with the device, as
 * LVM does, so /dev/mapper/ember-<id> exists (and is gone) when we return. Where udev does not
 * run, libdevmapper makes the nodes itself and the wait returns at once. Where udev looks alive
 * but does not process events (some containers), the wait is bounded: after udev_wait_ms we
 * release the cookie and make the node ourselves rather than hang.
 *
 * libdevmapper keeps process-wide state (control fd, cookies, its log function): all calls into
 * it are serialized by dm_lock.
 */
#include <ctype.h>
#include <dirent.h>
#include <fcntl.h>
#include <libdevmapper.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "common/id.h"
#include "common/log.h"
#include "common/macro.h"
#include "storage-internal.h"

#define REMOVE_ATTEMPTS 8 /* 10 ms doubling: about 2.5 s in all */

static unsigned udev_wait_ms = 10000;

void storage_set_udev_timeout(unsigned ms)
{
	udev_wait_ms = ms;
}

static pthread_mutex_t dm_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t dm_log_once = PTHREAD_ONCE_INIT;
static __thread char dm_last_error[256];

/* libdevmapper logs to stderr by default; ours keeps its messages at debug level and remembers
 * the last error so that the caller's message can include it. */
static void dm_log(int level, const char *file, int line, int dm_errno_or_class, const char *f, ...)
	__attribute__((format(printf, 5, 6)));
static void dm_log(int level, const char *file, int line, int dm_errno_or_class, const char *f, ...)
{
	char msg[256];
	va_list ap;
	(void)file;
	(void)line;
	(void)dm_errno_or_class;

	va_start(ap, f);
	vsnprintf(msg, sizeof(msg), f, ap);
	va_end(ap);
	if ((level & 7) <= 3) /* _LOG_ERR */
		snprintf(dm_last_error, sizeof(dm_last_error), "%s", msg);
	log_debug("libdevmapper: %s", msg);
}

static void dm_log_setup(void)
{
	dm_log_with_errno_init(dm_log);
}

static void dm_taskp(struct dm_task **t)
{
	if (*t)
		dm_task_destroy(*t);
}

static struct dm_task *task_new(int type, const char *name)
{
	struct dm_task *t;

	pthread_once(&dm_log_once, dm_log_setup);
	t = dm_task_create(type);
	if (!t)
		return NULL;
	if (name && !dm_task_set_name(t, name)) {
		dm_task_destroy(t);
		return NULL;
	}
	return t;
}

/* dm_task_run, then the udev wait. Returns -errno of the ioctl. Caller holds dm_lock. */
static int task_run(struct dm_task *t, const char *name, bool with_cookie)
{
	uint32_t cookie = 0;
	int r = 0, ready = 0;

	dm_last_error[0] = 0;
	if (with_cookie && !dm_task_set_cookie(t, &cookie, 0))
		return -EIO;
	if (!dm_task_run(t)) {
		int e = dm_task_get_errno(t);
		r = e > 0 ? -e : -EIO;
	}
	if (!with_cookie || !cookie)
		return r;

	for (unsigned waited = 0; waited < udev_wait_ms; waited += 10) {
		if (!dm_udev_wait_immediate(cookie, &ready))
			break;
		if (ready)
			return r; /* the cookie is gone with the last immediate wait */
		struct timespec ts = {.tv_nsec = 10 * 1000000L};
		nanosleep(&ts, NULL);
	}
	/* udev did not answer: release the cookie ourselves and make sure the node exists. */
	log_debug("udev did not process %s within %u ms; creating nodes ourselves", name ?: "?",
		  udev_wait_ms);
	(void)dm_udev_complete(cookie);
	(void)dm_udev_wait(cookie);
	if (name && r == 0)
		(void)dm_mknodes(name);
	return r;
}

bool dm_available(void)
{
	int fd = open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return false;
	close(fd);
	return true;
}

static int dm_name(const char *id, char *buf, size_t size)
{
	if (!id_is_valid(id))
		return -EINVAL;
	snprintf(buf, size, "%s%s", STORAGE_DM_PREFIX, id);
	return 0;
}

int dm_disk_device(const char *id, char **ret_device)
{
	char name[80];
	int r = dm_name(id, name, sizeof(name));
	if (r < 0)
		return r;
	if (asprintf(ret_device, "/dev/mapper/%s", name) < 0)
		return -ENOMEM;
	return 0;
}

/* Info of a dm device by name: 1 and *ret when it exists, 0 when not. Caller holds dm_lock. */
static int get_info(const char *name, struct dm_info *ret)
{
	_cleanup_(dm_taskp) struct dm_task *t = task_new(DM_DEVICE_INFO, name);
	int r;

	if (!t)
		return -ENOMEM;
	r = task_run(t, name, false);
	if (r < 0)
		return r;
	if (!dm_task_get_info(t, ret))
		return -EIO;
	return ret->exists ? 1 : 0;
}

int storage_dm_snapshot_table(uint64_t base_sectors, dev_t base, dev_t cow, unsigned chunk,
			      char **ret)
{
	if (base_sectors == 0 || chunk == 0 || (chunk & (chunk - 1)))
		return -EINVAL;
	if (asprintf(ret, "0 %llu snapshot %u:%u %u:%u P %u", (unsigned long long)base_sectors,
		     major(base), minor(base), major(cow), minor(cow), chunk) < 0)
		return -ENOMEM;
	return 0;
}

static int create_device(const char *name, const char *id, uint64_t sectors, dev_t base, dev_t cow)
{
	_cleanup_(dm_taskp) struct dm_task *t = task_new(DM_DEVICE_CREATE, name);
	_cleanup_free_ char *table = NULL;
	char uuid[80];
	int r;

	if (!t)
		return -ENOMEM;
	r = storage_dm_snapshot_table(sectors, base, cow, STORAGE_CHUNK_SECTORS, &table);
	if (r < 0)
		return r;
	snprintf(uuid, sizeof(uuid), "%s%s", STORAGE_UUID_PREFIX, id);
	/* The table string minus "0 <len> snapshot ": dm_task_add_target takes the parts. */
	const char *params = strstr(table, "snapshot ") + strlen("snapshot ");
	if (!dm_task_set_uuid(t, uuid) || !dm_task_add_target(t, 0, sectors, "snapshot", params))
		return -ENOMEM;
	log_debug("creating %s: %s", name, table);
	return task_run(t, name, true);
}

/* Who keeps a dm device busy, for the error message: mounts first (they hold no fd), then
 * processes with it open. Best effort. */
static void describe_holders(const char *name, const struct dm_info *info, char *buf, size_t size)
{
	char dmdev[32], line[1024];
	size_t len = 0;
	_cleanup_fclose_ FILE *f = NULL;
	_cleanup_(closedirp) DIR *proc = NULL;
	struct dirent *de;
	unsigned found = 0;

	snprintf(dmdev, sizeof(dmdev), "%u:%u", info->major, info->minor);
	buf[0] = 0;
	f = fopen("/proc/self/mountinfo", "re");
	while (f && fgets(line, sizeof(line), f) && len < size) {
		char mdev[32], mpoint[512];
		if (sscanf(line, "%*s %*s %31s %*s %511s", mdev, mpoint) == 2 &&
		    strcmp(mdev, dmdev) == 0)
			len += (size_t)snprintf(buf + len, size - len, "%smounted on %s",
						len ? ", " : "", mpoint);
	}
	proc = opendir("/proc");
	while (proc && (de = readdir(proc)) && found < 3 && len < size) {
		char fddir[300];
		_cleanup_(closedirp) DIR *fds = NULL;
		struct dirent *fe;

		if (!isdigit((unsigned char)de->d_name[0]))
			continue;
		snprintf(fddir, sizeof(fddir), "/proc/%s/fd", de->d_name);
		fds = opendir(fddir);
		while (fds && (fe = readdir(fds))) {
			char link[PATH_MAX], target[PATH_MAX];
			struct stat st;
			snprintf(link, sizeof(link), "%s/%s", fddir, fe->d_name);
			if (stat(link, &st) < 0 || !S_ISBLK(st.st_mode) ||
			    major(st.st_rdev) != info->major || minor(st.st_rdev) != info->minor)
				continue;
			char comm[64] = "?";
			snprintf(target, sizeof(target), "/proc/%s/comm", de->d_name);
			_cleanup_fclose_ FILE *cf = fopen(target, "re");
			if (cf && fgets(comm, sizeof(comm), cf))
				comm[strcspn(comm, "\n")] = 0;
			len += (size_t)snprintf(buf + len, size - len, "%sopen in pid %s (%s)",
						len ? ", " : "", de->d_name, comm);
			found++;
			break;
		}
	}
	if (!buf[0])
		snprintf(buf, size, "opened %d times", info->open_count);
	(void)name;
}

/* Removes a dm device, retrying while it is busy (udev probes, a VMM that is still exiting).
 * 0 also when it does not exist. Caller holds dm_lock. */
static int remove_device(const char *name, char **ret_error)
{
	unsigned delay_ms = 10;
	struct dm_info info;
	int r;

	for (int attempt = 0;; attempt++) {
		_cleanup_(dm_taskp) struct dm_task *t = NULL;

		r = get_info(name, &info);
		if (r < 0)
			return error_set(ret_error, r, "cannot query %s: %s", name,
					 dm_last_error[0] ? dm_last_error : strerror(-r));
		if (r == 0)
			return 0;
		t = task_new(DM_DEVICE_REMOVE, name);
		if (!t)
			return -ENOMEM;
		r = task_run(t, name, true);
		if (r == 0 || r == -ENXIO || r == -ENODEV)
			return 0;
		if (r != -EBUSY || attempt + 1 >= REMOVE_ATTEMPTS)
			break;
		log_debug("%s busy, retrying in %u ms", name, delay_ms);
		struct timespec ts = {.tv_sec = delay_ms / 1000,
				      .tv_nsec = (long)(delay_ms % 1000) * 1000000L};
		nanosleep(&ts, NULL);
		delay_ms *= 2;
	}
	if (r == -EBUSY) {
		char who[512];
		if (get_info(name, &info) > 0)
			describe_holders(name, &info, who, sizeof(who));
		else
			snprintf(who, sizeof(who), "unknown holder");
		return error_set(ret_error, -EBUSY,
				 "cannot remove %s: still in use after %d attempts over about "
				 "%u ms (%s)",
				 name, REMOVE_ATTEMPTS, (10u << REMOVE_ATTEMPTS) - 10, who);
	}
	return error_set(ret_error, r, "cannot remove %s: %s", name,
			 dm_last_error[0] ? dm_last_error : strerror(-r));
}

int dm_remove_name(const char *name, char **ret_error)
{
	pthread_mutex_lock(&dm_lock);
	int r = remove_device(name, ret_error);
	pthread_mutex_unlock(&dm_lock);
	return r;
}

int dm_disk_create(Storage *s, const StorageDiskSpec *spec, bool restore, char **ret_device,
		   char **ret_error)
{
	_cleanup_free_ char *base_device = NULL, *cow_device = NULL, *device = NULL;
	_cleanup_close_ int cow_fd = -EBADF, cow_loop = -EBADF;
	bool created_file = false, have_base = false;
	uint64_t sectors = 0;
	struct stat cst;
	dev_t base_dev = 0;
	char name[80];
	int r;

	if (dm_name(spec->id, name, sizeof(name)) < 0)
		return error_set(ret_error, -EINVAL, "invalid sandbox id \"%s\"", spec->id ?: "");
	if (!spec->base_image || !spec->cow_path)
		return error_set(ret_error, -EINVAL, "base image and CoW path are required");

	pthread_mutex_lock(&dm_lock);
	struct dm_info info;
	r = get_info(name, &info);
	pthread_mutex_unlock(&dm_lock);
	if (r > 0)
		return error_set(ret_error, -EEXIST, "%s exists already", name);

	if (restore) {
		cow_fd = open(spec->cow_path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
		if (cow_fd < 0)
			return error_set(ret_error, -errno, "cannot open CoW file %s: %m",
					 spec->cow_path);
		if (fstat(cow_fd, &cst) < 0 || cst.st_size < (off_t)512 * STORAGE_CHUNK_SECTORS)
			return error_set(ret_error, -EINVAL,
					 "CoW file %s is too small to hold a snapshot",
					 spec->cow_path);
	} else {
		/* The exception store needs its header chunk plus room for data. */
		if (spec->cow_size < (uint64_t)2 * 512 * STORAGE_CHUNK_SECTORS ||
		    spec->cow_size % 512)
			return error_set(ret_error, -EINVAL,
					 "CoW size %llu is not a multiple of 512 of at least %u",
					 (unsigned long long)spec->cow_size,
					 2 * 512 * STORAGE_CHUNK_SECTORS);
		cow_fd = open(spec->cow_path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW,
			      0600);
		if (cow_fd < 0)
			return error_set(ret_error, -errno, "cannot create CoW file %s: %m",
					 spec->cow_path);
		created_file = true;
		/* Sparse: blocks are allocated as the guest writes. */
		if (ftruncate(cow_fd, (off_t)spec->cow_size) < 0) {
			r = error_set(ret_error, -errno, "cannot size CoW file %s: %m",
				      spec->cow_path);
			goto fail;
		}
	}

	r = registry_acquire(&s->registry, spec->base_image, &base_device, &base_dev, &sectors,
			     ret_error);
	if (r < 0)
		goto fail;
	have_base = true;

	/* Direct I/O on the CoW loop: the snapshot's writes need not be cached twice. */
	cow_loop = storage_loop_attach(spec->cow_path, STORAGE_LOOP_DIRECT_IO, &cow_device);
	if (cow_loop < 0) {
		r = error_set(ret_error, cow_loop, "cannot attach CoW file %s: %s", spec->cow_path,
			      strerror(-cow_loop));
		goto fail;
	}
	if (fstat(cow_loop, &cst) < 0) {
		r = error_set(ret_error, -errno, "cannot stat %s: %m", cow_device);
		goto fail;
	}

	pthread_mutex_lock(&dm_lock);
	r = create_device(name, spec->id, sectors, base_dev, cst.st_rdev);
	if (r < 0) {
		char msg[256];
		snprintf(msg, sizeof(msg), "%s", dm_last_error[0] ? dm_last_error : strerror(-r));
		/* A failed create can leave a device without a table behind. */
		(void)remove_device(name, NULL);
		pthread_mutex_unlock(&dm_lock);
		r = error_set(ret_error, r, "cannot create %s over %s and %s: %s", name,
			      base_device, cow_device, msg);
		goto fail;
	}
	pthread_mutex_unlock(&dm_lock);

	r = dm_disk_device(spec->id, &device);
	if (r < 0) {
		(void)dm_remove_name(name, NULL);
		goto fail;
	}
	/* dm holds the CoW loop now; closing ours leaves it attached until dm lets go. */
	log_debug("%s %s over %s (base) and %s (CoW)", restore ? "restored" : "created", name,
		  base_device, cow_device);
	*ret_device = TAKE_PTR(device);
	return 0;

fail:
	/* cow_loop closes on return: the auto-clearing device then detaches itself. */
	if (have_base)
		(void)registry_release(&s->registry, spec->base_image);
	if (created_file)
		(void)unlink(spec->cow_path);
	return r;
}

int dm_disk_remove(Storage *s, const StorageDiskSpec *spec, char **ret_error)
{
	char name[80];
	struct dm_info info;
	int r, exists;

	if (dm_name(spec->id, name, sizeof(name)) < 0)
		return error_set(ret_error, -EINVAL, "invalid sandbox id \"%s\"", spec->id ?: "");
	pthread_mutex_lock(&dm_lock);
	exists = get_info(name, &info);
	r = exists > 0 ? remove_device(name, ret_error) : exists;
	pthread_mutex_unlock(&dm_lock);
	if (r < 0)
		return r;
	/* The CoW loop auto-clears now that dm let go of it; the base loop goes with its last
	 * reference. Only a disk that existed held a reference. */
	if (exists > 0 && spec->base_image)
		(void)registry_release(&s->registry, spec->base_image);
	return 0;
}

int storage_dm_snapshot_status_parse(const char *params, uint64_t *ret_used, uint64_t *ret_total,
				     uint64_t *ret_metadata, bool *ret_invalid, bool *ret_overflow)
{
	unsigned long long used, total, meta;
	int n = 0;

	*ret_used = *ret_total = *ret_metadata = 0;
	*ret_invalid = *ret_overflow = false;
	if (!params)
		return -EINVAL;
	if (strcmp(params, "Invalid") == 0) {
		*ret_invalid = true;
		return 0;
	}
	if (strcmp(params, "Overflow") == 0) {
		*ret_overflow = true;
		return 0;
	}
	if (strcmp(params, "Merge failed") == 0) {
		*ret_invalid = true;
		return 0;
	}
	if (sscanf(params, "%llu/%llu %llu%n", &used, &total, &meta, &n) != 3 || params[n] != 0 ||
	    used > total)
		return -EBADMSG;
	*ret_used = used;
	*ret_total = total;
	*ret_metadata = meta;
	return 0;
}

int dm_disk_status(const StorageDiskSpec *spec, StorageDiskStatus *ret, char **ret_error)
{
	_cleanup_(dm_taskp) struct dm_task *t = NULL;
	uint64_t start, length, used, total, meta;
	char *type = NULL, *params = NULL;
	bool invalid, overflow;
	char name[80];
	struct dm_info info;
	int r;

	if (dm_name(spec->id, name, sizeof(name)) < 0)
		return error_set(ret_error, -EINVAL, "invalid sandbox id \"%s\"", spec->id ?: "");
	pthread_mutex_lock(&dm_lock);
	t = task_new(DM_DEVICE_STATUS, name);
	r = t ? task_run(t, name, false) : -ENOMEM;
	if (r >= 0 && (!dm_task_get_info(t, &info) || !info.exists))
		r = -ENOENT;
	if (r >= 0)
		dm_get_next_target(t, NULL, &start, &length, &type, &params);
	pthread_mutex_unlock(&dm_lock);
	if (r == -ENOENT || r == -ENXIO)
		return error_set(ret_error, -ENOENT, "%s does not exist", name);
	if (r < 0)
		return error_set(ret_error, r, "cannot read the status of %s: %s", name,
				 strerror(-r));
	if (!type || strcmp(type, "snapshot") != 0)
		return error_set(ret_error, -EBADMSG, "%s is not a snapshot (target %s)", name,
				 type ?: "none");
	r = storage_dm_snapshot_status_parse(params, &used, &total, &meta, &invalid, &overflow);
	if (r < 0)
		return error_set(ret_error, r, "cannot parse the status of %s: \"%s\"", name,
				 params ?: "");
	*ret = (StorageDiskStatus){
		.used_bytes = used * 512,
		.capacity_bytes = total * 512,
		.size_bytes = length * 512,
		.invalid = invalid,
		.overflow = overflow || invalid,
	};
	if (invalid || overflow) {
		/* The kernel no longer reports sizes: the CoW file's size is the capacity. */
		struct stat st;
		if (spec->cow_path && stat(spec->cow_path, &st) == 0)
			ret->capacity_bytes = ret->used_bytes = (uint64_t)st.st_size;
	}
	return 0;
}

int dm_list_ember(char ***ret_names, size_t *ret_n)
{
	_cleanup_(dm_taskp) struct dm_task *t = NULL;
	struct dm_names *names;
	char **out = NULL;
	size_t n = 0;
	int r;

	pthread_mutex_lock(&dm_lock);
	t = task_new(DM_DEVICE_LIST, NULL);
	r = t ? task_run(t, NULL, false) : -ENOMEM;
	if (r < 0) {
		pthread_mutex_unlock(&dm_lock);
		return r;
	}
	names = dm_task_get_names(t);
	if (names && names->dev) {
		for (struct dm_names *nm = names;;
		     nm = (struct dm_names *)((char *)nm + nm->next)) {
			if (strncmp(nm->name, STORAGE_DM_PREFIX, strlen(STORAGE_DM_PREFIX)) == 0) {
				char **o = reallocarray(out, n + 2, sizeof(char *));
				if (!o) {
					r = -ENOMEM;
					break;
				}
				out = o;
				out[n] = strdup(nm->name);
				if (!out[n]) {
					r = -ENOMEM;
					break;
				}
				out[++n] = NULL;
			}
			if (!nm->next)
				break;
		}
	}
	pthread_mutex_unlock(&dm_lock);
	if (r < 0) {
		for (size_t i = 0; i < n; i++)
			free(out[i]);
		free(out);
		return r;
	}
	*ret_names = out;
	*ret_n = n;
	return 0;
}
