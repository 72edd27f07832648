/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The lifecycle flows (DESIGN.md §8), run on the manager's worker threads. Each step is timed
 * and logged (OP=, STEP=, DURATION_US=); a failure names its step and unwinds every earlier
 * one. Between steps a flow checks whether DestroySandbox asked it to give up.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/error.h"
#include "common/fileio.h"
#include "common/log.h"
#include "crash-point.h"
#include "guest/client/guest-client.h"
#include "messages.h"
#include "node-sandbox.h"

/* Fixed for every sandbox (DESIGN.md §4): a snapshot taken in one restores in any other. */
#define GUEST_MAC "06:00:ac:10:00:02"
#define GUEST_CID 3
#define GUEST_BOOT_ARGS                                                                            \
	"console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp "              \
	"i8042.dumbkbd init=/sbin/ember-init"
#define VMM_STOP_TIMEOUT_MS 5000

static uint64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

int log_level_journal_info(void)
{
	return log_get_target() == LOG_TARGET_JOURNAL ? LOG_INFO : LOG_DEBUG;
}

void sandbox_log_event_at(const char *file, int line, const char *func, const Sandbox *sb,
			  int level, const char *message_id, const char *op, const char *step,
			  int64_t duration_us, const char *fmt, ...)
{
	_cleanup_free_ char *msg = NULL;
	char dur[32];
	va_list ap;

	if (level > log_get_max_level())
		return;
	va_start(ap, fmt);
	if (vasprintf(&msg, fmt, ap) < 0)
		msg = NULL;
	va_end(ap);
	snprintf(dur, sizeof(dur), "%lld", (long long)duration_us);
	log_internal(level, 0,
		     LOG_FIELDS({"MESSAGE_ID", message_id}, {"SANDBOX_ID", sb->id},
				{"TEMPLATE_ID", sb->template_id}, {"OP", op}, {"STEP", step},
				{"DURATION_US", duration_us >= 0 ? dur : NULL}),
		     file, line, func, "%s", msg ?: fmt);
}

static void log_step(const Sandbox *sb, const char *op, const char *step, uint64_t us, int r,
		     const char *err)
{
	if (r >= 0)
		crash_point(op, step);

	if (r < 0)
		sandbox_log_event(sb, LOG_WARNING, EMBER_MESSAGE_SANDBOX_STEP_FAILED, op, step,
				  (int64_t)us, "sandbox %s: %s: step %s failed after %llu us: %s",
				  sb->id, op, step, (unsigned long long)us, err ?: strerror(-r));
	else
		/* Pause and resume are rare and their steps are what an operator compares, so
		 * they are logged at info everywhere; a create's go to the journal, where
		 * `journalctl SANDBOX_ID=` selects them, but not to a terminal. */
		sandbox_log_event(sb,
				  strcmp(op, "create") == 0 ? log_level_journal_info() : LOG_INFO,
				  EMBER_MESSAGE_SANDBOX_STEP, op, step, (int64_t)us,
				  "sandbox %s: %s: %s took %llu us", sb->id, op, step,
				  (unsigned long long)us);
}

bool vmm_or_uffd_exited(const Sandbox *sb)
{
	struct pollfd p[2] = {{.fd = sb->vm ? fcctl_vm_pidfd(sb->vm) : -1, .events = POLLIN},
			      {.fd = sb->uffd ? fcctl_vm_pidfd(sb->uffd) : -1, .events = POLLIN}};

	return poll(p, 2, 0) > 0;
}

static void timing_begin(OpTiming *t, const char *op)
{
	*t = (OpTiming){};
	snprintf(t->op, sizeof(t->op), "%s", op);
}

static void timing_step(OpTiming *t, const char *name, uint64_t us)
{
	if (t->n_steps >= OP_MAX_STEPS)
		return;
	snprintf(t->steps[t->n_steps].name, sizeof(t->steps[0].name), "%s", name);
	t->steps[t->n_steps].us = us;
	t->n_steps++;
}

/* Ends the timing and makes it the sandbox's last_operation, before the record that
 * publishes the outcome is written. */
static void timing_end(Manager *m, Sandbox *sb, OpTiming *t, uint64_t t0, const char *failed)
{
	t->total_us = now_us() - t0;
	snprintf(t->failed, sizeof(t->failed), "%s", failed ?: "");
	clock_gettime(CLOCK_REALTIME, &t->end);
	pthread_mutex_lock(&m->lock);
	sb->last_op = *t;
	OpMetric *om = op_metric_locked(m, t->op, "");
	if (om)
		metrics_histogram_observe(&om->seconds, t->total_us);
	for (size_t i = 0; i < t->n_steps; i++)
		if ((om = op_metric_locked(m, t->op, t->steps[i].name)))
			metrics_histogram_observe(&om->seconds, t->steps[i].us);
	pthread_mutex_unlock(&m->lock);
}

/* A step's error as the API reports it. */
static RpcCode code_of(int r)
{
	return r == -ECANCELED                                 ? RPC_ABORTED
	       : r == -ENOSPC || r == -EDQUOT || r == -ENOBUFS ? RPC_RESOURCE_EXHAUSTED
							       : RPC_INTERNAL;
}

int sandbox_mem_op_timeout_ms(const Manager *m, const Sandbox *sb)
{
	uint64_t t = 10000 + (uint64_t)sb->spec.memory_mib * 50,
		 boot = (uint64_t)m->config->boot_timeout_s * 1000;

	if (t < boot)
		t = boot;
	return t > INT_MAX ? INT_MAX : (int)t;
}

/* /snapshot/create with the time a memory dump of this size needs. */
static int snapshot_create_timed(Manager *m, Sandbox *sb, const char *vmstate, const char *mem,
				 char **ret_error)
{
	fcctl_vm_set_timeout(sb->vm, sandbox_mem_op_timeout_ms(m, sb));
	int r = fcctl_snapshot_create(sb->vm, vmstate, mem, false, ret_error);
	fcctl_vm_set_timeout(sb->vm, 10000);
	return r;
}

/* After a failed pause or snapshot: the VM runs again if its VMM can make it (a call that
 * timed out may still be finishing in the VMM: the state query waits as long as a dump). */
static int ensure_vm_running(Manager *m, Sandbox *sb, char **ret_error)
{
	_cleanup_free_ char *state = NULL, *version = NULL;
	int r;

	fcctl_vm_set_timeout(sb->vm, sandbox_mem_op_timeout_ms(m, sb));
	r = fcctl_describe(sb->vm, &state, &version, ret_error);
	if (r >= 0 && state && strcmp(state, "Paused") == 0)
		r = fcctl_vm_resume(sb->vm, ret_error);
	fcctl_vm_set_timeout(sb->vm, 10000);
	return r;
}

char *sandbox_saved_path(const Sandbox *sb, const char *name)
{
	char *p;

	if (asprintf(&p, "%s/snapshot%s%s", sb->data_dir, name ? "/" : "", name ?: "") < 0)
		return NULL;
	return p;
}

static bool aborted(Manager *m, Sandbox *sb)
{
	pthread_mutex_lock(&m->lock);
	bool a = sb->abort;
	pthread_mutex_unlock(&m->lock);
	return a;
}

static const char *state_name(Ember__V1__SandboxState s)
{
	const ProtobufCEnumValue *v =
		protobuf_c_enum_descriptor_get_value(&ember__v1__sandbox_state__descriptor, (int)s);
	return v ? v->name + strlen("SANDBOX_STATE_") : "?";
}

