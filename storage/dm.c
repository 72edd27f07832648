/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The dm backend: sandbox disks as device-mapper snapshots (libdevmapper).
 *
 * udev: every create/remove carries a cookie and waits for udev to finish with the device, as
 * LVM does, so /dev/mapper/ember-<id> exists (and is gone) when we return. Where udev does not
 * run, libdevmapper makes the nodes itself when we ask it to. Where udev looks alive but does
 * not process events (some containers), the wait is bounded: after udev_wait_ms we release the
 * cookie and make the node ourselves rather than hang.
 *
 * Locking: libdevmapper keeps process-wide state (control fd, the list of pending node
 * changes, its log function), so every call into it is serialized by dm_lock, which is held
 * for one call at a time and never across a wait: the udev wait polls with the lock released,
 * and a busy device is retried with it released. What must not interleave is one disk's own
 * create, restore and remove; the per-disk lock (disk_lock(), storage.c) serializes those, so a
 * disk stuck in removal holds up only itself.
 *
 * Ownership: a create makes the device in three steps (create, load the table, resume) rather
 * than libdevmapper's one, because only the first step tells whether the name was free. A
 * device we did not make (someone else made ember-<id> between our check and our create) is
 * never removed by our unwinding. Between the first step and the second the device has no
 * table, so nothing in the kernel says which CoW file it is for; its uuid does
 * (`EMBER-<id>.<owner>`, see dm_owner_token()), so that reclaim can tell a crashed create of
 * its own from one another agent on the host is running right now.
 */
#include <ctype.h>
#include <dirent.h>
#include <fcntl.h>
#include <libdevmapper.h>
#include <linux/dm-ioctl.h>
#include <openssl/evp.h>
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

/* A busy device (udev probing the new node, a VMM still exiting) is tried REMOVE_ATTEMPTS
 * times, REMOVE_INTERVAL_MS apart: 25 waits of 100 ms, so about 2.5 s plus the time the
 * attempts themselves take. The error message reports the time actually spent. */
#define REMOVE_ATTEMPTS    26
#define REMOVE_INTERVAL_MS 100U

static _Atomic unsigned udev_wait_ms = 10000;

void storage_set_udev_timeout(unsigned ms)
{
	udev_wait_ms = ms;
}

void (*storage_test_before_dm_create)(const char *name) = NULL;

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

static const char *last_error(int r)
{
	return dm_last_error[0] ? dm_last_error : strerror(-r);
}

static void sleep_ms(unsigned ms)
{
	struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
	nanosleep(&ts, NULL);
}

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* A task is the caller's own memory once made: filling it in, reading its results and
 * destroying it touch no process-wide state, so only making and running it take dm_lock. */
static void dm_taskp(struct dm_task **t)
{
	if (*t)
		dm_task_destroy(*t);
}

static struct dm_task *task_new(int type, const char *name)
{
	struct dm_task *t;

	pthread_once(&dm_log_once, dm_log_setup);
	_cleanup_(mutex_unlockp) pthread_mutex_t *locked = mutex_take(&dm_lock);
	t = dm_task_create(type);
	if (!t)
		return NULL;
	if (name && !dm_task_set_name(t, name)) {
		dm_task_destroy(t);
		return NULL;
	}
	return t;
}

/* dm_task_run, then the udev wait when with_cookie. Returns -errno of the ioctl. dm_lock is
 * taken here for each call into libdevmapper; the caller must not hold it. */
