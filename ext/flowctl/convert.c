/*
 * convert.c — the one place where Ruby values meet protobuf fields.
 *
 *   flowctl_convert_field  checks and normalises a value a setter was given
 *                          (errors name the class, the field and what was given);
 *   flowctl_encode_into    writes a message's values in the wire format, in field
 *                          number order, the way protoc-generated code does;
 *   flowctl_decode_into    reads the wire format into Ruby values, checking every
 *                          length and UTF-8 string (Flowctl::DecodeError); a known
 *                          field number with another wire type is an unknown field
 *                          and skipped, as upb and protobuf-go parse it;
 *   flowctl_decode_check   the same reading and checks, building nothing: a message
 *                          decoded lazily (message.c) raises its DecodeError at once.
 *
 * The field types and numbers come from the protobuf-c descriptors.
 */
#include "flowctl.h"
#include "wire.h"
#include <math.h>

#define MAX_DEPTH 100

static int utf8_index;

const char *const flowctl_type_names[] = {
    [PROTOBUF_C_TYPE_INT32] = "int32", [PROTOBUF_C_TYPE_SINT32] = "sint32",
    [PROTOBUF_C_TYPE_SFIXED32] = "sfixed32", [PROTOBUF_C_TYPE_INT64] = "int64",
    [PROTOBUF_C_TYPE_SINT64] = "sint64", [PROTOBUF_C_TYPE_SFIXED64] = "sfixed64",
    [PROTOBUF_C_TYPE_UINT32] = "uint32", [PROTOBUF_C_TYPE_FIXED32] = "fixed32",
    [PROTOBUF_C_TYPE_UINT64] = "uint64", [PROTOBUF_C_TYPE_FIXED64] = "fixed64",
    [PROTOBUF_C_TYPE_FLOAT] = "float", [PROTOBUF_C_TYPE_DOUBLE] = "double",
    [PROTOBUF_C_TYPE_BOOL] = "bool", [PROTOBUF_C_TYPE_ENUM] = "enum",
    [PROTOBUF_C_TYPE_STRING] = "string", [PROTOBUF_C_TYPE_BYTES] = "bytes",
    [PROTOBUF_C_TYPE_MESSAGE] = "message",
};

/* ======================================================================== */
/* Normalising values given to setters                                      */
/* ======================================================================== */

/* Where a value goes, for error messages. */
typedef struct {
    const flowctl_class *ci;
    const flowctl_field *f;
    const char *role; /* NULL, "element", "key" or "value" */
} where;

static VALUE
where_str(const where *w)
{
    VALUE kind = rb_str_new_cstr(w->f->kind == FK_MAP ? "map" : w->f->kind == FK_REPEATED ? "repeated" : "");
    const char *tn = flowctl_type_names[w->f->elem->type];
    if (w->f->timestamp) tn = "google.protobuf.Timestamp";
    return rb_sprintf("%s%s%s field '%s' of %"PRIsVALUE,
                      w->role ? w->role : "", w->role ? " of " : "",
                      w->f->kind == FK_SINGULAR ? tn : RSTRING_PTR(kind), w->f->name, w->ci->klass);
}

NORETURN(static void type_error(const where *w, const char *expected, VALUE given));
static void
type_error(const where *w, const char *expected, VALUE given)
{
    rb_raise(rb_eTypeError, "invalid value for %"PRIsVALUE": expected %s (given %"PRIsVALUE")",
             where_str(w), expected, rb_obj_class(given));
}

/* A frozen UTF-8 String with valid contents, or an error naming the field. */
static VALUE
conv_string(const where *w, VALUE v)
{
    if (!RB_TYPE_P(v, T_STRING)) type_error(w, "String", v);
    int enc = ENCODING_GET(v);
    if (enc != rb_utf8_encindex()) {
        if (enc == rb_ascii8bit_encindex() || enc == rb_usascii_encindex()) {
            v = rb_str_dup(v);
            rb_enc_associate_index(v, rb_utf8_encindex());
        } else {
            VALUE conv = rb_str_conv_enc(v, rb_enc_get(v), rb_utf8_encoding());
            if (conv == v) rb_raise(rb_eArgError, "%"PRIsVALUE": cannot convert %s to UTF-8",
                                    where_str(w), rb_enc_name(rb_enc_get(v)));
            v = conv;
        }
    }
    if (rb_enc_str_coderange(v) == ENC_CODERANGE_BROKEN)
        rb_raise(rb_eArgError, "invalid UTF-8 in %"PRIsVALUE, where_str(w));
    return rb_str_new_frozen(v);
}

static VALUE
conv_bytes(const where *w, VALUE v)
{
    if (!RB_TYPE_P(v, T_STRING)) type_error(w, "String", v);
    if (ENCODING_GET(v) != rb_ascii8bit_encindex()) {
        v = rb_str_dup(v);
        rb_enc_associate_index(v, rb_ascii8bit_encindex());
    }
    return rb_str_new_frozen(v);
}

