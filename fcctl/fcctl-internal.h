/* SPDX-License-Identifier: Apache-2.0 */
/* Shared between the fcctl module's .c files only. */
#pragma once

#include <json-c/json.h>
#include <pthread.h>

#include "fcctl.h"

struct FcVm {
	/* Set before the FcVm is handed out, read-only afterwards: no lock. */
	pid_t pid;
	int pidfd;
	bool child; /* ours to reap; false when adopted */
	char *workdir;
	char *api_sock; /* absolute */

	/* The reap state. waitid() succeeds once: whoever reaps (the manager's event loop, a stop,
	 * an API call that finds the VMM dead) records the exit here for every other caller.
	 * Held only for non-blocking calls, never across a poll. */
	pthread_mutex_t lock;
	bool reaped;
	FcExit exit; /* frozen once reaped */

	pthread_mutex_t api_lock;
	void *curl;             /* CURL *, reused: keeps the connection; under api_lock */
	_Atomic int timeout_ms; /* set from any thread, read when a call starts */
};

/* The most of a VMM's answer that is kept: Firecracker's largest (GET /vm/config with its
 * drives and interfaces) is a few KiB; anything bigger is a broken or hostile VMM. */
#define FCCTL_API_MAX_RESPONSE ((size_t)64 * 1024)

int api_init(FcVm *vm);
void api_done(FcVm *vm);
int api_call(FcVm *vm, const char *method, const char *path, json_object *body,
	     json_object **ret_reply, char **ret_fault);

/* Was process `pid` started with `--id <id>` (or `--id=<id>`, as the jailer passes it)? Read
 * from /proc/<pid>/cmdline. */
bool process_has_id(pid_t pid, const char *id);
