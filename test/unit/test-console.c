/* SPDX-License-Identifier: Apache-2.0 */
/* agent/console.c's log file: a trim frees all but the last `keep` bytes' blocks and keeps
 * every offset; the kept part is found again; tails count lines as `tail -n` does; a read
 * never passes on a hole's zeros. On tmpfs (/dev/shm, what /run is) and on the file system of
 * /tmp. The manager calls console.c makes are stubbed. */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "agent/manager-internal.h"

void sandbox_wake_console_locked(Sandbox *sb)
{
	(void)sb;
}
void sandbox_ref_locked(Sandbox *sb)
{
	(void)sb;
}
void sandbox_unref_locked(Manager *m, Sandbox *sb)
{
	(void)m;
	(void)sb;
}

#define KEEP (64u << 10)

static int log_file(const char *dir)
{
	char p[64];

	snprintf(p, sizeof(p), "%s/ember-console-XXXXXX", dir);
	int fd = mkstemp(p);
	assert_true(fd >= 0);
	/* appended to, as the VMM's output is (and lseek(SEEK_DATA) moves no write) */
	assert_int_equal(fcntl(fd, F_SETFL, O_APPEND), 0);
	unlink(p);
	return fd;
}

/* "line 000000\n" ... : 12 bytes a line */
static void append_lines(int fd, unsigned from, unsigned n)
{
	char buf[16];

	for (unsigned i = from; i < from + n; i++) {
		snprintf(buf, sizeof(buf), "line %06u\n", i);
		assert_int_equal(write(fd, buf, 12), 12);
	}
}

static uint64_t held(int fd)
{
	struct stat st;

	assert_int_equal(fstat(fd, &st), 0);
	return (uint64_t)st.st_blocks * 512;
}

static uint64_t size_of(int fd)
{
	struct stat st;

	assert_int_equal(fstat(fd, &st), 0);
	return (uint64_t)st.st_size;
}

static void trim_on(const char *dir)
{
	int fd = log_file(dir);

	append_lines(fd, 0, 1000); /* 12,000 bytes: below the size, nothing to do */
	assert_int_equal(console_trim(fd, KEEP), 0);
	assert_int_equal(console_kept_start(fd, size_of(fd)), 0);

	append_lines(fd, 1000, 99000); /* 1.2 MB */
	uint64_t size = size_of(fd);
	assert_int_equal(size, 1200000);
	assert_int_equal(console_trim(fd, KEEP), 1);
	assert_int_equal(size_of(fd), size); /* offsets stay */
	uint64_t kept = console_kept_start(fd, size);
	assert_true(kept <= size - KEEP);
	assert_true(kept > size - KEEP - 8192);
	assert_true(held(fd) <= KEEP + KEEP / 8 + 8192);
	/* trimmed already: the next trim waits for an eighth more */
	assert_int_equal(console_trim(fd, KEEP), 0);
	append_lines(fd, 100000, 100); /* 1,200 bytes */
	assert_int_equal(console_trim(fd, KEEP), 0);
	append_lines(fd, 100100, KEEP / 8 / 12 + 400);
	assert_int_equal(console_trim(fd, KEEP), 1);
	assert_true(held(fd) <= KEEP + KEEP / 8 + 8192);

	/* what is kept reads back as the lines written, from a hole's edge on */
	size = size_of(fd);
	uint64_t pos = console_kept_start(fd, size), skipped = 1;
	char buf[4096];
	ssize_t n = console_read(fd, &pos, buf, sizeof(buf), &skipped);
	assert_int_equal(n, (ssize_t)sizeof(buf));
	assert_int_equal(skipped, 0);
	assert_null(memchr(buf, 0, (size_t)n));
	/* a reader left behind in the punched part skips to the data, and says how much */
	pos = 100;
	n = console_read(fd, &pos, buf, sizeof(buf), &skipped);
	assert_int_equal(n, -EAGAIN);
	assert_int_equal(pos, console_kept_start(fd, size));
	assert_int_equal(skipped, pos - 100);
	/* one whose read ends in the data: the hole's part is cut off the front */
	uint64_t data = pos;
	pos = data - 100;
	n = console_read(fd, &pos, buf, 1000, &skipped);
	assert_int_equal(n, 900);
	assert_int_equal(skipped, 100);
	assert_int_equal(pos, data + 900);
	assert_null(memchr(buf, 0, 900));
	char want[1000];
	assert_int_equal(pread(fd, want, 900, (off_t)data), 900);
	assert_memory_equal(buf, want, 900);
	/* at the end: 0 */
	pos = size;
	assert_int_equal(console_read(fd, &pos, buf, sizeof(buf), &skipped), 0);
	close(fd);
}

static void test_trim_tmpfs(void **state)
{
	(void)state;
	if (access("/dev/shm", W_OK) != 0)
		skip();
	trim_on("/dev/shm");
}

static void test_trim_tmp(void **state)
{
	(void)state;
	trim_on("/tmp");
}

static uint64_t tail(int fd, unsigned lines)
{
	return console_tail_start(fd, 0, size_of(fd), lines);
}

static void test_tail_lines(void **state)
{
	(void)state;
	int fd = log_file("/tmp");

	assert_int_equal(tail(fd, 3), 0); /* empty */
	append_lines(fd, 0, 1000);
	assert_int_equal(tail(fd, 0), 0);
	assert_int_equal(tail(fd, 1), 12000 - 12);
	assert_int_equal(tail(fd, 3), 12000 - 36);
	assert_int_equal(tail(fd, 1000), 0);
	assert_int_equal(tail(fd, 5000), 0);
	/* across the 4 KiB blocks it reads backwards in */
	assert_int_equal(tail(fd, 500), 6000);
	/* a last line without its newline counts as one */
	assert_int_equal(write(fd, "partial", 7), 7);
	assert_int_equal(tail(fd, 1), 12000);
	assert_int_equal(tail(fd, 2), 12000 - 12);
	/* never before `from` */
	assert_int_equal(console_tail_start(fd, 6006, size_of(fd), 900), 6006);
	/* empty lines are lines */
	assert_int_equal(write(fd, "\n\n\n", 3), 3);
	assert_int_equal(tail(fd, 1), 12000 + 9);
	assert_int_equal(tail(fd, 2), 12000 + 8);
	assert_int_equal(tail(fd, 3), 12000);
	close(fd);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_trim_tmpfs),
		cmocka_unit_test(test_trim_tmp),
		cmocka_unit_test(test_tail_lines),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