static VALUE
conv_int(const where *w, VALUE v, int type)
{
    if (!RB_INTEGER_TYPE_P(v)) type_error(w, "Integer", v);
    bool ok;
    switch (type) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32: case PROTOBUF_C_TYPE_SFIXED32:
        ok = FIXNUM_P(v) && FIX2LONG(v) >= INT32_MIN && FIX2LONG(v) <= INT32_MAX;
        break;
    case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_FIXED32:
        ok = FIXNUM_P(v) && FIX2LONG(v) >= 0 && FIX2LONG(v) <= (long)UINT32_MAX;
        break;
    case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64:
        ok = RTEST(rb_funcall(v, rb_intern(">="), 1, INT2FIX(0))) &&
             RTEST(rb_funcall(v, rb_intern("<="), 1, ULL2NUM(UINT64_MAX)));
        break;
    default:
        ok = FIXNUM_P(v) || (RTEST(rb_funcall(v, rb_intern(">="), 1, LL2NUM(INT64_MIN))) &&
                             RTEST(rb_funcall(v, rb_intern("<="), 1, LL2NUM(INT64_MAX))));
    }
    if (!ok) rb_raise(rb_eRangeError, "%"PRIsVALUE" is out of range for %"PRIsVALUE, v, where_str(w));
    return v;
}

static VALUE
conv_enum(const where *w, VALUE v)
{
    const ProtobufCEnumDescriptor *ed = w->f->elem->descriptor;
    if (RB_INTEGER_TYPE_P(v)) {
        v = conv_int(w, v, PROTOBUF_C_TYPE_INT32);
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(ed, NUM2INT(v));
        return ev ? ID2SYM(rb_intern(ev->name)) : v; /* proto3 enums are open */
    }
    if (SYMBOL_P(v) || RB_TYPE_P(v, T_STRING)) {
        VALUE s = SYMBOL_P(v) ? rb_sym2str(v) : v;
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value_by_name(ed, StringValueCStr(s));
        if (!ev) rb_raise(rb_eArgError, "unknown %s value %+"PRIsVALUE" for %"PRIsVALUE, ed->name, v, where_str(w));
        return ID2SYM(rb_intern(ev->name));
    }
    type_error(w, "Symbol, String or Integer", v);
}

/* google.protobuf.Timestamp holds 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z */
#define TIMESTAMP_MIN (-62135596800LL)
#define TIMESTAMP_MAX (253402300799LL)

static VALUE
conv_time(const where *w, VALUE t)
{
    VALUE sec = rb_funcall(t, rb_intern("to_i"), 0);
    if (!FIXNUM_P(sec) || FIX2LONG(sec) < TIMESTAMP_MIN || FIX2LONG(sec) > TIMESTAMP_MAX)
        rb_raise(rb_eRangeError, "%"PRIsVALUE" is outside what %"PRIsVALUE" holds (years 1 to 9999)",
                 rb_inspect(t), where_str(w));
    /* the wire holds nanoseconds: a finer Time is kept as what will be sent, so that
     * decode(msg.to_proto) == msg */
    struct timespec ts = rb_time_timespec(t);
    VALUE ns = rb_time_nano_new(ts.tv_sec, ts.tv_nsec);
    return rb_equal(ns, t) ? t : ns;
}

static VALUE
conv_message(const where *w, VALUE v)
{
    if (w->f->timestamp) {
        if (rb_obj_is_kind_of(v, rb_cTime)) return conv_time(w, v);
        if (rb_respond_to(v, rb_intern("to_time")) && !RB_TYPE_P(v, T_STRING)) {
            VALUE t = rb_funcall(v, rb_intern("to_time"), 0);
            if (rb_obj_is_kind_of(t, rb_cTime)) return conv_time(w, t);
        }
        type_error(w, "Time", v);
    }
    const flowctl_class *sub = flowctl_class_of_desc(w->f->sub_desc);
    if (rb_obj_class(v) == sub->klass || rb_obj_is_kind_of(v, sub->klass)) return v;
    if (RB_TYPE_P(v, T_HASH)) return rb_class_new_instance(1, &v, sub->klass);
    type_error(w, RSTRING_PTR(rb_class_name(sub->klass)), v);
}

/* One value of the element type of w->f (what a singular field, a list element or a map value holds). */
static VALUE
conv_value(const where *w, const ProtobufCFieldDescriptor *fd, VALUE v)
{
    switch (fd->type) {
    case PROTOBUF_C_TYPE_STRING: return conv_string(w, v);
    case PROTOBUF_C_TYPE_BYTES: return conv_bytes(w, v);
    case PROTOBUF_C_TYPE_BOOL:
        if (v != Qtrue && v != Qfalse) type_error(w, "true or false", v);
        return v;
    case PROTOBUF_C_TYPE_DOUBLE:
        if (RB_FLOAT_TYPE_P(v)) return v;
        if (RB_INTEGER_TYPE_P(v)) return DBL2NUM(NUM2DBL(v));
        type_error(w, "Float or Integer", v);
    case PROTOBUF_C_TYPE_FLOAT:
        if (RB_FLOAT_TYPE_P(v) || RB_INTEGER_TYPE_P(v)) return DBL2NUM((double)(float)NUM2DBL(v));
        type_error(w, "Float or Integer", v);
    case PROTOBUF_C_TYPE_ENUM: return conv_enum(w, v);
    case PROTOBUF_C_TYPE_MESSAGE: return conv_message(w, v);
    default: return conv_int(w, v, fd->type);
    }
}

