/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Links, addresses and routes over rtnetlink (libnl-route-3). A socket belongs to the
 * namespace of the thread that opened it: open one after netns_enter() to work inside a slot.
 */
#include <arpa/inet.h>
#include <net/if.h>
#include <netlink/errno.h>
#include <netlink/netlink.h>
#include <netlink/route/addr.h>
#include <netlink/route/link.h>
#include <netlink/route/link/veth.h>
#include <netlink/route/route.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/macro.h"
#include "netns-internal.h"

struct NlSock {
	struct nl_sock *sk;
};

int netns_nlsock_errno(int nle)
{
	switch (nle < 0 ? -nle : nle) {
	case 0:
		return 0;
	case NLE_EXIST:
		return -EEXIST;
	case NLE_OBJ_NOTFOUND:
		return -ENOENT;
	case NLE_NODEV:
		return -ENODEV;
	case NLE_PERM:
		return -EPERM;
	case NLE_NOMEM:
		return -ENOMEM;
	case NLE_BUSY:
		return -EBUSY;
	case NLE_INVAL:
		return -EINVAL;
	case NLE_RANGE:
		return -ERANGE;
	case NLE_NOADDR:
		return -EADDRNOTAVAIL;
	default:
		return -EIO;
	}
}

const char *netns_nlsock_message(int nle)
{
	return nl_geterror(nle);
}

int netns_nlsock_open(NlSock **ret)
{
	NlSock *s = calloc(1, sizeof(*s));
	int r;

	if (!s)
		return -ENOMEM;
	s->sk = nl_socket_alloc();
	if (!s->sk) {
		free(s);
		return -ENOMEM;
	}
	r = nl_connect(s->sk, NETLINK_ROUTE);
	if (r < 0) {
		nl_socket_free(s->sk);
		free(s);
		return netns_nlsock_errno(r);
	}
	*ret = s;
	return 0;
}

void netns_nlsock_close(NlSock *s)
{
	if (!s)
		return;
	nl_socket_free(s->sk);
	free(s);
}

static void linkp(struct rtnl_link **l)
{
	if (*l)
		rtnl_link_put(*l);
}

static void nl_addrp(struct nl_addr **a)
{
	if (*a)
		nl_addr_put(*a);
}

static int ifindex_of(NlSock *s, const char *name, int *ret)
{
	_cleanup_(linkp) struct rtnl_link *l = NULL;
	int r = rtnl_link_get_kernel(s->sk, 0, name, &l);
	if (r < 0)
		return netns_nlsock_errno(r);
	*ret = rtnl_link_get_ifindex(l);
	return 0;
}

int netns_link_up(NlSock *s, const char *name, char **ret_error)
{
	_cleanup_(linkp) struct rtnl_link *l = NULL, *change = NULL;
	int r;

	r = rtnl_link_get_kernel(s->sk, 0, name, &l);
	if (r < 0)
		return error_set(ret_error, netns_nlsock_errno(r), "link %s: %s", name,
				 netns_nlsock_message(r));
	change = rtnl_link_alloc();
	if (!change)
		return -ENOMEM;
	rtnl_link_set_flags(change, IFF_UP);
	r = rtnl_link_change(s->sk, l, change, 0);
	if (r < 0)
		return error_set(ret_error, netns_nlsock_errno(r), "cannot bring %s up: %s", name,
				 netns_nlsock_message(r));
	return 0;
}

int netns_link_delete(NlSock *s, const char *name)
{
	_cleanup_(linkp) struct rtnl_link *l = rtnl_link_alloc();
	int r;

	if (!l)
		return -ENOMEM;
	rtnl_link_set_name(l, name);
	r = rtnl_link_delete(s->sk, l);
	return r < 0 ? netns_nlsock_errno(r) : 0;
}

int netns_link_add_veth(NlSock *s, const char *host_name, const char *peer_name, int ns_fd,
			char **ret_error)
{
	struct rtnl_link *l, *peer;
	int r;

	l = rtnl_link_veth_alloc();
	if (!l)
		return -ENOMEM;
	peer = rtnl_link_veth_get_peer(l);
	rtnl_link_set_name(l, host_name);
	rtnl_link_set_name(peer, peer_name);
	/* The peer is born inside the slot: no window in which it sits in the host under a
	 * name that could clash. */
	rtnl_link_set_ns_fd(peer, ns_fd);
	r = rtnl_link_add(s->sk, l, NLM_F_CREATE | NLM_F_EXCL);
	rtnl_link_put(peer);
	rtnl_link_veth_release(l);
	if (r < 0)
		return error_set(ret_error, netns_nlsock_errno(r), "cannot create veth %s: %s",
				 host_name, netns_nlsock_message(r));
	return 0;
}

int netns_addr_add(NlSock *s, const char *link, const char *cidr, char **ret_error)
{
	_cleanup_(nl_addrp) struct nl_addr *local = NULL;
	struct rtnl_addr *a;
	int idx = 0, r;

	r = ifindex_of(s, link, &idx);
	if (r < 0)
		return error_set(ret_error, r, "link %s: %s", link, strerror(-r));
	r = nl_addr_parse(cidr, AF_INET, &local);
	if (r < 0)
		return error_set(ret_error, -EINVAL, "bad address %s", cidr);
	a = rtnl_addr_alloc();
	if (!a)
		return -ENOMEM;
	rtnl_addr_set_ifindex(a, idx);
	rtnl_addr_set_local(a, local);
	r = rtnl_addr_add(s->sk, a, 0);
	rtnl_addr_put(a);
	if (r < 0)
		return error_set(ret_error, netns_nlsock_errno(r), "cannot add %s to %s: %s", cidr,
				 link, netns_nlsock_message(r));
	return 0;
}

