/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Firecracker's API over its unix socket with libcurl: one easy handle per VM, reused (keeps
 * the connection), guarded by a mutex so one VM can be driven from several threads. Bodies are
 * built and parsed with json-c, never printed by hand.
 */
#include <curl/curl.h>
#include <json-c/json.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/macro.h"
#include "fcctl-internal.h"

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;

static void curl_setup(void)
{
	curl_global_init(CURL_GLOBAL_NOTHING);
}

typedef struct Buffer {
	char *data;
	size_t len, size;
	bool overflow;
} Buffer;

/* The VMM is not trusted to end its answer: past FCCTL_API_MAX_RESPONSE the transfer is
 * aborted (libcurl fails it with CURLE_WRITE_ERROR) instead of growing without end. */
static size_t on_data(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	Buffer *b = userdata;
	size_t n = size * nmemb;

	if (n > FCCTL_API_MAX_RESPONSE - b->len) {
		b->overflow = true;
		return 0;
	}
	if (b->len + n + 1 > b->size) {
		size_t want = b->size ? b->size : 1024;
		while (want < b->len + n + 1)
			want *= 2;
		char *d = realloc(b->data, want);
		if (!d)
			return 0;
		b->data = d;
		b->size = want;
	}
	memcpy(b->data + b->len, ptr, n);
	b->len += n;
	b->data[b->len] = 0;
	return n;
}

int api_init(FcVm *vm)
{
	pthread_once(&curl_once, curl_setup);
	pthread_mutex_init(&vm->api_lock, NULL);
	vm->timeout_ms = 10000;
	vm->curl = curl_easy_init();
	return vm->curl ? 0 : -ENOMEM;
}

void api_done(FcVm *vm)
{
	if (vm->curl)
		curl_easy_cleanup(vm->curl);
	vm->curl = NULL;
	pthread_mutex_destroy(&vm->api_lock);
}

void fcctl_vm_set_timeout(FcVm *vm, int timeout_ms)
{
	vm->timeout_ms = timeout_ms > 0 ? timeout_ms : 10000;
}

static int set_fault(char **ret_fault, const char *format, ...)
	__attribute__((format(printf, 2, 3)));
static int set_fault(char **ret_fault, const char *format, ...)
{
	va_list ap;
	if (ret_fault) {
		free(*ret_fault);
		va_start(ap, format);
		if (vasprintf(ret_fault, format, ap) < 0)
			*ret_fault = NULL;
		va_end(ap);
	}
	return 0;
}

/* One request. 2xx: 0 (and *ret_reply for 200 with a body). 4xx/5xx: -EINVAL/-EIO with
 * Firecracker's fault_message. Transport failures: -errno with what happened, including the
 * VMM's exit status when it died. */
int api_call(FcVm *vm, const char *method, const char *path, json_object *body,
	     json_object **ret_reply, char **ret_fault)
{
	_cleanup_free_ char *url = NULL;
	struct curl_slist *headers = NULL;
	Buffer resp = {};
	const char *text = NULL;
	long status = 0;
	CURLcode rc;
	int r = 0;

	if (ret_reply)
		*ret_reply = NULL;
	if (asprintf(&url, "http://localhost%s", path) < 0)
		return -ENOMEM;
	if (body)
		text = json_object_to_json_string_ext(body, JSON_C_TO_STRING_PLAIN |
								    JSON_C_TO_STRING_NOSLASHESCAPE);

	pthread_mutex_lock(&vm->api_lock);
	CURL *c = vm->curl;
	curl_easy_reset(c);
	curl_easy_setopt(c, CURLOPT_UNIX_SOCKET_PATH, vm->api_sock);
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
	long timeout_ms = vm->timeout_ms;
	curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, timeout_ms);
	curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms);
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, &resp);
	headers = curl_slist_append(headers, "Accept: application/json");
	if (text) {
		headers = curl_slist_append(headers, "Content-Type: application/json");
		curl_easy_setopt(c, CURLOPT_POSTFIELDS, text);
		curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)strlen(text));
	}
	curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);
	rc = curl_easy_perform(c);
	if (rc == CURLE_OK)
		curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
	pthread_mutex_unlock(&vm->api_lock);
	curl_slist_free_all(headers);

	if (resp.overflow) {
		r = -EMSGSIZE;
		set_fault(ret_fault, "%s %s: the VMM's answer is longer than %zu KiB", method, path,
			  FCCTL_API_MAX_RESPONSE / 1024);
		goto out;
	}
	if (rc != CURLE_OK) {
		/* The VMM may have died under us: say so rather than a bare transport error. The
		 * socket closes while the process is still exiting, so its exit is given a moment
		 * to become visible (an error path: the delay costs nothing on success). */
		FcExit ex = {};
		bool dead = fcctl_vm_wait(vm, 200, &ex) >= 0;
		r = rc == CURLE_OPERATION_TIMEDOUT ? -ETIMEDOUT
		    : rc == CURLE_COULDNT_CONNECT  ? -ECONNREFUSED
						   : -ECONNRESET;
		if (dead && !ex.known)
			set_fault(ret_fault, "%s %s: the VMM (pid %d) exited during the call",
				  method, path, (int)vm->pid);
		else if (dead)
			set_fault(ret_fault, "%s %s: the VMM (pid %d) %s %d during the call",
				  method, path, (int)vm->pid,
				  ex.signal ? "was killed by signal" : "exited with",
				  ex.signal ? ex.signal : ex.code);
		else
			set_fault(ret_fault, "%s %s: %s", method, path, curl_easy_strerror(rc));
		goto out;
	}
	if (status >= 200 && status < 300) {
		if (ret_reply && resp.len > 0) {
			*ret_reply = json_tokener_parse(resp.data);
			if (!*ret_reply) {
				r = -EBADMSG;
				set_fault(ret_fault, "%s %s: the answer is not JSON", method, path);
			}
		}
		goto out;
	}
	/* Firecracker's error body: {"fault_message": "..."}; passed on verbatim. */
	json_object *err = resp.data ? json_tokener_parse(resp.data) : NULL, *msg;
	if (err && json_object_object_get_ex(err, "fault_message", &msg))
		set_fault(ret_fault, "%s", json_object_get_string(msg));
	else
		set_fault(ret_fault, "%s %s: HTTP %ld %s", method, path, status,
			  resp.data ? resp.data : "");
	json_object_put(err);
	r = status >= 400 && status < 500 ? -EINVAL : -EIO;
