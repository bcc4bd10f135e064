/*
 * json_read.c — a message from proto3 JSON text, parsed straight into the message: the
 * engine of Flowctl::Native.json_decode (json_class.c binds it).
 *
 * It reads the plain, well-formed text that printers write and gives up (JSON_FALLBACK)
 * on anything else, for lib/flowctl/json/decoder.rb to read or to name as an error: an
 * unknown field or enum name, a field or map key given twice, two members of a oneof,
 * null in a list or map, \u escapes other than those of ASCII characters, a key with an
 * escape, an integer as "-0", in exponent form or in a string of another form than
 * digits, a double as an integer of more than 15 digits or as a string other than
 * "NaN"/"Infinity"/"-Infinity", base64 that is URL-safe or unpadded, a timestamp that is
 * not RFC 3339 or not a date, invalid UTF-8, a well-known type with a form of its own,
 * nesting past 64 objects and arrays (the Ruby decoder's limit is 100), and any text
 * that is not JSON. What it accepts, it reads to the message the Ruby decoder reads
 * (spec/message_json_v1_spec.rb and fuzz/json_target.c compare both). Values are built
 * as the fields' setters convert them (frozen strings, enum names as Symbols, floats
 * rounded) and stored as they are (flowctl_msg_put): the message holds what it would
 * hold after msg[name] = value.
 */
#include "flowctl.h"
#include <float.h>
#include <math.h>
#include <stdlib.h>

#define MAX_DEPTH 64
#define MAX_FIELDS 256   /* fields of one message this reader tracks */
#define NUMBER_MAX 40    /* longest number token it converts */
#define NAME_MAX_LEN 256 /* longest enum name it looks up */
#define TIMESTAMP_MIN (-62135596800LL)
#define TIMESTAMP_MAX (253402300799LL)

typedef struct {
    const char *p, *end;
    int depth;
    const flowctl_class *missing;
} reader;

#define TRY(expr) do { flowctl_json_result r_ = (expr); if (r_ != JSON_OK) return r_; } while (0)

static flowctl_json_result read_message(reader *r, const flowctl_class *ci, VALUE *out);

/* ---- tokens ------------------------------------------------------------------- */

static void
ws(reader *r)
{
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\n' || *r->p == '\r' || *r->p == '\t')) r->p++;
}

static bool
eat(reader *r, char c)
{
    ws(r);
    if (r->p < r->end && *r->p == c) {
        r->p++;
        return true;
    }
    return false;
}

static bool
peek(reader *r, char c)
{
    ws(r);
    return r->p < r->end && *r->p == c;
}

static bool
word(reader *r, const char *w, size_t n)
{
    ws(r);
    if ((size_t)(r->end - r->p) < n || memcmp(r->p, w, n) != 0) return false;
    r->p += n;
    return true;
}

/* A string without escapes: its bytes in the text (keys, enum names, base64, timestamps). */
static bool
raw_string(reader *r, const char **s, size_t *n)
{
    if (!eat(r, '"')) return false;
    const char *start = r->p;
    while (r->p < r->end && *r->p != '"') {
        unsigned char c = (unsigned char)*r->p;
        if (c < 0x20 || c == '\\') return false;
        r->p++;
    }
    if (r->p >= r->end) return false;
    *s = start;
    *n = (size_t)(r->p - start);
    r->p++;
    return true;
}

static bool
utf8_valid(VALUE str)
{
    return rb_enc_str_coderange(str) != ENC_CODERANGE_BROKEN;
}

static char
simple_escape(char c)
{
    switch (c) {
    case '"': return '"';
    case '\\': return '\\';
    case '/': return '/';
    case 'b': return '\b';
    case 'f': return '\f';
    case 'n': return '\n';
    case 'r': return '\r';
    case 't': return '\t';
    default: return 0;
    }
}

