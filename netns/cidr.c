/* SPDX-License-Identifier: Apache-2.0 */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "netns-internal.h"

int netns_cidr_parse(const char *s, NetnsCidr *ret)
{
	char buf[INET_ADDRSTRLEN + 4];
	unsigned long prefix = 32;
	struct in_addr a;
	char *slash, *end;

	size_t len = s ? strlen(s) : 0;

	if (!s || len >= sizeof(buf))
		return -EINVAL;
	memcpy(buf, s, len + 1);
	slash = strchr(buf, '/');
	if (slash) {
		*slash = 0;
		if (slash[1] < '0' || slash[1] > '9')
			return -EINVAL;
		errno = 0;
		prefix = strtoul(slash + 1, &end, 10);
		if (errno || *end || prefix > 32)
			return -EINVAL;
	}
	/* inet_pton is strict: four decimal parts, no leading junk. */
	if (inet_pton(AF_INET, buf, &a) != 1)
		return -EINVAL;
	uint32_t mask = prefix == 0 ? 0 : htonl(~0u << (32 - prefix));
	if ((a.s_addr & ~mask) != 0)
		return -EINVAL; /* host bits set: "10.0.0.1/8" is a mistake, not a network */
	ret->addr = a;
	ret->prefix = (unsigned)prefix;
	return 0;
}

const char *netns_cidr_format(const NetnsCidr *c, char *buf, size_t size)
{
	char a[INET_ADDRSTRLEN];

	inet_ntop(AF_INET, &c->addr, a, sizeof(a));
	snprintf(buf, size, "%s/%u", a, c->prefix);
	return buf;
}
