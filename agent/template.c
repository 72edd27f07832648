/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The template store: <state_dir>/templates/<id>/{kernel,rootfs.ext4,initrd,template.json}.
 *
 * RegisterTemplate copies the files into a temporary directory next to the final one
 * (reflinked where the file system can), hashes the copies, writes the record there and
 * renames the directory into place: a template directory with a record is always complete,
 * and a crash leaves only a temporary directory that start-up removes.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/error.h"
#include "common/fileio.h"
#include "common/id.h"
#include "common/log.h"
#include "manager-internal.h"
#include "messages.h"
#include "node-sandbox.h"

#define TEMPLATE_RECORD "template.json"

void template_free(Template *t)
{
	if (!t)
		return;
	free(t->id);
	free(t->state_reason);
	TemplateFileInfo *files[] = {&t->kernel, &t->rootfs, &t->initrd};
	for (size_t i = 0; i < ELEMENTSOF(files); i++) {
		free(files[i]->path);
		free(files[i]->source);
	}
	free(t->boot_args);
	kv_list_done(&t->labels);
	free(t->boot.fc_version);
	free(t->boot.vmstate);
	free(t->boot.mem);
	free(t->boot.rootfs);
	if (t->pull)
		pull_unref(t->pull);
	free(t);
}

#define BOOT_SNAPSHOT_DIR "boot-snapshot"

/* The boot snapshot's paths, in the template directory `dir`. */
static int template_boot_paths(TemplateBoot *b, const char *dir)
{
	free(b->vmstate);
	free(b->mem);
	free(b->rootfs);
	b->vmstate = b->mem = b->rootfs = NULL;
	if (asprintf(&b->vmstate, "%s/" BOOT_SNAPSHOT_DIR "/vmstate", dir) < 0 ||
	    asprintf(&b->mem, "%s/" BOOT_SNAPSHOT_DIR "/mem", dir) < 0 ||
	    asprintf(&b->rootfs, "%s/" BOOT_SNAPSHOT_DIR "/rootfs.ext4", dir) < 0)
		return -ENOMEM;
	return 0;
}
DEFINE_POINTER_CLEANUP(Template, template_free)

static int sha256_file(const char *path, char ret[65])
{
	_cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned md_len = 0;
	EVP_MD_CTX *ctx;
	static const size_t bufsize = 1 << 20;
	_cleanup_free_ char *buf = malloc(bufsize);
	int r = 0;

	if (fd < 0)
		return -errno;
	if (!buf)
		return -ENOMEM;
	ctx = EVP_MD_CTX_new();
	if (!ctx)
		return -ENOMEM;
	if (EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1)
		r = -EIO;
	while (r == 0) {
		ssize_t n = read(fd, buf, bufsize);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			r = -errno;
			break;
		}
		if (n == 0)
			break;
		if (EVP_DigestUpdate(ctx, buf, (size_t)n) != 1)
			r = -EIO;
	}
	if (r == 0 && EVP_DigestFinal_ex(ctx, md, &md_len) != 1)
		r = -EIO;
	EVP_MD_CTX_free(ctx);
	if (r < 0)
		return r;
	for (unsigned i = 0; i < md_len && i < 32; i++)
		snprintf(ret + 2 * (size_t)i, 3, "%02x", md[i]);
	return 0;
}

static json_object *file_to_json(const TemplateFileInfo *f)
{
	json_object *o = json_object_new_object();

	if (!o)
		return NULL;
	json_object_object_add(o, "path", json_object_new_string(f->path));
	json_object_object_add(o, "size_bytes", json_object_new_uint64(f->size_bytes));
	json_object_object_add(o, "sha256", json_object_new_string(f->sha256));
	json_object_object_add(o, "source", json_object_new_string(f->source ?: ""));
	return o;
}

