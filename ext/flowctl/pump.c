/*
 * pump.c — the engine of a bidi stream: a send queue, a receive queue, one poller.
 *
 * gRPC lets a call have one send and one receive in flight. Done naively (start a batch,
 * wait for it, per message) every message costs a trip through the GVL and a system
 * call or two. Here a stream's batches complete on its own `next` queue, and:
 *   - Ruby threads (GVL held) put messages on the send queue and take replies off the
 *     receive queue; they wait (without the GVL) only when the send queue is full or
 *     the receive queue empty;
 *   - whichever thread waits is the poller: as batches complete it starts the next
 *     send from the queue and the next receive (read-ahead, up to PUMP_RECVQ messages
 *     or PUMP_RECV_BYTES), so the wire keeps moving between Ruby calls; when nobody
 *     waits while messages are queued, the driver (a native thread) starts them;
 *   - a message with another one queued behind it is sent with GRPC_WRITE_BUFFER_HINT:
 *     gRPC completes it at once and holds its bytes (up to 64 KB) until a message without
 *     the hint, so a burst of writes leaves in a few system calls (the last one flushes;
 *     so does the first after PUMP_HINT_NS of holding, which bounds the delay);
 *   - a burst of writes (each within PUMP_BURST_NS of the last) does not stop for the send
 *     in flight: up to PUMP_HOLD messages queue behind it before the writer looks for its
 *     completion, so each later send has one behind it (the hint) and a write costs no
 *     poll; when the writer pauses, the driver sends what it left after HOLD_NS. A write
 *     after a pause looks at once and its message leaves at once.
 * Other batches (initial metadata, status, a server's finish) are "extras": the caller
 * starts one and waits for its tag through the same poller.
 *
 * Locking: p->mu guards the struct. A poller holds no lock while inside
 * grpc_completion_queue_next, and handles an event with mu held, inside the fork gate.
 * Nothing releases the GVL while holding mu.
 *
 * Interrupts: as in wait.c, an interrupt that raises cancels the call, the waiter drains
 * every batch in flight, and the caller raises it (flowctl_wait_finish) once it has let
 * go of what it holds. Nothing is ever left in flight when a Ruby method returns,
 * except the read-ahead and queued sends, which flowctl_pump_destroy cancels and drains.
 */
#include "flowctl.h"
#include <limits.h>
#include <pthread.h>
#include <time.h>

#define POLL_MS 20
#define PUMP_BURST_NS 50000LL  /* writes closer than this are a burst */
#define PUMP_HOLD 4            /* a burst's writes queue this many behind the send in flight */
#define PUMP_HINT_NS 250000LL  /* gRPC holds hinted messages this long at most (then one flushes) */

static int64_t
mono_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

typedef bool (*pump_pred)(flowctl_pump *p, void *arg); /* called with mu held */

static bool
nothing_in_flight(flowctl_pump *p, void *unused)
{
    return !p->send_inflight && !p->recv_inflight && !p->initial_inflight && p->extras_inflight == 0;
}

/* ---- starting batches (mu held) -------------------------------------------- */

static void
start_send_locked(flowctl_pump *p)
{
    if (p->send_inflight || p->send_failed) return;
    if (p->send_len > 0) {
        grpc_byte_buffer *bb = p->sendq[p->send_head];
        p->sendq[p->send_head] = NULL;
        p->send_head = (p->send_head + 1) % PUMP_SENDQ;
        p->send_len--;
        memset(p->send_ops, 0, sizeof(p->send_ops));
        size_t n = 0;
        if (p->send_initial_md) { /* a server's first reply carries its initial metadata */
            p->send_ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
            p->send_initial_md = false;
        }
        p->send_ops[n].op = GRPC_OP_SEND_MESSAGE;
        p->send_ops[n].data.send_message.send_message = bb;
        /* another message follows at once: let the transport hold this one for it (for
         * PUMP_HINT_NS at most: then this one goes without the hint, and flushes) */
        if (p->send_len > 0) {
            int64_t now = mono_ns();
            if (p->hint_since_ns == 0) p->hint_since_ns = now;
            if (now - p->hint_since_ns < PUMP_HINT_NS) p->send_ops[n].flags = GRPC_WRITE_BUFFER_HINT;
            else p->hint_since_ns = 0;
        } else {
            p->hint_since_ns = 0;
        }
        p->send_msg = bb;
        p->send_inflight = grpc_call_start_batch(p->call, p->send_ops, n + 1, p->send_ops, NULL) == GRPC_CALL_OK;
        if (!p->send_inflight) {
            grpc_byte_buffer_destroy(bb);
            p->send_msg = NULL;
            p->send_failed = true;
        }
    } else if (p->close_wanted && !p->close_done) {
        memset(p->send_ops, 0, sizeof(p->send_ops));
        p->send_ops[0].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
        p->send_inflight = grpc_call_start_batch(p->call, p->send_ops, 1, p->send_ops, NULL) == GRPC_CALL_OK;
        if (!p->send_inflight) p->close_done = true;
    }
}

