/* SPDX-License-Identifier: Apache-2.0 */
/*
 * emberd's configuration: embedded defaults, ini files, overrides, the checks across keys in
 * config_finish(), the --dump-config output, and that README.md and ember.conf document every
 * key of the table.
 *
 * A bad config stops the daemon at startup, so most of what is checked here is the message: it
 * must name the file and line, the key, the value and what would have been accepted, because
 * that message is all an operator gets.
 */
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

#include <cmocka.h>

#include "agent/config.h"
#include "common/fileio.h"
#include "common/macro.h"

#define assert_contains(haystack, needle)                                                          \
	do {                                                                                       \
		const char *_h_ = (haystack), *_n_ = (needle);                                     \
		if (!_h_ || !strstr(_h_, _n_))                                                     \
			fail_msg("expected \"%s\" in \"%s\"", _n_, _h_ ? _h_ : "(null)");          \
	} while (0)

/* Every test gets two initialised configs and its temporary files; the teardown runs even after
 * a failed assertion, so neither files in /tmp nor allocations (LeakSanitizer) are left. */
typedef struct Fixture {
	Config c;
	Config other;
	char *error;
	char *docs[2];
	char *paths[64];
	size_t n_paths;
} Fixture;

static int setup(void **state)
{
	Fixture *fx = calloc(1, sizeof(*fx));

	if (!fx)
		return -1;
	if (config_init(&fx->c) < 0 || config_init(&fx->other) < 0) {
		config_free(&fx->c);
		free(fx);
		return -1;
	}
	*state = fx;
	return 0;
}

static int teardown(void **state)
{
	Fixture *fx = *state;

	config_free(&fx->c);
	config_free(&fx->other);
	free(fx->error);
	free(fx->docs[0]);
	free(fx->docs[1]);
	for (size_t i = 0; i < fx->n_paths; i++) {
		(void)unlink(fx->paths[i]);
		free(fx->paths[i]);
	}
	free(fx);
	return 0;
}

/* The error string of the previous call is freed, so a test can check several in a row. */
static char **fx_error(Fixture *fx)
{
	free(fx->error);
	fx->error = NULL;
	return &fx->error;
}

/* A temporary file with `content`, removed by the teardown. */
static const char *fx_file(Fixture *fx, const char *content)
{
	size_t len = strlen(content);
	char *path;
	int fd;

	assert_true(fx->n_paths < ELEMENTSOF(fx->paths));
	path = strdup("/tmp/ember-test-config.XXXXXX");
	assert_non_null(path);
	fd = mkstemp(path);
	if (fd < 0) {
		free(path);
		fail_msg("mkstemp: %s", strerror(errno));
	}
	fx->paths[fx->n_paths++] = path;
	assert_int_equal(write(fd, content, len), (ssize_t)len);
	close(fd);
	return path;
}

/* Loads `content` into fx->c; the path is returned for checking messages. */
static int fx_load(Fixture *fx, const char *content, const char **ret_path)
{
	const char *path = fx_file(fx, content);

	if (ret_path)
		*ret_path = path;
	return config_load_file(&fx->c, path, true, fx_error(fx));
}

static char *dump_string(const Config *c)
{
	char *text = NULL;
	size_t size = 0;
	FILE *f = open_memstream(&text, &size);

	assert_non_null(f);
	config_dump(c, f);
	fclose(f);
	return text;
}

/* The value config_dump() writes for `key`, which is what the operator sees with
 * --dump-config; caller frees. */
static char *dump_value(const Config *c, const char *key)
{
	_cleanup_free_ char *text = dump_string(c);
	size_t klen = strlen(key);
	char *save = NULL;

	for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
		if (strncmp(line, key, klen) == 0 && strncmp(line + klen, " = ", 3) == 0)
			return strdup(line + klen + 3);
	return NULL;
}

static void assert_config_equal(const Config *a, const Config *b)
{
	assert_string_equal(a->state_dir, b->state_dir);
	assert_string_equal(a->run_dir, b->run_dir);
	assert_int_equal(a->log_level, b->log_level);
	assert_string_equal(a->firecracker_bin, b->firecracker_bin);
	assert_string_equal(a->socket, b->socket);
	assert_string_equal(a->tcp_listen, b->tcp_listen);
	assert_string_equal(a->tls_cert, b->tls_cert);
	assert_string_equal(a->tls_key, b->tls_key);
	assert_string_equal(a->tls_client_ca, b->tls_client_ca);
	assert_int_equal(a->insecure_tcp, b->insecure_tcp);
	assert_int_equal(a->max_message_mib, b->max_message_mib);
	assert_int_equal(a->keepalive_time_s, b->keepalive_time_s);
	assert_int_equal(a->keepalive_timeout_s, b->keepalive_timeout_s);
	assert_int_equal(a->min_ping_interval_s, b->min_ping_interval_s);
	assert_int_equal(a->max_concurrent_calls, b->max_concurrent_calls);
	assert_int_equal(a->shutdown_grace_s, b->shutdown_grace_s);
}

/* ---- defaults and the key table ---- */

