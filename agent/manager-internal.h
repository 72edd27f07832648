/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The sandbox manager's structures, shared by its files:
 *   sandbox.c      registry, state machine, waiters, worker pool, VMM exit watch
 *   sandbox-ops.c  the create and destroy flows, step by step, with unwinding and timing
 *   template.c     the template store
 *   record.c       records on disk (JSON, written atomically)
 *   events.c       revisions and the bounded event log behind WatchSandboxes
 *   recover.c      start-up: records, adoption of live VMMs, reclaim of leftovers
 *   node-sandbox.c the protobuf mapping and the gRPC handlers
 *   node-exec.c    Exec, and the guest session Exec, WriteFile and ReadFile share
 *   node-files.c   WriteFile and ReadFile
 *   expiry.c       end times: a heap and a timerfd in the event loop
 *   console.c      console logs: trimming, and the inotify watch that wakes followers
 *   node-console.c ReadConsole
 *
 * Locking: one manager mutex (Manager.lock) guards the registries and every Sandbox and
 * Template field marked (L). It is never held across slow work (process start, disk, network,
 * waiting for the guest). The event log has its own lock, taken inside Manager.lock when an
 * event is recorded, so that revisions follow the order of the changes.
 */
#pragma once

#include <json-c/json.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "common/log.h"
#include "ember/v1/node.pb-c.h"
#include "fcctl/fcctl.h"
#include "manager.h"
#include "metrics.h"
#include "netns/netns.h"
#include "rpc.h"
#include "storage/storage.h"
#include "systemd.h"

/* ---- specs ---- */

typedef struct KeyValue {
	char *key;
	char *value;
} KeyValue;

/* A sorted (by key), owned list of labels or env entries. */
typedef struct KvList {
	KeyValue *items;
	size_t n;
} KvList;

typedef struct StrList {
	char **items;
	size_t n;
} StrList;

/* SandboxSpec with defaults applied: what the idempotency check compares. */
typedef struct SbSpec {
	char *template_id; /* exactly one of template_id and snapshot_id */
	char *snapshot_id;
	unsigned vcpu_count;
	unsigned memory_mib;
	uint64_t disk_size_mib;
	bool allow_internet;
	StrList allow_cidrs;
	StrList deny_cidrs;
	KvList labels;
	KvList env;
	struct timespec end_time;          /* {0, 0}: none (create time and limits applied) */
	Ember__V1__ExpiryAction on_expiry; /* DESTROY or PAUSE, never UNSPECIFIED */
	bool huge_pages;                   /* guest memory in 2 MiB pages */
} SbSpec;

void kv_list_done(KvList *l);
int kv_list_copy(const KvList *l, KvList *ret);
void str_list_done(StrList *l);
void sb_spec_done(SbSpec *s);
bool sb_spec_equal(const SbSpec *a, const SbSpec *b);
bool kv_list_equal(const KvList *a, const KvList *b);
bool str_list_equal(const StrList *a, const StrList *b);
/* The slot's egress policy for it; points into s. */
NetnsPolicy sb_spec_policy(const SbSpec *s);
/* True when every selector entry is in labels with the same value. */
bool kv_list_matches(const KvList *labels, const KvList *selector);

/* ---- templates ---- */

typedef struct Pull Pull;             /* pull.c: one template's download */
typedef struct PullEngine PullEngine; /* pull.c: the thread that drives every download */

typedef struct TemplateFileInfo {
	char *path; /* NULL: no such file (initrd) */
	uint64_t size_bytes;
	char sha256[65];
	char *source;
} TemplateFileInfo;

/* A template's boot snapshot (RegisterTemplate's boot_snapshot): <template dir>/boot-snapshot/
 * {vmstate,mem,rootfs.ext4}, restored by creates of that machine instead of a boot. */
typedef struct TemplateBoot {
	bool present;
	unsigned vcpu_count, memory_mib;
	char *fc_version;
	char *vmstate, *mem, *rootfs;
	uint64_t disk_used;
} TemplateBoot;

typedef struct Template {
	char *id;
	Ember__V1__TemplateState state;
	char *state_reason;
	TemplateFileInfo kernel, rootfs, initrd;
	TemplateBoot boot;
	char *boot_args;
	uint64_t rootfs_disk_used;
	KvList labels;
	struct timespec create_time;
	unsigned sandbox_count; /* (L) sandboxes, in any state, descending from it */
	unsigned snapshot_count;
	Pull *pull; /* (L) PULLING: its download (a reference); NULL otherwise */
} Template;

