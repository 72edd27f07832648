/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The snapshot store: <state_dir>/snapshots/<id>/{rootfs.ext4,vmstate,mem,snapshot.json}, and
 * CreateSnapshot, GetSnapshot, ListSnapshots and DeleteSnapshot.
 *
 * A snapshot is made in .tmp-<id>/ next to its final directory (by the sandbox's worker, see
 * sandbox_op_snapshot()), its record written there last, and the directory renamed into
 * place: a snapshot directory with a record is always complete, and start-up removes the
 * .tmp- directories a crash left (ids never start with a dot). Its files are never written again
 * once it is made: every sandbox created from it reads them (the flattened disk through one shared
 * read-only loop device, the memory file through its own ember-uffd), so none is ever copied per
 * sandbox.
 */
#include <dirent.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "common/error.h"
#include "common/fileio.h"
#include "common/id.h"
#include "common/log.h"
#include "manager-internal.h"
#include "messages.h"
#include "node-sandbox.h"

#define SNAPSHOT_RECORD "snapshot.json"

void snapshot_free(Snapshot *s)
{
	if (!s)
		return;
	free(s->id);
	free(s->source_sandbox_id);
	free(s->template_id);
	free(s->fc_version);
	kv_list_done(&s->labels);
	free(s->dir);
	free(s->rootfs);
	free(s->vmstate);
	free(s->mem);
	free(s);
}
DEFINE_POINTER_CLEANUP(Snapshot, snapshot_free)

/* The paths of its files, from its directory. */
static int snapshot_set_paths(Snapshot *s, const char *snapshots_dir)
{
	if (asprintf(&s->dir, "%s/%s", snapshots_dir, s->id) < 0 ||
	    asprintf(&s->rootfs, "%s/rootfs.ext4", s->dir) < 0 ||
	    asprintf(&s->vmstate, "%s/vmstate", s->dir) < 0 ||
	    asprintf(&s->mem, "%s/mem", s->dir) < 0)
		return -ENOMEM;
	return 0;
}

static json_object *snapshot_to_json(const Snapshot *s)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "id", json_object_new_string(s->id));
	json_object_object_add(o, "source_sandbox_id",
			       json_object_new_string(s->source_sandbox_id));
	json_object_object_add(o, "template_id", json_object_new_string(s->template_id));
	json_object_object_add(o, "vcpu_count", json_object_new_int64(s->vcpu_count));
	json_object_object_add(o, "memory_mib", json_object_new_int64(s->memory_mib));
	if (s->huge_pages)
		json_object_object_add(o, "huge_pages", json_object_new_boolean(true));
	json_object_object_add(o, "firecracker_version", json_object_new_string(s->fc_version));
	json_object_object_add(o, "create_time", timespec_to_json(&s->create_time));
	json_object_object_add(o, "labels", kv_list_to_json(&s->labels));
	return o;
}

static int snapshot_from_json(json_object *o, Snapshot **ret)
{
	_cleanup_(snapshot_freep) Snapshot *s = calloc(1, sizeof(*s));
	json_object *v;
	const char *id = json_get_string(o, "id"), *src = json_get_string(o, "source_sandbox_id"),
		   *tmpl = json_get_string(o, "template_id"),
		   *fc = json_get_string(o, "firecracker_version");

	if (!s)
		return -ENOMEM;
	if (!id || !src || !tmpl || !fc)
		return -EBADMSG;
	s->id = strdup(id);
	s->source_sandbox_id = strdup(src);
	s->template_id = strdup(tmpl);
	s->fc_version = strdup(fc);
	if (!s->id || !s->source_sandbox_id || !s->template_id || !s->fc_version)
		return -ENOMEM;
	s->vcpu_count = (unsigned)json_get_u64(o, "vcpu_count");
	s->memory_mib = (unsigned)json_get_u64(o, "memory_mib");
	if (!s->vcpu_count || !s->memory_mib)
		return -EBADMSG;
	if (json_object_object_get_ex(o, "huge_pages", &v))
		s->huge_pages = json_object_get_boolean(v);
	if (json_object_object_get_ex(o, "create_time", &v))
		timespec_from_json(v, &s->create_time);
	json_object_object_get_ex(o, "labels", &v);
	if (kv_list_from_json(v, &s->labels) < 0)
		return -EBADMSG;
	*ret = TAKE_PTR(s);
	return 0;
}