int sandbox_record_write(Manager *m, Sandbox *sb, Ember__V1__SandboxState state, const char *reason)
{
	_cleanup_free_ char *path = NULL;
	json_object *o;
	int r;

	if (asprintf(&path, "%s/sandbox.json", sb->data_dir) < 0)
		return -ENOMEM;
	o = json_object_new_object();
	if (!o)
		return -ENOMEM;
	pthread_mutex_lock(&m->lock);
	json_object_object_add(o, "id", json_object_new_string(sb->id));
	json_object_object_add(o, "spec", sb_spec_to_json(&sb->spec));
	json_object_object_add(o, "template_id", json_object_new_string(sb->template_id));
	/* A state given is the one about to be published: the record goes first. */
	json_object_object_add(o, "state", json_object_new_string(state_name(state ?: sb->state)));
	json_object_object_add(
		o, "state_reason",
		json_object_new_string(state ? reason ?: "" : sb->state_reason ?: ""));
	json_object_object_add(o, "revision", json_object_new_uint64(sb->revision));
	json_object_object_add(o, "create_time", timespec_to_json(&sb->create_time));
	json_object_object_add(o, "update_time", timespec_to_json(&sb->update_time));
	json_object_object_add(o, "firecracker_version",
			       json_object_new_string(sb->fc_version ?: ""));
	json_object_object_add(o, "vmm_pid", json_object_new_int64(sb->vmm_pid));
	json_object_object_add(o, "vmm_binary", json_object_new_string(m->vmm.binary));
	json_object_object_add(o, "cow_path", json_object_new_string(sb->cow_path));
	json_object_object_add(o, "uffd_pid", json_object_new_int64(sb->uffd_pid));
	json_object_object_add(o, "uffd_binary", json_object_new_string(m->vmm.uffd ?: ""));
	if (sb->resume_loading)
		json_object_object_add(o, "resume_loading", json_object_new_boolean(true));
	if (sb->boot_restore)
		json_object_object_add(o, "boot_restore", json_object_new_boolean(true));
	if (sb->last_op.op[0])
		json_object_object_add(o, "last_operation", op_timing_to_json(&sb->last_op));
	pthread_mutex_unlock(&m->lock);
	r = record_write(path, o);
	json_object_put(o);
	if (r < 0)
		log_sandbox_errno(LOG_ERR, r, sb, ": cannot write its record %s", path);
	return r;
}

StorageDiskSpec sandbox_disk_spec(const Sandbox *sb)
{
	return (StorageDiskSpec){
		.id = sb->id,
		.base_image = sb->snap           ? sb->snap->rootfs
			      : sb->boot_restore ? sb->tmpl->boot.rootfs
			      : sb->tmpl         ? sb->tmpl->rootfs.path
						 : NULL,
		.cow_path = sb->cow_path,
		.cow_size = sb->spec.disk_size_mib << 20,
	};
}

/* The VMM, then its memory server (which ends by itself once the VMM is gone). */
static int release_processes(Manager *m, Sandbox *sb, char **ret_error)
{
	FcExit ex;
	int k;

	if (sb->vm) {
		systemd_machine_unregister(m->systemd, sb->id);
		manager_unwatch_vmm(m, sb);
		k = fcctl_vm_stop(sb->vm, VMM_STOP_TIMEOUT_MS, &ex);
		if (k < 0) {
			/* Keep it: a later destroy tries again, and the pid stays known. Nothing
			 * below may go while the VMM may still use it. */
			return error_set(ret_error, k, "cannot stop the VMM (pid %d): %m",
					 (int)sb->vmm_pid);
		}
		/* its console is watched while it can write to it */
		console_unwatch(m, sb);
		fcctl_vm_free(sb->vm);
		sb->vm = NULL;
		sb->vmm_pid = -1;
	}
	FcUffdCounters uc = {};
	bool counted = false;
	if (sb->uffd) {
		k = fcctl_vm_stop(sb->uffd, VMM_STOP_TIMEOUT_MS, &ex);
		if (k < 0)
			return error_set(ret_error, k, "cannot stop ember-uffd (pid %d): %m",
					 (int)sb->uffd_pid);
		fcctl_vm_free(sb->uffd);
		sb->uffd = NULL;
		sb->uffd_pid = -1;
		_cleanup_free_ char *path = NULL;
		counted = asprintf(&path, "%s/" UFFD_STATS_FILE, sb->run_dir) >= 0 &&
			  fcctl_uffd_counters_read(path, &uc) >= 0;
	}
	pthread_mutex_lock(&m->lock);
	sandbox_huge_release_locked(m, sb);
	/* Its last counters move to the node's totals as it stops showing its own. */
	if (sb->uffd_counted && counted) {
		m->uffd_done.faults += uc.faults;
		m->uffd_done.fault_bytes += uc.fault_bytes;
		m->uffd_done.prefetch_bytes += uc.prefetch_bytes;
		m->uffd_done.replay_bytes += uc.replay_bytes;
	}
	sb->uffd_counted = false;
	pthread_mutex_unlock(&m->lock);
	return 0;
}

/* Firecracker has exited: nothing holds the disk any more (DESIGN.md §8). */
static int release_disk(Manager *m, Sandbox *sb, char **ret_error)
{
	StorageDiskSpec spec = sandbox_disk_spec(sb);
	_cleanup_free_ char *err = NULL;
	int k;

	if (!sb->device)
		return 0;
	k = storage_disk_remove(m->storage, &spec, &err);
	if (k < 0)
		return error_set(ret_error, k, "cannot remove the disk: %s", err ?: "failed");
	free(sb->device);
	sb->device = NULL;
	return 0;
}

static int release_slot(Manager *m, Sandbox *sb, char **ret_error)
{
	_cleanup_free_ char *err = NULL;
	int k = 0;

	pthread_mutex_lock(&m->lock);
	if (sb->slot_user) {
		sb->slot_user = false;
		m->n_slot_users--;
	}
	pthread_mutex_unlock(&m->lock);
	if (sb->slot) {
		k = netns_slot_release(m->pool, sb->slot, &err);
		if (k < 0)
			k = error_set(ret_error, k, "cannot release the network slot: %s",
				      err ?: "failed");
		sb->slot = NULL;
		pthread_mutex_lock(&m->lock);
		free(sb->sandbox_ip);
		sb->sandbox_ip = NULL;
		pthread_mutex_unlock(&m->lock);
	}
	return k;
}

int run_dir_clear(const char *dir, bool keep_console)
{
	if (!keep_console)
		return rm_rf(dir);
	_cleanup_close_ int fd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? 0 : -errno;
	return rm_rf_at_except(fd, CONSOLE_FILE);
}

/* What the VMM and its memory server used goes; the console log stays while the sandbox does
 * (a FAILED sandbox's console says why, a paused one's goes on after a resume). */
static int release_run_dir(Sandbox *sb, char **ret_error)
{
	int k = sb->run_dir ? run_dir_clear(sb->run_dir, true) : 0;

	if (k < 0)
		return error_set(ret_error, k, "cannot clear %s: %m", sb->run_dir);
	return 0;
}

int sandbox_release_runtime(Manager *m, Sandbox *sb, char **ret_error)
{
	_cleanup_free_ char *e1 = NULL, *e2 = NULL, *e3 = NULL;
	int r = release_processes(m, sb, ret_error);

	if (r < 0)
		return r;
	/* Each goes even when another could not: the first failure is reported. */
	int k1 = release_disk(m, sb, &e1), k2 = release_slot(m, sb, &e2),
	    k3 = release_run_dir(sb, &e3);
	if (k1 < 0) {
		if (ret_error)
			*ret_error = TAKE_PTR(e1);
		return k1;
	}
	if (k2 < 0) {
		if (ret_error)
			*ret_error = TAKE_PTR(e2);
		return k2;
	}
	if (k3 < 0 && ret_error)
		*ret_error = TAKE_PTR(e3);
	return k3;
}

/* Removes what is left once the runtime is gone: the CoW file, the record, the console. */
static int sandbox_remove_files(Sandbox *sb, char **ret_error)
{
	int r = rm_rf(sb->data_dir);

	if (r < 0)
		return error_set(ret_error, r, "cannot remove %s: %m", sb->data_dir);
	if ((r = rm_rf(sb->run_dir)) < 0)
		return error_set(ret_error, r, "cannot remove %s: %m", sb->run_dir);
	return 0;
}

/* ---- create ---- */

