/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Firecracker's request body schemas (firecracker-v1.16.1.yaml, `definitions:`) as tables, and
 * a validator with serde's rules and wording.
 *
 * Properties are listed in the swagger's order, which is also the order of Firecracker's Rust
 * structs where they are known to agree: serde lists the expected fields in struct order, so
 * "unknown field" faults read like Firecracker's. Integers are FIELD_UINT where Firecracker
 * deserializes into an unsigned Rust type (serde refuses negative values there even where the
 * swagger gives no minimum). Bounds are only those the swagger states.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/macro.h"
#include "fcsim/schema.h"

/* Firecracker prefixes every serde error of a request body with this (parsed_request.rs). */
#define FAULT_PREFIX "An error occurred when deserializing the json body of a request: "

/* ---------------------------------------------------------------------------------------------
 * enums (string values)
 */

static const char *const cpu_templates[] = {"C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None", NULL};
static const char *const huge_pages[] = {"None", "2M", NULL};
static const char *const cache_types[] = {"Unsafe", "Writeback", NULL};
static const char *const io_engines[] = {"Sync", "Async", NULL};
/* The swagger says Logger's level is case-insensitive (Firecracker parses it with its own
 * FromStr, not a derived enum): matched with strcasecmp, see string_in_enum(). */
static const char *const log_levels[] = {"Error", "Warning", "Info", "Debug", "Trace", "Off", NULL};
static const char *const mmds_versions[] = {"V1", "V2", NULL};
static const char *const action_types[] = {"FlushMetrics", "InstanceStart", "SendCtrlAltDel", NULL};
static const char *const vm_states[] = {"Paused", "Resumed", NULL};
static const char *const snapshot_types[] = {"Full", "Diff", NULL};
static const char *const backend_types[] = {"File", "Uffd", NULL};
static const char *const cpuid_registers[] = {"eax", "ebx", "ecx", "edx", NULL};

#define SCHEMA(n, f)                                                                               \
	{                                                                                          \
		.name = (n), .fields = (f), .n_fields = ELEMENTSOF(f)                              \
	}

/* ---------------------------------------------------------------------------------------------
 * nested definitions: referenced only from the request bodies below
 */

/* The swagger's `minimum: 0` is kept although FIELD_UINT implies it: the table mirrors the
 * swagger, so a contract test can compare the two. */
static const Field token_bucket_fields[] = {
	{.name = "one_time_burst", .type = FIELD_UINT, .has_min = true, .min = 0},
	{.name = "refill_time", .type = FIELD_UINT, .required = true, .has_min = true, .min = 0},
	{.name = "size", .type = FIELD_UINT, .required = true, .has_min = true, .min = 0},
};
static const Schema schema_token_bucket = SCHEMA("TokenBucket", token_bucket_fields);

static const Field rate_limiter_fields[] = {
	{.name = "bandwidth", .type = FIELD_OBJECT, .object = &schema_token_bucket},
	{.name = "ops", .type = FIELD_OBJECT, .object = &schema_token_bucket},
};
static const Schema schema_rate_limiter = SCHEMA("RateLimiter", rate_limiter_fields);

static const Field memory_backend_fields[] = {
	{.name = "backend_type",
	 .type = FIELD_STRING,
	 .required = true,
	 .enum_values = backend_types},
	{.name = "backend_path", .type = FIELD_STRING, .required = true},
};
static const Schema schema_memory_backend = SCHEMA("MemoryBackend", memory_backend_fields);

static const Field network_override_fields[] = {
	{.name = "iface_id", .type = FIELD_STRING, .required = true},
	{.name = "host_dev_name", .type = FIELD_STRING, .required = true},
};
static const Schema schema_network_override = SCHEMA("NetworkOverride", network_override_fields);

static const Field vsock_override_fields[] = {
	{.name = "uds_path", .type = FIELD_STRING, .required = true},
};
static const Schema schema_vsock_override = SCHEMA("VsockOverride", vsock_override_fields);

