/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The proto3 JSON mapping over protobuf-c descriptors (pbjson.h says what it does and where it
 * is stricter than json_format).
 *
 * Messages are built the way protobuf_c_message_unpack() builds them, so that callers free
 * them with protobuf_c_message_free_unpacked(): strings, bytes, arrays and sub-messages
 * malloc'ed, an absent string left at its descriptor's default pointer, has_ flags and oneof
 * cases set. A half-built message is kept in that state at every step, so a failure anywhere
 * frees it whole.
 *
 * Which fields are present follows protobuf_c_message_pack() (what a gRPC client would
 * receive), with one exception: json_format (like protobuf C++) sends a proto3 double or float
 * that is -0.0, protobuf-c does not; the JSON says -0.0 as json_format does.
 */
#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>
#include <openssl/evp.h>

#include "common/error.h"
#include "common/log.h"
#include "common/macro.h"
#include "google/protobuf/duration.pb-c.h"
#include "google/protobuf/field_mask.pb-c.h"
#include "google/protobuf/timestamp.pb-c.h"
#include "pbjson.h"

/* json_format's max_recursion_depth. Applied when encoding too: protobuf-c's unpack has no
 * limit of its own, and the stack is the same. */
#define PBJSON_MAX_DEPTH 100
/* JSON nesting pbjson_parse() takes: PBJSON_MAX_DEPTH messages with a list or map at each. */
#define PBJSON_MAX_JSON_DEPTH (2 * PBJSON_MAX_DEPTH + 16)

#define NANOS_PER_SECOND      1000000000
/* The mapping's (and Python datetime's) range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z */
#define TIMESTAMP_SECONDS_MIN INT64_C(-62135596800)
#define TIMESTAMP_SECONDS_MAX INT64_C(253402300799)
/* ±10000 years, google/protobuf/duration.proto's range */
#define DURATION_SECONDS_MAX INT64_C(315576000000)

/* Where in the message a value is, for error messages: built on the stack as the walk goes
 * down, formatted only when something fails. */
typedef struct Path {
	const struct Path *up;
	const char *key; /* a field as the JSON names it, or a map key; NULL: a list index */
	size_t index;
	bool map_key;
} Path;

/* One decoded scalar, before it is stored. All members start at offset 0, so the first
 * value_size() bytes of the union are the value whatever its type. */
typedef union Scalar {
	int32_t i32;
	uint32_t u32;
	int64_t i64;
	uint64_t u64;
	float f;
	double d;
	protobuf_c_boolean b;
	char *s;
	ProtobufCBinaryData bytes;
} Scalar;

typedef enum Wkt {
	WKT_NONE,
	WKT_TIMESTAMP,
	WKT_DURATION,
	WKT_FIELD_MASK,
	WKT_UNSUPPORTED,
} Wkt;

/* ------------------------------------------------------------------------------------------ */
/* descriptors */

static char ascii_upper(char c)
{
	return c >= 'a' && c <= 'z' ? (char)(c - 'a' + 'A') : c;
}

/* protoc's ToJsonName(): every '_' dropped and the character after it upper-cased (ASCII). */
static char *json_name(const char *name)
{
	char *s = malloc(strlen(name) + 1), *p = s;
	bool up = false;

	if (!s)
		return NULL;
	for (; *name; name++) {
		if (*name == '_') {
			up = true;
			continue;
		}
		*p++ = up ? ascii_upper(*name) : *name;
		up = false;
	}
	*p = '\0';
	return s;
}

static bool json_name_is(const char *name, const char *key)
{
	bool up = false;

	for (; *name; name++) {
		if (*name == '_') {
			up = true;
			continue;
		}
		if (*key++ != (up ? ascii_upper(*name) : *name))
			return false;
		up = false;
	}
	return *key == '\0';
}

/* protoc's MapEntryName(): "label_selector" → "LabelSelectorEntry". */
static bool map_entry_name_is(const char *field, const char *entry)
{
	bool up = true;

	for (; *field; field++) {
		if (*field == '_') {
			up = true;
			continue;
		}
		if (*entry++ != (up ? ascii_upper(*field) : *field))
			return false;
		up = false;
	}
	return strcmp(entry, "Entry") == 0;
}

/*
 * protobuf-c keeps no message options, so `map<K, V> foo` is recognised by what protoc makes of
 * it: a repeated field of the nested message type FooEntry (protoc's MapEntryName) whose only
 * fields are key = 1 (an integer, bool or string) and value = 2. protoc refuses to declare a
 * nested FooEntry next to a map field foo, so this is wrong only for a message written by hand
 * to look like a map entry, with the matching name; no .proto of ember has one, and
 * test_pbjson.py checks every message the Node service reaches against the map_entry option.
 * The embedded descriptor set (agent/descriptor-set.h) would answer exactly, but only for the
 * files compiled into it and at a lookup per field, and it would tie this module to emberd.
 */
static bool field_is_map(const ProtobufCMessageDescriptor *parent,
			 const ProtobufCFieldDescriptor *f)
{
	const ProtobufCMessageDescriptor *e = f->descriptor;
	size_t n = strlen(parent->name);

	if (f->label != PROTOBUF_C_LABEL_REPEATED || f->type != PROTOBUF_C_TYPE_MESSAGE || !e ||
	    e->n_fields != 2)
		return false;
	if (e->fields[0].id != 1 || strcmp(e->fields[0].name, "key") != 0 ||
	    e->fields[0].label == PROTOBUF_C_LABEL_REPEATED || e->fields[1].id != 2 ||
	    strcmp(e->fields[1].name, "value") != 0 ||
	    e->fields[1].label == PROTOBUF_C_LABEL_REPEATED)
		return false;
	switch (e->fields[0].type) {
	case PROTOBUF_C_TYPE_FLOAT:
	case PROTOBUF_C_TYPE_DOUBLE:
	case PROTOBUF_C_TYPE_BYTES:
	case PROTOBUF_C_TYPE_ENUM:
	case PROTOBUF_C_TYPE_MESSAGE:
		return false;
	default:
		break;
	}
	return strncmp(e->name, parent->name, n) == 0 && e->name[n] == '.' &&
	       strcmp(e->name + n + 1, e->short_name) == 0 &&
	       map_entry_name_is(f->name, e->short_name);
}

/* The well-known types by name: another copy of their descriptors (a second program's
 * generated code) is the same type. The sizes guard the casts to the generated structs. */
static Wkt wkt_of(const ProtobufCMessageDescriptor *d)
{
	static const char *const unsupported[] = {
		"Any",        "Struct",      "Value",       "ListValue",  "DoubleValue",
		"FloatValue", "Int64Value",  "UInt64Value", "Int32Value", "UInt32Value",
		"BoolValue",  "StringValue", "BytesValue",
	};
	const char *name;

	if (strncmp(d->name, "google.protobuf.", 16) != 0)
		return WKT_NONE;
	name = d->name + 16;
	if (strcmp(name, "Timestamp") == 0)
		return d->sizeof_message == sizeof(Google__Protobuf__Timestamp) ? WKT_TIMESTAMP
										: WKT_UNSUPPORTED;
	if (strcmp(name, "Duration") == 0)
		return d->sizeof_message == sizeof(Google__Protobuf__Duration) ? WKT_DURATION
									       : WKT_UNSUPPORTED;
	if (strcmp(name, "FieldMask") == 0)
		return d->sizeof_message == sizeof(Google__Protobuf__FieldMask) ? WKT_FIELD_MASK
										: WKT_UNSUPPORTED;
	for (size_t i = 0; i < ELEMENTSOF(unsupported); i++)
		if (strcmp(name, unsupported[i]) == 0)
			return WKT_UNSUPPORTED;
	return WKT_NONE; /* Empty, descriptor.proto's messages: plain messages */
}

/* The in-memory size of one value (an array element, a oneof member). */
static size_t value_size(ProtobufCType type)
{
	switch (type) {
	case PROTOBUF_C_TYPE_INT32:
	case PROTOBUF_C_TYPE_SINT32:
	case PROTOBUF_C_TYPE_SFIXED32:
	case PROTOBUF_C_TYPE_ENUM: /* protobuf-c makes every enum int-sized */
		return sizeof(int32_t);
	case PROTOBUF_C_TYPE_UINT32:
	case PROTOBUF_C_TYPE_FIXED32:
		return sizeof(uint32_t);
	case PROTOBUF_C_TYPE_INT64:
	case PROTOBUF_C_TYPE_SINT64:
	case PROTOBUF_C_TYPE_SFIXED64:
		return sizeof(int64_t);
	case PROTOBUF_C_TYPE_UINT64:
	case PROTOBUF_C_TYPE_FIXED64:
		return sizeof(uint64_t);
	case PROTOBUF_C_TYPE_FLOAT:
		return sizeof(float);
	case PROTOBUF_C_TYPE_DOUBLE:
		return sizeof(double);
	case PROTOBUF_C_TYPE_BOOL:
		return sizeof(protobuf_c_boolean);
	case PROTOBUF_C_TYPE_STRING:
		return sizeof(char *);
	case PROTOBUF_C_TYPE_BYTES:
		return sizeof(ProtobufCBinaryData);
	case PROTOBUF_C_TYPE_MESSAGE:
		return sizeof(ProtobufCMessage *);
	}
	return 0;
}

/* Optional strings and messages are present by their pointer; other optional fields have a
 * has_ member (protobuf-c's layout). */
