/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Records: one small JSON file per template and per sandbox, written atomically (temporary
 * file, fsync, rename, directory fsync; common/fileio), so that a crash at any moment leaves
 * either the old record or the new one. One record per object, never one file for all: a
 * change rewrites only its own object's record, whatever the number of sandboxes.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "common/error.h"
#include "common/fileio.h"
#include "common/log.h"
#include "manager-internal.h"

#define RECORD_MAX_BYTES (4u << 20)

int record_write(const char *path, json_object *obj)
{
	size_t len;
	const char *text = json_object_to_json_string_length(
		obj, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_NOSLASHESCAPE, &len);

	if (!text)
		return -ENOMEM;
	return write_file_atomic(path, text, len, 0600);
}

int record_read(const char *path, json_object **ret, char **ret_error)
{
	_cleanup_free_ char *text = NULL;
	json_tokener *tok;
	json_object *obj;
	size_t size;
	int r;

	r = read_full_file(path, RECORD_MAX_BYTES, &text, &size);
	if (r < 0)
		return error_set(ret_error, r, "cannot read %s: %m", path);
	tok = json_tokener_new();
	if (!tok)
		return -ENOMEM;
	obj = json_tokener_parse_ex(tok, text, (int)size);
	enum json_tokener_error jerr = json_tokener_get_error(tok);
	json_tokener_free(tok);
	if (!obj || jerr != json_tokener_success) {
		json_object_put(obj);
		return error_set(ret_error, -EBADMSG, "%s is not valid JSON: %s", path,
				 json_tokener_error_desc(jerr));
	}
	if (!json_object_is_type(obj, json_type_object)) {
		json_object_put(obj);
		return error_set(ret_error, -EBADMSG, "%s holds no JSON object", path);
	}
	*ret = obj;
	return 0;
}

void record_quarantine(const Config *c, const char *dir, const char *why)
{
	_cleanup_free_ char *qdir = NULL, *dest = NULL;
	const char *base = strrchr(dir, '/');
	int r;

	base = base ? base + 1 : dir;
	if (asprintf(&qdir, "%s/quarantine", c->state_dir) < 0 ||
	    asprintf(&dest, "%s/%s.%lld", qdir, base, (long long)time(NULL)) < 0) {
		log_error("cannot quarantine %s: out of memory", dir);
		return;
	}
	r = mkdir_p(qdir, 0700);
	if (r >= 0 && rename(dir, dest) < 0)
		r = -errno;
	if (r < 0)
		log_error_errno(r, "record %s cannot be used (%s) and could not be moved to %s",
				dir, why, qdir);
	else
		log_struct(LOG_ERR, 0, LOG_FIELDS({"OP", "recover"}),
			   "record %s cannot be used (%s): moved to %s for inspection", dir, why,
			   dest);
}

/* ---- JSON helpers ---- */

const char *json_get_string(json_object *o, const char *key)
{
	json_object *v;

	if (!json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_string))
		return NULL;
	return json_object_get_string(v);
}

uint64_t json_get_u64(json_object *o, const char *key)
{
	json_object *v;

	if (!json_object_object_get_ex(o, key, &v))
		return 0;
	if (json_object_is_type(v, json_type_string))
		return strtoull(json_object_get_string(v), NULL, 10);
	if (json_object_is_type(v, json_type_int))
		return json_object_get_uint64(v);
	return 0;
}

