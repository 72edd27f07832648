/* SPDX-License-Identifier: Apache-2.0 */
/* Shared between the fcctl module's .c files only. */
#pragma once

#include <json-c/json.h>
#include <pthread.h>

#include "fcctl.h"

struct FcVm {
	pid_t pid;
	int pidfd;
	bool child; /* ours to reap; false when adopted */
	bool reaped;
	FcExit exit;
	char *workdir;
	char *api_sock; /* absolute */

	pthread_mutex_t api_lock;
	void *curl; /* CURL *, reused: keeps the connection */
	int timeout_ms;
};

int api_init(FcVm *vm);
void api_done(FcVm *vm);
int api_call(FcVm *vm, const char *method, const char *path, json_object *body,
	     json_object **ret_reply, char **ret_fault);
