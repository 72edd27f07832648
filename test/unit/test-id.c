/* SPDX-License-Identifier: Apache-2.0 */
/*
 * id_is_valid(): scheduler-chosen ids become paths, device names and unit names, so everything
 * outside [a-z0-9][a-z0-9-]{0,62} must be refused (DESIGN.md §4).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "common/id.h"
#include "common/macro.h"

static void test_valid(void **state)
{
	static const char *const good[] = {
		"a",
		"0",
		"a-b",
		"abc123",
		"9lives",
		"a--b",
		/* A trailing dash is inside the pattern; refusing it would break ids the
		 * scheduler may already use. */
		"a-",
		"0-0",
	};
	(void)state;

	for (size_t i = 0; i < ELEMENTSOF(good); i++) {
		if (!id_is_valid(good[i]))
			fail_msg("\"%s\" should be valid", good[i]);
	}
}

static void test_length_limit(void **state)
{
	char id[ID_MAX_LEN + 2];
	(void)state;

	assert_int_equal(ID_MAX_LEN, 63);

	memset(id, 'a', ID_MAX_LEN);
	id[ID_MAX_LEN] = 0;
	assert_true(id_is_valid(id));

	/* A dash in the last allowed position is still inside the pattern. */
	id[ID_MAX_LEN - 1] = '-';
	assert_true(id_is_valid(id));

	memset(id, 'a', ID_MAX_LEN + 1);
	id[ID_MAX_LEN + 1] = 0;
	assert_false(id_is_valid(id));

	/* Too long even when every character is allowed in first position. */
	memset(id, '7', ID_MAX_LEN + 1);
	assert_false(id_is_valid(id));
}

static void test_invalid(void **state)
{
	static const char *const bad[] = {
		"",          "-a",    "-",   "A",   "aB",  "a_b",    "a.b", "a/b",
		"..",        "/",     "a b", " a",  "a ",  "a\n",    "a\t", "\xc3\xa9",
		"a\xc3\xa9", "a\xff", "a:b", "a+b", "a@b", "sbx\\1", "-0",
	};
	(void)state;

	assert_false(id_is_valid(NULL));
	for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
		if (id_is_valid(bad[i]))
			fail_msg("\"%s\" (index %zu) should be invalid", bad[i], i);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_valid),
		cmocka_unit_test(test_length_limit),
		cmocka_unit_test(test_invalid),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