static bool has_flag(const ProtobufCFieldDescriptor *f)
{
	return f->label == PROTOBUF_C_LABEL_OPTIONAL && !(f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
	       f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE;
}

static void *member_of(const ProtobufCMessage *m, const ProtobufCFieldDescriptor *f)
{
	return (char *)m + f->offset;
}

static void *quantifier_of(const ProtobufCMessage *m, const ProtobufCFieldDescriptor *f)
{
	return (char *)m + f->quantifier_offset;
}

static ProtobufCMessage *message_new(const ProtobufCMessageDescriptor *d)
{
	ProtobufCMessage *m = malloc(d->sizeof_message);

	if (m)
		protobuf_c_message_init(d, m);
	return m;
}

/* ------------------------------------------------------------------------------------------ */
/* small codecs */

/* RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF. */
static bool utf8_valid(const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s, *end = p + n;

	while (p < end) {
		unsigned c = *p;
		size_t len;
		uint32_t cp, min;

		if (c < 0x80) {
			p++;
			continue;
		}
		if (c >= 0xc2 && c <= 0xdf) {
			len = 2;
			cp = c & 0x1f;
			min = 0x80;
		} else if ((c & 0xf0) == 0xe0) {
			len = 3;
			cp = c & 0x0f;
			min = 0x800;
		} else if (c >= 0xf0 && c <= 0xf4) {
			len = 4;
			cp = c & 0x07;
			min = 0x10000;
		} else {
			return false;
		}
		if ((size_t)(end - p) < len)
			return false;
		for (size_t i = 1; i < len; i++) {
			if ((p[i] & 0xc0) != 0x80)
				return false;
			cp = cp << 6 | (p[i] & 0x3f);
		}
		if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
			return false;
		p += len;
	}
	return true;
}

static int base64_value(char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+' || c == '-')
		return 62;
	if (c == '/' || c == '_')
		return 63;
	return -1;
}

/* Standard or URL-safe alphabet (mixed, as json_format takes it), '=' padding optional and
 * ignored, unused low bits ignored. OpenSSL's EVP_DecodeBlock() knows only the standard
 * alphabet with padding, and counts the padding into its length. */
static int base64_decode(const char *s, size_t n, ProtobufCBinaryData *ret)
{
	_cleanup_free_ uint8_t *out = NULL;
	uint32_t acc = 0;
	size_t len = 0;
	unsigned bits = 0;

	while (n > 0 && s[n - 1] == '=')
		n--;
	if (n % 4 == 1)
		return -EINVAL;
	if (n > 0) {
		out = malloc(n / 4 * 3 + 2);
		if (!out)
			return -ENOMEM;
	}
	for (size_t i = 0; i < n; i++) {
		int v = base64_value(s[i]);
		if (v < 0)
			return -EINVAL;
		acc = acc << 6 | (uint32_t)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			out[len++] = (uint8_t)(acc >> bits);
		}
	}
	*ret = (ProtobufCBinaryData){.len = len, .data = len > 0 ? TAKE_PTR(out) : NULL};
	return 0;
}

static bool is_digit(char c)
{
	return c >= '0' && c <= '9';
}

/* An integer in a string: [+-]?[0-9]+, as json_format's int() reads it, less the whitespace
 * and '_' Python also takes. -ERANGE beyond 64 bits. */
static int parse_integer(const char *s, bool *ret_neg, uint64_t *ret_mag)
{
	bool neg = *s == '-';
	uint64_t v = 0;

	if (*s == '-' || *s == '+')
		s++;
	if (!is_digit(*s))
		return -EINVAL;
	for (; is_digit(*s); s++) {
		unsigned d = (unsigned)(*s - '0');
		if (v > (UINT64_MAX - d) / 10)
			return -ERANGE;
		v = v * 10 + d;
	}
	if (*s != '\0')
		return -EINVAL;
	*ret_neg = neg && v != 0;
	*ret_mag = v;
	return 0;
}

/* A number in a string: JSON's syntax, also with a '+', no digits before or after the '.'. */
static bool decimal_syntax(const char *s)
{
	bool digits = false;

	if (*s == '-' || *s == '+')
		s++;
	for (; is_digit(*s); s++)
		digits = true;
	if (*s == '.')
		for (s++; is_digit(*s); s++)
			digits = true;
	if (!digits)
		return false;
	if (*s == 'e' || *s == 'E') {
		s++;
		if (*s == '-' || *s == '+')
			s++;
		if (!is_digit(*s))
			return false;
		while (is_digit(*s))
			s++;
	}
	return *s == '\0';
}

/* Howard Hinnant's days_from_civil() and civil_from_days(): the proleptic Gregorian calendar
 * without timegm(), whose range and time_t vary. */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d)
{
	y -= m <= 2;
	int64_t era = (y >= 0 ? y : y - 399) / 400;
	unsigned yoe = (unsigned)(y - era * 400);
	unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
	unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	return era * 146097 + (int64_t)doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *ret_y, unsigned *ret_m, unsigned *ret_d)
{
	z += 719468;
	int64_t era = (z >= 0 ? z : z - 146096) / 146097;
	unsigned doe = (unsigned)(z - era * 146097);
	unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
	unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
	unsigned mp = (5 * doy + 2) / 153;
	unsigned m = mp < 10 ? mp + 3 : mp - 9;

	*ret_d = doy - (153 * mp + 2) / 5 + 1;
	*ret_m = m;
	*ret_y = (int64_t)yoe + era * 400 + (m <= 2);
}

static unsigned days_in_month(int64_t y, unsigned m)
{
	static const unsigned days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
	bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;

	return m == 2 && leap ? 29 : days[m - 1];
}

/* json_format's rule: no fraction, or 3, 6 or 9 digits, the fewest that are exact. */
static void format_nanos(char *buf, size_t size, uint32_t nanos)
{
	if (nanos == 0)
		buf[0] = '\0';
	else if (nanos % 1000000 == 0)
		snprintf(buf, size, ".%03" PRIu32, nanos / 1000000);
	else if (nanos % 1000 == 0)
		snprintf(buf, size, ".%06" PRIu32, nanos / 1000);
	else
		snprintf(buf, size, ".%09" PRIu32, nanos);
}

static bool take_digits(const char **p, unsigned n, unsigned *ret)
{
	unsigned v = 0;

	for (unsigned i = 0; i < n; i++) {
		if (!is_digit((*p)[i]))
			return false;
		v = v * 10 + (unsigned)((*p)[i] - '0');
	}
	*p += n;
	*ret = v;
	return true;
}

static bool take_char(const char **p, char c)
{
	if (**p != c)
		return false;
	(*p)++;
	return true;
}

/* ".d{1,9}" → nanoseconds; nothing → 0. */
static bool take_fraction(const char **p, uint32_t *ret)
{
	uint32_t v = 0;
	unsigned n = 0;

	if (!take_char(p, '.')) {
		*ret = 0;
		return true;
	}
	for (; is_digit(**p); (*p)++, n++) {
		if (n == 9)
			return false;
		v = v * 10 + (uint32_t)(**p - '0');
	}
	if (n == 0)
		return false;
	for (; n < 9; n++)
		v *= 10;
	*ret = v;
	return true;
}

/* RFC 3339 as the mapping writes it, with any offset: YYYY-MM-DDTHH:MM:SS[.f](Z|±HH:MM). */
static int parse_timestamp(const char *s, int64_t *ret_seconds, int32_t *ret_nanos)
{
	unsigned y, mo, d, h, mi, sec, oh = 0, om = 0;
	uint32_t nanos;
	int sign = 0;

	if (!take_digits(&s, 4, &y) || !take_char(&s, '-') || !take_digits(&s, 2, &mo) ||
	    !take_char(&s, '-') || !take_digits(&s, 2, &d) || !take_char(&s, 'T') ||
	    !take_digits(&s, 2, &h) || !take_char(&s, ':') || !take_digits(&s, 2, &mi) ||
	    !take_char(&s, ':') || !take_digits(&s, 2, &sec) || !take_fraction(&s, &nanos))
		return -EINVAL;
	if (take_char(&s, '+'))
		sign = -1;
	else if (take_char(&s, '-'))
		sign = 1;
	else if (!take_char(&s, 'Z'))
		return -EINVAL;
	if (sign != 0 && (!take_digits(&s, 2, &oh) || !take_char(&s, ':') ||
			  !take_digits(&s, 2, &om) || oh > 23 || om > 59))
		return -EINVAL;
	if (*s != '\0')
		return -EINVAL;
	/* no leap seconds: json_format (datetime) has none either */
	if (y < 1 || mo < 1 || mo > 12 || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 ||
	    sec > 59)
		return -EINVAL;

	int64_t seconds = days_from_civil(y, mo, d) * 86400 + (int64_t)h * 3600 + (int64_t)mi * 60 +
			  sec + sign * (int64_t)(oh * 3600 + om * 60);
	if (seconds < TIMESTAMP_SECONDS_MIN || seconds > TIMESTAMP_SECONDS_MAX)
		return -ERANGE;
	*ret_seconds = seconds;
	*ret_nanos = (int32_t)nanos;
	return 0;
}

