/*
 * call.c — client calls on byte Strings: Flowctl::Native::Call.unary and
 * Flowctl::Native::Stream (server streaming, client streaming and bidi). The Ruby layer (lib/flowctl/client.rb) encodes
 * and decodes messages and owns the policy (defaults, keyword arguments).
 *
 * Reading order: deadlines -> batches (helpers that start a batch and wait for it
 * through flowctl_wait_tag) -> unary -> stream.
 *
 * Why this shape (measured with bench/rpc.rb): a unary call is one batch of all six
 * ops and one wait on a pluck queue kept per thread; a stream runs on the pump
 * (pump.c): queued writes, read-ahead, one poller. Messages are encoded and decoded in
 * Ruby (msg.to_proto, Klass.decode): that costs about 1 us of the 18 us a unary call
 * costs, so moving it into C would not show.
 *
 * Every wait runs without the GVL and can be interrupted: an interrupt that raises
 * cancels the call and the wait goes on until the batch's tag has completed, so a
 * unary call never has a batch in flight once the Ruby method that started it
 * returns; a stream has only its read-ahead and queued sends, which its dfree cancels.
 */
#include "flowctl.h"
#include <math.h>
#include <pthread.h>
#include <unistd.h>

static VALUE cCall, cStream;

/* ---- deadlines ---------------------------------------------------------- */

/* nil -> no deadline; a Numeric number of seconds >= 0 -> that far from now. */
static gpr_timespec
deadline_from(VALUE timeout)
{
    if (NIL_P(timeout)) return gpr_inf_future(GPR_CLOCK_MONOTONIC);
    if (!rb_obj_is_kind_of(timeout, rb_cNumeric))
        rb_raise(rb_eTypeError, "timeout must be a number of seconds or nil (given %"PRIsVALUE")",
                 rb_obj_class(timeout));
    double t = NUM2DBL(timeout);
    if (isnan(t) || t < 0) rb_raise(rb_eArgError, "timeout must be >= 0 seconds (given %"PRIsVALUE")", timeout);
    if (t > 1e9) return gpr_inf_future(GPR_CLOCK_MONOTONIC);
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_nanos((int64_t)(t * 1e9), GPR_TIMESPAN));
}

/* ---- batches ------------------------------------------------------------ */

/*
 * Starts ops on call and waits for them. Returns whether the batch succeeded;
 * *interrupted as flowctl_wait_tag. Raises only when gRPC refuses the batch
 * (a bug in this file, never a network condition); nothing is in flight then.
 */
static bool
start_batch(grpc_call *call, const grpc_op *ops, size_t n, int *interrupted)
{
    grpc_call_error err = grpc_call_start_batch(call, ops, n, (void *)ops, NULL);
    if (err != GRPC_CALL_OK) {
        *interrupted = 0;
        rb_raise(eFlowctlError, "gRPC refused the batch: %s", grpc_call_error_to_string(err));
    }
    return true;
}

static bool
run_batch(grpc_completion_queue *cq, grpc_call *call, const grpc_op *ops, size_t n, int *interrupted,
          unsigned spin_us)
{
    start_batch(call, ops, n, interrupted);
    grpc_event ev = flowctl_wait_tag_spin(cq, (void *)ops, call, interrupted, spin_us);
    return ev.type == GRPC_OP_COMPLETE && ev.success;
}

/* How long a unary call on ch may spin before it sleeps (wait.c): about 1.5 times the
 * channel's recent round trip (at most the limit) when that round trip is within the limit
 * and no other unary call waits on the channel. */
static unsigned
unary_spin_us(flowctl_channel *ch)
{
    unsigned recent = atomic_load(&ch->unary_us);
    if (recent == 0 || recent > flowctl_spin_max_us || atomic_load(&ch->unary_inflight) > 1) return 0;
    unsigned spin = recent + recent / 2;
    return spin < flowctl_spin_max_us ? spin : flowctl_spin_max_us;
}

/* A moving average over about eight calls; a slow call (a server that took its time) counts
 * as the limit only, so one outlier does not turn spinning off for long. */
static void
unary_note_round_trip(flowctl_channel *ch, gpr_timespec started)
{
    gpr_timespec took = gpr_time_sub(gpr_now(GPR_CLOCK_MONOTONIC), started);
    int64_t us = took.tv_sec * 1000000 + took.tv_nsec / 1000;
    unsigned cap = 4 * (flowctl_spin_max_us + 1);
    unsigned sample = us < 1 ? 1 : (us > cap ? cap : (unsigned)us);
    unsigned recent = atomic_load(&ch->unary_us);
    atomic_store(&ch->unary_us, recent == 0 ? sample : (recent * 7 + sample) / 8);
}

