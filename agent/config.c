/* SPDX-License-Identifier: Apache-2.0 */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/error.h"
#include "common/log.h"
#include "common/macro.h"
#include "netns/netns.h"

typedef enum KeyType {
	KEY_ABS_PATH,     /* absolute path, required */
	KEY_OPT_ABS_PATH, /* empty or absolute path */
	KEY_PROGRAM,      /* a name looked up in PATH, or an absolute path */
	KEY_LOG_LEVEL,
	KEY_BOOL,
	KEY_UINT,
	KEY_U64,         /* a whole number, 64 bits */
	KEY_LISTEN_ADDR, /* empty or HOST:PORT */
	KEY_OPT_PROGRAM, /* empty or KEY_PROGRAM */
	KEY_CHOICE,      /* one of `choices` */
	KEY_CIDR,        /* an IPv4 CIDR */
	KEY_IFNAME,      /* auto, none or an interface name */
} KeyType;

typedef struct Key {
	ConfigKeyInfo info;
	KeyType type;
	size_t offset;
	unsigned min, max;          /* KEY_UINT */
	const char *const *choices; /* KEY_CHOICE, NULL-terminated */
} Key;

#define VMM_KINDS        ((const char *const[]){"auto", "firecracker", "fcsim", NULL})
#define STORAGE_BACKENDS ((const char *const[]){"auto", "dm", "file", NULL})
#define SYSTEMD_MODES    ((const char *const[]){"auto", "yes", "no", NULL})

#define STR(field)       offsetof(Config, field)