static int file_from_json(json_object *o, TemplateFileInfo *f)
{
	const char *path = json_get_string(o, "path"), *sha = json_get_string(o, "sha256");
	const char *source = json_get_string(o, "source");

	if (!path || !sha || strlen(sha) != 64)
		return -EBADMSG;
	f->path = strdup(path);
	f->source = strdup(source ?: "");
	if (!f->path || !f->source)
		return -ENOMEM;
	f->size_bytes = json_get_u64(o, "size_bytes");
	memcpy(f->sha256, sha, 65);
	return 0;
}

static json_object *template_to_json(const Template *t);

int template_record_write(const Template *t, const char *path)
{
	json_object *o = template_to_json(t);
	int r = o ? record_write(path, o) : -ENOMEM;

	json_object_put(o);
	return r;
}

static json_object *template_to_json(const Template *t)
{
	json_object *o = json_object_new_object();

	if (!o)
		return NULL;
	json_object_object_add(o, "id", json_object_new_string(t->id));
	json_object_object_add(o, "kernel", file_to_json(&t->kernel));
	json_object_object_add(o, "rootfs", file_to_json(&t->rootfs));
	if (t->initrd.path)
		json_object_object_add(o, "initrd", file_to_json(&t->initrd));
	json_object_object_add(o, "boot_args", json_object_new_string(t->boot_args ?: ""));
	json_object_object_add(o, "labels", kv_list_to_json(&t->labels));
	json_object_object_add(o, "create_time", timespec_to_json(&t->create_time));
	if (t->boot.present) {
		json_object *b = json_object_new_object();
		json_object_object_add(b, "vcpu_count", json_object_new_int64(t->boot.vcpu_count));
		json_object_object_add(b, "memory_mib", json_object_new_int64(t->boot.memory_mib));
		json_object_object_add(b, "firecracker_version",
				       json_object_new_string(t->boot.fc_version ?: ""));
		json_object_object_add(o, "boot_snapshot", b);
	}
	return o;
}

static int template_from_json(json_object *o, Template **ret)
{
	_cleanup_(template_freep) Template *t = calloc(1, sizeof(*t));
	json_object *v;
	const char *id = json_get_string(o, "id"), *boot_args = json_get_string(o, "boot_args");
	int r;

	if (!t)
		return -ENOMEM;
	if (!id || !id_is_valid(id))
		return -EBADMSG;
	t->id = strdup(id);
	t->boot_args = strdup(boot_args ?: "");
	if (!t->id || !t->boot_args)
		return -ENOMEM;
	if (!json_object_object_get_ex(o, "kernel", &v) || file_from_json(v, &t->kernel) < 0)
		return -EBADMSG;
	if (!json_object_object_get_ex(o, "rootfs", &v) || file_from_json(v, &t->rootfs) < 0)
		return -EBADMSG;
	if (json_object_object_get_ex(o, "initrd", &v) && file_from_json(v, &t->initrd) < 0)
		return -EBADMSG;
	json_object_object_get_ex(o, "labels", &v);
	if ((r = kv_list_from_json(v, &t->labels)) < 0)
		return r;
	if (json_object_object_get_ex(o, "create_time", &v))
		timespec_from_json(v, &t->create_time);
	if (json_object_object_get_ex(o, "boot_snapshot", &v)) {
		t->boot.present = true;
		t->boot.vcpu_count = (unsigned)json_get_u64(v, "vcpu_count");
		t->boot.memory_mib = (unsigned)json_get_u64(v, "memory_mib");
		t->boot.fc_version = strdup(json_get_string(v, "firecracker_version") ?: "");
		if (!t->boot.fc_version)
			return -ENOMEM;
		if (!t->boot.vcpu_count || !t->boot.memory_mib)
			return -EBADMSG;
	}
	t->state = EMBER__V1__TEMPLATE_STATE__TEMPLATE_STATE_READY;
	*ret = TAKE_PTR(t);
	return 0;
}

static void template_usage_refresh(Template *t)
{
	uint64_t used = 0;

	if (storage_usage_file(t->rootfs.path, &used) >= 0)
		t->rootfs_disk_used = used;
	if (t->boot.present && t->boot.rootfs) {
		_cleanup_free_ char *dir = strdup(t->boot.rootfs);
		if (dir) {
			*strrchr(dir, '/') = 0;
			if (storage_usage_tree(dir, &used) >= 0)
				t->boot.disk_used = used;
		}
	}
}