/* -?S[.f]s */
static int parse_duration(const char *s, int64_t *ret_seconds, int32_t *ret_nanos)
{
	bool neg = take_char(&s, '-');
	uint64_t v = 0;
	uint32_t nanos;

	if (!is_digit(*s))
		return -EINVAL;
	for (; is_digit(*s); s++) {
		v = v * 10 + (uint64_t)(*s - '0');
		if (v > (uint64_t)DURATION_SECONDS_MAX)
			return -ERANGE;
	}
	if (!take_fraction(&s, &nanos) || !take_char(&s, 's') || *s != '\0')
		return -EINVAL;
	*ret_seconds = neg ? -(int64_t)v : (int64_t)v;
	*ret_nanos = neg ? -(int32_t)nanos : (int32_t)nanos;
	return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* paths and errors */

static bool path_print(FILE *f, const Path *p)
{
	bool before;

	if (!p)
		return false;
	before = path_print(f, p->up);
	if (p->key && p->map_key)
		fprintf(f, "[\"%s\"]", p->key);
	else if (p->key)
		fprintf(f, "%s%s", before ? "." : "", p->key);
	else
		fprintf(f, "[%zu]", p->index);
	return true;
}

static char *path_format(const Path *p)
{
	char *s = NULL;
	size_t n;
	FILE *f = open_memstream(&s, &n);

	if (!f)
		return NULL;
	path_print(f, p);
	if (fclose(f) != 0) {
		free(s);
		return NULL;
	}
	return s;
}

/* Sets *ret_error to "<path>: <what>" (or "<what>" at the top). */
_printf_(3, 4) static void error_at(char **ret_error, const Path *path, const char *format, ...)
{
	_cleanup_free_ char *where = NULL, *what = NULL;
	va_list ap;
	int r;

	if (!ret_error)
		return;
	va_start(ap, format);
	r = vasprintf(&what, format, ap);
	va_end(ap);
	where = r >= 0 && path ? path_format(path) : NULL;
	if (r < 0 || (path && !where))
		*ret_error = NULL;
	else if (where)
		(void)error_set(ret_error, -EINVAL, "%s: %s", where, what);
	else
		(void)error_set(ret_error, -EINVAL, "%s", what);
}
/* A macro, so that the static analyzer sees the -EINVAL (it does not follow variadic calls). */
#define fail(ret_error, path, ...) (error_at(ret_error, path, __VA_ARGS__), -EINVAL)

/* Encoding failures are the program's (a handler filled a message JSON cannot say): the caller
 * gets -errno, the debug log the path. */
_printf_(3, 4) static int encode_fail(const Path *path, int r, const char *format, ...)
{
	_cleanup_free_ char *where = NULL, *what = NULL;
	va_list ap;
	int k;

	if (log_get_max_level() < LOG_DEBUG)
		return -r;
	where = path_format(path);
	va_start(ap, format);
	k = vasprintf(&what, format, ap);
	va_end(ap);
	if (k < 0)
		what = NULL;
	return log_debug_errno(r, "pbjson: cannot encode %s: %s",
			       where && *where ? where : "message", what ?: "");
}

/* ------------------------------------------------------------------------------------------ */
/* encoding */

static int message_to_json(const ProtobufCMessage *m, unsigned depth, const Path *path,
			   struct json_object **ret);

/* The shortest text that reads back as v, as Python's repr() gives. emberd never calls
 * setlocale(), so the decimal point is '.'. */
static struct json_object *double_to_json(double v)
{
	char buf[40];

	if (isnan(v))
		return json_object_new_string("NaN");
	if (isinf(v))
		return json_object_new_string(v > 0 ? "Infinity" : "-Infinity");
	if (v == 0)
		return json_object_new_double_s(v, signbit(v) ? "-0.0" : "0.0");
	for (int p = 1; p <= 17; p++) {
		snprintf(buf, sizeof(buf) - 2, "%.*g", p, v);
		if (strtod(buf, NULL) == v)
			break;
	}
	/* "1" → "1.0": a float field stays a float to readers that tell them apart */
	if (!strpbrk(buf, ".e"))
		memcpy(buf + strlen(buf), ".0", 3);
	return json_object_new_double_s(v, buf);
}

/* json_format's ToShortestFloat(): the fewest of 6 to 9 significant digits that read back as
 * the same float, printed as a double. */
static struct json_object *float_to_json(float v)
{
	char buf[40];

	if (isnan(v) || isinf(v))
		return double_to_json(v);
	for (int p = 6; p <= 9; p++) {
		snprintf(buf, sizeof(buf), "%.*g", p, (double)v);
		if ((float)strtod(buf, NULL) == v)
			break;
	}
	return double_to_json(strtod(buf, NULL));
}

static int bytes_to_json(const ProtobufCBinaryData *b, struct json_object **ret)
{
	_cleanup_free_ char *s = NULL;
	struct json_object *o;
	int n;

	if (b->len > (size_t)INT_MAX / 4 * 3 - 3)
		return -E2BIG;
	s = malloc(4 * ((b->len + 2) / 3) + 1);
	if (!s)
		return -ENOMEM;
	s[0] = '\0';
	n = b->len > 0 ? EVP_EncodeBlock((unsigned char *)s, b->data, (int)b->len) : 0;
	o = json_object_new_string_len(s, n);
	if (!o)
		return -ENOMEM;
	*ret = o;
	return 0;
}

static int timestamp_to_json(const Google__Protobuf__Timestamp *ts, const Path *path,
			     struct json_object **ret)
{
	char frac[16], buf[64];
	int64_t seconds, days, y;
	int32_t nanos = ts->nanos % NANOS_PER_SECOND;
	unsigned mo, d, sod;

	/* json_format folds nanos outside [0, 1e9) into the seconds, rounding down */
	if (nanos < 0)
		nanos += NANOS_PER_SECOND;
	if (__builtin_add_overflow(ts->seconds, ((int64_t)ts->nanos - nanos) / NANOS_PER_SECOND,
				   &seconds) ||
	    seconds < TIMESTAMP_SECONDS_MIN || seconds > TIMESTAMP_SECONDS_MAX)
		return encode_fail(path, EINVAL, "Timestamp outside years 1..9999");
	days = (seconds - TIMESTAMP_SECONDS_MIN) / 86400 + TIMESTAMP_SECONDS_MIN / 86400;
	sod = (unsigned)(seconds - days * 86400);
	civil_from_days(days, &y, &mo, &d);
	format_nanos(frac, sizeof(frac), (uint32_t)nanos);
	snprintf(buf, sizeof(buf), "%04" PRId64 "-%02u-%02uT%02u:%02u:%02u%sZ", y, mo, d,
		 sod / 3600, sod / 60 % 60, sod % 60, frac);
	*ret = json_object_new_string(buf);
	return *ret ? 0 : -ENOMEM;
}

static int duration_to_json(const Google__Protobuf__Duration *du, const Path *path,
			    struct json_object **ret)
{
	char frac[16], buf[64];
	bool neg = du->seconds < 0 || du->nanos < 0;

	/* json_format's _CheckDurationValid() */
	if (du->seconds < -DURATION_SECONDS_MAX || du->seconds > DURATION_SECONDS_MAX ||
	    du->nanos <= -NANOS_PER_SECOND || du->nanos >= NANOS_PER_SECOND ||
	    (du->nanos < 0 && du->seconds > 0) || (du->nanos > 0 && du->seconds < 0))
		return encode_fail(path, EINVAL, "invalid Duration");
	format_nanos(frac, sizeof(frac), (uint32_t)(neg ? -du->nanos : du->nanos));
	snprintf(buf, sizeof(buf), "%s%" PRId64 "%ss", neg ? "-" : "",
		 neg ? -du->seconds : du->seconds, frac);
	*ret = json_object_new_string(buf);
	return *ret ? 0 : -ENOMEM;
}

/* Paths joined by ',', each snake_case → lowerCamelCase; like json_format, refuses a path that
 * would not read back the same (an upper-case letter, '_' not before a lower-case one). */
static int field_mask_to_json(const Google__Protobuf__FieldMask *fm, const Path *path,
			      struct json_object **ret)
{
	_cleanup_free_ char *s = NULL;
	size_t size = 1, k = 0;

	for (size_t i = 0; i < fm->n_paths; i++) {
		if (!fm->paths[i])
			return encode_fail(path, EINVAL, "NULL FieldMask path");
		size += strlen(fm->paths[i]) + 1;
	}
	s = malloc(size);
	if (!s)
		return -ENOMEM;
	for (size_t i = 0; i < fm->n_paths; i++) {
		bool up = false;

		if (i > 0)
			s[k++] = ',';
		for (const char *c = fm->paths[i]; *c; c++) {
			if (*c >= 'A' && *c <= 'Z')
				return encode_fail(path, EINVAL, "FieldMask path with upper case");
			if (up && !(*c >= 'a' && *c <= 'z'))
				return encode_fail(path, EINVAL,
						   "FieldMask path with '_' before a non-letter");
			if (*c == '_' && !up) {
				up = true;
				continue;
			}
			s[k++] = up ? ascii_upper(*c) : *c;
			up = false;
		}
		if (up)
			return encode_fail(path, EINVAL, "FieldMask path ending in '_'");
	}
	s[k] = '\0';
	if (!utf8_valid(s, k))
		return encode_fail(path, EINVAL, "FieldMask path not UTF-8");
	*ret = json_object_new_string(s);
	return *ret ? 0 : -ENOMEM;
}

static int string_to_json(const char *s, const Path *path, struct json_object **ret)
{
	size_t n;

	if (!s)
		s = ""; /* protobuf_c_message_pack() sends NULL as "" */
	n = strlen(s);
	if (!utf8_valid(s, n))
		return encode_fail(path, EINVAL, "string not UTF-8");
	*ret = json_object_new_string_len(s, (int)n);
	return *ret ? 0 : -ENOMEM;
}

/* An absent message where a value is due (a map entry without its value) is the default
 * instance: json_format prints {} or, for a Timestamp, the epoch. */
static int default_to_json(const ProtobufCMessageDescriptor *d, unsigned depth, const Path *path,
			   struct json_object **ret)
{
	_cleanup_free_ ProtobufCMessage *m = message_new(d); /* only static defaults: free() */

	if (!m)
		return -ENOMEM;
	return message_to_json(m, depth, path, ret);
}

/* One value of field f stored at p (a singular member or an array element). */
static int value_to_json(const ProtobufCFieldDescriptor *f, const void *p, unsigned depth,
			 const Path *path, struct json_object **ret)
{
	char buf[32];
	struct json_object *o;

	switch (f->type) {
	case PROTOBUF_C_TYPE_INT32:
	case PROTOBUF_C_TYPE_SINT32:
	case PROTOBUF_C_TYPE_SFIXED32:
		o = json_object_new_int(*(const int32_t *)p);
		break;
	case PROTOBUF_C_TYPE_UINT32:
	case PROTOBUF_C_TYPE_FIXED32:
		o = json_object_new_int64(*(const uint32_t *)p);
		break;
	/* 64-bit integers are strings: most JSON readers hold numbers in doubles. */
	case PROTOBUF_C_TYPE_INT64:
	case PROTOBUF_C_TYPE_SINT64:
	case PROTOBUF_C_TYPE_SFIXED64:
		snprintf(buf, sizeof(buf), "%" PRId64, *(const int64_t *)p);
		o = json_object_new_string(buf);
		break;
	case PROTOBUF_C_TYPE_UINT64:
	case PROTOBUF_C_TYPE_FIXED64:
		snprintf(buf, sizeof(buf), "%" PRIu64, *(const uint64_t *)p);
		o = json_object_new_string(buf);
		break;
	case PROTOBUF_C_TYPE_FLOAT:
		o = float_to_json(*(const float *)p);
		break;
	case PROTOBUF_C_TYPE_DOUBLE:
		o = double_to_json(*(const double *)p);
		break;
	case PROTOBUF_C_TYPE_BOOL:
		o = json_object_new_boolean(*(const protobuf_c_boolean *)p != 0);
		break;
	case PROTOBUF_C_TYPE_ENUM: {
		int32_t v = *(const int32_t *)p;
		const ProtobufCEnumValue *ev =
			protobuf_c_enum_descriptor_get_value(f->descriptor, v);
		/* proto3 enums are open: a number the enum does not name stays a number */
		o = ev ? json_object_new_string(ev->name) : json_object_new_int(v);
		break;
	}
	case PROTOBUF_C_TYPE_STRING:
		return string_to_json(*(char *const *)p, path, ret);
	case PROTOBUF_C_TYPE_BYTES:
		return bytes_to_json(p, ret);
	case PROTOBUF_C_TYPE_MESSAGE: {
		const ProtobufCMessage *sub = *(ProtobufCMessage *const *)p;
		if (!sub)
			return default_to_json(f->descriptor, depth + 1, path, ret);
		return message_to_json(sub, depth + 1, path, ret);
	}
	default:
		return encode_fail(path, EINVAL, "unknown field type");
	}
	if (!o)
		return -ENOMEM;
	*ret = o;
	return 0;
}

static int list_to_json(const ProtobufCFieldDescriptor *f, const void *array, size_t n,
			unsigned depth, const Path *path, struct json_object **ret)
{
	_cleanup_(pbjson_json_putp) struct json_object *a = json_object_new_array_ext((int)n);
	size_t size = value_size(f->type);

	if (!a)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		const void *p = (const char *)array + i * size;
		Path here = {.up = path, .index = i};
		struct json_object *v = NULL;
		int r;

		/* protobuf_c_message_pack() would crash on these: a handler's bug */
		if ((f->type == PROTOBUF_C_TYPE_MESSAGE || f->type == PROTOBUF_C_TYPE_STRING) &&
		    !*(void *const *)p)
			return encode_fail(&here, EINVAL, "NULL element");
		r = value_to_json(f, p, depth, &here, &v);
		if (r < 0)
			return r;
		if (json_object_array_add(a, v) < 0) {
			json_object_put(v);
			return -ENOMEM;
		}
	}
	*ret = TAKE_PTR(a);
	return 0;
}

