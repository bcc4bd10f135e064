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
    struct call_slot *next;     /* handoff queue link, then the lingering list's */
    gpr_timespec wait_until;    /* queued with no idle worker: rejected after this */
    /* The status batch, started and left to complete while the call lingers (section 2b):
     * gRPC borrows the message and writes `cancelled` until the batch completes. */
    grpc_op status_ops[4];
    grpc_byte_buffer *status_msg;
    grpc_metadata *status_md;   /* the trailing metadata (malloc'd, slices owned) */
    size_t status_md_count;
    int close_cancelled;
    void *owner;                /* its server_t */
    int64_t linger_until_ms;    /* its peer has not taken the status by then: stuck */
    char *peer;                 /* grpc_call_get_peer, once lingering */
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
    if (s->status_msg) grpc_byte_buffer_destroy(s->status_msg);
    for (size_t i = 0; i < s->status_md_count; i++) {
        grpc_slice_unref(s->status_md[i].key);
        grpc_slice_unref(s->status_md[i].value);
    }
    free(s->status_md);
    if (s->peer) gpr_free(s->peer);
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
    /* calls whose status batch is in flight (2b): handed over by workers (linger_in, mu),
     * kept by the acceptor (lingering, acceptor only); n_lingering counts both (mu) */
    call_slot *linger_in, *lingering;
    int n_lingering;
    int64_t last_sweep_ms;
    int64_t write_timeout_ms;         /* a peer that takes nothing we send for this long is stuck */
    long stuck_closed;                /* connections shut down as stuck (mu) */
    long unauthenticated;             /* calls refused for a missing or wrong token (mu) */
    long reset_early;                 /* calls the peer cancelled before a worker got them (mu) */
    flowctl_offenders offenders;      /* peers' refused or reset calls, per second (mu) */
    char shut_peers[8][64];           /* (mu) the last connections shut down: their queued calls are dropped */
    int shut_next;                    /* (mu) */
    long dropped;                     /* (mu) calls of a shut connection, dropped as they came */
    long abusive_closed;              /* connections shut down for too many refused calls (mu) */
    /* memory watch (acceptor only): RSS every WATCH_MS over the last WATCH_SAMPLES */
    size_t rss[8];
    int rss_next;
    int64_t last_watch_ms;
    size_t memory_burst;              /* RSS growth within the window that sheds a connection (0: off) */
    pthread_t watchdog;               /* runs watch_memory; the acceptor joins it when it ends */
    pthread_cond_t watchdog_wake;     /* (mu) shutdown ends the watchdog's pause (monotonic clock) */
    _Atomic int64_t acceptor_beat_ms; /* when the acceptor last came back from gRPC */
    long stall_closed;                /* connections shut down while the acceptor was held (mu) */
    long idle_shed;                   /* connections shut down near the descriptor limit (mu) */
    int pending_ticks;                /* watchdog: checks in a row that found the listener not accepting */
    int64_t exhausted_ms;             /* watchdog: when descriptors last ran out (or nearly) */
    bool listener_stopped;            /* (mu) gRPC core stopped accepting on our port: see 2d */
    bool watchdog_running;
    long memory_closed;               /* connections shut down for it (mu) */
    char *auth_token;                 /* calls must carry "authorization: Bearer <it>" (NULL: any call) */
    size_t auth_len;
    int ports[8], n_ports;            /* the listening ports: a peer's connection is found by them */
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
    if (slot) {
        flowctl_pump_set_send_timeout(&slot->pump, s->write_timeout_ms);
        slot->owner = s;
    }
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

static void linger(server_t *s, call_slot *slot);

/* Answers a call no worker can take; runs on the acceptor thread, and never waits for
 * the peer: the status lingers (2b) when it cannot leave at once. */