Template *manager_template_find_locked(Manager *m, const char *id)
{
	for (size_t i = 0; i < m->n_templates; i++)
		if (strcmp(m->templates[i]->id, id) == 0)
			return m->templates[i];
	return NULL;
}

int template_insert_locked(Manager *m, Template *t)
{
	Template **n = realloc(m->templates, (m->n_templates + 1) * sizeof(Template *));
	size_t i;

	if (!n)
		return -ENOMEM;
	m->templates = n;
	/* Kept sorted by id: ListTemplates answers in that order. */
	for (i = m->n_templates; i > 0 && strcmp(n[i - 1]->id, t->id) > 0; i--)
		n[i] = n[i - 1];
	n[i] = t;
	m->n_templates++;
	return 0;
}

void template_remove_locked(Manager *m, Template *t)
{
	for (size_t i = 0; i < m->n_templates; i++)
		if (m->templates[i] == t) {
			memmove(&m->templates[i], &m->templates[i + 1],
				(m->n_templates - i - 1) * sizeof(Template *));
			m->n_templates--;
			return;
		}
}

int manager_templates_load(Manager *m)
{
	_cleanup_(closedirp) DIR *d = opendir(m->templates_dir);
	struct dirent *de;

	if (!d)
		return errno == ENOENT ? 0 : -errno;
	while ((de = readdir(d))) {
		_cleanup_free_ char *dir = NULL, *rec = NULL, *err = NULL;
		json_object *o = NULL;
		Template *t = NULL;
		int r;

		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		if (asprintf(&dir, "%s/%s", m->templates_dir, de->d_name) < 0 ||
		    asprintf(&rec, "%s/" TEMPLATE_RECORD, dir) < 0)
			return -ENOMEM;
		if (pull_dir_name(de->d_name)) {
			/* A pull the last run did not finish: it goes on (or stays FAILED). */
			r = pull_load(m, dir, &t, &err);
			if (r == -ENOMEM)
				return r;
			if (r < 0) {
				log_warning("removing %s: %s", dir, err ?: "unreadable");
				(void)rm_rf(dir);
				continue;
			}
			r = template_insert_locked(m, t);
			if (r < 0) {
				template_free(t);
				return r;
			}
			continue;
		}
		/* Temporaries start with a dot, which no id can: ".tmp-…", ".deleted-…". */
		if (de->d_name[0] == '.') {
			/* A registration the last run did not finish. */
			log_info("removing unfinished template registration %s", dir);
			(void)rm_rf(dir);
			continue;
		}
		r = record_read(rec, &o, &err);
		if (r >= 0) {
			r = template_from_json(o, &t);
			json_object_put(o);
			if (r >= 0 && strcmp(t->id, de->d_name) != 0)
				r = -EBADMSG;
			if (r < 0 && !err && asprintf(&err, "%s: not a template record", rec) < 0)
				err = NULL;
		}
		if (r < 0) {
			template_free(t);
			record_quarantine(m->config, dir, err ?: "unreadable");
			continue;
		}
		/* a crash right after a pull's install leaves its record: done with */
		_cleanup_free_ char *pull_rec = NULL;
		if (asprintf(&pull_rec, "%s/pull.json", dir) >= 0)
			(void)unlink(pull_rec);
		if (t->boot.present && template_boot_paths(&t->boot, dir) < 0) {
			template_free(t);
			return -ENOMEM;
		}
		template_usage_refresh(t);
		r = template_insert_locked(m, t);
		if (r < 0) {
			template_free(t);
			return r;
		}
	}
	return 0;
}

/* ---- protobuf ---- */

