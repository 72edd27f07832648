/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The VMM process: spawned with fork + exec (after entering the sandbox's network namespace
 * and working directory: setns cannot be done by posix_spawn), supervised through a pidfd,
 * stopped with SIGTERM then SIGKILL, adopted after an agent restart.
 *
 * The agent is multithreaded: between fork and exec the child only makes system calls on
 * things prepared before the fork (argv, paths, fds).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/error.h"
#include "common/fileio.h"
#include "common/log.h"
#include "common/macro.h"
#include "fcctl-internal.h"
#include "uffd.h"

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

/* The kernel's struct sigaction (rt_sigaction(2)) on Linux, which glibc's differs from. */
typedef struct KernelSigaction {
	__sighandler_t handler;
	unsigned long flags;
	void (*restorer)(void);
	uint64_t mask;
} KernelSigaction;

static int pidfd_open_(pid_t pid)
{
	return (int)syscall(SYS_pidfd_open, pid, 0);
}

static int pidfd_signal(int pidfd, int sig)
{
	return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Takes over pidfd on success only. */
static FcVm *vm_new(pid_t pid, int pidfd, bool child, const char *workdir, const char *api_sock)
{
	FcVm *vm = calloc(1, sizeof(*vm));
	if (!vm)
		return NULL;
	vm->pid = pid;
	vm->pidfd = -EBADF;
	vm->child = child;
	pthread_mutex_init(&vm->lock, NULL);
	/* api_init first: fcctl_vm_free() undoes it whatever failed after. */
	int r = api_init(vm);
	vm->workdir = strdup(workdir);
	vm->api_sock = strdup(api_sock);
	if (r < 0 || !vm->workdir || !vm->api_sock) {
		fcctl_vm_free(vm);
		return NULL;
	}
	vm->pidfd = pidfd;
	return vm;
}

void fcctl_vm_free(FcVm *vm)
{
	if (!vm)
		return;
	api_done(vm);
	safe_close(vm->pidfd);
	pthread_mutex_destroy(&vm->lock);
	free(vm->workdir);
	free(vm->api_sock);
	free(vm);
}

pid_t fcctl_vm_pid(const FcVm *vm)
{
	return vm->pid;
}

int fcctl_vm_pidfd(const FcVm *vm)
{
	return vm->pidfd;
}

const char *fcctl_vm_workdir(const FcVm *vm)
{
	return vm->workdir;
}

static bool answers(const char *sock)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	bool ok;

	if (fd < 0 || strlen(sock) >= sizeof(sa.sun_path)) {
		safe_close(fd);
		return false;
	}
	memcpy(sa.sun_path, sock, strlen(sock) + 1);
	ok = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
	close(fd);
	return ok;
}

/* Waits for the API socket to accept a connection: inotify on its directory wakes us when it
 * appears (no busy polling); the pidfd when the VMM dies first. The socket file exists a moment
 * before listen(): a refused connect is retried after the next event or 10 ms.
 * `probe` false: the socket's existence is enough (ember-uffd renames it into place once it
 * listens, and takes the first connection as Firecracker's: no test connection may be made). */
static int wait_for_socket(FcVm *vm, int timeout_ms, bool probe, const char *output_path,
			   char **ret_error)
{
	_cleanup_close_ int in = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
	_cleanup_free_ char *dir = strdup(vm->api_sock);
	int64_t deadline = now_ms() + timeout_ms;

	if (in < 0 || !dir)
		return -errno;
	*strrchr(dir, '/') = 0;
	if (inotify_add_watch(in, dir, IN_CREATE | IN_MOVED_TO) < 0)
		return error_set(ret_error, -errno, "cannot watch %s: %m", dir);
	for (;;) {
		if (probe ? answers(vm->api_sock) : access(vm->api_sock, F_OK) == 0)
			return 0;
		int64_t left = deadline - now_ms();
		if (left <= 0)
			return error_set(
				ret_error, -ETIMEDOUT, "%s did not open its socket %s within %d ms",
				probe ? "the VMM" : "the process", vm->api_sock, timeout_ms);
		struct pollfd p[2] = {{.fd = in, .events = POLLIN},
				      {.fd = vm->pidfd, .events = POLLIN}};
		bool exists = access(vm->api_sock, F_OK) == 0;
		int n = poll(p, 2, exists ? 10 : (int)(left < 1000 ? left : 1000));
		if (n < 0 && errno != EINTR)
			return -errno;
		if (p[1].revents & POLLIN) {
			FcExit ex = {};
			/* Readable: it has ended, the reap does not block. */
			(void)fcctl_vm_wait(vm, -1, &ex);
			return error_set(
				ret_error, -ECHILD,
				"%s exited before opening its %s (%s %d); see its output in %s",
				probe ? "the VMM" : "the process", probe ? "API socket" : "socket",
				ex.signal ? "signal" : "status", ex.signal ? ex.signal : ex.code,
				output_path);
		}
		if (p[0].revents & POLLIN) {
			char buf[4096];
			while (read(in, buf, sizeof(buf)) > 0)
				;
		}
	}
}