static void test_defaults(void **state)
{
	Fixture *fx = *state;
	Config *c = &fx->c;

	assert_string_equal(c->state_dir, "/var/lib/ember");
	assert_string_equal(c->run_dir, "/run/ember");
	assert_int_equal(c->log_level, LOG_INFO);
	assert_string_equal(c->firecracker_bin, "firecracker");
	/* Empty until finish: the socket follows run_dir, which a later file may still change. */
	assert_string_equal(c->socket, "");
	assert_string_equal(c->tcp_listen, "");
	assert_string_equal(c->tls_cert, "");
	assert_string_equal(c->tls_key, "");
	assert_string_equal(c->tls_client_ca, "");
	assert_false(c->insecure_tcp);
	assert_int_equal(c->max_message_mib, 16);
	assert_int_equal(c->keepalive_time_s, 30);
	assert_int_equal(c->keepalive_timeout_s, 10);
	assert_int_equal(c->min_ping_interval_s, 10);
	assert_int_equal(c->max_concurrent_calls, 256);
	assert_int_equal(c->shutdown_grace_s, 15);
	assert_string_equal(c->systemd, "auto");
	assert_int_equal(c->memory_overhead_mib, 64);
	assert_null(c->loaded_from);

	assert_int_equal(config_finish(c, fx_error(fx)), 0);
	assert_string_equal(c->socket, "/run/ember/ember.sock");
	assert_null(fx->error);
}

static void test_socket_follows_run_dir(void **state)
{
	Fixture *fx = *state;

	assert_int_equal(config_set(&fx->c, "agent", "run_dir", "/srv/run", fx_error(fx)), 0);
	assert_int_equal(config_finish(&fx->c, fx_error(fx)), 0);
	assert_string_equal(fx->c.socket, "/srv/run/ember.sock");

	/* An explicit socket is kept as it is. */
	assert_int_equal(config_set(&fx->other, "api", "socket", "/srv/api.sock", fx_error(fx)), 0);
	assert_int_equal(config_finish(&fx->other, fx_error(fx)), 0);
	assert_string_equal(fx->other.socket, "/srv/api.sock");
}

/* The HTTP listener controls the node: off loopback only with allow_remote. */
static void test_http_listen_loopback(void **state)
{
	static const char *const ok[] = {"127.0.0.1:7071", "127.1.2.3:0", "[::1]:7071",
					 "localhost:7071", ""};
	static const char *const remote[] = {"0.0.0.0:7071", "10.0.0.1:80", "[::]:7071",
					     "node1.example:7071"};
	Fixture *fx = *state;

	for (size_t i = 0; i < ELEMENTSOF(ok); i++) {
		Config c;
		assert_int_equal(config_init(&c), 0);
		assert_int_equal(config_set(&c, "http", "listen", ok[i], fx_error(fx)), 0);
		assert_int_equal(config_finish(&c, fx_error(fx)), 0);
		config_free(&c);
	}
	for (size_t i = 0; i < ELEMENTSOF(remote); i++) {
		Config c;
		_cleanup_free_ char *err = NULL;
		assert_int_equal(config_init(&c), 0);
		assert_int_equal(config_set(&c, "http", "listen", remote[i], fx_error(fx)), 0);
		assert_int_equal(config_finish(&c, &err), -EINVAL);
		assert_non_null(strstr(err, "allow_remote"));
		assert_int_equal(config_set(&c, "http", "allow_remote", "true", fx_error(fx)), 0);
		assert_int_equal(config_finish(&c, fx_error(fx)), 0);
		config_free(&c);
	}
}

static void test_key_table(void **state)
{
	Fixture *fx = *state;
	size_t n = config_n_keys();

	assert_int_equal(n, 55);
	assert_null(config_key_info(n));
	for (size_t i = 0; i < n; i++) {
		const ConfigKeyInfo *k = config_key_info(i);
		_cleanup_free_ char *dumped = NULL;

		assert_non_null(k);
		static const char *const sections[] = {"agent",   "api",       "vmm",  "storage",
						       "network", "sandboxes", "http", "templates"};
		bool known = false;
		for (size_t j = 0; j < ELEMENTSOF(sections); j++)
			known = known || strcmp(k->section, sections[j]) == 0;
		assert_true(known);
		assert_true(k->key[0] && k->allowed[0] && k->doc[0]);
		assert_non_null(k->default_value);
		for (size_t j = 0; j < i; j++)
			if (strcmp(config_key_info(j)->key, k->key) == 0)
				fail_msg("key %s appears twice in the table", k->key);

		/* The table's default is what config_init() set, in the form the file uses. */
		dumped = dump_value(&fx->c, k->key);
		if (!dumped)
			fail_msg("config_dump() does not write %s", k->key);
		assert_string_equal(dumped, k->default_value);

		/* And it passes the key's own validation. */
		assert_int_equal(
			config_set(&fx->other, k->section, k->key, k->default_value, fx_error(fx)),
			0);
	}
}

/* ---- good files ---- */

