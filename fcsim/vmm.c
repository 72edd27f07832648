/* SPDX-License-Identifier: Apache-2.0 */
/*
 * What each API request does, with Firecracker's rules: bodies validated against the swagger
 * definitions (schema.c), pre-boot and post-boot phases, snapshot/create only while paused,
 * snapshot/load only on a fresh process and fatal when it fails. Fault messages use
 * Firecracker's wording where ember or its users may match on it.
 *
 * Files named in requests are opened when the request is made, as Firecracker does (a missing
 * kernel or drive fails the PUT, not the start); relative paths resolve against the working
 * directory.
 */
#include <errno.h>
#include <fcntl.h>
#include <openssl/sha.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/macro.h"
#include "fcsim.h"
#include "netns/netns.h"
#include "schema.h"

#define NOT_AFTER_BOOT  "The requested operation is not supported after starting the microVM."
#define NOT_BEFORE_BOOT "The requested operation is not supported before starting the microVM."
#define VMSTATE_FORMAT  "fcsim-vmstate-1"

static int fail(char **fault, const char *format, ...) __attribute__((format(printf, 2, 3)));
static int fail(char **fault, const char *format, ...)
{
	va_list ap;
	va_start(ap, format);
	if (vasprintf(fault, format, ap) < 0)
		*fault = NULL;
	va_end(ap);
	return 400;
}

static const char *jstr(json_object *o, const char *key)
{
	json_object *v;
	if (!o || !json_object_object_get_ex(o, key, &v) ||
	    !json_object_is_type(v, json_type_string))
		return NULL;
	return json_object_get_string(v);
}

static bool jbool(json_object *o, const char *key, bool def)
{
	json_object *v;
	if (!o || !json_object_object_get_ex(o, key, &v) ||
	    !json_object_is_type(v, json_type_boolean))
		return def;
	return json_object_get_boolean(v);
}

static int64_t jint(json_object *o, const char *key, int64_t def)
{
	json_object *v;
	if (!o || !json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_int))
		return def;
	return json_object_get_int64(v);
}

static const char *state_name(VmState s)
{
	switch (s) {
	case VM_NOT_STARTED:
		return "Not started";
	case VM_RUNNING:
		return "Running";
	case VM_PAUSED:
		return "Paused";
	default:
		return "Not started"; /* Firecracker has no "failed" state to show */
	}
}

static bool started(const Vm *vm)
{
	return vm->state == VM_RUNNING || vm->state == VM_PAUSED;
}

static json_object *default_machine_config(void)
{
	json_object *m = json_object_new_object();
	json_object_object_add(m, "vcpu_count", json_object_new_int(1));
	json_object_object_add(m, "mem_size_mib", json_object_new_int(128));
	json_object_object_add(m, "smt", json_object_new_boolean(false));
	json_object_object_add(m, "track_dirty_pages", json_object_new_boolean(false));
	json_object_object_add(m, "huge_pages", json_object_new_string("None"));
	return m;
}

/* Checks a full machine configuration the way Firecracker does after merging. */
static int check_machine_config(json_object *m, char **fault)
{
	int64_t vcpus = jint(m, "vcpu_count", 1), mem = jint(m, "mem_size_mib", 128);
	const char *huge = jstr(m, "huge_pages");

	if (jbool(m, "smt", false) && vcpus > 1 && vcpus % 2)
		return fail(fault,
			    "The vCPU number is invalid! The vCPU number can only be 1 or an "
			    "even number when SMT is enabled.");
	if (mem == 0 || (huge && strcmp(huge, "2M") == 0 && mem % 2))
		return fail(fault, "The memory size (MiB) is either 0, or not a multiple of the "
				   "configured page size.");
	return 0;
}

static json_object *copy(json_object *o)
{
	json_object *c = NULL;
	if (o && json_object_deep_copy(o, &c, NULL) < 0)
		return NULL;
	return c;
}

/* ---- configuration requests (pre-boot) ---- */

static int put_machine_config(Vm *vm, json_object *body, bool patch, char **fault)
{
	json_object *m = patch ? copy(vm->machine_config) : default_machine_config();

	if (!m)
		return fail(fault, "out of memory");
	json_object_object_foreach(body, key, val)
	{
		if (!json_object_is_type(val, json_type_null))
			json_object_object_add(m, key, json_object_get(val));
	}
	if (check_machine_config(m, fault) != 0) {
		json_object_put(m);
		return 400;
	}
	json_object_put(vm->machine_config);
	vm->machine_config = m;
	vm->boot_configured = true;
	return 204;
}

