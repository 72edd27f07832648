/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ember-init's reading of the kernel command line and of ip=: what it configures eth0 and the
 * hostname from when the kernel has not (guest/init/cmdline.c).
 */
#include <arpa/inet.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/macro.h"
#include "guest/init/init.h"

static const char *ntoa(struct in_addr a)
{
	static char buf[4][INET_ADDRSTRLEN];
	static unsigned i;
	char *b = buf[i++ % 4];

	return inet_ntop(AF_INET, &a, b, INET_ADDRSTRLEN);
}

static void test_cmdline_get(void **state)
{
	static const struct {
		const char *cmdline, *key, *value; /* value NULL: not found */
	} cases[] = {
		{"console=ttyS0 ip=1.2.3.4::1.2.3.1:255.255.255.0:h:eth0:off", "ip",
		 "1.2.3.4::1.2.3.1:255.255.255.0:h:eth0:off"},
		{"ip=a ip=b", "ip", "b"}, /* the last one wins */
		{"  ip=a\n", "ip", "a"},  /* /proc/cmdline ends with a newline */
		{"ipx=a xip=b", "ip", NULL},
		{"ip", "ip", NULL}, /* no '=': a flag, not a value */
		{"ip=", "ip", ""},  /* empty, but given */
		{"ember.guest=/sbin/g ember.guest2=x", "ember.guest", "/sbin/g"},
		{"a=\"x y\" b=1", "a", "x y"},
		{"\"a=x y\" b=1", "a", "x y"},
		{"root=/dev/vda -- ip=1.2.3.4", "ip", NULL}, /* after --: init's arguments */
		{"ip=1.2.3.4 --", "ip", "1.2.3.4"},
		{"--x=1", "--x", "1"},
		{"", "ip", NULL},
	};
	(void)state;

	for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
		_cleanup_free_ char *v = NULL;
		int r = init_cmdline_get(cases[i].cmdline, cases[i].key, &v);
		if (!cases[i].value) {
			if (r != 0)
				fail_msg("%s in \"%s\": want not found, got %d", cases[i].key,
					 cases[i].cmdline, r);
			continue;
		}
		if (r != 1 || strcmp(v, cases[i].value) != 0)
			fail_msg("%s in \"%s\": want \"%s\", got %d \"%s\"", cases[i].key,
				 cases[i].cmdline, cases[i].value, r, v ? v : "(null)");
	}
}

static void test_ip_ember(void **state)
{
	InitIpConfig c;
	(void)state;

	/* What ember passes: DESIGN.md §6, the guest is always 169.254.0.21/30. */
	assert_int_equal(
		init_ip_parse("169.254.0.21::169.254.0.22:255.255.255.252:sbx-1:eth0:off", &c), 1);
	assert_string_equal(ntoa(c.client), "169.254.0.21");
	assert_string_equal(ntoa(c.gateway), "169.254.0.22");
	assert_int_equal(c.prefixlen, 30);
	assert_string_equal(c.hostname, "sbx-1");
	assert_string_equal(c.device, "eth0");
}

static void test_ip_partial(void **state)
{
	InitIpConfig c;
	(void)state;

	/* no hostname, no device: the caller uses eth0 and keeps the hostname */
	assert_int_equal(init_ip_parse("169.254.0.21::169.254.0.22:255.255.255.252::eth0:off", &c),
			 1);
	assert_string_equal(c.hostname, "");
	assert_int_equal(init_ip_parse("10.1.2.3::10.0.0.1:255.0.0.0", &c), 1);
	assert_int_equal(c.prefixlen, 8);
	assert_string_equal(c.device, "");
	/* no gateway */
	assert_int_equal(init_ip_parse("192.168.7.2:::255.255.255.0::eth1:off", &c), 1);
	assert_int_equal(c.gateway.s_addr, INADDR_ANY);
	assert_string_equal(c.device, "eth1");
	/* a client address alone, without a colon, as the kernel reads it */
	assert_int_equal(init_ip_parse("192.168.7.2", &c), 1);
	assert_int_equal(c.prefixlen, 24);
	/* more fields than ember uses: DNS and NTP servers are ignored */
	assert_int_equal(
		init_ip_parse("10.0.0.2::10.0.0.1:255.255.255.0:h:eth0:off:1.1.1.1:8.8.8.8:9.9.9.9",
			      &c),
		1);
	assert_string_equal(c.hostname, "h");
	/* /32 and /31 are masks like any other */
	assert_int_equal(init_ip_parse("10.0.0.2:::255.255.255.255", &c), 1);
	assert_int_equal(c.prefixlen, 32);
	assert_int_equal(init_ip_parse("10.0.0.2:::255.255.255.254", &c), 1);
	assert_int_equal(c.prefixlen, 31);
}

