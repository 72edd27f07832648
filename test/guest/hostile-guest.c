/* SPDX-License-Identifier: Apache-2.0 */
/*
 * hostile-guest: a guest agent that misbehaves on request, for testing that emberd survives a
 * compromised guest (test_exec.py). Installed as a template's /usr/bin/ember-guest: it answers
 * the Hello and Ping that a create waits for like ember-guest, then does what the request asks:
 *
 *   Exec argv[0]          what it sends after ExecStarted
 *     huge-frame          a frame header announcing 1 MiB, then 1 MiB of bytes
 *     hellos              Hello frames, without end
 *     garbage             frames whose bodies are no protobuf, without end
 *     unknown-fields      a 200 KiB frame of two-byte unknown fields
 *     flood               128 KiB stdout chunks, without end (never exits)
 *     error               an Error frame (ENOENT) in the middle of the process's stream
 *     burst-close         128 KiB stdout chunks until emberd stops reading, then it hangs up
 *                         (a closed connection with output still buffered in emberd)
 *     (anything else)     "ok\n" on stdout, then exit 0
 *   FileRead path
 *     /more               declares 10 bytes, sends 100
 *     /fewer              declares 100 bytes, sends 10
 *     /empty              declares 10 bytes, then sends empty chunks without end
 *
 * Listens like ember-guest: /run/vsock/1024.sock under fcsim (EMBER_SIM=1), else vsock port
 * 1024. One child process per connection.
 */
#include <errno.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "guest/proto/frame.h"

#define TIMEOUT_MS 10000

static int send_frame(int fd, GuestBuf *out, GuestFrame *f)
{
	return guest_frame_send(fd, out, f, TIMEOUT_MS);
}

static int write_all(int fd, const void *data, size_t size)
{
	const char *p = data;
	while (size > 0) {
		ssize_t n = write(fd, p, size);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN) {
			struct pollfd pfd = {.fd = fd, .events = POLLOUT};
			if (poll(&pfd, 1, TIMEOUT_MS) <= 0)
				return -1;
			continue;
		}
		if (n <= 0)
			return -1;
		p += n;
		size -= (size_t)n;
	}
	return 0;
}

static void exec_started(int fd, GuestBuf *out)
{
	Ember__Guest__V1__ExecStarted st = EMBER__GUEST__V1__EXEC_STARTED__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
	st.pid = (uint32_t)getpid();
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_EXEC_STARTED;
	f.exec_started = &st;
	(void)send_frame(fd, out, &f);
}

static void stdout_chunk(int fd, GuestBuf *out, const void *data, size_t size)
{
	Ember__Guest__V1__Chunk c = EMBER__GUEST__V1__CHUNK__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
	c.data.data = (uint8_t *)data;
	c.data.len = size;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_STDOUT_CHUNK;
	f.stdout_chunk = &c;
	if (send_frame(fd, out, &f) < 0)
		_exit(0);
}

static void misbehave_exec(int fd, GuestBuf *in, GuestBuf *out, const char *mode)
{
	exec_started(fd, out);
	if (strcmp(mode, "huge-frame") == 0) {
		static uint8_t junk[1 << 20];
		uint8_t hdr[4] = {0, 0x10, 0, 0}; /* 1 MiB */
		(void)write_all(fd, hdr, sizeof(hdr));
		(void)write_all(fd, junk, sizeof(junk));
	} else if (strcmp(mode, "hellos") == 0) {
		for (;;)
			if (guest_send_hello(fd, out, "hostile", TIMEOUT_MS) < 0)
				break;
	} else if (strcmp(mode, "garbage") == 0) {
		/* frames of a plausible size whose bodies are no protobuf (a varint that never
		 * ends) */
		static uint8_t junk[4 + 16] = {0, 0, 0, 16};
		memset(junk + 4, 0xff, 16);
		for (;;)
			if (write_all(fd, junk, sizeof(junk)) < 0)
				break;
	} else if (strcmp(mode, "unknown-fields") == 0) {
		size_t n = 200u << 10;
		n -= n % 3;
		uint8_t *b = malloc(4 + n);
		if (!b)
			_exit(1);
		b[0] = (uint8_t)(n >> 24);
		b[1] = (uint8_t)(n >> 16);
		b[2] = (uint8_t)(n >> 8);
		b[3] = (uint8_t)n;
		for (size_t i = 0; i < n; i += 3) { /* field 1000, varint 0 */
			b[4 + i] = 0xc0;
			b[4 + i + 1] = 0x3e;
			b[4 + i + 2] = 0;
		}
		(void)write_all(fd, b, 4 + n);
		free(b);
	} else if (strcmp(mode, "error") == 0) {
		stdout_chunk(fd, out, "partial\n", 8);
		(void)guest_send_error(fd, out, ENOENT, "no such thing", TIMEOUT_MS);
	} else if (strcmp(mode, "burst-close") == 0) {
		static uint8_t data[GUEST_CHUNK_MAX];
		Ember__Guest__V1__Chunk c = EMBER__GUEST__V1__CHUNK__INIT;
		GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
		memset(data, 'b', sizeof(data));
		c.data.data = data;
		c.data.len = sizeof(data);
		f.kind_case = EMBER__GUEST__V1__FRAME__KIND_STDOUT_CHUNK;
		f.stdout_chunk = &c;
		/* until the socket stays full for 300 ms: emberd has stopped reading */
		for (int i = 0; i < 512; i++)
			if (guest_frame_send(fd, out, &f, 300) < 0)
				break;
		_exit(0);
	} else if (strcmp(mode, "flood") == 0) {
		static uint8_t data[GUEST_CHUNK_MAX];
		memset(data, 'f', sizeof(data));
		for (;;)
			stdout_chunk(fd, out, data, sizeof(data));
	} else {
		Ember__Guest__V1__ExecExit ex = EMBER__GUEST__V1__EXEC_EXIT__INIT;
		GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
		stdout_chunk(fd, out, "ok\n", 3);
		f.kind_case = EMBER__GUEST__V1__FRAME__KIND_EXEC_EXIT;
		f.exec_exit = &ex;
		(void)send_frame(fd, out, &f);
	}
	/* wait for the host to hang up */
	for (;;) {
		GuestFrame *f = NULL;
		if (guest_frame_recv(fd, in, -1, &f) < 0)
			break;
		guest_frame_free(f);
	}
}

