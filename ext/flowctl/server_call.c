/*
 * server_call.c — Flowctl::Native::ServerCall: one accepted call, as a Ruby worker of
 * Flowctl::Server (lib/flowctl/server.rb) sees it. The call runs on its slot's pump (pump.c):
 * the first request message is read while the call waits for a worker; a stream reads ahead
 * (recv(true)) and writes behind (send_message queues), so the wire keeps moving while Ruby
 * runs the handler. finish waits for the queued replies, then sends the status; a status
 * that cannot leave at once lingers in the engine (server_engine.c, 2b) and the worker goes on.
 * Every wait leaves the GVL; an interrupt cancels the call and the wait goes on until nothing
 * is in flight.
 */
#include "server_engine.h"
#include <grpc/support/alloc.h>

static VALUE cServerCall, eCancelledCall;

/*
 * A call runs on its slot's pump (pump.c): the first request message is read while the
 * call waits for a worker; a stream reads ahead (recv(true)) and writes behind
 * (send_message queues), so the wire keeps moving while Ruby runs the handler. finish
 * waits for the queued replies, then sends the status.
 */
typedef struct {
    call_slot *slot;       /* NULL once released */
    int busy;              /* threads waiting on this call (changed with the GVL held) */
    bool release_pending;  /* finished while another thread still waits on it */
    bool finished;
    bool cancelled;
    bool read_done;        /* the client half-closed */
    bool got_message;      /* a request message came */
    pid_t pid;
} server_call_t;

static void
call_release(server_call_t *c)
{
    flowctl_slot_release(c->slot);
    c->slot = NULL;
}

static void
server_call_free(void *p)
{
    server_call_t *c = p;
    /* No thread waits here (each wait holds the object); read-ahead and queued replies
     * are cancelled and complete at once. A forked child's copy of a call is the
     * parent's: left alone. */
    if (c->slot && c->pid == flowctl_pid) call_release(c);
    ruby_xfree(c);
}

static size_t
server_call_memsize(const void *p)
{
    const server_call_t *c = p;
    return sizeof(*c) + (c->slot ? sizeof(call_slot) + c->slot->pump.recv_bytes : 0);
}

static const rb_data_type_t server_call_type = {
    .wrap_struct_name = "Flowctl::Native::ServerCall",
    .function = {.dmark = NULL, .dfree = server_call_free, .dsize = server_call_memsize},
    /* dfree cancels and unrefs the call; a cancelled batch completes without waiting on I/O. */
    .flags = RUBY_TYPED_FREE_IMMEDIATELY,
};

static server_call_t *
call_get(VALUE self)
{
    server_call_t *c = rb_check_typeddata(self, &server_call_type);
    if (c->pid != flowctl_pid) rb_raise(rb_eIOError, "the call belongs to the process that forked this one");
    if (!c->slot || c->finished) rb_raise(eCancelledCall, "the call has already finished");
    return c;
}

/* After a wait: release the call when finish ran meanwhile on another thread. */
static void
after_wait(server_call_t *c, VALUE self)
{
    c->busy--;
    if (c->release_pending && c->busy == 0) {
        c->release_pending = false;
        call_release(c);
    }
    RB_GC_GUARD(self);
}

/* A unary call's one request, read by the acceptor (server_unary.c): nil after it. */
static VALUE
unary_recv(server_call_t *c, VALUE klass)
{
    grpc_byte_buffer *buf = c->slot->payload;
    c->slot->payload = NULL;
    c->read_done = true;
    if (!buf) return Qnil;
    c->got_message = true;
    if (!NIL_P(klass)) return flowctl_decode_buffer(klass, buf); /* releases buf */
    VALUE str = flowctl_str_from_buffer(buf);
    grpc_byte_buffer_destroy(buf);
    return str;
}

/*
 * call-seq:
 *   call.recv(read_ahead = false, klass = nil) -> String, message or nil
 *
 * The next request message (binary String, or decoded as a klass straight from gRPC's
 * memory: Flowctl::DecodeError when it is not one), or nil when the client has
 * half-closed. read_ahead keeps reading the following messages while the handler runs
 * (streams). Raises Flowctl::Cancelled when the client went away.
 */