static void
reject_call(server_t *s, call_slot *slot, grpc_status_code code, const char *msg)
{
    grpc_op *ops = slot->status_ops;
    memset(ops, 0, sizeof(slot->status_ops));
    grpc_slice details = grpc_slice_from_static_string(msg);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[1].data.send_status_from_server.status = code;
    ops[1].data.send_status_from_server.status_details = &details;
    ops[2].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[2].data.recv_close_on_server.cancelled = &slot->close_cancelled;
    if (flowctl_pump_start(&slot->pump, ops, 3) && !flowctl_pump_collect(&slot->pump)) {
        linger(s, slot);
        return;
    }
    slot->status_sent = true;
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

static void close_stuck_peer(server_t *s, const char *peer);

/*
 * A peer whose calls are refused (no token, or no worker free) or reset before a worker
 * got them more than MAX_REFUSED times in a second floods the server: gRPC core queues every call it sends ahead of
 * everyone else's, without bound. Its connection is shut down: the calls it queued die
 * with it, and a legitimate client that merely retries too fast reconnects.
 */
#define MAX_REFUSED 200

/* Any thread (the table is guarded by mu; the connection is looked for outside it). */
/* A connection was shut down: calls gRPC core still had queued from it are dropped. */
static void
remember_shut(server_t *s, const char *peer)
{
    if (!peer || strlen(peer) >= sizeof(s->shut_peers[0])) return;
    pthread_mutex_lock(&s->mu);
    strcpy(s->shut_peers[s->shut_next], peer);
    s->shut_next = (s->shut_next + 1) % 8;
    pthread_mutex_unlock(&s->mu);
}

/* The acceptor: true (and the call freed) when it comes from a connection we shut down. */
static bool
drop_if_shut(server_t *s, call_slot *slot)
{
    char *peer = grpc_call_get_peer(slot->call);
    bool shut = false;
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < 8 && !shut && peer; i++) shut = strcmp(s->shut_peers[i], peer) == 0;
    if (shut) s->dropped++;
    pthread_mutex_unlock(&s->mu);
    gpr_free(peer);
    if (shut) slot_free(slot);
    return shut;
}

static void
offense(server_t *s, call_slot *slot)
{
    char *peer = grpc_call_get_peer(slot->call);
    pthread_mutex_lock(&s->mu);
    bool abusive = flowctl_conn_offend(&s->offenders, peer, flowctl_mono_ms(), MAX_REFUSED);
    pthread_mutex_unlock(&s->mu);
    if (abusive) {
        remember_shut(s, peer);
        int n = flowctl_conn_shutdown(peer, s->ports, s->n_ports);
        pthread_mutex_lock(&s->mu);
        s->abusive_closed += n;
        pthread_mutex_unlock(&s->mu);
    }
    gpr_free(peer);
}
#define AUTH_MESSAGE "missing or wrong authorization bearer token"

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
        if (drop_if_shut(s, slot)) return;
        flowctl_pump_start_reading(&slot->pump, false, 1); /* a rejected call drains it */
        if (flowctl_pump_collect(&slot->pump) && flowctl_pump_recv_failed(&slot->pump)) {
            /* reset by the peer already (HTTP/2 rapid reset sends HEADERS + RST_STREAM):
             * no worker for it, and an offense */
            pthread_mutex_lock(&s->mu);
            s->reset_early++;
            pthread_mutex_unlock(&s->mu);
            offense(s, slot);
            slot_free(slot);
            return;
        }
        if (s->auth_token && !flowctl_bearer_ok(s->auth_token, s->auth_len, &slot->md)) {
            pthread_mutex_lock(&s->mu);
            s->unauthenticated++;
            pthread_mutex_unlock(&s->mu);
            offense(s, slot);
            reject_call(s, slot, GRPC_STATUS_UNAUTHENTICATED, AUTH_MESSAGE);
            return;
        }
    }
    pthread_mutex_lock(&s->mu);
    call_slot *reject = success && !s->shutting_down ? dispatch_locked(s, slot) : slot;
    if (reject && success) s->rejected++;
    pthread_mutex_unlock(&s->mu);
    if (!reject) {
        pthread_cond_signal(&s->work); /* one call, one worker */
        return;
    }
    if (success) offense(s, reject);
    if (success) reject_call(s, reject, GRPC_STATUS_RESOURCE_EXHAUSTED, BUSY_MESSAGE);
    else slot_free(reject);
}

/* ---- 2b. lingering calls ----------------------------------------------------
 *
 * A call's status leaves when its peer reads. A worker (or the acceptor rejecting a call)
 * never waits for that: it starts the status batch and, when the batch has not completed
 * at once, hands the call over here. The acceptor collects what completed at each turn
 * (at most every SWEEP_MS) and frees those calls. A peer that has not taken a status
 * after write_timeout is stuck, and so is the peer holding the most lingering calls once
 * there are more than MAX_LINGERING: its connection is shut down (conn.c), which ends
 * every call on it at once. So a peer that sends calls and never reads costs its own
 * connection, never a worker, and the memory it can pin is bounded.
 */
#define SWEEP_MS 20
#define MAX_LINGERING 1024


