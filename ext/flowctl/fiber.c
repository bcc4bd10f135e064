/*
 * fiber.c — unary calls that do not block their thread: Flowctl::Native::FiberCall.
 *
 * Under a Fiber scheduler (the async gem) a waiting call must give the thread back to the
 * scheduler. So such a call's batch completes on watch.c's shared queue, whose thread
 * (native, no GVL) notes the call's id on the `done` list; one Ruby thread
 * (lib/flowctl/fiber_calls.rb, "flowctl-fibers") takes the ids with
 * FiberCall.completed (waiting without the GVL) and wakes each call's fiber through a
 * Thread::Queue, which the scheduler knows how to wait on. A thousand calls in flight cost
 * a thousand small structs and no thread each.
 *
 * The Ruby side: fc = FiberCall.new(channel, path, bytes, timeout, headers); register
 * fc.id; fc.start; wait for the id; fc.result -> [bytes, initial, trailing] (or raises
 * the status). fc.cancel when the fiber is interrupted (then wait for the id all the
 * same: nothing is left in flight). A FiberCall collected while in flight (its fiber was
 * abandoned) is cancelled and freed by the watcher thread when its batch completes.
 */
#include "flowctl.h"
#include <math.h>

typedef struct {
    flowctl_cq_tag tag;           /* first: watch.c's thread calls fiber_call_done */
    uint64_t id;
    grpc_call *call;
    flowctl_channel *ch;          /* referenced while the call exists */
    grpc_op ops[6];
    flowctl_metadata send_md;
    grpc_byte_buffer *send_buf, *recv_buf;
    grpc_metadata_array recv_initial, recv_trailing;
    grpc_status_code status;
    grpc_slice details;
    bool started, done, orphaned; /* done, orphaned: under done_mu */
    pid_t pid;
} fiber_call;

static VALUE cFiberCall;

static pthread_mutex_t done_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t done_cond;  /* (done_mu) an id was added, or the reader is to return */
static uint64_t *done_ids;        /* (done_mu) completed calls not yet taken */
static size_t done_len, done_capa;
static bool reader_woken;         /* (done_mu) */
static atomic_ullong next_id;

/* C only: releases what the call holds (nothing is in flight). */
static void
fiber_call_release(fiber_call *fc)
{
    if (fc->call) grpc_call_unref(fc->call);
    fc->call = NULL;
    if (fc->ch) flowctl_channel_unref(fc->ch);
    fc->ch = NULL;
    if (fc->send_buf) grpc_byte_buffer_destroy(fc->send_buf);
    if (fc->recv_buf) grpc_byte_buffer_destroy(fc->recv_buf);
    fc->send_buf = fc->recv_buf = NULL;
    grpc_metadata_array_destroy(&fc->recv_initial);
    grpc_metadata_array_destroy(&fc->recv_trailing);
    grpc_metadata_array_init(&fc->recv_initial);
    grpc_metadata_array_init(&fc->recv_trailing);
    grpc_slice_unref(fc->details);
    fc->details = grpc_empty_slice();
    flowctl_metadata_free(&fc->send_md);
}

/* watch.c's thread, no GVL: the batch has completed. */
static void
fiber_call_done(flowctl_cq_tag *tag, bool ok)
{
    fiber_call *fc = (fiber_call *)tag;
    (void)ok; /* the status says what happened */
    pthread_mutex_lock(&done_mu);
    fc->done = true;
    bool orphaned = fc->orphaned;
    if (!orphaned) {
        if (done_len == done_capa) {
            size_t capa = done_capa ? done_capa * 2 : 64;
            uint64_t *grown = realloc(done_ids, capa * sizeof(uint64_t));
            if (grown) {
                done_ids = grown;
                done_capa = capa;
            }
        }
        if (done_len < done_capa) done_ids[done_len++] = fc->id;
        pthread_cond_signal(&done_cond);
    }
    pthread_mutex_unlock(&done_mu);
    if (orphaned) {
        fiber_call_release(fc);
        free(fc);
    }
}

static void
fiber_call_free(void *p)
{
    fiber_call *fc = p;
    if (fc->pid != flowctl_pid) { /* a forked child: the call is the parent's */
        free(fc);
        return;
    }
    pthread_mutex_lock(&done_mu);
    bool in_flight = fc->started && !fc->done;
    fc->orphaned = in_flight;
    pthread_mutex_unlock(&done_mu);
    if (in_flight) {
        grpc_call_cancel(fc->call, NULL); /* the watcher thread frees it when the batch completes */
        return;
    }
    fiber_call_release(fc);
    free(fc);
}

static size_t
fiber_call_memsize(const void *p)
{
    return sizeof(fiber_call);
}

