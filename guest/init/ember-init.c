/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ember-init: PID 1 of an ember microVM (DESIGN.md §1). A static binary that mounts the API
 * file systems, names the host, brings up lo and eth0, runs ember-guest and restarts it when
 * it dies, reaps orphans, and ends the microVM on SIGINT (Firecracker's SendCtrlAltDel),
 * SIGTERM, SIGUSR1/SIGUSR2 (busybox halt/poweroff) or SIGPWR: every process stopped, then a
 * reset, which is what makes Firecracker exit.
 *
 * Boot arguments read from /proc/cmdline: ip= (the kernel's syntax; eth0 is configured from it
 * when the kernel has not done so) and ember.guest=<absolute path> (default
 * /usr/bin/ember-guest, where ember-mkrootfs installs it).
 *
 * Under fcsim (EMBER_SIM=1) the "machine" is a container: /dev is the simulator's tmpfs, eth0
 * and the hostname are configured before init runs, /proc/cmdline is the host's (so no boot
 * argument is read), and power-off is init exiting, which ends fcsim as a guest power-off
 * ends Firecracker.
 *
 * PID 1 must not exit on anything it can survive (the kernel panics when it does): every
 * failure below is logged and the boot goes on with what works.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/macro.h"
#include "init.h"

#ifndef EMBER_VERSION
#define EMBER_VERSION "dev"
#endif

#define GUEST_PATH_DEFAULT "/usr/bin/ember-guest"
#define PATH_DEFAULT       "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* Restart back-off for ember-guest: a binary that dies at once is retried at 0.1, 0.2, 0.4 …
 * up to 5 s apart instead of spinning; one that ran for 10 s counts as healthy again. */
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000
#define HEALTHY_MS     10000

/* Shutdown: SIGTERM, this long to go, then SIGKILL. */
#define STOP_TERM_MS 5000
#define STOP_KILL_MS 2000

static bool simulated;
static int log_fd = STDERR_FILENO;
static bool log_kmsg;

/* One write() per line, so that lines from init and from its children interleave whole on the
 * console. */
