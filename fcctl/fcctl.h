/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Driving Firecracker (DESIGN.md §7-8): the process (spawn in a network namespace and working
 * directory, wait for its API socket, supervise through a pidfd, stop, adopt after an agent
 * restart), its API (libcurl over the unix socket, JSON through json-c), and the vsock dialer.
 * The same code drives `firecracker`, `fcsim` or `jailer` + firecracker: only the binary differs.
 *
 * Every call returns >= 0 or -errno; API calls also give Firecracker's fault_message verbatim
 * (or what went wrong on the way) in *ret_fault. Nothing here logs above debug level.
 *
 * Threads. One FcVm may be used from several threads at once, with one exception:
 * - fcctl_vm_pid(), fcctl_vm_pidfd(), fcctl_vm_workdir(): any time; the values never change.
 * - fcctl_vm_reap(), fcctl_vm_wait(), fcctl_vm_stop(), fcctl_vm_supervise(): concurrently with
 *   each other and with API calls, from any number of threads. Exactly one call reaps the
 *   VMM (an API call that finds it dead may be that one); every call that reports an exit,
 *   before or after, reports that same FcExit.
 * - API calls (fcctl_put_*, fcctl_instance_start, ...): concurrently with everything above;
 *   calls on one FcVm are serialised on its connection, so a call waits for the one in
 *   progress (up to its timeout). fcctl_vm_set_timeout(): any time, for calls that start later.
 * - fcctl_vm_free(): the exception. Only once no other call on the FcVm is running or can
 *   start; pointers it handed out (workdir) and its pidfd end with it.
 * Calls on different FcVms are independent.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

typedef struct FcVm FcVm;

#define FCCTL_API_SOCK "api.sock"

typedef struct FcSpawn {
	const char *binary;       /* firecracker, fcsim, or the Firecracker binary for the jailer */
	const char *id;           /* --id; also checked when adopting */
	const char *workdir;      /* the VMM's working directory: api.sock and relative paths
				   * (with the jailer: the chroot is, see fcctl_jail_root()) */
	const char *netns;        /* a network namespace file to enter before exec, or NULL */
	const char *log_path;     /* --log-path (relative to workdir), or NULL */
	const char *output;       /* file for the VMM's stdout/stderr (serial console), relative
				   * to workdir; NULL: fc.out */
	const char *const *stale; /* files in workdir to remove first (old sockets), NULL-ended */
	int start_timeout_ms;     /* for the API socket to answer; 0: 10 s */
	/* jailer: run `jailer --id --exec-file binary --uid --gid [--netns]
	 * [--chroot-base-dir] -- --api-sock /api.sock` instead. The jailer enters the network
	 * namespace itself and chroots the VMM into fcctl_jail_root(), which spawn creates: the
	 * API socket is <chroot>/api.sock, `stale` and every relative path of the API resolve
	 * there (link drives and kernel into it), fcctl_vm_workdir() returns it. The output file
	 * stays in workdir. */
	const char *jailer;
	uid_t uid;
	gid_t gid;
	const char *chroot_base; /* default FCCTL_JAILER_BASE */
} FcSpawn;

#define FCCTL_JAILER_BASE "/srv/jailer"

/* The jailer's chroot for a VMM: <chroot_base>/<basename of binary>/<id>/root. -EINVAL for an
 * id the jailer refuses (1-64 characters of [A-Za-z0-9-]). */
int fcctl_jail_root(const char *chroot_base, const char *binary, const char *id, char **ret);

typedef struct FcExit {
	bool exited;
	bool known; /* false for an adopted process: not our child, no status */
	int code;   /* exit status, when exited normally */
	int signal; /* the signal that ended it, or 0 */
	bool stopped_by_us;
} FcExit;

/* Starts the VMM and waits until its API socket answers. -ENAMETOOLONG, before anything is
 * created or started, when <workdir>/api.sock (with the jailer: <chroot>/api.sock) does not fit
 * a unix socket address (107 bytes and the NUL). The child gets an empty signal mask and the
 * default disposition for every signal the caller ignores. */
