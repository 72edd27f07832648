/* SPDX-License-Identifier: Apache-2.0 */
/*
 * lo and eth0 over rtnetlink, with libnl-route-3 as everywhere else in ember (DESIGN.md §3).
 *
 * ember-init is static (the rootfs has no libc of ours), and libnl-3-dev/libnl-route-3-dev ship
 * static archives, so the project's library is used here too rather than raw rtnetlink or the
 * SIOCSIFADDR/SIOCADDRT ioctls. Linking them statically makes ld warn that getaddrinfo() and
 * getprotobyname() need glibc's NSS modules at run time: those are reached only through
 * libnl's name lookups (nl_addr_info(), nl_str2ip_proto()), which nothing here calls.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netlink/errno.h>
#include <netlink/netlink.h>
#include <netlink/route/addr.h>
#include <netlink/route/link.h>
#include <netlink/route/route.h>
#include <stdio.h>
#include <string.h>

#include "common/macro.h"
#include "init.h"

static int nl_to_errno(int nle)
{
	switch (nle < 0 ? -nle : nle) {
	case 0:
		return 0;
	case NLE_EXIST:
		return -EEXIST;
	case NLE_NODEV:
	case NLE_OBJ_NOTFOUND:
		return -ENODEV;
	case NLE_PERM:
		return -EPERM;
	case NLE_NOMEM:
		return -ENOMEM;
	case NLE_INVAL:
		return -EINVAL;
	case NLE_NOADDR:
		return -EADDRNOTAVAIL;
	case NLE_BUSY:
		return -EBUSY;
	case NLE_RANGE:
		return -ERANGE;
	default:
		return -EIO;
	}
}

DEFINE_POINTER_CLEANUP(struct nl_sock, nl_socket_free)
DEFINE_POINTER_CLEANUP(struct rtnl_link, rtnl_link_put)
DEFINE_POINTER_CLEANUP(struct rtnl_addr, rtnl_addr_put)
DEFINE_POINTER_CLEANUP(struct rtnl_route, rtnl_route_put)
DEFINE_POINTER_CLEANUP(struct nl_addr, nl_addr_put)
DEFINE_POINTER_CLEANUP(struct nl_cache, nl_cache_free)

static int nl_open(struct nl_sock **ret)
{
	_cleanup_(nl_socket_freep) struct nl_sock *sk = nl_socket_alloc();
	int r;

	if (!sk)
		return -ENOMEM;
	r = nl_connect(sk, NETLINK_ROUTE);
	if (r < 0)
		return nl_to_errno(r);
	*ret = TAKE_PTR(sk);
	return 0;
}

static int link_get(struct nl_sock *sk, const char *ifname, struct rtnl_link **ret)
{
	int r = rtnl_link_get_kernel(sk, 0, ifname, ret);
	return r < 0 ? nl_to_errno(r) : 0;
}

static int link_up(struct nl_sock *sk, const char *ifname)
{
	_cleanup_(rtnl_link_putp) struct rtnl_link *l = NULL, *change = NULL;
	int r;

	r = link_get(sk, ifname, &l);
	if (r < 0)
		return r;
	if (rtnl_link_get_flags(l) & IFF_UP)
		return 0;
	change = rtnl_link_alloc();
	if (!change)
		return -ENOMEM;
	rtnl_link_set_flags(change, IFF_UP);
	r = rtnl_link_change(sk, l, change, 0);
	return r < 0 ? nl_to_errno(r) : 0;
}

/* A netlink socket and the index of ifname, where configuring an interface starts. */
static int nl_open_link(const char *ifname, struct nl_sock **ret_sk)
{
	_cleanup_(nl_socket_freep) struct nl_sock *sk = NULL;
	_cleanup_(rtnl_link_putp) struct rtnl_link *l = NULL;
	int r = nl_open(&sk);

	if (r < 0)
		return r;
	r = link_get(sk, ifname, &l);
	if (r < 0)
		return r;
	*ret_sk = TAKE_PTR(sk);
	return rtnl_link_get_ifindex(l);
}

int init_net_link_up(const char *ifname)
{
	_cleanup_(nl_socket_freep) struct nl_sock *sk = NULL;
	int r = nl_open(&sk);

	return r < 0 ? r : link_up(sk, ifname);
}

