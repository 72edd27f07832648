/* SPDX-License-Identifier: Apache-2.0 */
/* ReadConsole: a sandbox's console log (console.c), from its tail or its start, and with
 * `follow` what the guest prints after it. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/macro.h"
#include "node-sandbox.h"

#define CONSOLE_CHUNK_MAX ((size_t)64 << 10)

RpcCode node_read_console(RpcCall *call, const ProtobufCMessage *request, Manager *m)
{
	const Ember__V1__ReadConsoleRequest *req = (const void *)request;
	Ember__V1__ReadConsoleResponse resp = EMBER__V1__READ_CONSOLE_RESPONSE__INIT;
	_cleanup_free_ char *path = NULL;
	_cleanup_free_ uint8_t *buf = NULL;
	_cleanup_close_ int fd = -EBADF;
	/* woken by its console's output, its state changes and its removal */
	Waiter w;
	/* without follow: up to where the log ended when the call began */
	uint64_t pos = 0, skipped = 0, end = UINT64_MAX;
	bool started = false;
	RpcCode code;

	if ((code = node_id_check(call, "sandbox_id", req->sandbox_id)) != RPC_OK)
		return code;
	if (!(buf = malloc(CONSOLE_CHUNK_MAX)))
		return rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
	pthread_mutex_lock(&m->lock);
	Sandbox *sb = manager_find_locked(m, req->sandbox_id);
	if (!sb) {
		pthread_mutex_unlock(&m->lock);
		return rpc_call_error(call, RPC_NOT_FOUND, "no sandbox %s", req->sandbox_id);
	}
	sandbox_ref_locked(sb);
	path = console_path(sb);
	if (req->follow) {
		sandbox_waiter_add_locked(sb, &w, call); /* removed below, before the return */
		w.console = true;
	}
	pthread_mutex_unlock(&m->lock);
	/* a follower must not hold emberd's shutdown for its grace period */
	if (req->follow)
		rpc_call_end_on_drain(call);
	if (!path) {
		code = rpc_call_error(call, RPC_RESOURCE_EXHAUSTED, "out of memory");
		goto out;
	}

	for (;;) {
		/* A sandbox being created may not have a console yet: looked for again at each
		 * wake-up. */
		if (fd < 0 && (fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)) < 0 &&
		    errno != ENOENT) {
			code = rpc_call_error(call, RPC_INTERNAL, "cannot open %s: %m", path);
			break;
		}
		if (fd >= 0 && !started) {
			struct stat st;
			if (fstat(fd, &st) < 0) {
				code = rpc_call_error(call, RPC_INTERNAL, "cannot stat %s: %m",
						      path);
				break;
			}
			uint64_t size = (uint64_t)st.st_size;
			pos = console_tail_start(fd, console_kept_start(fd, size), size,
						 req->tail_lines);
			if (!req->follow)
				end = size;
			started = true;
		}
		uint64_t gone = 0;
		/* (a skip over what a trim punched out may pass the end) */
		size_t want = pos >= end                      ? 0
			      : end - pos < CONSOLE_CHUNK_MAX ? (size_t)(end - pos)
							      : CONSOLE_CHUNK_MAX;
		ssize_t n = fd >= 0 && want > 0 ? console_read(fd, &pos, buf, want, &gone) : 0;
		skipped += gone;
		if (n == -EAGAIN)
			continue;
		if (n < 0) {
			code = rpc_call_error(call, RPC_INTERNAL, "cannot read %s: %s", path,
					      strerror((int)-n));
			break;
		}
		if (n > 0) {
			resp.data = (ProtobufCBinaryData){.len = (size_t)n, .data = buf};
			resp.offset = pos - (uint64_t)n;
			resp.skipped_bytes = skipped;
			if (rpc_call_send(call, &resp.base) < 0) {
				code = RPC_CANCELLED;
				break;
			}
			skipped = 0;
			continue;
		}
		if (!req->follow) {
			code = RPC_OK;
			break;
		}
		/* At the end: a destroyed sandbox's console is complete (read to its end through
		 * the fd, which outlives the file), a live one's is waited for. */
		pthread_mutex_lock(&m->lock);
		bool removed = sb->removed;
		pthread_mutex_unlock(&m->lock);
		if (removed) {
			code = RPC_OK;
			break;
		}
		int r = rpc_call_wait(call, -1);
		if (r == -ECANCELED) {
			code = RPC_CANCELLED;
			break;
		}
		if (r == -ESHUTDOWN) {
			code = rpc_call_error(call, RPC_UNAVAILABLE, "emberd is stopping");
			break;
		}
	}
out:
	pthread_mutex_lock(&m->lock);
	if (req->follow)
		sandbox_waiter_remove_locked(sb, &w);
	sandbox_unref_locked(m, sb);
	pthread_mutex_unlock(&m->lock);
	return code;
}