json_object *timespec_to_json(const struct timespec *ts)
{
	return json_object_new_int64((int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec);
}

void timespec_from_json(json_object *o, struct timespec *ret)
{
	int64_t ns = o ? json_object_get_int64(o) : 0;

	ret->tv_sec = (time_t)(ns / 1000000000LL);
	ret->tv_nsec = (long)(ns % 1000000000LL);
}

json_object *kv_list_to_json(const KvList *l)
{
	json_object *o = json_object_new_object();

	for (size_t i = 0; o && i < l->n; i++)
		if (json_object_object_add(o, l->items[i].key,
					   json_object_new_string(l->items[i].value)) < 0) {
			json_object_put(o);
			return NULL;
		}
	return o;
}

static int kv_cmp(const void *a, const void *b)
{
	return strcmp(((const KeyValue *)a)->key, ((const KeyValue *)b)->key);
}

int kv_list_from_json(json_object *o, KvList *ret)
{
	KvList l = {};

	if (!o) {
		*ret = l;
		return 0;
	}
	if (!json_object_is_type(o, json_type_object))
		return -EBADMSG;
	l.items = calloc((size_t)json_object_object_length(o) + 1, sizeof(KeyValue));
	if (!l.items)
		return -ENOMEM;
	json_object_object_foreach(o, k, v)
	{
		if (!json_object_is_type(v, json_type_string)) {
			kv_list_done(&l);
			return -EBADMSG;
		}
		l.items[l.n].key = strdup(k);
		l.items[l.n].value = strdup(json_object_get_string(v));
		l.n++;
		if (!l.items[l.n - 1].key || !l.items[l.n - 1].value) {
			kv_list_done(&l);
			return -ENOMEM;
		}
	}
	qsort(l.items, l.n, sizeof(KeyValue), kv_cmp);
	*ret = l;
	return 0;
}

json_object *str_list_to_json(const StrList *l)
{
	json_object *a = json_object_new_array();

	for (size_t i = 0; a && i < l->n; i++)
		if (json_object_array_add(a, json_object_new_string(l->items[i])) < 0) {
			json_object_put(a);
			return NULL;
		}
	return a;
}

int str_list_from_json(json_object *o, StrList *ret)
{
	StrList l = {};
	size_t n;

	if (!o) {
		*ret = l;
		return 0;
	}
	if (!json_object_is_type(o, json_type_array))
		return -EBADMSG;
	n = json_object_array_length(o);
	l.items = calloc(n + 1, sizeof(char *));
	if (!l.items)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		json_object *v = json_object_array_get_idx(o, i);
		if (!json_object_is_type(v, json_type_string)) {
			str_list_done(&l);
			return -EBADMSG;
		}
		l.items[l.n] = strdup(json_object_get_string(v));
		if (!l.items[l.n++]) {
			str_list_done(&l);
			return -ENOMEM;
		}
	}
	*ret = l;
	return 0;
}

json_object *sb_spec_to_json(const SbSpec *s)
{
	json_object *o = json_object_new_object();
	json_object *net = json_object_new_object();

	if (!o || !net) {
		json_object_put(o);
		json_object_put(net);
		return NULL;
	}
	if (s->template_id)
		json_object_object_add(o, "template_id", json_object_new_string(s->template_id));
	if (s->snapshot_id)
		json_object_object_add(o, "snapshot_id", json_object_new_string(s->snapshot_id));
	json_object_object_add(o, "vcpu_count", json_object_new_int64(s->vcpu_count));
	json_object_object_add(o, "memory_mib", json_object_new_int64(s->memory_mib));
	json_object_object_add(o, "disk_size_mib", json_object_new_uint64(s->disk_size_mib));
	if (s->huge_pages)
		json_object_object_add(o, "huge_pages", json_object_new_boolean(true));
	json_object_object_add(net, "allow_internet", json_object_new_boolean(s->allow_internet));
	json_object_object_add(net, "allow_cidrs", str_list_to_json(&s->allow_cidrs));
	json_object_object_add(net, "deny_cidrs", str_list_to_json(&s->deny_cidrs));
	json_object_object_add(o, "network", net);
	json_object_object_add(o, "labels", kv_list_to_json(&s->labels));
	json_object_object_add(o, "env", kv_list_to_json(&s->env));
	if (sb_spec_has_end(s))
		json_object_object_add(o, "end_time", timespec_to_json(&s->end_time));
	json_object_object_add(
		o, "on_expiry",
		json_object_new_string(s->on_expiry == EMBER__V1__EXPIRY_ACTION__EXPIRY_ACTION_PAUSE
					       ? "pause"
					       : "destroy"));
	return o;
}

