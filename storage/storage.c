/* SPDX-License-Identifier: Apache-2.0 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
	*ret = s;
	return 0;
}

void storage_free(Storage *s)
{
	if (!s)
		return;
	registry_done(&s->registry);
	free(s);
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

int storage_disk_create(Storage *s, const StorageDiskSpec *spec, char **ret_device,
			char **ret_error)
{
	int r = check_spec(spec, ret_error);
	if (r < 0)
		return r;
	return s->backend == STORAGE_BACKEND_DM
		       ? dm_disk_create(s, spec, false, ret_device, ret_error)
		       : file_disk_create(spec, false, ret_device, ret_error);
}

int storage_disk_restore(Storage *s, const StorageDiskSpec *spec, char **ret_device,
			 char **ret_error)
{
	int r = check_spec(spec, ret_error);
	if (r < 0)
		return r;
	return s->backend == STORAGE_BACKEND_DM
		       ? dm_disk_create(s, spec, true, ret_device, ret_error)
		       : file_disk_create(spec, true, ret_device, ret_error);
}

int storage_disk_remove(Storage *s, const StorageDiskSpec *spec, char **ret_error)
{
	int r = check_spec(spec, ret_error);
	if (r < 0)
		return r;
	/* The file backend's disk is a plain file: nothing holds it but the VMM. */
	return s->backend == STORAGE_BACKEND_DM ? dm_disk_remove(s, spec, ret_error) : 0;
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
	return registry_acquire(&s->registry, image, ret_device, NULL, NULL, ret_error);
}

int storage_base_release(Storage *s, const char *image)
{
	return registry_release(&s->registry, image);
}