static void
start_recv_locked(flowctl_pump *p)
{
    if (p->recv_budget == 0 || p->recv_inflight || p->recv_eof || p->recv_len >= PUMP_RECVQ ||
        p->recv_bytes >= PUMP_RECV_BYTES)
        return;
    if (p->recv_budget != PUMP_UNLIMITED) p->recv_budget--;
    memset(&p->recv_op, 0, sizeof(p->recv_op));
    p->recv_op.op = GRPC_OP_RECV_MESSAGE;
    p->recv_op.data.recv_message.recv_message = &p->recv_buf;
    p->recv_buf = NULL;
    p->recv_inflight = grpc_call_start_batch(p->call, &p->recv_op, 1, &p->recv_op, NULL) == GRPC_CALL_OK;
    if (!p->recv_inflight) p->recv_eof = p->recv_failed = true;
}

/* ---- completions (mu held) --------------------------------------------------- */

static void
on_send(flowctl_pump *p, bool ok)
{
    p->send_inflight = false;
    if (p->send_msg) {
        grpc_byte_buffer_destroy(p->send_msg);
        p->send_msg = NULL;
    } else {
        p->close_done = true;
    }
    if (!ok) p->send_failed = true;
    p->send_progress_ms = flowctl_mono_ms();
    start_send_locked(p);
}

static void
on_recv(flowctl_pump *p, bool ok)
{
    p->recv_inflight = false;
    grpc_byte_buffer *bb = p->recv_buf;
    p->recv_buf = NULL;
    if (!bb) {
        p->recv_eof = true;
        p->recv_failed = !ok;
        return;
    }
    p->recvq[(p->recv_head + p->recv_len) % PUMP_RECVQ] = bb;
    p->recv_len++;
    p->recv_bytes += grpc_byte_buffer_length(bb);
    start_recv_locked(p);
}

static void
on_event(flowctl_pump *p, const grpc_event *ev)
{
    if (ev->tag == p->send_ops) {
        on_send(p, ev->success);
    } else if (ev->tag == &p->recv_op) {
        on_recv(p, ev->success);
    } else if (ev->tag == &p->initial_op) {
        p->initial_inflight = false;
        p->initial_done = true;
    } else { /* an extra batch: a waiter's, or one started by flowctl_pump_start */
        p->extras_inflight--;
        for (flowctl_pump_extra *x = p->extras; x; x = x->next) {
            if (x->tag != ev->tag) continue;
            x->done = true;
            x->ok = ev->success;
            break;
        }
    }
}

/* ---- polling -------------------------------------------------------------- */

/* One turn as the poller: mu held on entry and on return, released inside gRPC. A
 * woken waiter (woken != NULL) does not wait at a closed fork gate. */
static void
poll_once(flowctl_pump *p, const atomic_bool *woken)
{
    p->polling = true;
    pthread_mutex_unlock(&p->mu);
    bool in = true;
    if (woken) in = flowctl_gate_enter_unless(woken);
    else flowctl_gate_enter();
    if (in) {
        gpr_timespec d = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(POLL_MS, GPR_TIMESPAN));
        grpc_event ev = grpc_completion_queue_next(p->cq, d, NULL);
        pthread_mutex_lock(&p->mu);
        if (ev.type == GRPC_OP_COMPLETE) on_event(p, &ev);
        pthread_mutex_unlock(&p->mu);
        flowctl_gate_leave();
    }
    pthread_mutex_lock(&p->mu);
    p->polling = false;
    if (p->waiters > 0) pthread_cond_broadcast(&p->cond);
}

/* ---- the driver ---------------------------------------------------------------- */

/*
 * gRPC takes one send at a time, and only a thread that polls the stream's queue sees a
 * send complete and starts the next. Queued messages behind a send in flight are
 * "stranded" when no thread is polling: normally someone soon is (the reader, the next
 * write, close_write, finish), but a program may write and then leave the stream alone
 * (a server pushing an event every few seconds, a writer whose reader is busy, the end of
 * a burst whose last messages were held). So a stranded pump is listed here with a time
 * to look at it, and one native thread, awake only while the list is not empty, looks at
 * each listed pump when its time comes: what a burst held goes HOLD_NS after the last
 * write (up to 2 ms after it when the writer had been writing without a pause: the looks
 * space out, DRIVE_BACKOFF), what flow control holds is looked at every DRIVE_NS. No Ruby, no GVL; it passes
 * the fork gate.
 */