struct map_conv {
    where wk, wv;
    VALUE out;
};

static int
map_conv_each(VALUE k, VALUE v, VALUE p)
{
    struct map_conv *m = (struct map_conv *)p;
    VALUE key = conv_value(&m->wk, m->wk.f->key, k);
    if (RB_TYPE_P(key, T_STRING)) key = rb_str_new_frozen(key);
    rb_hash_aset(m->out, key, conv_value(&m->wv, m->wv.f->elem, v));
    return ST_CONTINUE;
}

VALUE
flowctl_convert_field(const flowctl_class *ci, const flowctl_field *f, VALUE v)
{
    where w = {ci, f, NULL};
    switch (f->kind) {
    case FK_MAP: {
        if (!RB_TYPE_P(v, T_HASH)) type_error(&w, "Hash", v);
        struct map_conv m = {{ci, f, "key"}, {ci, f, "value"}, rb_hash_new()};
        rb_hash_foreach(v, map_conv_each, (VALUE)&m);
        return m.out;
    }
    case FK_REPEATED: {
        if (!RB_TYPE_P(v, T_ARRAY)) type_error(&w, "Array", v);
        where we = {ci, f, "element"};
        VALUE out = rb_ary_new_capa(RARRAY_LEN(v));
        for (long i = 0; i < RARRAY_LEN(v); i++) rb_ary_push(out, conv_value(&we, f->elem, RARRAY_AREF(v, i)));
        return out;
    }
    default:
        if (NIL_P(v) && (f->presence || f->elem->type == PROTOBUF_C_TYPE_MESSAGE)) return Qnil;
        return conv_value(&w, f->elem, v);
    }
}

/* ======================================================================== */
/* Encoding                                                                  */
/* ======================================================================== */

/*
 * Encoding writes into a buffer on the C stack. When the message does not fit, the
 * rest of that pass only counts bytes, and a second pass writes into a Ruby String of
 * the exact size. Every type error is raised by the first pass, before anything is
 * allocated, so a failing encode of a large message leaves no garbage behind.
 */
#define WB_STACK 4096

int
flowctl_wire_type(int type)
{
    switch (type) {
    case PROTOBUF_C_TYPE_SFIXED32: case PROTOBUF_C_TYPE_FIXED32: case PROTOBUF_C_TYPE_FLOAT: return WT_I32;
    case PROTOBUF_C_TYPE_SFIXED64: case PROTOBUF_C_TYPE_FIXED64: case PROTOBUF_C_TYPE_DOUBLE: return WT_I64;
    case PROTOBUF_C_TYPE_STRING: case PROTOBUF_C_TYPE_BYTES: case PROTOBUF_C_TYPE_MESSAGE: return WT_LEN;
    default: return WT_VARINT;
    }
}

static void encode_msg(wbuf *b, const flowctl_class *ci, VALUE msg, int depth);

static int64_t
enum_number(const where *w, VALUE v)
{
    VALUE s = conv_enum(w, v); /* a Symbol for a known value, else the Integer itself */
    if (RB_INTEGER_TYPE_P(s)) return NUM2INT(s);
    return protobuf_c_enum_descriptor_get_value_by_name(w->f->elem->descriptor, rb_id2name(SYM2ID(s)))->value;
}

static bool
is_default(const ProtobufCFieldDescriptor *fd, VALUE v)
{
    switch (fd->type) {
    case PROTOBUF_C_TYPE_STRING: case PROTOBUF_C_TYPE_BYTES:
        return RB_TYPE_P(v, T_STRING) && RSTRING_LEN(v) == 0;
    case PROTOBUF_C_TYPE_BOOL: return v == Qfalse;
    case PROTOBUF_C_TYPE_MESSAGE: return NIL_P(v);
    case PROTOBUF_C_TYPE_FLOAT: case PROTOBUF_C_TYPE_DOUBLE: {
        if (!RB_FLOAT_TYPE_P(v)) return false;
        double d = RFLOAT_VALUE(v);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        return bits == 0; /* -0.0 is written, as protoc-generated code does */
    }
    case PROTOBUF_C_TYPE_ENUM:
        return (SYMBOL_P(v) || FIXNUM_P(v)) &&
               (v == INT2FIX(0) || (SYMBOL_P(v) && protobuf_c_enum_descriptor_get_value_by_name(
                                        fd->descriptor, rb_id2name(SYM2ID(v))) ==
                                        protobuf_c_enum_descriptor_get_value(fd->descriptor, 0)));
    default: return v == INT2FIX(0);
    }
}

static void
encode_timespec(wbuf *b, const struct timespec *ts)
{
    if (ts->tv_sec) { wb_tag(b, 1, WT_VARINT); wb_varint(b, (uint64_t)(int64_t)ts->tv_sec); }
    if (ts->tv_nsec) { wb_tag(b, 2, WT_VARINT); wb_varint(b, (uint64_t)(int64_t)ts->tv_nsec); }
}

static void
encode_timestamp(wbuf *b, VALUE t)
{
    struct timespec ts = rb_time_timespec(t);
    encode_timespec(b, &ts);
}

