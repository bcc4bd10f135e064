/*
 * server_engine.c — the native server engine behind Flowctl::Native::Server (server.c) and
 * Flowctl::Native::ServerCall (server_call.c): a grpc_server, its accept loop and its guards.
 * No Ruby here: the acceptor and the watchdog are native threads, and what the bindings call
 * runs with or without the GVL as server_engine.h says.
 *
 * Reading order:
 *   1. slots: one outstanding grpc_server_request_call each, with its own pump (pump.c)
 *      whose queue the accepted call's batches complete on.
 *   2. the acceptor: a native thread that takes new calls off the server's notification
 *      queue and hands them to Ruby workers waiting in Server#next_call (flowctl_server_take).
 *      When none is idle, a few calls (max_waiting) may wait a moment (max_wait) for one;
 *      any other call gets RESOURCE_EXHAUSTED from the acceptor itself, so nothing queues
 *      without bound. 2b-2d: lingering statuses, the memory watch, the listener.
 *   3. life and death: create, start, shutdown, close, free.
 *   4. what workers wait for: the next call, the end of the shutdown.
 *   5. the status batch of a call.
 */
#include "server_engine.h"
#include <grpc/support/alloc.h>
#include <errno.h>
#include <time.h>

#define OUTSTANDING_REQUESTS 8

/* ---- 1. slots --------------------------------------------------------------- */

/* A slot for a call of the given method (-1: any method, on its own pump; else a
 * registered unary one, whose batches complete on the server's notify_cq). */
static call_slot *
slot_new(int unary)
{
    call_slot *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    grpc_call_details_init(&s->details);
    grpc_metadata_array_init(&s->md);
    s->t_new = (slot_tag){s, SLOT_NEW};
    s->t_recv = (slot_tag){s, SLOT_RECV};
    s->t_status = (slot_tag){s, SLOT_STATUS};
    s->t_close = (slot_tag){s, SLOT_CLOSE};
    s->t_send = (slot_tag){s, SLOT_SEND};
    s->unary = unary;
    if (unary < 0) {
        flowctl_pump_init(&s->pump, NULL, grpc_completion_queue_create_for_next(NULL));
        s->pump.send_initial_md = true;
    }
    return s;
}

/*
 * Frees a slot, cancelling the call when it never got its status and waiting for what
 * is in flight (a cancelled batch completes at once). (A cancel after the status batch
 * completed could still reset the stream before the status frames are flushed, and the
 * client would see CANCELLED.)
 */
void
flowctl_slot_free(call_slot *s)
{
    if (!s) return;
    flowctl_pump_destroy(&s->pump, s->call && !s->status_sent); /* none for a unary call */
    if (s->unary >= 0 && s->call && !s->status_sent) grpc_call_cancel(s->call, NULL);
    if (s->payload) grpc_byte_buffer_destroy(s->payload);
    if (s->status_msg) grpc_byte_buffer_destroy(s->status_msg);
    grpc_slice_unref(s->status_details); /* an empty slice unless a unary status kept one */
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

static void server_destroy_grpc(server_t *s);

/* The last of a server, once gRPC's part is gone: its locks and what it allocated. */
static void
server_release(server_t *s)
{
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cond);
    pthread_cond_destroy(&s->work);
    pthread_cond_destroy(&s->watchdog_wake);
    free(s->auth_token);
    flowctl_server_unary_free(s);
    free(s);
}

/* Asks gRPC for the next call of a method (an index in s->unary) or of any other (-1);
 * s->mu not held: creating a slot takes a while. */
bool
flowctl_server_arm(server_t *s, int method)
{
    pthread_mutex_lock(&s->mu);
    s->outstanding++;
    pthread_mutex_unlock(&s->mu);
    call_slot *slot = slot_new(method);
    grpc_call_error err = GRPC_CALL_ERROR;
    if (slot) {
        flowctl_pump_set_send_timeout(&slot->pump, s->write_timeout_ms);
        slot->owner = s;
    }
    if (slot && method < 0) {
        err = grpc_server_request_call(s->server, &slot->call, &slot->details, &slot->md, slot->pump.cq,
                                       s->notify_cq, &slot->t_new);
    } else if (slot) {
        grpc_slice_unref(slot->details.method);
        slot->details.method = grpc_slice_from_copied_string(s->unary[method].path);
        err = grpc_server_request_registered_call(s->server, s->unary[method].handle, &slot->call,
                                                  &slot->details.deadline, &slot->md, NULL, s->notify_cq,
                                                  s->notify_cq, &slot->t_new);
    }
    if (err == GRPC_CALL_OK) return true;
    flowctl_slot_free(slot);
    pthread_mutex_lock(&s->mu);
    s->outstanding--;
    pthread_mutex_unlock(&s->mu);
    return false;
}