static grpc_call *
create_call(flowctl_channel *ch, VALUE path, grpc_completion_queue *cq, gpr_timespec deadline)
{
    grpc_slice method = grpc_slice_from_copied_buffer(RSTRING_PTR(path), (size_t)RSTRING_LEN(path));
    grpc_call *call = grpc_channel_create_call(ch->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method, NULL,
                                               deadline, NULL);
    grpc_slice_unref(method);
    return call;
}

static void
check_path(VALUE path)
{
    StringValue(path);
    if (RSTRING_LEN(path) < 3 || RSTRING_PTR(path)[0] != '/' || memchr(RSTRING_PTR(path), 0, RSTRING_LEN(path)))
        rb_raise(rb_eArgError, "method path must look like \"/package.Service/Method\" (given %+"PRIsVALUE")", path);
}

static VALUE
details_str(grpc_slice details)
{
    return rb_utf8_str_new((const char *)GRPC_SLICE_START_PTR(details), (long)GRPC_SLICE_LENGTH(details));
}

/* ---- unary -------------------------------------------------------------- */

/*
 * Each thread keeps one idle pluck queue for its next unary call: creating and
 * destroying a queue per call is measurable at this rate. A queue is taken while a call
 * uses it (a trap handler that calls again in the same thread gets a new one) and
 * destroyed with its thread (nothing is in flight then). Measured: 8% less CPU per call.
 */
static pthread_key_t cq_key;

static void
cq_key_destroy(void *cq)
{
    flowctl_cq_destroy(cq);
}

static pid_t cq_pid; /* a forked child never touches its parent's queues */

static grpc_completion_queue *
cq_take(void)
{
    if (cq_pid != flowctl_pid) {
        pthread_setspecific(cq_key, NULL);
        cq_pid = flowctl_pid;
    }
    grpc_completion_queue *cq = pthread_getspecific(cq_key);
    if (!cq) return grpc_completion_queue_create_for_pluck(NULL);
    pthread_setspecific(cq_key, NULL);
    return cq;
}

static void
cq_give_back(grpc_completion_queue *cq)
{
    if (pthread_getspecific(cq_key) == NULL && pthread_setspecific(cq_key, cq) == 0) return;
    flowctl_cq_destroy(cq);
}

typedef struct {
    VALUE channel, path, request;
    gpr_timespec deadline;
    flowctl_metadata send_md;
    grpc_completion_queue *cq;
    grpc_call *call;
    grpc_byte_buffer *send_buf, *recv_buf;
    grpc_metadata_array recv_initial, recv_trailing;
    grpc_status_code status;
    grpc_slice details;
    int interrupted;
    flowctl_channel *ch; /* referenced while the call runs (a close meanwhile must not free it) */
    bool waiting;        /* counted in ch->unary_inflight */
    flowctl_tracked track; /* Client#close cancels it */
} unary_ctx;

void
flowctl_unary_ops(grpc_op ops[6], const flowctl_metadata *send_md, grpc_byte_buffer *send_buf,
                  grpc_metadata_array *recv_initial, grpc_byte_buffer **recv_buf, grpc_status_code *status,
                  grpc_slice *details, grpc_metadata_array *recv_trailing)
{
    memset(ops, 0, sizeof(grpc_op) * 6);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = send_md->count;
    ops[0].data.send_initial_metadata.metadata = send_md->md;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send_buf;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = recv_initial;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = recv_buf;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.status = status;
    ops[5].data.recv_status_on_client.status_details = details;
    ops[5].data.recv_status_on_client.trailing_metadata = recv_trailing;
}

static void
unary_ops(unary_ctx *u, grpc_op ops[6])
{
    flowctl_unary_ops(ops, &u->send_md, u->send_buf, &u->recv_initial, &u->recv_buf, &u->status, &u->details,
                      &u->recv_trailing);
}

static VALUE
unary_body(VALUE arg)
{
    unary_ctx *u = (unary_ctx *)arg;
    grpc_op ops[6];
    u->cq = cq_take();
    u->ch = flowctl_channel_get(u->channel);
    flowctl_channel_ref(u->ch);
    u->call = create_call(u->ch, u->path, u->cq, u->deadline);
    flowctl_channel_track(u->ch, &u->track, u->call);
    u->send_buf = flowctl_buffer_from_str(u->request);
    unary_ops(u, ops);
    atomic_fetch_add(&u->ch->unary_inflight, 1);
    u->waiting = true;
    gpr_timespec started = gpr_now(GPR_CLOCK_MONOTONIC);
    run_batch(u->cq, u->call, ops, 6, &u->interrupted, unary_spin_us(u->ch));
    if (u->interrupted) return Qnil; /* flowctl_wait_finish raises once everything is released */
    if (u->status == GRPC_STATUS_OK) unary_note_round_trip(u->ch, started);

    VALUE trailing = flowctl_metadata_to_hash(u->recv_trailing.metadata, u->recv_trailing.count);
    if (u->status != GRPC_STATUS_OK) flowctl_raise_status(u->status, details_str(u->details), trailing);
    if (!u->recv_buf)
        rb_exc_raise(flowctl_status_error(GRPC_STATUS_INTERNAL,
                                          rb_str_new_cstr("the server sent no response message"), trailing));
    VALUE initial = flowctl_metadata_to_hash(u->recv_initial.metadata, u->recv_initial.count);
    return rb_ary_new_from_args(3, flowctl_str_from_buffer(u->recv_buf), initial, trailing);
}

