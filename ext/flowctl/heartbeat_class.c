/*
 * heartbeat_class.c — Flowctl::Heartbeat, the Ruby side of the native heartbeat.
 *
 * Converts what lib/flowctl/heartbeat.rb has already checked (the plan of a protocol,
 * the id, the metrics, the status index) into the C copies the engine (heartbeat.c)
 * owns, and reads its state back: stats, service id, errors. Every wait releases the
 * GVL and can be interrupted. Messages for bad values are Ruby's job: here a value of
 * the wrong type only raises the TypeError of the conversion.
 */
#include "flowctl.h"

static VALUE cHeartbeat;

typedef struct {
    flowctl_heartbeat *hb; /* NULL until started */
} hb_wrapper;

static void
hb_wrapper_free(void *p)
{
    hb_wrapper *w = p;
    if (w->hb) flowctl_hb_release(w->hb);
    ruby_xfree(w);
}

static size_t
hb_wrapper_size(const void *p)
{
    const hb_wrapper *w = p;
    return sizeof(*w) + (w->hb ? flowctl_hb_memsize(w->hb) : 0);
}

static const rb_data_type_t hb_type = {
    .wrap_struct_name = "Flowctl::Heartbeat",
    .function = {.dmark = NULL, .dfree = hb_wrapper_free, .dsize = hb_wrapper_size},
    /* dfree takes a mutex held only for a few instructions and never calls Ruby */
    .flags = RUBY_TYPED_FREE_IMMEDIATELY,
};

static VALUE
hb_alloc(VALUE klass)
{
    hb_wrapper *w;
    return TypedData_Make_Struct(klass, hb_wrapper, &hb_type, w);
}

static flowctl_heartbeat *
hb_get(VALUE self)
{
    hb_wrapper *w = rb_check_typeddata(self, &hb_type);
    if (!w->hb) rb_raise(rb_eRuntimeError, "heartbeat not started");
    return w->hb;
}

/* ---- Ruby values -> C copies ----------------------------------------------- */

static void *
check_alloc(void *p)
{
    if (!p) rb_raise(rb_eNoMemError, "flowctl: out of memory");
    return p;
}

/* A copy of a String (or a Symbol's name) that Ruby has checked. */
static char *
cstr(VALUE str)
{
    if (SYMBOL_P(str)) str = rb_sym2str(str);
    StringValue(str);
    return check_alloc(strndup(RSTRING_PTR(str), (size_t)RSTRING_LEN(str)));
}

static VALUE
plan_get(VALUE plan, const char *key)
{
    return rb_hash_aref(plan, ID2SYM(rb_intern(key)));
}

static uint32_t
plan_field(VALUE plan, const char *key)
{
    VALUE v = plan_get(plan, key);
    return NIL_P(v) ? 0 : NUM2UINT(v);
}

static char *
plan_str(VALUE plan, const char *key)
{
    VALUE v = plan_get(plan, key);
    return NIL_P(v) ? NULL : cstr(v);
}

static void
plan_statuses(flowctl_hb_plan *p, VALUE statuses)
{
    Check_Type(statuses, T_ARRAY);
    long n = RARRAY_LEN(statuses);
    if (n == 0) rb_raise(rb_eArgError, "the plan has no statuses");
    p->status_names = check_alloc(calloc((size_t)n, sizeof(char *)));
    p->status_numbers = check_alloc(calloc((size_t)n, sizeof(int32_t)));
    for (long i = 0; i < n; i++) {
        VALUE pair = rb_ary_entry(statuses, i);
        Check_Type(pair, T_ARRAY);
        p->status_numbers[i] = NUM2INT(rb_ary_entry(pair, 1));
        p->status_names[i] = cstr(rb_ary_entry(pair, 0));
        p->n_statuses = (size_t)i + 1;
    }
}