/* Any thread: the call's status batch is in flight; the acceptor takes it from here. */
static void
linger(server_t *s, call_slot *slot)
{
    pthread_mutex_lock(&s->mu);
    slot->next = s->linger_in;
    s->linger_in = slot;
    s->n_lingering++;
    pthread_mutex_unlock(&s->mu);
}

static void
close_stuck_peer(server_t *s, const char *peer)
{
    remember_shut(s, peer);
    int n = flowctl_conn_shutdown(peer, s->ports, s->n_ports);
    pthread_mutex_lock(&s->mu);
    s->stuck_closed += n;
    pthread_mutex_unlock(&s->mu);
}

static int
peer_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Over MAX_LINGERING: the peer with the most lingering calls is the one not reading. */
static void
close_greediest_peer(server_t *s, int n)
{
    char **peers = malloc(sizeof(char *) * (size_t)n);
    if (!peers) return;
    int k = 0;
    for (call_slot *slot = s->lingering; slot && k < n; slot = slot->next)
        if (slot->peer) peers[k++] = slot->peer;
    qsort(peers, (size_t)k, sizeof(char *), peer_cmp);
    const char *best = NULL;
    for (int i = 0, run = 0, most = 0; i < k; i++) {
        run = i > 0 && strcmp(peers[i], peers[i - 1]) == 0 ? run + 1 : 1;
        if (run > most) most = run, best = peers[i];
    }
    if (best) close_stuck_peer(s, best);
    free(peers);
}

/* Takes over what workers handed in; the deadline runs from now. */
static void
adopt_lingering(server_t *s, int64_t now)
{
    pthread_mutex_lock(&s->mu);
    call_slot *in = s->linger_in;
    s->linger_in = NULL;
    pthread_mutex_unlock(&s->mu);
    while (in) {
        call_slot *slot = in;
        in = slot->next;
        slot->peer = grpc_call_get_peer(slot->call);
        slot->linger_until_ms = s->write_timeout_ms > 0 ? now + s->write_timeout_ms : INT64_MAX;
        slot->next = s->lingering;
        s->lingering = slot;
    }
}

/* One look at every lingering call: frees those done, unsticks those past their time. */
static void
sweep_lingering(server_t *s, bool force)
{
    int64_t now = flowctl_mono_ms();
    if (!force && now - s->last_sweep_ms < SWEEP_MS) return;
    s->last_sweep_ms = now;
    adopt_lingering(s, now);
    int left = 0, freed = 0;
    for (call_slot **l = &s->lingering; *l;) {
        call_slot *slot = *l;
        bool idle = flowctl_pump_collect(&slot->pump);
        if (!idle && now > slot->linger_until_ms) {
            close_stuck_peer(s, slot->peer);
            grpc_call_cancel(slot->call, NULL);
            idle = flowctl_pump_drain(&slot->pump, gpr_inf_future(GPR_CLOCK_MONOTONIC)); /* cancelled: at once */
        }
        if (!idle) {
            left++;
            l = &slot->next;
            continue;
        }
        *l = slot->next;
        slot->status_sent = true;
        slot_free(slot);
        freed++;
    }
    pthread_mutex_lock(&s->mu);
    s->n_lingering -= freed;
    if (freed && s->n_lingering == 0) pthread_cond_broadcast(&s->cond); /* wait_shutdown */
    pthread_mutex_unlock(&s->mu);
    if (left > MAX_LINGERING) close_greediest_peer(s, left);
}

/* ---- 2c. the memory watch ---------------------------------------------------
 *
 * Some floods never reach the acceptor: HTTP/2 rapid reset (CVE-2023-44487: HEADERS then
 * RST_STREAM, over and over) makes gRPC core 1.51 build and drop calls on its own threads,
 * and it grew this process by 1.1 GB in ten seconds while other clients timed out. gRPC
 * 1.51 has no limit for it (MAX_CONCURRENT_STREAMS applies only once the peer acknowledged
 * our SETTINGS, which an attacker never does). What the server can see is its own memory:
 * when its RSS grew by more than memory_burst within WATCH_SAMPLES * WATCH_MS, the
 * connection that sent the most in the next WATCH_PROBE_MS is shut down (conn.c), and the
 * window starts again. The watch has its own thread, which never enters gRPC: during such
 * a flood the acceptor's grpc_completion_queue_next does not return (the thread that polls
 * runs gRPC's work, and the flood is endless work). That is the second sign: the acceptor
 * comes back at least every ACCEPTOR_POLL_MS, or with each new call; held inside gRPC for
 * STALL_MS with no call for us, gRPC is busy with work that is no call, and the busiest
 * connection is shut down (again every STALL_MS while it lasts). This one also catches a
 * flood that reuses memory freed after the first.
 */
