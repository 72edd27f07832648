/* SPDX-License-Identifier: Apache-2.0 */
/*
 * storage/ on the host (no device-mapper here): status parsing, table building, usage against
 * `du -B1`, sparse copies, the file backend end to end, and loop devices (as root; every device
 * attached here auto-clears when its fd closes, so a failing test leaks none).
 */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/fileio.h"
#include "common/macro.h"
#include "storage/storage.h"

static char tmpdir[] = "/tmp/ember-storage-XXXXXX";

static int setup(void **state)
{
	(void)state;
	return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
	(void)state;
	return rm_rf(tmpdir) == 0 ? 0 : -1;
}

/* Paths stay valid for the next 64 calls: long enough for a test's specs. */
static char *path(const char *name)
{
	static char buf[64][512];
	static int i;
	char *p = buf[i++ % 64];
	snprintf(p, sizeof(buf[0]), "%s/%s", tmpdir, name);
	return p;
}

/* A file with data at the given MiB offsets and holes elsewhere. */
static void make_sparse(const char *p, off_t size, const int *data_mib, size_t n)
{
	int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	char block[4096];
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, size), 0);
	for (size_t i = 0; i < n; i++) {
		memset(block, 'a' + (int)i, sizeof(block));
		assert_int_equal(pwrite(fd, block, sizeof(block), (off_t)data_mib[i] << 20),
				 (ssize_t)sizeof(block));
	}
	close(fd);
}

static uint64_t du_bytes(const char *p)
{
	char cmd[600], out[64] = "";
	snprintf(cmd, sizeof(cmd), "du -s -B1 '%s'", p);
	FILE *f = popen(cmd, "r");
	assert_non_null(f);
	assert_non_null(fgets(out, sizeof(out), f));
	pclose(f);
	return strtoull(out, NULL, 10);
}

static bool files_equal(const char *a, const char *b)
{
	char cmd[1200];
	snprintf(cmd, sizeof(cmd), "cmp -s '%s' '%s'", a, b);
	return system(cmd) == 0;
}

static void test_status_parse(void **state)
{
	uint64_t used, total, meta;
	bool invalid, overflow;
	(void)state;

	assert_int_equal(storage_dm_snapshot_status_parse("16/2097152 16", &used, &total, &meta,
							  &invalid, &overflow),
			 0);
	assert_int_equal(used, 16);
	assert_int_equal(total, 2097152);
	assert_int_equal(meta, 16);
	assert_false(invalid);
	assert_false(overflow);

	assert_int_equal(storage_dm_snapshot_status_parse("Invalid", &used, &total, &meta, &invalid,
							  &overflow),
			 0);
	assert_true(invalid);
	assert_false(overflow);
	assert_int_equal(storage_dm_snapshot_status_parse("Overflow", &used, &total, &meta,
							  &invalid, &overflow),
			 0);
	assert_true(overflow);
	assert_false(invalid);
	assert_int_equal(storage_dm_snapshot_status_parse("Merge failed", &used, &total, &meta,
							  &invalid, &overflow),
			 0);
	assert_true(invalid);

	static const char *const bad[] = {"",        "16",      "16/",
					  "a/b c",   "16/32",   "16/32 8 extra",
					  "64/32 8", "-1/32 8", "invalid"};
	for (size_t i = 0; i < ELEMENTSOF(bad); i++)
		assert_int_equal(storage_dm_snapshot_status_parse(bad[i], &used, &total, &meta,
								  &invalid, &overflow),
				 -EBADMSG);
	assert_int_equal(
		storage_dm_snapshot_status_parse(NULL, &used, &total, &meta, &invalid, &overflow),
		-EINVAL);
}

