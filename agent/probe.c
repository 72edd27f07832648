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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

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
			return -errno;
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

/* Runs `path --version` and returns its first line; the child is killed after timeout_ms. */
static int run_version(const char *path, int timeout_ms, char *buf, size_t size)
{
	posix_spawn_file_actions_t fa;
	int pipefd[2], status, r = 0;
	size_t len = 0;
	pid_t pid;
	char *argv[] = {(char *)path, (char *)"--version", NULL};
	char *envp[] = {NULL}; /* the version does not depend on our environment */

	if (!path || size == 0)
		return -EINVAL;
	if (pipe2(pipefd, O_CLOEXEC) < 0)
		return -errno;
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_adddup2(&fa, pipefd[1], STDOUT_FILENO);
	posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
	posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
	r = -posix_spawn(&pid, path, &fa, NULL, argv, envp);
	posix_spawn_file_actions_destroy(&fa);
	close(pipefd[1]);
	if (r < 0) {
		close(pipefd[0]);
		return r;
	}

	struct timespec start, now;
	clock_gettime(CLOCK_MONOTONIC, &start);
	for (;;) {
		clock_gettime(CLOCK_MONOTONIC, &now);
		long left = timeout_ms - ((now.tv_sec - start.tv_sec) * 1000 +
					  (now.tv_nsec - start.tv_nsec) / 1000000);
		if (left <= 0) {
			r = -ETIMEDOUT;
			break;
		}
		struct pollfd p = {.fd = pipefd[0], .events = POLLIN};
		if (poll(&p, 1, (int)left) <= 0)
			continue;
		ssize_t k = read(pipefd[0], buf + len, size - 1 - len);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			break;
		len += (size_t)k;
		if (len >= size - 1 || memchr(buf, '\n', len))
			break;
	}
	close(pipefd[0]);
	if (r < 0)
		kill(pid, SIGKILL);
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	buf[len] = 0;
	buf[strcspn(buf, "\n")] = 0;
	if (r == 0 && !(WIFEXITED(status) && WEXITSTATUS(status) == 0))
		r = -EPROTO;
	return r;
}

void probe_firecracker(const char *bin, ProbeResult *ret)
{
	_cleanup_free_ char *path = NULL;
	char line[128] = "";
	int r;

	r = find_program(bin, &path);
	if (r < 0) {
		if (strchr(bin, '/'))
			set(ret, false, NULL, "%s: %s", bin, strerror(-r));
		else
			set(ret, false, NULL,
			    "%s not found in PATH (set [agent] firecracker_bin to its path, or to "
			    "fcsim on hosts without KVM)",
			    bin);
		return;
	}
	r = run_version(path, 2000, line, sizeof(line));
	if (r < 0) {
		set(ret, false, NULL, "%s --version failed: %s", path,
		    r == -ETIMEDOUT ? "no answer within 2 s"
		    : r == -EPROTO  ? "non-zero exit"
				    : strerror(-r));
		return;
	}
	/* "Firecracker v1.16.1": the version is the word starting with 'v' and a digit. */
	const char *v = NULL;
	for (const char *p = line; *p; p++)
		if ((p == line || p[-1] == ' ') && p[0] == 'v' && p[1] >= '0' && p[1] <= '9') {
			v = p + 1;
			break;
		}
	if (!v) {
		set(ret, false, NULL, "%s --version printed \"%s\", not a Firecracker version",
		    path, line);
		return;
	}
	char version[64];
	snprintf(version, sizeof(version), "%.*s", (int)strcspn(v, " \t"), v);
	set(ret, true, version, "%s: %s", path, line);
}
