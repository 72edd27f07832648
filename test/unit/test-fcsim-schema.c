/* SPDX-License-Identifier: Apache-2.0 */
/*
 * fcsim/schema.c: Firecracker refuses request bodies with unknown fields, missing required
 * fields, wrong types and values outside an enum or a range, and clients (ember's fcctl among
 * them) see serde's wording in fault_message. The simulator must refuse the same bodies, or
 * tests against it pass where Firecracker would fail.
 *
 * Most checks are driven by the tables themselves: starting from a body that sets every field
 * (nested ones too), each field is removed, nulled and given values of wrong types, and every
 * enum and bound is probed, at every depth.
 */
#include <errno.h>
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/macro.h"
#include "fcsim/schema.h"

#define PREFIX "An error occurred when deserializing the json body of a request: "

typedef struct Case {
	const Schema *schema;
	const char *full; /* every property set, nested ones included, all valid */
} Case;

#define TB_FULL "{\"one_time_burst\": 0, \"refill_time\": 100, \"size\": 1048576}"
#define RL_FULL "{\"bandwidth\": " TB_FULL ", \"ops\": " TB_FULL "}"

static const Case cases[] = {
	{&schema_balloon, "{\"amount_mib\": 256, \"deflate_on_oom\": true, "
			  "\"stats_polling_interval_s\": 1, \"free_page_hinting\": false, "
			  "\"free_page_reporting\": true}"},
	{&schema_balloon_update, "{\"amount_mib\": 128}"},
	{&schema_balloon_stats_update, "{\"stats_polling_interval_s\": 5}"},
	{&schema_balloon_start_cmd, "{\"acknowledge_on_stop\": true}"},
	{&schema_boot_source,
	 "{\"boot_args\": \"console=ttyS0 reboot=k\", "
	 "\"initrd_path\": \"initrd.img\", \"kernel_image_path\": \"vmlinux\"}"},
	{&schema_cpu_config,
	 "{\"kvm_capabilities\": [\"121\", \"!171\"], "
	 "\"cpuid_modifiers\": [{\"leaf\": \"0x1\", \"subleaf\": \"0x0\", \"flags\": 0, "
	 "\"modifiers\": [{\"register\": \"eax\", "
	 "\"bitmap\": \"0bxxxxxxxxxxxxxxxxxxxxxxxxxxxx0001\"}]}], "
	 "\"msr_modifiers\": [{\"addr\": \"0x10a\", \"bitmap\": \"0b1\"}], "
	 "\"reg_modifiers\": [{\"addr\": \"0x603000000013c020\", \"bitmap\": \"0bx1\"}], "
	 "\"vcpu_features\": [{\"index\": 0, \"bitmap\": \"0b1100000\"}]}"},
	{&schema_drive, "{\"drive_id\": \"rootfs\", \"partuuid\": \"0eaa91a0-01\", "
			"\"is_root_device\": true, \"cache_type\": \"Writeback\", "
			"\"is_read_only\": false, \"path_on_host\": \"rootfs\", "
			"\"rate_limiter\": " RL_FULL ", \"io_engine\": \"Async\", "
			"\"socket\": \"vhost.sock\"}"},
	{&schema_partial_drive, "{\"drive_id\": \"rootfs\", \"path_on_host\": \"other\", "
				"\"rate_limiter\": " RL_FULL "}"},
	{&schema_pmem,
	 "{\"id\": \"pmem0\", \"path_on_host\": \"pmem.img\", \"root_device\": false, "
	 "\"read_only\": true, \"rate_limiter\": " RL_FULL "}"},
	{&schema_partial_pmem, "{\"id\": \"pmem0\", \"rate_limiter\": " RL_FULL "}"},
	{&schema_logger, "{\"level\": \"Debug\", \"log_path\": \"fc.log\", \"show_level\": true, "
			 "\"show_log_origin\": false, \"module\": \"api_server::request\"}"},
	{&schema_machine_config,
	 "{\"cpu_template\": \"T2\", \"smt\": false, \"mem_size_mib\": 512, "
	 "\"track_dirty_pages\": true, \"vcpu_count\": 2, "
	 "\"huge_pages\": \"2M\"}"},
	{&schema_metrics, "{\"metrics_path\": \"metrics.fifo\"}"},
	{&schema_mmds_config, "{\"version\": \"V2\", \"network_interfaces\": [\"eth0\"], "
			      "\"ipv4_address\": \"169.254.169.254\", \"imds_compat\": true}"},
	{&schema_mmds_contents, "{\"latest\": {\"meta-data\": {\"ami-id\": \"ami-1\"}}, "
				"\"n\": [1, 2.5, null, true]}"},
	{&schema_entropy, "{\"rate_limiter\": " RL_FULL "}"},
	{&schema_serial, "{\"serial_out_path\": \"serial.log\", \"rate_limiter\": " TB_FULL "}"},
	{&schema_memory_hotplug_config,
	 "{\"total_size_mib\": 1024, \"slot_size_mib\": 128, \"block_size_mib\": 2}"},
	{&schema_memory_hotplug_size_update, "{\"requested_size_mib\": 512}"},
	{&schema_network_interface,
	 "{\"guest_mac\": \"06:00:AC:10:00:02\", \"host_dev_name\": \"tap0\", "
	 "\"iface_id\": \"eth0\", \"mtu\": 1500, \"rx_rate_limiter\": " RL_FULL ", "
	 "\"tx_rate_limiter\": " RL_FULL "}"},
	{&schema_partial_network_interface,
	 "{\"iface_id\": \"eth0\", \"rx_rate_limiter\": " RL_FULL ", "
	 "\"tx_rate_limiter\": " RL_FULL "}"},
	{&schema_snapshot_create, "{\"mem_file_path\": \"mem\", \"snapshot_path\": \"vmstate\", "
				  "\"snapshot_type\": \"Diff\"}"},
	/* Both mem_* fields: refusing that is the handler's job, the schema allows each. */
	{&schema_snapshot_load,
	 "{\"enable_diff_snapshots\": false, \"track_dirty_pages\": true, "
	 "\"mem_file_path\": \"mem\", "
	 "\"mem_backend\": {\"backend_type\": \"Uffd\", \"backend_path\": \"uffd.sock\"}, "
	 "\"snapshot_path\": \"vmstate\", \"resume_vm\": true, "
	 "\"network_overrides\": [{\"iface_id\": \"eth0\", \"host_dev_name\": \"tap1\"}], "
	 "\"vsock_override\": {\"uds_path\": \"v2.sock\"}, \"clock_realtime\": false}"},
	{&schema_vm, "{\"state\": \"Paused\"}"},
	{&schema_instance_action, "{\"action_type\": \"InstanceStart\"}"},
	{&schema_vsock, "{\"guest_cid\": 3, \"uds_path\": \"v.sock\", \"vsock_id\": \"vsock0\"}"},
};