#define STALL_MS 600
#define WATCH_MS 250
#define WATCH_SAMPLES 8
#define WATCH_PROBE_MS 50

static void
watch_memory(server_t *s, int64_t now)
{
    if (s->memory_burst == 0 || now - s->last_watch_ms < WATCH_MS) return;
    s->last_watch_ms = now;
    size_t rss = flowctl_rss_bytes(), low = rss;
    for (int i = 0; i < WATCH_SAMPLES; i++)
        if (s->rss[i] && s->rss[i] < low) low = s->rss[i];
    s->rss[s->rss_next] = rss;
    s->rss_next = (s->rss_next + 1) % WATCH_SAMPLES;
    if (rss - low <= s->memory_burst) return;
    int n = flowctl_conn_shutdown_busiest(s->ports, s->n_ports, WATCH_PROBE_MS);
    for (int i = 0; i < WATCH_SAMPLES; i++) s->rss[i] = 0; /* a new window from here */
    pthread_mutex_lock(&s->mu);
    s->memory_closed += n;
    pthread_mutex_unlock(&s->mu);
}

static void
watch_stall(server_t *s, int64_t now)
{
    if (now - atomic_load(&s->acceptor_beat_ms) < STALL_MS) return;
    atomic_store(&s->acceptor_beat_ms, now);
    int n = flowctl_conn_shutdown_busiest(s->ports, s->n_ports, WATCH_PROBE_MS);
    pthread_mutex_lock(&s->mu);
    s->stall_closed += n;
    pthread_mutex_unlock(&s->mu);
}

/* ---- 2d. the listener and the descriptor limit --------------------------------
 *
 * gRPC core 1.51 stops accepting for good when accept4 fails with anything but EAGAIN
 * (EMFILE: 400 idle connections under ulimit -n 256 did it): the port stays bound and
 * connections queue up, unanswered, forever. Two guards, on the watchdog thread:
 *   - below the soft RLIMIT_NOFILE (Flowctl::Server raises it to the hard one) a reserve
 *     of limit/8 descriptors is kept: past it, the connections idle longest are shut down;
 *   - a listener with a connection waiting for LISTENER_TICKS checks in a row (a second)
 *     while descriptors ran out in the last EXHAUSTED_MS, or for LISTENER_TICKS_ANYWAY (ten
 *     seconds) whatever the cause, has stopped: listener_stopped is set, and the Ruby layer
 *     starts a new listener on the same port (lib/flowctl/server.rb, after
 *     release_listeners). (A busy gRPC core can leave connections waiting for a second:
 *     rapid reset does; that alone is no reason to start again.)
 */
#define LISTENER_TICKS 4
#define LISTENER_TICKS_ANYWAY 40
#define EXHAUSTED_MS 30000
#define RESERVE_DIV 8

static void
watch_listener(server_t *s)
{
    int64_t now = flowctl_mono_ms();
    if (flowctl_conn_fds_left() <= 8) s->exhausted_ms = now;
    int shed = flowctl_conn_shed_idle(s->ports, s->n_ports, RESERVE_DIV);
    int pending = flowctl_conn_listener_pending(s->ports, s->n_ports);
    if (pending >= 0) s->pending_ticks = pending ? s->pending_ticks + 1 : 0; /* -1: cannot tell now */
    bool exhausted = s->exhausted_ms && now - s->exhausted_ms < EXHAUSTED_MS;
    pthread_mutex_lock(&s->mu);
    s->idle_shed += shed;
    if ((s->pending_ticks >= LISTENER_TICKS && exhausted) || s->pending_ticks >= LISTENER_TICKS_ANYWAY)
        s->listener_stopped = true;
    pthread_mutex_unlock(&s->mu);
}

/* A pause of WATCH_MS between checks (the tick counts assume that cadence) that #shutdown
 * ends at once: a stopping server's close joins the acceptor, which joins this thread. */
static bool
watchdog_pause(server_t *s)
{
    struct timespec until = flowctl_mono_in(WATCH_MS / 1000.0);
    pthread_mutex_lock(&s->mu);
    while (!s->shutting_down && pthread_cond_timedwait(&s->watchdog_wake, &s->mu, &until) != ETIMEDOUT) {}
    bool stop = s->shutting_down;
    pthread_mutex_unlock(&s->mu);
    return !stop;
}

