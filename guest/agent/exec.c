/* SPDX-License-Identifier: Apache-2.0 */
/*
 * One process on one connection. The child gets its own session (so its process group and
 * session id are its pid), on pipes or on a pty. A poll loop moves bytes both ways with one
 * bounded buffer per direction, so a slow side slows the other down instead of filling memory:
 *   child stdout/stderr -> socket: a pipe is read only while the outgoing buffer is below
 *     OUT_LIMIT;
 *   socket -> child stdin: the socket is read only while no stdin bytes are waiting for the
 *     child (at most one frame of them).
 * ExecExit goes out after the child has been reaped and both output streams have ended.
 * The host going away kills the whole session.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "agent.h"
#include "common/fileio.h"

/* Encoded output frames waiting for the socket before the pipes are read again. */
#define OUT_LIMIT (512u << 10)
/* After the child has exited and its pipes are empty: how long to wait for the pipes' other
 * holders (background processes it left) to close them before reporting the exit anyway. */
#define OUTPUT_LINGER_MS 200
#define DEFAULT_PATH     "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

typedef struct Exec {
	Conn *c;
	pid_t pid;
	const char *name; /* argv[0], for logs */
	bool tty;
	int master;         /* pty master (resize, termios), or -1 */
	int stdin_fd;       /* -1 when closed or not wanted */
	int out_fd, err_fd; /* -1 once at EOF */
	int sig_fd;
	GuestBuf stdin_buf;
	bool stdin_eof; /* CloseStdin came: close once stdin_buf is written */
	bool exited, timed_out, host_gone;
	int status;
	int64_t start_ms, deadline_ms, linger_ms; /* -1: none */
	uint8_t *chunk;
} Exec;

static void exec_done(Exec *e)
{
	e->master = safe_close(e->master);
	e->stdin_fd = safe_close(e->stdin_fd);
	e->out_fd = safe_close(e->out_fd);
	e->err_fd = safe_close(e->err_fd);
	e->sig_fd = safe_close(e->sig_fd);
	guest_buf_free(&e->stdin_buf);
	free(e->chunk);
}

static void strv_free(char **v)
{
	for (char **p = v; p && *p; p++)
		free(*p);
	free(v);
}
DEFINE_POINTER_CLEANUP(char *, strv_free);

/* The child's environment: the agent's own (unless env_replace) with the request's entries
 * replacing or adding, and TERM=xterm on a pty when nobody set TERM. */
static int build_env(const Ember__Guest__V1__ExecStart *req, char ***ret)
{
	size_t n_base = 0, n = 0;
	bool has_term = false;

	if (!req->env_replace)
		for (char **p = environ; *p; p++)
			n_base++;
	_cleanup_(strv_freep) char **env = calloc(n_base + req->n_env + 3, sizeof(char *));
	if (!env)
		return -ENOMEM;
	for (size_t i = 0; i < n_base; i++)
		if (!(env[n++] = strdup(environ[i])))
			return -ENOMEM;
	for (size_t i = 0; i < req->n_env; i++) {
		const char *kv = req->env[i], *eq = strchr(kv, '=');
		size_t k = 0;
		if (!eq || eq == kv)
			return -EINVAL;
		while (k < n && !(strncmp(env[k], kv, (size_t)(eq - kv) + 1) == 0))
			k++;
		char *copy = strdup(kv);
		if (!copy)
			return -ENOMEM;
		if (k < n)
			free(env[k]);
		else
			n++;
		env[k] = copy;
	}
	for (size_t k = 0; k < n; k++)
		has_term = has_term || strncmp(env[k], "TERM=", 5) == 0;
	if (req->tty && !has_term && !(env[n++] = strdup("TERM=xterm")))
		return -ENOMEM;
	/* execvp() falls back to a PATH of its own without one; say which explicitly. */
	bool has_path = false;
	for (size_t k = 0; k < n; k++)
		has_path = has_path || strncmp(env[k], "PATH=", 5) == 0;
	if (!has_path && !(env[n++] = strdup(DEFAULT_PATH)))
		return -ENOMEM;
	*ret = TAKE_PTR(env);
	return 0;
}

static int set_nonblock(int fd)
{
	int flags = fcntl(fd, F_GETFL);
	if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
		return -errno;
	return 0;
}

/* The child's ends of its pipes or pty, and of the pipe it reports exec failures on: closed
 * here once it has them. */