static const Field cpuid_register_modifier_fields[] = {
	{.name = "register",
	 .type = FIELD_STRING,
	 .required = true,
	 .enum_values = cpuid_registers},
	{.name = "bitmap", .type = FIELD_STRING, .required = true},
};
static const Schema schema_cpuid_register_modifier =
	SCHEMA("CpuidRegisterModifier", cpuid_register_modifier_fields);

/* leaf and subleaf are strings ("0x1", "0b1", "1") that Firecracker parses into u32 itself;
 * flags is `int32` in the swagger but a u32 (KvmCpuidFlags) in Firecracker. */
static const Field cpuid_leaf_modifier_fields[] = {
	{.name = "leaf", .type = FIELD_STRING, .required = true},
	{.name = "subleaf", .type = FIELD_STRING, .required = true},
	{.name = "flags", .type = FIELD_UINT, .required = true},
	{.name = "modifiers",
	 .type = FIELD_ARRAY,
	 .required = true,
	 .item_type = FIELD_OBJECT,
	 .object = &schema_cpuid_register_modifier},
};
static const Schema schema_cpuid_leaf_modifier =
	SCHEMA("CpuidLeafModifier", cpuid_leaf_modifier_fields);

static const Field msr_modifier_fields[] = {
	{.name = "addr", .type = FIELD_STRING, .required = true},
	{.name = "bitmap", .type = FIELD_STRING, .required = true},
};
static const Schema schema_msr_modifier = SCHEMA("MsrModifier", msr_modifier_fields);

static const Field arm_register_modifier_fields[] = {
	{.name = "addr", .type = FIELD_STRING, .required = true},
	{.name = "bitmap", .type = FIELD_STRING, .required = true},
};
static const Schema schema_arm_register_modifier =
	SCHEMA("ArmRegisterModifier", arm_register_modifier_fields);

/* index is `int32` in the swagger, an index into kvm_vcpu_init.features (u32) in Firecracker. */
static const Field vcpu_features_fields[] = {
	{.name = "index", .type = FIELD_UINT, .required = true},
	{.name = "bitmap", .type = FIELD_STRING, .required = true},
};
static const Schema schema_vcpu_features = SCHEMA("VcpuFeatures", vcpu_features_fields);

/* ---------------------------------------------------------------------------------------------
 * request bodies
 */

static const Field balloon_fields[] = {
	{.name = "amount_mib", .type = FIELD_UINT, .required = true},
	{.name = "deflate_on_oom", .type = FIELD_BOOL, .required = true},
	{.name = "stats_polling_interval_s", .type = FIELD_UINT},
	{.name = "free_page_hinting", .type = FIELD_BOOL},
	{.name = "free_page_reporting", .type = FIELD_BOOL},
};
const Schema schema_balloon = SCHEMA("Balloon", balloon_fields);

static const Field balloon_update_fields[] = {
	{.name = "amount_mib", .type = FIELD_UINT, .required = true},
};
const Schema schema_balloon_update = SCHEMA("BalloonUpdate", balloon_update_fields);

static const Field balloon_stats_update_fields[] = {
	{.name = "stats_polling_interval_s", .type = FIELD_UINT, .required = true},
};
const Schema schema_balloon_stats_update =
	SCHEMA("BalloonStatsUpdate", balloon_stats_update_fields);

static const Field balloon_start_cmd_fields[] = {
	{.name = "acknowledge_on_stop", .type = FIELD_BOOL},
};
const Schema schema_balloon_start_cmd = SCHEMA("BalloonStartCmd", balloon_start_cmd_fields);

static const Field boot_source_fields[] = {
	{.name = "boot_args", .type = FIELD_STRING},
	{.name = "initrd_path", .type = FIELD_STRING},
	{.name = "kernel_image_path", .type = FIELD_STRING, .required = true},
};
const Schema schema_boot_source = SCHEMA("BootSource", boot_source_fields);

/* All five lists, although Firecracker accepts only the x86_64 or only the aarch64 ones: the
 * swagger describes both architectures in one definition. */
