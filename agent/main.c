/* SPDX-License-Identifier: Apache-2.0 */
/*
 * emberd: the ember node agent.
 *
 * Start-up order matters: configuration is checked before anything is touched; the state dir
 * and socket locks are taken before gRPC binds (gRPC unlinks an existing socket, so without the
 * lock a second emberd would steal the first one's socket); health says NOT_SERVING until the
 * agent is ready; READY=1 goes to systemd only then.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

#include "common/fileio.h"
#include "common/log.h"
#include "common/macro.h"
#include "config.h"
#include "descriptor-set.h"
#include "ember/v1/node.pb-c.h"
#include "http.h"
#include "manager.h"
#include "messages.h"
#include "node.h"
#include "rpc.h"

/* Exit codes: EX_CONFIG lets the unit file stop restarting on a bad configuration
 * (RestartPreventExitStatus=78). */
#define EXIT_CONFIG  78
#define EXIT_RUNTIME 1
#define EXIT_USAGE   2

/* Set by run() when it fails for want of what the configuration names (a VMM binary that is
 * not there, a setting emberd does not support): EXIT_CONFIG, not a restart every 2 s. */
static bool start_config_error;

static void help(void)
{
	printf("Usage: emberd [OPTIONS]\n"
	       "\n"
	       "The ember node agent: runs Firecracker microVM sandboxes for a cluster scheduler\n"
	       "and serves the ember.v1.Node gRPC API.\n"
	       "\n"
	       "  -c, --config FILE      configuration file (default %s, if it exists)\n"
	       "  -l, --listen ADDR      unix:PATH or an absolute PATH: the API socket;\n"
	       "                         HOST:PORT: the TCP listener (needs TLS settings or\n"
	       "                         [api] insecure_tcp = true)\n"
	       "      --state-dir DIR    [agent] state_dir\n"
	       "      --run-dir DIR      [agent] run_dir (the socket defaults to DIR/ember.sock)\n"
	       "      --log-level LEVEL  debug, info, notice, warning or err\n"
	       "      --dump-config      print the effective configuration and exit\n"
	       "      --destroy-all-sandboxes\n"
	       "                         destroy every sandbox of this node (with its disk,\n"
	       "                         network and processes) and exit, without serving;\n"
	       "                         run by the package when it is removed\n"
	       "  -h, --help             show this help\n"
	       "  -V, --version          show the version\n"
	       "\n"
	       "Command-line options override the file; the file overrides built-in defaults.\n"
	       "Every key is documented in README.md and in the example ember.conf.\n",
	       CONFIG_DEFAULT_FILE);
}

typedef struct Override {
	const char *section, *key, *value, *option;
} Override;

typedef struct Args {
	const char *config_file;
	bool dump_config;
	bool destroy_all;
	Override overrides[8];
	size_t n_overrides;
} Args;

enum {
	ARG_STATE_DIR = 0x100,
	ARG_RUN_DIR,
	ARG_LOG_LEVEL,
	ARG_DUMP_CONFIG,
	ARG_DESTROY_ALL,
};

static void add_override(Args *a, const char *section, const char *key, const char *value,
			 const char *option)
{
	if (a->n_overrides < ELEMENTSOF(a->overrides))
		a->overrides[a->n_overrides++] = (Override){section, key, value, option};
}

