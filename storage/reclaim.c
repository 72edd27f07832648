/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Start-up reclaim: after a crash, remove the devices no known sandbox needs, and only our
 * own. Several agents may share a host, each with its own state dir, and every one names its
 * devices ember-<id>: a name says nothing about whose a device is, what it is over does. The
 * rules are in storage.h, at storage_reclaim().
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "common/log.h"
#include "common/macro.h"
#include "storage-internal.h"

/* How deep the search for a CoW file goes under the state dir: the agent's own layout is
 * three levels (sandboxes/<id>/cow.img); this only bounds a walk into an odd tree. */
#define WALK_MAX_DEPTH 16

typedef struct Reclaim {
	Storage *storage;
	const char *root; /* the state dir, canonical: backing_file shows canonical paths */
	const char *const *keep;
	size_t n_keep;
	BaseKey *kept_files; /* file backend: copies of kept disks */
	size_t n_kept_files;
	StorageReclaimResult res;
	char *first_error;
} Reclaim;

/* Counts a failure; the first one's message (taken over) is what the caller sees. */
static void reclaim_failed(Reclaim *rc, char *message)
{
	rc->res.failures++;
	if (!rc->first_error)
		rc->first_error = message;
	else
		free(message);
}

static bool kept(const Reclaim *rc, const char *name)
{
	const char *id = name + strlen(STORAGE_DM_PREFIX);
	for (size_t i = 0; i < rc->n_keep; i++)
		if (rc->keep[i] && strcmp(rc->keep[i], id) == 0)
			return true;
	return false;
}

static bool path_under(const char *path, const char *root)
{
	size_t len = strlen(root);

	if (strcmp(root, "/") == 0)
		return path[0] == '/';
	return strncmp(path, root, len) == 0 && path[len] == '/';
}

/* The first line of a sysfs attribute. */
static int read_line(const char *path, char *buf, size_t size)
{
	_cleanup_fclose_ FILE *f = fopen(path, "re");

	buf[0] = 0;
	if (!f)
		return negative_errno();
	if (!fgets(buf, (int)size, f))
		return ferror(f) ? -EIO : -ENODATA;
	buf[strcspn(buf, "\n")] = 0;
	return 0;
}

/* Whether the block device `dev` is a loop device over a file under the state dir. The path
 * is the one the kernel resolved at attach time; " (deleted)" after it marks a removed file,
 * which still lies under the same directory. */
static bool loop_dev_under(const Reclaim *rc, dev_t dev)
{
	char p[80], backing[PATH_MAX];

	snprintf(p, sizeof(p), "/sys/dev/block/%u:%u/loop/backing_file", major(dev), minor(dev));
	return read_line(p, backing, sizeof(backing)) == 0 && path_under(backing, rc->root);
}

static void remove_ours(Reclaim *rc, const char *name, const char *why)
{
	char *err = NULL;
	int r = dm_remove_name(rc->storage, name, &err);

	if (r < 0) {
		if (!err)
			(void)error_set(&err, r, "cannot remove %s: %s", name, strerror(-r));
		reclaim_failed(rc, err);
		return;
	}
	log_debug("reclaim: removed %s (%s)", name, why);
	rc->res.dm_removed++;
}

/* A device with no table, ours if its CoW file is found under the state dir. */
typedef struct Pending {
	const char *name;
	const char *owner;
	bool found;
} Pending;

/* Looks for regular files under `dir` whose canonical path hashes to a pending owner. Symlinks
 * are not followed: a CoW file reached through one resolved to a path outside the tree. */
static int walk(const char *dir, unsigned depth, Pending *p, size_t n)
{
	_cleanup_(closedirp) DIR *d = opendir(dir);
	struct dirent *de;

	/* A directory we cannot read may hide a CoW file: its device is then left alone, the
	 * safe way to be wrong. */
	if (!d) {
		log_debug("reclaim: cannot read %s: %m", dir);
		return 0;
	}
	while ((de = readdir(d))) {
		_cleanup_free_ char *path = NULL;
		unsigned char type = de->d_type;
		char owner[DM_OWNER_LEN + 1];
		struct stat st;
		int r;

		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		if (asprintf(&path, "%s%s%s", dir, strcmp(dir, "/") == 0 ? "" : "/", de->d_name) <
		    0) {
			path = NULL;
			return -ENOMEM;
		}
		if (type == DT_UNKNOWN) {
			if (lstat(path, &st) < 0)
				continue;
			type = S_ISDIR(st.st_mode) ? DT_DIR : S_ISREG(st.st_mode) ? DT_REG : 0;
		}
		if (type == DT_DIR && depth < WALK_MAX_DEPTH) {
			r = walk(path, depth + 1, p, n);
			if (r < 0)
				return r;
			continue;
		}
		if (type != DT_REG)
			continue;
		r = dm_owner_token(path, owner);
		if (r < 0)
			return r;
		for (size_t i = 0; i < n; i++)
			if (strcmp(p[i].owner, owner) == 0)
				p[i].found = true;
	}
	return 0;
}