static int task_run(struct dm_task *t, const char *name, bool with_cookie)
{
	uint32_t cookie = 0;
	int r = 0, ready = 0;

	dm_last_error[0] = 0;
	{
		_cleanup_(mutex_unlockp) pthread_mutex_t *locked = mutex_take(&dm_lock);
		if (with_cookie && !dm_task_set_cookie(t, &cookie, 0))
			return -EIO;
		if (!dm_task_run(t)) {
			int e = dm_task_get_errno(t);
			r = e > 0 ? -e : -EIO;
		}
		if (!with_cookie)
			return r;
		if (!cookie) {
			/* No udev to synchronize with: libdevmapper has only noted the node
			 * changes; make them now, not at some later call or at exit. */
			dm_task_update_nodes();
			return r;
		}
	}

	/* Polled with dm_lock released: a slow udev holds up this operation only. */
	unsigned timeout = udev_wait_ms;
	for (unsigned waited = 0; waited < timeout; waited += 10) {
		int ok;
		{
			_cleanup_(mutex_unlockp) pthread_mutex_t *locked = mutex_take(&dm_lock);
			ok = dm_udev_wait_immediate(cookie, &ready);
		}
		if (!ok)
			break;
		if (ready)
			return r; /* the cookie is gone with the last immediate wait */
		sleep_ms(10);
	}
	/* udev did not answer: release the cookie ourselves and make sure the node is right
	 * (there after a create, gone after a remove). */
	log_debug("udev did not process %s within %u ms; handling its node ourselves", name ?: "?",
		  timeout);
	_cleanup_(mutex_unlockp) pthread_mutex_t *locked = mutex_take(&dm_lock);
	(void)dm_udev_complete(cookie);
	(void)dm_udev_wait(cookie);
	if (name && r == 0) {
		(void)dm_mknodes(name);
		dm_task_update_nodes();
	}
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

int dm_owner_token(const char *path, char ret[DM_OWNER_LEN + 1])
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned n = 0;

	if (!EVP_Digest(path, strlen(path), md, &n, EVP_sha256(), NULL) || n * 2 < DM_OWNER_LEN)
		return -EIO;
	for (unsigned i = 0; i < DM_OWNER_LEN / 2; i++)
		snprintf(ret + (size_t)2 * i, 3, "%02x", md[i]);
	return 0;
}

/* The uuid of `id`'s device as a create makes it. The owner is a hash, not the path: a path
 * may be longer than the 128 bytes a uuid holds. */
static void make_uuid(const char *id, const char *owner, char buf[DM_UUID_LEN])
{
	snprintf(buf, DM_UUID_LEN, "%s%s.%s", STORAGE_UUID_PREFIX, id, owner);
}

/* Parses the uuid of ember-<id>: 1 and the owner token in *ret_owner for `EMBER-<id>.<owner>`,
 * 0 (and "") for `EMBER-<id>` as creates made it before the owner was added, -EINVAL for
 * anything else (not a device of ours). ids hold no '.', so the split is unambiguous. */
static int parse_uuid(const char *uuid, const char *id, char ret_owner[DM_OWNER_LEN + 1])
{
	size_t plen = strlen(STORAGE_UUID_PREFIX), ilen = strlen(id);

	ret_owner[0] = 0;
	if (!uuid || strncmp(uuid, STORAGE_UUID_PREFIX, plen) != 0 ||
	    strncmp(uuid + plen, id, ilen) != 0)
		return -EINVAL;
	const char *rest = uuid + plen + ilen;
	if (rest[0] == 0)
		return 0;
	if (rest[0] != '.' || strlen(rest + 1) != DM_OWNER_LEN ||
	    strspn(rest + 1, "0123456789abcdef") != DM_OWNER_LEN)
		return -EINVAL;
	memcpy(ret_owner, rest + 1, DM_OWNER_LEN + 1);
	return 1;
}

/* Info of a dm device by name: 1 and *ret when it exists, 0 when not. */
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

static int remove_device(const char *name, char **ret_error);

/* The device a create made, removed again by the create's unwinding unless disarmed. */
typedef struct DmMade {
	const char *name;
	bool made;
} DmMade;

static void dm_madep(DmMade *m)
{
	if (m->made)
		(void)remove_device(m->name, NULL);
}

/* A base reference a create took, given back by its unwinding unless handed to the disk. */
typedef struct BaseHold {
	Registry *registry;
	BaseKey key;
	bool held;
} BaseHold;

static void base_holdp(BaseHold *h)
{
	if (h->held)
		registry_release_key(h->registry, h->key);
}

static void unlink_and_freep(char **path)
{
	if (*path) {
		(void)unlink(*path);
		free(*path);
	}
}

/* Makes `name` with the snapshot table: create, load, resume. -EEXIST when the kernel refuses
 * the create because the name or our uuid is in use (it answers EBUSY): that device is someone
 * else's and m->made stays false. Once the create succeeded m->made is set, so a later failure
 * leaves the unwinding to remove the device this call made. */
