/* SPDX-License-Identifier: Apache-2.0 */
#pragma once

#include <stdbool.h>

/* Identifiers chosen by the scheduler become paths, device names and unit names, so they are
 * held to [a-z0-9][a-z0-9-]{0,62} (DESIGN.md §4). */
#define ID_MAX_LEN 63
bool id_is_valid(const char *id);