/* A UTF-8 String known (or now checked) to be valid: the coderange is cached in the flags. */
static inline bool
utf8_ok(VALUE v)
{
    if (!RB_TYPE_P(v, T_STRING) || ENCODING_GET_INLINED(v) != utf8_index) return false;
    int cr = ENC_CODERANGE(v);
    if (cr == ENC_CODERANGE_7BIT || cr == ENC_CODERANGE_VALID) return true;
    return rb_enc_str_coderange(v) != ENC_CODERANGE_BROKEN;
}

/* The payload of one value (no tag). v has been normalised, or is re-checked here. */
static void
encode_value(wbuf *b, const where *w, const ProtobufCFieldDescriptor *fd, VALUE v, int depth)
{
    switch (fd->type) {
    case PROTOBUF_C_TYPE_STRING:
        if (!utf8_ok(v)) v = conv_string(w, v);
        wb_lenbytes(b, RSTRING_PTR(v), (size_t)RSTRING_LEN(v));
        break;
    case PROTOBUF_C_TYPE_BYTES:
        if (!RB_TYPE_P(v, T_STRING)) type_error(w, "String", v);
        wb_lenbytes(b, RSTRING_PTR(v), (size_t)RSTRING_LEN(v));
        break;
    case PROTOBUF_C_TYPE_DOUBLE: {
        if (!RB_FLOAT_TYPE_P(v)) v = conv_value(w, fd, v);
        double d = RFLOAT_VALUE(v);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        wb_fixed64(b, bits);
        break;
    }
    case PROTOBUF_C_TYPE_FLOAT: {
        float f = (float)NUM2DBL(RB_FLOAT_TYPE_P(v) ? v : conv_value(w, fd, v));
        uint32_t bits;
        memcpy(&bits, &f, 4);
        wb_fixed32(b, bits);
        break;
    }
    case PROTOBUF_C_TYPE_BOOL:
        if (v != Qtrue && v != Qfalse) type_error(w, "true or false", v);
        wb_varint(b, v == Qtrue);
        break;
    case PROTOBUF_C_TYPE_ENUM:
        wb_varint(b, (uint64_t)enum_number(w, v));
        break;
    case PROTOBUF_C_TYPE_MESSAGE: {
        size_t at = wb_open(b);
        if (w->f->timestamp) {
            encode_timestamp(b, RB_TYPE_P(v, T_DATA) && rb_obj_is_kind_of(v, rb_cTime) ? v : conv_message(w, v));
        } else if (!NIL_P(v)) {
            v = conv_message(w, v);
            encode_msg(b, flowctl_class_of_desc(fd->descriptor), v, depth + 1);
        }
        wb_close(b, at);
        break;
    }
    default: {
        v = conv_int(w, v, fd->type);
        switch (fd->type) {
        case PROTOBUF_C_TYPE_SINT32: { int32_t x = NUM2INT(v); wb_varint(b, ((uint32_t)x << 1) ^ (uint32_t)(x >> 31)); break; }
        case PROTOBUF_C_TYPE_SINT64: { int64_t x = NUM2LL(v); wb_varint(b, ((uint64_t)x << 1) ^ (uint64_t)(x >> 63)); break; }
        case PROTOBUF_C_TYPE_SFIXED32: wb_fixed32(b, (uint32_t)NUM2INT(v)); break;
        case PROTOBUF_C_TYPE_FIXED32: wb_fixed32(b, NUM2UINT(v)); break;
        case PROTOBUF_C_TYPE_SFIXED64: wb_fixed64(b, (uint64_t)NUM2LL(v)); break;
        case PROTOBUF_C_TYPE_FIXED64: wb_fixed64(b, NUM2ULL(v)); break;
        case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_UINT64: wb_varint(b, NUM2ULL(v)); break;
        default: wb_varint(b, (uint64_t)NUM2LL(v)); break; /* int32 (sign-extended), int64 */
        }
    }
    }
}

struct map_enc {
    wbuf *b;
    where wk, wv;
    int depth;
};

static int
map_enc_each(VALUE k, VALUE v, VALUE p)
{
    struct map_enc *m = (struct map_enc *)p;
    const flowctl_field *f = m->wk.f;
    wb_bytes(m->b, f->tag, f->tag_len);
    size_t at = wb_open(m->b);
    wb_byte(m->b, (uint8_t)((1 << 3) | flowctl_wire_type(f->key->type)));
    encode_value(m->b, &m->wk, f->key, k, m->depth);
    wb_byte(m->b, (uint8_t)((2 << 3) | flowctl_wire_type(f->elem->type)));
    if (NIL_P(v) && f->elem->type == PROTOBUF_C_TYPE_MESSAGE && !f->timestamp) type_error(&m->wv, "a message", v);
    encode_value(m->b, &m->wv, f->elem, v, m->depth);
    wb_close(m->b, at);
    return ST_CONTINUE;
}

static int
map_enc_st(st_data_t k, st_data_t v, st_data_t p)
{
    return map_enc_each((VALUE)k, (VALUE)v, (VALUE)p);
}
#define MAP_FOREACH(h, arg) flowctl_hash_each((h), map_enc_st, (arg))