int sb_spec_from_json(json_object *o, SbSpec *ret)
{
	SbSpec s = {};
	json_object *net = NULL, *v = NULL;
	const char *str;
	int r;

	if ((str = json_get_string(o, "template_id")) && !(s.template_id = strdup(str)))
		return -ENOMEM;
	if ((str = json_get_string(o, "snapshot_id")) && !(s.snapshot_id = strdup(str))) {
		sb_spec_done(&s);
		return -ENOMEM;
	}
	s.vcpu_count = (unsigned)json_get_u64(o, "vcpu_count");
	s.memory_mib = (unsigned)json_get_u64(o, "memory_mib");
	s.disk_size_mib = json_get_u64(o, "disk_size_mib");
	if (json_object_object_get_ex(o, "huge_pages", &v))
		s.huge_pages = json_object_get_boolean(v);
	if (json_object_object_get_ex(o, "network", &net)) {
		if (json_object_object_get_ex(net, "allow_internet", &v))
			s.allow_internet = json_object_get_boolean(v);
		json_object *a = NULL, *d = NULL;
		json_object_object_get_ex(net, "allow_cidrs", &a);
		json_object_object_get_ex(net, "deny_cidrs", &d);
		if ((r = str_list_from_json(a, &s.allow_cidrs)) < 0 ||
		    (r = str_list_from_json(d, &s.deny_cidrs)) < 0) {
			sb_spec_done(&s);
			return r;
		}
	}
	json_object *labels = NULL, *env = NULL;
	json_object_object_get_ex(o, "labels", &labels);
	json_object_object_get_ex(o, "env", &env);
	if ((r = kv_list_from_json(labels, &s.labels)) < 0 ||
	    (r = kv_list_from_json(env, &s.env)) < 0) {
		sb_spec_done(&s);
		return r;
	}
	json_object *end = NULL;
	if (json_object_object_get_ex(o, "end_time", &end))
		timespec_from_json(end, &s.end_time);
	/* records from before end times: no end, destroy */
	const char *expiry = json_get_string(o, "on_expiry");
	s.on_expiry = expiry && strcmp(expiry, "pause") == 0
			      ? EMBER__V1__EXPIRY_ACTION__EXPIRY_ACTION_PAUSE
			      : EMBER__V1__EXPIRY_ACTION__EXPIRY_ACTION_DESTROY;
	if (!!s.template_id == !!s.snapshot_id) {
		sb_spec_done(&s);
		return -EBADMSG;
	}
	*ret = s;
	return 0;
}

/* ---- spec helpers ---- */

void kv_list_done(KvList *l)
{
	for (size_t i = 0; i < l->n; i++) {
		free(l->items[i].key);
		free(l->items[i].value);
	}
	free(l->items);
	*l = (KvList){};
}

int kv_list_copy(const KvList *l, KvList *ret)
{
	KvList c = {.items = calloc(l->n ?: 1, sizeof(KeyValue))};

	if (!c.items)
		return -ENOMEM;
	for (; c.n < l->n; c.n++) {
		c.items[c.n].key = strdup(l->items[c.n].key);
		c.items[c.n].value = strdup(l->items[c.n].value);
		if (!c.items[c.n].key || !c.items[c.n].value) {
			c.n++;
			kv_list_done(&c);
			return -ENOMEM;
		}
	}
	*ret = c;
	return 0;
}

void str_list_done(StrList *l)
{
	for (size_t i = 0; i < l->n; i++)
		free(l->items[i]);
	free(l->items);
	*l = (StrList){};
}

void sb_spec_done(SbSpec *s)
{
	free(s->template_id);
	free(s->snapshot_id);
	str_list_done(&s->allow_cidrs);
	str_list_done(&s->deny_cidrs);
	kv_list_done(&s->labels);
	kv_list_done(&s->env);
	*s = (SbSpec){};
}