static Ember__V1__TemplateFile *file_to_pb(Arena *a, const TemplateFileInfo *f)
{
	Ember__V1__TemplateFile *p;

	if (!f->path)
		return NULL;
	p = arena_alloc(a, sizeof(*p));
	if (!p)
		return NULL;
	ember__v1__template_file__init(p);
	/* Copies: the message is sent after the lock is released, when a DeleteTemplate may
	 * have freed the template. */
	p->path = arena_strdup(a, f->path);
	p->size_bytes = f->size_bytes;
	p->sha256 = arena_strdup(a, f->sha256);
	p->source = arena_strdup(a, f->source);
	return p->path && p->sha256 && p->source ? p : NULL;
}

Ember__V1__Template *template_to_pb(Arena *a, Template *t)
{
	Ember__V1__Template *p = arena_alloc(a, sizeof(*p));

	if (!p)
		return NULL;
	ember__v1__template__init(p);
	p->id = arena_strdup(a, t->id);
	p->state = t->state;
	p->state_reason = arena_strdup(a, t->state_reason);
	p->kernel = file_to_pb(a, &t->kernel);
	p->rootfs = file_to_pb(a, &t->rootfs);
	p->initrd = file_to_pb(a, &t->initrd);
	p->boot_args = arena_strdup(a, t->boot_args);
	p->rootfs_disk_used_bytes = t->rootfs_disk_used;
	kv_to_pb(a, &t->labels, &ember__v1__template__labels_entry__descriptor, &p->labels,
		 &p->n_labels);
	p->create_time = timestamp_to_pb(a, &t->create_time);
	p->sandbox_count = t->sandbox_count;
	p->snapshot_count = t->snapshot_count;
	if (t->boot.present) {
		Ember__V1__TemplateBootSnapshot *b = arena_alloc(a, sizeof(*b));
		if (!b)
			return NULL;
		ember__v1__template_boot_snapshot__init(b);
		b->vcpu_count = t->boot.vcpu_count;
		b->memory_mib = t->boot.memory_mib;
		b->firecracker_version = arena_strdup(a, t->boot.fc_version);
		b->disk_used_bytes = t->boot.disk_used;
		if (!b->firecracker_version)
			return NULL;
		p->boot_snapshot = b;
	}
	/* While PULLING or FAILED there are no files yet (node.proto: unset). */
	if (!p->id || !p->state_reason || !p->boot_args || (t->kernel.path && !p->kernel) ||
	    (t->rootfs.path && !p->rootfs) || (t->initrd.path && !p->initrd))
		return NULL;
	return p;
}

/* ---- handlers ---- */

static RpcCode stat_input(RpcCall *call, const char *what, const char *path, bool required,
			  struct stat *st)
{
	if (!path || !path[0]) {
		if (required)
			return rpc_call_error(call, RPC_INVALID_ARGUMENT, "%s is required", what);
		return RPC_OK;
	}
	if (path[0] != '/')
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "%s \"%.200s\" is not an absolute path", what, path);
	if (stat(path, st) < 0) {
		if (errno == ENOENT)
			return rpc_call_error(call, RPC_NOT_FOUND, "%s %.200s does not exist", what,
					      path);
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "%s %.200s: %s", what, path,
				      strerror(errno));
	}
	if (!S_ISREG(st->st_mode))
		return rpc_call_error(call, RPC_INVALID_ARGUMENT, "%s %.200s is not a regular file",
				      what, path);
	return RPC_OK;
}

bool template_boot_args_valid(const char *args)
{
	/* emberd decides the root device and init; a template cannot move them. */
	_cleanup_free_ char *copy = strdup(args);
	char *save = NULL;

	if (!copy)
		return false;
	for (char *w = strtok_r(copy, " \t", &save); w; w = strtok_r(NULL, " \t", &save))
		if (strncmp(w, "root=", 5) == 0 || strncmp(w, "init=", 5) == 0)
			return false;
	return strlen(args) < 1024;
}

