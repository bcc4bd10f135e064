/*
 * server.c — Flowctl::Native::Server and Flowctl::Native::ServerCall: a grpc_server,
 * its accept loop, and the per-call batches the Ruby layer (lib/flowctl/server.rb)
 * builds handlers on.
 *
 * Reading order:
 *   1. slots: one outstanding grpc_server_request_call each, with its own pump (pump.c)
 *      whose queue the accepted call's batches complete on.
 *   2. the acceptor: a native thread (no GVL, no Ruby) that takes new calls off the
 *      server's notification queue and hands them to Ruby workers waiting in
 *      Server#next_call. When none is idle, a few calls (max_waiting) may wait a moment
 *      (max_wait) for one; any other call gets RESOURCE_EXHAUSTED from the acceptor
 *      itself, so nothing queues without bound.
 *   3. Native::Server: ports, start, shutdown, cancel_all, close.
 *   4. Native::ServerCall: recv / send_message / finish on the pump, waiting without the
 *      GVL (an interrupt cancels the call and the wait goes on until nothing is in
 *      flight); streams read ahead and write behind.
 */
#include "flowctl.h"
#include <grpc/support/alloc.h>
#include <pthread.h>
#include <errno.h>
#include <time.h>

#define OUTSTANDING_REQUESTS 8

static VALUE cServer, cServerCall, eCancelledCall;

/* ---- 1. slots --------------------------------------------------------------- */

typedef struct call_slot {
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    flowctl_pump pump;          /* the call's batches complete on pump.cq (pump.c) */
    bool status_sent;           /* the status batch completed: never cancel after that */
    struct call_slot *next;     /* handoff queue link */
    gpr_timespec wait_until;    /* queued with no idle worker: rejected after this */
} call_slot;

static call_slot *
slot_new(void)
{
    call_slot *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    grpc_call_details_init(&s->details);
    grpc_metadata_array_init(&s->md);
    flowctl_pump_init(&s->pump, NULL, grpc_completion_queue_create_for_next(NULL));
    s->pump.send_initial_md = true;
    return s;
}

/*
 * Frees a slot, cancelling the call when it never got its status and waiting for what
 * is in flight (a cancelled batch completes at once). (A cancel after the status batch
 * completed could still reset the stream before the status frames are flushed, and the
 * client would see CANCELLED.)
 */
static void
slot_free(call_slot *s)
{
    if (!s) return;
    flowctl_pump_destroy(&s->pump, s->call && !s->status_sent);
    if (s->call) grpc_call_unref(s->call);
    grpc_call_details_destroy(&s->details);
    grpc_metadata_array_destroy(&s->md);
    free(s);
}

/* ---- 2. the server and its acceptor ---------------------------------------- */

typedef struct {
    grpc_server *server;
    grpc_completion_queue *notify_cq; /* registered with the server: new calls + shutdown */
    pthread_t acceptor;
    pthread_mutex_t mu;
    pthread_cond_t cond;              /* shutdown done, acceptor done */
    pthread_cond_t work;              /* workers: a call was queued, or the server shuts down */
    call_slot *queue_head, *queue_tail;
    int queued;
    int idle;                         /* Ruby workers waiting in Server#next_call */
    int max_waiting;                  /* calls that may wait for a worker beyond the idle ones */
    gpr_timespec max_wait;            /* how long such a call waits before RESOURCE_EXHAUSTED */
    int outstanding;                  /* grpc_server_request_call in flight */
    long accepted, rejected;
    bool started, shutting_down, shutdown_done, acceptor_done, closed, orphaned;
    char shutdown_tag;                /* its address is the shutdown tag */
    pid_t pid;                        /* in a forked child the server is the parent's: leave it */
} server_t;

static void server_destroy_grpc(server_t *s);

/* Asks gRPC for the next call (s->mu not held: creating a slot takes a while). */
static bool
arm_request(server_t *s)
{
    pthread_mutex_lock(&s->mu);
    s->outstanding++;
    pthread_mutex_unlock(&s->mu);
    call_slot *slot = slot_new();
    grpc_call_error err = GRPC_CALL_ERROR;
    if (slot)
        err = grpc_server_request_call(s->server, &slot->call, &slot->details, &slot->md, slot->pump.cq,
                                       s->notify_cq, slot);
    if (err == GRPC_CALL_OK) return true;
    slot_free(slot);
    pthread_mutex_lock(&s->mu);
    s->outstanding--;
    pthread_mutex_unlock(&s->mu);
    return false;
}