/* 0: go on; 1: exit 0 (help/version printed); <0: usage error. */
static int parse_argv(int argc, char *argv[], Args *a)
{
	static const struct option options[] = {
		{"config", required_argument, NULL, 'c'},
		{"listen", required_argument, NULL, 'l'},
		{"state-dir", required_argument, NULL, ARG_STATE_DIR},
		{"run-dir", required_argument, NULL, ARG_RUN_DIR},
		{"log-level", required_argument, NULL, ARG_LOG_LEVEL},
		{"dump-config", no_argument, NULL, ARG_DUMP_CONFIG},
		{"destroy-all-sandboxes", no_argument, NULL, ARG_DESTROY_ALL},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, 'V'},
		{},
	};
	int c;

	while ((c = getopt_long(argc, argv, "c:l:hV", options, NULL)) >= 0) {
		switch (c) {
		case 'c':
			a->config_file = optarg;
			break;
		case 'l':
			if (strncmp(optarg, "unix:", 5) == 0)
				add_override(a, "api", "socket", optarg + 5, "--listen");
			else if (optarg[0] == '/')
				add_override(a, "api", "socket", optarg, "--listen");
			else
				add_override(a, "api", "tcp_listen", optarg, "--listen");
			break;
		case ARG_STATE_DIR:
			add_override(a, "agent", "state_dir", optarg, "--state-dir");
			break;
		case ARG_RUN_DIR:
			add_override(a, "agent", "run_dir", optarg, "--run-dir");
			break;
		case ARG_LOG_LEVEL:
			add_override(a, "agent", "log_level", optarg, "--log-level");
			break;
		case ARG_DUMP_CONFIG:
			a->dump_config = true;
			break;
		case ARG_DESTROY_ALL:
			a->destroy_all = true;
			break;
		case 'h':
			help();
			return 1;
		case 'V':
			printf("emberd %s\n", EMBER_VERSION);
			return 1;
		default:
			return -EINVAL;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "emberd: unexpected argument \"%s\" (see --help)\n", argv[optind]);
		return -EINVAL;
	}
	return 0;
}

static int load_config(const Args *a, Config *c)
{
	_cleanup_free_ char *err = NULL;
	int r;

	r = config_init(c);
	if (r < 0) {
		fprintf(stderr, "emberd: %s\n", strerror(-r));
		return r;
	}
	r = config_load_file(c, a->config_file ?: CONFIG_DEFAULT_FILE, a->config_file != NULL,
			     &err);
	if (r < 0)
		goto fail;
	for (size_t i = 0; i < a->n_overrides; i++) {
		const Override *o = &a->overrides[i];
		_cleanup_free_ char *e = NULL;
		r = config_set(c, o->section, o->key, o->value, &e);
		if (r < 0) {
			if (asprintf(&err, "%s: %s", o->option, e ?: "invalid") < 0)
				err = NULL;
			goto fail;
		}
	}
	r = config_finish(c, &err);
	if (r < 0)
		goto fail;
	return 0;
fail:
	fprintf(stderr, "emberd: configuration refused: %s\n", err ?: strerror(-r));
	config_free(c);
	return r;
}

/* The socket lock lives next to the socket so that it guards exactly that path; the state dir
 * lock keeps two agents (on different sockets) from managing the same sandboxes. */
static int take_lock(const char *path, const char *what)
{
	pid_t holder = 0;
	int fd = lock_file_acquire(path, &holder);

	if (fd == -EBUSY) {
		if (holder > 0)
			log_error("another emberd (pid %d) is already using %s (lock %s held); "
				  "stop it first or choose another --run-dir/--state-dir",
				  (int)holder, what, path);
		else
			log_error("another emberd is already using %s (lock %s held)", what, path);
		return -EBUSY;
	}
	if (fd < 0)
		return log_error_errno(fd, "cannot take lock %s", path);
	return fd;
}

static uint64_t now_usec(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000ULL + (uint64_t)ts.tv_nsec / 1000ULL;
}

static void rpc_server_freep(RpcServer **s)
{
	rpc_server_free(*s);
}

/* systemd's status line: where it serves, and the template pulls in progress; sent when it
 * changed, after `first` ("READY=1\n" the first time). */
static void status_update(Manager *m, const Config *c, char *last, size_t size, const char *first)
{
	char pulls[256], status[512];
	int n = manager_pull_status(m, pulls, sizeof(pulls));

	snprintf(status, sizeof(status), "Serving on unix:%s%s%s%s%s", c->socket,
		 c->tcp_listen[0] ? " and " : "", c->tcp_listen, n > 0 ? "; pulling " : "",
		 n > 0 ? pulls : "");
	if (strcmp(status, last) == 0)
		return;
	snprintf(last, size, "%s", status);
	sd_notifyf(false, "%sSTATUS=%s", first, status);
}