static int map_to_json(const ProtobufCFieldDescriptor *f, ProtobufCMessage *const *entries,
		       size_t n, unsigned depth, const Path *path, struct json_object **ret)
{
	const ProtobufCMessageDescriptor *e = f->descriptor;
	const ProtobufCFieldDescriptor *kf = &e->fields[0], *vf = &e->fields[1];
	_cleanup_(pbjson_json_putp) struct json_object *o = json_object_new_object();

	if (!o)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		const ProtobufCMessage *entry = entries[i];
		const void *k;
		const char *key;
		char buf[32];
		Path here = {.up = path, .index = i};
		struct json_object *v = NULL;
		int r;

		if (!entry)
			return encode_fail(&here, EINVAL, "NULL map entry");
		k = member_of(entry, kf);
		switch (kf->type) {
		case PROTOBUF_C_TYPE_STRING:
			key = *(char *const *)k ?: "";
			if (!utf8_valid(key, strlen(key)))
				return encode_fail(&here, EINVAL, "map key not UTF-8");
			break;
		case PROTOBUF_C_TYPE_BOOL:
			key = *(const protobuf_c_boolean *)k ? "true" : "false";
			break;
		case PROTOBUF_C_TYPE_INT32:
		case PROTOBUF_C_TYPE_SINT32:
		case PROTOBUF_C_TYPE_SFIXED32:
			snprintf(buf, sizeof(buf), "%" PRId32, *(const int32_t *)k);
			key = buf;
			break;
		case PROTOBUF_C_TYPE_UINT32:
		case PROTOBUF_C_TYPE_FIXED32:
			snprintf(buf, sizeof(buf), "%" PRIu32, *(const uint32_t *)k);
			key = buf;
			break;
		case PROTOBUF_C_TYPE_INT64:
		case PROTOBUF_C_TYPE_SINT64:
		case PROTOBUF_C_TYPE_SFIXED64:
			snprintf(buf, sizeof(buf), "%" PRId64, *(const int64_t *)k);
			key = buf;
			break;
		default:
			snprintf(buf, sizeof(buf), "%" PRIu64, *(const uint64_t *)k);
			key = buf;
			break;
		}
		here = (Path){.up = path, .key = key, .map_key = true};
		r = value_to_json(vf, member_of(entry, vf), depth, &here, &v);
		if (r < 0)
			return r;
		/* a key twice (the wire allows it): the last one wins, as in a map */
		if (json_object_object_add(o, key, v) < 0) {
			json_object_put(v);
			return -ENOMEM;
		}
	}
	*ret = TAKE_PTR(o);
	return 0;
}

/* What protobuf_c_message_pack() would send, but a proto3 -0.0 (see the top). */
static bool field_present(const ProtobufCMessage *m, const ProtobufCFieldDescriptor *f)
{
	const void *p = member_of(m, f), *q = quantifier_of(m, f);

	if (f->label == PROTOBUF_C_LABEL_REPEATED)
		return *(const size_t *)q > 0;
	if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
		if (*(const uint32_t *)q != f->id)
			return false;
		if (f->type == PROTOBUF_C_TYPE_STRING || f->type == PROTOBUF_C_TYPE_MESSAGE) {
			const void *ptr = *(const void *const *)p;
			return ptr && ptr != f->default_value;
		}
		return true;
	}
	if (f->label == PROTOBUF_C_LABEL_REQUIRED)
		return true;
	if (f->label == PROTOBUF_C_LABEL_OPTIONAL) {
		if (f->type == PROTOBUF_C_TYPE_STRING || f->type == PROTOBUF_C_TYPE_MESSAGE) {
			const void *ptr = *(const void *const *)p;
			return ptr && ptr != f->default_value;
		}
		return *(const protobuf_c_boolean *)q;
	}
	/* proto3 implicit presence: present when not the zero value */
	switch (f->type) {
	case PROTOBUF_C_TYPE_STRING: {
		const char *s = *(char *const *)p;
		return s && *s;
	}
	case PROTOBUF_C_TYPE_BYTES:
		return ((const ProtobufCBinaryData *)p)->len > 0;
	case PROTOBUF_C_TYPE_MESSAGE:
		return *(ProtobufCMessage *const *)p != NULL;
	case PROTOBUF_C_TYPE_FLOAT: {
		float v = *(const float *)p;
		return v != 0 || signbit(v);
	}
	case PROTOBUF_C_TYPE_DOUBLE: {
		double v = *(const double *)p;
		return v != 0 || signbit(v);
	}
	default: {
		uint64_t zero = 0;
		return memcmp(p, &zero, value_size(f->type)) != 0;
	}
	}
}

static int message_to_json(const ProtobufCMessage *m, unsigned depth, const Path *path,
			   struct json_object **ret)
{
	const ProtobufCMessageDescriptor *d = m->descriptor;
	_cleanup_(pbjson_json_putp) struct json_object *o = NULL;

	if (depth > PBJSON_MAX_DEPTH)
		return encode_fail(path, EINVAL, "messages nested too deep");
	switch (wkt_of(d)) {
	case WKT_TIMESTAMP:
		return timestamp_to_json((const Google__Protobuf__Timestamp *)m, path, ret);
	case WKT_DURATION:
		return duration_to_json((const Google__Protobuf__Duration *)m, path, ret);
	case WKT_FIELD_MASK:
		return field_mask_to_json((const Google__Protobuf__FieldMask *)m, path, ret);
	case WKT_UNSUPPORTED:
		return encode_fail(path, EOPNOTSUPP, "%s is not supported", d->name);
	case WKT_NONE:
		break;
	}

