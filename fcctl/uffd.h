/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The snapshot memory server (DESIGN.md §7): the logic of ember-uffd, one process per resumed
 * sandbox, serving a memory file to Firecracker through the userfaultfd it hands over.
 * Lower-module rules: -errno returns with messages for the caller, log_debug at most.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>

/* One guest memory region as Firecracker describes it in the handshake. */
typedef struct UffdRegion {
	uint64_t base_host_virt_addr;
	uint64_t size;
	uint64_t offset;    /* into the memory file */
	uint64_t page_size; /* bytes: 4096 or 2 MiB ("page_size_kib" carries the same, in bytes) */
} UffdRegion;

#define UFFD_MAX_REGIONS 64

typedef struct UffdHandshake {
	UffdRegion regions[UFFD_MAX_REGIONS];
	size_t n_regions;
	int uffd; /* received via SCM_RIGHTS */
} UffdHandshake;

/* Parses what one recvmsg() returned: the JSON array and the ancillary data. Refuses malformed
 * JSON, missing or wrong fields, overlapping or misaligned regions, no fd and more than one fd.
 * On any refusal it closes every fd it was given; on success ret->uffd owns the one fd.
 * Pure: no I/O, fuzzable. */
int uffd_handshake_parse(const char *data, size_t len, const int *fds, size_t n_fds,
			 UffdHandshake *ret, char **ret_error);

/* Receives the handshake on a connected socket: one recvmsg, as Firecracker sends one. */
int uffd_handshake_recv(int sock, UffdHandshake *ret, char **ret_error);

/* Counters kept current while serving, in a small file both ember-uffd and emberd map or
 * read (ember-uffd --stats-file): emberd's /metrics shows faults and bytes as they happen,
 * not only once an ember-uffd exits. Each field has one writer (relaxed atomic stores). */
#define UFFD_LIVE_MAGIC 0x46465545u /* "EUFF" */
typedef struct UffdLiveStats {
	uint32_t magic;
	uint32_t size;           /* sizeof(UffdLiveStats) of the writer */
	uint64_t faults;         /* page faults served */
	uint64_t fault_bytes;    /* bytes copied to serve them */
	uint64_t prefetch_bytes; /* bytes copied ahead of faults (--prefetch) */
	uint64_t replay_bytes;   /* bytes copied from the working set (added later: readers
				  * take it only when `size` covers it) */
} UffdLiveStats;

/* ember-uffd: creates `path` (0600, replacing one there) mapped shared into *ret. */
int uffd_live_stats_create(const char *path, UffdLiveStats **ret);
void uffd_live_stats_unmap(UffdLiveStats *live);
/* emberd reads the file with fcctl_uffd_counters_read() (fcctl.h). */

/* Fault-around: a fault on a 4 KiB page is served with the aligned block of this many pages
 * around it (those not served yet), in one copy. Sized by `make bench-uffd` (README.md,
 * "ember-uffd: where the time goes"). */
#define UFFD_FAULT_AROUND_DEFAULT 16
#define UFFD_FAULT_AROUND_MAX     512
/* Working set: how long a resume records first faults, and how many at most. */
#define UFFD_RECORD_MS_DEFAULT 5000
#define UFFD_RECORD_MAX_PAGES  (1u << 20)

typedef struct UffdOptions {
	bool prefetch;  /* copy every page right after the handshake, in a background thread */
	int timeout_ms; /* how long to wait for Firecracker to connect (-1: forever) */
	/* Who may connect (SO_PEERCRED), checked before anything is read from the peer: with
	 * check_peer_uid, only a process of peer_uid; with peer_id, only one started with
	 * `--id <peer_id>` (the VMM of that sandbox). A refused peer is disconnected and not
	 * served; it is not killed (it may be anyone). */
	bool check_peer_uid;
	uid_t peer_uid;
	const char *peer_id;
	UffdLiveStats *live; /* NULL, or where the counters are kept current */
	/* Pages served per fault (a power of two up to UFFD_FAULT_AROUND_MAX; 0 or 1: only the
	 * faulting page). 4 KiB regions only: a 2 MiB page is large enough on its own. */
	unsigned fault_around;
	/* The working set beside the memory file (NULL: none). When it holds a valid record for
	 * this memory file, its pages are copied first, in the order the guest first wanted them,
	 * before the prefetch sweep or on-demand faults. Otherwise this resume records it: the
	 * first faults of record_ms (0: UFFD_RECORD_MS_DEFAULT), at most UFFD_RECORD_MAX_PAGES,
	 * with the prefetch sweep held back and fault-around off meanwhile, so that the faults
	 * show exactly the pages the guest wants (a neighbour served around a fault would never
	 * fault, and never be recorded).
	 * Written atomically (temporary file and rename); failing to write it only loses it. */
	const char *working_set;
	int record_ms;
	/* With has_stop_fd: serving stops, with end_reason "stopped", when stop_fd becomes
	 * readable (ember-uffd: a signalfd for SIGTERM and SIGINT). */
	bool has_stop_fd;
	int stop_fd;
} UffdOptions;

