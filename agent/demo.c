/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The built-in `demo` template, so that a new node runs a sandbox at once (`make run`, then
 * CreateSandbox from "demo"): a busybox userland with ember-init and ember-guest, made by
 * ember-mkrootfs. Registered once, on the first start: a node whose operator deleted it does
 * not get it back (<state_dir>/demo-registered remembers).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/fileio.h"
#include "common/log.h"
#include "manager-internal.h"
#include "probe.h"

#define DEMO_ID             "demo"
#define MKROOTFS_TIMEOUT_MS 120000

/* The first of `candidates` (relative to emberd's own directory, or absolute) that exists. */
static char *find_near_self(const char *const *candidates)
{
	char self[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);

	if (n <= 0)
		return NULL;
	self[n] = 0;
	*strrchr(self, '/') = 0;
	for (const char *const *c = candidates; *c; c++) {
		char *p;
		if ((*c)[0] == '/' ? !(p = strdup(*c)) : asprintf(&p, "%s/%s", self, *c) < 0)
			return NULL;
		if (access(p, R_OK) == 0)
			return p;
		free(p);
	}
	return NULL;
}

static int run_mkrootfs(const char *mkrootfs, const char *image, const char *init,
			const char *guest)
{
	char *argv[] = {(char *)mkrootfs,  (char *)image, (char *)"--init",  (char *)init,
			(char *)"--guest", (char *)guest, (char *)"--force", NULL};
	posix_spawn_file_actions_t fa;
	posix_spawnattr_t attr;
	sigset_t none;
	pid_t pid;
	int status, r;

	/* Our signal mask (SIGTERM blocked for the main loop) must not reach the child. */
	sigemptyset(&none);
	posix_spawnattr_init(&attr);
	posix_spawnattr_setsigmask(&attr, &none);
	posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
	/* It prints the boot arguments on stdout: not for our log. Its errors go to ours. */
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
	r = posix_spawn(&pid, mkrootfs, &fa, &attr, argv, environ);
	posix_spawn_file_actions_destroy(&fa);
	posix_spawnattr_destroy(&attr);
	if (r != 0)
		return -r;
	for (uint64_t deadline = now_ms() + MKROOTFS_TIMEOUT_MS;;) {
		pid_t w = waitpid(pid, &status, WNOHANG);
		if (w == pid)
			break;
		if (w < 0 && errno != EINTR)
			return -errno;
		if (now_ms() > deadline) {
			kill(pid, SIGKILL);
			(void)waitpid(pid, &status, 0);
			return -ETIMEDOUT;
		}
		(void)poll(NULL, 0, 50);
	}
	return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -EPROTO;
}

void manager_demo_template(Manager *m)
{
	static const char *const init_paths[] = {"ember-init", "../lib/ember/guest/ember-init",
						 "/usr/lib/ember/guest/ember-init", NULL};
	static const char *const guest_paths[] = {"ember-guest", "../lib/ember/guest/ember-guest",
						  "/usr/lib/ember/guest/ember-guest", NULL};
	/* Installed; or the source tree's, seen from build/ or build/sanitize/. */
	static const char *const mkrootfs_paths[] = {"ember-mkrootfs", "../bin/ember-mkrootfs",
						     "../guest/mkrootfs", "../../guest/mkrootfs",
						     NULL};
	_cleanup_free_ char *marker = NULL, *dir = NULL, *image = NULL, *kernel = NULL;
	_cleanup_free_ char *init = NULL, *guest = NULL, *mkrootfs = NULL, *err = NULL;
	const Config *c = m->config;
	KvList labels = {};
	Template *t = NULL;
	int r;

	if (!c->demo_template)
		return;
	if (asprintf(&marker, "%s/demo-registered", c->state_dir) < 0 ||
	    asprintf(&dir, "%s/demo-build", c->state_dir) < 0 ||
	    asprintf(&image, "%s/rootfs.ext4", dir) < 0)
		return;
	if (access(marker, F_OK) == 0)
		return;
	pthread_mutex_lock(&m->lock);
	bool exists = manager_template_find_locked(m, DEMO_ID) != NULL;
	pthread_mutex_unlock(&m->lock);
	if (exists)
		return;

	if (c->demo_kernel[0]) {
		kernel = strdup(c->demo_kernel);
	} else if (m->vmm.kind == VMM_FCSIM) {
		/* fcsim runs the rootfs as a container and never reads the kernel. */
		if (asprintf(&kernel, "%s/vmlinux", dir) < 0)
			return;
	} else {
		log_notice(
			"demo template skipped: Firecracker needs a guest kernel; set [templates] "
			"demo_kernel to a vmlinux to get it");
		return;
	}
	init = find_near_self(init_paths);
	guest = find_near_self(guest_paths);
	mkrootfs = find_near_self(mkrootfs_paths);
	if (!init || !guest || !mkrootfs) {
		log_notice("demo template skipped: %s not found next to emberd or installed",
			   !init    ? "ember-init"
			   : !guest ? "ember-guest"
				    : "ember-mkrootfs");
		return;
	}
	(void)rm_rf(dir);
	r = mkdir_p(dir, 0700);
	if (r >= 0 && !c->demo_kernel[0]) {
		static const char placeholder[] = "not a kernel: fcsim does not boot one\n";
		r = write_file_atomic(kernel, placeholder, sizeof(placeholder) - 1, 0644);
	}
	if (r >= 0)
		r = run_mkrootfs(mkrootfs, image, init, guest);
	if (r < 0) {
		log_warning_errno(r, "demo template skipped: building its rootfs with %s failed",
				  mkrootfs);
		(void)rm_rf(dir);
		return;
	}
	labels.items = calloc(1, sizeof(KeyValue));
	if (labels.items) {
		labels.items[0].key = strdup("ember.dev/demo");
		labels.items[0].value = strdup("true");
		labels.n = 1;
	}
	r = manager_template_register(m, DEMO_ID, kernel, image, NULL, "", &labels, 0, 0, &t, &err);
	kv_list_done(&labels);
	(void)rm_rf(dir);
	if (r < 0) {
		log_warning("demo template skipped: %s", err ?: strerror(-r));
		return;
	}
	(void)write_file_atomic(marker, "", 0, 0600);
	log_info("registered the demo template \"" DEMO_ID "\" (busybox, ember-init, ember-guest)");
}