static void log_line(const char *format, ...) _printf_(1, 2);
static void log_line(const char *format, ...)
{
	char buf[1024];
	size_t n;
	va_list ap;
	int k;

	/* /dev/kmsg takes a syslog priority prefix; <6> = info. */
	k = snprintf(buf, sizeof(buf), "%sember-init: ", log_kmsg ? "<6>" : "");
	n = k > 0 ? (size_t)k : 0;
	va_start(ap, format);
	k = vsnprintf(buf + n, sizeof(buf) - n - 1, format, ap);
	va_end(ap);
	if (k > 0)
		n += (size_t)k < sizeof(buf) - n - 1 ? (size_t)k : sizeof(buf) - n - 2;
	buf[n++] = '\n';
	(void)!write(log_fd, buf, n);
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

typedef enum StdioState {
	STDIO_UNKNOWN,
	STDIO_CONSOLE,
	STDIO_FALLBACK,
} StdioState;

/* fds 0-2 for init and for what it starts. The kernel opens /dev/console for init when the
 * root file system has one; otherwise init starts with none: /dev/null stands in, log lines go
 * to /dev/kmsg, and the console is tried again once /dev is mounted. */
static void stdio_setup(void)
{
	static StdioState state = STDIO_UNKNOWN;
	bool complete = true;
	int fd;

	if (state == STDIO_CONSOLE)
		return;
	for (int i = 0; i <= STDERR_FILENO; i++)
		if (fcntl(i, F_GETFD) < 0)
			complete = false;
	if (state == STDIO_UNKNOWN && complete) {
		state = STDIO_CONSOLE; /* what the kernel gave us */
		return;
	}

	fd = open("/dev/console", O_RDWR | O_NOCTTY);
	if (fd >= 0) {
		for (int i = 0; i <= STDERR_FILENO; i++)
			if (i != fd)
				(void)dup2(fd, i);
		if (fd > STDERR_FILENO)
			safe_close(fd);
		if (log_kmsg) {
			safe_close(log_fd);
			log_fd = STDERR_FILENO;
			log_kmsg = false;
		}
		state = STDIO_CONSOLE;
		return;
	}
	if (!log_kmsg) {
		int k = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
		/* Above 2, so that filling 0-2 below does not take its place. */
		if (k >= 0 && k <= STDERR_FILENO) {
			int moved = fcntl(k, F_DUPFD_CLOEXEC, STDERR_FILENO + 1);
			safe_close(k);
			k = moved;
		}
		if (k >= 0) {
			log_fd = k;
			log_kmsg = true;
		}
	}
	state = STDIO_FALLBACK;
	fd = open("/dev/null", O_RDWR | O_NOCTTY);
	if (fd < 0)
		return;
	for (int i = 0; i <= STDERR_FILENO; i++)
		if (i != fd && fcntl(i, F_GETFD) < 0)
			(void)dup2(fd, i);
	if (fd > STDERR_FILENO)
		safe_close(fd);
}

static bool is_mountpoint(const char *path)
{
	char parent[256];
	struct stat a, b;

	snprintf(parent, sizeof(parent), "%s/..", path);
	if (stat(path, &a) < 0 || stat(parent, &b) < 0)
		return false;
	return a.st_dev != b.st_dev || a.st_ino == b.st_ino;
}

typedef struct MountSpec {
	const char *what;
	const char *where;
	const char *type;
	unsigned long flags;
	const char *data;
	mode_t mode;
} MountSpec;

static void mount_one(const MountSpec *m)
{
	/* Already there: mounted by the kernel (devtmpfs with CONFIG_DEVTMPFS_MOUNT), by fcsim
	 * (its /dev), or by an init before us that exec'd into this one. */
	if (is_mountpoint(m->where)) {
		log_line("%s: already mounted", m->where);
		return;
	}
	if (mkdir(m->where, m->mode) < 0 && errno != EEXIST)
		log_line("%s: cannot create the mount point: %s", m->where, strerror(errno));
	if (mount(m->what, m->where, m->type, m->flags, m->data) < 0) {
		if (errno == EBUSY)
			log_line("%s: already mounted", m->where);
		else
			log_line("%s: cannot mount %s: %s; going on without it", m->where, m->type,
				 strerror(errno));
		return;
	}
	log_line("mounted %s on %s", m->type, m->where);
}

static void mounts_setup(void)
{
	const unsigned long nosuid_nodev = MS_NOSUID | MS_NODEV;
	/* Under fcsim /sys is the host's sysfs (seen through the guest's network namespace):
	 * read-only, so that a guest cannot change the host through it. */
	const unsigned long sys_flags = nosuid_nodev | MS_NOEXEC | (simulated ? MS_RDONLY : 0);
	const MountSpec api[] = {
		{"proc", "/proc", "proc", nosuid_nodev | MS_NOEXEC, NULL, 0555},
		{"sysfs", "/sys", "sysfs", sys_flags, NULL, 0555},
	};
	const MountSpec dev = {"devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755", 0755};
	const MountSpec rest[] = {
		/* gid 5 is "tty" in the rootfs ember-mkrootfs makes (and in Debian). */
		{"devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
		 "newinstance,ptmxmode=0666,mode=0620,gid=5", 0755},
		{"tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777", 01777},
		{"tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755", 0755},
		{"tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777", 01777},
	};
	static const char *const links[][2] = {
		{"/proc/self/fd", "/dev/fd"},
		{"/proc/self/fd/0", "/dev/stdin"},
		{"/proc/self/fd/1", "/dev/stdout"},
		{"/proc/self/fd/2", "/dev/stderr"},
	};

	for (size_t i = 0; i < ELEMENTSOF(api); i++)
		mount_one(&api[i]);
	/* fcsim's /dev is a tmpfs of its own; devtmpfs there would be the host's devices. */
	if (simulated && !is_mountpoint("/dev"))
		log_line("/dev: not mounted by the simulator; devtmpfs skipped under EMBER_SIM");
	else
		mount_one(&dev);
	for (size_t i = 0; i < ELEMENTSOF(rest); i++)
		mount_one(&rest[i]);
	/* devtmpfs has none of these; shells and scripts expect them. */
	for (size_t i = 0; i < ELEMENTSOF(links); i++)
		if (symlink(links[i][0], links[i][1]) < 0 && errno != EEXIST)
			log_line("%s: cannot create: %s", links[i][1], strerror(errno));
}

/* The kernel's command line, or NULL. Under fcsim /proc/cmdline is the host's: not ours. */
static char *cmdline_read(void)
{
	_cleanup_close_ int fd = -EBADF;
	_cleanup_free_ char *buf = NULL;
	size_t n = 0;
	/* COMMAND_LINE_SIZE is at most 4096 on the architectures Firecracker runs. */
	const size_t size = 8192;

	if (simulated)
		return NULL;
	fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		log_line("cannot read /proc/cmdline: %s", strerror(errno));
		return NULL;
	}
	buf = malloc(size);
	if (!buf)
		return NULL;
	for (;;) {
		ssize_t k = read(fd, buf + n, size - 1 - n);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			break;
		n += (size_t)k;
		if (n == size - 1)
			break;
	}
	buf[n] = 0;
	return TAKE_PTR(buf);
}

