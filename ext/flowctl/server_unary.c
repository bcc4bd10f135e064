/*
 * server_unary.c — unary calls without a pump (no Ruby here).
 *
 * A call of a registered unary method (Flowctl::Server registers each unary RPC it serves:
 * flowctl_server_register_unary) is bound to the server's notify_cq, the acceptor's queue,
 * as gRPC's own examples do: no completion queue of its own, and nobody polls for it. The
 * acceptor reads its request (SLOT_RECV) before a worker sees it, so the worker finds the
 * message there; the worker builds the status batch and, when the acceptor has other calls in
 * hand, hands it over (SLOT_SEND, an empty batch, which completes at once), never waiting on
 * gRPC; the acceptor starts it, sees the status leave (SLOT_STATUS) and frees the call. So
 * under load a call's writes run on the thread that reads its connection, as in gRPC's own C
 * servers: when workers wrote, their writes and the acceptor's reads contended for the
 * connection's combiner, and gRPC moved the loser's work to its executor thread
 * (docs/performance.md, "Where the 40-odd µs ... go"). A lone call's worker starts its status. A handler that asks
 * whether the client went away starts RECV_CLOSE_ON_SERVER (SLOT_CLOSE) once.
 *
 * Admission is the engine's (server_engine.c, on_request): a unary call counts as waiting
 * from the moment it is admitted, while its request is read. A status in flight is a
 * lingering call (2b there): it counts in n_lingering, and a peer that has not taken it
 * after write_timeout is shut down (flowctl_unary_sweep).
 *
 * A slot's refs count its batches in flight and its holder (the acceptor, the queue, then
 * a worker): whoever lets go of the last one frees it. Only the acceptor takes completions,
 * so a slot on the flying list stays until the acceptor itself removes it.
 */
#include "server_engine.h"

bool
flowctl_server_register_unary(server_t *s, const char *path)
{
    if (s->n_unary >= FLOWCTL_MAX_UNARY) return false;
    char *copy = strdup(path);
    if (!copy) return false;
    void *handle = grpc_server_register_method(s->server, copy, NULL, GRPC_SRM_PAYLOAD_NONE, 0);
    if (!handle) {
        free(copy);
        return false;
    }
    s->unary[s->n_unary].path = copy;
    s->unary[s->n_unary++].handle = handle;
    return true;
}

bool
flowctl_server_answer_natively(server_t *s, const char *path, flowctl_fast_unary fast)
{
    for (int i = 0; i < s->n_unary; i++) {
        if (strcmp(s->unary[i].path, path) != 0) continue;
        if (s->unary[i].fast.release) s->unary[i].fast.release(s->unary[i].fast.ctx);
        s->unary[i].fast = fast;
        return true;
    }
    return false;
}

void
flowctl_server_unary_free(server_t *s)
{
    for (int i = 0; i < s->n_unary; i++) {
        free(s->unary[i].path);
        if (s->unary[i].fast.release) s->unary[i].fast.release(s->unary[i].fast.ctx);
    }
}

static void
slot_unref(call_slot *slot)
{
    if (atomic_fetch_sub(&slot->refs, 1) == 1) flowctl_slot_free(slot);
}

/* A status batch goes in flight: the slot joins the flying list (before the batch starts,
 * so that its completion always finds it there). True when the acceptor has other calls in
 * hand (being read, or queued for workers): it is at work, not asleep in gRPC's poll. */
static bool
fly(server_t *s, call_slot *slot)
{
    slot->linger_until_ms = s->write_timeout_ms > 0 ? flowctl_mono_ms() + s->write_timeout_ms : INT64_MAX;
    pthread_mutex_lock(&s->mu);
    slot->fprev = NULL;
    slot->fnext = s->flying;
    if (s->flying) s->flying->fprev = slot;
    s->flying = slot;
    s->n_lingering++;
    bool busy = s->awaiting + s->queued > 0;
    pthread_mutex_unlock(&s->mu);
    atomic_fetch_add(&slot->refs, 1);
    return busy;
}

static void
land(server_t *s, call_slot *slot)
{
    pthread_mutex_lock(&s->mu);
    if (slot->fprev) slot->fprev->fnext = slot->fnext; else s->flying = slot->fnext;
    if (slot->fnext) slot->fnext->fprev = slot->fprev;
    slot->fprev = slot->fnext = NULL;
    pthread_mutex_unlock(&s->mu);
    flowctl_server_unlinger(s);
}