static const Key keys[] = {
	{{"agent", "state_dir", "/var/lib/ember", "an absolute path",
	  "State that survives reboots: node id, templates, sandboxes, snapshots."},
	 KEY_ABS_PATH,
	 STR(state_dir),
	 0,
	 0,
	 NULL},
	{{"agent", "run_dir", "/run/ember", "an absolute path",
	  "Runtime state: the API socket, per-sandbox working directories."},
	 KEY_ABS_PATH,
	 STR(run_dir),
	 0,
	 0,
	 NULL},
	{{"agent", "log_level", "info", "debug, info, notice, warning or err",
	  "Most verbose level logged."},
	 KEY_LOG_LEVEL,
	 STR(log_level),
	 0,
	 0,
	 NULL},
	{{"agent", "systemd", "auto", "auto, yes or no",
	  "Put each sandbox's processes (VMM, ember-uffd) into a systemd scope "
	  "ember-sbx-<id>.scope under ember.slice, with its CPU and memory limits, and register "
	  "it with systemd-machined, so that sandboxes survive a restart or crash of "
	  "emberd.service. "
	  "auto: when the host booted with systemd and the system bus answers; yes: refuse to "
	  "start otherwise; no: the processes stay in emberd's own cgroup."},
	 KEY_CHOICE,
	 STR(systemd),
	 0,
	 0,
	 SYSTEMD_MODES},

	{{"api", "socket", "", "empty (meaning <run_dir>/ember.sock) or an absolute path",
	  "gRPC unix socket, mode 0600, guarded by <socket>.lock."},
	 KEY_OPT_ABS_PATH,
	 STR(socket),
	 0,
	 0,
	 NULL},
	{{"api", "tcp_listen", "", "empty (no TCP listener) or HOST:PORT, e.g. 0.0.0.0:7070",
	  "Optional TCP listener. Requires tls_cert, tls_key and tls_client_ca (mutual TLS) "
	  "unless insecure_tcp = true."},
	 KEY_LISTEN_ADDR,
	 STR(tcp_listen),
	 0,
	 0,
	 NULL},
	{{"api", "tls_cert", "", "empty or an absolute path to a PEM file",
	  "Server certificate chain for tcp_listen."},
	 KEY_OPT_ABS_PATH,
	 STR(tls_cert),
	 0,
	 0,
	 NULL},
	{{"api", "tls_key", "", "empty or an absolute path to a PEM file",
	  "Private key of tls_cert."},
	 KEY_OPT_ABS_PATH,
	 STR(tls_key),
	 0,
	 0,
	 NULL},
	{{"api", "tls_client_ca", "", "empty or an absolute path to a PEM file",
	  "CA bundle client certificates must chain to; clients without one are refused."},
	 KEY_OPT_ABS_PATH,
	 STR(tls_client_ca),
	 0,
	 0,
	 NULL},
	{{"api", "insecure_tcp", "false", "true or false",
	  "Serve tcp_listen in plaintext without client authentication. Anyone who can reach "
	  "the port controls the node: for isolated test networks only."},
	 KEY_BOOL,
	 STR(insecure_tcp),
	 0,
	 0,
	 NULL},
	{{"api", "max_message_mib", "16", "a whole number from 1 to 1024",
	  "Largest gRPC message accepted or sent, in MiB (gRPC's default is 4)."},
	 KEY_UINT,
	 STR(max_message_mib),
	 1,
	 1024,
	 NULL},
	{{"api", "keepalive_time_s", "30", "a whole number from 1 to 86400",
	  "The server pings each connection after this many idle seconds, so a vanished "
	  "scheduler is noticed."},
	 KEY_UINT,
	 STR(keepalive_time_s),
	 1,
	 86400,
	 NULL},
	{{"api", "keepalive_timeout_s", "10", "a whole number from 1 to 3600",
	  "A connection whose ping is not answered within this many seconds is closed."},
	 KEY_UINT,
	 STR(keepalive_timeout_s),
	 1,
	 3600,
	 NULL},
	{{"api", "min_ping_interval_s", "10", "a whole number from 1 to 3600",
	  "Clients may send keepalive pings this often (seconds) without being disconnected "
	  "with GOAWAY too_many_pings; set client keepalive_time at or above it."},
	 KEY_UINT,
	 STR(min_ping_interval_s),
	 1,
	 3600,
	 NULL},
	{{"api", "max_concurrent_calls", "256", "a whole number from 1 to 4096",
	  "Unary calls handled at once (each holds a worker thread while it runs); more get "
	  "RESOURCE_EXHAUSTED. Streams do not count: they have max_concurrent_streams."},
	 KEY_UINT,
	 STR(max_concurrent_calls),
	 1,
	 4096,
	 NULL},
	{{"api", "max_concurrent_streams", "1024", "a whole number from 1 to 16384",
	  "Streaming calls open at once (Exec, file transfers, watches, reflection); more get "
	  "RESOURCE_EXHAUSTED. They run on threads of their own, never on the unary calls'."},
	 KEY_UINT,
	 STR(max_concurrent_streams),
	 1,
	 16384,
	 NULL},
	{{"api", "max_file_mib", "1024", "a whole number from 1 to 1048576",
	  "The largest file WriteFile writes or ReadFile reads, in MiB."},
	 KEY_UINT,
	 STR(max_file_mib),
	 1,
	 1048576,
	 NULL},
	{{"api", "shutdown_grace_s", "15", "a whole number from 0 to 3600",
	  "On SIGTERM, calls in flight get this many seconds to finish before they are "
	  "cancelled. Keep it below systemd's TimeoutStopSec."},
	 KEY_UINT,
	 STR(shutdown_grace_s),
	 0,
	 3600,
	 NULL},

	{{"vmm", "kind", "auto", "auto, firecracker or fcsim",
	  "What runs the microVMs. auto: Firecracker when /dev/kvm can run a guest and "
	  "firecracker_bin is found, otherwise fcsim (the simulator; GetNode then reports the "
	  "node as simulated). The choice and its reason are logged at start."},
	 KEY_CHOICE,
	 STR(vmm_kind),
	 0,
	 0,
	 VMM_KINDS},
	{{"vmm", "firecracker_bin", "firecracker",
	  "a program name (looked up in PATH) or an absolute path", "The Firecracker binary."},
	 KEY_PROGRAM,
	 STR(firecracker_bin),
	 0,
	 0,
	 NULL},
	{{"vmm", "fcsim_bin", "", "empty or a program name (looked up in PATH) or an absolute path",
	  "The fcsim binary. Empty: fcsim next to the emberd binary, else in PATH."},
	 KEY_OPT_PROGRAM,
	 STR(fcsim_bin),
	 0,
	 0,
	 NULL},
	{{"vmm", "jailer_bin", "",
	  "empty or a program name (looked up in PATH) or an absolute path",
	  "Run Firecracker under this jailer (chroot, own uid). Empty: no jailer. Not supported by "
	  "the sandbox flows yet: a value is refused at start."},
	 KEY_OPT_PROGRAM,
	 STR(jailer_bin),
	 0,
	 0,
	 NULL},
	{{"vmm", "uffd_bin", "", "empty or a program name (looked up in PATH) or an absolute path",
	  "ember-uffd, the memory server of resumed sandboxes. Empty: next to the emberd binary, "
	  "then ../lib/ember/ from it (where the package installs it), else in PATH. Without it "
	  "PauseSandbox and ResumeSandbox are FAILED_PRECONDITION."},
	 KEY_OPT_PROGRAM,
	 STR(uffd_bin),
	 0,
	 0,
	 NULL},
	{{"vmm", "uffd_prefetch", "true", "true or false",
	  "ember-uffd copies a resumed sandbox's whole memory in the background right after the "
	  "restore, instead of only the pages the guest touches: the guest stops taking faults "
	  "sooner, at the cost of reading the whole memory file."},
	 KEY_BOOL,
	 STR(uffd_prefetch),
	 0,
	 0,
	 NULL},
	{{"vmm", "uffd_working_set", "true", "true or false",
	  "For sandboxes created from a snapshot or a template's boot snapshot, whose memory file "
	  "many sandboxes share: the first create records which pages its guest wanted first, in "
	  "that order, beside the memory file (<memory file>.ws), and later creates copy those "
	  "pages before any other (working-set replay). A paused sandbox's own memory is resumed "
	  "once, and gets none."},
	 KEY_BOOL,
	 STR(uffd_working_set),
	 0,
	 0,
	 NULL},
	{{"vmm", "boot_timeout_s", "30", "a whole number from 1 to 600",
	  "How long a create or restore waits for the guest agent to answer before it fails "
	  "and unwinds."},
	 KEY_UINT,
	 STR(boot_timeout_s),
	 1,
	 600,
	 NULL},

	{{"storage", "backend", "auto", "auto, dm or file",
	  "Sandbox disks: dm (device-mapper snapshots over one shared base loop device) or file "
	  "(a reflinked or sparse copy of the base per sandbox). auto: dm where device-mapper "
	  "answers, else file."},
	 KEY_CHOICE,
	 STR(storage_backend),
	 0,
	 0,
	 STORAGE_BACKENDS},
	{{"storage", "default_disk_mib", "1024", "a whole number from 16 to 1048576",
	  "Copy-on-write allowance of a sandbox whose spec gives disk_size_mib = 0."},
	 KEY_UINT,
	 STR(default_disk_mib),
	 16,
	 1048576,
	 NULL},
	{{"storage", "max_disk_mib", "65536", "a whole number from 16 to 1048576",
	  "Largest disk_size_mib a create may ask for; more is INVALID_ARGUMENT."},
	 KEY_UINT,
	 STR(max_disk_mib),
	 16,
	 1048576,
	 NULL},

	{{"network", "netns_dir", "/run/netns", "an absolute path",
	  "Where sandbox network namespaces are bind-mounted (/run/netns: `ip netns exec "
	  "ember-N` works)."},
	 KEY_ABS_PATH,
	 STR(netns_dir),
	 0,
	 0,
	 NULL},
	{{"network", "sandbox_range", "10.200.0.0/16", "an IPv4 CIDR, e.g. 10.200.0.0/16",
	  "Host-reachable sandbox IPs: one per network slot, routed into the slot. Its size "
	  "(less 2) bounds the number of slots."},
	 KEY_CIDR,
	 STR(sandbox_range),
	 0,
	 0,
	 NULL},
	{{"network", "veth_range", "10.201.0.0/16", "an IPv4 CIDR, e.g. 10.201.0.0/16",
	  "Point-to-point /31 links between the host and each slot. Half its size bounds the "
	  "number of slots."},
	 KEY_CIDR,
	 STR(veth_range),
	 0,
	 0,
	 NULL},
	{{"network", "uplink", "auto", "auto, none or an interface name",
	  "Interface sandboxes allowed the internet are masqueraded to. auto: the interface of "
	  "the default route at start; none: no sandbox reaches the internet."},
	 KEY_IFNAME,
	 STR(uplink),
	 0,
	 0,
	 NULL},
	{{"network", "pool_size", "4", "a whole number from 0 to 256",
	  "Network slots kept ready (namespace, links, default policy) so that a create does "
	  "not wait for them."},
	 KEY_UINT,
	 STR(pool_size),
	 0,
	 256,
	 NULL},
	{{"network", "allow_internet", "false", "true or false",
	  "Egress of a sandbox created without a network policy: false allows nothing "
	  "outbound, true the internet (never the private ranges)."},
	 KEY_BOOL,
	 STR(default_allow_internet),
	 0,
	 0,
	 NULL},

	{{"sandboxes", "max_sandboxes", "1000", "a whole number from 1 to 65536",
	  "Sandboxes on the node, in any state; a create beyond it is RESOURCE_EXHAUSTED."},
	 KEY_UINT,
	 STR(max_sandboxes),
	 1,
	 65536,
	 NULL},
	{{"sandboxes", "memory_reserve_mib", "512", "a whole number from 0 to 1048576",
	  "Admission: a create is RESOURCE_EXHAUSTED unless the host's MemAvailable exceeds "
	  "this plus the new sandbox's memory_mib."},
	 KEY_UINT,
	 STR(memory_reserve_mib),
	 0,
	 1048576,
	 NULL},
	{{"sandboxes", "worker_threads", "16", "a whole number from 1 to 256",
	  "Threads that run lifecycle operations (create, destroy, ...); more operations wait "
	  "their turn, the API stays responsive."},
	 KEY_UINT,
	 STR(worker_threads),
	 1,
	 256,
	 NULL},

	{{"sandboxes", "event_log_size", "4096", "a whole number from 16 to 1048576",
	  "Sandbox events kept in memory for WatchSandboxes clients that reconnect with "
	  "since_revision; one that missed more gets a resync (the full set) instead."},
	 KEY_UINT,
	 STR(event_log_size),
	 16,
	 1048576,
	 NULL},

	{{"sandboxes", "default_lifetime_s", "0", "a whole number of seconds from 0 to 315360000",
	  "The end time of a sandbox created without one (SandboxSpec.end_time): its create "
	  "time plus this. 0: such a sandbox has no end time."},
	 KEY_UINT,
	 STR(default_lifetime_s),
	 0,
	 315360000,
	 NULL},
	{{"sandboxes", "max_lifetime_s", "0", "a whole number of seconds from 0 to 315360000",
	  "Caps every sandbox's end time at its create time plus this, whatever the create "
	  "asked for. 0: no cap."},
	 KEY_UINT,
	 STR(max_lifetime_s),
	 0,
	 315360000,
	 NULL},
	{{"sandboxes", "console_kib", "512", "a whole number from 16 to 1048576",
	  "Each sandbox's serial console log (run_dir/sandboxes/<id>/console.log, read with "
	  "ReadConsole) keeps the last this many KiB, up to an eighth more between trims."},
	 KEY_UINT,
	 STR(console_kib),
	 16,
	 1048576,
	 NULL},
	{{"sandboxes", "memory_overhead_mib", "64", "a whole number from 0 to 65536",
	  "A sandbox's systemd scope (see [agent] systemd) gets MemoryMax = its memory_mib plus "
	  "this, for the VMM's own memory, ember-uffd and the disk's page cache. 0: no MemoryMax."},
	 KEY_UINT,
	 STR(memory_overhead_mib),
	 0,
	 65536,
	 NULL},

	{{"http", "listen", "127.0.0.1:7071", "empty (no HTTP listener) or HOST:PORT",
	  "The HTTP listener: the operator's page at /test, the API as JSON under /v1/ and "
	  "/metrics. Every request needs the token. A non-loopback address needs allow_remote."},
	 KEY_LISTEN_ADDR,
	 STR(http_listen),
	 0,
	 0,
	 NULL},
	{{"http", "token_file", "", "empty or an absolute path",
	  "Read the HTTP token from this file (at least 16 characters) instead of making a "
	  "random one at each start. Either way it is written to <run_dir>/http-token (0600)."},
	 KEY_OPT_ABS_PATH,
	 STR(http_token_file),
	 0,
	 0,
	 NULL},
	{{"http", "allow_remote", "false", "true or false",
	  "Allow a non-loopback listen address. The listener is plain HTTP: anyone who sees the "
	  "token can control the node."},
	 KEY_BOOL,
	 STR(http_allow_remote),
	 0,
	 0,
	 NULL},
	{{"http", "metrics_public", "false", "true or false",
	  "Serve /metrics to loopback clients without the token (for a local Prometheus "
	  "agent)."},
	 KEY_BOOL,
	 STR(http_metrics_public),
	 0,
	 0,
	 NULL},

	{{"templates", "demo", "true", "true or false",
	  "Register the built-in `demo` template (a busybox userland with ember-init and "
	  "ember-guest, made with ember-mkrootfs) on first start, so that a new node can run a "
	  "sandbox at once."},
	 KEY_BOOL,
	 STR(demo_template),
	 0,
	 0,
	 NULL},
	{{"templates", "demo_kernel", "", "empty or an absolute path",
	  "Guest kernel of the demo template. Required with Firecracker (without it the demo "
	  "template is skipped); under fcsim any file does and emberd writes a placeholder."},
	 KEY_OPT_ABS_PATH,
	 STR(demo_kernel),
	 0,
	 0,
	 NULL},
	{{"templates", "ca_file", "", "empty or an absolute path",
	  "PullTemplate verifies https servers against this CA bundle (PEM) instead of the "
	  "system's CA store (for an artifact server with a private CA)."},
	 KEY_OPT_ABS_PATH,
	 STR(pull_ca_file),
	 0,
	 0,
	 NULL},
	{{"templates", "max_artifact_bytes", "68719476736", "a whole number of bytes, at least 1",
	  "Largest artifact (kernel, rootfs, initrd) PullTemplate downloads; a larger size_bytes "
	  "is refused, a download growing past it fails with RESOURCE_EXHAUSTED."},
	 KEY_U64,
	 STR(max_artifact_bytes),
	 1,
	 0,
	 NULL},
	{{"templates", "max_parallel_pulls", "2", "a whole number from 1 to 64",
	  "Templates downloaded at once; further pulls wait their turn (DOWNLOADING, 0 bytes). "
	  "The artifacts of one template download in parallel."},
	 KEY_UINT,
	 STR(max_parallel_pulls),
	 1,
	 64,
	 NULL},
	{{"templates", "pull_retries", "5", "a whole number from 0 to 100",
	  "Retries of an artifact after a network error or an HTTP 5xx, 408 or 429 (resumed "
	  "with a Range request where the server allows) before the pull fails with "
	  "UNAVAILABLE. A retry that received bytes starts the count again."},
	 KEY_UINT,
	 STR(pull_retries),
	 0,
	 100,
	 NULL},
	{{"templates", "pull_retry_delay_ms", "1000", "a whole number from 1 to 60000",
	  "Delay before the first retry; it doubles with each further one, up to 30 s."},
	 KEY_UINT,
	 STR(pull_retry_delay_ms),
	 1,
	 60000,
	 NULL},
	{{"templates", "pull_stall_timeout_s", "30", "a whole number from 1 to 3600",
	  "A transfer that receives nothing for this long is dropped and retried."},
	 KEY_UINT,
	 STR(pull_stall_timeout_s),
	 1,
	 3600,
	 NULL},
};

