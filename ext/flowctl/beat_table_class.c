/*
 * beat_table_class.c — Flowctl::Native::BeatTable: the Ruby binding of beat_table.c.
 *
 * The embedded control plane's store (lib/flowctl/control_plane/store.rb) is its only user:
 * it publishes components (#put), takes one back before it changes it (#take), folds what
 * the table took in into its own entries (#drain) and says the limits (#limits). A server
 * answers flowctl.v1 heartbeats from it (Flowctl::Native::Server#answer_natively). Values
 * come checked by the store; a value of the wrong type raises the TypeError of its conversion.
 * The table holds no Ruby object (nothing to mark or move); what it took in comes back as
 * frozen UTF-8 Strings.
 */
#include "flowctl.h"

static VALUE cBeatTable;

typedef struct {
    flowctl_beat_table *t;
} bt_wrapper;

static void
bt_free(void *p)
{
    bt_wrapper *w = p;
    flowctl_beat_table_unref(w->t);
    ruby_xfree(w);
}

static size_t
bt_memsize(const void *p)
{
    const bt_wrapper *w = p;
    return sizeof(*w) + (w->t ? flowctl_beat_table_memsize(w->t) : 0);
}

static const rb_data_type_t bt_type = {
    .wrap_struct_name = "Flowctl::Native::BeatTable",
    .function = {.dmark = NULL, .dfree = bt_free, .dsize = bt_memsize},
    /* dfree never calls Ruby; a server still using the table holds its own reference */
    .flags = RUBY_TYPED_FREE_IMMEDIATELY,
};

static VALUE
bt_alloc(VALUE klass)
{
    bt_wrapper *w;
    return TypedData_Make_Struct(klass, bt_wrapper, &bt_type, w);
}

static flowctl_beat_table *
bt_get(VALUE self)
{
    bt_wrapper *w = rb_check_typeddata(self, &bt_type);
    if (!w->t) rb_raise(rb_eRuntimeError, "beat table not initialized");
    return w->t;
}

/* The engine's table behind a BeatTable (for Server#answer_natively). */
flowctl_beat_table *
flowctl_beat_table_of(VALUE obj)
{
    return bt_get(obj);
}

/*
 * call-seq: Flowctl::Native::BeatTable.new(max_metrics, max_metric_bytes)
 *
 * The limits of Registry::Limits the heartbeats taken in natively must keep.
 */
static VALUE
bt_initialize(VALUE self, VALUE max_metrics, VALUE max_metric_bytes)
{
    bt_wrapper *w = rb_check_typeddata(self, &bt_type);
    if (w->t) rb_raise(rb_eRuntimeError, "beat table already initialized");
    w->t = flowctl_beat_table_new(NUM2UINT(max_metrics), NUM2UINT(max_metric_bytes));
    if (!w->t) rb_raise(rb_eNoMemError, "flowctl: out of memory");
    return self;
}

/* A metrics Hash as flowctl_beat_metric pointing into its Strings (valid while the GVL is
 * held and the Hash is not changed: the table copies what it keeps). */
struct metrics_arg {
    flowctl_beat_metric *m;
    size_t n, cap;
    bool bad_key;
};

static int
metric_i(VALUE key, VALUE val, VALUE p)
{
    struct metrics_arg *a = (struct metrics_arg *)p;
    if (!RB_TYPE_P(key, T_STRING)) {
        a->bad_key = true;
        return ST_STOP;
    }
    if (a->n == a->cap) return ST_STOP;
    bool str = RB_TYPE_P(val, T_STRING);
    a->m[a->n++] = (flowctl_beat_metric){.key = RSTRING_PTR(key), .klen = (uint32_t)RSTRING_LEN(key),
                                         .val = str ? RSTRING_PTR(val) : NULL,
                                         .vlen = str ? (uint32_t)RSTRING_LEN(val) : 0};
    return ST_CONTINUE;
}

/* The Hash's metrics in a (a->m on the heap when many; free it with metrics_done). */
static void
metrics_of(VALUE metrics, struct metrics_arg *a, flowctl_beat_metric *stack, size_t stack_n)
{
    *a = (struct metrics_arg){.cap = NIL_P(metrics) ? 0 : RHASH_SIZE(metrics), .m = stack};
    if (a->cap == 0) return;
    if (a->cap > stack_n && !(a->m = malloc(a->cap * sizeof(flowctl_beat_metric))))
        rb_raise(rb_eNoMemError, "flowctl: out of memory");
    rb_hash_foreach(metrics, metric_i, (VALUE)a);
    if (a->bad_key) {
        if (a->m != stack) free(a->m);
        rb_raise(rb_eTypeError, "metric keys must be Strings");
    }
}

