/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Crash points for the crash-safety tests: build/test/emberd-hooks is emberd built with
 * EMBER_TEST_HOOKS, and kills itself (SIGKILL, as a crash would) right after the step named by
 * the environment variable EMBER_TEST_KILL_AFTER="<op>:<step>" (e.g. "pause:snapshot",
 * "resume:start"). emberd itself is built without: there the call compiles to nothing.
 */
#pragma once

#ifdef EMBER_TEST_HOOKS
void crash_point(const char *op, const char *step);
#else
static inline void crash_point(const char *op, const char *step)
{
	(void)op;
	(void)step;
}
#endif