#define DRIVE_NS 2000000LL /* a stranded pump: looked at after 2 ms ... */
#define HOLD_NS 500000LL   /* ... what a burst held: 0.5 ms after its last write ... */
#define DRIVE_BACKOFF 2    /* ... or, a writer found at its burst again and again, up to HOLD_NS << 2 (2 ms) */

static pthread_mutex_t drive_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t drive_cond;  /* (drive_mu) a pump was listed earlier, or the driver let go of one */
static flowctl_pump *drive_head;   /* (drive_mu) listed pumps, through p->drive_next */
static flowctl_pump *driving;      /* (drive_mu) the pump the driver is looking at now */
static bool driver_running;        /* (drive_mu) */

static bool
sends_stranded(flowctl_pump *p)
{
    bool queued = p->send_inflight ? p->send_len > 0 || (p->close_wanted && !p->close_done)
                                   : p->send_len > 0 && !p->send_failed; /* held (enqueue_locked) */
    return queued && !p->polling && p->waiters == 0;
}

/* Starts the first queued send when none is in flight: messages a burst held back
 * (enqueue_locked) go before the thread that wrote them waits, or when the driver looks. mu held. */
static void
start_held_locked(flowctl_pump *p)
{
    if (!p->send_inflight && p->send_len > 0) start_send_locked(p);
}

/*
 * Takes what has completed off the pump's queue without waiting, as the poller (mu held,
 * released around each look): until the queue is empty, max looks, or pred holds (when
 * given; returns it). A native thread passes the fork gate (gated); a Ruby thread holding
 * the GVL needs no gate.
 */
static bool
take_completed(flowctl_pump *p, bool gated, int max, pump_pred pred, void *arg)
{
    p->polling = true;
    bool done = false;
    for (int i = 0; i < max && !done; i++) {
        pthread_mutex_unlock(&p->mu);
        if (gated) flowctl_gate_enter();
        grpc_event ev = grpc_completion_queue_next(p->cq, gpr_inf_past(GPR_CLOCK_MONOTONIC), NULL);
        pthread_mutex_lock(&p->mu);
        if (ev.type == GRPC_OP_COMPLETE) on_event(p, &ev);
        if (gated) { /* mu is never held across the gate */
            pthread_mutex_unlock(&p->mu);
            flowctl_gate_leave();
            pthread_mutex_lock(&p->mu);
        }
        if (ev.type != GRPC_OP_COMPLETE) break;
        if (pred) done = pred(p, arg);
    }
    p->polling = false;
    if (p->waiters > 0) pthread_cond_broadcast(&p->cond);
    return done;
}

static int64_t
last_write(flowctl_pump *p)
{
    return atomic_load_explicit(&p->last_write_ns, memory_order_relaxed);
}

/* One look at a listed pump: 0 when it needs no more looks, else when to look again (a
 * writer still at its burst, seen without taking mu from it: *busy; a send held by flow
 * control). */
static int64_t
drive_once(flowctl_pump *p, bool *busy)
{
    int64_t now = mono_ns(), last = last_write(p);
    *busy = now - last < HOLD_NS;
    if (*busy) return last;
    pthread_mutex_lock(&p->mu);
    int64_t again = 0;
    if (sends_stranded(p)) {
        start_held_locked(p);
        take_completed(p, true, INT_MAX, NULL, NULL);
        if (sends_stranded(p)) again = now + DRIVE_NS;
    }
    pthread_mutex_unlock(&p->mu);
    return again;
}

/* Lists p to be looked at by `at` (drive_mu held); wakes the driver when that is sooner
 * than it planned. */
static void
list_locked(flowctl_pump *p, int64_t at)
{
    if (p->drive_gone) return;
    if (p->drive_listed) {
        /* a pump whose writer is at a long burst keeps the driver's time: the writer's own
         * listing would wake the driver at every pause it leaves a send queued */
        if (at >= p->drive_at_ns || p->drive_busy > 0) return;
        p->drive_at_ns = at;
    } else {
        p->drive_listed = true;
        p->drive_at_ns = at;
        p->drive_next = drive_head;
        drive_head = p;
    }
    pthread_cond_broadcast(&drive_cond);
}

static void
cond_wait_until_ns(pthread_cond_t *cond, pthread_mutex_t *mu, int64_t at)
{
    struct timespec t = {.tv_sec = (time_t)(at / 1000000000LL), .tv_nsec = (long)(at % 1000000000LL)};
    pthread_cond_timedwait(cond, mu, &t);
}

/* One listed pump at a time, whose time has come, taken off the list while the driver
 * looks at it (drive_forget waits for that look to end). */