static const Field cpu_config_fields[] = {
	{.name = "kvm_capabilities", .type = FIELD_ARRAY, .item_type = FIELD_STRING},
	{.name = "cpuid_modifiers",
	 .type = FIELD_ARRAY,
	 .item_type = FIELD_OBJECT,
	 .object = &schema_cpuid_leaf_modifier},
	{.name = "msr_modifiers",
	 .type = FIELD_ARRAY,
	 .item_type = FIELD_OBJECT,
	 .object = &schema_msr_modifier},
	{.name = "reg_modifiers",
	 .type = FIELD_ARRAY,
	 .item_type = FIELD_OBJECT,
	 .object = &schema_arm_register_modifier},
	{.name = "vcpu_features",
	 .type = FIELD_ARRAY,
	 .item_type = FIELD_OBJECT,
	 .object = &schema_vcpu_features},
};
const Schema schema_cpu_config = SCHEMA("CpuConfig", cpu_config_fields);

static const Field drive_fields[] = {
	{.name = "drive_id", .type = FIELD_STRING, .required = true},
	{.name = "partuuid", .type = FIELD_STRING},
	{.name = "is_root_device", .type = FIELD_BOOL, .required = true},
	{.name = "cache_type", .type = FIELD_STRING, .enum_values = cache_types},
	{.name = "is_read_only", .type = FIELD_BOOL},
	{.name = "path_on_host", .type = FIELD_STRING},
	{.name = "rate_limiter", .type = FIELD_OBJECT, .object = &schema_rate_limiter},
	{.name = "io_engine", .type = FIELD_STRING, .enum_values = io_engines},
	{.name = "socket", .type = FIELD_STRING},
};
const Schema schema_drive = SCHEMA("Drive", drive_fields);

static const Field partial_drive_fields[] = {
	{.name = "drive_id", .type = FIELD_STRING, .required = true},
	{.name = "path_on_host", .type = FIELD_STRING},
	{.name = "rate_limiter", .type = FIELD_OBJECT, .object = &schema_rate_limiter},
};
const Schema schema_partial_drive = SCHEMA("PartialDrive", partial_drive_fields);

static const Field pmem_fields[] = {
	{.name = "id", .type = FIELD_STRING, .required = true},
	{.name = "path_on_host", .type = FIELD_STRING, .required = true},
	{.name = "root_device", .type = FIELD_BOOL},
	{.name = "read_only", .type = FIELD_BOOL},
	{.name = "rate_limiter", .type = FIELD_OBJECT, .object = &schema_rate_limiter},
};
const Schema schema_pmem = SCHEMA("Pmem", pmem_fields);

static const Field partial_pmem_fields[] = {
	{.name = "id", .type = FIELD_STRING, .required = true},
	{.name = "rate_limiter", .type = FIELD_OBJECT, .object = &schema_rate_limiter},
};
const Schema schema_partial_pmem = SCHEMA("PartialPmem", partial_pmem_fields);

static const Field logger_fields[] = {
	{.name = "level", .type = FIELD_STRING, .enum_values = log_levels},
	{.name = "log_path", .type = FIELD_STRING},
	{.name = "show_level", .type = FIELD_BOOL},
	{.name = "show_log_origin", .type = FIELD_BOOL},
	{.name = "module", .type = FIELD_STRING},
};
const Schema schema_logger = SCHEMA("Logger", logger_fields);

/* gdb_socket_path is commented out in the swagger (it needs Firecracker's gdb feature), so it
 * is an unknown field here as in a release build. */
static const Field machine_config_fields[] = {
	{.name = "cpu_template", .type = FIELD_STRING, .enum_values = cpu_templates},
	{.name = "smt", .type = FIELD_BOOL},
	{.name = "mem_size_mib", .type = FIELD_UINT, .required = true},
	{.name = "track_dirty_pages", .type = FIELD_BOOL},
	{.name = "vcpu_count",
	 .type = FIELD_UINT,
	 .required = true,
	 .has_min = true,
	 .min = 1,
	 .has_max = true,
	 .max = 32},
	{.name = "huge_pages", .type = FIELD_STRING, .enum_values = huge_pages},
};
const Schema schema_machine_config = SCHEMA("MachineConfiguration", machine_config_fields);

