/* SPDX-License-Identifier: Apache-2.0 */
#include "node.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <sys/utsname.h>
#include <systemd/sd-id128.h>
#include <time.h>
#include <unistd.h>

#include "common/fileio.h"
#include "common/log.h"
#include "common/macro.h"
#include "ember/v1/node.pb-c.h"
#include "manager.h"
#include "node-sandbox.h"
#include "probe.h"

/* Probes run a program (firecracker --version) and open devices: cheap enough per minute,
 * not per call. */
#define PROBE_MAX_AGE_SEC 30

struct NodeService {
	const Config *config;
	char node_id[SD_ID128_UUID_STRING_MAX];
	struct timespec start_time; /* CLOCK_REALTIME */
	time_t boot_time;           /* read once: /proc/stat is large and btime never changes */

	Manager *_Atomic manager;

	pthread_mutex_t probe_lock;
	time_t probed_at; /* CLOCK_MONOTONIC seconds, 0 = never */
	ProbeResult kvm, dm, uffd, fc;
};

static int node_id_load(const char *state_dir, char *ret, char **ret_error)
{
	_cleanup_free_ char *path = NULL, *text = NULL;
	sd_id128_t id;
	int r;

	if (asprintf(&path, "%s/node-id", state_dir) < 0)
		return -ENOMEM;
	r = read_full_file(path, 4096, &text, NULL);
	if (r >= 0) {
		text[strcspn(text, " \t\r\n")] = 0;
		/* Never replace an unreadable id silently: the scheduler knows the node by it. */
		if (sd_id128_from_string(text, &id) < 0) {
			if (asprintf(
				    ret_error,
				    "%s holds \"%s\", which is not a UUID; fix or remove it (a new "
				    "id is then generated and the scheduler sees a new node)",
				    path, text) < 0)
				*ret_error = NULL;
			return -EINVAL;
		}
		sd_id128_to_uuid_string(id, ret);
		return 0;
	}
	if (r != -ENOENT) {
		if (asprintf(ret_error, "cannot read %s: %s", path, strerror(-r)) < 0)
			*ret_error = NULL;
		return r;
	}

	r = sd_id128_randomize(&id);
	if (r < 0)
		return r;
	sd_id128_to_uuid_string(id, ret);
	char line[SD_ID128_UUID_STRING_MAX + 1];
	int n = snprintf(line, sizeof(line), "%s\n", ret);
	r = write_file_atomic(path, line, (size_t)n, 0644);
	if (r < 0) {
		if (asprintf(ret_error, "cannot write %s: %s", path, strerror(-r)) < 0)
			*ret_error = NULL;
		return r;
	}
	log_info("generated node id %s (stored in %s)", ret, path);
	return 0;
}

static time_t read_boot_time(void)
{
	_cleanup_fclose_ FILE *f = fopen("/proc/stat", "re");
	char line[256];
	long long t;

	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "btime %lld", &t) == 1)
			return (time_t)t;
	return 0;
}

int node_service_new(const Config *config, NodeService **ret, char **ret_error)
{
	_cleanup_(node_service_freep) NodeService *n = NULL;
	int r;

	n = calloc(1, sizeof(*n));
	if (!n)
		return -ENOMEM;
	n->config = config;
	pthread_mutex_init(&n->probe_lock, NULL);
	clock_gettime(CLOCK_REALTIME, &n->start_time);
	n->boot_time = read_boot_time();
	r = node_id_load(config->state_dir, n->node_id, ret_error);
	if (r < 0)
		return r;
	*ret = TAKE_PTR(n);
	return 0;
}

void node_service_free(NodeService *n)
{
	if (!n)
		return;
	pthread_mutex_destroy(&n->probe_lock);
	free(n);
}

const char *node_service_id(const NodeService *n)
{
	return n->node_id;
}