out:
	log_debug("%s %s -> %ld (%d)", method, path, status, r);
	free(resp.data);
	return r;
}

/* Builders: the JSON of each body, then one call. */

static json_object *obj(void)
{
	return json_object_new_object();
}

static void add_str(json_object *o, const char *k, const char *v)
{
	if (v)
		json_object_object_add(o, k, json_object_new_string(v));
}

static void add_bool(json_object *o, const char *k, bool v)
{
	json_object_object_add(o, k, json_object_new_boolean(v));
}

static void add_int(json_object *o, const char *k, int64_t v)
{
	json_object_object_add(o, k, json_object_new_int64(v));
}

static int send_body(FcVm *vm, const char *method, const char *path, json_object *body,
		     char **ret_fault)
{
	int r;
	if (!body)
		return -ENOMEM;
	r = api_call(vm, method, path, body, NULL, ret_fault);
	json_object_put(body);
	return r;
}

int fcctl_put_machine_config(FcVm *vm, unsigned vcpus, unsigned mem_mib, bool smt,
			     bool track_dirty_pages, FcHugePages huge, char **ret_fault)
{
	json_object *b = obj();
	add_int(b, "vcpu_count", vcpus);
	add_int(b, "mem_size_mib", mem_mib);
	add_bool(b, "smt", smt);
	add_bool(b, "track_dirty_pages", track_dirty_pages);
	add_str(b, "huge_pages", huge == FC_HUGE_PAGES_2M ? "2M" : "None");
	return send_body(vm, "PUT", "/machine-config", b, ret_fault);
}

int fcctl_put_boot_source(FcVm *vm, const char *kernel, const char *initrd, const char *boot_args,
			  char **ret_fault)
{
	json_object *b = obj();
	add_str(b, "kernel_image_path", kernel);
	add_str(b, "initrd_path", initrd);
	add_str(b, "boot_args", boot_args);
	return send_body(vm, "PUT", "/boot-source", b, ret_fault);
}

static int path_with_id(const char *prefix, const char *id, char **ret)
{
	/* Ids go into the URL: keep them to what Firecracker itself accepts. */
	for (const char *p = id; p && *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
		      (*p >= '0' && *p <= '9') || *p == '_' || *p == '-'))
			return -EINVAL;
	if (!id || !*id)
		return -EINVAL;
	return asprintf(ret, "%s%s", prefix, id) < 0 ? -ENOMEM : 0;
}

int fcctl_put_drive(FcVm *vm, const char *drive_id, const char *path, bool root, bool read_only,
		    char **ret_fault)
{
	_cleanup_free_ char *url = NULL;
	if (path_with_id("/drives/", drive_id, &url) < 0)
		return set_fault(ret_fault, "bad drive id \"%s\"", drive_id ?: ""), -EINVAL;
	json_object *b = obj();
	add_str(b, "drive_id", drive_id);
	add_str(b, "path_on_host", path);
	add_bool(b, "is_root_device", root);
	add_bool(b, "is_read_only", read_only);
	return send_body(vm, "PUT", url, b, ret_fault);
}

int fcctl_put_network_interface(FcVm *vm, const char *iface_id, const char *host_dev_name,
				const char *guest_mac, char **ret_fault)
{
	_cleanup_free_ char *url = NULL;
	if (path_with_id("/network-interfaces/", iface_id, &url) < 0)
		return set_fault(ret_fault, "bad interface id \"%s\"", iface_id ?: ""), -EINVAL;
	json_object *b = obj();
	add_str(b, "iface_id", iface_id);
	add_str(b, "host_dev_name", host_dev_name);
	add_str(b, "guest_mac", guest_mac);
	return send_body(vm, "PUT", url, b, ret_fault);
}