static void *
watchdog_main(void *p)
{
    server_t *s = p;
    pthread_mutex_lock(&s->mu);
    bool stop = s->shutting_down;
    pthread_mutex_unlock(&s->mu);
    while (!stop) {
        watch_memory(s, flowctl_mono_ms());
        watch_stall(s, flowctl_mono_ms());
        watch_listener(s);
        stop = !watchdog_pause(s);
    }
    return NULL;
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
        reject_call(s, slot, GRPC_STATUS_RESOURCE_EXHAUSTED, BUSY_MESSAGE);
    }
}

/* One turn of the acceptor, inside the fork gate; true once the server is done. */
static bool
acceptor_step(server_t *s)
{
    grpc_event ev = grpc_completion_queue_next(s->notify_cq, next_expiry(s), NULL);
    atomic_store(&s->acceptor_beat_ms, flowctl_mono_ms());
    sweep_lingering(s, ev.type == GRPC_QUEUE_TIMEOUT);
    if (ev.type == GRPC_QUEUE_TIMEOUT) {
        reject_expired(s);
        pthread_mutex_lock(&s->mu);
        bool done = s->shutdown_done && s->outstanding == 0 && s->n_lingering == 0;
        pthread_mutex_unlock(&s->mu);
        return done;
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
    bool done = s->shutdown_done && s->outstanding == 0 && s->n_lingering == 0;
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
        atomic_store(&s->acceptor_beat_ms, flowctl_mono_ms()); /* a wait at the gate (a fork) is no stall */
        done = acceptor_step(s);
        flowctl_gate_leave();
    }
    if (s->watchdog_running) pthread_join(s->watchdog, NULL); /* it ends once shutting_down is set */
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
        pthread_cond_destroy(&s->watchdog_wake);
        free(s->auth_token);
        free(s);
    }
    return NULL;
}

/* ---- 3. Native::Server ------------------------------------------------------ */

