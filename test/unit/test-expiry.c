/* SPDX-License-Identifier: Apache-2.0 */
/* agent/expiry.c: the end-time heap keeps its order through any mix of inserts, moves and
 * removals, and a firing timer acts on exactly the sandboxes that are due, each as its
 * on_expiry and state say. The manager calls expiry.c makes are stubbed here and recorded. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "agent/node-sandbox.h"

/* ---- the manager, stubbed ---- */

static struct {
	Sandbox *sb;
	Ember__V1__SandboxState state;
	char reason[128];
	SbOp op;
} calls[64];
static size_t n_calls;
static bool room = true;

void sandbox_set_state_locked(Manager *m, Sandbox *sb, Ember__V1__SandboxState state,
			      const char *reason)
{
	(void)m;
	sb->state = state;
	assert_true(n_calls < 64);
	calls[n_calls].sb = sb;
	calls[n_calls].state = state;
	snprintf(calls[n_calls].reason, sizeof(calls[n_calls].reason), "%s", reason ?: "");
}

void manager_submit_locked(Manager *m, Sandbox *sb, SbOp op)
{
	(void)m;
	sb->op = op;
	assert_ptr_equal(calls[n_calls].sb, sb); /* always right after the state change */
	calls[n_calls++].op = op;
}

bool sandbox_room_for_saved_state(const Sandbox *sb, uint64_t *ret_free_mib)
{
	(void)sb;
	*ret_free_mib = room ? 1 << 20 : 0;
	return room;
}

void sandbox_log_event_at(const char *file, int line, const char *func, const Sandbox *sb,
			  int level, const char *message_id, const char *op, const char *step,
			  int64_t duration_us, const char *fmt, ...)
{
	(void)file, (void)line, (void)func, (void)sb, (void)level, (void)message_id, (void)op,
		(void)step, (void)duration_us, (void)fmt;
}

/* ---- helpers ---- */

static Sandbox *sandbox(const char *id, int64_t end_ms)
{
	Sandbox *sb = calloc(1, sizeof(*sb));
	assert_non_null(sb);
	snprintf(sb->id, sizeof(sb->id), "%s", id);
	sb->expiry_index = SIZE_MAX;
	sb->state = EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING;
	sb->spec.on_expiry = EMBER__V1__EXPIRY_ACTION__EXPIRY_ACTION_DESTROY;
	sb->spec.end_time = (struct timespec){.tv_sec = end_ms / 1000,
					      .tv_nsec = (long)(end_ms % 1000) * 1000000};
	return sb;
}

static int64_t wall_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void check_heap(const Manager *m)
{
	for (size_t i = 0; i < m->n_expiry; i++) {
		assert_int_equal(m->expiry[i]->expiry_index, i);
		if (i > 0)
			assert_true(m->expiry[(i - 1) / 2]->expiry_due_ms <=
				    m->expiry[i]->expiry_due_ms);
	}
}

static void manager_init(Manager *m)
{
	*m = (Manager){.timer_fd = -1};
	assert_int_equal(expiry_init(m), 0);
	n_calls = 0;
}

/* ---- tests ---- */

static void test_heap_order(void **state)
{
	enum {
		N = 2000
	};
	Sandbox *sbs[N];
	Manager m;
	(void)state;

	manager_init(&m);
	srand(7);
	int64_t base = wall_ms() + 3600 * 1000; /* far off: the timer never fires here */
	for (int i = 0; i < N; i++) {
		char id[16];
		snprintf(id, sizeof(id), "s%d", i);
		sbs[i] = sandbox(id, base + rand() % 100000);
		expiry_update_locked(&m, sbs[i]);
	}
	check_heap(&m);
	assert_int_equal(m.n_expiry, N);
	/* moves, removals, end times taken away and given back */
	for (int k = 0; k < 20000; k++) {
		Sandbox *sb = sbs[rand() % N];
		switch (rand() % 4) {
		case 0:
			expiry_remove_locked(&m, sb);
			break;
		case 1:
			sb->spec.end_time = (struct timespec){0};
			expiry_update_locked(&m, sb);
			assert_int_equal(sb->expiry_index, SIZE_MAX);
			break;
		default:
			sb->spec.end_time.tv_sec = (base + rand() % 100000) / 1000;
			expiry_update_locked(&m, sb);
			assert_int_not_equal(sb->expiry_index, SIZE_MAX);
			break;
		}
		if (k % 1000 == 0)
			check_heap(&m);
	}
	check_heap(&m);
	/* taken from the top, they come earliest first */
	int64_t last = 0;
	while (m.n_expiry > 0) {
		Sandbox *top = m.expiry[0];
		assert_true(top->expiry_due_ms >= last);
		last = top->expiry_due_ms;
		expiry_remove_locked(&m, top);
		assert_int_equal(top->expiry_index, SIZE_MAX);
	}
	for (int i = 0; i < N; i++)
		free(sbs[i]);
	expiry_done(&m);
	assert_int_equal(n_calls, 0);
}