static void
encode_field(wbuf *b, const flowctl_class *ci, VALUE msg, const flowctl_field *f, VALUE v, int depth)
{
    where w = {ci, f, NULL};
    switch (f->kind) {
    case FK_SINGULAR:
        if (f->presence ? NIL_P(v) : is_default(f->fd, v)) return;
        wb_bytes(b, f->tag, f->tag_len);
        if (f->ts_slot >= 0) {
            size_t at = wb_open(b);
            encode_timespec(b, flowctl_msg_ts(flowctl_msg_get(msg), f));
            wb_close(b, at);
            return;
        }
        encode_value(b, &w, f->fd, v, depth);
        return;
    case FK_MAP: {
        if (NIL_P(v)) return;
        if (!RB_TYPE_P(v, T_HASH)) type_error(&w, "Hash", v);
        struct map_enc m = {b, {ci, f, "key"}, {ci, f, "value"}, depth};
        MAP_FOREACH(v, &m);
        return;
    }
    case FK_REPEATED: {
        if (NIL_P(v) || RARRAY_LEN(v) == 0) return;
        if (!RB_TYPE_P(v, T_ARRAY)) type_error(&w, "Array", v);
        w.role = "element";
        if (f->packed) {
            wb_tag(b, f->fd->id, WT_LEN);
            size_t at = wb_open(b);
            for (long i = 0; i < RARRAY_LEN(v); i++) encode_value(b, &w, f->fd, RARRAY_AREF(v, i), depth);
            wb_close(b, at);
            return;
        }
        for (long i = 0; i < RARRAY_LEN(v); i++) {
            wb_tag(b, f->fd->id, flowctl_wire_type(f->fd->type));
            VALUE e = RARRAY_AREF(v, i);
            if (NIL_P(e) && f->fd->type == PROTOBUF_C_TYPE_MESSAGE) type_error(&w, "a message", e);
            encode_value(b, &w, f->fd, e, depth);
        }
        return;
    }
    }
}

static void
encode_msg(wbuf *b, const flowctl_class *ci, VALUE msg, int depth)
{
    if (depth > MAX_DEPTH) rb_raise(eFlowctlError, "%"PRIsVALUE": messages nested too deep", ci->klass);
    flowctl_msg *m = flowctl_msg_get(msg);
    for (unsigned i = 0; i < ci->n_fields; i++) {
        unsigned j = ci->order[i];
        encode_field(b, ci, msg, &ci->fields[j], m->vals[j], depth);
    }
    RB_GC_GUARD(msg);
}

size_t
flowctl_encode_to(const flowctl_class *ci, VALUE msg, char *buf, size_t cap, bool *fits)
{
    wbuf b = {.p = buf, .len = 0, .cap = cap};
    encode_msg(&b, ci, msg, 0);
    *fits = !b.counting;
    return b.len;
}

VALUE
flowctl_encode(const flowctl_class *ci, VALUE msg)
{
    char stack[WB_STACK];
    bool fits;
    size_t len = flowctl_encode_to(ci, msg, stack, sizeof(stack), &fits);
    if (fits) return rb_str_new(stack, (long)len);

    VALUE str = rb_str_buf_new((long)len);
    wbuf full = {.p = RSTRING_PTR(str), .len = 0, .cap = len};
    encode_msg(&full, ci, msg, 0);
    if (full.counting || full.len != len)
        rb_raise(eFlowctlError, "%"PRIsVALUE" changed while it was being encoded", ci->klass);
    rb_str_set_len(str, (long)full.len);
    return str;
}

/* ======================================================================== */
/* Decoding                                                                  */
/* ======================================================================== */

/* What is left to read; check: only checking (flowctl_decode_check), nothing is built. */
typedef struct {
    const uint8_t *p, *end;
    bool check;
    VALUE src; /* the frozen String p points into (flowctl_decode_from), or 0 */
} rbuf;

NORETURN(static void decode_error(const flowctl_class *ci, const char *fmt, ...));
static void
decode_error(const flowctl_class *ci, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    VALUE what = rb_vsprintf(fmt, ap);
    va_end(ap);
    rb_raise(eFlowctlDecodeError, "cannot decode %"PRIsVALUE": %"PRIsVALUE, ci->klass, what);
}

static uint64_t
rd_varint(const flowctl_class *ci, rbuf *r)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (r->p >= r->end) decode_error(ci, "truncated input (varint)");
        uint8_t byte = *r->p++;
        if (shift == 63 && byte > 1) decode_error(ci, "malformed varint");
        v |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) return v;
    }
    decode_error(ci, "malformed varint");
}

static uint32_t
rd_fixed32(const flowctl_class *ci, rbuf *r)
{
    if (r->end - r->p < 4) decode_error(ci, "truncated input (fixed32)");
    uint32_t v = (uint32_t)r->p[0] | (uint32_t)r->p[1] << 8 | (uint32_t)r->p[2] << 16 | (uint32_t)r->p[3] << 24;
    r->p += 4;
    return v;
}

static uint64_t
rd_fixed64(const flowctl_class *ci, rbuf *r)
{
    uint64_t lo = rd_fixed32(ci, r);
    return lo | (uint64_t)rd_fixed32(ci, r) << 32;
}

/* A field key: field numbers run from 1 to 2^29-1 in messages, map entries and groups
 * alike, and a key takes at most 5 bytes (as upb and protobuf C++ read it). */