/* Starts the status batch built in slot->status_ops, in flight already (fly); the caller's
 * hold on the slot ends. */
static bool
start_status(server_t *s, call_slot *slot)
{
    bool ok = grpc_call_start_batch(slot->call, slot->status_ops, slot->n_status, &slot->t_status, NULL) ==
              GRPC_CALL_OK;
    if (!ok) {
        land(s, slot);
        atomic_fetch_sub(&slot->refs, 1);
        grpc_call_cancel(slot->call, NULL);
    }
    slot_unref(slot);
    return ok;
}

static bool
send_status(server_t *s, call_slot *slot, size_t n)
{
    slot->n_status = n;
    fly(s, slot);
    return start_status(s, slot);
}

void
flowctl_unary_accepted(server_t *s, call_slot *slot)
{
    memset(&slot->recv_op, 0, sizeof(slot->recv_op));
    slot->recv_op.op = GRPC_OP_RECV_MESSAGE;
    slot->recv_op.data.recv_message.recv_message = &slot->payload;
    atomic_store(&slot->refs, 2); /* the acceptor's hold, and the batch */
    if (grpc_call_start_batch(slot->call, &slot->recv_op, 1, &slot->t_recv, NULL) == GRPC_CALL_OK) return;
    pthread_mutex_lock(&s->mu);
    s->awaiting--;
    pthread_mutex_unlock(&s->mu);
    flowctl_slot_free(slot);
}

void
flowctl_unary_reject(server_t *s, call_slot *slot, grpc_status_code code, const char *msg)
{
    grpc_slice details = grpc_slice_from_static_string(msg);
    size_t n = flowctl_slot_refusal_ops(slot, code, &details);
    if (atomic_load(&slot->refs) == 0) atomic_store(&slot->refs, 1); /* fresh from gRPC: the acceptor holds it */
    send_status(s, slot, n);
}

/* The method's native answer, when it has one and takes this request: true once the reply
 * (an empty message, OK) is on its way from this thread, as a worker's status would be. */
static bool
answer_natively(server_t *s, call_slot *slot)
{
    const flowctl_fast_unary *fast = &s->unary[slot->unary].fast;
    if (!fast->answer || !slot->payload) return false;
    grpc_slice flat;
    const uint8_t *p;
    size_t len;
    if (!flowctl_buffer_flat(slot->payload, &flat, &p, &len)) return false;
    bool taken = fast->answer(fast->ctx, p, len);
    grpc_slice_unref(flat);
    if (!taken) return false;
    pthread_mutex_lock(&s->mu); /* counted before the reply can reach the client */
    s->accepted++;
    s->answered_natively++;
    pthread_mutex_unlock(&s->mu);
    grpc_slice none = grpc_empty_slice();
    grpc_byte_buffer *reply = grpc_raw_byte_buffer_create(&none, 1);
    flowctl_metadata no_md = {0};
    size_t n = flowctl_slot_status_ops(slot, &no_md, &reply, GRPC_STATUS_OK, &slot->status_details);
    if (reply) grpc_byte_buffer_destroy(reply);
    if (n == 0) { /* out of memory: the call is cancelled as it is freed */
        slot_unref(slot);
        return true;
    }
    send_status(s, slot, n);
    return true;
}

/* Its request came (or the client went away first): answered natively, queued for a
 * worker, or let go. */
static void
on_recv(server_t *s, call_slot *slot, bool success)
{
    atomic_fetch_sub(&slot->refs, 1); /* the batch; the acceptor's hold passes to the queue */
    pthread_mutex_lock(&s->mu);
    bool stopping = s->shutting_down;
    pthread_mutex_unlock(&s->mu);
    if (success && !stopping && answer_natively(s, slot)) {
        pthread_mutex_lock(&s->mu);
        s->awaiting--; /* after its status is in flight (n_lingering): the server stays for it */
        pthread_mutex_unlock(&s->mu);
        return;
    }
    pthread_mutex_lock(&s->mu);
    s->awaiting--;
    if (!success) s->reset_early++;
    bool queued = success && flowctl_server_queue_locked(s, slot);
    if (success && !queued) s->rejected++;
    bool wake = queued && flowctl_server_wake_locked(s);
    pthread_mutex_unlock(&s->mu);
    if (wake) pthread_cond_signal(&s->work);
    if (queued) {
        /* a worker takes it */
    } else if (!success) { /* reset before its request (HTTP/2 rapid reset): an offense */
        flowctl_server_offense(s, slot);
        slot_unref(slot);
    } else { /* the server is shutting down */
        flowctl_unary_reject(s, slot, GRPC_STATUS_UNAVAILABLE, "server shutting down");
    }
}