void template_free(Template *t);
int template_insert_locked(Manager *m, Template *t);
void template_remove_locked(Manager *m, Template *t);
/* template.json as RegisterTemplate writes it, at path. */
int template_record_write(const Template *t, const char *path);
bool template_boot_args_valid(const char *args);

/* pull.c (PullTemplate) */
int pull_engine_new(Manager *m, PullEngine **ret);
/* Starts the thread: pulls found at start-up resume. Not for --destroy-all-sandboxes. */
int pull_engine_start(PullEngine *e);
/* Stops the transfers (their files and records stay, for the next start) and waits for
 * installs in flight. Before the templates are freed. */
void pull_engine_free(PullEngine *e);
Pull *pull_ref(Pull *p);
void pull_unref(Pull *p);
/* (L) DeleteTemplate of a PULLING template: its followers get ABORTED. */
void pull_abort_locked(Pull *p);
/* A <templates>/.pull-<id> directory: a pull that was PULLING or FAILED at the last stop. */
bool pull_dir_name(const char *name);
/* Loads it as a template (PULLING, its pull queued; or FAILED). */
int pull_load(Manager *m, const char *dir, Template **ret, char **ret_error);
void pull_write_metrics(PullEngine *e, FILE *f);
/* "id 40%, id2 12 MiB" into buf; returns the number of pulls in progress. */
int pull_status(PullEngine *e, char *buf, size_t size);

/* ---- snapshots ---- */

/* <state_dir>/snapshots/<id>/{rootfs.ext4,vmstate,mem,snapshot.json}: self-contained, shared
 * read-only by every sandbox created from it (one base loop device, one memory file in the
 * page cache). */
typedef struct Snapshot {
	char *id;
	char *source_sandbox_id;
	char *template_id;
	Template *tmpl; /* held: counts in tmpl->snapshot_count */
	unsigned vcpu_count;
	unsigned memory_mib;
	char *fc_version;
	struct timespec create_time;
	KvList labels;
	char *dir; /* the final directory */
	char *rootfs, *vmstate, *mem;
	uint64_t disk_used;  /* sampled when it is made or loaded */
	bool ready;          /* (L) false while CreateSnapshot makes it: invisible to Get/List */
	unsigned dependents; /* (L) sandboxes created from it, in any state */
	bool huge_pages;     /* its memory was in 2 MiB pages */
} Snapshot;

void snapshot_free(Snapshot *s);

/* ---- sandboxes ---- */

typedef enum SbOp {
	SB_OP_NONE,
	SB_OP_CREATE,
	SB_OP_DESTROY,
	SB_OP_REAP, /* its VMM (or memory server) died: release what it held, then FAILED */
	SB_OP_PAUSE,
	SB_OP_RESUME,
	SB_OP_SNAPSHOT, /* CreateSnapshot: the state does not change, no events */
	SB_OP_UPDATE,   /* UpdateSandbox, while it changes the slot's policy and the record */
} SbOp;

enum {
	OUT_PAUSE,
	OUT_RESUME,
	OUT_SNAPSHOT,
	_OUT_MAX
};
typedef struct OpOutcome {
	uint64_t ended;
	RpcCode code;
	char *error;
} OpOutcome;

/* The steps of the last create, pause or resume (Sandbox.last_operation). */
#define OP_MAX_STEPS 16
typedef struct OpTiming {
	char op[16]; /* "" until an operation finished */
	struct {
		char name[24];
		uint64_t us;
	} steps[OP_MAX_STEPS];
	size_t n_steps;
	uint64_t total_us;
	char failed[24];
	struct timespec end;
} OpTiming;

/* /metrics: how long an operation ("create", "pause", …) or one of its steps took, and how
 * operations ended. step "" is the whole operation; only it counts outcomes. */
typedef struct OpMetric {
	char op[16];
	char step[24];
	Histogram seconds;
	uint64_t outcomes[_RPC_CODE_MAX];
} OpMetric;

typedef struct Waiter Waiter;
struct Waiter {
	RpcCall *call;
	bool console; /* woken by the console's output too (ReadConsole's follow) */
	Waiter *next;
};