	o = json_object_new_object();
	if (!o)
		return -ENOMEM;
	for (unsigned i = 0; i < d->n_fields; i++) {
		const ProtobufCFieldDescriptor *f = &d->fields[i];
		_cleanup_free_ char *key = NULL;
		struct json_object *v = NULL;
		Path here;
		int r;

		if (!field_present(m, f))
			continue;
		key = json_name(f->name);
		if (!key)
			return -ENOMEM;
		here = (Path){.up = path, .key = key};
		if (f->label == PROTOBUF_C_LABEL_REPEATED) {
			size_t n = *(const size_t *)quantifier_of(m, f);
			void *array = *(void **)member_of(m, f);
			if (field_is_map(d, f))
				r = map_to_json(f, array, n, depth, &here, &v);
			else
				r = list_to_json(f, array, n, depth, &here, &v);
		} else {
			r = value_to_json(f, member_of(m, f), depth, &here, &v);
		}
		if (r < 0)
			return r;
		if (json_object_object_add(o, key, v) < 0) {
			json_object_put(v);
			return -ENOMEM;
		}
	}
	*ret = TAKE_PTR(o);
	return 0;
}

int pbjson_to_json(const ProtobufCMessage *msg, struct json_object **ret)
{
	return message_to_json(msg, 1, NULL, ret);
}

/* ------------------------------------------------------------------------------------------ */
/* decoding */

static int message_merge(ProtobufCMessage *m, struct json_object *j, const Path *path,
			 unsigned depth, char **ret_error);

static int message_new_from_json(const ProtobufCMessageDescriptor *d, struct json_object *j,
				 const Path *path, unsigned depth, char **ret_error,
				 ProtobufCMessage **ret)
{
	_cleanup_(pbjson_message_freep) ProtobufCMessage *m = message_new(d);
	int r;

	if (!m)
		return -ENOMEM;
	r = message_merge(m, j, path, depth, ret_error);
	if (r < 0)
		return r;
	*ret = TAKE_PTR(m);
	return 0;
}

/* Frees what one value holds (the caller puts something valid in its place). */
static void value_free(const ProtobufCFieldDescriptor *f, void *p)
{
	switch (f->type) {
	case PROTOBUF_C_TYPE_STRING: {
		char *s = *(char **)p;
		if (s != f->default_value)
			free(s);
		break;
	}
	case PROTOBUF_C_TYPE_BYTES: {
		const ProtobufCBinaryData *def = f->default_value;
		uint8_t *data = ((ProtobufCBinaryData *)p)->data;
		if (!def || data != def->data)
			free(data);
		break;
	}
	case PROTOBUF_C_TYPE_MESSAGE: {
		ProtobufCMessage *sub = *(ProtobufCMessage **)p;
		if (sub)
			protobuf_c_message_free_unpacked(sub, NULL);
		break;
	}
	default:
		break;
	}
}

/* Back to what protobuf_c_message_init() puts there: json_format's ClearField(). */
static void field_clear(ProtobufCMessage *m, const ProtobufCFieldDescriptor *f)
{
	void *p = member_of(m, f), *q = quantifier_of(m, f);
	size_t size = value_size(f->type);

	if (f->label == PROTOBUF_C_LABEL_REPEATED) {
		size_t *n = q;
		char *array = *(void **)p;
		for (size_t i = 0; i < *n; i++)
			value_free(f, array + i * size);
		free(array);
		*(void **)p = NULL;
		*n = 0;
		return;
	}
	if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
		/* the members share their memory: only the selected one owns it */
		if (*(uint32_t *)q != f->id)
			return;
		value_free(f, p);
		memset(p, 0, size);
		*(uint32_t *)q = 0;
		return;
	}
	value_free(f, p);
	if (f->type == PROTOBUF_C_TYPE_STRING)
		*(const void **)p = f->default_value;
	else if (f->type == PROTOBUF_C_TYPE_MESSAGE || !f->default_value)
		memset(p, 0, size);
	else
		memcpy(p, f->default_value, size);
	if (has_flag(f))
		*(protobuf_c_boolean *)q = 0;
}

/* Before f takes the oneof: the member that has it lets go. */
static void oneof_clear(ProtobufCMessage *m, const ProtobufCFieldDescriptor *f)
{
	const ProtobufCMessageDescriptor *d = m->descriptor;
	uint32_t selected = *(uint32_t *)quantifier_of(m, f);

	if (selected == 0 || selected == f->id)
		return;
	for (unsigned i = 0; i < d->n_fields; i++)
		if (d->fields[i].id == selected &&
		    d->fields[i].quantifier_offset == f->quantifier_offset) {
			field_clear(m, &d->fields[i]);
			return;
		}
}

/* An integer from a JSON number (integral, also as 1e3 or 1.0) or string, as sign and
 * magnitude. -EINVAL: not an integer; -ERANGE: beyond 64 bits. */
static int json_integer(struct json_object *v, bool *ret_neg, uint64_t *ret_mag)
{
	switch (json_object_get_type(v)) {
	case json_type_int: {
		int64_t i = json_object_get_int64(v);
		if (i == INT64_MAX) {
			*ret_neg = false; /* json-c's uint64 range shows as INT64_MAX here */
			*ret_mag = json_object_get_uint64(v);
		} else {
			*ret_neg = i < 0;
			*ret_mag = i < 0 ? -(uint64_t)i : (uint64_t)i;
		}
		return 0;
	}
	case json_type_double: {
		double d = json_object_get_double(v);
		if (!isfinite(d) || d != trunc(d))
			return -EINVAL;
		if (fabs(d) >= 18446744073709551616.0)
			return -ERANGE;
		*ret_neg = d < 0;
		*ret_mag = (uint64_t)fabs(d);
		return 0;
	}
	case json_type_string: {
		const char *s = json_object_get_string(v);
		if ((size_t)json_object_get_string_len(v) != strlen(s))
			return -EINVAL;
		return parse_integer(s, ret_neg, ret_mag);
	}
	default:
		return -EINVAL;
	}
}

/* Checks neg/mag against the field's integer type and stores it. */
static int integer_store(ProtobufCType type, bool neg, uint64_t mag, Scalar *ret)
{
	switch (type) {
	case PROTOBUF_C_TYPE_INT32:
	case PROTOBUF_C_TYPE_SINT32:
	case PROTOBUF_C_TYPE_SFIXED32:
	case PROTOBUF_C_TYPE_ENUM:
		if (mag > (neg ? (uint64_t)INT32_MAX + 1 : (uint64_t)INT32_MAX))
			return -ERANGE;
		ret->i32 = neg ? (int32_t)(-(int64_t)mag) : (int32_t)mag;
		return 0;
	case PROTOBUF_C_TYPE_UINT32:
	case PROTOBUF_C_TYPE_FIXED32:
		if (neg || mag > UINT32_MAX)
			return -ERANGE;
		ret->u32 = (uint32_t)mag;
		return 0;
	case PROTOBUF_C_TYPE_INT64:
	case PROTOBUF_C_TYPE_SINT64:
	case PROTOBUF_C_TYPE_SFIXED64:
		if (mag > (neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX))
			return -ERANGE;
		ret->i64 = neg ? (int64_t)(0 - mag) : (int64_t)mag;
		return 0;
	case PROTOBUF_C_TYPE_UINT64:
	case PROTOBUF_C_TYPE_FIXED64:
		if (neg)
			return -ERANGE;
		ret->u64 = mag;
		return 0;
	default:
		return -EINVAL;
	}
}

static const char *type_name(ProtobufCType type)
{
	switch (type) {
	case PROTOBUF_C_TYPE_INT32:
		return "int32";
	case PROTOBUF_C_TYPE_SINT32:
		return "sint32";
	case PROTOBUF_C_TYPE_SFIXED32:
		return "sfixed32";
	case PROTOBUF_C_TYPE_INT64:
		return "int64";
	case PROTOBUF_C_TYPE_SINT64:
		return "sint64";
	case PROTOBUF_C_TYPE_SFIXED64:
		return "sfixed64";
	case PROTOBUF_C_TYPE_UINT32:
		return "uint32";
	case PROTOBUF_C_TYPE_FIXED32:
		return "fixed32";
	case PROTOBUF_C_TYPE_UINT64:
		return "uint64";
	case PROTOBUF_C_TYPE_FIXED64:
		return "fixed64";
	case PROTOBUF_C_TYPE_ENUM:
		return "enum";
	default:
		return "integer";
	}
}

static int integer_from_json(const ProtobufCFieldDescriptor *f, struct json_object *v,
			     const Path *path, char **ret_error, Scalar *ret)
{
	bool neg;
	uint64_t mag;
	int r = json_integer(v, &neg, &mag);

	if (r == 0)
		r = integer_store(f->type, neg, mag, ret);
	if (r == -ERANGE)
		return fail(ret_error, path, "out of range for %s", type_name(f->type));
	if (r < 0)
		return fail(ret_error, path, "expected an integer");
	return 0;
}

static int enum_from_json(const ProtobufCFieldDescriptor *f, struct json_object *v,
			  const Path *path, char **ret_error, Scalar *ret)
{
	const ProtobufCEnumDescriptor *ed = f->descriptor;
	bool neg;
	uint64_t mag;
	int r;

	if (json_object_is_type(v, json_type_string)) {
		const ProtobufCEnumValue *ev =
			protobuf_c_enum_descriptor_get_value_by_name(ed, json_object_get_string(v));
		if (ev) {
			ret->i32 = ev->value;
			return 0;
		}
		r = json_integer(v, &neg, &mag);
		if (r == -EINVAL)
			return fail(ret_error, path, "\"%s\" is not a value of %s",
				    json_object_get_string(v), ed->name);
	} else if (json_object_is_type(v, json_type_int) ||
		   json_object_is_type(v, json_type_double)) {
		r = json_integer(v, &neg, &mag);
	} else {
		return fail(ret_error, path, "expected a value of %s (its name or number)",
			    ed->name);
	}
	if (r == 0)
		r = integer_store(PROTOBUF_C_TYPE_ENUM, neg, mag, ret);
	if (r == -ERANGE)
		return fail(ret_error, path, "out of range for an enum");
	if (r < 0)
		return fail(ret_error, path, "expected a value of %s (its name or number)",
			    ed->name);
	/* proto3 enums are open: a number it does not name is kept */
	return 0;
}