static int put_boot_source(Vm *vm, json_object *body, char **fault)
{
	const char *kernel = jstr(body, "kernel_image_path"), *initrd = jstr(body, "initrd_path");

	/* Firecracker opens the files now: a wrong path fails this request. */
	if (access(kernel, R_OK) < 0)
		return fail(fault, "The kernel file cannot be opened: %s (os error %d)",
			    strerror(errno), errno);
	if (initrd && access(initrd, R_OK) < 0)
		return fail(fault,
			    "The initrd file cannot be opened due to invalid path or invalid "
			    "permissions. %s (os error %d)",
			    strerror(errno), errno);
	json_object_put(vm->boot_source);
	vm->boot_source = json_object_get(body);
	vm->boot_configured = true;
	return 204;
}

static void drive_clear(Drive *d)
{
	free(d->id);
	free(d->path);
	json_object_put(d->body);
	memset(d, 0, sizeof(*d));
}

static int put_drive(Vm *vm, const char *id, json_object *body, char **fault)
{
	const char *path = jstr(body, "path_on_host");
	bool ro = jbool(body, "is_read_only", false), root = jbool(body, "is_root_device", false);
	size_t i;

	const char *body_id = jstr(body, "drive_id");
	if (!id || !body_id || strcmp(id, body_id) != 0)
		return fail(fault, "The id from the path does not match the id from the body!");
	if (!path)
		return fail(fault, "Unable to create the block device: fcsim supports virtio-block "
				   "drives only (path_on_host is required)");
	if (access(path, ro ? R_OK : R_OK | W_OK) < 0)
		return fail(
			fault,
			"Unable to create the block device: BackingFile(Os { code: %d, kind: %s, "
			"message: \"%s\" }, \"%s\")",
			errno, errno == ENOENT ? "NotFound" : "PermissionDenied", strerror(errno),
			path);
	for (i = 0; i < vm->n_drives; i++)
		if (strcmp(vm->drives[i].id, id) != 0 && vm->drives[i].root && root)
			return fail(fault, "A root block device already exists!");
	for (i = 0; i < vm->n_drives && strcmp(vm->drives[i].id, id) != 0; i++)
		;
	if (i == vm->n_drives) {
		if (vm->n_drives == MAX_DRIVES)
			return fail(fault, "fcsim: at most %d drives", MAX_DRIVES);
		vm->n_drives++;
	} else {
		drive_clear(&vm->drives[i]);
	}
	Drive *d = &vm->drives[i];
	d->id = strdup(id);
	d->path = strdup(path);
	d->root = root;
	d->read_only = ro;
	d->body = json_object_get(body);
	vm->boot_configured = true;
	return 204;
}

static void iface_clear(Iface *f)
{
	free(f->id);
	free(f->host_dev_name);
	json_object_put(f->body);
	safe_close(f->host_tap);
	safe_close(f->guest_tap);
	memset(f, 0, sizeof(*f));
	f->host_tap = f->guest_tap = -1;
}

static int put_iface(Vm *vm, const char *id, json_object *body, char **fault)
{
	const char *dev = jstr(body, "host_dev_name");
	size_t i;
	int tap;

	const char *body_id = jstr(body, "iface_id");
	if (!id || !body_id || !dev || strcmp(id, body_id) != 0)
		return fail(fault, "The id from the path does not match the id from the body!");
	for (i = 0; i < vm->n_ifaces; i++)
		if (strcmp(vm->ifaces[i].id, id) != 0 &&
		    strcmp(vm->ifaces[i].host_dev_name, dev) == 0)
			return fail(fault, "The host device name %s is already in use.", dev);
	/* Firecracker opens (or creates) the TAP now, in its own network namespace. */
	tap = netns_tap_open(dev);
	if (tap < 0)
		return fail(fault,
			    "Could not create the network device: Open tap device failed: Error "
			    "while creating ifreq structure: %s (os error %d). Invalid TUN/TAP "
			    "Backend provided by %s. Check our documentation on setting up the "
			    "network devices.",
			    strerror(-tap), -tap, dev);
	for (i = 0; i < vm->n_ifaces && strcmp(vm->ifaces[i].id, id) != 0; i++)
		;
	if (i == vm->n_ifaces) {
		if (vm->n_ifaces == MAX_IFACES) {
			close(tap);
			return fail(fault, "fcsim: at most %d network interfaces", MAX_IFACES);
		}
		vm->n_ifaces++;
	} else {
		iface_clear(&vm->ifaces[i]);
	}
	Iface *f = &vm->ifaces[i];
	f->id = strdup(id);
	f->host_dev_name = strdup(dev);
	f->body = json_object_get(body);
	f->host_tap = tap;
	f->guest_tap = -1;
	vm->boot_configured = true;
	return 204;
}

