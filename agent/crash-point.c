/* SPDX-License-Identifier: Apache-2.0 */
/* Only in build/test/emberd-hooks (crash-point.h). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crash-point.h"

void crash_point(const char *op, const char *step)
{
	const char *want = getenv("EMBER_TEST_KILL_AFTER");
	size_t n = strlen(op);

	if (want && strncmp(want, op, n) == 0 && want[n] == ':' &&
	    strcmp(want + n + 1, step) == 0) {
		fprintf(stderr, "crash point %s:%s reached: SIGKILL\n", op, step);
		raise(SIGKILL);
	}
}