static uint64_t
rd_tag(const flowctl_class *ci, rbuf *r)
{
    const uint8_t *start = r->p;
    uint64_t tag = rd_varint(ci, r);
    if (r->p - start > 5) decode_error(ci, "malformed field key (%d bytes)", (int)(r->p - start));
    if ((tag >> 3) == 0 || (tag >> 3) > 536870911)
        decode_error(ci, "invalid field number %llu", (unsigned long long)(tag >> 3));
    return tag;
}

static rbuf
rd_len(const flowctl_class *ci, rbuf *r, const char *field)
{
    uint64_t n = rd_varint(ci, r);
    if (n > (uint64_t)(r->end - r->p)) decode_error(ci, "truncated input (field '%s' is longer than the data)", field);
    rbuf sub = {r->p, r->p + n, r->check, r->src};
    r->p += n;
    return sub;
}

static void
skip_field(const flowctl_class *ci, rbuf *r, int wt, uint32_t number, int depth)
{
    switch (wt) {
    case WT_VARINT: rd_varint(ci, r); return;
    case WT_I64: rd_fixed64(ci, r); return;
    case WT_I32: rd_fixed32(ci, r); return;
    case WT_LEN: rd_len(ci, r, "unknown"); return;
    case WT_SGROUP:
        if (depth > MAX_DEPTH) decode_error(ci, "groups nested too deep");
        for (;;) {
            uint64_t tag = rd_tag(ci, r);
            if ((tag & 7) == WT_EGROUP) {
                if ((tag >> 3) != number) decode_error(ci, "mismatched end of group");
                return;
            }
            skip_field(ci, r, (int)(tag & 7), (uint32_t)(tag >> 3), depth + 1);
        }
    default: decode_error(ci, "invalid wire type %d", wt);
    }
}

static void decode_msg(const flowctl_class *ci, VALUE msg, rbuf *r, int depth);

/* The bytes are valid UTF-8 by Ruby's own reading (what rb_enc_str_coderange says of a
 * String holding them), without making the String. */
static bool
utf8_valid(rbuf s)
{
    rb_encoding *utf8 = rb_utf8_encoding();
    const char *p = (const char *)s.p, *e = (const char *)s.end;
    while (p < e) {
        if ((unsigned char)*p < 0x80) {
            p++;
            continue;
        }
        int n = rb_enc_precise_mbclen(p, e, utf8);
        if (!MBCLEN_CHARFOUND_P(n)) return false;
        p += MBCLEN_CHARFOUND_LEN(n);
    }
    return true;
}

/* A Time from a Timestamp's fields, merged into prev (when seen twice); *out gets its timespec. */
static VALUE
decode_timestamp(const flowctl_class *ci, const flowctl_field *f, rbuf r, const struct timespec *prev,
                 struct timespec *out)
{
    int64_t sec = prev ? prev->tv_sec : 0;
    int64_t nsec = prev ? prev->tv_nsec : 0;
    while (r.p < r.end) {
        uint64_t tag = rd_tag(ci, &r);
        int wt = (int)(tag & 7);
        uint32_t num = (uint32_t)(tag >> 3);
        if ((num == 1 || num == 2) && wt != WT_VARINT) skip_field(ci, &r, wt, num, 0); /* unknown */
        else if (num == 1) sec = (int64_t)rd_varint(ci, &r);
        else if (num == 2) nsec = (int32_t)rd_varint(ci, &r);
        else skip_field(ci, &r, wt, num, 0);
    }
    if (nsec < 0 || nsec > 999999999)
        decode_error(ci, "Timestamp field '%s' has nanos %lld outside 0..999999999", f->name, (long long)nsec);
    if (sec < TIMESTAMP_MIN || sec > TIMESTAMP_MAX)
        decode_error(ci, "Timestamp field '%s' has seconds %lld outside years 1..9999", f->name, (long long)sec);
    out->tv_sec = (time_t)sec;
    out->tv_nsec = (long)nsec;
    return r.check ? Qnil : rb_time_nano_new((time_t)sec, (long)nsec);
}

#define SHARE_MIN 256 /* bytes: a value this long or longer may share its message's copy */

/* A bytes value that is most of a message kept lazily shares the message's frozen copy of
 * its bytes (a 1 KiB payload is not copied a second time when the message is built); any
 * other is a copy (a short value never keeps a long message's bytes alive). */
static VALUE
bytes_value(const rbuf *r, rbuf s)
{
    long len = (long)(s.end - s.p);
    if (r->src && len >= SHARE_MIN && len * 2 >= RSTRING_LEN(r->src) && RB_OBJ_FROZEN(r->src))
        return rb_str_subseq(r->src, (long)(s.p - (const uint8_t *)RSTRING_PTR(r->src)), len);
    return rb_str_new((const char *)s.p, len);
}

