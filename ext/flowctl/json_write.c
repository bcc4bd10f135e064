/*
 * json_write.c — a message's proto3 JSON, walking its field table (message.c) and the
 * protobuf-c descriptors behind it: the engine of Flowctl::Native.json_encode
 * (json_class.c binds it to Ruby).
 *
 * It writes what lib/flowctl/json/encoder.rb writes, byte for byte, for every message
 * it can print, and gives up (JSON_FALLBACK) on anything else: a value a map or list was
 * filled with in place that its field cannot hold, a string in another encoding, an
 * enum given as a String, a message the Ruby layer marked special (the well-known types
 * with a JSON form of their own), nesting past 100. The Ruby encoder then prints the
 * message or raises the error that names the field: checks and messages stay there.
 * It never raises, never calls Ruby code and allocates no Ruby object (so no GC runs
 * while it holds VALUEs in C memory); the field names it prints come from Ruby once per
 * class (flowctl_json_plan_add), as the descriptor set declared them.
 */
#include "flowctl.h"
#include "json_text.h"

#define MAX_DEPTH 100
#define MAP_STACK 64 /* map entries ordered without malloc */

typedef flowctl_json_name plan_field;

static st_table *plans; /* const flowctl_class * -> flowctl_json_plan * (classes live forever) */

typedef struct {
    jbuf *b;
    unsigned flags;
    const flowctl_class *missing;
    int depth;
} jctx;

static flowctl_json_result write_message(jctx *c, VALUE msg);

static char *
quoted_key(const char *name, size_t *len)
{
    size_t n = strlen(name);
    char *k = malloc(n + 4);
    if (!k) return NULL;
    k[0] = '"';
    memcpy(k + 1, name, n);
    memcpy(k + 1 + n, "\":", 3);
    *len = n + 3;
    return k;
}

bool
flowctl_json_plan_add(const flowctl_class *ci, bool special, const unsigned *index, const char *const *json_names,
                      unsigned n)
{
    if (st_lookup(plans, (st_data_t)ci, NULL)) return true;
    flowctl_json_plan *p = calloc(1, sizeof(*p) + n * sizeof(plan_field));
    if (!p) return false;
    p->special = special;
    p->n = n;
    for (unsigned i = 0; i < n; i++) {
        plan_field *f = &p->fields[i];
        f->index = index[i];
        f->key = quoted_key(json_names[i], &f->key_len);
        f->proto_key = quoted_key(ci->fields[index[i]].name, &f->proto_key_len);
        if (!f->key || !f->proto_key) return false; /* out of memory at load: the plan leaks, unused */
    }
    st_insert(plans, (st_data_t)ci, (st_data_t)p);
    return true;
}

const flowctl_json_plan *
flowctl_json_plan_of(const flowctl_class *ci)
{
    st_data_t p;
    return st_lookup(plans, (st_data_t)ci, &p) ? (const flowctl_json_plan *)p : NULL;
}

/* ---- scalars -------------------------------------------------------------- */

/* A String fit for a JSON string: UTF-8 and valid, or all ASCII in an ASCII-compatible encoding. */
static bool
plain_string(VALUE v)
{
    if (!RB_TYPE_P(v, T_STRING)) return false;
    int cr = rb_enc_str_coderange(v);
    if (ENCODING_GET(v) == rb_utf8_encindex()) return cr != ENC_CODERANGE_BROKEN;
    return cr == ENC_CODERANGE_7BIT && rb_enc_asciicompat(rb_enc_get(v));
}

/* An Integer of the field's type and in its range, as 64 bits. */
static bool
int_of(VALUE v, int type, int64_t *out)
{
    switch (type) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32: case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_ENUM:
        if (!FIXNUM_P(v) || FIX2LONG(v) < INT32_MIN || FIX2LONG(v) > INT32_MAX) return false;
        *out = FIX2LONG(v);
        return true;
    case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_FIXED32:
        if (!FIXNUM_P(v) || FIX2LONG(v) < 0 || FIX2LONG(v) > (long)UINT32_MAX) return false;
        *out = FIX2LONG(v);
        return true;
    case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64: {
        if (FIXNUM_P(v)) { *out = FIX2LONG(v); return *out >= 0; }
        if (!RB_TYPE_P(v, T_BIGNUM)) return false;
        int sign = rb_integer_pack(v, out, 1, sizeof(*out), 0, INTEGER_PACK_LSWORD_FIRST | INTEGER_PACK_NATIVE_BYTE_ORDER);
        return sign == 1;
    }
    default: { /* int64, sint64, sfixed64 */
        if (FIXNUM_P(v)) { *out = FIX2LONG(v); return true; }
        if (!RB_TYPE_P(v, T_BIGNUM)) return false;
        int sign = rb_integer_pack(v, out, 1, sizeof(*out), 0, INTEGER_PACK_LSWORD_FIRST | INTEGER_PACK_NATIVE_BYTE_ORDER | INTEGER_PACK_2COMP);
        return sign == 1 || sign == -1;
    }
    }
}