static int
hex_digit(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* \u00XX of an ASCII character (what printers write for controls); -1 otherwise. */
static int
ascii_escape(const char *p, const char *end)
{
    if (end - p < 6 || p[1] != 'u' || p[2] != '0' || p[3] != '0') return -1;
    int hi = hex_digit(p[4]), lo = hex_digit(p[5]);
    if (hi < 0 || lo < 0 || hi > 7) return -1;
    return hi * 16 + lo;
}

/* A frozen UTF-8 String of n bytes at s, its coderange known when it is all ASCII (so
 * that the setter need not scan it again); Qnil when it is not valid UTF-8. */
static VALUE
utf8_string(const char *s, size_t n, bool ascii)
{
    VALUE str = rb_utf8_str_new(s, (long)n);
    if (ascii) ENC_CODERANGE_SET(str, ENC_CODERANGE_7BIT);
    else if (!utf8_valid(str)) return Qnil;
    return rb_obj_freeze(str);
}

/* The rest of a string with escapes (the escapes of one character; other \u escapes are
 * the Ruby decoder's), from the first backslash at r->p. */
static flowctl_json_result
escaped_string(reader *r, const char *start, VALUE *out)
{
    VALUE str = rb_utf8_str_new(start, r->p - start);
    const char *run = r->p;
    for (;;) {
        if (r->p >= r->end) return JSON_FALLBACK;
        unsigned char c = (unsigned char)*r->p;
        if (c == '"') break;
        if (c < 0x20) return JSON_FALLBACK;
        if (c != '\\') { r->p++; continue; }
        rb_str_cat(str, run, r->p - run);
        int e = r->p + 1 < r->end ? simple_escape(r->p[1]) : 0, len = 2;
        if (!e) {
            e = ascii_escape(r->p, r->end);
            len = 6;
        }
        if (e < 0) return JSON_FALLBACK;
        char c1 = (char)e;
        rb_str_cat(str, &c1, 1);
        r->p += len;
        run = r->p;
    }
    rb_str_cat(str, run, r->p - run);
    r->p++;
    if (!utf8_valid(str)) return JSON_FALLBACK;
    *out = rb_obj_freeze(str);
    return JSON_OK;
}

/* A string value as a frozen UTF-8 String. */
static flowctl_json_result
string_value(reader *r, VALUE *out)
{
    if (!eat(r, '"')) return JSON_FALLBACK;
    const char *start = r->p;
    unsigned char high = 0;
    while (r->p < r->end) {
        unsigned char c = (unsigned char)*r->p;
        if (c == '"' || c == '\\' || c < 0x20) break;
        high |= c;
        r->p++;
    }
    if (r->p >= r->end || (unsigned char)*r->p < 0x20) return JSON_FALLBACK;
    if (*r->p == '\\') return escaped_string(r, start, out);
    *out = utf8_string(start, (size_t)(r->p - start), high < 0x80);
    r->p++;
    return NIL_P(*out) ? JSON_FALLBACK : JSON_OK;
}

/* A JSON number token: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?; *integral when it
 * has neither fraction nor exponent. */
static bool
number_token(reader *r, const char **s, size_t *n, bool *integral)
{
    ws(r);
    const char *p = r->p, *start = p, *end = r->end;
    if (p < end && *p == '-') p++;
    if (p >= end || *p < '0' || *p > '9') return false;
    if (*p == '0') p++;
    else while (p < end && *p >= '0' && *p <= '9') p++;
    *integral = true;
    if (p < end && *p == '.') {
        *integral = false;
        if (++p >= end || *p < '0' || *p > '9') return false;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        *integral = false;
        if (++p < end && (*p == '+' || *p == '-')) p++;
        if (p >= end || *p < '0' || *p > '9') return false;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    *s = start;
    *n = (size_t)(p - start);
    r->p = p;
    return true;
}

/* -?(0|[1-9][0-9]*) with at most 20 digits, as sign and magnitude; false otherwise and for "-0". */
static bool
integer_digits(const char *s, size_t n, bool *neg, uint64_t *mag)
{
    *neg = n > 0 && s[0] == '-';
    if (*neg) { s++; n--; }
    if (n == 0 || n > 20 || (s[0] == '0' && n > 1)) return false;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return false;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10) return false;
        v = v * 10 + d;
    }
    if (*neg && v == 0) return false;
    *mag = v;
    return true;
}

