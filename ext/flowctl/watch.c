/*
 * watch.c — the one thread that polls connections nobody else is polling.
 *
 * gRPC core does the work of a connection (reading a GOAWAY, seeing the peer close,
 * finishing a connect, answering keepalive pings) only inside a thread that waits on a
 * completion queue whose pollset includes that connection. A call's waiter is such a
 * thread while the call runs; with no call in flight nobody is (gRPC's client-channel
 * backup poller looks every 5 s), so without this file an idle channel took 5 s to
 * connect, held a stopping server for its whole grace period, and failed its first call
 * after a server restart on a dead connection.
 *
 * So every channel of ours keeps a connectivity watch (grpc_channel_watch_connectivity_state)
 * on one shared `next` queue, re-armed each time the state changes: while it is armed, the
 * queue's pollset is among the channel's interested parties, and the watcher thread,
 * blocked in grpc_completion_queue_next on that queue, polls the channel's connections.
 * It sleeps until something happens or a parked watch is due (below). It is a native thread (no
 * Ruby, no GVL) and it passes the fork gate; a fork wakes it with a "kick" (a watch on a
 * lame channel with a deadline already past, which gRPC completes at once).
 *
 * Other files put their own tags on the same queue (flowctl_watch_cq): the thread calls
 * each tag's on_done with the event's success, inside the gate, without any lock.
 *
 * Lifetime: a watch record outlives its channel's destruction. flowctl_watch_forget (under
 * watch_mu) clears its channel before grpc_channel_destroy; the destroyed channel goes to
 * SHUTDOWN, its pending watch completes (or its parking ends), and the thread frees the
 * record. The thread never re-arms a forgotten record, so it never touches a destroyed
 * channel, and it reads a channel's counters only under watch_mu while it is not forgotten.
 */
#include "flowctl.h"

struct flowctl_watch {
    flowctl_cq_tag tag;            /* first: the queue's events point here */
    flowctl_channel *ch;           /* (watch_mu) NULL once forgotten */
    bool armed;                    /* (watch_mu) a watch is pending on the queue */
    bool parked;                   /* (watch_mu) on the parked list, waiting for the channel to go quiet */
    unsigned seen;                 /* (watch_mu) ch->calls_started when last looked at */
    struct flowctl_watch *next;    /* (watch_mu) the parked list */
};

/*
 * Only while the channel is quiet. gRPC's poll poller lets one thread at a time watch a
 * socket for reading: with the watcher among a busy channel's pollers, it read the replies
 * and woke each caller, a cross-CPU wake-up per call (sequential unary calls: 13-14k/s
 * down to 5-7k/s). A watch cannot be withdrawn, so each is armed for ARMED_MS at most,
 * and a watch that ends (a change or its deadline) on a channel that started a call in
 * the meantime, has one waiting, or whose streams polled (pump.c moves calls_started at
 * each poll: one long stream) is parked instead of re-armed: the calls poll the channel. It is armed again once the channel has been quiet for QUIET_MS. An idle
 * channel costs the thread two wake-ups a second; a busy one, ten.
 */
#define ARMED_MS 500
#define QUIET_MS 100

static pthread_mutex_t watch_mu = PTHREAD_MUTEX_INITIALIZER;
static grpc_completion_queue *watch_cq; /* (watch_mu to create) the shared queue; never destroyed */
static grpc_channel *kick_channel;      /* (watch_mu) a lame channel: its watches complete at their deadline */
static bool watcher_running;            /* (watch_mu) */
static struct flowctl_watch *parked;    /* (watch_mu) */
static gpr_timespec recheck_at;         /* (watch_mu) when to look at the parked list again */
static atomic_ulong watch_events;       /* Flowctl::Native.watch_stats */

static void
kick_done(flowctl_cq_tag *tag, bool ok)
{
    (void)tag;
    (void)ok;
}

static flowctl_cq_tag kick_tag = {.on_done = kick_done};

static gpr_timespec
ms_from_now(int ms)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

/* (watch_mu) Watches for a change from the channel's current state, for ARMED_MS. */
static void
arm(struct flowctl_watch *w)
{
    w->seen = atomic_load(&w->ch->calls_started);
    grpc_connectivity_state s = grpc_channel_check_connectivity_state(w->ch->channel, 0);
    w->armed = s != GRPC_CHANNEL_SHUTDOWN;
    if (w->armed) grpc_channel_watch_connectivity_state(w->ch->channel, s, ms_from_now(ARMED_MS), watch_cq, &w->tag);
}

/* (watch_mu) A call waits on the channel, or one started since w->seen. */
static bool
busy(struct flowctl_watch *w)
{
    unsigned started = atomic_load(&w->ch->calls_started);
    bool b = started != w->seen || atomic_load(&w->ch->unary_inflight) > 0;
    w->seen = started;
    return b;
}

static void
park(struct flowctl_watch *w)
{
    if (!parked) recheck_at = ms_from_now(QUIET_MS);
    w->parked = true;
    w->next = parked;
    parked = w;
}