static void test_table(void **state)
{
	char *t = NULL;
	(void)state;

	assert_int_equal(storage_dm_snapshot_table(131072, makedev(7, 0), makedev(7, 12), 8, &t),
			 0);
	assert_string_equal(t, "0 131072 snapshot 7:0 7:12 P 8");
	free(t);
	assert_int_equal(storage_dm_snapshot_table(1, makedev(259, 70000), makedev(7, 1), 16, &t),
			 0);
	assert_string_equal(t, "0 1 snapshot 259:70000 7:1 P 16");
	free(t);
	assert_int_equal(storage_dm_snapshot_table(0, makedev(7, 0), makedev(7, 1), 8, &t),
			 -EINVAL);
	assert_int_equal(storage_dm_snapshot_table(8, makedev(7, 0), makedev(7, 1), 0, &t),
			 -EINVAL);
	assert_int_equal(storage_dm_snapshot_table(8, makedev(7, 0), makedev(7, 1), 12, &t),
			 -EINVAL); /* chunk must be a power of two */
}

static void test_usage(void **state)
{
	static const int data[] = {0, 3, 17};
	uint64_t bytes;
	char dir[600];
	(void)state;

	snprintf(dir, sizeof(dir), "%s/tree", tmpdir);
	assert_int_equal(mkdir(dir, 0755), 0);
	assert_int_equal(mkdir(path("tree/sub"), 0755), 0);
	make_sparse(path("tree/sparse"), 64 << 20, data, ELEMENTSOF(data));
	make_sparse(path("tree/sub/dense"), 1 << 20, data, 1);
	/* A file hard-linked three times inside the tree counts once, as du counts it. */
	make_sparse(path("tree/linked"), 8 << 20, data, 3);
	assert_int_equal(link(path("tree/linked"), path("tree/sub/link1")), 0);
	assert_int_equal(link(path("tree/linked"), path("tree/sub/link2")), 0);
	assert_int_equal(symlink("/usr", path("tree/symlink")), 0);

	assert_int_equal(storage_usage_file(path("tree/sparse"), &bytes), 0);
	assert_int_equal(bytes, du_bytes(path("tree/sparse")));
	assert_true(bytes < (1 << 20)); /* 3 blocks, not 64 MiB */
	assert_int_equal(storage_usage_tree(dir, &bytes), 0);
	assert_int_equal(bytes, du_bytes(dir));
	assert_int_equal(storage_usage_file(path("nope"), &bytes), -ENOENT);
	assert_int_equal(storage_usage_tree(path("nope"), &bytes), -ENOENT);
}

static void test_copy_sparse(void **state)
{
	static const int data[] = {1, 9, 31};
	uint64_t src_bytes, dst_bytes;
	int r;
	(void)state;

	make_sparse(path("src.img"), 32 << 20, data, ELEMENTSOF(data));
	r = storage_copy_sparse(path("src.img"), path("dst.img"), true);
	assert_true(r == 0 || r == 1); /* 1 on filesystems that reflink */
	assert_true(files_equal(path("src.img"), path("dst.img")));
	assert_int_equal(storage_usage_file(path("src.img"), &src_bytes), 0);
	assert_int_equal(storage_usage_file(path("dst.img"), &dst_bytes), 0);
	assert_true(dst_bytes <= src_bytes + 65536); /* holes stayed holes */
	/* never replaces */
	assert_int_equal(storage_copy_sparse(path("src.img"), path("dst.img"), false), -EEXIST);
	/* the plain copy path, whatever the filesystem */
	assert_int_equal(storage_copy_sparse(path("src.img"), path("dst2.img"), false), 0);
	assert_true(files_equal(path("src.img"), path("dst2.img")));
	assert_int_equal(storage_copy_sparse(path("missing"), path("dst3.img"), false), -ENOENT);
	assert_int_equal(access(path("dst3.img"), F_OK), -1);
}

