/* SPDX-License-Identifier: Apache-2.0 */
/*
 * systemd, over sd-bus: each sandbox's processes (VMM, ember-uffd) in a transient scope
 * ember-sbx-<id>.scope under ember.slice, with the sandbox's CPU and memory limits, and the
 * sandbox registered with systemd-machined (class vm, leader the VMM) so that `machinectl list`
 * shows it.
 *
 * Why scopes: emberd.service stops with KillMode=mixed, which SIGKILLs whatever is left in the
 * service's cgroup. A sandbox's processes moved into a scope of their own are out of it, so
 * they survive `systemctl restart emberd` and a crash, and the next emberd adopts them.
 *
 * On a host without systemd (or with [agent] systemd = no) systemd_open() gives NULL and every
 * other function accepts NULL and does nothing: the processes stay in emberd's cgroup, as they
 * always did there.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "common/macro.h"

typedef struct Systemd Systemd;

/* mode: "auto" (systemd when the host booted with it and the system bus answers), "yes"
 * (refuse when it cannot be reached) or "no". *ret is NULL when systemd is not used. */
int systemd_open(const char *mode, Systemd **ret, char **ret_error);
void systemd_free(Systemd *s);
DEFINE_POINTER_CLEANUP(Systemd, systemd_free)

typedef struct SystemdScope {
	const char *sandbox_id;
	const pid_t *pids; /* the VMM first, then ember-uffd if any */
	size_t n_pids;
	unsigned vcpus;      /* CPUQuota = vcpus × 100 %, CPUWeight = vcpus × 100 */
	uint64_t memory_max; /* bytes; 0: no MemoryMax */
} SystemdScope;

/* Puts the processes into ember-sbx-<id>.scope (created, or joined when it exists, e.g. after
 * an emberd restart) and returns once the kernel shows them there, so that a crash right after
 * cannot take them along with emberd. A no-op when s is NULL. */
int systemd_scope_add(Systemd *s, const SystemdScope *spec, char **ret_error);

/* Whether pid is in the sandbox's scope (reads /proc/<pid>/cgroup): 1 yes, 0 no, < 0 error. */
int systemd_scope_contains(const char *sandbox_id, pid_t pid);

/* Registers the sandbox with systemd-machined under its id (class vm, service ember, the
 * leader's scope as its unit). Already registered (an adopted sandbox): fine. Visibility only:
 * callers log a failure and go on. A no-op when s is NULL. */
int systemd_machine_register(Systemd *s, const char *sandbox_id, pid_t leader, char **ret_error);
/* Best effort: machined also drops a machine whose scope has gone. */
void systemd_machine_unregister(Systemd *s, const char *sandbox_id);

/* The scope's unit name, "ember-sbx-<id>.scope". */
int systemd_scope_name(const char *sandbox_id, char *buf, size_t size);