static const Key *key_find(const char *section, const char *key)
{
	for (size_t i = 0; i < ELEMENTSOF(keys); i++)
		if (strcmp(keys[i].info.section, section) == 0 &&
		    strcmp(keys[i].info.key, key) == 0)
			return &keys[i];
	return NULL;
}

size_t config_n_keys(void)
{
	return ELEMENTSOF(keys);
}

const ConfigKeyInfo *config_key_info(size_t i)
{
	return i < ELEMENTSOF(keys) ? &keys[i].info : NULL;
}

static bool parse_bool(const char *v, bool *ret)
{
	static const char *const yes[] = {"true", "yes", "on", "1"};
	static const char *const no[] = {"false", "no", "off", "0"};

	for (size_t i = 0; i < ELEMENTSOF(yes); i++) {
		if (strcasecmp(v, yes[i]) == 0) {
			*ret = true;
			return true;
		}
		if (strcasecmp(v, no[i]) == 0) {
			*ret = false;
			return true;
		}
	}
	return false;
}

static bool parse_uint(const char *v, unsigned min, unsigned max, unsigned *ret)
{
	char *end;
	unsigned long long x;

	if (*v < '0' || *v > '9')
		return false;
	errno = 0;
	x = strtoull(v, &end, 10);
	if (errno || *end || x < min || x > max)
		return false;
	*ret = (unsigned)x;
	return true;
}