/* Answers a call no worker can take; runs on the acceptor thread. */
static void
reject_call(call_slot *slot, grpc_status_code code, const char *msg)
{
    grpc_op ops[3];
    memset(ops, 0, sizeof(ops));
    int cancelled = 0;
    grpc_slice details = grpc_slice_from_static_string(msg);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[1].data.send_status_from_server.status = code;
    ops[1].data.send_status_from_server.status_details = &details;
    ops[2].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[2].data.recv_close_on_server.cancelled = &cancelled;
    if (flowctl_pump_start(&slot->pump, ops, 3)) {
        gpr_timespec limit = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_seconds(2, GPR_TIMESPAN));
        slot->status_sent = flowctl_pump_drain(&slot->pump, limit);
        if (!slot->status_sent) grpc_call_cancel(slot->call, NULL);
        flowctl_pump_drain(&slot->pump, gpr_inf_future(GPR_CLOCK_MONOTONIC)); /* ops live until done */
    }
    slot_free(slot);
}

/*
 * Hands a new call to an idle worker, or lets it wait (at most max_waiting of them, each
 * for at most max_wait: a worker about to finish its call takes it), or returns it for
 * the caller to reject outside the lock. Called with s->mu held.
 */
static call_slot *
dispatch_locked(server_t *s, call_slot *slot)
{
    if (s->queued >= s->idle + s->max_waiting) return slot;
    slot->next = NULL;
    slot->wait_until = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), s->max_wait);
    if (s->queue_tail) s->queue_tail->next = slot; else s->queue_head = slot;
    s->queue_tail = slot;
    s->queued++;
    s->accepted++;
    return NULL;
}

#define BUSY_MESSAGE "server busy: every worker is serving a call"

/*
 * A new call: the next one is asked for, the first request message is read while the call
 * waits for its worker, and a worker is woken. s->mu is held only to queue the call, so
 * the worker that wakes does not wait for the acceptor's lock.
 */
static void
on_request(server_t *s, call_slot *slot, bool success)
{
    pthread_mutex_lock(&s->mu);
    s->outstanding--;
    bool stopping = s->shutting_down;
    pthread_mutex_unlock(&s->mu);
    if (success) {
        slot->pump.call = slot->call;
        if (!stopping) arm_request(s);
        flowctl_pump_start_reading(&slot->pump, false, 1); /* a rejected call drains it */
    }
    pthread_mutex_lock(&s->mu);
    call_slot *reject = success && !s->shutting_down ? dispatch_locked(s, slot) : slot;
    if (reject && success) s->rejected++;
    pthread_mutex_unlock(&s->mu);
    if (!reject) {
        pthread_cond_signal(&s->work); /* one call, one worker */
        return;
    }
    if (success) reject_call(reject, GRPC_STATUS_RESOURCE_EXHAUSTED, BUSY_MESSAGE);
    else slot_free(reject);
}

/* The acceptor wakes up to reject a call that waited too long, and at least every
 * ACCEPTOR_POLL_MS so that it steps out of gRPC when a fork is being prepared (fork.c). */
#define ACCEPTOR_POLL_MS 50

static gpr_timespec
next_expiry(server_t *s)
{
    gpr_timespec t = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ACCEPTOR_POLL_MS, GPR_TIMESPAN));
    pthread_mutex_lock(&s->mu);
    if (s->queued > s->idle && s->queue_head && gpr_time_cmp(s->queue_head->wait_until, t) < 0)
        t = s->queue_head->wait_until;
    pthread_mutex_unlock(&s->mu);
    return t;
}

/* Rejects the calls that waited max_wait with no worker free (FIFO: the oldest first). */
static void
reject_expired(server_t *s)
{
    call_slot *expired = NULL, **tail = &expired;
    gpr_timespec now = gpr_now(GPR_CLOCK_MONOTONIC);
    pthread_mutex_lock(&s->mu);
    while (s->queue_head && s->queued > s->idle && gpr_time_cmp(s->queue_head->wait_until, now) <= 0) {
        call_slot *slot = s->queue_head;
        s->queue_head = slot->next;
        if (!s->queue_head) s->queue_tail = NULL;
        s->queued--;
        s->accepted--;
        s->rejected++;
        slot->next = NULL;
        *tail = slot;
        tail = &slot->next;
    }
    pthread_mutex_unlock(&s->mu);
    while (expired) {
        call_slot *slot = expired;
        expired = slot->next;
        reject_call(slot, GRPC_STATUS_RESOURCE_EXHAUSTED, BUSY_MESSAGE);
    }
}