static void test_good_file(void **state)
{
	Fixture *fx = *state;
	const char *path;
	Config *c = &fx->c;

	assert_int_equal(fx_load(fx,
				 "# every key, none at its default\n"
				 "; both comment styles\n"
				 "\n"
				 "[agent]\n"
				 "state_dir = /srv/ember/state\n"
				 "run_dir=/srv/ember/run\n"
				 "log_level = debug\n"
				 "\n"
				 "[vmm]\n"
				 "firecracker_bin = /usr/bin/fcsim\n"
				 "\n"
				 "[api]\n"
				 "socket = /srv/ember/api.sock\n"
				 "tcp_listen = [::1]:7070\n"
				 "insecure_tcp = yes\n"
				 "max_message_mib = 1024\n"
				 "keepalive_time_s = 1\n"
				 "keepalive_timeout_s = 3600\n"
				 "min_ping_interval_s = 1 ; inline comment\n"
				 "max_concurrent_calls = 4096\n"
				 "shutdown_grace_s = 0\n",
				 &path),
			 0);
	assert_null(fx->error);
	assert_string_equal(c->state_dir, "/srv/ember/state");
	assert_string_equal(c->run_dir, "/srv/ember/run");
	assert_int_equal(c->log_level, LOG_DEBUG);
	assert_string_equal(c->firecracker_bin, "/usr/bin/fcsim");
	assert_string_equal(c->socket, "/srv/ember/api.sock");
	assert_string_equal(c->tcp_listen, "[::1]:7070");
	assert_true(c->insecure_tcp);
	assert_int_equal(c->max_message_mib, 1024);
	assert_int_equal(c->keepalive_time_s, 1);
	assert_int_equal(c->keepalive_timeout_s, 3600);
	assert_int_equal(c->min_ping_interval_s, 1);
	assert_int_equal(c->max_concurrent_calls, 4096);
	assert_int_equal(c->shutdown_grace_s, 0);
	assert_non_null(c->loaded_from);
	assert_string_equal(c->loaded_from, path);

	assert_int_equal(config_finish(c, fx_error(fx)), 0);
	assert_string_equal(c->socket, "/srv/ember/api.sock");
}

/* Accepted, and stored as meant: what --dump-config prints is the canonical form. */
static void test_good_values(void **state)
{
	static const struct {
		const char *section, *key, *value, *dumped;
	} good[] = {
		{"api", "insecure_tcp", "true", "true"},
		{"api", "insecure_tcp", "false", "false"},
		{"api", "insecure_tcp", "on", "true"},
		{"api", "insecure_tcp", "off", "false"},
		{"api", "insecure_tcp", "1", "true"},
		{"api", "insecure_tcp", "0", "false"},
		{"api", "insecure_tcp", "TRUE", "true"},
		{"api", "insecure_tcp", "No", "false"},
		{"api", "max_message_mib", "1", "1"},
		{"templates", "max_artifact_bytes", "1", "1"},
		{"templates", "max_artifact_bytes", "18446744073709551615", "18446744073709551615"},
		{"templates", "max_parallel_pulls", "64", "64"},
		{"templates", "pull_retries", "0", "0"},
		{"templates", "ca_file", "/etc/ssl/private-ca.pem", "/etc/ssl/private-ca.pem"},
		{"api", "max_message_mib", "1024", "1024"},
		{"api", "max_message_mib", "007", "7"},
		{"api", "shutdown_grace_s", "0", "0"},
		{"api", "shutdown_grace_s", "3600", "3600"},
		{"api", "keepalive_time_s", "86400", "86400"},
		{"api", "tcp_listen", "0.0.0.0:7070", "0.0.0.0:7070"},
		{"api", "tcp_listen", "[::1]:80", "[::1]:80"},
		{"api", "tcp_listen", "[::]:7070", "[::]:7070"},
		{"api", "tcp_listen", "node-1.example.com:443", "node-1.example.com:443"},
		{"api", "tcp_listen", "", ""},
		{"api", "socket", "", ""},
		{"api", "tls_cert", "/etc/ember/cert.pem", "/etc/ember/cert.pem"},
		{"vmm", "firecracker_bin", "/opt/fc/firecracker", "/opt/fc/firecracker"},
		{"vmm", "firecracker_bin", "fcsim", "fcsim"},
		{"agent", "log_level", "err", "err"},
		{"agent", "log_level", "error", "err"},
		{"agent", "log_level", "warning", "warning"},
		{"agent", "log_level", "notice", "notice"},
		{"agent", "log_level", "debug", "debug"},
	};
	Fixture *fx = *state;

	for (size_t i = 0; i < ELEMENTSOF(good); i++) {
		_cleanup_free_ char *dumped = NULL;
		int r = config_set(&fx->c, good[i].section, good[i].key, good[i].value,
				   fx_error(fx));

		if (r < 0)
			fail_msg("[%s] %s = \"%s\" refused: %s", good[i].section, good[i].key,
				 good[i].value, fx->error);
		dumped = dump_value(&fx->c, good[i].key);
		assert_non_null(dumped);
		if (strcmp(dumped, good[i].dumped) != 0)
			fail_msg("[%s] %s = \"%s\" stored as \"%s\", expected \"%s\"",
				 good[i].section, good[i].key, good[i].value, dumped,
				 good[i].dumped);
	}
}

/* ---- bad input: refused, with a message that says where, what and what would do ---- */

typedef struct BadValue {
	const char *section, *key, *value;
	const char *allowed; /* part of the "expected ..." text */
} BadValue;

