/* SPDX-License-Identifier: Apache-2.0 */
/*
 * guest-helper: a static program for the fcsim test guests (busybox has no unix-socket tools).
 *
 *   guest-helper serve [VSOCK_PORT] [TCP_PORT]
 *       echo on /run/vsock/<VSOCK_PORT>.sock (host-initiated vsock under fcsim) and on TCP
 *       TCP_PORT; a line "POWEROFF" on the vsock ends the program (and so the guest's init).
 *       Prints "guest-helper: ready" on stdout (the console) once listening.
 *   guest-helper call PORT MESSAGE
 *       guest-initiated vsock: connect to @fcsim-vsock, "CONNECT PORT", send MESSAGE, print
 *       the reply.
 */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static int unix_listen(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	unlink(path);
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 16) < 0)
		return -1;
	return fd;
}

static int tcp_listen(int port)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 16) < 0)
		return -1;
	return fd;
}

/* Echoes one connection; returns 1 when it asked to power off. */
static int echo(int c)
{
	char buf[65536];
	ssize_t n;
	int off = 0;

	while ((n = read(c, buf, sizeof(buf))) > 0) {
		if (n >= 8 && memcmp(buf, "POWEROFF", 8) == 0)
			off = 1;
		for (ssize_t d = 0; d < n;) {
			ssize_t w = write(c, buf + d, (size_t)(n - d));
			if (w <= 0)
				goto out;
			d += w;
		}
		if (off)
			break;
	}
out:
	close(c);
	return off;
}

static int serve(int vport, int tport)
{
	char path[64];
	struct pollfd p[2];
	int n = 0;

	mkdir("/run/vsock", 0755);
	snprintf(path, sizeof(path), "/run/vsock/%d.sock", vport);
	p[n].fd = unix_listen(path);
	p[n++].events = POLLIN;
	if (p[0].fd < 0) {
		perror("guest-helper: vsock listen");
		return 1;
	}
	if (tport > 0) {
		p[n].fd = tcp_listen(tport);
		p[n++].events = POLLIN;
	}
	printf("guest-helper: ready\n");
	fflush(stdout);
	for (;;) {
		if (poll(p, (nfds_t)n, -1) < 0)
			continue;
		for (int i = 0; i < n; i++)
			if (p[i].revents & POLLIN) {
				int c = accept(p[i].fd, NULL, NULL);
				if (c >= 0 && echo(c) && i == 0) {
					printf("guest-helper: poweroff\n");
					return 0;
				}
			}
	}
}

static int call(int port, const char *msg)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	const char *name = "fcsim-vsock";
	char line[64], buf[4096];
	ssize_t n;
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);

	memcpy(sa.sun_path + 1, name, strlen(name));
	if (connect(fd, (struct sockaddr *)&sa,
		    (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + strlen(name))) < 0) {
		perror("guest-helper: connect");
		return 1;
	}
	snprintf(line, sizeof(line), "CONNECT %d\n", port);
	if (write(fd, line, strlen(line)) < 0 || write(fd, msg, strlen(msg)) < 0)
		return 1;
	shutdown(fd, SHUT_WR);
	while ((n = read(fd, buf, sizeof(buf))) > 0)
		fwrite(buf, 1, (size_t)n, stdout);
	return 0;
}

int main(int argc, char *argv[])
{
	if (argc >= 2 && strcmp(argv[1], "serve") == 0)
		return serve(argc > 2 ? atoi(argv[2]) : 1024, argc > 3 ? atoi(argv[3]) : 7);
	if (argc == 4 && strcmp(argv[1], "call") == 0)
		return call(atoi(argv[2]), argv[3]);
	fprintf(stderr, "usage: guest-helper serve [VSOCK_PORT] [TCP_PORT] | call PORT MSG\n");
	return 2;
}