static int create_device(const char *name, const char *id, const char *owner, uint64_t sectors,
			 dev_t base, dev_t cow, DmMade *m)
{
	_cleanup_(dm_taskp) struct dm_task *create = task_new(DM_DEVICE_CREATE, name);
	_cleanup_(dm_taskp) struct dm_task *load = task_new(DM_DEVICE_RELOAD, name);
	_cleanup_(dm_taskp) struct dm_task *resume = task_new(DM_DEVICE_RESUME, name);
	_cleanup_free_ char *table = NULL;
	char uuid[DM_UUID_LEN];
	int r;

	if (!create || !load || !resume)
		return -ENOMEM;
	r = storage_dm_snapshot_table(sectors, base, cow, STORAGE_CHUNK_SECTORS, &table);
	if (r < 0)
		return r;
	make_uuid(id, owner, uuid);
	/* The table string minus "0 <len> snapshot ": dm_task_add_target takes the parts. */
	const char *params = strstr(table, "snapshot ") + strlen("snapshot ");
	if (!dm_task_set_uuid(create, uuid) ||
	    !dm_task_add_target(load, 0, sectors, "snapshot", params))
		return -ENOMEM;
	log_debug("creating %s: %s", name, table);
	r = task_run(create, name, false);
	if (r == -EBUSY || r == -EEXIST)
		return -EEXIST;
	if (r < 0)
		return r;
	m->made = true;
	r = task_run(load, name, false);
	if (r >= 0)
		/* The node appears with the resume: that is where udev gets its event. */
		r = task_run(resume, name, true);
	/* -EEXIST means "someone else's device" to the caller; the device here is ours. */
	return r == -EEXIST ? -EIO : r;
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

/* Removes a dm device, retrying while it is busy. 0 also when it does not exist. */
static int remove_device(const char *name, char **ret_error)
{
	uint64_t start = now_ms();
	struct dm_info info;
	int r, attempt;

	for (attempt = 1;; attempt++) {
		_cleanup_(dm_taskp) struct dm_task *t = NULL;

		r = get_info(name, &info);
		if (r < 0)
			return error_set(ret_error, r, "cannot query %s: %s", name, last_error(r));
		if (r == 0)
			return 0;
		t = task_new(DM_DEVICE_REMOVE, name);
		if (!t)
			return -ENOMEM;
		r = task_run(t, name, true);
		if (r == 0 || r == -ENXIO || r == -ENODEV)
			return 0;
		if (r != -EBUSY || attempt >= REMOVE_ATTEMPTS)
			break;
		log_debug("%s busy (attempt %d of %d), retrying in %u ms", name, attempt,
			  REMOVE_ATTEMPTS, REMOVE_INTERVAL_MS);
		sleep_ms(REMOVE_INTERVAL_MS);
	}
	if (r == -EBUSY) {
		unsigned long long spent = now_ms() - start;
		char who[512];
		if (get_info(name, &info) > 0)
			describe_holders(name, &info, who, sizeof(who));
		else
			snprintf(who, sizeof(who), "unknown holder");
		return error_set(ret_error, -EBUSY,
				 "cannot remove %s: still in use after %d attempts %u ms apart, "
				 "%llu ms in all (%s)",
				 name, attempt, REMOVE_INTERVAL_MS, spent, who);
	}
	return error_set(ret_error, r, "cannot remove %s: %s", name, last_error(r));
}

/* Removes the disk's device and gives back the base reference this process holds for it: only
 * that one, so a disk this process never created or restored takes nobody else's. */
static int remove_disk(Storage *s, const char *id, const char *name, char **ret_error)
{
	_cleanup_(disk_unlockp) DiskEntry *d = NULL;
	int r;

	r = disk_lock(s, id, &d);
	if (r < 0)
		return r;
	r = remove_device(name, ret_error);
	if (r < 0)
		return r;
	if (d->has_base) {
		registry_release_key(&s->registry, d->base);
		disk_set_base(d, false, (BaseKey){});
	}
	return 0;
}

int dm_remove_name(Storage *s, const char *name, char **ret_error)
{
	size_t plen = strlen(STORAGE_DM_PREFIX);

	/* An ember-* name that is no id of ours is nobody's disk here: just remove it. */
	if (strncmp(name, STORAGE_DM_PREFIX, plen) != 0 || !id_is_valid(name + plen))
		return remove_device(name, ret_error);
	return remove_disk(s, name + plen, name, ret_error);
}

/* Whether the existing device `name` is the disk `spec` describes: our uuid, and a live
 * snapshot table with our chunk size over a read-only loop device of spec->base_image and a
 * loop device of spec->cow_path. `cow_size` > 0 (a create's retry): the CoW file has that size
 * too. 1 when it is, -EEXIST (with a message saying what differs) when it is not. */
static int device_matches(const char *name, const StorageDiskSpec *spec, uint64_t cow_size,
			  char **ret_error)
{
	_cleanup_(dm_taskp) struct dm_task *t = task_new(DM_DEVICE_TABLE, name);
	char *type = NULL, *params = NULL, owner[DM_OWNER_LEN + 1];
	unsigned bmaj, bmin, cmaj, cmin, chunk;
	uint64_t start, length;
	struct stat bst, cst;
	struct dm_info info;
	bool ro = false;
	int r, n = 0;

	if (!t)
		return -ENOMEM;
	r = task_run(t, name, false);
	if (r >= 0 && (!dm_task_get_info(t, &info) || !info.exists))
		r = -ENOENT;
	if (r < 0)
		return error_set(ret_error, r, "cannot read the table of %s: %s", name,
				 last_error(r));
	/* Any owner will do: the table below tells whether it is this disk (the same CoW inode),
	 * and a disk made before owners were added (no owner) is taken over too. */
	const char *have = dm_task_get_uuid(t);
	if (parse_uuid(have, spec->id, owner) < 0)
		return error_set(ret_error, -EEXIST,
				 "%s exists already with uuid \"%s\", not %s%s[.<owner>]", name,
				 have ?: "", STORAGE_UUID_PREFIX, spec->id);
	if (!info.live_table)
		return error_set(
			ret_error, -EEXIST,
			"%s exists already without a table (a create that did not finish); "
			"remove the disk, then restore it",
			name);
	if (dm_get_next_target(t, NULL, &start, &length, &type, &params) || start != 0 || !type ||
	    strcmp(type, "snapshot") != 0 || !params ||
	    sscanf(params, "%u:%u %u:%u P %u%n", &bmaj, &bmin, &cmaj, &cmin, &chunk, &n) != 5 ||
	    params[n + strspn(params + n, " ")] != 0 || chunk != STORAGE_CHUNK_SECTORS)
		return error_set(ret_error, -EEXIST, "%s exists already with another table (%s %s)",
				 name, type ?: "none", params ?: "");
	if (stat(spec->base_image, &bst) < 0)
		return error_set(ret_error, -errno, "base image %s: %m", spec->base_image);
	if (stat(spec->cow_path, &cst) < 0) {
		if (errno != ENOENT)
			return error_set(ret_error, -errno, "CoW file %s: %m", spec->cow_path);
		return error_set(ret_error, -EEXIST, "%s exists already, over another CoW file",
				 name);
	}
	r = loop_dev_backed_by(makedev(bmaj, bmin), &bst, &ro);
	if (r < 0)
		return error_set(ret_error, r, "cannot inspect %u:%u under %s: %s", bmaj, bmin,
				 name, strerror(-r));
	if (r == 0 || !ro || length * 512 != (uint64_t)bst.st_size)
		return error_set(
			ret_error, -EEXIST,
			"%s exists already over %u:%u, which is not a read-only loop device "
			"of %s",
			name, bmaj, bmin, spec->base_image);
	r = loop_dev_backed_by(makedev(cmaj, cmin), &cst, NULL);
	if (r < 0)
		return error_set(ret_error, r, "cannot inspect %u:%u under %s: %s", cmaj, cmin,
				 name, strerror(-r));
	if (r == 0)
		return error_set(ret_error, -EEXIST,
				 "%s exists already with the CoW %u:%u, which is not a loop device "
				 "of %s",
				 name, cmaj, cmin, spec->cow_path);
	if (cow_size > 0 && (uint64_t)cst.st_size != cow_size)
		return error_set(ret_error, -EEXIST,
				 "%s exists already with a CoW file of %lld bytes, not %llu", name,
				 (long long)cst.st_size, (unsigned long long)cow_size);
	return 1;
}

/* Reads the table of `name` into t: the live one, or the inactive one when `inactive`. */
static int read_table(const char *name, bool inactive, struct dm_task **ret)
{
	_cleanup_(dm_taskp) struct dm_task *t = task_new(DM_DEVICE_TABLE, name);
	struct dm_info info;
	int r;

	if (!t)
		return -ENOMEM;
	if (inactive && !dm_task_query_inactive_table(t))
		return -ENOMEM;
	r = task_run(t, name, false);
	if (r < 0)
		return r;
	if (!dm_task_get_info(t, &info) || !info.exists)
		return -ENXIO;
	*ret = TAKE_PTR(t);
	return 0;
}

int dm_device_inspect(const char *name, DmDeviceInfo *ret)
{
	_cleanup_(dm_taskp) struct dm_task *t = NULL;
	size_t plen = strlen(STORAGE_DM_PREFIX);
	char *type = NULL, *params = NULL;
	unsigned bmaj, bmin, cmaj, cmin;
	uint64_t start, length;
	struct dm_info info;
	int r;

	*ret = (DmDeviceInfo){};
	r = read_table(name, false, &t);
	if (r < 0)
		return r;
	if (!dm_task_get_info(t, &info))
		return -EIO;
	if (strncmp(name, STORAGE_DM_PREFIX, plen) == 0)
		(void)parse_uuid(dm_task_get_uuid(t), name + plen, ret->owner);
	/* Between a create's load and its resume the table is there but inactive; it names the
	 * CoW device as well as a live one does. */
	if (!info.live_table && info.inactive_table) {
		dm_task_destroy(TAKE_PTR(t));
		r = read_table(name, true, &t);
		if (r < 0)
			return r;
	} else if (!info.live_table)
		return 0;
	ret->has_table = true;
	if (dm_get_next_target(t, NULL, &start, &length, &type, &params) == NULL && type &&
	    strcmp(type, "snapshot") == 0 && params &&
	    sscanf(params, "%u:%u %u:%u", &bmaj, &bmin, &cmaj, &cmin) == 4) {
		ret->snapshot = true;
		ret->cow = makedev(cmaj, cmin);
	}
	return 0;
}

/* Takes over an existing ember-<id> that is this disk (after an agent restart, or a create's
 * retry): nothing is made again, and the disk's base reference is counted, unless this
 * process holds one for it already. */
static int adopt_device(Storage *s, DiskEntry *d, const char *name, const StorageDiskSpec *spec,
			uint64_t cow_size, char **ret_device, char **ret_error)
{
	_cleanup_free_ char *device = NULL, *base_device = NULL;
	BaseKey key;
	int r;

	r = device_matches(name, spec, cow_size, ret_error);
	if (r < 0)
		return r;
	r = dm_disk_device(spec->id, &device);
	if (r < 0)
		return r;
	if (access(device, F_OK) < 0) {
		/* A /dev made anew since (another mount namespace, a container): the node again. */
		_cleanup_(mutex_unlockp) pthread_mutex_t *locked = mutex_take(&dm_lock);
		(void)dm_mknodes(name);
		dm_task_update_nodes();
	}
	if (!d->has_base) {
		r = registry_acquire(&s->registry, spec->base_image, &base_device, NULL, NULL, &key,
				     ret_error);
		if (r < 0)
			return r;
		disk_set_base(d, true, key);
	}
	log_debug("adopted %s", name);
	*ret_device = TAKE_PTR(device);
	return 0;
}

/* Makes the disk's device, which does not exist. -EEXIST when the name was taken meanwhile
 * (someone made ember-<id> since we looked): for a create with a message, for a restore without
 * one, as the caller looks at what took it. */
static int make_device(Storage *s, DiskEntry *d, const char *name, const StorageDiskSpec *spec,
		       bool restore, char **ret_device, char **ret_error)
{
	_cleanup_(unlink_and_freep) char *new_cow = NULL;
	_cleanup_(base_holdp) BaseHold hold = {.registry = &s->registry};
	_cleanup_free_ char *base_device = NULL, *cow_device = NULL, *device = NULL;
	_cleanup_free_ char *cow_real = NULL;
	_cleanup_close_ int cow_fd = -EBADF, cow_loop = -EBADF;
	_cleanup_(dm_madep) DmMade made = {.name = name};
	char owner[DM_OWNER_LEN + 1];
	uint64_t sectors = 0;
	struct stat cst;
	dev_t base_dev = 0;
	int r;

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
		new_cow = strdup(spec->cow_path);
		if (!new_cow) {
			(void)unlink(spec->cow_path);
			return -ENOMEM;
		}
		/* Sparse: blocks are allocated as the guest writes. */
		if (ftruncate(cow_fd, (off_t)spec->cow_size) < 0)
			return error_set(ret_error, -errno, "cannot size CoW file %s: %m",
					 spec->cow_path);
	}

	/* The canonical path, as the CoW loop's backing_file shows it and as reclaim finds it
	 * under the state dir. */
	cow_real = realpath(spec->cow_path, NULL);
	if (!cow_real)
		return error_set(ret_error, -errno, "cannot resolve CoW file %s: %m",
				 spec->cow_path);
	r = dm_owner_token(cow_real, owner);
	if (r < 0)
		return error_set(ret_error, r, "cannot hash %s: %s", cow_real, strerror(-r));

	/* Taken even when the disk holds a reference already (its device went away behind our
	 * back): the loop device's numbers come with it, and the unwinding gives the extra one
	 * back. */
	r = registry_acquire(&s->registry, spec->base_image, &base_device, &base_dev, &sectors,
			     &hold.key, ret_error);
	if (r < 0)
		return r;
	hold.held = true;

	/* Direct I/O on the CoW loop: the snapshot's writes need not be cached twice. */
	cow_loop = storage_loop_attach(spec->cow_path, STORAGE_LOOP_DIRECT_IO, &cow_device);
	if (cow_loop < 0)
		return error_set(ret_error, cow_loop, "cannot attach CoW file %s: %s",
				 spec->cow_path, strerror(-cow_loop));
	if (fstat(cow_loop, &cst) < 0)
		return error_set(ret_error, -errno, "cannot stat %s: %m", cow_device);

	if (storage_test_before_dm_create)
		storage_test_before_dm_create(name);

	r = create_device(name, spec->id, owner, sectors, base_dev, cst.st_rdev, &made);
	if (r == -EEXIST && restore)
		return r;
	if (r == -EEXIST)
		return error_set(ret_error, r,
				 "%s was made by someone else meanwhile; it is left alone", name);
	if (r < 0)
		return error_set(ret_error, r, "cannot create %s over %s and %s: %s", name,
				 base_device, cow_device, last_error(r));
	r = dm_disk_device(spec->id, &device);
	if (r < 0)
		return r;

	/* Done: the device keeps the CoW loop (closing ours leaves it attached until dm lets go),
	 * the disk keeps the CoW file and the base reference. */
	made.made = false;
	free(new_cow);
	new_cow = NULL;
	if (!d->has_base) {
		disk_set_base(d, true, hold.key);
		hold.held = false;
	}
	log_debug("%s %s over %s (base) and %s (CoW)", restore ? "restored" : "created", name,
		  base_device, cow_device);
	*ret_device = TAKE_PTR(device);
	return 0;
}