static void
metrics_done(struct metrics_arg *a, flowctl_beat_metric *stack)
{
    if (a->m != stack) free(a->m);
}

typedef bool (*store_fn)(flowctl_beat_table *t, const char *id, size_t idlen, int status, int64_t saved_at,
                         const flowctl_beat_metric *m, size_t n, int64_t room);

/* put and release: an entry's status, saved_at and metrics (nil: none) into the table. */
static bool
store_entry(VALUE self, VALUE id, VALUE status, VALUE saved_at, VALUE metrics, VALUE room, store_fn fn)
{
    flowctl_beat_table *t = bt_get(self);
    StringValue(id);
    if (!NIL_P(metrics)) Check_Type(metrics, T_HASH);
    int st = NUM2INT(status);
    int64_t saved = NUM2LL(saved_at), r = NUM2LL(room);
    flowctl_beat_metric stack[16];
    struct metrics_arg a;
    metrics_of(metrics, &a, stack, 16);
    bool ok = fn(t, RSTRING_PTR(id), (size_t)RSTRING_LEN(id), st, saved, a.m, a.n, r);
    metrics_done(&a, stack);
    RB_GC_GUARD(id);
    RB_GC_GUARD(metrics);
    return ok;
}

/*
 * call-seq: table.put(id, status, saved_at_ns, metrics, room) -> self
 *
 * Publishes a component: status is its flowctl.v1 HealthStatus (-1: heartbeats that keep the
 * status only), metrics its Hash (String keys; String values, any other counted as 8 bytes);
 * room as for #limits. Replaces the entry of that id (#take it first, or what it took in is lost).
 */
static VALUE
bt_put(VALUE self, VALUE id, VALUE status, VALUE saved_at, VALUE metrics, VALUE room)
{
    Check_Type(metrics, T_HASH);
    if (!store_entry(self, id, status, saved_at, metrics, room, flowctl_beat_table_put))
        rb_raise(rb_eNoMemError, "flowctl: out of memory");
    return self;
}

static VALUE
utf8_frozen(const char *p, size_t len)
{
    return rb_obj_freeze(rb_utf8_str_new(p, (long)len));
}

/* [metrics, last_ns, beats, growth] (with the id first when with_id) */
static VALUE
change_to_ruby(const flowctl_beat_change *c, bool with_id)
{
    VALUE metrics = rb_hash_new();
    for (size_t i = 0; i < c->n; i++)
        rb_hash_aset(metrics, utf8_frozen(c->m[i].key, c->m[i].klen), utf8_frozen(c->m[i].val, c->m[i].vlen));
    VALUE row = rb_ary_new_capa(with_id ? 5 : 4);
    if (with_id) rb_ary_push(row, utf8_frozen(c->id, c->idlen));
    rb_ary_push(row, metrics);
    rb_ary_push(row, LL2NUM(c->last_ns));
    rb_ary_push(row, ULL2NUM(c->beats));
    rb_ary_push(row, LL2NUM(c->growth));
    return row;
}

struct changes {
    flowctl_beat_change *c;
    long n;
    bool with_id, one;
};

static VALUE
changes_body(VALUE p)
{
    struct changes *cs = (struct changes *)p;
    if (cs->one) return cs->n > 0 ? change_to_ruby(&cs->c[0], false) : Qnil;
    VALUE list = rb_ary_new_capa(cs->n);
    for (long i = 0; i < cs->n; i++) rb_ary_push(list, change_to_ruby(&cs->c[i], true));
    return list;
}

static VALUE
changes_free(VALUE p)
{
    struct changes *cs = (struct changes *)p;
    for (long i = 0; i < cs->n; i++) flowctl_beat_change_free(&cs->c[i]);
    return Qnil;
}

/*
 * call-seq: table.take(id) -> [metrics, last_heartbeat_ns, beats, growth] or nil
 *
 * Removes the component; what it took in since the last #drain (metrics that changed, with
 * their values; the last heartbeat's time; how many; bytes grown). nil when it took nothing
 * in, or was not published.
 */
static VALUE
bt_take(VALUE self, VALUE id)
{
    flowctl_beat_table *t = bt_get(self);
    StringValue(id);
    flowctl_beat_change c;
    int found = flowctl_beat_table_take(t, RSTRING_PTR(id), (size_t)RSTRING_LEN(id), &c);
    RB_GC_GUARD(id);
    if (found < 0) rb_raise(rb_eNoMemError, "flowctl: out of memory");
    if (found == 0) return Qnil;
    if (c.beats == 0 && c.n == 0) { /* nothing taken in since the last fold */
        flowctl_beat_change_free(&c);
        return Qnil;
    }
    struct changes cs = {.c = &c, .n = 1, .one = true};
    return rb_ensure(changes_body, (VALUE)&cs, changes_free, (VALUE)&cs);
}