static void snapshot_usage_refresh(Snapshot *s)
{
	uint64_t used = 0;

	if (storage_usage_tree(s->dir, &used) >= 0)
		s->disk_used = used;
}

Snapshot *manager_snapshot_find_locked(Manager *m, const char *id)
{
	for (size_t i = 0; i < m->n_snapshots; i++)
		if (strcmp(m->snapshots[i]->id, id) == 0)
			return m->snapshots[i];
	return NULL;
}

static int snapshot_insert_locked(Manager *m, Snapshot *s)
{
	Snapshot **n = realloc(m->snapshots, (m->n_snapshots + 1) * sizeof(Snapshot *));
	size_t i;

	if (!n)
		return -ENOMEM;
	m->snapshots = n;
	for (i = m->n_snapshots; i > 0 && strcmp(n[i - 1]->id, s->id) > 0; i--)
		n[i] = n[i - 1];
	n[i] = s;
	m->n_snapshots++;
	s->tmpl->snapshot_count++;
	return 0;
}

static void snapshot_remove_locked(Manager *m, Snapshot *s)
{
	for (size_t i = 0; i < m->n_snapshots; i++)
		if (m->snapshots[i] == s) {
			memmove(&m->snapshots[i], &m->snapshots[i + 1],
				(m->n_snapshots - i - 1) * sizeof(Snapshot *));
			m->n_snapshots--;
			s->tmpl->snapshot_count--;
			return;
		}
}

void snapshot_discard_locked(Manager *m, Snapshot *s)
{
	_cleanup_free_ char *tmp = NULL;

	snapshot_remove_locked(m, s);
	if (asprintf(&tmp, "%s/.tmp-%s", m->snapshots_dir, s->id) >= 0)
		(void)rm_rf(tmp);
	snapshot_free(s);
}

int manager_snapshots_load(Manager *m)
{
	_cleanup_(closedirp) DIR *d = opendir(m->snapshots_dir);
	struct dirent *de;

	if (!d)
		return errno == ENOENT ? 0 : -errno;
	while ((de = readdir(d))) {
		_cleanup_free_ char *dir = NULL, *rec = NULL, *err = NULL;
		_cleanup_(snapshot_freep) Snapshot *s = NULL;
		json_object *o = NULL;
		int r;

		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		if (asprintf(&dir, "%s/%s", m->snapshots_dir, de->d_name) < 0 ||
		    asprintf(&rec, "%s/" SNAPSHOT_RECORD, dir) < 0)
			return -ENOMEM;
		/* Temporaries start with a dot, which no id can: ".tmp-…", ".deleted-…". */
		if (de->d_name[0] == '.') {
			/* A snapshot or a deletion the last run did not finish. */
			log_info("removing unfinished snapshot directory %s", dir);
			(void)rm_rf(dir);
			continue;
		}
		r = record_read(rec, &o, &err);
		if (r >= 0) {
			r = snapshot_from_json(o, &s);
			json_object_put(o);
			if (r >= 0 && strcmp(s->id, de->d_name) != 0)
				r = -EBADMSG;
			if (r >= 0 && !(s->tmpl = manager_template_find_locked(m, s->template_id)))
				r = -ENOENT;
			if (r < 0 && !err &&
			    asprintf(&err, "%s: %s", rec,
				     r == -ENOENT ? "its template is gone"
						  : "not a snapshot record") < 0)
				err = NULL;
		}
		if (r >= 0)
			r = snapshot_set_paths(s, m->snapshots_dir);
		if (r < 0) {
			record_quarantine(m->config, dir, err ?: "unreadable");
			continue;
		}
		s->ready = true;
		snapshot_usage_refresh(s);
		r = snapshot_insert_locked(m, s);
		if (r < 0)
			return r;
		s = NULL;
	}
	return 0;
}