typedef struct ChildFds {
	int in, out, err, slave, report_w;
} ChildFds;

static void child_fds_close(ChildFds *cf)
{
	cf->in = safe_close(cf->in);
	cf->out = safe_close(cf->out);
	cf->err = safe_close(cf->err);
	cf->slave = safe_close(cf->slave);
	cf->report_w = safe_close(cf->report_w);
}

/* What the child reports on its close-on-exec pipe when it cannot exec. */
typedef struct ChildError {
	int stage; /* index into child_stages */
	int err;
} ChildError;
static const char *const child_stages[] = {"setsid", "controlling tty", "setgroups", "setgid",
					   "setuid", "chdir",           "exec"};

_noreturn_ static void child_fail(int fd, int stage)
{
	ChildError ce = {.stage = stage, .err = errno};
	(void)!write(fd, &ce, sizeof(ce));
	_exit(127);
}

_noreturn_ static void child(const Ember__Guest__V1__ExecStart *req, char **argv, char **env,
			     const ChildFds *cf)
{
	int in = cf->in, out = cf->out, err = cf->err, report = cf->report_w;
	sigset_t all;

	/* Undo what the agent changed: SIGPIPE ignored, SIGCHLD blocked. Both survive exec. */
	for (int s = 1; s < NSIG; s++)
		(void)signal(s, SIG_DFL);
	sigfillset(&all);
	sigprocmask(SIG_UNBLOCK, &all, NULL);

	/* Its own session: one kill(-pid) reaches the process and everything it starts in
	 * its process group, and a pty can become its controlling terminal. */
	if (setsid() < 0)
		child_fail(report, 0);
	if (cf->slave >= 0) {
		if (ioctl(cf->slave, TIOCSCTTY, 0) < 0)
			child_fail(report, 1);
		in = out = err = cf->slave;
	}
	/* dup2() clears close-on-exec on 0-2; every other fd of ours has it set. */
	if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
		child_fail(report, 1);
	if (req->user) {
		gid_t gid = req->user->gid;
		if (setgroups(0, NULL) < 0)
			child_fail(report, 2);
		if (setgid(gid) < 0)
			child_fail(report, 3);
		if (setuid(req->user->uid) < 0)
			child_fail(report, 4);
	}
	if (chdir(req->cwd && req->cwd[0] ? req->cwd : "/") < 0)
		child_fail(report, 5);
	/* execvp() searches the PATH of `environ`, so the child's environment must be it. */
	environ = env;
	execvp(argv[0], argv);
	child_fail(report, 6);
}

static int64_t deadline_left(int64_t deadline, int64_t now)
{
	return deadline < 0 ? -1 : (deadline > now ? deadline - now : 0);
}

/* SIGKILL to the process group, and to whatever else is in the session (processes that made
 * a process group of their own, e.g. a shell's jobs). Processes that made a new session have
 * left on purpose and are not found. */
static void kill_session(pid_t sid)
{
	_cleanup_(closedirp) DIR *d = NULL;
	struct dirent *de;

	(void)kill(-sid, SIGKILL);
	d = opendir("/proc");
	if (!d)
		return;
	while ((de = readdir(d))) {
		char path[64], buf[512];
		char *end;
		long pid = strtol(de->d_name, &end, 10);
		if (*end || pid <= 0)
			continue;
		snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
		_cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		ssize_t n = read(fd, buf, sizeof(buf) - 1);
		if (n <= 0)
			continue;
		buf[n] = 0;
		/* "pid (comm) state ppid pgrp session ...": comm may contain anything but
		 * ends at the last ')'. */
		char *p = strrchr(buf, ')');
		int ppid, pgrp, session;
		char state;
		if (p && sscanf(p + 1, " %c %d %d %d", &state, &ppid, &pgrp, &session) == 4 &&
		    session == sid)
			(void)kill((pid_t)pid, SIGKILL);
	}
}

static int send_output(Exec *e, bool is_stderr, const uint8_t *data, size_t n)
{
	Ember__Guest__V1__Chunk chunk = EMBER__GUEST__V1__CHUNK__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;

	chunk.data.data = (uint8_t *)data;
	chunk.data.len = n;
	if (is_stderr) {
		f.kind_case = EMBER__GUEST__V1__FRAME__KIND_STDERR_CHUNK;
		f.stderr_chunk = &chunk;
	} else {
		f.kind_case = EMBER__GUEST__V1__FRAME__KIND_STDOUT_CHUNK;
		f.stdout_chunk = &chunk;
	}
	return guest_frame_append(&e->c->out, &f);
}