static void hostname_setup(const InitIpConfig *ip)
{
	struct utsname u;
	const char *name = ip->hostname[0] ? ip->hostname : NULL;

	/* A name the kernel already has (from ip= with CONFIG_IP_PNP, from fcsim, or its
	 * CONFIG_DEFAULT_HOSTNAME) stays unless ip= names one; "(none)" is the kernel's "unset". */
	if (!name && uname(&u) == 0 && u.nodename[0] && strcmp(u.nodename, "(none)") != 0) {
		log_line("hostname %s", u.nodename);
		return;
	}
	if (!name)
		name = "ember";
	if (sethostname(name, strlen(name)) < 0)
		log_line("cannot set the hostname to %s: %s", name, strerror(errno));
	else
		log_line("hostname %s", name);
}

static void network_setup(const InitIpConfig *ip, bool have_ip)
{
	const char *dev = ip->device[0] ? ip->device : "eth0";
	char addr[INET_ADDRSTRLEN + 4], gw[INET_ADDRSTRLEN];
	int r;

	r = init_net_link_up("lo");
	if (r < 0)
		log_line("lo: cannot bring up: %s", strerror(-r));
	else
		log_line("lo: up");

	r = init_net_ipv4_address(dev, addr);
	if (r > 0) {
		/* CONFIG_IP_PNP did it from ip= already (fcsim does the same). */
		log_line("%s: %s (configured before init)", dev, addr);
		return;
	}
	if (r == -ENODEV) {
		if (have_ip)
			log_line("%s: no such interface; ip= not applied", dev);
		return;
	}
	if (r < 0)
		log_line("%s: cannot read its addresses: %s", dev, strerror(-r));
	if (!have_ip) {
		log_line("%s: no address, and no ip= boot argument to configure it", dev);
		return;
	}
	r = init_net_configure(dev, ip);
	if (!inet_ntop(AF_INET, &ip->client, addr, sizeof(addr)))
		addr[0] = 0;
	if (ip->gateway.s_addr == INADDR_ANY || !inet_ntop(AF_INET, &ip->gateway, gw, sizeof(gw)))
		snprintf(gw, sizeof(gw), "none");
	if (r < 0)
		log_line("%s: cannot configure %s/%u gateway %s: %s", dev, addr, ip->prefixlen, gw,
			 strerror(-r));
	else
		log_line("%s: %s/%u gateway %s", dev, addr, ip->prefixlen, gw);
}

