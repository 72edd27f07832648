/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The guest as a container: init from the root drive as PID 1 of new pid, mount, uts, ipc and
 * network namespaces, chrooted into the drive, with the console on a pty whose output is the
 * "serial port" (fcsim's stdout, and serial_out_path when configured). What a kernel would do
 * before init is done here: mount the root drive (read-only when the drive is), a minimal
 * /dev, the hostname and eth0 from the kernel-style ip= argument, and --boot-delay-ms of
 * "kernel boot".
 *
 * Networking follows Firecracker: the TAP named by host_dev_name (in fcsim's own namespace) is
 * relayed frame by frame to a TAP eth<N> inside the guest's namespace.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "common/macro.h"
#include "fcsim.h"
#include "netns/netns.h"
#include "storage/storage.h"

#define STACK_SIZE ((size_t)256 * 1024)
#define GUEST_ROOT "/tmp" /* where the child mounts the root drive, in its namespace */

struct Guest {
	Vm *vm;
	pid_t pid;
	int root_loop; /* auto-clearing loop device of an image root drive, or -1 */
	int console;   /* pty master */
	int serial_out;
	pthread_t console_thread, waiter_thread;
	bool console_running, waiter_running;
	volatile bool exited, stopping;
};

/* Everything the child needs, prepared before clone(): the child only makes system calls. */
typedef struct ChildArgs {
	int sync_fd;
	int sync_w; /* the parent's end: closed in the child, so a dead parent reads as EOF */
	const char *device;
	bool read_only;
	const char *console_path;
	const char *hostname;
	const char *init;
	int boot_delay_ms;
	char *const *env;
} ChildArgs;

static void child_say(const char *console, const char *msg)
{
	int fd = open(console, O_WRONLY | O_NOCTTY | O_CLOEXEC);
	if (fd >= 0) {
		(void)!write(fd, msg, strlen(msg));
		close(fd);
	}
}

static void mknod_dev(const char *dir, const char *name, mode_t mode, unsigned maj, unsigned mn)
{
	char p[256];
	snprintf(p, sizeof(p), "%s/%s", dir, name);
	(void)mknod(p, S_IFCHR | mode, makedev(maj, mn));
}

static int child_main(void *arg)
{
	const ChildArgs *a = arg;
	static const char *const fstypes[] = {"ext4",  "ext3",     "ext2", "xfs",
					      "btrfs", "squashfs", "vfat"};
	char dev[256], msg[512], buf[1];
	int console, r = -1;

	/* A Firecracker that is killed takes its guest with it: so does fcsim. The guest is the
	 * init of its pid namespace, so SIGKILL ends everything in it. Set before the sync read:
	 * a parent that died before this point is seen there as EOF. The signal follows the
	 * cloning thread, libmicrohttpd's polling thread, which lives as long as the process. */
	(void)prctl(PR_SET_PDEATHSIG, SIGKILL);
	close(a->sync_w);
	/* Wait until the parent has set up the network side. */
	if (read(a->sync_fd, buf, 1) != 1)
		_exit(126);
	close(a->sync_fd);

	/* Fails with EINVAL where "/" is no mount point (fcsim run in a plain chroot): say so,
	 * or the guest would just end with status 126. */
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) {
		snprintf(msg, sizeof(msg),
			 "fcsim: cannot make the guest's mounts private: %s (is / a mount "
			 "point?)\r\n",
			 strerror(errno));
		child_say(a->console_path, msg);
		_exit(126);
	}
	/* The root goes over /tmp, in this mount namespace only: no directory of the host's
	 * is needed for it, so nothing is left behind when fcsim is killed (SIGKILL, as the
	 * agent's crash handling does, gives no chance to remove one). The device's path is
	 * looked up before the mount covers /tmp. */
	for (size_t i = 0; i < ELEMENTSOF(fstypes) && r < 0; i++)
		r = mount(a->device, GUEST_ROOT, fstypes[i], a->read_only ? MS_RDONLY : 0, NULL);
	if (r < 0) {
		snprintf(msg, sizeof(msg),
			 "VFS: Cannot open root device \"%s\" or unknown-block: error %d\r\n"
			 "Kernel panic - not syncing: VFS: Unable to mount root fs\r\n",
			 a->device, errno);
		child_say(a->console_path, msg);
		_exit(125);
	}
	/* A minimal /dev (a tmpfs, never the host's devtmpfs): the guest's init may mount its
	 * own over it. The console is the pty fcsim reads. */
	snprintf(dev, sizeof(dev), "%s/dev", GUEST_ROOT);
	if (access(dev, F_OK) == 0 &&
	    mount("devtmpfs-sim", dev, "tmpfs", MS_NOSUID, "mode=0755") == 0) {
		mknod_dev(dev, "null", 0666, 1, 3);
		mknod_dev(dev, "zero", 0666, 1, 5);
		mknod_dev(dev, "full", 0666, 1, 7);
		mknod_dev(dev, "random", 0666, 1, 8);
		mknod_dev(dev, "urandom", 0666, 1, 9);
		mknod_dev(dev, "tty", 0666, 5, 0);
		char p[300];
		snprintf(p, sizeof(p), "%s/pts", dev);
		(void)mkdir(p, 0755);
		snprintf(p, sizeof(p), "%s/shm", dev);
		(void)mkdir(p, 01777);
		snprintf(p, sizeof(p), "%s/ptmx", dev);
		(void)!symlink("pts/ptmx", p);
		snprintf(p, sizeof(p), "%s/console", dev);
		int fd = open(p, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
		if (fd >= 0) {
			close(fd);
			(void)mount(a->console_path, p, NULL, MS_BIND, NULL);
		}
	}
	(void)!sethostname(a->hostname, strlen(a->hostname));

	/* The console must be opened before the chroot: its path is the host's devpts. */
	console = open(a->console_path, O_RDWR | O_CLOEXEC);
	if (chdir(GUEST_ROOT) < 0 || chroot(".") < 0 || chdir("/") < 0)
		_exit(124);
	setsid();
	if (console >= 0) {
		(void)ioctl(console, TIOCSCTTY, 0);
		dup2(console, 0);
		dup2(console, 1);
		dup2(console, 2);
	}
	if (a->boot_delay_ms > 0) {
		struct timespec ts = {.tv_sec = a->boot_delay_ms / 1000,
				      .tv_nsec = (long)(a->boot_delay_ms % 1000) * 1000000L};
		nanosleep(&ts, NULL);
	}
	char *const argv[] = {(char *)a->init, NULL};
	execve(a->init, argv, a->env);
	snprintf(msg, sizeof(msg),
		 "Kernel panic - not syncing: Requested init %s failed (error %d).\r\n", a->init,
		 -errno);
	(void)!write(2, msg, strlen(msg));
	_exit(127);
}

static void *console_main(void *arg)
{
	Guest *g = arg;
	char buf[4096];

	prctl(PR_SET_NAME, "fc_serial");
	for (;;) {
		ssize_t n = read(g->console, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EIO) {
			/* No slave open: not yet (the child opens it before exec) or not any more
			 * (the guest is gone). */
			if (g->exited || g->stopping)
				break;
			struct timespec ts = {.tv_nsec = 10 * 1000000L};
			nanosleep(&ts, NULL);
			continue;
		}
		if (n <= 0)
			break;
		(void)!write(STDOUT_FILENO, buf, (size_t)n);
		if (g->serial_out >= 0)
			(void)!write(g->serial_out, buf, (size_t)n);
	}
	return NULL;
}

static void *waiter_main(void *arg)
{
	Guest *g = arg;
	int status;

	prctl(PR_SET_NAME, "fc_vmm");
	while (waitpid(g->pid, &status, 0) < 0 && errno == EINTR)
		;
	g->exited = true;
	/* A guest that powered off ends the VMM, as with Firecracker. */
	if (WIFEXITED(status))
		FCLOG(FC_INFO, "Vmm is stopping: guest init exited with status %d",
		      WEXITSTATUS(status));
	else
		FCLOG(FC_INFO, "Vmm is stopping: guest init killed by signal %d", WTERMSIG(status));
	g->vm->exit_code = 0;
	g->vm->exit_requested = true;
	return NULL;
}

static void *relay_main(void *arg)
{
	Iface *f = arg;
	prctl(PR_SET_NAME, "fc_net");
	(void)netns_relay(f->host_tap, f->guest_tap, &f->stop);
	return NULL;
}

/* ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>:... (the kernel's
 * nfsroot syntax). Fills what is given; returns false when there is no usable client IP. */
typedef struct IpArg {
	char cidr[32];
	char gateway[32];
	char hostname[65];
	char device[16];
} IpArg;

static int netmask_bits(const char *mask)
{
	unsigned a, b, c, d, bits = 0;
	if (sscanf(mask, "%u.%u.%u.%u", &a, &b, &c, &d) != 4)
		return -1;
	uint32_t m = (a << 24) | (b << 16) | (c << 8) | d;
	while (m & 0x80000000u) {
		bits++;
		m <<= 1;
	}
	return m ? -1 : (int)bits;
}

static bool parse_ip_arg(const char *value, IpArg *ret)
{
	char copy[256], *fields[10] = {}, *p;
	int n = 0;

	memset(ret, 0, sizeof(*ret));
	snprintf(copy, sizeof(copy), "%s", value);
	for (p = copy; n < 10; n++) {
		fields[n] = p;
		p = strchr(p, ':');
		if (!p) {
			n++;
			break;
		}
		*p++ = 0;
	}
	if (n < 1 || !fields[0][0])
		return false;
	int bits = n > 3 && fields[3][0] ? netmask_bits(fields[3]) : 24;
	if (bits < 0)
		bits = 24;
	snprintf(ret->cidr, sizeof(ret->cidr), "%s/%d", fields[0], bits);
	if (n > 2)
		snprintf(ret->gateway, sizeof(ret->gateway), "%s", fields[2]);
	if (n > 4)
		snprintf(ret->hostname, sizeof(ret->hostname), "%s", fields[4]);
	if (n > 5)
		snprintf(ret->device, sizeof(ret->device), "%s", fields[5]);
	return true;
}

/* The guest side of network interface i: TAP eth<i> in the guest's namespace, configured
 * from ip= when it names it (or names no device and i == 0). */
static int guest_net(Guest *g, size_t i, const IpArg *ip, bool have_ip, char **ret_error)
{
	Iface *f = &g->vm->ifaces[i];
	char ns[64], name[16];
	int saved, r = 0;

	snprintf(ns, sizeof(ns), "/proc/%d/ns/net", (int)g->pid);
	snprintf(name, sizeof(name), "eth%u", (unsigned)(i % MAX_IFACES));
	saved = netns_enter(ns);
	if (saved < 0)
		return saved;
	f->guest_tap = netns_tap_open(name);
	if (f->guest_tap < 0)
		r = f->guest_tap;
	else if (have_ip && (strcmp(ip->device, name) == 0 || (!ip->device[0] && i == 0)))
		r = netns_iface_setup(name, ip->cidr, ip->gateway[0] ? ip->gateway : NULL,
				      ret_error);
	int k = netns_leave(saved);
	if (r < 0)
		return r;
	if (k < 0)
		return k;
	f->stop = false;
	if (pthread_create(&f->relay, NULL, relay_main, f) != 0)
		return -EAGAIN;
	f->relay_running = true;
	return 0;
}

static char *boot_arg(const char *args, const char *key)
{
	size_t n = strlen(key);
	for (const char *p = args; p && *p;) {
		while (*p == ' ')
			p++;
		const char *end = strchr(p, ' ');
		size_t len = end ? (size_t)(end - p) : strlen(p);
		if (len > n && strncmp(p, key, n) == 0 && p[n] == '=')
			return strndup(p + n + 1, len - n - 1);
		p += len;
	}
	return NULL;
}

int guest_start(Vm *vm, char **ret_error)
{
	_cleanup_free_ char *root_path = NULL, *device = NULL, *init = NULL, *ip = NULL;
	_cleanup_free_ char *stack = NULL;
	_cleanup_close_ int sync_r = -EBADF, sync_w = -EBADF;
	const char *args = NULL;
	Drive *root = NULL;
	char console_path[64];
	IpArg iparg;
	bool have_ip;
	Guest *g;
	int r;

	for (size_t i = 0; i < vm->n_drives; i++)
		if (vm->drives[i].root)
			root = &vm->drives[i];
	if (!root)
		return -ENODEV;
	if (vm->boot_source) {
		json_object *v;
		if (json_object_object_get_ex(vm->boot_source, "boot_args", &v))
			args = json_object_get_string(v);
	}
	init = boot_arg(args, "init");
	if (!init && !(init = strdup("/sbin/init")))
		return -ENOMEM;
	ip = boot_arg(args, "ip");
	have_ip = ip && parse_ip_arg(ip, &iparg);
	if (!have_ip)
		memset(&iparg, 0, sizeof(iparg));

	g = calloc(1, sizeof(*g));
	if (!g)
		return -ENOMEM;
	g->vm = vm;
	g->root_loop = -1;
	g->console = -1;
	g->serial_out = -1;

	root_path = fc_abspath(root->path);
	struct stat st;
	if (!root_path || stat(root_path, &st) < 0) {
		r = -errno;
		goto fail;
	}
	if (S_ISBLK(st.st_mode)) {
		device = strdup(root_path);
	} else {
		/* An image file, as Firecracker's virtio-block takes it: we need a block device to
		 * mount it, an auto-clearing loop that goes when we do. */
		g->root_loop = storage_loop_attach(
			root_path, root->read_only ? STORAGE_LOOP_READ_ONLY : 0, &device);
		if (g->root_loop < 0) {
			r = g->root_loop;
			(void)!asprintf(ret_error, "cannot attach the root drive %s: %s", root_path,
					strerror(-r));
			goto fail;
		}
	}
	/* The console: a pty, its output is the serial port. */
	g->console = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (g->console < 0 || grantpt(g->console) < 0 || unlockpt(g->console) < 0 ||
	    ptsname_r(g->console, console_path, sizeof(console_path)) != 0) {
		r = -errno;
		goto fail;
	}
	{
		struct termios t;
		/* Raw: what the guest writes reaches the log unchanged (no \n -> \r\n). */
		if (tcgetattr(g->console, &t) == 0) {
			cfmakeraw(&t);
			tcsetattr(g->console, TCSANOW, &t);
		}
	}
	if (vm->serial) {
		json_object *v;
		if (json_object_object_get_ex(vm->serial, "serial_out_path", &v))
			g->serial_out =
				open(json_object_get_string(v),
				     O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NONBLOCK, 0644);
	}

	int p[2];
	if (pipe2(p, O_CLOEXEC) < 0) {
		r = -errno;
		goto fail;
	}
	sync_r = p[0];
	sync_w = p[1];
	static char *env[] = {(char *)"HOME=/", (char *)"TERM=linux",
			      (char *)"PATH=/sbin:/usr/sbin:/bin:/usr/bin", (char *)"EMBER_SIM=1",
			      NULL};
	ChildArgs a = {
		.sync_fd = sync_r,
		.sync_w = sync_w,
		.device = device,
		.read_only = root->read_only,
		.console_path = console_path,
		.hostname = iparg.hostname[0] ? iparg.hostname : "fcsim",
		.init = init,
		.boot_delay_ms = vm->opt.boot_delay_ms,
		.env = env,
	};
	stack = malloc(STACK_SIZE);
	if (!stack) {
		r = -ENOMEM;
		goto fail;
	}
	g->pid = clone(child_main, stack + STACK_SIZE,
		       CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET |
			       SIGCHLD,
		       &a);
	if (g->pid < 0) {
		r = -errno;
		g->pid = 0;
		goto fail;
	}

	for (size_t i = 0; i < vm->n_ifaces; i++) {
		r = guest_net(g, i, &iparg, have_ip, ret_error);
		if (r < 0)
			goto fail;
	}
	if (vm->vsock) {
		r = vsock_attach_guest(vm->vsock, g->pid, ret_error);
		if (r < 0)
			goto fail;
	}
	if (write(sync_w, "g", 1) != 1) {
		r = -EIO;
		goto fail;
	}
	if (pthread_create(&g->console_thread, NULL, console_main, g) == 0)
		g->console_running = true;
	if (pthread_create(&g->waiter_thread, NULL, waiter_main, g) != 0) {
		r = -EAGAIN;
		goto fail;
	}
	g->waiter_running = true;
	vm->guest = g;
	FCLOG(FC_INFO, "fcsim: guest started: init %s, pid %d, root %s%s", init, (int)g->pid,
	      device, root->read_only ? " (read-only)" : "");
	return 0;
fail:
	vm->guest = NULL;
	guest_stop(g);
	guest_free(g);
	return r;
}

pid_t guest_pid(const Guest *g)
{
	return g ? g->pid : 0;
}

/* Every process of the guest: the ones whose pid namespace is that of its init. */
static int signal_all(Guest *g, int sig, unsigned *ret_n)
{
	char p[64];
	struct stat ns;
	DIR *d;
	struct dirent *de;
	unsigned n = 0;

	snprintf(p, sizeof(p), "/proc/%d/ns/pid", (int)g->pid);
	if (stat(p, &ns) < 0)
		return -errno;
	d = opendir("/proc");
	if (!d)
		return -errno;
	while ((de = readdir(d))) {
		struct stat st;
		char q[300];
		if (de->d_name[0] < '0' || de->d_name[0] > '9')
			continue;
		snprintf(q, sizeof(q), "/proc/%s/ns/pid", de->d_name);
		if (stat(q, &st) == 0 && st.st_ino == ns.st_ino && st.st_dev == ns.st_dev &&
		    kill((pid_t)atoi(de->d_name), sig) == 0)
			n++;
	}
	closedir(d);
	*ret_n = n;
	return 0;
}

int guest_freeze(Guest *g, bool frozen)
{
	unsigned n = 0, prev = 0;
	int r;

	if (!g || g->exited)
		return -ESRCH;
	/* SIGSTOP is not ignorable, not even by the namespace's init when it comes from an
	 * ancestor namespace. A process forked meanwhile is caught by the next pass. */
	for (int pass = 0; pass < 10; pass++) {
		r = signal_all(g, frozen ? SIGSTOP : SIGCONT, &n);
		if (r < 0)
			return r;
		if (!frozen || (pass > 0 && n == prev))
			break;
		prev = n;
	}
	return 0;
}

void guest_stop(Guest *g)
{
	if (!g)
		return;
	if (g->pid > 0 && !g->exited) {
		/* Killing the namespace's init takes every guest process with it. */
		unsigned n = 0;
		(void)signal_all(g, SIGCONT, &n);
		kill(g->pid, SIGKILL);
	}
	if (g->waiter_running) {
		pthread_join(g->waiter_thread, NULL);
		g->waiter_running = false;
	} else if (g->pid > 0) {
		while (waitpid(g->pid, NULL, 0) < 0 && errno == EINTR)
			;
	}
	g->pid = 0;
	for (size_t i = 0; i < g->vm->n_ifaces; i++) {
		Iface *f = &g->vm->ifaces[i];
		if (f->relay_running) {
			f->stop = true;
			pthread_join(f->relay, NULL);
			f->relay_running = false;
		}
		f->guest_tap = safe_close(f->guest_tap);
	}
	if (g->console_running) {
		/* The slave side closed with the guest: read() ends with EIO. */
		g->stopping = true;
		pthread_join(g->console_thread, NULL);
		g->console_running = false;
	}
}

void guest_free(Guest *g)
{
	if (!g)
		return;
	safe_close(g->console);
	safe_close(g->serial_out);
	safe_close(g->root_loop); /* auto-clear: the loop goes once the mount is gone */
	free(g);
}