static const BadValue bad_values[] = {
	{"api", "insecure_tcp", "maybe", "true or false"},
	{"api", "insecure_tcp", "", "true or false"},
	{"api", "max_message_mib", "0", "from 1 to 1024"},
	{"api", "max_message_mib", "1025", "from 1 to 1024"},
	{"api", "max_message_mib", "4294967297", "from 1 to 1024"},
	{"api", "max_message_mib", "99999999999999999999999", "from 1 to 1024"},
	{"api", "shutdown_grace_s", "3601", "from 0 to 3600"},
	{"api", "max_concurrent_calls", "-1", "from 1 to 4096"},
	{"api", "shutdown_grace_s", "-0", "from 0 to 3600"},
	{"api", "keepalive_time_s", "thirty", "from 1 to 86400"},
	{"api", "keepalive_timeout_s", "10s", "from 1 to 3600"},
	{"api", "min_ping_interval_s", "1.5", "from 1 to 3600"},
	{"api", "max_concurrent_calls", "0x10", "from 1 to 4096"},
	{"api", "max_concurrent_calls", "", "from 1 to 4096"},
	{"agent", "state_dir", "var/lib/ember", "an absolute path"},
	{"agent", "state_dir", "", "an absolute path"},
	{"agent", "run_dir", "./run", "an absolute path"},
	{"agent", "log_level", "verbose", "debug, info, notice, warning or err"},
	{"agent", "log_level", "crit", "debug, info, notice, warning or err"},
	{"agent", "log_level", "", "debug, info, notice, warning or err"},
	{"vmm", "firecracker_bin", "bin/firecracker", "absolute path"},
	{"vmm", "firecracker_bin", "", "absolute path"},
	{"api", "socket", "run/ember.sock", "an absolute path"},
	{"api", "tls_cert", "cert.pem", "an absolute path"},
	{"api", "tls_key", "~/key.pem", "an absolute path"},
	{"api", "tls_client_ca", "ca.pem", "an absolute path"},
	{"api", "tcp_listen", "nocolon", "HOST:PORT"},
	{"api", "tcp_listen", ":80", "HOST:PORT"},
	{"api", "tcp_listen", "host:99999", "HOST:PORT"},
	{"api", "tcp_listen", "host:", "HOST:PORT"},
	{"api", "tcp_listen", "host:-1", "HOST:PORT"},
	{"api", "tcp_listen", "host:http", "HOST:PORT"},
	{"api", "tcp_listen", "::1:80", "HOST:PORT"},
	{"api", "tcp_listen", "[::1]", "HOST:PORT"},
	{"api", "tcp_listen", "[]:80", "HOST:PORT"},
	{"api", "tcp_listen", "[::1:80", "HOST:PORT"},
	{"api", "tcp_listen", "unix:/run/x.sock", "HOST:PORT"},
	{"templates", "max_artifact_bytes", "0", "a whole number of bytes, at least 1"},
	{"templates", "max_artifact_bytes", "-1", "a whole number of bytes, at least 1"},
	{"templates", "max_artifact_bytes", "18446744073709551616", "a whole number of bytes"},
	{"templates", "max_artifact_bytes", "1G", "a whole number of bytes"},
	{"templates", "max_parallel_pulls", "0", "from 1 to 64"},
	{"templates", "pull_retry_delay_ms", "60001", "from 1 to 60000"},
	{"templates", "ca_file", "ca.pem", "absolute path"},
};

static void check_bad_value_message(const BadValue *b, const char *msg)
{
	_cleanup_free_ char *quoted = NULL;

	assert_true(asprintf(&quoted, "\"%s\"", b->value) >= 0);
	assert_contains(msg, b->key);
	assert_contains(msg, quoted);
	assert_contains(msg, b->allowed);
}

static void test_bad_values_in_file(void **state)
{
	Fixture *fx = *state;
	_cleanup_free_ char *before = dump_string(&fx->c);

	for (size_t i = 0; i < ELEMENTSOF(bad_values); i++) {
		const BadValue *b = &bad_values[i];
		_cleanup_free_ char *content = NULL, *where = NULL, *after = NULL;
		const char *path;
		int r;

		assert_true(asprintf(&content, "# case %zu\n[%s]\n%s = %s\n", i, b->section, b->key,
				     b->value) >= 0);
		r = fx_load(fx, content, &path);
		if (r != -EINVAL)
			fail_msg("[%s] %s = \"%s\": got %d, expected -EINVAL", b->section, b->key,
				 b->value, r);
		assert_non_null(fx->error);
		/* "file:line: " first, as compilers do, so editors can jump to it. */
		assert_true(asprintf(&where, "%s:3: ", path) >= 0);
		if (strncmp(fx->error, where, strlen(where)) != 0)
			fail_msg("expected \"%s\" to start with \"%s\"", fx->error, where);
		check_bad_value_message(b, fx->error);

		/* A refused value changes nothing. */
		after = dump_string(&fx->c);
		assert_string_equal(after, before);
	}
}

/* The same checks apply to overrides from the command line, which have no file or line. */
static void test_bad_values_set(void **state)
{
	Fixture *fx = *state;
	_cleanup_free_ char *before = dump_string(&fx->c), *after = NULL;

	for (size_t i = 0; i < ELEMENTSOF(bad_values); i++) {
		const BadValue *b = &bad_values[i];
		int r = config_set(&fx->c, b->section, b->key, b->value, fx_error(fx));

		if (r != -EINVAL)
			fail_msg("[%s] %s = \"%s\": got %d, expected -EINVAL", b->section, b->key,
				 b->value, r);
		assert_non_null(fx->error);
		check_bad_value_message(b, fx->error);
		/* Callers that only want the verdict pass no error pointer. */
		assert_int_equal(config_set(&fx->c, b->section, b->key, b->value, NULL), -EINVAL);
	}
	after = dump_string(&fx->c);
	assert_string_equal(after, before);
}