static void probes_refresh(NodeService *n, ProbeResult out[4])
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	pthread_mutex_lock(&n->probe_lock);
	if (n->probed_at == 0 || now.tv_sec - n->probed_at >= PROBE_MAX_AGE_SEC) {
		probe_kvm(&n->kvm);
		probe_device_mapper(&n->dm);
		probe_userfaultfd(&n->uffd);
		probe_firecracker(n->config->firecracker_bin, &n->fc);
		n->probed_at = now.tv_sec ?: 1;
	}
	out[0] = n->kvm;
	out[1] = n->dm;
	out[2] = n->uffd;
	out[3] = n->fc;
	pthread_mutex_unlock(&n->probe_lock);
}

void node_service_probe(NodeService *n)
{
	static const char *const names[] = {"kvm", "device-mapper", "userfaultfd", "firecracker"};
	ProbeResult r[4];

	probes_refresh(n, r);
	for (size_t i = 0; i < ELEMENTSOF(r); i++)
		log_struct(r[i].available ? LOG_INFO : LOG_NOTICE, 0,
			   LOG_FIELDS({"OP", "probe"}, {"FACILITY", names[i]}), "%s: %s: %s",
			   names[i], r[i].available ? "available" : "NOT available", r[i].reason);
}

static void fill_probe(Ember__V1__Probe *p, ProbeResult *r)
{
	p->available = r->available;
	p->version = r->version;
	p->reason = r->reason;
}

static RpcCode get_node(RpcCall *call, const ProtobufCMessage *request, void *userdata)
{
	NodeService *n = userdata;
	Ember__V1__NodeInfo info = EMBER__V1__NODE_INFO__INIT;
	Ember__V1__NodeCapabilities caps = EMBER__V1__NODE_CAPABILITIES__INIT;
	Ember__V1__Probe probes[4];
	Google__Protobuf__Timestamp start = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
	Google__Protobuf__Timestamp boot = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
	ProbeResult results[4];
	char hostname[256] = "";
	struct utsname uts;
	struct statvfs vfs;
	long cpus;
	(void)request;

	probes_refresh(n, results);
	for (size_t i = 0; i < ELEMENTSOF(probes); i++) {
		ember__v1__probe__init(&probes[i]);
		fill_probe(&probes[i], &results[i]);
	}
	caps.kvm = &probes[0];
	caps.device_mapper = &probes[1];
	caps.userfaultfd = &probes[2];
	caps.firecracker = &probes[3];

	(void)gethostname(hostname, sizeof(hostname) - 1);
	if (uname(&uts) < 0)
		uts.release[0] = 0;
	cpus = sysconf(_SC_NPROCESSORS_ONLN);

	info.node_id = n->node_id;
	info.hostname = hostname;
	info.agent_version = (char *)EMBER_VERSION;
	info.kernel_release = uts.release;
	info.cpu_count = cpus > 0 ? (uint32_t)cpus : 0;
	HostMemory mem;
	probe_memory(&mem);
	info.memory_total_bytes = mem.total;
	info.memory_available_bytes = mem.available;
	info.huge_pages_total_bytes = mem.huge_total;
	info.huge_pages_free_bytes = mem.huge_free;
	info.state_dir = n->config->state_dir;
	if (statvfs(n->config->state_dir, &vfs) == 0) {
		info.disk_total_bytes = (uint64_t)vfs.f_blocks * vfs.f_frsize;
		info.disk_free_bytes = (uint64_t)vfs.f_bavail * vfs.f_frsize;
	}
	info.capabilities = &caps;
	switch (rpc_server_get_state(rpc_call_server(call))) {
	case RPC_SERVER_STARTING:
		info.serving_state = EMBER__V1__SERVING_STATE__SERVING_STATE_STARTING;
		break;
	case RPC_SERVER_SERVING:
		info.serving_state = EMBER__V1__SERVING_STATE__SERVING_STATE_SERVING;
		break;
	default:
		info.serving_state = EMBER__V1__SERVING_STATE__SERVING_STATE_DRAINING;
		break;
	}
	start.seconds = n->start_time.tv_sec;
	start.nanos = (int32_t)n->start_time.tv_nsec;
	info.start_time = &start;
	boot.seconds = n->boot_time;
	if (boot.seconds > 0)
		info.boot_time = &boot;
	Manager *m = n->manager;
	if (m) {
		const VmmInfo *vmm = manager_vmm(m);
		info.sandbox_count = manager_sandbox_count(m);
		info.vmm = (char *)vmm_kind_to_string(vmm->kind);
		info.vmm_version = vmm->version;
		info.simulated = vmm->kind == VMM_FCSIM;
		info.storage_backend = (char *)manager_storage_backend(m);
	}

	if (rpc_call_send(call, &info.base) < 0)
		return RPC_CANCELLED;
	return RPC_OK;
}

