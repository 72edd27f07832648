/* SPDX-License-Identifier: Apache-2.0 */
/*
 * What the host can do, for GetNode and for refusing work early: each probe says whether a
 * facility is usable right now and, when not, why in words an operator can act on.
 */
#pragma once

#include <stdbool.h>

typedef struct ProbeResult {
	bool available;
	char version[64];
	char reason[256];
} ProbeResult;

void probe_kvm(ProbeResult *ret);
void probe_device_mapper(ProbeResult *ret);
void probe_userfaultfd(ProbeResult *ret);
/* `bin` is a name searched in PATH or an absolute path; runs `bin --version` (2 s limit). */
void probe_firecracker(const char *bin, ProbeResult *ret);

/* Resolves a program name through PATH (or checks an absolute path): 0 and *ret_path
 * (malloc'ed), or -ENOENT / -EACCES. */
int find_program(const char *name, char **ret_path);
