/* SPDX-License-Identifier: Apache-2.0 */
/*
 * fcctl-tool: scenarios that drive a VMM (fcsim here, firecracker where it exists) through
 * fcctl, for test_fcctl.py. Each prints key=value lines and exits 0 on success.
 *
 * Common options: --binary PATH --workdir DIR [--netns PATH] --rootfs FILE --kernel FILE
 *                 [--mem MiB] [--uffd PATH-to-ember-uffd] [--prefetch] [--boot-args ARGS]
 *                 [--jailer PATH]
 *
 *   cycle      cold boot (the full configuration sequence), guest reachable over vsock, pause,
 *              snapshot, stop; restore in a new VMM with the Uffd backend served by ember-uffd
 *              (or File without --uffd), guest reachable again
 *   fault      a request Firecracker refuses: prints its fault_message
 *   killmid    a call in progress when the VMM is SIGKILLed: returns an error, does not hang
 *   uffdgone   after a restore, ember-uffd is killed: the supervisor stops the VMM
 *   truncated  restore from a truncated memory file: ember-uffd stops the VMM and says why
 *   adopt      an agent restart: the VMM taken over by pid, wrong id/dir/binary refused
 *   spawnfail  spawn failures say what failed
 *   jailer     the VMM started through --jailer: configured with paths inside its chroot,
 *              guest reachable over vsock, adopted by pid, stopped
 *   race       threads that wait, reap, stop and call the API on one VMM while it ends: all
 *              report the same exit, none fails
 *   reap       fcctl_vm_reap() from an event loop (epoll on the pidfd): -EAGAIN while it runs,
 *              then the exit, again and again, and wait/stop agree; an adopted VMM too
 *   longpath   an API socket path over the unix socket limit (workdir, jailer chroot) is
 *              refused before anything starts; one at the limit works
 *   bigbody    --binary test/fcctl/stub-vmm: answers that never end or are too long fail with
 *              -EMSGSIZE; a large one within the limit works
 *   signals    the tool ignores SIGPIPE, SIGHUP and SIGUSR2 and blocks SIGUSR1: the VMM (through
 *              a wrapper that records its /proc status) has none of that
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <net/if.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/macro.h"
#include "fcctl/fcctl.h"

static struct {
	const char *binary, *workdir, *netns, *rootfs, *kernel, *uffd, *boot_args, *jailer;
	unsigned mem;
	bool prefetch, net;
} o = {.mem = 64, .boot_args = "console=ttyS0 init=/sbin/init"};

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

#define CHECK(call, what)                                                                          \
	do {                                                                                       \
		char *fault_ = NULL;                                                               \
		int r_ = (call);                                                                   \
		if (r_ < 0) {                                                                      \
			fprintf(stderr, "fcctl-tool: %s: %s (%s)\n", what, fault_ ?: "",           \
				strerror(-r_));                                                    \
			exit(1);                                                                   \
		}                                                                                  \
	} while (0)

static char *dir(const char *name)
{
	char *d;
	if (asprintf(&d, "%s/%s", o.workdir, name) < 0)
		exit(1);
	mkdir(d, 0755);
	return d;
}

static FcVm *spawn(const char *workdir)
{
	static const char *const stale[] = {"v.sock", NULL};
	FcSpawn s = {.binary = o.binary,
		     .id = "fcctl-test",
		     .workdir = workdir,
		     .netns = o.netns,
		     .stale = stale};
	FcVm *vm = NULL;
	char *err = NULL;
	double t = now_ms();
	if (fcctl_vm_spawn(&s, &vm, &err) < 0) {
		fprintf(stderr, "fcctl-tool: spawn: %s\n", err ?: "?");
		exit(1);
	}
	printf("spawn_ms=%.1f pid=%d\n", now_ms() - t, (int)fcctl_vm_pid(vm));
	return vm;
}

/* The guest's helper echoes on vsock port 1024: retried until the guest is up. */
static void guest_echo_on(const char *prefix, const char *msg)
{
	char uds[4096], buf[256];
	snprintf(uds, sizeof(uds), "%s.sock", prefix);
	double start = now_ms();
	for (;;) {
		int fd = fcctl_vsock_dial(uds, 1024, 2000, NULL);
		if (fd >= 0) {
			size_t n = strlen(msg);
			if (write(fd, msg, n) == (ssize_t)n) {
				ssize_t got = 0, k;
				while (got < (ssize_t)n &&
				       (k = read(fd, buf + got, sizeof(buf) - 1 - (size_t)got)) > 0)
					got += k;
				buf[got] = 0;
				close(fd);
				if (strcmp(buf, msg) == 0) {
					printf("guest_echo=ok guest_ready_ms=%.1f\n",
					       now_ms() - start);
					return;
				}
			} else {
				close(fd);
			}
		}
		if (now_ms() - start > 30000) {
			fprintf(stderr, "fcctl-tool: the guest did not answer on vsock\n");
			exit(1);
		}
		usleep(20000);
	}
}

/* The drive's path is relative to the VMM's directory, as the agent's are (DESIGN.md §7). */
static void link_rootfs(const char *workdir)
{
	char link[4096];
	snprintf(link, sizeof(link), "%s/rootfs", workdir);
	unlink(link);
	if (symlink(o.rootfs, link) < 0)
		exit(1);
}