static void test_unknown_key(void **state)
{
	Fixture *fx = *state;
	_cleanup_free_ char *where = NULL;
	const char *path;

	assert_true(fx_load(fx, "[api]\nmax_message_mib = 8\nmax_mesage_mib = 32\n", &path) < 0);
	assert_true(asprintf(&where, "%s:3: ", path) >= 0);
	assert_contains(fx->error, where);
	assert_contains(fx->error, "max_mesage_mib");
	assert_contains(fx->error, "[api]");

	/* A key of the other section is unknown here: sections are not decoration. */
	assert_true(config_set(&fx->c, "api", "state_dir", "/srv", fx_error(fx)) < 0);
	assert_contains(fx->error, "state_dir");
	assert_contains(fx->error, "[api]");
	assert_string_equal(fx->c.state_dir, "/var/lib/ember");
}

static void test_unknown_section(void **state)
{
	Fixture *fx = *state;
	_cleanup_free_ char *where = NULL;
	const char *path;

	assert_true(fx_load(fx, "# comment\n[agnet]\nstate_dir = /srv/state\n", &path) < 0);
	assert_true(asprintf(&where, "%s:3: ", path) >= 0);
	assert_contains(fx->error, where);
	assert_contains(fx->error, "[agnet]");
	/* What is allowed: the sections that exist. */
	assert_contains(fx->error, "[agent]");
	assert_contains(fx->error, "[api]");
	assert_string_equal(fx->c.state_dir, "/var/lib/ember");

	/* Keys before any section header belong to no section. */
	assert_true(fx_load(fx, "state_dir = /srv/state\n", &path) < 0);
	free(where);
	assert_true(asprintf(&where, "%s:1: ", path) >= 0);
	assert_contains(fx->error, where);
	assert_string_equal(fx->c.state_dir, "/var/lib/ember");
}

static void test_syntax_error(void **state)
{
	Fixture *fx = *state;
	_cleanup_free_ char *where = NULL;
	const char *path;

	assert_int_equal(fx_load(fx,
				 "[agent]\n"
				 "state_dir = /srv/state\n"
				 "\n"
				 "this line is not ini\n"
				 "run_dir = /srv/run\n",
				 &path),
			 -EINVAL);
	assert_true(asprintf(&where, "%s:4: ", path) >= 0);
	assert_contains(fx->error, where);
	assert_contains(fx->error, "syntax error");
	assert_null(fx->c.loaded_from);

	/* Only a comment follows: config_load_file() reports a refused key ahead of an earlier
	 * syntax error, and a key here would land in no section. */
	assert_int_equal(fx_load(fx, "[agent\n# state_dir = /srv/state\n", &path), -EINVAL);
	free(where);
	assert_true(asprintf(&where, "%s:1: ", path) >= 0);
	assert_contains(fx->error, where);
	assert_contains(fx->error, "syntax error");
}

/* Comments, blank lines and earlier good keys all count: the line number must be the line an
 * editor shows. */
static void test_error_line_number(void **state)
{
	Fixture *fx = *state;
	_cleanup_free_ char *where = NULL;
	const char *path;

	assert_int_equal(fx_load(fx,
				 "# ember.conf\n"
				 "\n"
				 "[agent]\n"
				 "; the state\n"
				 "state_dir = /srv/state\n"
				 "\n"
				 "[api]\n"
				 "max_message_mib = 16\n"
				 "# keepalive\n"
				 "keepalive_time_s = 0\n"
				 "keepalive_timeout_s = 0\n",
				 &path),
			 -EINVAL);
	assert_true(asprintf(&where, "%s:10: ", path) >= 0);
	if (strncmp(fx->error, where, strlen(where)) != 0)
		fail_msg("expected \"%s\" to start with \"%s\"", fx->error, where);
	/* The first bad line is reported, not the last. */
	assert_contains(fx->error, "keepalive_time_s");
}

/* ---- config_finish: keys that only make sense together ---- */

static void test_tcp_needs_tls_or_insecure(void **state)
{
	Fixture *fx = *state;

	assert_int_equal(config_set(&fx->c, "api", "tcp_listen", "0.0.0.0:7070", fx_error(fx)), 0);
	assert_int_equal(config_finish(&fx->c, fx_error(fx)), -EINVAL);
	assert_contains(fx->error, "tcp_listen");
	assert_contains(fx->error, "0.0.0.0:7070");
	assert_contains(fx->error, "tls_cert");
	assert_contains(fx->error, "insecure_tcp");

	/* Plaintext only when asked for in so many words. */
	assert_int_equal(config_set(&fx->c, "api", "insecure_tcp", "true", fx_error(fx)), 0);
	assert_int_equal(config_finish(&fx->c, fx_error(fx)), 0);
}

static void test_partial_tls(void **state)
{
	Fixture *fx = *state;
	const char *cert = fx_file(fx, "cert"), *key = fx_file(fx, "key");

	/* Refused with or without tcp_listen: a half-configured TLS is a mistake either way. */
	assert_int_equal(config_set(&fx->c, "api", "tls_cert", cert, fx_error(fx)), 0);
	assert_int_equal(config_finish(&fx->c, fx_error(fx)), -EINVAL);
	assert_contains(fx->error, "tls_cert");
	assert_contains(fx->error, "tls_key");
	assert_contains(fx->error, "tls_client_ca");

	assert_int_equal(config_set(&fx->c, "api", "tls_key", key, fx_error(fx)), 0);
	assert_int_equal(config_set(&fx->c, "api", "tcp_listen", "[::1]:7070", fx_error(fx)), 0);
	assert_int_equal(config_finish(&fx->c, fx_error(fx)), -EINVAL);
	assert_contains(fx->error, "tls_client_ca");
}