int dm_disk_create(Storage *s, const StorageDiskSpec *spec, bool restore, char **ret_device,
		   char **ret_error)
{
	_cleanup_(disk_unlockp) DiskEntry *d = NULL;
	struct dm_info info;
	char name[80];
	int r;

	if (dm_name(spec->id, name, sizeof(name)) < 0)
		return error_set(ret_error, -EINVAL, "invalid sandbox id \"%s\"", spec->id ?: "");
	if (!spec->base_image || !spec->cow_path)
		return error_set(ret_error, -EINVAL, "base image and CoW path are required");

	r = disk_lock(s, spec->id, &d);
	if (r < 0)
		return r;
	r = get_info(name, &info);
	if (r < 0)
		return error_set(ret_error, r, "cannot query %s: %s", name, last_error(r));
	if (r > 0)
		/* Made before, by this process or by one before an agent restart: the same disk
		 * is taken over (a create's retry must name the same CoW file and size). */
		return adopt_device(s, d, name, spec, restore ? 0 : spec->cow_size, ret_device,
				    ret_error);
	r = make_device(s, d, name, spec, restore, ret_device, ret_error);
	if (r == -EEXIST && restore)
		/* Another process restored it meanwhile (ours is undone): the same disk is fine. */
		return adopt_device(s, d, name, spec, 0, ret_device, ret_error);
	return r;
}

int dm_disk_remove(Storage *s, const StorageDiskSpec *spec, char **ret_error)
{
	char name[80];

	if (dm_name(spec->id, name, sizeof(name)) < 0)
		return error_set(ret_error, -EINVAL, "invalid sandbox id \"%s\"", spec->id ?: "");
	return remove_disk(s, spec->id, name, ret_error);
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
	t = task_new(DM_DEVICE_STATUS, name);
	r = t ? task_run(t, name, false) : -ENOMEM;
	if (r >= 0 && (!dm_task_get_info(t, &info) || !info.exists))
		r = -ENOENT;
	if (r >= 0)
		dm_get_next_target(t, NULL, &start, &length, &type, &params);
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

	t = task_new(DM_DEVICE_LIST, NULL);
	r = t ? task_run(t, NULL, false) : -ENOMEM;
	if (r < 0)
		return r;
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