/* Answers a call no worker can take; runs on the acceptor thread, and never waits for
 * the peer: the status lingers (2b) when it cannot leave at once. */
static void
reject_call(server_t *s, call_slot *slot, grpc_status_code code, const char *msg)
{
    if (slot->unary >= 0) {
        flowctl_unary_reject(s, slot, code, msg);
        return;
    }
    grpc_slice details = grpc_slice_from_static_string(msg);
    size_t n = flowctl_slot_refusal_ops(slot, code, &details);
    if (flowctl_pump_start(&slot->pump, slot->status_ops, n) && !flowctl_pump_collect(&slot->pump)) {
        flowctl_server_linger(s, slot);
        return;
    }
    slot->status_sent = true;
    flowctl_slot_free(slot);
}

static int64_t
mono_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

/* Queues an admitted call for a worker, who may be busy still: it waits max_wait at most.
 * s->mu held. */
bool
flowctl_server_queue_locked(server_t *s, call_slot *slot)
{
    if (s->shutting_down) return false;
    slot->next = NULL;
    slot->wait_until = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), s->max_wait);
    slot->queued_us = mono_us();
    if (s->queue_tail) s->queue_tail->next = slot; else s->queue_head = slot;
    s->queue_tail = slot;
    s->queued++;
    s->accepted++;
    return true;
}

/*
 * Waking a worker costs two context switches and, for a Ruby worker, the GVL's handoff:
 * more than a short call's handler. So a worker that ends its call takes the next queued
 * one before it lets go of the GVL (flowctl_server_try_take), and an idle worker is woken
 *   - while another serves calls: only when none took one for STALE_US (the busy ones are
 *     held: a slow handler, a stream);
 *   - while none does: at once while few calls are in the server (a lone call, a few
 *     clients calling one after the other: they wait for nothing), else at most once every
 *     WAKE_GAP_US unless WAKE_BATCH calls are queued: under load a worker wakes for a few
 *     calls at a time.
 * The acceptor looks again when the queued calls become due (next_expiry). The signal is
 * sent once s->mu is let go of, so that the woken worker does not wait for it.
 */
#define STALE_US 1000
#define WAKE_BATCH 4
#define WAKE_GAP_US 200

static bool
waiting_unwoken(server_t *s)
{
    return s->queue_head && s->idle > s->signalled;
}

/* When an idle worker is due for the queued calls (s->mu held, waiting_unwoken). */
static int64_t
wake_due_us(server_t *s)
{
    if (s->holding > 0) return s->last_take_us + STALE_US;
    bool few = s->queued + s->awaiting + s->n_lingering <= WAKE_BATCH; /* calls in the server, not in gRPC */
    return s->queued >= WAKE_BATCH || few ? 0 : s->last_wake_us + WAKE_GAP_US;
}

bool
flowctl_server_wake_locked(server_t *s)
{
    if (!waiting_unwoken(s)) return false;
    int64_t due = wake_due_us(s), now = mono_us();
    if (now < due) return false;
    s->signalled++;
    s->last_wake_us = now;
    return true;
}

/*
 * Admission: a new call may have an idle worker, or wait (at most max_waiting of them beyond
 * the idle workers, each for at most max_wait: a worker about to finish its call takes
 * it). Unary calls still reading their request count as waiting. s->mu held.
 */
static bool
admit_locked(server_t *s)
{
    return !s->shutting_down && s->queued + s->awaiting < s->idle + s->max_waiting;
}