/* One turn of the acceptor, inside the fork gate; true once the server is done. */
static bool
acceptor_step(server_t *s)
{
    grpc_event ev = grpc_completion_queue_next(s->notify_cq, next_expiry(s), NULL);
    if (ev.type == GRPC_QUEUE_TIMEOUT) {
        reject_expired(s);
        return false;
    }
    if (ev.type != GRPC_OP_COMPLETE) return true;
    if (ev.tag == &s->shutdown_tag) {
        pthread_mutex_lock(&s->mu);
        s->shutdown_done = true;
        pthread_cond_broadcast(&s->cond);
        pthread_mutex_unlock(&s->mu);
    } else {
        on_request(s, ev.tag, ev.success);
    }
    pthread_mutex_lock(&s->mu);
    bool done = s->shutdown_done && s->outstanding == 0;
    pthread_mutex_unlock(&s->mu);
    return done;
}

static void *
acceptor_main(void *p)
{
    server_t *s = p;
    bool done = false;
    while (!done) {
        flowctl_gate_enter();
        done = acceptor_step(s);
        flowctl_gate_leave();
    }
    pthread_mutex_lock(&s->mu);
    s->acceptor_done = true;
    bool orphaned = s->orphaned;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->mu);
    if (orphaned) {
        /* The Ruby object was collected while serving: nobody joins us, clean up here. */
        pthread_detach(pthread_self());
        flowctl_gate_enter();
        server_destroy_grpc(s);
        flowctl_gate_leave();
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cond);
        pthread_cond_destroy(&s->work);
        free(s);
    }
    return NULL;
}

/* ---- 3. Native::Server ------------------------------------------------------ */

static void
server_destroy_grpc(server_t *s)
{
    while (s->queue_head) {
        call_slot *slot = s->queue_head;
        s->queue_head = slot->next;
        slot_free(slot);
    }
    s->queue_tail = NULL;
    s->queued = 0;
    if (s->server) grpc_server_destroy(s->server);
    s->server = NULL;
    if (s->notify_cq) {
        grpc_completion_queue_shutdown(s->notify_cq);
        while (grpc_completion_queue_next(s->notify_cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
               GRPC_QUEUE_SHUTDOWN) {
        }
        grpc_completion_queue_destroy(s->notify_cq);
        s->notify_cq = NULL;
    }
}

/* A server that never started has no acceptor: complete its shutdown right here. */
static void
shutdown_unstarted(server_t *s)
{
    grpc_server_shutdown_and_notify(s->server, s->notify_cq, &s->shutdown_tag);
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->notify_cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type != GRPC_OP_COMPLETE || ev.tag == &s->shutdown_tag) break;
    }
    pthread_mutex_lock(&s->mu);
    s->shutting_down = s->shutdown_done = true;
    pthread_cond_broadcast(&s->work); /* workers waiting for calls that never come */
    pthread_mutex_unlock(&s->mu);
}

static void
server_free(void *p)
{
    server_t *s = p;
    if (s->pid != flowctl_pid) {
        /* a forked child's copy: no acceptor thread, sockets closed by gRPC's fork handler */
        free(s);
        return;
    }
    if (s->started && !s->closed) {
        /* Never block in dfree: start the shutdown, let the acceptor thread free everything. */
        pthread_mutex_lock(&s->mu);
        bool done = s->acceptor_done;
        s->orphaned = !done;
        if (!s->shutting_down) {
            s->shutting_down = true;
            grpc_server_shutdown_and_notify(s->server, s->notify_cq, &s->shutdown_tag);
        }
        if (!done) grpc_server_cancel_all_calls(s->server);
        pthread_mutex_unlock(&s->mu);
        if (!done) return; /* the acceptor frees s once every call has ended */
        pthread_join(s->acceptor, NULL);
    } else if (!s->closed && s->server) {
        /* never started: grpc_server_destroy still wants a completed shutdown */
        shutdown_unstarted(s);
    }
    if (!s->closed) server_destroy_grpc(s);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cond);
    pthread_cond_destroy(&s->work);
    free(s);
}

