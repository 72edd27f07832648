/* SPDX-License-Identifier: Apache-2.0 */
/* Shared between the storage module's .c files only. */
#pragma once

#include <dirent.h>
#include <limits.h>
#include <linux/loop.h>
#include <pthread.h>

#include "common/error.h"
#include "storage.h"

static inline void closedirp(DIR **d)
{
	if (*d)
		closedir(*d);
}

/* loop.c */
int loop_get_status(int fd, struct loop_info64 *ret);
/* Calls fn for every bound loop device until it returns non-zero (which is returned). */
int loop_foreach_bound(int (*fn)(int nr, const char *device, void *userdata), void *userdata);

/* registry.c */
typedef struct BaseEntry BaseEntry;
typedef struct Registry {
	pthread_mutex_t lock;
	BaseEntry *entries;
} Registry;
void registry_init(Registry *r);
void registry_done(Registry *r);
/* *ret_dev: the loop device's dev_t, *ret_sectors: its size */
int registry_acquire(Registry *r, const char *image, char **ret_device, dev_t *ret_dev,
		     uint64_t *ret_sectors, char **ret_error);
int registry_release(Registry *r, const char *image);
/* Entries currently held, for tests and debugging. */
unsigned registry_count(Registry *r);

/* dm.c: the dm backend */
int dm_disk_create(Storage *s, const StorageDiskSpec *spec, bool restore, char **ret_device,
		   char **ret_error);
int dm_disk_remove(Storage *s, const StorageDiskSpec *spec, char **ret_error);
int dm_disk_status(const StorageDiskSpec *spec, StorageDiskStatus *ret, char **ret_error);
int dm_disk_device(const char *id, char **ret_device);
int dm_list_ember(char ***ret_names, size_t *ret_n);
int dm_remove_name(const char *name, char **ret_error);
bool dm_available(void);

/* file.c: the file backend */
int file_disk_create(const StorageDiskSpec *spec, bool restore, char **ret_device,
		     char **ret_error);
int file_disk_status(const StorageDiskSpec *spec, StorageDiskStatus *ret, char **ret_error);

struct Storage {
	StorageBackend backend;
	Registry registry;
};
