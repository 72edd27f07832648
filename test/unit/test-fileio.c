/* SPDX-License-Identifier: Apache-2.0 */
/*
 * common/fileio: whole-file reads with a size cap, atomic replacement, mkdir -p, and the pid
 * lock file that keeps two emberd from sharing a state_dir.
 *
 * Everything happens in one mkdtemp directory; the group teardown removes it even when a test
 * failed half-way, so a red run leaves nothing behind in /tmp.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/fileio.h"
#include "common/macro.h"

static char tmpdir[] = "/tmp/ember-test-fileio.XXXXXX";

/* Path of `name` inside the test directory; caller frees. */
static char *tpath(const char *name)
{
	char *p;

	if (asprintf(&p, "%s/%s", tmpdir, name) < 0)
		return NULL;
	return p;
}

static void write_plain(const char *path, const void *data, size_t size)
{
	_cleanup_close_ int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	assert_true(fd >= 0);
	assert_int_equal(write(fd, data, size), (ssize_t)size);
}

/* Names in `dir` without "." and "..", as one string "a b c " (readdir order): directories
 * that should hold one known entry are compared exactly, and a failure shows what was left. */
static char *list_dir(const char *dir)
{
	DIR *d = opendir(dir);
	char *out = NULL;
	size_t n = 0;
	FILE *f;
	struct dirent *de;

	if (!d)
		return NULL;
	f = open_memstream(&out, &n);
	if (!f) {
		closedir(d);
		return NULL;
	}
	while ((de = readdir(d)))
		if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
			fprintf(f, "%s ", de->d_name);
	closedir(d);
	fclose(f);
	return out;
}

static int group_setup(void **state)
{
	(void)state;
	return mkdtemp(tmpdir) ? 0 : -1;
}

static int group_teardown(void **state)
{
	(void)state;
	return rm_rf(tmpdir) == 0 ? 0 : -1;
}

/* ---- read_full_file ---- */

static void test_read_content(void **state)
{
	_cleanup_free_ char *path = tpath("read-content"), *text = NULL;
	size_t size = 12345;
	/* An embedded NUL: the size, not strlen(), is what says how much was read. */
	static const char data[] = "hello\0world\n";
	(void)state;

	write_plain(path, data, sizeof(data) - 1);
	assert_int_equal(read_full_file(path, 4096, &text, &size), 0);
	assert_non_null(text);
	assert_int_equal(size, sizeof(data) - 1);
	assert_memory_equal(text, data, sizeof(data) - 1);
	assert_int_equal(text[size], 0);
}

static void test_read_size_optional(void **state)
{
	_cleanup_free_ char *path = tpath("read-nosize"), *text = NULL;
	(void)state;

	write_plain(path, "abc", 3);
	assert_int_equal(read_full_file(path, 100, &text, NULL), 0);
	assert_string_equal(text, "abc");
}

static void test_read_empty(void **state)
{
	_cleanup_free_ char *path = tpath("read-empty"), *text = NULL;
	size_t size = 99;
	(void)state;

	write_plain(path, "", 0);
	assert_int_equal(read_full_file(path, 4096, &text, &size), 0);
	assert_non_null(text);
	assert_int_equal(size, 0);
	assert_string_equal(text, "");
}

static void test_read_large(void **state)
{
	/* Bigger than the first buffer, so the growth path is taken more than once. */
	const size_t n = 100000;
	_cleanup_free_ char *path = tpath("read-large"), *data = malloc(n), *text = NULL;
	size_t size = 0;
	(void)state;

	assert_non_null(data);
	for (size_t i = 0; i < n; i++)
		data[i] = (char)('a' + i % 26);
	write_plain(path, data, n);
	assert_int_equal(read_full_file(path, 1 << 20, &text, &size), 0);
	assert_int_equal(size, n);
	assert_memory_equal(text, data, n);
	assert_int_equal(text[n], 0);
}

static void test_read_max_size(void **state)
{
	_cleanup_free_ char *path = tpath("read-max"), *text = NULL;
	size_t size = 0;
	static char untouched[] = "untouched";
	char *out = untouched;
	(void)state;

	write_plain(path, "0123456789", 10);

	/* Exactly at the limit is fine ... */
	assert_int_equal(read_full_file(path, 10, &text, &size), 0);
	assert_int_equal(size, 10);
	assert_string_equal(text, "0123456789");

	/* ... one byte over is not, and the output is left alone. */
	assert_int_equal(read_full_file(path, 9, &out, &size), -EFBIG);
	assert_ptr_equal(out, untouched);
	assert_int_equal(read_full_file(path, 0, &out, &size), -EFBIG);
	assert_ptr_equal(out, untouched);
}

