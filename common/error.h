/* SPDX-License-Identifier: Apache-2.0 */
#pragma once

/* The lower modules' way to fail: -errno for the program, a sentence for the person. */

/* Sets *ret_error (when ret_error is not NULL; NULL if out of memory) from a printf format, in
 * which %m names the error r; returns r, so that `return error_set(ret_error, r, ...)` is the
 * whole failure path. */
int error_set(char **ret_error, int r, const char *format, ...)
	__attribute__((format(printf, 3, 4)));