/* HOST:PORT where HOST is a name, an IPv4 address or a bracketed IPv6 address. gRPC resolves
 * the name itself; here only the shape is checked so that mistakes fail at startup. */
static bool listen_addr_valid(const char *v)
{
	const char *colon = strrchr(v, ':');
	unsigned port;

	if (!colon || colon == v)
		return false;
	if (!parse_uint(colon + 1, 0, 65535, &port))
		return false;
	if (v[0] == '[')
		return colon[-1] == ']' && colon - v > 2;
	for (const char *p = v; p < colon; p++)
		if (*p == ':' || *p == '/' || *p == ' ')
			return false;
	return true;
}

int config_set(Config *c, const char *section, const char *key, const char *value, char **ret_error)
{
	const Key *k = key_find(section, key);
	void *field;
	bool b;
	unsigned u;
	int level;

	if (!k) {
		bool section_known = false;
		for (size_t i = 0; i < ELEMENTSOF(keys); i++)
			section_known = section_known || strcmp(keys[i].info.section, section) == 0;
		if (!section_known)
			return error_set(
				ret_error, -ENOENT,
				"unknown section [%s]; known sections are [agent], [api], [vmm], "
				"[storage], [network], [sandboxes], [http] and [templates]",
				section);
		char known[512] = "";
		size_t len = 0;
		for (size_t i = 0; i < ELEMENTSOF(keys) && len < sizeof(known); i++)
			if (strcmp(keys[i].info.section, section) == 0)
				len += (size_t)snprintf(known + len, sizeof(known) - len, "%s%s",
							len ? ", " : "", keys[i].info.key);
		return error_set(ret_error, -ENOENT, "unknown key [%s] %s; keys of [%s] are: %s",
				 section, key, section, known);
	}
	field = (char *)c + k->offset;

	/* A newline or other control character would make the value mean something else once
	 * written back as an ini file (--dump-config): refuse it outright. */
	for (const char *p = value; *p; p++)
		if ((unsigned char)*p < 0x20 || *p == 0x7f)
			return error_set(ret_error, -EINVAL,
					 "[%s] %s: the value contains a control character", section,
					 key);

#define BAD(...)                                                                                   \
	error_set(ret_error, -EINVAL, "[%s] %s = \"%s\": expected %s", section, key, value,        \
		  k->info.allowed)

	switch (k->type) {
	case KEY_ABS_PATH:
	case KEY_OPT_ABS_PATH:
		if (k->type == KEY_ABS_PATH ? value[0] != '/' : value[0] && value[0] != '/')
			return BAD();
		if (strlen(value) >= PATH_MAX)
			return BAD();
		break;
	case KEY_PROGRAM:
		if (!value[0] || (strchr(value, '/') && value[0] != '/'))
			return BAD();
		break;
	case KEY_LOG_LEVEL:
		level = log_level_from_string(value);
		if (level < 0 || level < LOG_ERR)
			return BAD();
		*(int *)field = level;
		return 0;
	case KEY_BOOL:
		if (!parse_bool(value, &b))
			return BAD();
		*(bool *)field = b;
		return 0;
	case KEY_UINT:
		if (!parse_uint(value, k->min, k->max, &u))
			return BAD();
		*(unsigned *)field = u;
		return 0;
	case KEY_U64: {
		char *end;
		unsigned long long x;
		if (*value < '0' || *value > '9')
			return BAD();
		errno = 0;
		x = strtoull(value, &end, 10);
		if (errno || *end || x < k->min)
			return BAD();
		*(uint64_t *)field = x;
		return 0;
	}
	case KEY_LISTEN_ADDR:
		if (value[0] && !listen_addr_valid(value))
			return BAD();
		break;
	case KEY_OPT_PROGRAM:
		if (value[0] && strchr(value, '/') && value[0] != '/')
			return BAD();
		break;
	case KEY_CHOICE: {
		bool found = false;
		for (const char *const *ch = k->choices; *ch && !found; ch++)
			found = strcmp(*ch, value) == 0;
		if (!found)
			return BAD();
		break;
	}
	case KEY_CIDR: {
		NetnsCidr cidr;
		if (netns_cidr_parse(value, &cidr) < 0 || cidr.prefix > 30)
			return BAD();
		break;
	}
	case KEY_IFNAME:
		/* IFNAMSIZ is 16 with the NUL; a '/' or blank cannot be part of a name. */
		if (!value[0] || strlen(value) > 15 || strpbrk(value, "/ :"))
			return BAD();
		break;
	}
#undef BAD

	char *copy = strdup(value);
	if (!copy)
		return -ENOMEM;
	free(*(char **)field);
	*(char **)field = copy;
	return 0;
}