static VALUE
unary_cleanup(VALUE arg)
{
    unary_ctx *u = (unary_ctx *)arg;
    flowctl_channel_untrack(&u->track);
    if (u->call) grpc_call_unref(u->call);
    if (u->ch) {
        if (u->waiting) atomic_fetch_sub(&u->ch->unary_inflight, 1);
        flowctl_channel_unref(u->ch);
    }
    if (u->cq) cq_give_back(u->cq); /* nothing in flight: the batch has completed */
    if (u->send_buf) grpc_byte_buffer_destroy(u->send_buf);
    if (u->recv_buf) grpc_byte_buffer_destroy(u->recv_buf);
    grpc_metadata_array_destroy(&u->recv_initial);
    grpc_metadata_array_destroy(&u->recv_trailing);
    grpc_slice_unref(u->details);
    flowctl_metadata_free(&u->send_md);
    return Qnil;
}

/*
 * call-seq:
 *   Flowctl::Native::Call.unary(channel, path, request_bytes, timeout, headers)
 *     -> [response_bytes, initial_metadata, trailing_metadata]
 *
 * One batch of all six ops and one wait without the GVL. timeout is seconds or nil
 * (no deadline); headers a Hash (validated; "-bin" keys carry binary values).
 * A status other than OK raises its Flowctl::RPCError subclass with the trailing
 * metadata; an interrupt cancels the call and is raised once it has completed.
 */
static VALUE
call_unary(VALUE mod, VALUE channel, VALUE path, VALUE request, VALUE timeout, VALUE headers)
{
    check_path(path);
    StringValue(request);
    flowctl_channel_get(channel); /* raises IOError when closed, before anything is allocated */
    unary_ctx u = {.channel = channel, .path = path, .request = request, .deadline = deadline_from(timeout)};
    grpc_metadata_array_init(&u.recv_initial);
    grpc_metadata_array_init(&u.recv_trailing);
    u.details = grpc_empty_slice();
    flowctl_metadata_from_hash(headers, &u.send_md); /* raises after freeing what it built */
    VALUE result = rb_ensure(unary_body, (VALUE)&u, unary_cleanup, (VALUE)&u);
    flowctl_wait_finish(u.interrupted);
    RB_GC_GUARD(channel);
    RB_GC_GUARD(path);
    RB_GC_GUARD(request);
    return result;
}

/* ---- stream ------------------------------------------------------------- */

/*
 * A streaming call (any shape but unary) on the pump (pump.c): writes go to its send queue, reads come off its
 * read-ahead, so one thread can block in read while another writes, and neither waits
 * for the wire message by message. The flags below are only read and written with the
 * GVL held.
 */
typedef struct {
    flowctl_pump pump;          /* pump.cq is NULL once released */
    bool writing, reading, fetching_status;
    bool write_closed, read_done, status_done, got_initial;
    grpc_status_code status;
    VALUE initial_md, trailing_md, details, error; /* Ruby values once known */
    pid_t pid;                  /* in a forked child the call is the parent's: leave it */
    flowctl_tracked track;      /* Client#close cancels it */
} stream_t;

static bool
stream_open(const stream_t *s)
{
    return s->pump.cq != NULL;
}

static void
stream_release(stream_t *s)
{
    if (!stream_open(s)) return;
    if (s->pid != flowctl_pid) {
        s->pump.cq = NULL;
        return;
    }
    flowctl_pump_destroy(&s->pump, !s->status_done);
    flowctl_channel_untrack(&s->track);
    grpc_call_unref(s->pump.call);
    s->pump.call = NULL;
}

/* Releases the call as soon as its status is known and no thread is using it. */
static void
stream_maybe_release(stream_t *s)
{
    if (s->status_done && !s->writing && !s->reading && !s->fetching_status) stream_release(s);
}

static void
stream_mark(void *p)
{
    stream_t *s = p;
    rb_gc_mark_movable(s->initial_md);
    rb_gc_mark_movable(s->trailing_md);
    rb_gc_mark_movable(s->details);
    rb_gc_mark_movable(s->error);
}

