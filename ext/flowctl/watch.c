/*
 * watch.c — the shared `next` queue and its thread: fiber calls (fiber.c) complete on it.
 *
 * A tag put on the queue (flowctl_watch_cq) is a flowctl_cq_tag; the thread, blocked in
 * grpc_completion_queue_next, calls each tag's on_done with the event's success, inside the
 * fork gate, without any lock. It is a native thread (no Ruby, no GVL); a fork wakes it with
 * a "kick" (a watch on a lame channel with a deadline already past, which gRPC completes at
 * once) so that it steps out of gRPC, and the child starts afresh when it needs the queue.
 *
 * Connections with no call in flight are not polled here but by gRPC core's client-channel
 * backup poller, which flowctl runs every 10 ms instead of gRPC's 5 s (flowctl_channel_env):
 * a connection that dies between two calls, a GOAWAY and a connect under way are seen
 * within 10 ms. This file used to keep a connectivity watch on every idle channel instead,
 * which cost two things with gRPC's poll poller. A pollset keeps every socket ever added to
 * it (grpc_pollset_set_del_pollset takes the pollset out of the set, not the socket out of
 * the pollset): once a channel had been watched while connected, this thread polled its
 * connection for as long as it lived, competing with the calls for every reply (1.4-2.8
 * wake-ups of this thread per sequential call after an idle second, twice the CPU per
 * call). And a connection made while the watch stood aside for a busy channel was polled
 * by nobody until the channel had been quiet for 100 ms: a server that died then was seen
 * by the next call only, written on the dead connection and failed UNAVAILABLE ("Socket
 * closed", "Broken pipe"). The backup poller looks without blocking (poll with no timeout),
 * so it does not sit on a busy connection, and it sees every connection of every channel.
 */
#include "flowctl.h"

static pthread_mutex_t watch_mu = PTHREAD_MUTEX_INITIALIZER;
static grpc_completion_queue *watch_cq; /* (watch_mu to create) the shared queue; never destroyed */
static grpc_channel *kick_channel;      /* (watch_mu) a lame channel: its watches complete at their deadline */
static bool watcher_running;            /* (watch_mu) */

static void
kick_done(flowctl_cq_tag *tag, bool ok)
{
    (void)tag;
    (void)ok;
}

static flowctl_cq_tag kick_tag = {.on_done = kick_done};

static void *
watcher_main(void *unused)
{
    (void)unused;
    for (;;) {
        flowctl_gate_enter();
        grpc_event ev = grpc_completion_queue_next(watch_cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type == GRPC_OP_COMPLETE) ((flowctl_cq_tag *)ev.tag)->on_done(ev.tag, ev.success);
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
}

void
init_flowctl_watch(void)
{
    /* a fork wakes the watcher (it waits inside gRPC without a time limit) and starts afresh in the child */
    static const flowctl_fork_hooks hooks = {.name = "watch", .close = flowctl_watch_kick,
                                             .child = flowctl_watch_atfork_child};
    flowctl_fork_register(&hooks);
}