/* Waits for SIGTERM/SIGINT, pinging the systemd watchdog while the gRPC poller is alive. */

static int main_loop(RpcServer *server, Manager *manager, const Config *c, const sigset_t *mask)
{
	uint64_t watchdog_usec = 0;
	bool watchdog = sd_watchdog_enabled(false, &watchdog_usec) > 0;
	char status[512] = "";

	status_update(manager, c, status, sizeof(status), "READY=1\n");

	for (;;) {
		/* Ping at half the watchdog interval, and check for signals at least every s. */
		uint64_t wait_us = watchdog ? watchdog_usec / 2 : 1000000;
		if (wait_us > 1000000)
			wait_us = 1000000;
		struct timespec ts = {.tv_sec = (time_t)(wait_us / 1000000),
				      .tv_nsec = (long)(wait_us % 1000000) * 1000};
		int sig = sigtimedwait(mask, NULL, &ts);
		if (sig == SIGTERM || sig == SIGINT) {
			log_struct(LOG_INFO, 0,
				   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_DRAINING},
					      {"OP", "shutdown"}),
				   "received %s, shutting down", strsignal(sig));
			return sig;
		}
		if (sig == SIGHUP)
			log_notice("SIGHUP: configuration reload is not supported; restart emberd "
				   "to apply changes");
		status_update(manager, c, status, sizeof(status), "");
		if (watchdog) {
			/* A stuck poller means no call can be served: let systemd restart us. */
			uint64_t age = now_usec() - rpc_server_heartbeat_usec(server);
			if (age < 5 * 1000000ULL)
				sd_notify(false, "WATCHDOG=1");
			else
				log_warning(
					"gRPC poller silent for %llus; not pinging the watchdog",
					(unsigned long long)(age / 1000000));
		}
	}
}

/* Drain: stop accepting, give calls in flight the grace period, cancel the rest. A second
 * SIGTERM/SIGINT cuts the grace period short. */
static int drain(RpcServer *server, unsigned grace_s, const sigset_t *mask)
{
	int r;

	sd_notify(false, "STOPPING=1\nSTATUS=Draining: waiting for calls in flight");
	switch ((r = rpc_server_shutdown(server, (int64_t)grace_s * 1000, mask))) {
	case 0:
		log_info("all calls finished");
		break;
	case -EINTR:
		log_warning("second signal: calls in flight were cancelled");
		break;
	case -ETIMEDOUT:
		log_warning("grace period of %us over: calls still in flight were cancelled",
			    grace_s);
		break;
	default:
		log_warning("some handlers did not return within 5 s of cancellation");
		break;
	}
	return r;
}

/* /metrics: everything but the HTTP layer's own counters. */
typedef struct MetricsSources {
	RpcServer *server;
	Manager *manager;
} MetricsSources;

static void write_metrics(FILE *f, void *userdata)
{
	const MetricsSources *src = userdata;

	fprintf(f,
		"# HELP ember_build_info The running emberd's version.\n"
		"# TYPE ember_build_info gauge\n"
		"ember_build_info{version=\"%s\"} 1\n",
		EMBER_VERSION);
	rpc_server_write_metrics(src->server, f);
	/* Set once recovery is done, read by HTTP threads. */
	manager_write_metrics(__atomic_load_n(&src->manager, __ATOMIC_ACQUIRE), f);
}