static void
stream_compact(void *p)
{
    stream_t *s = p;
    s->initial_md = rb_gc_location(s->initial_md);
    s->trailing_md = rb_gc_location(s->trailing_md);
    s->details = rb_gc_location(s->details);
    s->error = rb_gc_location(s->error);
}

/* Nobody can be waiting on a stream that is collected (a waiting thread holds it); its
 * read-ahead and queued sends are cancelled, and cancelled batches complete without
 * waiting for the network. */
static void
stream_free(void *p)
{
    stream_release(p);
    ruby_xfree(p);
}

static size_t
stream_memsize(const void *p)
{
    const stream_t *s = p;
    return sizeof(*s) + (stream_open(s) ? 4096 + s->pump.recv_bytes : 0); /* 4096: the core's call arena */
}

static const rb_data_type_t stream_type = {
    .wrap_struct_name = "Flowctl::Native::Stream",
    .function = {.dmark = stream_mark, .dfree = stream_free, .dsize = stream_memsize, .dcompact = stream_compact},
    /* dfree calls into gRPC core and waits for cancelled batches, never for the network;
     * it never calls Ruby. */
    .flags = RUBY_TYPED_FREE_IMMEDIATELY,
};

static VALUE
stream_alloc(VALUE klass)
{
    stream_t *s;
    VALUE obj = TypedData_Make_Struct(klass, stream_t, &stream_type, s);
    s->initial_md = s->trailing_md = s->details = s->error = Qnil;
    return obj;
}

static stream_t *
stream_get(VALUE self)
{
    return rb_check_typeddata(self, &stream_type);
}

/* The stream, for an operation on its call: IOError in a forked child. */
static stream_t *
stream_live(VALUE self)
{
    stream_t *s = stream_get(self);
    if (stream_open(s) && s->pid != flowctl_pid)
        rb_raise(rb_eIOError, "stream was opened before fork (in process %d): open a new one in this process",
                 (int)s->pid);
    return s;
}

/* Another thread is busy with this kind of op: wait for it with the GVL released now
 * and then (rare: only when two threads want the same thing at the same moment). */
static void
stream_wait_flag(const bool *flag)
{
    while (*flag) rb_thread_wait_for(rb_time_interval(DBL2NUM(0.001)));
}

struct status_ctx {
    stream_t *s;
    grpc_metadata_array trailing;
    grpc_slice details;
    grpc_status_code status;
};

static VALUE
status_body(VALUE arg)
{
    struct status_ctx *c = (struct status_ctx *)arg;
    stream_t *s = c->s;
    grpc_op op = {.op = GRPC_OP_RECV_STATUS_ON_CLIENT};
    op.data.recv_status_on_client.status = &c->status;
    op.data.recv_status_on_client.status_details = &c->details;
    op.data.recv_status_on_client.trailing_metadata = &c->trailing;
    bool ok;
    int interrupted = flowctl_pump_run(&s->pump, &op, 1, &ok);
    s->status = c->status;
    s->status_done = true;
    s->fetching_status = false;
    s->trailing_md = flowctl_metadata_to_hash(c->trailing.metadata, c->trailing.count);
    s->details = details_str(c->details);
    if (s->status != GRPC_STATUS_OK) s->error = flowctl_status_error(s->status, s->details, s->trailing_md);
    return INT2FIX(interrupted);
}

static VALUE
status_cleanup(VALUE arg)
{
    struct status_ctx *c = (struct status_ctx *)arg;
    c->s->fetching_status = false;
    grpc_metadata_array_destroy(&c->trailing);
    grpc_slice_unref(c->details);
    stream_maybe_release(c->s);
    return Qnil;
}

/* Receives the status once (a second thread that wants it waits for the first). */
static void
stream_fetch_status(stream_t *s)
{
    if (s->fetching_status) stream_wait_flag(&s->fetching_status);
    if (s->status_done || !stream_open(s)) return;
    struct status_ctx c = {.s = s, .details = grpc_empty_slice()};
    grpc_metadata_array_init(&c.trailing);
    s->fetching_status = true;
    VALUE interrupted = rb_ensure(status_body, (VALUE)&c, status_cleanup, (VALUE)&c);
    flowctl_wait_finish(FIX2INT(interrupted));
}

/* After the end of the stream: raises the status error, if any. */
static void
stream_raise_error(stream_t *s)
{
    if (!NIL_P(s->error)) rb_exc_raise(s->error);
}

/* The first batch of a stream: its initial metadata, and for a call that sends one request
 * (server streaming) that request and the half-close, so it costs one wait, not three. */