static size_t
server_memsize(const void *p)
{
    const server_t *s = p;
    return sizeof(*s) + (size_t)(s->queued + s->outstanding) * sizeof(call_slot);
}

static const rb_data_type_t server_type = {
    .wrap_struct_name = "Flowctl::Native::Server",
    .function = {.dmark = NULL, .dfree = server_free, .dsize = server_memsize},
    /* dfree never blocks and never calls Ruby (see server_free). */
    .flags = RUBY_TYPED_FREE_IMMEDIATELY,
};

static VALUE
server_alloc(VALUE klass)
{
    server_t *s = calloc(1, sizeof(*s));
    if (!s) rb_raise(rb_eNoMemError, "flowctl: out of memory");
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cond, NULL);
    pthread_cond_init(&s->work, NULL);
    s->pid = flowctl_pid;
    return TypedData_Wrap_Struct(klass, &server_type, s);
}

/* The server; IOError in a forked child (its threads and sockets are the parent's). */
static server_t *
server_of(VALUE self)
{
    server_t *s = rb_check_typeddata(self, &server_type);
    if (s->pid != flowctl_pid)
        rb_raise(rb_eIOError, "server was created before fork (in process %d): start a new one in this process",
                 (int)s->pid);
    return s;
}

/* As server_of, and IOError once closed. */
static server_t *
server_get(VALUE self)
{
    server_t *s = server_of(self);
    if (!s->server) rb_raise(rb_eIOError, "server is closed");
    return s;
}

/*
 * call-seq:
 *   Flowctl::Native::Server.new(channel_args) -> server
 *
 * channel_args: grpc.* server options, as Flowctl::ChannelArgs.normalize returns them.
 */
static VALUE
server_initialize(VALUE self, VALUE args)
{
    server_t *s = rb_check_typeddata(self, &server_type);
    if (s->server || s->closed) rb_raise(rb_eRuntimeError, "server already initialized");
    Check_Type(args, T_HASH);
    grpc_channel_args cargs = {.num_args = 0, .args = ALLOCA_N(grpc_arg, RHASH_SIZE(args) + 1)};
    cargs.num_args = flowctl_channel_args_fill(args, cargs.args);
    cargs.args[cargs.num_args++] = flowctl_fork_socket_arg();
    s->server = grpc_server_create(&cargs, NULL);
    RB_GC_GUARD(args);
    s->notify_cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->server, s->notify_cq, NULL);
    return self;
}

static grpc_ssl_client_certificate_request_type
client_auth_type(VALUE sym)
{
    if (sym == ID2SYM(rb_intern("require"))) return GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
    if (sym == ID2SYM(rb_intern("request"))) return GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY;
    if (NIL_P(sym) || sym == ID2SYM(rb_intern("none"))) return GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE;
    rb_raise(rb_eArgError, "client_auth must be :none, :request or :require (given %+"PRIsVALUE")", sym);
}

/* tls: false -> insecure; [root_pem, key_pem, cert_pem, client_auth] -> TLS. */
static grpc_server_credentials *
server_creds(VALUE tls)
{
    if (tls == Qfalse) return grpc_insecure_server_credentials_create();
    Check_Type(tls, T_ARRAY);
    VALUE root = rb_ary_entry(tls, 0), key = rb_ary_entry(tls, 1), cert = rb_ary_entry(tls, 2);
    if (NIL_P(key) || NIL_P(cert))
        rb_raise(rb_eArgError, "a TLS server needs cert_chain: and private_key:");
    grpc_ssl_client_certificate_request_type req = client_auth_type(rb_ary_entry(tls, 3));
    if (req != GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE && NIL_P(root))
        rb_raise(rb_eArgError, "client_auth needs root_certs: to verify client certificates");
    grpc_ssl_pem_key_cert_pair pair = {.private_key = StringValueCStr(key), .cert_chain = StringValueCStr(cert)};
    return grpc_ssl_server_credentials_create_ex(NIL_P(root) ? NULL : StringValueCStr(root), &pair, 1, req, NULL);
}

/*
 * call-seq:
 *   server.add_port("127.0.0.1:0", tls) -> Integer (the bound port)
 *
 * tls is false (plaintext) or [root_certs, private_key, cert_chain, client_auth].
 */