static int step_slot(Manager *m, Sandbox *sb, char **ret_error)
{
	NetnsPolicy policy = sb_spec_policy(&sb->spec);
	int r = netns_slot_acquire(m->pool, sb->id, &policy, &sb->slot, ret_error);

	if (r < 0)
		return r;
	char *ip = strdup(netns_slot_sandbox_ip(sb->slot));
	if (!ip)
		return -ENOMEM;
	pthread_mutex_lock(&m->lock);
	sb->sandbox_ip = ip;
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static int step_disk(Manager *m, Sandbox *sb, char **ret_error)
{
	StorageDiskSpec spec = sandbox_disk_spec(sb);

	return storage_disk_create(m->storage, &spec, &sb->device, ret_error);
}

/* A resume keeps the console log the sandbox had (a create's run dir is new). */
static int step_run_dir(Sandbox *sb, bool keep_console, char **ret_error)
{
	_cleanup_free_ char *link = NULL;
	int r;

	(void)run_dir_clear(sb->run_dir, keep_console);
	r = mkdir_p(sb->run_dir, 0700);
	if (r < 0)
		return error_set(ret_error, r, "cannot create %s: %m", sb->run_dir);
	if (asprintf(&link, "%s/rootfs", sb->run_dir) < 0)
		return -ENOMEM;
	if (symlink(sb->device, link) < 0)
		return error_set(ret_error, -errno, "cannot link %s to %s: %m", link, sb->device);
	return 0;
}

/* The VMM and ember-uffd leave emberd's cgroup for the sandbox's own scope (systemd.h), so
 * that a restart of emberd.service does not take them along; then the machine is registered.
 * Without systemd nothing happens. */
int sandbox_scope_enter(Manager *m, Sandbox *sb, char **ret_error)
{
	pid_t pids[2];
	size_t n = 0;
	int r;

	/* A template's boot VM is emberd's own short job: it goes with emberd. */
	if (!m->systemd || sb->boot_vm)
		return 0;
	if (sb->vm)
		pids[n++] = sb->vmm_pid;
	if (sb->uffd)
		pids[n++] = sb->uffd_pid;
	SystemdScope scope = {
		.sandbox_id = sb->id,
		.pids = pids,
		.n_pids = n,
		.vcpus = sb->spec.vcpu_count,
		.memory_max =
			m->config->memory_overhead_mib
				? ((uint64_t)sb->spec.memory_mib + m->config->memory_overhead_mib)
					  << 20
				: 0,
	};
	r = systemd_scope_add(m->systemd, &scope, ret_error);
	if (r < 0 || !sb->vm)
		return r;
	_cleanup_free_ char *err = NULL;
	if (systemd_machine_register(m->systemd, sb->id, sb->vmm_pid, &err) < 0)
		log_sandbox(LOG_WARNING, sb, ": %s (machinectl will not list it)",
			    err ?: "cannot register it with systemd-machined");
	return 0;
}

static int step_spawn(Manager *m, Sandbox *sb, char **ret_error)
{
	static const char *const stale[] = {FCCTL_API_SOCK, "v.sock", NULL};
	FcSpawn spawn = {
		.binary = m->vmm.binary,
		.id = sb->id,
		.workdir = sb->run_dir,
		.netns = netns_slot_path(sb->slot),
		.output = CONSOLE_FILE,
		.stale = stale,
		.jailer = m->vmm.jailer,
	};
	int r = fcctl_vm_spawn(&spawn, &sb->vm, ret_error);

	if (r < 0)
		return r;
	sb->vmm_pid = fcctl_vm_pid(sb->vm);
	console_watch(m, sb);
	/* The pid goes on record before the VMM is given anything to do: a restart finds and
	 * ends (or adopts) it whatever happens next. */
	r = sandbox_record_write(m, sb, 0, NULL);
	if (r >= 0)
		r = sandbox_scope_enter(m, sb, ret_error);
	return r;
}

static int step_configure(Manager *m, Sandbox *sb, char **ret_error)
{
	_cleanup_free_ char *args = NULL;
	Template *t = sb->tmpl;
	int r;

	if (asprintf(&args,
		     GUEST_BOOT_ARGS " ip=" NETNS_GUEST_IP "::" NETNS_TAP_IP
				     ":255.255.255.252:%s:eth0:off%s%s",
		     sb->id, t->boot_args[0] ? " " : "", t->boot_args) < 0)
		return -ENOMEM;
	if ((r = fcctl_put_machine_config(
		     sb->vm, sb->spec.vcpu_count, sb->spec.memory_mib, false, false,
		     sb->spec.huge_pages ? FC_HUGE_PAGES_2M : FC_HUGE_PAGES_NONE, ret_error)) < 0 ||
	    (r = fcctl_put_boot_source(sb->vm, t->kernel.path, t->initrd.path, args, ret_error)) <
		    0 ||
	    (r = fcctl_put_drive(sb->vm, "rootfs", "rootfs", true, false, ret_error)) < 0 ||
	    (r = fcctl_put_network_interface(sb->vm, "eth0", NETNS_TAP_NAME, GUEST_MAC,
					     ret_error)) < 0 ||
	    (r = fcctl_put_vsock(sb->vm, GUEST_CID, "v.sock", ret_error)) < 0)
		return r;
	(void)m;
	return 0;
}

static int step_wait_guest(Manager *m, Sandbox *sb, char **ret_error)
{
	_cleanup_free_ char *uds = NULL;
	uint64_t deadline = now_ms() + (uint64_t)m->config->boot_timeout_s * 1000;

	if (asprintf(&uds, "%s/v.sock", sb->run_dir) < 0)
		return -ENOMEM;
	for (;;) {
		_cleanup_(guest_conn_freep) GuestConn *c = NULL;
		_cleanup_free_ char *err = NULL;
		struct pollfd p = {.fd = fcctl_vm_pidfd(sb->vm), .events = POLLIN};
		GuestHello hello;
		int r;

		if (aborted(m, sb))
			return error_set(ret_error, -ECANCELED, "destroyed while booting");
		if (poll(&p, 1, 0) > 0) {
			_cleanup_free_ char *tail = console_tail(sb);
			return error_set(ret_error, -ECHILD, "the VMM exited during boot%s",
					 tail ?: " (its console is empty)");
		}
		r = guest_conn_open_vsock(uds, GUEST_CLIENT_PORT, 1000, &c, &err);
		if (r >= 0) {
			guest_conn_set_timeout(c, 2000);
			r = guest_hello(c, &hello);
			if (r >= 0) {
				log_debug("sandbox %s: guest agent %s answers", sb->id,
					  hello.agent_version);
				return 0;
			}
		}
		if (now_ms() >= deadline) {
			_cleanup_free_ char *tail = console_tail(sb);
			return error_set(ret_error, -ETIMEDOUT,
					 "the guest agent did not answer within %u s (last: %s)%s",
					 m->config->boot_timeout_s,
					 c ? guest_conn_error(c) : (err ?: strerror(-r)),
					 tail ?: " (its console is empty)");
		}
		/* Nothing to wait on: the agent's socket appears inside the guest. Short naps,
		 * only while this one sandbox boots. */
		(void)poll(&p, 1, 50);
	}
}

/* The outcome goes in place before the sandbox may leave the registry: a waiter woken by the
 * removal must find it. */
static void create_finish_locked(Manager *m, Sandbox *sb, RpcCode code, const char *message)
{
	manager_promise_locked(m, sb, false);
	op_outcome_locked(m, "create", code);
	sb->op = SB_OP_NONE;
	sb->create_done = true;
	sb->create_code = code;
	free(sb->create_error);
	sb->create_error = message ? strdup(message) : NULL;
	sandbox_wake_locked(sb);
}

typedef enum CreateStep {
	S_SLOT,
	S_DISK,
	S_RUNDIR,
	S_UFFD,
	S_SPAWN,
	S_CONFIGURE,
	S_BOOT,
	S_LOAD,
	S_GUEST,
} CreateStep;

typedef struct StepDef {
	const char *name;
	CreateStep id;
} StepDef;

/* Cold boot from a template (DESIGN.md §8), or a restore of a snapshot ("fork"). */
static const StepDef cold_steps[] = {
	{"slot", S_SLOT},           {"disk", S_DISK}, {"run-dir", S_RUNDIR},    {"spawn", S_SPAWN},
	{"configure", S_CONFIGURE}, {"boot", S_BOOT}, {"guest-agent", S_GUEST},
};
static const StepDef fork_steps[] = {
	{"slot", S_SLOT},   {"disk", S_DISK}, {"run-dir", S_RUNDIR},    {"memory-server", S_UFFD},
	{"spawn", S_SPAWN}, {"load", S_LOAD}, {"guest-agent", S_GUEST},
};

static int step_uffd(Manager *m, Sandbox *sb, const char *mem, bool shared, char **ret_error);
static int step_load(Manager *m, Sandbox *sb, const char *vmstate, bool fork, char **ret_error);

/* One step of a create (or of a template's boot, which is a create's first steps). */
static int create_step(Manager *m, Sandbox *sb, CreateStep id, char **ret_error)
{
	switch (id) {
	case S_SLOT:
		return step_slot(m, sb, ret_error);
	case S_DISK:
		return step_disk(m, sb, ret_error);
	case S_RUNDIR:
		return step_run_dir(sb, false, ret_error);
	case S_UFFD:
		return step_uffd(m, sb, sb->snap ? sb->snap->mem : sb->tmpl->boot.mem, true,
				 ret_error);
	case S_SPAWN:
		return step_spawn(m, sb, ret_error);
	case S_CONFIGURE:
		return step_configure(m, sb, ret_error);
	case S_BOOT:
		return fcctl_instance_start(sb->vm, ret_error);
	case S_LOAD:
		return step_load(m, sb, sb->snap ? sb->snap->vmstate : sb->tmpl->boot.vmstate, true,
				 ret_error);
	case S_GUEST:
		return step_wait_guest(m, sb, ret_error);
	}
	return -EINVAL;
}

void sandbox_op_create(Manager *m, Sandbox *sb)
{
	bool restore = sb->snap || sb->boot_restore;
	const StepDef *steps = restore ? fork_steps : cold_steps;
	size_t n_steps = restore ? ELEMENTSOF(fork_steps) : ELEMENTSOF(cold_steps);
	_cleanup_free_ char *err = NULL;
	const char *failed = NULL;
	uint64_t t0 = now_us();
	OpTiming timing;
	int r = mkdir_p(sb->data_dir, 0700);

	timing_begin(&timing, "create");
	if (r >= 0)
		r = sandbox_record_write(m, sb, 0, NULL);
	if (r < 0)
		failed = "record";
	for (size_t i = 0; r >= 0 && i < n_steps; i++) {
		uint64_t ts = now_us();
		free(err);
		err = NULL;
		if (aborted(m, sb))
			r = error_set(&err, -ECANCELED, "destroyed while creating");
		else
			r = create_step(m, sb, steps[i].id, &err);
		log_step(sb, "create", steps[i].name, now_us() - ts, r, err);
		timing_step(&timing, steps[i].name, now_us() - ts);
		if (r < 0)
			failed = steps[i].name;
	}
	timing_end(m, sb, &timing, t0, failed);

	/* RUNNING goes on record before anyone is told: a crash in between must not undo a
	 * sandbox that watchers saw RUNNING. */
	if (r >= 0) {
		r = sandbox_record_write(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING,
					 NULL);
		if (r < 0)
			failed = "record";
	}
	if (r >= 0) {
		int w = manager_watch_vmm(m, sb);
		if (w < 0)
			log_sandbox_errno(LOG_ERR, w, sb, ": cannot watch its VMM");
		pthread_mutex_lock(&m->lock);
		bool abort = sb->abort;
		if (!abort) {
			sandbox_set_state_locked(
				m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING, NULL);
			create_finish_locked(m, sb, RPC_OK, NULL);
			/* An exit the loop saw while we still owned the VMM was left to us. */
			if (vmm_or_uffd_exited(sb))
				manager_submit_locked(m, sb, SB_OP_REAP);
		} else {
			/* Destroyed after its last step: the create still fails with ABORTED
			 * (node.proto), and the destroy takes what it made. */
			_cleanup_free_ char *msg = NULL;
			if (asprintf(&msg, "sandbox %s was destroyed while it was being created",
				     sb->id) < 0)
				msg = NULL;
			create_finish_locked(m, sb, RPC_ABORTED, msg);
			sb->destroy_next = false;
			manager_submit_locked(m, sb, SB_OP_DESTROY);
		}
		pthread_mutex_unlock(&m->lock);
		if (!abort) {
			uint64_t us = now_us() - t0;
			sandbox_log_event(sb, LOG_INFO, EMBER_MESSAGE_SANDBOX_CREATED, "create",
					  NULL, (int64_t)us,
					  "sandbox %s created from %s %s in %llu ms", sb->id,
					  sb->snap ? "snapshot" : "template",
					  sb->snap ? sb->snap->id : sb->template_id,
					  (unsigned long long)us / 1000);
		}
		return;
	}

	/* Unwind: everything the steps made, in reverse, then the record. */
	_cleanup_free_ char *uerr = NULL;
	int u = sandbox_release_runtime(m, sb, &uerr);
	if (u >= 0)
		u = sandbox_remove_files(sb, &uerr);

	_cleanup_free_ char *msg = NULL;
	RpcCode code = code_of(r);
	if (code == RPC_ABORTED) {
		if (asprintf(&msg, "sandbox %s was destroyed while it was being created", sb->id) <
		    0)
			msg = NULL;
	} else if (asprintf(&msg, "create of sandbox %s failed at step %s: %s", sb->id,
			    failed ?: "?", err ?: strerror(-r)) < 0)
		msg = NULL;
	sandbox_log_event(sb, LOG_WARNING, EMBER_MESSAGE_SANDBOX_CREATE_FAILED, "create",
			  failed ?: "?", (int64_t)(now_us() - t0), "%s", msg ?: "create failed");

	if (u < 0) {
		/* Something could not be undone: the sandbox stays, FAILED, so that nothing is
		 * forgotten and DestroySandbox can try again. */
		_cleanup_free_ char *reason = NULL;
		if (asprintf(&reason, "%s; undoing it failed: %s", msg ?: "create failed",
			     uerr ?: strerror(-u)) < 0)
			reason = NULL;
		log_sandbox(LOG_ERR, sb, ": %s", reason ?: "undoing a failed create failed");
		(void)mkdir_p(sb->data_dir, 0700);
		(void)sandbox_record_write(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_FAILED,
					   reason);
		pthread_mutex_lock(&m->lock);
		create_finish_locked(m, sb, code, msg);
		sb->destroy_failed = sb->abort; /* a waiting destroy learns it must retry */
		sb->abort = false;
		sb->destroy_next = false;
		sandbox_set_state_locked(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_FAILED,
					 reason ?: "undoing a failed create failed");
		pthread_mutex_unlock(&m->lock);
		return;
	}

	pthread_mutex_lock(&m->lock);
	create_finish_locked(m, sb, code, msg);
	if (sb->abort)
		sandbox_set_state_locked(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_DESTROYED,
					 NULL);
	sb->destroy_next = false;
	events_record(m->events, NULL, sb->id);
	manager_remove_locked(m, sb);
	pthread_mutex_unlock(&m->lock);
}

/* ---- destroy ---- */

void sandbox_op_destroy(Manager *m, Sandbox *sb)
{
	_cleanup_free_ char *err = NULL;
	uint64_t t0 = now_us();
	int r;

	(void)sandbox_record_write(m, sb, 0, NULL);
	r = sandbox_release_runtime(m, sb, &err);
	if (r >= 0) {
		/* After a restart the disk of a FAILED sandbox may still be up without our
		 * knowing its device: removal is idempotent, so make sure. */
		StorageDiskSpec spec = sandbox_disk_spec(sb);
		r = storage_disk_remove(m->storage, &spec, &err);
	}
	if (r >= 0)
		r = sandbox_remove_files(sb, &err);
	log_step(sb, "destroy", "release", now_us() - t0, r, err);

	if (r < 0) {
		_cleanup_free_ char *reason = NULL;
		if (asprintf(&reason, "destroy failed: %s", err ?: strerror(-r)) < 0)
			reason = NULL;
		sandbox_log_event(sb, LOG_WARNING, EMBER_MESSAGE_SANDBOX_DESTROY_FAILED, "destroy",
				  "release", (int64_t)(now_us() - t0),
				  "sandbox %s FAILED: %s; DestroySandbox tries again", sb->id,
				  reason ?: "destroy failed");
		(void)mkdir_p(sb->data_dir, 0700);
		(void)sandbox_record_write(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_FAILED,
					   reason ?: "destroy failed");
		pthread_mutex_lock(&m->lock);
		sb->op = SB_OP_NONE;
		sb->destroy_failed = true;
		sb->abort = false;
		sandbox_set_state_locked(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_FAILED,
					 reason ?: "destroy failed");
		pthread_mutex_unlock(&m->lock);
		return;
	}
	pthread_mutex_lock(&m->lock);
	sb->op = SB_OP_NONE;
	sandbox_set_state_locked(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_DESTROYED, NULL);
	events_record(m->events, NULL, sb->id);
	manager_remove_locked(m, sb);
	pthread_mutex_unlock(&m->lock);
	sandbox_log_event(sb, LOG_INFO, EMBER_MESSAGE_SANDBOX_DESTROYED, "destroy", NULL,
			  (int64_t)(now_us() - t0), "sandbox %s destroyed", sb->id);
}

/* ---- a VMM that died ---- */

/* The last line ember-uffd wrote before its statistics: why it stopped serving. */
static char *uffd_last_error(const Sandbox *sb)
{
	_cleanup_free_ char *path = NULL, *data = NULL;
	char *last = NULL, *save = NULL;
	size_t size;

	if (asprintf(&path, "%s/uffd.out", sb->run_dir) < 0 ||
	    read_full_file(path, 1 << 20, &data, &size) < 0)
		return NULL;
	for (char *line = strtok_r(data, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
		if (strncmp(line, "ember-uffd: ", 12) == 0 &&
		    strncmp(line + 12, "stats:", 6) != 0) {
			free(last);
			last = strndup(line + 12, 300);
		}
	return last;
}

void sandbox_op_reap(Manager *m, Sandbox *sb)
{
	_cleanup_free_ char *reason = NULL, *err = NULL;
	FcExit ex = {};
	int k;

	FcExit uex = {};
	if (sb->uffd && fcctl_vm_reap(sb->vm, &ex) == -EAGAIN &&
	    fcctl_vm_reap(sb->uffd, &uex) >= 0) {
		/* The memory server went first: the VMM is stopped below, or its guest would hang
		 * on its next page fault. Its last words say why it ended. */
		_cleanup_free_ char *why = uffd_last_error(sb);
		k = asprintf(&reason, "its memory server ember-uffd (pid %d) exited (%s %d)%s%s",
			     (int)sb->uffd_pid, uex.signal ? "signal" : "status",
			     uex.signal ?: uex.code, why ? ": " : "", why ?: "");
	} else if (fcctl_vm_reap(sb->vm, &ex) < 0 || !ex.known)
		k = asprintf(&reason, "the VMM (pid %d) exited unexpectedly", (int)sb->vmm_pid);
	else if (ex.signal)
		k = asprintf(&reason, "the VMM was killed by signal %d (%s)", ex.signal,
			     strsignal(ex.signal));
	else
		k = asprintf(&reason, "the VMM exited unexpectedly with status %d", ex.code);
	if (k < 0)
		reason = NULL;
	sandbox_log_event(sb, LOG_WARNING, EMBER_MESSAGE_SANDBOX_FAILED, "watch", NULL, -1,
			  "sandbox %s FAILED: %s", sb->id, reason ?: "the VMM exited");
	/* FAILED keeps the disk for inspection (its file), not the devices or the slot. */
	if (sandbox_release_runtime(m, sb, &err) < 0)
		log_sandbox(LOG_WARNING, sb, ": cleaning up after its VMM: %s", err ?: "failed");
	(void)sandbox_record_write(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_FAILED,
				   reason ?: "the VMM exited");

	pthread_mutex_lock(&m->lock);
	if (sb->destroy_next) {
		/* A destroy came meanwhile: it goes on from here (the sandbox is DESTROYING). */
		sb->destroy_next = false;
		manager_submit_locked(m, sb, SB_OP_DESTROY);
	} else {
		sb->op = SB_OP_NONE;
		sandbox_set_state_locked(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_FAILED,
					 reason ?: "the VMM exited");
	}
	pthread_mutex_unlock(&m->lock);
}

/* ---- pause and resume ---- */

/* The end of a pause or resume, under the lock: its outcome for the waiters, then the new
 * state, unless a destroy came meanwhile (it goes on from here; the call gets ABORTED). */
/* Records how an operation of kind `out` ended, for its waiters. (L) */
static void outcome_set_locked(Manager *m, Sandbox *sb, int out, RpcCode code, const char *message)
{
	static const char *const names[_OUT_MAX] = {"pause", "resume", "snapshot"};
	OpOutcome *o = &sb->outcome[out];

	op_outcome_locked(m, names[out], code);
	free(o->error);
	o->error = message ? strdup(message) : NULL;
	o->code = code;
	o->ended++;
}

/* The end of a pause or resume, under the lock: its outcome for the waiters, then the new
 * state, unless a destroy came meanwhile (it goes on from here; the call gets ABORTED). */
static void op_finish_locked(Manager *m, Sandbox *sb, Ember__V1__SandboxState state,
			     const char *reason, RpcCode code, const char *message)
{
	int out = sb->op == SB_OP_RESUME ? OUT_RESUME : OUT_PAUSE;

	if (sb->op == SB_OP_RESUME)
		manager_promise_locked(m, sb, false);
	sb->op = SB_OP_NONE;
	/* the reason was for this operation's end (an expiry's pause): used below or not */
	_cleanup_free_ char *op_reason = TAKE_PTR(sb->op_reason);
	if (sb->destroy_next) {
		_cleanup_free_ char *msg = NULL;
		sb->destroy_next = false;
		if (asprintf(&msg, "sandbox %s was destroyed meanwhile", sb->id) < 0)
			msg = NULL;
		outcome_set_locked(m, sb, out, RPC_ABORTED, msg);
		manager_submit_locked(m, sb, SB_OP_DESTROY);
		sandbox_wake_locked(sb);
		return;
	}
	outcome_set_locked(m, sb, out, code, message);
	sandbox_set_state_locked(m, sb, state, reason);
}

static void log_op_done(Sandbox *sb, const char *op, const char *message_id, uint64_t t0)
{
	uint64_t us = now_us() - t0;

	sandbox_log_event(
		sb, LOG_INFO, message_id, op, NULL, (int64_t)us, "sandbox %s %s in %llu ms", sb->id,
		strcmp(op, "pause") == 0 ? "paused" : "resumed", (unsigned long long)us / 1000);
}

/* FAILED with its saved state kept; whatever still runs or is held goes (best effort: what
 * cannot go is named in the reason, and DestroySandbox tries again). */
static void op_fail(Manager *m, Sandbox *sb, const char *op, const char *message, RpcCode code)
{
	_cleanup_free_ char *rerr = NULL, *reason = NULL;
	int u = sandbox_release_runtime(m, sb, &rerr);

	_cleanup_free_ char *saved = sandbox_saved_path(sb, "vmstate");
	bool kept = saved && access(saved, F_OK) == 0;
	if (asprintf(&reason, "%s%s%s%s", message, u < 0 ? "; releasing it failed: " : "",
		     u < 0 ? rerr ?: "?" : "",
		     kept ? "; its saved state is kept until DestroySandbox" : "") < 0)
		reason = NULL;
	sandbox_log_event(sb, LOG_WARNING, EMBER_MESSAGE_SANDBOX_FAILED, op, NULL, -1,
			  "sandbox %s FAILED: %s", sb->id, reason ?: message);
	(void)sandbox_record_write(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_FAILED,
				   reason ?: message);
	pthread_mutex_lock(&m->lock);
	op_finish_locked(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_FAILED, reason ?: message,
			 code, message);
	pthread_mutex_unlock(&m->lock);
}

/* Replaces the saved state by the one just written (snapshot.new): only once the VMM and its
 * memory server, which may have been serving the old memory file, are gone. */
static int commit_saved_state(Sandbox *sb, const char *new_dir, char **ret_error)
{
	_cleanup_free_ char *dir = sandbox_saved_path(sb, NULL);
	int r;

	if (!dir)
		return -ENOMEM;
	/* The VMM wrote the files without syncing them: a paused sandbox must survive a
	 * reboot. */
	static const char *const files[] = {"vmstate", "mem"};
	for (size_t i = 0; i < ELEMENTSOF(files); i++) {
		_cleanup_free_ char *f = NULL;
		if (asprintf(&f, "%s/%s", new_dir, files[i]) < 0)
			return -ENOMEM;
		r = fsync_path(f);
		if (r < 0)
			return error_set(ret_error, r, "cannot sync %s: %m", f);
	}
	/* Swapped in one step (the old state, if any, ends up in new_dir and goes): at every
	 * moment there is one complete saved state. */
	if (renameat2(AT_FDCWD, new_dir, AT_FDCWD, dir, RENAME_EXCHANGE) < 0) {
		if (errno != ENOENT)
			return error_set(ret_error, -errno, "cannot swap %s and %s: %m", new_dir,
					 dir);
		if (rename(new_dir, dir) < 0)
			return error_set(ret_error, -errno, "cannot rename %s to %s: %m", new_dir,
					 dir);
	}
	r = fsync_path(sb->data_dir);
	if (r >= 0)
		(void)rm_rf(new_dir);
	if (r < 0)
		return error_set(ret_error, r, "cannot sync %s: %m", sb->data_dir);
	return 0;
}

void sandbox_op_pause(Manager *m, Sandbox *sb)
{
	enum {
		P_PAUSE,
		P_SNAPSHOT,
		P_STOP,
		P_COMMIT,
		P_DISK,
		P_SLOT,
		P_RUNDIR,
		P_N
	};
	static const char *const names[P_N] = {"pause-vm", "snapshot", "stop-vmm", "commit",
					       "disk",     "slot",     "run-dir"};
	_cleanup_free_ char *err = NULL, *new_dir = NULL, *vmstate = NULL, *mem = NULL;
	const char *failed = NULL;
	uint64_t t0 = now_us();
	OpTiming timing;
	int i, r = 0;

	timing_begin(&timing, "pause");
	if (asprintf(&new_dir, "%s/snapshot.new", sb->data_dir) < 0 ||
	    asprintf(&vmstate, "%s/vmstate", new_dir) < 0 || asprintf(&mem, "%s/mem", new_dir) < 0)
		r = -ENOMEM;
	/* PAUSING on record first: a restart then knows the VM may be paused inside its VMM,
	 * and puts it back to RUNNING, or makes it FAILED, rather than adopting it as it is. */
	if (r >= 0 && (r = sandbox_record_write(
			       m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSING, NULL)) < 0)
		failed = "record";
	if (r >= 0)
		crash_point("pause", "start");
	for (i = 0; r >= 0 && i < P_N; i++) {
		uint64_t ts = now_us();
		free(err);
		err = NULL;
		if (aborted(m, sb))
			r = error_set(&err, -ECANCELED, "destroyed while pausing");
		else
			switch (i) {
			case P_PAUSE:
				r = fcctl_vm_pause(sb->vm, &err);
				break;
			case P_SNAPSHOT:
				(void)rm_rf(new_dir);
				r = mkdir_p(new_dir, 0700);
				if (r < 0)
					r = error_set(&err, r, "cannot create %s: %m", new_dir);
				else
					r = snapshot_create_timed(m, sb, vmstate, mem, &err);
				break;
			case P_STOP:
				r = release_processes(m, sb, &err);
				break;
			case P_COMMIT:
				r = commit_saved_state(sb, new_dir, &err);
				/* PAUSED on record as soon as the saved state is in place: what is
				 * left (disk, slot, run dir) a restart's reclaim releases too. */
				if (r >= 0 &&
				    (r = sandbox_record_write(
					     m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSED,
					     NULL)) < 0)
					err = strdup("cannot write the record");
				break;
			case P_DISK:
				r = release_disk(m, sb, &err);
				break;
			case P_SLOT:
				r = release_slot(m, sb, &err);
				break;
			case P_RUNDIR:
				r = release_run_dir(sb, &err);
				break;
			}
		log_step(sb, "pause", names[i], now_us() - ts, r, err);
		timing_step(&timing, names[i], now_us() - ts);
		if (r < 0)
			failed = names[i];
	}
	timing_end(m, sb, &timing, t0, failed);

	if (r >= 0) {
		/* PAUSED goes on record first: a crash now must not lose a finished pause. */
		/* An expiry's pause ends PAUSED with its reason (sb->op_reason, which nothing
		 * changes while the operation runs). */
		r = sandbox_record_write(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSED,
					 sb->op_reason);
		if (r >= 0) {
			pthread_mutex_lock(&m->lock);
			op_finish_locked(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSED,
					 sb->op_reason, RPC_OK, NULL);
			pthread_mutex_unlock(&m->lock);
			log_op_done(sb, "pause", EMBER_MESSAGE_SANDBOX_PAUSED, t0);
			return;
		}
		failed = "record";
	}

	_cleanup_free_ char *msg = NULL;
	if (asprintf(&msg, "pause of sandbox %s failed at step %s: %s", sb->id, failed ?: "?",
		     err ?: strerror(-r)) < 0)
		msg = NULL;
	if (r == -ECANCELED) {
		/* The destroy that asked takes everything from here. */
		pthread_mutex_lock(&m->lock);
		op_finish_locked(m, sb, sb->state, sb->state_reason, RPC_ABORTED, msg);
		pthread_mutex_unlock(&m->lock);
		return;
	}
	if (i - 1 <= P_SNAPSHOT) {
		/* The VMM still runs: the VM goes on as it was (resumed if the pause got that
		 * far), RUNNING on record again, and the call fails. */
		_cleanup_free_ char *rerr = NULL;
		int k = ensure_vm_running(m, sb, &rerr);
		if (k >= 0)
			k = sandbox_record_write(
				m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING, NULL);
		(void)rm_rf(new_dir);
		if (k >= 0) {
			sandbox_log_event(sb, LOG_WARNING, EMBER_MESSAGE_SANDBOX_PAUSE_FAILED,
					  "pause", NULL, -1, "sandbox %s: %s; it runs on", sb->id,
					  msg ?: "pause failed");
			pthread_mutex_lock(&m->lock);
			op_finish_locked(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING,
					 NULL, code_of(r), msg);
			pthread_mutex_unlock(&m->lock);
			return;
		}
		_cleanup_free_ char *both = NULL;
		if (asprintf(&both, "%s; resuming the VM failed too: %s", msg ?: "pause failed",
			     rerr ?: strerror(-k)) < 0)
			both = NULL;
		op_fail(m, sb, "pause", both ?: "pause failed", code_of(r));
		return;
	}
	op_fail(m, sb, "pause", msg ?: "pause failed", code_of(r));
}

/* ember-uffd on a memory file that it only reads: a sandbox's own saved state, or a
 * snapshot's, shared by every sandbox created from it. A shared one gets a working set beside
 * it, recorded by the first create and replayed by the next ones. */
static int step_uffd(Manager *m, Sandbox *sb, const char *mem, bool shared, char **ret_error)
{
	_cleanup_free_ char *ws = NULL;
	FcUffdSpawn spawn = {
		.binary = m->vmm.uffd,
		.id = sb->id,
		.workdir = sb->run_dir,
		.mem_path = mem,
		.prefetch = m->config->uffd_prefetch,
		.stats_file = UFFD_STATS_FILE,
	};
	int r;

	if (shared && m->config->uffd_working_set) {
		if (asprintf(&ws, "%s.ws", mem) < 0)
			return error_set(ret_error, -ENOMEM, "out of memory");
		spawn.working_set = ws;
	}
	if (!m->vmm.uffd)
		return error_set(ret_error, -ENOENT, "ember-uffd is not found ([vmm] uffd_bin)");
	r = fcctl_uffd_spawn(&spawn, &sb->uffd, ret_error);
	if (r < 0)
		return r;
	sb->uffd_pid = fcctl_vm_pid(sb->uffd);
	pthread_mutex_lock(&m->lock);
	sb->uffd_counted = true;
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static int step_load(Manager *m, Sandbox *sb, const char *vmstate, bool fork, char **ret_error)
{
	/* Every sandbox has the same names (DESIGN.md §4), so the overrides name what the
	 * snapshot already holds; they are given for a fork all the same, so that a snapshot
	 * taken with other names (an older node) still lands on this sandbox's TAP and socket. */
	static const FcNetOverride net[] = {{.iface_id = "eth0", .host_dev_name = NETNS_TAP_NAME}};
	FcSnapshotLoad load = {
		.snapshot_path = vmstate,
		.uffd = true,
		.backend_path = FCCTL_UFFD_SOCK, /* relative to the VMM's working directory */
		.resume = true,
		.net_overrides = fork ? net : NULL,
		.n_net_overrides = fork ? ELEMENTSOF(net) : 0,
		.vsock_override = fork ? "v.sock" : NULL,
	};

	/* The load may touch much of the memory before it answers (fcsim checks every page;
	 * Firecracker's devices restore theirs), each page a fault served by ember-uffd: it gets
	 * the time a boot gets, not an ordinary API call's. */
	fcctl_vm_set_timeout(sb->vm, sandbox_mem_op_timeout_ms(m, sb));
	int r = fcctl_snapshot_load(sb->vm, &load, ret_error);
	fcctl_vm_set_timeout(sb->vm, 10000);
	return r;
}

void sandbox_op_resume(Manager *m, Sandbox *sb)
{
	enum {
		R_SLOT,
		R_DISK,
		R_RUNDIR,
		R_UFFD,
		R_SPAWN,
		R_LOAD,
		R_GUEST,
		R_N
	};
	static const char *const names[R_N] = {"slot",  "disk", "run-dir",    "memory-server",
					       "spawn", "load", "guest-agent"};
	_cleanup_free_ char *err = NULL, *mem = sandbox_saved_path(sb, "mem"),
			    *vmstate = sandbox_saved_path(sb, "vmstate");
	const char *failed = NULL;
	uint64_t t0 = now_us();
	OpTiming timing;
	int i, r = 0;

	timing_begin(&timing, "resume");
	/* RESUMING on record first: a restart then stops what was started and puts the sandbox
	 * back to PAUSED (or FAILED once its guest may have run, see R_LOAD). */
	r = sandbox_record_write(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RESUMING, NULL);
	if (r < 0)
		failed = "record";
	else
		crash_point("resume", "start");
	for (i = 0; r >= 0 && i < R_N; i++) {
		uint64_t ts = now_us();
		StorageDiskSpec spec = sandbox_disk_spec(sb);
		free(err);
		err = NULL;
		if (aborted(m, sb))
			r = error_set(&err, -ECANCELED, "destroyed while resuming");
		else
			switch (i) {
			case R_SLOT:
				r = step_slot(m, sb, &err);
				break;
			case R_DISK:
				r = storage_disk_restore(m->storage, &spec, &sb->device, &err);
				break;
			case R_RUNDIR:
				r = step_run_dir(sb, true, &err);
				break;
			case R_UFFD:
				r = mem ? step_uffd(m, sb, mem, false, &err) : -ENOMEM;
				break;
			case R_SPAWN:
				r = step_spawn(m, sb, &err);
				break;
			case R_LOAD:
				/* From here the guest runs and may write its disk: its saved
				 * memory no longer matches the disk, and a restart cannot just
				 * call it PAUSED again. */
				sb->resume_loading = true;
				r = sandbox_record_write(m, sb, 0, NULL);
				if (r >= 0)
					r = vmstate ? step_load(m, sb, vmstate, false, &err)
						    : -ENOMEM;
				break;
			case R_GUEST:
				r = step_wait_guest(m, sb, &err);
				break;
			}
		log_step(sb, "resume", names[i], now_us() - ts, r, err);
		timing_step(&timing, names[i], now_us() - ts);
		if (r < 0)
			failed = names[i];
	}
	timing_end(m, sb, &timing, t0, failed);
	sb->resume_loading = false;

	if (r >= 0) {
		r = sandbox_record_write(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING,
					 NULL);
		if (r < 0)
			failed = "record";
	}
	if (r >= 0) {
		int w = manager_watch_vmm(m, sb);
		if (w < 0)
			log_sandbox_errno(LOG_ERR, w, sb, ": cannot watch its VMM");
		pthread_mutex_lock(&m->lock);
		bool destroyed = sb->destroy_next;
		op_finish_locked(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING, NULL,
				 RPC_OK, NULL);
		/* An exit the loop saw while we still owned the processes was left to us. */
		if (!destroyed && vmm_or_uffd_exited(sb))
			manager_submit_locked(m, sb, SB_OP_REAP);
		pthread_mutex_unlock(&m->lock);
		if (!destroyed)
			log_op_done(sb, "resume", EMBER_MESSAGE_SANDBOX_RESUMED, t0);
		return;
	}

	_cleanup_free_ char *msg = NULL;
	if (asprintf(&msg, "resume of sandbox %s failed at step %s: %s", sb->id, failed ?: "?",
		     err ?: strerror(-r)) < 0)
		msg = NULL;
	if (r == -ECANCELED) {
		pthread_mutex_lock(&m->lock);
		op_finish_locked(m, sb, sb->state, sb->state_reason, RPC_ABORTED, msg);
		pthread_mutex_unlock(&m->lock);
		return;
	}
	if (i - 1 <= R_SLOT) {
		/* Nothing was touched: it stays PAUSED, and a later resume may find a slot. */
		sandbox_log_event(sb, LOG_WARNING, EMBER_MESSAGE_SANDBOX_RESUME_FAILED, "resume",
				  NULL, -1, "sandbox %s: %s; it stays PAUSED", sb->id,
				  msg ?: "resume failed");
		(void)release_slot(m, sb, NULL); /* the admission's count */
		(void)sandbox_record_write(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSED,
					   NULL);
		pthread_mutex_lock(&m->lock);
		op_finish_locked(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSED, NULL,
				 code_of(r), msg);
		pthread_mutex_unlock(&m->lock);
		return;
	}
	op_fail(m, sb, "resume", msg ?: "resume failed", code_of(r));
}

/* ---- snapshot ---- */

typedef enum SnapStep {
	T_PAUSE,     /* running: PATCH /vm Paused */
	T_SNAPSHOT,  /* running: PUT /snapshot/create into the snapshot's directory */
	T_LINK,      /* paused: its saved state, hard-linked (never written again, see pause) */
	T_DISK_UP,   /* paused: the disk's device, to read it */
	T_FLATTEN,   /* base + changes into the snapshot's own sparse image */
	T_DISK_DOWN, /* paused: the device again */
	T_RESUME,    /* running: PATCH /vm Resumed */
	T_COMMIT,    /* sync, record, rename into place */
} SnapStep;

static int link_saved_state(Sandbox *sb, const char *dir, char **ret_error)
{
	static const char *const files[] = {"vmstate", "mem"};

	for (size_t i = 0; i < ELEMENTSOF(files); i++) {
		_cleanup_free_ char *from = sandbox_saved_path(sb, files[i]), *to = NULL;
		if (!from || asprintf(&to, "%s/%s", dir, files[i]) < 0)
			return -ENOMEM;
		if (link(from, to) < 0)
			return error_set(ret_error, -errno, "cannot link %s to %s: %m", from, to);
	}
	return 0;
}

void sandbox_op_snapshot(Manager *m, Sandbox *sb)
{
	typedef struct {
		const char *name;
		SnapStep id;
	} SnapStepDef;
	static const SnapStepDef running_steps[] = {
		{"pause-vm", T_PAUSE},   {"snapshot", T_SNAPSHOT}, {"flatten", T_FLATTEN},
		{"resume-vm", T_RESUME}, {"commit", T_COMMIT},
	};
	static const SnapStepDef paused_steps[] = {
		{"link-saved-state", T_LINK}, {"disk-up", T_DISK_UP}, {"flatten", T_FLATTEN},
		{"disk-down", T_DISK_DOWN},   {"commit", T_COMMIT},
	};
	_cleanup_free_ char *err = NULL, *tmp = NULL, *vmstate = NULL, *mem = NULL, *rootfs = NULL;
	StorageDiskSpec spec = sandbox_disk_spec(sb);
	const char *failed = NULL;
	uint64_t t0 = now_us();
	bool vm_paused = false, disk_up = false;
	int r = 0;

	pthread_mutex_lock(&m->lock);
	Snapshot *snap = sb->taking;
	pthread_mutex_unlock(&m->lock);
	char snap_id[64];
	snprintf(snap_id, sizeof(snap_id), "%s", snap->id); /* snap may go once it is ready */
	/* Only a running sandbox has a VMM, and this operation owns it until it ends. */
	bool running = sb->vm != NULL;
	const SnapStepDef *steps = running ? running_steps : paused_steps;
	size_t n = running ? ELEMENTSOF(running_steps) : ELEMENTSOF(paused_steps);

	if (asprintf(&tmp, "%s/.tmp-%s", m->snapshots_dir, snap->id) < 0 ||
	    asprintf(&vmstate, "%s/vmstate", tmp) < 0 || asprintf(&mem, "%s/mem", tmp) < 0 ||
	    asprintf(&rootfs, "%s/rootfs.ext4", tmp) < 0)
		r = -ENOMEM;
	if (r >= 0) {
		(void)rm_rf(tmp);
		r = mkdir_p(tmp, 0700);
		if (r < 0)
			r = error_set(&err, r, "cannot create %s: %m", tmp);
	}
	/* No abort check: DestroySandbox lets a snapshot finish first (node.proto). */
	for (size_t i = 0; r >= 0 && i < n; i++) {
		uint64_t ts = now_us();
		free(err);
		err = NULL;
		switch (steps[i].id) {
		case T_PAUSE:
			r = fcctl_vm_pause(sb->vm, &err);
			vm_paused = r >= 0;
			break;
		case T_SNAPSHOT:
			r = snapshot_create_timed(m, sb, vmstate, mem, &err);
			break;
		case T_LINK:
			r = link_saved_state(sb, tmp, &err);
			break;
		case T_DISK_UP: {
			_cleanup_free_ char *dev = NULL;
			r = storage_disk_restore(m->storage, &spec, &dev, &err);
			disk_up = r >= 0;
			break;
		}
		case T_FLATTEN:
			r = storage_disk_flatten(m->storage, &spec, rootfs, &err);
			break;
		case T_DISK_DOWN:
			r = storage_disk_remove(m->storage, &spec, &err);
			disk_up = r < 0;
			break;
		case T_RESUME:
			r = fcctl_vm_resume(sb->vm, &err);
			vm_paused = r < 0;
			break;
		case T_COMMIT:
			r = snapshot_commit(snap, tmp, &err);
			break;
		}
		log_step(sb, "snapshot", steps[i].name, now_us() - ts, r, err);
		if (r < 0)
			failed = steps[i].name;
	}

	_cleanup_free_ char *msg = NULL;
	if (r < 0 && asprintf(&msg, "snapshot %s of sandbox %s failed at step %s: %s", snap->id,
			      sb->id, failed ?: "?", err ?: strerror(-r)) < 0)
		msg = NULL;
	/* Whatever the outcome, the sandbox goes on as it was: its VM runs (a pause that timed
	 * out may have happened all the same), or, if it cannot, its VMM is stopped so that the
	 * exit check below makes it FAILED rather than RUNNING and frozen. */
	_cleanup_free_ char *uerr = NULL;
	if (running && (vm_paused || r < 0) && ensure_vm_running(m, sb, &uerr) < 0) {
		FcExit ex;
		log_sandbox(LOG_ERR, sb,
			    ": cannot resume its VM after snapshot %s: %s; stopping it", snap_id,
			    uerr ?: "failed");
		(void)fcctl_vm_stop(sb->vm, VMM_STOP_TIMEOUT_MS, &ex);
	}
	if (disk_up && storage_disk_remove(m->storage, &spec, &uerr) < 0)
		log_sandbox(LOG_WARNING, sb, ": cannot take its disk down after snapshot %s: %s",
			    snap_id, uerr ?: "failed");
	if (r < 0)
		(void)rm_rf(tmp);

	pthread_mutex_lock(&m->lock);
	sb->taking = NULL;
	sb->op = SB_OP_NONE;
	if (r >= 0) {
		snap->ready = true;
		outcome_set_locked(m, sb, OUT_SNAPSHOT, RPC_OK, NULL);
	} else {
		snapshot_discard_locked(m, snap);
		outcome_set_locked(m, sb, OUT_SNAPSHOT, code_of(r), msg);
	}
	if (sb->destroy_next) {
		/* A destroy waited for the snapshot: it goes on now. */
		sb->destroy_next = false;
		manager_submit_locked(m, sb, SB_OP_DESTROY);
	} else if (running && vmm_or_uffd_exited(sb)) {
		/* An exit the event loop saw while the snapshot owned the processes was left to
		 * us (the loop only hands exits of idle sandboxes to the reaper). */
		manager_submit_locked(m, sb, SB_OP_REAP);
	}
	sandbox_wake_locked(sb);
	pthread_mutex_unlock(&m->lock);
	if (r >= 0) {
		char dur[32];
		snprintf(dur, sizeof(dur), "%llu", (unsigned long long)(now_us() - t0));
		log_struct(LOG_INFO, 0,
			   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_SANDBOX_SNAPSHOT},
				      {"SANDBOX_ID", sb->id}, {"TEMPLATE_ID", sb->template_id},
				      {"SNAPSHOT_ID", snap_id}, {"OP", "snapshot"},
				      {"DURATION_US", dur}),
			   "snapshot %s of sandbox %s taken in %llu ms", snap_id, sb->id,
			   (unsigned long long)(now_us() - t0) / 1000);
	} else {
		log_struct(LOG_WARNING, 0,
			   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_SANDBOX_SNAPSHOT_FAILED},
				      {"SANDBOX_ID", sb->id}, {"TEMPLATE_ID", sb->template_id},
				      {"SNAPSHOT_ID", snap_id}, {"OP", "snapshot"},
				      {"STEP", failed}),
			   "%s", msg ?: "snapshot failed");
	}
}