static void test_read_max_size_large(void **state)
{
	/* The limit must hold past the first 4 KiB buffer too. */
	const size_t n = 5000;
	_cleanup_free_ char *path = tpath("read-max-large"), *data = malloc(n), *text = NULL;
	char *out = NULL;
	size_t size = 0;
	(void)state;

	assert_non_null(data);
	memset(data, 'x', n);
	write_plain(path, data, n);
	assert_int_equal(read_full_file(path, n - 1, &out, &size), -EFBIG);
	assert_null(out);
	assert_int_equal(read_full_file(path, n, &text, &size), 0);
	assert_int_equal(size, n);
}

static void test_read_empty_with_zero_max(void **state)
{
	_cleanup_free_ char *path = tpath("read-empty-zero"), *text = NULL;
	size_t size = 1;
	(void)state;

	write_plain(path, "", 0);
	assert_int_equal(read_full_file(path, 0, &text, &size), 0);
	assert_int_equal(size, 0);
	assert_string_equal(text, "");
}

static void test_read_missing(void **state)
{
	_cleanup_free_ char *path = tpath("does-not-exist");
	char *out = NULL;
	size_t size = 7;
	(void)state;

	assert_int_equal(read_full_file(path, 4096, &out, &size), -ENOENT);
	assert_null(out);
	assert_int_equal(size, 7);
}

static void test_read_directory(void **state)
{
	char *out = NULL;
	(void)state;

	assert_int_equal(read_full_file(tmpdir, 4096, &out, NULL), -EISDIR);
	assert_null(out);
}

/* ---- write_file_atomic ---- */

static void test_write_replaces(void **state)
{
	_cleanup_free_ char *dir = tpath("atomic"), *path = NULL, *text = NULL, *names = NULL;
	struct stat st;
	size_t size;
	(void)state;

	assert_int_equal(mkdir(dir, 0755), 0);
	assert_true(asprintf(&path, "%s/record", dir) >= 0);

	assert_int_equal(write_file_atomic(path, "first version, longer\n", 22, 0600), 0);
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_mode & 07777, 0600);

	/* Shorter content: a replace, not an overwrite in place, leaves no tail of the old. */
	assert_int_equal(write_file_atomic(path, "second\n", 7, 0644), 0);
	assert_int_equal(read_full_file(path, 4096, &text, &size), 0);
	assert_int_equal(size, 7);
	assert_string_equal(text, "second\n");
	assert_int_equal(stat(path, &st), 0);
	assert_true(S_ISREG(st.st_mode));
	assert_int_equal(st.st_mode & 07777, 0644);

	names = list_dir(dir);
	assert_non_null(names);
	assert_string_equal(names, "record ");
}

static void test_write_mode_ignores_umask(void **state)
{
	_cleanup_free_ char *path = tpath("atomic-umask");
	struct stat st;
	mode_t old = umask(0077);
	int r;
	(void)state;

	/* The mode asked for is the mode on disk; a restrictive umask must not narrow it. */
	r = write_file_atomic(path, "x", 1, 0644);
	umask(old);
	assert_int_equal(r, 0);
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_mode & 07777, 0644);
}

static void test_write_empty(void **state)
{
	_cleanup_free_ char *path = tpath("atomic-empty"), *text = NULL;
	size_t size = 1;
	(void)state;

	write_plain(path, "old", 3);
	assert_int_equal(write_file_atomic(path, "", 0, 0600), 0);
	assert_int_equal(read_full_file(path, 4096, &text, &size), 0);
	assert_int_equal(size, 0);
}

static void test_write_failure_leaves_nothing(void **state)
{
	_cleanup_free_ char *dir = tpath("atomic-fail"), *target = NULL, *names = NULL,
			    *missing = NULL;
	(void)state;

	assert_int_equal(mkdir(dir, 0755), 0);
	assert_true(asprintf(&target, "%s/busy", dir) >= 0);
	assert_int_equal(mkdir(target, 0755), 0);

	/* rename() onto a directory fails: the temporary file must be cleaned up. */
	assert_true(write_file_atomic(target, "data", 4, 0644) < 0);
	names = list_dir(dir);
	assert_non_null(names);
	assert_string_equal(names, "busy ");

	assert_true(asprintf(&missing, "%s/no/such/dir/file", dir) >= 0);
	assert_int_equal(write_file_atomic(missing, "data", 4, 0644), -ENOENT);
}