typedef struct WatchToken WatchToken;
typedef struct Sandbox Sandbox;
struct Sandbox {
	char id[64];
	SbSpec spec;
	char *template_id; /* the template it descends from */
	Template *tmpl;    /* (L) held: counts in tmpl->sandbox_count */
	Snapshot *snap;    /* created from this snapshot (held: counts in its dependents) */
	Snapshot *taking;  /* (L) the snapshot SB_OP_SNAPSHOT makes of it */

	char *state_reason; /* (L) */
	uint64_t revision;  /* (L) */
	struct timespec create_time, update_time;
	char *fc_version;

	/* Resources, owned by whichever operation runs (only one at a time). */
	NetnsSlot *slot;
	char *sandbox_ip; /* (L) */
	FcVm *vm;
	FcVm *uffd;        /* ember-uffd, while running from saved memory (after a resume) */
	char *device;      /* what the VMM's rootfs link points to */
	WatchToken *watch; /* (L) the VMM's pidfd is in the event loop */
	char *run_dir;     /* <run_dir>/sandboxes/<id> */
	char *data_dir;    /* <state_dir>/sandboxes/<id> */
	char *cow_path;
	OpTiming last_op; /* (L) */
	pid_t vmm_pid;
	pid_t uffd_pid;
	Ember__V1__SandboxState state; /* (L) */
	bool boot_restore;             /* created from its template's boot snapshot */
	bool boot_vm;                  /* a template's boot VM, in no registry */
	bool resume_loading; /* a resume has sent /snapshot/load: the guest may have run */
	bool slot_user;      /* (L) counted in Manager.n_slot_users */
	bool huge_held;      /* (L) counted in Manager.huge_mib */
	bool uffd_counted;   /* (L) its ember-uffd's live counters show in /metrics */

	/* Operation state (L). */
	SbOp op;             /* running (or queued) operation */
	bool abort;          /* DestroySandbox asked the running operation to give up */
	bool destroy_next;   /* run the destroy flow once the running operation ended */
	bool removed;        /* gone from the registry: waiters stop waiting */
	bool create_done;    /* the create finished: create_code says how */
	bool destroy_failed; /* the last destroy failed (state FAILED says why) */
	RpcCode create_code;
	unsigned refs; /* (L) registry + every thread holding a pointer */
	char *create_error;
	/* The outcome of the last pause, resume and snapshot, one slot each (OUT_*): an
	 * operation that ends bumps its slot's `ended` and leaves its code there, so that a
	 * waiter reads its own kind's outcome even if another kind ran since. */
	OpOutcome outcome[_OUT_MAX];
	Waiter *waiters;
	Sandbox *hnext;
	/* End time (expiry.c), all (L). */
	size_t expiry_index;   /* place in Manager.expiry; SIZE_MAX when not there */
	int64_t expiry_due_ms; /* when the timer looks at it next: the end time, or a retry */
	char *op_reason;       /* state_reason of the state the operation ends in (expiry) */
	/* Console (console.c), (L). */
	int console_wd;       /* its inotify watch while its VMM lives, else -1 */
	bool console_pending; /* in the event loop's batch of changed consoles */
};

/* ---- events ---- */

typedef struct Events Events;

int events_new(const char *state_dir, size_t capacity, Events **ret, char **ret_error);
void events_free(Events *e);
/* Records a change: `sandbox` (changed), or `removed_id` (removed). Returns its revision.
 * Called with Manager.lock held. The watchers are woken. */
uint64_t events_record(Events *e, const Ember__V1__Sandbox *sandbox, const char *removed_id);
uint64_t events_revision(Events *e);
/* Copies the packed events after `since` into *ret (caller frees each and the array): 1 when
 * they are all retained, 0 when the watcher must resync (too old, or newer than the node). */
typedef struct PackedEvent {
	uint64_t revision;
	uint8_t *data;
	size_t size;
} PackedEvent;
int events_since(Events *e, uint64_t since, size_t max, PackedEvent **ret, size_t *ret_n);
void packed_events_free(PackedEvent *ev, size_t n);
int events_watch_add(Events *e, RpcCall *call);
void events_watch_remove(Events *e, RpcCall *call);

/* ---- the manager ---- */

/* Not a reference: console_unwatch(), before the sandbox can go, removes it. */
typedef struct ConsoleWatch {
	int wd;
	Sandbox *sb;
} ConsoleWatch;

typedef struct Job Job;
struct Job {
	Sandbox *sb; /* holds a reference; NULL for a removal */
	SbOp op;
	char *path; /* a removal: the tree to remove (owned) */
	Job *next;
};

