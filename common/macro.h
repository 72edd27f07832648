/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Small macros used everywhere: cleanup attributes and ownership hand-over.
 * Modelled on systemd's src/basic/macro.h, cut down to what ember needs.
 */
#pragma once

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define _cleanup_(f)   __attribute__((cleanup(f)))
#define _unused_       __attribute__((unused))
#define _printf_(a, b) __attribute__((format(printf, a, b)))
#define _noreturn_     __attribute__((noreturn))
#define _likely_(x)    __builtin_expect(!!(x), 1)
#define _unlikely_(x)  __builtin_expect(!!(x), 0)

#define ELEMENTSOF(x)  (sizeof(x) / sizeof((x)[0]))

/* Hand a pointer or fd over to someone else: the local variable is reset so its cleanup does
 * nothing. Use only once the whole operation has succeeded. */
#define TAKE_PTR(p)                                                                                \
	({                                                                                         \
		__typeof__(p) _p_ = (p);                                                           \
		(p) = NULL;                                                                        \
		_p_;                                                                               \
	})
#define TAKE_FD(fd)                                                                                \
	({                                                                                         \
		int _fd_ = (fd);                                                                   \
		(fd) = -EBADF;                                                                     \
		_fd_;                                                                              \
	})

static inline void freep(void *p)
{
	free(*(void **)p);
}
#define _cleanup_free_ _cleanup_(freep)

/* close() that keeps errno, for cleanup paths: the interesting error is the earlier one. */
static inline int safe_close(int fd)
{
	if (fd >= 0) {
		int saved = errno;
		close(fd);
		errno = saved;
	}
	return -EBADF;
}
static inline void closep(int *fd)
{
	safe_close(*fd);
}
#define _cleanup_close_ _cleanup_(closep)

static inline void fclosep(FILE **f)
{
	if (*f)
		fclose(*f);
}
#define _cleanup_fclose_ _cleanup_(fclosep)

/* Defines a cleanup helper for a pointer type: DEFINE_POINTER_CLEANUP(Foo, foo_free) makes
 * foo_freep(), usable as _cleanup_(foo_freep). `type` is a type name: it cannot be put in
 * parentheses. */
// NOLINTBEGIN(bugprone-macro-parentheses)
#define DEFINE_POINTER_CLEANUP(type, func)                                                         \
	static inline void func##p(type **p)                                                       \
	{                                                                                          \
		if (*p)                                                                            \
			func(*p);                                                                  \
	}
// NOLINTEND(bugprone-macro-parentheses)

/* errno as a negative value, never 0: for paths where a libc call "failed" without setting it. */
static inline int negative_errno(void)
{
	return errno > 0 ? -errno : -EIO;
}