static int install_file(const char *src, const char *dir, const char *name, TemplateFileInfo *ret,
			char **ret_error)
{
	_cleanup_free_ char *dest = NULL;
	struct stat st;
	int r;

	if (asprintf(&dest, "%s/%s", dir, name) < 0)
		return -ENOMEM;
	r = storage_copy_sparse(src, dest, true);
	if (r < 0)
		return error_set(ret_error, r, "cannot copy %s: %m", src);
	r = sha256_file(dest, ret->sha256);
	if (r < 0)
		return error_set(ret_error, r, "cannot hash %s: %m", dest);
	if (stat(dest, &st) < 0)
		return error_set(ret_error, -errno, "cannot stat %s: %m", dest);
	ret->size_bytes = (uint64_t)st.st_size;
	ret->source = strdup(src);
	if (!ret->source)
		return -ENOMEM;
	ret->path = TAKE_PTR(dest);
	return 0;
}

static bool template_same(const Template *t, const Template *n)
{
	if (t->boot.present != n->boot.present ||
	    (t->boot.present && (t->boot.vcpu_count != n->boot.vcpu_count ||
				 t->boot.memory_mib != n->boot.memory_mib)))
		return false;
	return strcmp(t->kernel.sha256, n->kernel.sha256) == 0 &&
	       strcmp(t->rootfs.sha256, n->rootfs.sha256) == 0 &&
	       !!t->initrd.path == !!n->initrd.path &&
	       (!t->initrd.path || strcmp(t->initrd.sha256, n->initrd.sha256) == 0) &&
	       strcmp(t->boot_args, n->boot_args) == 0 && kv_list_equal(&t->labels, &n->labels);
}