struct Manager {
	const Config *config;
	VmmInfo vmm;
	Storage *storage;
	NetnsPool *pool;
	NetnsConfig netcfg;
	char *netns_state;
	char *uplink; /* resolved, or NULL */
	Events *events;
	Systemd *systemd; /* NULL: no scopes (systemd.h) */
	char *templates_dir, *sandboxes_dir, *run_sandboxes_dir;

	pthread_mutex_t lock;
	/* registry (L) */
	Sandbox **buckets;
	size_t n_buckets;
	size_t n_sandboxes;
	unsigned n_slot_users; /* sandboxes holding a network slot or about to take one */
	/* memory of creates and resumes in flight (manager_promise_locked): admission counts it;
	 * and the huge pages of the huge-page sandboxes that hold a VMM or are about to */
	uint64_t creating_mib, huge_mib;
	Template **templates;
	size_t n_templates;
	PullEngine *pulls;
	Snapshot **snapshots; /* sorted by id */
	size_t n_snapshots;
	char *snapshots_dir;

	/* worker pool */
	pthread_cond_t jobs_cond;
	Job *jobs_head, *jobs_tail;
	pthread_t *workers;
	size_t n_workers;
	bool stopping;
	bool teardown; /* manager_destroy_all(): the host side of the network goes at the end */

	/* VMM exit watch */
	int epoll_fd;
	int stop_fd;             /* eventfd */
	WatchToken *dead_tokens; /* (L) unwatched, freed by the loop thread */
	pthread_t loop_thread;
	bool loop_started;

	/* end times (expiry.c): a binary heap by Sandbox.expiry_due_ms (L), and the timerfd,
	 * in the event loop, armed for the earliest */
	Sandbox **expiry;
	size_t n_expiry, cap_expiry;
	int timer_fd;

	/* consoles (console.c): the inotify fd, in the event loop (EPOLLONESHOT, back in it at
	 * console_rearm_ms, loop thread only), and its watches sorted by descriptor (L) */
	int console_fd;
	uint64_t console_rearm_ms;
	ConsoleWatch *consoles;
	size_t n_consoles, cap_consoles;

	/* /metrics (L) */
	OpMetric *op_metrics;
	size_t n_op_metrics;
	FcUffdCounters uffd_done; /* the counters of ember-uffds that ended */
};

/* sandbox.c */
/* The metric of an operation's step ("" the whole operation); NULL when out of memory. */
OpMetric *op_metric_locked(Manager *m, const char *op, const char *step);
/* Counts how an operation ended. */
void op_outcome_locked(Manager *m, const char *op, RpcCode code);
Sandbox *manager_find_locked(Manager *m, const char *id);
void manager_insert_locked(Manager *m, Sandbox *sb);
void manager_remove_locked(Manager *m, Sandbox *sb);
void sandbox_ref_locked(Sandbox *sb);
void sandbox_unref(Manager *m, Sandbox *sb);
void sandbox_unref_locked(Manager *m, Sandbox *sb);
Sandbox *sandbox_new(const char *id);
/* Changes state (and reason), records an event and wakes the waiters. (L) */
void sandbox_set_state_locked(Manager *m, Sandbox *sb, Ember__V1__SandboxState state,
			      const char *reason);
/* A call woken by every change of sb (sandbox_wake_locked): added, and removed before the
 * waiter's memory goes. (L) */
void sandbox_waiter_add_locked(Sandbox *sb, Waiter *w, RpcCall *call);
void sandbox_waiter_remove_locked(Sandbox *sb, Waiter *w);
void sandbox_wake_locked(Sandbox *sb);
void sandbox_wake_console_locked(Sandbox *sb); /* the waiters with `console` set */
void manager_submit_locked(Manager *m, Sandbox *sb, SbOp op);
/* Removes the tree at `path` (taking it) on a worker: files already renamed out of sight,
 * whose removal may take seconds (unlinking GiBs on a busy disk) and must not hold up a
 * reply. -ENOMEM leaves `path` to the caller. */
int manager_remove_later_locked(Manager *m, char *path);
/* A create or resume admitted (take) or ended: the memory it is about to take counts in
 * admission until then. A huge-page sandbox's counts from then on until its VMM is gone
 * (sandbox_huge_release_locked(), which release_processes calls). (L) */