static void
server_destroy_grpc(server_t *s)
{
    for (call_slot **list = &s->linger_in; list; list = list == &s->linger_in ? &s->lingering : NULL) {
        while (*list) { /* none after the acceptor ended; a server that never started has none */
            call_slot *slot = *list;
            *list = slot->next;
            slot_free(slot);
        }
    }
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
        free(s->auth_token);
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
            pthread_cond_broadcast(&s->watchdog_wake);
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
    pthread_cond_destroy(&s->watchdog_wake);
    free(s->auth_token);
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
    flowctl_cond_init(&s->watchdog_wake);
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
 * (auth.c) with UNAUTHENTICATED itself. memory_burst (bytes): see section 2c.
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
    grpc_server_start(s->server);
    s->started = true;
    for (int i = 0; i < OUTSTANDING_REQUESTS; i++) arm_request(s);
    atomic_store(&s->acceptor_beat_ms, flowctl_mono_ms());
    s->watchdog_running = pthread_create(&s->watchdog, NULL, watchdog_main, s) == 0;
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
    pthread_cond_broadcast(&s->watchdog_wake);
    pthread_mutex_unlock(&s->mu);
    if (first) grpc_server_shutdown_and_notify(s->server, s->notify_cq, &s->shutdown_tag);
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

static bool shutdown_ready(server_t *s) { return s->shutdown_done && s->n_lingering == 0; }
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
    long acc = s->accepted, rej = s->rejected, stuck = s->stuck_closed, unauth = s->unauthenticated;
    long abusive = s->abusive_closed, memory = s->memory_closed, stall = s->stall_closed, reset = s->reset_early;
    long idle_shed = s->idle_shed, dropped = s->dropped;
    bool stopped = s->listener_stopped;
    int idle = s->idle, queued = s->queued, lingering = s->n_lingering;
    pthread_mutex_unlock(&s->mu);
    VALUE h = rb_hash_new();
    rb_hash_aset(h, ID2SYM(rb_intern("accepted")), LONG2NUM(acc));
    rb_hash_aset(h, ID2SYM(rb_intern("rejected")), LONG2NUM(rej));
    rb_hash_aset(h, ID2SYM(rb_intern("idle")), INT2FIX(idle));
    rb_hash_aset(h, ID2SYM(rb_intern("queued")), INT2FIX(queued));
    rb_hash_aset(h, ID2SYM(rb_intern("lingering")), INT2FIX(lingering));
    rb_hash_aset(h, ID2SYM(rb_intern("stuck_closed")), LONG2NUM(stuck));
    rb_hash_aset(h, ID2SYM(rb_intern("unauthenticated")), LONG2NUM(unauth));
    rb_hash_aset(h, ID2SYM(rb_intern("abusive_closed")), LONG2NUM(abusive));
    rb_hash_aset(h, ID2SYM(rb_intern("memory_closed")), LONG2NUM(memory));
    rb_hash_aset(h, ID2SYM(rb_intern("stall_closed")), LONG2NUM(stall));
    rb_hash_aset(h, ID2SYM(rb_intern("reset_early")), LONG2NUM(reset));
    rb_hash_aset(h, ID2SYM(rb_intern("idle_shed")), LONG2NUM(idle_shed));
    rb_hash_aset(h, ID2SYM(rb_intern("dropped")), LONG2NUM(dropped));
    rb_hash_aset(h, ID2SYM(rb_intern("listener_stopped")), stopped ? Qtrue : Qfalse);
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
    bool got_message;      /* a request message came */
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
        if (a.slot && flowctl_pump_collect(&a.slot->pump) && flowctl_pump_recv_failed(&a.slot->pump)) {
            /* the peer reset it while it waited (a flood's calls, or its connection was
             * shut): not worth a trip into Ruby */
            offense(s, a.slot);
            pthread_mutex_lock(&s->mu);
            s->reset_early++;
            pthread_mutex_unlock(&s->mu);
            slot_free(a.slot);
            continue;
        }
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
        c->got_message = true;
    } else if (!interrupted) {
        /* no message: a half-close, unless the client cancelled or went away */
        ok = !flowctl_pump_recv_failed(p) && !grpc_call_failed_before_recv_message(c->slot->call);
        if (ok) c->read_done = true;
        else c->cancelled = true;
        if (!ok && !c->got_message) offense(c->slot->owner, c->slot); /* reset before its request */
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

/* The trailing metadata, copied for the slot: gRPC may read it until the batch completes. */
static bool
keep_trailing(call_slot *slot, const flowctl_metadata *md)
{
    if (md->count == 0) return true;
    slot->status_md = calloc(md->count, sizeof(grpc_metadata));
    if (!slot->status_md) return false;
    for (size_t i = 0; i < md->count; i++) {
        slot->status_md[i].key = grpc_slice_ref(md->md[i].key);
        slot->status_md[i].value = grpc_slice_ref(md->md[i].value);
    }
    slot->status_md_count = md->count;
    return true;
}

/* The status batch, in the slot (it may outlive this call of finish): initial metadata
 * when no reply carried it, the last message, the status, and the close. */
static void
finish_ops(struct finish_arg *a)
{
    call_slot *slot = a->c->slot;
    grpc_op *ops = slot->status_ops;
    memset(ops, 0, sizeof(slot->status_ops));
    if (flowctl_pump_take_initial_md(&slot->pump)) ops[a->n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (a->msg) {
        slot->status_msg = a->msg;
        a->msg = NULL;
        ops[a->n].op = GRPC_OP_SEND_MESSAGE;
        ops[a->n++].data.send_message.send_message = slot->status_msg;
    }
    ops[a->n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[a->n].data.send_status_from_server.status = a->code;
    ops[a->n].data.send_status_from_server.status_details = &a->details;
    ops[a->n].data.send_status_from_server.trailing_metadata = slot->status_md;
    ops[a->n++].data.send_status_from_server.trailing_metadata_count = slot->status_md_count;
    if (slot->pump.close_watching) return; /* started before (watch_close): in flight on the pump already */
    ops[a->n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[a->n++].data.recv_close_on_server.cancelled = &slot->close_cancelled;
}

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
    if (!keep_trailing(a->c->slot, &a->md)) rb_raise(rb_eNoMemError, "flowctl: out of memory");
    finish_ops(a);
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
        linger(slot->owner, slot);
        return Qnil;
    }
    c->slot->status_sent = a->ok;
    end_call(c);
    return Qnil;
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
    rb_define_method(cServer, "start", server_start, -1);
    rb_define_method(cServer, "next_call", server_next_call, 0);
    rb_define_method(cServer, "shutdown", server_shutdown, 0);
    rb_define_method(cServer, "wait_shutdown", server_wait_shutdown, -1);
    rb_define_method(cServer, "cancel_all", server_cancel_all, 0);
    rb_define_method(cServer, "release_listeners", server_release_listeners, 0);
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
