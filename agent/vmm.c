/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Which VMM runs the sandboxes: Firecracker where KVM can run a guest, fcsim (the simulator)
 * elsewhere. Decided once at start and reported by GetNode, because a scheduler must be able
 * to tell a simulated node from a real one.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/error.h"
#include "common/macro.h"
#include "manager.h"
#include "probe.h"

const char *vmm_kind_to_string(VmmKind k)
{
	switch (k) {
	case VMM_FIRECRACKER:
		return "firecracker";
	case VMM_FCSIM:
		return "fcsim";
	default:
		return "?";
	}
}

void vmm_info_done(VmmInfo *v)
{
	free(v->binary);
	free(v->jailer);
	free(v->uffd);
	free(v->version);
	free(v->reason);
	*v = (VmmInfo){};
}

/* `configured` empty: `name` installed next to emberd (build/, or the package's sbin), then in
 * ../lib/ember/ from there (where the package puts its helpers), else the one in PATH. */
static int find_helper(const char *configured, const char *name, char **ret)
{
	static const char *const dirs[] = {"", "/../lib/ember"};
	char self[PATH_MAX];
	ssize_t n;

	if (configured[0])
		return find_program(configured, ret);
	n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n > 0) {
		self[n] = 0;
		char *slash = strrchr(self, '/');
		if (slash) {
			*slash = 0;
			for (size_t i = 0; i < ELEMENTSOF(dirs); i++) {
				char *p;
				if (asprintf(&p, "%s%s/%s", self, dirs[i], name) < 0)
					return -ENOMEM;
				if (access(p, X_OK) == 0) {
					*ret = p;
					return 0;
				}
				free(p);
			}
		}
	}
	return find_program(name, ret);
}

int vmm_choose(const Config *c, bool kvm_usable, VmmInfo *ret, char **ret_error)
{
	_cleanup_free_ char *fc = NULL, *sim = NULL, *why = NULL;
	VmmInfo v = {};
	ProbeResult probe;
	bool probed = false; /* `probe` already holds the chosen binary's answer */
	int r;

	if (c->jailer_bin[0])
		/* fcctl can drive the jailer, but the sandbox flows do not link the kernel,
		 * disk and sockets into its chroot yet, nor adopt jailed VMMs: refuse rather
		 * than fail every create. */
		return error_set(
			ret_error, -EOPNOTSUPP,
			"[vmm] jailer_bin = \"%s\": running sandboxes under the jailer is not "
			"supported by emberd yet; leave jailer_bin empty",
			c->jailer_bin);

	int r_fc = find_program(c->firecracker_bin, &fc);
	_cleanup_free_ char *fc_unusable = NULL;
	if (strcmp(c->vmm_kind, "auto") == 0 && kvm_usable && r_fc >= 0) {
		/* A binary that is found but does not answer like a Firecracker is no reason to
		 * run nothing: fall back to fcsim and say why. */
		probe_firecracker_within(fc, PROBE_START_TIMEOUT_MS, &probe);
		probed = probe.available;
		if (!probe.available &&
		    asprintf(&fc_unusable, "%s cannot be used (%s)", fc, probe.reason) < 0)
			return -ENOMEM;
	}
	if (strcmp(c->vmm_kind, "firecracker") == 0 ||
	    (strcmp(c->vmm_kind, "auto") == 0 && kvm_usable && r_fc >= 0 && !fc_unusable)) {
		if (r_fc < 0)
			return error_set(ret_error, r_fc,
					 "[vmm] kind = firecracker, but firecracker_bin \"%s\" is "
					 "not found",
					 c->firecracker_bin);
		v.kind = VMM_FIRECRACKER;
		v.binary = TAKE_PTR(fc);
		v.reason =
			strdup(strcmp(c->vmm_kind, "auto") == 0
				       ? "auto: /dev/kvm can run a guest and firecracker is found"
				       : "[vmm] kind = firecracker");
	} else {
		r = find_helper(c->fcsim_bin, "fcsim", &sim);
		if (r < 0)
			return error_set(ret_error, r,
					 "no VMM: %s, and fcsim is not found (set [vmm] fcsim_bin)",
					 strcmp(c->vmm_kind, "fcsim") == 0 ? "[vmm] kind = fcsim"
					 : !kvm_usable ? "KVM cannot run a guest here"
						       : "firecracker is not found");
		v.kind = VMM_FCSIM;
		v.binary = TAKE_PTR(sim);
		if (strcmp(c->vmm_kind, "fcsim") == 0)
			why = strdup("[vmm] kind = fcsim");
		else if (asprintf(&why, "auto: %s, so sandboxes run simulated under fcsim",
				  !kvm_usable   ? "KVM cannot run a guest on this host"
				  : fc_unusable ? fc_unusable
						: "firecracker_bin is not found") < 0)
			why = NULL;
		v.reason = TAKE_PTR(why);
	}
	if (!probed)
		probe_firecracker_within(v.binary, PROBE_START_TIMEOUT_MS, &probe);
	if (!probe.available || !probe.version[0]) {
		r = error_set(ret_error, -ENOEXEC, "%s cannot be used: %s", v.binary, probe.reason);
		vmm_info_done(&v);
		return r;
	}
	v.version = strdup(probe.version);
	/* Not fatal: sandboxes run without it; only pause and resume need it (they say so). */
	r = find_helper(c->uffd_bin, "ember-uffd", &v.uffd);
	if (r == -ENOMEM) {
		vmm_info_done(&v);
		return r;
	}
	if (!v.binary || !v.reason || !v.version) {
		vmm_info_done(&v);
		return -ENOMEM;
	}
	*ret = v;
	return 0;
}