void manager_promise_locked(Manager *m, Sandbox *sb, bool take);
void sandbox_huge_hold_locked(Manager *m, Sandbox *sb);
void sandbox_huge_release_locked(Manager *m, Sandbox *sb);
int manager_watch_vmm(Manager *m, Sandbox *sb);
void manager_unwatch_vmm(Manager *m, Sandbox *sb);

/* expiry.c: sandboxes' end times. Every change of a sandbox's end time, and its removal,
 * goes through expiry_update_locked() (removal: expiry_remove_locked()). */
int expiry_init(Manager *m);
void expiry_done(Manager *m);
void expiry_update_locked(Manager *m, Sandbox *sb);
void expiry_remove_locked(Manager *m, Sandbox *sb);
/* The timerfd fired: acts on every sandbox whose time came (loop thread). */
void expiry_fire(Manager *m);
bool sb_spec_has_end(const SbSpec *s);
bool sb_spec_ended(const SbSpec *s); /* it has an end time, and it passed */
/* "2026-12-06T21:00:00Z" */
void timespec_format(const struct timespec *ts, char *buf, size_t size);

/* console.c: each sandbox's serial console log, <run dir>/console.log */
#define CONSOLE_FILE "console.log"
/* ember-uffd's live counters, in the run dir (fcctl_uffd_counters_read) */
#define UFFD_STATS_FILE "uffd.stats"
int console_init(Manager *m);
void console_done(Manager *m);
/* Its VMM was started or adopted: its console's changes are watched (trim, followers). */
void console_watch(Manager *m, Sandbox *sb);
void console_unwatch(Manager *m, Sandbox *sb); /* its VMM is gone */
void console_events(Manager *m);               /* loop thread: the inotify fd is readable */
/* Loop thread: puts the inotify fd back in epoll when its time came; the milliseconds until
 * then, or -1 when nothing is pending. */
int console_rearm(Manager *m);
char *console_path(const Sandbox *sb);
char *console_tail(const Sandbox *sb); /* for a failed create's message */
/* The log file: punches out what is older than the last `keep` bytes once it holds more than
 * keep + keep/8 (1: trimmed, 0: nothing to do, -errno); where the kept bytes start; where
 * the last `lines` lines of [from, size) start; reads at *pos, dropping (and counting in
 * *ret_skipped) what is a hole: bytes read, 0 at the end, -EAGAIN when all of it was. */
int console_trim(int fd, uint64_t keep);
uint64_t console_kept_start(int fd, uint64_t size);
uint64_t console_tail_start(int fd, uint64_t from, uint64_t size, unsigned lines);
ssize_t console_read(int fd, uint64_t *pos, void *buf, size_t size, uint64_t *ret_skipped);

/* A message about one sandbox, "sandbox <id>…", with its SANDBOX_ID and TEMPLATE_ID fields, so
 * that `journalctl SANDBOX_ID=<id>` shows its whole life. fmt continues after the id. */