static int put_vsock(Vm *vm, json_object *body, char **fault)
{
	char *err = NULL;
	Vsock *v = NULL;
	int r;

	/* Firecracker binds uds_path now and refuses one that exists. */
	if (vm->vsock) {
		vsock_stop(vm->vsock);
		vm->vsock = NULL;
	}
	r = vsock_start(vm, jstr(body, "uds_path"), &v, &err);
	if (r < 0) {
		int ret = fail(fault, "Cannot create backend for vsock device: %s", err ?: "error");
		free(err);
		return ret;
	}
	vm->vsock = v;
	json_object_put(vm->vsock_body);
	vm->vsock_body = json_object_get(body);
	vm->boot_configured = true;
	return 204;
}

static int put_logger(Vm *vm, json_object *body, char **fault)
{
	const char *level = jstr(body, "level");
	int l = level ? fclog_level_from_string(level) : FC_INFO;
	int r;

	if (l < 0)
		return fail(fault, "Invalid log level: %s", level);
	r = fclog_open(jstr(body, "log_path"), (FcLevel)l, jbool(body, "show_level", false),
		       jbool(body, "show_log_origin", false), vm->opt.id);
	if (r < 0)
		return fail(fault, "Failed to open the logger file: %s", strerror(-r));
	json_object_put(vm->logger);
	vm->logger = json_object_get(body);
	return 204;
}

static int put_metrics(Vm *vm, json_object *body, char **fault)
{
	if (vm->metrics)
		return fail(fault, "Reinitialization of metrics not allowed.");
	int r = fcmetrics_open(jstr(body, "metrics_path"));
	if (r < 0)
		return fail(fault, "Cannot open the metrics file: %s", strerror(-r));
	vm->metrics = json_object_get(body);
	return 204;
}

static int put_stored(Vm *vm, json_object **slot, json_object *body)
{
	json_object_put(*slot);
	*slot = json_object_get(body);
	vm->boot_configured = true;
	return 204;
}

/* ---- the instance ---- */

static uint64_t new_boot_id(void)
{
	uint64_t id = 0;
	if (getrandom(&id, sizeof(id), 0) != sizeof(id)) {
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		id = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ (uint64_t)getpid();
	}
	return id ?: 1;
}

static int start_instance(Vm *vm, char **fault)
{
	char *err = NULL;
	int r;

	if (started(vm))
		return fail(fault, NOT_AFTER_BOOT);
	if (!vm->boot_source)
		return fail(fault, "Cannot start microvm without kernel configuration.");
	bool have_root = false;
	for (size_t i = 0; i < vm->n_drives; i++)
		have_root = have_root || vm->drives[i].root;
	if (!have_root)
		return fail(fault, "fcsim runs the guest from its root drive: configure a drive "
				   "with is_root_device = true");

	vm->boot_id = new_boot_id();
	r = gmem_boot((uint64_t)jint(vm->machine_config, "mem_size_mib", 128),
		      strcmp(jstr(vm->machine_config, "huge_pages") ?: "None", "2M") == 0,
		      vm->boot_id, &vm->mem, &err);
	if (r < 0) {
		int ret = fail(fault, "Cannot create guest memory: %s", err ?: strerror(-r));
		free(err);
		return ret;
	}
	r = guest_start(vm, &err);
	if (r < 0) {
		int ret = fail(fault, "fcsim: cannot start the guest: %s", err ?: strerror(-r));
		free(err);
		gmem_free(vm->mem);
		vm->mem = NULL;
		return ret;
	}
	vm->state = VM_RUNNING;
	fcmetrics_count("vmm.instance_start");
	FCLOG(FC_INFO, "Successfully started microvm that was configured from one single json");
	return 204;
}

static int patch_vm(Vm *vm, json_object *body, char **fault)
{
	const char *want = jstr(body, "state");
	bool pause = strcmp(want, "Paused") == 0;
	int r;

	if (!started(vm))
		return fail(fault, NOT_BEFORE_BOOT);
	/* Repeating a state change is harmless, as in Firecracker. */
	if ((pause && vm->state == VM_PAUSED) || (!pause && vm->state == VM_RUNNING))
		return 204;
	if (!vm->guest && !pause) {
		/* Loaded without resume_vm: the guest starts now (see snapshot_load). */
		char *err = NULL;
		r = guest_start(vm, &err);
		if (r < 0) {
			int ret = fail(fault, "fcsim: cannot start the guest: %s", err ?: "error");
			free(err);
			return ret;
		}
	} else {
		r = guest_freeze(vm->guest, pause);
		if (r < 0)
			return fail(fault, "fcsim: cannot %s the guest: %s",
				    pause ? "pause" : "resume", strerror(-r));
	}
	vm->state = pause ? VM_PAUSED : VM_RUNNING;
	FCLOG(FC_INFO, "Vmm is %s.", pause ? "paused" : "resumed");
	return 204;
}

