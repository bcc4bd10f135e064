/*
 * message.c — every message as a Ruby class, built from its protobuf-c descriptor: those
 * descriptor.c builds from descriptor sets (proto/ and users'), and protoc-c's for
 * google/protobuf/descriptor.proto itself (generated/registry.c): no C per message.
 *
 * Reading order: the class table (flowctl_class, built by define_messages), the
 * object (flowctl_msg: one VALUE per field), accessors, then the Ruby methods.
 * Values are checked and normalised by convert.c when set, so what a message holds
 * is always what its field accepts (containers are re-checked when encoded).
 */
#include "flowctl.h"
#include "wire.h"

VALUE cFlowctlMessage;
static st_table *class_by_desc;  /* descriptor -> flowctl_class */
static st_table *class_by_klass; /* pinned class VALUE -> flowctl_class */
static VALUE class_by_name;      /* full proto name -> class (pinned Hash) */
static VALUE empty_string, empty_bytes;
static VALUE empty_map, empty_list; /* what Message#peek gives for an absent map or list (frozen: nothing to change) */

/* ---- the object --------------------------------------------------------- */

static void
msg_mark(void *p)
{
    flowctl_msg *m = p;
    rb_gc_mark_movable(m->raw);
    for (unsigned i = 0; i < m->ci->n_fields; i++) rb_gc_mark_movable(m->vals[i]);
}

static void
msg_compact(void *p)
{
    flowctl_msg *m = p;
    m->raw = rb_gc_location(m->raw);
    for (unsigned i = 0; i < m->ci->n_fields; i++) m->vals[i] = rb_gc_location(m->vals[i]);
}

static size_t
msg_size(const flowctl_class *ci)
{
    return sizeof(flowctl_msg) + ci->n_fields * sizeof(VALUE) + ci->n_ts * sizeof(struct timespec);
}

static size_t
msg_memsize(const void *p)
{
    return msg_size(((const flowctl_msg *)p)->ci);
}

static const rb_data_type_t msg_type = {
    .wrap_struct_name = "Flowctl::Message",
    .function = {.dmark = msg_mark, .dfree = RUBY_TYPED_DEFAULT_FREE, .dsize = msg_memsize,
                 .dcompact = msg_compact},
    /* FROZEN_SHAREABLE: a frozen message (its maps, lists and nested messages frozen with
     * it) may be shared between Ractors (Ractor.make_shareable). */
    .flags = RUBY_TYPED_FREE_IMMEDIATELY | RUBY_TYPED_WB_PROTECTED | RUBY_TYPED_FROZEN_SHAREABLE,
};

VALUE
flowctl_field_default(const flowctl_field *f)
{
    if (f->kind != FK_SINGULAR || f->presence) return Qnil;
    switch (f->fd->type) {
    case PROTOBUF_C_TYPE_STRING: return empty_string;
    case PROTOBUF_C_TYPE_BYTES: return empty_bytes;
    case PROTOBUF_C_TYPE_MESSAGE: return Qnil;
    case PROTOBUF_C_TYPE_BOOL: return Qfalse;
    case PROTOBUF_C_TYPE_FLOAT:
    case PROTOBUF_C_TYPE_DOUBLE: return DBL2NUM(0.0);
    case PROTOBUF_C_TYPE_ENUM: {
        const ProtobufCEnumDescriptor *ed = f->fd->descriptor;
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(ed, 0);
        return ev ? ID2SYM(rb_intern(ev->name)) : INT2FIX(0);
    }
    default: return INT2FIX(0);
    }
}

static VALUE
msg_alloc_ci(VALUE klass, const flowctl_class *ci)
{
    VALUE obj = rb_data_typed_object_zalloc(klass, msg_size(ci), &msg_type);
    flowctl_msg *m = RTYPEDDATA_DATA(obj);
    m->ci = ci;
    for (unsigned i = 0; i < ci->n_fields; i++) m->vals[i] = flowctl_field_default(&ci->fields[i]);
    return obj;
}

const flowctl_class *
flowctl_class_of(VALUE klass)
{
    st_data_t ci;
    for (VALUE k = klass; RTEST(k) && k != cFlowctlMessage; k = rb_class_superclass(k)) {
        if (st_lookup(class_by_klass, (st_data_t)k, &ci)) return (const flowctl_class *)ci;
    }
    return NULL;
}

static const flowctl_class *
class_of_checked(VALUE klass)
{
    const flowctl_class *ci = flowctl_class_of(klass);
    if (!ci) rb_raise(rb_eTypeError, "%"PRIsVALUE" is not a generated message class", klass);
    return ci;
}

static VALUE
msg_alloc(VALUE klass)
{
    return msg_alloc_ci(klass, class_of_checked(klass));
}

VALUE
flowctl_msg_new(const flowctl_class *ci)
{
    return msg_alloc_ci(ci->klass, ci);
}

/* A lazily decoded message's fields, built from its checked bytes (no DecodeError can
 * come: flowctl_message_decode_own checked them). raw goes first, so that the decoder's
 * own flowctl_msg_get finds the message built. */