#define log_sandbox_errno(level, error, sb, fmt, ...)                                              \
	log_struct(level, error,                                                                   \
		   LOG_FIELDS({"SANDBOX_ID", (sb)->id}, {"TEMPLATE_ID", (sb)->template_id}),       \
		   "sandbox %s" fmt, (sb)->id, ##__VA_ARGS__)
#define log_sandbox(level, sb, fmt, ...) log_sandbox_errno(level, 0, sb, fmt, ##__VA_ARGS__)

/* A lifecycle event of a sandbox (messages.h names each kind), with SANDBOX_ID, TEMPLATE_ID,
 * OP, STEP (NULL: none) and DURATION_US (< 0: none) for the journal; CODE_LINE= is the
 * caller's. */
#define sandbox_log_event(sb, level, ...)                                                          \
	sandbox_log_event_at(__FILE__, __LINE__, __func__, sb, level, __VA_ARGS__)
void sandbox_log_event_at(const char *file, int line, const char *func, const Sandbox *sb,
			  int level, const char *message_id, const char *op, const char *step,
			  int64_t duration_us, const char *fmt, ...) _printf_(10, 11);
/* LOG_INFO where the log is the journal (indexed: an operator selects a sandbox's entries),
 * LOG_DEBUG on a terminal, for events too many to read there (every step of every create). */
int log_level_journal_info(void);

/* sandbox-ops.c */
/* Empties a sandbox's run directory, but for its console log when keep_console; without it
 * removes the directory. */
int run_dir_clear(const char *dir, bool keep_console);
void sandbox_op_create(Manager *m, Sandbox *sb);
void sandbox_op_destroy(Manager *m, Sandbox *sb);
void sandbox_op_reap(Manager *m, Sandbox *sb);
void sandbox_op_pause(Manager *m, Sandbox *sb);
void sandbox_op_resume(Manager *m, Sandbox *sb);
void sandbox_op_snapshot(Manager *m, Sandbox *sb);
/* Has the VMM, or its memory server, exited? Never blocks. */
bool vmm_or_uffd_exited(const Sandbox *sb);
/* Its disk, for the storage module: over the template's rootfs or a snapshot's image. */
StorageDiskSpec sandbox_disk_spec(const Sandbox *sb);
/* How long a memory dump or restore of this sandbox may take: 10 s and 50 ms per MiB, at
 * least [vmm] boot_timeout_s. */
int sandbox_mem_op_timeout_ms(const Manager *m, const Sandbox *sb);
/* <data_dir>/snapshot/<name>: the saved state of a paused sandbox. */
char *sandbox_saved_path(const Sandbox *sb, const char *name);
/* Releases every runtime resource (VMM, disk device, slot, run dir) the sandbox holds; keeps
 * its files. Used by destroy, by a failed create's unwind and when a VMM died. */
int sandbox_release_runtime(Manager *m, Sandbox *sb, char **ret_error);
/* Moves its VMM and ember-uffd into its systemd scope and registers it with machined (after a
 * spawn, and for an adopted sandbox); nothing without systemd or for a template's boot VM. */
int sandbox_scope_enter(Manager *m, Sandbox *sb, char **ret_error);
/* Writes the record of `sb`, with `state` and `reason` when state is not UNSPECIFIED (a
 * change about to be published: the record goes first), else as it is now. */
int sandbox_record_write(Manager *m, Sandbox *sb, Ember__V1__SandboxState state,
			 const char *reason);

/* template.c */
Template *manager_template_find_locked(Manager *m, const char *id);
int manager_templates_load(Manager *m);

/* record.c */
int record_write(const char *path, json_object *obj);
int record_read(const char *path, json_object **ret, char **ret_error);
/* Moves a record that cannot be used aside (<state_dir>/quarantine/) and logs it. */
void record_quarantine(const Config *c, const char *dir, const char *why);
json_object *kv_list_to_json(const KvList *l);
int kv_list_from_json(json_object *o, KvList *ret);
json_object *str_list_to_json(const StrList *l);
int str_list_from_json(json_object *o, StrList *ret);
json_object *sb_spec_to_json(const SbSpec *s);
int sb_spec_from_json(json_object *o, SbSpec *ret);
const char *json_get_string(json_object *o, const char *key);
uint64_t json_get_u64(json_object *o, const char *key);
json_object *timespec_to_json(const struct timespec *ts);
void timespec_from_json(json_object *o, struct timespec *ret);
json_object *op_timing_to_json(const OpTiming *t);
void op_timing_from_json(json_object *o, OpTiming *ret);

/* snapshot.c */
Snapshot *manager_snapshot_find_locked(Manager *m, const char *id);
int manager_snapshots_load(Manager *m);
/* The last step of CreateSnapshot: syncs the files made in tmp_dir, writes the record there
 * and renames tmp_dir to the snapshot's directory. */
int snapshot_commit(Snapshot *s, const char *tmp_dir, char **ret_error);
/* A snapshot that failed: out of the registry, its files gone, freed. (L) */
void snapshot_discard_locked(Manager *m, Snapshot *s);

/* recover.c */
int manager_recover(Manager *m, char **ret_error);

/* boot_vcpus/boot_mib: take a boot snapshot of that machine (0, 0: none). */
int manager_template_register(Manager *m, const char *id, const char *kernel, const char *rootfs,
			      const char *initrd, const char *boot_args, KvList *labels,
			      unsigned boot_vcpus, unsigned boot_mib, Template **ret_existing,
			      char **ret_error);
/* sandbox-ops.c: boots template t (its files where they are now) in a sandbox of its own, not
 * in the registry, and snapshots it into dir/{vmstate,mem,rootfs.ext4}. */
int template_boot_snapshot(Manager *m, Template *t, const char *dir, unsigned vcpus, unsigned mib,
			   char **ret_error);

/* Milliseconds of CLOCK_MONOTONIC. */
uint64_t now_ms(void);
/* Microseconds of CLOCK_MONOTONIC. */
uint64_t now_usec(void);