/* (watch_mu) Arms the parked watches whose channels went quiet; frees forgotten ones. */
static void
recheck_parked(void)
{
    struct flowctl_watch *list = parked;
    parked = NULL;
    while (list) {
        struct flowctl_watch *w = list;
        list = w->next;
        w->parked = false;
        if (!w->ch)
            free(w);
        else if (busy(w))
            park(w);
        else
            arm(w);
    }
}

static void
watch_ended(flowctl_cq_tag *tag, bool ok)
{
    struct flowctl_watch *w = (struct flowctl_watch *)tag;
    (void)ok;
    atomic_fetch_add(&watch_events, 1);
    pthread_mutex_lock(&watch_mu);
    w->armed = false;
    if (!w->ch)
        free(w); /* forgotten: its channel is gone */
    else if (busy(w))
        park(w);
    else
        arm(w);
    pthread_mutex_unlock(&watch_mu);
}

static void *
watcher_main(void *unused)
{
    (void)unused;
    for (;;) {
        pthread_mutex_lock(&watch_mu);
        gpr_timespec until = parked ? recheck_at : gpr_inf_future(GPR_CLOCK_MONOTONIC);
        pthread_mutex_unlock(&watch_mu);
        flowctl_gate_enter();
        grpc_event ev = grpc_completion_queue_next(watch_cq, until, NULL);
        if (ev.type == GRPC_OP_COMPLETE) ((flowctl_cq_tag *)ev.tag)->on_done(ev.tag, ev.success);
        pthread_mutex_lock(&watch_mu);
        if (parked && gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), recheck_at) >= 0) recheck_parked();
        pthread_mutex_unlock(&watch_mu);
        flowctl_gate_leave();
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
    }
    return NULL;
}

/* (watch_mu) Creates the queue and starts the thread, once per process. */
static bool
watcher_start(void)
{
    if (watcher_running) return true;
    if (!watch_cq) watch_cq = grpc_completion_queue_create_for_next(NULL);
    if (!kick_channel) kick_channel = grpc_lame_client_channel_create(NULL, GRPC_STATUS_UNAVAILABLE, "flowctl kick");
    watcher_running = flowctl_thread_detached(watcher_main, "flowctl-watch");
    return watcher_running;
}

grpc_completion_queue *
flowctl_watch_cq(void)
{
    pthread_mutex_lock(&watch_mu);
    grpc_completion_queue *cq = watcher_start() ? watch_cq : NULL;
    pthread_mutex_unlock(&watch_mu);
    return cq;
}

struct flowctl_watch *
flowctl_watch_channel(flowctl_channel *ch)
{
    struct flowctl_watch *w = calloc(1, sizeof(*w));
    if (!w) return NULL;
    w->tag.on_done = watch_ended;
    w->ch = ch;
    pthread_mutex_lock(&watch_mu);
    if (watcher_start()) {
        arm(w);
    } else {
        free(w); /* no thread: the channel works as before, polled by its calls */
        w = NULL;
    }
    pthread_mutex_unlock(&watch_mu);
    return w;
}

void
flowctl_watch_forget(struct flowctl_watch *w)
{
    if (!w) return;
    pthread_mutex_lock(&watch_mu);
    w->ch = NULL;
    bool pending = w->armed || w->parked; /* the thread frees it */
    pthread_mutex_unlock(&watch_mu);
    if (!pending) free(w);
}

void
flowctl_watch_kick(void)
{
    pthread_mutex_lock(&watch_mu);
    if (watcher_running)
        grpc_channel_watch_connectivity_state(kick_channel, GRPC_CHANNEL_IDLE, gpr_inf_past(GPR_CLOCK_MONOTONIC),
                                              watch_cq, &kick_tag);
    pthread_mutex_unlock(&watch_mu);
}

void
flowctl_watch_atfork_child(void)
{
    /* the thread, the queue and the watches are the parent's: start afresh when needed */
    pthread_mutex_init(&watch_mu, NULL);
    watch_cq = NULL;
    kick_channel = NULL;
    watcher_running = false;
    parked = NULL;
}

/* call-seq: Flowctl::Native.watch_stats -> {events: n} (connectivity changes seen, process-wide) */
static VALUE
watch_stats(VALUE mod)
{
    VALUE h = rb_hash_new();
    rb_hash_aset(h, ID2SYM(rb_intern("events")), ULONG2NUM(atomic_load(&watch_events)));
    return h;
}

void
init_flowctl_watch(void)
{
    /* a fork wakes the watcher (it waits inside gRPC without a time limit) and starts afresh in the child */
    static const flowctl_fork_hooks hooks = {.name = "watch", .close = flowctl_watch_kick,
                                             .child = flowctl_watch_atfork_child};
    flowctl_fork_register(&hooks);
    rb_define_module_function(mFlowctlNative, "watch_stats", watch_stats, 0);
}