static void json_putp(json_object **o)
{
	json_object_put(*o);
}
#define _cleanup_json_ _cleanup_(json_putp)

/* json_tokener_parse() returns NULL both for "null" and for garbage; tell them apart. */
static json_object *parse(const char *text)
{
	enum json_tokener_error err = json_tokener_success;
	json_object *o = json_tokener_parse_verbose(text, &err);

	if (err != json_tokener_success)
		fail_msg("test bug: cannot parse %s: %s", text, json_tokener_error_desc(err));
	return o;
}

static void expect_ok(const Schema *s, json_object *body, const char *what)
{
	_cleanup_free_ char *fault = NULL;
	int r = schema_validate(s, body, &fault);

	if (r != 0)
		fail_msg("%s, %s: refused (%d): %s", s->name, what, r,
			 fault ? fault : "(no fault)");
	assert_null(fault);
}

/* Refused with -EINVAL, a fault in Firecracker's form, containing `needle`. */
static void expect_fault(const Schema *s, json_object *body, const char *needle, const char *what)
{
	_cleanup_free_ char *fault = NULL;
	int r = schema_validate(s, body, &fault);

	if (r != -EINVAL)
		fail_msg("%s, %s: expected -EINVAL, got %d (%s)", s->name, what, r,
			 fault ? fault : "(no fault)");
	assert_non_null(fault);
	if (strncmp(fault, PREFIX, strlen(PREFIX)) != 0)
		fail_msg("%s, %s: fault without Firecracker's prefix: %s", s->name, what, fault);
	if (!strstr(fault, needle))
		fail_msg("%s, %s: fault does not say \"%s\": %s", s->name, what, needle, fault);
}

static void expect_exact(const Schema *s, const char *body_text, const char *want)
{
	_cleanup_json_ json_object *body = parse(body_text);
	_cleanup_free_ char *fault = NULL;

	assert_int_equal(schema_validate(s, body, &fault), -EINVAL);
	assert_non_null(fault);
	if (strncmp(fault, PREFIX, strlen(PREFIX)) != 0 ||
	    strcmp(fault + strlen(PREFIX), want) != 0)
		fail_msg("%s: %s\n  got:  %s\n  want: %s%s", s->name, body_text, fault, PREFIX,
			 want);
}