static void test_insecure_with_tls(void **state)
{
	Fixture *fx = *state;
	const char *cert = fx_file(fx, "cert"), *key = fx_file(fx, "key"), *ca = fx_file(fx, "ca");

	assert_int_equal(config_set(&fx->c, "api", "tcp_listen", "0.0.0.0:7070", fx_error(fx)), 0);
	assert_int_equal(config_set(&fx->c, "api", "tls_cert", cert, fx_error(fx)), 0);
	assert_int_equal(config_set(&fx->c, "api", "tls_key", key, fx_error(fx)), 0);
	assert_int_equal(config_set(&fx->c, "api", "tls_client_ca", ca, fx_error(fx)), 0);
	assert_int_equal(config_set(&fx->c, "api", "insecure_tcp", "true", fx_error(fx)), 0);
	assert_int_equal(config_finish(&fx->c, fx_error(fx)), -EINVAL);
	assert_contains(fx->error, "insecure_tcp");
	assert_contains(fx->error, "TLS");
}

static void test_tls_files_missing(void **state)
{
	static const char *const keys[] = {"tls_cert", "tls_key", "tls_client_ca"};
	static const char missing[] = "/nonexistent/ember-test/file.pem";
	Fixture *fx = *state;

	/* Each of the three in turn is the missing one; the message names that one. */
	for (size_t i = 0; i < ELEMENTSOF(keys); i++) {
		Config *c = &fx->other;

		config_free(c);
		assert_int_equal(config_init(c), 0);
		assert_int_equal(config_set(c, "api", "tcp_listen", "[::1]:7070", NULL), 0);
		for (size_t j = 0; j < ELEMENTSOF(keys); j++)
			assert_int_equal(config_set(c, "api", keys[j],
						    i == j ? missing : fx_file(fx, "pem"), NULL),
					 0);
		assert_int_equal(config_finish(c, fx_error(fx)), -ENOENT);
		assert_contains(fx->error, keys[i]);
		assert_contains(fx->error, missing);
	}
}

static void test_tls_all_readable(void **state)
{
	Fixture *fx = *state;

	assert_int_equal(fx_load(fx, "[api]\ntcp_listen = 0.0.0.0:7070\n", NULL), 0);
	assert_int_equal(config_set(&fx->c, "api", "tls_cert", fx_file(fx, "c"), fx_error(fx)), 0);
	assert_int_equal(config_set(&fx->c, "api", "tls_key", fx_file(fx, "k"), fx_error(fx)), 0);
	assert_int_equal(
		config_set(&fx->c, "api", "tls_client_ca", fx_file(fx, "ca"), fx_error(fx)), 0);
	assert_int_equal(config_finish(&fx->c, fx_error(fx)), 0);
	assert_null(fx->error);
}

static void test_socket_length(void **state)
{
	Fixture *fx = *state;
	char path[128];

	/* 100 bytes is the most; sun_path is 108 and "<socket>.lock" needs room too. */
	path[0] = '/';
	memset(path + 1, 'a', 99);
	path[100] = 0;
	assert_int_equal(config_set(&fx->c, "api", "socket", path, fx_error(fx)), 0);
	assert_int_equal(config_finish(&fx->c, fx_error(fx)), 0);

	path[100] = 'a';
	path[101] = 0;
	assert_int_equal(config_set(&fx->c, "api", "socket", path, fx_error(fx)), 0);
	assert_int_equal(config_finish(&fx->c, fx_error(fx)), -ENAMETOOLONG);
	assert_contains(fx->error, "socket");
	assert_contains(fx->error, path);
	assert_contains(fx->error, "100");

	/* A derived socket is held to the same limit: run_dir + "/ember.sock" (11 bytes). */
	memset(path + 1, 'r', 89);
	path[90] = 0;
	assert_int_equal(config_set(&fx->other, "agent", "run_dir", path, fx_error(fx)), 0);
	assert_int_equal(config_finish(&fx->other, fx_error(fx)), -ENAMETOOLONG);
	assert_contains(fx->error, "socket");
}

static void test_socket_length_derived_ok(void **state)
{
	Fixture *fx = *state;
	char path[128];

	path[0] = '/';
	memset(path + 1, 'r', 88);
	path[89] = 0;
	assert_int_equal(config_set(&fx->c, "agent", "run_dir", path, fx_error(fx)), 0);
	assert_int_equal(config_finish(&fx->c, fx_error(fx)), 0);
	assert_int_equal(strlen(fx->c.socket), 100);
}

/* ---- files: missing, and the order of sources ---- */

static void test_missing_file(void **state)
{
	Fixture *fx = *state;
	_cleanup_free_ char *path = NULL, *before = dump_string(&fx->c), *after = NULL;

	assert_true(asprintf(&path, "/tmp/ember-test-config-missing.%d.conf", (int)getpid()) >= 0);

	/* The packaged default file is optional: the embedded defaults are a working config. */
	assert_int_equal(config_load_file(&fx->c, path, false, fx_error(fx)), 0);
	assert_null(fx->error);
	assert_null(fx->c.loaded_from);
	after = dump_string(&fx->c);
	assert_string_equal(after, before);

	/* A file named on the command line must be there. */
	assert_int_equal(config_load_file(&fx->c, path, true, fx_error(fx)), -ENOENT);
	assert_contains(fx->error, path);
	assert_null(fx->c.loaded_from);
}

