/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Logging front-end. The agent logs to the journal with structured fields (DESIGN.md §10) when
 * its stderr is connected to journald, and to stderr otherwise.
 *
 * Lower modules (storage/, netns/, fcctl/) are compiled with -DLOG_DEBUG_ONLY: they see only
 * log_debug(), so the layering rule "lower modules never log above debug" is enforced by the
 * compiler. Higher levels are the agent's decision, made once.
 */
#pragma once

#include <stddef.h>
#include <syslog.h>

#include "macro.h"

typedef struct LogField {
	const char *key; /* journal field name: upper case, e.g. "SANDBOX_ID" */
	const char *value;
} LogField;

typedef enum LogTarget {
	LOG_TARGET_AUTO, /* journal when stderr is connected to it, stderr otherwise */
	LOG_TARGET_STDERR,
	LOG_TARGET_JOURNAL,
	_LOG_TARGET_MAX,
	_LOG_TARGET_INVALID = -EINVAL,
} LogTarget;

void log_setup(const char *ident, LogTarget target);
void log_set_max_level(int level);
int log_get_max_level(void);
LogTarget log_get_target(void);

/* "debug", "info", "notice", "warning", "err"/"error", "crit" → LOG_*; -EINVAL otherwise. */
int log_level_from_string(const char *s);
const char *log_level_to_string(int level);

/* Returns -abs(error) when error != 0, 0 otherwise, so callers can `return log_error_errno(r,…)`.
 */
int log_internal(int level, int error, const LogField *fields, size_t n_fields, const char *file,
		 int line, const char *func, const char *format, ...) _printf_(8, 9);

#define log_full_errno(level, error, ...)                                                          \
	({                                                                                         \
		int _level_ = (level), _e_ = (error);                                              \
		(_level_ <= log_get_max_level()) ? log_internal(_level_, _e_, NULL, 0, __FILE__,   \
								__LINE__, __func__, __VA_ARGS__)   \
						 : (_e_ > 0 ? -_e_ : _e_);                         \
	})

#define log_debug(...)              log_full_errno(LOG_DEBUG, 0, __VA_ARGS__)
#define log_debug_errno(error, ...) log_full_errno(LOG_DEBUG, error, __VA_ARGS__)

#ifndef LOG_DEBUG_ONLY
#define log_full(level, ...)          log_full_errno(level, 0, __VA_ARGS__)
#define log_info(...)                 log_full_errno(LOG_INFO, 0, __VA_ARGS__)
#define log_notice(...)               log_full_errno(LOG_NOTICE, 0, __VA_ARGS__)
#define log_warning(...)              log_full_errno(LOG_WARNING, 0, __VA_ARGS__)
#define log_error(...)                log_full_errno(LOG_ERR, 0, __VA_ARGS__)
#define log_info_errno(error, ...)    log_full_errno(LOG_INFO, error, __VA_ARGS__)
#define log_warning_errno(error, ...) log_full_errno(LOG_WARNING, error, __VA_ARGS__)
#define log_error_errno(error, ...)   log_full_errno(LOG_ERR, error, __VA_ARGS__)

/* Structured: log_struct(LOG_INFO, 0, LOG_FIELDS({"OP", "create"}, {"SANDBOX_ID", id}), "…");
 * fields with a NULL value are skipped. */
#define LOG_FIELDS(...) ((const LogField[]){__VA_ARGS__}), ELEMENTSOF(((LogField[]){__VA_ARGS__}))
#define log_struct(level, error, fields_and_count, ...)                                            \
	({                                                                                         \
		int _level_ = (level), _e_ = (error);                                              \
		(_level_ <= log_get_max_level())                                                   \
			? log_internal(_level_, _e_, fields_and_count, __FILE__, __LINE__,         \
				       __func__, __VA_ARGS__)                                      \
			: (_e_ > 0 ? -_e_ : _e_);                                                  \
	})
#endif