int snapshot_commit(Snapshot *s, const char *tmp_dir, char **ret_error)
{
	static const char *const files[] = {"rootfs.ext4", "vmstate", "mem"};
	_cleanup_free_ char *rec = NULL, *parent = NULL;
	json_object *o;
	int r;

	/* The VMM and the flatten wrote them without syncing: a snapshot must survive a reboot
	 * once CreateSnapshot said it exists. */
	for (size_t i = 0; i < ELEMENTSOF(files); i++) {
		_cleanup_free_ char *f = NULL;
		if (asprintf(&f, "%s/%s", tmp_dir, files[i]) < 0)
			return -ENOMEM;
		r = fsync_path(f);
		if (r < 0)
			return error_set(ret_error, r, "cannot sync %s: %m", f);
	}
	if (asprintf(&rec, "%s/" SNAPSHOT_RECORD, tmp_dir) < 0)
		return -ENOMEM;
	o = snapshot_to_json(s);
	if (!o)
		return -ENOMEM;
	r = record_write(rec, o);
	json_object_put(o);
	if (r < 0)
		return error_set(ret_error, r, "cannot write %s: %m", rec);
	if (rename(tmp_dir, s->dir) < 0)
		return error_set(ret_error, -errno, "cannot rename %s to %s: %m", tmp_dir, s->dir);
	parent = strdup(s->dir);
	if (parent)
		*strrchr(parent, '/') = 0;
	/* The snapshot is in place: a failed sync from here is logged, not a failure (which
	 * would leave a complete snapshot on disk that the registry says does not exist). */
	r = parent ? fsync_path(parent) : -ENOMEM;
	if (r < 0)
		log_warning_errno(r, "snapshot %s: cannot sync %s", s->id, parent);
	snapshot_usage_refresh(s);
	return 0;
}

/* ---- protobuf ---- */

static Ember__V1__Snapshot *snapshot_to_pb(Arena *a, const Snapshot *s)
{
	Ember__V1__Snapshot *p = arena_alloc(a, sizeof(*p));

	if (!p)
		return NULL;
	ember__v1__snapshot__init(p);
	p->id = arena_strdup(a, s->id);
	p->source_sandbox_id = arena_strdup(a, s->source_sandbox_id);
	p->template_id = arena_strdup(a, s->template_id);
	p->vcpu_count = s->vcpu_count;
	p->memory_mib = s->memory_mib;
	p->huge_pages = s->huge_pages;
	p->disk_used_bytes = s->disk_used;
	p->firecracker_version = arena_strdup(a, s->fc_version);
	p->create_time = timestamp_to_pb(a, &s->create_time);
	p->dependent_sandbox_count = s->dependents;
	if (!p->id || !p->source_sandbox_id || !p->template_id || !p->firecracker_version ||
	    kv_to_pb(a, &s->labels, &ember__v1__snapshot__labels_entry__descriptor, &p->labels,
		     &p->n_labels) < 0)
		return NULL;
	return p;
}

static RpcCode send_snapshot_locked(RpcCall *call, Manager *m, const Snapshot *s)
{
	_cleanup_(arena_freep) Arena *a = arena_new();
	Ember__V1__Snapshot *p = a ? snapshot_to_pb(a, s) : NULL;

	pthread_mutex_unlock(&m->lock);
	if (!p)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	return rpc_call_send(call, &p->base) < 0 ? RPC_CANCELLED : RPC_OK;
}

/* ---- handlers ---- */

static RpcCode snapshot_id_check(RpcCall *call, const char *field, const char *id)
{
	if (!id_is_valid(id))
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "%s \"%.100s\" is not a valid id ([a-z0-9][a-z0-9-]{0,62})",
				      field, id ?: "");
	return RPC_OK;
}

static bool snapshot_op_ended(Sandbox *sb, uint64_t joined_at)
{
	return sb->removed || sb->outcome[OUT_SNAPSHOT].ended > joined_at;
}

/* Free space for a snapshot of sb: its memory file and a flattened disk no bigger than the
 * base plus the changes. */