static const Field metrics_fields[] = {
	{.name = "metrics_path", .type = FIELD_STRING, .required = true},
};
const Schema schema_metrics = SCHEMA("Metrics", metrics_fields);

/* ipv4_address's link-local pattern is a semantic check (Firecracker's own error), not
 * deserialization: left to the handler. */
static const Field mmds_config_fields[] = {
	{.name = "version", .type = FIELD_STRING, .enum_values = mmds_versions},
	{.name = "network_interfaces",
	 .type = FIELD_ARRAY,
	 .required = true,
	 .item_type = FIELD_STRING},
	{.name = "ipv4_address", .type = FIELD_STRING},
	{.name = "imds_compat", .type = FIELD_BOOL},
};
const Schema schema_mmds_config = SCHEMA("MmdsConfig", mmds_config_fields);

const Schema schema_mmds_contents = {
	.name = "MmdsContentsObject",
	.additional_properties = true,
};

static const Field entropy_fields[] = {
	{.name = "rate_limiter", .type = FIELD_OBJECT, .object = &schema_rate_limiter},
};
const Schema schema_entropy = SCHEMA("EntropyDevice", entropy_fields);

/* The serial device's rate limiter is a bare token bucket, not a RateLimiter. */
static const Field serial_fields[] = {
	{.name = "serial_out_path", .type = FIELD_STRING},
	{.name = "rate_limiter", .type = FIELD_OBJECT, .object = &schema_token_bucket},
};
const Schema schema_serial = SCHEMA("SerialDevice", serial_fields);

static const Field memory_hotplug_config_fields[] = {
	{.name = "total_size_mib", .type = FIELD_UINT},
	{.name = "slot_size_mib", .type = FIELD_UINT, .has_min = true, .min = 128},
	{.name = "block_size_mib", .type = FIELD_UINT, .has_min = true, .min = 2},
};
const Schema schema_memory_hotplug_config =
	SCHEMA("MemoryHotplugConfig", memory_hotplug_config_fields);

static const Field memory_hotplug_size_update_fields[] = {
	{.name = "requested_size_mib", .type = FIELD_UINT},
};
const Schema schema_memory_hotplug_size_update =
	SCHEMA("MemoryHotplugSizeUpdate", memory_hotplug_size_update_fields);

static const Field network_interface_fields[] = {
	{.name = "guest_mac", .type = FIELD_STRING},
	{.name = "host_dev_name", .type = FIELD_STRING, .required = true},
	{.name = "iface_id", .type = FIELD_STRING, .required = true},
	{.name = "mtu",
	 .type = FIELD_UINT,
	 .has_min = true,
	 .min = 68,
	 .has_max = true,
	 .max = 65535},
	{.name = "rx_rate_limiter", .type = FIELD_OBJECT, .object = &schema_rate_limiter},
	{.name = "tx_rate_limiter", .type = FIELD_OBJECT, .object = &schema_rate_limiter},
};
const Schema schema_network_interface = SCHEMA("NetworkInterface", network_interface_fields);

static const Field partial_network_interface_fields[] = {
	{.name = "iface_id", .type = FIELD_STRING, .required = true},
	{.name = "rx_rate_limiter", .type = FIELD_OBJECT, .object = &schema_rate_limiter},
	{.name = "tx_rate_limiter", .type = FIELD_OBJECT, .object = &schema_rate_limiter},
};
const Schema schema_partial_network_interface =
	SCHEMA("PartialNetworkInterface", partial_network_interface_fields);

static const Field snapshot_create_fields[] = {
	{.name = "mem_file_path", .type = FIELD_STRING, .required = true},
	{.name = "snapshot_path", .type = FIELD_STRING, .required = true},
	{.name = "snapshot_type", .type = FIELD_STRING, .enum_values = snapshot_types},
};
const Schema schema_snapshot_create = SCHEMA("SnapshotCreateParams", snapshot_create_fields);

/* "Exactly one of mem_file_path and mem_backend" is Firecracker's check after deserialization,
 * with its own message: the handler's job, not the schema's. */
