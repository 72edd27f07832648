/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Sandboxes' serial consoles: the log file each one's VMM writes, kept bounded, and what wakes
 * the ReadConsole calls that follow it.
 *
 * Each VMM writes its stdout and stderr (the guest's serial console) to
 * <run dir>/console.log itself, O_APPEND: emberd is not in the path, so a console goes on
 * while emberd restarts and a VMM never waits for emberd.
 *
 * The log is bounded without moving what the VMM writes: when the bytes it holds pass
 * console_kib and an eighth, the oldest blocks are punched out (FALLOC_FL_PUNCH_HOLE) down to
 * console_kib. Offsets in the file stay those of everything the console printed (its size
 * grows, its blocks do not), so a reader's place stays valid; holes read as zeros, so readers
 * find where the kept bytes start with SEEK_DATA. Rotation by rename does not work here (the
 * VMM cannot reopen its stdout), copy-and-truncate loses what is written in between, and
 * FALLOC_FL_COLLAPSE_RANGE is not supported by tmpfs, where /run is.
 *
 * One inotify instance in the manager's event loop carries an IN_MODIFY watch per console of a
 * live VMM. Its fd is in epoll with EPOLLONESHOT and goes back CONSOLE_BATCH_MS after each
 * batch: a guest that prints without pause costs emberd at most that many wake-ups a second
 * (the kernel merges repeated events meanwhile), whatever the number of sandboxes.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/macro.h"
#include "manager-internal.h"

#define CONSOLE_BATCH_MS 100

/* ---- the log file ---- */

uint64_t console_kept_start(int fd, uint64_t size)
{
	off_t d = lseek(fd, 0, SEEK_DATA);

	return d < 0 || (uint64_t)d > size ? size : (uint64_t)d; /* ENXIO: nothing but holes */
}

int console_trim(int fd, uint64_t keep)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;
	uint64_t size = (uint64_t)st.st_size;
	if (size <= keep + keep / 8)
		return 0;
	uint64_t start = console_kept_start(fd, size);
	if (size - start <= keep + keep / 8)
		return 0;
	/* whole blocks: a partial one would be zeroed, not freed */
	uint64_t block = st.st_blksize > 0 ? (uint64_t)st.st_blksize : 4096;
	uint64_t from = start / block * block, to = (size - keep) / block * block;
	if (to <= from)
		return 0;
	if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)from,
		      (off_t)(to - from)) < 0)
		return -errno;
	return 1;
}

uint64_t console_tail_start(int fd, uint64_t from, uint64_t size, unsigned lines)
{
	char buf[4096];
	uint64_t end = size;
	bool first = true;

	if (lines == 0)
		return from;
	/* Backwards, counting line ends; a newline that ends the log ends its last line, it
	 * does not start another. */
	while (end > from) {
		size_t n = end - from < sizeof(buf) ? (size_t)(end - from) : sizeof(buf);
		ssize_t k = pread(fd, buf, n, (off_t)(end - n));
		if (k != (ssize_t)n)
			return from;
		for (size_t i = n; i > 0; i--) {
			if (buf[i - 1] != '\n')
				continue;
			if (first && end - n + i == size) {
				first = false;
				continue;
			}
			if (lines-- == 1)
				return end - n + i;
		}
		first = false;
		end -= n;
	}
	return from;
}

ssize_t console_read(int fd, uint64_t *pos, void *buf, size_t size, uint64_t *ret_skipped)
{
	ssize_t n = pread(fd, buf, size, (off_t)*pos);

	*ret_skipped = 0;
	if (n <= 0)
		return n < 0 ? -errno : 0;
	/* A trim may have punched out what was read (zeros, or bytes just before they went):
	 * whatever is a hole now is dropped and counted, never passed on as output. */
	off_t d = lseek(fd, (off_t)*pos, SEEK_DATA);
	uint64_t data = d < 0 ? *pos + (uint64_t)n : (uint64_t)d;
	if (data > *pos) {
		uint64_t gone = data - *pos;
		if (gone >= (uint64_t)n) {
			*pos = data;
			*ret_skipped = gone;
			return -EAGAIN; /* all of it: read again from where the data is */
		}
		memmove(buf, (char *)buf + gone, (size_t)n - gone);
		n -= (ssize_t)gone;
		*ret_skipped = gone;
		*pos = data;
	}
	*pos += (uint64_t)n;
	return n;
}

char *console_path(const Sandbox *sb)
{
	char *p = NULL;

	if (asprintf(&p, "%s/" CONSOLE_FILE, sb->run_dir) < 0)
		return NULL;
	return p;
}

