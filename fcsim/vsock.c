/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Firecracker's hybrid vsock, over unix sockets:
 *
 * host -> guest: the host connects to uds_path and sends "CONNECT <port>\n"; fcsim connects to
 *   the guest's listener for that port, the unix socket /run/vsock/<port>.sock inside the guest
 *   root (what a guest agent under fcsim listens on when EMBER_SIM=1), answers
 *   "OK <host port>\n" and joins the two. Nothing listening: the connection is closed, as
 *   Firecracker closes it.
 * guest -> host: fcsim listens on the abstract unix socket "@fcsim-vsock" in the guest's network
 *   namespace; the guest connects there and sends "CONNECT <port>\n"; fcsim connects to
 *   <uds_path>_<port> (where host software listens, as with Firecracker), answers
 *   "OK <port>\n" and joins the two.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/macro.h"
#include "fcsim.h"
#include "netns/netns.h"

#define GUEST_LISTENER "fcsim-vsock" /* abstract: "\0fcsim-vsock" */

struct Vsock {
	Vm *vm;
	char *uds_path;
	int listen_fd, guest_fd;
	atomic_int guest; /* set once the guest runs; read by the host-side acceptor */
	pthread_t host_thread, guest_thread;
	bool host_running, guest_running;
	atomic_uint next_port;
};

/* A connection carries copies of what it needs: it may outlive the Vsock (vsock_stop() only
 * waits for the acceptors). */
typedef struct Conn {
	Vsock *v; /* acceptor prototype only */
	int fd;
	bool from_guest;
	pid_t guest;
	unsigned host_port;
	char uds_path[108];
} Conn;

/* Copies both ways until both sides are done; a side that ends its writing half-closes the
 * other, so request/response protocols that rely on EOF work. */
static void join(int a, int b)
{
	struct pollfd p[2] = {{.fd = a, .events = POLLIN}, {.fd = b, .events = POLLIN}};
	bool open_[2] = {true, true};
	char buf[65536];

	while (open_[0] || open_[1]) {
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		for (int i = 0; i < 2; i++) {
			if (!open_[i] || !(p[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			ssize_t n = read(p[i].fd, buf, sizeof(buf));
			if (n < 0 && (errno == EINTR || errno == EAGAIN))
				continue;
			if (n <= 0) {
				open_[i] = false;
				p[i].fd = -1;
				(void)shutdown(i == 0 ? b : a, SHUT_WR);
				if (n < 0)
					return;
				continue;
			}
			int to = i == 0 ? b : a;
			for (ssize_t done = 0; done < n;) {
				ssize_t w = write(to, buf + done, (size_t)(n - done));
				if (w < 0) {
					if (errno == EINTR)
						continue;
					return;
				}
				done += w;
			}
		}
	}
}

/* "CONNECT <port>\n", read byte by byte so that nothing after it is consumed. */
static int read_connect(int fd, unsigned *ret_port)
{
	char line[64];
	size_t n = 0;
	struct pollfd p = {.fd = fd, .events = POLLIN};

	while (n < sizeof(line) - 1) {
		if (poll(&p, 1, 5000) <= 0)
			return -ETIMEDOUT;
		if (read(fd, line + n, 1) != 1)
			return -EPIPE;
		if (line[n] == '\n')
			break;
		n++;
	}
	line[n] = 0;
	if (sscanf(line, "CONNECT %u", ret_port) != 1)
		return -EPROTO;
	return 0;
}

static int connect_unix(const char *path, bool abstract)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	socklen_t len;
	int fd;

	if (strlen(path) + 1 >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	if (abstract) {
		memcpy(sa.sun_path + 1, path, strlen(path));
		len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + strlen(path));
	} else {
		memcpy(sa.sun_path, path, strlen(path) + 1);
		len = sizeof(sa);
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, len) < 0) {
		int r = -errno;
		close(fd);
		return r;
	}
	return fd;
}

static void *conn_main(void *arg)
{
	Conn *c = arg;
	char target[4096], reply[32];
	unsigned port;
	int other = -1;

	prctl(PR_SET_NAME, "fc_vsock");
	if (read_connect(c->fd, &port) < 0)
		goto out;
	if (c->from_guest) {
		snprintf(target, sizeof(target), "%s_%u", c->uds_path, port);
		snprintf(reply, sizeof(reply), "OK %u\n", port);
	} else {
		/* The guest's listener, seen through its root (it lives in another mount
		 * namespace). */
		if (c->guest <= 0)
			goto out;
		snprintf(target, sizeof(target), "/proc/%d/root/run/vsock/%u.sock", (int)c->guest,
			 port);
		snprintf(reply, sizeof(reply), "OK %u\n", c->host_port);
	}
	other = connect_unix(target, false);
	if (other < 0) {
		FCLOG(FC_DEBUG, "vsock: nobody listens at %s: %s", target, strerror(-other));
		goto out;
	}
	if (write(c->fd, reply, strlen(reply)) != (ssize_t)strlen(reply))
		goto out;
	join(c->fd, other);
out:
	safe_close(other);
	close(c->fd);
	free(c);
	return NULL;
}

static void *accept_main(void *arg)
{
	Conn *proto = arg;
	Vsock *v = proto->v;
	int lfd = proto->from_guest ? v->guest_fd : v->listen_fd;
	bool from_guest = proto->from_guest;

	free(proto);
	prctl(PR_SET_NAME, from_guest ? "fc_vsock_g" : "fc_vsock_h");
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			break; /* shut down by vsock_stop() */
		}
		Conn *c = calloc(1, sizeof(*c));
		pthread_t t;
		if (!c) {
			close(fd);
			continue;
		}
		*c = (Conn){.fd = fd,
			    .from_guest = from_guest,
			    .guest = (pid_t)atomic_load(&v->guest),
			    .host_port = from_guest ? 0 : atomic_fetch_add(&v->next_port, 1)};
		snprintf(c->uds_path, sizeof(c->uds_path), "%s", v->uds_path);
		if (pthread_create(&t, NULL, conn_main, c) != 0) {
			close(fd);
			free(c);
			continue;
		}
		pthread_detach(t);
	}
	return NULL;
}