static const Field snapshot_load_fields[] = {
	{.name = "enable_diff_snapshots", .type = FIELD_BOOL},
	{.name = "track_dirty_pages", .type = FIELD_BOOL},
	{.name = "mem_file_path", .type = FIELD_STRING},
	{.name = "mem_backend", .type = FIELD_OBJECT, .object = &schema_memory_backend},
	{.name = "snapshot_path", .type = FIELD_STRING, .required = true},
	{.name = "resume_vm", .type = FIELD_BOOL},
	{.name = "network_overrides",
	 .type = FIELD_ARRAY,
	 .item_type = FIELD_OBJECT,
	 .object = &schema_network_override},
	{.name = "vsock_override", .type = FIELD_OBJECT, .object = &schema_vsock_override},
	{.name = "clock_realtime", .type = FIELD_BOOL},
};
const Schema schema_snapshot_load = SCHEMA("SnapshotLoadParams", snapshot_load_fields);

static const Field vm_fields[] = {
	{.name = "state", .type = FIELD_STRING, .required = true, .enum_values = vm_states},
};
const Schema schema_vm = SCHEMA("Vm", vm_fields);

static const Field instance_action_fields[] = {
	{.name = "action_type",
	 .type = FIELD_STRING,
	 .required = true,
	 .enum_values = action_types},
};
const Schema schema_instance_action = SCHEMA("InstanceActionInfo", instance_action_fields);

static const Field vsock_fields[] = {
	{.name = "guest_cid", .type = FIELD_UINT, .required = true, .has_min = true, .min = 3},
	{.name = "uds_path", .type = FIELD_STRING, .required = true},
	{.name = "vsock_id", .type = FIELD_STRING},
};
const Schema schema_vsock = SCHEMA("Vsock", vsock_fields);

/* ---------------------------------------------------------------------------------------------
 * validation
 */

static int fault(char **ret_fault, const char *fmt, ...) _printf_(2, 3);
static int fault(char **ret_fault, const char *fmt, ...)
{
	_cleanup_free_ char *msg = NULL;
	char *full;
	va_list ap;
	int r;

	if (!ret_fault)
		return -EINVAL;

	va_start(ap, fmt);
	r = vasprintf(&msg, fmt, ap);
	va_end(ap);
	if (r < 0)
		return -ENOMEM;
	if (asprintf(&full, FAULT_PREFIX "%s", msg) < 0)
		return -ENOMEM;
	*ret_fault = full;
	return -EINVAL;
}

/* serde's Unexpected: how the offending JSON value is named in "invalid type" faults. Strings
 * are shown quoted and escaped, as Rust's {:?} does. NULL only when out of memory. */
static char *describe_value(json_object *v)
{
	const int flags = JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE;
	char *s = NULL;
	int r;

	switch (json_object_get_type(v)) {
	case json_type_null:
		return strdup("null");
	case json_type_boolean:
		r = asprintf(&s, "boolean `%s`", json_object_get_boolean(v) ? "true" : "false");
		break;
	case json_type_int:
		/* Serialized by json-c, so values above INT64_MAX print as parsed. */
		r = asprintf(&s, "integer `%s`", json_object_to_json_string_ext(v, flags));
		break;
	case json_type_double:
		/* json-c keeps a parsed double's text: "1.50" stays "1.50". */
		r = asprintf(&s, "floating point `%s`", json_object_to_json_string_ext(v, flags));
		break;
	case json_type_string:
		r = asprintf(&s, "string %s", json_object_to_json_string_ext(v, flags));
		break;
	case json_type_array:
		return strdup("sequence");
	case json_type_object:
		return strdup("map");
	default:
		return strdup("unknown value");
	}
	return r < 0 ? NULL : s;
}

