/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ember-guest internals. The listener forks one handler process per connection; a handler
 * answers requests until the host closes the connection, or runs one process (exec) and ends
 * with it. Handlers are single-threaded, so forking the process to exec is plain fork().
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "common/macro.h"
#include "guest/proto/frame.h"

#ifndef EMBER_VERSION
#define EMBER_VERSION "unknown"
#endif

/* How long a handler waits for a host that does not take a reply. A host that went away
 * closes the stream (an error at once); this only ends a host that hangs. */
#define AGENT_SEND_TIMEOUT_MS 120000

/* How long a handler waits, after its last frame, for the host to close the connection. */
#define LINGER_CLOSE_MS 5000

typedef struct Conn {
	int fd; /* non-blocking */
	GuestBuf in, out;
} Conn;

/* EMBER_SIM=1: the guest is fcsim's container, which shares the host's clock. */
extern bool agent_sim;

/* One line on stderr (ember-init passes it to the console): "ember-guest[pid]: ...". */
void agent_log(const char *format, ...) _printf_(1, 2);

int64_t agent_now_ms(void);

/* Serves one accepted connection to its end; returns the handler's exit status. */
int agent_serve(int fd);

int conn_send(Conn *c, const GuestFrame *f);
int conn_send_error(Conn *c, int errnum, const char *format, ...) _printf_(3, 4);

/* The request has been received; each returns < 0 only when the connection is unusable. */
int agent_exec(Conn *c, const Ember__Guest__V1__ExecStart *req);
int agent_file_write(Conn *c, const Ember__Guest__V1__FileWrite *req);
int agent_file_read(Conn *c, const Ember__Guest__V1__FileRead *req);