int config_init(Config *c)
{
	*c = (Config){};
	for (size_t i = 0; i < ELEMENTSOF(keys); i++) {
		int r = config_set(c, keys[i].info.section, keys[i].info.key,
				   keys[i].info.default_value, NULL);
		if (r < 0) {
			config_free(c);
			return r;
		}
	}
	return 0;
}

void config_free(Config *c)
{
	for (size_t i = 0; i < ELEMENTSOF(keys); i++) {
		KeyType t = keys[i].type;
		if (t != KEY_LOG_LEVEL && t != KEY_BOOL && t != KEY_UINT && t != KEY_U64) {
			char **p = (char **)((char *)c + keys[i].offset);
			free(*p);
			*p = NULL;
		}
	}
	free(c->loaded_from);
	c->loaded_from = NULL;
}

typedef struct LoadCtx {
	Config *config;
	FILE *file;
	const char *path;
	int lineno; /* Debian's inih has no INI_HANDLER_LINENO: the reader counts lines */
	int error_line;
	char *error;
	int r;
} LoadCtx;

static void load_fail(LoadCtx *ctx, int r, char *message)
{
	if (ctx->r < 0) {
		free(message);
		return;
	}
	ctx->r = r;
	ctx->error = message;
	ctx->error_line = ctx->lineno;
}