/* serde's OneOf: "`a`", "`a` or `b`", "one of `a`, `b`, `c`". NULL only when out of memory. */
static char *format_one_of(const char *const *names, size_t n)
{
	size_t len = sizeof("one of ");
	char *buf, *p;

	/* Each name takes two backticks and at most four separator characters (" or "). */
	for (size_t i = 0; i < n; i++)
		len += strlen(names[i]) + 6;
	buf = malloc(len);
	if (!buf)
		return NULL;

	p = buf;
	if (n > 2)
		p = stpcpy(p, "one of ");
	for (size_t i = 0; i < n; i++) {
		if (i > 0)
			p = stpcpy(p, n == 2 ? " or " : ", ");
		*p++ = '`';
		p = stpcpy(p, names[i]);
		*p++ = '`';
	}
	*p = '\0';
	return buf;
}

/* serde names the field in "unknown field" and "missing field" only; everywhere else we add it,
 * since without serde_json's line/column a client could not tell which value was wrong. */
static int type_fault(const Field *f, json_object *v, const char *expected, char **ret_fault)
{
	_cleanup_free_ char *found = describe_value(v);

	if (!found)
		return -ENOMEM;
	return fault(ret_fault, "invalid type: %s, expected %s (field `%s`)", found, expected,
		     f->name);
}

static bool string_in_enum(const Field *f, const char *s)
{
	for (const char *const *e = f->enum_values; *e; e++) {
		if (f->enum_values == log_levels ? strcasecmp(s, *e) == 0 : strcmp(s, *e) == 0)
			return true;
	}
	return false;
}

static int check_string(const Field *f, json_object *v, char **ret_fault)
{
	_cleanup_free_ char *expected = NULL;
	const char *s;
	size_t n = 0;

	if (!json_object_is_type(v, json_type_string))
		return type_fault(f, v, "a string", ret_fault);
	if (!f->enum_values)
		return 0;

	s = json_object_get_string(v);
	if (string_in_enum(f, s))
		return 0;

	while (f->enum_values[n])
		n++;
	if (n == 0)
		return fault(ret_fault, "unknown variant `%s`, there are no variants (field `%s`)",
			     s, f->name);
	expected = format_one_of(f->enum_values, n);
	if (!expected)
		return -ENOMEM;
	return fault(ret_fault, "unknown variant `%s`, expected %s (field `%s`)", s, expected,
		     f->name);
}

static int range_fault(const Field *f, const char *value, char **ret_fault)
{
	if (f->has_min && f->has_max)
		return fault(ret_fault,
			     "invalid value: `%s` = %s, expected a value between %" PRId64
			     " and %" PRId64,
			     f->name, value, f->min, f->max);
	if (f->has_min)
		return fault(ret_fault,
			     "invalid value: `%s` = %s, expected a value of at least %" PRId64,
			     f->name, value, f->min);
	return fault(ret_fault, "invalid value: `%s` = %s, expected a value of at most %" PRId64,
		     f->name, value, f->max);
}

static int check_integer(const Field *f, FieldType type, json_object *v, char **ret_fault)
{
	char value[32];
	int64_t i;
	uint64_t u;
	bool above_i64;

	/* A JSON 1.5 or 1.0 is a float to serde, refused for integer fields. */
	if (!json_object_is_type(v, json_type_int))
		return type_fault(f, v, type == FIELD_UINT ? "u64" : "i64", ret_fault);

	/* json-c keeps integers above INT64_MAX as uint64; get_int64 clamps them. */
	i = json_object_get_int64(v);
	u = json_object_get_uint64(v);
	above_i64 = i == INT64_MAX && u > (uint64_t)INT64_MAX;

	if (type == FIELD_UINT && i < 0)
		return fault(ret_fault,
			     "invalid value: integer `%" PRId64 "`, expected u64 (field `%s`)", i,
			     f->name);
	if (type == FIELD_INT && above_i64)
		return fault(ret_fault,
			     "invalid value: integer `%" PRIu64 "`, expected i64 (field `%s`)", u,
			     f->name);

	if ((f->has_min && !above_i64 && i < f->min) || (f->has_max && (above_i64 || i > f->max))) {
		if (above_i64)
			(void)snprintf(value, sizeof(value), "%" PRIu64, u);
		else
			(void)snprintf(value, sizeof(value), "%" PRId64, i);
		return range_fault(f, value, ret_fault);
	}
	return 0;
}

