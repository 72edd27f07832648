/* SPDX-License-Identifier: Apache-2.0 */
/*
 * guest-tool: the guest client library from the command line, for tests, benchmarks and
 * operators.
 *
 *   guest-tool (--vsock UDS[:PORT] | --cid CID[:PORT] | --unix PATH) [--io-timeout-ms N]
 *              COMMAND ...
 *
 *   exec [--tty ROWSxCOLS] [--timeout-ms N] [--env K=V]... [--env-replace] [--cwd D]
 *        [--uid N --gid N] [--no-stdin] [--resize-after-ms T ROWSxCOLS]
 *        [--signal-after-ms T SIG] [--print-pid] -- ARGV...
 *       stdin from ours, stdout/stderr to ours; exits with the process's code, or 128+signal;
 *       says so on stderr when the timeout ended it. SIGINT, SIGTERM, SIGHUP, SIGQUIT are
 *       passed on to the process; with --tty a terminal on our stdin is put in raw mode and
 *       our terminal's size changes (SIGWINCH) resize the remote pty.
 *   put LOCAL REMOTE [--mode MODE] [--owner UID:GID]
 *   get REMOTE LOCAL
 *   ping [--wait-ms N]     (with --wait-ms: until the agent answers, for boot waits)
 *   hello                  the agent's version
 *   set-clock [NS]         the guest's realtime clock to NS (default: our clock)
 *   bench-true N           N sequential execs of `true`: p50/p99 round trip in µs
 *   bench-cat MIB          stdout throughput of `dd if=/dev/zero bs=1M count=MIB`, MiB/s
 *
 * Exit status: the process's for exec; 0 for success otherwise; 125 for our own failures,
 * 126/127 when the guest could not run the program (EACCES/ENOENT).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

#include "common/fileio.h"
#include "common/macro.h"
#include "guest/client/guest-client.h"

#define EXIT_TOOL 125

static const char *opt_vsock, *opt_unix, *opt_cid;
static int opt_io_timeout_ms = 30000;

static int64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

_printf_(1, 2) static int die(const char *format, ...)
{
	va_list ap;

	fputs("guest-tool: ", stderr);
	va_start(ap, format);
	vfprintf(stderr, format, ap);
	va_end(ap);
	fputc('\n', stderr);
	return EXIT_TOOL;
}

static int parse_uint(const char *s, unsigned long max, unsigned long *ret)
{
	char *end;

	if (!s)
		return -EINVAL;
	errno = 0;
	unsigned long v = strtoul(s, &end, 0);
	if (errno || end == s || *end || v > max)
		return -EINVAL;
	*ret = v;
	return 0;
}

static int parse_size(const char *s, unsigned *rows, unsigned *cols)
{
	char x;
	if (sscanf(s, "%u%c%u", rows, &x, cols) != 3 || x != 'x' || !*rows || !*cols)
		return -EINVAL;
	return 0;
}

/* A real AF_VSOCK connection, CID[:PORT]: what a host without Firecracker's hybrid socket
 * uses, and how the VM tests reach ember-guest through vsock_loopback (CID 1). */
static int open_cid(const char *spec, GuestConn **ret, char **ret_err)
{
	unsigned long cid, port = GUEST_CLIENT_PORT;
	_cleanup_free_ char *s = strdup(spec);
	char *colon;

	if (!s)
		return -ENOMEM;
	colon = strchr(s, ':');
	if (colon) {
		*colon = 0;
		if (parse_uint(colon + 1, UINT32_MAX, &port) < 0)
			return -EINVAL;
	}
	if (parse_uint(s, UINT32_MAX, &cid) < 0)
		return -EINVAL;
	struct sockaddr_vm sa = {
		.svm_family = AF_VSOCK, .svm_cid = (unsigned)cid, .svm_port = (unsigned)port};
	_cleanup_close_ int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int r = -errno;
		if (asprintf(ret_err, "vsock cid %lu port %lu: %s", cid, port, strerror(-r)) < 0)
			*ret_err = NULL;
		return r;
	}
	return guest_conn_from_fd(TAKE_FD(fd), ret); /* takes fd, even on failure */
}

