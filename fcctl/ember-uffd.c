/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ember-uffd: serves one sandbox's snapshot memory to Firecracker through userfaultfd
 * (DESIGN.md §7). A process of its own, so that a resumed sandbox survives an emberd restart.
 *
 *   ember-uffd <listen socket> <memory file> [--prefetch] [--timeout-ms N] [--id ID]
 *              [--stats-file PATH] [--fault-around N] [--working-set PATH] [--record-ms N]
 *              [--debug]
 *
 * The socket path appears once it listens: wait for it, then send /snapshot/load. Exit status
 * 0 when Firecracker went away or SIGTERM/SIGINT stopped it, 1 when Firecracker had to be
 * killed or serving failed (the reason on stderr). One statistics line on stderr at exit,
 * always.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include "common/log.h"
#include "common/macro.h"
#include "fcctl/uffd.h"

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: ember-uffd <listen socket> <memory file> [--prefetch] [--timeout-ms N] "
		"[--id ID] [--stats-file PATH] [--debug]\n"
		"\n"
		"Serves a Firecracker snapshot memory file through the userfaultfd Firecracker\n"
		"hands over on <listen socket> (mem_backend Uffd).\n"
		"\n"
		"  --prefetch      copy all memory in the background right after the handshake\n"
		"  --timeout-ms N  give up when Firecracker has not connected and sent the\n"
		"                  handshake within N ms (default: wait forever)\n"
		"  --id ID         the sandbox served: only a process started with --id ID\n"
		"                  may connect (and emberd finds this one again by it)\n"
		"  --stats-file PATH  keep the fault and byte counters current in PATH\n"
		"                  (a small binary file, read by emberd for /metrics)\n"
		"  --fault-around N  serve a fault with the aligned block of N 4 KiB pages\n"
		"                  around it, those not there yet (a power of two up to 512;\n"
		"                  1: only the faulting page; default %d)\n"
		"  --working-set PATH  replay the working set recorded in PATH for this memory\n"
		"                  file first; without a valid one, record it there\n"
		"  --record-ms N   how long a resume records its working set (default %d)\n"
		"  --debug         debug log on stderr\n",
		UFFD_FAULT_AROUND_DEFAULT, UFFD_RECORD_MS_DEFAULT);
}

static int parse_int(const char *s, long min, int *ret)
{
	char *end = NULL;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || !end || end == s || *end != '\0' || v < min || v > INT_MAX)
		return -EINVAL;
	*ret = (int)v;
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option options[] = {
		{"prefetch", no_argument, NULL, 'p'},
		{"timeout-ms", required_argument, NULL, 't'},
		{"debug", no_argument, NULL, 'd'},
		{"id", required_argument, NULL, 'i'},
		{"help", no_argument, NULL, 'h'},
		{"stats-file", required_argument, NULL, 's'},
		{"fault-around", required_argument, NULL, 'f'},
		{"working-set", required_argument, NULL, 'w'},
		{"record-ms", required_argument, NULL, 'r'},
		{},
	};
	UffdOptions opt = {
		.prefetch = false, .timeout_ms = -1, .fault_around = UFFD_FAULT_AROUND_DEFAULT};
	_cleanup_free_ char *error = NULL;
	_cleanup_close_ int sfd = -EBADF;
	UffdStats st = {0};
	const char *stats_file = NULL;
	sigset_t stop_signals;
	int c, r, v;

	while ((c = getopt_long(argc, argv, "", options, NULL)) >= 0)
		switch (c) {
		case 'p':
			opt.prefetch = true;
			break;
		case 't':
			if (parse_int(optarg, -1, &opt.timeout_ms) < 0) {
				fprintf(stderr, "ember-uffd: invalid --timeout-ms: %s\n", optarg);
				return 2;
			}
			break;
		case 'f':
			if (parse_int(optarg, 1, &v) < 0 || v > UFFD_FAULT_AROUND_MAX ||
			    (v & (v - 1))) {
				fprintf(stderr,
					"ember-uffd: invalid --fault-around: %s (a power of two "
					"from 1 to %d)\n",
					optarg, UFFD_FAULT_AROUND_MAX);
				return 2;
			}
			opt.fault_around = (unsigned)v;
			break;
		case 'w':
			opt.working_set = optarg;
			break;
		case 'r':
			if (parse_int(optarg, 1, &opt.record_ms) < 0) {
				fprintf(stderr, "ember-uffd: invalid --record-ms: %s\n", optarg);
				return 2;
			}
			break;
		case 'd':
			log_set_max_level(LOG_DEBUG);
			break;
		case 'i':
			opt.peer_id = optarg;
			break;
		case 's':
			stats_file = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	if (argc - optind != 2) {
		usage(stderr);
		return 2;
	}
	log_setup("ember-uffd", LOG_TARGET_STDERR);
	/* Only our own user's processes (the VMM emberd started) may connect. */
	opt.check_peer_uid = true;
	opt.peer_uid = getuid();
	/* SIGTERM and SIGINT end serving through uffd_serve, so that the statistics line is
	 * written as for any other end. */
	sigemptyset(&stop_signals);
	sigaddset(&stop_signals, SIGTERM);
	sigaddset(&stop_signals, SIGINT);
	if (sigprocmask(SIG_BLOCK, &stop_signals, NULL) == 0 &&
	    (sfd = signalfd(-1, &stop_signals, SFD_CLOEXEC | SFD_NONBLOCK)) >= 0) {
		opt.has_stop_fd = true;
		opt.stop_fd = sfd;
	}

	/* Counters are a convenience: serving goes on without them. */
	if (stats_file && (r = uffd_live_stats_create(stats_file, &opt.live)) < 0)
		fprintf(stderr, "ember-uffd: cannot create %s: %s\n", stats_file, strerror(-r));
	r = uffd_serve(argv[optind], argv[optind + 1], &opt, &st, &error);
	uffd_live_stats_unmap(opt.live);
	if (r < 0)
		fprintf(stderr, "ember-uffd: %s\n", error ? error : "failed");
	fprintf(stderr,
		"ember-uffd: stats: faults=%" PRIu64 " pages_copied=%" PRIu64
		" bytes_copied=%" PRIu64 " around_pages=%" PRIu64 " zero_pages=%" PRIu64
		" removes=%" PRIu64 " eexist=%" PRIu64 " eagain=%" PRIu64
		" fault_p50_us=%.1f fault_p99_us=%.1f fault_max_us=%.1f replay_pages=%" PRIu64
		" replay_ms=%.1f prefetch_ms=%.1f recorded=%" PRIu64 " peer=%d end=\"%s\"\n",
		st.faults, st.pages_copied, st.bytes_copied, st.around_pages, st.zero_pages,
		st.removes, st.eexist, st.eagain, (double)st.p50_ns / 1000.0,
		(double)st.p99_ns / 1000.0, (double)st.max_ns / 1000.0, st.replay_pages,
		(double)st.replay_ns / 1e6, (double)st.prefetch_ns / 1e6, st.recorded, (int)st.peer,
		st.end_reason);
	return r < 0 ? 1 : 0;
}