typedef struct Service {
	const char *path;
	pid_t pid; /* 0 while not running */
	uint64_t started_ms;
	uint64_t backoff_ms;
	uint64_t restart_at_ms;
} Service;

/* When to try again, and the wait after that: doubled up to BACKOFF_MAX_MS. */
static void service_backoff(Service *s, uint64_t now)
{
	s->restart_at_ms = now + s->backoff_ms;
	s->backoff_ms = s->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : s->backoff_ms * 2;
}

static void service_start(Service *s)
{
	pid_t pid = fork();

	if (pid < 0) {
		log_line("cannot fork for %s: %s; retrying in %u ms", s->path, strerror(errno),
			 (unsigned)s->backoff_ms);
		service_backoff(s, now_ms());
		return;
	}
	if (pid == 0) {
		sigset_t none;
		char *argv[] = {(char *)s->path, NULL};

		/* A signal mask and ignored signals survive exec: the agent starts clean,
		 * whatever init was given (a shell's background job comes with SIGINT and
		 * SIGQUIT ignored). */
		for (int sig = 1; sig < NSIG; sig++)
			(void)signal(sig, SIG_DFL);
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		/* Its own session: console job control is not the guest agent's. */
		setsid();
		/* The environment is init's: HOME, TERM, PATH, and EMBER_SIM under fcsim. */
		execv(s->path, argv);
		log_line("cannot run %s: %s", s->path, strerror(errno));
		_exit(127);
	}
	s->pid = pid;
	s->started_ms = now_ms();
	log_line("started %s (pid %d)", s->path, (int)pid);
}