static int start_acceptor(Vsock *v, bool from_guest, pthread_t *t)
{
	Conn *proto = calloc(1, sizeof(*proto));
	if (!proto)
		return -ENOMEM;
	*proto = (Conn){.v = v, .from_guest = from_guest};
	int r = pthread_create(t, NULL, accept_main, proto);
	if (r != 0) {
		free(proto);
		return -r;
	}
	return 0;
}

int vsock_start(Vm *vm, const char *uds_path, Vsock **ret, char **ret_error)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	Vsock *v;
	int r;

	if (!uds_path || strlen(uds_path) >= sizeof(sa.sun_path)) {
		(void)!asprintf(ret_error, "the unix socket path is too long");
		return -ENAMETOOLONG;
	}
	v = calloc(1, sizeof(*v));
	if (!v)
		return -ENOMEM;
	v->vm = vm;
	v->guest_fd = -1;
	atomic_init(&v->next_port, 1073741824u);
	v->uds_path = strdup(uds_path);
	memcpy(sa.sun_path, uds_path, strlen(uds_path) + 1);
	v->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (!v->uds_path || v->listen_fd < 0) {
		r = -errno;
		goto fail;
	}
	/* Firecracker refuses a path that exists: bind() does the same. */
	if (bind(v->listen_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    listen(v->listen_fd, 128) < 0) {
		r = -errno;
		(void)!asprintf(ret_error,
				"Error binding to the host-side Unix socket: %s (os error %d)",
				strerror(errno), errno);
		goto fail;
	}
	r = start_acceptor(v, false, &v->host_thread);
	if (r < 0)
		goto fail;
	v->host_running = true;
	*ret = v;
	return 0;
fail:
	safe_close(v->listen_fd);
	free(v->uds_path);
	free(v);
	return r;
}

int vsock_attach_guest(Vsock *v, pid_t guest, char **ret_error)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	char ns[64];
	int saved, r = 0;

	atomic_store(&v->guest, (int)guest);
	snprintf(ns, sizeof(ns), "/proc/%d/ns/net", (int)guest);
	saved = netns_enter(ns);
	if (saved < 0)
		return saved;
	/* Abstract sockets belong to the network namespace the socket is made in. */
	memcpy(sa.sun_path + 1, GUEST_LISTENER, strlen(GUEST_LISTENER));
	v->guest_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (v->guest_fd < 0 ||
	    bind(v->guest_fd, (struct sockaddr *)&sa,
		 (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + strlen(GUEST_LISTENER))) <
		    0 ||
	    listen(v->guest_fd, 128) < 0)
		r = -errno;
	int k = netns_leave(saved);
	if (r < 0 || k < 0) {
		(void)!asprintf(ret_error, "cannot listen for the guest's vsock connections: %s",
				strerror(r < 0 ? -r : -k));
		return r < 0 ? r : k;
	}
	r = start_acceptor(v, true, &v->guest_thread);
	if (r < 0)
		return r;
	v->guest_running = true;
	return 0;
}

void vsock_stop(Vsock *v)
{
	if (!v)
		return;
	/* shutdown() wakes accept(); connections already joined live on until their ends go. */
	if (v->host_running) {
		shutdown(v->listen_fd, SHUT_RDWR);
		pthread_join(v->host_thread, NULL);
	}
	if (v->guest_running) {
		shutdown(v->guest_fd, SHUT_RDWR);
		pthread_join(v->guest_thread, NULL);
	}
	safe_close(v->listen_fd);
	safe_close(v->guest_fd);
	free(v->uds_path);
	free(v);
}