int init_net_ipv4_address(const char *ifname, char ret[INET_ADDRSTRLEN + 4])
{
	_cleanup_(nl_socket_freep) struct nl_sock *sk = NULL;
	_cleanup_(nl_cache_freep) struct nl_cache *cache = NULL;
	int ifindex = nl_open_link(ifname, &sk), r;

	if (ifindex < 0)
		return ifindex;
	r = rtnl_addr_alloc_cache(sk, &cache);
	if (r < 0)
		return nl_to_errno(r);
	for (struct nl_object *o = nl_cache_get_first(cache); o; o = nl_cache_get_next(o)) {
		struct rtnl_addr *a = (struct rtnl_addr *)o;
		struct nl_addr *local = rtnl_addr_get_local(a);
		char ip[INET_ADDRSTRLEN];

		if (rtnl_addr_get_ifindex(a) != ifindex || rtnl_addr_get_family(a) != AF_INET ||
		    !local || nl_addr_get_len(local) != sizeof(struct in_addr) ||
		    !inet_ntop(AF_INET, nl_addr_get_binary_addr(local), ip, sizeof(ip)))
			continue;
		snprintf(ret, INET_ADDRSTRLEN + 4, "%s/%d", ip, rtnl_addr_get_prefixlen(a));
		return 1;
	}
	return 0;
}

static int addr_add(struct nl_sock *sk, int ifindex, const InitIpConfig *ip)
{
	_cleanup_(rtnl_addr_putp) struct rtnl_addr *a = rtnl_addr_alloc();
	_cleanup_(nl_addr_putp) struct nl_addr *local = NULL, *brd = NULL;
	int r;

	if (!a)
		return -ENOMEM;
	local = nl_addr_build(AF_INET, &ip->client, sizeof(ip->client));
	if (!local)
		return -ENOMEM;
	nl_addr_set_prefixlen(local, (int)ip->prefixlen);
	rtnl_addr_set_ifindex(a, ifindex);
	r = rtnl_addr_set_local(a, local);
	if (r < 0)
		return nl_to_errno(r);
	/* What the kernel's ipconfig sets too; /31 and /32 have no broadcast address. */
	if (ip->prefixlen < 31) {
		struct in_addr b = {
			.s_addr = ip->client.s_addr | htonl(0xffffffffu >> ip->prefixlen),
		};
		brd = nl_addr_build(AF_INET, &b, sizeof(b));
		if (!brd)
			return -ENOMEM;
		r = rtnl_addr_set_broadcast(a, brd);
		if (r < 0)
			return nl_to_errno(r);
	}
	r = rtnl_addr_add(sk, a, 0);
	r = r < 0 ? nl_to_errno(r) : 0;
	return r == -EEXIST ? 0 : r;
}

static int default_route_add(struct nl_sock *sk, int ifindex, struct in_addr gateway)
{
	_cleanup_(rtnl_route_putp) struct rtnl_route *rt = rtnl_route_alloc();
	_cleanup_(nl_addr_putp) struct nl_addr *dst = NULL, *gw = NULL;
	struct rtnl_nexthop *nh;
	struct in_addr any = {.s_addr = INADDR_ANY};
	int r;

	if (!rt)
		return -ENOMEM;
	dst = nl_addr_build(AF_INET, &any, sizeof(any));
	gw = nl_addr_build(AF_INET, &gateway, sizeof(gateway));
	if (!dst || !gw)
		return -ENOMEM;
	nl_addr_set_prefixlen(dst, 0);
	nh = rtnl_route_nh_alloc();
	if (!nh)
		return -ENOMEM;
	rtnl_route_nh_set_ifindex(nh, ifindex);
	rtnl_route_nh_set_gateway(nh, gw);
	rtnl_route_add_nexthop(rt, nh); /* the route owns nh from here */
	rtnl_route_set_family(rt, AF_INET);
	r = rtnl_route_set_dst(rt, dst);
	if (r < 0)
		return nl_to_errno(r);
	rtnl_route_set_scope(rt, RT_SCOPE_UNIVERSE);
	/* RTPROT_BOOT: the protocol the kernel's ipconfig gives the same route. */
	rtnl_route_set_protocol(rt, RTPROT_BOOT);
	r = rtnl_route_add(sk, rt, NLM_F_CREATE | NLM_F_EXCL);
	r = r < 0 ? nl_to_errno(r) : 0;
	return r == -EEXIST ? 0 : r;
}

int init_net_configure(const char *ifname, const InitIpConfig *ip)
{
	_cleanup_(nl_socket_freep) struct nl_sock *sk = NULL;
	int ifindex = nl_open_link(ifname, &sk), r;

	if (ifindex < 0)
		return ifindex;
	/* The route last: the kernel takes a gateway only once the link is up and holds an
	 * address on the gateway's subnet (ENETUNREACH otherwise). */
	r = link_up(sk, ifname);
	if (r < 0)
		return r;
	r = addr_add(sk, ifindex, ip);
	if (r < 0)
		return r;
	if (ip->gateway.s_addr != INADDR_ANY)
		r = default_route_add(sk, ifindex, ip->gateway);
	return r;
}