/* ---- scalars -------------------------------------------------------------------- */

static bool
in_range(int type, bool neg, uint64_t mag)
{
    switch (type) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32: case PROTOBUF_C_TYPE_SFIXED32: case PROTOBUF_C_TYPE_ENUM:
        return neg ? mag <= (uint64_t)INT32_MAX + 1 : mag <= INT32_MAX;
    case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_FIXED32: return !neg && mag <= UINT32_MAX;
    case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64: return !neg;
    default: return neg ? mag <= (uint64_t)INT64_MAX + 1 : mag <= INT64_MAX;
    }
}

static VALUE
int_value(bool neg, uint64_t mag)
{
    if (!neg) return ULL2NUM(mag);
    return mag == (uint64_t)INT64_MAX + 1 ? LL2NUM(INT64_MIN) : LL2NUM(-(int64_t)mag);
}

/* An integer field's value: a number without fraction or exponent, or a string of digits. */
static flowctl_json_result
integer_value(reader *r, int type, VALUE *out)
{
    const char *s;
    size_t n;
    bool integral = true, neg;
    uint64_t mag;
    if (peek(r, '"')) {
        if (!raw_string(r, &s, &n)) return JSON_FALLBACK;
    } else if (!number_token(r, &s, &n, &integral) || !integral) {
        return JSON_FALLBACK;
    }
    if (!integer_digits(s, n, &neg, &mag) || !in_range(type, neg, mag)) return JSON_FALLBACK;
    *out = int_value(neg, mag);
    return JSON_OK;
}

static flowctl_json_result
double_value(reader *r, int type, VALUE *out)
{
    const char *s;
    size_t n;
    bool integral;
    if (peek(r, '"')) {
        if (!raw_string(r, &s, &n)) return JSON_FALLBACK;
        if (n == 3 && memcmp(s, "NaN", 3) == 0) *out = DBL2NUM(NAN);
        else if (n == 8 && memcmp(s, "Infinity", 8) == 0) *out = DBL2NUM(INFINITY);
        else if (n == 9 && memcmp(s, "-Infinity", 9) == 0) *out = DBL2NUM(-INFINITY);
        else return JSON_FALLBACK;
        return JSON_OK;
    }
    if (!number_token(r, &s, &n, &integral) || n >= NUMBER_MAX) return JSON_FALLBACK;
    if (integral && n - (s[0] == '-') > 15) return JSON_FALLBACK; /* Integer#to_f of a long one: Ruby's */
    char buf[NUMBER_MAX];
    memcpy(buf, s, n);
    buf[n] = '\0';
    double d = strtod(buf, NULL);
    double float_limit = ldexp(1.0, 128) - ldexp(1.0, 103);
    if (isinf(d) || (type == PROTOBUF_C_TYPE_FLOAT && fabs(d) >= float_limit)) return JSON_FALLBACK;
    *out = DBL2NUM(type == PROTOBUF_C_TYPE_FLOAT ? (double)(float)d : d);
    return JSON_OK;
}

static flowctl_json_result
enum_value(reader *r, const ProtobufCEnumDescriptor *ed, VALUE *out)
{
    if (!peek(r, '"')) {
        TRY(integer_value(r, PROTOBUF_C_TYPE_ENUM, out));
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(ed, FIX2INT(*out));
        if (ev) *out = ID2SYM(rb_intern(ev->name)); /* a known number reads as its name (proto3 enums are open) */
        return JSON_OK;
    }
    const char *s;
    size_t n;
    char name[NAME_MAX_LEN];
    if (!raw_string(r, &s, &n) || n >= sizeof(name)) return JSON_FALLBACK;
    memcpy(name, s, n);
    name[n] = '\0';
    const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value_by_name(ed, name);
    if (!ev || strlen(name) != n) return JSON_FALLBACK;
    *out = ID2SYM(rb_intern2(name, (long)n));
    return JSON_OK;
}