static void misbehave_read(int fd, GuestBuf *out, const char *path)
{
	Ember__Guest__V1__FileInfo info = EMBER__GUEST__V1__FILE_INFO__INIT;
	Ember__Guest__V1__Chunk c = EMBER__GUEST__V1__CHUNK__INIT;
	Ember__Guest__V1__FileEnd end = EMBER__GUEST__V1__FILE_END__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
	static uint8_t data[100];
	bool more = strcmp(path, "/more") == 0;

	if (strcmp(path, "/empty") == 0) {
		info.size = 10;
		f.kind_case = EMBER__GUEST__V1__FRAME__KIND_FILE_INFO;
		f.file_info = &info;
		(void)send_frame(fd, out, &f);
		c.data.data = data;
		c.data.len = 0;
		f.kind_case = EMBER__GUEST__V1__FRAME__KIND_FILE_DATA;
		f.file_data = &c;
		while (send_frame(fd, out, &f) >= 0)
			;
		return;
	}

	info.size = more ? 10 : 100;
	info.mode = 0644;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_FILE_INFO;
	f.file_info = &info;
	(void)send_frame(fd, out, &f);
	c.data.data = data;
	c.data.len = more ? 100 : 10;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_FILE_DATA;
	f.file_data = &c;
	(void)send_frame(fd, out, &f);
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_FILE_END;
	f.file_end = &end;
	(void)send_frame(fd, out, &f);
}

static void serve(int fd)
{
	GuestBuf in = {0}, out = {0};

	if (guest_send_hello(fd, &out, "hostile-guest", TIMEOUT_MS) < 0)
		return;
	for (;;) {
		GuestFrame *f = NULL;
		if (guest_frame_recv(fd, &in, -1, &f) < 0)
			return;
		switch (f->kind_case) {
		case EMBER__GUEST__V1__FRAME__KIND_HELLO:
			break;
		case EMBER__GUEST__V1__FRAME__KIND_PING: {
			Ember__Guest__V1__Pong pong = EMBER__GUEST__V1__PONG__INIT;
			GuestFrame r = EMBER__GUEST__V1__FRAME__INIT;
			pong.token = f->ping->token;
			r.kind_case = EMBER__GUEST__V1__FRAME__KIND_PONG;
			r.pong = &pong;
			(void)send_frame(fd, &out, &r);
			break;
		}
		case EMBER__GUEST__V1__FRAME__KIND_EXEC_START:
			misbehave_exec(fd, &in, &out,
				       f->exec_start->n_argv ? f->exec_start->argv[0] : "");
			guest_frame_free(f);
			return;
		case EMBER__GUEST__V1__FRAME__KIND_FILE_READ:
			misbehave_read(fd, &out, f->file_read->path);
			break;
		default:
			(void)guest_send_error(fd, &out, ENOSYS, "hostile-guest does not do that",
					       TIMEOUT_MS);
			break;
		}
		guest_frame_free(f);
	}
}

int main(void)
{
	int fd;

	signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
	signal(SIGPIPE, SIG_IGN);
	if (getenv("EMBER_SIM")) {
		struct sockaddr_un sa = {.sun_family = AF_UNIX};
		strcpy(sa.sun_path, GUEST_SIM_SOCKET);
		(void)mkdir("/run/vsock", 0755);
		(void)unlink(GUEST_SIM_SOCKET);
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
			return 1;
	} else {
		struct sockaddr_vm sa = {.svm_family = AF_VSOCK,
					 .svm_cid = VMADDR_CID_ANY,
					 .svm_port = GUEST_VSOCK_PORT};
		fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
			return 1;
	}
	if (listen(fd, 64) < 0)
		return 1;
	fprintf(stderr, "hostile-guest: listening\n");
	for (;;) {
		int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK);
		if (c < 0)
			continue;
		if (fork() == 0) {
			close(fd);
			serve(c);
			_exit(0);
		}
		close(c);
	}
}