#define BUSY_MESSAGE "server busy: every worker is serving a call"


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
    pthread_mutex_lock(&s->mu);
    bool none = s->shut_peers[0][0] == '\0'; /* filled from the first: none shut yet, no peer to look up */
    pthread_mutex_unlock(&s->mu);
    if (none) return false;
    char *peer = grpc_call_get_peer(slot->call);
    bool shut = false;
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < 8 && !shut && peer; i++) shut = strcmp(s->shut_peers[i], peer) == 0;
    if (shut) s->dropped++;
    pthread_mutex_unlock(&s->mu);
    gpr_free(peer);
    if (shut) flowctl_slot_free(slot);
    return shut;
}

void
flowctl_server_offense(server_t *s, call_slot *slot)
{
    char *peer = grpc_call_get_peer(slot->call);
    pthread_mutex_lock(&s->mu);
    bool abusive = flowctl_conn_offend(&s->offenders, peer, flowctl_mono_ms(), MAX_REFUSED);
    pthread_mutex_unlock(&s->mu);
    if (abusive) {
        remember_shut(s, peer);
        flowctl_conn_shutdown(peer, s->ports, s->n_ports, &s->abusive_closed);
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
    if (!success) {
        flowctl_slot_free(slot);
        return;
    }
    if (!stopping) flowctl_server_arm(s, slot->unary);
    if (drop_if_shut(s, slot)) return;
    if (slot->unary < 0) {
        slot->pump.call = slot->call;
        flowctl_pump_start_reading(&slot->pump, false, 1); /* a rejected call drains it */
        if (flowctl_pump_collect(&slot->pump) && flowctl_pump_recv_failed(&slot->pump)) {
            /* reset by the peer already (HTTP/2 rapid reset sends HEADERS + RST_STREAM):
             * no worker for it, and an offense */
            pthread_mutex_lock(&s->mu);
            s->reset_early++;
            pthread_mutex_unlock(&s->mu);
            flowctl_server_offense(s, slot);
            flowctl_slot_free(slot);
            return;
        }
    }
    if (s->auth_token && !flowctl_bearer_ok(s->auth_token, s->auth_len, &slot->md)) {
        pthread_mutex_lock(&s->mu);
        s->unauthenticated++;
        pthread_mutex_unlock(&s->mu);
        flowctl_server_offense(s, slot);
        reject_call(s, slot, GRPC_STATUS_UNAUTHENTICATED, AUTH_MESSAGE);
        return;
    }
    /* once queued, a worker may take the call, end it and free the slot: not looked at after */
    bool unary = slot->unary >= 0;
    pthread_mutex_lock(&s->mu);
    bool admitted = admit_locked(s);
    if (admitted && unary) s->awaiting++; /* queued once its request is read */
    else if (admitted) flowctl_server_queue_locked(s, slot);
    else s->rejected++;
    bool wake = admitted && !unary && flowctl_server_wake_locked(s);
    pthread_mutex_unlock(&s->mu);
    if (wake) pthread_cond_signal(&s->work);
    if (admitted && unary) {
        flowctl_unary_accepted(s, slot);
    } else if (!admitted) {
        flowctl_server_offense(s, slot);
        reject_call(s, slot, GRPC_STATUS_RESOURCE_EXHAUSTED, BUSY_MESSAGE);
    }
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


/* A worker lets go of a call it took (s->mu held). */
static void
unhand_locked(server_t *s, call_slot *slot)
{
    if (!slot->handed) return;
    slot->handed = false;
    if (--s->holding == 0) pthread_cond_broadcast(&s->cond); /* wait_shutdown */
}

/* Any thread: the call's status batch is in flight; the acceptor takes it from here. */
void
flowctl_server_linger(server_t *s, call_slot *slot)
{
    pthread_mutex_lock(&s->mu);
    unhand_locked(s, slot);
    slot->next = s->linger_in;
    s->linger_in = slot;
    s->n_lingering++;
    pthread_mutex_unlock(&s->mu);
}

void
flowctl_server_close_stuck(server_t *s, const char *peer)
{
    remember_shut(s, peer);
    flowctl_conn_shutdown(peer, s->ports, s->n_ports, &s->stuck_closed);
}

static int
peer_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Over MAX_LINGERING: the peer with the most lingering calls is the one not reading
 * (unary calls' statuses in flight count too; their peers are looked up now). */
static void
close_greediest_peer(server_t *s, int n)
{
    char **peers = malloc(sizeof(char *) * (size_t)n);
    if (!peers) return;
    int k = 0;
    for (call_slot *slot = s->lingering; slot && k < n; slot = slot->next)
        if (slot->peer) peers[k++] = slot->peer;
    pthread_mutex_lock(&s->mu); /* the acceptor alone frees them: they stay until it returns */
    for (call_slot *slot = s->flying; slot && k < n; slot = slot->fnext) {
        if (!slot->peer) slot->peer = grpc_call_get_peer(slot->call);
        if (slot->peer) peers[k++] = slot->peer;
    }
    pthread_mutex_unlock(&s->mu);
    qsort(peers, (size_t)k, sizeof(char *), peer_cmp);
    const char *best = NULL;
    for (int i = 0, run = 0, most = 0; i < k; i++) {
        run = i > 0 && strcmp(peers[i], peers[i - 1]) == 0 ? run + 1 : 1;
        if (run > most) most = run, best = peers[i];
    }
    if (best) flowctl_server_close_stuck(s, best);
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
            flowctl_server_close_stuck(s, slot->peer);
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
        flowctl_slot_free(slot);
        freed++;
    }
    flowctl_unary_sweep(s, now);
    pthread_mutex_lock(&s->mu);
    s->n_lingering -= freed;
    if (freed && s->n_lingering == 0) pthread_cond_broadcast(&s->cond); /* wait_shutdown */
    int lingering = s->n_lingering;
    pthread_mutex_unlock(&s->mu);
    if (lingering > MAX_LINGERING) close_greediest_peer(s, lingering);
}

/* A unary call's status left (or failed): one lingering call fewer. */
void
flowctl_server_unlinger(server_t *s)
{
    pthread_mutex_lock(&s->mu);
    if (--s->n_lingering == 0) pthread_cond_broadcast(&s->cond); /* wait_shutdown */
    pthread_mutex_unlock(&s->mu);
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
 * flood that reuses memory freed after the first. Held means working: the acceptor's own
 * CPU time grew by STALL_CPU_MS since the watchdog saw its last beat (measured in a rapid
 * reset flood: as fast as the clock). An acceptor that waits for a CPU on a saturated
 * machine is late, not held, and its connections are busy with good calls: shutting the
 * busiest lost 333 of 1,280 registrations when the acceptor got 1 ms of CPU a tick
 * (spec/server_stall_spec.rb starves it so).
 */
#define STALL_MS 600
#define STALL_CPU_MS 200
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
    flowctl_conn_shutdown_busiest(s->ports, s->n_ports, WATCH_PROBE_MS, &s->memory_closed);
    for (int i = 0; i < WATCH_SAMPLES; i++) s->rss[i] = 0; /* a new window from here */
}

/* The acceptor thread's CPU time in ms; -1 when it cannot be read (then wall time alone counts). */
static int64_t
acceptor_cpu_ms(server_t *s)
{
    struct timespec t;
    if (!atomic_load(&s->acceptor_clock_set) || clock_gettime(s->acceptor_clock, &t) != 0) return -1;
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void
watch_stall(server_t *s, int64_t now)
{
    int64_t beat = atomic_load(&s->acceptor_beat_ms), cpu = acceptor_cpu_ms(s);
    if (beat != s->stall_beat_ms) { /* it came back since the last look: a new baseline */
        s->stall_beat_ms = beat;
        s->stall_cpu_ms = cpu;
    }
    if (now - beat < STALL_MS) return;
    if (cpu >= 0 && s->stall_cpu_ms >= 0 && cpu - s->stall_cpu_ms < STALL_CPU_MS) return; /* late, not held */
    atomic_store(&s->acceptor_beat_ms, now);
    s->stall_beat_ms = now;
    s->stall_cpu_ms = cpu;
    flowctl_conn_shutdown_busiest(s->ports, s->n_ports, WATCH_PROBE_MS, &s->stall_closed);
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
    flowctl_conn_shed_idle(s->ports, s->n_ports, RESERVE_DIV, &s->idle_shed);
    int pending = flowctl_conn_listener_pending(s->ports, s->n_ports);
    if (pending >= 0) s->pending_ticks = pending ? s->pending_ticks + 1 : 0; /* -1: cannot tell now */
    bool exhausted = s->exhausted_ms && now - s->exhausted_ms < EXHAUSTED_MS;
    pthread_mutex_lock(&s->mu);
    if ((s->pending_ticks >= LISTENER_TICKS && exhausted) || s->pending_ticks >= LISTENER_TICKS_ANYWAY)
        s->listener_stopped = true;
    pthread_mutex_unlock(&s->mu);
}

/* A pause of WATCH_MS between checks (the tick counts assume that cadence) that shutdown
 * ends at once: a stopping server's close joins the acceptor, which joins this thread
 * (with nanosleep, Server#stop took up to 0.25 s more). */
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
    if (waiting_unwoken(s)) { /* no worker woken for them yet: look again when one is due */
        int64_t left = wake_due_us(s) - mono_us();
        gpr_timespec stale = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                          gpr_time_from_micros(left > 0 ? left : 0, GPR_TIMESPAN));
        if (gpr_time_cmp(stale, t) < 0) t = stale;
    }
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
    pthread_mutex_lock(&s->mu);
    bool wake = flowctl_server_wake_locked(s);
    pthread_mutex_unlock(&s->mu);
    if (wake) pthread_cond_signal(&s->work);
    sweep_lingering(s, ev.type == GRPC_QUEUE_TIMEOUT);
    if (ev.type == GRPC_QUEUE_TIMEOUT) {
        reject_expired(s);
        pthread_mutex_lock(&s->mu);
        bool done = flowctl_server_shutdown_ready(s) && s->outstanding == 0;
        pthread_mutex_unlock(&s->mu);
        return done;
    }
    if (ev.type != GRPC_OP_COMPLETE) return true;
    if (ev.tag == &s->shutdown_tag) {
        pthread_mutex_lock(&s->mu);
        s->shutdown_done = true;
        pthread_cond_broadcast(&s->cond);
        pthread_mutex_unlock(&s->mu);
    } else if (((slot_tag *)ev.tag)->kind == SLOT_NEW) {
        on_request(s, ((slot_tag *)ev.tag)->slot, ev.success);
    } else {
        flowctl_unary_event(s, ev.tag, ev.success);
    }
    pthread_mutex_lock(&s->mu);
    bool done = flowctl_server_shutdown_ready(s) && s->outstanding == 0;
    pthread_mutex_unlock(&s->mu);
    return done;
}

static void *
acceptor_main(void *p)
{
    server_t *s = p;
    bool done = false;
    if (pthread_getcpuclockid(pthread_self(), &s->acceptor_clock) == 0) atomic_store(&s->acceptor_clock_set, true);
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
        server_release(s);
    }
    return NULL;
}
/* ---- 3. life and death of the server -------------------------------------- */