/*
 * call-seq: table.hold(id) -> [metrics, last_heartbeat_ns, beats, growth] or nil
 *
 * A heartbeat through Ruby starts: the table stops taking the component's heartbeats in (they
 * go to Ruby, which waits for the store's lock) and gives what it took in so far (nil: nothing,
 * or not published). #release ends it.
 */
static VALUE
bt_hold(VALUE self, VALUE id)
{
    flowctl_beat_table *t = bt_get(self);
    StringValue(id);
    flowctl_beat_change c;
    int found = flowctl_beat_table_hold(t, RSTRING_PTR(id), (size_t)RSTRING_LEN(id), &c);
    RB_GC_GUARD(id);
    if (found < 0) rb_raise(rb_eNoMemError, "flowctl: out of memory");
    if (found < 2) return Qnil;
    struct changes cs = {.c = &c, .n = 1, .one = true};
    return rb_ensure(changes_body, (VALUE)&cs, changes_free, (VALUE)&cs);
}

/*
 * call-seq: table.release(id, status, saved_at_ns, merged_metrics_or_nil, room) -> true or false
 *
 * After #hold: what the heartbeat changed (status, saved_at, the metrics it merged) and the
 * room; the table takes the component's heartbeats in again. false when out of memory: the
 * component is then out of the table.
 */
static VALUE
bt_release(VALUE self, VALUE id, VALUE status, VALUE saved_at, VALUE metrics, VALUE room)
{
    return store_entry(self, id, status, saved_at, metrics, room, flowctl_beat_table_release) ? Qtrue : Qfalse;
}

static VALUE
drain_free(VALUE p)
{
    struct changes *cs = (struct changes *)p;
    changes_free(p);
    free(cs->c);
    return Qnil;
}

/*
 * call-seq:
 *   table.drain(id) -> [metrics, last_heartbeat_ns, beats, growth] or nil (nothing taken in)
 *   table.drain -> [[id, metrics, last_heartbeat_ns, beats, growth], ...]
 *
 * What the table took in since the last #drain or #put, for one component or all; the
 * components stay published.
 */
static VALUE
bt_drain(int argc, VALUE *argv, VALUE self)
{
    VALUE id;
    rb_scan_args(argc, argv, "01", &id);
    flowctl_beat_table *t = bt_get(self);
    if (!NIL_P(id)) StringValue(id);
    struct changes cs = {.one = !NIL_P(id)};
    cs.n = flowctl_beat_table_drain(t, cs.one ? RSTRING_PTR(id) : NULL, cs.one ? (size_t)RSTRING_LEN(id) : (size_t)-1,
                                    &cs.c);
    RB_GC_GUARD(id);
    if (cs.n < 0) rb_raise(rb_eNoMemError, "flowctl: out of memory");
    return rb_ensure(changes_body, (VALUE)&cs, drain_free, (VALUE)&cs);
}

/*
 * call-seq: table.limits(room, refresh_ns) -> nil
 *
 * room: bytes the registry may still grow by (max_bytes minus what it holds); refresh_ns:
 * persistence's refresh interval (0: no persistence).
 */
static VALUE
bt_limits(VALUE self, VALUE room, VALUE refresh)
{
    flowctl_beat_table_limits(bt_get(self), NUM2LL(room), NUM2LL(refresh));
    return Qnil;
}

/* call-seq: table.answered -> Integer (heartbeats taken in natively, ever) */
static VALUE
bt_answered(VALUE self)
{
    return ULL2NUM(flowctl_beat_table_answered(bt_get(self)));
}

/* call-seq: table.size -> Integer (components published) */
static VALUE
bt_size(VALUE self)
{
    return SIZET2NUM(flowctl_beat_table_size(bt_get(self)));
}

void
init_flowctl_beat_table_class(void)
{
    cBeatTable = rb_define_class_under(mFlowctlNative, "BeatTable", rb_cObject);
    rb_define_alloc_func(cBeatTable, bt_alloc);
    rb_define_method(cBeatTable, "initialize", bt_initialize, 2);
    rb_define_method(cBeatTable, "put", bt_put, 5);
    rb_define_method(cBeatTable, "hold", bt_hold, 1);
    rb_define_method(cBeatTable, "release", bt_release, 5);
    rb_define_method(cBeatTable, "take", bt_take, 1);
    rb_define_method(cBeatTable, "drain", bt_drain, -1);
    rb_define_method(cBeatTable, "limits", bt_limits, 2);
    rb_define_method(cBeatTable, "answered", bt_answered, 0);
    rb_define_method(cBeatTable, "size", bt_size, 0);
}