static size_t
stream_first_ops(grpc_op ops[3], const flowctl_metadata *md, grpc_byte_buffer *request)
{
    memset(ops, 0, sizeof(grpc_op) * 3);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = md->count;
    ops[0].data.send_initial_metadata.metadata = md->md;
    if (!request) return 1;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = request;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    return 3;
}

/*
 * call-seq:
 *   Flowctl::Native::Stream.new(channel, path, timeout, headers, request = nil) -> stream
 *
 * Starts a streaming call, sends its initial metadata (headers) and starts reading ahead.
 * With request (bytes), sends it and half-closes in the same batch: the call of a server
 * streaming RPC, which only reads from then on.
 */
static VALUE
stream_initialize(int argc, VALUE *argv, VALUE self)
{
    VALUE channel, path, timeout, headers, request;
    rb_scan_args(argc, argv, "41", &channel, &path, &timeout, &headers, &request);
    stream_t *s = stream_get(self);
    if (stream_open(s) || s->status_done) rb_raise(rb_eRuntimeError, "stream already started");
    check_path(path);
    if (!NIL_P(request)) StringValue(request);
    flowctl_channel *ch = flowctl_channel_get(channel); /* raises IOError when closed, before anything is allocated */
    gpr_timespec deadline = deadline_from(timeout);
    flowctl_metadata md;
    flowctl_metadata_from_hash(headers, &md);
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    flowctl_pump_init(&s->pump, create_call(ch, path, cq, deadline), cq);
    flowctl_channel_track(ch, &s->track, s->pump.call);
    s->pid = flowctl_pid;
    grpc_byte_buffer *req = NIL_P(request) ? NULL : flowctl_buffer_from_str(request);
    grpc_op ops[3];
    size_t n = stream_first_ops(ops, &md, req);
    bool ok;
    s->writing = true;
    int interrupted = flowctl_pump_run(&s->pump, ops, n, &ok);
    s->writing = false;
    s->write_closed = req != NULL;
    if (req) grpc_byte_buffer_destroy(req);
    flowctl_metadata_free(&md);
    if (!interrupted) flowctl_pump_start_reading(&s->pump, true, PUMP_UNLIMITED);
    flowctl_wait_finish(interrupted);
    RB_GC_GUARD(channel);
    RB_GC_GUARD(request);
    return self;
}

static void
stream_check_writable(stream_t *s)
{
    if (s->writing) rb_raise(eFlowctlError, "another thread is writing to this stream");
    if (s->write_closed) rb_raise(rb_eIOError, "stream closed for writing (close_write was called)");
    stream_raise_error(s);
    if (s->status_done || !stream_open(s)) rb_raise(rb_eIOError, "stream already finished");
}

/* A send failed: the call is over; its status says why. */
static void
stream_write_failed(stream_t *s)
{
    /*
     * The call is over, but its status is not waited for here: gRPC delivers it only
     * after every reply has been read, and replies may be left unread (a hang, not an
     * error, if this waited). The reader gets the status; so does a write after it.
     */
    stream_raise_error(s);
    rb_raise(rb_eIOError, "stream finished by the server before this write (read the replies for its status)");
}

/*
 * call-seq: stream.write(bytes or message) -> stream
 *
 * Queues one message for sending; waits only while PUMP_SENDQ messages are queued
 * (flow control: the server reads slowly). Raises IOError once the call has ended (a
 * message queued just before that is lost with the call, as one in gRPC's buffers).
 */
static VALUE
stream_write(VALUE self, VALUE bytes)
{
    stream_t *s = stream_live(self);
    stream_check_writable(s);
    grpc_byte_buffer *bb = flowctl_buffer_from_value(bytes); /* last to raise: then the pump owns bb */
    bool failed = false;
    s->writing = true;
    int interrupted = flowctl_pump_write(&s->pump, bb, &failed);
    s->writing = false;
    stream_maybe_release(s);
    flowctl_wait_finish(interrupted);
    if (failed) stream_write_failed(s);
    RB_GC_GUARD(bytes);
    return self;
}

/*
 * call-seq: stream.close_write -> nil
 *
 * Half-closes: tells the server no more messages follow, once the queued ones have
 * gone to gRPC. Idempotent.
 */
static VALUE
stream_close_write(VALUE self)
{
    stream_t *s = stream_live(self);
    if (s->write_closed || s->status_done || !stream_open(s)) {
        s->write_closed = true;
        return Qnil;
    }
    if (s->writing) rb_raise(eFlowctlError, "another thread is writing to this stream");
    s->writing = true;
    int interrupted = flowctl_pump_close_write(&s->pump);
    s->writing = false;
    s->write_closed = true;
    stream_maybe_release(s);
    flowctl_wait_finish(interrupted);
    return Qnil;
}