typedef struct Names {
	char **v;
	size_t n;
} Names;

static void names_freep(Names *names)
{
	for (size_t i = 0; i < names->n; i++)
		free(names->v[i]);
	free(names->v);
}

/* Removes the dm devices that are ours and not kept: see storage_reclaim() in storage.h. */
static int reclaim_dm(Reclaim *rc)
{
	_cleanup_(names_freep) Names names = {};
	_cleanup_free_ Pending *pending = NULL;
	_cleanup_free_ DmDeviceInfo *infos = NULL;
	size_t n_pending = 0;
	int r;

	r = dm_list_ember(&names.v, &names.n);
	if (r < 0)
		return r;
	infos = calloc(names.n ?: 1, sizeof(*infos));
	pending = calloc(names.n ?: 1, sizeof(*pending));
	if (!infos || !pending)
		return -ENOMEM;
	for (size_t i = 0; i < names.n; i++) {
		const char *name = names.v[i];
		DmDeviceInfo *info = &infos[i];

		if (kept(rc, name))
			continue;
		r = dm_device_inspect(name, info);
		if (r == -ENXIO || r == -ENOENT)
			continue; /* gone meanwhile */
		if (r < 0) {
			char *err = NULL;
			(void)error_set(&err, r, "cannot read the table of %s: %s", name,
					strerror(-r));
			reclaim_failed(rc, err);
			continue;
		}
		if (info->has_table) {
			if (info->snapshot && loop_dev_under(rc, info->cow))
				remove_ours(rc, name, "its CoW file is under the state dir");
			else
				log_debug("reclaim: %s is not over a CoW file under %s: left alone",
					  name, rc->root);
		} else if (info->owner[0])
			pending[n_pending++] = (Pending){.name = name, .owner = info->owner};
		else
			/* A create that stopped before its table, by an agent that did not yet
			 * write its owner into the uuid, or no ember device at all: nothing says
			 * whose it is. */
			log_debug("reclaim: %s has no table and no owner: left alone", name);
	}
	if (n_pending == 0)
		return 0;
	r = walk(rc->root, 0, pending, n_pending);
	if (r < 0)
		return r;
	for (size_t i = 0; i < n_pending; i++)
		if (pending[i].found)
			remove_ours(rc, pending[i].name,
				    "a create that did not finish, over a CoW file under the state "
				    "dir");
		else
			log_debug("reclaim: %s has no table and its CoW file is not under %s: "
				  "left alone",
				  pending[i].name, rc->root);
	return 0;
}

static bool has_holders(int nr)
{
	char p[64];
	_cleanup_(closedirp) DIR *d = NULL;
	struct dirent *de;

	snprintf(p, sizeof(p), "/sys/block/loop%d/holders", nr);
	d = opendir(p);
	while (d && (de = readdir(d)))
		if (de->d_name[0] != '.')
			return true;
	return false;
}

static bool is_kept_file(const Reclaim *rc, const struct loop_info64 *info)
{
	for (size_t i = 0; i < rc->n_kept_files; i++)
		if (info->lo_device == rc->kept_files[i].dev &&
		    info->lo_inode == rc->kept_files[i].ino)
			return true;
	return false;
}

static void loop_failed(Reclaim *rc, const char *device, const char *backing, int r)
{
	char *err = NULL;
	(void)error_set(&err, r, "cannot detach %s (%s): %s", device, backing, strerror(-r));
	reclaim_failed(rc, err);
}