int manager_template_register(Manager *m, const char *id, const char *kernel, const char *rootfs,
			      const char *initrd, const char *boot_args, KvList *labels,
			      unsigned boot_vcpus, unsigned boot_mib, Template **ret_existing,
			      char **ret_error)
{
	_cleanup_(template_freep) Template *t = calloc(1, sizeof(*t));
	_cleanup_free_ char *tmp = NULL, *final = NULL, *rec = NULL;
	json_object *o;
	Template *old;
	int r;

	if (!t)
		return -ENOMEM;
	t->id = strdup(id);
	t->boot_args = strdup(boot_args ?: "");
	if (!t->id || !t->boot_args)
		return -ENOMEM;
	t->labels = *labels;
	*labels = (KvList){};
	t->state = EMBER__V1__TEMPLATE_STATE__TEMPLATE_STATE_READY;
	clock_gettime(CLOCK_REALTIME, &t->create_time);

	if (asprintf(&tmp, "%s/.tmp-%s-%d-%lx", m->templates_dir, id, (int)getpid(),
		     (unsigned long)pthread_self()) < 0 ||
	    asprintf(&final, "%s/%s", m->templates_dir, id) < 0 ||
	    asprintf(&rec, "%s/" TEMPLATE_RECORD, tmp) < 0)
		return -ENOMEM;
	r = mkdir_p(tmp, 0700);
	if (r < 0)
		return error_set(ret_error, r, "cannot create %s: %m", tmp);
	if ((r = install_file(kernel, tmp, "kernel", &t->kernel, ret_error)) < 0 ||
	    (r = install_file(rootfs, tmp, "rootfs.ext4", &t->rootfs, ret_error)) < 0 ||
	    (initrd && initrd[0] &&
	     (r = install_file(initrd, tmp, "initrd", &t->initrd, ret_error)) < 0)) {
		(void)rm_rf(tmp);
		return r;
	}

	if (storage_usage_file(t->rootfs.path, &t->rootfs_disk_used) < 0)
		t->rootfs_disk_used = 0;
	if (boot_mib) {
		/* Booted from the files where they are now, in the directory that becomes the
		 * template: the snapshot is part of it from the start, or there is no template. */
		_cleanup_free_ char *bdir = NULL;
		if (asprintf(&bdir, "%s/" BOOT_SNAPSHOT_DIR, tmp) < 0) {
			(void)rm_rf(tmp);
			return -ENOMEM;
		}
		r = mkdir_p(bdir, 0700);
		if (r >= 0)
			r = template_boot_snapshot(m, t, bdir, boot_vcpus, boot_mib, ret_error);
		if (r < 0) {
			(void)rm_rf(tmp);
			return r;
		}
		t->boot.present = true;
		t->boot.vcpu_count = boot_vcpus;
		t->boot.memory_mib = boot_mib;
		t->boot.fc_version = strdup(m->vmm.version);
		if (!t->boot.fc_version || template_boot_paths(&t->boot, final) < 0) {
			(void)rm_rf(tmp);
			return -ENOMEM;
		}
	}
	/* The record names the final paths: it becomes valid by the rename below. Written (and
	 * synced) before the lock is taken: only the check and the rename happen under it. */
	TemplateFileInfo *files[] = {&t->kernel, &t->rootfs, &t->initrd};
	for (size_t i = 0; i < ELEMENTSOF(files); i++) {
		if (!files[i]->path)
			continue;
		char *p;
		const char *base = strrchr(files[i]->path, '/') + 1;
		if (asprintf(&p, "%s/%s", final, base) < 0) {
			(void)rm_rf(tmp);
			return -ENOMEM;
		}
		free(files[i]->path);
		files[i]->path = p;
	}
	o = template_to_json(t);
	r = o ? record_write(rec, o) : -ENOMEM;
	json_object_put(o);
	if (r < 0) {
		(void)rm_rf(tmp);
		return error_set(ret_error, r, "cannot write the record of template %s: %m", id);
	}

	pthread_mutex_lock(&m->lock);
	old = manager_template_find_locked(m, id);
	if (old && old->state != EMBER__V1__TEMPLATE_STATE__TEMPLATE_STATE_READY) {
		bool pulling = old->state == EMBER__V1__TEMPLATE_STATE__TEMPLATE_STATE_PULLING;
		pthread_mutex_unlock(&m->lock);
		(void)rm_rf(tmp);
		return error_set(
			ret_error, -EINPROGRESS,
			pulling ? "template %s is still PULLING"
				: "template %s is FAILED (its pull failed): delete it first",
			id);
	}
	if (old) {
		bool same = template_same(old, t);
		if (same)
			*ret_existing = old;
		pthread_mutex_unlock(&m->lock);
		(void)rm_rf(tmp);
		if (same)
			return 0;
		return error_set(ret_error, -EEXIST,
				 "template %s exists with different content, boot_args or labels",
				 id);
	}
	if (rename(tmp, final) < 0) {
		r = -errno;
		pthread_mutex_unlock(&m->lock);
		(void)rm_rf(tmp);
		return error_set(ret_error, r, "cannot install template %s as %s: %m", id, final);
	}
	r = template_insert_locked(m, t);
	if (r < 0) {
		pthread_mutex_unlock(&m->lock);
		(void)rm_rf(final);
		return error_set(ret_error, r, "cannot install template %s: %m", id);
	}
	template_usage_refresh(t);
	*ret_existing = TAKE_PTR(t);
	pthread_mutex_unlock(&m->lock);
	log_struct(LOG_INFO, 0,
		   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_TEMPLATE_REGISTERED}, {"OP", "register"},
			      {"TEMPLATE_ID", id}),
		   "template %s registered (kernel %s, rootfs %s)", id, kernel, rootfs);
	return 0;
}