static char *read_line(char *str, int num, void *stream)
{
	LoadCtx *ctx = stream;
	char *s = fgets(str, num, ctx->file);
	size_t len;

	if (!s)
		return NULL;
	ctx->lineno++;
	/* inih reads at most num-1 bytes and would take the rest of a longer line as a line
	 * of its own: refuse the file instead of reading something else than was written. */
	len = strlen(s);
	if (len == (size_t)num - 1 && s[len - 1] != '\n' && !feof(ctx->file)) {
		char *m;
		if (asprintf(&m, "%s:%d: line longer than %d bytes", ctx->path, ctx->lineno,
			     num - 2) < 0)
			m = NULL;
		load_fail(ctx, -E2BIG, m);
		return NULL;
	}
	return s;
}

static int on_ini_entry(void *user, const char *section, const char *name, const char *value)
{
	LoadCtx *ctx = user;
	_cleanup_free_ char *err = NULL;
	int r;

	if (ctx->r < 0)
		return 0;
	if (!name) /* a section header alone */
		return 1;
	r = config_set(ctx->config, section, name, value ?: "", &err);
	if (r < 0) {
		char *m;
		if (asprintf(&m, "%s:%d: %s", ctx->path, ctx->lineno, err ?: "invalid") < 0)
			m = NULL;
		load_fail(ctx, r, m);
		return 0;
	}
	return 1;
}

