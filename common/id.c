/* SPDX-License-Identifier: Apache-2.0 */
#include "id.h"

#include <stddef.h>

static bool id_char_ok(char c, bool first)
{
	if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))
		return true;
	return !first && c == '-';
}

bool id_is_valid(const char *id)
{
	size_t i;

	if (!id)
		return false;
	for (i = 0; id[i]; i++) {
		if (i >= ID_MAX_LEN || !id_char_ok(id[i], i == 0))
			return false;
	}
	return i > 0;
}
