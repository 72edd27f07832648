/* SPDX-License-Identifier: Apache-2.0 */
/*
 * fcsim --api-sock PATH [--id ID] [--log-path P] [--level L] [--show-level]
 *       [--show-log-origin] [--boot-delay-ms N] [--version]
 *
 * Firecracker's command line, its API on PATH, a container for a guest. fcsim-only settings
 * also come from the environment, because whoever starts "firecracker" (ember) passes only
 * Firecracker's arguments: FCSIM_BOOT_DELAY_MS, FCSIM_VERIFY_MEMORY (all | none | <pages>),
 * FCSIM_VERIFY_ORDER (sequential | random).
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "common/macro.h"
#include "fcsim.h"

static volatile sig_atomic_t got_signal;

static void on_signal(int sig)
{
	got_signal = sig;
}

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: fcsim --api-sock PATH [--id ID] [--log-path PATH] [--level LEVEL]\n"
		"             [--show-level] [--show-log-origin] [--boot-delay-ms N]\n"
		"             [--verify-memory all|none|N] [--verify-order sequential|random]\n"
		"             [--version] [--help]\n"
		"\n"
		"A Firecracker v%s simulator: the same command line and HTTP API; the guest\n"
		"is a container running init from the root drive. See ember's README.\n",
		FC_VERSION);
}

int main(int argc, char *argv[])
{
	enum {
		OPT_API_SOCK = 0x100,
		OPT_ID,
		OPT_LOG_PATH,
		OPT_LEVEL,
		OPT_SHOW_LEVEL,
		OPT_SHOW_ORIGIN,
		OPT_BOOT_DELAY,
		OPT_VERIFY,
		OPT_VERIFY_ORDER,
		OPT_IGNORED_ARG,
		OPT_IGNORED_FLAG,
	};
	static const struct option options[] = {
		{"api-sock", required_argument, NULL, OPT_API_SOCK},
		{"id", required_argument, NULL, OPT_ID},
		{"log-path", required_argument, NULL, OPT_LOG_PATH},
		{"level", required_argument, NULL, OPT_LEVEL},
		{"show-level", no_argument, NULL, OPT_SHOW_LEVEL},
		{"show-log-origin", no_argument, NULL, OPT_SHOW_ORIGIN},
		{"boot-delay-ms", required_argument, NULL, OPT_BOOT_DELAY},
		{"verify-memory", required_argument, NULL, OPT_VERIFY},
		{"verify-order", required_argument, NULL, OPT_VERIFY_ORDER},
		/* What the jailer passes, accepted as Firecracker does. */
		{"start-time-us", required_argument, NULL, OPT_IGNORED_ARG},
		{"start-time-cpu-us", required_argument, NULL, OPT_IGNORED_ARG},
		{"parent-cpu-time-us", required_argument, NULL, OPT_IGNORED_ARG},
		{"seccomp-filter", required_argument, NULL, OPT_IGNORED_ARG},
		{"no-seccomp", no_argument, NULL, OPT_IGNORED_FLAG},
		{"version", no_argument, NULL, 'V'},
		{"help", no_argument, NULL, 'h'},
		{},
	};
	static Vm vm;
	const char *log_path = NULL;
	int level = FC_INFO, c, fd;
	bool show_level = false, show_origin = false;
	struct sockaddr_un sa = {.sun_family = AF_UNIX};

	vm.opt.id = "anonymous-instance";
	const char *delay = getenv("FCSIM_BOOT_DELAY_MS");
	vm.opt.boot_delay_ms = delay ? atoi(delay) : 0;
	vm.opt.verify = getenv("FCSIM_VERIFY_MEMORY");
	vm.opt.verify_order = getenv("FCSIM_VERIFY_ORDER");
	while ((c = getopt_long(argc, argv, "hV", options, NULL)) >= 0) {
		switch (c) {
		case OPT_API_SOCK:
			vm.opt.api_sock = optarg;
			break;
		case OPT_ID:
			vm.opt.id = optarg;
			break;
		case OPT_LOG_PATH:
			log_path = optarg;
			break;
		case OPT_LEVEL:
			level = fclog_level_from_string(optarg);
			if (level < 0) {
				fprintf(stderr, "fcsim: invalid log level \"%s\"\n", optarg);
				return 1;
			}
			break;
		case OPT_SHOW_LEVEL:
			show_level = true;
			break;
		case OPT_SHOW_ORIGIN:
			show_origin = true;
			break;
		case OPT_BOOT_DELAY:
			vm.opt.boot_delay_ms = atoi(optarg);
			break;
		case OPT_VERIFY:
			vm.opt.verify = optarg;
			break;
		case OPT_VERIFY_ORDER:
			vm.opt.verify_order = optarg;
			break;
		case OPT_IGNORED_ARG:
		case OPT_IGNORED_FLAG:
			break;
		case 'V':
			/* Firecracker's format, marked so that nobody mistakes us for it. */
			printf("Firecracker v%s (fcsim %s)\n\n", FC_VERSION, FCSIM_VERSION);
			return 0;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 1;
		}
	}
	if (!vm.opt.api_sock) {
		fprintf(stderr, "fcsim: --api-sock is required (fcsim has no --no-api mode)\n");
		return 1;
	}
	if (vm.opt.verify && strcmp(vm.opt.verify, "all") != 0 &&
	    strcmp(vm.opt.verify, "none") != 0 && strtoull(vm.opt.verify, NULL, 10) == 0) {
		fprintf(stderr, "fcsim: --verify-memory takes all, none or a page count\n");
		return 1;
	}
	if (fclog_open(log_path, (FcLevel)level, show_level, show_origin, vm.opt.id) < 0) {
		fprintf(stderr, "fcsim: cannot open the log file %s: %m\n", log_path);
		return 1;
	}
	pthread_mutex_init(&vm.mu, NULL);
	vm.machine_config = vmm_default_machine_config();
	for (size_t i = 0; i < MAX_IFACES; i++)
		vm.ifaces[i].host_tap = vm.ifaces[i].guest_tap = -1;

	/* Like Firecracker: an existing socket path is an error, not something to replace. */
	if (strlen(vm.opt.api_sock) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "fcsim: the API socket path is too long\n");
		return 1;
	}
	memcpy(sa.sun_path, vm.opt.api_sock, strlen(vm.opt.api_sock) + 1);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 64) < 0) {
		fprintf(stderr,
			"fcsim: Failed to open the API socket at %s: %m. Check that it is not "
			"already in use (remove a stale socket first).\n",
			vm.opt.api_sock);
		return 1;
	}
	signal(SIGPIPE, SIG_IGN);
	struct sigaction sact = {.sa_handler = on_signal};
	sigaction(SIGTERM, &sact, NULL);
	sigaction(SIGINT, &sact, NULL);
	sigaction(SIGHUP, &sact, NULL);

	(void)prctl(PR_SET_NAME, "main");
	FCLOG(FC_INFO, "Running Firecracker v%s (fcsim %s)", FC_VERSION, FCSIM_VERSION);
	if (api_start(&vm, fd) < 0) {
		fprintf(stderr, "fcsim: cannot start the API server\n");
		return 1;
	}
	while (!got_signal && !vm.exit_requested) {
		struct timespec ts = {.tv_nsec = 20 * 1000000L};
		nanosleep(&ts, NULL);
	}
	if (got_signal)
		FCLOG(FC_INFO, "Shutting down VM after intercepting signal %d", (int)got_signal);
	api_stop();
	vmm_shutdown(&vm);
	(void)fcmetrics_flush(&vm);
	pthread_mutex_destroy(&vm.mu);
	return got_signal ? 128 + got_signal : vm.exit_code;
}
