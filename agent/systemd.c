/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Sandbox scopes and machine registration over sd-bus (see systemd.h).
 *
 * One system-bus connection, used by the manager's worker threads one at a time (sd-bus objects
 * are not thread-safe): every call holds `lock` and has a timeout, so a stuck systemd delays
 * creates by at most that, never for ever. A connection that broke (dbus restarted) is opened
 * again once per call.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

#include "common/error.h"
#include "common/fileio.h"
#include "common/log.h"
#include "systemd.h"

#define SLICE             "ember.slice"
#define CALL_TIMEOUT_USEC (10ULL * 1000 * 1000)
/* systemd moves the processes when it runs the start job, just after it answered the call. */
#define MOVE_TIMEOUT_MS 5000

struct Systemd {
	pthread_mutex_t lock;
	sd_bus *bus;
	bool no_machined; /* (lock) machined is not installed: said once, not asked again */
};

static void bus_error_freep(sd_bus_error *e)
{
	sd_bus_error_free(e);
}
#define _cleanup_bus_error_ _cleanup_(bus_error_freep)

static void bus_message_unrefp(sd_bus_message **m)
{
	sd_bus_message_unref(*m);
}
#define _cleanup_bus_message_ _cleanup_(bus_message_unrefp)

int systemd_scope_name(const char *sandbox_id, char *buf, size_t size)
{
	int n = snprintf(buf, size, "ember-sbx-%s.scope", sandbox_id);

	return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}

int systemd_open(const char *mode, Systemd **ret, char **ret_error)
{
	_cleanup_free_ Systemd *s = NULL;
	bool required = strcmp(mode, "yes") == 0;
	int r;

	*ret = NULL;
	if (strcmp(mode, "no") == 0)
		return 0;
	r = sd_booted();
	if (r <= 0) {
		if (required)
			return error_set(ret_error, r < 0 ? r : -ENOMEDIUM,
					 "[agent] systemd = yes, but this host was not booted "
					 "with systemd");
		log_debug("systemd: not booted with systemd; sandboxes stay in emberd's cgroup");
		return 0;
	}
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	r = sd_bus_open_system(&s->bus);
	if (r < 0) {
		if (required)
			return error_set(ret_error, r,
					 "[agent] systemd = yes, but the system bus "
					 "cannot be reached: %m");
		log_warning_errno(r,
				  "systemd: the system bus cannot be reached (%m): sandboxes stay "
				  "in emberd's cgroup and will not survive a restart of the unit");
		return 0;
	}
	pthread_mutex_init(&s->lock, NULL);
	log_debug("systemd: sandboxes go into scopes under " SLICE);
	*ret = TAKE_PTR(s);
	return 0;
}

void systemd_free(Systemd *s)
{
	if (!s)
		return;
	sd_bus_flush_close_unref(s->bus);
	pthread_mutex_destroy(&s->lock);
	free(s);
}

/* The connection, opened at each call where it is gone (broken, or a reopen failed while the
 * bus restarted). (lock held) */
static int bus_locked(Systemd *s)
{
	return s->bus ? 0 : sd_bus_open_system(&s->bus);
}

/* A call on the bus. A broken connection is dropped, for bus_locked() to reopen. (lock held) */
static int call_locked(Systemd *s, sd_bus_message *m, sd_bus_error *e, sd_bus_message **reply)
{
	int r = sd_bus_call(s->bus, m, CALL_TIMEOUT_USEC, e, reply);

	if (r != -ECONNRESET && r != -ENOTCONN && r != -EPIPE)
		return r;
	sd_bus_error_free(e);
	sd_bus_flush_close_unref(s->bus);
	s->bus = NULL;
	/* A message is sealed to the connection it was first sent on: the caller builds anew,
	 * after bus_locked(). */
	return -EAGAIN;
}

static int append_limits(sd_bus_message *m, const SystemdScope *spec)
{
	uint64_t vcpus = spec->vcpus ? spec->vcpus : 1;
	uint64_t weight = vcpus * 100 > 10000 ? 10000 : vcpus * 100;
	int r;

	r = sd_bus_message_append(m, "(sv)(sv)", "CPUQuotaPerSecUSec", "t", vcpus * 1000000,
				  "CPUWeight", "t", weight);
	if (r >= 0 && spec->memory_max)
		r = sd_bus_message_append(m, "(sv)", "MemoryMax", "t", spec->memory_max);
	return r;
}

static int append_pids(sd_bus_message *m, const SystemdScope *spec)
{
	int r = sd_bus_message_open_container(m, 'a', "u");

	for (size_t i = 0; r >= 0 && i < spec->n_pids; i++)
		r = sd_bus_message_append(m, "u", (uint32_t)spec->pids[i]);
	return r < 0 ? r : sd_bus_message_close_container(m);
}