static int floating_from_json(const ProtobufCFieldDescriptor *f, struct json_object *v,
			      const Path *path, char **ret_error, Scalar *ret)
{
	bool is_float = f->type == PROTOBUF_C_TYPE_FLOAT;
	double d;

	switch (json_object_get_type(v)) {
	case json_type_double:
		d = json_object_get_double(v);
		if (isnan(d))
			return fail(ret_error, path, "NaN must be the string \"NaN\"");
		if (isinf(d))
			return fail(ret_error, path,
				    "out of range (infinities are \"Infinity\", \"-Infinity\")");
		break;
	case json_type_int: {
		bool neg;
		uint64_t mag;
		if (json_integer(v, &neg, &mag) < 0)
			return fail(ret_error, path, "expected a number");
		d = neg ? -(double)mag : (double)mag;
		break;
	}
	case json_type_string: {
		const char *s = json_object_get_string(v);
		if (strcmp(s, "NaN") == 0)
			d = NAN;
		else if (strcmp(s, "Infinity") == 0)
			d = INFINITY;
		else if (strcmp(s, "-Infinity") == 0)
			d = -INFINITY;
		else if ((size_t)json_object_get_string_len(v) == strlen(s) && decimal_syntax(s)) {
			d = strtod(s, NULL);
			if (isinf(d))
				return fail(ret_error, path, "out of range for %s",
					    is_float ? "float" : "double");
		} else {
			return fail(ret_error, path, "expected a number");
		}
		break;
	}
	default:
		return fail(ret_error, path, "expected a number");
	}
	if (is_float) {
		/* What rounds to a finite float is taken: FLT_MAX's shortest form, 3.4028235e38, is
		 * above it (json_format refuses its own output there). */
		if (isfinite(d) && fabs(d) >= 0x1.ffffffp+127)
			return fail(ret_error, path, "out of range for float");
		ret->f = (float)d;
	} else {
		ret->d = d;
	}
	return 0;
}

/* A JSON string's bytes, when they can be a protobuf string: UTF-8 and no NUL. */
static int json_string(struct json_object *v, const Path *path, char **ret_error, const char **ret,
		       size_t *ret_len)
{
	const char *s;
	size_t n;

	if (!json_object_is_type(v, json_type_string))
		return fail(ret_error, path, "expected a string");
	s = json_object_get_string(v);
	n = (size_t)json_object_get_string_len(v);
	if (memchr(s, '\0', n))
		return fail(ret_error, path, "strings cannot hold U+0000");
	if (!utf8_valid(s, n))
		return fail(ret_error, path, "not UTF-8");
	*ret = s;
	*ret_len = n;
	return 0;
}

static int scalar_from_json(const ProtobufCFieldDescriptor *f, struct json_object *v,
			    const Path *path, char **ret_error, Scalar *ret)
{
	const char *s;
	size_t n;
	int r;

	switch (f->type) {
	case PROTOBUF_C_TYPE_ENUM:
		return enum_from_json(f, v, path, ret_error, ret);
	case PROTOBUF_C_TYPE_FLOAT:
	case PROTOBUF_C_TYPE_DOUBLE:
		return floating_from_json(f, v, path, ret_error, ret);
	case PROTOBUF_C_TYPE_BOOL:
		if (!json_object_is_type(v, json_type_boolean))
			return fail(ret_error, path, "expected true or false");
		ret->b = json_object_get_boolean(v);
		return 0;
	case PROTOBUF_C_TYPE_STRING:
		r = json_string(v, path, ret_error, &s, &n);
		if (r < 0)
			return r;
		ret->s = strndup(s, n);
		return ret->s ? 0 : -ENOMEM;
	case PROTOBUF_C_TYPE_BYTES:
		if (!json_object_is_type(v, json_type_string))
			return fail(ret_error, path, "expected a base64 string");
		r = base64_decode(json_object_get_string(v), (size_t)json_object_get_string_len(v),
				  &ret->bytes);
		if (r == -EINVAL)
			return fail(ret_error, path, "not base64");
		return r;
	case PROTOBUF_C_TYPE_MESSAGE:
		return -EINVAL; /* not a scalar: the callers see to it */
	default:
		return integer_from_json(f, v, path, ret_error, ret);
	}
}

/* Map keys are JSON strings whatever their type: "true", "-12". */
static int map_key_from_string(const ProtobufCFieldDescriptor *kf, const char *key,
			       const Path *path, char **ret_error, Scalar *ret)
{
	bool neg;
	uint64_t mag;
	int r;

	switch (kf->type) {
	case PROTOBUF_C_TYPE_STRING:
		if (!utf8_valid(key, strlen(key)))
			return fail(ret_error, path, "key not UTF-8");
		ret->s = strdup(key);
		return ret->s ? 0 : -ENOMEM;
	case PROTOBUF_C_TYPE_BOOL:
		if (strcmp(key, "true") != 0 && strcmp(key, "false") != 0)
			return fail(ret_error, path, "key must be \"true\" or \"false\"");
		ret->b = key[0] == 't';
		return 0;
	default:
		r = parse_integer(key, &neg, &mag);
		if (r == 0)
			r = integer_store(kf->type, neg, mag, ret);
		if (r == -ERANGE)
			return fail(ret_error, path, "key out of range for %s",
				    type_name(kf->type));
		if (r < 0)
			return fail(ret_error, path, "key must be an integer");
		return 0;
	}
}

/* Sets a singular field (or a map entry's value) from a non-null JSON value. */
static int singular_from_json(ProtobufCMessage *m, const ProtobufCFieldDescriptor *f,
			      struct json_object *v, const Path *path, unsigned depth,
			      char **ret_error)
{
	void *p = member_of(m, f), *q = quantifier_of(m, f);
	bool oneof = f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF;
	Scalar s;
	int r;

	if (oneof)
		oneof_clear(m, f);
	if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
		ProtobufCMessage **sub = p;

		/* A message field given twice (as foo_bar and fooBar): json_format merges the
		 * second into the first. */
		if (*sub && (!oneof || *(uint32_t *)q == f->id))
			return message_merge(*sub, v, path, depth + 1, ret_error);
		r = message_new_from_json(f->descriptor, v, path, depth + 1, ret_error, sub);
		if (r < 0)
			return r;
		if (oneof)
			*(uint32_t *)q = f->id;
		return 0;
	}

	r = scalar_from_json(f, v, path, ret_error, &s);
	if (r < 0)
		return r;
	if (!oneof || *(uint32_t *)q == f->id)
		value_free(f, p);
	memcpy(p, &s, value_size(f->type));
	if (oneof)
		*(uint32_t *)q = f->id;
	else if (has_flag(f))
		*(protobuf_c_boolean *)q = 1;
	return 0;
}

static int list_from_json(ProtobufCMessage *m, const ProtobufCFieldDescriptor *f,
			  struct json_object *v, const Path *path, unsigned depth, char **ret_error)
{
	size_t size = value_size(f->type), n, *count = quantifier_of(m, f);
	char *array;

	if (!json_object_is_type(v, json_type_array))
		return fail(ret_error, path, "expected a list");
	field_clear(m, f); /* a list given twice (foo_bar, fooBar): the last one */
	n = json_object_array_length(v);
	if (n == 0)
		return 0;
	array = calloc(n, size);
	if (!array)
		return -ENOMEM;
	*(void **)member_of(m, f) = array; /* filled up to *count: m frees what is there */
	for (size_t i = 0; i < n; i++) {
		struct json_object *e = json_object_array_get_idx(v, i);
		Path here = {.up = path, .index = i};
		int r;

		if (!e)
			return fail(ret_error, &here, "null is not allowed in a list");
		if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
			r = message_new_from_json(f->descriptor, e, &here, depth + 1, ret_error,
						  (ProtobufCMessage **)(void *)(array + i * size));
		} else {
			Scalar s;
			r = scalar_from_json(f, e, &here, ret_error, &s);
			if (r >= 0)
				memcpy(array + i * size, &s, size);
		}
		if (r < 0)
			return r;
		(*count)++;
	}
	return 0;
}

typedef struct MapSlot {
	uint64_t key;
	size_t pos;
} MapSlot;

static int map_slot_compare(const void *a, const void *b)
{
	const MapSlot *x = a, *y = b;

	if (x->key != y->key)
		return x->key < y->key ? -1 : 1;
	return x->pos < y->pos ? -1 : x->pos > y->pos;
}

/* json-c has each string key once, but "1", "01" and "+1" are one integer key: json_format
 * keeps the last value; so does this (sorting, not a scan per key: a body may be large). */