static void *
driver_main(void *unused)
{
    pthread_mutex_lock(&drive_mu);
    for (;;) {
        int64_t now = mono_ns(), next = INT64_MAX;
        flowctl_pump **due = NULL;
        for (flowctl_pump **l = &drive_head; *l; l = &(*l)->drive_next) {
            if ((*l)->drive_at_ns <= now) {
                due = l;
                break;
            }
            if ((*l)->drive_at_ns < next) next = (*l)->drive_at_ns;
        }
        if (!due) {
            if (next == INT64_MAX) pthread_cond_wait(&drive_cond, &drive_mu);
            else cond_wait_until_ns(&drive_cond, &drive_mu, next);
            continue;
        }
        flowctl_pump *p = *due;
        *due = p->drive_next;
        p->drive_listed = false;
        driving = p;
        pthread_mutex_unlock(&drive_mu);
        bool busy;
        int64_t again = drive_once(p, &busy);
        pthread_mutex_lock(&drive_mu);
        driving = NULL;
        pthread_cond_broadcast(&drive_cond);
        /* A writer at its burst comes back to the stream itself (its next write or read
         * starts what is queued): the looks while it keeps writing space out, so that a
         * stream written without a pause wakes the driver every 2 ms, not every 0.5 ms; what
         * it leaves queued when it stops goes at most 2 ms after its last write. */
        if (busy) {
            if (p->drive_busy < DRIVE_BACKOFF) p->drive_busy++;
            again += HOLD_NS << p->drive_busy;
        } else {
            p->drive_busy = 0;
        }
        if (again) list_locked(p, again);
    }
    return NULL;
}

/* Lists a stranded pump, to be looked at by `at` (p->mu held; lock order: p->mu, then drive_mu). */
static void
drive_later(flowctl_pump *p, int64_t at)
{
    pthread_mutex_lock(&drive_mu);
    if (!driver_running) driver_running = flowctl_thread_detached(driver_main, "flowctl-pump");
    list_locked(p, at);
    pthread_mutex_unlock(&drive_mu);
}

/* Before a pump is destroyed: off the list, and out of the driver's hands. */
static void
drive_forget(flowctl_pump *p)
{
    pthread_mutex_lock(&drive_mu);
    p->drive_gone = true;
    for (flowctl_pump **l = &drive_head; *l; l = &(*l)->drive_next) {
        if (*l == p) {
            *l = p->drive_next;
            break;
        }
    }
    p->drive_listed = false;
    while (driving == p) pthread_cond_wait(&drive_cond, &drive_mu);
    pthread_mutex_unlock(&drive_mu);
}

/* In a forked child: the driver thread is the parent's; start afresh. */
static void
pump_atfork_child(void)
{
    pthread_mutex_init(&drive_mu, NULL);
    flowctl_cond_init(&drive_cond);
    drive_head = NULL;
    driving = NULL;
    driver_running = false;
}

void
init_flowctl_pump(void)
{
    static const flowctl_fork_hooks hooks = {.name = "pump", .child = pump_atfork_child};
    flowctl_cond_init(&drive_cond);
    flowctl_fork_register(&hooks);
}

static void
cond_wait_ms(flowctl_pump *p, int ms)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_nsec += ms * 1000000L;
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&p->cond, &p->mu, &t);
}

struct wait_arg {
    flowctl_pump *p;
    pump_pred pred;
    void *arg;
    atomic_bool woken;
    bool done;
    bool bounded;          /* a wait for the peer to take what we send: p->send_timeout applies */
    bool expired;          /* ... and it ran out */
    int64_t started_ms;
};


/*
 * A wait on sends expires when the peer has taken nothing for send_timeout: no send
 * completed since the wait began (a peer that reads slowly but reads is never cut off).
 */
static bool
send_stalled(flowctl_pump *p, const struct wait_arg *w)
{
    if (!w->bounded || p->send_timeout_ms <= 0) return false;
    int64_t since = p->send_progress_ms > w->started_ms ? p->send_progress_ms : w->started_ms;
    return flowctl_mono_ms() - since > p->send_timeout_ms;
}

/* Polls (or waits for the poller) until pred holds, the thread is woken, or a bounded
 * wait on sends stalls. */
static void *
wait_nogvl(void *a)
{
    struct wait_arg *w = a;
    flowctl_pump *p = w->p;
    pthread_mutex_lock(&p->mu);
    start_held_locked(p); /* what this thread's burst held goes before it sleeps */
    p->waiters++;
    while (!(w->done = w->pred(p, w->arg)) && !atomic_load(&w->woken) && !(w->expired = send_stalled(p, w))) {
        if (p->polling) cond_wait_ms(p, POLL_MS);
        else poll_once(p, &w->woken);
    }
    p->waiters--;
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void
wait_ubf(void *a)
{
    struct wait_arg *w = a;
    atomic_store(&w->woken, true);
}

/* Polls until every batch has completed or `until` (monotonic) has passed. */
static bool
drain_until(flowctl_pump *p, gpr_timespec until)
{
    pthread_mutex_lock(&p->mu);
    p->waiters++;
    while (!nothing_in_flight(p, NULL) && gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), until) < 0) {
        if (p->polling) cond_wait_ms(p, POLL_MS);
        else poll_once(p, NULL);
    }
    p->waiters--;
    bool drained = nothing_in_flight(p, NULL);
    pthread_mutex_unlock(&p->mu);
    return drained;
}