static void service_exited(Service *s, int status, bool restart)
{
	uint64_t now = now_ms(), ran = now - s->started_ms;
	char how[64];

	if (WIFEXITED(status))
		snprintf(how, sizeof(how), "exited with status %d", WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		snprintf(how, sizeof(how), "killed by signal %d (%s)", WTERMSIG(status),
			 sigabbrev_np(WTERMSIG(status)) ?: "?");
	else
		snprintf(how, sizeof(how), "ended (status 0x%x)", (unsigned)status);
	s->pid = 0;
	if (!restart) {
		log_line("%s %s", s->path, how);
		return;
	}
	if (ran >= HEALTHY_MS)
		s->backoff_ms = BACKOFF_MIN_MS;
	log_line("%s %s after %u.%u s; restarting in %u ms", s->path, how, (unsigned)(ran / 1000),
		 (unsigned)(ran % 1000 / 100), (unsigned)s->backoff_ms);
	service_backoff(s, now);
}

/* Every child that has ended, the supervised one among them: orphans of the whole system are
 * ours to reap, or they stay zombies forever. */
static bool reap(Service *s, bool restart)
{
	for (;;) {
		int status;
		pid_t pid = waitpid(-1, &status, WNOHANG);

		if (pid < 0 && errno == EINTR)
			continue;
		if (pid < 0)
			return errno != ECHILD; /* false: no children left at all */
		if (pid == 0)
			return true;
		if (pid == s->pid)
			service_exited(s, status, restart);
	}
}

/* The next signal of `set`, waiting at most timeout_ms (< 0: forever); 0 on timeout. */
static int signal_wait(const sigset_t *set, int64_t timeout_ms)
{
	struct timespec ts = {.tv_sec = timeout_ms / 1000,
			      .tv_nsec = (long)(timeout_ms % 1000) * 1000000L};
	int sig = sigtimedwait(set, NULL, timeout_ms >= 0 ? &ts : NULL);

	return sig < 0 ? 0 : sig;
}

/* Until every process but us is gone, or the time is up. In a microVM every user process
 * descends from init, so no children left means none at all; kill(-1, 0) cannot tell, since
 * it also reaches the kernel's threads. Under fcsim there are no kernel threads, but
 * processes entered from outside are not our children and send no SIGCHLD: there kill(-1, 0)
 * is the test, looked at every 100 ms. */
static bool wait_all_gone(Service *s, const sigset_t *set, uint64_t timeout_ms)
{
	uint64_t deadline = now_ms() + timeout_ms;

	for (;;) {
		bool children = reap(s, false);
		uint64_t now = now_ms();

		if (!children && (!simulated || (kill(-1, 0) < 0 && errno == ESRCH)))
			return true;
		if (now >= deadline)
			return false;
		(void)signal_wait(set, deadline - now < 100 ? (int64_t)(deadline - now) : 100);
	}
}

static const char *signal_reason(int sig)
{
	switch (sig) {
	case SIGINT:
		return "SIGINT (Ctrl-Alt-Del)";
	case SIGTERM:
		return "SIGTERM";
	case SIGUSR1:
		return "SIGUSR1 (halt)";
	case SIGUSR2:
		return "SIGUSR2 (poweroff)";
	case SIGPWR:
		return "SIGPWR";
	default:
		return "a signal";
	}
}

/* The init of the machine, not of a pid namespace: the kernel's thread kthreadd is pid 2. */
static bool machine_init(void)
{
	char buf[64] = "";
	int fd = open("/proc/2/stat", O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return false;
	(void)!read(fd, buf, sizeof(buf) - 1);
	close(fd);
	return strncmp(buf, "2 (kthreadd) ", 13) == 0;
}

/* Every request (Ctrl-Alt-Del, busybox halt, poweroff or reboot) ends the same way: everything
 * stopped, then the VMM told to exit. A VMM never reboots its guest; the host decides what runs
 * next. */
static _noreturn_ void shutdown_system(Service *s, const sigset_t *set, int sig)
{
	log_line("%s: stopping every process and powering off", signal_reason(sig));
	if (s->pid > 0)
		log_line("stopping %s (pid %d)", s->path, (int)s->pid);
	/* kill(-1) from PID 1 reaches every process but init. SIGCONT: a stopped process cannot
	 * act on SIGTERM. */
	(void)kill(-1, SIGTERM);
	(void)kill(-1, SIGCONT);
	if (!wait_all_gone(s, set, STOP_TERM_MS)) {
		log_line("processes left %u s after SIGTERM: sending SIGKILL",
			 (unsigned)(STOP_TERM_MS / 1000));
		(void)kill(-1, SIGKILL);
		if (!wait_all_gone(s, set, STOP_KILL_MS))
			log_line("processes left after SIGKILL; powering off anyway");
	}
	sync();
	/* A journal that needs no recovery at the next boot of this disk (a snapshot's base).
	 * Only as the machine's own init: a remount changes the file system everywhere, and PID
	 * 1 of a pid namespace (the tests) may sit on one that is not its own. */
	if (!simulated && machine_init() &&
	    mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL) < 0)
		log_line("cannot remount / read-only: %s", strerror(errno));
	if (simulated) {
		/* PID 1 of a pid namespace cannot power a machine off: fcsim reads init's exit
		 * as the guest's power-off and exits, as Firecracker does. */
		log_line("power off (simulated: init exits)");
		exit(0);
	}
	/* Firecracker on x86_64 has no power-off device: reboot(RB_POWER_OFF) halts the guest
	 * and leaves the VMM running (Firecracker's FAQ, issue #1601), while a reset, which
	 * reboot=k turns into a keyboard controller reset, ends it. On aarch64 both end it
	 * (PSCI SYSTEM_RESET / SYSTEM_OFF). So the machine is powered off with a reboot. */
	log_line("power off (a reset: the VMM exits)");
	(void)reboot(RB_AUTOBOOT);
	log_line("cannot reset: %s; trying a power-off", strerror(errno));
	(void)reboot(RB_POWER_OFF);
	log_line("cannot power off either: %s; halting here", strerror(errno));
	for (;;)
		pause();
}

/* The signals init acts on are blocked and taken with sigtimedwait(): no handler runs at an
 * awkward moment, and a blocked signal is queued even for the init of a pid namespace whose
 * action is SIG_DFL (the kernel's sig_ignored() looks at the mask first), which is how fcsim's
 * SendCtrlAltDel, sent from the parent namespace, reaches us. */
static void signals_setup(sigset_t *ret)
{
	static const int sigs[] = {SIGCHLD, SIGINT, SIGTERM, SIGUSR1, SIGUSR2, SIGPWR};

	sigemptyset(ret);
	for (size_t i = 0; i < ELEMENTSOF(sigs); i++) {
		sigaddset(ret, sigs[i]);
		/* Whoever exec'd us may have left SIGCHLD ignored: children would then be reaped
		 * by the kernel without a signal, and ember-guest never restarted. */
		(void)signal(sigs[i], SIG_DFL);
	}
	(void)sigprocmask(SIG_BLOCK, ret, NULL);
}

static _noreturn_ void supervise(Service *s, const sigset_t *set)
{
	for (;;) {
		int64_t timeout = -1;
		int sig;

		if (s->pid == 0) {
			uint64_t now = now_ms();
			if (now >= s->restart_at_ms) {
				service_start(s);
				continue;
			}
			timeout = (int64_t)(s->restart_at_ms - now);
		}
		sig = signal_wait(set, timeout);
		if (sig == SIGCHLD)
			(void)reap(s, true);
		else if (sig > 0)
			shutdown_system(s, set, sig);
	}
}

int main(int argc, char *argv[])
{
	_cleanup_free_ char *cmdline = NULL, *guest = NULL, *ip_value = NULL;
	InitIpConfig ip = {};
	const char *sim;
	bool have_ip = false;
	Service service = {.path = GUEST_PATH_DEFAULT, .backoff_ms = BACKOFF_MIN_MS};
	sigset_t set;
	int r;

	(void)argc;
	(void)argv;
	/* kill(-1) at shutdown would end every process of a host: only ever as PID 1. */
	if (getpid() != 1) {
		fprintf(stderr, "ember-init: not PID 1; it is the init of an ember microVM and "
				"runs only there\n");
		return 1;
	}
	sim = getenv("EMBER_SIM");
	simulated = sim && strcmp(sim, "1") == 0;
	umask(022);
	(void)!chdir("/");
	/* The kernel gives init HOME and TERM only. */
	(void)setenv("PATH", PATH_DEFAULT, 0);
	signals_setup(&set);
	stdio_setup();
	log_line("starting (version %s)%s", EMBER_VERSION,
		 simulated ? " (EMBER_SIM=1: simulated microVM, boot arguments not read)" : "");
	/* Ctrl-Alt-Del (Firecracker's SendCtrlAltDel) then comes to us as SIGINT instead of
	 * an immediate reboot. In a pid namespace the call fails and the signal is what fcsim
	 * sends anyway. */
	if (!simulated && reboot(RB_DISABLE_CAD) < 0)
		log_line("cannot route Ctrl-Alt-Del to init: %s", strerror(errno));

	mounts_setup();
	stdio_setup();

	cmdline = cmdline_read();
	if (cmdline) {
		r = init_cmdline_get(cmdline, "ip", &ip_value);
		if (r > 0) {
			r = init_ip_parse(ip_value, &ip);
			if (r < 0)
				log_line("ip=%s: cannot parse it; network not configured",
					 ip_value);
			have_ip = r > 0;
		}
		r = init_cmdline_get(cmdline, "ember.guest", &guest);
		if (r > 0 && guest[0] == '/')
			service.path = guest;
		else if (r > 0)
			log_line("ember.guest=%s: not an absolute path; using %s", guest,
				 service.path);
	}
	hostname_setup(&ip);
	network_setup(&ip, have_ip);

	supervise(&service, &set);
}