/* Builds the initial metadata Hash once it has arrived. */
static void
stream_take_initial(stream_t *s)
{
    if (s->got_initial || !s->pump.initial_done) return;
    s->got_initial = true;
    s->initial_md = flowctl_metadata_to_hash(s->pump.initial_md.metadata, s->pump.initial_md.count);
}

/*
 * call-seq: stream.read(klass = nil) -> bytes, message or nil
 *
 * The next message from the server (bytes, or decoded as a klass straight from gRPC's
 * memory: Flowctl::DecodeError when it is not one), or nil at the end of the stream. When
 * the call ended with a status other than OK, raises its RPCError (again on every later read).
 */
static VALUE
stream_read(int argc, VALUE *argv, VALUE self)
{
    VALUE klass;
    rb_scan_args(argc, argv, "01", &klass);
    stream_t *s = stream_live(self);
    if (s->reading) rb_raise(eFlowctlError, "another thread is reading from this stream");
    if (s->read_done || !stream_open(s)) {
        stream_fetch_status(s);
        stream_raise_error(s);
        return Qnil;
    }
    grpc_byte_buffer *bb;
    s->reading = true;
    int interrupted = flowctl_pump_read(&s->pump, &bb);
    s->reading = false;
    stream_take_initial(s);
    if (bb) {
        if (!NIL_P(klass)) return flowctl_decode_buffer(klass, bb);
        VALUE msg = flowctl_str_from_buffer(bb);
        grpc_byte_buffer_destroy(bb);
        return msg;
    }
    if (!interrupted) s->read_done = true;
    flowctl_wait_finish(interrupted);
    stream_fetch_status(s);
    stream_raise_error(s);
    return Qnil;
}

/*
 * call-seq: stream.cancel -> nil
 *
 * Cancels the call (does not block): a thread blocked in read or write returns, and
 * the status becomes CANCELLED unless the call had already ended.
 */
static VALUE
stream_cancel(VALUE self)
{
    stream_t *s = stream_live(self);
    if (stream_open(s) && !s->status_done) grpc_call_cancel(s->pump.call, NULL);
    return Qnil;
}

/*
 * call-seq: stream.initial_metadata -> Hash
 *
 * The server's initial metadata; waits for it when it has not arrived yet.
 */
static VALUE
stream_initial_metadata(VALUE self)
{
    stream_t *s = stream_live(self);
    if (!s->got_initial && stream_open(s)) {
        s->reading = true;
        int interrupted = flowctl_pump_wait_initial(&s->pump);
        s->reading = false;
        stream_take_initial(s);
        stream_maybe_release(s);
        flowctl_wait_finish(interrupted);
    }
    return NIL_P(s->initial_md) ? rb_hash_new() : s->initial_md;
}

/* call-seq: stream.trailing_metadata -> Hash or nil (nil until the call has ended) */
static VALUE
stream_trailing_metadata(VALUE self)
{
    return stream_get(self)->trailing_md;
}

/* call-seq: stream.status -> Integer or nil (the gRPC status code once the call has ended) */
static VALUE
stream_status(VALUE self)
{
    stream_t *s = stream_get(self);
    return s->status_done ? INT2FIX(s->status) : Qnil;
}

/* call-seq: stream.details -> String or nil (the status details once the call has ended) */
static VALUE
stream_details(VALUE self)
{
    return stream_get(self)->details;
}

/* call-seq: stream.error -> Flowctl::RPCError or nil */
static VALUE
stream_error(VALUE self)
{
    return stream_get(self)->error;
}

/*
 * call-seq: stream.finish -> nil
 *
 * Waits for the status of a call whose replies are all read (or no longer wanted:
 * cancel first) and raises its error, if any.
 */
static VALUE
stream_finish(VALUE self)
{
    stream_t *s = stream_live(self);
    stream_fetch_status(s);
    stream_raise_error(s);
    return Qnil;
}

/* call-seq: stream.finished? -> true or false (the status is known) */
static VALUE
stream_finished_p(VALUE self)
{
    return stream_get(self)->status_done ? Qtrue : Qfalse;
}

/* ---- forwarding (the engine: forward.c) -------------------------------------- */

/* Both ends of a forward after its loop: their flags down, released when done with. */
static void
forward_settle(stream_t *src, stream_t *dst, flowctl_forward *f)
{
    if (f->held) grpc_byte_buffer_destroy(f->held);
    f->held = NULL;
    src->reading = false;
    dst->writing = false;
    stream_take_initial(src);
}