/* The status of a bound loop device: 1, or 0 when it is not bound (any more). */
static int loop_status(const char *device, struct loop_info64 *ret)
{
	_cleanup_close_ int fd = open(device, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return errno == ENXIO ? 0 : negative_errno();
	int r = loop_get_status(fd, ret);
	if (r == -ENXIO)
		return 0;
	return r < 0 ? r : 1;
}

static int reclaim_loop(int nr, const char *device, void *userdata)
{
	Reclaim *rc = userdata;
	char p[64], backing[PATH_MAX];
	struct loop_info64 before = {}, after = {};
	int r;

	snprintf(p, sizeof(p), "/sys/block/loop%d/loop/backing_file", nr);
	if (read_line(p, backing, sizeof(backing)) < 0 || !path_under(backing, rc->root))
		return 0;
	if (has_holders(nr))
		return 0; /* a dm device uses it */
	r = loop_status(device, &before);
	if (r <= 0) {
		if (r < 0)
			loop_failed(rc, device, backing, r);
		return 0;
	}
	if (is_kept_file(rc, &before)) {
		log_debug("reclaim: %s is over the disk of a kept sandbox: left alone", device);
		return 0;
	}

	{
		/* A mounted file system (in any mount namespace) or a dm table claims its device
		 * exclusively, so an exclusive open fails with EBUSY for every such user, seen
		 * from here or not. Only the holes in that are plain opens, which the kernel
		 * covers: LOOP_CLR_FD on a device someone else has open only marks it
		 * auto-clearing, detected below. */
		_cleanup_close_ int fd = open(device, O_RDONLY | O_CLOEXEC | O_EXCL);
		if (fd < 0 && errno == EBUSY) {
			log_debug("reclaim: %s (%s) is in use (mounted or claimed): left alone",
				  device, backing);
			return 0;
		}
		if (fd < 0) {
			if (errno != ENXIO) /* ENXIO: detached meanwhile */
				loop_failed(rc, device, backing, negative_errno());
			return 0;
		}
		if (ioctl(fd, LOOP_CLR_FD) < 0) {
			if (errno != ENXIO)
				loop_failed(rc, device, backing, negative_errno());
			return 0;
		}
		/* Our fd is the last user: closing it detaches the device (5.x detaches in the
		 * ioctl already, 6.x on this close). */
	}

	r = loop_status(device, &after);
	if (r < 0) {
		loop_failed(rc, device, backing, r);
		return 0;
	}
	if (r > 0 && after.lo_device == before.lo_device && after.lo_inode == before.lo_inode) {
		/* Someone else has it open: the kernel only set auto-clear. Whoever attached it
		 * without auto-clear wanted it to outlive its users; take that flag off again,
		 * and change nothing else. */
		if (!(before.lo_flags & LO_FLAGS_AUTOCLEAR) &&
		    (after.lo_flags & LO_FLAGS_AUTOCLEAR)) {
			_cleanup_close_ int fd = open(device, O_RDONLY | O_CLOEXEC);
			after.lo_flags &= ~(__u32)LO_FLAGS_AUTOCLEAR;
			if (fd < 0 || ioctl(fd, LOOP_SET_STATUS64, &after) < 0)
				log_debug("reclaim: cannot clear auto-clear of %s again: %m",
					  device);
		}
		log_debug("reclaim: %s (%s) is open: left alone", device, backing);
		return 0;
	}
	log_debug("reclaim: detached %s (%s)", device, backing);
	rc->res.loops_detached++;
	return 0;
}

int storage_reclaim(Storage *s, const char *state_dir, const char *const *keep, size_t n_keep,
		    StorageReclaimResult *ret, char **ret_error)
{
	_cleanup_free_ char *root = NULL;
	_cleanup_free_ BaseKey *kept_files = NULL;
	Reclaim rc = {.storage = s, .keep = keep, .n_keep = n_keep};
	int r;

	if (!state_dir || state_dir[0] != '/')
		return error_set(ret_error, -EINVAL, "state dir must be an absolute path");
	root = realpath(state_dir, NULL);
	if (!root && errno != ENOENT)
		return error_set(ret_error, -errno, "cannot resolve state dir %s: %m", state_dir);
	/* A state dir that is gone holds no files; devices over files deleted with it still
	 * name it as it was. */
	if (!root && !(root = strdup(state_dir)))
		return -ENOMEM;
	rc.root = root;
	r = disks_kept_files(s, keep, n_keep, &kept_files, &rc.n_kept_files);
	if (r < 0)
		return r;
	rc.kept_files = kept_files;

	if (dm_available()) {
		r = reclaim_dm(&rc);
		if (r < 0) {
			free(rc.first_error);
			return error_set(ret_error, r, "cannot reclaim dm devices: %s",
					 strerror(-r));
		}
	}

	/* Removing dm devices releases their loops (auto-clear); what is left under the state dir
	 * that nothing uses is an orphan. */
	r = loop_foreach_bound(reclaim_loop, &rc);
	if (r < 0 && r != -ENOENT) {
		free(rc.first_error);
		return error_set(ret_error, r, "cannot list loop devices: %s", strerror(-r));
	}

	if (ret)
		*ret = rc.res;
	if (rc.res.failures > 0) {
		if (ret_error)
			*ret_error = rc.first_error;
		else
			free(rc.first_error);
		return -EBUSY;
	}
	free(rc.first_error);
	return 0;
}
