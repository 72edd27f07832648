/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Request body schemas of Firecracker's API (firecracker-v1.16.1.yaml, the swagger file), as
 * data, and a validator that refuses what Firecracker refuses: unknown fields (serde
 * deny_unknown_fields), missing required fields, wrong types, values outside an enum or a
 * range. Fault messages follow serde's wording, as Firecracker's do.
 */
#pragma once

#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum FieldType {
	FIELD_STRING,
	FIELD_BOOL,
	FIELD_INT,    /* JSON integer (int64 range), checked against min/max when set */
	FIELD_UINT,   /* non-negative JSON integer */
	FIELD_OBJECT, /* validated against `object` */
	FIELD_ARRAY,  /* items of `item_type` (objects: validated against `object`) */
	FIELD_ANY,    /* any JSON value (MMDS contents) */
} FieldType;

typedef struct Schema Schema;

/* Ordered for packing (clang-tidy's padding check); initialize by field name. */
typedef struct Field {
	const char *name;
	const char *const *enum_values; /* NULL-terminated, strings only */
	int64_t min, max;
	const Schema *object; /* FIELD_OBJECT, or FIELD_ARRAY of objects */
	FieldType type;
	FieldType item_type; /* FIELD_ARRAY */
	bool required;
	bool has_min, has_max;
} Field;

struct Schema {
	const char *name; /* the swagger definition's name */
	const Field *fields;
	size_t n_fields;
	bool additional_properties; /* MmdsContentsObject: anything goes */
};

/* 0 when `body` conforms; otherwise -EINVAL and *ret_fault (malloc'ed) says why, e.g.
 * "An error occurred when deserializing the json body of a request: unknown field `foo`,
 * expected one of `drive_id`, `is_root_device`, ...". */
int schema_validate(const Schema *s, json_object *body, char **ret_fault);

/* Every definition used as a request body. */
extern const Schema schema_balloon, schema_balloon_update, schema_balloon_stats_update,
	schema_balloon_start_cmd, schema_boot_source, schema_cpu_config, schema_drive,
	schema_partial_drive, schema_pmem, schema_partial_pmem, schema_logger,
	schema_machine_config, schema_metrics, schema_mmds_config, schema_mmds_contents,
	schema_entropy, schema_serial, schema_memory_hotplug_config,
	schema_memory_hotplug_size_update, schema_network_interface,
	schema_partial_network_interface, schema_snapshot_create, schema_snapshot_load, schema_vm,
	schema_instance_action, schema_vsock;