static void guest_echo(const char *workdir, const char *msg)
{
	char prefix[4096];
	snprintf(prefix, sizeof(prefix), "%s/v", workdir);
	guest_echo_on(prefix, msg);
}

/* key=<the VMM's state>, from GET / (Firecracker's "state": "Not started" has a space). */
static void print_state(FcVm *vm, const char *key)
{
	char *state = NULL, *version = NULL;
	CHECK(fcctl_describe(vm, &state, &version, &fault_), "describe");
	printf("%s=%s\n", key, state);
	free(state);
	free(version);
}

static FcVm *boot(const char *workdir)
{
	FcVm *vm = spawn(workdir);
	link_rootfs(workdir);
	double t = now_ms();
	CHECK(fcctl_put_machine_config(vm, 1, o.mem, false, false, FC_HUGE_PAGES_NONE, &fault_),
	      "machine-config");
	CHECK(fcctl_put_boot_source(vm, o.kernel, NULL, o.boot_args, &fault_), "boot-source");
	CHECK(fcctl_put_drive(vm, "rootfs", "rootfs", true, false, &fault_), "drive");
	CHECK(fcctl_put_vsock(vm, 3, "v.sock", &fault_), "vsock");
	if (o.net)
		CHECK(fcctl_put_network_interface(vm, "eth0", "tap0", "06:00:ac:10:00:02", &fault_),
		      "network-interfaces");
	CHECK(fcctl_instance_start(vm, &fault_), "InstanceStart");
	printf("configure_and_start_ms=%.1f\n", now_ms() - t);
	char *state = NULL, *version = NULL;
	CHECK(fcctl_describe(vm, &state, &version, &fault_), "describe");
	printf("state=%s vmm_version=%s\n", state, version);
	free(state);
	free(version);
	return vm;
}

static void snapshot(FcVm *vm)
{
	FcExit ex;
	double t = now_ms();
	CHECK(fcctl_vm_pause(vm, &fault_), "pause");
	CHECK(fcctl_snapshot_create(vm, "vmstate", "mem", false, &fault_), "snapshot");
	printf("snapshot_ms=%.1f\n", now_ms() - t);
	fcctl_vm_stop(vm, 5000, &ex);
	printf("stopped=%d signal=%d code=%d\n", ex.exited, ex.signal, ex.code);
}

/* ember-uffd on <workdir>/uffd.sock serving `mem`; returns its pid (and pidfd). */
static pid_t start_uffd(const char *workdir, const char *mem, int *ret_pidfd)
{
	char sock[4096];
	snprintf(sock, sizeof(sock), "%s/uffd.sock", workdir);
	unlink(sock);
	pid_t pid = fork();
	if (pid == 0) {
		char log[4096];
		snprintf(log, sizeof(log), "%s/uffd.log", workdir);
		int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		dup2(fd, 2);
		if (o.prefetch)
			execl(o.uffd, o.uffd, sock, mem, "--prefetch", (char *)NULL);
		else
			execl(o.uffd, o.uffd, sock, mem, (char *)NULL);
		_exit(127);
	}
	for (int i = 0; i < 500 && access(sock, F_OK) < 0; i++)
		usleep(10000);
	*ret_pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	return pid;
}

static FcVm *restore(const char *src, const char *name, pid_t *ret_uffd, int *ret_uffd_pidfd,
		     const char *mem_override)
{
	_cleanup_free_ char *d = dir(name);
	char mem[4096], state[4096];
	snprintf(mem, sizeof(mem), "%s/mem", src);
	snprintf(state, sizeof(state), "%s/vmstate", src);
	link_rootfs(d);
	FcVm *vm = spawn(d);
	/* With --net the restored VM gets another TAP and vsock socket, as a sandbox restored
	 * into a different slot would. */
	static const FcNetOverride net = {.iface_id = "eth0", .host_dev_name = "tap1"};
	FcSnapshotLoad load = {.snapshot_path = state, .resume = true};
	if (o.net) {
		load.net_overrides = &net;
		load.n_net_overrides = 1;
		load.vsock_override = "v2.sock";
	}
	if (o.uffd) {
		*ret_uffd = start_uffd(d, mem_override ?: mem, ret_uffd_pidfd);
		load.uffd = true;
		load.backend_path = "uffd.sock";
	} else {
		load.backend_path = mem;
	}
	/* fcsim reads every page of guest memory during the load (its verification): through
	 * lazy faults, 1 GiB takes tens of seconds, more under the sanitizers. */
	fcctl_vm_set_timeout(vm, 600000);
	double t = now_ms();
	char *fault = NULL;
	int r = fcctl_snapshot_load(vm, &load, &fault);
	printf("load_ms=%.1f load_result=%d\n", now_ms() - t, r);
	fcctl_vm_set_timeout(vm, 0);
	if (r < 0) {
		printf("load_fault=%s\n", fault ?: "");
		/* Nothing outlives a failed scenario: the VMM (a failed load leaves it unusable)
		 * and, unless the scenario wants to watch it, the memory server. */
		fcctl_vm_stop(vm, 2000, NULL);
		fcctl_vm_free(vm);
		vm = NULL;
	}
	free(fault);
	return vm;
}