static bool
is_64bit(int type)
{
    switch (type) {
    case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64: case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64: return true;
    default: return false;
    }
}

static bool
is_unsigned(int type)
{
    return type == PROTOBUF_C_TYPE_UINT32 || type == PROTOBUF_C_TYPE_FIXED32 || type == PROTOBUF_C_TYPE_UINT64 ||
           type == PROTOBUF_C_TYPE_FIXED64;
}

/* The value of an enum field as its number, or false when Ruby must look at it. */
static bool
enum_number(const ProtobufCEnumDescriptor *ed, VALUE v, int32_t *out)
{
    if (SYMBOL_P(v)) {
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value_by_name(ed, rb_id2name(SYM2ID(v)));
        if (!ev) return false;
        *out = ev->value;
        return true;
    }
    int64_t n;
    if (!int_of(v, PROTOBUF_C_TYPE_ENUM, &n)) return false;
    *out = (int32_t)n;
    return true;
}

/* The name of a number; NULL for an unknown one, or when several names share it (the
 * Ruby layer knows which was declared first). */
static const char *
enum_name(const ProtobufCEnumDescriptor *ed, int32_t number, bool *ambiguous)
{
    unsigned same = 0;
    const char *name = NULL;
    for (unsigned i = 0; i < ed->n_values; i++) {
        if (ed->values[i].value != number) continue;
        if (same++ == 0) name = ed->values[i].name;
    }
    *ambiguous = same > 1;
    return name;
}

static flowctl_json_result
write_enum(jctx *c, const ProtobufCFieldDescriptor *fd, VALUE v)
{
    int32_t n;
    if (!enum_number(fd->descriptor, v, &n)) return JSON_FALLBACK;
    bool ambiguous = false;
    const char *name = (c->flags & FLOWCTL_JSON_ENUM_INTS) ? NULL : enum_name(fd->descriptor, n, &ambiguous);
    if (ambiguous) return JSON_FALLBACK;
    if (name) jb_string(c->b, name, strlen(name));
    else jb_int(c->b, n, false);
    return JSON_OK;
}

static flowctl_json_result
write_time(jctx *c, VALUE t)
{
    if (!rb_obj_is_kind_of(t, rb_cTime)) return JSON_FALLBACK;
    struct timespec ts = rb_time_timespec(t);
    return jb_timestamp(c->b, ts.tv_sec, ts.tv_nsec) ? JSON_OK : JSON_FALLBACK;
}

/* One value of a field's element type (a singular field's, a list element, a map value). */
static flowctl_json_result
write_value(jctx *c, const flowctl_field *f, const ProtobufCFieldDescriptor *fd, VALUE v)
{
    switch (fd->type) {
    case PROTOBUF_C_TYPE_STRING:
        if (!plain_string(v)) return JSON_FALLBACK;
        jb_string(c->b, RSTRING_PTR(v), (size_t)RSTRING_LEN(v));
        return JSON_OK;
    case PROTOBUF_C_TYPE_BYTES:
        if (!RB_TYPE_P(v, T_STRING)) return JSON_FALLBACK;
        jb_base64(c->b, (const uint8_t *)RSTRING_PTR(v), (size_t)RSTRING_LEN(v));
        return JSON_OK;
    case PROTOBUF_C_TYPE_BOOL:
        if (v == Qtrue) jb_lit(c->b, "true");
        else if (v == Qfalse) jb_lit(c->b, "false");
        else return JSON_FALLBACK;
        return JSON_OK;
    case PROTOBUF_C_TYPE_DOUBLE: case PROTOBUF_C_TYPE_FLOAT: {
        double d;
        if (RB_FLOAT_TYPE_P(v)) d = RFLOAT_VALUE(v);
        else if (FIXNUM_P(v)) d = (double)FIX2LONG(v);
        else return JSON_FALLBACK;
        if (fd->type == PROTOBUF_C_TYPE_DOUBLE) jb_double(c->b, d);
        else jb_float(c->b, d);
        return JSON_OK;
    }
    case PROTOBUF_C_TYPE_ENUM: return write_enum(c, fd, v);
    case PROTOBUF_C_TYPE_MESSAGE: {
        if (f->timestamp) return write_time(c, v);
        const flowctl_class *sub = flowctl_class_of_desc(fd->descriptor);
        if (!sub || !rb_obj_is_kind_of(v, sub->klass)) return JSON_FALLBACK;
        return write_message(c, v);
    }
    default: {
        int64_t n;
        if (!int_of(v, fd->type, &n)) return JSON_FALLBACK;
        if (is_unsigned(fd->type)) jb_uint(c->b, (uint64_t)n, is_64bit(fd->type));
        else jb_int(c->b, n, is_64bit(fd->type));
        return JSON_OK;
    }
    }
}