static int start_http(const Config *c, MetricsSources *src, HttpServer **ret)
{
	/* The Node methods that only read: they also answer GET. */
	static const char *const reads[] = {
		"GetNode",     "GetTemplate",   "ListTemplates",  "GetSandbox", "ListSandboxes",
		"GetSnapshot", "ListSnapshots", "WatchSandboxes", "ReadFile",   "ReadConsole",
		NULL,
	};
	_cleanup_free_ char *err = NULL;
	HttpOptions o = {
		.listen = c->http_listen,
		.token_file = c->http_token_file,
		.metrics_public = c->http_metrics_public,
		.get_methods = reads,
		.run_dir = c->run_dir,
		.service = ember__v1__node__descriptor.name,
		.rpc = src->server,
		.metrics = write_metrics,
		.metrics_userdata = src,
	};
	int r = http_server_start(&o, ret, &err);
	if (r < 0)
		return log_error_errno(r, "cannot start the HTTP listener: %s",
				       err ?: strerror(-r));
	return 0;
}

/* The state dir's lock and the socket's (see take_lock()), their directories made first. */
static int take_locks(const Config *c, int *ret_state_lock, int *ret_sock_lock)
{
	_cleanup_free_ char *lock_path = NULL, *dir = NULL;
	int r;

	if ((r = mkdir_p(c->state_dir, 0700)) < 0)
		return log_error_errno(r, "cannot create state dir %s", c->state_dir);
	if ((r = mkdir_p(c->run_dir, 0700)) < 0)
		return log_error_errno(r, "cannot create run dir %s", c->run_dir);

	if (asprintf(&lock_path, "%s/emberd.lock", c->state_dir) < 0)
		return log_error_errno(ENOMEM, "out of memory");
	*ret_state_lock = take_lock(lock_path, c->state_dir);
	if (*ret_state_lock < 0)
		return *ret_state_lock;
	free(lock_path);
	if (asprintf(&lock_path, "%s.lock", c->socket) < 0 || !(dir = strdup(c->socket)))
		return log_error_errno(ENOMEM, "out of memory");
	*strrchr(dir, '/') = 0;
	if (*dir && (r = mkdir_p(dir, 0700)) < 0)
		return log_error_errno(r, "cannot create socket directory %s", dir);
	*ret_sock_lock = take_lock(lock_path, c->socket);
	return *ret_sock_lock < 0 ? *ret_sock_lock : 0;
}

/* --destroy-all-sandboxes: recovery as at a start (so that what a crash left is reclaimed too),
 * then every sandbox destroyed; no API is served meanwhile. */
static int destroy_all(Config *c)
{
	_cleanup_(node_service_freep) NodeService *node = NULL;
	_cleanup_(manager_freep) Manager *manager = NULL;
	_cleanup_close_ int state_lock = -EBADF, sock_lock = -EBADF;
	_cleanup_free_ char *err = NULL;
	int r;

	signal(SIGPIPE, SIG_IGN);
	/* No ready network slots are wanted: they would only be made to be removed. */
	c->pool_size = 0;
	r = take_locks(c, &state_lock, &sock_lock);
	if (r < 0)
		return r;
	r = node_service_new(c, &node, &err);
	if (r < 0)
		return log_error_errno(r, "%s", err ?: "cannot set up the node service");
	node_service_probe(node);
	r = manager_new(c, node_service_kvm_usable(node), &manager, &err);
	if (r < 0)
		return log_error_errno(r, "cannot start the sandbox manager: %s",
				       err ?: strerror(-r));
	unsigned n = manager_sandbox_count(manager);
	/* A destroy waits at most for its VMM's stop (5 s) and a busy disk (2.5 s); operations in
	 * flight first finish. */
	r = manager_destroy_all(manager, 120 * 1000, &err);
	if (r < 0)
		return log_error_errno(r, "destroying the sandboxes: %s", err ?: strerror(-r));
	log_notice("destroyed %u sandbox(es); nothing of them is left on this node", n);
	return 0;
}