/* The last lines the guest printed on its console, for the message of a create whose guest
 * did not come up: ": the console's last lines:\n..." with control characters and invalid
 * bytes shown as '?', or NULL when there is nothing. */
#define CONSOLE_TAIL_BYTES 1536
#define CONSOLE_TAIL_LINES 12
char *console_tail(const Sandbox *sb)
{
	_cleanup_free_ char *path = console_path(sb);
	_cleanup_close_ int fd = -EBADF;
	char buf[CONSOLE_TAIL_BYTES + 1];
	struct stat st;

	if (!path)
		return NULL;
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0 || fstat(fd, &st) < 0 || st.st_size == 0)
		return NULL;
	uint64_t size = (uint64_t)st.st_size, kept = console_kept_start(fd, size);
	uint64_t from = size - kept > CONSOLE_TAIL_BYTES ? size - CONSOLE_TAIL_BYTES : kept;
	ssize_t n = pread(fd, buf, (size_t)(size - from), (off_t)from);
	if (n <= 0)
		return NULL;
	/* whole lines only, the last CONSOLE_TAIL_LINES of them */
	size_t start = 0, end = (size_t)n;
	while (end > 0 && (buf[end - 1] == '\n' || buf[end - 1] == '\r'))
		end--;
	if (from > kept)
		while (start < end && buf[start++] != '\n')
			;
	unsigned lines = 0;
	for (size_t i = end; i > start; i--)
		if (buf[i - 1] == '\n' && ++lines == CONSOLE_TAIL_LINES) {
			start = i;
			break;
		}
	if (start >= end)
		return NULL;
	for (size_t i = start; i < end; i++) {
		unsigned char ch = (unsigned char)buf[i];
		if ((ch < 0x20 && ch != '\n' && ch != '\t') || ch >= 0x7f)
			buf[i] = '?';
	}
	buf[end] = '\0';
	char *out = NULL;
	if (asprintf(&out, "; the console's last lines:\n%s", buf + start) < 0)
		return NULL;
	return out;
}

/* ---- the watch ---- */

/* Trims the log at `path` to [sandboxes] console_kib. */
static int trim_log(Manager *m, const char *path)
{
	_cleanup_close_ int fd = open(path, O_WRONLY | O_CLOEXEC | O_NOFOLLOW);

	return fd < 0 ? -errno : console_trim(fd, (uint64_t)m->config->console_kib << 10);
}

static uint64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

int console_init(Manager *m)
{
	m->console_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	if (m->console_fd < 0)
		return -errno;
	struct epoll_event ev = {.events = EPOLLIN | EPOLLONESHOT, .data.ptr = &m->console_fd};
	if (epoll_ctl(m->epoll_fd, EPOLL_CTL_ADD, m->console_fd, &ev) < 0)
		return -errno;
	return 0;
}

void console_done(Manager *m)
{
	free(m->consoles);
	m->consoles = NULL;
	m->n_consoles = m->cap_consoles = 0;
	if (m->console_fd >= 0)
		close(m->console_fd);
	m->console_fd = -1;
}

/* Manager.consoles is sorted by watch descriptor; the kernel hands them out in increasing
 * order, so an insert is an append but for a wrap-around. (L) */
