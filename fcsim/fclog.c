/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Log and metrics files in Firecracker's shape. A log line is
 *   2026-11-28T07:31:00.123456789 [<instance id>:<thread>(:<LEVEL>)(:<file>:<line>)] <message>
 * (level and origin when show_level/show_log_origin are set); metrics are one JSON object per
 * line, written on FlushMetrics and at exit.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "common/macro.h"
#include "fcsim.h"

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static int log_fd = STDOUT_FILENO; /* Firecracker logs to stdout until configured */
static FcLevel log_level = FC_INFO;
static bool log_show_level, log_show_origin;
static char instance[128] = "anonymous-instance";

static int metrics_fd = -1;
static json_object *counters; /* "group.key" -> int, under log_mu */

static const char *const level_names[] = {"Off", "Error", "Warning", "Info", "Debug", "Trace"};
static const char *const level_tags[] = {"OFF", "ERROR", "WARN", "INFO", "DEBUG", "TRACE"};

int fclog_level_from_string(const char *s)
{
	for (size_t i = 0; s && i < ELEMENTSOF(level_names); i++)
		if (strcasecmp(s, level_names[i]) == 0)
			return (int)i;
	/* Firecracker also accepts "Warn". */
	if (s && strcasecmp(s, "warn") == 0)
		return FC_WARN;
	return -EINVAL;
}

void fclog_set_instance(const char *id)
{
	pthread_mutex_lock(&log_mu);
	snprintf(instance, sizeof(instance), "%s", id);
	pthread_mutex_unlock(&log_mu);
}

int fclog_open(const char *path, FcLevel level, bool show_level, bool show_origin,
	       const char *instance_id)
{
	int fd = -1;

	if (path) {
		/* A named pipe must not block us when nobody reads: O_NONBLOCK, as Firecracker. */
		fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_NONBLOCK | O_CLOEXEC, 0644);
		if (fd < 0)
			return -errno;
	}
	pthread_mutex_lock(&log_mu);
	if (fd >= 0) {
		if (log_fd > STDERR_FILENO)
			close(log_fd);
		log_fd = fd;
	}
	log_level = level;
	log_show_level = show_level;
	log_show_origin = show_origin;
	if (instance_id)
		snprintf(instance, sizeof(instance), "%s", instance_id);
	pthread_mutex_unlock(&log_mu);
	return 0;
}

void fclog(FcLevel level, const char *file, int line, const char *format, ...)
{
	char msg[2048], head[512], thread[16] = "main", ts[64];
	struct timespec now;
	struct tm tm;
	va_list ap;

	if (level == FC_OFF)
		return;
	pthread_mutex_lock(&log_mu);
	if (level > log_level) {
		pthread_mutex_unlock(&log_mu);
		return;
	}
	va_start(ap, format);
	vsnprintf(msg, sizeof(msg), format, ap);
	va_end(ap);
	(void)prctl(PR_GET_NAME, thread);
	clock_gettime(CLOCK_REALTIME, &now);
	gmtime_r(&now.tv_sec, &tm);
	strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
	size_t n = (size_t)snprintf(head, sizeof(head), "%s.%09ld [%s:%s", ts, now.tv_nsec,
				    instance, thread);
	if (log_show_level && n < sizeof(head))
		n += (size_t)snprintf(head + n, sizeof(head) - n, ":%s", level_tags[level]);
	if (log_show_origin && n < sizeof(head))
		snprintf(head + n, sizeof(head) - n, ":%s:%d", file, line);
	dprintf(log_fd, "%s] %s\n", head, msg);
	pthread_mutex_unlock(&log_mu);
}

int fcmetrics_open(const char *path)
{
	int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_NONBLOCK | O_CLOEXEC, 0644);
	if (fd < 0)
		return -errno;
	pthread_mutex_lock(&log_mu);
	if (metrics_fd >= 0)
		close(metrics_fd);
	metrics_fd = fd;
	pthread_mutex_unlock(&log_mu);
	return 0;
}

void fcmetrics_count(const char *key)
{
	json_object *v;

	pthread_mutex_lock(&log_mu);
	if (!counters)
		counters = json_object_new_object();
	if (counters) {
		if (json_object_object_get_ex(counters, key, &v))
			json_object_set_int64(v, json_object_get_int64(v) + 1);
		else
			json_object_object_add(counters, key, json_object_new_int64(1));
	}
	pthread_mutex_unlock(&log_mu);
}

/* {"utc_timestamp_ms": N, "<group>": {"<key>": N, ...}, ...}: counters since the last flush,
 * as Firecracker reports them. */
int fcmetrics_flush(Vm *vm)
{
	json_object *root = json_object_new_object();
	struct timespec now;
	int r = 0;
	(void)vm;

	if (!root)
		return -ENOMEM;
	clock_gettime(CLOCK_REALTIME, &now);
	json_object_object_add(
		root, "utc_timestamp_ms",
		json_object_new_int64((int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000));
	pthread_mutex_lock(&log_mu);
	if (metrics_fd < 0) {
		pthread_mutex_unlock(&log_mu);
		json_object_put(root);
		return -ENOENT;
	}
	if (counters) {
		json_object_object_foreach(counters, key, val)
		{
			char group[64];
			const char *dot = strchr(key, '.');
			snprintf(group, sizeof(group), "%.*s",
				 dot ? (int)(dot - key) : (int)strlen(key), key);
			json_object *g;
			if (!json_object_object_get_ex(root, group, &g)) {
				g = json_object_new_object();
				json_object_object_add(root, group, g);
			}
			json_object_object_add(g, dot ? dot + 1 : key,
					       json_object_new_int64(json_object_get_int64(val)));
		}
	}
	json_object_put(counters);
	counters = NULL;
	if (dprintf(metrics_fd, "%s\n", json_object_to_json_string(root)) < 0)
		r = -errno;
	pthread_mutex_unlock(&log_mu);
	json_object_put(root);
	return r;
}

char *fc_abspath(const char *path)
{
	char cwd[4096], *out;

	if (!path)
		return NULL;
	if (path[0] == '/' || !getcwd(cwd, sizeof(cwd)))
		return strdup(path);
	if (asprintf(&out, "%s/%s", cwd, path) < 0)
		return NULL;
	return out;
}
