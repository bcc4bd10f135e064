/*
 * relay_class.c — Flowctl::Native::Pending and Flowctl::Native::Relay: the Ruby binding of
 * relay.c (Native::Stream#relay, in call.c, runs the loop).
 *
 * Used by Flowctl::Pipeline::Router only:
 *   - a Pending is a reader's events written and not acknowledged (#push, #ack, #events,
 *     #take, #clear, #size, #unprotected) with the gate the relay writes through (#shut, #open);
 *   - a Relay is a producer's hop to its one reader: the reader's input types, the failure
 *     key, its counters (#read, #written, #dropped, readable while it runs on another
 *     thread) and, for a source, the last event it read (#last, its cursor).
 * Events come back as messages of the class given (decoded lazily from the bytes kept).
 */
#include "flowctl.h"

static VALUE cPending, cRelay;

/* ---- fields ------------------------------------------------------------------------ */

static uint32_t
field_number(const ProtobufCMessageDescriptor *desc, const char *name, ProtobufCType type, bool map)
{
    const ProtobufCFieldDescriptor *fd = protobuf_c_message_descriptor_get_field_by_name(desc, name);
    bool ok = fd && fd->type == type && (fd->label == PROTOBUF_C_LABEL_REPEATED) == map;
    if (!ok) rb_raise(rb_eArgError, "%s has no %s field %s", desc->name, map ? "map" : "string", name);
    return fd->id;
}

static const flowctl_class *
event_class(VALUE klass)
{
    const flowctl_class *ci = flowctl_class_of(klass);
    if (!ci) rb_raise(rb_eTypeError, "%"PRIsVALUE" is not a generated message class", klass);
    return ci;
}

/* ---- Pending ----------------------------------------------------------------------- */

typedef struct {
    flowctl_pending list;
    bool ready;
    VALUE klass;
    uint32_t id_field;
} pending_t;

static void
pending_mark(void *p)
{
    rb_gc_mark_movable(((pending_t *)p)->klass);
}

static void
pending_compact(void *p)
{
    pending_t *w = p;
    w->klass = rb_gc_location(w->klass);
}

static void
pending_free(void *p)
{
    pending_t *w = p;
    if (w->ready) flowctl_pending_free(&w->list);
    ruby_xfree(w);
}

static size_t
pending_memsize(const void *p)
{
    const pending_t *w = p;
    return sizeof(*w) + w->list.cap * sizeof(flowctl_pending_item) + w->list.index_cap * sizeof(flowctl_pending_slot);
}

static const rb_data_type_t pending_type = {
    .wrap_struct_name = "Flowctl::Native::Pending",
    .function = {.dmark = pending_mark, .dfree = pending_free, .dsize = pending_memsize, .dcompact = pending_compact},
    .flags = RUBY_TYPED_FREE_IMMEDIATELY,
};

static VALUE
pending_alloc(VALUE klass)
{
    pending_t *w;
    VALUE obj = TypedData_Make_Struct(klass, pending_t, &pending_type, w);
    w->klass = Qnil;
    return obj;
}

static pending_t *
pending_wrapper(VALUE self)
{
    pending_t *w = rb_check_typeddata(self, &pending_type);
    if (!w->ready) rb_raise(rb_eRuntimeError, "pending list not initialized");
    return w;
}

flowctl_pending *
flowctl_pending_get(VALUE pending)
{
    return &pending_wrapper(pending)->list;
}

/*
 * call-seq: Flowctl::Native::Pending.new(klass, limit, byte_limit = nil)
 *
 * An empty list of events of class klass (a message class with a string field id), at
 * most limit of them and byte_limit bytes (nil: no byte limit); its gate shut. Past a
 * limit the oldest are let go (#unprotected counts them); the newest is always kept.
 */