static VALUE
server_call_recv(int argc, VALUE *argv, VALUE self)
{
    VALUE ahead, klass;
    rb_scan_args(argc, argv, "02", &ahead, &klass);
    server_call_t *c = call_get(self);
    if (c->read_done) return Qnil;
    if (c->slot->unary >= 0) return unary_recv(c, klass);
    flowctl_pump *p = &c->slot->pump;
    flowctl_pump_read_more(p, RTEST(ahead) ? PUMP_UNLIMITED : 1);
    grpc_byte_buffer *buf;
    c->busy++;
    int interrupted = flowctl_pump_read(p, &buf);
    bool ok = true;
    VALUE str = Qnil;
    if (buf) {
        if (NIL_P(klass)) {
            str = flowctl_str_from_buffer(buf);
            grpc_byte_buffer_destroy(buf);
            buf = NULL;
        }
        c->got_message = true;
    } else if (!interrupted) {
        /* no message: a half-close, unless the client cancelled or went away */
        ok = !flowctl_pump_recv_failed(p) && !grpc_call_failed_before_recv_message(c->slot->call);
        if (ok) c->read_done = true;
        else c->cancelled = true;
        if (!ok && !c->got_message) flowctl_server_offense(c->slot->owner, c->slot); /* reset before its request */
    }
    after_wait(c, self);
    flowctl_wait_finish(interrupted);
    if (!ok) rb_raise(eCancelledCall, "the client cancelled the call or went away");
    return buf ? flowctl_decode_buffer(klass, buf) : str;
}

/*
 * call-seq:
 *   call.send_message(bytes or message) -> self
 *
 * Queues one reply message (the first one carries the initial metadata); waits only
 * while many are queued (the client reads slowly). Raises Flowctl::Cancelled when the
 * client went away.
 */
static VALUE
server_call_send(VALUE self, VALUE bytes)
{
    server_call_t *c = call_get(self);
    if (c->slot->unary >= 0) rb_raise(rb_eArgError, "a unary call sends its reply with its status (finish)");
    /* a client that left while the handler was busy elsewhere is seen here, not only once
     * a reply fails to go out (which nobody may poll for) */
    flowctl_pump_watch_close(&c->slot->pump);
    if (flowctl_pump_peer_gone(&c->slot->pump, true)) {
        c->cancelled = true;
        rb_raise(eCancelledCall, "the client cancelled the call or went away");
    }
    grpc_byte_buffer *bb = flowctl_buffer_from_value(bytes); /* last to raise: then the pump owns bb */
    bool failed = false;
    c->busy++;
    int interrupted = flowctl_pump_write(&c->slot->pump, bb, &failed);
    bool stalled = failed && flowctl_pump_send_timed_out(&c->slot->pump);
    if (failed) c->cancelled = true;
    after_wait(c, self);
    flowctl_wait_finish(interrupted);
    if (stalled) rb_raise(eCancelledCall, "the client read nothing for the write timeout: call cancelled");
    if (failed) rb_raise(eCancelledCall, "the client cancelled the call or went away");
    RB_GC_GUARD(bytes);
    return self;
}

struct finish_arg {
    VALUE self;
    server_call_t *c;
    size_t n;
    flowctl_metadata md;
    grpc_slice details;
    grpc_byte_buffer *msg;
    grpc_status_code code;
    int interrupted;
    bool ok;      /* the status left (its batch completed) */
    bool linger;  /* the status batch is in flight and nobody else waits on the call: hand it over */
};

/*
 * The queued replies first (a peer that takes none of them for write_timeout gets the
 * call cancelled), then the status batch. The worker waits for the status only when
 * another thread still waits on the call; otherwise a status that did not leave at once
 * lingers (2b) and the worker is free.
 */
static VALUE
finish_body(VALUE p)
{
    struct finish_arg *a = (struct finish_arg *)p;
    flowctl_pump *pump = &a->c->slot->pump;
    a->interrupted = flowctl_pump_flush(pump);
    if (a->interrupted || flowctl_pump_send_failed(pump)) return Qnil;
    a->n = flowctl_slot_status_ops(a->c->slot, &a->md, &a->msg, a->code, &a->details);
    if (a->n == 0) rb_raise(rb_eNoMemError, "flowctl: out of memory");
    if (!flowctl_pump_start(pump, a->c->slot->status_ops, a->n))
        rb_raise(eFlowctlError, "gRPC refused the status batch");
    if (flowctl_pump_collect(pump)) {
        a->ok = true;
    } else if (a->c->busy > 1) {
        a->interrupted = flowctl_pump_wait_extras(pump);
        a->ok = !a->interrupted && !flowctl_pump_send_failed(pump);
    } else {
        a->linger = true;
    }
    return Qnil;
}

/*
 * Late writes (another thread of the handler still writing when it returned): what was
 * queued before finish leaves before the status; a write after it, or one waiting for room
 * in the queue, raises Flowctl::Cancelled ("already finished") in its thread and never
 * reaches the client, which sees the status the handler meant. The call is cancelled to
 * wake another waiter only when the status did not leave: a cancel after it could reset
 * the stream before the status frames are out (the client saw CANCELLED in 2-6 of 20,000
 * such streams); a reader waiting then wakes as the status closes the stream.
 */
