/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Real disk use, as `du` counts it: allocated blocks (st_blocks * 512), never apparent size,
 * because sandbox disks and snapshot images are sparse; a file with several hard links in the
 * tree counts once.
 */
#include <fts.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/log.h"
#include "common/macro.h"
#include "storage-internal.h"

int storage_usage_file(const char *path, uint64_t *ret)
{
	struct stat st;

	if (lstat(path, &st) < 0)
		return -errno;
	*ret = (uint64_t)st.st_blocks * 512;
	return 0;
}

typedef struct Linked {
	dev_t dev;
	ino_t ino;
	uint64_t bytes;
} Linked;

static int cmp_linked(const void *a, const void *b)
{
	const Linked *x = a, *y = b;
	if (x->dev != y->dev)
		return x->dev < y->dev ? -1 : 1;
	if (x->ino != y->ino)
		return x->ino < y->ino ? -1 : 1;
	return 0;
}

static void ftsp(FTS **f)
{
	if (*f)
		fts_close(*f);
}

int storage_usage_tree(const char *path, uint64_t *ret)
{
	char *const roots[] = {(char *)path, NULL};
	_cleanup_(ftsp) FTS *f = NULL;
	_cleanup_free_ Linked *linked = NULL;
	size_t n_linked = 0, cap = 0;
	uint64_t total = 0;
	FTSENT *e;

	/* FTS_PHYSICAL: symlinks are not followed; FTS_XDEV: stay on the tree's filesystem. */
	f = fts_open(roots, FTS_PHYSICAL | FTS_NOCHDIR | FTS_XDEV, NULL);
	if (!f)
		return -errno;
	while ((e = fts_read(f))) {
		const struct stat *st = e->fts_statp;

		switch (e->fts_info) {
		case FTS_DP: /* directories are counted on the way in */
			continue;
		case FTS_ERR:
		case FTS_DNR:
		case FTS_NS:
			return -(e->fts_errno ?: EIO);
		default:
			break;
		}
		if (!S_ISDIR(st->st_mode) && st->st_nlink > 1) {
			/* Counted after sorting, once per (dev, ino). */
			if (n_linked == cap) {
				cap = cap ? cap * 2 : 64;
				Linked *l = reallocarray(linked, cap, sizeof(*l));
				if (!l)
					return -ENOMEM;
				linked = l;
			}
			linked[n_linked++] =
				(Linked){st->st_dev, st->st_ino, (uint64_t)st->st_blocks * 512};
			continue;
		}
		total += (uint64_t)st->st_blocks * 512;
	}
	if (errno != 0 && errno != ENOENT)
		log_debug("fts_read(%s) ended with %m", path);
	if (n_linked > 0)
		qsort(linked, n_linked, sizeof(*linked), cmp_linked);
	for (size_t i = 0; i < n_linked; i++)
		if (i == 0 || cmp_linked(&linked[i], &linked[i - 1]) != 0)
			total += linked[i].bytes;
	*ret = total;
	return 0;
}
