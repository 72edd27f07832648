/* SPDX-License-Identifier: Apache-2.0 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/id.h"
#include "common/macro.h"
#include "storage-internal.h"

static const char *const backend_names[_STORAGE_BACKEND_MAX] = {
	[STORAGE_BACKEND_DM] = "dm",
	[STORAGE_BACKEND_FILE] = "file",
};

const char *storage_backend_to_string(StorageBackend b)
{
	return b >= 0 && b < _STORAGE_BACKEND_MAX ? backend_names[b] : NULL;
}

StorageBackend storage_backend_from_string(const char *s)
{
	for (int i = 0; s && i < _STORAGE_BACKEND_MAX; i++)
		if (strcmp(s, backend_names[i]) == 0)
			return (StorageBackend)i;
	return _STORAGE_BACKEND_INVALID;
}

StorageBackend storage_backend_detect(void)
{
	return dm_available() ? STORAGE_BACKEND_DM : STORAGE_BACKEND_FILE;
}

int storage_new(StorageBackend backend, Storage **ret)
{
	Storage *s;

	if (backend < 0 || backend >= _STORAGE_BACKEND_MAX)
		return -EINVAL;
	if (backend == STORAGE_BACKEND_DM && !dm_available())
		return -ENODEV;
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->backend = backend;
	registry_init(&s->registry);
	pthread_mutex_init(&s->disks_lock, NULL);
	*ret = s;
	return 0;
}

static void disk_entry_free(DiskEntry *d)
{
	pthread_mutex_destroy(&d->lock);
	free(d->id);
	free(d);
}

void storage_free(Storage *s)
{
	if (!s)
		return;
	for (DiskEntry *d = s->disks, *n; d; d = n) {
		n = d->next;
		disk_entry_free(d);
	}
	pthread_mutex_destroy(&s->disks_lock);
	registry_done(&s->registry);
	free(s);
}

int disk_lock(Storage *s, const char *id, DiskEntry **ret)
{
	DiskEntry *d;

	pthread_mutex_lock(&s->disks_lock);
	for (d = s->disks; d; d = d->next)
		if (strcmp(d->id, id) == 0)
			break;
	if (!d) {
		d = calloc(1, sizeof(*d));
		if (d)
			d->id = strdup(id);
		if (!d || !d->id) {
			free(d);
			pthread_mutex_unlock(&s->disks_lock);
			return -ENOMEM;
		}
		d->storage = s;
		pthread_mutex_init(&d->lock, NULL);
		d->next = s->disks;
		s->disks = d;
	}
	d->users++;
	pthread_mutex_unlock(&s->disks_lock);
	/* Outside disks_lock: this wait may be long (another thread removing a busy disk). */
	pthread_mutex_lock(&d->lock);
	*ret = d;
	return 0;
}

void disk_unlock(DiskEntry *d)
{
	Storage *s = d->storage;

	/* disks_lock is taken while d->lock is still held (disk_lock() never holds both, so this
	 * order cannot deadlock): when users drops to 0 nobody else is in or waiting for the
	 * entry, and nobody new can find it before disks_lock is released. An entry lives while
	 * a thread uses it, while it holds a base reference, or while it names a copy reclaim
	 * must leave alone. */
	pthread_mutex_lock(&s->disks_lock);
	bool last = --d->users == 0 && !d->has_base && !d->has_file;
	pthread_mutex_unlock(&d->lock);
	if (last) {
		for (DiskEntry **p = &s->disks; *p; p = &(*p)->next)
			if (*p == d) {
				*p = d->next;
				break;
			}
		disk_entry_free(d);
	}
	pthread_mutex_unlock(&s->disks_lock);
}

void disk_set_base(DiskEntry *d, bool has_base, BaseKey key)
{
	_cleanup_(mutex_unlockp) pthread_mutex_t *locked = mutex_take(&d->storage->disks_lock);

	d->has_base = has_base;
	d->base = key;
}

void disk_set_file(DiskEntry *d, bool has_file, BaseKey key)
{
	_cleanup_(mutex_unlockp) pthread_mutex_t *locked = mutex_take(&d->storage->disks_lock);

	d->has_file = has_file;
	d->file = key;
}

int disks_kept_files(Storage *s, const char *const *keep, size_t n_keep, BaseKey **ret,
		     size_t *ret_n)
{
	_cleanup_(mutex_unlockp) pthread_mutex_t *locked = mutex_take(&s->disks_lock);
	_cleanup_free_ BaseKey *files = NULL;
	size_t n = 0;

	for (DiskEntry *d = s->disks; d; d = d->next) {
		if (!d->has_file)
			continue;
		for (size_t i = 0; i < n_keep; i++) {
			if (!keep[i] || strcmp(keep[i], d->id) != 0)
				continue;
			BaseKey *f = reallocarray(files, n + 1, sizeof(*files));
			if (!f)
				return -ENOMEM;
			files = f;
			files[n++] = d->file;
			break;
		}
	}
	*ret = TAKE_PTR(files);
	*ret_n = n;
	return 0;
}

