/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Sandbox end times (SandboxSpec.end_time and on_expiry): a sandbox whose scheduler crashed or
 * forgot it is destroyed or paused by emberd itself.
 *
 * The sandboxes that have an end time sit in a binary heap ordered by when the timer looks at
 * each next (expiry_due_ms: the end time, or a retry a little later when the sandbox was busy),
 * and one timerfd in the manager's event loop is armed for the earliest. A change costs
 * O(log n) and nothing scans all sandboxes (issue "density"). The timer runs on the wall clock
 * (CLOCK_REALTIME, absolute), as end times are wall-clock times given by a scheduler; an end
 * time that passed while emberd was down fires as soon as the loop runs.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "common/log.h"
#include "messages.h"
#include "node-sandbox.h"

/* A sandbox busy with another operation (create, pause, resume, snapshot) is looked at again
 * this much later; one that cannot be paused (no disk for its memory, no ember-uffd) later. */
#define EXPIRY_BUSY_RETRY_MS  1000
#define EXPIRY_PAUSE_RETRY_MS 60000

static int64_t timespec_ms(const struct timespec *ts)
{
	return (int64_t)ts->tv_sec * 1000 + ts->tv_nsec / 1000000;
}

static int64_t realtime_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return timespec_ms(&ts);
}

bool sb_spec_has_end(const SbSpec *s)
{
	return s->end_time.tv_sec != 0 || s->end_time.tv_nsec != 0;
}

bool sb_spec_ended(const SbSpec *s)
{
	return sb_spec_has_end(s) && timespec_ms(&s->end_time) <= realtime_ms();
}