/* After cancel: polls until every batch has completed (they do, promptly). */
static void *
drain_nogvl(void *a)
{
    drain_until(a, gpr_inf_future(GPR_CLOCK_MONOTONIC));
    return NULL;
}

/*
 * Waits without the GVL until pred holds. Returns 0, or 1 when an interrupt that raises
 * came: the call is cancelled and nothing is in flight any more; the caller lets go of
 * what it holds and calls flowctl_wait_finish(1).
 */
/*
 * Before a wait: takes what has already completed off the queue with the GVL held (a
 * look that does not block: the batch just started has often completed already, the
 * reply that was sent or the request that had arrived). When that is enough, the thread
 * keeps the GVL: no handoff to another thread and back, which is most of what a server's
 * unary call costs when several run at once. mu held; skipped while another thread polls.
 */
static bool
collect_now(flowctl_pump *p, pump_pred pred, void *arg)
{
    return !p->polling && take_completed(p, false, PUMP_SENDQ, pred, arg);
}

/* A bounded wait that stalled: the peer does not read. The call is cancelled and
 * drained; what the caller waited for failed (send_failed, send_timed_out). */
static void
give_up_stalled(flowctl_pump *p)
{
    grpc_call_cancel(p->call, NULL);
    rb_nogvl(drain_nogvl, p, NULL, NULL, 0);
    pthread_mutex_lock(&p->mu);
    p->send_failed = p->send_timed_out = true;
    pthread_mutex_unlock(&p->mu);
}

static int
pump_wait(flowctl_pump *p, pump_pred pred, void *arg, bool bounded)
{
    pthread_mutex_lock(&p->mu);
    bool done = pred(p, arg) || collect_now(p, pred, arg);
    pthread_mutex_unlock(&p->mu);
    int64_t started = done ? 0 : flowctl_mono_ms(); /* no clock read when nothing waits (most writes) */
    while (!done) {
        struct wait_arg w = {.p = p, .pred = pred, .arg = arg, .bounded = bounded, .started_ms = started};
        rb_nogvl(wait_nogvl, &w, wait_ubf, &w, RB_NOGVL_INTR_FAIL | RB_NOGVL_UBF_ASYNC_SAFE);
        if (w.done) break;
        if (w.expired) {
            give_up_stalled(p);
            return 0;
        }
        if (!flowctl_wait_interrupted()) continue;
        grpc_call_cancel(p->call, NULL);
        /* the cancelled batches have mostly completed already: keep the GVL if so (wait.c) */
        pthread_mutex_lock(&p->mu);
        bool drained = nothing_in_flight(p, NULL) || collect_now(p, nothing_in_flight, NULL);
        pthread_mutex_unlock(&p->mu);
        if (!drained) {
            flowctl_wait_note_cancel_wait();
            rb_nogvl(drain_nogvl, p, NULL, NULL, 0);
        }
        return 1;
    }
    /* leaving: someone must start what stays queued (the driver looks again later when
     * flow control holds it, or when the writer is still at its burst) */
    pthread_mutex_lock(&p->mu);
    if (sends_stranded(p)) drive_later(p, mono_ns() + HOLD_NS);
    pthread_mutex_unlock(&p->mu);
    return 0;
}

/* ---- the API (GVL held) ------------------------------------------------------ */

void
flowctl_pump_init(flowctl_pump *p, grpc_call *call, grpc_completion_queue *cq)
{
    memset(p, 0, sizeof(*p));
    p->call = call;
    p->cq = cq;
    pthread_mutex_init(&p->mu, NULL);
    flowctl_cond_init(&p->cond);
    grpc_metadata_array_init(&p->initial_md);
}

void
flowctl_pump_start_reading(flowctl_pump *p, bool initial_metadata, unsigned budget)
{
    pthread_mutex_lock(&p->mu);
    p->recv_budget = budget;
    if (initial_metadata && !p->initial_inflight && !p->initial_done) {
        memset(&p->initial_op, 0, sizeof(p->initial_op));
        p->initial_op.op = GRPC_OP_RECV_INITIAL_METADATA;
        p->initial_op.data.recv_initial_metadata.recv_initial_metadata = &p->initial_md;
        p->initial_inflight = grpc_call_start_batch(p->call, &p->initial_op, 1, &p->initial_op, NULL) == GRPC_CALL_OK;
        if (!p->initial_inflight) p->initial_done = true;
    }
    start_recv_locked(p);
    pthread_mutex_unlock(&p->mu);
}