void
flowctl_unary_event(server_t *s, slot_tag *tag, bool success)
{
    call_slot *slot = tag->slot;
    switch (tag->kind) {
    case SLOT_RECV:
        on_recv(s, slot, success);
        break;
    case SLOT_STATUS:
        land(s, slot);
        slot->status_sent = success;
        slot_unref(slot);
        break;
    case SLOT_CLOSE:
        atomic_store(&slot->closed, true);
        flowctl_server_unlinger(s);
        slot_unref(slot);
        break;
    case SLOT_SEND: /* a worker's status, handed over with the worker's hold */
        start_status(s, slot);
        break;
    }
}

bool
flowctl_unary_finish(call_slot *slot, const flowctl_metadata *md, grpc_byte_buffer **msg,
                     grpc_status_code code, grpc_slice *details)
{
    server_t *s = slot->owner;
    flowctl_server_unhand(s, slot); /* the status keeps the server going (n_lingering) */
    slot->status_details = grpc_slice_ref(*details); /* the batch starts after the caller's is gone */
    size_t n = flowctl_slot_status_ops(slot, md, msg, code, &slot->status_details);
    if (n == 0) {
        flowctl_slot_release(slot);
        return false;
    }
    slot->n_status = n;
    /* An empty batch completes on notify_cq at once, and the hold goes with it. Only to an
     * acceptor at work: waking one asleep in poll for it would cost more than the contention
     * (a lone call's status leaves from the worker, as the combiner is free then). */
    if (fly(s, slot) && grpc_call_start_batch(slot->call, NULL, 0, &slot->t_send, NULL) == GRPC_CALL_OK) return true;
    return start_status(s, slot);
}

bool
flowctl_unary_peer_gone(call_slot *slot)
{
    if (!slot->watching) {
        grpc_op op;
        memset(&op, 0, sizeof(op));
        op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
        op.data.recv_close_on_server.cancelled = &slot->close_cancelled;
        server_t *s = slot->owner;
        pthread_mutex_lock(&s->mu);
        s->n_lingering++; /* a batch on notify_cq: the acceptor stays for it */
        pthread_mutex_unlock(&s->mu);
        atomic_fetch_add(&slot->refs, 1);
        if (grpc_call_start_batch(slot->call, &op, 1, &slot->t_close, NULL) == GRPC_CALL_OK) {
            slot->watching = true;
        } else {
            atomic_fetch_sub(&slot->refs, 1);
            flowctl_server_unlinger(s);
        }
    }
    return atomic_load(&slot->closed) && slot->close_cancelled;
}

void
flowctl_slot_release(call_slot *slot)
{
    if (!slot) return;
    flowctl_server_unhand(slot->owner, slot); /* the last look at the server: it may end now */
    if (slot->unary < 0) {
        flowctl_slot_free(slot);
        return;
    }
    grpc_call_cancel(slot->call, NULL); /* no status started (finish hands the slot over): a watch ends */
    slot_unref(slot);
}

void
flowctl_unary_sweep(server_t *s, int64_t now)
{
    enum { MAX_STUCK = 64 };
    grpc_call *calls[MAX_STUCK];
    char *peers[MAX_STUCK];
    int k = 0;
    pthread_mutex_lock(&s->mu);
    for (call_slot *slot = s->flying; slot && k < MAX_STUCK; slot = slot->fnext) {
        if (now <= slot->linger_until_ms) continue;
        slot->linger_until_ms = INT64_MAX; /* once: the cancel ends it */
        if (!slot->peer) slot->peer = grpc_call_get_peer(slot->call);
        calls[k] = slot->call;
        peers[k++] = slot->peer;
    }
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < k; i++) { /* still there: only this thread frees them */
        if (peers[i]) flowctl_server_close_stuck(s, peers[i]);
        grpc_call_cancel(calls[i], NULL);
    }
}
