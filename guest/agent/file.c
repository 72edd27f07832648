/* SPDX-License-Identifier: Apache-2.0 */
/* File transfer: write (temporary file, fsync, rename) and read (streamed in chunks). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"
#include "common/fileio.h"

typedef struct TempFile {
	int fd;
	char *path; /* unlinked at cleanup unless taken */
} TempFile;

static void temp_file_done(TempFile *t)
{
	t->fd = safe_close(t->fd);
	if (t->path) {
		(void)unlink(t->path);
		free(t->path);
	}
}

/* Reads and drops FileData up to FileEnd after a failure, so that the connection stays in
 * step with the host; -EPROTO when something else comes. */
static int skip_to_end(Conn *c)
{
	for (;;) {
		_cleanup_(guest_frame_freep) GuestFrame *f = NULL;
		int r = guest_frame_recv(c->fd, &c->in, AGENT_SEND_TIMEOUT_MS, &f);
		if (r < 0)
			return r;
		if (f->kind_case == EMBER__GUEST__V1__FRAME__KIND_FILE_END)
			return 0;
		if (f->kind_case != EMBER__GUEST__V1__FRAME__KIND_FILE_DATA)
			return -EPROTO;
	}
}

/* Answers the failure at once (the host may stop sending), then, unless FileEnd has been
 * seen already, drops the rest of the data. */
static int fail_write(Conn *c, const char *path, int r, const char *what, bool skip)
{
	agent_log("write %s: %s: %s", path, what, strerror(-r));
	r = conn_send_error(c, r, "write %s: %s: %s", path, what, strerror(-r));
	if (r < 0 || !skip)
		return r;
	return skip_to_end(c);
}

static int fsync_dir_of(const char *path)
{
	_cleanup_free_ char *dir = strdup(path);
	if (!dir)
		return -ENOMEM;
	char *slash = strrchr(dir, '/');
	if (slash == dir)
		slash[1] = 0;
	else
		*slash = 0;
	_cleanup_close_ int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0 || fsync(fd) < 0)
		return -errno;
	return 0;
}

int agent_file_write(Conn *c, const Ember__Guest__V1__FileWrite *req)
{
	_cleanup_(temp_file_done) TempFile t = {.fd = -EBADF};
	Ember__Guest__V1__FileWritten done = EMBER__GUEST__V1__FILE_WRITTEN__INIT;
	GuestFrame reply = EMBER__GUEST__V1__FRAME__INIT;
	const char *path = req->path;
	mode_t mode = req->has_mode ? (mode_t)(req->mode & 07777) : 0644;
	uint64_t size = 0;
	int r;

	if (path[0] != '/' || path[strlen(path) - 1] == '/')
		return fail_write(c, path, -EINVAL, "not an absolute file path", true);
	const char *base = strrchr(path, '/') + 1;
	/* Same directory, so that rename() is atomic; a dot name, so that directory listings
	 * and globs do not pick it up half-written. */
	if (asprintf(&t.path, "%.*s.%s.ember-XXXXXX", (int)(base - path), path, base) < 0) {
		t.path = NULL;
		return fail_write(c, path, -ENOMEM, "temporary name", true);
	}
	t.fd = mkostemp(t.path, O_CLOEXEC);
	if (t.fd < 0) {
		r = -errno;
		free(TAKE_PTR(t.path)); /* nothing to unlink */
		return fail_write(c, path, r, "create", true);
	}
	/* Owner before mode: chown clears set-id bits. */
	if (req->owner && fchown(t.fd, req->owner->uid, req->owner->gid) < 0)
		return fail_write(c, path, -errno, "chown", true);
	if (fchmod(t.fd, mode) < 0)
		return fail_write(c, path, -errno, "chmod", true);

	for (;;) {
		_cleanup_(guest_frame_freep) GuestFrame *f = NULL;
		r = guest_frame_recv(c->fd, &c->in, AGENT_SEND_TIMEOUT_MS, &f);
		if (r < 0)
			return r;
		if (f->kind_case == EMBER__GUEST__V1__FRAME__KIND_FILE_END)
			break;
		if (f->kind_case != EMBER__GUEST__V1__FRAME__KIND_FILE_DATA) {
			(void)conn_send_error(c, EPROTO, "write %s: expected file data, got %s",
					      path, guest_frame_kind_name(f));
			return -EPROTO;
		}
		r = write_full(t.fd, f->file_data->data.data, f->file_data->data.len);
		if (r < 0)
			return fail_write(c, path, r, "write", true);
		size += f->file_data->data.len;
	}
	/* Data on disk before the name points at it: after a crash the path holds the old
	 * file or the whole new one. */
	if (fsync(t.fd) < 0)
		return fail_write(c, path, -errno, "fsync", false);
	if (rename(t.path, path) < 0) {
		r = -errno;
		agent_log("write %s: rename: %s", path, strerror(-r));
		return conn_send_error(c, r, "write %s: rename: %s", path, strerror(-r));
	}
	free(TAKE_PTR(t.path));
	r = fsync_dir_of(path);
	if (r < 0)
		agent_log("write %s: fsync of the directory: %s", path, strerror(-r));
	agent_log("wrote %s: %llu bytes, mode %04o, owner %u:%u", path, (unsigned long long)size,
		  (unsigned)mode, req->owner ? req->owner->uid : 0,
		  req->owner ? req->owner->gid : 0);

	done.size = size;
	reply.kind_case = EMBER__GUEST__V1__FRAME__KIND_FILE_WRITTEN;
	reply.file_written = &done;
	return conn_send(c, &reply);
}