RpcCode node_register_template(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__RegisterTemplateRequest *req = (const void *)request;
	_cleanup_(arena_freep) Arena *a = arena_new();
	_cleanup_free_ char *err = NULL;
	KvList labels = {};
	Template *t = NULL;
	struct stat kst = {}, rst = {}, ist = {};
	RpcCode code;
	int r;

	if (!a)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	if (!id_is_valid(req->template_id))
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "template_id \"%.100s\" is not a valid id "
				      "([a-z0-9][a-z0-9-]{0,62})",
				      req->template_id);
	if ((code = stat_input(call, "kernel_path", req->kernel_path, true, &kst)) != RPC_OK ||
	    (code = stat_input(call, "rootfs_path", req->rootfs_path, true, &rst)) != RPC_OK ||
	    (code = stat_input(call, "initrd_path", req->initrd_path, false, &ist)) != RPC_OK)
		return code;
	if (rst.st_size == 0 || rst.st_size % 512)
		return rpc_call_error(
			call, RPC_INVALID_ARGUMENT,
			"rootfs_path %.200s is %lld bytes, not a positive multiple of "
			"512 (a disk image)",
			req->rootfs_path, (long long)rst.st_size);
	if (!template_boot_args_valid(req->boot_args))
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "boot_args must not set root= or init= (emberd sets them) "
				      "and must be shorter than 1024 bytes");
	unsigned boot_vcpus = 0, boot_mib = 0;
	if (req->boot_snapshot) {
		boot_vcpus = req->boot_snapshot->vcpu_count ?: 1;
		boot_mib = req->boot_snapshot->memory_mib ?: 512;
		if (boot_vcpus > 32 || boot_mib < 128 || boot_mib > 1048576)
			return rpc_call_error(
				call, RPC_INVALID_ARGUMENT,
				"boot_snapshot: vcpu_count %u or memory_mib %u out of "
				"range (1..32, 128..1048576; 0 takes 1 and 512)",
				boot_vcpus, boot_mib);
		if (!m->vmm.uffd)
			return rpc_call_error(call, RPC_FAILED_PRECONDITION,
					      "boot_snapshot: ember-uffd, which serves restored "
					      "memory, is not found on this node ([vmm] uffd_bin)");
	}
	code = kv_from_pb(call, "labels", KV_LABELS, req->labels, req->n_labels, &labels);
	if (code != RPC_OK)
		return code;

	r = manager_template_register(m, req->template_id, req->kernel_path, req->rootfs_path,
				      req->initrd_path, req->boot_args, &labels, boot_vcpus,
				      boot_mib, &t, &err);
	kv_list_done(&labels);
	if (r == -EEXIST)
		return rpc_call_error(call, RPC_ALREADY_EXISTS, "%s", err);
	if (r == -EBUSY)
		return rpc_call_error(call, RPC_UNAVAILABLE, "%s", err);
	if (r == -EINPROGRESS)
		return rpc_call_error(call, RPC_FAILED_PRECONDITION, "%s", err);
	if (r == -ENOSPC || r == -EDQUOT)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "not enough disk: %s",
				      err ?: strerror(-r));
	if (r < 0 || !t)
		return rpc_call_error(call, RPC_INTERNAL, "%s", err ?: strerror(r < 0 ? -r : EIO));

	/* Again under the lock: a DeleteTemplate may have come in between. */
	pthread_mutex_lock(&m->lock);
	t = manager_template_find_locked(m, req->template_id);
	Ember__V1__Template *p = t ? template_to_pb(a, t) : NULL;
	pthread_mutex_unlock(&m->lock);
	if (!t)
		return rpc_call_error(call, RPC_NOT_FOUND,
				      "template %s was deleted while it was being registered",
				      req->template_id);
	if (!p)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	return rpc_call_send(call, &p->base) < 0 ? RPC_CANCELLED : RPC_OK;
}

RpcCode node_get_template(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__GetTemplateRequest *req = (const void *)request;
	_cleanup_(arena_freep) Arena *a = arena_new();
	Ember__V1__Template *p;
	Template *t;
	int r;

	if (!a)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	if (!id_is_valid(req->template_id))
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "template_id \"%.100s\" is not a valid id", req->template_id);
	pthread_mutex_lock(&m->lock);
	t = manager_template_find_locked(m, req->template_id);
	if (!t) {
		pthread_mutex_unlock(&m->lock);
		return rpc_call_error(call, RPC_NOT_FOUND, "no template %s", req->template_id);
	}
	p = template_to_pb(a, t);
	pthread_mutex_unlock(&m->lock);
	r = p ? rpc_call_send(call, &p->base) : -ENOMEM;
	return r < 0 ? RPC_CANCELLED : RPC_OK;
}