static void test_fire_acts_as_on_expiry_says(void **state)
{
	Manager m;
	(void)state;

	manager_init(&m);
	VmmInfo vmm = {.uffd = (char *)"/usr/bin/ember-uffd"};
	m.vmm = vmm;
	int64_t now = wall_ms();
	Sandbox *gone = sandbox("gone", now - 1000);
	Sandbox *nap = sandbox("nap", now - 10);
	nap->spec.on_expiry = EMBER__V1__EXPIRY_ACTION__EXPIRY_ACTION_PAUSE;
	Sandbox *paused = sandbox("paused", now - 10);
	paused->state = EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSED;
	Sandbox *paused_pause = sandbox("paused-pause", now - 10);
	paused_pause->state = EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSED;
	paused_pause->spec.on_expiry = EMBER__V1__EXPIRY_ACTION__EXPIRY_ACTION_PAUSE;
	Sandbox *busy = sandbox("busy", now - 10);
	busy->op = SB_OP_CREATE;
	Sandbox *later = sandbox("later", now + 3600 * 1000);
	Sandbox *all[] = {gone, nap, paused, paused_pause, busy, later};
	for (size_t i = 0; i < ELEMENTSOF(all); i++)
		expiry_update_locked(&m, all[i]);

	expiry_fire(&m);
	assert_int_equal(n_calls, 3);
	/* destroyed, in any state; paused; a PAUSED one with PAUSE left alone */
	assert_ptr_equal(calls[0].sb, gone);
	assert_int_equal(calls[0].op, SB_OP_DESTROY);
	assert_int_equal(calls[0].state, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_DESTROYING);
	assert_non_null(strstr(calls[0].reason, "end time"));
	assert_non_null(strstr(calls[0].reason, "DESTROY"));
	for (size_t i = 1; i < 3; i++) {
		if (calls[i].sb == nap) {
			assert_int_equal(calls[i].op, SB_OP_PAUSE);
			assert_int_equal(calls[i].state,
					 EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_PAUSING);
			assert_string_equal(nap->op_reason, calls[i].reason);
		} else {
			assert_ptr_equal(calls[i].sb, paused);
			assert_int_equal(calls[i].op, SB_OP_DESTROY);
		}
	}
	/* the busy one waits its turn (looked at again in a second), the later one waits */
	assert_int_equal(m.n_expiry, 2);
	assert_int_not_equal(busy->expiry_index, SIZE_MAX);
	assert_true(busy->expiry_due_ms > now);
	assert_int_not_equal(later->expiry_index, SIZE_MAX);
	assert_int_equal(paused_pause->expiry_index, SIZE_MAX);

	/* no disk for the memory file: not paused now, tried again later */
	n_calls = 0;
	room = false;
	Sandbox *full = sandbox("full", now - 10);
	full->spec.on_expiry = EMBER__V1__EXPIRY_ACTION__EXPIRY_ACTION_PAUSE;
	expiry_update_locked(&m, full);
	expiry_fire(&m);
	assert_int_equal(n_calls, 0);
	assert_int_equal(full->state, EMBER__V1__SANDBOX_STATE__SANDBOX_STATE_RUNNING);
	assert_true(full->expiry_due_ms >= now + 60000);
	room = true;

	for (size_t i = 0; i < ELEMENTSOF(all); i++) {
		free(all[i]->op_reason);
		free(all[i]);
	}
	free(full);
	expiry_done(&m);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_heap_order),
		cmocka_unit_test(test_fire_acts_as_on_expiry_says),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