int agent_file_read(Conn *c, const Ember__Guest__V1__FileRead *req)
{
	Ember__Guest__V1__FileInfo info = EMBER__GUEST__V1__FILE_INFO__INIT;
	Ember__Guest__V1__Chunk chunk = EMBER__GUEST__V1__CHUNK__INIT;
	Ember__Guest__V1__FileEnd end = EMBER__GUEST__V1__FILE_END__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
	_cleanup_free_ uint8_t *buf = NULL;
	_cleanup_close_ int fd = -EBADF;
	const char *path = req->path;
	uint64_t size = 0;
	struct stat st;
	int r;

	if (path[0] != '/')
		return conn_send_error(c, EINVAL, "read %s: not an absolute path", path);
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0 || fstat(fd, &st) < 0) {
		r = -errno;
		return conn_send_error(c, r, "read %s: %s", path, strerror(-r));
	}
	/* A FIFO or device could stream forever; a directory is not a file. */
	if (!S_ISREG(st.st_mode))
		return conn_send_error(c, S_ISDIR(st.st_mode) ? EISDIR : EINVAL,
				       "read %s: not a regular file", path);
	info.size = (uint64_t)st.st_size;
	info.mode = st.st_mode & 07777;
	info.uid = st.st_uid;
	info.gid = st.st_gid;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_FILE_INFO;
	f.file_info = &info;
	r = conn_send(c, &f);
	if (r < 0)
		return r;

	buf = malloc(GUEST_CHUNK_MAX);
	if (!buf)
		return conn_send_error(c, ENOMEM, "read %s: out of memory", path);
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_FILE_DATA;
	f.file_data = &chunk;
	for (;;) {
		ssize_t n = read(fd, buf, GUEST_CHUNK_MAX);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			r = -errno;
			agent_log("read %s: %s", path, strerror(-r));
			return conn_send_error(c, r, "read %s: %s", path, strerror(-r));
		}
		if (n == 0)
			break;
		chunk.data.data = buf;
		chunk.data.len = (size_t)n;
		/* Blocking send: a slow host slows the reads down, nothing piles up here. */
		r = conn_send(c, &f);
		if (r < 0)
			return r;
		size += (uint64_t)n;
	}
	agent_log("read %s: %llu bytes", path, (unsigned long long)size);
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_FILE_END;
	f.file_end = &end;
	return conn_send(c, &f);
}