static void
server_destroy_grpc(server_t *s)
{
    for (call_slot **list = &s->linger_in; list; list = list == &s->linger_in ? &s->lingering : NULL) {
        while (*list) { /* none after the acceptor ended; a server that never started has none */
            call_slot *slot = *list;
            *list = slot->next;
            flowctl_slot_free(slot);
        }
    }
    while (s->queue_head) {
        call_slot *slot = s->queue_head;
        s->queue_head = slot->next;
        flowctl_slot_free(slot);
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
void
flowctl_server_shutdown_unstarted(server_t *s)
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

void
flowctl_server_free(server_t *s)
{
    if (s->pid != flowctl_pid) {
        /* a forked child's copy: no acceptor thread, sockets closed by gRPC's fork handler */
        free(s->auth_token);
        flowctl_server_unary_free(s);
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
        flowctl_server_shutdown_unstarted(s);
    }
    if (!s->closed) server_destroy_grpc(s);
    server_release(s);
}


server_t *
flowctl_server_new(void)
{
    server_t *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cond, NULL);
    pthread_cond_init(&s->work, NULL);
    flowctl_cond_init(&s->watchdog_wake);
    s->pid = flowctl_pid;
    return s;
}

void
flowctl_server_create(server_t *s, const grpc_channel_args *args)
{
    s->server = grpc_server_create(args, NULL);
    s->notify_cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(s->server, s->notify_cq, NULL);
}

/* Starts gRPC, asks for the first calls and starts the acceptor and the watchdog. */
int
flowctl_server_start(server_t *s)
{
    grpc_server_start(s->server);
    s->started = true;
    for (int i = 0; i < OUTSTANDING_REQUESTS; i++) flowctl_server_arm(s, -1);
    for (int m = 0; m < s->n_unary; m++)
        for (int i = 0; i < OUTSTANDING_REQUESTS; i++) flowctl_server_arm(s, m);
    atomic_store(&s->acceptor_beat_ms, flowctl_mono_ms());
    s->watchdog_running = pthread_create(&s->watchdog, NULL, watchdog_main, s) == 0;
    if (s->watchdog_running) pthread_setname_np(s->watchdog, "flowctl-watch");
    int err = pthread_create(&s->acceptor, NULL, acceptor_main, s);
    if (err) s->started = false;
    else pthread_setname_np(s->acceptor, "flowctl-accept"); /* top -H; spec/server_stall_spec.rb finds it */
    return err;
}

void
flowctl_server_shutdown(server_t *s)
{
    pthread_mutex_lock(&s->mu);
    bool first = !s->shutting_down;
    s->shutting_down = true;
    pthread_cond_broadcast(&s->cond);
    pthread_cond_broadcast(&s->work);
    pthread_cond_broadcast(&s->watchdog_wake);
    pthread_mutex_unlock(&s->mu);
    if (first) grpc_server_shutdown_and_notify(s->server, s->notify_cq, &s->shutdown_tag);
}

void
flowctl_server_close(server_t *s)
{
    if (s->started) pthread_join(s->acceptor, NULL);
    else if (s->server) flowctl_server_shutdown_unstarted(s);
    s->closed = true;
    server_destroy_grpc(s);
}

void
flowctl_server_counts_get(server_t *s, flowctl_server_counts *out)
{
    pthread_mutex_lock(&s->mu);
    *out = (flowctl_server_counts){
        .accepted = s->accepted, .rejected = s->rejected, .unauthenticated = s->unauthenticated,
        .stuck_closed = atomic_load(&s->stuck_closed), .abusive_closed = atomic_load(&s->abusive_closed),
        .memory_closed = atomic_load(&s->memory_closed), .stall_closed = atomic_load(&s->stall_closed),
        .idle_shed = atomic_load(&s->idle_shed), .reset_early = s->reset_early, .dropped = s->dropped,
        .answered_natively = s->answered_natively,
        .idle = s->idle, .queued = s->queued,
        .lingering = s->n_lingering, .listener_stopped = s->listener_stopped,
    };
    pthread_mutex_unlock(&s->mu);
}

/* ---- 4. what workers wait for ------------------------------------------------ */

bool
flowctl_server_shutdown_ready(server_t *s)
{
    return s->shutdown_done && s->n_lingering == 0 && s->holding == 0 && s->awaiting == 0;
}
bool flowctl_server_acceptor_ready(server_t *s) { return s->acceptor_done; }

bool
flowctl_server_wait(server_t *s, bool (*ready)(server_t *), double timeout, const bool *stop)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    double t = timeout < 0 ? 0 : timeout;
    until.tv_sec += (time_t)t;
    until.tv_nsec += (long)((t - (double)(time_t)t) * 1e9);
    if (until.tv_nsec >= 1000000000L) { until.tv_sec++; until.tv_nsec -= 1000000000L; }
    pthread_mutex_lock(&s->mu);
    while (!ready(s) && !*stop) {
        if (timeout < 0) pthread_cond_wait(&s->cond, &s->mu);
        else if (pthread_cond_timedwait(&s->cond, &s->mu, &until) == ETIMEDOUT) break;
    }
    bool result = ready(s);
    pthread_mutex_unlock(&s->mu);
    return result;
}