void node_service_set_manager(NodeService *n, Manager *m)
{
	n->manager = m;
}

bool node_service_kvm_usable(NodeService *n)
{
	ProbeResult r[4];

	probes_refresh(n, r);
	return r[0].available;
}

/* The manager's calls answer UNAVAILABLE until recovery is done (node.proto: STARTING). */
#define MANAGER_CALL(name, fn)                                                                     \
	static RpcCode name(RpcCall *call, const ProtobufCMessage *request, void *userdata)        \
	{                                                                                          \
		Manager *m = ((NodeService *)userdata)->manager;                                   \
		if (!m)                                                                            \
			return rpc_call_error(call, RPC_UNAVAILABLE,                               \
					      "emberd is STARTING (recovering its sandboxes); "    \
					      "retry shortly");                                    \
		return fn(call, request, m);                                                       \
	}
MANAGER_CALL(register_template, node_register_template)
MANAGER_CALL(get_template, node_get_template)
MANAGER_CALL(list_templates, node_list_templates)
MANAGER_CALL(delete_template, node_delete_template)
MANAGER_CALL(pull_template, node_pull_template)
MANAGER_CALL(create_sandbox, node_create_sandbox)
MANAGER_CALL(get_sandbox, node_get_sandbox)
MANAGER_CALL(list_sandboxes, node_list_sandboxes)
MANAGER_CALL(pause_sandbox, node_pause_sandbox)
MANAGER_CALL(resume_sandbox, node_resume_sandbox)
MANAGER_CALL(destroy_sandbox, node_destroy_sandbox)
MANAGER_CALL(update_sandbox, node_update_sandbox)
MANAGER_CALL(watch_sandboxes, node_watch_sandboxes)
MANAGER_CALL(create_snapshot, node_create_snapshot)
MANAGER_CALL(get_snapshot, node_get_snapshot)
MANAGER_CALL(list_snapshots, node_list_snapshots)
MANAGER_CALL(delete_snapshot, node_delete_snapshot)
MANAGER_CALL(exec, node_exec)
MANAGER_CALL(write_file, node_write_file)
MANAGER_CALL(read_file, node_read_file)
MANAGER_CALL(read_console, node_read_console)

int node_service_register(NodeService *n, RpcServer *s)
{
	static const RpcMethodHandler handlers[] = {
		{"GetNode", get_node},
		{"RegisterTemplate", register_template},
		{"GetTemplate", get_template},
		{"ListTemplates", list_templates},
		{"DeleteTemplate", delete_template},
		{"PullTemplate", pull_template},
		{"CreateSandbox", create_sandbox},
		{"GetSandbox", get_sandbox},
		{"ListSandboxes", list_sandboxes},
		{"PauseSandbox", pause_sandbox},
		{"ResumeSandbox", resume_sandbox},
		{"DestroySandbox", destroy_sandbox},
		{"UpdateSandbox", update_sandbox},
		{"WatchSandboxes", watch_sandboxes},
		{"CreateSnapshot", create_snapshot},
		{"GetSnapshot", get_snapshot},
		{"ListSnapshots", list_snapshots},
		{"DeleteSnapshot", delete_snapshot},
		{"Exec", exec},
		{"WriteFile", write_file},
		{"ReadFile", read_file},
		{"ReadConsole", read_console},
	};
	return rpc_server_add_service(s, &ember__v1__node__descriptor, handlers,
				      ELEMENTSOF(handlers), n);
}