/* ---- a template's boot snapshot ---- */

int template_boot_snapshot(Manager *m, Template *t, const char *dir, unsigned vcpus, unsigned mib,
			   char **ret_error)
{
	/* A cold create's steps, then the snapshot's own. */
	static const char *const snap_names[] = {"pause-vm", "snapshot", "flatten"};
	const size_t n_cold = ELEMENTSOF(cold_steps), n = n_cold + ELEMENTSOF(snap_names);
	_cleanup_free_ char *err = NULL, *vmstate = NULL, *mem = NULL, *rootfs = NULL;
	uint8_t rnd[8];
	char id[32];
	int r = 0;

	/* A sandbox of its own, never in the registry: no scheduler sees it. Its id only names
	 * its devices, slot and directories; random, so that it meets no sandbox's. Its data
	 * directory starts with a dot: a restart after a crash removes it (recover.c). */
	if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd))
		return error_set(ret_error, -EIO, "getrandom failed");
	snprintf(id, sizeof(id), "boot-%02x%02x%02x%02x%02x%02x%02x%02x", rnd[0], rnd[1], rnd[2],
		 rnd[3], rnd[4], rnd[5], rnd[6], rnd[7]);
	Sandbox *sb = sandbox_new(id);
	if (!sb)
		return -ENOMEM;
	sb->refs = 1;
	sb->tmpl = t;
	sb->boot_vm = true;
	sb->spec.vcpu_count = vcpus;
	sb->spec.memory_mib = mib;
	sb->spec.disk_size_mib = m->config->default_disk_mib;
	if (!(sb->template_id = strdup(t->id)) || !(sb->spec.template_id = strdup(t->id)) ||
	    !(sb->fc_version = strdup(m->vmm.version)) ||
	    asprintf(&sb->data_dir, "%s/.%s", m->sandboxes_dir, id) < 0 ||
	    asprintf(&sb->run_dir, "%s/%s", m->run_sandboxes_dir, id) < 0 ||
	    asprintf(&sb->cow_path, "%s/cow.img", sb->data_dir) < 0 ||
	    asprintf(&vmstate, "%s/vmstate", dir) < 0 || asprintf(&mem, "%s/mem", dir) < 0 ||
	    asprintf(&rootfs, "%s/rootfs.ext4", dir) < 0) {
		sandbox_unref(m, sb);
		return -ENOMEM;
	}
	r = mkdir_p(sb->data_dir, 0700);
	if (r < 0)
		r = error_set(&err, r, "cannot create %s: %m", sb->data_dir);
	size_t i;
	const char *name = "setup";
	for (i = 0; r >= 0 && i < n; i++) {
		uint64_t ts = now_us();
		StorageDiskSpec spec = sandbox_disk_spec(sb);
		free(err);
		err = NULL;
		name = i < n_cold ? cold_steps[i].name : snap_names[i - n_cold];
		if (i < n_cold)
			r = create_step(m, sb, cold_steps[i].id, &err);
		else if (i == n_cold)
			r = fcctl_vm_pause(sb->vm, &err);
		else if (i == n_cold + 1)
			r = snapshot_create_timed(m, sb, vmstate, mem, &err);
		else
			r = storage_disk_flatten(m->storage, &spec, rootfs, &err);
		log_step(sb, "template-snapshot", name, now_us() - ts, r, err);
	}
	_cleanup_free_ char *rerr = NULL;
	int u = sandbox_release_runtime(m, sb, &rerr);
	if (u < 0)
		log_warning("template %s: releasing the sandbox that booted it: %s", t->id,
			    rerr ?: "failed");
	(void)sandbox_remove_files(sb, NULL);
	for (const char *const *f = (const char *const[]){vmstate, mem, rootfs, NULL}; r >= 0 && *f;
	     f++)
		if ((r = fsync_path(*f)) < 0) {
			name = "sync";
			err = strdup("cannot sync the snapshot's files");
		}
	if (r < 0)
		r = error_set(ret_error, r, "boot snapshot of template %s failed at step %s: %s",
			      t->id, name, err ?: strerror(-r));
	sandbox_unref(m, sb);
	return r;
}