static VALUE
pending_initialize(int argc, VALUE *argv, VALUE self)
{
    VALUE klass, limit, byte_limit;
    rb_scan_args(argc, argv, "21", &klass, &limit, &byte_limit);
    pending_t *w = rb_check_typeddata(self, &pending_type);
    if (w->ready) rb_raise(rb_eRuntimeError, "pending list already initialized");
    const flowctl_class *ci = event_class(klass);
    long n = NUM2LONG(limit);
    if (n < 1) rb_raise(rb_eArgError, "limit must be positive (given %ld)", n);
    long bytes = NIL_P(byte_limit) ? 0 : NUM2LONG(byte_limit);
    if (!NIL_P(byte_limit) && bytes < 1) rb_raise(rb_eArgError, "byte_limit must be positive or nil (given %ld)", bytes);
    w->id_field = field_number(ci->desc, "id", PROTOBUF_C_TYPE_STRING, false);
    RB_OBJ_WRITE(self, &w->klass, klass);
    flowctl_pending_init(&w->list, (size_t)n, (size_t)bytes);
    w->ready = true;
    return self;
}

/* The id of an event's bytes (field w->id_field; empty when it has none). */
static void
id_of(const pending_t *w, const uint8_t *p, size_t len, const uint8_t **id, size_t *id_len)
{
    flowctl_relay_fields fs = {.id = w->id_field};
    flowctl_relay_event ev;
    flowctl_relay_scan(&fs, p, len, &ev);
    *id = ev.id;
    *id_len = ev.id_len;
}

/*
 * call-seq: pending.push(event) -> pending
 *
 * Remembers an event (a message of the list's class, or its bytes), whatever the gate.
 */
static VALUE
pending_push(VALUE self, VALUE event)
{
    pending_t *w = pending_wrapper(self);
    if (!RB_TYPE_P(event, T_STRING) && !rb_obj_is_kind_of(event, w->klass))
        rb_raise(rb_eTypeError, "expected a %"PRIsVALUE" or its bytes (given %"PRIsVALUE")", w->klass, rb_obj_class(event));
    grpc_byte_buffer *bb = flowctl_buffer_from_value(event);
    grpc_slice flat;
    const uint8_t *p, *id;
    size_t len, id_len;
    if (!flowctl_buffer_flat(bb, &flat, &p, &len)) {
        grpc_byte_buffer_destroy(bb);
        rb_raise(eFlowctlError, "gRPC could not read the event's bytes");
    }
    id_of(w, p, len, &id, &id_len);
    int rc = flowctl_pending_push(&w->list, bb, id, id_len, false, 0);
    grpc_slice_unref(flat);
    grpc_byte_buffer_destroy(bb);
    if (rc == PENDING_NOMEM) rb_raise(rb_eNoMemError, "flowctl: out of memory");
    RB_GC_GUARD(event);
    return self;
}

/*
 * call-seq: pending.ack(id) -> Integer
 *
 * Forgets the event with that id and every one before it; how many (0: none has it).
 */
static VALUE
pending_ack(VALUE self, VALUE id)
{
    pending_t *w = pending_wrapper(self);
    StringValue(id);
    size_t n = flowctl_pending_ack(&w->list, (const uint8_t *)RSTRING_PTR(id), (size_t)RSTRING_LEN(id));
    RB_GC_GUARD(id);
    return SIZET2NUM(n);
}

static VALUE
pending_size(VALUE self)
{
    return SIZET2NUM(flowctl_pending_count(&pending_wrapper(self)->list).len);
}

static VALUE
pending_clear(VALUE self)
{
    flowctl_pending_clear(&pending_wrapper(self)->list);
    return self;
}

struct decode_all {
    VALUE klass, ary;
    grpc_byte_buffer **bbs;
    size_t n, i;
};

static VALUE
decode_all_body(VALUE arg)
{
    struct decode_all *d = (struct decode_all *)arg;
    for (; d->i < d->n; d->i++) {
        grpc_byte_buffer *bb = d->bbs[d->i];
        d->bbs[d->i] = NULL;
        rb_ary_push(d->ary, flowctl_decode_buffer(d->klass, bb)); /* destroys bb */
    }
    return d->ary;
}

static VALUE
decode_all_cleanup(VALUE arg)
{
    struct decode_all *d = (struct decode_all *)arg;
    for (size_t i = 0; i < d->n; i++) {
        if (d->bbs[i]) grpc_byte_buffer_destroy(d->bbs[i]);
    }
    free(d->bbs);
    return Qnil;
}