static const rb_data_type_t fiber_call_type = {
    .wrap_struct_name = "Flowctl::Native::FiberCall",
    .function = {.dmark = NULL, .dfree = fiber_call_free, .dsize = fiber_call_memsize},
    /* dfree never blocks: a call in flight is cancelled and left to the watcher thread */
    .flags = RUBY_TYPED_FREE_IMMEDIATELY,
};

static VALUE
fiber_call_alloc(VALUE klass)
{
    fiber_call *fc = calloc(1, sizeof(*fc));
    if (!fc) rb_raise(rb_eNoMemError, "flowctl: out of memory");
    fc->tag.on_done = fiber_call_done;
    fc->details = grpc_empty_slice();
    fc->pid = flowctl_pid;
    grpc_metadata_array_init(&fc->recv_initial);
    grpc_metadata_array_init(&fc->recv_trailing);
    return TypedData_Wrap_Struct(klass, &fiber_call_type, fc);
}

static fiber_call *
fiber_call_get(VALUE self)
{
    fiber_call *fc = rb_check_typeddata(self, &fiber_call_type);
    if (fc->pid != flowctl_pid) rb_raise(rb_eIOError, "call was made before fork (in process %d)", (int)fc->pid);
    return fc;
}

static void
fiber_call_ops(fiber_call *fc)
{
    flowctl_unary_ops(fc->ops, &fc->send_md, fc->send_buf, &fc->recv_initial, &fc->recv_buf, &fc->status,
                      &fc->details, &fc->recv_trailing);
}

/*
 * call-seq:
 *   Flowctl::Native::FiberCall.new(channel, path, request_bytes, timeout, headers) -> call
 *
 * Prepares a unary call (nothing is sent before #start). timeout: seconds or nil.
 */
static VALUE
fiber_call_initialize(VALUE self, VALUE channel, VALUE path, VALUE request, VALUE timeout, VALUE headers)
{
    fiber_call *fc = fiber_call_get(self);
    if (fc->call) rb_raise(rb_eRuntimeError, "call already initialized");
    StringValue(path);
    if (RSTRING_LEN(path) < 3 || RSTRING_PTR(path)[0] != '/' || memchr(RSTRING_PTR(path), 0, RSTRING_LEN(path)))
        rb_raise(rb_eArgError, "method path must look like \"/package.Service/Method\" (given %+"PRIsVALUE")", path);
    StringValue(request);
    gpr_timespec deadline = gpr_inf_future(GPR_CLOCK_MONOTONIC);
    if (!NIL_P(timeout)) {
        double t = NUM2DBL(timeout); /* checked by the Ruby layer */
        if (isnan(t) || t < 0) rb_raise(rb_eArgError, "timeout must be >= 0 seconds (given %"PRIsVALUE")", timeout);
        if (t <= 1e9)
            deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_nanos((int64_t)(t * 1e9), GPR_TIMESPAN));
    }
    flowctl_channel *ch = flowctl_channel_get(channel);
    grpc_completion_queue *cq = flowctl_watch_cq();
    if (!cq) rb_raise(eFlowctlError, "flowctl: could not start the thread that completes calls under a Fiber scheduler");
    flowctl_metadata_from_hash(headers, &fc->send_md);
    grpc_slice method = grpc_slice_from_copied_buffer(RSTRING_PTR(path), (size_t)RSTRING_LEN(path));
    fc->call = grpc_channel_create_call(ch->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method, NULL, deadline, NULL);
    grpc_slice_unref(method);
    flowctl_channel_ref(ch);
    fc->ch = ch;
    fc->send_buf = flowctl_buffer_from_str(request);
    fc->id = atomic_fetch_add(&next_id, 1) + 1;
    RB_GC_GUARD(request);
    return self;
}

/* call-seq: call.id -> Integer (what FiberCall.completed returns for it) */
static VALUE
fiber_call_id(VALUE self)
{
    return ULL2NUM(fiber_call_get(self)->id);
}

/* call-seq: call.start -> self (the batch is in flight until its id is completed) */
static VALUE
fiber_call_start(VALUE self)
{
    fiber_call *fc = fiber_call_get(self);
    if (!fc->call || fc->started) rb_raise(rb_eRuntimeError, "call not initialized, or already started");
    fiber_call_ops(fc);
    grpc_call_error err = grpc_call_start_batch(fc->call, fc->ops, 6, &fc->tag, NULL);
    if (err != GRPC_CALL_OK) rb_raise(eFlowctlError, "gRPC refused the batch: %s", grpc_call_error_to_string(err));
    fc->started = true;
    return self;
}