/* Output pipes of 1 MiB instead of 64 KiB: a process that writes fast fills more before it
 * blocks, and each read takes a whole chunk, so the host sees fewer, fuller frames. Best
 * effort: the default size works, only slower (pipe-max-size may be lower, or the user's pipe
 * quota spent). */
static void grow_pipe(int fd)
{
	(void)fcntl(fd, F_SETPIPE_SZ, 1 << 20);
}

/* Moves one read's worth from an output fd into the outgoing buffer. Returns 0, or -EAGAIN
 * when the fd had nothing; closes the fd at its end. */
static int pump_output(Exec *e, int *fd, bool is_stderr)
{
	ssize_t n = read(*fd, e->chunk, GUEST_CHUNK_MAX);

	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return -EAGAIN;
	/* A pty master reads EIO once no process has the slave open any more: its EOF. */
	if (n <= 0) {
		*fd = safe_close(*fd);
		return 0;
	}
	return send_output(e, is_stderr, e->chunk, (size_t)n);
}

static void close_stdin(Exec *e)
{
	if (e->stdin_fd < 0)
		return;
	if (e->tty) {
		/* A pty has no EOF of its own: the line discipline's EOF character (^D) at the
		 * start of a line is what a reader sees as one. */
		struct termios t;
		uint8_t eof = 4;
		if (tcgetattr(e->master, &t) == 0 && t.c_cc[VEOF])
			eof = t.c_cc[VEOF];
		(void)!write(e->stdin_fd, &eof, 1);
	}
	e->stdin_fd = safe_close(e->stdin_fd);
}

static void pump_stdin(Exec *e)
{
	GuestBuf *b = &e->stdin_buf;

	while (e->stdin_fd >= 0 && guest_buf_pending(b) > 0) {
		ssize_t n = write(e->stdin_fd, b->data + b->off, guest_buf_pending(b));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			return;
		if (n < 0) {
			/* EPIPE: the child closed its stdin; what the host sends is dropped. */
			e->stdin_fd = safe_close(e->stdin_fd);
			break;
		}
		b->off += (size_t)n;
	}
	b->off = b->len = 0;
	if (e->stdin_eof)
		close_stdin(e);
}

static void deliver_signal(Exec *e, int sig)
{
	if (sig <= 0 || sig >= NSIG) {
		agent_log("exec %d: ignoring bad signal %d", (int)e->pid, sig);
		return;
	}
	if (!e->exited && kill(-e->pid, sig) < 0 && errno != ESRCH)
		agent_log("exec %d: signal %d: %s", (int)e->pid, sig, strerror(errno));
}

/* A frame from the host during the exec. -EPROTO for one that has no place here. */
static int handle_frame(Exec *e, const GuestFrame *f)
{
	switch (f->kind_case) {
	case EMBER__GUEST__V1__FRAME__KIND_STDIN_CHUNK:
		if (e->stdin_fd >= 0 && !e->stdin_eof) {
			const ProtobufCBinaryData *d = &f->stdin_chunk->data;
			int r = guest_buf_reserve(&e->stdin_buf, d->len);
			if (r < 0)
				return r;
			memcpy(e->stdin_buf.data + e->stdin_buf.len, d->data, d->len);
			e->stdin_buf.len += d->len;
			pump_stdin(e);
		}
		return 0;
	case EMBER__GUEST__V1__FRAME__KIND_CLOSE_STDIN:
		e->stdin_eof = true;
		if (guest_buf_pending(&e->stdin_buf) == 0)
			close_stdin(e);
		return 0;
	case EMBER__GUEST__V1__FRAME__KIND_RESIZE:
		if (e->master >= 0) {
			struct winsize ws = {.ws_row = (unsigned short)f->resize->rows,
					     .ws_col = (unsigned short)f->resize->cols};
			/* The kernel sends SIGWINCH to the terminal's foreground group. */
			(void)ioctl(e->master, TIOCSWINSZ, &ws);
		}
		return 0;
	case EMBER__GUEST__V1__FRAME__KIND_SIGNAL:
		deliver_signal(e, f->signal->signal);
		return 0;
	default:
		return -EPROTO;
	}
}

