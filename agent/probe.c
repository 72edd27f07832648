/* SPDX-License-Identifier: Apache-2.0 */
#include "probe.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/dm-ioctl.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/error.h"
#include "common/macro.h"

static void set(ProbeResult *r, bool available, const char *version, const char *format, ...)
	_printf_(4, 5);
static void set(ProbeResult *r, bool available, const char *version, const char *format, ...)
{
	va_list ap;

	r->available = available;
	snprintf(r->version, sizeof(r->version), "%s", version ?: "");
	va_start(ap, format);
	vsnprintf(r->reason, sizeof(r->reason), format, ap);
	va_end(ap);
}

void probe_kvm(ProbeResult *ret)
{
	_cleanup_close_ int fd = -EBADF;
	char v[16];
	int api;

	fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		if (errno == ENOENT)
			set(ret, false, NULL,
			    "/dev/kvm does not exist: no hardware virtualization, or the kvm_intel/"
			    "kvm_amd module is not loaded");
		else
			set(ret, false, NULL, "cannot open /dev/kvm: %s", strerror(errno));
		return;
	}
	api = ioctl(fd, KVM_GET_API_VERSION, 0);
	if (api < 0) {
		set(ret, false, NULL, "KVM_GET_API_VERSION failed: %s", strerror(errno));
		return;
	}
	snprintf(v, sizeof(v), "%d", api);
	if (api != KVM_API_VERSION) {
		set(ret, false, v, "KVM API version %d, Firecracker needs %d", api,
		    KVM_API_VERSION);
		return;
	}
	/* Creating a VM proves more than opening the device (e.g. nested setups that refuse). */
	_cleanup_close_ int vm = ioctl(fd, KVM_CREATE_VM, 0);
	if (vm < 0) {
		set(ret, false, v, "KVM_CREATE_VM failed: %s", strerror(errno));
		return;
	}
	set(ret, true, v, "/dev/kvm usable (API version %d, a VM can be created)", api);
}

void probe_device_mapper(ProbeResult *ret)
{
	_cleanup_close_ int fd = -EBADF;
	struct dm_ioctl io = {
		.version = {DM_VERSION_MAJOR, 0, 0},
		.data_size = sizeof(io),
	};
	char v[32];

	fd = open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		if (errno == ENOENT)
			set(ret, false, NULL,
			    "/dev/mapper/control does not exist: the kernel has no device-mapper "
			    "(try modprobe dm-mod dm-snapshot)");
		else
			set(ret, false, NULL, "cannot open /dev/mapper/control: %s",
			    strerror(errno));
		return;
	}
	if (ioctl(fd, DM_VERSION, &io) < 0) {
		set(ret, false, NULL, "DM_VERSION ioctl failed: %s", strerror(errno));
		return;
	}
	snprintf(v, sizeof(v), "%u.%u.%u", io.version[0], io.version[1], io.version[2]);
	set(ret, true, v, "device-mapper driver %s", v);
}

void probe_userfaultfd(ProbeResult *ret)
{
	struct uffdio_api api = {.api = UFFD_API};
	_cleanup_close_ int fd = -EBADF;
	char v[32];

	/* Firecracker registers guest memory it owns, so user-mode-only faults are enough;
	 * without the flag an unprivileged caller needs vm.unprivileged_userfaultfd=1. */
	fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
	if (fd < 0 && errno == EINVAL)
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) {
		if (errno == ENOSYS)
			set(ret, false, NULL,
			    "the kernel has no userfaultfd (CONFIG_USERFAULTFD): snapshots can "
			    "only "
			    "be restored with the File memory backend");
		else if (errno == EPERM)
			set(ret, false, NULL,
			    "userfaultfd not permitted: run as root or set "
			    "vm.unprivileged_userfaultfd=1");
		else
			set(ret, false, NULL, "userfaultfd() failed: %s", strerror(errno));
		return;
	}
	if (ioctl(fd, UFFDIO_API, &api) < 0) {
		set(ret, false, NULL, "UFFDIO_API failed: %s", strerror(errno));
		return;
	}
	snprintf(v, sizeof(v), "0x%llx", (unsigned long long)api.api);
	set(ret, true, v, "userfaultfd usable (UFFD API 0x%llx, features 0x%llx)",
	    (unsigned long long)api.api, (unsigned long long)api.features);
}

