/* SPDX-License-Identifier: Apache-2.0 */
/* Shared between the storage module's .c files, and with tests (storage-tool). */
#pragma once

#include <dirent.h>
#include <limits.h>
#include <linux/loop.h>
#include <pthread.h>
#include <sys/stat.h>

#include "common/error.h"
#include "common/fileio.h"
#include "storage.h"

static inline void mutex_unlockp(pthread_mutex_t **m)
{
	if (*m)
		pthread_mutex_unlock(*m);
}

/* Locks m and returns it, for `_cleanup_(mutex_unlockp) pthread_mutex_t *l = mutex_take(&m);`. */
static inline pthread_mutex_t *mutex_take(pthread_mutex_t *m)
{
	pthread_mutex_lock(m);
	return m;
}

/* loop.c */
int loop_get_status(int fd, struct loop_info64 *ret);
/* Calls fn for every bound loop device until it returns non-zero (which is returned). */
int loop_foreach_bound(int (*fn)(int nr, const char *device, void *userdata), void *userdata);
/* Whether the block device `dev` is a loop device bound to the file that `file` describes (same
 * st_dev/st_ino): 1 (and *ret_read_only) when it is, 0 when not (another file, unbound, not a
 * loop device), -errno when it cannot be told. */
int loop_dev_backed_by(dev_t dev, const struct stat *file, bool *ret_read_only);

/* registry.c */
typedef struct BaseKey {
	dev_t dev;
	ino_t ino;
} BaseKey;
typedef struct BaseEntry BaseEntry;
/* `lock` guards the list and every entry's refs and pins, and is held only for list work; an
 * entry's own lock is held while its loop device is attached, so that a slow attach holds up
 * only the disks over that one image. */
typedef struct Registry {
	pthread_mutex_t lock;
	BaseEntry *entries;
} Registry;
void registry_init(Registry *r);
void registry_done(Registry *r);
/* *ret_dev: the loop device's dev_t, *ret_sectors: its size, *ret_key: what to release with */
int registry_acquire(Registry *r, const char *image, char **ret_device, dev_t *ret_dev,
		     uint64_t *ret_sectors, BaseKey *ret_key, char **ret_error);
int registry_release(Registry *r, const char *image);
void registry_release_key(Registry *r, BaseKey key);
/* Entries currently held, for tests and debugging. */
unsigned registry_count(Registry *r);
/* References held on the entry for `image`: > 0, or -ENOENT when there is none. */
int registry_refs(Registry *r, const char *image);

/* storage.c: one entry per disk this process works on or holds a base reference for. */
typedef struct DiskEntry {
	Storage *storage;
	char *id;
	/* Serializes create, restore and remove of this one disk, across their waits; other
	 * disks go on meanwhile. */
	pthread_mutex_t lock;
	unsigned users; /* threads between disk_lock() and disk_unlock(); Storage.disks_lock */
	/* This process holds a base reference for the disk (create or restore took it, remove
	 * gives it back). Written with disk_set_base() under both locks, read under either. */
	bool has_base;
	BaseKey base;
	/* file backend: this process created or restored the disk, whose copy is this inode;
	 * reclaim leaves loop devices over it alone while the id is kept. Written with
	 * disk_set_file() under both locks, read under either. */
	bool has_file;
	BaseKey file;
	struct DiskEntry *next;
} DiskEntry;
/* Finds or makes the entry for id and takes its lock. */
int disk_lock(Storage *s, const char *id, DiskEntry **ret);
void disk_unlock(DiskEntry *d);
/* Caller holds d->lock. */
void disk_set_base(DiskEntry *d, bool has_base, BaseKey key);
void disk_set_file(DiskEntry *d, bool has_file, BaseKey key);
/* The copies (file backend) of the disks in `keep` this process created or restored:
 * *ret_n inodes in *ret (caller frees). */
int disks_kept_files(Storage *s, const char *const *keep, size_t n_keep, BaseKey **ret,
		     size_t *ret_n);
static inline void disk_unlockp(DiskEntry **d)
{
	if (*d)
		disk_unlock(*d);
}
/* Disks this process holds a base reference for, for tests. */
unsigned storage_disks_held(Storage *s);

/* dm.c: the dm backend */
int dm_disk_create(Storage *s, const StorageDiskSpec *spec, bool restore, char **ret_device,
		   char **ret_error);
int dm_disk_remove(Storage *s, const StorageDiskSpec *spec, char **ret_error);
int dm_disk_status(const StorageDiskSpec *spec, StorageDiskStatus *ret, char **ret_error);
int dm_disk_device(const char *id, char **ret_device);
int dm_list_ember(char ***ret_names, size_t *ret_n);

/* The owner in a device's uuid (`EMBER-<id>.<owner>`): the first 16 hex digits of the SHA-256
 * of the CoW file's canonical path. */
#define DM_OWNER_LEN 16
int dm_owner_token(const char *path, char ret[DM_OWNER_LEN + 1]);
/* What tells whose a dm device is. */
typedef struct DmDeviceInfo {
	char owner[DM_OWNER_LEN + 1]; /* from an ember uuid; "" when it has none */
	bool has_table;               /* live, or loaded and not yet resumed */
	bool snapshot;                /* that table is one snapshot target ... */
	dev_t cow;                    /* ... over this CoW device */
} DmDeviceInfo;
/* -ENXIO (or -ENOENT) when the device does not exist. */
int dm_device_inspect(const char *name, DmDeviceInfo *ret);
/* Removes ember-<id> by name (retrying while busy) and gives back the base reference this
 * process holds for the disk, if any. */
int dm_remove_name(Storage *s, const char *name, char **ret_error);
bool dm_available(void);

/* For tests: called (when set) right before the dm device is made, after every check, so that
 * a test can make the same name meanwhile as a racing creator would. Not for product code. */
extern void (*storage_test_before_dm_create)(const char *name);

/* file.c: the file backend */
int file_disk_create(const StorageDiskSpec *spec, bool restore, char **ret_device,
		     char **ret_error);
int file_disk_status(const StorageDiskSpec *spec, StorageDiskStatus *ret, char **ret_error);

struct Storage {
	StorageBackend backend;
	Registry registry;
	pthread_mutex_t disks_lock; /* the list, and each entry's users */
	DiskEntry *disks;
};