static void
end_call(server_call_t *c)
{
    c->finished = true;
    if (c->busy == 0) {
        call_release(c);
        return;
    }
    if (c->slot->status_sent) flowctl_pump_close_sends(&c->slot->pump); /* wakes a writer; it releases */
    else grpc_call_cancel(c->slot->call, NULL);                         /* wakes the other waiter; it releases */
    c->release_pending = true;
}

static VALUE
finish_cleanup(VALUE p)
{
    struct finish_arg *a = (struct finish_arg *)p;
    server_call_t *c = a->c;
    flowctl_metadata_free(&a->md);
    grpc_slice_unref(a->details);
    if (a->msg) grpc_byte_buffer_destroy(a->msg);
    c->busy--;
    if (a->linger && c->busy == 0) {
        call_slot *slot = c->slot;
        c->slot = NULL;
        c->finished = true;
        flowctl_server_linger(slot->owner, slot);
        return Qnil;
    }
    c->slot->status_sent = a->ok;
    end_call(c);
    return Qnil;
}

/* A unary call's status starts and the server takes the call over (server_unary.c): the
 * worker never waits for it. nil (on its way), or false when gRPC refused it. */
static VALUE
unary_finish(server_call_t *c, struct finish_arg *a)
{
    call_slot *slot = c->slot;
    c->slot = NULL;
    c->finished = true;
    bool ok = flowctl_unary_finish(slot, &a->md, &a->msg, a->code, &a->details);
    flowctl_metadata_free(&a->md);
    grpc_slice_unref(a->details);
    if (a->msg) grpc_byte_buffer_destroy(a->msg);
    if (!ok) c->cancelled = true;
    return ok ? Qnil : Qfalse;
}

/*
 * call-seq:
 *   call.finish(code, details, trailing_metadata, last_message = nil) -> true, nil or false
 *
 * Sends the queued replies, the last message (if any) and the status, and ends the
 * call: true when the status left, nil when it is still on its way (the server sees to
 * it; the worker goes on), false when the call failed (cancelled, or the client took
 * nothing for write_timeout). The call is released afterwards.
 */
static VALUE
server_call_finish(int argc, VALUE *argv, VALUE self)
{
    VALUE code, details, trailing, last;
    rb_scan_args(argc, argv, "31", &code, &details, &trailing, &last);
    server_call_t *c = call_get(self);
    int status = NUM2INT(code);
    if (status < 0 || status > GRPC_STATUS_UNAUTHENTICATED) rb_raise(rb_eArgError, "bad status code %d", status);
    if (!NIL_P(details)) StringValue(details);
    if (!NIL_P(last)) StringValue(last);

    struct finish_arg a = {.self = self, .c = c, .code = (grpc_status_code)status};
    flowctl_metadata_from_hash(trailing, &a.md); /* validates; raises before anything is owned */
    a.details = NIL_P(details) ? grpc_empty_slice()
                               : grpc_slice_from_copied_buffer(RSTRING_PTR(details), (size_t)RSTRING_LEN(details));
    a.msg = NIL_P(last) ? NULL : flowctl_buffer_from_str(last);
    if (c->slot->unary >= 0) return unary_finish(c, &a);
    c->busy++;
    rb_ensure(finish_body, (VALUE)&a, finish_cleanup, (VALUE)&a);
    flowctl_wait_finish(a.interrupted);
    if (a.linger) return Qnil;
    if (!a.ok) c->cancelled = true;
    return a.ok ? Qtrue : Qfalse;
}

/* call-seq: call.cancel -> nil (ends the call with CANCELLED when not finished; idempotent) */
static VALUE
server_call_cancel(VALUE self)
{
    server_call_t *c = rb_check_typeddata(self, &server_call_type);
    if (!c->slot || c->finished || c->pid != flowctl_pid) return Qnil;
    c->cancelled = true;
    end_call(c);
    return Qnil;
}
/* call-seq: call.method_path -> "/package.Service/Method" */
static VALUE
server_call_method(VALUE self)
{
    server_call_t *c = rb_check_typeddata(self, &server_call_type);
    if (!c->slot) return Qnil;
    grpc_slice m = c->slot->details.method;
    return rb_utf8_str_new((const char *)GRPC_SLICE_START_PTR(m), (long)GRPC_SLICE_LENGTH(m));
}

/* call-seq: call.unary_index -> Integer or nil (a registered unary method's index: Native::Server#register_unary) */
static VALUE
server_call_unary_index(VALUE self)
{
    server_call_t *c = rb_check_typeddata(self, &server_call_type);
    return c->slot && c->slot->unary >= 0 ? INT2FIX(c->slot->unary) : Qnil;
}

/* call-seq: call.headers -> Hash (the request metadata) */
static VALUE
server_call_headers(VALUE self)
{
    server_call_t *c = rb_check_typeddata(self, &server_call_type);
    if (!c->slot) return rb_hash_new();
    return flowctl_metadata_to_hash(c->slot->md.metadata, c->slot->md.count);
}