static void reap(Exec *e)
{
	struct signalfd_siginfo si;
	int status;

	while (read(e->sig_fd, &si, sizeof(si)) > 0)
		;
	if (e->exited)
		return;
	pid_t p = waitpid(e->pid, &status, WNOHANG);
	if (p == e->pid) {
		e->exited = true;
		e->status = status;
	}
}

static int send_exit(Exec *e)
{
	Ember__Guest__V1__ExecExit x = EMBER__GUEST__V1__EXEC_EXIT__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
	char how[64];

	if (WIFSIGNALED(e->status)) {
		x.signal = WTERMSIG(e->status);
		x.core_dumped = WCOREDUMP(e->status);
		snprintf(how, sizeof(how), "killed by signal %d%s", x.signal,
			 e->timed_out ? " (timeout)" : "");
	} else {
		x.code = WEXITSTATUS(e->status);
		snprintf(how, sizeof(how), "exited with %d", x.code);
	}
	x.timed_out = e->timed_out;
	agent_log("exec %d (%s) %s after %lld ms", (int)e->pid, e->name, how,
		  (long long)(agent_now_ms() - e->start_ms));
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_EXEC_EXIT;
	f.exec_exit = &x;
	int r = guest_frame_append(&e->c->out, &f);
	if (r < 0)
		return r;
	return guest_buf_flush_wait(&e->c->out, e->c->fd, AGENT_SEND_TIMEOUT_MS);
}

/* Kills the session after the host went away (or broke the protocol) and waits for the
 * child, so that nothing it started outlives the connection. Once the child has been reaped
 * the exec is over (what it left in the background may stay, as after a normal exit), and its
 * pid may even name someone else's process group by now: nothing is killed then. */
static int abandon(Exec *e, const char *why)
{
	if (e->exited) {
		agent_log("exec %d (%s): %s after its exit", (int)e->pid, e->name, why);
		return -ECONNRESET;
	}
	kill_session(e->pid);
	while (waitpid(e->pid, &e->status, 0) < 0 && errno == EINTR)
		;
	e->exited = true;
	agent_log("exec %d (%s): %s; session killed", (int)e->pid, e->name, why);
	return -ECONNRESET;
}

static int loop(Exec *e)
{
	Conn *c = e->c;

	for (;;) {
		int64_t now = agent_now_ms();
		int r;

		/* Frames already here, while the child's stdin has room for them. */
		while (guest_buf_pending(&e->stdin_buf) == 0) {
			_cleanup_(guest_frame_freep) GuestFrame *f = NULL;
			r = guest_buf_next_frame(&c->in, &f);
			if (r == 0)
				break;
			if (r > 0)
				r = handle_frame(e, f);
			if (r < 0) {
				(void)conn_send_error(c, -r, "exec: unexpected %s frame",
						      f ? guest_frame_kind_name(f) : "malformed");
				return abandon(e, "protocol error");
			}
		}

		if (!e->exited && e->deadline_ms >= 0 && now >= e->deadline_ms) {
			kill_session(e->pid);
			e->timed_out = true;
			e->deadline_ms = -1;
		}
		/* After the exit, try the pipes even without poll() saying so: an empty pipe
		 * that is still open starts the linger time. */
		if (e->exited && guest_buf_pending(&c->out) < OUT_LIMIT) {
			int *fds[] = {&e->out_fd, &e->err_fd};
			for (size_t i = 0; i < ELEMENTSOF(fds); i++) {
				if (*fds[i] < 0)
					continue;
				r = pump_output(e, fds[i], i == 1);
				if (r == -EAGAIN) {
					if (e->linger_ms < 0)
						e->linger_ms = now + OUTPUT_LINGER_MS;
				} else if (r < 0)
					return r;
				else
					e->linger_ms = -1;
			}
			if (e->linger_ms >= 0 && now >= e->linger_ms) {
				e->out_fd = safe_close(e->out_fd);
				e->err_fd = safe_close(e->err_fd);
			}
		}
		if (e->exited && e->out_fd < 0 && e->err_fd < 0)
			return send_exit(e);

		bool out_room = guest_buf_pending(&c->out) < OUT_LIMIT;
		struct pollfd p[5] = {
			{.fd = c->fd, .events = POLLRDHUP},
			{.fd = out_room ? e->out_fd : -1, .events = POLLIN},
			{.fd = out_room ? e->err_fd : -1, .events = POLLIN},
			{.fd = guest_buf_pending(&e->stdin_buf) ? e->stdin_fd : -1,
			 .events = POLLOUT},
			{.fd = e->sig_fd, .events = POLLIN},
		};
		if (guest_buf_pending(&e->stdin_buf) == 0)
			p[0].events |= POLLIN;
		if (guest_buf_pending(&c->out) > 0)
			p[0].events |= POLLOUT;
		int64_t t1 = deadline_left(e->deadline_ms, now),
			t2 = deadline_left(e->linger_ms, now);
		int64_t timeout = t1 < 0 ? t2 : (t2 < 0 || t1 < t2 ? t1 : t2);
		if (poll(p, ELEMENTSOF(p), (int)timeout) < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}

		/* The host closing its end (EOF, RDHUP, HUP, ERR) means it is gone: a host
		 * never half-closes, it sends CloseStdin. */
		if (p[0].revents & (POLLRDHUP | POLLHUP | POLLERR))
			return abandon(e, "host went away");
		if (p[0].revents & POLLIN) {
			r = guest_buf_fill(&c->in, c->fd, GUEST_FRAME_MAX + GUEST_FRAME_HEADER);
			if (r == -ECONNRESET)
				return abandon(e, "host went away");
			if (r < 0 && r != -EAGAIN)
				return abandon(e, strerror(-r));
		}
		if (p[4].revents)
			reap(e);
		if (p[3].revents)
			pump_stdin(e);
		for (size_t i = 1; i <= 2; i++) {
			if (!p[i].revents)
				continue;
			r = pump_output(e, i == 1 ? &e->out_fd : &e->err_fd, i == 2);
			if (r < 0 && r != -EAGAIN)
				return r;
		}
		if (guest_buf_pending(&c->out) > 0) {
			r = guest_buf_flush(&c->out, c->fd);
			if (r < 0 && r != -EAGAIN)
				return abandon(e, "host went away");
		}
	}
}