static int
b64_digit(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Standard base64 with its padding; anything else is the Ruby decoder's. */
static flowctl_json_result
bytes_value(reader *r, VALUE *out)
{
    const char *s;
    size_t n;
    if (!raw_string(r, &s, &n) || n % 4 != 0) return JSON_FALLBACK;
    size_t pad = n && s[n - 1] == '=' ? (n > 1 && s[n - 2] == '=' ? 2 : 1) : 0;
    VALUE str = rb_str_buf_new((long)(n / 4 * 3));
    char *d = RSTRING_PTR(str);
    size_t len = 0;
    for (size_t i = 0; i < n; i += 4) {
        uint32_t v = 0;
        size_t digits = i + 4 == n ? 4 - pad : 4;
        for (size_t j = 0; j < 4; j++) {
            int x = j < digits ? b64_digit((unsigned char)s[i + j]) : 0;
            if (x < 0) return JSON_FALLBACK;
            v = (v << 6) | (uint32_t)x;
        }
        d[len++] = (char)(v >> 16);
        if (digits > 2) d[len++] = (char)(v >> 8);
        if (digits > 3) d[len++] = (char)v;
    }
    rb_str_set_len(str, (long)len);
    *out = rb_obj_freeze(str);
    return JSON_OK;
}

static bool
digits_at(const char *s, size_t n, size_t pos, size_t len, int *out)
{
    if (pos + len > n) return false;
    int v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[pos + i] < '0' || s[pos + i] > '9') return false;
        v = v * 10 + (s[pos + i] - '0');
    }
    *out = v;
    return true;
}