int fcctl_put_vsock(FcVm *vm, unsigned guest_cid, const char *uds_path, char **ret_fault)
{
	_cleanup_free_ char *abs = NULL;
	/* Firecracker binds uds_path and refuses one that exists: a socket left by an earlier
	 * process in this working directory is stale by construction. */
	if (uds_path && asprintf(&abs, "%s/%s", vm->workdir, uds_path) >= 0)
		(void)unlink(uds_path[0] == '/' ? uds_path : abs);
	json_object *b = obj();
	add_int(b, "guest_cid", guest_cid);
	add_str(b, "uds_path", uds_path);
	return send_body(vm, "PUT", "/vsock", b, ret_fault);
}

int fcctl_put_logger(FcVm *vm, const char *log_path, const char *level, char **ret_fault)
{
	json_object *b = obj();
	add_str(b, "log_path", log_path);
	add_str(b, "level", level);
	return send_body(vm, "PUT", "/logger", b, ret_fault);
}

int fcctl_put_metrics(FcVm *vm, const char *metrics_path, char **ret_fault)
{
	json_object *b = obj();
	add_str(b, "metrics_path", metrics_path);
	return send_body(vm, "PUT", "/metrics", b, ret_fault);
}

int fcctl_instance_start(FcVm *vm, char **ret_fault)
{
	json_object *b = obj();
	add_str(b, "action_type", "InstanceStart");
	return send_body(vm, "PUT", "/actions", b, ret_fault);
}

static int set_state(FcVm *vm, const char *state, char **ret_fault)
{
	json_object *b = obj();
	add_str(b, "state", state);
	return send_body(vm, "PATCH", "/vm", b, ret_fault);
}

int fcctl_vm_pause(FcVm *vm, char **ret_fault)
{
	return set_state(vm, "Paused", ret_fault);
}

int fcctl_vm_resume(FcVm *vm, char **ret_fault)
{
	return set_state(vm, "Resumed", ret_fault);
}

int fcctl_snapshot_create(FcVm *vm, const char *snapshot_path, const char *mem_path, bool diff,
			  char **ret_fault)
{
	json_object *b = obj();
	add_str(b, "snapshot_path", snapshot_path);
	add_str(b, "mem_file_path", mem_path);
	add_str(b, "snapshot_type", diff ? "Diff" : "Full");
	return send_body(vm, "PUT", "/snapshot/create", b, ret_fault);
}

int fcctl_snapshot_load(FcVm *vm, const FcSnapshotLoad *load, char **ret_fault)
{
	json_object *b = obj(), *backend = obj();

	add_str(b, "snapshot_path", load->snapshot_path);
	add_str(backend, "backend_type", load->uffd ? "Uffd" : "File");
	add_str(backend, "backend_path", load->backend_path);
	json_object_object_add(b, "mem_backend", backend);
	add_bool(b, "track_dirty_pages", load->track_dirty_pages);
	add_bool(b, "resume_vm", load->resume);
	if (load->n_net_overrides > 0) {
		json_object *arr = json_object_new_array();
		for (size_t i = 0; i < load->n_net_overrides; i++) {
			json_object *o = obj();
			add_str(o, "iface_id", load->net_overrides[i].iface_id);
			add_str(o, "host_dev_name", load->net_overrides[i].host_dev_name);
			json_object_array_add(arr, o);
		}
		json_object_object_add(b, "network_overrides", arr);
	}
	if (load->vsock_override) {
		json_object *o = obj();
		add_str(o, "uds_path", load->vsock_override);
		json_object_object_add(b, "vsock_override", o);
	}
	return send_body(vm, "PUT", "/snapshot/load", b, ret_fault);
}

static int get_string(json_object *o, const char *key, char **ret)
{
	json_object *v;
	if (!ret)
		return 0;
	if (!json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_string))
		return -EBADMSG;
	*ret = strdup(json_object_get_string(v));
	return *ret ? 0 : -ENOMEM;
}

int fcctl_describe(FcVm *vm, char **ret_state, char **ret_vmm_version, char **ret_fault)
{
	json_object *reply = NULL;
	int r = api_call(vm, "GET", "/", NULL, &reply, ret_fault);
	if (r >= 0)
		r = get_string(reply, "state", ret_state);
	if (r >= 0 && (r = get_string(reply, "vmm_version", ret_vmm_version)) < 0 && ret_state) {
		free(*ret_state);
		*ret_state = NULL;
	}
	json_object_put(reply);
	return r;
}

int fcctl_version(FcVm *vm, char **ret_version, char **ret_fault)
{
	json_object *reply = NULL;
	int r = api_call(vm, "GET", "/version", NULL, &reply, ret_fault);
	if (r >= 0)
		r = get_string(reply, "firecracker_version", ret_version);
	json_object_put(reply);
	return r;
}