static VALUE
server_add_port(VALUE self, VALUE addr, VALUE tls)
{
    server_t *s = server_get(self);
    if (s->started) rb_raise(rb_eRuntimeError, "add ports before the server starts");
    const char *a = StringValueCStr(addr);
    grpc_server_credentials *creds = server_creds(tls);
    int port = grpc_server_add_http2_port(s->server, a, creds);
    grpc_server_credentials_release(creds);
    if (port <= 0) rb_raise(rb_eArgError, "cannot listen on %s (address in use, bad address or bad TLS keys)", a);
    return INT2FIX(port);
}

/*
 * call-seq: server.start(max_waiting, max_wait) -> self
 *
 * Starts the native acceptor thread. When no worker is idle, up to max_waiting calls wait
 * up to max_wait seconds each for one; other calls get RESOURCE_EXHAUSTED at once.
 */
static VALUE
server_start(VALUE self, VALUE max_waiting, VALUE max_wait)
{
    server_t *s = server_get(self);
    if (s->started) rb_raise(rb_eRuntimeError, "server already started");
    int waiting = NUM2INT(max_waiting);
    double wait = NUM2DBL(max_wait);
    if (waiting < 0 || wait < 0) rb_raise(rb_eArgError, "max_waiting and max_wait must not be negative");
    s->max_waiting = waiting;
    s->max_wait = gpr_time_from_micros((int64_t)(wait * 1e6), GPR_TIMESPAN);
    grpc_server_start(s->server);
    s->started = true;
    for (int i = 0; i < OUTSTANDING_REQUESTS; i++) arm_request(s);
    int err = pthread_create(&s->acceptor, NULL, acceptor_main, s);
    if (err) {
        s->started = false;
        rb_syserr_fail(err, "flowctl: cannot start the server's acceptor thread");
    }
    return self;
}

/* call-seq: server.shutdown -> nil (stops accepting; calls in flight go on; idempotent) */
static VALUE
server_shutdown(VALUE self)
{
    server_t *s = server_get(self);
    pthread_mutex_lock(&s->mu);
    bool first = !s->shutting_down;
    s->shutting_down = true;
    pthread_cond_broadcast(&s->cond);
    pthread_cond_broadcast(&s->work);
    pthread_mutex_unlock(&s->mu);
    if (first) grpc_server_shutdown_and_notify(s->server, s->notify_cq, &s->shutdown_tag);
    return Qnil;
}

/* call-seq: server.cancel_all -> nil (cancels every call in flight) */
static VALUE
server_cancel_all(VALUE self)
{
    grpc_server_cancel_all_calls(server_get(self)->server);
    return Qnil;
}

struct cond_wait_arg {
    server_t *s;
    double timeout; /* < 0: no limit */
    bool (*ready)(server_t *);
    bool stop;      /* set by the unblock function */
    bool result;
};

