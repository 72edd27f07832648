/* SPDX-License-Identifier: Apache-2.0 */
/* netns/ pieces without a kernel: CIDR parsing, which guards every value that reaches an
 * nftables command. (Slots themselves are tested for real in test_netns.py.) */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "common/macro.h"
#include "netns/netns.h"

static void test_cidr_good(void **state)
{
	static const struct {
		const char *in, *out;
	} good[] = {
		{"10.0.0.0/8", "10.0.0.0/8"},
		{"1.2.3.4", "1.2.3.4/32"},
		{"1.2.3.4/32", "1.2.3.4/32"},
		{"0.0.0.0/0", "0.0.0.0/0"},
		{"169.254.169.254", "169.254.169.254/32"},
		{"192.168.0.0/16", "192.168.0.0/16"},
		{"100.64.0.0/10", "100.64.0.0/10"},
	};
	NetnsCidr c;
	char buf[32];
	(void)state;

	for (size_t i = 0; i < ELEMENTSOF(good); i++) {
		assert_int_equal(netns_cidr_parse(good[i].in, &c), 0);
		assert_string_equal(netns_cidr_format(&c, buf, sizeof(buf)), good[i].out);
	}
}

static void test_cidr_bad(void **state)
{
	/* Everything here would otherwise end up in an nftables command. */
	static const char *const bad[] = {
		"",           "10.0.0.1/8",         "10.0.0.0/33", "10.0.0.0/-1", "10.0.0.0/",
		"10.0.0.0/a", "256.0.0.0",          "1.2.3",       "1.2.3.4.5",   " 1.2.3.4",
		"1.2.3.4 ",   "1.2.3.4/8 }; flush", "::1",         "01.2.3.4x",   "1.2.3.4/08x",
		"a.b.c.d",    "1.2.3.4/32/1",
	};
	NetnsCidr c;
	(void)state;

	for (size_t i = 0; i < ELEMENTSOF(bad); i++)
		assert_int_equal(netns_cidr_parse(bad[i], &c), -EINVAL);
	assert_int_equal(netns_cidr_parse(NULL, &c), -EINVAL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_cidr_good),
		cmocka_unit_test(test_cidr_bad),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