int fcctl_vm_spawn(const FcSpawn *spawn, FcVm **ret, char **ret_error);
/* ---- ember-uffd ----
 *
 * The memory server of a VMM restored with the Uffd backend (DESIGN.md §7) is a process of its
 * own, so that it survives an agent restart as the VMM does. Its handle is an FcVm too: the
 * process calls (pid, pidfd, reap, wait, stop, free) work on it, fcctl_vm_adopt() takes it over
 * after a restart (with the ember-uffd binary, the same id and workdir); the API calls do not
 * apply. It ends by itself when its VMM goes away. */

#define FCCTL_UFFD_SOCK "uffd.sock"

typedef struct FcUffdSpawn {
	const char *binary;       /* ember-uffd */
	const char *id;           /* --id, checked when adopting */
	const char *workdir;      /* its working directory (the sandbox's run dir) */
	const char *socket;       /* relative to workdir; NULL: FCCTL_UFFD_SOCK */
	const char *mem_path;     /* the snapshot's memory file */
	const char *output;       /* its stderr, relative to workdir; NULL: uffd.out */
	const char *stats_file;   /* its live counters (uffd.h), relative to workdir; NULL: none */
	bool prefetch;            /* copy all memory in the background after the handshake */
	const char *working_set;  /* --working-set: replayed or recorded there (NULL: none) */
	int start_timeout_ms;     /* for the socket to appear; 0: 10 s */
	int handshake_timeout_ms; /* for the VMM to connect once it listens; 0: 30 s */
} FcUffdSpawn;

/* The counters an ember-uffd started with a stats_file keeps current (uffd.h). Returns
 * -ENOENT, or -EBADMSG for a file of another format. */
typedef struct FcUffdCounters {
	uint64_t faults;         /* page faults served */
	uint64_t fault_bytes;    /* bytes copied to serve them */
	uint64_t prefetch_bytes; /* bytes copied ahead of faults (the sweep) */
	uint64_t replay_bytes;   /* bytes copied ahead of faults from the working set */
} FcUffdCounters;
int fcctl_uffd_counters_read(const char *path, FcUffdCounters *ret);

/* Starts ember-uffd and waits (inotify, no polling) until its socket is there: then send
 * /snapshot/load with that socket as the Uffd backend. No test connection is made: ember-uffd
 * serves the first peer that connects. */
int fcctl_uffd_spawn(const FcUffdSpawn *spawn, FcVm **ret, char **ret_error);

/* Takes over a VMM started by an earlier agent, after checking that pid runs `binary`
 * (/proc/<pid>/exe), was started with --id `id`, and works in `workdir` (/proc/<pid>/cwd);
 * files are compared by device and inode; a process whose binary was since replaced at that
 * path (an upgrade: its exe reads "<binary> (deleted)") counts as running it. A jailed VMM:
 * binary is the jailer's copy,
 * <chroot>/<name>, and workdir the chroot. */
int fcctl_vm_adopt(pid_t pid, const char *binary, const char *id, const char *workdir, FcVm **ret,
		   char **ret_error);
void fcctl_vm_free(FcVm *vm); /* forgets the process; it keeps running */

pid_t fcctl_vm_pid(const FcVm *vm);
/* For an event loop (epoll): readable once the process has exited, and it stays readable after
 * the reap (remove it from the set then). Owned by the FcVm, valid until fcctl_vm_free(). Do
 * not waitid() on it: fcctl_vm_reap() does, once, for every caller. */
int fcctl_vm_pidfd(const FcVm *vm);
const char *fcctl_vm_workdir(const FcVm *vm); /* valid until fcctl_vm_free() */

/* Never blocks. 0 and *ret once the VMM has exited (reaped here if it is our child; an adopted
 * VMM, or a child something else in the program reaped, has no status for us: known=false),
 * -EAGAIN while it runs. Idempotent: later calls, and fcctl_vm_wait()/fcctl_vm_stop(), report
 * the same FcExit. */
