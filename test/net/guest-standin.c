/* SPDX-License-Identifier: Apache-2.0 */
/*
 * guest-standin SLOT_NETNS GUEST_NETNS [--echo PORT]
 *
 * Stands in for a microVM behind a network slot: makes a "guest" network namespace at
 * GUEST_NETNS with a TAP eth0 at 169.254.0.21/30 (default route via 169.254.0.22), opens the
 * slot's tap0, and relays Ethernet frames between the two, as a VMM does between its TAP and
 * the guest's NIC. With --echo, a TCP echo server listens on PORT inside the guest. Prints
 * READY when frames flow; SIGTERM ends it and removes the guest namespace.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/macro.h"
#include "netns/netns.h"

/* Set by the signal handler (lock-free atomics are async-signal-safe) and the echo thread. */
static _Atomic bool stop;
static _Atomic int echo_state; /* 0 starting, 1 listening, -1 failed */
static const char *guest_path;

static void on_signal(int sig)
{
	(void)sig;
	stop = true;
}

static void *echo_conn(void *arg)
{
	int fd = (int)(intptr_t)arg;
	char buf[65536];
	ssize_t n;

	while ((n = read(fd, buf, sizeof(buf))) > 0)
		for (ssize_t done = 0; done < n;) {
			ssize_t w = write(fd, buf + done, (size_t)(n - done));
			if (w <= 0)
				goto out;
			done += w;
		}
out:
	close(fd);
	return NULL;
}

static void *echo_server(void *arg)
{
	int port = (int)(intptr_t)arg, one = 1;
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	int saved = netns_enter(guest_path), ls;

	if (saved < 0) {
		fprintf(stderr, "echo: cannot enter %s: %s\n", guest_path, strerror(-saved));
		echo_state = -1;
		return NULL;
	}
	/* The socket belongs to the guest namespace; the thread may stay there. */
	ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(ls, 64) < 0) {
		fprintf(stderr, "echo: cannot listen on %d: %m\n", port);
		echo_state = -1;
		return NULL;
	}
	echo_state = 1;
	for (;;) {
		int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
		if (c < 0)
			continue;
		pthread_t t;
		if (pthread_create(&t, NULL, echo_conn, (void *)(intptr_t)c) == 0)
			pthread_detach(t);
		else
			close(c);
	}
	return NULL;
}

int main(int argc, char *argv[])
{
	_cleanup_close_ int guest_tap = -EBADF, slot_tap = -EBADF;
	char *err = NULL;
	int saved, r, port = 0;

	if (argc != 3 && !(argc == 5 && strcmp(argv[3], "--echo") == 0)) {
		fprintf(stderr, "usage: guest-standin SLOT_NETNS GUEST_NETNS [--echo PORT]\n");
		return 2;
	}
	if (argc == 5)
		port = atoi(argv[4]);
	guest_path = argv[2];
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);

	r = netns_create_at(guest_path);
	if (r < 0) {
		fprintf(stderr, "guest-standin: cannot create %s: %s\n", guest_path, strerror(-r));
		return 1;
	}
	saved = netns_enter(guest_path);
	if (saved < 0)
		goto fail;
	guest_tap = netns_tap_open(NETNS_SLOT_IF);
	r = guest_tap < 0
		    ? guest_tap
		    : netns_iface_setup(NETNS_SLOT_IF, NETNS_GUEST_IP "/30", NETNS_TAP_IP, &err);
	netns_leave(saved);
	if (r < 0) {
		fprintf(stderr, "guest-standin: guest setup: %s\n", err ?: strerror(-r));
		goto fail;
	}
	saved = netns_enter(argv[1]);
	if (saved < 0) {
		fprintf(stderr, "guest-standin: cannot enter %s: %s\n", argv[1], strerror(-saved));
		goto fail;
	}
	slot_tap = netns_tap_open(NETNS_TAP_NAME);
	netns_leave(saved);
	if (slot_tap < 0) {
		fprintf(stderr, "guest-standin: cannot open %s: %s\n", NETNS_TAP_NAME,
			strerror(-slot_tap));
		goto fail;
	}
	if (port > 0) {
		pthread_t t;
		pthread_create(&t, NULL, echo_server, (void *)(intptr_t)port);
		pthread_detach(t);
		while (echo_state == 0) /* the listener is up before READY */
			usleep(1000);
		if (echo_state < 0)
			goto fail;
	}
	printf("READY\n");
	fflush(stdout);
	r = netns_relay(guest_tap, slot_tap, &stop);
	netns_remove_at(guest_path);
	return stop ? 0 : (r < 0 ? 1 : 0);
fail:
	free(err);
	netns_remove_at(guest_path);
	return 1;
}
