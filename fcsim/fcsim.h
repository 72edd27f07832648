/* SPDX-License-Identifier: Apache-2.0 */
/*
 * fcsim: a Firecracker stand-in with the same command line and HTTP API whose "guest" is a
 * container (new pid, mount, uts, ipc and network namespaces, chrooted into the root drive).
 * Shared between the fcsim sources; README.md ("fcsim") says what it simulates and what not.
 */
#pragma once

#include <json-c/json.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "memory.h"

#define FC_VERSION    "1.16.1"
#define FCSIM_VERSION EMBER_VERSION
#define MAX_DRIVES    16
#define MAX_IFACES    8

typedef enum VmState {
	VM_NOT_STARTED,
	VM_RUNNING,
	VM_PAUSED,
	VM_FAILED, /* a failed snapshot load: the process is unusable, as Firecracker's is */
} VmState;

typedef struct Drive {
	char *id;
	char *path;
	bool root;
	bool read_only;
	json_object *body; /* as accepted, for GET /vm/config and snapshots */
} Drive;

typedef struct Iface {
	char *id;
	char *host_dev_name;
	json_object *body;
	int host_tap;  /* opened at start */
	int guest_tap; /* eth<N> inside the guest's namespace */
	pthread_t relay;
	bool relay_running;
	_Atomic bool stop; /* set by guest_stop(), read by the relay thread */
} Iface;

typedef struct Vsock Vsock; /* vsock.c */
typedef struct Guest Guest; /* guest.c */

typedef struct Options {
	const char *api_sock;
	const char *id;
	int boot_delay_ms;
	const char *verify;       /* "all", "none" or a page count */
	const char *verify_order; /* "sequential" or "random" */
} Options;

typedef struct Vm {
	pthread_mutex_t mu;
	Options opt;
	VmState state;
	char *failure; /* why VM_FAILED */
	bool restored; /* loaded from a snapshot */
	/* Anything configured but the logger and metrics: /snapshot/load is then refused. */
	bool boot_configured;

	json_object *machine_config; /* full, with defaults */
	json_object *boot_source;    /* NULL until PUT */
	json_object *logger, *metrics, *balloon, *entropy, *mmds_config, *mmds, *serial,
		*cpu_config, *memory_hotplug;
	Drive drives[MAX_DRIVES];
	size_t n_drives;
	Iface ifaces[MAX_IFACES];
	size_t n_ifaces;
	json_object *vsock_body; /* NULL until PUT /vsock */

	uint64_t boot_id;
	GuestMemory *mem;
	Guest *guest;
	Vsock *vsock;
	volatile bool exit_requested;
	int exit_code;
} Vm;

/* api.c: the HTTP server. Requests are served one at a time, as Firecracker's API thread does. */
int api_start(Vm *vm, int listen_fd);
void api_stop(void);

/* vmm.c: what the requests do. Each returns an HTTP status (204/200/400) and, for 400, sets
 * *fault; for 200, *reply. */
int vmm_request(Vm *vm, const char *method, const char *path, json_object *body,
		json_object **reply, char **fault);
void vmm_shutdown(Vm *vm); /* on exit: stop the guest, relays, vsock */
json_object *vmm_default_machine_config(void);

/* guest.c: the container */
int guest_start(Vm *vm, char **ret_error);
int guest_freeze(Guest *g, bool frozen);
pid_t guest_pid(const Guest *g);
void guest_stop(Guest *g); /* kills what is left and waits */
void guest_free(Guest *g);

/* vsock.c: the hybrid vsock proxy */
int vsock_start(Vm *vm, const char *uds_path, Vsock **ret, char **ret_error);
/* Guest-initiated connections: a listener in the guest's network namespace (see vsock.c). */
int vsock_attach_guest(Vsock *v, pid_t guest, char **ret_error);
void vsock_stop(Vsock *v);

/* fclog.c: Firecracker-format log and metrics files */
typedef enum FcLevel {
	FC_OFF,
	FC_ERROR,
	FC_WARN,
	FC_INFO,
	FC_DEBUG,
	FC_TRACE,
} FcLevel;
int fclog_level_from_string(const char *s); /* case-insensitive; -EINVAL */
int fclog_open(const char *path, FcLevel level, bool show_level, bool show_origin,
	       const char *instance_id);
void fclog_set_instance(const char *instance_id);
void fclog(FcLevel level, const char *file, int line, const char *format, ...)
	__attribute__((format(printf, 4, 5)));
#define FCLOG(level, ...) fclog(level, __FILE__, __LINE__, __VA_ARGS__)
int fcmetrics_open(const char *path);
int fcmetrics_flush(Vm *vm);
void fcmetrics_count(const char *key); /* api_server.<key>, vmm.<key>, … */

/* Resolves a path like Firecracker does: relative to the working directory. */
char *fc_abspath(const char *path);
