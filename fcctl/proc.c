/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Facts about other processes from /proc, shared by the VMM's adoption (process.c) and
 * ember-uffd's peer check (uffd.c), which links without the rest of fcctl.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "fcctl-internal.h"

bool process_has_id(pid_t pid, const char *id)
{
	char path[64], buf[8192];
	ssize_t len;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/cmdline", (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	len = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (len <= 0)
		return false;
	buf[len] = 0;
	/* `--id <id>` as ember passes it, `--id=<id>` as the jailer does. */
	for (char *p = buf; p < buf + len; p += strlen(p) + 1) {
		if (strcmp(p, "--id") == 0 && p + strlen(p) + 1 < buf + len &&
		    strcmp(p + strlen(p) + 1, id) == 0)
			return true;
		if (strncmp(p, "--id=", 5) == 0 && strcmp(p + 5, id) == 0)
			return true;
	}
	return false;
}