static bool room_for_snapshot(const Manager *m, const Sandbox *sb, uint64_t *ret_need_mib,
			      uint64_t *ret_free_mib)
{
	struct statvfs v;
	uint64_t used = 0, base = 0;

	if (statvfs(m->snapshots_dir, &v) < 0)
		return true; /* the snapshot finds out, with the real error */
	(void)storage_usage_file(sb->cow_path, &used);
	if (sb->snap)
		(void)storage_usage_file(sb->snap->rootfs, &base);
	else
		base = sb->tmpl->rootfs_disk_used;
	*ret_need_mib = sb->spec.memory_mib + ((base + used) >> 20) + 16;
	*ret_free_mib = (uint64_t)v.f_bavail * v.f_frsize >> 20;
	return *ret_free_mib >= *ret_need_mib;
}

RpcCode node_create_snapshot(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__CreateSnapshotRequest *req = (const void *)request;
	_cleanup_(kv_list_done) KvList labels = {};
	_cleanup_free_ char *message = NULL;
	RpcCode code, outcome = RPC_OK;
	Snapshot *s;
	Sandbox *sb;
	int r;

	if ((code = snapshot_id_check(call, "snapshot_id", req->snapshot_id)) != RPC_OK ||
	    (code = snapshot_id_check(call, "sandbox_id", req->sandbox_id)) != RPC_OK ||
	    (code = kv_from_pb(call, "labels", KV_LABELS, req->labels, req->n_labels, &labels)) !=
		    RPC_OK)
		return code;

again:
	pthread_mutex_lock(&m->lock);
	s = manager_snapshot_find_locked(m, req->snapshot_id);
	if (s && (strcmp(s->source_sandbox_id, req->sandbox_id) != 0 ||
		  !kv_list_equal(&s->labels, &labels))) {
		pthread_mutex_unlock(&m->lock);
		return rpc_call_error(call, RPC_ALREADY_EXISTS,
				      "snapshot %s exists with another source sandbox or labels",
				      req->snapshot_id);
	}
	if (s && s->ready)
		return send_snapshot_locked(call, m, s); /* a retry: the snapshot it made */
	sb = manager_find_locked(m, req->sandbox_id);
	if (!sb) {
		pthread_mutex_unlock(&m->lock);
		return rpc_call_error(call, RPC_NOT_FOUND, "no sandbox %s", req->sandbox_id);
	}
	sandbox_ref_locked(sb);
	if (!s && (sb->op == SB_OP_SNAPSHOT || sb->op == SB_OP_UPDATE)) {
		/* Lifecycle calls on a sandbox wait for a snapshot being taken of it. */
		r = sandbox_wait_locked(m, call, sb, sandbox_not_snapshotting, 0);
		pthread_mutex_unlock(&m->lock);
		sandbox_unref(m, sb);
		if (r < 0)
			return RPC_CANCELLED;
		goto again;
	}
	uint64_t joined_at = sb->outcome[OUT_SNAPSHOT].ended;
	if (!s) {
		uint64_t need = 0, avail = 0;
		bool running = sb->state == EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING,
		     paused = sb->state == EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSED;
		if ((!running && !paused) || sb->op != SB_OP_NONE) {
			Ember__V1__SandboxState st = sb->state;
			pthread_mutex_unlock(&m->lock);
			sandbox_unref(m, sb);
			const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(
				&ember__v1__sandbox_state__descriptor, (int)st);
			return rpc_call_error(
				call, RPC_FAILED_PRECONDITION,
				"sandbox %s is %s%s; CreateSnapshot needs it RUNNING or "
				"PAUSED",
				req->sandbox_id, v ? v->name + strlen("SANDBOX_STATE_") : "?",
				running || paused ? " and busy" : "");
		}
		if (!room_for_snapshot(m, sb, &need, &avail)) {
			pthread_mutex_unlock(&m->lock);
			sandbox_unref(m, sb);
			return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED,
					      "not enough disk for snapshot %s: about %llu MiB "
					      "needed, %llu MiB free in %s",
					      req->snapshot_id, (unsigned long long)need,
					      (unsigned long long)avail, m->snapshots_dir);
		}
		s = calloc(1, sizeof(*s));
		if (!s || !(s->id = strdup(req->snapshot_id)) ||
		    !(s->source_sandbox_id = strdup(sb->id)) ||
		    !(s->template_id = strdup(sb->template_id)) ||
		    !(s->fc_version = strdup(sb->fc_version ?: "")) ||
		    snapshot_set_paths(s, m->snapshots_dir) < 0) {
			pthread_mutex_unlock(&m->lock);
			snapshot_free(s);
			sandbox_unref(m, sb);
			return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
		}
		s->tmpl = sb->tmpl;
		s->vcpu_count = sb->spec.vcpu_count;
		s->memory_mib = sb->spec.memory_mib;
		s->huge_pages = sb->spec.huge_pages;
		s->labels = labels;
		labels = (KvList){};
		clock_gettime(CLOCK_REALTIME, &s->create_time);
		if (snapshot_insert_locked(m, s) < 0) {
			pthread_mutex_unlock(&m->lock);
			snapshot_free(s);
			sandbox_unref(m, sb);
			return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
		}
		sb->taking = s;
		manager_submit_locked(m, sb, SB_OP_SNAPSHOT);
	} else if (sb->taking != s) {
		/* Not ready and not being taken of this sandbox: being discarded. */
		pthread_mutex_unlock(&m->lock);
		sandbox_unref(m, sb);
		return rpc_call_error(call, RPC_UNAVAILABLE,
				      "snapshot %s is being removed after a failure; retry",
				      req->snapshot_id);
	}
	r = sandbox_wait_locked(m, call, sb, snapshot_op_ended, joined_at);
	if (r >= 0 && sb->outcome[OUT_SNAPSHOT].code != RPC_OK) {
		outcome = sb->outcome[OUT_SNAPSHOT].code;
		message = strdup(sb->outcome[OUT_SNAPSHOT].error ?: "snapshot failed");
	}
	s = manager_snapshot_find_locked(m, req->snapshot_id);
	if (r >= 0 && outcome == RPC_OK && (!s || !s->ready)) {
		outcome = RPC_ABORTED;
		if (asprintf(&message, "sandbox %s was destroyed", req->sandbox_id) < 0)
			message = NULL;
	}
	if (r < 0 || outcome != RPC_OK) {
		pthread_mutex_unlock(&m->lock);
		sandbox_unref(m, sb);
		if (r < 0)
			return RPC_CANCELLED; /* the snapshot goes on; a retry sees its outcome */
		return rpc_call_error(call, outcome, "%s", message ?: "snapshot failed");
	}
	sandbox_unref_locked(m, sb);
	return send_snapshot_locked(call, m, s);
}