/* One value of type fd read from r with wire type wt (already checked). */
static VALUE
decode_value(const flowctl_class *ci, const flowctl_field *f, const ProtobufCFieldDescriptor *fd, rbuf *r,
             VALUE prev, int depth)
{
    switch (fd->type) {
    case PROTOBUF_C_TYPE_STRING: {
        rbuf s = rd_len(ci, r, f->name);
        if (r->check) {
            if (!utf8_valid(s)) decode_error(ci, "invalid UTF-8 in string field '%s'", f->name);
            return Qnil;
        }
        VALUE str = rb_utf8_str_new((const char *)s.p, s.end - s.p);
        if (rb_enc_str_coderange(str) == ENC_CODERANGE_BROKEN)
            decode_error(ci, "invalid UTF-8 in string field '%s'", f->name);
        return rb_obj_freeze(str);
    }
    case PROTOBUF_C_TYPE_BYTES: {
        rbuf s = rd_len(ci, r, f->name);
        return r->check ? Qnil : rb_obj_freeze(bytes_value(r, s));
    }
    case PROTOBUF_C_TYPE_MESSAGE: {
        rbuf s = rd_len(ci, r, f->name);
        if (f->timestamp) {
            struct timespec ts, before;
            if (!NIL_P(prev)) before = rb_time_timespec(prev);
            return decode_timestamp(ci, f, s, NIL_P(prev) ? NULL : &before, &ts);
        }
        const flowctl_class *sub = flowctl_class_of_desc(fd->descriptor);
        VALUE m = r->check ? Qnil : NIL_P(prev) ? flowctl_msg_new(sub) : prev;
        decode_msg(sub, m, &s, depth + 1);
        return m;
    }
    default:
        if (r->check) { /* a scalar is checked by reading it */
            int wt = flowctl_wire_type(fd->type);
            if (wt == WT_I64) rd_fixed64(ci, r);
            else if (wt == WT_I32) rd_fixed32(ci, r);
            else rd_varint(ci, r);
            return Qnil;
        }
        break;
    }
    switch (fd->type) {
    case PROTOBUF_C_TYPE_DOUBLE: {
        uint64_t bits = rd_fixed64(ci, r);
        double d;
        memcpy(&d, &bits, 8);
        return DBL2NUM(d);
    }
    case PROTOBUF_C_TYPE_FLOAT: {
        uint32_t bits = rd_fixed32(ci, r);
        float x;
        memcpy(&x, &bits, 4);
        return DBL2NUM((double)x);
    }
    case PROTOBUF_C_TYPE_SFIXED32: return INT2NUM((int32_t)rd_fixed32(ci, r));
    case PROTOBUF_C_TYPE_FIXED32: return UINT2NUM(rd_fixed32(ci, r));
    case PROTOBUF_C_TYPE_SFIXED64: return LL2NUM((int64_t)rd_fixed64(ci, r));
    case PROTOBUF_C_TYPE_FIXED64: return ULL2NUM(rd_fixed64(ci, r));
    default: break;
    }
    uint64_t v = rd_varint(ci, r);
    switch (fd->type) {
    case PROTOBUF_C_TYPE_BOOL: return v ? Qtrue : Qfalse;
    case PROTOBUF_C_TYPE_INT32: return INT2NUM((int32_t)v);
    case PROTOBUF_C_TYPE_UINT32: return UINT2NUM((uint32_t)v);
    case PROTOBUF_C_TYPE_SINT32: return INT2NUM((int32_t)((uint32_t)v >> 1) ^ -(int32_t)(v & 1));
    case PROTOBUF_C_TYPE_SINT64: return LL2NUM((int64_t)(v >> 1) ^ -(int64_t)(v & 1));
    case PROTOBUF_C_TYPE_UINT64: return ULL2NUM(v);
    case PROTOBUF_C_TYPE_ENUM: {
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(fd->descriptor, (int32_t)v);
        return ev ? ID2SYM(rb_intern(ev->name)) : INT2NUM((int32_t)v);
    }
    default: return LL2NUM((int64_t)v); /* int64 */
    }
}

static VALUE
decode_default(const flowctl_class *ci, const ProtobufCFieldDescriptor *fd, const flowctl_field *f)
{
    if (fd->type == PROTOBUF_C_TYPE_MESSAGE)
        return f->timestamp ? rb_time_nano_new(0, 0) : flowctl_msg_new(flowctl_class_of_desc(fd->descriptor));
    flowctl_field tmp = *f;
    tmp.kind = FK_SINGULAR;
    tmp.presence = false;
    tmp.fd = fd;
    return flowctl_field_default(&tmp);
}

static void
decode_map_entry(const flowctl_class *ci, const flowctl_field *f, VALUE *slot, VALUE msg, rbuf r, int depth)
{
    VALUE key = Qundef, val = Qundef;
    while (r.p < r.end) {
        uint64_t tag = rd_tag(ci, &r);
        int wt = (int)(tag & 7);
        uint32_t num = (uint32_t)(tag >> 3);
        const ProtobufCFieldDescriptor *fd = num == 1 ? f->key : num == 2 ? f->elem : NULL;
        if (!fd || wt != flowctl_wire_type(fd->type)) { skip_field(ci, &r, wt, num, depth); continue; }
        VALUE v = decode_value(ci, f, fd, &r, num == 2 && val != Qundef ? val : Qnil, depth);
        if (num == 1) key = v; else val = v;
    }
    if (r.check) return;
    if (key == Qundef) key = decode_default(ci, f->key, f);
    if (val == Qundef) val = decode_default(ci, f->elem, f);
    if (NIL_P(*slot)) RB_OBJ_WRITE(msg, slot, rb_hash_new());
    rb_hash_aset(*slot, key, val);
}