static int64_t
days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static bool
valid_date(int y, int mo, int d, int h, int mi, int s)
{
    static const int days[] = {0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (y < 1 || mo < 1 || mo > 12 || h > 23 || mi > 59 || s > 59 || d < 1) return false;
    bool leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    return d <= (mo == 2 && leap ? 29 : days[mo]);
}

/* RFC 3339 (1972-01-01T10:00:20.021Z, any offset) -> seconds and nanoseconds. */
static bool
parse_rfc3339(const char *s, size_t n, int64_t *sec, long *nsec)
{
    int y, mo, d, h, mi, se;
    if (!digits_at(s, n, 0, 4, &y) || !digits_at(s, n, 5, 2, &mo) || !digits_at(s, n, 8, 2, &d) ||
        !digits_at(s, n, 11, 2, &h) || !digits_at(s, n, 14, 2, &mi) || !digits_at(s, n, 17, 2, &se))
        return false;
    if (s[4] != '-' || s[7] != '-' || s[10] != 'T' || s[13] != ':' || s[16] != ':') return false;
    if (!valid_date(y, mo, d, h, mi, se)) return false;
    size_t pos = 19;
    long ns = 0, scale = 100000000;
    if (pos < n && s[pos] == '.') {
        size_t first = ++pos;
        while (pos < n && s[pos] >= '0' && s[pos] <= '9' && pos - first < 9) {
            ns += (s[pos] - '0') * scale;
            scale /= 10;
            pos++;
        }
        if (pos == first) return false;
    }
    int64_t offset = 0;
    if (pos + 1 == n && s[pos] == 'Z') {
        pos++;
    } else if (pos + 6 == n && (s[pos] == '+' || s[pos] == '-') && s[pos + 3] == ':') {
        int oh, om;
        if (!digits_at(s, n, pos + 1, 2, &oh) || !digits_at(s, n, pos + 4, 2, &om) || oh > 23 || om > 59) return false;
        offset = (oh * 3600 + om * 60) * (s[pos] == '-' ? -1 : 1);
        pos = n;
    } else {
        return false;
    }
    *sec = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset;
    *nsec = ns;
    return *sec >= TIMESTAMP_MIN && *sec <= TIMESTAMP_MAX;
}

static flowctl_json_result
timestamp_value(reader *r, VALUE *out)
{
    const char *s;
    size_t n;
    int64_t sec;
    long nsec;
    if (!raw_string(r, &s, &n) || !parse_rfc3339(s, n, &sec, &nsec)) return JSON_FALLBACK;
    *out = rb_time_nano_new((time_t)sec, nsec);
    return JSON_OK;
}

/* ---- values, lists, maps ---------------------------------------------------------- */

static flowctl_json_result
read_value(reader *r, const flowctl_field *f, const ProtobufCFieldDescriptor *fd, VALUE *out)
{
    switch (fd->type) {
    case PROTOBUF_C_TYPE_STRING: return string_value(r, out);
    case PROTOBUF_C_TYPE_BYTES: return bytes_value(r, out);
    case PROTOBUF_C_TYPE_BOOL:
        if (word(r, "true", 4)) *out = Qtrue;
        else if (word(r, "false", 5)) *out = Qfalse;
        else return JSON_FALLBACK;
        return JSON_OK;
    case PROTOBUF_C_TYPE_DOUBLE: case PROTOBUF_C_TYPE_FLOAT: return double_value(r, fd->type, out);
    case PROTOBUF_C_TYPE_ENUM: return enum_value(r, fd->descriptor, out);
    case PROTOBUF_C_TYPE_MESSAGE: {
        if (f->timestamp) return timestamp_value(r, out);
        const flowctl_class *sub = flowctl_class_of_desc(fd->descriptor);
        if (!sub) return JSON_FALLBACK;
        return read_message(r, sub, out);
    }
    default: return integer_value(r, fd->type, out);
    }
}

static flowctl_json_result
read_list(reader *r, const flowctl_field *f, VALUE *out)
{
    if (++r->depth > MAX_DEPTH || !eat(r, '[')) return JSON_FALLBACK;
    VALUE list = rb_ary_new();
    if (!eat(r, ']')) {
        do {
            VALUE v;
            TRY(read_value(r, f, f->elem, &v));
            rb_ary_push(list, v);
        } while (eat(r, ','));
        if (!eat(r, ']')) return JSON_FALLBACK;
    }
    r->depth--;
    *out = list;
    return JSON_OK;
}

/* A map key from its JSON string: the string itself, "true"/"false", or the digits of an integer. */
static flowctl_json_result
map_key(reader *r, const ProtobufCFieldDescriptor *kd, VALUE *out)
{
    const char *s;
    size_t n;
    if (!raw_string(r, &s, &n)) return JSON_FALLBACK;
    if (kd->type == PROTOBUF_C_TYPE_STRING) {
        bool ascii = true;
        for (size_t i = 0; i < n && ascii; i++) ascii = (unsigned char)s[i] < 0x80;
        *out = utf8_string(s, n, ascii);
        return NIL_P(*out) ? JSON_FALLBACK : JSON_OK;
    }
    if (kd->type == PROTOBUF_C_TYPE_BOOL) {
        if (n == 4 && memcmp(s, "true", 4) == 0) *out = Qtrue;
        else if (n == 5 && memcmp(s, "false", 5) == 0) *out = Qfalse;
        else return JSON_FALLBACK;
        return JSON_OK;
    }
    bool neg;
    uint64_t mag;
    if (!integer_digits(s, n, &neg, &mag) || !in_range(kd->type, neg, mag)) return JSON_FALLBACK;
    *out = int_value(neg, mag);
    return JSON_OK;
}

static flowctl_json_result
read_map(reader *r, const flowctl_field *f, VALUE *out)
{
    if (++r->depth > MAX_DEPTH || !eat(r, '{')) return JSON_FALLBACK;
    VALUE map = rb_hash_new();
    long entries = 0;
    if (!eat(r, '}')) {
        do {
            VALUE k, v;
            TRY(map_key(r, f->key, &k));
            if (!eat(r, ':') || peek(r, 'n')) return JSON_FALLBACK; /* null is the Ruby decoder's to name */
            TRY(read_value(r, f, f->elem, &v));
            rb_hash_aset(map, k, v);
            entries++;
        } while (eat(r, ','));
        if (!eat(r, '}')) return JSON_FALLBACK;
    }
    if ((long)RHASH_SIZE(map) != entries) return JSON_FALLBACK; /* a key given twice */
    r->depth--;
    *out = map;
    return JSON_OK;
}

/* ---- messages --------------------------------------------------------------------- */

/* The field a key names: a .proto name first (as the Ruby layer looks up), then a JSON name. */
static const flowctl_json_name *
field_named(const flowctl_json_plan *p, const char *s, size_t n)
{
    for (unsigned i = 0; i < p->n; i++) /* the keys are the names quoted, with a colon: "name": */
        if (p->fields[i].proto_key_len == n + 3 && memcmp(p->fields[i].proto_key + 1, s, n) == 0) return &p->fields[i];
    for (unsigned i = 0; i < p->n; i++)
        if (p->fields[i].key_len == n + 3 && memcmp(p->fields[i].key + 1, s, n) == 0) return &p->fields[i];
    return NULL;
}

/* A member of a oneof whose sibling was already given a value. */
static bool
oneof_taken(const flowctl_class *ci, unsigned index, const uint8_t *given)
{
    unsigned oneof = ci->fields[index].oneof;
    for (unsigned j = 0; j < ci->n_fields; j++)
        if (j != index && ci->fields[j].oneof == oneof && given[j] == 2) return true;
    return false;
}

static flowctl_json_result
read_field(reader *r, VALUE msg, const flowctl_field *f, VALUE *out)
{
    switch (f->kind) {
    case FK_MAP: return read_map(r, f, out);
    case FK_REPEATED: return read_list(r, f, out);
    default: return read_value(r, f, f->elem, out);
    }
}

/* One "key": value of a message; given[i]: 1 once field i was named, 2 with a value. */
static flowctl_json_result
read_member(reader *r, const flowctl_json_plan *p, VALUE msg, uint8_t *given)
{
    const flowctl_class *ci = ((flowctl_msg *)RTYPEDDATA_DATA(msg))->ci;
    const char *s;
    size_t n;
    if (!raw_string(r, &s, &n) || !eat(r, ':')) return JSON_FALLBACK;
    const flowctl_json_name *name = field_named(p, s, n);
    if (!name || given[name->index]) return JSON_FALLBACK;
    const flowctl_field *f = &ci->fields[name->index];
    given[name->index] = 1;
    if (peek(r, 'n')) {
        /* null: the default, except in a well-known type's field (a Value holds it) */
        if (f->sub_desc && (!flowctl_class_of_desc(f->sub_desc) ||
                            !flowctl_json_plan_of(flowctl_class_of_desc(f->sub_desc)) ||
                            flowctl_json_plan_of(flowctl_class_of_desc(f->sub_desc))->special))
            return JSON_FALLBACK;
        return word(r, "null", 4) ? JSON_OK : JSON_FALLBACK;
    }
    if (f->oneof && oneof_taken(ci, name->index, given)) return JSON_FALLBACK;
    given[name->index] = 2;
    VALUE v;
    TRY(read_field(r, msg, f, &v));
    flowctl_msg_put(msg, name->index, v);
    return JSON_OK;
}

static flowctl_json_result
read_message(reader *r, const flowctl_class *ci, VALUE *out)
{
    const flowctl_json_plan *p = flowctl_json_plan_of(ci);
    if (!p) {
        r->missing = ci;
        return JSON_NO_PLAN;
    }
    if (p->special || ci->n_fields > MAX_FIELDS || ++r->depth > MAX_DEPTH || !eat(r, '{')) return JSON_FALLBACK;
    uint8_t given[MAX_FIELDS] = {0};
    VALUE msg = flowctl_msg_new(ci);
    if (!eat(r, '}')) {
        do TRY(read_member(r, p, msg, given));
        while (eat(r, ','));
        if (!eat(r, '}')) return JSON_FALLBACK;
    }
    r->depth--;
    *out = msg;
    return JSON_OK;
}

flowctl_json_result
flowctl_json_read(const flowctl_class *ci, const char *text, size_t len, VALUE *out, const flowctl_class **missing)
{
    reader r = {.p = text, .end = text + len};
    flowctl_json_result res = read_message(&r, ci, out);
    *missing = r.missing;
    if (res != JSON_OK) return res;
    ws(&r);
    return r.p == r.end ? JSON_OK : JSON_FALLBACK;
}