/* --unix PATH, --vsock UDS[:PORT] (Firecracker's hybrid vsock) or --cid CID[:PORT]. */
static int open_conn(int timeout_ms, GuestConn **ret, char **ret_err)
{
	if (opt_unix)
		return guest_conn_open_unix(opt_unix, ret, ret_err);
	if (opt_cid)
		return open_cid(opt_cid, ret, ret_err);
	_cleanup_free_ char *uds = strdup(opt_vsock);
	unsigned long port = GUEST_CLIENT_PORT;
	if (!uds)
		return -ENOMEM;
	/* UDS[:PORT]: a port is digits after the last colon. */
	char *colon = strrchr(uds, ':');
	if (colon && parse_uint(colon + 1, UINT32_MAX, &port) == 0)
		*colon = 0;
	return guest_conn_open_vsock(uds, (unsigned)port, timeout_ms, ret, ret_err);
}

static int connect_guest(GuestConn **ret)
{
	_cleanup_free_ char *err = NULL;
	int r;

	r = open_conn(opt_io_timeout_ms, ret, &err);
	if (r < 0) {
		fprintf(stderr, "guest-tool: cannot connect: %s\n", err ?: strerror(-r));
		return r;
	}
	guest_conn_set_timeout(*ret, opt_io_timeout_ms);
	return 0;
}

/* ---- exec ---- */

typedef struct Timed {
	int64_t at_us; /* < 0: not armed */
	unsigned rows, cols;
	int sig;
} Timed;

static struct termios saved_tty;
static bool tty_raw;

static void restore_tty(void)
{
	if (tty_raw)
		(void)tcsetattr(STDIN_FILENO, TCSANOW, &saved_tty);
	tty_raw = false;
}

static int exit_status_for(int r)
{
	return r == -ENOENT ? 127 : r == -EACCES ? 126 : EXIT_TOOL;
}