unsigned storage_disks_held(Storage *s)
{
	_cleanup_(mutex_unlockp) pthread_mutex_t *locked = mutex_take(&s->disks_lock);
	unsigned n = 0;

	for (DiskEntry *d = s->disks; d; d = d->next)
		n += d->has_base;
	return n;
}

StorageBackend storage_get_backend(const Storage *s)
{
	return s->backend;
}

static int check_spec(const StorageDiskSpec *spec, char **ret_error)
{
	if (!spec || !id_is_valid(spec->id))
		return error_set(ret_error, -EINVAL, "invalid sandbox id \"%s\"",
				 spec && spec->id ? spec->id : "");
	return 0;
}

/* The file backend's create and restore, remembering the copy's inode for reclaim: a VMM may
 * use the copy through a loop device of its own (fcsim does), which reclaim must not take
 * from a kept sandbox even when nothing it can see holds the device. */
static int file_disk_open(Storage *s, const StorageDiskSpec *spec, bool restore, char **ret_device,
			  char **ret_error)
{
	_cleanup_(disk_unlockp) DiskEntry *d = NULL;
	_cleanup_free_ char *device = NULL;
	struct stat st;
	int r;

	r = disk_lock(s, spec->id, &d);
	if (r < 0)
		return r;
	r = file_disk_create(spec, restore, &device, ret_error);
	if (r < 0)
		return r;
	if (stat(device, &st) < 0)
		return error_set(ret_error, -errno, "disk %s: %m", device);
	disk_set_file(d, true, (BaseKey){.dev = st.st_dev, .ino = st.st_ino});
	*ret_device = TAKE_PTR(device);
	return 0;
}

int storage_disk_create(Storage *s, const StorageDiskSpec *spec, char **ret_device,
			char **ret_error)
{
	int r = check_spec(spec, ret_error);
	if (r < 0)
		return r;
	return s->backend == STORAGE_BACKEND_DM
		       ? dm_disk_create(s, spec, false, ret_device, ret_error)
		       : file_disk_open(s, spec, false, ret_device, ret_error);
}

int storage_disk_restore(Storage *s, const StorageDiskSpec *spec, char **ret_device,
			 char **ret_error)
{
	int r = check_spec(spec, ret_error);
	if (r < 0)
		return r;
	return s->backend == STORAGE_BACKEND_DM
		       ? dm_disk_create(s, spec, true, ret_device, ret_error)
		       : file_disk_open(s, spec, true, ret_device, ret_error);
}

int storage_disk_remove(Storage *s, const StorageDiskSpec *spec, char **ret_error)
{
	_cleanup_(disk_unlockp) DiskEntry *d = NULL;
	int r = check_spec(spec, ret_error);
	if (r < 0)
		return r;
	if (s->backend == STORAGE_BACKEND_DM)
		return dm_disk_remove(s, spec, ret_error);
	/* The file backend's disk is a plain file: nothing holds it but the VMM, and the file
	 * itself stays (deleting it is the caller's decision). Reclaim no longer spares it. */
	r = disk_lock(s, spec->id, &d);
	if (r < 0)
		return r;
	disk_set_file(d, false, (BaseKey){});
	return 0;
}

int storage_disk_flatten(Storage *s, const StorageDiskSpec *spec, const char *dest,
			 char **ret_error)
{
	_cleanup_free_ char *device = NULL;
	int r = check_spec(spec, ret_error);

	if (r < 0)
		return r;
	if (s->backend == STORAGE_BACKEND_FILE) {
		r = storage_copy_sparse(spec->cow_path, dest, true);
		if (r < 0)
			return error_set(ret_error, r, "cannot copy %s to %s: %s", spec->cow_path,
					 dest, strerror(-r));
		return 0;
	}
	r = dm_disk_device(spec->id, &device);
	if (r < 0)
		return r;
	return storage_flatten_image(device, dest, ret_error);
}

int storage_disk_status(Storage *s, const StorageDiskSpec *spec, StorageDiskStatus *ret,
			char **ret_error)
{
	int r = check_spec(spec, ret_error);
	if (r < 0)
		return r;
	return s->backend == STORAGE_BACKEND_DM ? dm_disk_status(spec, ret, ret_error)
						: file_disk_status(spec, ret, ret_error);
}

int storage_base_acquire(Storage *s, const char *image, char **ret_device, char **ret_error)
{
	return registry_acquire(&s->registry, image, ret_device, NULL, NULL, NULL, ret_error);
}

int storage_base_release(Storage *s, const char *image)
{
	return registry_release(&s->registry, image);
}