static bool
send_room(flowctl_pump *p, void *unused)
{
    return p->send_len < PUMP_SENDQ || p->send_failed;
}

/* (mu held) the queue holds at most arg messages */
static bool
queue_below(flowctl_pump *p, void *arg)
{
    return p->send_len <= (unsigned)(uintptr_t)arg || p->send_failed;
}

/*
 * Queues the message and returns at once: the thread that polls the stream starts the
 * queued sends, or the driver when none does. A send still in flight (its completion not
 * taken yet) is looked for at once after a pause, so the message leaves now; in a burst
 * only once PUMP_HOLD messages wait behind it (then one look a write, which finds the
 * completion without a poll: a hinted send completes as gRPC takes it).
 */
/* Queues bb on a pump with room (mu held); gated: the caller does not hold the GVL. */
static void
enqueue_locked(flowctl_pump *p, grpc_byte_buffer *bb, bool gated)
{
    int64_t now = mono_ns();
    bool burst = now - last_write(p) < PUMP_BURST_NS;
    atomic_store_explicit(&p->last_write_ns, now, memory_order_relaxed);
    p->sendq[(p->send_head + p->send_len) % PUMP_SENDQ] = bb;
    p->send_len++;
    /* Within a burst a message finding no send in flight waits for the next ones (up to
     * PUMP_HOLD), so that they leave together, hinted, in one system call and one wake-up of
     * the peer, instead of one each: the writer starts them before it waits on the stream
     * (wait_nogvl, wait_locked_nogvl, push_sends_nogvl), the driver HOLD_NS after its last
     * write. Not while another thread polls or waits on the stream (nobody would start them). */
    bool hold = burst && p->send_len < PUMP_HOLD && !p->polling && p->waiters == 0 && !p->close_wanted;
    if (!p->send_inflight) {
        if (!hold) start_send_locked(p);
    } else if (!p->polling && (!burst || p->send_len >= PUMP_HOLD)) {
        uintptr_t below = burst ? PUMP_HOLD - 1 : 0;
        take_completed(p, gated, burst ? 2 : PUMP_SENDQ, queue_below, (void *)below);
    }
    if (sends_stranded(p)) drive_later(p, now + (burst ? HOLD_NS : DRIVE_NS));
}

int
flowctl_pump_write(flowctl_pump *p, grpc_byte_buffer *bb, bool *failed)
{
    int interrupted = pump_wait(p, send_room, NULL, true);
    if (interrupted) {
        grpc_byte_buffer_destroy(bb);
        return 1;
    }
    pthread_mutex_lock(&p->mu);
    *failed = p->send_failed;
    if (*failed) grpc_byte_buffer_destroy(bb);
    else enqueue_locked(p, bb, false);
    pthread_mutex_unlock(&p->mu);
    return 0;
}

static bool
closed(flowctl_pump *p, void *unused)
{
    return p->close_done || (p->send_failed && !p->send_inflight);
}

int
flowctl_pump_close_write(flowctl_pump *p)
{
    pthread_mutex_lock(&p->mu);
    p->close_wanted = true;
    start_send_locked(p);
    pthread_mutex_unlock(&p->mu);
    return pump_wait(p, closed, NULL, true);
}

static bool
readable(flowctl_pump *p, void *unused)
{
    return p->recv_len > 0 || p->recv_eof;
}

/* The next message off the read-ahead (NULL when none is there); the next receive starts. mu held. */
static grpc_byte_buffer *
take_read_locked(flowctl_pump *p)
{
    if (p->recv_len == 0) return NULL;
    grpc_byte_buffer *bb = p->recvq[p->recv_head];
    p->recvq[p->recv_head] = NULL;
    p->recv_head = (p->recv_head + 1) % PUMP_RECVQ;
    p->recv_len--;
    p->recv_bytes -= grpc_byte_buffer_length(bb);
    start_recv_locked(p);
    return bb;
}

int
flowctl_pump_read(flowctl_pump *p, grpc_byte_buffer **out)
{
    *out = NULL;
    int interrupted = pump_wait(p, readable, NULL, false);
    if (interrupted) return 1;
    pthread_mutex_lock(&p->mu);
    *out = take_read_locked(p);
    pthread_mutex_unlock(&p->mu);
    return 0;
}

/* ---- the API for native loops (no GVL: forward.c) ---------------------------- */