void timespec_format(const struct timespec *ts, char *buf, size_t size)
{
	struct tm tm;
	time_t t = ts->tv_sec;

	if (!gmtime_r(&t, &tm) || strftime(buf, size, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
		snprintf(buf, size, "%lld", (long long)ts->tv_sec);
}

/* ---- the heap ---- */

static bool earlier(const Sandbox *a, const Sandbox *b)
{
	return a->expiry_due_ms < b->expiry_due_ms;
}

static void place(Manager *m, size_t i, Sandbox *sb)
{
	m->expiry[i] = sb;
	sb->expiry_index = i;
}

static void sift_up(Manager *m, size_t i)
{
	Sandbox *sb = m->expiry[i];

	while (i > 0 && earlier(sb, m->expiry[(i - 1) / 2])) {
		place(m, i, m->expiry[(i - 1) / 2]);
		i = (i - 1) / 2;
	}
	place(m, i, sb);
}

static void sift_down(Manager *m, size_t i)
{
	Sandbox *sb = m->expiry[i];

	for (;;) {
		size_t c = 2 * i + 1;
		if (c >= m->n_expiry)
			break;
		if (c + 1 < m->n_expiry && earlier(m->expiry[c + 1], m->expiry[c]))
			c++;
		if (!earlier(m->expiry[c], sb))
			break;
		place(m, i, m->expiry[c]);
		i = c;
	}
	place(m, i, sb);
}

static void arm_locked(Manager *m)
{
	struct itimerspec its = {0};

	if (m->timer_fd < 0)
		return;
	if (m->n_expiry > 0) {
		int64_t due = m->expiry[0]->expiry_due_ms;
		/* {0, 0} would disarm it: a time long past fires at once just the same */
		if (due <= 0)
			due = 1;
		its.it_value.tv_sec = (time_t)(due / 1000);
		its.it_value.tv_nsec = (long)(due % 1000) * 1000000;
	}
	if (timerfd_settime(m->timer_fd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
		log_error_errno(errno, "cannot arm the end-time timer; sandboxes may outlive their "
				       "end time");
}

void expiry_remove_locked(Manager *m, Sandbox *sb)
{
	size_t i = sb->expiry_index;

	if (i == SIZE_MAX)
		return;
	sb->expiry_index = SIZE_MAX;
	m->n_expiry--;
	if (i != m->n_expiry) {
		Sandbox *last = m->expiry[m->n_expiry];
		place(m, i, last);
		sift_up(m, i);
		sift_down(m, last->expiry_index);
	}
	if (i == 0)
		arm_locked(m);
}

/* Puts sb in the heap to be looked at at due_ms (it may be there already). */
static void schedule_locked(Manager *m, Sandbox *sb, int64_t due_ms)
{
	const Sandbox *first = m->n_expiry ? m->expiry[0] : NULL;

	if (sb->expiry_index == SIZE_MAX) {
		if (m->n_expiry == m->cap_expiry) {
			size_t cap = m->cap_expiry ? 2 * m->cap_expiry : 64;
			Sandbox **n = realloc(m->expiry, cap * sizeof(Sandbox *));
			if (!n) {
				log_sandbox(LOG_ERR, sb,
					    ": out of memory for its end-time timer; it "
					    "will not expire");
				return;
			}
			m->expiry = n;
			m->cap_expiry = cap;
		}
		sb->expiry_due_ms = due_ms;
		place(m, m->n_expiry++, sb);
		sift_up(m, sb->expiry_index);
	} else {
		sb->expiry_due_ms = due_ms;
		sift_up(m, sb->expiry_index);
		sift_down(m, sb->expiry_index);
	}
	/* the earliest changed only if sb is it now, or was it before */
	if (sb->expiry_index == 0 || first == sb)
		arm_locked(m);
}

void expiry_update_locked(Manager *m, Sandbox *sb)
{
	if (sb->removed || !sb_spec_has_end(&sb->spec))
		expiry_remove_locked(m, sb);
	else
		schedule_locked(m, sb, timespec_ms(&sb->spec.end_time));
}

/* ---- what happens when the time comes ---- */

static void expire_locked(Manager *m, Sandbox *sb, int64_t now)
{
	const bool pause = sb->spec.on_expiry == EMBER__V1__EXPIRY_ACTION__EXPIRY_ACTION_PAUSE;
	char when[32], reason[96];

	switch (sb->state) {
	case EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_DESTROYING:
	case EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_DESTROYED:
		return; /* going already */
	case EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSED:
	case EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_FAILED:
		if (pause)
			return; /* paused already, or kept for inspection */
		break;
	default:
		break;
	}
	if (sb->op != SB_OP_NONE) {
		/* A create, pause, resume, snapshot or cleanup runs: its end decides what is
		 * left to do, so look again shortly. */
		schedule_locked(m, sb, now + EXPIRY_BUSY_RETRY_MS);
		return;
	}
	timespec_format(&sb->spec.end_time, when, sizeof(when));
	snprintf(reason, sizeof(reason), "its end time %s passed (on_expiry %s)", when,
		 pause ? "PAUSE" : "DESTROY");
	if (!pause) {
		sandbox_log_event(sb, LOG_INFO, EMBER_MESSAGE_SANDBOX_EXPIRED, "expire", NULL, -1,
				  "sandbox %s: %s; destroying it", sb->id, reason);
		sb->abort = true;
		sb->destroy_failed = false;
		sandbox_set_state_locked(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_DESTROYING,
					 reason);
		manager_submit_locked(m, sb, SB_OP_DESTROY);
		return;
	}
	if (sb->state != EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING)
		return;
	uint64_t free_mib = 0;
	const char *refuse = !m->vmm.uffd ? "ember-uffd is not found on this node"
			     : !sandbox_room_for_saved_state(sb, &free_mib)
				     ? "there is not enough disk for its memory file"
				     : NULL;
	if (refuse) {
		log_sandbox(LOG_WARNING, sb,
			    ": %s, but it cannot be paused: %s; trying again in %d s", reason,
			    refuse, EXPIRY_PAUSE_RETRY_MS / 1000);
		schedule_locked(m, sb, now + EXPIRY_PAUSE_RETRY_MS);
		return;
	}
	sandbox_log_event(sb, LOG_INFO, EMBER_MESSAGE_SANDBOX_EXPIRED, "expire", NULL, -1,
			  "sandbox %s: %s; pausing it", sb->id, reason);
	free(sb->op_reason);
	sb->op_reason = strdup(reason);
	sandbox_set_state_locked(m, sb, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSING, reason);
	manager_submit_locked(m, sb, SB_OP_PAUSE);
}

void expiry_fire(Manager *m)
{
	uint64_t ticks;

	/* a timer re-armed meanwhile may not have fired: EAGAIN then, and nothing is due */
	(void)!read(m->timer_fd, &ticks, sizeof(ticks));
	pthread_mutex_lock(&m->lock);
	int64_t now = realtime_ms();
	while (m->n_expiry > 0 && m->expiry[0]->expiry_due_ms <= now) {
		Sandbox *sb = m->expiry[0];
		expiry_remove_locked(m, sb);
		expire_locked(m, sb, now);
	}
	arm_locked(m);
	pthread_mutex_unlock(&m->lock);
}

int expiry_init(Manager *m)
{
	m->timer_fd = timerfd_create(CLOCK_REALTIME, TFD_CLOEXEC | TFD_NONBLOCK);
	return m->timer_fd < 0 ? -errno : 0;
}

void expiry_done(Manager *m)
{
	free(m->expiry);
	m->expiry = NULL;
	m->n_expiry = m->cap_expiry = 0;
	if (m->timer_fd >= 0)
		close(m->timer_fd);
	m->timer_fd = -1;
}