static uint32_t
code_bits(VALUE codes)
{
    uint32_t bits = 0;
    if (NIL_P(codes)) return 0;
    Check_Type(codes, T_ARRAY);
    for (long i = 0; i < RARRAY_LEN(codes); i++) {
        int code = NUM2INT(rb_ary_entry(codes, i));
        if (code < 1 || code > 31) rb_raise(rb_eArgError, "status code %d out of range", code);
        bits |= 1u << code;
    }
    return bits;
}

/* The plan Hash (lib/flowctl/heartbeat.rb, Heartbeat::Plan#to_native) -> C. */
static void
plan_fill(flowctl_hb_plan *p, VALUE plan, VALUE register_request)
{
    Check_Type(plan, T_HASH);
    p->register_path = cstr(plan_get(plan, "register_path"));
    p->beat_path = cstr(plan_get(plan, "beat_path"));
    p->unregister_path = plan_str(plan, "unregister_path");
    StringValue(register_request);
    p->register_len = (size_t)RSTRING_LEN(register_request);
    p->register_req = check_alloc(malloc(p->register_len + 1));
    memcpy(p->register_req, RSTRING_PTR(register_request), p->register_len);
    p->register_first = RTEST(plan_get(plan, "register_first"));
    p->reg_success = plan_field(plan, "register_success");
    p->reg_message = plan_field(plan, "register_message");
    p->reg_service_id = plan_field(plan, "register_service_id");
    p->beat_id = plan_field(plan, "beat_id");
    p->beat_status = plan_field(plan, "beat_status");
    p->beat_metrics = plan_field(plan, "beat_metrics");
    p->beat_timestamp = plan_field(plan, "beat_timestamp");
    p->status_enum = RTEST(plan_get(plan, "status_enum"));
    p->metric_strings = RTEST(plan_get(plan, "metric_strings"));
    p->beat_success = plan_field(plan, "beat_success");
    p->beat_message = plan_field(plan, "beat_message");
    p->unreg_id = plan_field(plan, "unregister_id");
    p->forgot_codes = code_bits(plan_get(plan, "forgot_codes"));
    p->forgot_details = plan_str(plan, "forgot_details");
    plan_statuses(p, plan_get(plan, "statuses"));
    p->stopping = plan_field(plan, "stopping");
    if (p->stopping >= p->n_statuses) rb_raise(rb_eArgError, "the plan's stopping status is out of range");
}

static unsigned
status_index(const flowctl_hb_plan *plan, VALUE index)
{
    unsigned i = NUM2UINT(index);
    if (i >= plan->n_statuses) rb_raise(rb_eArgError, "status index %u out of range", i);
    return i;
}

struct config_build {
    flowctl_hb_config *c;
    size_t capa;
};

static int
metric_each(VALUE k, VALUE v, VALUE p)
{
    struct config_build *b = (struct config_build *)p;
    flowctl_hb_config *c = b->c;
    if (c->n_metrics == b->capa) rb_raise(rb_eRuntimeError, "metrics changed while being read");
    size_t i = c->n_metrics;
    if (c->texts) c->texts[i] = cstr(v);
    else c->values[i] = NUM2DBL(v);
    c->keys[i] = cstr(k);
    c->n_metrics++;
    return ST_CONTINUE;
}

/* Metrics, checked and normalised by Ruby: String => Float (or => String). Building
 * allocates with malloc while a conversion may raise: kept reachable for cleanup. */
static VALUE
metrics_body(VALUE p)
{
    VALUE *args = (VALUE *)p;
    struct config_build *b = (struct config_build *)args[0];
    rb_hash_foreach(args[1], metric_each, (VALUE)b);
    return Qnil;
}

static flowctl_hb_config *
config_from(VALUE metrics, bool strings)
{
    Check_Type(metrics, T_HASH);
    size_t n = (size_t)RHASH_SIZE(metrics);
    struct config_build b = {check_alloc(flowctl_hb_config_new(n, strings)), n};
    VALUE args[2] = {(VALUE)&b, metrics};
    int state = 0;
    rb_protect(metrics_body, (VALUE)args, &state);
    if (!state && b.c->n_metrics != n) {
        flowctl_hb_config_unref(b.c);
        rb_raise(rb_eRuntimeError, "metrics changed while being read");
    }
    if (state) {
        flowctl_hb_config_unref(b.c);
        rb_jump_tag(state);
    }
    return b.c;
}