static void test_later_wins(void **state)
{
	Fixture *fx = *state;
	const char *second;

	assert_int_equal(fx_load(fx,
				 "[agent]\nstate_dir = /srv/one\nstate_dir = /srv/two\n"
				 "[api]\nmax_message_mib = 8\n",
				 NULL),
			 0);
	assert_string_equal(fx->c.state_dir, "/srv/two");

	assert_int_equal(fx_load(fx, "[agent]\nstate_dir = /srv/three\n", &second), 0);
	assert_string_equal(fx->c.state_dir, "/srv/three");
	assert_string_equal(fx->c.loaded_from, second);
	/* Keys the second file does not mention keep the first file's value. */
	assert_int_equal(fx->c.max_message_mib, 8);

	assert_int_equal(config_set(&fx->c, "agent", "state_dir", "/srv/four", fx_error(fx)), 0);
	assert_string_equal(fx->c.state_dir, "/srv/four");
	assert_int_equal(config_set(&fx->c, "api", "max_message_mib", "9", fx_error(fx)), 0);
	assert_int_equal(fx->c.max_message_mib, 9);

	/* A refused override keeps what was there. */
	assert_int_equal(config_set(&fx->c, "agent", "state_dir", "relative", fx_error(fx)),
			 -EINVAL);
	assert_string_equal(fx->c.state_dir, "/srv/four");
}

/* ---- config_dump ---- */

/* Dumps fx->c to a file and loads that into fx->other, which must come out equal. */
static void dump_reload(Fixture *fx)
{
	const char *path = fx_file(fx, "");
	FILE *f = fopen(path, "we");

	assert_non_null(f);
	config_dump(&fx->c, f);
	assert_int_equal(fclose(f), 0);

	assert_int_equal(config_load_file(&fx->other, path, true, fx_error(fx)), 0);
	assert_null(fx->error);
	assert_int_equal(config_finish(&fx->other, fx_error(fx)), 0);
	assert_config_equal(&fx->c, &fx->other);
}

static void test_dump_roundtrip_defaults(void **state)
{
	Fixture *fx = *state;

	assert_int_equal(config_finish(&fx->c, fx_error(fx)), 0);
	/* Start the other side away from the defaults, so equality is not a coincidence. */
	assert_int_equal(config_set(&fx->other, "agent", "state_dir", "/x", NULL), 0);
	assert_int_equal(config_set(&fx->other, "api", "shutdown_grace_s", "1", NULL), 0);
	dump_reload(fx);
}

static void test_dump_roundtrip_values(void **state)
{
	Fixture *fx = *state;

	assert_int_equal(fx_load(fx,
				 "[agent]\n"
				 "state_dir = /srv/ember/state\n"
				 "run_dir = /srv/ember/run\n"
				 "log_level = notice\n"
				 "[vmm]\n"
				 "firecracker_bin = fcsim\n"
				 "[api]\n"
				 "socket = /srv/ember/api.sock\n"
				 "tcp_listen = [::1]:7070\n"
				 "insecure_tcp = on\n"
				 "max_message_mib = 64\n"
				 "keepalive_time_s = 86400\n"
				 "keepalive_timeout_s = 1\n"
				 "min_ping_interval_s = 3600\n"
				 "max_concurrent_calls = 1\n"
				 "shutdown_grace_s = 0\n",
				 NULL),
			 0);
	assert_int_equal(config_finish(&fx->c, fx_error(fx)), 0);
	dump_reload(fx);
}

static void test_dump_roundtrip_tls(void **state)
{
	Fixture *fx = *state;

	assert_int_equal(config_set(&fx->c, "api", "tcp_listen", "0.0.0.0:7070", NULL), 0);
	assert_int_equal(config_set(&fx->c, "api", "tls_cert", fx_file(fx, "c"), NULL), 0);
	assert_int_equal(config_set(&fx->c, "api", "tls_key", fx_file(fx, "k"), NULL), 0);
	assert_int_equal(config_set(&fx->c, "api", "tls_client_ca", fx_file(fx, "a"), NULL), 0);
	assert_int_equal(config_finish(&fx->c, fx_error(fx)), 0);
	dump_reload(fx);
}

static void test_dump_log_levels(void **state)
{
	static const struct {
		const char *name;
		int level;
	} levels[] = {
		{"debug", LOG_DEBUG},     {"info", LOG_INFO}, {"notice", LOG_NOTICE},
		{"warning", LOG_WARNING}, {"err", LOG_ERR},   {"error", LOG_ERR},
	};
	Fixture *fx = *state;

	for (size_t i = 0; i < ELEMENTSOF(levels); i++) {
		_cleanup_free_ char *dumped = NULL;

		assert_int_equal(config_set(&fx->c, "agent", "log_level", levels[i].name, NULL), 0);
		assert_int_equal(fx->c.log_level, levels[i].level);
		dumped = dump_value(&fx->c, "log_level");
		assert_non_null(dumped);
		assert_int_equal(config_set(&fx->other, "agent", "log_level", dumped, NULL), 0);
		assert_int_equal(fx->other.log_level, levels[i].level);
	}
}

/* ---- documentation ---- */

static bool is_word_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       c == '_';
}