/*
 * call-seq: stream.forward(destination, klass) -> true or false
 *
 * Sends every message this stream reads, as bytes, on destination (another stream open
 * for writing), without the GVL and without decoding them; each is checked first to be a
 * klass as the decoder would read it. Returns true when this stream ended with status OK
 * (destination not half-closed: the caller does it), false when the destination ended
 * first (this stream is left as it is: the caller cancels it). When this stream ends with
 * another status, the destination is cancelled and that RPCError raised; a message that
 * is not a klass cancels both and raises Flowctl::DecodeError, as reading it would have.
 * An interrupt (Thread#raise, kill, Timeout) cancels both calls and is raised.
 */
static VALUE
stream_forward(VALUE self, VALUE destination, VALUE klass)
{
    stream_t *src = stream_live(self);
    stream_t *dst = stream_live(destination);
    const flowctl_class *ci = flowctl_class_of(klass);
    if (!ci) rb_raise(rb_eTypeError, "%"PRIsVALUE" is not a generated message class", klass);
    if (src == dst) rb_raise(rb_eArgError, "a stream cannot forward to itself");
    if (src->reading) rb_raise(eFlowctlError, "another thread is reading from this stream");
    if (src->read_done || !stream_open(src)) rb_raise(rb_eIOError, "stream already read to its end");
    stream_check_writable(dst);
    flowctl_forward f = {.src = &src->pump, .dst = &dst->pump, .desc = ci->desc};
    src->reading = dst->writing = true;
    int interrupted = 0;
    for (;;) {
        atomic_store(&f.woken, false);
        f.result = FWD_WOKEN; /* stays so when an interrupt was pending: rb_nogvl does not run the loop */
        rb_nogvl(flowctl_forward_nogvl, &f, flowctl_forward_ubf, &f, RB_NOGVL_INTR_FAIL | RB_NOGVL_UBF_ASYNC_SAFE);
        if (f.result != FWD_WOKEN) break;
        if ((interrupted = flowctl_wait_interrupted())) break;
    }
    forward_settle(src, dst, &f);
    VALUE result = Qfalse;
    if (interrupted || f.result == FWD_BAD_MESSAGE) {
        grpc_call_cancel(src->pump.call, NULL);
        grpc_call_cancel(dst->pump.call, NULL);
        stream_maybe_release(dst);
        flowctl_wait_finish(interrupted); /* raises when interrupted */
        const flowctl_class *at = flowctl_class_of_desc(f.bad.desc);
        rb_raise(eFlowctlDecodeError, "cannot decode %"PRIsVALUE": %s", at ? at->klass : klass, f.bad.why);
    }
    if (f.result == FWD_SOURCE_END) {
        src->read_done = true;
        stream_fetch_status(src);
        if (!NIL_P(src->error)) {
            grpc_call_cancel(dst->pump.call, NULL);
            stream_maybe_release(dst);
            rb_exc_raise(src->error);
        }
        result = Qtrue;
    }
    stream_maybe_release(dst);
    stream_maybe_release(src);
    RB_GC_GUARD(destination);
    RB_GC_GUARD(self);
    return result;
}

/* ---- relaying (the engine: relay.c) --------------------------------------------------- */

static VALUE
relay_result_symbol(flowctl_relay_result r)
{
    switch (r) {
    case RELAY_SOURCE_END: return ID2SYM(rb_intern("end"));
    case RELAY_DESTINATION_ENDED: return ID2SYM(rb_intern("destination_ended"));
    case RELAY_DETACHED: return ID2SYM(rb_intern("detached"));
    case RELAY_LIMIT: return ID2SYM(rb_intern("limit"));
    default: return Qnil;
    }
}

/*
 * call-seq: stream.relay(destination, relay, ack, into, epoch, limit) -> Symbol or message
 *
 * The Router's hop (relay.c): reads this stream's events and writes them, as bytes, to
 * destination, without the GVL, until something needs the Router:
 *   :end                the stream ended with status OK (its RPCError is raised otherwise;
 *                       destination is left open);
 *   :destination_ended  a write to destination failed (it is over; the event is in into);
 *   :detached           into's gate was shut or opened again since epoch (the reader's link
 *                       changed): the event read is held and written first next time;
 *   :limit              limit events (0: no limit) were remembered in into in this run;
 *   a message           an event whose metadata has the relay's failure key (not written).
 * ack (a Native::Pending or nil): the list each event read acknowledges by its id (the
 * producer is a processor). A destination that is no longer writable gives
 * :destination_ended at once. Bytes the decoder would refuse cancel this stream and raise
 * Flowctl::DecodeError; an interrupt cancels this stream and is raised.
 */