static void
headers_fill(flowctl_hb_settings *s, VALUE headers)
{
    flowctl_metadata md;
    flowctl_metadata_from_hash(headers, &md);
    s->headers = calloc(md.count + 1, sizeof(grpc_metadata));
    if (!s->headers) {
        flowctl_metadata_free(&md);
        rb_raise(rb_eNoMemError, "flowctl: out of memory");
    }
    for (size_t i = 0; i < md.count; i++) {
        s->headers[i].key = grpc_slice_ref(md.md[i].key);
        s->headers[i].value = grpc_slice_ref(md.md[i].value);
        s->n_headers = i + 1;
    }
    flowctl_metadata_free(&md);
}

struct start_args {
    flowctl_hb_settings *s;
    VALUE plan, register_request, id, interval, status, metrics, headers, timeout, want_errors;
};

static VALUE
settings_body(VALUE p)
{
    struct start_args *a = (struct start_args *)p;
    flowctl_hb_settings *s = a->s;
    s->plan = check_alloc(calloc(1, sizeof(flowctl_hb_plan)));
    plan_fill(s->plan, a->plan, a->register_request);
    s->id = cstr(a->id);
    s->interval = NUM2DBL(a->interval);
    s->call_timeout = NUM2DBL(a->timeout);
    s->want_errors = RTEST(a->want_errors);
    s->status = status_index(s->plan, a->status);
    headers_fill(s, a->headers);
    s->config = config_from(a->metrics, s->plan->metric_strings);
    return Qnil;
}

/*
 * call-seq:
 *   heartbeat.__send__(:start_native, channel, plan, register_request, id, interval, status_index,
 *                      metrics, headers, timeout, errors)
 *
 * Starts the native thread. plan is a protocol's Hash of paths and field numbers
 * (Heartbeat::Plan), register_request the encoded register request; errors tells
 * whether failures are queued for #next_error. Heartbeat#initialize checks everything
 * and calls this once.
 */
static VALUE
hb_start_native(VALUE self, VALUE channel, VALUE plan, VALUE register_request, VALUE id, VALUE interval,
                VALUE status, VALUE metrics, VALUE headers, VALUE timeout, VALUE want_errors)
{
    hb_wrapper *w = rb_check_typeddata(self, &hb_type);
    if (w->hb) rb_raise(rb_eRuntimeError, "heartbeat already started");
    flowctl_fork_check();
    flowctl_channel *ch = flowctl_channel_get(channel);
    flowctl_hb_settings s = {0};
    struct start_args a = {&s, plan, register_request, id, interval, status, metrics, headers, timeout, want_errors};
    int state = 0;
    rb_protect(settings_body, (VALUE)&a, &state);
    if (state) {
        flowctl_hb_settings_free(&s);
        rb_jump_tag(state);
    }
    flowctl_heartbeat *hb = check_alloc(flowctl_hb_create(&s));
    w->hb = hb;
    int err = flowctl_hb_start(hb, ch);
    if (err) rb_syserr_fail(err, "flowctl: cannot start the heartbeat thread");
    return self;
}

/* call-seq: heartbeat.native_set_metrics(hash) — checked and normalised by Heartbeat#metrics= */
static VALUE
hb_set_metrics(VALUE self, VALUE metrics)
{
    flowctl_heartbeat *hb = hb_get(self);
    flowctl_hb_config *c = config_from(metrics, flowctl_hb_plan_of(hb)->metric_strings);
    if (flowctl_hb_dead(hb)) {
        flowctl_hb_config_unref(c);
        return metrics;
    }
    flowctl_hb_swap_config(hb, c);
    return metrics;
}

/* call-seq: heartbeat.native_set_status(index) — an index into the plan's statuses */
static VALUE
hb_set_status(VALUE self, VALUE index)
{
    flowctl_heartbeat *hb = hb_get(self);
    flowctl_hb_set_status(hb, status_index(flowctl_hb_plan_of(hb), index));
    return index;
}

