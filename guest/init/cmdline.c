/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The kernel command line and its ip= argument. Pure string work, no system calls, so that the
 * unit tests run it as it runs in PID 1.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/macro.h"
#include "init.h"

int init_cmdline_get(const char *cmdline, const char *key, char **ret_value)
{
	_cleanup_free_ char *found = NULL;
	size_t klen = strlen(key);
	const char *p = cmdline;

	while (*p) {
		_cleanup_free_ char *word = NULL;
		const char *start;
		bool in_quote = false;
		size_t n = 0;

		while (isspace((unsigned char)*p))
			p++;
		if (!*p)
			break;
		start = p;
		while (*p && (in_quote || !isspace((unsigned char)*p))) {
			if (*p == '"')
				in_quote = !in_quote;
			p++;
		}
		/* The kernel hands everything after "--" to init as arguments: not kernel
		 * parameters, even when they look like one. */
		if (p - start == 2 && start[0] == '-' && start[1] == '-')
			break;
		word = malloc((size_t)(p - start) + 1);
		if (!word)
			return -ENOMEM;
		for (const char *q = start; q < p; q++)
			if (*q != '"')
				word[n++] = *q;
		word[n] = 0;
		if (n > klen && strncmp(word, key, klen) == 0 && word[klen] == '=') {
			/* The last one wins, as for the kernel's own parameters (init=, root=). */
			free(found);
			found = strdup(word + klen + 1);
			if (!found)
				return -ENOMEM;
		}
	}
	if (!found)
		return 0;
	*ret_value = TAKE_PTR(found);
	return 1;
}

static int parse_ipv4(const char *s, struct in_addr *ret)
{
	struct in_addr a;

	if (!*s) {
		ret->s_addr = INADDR_ANY;
		return 0;
	}
	if (inet_pton(AF_INET, s, &a) != 1)
		return -EINVAL;
	*ret = a;
	return 0;
}

static int netmask_to_prefixlen(const char *s, unsigned *ret)
{
	struct in_addr a;
	uint32_t m;
	unsigned bits = 0;

	if (inet_pton(AF_INET, s, &a) != 1)
		return -EINVAL;
	m = ntohl(a.s_addr);
	while (m & 0x80000000u) {
		bits++;
		m <<= 1;
	}
	/* A mask with holes, or no mask at all, is a typo, not a network. */
	if (m != 0 || bits == 0)
		return -EINVAL;
	*ret = bits;
	return 0;
}

/* Without <netmask> the kernel guesses from the address class (ic_defaults() in
 * net/ipv4/ipconfig.c): do the same, so the guest gets the network it would get with
 * CONFIG_IP_PNP. */
static int classful_prefixlen(struct in_addr a, unsigned *ret)
{
	uint32_t h = ntohl(a.s_addr);

	if ((h & 0x80000000u) == 0)
		*ret = 8;
	else if ((h & 0xc0000000u) == 0x80000000u)
		*ret = 16;
	else if ((h & 0xe0000000u) == 0xc0000000u)
		*ret = 24;
	else
		return -EINVAL;
	return 0;
}

/* Printable, no spaces, and fits: a name the kernel would truncate is refused rather than
 * silently changed. */
/* With truncate, a word too long for buf is cut, as the kernel cuts a hostname to fit
 * (ipconfig's strscpy into utsname): losing the network over a long name would be worse. */
static int copy_word(const char *s, char *buf, size_t size, bool truncate)
{
	size_t len = strlen(s);

	if (len >= size) {
		if (!truncate)
			return -EINVAL;
		len = size - 1;
	}
	for (size_t i = 0; i < len; i++)
		if (!isgraph((unsigned char)s[i]))
			return -EINVAL;
	memcpy(buf, s, len);
	buf[len] = 0;
	return 0;
}

int init_ip_parse(const char *value, InitIpConfig *ret)
{
	static const char *const protocols[] = {"off",  "none",  "on",   "any",
						"dhcp", "bootp", "rarp", "both"};
	_cleanup_free_ char *copy = NULL;
	InitIpConfig c = {};
	char *fields[10] = {};
	size_t n = 0;
	int r;

	/* A single word that names a protocol is the kernel's short form (ip=dhcp, ip=off).
	 * Anything else without a colon is a client address alone, as the kernel reads it. */
	if (!strchr(value, ':'))
		for (size_t i = 0; i < ELEMENTSOF(protocols); i++)
			if (strcmp(value, protocols[i]) == 0) {
				*ret = c;
				return 0;
			}

	copy = strdup(value);
	if (!copy)
		return -ENOMEM;
	for (char *p = copy; p && n < ELEMENTSOF(fields);) {
		fields[n++] = p;
		p = strchr(p, ':');
		if (p)
			*p++ = 0;
	}
	for (size_t i = n; i < ELEMENTSOF(fields); i++)
		fields[i] = (char *)"";

	r = parse_ipv4(fields[0], &c.client);
	if (r < 0)
		return r;
	/* fields[1] is the NFS server: nothing for us. */
	r = parse_ipv4(fields[2], &c.gateway);
	if (r < 0)
		return r;
	if (fields[3][0])
		r = netmask_to_prefixlen(fields[3], &c.prefixlen);
	else if (c.client.s_addr != INADDR_ANY)
		r = classful_prefixlen(c.client, &c.prefixlen);
	if (r < 0)
		return r;

	r = copy_word(fields[4], c.hostname, sizeof(c.hostname), true);
	if (r < 0)
		return r;
	/* A '/' would make the name a path under /proc/sys/net and /sys/class/net. */
	if (strchr(fields[5], '/'))
		return -EINVAL;
	r = copy_word(fields[5], c.device, sizeof(c.device), false);
	if (r < 0)
		return r;
	/* fields[6] (autoconf) names a protocol we cannot run from PID 1; with a client
	 * address the static fields are used whatever it says. DNS and NTP: not ours either. */

	*ret = c;
	return c.client.s_addr != INADDR_ANY;
}
