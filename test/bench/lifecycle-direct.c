/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The baseline of `make bench-lifecycle`: the create and destroy sequence of emberd
 * (sandbox-ops.c), driven directly through the libraries (netns, storage, fcctl, guest client)
 * with no gRPC, no records, no events and no manager. emberd's overhead is its time over this.
 *
 *   lifecycle-direct --vmm FCSIM --kernel K --rootfs R --dir DIR --netns-dir D [-n 50]
 *
 * Runs in the caller's network namespace (the benchmark gives it one of its own). Prints one
 * line per sandbox: "create_us=N destroy_us=N".
 */
#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/fileio.h"
#include "common/macro.h"
#include "fcctl/fcctl.h"
#include "guest/client/guest-client.h"
#include "netns/netns.h"
#include "storage/storage.h"

static uint64_t now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

static int fail(const char *what, int r, const char *err)
{
	fprintf(stderr, "lifecycle-direct: %s: %s\n", what, err ?: strerror(-r));
	return 1;
}

int main(int argc, char *argv[])
{
	static const struct option options[] = {
		{"vmm", required_argument, NULL, 'v'},
		{"kernel", required_argument, NULL, 'k'},
		{"rootfs", required_argument, NULL, 'r'},
		{"dir", required_argument, NULL, 'd'},
		{"netns-dir", required_argument, NULL, 'N'},
		{"count", required_argument, NULL, 'n'},
		{},
	};
	const char *vmm = NULL, *kernel = NULL, *rootfs = NULL, *dir = NULL, *nsdir = NULL;
	unsigned count = 50;
	int c;

	while ((c = getopt_long(argc, argv, "n:", options, NULL)) >= 0) {
		switch (c) {
		case 'v':
			vmm = optarg;
			break;
		case 'k':
			kernel = optarg;
			break;
		case 'r':
			rootfs = optarg;
			break;
		case 'd':
			dir = optarg;
			break;
		case 'N':
			nsdir = optarg;
			break;
		case 'n':
			count = (unsigned)atoi(optarg);
			break;
		default:
			return 2;
		}
	}
	if (!vmm || !kernel || !rootfs || !dir || !nsdir) {
		fprintf(stderr, "usage: lifecycle-direct --vmm BIN --kernel K --rootfs R --dir DIR "
				"--netns-dir D [-n N]\n");
		return 2;
	}

	_cleanup_free_ char *state = NULL;
	if (asprintf(&state, "%s/network.json", dir) < 0)
		return 1;
	NetnsConfig cfg = {
		.netns_dir = nsdir, .name_prefix = "ember-", .state_file = state, .pool_size = 4};
	netns_cidr_parse("10.200.0.0/16", &cfg.sandbox_range);
	netns_cidr_parse("10.201.0.0/16", &cfg.veth_range);
	NetnsPool *pool = NULL;
	Storage *storage = NULL;
	char *err = NULL;
	int r = mkdir_p(dir, 0700);

	if (r < 0 || (r = netns_pool_new(&cfg, &pool, &err)) < 0)
		return fail("network pool", r, err);
	if ((r = storage_new(STORAGE_BACKEND_FILE, &storage)) < 0)
		return fail("storage", r, NULL);
	(void)netns_pool_wait_ready(pool, 30000);

	for (unsigned i = 0; i < count; i++) {
		char id[32], run[512], cow[512], link[600], uds[600];
		NetnsPolicy policy = {};
		NetnsSlot *slot = NULL;
		char *device = NULL;
		FcVm *vm = NULL;
		FcExit ex;

		snprintf(id, sizeof(id), "direct-%u", i);
		snprintf(run, sizeof(run), "%s/run-%u", dir, i);
		snprintf(cow, sizeof(cow), "%s/cow-%u.img", dir, i);
		StorageDiskSpec spec = {
			.id = id, .base_image = rootfs, .cow_path = cow, .cow_size = 1024ULL << 20};
		uint64_t t0 = now_us();

		if ((r = netns_slot_acquire(pool, id, &policy, &slot, &err)) < 0)
			return fail("slot", r, err);
		if ((r = storage_disk_create(storage, &spec, &device, &err)) < 0)
			return fail("disk", r, err);
		snprintf(link, sizeof(link), "%s/rootfs", run);
		if ((r = mkdir_p(run, 0700)) < 0 || symlink(device, link) < 0)
			return fail("run dir", r < 0 ? r : -errno, NULL);
		static const char *const stale[] = {FCCTL_API_SOCK, "v.sock", NULL};
		FcSpawn sp = {.binary = vmm,
			      .id = id,
			      .workdir = run,
			      .netns = netns_slot_path(slot),
			      .output = "fc.out",
			      .stale = stale};
		if ((r = fcctl_vm_spawn(&sp, &vm, &err)) < 0)
			return fail("spawn", r, err);
		if ((r = fcctl_put_machine_config(vm, 1, 128, false, false, FC_HUGE_PAGES_NONE,
						  &err)) < 0 ||
		    (r = fcctl_put_boot_source(vm, kernel, NULL,
					       "console=ttyS0 reboot=k panic=1 pci=off "
					       "init=/sbin/ember-init ip=" NETNS_GUEST_IP
					       "::" NETNS_TAP_IP ":255.255.255.252:x:eth0:off",
					       &err)) < 0 ||
		    (r = fcctl_put_drive(vm, "rootfs", "rootfs", true, false, &err)) < 0 ||
		    (r = fcctl_put_network_interface(vm, "eth0", NETNS_TAP_NAME,
						     "06:00:ac:10:00:02", &err)) < 0 ||
		    (r = fcctl_put_vsock(vm, 3, "v.sock", &err)) < 0 ||
		    (r = fcctl_instance_start(vm, &err)) < 0)
			return fail("configure", r, err);
		snprintf(uds, sizeof(uds), "%s/v.sock", run);
		for (uint64_t deadline = now_us() + 30000000;;) {
			GuestConn *g = NULL;
			GuestHello hello;
			free(err);
			err = NULL;
			if (guest_conn_open_vsock(uds, GUEST_CLIENT_PORT, 1000, &g, &err) >= 0 &&
			    guest_hello(g, &hello) >= 0) {
				guest_conn_free(g);
				break;
			}
			guest_conn_free(g);
			if (now_us() > deadline)
				return fail("guest agent", -ETIMEDOUT, err);
			/* The same naps as emberd's create. */
			(void)poll(NULL, 0, 50);
		}
		uint64_t t1 = now_us();

		if ((r = fcctl_vm_stop(vm, 5000, &ex)) < 0)
			return fail("stop", r, NULL);
		fcctl_vm_free(vm);
		if ((r = storage_disk_remove(storage, &spec, &err)) < 0)
			return fail("disk remove", r, err);
		if ((r = netns_slot_release(pool, slot, &err)) < 0)
			return fail("slot release", r, err);
		(void)rm_rf(run);
		(void)unlink(cow);
		free(device);
		printf("create_us=%llu destroy_us=%llu\n", (unsigned long long)(t1 - t0),
		       (unsigned long long)(now_us() - t1));
		fflush(stdout);
	}
	netns_pool_free(pool);
	storage_free(storage);
	return 0;
}