int config_load_file(Config *c, const char *path, bool must_exist, char **ret_error)
{
	LoadCtx ctx = {.config = c, .path = path};
	_cleanup_fclose_ FILE *f = NULL;
	struct stat st;
	int line;

	f = fopen(path, "re");
	if (!f) {
		if (errno == ENOENT && !must_exist)
			return 0;
		return error_set(ret_error, -errno, "cannot read config file %s: %s", path,
				 strerror(errno));
	}
	if (fstat(fileno(f), &st) < 0)
		return error_set(ret_error, -errno, "cannot stat config file %s: %s", path,
				 strerror(errno));
	/* /dev/null is a fine "no settings"; a directory is a mistake. */
	if (!S_ISREG(st.st_mode) && !S_ISCHR(st.st_mode) && !S_ISFIFO(st.st_mode))
		return error_set(ret_error, -EISDIR, "config file %s is not a regular file", path);
	ctx.file = f;
	line = ini_parse_stream(read_line, &ctx, on_ini_entry, &ctx);
	if (ferror(f) && ctx.r >= 0) {
		free(ctx.error);
		return error_set(ret_error, -EIO, "cannot read config file %s", path);
	}
	/* inih keeps going after a syntax error and returns the first bad line; a refused
	 * value on a later line must not hide it. */
	if (line != 0 && (ctx.r >= 0 || line < ctx.error_line)) {
		free(ctx.error);
		return error_set(ret_error, -EINVAL,
				 "%s:%d: syntax error (expected [section] or key = value)", path,
				 line);
	}
	if (ctx.r < 0) {
		if (ret_error)
			*ret_error = ctx.error;
		else
			free(ctx.error);
		return ctx.r;
	}
	free(c->loaded_from);
	c->loaded_from = strdup(path);
	return c->loaded_from ? 0 : -ENOMEM;
}

static int check_readable(const char *key, const char *path, char **ret_error)
{
	if (access(path, R_OK) < 0)
		return error_set(ret_error, -errno, "[api] %s = \"%s\": cannot read it: %s", key,
				 path, strerror(errno));
	return 0;
}