static void expect_text_ok(const Schema *s, const char *body_text)
{
	_cleanup_json_ json_object *body = parse(body_text);

	expect_ok(s, body, body_text);
}

static void expect_text_fault(const Schema *s, const char *body_text, const char *needle)
{
	_cleanup_json_ json_object *body = parse(body_text);

	expect_fault(s, body, needle, body_text);
}

/* ---------------------------------------------------------------------------------------------
 * table-driven checks at every depth
 */

typedef struct Walk {
	const Schema *root_schema;
	json_object *root;
} Walk;

/* Replaces obj[key] with the value parsed from `text` (json-c releases the old value). */
static void set_text(json_object *obj, const char *key, const char *text)
{
	assert_int_equal(json_object_object_add(obj, key, parse(text)), 0);
}

static const char *const *wrong_values(const Field *f, FieldType type)
{
	static const char *const for_string[] = {"5", "true", "[]", "{}", NULL};
	static const char *const for_bool[] = {"\"true\"", "1", "[]", NULL};
	static const char *const for_int[] = {"\"5\"", "1.5", "1.0", "true", "{}", NULL};
	static const char *const for_object[] = {"5", "\"x\"", "[]", "false", NULL};
	static const char *const for_array[] = {"\"x\"", "{}", "3", NULL};
	static const char *const none[] = {NULL};

	(void)f;
	switch (type) {
	case FIELD_STRING:
		return for_string;
	case FIELD_BOOL:
		return for_bool;
	case FIELD_INT:
	case FIELD_UINT:
		return for_int;
	case FIELD_OBJECT:
		return for_object;
	case FIELD_ARRAY:
		return for_array;
	default:
		return none;
	}
}

static void probe_enum(const Walk *w, json_object *obj, const Field *f)
{
	char what[256], needle[256];

	for (const char *const *e = f->enum_values; *e; e++) {
		(void)snprintf(what, sizeof(what), "%s = %s", f->name, *e);
		assert_int_equal(json_object_object_add(obj, f->name, json_object_new_string(*e)),
				 0);
		expect_ok(w->root_schema, w->root, what);
	}
	(void)snprintf(what, sizeof(what), "%s = NoSuchVariant", f->name);
	set_text(obj, f->name, "\"NoSuchVariant\"");
	expect_fault(w->root_schema, w->root, "unknown variant `NoSuchVariant`, expected ", what);
	(void)snprintf(needle, sizeof(needle), "`%s`", f->name);
	expect_fault(w->root_schema, w->root, needle, what);
}

static void probe_integer(const Walk *w, json_object *obj, const Field *f)
{
	char what[256], needle[256];

	if (f->type == FIELD_UINT) {
		(void)snprintf(what, sizeof(what), "%s = -1", f->name);
		(void)snprintf(needle, sizeof(needle),
			       "invalid value: integer `-1`, expected u64 (field `%s`)", f->name);
		set_text(obj, f->name, "-1");
		expect_fault(w->root_schema, w->root, needle, what);
	}
	if (f->has_min) {
		(void)snprintf(what, sizeof(what), "%s = min %" PRId64, f->name, f->min);
		assert_int_equal(
			json_object_object_add(obj, f->name, json_object_new_int64(f->min)), 0);
		expect_ok(w->root_schema, w->root, what);

		/* Below a minimum of 0, a u64 is refused for its sign instead. */
		if (f->type != FIELD_UINT || f->min > 0) {
			(void)snprintf(what, sizeof(what), "%s = min - 1", f->name);
			(void)snprintf(needle, sizeof(needle), "invalid value: `%s` = %" PRId64,
				       f->name, f->min - 1);
			assert_int_equal(json_object_object_add(obj, f->name,
								json_object_new_int64(f->min - 1)),
					 0);
			expect_fault(w->root_schema, w->root, needle, what);
		}
	}
	if (f->has_max) {
		(void)snprintf(what, sizeof(what), "%s = max %" PRId64, f->name, f->max);
		assert_int_equal(
			json_object_object_add(obj, f->name, json_object_new_int64(f->max)), 0);
		expect_ok(w->root_schema, w->root, what);

		(void)snprintf(what, sizeof(what), "%s = max + 1", f->name);
		(void)snprintf(needle, sizeof(needle), "invalid value: `%s` = %" PRId64, f->name,
			       f->max + 1);
		assert_int_equal(
			json_object_object_add(obj, f->name, json_object_new_int64(f->max + 1)), 0);
		expect_fault(w->root_schema, w->root, needle, what);
	}
}

static void walk(const Walk *w, const Schema *s, json_object *obj);