static VALUE
pending_copy(VALUE self, bool take)
{
    pending_t *w = pending_wrapper(self);
    struct decode_all d = {.klass = w->klass};
    d.bbs = flowctl_pending_copy(&w->list, take, &d.n);
    if (!d.bbs) rb_raise(rb_eNoMemError, "flowctl: out of memory");
    d.ary = rb_ary_new_capa((long)d.n);
    return rb_ensure(decode_all_body, (VALUE)&d, decode_all_cleanup, (VALUE)&d);
}

/* call-seq: pending.events -> Array (oldest first; the list keeps them) */
static VALUE
pending_events(VALUE self)
{
    return pending_copy(self, false);
}

/* call-seq: pending.take -> Array (oldest first; the list is emptied) */
static VALUE
pending_take(VALUE self)
{
    return pending_copy(self, true);
}

/* call-seq: pending.bytes -> Integer (the bytes of the events kept) */
static VALUE
pending_bytes(VALUE self)
{
    return SIZET2NUM(flowctl_pending_count(&pending_wrapper(self)->list).bytes);
}

/* call-seq: pending.unprotected -> Integer (events let go past the limits) */
static VALUE
pending_unprotected(VALUE self)
{
    return ULL2NUM(flowctl_pending_count(&pending_wrapper(self)->list).unprotected);
}

/* call-seq: pending.shut -> nil (a relay's next event waits for #open) */
static VALUE
pending_shut(VALUE self)
{
    flowctl_pending_shut(&pending_wrapper(self)->list);
    return Qnil;
}

/* call-seq: pending.open -> Integer (the epoch a relay writes at) */
static VALUE
pending_open(VALUE self)
{
    return ULL2NUM(flowctl_pending_open(&pending_wrapper(self)->list));
}

/* ---- Relay ------------------------------------------------------------------------- */

typedef struct {
    flowctl_relay r;
    bool ready;
    VALUE klass;
} relay_t;

static void
relay_mark(void *p)
{
    rb_gc_mark_movable(((relay_t *)p)->klass);
}

static void
relay_compact(void *p)
{
    relay_t *w = p;
    w->klass = rb_gc_location(w->klass);
}

static void
relay_free(void *p)
{
    relay_t *w = p;
    flowctl_relay_free(&w->r);
    ruby_xfree(w);
}

static size_t
relay_memsize(const void *p)
{
    return sizeof(relay_t);
}

static const rb_data_type_t relay_type = {
    .wrap_struct_name = "Flowctl::Native::Relay",
    .function = {.dmark = relay_mark, .dfree = relay_free, .dsize = relay_memsize, .dcompact = relay_compact},
    .flags = RUBY_TYPED_FREE_IMMEDIATELY,
};

static VALUE
relay_alloc(VALUE klass)
{
    relay_t *w;
    VALUE obj = TypedData_Make_Struct(klass, relay_t, &relay_type, w);
    w->klass = Qnil;
    return obj;
}

static relay_t *
relay_wrapper(VALUE self)
{
    relay_t *w = rb_check_typeddata(self, &relay_type);
    if (!w->ready) rb_raise(rb_eRuntimeError, "relay not initialized");
    return w;
}

flowctl_relay *
flowctl_relay_get(VALUE relay)
{
    return &relay_wrapper(relay)->r;
}

VALUE
flowctl_relay_message_class(VALUE relay)
{
    return relay_wrapper(relay)->klass;
}

/*
 * call-seq: Flowctl::Native::Relay.new(klass, types, failure_key)
 *
 * A hop for events of class klass (string fields id and type, a map<string, string>
 * metadata) to a reader that takes the types given (an Array of Strings; empty: every
 * type); an event whose metadata has failure_key goes back to Ruby.
 */