typedef struct UffdStats {
	uint64_t faults;       /* page faults served */
	uint64_t pages_copied; /* by faults, fault-around, replay and prefetch */
	uint64_t bytes_copied;
	uint64_t around_pages;           /* copied around faults (fault-around) */
	uint64_t zero_pages;             /* served as zero after UFFD_EVENT_REMOVE */
	uint64_t removes;                /* UFFD_EVENT_REMOVE events */
	uint64_t eexist;                 /* pages already present (prefetch won) */
	uint64_t eagain;                 /* retries */
	uint64_t p50_ns, p99_ns, max_ns; /* fault service time, from a fixed-size histogram */
	uint64_t replay_pages;           /* copied from the working set */
	uint64_t replay_ns;              /* handshake to working set copied (0: no replay) */
	uint64_t prefetch_ns;            /* handshake to every page present (0: not reached) */
	uint64_t recorded;               /* working set entries written (0: none recorded) */
	pid_t peer;                      /* Firecracker's pid (SO_PEERCRED) */
	char end_reason[128];            /* "firecracker exited", "memory file truncated", … */
} UffdStats;

/* The working set file (little endian): a header naming the memory file it was recorded
 * from (size, inode, modification time: a replaced file makes it stale), then `count` page
 * numbers of the memory file (offset / page_size) in first-fault order. */
#define UFFD_WS_MAGIC   "EMBERWS1"
#define UFFD_WS_VERSION 1
typedef struct UffdWorkingSetHeader {
	char magic[8];
	uint32_t version;
	uint32_t page_size; /* 4096 or 2 MiB: the page numbers' unit */
	uint32_t count;
	uint32_t reserved; /* 0 */
	uint64_t mem_size, mem_ino, mem_mtime_ns;
} UffdWorkingSetHeader;

typedef struct UffdWorkingSet {
	UffdWorkingSetHeader h;
	uint32_t *pages;
} UffdWorkingSet;

/* Parses a working set file's content against the memory file it is for (its fstat). Refuses
 * (-EBADMSG, or -ESTALE for another memory file) anything not written by uffd_working_set_
 * write for that file: a short or long file, a page beyond the memory file. Pure: fuzzable. */
int uffd_working_set_parse(const void *data, size_t len, const struct stat *mem,
			   UffdWorkingSet *ret, char **ret_error);
int uffd_working_set_load(const char *path, const struct stat *mem, UffdWorkingSet *ret,
			  char **ret_error);
/* Writes path atomically (a temporary file beside it, fsync, rename), for the memory file
 * `mem` (its fstat): ws->h's identity fields are taken from it. */
int uffd_working_set_write(const char *path, const UffdWorkingSet *ws, const struct stat *mem,
			   char **ret_error);
void uffd_working_set_done(UffdWorkingSet *ws);

/* The whole server: listens on `socket_path` (refusing one that exists), accepts Firecracker
 * (checked as the options say), receives the handshake (its fd must be a userfaultfd), maps
 * `mem_path`, and serves faults until Firecracker goes away. When it cannot serve (file
 * missing, too short, unreadable, I/O error) it kills Firecracker (the pid from SO_PEERCRED)
 * — otherwise the guest would hang forever on the next fault — and returns an error saying
 * why. *ret_stats is filled on failure too (unlike other outputs): the statistics line at
 * exit is most useful when serving went wrong. */
int uffd_serve(const char *socket_path, const char *mem_path, const UffdOptions *opt,
	       UffdStats *ret_stats, char **ret_error);