static int cycle(void)
{
	_cleanup_free_ char *d1 = dir("a");
	FcVm *vm = boot(d1);
	guest_echo(d1, "hello");
	snapshot(vm);
	fcctl_vm_free(vm);
	pid_t uffd = 0;
	int uffd_pidfd = -1;
	FcVm *vm2 = restore(d1, "b", &uffd, &uffd_pidfd, NULL);
	if (!vm2) {
		if (uffd > 0) {
			kill(uffd, SIGKILL);
			waitpid(uffd, NULL, 0);
		}
		return 1;
	}
	_cleanup_free_ char *d2 = dir("b");
	if (o.net) {
		char v2[4096];
		snprintf(v2, sizeof(v2), "%s/v2", d2);
		/* Not /sys/class/net: sysfs shows the namespace it was mounted in. */
		printf("tap1_exists=%d\n", if_nametoindex("tap1") > 0);
		guest_echo_on(v2, "overridden");
	} else {
		guest_echo(d2, "again");
	}
	FcExit ex;
	fcctl_vm_stop(vm2, 5000, &ex);
	if (uffd > 0) {
		int status;
		waitpid(uffd, &status, 0);
		printf("uffd_exit=%d\n",
		       WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
	}
	fcctl_vm_free(vm2);
	return 0;
}

static int fault_case(void)
{
	_cleanup_free_ char *d = dir("f");
	FcVm *vm = spawn(d);
	char *fault = NULL;
	int r = fcctl_instance_start(vm, &fault);
	printf("result=%d fault_message=%s\n", r, fault ?: "");
	free(fault);
	fault = NULL;
	r = fcctl_put_drive(vm, "root", "/nonexistent/disk", true, false, &fault);
	printf("result=%d fault_message=%s\n", r, fault ?: "");
	free(fault);
	fcctl_vm_stop(vm, 5000, NULL);
	fcctl_vm_free(vm);
	return 0;
}

/* A call that blocks inside the VMM: a snapshot load whose memory server accepts the
 * handshake and then serves nothing. The VMM is killed meanwhile. */
static int killmid(void)
{
	_cleanup_free_ char *d = dir("k");
	_cleanup_free_ char *src = dir("a");
	char sock[4096];
	FcVm *vm = boot(src);
	guest_echo(src, "x");
	snapshot(vm);
	fcctl_vm_free(vm);
	vm = spawn(d);
	link_rootfs(d);
	snprintf(sock, sizeof(sock), "%s/dead.sock", d);
	unlink(sock);
	/* A "handler" that accepts the connection and never answers a fault. */
	pid_t silent = fork();
	if (silent == 0) {
		execl("/usr/bin/python3", "python3", "-c",
		      "import socket,sys,time\n"
		      "s=socket.socket(socket.AF_UNIX);s.bind(sys.argv[1]);s.listen(1)\n"
		      "c,_=s.accept();c.recvmsg(65536,64);time.sleep(600)\n",
		      sock, (char *)NULL);
		_exit(127);
	}
	for (int i = 0; i < 500 && access(sock, F_OK) < 0; i++)
		usleep(10000);
	pid_t killer = fork();
	if (killer == 0) {
		usleep(500000);
		kill(fcctl_vm_pid(vm), SIGKILL);
		_exit(0);
	}
	char state[4096];
	snprintf(state, sizeof(state), "%s/vmstate", src);
	FcSnapshotLoad load = {.snapshot_path = state, .uffd = true, .backend_path = "dead.sock"};
	fcctl_vm_set_timeout(vm, 20000);
	char *fault = NULL;
	double t = now_ms();
	int r = fcctl_snapshot_load(vm, &load, &fault);
	printf("result=%d elapsed_ms=%.0f fault=%s\n", r, now_ms() - t, fault ?: "");
	free(fault);
	waitpid(killer, NULL, 0);
	kill(silent, SIGKILL);
	waitpid(silent, NULL, 0);
	fcctl_vm_free(vm);
	return r < 0 ? 0 : 1;
}

static int uffdgone(void)
{
	_cleanup_free_ char *src = dir("a");
	FcVm *vm = boot(src);
	guest_echo(src, "x");
	snapshot(vm);
	fcctl_vm_free(vm);
	pid_t uffd = 0;
	int uffd_pidfd = -1;
	FcVm *vm2 = restore(src, "g", &uffd, &uffd_pidfd, NULL);
	if (!vm2 || uffd <= 0) {
		if (uffd > 0)
			kill(uffd, SIGKILL);
		return 1;
	}
	kill(uffd, SIGKILL);
	FcExit ex;
	double t = now_ms();
	int r = fcctl_vm_supervise(vm2, uffd_pidfd, 5000, &ex);
	printf("supervise=%d vmm_exited=%d stopped_by_us=%d signal=%d within_ms=%.0f\n", r,
	       ex.exited, ex.stopped_by_us, ex.signal, now_ms() - t);
	waitpid(uffd, NULL, 0);
	fcctl_vm_free(vm2);
	return 0;
}

static int copy_prefix(const char *from, const char *to, size_t len)
{
	char buf[65536];
	int in = open(from, O_RDONLY | O_CLOEXEC);
	int out = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	int r = in < 0 || out < 0 ? -1 : 0;

	while (r == 0 && len > 0) {
		ssize_t n = read(in, buf, len < sizeof(buf) ? len : sizeof(buf));
		if (n <= 0 || write(out, buf, (size_t)n) != n)
			r = -1;
		else
			len -= (size_t)n;
	}
	if (in >= 0)
		close(in);
	if (out >= 0)
		close(out);
	return r;
}

static int truncated(void)
{
	_cleanup_free_ char *src = dir("a");
	char mem[4096], cut[4096];
	FcVm *vm = boot(src);
	guest_echo(src, "x");
	snapshot(vm);
	fcctl_vm_free(vm);
	snprintf(mem, sizeof(mem), "%s/mem", src);
	snprintf(cut, sizeof(cut), "%s/mem.cut", src);
	/* A memory file cut short after 1 MiB: what a half-written snapshot on a full disk looks
	 * like. */
	if (copy_prefix(mem, cut, 1 << 20) < 0)
		return 1;
	pid_t uffd = 0;
	int uffd_pidfd = -1;
	FcVm *vm2 = restore(src, "t", &uffd, &uffd_pidfd, cut);
	int status = 0;
	waitpid(uffd, &status, 0);
	printf("uffd_exit=%d restored=%d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1,
	       vm2 != NULL);
	if (vm2) {
		fcctl_vm_stop(vm2, 2000, NULL);
		fcctl_vm_free(vm2);
	}
	return 0;
}

/* An agent restart: the VMM is forgotten, then taken over by pid; a wrong id or directory is
 * refused; the adopted VMM still answers and stops. */
static int adopt(void)
{
	_cleanup_free_ char *d = dir("ad");
	char *e = NULL;
	FcVm *vm = boot(d), *again = NULL;
	pid_t pid = fcctl_vm_pid(vm);
	fcctl_vm_free(vm);

	int r = fcctl_vm_adopt(pid, o.binary, "someone-else", d, &again, &e);
	printf("wrong_id=%d error=%s\n", r, e ?: "");
	free(e);
	e = NULL;
	r = fcctl_vm_adopt(pid, o.binary, "fcctl-test", "/tmp", &again, &e);
	printf("wrong_dir=%d error=%s\n", r, e ?: "");
	free(e);
	e = NULL;
	r = fcctl_vm_adopt(pid, "/bin/sleep", "fcctl-test", d, &again, &e);
	printf("wrong_binary=%d error=%s\n", r, e ?: "");
	free(e);
	e = NULL;
	r = fcctl_vm_adopt(pid, o.binary, "fcctl-test", d, &again, &e);
	printf("adopt=%d error=%s\n", r, e ?: "");
	free(e);
	if (r < 0)
		return 1;
	print_state(again, "adopted_state");
	guest_echo(d, "adopted");
	FcExit ex;
	fcctl_vm_stop(again, 5000, &ex);
	printf("adopted_stop exited=%d known=%d gone=%d\n", ex.exited, ex.known,
	       /* Still our child here (an agent restart has no parent left): reap it. */
	       waitpid(pid, NULL, WNOHANG) == pid || (kill(pid, 0) < 0 && errno == ESRCH));
	fcctl_vm_free(again);
	return 0;
}

/* Spawn failures say what failed. */
static int spawnfail(void)
{
	_cleanup_free_ char *d = dir("sf");
	char *e = NULL;
	FcVm *vm = NULL;
	FcSpawn s = {.binary = "/nonexistent/firecracker", .id = "x", .workdir = d};
	int r = fcctl_vm_spawn(&s, &vm, &e);
	printf("missing_binary=%d error=%s\n", r, e ?: "");
	free(e);
	e = NULL;
	s.binary = o.binary;
	s.netns = "/nonexistent/netns";
	r = fcctl_vm_spawn(&s, &vm, &e);
	printf("missing_netns=%d error=%s\n", r, e ?: "");
	free(e);
	e = NULL;
	/* A binary that exits at once without opening a socket. */
	s.netns = o.netns;
	s.binary = "/bin/false";
	r = fcctl_vm_spawn(&s, &vm, &e);
	printf("exits_early=%d error=%s\n", r, e ?: "");
	free(e);
	return 0;
}

/* Hard links, as an agent must give a jailed VMM its files (a symlink would point outside the
 * chroot). */
static void link_into(const char *root, const char *from, const char *name)
{
	char to[4096];
	snprintf(to, sizeof(to), "%s/%s", root, name);
	unlink(to);
	if (link(from, to) < 0) {
		fprintf(stderr, "fcctl-tool: link %s -> %s: %s\n", from, to, strerror(errno));
		exit(1);
	}
}

static int jailed(void)
{
	static const char *const stale[] = {"v.sock", NULL};
	_cleanup_free_ char *d = dir("jail");
	_cleanup_free_ char *base = dir("jail/srv");
	_cleanup_free_ char *want = NULL, *bin = dir("jail/bin");
	char *e = NULL, copy[4096], link_path[4096];
	FcVm *vm = NULL, *again = NULL;
	/* Installed as a link, as /usr/bin/firecracker often is: the jailer names the chroot after
	 * the file it resolves to. */
	snprintf(link_path, sizeof(link_path), "%s/firecracker", bin);
	if (symlink(o.binary, link_path) < 0)
		return 1;
	FcSpawn s = {.binary = link_path,
		     .id = "fcctl-jail",
		     .workdir = d,
		     .netns = o.netns,
		     .stale = stale,
		     .jailer = o.jailer,
		     .chroot_base = base};

	printf("bad_id=%d\n", fcctl_jail_root(base, link_path, "no/slashes", &want));
	CHECK(fcctl_jail_root(base, link_path, s.id, &want), "jail root");
	printf("jail_root=%s\n", want);
	double t = now_ms();
	if (fcctl_vm_spawn(&s, &vm, &e) < 0) {
		fprintf(stderr, "fcctl-tool: spawn: %s\n", e ?: "?");
		return 1;
	}
	const char *root = fcctl_vm_workdir(vm);
	pid_t pid = fcctl_vm_pid(vm);
	printf("spawn_ms=%.1f pid=%d root_is_chroot=%d\n", now_ms() - t, (int)pid,
	       strcmp(root, want) == 0);
	link_into(root, o.rootfs, "rootfs");
	link_into(root, o.kernel, "vmlinux");
	CHECK(fcctl_put_machine_config(vm, 1, o.mem, false, false, FC_HUGE_PAGES_NONE, &fault_),
	      "machine-config");
	CHECK(fcctl_put_boot_source(vm, "vmlinux", NULL, o.boot_args, &fault_), "boot-source");
	CHECK(fcctl_put_drive(vm, "rootfs", "rootfs", true, false, &fault_), "drive");
	CHECK(fcctl_put_vsock(vm, 3, "v.sock", &fault_), "vsock");
	CHECK(fcctl_instance_start(vm, &fault_), "InstanceStart");
	guest_echo(root, "jailed");
	fcctl_vm_free(vm);

	/* The jailer runs a copy of the binary: the original is not what the process runs. */
	int r = fcctl_vm_adopt(pid, o.binary, s.id, want, &again, &e);
	printf("adopt_original=%d error=%s\n", r, e ?: "");
	free(e);
	e = NULL;
	snprintf(copy, sizeof(copy), "%s/%s", want,
		 strrchr(o.binary, '/') ? strrchr(o.binary, '/') + 1 : o.binary);
	r = fcctl_vm_adopt(pid, copy, s.id, want, &again, &e);
	printf("adopt=%d error=%s\n", r, e ?: "");
	free(e);
	if (r < 0) {
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
		return 1;
	}
	print_state(again, "adopted_state");
	guest_echo(fcctl_vm_workdir(again), "adopted");
	FcExit ex;
	fcctl_vm_stop(again, 5000, &ex);
	printf("stopped=%d gone=%d\n", ex.exited,
	       waitpid(pid, NULL, WNOHANG) == pid || (kill(pid, 0) < 0 && errno == ESRCH));
	fcctl_vm_free(again);

	/* The same id again (a restart, a restore): the jailer refuses a chroot that still has
	 * the device nodes it made last time, so spawn must have cleared them. */
	if (fcctl_vm_spawn(&s, &vm, &e) < 0) {
		printf("respawn=failed error=%s\n", e ?: "?");
		free(e);
		return 1;
	}
	printf("respawn=ok\n");
	print_state(vm, "respawn_state");
	fcctl_vm_stop(vm, 5000, NULL);
	fcctl_vm_free(vm);
	return 0;
}

/* ---- several threads on one VMM ---- */

typedef enum Waiter {
	WAITER_WAIT,  /* fcctl_vm_wait(-1) */
	WAITER_REAP,  /* fcctl_vm_reap() until it is done */
	WAITER_POLL,  /* poll the pidfd, then fcctl_vm_reap(), as an event loop does */
	WAITER_API,   /* API calls until one fails (api.c reaps to say why), then wait */
	WAITER_STOP,  /* fcctl_vm_stop() */
	WAITER_SUPER, /* fcctl_vm_supervise() with a helper that never ends */
	WAITER_MAX,
} Waiter;

typedef struct RaceThread {
	pthread_t thread;
	FcVm *vm;
	Waiter kind;
	int helper_pidfd;
	pthread_barrier_t *start;
	int r;
	FcExit ex;
} RaceThread;

static void *race_thread(void *arg)
{
	RaceThread *t = arg;
	pthread_barrier_wait(t->start);
	switch (t->kind) {
	case WAITER_WAIT:
		t->r = fcctl_vm_wait(t->vm, -1, &t->ex);
		break;
	case WAITER_REAP:
		while ((t->r = fcctl_vm_reap(t->vm, &t->ex)) == -EAGAIN)
			usleep(200);
		break;
	case WAITER_POLL: {
		struct pollfd p = {.fd = fcctl_vm_pidfd(t->vm), .events = POLLIN};
		while (poll(&p, 1, -1) < 0 && errno == EINTR)
			;
		t->r = fcctl_vm_reap(t->vm, &t->ex);
		break;
	}
	case WAITER_API: {
		char *state = NULL, *version = NULL, *fault = NULL;
		while (fcctl_describe(t->vm, &state, &version, &fault) >= 0) {
			free(state);
			free(version);
			state = version = NULL;
		}
		free(fault);
		/* The socket may close before the process ends (a VMM that shuts down on SIGTERM):
		 * the failed call need not have seen the exit. */
		t->r = fcctl_vm_wait(t->vm, -1, &t->ex);
		break;
	}
	case WAITER_STOP:
		t->r = fcctl_vm_stop(t->vm, 5000, &t->ex);
		break;
	case WAITER_SUPER:
		t->r = fcctl_vm_supervise(t->vm, t->helper_pidfd, 5000, &t->ex);
		break;
	default:
		t->r = -EINVAL;
	}
	return NULL;
}

static bool same_exit(const FcExit *a, const FcExit *b)
{
	return a->exited == b->exited && a->known == b->known && a->code == b->code &&
	       a->signal == b->signal && a->stopped_by_us == b->stopped_by_us;
}

/* Rounds of 12 threads (two of each kind) on one VMM. Odd rounds: one thread stops it. Even
 * rounds: it is killed from outside, once every thread is waiting. */
static int race(void)
{
	enum {
		ROUNDS = 20,
		THREADS = 2 * WAITER_MAX
	};
	_cleanup_free_ char *d = dir("race");
	int failures = 0;
	/* A helper for fcctl_vm_supervise that outlives every round: our own pidfd. */
	int self = (int)syscall(SYS_pidfd_open, getpid(), 0);

	for (int round = 0; round < ROUNDS; round++) {
		FcVm *vm = spawn(d);
		pthread_barrier_t start;
		RaceThread t[THREADS] = {};
		bool stopper = round % 2 == 1;
		pthread_barrier_init(&start, NULL, THREADS + 1);
		for (int i = 0; i < THREADS; i++) {
			t[i].vm = vm;
			t[i].kind = (Waiter)(i % WAITER_MAX);
			if (t[i].kind == WAITER_STOP && !stopper)
				t[i].kind = WAITER_WAIT;
			t[i].helper_pidfd = self;
			t[i].start = &start;
			pthread_create(&t[i].thread, NULL, race_thread, &t[i]);
		}
		pthread_barrier_wait(&start);
		if (!stopper) {
			usleep(20000); /* let them all block */
			kill(fcctl_vm_pid(vm), SIGKILL);
		}
		for (int i = 0; i < THREADS; i++)
			pthread_join(t[i].thread, NULL);
		pthread_barrier_destroy(&start);
		for (int i = 0; i < THREADS; i++) {
			if (t[i].r < 0 || !t[i].ex.exited || !same_exit(&t[i].ex, &t[0].ex)) {
				printf("mismatch round=%d thread=%d kind=%d r=%d exited=%d "
				       "known=%d "
				       "signal=%d code=%d stopped_by_us=%d (thread 0: signal=%d "
				       "stopped_by_us=%d)\n",
				       round, i, t[i].kind, t[i].r, t[i].ex.exited, t[i].ex.known,
				       t[i].ex.signal, t[i].ex.code, t[i].ex.stopped_by_us,
				       t[0].ex.signal, t[0].ex.stopped_by_us);
				failures++;
			}
		}
		/* Whoever reaped, it is reaped: no zombie left behind. */
		if (waitpid(fcctl_vm_pid(vm), NULL, WNOHANG) != -1 || errno != ECHILD) {
			printf("not_reaped round=%d\n", round);
			failures++;
		}
		printf("round=%d signal=%d known=%d stopped_by_us=%d\n", round, t[0].ex.signal,
		       t[0].ex.known, t[0].ex.stopped_by_us);
		fcctl_vm_free(vm);
	}
	close(self);
	printf("race_rounds=%d race_failures=%d\n", ROUNDS, failures);
	return 0;
}

/* ---- the event loop's view ---- */

static int epoll_readable(int epfd, int timeout_ms)
{
	struct epoll_event ev;
	int n;
	while ((n = epoll_wait(epfd, &ev, 1, timeout_ms)) < 0 && errno == EINTR)
		;
	return n;
}

static void print_exit(const char *key, int r, const FcExit *ex)
{
	printf("%s=%d exited=%d known=%d signal=%d code=%d stopped_by_us=%d\n", key, r, ex->exited,
	       ex->known, ex->signal, ex->code, ex->stopped_by_us);
}

static int reap(void)
{
	_cleanup_free_ char *d = dir("reap");
	_cleanup_free_ char *d2 = dir("reap-adopted");
	FcExit ex = {}, again = {}, waited = {}, stopped = {};
	char *e = NULL;

	FcVm *vm = spawn(d);
	pid_t pid = fcctl_vm_pid(vm);
	int epfd = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event ev = {.events = EPOLLIN};
	epoll_ctl(epfd, EPOLL_CTL_ADD, fcctl_vm_pidfd(vm), &ev);
	int r = fcctl_vm_reap(vm, &ex);
	printf("running_reap=%d untouched=%d\n", r, !ex.exited);
	printf("epoll_running=%d\n", epoll_readable(epfd, 100));
	kill(pid, SIGKILL);
	printf("epoll_exited=%d\n", epoll_readable(epfd, 5000));
	r = fcctl_vm_reap(vm, &ex);
	print_exit("reap", r, &ex);
	printf("zombie_gone=%d\n", waitpid(pid, NULL, WNOHANG) == -1 && errno == ECHILD);
	int r2 = fcctl_vm_reap(vm, &again);
	int r3 = fcctl_vm_wait(vm, 0, &waited);
	int r4 = fcctl_vm_stop(vm, 1000, &stopped);
	printf("reap_again=%d wait_after=%d stop_after=%d all_same=%d\n", r2, r3, r4,
	       same_exit(&ex, &again) && same_exit(&ex, &waited) && same_exit(&ex, &stopped));
	printf("epoll_after_reap=%d\n", epoll_readable(epfd, 0));
	close(epfd);
	fcctl_vm_free(vm);

	/* Adopted: not our child to wait for (an agent restart), so no status. */
	vm = spawn(d2);
	pid = fcctl_vm_pid(vm);
	fcctl_vm_free(vm);
	FcVm *adopted = NULL;
	r = fcctl_vm_adopt(pid, o.binary, "fcctl-test", d2, &adopted, &e);
	if (r < 0) {
		printf("adopt=%d error=%s\n", r, e ?: "");
		free(e);
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
		return 1;
	}
	memset(&ex, 0, sizeof(ex));
	printf("adopted_running_reap=%d\n", fcctl_vm_reap(adopted, &ex));
	kill(pid, SIGKILL);
	struct pollfd p = {.fd = fcctl_vm_pidfd(adopted), .events = POLLIN};
	poll(&p, 1, 5000);
	r = fcctl_vm_reap(adopted, &ex);
	print_exit("adopted_reap", r, &ex);
	r2 = fcctl_vm_reap(adopted, &again);
	r3 = fcctl_vm_stop(adopted, 1000, &stopped);
	printf("adopted_again=%d adopted_stop=%d adopted_same=%d\n", r2, r3,
	       same_exit(&ex, &again) && same_exit(&ex, &stopped));
	fcctl_vm_free(adopted);
	/* Still our child in fact: the zombie is ours to clear. */
	waitpid(pid, NULL, 0);
	return 0;
}

/* ---- the unix socket path limit ---- */

/* <workdir>/<name of `len` x's>: a directory whose api.sock path is `total` bytes long. */
static char *dir_for_sock_len(size_t total)
{
	size_t fixed = strlen(o.workdir) + 1 + strlen("/api.sock");
	char *name, *d;
	if (total <= fixed + 1)
		exit(1);
	name = malloc(total - fixed + 1);
	memset(name, 'x', total - fixed);
	name[total - fixed] = 0;
	d = dir(name);
	free(name);
	return d;
}

static int longpath(void)
{
	_cleanup_free_ char *over = dir_for_sock_len(110), *fits = dir_for_sock_len(107);
	char *e = NULL, out[4096];
	FcVm *vm = NULL;
	FcSpawn s = {
		.binary = o.binary, .id = "fcctl-test", .workdir = over, .start_timeout_ms = 3000};

	double t = now_ms();
	int r = fcctl_vm_spawn(&s, &vm, &e);
	printf("too_long=%d within_ms=%.0f error=%s\n", r, now_ms() - t, e ?: "");
	free(e);
	e = NULL;
	snprintf(out, sizeof(out), "%s/fc.out", over);
	printf("output_created=%d\n", access(out, F_OK) == 0);

	/* At the limit (107 bytes and the NUL): it works. */
	s.workdir = fits;
	r = fcctl_vm_spawn(&s, &vm, &e);
	printf("at_limit=%d error=%s\n", r, e ?: "");
	free(e);
	e = NULL;
	if (r >= 0) {
		print_state(vm, "at_limit_state");
		fcctl_vm_stop(vm, 5000, NULL);
		fcctl_vm_free(vm);
	}

	/* Through the jailer: the socket is in the chroot, <base>/<binary's name>/<id>/root. */
	if (o.jailer) {
		char base[4096], pad[256];
		const char *name = strrchr(o.binary, '/') ? strrchr(o.binary, '/') + 1 : o.binary;
		size_t fixed = strlen(o.workdir) + strlen("/jl/") + strlen(name) +
			       strlen("/fcctl-test/root/api.sock");
		/* With the "/" after base: 110 bytes, 3 over. */
		size_t n = 110 - 1 - fixed;
		if (n >= sizeof(pad))
			return 1;
		memset(pad, 'j', n);
		pad[n] = 0;
		snprintf(base, sizeof(base), "%s/jl/%s", o.workdir, pad);
		FcSpawn j = {.binary = o.binary,
			     .id = "fcctl-test",
			     .workdir = fits,
			     .jailer = o.jailer,
			     .chroot_base = base,
			     .start_timeout_ms = 3000};
		r = fcctl_vm_spawn(&j, &vm, &e);
		printf("jail_too_long=%d error=%s\n", r, e ?: "");
		free(e);
		printf("chroot_created=%d\n", access(base, F_OK) == 0);
	}
	return 0;
}

/* ---- answers that do not end ---- */

static int bigbody(void)
{
	_cleanup_free_ char *d = dir("big");
	FcVm *vm = spawn(d);
	char *state = NULL, *version = NULL, *fault = NULL;

	/* Short: were the answer not bounded, memory would grow for as long as this lasts. */
	fcctl_vm_set_timeout(vm, 3000);
	double t = now_ms();
	int r = fcctl_describe(vm, &state, &version, &fault);
	printf("endless=%d within_ms=%.0f untouched=%d fault=%s\n", r, now_ms() - t,
	       !state && !version, fault ?: "");
	free(fault);
	fault = NULL;
	/* The connection was cut in the middle of an answer: the next call works. */
	r = fcctl_version(vm, &version, &fault);
	printf("large_within_limit=%d version=%s\n", r, version ?: "");
	free(version);
	free(fault);
	fault = NULL;
	r = fcctl_instance_start(vm, &fault);
	printf("too_long_fault=%d fault=%.80s\n", r, fault ?: "");
	free(fault);
	/* VmHWM, not getrusage's ru_maxrss: that one survives execve, so it would report the
	 * peak of the process that forked us (a test runner of several hundred MiB). */
	long hwm = -1;
	FILE *st = fopen("/proc/self/status", "re");
	char line[256];
	while (st && fgets(line, sizeof(line), st))
		if (sscanf(line, "VmHWM: %ld kB", &hwm) == 1)
			break;
	if (st)
		fclose(st);
	printf("maxrss_kib=%ld\n", hwm);
	fcctl_vm_stop(vm, 5000, NULL);
	fcctl_vm_free(vm);
	return 0;
}

/* ---- what the VMM inherits ---- */

static void print_sig_lines(const char *prefix, const char *path)
{
	char line[256];
	FILE *f = fopen(path, "re");
	if (!f) {
		printf("%s_missing=1\n", prefix);
		return;
	}
	while (fgets(line, sizeof(line), f)) {
		unsigned long long mask;
		if (sscanf(line, "SigIgn: %llx", &mask) == 1)
			printf("%s_sigign=%llx\n", prefix, mask);
		else if (sscanf(line, "SigBlk: %llx", &mask) == 1)
			printf("%s_sigblk=%llx\n", prefix, mask);
	}
	fclose(f);
}

static int signals(void)
{
	_cleanup_free_ char *d = dir("sig");
	char wrapper[4096], sigs[4096];
	FcVm *vm = NULL;
	char *e = NULL;

	/* The shell records its own status (what exec handed it), then becomes the VMM. Builtins
	 * only: a shell blocks every signal around the vfork of an external command, and a grep
	 * could see that mask. */
	snprintf(wrapper, sizeof(wrapper), "%s/vmm-wrapper", d);
	snprintf(sigs, sizeof(sigs), "%s/sigs", d);
	FILE *f = fopen(wrapper, "we");
	if (!f)
		return 1;
	fprintf(f,
		"#!/bin/sh\n"
		"while read -r key value; do\n"
		"	case $key in SigIgn:|SigBlk:) echo \"$key $value\";; esac\n"
		"done < /proc/$$/status > sigs\n"
		"exec %s \"$@\"\n",
		o.binary);
	fclose(f);
	chmod(wrapper, 0755);

	struct sigaction ign = {.sa_handler = SIG_IGN};
	sigaction(SIGPIPE, &ign, NULL);
	sigaction(SIGHUP, &ign, NULL);
	sigaction(SIGUSR2, &ign, NULL);
	sigset_t block;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &block, NULL);
	print_sig_lines("parent", "/proc/thread-self/status");

	FcSpawn s = {.binary = wrapper, .id = "fcctl-test", .workdir = d};
	if (fcctl_vm_spawn(&s, &vm, &e) < 0) {
		fprintf(stderr, "fcctl-tool: spawn: %s\n", e ?: "?");
		return 1;
	}
	print_sig_lines("child", sigs);
	print_state(vm, "state");
	fcctl_vm_stop(vm, 5000, NULL);
	fcctl_vm_free(vm);
	return 0;
}