static VALUE
relay_initialize(VALUE self, VALUE klass, VALUE types, VALUE failure_key)
{
    relay_t *w = rb_check_typeddata(self, &relay_type);
    if (w->ready) rb_raise(rb_eRuntimeError, "relay already initialized");
    const flowctl_class *ci = event_class(klass);
    Check_Type(types, T_ARRAY);
    StringValue(failure_key);
    flowctl_relay_fields fs = {
        .id = field_number(ci->desc, "id", PROTOBUF_C_TYPE_STRING, false),
        .type = field_number(ci->desc, "type", PROTOBUF_C_TYPE_STRING, false),
        .metadata = field_number(ci->desc, "metadata", PROTOBUF_C_TYPE_MESSAGE, true),
    };
    long key_len = RSTRING_LEN(failure_key);
    if (key_len < 1 || (size_t)key_len >= sizeof(fs.failure_key))
        rb_raise(rb_eArgError, "failure key must be 1 to %d bytes (given %ld)", (int)sizeof(fs.failure_key) - 1, key_len);
    memcpy(fs.failure_key, RSTRING_PTR(failure_key), (size_t)key_len);
    fs.failure_key_len = (size_t)key_len;
    long n = RARRAY_LEN(types);
    for (long i = 0; i < n; i++) Check_Type(RARRAY_AREF(types, i), T_STRING);
    char **copies = calloc(n ? (size_t)n : 1, sizeof(char *));
    size_t *lens = calloc(n ? (size_t)n : 1, sizeof(size_t));
    if (!copies || !lens) {
        free(copies);
        free(lens);
        rb_raise(rb_eNoMemError, "flowctl: out of memory");
    }
    for (long i = 0; i < n; i++) {
        VALUE t = RARRAY_AREF(types, i);
        lens[i] = (size_t)RSTRING_LEN(t);
        copies[i] = malloc(lens[i] + 1);
        if (copies[i]) memcpy(copies[i], RSTRING_PTR(t), lens[i]);
        if (!copies[i]) {
            for (long j = 0; j < i; j++) free(copies[j]);
            free(copies);
            free(lens);
            rb_raise(rb_eNoMemError, "flowctl: out of memory");
        }
    }
    w->r.fields = fs;
    w->r.types = copies;
    w->r.type_lens = lens;
    w->r.ntypes = (size_t)n;
    w->r.desc = ci->desc;
    RB_OBJ_WRITE(self, &w->klass, klass);
    w->ready = true;
    RB_GC_GUARD(types);
    return self;
}

/* call-seq: relay.read -> Integer (events read from the producer, all runs) */
static VALUE
relay_read(VALUE self)
{
    return ULL2NUM(atomic_load(&relay_wrapper(self)->r.read));
}

/* call-seq: relay.written -> Integer (events written to the reader, all runs) */
static VALUE
relay_written(VALUE self)
{
    return ULL2NUM(atomic_load(&relay_wrapper(self)->r.written));
}

/* call-seq: relay.dropped -> Integer (events of a type the reader does not take) */
static VALUE
relay_dropped(VALUE self)
{
    return ULL2NUM(atomic_load(&relay_wrapper(self)->r.dropped));
}

/* call-seq: relay.last -> message or nil (the last event a source's relay read, its cursor; not while it runs) */
static VALUE
relay_last(VALUE self)
{
    relay_t *w = relay_wrapper(self);
    if (!w->r.last) return Qnil;
    return flowctl_decode_buffer(w->klass, grpc_byte_buffer_copy(w->r.last));
}

void
init_flowctl_relay_class(void)
{
    cPending = rb_define_class_under(mFlowctlNative, "Pending", rb_cObject);
    rb_define_alloc_func(cPending, pending_alloc);
    rb_define_method(cPending, "initialize", pending_initialize, -1);
    rb_define_method(cPending, "push", pending_push, 1);
    rb_define_method(cPending, "ack", pending_ack, 1);
    rb_define_method(cPending, "size", pending_size, 0);
    rb_define_method(cPending, "clear", pending_clear, 0);
    rb_define_method(cPending, "events", pending_events, 0);
    rb_define_method(cPending, "take", pending_take, 0);
    rb_define_method(cPending, "unprotected", pending_unprotected, 0);
    rb_define_method(cPending, "bytes", pending_bytes, 0);
    rb_define_method(cPending, "shut", pending_shut, 0);
    rb_define_method(cPending, "open", pending_open, 0);

    cRelay = rb_define_class_under(mFlowctlNative, "Relay", rb_cObject);
    rb_define_alloc_func(cRelay, relay_alloc);
    rb_define_method(cRelay, "initialize", relay_initialize, 3);
    rb_define_method(cRelay, "read", relay_read, 0);
    rb_define_method(cRelay, "written", relay_written, 0);
    rb_define_method(cRelay, "dropped", relay_dropped, 0);
    rb_define_method(cRelay, "last", relay_last, 0);
}