int agent_exec(Conn *c, const Ember__Guest__V1__ExecStart *req)
{
	_cleanup_(exec_done) Exec e = {
		.c = c,
		.master = -EBADF,
		.stdin_fd = -EBADF,
		.out_fd = -EBADF,
		.err_fd = -EBADF,
		.sig_fd = -EBADF,
		.deadline_ms = -1,
		.linger_ms = -1,
	};
	_cleanup_(strv_freep) char **env = NULL;
	_cleanup_free_ char **argv = NULL;
	_cleanup_(child_fds_close) ChildFds cf = {
		.in = -EBADF,
		.out = -EBADF,
		.err = -EBADF,
		.slave = -EBADF,
		.report_w = -EBADF,
	};
	_cleanup_close_ int report_r = -EBADF;
	int fds[2], r;
	sigset_t chld;

	if (req->n_argv == 0 || !req->argv[0][0])
		return conn_send_error(c, EINVAL, "exec: empty argv");
	e.name = req->argv[0];
	/* protobuf-c's repeated strings have a count, exec wants a NULL at the end. */
	argv = calloc(req->n_argv + 1, sizeof(char *));
	if (!argv)
		return conn_send_error(c, ENOMEM, "exec: out of memory");
	memcpy(argv, req->argv, req->n_argv * sizeof(char *));
	e.tty = req->tty != NULL;
	r = build_env(req, &env);
	if (r < 0)
		return conn_send_error(c, -r, "exec: %s",
				       r == -EINVAL ? "environment entries must be KEY=VALUE"
						    : strerror(-r));
	e.chunk = malloc(GUEST_CHUNK_MAX);
	if (!e.chunk)
		return conn_send_error(c, ENOMEM, "exec: out of memory");

	/* SIGCHLD through a signalfd: the poll loop sees the child's end like any other
	 * event. Blocked here, unblocked again in the child. */
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	e.sig_fd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
	if (e.sig_fd < 0)
		return conn_send_error(c, errno, "exec: signalfd: %s", strerror(errno));

	if (e.tty) {
		struct winsize ws = {.ws_row = (unsigned short)(req->tty->rows ?: 24),
				     .ws_col = (unsigned short)(req->tty->cols ?: 80)};
		if (openpty(&e.master, &cf.slave, NULL, NULL, &ws) < 0)
			return conn_send_error(c, errno, "exec: cannot open a pty: %s",
					       strerror(errno));
		(void)fcntl(e.master, F_SETFD, FD_CLOEXEC);
		(void)fcntl(cf.slave, F_SETFD, FD_CLOEXEC);
		/* Separate fds for reading and writing, so that closing stdin (or reaching
		 * EOF on output) does not close the other direction or the master. */
		e.out_fd = fcntl(e.master, F_DUPFD_CLOEXEC, 3);
		if (req->stdin)
			e.stdin_fd = fcntl(e.master, F_DUPFD_CLOEXEC, 3);
		if (e.out_fd < 0 || (req->stdin && e.stdin_fd < 0) || set_nonblock(e.master) < 0)
			return conn_send_error(c, errno, "exec: pty: %s", strerror(errno));
	} else {
		if (req->stdin) {
			if (pipe2(fds, O_CLOEXEC) < 0)
				return conn_send_error(c, errno, "exec: pipe: %s", strerror(errno));
			cf.in = fds[0];
			e.stdin_fd = fds[1];
		} else {
			cf.in = open("/dev/null", O_RDONLY | O_CLOEXEC);
			if (cf.in < 0)
				return conn_send_error(c, errno, "exec: /dev/null: %s",
						       strerror(errno));
		}
		if (pipe2(fds, O_CLOEXEC) < 0)
			return conn_send_error(c, errno, "exec: pipe: %s", strerror(errno));
		e.out_fd = fds[0];
		cf.out = fds[1];
		grow_pipe(e.out_fd);
		if (pipe2(fds, O_CLOEXEC) < 0)
			return conn_send_error(c, errno, "exec: pipe: %s", strerror(errno));
		e.err_fd = fds[0];
		cf.err = fds[1];
		grow_pipe(e.err_fd);
	}
	if (pipe2(fds, O_CLOEXEC) < 0)
		return conn_send_error(c, errno, "exec: pipe: %s", strerror(errno));
	report_r = fds[0];
	cf.report_w = fds[1];

	e.start_ms = agent_now_ms();
	e.pid = fork();
	if (e.pid < 0)
		return conn_send_error(c, errno, "exec: fork: %s", strerror(errno));
	if (e.pid == 0)
		child(req, argv, env, &cf);

	child_fds_close(&cf);

	/* EOF: the exec happened (close-on-exec closed the pipe). */
	ChildError ce;
	ssize_t n;
	while ((n = read(report_r, &ce, sizeof(ce))) < 0 && errno == EINTR)
		;
	if (n == (ssize_t)sizeof(ce)) {
		while (waitpid(e.pid, NULL, 0) < 0 && errno == EINTR)
			;
		e.exited = true;
		const char *stage = ce.stage >= 0 && (size_t)ce.stage < ELEMENTSOF(child_stages)
					    ? child_stages[ce.stage]
					    : "start";
		agent_log("exec %s: %s: %s", req->argv[0], stage, strerror(ce.err));
		return conn_send_error(c, ce.err, "exec %s: %s: %s", req->argv[0], stage,
				       strerror(ce.err));
	}

	if ((e.stdin_fd >= 0 && set_nonblock(e.stdin_fd) < 0) ||
	    (e.out_fd >= 0 && set_nonblock(e.out_fd) < 0) ||
	    (e.err_fd >= 0 && set_nonblock(e.err_fd) < 0)) {
		(void)conn_send_error(c, errno, "exec: %s", strerror(errno));
		return abandon(&e, "setup failed");
	}
	if (req->timeout_ms > 0)
		e.deadline_ms = e.start_ms + req->timeout_ms;

	Ember__Guest__V1__ExecStarted started = EMBER__GUEST__V1__EXEC_STARTED__INIT;
	GuestFrame f = EMBER__GUEST__V1__FRAME__INIT;
	started.pid = e.pid;
	f.kind_case = EMBER__GUEST__V1__FRAME__KIND_EXEC_STARTED;
	f.exec_started = &started;
	r = guest_frame_append(&c->out, &f);
	if (r < 0)
		return abandon(&e, "out of memory");
	r = loop(&e);
	if (!e.exited) {
		/* The loop failed on our side: leave nothing behind either way. */
		(void)abandon(&e, strerror(-r));
	}
	return r;
}