static int map_dedup(ProtobufCMessage **entries, size_t *n, const ProtobufCFieldDescriptor *kf)
{
	_cleanup_free_ MapSlot *slots = NULL;
	size_t kept = 0;

	if (*n < 2)
		return 0;
	slots = calloc(*n, sizeof(MapSlot));
	if (!slots)
		return -ENOMEM;
	for (size_t i = 0; i < *n; i++) {
		const void *k = member_of(entries[i], kf);
		switch (value_size(kf->type)) {
		case sizeof(uint64_t):
			slots[i].key = *(const uint64_t *)k;
			break;
		default:
			slots[i].key = *(const uint32_t *)k; /* bool and 32-bit: one width */
			break;
		}
		slots[i].pos = i;
	}
	qsort(slots, *n, sizeof(MapSlot), map_slot_compare);
	for (size_t i = 0; i + 1 < *n; i++)
		if (slots[i].key == slots[i + 1].key) {
			protobuf_c_message_free_unpacked(entries[slots[i].pos], NULL);
			entries[slots[i].pos] = NULL;
		}
	for (size_t i = 0; i < *n; i++)
		if (entries[i])
			entries[kept++] = entries[i];
	*n = kept;
	return 0;
}

static int map_from_json(ProtobufCMessage *m, const ProtobufCFieldDescriptor *f,
			 struct json_object *v, const Path *path, unsigned depth, char **ret_error)
{
	const ProtobufCMessageDescriptor *e = f->descriptor;
	const ProtobufCFieldDescriptor *kf = &e->fields[0], *vf = &e->fields[1];
	size_t n, *count = quantifier_of(m, f);
	ProtobufCMessage **entries;

	if (!json_object_is_type(v, json_type_object))
		return fail(ret_error, path, "expected an object (a map)");
	field_clear(m, f);
	n = (size_t)json_object_object_length(v);
	if (n == 0)
		return 0;
	entries = calloc(n, sizeof(ProtobufCMessage *));
	if (!entries)
		return -ENOMEM;
	*(void **)member_of(m, f) = entries;
	json_object_object_foreach(v, key, value)
	{
		_cleanup_(pbjson_message_freep) ProtobufCMessage *entry = message_new(e);
		Path here = {.up = path, .key = key, .map_key = true};
		Scalar s;
		int r;

		if (!entry)
			return -ENOMEM;
		r = map_key_from_string(kf, key, &here, ret_error, &s);
		if (r < 0)
			return r;
		memcpy(member_of(entry, kf), &s, value_size(kf->type));
		if (has_flag(kf))
			*(protobuf_c_boolean *)quantifier_of(entry, kf) = 1;
		if (!value)
			return fail(ret_error, &here, "null is not allowed as a map value");
		r = singular_from_json(entry, vf, value, &here, depth, ret_error);
		if (r < 0)
			return r;
		entries[(*count)++] = TAKE_PTR(entry);
	}
	return kf->type == PROTOBUF_C_TYPE_STRING ? 0 : map_dedup(entries, count, kf);
}

const ProtobufCFieldDescriptor *pbjson_field_by_key(const ProtobufCMessageDescriptor *d,
						    const char *key)
{
	/* json_format looks at the JSON names first, then at the proto names */
	for (unsigned i = 0; i < d->n_fields; i++)
		if (json_name_is(d->fields[i].name, key))
			return &d->fields[i];
	return protobuf_c_message_descriptor_get_field_by_name(d, key);
}

static int timestamp_from_json(Google__Protobuf__Timestamp *ts, struct json_object *v,
			       const Path *path, char **ret_error)
{
	const char *s;
	size_t n;
	int r = json_string(v, path, ret_error, &s, &n);

	if (r < 0)
		return r;
	r = parse_timestamp(s, &ts->seconds, &ts->nanos);
	if (r == -ERANGE)
		return fail(ret_error, path, "timestamp \"%s\" outside years 1..9999", s);
	if (r < 0)
		return fail(ret_error, path,
			    "expected an RFC 3339 timestamp (2006-01-02T15:04:05.999Z), not \"%s\"",
			    s);
	return 0;
}

static int duration_from_json(Google__Protobuf__Duration *du, struct json_object *v,
			      const Path *path, char **ret_error)
{
	const char *s;
	size_t n;
	int r = json_string(v, path, ret_error, &s, &n);

	if (r < 0)
		return r;
	r = parse_duration(s, &du->seconds, &du->nanos);
	if (r == -ERANGE)
		return fail(ret_error, path, "duration \"%s\" beyond 10000 years", s);
	if (r < 0)
		return fail(ret_error, path,
			    "expected a duration in seconds (\"1.5s\"), not \"%s\"", s);
	return 0;
}

/* "fooBar.baz,qux" → ["foo_bar.baz", "qux"]; a '_' would not read back (json_format). */
static int field_mask_from_json(Google__Protobuf__FieldMask *fm, struct json_object *v,
				const Path *path, char **ret_error)
{
	const ProtobufCFieldDescriptor *f = &fm->base.descriptor->fields[0];
	const char *s;
	size_t n, count = 1;
	int r = json_string(v, path, ret_error, &s, &n);

	if (r < 0)
		return r;
	field_clear(&fm->base, f);
	if (n == 0)
		return 0;
	if (strchr(s, '_'))
		return fail(ret_error, path,
			    "FieldMask paths are lowerCamelCase, without '_': \"%s\"", s);
	for (const char *c = s; *c; c++)
		count += *c == ',';
	fm->paths = calloc(count, sizeof(char *));
	if (!fm->paths)
		return -ENOMEM;
	for (const char *c = s;; c++) {
		const char *end = strchrnul(c, ',');
		char *out = malloc(2 * (size_t)(end - c) + 1), *o = out;

		if (!out)
			return -ENOMEM;
		for (; c < end; c++) {
			if (*c >= 'A' && *c <= 'Z') {
				*o++ = '_';
				*o++ = (char)(*c - 'A' + 'a');
			} else {
				*o++ = *c;
			}
		}
		*o = '\0';
		fm->paths[fm->n_paths++] = out;
		if (*end == '\0')
			return 0;
	}
}

static int message_merge(ProtobufCMessage *m, struct json_object *j, const Path *path,
			 unsigned depth, char **ret_error)
{
	const ProtobufCMessageDescriptor *d = m->descriptor;
	_cleanup_free_ unsigned *oneofs = NULL;
	size_t n_oneofs = 0;

	if (depth > PBJSON_MAX_DEPTH)
		return fail(ret_error, path, "messages nested deeper than %d", PBJSON_MAX_DEPTH);
	switch (wkt_of(d)) {
	case WKT_TIMESTAMP:
		return timestamp_from_json((Google__Protobuf__Timestamp *)m, j, path, ret_error);
	case WKT_DURATION:
		return duration_from_json((Google__Protobuf__Duration *)m, j, path, ret_error);
	case WKT_FIELD_MASK:
		return field_mask_from_json((Google__Protobuf__FieldMask *)m, j, path, ret_error);
	case WKT_UNSUPPORTED:
		return fail(ret_error, path, "%s is not supported", d->name);
	case WKT_NONE:
		break;
	}
	if (!json_object_is_type(j, json_type_object))
		return fail(ret_error, path, "expected an object");

	json_object_object_foreach(j, key, value)
	{
		const ProtobufCFieldDescriptor *f = pbjson_field_by_key(d, key);
		Path here = {.up = path, .key = key};
		int r;

		if (!f)
			return fail(ret_error, &here, "no such field in %s", d->name);
		if ((f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) && value) {
			/* json_format refuses a second member of a oneof in one object, even the
			 * same member under its other name */
			for (size_t i = 0; i < n_oneofs; i++)
				if (oneofs[i] == f->quantifier_offset)
					return fail(ret_error, &here,
						    "another field of the same oneof is set");
			if (!oneofs) {
				oneofs = calloc(d->n_fields, sizeof(unsigned));
				if (!oneofs)
					return -ENOMEM;
			}
			oneofs[n_oneofs++] = f->quantifier_offset;
		}
		if (!value) {
			field_clear(m, f); /* null: the default */
			continue;
		}
		if (f->label == PROTOBUF_C_LABEL_REPEATED)
			r = field_is_map(d, f)
				    ? map_from_json(m, f, value, &here, depth, ret_error)
				    : list_from_json(m, f, value, &here, depth, ret_error);
		else
			r = singular_from_json(m, f, value, &here, depth, ret_error);
		if (r < 0)
			return r;
	}
	return 0;
}

int pbjson_from_json(const ProtobufCMessageDescriptor *desc, struct json_object *json,
		     ProtobufCMessage **ret, char **ret_error)
{
	return message_new_from_json(desc, json, NULL, 1, ret_error, ret);
}

/* ------------------------------------------------------------------------------------------ */
/* parsing */

_printf_(3, 4) static void lint_error(char **ret_error, size_t at, const char *format, ...)
{
	_cleanup_free_ char *what = NULL;
	va_list ap;
	int r;

	if (!ret_error)
		return;
	va_start(ap, format);
	r = vasprintf(&what, format, ap);
	va_end(ap);
	if (r < 0)
		*ret_error = NULL;
	else
		(void)error_set(ret_error, -EINVAL, "invalid JSON at byte %zu: %s", at, what);
}
#define lint_fail(ret_error, at, ...) (lint_error(ret_error, at, __VA_ARGS__), -EINVAL)

static int hex4(const char *s, size_t n, size_t i, unsigned *ret)
{
	unsigned v = 0;

	if (i + 4 > n)
		return -EINVAL;
	for (size_t k = i; k < i + 4; k++) {
		char c = s[k];
		v <<= 4;
		if (is_digit(c))
			v |= (unsigned)(c - '0');
		else if (c >= 'a' && c <= 'f')
			v |= (unsigned)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			v |= (unsigned)(c - 'A' + 10);
		else
			return -EINVAL;
	}
	*ret = v;
	return 0;
}