static void *
cond_wait_nogvl(void *p)
{
    struct cond_wait_arg *a = p;
    server_t *s = a->s;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    double t = a->timeout < 0 ? 0 : a->timeout;
    until.tv_sec += (time_t)t;
    until.tv_nsec += (long)((t - (double)(time_t)t) * 1e9);
    if (until.tv_nsec >= 1000000000L) { until.tv_sec++; until.tv_nsec -= 1000000000L; }
    pthread_mutex_lock(&s->mu);
    while (!a->ready(s) && !a->stop) {
        if (a->timeout < 0) pthread_cond_wait(&s->cond, &s->mu);
        else if (pthread_cond_timedwait(&s->cond, &s->mu, &until) == ETIMEDOUT) break;
    }
    a->result = a->ready(s);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static void
cond_wait_ubf(void *p)
{
    struct cond_wait_arg *a = p;
    pthread_mutex_lock(&a->s->mu);
    a->stop = true;
    pthread_cond_broadcast(&a->s->cond);
    pthread_mutex_unlock(&a->s->mu);
}

static bool shutdown_ready(server_t *s) { return s->shutdown_done; }
static bool acceptor_ready(server_t *s) { return s->acceptor_done; }

static bool
wait_cond(server_t *s, bool (*ready)(server_t *), double timeout)
{
    struct cond_wait_arg a = {.s = s, .timeout = timeout, .ready = ready};
    rb_thread_call_without_gvl(cond_wait_nogvl, &a, cond_wait_ubf, &a);
    rb_thread_check_ints();
    return a.result;
}

/*
 * call-seq: server.wait_shutdown(timeout = nil) -> true or false
 *
 * Waits (without the GVL) until every call has ended after #shutdown; false on timeout.
 */
static VALUE
server_wait_shutdown(int argc, VALUE *argv, VALUE self)
{
    VALUE timeout;
    rb_scan_args(argc, argv, "01", &timeout);
    server_t *s = server_get(self);
    if (!s->shutting_down) rb_raise(rb_eRuntimeError, "call shutdown first");
    return wait_cond(s, shutdown_ready, NIL_P(timeout) ? -1.0 : NUM2DBL(timeout)) ? Qtrue : Qfalse;
}

/*
 * call-seq: server.close -> nil
 *
 * After #wait_shutdown returned true: joins the acceptor and frees the grpc_server. Idempotent.
 */
static VALUE
server_close(VALUE self)
{
    server_t *s = rb_check_typeddata(self, &server_type);
    if (s->closed || s->pid != flowctl_pid) return Qnil; /* a forked child's copy is the parent's */
    if (s->started) {
        if (!s->shutdown_done) rb_raise(rb_eRuntimeError, "server still has calls in flight: shut it down first");
        wait_cond(s, acceptor_ready, -1.0);
        pthread_join(s->acceptor, NULL);
    } else if (s->server) {
        shutdown_unstarted(s);
    }
    s->closed = true;
    server_destroy_grpc(s);
    return Qnil;
}

/* call-seq: server.stats -> {accepted:, rejected:, idle:, queued:} */
static VALUE
server_stats(VALUE self)
{
    server_t *s = server_of(self);
    pthread_mutex_lock(&s->mu);
    long acc = s->accepted, rej = s->rejected;
    int idle = s->idle, queued = s->queued;
    pthread_mutex_unlock(&s->mu);
    VALUE h = rb_hash_new();
    rb_hash_aset(h, ID2SYM(rb_intern("accepted")), LONG2NUM(acc));
    rb_hash_aset(h, ID2SYM(rb_intern("rejected")), LONG2NUM(rej));
    rb_hash_aset(h, ID2SYM(rb_intern("idle")), INT2FIX(idle));
    rb_hash_aset(h, ID2SYM(rb_intern("queued")), INT2FIX(queued));
    return h;
}

/* ---- 4. Native::ServerCall -------------------------------------------------- */

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
    pid_t pid;
} server_call_t;