static void test_file_backend(void **state)
{
	static const int data[] = {0, 2};
	Storage *s = NULL;
	char *dev = NULL, *err = NULL;
	StorageDiskStatus st;
	uint64_t before;
	(void)state;

	make_sparse(path("base.img"), 16 << 20, data, ELEMENTSOF(data));
	assert_int_equal(storage_new(STORAGE_BACKEND_FILE, &s), 0);
	assert_int_equal(storage_get_backend(s), STORAGE_BACKEND_FILE);

	StorageDiskSpec spec = {"fb-1", path("base.img"), path("fb-1.img"), 8 << 20};
	assert_int_equal(storage_disk_create(s, &spec, &dev, &err), 0);
	assert_null(err);
	assert_string_equal(dev, path("fb-1.img"));
	free(dev);
	assert_true(files_equal(path("base.img"), path("fb-1.img")));
	/* creating over an existing disk is refused, and leaves it alone */
	assert_int_equal(storage_disk_create(s, &spec, &dev, &err), -EEXIST);
	assert_non_null(err);
	assert_non_null(strstr(err, "fb-1.img"));
	free(err);
	err = NULL;

	assert_int_equal(storage_disk_status(s, &spec, &st, &err), 0);
	assert_int_equal(st.size_bytes, 16 << 20);
	assert_int_equal(st.capacity_bytes, 8 << 20);
	assert_false(st.overflow);
	before = st.used_bytes;

	/* the sandbox writes 1 MiB: status grows, the base does not change */
	int fd = open(path("fb-1.img"), O_WRONLY | O_CLOEXEC);
	assert_true(fd >= 0);
	char mib[1 << 16];
	memset(mib, 'z', sizeof(mib));
	for (int i = 0; i < 16; i++)
		assert_int_equal(
			pwrite(fd, mib, sizeof(mib), (8 << 20) + (off_t)i * (off_t)sizeof(mib)),
			(ssize_t)sizeof(mib));
	fsync(fd);
	close(fd);
	assert_int_equal(storage_disk_status(s, &spec, &st, &err), 0);
	assert_true(st.used_bytes >= before + (1 << 20));
	assert_false(files_equal(path("base.img"), path("fb-1.img")));

	/* restore finds the same disk; remove leaves the file (it is the sandbox's state) */
	assert_int_equal(storage_disk_remove(s, &spec, &err), 0);
	assert_int_equal(storage_disk_restore(s, &spec, &dev, &err), 0);
	assert_string_equal(dev, path("fb-1.img"));
	free(dev);

	/* flatten: byte-equal, sparse */
	assert_int_equal(storage_disk_flatten(s, &spec, path("flat.img"), &err), 0);
	assert_true(files_equal(path("fb-1.img"), path("flat.img")));
	uint64_t flat;
	assert_int_equal(storage_usage_file(path("flat.img"), &flat), 0);
	assert_true(flat < (4 << 20));

	/* overflow is reported (not enforced) past the allowance */
	StorageDiskSpec small = spec;
	small.cow_size = 4096;
	assert_int_equal(storage_disk_status(s, &small, &st, &err), 0);
	assert_true(st.overflow);

	/* restore of a disk that does not exist */
	StorageDiskSpec gone = {"fb-2", path("base.img"), path("fb-2.img"), 0};
	assert_int_equal(storage_disk_restore(s, &gone, &dev, &err), -ENOENT);
	assert_non_null(strstr(err, "fb-2.img"));
	free(err);
	err = NULL;

	/* ids are checked */
	StorageDiskSpec bad = {"Bad_Id", path("base.img"), path("bad.img"), 0};
	assert_int_equal(storage_disk_create(s, &bad, &dev, &err), -EINVAL);
	free(err);
	storage_free(s);
}