int main(int argc, char *argv[])
{
	static const struct option options[] = {
		{"binary", required_argument, NULL, 'b'},
		{"workdir", required_argument, NULL, 'w'},
		{"netns", required_argument, NULL, 'n'},
		{"rootfs", required_argument, NULL, 'r'},
		{"kernel", required_argument, NULL, 'k'},
		{"mem", required_argument, NULL, 'm'},
		{"uffd", required_argument, NULL, 'u'},
		{"prefetch", no_argument, NULL, 'p'},
		{"boot-args", required_argument, NULL, 'a'},
		{"net", no_argument, NULL, 'N'},
		{"jailer", required_argument, NULL, 'J'},
		{},
	};
	int c;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((c = getopt_long(argc, argv, "", options, NULL)) >= 0) {
		switch (c) {
		case 'b':
			o.binary = optarg;
			break;
		case 'w':
			o.workdir = optarg;
			break;
		case 'n':
			o.netns = optarg;
			break;
		case 'r':
			o.rootfs = optarg;
			break;
		case 'k':
			o.kernel = optarg;
			break;
		case 'm':
			o.mem = (unsigned)atoi(optarg);
			break;
		case 'u':
			o.uffd = optarg;
			break;
		case 'p':
			o.prefetch = true;
			break;
		case 'a':
			o.boot_args = optarg;
			break;
		case 'N':
			o.net = true;
			break;
		case 'J':
			o.jailer = optarg;
			break;
		default:
			return 2;
		}
	}
	if (optind != argc - 1 || !o.binary || !o.workdir || !o.rootfs || !o.kernel) {
		fprintf(stderr, "see the comment at the top of test/fcctl/fcctl-tool.c\n");
		return 2;
	}
	const char *cmd = argv[optind];
	if (strcmp(cmd, "cycle") == 0)
		return cycle();
	if (strcmp(cmd, "fault") == 0)
		return fault_case();
	if (strcmp(cmd, "killmid") == 0)
		return killmid();
	if (strcmp(cmd, "uffdgone") == 0)
		return uffdgone();
	if (strcmp(cmd, "truncated") == 0)
		return truncated();
	if (strcmp(cmd, "adopt") == 0)
		return adopt();
	if (strcmp(cmd, "spawnfail") == 0)
		return spawnfail();
	if (strcmp(cmd, "jailer") == 0)
		return jailed();
	if (strcmp(cmd, "race") == 0)
		return race();
	if (strcmp(cmd, "reap") == 0)
		return reap();
	if (strcmp(cmd, "longpath") == 0)
		return longpath();
	if (strcmp(cmd, "bigbody") == 0)
		return bigbody();
	if (strcmp(cmd, "signals") == 0)
		return signals();
	return 2;
}