/* call-seq: heartbeat.native_status -> String (the name of what the next beat sends) */
static VALUE
hb_status(VALUE self)
{
    flowctl_heartbeat *hb = hb_get(self);
    unsigned status;
    flowctl_hb_config *c = flowctl_hb_take_config(hb, &status);
    flowctl_hb_config_unref(c);
    return rb_str_new_cstr(flowctl_hb_plan_of(hb)->status_names[status]);
}

/* call-seq: heartbeat.metrics -> Hash (what the next beat sends: Float or String values) */
static VALUE
hb_metrics(VALUE self)
{
    flowctl_heartbeat *hb = hb_get(self);
    unsigned status;
    flowctl_hb_config *c = flowctl_hb_take_config(hb, &status);
    VALUE h = rb_hash_new();
    for (size_t i = 0; i < c->n_metrics; i++) {
        VALUE v = c->texts ? rb_utf8_str_new_cstr(c->texts[i]) : DBL2NUM(c->values[i]);
        rb_hash_aset(h, rb_utf8_str_new_cstr(c->keys[i]), v);
    }
    flowctl_hb_config_unref(c);
    return h;
}

/* call-seq: heartbeat.service_id -> String (what the beats name: the id, or what registration assigned) */
static VALUE
hb_service_id(VALUE self)
{
    char buf[1024];
    flowctl_hb_service_id(hb_get(self), buf, sizeof(buf));
    return rb_utf8_str_new_cstr(buf);
}

static VALUE
stats_hash(const flowctl_hb_stats *st)
{
    VALUE h = rb_hash_new();
    rb_hash_aset(h, ID2SYM(rb_intern("sent")), ULL2NUM(st->sent));
    rb_hash_aset(h, ID2SYM(rb_intern("failed")), ULL2NUM(st->failed));
    rb_hash_aset(h, ID2SYM(rb_intern("consecutive_failures")), ULL2NUM(st->consecutive));
    rb_hash_aset(h, ID2SYM(rb_intern("last_error")), st->last_error[0] ? rb_str_new_cstr(st->last_error) : Qnil);
    rb_hash_aset(h, ID2SYM(rb_intern("last_success_at")),
                 st->has_success ? rb_time_timespec_new(&st->last_success, INT_MAX) : Qnil);
    rb_hash_aset(h, ID2SYM(rb_intern("registrations")), ULL2NUM(st->registrations));
    return h;
}

/*
 * call-seq: heartbeat.stats -> Hash
 *
 * {sent:, failed:, consecutive_failures:, last_error:, last_success_at:, registrations:}
 */
static VALUE
hb_stats_get(VALUE self)
{
    flowctl_hb_stats st;
    flowctl_hb_get_stats(hb_get(self), &st);
    return stats_hash(&st);
}

/* call-seq: heartbeat.running? -> true or false */
static VALUE
hb_running_p(VALUE self)
{
    return flowctl_hb_running(hb_get(self)) ? Qtrue : Qfalse;
}

/* Waits (GVL released, interruptible: a pending interrupt is raised) for the thread's
 * end (or, for_error, an error), until `until` (NULL: no limit). True when it came. */
static bool
hb_wait(flowctl_heartbeat *hb, bool for_error, const struct timespec *until)
{
    for (;;) {
        flowctl_hb_wait w = {hb, for_error, until, false, false};
        rb_nogvl(flowctl_hb_wait_nogvl, &w, flowctl_hb_wait_ubf, &w, 0);
        if (w.done) return true;
        rb_thread_check_ints();
        if (until && flowctl_mono_passed(until)) return false;
    }
}

/*
 * call-seq: heartbeat.native_stop(timeout = 1.0) -> true or false  (Heartbeat#stop)
 *
 * Sends the final calls (a STOPPING beat, and an unregister when the protocol has one;
 * bounded by timeout seconds) and joins the thread. Idempotent. Returns at once in a
 * forked child (the thread is the parent's). Never waits more than timeout + 2 seconds:
 * a thread that has not finished by then (gRPC core not answering at all) is detached
 * and false is returned.
 */