static VALUE
stream_relay(VALUE self, VALUE destination, VALUE relay, VALUE ack, VALUE into, VALUE epoch, VALUE limit)
{
    stream_t *src = stream_live(self);
    stream_t *dst = stream_live(destination);
    flowctl_relay *r = flowctl_relay_get(relay);
    flowctl_pending *ack_list = NIL_P(ack) ? NULL : flowctl_pending_get(ack);
    flowctl_pending *into_list = flowctl_pending_get(into);
    uint64_t at = NUM2ULL(epoch), most = NUM2ULL(limit);
    if (src == dst) rb_raise(rb_eArgError, "a stream cannot relay to itself");
    if (ack_list == into_list) rb_raise(rb_eArgError, "a relay cannot acknowledge the list it remembers into");
    if (src->reading) rb_raise(eFlowctlError, "another thread is reading from this stream");
    if (dst->writing) rb_raise(eFlowctlError, "another thread is writing to the destination");
    if (src->read_done || !stream_open(src)) {
        stream_fetch_status(src);
        stream_raise_error(src);
        return ID2SYM(rb_intern("end"));
    }
    if (dst->write_closed || dst->status_done || !stream_open(dst) || !NIL_P(dst->error))
        return ID2SYM(rb_intern("destination_ended"));
    r->src = &src->pump;
    r->dst = &dst->pump;
    r->ack = ack_list;
    r->into = into_list;
    r->epoch = at;
    r->limit = most;
    r->pushed = 0;
    r->keep_last = ack_list == NULL; /* a source's: its cursor */
    src->reading = dst->writing = true;
    int interrupted = 0;
    for (;;) {
        atomic_store(&r->woken, false);
        r->result = RELAY_WOKEN; /* stays so when an interrupt was pending: rb_nogvl does not run the loop */
        rb_nogvl(flowctl_relay_nogvl, r, flowctl_relay_ubf, r, RB_NOGVL_INTR_FAIL | RB_NOGVL_UBF_ASYNC_SAFE);
        if (r->result != RELAY_WOKEN) break;
        if ((interrupted = flowctl_wait_interrupted())) break;
    }
    r->src = r->dst = NULL;
    r->ack = r->into = NULL;
    src->reading = false;
    dst->writing = false;
    stream_take_initial(src);
    VALUE result = relay_result_symbol(r->result);
    if (interrupted || r->result == RELAY_BAD_MESSAGE) {
        grpc_call_cancel(src->pump.call, NULL);
        stream_maybe_release(dst);
        flowctl_wait_finish(interrupted); /* raises when interrupted */
        const flowctl_class *at_class = flowctl_class_of_desc(r->bad.desc);
        rb_raise(eFlowctlDecodeError, "cannot decode %"PRIsVALUE": %s",
                 at_class ? at_class->klass : flowctl_relay_message_class(relay), r->bad.why);
    }
    if (r->result == RELAY_NOMEM) rb_raise(rb_eNoMemError, "flowctl: out of memory (relay)");
    if (r->result == RELAY_DIVERT) {
        grpc_byte_buffer *bb = r->held;
        r->held = NULL;
        result = flowctl_decode_buffer(flowctl_relay_message_class(relay), bb);
    }
    if (r->result == RELAY_SOURCE_END) {
        src->read_done = true;
        stream_maybe_release(dst);
        stream_fetch_status(src);
        stream_raise_error(src);
    }
    stream_maybe_release(dst);
    stream_maybe_release(src);
    RB_GC_GUARD(destination);
    RB_GC_GUARD(relay);
    RB_GC_GUARD(ack);
    RB_GC_GUARD(into);
    RB_GC_GUARD(self);
    return result;
}

void
init_flowctl_call(void)
{
    if (pthread_key_create(&cq_key, cq_key_destroy) != 0) rb_raise(rb_eRuntimeError, "flowctl: pthread_key_create failed");
    cCall = rb_define_module_under(mFlowctlNative, "Call");
    rb_define_module_function(cCall, "unary", call_unary, 5);

    cStream = rb_define_class_under(mFlowctlNative, "Stream", rb_cObject);
    rb_define_alloc_func(cStream, stream_alloc);
    rb_define_method(cStream, "initialize", stream_initialize, -1);
    rb_define_method(cStream, "write", stream_write, 1);
    rb_define_method(cStream, "close_write", stream_close_write, 0);
    rb_define_method(cStream, "read", stream_read, -1);
    rb_define_method(cStream, "cancel", stream_cancel, 0);
    rb_define_method(cStream, "finish", stream_finish, 0);
    rb_define_method(cStream, "finished?", stream_finished_p, 0);
    rb_define_method(cStream, "initial_metadata", stream_initial_metadata, 0);
    rb_define_method(cStream, "trailing_metadata", stream_trailing_metadata, 0);
    rb_define_method(cStream, "status", stream_status, 0);
    rb_define_method(cStream, "details", stream_details, 0);
    rb_define_method(cStream, "error", stream_error, 0);
    rb_define_method(cStream, "forward", stream_forward, 2);
    rb_define_method(cStream, "relay", stream_relay, 6);
}