/* sha256 (hex) of the state's canonical JSON. */
static void vmstate_checksum(json_object *st, char hex[65])
{
	const char *text = json_object_to_json_string_ext(
		st, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
	unsigned char md[SHA256_DIGEST_LENGTH];

	SHA256((const unsigned char *)text, strlen(text), md);
	for (int i = 0; i < SHA256_DIGEST_LENGTH; i++)
		snprintf(hex + (size_t)2 * (size_t)i, 3, "%02x", md[i]);
}

/* The vmstate file: fcsim's own format (JSON), as Firecracker's is its own (binary, versioned).
 * It records the configuration a restore needs and the boot id the memory was filled for. */
static int snapshot_create(Vm *vm, json_object *body, char **fault)
{
	const char *type = jstr(body, "snapshot_type") ?: "Full";
	char *err = NULL;
	json_object *st, *drives, *ifaces;
	int r;

	if (!started(vm))
		return fail(fault, NOT_BEFORE_BOOT);
	if (vm->state != VM_PAUSED)
		return fail(fault, "Cannot create a snapshot: the microVM is not paused. Pause it "
				   "first (PATCH /vm {\"state\": \"Paused\"}).");
	if (strcmp(type, "Diff") == 0 && !jbool(vm->machine_config, "track_dirty_pages", false))
		return fail(fault,
			    "Diff snapshots are not allowed on uVMs with dirty page tracking "
			    "disabled.");
	/* fcsim's guest never writes its memory after boot: a Diff snapshot holds the same pages
	 * as a Full one. */
	r = gmem_write_file(vm->mem, jstr(body, "mem_file_path"), &err);
	if (r < 0) {
		int ret = fail(fault, "Cannot save the memory of the microVM: %s",
			       err ?: strerror(-r));
		free(err);
		return ret;
	}
	st = json_object_new_object();
	json_object_object_add(st, "format", json_object_new_string(VMSTATE_FORMAT));
	json_object_object_add(st, "firecracker_version", json_object_new_string(FC_VERSION));
	json_object_object_add(st, "fcsim_version", json_object_new_string(FCSIM_VERSION));
	json_object_object_add(st, "boot_id", json_object_new_int64((int64_t)vm->boot_id));
	json_object_object_add(st, "machine-config", copy(vm->machine_config));
	drives = json_object_new_array();
	for (size_t i = 0; i < vm->n_drives; i++)
		json_object_array_add(drives, copy(vm->drives[i].body));
	json_object_object_add(st, "drives", drives);
	ifaces = json_object_new_array();
	for (size_t i = 0; i < vm->n_ifaces; i++)
		json_object_array_add(ifaces, copy(vm->ifaces[i].body));
	json_object_object_add(st, "network-interfaces", ifaces);
	if (vm->vsock_body)
		json_object_object_add(st, "vsock", copy(vm->vsock_body));
	if (vm->boot_source)
		json_object_object_add(st, "boot-source", copy(vm->boot_source));
	/* The checksum covers everything else in the file: a corrupt or edited state is refused
	 * at load instead of restoring something else than was saved. */
	char sum[65];
	vmstate_checksum(st, sum);
	json_object_object_add(st, "checksum", json_object_new_string(sum));
	r = json_object_to_file_ext(jstr(body, "snapshot_path"), st, JSON_C_TO_STRING_PRETTY);
	json_object_put(st);
	if (r < 0)
		return fail(fault, "Cannot save the microVM state: cannot write %s: %s",
			    jstr(body, "snapshot_path"), strerror(errno));
	fcmetrics_count("latencies_us.full_create_snapshot");
	FCLOG(FC_INFO, "Snapshot created: %s, %s", jstr(body, "snapshot_path"),
	      jstr(body, "mem_file_path"));
	return 204;
}

static uint64_t verify_sample(const Vm *vm)
{
	const char *v = vm->opt.verify;
	if (!v || strcmp(v, "all") == 0)
		return 0;
	return strtoull(v, NULL, 10);
}

static int load_fail(Vm *vm, char **fault, const char *format, ...)
	__attribute__((format(printf, 3, 4)));
static int load_fail(Vm *vm, char **fault, const char *format, ...)
{
	va_list ap;
	char *msg = NULL;

	va_start(ap, format);
	if (vasprintf(&msg, format, ap) < 0)
		msg = NULL;
	va_end(ap);
	/* A failed load leaves Firecracker unusable; so does it leave fcsim. */
	vm->state = VM_FAILED;
	free(vm->failure);
	vm->failure = msg ? strdup(msg) : NULL;
	FCLOG(FC_ERROR, "Loading a microVM snapshot failed: %s", msg ?: "");
	*fault = msg;
	return 400;
}

/* load_fail() with the fault a step already set (or a default). */
static int load_fail_again(Vm *vm, char **fault, const char *what)
{
	char *old = *fault;
	*fault = NULL;
	int r = load_fail(vm, fault, "%s", old ? old : what);
	free(old);
	return r;
}

static int snapshot_load(Vm *vm, json_object *body, char **fault)
{
	json_object *st = NULL, *backend = NULL, *v, *overrides;
	const char *mem_path = jstr(body, "mem_file_path"), *btype = "File";
	char *err = NULL;
	int r;

	if (started(vm) || vm->boot_configured)
		return fail(fault, "Loading a microVM snapshot not allowed after configuring "
				   "boot-specific resources.");
	if (json_object_object_get_ex(body, "mem_backend", &backend) &&
	    !json_object_is_type(backend, json_type_null)) {
		if (mem_path)
			return fail(fault, "Only one of mem_file_path and mem_backend may be "
					   "specified.");
		mem_path = jstr(backend, "backend_path");
		btype = jstr(backend, "backend_type");
	} else if (!mem_path) {
		return fail(fault, "missing field `mem_backend`: one of mem_file_path and "
				   "mem_backend must be specified.");
	}

	st = json_object_from_file(jstr(body, "snapshot_path"));
	if (!st)
		return load_fail(vm, fault, "Cannot load the microVM state from %s: %s",
				 jstr(body, "snapshot_path"), json_util_get_last_err() ?: "");
	const char *fmt = jstr(st, "format"), *fc = jstr(st, "firecracker_version"),
		   *sim = jstr(st, "fcsim_version");
	if (!fmt || strcmp(fmt, VMSTATE_FORMAT) != 0) {
		json_object_put(st);
		return load_fail(vm, fault,
				 "%s is not an fcsim snapshot (format %s); snapshots of real "
				 "Firecracker cannot be loaded by fcsim",
				 jstr(body, "snapshot_path"), fmt ?: "unknown");
	}
	char sum[65];
	const char *saved_sum = jstr(st, "checksum");
	json_object *no_sum = copy(st);
	json_object_object_del(no_sum, "checksum");
	vmstate_checksum(no_sum, sum);
	json_object_put(no_sum);
	if (!saved_sum || strcmp(saved_sum, sum) != 0) {
		r = load_fail(vm, fault, "%s is corrupt: its checksum does not match its content",
			      jstr(body, "snapshot_path"));
		json_object_put(st);
		return r;
	}
	if (!fc || strcmp(fc, FC_VERSION) != 0 || !sim || strcmp(sim, FCSIM_VERSION) != 0) {
		r = load_fail(
			vm, fault,
			"The snapshot was made by Firecracker %s (fcsim %s); this is Firecracker "
			"%s (fcsim %s): versions must match",
			fc ?: "?", sim ?: "?", FC_VERSION, FCSIM_VERSION);
		json_object_put(st);
		return r;
	}

	json_object_put(vm->machine_config);
	vm->machine_config = json_object_object_get_ex(st, "machine-config", &v)
				     ? copy(v)
				     : default_machine_config();
	vm->boot_id = (uint64_t)jint(st, "boot_id", 0);
	/* Drives, interfaces and vsock as recorded, with the overrides applied. */
	if (json_object_object_get_ex(st, "drives", &v))
		for (size_t i = 0; i < json_object_array_length(v); i++) {
			json_object *d = json_object_array_get_idx(v, i);
			r = put_drive(vm, jstr(d, "drive_id"), d, fault);
			if (r != 204) {
				json_object_put(st);
				return load_fail_again(vm, fault, "drive");
			}
		}
	overrides = NULL;
	json_object_object_get_ex(body, "network_overrides", &overrides);
	if (json_object_object_get_ex(st, "network-interfaces", &v))
		for (size_t i = 0; i < json_object_array_length(v); i++) {
			json_object *n = copy(json_object_array_get_idx(v, i));
			for (size_t j = 0; overrides && j < json_object_array_length(overrides);
			     j++) {
				json_object *o = json_object_array_get_idx(overrides, j);
				if (strcmp(jstr(o, "iface_id"), jstr(n, "iface_id")) == 0)
					json_object_object_add(
						n, "host_dev_name",
						json_object_new_string(jstr(o, "host_dev_name")));
			}
			r = put_iface(vm, jstr(n, "iface_id"), n, fault);
			json_object_put(n);
			if (r != 204) {
				json_object_put(st);
				return load_fail_again(vm, fault, "network");
			}
		}
	if (json_object_object_get_ex(st, "vsock", &v)) {
		json_object *vs = copy(v), *ov;
		if (json_object_object_get_ex(body, "vsock_override", &ov) &&
		    !json_object_is_type(ov, json_type_null))
			json_object_object_add(vs, "uds_path",
					       json_object_new_string(jstr(ov, "uds_path")));
		r = put_vsock(vm, vs, fault);
		json_object_put(vs);
		if (r != 204) {
			json_object_put(st);
			return load_fail_again(vm, fault, "vsock");
		}
	}
	if (json_object_object_get_ex(st, "boot-source", &v)) {
		json_object_put(vm->boot_source);
		vm->boot_source = copy(v);
	}
	json_object_put(st);

	uint64_t mib = (uint64_t)jint(vm->machine_config, "mem_size_mib", 128);
	bool huge = strcmp(jstr(vm->machine_config, "huge_pages") ?: "None", "2M") == 0;
	r = strcmp(btype, "Uffd") == 0 ? gmem_load_uffd(mem_path, mib, huge, &vm->mem, &err)
				       : gmem_load_file(mem_path, mib, huge, &vm->mem, &err);
	if (r < 0) {
		r = load_fail(vm, fault, "Cannot restore the guest memory: %s",
			      err ?: strerror(-r));
		free(err);
		return r;
	}
	/* The guest's first touches of its memory, as a restored kernel's would be: every page
	 * (or a sample) is checked against what the snapshot's boot wrote. */
	if (!vm->opt.verify || strcmp(vm->opt.verify, "none") != 0) {
		struct timespec t0, t1;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		GmemOrder order =
			vm->opt.verify_order && strcmp(vm->opt.verify_order, "random") == 0
				? GMEM_ORDER_RANDOM
				: GMEM_ORDER_SEQUENTIAL;
		r = gmem_verify(vm->mem, vm->boot_id, verify_sample(vm), order, vm->boot_id, &err);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		if (r < 0) {
			r = load_fail(vm, fault, "guest memory verification failed: %s",
				      err ?: strerror(-r));
			free(err);
			return r;
		}
		FCLOG(FC_INFO, "fcsim: guest memory verified (%s, %s order) in %ld ms",
		      vm->opt.verify ?: "all", order == GMEM_ORDER_RANDOM ? "random" : "sequential",
		      (long)((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000));
	}
	vm->restored = true;
	vm->state = VM_PAUSED;
	fcmetrics_count("latencies_us.load_snapshot");
	FCLOG(FC_INFO, "Snapshot loaded from %s", jstr(body, "snapshot_path"));
	if (jbool(body, "resume_vm", false)) {
		json_object *resume = json_object_new_object();
		json_object_object_add(resume, "state", json_object_new_string("Resumed"));
		r = patch_vm(vm, resume, fault);
		json_object_put(resume);
		if (r != 204)
			return load_fail_again(vm, fault, "resume");
	}
	return 204;
}

/* ---- GET ---- */

static json_object *instance_info(Vm *vm)
{
	json_object *o = json_object_new_object();
	json_object_object_add(o, "id", json_object_new_string(vm->opt.id));
	json_object_object_add(o, "state", json_object_new_string(state_name(vm->state)));
	json_object_object_add(o, "vmm_version", json_object_new_string(FC_VERSION));
	json_object_object_add(o, "app_name", json_object_new_string("Firecracker"));
	return o;
}

static json_object *full_config(Vm *vm)
{
	json_object *o = json_object_new_object(), *drives = json_object_new_array(),
		    *ifaces = json_object_new_array();

	for (size_t i = 0; i < vm->n_drives; i++)
		json_object_array_add(drives, copy(vm->drives[i].body));
	for (size_t i = 0; i < vm->n_ifaces; i++)
		json_object_array_add(ifaces, copy(vm->ifaces[i].body));
	json_object_object_add(o, "balloon", copy(vm->balloon));
	json_object_object_add(o, "drives", drives);
	/* After a restore the boot source is empty, as the swagger says. */
	json_object_object_add(o, "boot-source", vm->restored ? NULL : copy(vm->boot_source));
	json_object_object_add(o, "cpu-config", copy(vm->cpu_config));
	json_object_object_add(o, "logger", copy(vm->logger));
	json_object_object_add(o, "machine-config", copy(vm->machine_config));
	json_object_object_add(o, "metrics", copy(vm->metrics));
	json_object_object_add(o, "mmds-config", copy(vm->mmds_config));
	json_object_object_add(o, "network-interfaces", ifaces);
	json_object_object_add(o, "vsock", copy(vm->vsock_body));
	json_object_object_add(o, "entropy", copy(vm->entropy));
	return o;
}

/* ---- routing ---- */

typedef enum Phase {
	ANY,
	PRE_BOOT,
	POST_BOOT,
} Phase;

typedef struct Route {
	const char *method;
	const char *path; /* "/drives/" with has_id: the id follows */
	const Schema *schema;
	Phase phase;
	bool has_id;
} Route;

static const Route routes[] = {
	{"GET", "/", NULL, ANY, false},
	{"GET", "/version", NULL, ANY, false},
	{"GET", "/vm/config", NULL, ANY, false},
	{"GET", "/machine-config", NULL, ANY, false},
	{"GET", "/mmds", NULL, ANY, false},
	{"GET", "/balloon", NULL, ANY, false},
	{"PUT", "/actions", &schema_instance_action, ANY, false},
	{"PUT", "/boot-source", &schema_boot_source, PRE_BOOT, false},
	{"PUT", "/cpu-config", &schema_cpu_config, PRE_BOOT, false},
	{"PUT", "/drives/", &schema_drive, PRE_BOOT, true},
	{"PATCH", "/drives/", &schema_partial_drive, POST_BOOT, true},
	{"PUT", "/logger", &schema_logger, ANY, false},
	{"PUT", "/machine-config", &schema_machine_config, PRE_BOOT, false},
	{"PATCH", "/machine-config", &schema_machine_config, PRE_BOOT, false},
	{"PUT", "/metrics", &schema_metrics, ANY, false},
	{"PUT", "/mmds", &schema_mmds_contents, ANY, false},
	{"PATCH", "/mmds", &schema_mmds_contents, ANY, false},
	{"PUT", "/mmds/config", &schema_mmds_config, PRE_BOOT, false},
	{"PUT", "/entropy", &schema_entropy, PRE_BOOT, false},
	{"PUT", "/serial", &schema_serial, PRE_BOOT, false},
	{"PUT", "/balloon", &schema_balloon, PRE_BOOT, false},
	{"PATCH", "/balloon", &schema_balloon_update, POST_BOOT, false},
	{"PUT", "/network-interfaces/", &schema_network_interface, PRE_BOOT, true},
	{"PATCH", "/network-interfaces/", &schema_partial_network_interface, POST_BOOT, true},
	{"PUT", "/snapshot/create", &schema_snapshot_create, POST_BOOT, false},
	{"PUT", "/snapshot/load", &schema_snapshot_load, ANY, false},
	{"PATCH", "/vm", &schema_vm, ANY, false},
	{"PUT", "/vsock", &schema_vsock, PRE_BOOT, false},
};

static const Route *route_find(const char *method, const char *path, const char **ret_id)
{
	for (size_t i = 0; i < ELEMENTSOF(routes); i++) {
		const Route *r = &routes[i];
		if (strcmp(r->method, method) != 0)
			continue;
		if (r->has_id) {
			size_t n = strlen(r->path);
			if (strncmp(path, r->path, n) == 0 && path[n] && !strchr(path + n, '/')) {
				*ret_id = path + n;
				return r;
			}
		} else if (strcmp(path, r->path) == 0) {
			return r;
		}
	}
	return NULL;
}

int vmm_request(Vm *vm, const char *method, const char *path, json_object *body,
		json_object **reply, char **fault)
{
	const char *id = NULL;
	const Route *rt;
	int status;

	*reply = NULL;
	*fault = NULL;
	rt = route_find(method, path, &id);
	if (!rt)
		return fail(fault, "Invalid request method and/or path: %s %s.", method, path);

	pthread_mutex_lock(&vm->mu);
	if (vm->state == VM_FAILED && strcmp(method, "GET") != 0) {
		status = fail(fault, "fcsim: the microVM failed (%s); start a new process",
			      vm->failure ?: "unknown reason");
		goto out;
	}
	if (rt->schema && schema_validate(rt->schema, body, fault) < 0) {
		status = 400;
		goto out;
	}
	if (rt->phase == PRE_BOOT && started(vm)) {
		status = fail(fault, NOT_AFTER_BOOT);
		goto out;
	}
	if (rt->phase == POST_BOOT && !started(vm)) {
		status = fail(fault, NOT_BEFORE_BOOT);
		goto out;
	}

	status = 204;
	if (strcmp(method, "GET") == 0) {
		status = 200;
		if (strcmp(path, "/") == 0)
			*reply = instance_info(vm);
		else if (strcmp(path, "/version") == 0) {
			*reply = json_object_new_object();
			json_object_object_add(*reply, "firecracker_version",
					       json_object_new_string(FC_VERSION));
		} else if (strcmp(path, "/vm/config") == 0)
			*reply = full_config(vm);
		else if (strcmp(path, "/machine-config") == 0)
			*reply = copy(vm->machine_config);
		else if (strcmp(path, "/mmds") == 0) {
			if (!vm->mmds)
				status = fail(fault, "The MMDS data store is not initialized.");
			else
				*reply = copy(vm->mmds);
		} else if (strcmp(path, "/balloon") == 0) {
			if (!vm->balloon)
				status = fail(fault, "No balloon device found.");
			else
				*reply = copy(vm->balloon);
		}
	} else if (strcmp(path, "/actions") == 0) {
		const char *a = jstr(body, "action_type");
		if (strcmp(a, "InstanceStart") == 0)
			status = start_instance(vm, fault);
		else if (strcmp(a, "FlushMetrics") == 0) {
			if (fcmetrics_flush(vm) < 0)
				status = fail(fault, "The metrics system is not initialized.");
		} else if (!started(vm))
			status = fail(fault, NOT_BEFORE_BOOT);
		else /* SendCtrlAltDel: the guest gets SIGINT, as an init does for Ctrl-Alt-Del */
			status = guest_pid(vm->guest) > 0 && kill(guest_pid(vm->guest), SIGINT) == 0
					 ? 204
					 : fail(fault, "fcsim: no guest to signal");
	} else if (strcmp(path, "/boot-source") == 0)
		status = put_boot_source(vm, body, fault);
	else if (strcmp(path, "/machine-config") == 0)
		status = put_machine_config(vm, body, strcmp(method, "PATCH") == 0, fault);
	else if (rt->has_id && strncmp(path, "/drives/", 8) == 0) {
		if (strcmp(method, "PUT") == 0)
			status = put_drive(vm, id, body, fault);
		else
			status = fail(fault, "fcsim: updating a drive after boot is not simulated");
	} else if (rt->has_id) {
		if (strcmp(method, "PUT") == 0)
			status = put_iface(vm, id, body, fault);
		else /* rate limiters: accepted, not simulated */
			status = 204;
	} else if (strcmp(path, "/vsock") == 0)
		status = put_vsock(vm, body, fault);
	else if (strcmp(path, "/logger") == 0)
		status = put_logger(vm, body, fault);
	else if (strcmp(path, "/metrics") == 0)
		status = put_metrics(vm, body, fault);
	else if (strcmp(path, "/mmds") == 0)
		status = put_stored(vm, &vm->mmds, body);
	else if (strcmp(path, "/mmds/config") == 0)
		status = put_stored(vm, &vm->mmds_config, body);
	else if (strcmp(path, "/entropy") == 0)
		status = put_stored(vm, &vm->entropy, body);
	else if (strcmp(path, "/serial") == 0)
		status = put_stored(vm, &vm->serial, body);
	else if (strcmp(path, "/cpu-config") == 0)
		status = put_stored(vm, &vm->cpu_config, body);
	else if (strcmp(path, "/balloon") == 0) {
		if (strcmp(method, "PUT") == 0)
			status = put_stored(vm, &vm->balloon, body);
		else if (!vm->balloon)
			status = fail(fault, "No balloon device found.");
		else
			json_object_object_add(vm->balloon, "amount_mib",
					       json_object_new_int64(jint(body, "amount_mib", 0)));
	} else if (strcmp(path, "/snapshot/create") == 0)
		status = snapshot_create(vm, body, fault);
	else if (strcmp(path, "/snapshot/load") == 0)
		status = snapshot_load(vm, body, fault);
	else if (strcmp(path, "/vm") == 0)
		status = patch_vm(vm, body, fault);
out:
	pthread_mutex_unlock(&vm->mu);
	return status;
}

void vmm_shutdown(Vm *vm)
{
	pthread_mutex_lock(&vm->mu);
	if (vm->guest) {
		guest_stop(vm->guest);
		guest_free(vm->guest);
		vm->guest = NULL;
	}
	for (size_t i = 0; i < vm->n_ifaces; i++)
		iface_clear(&vm->ifaces[i]);
	vm->n_ifaces = 0;
	if (vm->vsock) {
		vsock_stop(vm->vsock);
		vm->vsock = NULL;
	}
	for (size_t i = 0; i < vm->n_drives; i++)
		drive_clear(&vm->drives[i]);
	vm->n_drives = 0;
	gmem_free(vm->mem);
	vm->mem = NULL;
	json_object *all[] = {vm->machine_config, vm->boot_source,    vm->logger,
			      vm->metrics,        vm->balloon,        vm->entropy,
			      vm->mmds_config,    vm->mmds,           vm->serial,
			      vm->cpu_config,     vm->memory_hotplug, vm->vsock_body};
	for (size_t i = 0; i < ELEMENTSOF(all); i++)
		json_object_put(all[i]);
	vm->machine_config = vm->boot_source = vm->logger = vm->metrics = vm->balloon = NULL;
	vm->entropy = vm->mmds_config = vm->mmds = vm->serial = vm->cpu_config = NULL;
	vm->memory_hotplug = vm->vsock_body = NULL;
	free(vm->failure);
	vm->failure = NULL;
	pthread_mutex_unlock(&vm->mu);
}

json_object *vmm_default_machine_config(void)
{
	return default_machine_config();
}