static int run(const Config *c)
{
	_cleanup_(rpc_server_freep) RpcServer *server = NULL;
	_cleanup_(node_service_freep) NodeService *node = NULL;
	_cleanup_(manager_freep) Manager *manager = NULL;
	/* Last, so that on an early return it goes first: its calls use everything above. */
	_cleanup_(http_server_freep) HttpServer *http = NULL;
	_cleanup_close_ int state_lock = -EBADF, sock_lock = -EBADF;
	_cleanup_free_ char *err = NULL;
	sigset_t mask;
	int r;

	/* Signals are taken synchronously by the main thread; every thread created from here on
	 * (gRPC's, the workers) inherits the mask. */
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &mask, NULL);
	signal(SIGPIPE, SIG_IGN);

	r = take_locks(c, &state_lock, &sock_lock);
	if (r < 0)
		return r;

	r = node_service_new(c, &node, &err);
	if (r < 0)
		return log_error_errno(r, "%s", err ?: "cannot set up the node service");

	node_service_probe(node);

	RpcServerOptions opts = {
		.descriptor_set = ember_descriptor_set,
		.descriptor_set_size = ember_descriptor_set_size,
		.max_message_bytes = (size_t)c->max_message_mib << 20,
		.keepalive_time_ms = c->keepalive_time_s * 1000,
		.keepalive_timeout_ms = c->keepalive_timeout_s * 1000,
		.min_ping_interval_ms = c->min_ping_interval_s * 1000,
		.max_concurrent_calls = c->max_concurrent_calls,
		.max_concurrent_streams = c->max_concurrent_streams,
		.version = EMBER_VERSION,
	};
	r = rpc_server_new(&opts, &server);
	if (r < 0)
		return log_error_errno(r, "cannot create the gRPC server");
	r = node_service_register(node, server);
	if (r < 0)
		return log_error_errno(r, "cannot register ember.v1.Node");

	r = rpc_server_listen_unix(server, c->socket, 0600);
	if (r == -EADDRNOTAVAIL)
		return log_error_errno(r,
				       "cannot listen on unix:%s: gRPC could not bind it "
				       "(its reason is logged above)",
				       c->socket);
	if (r < 0)
		return log_error_errno(r, "cannot listen on unix:%s", c->socket);
	int tcp_port = 0;
	if (c->tcp_listen[0]) {
		RpcTlsFiles tls = {c->tls_cert, c->tls_key, c->tls_client_ca};
		tcp_port =
			rpc_server_listen_tcp(server, c->tcp_listen, c->insecure_tcp ? NULL : &tls);
		if (tcp_port == -EADDRNOTAVAIL)
			return log_error_errno(
				tcp_port,
				"cannot listen on %s: address in use or not an "
				"address of this host (gRPC's reason is logged above)",
				c->tcp_listen);
		if (tcp_port < 0)
			return log_error_errno(tcp_port, "cannot listen on %s", c->tcp_listen);
		if (c->insecure_tcp)
			log_warning(
				"TCP listener %s is plaintext without authentication "
				"(insecure_tcp = true): anyone who reaches it controls this node",
				c->tcp_listen);
	}
	r = rpc_server_start(server);
	if (r < 0)
		return log_error_errno(r, "cannot start the gRPC server");
	/* A listener that cannot start is a configuration error: found before recovery. Until
	 * the manager is set its calls answer UNAVAILABLE, as gRPC's do. */
	MetricsSources metrics = {.server = server};
	if (c->http_listen[0] && (r = start_http(c, &metrics, &http)) < 0)
		return r;
	if (!http) {
		/* Turned off: a token left from an earlier start opens nothing. */
		_cleanup_free_ char *token_path = NULL;
		if (asprintf(&token_path, "%s/http-token", c->run_dir) >= 0)
			(void)unlink(token_path);
	}

	/* STARTING: GetNode answers while the records are read, live sandboxes adopted and
	 * leftovers reclaimed; every other call says UNAVAILABLE until then. */
	sd_notify(false, "STATUS=Recovering sandboxes");
	r = manager_new(c, node_service_kvm_usable(node), &manager, &err);
	if (r < 0) {
		start_config_error = r == -ENOENT || r == -EOPNOTSUPP;
		return log_error_errno(r, "cannot start the sandbox manager: %s",
				       err ?: strerror(-r));
	}
	manager_demo_template(manager);
	r = manager_pulls_start(manager);
	if (r < 0)
		return log_error_errno(r, "cannot start the template download thread: %m");
	node_service_set_manager(node, manager);
	rpc_server_set_state(server, RPC_SERVER_SERVING);
	__atomic_store_n(&metrics.manager, manager, __ATOMIC_RELEASE);
	if (tcp_port > 0)
		log_struct(LOG_INFO, 0,
			   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_STARTED}, {"OP", "start"},
				      {"NODE_ID", node_service_id(node)}),
			   "emberd %s (node %s) listening on unix:%s and %s (port %d, %s)",
			   EMBER_VERSION, node_service_id(node), c->socket, c->tcp_listen, tcp_port,
			   c->insecure_tcp ? "plaintext" : "mutual TLS");
	else
		log_struct(LOG_INFO, 0,
			   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_STARTED}, {"OP", "start"},
				      {"NODE_ID", node_service_id(node)}),
			   "emberd %s (node %s) listening on unix:%s", EMBER_VERSION,
			   node_service_id(node), c->socket);
	if (http) {
		/* As Jupyter does: the address to open, token included, is in the log. */
		_cleanup_free_ char *host = strndup(
			c->http_listen, (size_t)(strrchr(c->http_listen, ':') - c->http_listen));
		if (host && (strcmp(host, "0.0.0.0") == 0 || strcmp(host, "[::]") == 0)) {
			free(host);
			host = strdup("127.0.0.1"); /* any address: this one works here */
		}
		log_notice(
			"HTTP listener: open http://%s:%d/test?token=%s (token in %s/http-token)",
			host ?: "127.0.0.1", http_server_port(http), http_server_token(http),
			c->run_dir);
	}
	/* READY=1 with the status line, first thing */
	main_loop(server, manager, c, &mask);
	/* Only a second SIGTERM/SIGINT cuts the grace period short; SIGHUP stays pending. */
	sigset_t interrupt;
	sigemptyset(&interrupt);
	sigaddset(&interrupt, SIGTERM);
	sigaddset(&interrupt, SIGINT);
	r = drain(server, c->shutdown_grace_s, &interrupt);
	/* Drained calls ended the HTTP streams too; what is left are idle connections. */
	http_server_free(TAKE_PTR(http));
	rpc_server_free(TAKE_PTR(server));
	if (r == -EBUSY) {
		/* A handler still runs and may use the manager: leave it to the exit. */
		log_warning("not freeing the sandbox manager: a call handler is still running");
		(void)TAKE_PTR(manager);
	}
	/* Operations in flight finish; sandboxes keep running. */
	manager_free(TAKE_PTR(manager));
	(void)unlink(c->socket);
	log_struct(LOG_INFO, 0,
		   LOG_FIELDS({"MESSAGE_ID", EMBER_MESSAGE_STOPPED}, {"OP", "shutdown"}),
		   "stopped");
	return 0;
}

int main(int argc, char *argv[])
{
	Args args = {};
	Config config;
	int r;

	log_setup("emberd", LOG_TARGET_AUTO);

	r = parse_argv(argc, argv, &args);
	if (r != 0)
		return r > 0 ? EXIT_SUCCESS : EXIT_USAGE;
	if (load_config(&args, &config) < 0)
		return EXIT_CONFIG;
	if (args.dump_config) {
		config_dump(&config, stdout);
		config_free(&config);
		return EXIT_SUCCESS;
	}
	log_set_max_level(config.log_level);
	if (config.loaded_from)
		log_debug("configuration read from %s", config.loaded_from);

	r = args.destroy_all ? destroy_all(&config) : run(&config);
	config_free(&config);
	return r >= 0 ? EXIT_SUCCESS : start_config_error ? EXIT_CONFIG : EXIT_RUNTIME;
}