int find_program(const char *name, char **ret_path)
{
	_cleanup_free_ char *path_env = NULL;
	const char *env;
	char *save = NULL;

	if (strchr(name, '/')) {
		if (access(name, X_OK) < 0)
			return negative_errno();
		*ret_path = strdup(name);
		return *ret_path ? 0 : -ENOMEM;
	}
	env = getenv("PATH");
	path_env = strdup(env && *env ? env : "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin");
	if (!path_env)
		return -ENOMEM;
	for (char *dir = strtok_r(path_env, ":", &save); dir; dir = strtok_r(NULL, ":", &save)) {
		char *p;
		if (asprintf(&p, "%s/%s", dir, name) < 0)
			return -ENOMEM;
		if (access(p, X_OK) == 0) {
			*ret_path = p;
			return 0;
		}
		free(p);
	}
	return -ENOENT;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Reads what is there without blocking (fd is O_NONBLOCK), a bounded number of times: a
 * child that writes without end cannot keep us here. Keeps the first size-1 bytes. */
static void read_some(int fd, char *buf, size_t size, size_t *len, bool *eof)
{
	char tmp[4096];

	for (int i = 0; i < 16; i++) {
		ssize_t k = read(fd, tmp, sizeof(tmp));
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0) {
			*eof = k == 0 || errno != EAGAIN;
			return;
		}
		size_t keep = (size_t)k < size - 1 - *len ? (size_t)k : size - 1 - *len;
		memcpy(buf + *len, tmp, keep);
		*len += keep;
	}
}

/* Runs `path --version` and gives the first line it printed. Output and exit share one
 * deadline: a binary that prints a line and then hangs, or never prints, is killed with
 * everything it started (its own process group), and reaped. */
static int run_version(const char *path, int timeout_ms, char **ret_line, char **ret_error)
{
	_cleanup_close_ int rd = -EBADF, pidfd = -EBADF;
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t attr;
	sigset_t all, none;
	char buf[256];
	size_t len = 0;
	bool eof = false, ended = false;
	int pipefd[2], status = 0, r;
	pid_t pid;
	char *argv[] = {(char *)path, (char *)"--version", NULL};
	char *envp[] = {NULL}; /* the version does not depend on our environment */

	if (pipe2(pipefd, O_CLOEXEC) < 0)
		return error_set(ret_error, -errno, "pipe: %m");
	rd = pipefd[0];
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_adddup2(&fa, pipefd[1], STDOUT_FILENO);
	posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
	posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
	/* Not what emberd has: it ignores SIGPIPE and may block signals; a probed binary gets
	 * the defaults, as a VMM does. */
	sigfillset(&all);
	sigemptyset(&none);
	posix_spawnattr_init(&attr);
	posix_spawnattr_setsigdefault(&attr, &all);
	posix_spawnattr_setsigmask(&attr, &none);
	posix_spawnattr_setpgroup(&attr, 0);
	posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK |
						POSIX_SPAWN_SETPGROUP);
	r = -posix_spawn(&pid, path, &fa, &attr, argv, envp);
	posix_spawnattr_destroy(&attr);
	posix_spawn_file_actions_destroy(&fa);
	close(pipefd[1]);
	if (r < 0)
		return error_set(ret_error, r, "cannot run %s --version: %m", path);

	/* Our child, not reaped yet: the pid stays its own until waitpid(). */
	pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	r = pidfd < 0 ? -errno : 0;
	if (r == 0 && fcntl(rd, F_SETFL, O_NONBLOCK) < 0)
		r = -errno;
	int64_t deadline = now_ms() + timeout_ms;
	while (r == 0 && !ended) {
		int64_t left = deadline - now_ms();
		if (left <= 0) {
			r = -ETIMEDOUT;
			break;
		}
		struct pollfd p[2] = {{.fd = pidfd, .events = POLLIN},
				      {.fd = eof ? -1 : rd, .events = POLLIN}};
		if (poll(p, 2, (int)left) < 0) {
			if (errno != EINTR)
				r = -errno;
			continue;
		}
		if (p[1].revents)
			read_some(rd, buf, sizeof(buf), &len, &eof);
		if (p[0].revents & POLLIN) {
			/* What it wrote before it exited; a child it left behind may keep the
			 * pipe open, so no waiting for the end of the output. */
			if (!eof)
				read_some(rd, buf, sizeof(buf), &len, &eof);
			ended = true;
		}
	}
	if (!ended) {
		(void)kill(-pid, SIGKILL);
		(void)kill(pid, SIGKILL);
	}
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (r == -ETIMEDOUT)
		return error_set(ret_error, r, "%s --version did not answer within %g s", path,
				 timeout_ms / 1000.0);
	if (r < 0)
		return error_set(ret_error, r, "%s --version: %m", path);
	if (WIFSIGNALED(status))
		return error_set(ret_error, -EPROTO, "%s --version failed: killed by signal %d",
				 path, WTERMSIG(status));
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		return error_set(ret_error, -EPROTO, "%s --version failed: non-zero exit (%d)",
				 path, WEXITSTATUS(status));
	buf[len] = 0;
	buf[strcspn(buf, "\n")] = 0;
	char *line = strdup(buf);
	if (!line)
		return -ENOMEM;
	*ret_line = line;
	return 0;
}

