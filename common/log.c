/* SPDX-License-Identifier: Apache-2.0 */
#include "log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>

#define SD_JOURNAL_SUPPRESS_LOCATION
#include <systemd/sd-journal.h>

static atomic_int max_level = LOG_INFO;
static LogTarget target = LOG_TARGET_STDERR;
static const char *log_ident = "ember";

static const char *const level_names[] = {
	[LOG_EMERG] = "emerg", [LOG_ALERT] = "alert",     [LOG_CRIT] = "crit",
	[LOG_ERR] = "err",     [LOG_WARNING] = "warning", [LOG_NOTICE] = "notice",
	[LOG_INFO] = "info",   [LOG_DEBUG] = "debug",
};

int log_level_from_string(const char *s)
{
	if (!s)
		return -EINVAL;
	if (strcmp(s, "error") == 0)
		return LOG_ERR;
	for (size_t i = 0; i < ELEMENTSOF(level_names); i++)
		if (strcmp(s, level_names[i]) == 0)
			return (int)i;
	return -EINVAL;
}

const char *log_level_to_string(int level)
{
	if (level < 0 || (size_t)level >= ELEMENTSOF(level_names))
		return NULL;
	return level_names[level];
}

void log_set_max_level(int level)
{
	atomic_store(&max_level, level);
}

int log_get_max_level(void)
{
	return atomic_load(&max_level);
}

LogTarget log_get_target(void)
{
	return target;
}

/* systemd sets JOURNAL_STREAM=<dev>:<ino> for the stream it connects to stdout/stderr; only if
 * stderr is still that stream is the journal the right place (see systemd.exec(5)). */
static bool stderr_is_journal(void)
{
	const char *e = getenv("JOURNAL_STREAM");
	unsigned long long dev, ino;
	struct stat st;

	if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2)
		return false;
	if (fstat(STDERR_FILENO, &st) < 0)
		return false;
	return st.st_dev == (dev_t)dev && st.st_ino == (ino_t)ino;
}

void log_setup(const char *ident, LogTarget t)
{
	if (ident)
		log_ident = ident;
	if (t == LOG_TARGET_AUTO)
		t = stderr_is_journal() ? LOG_TARGET_JOURNAL : LOG_TARGET_STDERR;
	target = t;
}

#define LOG_MAX_FIELDS 24

static int log_to_journal(int level, int error, const LogField *fields, size_t n_fields,
			  const char *file, int line, const char *func, const char *msg)
{
	char *items[LOG_MAX_FIELDS + 8] = {};
	struct iovec iov[ELEMENTSOF(items)];
	size_t n = 0;
	int r = 0;

#define ADD(...)                                                                                   \
	do {                                                                                       \
		if (asprintf(&items[n], __VA_ARGS__) < 0) {                                        \
			items[n] = NULL;                                                           \
			r = -ENOMEM;                                                               \
			goto finish;                                                               \
		}                                                                                  \
		n++;                                                                               \
	} while (0)

	ADD("MESSAGE=%s", msg);
	ADD("PRIORITY=%d", level);
	ADD("SYSLOG_IDENTIFIER=%s", log_ident);
	ADD("CODE_FILE=%s", file);
	ADD("CODE_LINE=%d", line);
	ADD("CODE_FUNC=%s", func);
	if (error != 0)
		ADD("ERRNO=%d", error > 0 ? error : -error);
	for (size_t i = 0; i < n_fields && i < LOG_MAX_FIELDS; i++)
		if (fields[i].key && fields[i].value)
			ADD("%s=%s", fields[i].key, fields[i].value);
#undef ADD

	for (size_t i = 0; i < n; i++)
		iov[i] = (struct iovec){.iov_base = items[i], .iov_len = strlen(items[i])};
	r = sd_journal_sendv(iov, (int)n);
finish:
	for (size_t i = 0; i < n; i++)
		free(items[i]);
	return r;
}

static void log_to_stderr(int level, int error, const LogField *fields, size_t n_fields,
			  const char *msg)
{
	char line[4096];
	size_t len = 0;
	struct timespec ts;
	struct tm tm;

	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	len += strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
	len += (size_t)snprintf(line + len, sizeof(line) - len, ".%03ldZ %s[%d] %s: %s",
				ts.tv_nsec / 1000000, log_ident, (int)getpid(),
				log_level_to_string(level) ?: "?", msg);
	if (error != 0 && len < sizeof(line))
		len += (size_t)snprintf(line + len, sizeof(line) - len, " (%s)",
					strerror(error > 0 ? error : -error));
	for (size_t i = 0; i < n_fields && len < sizeof(line); i++) {
		if (!fields[i].key || !fields[i].value || strcmp(fields[i].key, "MESSAGE_ID") == 0)
			continue;
		len += (size_t)snprintf(line + len, sizeof(line) - len, " %s=%s", fields[i].key,
					fields[i].value);
	}
	if (len >= sizeof(line) - 1)
		len = sizeof(line) - 2;
	line[len++] = '\n';
	/* One write per line so lines from different threads never interleave. */
	(void)!write(STDERR_FILENO, line, len);
}

int log_internal(int level, int error, const LogField *fields, size_t n_fields, const char *file,
		 int line, const char *func, const char *format, ...)
{
	char msg[2048];
	va_list ap;
	int saved_errno = errno;

	va_start(ap, format);
	/* %m in the format refers to the error being reported, not whatever errno is now. */
	errno = error > 0 ? error : -error;
	vsnprintf(msg, sizeof(msg), format, ap);
	va_end(ap);

	if (target == LOG_TARGET_JOURNAL) {
		if (log_to_journal(level, error, fields, n_fields, file, line, func, msg) < 0)
			log_to_stderr(level, error, fields, n_fields, msg);
	} else {
		log_to_stderr(level, error, fields, n_fields, msg);
	}

	errno = saved_errno;
	return error > 0 ? -error : error;
}
