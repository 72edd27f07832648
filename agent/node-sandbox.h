/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The Node service's template, sandbox and watch calls: protobuf in, the manager's calls, and
 * protobuf out. Messages are built with pointers into the manager's structures (under its
 * lock) and into an arena that the handler frees after sending.
 */
#pragma once

#include "manager-internal.h"

typedef struct Arena Arena;
Arena *arena_new(void);
void arena_free(Arena *a);
DEFINE_POINTER_CLEANUP(Arena, arena_free)
void *arena_alloc(Arena *a, size_t size); /* zeroed */
char *arena_strdup(Arena *a, const char *s);

Google__Protobuf__Timestamp *timestamp_to_pb(Arena *a, const struct timespec *ts);
/* Every map<string,string> entry type protobuf-c generates has this layout. */
typedef struct PbMapEntry {
	ProtobufCMessage base;
	char *key;
	char *value;
} PbMapEntry;
/* Fills a map field (`ret` is the field's `Xxx__Entry ***`) from l, entries of descriptor d. */
int kv_to_pb(Arena *a, const KvList *l, const ProtobufCMessageDescriptor *d, void *ret,
	     size_t *ret_n);
typedef enum KvKind {
	KV_LABELS, /* node.proto's label rules */
	KV_ENV,    /* environment names and values */
} KvKind;
/* Validates a map field (`entries` is the field's `Xxx__Entry **`) into a sorted list; on
 * failure the call's status is set and returned. `what` names the field. */
RpcCode kv_from_pb(RpcCall *call, const char *what, KvKind kind, const void *entries, size_t n,
		   KvList *ret);
/* (L) */
Ember__V1__Sandbox *sandbox_to_pb(Arena *a, Sandbox *sb);
/* (L) */
Ember__V1__Template *template_to_pb(Arena *a, Template *t);

/* Free space where a pause writes the saved state: enough for the memory file and a margin?
 * *ret_free_mib: what is free. */
bool sandbox_room_for_saved_state(const Sandbox *sb, uint64_t *ret_free_mib);

/* INVALID_ARGUMENT naming `field` unless id is a valid id. */
RpcCode node_id_check(RpcCall *call, const char *field, const char *id);

/* A call's session with a RUNNING sandbox's guest agent (node-exec.c; Exec, WriteFile,
 * ReadFile): the sandbox referenced and its state changes waking the call, the guest
 * connection open. */
typedef struct GuestConn GuestConn;
typedef struct GuestSession {
	Manager *m;
	RpcCall *call;
	Sandbox *sb;
	Waiter waiter;
	GuestConn *g;
	const char *what; /* "the process sh", "writing /etc/x": for messages */
	/* The guest accepted the request and a stream runs (Exec after its start): an Error
	 * from the guest is then a protocol break, not the request's fault. */
	bool streaming;
} GuestSession;
/* NOT_FOUND, FAILED_PRECONDITION (not RUNNING), UNAVAILABLE (no guest agent), or RPC_OK with
 * s->g connected (its Hello not yet read). Close it in any case. */
RpcCode guest_session_open(GuestSession *s, Manager *m, RpcCall *call, const char *sandbox_id,
			   const char *what);
void guest_session_close(GuestSession *s);
bool guest_session_running(GuestSession *s);
/* ABORTED: the sandbox left RUNNING during the call. */
RpcCode guest_session_aborted(GuestSession *s);
/* A guest call failed with r: RESOURCE_EXHAUSTED or INVALID_ARGUMENT for our own -ENOMEM and
 * -E2BIG; the guest's refusal of a request mapped to a code (NOT_FOUND for ENOENT,
 * PERMISSION_DENIED for EACCES, EPERM and EROFS, RESOURCE_EXHAUSTED for a full disk, else
 * FAILED_PRECONDITION); ABORTED when the sandbox stopped running; UNAVAILABLE when the guest
 * broke the protocol or the connection was lost (after a short wait for the sandbox's state,
 * which a VMM's exit reaches a moment after the connection broke). */
RpcCode guest_session_failed(GuestSession *s, int r);

RpcCode node_exec(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_write_file(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_read_file(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_read_console(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_register_template(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_get_template(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_list_templates(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_delete_template(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_pull_template(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_create_sandbox(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_get_sandbox(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_list_sandboxes(RpcCall *call, const ProtobufCMessage *request, Manager *m);
/* With the lock held and a reference on sb: waits until done(sb, arg). 0, or -ECANCELED (the
 * client went away) or -ESHUTDOWN (emberd drains). */
int sandbox_wait_locked(Manager *m, RpcCall *call, Sandbox *sb, bool (*done)(Sandbox *, uint64_t),
			uint64_t arg);
/* sandbox_wait_locked()'s condition for "no snapshot is being taken of it and no update runs"
 * (or it is gone). */
bool sandbox_not_snapshotting(Sandbox *sb, uint64_t unused);
RpcCode node_create_snapshot(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_get_snapshot(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_list_snapshots(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_delete_snapshot(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_pause_sandbox(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_resume_sandbox(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_destroy_sandbox(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_update_sandbox(RpcCall *call, const ProtobufCMessage *request, Manager *m);
RpcCode node_watch_sandboxes(RpcCall *call, const ProtobufCMessage *request, Manager *m);
