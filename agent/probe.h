/* SPDX-License-Identifier: Apache-2.0 */
/*
 * What the host can do, for GetNode and for refusing work early: each probe says whether a
 * facility is usable right now and, when not, why in words an operator can act on.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

typedef struct ProbeResult {
	bool available;
	char version[64];
	char reason[256];
} ProbeResult;

void probe_kvm(ProbeResult *ret);
void probe_device_mapper(ProbeResult *ret);
void probe_userfaultfd(ProbeResult *ret);
/* How long `firecracker --version` may take, its output and its exit together (Firecracker
 * answers in milliseconds). GetNode waits this long at most for a binary that hangs. */
#define PROBE_FIRECRACKER_TIMEOUT_MS 2000

/* `bin` is a name searched in PATH or an absolute path; runs `bin --version` within
 * PROBE_FIRECRACKER_TIMEOUT_MS. */
void probe_firecracker(const char *bin, ProbeResult *ret);
/* The same with another timeout: at start, where giving up on a slow binary (a loaded host, an
 * emulated one) fails the whole agent, emberd waits PROBE_START_TIMEOUT_MS. */
#define PROBE_START_TIMEOUT_MS 15000
void probe_firecracker_within(const char *bin, int timeout_ms, ProbeResult *ret);
/* The same check for a caller that needs the version itself (e.g. to record it with a
 * snapshot): `binary` as above. 0 and *ret_version ("1.16.1", malloc'ed); or -ENOENT/-EACCES
 * (not found), -ETIMEDOUT (killed after timeout_ms), -EPROTO (failed), -EBADMSG (no version in
 * its output), with a sentence in *ret_error. */
int probe_firecracker_version(const char *binary, int timeout_ms, char **ret_version,
			      char **ret_error);

/* The host's memory, in bytes: MemTotal and MemAvailable, and the pool of 2 MiB huge pages
 * (vm.nr_hugepages) with what is free in it and not reserved by a mapping (Firecracker maps
 * huge pages MAP_NORESERVE and takes them as the guest touches them, fcsim reserves them at
 * the mapping: free minus reserved is what is left either way). */
typedef struct HostMemory {
	uint64_t total, available;
	bool available_known; /* a kernel before 3.14 has no MemAvailable */
	uint64_t huge_total, huge_free;
} HostMemory;
void probe_memory(HostMemory *ret);

/* Resolves a program name through PATH (or checks an absolute path): 0 and *ret_path
 * (malloc'ed), or -ENOENT / -EACCES. */
int find_program(const char *name, char **ret_path);