/* Waits (mu held, no GVL) until pred holds or *woken; first takes what has completed. */
static bool
wait_locked_nogvl(flowctl_pump *p, pump_pred pred, void *arg, const atomic_bool *woken)
{
    if (pred(p, arg) || (!p->polling && take_completed(p, true, PUMP_SENDQ, pred, arg))) return true;
    start_held_locked(p);
    bool done;
    p->waiters++;
    while (!(done = pred(p, arg)) && !atomic_load(woken)) {
        if (p->polling) cond_wait_ms(p, POLL_MS);
        else poll_once(p, woken);
    }
    p->waiters--;
    return done;
}

/* Starts what is queued on p whose turn has come (the sends in flight have completed),
 * without waiting: for a thread that is about to wait on another stream. No GVL. */
static void
push_sends_nogvl(flowctl_pump *p)
{
    pthread_mutex_lock(&p->mu);
    start_held_locked(p);
    if (!p->polling && p->send_inflight) take_completed(p, true, PUMP_SENDQ, NULL, NULL);
    pthread_mutex_unlock(&p->mu);
}

bool
flowctl_pump_read_nogvl(flowctl_pump *p, grpc_byte_buffer **out, const atomic_bool *woken, flowctl_pump *push)
{
    *out = NULL;
    pthread_mutex_lock(&p->mu);
    bool ready = readable(p, NULL) || (!p->polling && take_completed(p, true, PUMP_SENDQ, readable, NULL));
    if (!ready && push) { /* about to wait: what push has queued goes now, not when the driver looks */
        pthread_mutex_unlock(&p->mu);
        push_sends_nogvl(push);
        pthread_mutex_lock(&p->mu);
    }
    bool done = ready || wait_locked_nogvl(p, readable, NULL, woken);
    if (done) *out = take_read_locked(p);
    pthread_mutex_unlock(&p->mu);
    return done;
}

bool
flowctl_pump_write_nogvl(flowctl_pump *p, grpc_byte_buffer *bb, bool *failed, const atomic_bool *woken)
{
    pthread_mutex_lock(&p->mu);
    bool done = wait_locked_nogvl(p, send_room, NULL, woken);
    *failed = done && p->send_failed;
    if (done && !*failed) enqueue_locked(p, bb, true);
    pthread_mutex_unlock(&p->mu);
    return done;
}

static bool
initial_arrived(flowctl_pump *p, void *unused)
{
    return p->initial_done;
}

int
flowctl_pump_wait_initial(flowctl_pump *p)
{
    return pump_wait(p, initial_arrived, NULL, false);
}

static bool
extra_done(flowctl_pump *p, void *x)
{
    return ((flowctl_pump_extra *)x)->done;
}

int
flowctl_pump_run(flowctl_pump *p, const grpc_op *ops, size_t n, bool *ok)
{
    flowctl_pump_extra x = {.tag = (void *)ops};
    pthread_mutex_lock(&p->mu);
    grpc_call_error err = grpc_call_start_batch(p->call, ops, n, x.tag, NULL);
    if (err == GRPC_CALL_OK) {
        x.next = p->extras;
        p->extras = &x;
        p->extras_inflight++;
    }
    pthread_mutex_unlock(&p->mu);
    if (err != GRPC_CALL_OK) rb_raise(eFlowctlError, "gRPC refused the batch: %s", grpc_call_error_to_string(err));
    int interrupted = pump_wait(p, extra_done, &x, true);
    pthread_mutex_lock(&p->mu);
    for (flowctl_pump_extra **l = &p->extras; *l; l = &(*l)->next) {
        if (*l == &x) {
            *l = x.next;
            break;
        }
    }
    pthread_mutex_unlock(&p->mu);
    *ok = x.done && x.ok;
    return interrupted;
}

void
flowctl_pump_read_more(flowctl_pump *p, unsigned budget)
{
    pthread_mutex_lock(&p->mu);
    if (budget == PUMP_UNLIMITED || p->recv_budget == PUMP_UNLIMITED) p->recv_budget = PUMP_UNLIMITED;
    else if (!p->recv_inflight && p->recv_len == 0 && p->recv_budget < budget) p->recv_budget = budget;
    start_recv_locked(p);
    pthread_mutex_unlock(&p->mu);
}

static bool
sends_done(flowctl_pump *p, void *unused)
{
    return (p->send_len == 0 && !p->send_inflight) || p->send_failed;
}

static bool
no_extras(flowctl_pump *p, void *unused)
{
    return p->extras_inflight == 0;
}

int
flowctl_pump_wait_extras(flowctl_pump *p)
{
    return pump_wait(p, no_extras, NULL, true);
}

int
flowctl_pump_flush(flowctl_pump *p)
{
    return pump_wait(p, sends_done, NULL, true);
}

