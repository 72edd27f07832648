/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ember-init's parts that are worth testing on their own: the kernel command line, the
 * kernel's ip= boot argument, and the network set-up done from it.
 */
#pragma once

#include <net/if.h>
#include <netinet/in.h>
#include <stdbool.h>

/* The kernel keeps a hostname of at most 64 bytes (__NEW_UTS_LEN). */
#define INIT_HOSTNAME_MAX 64

/* ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>:<ntp0>,
 * the syntax of the kernel's IP autoconfiguration (Documentation/admin-guide/nfs/
 * nfsroot.rst). ember uses ip=<client>::<gw>:<netmask>:<hostname>:<dev>:off. */
typedef struct InitIpConfig {
	struct in_addr client;  /* 0.0.0.0 when not given */
	struct in_addr gateway; /* 0.0.0.0 when not given */
	unsigned prefixlen;     /* from <netmask>, or the address's class as the kernel does */
	char hostname[INIT_HOSTNAME_MAX + 1]; /* "" when not given */
	char device[IFNAMSIZ];                /* "" when not given: the caller picks eth0 */
} InitIpConfig;

/* The value of the last `key=value` on a kernel command line, before any "--" (what follows
 * belongs to init's argv). Double quotes group a value with spaces and are removed, as the
 * kernel's parser does. 1 and *ret_value (to free) when found, 0 when not, -ENOMEM. */
int init_cmdline_get(const char *cmdline, const char *key, char **ret_value);

/* Parses the value of ip= (without "ip="). Returns 1 when it carries a static address to
 * configure, 0 when it does not (ip=off, ip=dhcp, an empty client field: hostname and device
 * are still filled when given), -EINVAL when a field is malformed. *ret is written on success
 * only. */
int init_ip_parse(const char *value, InitIpConfig *ret);

/* Netlink (libnl-route-3), in the caller's network namespace. */

/* Brings a link up. -ENODEV when there is no such link. */
int init_net_link_up(const char *ifname);

/* The first IPv4 address of a link as "a.b.c.d/len": 1 when there is one, 0 when the link has
 * none, -ENODEV when there is no such link. */
int init_net_ipv4_address(const char *ifname, char ret[INET_ADDRSTRLEN + 4]);

/* Link up, the address, and a default route through the gateway when there is one. An address
 * or route that is already there is fine. */
int init_net_configure(const char *ifname, const InitIpConfig *ip);