static void
msg_build(VALUE msg, flowctl_msg *m)
{
    VALUE raw = m->raw;
    m->raw = Qfalse;
    flowctl_decode_from(m->ci, msg, raw); /* a large bytes field shares raw */
    RB_GC_GUARD(raw);
}

/* The message's struct, its fields built: every reader and writer of fields comes here. */
flowctl_msg *
flowctl_msg_get(VALUE msg)
{
    flowctl_msg *m = rb_check_typeddata(msg, &msg_type);
    if (RB_UNLIKELY(m->raw)) msg_build(msg, m);
    return m;
}

const flowctl_class *
flowctl_class_of_desc(const ProtobufCMessageDescriptor *desc)
{
    st_data_t ci;
    return st_lookup(class_by_desc, (st_data_t)desc, &ci) ? (const flowctl_class *)ci : NULL;
}

/* ---- field access ------------------------------------------------------- */

static VALUE
field_get(VALUE self, unsigned i)
{
    flowctl_msg *m = flowctl_msg_get(self);
    VALUE v = m->vals[i];
    if (NIL_P(v) && m->ci->fields[i].kind != FK_SINGULAR) {
        /* an empty map or list is built when first read, so that it can be filled in place */
        v = m->ci->fields[i].kind == FK_MAP ? rb_hash_new() : rb_ary_new();
        if (RB_OBJ_FROZEN(self)) return rb_obj_freeze(v);
        RB_OBJ_WRITE(self, &m->vals[i], v);
    }
    return v;
}

static VALUE
field_set(VALUE self, unsigned i, VALUE v)
{
    rb_check_frozen(self);
    flowctl_msg *m = flowctl_msg_get(self);
    const flowctl_field *f = &m->ci->fields[i];
    v = flowctl_convert_field(m->ci, f, v);
    if (f->ts_slot >= 0 && !NIL_P(v)) *flowctl_msg_ts(m, f) = rb_time_timespec(v);
    RB_OBJ_WRITE(self, &m->vals[i], v);
    if (f->oneof && !NIL_P(v)) flowctl_msg_clear_oneof(self, m, i);
    return v;
}

void
flowctl_msg_put(VALUE msg, unsigned i, VALUE v)
{
    flowctl_msg *m = flowctl_msg_get(msg);
    const flowctl_field *f = &m->ci->fields[i];
    if (f->ts_slot >= 0) *flowctl_msg_ts(m, f) = rb_time_timespec(v);
    RB_OBJ_WRITE(msg, &m->vals[i], v);
    if (f->oneof) flowctl_msg_clear_oneof(msg, m, i);
}

void
flowctl_msg_clear_oneof(VALUE msg, flowctl_msg *m, unsigned i)
{
    const flowctl_class *ci = m->ci;
    for (unsigned j = 0; j < ci->n_fields; j++)
        if (j != i && ci->fields[j].oneof == ci->fields[i].oneof) RB_OBJ_WRITE(msg, &m->vals[j], Qnil);
}

/* One getter and one setter per field index, so an accessor call needs no lookup. The
 * indexes are octal literals (b##i: 00..07, 010..017, ...), eight to a group. */
#define ACCESSORS(i) \
    static VALUE get_##i(VALUE self) { return field_get(self, i); } \
    static VALUE set_##i(VALUE self, VALUE v) { return field_set(self, i, v); }
