/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The lifecycle flows (DESIGN.md §8), run on the manager's worker threads. Each step is timed
 * and logged (OP=, STEP=, DURATION_US=); a failure names its step and unwinds every earlier
 * one. Between steps a flow checks whether DestroySandbox asked it to give up.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/error.h"
#include "common/fileio.h"
#include "common/log.h"
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

static void log_step(const Sandbox *sb, const char *op, const char *step, uint64_t us, int r,
		     const char *err)
{
	char dur[32], errno_s[16];

	snprintf(dur, sizeof(dur), "%llu", (unsigned long long)us);
	snprintf(errno_s, sizeof(errno_s), "%d", r < 0 ? -r : 0);
	if (r < 0)
		log_struct(LOG_WARNING, 0,
			   LOG_FIELDS({"SANDBOX_ID", sb->id}, {"OP", op}, {"STEP", step},
				      {"DURATION_US", dur}, {"ERRNO", errno_s}),
			   "sandbox %s: %s: step %s failed after %llu us: %s", sb->id, op, step,
			   (unsigned long long)us, err ?: strerror(-r));
	else
		log_struct(LOG_DEBUG, 0,
			   LOG_FIELDS({"SANDBOX_ID", sb->id}, {"OP", op}, {"STEP", step},
				      {"DURATION_US", dur}),
			   "sandbox %s: %s: %s took %llu us", sb->id, op, step,
			   (unsigned long long)us);
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
	pthread_mutex_unlock(&m->lock);
	r = record_write(path, o);
	json_object_put(o);
	if (r < 0)
		log_error_errno(r, "sandbox %s: cannot write its record %s", sb->id, path);
	return r;
}

static StorageDiskSpec disk_spec(Sandbox *sb)
{
	return (StorageDiskSpec){
		.id = sb->id,
		.base_image = sb->tmpl ? sb->tmpl->rootfs.path : NULL,
		.cow_path = sb->cow_path,
		.cow_size = sb->spec.disk_size_mib << 20,
	};
}

int sandbox_release_runtime(Manager *m, Sandbox *sb, char **ret_error)
{
	int r = 0, k;

	if (sb->vm) {
		FcExit ex;
		manager_unwatch_vmm(m, sb);
		k = fcctl_vm_stop(sb->vm, VMM_STOP_TIMEOUT_MS, &ex);
		if (k < 0) {
			/* Keep it: a later destroy tries again, and the pid stays known. Nothing
			 * below may go while the VMM may still use it. */
			return error_set(ret_error, k, "cannot stop the VMM (pid %d): %m",
					 (int)sb->vmm_pid);
		}
		fcctl_vm_free(sb->vm);
		sb->vm = NULL;
	}
	/* Firecracker has exited: nothing holds the disk any more (DESIGN.md §8). */
	if (sb->device) {
		StorageDiskSpec spec = disk_spec(sb);
		_cleanup_free_ char *err = NULL;
		k = storage_disk_remove(m->storage, &spec, &err);
		if (k < 0 && r >= 0)
			r = error_set(ret_error, k, "cannot remove the disk: %s", err ?: "failed");
		if (k >= 0) {
			free(sb->device);
			sb->device = NULL;
		}
	}
	pthread_mutex_lock(&m->lock);
	if (sb->slot_user) {
		sb->slot_user = false;
		m->n_slot_users--;
	}
	pthread_mutex_unlock(&m->lock);
	if (sb->slot) {
		_cleanup_free_ char *err = NULL;
		k = netns_slot_release(m->pool, sb->slot, &err);
		if (k < 0 && r >= 0)
			r = error_set(ret_error, k, "cannot release the network slot: %s",
				      err ?: "failed");
		sb->slot = NULL;
		pthread_mutex_lock(&m->lock);
		free(sb->sandbox_ip);
		sb->sandbox_ip = NULL;
		pthread_mutex_unlock(&m->lock);
	}
	if (sb->run_dir) {
		k = rm_rf(sb->run_dir);
		if (k < 0 && r >= 0)
			r = error_set(ret_error, k, "cannot remove %s: %m", sb->run_dir);
	}
	return r;
}

/* Removes what is left once the runtime is gone: the CoW file and the record. */
static int sandbox_remove_files(Sandbox *sb, char **ret_error)
{
	int r = rm_rf(sb->data_dir);

	if (r < 0)
		return error_set(ret_error, r, "cannot remove %s: %m", sb->data_dir);
	return 0;
}

/* ---- create ---- */

static int step_slot(Manager *m, Sandbox *sb, char **ret_error)
{
	NetnsPolicy policy = {
		.internet = sb->spec.allow_internet,
		.allow = (const char *const *)sb->spec.allow_cidrs.items,
		.n_allow = sb->spec.allow_cidrs.n,
		.deny = (const char *const *)sb->spec.deny_cidrs.items,
		.n_deny = sb->spec.deny_cidrs.n,
	};
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
	StorageDiskSpec spec = disk_spec(sb);

	return storage_disk_create(m->storage, &spec, &sb->device, ret_error);
}