static int validate_object(const Schema *s, json_object *obj, char **ret_fault);

static int check_value(const Field *f, FieldType type, json_object *v, char **ret_fault)
{
	_cleanup_free_ char *expected = NULL;
	int r;

	switch (type) {
	case FIELD_STRING:
		return check_string(f, v, ret_fault);
	case FIELD_BOOL:
		if (!json_object_is_type(v, json_type_boolean))
			return type_fault(f, v, "a boolean", ret_fault);
		return 0;
	case FIELD_INT:
	case FIELD_UINT:
		return check_integer(f, type, v, ret_fault);
	case FIELD_OBJECT:
		if (!f->object)
			return -EINVAL;
		if (!json_object_is_type(v, json_type_object)) {
			if (asprintf(&expected, "struct %s", f->object->name) < 0)
				return -ENOMEM;
			return type_fault(f, v, expected, ret_fault);
		}
		return validate_object(f->object, v, ret_fault);
	case FIELD_ARRAY:
		/* Arrays of arrays appear nowhere in the swagger; refusing them here keeps
		 * item_type from recursing on itself. */
		if (f->item_type == FIELD_ARRAY)
			return -EINVAL;
		if (!json_object_is_type(v, json_type_array))
			return type_fault(f, v, "a sequence", ret_fault);
		for (size_t k = 0; k < json_object_array_length(v); k++) {
			r = check_value(f, f->item_type, json_object_array_get_idx(v, k),
					ret_fault);
			if (r < 0)
				return r;
		}
		return 0;
	case FIELD_ANY:
		return 0;
	}
	return -EINVAL;
}

static const Field *find_field(const Schema *s, const char *name)
{
	for (size_t i = 0; i < s->n_fields; i++)
		if (strcmp(s->fields[i].name, name) == 0)
			return &s->fields[i];
	return NULL;
}

static int unknown_field_fault(const Schema *s, const char *key, char **ret_fault)
{
	_cleanup_free_ const char **names = NULL;
	_cleanup_free_ char *expected = NULL;

	if (s->n_fields == 0)
		return fault(ret_fault, "unknown field `%s`, there are no fields", key);

	names = calloc(s->n_fields, sizeof(*names));
	if (!names)
		return -ENOMEM;
	for (size_t i = 0; i < s->n_fields; i++)
		names[i] = s->fields[i].name;
	expected = format_one_of(names, s->n_fields);
	if (!expected)
		return -ENOMEM;
	return fault(ret_fault, "unknown field `%s`, expected %s", key, expected);
}

/* serde's order: keys in document order (the first unknown or bad one wins), then missing
 * required fields once the whole object has been read. */
static int validate_object(const Schema *s, json_object *obj, char **ret_fault)
{
	int r;

	json_object_object_foreach(obj, key, val)
	{
		const Field *f = find_field(s, key);

		if (!f) {
			if (s->additional_properties)
				continue;
			return unknown_field_fault(s, key, ret_fault);
		}
		/* serde's Option<T> takes null as None: an optional field set to null is as
		 * good as absent. A required one must have a value. */
		if (!val && !f->required)
			continue;
		r = check_value(f, f->type, val, ret_fault);
		if (r < 0)
			return r;
	}

	for (size_t i = 0; i < s->n_fields; i++)
		if (s->fields[i].required &&
		    !json_object_object_get_ex(obj, s->fields[i].name, NULL))
			return fault(ret_fault, "missing field `%s`", s->fields[i].name);
	return 0;
}

int schema_validate(const Schema *s, json_object *body, char **ret_fault)
{
	_cleanup_free_ char *found = NULL;

	if (!s)
		return -EINVAL;

	if (!json_object_is_type(body, json_type_object)) {
		found = describe_value(body);
		if (!found)
			return -ENOMEM;
		if (s->additional_properties)
			return fault(ret_fault, "invalid type: %s, expected a map", found);
		return fault(ret_fault, "invalid type: %s, expected struct %s", found, s->name);
	}
	return validate_object(s, body, ret_fault);
}
