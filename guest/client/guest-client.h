/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The host's side of the guest protocol (proto/ember/v1/guest.proto): talks to ember-guest in
 * a sandbox over Firecracker's hybrid vsock (or to any connected fd, e.g. ember-guest's unix
 * socket in tests).
 *
 * A GuestConn answers requests one at a time (ping, set clock, file transfers) or runs one
 * process: after guest_exec_start() the connection belongs to that process and ends with it.
 * Run many processes over many connections.
 *
 * Every call returns >= 0 or -errno. When a call fails, guest_conn_error() says why in words
 * (the guest's own message when the guest refused). Nothing here logs above debug level.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "common/macro.h"

#define GUEST_CLIENT_PORT 1024u

typedef struct GuestConn GuestConn;

/* Dials the guest through Firecracker's hybrid vsock socket (fcctl_vsock_dial()): -ECONNREFUSED
 * while nothing listens in the guest (the agent has not started yet), -ETIMEDOUT. */
int guest_conn_open_vsock(const char *uds_path, unsigned port, int timeout_ms, GuestConn **ret,
			  char **ret_error);
/* Connects to ember-guest's unix socket directly (tests, benchmarks). */
int guest_conn_open_unix(const char *path, GuestConn **ret, char **ret_error);
/* Takes over fd, a stream connected to ember-guest; closes it on failure too. */
int guest_conn_from_fd(int fd, GuestConn **ret);
void guest_conn_free(GuestConn *c);
DEFINE_POINTER_CLEANUP(GuestConn, guest_conn_free);

/* How long a blocking call waits for the guest at each step (default 30 s; -1: forever). A
 * transfer that makes progress never times out. */
void guest_conn_set_timeout(GuestConn *c, int timeout_ms);
/* Why the last call failed; "" when nothing failed yet. Valid until the next call. */
const char *guest_conn_error(const GuestConn *c);
/* Whether the last call failed because the guest answered with an error (no such program, bad
 * cwd, permission denied: the request's fault), rather than because the connection failed. */
bool guest_conn_refused(const GuestConn *c);

typedef struct GuestHello {
	unsigned protocol_version;
	const char *agent_version; /* valid as long as the connection */
} GuestHello;

/* Waits for the guest's Hello (it sends it unasked on every connection). */
int guest_hello(GuestConn *c, GuestHello *ret);
int guest_ping(GuestConn *c);
/* Sets the guest's CLOCK_REALTIME. *ret_applied is false under fcsim (its guest shares the
 * host's clock); *ret_previous_ns is the guest's clock just before. */
int guest_set_clock(GuestConn *c, int64_t realtime_ns, bool *ret_applied, int64_t *ret_previous_ns);

/* ---- exec ---- */

typedef struct GuestExecSpec {
	const char *const *argv; /* NULL-terminated; argv[0] is looked up in the child's PATH */
	/* NULL-terminated "KEY=VALUE" entries, or NULL. They extend and override the agent's
	 * own environment, or with env_replace are the whole environment. */
	const char *const *env;
	bool env_replace;
	const char *cwd; /* NULL: / */
	bool set_user;   /* else the agent's user (root) */
	uint32_t uid, gid;
	bool tty; /* on a pty of rows x cols (0: 24 x 80): stdout only, no stderr */
	unsigned rows, cols;
	bool stdin;          /* else the process's stdin is /dev/null */
	unsigned timeout_ms; /* 0: none; then the guest SIGKILLs the process's session */
} GuestExecSpec;

/* Starts the process; *ret_pid is its pid in the guest (also its process group). The guest's
 * refusal (no such program, bad cwd, ...) is an error here, with the guest's message. */
int guest_exec_start(GuestConn *c, const GuestExecSpec *spec, pid_t *ret_pid);

typedef enum GuestEventType {
	GUEST_EVENT_STDOUT,
	GUEST_EVENT_STDERR,
	GUEST_EVENT_EXIT,
	_GUEST_EVENT_MAX,
	_GUEST_EVENT_INVALID = -EINVAL,
} GuestEventType;

/* The most output one event carries: the frames the host takes from the guest are no larger. */
#define GUEST_EVENT_DATA_MAX (256u << 10)

typedef struct GuestEvent {
	GuestEventType type;
	const uint8_t *data; /* STDOUT, STDERR: valid until the next call on the connection */
	size_t size;
	int code;   /* EXIT: the exit status when signal == 0 */
	int signal; /* EXIT: the signal that ended the process, or 0 */
	bool timed_out, core_dumped;
} GuestEvent;

/* The next event, waiting up to timeout_ms (0: only what has arrived; -1: forever), sending
 * queued frames meanwhile. Returns 1 with *ret filled, 0 when none came in time. Output comes
 * in order per stream, and EXIT last, once all output has been delivered. */
int guest_exec_next_event(GuestConn *c, GuestEvent *ret, int timeout_ms);

/* Takes over the last STDOUT/STDERR event's data (ev.data): it then stays valid until the
 * caller free()s it, so output can be passed on without a copy. NULL for an empty chunk or
 * any other event. */
void *guest_exec_take_data(GuestConn *c);

/* Which event comes next, and how many bytes of output it carries, without taking it and
 * without waiting: 1 when one has arrived (the next guest_exec_next_event() returns it), 0
 * when none has. _GUEST_EVENT_INVALID: a frame that is no event (next_event says why). For
 * callers that gather consecutive output into larger pieces. */
int guest_exec_peek_event(GuestConn *c, GuestEventType *ret_type, size_t *ret_size);

/* Queues stdin for the process and sends what the socket takes. Returns how many bytes were
 * taken (> 0), or -EAGAIN while earlier stdin still waits for the guest, which reads it only
 * as fast as the process does: wait for guest_conn_poll_events() and try again. */
ssize_t guest_exec_write_stdin(GuestConn *c, const void *data, size_t size);
int guest_exec_close_stdin(GuestConn *c);
int guest_exec_resize(GuestConn *c, unsigned rows, unsigned cols);
/* Delivered to the process's process group. */
int guest_exec_signal(GuestConn *c, int sig);

/* For a caller's own poll loop: the fd, and POLLIN plus POLLOUT while frames wait to be sent;
 * call guest_conn_flush() when it is writable and guest_exec_next_event(…, 0) when readable. */
int guest_conn_fd(const GuestConn *c);
short guest_conn_poll_events(const GuestConn *c);
/* Sends queued frames without waiting: 0 when all went out, -EAGAIN when some are left,
 * -EPIPE once the guest stopped reading (the connection's reads go on: what the guest sent
 * before, such as a process's exit, can still be read). */
int guest_conn_flush(GuestConn *c);
/* Bytes queued for the guest and not sent yet. */
size_t guest_conn_pending_out(const GuestConn *c);

/* ---- files ---- */

typedef struct GuestFileAttrs {
	int mode; /* permission bits, applied exactly; < 0: 0644 */
	bool set_owner;
	uint32_t uid, gid; /* else root */
} GuestFileAttrs;

/* Copies fd (read to its end) to path in the guest: a temporary file in the same directory,
 * fsynced, renamed into place. attrs NULL: 0644, root. */
int guest_file_write(GuestConn *c, const char *path, const GuestFileAttrs *attrs, int fd,
		     uint64_t *ret_size);
/* The same in steps, for callers whose data arrives in pieces: begin, data any number of
 * times (blocking while the guest catches up), end, which commits the file and returns its
 * size. A refusal (no such directory, a directory at path, disk full) can come from data or
 * from end; freeing the connection before end leaves the old file as it was. */
int guest_file_write_begin(GuestConn *c, const char *path, const GuestFileAttrs *attrs);
int guest_file_write_data(GuestConn *c, const void *data, size_t size);
int guest_file_write_end(GuestConn *c, uint64_t *ret_size);

typedef struct GuestFileInfo {
	uint64_t size;
	uint32_t mode, uid, gid;
} GuestFileInfo;

/* Copies the guest's regular file path to fd. On a failure part of it may have been written. */
int guest_file_read(GuestConn *c, const char *path, int fd, GuestFileInfo *ret_info,
		    uint64_t *ret_size);
/* The same in steps: begin says the file's size, mode and owner; next gives chunk after
 * chunk (1, data valid until the next call on the connection), then 0 at the end. The guest
 * cannot send more than the size it declared (-EOVERFLOW), fewer is -ENODATA at the end, an
 * empty chunk -EPROTO. */
int guest_file_read_begin(GuestConn *c, const char *path, GuestFileInfo *ret_info);
int guest_file_read_next(GuestConn *c, const uint8_t **ret_data, size_t *ret_size);
