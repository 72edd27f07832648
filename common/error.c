/* SPDX-License-Identifier: Apache-2.0 */
#include "error.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>

int error_set(char **ret_error, int r, const char *format, ...)
{
	va_list ap;

	if (ret_error) {
		errno = r < 0 ? -r : r; /* for %m */
		va_start(ap, format);
		if (vasprintf(ret_error, format, ap) < 0)
			*ret_error = NULL;
		va_end(ap);
	}
	return r;
}