static void probe_field(const Walk *w, json_object *obj, const Field *f)
{
	json_object *v = NULL;
	char what[256], needle[256];

	if (!json_object_object_get_ex(obj, f->name, &v) || !v)
		fail_msg("test bug: the full %s body lacks %s.%s", w->root_schema->name,
			 json_object_to_json_string(obj), f->name);
	/* Hold the valid value while the field is replaced, and put it back afterwards. */
	json_object_get(v);

	json_object_object_del(obj, f->name);
	(void)snprintf(what, sizeof(what), "without %s", f->name);
	if (f->required) {
		(void)snprintf(needle, sizeof(needle), "missing field `%s`", f->name);
		expect_fault(w->root_schema, w->root, needle, what);
	} else {
		expect_ok(w->root_schema, w->root, what);
	}

	(void)snprintf(what, sizeof(what), "%s = null", f->name);
	set_text(obj, f->name, "null");
	if (f->required) {
		(void)snprintf(needle, sizeof(needle), "invalid type: null, expected ");
		expect_fault(w->root_schema, w->root, needle, what);
		(void)snprintf(needle, sizeof(needle), "`%s`", f->name);
		expect_fault(w->root_schema, w->root, needle, what);
	} else {
		expect_ok(w->root_schema, w->root, what);
	}

	(void)snprintf(needle, sizeof(needle), "(field `%s`)", f->name);
	for (const char *const *t = wrong_values(f, f->type); *t; t++) {
		(void)snprintf(what, sizeof(what), "%s = %s", f->name, *t);
		set_text(obj, f->name, *t);
		expect_fault(w->root_schema, w->root, "invalid type: ", what);
		expect_fault(w->root_schema, w->root, needle, what);
	}
	if (f->type == FIELD_ARRAY) {
		set_text(obj, f->name, "[]");
		expect_ok(w->root_schema, w->root, "empty array");
		for (const char *const *t = wrong_values(f, f->item_type); *t; t++) {
			char item[64];

			(void)snprintf(item, sizeof(item), "[%s]", *t);
			(void)snprintf(what, sizeof(what), "%s = %s", f->name, item);
			set_text(obj, f->name, item);
			expect_fault(w->root_schema, w->root, needle, what);
		}
	}
	if (f->type == FIELD_STRING && f->enum_values)
		probe_enum(w, obj, f);
	if (f->type == FIELD_INT || f->type == FIELD_UINT)
		probe_integer(w, obj, f);

	assert_int_equal(json_object_object_add(obj, f->name, v), 0);
	expect_ok(w->root_schema, w->root, "restored");

	if (f->type == FIELD_OBJECT)
		walk(w, f->object, v);
	if (f->type == FIELD_ARRAY && f->item_type == FIELD_OBJECT) {
		assert_true(json_object_array_length(v) > 0);
		walk(w, f->object, json_object_array_get_idx(v, 0));
	}
}

static void walk(const Walk *w, const Schema *s, json_object *obj)
{
	json_object *v;

	assert_non_null(s);
	assert_true(s->n_fields > 0 || s->additional_properties);
	for (size_t i = 0; i < s->n_fields; i++)
		probe_field(w, obj, &s->fields[i]);

	/* Unknown fields are refused at every depth, and the fault names them. */
	set_text(obj, "no_such_field", "1");
	if (s->additional_properties)
		expect_ok(w->root_schema, w->root, "unknown field");
	else
		expect_fault(w->root_schema, w->root, "unknown field `no_such_field`, expected ",
			     s->name);
	json_object_object_del(obj, "no_such_field");
	assert_false(json_object_object_get_ex(obj, "no_such_field", &v));
	expect_ok(w->root_schema, w->root, "unknown field removed");
}

static void test_full_bodies_pass(void **state)
{
	(void)state;

	/* One case per exported schema: schema.h lists 26. */
	assert_int_equal(ELEMENTSOF(cases), 26);
	for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
		_cleanup_json_ json_object *body = parse(cases[i].full);

		for (size_t j = 0; j < i; j++)
			assert_ptr_not_equal(cases[i].schema, cases[j].schema);
		expect_ok(cases[i].schema, body, "full body");
	}
}

static void test_every_field_at_every_depth(void **state)
{
	(void)state;

	for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
		_cleanup_json_ json_object *body = parse(cases[i].full);
		const Walk w = {.root_schema = cases[i].schema, .root = body};

		walk(&w, cases[i].schema, body);
	}
}

/* The swagger's `required:` lists, copied by hand: the walk above takes `required` from the
 * tables, so a field wrongly marked optional there would go unnoticed without this. */