static int step_run_dir(Sandbox *sb, char **ret_error)
{
	_cleanup_free_ char *link = NULL;
	int r;

	(void)rm_rf(sb->run_dir);
	r = mkdir_p(sb->run_dir, 0700);
	if (r < 0)
		return error_set(ret_error, r, "cannot create %s: %m", sb->run_dir);
	if (asprintf(&link, "%s/rootfs", sb->run_dir) < 0)
		return -ENOMEM;
	if (symlink(sb->device, link) < 0)
		return error_set(ret_error, -errno, "cannot link %s to %s: %m", link, sb->device);
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
		.output = "fc.out",
		.stale = stale,
		.jailer = m->vmm.jailer,
	};
	int r = fcctl_vm_spawn(&spawn, &sb->vm, ret_error);

	if (r < 0)
		return r;
	sb->vmm_pid = fcctl_vm_pid(sb->vm);
	/* The pid goes on record before the VMM is given anything to do: a restart finds and
	 * ends (or adopts) it whatever happens next. */
	return sandbox_record_write(m, sb, 0, NULL);
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
	if ((r = fcctl_put_machine_config(sb->vm, sb->spec.vcpu_count, sb->spec.memory_mib, false,
					  false, FC_HUGE_PAGES_NONE, ret_error)) < 0 ||
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
		if (poll(&p, 1, 0) > 0)
			return error_set(ret_error, -ECHILD,
					 "the VMM exited during boot (its console is in %s/fc.out)",
					 sb->run_dir);
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
		if (now_ms() >= deadline)
			return error_set(ret_error, -ETIMEDOUT,
					 "the guest agent did not answer within %u s (last: %s; "
					 "console in %s/fc.out)",
					 m->config->boot_timeout_s,
					 c ? guest_conn_error(c) : (err ?: strerror(-r)),
					 sb->run_dir);
		/* Nothing to wait on: the agent's socket appears inside the guest. Short naps,
		 * only while this one sandbox boots. */
		(void)poll(&p, 1, 50);
	}
}

/* The outcome goes in place before the sandbox may leave the registry: a waiter woken by the
 * removal must find it. */
static void create_finish_locked(Manager *m, Sandbox *sb, RpcCode code, const char *message)
{
	m->creating_mib -= sb->spec.memory_mib;
	sb->op = SB_OP_NONE;
	sb->create_done = true;
	sb->create_code = code;
	free(sb->create_error);
	sb->create_error = message ? strdup(message) : NULL;
	sandbox_wake_locked(sb);
}