/* call-seq: call.cancel -> nil (its id still completes; without blocking) */
static VALUE
fiber_call_cancel(VALUE self)
{
    fiber_call *fc = fiber_call_get(self);
    if (fc->call && fc->started) grpc_call_cancel(fc->call, NULL);
    return Qnil;
}

static bool
fiber_call_done_p(fiber_call *fc)
{
    pthread_mutex_lock(&done_mu);
    bool done = fc->done;
    pthread_mutex_unlock(&done_mu);
    return done;
}

/*
 * call-seq:
 *   call.result -> [response_bytes, initial_metadata, trailing_metadata]
 *
 * Once completed. A status other than OK raises its Flowctl::RPCError subclass. The call's
 * resources are released either way (result can be asked for once).
 */
static VALUE
fiber_call_result(VALUE self)
{
    fiber_call *fc = fiber_call_get(self);
    if (!fc->started || !fiber_call_done_p(fc)) rb_raise(rb_eRuntimeError, "call has not completed");
    if (!fc->call) rb_raise(rb_eRuntimeError, "result already taken");
    VALUE trailing = flowctl_metadata_to_hash(fc->recv_trailing.metadata, fc->recv_trailing.count);
    VALUE error = Qnil, result = Qnil;
    if (fc->status != GRPC_STATUS_OK) {
        VALUE details = rb_utf8_str_new((const char *)GRPC_SLICE_START_PTR(fc->details), (long)GRPC_SLICE_LENGTH(fc->details));
        error = flowctl_status_error(fc->status, details, trailing);
    } else if (!fc->recv_buf) {
        error = flowctl_status_error(GRPC_STATUS_INTERNAL, rb_str_new_cstr("the server sent no response message"), trailing);
    } else {
        VALUE initial = flowctl_metadata_to_hash(fc->recv_initial.metadata, fc->recv_initial.count);
        result = rb_ary_new_from_args(3, flowctl_str_from_buffer(fc->recv_buf), initial, trailing);
    }
    fiber_call_release(fc);
    if (!NIL_P(error)) rb_exc_raise(error);
    return result;
}

struct completed_wait {
    uint64_t *ids;
    size_t n;
};

static void *
completed_wait_nogvl(void *p)
{
    struct completed_wait *w = p;
    pthread_mutex_lock(&done_mu);
    while (done_len == 0 && !reader_woken) pthread_cond_wait(&done_cond, &done_mu);
    reader_woken = false;
    if (done_len > 0) {
        w->ids = malloc(done_len * sizeof(uint64_t));
        if (w->ids) {
            memcpy(w->ids, done_ids, done_len * sizeof(uint64_t));
            w->n = done_len;
            done_len = 0;
        }
    }
    pthread_mutex_unlock(&done_mu);
    return NULL;
}

static void
completed_ubf(void *p)
{
    (void)p;
    pthread_mutex_lock(&done_mu);
    reader_woken = true;
    pthread_cond_broadcast(&done_cond);
    pthread_mutex_unlock(&done_mu);
}

/*
 * call-seq:
 *   Flowctl::Native::FiberCall.completed -> [id, ...]
 *
 * Waits without the GVL for calls to complete and returns their ids (empty when an
 * interrupt came: the caller loops).
 */
static VALUE
fiber_call_completed(VALUE klass)
{
    struct completed_wait w = {.ids = NULL, .n = 0};
    rb_thread_call_without_gvl(completed_wait_nogvl, &w, completed_ubf, NULL);
    VALUE ary = rb_ary_new_capa((long)w.n);
    for (size_t i = 0; i < w.n; i++) rb_ary_push(ary, ULL2NUM(w.ids[i]));
    free(w.ids);
    return ary;
}

void
flowctl_fiber_atfork_child(void)
{
    pthread_mutex_init(&done_mu, NULL);
    flowctl_cond_init(&done_cond);
    done_len = 0; /* the parent's calls */
}

void
init_flowctl_fiber(void)
{
    static const flowctl_fork_hooks hooks = {.name = "fiber", .child = flowctl_fiber_atfork_child};
    flowctl_fork_register(&hooks);
    flowctl_cond_init(&done_cond);
    cFiberCall = rb_define_class_under(mFlowctlNative, "FiberCall", rb_cObject);
    rb_define_alloc_func(cFiberCall, fiber_call_alloc);
    rb_define_method(cFiberCall, "initialize", fiber_call_initialize, 5);
    rb_define_method(cFiberCall, "id", fiber_call_id, 0);
    rb_define_method(cFiberCall, "start", fiber_call_start, 0);
    rb_define_method(cFiberCall, "cancel", fiber_call_cancel, 0);
    rb_define_method(cFiberCall, "result", fiber_call_result, 0);
    rb_define_singleton_method(cFiberCall, "completed", fiber_call_completed, 0);
}
