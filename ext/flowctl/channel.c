/*
 * channel.c — Flowctl::Native::Channel: one grpc_channel with its credentials and
 * channel args. The C struct is reference counted so a heartbeat thread can keep
 * using the channel after the Ruby object is closed or collected.
 */
#include "flowctl.h"

static VALUE cChannel;

typedef struct {
    flowctl_channel *ch; /* NULL once closed */
} channel_wrapper;

void
flowctl_channel_ref(flowctl_channel *ch)
{
    atomic_fetch_add(&ch->refs, 1);
}

void
flowctl_channel_unref(flowctl_channel *ch)
{
    if (atomic_fetch_sub(&ch->refs, 1) != 1) return;
    /* in a forked child its sockets are gone and their numbers may be reused: leave it */
    if (ch->channel && ch->pid == flowctl_pid) grpc_channel_destroy(ch->channel);
    pthread_mutex_destroy(&ch->calls_mu);
    free(ch->target);
    free(ch);
}

static void
channel_free(void *p)
{
    channel_wrapper *w = p;
    if (w->ch) flowctl_channel_unref(w->ch);
    ruby_xfree(w);
}

static size_t
channel_memsize(const void *p)
{
    const channel_wrapper *w = p;
    return sizeof(*w) + (w->ch ? sizeof(flowctl_channel) + strlen(w->ch->target) + 1 : 0);
}

static const rb_data_type_t channel_type = {
    .wrap_struct_name = "Flowctl::Native::Channel",
    .function = {.dmark = NULL, .dfree = channel_free, .dsize = channel_memsize},
    /* dfree only drops a reference: grpc_channel_destroy does not block. */
    .flags = RUBY_TYPED_FREE_IMMEDIATELY,
};

static VALUE
channel_alloc(VALUE klass)
{
    channel_wrapper *w;
    return TypedData_Make_Struct(klass, channel_wrapper, &channel_type, w);
}

flowctl_channel *
flowctl_channel_get(VALUE self)
{
    channel_wrapper *w = rb_check_typeddata(self, &channel_type);
    if (!w->ch) rb_raise(rb_eIOError, "channel is closed");
    if (w->ch->pid != flowctl_pid)
        rb_raise(rb_eIOError, "channel to %s was created before fork (in process %d): create a new client in this process",
                 w->ch->target, (int)w->ch->pid);
    return w->ch;
}

/* ---- credentials -------------------------------------------------------- */

static const char *
opt_cstr(VALUE ary, long i)
{
    VALUE v = rb_ary_entry(ary, i);
    return NIL_P(v) ? NULL : StringValueCStr(v);
}

/* tls: false -> insecure; [root_pem, key_pem, cert_pem] (each String or nil) -> TLS. */
static grpc_channel_credentials *
make_creds(VALUE tls)
{
    if (tls == Qfalse) return grpc_insecure_credentials_create();
    Check_Type(tls, T_ARRAY);
    const char *roots = opt_cstr(tls, 0), *key = opt_cstr(tls, 1), *cert = opt_cstr(tls, 2);
    if ((key == NULL) != (cert == NULL))
        rb_raise(rb_eArgError, "mTLS needs both a client certificate and its private key");
    grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
    return grpc_ssl_credentials_create(roots, key ? &pair : NULL, NULL, NULL);
}

/*
 * call-seq:
 *   Flowctl::Native::Channel.new(target, tls, channel_args) -> channel
 *
 * tls is false (plaintext) or [root_certs, private_key, cert_chain]; the Ruby layer
 * (Flowctl::TLS) builds that array. channel_args: Flowctl::ChannelArgs.normalize's Hash.
 */
static VALUE
channel_initialize(VALUE self, VALUE target, VALUE tls, VALUE args)
{
    channel_wrapper *w = rb_check_typeddata(self, &channel_type);
    if (w->ch) rb_raise(rb_eRuntimeError, "channel already initialized");
    flowctl_fork_check();
    const char *t = StringValueCStr(target);
    if (!NIL_P(args)) Check_Type(args, T_HASH);

    long n = NIL_P(args) ? 0 : RHASH_SIZE(args);
    grpc_arg *list = ALLOCA_N(grpc_arg, n + 2);
    size_t count = flowctl_channel_args_fill(args, list);
    /* The process id as a channel arg: a forked child's channels never share a pooled
     * subchannel (a connection) with the parent's. */
    list[count++] = (grpc_arg){.type = GRPC_ARG_INTEGER, .key = "flowctl.pid", .value.integer = (int)flowctl_pid};
    list[count++] = flowctl_fork_socket_arg();
    grpc_channel_args cargs = {.num_args = count, .args = list};

    grpc_channel_credentials *creds = make_creds(tls);
    grpc_channel *c = grpc_channel_create(t, creds, &cargs);
    grpc_channel_credentials_release(creds);
    RB_GC_GUARD(args);

    flowctl_channel *ch = calloc(1, sizeof(*ch));
    if (!ch) { grpc_channel_destroy(c); rb_raise(rb_eNoMemError, "flowctl: out of memory"); }
    ch->channel = c;
    ch->target = strdup(t);
    ch->pid = flowctl_pid;
    atomic_init(&ch->refs, 1);
    atomic_init(&ch->closed, false);
    atomic_init(&ch->unary_us, 0);
    atomic_init(&ch->unary_inflight, 0);
    pthread_mutex_init(&ch->calls_mu, NULL);
    w->ch = ch;
    return self;
}