static const struct {
	const char *schema;
	const char *required; /* space separated, in table order */
} required_fields[] = {
	{"ArmRegisterModifier", "addr bitmap"},
	{"Balloon", "amount_mib deflate_on_oom"},
	{"BalloonStartCmd", ""},
	{"BalloonStatsUpdate", "stats_polling_interval_s"},
	{"BalloonUpdate", "amount_mib"},
	{"BootSource", "kernel_image_path"},
	{"CpuConfig", ""},
	{"CpuidLeafModifier", "leaf subleaf flags modifiers"},
	{"CpuidRegisterModifier", "register bitmap"},
	{"Drive", "drive_id is_root_device"},
	{"EntropyDevice", ""},
	{"InstanceActionInfo", "action_type"},
	{"Logger", ""},
	{"MachineConfiguration", "mem_size_mib vcpu_count"},
	{"MemoryBackend", "backend_type backend_path"},
	{"MemoryHotplugConfig", ""},
	{"MemoryHotplugSizeUpdate", ""},
	{"Metrics", "metrics_path"},
	{"MmdsConfig", "network_interfaces"},
	{"MmdsContentsObject", ""},
	{"MsrModifier", "addr bitmap"},
	{"NetworkInterface", "host_dev_name iface_id"},
	{"NetworkOverride", "iface_id host_dev_name"},
	{"PartialDrive", "drive_id"},
	{"PartialNetworkInterface", "iface_id"},
	{"PartialPmem", "id"},
	{"Pmem", "id path_on_host"},
	{"RateLimiter", ""},
	{"SerialDevice", ""},
	{"SnapshotCreateParams", "mem_file_path snapshot_path"},
	{"SnapshotLoadParams", "snapshot_path"},
	{"TokenBucket", "refill_time size"},
	{"VcpuFeatures", "index bitmap"},
	{"Vm", "state"},
	{"Vsock", "guest_cid uds_path"},
	{"VsockOverride", "uds_path"},
};

static void check_required(const Schema *s, bool *seen)
{
	char got[256] = "";
	size_t k, len = 0;

	for (k = 0; k < ELEMENTSOF(required_fields); k++)
		if (strcmp(required_fields[k].schema, s->name) == 0)
			break;
	if (k == ELEMENTSOF(required_fields)) {
		fail_msg("schema %s is not a swagger definition", s->name);
		return;
	}
	seen[k] = true;

	for (size_t i = 0; i < s->n_fields; i++) {
		if (s->fields[i].required) {
			int n = snprintf(got + len, sizeof(got) - len, "%s%s", len ? " " : "",
					 s->fields[i].name);

			assert_true(n > 0 && (size_t)n < sizeof(got) - len);
			len += (size_t)n;
		}
		if (s->fields[i].type == FIELD_OBJECT ||
		    (s->fields[i].type == FIELD_ARRAY && s->fields[i].item_type == FIELD_OBJECT))
			check_required(s->fields[i].object, seen);
	}
	if (strcmp(got, required_fields[k].required) != 0)
		fail_msg("%s requires \"%s\", the swagger \"%s\"", s->name, got,
			 required_fields[k].required);
}

static void test_required_fields(void **state)
{
	bool seen[ELEMENTSOF(required_fields)] = {false};
	(void)state;

	for (size_t i = 0; i < ELEMENTSOF(cases); i++)
		check_required(cases[i].schema, seen);
	/* Every listed definition, nested ones included, is reachable from a request body. */
	for (size_t k = 0; k < ELEMENTSOF(required_fields); k++)
		if (!seen[k])
			fail_msg("no schema for %s", required_fields[k].schema);
}

static void test_not_an_object(void **state)
{
	static const char *const bodies[] = {"[]", "\"x\"", "5", "1.5", "true", "null"};
	(void)state;

	for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
		char needle[128];

		if (cases[i].schema->additional_properties)
			(void)snprintf(needle, sizeof(needle), ", expected a map");
		else
			(void)snprintf(needle, sizeof(needle), ", expected struct %s",
				       cases[i].schema->name);
		for (size_t j = 0; j < ELEMENTSOF(bodies); j++)
			expect_text_fault(cases[i].schema, bodies[j], needle);
	}

	expect_exact(&schema_drive, "[1]", "invalid type: sequence, expected struct Drive");
	expect_exact(&schema_drive, "\"x\"", "invalid type: string \"x\", expected struct Drive");
	expect_exact(&schema_vm, "7", "invalid type: integer `7`, expected struct Vm");
	expect_exact(&schema_vm, "false", "invalid type: boolean `false`, expected struct Vm");
	expect_exact(&schema_vm, "null", "invalid type: null, expected struct Vm");
	expect_exact(&schema_mmds_contents, "[]", "invalid type: sequence, expected a map");
}