RpcCode node_get_snapshot(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__GetSnapshotRequest *req = (const void *)request;
	Snapshot *s;
	RpcCode code;

	if ((code = snapshot_id_check(call, "snapshot_id", req->snapshot_id)) != RPC_OK)
		return code;
	pthread_mutex_lock(&m->lock);
	s = manager_snapshot_find_locked(m, req->snapshot_id);
	if (!s || !s->ready) {
		pthread_mutex_unlock(&m->lock);
		return rpc_call_error(call, RPC_NOT_FOUND, "no snapshot %s", req->snapshot_id);
	}
	return send_snapshot_locked(call, m, s);
}

RpcCode node_list_snapshots(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__ListSnapshotsRequest *req = (const void *)request;
	Ember__V1__ListSnapshotsResponse resp = EMBER__V1__LIST_SNAPSHOTS_RESPONSE__INIT;
	_cleanup_(arena_freep) Arena *a = arena_new();
	_cleanup_(kv_list_done) KvList selector = {};
	RpcCode code;
	int r = 0;

	if (!a)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	if ((req->source_sandbox_id[0] &&
	     (code = snapshot_id_check(call, "source_sandbox_id", req->source_sandbox_id)) !=
		     RPC_OK) ||
	    (req->template_id[0] &&
	     (code = snapshot_id_check(call, "template_id", req->template_id)) != RPC_OK) ||
	    (code = kv_from_pb(call, "label_selector", KV_LABELS, req->label_selector,
			       req->n_label_selector, &selector)) != RPC_OK)
		return code;
	pthread_mutex_lock(&m->lock);
	resp.snapshots = arena_alloc(a, (m->n_snapshots + 1) * sizeof(Ember__V1__Snapshot *));
	for (size_t i = 0; resp.snapshots && i < m->n_snapshots; i++) {
		const Snapshot *s = m->snapshots[i];
		if (!s->ready ||
		    (req->source_sandbox_id[0] &&
		     strcmp(s->source_sandbox_id, req->source_sandbox_id) != 0) ||
		    (req->template_id[0] && strcmp(s->template_id, req->template_id) != 0) ||
		    !kv_list_matches(&s->labels, &selector))
			continue;
		if (!(resp.snapshots[resp.n_snapshots++] = snapshot_to_pb(a, s)))
			r = -ENOMEM;
	}
	if (!resp.snapshots)
		r = -ENOMEM;
	pthread_mutex_unlock(&m->lock);
	if (r < 0)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	return rpc_call_send(call, &resp.base) < 0 ? RPC_CANCELLED : RPC_OK;
}