static int new_call(Systemd *s, const char *method, sd_bus_message **ret)
{
	return sd_bus_message_new_method_call(s->bus, ret, "org.freedesktop.systemd1",
					      "/org/freedesktop/systemd1",
					      "org.freedesktop.systemd1.Manager", method);
}

static int build_start(Systemd *s, const char *unit, const SystemdScope *spec, sd_bus_message **ret)
{
	_cleanup_bus_message_ sd_bus_message *m = NULL;
	char desc[128];
	int r;

	snprintf(desc, sizeof(desc), "ember sandbox %s", spec->sandbox_id);
	r = new_call(s, "StartTransientUnit", &m);
	if (r >= 0)
		r = sd_bus_message_append(m, "ss", unit, "fail");
	if (r >= 0)
		r = sd_bus_message_open_container(m, 'a', "(sv)");
	if (r >= 0)
		/* inactive-or-failed: a scope whose VMM was killed (failed) is not kept around. */
		r = sd_bus_message_append(m, "(sv)(sv)(sv)", "Description", "s", desc, "Slice", "s",
					  SLICE, "CollectMode", "s", "inactive-or-failed");
	if (r >= 0)
		r = append_limits(m, spec);
	if (r >= 0)
		r = sd_bus_message_open_container(m, 'r', "sv");
	if (r >= 0)
		r = sd_bus_message_append(m, "s", "PIDs");
	if (r >= 0)
		r = sd_bus_message_open_container(m, 'v', "au");
	if (r >= 0)
		r = append_pids(m, spec);
	if (r >= 0)
		r = sd_bus_message_close_container(m);
	if (r >= 0)
		r = sd_bus_message_close_container(m);
	if (r >= 0)
		r = sd_bus_message_close_container(m);
	if (r >= 0)
		r = sd_bus_message_append(m, "a(sa(sv))", 0);
	if (r < 0)
		return r;
	*ret = TAKE_PTR(m);
	return 0;
}

static int build_attach(Systemd *s, const char *unit, const SystemdScope *spec,
			sd_bus_message **ret)
{
	_cleanup_bus_message_ sd_bus_message *m = NULL;
	int r = new_call(s, "AttachProcessesToUnit", &m);

	if (r >= 0)
		r = sd_bus_message_append(m, "ss", unit, "");
	if (r >= 0)
		r = append_pids(m, spec);
	if (r < 0)
		return r;
	*ret = TAKE_PTR(m);
	return 0;
}

int systemd_scope_contains(const char *sandbox_id, pid_t pid)
{
	char path[64], unit[128], want[160];
	_cleanup_free_ char *content = NULL;
	int r;

	r = systemd_scope_name(sandbox_id, unit, sizeof(unit));
	if (r < 0)
		return r;
	snprintf(path, sizeof(path), "/proc/%d/cgroup", (int)pid);
	r = read_full_file(path, 4096, &content, NULL);
	if (r < 0)
		return r == -ENOENT ? -ESRCH : r;
	/* cgroup v2: one line "0::/ember.slice/ember-sbx-<id>.scope" */
	snprintf(want, sizeof(want), "0::/" SLICE "/%s\n", unit);
	return strstr(content, want) != NULL;
}

static int wait_moved(const SystemdScope *spec, char **ret_error)
{
	struct timespec pause = {.tv_nsec = 1000000};

	for (int waited = 0;; waited++) {
		size_t in = 0;
		for (size_t i = 0; i < spec->n_pids; i++) {
			int r = systemd_scope_contains(spec->sandbox_id, spec->pids[i]);
			if (r < 0)
				return error_set(ret_error, r,
						 "process %d left before it reached its scope: %m",
						 (int)spec->pids[i]);
			in += r;
		}
		if (in == spec->n_pids)
			return 0;
		if (waited >= MOVE_TIMEOUT_MS)
			return error_set(ret_error, -ETIMEDOUT,
					 "systemd accepted the scope but did not move the "
					 "processes into it within %d ms",
					 MOVE_TIMEOUT_MS);
		nanosleep(&pause, NULL);
	}
}