/* ---------------------------------------------------------------------------------------------
 * Firecracker's wording and specific rules
 */

static void test_unknown_field_wording(void **state)
{
	(void)state;

	expect_exact(&schema_drive, "{\"drive_id\": \"a\", \"is_root_device\": true, \"foo\": 1}",
		     "unknown field `foo`, expected one of `drive_id`, `partuuid`, "
		     "`is_root_device`, `cache_type`, `is_read_only`, `path_on_host`, "
		     "`rate_limiter`, `io_engine`, `socket`");
	/* serde's OneOf for two and for one name. */
	expect_exact(&schema_partial_pmem, "{\"id\": \"p\", \"path_on_host\": \"x\"}",
		     "unknown field `path_on_host`, expected `id` or `rate_limiter`");
	expect_exact(&schema_entropy, "{\"rate\": {}}",
		     "unknown field `rate`, expected `rate_limiter`");
	expect_exact(&schema_drive,
		     "{\"drive_id\": \"a\", \"is_root_device\": true, "
		     "\"rate_limiter\": {\"bandwidth\": {\"size\": 1, \"refill_time\": 1, "
		     "\"burst\": 1}}}",
		     "unknown field `burst`, expected one of `one_time_burst`, `refill_time`, "
		     "`size`");
	/* gdb_socket_path is commented out in the swagger: a release build does not know it. */
	expect_text_fault(&schema_machine_config,
			  "{\"vcpu_count\": 1, \"mem_size_mib\": 128, \"gdb_socket_path\": \"g\"}",
			  "unknown field `gdb_socket_path`");
}

static void test_type_wording(void **state)
{
	(void)state;

	expect_exact(&schema_vm, "{}", "missing field `state`");
	expect_exact(&schema_drive,
		     "{\"drive_id\": \"a\", \"is_root_device\": true, "
		     "\"rate_limiter\": {\"bandwidth\": {\"size\": \"x\", \"refill_time\": 1}}}",
		     "invalid type: string \"x\", expected u64 (field `size`)");
	expect_exact(&schema_machine_config, "{\"vcpu_count\": 1, \"mem_size_mib\": 1.5}",
		     "invalid type: floating point `1.5`, expected u64 (field `mem_size_mib`)");
	expect_exact(&schema_boot_source, "{\"kernel_image_path\": 5}",
		     "invalid type: integer `5`, expected a string (field `kernel_image_path`)");
	expect_exact(&schema_drive, "{\"drive_id\": \"a\", \"is_root_device\": \"yes\"}",
		     "invalid type: string \"yes\", expected a boolean (field `is_root_device`)");
	expect_exact(&schema_drive,
		     "{\"drive_id\": \"a\", \"is_root_device\": true, "
		     "\"rate_limiter\": []}",
		     "invalid type: sequence, expected struct RateLimiter (field `rate_limiter`)");
	expect_exact(&schema_mmds_config, "{\"network_interfaces\": \"eth0\"}",
		     "invalid type: string \"eth0\", expected a sequence "
		     "(field `network_interfaces`)");
	expect_exact(&schema_mmds_config, "{\"network_interfaces\": [\"eth0\", 1]}",
		     "invalid type: integer `1`, expected a string (field `network_interfaces`)");
	expect_exact(&schema_snapshot_load,
		     "{\"snapshot_path\": \"s\", \"network_overrides\": [\"eth0\"]}",
		     "invalid type: string \"eth0\", expected struct NetworkOverride "
		     "(field `network_overrides`)");
	/* Quotes and backslashes are escaped, as Rust's {:?} does; slashes are not. */
	expect_exact(&schema_vsock, "{\"guest_cid\": \"a\\\"b\\\\/c\", \"uds_path\": \"v\"}",
		     "invalid type: string \"a\\\"b\\\\/c\", expected u64 (field `guest_cid`)");
	expect_exact(&schema_balloon, "{\"amount_mib\": -1, \"deflate_on_oom\": true}",
		     "invalid value: integer `-1`, expected u64 (field `amount_mib`)");
}