/* s[*i] is the opening quote. */
static int lint_string(const char *s, size_t n, size_t *i, char **ret_error)
{
	size_t k = *i + 1;

	while (k < n) {
		unsigned char c = (unsigned char)s[k];
		unsigned cp, low;

		if (c == '"') {
			*i = k + 1;
			return 0;
		}
		if (c < 0x20)
			return lint_fail(ret_error, k, "control character in a string");
		if (c != '\\') {
			k++;
			continue;
		}
		if (k + 1 < n && s[k + 1] != 'u') {
			k += 2;
			continue;
		}
		if (hex4(s, n, k + 2, &cp) < 0)
			return lint_fail(ret_error, k, "bad \\u escape");
		if (cp == 0)
			return lint_fail(ret_error, k, "\\u0000 in a string");
		if (cp >= 0xdc00 && cp <= 0xdfff)
			return lint_fail(ret_error, k, "unpaired surrogate");
		if (cp >= 0xd800 && cp <= 0xdbff) {
			if (k + 7 >= n || s[k + 6] != '\\' || s[k + 7] != 'u' ||
			    hex4(s, n, k + 8, &low) < 0 || low < 0xdc00 || low > 0xdfff)
				return lint_fail(ret_error, k, "unpaired surrogate");
			k += 6;
		}
		k += 6;
	}
	return lint_fail(ret_error, k, "unterminated string");
}

/* RFC 8259's number; json-c also takes "-01", "1." and "1.e5". An integer must fit 64 bits:
 * json-c clamps it silently. */
static int lint_number(const char *s, size_t n, size_t *i, char **ret_error)
{
	static const char max_neg[] = "9223372036854775808", max_pos[] = "18446744073709551615";
	size_t k = *i, start, len;
	bool neg = s[k] == '-', integral = true;

	if (neg) {
		k++;
		if (k < n && s[k] == 'I') { /* -Infinity */
			*i = k;
			return 0;
		}
	}
	start = k;
	if (k >= n || !is_digit(s[k]))
		return lint_fail(ret_error, k, "malformed number");
	if (s[k] == '0') {
		k++;
		if (k < n && is_digit(s[k]))
			return lint_fail(ret_error, k, "number with a leading zero");
	} else {
		while (k < n && is_digit(s[k]))
			k++;
	}
	len = k - start;
	if (k < n && s[k] == '.') {
		integral = false;
		k++;
		if (k >= n || !is_digit(s[k]))
			return lint_fail(ret_error, k, "malformed number");
		while (k < n && is_digit(s[k]))
			k++;
	}
	if (k < n && (s[k] == 'e' || s[k] == 'E')) {
		integral = false;
		k++;
		if (k < n && (s[k] == '+' || s[k] == '-'))
			k++;
		if (k >= n || !is_digit(s[k]))
			return lint_fail(ret_error, k, "malformed number");
		while (k < n && is_digit(s[k]))
			k++;
	}
	if (integral) {
		const char *max = neg ? max_neg : max_pos;
		size_t max_len = strlen(max);
		if (len > max_len || (len == max_len && memcmp(s + start, max, len) > 0))
			return lint_fail(ret_error, *i, "integer beyond 64 bits (use an exponent)");
	}
	*i = k;
	return 0;
}

/* Walks the text json-c accepted for what it lets through or misreads (see pbjson.h), and
 * counts each object's members, in document order, for lint_duplicates(). */
static int lint_text(const char *s, size_t n, size_t **ret_counts, size_t *ret_n_counts,
		     char **ret_error)
{
	_cleanup_free_ size_t *counts = NULL;
	size_t open[PBJSON_MAX_JSON_DEPTH + 1]; /* per open container: object's index + 1, or 0 */
	size_t n_counts = 0, cap = 0, depth = 0;

	for (size_t i = 0; i < n;) {
		bool object;
		int r = 0;

		switch (s[i]) {
		case '{':
		case '[':
			if (depth > PBJSON_MAX_JSON_DEPTH)
				return lint_fail(ret_error, i, "nested too deep");
			object = s[i] == '{';
			if (object && n_counts == cap) {
				size_t *c =
					reallocarray(counts, cap ? 2 * cap : 16, sizeof(size_t));
				if (!c)
					return -ENOMEM;
				counts = c;
				cap = cap ? 2 * cap : 16;
			}
			if (object)
				counts[n_counts++] = 0;
			open[depth++] = object ? n_counts : 0;
			i++;
			break;
		case '}':
		case ']':
			if (depth > 0)
				depth--;
			i++;
			break;
		case ':':
			if (depth > 0 && open[depth - 1] > 0)
				counts[open[depth - 1] - 1]++;
			i++;
			break;
		case '"':
			r = lint_string(s, n, &i, ret_error);
			break;
		case '\'':
			return lint_fail(ret_error, i, "strings are in double quotes");
		case '-':
		case '0' ... '9':
			r = lint_number(s, n, &i, ret_error);
			break;
		default:
			i++;
			break;
		}
		if (r < 0)
			return r;
	}
	*ret_counts = TAKE_PTR(counts);
	*ret_n_counts = n_counts;
	return 0;
}

/* json-c keeps the last of two equal keys (in the first one's place) and says nothing: an
 * object with fewer members than the text gave it had one. */
static int lint_duplicates(struct json_object *o, const size_t *counts, size_t n, size_t *i)
{
	switch (json_object_get_type(o)) {
	case json_type_object: {
		if (*i >= n || counts[*i] != (size_t)json_object_object_length(o))
			return -EINVAL;
		(*i)++;
		json_object_object_foreach(o, key, value)
		{
			(void)key;
			if (lint_duplicates(value, counts, n, i) < 0)
				return -EINVAL;
		}
		return 0;
	}
	case json_type_array:
		for (size_t k = 0; k < json_object_array_length(o); k++)
			if (lint_duplicates(json_object_array_get_idx(o, k), counts, n, i) < 0)
				return -EINVAL;
		return 0;
	default:
		return 0;
	}
}

static bool json_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static void json_tokener_freep(struct json_tokener **p)
{
	if (*p)
		json_tokener_free(*p);
}

int pbjson_parse(const char *text, size_t size, struct json_object **ret, size_t *ret_used,
		 char **ret_error)
{
	_cleanup_(json_tokener_freep) struct json_tokener *tok = NULL;
	_cleanup_(pbjson_json_putp) struct json_object *o = NULL;
	_cleanup_free_ size_t *counts = NULL;
	enum json_tokener_error e;
	size_t used, n_counts = 0, seen = 0;
	int r;

	if (size > INT_MAX)
		return error_set(ret_error, -EINVAL, "JSON text of %zu bytes is too large", size);
	if (memchr(text, '\0', size))
		return lint_fail(ret_error, (size_t)((const char *)memchr(text, '\0', size) - text),
				 "NUL byte");
	tok = json_tokener_new_ex(PBJSON_MAX_JSON_DEPTH);
	if (!tok)
		return -ENOMEM;
	/* trailing characters are checked here, to allow a stream of values */
	json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8 |
					    JSON_TOKENER_ALLOW_TRAILING_CHARS);
	o = json_tokener_parse_ex(tok, text, (int)size);
	e = json_tokener_get_error(tok);
	used = json_tokener_get_parse_end(tok);
	if (e == json_tokener_continue) {
		/* a number or literal at the very end waits for what follows: nothing */
		o = json_tokener_parse_ex(tok, "", 1);
		e = json_tokener_get_error(tok);
		used = size;
	}
	if (e != json_tokener_success)
		return lint_fail(ret_error, used, "%s", json_tokener_error_desc(e));
	if (!ret_used)
		for (size_t i = used; i < size; i++)
			if (!json_space(text[i]))
				return lint_fail(ret_error, i, "data after the value");

	r = lint_text(text, used, &counts, &n_counts, ret_error);
	if (r < 0)
		return r;
	if (lint_duplicates(o, counts, n_counts, &seen) < 0)
		return error_set(ret_error, -EINVAL, "invalid JSON: an object has a key twice");

	*ret = TAKE_PTR(o);
	if (ret_used)
		*ret_used = used;
	return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* strings as proto3 wants them */

static int check_utf8(const ProtobufCMessage *m, int depth, char *path, size_t size)
{
	const ProtobufCMessageDescriptor *d = m->descriptor;

	if (depth > PBJSON_MAX_DEPTH)
		return -EINVAL;
	for (unsigned i = 0; i < d->n_fields; i++) {
		const ProtobufCFieldDescriptor *f = &d->fields[i];
		const void *p = member_of(m, f);
		size_t n = 1;

		if (f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE)
			continue;
		if ((f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
		    *(const uint32_t *)quantifier_of(m, f) != f->id)
			continue;
		if (f->label == PROTOBUF_C_LABEL_REPEATED) {
			n = *(const size_t *)quantifier_of(m, f);
			p = *(const void *const *)p;
		}
		for (size_t k = 0; k < n; k++) {
			const void *v = ((const void *const *)p)[k];
			if (!v)
				continue;
			if (f->type == PROTOBUF_C_TYPE_STRING
				    ? !utf8_valid(v, strlen(v))
				    : check_utf8(v, depth + 1, path, size) < 0) {
				/* The innermost field is named; outer ones prepend theirs. */
				if (f->type == PROTOBUF_C_TYPE_STRING)
					snprintf(path, size, "%s", f->name);
				else if (strlen(path) + strlen(f->name) + 2 < size) {
					memmove(path + strlen(f->name) + 1, path, strlen(path) + 1);
					memcpy(path, f->name, strlen(f->name));
					path[strlen(f->name)] = '.';
				}
				return -EINVAL;
			}
		}
	}
	return 0;
}

int pbjson_check_utf8(const ProtobufCMessage *msg, char *ret_field, size_t size)
{
	if (size)
		ret_field[0] = 0;
	return check_utf8(msg, 0, ret_field, size);
}