bool
flowctl_pump_take_initial_md(flowctl_pump *p)
{
    pthread_mutex_lock(&p->mu);
    bool pending = p->send_initial_md;
    p->send_initial_md = false;
    pthread_mutex_unlock(&p->mu);
    return pending;
}

bool
flowctl_pump_start(flowctl_pump *p, const grpc_op *ops, size_t n)
{
    pthread_mutex_lock(&p->mu);
    bool ok = grpc_call_start_batch(p->call, ops, n, (void *)ops, NULL) == GRPC_CALL_OK;
    if (ok) p->extras_inflight++;
    pthread_mutex_unlock(&p->mu);
    return ok;
}

bool
flowctl_pump_drain(flowctl_pump *p, gpr_timespec until)
{
    return drain_until(p, until);
}

bool
flowctl_pump_collect(flowctl_pump *p)
{
    pthread_mutex_lock(&p->mu);
    if (!p->polling) take_completed(p, true, INT_MAX, NULL, NULL);
    bool idle = nothing_in_flight(p, NULL);
    pthread_mutex_unlock(&p->mu);
    return idle;
}

void
flowctl_pump_set_send_timeout(flowctl_pump *p, int64_t ms)
{
    pthread_mutex_lock(&p->mu);
    p->send_timeout_ms = ms;
    pthread_mutex_unlock(&p->mu);
}

void
flowctl_pump_close_sends(flowctl_pump *p)
{
    pthread_mutex_lock(&p->mu);
    p->send_failed = true;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->mu);
}

bool
flowctl_pump_send_timed_out(flowctl_pump *p)
{
    pthread_mutex_lock(&p->mu);
    bool t = p->send_timed_out;
    pthread_mutex_unlock(&p->mu);
    return t;
}

bool
flowctl_pump_send_failed(flowctl_pump *p)
{
    pthread_mutex_lock(&p->mu);
    bool f = p->send_failed;
    pthread_mutex_unlock(&p->mu);
    return f;
}

bool
flowctl_pump_recv_failed(flowctl_pump *p)
{
    return p->recv_failed;
}

void
flowctl_pump_watch_close(flowctl_pump *p)
{
    pthread_mutex_lock(&p->mu);
    if (!p->close_watching) {
        memset(&p->close_op, 0, sizeof(p->close_op));
        p->close_op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
        p->close_op.data.recv_close_on_server.cancelled = &p->close_cancelled;
        p->close_extra = (flowctl_pump_extra){.tag = &p->close_op};
        if (grpc_call_start_batch(p->call, &p->close_op, 1, p->close_extra.tag, NULL) == GRPC_CALL_OK) {
            p->close_watching = true;
            p->close_extra.next = p->extras;
            p->extras = &p->close_extra;
            p->extras_inflight++;
        }
    }
    pthread_mutex_unlock(&p->mu);
}

bool
flowctl_pump_peer_gone(flowctl_pump *p, bool before_write)
{
    pthread_mutex_lock(&p->mu);
    bool look = p->close_watching && !p->close_extra.done && !p->polling;
    if (look && before_write && mono_ns() - last_write(p) < PUMP_BURST_NS) look = false; /* a burst */
    if (look) take_completed(p, false, PUMP_SENDQ, NULL, NULL);
    /* before the status is sent the close completes only when the client cancelled or left */
    bool gone = p->close_extra.done;
    pthread_mutex_unlock(&p->mu);
    return gone;
}

int
flowctl_pump_wait_close(flowctl_pump *p, int *cancelled)
{
    int interrupted = pump_wait(p, extra_done, &p->close_extra, false);
    *cancelled = p->close_extra.done ? p->close_cancelled : 1;
    return interrupted;
}

/* Cancels (unless the call is over: cancel_call false), drains what is in flight,
 * frees what the queues hold and the queue itself. Blocks only for cancelled batches,
 * which complete without waiting for the network. */
void
flowctl_pump_destroy(flowctl_pump *p, bool cancel_call)
{
    if (!p->cq) return;
    drive_forget(p);
    if (cancel_call && p->call) grpc_call_cancel(p->call, NULL);
    if (!nothing_in_flight(p, NULL)) drain_nogvl(p);
    for (unsigned i = 0; i < p->send_len; i++) grpc_byte_buffer_destroy(p->sendq[(p->send_head + i) % PUMP_SENDQ]);
    for (unsigned i = 0; i < p->recv_len; i++) grpc_byte_buffer_destroy(p->recvq[(p->recv_head + i) % PUMP_RECVQ]);
    p->send_len = p->recv_len = 0;
    grpc_metadata_array_destroy(&p->initial_md);
    flowctl_cq_destroy(p->cq);
    p->cq = NULL;
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cond);
}