static int cmd_exec(int argc, char **argv)
{
	static const struct option options[] = {
		{"tty", required_argument, NULL, 't'},
		{"timeout-ms", required_argument, NULL, 'T'},
		{"env", required_argument, NULL, 'e'},
		{"env-replace", no_argument, NULL, 'E'},
		{"cwd", required_argument, NULL, 'c'},
		{"uid", required_argument, NULL, 'u'},
		{"gid", required_argument, NULL, 'g'},
		{"no-stdin", no_argument, NULL, 'n'},
		{"resize-after-ms", required_argument, NULL, 'r'},
		{"signal-after-ms", required_argument, NULL, 's'},
		{"print-pid", no_argument, NULL, 'p'},
		{0},
	};
	GuestExecSpec spec = {.stdin = true};
	_cleanup_free_ const char **env = calloc((size_t)argc + 1, sizeof(char *));
	_cleanup_(guest_conn_freep) GuestConn *c = NULL;
	_cleanup_close_ int sfd = -EBADF;
	Timed resize = {.at_us = -1}, sig = {.at_us = -1};
	bool have_uid = false, have_gid = false, print_pid = false;
	size_t n_env = 0;
	unsigned long v;
	pid_t pid;
	int opt, r;

	if (!env)
		return die("out of memory");
	optind = 0;
	while ((opt = getopt_long(argc, argv, "+", options, NULL)) >= 0) {
		switch (opt) {
		case 't':
			if (parse_size(optarg, &spec.rows, &spec.cols) < 0)
				return die("--tty wants ROWSxCOLS, not %s", optarg);
			spec.tty = true;
			break;
		case 'T':
			if (parse_uint(optarg, UINT32_MAX, &v) < 0)
				return die("bad --timeout-ms %s", optarg);
			spec.timeout_ms = (unsigned)v;
			break;
		case 'e':
			env[n_env++] = optarg;
			break;
		case 'E':
			spec.env_replace = true;
			break;
		case 'c':
			spec.cwd = optarg;
			break;
		case 'u':
		case 'g':
			if (parse_uint(optarg, UINT32_MAX, &v) < 0)
				return die("bad --%s %s", opt == 'u' ? "uid" : "gid", optarg);
			if (opt == 'u') {
				spec.uid = (uint32_t)v;
				have_uid = true;
			} else {
				spec.gid = (uint32_t)v;
				have_gid = true;
			}
			break;
		case 'n':
			spec.stdin = false;
			break;
		case 'r':
		case 's': {
			Timed *t = opt == 'r' ? &resize : &sig;
			/* Two arguments: the delay, then the size or the signal. */
			if (parse_uint(optarg, INT32_MAX, &v) < 0 || optind >= argc)
				return die("--%s wants T and %s", options[opt == 'r' ? 8 : 9].name,
					   opt == 'r' ? "ROWSxCOLS" : "SIG");
			const char *what = argv[optind++];
			t->at_us = now_us() + (int64_t)v * 1000;
			if (opt == 'r' && parse_size(what, &t->rows, &t->cols) < 0)
				return die("bad size %s", what);
			if (opt == 's') {
				unsigned long s;
				if (parse_uint(what, 64, &s) < 0)
					return die("bad signal %s", what);
				t->sig = (int)s;
			}
			break;
		}
		case 'p':
			print_pid = true;
			break;
		default:
			return EXIT_TOOL;
		}
	}
	if (optind >= argc)
		return die("exec: no command");
	if (have_uid != have_gid)
		return die("--uid and --gid go together");
	spec.set_user = have_uid;
	spec.argv = (const char *const *)argv + optind;
	spec.env = n_env ? env : NULL;

	r = connect_guest(&c);
	if (r < 0)
		return EXIT_TOOL;
	r = guest_exec_start(c, &spec, &pid);
	if (r < 0) {
		fprintf(stderr, "guest-tool: %s\n", guest_conn_error(c));
		return exit_status_for(r);
	}
	if (print_pid)
		fprintf(stderr, "guest-tool: pid %d\n", (int)pid);

	/* Signals for the remote process arrive on a signalfd, in the same loop. */
	sigset_t fwd;
	sigemptyset(&fwd);
	sigaddset(&fwd, SIGINT);
	sigaddset(&fwd, SIGTERM);
	sigaddset(&fwd, SIGHUP);
	sigaddset(&fwd, SIGQUIT);
	/* A terminal of ours that changes size resizes the remote pty. */
	if (spec.tty && isatty(STDOUT_FILENO))
		sigaddset(&fwd, SIGWINCH);
	sigprocmask(SIG_BLOCK, &fwd, NULL);
	sfd = signalfd(-1, &fwd, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sfd < 0)
		return die("signalfd: %m");
	if (spec.tty && spec.stdin && isatty(STDIN_FILENO) &&
	    tcgetattr(STDIN_FILENO, &saved_tty) == 0) {
		struct termios raw = saved_tty;
		cfmakeraw(&raw);
		if (tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0) {
			tty_raw = true;
			atexit(restore_tty);
		}
	}

	uint8_t in[65536];
	size_t in_len = 0, in_off = 0;
	bool stdin_open = spec.stdin;
	for (;;) {
		GuestEvent ev;
		int64_t now = now_us();

		if (resize.at_us >= 0 && now >= resize.at_us) {
			resize.at_us = -1;
			if (guest_exec_resize(c, resize.rows, resize.cols) < 0)
				return die("%s", guest_conn_error(c));
		}
		if (sig.at_us >= 0 && now >= sig.at_us) {
			sig.at_us = -1;
			if (guest_exec_signal(c, sig.sig) < 0)
				return die("%s", guest_conn_error(c));
		}
		/* Our stdin goes on only as fast as the guest takes it. */
		while (in_off < in_len) {
			ssize_t n = guest_exec_write_stdin(c, in + in_off, in_len - in_off);
			if (n == -EAGAIN)
				break;
			if (n < 0)
				return die("%s", guest_conn_error(c));
			in_off += (size_t)n;
		}
		if (in_off == in_len)
			in_off = in_len = 0;

		while ((r = guest_exec_next_event(c, &ev, 0)) > 0) {
			if (ev.type == GUEST_EVENT_EXIT) {
				restore_tty();
				if (ev.timed_out)
					fprintf(stderr, "guest-tool: timed out after %u ms\n",
						spec.timeout_ms);
				return ev.signal ? 128 + ev.signal : ev.code;
			}
			int fd = ev.type == GUEST_EVENT_STDERR ? STDERR_FILENO : STDOUT_FILENO;
			r = write_full(fd, ev.data, ev.size);
			if (r < 0) {
				restore_tty();
				return die("cannot write output: %s", strerror(-r));
			}
		}
		if (r < 0) {
			restore_tty();
			return die("%s", guest_conn_error(c));
		}

		int64_t next = -1;
		if (resize.at_us >= 0)
			next = resize.at_us;
		if (sig.at_us >= 0 && (next < 0 || sig.at_us < next))
			next = sig.at_us;
		int timeout = next < 0 ? -1 : (int)((next - now_us()) / 1000 + 1);
		struct pollfd p[3] = {
			{.fd = guest_conn_fd(c), .events = guest_conn_poll_events(c)},
			{.fd = stdin_open && in_len == 0 ? STDIN_FILENO : -1, .events = POLLIN},
			{.fd = sfd, .events = POLLIN},
		};
		if (poll(p, ELEMENTSOF(p), timeout < 0 ? -1 : timeout) < 0) {
			if (errno == EINTR)
				continue;
			return die("poll: %m");
		}
		if (p[0].revents & POLLOUT) {
			r = guest_conn_flush(c);
			if (r < 0 && r != -EAGAIN) {
				restore_tty();
				return die("%s", guest_conn_error(c));
			}
		}
		if (p[1].revents) {
			ssize_t n = read(STDIN_FILENO, in, sizeof(in));
			if (n < 0 && errno != EINTR && errno != EAGAIN)
				n = 0;
			if (n == 0) {
				stdin_open = false;
				if (guest_exec_close_stdin(c) < 0)
					return die("%s", guest_conn_error(c));
			} else if (n > 0)
				in_len = (size_t)n;
		}
		if (p[2].revents) {
			struct signalfd_siginfo si;
			while (read(sfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
				struct winsize ws;
				if (si.ssi_signo == SIGWINCH) {
					if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 &&
					    guest_exec_resize(c, ws.ws_row, ws.ws_col) < 0)
						return die("%s", guest_conn_error(c));
				} else if (guest_exec_signal(c, (int)si.ssi_signo) < 0)
					return die("%s", guest_conn_error(c));
			}
		}
	}
}