static void test_enum_wording(void **state)
{
	(void)state;

	expect_exact(&schema_vm, "{\"state\": \"Stopped\"}",
		     "unknown variant `Stopped`, expected `Paused` or `Resumed` (field `state`)");
	expect_exact(&schema_instance_action, "{\"action_type\": \"Reboot\"}",
		     "unknown variant `Reboot`, expected one of `FlushMetrics`, `InstanceStart`, "
		     "`SendCtrlAltDel` (field `action_type`)");
	/* Derived serde enums are case-sensitive... */
	expect_text_fault(&schema_vm, "{\"state\": \"paused\"}", "unknown variant `paused`");
	expect_text_fault(&schema_snapshot_create,
			  "{\"mem_file_path\": \"m\", \"snapshot_path\": \"s\", "
			  "\"snapshot_type\": \"full\"}",
			  "unknown variant `full`");
	expect_text_ok(&schema_snapshot_load,
		       "{\"snapshot_path\": \"s\", \"mem_backend\": "
		       "{\"backend_type\": \"File\", \"backend_path\": \"m\"}}");
	expect_text_fault(&schema_snapshot_load,
			  "{\"snapshot_path\": \"s\", \"mem_backend\": "
			  "{\"backend_type\": \"Disk\", \"backend_path\": \"m\"}}",
			  "expected `File` or `Uffd` (field `backend_type`)");
	/* ...but the swagger says Logger's level is not. */
	expect_text_ok(&schema_logger, "{\"level\": \"debug\"}");
	expect_text_ok(&schema_logger, "{\"level\": \"WARNING\"}");
	expect_text_ok(&schema_logger, "{\"level\": \"off\"}");
	expect_text_fault(&schema_logger, "{\"level\": \"verbose\"}",
			  "unknown variant `verbose`, expected one of `Error`, `Warning`, `Info`, "
			  "`Debug`, `Trace`, `Off` (field `level`)");
	expect_text_fault(&schema_machine_config,
			  "{\"vcpu_count\": 1, \"mem_size_mib\": 128, \"cpu_template\": \"T3\"}",
			  "unknown variant `T3`, expected one of `C3`, `T2`, `T2S`, `T2CL`, `T2A`, "
			  "`V1N1`, `None`");
	expect_text_fault(
		&schema_cpu_config,
		"{\"cpuid_modifiers\": [{\"leaf\": \"0x1\", \"subleaf\": \"0x0\", "
		"\"flags\": 0, \"modifiers\": [{\"register\": \"eax\", \"bitmap\": \"0b1\"}, "
		"{\"register\": \"rax\", \"bitmap\": \"0b1\"}]}]}",
		"unknown variant `rax`, expected one of `eax`, `ebx`, `ecx`, `edx` "
		"(field `register`)");
}

static void test_ranges(void **state)
{
	const Schema *mc = &schema_machine_config;
	(void)state;

	expect_exact(mc, "{\"vcpu_count\": 33, \"mem_size_mib\": 128}",
		     "invalid value: `vcpu_count` = 33, expected a value between 1 and 32");
	expect_text_fault(mc, "{\"vcpu_count\": 0, \"mem_size_mib\": 128}",
			  "invalid value: `vcpu_count` = 0");
	expect_text_ok(mc, "{\"vcpu_count\": 1, \"mem_size_mib\": 128}");
	expect_text_ok(mc, "{\"vcpu_count\": 32, \"mem_size_mib\": 128}");
	expect_text_fault(mc, "{\"vcpu_count\": -2, \"mem_size_mib\": 128}",
			  "integer `-2`, expected u64 (field `vcpu_count`)");
	expect_text_fault(mc, "{\"vcpu_count\": 18446744073709551615, \"mem_size_mib\": 128}",
			  "invalid value: `vcpu_count` = 18446744073709551615");

	expect_exact(&schema_vsock, "{\"guest_cid\": 2, \"uds_path\": \"v.sock\"}",
		     "invalid value: `guest_cid` = 2, expected a value of at least 3");
	expect_text_ok(&schema_vsock, "{\"guest_cid\": 3, \"uds_path\": \"v.sock\"}");
	expect_text_ok(&schema_vsock, "{\"guest_cid\": 4294967295, \"uds_path\": \"v.sock\"}");

	expect_text_fault(&schema_network_interface,
			  "{\"iface_id\": \"eth0\", \"host_dev_name\": \"tap0\", \"mtu\": 67}",
			  "invalid value: `mtu` = 67, expected a value between 68 and 65535");
	expect_text_fault(&schema_network_interface,
			  "{\"iface_id\": \"eth0\", \"host_dev_name\": \"tap0\", \"mtu\": 65536}",
			  "invalid value: `mtu` = 65536");
	expect_text_ok(&schema_network_interface,
		       "{\"iface_id\": \"eth0\", \"host_dev_name\": \"tap0\", \"mtu\": 68}");

	expect_text_fault(&schema_memory_hotplug_config, "{\"slot_size_mib\": 127}",
			  "invalid value: `slot_size_mib` = 127, expected a value of at least 128");
	expect_text_fault(&schema_memory_hotplug_config, "{\"block_size_mib\": 1}",
			  "invalid value: `block_size_mib` = 1, expected a value of at least 2");
	expect_text_ok(&schema_memory_hotplug_config, "{}");

	/* u64 fields take values above INT64_MAX (json-c keeps them as uint64). */
	expect_text_ok(&schema_serial, "{\"rate_limiter\": {\"refill_time\": 1, "
				       "\"size\": 18446744073709551615}}");
}