static VALUE
hb_stop(VALUE self, VALUE timeout)
{
    double t = NUM2DBL(timeout);
    flowctl_heartbeat *hb = hb_get(self);
    if (flowctl_hb_dead(hb) || !flowctl_hb_started(hb)) return Qtrue;
    flowctl_hb_request_stop(hb, t);
    if (flowctl_hb_joined(hb)) return Qtrue;
    struct timespec until = flowctl_mono_in(t + 2.0);
    bool finished = hb_wait(hb, false, &until);
    return flowctl_hb_join(hb, finished) ? Qtrue : Qfalse;
}

/*
 * call-seq: heartbeat.next_error -> Flowctl::Error or nil
 *
 * Blocks (without the GVL) until the thread records a failure and returns it as an
 * exception object (not raised): a Flowctl::RPCError subclass for a failed call, a
 * Flowctl::Error when the control plane answered success: false. nil once the thread
 * has finished and every error was taken. Used by the on_error: thread.
 */
static VALUE
hb_next_error(VALUE self)
{
    flowctl_heartbeat *hb = hb_get(self);
    if (flowctl_hb_dead(hb) || !flowctl_hb_wants_errors(hb)) return Qnil;
    hb_wait(hb, true, NULL);
    flowctl_hb_error e;
    if (!flowctl_hb_take_error(hb, &e)) return Qnil;
    VALUE msg = rb_str_new_cstr(e.message);
    if (e.code < 0) return rb_exc_new_str(eFlowctlError, msg);
    return flowctl_status_error((grpc_status_code)e.code, msg, Qnil);
}

/*
 * call-seq: Flowctl::Heartbeat.native_stop_all(timeout) -> Integer
 *
 * Stops every heartbeat thread of this process (also those whose Heartbeat was
 * garbage collected) and waits at most about timeout + 1 seconds for them. Returns the
 * number of threads still running (0 normally).
 */
static VALUE
hb_stop_all(VALUE klass, VALUE timeout)
{
    double t = NUM2DBL(timeout);
    flowctl_hb_stop_all_request(t);
    flowctl_hb_all_wait a = {.until = flowctl_mono_in(t + 1.0)};
    rb_nogvl(flowctl_hb_all_wait_nogvl, &a, flowctl_hb_all_wait_ubf, &a, 0);
    return INT2FIX(flowctl_hb_live_count());
}

/* call-seq: Flowctl::Heartbeat.live_count -> Integer (threads running in this process) */
static VALUE
hb_live_count(VALUE klass)
{
    return INT2FIX(flowctl_hb_live_count());
}

void
init_flowctl_heartbeat_class(void)
{
    cHeartbeat = rb_define_class_under(mFlowctl, "Heartbeat", rb_cObject);
    rb_define_alloc_func(cHeartbeat, hb_alloc);
    rb_define_private_method(cHeartbeat, "start_native", hb_start_native, 10);
    rb_define_private_method(cHeartbeat, "native_set_metrics", hb_set_metrics, 1);
    rb_define_method(cHeartbeat, "metrics", hb_metrics, 0);
    rb_define_private_method(cHeartbeat, "native_set_status", hb_set_status, 1);
    rb_define_private_method(cHeartbeat, "native_status", hb_status, 0);
    rb_define_method(cHeartbeat, "service_id", hb_service_id, 0);
    rb_define_method(cHeartbeat, "stats", hb_stats_get, 0);
    rb_define_method(cHeartbeat, "running?", hb_running_p, 0);
    rb_define_private_method(cHeartbeat, "native_stop", hb_stop, 1);
    rb_define_method(cHeartbeat, "next_error", hb_next_error, 0);
    rb_define_private_method(rb_singleton_class(cHeartbeat), "native_stop_all", hb_stop_all, 1);
    rb_define_singleton_method(cHeartbeat, "live_count", hb_live_count, 0);
}