/* `word` in [s, end) as a whole word: "socket" must not be satisfied by "websocket". */
static const char *find_word(const char *s, const char *end, const char *word)
{
	size_t n = strlen(word);

	for (const char *p = s; p && p + n <= end; p++) {
		p = memmem(p, (size_t)(end - p), word, n);
		if (!p)
			return NULL;
		if ((p == s || !is_word_char(p[-1])) && (p + n == end || !is_word_char(p[n])))
			return p;
	}
	return NULL;
}

/* A value as a token: "15" must not match in "150", "firecracker" not in "firecracker_bin". */
static bool has_value_token(const char *s, const char *end, const char *value)
{
	size_t n = strlen(value);

	for (const char *p = s; p + n <= end; p++) {
		p = memmem(p, (size_t)(end - p), value, n);
		if (!p)
			return false;
		bool before_ok = p == s || !(is_word_char(p[-1]) || strchr("/.-", p[-1]));
		bool after_ok = p + n == end || !(is_word_char(p[n]) || strchr("/.-", p[n]));
		if (before_ok && after_ok)
			return true;
	}
	return false;
}

/* "key = value" or "# key = value" (also "#key=value", ";" comments, an inline "; note"),
 * with exactly `value` after the '='. This is the only form that can show an empty default. */
static bool is_assignment_line(const char *s, const char *end, const char *key, const char *value)
{
	size_t kn = strlen(key), vn = strlen(value);

	while (s < end && (*s == ' ' || *s == '\t' || *s == '#' || *s == ';'))
		s++;
	if ((size_t)(end - s) < kn || memcmp(s, key, kn) != 0)
		return false;
	s += kn;
	while (s < end && (*s == ' ' || *s == '\t'))
		s++;
	if (s == end || *s != '=')
		return false;
	s++;
	while (s < end && (*s == ' ' || *s == '\t'))
		s++;
	/* An inline "; note" ends the value, as in inih; p[-1] exists, at worst it is the '='. */
	for (const char *p = s; p < end; p++) {
		if (*p == ';' && (p[-1] == ' ' || p[-1] == '\t')) {
			end = p;
			break;
		}
	}
	while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r'))
		end--;
	return (size_t)(end - s) == vn && memcmp(s, value, vn) == 0;
}

static bool conf_documents_default(const char *text, const ConfigKeyInfo *k)
{
	for (const char *line = text; *line;) {
		const char *end = strchrnul(line, '\n');

		if (find_word(line, end, k->key)) {
			if (is_assignment_line(line, end, k->key, k->default_value))
				return true;
			if (k->default_value[0] && has_value_token(line, end, k->default_value))
				return true;
		}
		line = *end ? end + 1 : end;
	}
	return false;
}

static char *read_doc(const char *name)
{
	const char *srcdir = getenv("EMBER_SRCDIR") ?: ".";
	/* On the stack: fail_msg() leaves by longjmp, past any cleanup attribute. */
	char path[PATH_MAX];
	char *text = NULL;
	int r;

	assert_true(snprintf(path, sizeof(path), "%s/%s", srcdir, name) < (int)sizeof(path));
	/* Missing documentation is a failure, not a skip: every key must be documented. */
	r = read_full_file(path, 1 << 20, &text, NULL);
	if (r < 0)
		fail_msg("cannot read %s: %s (README.md and ember.conf must document every key; "
			 "set EMBER_SRCDIR to the source tree)",
			 path, strerror(-r));
	return text;
}

static void test_keys_documented(void **state)
{
	Fixture *fx = *state;
	const char *readme, *conf;
	size_t missing = 0;

	readme = fx->docs[0] = read_doc("README.md");
	conf = fx->docs[1] = read_doc("ember.conf");
	/* Report every gap at once, so one run gives the whole list to fix. */
	for (size_t i = 0; i < config_n_keys(); i++) {
		const ConfigKeyInfo *k = config_key_info(i);

		if (!find_word(readme, readme + strlen(readme), k->key)) {
			print_error("README.md does not mention [%s] %s\n", k->section, k->key);
			missing++;
		}
		if (!find_word(conf, conf + strlen(conf), k->key)) {
			print_error("ember.conf does not mention [%s] %s\n", k->section, k->key);
			missing++;
		} else if (!conf_documents_default(conf, k)) {
			print_error("ember.conf does not give the default of %s: expected \"# %s = "
				    "%s\"%s or the default on a line naming the key\n",
				    k->key, k->key, k->default_value,
				    k->default_value[0] ? "" : " (empty)");
			missing++;
		}
	}
	if (missing > 0)
		fail_msg("%zu documentation gaps", missing);
}

int main(void)
{
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
	const struct CMUnitTest tests[] = {
		T(test_defaults),
		T(test_socket_follows_run_dir),
		T(test_http_listen_loopback),
		T(test_key_table),
		T(test_good_file),
		T(test_good_values),
		T(test_bad_values_in_file),
		T(test_bad_values_set),
		T(test_unknown_key),
		T(test_unknown_section),
		T(test_syntax_error),
		T(test_error_line_number),
		T(test_tcp_needs_tls_or_insecure),
		T(test_partial_tls),
		T(test_insecure_with_tls),
		T(test_tls_files_missing),
		T(test_tls_all_readable),
		T(test_socket_length),
		T(test_socket_length_derived_ok),
		T(test_missing_file),
		T(test_later_wins),
		T(test_dump_roundtrip_defaults),
		T(test_dump_roundtrip_values),
		T(test_dump_roundtrip_tls),
		T(test_dump_log_levels),
		T(test_keys_documented),
	};
#undef T

	return cmocka_run_group_tests(tests, NULL, NULL);
}
