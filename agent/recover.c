/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Start-up: the agent is not the sandboxes (DESIGN.md §8). Read every sandbox record, adopt
 * the VMMs that are still alive (pidfd plus fcctl's /proc checks), re-take their disks and
 * network slots, mark those whose VMM died FAILED, finish or undo what a crash interrupted
 * (a create is undone, a destroy finished), and reclaim what no record claims: namespaces,
 * dm devices and loops, VMM processes and run directories. Only under this agent's own
 * state_dir, run_dir and netns_dir: another emberd's sandboxes are never touched.
 */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common/error.h"
#include "common/fileio.h"
#include "common/id.h"
#include "common/log.h"
#include "messages.h"
#include "node-sandbox.h"

static Ember__V1__SandboxState state_from_name(const char *name)
{
	_cleanup_free_ char *full = NULL;
	const ProtobufCEnumValue *v;

	if (!name || asprintf(&full, "SANDBOX_STATE_%s", name) < 0)
		return EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_UNSPECIFIED;
	v = protobuf_c_enum_descriptor_get_value_by_name(&ember__v1__sandbox_state__descriptor,
							 full);
	return v ? (Ember__V1__SandboxState)v->value
		 : EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_UNSPECIFIED;
}

static int sandbox_from_record(Manager *m, const char *id, json_object *o, Sandbox **ret,
			       pid_t *ret_pid, const char **ret_binary)
{
	Sandbox *sb;
	json_object *v;
	const char *s;
	int r;

	s = json_get_string(o, "id");
	if (!s || strcmp(s, id) != 0)
		return -EBADMSG;
	sb = sandbox_new(id);
	if (!sb)
		return -ENOMEM;
	if (!json_object_object_get_ex(o, "spec", &v) || sb_spec_from_json(v, &sb->spec) < 0)
		goto bad;
	s = json_get_string(o, "template_id");
	sb->template_id = strdup(s ?: "");
	sb->state = state_from_name(json_get_string(o, "state"));
	s = json_get_string(o, "state_reason");
	sb->state_reason = s && s[0] ? strdup(s) : NULL;
	sb->revision = json_get_u64(o, "revision");
	if (json_object_object_get_ex(o, "create_time", &v))
		timespec_from_json(v, &sb->create_time);
	if (json_object_object_get_ex(o, "update_time", &v))
		timespec_from_json(v, &sb->update_time);
	s = json_get_string(o, "firecracker_version");
	sb->fc_version = strdup(s ?: "");
	*ret_pid = json_object_object_get_ex(o, "vmm_pid", &v) ? (pid_t)json_object_get_int(v) : -1;
	*ret_binary = json_get_string(o, "vmm_binary");
	sb->uffd_pid =
		json_object_object_get_ex(o, "uffd_pid", &v) ? (pid_t)json_object_get_int(v) : -1;
	if (json_object_object_get_ex(o, "last_operation", &v))
		op_timing_from_json(v, &sb->last_op);
	s = json_get_string(o, "cow_path");
	if (!s || !sb->template_id || !sb->fc_version ||
	    sb->state == EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_UNSPECIFIED)
		goto bad;
	sb->cow_path = strdup(s);
	if (asprintf(&sb->data_dir, "%s/%s", m->sandboxes_dir, id) < 0 ||
	    asprintf(&sb->run_dir, "%s/%s", m->run_sandboxes_dir, id) < 0 || !sb->cow_path) {
		r = -ENOMEM;
		goto fail;
	}
	sb->tmpl = manager_template_find_locked(m, sb->template_id);
	if (!sb->tmpl)
		goto bad;
	json_object *br;
	sb->boot_restore =
		json_object_object_get_ex(o, "boot_restore", &br) && json_object_get_boolean(br);
	if (sb->boot_restore && !sb->tmpl->boot.present)
		goto bad;
	/* Snapshots are loaded first, and one with dependents cannot be deleted. */
	if (sb->spec.snapshot_id &&
	    !(sb->snap = manager_snapshot_find_locked(m, sb->spec.snapshot_id)))
		goto bad;
	/* Its create finished in an earlier run: a retry of it returns the sandbox. */
	sb->create_done = true;
	sb->create_code = RPC_OK;
	sb->refs = 0;
	*ret = sb;
	return 0;
bad:
	r = -EBADMSG;
fail:
	sb->refs = 1;
	sandbox_unref_locked(m, sb);
	return r;
}

/* Ends a VMM that belongs to no sandbox we keep: adopted first, so that the pid is surely
 * the VMM and not a process that reused the number. */
static void stop_stray_vmm(pid_t pid, const char *binary, const char *id, const char *run_dir)
{
	_cleanup_free_ char *err = NULL;
	FcVm *vm = NULL;
	FcExit ex;

	if (pid <= 0 || !binary)
		return;
	if (fcctl_vm_adopt(pid, binary, id, run_dir, &vm, &err) < 0)
		return;
	log_info("stopping VMM pid %d of sandbox %s, which is not kept", (int)pid, id);
	(void)fcctl_vm_stop(vm, 5000, &ex);
	fcctl_vm_free(vm);
}

/* A pause that a restart interrupted while the VMM still ran: the VM goes on (resumed if the
 * pause had paused it) and the sandbox is RUNNING again, adopted with its memory server if it
 * has one. Any failure: < 0 with why, and nothing adopted. */
static int finish_interrupted_pause(Manager *m, Sandbox *sb, pid_t pid, const char *binary,
				    const char *uffd_binary, char **ret_why)
{
	_cleanup_free_ char *err = NULL, *state = NULL, *version = NULL, *new_dir = NULL;
	int r = fcctl_vm_adopt(pid, binary, sb->id, sb->run_dir, &sb->vm, &err);

	if (r < 0)
		return error_set(ret_why, r, "its VMM is gone (%s)", err ?: "?");
	if (sb->uffd_pid > 0) {
		r = uffd_binary && uffd_binary[0]
			    ? fcctl_vm_adopt(sb->uffd_pid, uffd_binary, sb->id, sb->run_dir,
					     &sb->uffd, &err)
			    : -ESRCH;
		if (r < 0) {
			r = error_set(ret_why, r, "its memory server is gone");
			goto fail;
		}
	}
	/* A dump the crash interrupted may still be running in the VMM: wait as long as one
	 * may take. */
	fcctl_vm_set_timeout(sb->vm, sandbox_mem_op_timeout_ms(m, sb));
	r = fcctl_describe(sb->vm, &state, &version, &err);
	if (r >= 0 && state && strcmp(state, "Paused") == 0)
		r = fcctl_vm_resume(sb->vm, &err);
	if (r < 0) {
		r = error_set(ret_why, r, "its VM cannot be resumed (%s)", err ?: "?");
		goto fail;
	}
	fcctl_vm_set_timeout(sb->vm, 10000);
	sb->state = EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING;
	sb->uffd_counted = sb->uffd != NULL; /* not published yet: no lock needed */
	if (asprintf(&new_dir, "%s/snapshot.new", sb->data_dir) >= 0)
		(void)rm_rf(new_dir);
	return 0;
fail:
	if (sb->uffd) {
		fcctl_vm_free(sb->uffd);
		sb->uffd = NULL;
	}
	FcExit ex;
	(void)fcctl_vm_stop(sb->vm, 5000, &ex);
	fcctl_vm_free(sb->vm);
	sb->vm = NULL;
	return r;
}

/* An adopted VM must run: a CreateSnapshot that a restart interrupted may have left it paused
 * inside its VMM. */
static void ensure_running(Manager *m, Sandbox *sb)
{
	_cleanup_free_ char *err = NULL, *state = NULL, *version = NULL;

	fcctl_vm_set_timeout(sb->vm, sandbox_mem_op_timeout_ms(m, sb));
	if (fcctl_describe(sb->vm, &state, &version, &err) >= 0 && state &&
	    strcmp(state, "Paused") == 0) {
		if (fcctl_vm_resume(sb->vm, &err) >= 0)
			log_sandbox(LOG_INFO, sb,
				    ": its VM was left paused (a snapshot interrupted by a "
				    "restart): resumed");
		else
			log_sandbox(LOG_WARNING, sb, ": its VM is paused and cannot be resumed: %s",
				    err ?: "?");
	}
	fcctl_vm_set_timeout(sb->vm, 10000);
}

/* Processes working in one of our run directories whose sandbox is not kept: a VMM (or
 * helper) that a crash left without a record. */
static unsigned reclaim_processes(Manager *m, char **keep, size_t n_keep)
{
	_cleanup_(closedirp) DIR *d = opendir("/proc");
	size_t len = strlen(m->run_sandboxes_dir);
	struct dirent *de;
	unsigned killed = 0;

	while (d && (de = readdir(d))) {
		char path[64], cwd[PATH_MAX];
		ssize_t n;
		pid_t pid = (pid_t)atoi(de->d_name);

		if (pid <= 0 || pid == getpid())
			continue;
		snprintf(path, sizeof(path), "/proc/%d/cwd", (int)pid);
		n = readlink(path, cwd, sizeof(cwd) - 1);
		if (n <= 0)
			continue;
		cwd[n] = 0;
		if (strncmp(cwd, m->run_sandboxes_dir, len) != 0 || cwd[len] != '/')
			continue;
		char *id = cwd + len + 1;
		id[strcspn(id, "/")] = 0;
		bool kept = false;
		for (size_t i = 0; i < n_keep && !kept; i++)
			kept = strcmp(keep[i], id) == 0;
		if (kept)
			continue;
		int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
		if (pidfd < 0)
			continue;
		/* The cwd again, through the pidfd's process: the pid cannot have been reused
		 * between the check and the kill. */
		n = readlink(path, cwd, sizeof(cwd) - 1);
		if (n > 0 && (size_t)n > len && strncmp(cwd, m->run_sandboxes_dir, len) == 0 &&
		    syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0) == 0) {
			/* Gone before reclaim goes on: it may hold a disk or a namespace. */
			struct pollfd p = {.fd = pidfd, .events = POLLIN};
			(void)poll(&p, 1, 5000);
			log_info("killed process %d left in %.*s by an earlier run", (int)pid,
				 (int)n, cwd);
			killed++;
		}
		close(pidfd);
	}
	return killed;
}