static void test_nested(void **state)
{
	(void)state;

	expect_text_fault(
		&schema_drive,
		"{\"drive_id\": \"a\", \"is_root_device\": true, "
		"\"rate_limiter\": {\"bandwidth\": {\"size\": \"1\", \"refill_time\": 1}}}",
		"(field `size`)");
	expect_text_fault(&schema_network_interface,
			  "{\"iface_id\": \"eth0\", \"host_dev_name\": \"tap0\", "
			  "\"tx_rate_limiter\": {\"ops\": {\"size\": 1}}}",
			  "missing field `refill_time`");
	expect_text_fault(&schema_cpu_config,
			  "{\"cpuid_modifiers\": [{\"leaf\": \"0x1\", \"subleaf\": \"0x0\", "
			  "\"flags\": 0, \"modifiers\": [{\"register\": \"eax\"}]}]}",
			  "missing field `bitmap`");
	expect_text_fault(&schema_snapshot_load,
			  "{\"snapshot_path\": \"s\", \"vsock_override\": {\"path\": \"v\"}}",
			  "unknown field `path`, expected `uds_path`");
	/* Empty nested objects are fine where nothing inside is required. */
	expect_text_ok(&schema_drive, "{\"drive_id\": \"a\", \"is_root_device\": true, "
				      "\"rate_limiter\": {}}");
	expect_text_ok(&schema_cpu_config, "{}");
	/* serde reads keys in order: the first bad one is reported, missing fields last. */
	expect_text_fault(&schema_vsock, "{\"bogus\": 1, \"guest_cid\": \"x\"}",
			  "unknown field `bogus`");
	expect_text_fault(&schema_vsock, "{\"guest_cid\": \"x\", \"bogus\": 1}",
			  "(field `guest_cid`)");
}

static void test_null(void **state)
{
	(void)state;

	expect_text_ok(&schema_drive, "{\"drive_id\": \"a\", \"is_root_device\": true, "
				      "\"partuuid\": null, \"rate_limiter\": null}");
	expect_text_ok(&schema_drive, "{\"drive_id\": \"a\", \"is_root_device\": true, "
				      "\"rate_limiter\": {\"bandwidth\": null}}");
	expect_exact(&schema_vsock, "{\"guest_cid\": null, \"uds_path\": \"v\"}",
		     "invalid type: null, expected u64 (field `guest_cid`)");
	expect_text_fault(&schema_mmds_config, "{\"network_interfaces\": [null]}",
			  "invalid type: null, expected a string");
}

static void test_mmds_contents(void **state)
{
	(void)state;

	expect_text_ok(&schema_mmds_contents, "{}");
	expect_text_ok(&schema_mmds_contents, "{\"a\": null, \"b\": {\"c\": [{}, 1, \"x\"]}}");
	expect_text_fault(&schema_mmds_contents, "\"text\"", "expected a map");
}

static void test_fault_handling(void **state)
{
	_cleanup_json_ json_object *good = parse("{\"state\": \"Resumed\"}");
	_cleanup_json_ json_object *bad = parse("{\"state\": 1}");
	char sentinel[] = "untouched";
	char *fault = sentinel;
	(void)state;

	/* ret_fault is an output on failure only. */
	assert_int_equal(schema_validate(&schema_vm, good, &fault), 0);
	assert_ptr_equal(fault, sentinel);
	/* A caller that does not want the message still learns the verdict. */
	assert_int_equal(schema_validate(&schema_vm, good, NULL), 0);
	assert_int_equal(schema_validate(&schema_vm, bad, NULL), -EINVAL);
	assert_int_equal(schema_validate(NULL, good, NULL), -EINVAL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_full_bodies_pass),
		cmocka_unit_test(test_every_field_at_every_depth),
		cmocka_unit_test(test_required_fields),
		cmocka_unit_test(test_not_an_object),
		cmocka_unit_test(test_unknown_field_wording),
		cmocka_unit_test(test_type_wording),
		cmocka_unit_test(test_enum_wording),
		cmocka_unit_test(test_ranges),
		cmocka_unit_test(test_nested),
		cmocka_unit_test(test_null),
		cmocka_unit_test(test_mmds_contents),
		cmocka_unit_test(test_fault_handling),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