/* Finds bin, runs it and takes its version apart; the path and the first line it printed too,
 * for probe_firecracker's reason. */
static int firecracker_version(const char *bin, int timeout_ms, char **ret_path, char **ret_line,
			       char **ret_version, char **ret_error)
{
	_cleanup_free_ char *path = NULL, *line = NULL;
	const char *v = NULL;
	int r;

	r = find_program(bin, &path);
	if (r >= 0 && !path)
		r = -ENOMEM;
	if (r < 0) {
		if (strchr(bin, '/'))
			return error_set(ret_error, r, "%s: %m", bin);
		return error_set(ret_error, r,
				 "%s not found in PATH (set [vmm] firecracker_bin to its path)",
				 bin);
	}
	r = run_version(path, timeout_ms, &line, ret_error);
	if (r >= 0 && !line)
		r = -ENOMEM;
	if (r < 0)
		return r;
	/* "Firecracker v1.16.1": the version is the word starting with 'v' and a digit. */
	for (const char *p = line; *p; p++)
		if ((p == line || p[-1] == ' ') && p[0] == 'v' && p[1] >= '0' && p[1] <= '9') {
			v = p + 1;
			break;
		}
	if (!v)
		return error_set(ret_error, -EBADMSG,
				 "%s --version printed \"%s\", not a Firecracker version", path,
				 line);
	char *version = strndup(v, strcspn(v, " \t"));
	if (!version)
		return -ENOMEM;
	*ret_version = version;
	if (ret_path)
		*ret_path = TAKE_PTR(path);
	if (ret_line)
		*ret_line = TAKE_PTR(line);
	return 0;
}

int probe_firecracker_version(const char *binary, int timeout_ms, char **ret_version,
			      char **ret_error)
{
	if (!binary || timeout_ms <= 0)
		return error_set(ret_error, -EINVAL, "a binary and a positive timeout are needed");
	return firecracker_version(binary, timeout_ms, NULL, NULL, ret_version, ret_error);
}

void probe_firecracker(const char *bin, ProbeResult *ret)
{
	probe_firecracker_within(bin, PROBE_FIRECRACKER_TIMEOUT_MS, ret);
}

void probe_firecracker_within(const char *bin, int timeout_ms, ProbeResult *ret)
{
	_cleanup_free_ char *path = NULL, *line = NULL, *version = NULL, *error = NULL;
	int r;

	r = firecracker_version(bin, timeout_ms, &path, &line, &version, &error);
	if (r < 0) {
		set(ret, false, NULL, "%s", error ?: strerror(-r));
		return;
	}
	set(ret, true, version, "%s: %s", path, line);
}

static uint64_t read_u64_file(const char *path)
{
	_cleanup_fclose_ FILE *f = fopen(path, "re");
	unsigned long long v;

	return f && fscanf(f, "%llu", &v) == 1 ? v : 0;
}

void probe_memory(HostMemory *ret)
{
	_cleanup_fclose_ FILE *f = fopen("/proc/meminfo", "re");
	char line[256];
	unsigned long long kb;

#define HUGE_2M "/sys/kernel/mm/hugepages/hugepages-2048kB/"
	*ret = (HostMemory){};
	while (f && fgets(line, sizeof(line), f)) {
		if (sscanf(line, "MemTotal: %llu kB", &kb) == 1)
			ret->total = kb * 1024;
		else if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) {
			ret->available = kb * 1024;
			ret->available_known = true;
		}
	}
	uint64_t free = read_u64_file(HUGE_2M "free_hugepages"),
		 resv = read_u64_file(HUGE_2M "resv_hugepages");
	ret->huge_total = read_u64_file(HUGE_2M "nr_hugepages") << 21;
	ret->huge_free = free > resv ? (free - resv) << 21 : 0;
#undef HUGE_2M
}