/*
 * gRPC core polls a channel's connections only while a thread waits on a call of it, and
 * its client-channel backup poller looks at the rest every 5 s: an idle channel took 5 s
 * to connect, held a stopping server for its whole grace period (the GOAWAY went unread)
 * and wrote its next call on a connection its server had closed (UNAVAILABLE). Every
 * 10 ms instead, without blocking (poll with no timeout, from gRPC's timer thread): it does
 * not sit on a busy connection, whose replies its calls read themselves (watch.c says
 * what a blocking watcher cost). About 100 wake-ups a second while the process has a
 * channel, none without.
 */
void
flowctl_channel_env(void)
{
    flowctl_default_env("GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS", "10");
}

/* call-seq: channel.target -> String */
static VALUE
channel_target(VALUE self)
{
    return rb_str_new_cstr(flowctl_channel_get(self)->target);
}

/*
 * call-seq: channel.state(try_to_connect = false) -> Symbol
 *
 * :idle, :connecting, :ready, :transient_failure or :shutdown.
 */
static VALUE
channel_state(int argc, VALUE *argv, VALUE self)
{
    static const char *const names[] = {"idle", "connecting", "ready", "transient_failure", "shutdown"};
    VALUE connect;
    rb_scan_args(argc, argv, "01", &connect);
    grpc_connectivity_state s = grpc_channel_check_connectivity_state(flowctl_channel_get(self)->channel,
                                                                       RTEST(connect));
    return ID2SYM(rb_intern(names[s]));
}

/* call-seq: channel.close -> nil (idempotent) */
void
flowctl_channel_track(flowctl_channel *ch, flowctl_tracked *t, grpc_call *call)
{
    flowctl_channel_ref(ch);
    t->call = call;
    t->ch = ch;
    t->prev = NULL;
    pthread_mutex_lock(&ch->calls_mu);
    t->next = ch->calls;
    if (ch->calls) ch->calls->prev = t;
    ch->calls = t;
    pthread_mutex_unlock(&ch->calls_mu);
}

void
flowctl_channel_untrack(flowctl_tracked *t)
{
    flowctl_channel *ch = t->ch;
    if (!ch) return;
    pthread_mutex_lock(&ch->calls_mu);
    if (t->prev) t->prev->next = t->next; else ch->calls = t->next;
    if (t->next) t->next->prev = t->prev;
    pthread_mutex_unlock(&ch->calls_mu);
    t->ch = NULL;
    flowctl_channel_unref(ch);
}

/* Client#close: every call in flight ends at once with CANCELLED (readers and writers
 * waiting on them wake up); grpc_call_cancel_with_status only queues the cancellation. */
static void
cancel_tracked(flowctl_channel *ch)
{
    pthread_mutex_lock(&ch->calls_mu);
    for (flowctl_tracked *t = ch->calls; t; t = t->next)
        grpc_call_cancel_with_status(t->call, GRPC_STATUS_CANCELLED, "the client was closed", NULL);
    pthread_mutex_unlock(&ch->calls_mu);
}

static VALUE
channel_close(VALUE self)
{
    channel_wrapper *w = rb_check_typeddata(self, &channel_type);
    if (w->ch) {
        atomic_store(&w->ch->closed, true);
        cancel_tracked(w->ch);
        flowctl_channel_unref(w->ch);
        w->ch = NULL;
    }
    return Qnil;
}

/* call-seq: channel.closed? -> true or false */
static VALUE
channel_closed_p(VALUE self)
{
    channel_wrapper *w = rb_check_typeddata(self, &channel_type);
    return w->ch ? Qfalse : Qtrue;
}

void
init_flowctl_channel(void)
{
    cChannel = rb_define_class_under(mFlowctlNative, "Channel", rb_cObject);
    rb_define_alloc_func(cChannel, channel_alloc);
    rb_define_method(cChannel, "initialize", channel_initialize, 3);
    rb_define_method(cChannel, "target", channel_target, 0);
    rb_define_method(cChannel, "state", channel_state, -1);
    rb_define_method(cChannel, "close", channel_close, 0);
    rb_define_method(cChannel, "closed?", channel_closed_p, 0);
}