/* ---- maps and lists ------------------------------------------------------- */

typedef struct {
    const flowctl_field *f;
    VALUE *pairs;      /* key, value, key, value, ... in the Hash's order */
    json_key *keys;    /* the bytes upb hashes */
    uint64_t *ints;    /* where integer keys' bytes are */
    size_t n;
    bool bad;          /* a key the field cannot hold */
} map_walk;

static void
key_bytes(map_walk *w, VALUE k)
{
    size_t i = w->n;
    const ProtobufCFieldDescriptor *kd = w->f->key;
    if (kd->type == PROTOBUF_C_TYPE_STRING) {
        if (!plain_string(k)) { w->bad = true; return; }
        w->keys[i] = (json_key){RSTRING_PTR(k), (size_t)RSTRING_LEN(k)};
        return;
    }
    if (kd->type == PROTOBUF_C_TYPE_BOOL) {
        if (k != Qtrue && k != Qfalse) { w->bad = true; return; }
        bool b = k == Qtrue;
        memcpy(&w->ints[i], &b, 1);
        w->keys[i] = (json_key){(const char *)&w->ints[i], 1};
        return;
    }
    int64_t n;
    if (!int_of(k, kd->type, &n)) { w->bad = true; return; }
    if (is_64bit(kd->type)) {
        memcpy(&w->ints[i], &n, 8);
        w->keys[i] = (json_key){(const char *)&w->ints[i], 8};
    } else {
        uint32_t x = (uint32_t)n;
        memcpy(&w->ints[i], &x, 4);
        w->keys[i] = (json_key){(const char *)&w->ints[i], 4};
    }
}

static int
map_collect(st_data_t k, st_data_t v, st_data_t arg)
{
    map_walk *w = (map_walk *)arg;
    key_bytes(w, (VALUE)k);
    if (w->bad) return ST_STOP;
    w->pairs[2 * w->n] = (VALUE)k;
    w->pairs[2 * w->n + 1] = (VALUE)v;
    w->n++;
    return ST_CONTINUE;
}

static void
write_key(jctx *c, const ProtobufCFieldDescriptor *kd, VALUE k)
{
    if (kd->type == PROTOBUF_C_TYPE_STRING) {
        jb_string(c->b, RSTRING_PTR(k), (size_t)RSTRING_LEN(k));
    } else if (kd->type == PROTOBUF_C_TYPE_BOOL) {
        k == Qtrue ? jb_lit(c->b, "\"true\"") : jb_lit(c->b, "\"false\"");
    } else {
        int64_t n;
        int_of(k, kd->type, &n); /* checked by key_bytes */
        if (is_unsigned(kd->type)) jb_uint(c->b, (uint64_t)n, true);
        else jb_int(c->b, n, true);
    }
}

/* The entries in the order google-protobuf prints them (json_order.c). */
static flowctl_json_result
write_entries(jctx *c, const flowctl_field *f, const map_walk *w, size_t *order)
{
    if (!json_upb_map_order(w->keys, w->n, order)) return JSON_NO_MEMORY;
    jb_char(c->b, '{');
    for (size_t i = 0; i < w->n; i++) {
        if (i) jb_char(c->b, ',');
        write_key(c, f->key, w->pairs[2 * order[i]]);
        jb_char(c->b, ':');
        flowctl_json_result r = write_value(c, f, f->elem, w->pairs[2 * order[i] + 1]);
        if (r != JSON_OK) return r;
    }
    jb_char(c->b, '}');
    return JSON_OK;
}

static flowctl_json_result
write_map(jctx *c, const flowctl_field *f, VALUE h)
{
    if (NIL_P(h)) { jb_lit(c->b, "{}"); return JSON_OK; }
    if (!RB_TYPE_P(h, T_HASH)) return JSON_FALLBACK;
    size_t n = RHASH_SIZE(h);
    VALUE pairs_s[2 * MAP_STACK];
    json_key keys_s[MAP_STACK];
    uint64_t ints_s[MAP_STACK];
    size_t order_s[MAP_STACK];
    map_walk w = {.f = f, .pairs = pairs_s, .keys = keys_s, .ints = ints_s};
    size_t *order = order_s;
    if (n > MAP_STACK) {
        w.pairs = malloc(2 * n * sizeof(VALUE));
        w.keys = malloc(n * sizeof(json_key));
        w.ints = malloc(n * sizeof(uint64_t));
        order = malloc(n * sizeof(size_t));
    }
    flowctl_json_result r = JSON_NO_MEMORY;
    if (w.pairs && w.keys && w.ints && order) {
        flowctl_hash_each(h, map_collect, &w);
        r = w.bad ? JSON_FALLBACK : write_entries(c, f, &w, order);
    }
    if (n > MAP_STACK) {
        free(w.pairs);
        free(w.keys);
        free(w.ints);
        free(order);
    }
    return r;
}

