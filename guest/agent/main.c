/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ember-guest: the guest agent. Runs inside the microVM (started by ember-init), listens on
 * AF_VSOCK port 1024, or on the unix socket /run/vsock/1024.sock under fcsim (EMBER_SIM=1),
 * where fcsim's hybrid vsock connects host connections to. One handler process per connection.
 *
 *   ember-guest [--vsock-port N | --unix PATH] [--version]
 */
#include <errno.h>
#include <getopt.h>
#include <linux/vm_sockets.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/lsan_interface.h>
#endif

bool agent_sim;

void agent_log(const char *format, ...)
{
	char line[1024];
	va_list ap;
	int n;

	n = snprintf(line, sizeof(line), "ember-guest[%d]: ", (int)getpid());
	va_start(ap, format);
	n += vsnprintf(line + n, sizeof(line) - (size_t)n - 1, format, ap);
	va_end(ap);
	if (n > (int)sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	/* One write per line: handlers log concurrently to the same console. */
	(void)!write(STDERR_FILENO, line, (size_t)n);
}

int64_t agent_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int listen_vsock(unsigned port)
{
	struct sockaddr_vm sa = {
		.svm_family = AF_VSOCK,
		.svm_cid = VMADDR_CID_ANY,
		.svm_port = port,
	};
	_cleanup_close_ int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -errno;
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 128) < 0)
		return -errno;
	return TAKE_FD(fd);
}

static int listen_unix(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	_cleanup_close_ int fd = -EBADF;
	char dir[sizeof(sa.sun_path)];

	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	memcpy(sa.sun_path, path, strlen(path) + 1);
	/* /run/vsock does not exist on a fresh tmpfs /run. */
	memcpy(dir, path, strlen(path) + 1);
	char *slash = strrchr(dir, '/');
	if (slash && slash != dir) {
		*slash = 0;
		if (mkdir(dir, 0755) < 0 && errno != EEXIST)
			return -errno;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	/* A socket file left by an earlier agent (killed, restarted by ember-init) would make
	 * bind() fail. */
	if (unlink(path) < 0 && errno != ENOENT)
		return -errno;
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 128) < 0)
		return -errno;
	(void)chmod(path, 0600);
	return TAKE_FD(fd);
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: ember-guest [--vsock-port N | --unix PATH] [--version]\n"
		"  listens on AF_VSOCK port %u, or on the unix socket %s when EMBER_SIM=1\n",
		GUEST_VSOCK_PORT, GUEST_SIM_SOCKET);
}

int main(int argc, char **argv)
{
	static const struct option options[] = {
		{"unix", required_argument, NULL, 'u'},
		{"vsock-port", required_argument, NULL, 'p'},
		{"version", no_argument, NULL, 'V'},
		{"help", no_argument, NULL, 'h'},
		{0},
	};
	const char *unix_path = NULL;
	unsigned port = GUEST_VSOCK_PORT;
	bool port_given = false;
	_cleanup_close_ int fd = -EBADF;
	const char *sim = getenv("EMBER_SIM");
	int c;

	while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0) {
		switch (c) {
		case 'u':
			unix_path = optarg;
			break;
		case 'p': {
			char *end;
			unsigned long v = strtoul(optarg, &end, 10);
			if (*end || end == optarg || v == 0 || v > UINT32_MAX) {
				fprintf(stderr, "ember-guest: bad port %s\n", optarg);
				return 2;
			}
			port = (unsigned)v;
			port_given = true;
			break;
		}
		case 'V':
			printf("ember-guest %s (protocol %u)\n", EMBER_VERSION,
			       GUEST_PROTOCOL_VERSION);
			return 0;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc || (unix_path && port_given)) {
		usage(stderr);
		return 2;
	}
	agent_sim = sim && strcmp(sim, "1") == 0;
	if (!unix_path && !port_given && agent_sim)
		unix_path = GUEST_SIM_SOCKET;

	/* A host that goes away must be an EPIPE on the socket, not the end of a handler. */
	signal(SIGPIPE, SIG_IGN);
	/* Handlers are never waited for: the kernel reaps them. Each handler undoes this for
	 * its own children (their exit status is the whole point there). */
	struct sigaction sa = {.sa_handler = SIG_DFL, .sa_flags = SA_NOCLDWAIT};
	sigaction(SIGCHLD, &sa, NULL);

	fd = unix_path ? listen_unix(unix_path) : listen_vsock(port);
	if (fd < 0) {
		agent_log("cannot listen on %s %s%u: %s", unix_path ? "unix" : "vsock port",
			  unix_path ?: "", unix_path ? 0 : port, strerror(-fd));
		return 1;
	}
	if (unix_path)
		agent_log("%s listening on unix %s%s", EMBER_VERSION, unix_path,
			  agent_sim ? " (fcsim)" : "");
	else
		agent_log("%s listening on vsock port %u", EMBER_VERSION, port);

	for (;;) {
		int conn = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
		if (conn < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			/* EMFILE, ENOMEM: wait for handlers to end instead of spinning. */
			agent_log("accept: %s", strerror(errno));
			usleep(100 * 1000);
			continue;
		}
		pid_t pid = fork();
		if (pid < 0) {
			agent_log("cannot fork a handler: %s", strerror(errno));
			close(conn);
			continue;
		}
		if (pid == 0) {
			close(fd);
			int status = agent_serve(conn);
#ifdef __SANITIZE_ADDRESS__
			/* _exit() skips LeakSanitizer's exit-time check: a handler's leaks
			 * would go unseen. */
			__lsan_do_leak_check();
#endif
			_exit(status);
		}
		close(conn);
	}
}
