/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Start-up reclaim: after a crash, remove the devices no known sandbox needs. Names make them
 * findable: dm devices are ember-<id>, loop devices are found by their backing file's path
 * under the state dir.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/macro.h"
#include "storage-internal.h"

static bool kept(const char *name, const char *const *keep, size_t n_keep)
{
	const char *id = name + strlen(STORAGE_DM_PREFIX);
	for (size_t i = 0; i < n_keep; i++)
		if (keep[i] && strcmp(keep[i], id) == 0)
			return true;
	return false;
}

typedef struct LoopCtx {
	const char *state_dir;
	StorageReclaimResult *res;
	char **first_error;
} LoopCtx;

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

static int reclaim_loop(int nr, const char *device, void *userdata)
{
	LoopCtx *ctx = userdata;
	char p[64], backing[PATH_MAX];
	size_t len = strlen(ctx->state_dir);
	_cleanup_fclose_ FILE *f = NULL;

	snprintf(p, sizeof(p), "/sys/block/loop%d/loop/backing_file", nr);
	f = fopen(p, "re");
	if (!f || !fgets(backing, sizeof(backing), f))
		return 0;
	backing[strcspn(backing, "\n")] = 0;
	/* The path as it was when attached; " (deleted)" marks a removed backing file. */
	if (strncmp(backing, ctx->state_dir, len) != 0 || backing[len] != '/')
		return 0;
	if (has_holders(nr))
		return 0; /* a kept dm device uses it */
	int r = storage_loop_detach(device);
	if (r < 0) {
		ctx->res->failures++;
		if (ctx->first_error && !*ctx->first_error)
			(void)error_set(ctx->first_error, r, "cannot detach %s (%s): %s", device,
					backing, strerror(-r));
		return 0;
	}
	log_debug("reclaim: detached %s (%s)", device, backing);
	ctx->res->loops_detached++;
	return 0;
}

int storage_reclaim(Storage *s, const char *state_dir, const char *const *keep, size_t n_keep,
		    StorageReclaimResult *ret, char **ret_error)
{
	StorageReclaimResult res = {};
	char **names = NULL;
	size_t n = 0;
	char *first_error = NULL;
	int r;

	if (!state_dir || state_dir[0] != '/')
		return error_set(ret_error, -EINVAL, "state dir must be an absolute path");

	if (dm_available()) {
		r = dm_list_ember(&names, &n);
		if (r < 0)
			return error_set(ret_error, r, "cannot list dm devices: %s", strerror(-r));
		for (size_t i = 0; i < n; i++) {
			if (kept(names[i], keep, n_keep))
				continue;
			char *err = NULL;
			r = dm_remove_name(s, names[i], &err);
			if (r < 0) {
				res.failures++;
				if (!first_error)
					first_error = err;
				else
					free(err);
			} else {
				log_debug("reclaim: removed %s", names[i]);
				res.dm_removed++;
			}
		}
		for (size_t i = 0; i < n; i++)
			free(names[i]);
		free(names);
	}

	/* Removing dm devices releases their loops (auto-clear); what is left under the state dir
	 * with no holder is an orphan. */
	LoopCtx ctx = {.state_dir = state_dir, .res = &res, .first_error = &first_error};
	r = loop_foreach_bound(reclaim_loop, &ctx);
	if (r < 0 && r != -ENOENT) {
		free(first_error);
		return error_set(ret_error, r, "cannot list loop devices: %s", strerror(-r));
	}

	if (ret)
		*ret = res;
	if (res.failures > 0) {
		if (ret_error)
			*ret_error = first_error;
		else
			free(first_error);
		return -EBUSY;
	}
	free(first_error);
	return 0;
}
