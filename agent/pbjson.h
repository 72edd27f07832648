/* SPDX-License-Identifier: Apache-2.0 */
#pragma once

/*
 * The proto3 JSON mapping for protobuf-c messages: one transcoder that walks the descriptors,
 * for every message type (the HTTP listener's JSON form of the Node API, DESIGN.md §9).
 *
 * The reference is Python's google.protobuf.json_format (python3-protobuf 3.21) with default
 * options; test/unit/test_pbjson.py holds this module to it. Output: lowerCamelCase names,
 * fields at their default omitted (a set oneof member or has_-flagged field is not), 64-bit
 * integers as strings, "NaN"/"Infinity"/"-Infinity", enums by name (unknown numbers as
 * numbers), bytes as padded standard base64, maps as objects, Timestamp/Duration/FieldMask in
 * their string forms. Input also takes the proto field names, integers as strings, enums by
 * number, URL-safe or unpadded base64, and null for "the default".
 *
 * Where json_format accepts more than the mapping's specification, this module refuses:
 *   - a message given as "" or [] (json_format reads them as {}), a top-level non-object;
 *   - `true` or 1.5 for an enum, `true` for a float or double;
 *   - integers and numbers in strings with whitespace, '_' or (floats) spellings other than
 *     JSON's and "NaN"/"Infinity"/"-Infinity";
 *   - a float (32-bit) out of its range, a double that overflows (json_format gives Infinity
 *     for "1e39" and for 1e39 written as an integer, an error for 1e39 written as a float);
 *   - an integer literal beyond 64 bits, even for a double (pbjson_parse(): json-c clamps);
 *   - base64 with characters outside both alphabets (json_format skips them), data after '=';
 *   - Timestamps other than YYYY-MM-DDTHH:MM:SS[.1 to 9 digits](Z|±HH:MM), or outside years
 *     1..9999 once the offset is applied; Durations other than -?S[.1 to 9 digits]s;
 *   - strings with U+0000 (protobuf-c's strings are C strings);
 *   - messages nested deeper than 100 when encoding too (json_format limits only decoding).
 * It takes one thing json_format refuses: a float above FLT_MAX that rounds to it, such as
 * 3.4028235e38, FLT_MAX's shortest form, which json_format prints and then cannot read back.
 * google.protobuf.Any, Struct, Value, ListValue and the wrapper types are refused both ways
 * (-EOPNOTSUPP when encoding): no .proto of ember uses them, and treating them as plain
 * messages would give well-formed but wrong JSON.
 */

#include <stddef.h>

#include <json-c/json.h>
#include <protobuf-c/protobuf-c.h>

/* Parses one JSON text as strictly as Python's json.loads() (RFC 8259, plus NaN, Infinity and
 * -Infinity, which every field refuses later), and also refuses what json-c would misread: an
 * integer outside the 64-bit range (json-c clamps it), a key twice in one object (json-c keeps
 * the last), an unpaired surrogate (json-c makes it U+FFFD) and \u0000. With ret_used NULL the
 * text must be one value with only whitespace around it; otherwise parsing stops after the
 * first value and *ret_used is the number of bytes it took (for a stream of values). *ret may be
 * NULL: the text was `null`. On -EINVAL *ret_error (malloc'ed; NULL if out of memory) says what
 * is wrong and where. */
int pbjson_parse(const char *text, size_t size, struct json_object **ret, size_t *ret_used,
		 char **ret_error);

/* Encodes msg. *ret is a new json_object (json_object_put() it). -EINVAL when msg holds what
 * JSON cannot say (a string that is not UTF-8, a Timestamp outside years 1..9999, an invalid
 * Duration, a FieldMask path without a lowerCamelCase form, a NULL element or messages nested
 * deeper than 100: logged at debug level with the field's path), -EOPNOTSUPP for the types
 * listed above, -ENOMEM. */
int pbjson_to_json(const ProtobufCMessage *msg, struct json_object **ret);

/* Decodes json (from pbjson_parse(), whose strictness it relies on for integers beyond 64 bits,
 * duplicate keys and surrogates; any json_object works otherwise) into a new message of type
 * desc, allocated as protobuf_c_message_unpack() allocates: free *ret with
 * protobuf_c_message_free_unpacked(*ret, NULL). On -EINVAL *ret_error (malloc'ed; NULL if out of
 * memory) names the field and the problem ("spec.vcpuCount: expected an integer"); *ret is
 * untouched. A field given under both its names is set by the last, a message field merged,
 * as json_format does. */
int pbjson_from_json(const ProtobufCMessageDescriptor *desc, struct json_object *json,
		     ProtobufCMessage **ret, char **ret_error);

/* The field a JSON key names: its lowerCamelCase JSON name first, then its proto name (as
 * json_format looks them up); NULL when none. */
const ProtobufCFieldDescriptor *pbjson_field_by_key(const ProtobufCMessageDescriptor *d,
						    const char *key);

/* proto3 strings are UTF-8, but protobuf-c's unpack does not check: a message that came in
 * over gRPC may hold one that JSON (and other clients) cannot carry. -EINVAL when a string
 * field, at any depth, is not valid UTF-8; ret_field gets its path ("spec.labels.value"). */
int pbjson_check_utf8(const ProtobufCMessage *msg, char *ret_field, size_t size);

static inline void pbjson_json_putp(struct json_object **p)
{
	json_object_put(*p);
}

static inline void pbjson_message_freep(ProtobufCMessage **p)
{
	if (*p)
		protobuf_c_message_free_unpacked(*p, NULL);
}
