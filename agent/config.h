/* SPDX-License-Identifier: Apache-2.0 */
/*
 * emberd's configuration: an ini file (libinih) over embedded defaults, then command-line
 * overrides. Every key lives in one table (config.c) that also drives validation, the
 * --dump-config output and the test that README.md and ember.conf document every key.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define CONFIG_DEFAULT_FILE EMBER_SYSCONFDIR "/ember/ember.conf"

typedef struct Config {
	/* [agent] */
	char *state_dir;
	char *run_dir;
	int log_level;
	char *systemd; /* auto, yes, no */

	/* [api] */
	char *socket; /* empty in the file means <run_dir>/ember.sock; resolved by finish */
	char *tcp_listen;
	char *tls_cert;
	char *tls_key;
	char *tls_client_ca;
	bool insecure_tcp;
	unsigned max_message_mib;
	unsigned keepalive_time_s;
	unsigned keepalive_timeout_s;
	unsigned min_ping_interval_s;
	unsigned max_concurrent_calls;
	unsigned max_concurrent_streams;
	unsigned max_file_mib;
	unsigned shutdown_grace_s;

	/* [vmm] */
	char *vmm_kind; /* auto, firecracker, fcsim */
	char *firecracker_bin;
	char *fcsim_bin; /* empty: next to emberd, else PATH */
	char *jailer_bin;
	char *uffd_bin; /* empty: next to emberd, ../lib/ember, else PATH */
	bool uffd_prefetch;
	bool uffd_working_set;
	unsigned boot_timeout_s;

	/* [storage] */
	char *storage_backend; /* auto, dm, file */
	unsigned default_disk_mib;
	unsigned max_disk_mib;

	/* [network] */
	char *netns_dir;
	char *sandbox_range;
	char *veth_range;
	char *uplink; /* auto, none or a name */
	unsigned pool_size;
	bool default_allow_internet;

	/* [sandboxes] */
	unsigned max_sandboxes;
	unsigned memory_reserve_mib;
	unsigned worker_threads;
	unsigned event_log_size;
	unsigned default_lifetime_s;  /* 0: no end time unless a create gives one */
	unsigned max_lifetime_s;      /* 0: no cap */
	unsigned console_kib;         /* the console log's size */
	unsigned memory_overhead_mib; /* scope MemoryMax beyond memory_mib; 0: none */

	/* [http] */
	char *http_listen; /* empty: no HTTP listener */
	char *http_token_file;
	bool http_allow_remote;
	bool http_metrics_public;

	/* [templates] */
	bool demo_template;
	char *demo_kernel;
	char *pull_ca_file;
	uint64_t max_artifact_bytes;
	unsigned max_parallel_pulls;
	unsigned pull_retries;
	unsigned pull_retry_delay_ms;
	unsigned pull_stall_timeout_s;

	char *loaded_from; /* the config file read, NULL when none */
} Config;

typedef struct ConfigKeyInfo {
	const char *section;
	const char *key;
	const char *default_value; /* as written in the file; "" for empty */
	const char *allowed;       /* human description of valid values */
	const char *doc;
} ConfigKeyInfo;

/* Fills in the embedded defaults. */
int config_init(Config *c);
void config_free(Config *c);

/* Sets one key from its text form, validated. On failure *ret_error says which key, the value
 * and what is allowed (caller frees). */
int config_set(Config *c, const char *section, const char *key, const char *value,
	       char **ret_error);

/* Loads an ini file over the current values. must_exist=false: a missing file is fine. */
int config_load_file(Config *c, const char *path, bool must_exist, char **ret_error);

/* Derives what depends on other keys and checks combinations (TCP without TLS, …). */
int config_finish(Config *c, char **ret_error);

/* Writes the effective configuration as an ini file. */
void config_dump(const Config *c, FILE *f);

size_t config_n_keys(void);
const ConfigKeyInfo *config_key_info(size_t i);