static void test_flatten_file_content(void **state)
{
	char *err = NULL;
	uint64_t bytes;
	(void)state;

	/* A "device" that is a file with zero-filled (not sparse) regions: flatten makes holes
	 * of them. */
	int fd = open(path("dense.img"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	char buf[1 << 16];
	assert_true(fd >= 0);
	memset(buf, 0, sizeof(buf));
	for (int i = 0; i < 64; i++) /* 4 MiB of written zeros */
		assert_int_equal(write(fd, buf, sizeof(buf)), (ssize_t)sizeof(buf));
	memset(buf, 'x', 100);
	assert_int_equal(pwrite(fd, buf, 100, 1 << 20), 100);
	close(fd);
	assert_int_equal(storage_usage_file(path("dense.img"), &bytes), 0);
	assert_true(bytes >= (4 << 20));

	assert_int_equal(storage_flatten_image(path("dense.img"), path("dense-flat.img"), &err), 0);
	assert_true(files_equal(path("dense.img"), path("dense-flat.img")));
	assert_int_equal(storage_usage_file(path("dense-flat.img"), &bytes), 0);
	assert_true(bytes <= 8192);
	assert_int_equal(storage_flatten_image(path("dense.img"), path("dense-flat.img"), &err),
			 -EEXIST);
	free(err);
}

static void test_loop(void **state)
{
	static const int data[] = {0};
	char *dev = NULL, *found = NULL;
	int fd;
	(void)state;

	if (geteuid() != 0 || access("/dev/loop-control", W_OK) < 0) {
		skip();
		return;
	}
	make_sparse(path("loop.img"), 4 << 20, data, 1);
	fd = storage_loop_attach(path("loop.img"), STORAGE_LOOP_READ_ONLY, &dev);
	assert_true(fd >= 0);
	assert_int_equal(storage_loop_find(path("loop.img"), 1, &found), 0);
	assert_string_equal(found, dev);
	free(found);
	/* not found as read-write */
	assert_int_equal(storage_loop_find(path("loop.img"), 0, &found), -ENOENT);
	/* auto-clear: closing our fd detaches the device */
	close(fd);
	for (int i = 0; i < 100 && storage_loop_find(path("loop.img"), -1, &found) == 0; i++) {
		free(found);
		usleep(10000);
	}
	assert_int_equal(storage_loop_find(path("loop.img"), -1, &found), -ENOENT);
	free(dev);

	/* explicit detach of an unused device */
	fd = storage_loop_attach(path("loop.img"), 0, &dev);
	assert_true(fd >= 0);
	assert_int_equal(storage_loop_detach(dev), 0);
	close(fd);
	assert_int_equal(storage_loop_find(path("loop.img"), -1, &found), -ENOENT);
	free(dev);
	assert_int_equal(storage_loop_attach(path("missing.img"), 0, &dev), -ENOENT);

	/* the pre-5.8 path (LOOP_SET_FD + LOOP_SET_STATUS64): read-only from the fd's mode,
	 * auto-clear from the status */
	fd = storage_loop_attach(path("loop.img"), STORAGE_LOOP_READ_ONLY | STORAGE_LOOP_LEGACY,
				 &dev);
	assert_true(fd >= 0);
	assert_int_equal(storage_loop_find(path("loop.img"), 1, &found), 0);
	assert_string_equal(found, dev);
	free(found);
	close(fd);
	for (int i = 0; i < 100 && storage_loop_find(path("loop.img"), -1, &found) == 0; i++) {
		free(found);
		usleep(10000);
	}
	assert_int_equal(storage_loop_find(path("loop.img"), -1, &found), -ENOENT);
	free(dev);
}

static void test_backend_names(void **state)
{
	(void)state;
	assert_string_equal(storage_backend_to_string(STORAGE_BACKEND_DM), "dm");
	assert_string_equal(storage_backend_to_string(STORAGE_BACKEND_FILE), "file");
	assert_null(storage_backend_to_string(_STORAGE_BACKEND_MAX));
	assert_int_equal(storage_backend_from_string("dm"), STORAGE_BACKEND_DM);
	assert_int_equal(storage_backend_from_string("file"), STORAGE_BACKEND_FILE);
	assert_int_equal(storage_backend_from_string("zfs"), -EINVAL);
	/* this host has no device-mapper: the dm backend is refused clearly */
	if (access("/dev/mapper/control", F_OK) < 0) {
		Storage *s = NULL;
		assert_int_equal(storage_backend_detect(), STORAGE_BACKEND_FILE);
		assert_int_equal(storage_new(STORAGE_BACKEND_DM, &s), -ENODEV);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_status_parse), cmocka_unit_test(test_table),
		cmocka_unit_test(test_usage),        cmocka_unit_test(test_copy_sparse),
		cmocka_unit_test(test_file_backend), cmocka_unit_test(test_flatten_file_content),
		cmocka_unit_test(test_loop),         cmocka_unit_test(test_backend_names),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