/* ---- files ---- */

static int cmd_put(int argc, char **argv)
{
	static const struct option options[] = {
		{"mode", required_argument, NULL, 'm'},
		{"owner", required_argument, NULL, 'o'},
		{0},
	};
	GuestFileAttrs attrs = {.mode = -1};
	_cleanup_(guest_conn_freep) GuestConn *c = NULL;
	_cleanup_close_ int fd = -EBADF;
	unsigned long v;
	uint64_t size;
	int opt, r;

	optind = 0;
	while ((opt = getopt_long(argc, argv, "", options, NULL)) >= 0) {
		switch (opt) {
		case 'm':
			if (parse_uint(optarg, 07777, &v) < 0)
				return die("bad --mode %s", optarg);
			/* Octal whether or not it starts with 0, as chmod takes it. */
			attrs.mode = (int)strtoul(optarg, NULL, 8);
			break;
		case 'o':
			if (sscanf(optarg, "%" SCNu32 ":%" SCNu32, &attrs.uid, &attrs.gid) != 2)
				return die("--owner wants UID:GID, not %s", optarg);
			attrs.set_owner = true;
			break;
		default:
			return EXIT_TOOL;
		}
	}
	if (argc - optind != 2)
		return die("put LOCAL REMOTE [--mode MODE] [--owner UID:GID]");
	fd = open(argv[optind], O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return die("%s: %m", argv[optind]);
	if (connect_guest(&c) < 0)
		return EXIT_TOOL;
	r = guest_file_write(c, argv[optind + 1], &attrs, fd, &size);
	if (r < 0)
		return die("%s", guest_conn_error(c));
	return 0;
}

static int cmd_get(int argc, char **argv)
{
	_cleanup_(guest_conn_freep) GuestConn *c = NULL;
	_cleanup_close_ int fd = -EBADF;
	GuestFileInfo info;
	uint64_t size;
	int r;

	if (argc != 3)
		return die("get REMOTE LOCAL");
	if (connect_guest(&c) < 0)
		return EXIT_TOOL;
	fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return die("%s: %m", argv[2]);
	r = guest_file_read(c, argv[1], fd, &info, &size);
	if (r < 0) {
		(void)unlink(argv[2]);
		return die("%s", guest_conn_error(c));
	}
	if (size != info.size)
		fprintf(stderr, "guest-tool: %s changed while read: %" PRIu64 " of %" PRIu64 "\n",
			argv[1], size, info.size);
	return 0;
}

/* ---- small requests ---- */

static int cmd_ping(int argc, char **argv)
{
	unsigned long wait_ms = 0;
	int64_t t0 = now_us();

	if (argc == 3 && strcmp(argv[1], "--wait-ms") == 0) {
		if (parse_uint(argv[2], INT32_MAX, &wait_ms) < 0)
			return die("bad --wait-ms %s", argv[2]);
	} else if (argc != 1)
		return die("ping [--wait-ms N]");
	for (;;) {
		_cleanup_(guest_conn_freep) GuestConn *c = NULL;
		_cleanup_free_ char *err = NULL;
		int64_t start = now_us();
		int r;

		/* Quietly, while waiting: the agent may not be up yet. */
		r = open_conn(2000, &c, &err);
		if (r >= 0) {
			guest_conn_set_timeout(c, opt_io_timeout_ms);
			r = guest_ping(c);
			if (r >= 0) {
				printf("pong in %" PRId64 " us\n", now_us() - start);
				return 0;
			}
			free(err);
			err = strdup(guest_conn_error(c));
		}
		if (now_us() - t0 >= (int64_t)wait_ms * 1000)
			return die("ping: %s", err ?: strerror(-r));
		usleep(20 * 1000);
	}
}

static int cmd_hello(void)
{
	_cleanup_(guest_conn_freep) GuestConn *c = NULL;
	GuestHello h;

	if (connect_guest(&c) < 0)
		return EXIT_TOOL;
	if (guest_hello(c, &h) < 0)
		return die("%s", guest_conn_error(c));
	printf("ember-guest %s, protocol %u\n", h.agent_version, h.protocol_version);
	return 0;
}

static int cmd_set_clock(int argc, char **argv)
{
	_cleanup_(guest_conn_freep) GuestConn *c = NULL;
	struct timespec ts;
	int64_t ns, prev;
	bool applied;

	clock_gettime(CLOCK_REALTIME, &ts);
	ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
	if (argc == 2) {
		char *end;
		ns = strtoll(argv[1], &end, 10);
		if (*end || end == argv[1])
			return die("bad time %s", argv[1]);
	} else if (argc != 1)
		return die("set-clock [NS]");
	if (connect_guest(&c) < 0)
		return EXIT_TOOL;
	if (guest_set_clock(c, ns, &applied, &prev) < 0)
		return die("%s", guest_conn_error(c));
	printf("%s; guest clock was off by %+.6f s\n",
	       applied ? "set" : "not set (the guest shares the host's clock)",
	       (double)(prev - ns) / 1e9);
	return 0;
}

/* ---- benchmarks ---- */

/* Runs argv to its end, counting stdout bytes; -errno. */
static int run_counting(const char *const *argv, uint64_t *ret_bytes)
{
	_cleanup_(guest_conn_freep) GuestConn *c = NULL;
	GuestExecSpec spec = {.argv = argv};
	uint64_t bytes = 0;
	GuestEvent ev;
	int r;

	r = connect_guest(&c);
	if (r < 0)
		return r;
	r = guest_exec_start(c, &spec, NULL);
	while (r >= 0 && (r = guest_exec_next_event(c, &ev, -1)) > 0) {
		if (ev.type == GUEST_EVENT_STDOUT)
			bytes += ev.size;
		if (ev.type != GUEST_EVENT_EXIT)
			continue;
		if (ev.code || ev.signal) {
			(void)die("%s ended with code %d, signal %d", argv[0], ev.code, ev.signal);
			return -EIO;
		}
		*ret_bytes = bytes;
		return 0;
	}
	(void)die("%s", r < 0 ? guest_conn_error(c) : "no exit");
	return r < 0 ? r : -EIO;
}

static int cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

static int cmd_bench_true(int argc, char **argv)
{
	static const char *const argv_true[] = {"true", NULL};
	_cleanup_free_ int64_t *us = NULL;
	unsigned long n;
	uint64_t bytes;
	double sum = 0;

	if (argc != 2 || parse_uint(argv[1], 10000000, &n) < 0 || n == 0)
		return die("bench-true N");
	us = calloc(n, sizeof(int64_t));
	if (!us)
		return die("out of memory");
	for (unsigned long i = 0; i < n; i++) {
		int64_t t = now_us();
		if (run_counting(argv_true, &bytes) < 0)
			return EXIT_TOOL;
		us[i] = now_us() - t;
		sum += (double)us[i];
	}
	qsort(us, n, sizeof(int64_t), cmp_i64);
	printf("exec true: n=%lu p50=%" PRId64 " us p99=%" PRId64 " us mean=%.0f us\n", n,
	       us[n / 2], us[(n * 99) / 100 < n ? (n * 99) / 100 : n - 1], sum / (double)n);
	return 0;
}

static int cmd_bench_cat(int argc, char **argv)
{
	unsigned long mib;
	char count[32];
	uint64_t bytes;

	if (argc != 2 || parse_uint(argv[1], 1 << 20, &mib) < 0 || mib == 0)
		return die("bench-cat MIB");
	snprintf(count, sizeof(count), "count=%lu", mib);
	/* dd writes 1 MiB at a time: the figure is the channel's, not a small-buffered
	 * writer's (busybox head -c writes 4 KiB pieces). Its summary goes to stderr. */
	const char *const argv_dd[] = {"dd", "if=/dev/zero", "bs=1048576", count, NULL};
	int64_t t = now_us();
	if (run_counting(argv_dd, &bytes) < 0)
		return EXIT_TOOL;
	double s = (double)(now_us() - t) / 1e6;
	if (bytes != (uint64_t)mib << 20)
		return die("got %" PRIu64 " bytes of %lu", bytes, mib << 20);
	printf("stdout: %lu MiB in %.3f s = %.1f MiB/s\n", mib, s, (double)mib / s);
	return 0;
}

static void usage(FILE *f)
{
	fputs("usage: guest-tool (--vsock UDS[:PORT] | --cid CID[:PORT] | --unix PATH)\n"
	      "                  [--io-timeout-ms N] COMMAND\n"
	      "  exec [--tty RxC] [--timeout-ms N] [--env K=V] [--env-replace] [--cwd D]\n"
	      "       [--uid N --gid N] [--no-stdin] [--resize-after-ms T RxC]\n"
	      "       [--signal-after-ms T SIG] [--print-pid] -- ARGV...\n"
	      "  put LOCAL REMOTE [--mode MODE] [--owner UID:GID] | get REMOTE LOCAL\n"
	      "  ping [--wait-ms N] | hello | set-clock [NS] | bench-true N | bench-cat MIB\n",
	      f);
}

int main(int argc, char **argv)
{
	static const struct option options[] = {
		{"vsock", required_argument, NULL, 'v'},
		{"unix", required_argument, NULL, 'u'},
		{"cid", required_argument, NULL, 'c'},
		{"io-timeout-ms", required_argument, NULL, 't'},
		{"help", no_argument, NULL, 'h'},
		{0},
	};
	unsigned long v;
	int opt;

	while ((opt = getopt_long(argc, argv, "+h", options, NULL)) >= 0) {
		switch (opt) {
		case 'v':
			opt_vsock = optarg;
			break;
		case 'u':
			opt_unix = optarg;
			break;
		case 'c':
			opt_cid = optarg;
			break;
		case 't':
			if (parse_uint(optarg, INT32_MAX, &v) < 0)
				return die("bad --io-timeout-ms %s", optarg);
			opt_io_timeout_ms = (int)v;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return EXIT_TOOL;
		}
	}
	if (!!opt_vsock + !!opt_unix + !!opt_cid != 1 || optind >= argc) {
		usage(stderr);
		return EXIT_TOOL;
	}
	/* Output to a reader that went away is an error, not a silent death. */
	signal(SIGPIPE, SIG_IGN);

	const char *cmd = argv[optind];
	int sub_argc = argc - optind;
	char **sub_argv = argv + optind;
	if (strcmp(cmd, "exec") == 0)
		return cmd_exec(sub_argc, sub_argv);
	if (strcmp(cmd, "put") == 0)
		return cmd_put(sub_argc, sub_argv);
	if (strcmp(cmd, "get") == 0)
		return cmd_get(sub_argc, sub_argv);
	if (strcmp(cmd, "ping") == 0)
		return cmd_ping(sub_argc, sub_argv);
	if (strcmp(cmd, "hello") == 0)
		return cmd_hello();
	if (strcmp(cmd, "set-clock") == 0)
		return cmd_set_clock(sub_argc, sub_argv);
	if (strcmp(cmd, "bench-true") == 0)
		return cmd_bench_true(sub_argc, sub_argv);
	if (strcmp(cmd, "bench-cat") == 0)
		return cmd_bench_cat(sub_argc, sub_argv);
	usage(stderr);
	return EXIT_TOOL;
}
