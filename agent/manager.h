/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The sandbox manager: templates, sandboxes, their records and the event log (DESIGN.md §8).
 *
 * Lifecycle work runs on the manager's own worker threads, never on an API call's thread: a
 * call starts (or joins) an operation and then only waits for its outcome, so a client that
 * goes away abandons the wait, not the operation. VMM exits are seen by one event-loop thread
 * through pidfds. Nothing here is per-sandbox polling or a per-sandbox thread.
 *
 * Everything the API layer (node-sandbox.c) needs is in this header; the structures live in
 * manager-internal.h.
 */
#pragma once

#include <stdio.h>

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/macro.h"
#include "config.h"

typedef struct Manager Manager;

/* What runs the microVMs, decided once at start (vmm.c). */
typedef enum VmmKind {
	VMM_FIRECRACKER,
	VMM_FCSIM,
	_VMM_KIND_MAX,
	_VMM_KIND_INVALID = -EINVAL,
} VmmKind;

typedef struct VmmInfo {
	VmmKind kind;
	char *binary;  /* absolute path */
	char *jailer;  /* absolute path or NULL */
	char *uffd;    /* ember-uffd, absolute path; NULL: not found (no pause or resume) */
	char *version; /* what `binary --version` said, e.g. "1.16.1" */
	char *reason;  /* why this one (logged at start) */
} VmmInfo;

const char *vmm_kind_to_string(VmmKind k);
/* Picks the VMM from [vmm] kind and the host: *ret filled, or -errno with a message: -ENOENT
 * when the VMM it needs is not found, -EOPNOTSUPP for a setting emberd does not support. */
int vmm_choose(const Config *c, bool kvm_usable, VmmInfo *ret, char **ret_error);
void vmm_info_done(VmmInfo *v);

/* Loads records, adopts sandboxes that survived an agent restart, reclaims leftovers, creates
 * the network pool and starts the worker threads. `kvm_usable`: the KVM probe's answer.
 * vmm_choose()'s errors are passed on as they are. */
int manager_new(const Config *config, bool kvm_usable, Manager **ret, char **ret_error);
/* Stops the threads after the operations in flight finished; sandboxes keep running. */
void manager_free(Manager *m);
DEFINE_POINTER_CLEANUP(Manager, manager_free)

/* Starts the template downloads (PullTemplate), resuming those the last run left. */
int manager_pulls_start(Manager *m);
/* The pulls in progress for a status line ("id 40%, id2 12 MiB"); returns their number. */
int manager_pull_status(Manager *m, char *buf, size_t size);

/* Registers the demo template on first start ([templates] demo); logs what it did. */
void manager_demo_template(Manager *m);

const VmmInfo *manager_vmm(const Manager *m);
const char *manager_storage_backend(const Manager *m);
unsigned manager_sandbox_count(Manager *m);
/* Destroys every sandbox (as DestroySandbox does) and waits up to timeout_ms for them to go;
 * then manager_free() also removes the network pool's host side. For `emberd
 * --destroy-all-sandboxes`, which the package runs when it is removed. -ETIMEDOUT or -EIO (a
 * destroy failed) with the sandboxes left named in *ret_error. */
int manager_destroy_all(Manager *m, int timeout_ms, char **ret_error);
/* The Prometheus text of sandboxes by state and of operations (durations by step, outcomes).
 * m may be NULL (before recovery finished): nothing is written. */
void manager_write_metrics(Manager *m, FILE *f);