static void
call_release(server_call_t *c)
{
    slot_free(c->slot);
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

struct next_arg {
    server_t *s;
    call_slot *slot;
    bool stop;
};

static void *
next_nogvl(void *p)
{
    struct next_arg *a = p;
    server_t *s = a->s;
    pthread_mutex_lock(&s->mu);
    s->idle++;
    while (!s->queue_head && !s->shutting_down && !a->stop) pthread_cond_wait(&s->work, &s->mu);
    if (s->queue_head) {
        a->slot = s->queue_head;
        s->queue_head = a->slot->next;
        if (!s->queue_head) s->queue_tail = NULL;
        s->queued--;
    }
    s->idle--;
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static void
next_ubf(void *p)
{
    struct next_arg *a = p;
    pthread_mutex_lock(&a->s->mu);
    a->stop = true;
    pthread_cond_broadcast(&a->s->work);
    pthread_mutex_unlock(&a->s->mu);
}

static VALUE
wrap_slot(call_slot *slot)
{
    server_call_t *c;
    VALUE obj = TypedData_Make_Struct(cServerCall, server_call_t, &server_call_type, c);
    c->slot = slot;
    c->pid = flowctl_pid;
    return obj;
}

/*
 * call-seq:
 *   server.next_call -> Flowctl::Native::ServerCall or nil
 *
 * Waits without the GVL until the acceptor hands this worker a call; nil once the server
 * shuts down. While a thread waits here it counts as an idle worker.
 */
static VALUE
server_next_call(VALUE self)
{
    server_t *s = server_get(self);
    for (;;) {
        struct next_arg a = {.s = s};
        /* INTR_FAIL: no interrupt check after the wait, so a popped call is never dropped */
        rb_nogvl(next_nogvl, &a, next_ubf, &a, RB_NOGVL_INTR_FAIL);
        if (a.slot) {
            VALUE call = wrap_slot(a.slot); /* owns the slot from here on, even if an interrupt follows */
            rb_thread_check_ints();
            return call;
        }
        pthread_mutex_lock(&s->mu);
        bool stopping = s->shutting_down && !s->queue_head;
        pthread_mutex_unlock(&s->mu);
        if (stopping) return Qnil;
        rb_thread_check_ints(); /* raises a real interrupt; a time-slice flag just loops */
    }
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

/*
 * call-seq:
 *   call.recv(read_ahead = false) -> String or nil
 *
 * The next request message (binary String), or nil when the client has half-closed.
 * read_ahead keeps reading the following messages while the handler runs (streams).
 * Raises Flowctl::Cancelled when the client went away.
 */
static VALUE
server_call_recv(int argc, VALUE *argv, VALUE self)
{
    VALUE ahead;
    rb_scan_args(argc, argv, "01", &ahead);
    server_call_t *c = call_get(self);
    if (c->read_done) return Qnil;
    flowctl_pump *p = &c->slot->pump;
    flowctl_pump_read_more(p, RTEST(ahead) ? PUMP_UNLIMITED : 1);
    grpc_byte_buffer *buf;
    c->busy++;
    int interrupted = flowctl_pump_read(p, &buf);
    bool ok = true;
    VALUE str = Qnil;
    if (buf) {
        str = flowctl_str_from_buffer(buf);
        grpc_byte_buffer_destroy(buf);
    } else if (!interrupted) {
        /* no message: a half-close, unless the client cancelled or went away */
        ok = !flowctl_pump_recv_failed(p) && !grpc_call_failed_before_recv_message(c->slot->call);
        if (ok) c->read_done = true;
        else c->cancelled = true;
    }
    after_wait(c, self);
    flowctl_wait_finish(interrupted);
    if (!ok) rb_raise(eCancelledCall, "the client cancelled the call or went away");
    return str;
}

/*
 * call-seq:
 *   call.send_message(bytes) -> self
 *
 * Queues one reply message (the first one carries the initial metadata); waits only
 * while many are queued (the client reads slowly). Raises Flowctl::Cancelled when the
 * client went away.
 */
static VALUE
server_call_send(VALUE self, VALUE bytes)
{
    server_call_t *c = call_get(self);
    StringValue(bytes);
    /* a client that left while the handler was busy elsewhere is seen here, not only once
     * a reply fails to go out (which nobody may poll for) */
    flowctl_pump_watch_close(&c->slot->pump);
    if (flowctl_pump_peer_gone(&c->slot->pump)) {
        c->cancelled = true;
        rb_raise(eCancelledCall, "the client cancelled the call or went away");
    }
    bool failed = false;
    c->busy++;
    int interrupted = flowctl_pump_write(&c->slot->pump, bytes, &failed);
    if (failed) c->cancelled = true;
    after_wait(c, self);
    flowctl_wait_finish(interrupted);
    if (failed) rb_raise(eCancelledCall, "the client cancelled the call or went away");
    RB_GC_GUARD(bytes);
    return self;
}

struct finish_arg {
    VALUE self;
    server_call_t *c;
    grpc_op ops[4];
    size_t n;
    flowctl_metadata md;
    grpc_slice details;
    grpc_byte_buffer *msg;
    grpc_status_code code;
    int cancelled;
    int interrupted;
    bool ok;
};

static void
finish_ops(struct finish_arg *a)
{
    if (flowctl_pump_take_initial_md(&a->c->slot->pump)) {
        memset(&a->ops[a->n], 0, sizeof(grpc_op));
        a->ops[a->n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    }
    if (a->msg) {
        memset(&a->ops[a->n], 0, sizeof(grpc_op));
        a->ops[a->n].op = GRPC_OP_SEND_MESSAGE;
        a->ops[a->n++].data.send_message.send_message = a->msg;
    }
    memset(&a->ops[a->n], 0, sizeof(grpc_op));
    a->ops[a->n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    a->ops[a->n].data.send_status_from_server.status = a->code;
    a->ops[a->n].data.send_status_from_server.status_details = &a->details;
    a->ops[a->n].data.send_status_from_server.trailing_metadata = a->md.md;
    a->ops[a->n++].data.send_status_from_server.trailing_metadata_count = a->md.count;
    if (a->c->slot->pump.close_watching) return; /* started before: finish_body waits for it */
    memset(&a->ops[a->n], 0, sizeof(grpc_op));
    a->ops[a->n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    a->ops[a->n++].data.recv_close_on_server.cancelled = &a->cancelled;
}

/* The queued replies first, then the status (ops built only now: the first reply may
 * have carried the initial metadata). */
static VALUE
finish_body(VALUE p)
{
    struct finish_arg *a = (struct finish_arg *)p;
    flowctl_pump *pump = &a->c->slot->pump;
    a->interrupted = flowctl_pump_flush(pump);
    if (a->interrupted || flowctl_pump_send_failed(pump)) return Qnil;
    finish_ops(a);
    a->interrupted = flowctl_pump_run(pump, a->ops, a->n, &a->ok);
    if (!a->interrupted && pump->close_watching) a->interrupted = flowctl_pump_wait_close(pump, &a->cancelled);
    return Qnil;
}

static void
end_call(server_call_t *c)
{
    c->finished = true;
    if (c->busy == 0) {
        call_release(c);
    } else {
        grpc_call_cancel(c->slot->call, NULL); /* wakes the other waiter; it releases */
        c->release_pending = true;
    }
}

static VALUE
finish_cleanup(VALUE p)
{
    struct finish_arg *a = (struct finish_arg *)p;
    flowctl_metadata_free(&a->md);
    grpc_slice_unref(a->details);
    if (a->msg) grpc_byte_buffer_destroy(a->msg);
    a->c->busy--;
    a->c->slot->status_sent = a->ok;
    end_call(a->c);
    return Qnil;
}

/*
 * call-seq:
 *   call.finish(code, details, trailing_metadata, last_message = nil) -> true or false
 *
 * Sends the queued replies, the last message (if any) and the status, and ends the
 * call; true when the client got it, false when the call was cancelled. The call is
 * released afterwards.
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
    c->busy++;
    rb_ensure(finish_body, (VALUE)&a, finish_cleanup, (VALUE)&a);
    flowctl_wait_finish(a.interrupted);
    if (!a.ok || a.cancelled) c->cancelled = true;
    return a.ok && !a.cancelled ? Qtrue : Qfalse;
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
    if (!c->cancelled && c->slot && !c->finished && c->pid == flowctl_pid) {
        /* the first look starts watching for the client's cancel; later looks see it */
        flowctl_pump_watch_close(&c->slot->pump);
        if (flowctl_pump_peer_gone(&c->slot->pump)) c->cancelled = true;
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

void
init_flowctl_server(void)
{
    eCancelledCall = rb_const_get(mFlowctl, rb_intern("Cancelled"));

    cServer = rb_define_class_under(mFlowctlNative, "Server", rb_cObject);
    rb_define_alloc_func(cServer, server_alloc);
    rb_define_method(cServer, "initialize", server_initialize, 1);
    rb_define_method(cServer, "add_port", server_add_port, 2);
    rb_define_method(cServer, "start", server_start, 2);
    rb_define_method(cServer, "next_call", server_next_call, 0);
    rb_define_method(cServer, "shutdown", server_shutdown, 0);
    rb_define_method(cServer, "wait_shutdown", server_wait_shutdown, -1);
    rb_define_method(cServer, "cancel_all", server_cancel_all, 0);
    rb_define_method(cServer, "close", server_close, 0);
    rb_define_method(cServer, "stats", server_stats, 0);

    cServerCall = rb_define_class_under(mFlowctlNative, "ServerCall", rb_cObject);
    rb_undef_alloc_func(cServerCall);
    rb_define_method(cServerCall, "recv", server_call_recv, -1);
    rb_define_method(cServerCall, "send_message", server_call_send, 1);
    rb_define_method(cServerCall, "finish", server_call_finish, -1);
    rb_define_method(cServerCall, "cancel", server_call_cancel, 0);
    rb_define_method(cServerCall, "method_path", server_call_method, 0);
    rb_define_method(cServerCall, "headers", server_call_headers, 0);
    rb_define_method(cServerCall, "header", server_call_header, 1);
    rb_define_method(cServerCall, "peer", server_call_peer, 0);
    rb_define_method(cServerCall, "deadline", server_call_deadline, 0);
    rb_define_method(cServerCall, "cancelled?", server_call_cancelled_p, 0);
    rb_define_method(cServerCall, "finished?", server_call_finished_p, 0);
}
