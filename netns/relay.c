/* SPDX-License-Identifier: Apache-2.0 */
/*
 * TAP devices and a frame relay between two of them: what a VMM does between the TAP it is
 * given (tap0 in a slot) and the NIC of its guest. The guest stand-in of the tests uses it,
 * and so does fcsim, where the "guest" is a container with a TAP of its own.
 */
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "common/macro.h"
#include "netns-internal.h"

int netns_tap_open(const char *name)
{
	_cleanup_close_ int fd = -EBADF;
	struct ifreq ifr = {};

	if (!name || strlen(name) >= IFNAMSIZ)
		return -EINVAL;
	fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	/* No packet-info header: frames as on the wire. An existing persistent device with the
	 * same name is attached to, as Firecracker does with host_dev_name. */
	ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
	strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
	if (ioctl(fd, TUNSETIFF, &ifr) < 0)
		return -errno;
	return TAKE_FD(fd);
}

int netns_tap_create(const char *name)
{
	/* Closed on return, before anything slower: a process another thread forks while
	 * the fd is open holds a copy of it until it execs, and while any copy is open the
	 * TAP is attached, so the VMM's open fails with EBUSY (seen once, 50 creates on 2
	 * busy CPUs, when the pool kept it open through the slot's nftables set-up). */
	_cleanup_close_ int fd = netns_tap_open(name);

	if (fd < 0)
		return fd;
	return ioctl(fd, TUNSETPERSIST, 1UL) < 0 ? -errno : 0;
}

/* Copies one frame; 0 on success or nothing to do, <0 when that side is gone. */
static int pass_one(int from, int to, char *buf, size_t size)
{
	ssize_t n = read(from, buf, size);
	if (n < 0)
		return errno == EAGAIN || errno == EINTR ? 0 : -errno;
	if (n == 0)
		return -EPIPE;
	/* A TAP takes whole frames; a full queue on the other side drops this one, as a
	 * congested link would. */
	if (write(to, buf, (size_t)n) < 0 && errno != EAGAIN && errno != ENOBUFS && errno != EIO)
		return -errno;
	return 0;
}

int netns_relay(int fd_a, int fd_b, _Atomic bool *stop)
{
	char buf[65536 + 64];
	struct pollfd p[2] = {{.fd = fd_a, .events = POLLIN}, {.fd = fd_b, .events = POLLIN}};

	while (!stop || !atomic_load(stop)) {
		int n = poll(p, 2, 200);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		for (int i = 0; i < 2; i++) {
			if (p[i].revents & (POLLERR | POLLHUP | POLLNVAL))
				return -EPIPE;
			if (p[i].revents & POLLIN) {
				int r = pass_one(p[i].fd, p[1 - i].fd, buf, sizeof(buf));
				if (r < 0)
					return r;
			}
		}
	}
	return 0;
}

static void nlsock_closep(NlSock **s)
{
	netns_nlsock_close(*s);
}

int netns_iface_setup(const char *ifname, const char *cidr, const char *gateway, char **ret_error)
{
	_cleanup_(nlsock_closep) NlSock *nl = NULL;
	int r;

	r = netns_nlsock_open(&nl);
	if (r < 0)
		return error_set(ret_error, r, "netlink: %s", strerror(-r));
	if ((r = netns_link_up(nl, "lo", ret_error)) < 0 ||
	    (r = netns_addr_add(nl, ifname, cidr, ret_error)) < 0 ||
	    (r = netns_link_up(nl, ifname, ret_error)) < 0)
		return r;
	if (gateway)
		return netns_route_add(nl, "default", gateway, ifname, ret_error);
	return 0;
}
