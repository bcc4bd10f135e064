/*
 * server.c — Flowctl::Native::Server: the Ruby binding of the native server engine
 * (server_engine.c). Arguments are checked here (policy and defaults are the Ruby layer's,
 * lib/flowctl/server.rb); every wait leaves the GVL and can be interrupted. The calls it
 * hands out are Flowctl::Native::ServerCall objects (server_call.c).
 */
#include "server_engine.h"

static VALUE cServer;

static void
server_free(void *p)
{
    flowctl_server_free(p);
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
    /* dfree never blocks and never calls Ruby (see flowctl_server_free). */
    .flags = RUBY_TYPED_FREE_IMMEDIATELY,
};

static VALUE
server_alloc(VALUE klass)
{
    server_t *s = flowctl_server_new();
    if (!s) rb_raise(rb_eNoMemError, "flowctl: out of memory");
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
    flowctl_server_create(s, &cargs);
    RB_GC_GUARD(args);
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
    if (s->n_ports < (int)(sizeof(s->ports) / sizeof(s->ports[0]))) s->ports[s->n_ports++] = port;
    return INT2FIX(port);
}

/*
 * call-seq: server.start(max_waiting, max_wait, write_timeout = 0, auth_token = nil, memory_burst = nil) -> self
 *
 * Starts the native acceptor thread. When no worker is idle, up to max_waiting calls wait
 * up to max_wait seconds each for one; other calls get RESOURCE_EXHAUSTED at once. A
 * peer that takes nothing the server sends for write_timeout seconds (0: no limit) has
 * its call cancelled, and its connection shut down when a status could not leave. With
 * auth_token, the acceptor answers calls without "authorization: Bearer <auth_token>"
 * (auth.c) with UNAUTHENTICATED itself. memory_burst (bytes): see server_engine.c, 2c.
 */
static VALUE
server_start(int argc, VALUE *argv, VALUE self)
{
    VALUE max_waiting, max_wait, write_timeout, auth, burst;
    rb_scan_args(argc, argv, "23", &max_waiting, &max_wait, &write_timeout, &auth, &burst);
    server_t *s = server_get(self);
    if (s->started) rb_raise(rb_eRuntimeError, "server already started");
    s->memory_burst = NIL_P(burst) ? 0 : NUM2SIZET(burst);
    double wt = NIL_P(write_timeout) ? 0.0 : NUM2DBL(write_timeout);
    if (wt < 0 || wt > 1e9) rb_raise(rb_eArgError, "write_timeout must be between 0 and 1e9 seconds");
    s->write_timeout_ms = (int64_t)(wt * 1000);
    if (!NIL_P(auth)) {
        StringValue(auth);
        free(s->auth_token);
        s->auth_len = (size_t)RSTRING_LEN(auth);
        s->auth_token = malloc(s->auth_len + 1);
        if (!s->auth_token) rb_raise(rb_eNoMemError, "flowctl: out of memory");
        memcpy(s->auth_token, RSTRING_PTR(auth), s->auth_len);
    }
    int waiting = NUM2INT(max_waiting);
    double wait = NUM2DBL(max_wait);
    if (waiting < 0 || wait < 0) rb_raise(rb_eArgError, "max_waiting and max_wait must not be negative");
    s->max_waiting = waiting;
    s->max_wait = gpr_time_from_micros((int64_t)(wait * 1e6), GPR_TIMESPAN);
    int err = flowctl_server_start(s);
    if (err) rb_syserr_fail(err, "flowctl: cannot start the server's acceptor thread");
    return self;
}

/*
 * call-seq: server.register_unary("/package.Service/Method") -> self
 *
 * Before #start: serves that method's calls as unary ones (server_unary.c: one request,
 * one reply with the status, no completion queue of their own).
 */
static VALUE
server_register_unary(VALUE self, VALUE path)
{
    server_t *s = server_get(self);
    if (s->started) rb_raise(rb_eRuntimeError, "register unary methods before the server starts");
    if (!flowctl_server_register_unary(s, StringValueCStr(path)))
        rb_raise(rb_eArgError, "cannot register %+"PRIsVALUE" (registered already, or more than %d methods)", path,
                 FLOWCTL_MAX_UNARY);
    return self;
}

/*
 * call-seq: server.answer_natively("/package.Service/Method", beat_table) -> self
 *
 * Before #start, for a method registered with #register_unary: its requests are offered to
 * beat_table (a Flowctl::Native::BeatTable) on the acceptor thread first; what the table
 * takes in is answered there (an empty reply, OK) and never reaches a worker; anything
 * else is served by a worker as before. Counted in #stats (answered_natively).
 */
static VALUE
server_answer_natively(VALUE self, VALUE path, VALUE table)
{
    server_t *s = server_get(self);
    if (s->started) rb_raise(rb_eRuntimeError, "set native answers before the server starts");
    const char *p = StringValueCStr(path);
    flowctl_fast_unary fast = flowctl_beat_table_hook(flowctl_beat_table_of(table));
    if (!flowctl_server_answer_natively(s, p, fast)) {
        fast.release(fast.ctx);
        rb_raise(rb_eArgError, "%+"PRIsVALUE" is not a registered unary method (register_unary it first)", path);
    }
    return self;
}

/* call-seq: server.shutdown -> nil (stops accepting; calls in flight go on; idempotent) */
static VALUE
server_shutdown(VALUE self)
{
    flowctl_server_shutdown(server_get(self));
    return Qnil;
}

/*
 * call-seq: server.release_listeners -> Integer
 *
 * shutdown(2) on this server's listening sockets, so that another server can listen on
 * its port (after #shutdown: its connections go on until their calls end). How many.
 */
