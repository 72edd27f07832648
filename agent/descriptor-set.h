/* SPDX-License-Identifier: Apache-2.0 */
#pragma once

#include <stddef.h>
#include <stdint.h>

/* protoc's FileDescriptorSet for the API this binary serves (agent/descriptor-set.S). */
extern const uint8_t ember_descriptor_set[];
extern const size_t ember_descriptor_set_size;