/* ---- rm_rf_at ---- */

/* Everything below goes, nothing a symbolic link points at does, the directory itself stays. */
static void test_rm_rf(void **state)
{
	_cleanup_free_ char *top = tpath("rm"), *deep = tpath("rm/a/b/c"), *keep = tpath("rm-keep"),
			    *file = tpath("rm/a/b/c/f"), *link = tpath("rm/a/l"),
			    *dlink = tpath("rm/dl"), *fifo = tpath("rm/a/fifo"),
			    *outside = tpath("rm-keep/x");
	_cleanup_close_ int fd = -EBADF;
	_cleanup_free_ char *names = NULL;
	struct stat st;
	(void)state;

	assert_int_equal(mkdir_p(deep, 0755), 0);
	assert_int_equal(mkdir_p(keep, 0755), 0);
	write_plain(file, "data", 4);
	write_plain(outside, "kept", 4);
	assert_int_equal(symlink(outside, link), 0);
	assert_int_equal(symlink(keep, dlink), 0);
	assert_int_equal(mkfifo(fifo, 0600), 0);

	fd = open(top, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	assert_true(fd >= 0);
	assert_int_equal(rm_rf_at(fd), 0);
	names = list_dir(top);
	assert_string_equal(names, "");
	assert_int_equal(stat(top, &st), 0);
	assert_int_equal(stat(outside, &st), 0);
	assert_int_equal(st.st_size, 4);
	/* empty: nothing to do */
	assert_int_equal(rm_rf_at(fd), 0);

	/* rm_rf: the directory itself goes too; a plain file; a path that is not there */
	assert_int_equal(mkdir_p(deep, 0755), 0);
	write_plain(file, "data", 4);
	assert_int_equal(rm_rf(top), 0);
	assert_int_equal(stat(top, &st), -1);
	assert_int_equal(errno, ENOENT);
	assert_int_equal(rm_rf(top), 0);
	assert_int_equal(rm_rf(outside), 0);
	assert_int_equal(lstat(outside, &st), -1);
	assert_int_equal(rm_rf(keep), 0);
}

/* ---- mkdir_p ---- */

static void test_mkdir_nested(void **state)
{
	_cleanup_free_ char *path = tpath("m1/m2/m3"), *deepest = NULL;
	struct stat st;
	mode_t old = umask(022);
	(void)state;

	assert_int_equal(mkdir_p(path, 0750), 0);
	assert_int_equal(stat(path, &st), 0);
	assert_true(S_ISDIR(st.st_mode));
	assert_int_equal(st.st_mode & 0777, 0750);

	/* Existing is fine, and an existing directory's mode is left alone. */
	assert_int_equal(mkdir_p(path, 0700), 0);
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0750);

	/* Trailing and doubled slashes are still the same directories. */
	assert_true(asprintf(&deepest, "%s/m1//m2/m3/m4/", tmpdir) >= 0);
	assert_int_equal(mkdir_p(deepest, 0755), 0);
	assert_int_equal(stat(deepest, &st), 0);
	assert_true(S_ISDIR(st.st_mode));
	umask(old);
}

static void test_mkdir_through_file(void **state)
{
	_cleanup_free_ char *file = tpath("plain-file"), *below = NULL;
	int r;
	(void)state;

	write_plain(file, "x", 1);
	assert_true(asprintf(&below, "%s/sub/dir", file) >= 0);
	r = mkdir_p(below, 0755);
	if (r != -ENOTDIR && r != -EEXIST)
		fail_msg("mkdir_p through a file: %d, expected -ENOTDIR or -EEXIST", r);

	/* The path itself being a file is an error too: "exists" must mean "is a directory". */
	r = mkdir_p(file, 0755);
	if (r != -ENOTDIR && r != -EEXIST)
		fail_msg("mkdir_p on a file: %d, expected -ENOTDIR or -EEXIST", r);
}

/* ---- lock_file_acquire ---- */

static void on_alarm(int sig)
{
	(void)sig;
}

/* A lock that blocked instead of failing would hang the suite: after 10 s SIGALRM interrupts
 * the flock (no SA_RESTART), which then fails with EINTR and the test fails normally. */