static size_t console_find_locked(Manager *m, int wd)
{
	size_t lo = 0, hi = m->n_consoles;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (m->consoles[mid].wd < wd)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

void console_watch(Manager *m, Sandbox *sb)
{
	_cleanup_free_ char *path = console_path(sb);
	int wd = path ? inotify_add_watch(m->console_fd, path, IN_MODIFY) : -1;

	if (wd < 0) {
		/* ReadConsole still works; followers then see new output at state changes */
		log_sandbox(LOG_WARNING, sb,
			    ": cannot watch its console (%s): its log is not trimmed",
			    path ? strerror(errno) : "out of memory");
		return;
	}
	pthread_mutex_lock(&m->lock);
	size_t i = console_find_locked(m, wd);
	if (i < m->n_consoles && m->consoles[i].wd == wd) {
		m->consoles[i].sb = sb; /* the same file again */
	} else {
		if (m->n_consoles == m->cap_consoles) {
			size_t cap = m->cap_consoles ? m->cap_consoles * 2 : 64;
			ConsoleWatch *n = realloc(m->consoles, cap * sizeof(*n));
			if (!n) {
				pthread_mutex_unlock(&m->lock);
				(void)inotify_rm_watch(m->console_fd, wd);
				log_sandbox(LOG_WARNING, sb,
					    ": cannot watch its console: out of memory");
				return;
			}
			m->consoles = n;
			m->cap_consoles = cap;
		}
		memmove(&m->consoles[i + 1], &m->consoles[i],
			(m->n_consoles - i) * sizeof(*m->consoles));
		m->consoles[i] = (ConsoleWatch){.wd = wd, .sb = sb};
		m->n_consoles++;
	}
	sb->console_wd = wd;
	pthread_mutex_unlock(&m->lock);
	/* what it printed before the watch (an adopted VMM's) is trimmed now */
	(void)trim_log(m, path);
}

void console_unwatch(Manager *m, Sandbox *sb)
{
	pthread_mutex_lock(&m->lock);
	int wd = sb->console_wd;
	if (wd >= 0) {
		size_t i = console_find_locked(m, wd);
		if (i < m->n_consoles && m->consoles[i].wd == wd) {
			memmove(&m->consoles[i], &m->consoles[i + 1],
				(m->n_consoles - i - 1) * sizeof(*m->consoles));
			m->n_consoles--;
		}
		(void)inotify_rm_watch(m->console_fd, wd);
		sb->console_wd = -1;
	}
	pthread_mutex_unlock(&m->lock);
}

/* A console changed: trimmed if it grew past its size, and its followers woken. Its next
 * change may come into the next batch from here on. */
static void console_changed(Manager *m, Sandbox *sb)
{
	_cleanup_free_ char *path = console_path(sb);
	int r = path ? trim_log(m, path) : 0;

	if (r < 0 && r != -ENOENT)
		log_debug("sandbox %s: cannot trim its console log: %s", sb->id, strerror(-r));
	pthread_mutex_lock(&m->lock);
	sb->console_pending = false;
	sandbox_wake_console_locked(sb);
	sandbox_unref_locked(m, sb);
	pthread_mutex_unlock(&m->lock);
}

typedef struct Changed {
	Sandbox **items;
	size_t n, cap;
} Changed;

/* Adds sb, held, unless it is there already. (L) */
static void changed_add_locked(Changed *c, Sandbox *sb)
{
	if (sb->console_pending)
		return;
	if (c->n == c->cap) {
		size_t cap = c->cap ? c->cap * 2 : 16;
		Sandbox **p = realloc(c->items, cap * sizeof(Sandbox *));
		if (!p)
			return; /* its next output brings it back */
		c->items = p;
		c->cap = cap;
	}
	sb->console_pending = true;
	sandbox_ref_locked(sb);
	c->items[c->n++] = sb;
}

void console_events(Manager *m)
{
	char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
	Changed changed = {};
	bool overflow = false;

	for (;;) {
		ssize_t n = read(m->console_fd, buf, sizeof(buf));
		if (n <= 0)
			break;
		pthread_mutex_lock(&m->lock);
		for (ssize_t off = 0; off < n;) {
			const struct inotify_event *ev = (const void *)(buf + off);
			off += (ssize_t)(sizeof(*ev) + ev->len);
			if (ev->mask & IN_Q_OVERFLOW)
				overflow = true;
			if (!(ev->mask & IN_MODIFY))
				continue;
			size_t i = console_find_locked(m, ev->wd);
			if (i == m->n_consoles || m->consoles[i].wd != ev->wd)
				continue; /* unwatched meanwhile */
			changed_add_locked(&changed, m->consoles[i].sb);
		}
		pthread_mutex_unlock(&m->lock);
	}
	if (overflow) {
		/* events were lost: every console is looked at (rare, and O(n) only then) */
		pthread_mutex_lock(&m->lock);
		for (size_t i = 0; i < m->n_consoles; i++)
			changed_add_locked(&changed, m->consoles[i].sb);
		pthread_mutex_unlock(&m->lock);
	}
	for (size_t i = 0; i < changed.n; i++)
		console_changed(m, changed.items[i]);
	free(changed.items);
	m->console_rearm_ms = mono_ms() + CONSOLE_BATCH_MS;
}

int console_rearm(Manager *m)
{
	if (m->console_rearm_ms == 0)
		return -1;
	uint64_t now = mono_ms();
	if (now < m->console_rearm_ms)
		return (int)(m->console_rearm_ms - now);
	m->console_rearm_ms = 0;
	struct epoll_event ev = {.events = EPOLLIN | EPOLLONESHOT, .data.ptr = &m->console_fd};
	if (epoll_ctl(m->epoll_fd, EPOLL_CTL_MOD, m->console_fd, &ev) < 0)
		log_error_errno(errno, "cannot watch the consoles again; their logs are no "
				       "longer trimmed");
	return -1;
}