void
flowctl_server_interrupt(server_t *s, bool *stop)
{
    pthread_mutex_lock(&s->mu);
    *stop = true;
    pthread_cond_broadcast(&s->cond);
    pthread_cond_broadcast(&s->work);
    pthread_mutex_unlock(&s->mu);
}

/* The first queued call, now in a worker's hands (s->mu held); NULL when none. */
static call_slot *
pop_locked(server_t *s)
{
    call_slot *slot = s->queue_head;
    if (!slot) return NULL;
    s->queue_head = slot->next;
    if (!s->queue_head) s->queue_tail = NULL;
    s->queued--;
    s->holding++;
    slot->handed = true;
    s->last_take_us = mono_us();
    return slot;
}

call_slot *
flowctl_server_take(server_t *s, const bool *stop)
{
    call_slot *slot = NULL;
    pthread_mutex_lock(&s->mu);
    s->idle++;
    while (!s->queue_head && !s->shutting_down && !*stop) {
        pthread_cond_wait(&s->work, &s->mu);
        if (s->signalled > 0) s->signalled--;
    }
    slot = pop_locked(s);
    s->idle--;
    bool wake = flowctl_server_wake_locked(s); /* more calls for more workers? */
    pthread_mutex_unlock(&s->mu);
    if (wake) pthread_cond_signal(&s->work);
    return slot;
}