int fcctl_jail_root(const char *chroot_base, const char *binary, const char *id, char **ret)
{
	char real[PATH_MAX];
	const char *name;

	/* The jailer's own rules for an id: it would refuse anything else after we made its
	 * directory. */
	if (!*id || strlen(id) > 64 ||
	    strspn(id, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
		       "0123456789-") != strlen(id))
		return -EINVAL;
	if (binary[0] != '/' || (chroot_base && chroot_base[0] != '/'))
		return -EINVAL;
	/* The jailer names the chroot after the file --exec-file resolves to: a
	 * /usr/bin/firecracker that links to firecracker-v1.16.1-x86_64 is jailed under the
	 * latter's name. */
	if (!realpath(binary, real))
		return -errno;
	name = strrchr(real, '/') + 1;
	return asprintf(ret, "%s/%s/%s/root", chroot_base ?: FCCTL_JAILER_BASE, name, id) < 0
		       ? -ENOMEM
		       : 0;
}

/* Removes what the jailer made in a chroot it ran in before (dev/net/tun, dev/kvm, ...): it
 * refuses to start when those nodes exist, and an id's chroot is reused when its VMM is
 * started again (a restart, a restore). Files the caller linked in stay. */
static int jail_clean_dev(int root)
{
	_cleanup_close_ int dev =
		openat(root, "dev", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

	if (dev < 0)
		return errno == ENOENT ? 0 : -errno;
	int r = rm_rf_at(dev);
	if (r < 0)
		return r;
	return unlinkat(root, "dev", AT_REMOVEDIR) < 0 ? -errno : 0;
}

/* A unix socket address holds 108 bytes, the terminating NUL included. The VMM binds its socket
 * by a relative name and would start fine; it is we who could never connect to the full path,
 * and the spawn would only time out. */
static int check_socket_path(const char *what, const char *path, char **ret_error)
{
	const size_t max = sizeof(((struct sockaddr_un *)NULL)->sun_path) - 1;
	size_t len = strlen(path);

	if (len <= max)
		return 0;
	return error_set(ret_error, -ENAMETOOLONG,
			 "%s %s is %zu bytes long, %zu more than a unix socket address holds (%zu)",
			 what, path, len, len - max, max);
}

/* fork + exec of argv: the child enters the network namespace `ns` (when >= 0) and the
 * directory `wd`, takes /dev/null as stdin and `out` as stdout and stderr, starts its own
 * session, and gets an empty signal mask and the default disposition for every signal the
 * caller ignores. A failure before exec comes back as an error naming the step (netns and
 * workdir only name things in it), not as an exit status 127. The child is not reaped. */
static int fork_exec(const char *const *argv, int ns, int wd, int out, const char *netns,
		     const char *workdir, pid_t *ret_pid, char **ret_error)
{
	pid_t pid;
	int r;

	/* Only SIG_IGN survives exec (handlers are reset by it): the child puts every ignored
	 * signal back to the default, or a VMM started by emberd, which ignores SIGPIPE, would
	 * ignore it too. */
	const KernelSigaction dfl = {.handler = SIG_DFL};
	sigset_t none;
	sigemptyset(&none);

	/* The child reports a failed setns/chdir/exec through this pipe (closed on exec): the
	 * caller gets "cannot execute …: No such file or directory", not an exit status 127. */
	int report[2];
	if (pipe2(report, O_CLOEXEC) < 0)
		return error_set(ret_error, -errno, "pipe: %m");
	pid = fork();
	if (pid < 0) {
		r = -errno;
		close(report[0]);
		close(report[1]);
		return error_set(ret_error, r, "fork: %m");
	}
	if (pid == 0) {
		/* The child: async-signal-safe system calls only. */
		int stage = 0, e;
		close(report[0]);
		if (ns >= 0 && setns(ns, CLONE_NEWNET) < 0)
			goto child_fail;
		stage = 1;
		if (fchdir(wd) < 0)
			goto child_fail;
		stage = 2;
		int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
		if (null >= 0)
			dup2(null, STDIN_FILENO);
		dup2(out, STDOUT_FILENO);
		dup2(out, STDERR_FILENO);
		/* A VMM outlives the agent that started it (restarts adopt it): its own session,
		 * no signals from our terminal. */
		setsid();
		/* Read here rather than before the fork: what counts is what this process has,
		 * whatever another thread changed meanwhile. */
		for (int sig = 1; sig < NSIG; sig++) {
			/* The system call, not glibc's sigaction(), which refuses the two
			 * real-time signals glibc keeps for itself (32, 33): an ignored one would
			 * stay ignored in the VMM. */
			KernelSigaction old = {};
			if (syscall(SYS_rt_sigaction, sig, NULL, &old, sizeof(uint64_t)) == 0 &&
			    old.handler == SIG_IGN)
				(void)syscall(SYS_rt_sigaction, sig, &dfl, NULL, sizeof(uint64_t));
		}
		/* Last: no handler of the parent's may run in the child. */
		sigprocmask(SIG_SETMASK, &none, NULL);
		execve(argv[0], (char *const *)argv, environ);
	child_fail:
		e = errno;
		(void)!write(report[1], (int[]){stage, e}, 2 * sizeof(int));
		_exit(127);
	}
	close(report[1]);
	int failed[2];
	ssize_t got;
	do
		got = read(report[0], failed, sizeof(failed));
	while (got < 0 && errno == EINTR);
	close(report[0]);
	if (got == (ssize_t)sizeof(failed)) {
		(void)waitpid(pid, NULL, 0);
		static const char *const what[] = {"enter the network namespace",
						   "enter the working directory", "execute"};
		errno = failed[1];
		return error_set(ret_error, -failed[1], "cannot %s %s: %m", what[failed[0]],
				 failed[0] == 0   ? netns
				 : failed[0] == 1 ? workdir
						  : argv[0]);
	}
	*ret_pid = pid;
	return 0;
}

/* The child just forked (not yet reaped: its pid cannot be reused before the pidfd is taken)
 * becomes an FcVm once its socket is there. Without a pidfd it could be neither watched nor
 * stopped safely: killed then. */
static int adopt_child(pid_t pid, const char *root, const char *sock, int timeout_ms, bool probe,
		       const char *output_path, FcVm **ret, char **ret_error)
{
	int pidfd = pidfd_open_(pid), r;
	FcVm *vm;

	if (pidfd < 0) {
		r = error_set(ret_error, -errno, "pidfd_open: %m");
		kill(pid, SIGKILL);
		(void)waitpid(pid, NULL, 0);
		return r;
	}
	vm = vm_new(pid, pidfd, true, root, sock);
	if (!vm) {
		(void)pidfd_signal(pidfd, SIGKILL);
		(void)waitpid(pid, NULL, 0);
		close(pidfd);
		return -ENOMEM;
	}
	r = wait_for_socket(vm, timeout_ms > 0 ? timeout_ms : 10000, probe, output_path, ret_error);
	if (r < 0) {
		(void)fcctl_vm_stop(vm, 1000, NULL);
		fcctl_vm_free(vm);
		return r;
	}
	*ret = vm;
	return 0;
}

/* The file a spawned process writes its stdout and stderr to, in its working directory `wd`,
 * as an fd above stderr: an agent started with closed stdio gets fd 1 or 2 here, and dup2()
 * onto itself would keep close-on-exec set and the child's output would be lost. */
static int open_output(int wd, const char *name, const char *whose, char **ret_error)
{
	int out = openat(wd, name, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);

	if (out < 0)
		return error_set(ret_error, -errno, "cannot open %s output file: %m", whose);
	if (out <= STDERR_FILENO) {
		int moved = fcntl(out, F_DUPFD_CLOEXEC, STDERR_FILENO + 1);
		int e = errno;
		close(out);
		if (moved < 0)
			return error_set(ret_error, -e, "fcntl: %m");
		out = moved;
	}
	return out;
}

int fcctl_vm_spawn(const FcSpawn *s, FcVm **ret, char **ret_error)
{
	_cleanup_close_ int ns = -EBADF, out = -EBADF, wd = -EBADF, root = -EBADF;
	_cleanup_free_ char *chroot_dir = NULL;
	char api_sock[PATH_MAX], output_path[PATH_MAX];
	const char *argv[32];
	size_t n = 0;
	pid_t pid = -1;
	int r;

	if (!s->binary || !s->id || !s->workdir || s->workdir[0] != '/')
		return error_set(ret_error, -EINVAL,
				 "binary, id and an absolute workdir are required");
	if (s->jailer) {
		r = fcctl_jail_root(s->chroot_base, s->binary, s->id, &chroot_dir);
		if (r >= 0 && !chroot_dir)
			r = -ENOMEM;
		if (r < 0)
			return error_set(ret_error, r, "jailer chroot for %s: %s", s->id,
					 strerror(-r));
	}
	/* The VMM's root: where its API socket is and its relative paths resolve. Checked before
	 * anything is created or started. */
	const char *vmm_root = chroot_dir ?: s->workdir;
	if (snprintf(api_sock, sizeof(api_sock), "%s/%s", vmm_root, FCCTL_API_SOCK) >=
	    (int)sizeof(api_sock))
		return error_set(ret_error, -ENAMETOOLONG, "path too long: %s", vmm_root);
	r = check_socket_path(chroot_dir ? "the API socket path in the jailer's chroot"
					 : "the API socket path",
			      api_sock, ret_error);
	if (r < 0)
		return r;

	wd = open(s->workdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (wd < 0)
		return error_set(ret_error, -errno, "workdir %s: %m", s->workdir);
	if (s->netns && (ns = open(s->netns, O_RDONLY | O_CLOEXEC)) < 0)
		return error_set(ret_error, -errno, "network namespace %s: %m", s->netns);
	out = open_output(wd, s->output ?: "fc.out", "the VMM's", ret_error);
	if (out < 0)
		return out;
	snprintf(output_path, sizeof(output_path), "%s/%s", s->workdir, s->output ?: "fc.out");

	if (chroot_dir) {
		/* The jailer chroots the VMM: its API socket and every relative path of the API
		 * live in the chroot, which is made here (the jailer leaves an existing one as it
		 * is) so that the socket's directory can be watched, and so that the caller can
		 * link drives into it before configuring. */
		r = mkdir_p(chroot_dir, 0755);
		if (r < 0)
			return error_set(ret_error, r, "cannot make the jailer chroot %s: %s",
					 chroot_dir, strerror(-r));
		root = open(chroot_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (root < 0)
			return error_set(ret_error, -errno, "jailer chroot %s: %m", chroot_dir);
		r = jail_clean_dev(root);
		if (r < 0)
			return error_set(ret_error, r,
					 "cannot clear %s/dev from an earlier run: %s", chroot_dir,
					 strerror(-r));
	}
	/* Firecracker refuses an existing socket path: old ones are ours and stale. */
	(void)unlink(api_sock);
	for (size_t i = 0; s->stale && s->stale[i]; i++)
		(void)unlinkat(root >= 0 ? root : wd, s->stale[i], 0);

	char uid[16], gid[16];
	snprintf(uid, sizeof(uid), "%u", (unsigned)s->uid);
	snprintf(gid, sizeof(gid), "%u", (unsigned)s->gid);
	if (s->jailer) {
		argv[n++] = s->jailer;
		argv[n++] = "--id";
		argv[n++] = s->id;
		argv[n++] = "--exec-file";
		argv[n++] = s->binary;
		argv[n++] = "--uid";
		argv[n++] = uid;
		argv[n++] = "--gid";
		argv[n++] = gid;
		if (s->netns) {
			argv[n++] = "--netns";
			argv[n++] = s->netns;
		}
		if (s->chroot_base) {
			argv[n++] = "--chroot-base-dir";
			argv[n++] = s->chroot_base;
		}
		/* The jailer adds --id itself. */
		argv[n++] = "--";
		argv[n++] = "--api-sock";
		argv[n++] = "/" FCCTL_API_SOCK;
	} else {
		argv[n++] = s->binary;
		argv[n++] = "--api-sock";
		argv[n++] = FCCTL_API_SOCK;
		argv[n++] = "--id";
		argv[n++] = s->id;
	}
	if (s->log_path) {
		argv[n++] = "--log-path";
		argv[n++] = s->log_path;
	}
	argv[n] = NULL;

	r = fork_exec(argv, s->jailer ? -EBADF : ns, wd, out, s->netns, s->workdir, &pid,
		      ret_error);
	if (r < 0)
		return r;

	r = adopt_child(pid, vmm_root, api_sock, s->start_timeout_ms, true, output_path, ret,
			ret_error);
	if (r >= 0)
		log_debug("spawned %s (pid %d) in %s", s->binary, (int)pid, s->workdir);
	return r;
}

int fcctl_uffd_counters_read(const char *path, FcUffdCounters *ret)
{
	_cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	struct stat st;

	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0)
		return -errno;
	/* An ember-uffd older than this emberd (still serving after an upgrade) wrote a shorter
	 * structure: its fields are a prefix of this one's. */
	if ((size_t)st.st_size < offsetof(UffdLiveStats, replay_bytes))
		return -EBADMSG;
	/* Mapped, not read: ember-uffd stores each field atomically and so must we load it (a
	 * read() copies bytes in no promised order, and a torn counter looks like a reset). */
	const UffdLiveStats *l = mmap(NULL, sizeof(UffdLiveStats), PROT_READ, MAP_SHARED, fd, 0);
	if (l == MAP_FAILED)
		return -errno;
	int r = 0;
	if (__atomic_load_n(&l->magic, __ATOMIC_ACQUIRE) != UFFD_LIVE_MAGIC ||
	    l->size < offsetof(UffdLiveStats, replay_bytes) || l->size > (size_t)st.st_size)
		r = -EBADMSG;
	else
		*ret = (FcUffdCounters){
			.faults = __atomic_load_n(&l->faults, __ATOMIC_RELAXED),
			.fault_bytes = __atomic_load_n(&l->fault_bytes, __ATOMIC_RELAXED),
			.prefetch_bytes = __atomic_load_n(&l->prefetch_bytes, __ATOMIC_RELAXED),
			.replay_bytes =
				l->size >= sizeof(UffdLiveStats)
					? __atomic_load_n(&l->replay_bytes, __ATOMIC_RELAXED)
					: 0,
		};
	(void)munmap((void *)l, sizeof(UffdLiveStats));
	return r;
}

int fcctl_uffd_spawn(const FcUffdSpawn *s, FcVm **ret, char **ret_error)
{
	_cleanup_close_ int out = -EBADF, wd = -EBADF;
	char sock[PATH_MAX], output_path[PATH_MAX];
	const char *argv[16];
	size_t n = 0;
	pid_t pid = -1;
	int r;

	if (!s->binary || !s->id || !s->workdir || s->workdir[0] != '/' || !s->mem_path)
		return error_set(ret_error, -EINVAL,
				 "binary, id, mem_path and an absolute workdir are required");
	if (snprintf(sock, sizeof(sock), "%s/%s", s->workdir, s->socket ?: FCCTL_UFFD_SOCK) >=
	    (int)sizeof(sock))
		return error_set(ret_error, -ENAMETOOLONG, "path too long: %s", s->workdir);
	r = check_socket_path("the memory server's socket path", sock, ret_error);
	if (r < 0)
		return r;
	wd = open(s->workdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (wd < 0)
		return error_set(ret_error, -errno, "workdir %s: %m", s->workdir);
	out = open_output(wd, s->output ?: "uffd.out", "ember-uffd's", ret_error);
	if (out < 0)
		return out;
	snprintf(output_path, sizeof(output_path), "%s/%s", s->workdir, s->output ?: "uffd.out");
	/* ember-uffd refuses a socket path that exists: an old one is ours and stale. */
	(void)unlink(sock);

	char timeout[16];
	snprintf(timeout, sizeof(timeout), "%d",
		 s->handshake_timeout_ms > 0 ? s->handshake_timeout_ms : 30000);
	argv[n++] = s->binary;
	argv[n++] = s->socket ?: FCCTL_UFFD_SOCK;
	argv[n++] = s->mem_path;
	argv[n++] = "--id";
	argv[n++] = s->id;
	argv[n++] = "--timeout-ms";
	argv[n++] = timeout;
	if (s->prefetch)
		argv[n++] = "--prefetch";
	if (s->stats_file) {
		argv[n++] = "--stats-file";
		argv[n++] = s->stats_file;
	}
	if (s->working_set) {
		argv[n++] = "--working-set";
		argv[n++] = s->working_set;
	}
	argv[n] = NULL;

	r = fork_exec(argv, -EBADF, wd, out, NULL, s->workdir, &pid, ret_error);
	if (r < 0)
		return r;
	r = adopt_child(pid, s->workdir, sock, s->start_timeout_ms, false, output_path, ret,
			ret_error);
	if (r >= 0)
		log_debug("spawned %s (pid %d) for %s", s->binary, (int)pid, s->mem_path);
	return r;
}

int fcctl_vm_adopt(pid_t pid, const char *binary, const char *id, const char *workdir, FcVm **ret,
		   char **ret_error)
{
	char path[64], exe[PATH_MAX], want[PATH_MAX], api_sock[PATH_MAX];
	struct stat st_exe, st_want, st_cwd, st_dir;
	ssize_t n;
	FcVm *vm;
	int pidfd;

	/* The pidfd first: from here on the pid cannot be recycled under us. */
	pidfd = pidfd_open_(pid);
	if (pidfd < 0)
		return error_set(ret_error, -errno, "process %d: %m", (int)pid);
	/* Files compared by device and inode, not by the names /proc shows: a jailed VMM's names
	 * are those of its own mount namespace. */
	snprintf(path, sizeof(path), "/proc/%d/exe", (int)pid);
	n = readlink(path, exe, sizeof(exe) - 1);
	if (n < 0 || stat(path, &st_exe) < 0) {
		close(pidfd);
		return error_set(ret_error, -errno, "process %d: %m", (int)pid);
	}
	exe[n] = 0;
	if (!realpath(binary, want))
		snprintf(want, sizeof(want), "%s", binary);
	/* A package upgrade replaces the binary under a running VMM: the kernel then names its
	 * exe "<path> (deleted)". That process still is the VMM started from this path (the id
	 * and working directory checks below make sure); refusing it would fail every live
	 * sandbox at the first restart after an upgrade. */
	size_t wl = strlen(want);
	bool replaced = strncmp(exe, want, wl) == 0 && strcmp(exe + wl, " (deleted)") == 0;
	if (!replaced && (stat(want, &st_want) < 0 || st_exe.st_dev != st_want.st_dev ||
			  st_exe.st_ino != st_want.st_ino)) {
		close(pidfd);
		return error_set(ret_error, -ESRCH, "process %d runs %s, not %s", (int)pid, exe,
				 want);
	}
	if (!process_has_id(pid, id)) {
		close(pidfd);
		return error_set(ret_error, -ESRCH, "process %d was not started with --id %s",
				 (int)pid, id);
	}
	snprintf(path, sizeof(path), "/proc/%d/cwd", (int)pid);
	if (stat(path, &st_cwd) < 0 || stat(workdir, &st_dir) < 0 ||
	    st_cwd.st_dev != st_dir.st_dev || st_cwd.st_ino != st_dir.st_ino) {
		close(pidfd);
		return error_set(ret_error, -ESRCH, "process %d does not work in %s", (int)pid,
				 workdir);
	}
	snprintf(api_sock, sizeof(api_sock), "%s/%s", workdir, FCCTL_API_SOCK);
	int r = check_socket_path("the API socket path", api_sock, ret_error);
	if (r < 0) {
		close(pidfd);
		return r;
	}
	vm = vm_new(pid, pidfd, false, workdir, api_sock);
	if (!vm) {
		close(pidfd);
		return -ENOMEM;
	}
	*ret = vm;
	return 0;
}

/* Has the process behind a pidfd ended? Never blocks. */
static bool pidfd_ended(int pidfd)
{
	struct pollfd p = {.fd = pidfd, .events = POLLIN};
	return poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP));
}

/* Reaps the VMM if it has ended, without blocking; vm->reaped says whether it has. Called
 * with vm->lock held. */
static int reap_locked(FcVm *vm)
{
	siginfo_t si = {};

	if (vm->reaped)
		return 0;
	if (!vm->child) {
		/* Not ours to wait for: that it ended is all there is to know. */
		if (!pidfd_ended(vm->pidfd))
			return 0;
		vm->exit.known = false;
	} else if (waitid((idtype_t)P_PIDFD, (id_t)vm->pidfd, &si, WEXITED | WNOHANG) < 0) {
		/* Reaped behind our back (a waitpid(-1) elsewhere in the program): it ended, how
		 * is lost. */
		int e = errno;
		if (e != ECHILD || !pidfd_ended(vm->pidfd))
			return -e;
		vm->exit.known = false;
	} else if (si.si_pid == 0) {
		return 0; /* still running */
	} else {
		vm->exit.known = true;
		vm->exit.code = si.si_code == CLD_EXITED ? si.si_status : 0;
		vm->exit.signal = si.si_code == CLD_EXITED ? 0 : si.si_status;
	}
	vm->exit.exited = true;
	vm->reaped = true;
	log_debug("pid %d ended (%s %d)", (int)vm->pid, vm->exit.signal ? "signal" : "status",
		  vm->exit.signal ?: vm->exit.code);
	return 0;
}

int fcctl_vm_reap(FcVm *vm, FcExit *ret)
{
	FcExit ex;
	bool reaped;
	int r;

	pthread_mutex_lock(&vm->lock);
	r = reap_locked(vm);
	reaped = vm->reaped;
	ex = vm->exit;
	pthread_mutex_unlock(&vm->lock);
	if (r < 0)
		return r;
	if (!reaped)
		return -EAGAIN;
	if (ret)
		*ret = ex;
	return 0;
}

int fcctl_vm_wait(FcVm *vm, int timeout_ms, FcExit *ret)
{
	int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;

	for (;;) {
		int r = fcctl_vm_reap(vm, ret);
		if (r != -EAGAIN)
			return r;
		int64_t left = -1;
		if (deadline >= 0) {
			left = deadline - now_ms();
			if (left <= 0)
				return -ETIMEDOUT;
		}
		/* Without the lock: another thread may reap meanwhile, hence the re-check after
		 * waking (the pidfd stays readable once the process is gone). */
		struct pollfd p = {.fd = vm->pidfd, .events = POLLIN};
		if (poll(&p, 1, left > INT_MAX ? INT_MAX : (int)left) < 0 && errno != EINTR)
			return -errno;
	}
}

/* Sends sig unless the VMM has already been reaped: its exit is final by then, and a late
 * signal must not make it look stopped by us. */
static void signal_unless_reaped(FcVm *vm, int sig)
{
	pthread_mutex_lock(&vm->lock);
	/* Under the lock, so that whoever reaps records whether we sent it. */
	if (reap_locked(vm) >= 0 && !vm->reaped && pidfd_signal(vm->pidfd, sig) == 0)
		vm->exit.stopped_by_us = true;
	pthread_mutex_unlock(&vm->lock);
}

int fcctl_vm_stop(FcVm *vm, int timeout_ms, FcExit *ret)
{
	int r;

	signal_unless_reaped(vm, SIGTERM);
	r = fcctl_vm_wait(vm, timeout_ms, ret);
	if (r == -ETIMEDOUT) {
		log_debug("pid %d ignored SIGTERM for %d ms: SIGKILL", (int)vm->pid, timeout_ms);
		signal_unless_reaped(vm, SIGKILL);
		r = fcctl_vm_wait(vm, -1, ret);
	}
	return r;
}

int fcctl_vm_supervise(FcVm *vm, int helper_pidfd, int stop_timeout_ms, FcExit *ret)
{
	struct pollfd p[2] = {{.fd = vm->pidfd, .events = POLLIN},
			      {.fd = helper_pidfd, .events = POLLIN}};

	for (;;) {
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		/* Readable: it has ended, the reap does not block. */
		if (p[0].revents & POLLIN)
			return fcctl_vm_wait(vm, -1, ret);
		if (p[1].revents & POLLIN) {
			log_debug("the helper of pid %d exited: stopping the VMM", (int)vm->pid);
			(void)fcctl_vm_stop(vm, stop_timeout_ms, ret);
			return -EPIPE;
		}
	}
}