static VALUE
server_release_listeners(VALUE self)
{
    server_t *s = server_get(self);
    return INT2FIX(flowctl_conn_close_listeners(s->ports, s->n_ports));
}

/* call-seq: server.cancel_all -> nil (cancels every call in flight) */
static VALUE
server_cancel_all(VALUE self)
{
    grpc_server_cancel_all_calls(server_get(self)->server);
    return Qnil;
}

struct wait_arg {
    server_t *s;
    bool (*ready)(server_t *);
    double timeout; /* < 0: no limit */
    bool stop;      /* set by the unblock function */
    bool result;
    call_slot *slot;
};

static void *
wait_nogvl(void *p)
{
    struct wait_arg *a = p;
    a->result = flowctl_server_wait(a->s, a->ready, a->timeout, &a->stop);
    return NULL;
}

static void
wait_ubf(void *p)
{
    struct wait_arg *a = p;
    flowctl_server_interrupt(a->s, &a->stop);
}

static bool
wait_cond(server_t *s, bool (*ready)(server_t *), double timeout)
{
    struct wait_arg a = {.s = s, .timeout = timeout, .ready = ready};
    rb_thread_call_without_gvl(wait_nogvl, &a, wait_ubf, &a);
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
    return wait_cond(s, flowctl_server_shutdown_ready, NIL_P(timeout) ? -1.0 : NUM2DBL(timeout)) ? Qtrue : Qfalse;
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
        wait_cond(s, flowctl_server_acceptor_ready, -1.0);
    }
    flowctl_server_close(s);
    return Qnil;
}

#define COUNT(h, name, v) rb_hash_aset(h, ID2SYM(rb_intern(name)), v)

/* call-seq: server.stats -> {accepted:, rejected:, idle:, queued:, ...} (see Flowctl::Server#stats) */
static VALUE
server_stats(VALUE self)
{
    flowctl_server_counts n;
    flowctl_server_counts_get(server_of(self), &n);
    VALUE h = rb_hash_new();
    COUNT(h, "accepted", LONG2NUM(n.accepted));
    COUNT(h, "rejected", LONG2NUM(n.rejected));
    COUNT(h, "idle", INT2FIX(n.idle));
    COUNT(h, "queued", INT2FIX(n.queued));
    COUNT(h, "lingering", INT2FIX(n.lingering));
    COUNT(h, "stuck_closed", LONG2NUM(n.stuck_closed));
    COUNT(h, "unauthenticated", LONG2NUM(n.unauthenticated));
    COUNT(h, "abusive_closed", LONG2NUM(n.abusive_closed));
    COUNT(h, "memory_closed", LONG2NUM(n.memory_closed));
    COUNT(h, "stall_closed", LONG2NUM(n.stall_closed));
    COUNT(h, "reset_early", LONG2NUM(n.reset_early));
    COUNT(h, "idle_shed", LONG2NUM(n.idle_shed));
    COUNT(h, "dropped", LONG2NUM(n.dropped));
    COUNT(h, "answered_natively", LONG2NUM(n.answered_natively));
    COUNT(h, "listener_stopped", n.listener_stopped ? Qtrue : Qfalse);
    return h;
}

static void *
take_nogvl(void *p)
{
    struct wait_arg *a = p;
    a->slot = flowctl_server_take(a->s, &a->stop);
    return NULL;
}

/*
 * call-seq:
 *   server.next_call -> Flowctl::Native::ServerCall or nil
 *
 * The next call for this worker. One already
 * queued is taken at once, with the GVL kept; otherwise the worker waits without the GVL
 * until the acceptor hands it one, counted as idle meanwhile; nil once the server shuts down.
 */
static VALUE
server_next_call(VALUE self)
{
    server_t *s = server_get(self);
    call_slot *ready = flowctl_server_try_take(s); /* one queued already: the GVL stays */
    if (ready && !flowctl_server_drop_reset(s, ready)) return flowctl_server_call_wrap(ready);
    for (;;) {
        struct wait_arg a = {.s = s};
        /* INTR_FAIL: no interrupt check after the wait, so a popped call is never dropped */
        rb_nogvl(take_nogvl, &a, wait_ubf, &a, RB_NOGVL_INTR_FAIL);
        if (a.slot && flowctl_server_drop_reset(s, a.slot)) continue;
        if (a.slot) {
            VALUE call = flowctl_server_call_wrap(a.slot); /* owns the slot from here on, even if an interrupt follows */
            rb_thread_check_ints();
            return call;
        }
        if (flowctl_server_drained(s)) return Qnil;
        rb_thread_check_ints(); /* raises a real interrupt; a time-slice flag just loops */
    }
}

void
init_flowctl_server(void)
{
    cServer = rb_define_class_under(mFlowctlNative, "Server", rb_cObject);
    rb_define_alloc_func(cServer, server_alloc);
    rb_define_method(cServer, "initialize", server_initialize, 1);
    rb_define_method(cServer, "add_port", server_add_port, 2);
    rb_define_method(cServer, "start", server_start, -1);
    rb_define_method(cServer, "next_call", server_next_call, 0);
    rb_define_method(cServer, "register_unary", server_register_unary, 1);
    rb_define_method(cServer, "answer_natively", server_answer_natively, 2);
    rb_define_method(cServer, "shutdown", server_shutdown, 0);
    rb_define_method(cServer, "wait_shutdown", server_wait_shutdown, -1);
    rb_define_method(cServer, "cancel_all", server_cancel_all, 0);
    rb_define_method(cServer, "release_listeners", server_release_listeners, 0);
    rb_define_method(cServer, "close", server_close, 0);
    rb_define_method(cServer, "stats", server_stats, 0);
}