int config_finish(Config *c, char **ret_error)
{
	int r;

	if (!c->socket[0]) {
		char *s;
		if (asprintf(&s, "%s/ember.sock", c->run_dir) < 0)
			return -ENOMEM;
		free(c->socket);
		c->socket = s;
	}
	/* sun_path is 108 bytes including the NUL; the lock file name needs room too. */
	if (strlen(c->socket) > 100)
		return error_set(
			ret_error, -ENAMETOOLONG,
			"[api] socket = \"%s\": expected a path of at most 100 bytes (unix "
			"socket addresses are limited to 108)",
			c->socket);

	/* The two ranges are routed differently on the host: an overlap would send sandbox
	 * traffic down a veth link or the other way round. */
	NetnsCidr sr, vr;
	if (netns_cidr_parse(c->sandbox_range, &sr) >= 0 &&
	    netns_cidr_parse(c->veth_range, &vr) >= 0) {
		unsigned p = sr.prefix < vr.prefix ? sr.prefix : vr.prefix;
		uint32_t mask = p ? htonl(~0u << (32 - p)) : 0;
		if ((sr.addr.s_addr & mask) == (vr.addr.s_addr & mask))
			return error_set(
				ret_error, -EINVAL,
				"[network] sandbox_range = %s and veth_range = %s overlap; "
				"choose disjoint ranges",
				c->sandbox_range, c->veth_range);
	}

	/* The HTTP listener controls the node with a token sent in the clear: off loopback
	 * only when the operator says so. */
	if (c->http_listen[0] && !c->http_allow_remote) {
		_cleanup_free_ char *host = strndup(
			c->http_listen, (size_t)(strrchr(c->http_listen, ':') - c->http_listen));
		struct in_addr a4;
		struct in6_addr a6;
		bool loopback = false;
		if (host && host[0] == '[' && host[strlen(host) - 1] == ']') {
			host[strlen(host) - 1] = 0;
			loopback = inet_pton(AF_INET6, host + 1, &a6) == 1 &&
				   IN6_IS_ADDR_LOOPBACK(&a6);
		} else if (host) {
			loopback = strcmp(host, "localhost") == 0 ||
				   (inet_pton(AF_INET, host, &a4) == 1 &&
				    (ntohl(a4.s_addr) >> 24) == 127);
		}
		if (!loopback)
			return error_set(ret_error, -EINVAL,
					 "[http] listen = \"%s\" is not a loopback address: the "
					 "listener controls the node with a token sent in plain "
					 "HTTP, so this needs [http] allow_remote = true",
					 c->http_listen);
	}

	bool any_tls = c->tls_cert[0] || c->tls_key[0] || c->tls_client_ca[0];
	bool all_tls = c->tls_cert[0] && c->tls_key[0] && c->tls_client_ca[0];
	if (any_tls && !all_tls)
		return error_set(ret_error, -EINVAL,
				 "[api] tls_cert, tls_key and tls_client_ca must be set together "
				 "(mutual TLS needs all three)");
	if (c->tcp_listen[0]) {
		if (c->insecure_tcp && any_tls)
			return error_set(
				ret_error, -EINVAL,
				"[api] insecure_tcp = true together with TLS files: choose "
				"one");
		if (!c->insecure_tcp && !all_tls)
			return error_set(
				ret_error, -EINVAL,
				"[api] tcp_listen = \"%s\" needs tls_cert, tls_key and "
				"tls_client_ca (clients must present a certificate), or "
				"insecure_tcp = true to serve plaintext without authentication",
				c->tcp_listen);
		if (all_tls) {
			if ((r = check_readable("tls_cert", c->tls_cert, ret_error)) < 0 ||
			    (r = check_readable("tls_key", c->tls_key, ret_error)) < 0 ||
			    (r = check_readable("tls_client_ca", c->tls_client_ca, ret_error)) < 0)
				return r;
		}
	}
	return 0;
}

void config_dump(const Config *c, FILE *f)
{
	const char *section = NULL;

	for (size_t i = 0; i < ELEMENTSOF(keys); i++) {
		const Key *k = &keys[i];
		const void *field = (const char *)c + k->offset;

		if (!section || strcmp(section, k->info.section) != 0) {
			fprintf(f, "%s[%s]\n", section ? "\n" : "", k->info.section);
			section = k->info.section;
		}
		switch (k->type) {
		case KEY_LOG_LEVEL:
			fprintf(f, "%s = %s\n", k->info.key,
				log_level_to_string(*(const int *)field));
			break;
		case KEY_BOOL:
			fprintf(f, "%s = %s\n", k->info.key,
				*(const bool *)field ? "true" : "false");
			break;
		case KEY_UINT:
			fprintf(f, "%s = %u\n", k->info.key, *(const unsigned *)field);
			break;
		case KEY_U64:
			fprintf(f, "%s = %llu\n", k->info.key,
				(unsigned long long)*(const uint64_t *)field);
			break;
		default:
			fprintf(f, "%s = %s\n", k->info.key, *(char *const *)field);
			break;
		}
	}
}