static void watchdog(unsigned seconds)
{
	struct sigaction sa = {.sa_handler = seconds ? on_alarm : SIG_DFL};

	assert_int_equal(sigaction(SIGALRM, &sa, NULL), 0);
	alarm(seconds);
}

static void test_lock_same_process(void **state)
{
	_cleanup_free_ char *path = tpath("self.lock"), *text = NULL;
	_cleanup_close_ int fd = -EBADF;
	pid_t holder = -1;
	int fd2;
	(void)state;

	fd = lock_file_acquire(path, NULL);
	assert_true(fd >= 0);
	assert_int_equal(read_full_file(path, 64, &text, NULL), 0);
	assert_int_equal(atoi(text), getpid());

	/* flock conflicts between open file descriptions even within one process. */
	watchdog(10);
	fd2 = lock_file_acquire(path, &holder);
	watchdog(0);
	if (fd2 >= 0)
		close(fd2);
	assert_int_equal(fd2, -EBUSY);
	assert_int_equal(holder, getpid());
}

static int read_int(int fd, int *ret)
{
	ssize_t k = read(fd, ret, sizeof(*ret));

	return k == (ssize_t)sizeof(*ret) ? 0 : -EIO;
}

static void write_int(int fd, int v)
{
	if (write(fd, &v, sizeof(v)) != (ssize_t)sizeof(v))
		_exit(100);
}

/* The child does not use cmocka (a failed assertion there would unwind into a copy of the
 * runner); it reports numbers back over a pipe and the parent asserts on them. */
static _noreturn_ void lock_child(const char *path, int lock_fd, int to_parent, int from_parent)
{
	pid_t holder = -1;
	int r, go;

	/* A lock that blocked instead of failing would hang the suite; dying closes the pipe,
	 * which the parent sees. */
	alarm(10);

	/* The inherited fd shares the parent's open file description, and with it the lock:
	 * keeping it would make the lock outlive the parent's close(). */
	close(lock_fd);

	r = lock_file_acquire(path, &holder);
	write_int(to_parent, r);
	write_int(to_parent, (int)holder);
	if (r >= 0)
		close(r);

	if (read_int(from_parent, &go) < 0)
		_exit(101);
	r = lock_file_acquire(path, NULL);
	write_int(to_parent, r);
	_exit(0);
}

static void test_lock_other_process(void **state)
{
	_cleanup_free_ char *path = tpath("other.lock");
	_cleanup_close_ int fd = -EBADF;
	int up[2], down[2], r = 0, holder = 0, r2 = 0, status, go = 1;
	pid_t pid;
	(void)state;

	fd = lock_file_acquire(path, NULL);
	assert_true(fd >= 0);
	assert_int_equal(pipe2(up, O_CLOEXEC), 0);
	assert_int_equal(pipe2(down, O_CLOEXEC), 0);

	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		close(up[0]);
		close(down[1]);
		lock_child(path, fd, up[1], down[0]);
	}
	close(up[1]);
	close(down[0]);

	assert_int_equal(read_int(up[0], &r), 0);
	assert_int_equal(read_int(up[0], &holder), 0);

	/* Release, then let the child try again. */
	fd = safe_close(fd);
	assert_int_equal(write(down[1], &go, sizeof(go)), (ssize_t)sizeof(go));
	assert_int_equal(read_int(up[0], &r2), 0);
	close(up[0]);
	close(down[1]);
	assert_int_equal(waitpid(pid, &status, 0), pid);

	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	assert_int_equal(r, -EBUSY);
	assert_int_equal(holder, (int)getpid());
	assert_true(r2 >= 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_read_content),
		cmocka_unit_test(test_read_size_optional),
		cmocka_unit_test(test_read_empty),
		cmocka_unit_test(test_read_large),
		cmocka_unit_test(test_read_max_size),
		cmocka_unit_test(test_read_max_size_large),
		cmocka_unit_test(test_read_empty_with_zero_max),
		cmocka_unit_test(test_read_missing),
		cmocka_unit_test(test_read_directory),
		cmocka_unit_test(test_write_replaces),
		cmocka_unit_test(test_write_mode_ignores_umask),
		cmocka_unit_test(test_write_empty),
		cmocka_unit_test(test_write_failure_leaves_nothing),
		cmocka_unit_test(test_rm_rf),
		cmocka_unit_test(test_mkdir_nested),
		cmocka_unit_test(test_mkdir_through_file),
		cmocka_unit_test(test_lock_same_process),
		cmocka_unit_test(test_lock_other_process),
	};

	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