int systemd_scope_add(Systemd *s, const SystemdScope *spec, char **ret_error)
{
	char unit[128];
	int r;

	if (!s || spec->n_pids == 0)
		return 0;
	r = systemd_scope_name(spec->sandbox_id, unit, sizeof(unit));
	if (r < 0)
		return error_set(ret_error, r, "no scope name for sandbox %s", spec->sandbox_id);
	/* An adopted sandbox's processes are usually there already: no call then. */
	size_t in = 0;
	for (size_t i = 0; i < spec->n_pids; i++)
		in += systemd_scope_contains(spec->sandbox_id, spec->pids[i]) == 1;
	if (in == spec->n_pids)
		return 0;

	pthread_mutex_lock(&s->lock);
	bool attach = false;
	for (int attempt = 0; attempt < 3; attempt++) {
		_cleanup_bus_message_ sd_bus_message *m = NULL, *reply = NULL;
		_cleanup_bus_error_ sd_bus_error e = SD_BUS_ERROR_NULL;
		if ((r = bus_locked(s)) < 0) {
			pthread_mutex_unlock(&s->lock);
			return error_set(ret_error, r, "cannot connect to the system bus: %m");
		}
		r = attach ? build_attach(s, unit, spec, &m) : build_start(s, unit, spec, &m);
		if (r < 0) {
			pthread_mutex_unlock(&s->lock);
			return error_set(ret_error, r, "cannot build the call to systemd: %m");
		}
		r = call_locked(s, m, &e, &reply);
		if (r == -EAGAIN)
			continue;
		if (r < 0 && !attach &&
		    sd_bus_error_has_name(&e, "org.freedesktop.systemd1.UnitExists")) {
			/* left by the emberd before this one, with processes still in it */
			attach = true;
			continue;
		}
		if (r < 0) {
			pthread_mutex_unlock(&s->lock);
			return error_set(ret_error, r, "systemd refused %s %s: %s",
					 attach ? "to attach to" : "to start", unit,
					 e.message ?: strerror(-r));
		}
		break;
	}
	pthread_mutex_unlock(&s->lock);
	if (r < 0)
		return error_set(ret_error, r, "systemd: cannot start %s: %m", unit);
	r = wait_moved(spec, ret_error);
	if (r >= 0)
		log_debug("sandbox %s: %zu process(es) in %s", spec->sandbox_id, spec->n_pids,
			  unit);
	return r;
}

static int machine_call(Systemd *s, const char *method, const char *name, pid_t leader,
			sd_bus_error *e)
{
	for (int attempt = 0; attempt < 3; attempt++) {
		_cleanup_bus_message_ sd_bus_message *m = NULL, *reply = NULL;
		int r = bus_locked(s);
		if (r < 0)
			return r;
		r = sd_bus_message_new_method_call(s->bus, &m, "org.freedesktop.machine1",
						   "/org/freedesktop/machine1",
						   "org.freedesktop.machine1.Manager", method);
		if (r >= 0 && leader > 0)
			/* no 128-bit id of its own (empty), no root directory: a VM's is not ours
			 */
			r = sd_bus_message_append(m, "sayssus", name, 0, "ember", "vm",
						  (uint32_t)leader, "");
		else if (r >= 0)
			r = sd_bus_message_append(m, "s", name);
		if (r < 0)
			return r;
		r = call_locked(s, m, e, &reply);
		if (r != -EAGAIN)
			return r;
	}
	return -ECONNRESET;
}

int systemd_machine_register(Systemd *s, const char *sandbox_id, pid_t leader, char **ret_error)
{
	_cleanup_bus_error_ sd_bus_error e = SD_BUS_ERROR_NULL;
	int r;

	if (!s)
		return 0;
	pthread_mutex_lock(&s->lock);
	if (s->no_machined) {
		pthread_mutex_unlock(&s->lock);
		return 0;
	}
	r = machine_call(s, "RegisterMachine", sandbox_id, leader, &e);
	if (r < 0 && (sd_bus_error_has_name(&e, "org.freedesktop.DBus.Error.ServiceUnknown") ||
		      sd_bus_error_has_name(&e, "org.freedesktop.DBus.Error.NameHasNoOwner"))) {
		/* A host without systemd-container: its sandboxes run all the same. */
		s->no_machined = true;
		pthread_mutex_unlock(&s->lock);
		log_notice("systemd-machined is not installed (package systemd-container): "
			   "machinectl will not list sandboxes");
		return 0;
	}
	pthread_mutex_unlock(&s->lock);
	if (r < 0 && sd_bus_error_has_name(&e, "org.freedesktop.machine1.MachineExists"))
		return 0;
	if (r < 0)
		return error_set(ret_error, r, "systemd-machined refused to register %s: %s",
				 sandbox_id, e.message ?: strerror(-r));
	return 0;
}

void systemd_machine_unregister(Systemd *s, const char *sandbox_id)
{
	_cleanup_bus_error_ sd_bus_error e = SD_BUS_ERROR_NULL;
	int r;

	if (!s)
		return;
	pthread_mutex_lock(&s->lock);
	if (s->no_machined) {
		pthread_mutex_unlock(&s->lock);
		return;
	}
	r = machine_call(s, "UnregisterMachine", sandbox_id, 0, &e);
	pthread_mutex_unlock(&s->lock);
	if (r < 0 && !sd_bus_error_has_name(&e, "org.freedesktop.machine1.NoSuchMachine"))
		log_debug("sandbox %s: machined: cannot unregister: %s", sandbox_id,
			  e.message ?: strerror(-r));
}