static bool str_eq(const char *a, const char *b)
{
	return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

bool kv_list_equal(const KvList *a, const KvList *b)
{
	if (a->n != b->n)
		return false;
	for (size_t i = 0; i < a->n; i++)
		if (strcmp(a->items[i].key, b->items[i].key) != 0 ||
		    strcmp(a->items[i].value, b->items[i].value) != 0)
			return false;
	return true;
}

bool str_list_equal(const StrList *a, const StrList *b)
{
	if (a->n != b->n)
		return false;
	for (size_t i = 0; i < a->n; i++)
		if (strcmp(a->items[i], b->items[i]) != 0)
			return false;
	return true;
}

bool sb_spec_equal(const SbSpec *a, const SbSpec *b)
{
	return str_eq(a->template_id, b->template_id) && str_eq(a->snapshot_id, b->snapshot_id) &&
	       a->vcpu_count == b->vcpu_count && a->memory_mib == b->memory_mib &&
	       a->disk_size_mib == b->disk_size_mib && a->allow_internet == b->allow_internet &&
	       str_list_equal(&a->allow_cidrs, &b->allow_cidrs) &&
	       str_list_equal(&a->deny_cidrs, &b->deny_cidrs) &&
	       kv_list_equal(&a->labels, &b->labels) && kv_list_equal(&a->env, &b->env) &&
	       a->end_time.tv_sec == b->end_time.tv_sec &&
	       a->end_time.tv_nsec == b->end_time.tv_nsec && a->on_expiry == b->on_expiry &&
	       a->huge_pages == b->huge_pages;
}

NetnsPolicy sb_spec_policy(const SbSpec *s)
{
	return (NetnsPolicy){
		.internet = s->allow_internet,
		.allow = (const char *const *)s->allow_cidrs.items,
		.n_allow = s->allow_cidrs.n,
		.deny = (const char *const *)s->deny_cidrs.items,
		.n_deny = s->deny_cidrs.n,
	};
}

bool kv_list_matches(const KvList *labels, const KvList *selector)
{
	for (size_t i = 0; i < selector->n; i++) {
		KeyValue key = {.key = selector->items[i].key};
		const KeyValue *found = labels->n ? bsearch(&key, labels->items, labels->n,
							    sizeof(KeyValue), kv_cmp)
						  : NULL;
		if (!found || strcmp(found->value, selector->items[i].value) != 0)
			return false;
	}
	return true;
}

uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

uint64_t now_usec(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

json_object *op_timing_to_json(const OpTiming *t)
{
	json_object *o = json_object_new_object(), *steps = json_object_new_array();

	for (size_t i = 0; steps && i < t->n_steps; i++) {
		json_object *st = json_object_new_object();
		json_object_object_add(st, "name", json_object_new_string(t->steps[i].name));
		json_object_object_add(st, "us", json_object_new_uint64(t->steps[i].us));
		json_object_array_add(steps, st);
	}
	json_object_object_add(o, "op", json_object_new_string(t->op));
	json_object_object_add(o, "steps", steps);
	json_object_object_add(o, "total_us", json_object_new_uint64(t->total_us));
	json_object_object_add(o, "failed_step", json_object_new_string(t->failed));
	json_object_object_add(o, "end_time", timespec_to_json(&t->end));
	return o;
}

/* Lenient: timings are for people; a record with odd ones is still a good record. */
void op_timing_from_json(json_object *o, OpTiming *ret)
{
	json_object *steps, *v;
	OpTiming t = {};

	snprintf(t.op, sizeof(t.op), "%s", json_get_string(o, "op") ?: "");
	snprintf(t.failed, sizeof(t.failed), "%s", json_get_string(o, "failed_step") ?: "");
	t.total_us = json_get_u64(o, "total_us");
	if (json_object_object_get_ex(o, "end_time", &v))
		timespec_from_json(v, &t.end);
	if (json_object_object_get_ex(o, "steps", &steps) &&
	    json_object_is_type(steps, json_type_array))
		for (size_t i = 0; i < json_object_array_length(steps) && t.n_steps < OP_MAX_STEPS;
		     i++) {
			json_object *st = json_object_array_get_idx(steps, i);
			snprintf(t.steps[t.n_steps].name, sizeof(t.steps[0].name), "%s",
				 json_get_string(st, "name") ?: "");
			t.steps[t.n_steps].us = json_get_u64(st, "us");
			t.n_steps++;
		}
	*ret = t;
}