void
flowctl_server_unhand(server_t *s, call_slot *slot)
{
    pthread_mutex_lock(&s->mu);
    unhand_locked(s, slot);
    pthread_mutex_unlock(&s->mu);
}

call_slot *
flowctl_server_try_take(server_t *s)
{
    pthread_mutex_lock(&s->mu);
    call_slot *slot = pop_locked(s);
    pthread_mutex_unlock(&s->mu);
    return slot;
}

/* The peer reset it while it waited (a flood's calls, or its connection was shut): not
 * worth a trip into Ruby. */
bool
flowctl_server_drop_reset(server_t *s, call_slot *slot)
{
    if (slot->unary >= 0) return false; /* the acceptor saw its request come */
    if (!flowctl_pump_collect(&slot->pump) || !flowctl_pump_recv_failed(&slot->pump)) return false;
    flowctl_server_offense(s, slot);
    pthread_mutex_lock(&s->mu);
    s->reset_early++;
    unhand_locked(s, slot);
    pthread_mutex_unlock(&s->mu);
    flowctl_slot_free(slot);
    return true;
}

bool
flowctl_server_drained(server_t *s)
{
    pthread_mutex_lock(&s->mu);
    bool drained = s->shutting_down && !s->queue_head;
    pthread_mutex_unlock(&s->mu);
    return drained;
}