int fcctl_vm_reap(FcVm *vm, FcExit *ret);
/* Waits up to timeout_ms (-1: forever) for the VMM to exit, and reaps it. -ETIMEDOUT. */
int fcctl_vm_wait(FcVm *vm, int timeout_ms, FcExit *ret);
/* SIGTERM, SIGKILL after timeout_ms, reaped; how it ended in *ret. Idempotent; a VMM that has
 * already exited is not signalled. stopped_by_us says whether a signal of ours was sent. */
int fcctl_vm_stop(FcVm *vm, int timeout_ms, FcExit *ret);
/* Blocks until the VMM or the helper process (a pidfd, e.g. ember-uffd) ends. If the helper
 * ends first the VMM is stopped: a Firecracker whose memory server is gone would hang its
 * guest forever. Returns 0 when the VMM ended by itself, -EPIPE when the helper did. */
int fcctl_vm_supervise(FcVm *vm, int helper_pidfd, int stop_timeout_ms, FcExit *ret);

/* Per-call timeout for API requests (default 10 s). An answer longer than 64 KiB fails the
 * call with -EMSGSIZE. */
void fcctl_vm_set_timeout(FcVm *vm, int timeout_ms);

/* ---- API ---- */

typedef enum FcHugePages {
	FC_HUGE_PAGES_NONE,
	FC_HUGE_PAGES_2M,
} FcHugePages;

int fcctl_put_machine_config(FcVm *vm, unsigned vcpus, unsigned mem_mib, bool smt,
			     bool track_dirty_pages, FcHugePages huge, char **ret_fault);
int fcctl_put_boot_source(FcVm *vm, const char *kernel, const char *initrd, const char *boot_args,
			  char **ret_fault);
int fcctl_put_drive(FcVm *vm, const char *drive_id, const char *path, bool root, bool read_only,
		    char **ret_fault);
int fcctl_put_network_interface(FcVm *vm, const char *iface_id, const char *host_dev_name,
				const char *guest_mac, char **ret_fault);
/* Removes a stale socket at uds_path (relative to the workdir) first: Firecracker refuses one
 * that exists. */
int fcctl_put_vsock(FcVm *vm, unsigned guest_cid, const char *uds_path, char **ret_fault);
int fcctl_put_logger(FcVm *vm, const char *log_path, const char *level, char **ret_fault);
int fcctl_put_metrics(FcVm *vm, const char *metrics_path, char **ret_fault);
int fcctl_instance_start(FcVm *vm, char **ret_fault);
int fcctl_vm_pause(FcVm *vm, char **ret_fault);
int fcctl_vm_resume(FcVm *vm, char **ret_fault);
int fcctl_snapshot_create(FcVm *vm, const char *snapshot_path, const char *mem_path, bool diff,
			  char **ret_fault);

typedef struct FcNetOverride {
	const char *iface_id;
	const char *host_dev_name;
} FcNetOverride;

typedef struct FcSnapshotLoad {
	const char *snapshot_path;
	bool uffd;                /* Uffd backend; File otherwise */
	const char *backend_path; /* memory file, or the handler's socket */
	bool resume;
	bool track_dirty_pages;
	const FcNetOverride *net_overrides;
	size_t n_net_overrides;
	const char *vsock_override; /* uds_path, or NULL (Firecracker >= 1.16) */
} FcSnapshotLoad;

int fcctl_snapshot_load(FcVm *vm, const FcSnapshotLoad *load, char **ret_fault);

/* GET /: state ("Not started", "Running", "Paused") and vmm_version. */
int fcctl_describe(FcVm *vm, char **ret_state, char **ret_vmm_version, char **ret_fault);
/* GET /version */
int fcctl_version(FcVm *vm, char **ret_version, char **ret_fault);

/* ---- vsock ---- */

/* Firecracker's hybrid vsock: connects to uds_path, sends "CONNECT <port>\n", reads
 * "OK <n>\n"; the returned fd is then the stream to the guest. -ECONNREFUSED when nothing
 * listens in the guest (Firecracker closes the connection), -ETIMEDOUT. */
int fcctl_vsock_dial(const char *uds_path, unsigned port, int timeout_ms, char **ret_error);