int netns_route_add(NlSock *s, const char *dst, const char *gateway, const char *link,
		    char **ret_error)
{
	_cleanup_(nl_addrp) struct nl_addr *d = NULL, *gw = NULL;
	struct rtnl_route *rt;
	struct rtnl_nexthop *nh;
	int idx = 0, r;

	r = ifindex_of(s, link, &idx);
	if (r < 0)
		return error_set(ret_error, r, "link %s: %s", link, strerror(-r));
	r = nl_addr_parse(strcmp(dst, "default") == 0 ? "0.0.0.0/0" : dst, AF_INET, &d);
	if (r < 0 || (gateway && nl_addr_parse(gateway, AF_INET, &gw) < 0))
		return error_set(ret_error, -EINVAL, "bad route %s via %s", dst, gateway ?: "-");
	rt = rtnl_route_alloc();
	nh = rtnl_route_nh_alloc();
	if (!rt || !nh) {
		if (rt)
			rtnl_route_put(rt);
		if (nh)
			rtnl_route_nh_free(nh);
		return -ENOMEM;
	}
	rtnl_route_set_family(rt, AF_INET);
	rtnl_route_set_dst(rt, d);
	rtnl_route_set_scope(rt, gateway ? RT_SCOPE_UNIVERSE : RT_SCOPE_LINK);
	rtnl_route_nh_set_ifindex(nh, idx);
	if (gw)
		rtnl_route_nh_set_gateway(nh, gw);
	rtnl_route_add_nexthop(rt, nh); /* the route owns nh from here */
	r = rtnl_route_add(s->sk, rt, NLM_F_CREATE | NLM_F_EXCL);
	rtnl_route_put(rt);
	if (r < 0)
		return error_set(ret_error, netns_nlsock_errno(r),
				 "cannot add route %s via %s dev %s: %s", dst, gateway ?: "-", link,
				 netns_nlsock_message(r));
	return 0;
}

void netns_strv_free(char **v)
{
	for (size_t i = 0; v && v[i]; i++)
		free(v[i]);
	free(v);
}

static int strv_push(char ***v, size_t *n, const char *s)
{
	char **nv = reallocarray(*v, *n + 2, sizeof(char *));
	if (!nv)
		return -ENOMEM;
	*v = nv;
	nv[*n] = strdup(s);
	if (!nv[*n])
		return -ENOMEM;
	nv[++*n] = NULL;
	return 0;
}

static void cachep(struct nl_cache **c)
{
	if (*c)
		nl_cache_free(*c);
}

int netns_link_list(NlSock *s, const char *prefix, char ***ret)
{
	_cleanup_(cachep) struct nl_cache *cache = NULL;
	char **out = NULL;
	size_t n = 0;
	int r;

	r = rtnl_link_alloc_cache(s->sk, AF_UNSPEC, &cache);
	if (r < 0)
		return netns_nlsock_errno(r);
	for (struct nl_object *o = nl_cache_get_first(cache); o; o = nl_cache_get_next(o)) {
		const char *name = rtnl_link_get_name((struct rtnl_link *)o);
		if (name && strncmp(name, prefix, strlen(prefix)) == 0 &&
		    (r = strv_push(&out, &n, name)) < 0) {
			netns_strv_free(out);
			return r;
		}
	}
	if (!out) { /* an empty list, still NULL-terminated */
		out = calloc(1, sizeof(char *));
		if (!out)
			return -ENOMEM;
	}
	*ret = out;
	return 0;
}

int netns_addr_list_ipv4(NlSock *s, char ***ret)
{
	_cleanup_(cachep) struct nl_cache *cache = NULL;
	char **out = NULL;
	size_t n = 0;
	int r;

	r = rtnl_addr_alloc_cache(s->sk, &cache);
	if (r < 0)
		return netns_nlsock_errno(r);
	for (struct nl_object *o = nl_cache_get_first(cache); o; o = nl_cache_get_next(o)) {
		struct rtnl_addr *a = (struct rtnl_addr *)o;
		struct nl_addr *local = rtnl_addr_get_local(a);
		char buf[INET_ADDRSTRLEN + 4];
		if (rtnl_addr_get_family(a) != AF_INET || !local ||
		    nl_addr_get_len(local) != sizeof(struct in_addr))
			continue;
		char ip[INET_ADDRSTRLEN];
		if (!inet_ntop(AF_INET, nl_addr_get_binary_addr(local), ip, sizeof(ip)))
			continue;
		snprintf(buf, sizeof(buf), "%s/32", ip);
		r = strv_push(&out, &n, buf);
		if (r < 0) {
			netns_strv_free(out);
			return r;
		}
	}
	if (!out) {
		out = calloc(1, sizeof(char *));
		if (!out)
			return -ENOMEM;
	}
	*ret = out;
	return 0;
}