RpcCode node_list_templates(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__ListTemplatesRequest *req = (const void *)request;
	Ember__V1__ListTemplatesResponse resp = EMBER__V1__LIST_TEMPLATES_RESPONSE__INIT;
	_cleanup_(arena_freep) Arena *a = arena_new();
	KvList selector = {};
	RpcCode code;
	int r = 0;

	if (!a)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	code = kv_from_pb(call, "label_selector", KV_LABELS, req->label_selector,
			  req->n_label_selector, &selector);
	if (code != RPC_OK)
		return code;
	pthread_mutex_lock(&m->lock);
	resp.templates = arena_alloc(a, (m->n_templates + 1) * sizeof(Ember__V1__Template *));
	for (size_t i = 0; resp.templates && i < m->n_templates; i++) {
		Template *t = m->templates[i];
		if (!kv_list_matches(&t->labels, &selector))
			continue;
		if (!(resp.templates[resp.n_templates++] = template_to_pb(a, t)))
			r = -ENOMEM;
	}
	if (!resp.templates)
		r = -ENOMEM;
	pthread_mutex_unlock(&m->lock);
	kv_list_done(&selector);
	if (r < 0)
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	return rpc_call_send(call, &resp.base) < 0 ? RPC_CANCELLED : RPC_OK;
}

RpcCode node_delete_template(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	static _Atomic unsigned deletes;
	const Ember__V1__DeleteTemplateRequest *req = (const void *)request;
	Ember__V1__DeleteTemplateResponse resp = EMBER__V1__DELETE_TEMPLATE_RESPONSE__INIT;
	_cleanup_free_ char *dir = NULL, *gone = NULL;
	Template *t;
	int r;

	if (!id_is_valid(req->template_id))
		return rpc_call_error(call, RPC_INVALID_ARGUMENT,
				      "template_id \"%.100s\" is not a valid id", req->template_id);
	pthread_mutex_lock(&m->lock);
	t = manager_template_find_locked(m, req->template_id);
	if (!t) {
		pthread_mutex_unlock(&m->lock);
		return rpc_call_error(call, RPC_NOT_FOUND, "no template %s", req->template_id);
	}
	if (t->sandbox_count || t->snapshot_count) {
		unsigned sc = t->sandbox_count, nc = t->snapshot_count;
		pthread_mutex_unlock(&m->lock);
		return rpc_call_error(call, RPC_FAILED_PRECONDITION,
				      "template %s is used by %u sandboxes and %u snapshots; "
				      "destroy or delete them first",
				      req->template_id, sc, nc);
	}
	bool ready = t->state == EMBER__V1__TEMPLATE_STATE__TEMPLATE_STATE_READY;
	if (asprintf(&dir, ready ? "%s/%s" : "%s/.pull-%s", m->templates_dir, t->id) < 0 ||
	    /* unique: a directory a crash or a racing pull left under the name must not
	     * block this delete */
	    asprintf(&gone, "%s/.deleted-%s-%d-%u", m->templates_dir, t->id, (int)getpid(),
		     atomic_fetch_add(&deletes, 1)) < 0) {
		pthread_mutex_unlock(&m->lock);
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	}
	/* The rename makes the deletion take effect at once (a crash leaves a .deleted- directory
	 * that start-up removes); the files go after the lock is released. */
	r = rename(dir, gone) < 0 ? -errno : 0;
	if (r < 0 && r != -ENOENT) {
		pthread_mutex_unlock(&m->lock);
		return rpc_call_error(call, RPC_INTERNAL, "cannot remove %s: %s", dir,
				      strerror(-r));
	}
	template_remove_locked(m, t);
	/* A pull in progress ends (its streams with ABORTED); its files go with the directory. */
	if (t->pull)
		pull_abort_locked(t->pull);
	pthread_mutex_unlock(&m->lock);
	/* Sandboxes hold no pointer to it (sandbox_count was 0 under the lock). */
	template_free(t);
	(void)rm_rf(gone);
	log_struct(LOG_INFO, 0,
		   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_TEMPLATE_DELETED}, {"OP", "delete"},
			      {"TEMPLATE_ID", req->template_id}),
		   "template %s deleted", req->template_id);
	return rpc_call_send(call, &resp.base) < 0 ? RPC_CANCELLED : RPC_OK;
}