static void test_ip_classful(void **state)
{
	static const struct {
		const char *ip;
		unsigned prefixlen;
	} cases[] = {
		{"10.0.0.2", 8},      {"127.0.0.5", 8},    {"172.16.0.2", 16},
		{"169.254.0.21", 16}, {"192.168.1.2", 24}, {"223.1.1.1", 24},
	};
	InitIpConfig c;
	(void)state;

	/* without a netmask the kernel guesses from the class: so do we */
	for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
		assert_int_equal(init_ip_parse(cases[i].ip, &c), 1);
		assert_int_equal(c.prefixlen, cases[i].prefixlen);
	}
	/* class D and E have no default network: refused */
	assert_int_equal(init_ip_parse("224.0.0.1", &c), -EINVAL);
	assert_int_equal(init_ip_parse("240.0.0.1", &c), -EINVAL);
}

static void test_ip_no_static_address(void **state)
{
	static const char *const none[] = {"off", "none",  "dhcp", "on",
					   "any", "bootp", "rarp", "both"};
	InitIpConfig c;
	(void)state;

	for (size_t i = 0; i < ELEMENTSOF(none); i++) {
		memset(&c, 0x55, sizeof(c));
		assert_int_equal(init_ip_parse(none[i], &c), 0);
		assert_int_equal(c.client.s_addr, INADDR_ANY);
		assert_string_equal(c.hostname, "");
	}
	/* no client address, but a hostname: still worth having */
	assert_int_equal(init_ip_parse(":::::eth0:dhcp", &c), 0);
	assert_string_equal(c.device, "eth0");
	assert_int_equal(init_ip_parse("::::myhost::off", &c), 0);
	assert_string_equal(c.hostname, "myhost");
	assert_int_equal(init_ip_parse("", &c), 0);
	/* 0.0.0.0 is the kernel's "not given" */
	assert_int_equal(init_ip_parse("0.0.0.0::10.0.0.1:255.0.0.0", &c), 0);
}

static void test_ip_malformed(void **state)
{
	static const char *const bad[] = {
		"10.0.0.300",
		"10.0.0",
		"10.0.0.2::10.0.0.1:255.0.255.0",       /* mask with a hole */
		"10.0.0.2::10.0.0.1:0.0.0.0",           /* no mask at all */
		"10.0.0.2::10.0.0.1:24",                /* a length, not a mask */
		"10.0.0.2::gateway:255.255.255.0",      /* not an address */
		"10.0.0.2::10.0.0.1:255.255.255.0:a b", /* space in the hostname */
		"10.0.0.2:::::a-very-long-ifname0",     /* > IFNAMSIZ - 1 */
		"10.0.0.2:::::../eth0",                 /* a path */
		"dhcpx",                                /* neither a protocol nor an address */
	};
	InitIpConfig c, before;
	char name[128];
	(void)state;

	memset(&before, 0x5a, sizeof(before));
	for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
		c = before;
		if (init_ip_parse(bad[i], &c) != -EINVAL)
			fail_msg("\"%s\" should be refused", bad[i]);
		/* ret_* untouched on failure */
		assert_memory_equal(&c, &before, sizeof(c));
	}
	/* a hostname of 64 bytes is the kernel's limit; a longer one is cut to it, as the kernel
	 * does, and the address is still configured */
	snprintf(name, sizeof(name), "1.2.3.4::::%0*d", INIT_HOSTNAME_MAX, 0);
	assert_int_equal(init_ip_parse(name, &c), 1);
	assert_int_equal(strlen(c.hostname), INIT_HOSTNAME_MAX);
	snprintf(name, sizeof(name), "1.2.3.4::::%0*d9", INIT_HOSTNAME_MAX, 0);
	assert_int_equal(init_ip_parse(name, &c), 1);
	assert_int_equal(strlen(c.hostname), INIT_HOSTNAME_MAX);
	assert_int_equal(c.client.s_addr, htonl(0x01020304));
	/* a device name too long for the kernel is still refused */
	snprintf(name, sizeof(name), "1.2.3.4::::h:%0*d", IFNAMSIZ, 0);
	assert_int_equal(init_ip_parse(name, &c), -EINVAL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_cmdline_get),          cmocka_unit_test(test_ip_ember),
		cmocka_unit_test(test_ip_partial),           cmocka_unit_test(test_ip_classful),
		cmocka_unit_test(test_ip_no_static_address), cmocka_unit_test(test_ip_malformed),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