static flowctl_json_result
write_list(jctx *c, const flowctl_field *f, VALUE a)
{
    if (NIL_P(a)) { jb_lit(c->b, "[]"); return JSON_OK; }
    if (!RB_TYPE_P(a, T_ARRAY)) return JSON_FALLBACK;
    jb_char(c->b, '[');
    for (long i = 0; i < RARRAY_LEN(a); i++) {
        if (i) jb_char(c->b, ',');
        flowctl_json_result r = write_value(c, f, f->elem, RARRAY_AREF(a, i));
        if (r != JSON_OK) return r;
    }
    jb_char(c->b, ']');
    return JSON_OK;
}

/* ---- messages -------------------------------------------------------------- */

/* Whether a field is printed (as encoder.rb's present?): set when it has presence,
 * else not at its default (-0.0 is not), everything with emit_defaults. */
static bool
present(const jctx *c, const flowctl_field *f, VALUE v)
{
    if (f->presence || f->oneof || (f->kind == FK_SINGULAR && f->elem->type == PROTOBUF_C_TYPE_MESSAGE))
        return !NIL_P(v);
    if (c->flags & FLOWCTL_JSON_EMIT_DEFAULTS) return true;
    if (f->kind == FK_MAP) return RB_TYPE_P(v, T_HASH) ? RHASH_SIZE(v) > 0 : !NIL_P(v);
    if (f->kind == FK_REPEATED) return RB_TYPE_P(v, T_ARRAY) ? RARRAY_LEN(v) > 0 : !NIL_P(v);
    if (RB_FLOAT_TYPE_P(v)) return RFLOAT_VALUE(v) != 0.0 || signbit(RFLOAT_VALUE(v));
    if (RB_TYPE_P(v, T_STRING)) return RSTRING_LEN(v) > 0;
    if (SYMBOL_P(v) && f->elem->type == PROTOBUF_C_TYPE_ENUM) {
        int32_t n;
        return !enum_number(f->elem->descriptor, v, &n) || n != 0;
    }
    return v != INT2FIX(0) && v != Qfalse && !NIL_P(v);
}

static flowctl_json_result
write_field(jctx *c, flowctl_msg *m, const flowctl_field *f, VALUE v)
{
    switch (f->kind) {
    case FK_MAP: return write_map(c, f, v);
    case FK_REPEATED: return write_list(c, f, v);
    default:
        if (f->ts_slot >= 0) {
            const struct timespec *ts = flowctl_msg_ts(m, f);
            return jb_timestamp(c->b, ts->tv_sec, ts->tv_nsec) ? JSON_OK : JSON_FALLBACK;
        }
        return write_value(c, f, f->elem, v);
    }
}

static flowctl_json_result
write_message(jctx *c, VALUE msg)
{
    flowctl_msg *m = flowctl_msg_get(msg); /* built, if it was decoded lazily */
    const flowctl_json_plan *p = flowctl_json_plan_of(m->ci);
    if (!p) {
        c->missing = m->ci;
        return JSON_NO_PLAN;
    }
    if (p->special || c->depth >= MAX_DEPTH) return JSON_FALLBACK;
    c->depth++;
    bool proto_names = (c->flags & FLOWCTL_JSON_PROTO_NAMES) != 0, first = true;
    jb_char(c->b, '{');
    for (unsigned i = 0; i < p->n; i++) {
        const plan_field *pf = &p->fields[i];
        const flowctl_field *f = &m->ci->fields[pf->index];
        VALUE v = m->vals[pf->index];
        if (!present(c, f, v)) continue;
        if (!first) jb_char(c->b, ',');
        first = false;
        if (proto_names) jb_put(c->b, pf->proto_key, pf->proto_key_len);
        else jb_put(c->b, pf->key, pf->key_len);
        flowctl_json_result r = write_field(c, m, f, v);
        if (r != JSON_OK) return r;
    }
    jb_char(c->b, '}');
    c->depth--;
    return c->b->failed ? JSON_NO_MEMORY : JSON_OK;
}

flowctl_json_result
flowctl_json_write(jbuf *b, VALUE msg, unsigned flags, const flowctl_class **missing)
{
    jctx c = {.b = b, .flags = flags};
    flowctl_json_result r = write_message(&c, msg);
    if (r == JSON_OK && b->failed) r = JSON_NO_MEMORY;
    *missing = c.missing;
    return r;
}

void
init_flowctl_json_write(void)
{
    plans = st_init_numtable();
}