static void
decode_field(const flowctl_class *ci, VALUE msg, VALUE *slot, const flowctl_field *f, rbuf *r, int wt, int depth)
{
    int expected = flowctl_wire_type(f->fd->type);
    bool packed = f->kind == FK_REPEATED && wt == WT_LEN && expected != WT_LEN;
    if (wt != expected && !packed) { /* parsed as an unknown field, as protoc-generated code does */
        skip_field(ci, r, wt, f->fd->id, depth);
        return;
    }
    if (f->kind == FK_MAP) {
        decode_map_entry(ci, f, slot, msg, rd_len(ci, r, f->name), depth);
        return;
    }
    if (r->check) { /* each value read as below, nothing kept */
        if (!packed) {
            decode_value(ci, f, f->fd, r, Qnil, depth);
            return;
        }
        rbuf s = rd_len(ci, r, f->name);
        while (s.p < s.end) decode_value(ci, f, f->fd, &s, Qnil, depth);
        return;
    }
    if (f->kind == FK_REPEATED) {
        if (NIL_P(*slot)) RB_OBJ_WRITE(msg, slot, rb_ary_new());
        if (packed) {
            rbuf s = rd_len(ci, r, f->name);
            while (s.p < s.end) rb_ary_push(*slot, decode_value(ci, f, f->fd, &s, Qnil, depth));
            return;
        }
        rb_ary_push(*slot, decode_value(ci, f, f->fd, r, Qnil, depth));
        return;
    }
    VALUE prev = f->fd->type == PROTOBUF_C_TYPE_MESSAGE ? *slot : Qnil; /* a message seen twice is merged */
    if (f->ts_slot >= 0) {
        struct timespec *ts = flowctl_msg_ts(flowctl_msg_get(msg), f);
        rbuf s = rd_len(ci, r, f->name);
        RB_OBJ_WRITE(msg, slot, decode_timestamp(ci, f, s, NIL_P(prev) ? NULL : ts, ts));
        return;
    }
    RB_OBJ_WRITE(msg, slot, decode_value(ci, f, f->fd, r, prev, depth));
}

static void
decode_msg(const flowctl_class *ci, VALUE msg, rbuf *r, int depth)
{
    if (depth > MAX_DEPTH) decode_error(ci, "messages nested too deep");
    flowctl_msg *m = r->check ? NULL : flowctl_msg_get(msg);
    while (r->p < r->end) {
        uint64_t tag = rd_tag(ci, r);
        int wt = (int)(tag & 7);
        uint64_t num = tag >> 3;
        if (wt == WT_EGROUP) decode_error(ci, "unexpected end of group");
        const ProtobufCFieldDescriptor *fd = protobuf_c_message_descriptor_get_field(ci->desc, (unsigned)num);
        if (!fd) { skip_field(ci, r, wt, (uint32_t)num, depth); continue; }
        unsigned i = (unsigned)(fd - ci->desc->fields);
        if (r->check) {
            decode_field(ci, Qnil, NULL, &ci->fields[i], r, wt, depth);
            continue;
        }
        decode_field(ci, msg, &m->vals[i], &ci->fields[i], r, wt, depth);
        if (ci->fields[i].oneof) flowctl_msg_clear_oneof(msg, m, i);
    }
}

void
flowctl_decode_into(const flowctl_class *ci, VALUE msg, const uint8_t *p, size_t len)
{
    rbuf r = {p, p + len, false, 0};
    decode_msg(ci, msg, &r, 0);
}

/* As flowctl_decode_into, from a frozen String that large bytes values may share. */
void
flowctl_decode_from(const flowctl_class *ci, VALUE msg, VALUE str)
{
    const uint8_t *p = (const uint8_t *)RSTRING_PTR(str);
    rbuf r = {p, p + RSTRING_LEN(str), false, str};
    decode_msg(ci, msg, &r, 0);
    RB_GC_GUARD(str);
}

/*
 * Checking reads what decoding reads and checks what it checks, in the same order, so the
 * first error is the same. A message field given twice (merged when built) is checked
 * part by part: a Timestamp's range holds for the merged one exactly when it holds for
 * each part (each value comes from one part), so the verdict is the same.
 */
void
flowctl_decode_check(const flowctl_class *ci, const uint8_t *p, size_t len)
{
    rbuf r = {p, p + len, true, 0};
    decode_msg(ci, Qnil, &r, 0);
}

void
init_flowctl_convert(void)
{
    utf8_index = rb_utf8_encindex();
}

void
flowctl_field_tag(flowctl_field *f)
{
    int wt = f->kind == FK_SINGULAR || (f->kind == FK_REPEATED && !f->packed) ? flowctl_wire_type(f->fd->type) : WT_LEN;
    uint64_t v = ((uint64_t)f->fd->id << 3) | (uint64_t)wt;
    f->tag_len = 0;
    while (v >= 0x80) { f->tag[f->tag_len++] = (uint8_t)(v | 0x80); v >>= 7; }
    f->tag[f->tag_len++] = (uint8_t)v;
}
