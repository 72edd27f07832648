/* SPDX-License-Identifier: Apache-2.0 */
/* Whole-file reads and writes, directories, and locks. */
#pragma once

#include <dirent.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "common/macro.h"

/* _cleanup_(closedirp) DIR *d = opendir(...); */
DEFINE_POINTER_CLEANUP(DIR, closedir)

/* Reads at most max_size bytes (more is -EFBIG); *ret is NUL-terminated. */
int read_full_file(const char *path, size_t max_size, char **ret, size_t *ret_size);

/* Writes to a temporary file in the same directory, fsyncs and renames it into place: readers
 * see the old or the new content, never a torn one, even across a crash. */
int write_file_atomic(const char *path, const void *data, size_t size, mode_t mode);

/* fsync of a file or directory by name: what a rename or a file written by another process
 * needs to survive a crash. */
int fsync_path(const char *path);

/* write() until all of data is written, through EINTR and short writes (a blocking fd). */
int write_full(int fd, const void *data, size_t size);

/* mkdir -p; existing directories are fine, their mode is left alone. */
int mkdir_p(const char *path, mode_t mode);

/* Removes everything inside the directory dir_fd (which stays, as does dir_fd), without
 * following symbolic links; -EXDEV at a directory of another file system. */
int rm_rf_at(int dir_fd);
/* The same, but for the entry named `keep` (NULL: none) directly inside dir_fd. */
int rm_rf_at_except(int dir_fd, const char *keep);
/* rm -rf path, on the same terms; a path that is not there is fine. */
int rm_rf(const char *path);

/* Opens (creating) `path` and takes an exclusive non-blocking flock on it; writes our pid into
 * it. -EBUSY when someone else holds it, with their pid in *ret_holder when known (0 otherwise).
 * Returns the fd, which holds the lock until closed. */
int lock_file_acquire(const char *path, pid_t *ret_holder);