void sandbox_op_create(Manager *m, Sandbox *sb)
{
	static const struct {
		const char *name;
		enum {
			S_SLOT,
			S_DISK,
			S_RUNDIR,
			S_SPAWN,
			S_CONFIGURE,
			S_BOOT,
			S_GUEST
		} id;
	} steps[] = {
		{"slot", S_SLOT},         {"disk", S_DISK},           {"run-dir", S_RUNDIR},
		{"spawn", S_SPAWN},       {"configure", S_CONFIGURE}, {"boot", S_BOOT},
		{"guest-agent", S_GUEST},
	};
	_cleanup_free_ char *err = NULL;
	const char *failed = NULL;
	uint64_t t0 = now_us();
	int r = mkdir_p(sb->data_dir, 0700);

	if (r >= 0)
		r = sandbox_record_write(m, sb, 0, NULL);
	if (r < 0)
		failed = "record";
	for (size_t i = 0; r >= 0 && i < ELEMENTSOF(steps); i++) {
		uint64_t ts = now_us();
		free(err);
		err = NULL;
		if (aborted(m, sb))
			r = error_set(&err, -ECANCELED, "destroyed while creating");
		else
			switch (steps[i].id) {
			case S_SLOT:
				r = step_slot(m, sb, &err);
				break;
			case S_DISK:
				r = step_disk(m, sb, &err);
				break;
			case S_RUNDIR:
				r = step_run_dir(sb, &err);
				break;
			case S_SPAWN:
				r = step_spawn(m, sb, &err);
				break;
			case S_CONFIGURE:
				r = step_configure(m, sb, &err);
				break;
			case S_BOOT:
				r = fcctl_instance_start(sb->vm, &err);
				break;
			case S_GUEST:
				r = step_wait_guest(m, sb, &err);
				break;
			}
		log_step(sb, "create", steps[i].name, now_us() - ts, r, err);
		if (r < 0)
			failed = steps[i].name;
	}

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
			log_error_errno(w, "sandbox %s: cannot watch its VMM", sb->id);
		struct pollfd p = {.fd = fcctl_vm_pidfd(sb->vm), .events = POLLIN};
		pthread_mutex_lock(&m->lock);
		bool abort = sb->abort;
		if (!abort) {
			sandbox_set_state_locked(
				m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING, NULL);
			create_finish_locked(m, sb, RPC_OK, NULL);
			/* An exit the loop saw while we still owned the VMM was left to us. */
			if (poll(&p, 1, 0) > 0)
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
			char dur[32];
			snprintf(dur, sizeof(dur), "%llu", (unsigned long long)(now_us() - t0));
			log_struct(LOG_INFO, 0,
				   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_SANDBOX_CREATED},
					      {"SANDBOX_ID", sb->id},
					      {"TEMPLATE_ID", sb->template_id}, {"OP", "create"},
					      {"DURATION_US", dur}),
				   "sandbox %s created from template %s in %llu ms", sb->id,
				   sb->template_id, (unsigned long long)(now_us() - t0) / 1000);
		}
		return;
	}

	/* Unwind: everything the steps made, in reverse, then the record. */
	_cleanup_free_ char *uerr = NULL;
	int u = sandbox_release_runtime(m, sb, &uerr);
	if (u >= 0)
		u = sandbox_remove_files(sb, &uerr);

	_cleanup_free_ char *msg = NULL;
	RpcCode code = r == -ECANCELED                                 ? RPC_ABORTED
		       : r == -ENOSPC || r == -EDQUOT || r == -ENOBUFS ? RPC_RESOURCE_EXHAUSTED
								       : RPC_INTERNAL;
	if (code == RPC_ABORTED) {
		if (asprintf(&msg, "sandbox %s was destroyed while it was being created", sb->id) <
		    0)
			msg = NULL;
	} else if (asprintf(&msg, "create of sandbox %s failed at step %s: %s", sb->id,
			    failed ?: "?", err ?: strerror(-r)) < 0)
		msg = NULL;
	log_struct(LOG_WARNING, 0,
		   LOG_FIELDS({"SANDBOX_ID", sb->id}, {"TEMPLATE_ID", sb->template_id},
			      {"OP", "create"}, {"STEP", failed ?: "?"}),
		   "%s", msg ?: "create failed");

	if (u < 0) {
		/* Something could not be undone: the sandbox stays, FAILED, so that nothing is
		 * forgotten and DestroySandbox can try again. */
		_cleanup_free_ char *reason = NULL;
		if (asprintf(&reason, "%s; undoing it failed: %s", msg ?: "create failed",
			     uerr ?: strerror(-u)) < 0)
			reason = NULL;
		log_error("sandbox %s: %s", sb->id, reason ?: "undoing a failed create failed");
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
		StorageDiskSpec spec = disk_spec(sb);
		r = storage_disk_remove(m->storage, &spec, &err);
	}
	if (r >= 0)
		r = sandbox_remove_files(sb, &err);
	log_step(sb, "destroy", "release", now_us() - t0, r, err);

	if (r < 0) {
		_cleanup_free_ char *reason = NULL;
		if (asprintf(&reason, "destroy failed: %s", err ?: strerror(-r)) < 0)
			reason = NULL;
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
	char dur[32];
	snprintf(dur, sizeof(dur), "%llu", (unsigned long long)(now_us() - t0));
	log_struct(LOG_INFO, 0,
		   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_SANDBOX_DESTROYED},
			      {"SANDBOX_ID", sb->id}, {"OP", "destroy"}, {"DURATION_US", dur}),
		   "sandbox %s destroyed", sb->id);
}

/* ---- a VMM that died ---- */

void sandbox_op_reap(Manager *m, Sandbox *sb)
{
	_cleanup_free_ char *reason = NULL, *err = NULL;
	FcExit ex = {};
	int k;

	if (fcctl_vm_reap(sb->vm, &ex) < 0 || !ex.known)
		k = asprintf(&reason, "the VMM (pid %d) exited unexpectedly", (int)sb->vmm_pid);
	else if (ex.signal)
		k = asprintf(&reason, "the VMM was killed by signal %d (%s)", ex.signal,
			     strsignal(ex.signal));
	else
		k = asprintf(&reason, "the VMM exited unexpectedly with status %d", ex.code);
	if (k < 0)
		reason = NULL;
	log_struct(LOG_WARNING, 0,
		   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_SANDBOX_FAILED}, {"SANDBOX_ID", sb->id},
			      {"OP", "watch"}),
		   "sandbox %s FAILED: %s", sb->id, reason ?: "the VMM exited");
	/* FAILED keeps the disk for inspection (its file), not the devices or the slot. */
	if (sandbox_release_runtime(m, sb, &err) < 0)
		log_warning("sandbox %s: cleaning up after its VMM: %s", sb->id, err ?: "failed");
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