RpcCode node_delete_snapshot(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__DeleteSnapshotRequest *req = (const void *)request;
	Ember__V1__DeleteSnapshotResponse resp = EMBER__V1__DELETE_SNAPSHOT_RESPONSE__INIT;
	_cleanup_free_ char *gone = NULL;
	static atomic_uint deletions;
	Snapshot *s;
	RpcCode code;
	int r;

	if ((code = snapshot_id_check(call, "snapshot_id", req->snapshot_id)) != RPC_OK)
		return code;
	pthread_mutex_lock(&m->lock);
	s = manager_snapshot_find_locked(m, req->snapshot_id);
	if (!s || !s->ready) {
		pthread_mutex_unlock(&m->lock);
		return rpc_call_error(call, RPC_NOT_FOUND, "no snapshot %s", req->snapshot_id);
	}
	if (s->dependents) {
		/* Name a few, so that the operator knows what to destroy. */
		char names[160] = "";
		size_t len = 0, shown = 0;
		unsigned n = s->dependents;
		for (size_t i = 0; i < m->n_buckets && shown < 3; i++)
			for (Sandbox *sb = m->buckets[i]; sb && shown < 3; sb = sb->hnext)
				if (sb->snap == s && len < sizeof(names)) {
					len += (size_t)snprintf(names + len, sizeof(names) - len,
								"%s%s", shown ? ", " : "", sb->id);
					shown++;
				}
		pthread_mutex_unlock(&m->lock);
		return rpc_call_error(call, RPC_FAILED_PRECONDITION,
				      "snapshot %s is used by %u sandbox%s created from it (%s%s); "
				      "destroy them first",
				      req->snapshot_id, n, n == 1 ? "" : "es", names,
				      n > shown ? ", …" : "");
	}
	/* A name of its own: the files of an earlier snapshot of the same id may still be
	 * going. */
	if (asprintf(&gone, "%s/.deleted-%s-%u", m->snapshots_dir, s->id,
		     atomic_fetch_add(&deletions, 1)) < 0) {
		pthread_mutex_unlock(&m->lock);
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	}
	/* The rename makes the deletion take effect at once (a crash leaves a .deleted- directory
	 * that start-up removes). The files go on a worker, after the reply: unlinking a
	 * 128 MiB snapshot's files took 10 s on a busy disk here. */
	r = rename(s->dir, gone) < 0 ? -errno : 0;
	if (r < 0 && r != -ENOENT) {
		code = rpc_call_error(call, RPC_INTERNAL, "cannot remove %s: %s", s->dir,
				      strerror(-r));
		pthread_mutex_unlock(&m->lock);
		return code;
	}
	snapshot_remove_locked(m, s);
	if (r == 0 && manager_remove_later_locked(m, gone) == 0)
		gone = NULL; /* the worker's now */
	pthread_mutex_unlock(&m->lock);
	snapshot_free(s);
	if (gone && r == 0)
		(void)rm_rf(gone);
	log_struct(LOG_INFO, 0,
		   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_SNAPSHOT_DELETED},
			      {"OP", "delete-snapshot"}, {"SNAPSHOT_ID", req->snapshot_id}),
		   "snapshot %s deleted", req->snapshot_id);
	return rpc_call_send(call, &resp.base) < 0 ? RPC_CANCELLED : RPC_OK;
}