static void drop_loaded(Manager *m, Sandbox **loaded, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		loaded[i]->refs = 1;
		sandbox_unref_locked(m, loaded[i]);
	}
}

static int str_list_push(StrList *l, const char *s)
{
	char **n = realloc(l->items, (l->n + 2) * sizeof(char *));

	if (!n)
		return -ENOMEM;
	l->items = n;
	if (!(l->items[l->n] = strdup(s)))
		return -ENOMEM;
	l->n++;
	return 0;
}

/* The order matters: processes first (a stray VMM holds its disk and namespace), then the
 * network, the disks, and only then the files of what was undone (a CoW file is how storage
 * reclaim knows a device is ours). */
int manager_recover(Manager *m, char **ret_error)
{
	_cleanup_free_ Sandbox **loaded = NULL;
	_cleanup_free_ char **keep = NULL;
	_cleanup_(str_list_done) StrList undone_dirs = {};
	size_t n_loaded = 0, n_keep = 0, cap = 0;
	unsigned adopted = 0, failed = 0;
	_cleanup_(closedirp) DIR *d = opendir(m->sandboxes_dir);
	struct dirent *de;
	int r;

	while (d && (de = readdir(d))) {
		_cleanup_free_ char *dir = NULL, *rec = NULL, *err = NULL;
		json_object *o = NULL;
		Sandbox *sb = NULL;
		pid_t pid = -1;
		const char *binary = NULL;

		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		if (asprintf(&dir, "%s/%s", m->sandboxes_dir, de->d_name) < 0 ||
		    asprintf(&rec, "%s/sandbox.json", dir) < 0) {
			drop_loaded(m, loaded, n_loaded);
			return -ENOMEM;
		}
		if (strncmp(de->d_name, ".boot-", 6) == 0) {
			/* The sandbox of a template's boot snapshot that a crash interrupted:
			 * reclaim below ends its processes and devices, then it goes. */
			if (str_list_push(&undone_dirs, dir) < 0) {
				drop_loaded(m, loaded, n_loaded);
				return -ENOMEM;
			}
			continue;
		}
		if (!id_is_valid(de->d_name)) {
			record_quarantine(m->config, dir, "not a sandbox id");
			continue;
		}
		r = record_read(rec, &o, &err);
		if (r == -ENOENT) {
			/* A create that crashed before its first record: nothing to keep. */
			if (str_list_push(&undone_dirs, dir) < 0) {
				drop_loaded(m, loaded, n_loaded);
				return -ENOMEM;
			}
			continue;
		}
		if (r >= 0) {
			r = sandbox_from_record(m, de->d_name, o, &sb, &pid, &binary);
			if (r < 0 && !err &&
			    asprintf(&err, "%s: not a usable sandbox record", rec) < 0)
				err = NULL;
		}
		if (r < 0) {
			json_object_put(o);
			record_quarantine(m->config, dir, err ?: "unreadable");
			continue;
		}

		switch (sb->state) {
		case EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING: {
			_cleanup_free_ char *aerr = NULL;
			r = pid > 0 && binary ? fcctl_vm_adopt(pid, binary, sb->id, sb->run_dir,
							       &sb->vm, &aerr)
					      : -ESRCH;
			const char *ubin = json_get_string(o, "uffd_binary");
			_cleanup_free_ char *uerr = NULL;
			bool uffd_gone = false;
			if (r >= 0 && sb->uffd_pid > 0) {
				/* Resumed from saved memory: its memory server must be there too,
				 * or the guest hangs at its next page fault. */
				r = ubin && ubin[0] ? fcctl_vm_adopt(sb->uffd_pid, ubin, sb->id,
								     sb->run_dir, &sb->uffd, &uerr)
						    : -ESRCH;
				if (r < 0) {
					FcExit ex;
					uffd_gone = true;
					(void)fcctl_vm_stop(sb->vm, 5000, &ex);
					fcctl_vm_free(sb->vm);
					sb->vm = NULL;
				}
			}
			if (r >= 0) {
				sb->vmm_pid = pid;
				/* Not published yet (no call reaches this manager before
				 * recovery ends): no lock needed. */
				sb->uffd_counted = sb->uffd != NULL;
				ensure_running(m, sb);
				break;
			}
			_cleanup_free_ char *reason = NULL;
			if ((uffd_gone
				     ? asprintf(&reason,
						"its memory server ember-uffd (pid %d) was gone "
						"when "
						"emberd started: %s",
						(int)sb->uffd_pid, uerr ?: strerror(-r))
				     : asprintf(&reason,
						"its VMM (pid %d) was gone when emberd started: %s",
						(int)pid, aerr ?: strerror(-r))) < 0)
				reason = NULL;
			sb->vmm_pid = -1;
			sb->uffd_pid = -1;
			free(sb->state_reason);
			sb->state_reason = TAKE_PTR(reason);
			sb->state = EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_FAILED;
			failed++;
			log_struct(LOG_WARNING, 0,
				   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_SANDBOX_FAILED},
					      {"SANDBOX_ID", sb->id}, {"OP", "recover"}),
				   "sandbox %s FAILED: %s", sb->id, sb->state_reason ?: "");
			break;
		}
		case EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_FAILED:
		case EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSED:
			/* Nothing runs; the files are all it needs. */
			break;
		case EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSING:
		case EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RESUMING: {
			/* Interrupted half-way: finished one way or the other, never left half
			 * done (reclaim below releases what no kept sandbox holds). */
			bool pausing = sb->state == EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSING;
			json_object *lv;
			bool guest_ran = json_object_object_get_ex(o, "resume_loading", &lv) &&
					 json_object_get_boolean(lv);
			_cleanup_free_ char *why = NULL;
			if (pausing && pid > 0 && binary &&
			    finish_interrupted_pause(m, sb, pid, binary,
						     json_get_string(o, "uffd_binary"),
						     &why) >= 0) {
				sb->vmm_pid = pid;
				log_sandbox(LOG_INFO, sb,
					    ": its pause was interrupted by a restart; its "
					    "VM "
					    "runs on (RUNNING)");
				break;
			}
			stop_stray_vmm(pid, binary, sb->id, sb->run_dir);
			stop_stray_vmm(sb->uffd_pid, json_get_string(o, "uffd_binary"), sb->id,
				       sb->run_dir);
			sb->vmm_pid = sb->uffd_pid = -1;
			if (!pausing && !guest_ran) {
				/* Its guest never ran: the saved state is as the pause left it. */
				sb->state = EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSED;
				free(sb->state_reason);
				sb->state_reason = NULL;
				log_sandbox(LOG_INFO, sb,
					    ": its resume was interrupted by a restart "
					    "before "
					    "its guest ran; it is PAUSED again");
				break;
			}
			free(sb->state_reason);
			if (asprintf(&sb->state_reason,
				     "emberd stopped during its %s%s%s; its saved state is kept "
				     "until "
				     "DestroySandbox",
				     pausing ? "pause" : "resume, after its guest had started",
				     why ? ": " : "", why ?: "") < 0)
				sb->state_reason = NULL;
			sb->state = EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_FAILED;
			failed++;
			log_struct(LOG_WARNING, 0,
				   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_SANDBOX_FAILED},
					      {"SANDBOX_ID", sb->id}, {"OP", "recover"}),
				   "sandbox %s FAILED: %s", sb->id, sb->state_reason ?: "");
			break;
		}
		case EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_CREATING:
		case EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_DESTROYING:
		case EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_DESTROYED:
			/* A create died with the agent: undone, as a failed create is. A destroy:
			 * finished. Either way the sandbox goes; reclaim below removes its
			 * devices, slot and processes, then its files. */
			stop_stray_vmm(pid, binary, sb->id, sb->run_dir);
			log_sandbox(LOG_INFO, sb, " was %s when emberd stopped: removing it",
				    json_get_string(o, "state"));
			r = str_list_push(&undone_dirs, dir);
			sb->refs = 1;
			sandbox_unref_locked(m, sb);
			sb = NULL;
			if (r < 0) {
				json_object_put(o);
				drop_loaded(m, loaded, n_loaded);
				return -ENOMEM;
			}
			break;
		default: {
			/* A state this emberd does not handle (a newer one wrote it): keep its
			 * files for whoever understands them. */
			_cleanup_free_ char *why = NULL;
			if (asprintf(&why, "state %s is not handled by this emberd",
				     json_get_string(o, "state") ?: "?") < 0)
				why = NULL;
			sb->refs = 1;
			sandbox_unref_locked(m, sb);
			sb = NULL;
			record_quarantine(m->config, dir, why ?: "unhandled state");
			break;
		}
		}
		json_object_put(o);
		if (!sb)
			continue;
		if (n_loaded == cap) {
			cap = cap ? cap * 2 : 64;
			Sandbox **nl = realloc(loaded, cap * sizeof(Sandbox *));
			if (nl)
				loaded = nl;
			char **nk = realloc(keep, (cap + 1) * sizeof(char *));
			if (nk)
				keep = nk;
			if (!nl || !nk) {
				sb->refs = 1;
				sandbox_unref_locked(m, sb);
				drop_loaded(m, loaded, n_loaded);
				return -ENOMEM;
			}
		}
		loaded[n_loaded++] = sb;
		if (sb->vm)
			keep[n_keep++] = sb->id;
	}

	/* Processes working in our run directories for no kept sandbox, then the network:
	 * slots of adopted sandboxes stay, every other ember namespace goes. */
	unsigned killed = reclaim_processes(m, keep, n_keep);
	NetnsReclaimResult nres = {};
	_cleanup_free_ char *nerr = NULL;
	r = netns_reclaim(&m->netcfg, (const char *const *)keep, n_keep, &nres, &nerr);
	if (r < 0)
		log_warning("network reclaim: %s", nerr ?: strerror(-r));
	r = netns_pool_new(&m->netcfg, &m->pool, ret_error);
	if (r < 0) {
		drop_loaded(m, loaded, n_loaded);
		return r;
	}

	for (size_t i = 0; i < n_loaded; i++) {
		Sandbox *sb = loaded[i];
		_cleanup_free_ char *err = NULL;

		if (!sb->vm)
			continue;
		r = netns_slot_find(m->pool, sb->id, &sb->slot);
		if (r >= 0) {
			sb->sandbox_ip = strdup(netns_slot_sandbox_ip(sb->slot));
			StorageDiskSpec spec = sandbox_disk_spec(sb);
			r = storage_disk_restore(m->storage, &spec, &sb->device, &err);
		} else if (asprintf(&err, "its network slot is gone") < 0)
			err = NULL;
		if (r < 0) {
			_cleanup_free_ char *rerr = NULL;
			(void)sandbox_release_runtime(m, sb, &rerr);
			free(sb->state_reason);
			if (asprintf(&sb->state_reason, "cannot re-take it after a restart: %s",
				     err ?: strerror(-r)) < 0)
				sb->state_reason = NULL;
			sb->state = EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_FAILED;
			failed++;
			continue;
		}
		sb->slot_user = true;
		m->n_slot_users++;
		adopted++;
		sandbox_log_event(sb, log_level_journal_info(), EMBER_MESSAGE_SANDBOX_ADOPTED,
				  "recover", NULL, -1, "sandbox %s adopted: VMM pid %d%s", sb->id,
				  (int)sb->vmm_pid, sb->uffd ? " with its ember-uffd" : "");
		/* Started without systemd, or by an emberd that crashed between the spawn and the
		 * scope: into the scope now. Already there: only the machine is checked. */
		if (sandbox_scope_enter(m, sb, &err) < 0)
			log_sandbox(LOG_WARNING, sb,
				    ": %s; a restart of emberd.service would end it",
				    err ?: "cannot move it into its systemd scope");
	}

	/* Disks and run directories that no kept sandbox claims, then the files of what was
	 * undone. */
	n_keep = 0;
	for (size_t i = 0; i < n_loaded; i++)
		if (loaded[i]->vm)
			keep[n_keep++] = loaded[i]->id;
	StorageReclaimResult sres = {};
	_cleanup_free_ char *serr = NULL;
	r = storage_reclaim(m->storage, m->config->state_dir, (const char *const *)keep, n_keep,
			    &sres, &serr);
	if (r < 0)
		log_warning("storage reclaim: %s", serr ?: strerror(-r));
	for (size_t i = 0; i < undone_dirs.n; i++)
		if ((r = rm_rf(undone_dirs.items[i])) < 0)
			log_warning_errno(r, "cannot remove %s", undone_dirs.items[i]);
	_cleanup_(closedirp) DIR *rd = opendir(m->run_sandboxes_dir);
	unsigned dirs = 0;
	while (rd && (de = readdir(rd))) {
		bool kept = false, known = false;
		if (de->d_name[0] == '.')
			continue;
		for (size_t i = 0; i < n_keep && !kept; i++)
			kept = strcmp(keep[i], de->d_name) == 0;
		for (size_t i = 0; i < n_loaded && !kept && !known; i++)
			known = strcmp(loaded[i]->id, de->d_name) == 0;
		if (!kept) {
			/* a sandbox without a VMM keeps its console log, as it would have */
			_cleanup_free_ char *p = NULL;
			if (asprintf(&p, "%s/%s", m->run_sandboxes_dir, de->d_name) >= 0 &&
			    run_dir_clear(p, known) >= 0 && !known)
				dirs++;
		}
	}

	pthread_mutex_lock(&m->lock);
	for (size_t i = 0; i < n_loaded; i++) {
		Sandbox *sb = loaded[i];
		manager_insert_locked(m, sb);
		/* Revisions move on from the last run's: record where each sandbox stands. */
		sandbox_set_state_locked(m, sb, sb->state, sb->state_reason);
		/* an end time that passed meanwhile fires once the event loop runs */
		expiry_update_locked(m, sb);
		if (sb->vm)
			sandbox_huge_hold_locked(m, sb);
	}
	pthread_mutex_unlock(&m->lock);
	for (size_t i = 0; i < n_loaded; i++) {
		Sandbox *sb = loaded[i];
		(void)sandbox_record_write(m, sb, 0, NULL);
		if (sb->vm && (r = manager_watch_vmm(m, sb)) < 0)
			log_sandbox_errno(LOG_ERR, r, sb, ": cannot watch its VMM");
		if (sb->vm) {
			/* an emberd before the console log named the VMM's output fc.out: the
			 * VMM writes on into the renamed file */
			_cleanup_free_ char *old = NULL, *log = console_path(sb);
			if (log && asprintf(&old, "%s/fc.out", sb->run_dir) >= 0 &&
			    access(log, F_OK) < 0)
				(void)rename(old, log);
			console_watch(m, sb);
		}
	}

	log_struct(
		LOG_INFO, 0, LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_RECOVERED}, {"OP", "recover"}),
		"recovered %zu sandboxes: %u adopted running, %u failed, %zu unfinished removed; "
		"reclaimed %u namespaces, %u dm devices, %u loops, %u processes, %u run dirs",
		n_loaded, adopted, failed, undone_dirs.n, nres.namespaces_removed, sres.dm_removed,
		sres.loops_detached, killed, dirs);
	return 0;
}