/* ---- 5. the status batch of a call -------------------------------------------- */

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

size_t
flowctl_slot_refusal_ops(call_slot *slot, grpc_status_code code, grpc_slice *details)
{
    grpc_op *ops = slot->status_ops;
    memset(ops, 0, sizeof(slot->status_ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[1].data.send_status_from_server.status = code;
    ops[1].data.send_status_from_server.status_details = details;
    if (slot->watching) return 2; /* a unary call's close is awaited already */
    ops[2].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[2].data.recv_close_on_server.cancelled = &slot->close_cancelled;
    return 3;
}

size_t
flowctl_slot_status_ops(call_slot *slot, const flowctl_metadata *md, grpc_byte_buffer **msg,
                        grpc_status_code code, grpc_slice *details)
{
    if (!keep_trailing(slot, md)) return 0;
    size_t n = 0;
    grpc_op *ops = slot->status_ops;
    memset(ops, 0, sizeof(slot->status_ops));
    /* a unary call sent nothing before its status */
    if (slot->unary >= 0 || flowctl_pump_take_initial_md(&slot->pump)) ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    if (*msg) {
        slot->status_msg = *msg;
        *msg = NULL;
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = slot->status_msg;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = code;
    ops[n].data.send_status_from_server.status_details = details;
    ops[n].data.send_status_from_server.trailing_metadata = slot->status_md;
    ops[n++].data.send_status_from_server.trailing_metadata_count = slot->status_md_count;
    /* started before (watch_close): in flight already */
    if (slot->unary >= 0 ? slot->watching : slot->pump.close_watching) return n;
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n++].data.recv_close_on_server.cancelled = &slot->close_cancelled;
    return n;
}
