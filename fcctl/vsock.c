/* SPDX-License-Identifier: Apache-2.0 */
/* The host side of Firecracker's hybrid vsock: "CONNECT <port>\n" -> "OK <n>\n". */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "common/macro.h"
#include "fcctl-internal.h"

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int fail(char **ret_error, int r, const char *msg, const char *path, unsigned port)
{
	if (ret_error && asprintf(ret_error, "vsock %s port %u: %s", path, port, msg) < 0)
		*ret_error = NULL;
	return r;
}

int fcctl_vsock_dial(const char *uds_path, unsigned port, int timeout_ms, char **ret_error)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	_cleanup_close_ int fd = -EBADF;
	int64_t deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 5000);
	char line[64];
	size_t n = 0;

	if (!uds_path || strlen(uds_path) >= sizeof(sa.sun_path))
		return fail(ret_error, -ENAMETOOLONG, "path too long", uds_path ?: "", port);
	memcpy(sa.sun_path, uds_path, strlen(uds_path) + 1);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return fail(ret_error, -errno, strerror(errno), uds_path, port);
	int k = snprintf(line, sizeof(line), "CONNECT %u\n", port);
	if (write(fd, line, (size_t)k) != k)
		return fail(ret_error, negative_errno(), "cannot send CONNECT", uds_path, port);

	/* Byte by byte up to the newline: whatever follows belongs to the guest's stream. */
	while (n < sizeof(line) - 1) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		int64_t left = deadline - now_ms();
		if (left <= 0)
			return fail(ret_error, -ETIMEDOUT, "no answer to CONNECT", uds_path, port);
		int r = poll(&p, 1, (int)left);
		if (r < 0 && errno != EINTR)
			return -errno;
		if (r <= 0)
			continue;
		ssize_t got = read(fd, line + n, 1);
		if (got < 0 && (errno == EAGAIN || errno == EINTR))
			continue;
		if (got <= 0)
			/* Firecracker closes the connection when nothing listens on the port. */
			return fail(ret_error, -ECONNREFUSED,
				    "nothing listens on this port in the "
				    "guest",
				    uds_path, port);
		if (line[n] == '\n')
			break;
		n++;
	}
	line[n] = 0;
	if (strncmp(line, "OK ", 3) != 0)
		return fail(ret_error, -EPROTO, "unexpected answer to CONNECT", uds_path, port);
	/* Blocking from here: the caller decides about timeouts on the stream. */
	int flags = fcntl(fd, F_GETFL);
	if (flags >= 0)
		(void)fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
	return TAKE_FD(fd);
}
