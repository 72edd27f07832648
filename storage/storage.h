/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Sandbox root disks (DESIGN.md §5).
 *
 * dm backend: one shared read-only loop device per base image (the *loop registry*, keyed by
 * the image's st_dev/st_ino), and per sandbox a sparse copy-on-write file on its own loop
 * device under a device-mapper snapshot `ember-<id>` (uuid `EMBER-<id>.<owner>`, where owner is
 * the first 16 hex digits of the SHA-256 of the CoW file's canonical path) with the table
 * `0 <base sectors> snapshot <base loop> <cow loop> P 8`. The persistent exception store makes
 * the CoW file alone carry the sandbox's disk across pause, agent restart and reboot. Devices
 * made before the owner was added (uuid `EMBER-<id>`) are taken over by restore as before.
 *
 * file backend, for hosts without device-mapper: the sandbox's disk is its own copy of the base
 * image, a reflink where the filesystem can (FICLONE) and a sparse copy otherwise.
 *
 * Every function returns >= 0 or -errno; where it takes `ret_error`, a failure also sets
 * *ret_error to a message for a person (caller frees; may stay NULL on -ENOMEM). Nothing here
 * logs above debug level. Devices are named, so every operation can find them again after the
 * process that made them is gone: restore takes over a disk another process made, remove works
 * on one, and storage_reclaim() clears what a crash left behind.
 *
 * Threads: a Storage may be used from many threads at once. Operations on one disk (one id)
 * are serialized; operations on different disks run in parallel, so a disk whose removal
 * waits for its holder, or for a slow udev, holds up no other disk.
 *
 * After an agent restart, for each sandbox whose disk should be up (running, or anything but
 * paused), call storage_disk_restore() with the same spec the sandbox's create used (id,
 * base_image, cow_path; cow_size may be 0). It returns the device to give the VMM:
 *   - dm: if ember-<id> still exists over that base and CoW file it is taken over as it is
 *     (not made again: a running VMM keeps using it), and this process counts its reference
 *     on the base's loop device again, so that removing other disks over the same base later
 *     cannot release a base still in use. If it does not exist (after a reboot, or a pause), it
 *     is made again over the CoW file. Returns /dev/mapper/ember-<id>.
 *   - file: returns cow_path if the copy exists, and remembers the copy, so that reclaim
 *     leaves loop devices over it alone (a VMM may use one, as fcsim does) while the id is
 *     kept.
 * Then storage_reclaim() with those ids as `keep` clears devices no sandbox needs. A disk that
 * was not restored can still be removed (storage_disk_remove()), but this process then holds
 * no base reference for it and gives none back.
 */
#pragma once

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

typedef enum StorageBackend {
	STORAGE_BACKEND_DM,
	STORAGE_BACKEND_FILE,
	_STORAGE_BACKEND_MAX,
	_STORAGE_BACKEND_INVALID = -EINVAL,
} StorageBackend;

const char *storage_backend_to_string(StorageBackend b);
StorageBackend storage_backend_from_string(const char *s);
/* STORAGE_BACKEND_DM when /dev/mapper/control answers, STORAGE_BACKEND_FILE otherwise. */
StorageBackend storage_backend_detect(void);

typedef struct Storage Storage;

int storage_new(StorageBackend backend, Storage **ret);
/* Forgets in-memory state only: devices in use by sandboxes stay, a later storage_new() finds
 * them again. */
void storage_free(Storage *s);
StorageBackend storage_get_backend(const Storage *s);
/* How long dm operations wait for udev before making /dev/mapper nodes themselves (default
 * 10000 ms). Only matters where udev looks alive but does not process events. Process-wide;
 * set it before any disk operation. */
void storage_set_udev_timeout(unsigned ms);

/* One sandbox's disk. The caller keeps these paths in its own records: every operation takes
 * the spec again, so nothing depends on this process having created the disk. */
typedef struct StorageDiskSpec {
	const char *id;         /* sandbox id, [a-z0-9][a-z0-9-]{0,62} */
	const char *base_image; /* read-only base: template rootfs or flattened snapshot */
	const char *cow_path;   /* dm: the sparse CoW file; file: the sandbox's copy of the base */
	uint64_t cow_size;      /* create: bytes of changes the disk may hold (dm: CoW file size) */
} StorageDiskSpec;

#define STORAGE_DM_PREFIX   "ember-"
#define STORAGE_UUID_PREFIX "EMBER-"
/* dm snapshot chunk size in 512-byte sectors: 4 KiB, the page and ext4 block size. */
#define STORAGE_CHUNK_SECTORS 8

/* Makes a new disk: a new CoW file (refused if it exists) and the device over it. *ret_device
 * is what to give the VMM: /dev/mapper/ember-<id>, or the copy's path for the file backend. A
 * failure leaves nothing behind, and never touches a device it did not make: -EEXIST when
 * ember-<id> exists as another disk, or is made by someone else while this create runs.
 * dm: a retry of a create that succeeded (in this process or before a restart) with the same
 * spec, size included, returns the existing device as storage_disk_restore() does. file: the
 * copy exists: -EEXIST (use storage_disk_restore()). */
int storage_disk_create(Storage *s, const StorageDiskSpec *spec, char **ret_device,
			char **ret_error);
/* The device again over an existing CoW file: after pause, restart or reboot (see the top of
 * this file for what a restarted agent calls). dm: an ember-<id> that exists already over the
 * spec's base and CoW file is taken over as it is; one over other devices is -EEXIST and left
 * alone. Calling it again for a disk that is up is harmless. file: the copy's path, -ENOENT if
 * it does not exist. */
int storage_disk_restore(Storage *s, const StorageDiskSpec *spec, char **ret_device,
			 char **ret_error);
/* Takes the device down: dm device, CoW loop, and the base reference this process took for the
 * disk (with create or restore). The CoW file stays (deleting it is the caller's decision).
 * Retries while the device is busy (26 attempts 100 ms apart, about 2.5 s), then -EBUSY with a
 * message saying who holds it and how long it was tried. A disk that does not exist is fine
 * (idempotent). file: nothing to take down; the copy stays, and reclaim no longer spares loop
 * devices over it. */
int storage_disk_remove(Storage *s, const StorageDiskSpec *spec, char **ret_error);
/* Writes the disk's current content into `dest` (new file, refused if it exists) as a sparse
 * image: blocks of zeros stay unallocated. The result can serve as a base image. The disk must
 * not be written meanwhile (pause the VM first). */
int storage_disk_flatten(Storage *s, const StorageDiskSpec *spec, const char *dest,
			 char **ret_error);

typedef struct StorageDiskStatus {
	/* dm: changes held (CoW data+metadata); file: the copy's allocated bytes, st_blocks * 512
	 * (blocks a reflinked copy shares with the base included) */
	uint64_t used_bytes;
	uint64_t capacity_bytes; /* what the changes may grow to (cow_size) */
	uint64_t size_bytes;     /* the disk as the guest sees it */
	bool invalid;            /* dm: the CoW filled up; the snapshot dropped, writes fail */
	/* changes exceed the allowance; file: the copy allocated more than cow_size beyond the
	 * base's allocation (reported, not enforced) */
	bool overflow;
} StorageDiskStatus;

/* -ENOENT when there is no such disk. */
int storage_disk_status(Storage *s, const StorageDiskSpec *spec, StorageDiskStatus *ret,
			char **ret_error);

/* ---- the loop registry (dm backend; exposed for tests and reclaim) ---- */

/* A read-only loop device for the base image, shared: the first acquire attaches (or adopts a
 * device another process attached for the same inode), later ones count. Thread-safe. */
int storage_base_acquire(Storage *s, const char *image, char **ret_device, char **ret_error);
int storage_base_release(Storage *s, const char *image);

/* ---- loop devices ---- */

typedef enum StorageLoopFlags {
	STORAGE_LOOP_READ_ONLY = 1 << 0,
	/* Bypass the page cache where the backing file allows it. */
	STORAGE_LOOP_DIRECT_IO = 1 << 1,
	/* LOOP_SET_FD + LOOP_SET_STATUS64 even where LOOP_CONFIGURE exists: the pre-5.8 path,
	 * for tests. */
	STORAGE_LOOP_LEGACY = 1 << 2,
} StorageLoopFlags;

/* Attaches `path` to a free loop device. The device is auto-clearing: it detaches itself when
 * the last user (this fd, a dm device) goes, so a crash between attach and use leaks nothing.
 * Returns an fd on the device; *ret_device is /dev/loopN. */
int storage_loop_attach(const char *path, StorageLoopFlags flags, char **ret_device);
/* Detaches now, or as soon as the device's last user closes it. */
int storage_loop_detach(const char *device);
/* The loop device backed by `path` (same st_dev/st_ino), if any: 0 and /dev/loopN, or
 * -ENOENT. `read_only` < 0: either kind. */
int storage_loop_find(const char *path, int read_only, char **ret_device);

/* ---- usage and reclaim ---- */

/* Real disk use: st_blocks * 512 of a file; of a tree, every file once even if hard-linked. */
int storage_usage_file(const char *path, uint64_t *ret);
int storage_usage_tree(const char *path, uint64_t *ret);

typedef struct StorageReclaimResult {
	unsigned dm_removed;
	unsigned loops_detached;
	unsigned failures;
} StorageReclaimResult;

/* For agent start-up, after storage_disk_restore() of the sandboxes to keep: after a crash this
 * returns the host to the devices its sandboxes need. Several agents may run on one host, each
 * with its own state dir; reclaim never touches what another one owns. State dirs must not lie
 * inside one another. Paths are compared canonical (realpath of `state_dir`, the kernel's
 * resolved backing_file).
 *
 * dm devices: an ember-<id> whose id is not in `keep` is removed only when it is ours:
 *   - with a table (live, or loaded and not yet resumed): it is one snapshot target whose CoW
 *     device is a loop device over a file under `state_dir`. Any other table (another
 *     agent's CoW, no snapshot, not a loop) is left alone.
 *   - without a table (a create that stopped between making the device and loading its
 *     table, or one another agent is running right now): its uuid is `EMBER-<id>.<owner>`
 *     and a regular file under `state_dir` (symlinks not followed) has the canonical path
 *     that hashes to owner. A device with uuid `EMBER-<id>` (made before the owner existed)
 *     or any other uuid carries no owner: it is left alone (remove it with
 *     storage_disk_remove() or dmsetup).
 * Loop devices: one over a file under `state_dir` is detached only when nothing uses it:
 *   - not held by a dm device (sysfs holders);
 *   - not a copy (file backend) of a disk in `keep` that this Storage created or restored;
 *   - not claimed exclusively: an open with O_EXCL fails with EBUSY while a file system on it
 *     is mounted, in any mount namespace, or a dm table or another exclusive opener has it;
 *   - not open elsewhere: the kernel turns LOOP_CLR_FD on a device someone else has open
 *     into auto-clear; that is seen, the device is left (its auto-clear flag put back as it
 *     was) and not counted as detached.
 * `failures` counts devices that are ours but could not be removed or detached (the first
 * one's message in *ret_error, -EBUSY); devices left alone are no failures. */
int storage_reclaim(Storage *s, const char *state_dir, const char *const *keep, size_t n_keep,
		    StorageReclaimResult *ret, char **ret_error);

/* ---- pieces with no kernel behind them, for unit tests ---- */

/* "0 <sectors> snapshot <major:minor> <major:minor> P <chunk>" */
int storage_dm_snapshot_table(uint64_t base_sectors, dev_t base, dev_t cow, unsigned chunk,
			      char **ret);
/* Parses a snapshot target's status line: "<used>/<total> <metadata>", "Invalid", "Overflow"
 * or "Merge failed". Sectors. */
int storage_dm_snapshot_status_parse(const char *params, uint64_t *ret_used, uint64_t *ret_total,
				     uint64_t *ret_metadata, bool *ret_invalid, bool *ret_overflow);
/* Writes the content of the block device or file `src` into a new file `dest` (refused if it
 * exists), leaving 4 KiB blocks of zeros unallocated. */
int storage_flatten_image(const char *src, const char *dest, char **ret_error);
/* Copies `src` to a new file `dest` keeping holes; reflink first when `try_reflink`. Returns 1
 * when it reflinked, 0 when it copied. */
int storage_copy_sparse(const char *src, const char *dest, bool try_reflink);