#define ACCESSORS8(b) ACCESSORS(b##0) ACCESSORS(b##1) ACCESSORS(b##2) ACCESSORS(b##3) \
    ACCESSORS(b##4) ACCESSORS(b##5) ACCESSORS(b##6) ACCESSORS(b##7)
ACCESSORS8(0) ACCESSORS8(01) ACCESSORS8(02) ACCESSORS8(03)
#define ENTRY(i) {get_##i, set_##i}
#define ENTRY8(b) ENTRY(b##0), ENTRY(b##1), ENTRY(b##2), ENTRY(b##3), ENTRY(b##4), ENTRY(b##5), \
    ENTRY(b##6), ENTRY(b##7)
static const struct {
    VALUE (*get)(VALUE);
    VALUE (*set)(VALUE, VALUE);
} fast_accessors[] = {ENTRY8(0), ENTRY8(01), ENTRY8(02), ENTRY8(03)};
#define N_FAST ((unsigned)(sizeof(fast_accessors) / sizeof(fast_accessors[0])))

/* The ID of a field name given as Symbol or String, 0 when no field can have it (a
 * String with broken contents is such a name, not an EncodingError). */
static ID
name_id(VALUE name)
{
    if (RB_TYPE_P(name, T_STRING) && rb_enc_str_coderange(name) == ENC_CODERANGE_BROKEN) return 0;
    return SYMBOL_P(name) || RB_TYPE_P(name, T_STRING) ? rb_check_id(&name) : 0;
}

static unsigned
field_index(const flowctl_class *ci, VALUE name)
{
    st_data_t i;
    ID id = name_id(name);
    if (!SYMBOL_P(name) && !RB_TYPE_P(name, T_STRING))
        rb_raise(rb_eTypeError, "field names are Symbols or Strings (given %"PRIsVALUE")", rb_obj_class(name));
    if (!id || !st_lookup(ci->by_name, (st_data_t)id, &i))
        rb_raise(rb_eArgError, "unknown field %+"PRIsVALUE" for %"PRIsVALUE, name, ci->klass);
    return (unsigned)i;
}

/* Accessors past the 32 fast ones find their field from the name they were called by. */
static VALUE
slow_get(VALUE self)
{
    const flowctl_class *ci = flowctl_msg_get(self)->ci;
    return field_get(self, field_index(ci, ID2SYM(rb_frame_this_func())));
}

static VALUE
slow_set(VALUE self, VALUE v)
{
    const flowctl_class *ci = flowctl_msg_get(self)->ci;
    VALUE name = rb_id2str(rb_frame_this_func());
    return field_set(self, field_index(ci, rb_str_substr(name, 0, RSTRING_LEN(name) - 1)), v);
}

/* ---- Ruby methods ------------------------------------------------------- */

struct init_arg {
    VALUE self;
    const flowctl_class *ci;
};

static int
init_each(VALUE key, VALUE val, VALUE p)
{
    struct init_arg *a = (struct init_arg *)p;
    st_data_t i;
    ID id = name_id(key);
    if (!id || !st_lookup(a->ci->by_name, (st_data_t)id, &i)) {
        if (!SYMBOL_P(key) && !RB_TYPE_P(key, T_STRING))
            rb_raise(rb_eTypeError, "%"PRIsVALUE".new takes field names as keys (given %"PRIsVALUE")",
                     a->ci->klass, rb_obj_class(key));
        rb_raise(rb_eArgError, "unknown field %+"PRIsVALUE" for %"PRIsVALUE" (fields: %"PRIsVALUE")",
                 key, a->ci->klass, rb_funcall(rb_funcall(a->ci->klass, rb_intern("fields"), 0), rb_intern("inspect"), 0));
    }
    field_set(a->self, (unsigned)i, val);
    return ST_CONTINUE;
}

/*
 * call-seq:
 *   Klass.new(field: value, ...)  -> message
 *   Klass.new(hash)               -> message
 *
 * Unknown fields raise ArgumentError; values of the wrong type raise TypeError
 * naming the class and the field.
 */
static VALUE
msg_initialize(int argc, VALUE *argv, VALUE self)
{
    flowctl_msg *m = flowctl_msg_get(self);
    if (argc == 0) return self;
    if (argc > 1) rb_error_arity(argc, 0, 1);
    VALUE h = argv[0];
    if (NIL_P(h)) return self;
    if (!RB_TYPE_P(h, T_HASH))
        rb_raise(rb_eTypeError, "%"PRIsVALUE".new takes keywords or a Hash (given %"PRIsVALUE")",
                 m->ci->klass, rb_obj_class(h));
    struct init_arg a = {self, m->ci};
    rb_hash_foreach(h, init_each, (VALUE)&a);
    return self;
}

/* call-seq: msg[:field] -> value */
static VALUE
msg_aref(VALUE self, VALUE name)
{
    return field_get(self, field_index(flowctl_msg_get(self)->ci, name));
}

/* call-seq: msg[:field] = value */
static VALUE
msg_aset(VALUE self, VALUE name, VALUE v)
{
    return field_set(self, field_index(flowctl_msg_get(self)->ci, name), v);
}

/* The fields of a lazy message's raw that decide field i: its own occurrences and, for a
 * member of a oneof, those of the other members (the last one set wins). */
static bool
peek_decides(const flowctl_class *ci, unsigned i, uint32_t number)
{
    const flowctl_field *f = &ci->fields[i];
    if (f->fd->id == number) return true;
    if (!f->oneof) return false;
    for (unsigned k = 0; k < ci->n_fields; k++)
        if (ci->fields[k].fd->id == number) return ci->fields[k].oneof == f->oneof;
    return false;
}

/*
 * call-seq: msg.peek(:field) -> value
 *
 * The field's value, as msg[:field] gives it, without building the rest of a message that
 * was decoded lazily (a large one, not touched yet): only the bytes of that field are
 * decoded, into a value of its own (changing it does not change the message; an absent
 * map or list is a frozen empty one), and the message stays as it came, so that writing
 * it to a stream sends those bytes again without encoding anything. For a message
 * already built it is msg[:field].
 */
static VALUE
msg_peek(VALUE self, VALUE name)
{
    flowctl_msg *m = rb_check_typeddata(self, &msg_type);
    const flowctl_class *ci = m->ci;
    unsigned i = field_index(ci, name);
    VALUE raw = m->raw;
    if (!RTEST(raw)) return field_get(self, i);
    const uint8_t *p = (const uint8_t *)RSTRING_PTR(raw), *end = p + RSTRING_LEN(raw);
    const uint8_t *one = NULL;
    size_t one_len = 0, pieces = 0;
    VALUE joined = Qnil; /* two pieces or more: all of them in their order */
    wire_field last = {0};
    bool all_len = true;
    for (const uint8_t *q = p; q < end;) {
        const uint8_t *at = q;
        wire_field wf;
        if (!wire_next(&q, end, &wf)) return field_get(self, i); /* a group: the decoder's way */
        if (!peek_decides(ci, i, wf.number)) continue;
        if (pieces++ == 0) {
            one = at;
            one_len = (size_t)(q - at);
        } else {
            if (NIL_P(joined)) joined = rb_str_new((const char *)one, (long)one_len);
            rb_str_cat(joined, (const char *)at, q - at);
        }
        last = wf;
        all_len = all_len && wf.wt == WT_LEN;
    }
    const flowctl_field *f = &ci->fields[i];
    if (pieces == 0) return f->kind == FK_MAP ? empty_map : f->kind == FK_REPEATED ? empty_list : flowctl_field_default(f);
    if (f->kind == FK_SINGULAR && !f->oneof && all_len && f->fd->type == PROTOBUF_C_TYPE_STRING) /* the last one wins */
        return rb_obj_freeze(rb_utf8_str_new((const char *)last.p, (long)last.len)); /* raw was checked: valid UTF-8 */
    if (!NIL_P(joined)) {
        one = (const uint8_t *)RSTRING_PTR(joined);
        one_len = (size_t)RSTRING_LEN(joined);
    }
    VALUE tmp = msg_alloc_ci(ci->klass, ci);
    flowctl_decode_into(ci, tmp, one, one_len);
    RB_GC_GUARD(raw);
    RB_GC_GUARD(joined);
    return field_get(tmp, i);
}

/* The wire bytes a lazily decoded message came from (a frozen String), or Qnil once it
 * was built: nothing in it can have changed, so they are its encoding. */
VALUE
flowctl_msg_lazy_bytes(VALUE msg)
{
    flowctl_msg *m = rb_check_typeddata(msg, &msg_type);
    return RTEST(m->raw) ? m->raw : Qnil;
}

/* call-seq: msg.to_proto -> String (binary, the protobuf wire format) */
static VALUE
msg_to_proto(VALUE self)
{
    return flowctl_message_encode(self);
}

VALUE
flowctl_message_encode(VALUE msg)
{
    flowctl_msg *m = flowctl_msg_get(msg);
    return flowctl_encode(m->ci, msg);
}

VALUE
flowctl_message_decode(VALUE klass, const uint8_t *data, size_t len)
{
    const flowctl_class *ci = class_of_checked(klass);
    VALUE msg = msg_alloc_ci(klass, ci);
    flowctl_decode_into(ci, msg, data, len);
    return msg;
}

VALUE
flowctl_message_decode_own(VALUE klass, VALUE str)
{
    const uint8_t *p = (const uint8_t *)RSTRING_PTR(str);
    size_t len = (size_t)RSTRING_LEN(str);
    if (len < FLOWCTL_LAZY_MIN) return flowctl_message_decode(klass, p, len);
    const flowctl_class *ci = class_of_checked(klass);
    flowctl_decode_check(ci, p, len);
    VALUE msg = msg_alloc_ci(klass, ci);
    flowctl_msg *m = RTYPEDDATA_DATA(msg);
    RB_OBJ_WRITE(msg, &m->raw, str);
    return msg;
}

/*
 * call-seq: Klass.decode(string) -> message
 *
 * Raises Flowctl::DecodeError when string is not a valid encoding of Klass.
 */
static VALUE
msg_s_decode(VALUE klass, VALUE str)
{
    StringValue(str);
    const uint8_t *p = (const uint8_t *)RSTRING_PTR(str);
    long len = RSTRING_LEN(str);
    if (len < FLOWCTL_LAZY_MIN) {
        VALUE msg = flowctl_message_decode(klass, p, (size_t)len);
        RB_GC_GUARD(str);
        return msg;
    }
    /* kept lazily: a copy of its own (sharing str could keep a larger buffer str is a slice of alive) */
    return flowctl_message_decode_own(klass, rb_obj_freeze(rb_str_new((const char *)p, len)));
}

static VALUE
msg_s_encode(VALUE klass, VALUE msg)
{
    if (!rb_obj_is_kind_of(msg, klass))
        rb_raise(rb_eTypeError, "%"PRIsVALUE".encode needs a %"PRIsVALUE" (given %"PRIsVALUE")",
                 klass, klass, rb_obj_class(msg));
    return flowctl_message_encode(msg);
}

/* call-seq: Klass.fields -> [Symbol, ...] in declaration order */
static VALUE
msg_s_fields(VALUE klass)
{
    const flowctl_class *ci = class_of_checked(klass);
    VALUE ary = rb_ary_new_capa(ci->n_fields);
    for (unsigned i = 0; i < ci->n_fields; i++) rb_ary_push(ary, ci->fields[i].sym);
    return ary;
}

/* call-seq: Klass.descriptor_name -> "obsrvr.flow.controlplane.RegisterProcessorRequest" */
static VALUE
msg_s_descriptor_name(VALUE klass)
{
    return rb_str_new_cstr(class_of_checked(klass)->desc->name);
}

static VALUE
value_to_h(VALUE v)
{
    if (rb_typeddata_is_kind_of(v, &msg_type)) return rb_funcall(v, rb_intern("to_h"), 0);
    return v;
}

static int
map_to_h_each(VALUE k, VALUE v, VALUE h)
{
    rb_hash_aset(h, k, value_to_h(v));
    return ST_CONTINUE;
}

/* call-seq: msg.to_h -> Hash with Symbol keys (nested messages as Hashes, timestamps as Time) */
static VALUE
msg_to_h(VALUE self)
{
    flowctl_msg *m = flowctl_msg_get(self);
    VALUE h = rb_hash_new();
    for (unsigned i = 0; i < m->ci->n_fields; i++) {
        const flowctl_field *f = &m->ci->fields[i];
        VALUE v = m->vals[i], out;
        if (f->kind == FK_MAP) {
            out = rb_hash_new();
            if (!NIL_P(v)) rb_hash_foreach(v, map_to_h_each, out);
        } else if (f->kind == FK_REPEATED) {
            out = rb_ary_new();
            for (long j = 0; !NIL_P(v) && j < RARRAY_LEN(v); j++) rb_ary_push(out, value_to_h(RARRAY_AREF(v, j)));
        } else {
            out = value_to_h(v);
        }
        rb_hash_aset(h, f->sym, out);
    }
    return h;
}

static VALUE
container_or_empty(const flowctl_field *f, VALUE v)
{
    if (!NIL_P(v) || f->kind == FK_SINGULAR) return v;
    return f->kind == FK_MAP ? rb_hash_new() : rb_ary_new();
}

/* call-seq: msg == other -> true or false (same class, same field values) */
static VALUE
msg_equal(VALUE self, VALUE other)
{
    if (self == other) return Qtrue;
    if (!rb_typeddata_is_kind_of(other, &msg_type)) return Qfalse;
    flowctl_msg *a = flowctl_msg_get(self), *b = flowctl_msg_get(other);
    if (a->ci != b->ci) return Qfalse;
    for (unsigned i = 0; i < a->ci->n_fields; i++) {
        const flowctl_field *f = &a->ci->fields[i];
        VALUE x = a->vals[i], y = b->vals[i];
        if (x == y) continue;
        if (f->kind != FK_SINGULAR && (NIL_P(x) || NIL_P(y))) {
            VALUE present = NIL_P(x) ? y : x;
            if ((f->kind == FK_MAP ? (long)RHASH_SIZE(present) : RARRAY_LEN(present)) != 0) return Qfalse;
            continue;
        }
        if (!rb_equal(x, y)) return Qfalse;
    }
    return Qtrue;
}

/* call-seq: msg.hash -> Integer (consistent with ==) */
static VALUE
msg_hash(VALUE self)
{
    flowctl_msg *m = flowctl_msg_get(self);
    st_index_t h = rb_hash_start((st_index_t)(uintptr_t)m->ci);
    for (unsigned i = 0; i < m->ci->n_fields; i++) {
        VALUE v = container_or_empty(&m->ci->fields[i], m->vals[i]);
        h = rb_hash_uint(h, NUM2LONG(rb_hash(v)));
    }
    return ST2FIX(rb_hash_end(h));
}

/* call-seq: msg.inspect -> "#<Flowctl::... field: value, ...>" */
static VALUE
msg_inspect(VALUE self)
{
    flowctl_msg *m = flowctl_msg_get(self);
    VALUE s = rb_sprintf("#<%"PRIsVALUE, rb_class_name(rb_obj_class(self)));
    for (unsigned i = 0; i < m->ci->n_fields; i++) {
        const flowctl_field *f = &m->ci->fields[i];
        rb_str_catf(s, "%s %s: %"PRIsVALUE, i ? "," : "", f->name,
                    rb_inspect(container_or_empty(f, m->vals[i])));
    }
    return rb_str_cat_cstr(s, ">");
}

static int
map_copy_each(VALUE k, VALUE v, VALUE h)
{
    rb_hash_aset(h, k, rb_typeddata_is_kind_of(v, &msg_type) ? rb_obj_dup(v) : v);
    return ST_CONTINUE;
}

/* dup/clone: containers and nested messages are copied, scalars shared (they are frozen). */
static VALUE
msg_initialize_copy(VALUE self, VALUE orig)
{
    if (self == orig) return self;
    rb_check_frozen(self);
    flowctl_msg *dst = flowctl_msg_get(self), *src = flowctl_msg_get(orig);
    if (dst->ci != src->ci) rb_raise(rb_eTypeError, "initialize_copy should take same class object");
    for (unsigned i = 0; i < src->ci->n_fields; i++) {
        VALUE v = src->vals[i];
        switch (src->ci->fields[i].kind) {
        case FK_MAP:
            if (!NIL_P(v)) { VALUE h = rb_hash_new(); rb_hash_foreach(v, map_copy_each, h); v = h; }
            break;
        case FK_REPEATED:
            if (!NIL_P(v)) {
                VALUE a = rb_ary_new_capa(RARRAY_LEN(v));
                for (long j = 0; j < RARRAY_LEN(v); j++) {
                    VALUE e = RARRAY_AREF(v, j);
                    rb_ary_push(a, rb_typeddata_is_kind_of(e, &msg_type) ? rb_obj_dup(e) : e);
                }
                v = a;
            }
            break;
        default:
            if (rb_typeddata_is_kind_of(v, &msg_type)) v = rb_obj_dup(v);
        }
        RB_OBJ_WRITE(self, &dst->vals[i], v);
    }
    memcpy(dst->vals + dst->ci->n_fields, src->vals + src->ci->n_fields, src->ci->n_ts * sizeof(struct timespec));
    return self;
}

static int
map_freeze_each(VALUE k, VALUE v, VALUE unused)
{
    if (rb_typeddata_is_kind_of(v, &msg_type)) rb_funcall(v, rb_intern("freeze"), 0);
    return ST_CONTINUE;
}

/* call-seq: msg.freeze -> msg (with its maps, lists and nested messages) */
static VALUE
msg_freeze(VALUE self)
{
    if (RB_OBJ_FROZEN(self)) return self;
    flowctl_msg *m = flowctl_msg_get(self);
    for (unsigned i = 0; i < m->ci->n_fields; i++) {
        VALUE v = m->vals[i];
        if (NIL_P(v)) continue;
        if (RB_TYPE_P(v, T_HASH)) {
            rb_hash_foreach(v, map_freeze_each, Qnil);
            rb_obj_freeze(v);
        } else if (RB_TYPE_P(v, T_ARRAY)) {
            for (long j = 0; j < RARRAY_LEN(v); j++) map_freeze_each(Qnil, RARRAY_AREF(v, j), Qnil);
            rb_obj_freeze(v);
        } else if (rb_typeddata_is_kind_of(v, &msg_type)) {
            rb_funcall(v, rb_intern("freeze"), 0);
        }
    }
    return rb_obj_freeze(self);
}

/* ---- building the classes ------------------------------------------------ */

bool
flowctl_desc_is_map_entry(const ProtobufCMessageDescriptor *d)
{
    size_t n = strlen(d->short_name);
    return n > 5 && strcmp(d->short_name + n - 5, "Entry") == 0 && d->n_fields == 2 &&
           d->fields[0].id == 1 && d->fields[1].id == 2 && strcmp(d->fields[0].name, "key") == 0 &&
           strcmp(d->fields[1].name, "value") == 0 && strchr(d->name + strlen(d->package_name) + 1, '.');
}

bool
flowctl_field_is_timestamp(const ProtobufCFieldDescriptor *fd)
{
    return fd->type == PROTOBUF_C_TYPE_MESSAGE &&
           strcmp(((const ProtobufCMessageDescriptor *)fd->descriptor)->name, "google.protobuf.Timestamp") == 0;
}

static void
build_field(flowctl_field *f, const ProtobufCFieldDescriptor *fd)
{
    f->fd = f->elem = fd;
    f->kind = fd->label == PROTOBUF_C_LABEL_REPEATED ? FK_REPEATED : FK_SINGULAR;
    if (f->kind == FK_REPEATED && fd->type == PROTOBUF_C_TYPE_MESSAGE && flowctl_desc_is_map_entry(fd->descriptor)) {
        const ProtobufCMessageDescriptor *entry = fd->descriptor;
        f->kind = FK_MAP;
        f->key = &entry->fields[0];
        f->elem = &entry->fields[1];
    }
    f->packed = f->kind == FK_REPEATED && (fd->flags & PROTOBUF_C_FIELD_FLAG_PACKED) != 0;
    f->presence = fd->label == PROTOBUF_C_LABEL_OPTIONAL && fd->type != PROTOBUF_C_TYPE_MESSAGE;
    /* protoc-c gives a oneof's members one quantifier_offset (descriptor.c: the oneof's number) */
    f->oneof = (fd->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) ? fd->quantifier_offset + 1 : 0;
    f->timestamp = flowctl_field_is_timestamp(f->elem);
    f->sub_desc = f->elem->type == PROTOBUF_C_TYPE_MESSAGE && !f->timestamp ? f->elem->descriptor : NULL;
    f->name = fd->name;
    f->id = rb_intern(fd->name);
    f->sym = ID2SYM(f->id);
    f->ts_slot = -1;
    flowctl_field_tag(f);
}

static int
cmp_by_number(const void *a, const void *b, void *fields)
{
    const ProtobufCFieldDescriptor *fd = fields;
    uint32_t x = fd[*(const unsigned *)a].id, y = fd[*(const unsigned *)b].id;
    return (x > y) - (x < y);
}

static flowctl_class *
build_class(const ProtobufCMessageDescriptor *desc, VALUE klass)
{
    flowctl_class *ci = ruby_xcalloc(1, sizeof(*ci));
    ci->desc = desc;
    ci->klass = klass;
    ci->n_fields = desc->n_fields;
    ci->fields = ruby_xcalloc(desc->n_fields ? desc->n_fields : 1, sizeof(flowctl_field));
    ci->order = ruby_xcalloc(desc->n_fields ? desc->n_fields : 1, sizeof(unsigned));
    ci->by_name = st_init_numtable();
    for (unsigned i = 0; i < desc->n_fields; i++) {
        build_field(&ci->fields[i], &desc->fields[i]);
        if (ci->fields[i].timestamp && ci->fields[i].kind == FK_SINGULAR) ci->fields[i].ts_slot = (int)ci->n_ts++;
        ci->order[i] = i;
        st_insert(ci->by_name, (st_data_t)ci->fields[i].id, i);
    }
    qsort_r(ci->order, desc->n_fields, sizeof(unsigned), cmp_by_number, (void *)desc->fields);
    return ci;
}

static void
define_accessors(VALUE klass, const flowctl_class *ci)
{
    for (unsigned i = 0; i < ci->n_fields; i++) {
        const char *name = ci->fields[i].name;
        /* a field named like a method every message has (hash, freeze, ...) keeps the method:
         * it is read and written as msg[:hash], msg[:hash] = v, and by keyword */
        if (rb_method_boundp(cFlowctlMessage, rb_intern(name), 0)) continue;
        VALUE setter = rb_sprintf("%s=", name);
        if (i < N_FAST) {
            rb_define_method(klass, name, fast_accessors[i].get, 0);
            rb_define_method(klass, StringValueCStr(setter), fast_accessors[i].set, 1);
        } else {
            rb_define_method(klass, name, slow_get, 0);
            rb_define_method(klass, StringValueCStr(setter), slow_set, 1);
        }
    }
}

/* A class named const_name under outer (a package module, or the class of the message
 * that declares it) for a message descriptor. */
static VALUE
define_message_class(const ProtobufCMessageDescriptor *desc, VALUE outer, const char *const_name)
{
    VALUE klass = rb_define_class_under(outer, const_name, cFlowctlMessage);
    rb_gc_register_mark_object(klass);
    flowctl_class *ci = build_class(desc, klass);
    st_insert(class_by_desc, (st_data_t)desc, (st_data_t)ci);
    st_insert(class_by_klass, (st_data_t)klass, (st_data_t)ci);
    rb_hash_aset(class_by_name, rb_str_new_frozen(rb_str_new_cstr(desc->name)), klass);
    rb_define_alloc_func(klass, msg_alloc);
    define_accessors(klass, ci);
    return klass;
}

/* The module or class a nested name ("pkg.Outer.Inner") goes under, from its package module. */
static VALUE
outer_of(const char *full_name, const char *package, VALUE mod)
{
    const char *rest = full_name + strlen(package) + 1, *dot;
    while ((dot = strchr(rest, '.')) != NULL) {
        mod = rb_const_get_at(mod, rb_intern2(rest, dot - rest));
        rest = dot + 1;
    }
    return mod;
}

/* Enum module: constants per value plus .name(n), .value(name), .values, .descriptor_name. */
static VALUE
define_enum(const ProtobufCEnumDescriptor *ed, VALUE mod, const char *const_name)
{
    VALUE em = rb_define_module_under(mod, const_name);
    VALUE by_name = rb_hash_new(), by_number = rb_hash_new();
    for (unsigned i = 0; i < ed->n_values; i++) {
        const ProtobufCEnumValue *v = &ed->values[i];
        VALUE sym = ID2SYM(rb_intern(v->name));
        if (rb_is_const_id(rb_intern(v->name))) rb_define_const(em, v->name, INT2NUM(v->value));
        rb_hash_aset(by_name, sym, INT2NUM(v->value));
        if (NIL_P(rb_hash_lookup(by_number, INT2NUM(v->value)))) rb_hash_aset(by_number, INT2NUM(v->value), sym);
    }
    rb_ivar_set(em, rb_intern("@by_name"), rb_obj_freeze(by_name));
    rb_ivar_set(em, rb_intern("@by_number"), rb_obj_freeze(by_number));
    rb_ivar_set(em, rb_intern("@descriptor_name"), rb_str_new_frozen(rb_str_new_cstr(ed->name)));
    rb_extend_object(em, rb_const_get(mFlowctl, rb_intern("Enum")));
    return em;
}

/*
 * call-seq: Flowctl::Native.define_bootstrap(Flowctl::Protobuf)
 *
 * Defines the classes of google/protobuf/descriptor.proto from protoc-c's descriptors
 * (generated/registry.c: flowctl_bootstrap_*): the messages Flowctl::Descriptors reads a
 * descriptor set with. Every other message and enum comes from a descriptor set.
 */
static VALUE
native_define_bootstrap(VALUE mod, VALUE pm)
{
    for (const ProtobufCMessageDescriptor *const *d = flowctl_bootstrap_messages; *d; d++) {
        flowctl_descriptor_register((*d)->name, *d);
        if (!flowctl_desc_is_map_entry(*d)) define_message_class(*d, outer_of((*d)->name, (*d)->package_name, pm), (*d)->short_name);
    }
    for (const ProtobufCEnumDescriptor *const *e = flowctl_bootstrap_enums; *e; e++) {
        flowctl_descriptor_register((*e)->name, *e);
        define_enum(*e, outer_of((*e)->name, (*e)->package_name, pm), (*e)->short_name);
    }
    return Qnil;
}

static const void *
descriptor_checked(VALUE name, uint32_t magic)
{
    const void *d = flowctl_descriptor_lookup(StringValueCStr(name));
    if (!d || *(const uint32_t *)d != magic)
        rb_raise(rb_eArgError, "no %s descriptor %+"PRIsVALUE, magic == PROTOBUF_C__ENUM_DESCRIPTOR_MAGIC ?
                 "enum" : "message", name);
    return d;
}

/*
 * call-seq: Flowctl::Native.define_message("flowctl.v1.Event", Flowctl::V1, "Event") -> class
 *
 * The class of a built descriptor (descriptor.c), defined under outer as const_name (the
 * same class when it exists already).
 */
static VALUE
native_define_message(VALUE mod, VALUE name, VALUE outer, VALUE const_name)
{
    const ProtobufCMessageDescriptor *d = descriptor_checked(name, PROTOBUF_C__MESSAGE_DESCRIPTOR_MAGIC);
    const flowctl_class *ci = flowctl_class_of_desc(d);
    return ci ? ci->klass : define_message_class(d, outer, StringValueCStr(const_name));
}

/* call-seq: Flowctl::Native.define_enum("flowctl.v1.HealthStatus", Flowctl::V1, "HealthStatus") -> module */
static VALUE
native_define_enum(VALUE mod, VALUE name, VALUE outer, VALUE const_name)
{
    const ProtobufCEnumDescriptor *d = descriptor_checked(name, PROTOBUF_C__ENUM_DESCRIPTOR_MAGIC);
    return define_enum(d, outer, StringValueCStr(const_name));
}

/* call-seq: Flowctl::Native.message_class("obsrvr.flow.processor.DataMessage") -> class */
static VALUE
native_message_class(VALUE mod, VALUE name)
{
    VALUE k = rb_hash_lookup2(class_by_name, StringValue(name), Qundef);
    if (k == Qundef) rb_raise(rb_eArgError, "no message class for %+"PRIsVALUE, name);
    return k;
}

void
init_flowctl_message(void)
{
    class_by_desc = st_init_numtable();
    class_by_klass = st_init_numtable();
    class_by_name = rb_hash_new();
    rb_gc_register_mark_object(class_by_name);
    empty_string = rb_obj_freeze(rb_utf8_str_new("", 0));
    rb_gc_register_mark_object(empty_string);
    empty_bytes = rb_obj_freeze(rb_str_new("", 0));
    rb_gc_register_mark_object(empty_bytes);
    empty_map = rb_ractor_make_shareable(rb_hash_new());
    rb_gc_register_mark_object(empty_map);
    empty_list = rb_ractor_make_shareable(rb_ary_new());
    rb_gc_register_mark_object(empty_list);

    cFlowctlMessage = rb_define_class_under(mFlowctl, "Message", rb_cObject);
    rb_undef_alloc_func(cFlowctlMessage);
    /* A message's methods touch only the message, its class's field table (built before the
     * class is visible) and frozen shared defaults: any Ractor may call them. (Loading a
     * descriptor set, below, changes the lookup tables: main Ractor only.) */
    flowctl_ractor_safe(true);
    rb_define_method(cFlowctlMessage, "initialize", msg_initialize, -1);
    rb_define_method(cFlowctlMessage, "initialize_copy", msg_initialize_copy, 1);
    rb_define_method(cFlowctlMessage, "[]", msg_aref, 1);
    rb_define_method(cFlowctlMessage, "[]=", msg_aset, 2);
    rb_define_method(cFlowctlMessage, "peek", msg_peek, 1);
    rb_define_method(cFlowctlMessage, "to_proto", msg_to_proto, 0);
    rb_define_method(cFlowctlMessage, "to_h", msg_to_h, 0);
    rb_define_method(cFlowctlMessage, "==", msg_equal, 1);
    rb_define_method(cFlowctlMessage, "eql?", msg_equal, 1);
    rb_define_method(cFlowctlMessage, "hash", msg_hash, 0);
    rb_define_method(cFlowctlMessage, "inspect", msg_inspect, 0);
    rb_define_method(cFlowctlMessage, "freeze", msg_freeze, 0);
    rb_define_singleton_method(cFlowctlMessage, "decode", msg_s_decode, 1);
    rb_define_singleton_method(cFlowctlMessage, "encode", msg_s_encode, 1);
    rb_define_singleton_method(cFlowctlMessage, "fields", msg_s_fields, 0);
    rb_define_singleton_method(cFlowctlMessage, "descriptor_name", msg_s_descriptor_name, 0);
    flowctl_ractor_safe(false);

    rb_define_module_function(mFlowctlNative, "define_bootstrap", native_define_bootstrap, 1);
    rb_define_module_function(mFlowctlNative, "define_message", native_define_message, 3);
    rb_define_module_function(mFlowctlNative, "define_enum", native_define_enum, 3);
    rb_define_module_function(mFlowctlNative, "message_class", native_message_class, 1);
    init_flowctl_convert();
}