/* call-seq: call.header("authorization") -> String or nil (the first value of one header) */
static VALUE
server_call_header(VALUE self, VALUE key)
{
    server_call_t *c = rb_check_typeddata(self, &server_call_type);
    StringValue(key);
    if (!c->slot) return Qnil;
    for (size_t i = 0; i < c->slot->md.count; i++) {
        grpc_slice k = c->slot->md.metadata[i].key;
        if (GRPC_SLICE_LENGTH(k) == (size_t)RSTRING_LEN(key) &&
            memcmp(GRPC_SLICE_START_PTR(k), RSTRING_PTR(key), (size_t)RSTRING_LEN(key)) == 0) {
            grpc_slice v = c->slot->md.metadata[i].value;
            return rb_utf8_str_new((const char *)GRPC_SLICE_START_PTR(v), (long)GRPC_SLICE_LENGTH(v));
        }
    }
    return Qnil;
}

/* call-seq: call.peer -> "ipv4:127.0.0.1:54321" */
static VALUE
server_call_peer(VALUE self)
{
    server_call_t *c = rb_check_typeddata(self, &server_call_type);
    if (!c->slot) return Qnil;
    char *p = grpc_call_get_peer(c->slot->call);
    VALUE str = rb_str_new_cstr(p ? p : "");
    gpr_free(p);
    return str;
}

/* call-seq: call.deadline -> Float (seconds since the epoch) or nil when the client set none */
static VALUE
server_call_deadline(VALUE self)
{
    server_call_t *c = rb_check_typeddata(self, &server_call_type);
    if (!c->slot) return Qnil;
    gpr_timespec d = c->slot->details.deadline;
    if (gpr_time_cmp(d, gpr_inf_future(d.clock_type)) == 0) return Qnil;
    d = gpr_convert_clock_type(d, GPR_CLOCK_REALTIME);
    return DBL2NUM((double)d.tv_sec + (double)d.tv_nsec / 1e9);
}

/* call-seq: call.cancelled? -> true when a batch failed or the client cancelled or went away
 * (seen without waiting: a handler that neither reads nor writes can ask) */
static VALUE
server_call_cancelled_p(VALUE self)
{
    server_call_t *c = rb_check_typeddata(self, &server_call_type);
    if (!c->cancelled && c->slot && !c->finished && c->pid == flowctl_pid && c->slot->unary >= 0) {
        if (flowctl_unary_peer_gone(c->slot)) c->cancelled = true;
    } else if (!c->cancelled && c->slot && !c->finished && c->pid == flowctl_pid) {
        /* the first look starts watching for the client's cancel; later looks see it */
        flowctl_pump_watch_close(&c->slot->pump);
        if (flowctl_pump_peer_gone(&c->slot->pump, false)) c->cancelled = true;
    }
    return c->cancelled ? Qtrue : Qfalse;
}

/* call-seq: call.finished? -> true once finish or cancel ran */
static VALUE
server_call_finished_p(VALUE self)
{
    server_call_t *c = rb_check_typeddata(self, &server_call_type);
    return c->finished || !c->slot ? Qtrue : Qfalse;
}

VALUE
flowctl_server_call_wrap(call_slot *slot)
{
    server_call_t *c;
    VALUE obj = TypedData_Make_Struct(cServerCall, server_call_t, &server_call_type, c);
    c->slot = slot;
    c->pid = flowctl_pid;
    return obj;
}

void
init_flowctl_server_call(void)
{
    eCancelledCall = rb_const_get(mFlowctl, rb_intern("Cancelled"));

    cServerCall = rb_define_class_under(mFlowctlNative, "ServerCall", rb_cObject);
    rb_undef_alloc_func(cServerCall);
    rb_define_method(cServerCall, "recv", server_call_recv, -1);
    rb_define_method(cServerCall, "send_message", server_call_send, 1);
    rb_define_method(cServerCall, "finish", server_call_finish, -1);
    rb_define_method(cServerCall, "cancel", server_call_cancel, 0);
    rb_define_method(cServerCall, "method_path", server_call_method, 0);
    rb_define_method(cServerCall, "headers", server_call_headers, 0);
    rb_define_method(cServerCall, "unary_index", server_call_unary_index, 0);
    rb_define_method(cServerCall, "header", server_call_header, 1);
    rb_define_method(cServerCall, "peer", server_call_peer, 0);
    rb_define_method(cServerCall, "deadline", server_call_deadline, 0);
    rb_define_method(cServerCall, "cancelled?", server_call_cancelled_p, 0);
    rb_define_method(cServerCall, "finished?", server_call_finished_p, 0);
}
