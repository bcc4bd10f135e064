/*
 * heartbeat.c — the engine of Flowctl::Heartbeat: registration and heartbeats from a
 * native thread.
 *
 * Reading order:
 *   1. the shared state   one struct per heartbeat, shared by its Ruby object and its
 *                         thread, refcounted: whichever lets go last frees it
 *   2. config snapshot    the metrics a beat sends, immutable and refcounted: the binding
 *                         swaps a new one in under the lock; the thread takes a ref (and
 *                         the status) under the lock, so each beat sends a consistent one
 *   3. hb_unary           one unary call: create, one batch, pluck on the thread's queue
 *   4. the thread         register, beat, back off, register again when forgotten, then a
 *                         final STOPPING beat and (when the plan has one) an unregister
 *   5. live list          every running thread, for stop_all and the fork hooks
 *   6. accessors          what heartbeat_class.c reads and changes, under the lock
 *
 * What goes on the wire comes from the plan (heartbeat_wire.c): this file knows no
 * protocol. The thread is pure C: it never holds the GVL, never touches a VALUE and
 * never allocates Ruby objects. It owns malloc'd copies of everything it sends and a
 * reference on the flowctl_channel.
 */
#include "flowctl.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <grpc/support/alloc.h>

/* ---- 1. the shared state -------------------------------------------------- */

#define ERR_RING 32

struct flowctl_heartbeat {
    pthread_mutex_t lock; /* guards everything below marked (L) */
    pthread_cond_t cond;  /* (L) wakes the thread (stop) and the Ruby waiters (finished, errors) */
    pthread_t thread;
    atomic_int refs;      /* the Ruby object + the thread while it runs */
    unsigned generation;  /* fork generation it was started in: another one means "dead" */
    struct flowctl_heartbeat *prev, *next; /* live list (live_lock) */

    /* set before the thread starts, read-only afterwards */
    flowctl_hb_settings set;
    flowctl_channel *ch;

    /* (L) */
    char *service_id;     /* what the beats name: the id, or what the register reply assigned */
    flowctl_hb_config *config;
    unsigned status;      /* index into the plan's statuses */
    grpc_call *current;   /* the call in flight, so stop can cancel it */
    bool started, stop_requested, in_final, finished, joined;
    double final_timeout;
    flowctl_hb_stats stats;
    flowctl_hb_error errors[ERR_RING];
    unsigned err_head, err_count;
};

typedef flowctl_heartbeat heartbeat;

static unsigned fork_generation;
static pthread_mutex_t live_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t live_cond;  /* (live_lock) a thread left the list */
static heartbeat *live_head;      /* (live_lock) */

bool
flowctl_hb_dead(const heartbeat *hb)
{
    return hb->generation != fork_generation;
}

void
flowctl_hb_settings_free(flowctl_hb_settings *s)
{
    flowctl_hb_plan_free(s->plan);
    free(s->id);
    for (size_t i = 0; i < s->n_headers; i++) {
        grpc_slice_unref(s->headers[i].key);
        grpc_slice_unref(s->headers[i].value);
    }
    free(s->headers);
    flowctl_hb_config_unref(s->config);
    memset(s, 0, sizeof(*s));
}

static void
hb_unref(heartbeat *hb)
{
    if (atomic_fetch_sub(&hb->refs, 1) != 1) return;
    flowctl_hb_settings_free(&hb->set);
    flowctl_hb_config_unref(hb->config);
    pthread_mutex_destroy(&hb->lock);
    pthread_cond_destroy(&hb->cond);
    free(hb->service_id);
    free(hb);
}

/* A forked child's copy: the mutex, the thread and the header slices are the parent's
 * (and so are the references they hold): only the memory is freed here. */
static void
hb_free_dead(heartbeat *hb)
{
    flowctl_hb_plan_free(hb->set.plan);
    free(hb->set.id);
    free(hb->set.headers);
    if (hb->config) {
        atomic_store(&hb->config->refs, 1);
        flowctl_hb_config_unref(hb->config);
    }
    free(hb->service_id);
    free(hb);
}

flowctl_heartbeat *
flowctl_hb_create(flowctl_hb_settings *s)
{
    heartbeat *hb = calloc(1, sizeof(*hb));
    char *sid = s->id ? strdup(s->id) : NULL;
    if (!hb || !sid) {
        free(hb);
        free(sid);
        flowctl_hb_settings_free(s);
        return NULL;
    }
    atomic_init(&hb->refs, 1);
    hb->generation = fork_generation;
    pthread_mutex_init(&hb->lock, NULL);
    flowctl_cond_init(&hb->cond);
    hb->final_timeout = -1;
    hb->set = *s;
    memset(s, 0, sizeof(*s));
    hb->service_id = sid;
    hb->config = hb->set.config; /* the first snapshot */
    hb->set.config = NULL;
    hb->status = hb->set.status;
    return hb;
}

/* ---- 2. config snapshot ------------------------------------------------- */

flowctl_hb_config *
flowctl_hb_config_new(size_t n, bool strings)
{
    flowctl_hb_config *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    atomic_init(&c->refs, 1);
    c->keys = calloc(n + 1, sizeof(char *));
    if (strings) c->texts = calloc(n + 1, sizeof(char *));
    else c->values = calloc(n + 1, sizeof(double));
    if (!c->keys || (!c->texts && !c->values)) {
        flowctl_hb_config_unref(c);
        return NULL;
    }
    return c;
}

void
flowctl_hb_config_unref(flowctl_hb_config *c)
{
    if (!c || atomic_fetch_sub(&c->refs, 1) != 1) return;
    for (size_t i = 0; i < c->n_metrics; i++) {
        free(c->keys[i]);
        if (c->texts) free(c->texts[i]);
    }
    free(c->keys);
    free(c->texts);
    free(c->values);
    free(c);
}

/* A consistent snapshot of what the next beat sends. */
flowctl_hb_config *
flowctl_hb_take_config(heartbeat *hb, unsigned *status)
{
    pthread_mutex_lock(&hb->lock);
    flowctl_hb_config *c = hb->config;
    atomic_fetch_add(&c->refs, 1);
    *status = hb->status;
    pthread_mutex_unlock(&hb->lock);
    return c;
}

/* Swaps in a new config; the old one is released outside the lock. */
void
flowctl_hb_swap_config(heartbeat *hb, flowctl_hb_config *c)
{
    pthread_mutex_lock(&hb->lock);
    flowctl_hb_config *old = hb->config;
    hb->config = c;
    pthread_mutex_unlock(&hb->lock);
    flowctl_hb_config_unref(old);
}

/* ---- 3. one unary call ----------------------------------------------------- */

typedef struct call_out {
    grpc_status_code code;
    char error[HB_TEXT];
    char details[HB_TEXT];
    char *assigned_id; /* the register reply's service id (malloc'd), if any */
} call_out;

static void
set_current(heartbeat *hb, grpc_call *call)
{
    pthread_mutex_lock(&hb->lock);
    hb->current = call;
    /* a stop that came before the call existed cancels it now (the final beat is exempt) */
    if (call && hb->stop_requested && !hb->in_final) grpc_call_cancel(call, NULL);
    pthread_mutex_unlock(&hb->lock);
}

/* The reply fields one call reads. */
typedef struct reply_plan {
    uint32_t success, message, id;
} reply_plan;

static flowctl_hb_result
read_reply(const char *path, const reply_plan *rp, grpc_byte_buffer *bb, call_out *out)
{
    grpc_slice s = grpc_empty_slice();
    grpc_byte_buffer_reader r;
    if (bb && grpc_byte_buffer_reader_init(&r, bb)) {
        s = grpc_byte_buffer_reader_readall(&r);
        grpc_byte_buffer_reader_destroy(&r);
    }
    char message[HB_TEXT];
    flowctl_hb_result res = flowctl_hb_read_reply(GRPC_SLICE_START_PTR(s), GRPC_SLICE_LENGTH(s), rp->success,
                                                  rp->message, rp->id, message, sizeof(message),
                                                  rp->id ? &out->assigned_id : NULL);
    grpc_slice_unref(s);
    if (res == HB_FAILED) {
        out->code = GRPC_STATUS_INTERNAL;
        snprintf(out->error, HB_TEXT, "%s: the reply does not decode", path);
    } else if (res == HB_REJECTED) {
        snprintf(out->error, HB_TEXT, "control plane answered success: false (%s)", *message ? message : "no message");
    }
    return res;
}

/*
 * wait_for_ready: the call waits (until its deadline) for the channel to connect instead
 * of failing at once while the channel is in TRANSIENT_FAILURE. That is also what makes
 * reconnection prompt: while this thread plucks, it polls the connection attempt; with
 * no thread polling, gRPC core only notices a finished connect from its backup poller
 * (every 5 s). The final beat fails fast instead.
 * While such a call waits on a channel in TRANSIENT_FAILURE, the channel's reconnect
 * backoff is reset every NUDGE_MS: gRPC's backoff (1 s, growing) would otherwise keep a
 * control plane that came back waiting for the next attempt, up to two beat intervals
 * (spec/faults_controlplane_spec.rb saw 2.1 s at a 1 s interval). A refused connection
 * costs little; this lasts only while a beat waits.
 */
#define NUDGE_MS 200
#define GATE_STEP_MS 20 /* a beat's wait looks at its queue this often, out of the fork gate in between */

static void
pluck(heartbeat *hb, grpc_completion_queue *cq, grpc_call *call, bool wait_for_ready)
{
    for (unsigned turn = 1;
         grpc_completion_queue_pluck(cq, call, flowctl_deadline_in(GATE_STEP_MS / 1000.0), NULL).type ==
         GRPC_QUEUE_TIMEOUT;
         turn++) {
        /* Step out of gRPC between looks (the caller's stretch is the outermost one): a
         * fork being prepared passes here with the beat still in flight, instead of
         * cancelling it. A control plane in this process cannot answer before the fork
         * is done (its handler needs the GVL the forking thread holds): it was cancelled,
         * 4-12 beats failed per 80 forks. Out of gRPC the beat is not "current": the
         * fork's evict hook (hb_fork_evict) is for threads stuck inside. */
        set_current(hb, NULL);
        flowctl_gate_leave();
        flowctl_gate_enter();
        set_current(hb, call);
        if (turn % (NUDGE_MS / GATE_STEP_MS) == 0 && wait_for_ready &&
            grpc_channel_check_connectivity_state(hb->ch->channel, 0) == GRPC_CHANNEL_TRANSIENT_FAILURE)
            grpc_channel_reset_connect_backoff(hb->ch->channel);
    }
}

static flowctl_hb_result
hb_unary(heartbeat *hb, grpc_completion_queue *cq, const char *path, const flowctl_bytes *req, const reply_plan *rp,
         double timeout, bool wait_for_ready, call_out *out)
{
    grpc_slice method = grpc_slice_from_static_string(path);
    grpc_call *call = grpc_channel_create_call(hb->ch->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method, NULL,
                                               flowctl_deadline_in(timeout), NULL);
    grpc_slice body = grpc_slice_from_copied_buffer((const char *)req->p, req->len);
    grpc_byte_buffer *send = grpc_raw_byte_buffer_create(&body, 1), *recv = NULL;
    grpc_slice_unref(body);
    grpc_metadata_array init_md, trail_md;
    grpc_metadata_array_init(&init_md);
    grpc_metadata_array_init(&trail_md);
    grpc_slice details = grpc_empty_slice();
    grpc_status_code status = GRPC_STATUS_UNKNOWN;

    grpc_op ops[6] = {
        {.op = GRPC_OP_SEND_INITIAL_METADATA,
         .flags = wait_for_ready ? GRPC_INITIAL_METADATA_WAIT_FOR_READY : 0,
         .data.send_initial_metadata = {.count = hb->set.n_headers, .metadata = hb->set.headers}},
        {.op = GRPC_OP_SEND_MESSAGE, .data.send_message.send_message = send},
        {.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT},
        {.op = GRPC_OP_RECV_INITIAL_METADATA, .data.recv_initial_metadata.recv_initial_metadata = &init_md},
        {.op = GRPC_OP_RECV_MESSAGE, .data.recv_message.recv_message = &recv},
        {.op = GRPC_OP_RECV_STATUS_ON_CLIENT,
         .data.recv_status_on_client = {.trailing_metadata = &trail_md, .status = &status, .status_details = &details}},
    };
    set_current(hb, call);
    if (grpc_call_start_batch(call, ops, 6, call, NULL) == GRPC_CALL_OK) pluck(hb, cq, call, wait_for_ready);
    else status = GRPC_STATUS_INTERNAL;
    set_current(hb, NULL);

    flowctl_hb_result res = HB_FAILED;
    out->code = status;
    if (status == GRPC_STATUS_OK) {
        res = read_reply(path, rp, recv, out);
    } else {
        char *d = grpc_slice_to_c_string(details);
        snprintf(out->details, HB_TEXT, "%s", d);
        snprintf(out->error, HB_TEXT, "%s: %d (%s)", path, (int)status, *d ? d : "no details");
        gpr_free(d);
    }
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&init_md);
    grpc_metadata_array_destroy(&trail_md);
    grpc_byte_buffer_destroy(send);
    if (recv) grpc_byte_buffer_destroy(recv);
    grpc_call_unref(call);
    return res;
}

/* ---- 4. the thread -------------------------------------------------------- */

static flowctl_hb_result
out_of_memory(call_out *out)
{
    snprintf(out->error, HB_TEXT, "out of memory");
    out->code = GRPC_STATUS_RESOURCE_EXHAUSTED;
    return HB_FAILED;
}

/* Registers; a reply that assigns a service id changes what the beats name. */
static flowctl_hb_result
do_register(heartbeat *hb, grpc_completion_queue *cq, call_out *out)
{
    const flowctl_hb_plan *plan = hb->set.plan;
    flowctl_bytes req = {plan->register_req, plan->register_len};
    reply_plan rp = {plan->reg_success, plan->reg_message, plan->reg_service_id};
    flowctl_hb_result r = hb_unary(hb, cq, plan->register_path, &req, &rp, hb->set.call_timeout, true, out);
    if (r == HB_OK && out->assigned_id) {
        pthread_mutex_lock(&hb->lock);
        free(hb->service_id);
        hb->service_id = out->assigned_id;
        pthread_mutex_unlock(&hb->lock);
        out->assigned_id = NULL;
    }
    free(out->assigned_id);
    out->assigned_id = NULL;
    return r;
}

/* A beat with the current snapshot, or with the plan's STOPPING status (final). */
static flowctl_hb_result
do_beat(heartbeat *hb, grpc_completion_queue *cq, bool final, double timeout, call_out *out)
{
    const flowctl_hb_plan *plan = hb->set.plan;
    unsigned status;
    flowctl_hb_config *c = flowctl_hb_take_config(hb, &status);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    flowctl_bytes req;
    reply_plan rp = {plan->beat_success, plan->beat_message, 0};
    /* only this thread changes service_id: it reads its own without the lock */
    bool built = flowctl_hb_encode_beat(plan, hb->service_id, c, final ? plan->stopping : status, &now, &req);
    flowctl_hb_config_unref(c);
    if (!built) return out_of_memory(out);
    flowctl_hb_result r = hb_unary(hb, cq, plan->beat_path, &req, &rp, timeout, !final, out);
    free(req.p);
    return r;
}

/* The plan's "you are not registered" answer: a status code of forgot_codes whose
 * details contain forgot_details (flowctl.v1: UNKNOWN or NOT_FOUND, "not found"). */
static bool
forgotten(const heartbeat *hb, flowctl_hb_result r, const call_out *out)
{
    const flowctl_hb_plan *plan = hb->set.plan;
    if (r == HB_REJECTED) return true;
    if (r != HB_FAILED || out->code <= 0 || out->code >= 32 || !(plan->forgot_codes & (1u << out->code))) return false;
    return !plan->forgot_details || strstr(out->details, plan->forgot_details) != NULL;
}

/* Updates the stats (L) and queues the error for the on_error thread. */
static void
record(heartbeat *hb, flowctl_hb_result r, bool registration, const call_out *out)
{
    pthread_mutex_lock(&hb->lock);
    flowctl_hb_stats *st = &hb->stats;
    if (r == HB_OK) {
        if (registration) st->registrations++;
        else st->sent++;
        st->consecutive = 0;
        st->has_success = true;
        clock_gettime(CLOCK_REALTIME, &st->last_success);
    } else if (hb->stop_requested && !hb->in_final && r == HB_FAILED && out->code == GRPC_STATUS_CANCELLED) {
        /* a beat our own stop cancelled (stop_locked): no failure; the final beat follows */
    } else {
        st->failed++;
        st->consecutive++;
        snprintf(st->last_error, HB_TEXT, "%s", out->error);
        if (hb->set.want_errors) {
            if (hb->err_count == ERR_RING) {
                hb->err_head = (hb->err_head + 1) % ERR_RING;
                hb->err_count--;
            }
            flowctl_hb_error *e = &hb->errors[(hb->err_head + hb->err_count++) % ERR_RING];
            e->code = r == HB_REJECTED ? -1 : (int)out->code;
            snprintf(e->message, HB_TEXT, "%s", out->error);
            pthread_cond_broadcast(&hb->cond);
        }
    }
    pthread_mutex_unlock(&hb->lock);
}

/* Sleeps until `until` (CLOCK_MONOTONIC) or until stop is requested; true when stopping. */
static bool
sleep_or_stop(heartbeat *hb, struct timespec until)
{
    pthread_mutex_lock(&hb->lock);
    while (!hb->stop_requested) {
        if (pthread_cond_timedwait(&hb->cond, &hb->lock, &until) == ETIMEDOUT) break;
    }
    bool stop = hb->stop_requested;
    pthread_mutex_unlock(&hb->lock);
    return stop;
}

static double
jitter(uint64_t *state)
{
    /* xorshift64: 0.5 .. 1.0 */
    uint64_t x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    return 0.5 + 0.5 * (double)(x >> 11) / (double)(1ULL << 53);
}

/* The pause after a failure: min(interval, 0.1s * 2^(n-1)) * jitter(0.5..1). */
static double
backoff(const heartbeat *hb, unsigned failures, uint64_t *rng)
{
    unsigned shift = failures > 0 ? failures - 1 : 0;
    double b = 0.1 * (double)(1u << (shift < 20 ? shift : 20));
    return (b < hb->set.interval ? b : hb->set.interval) * jitter(rng);
}

/* Registers (when asked, and again whenever the control plane forgot us), beats at
 * once, then every interval from the start of the previous beat. Failures back off;
 * only a call that the control plane accepts resets the backoff. */
static void
beat_loop(heartbeat *hb, grpc_completion_queue *cq)
{
    uint64_t rng = (uint64_t)(uintptr_t)hb ^ (uint64_t)time(NULL) ^ 0x9e3779b97f4a7c15ULL;
    bool need_register = hb->set.plan->register_first;
    unsigned failures = 0;
    for (;;) {
        call_out out = {0};
        struct timespec started = flowctl_mono_in(0);
        flowctl_hb_result r;
        /* After a failure our own backoff paces the retries: without this the channel
         * would wait out gRPC's reconnect backoff (1s growing to 120s) before it even
         * tries, and a control plane that comes back would not hear from us for minutes. */
        flowctl_gate_enter();
        if (failures > 0) grpc_channel_reset_connect_backoff(hb->ch->channel);
        if (need_register) {
            r = do_register(hb, cq, &out);
            flowctl_gate_leave();
            record(hb, r, true, &out);
            if (r == HB_OK) {
                need_register = false;
                failures = 0;
                continue; /* beat at once */
            }
        } else {
            r = do_beat(hb, cq, false, hb->set.call_timeout, &out);
            flowctl_gate_leave();
            record(hb, r, false, &out);
            if (forgotten(hb, r, &out)) need_register = true; /* register again */
        }
        struct timespec until;
        if (r == HB_OK) {
            failures = 0;
            until = flowctl_ts_add(started, hb->set.interval);
        } else {
            failures = failures < 30 ? failures + 1 : failures;
            until = flowctl_mono_in(backoff(hb, failures, &rng));
        }
        if (sleep_or_stop(hb, until)) return;
    }
}

/* The final STOPPING beat, then the unregister call when the plan has one, all within
 * the deadline the stop asked for. */
static void
final_calls(heartbeat *hb, grpc_completion_queue *cq)
{
    pthread_mutex_lock(&hb->lock);
    hb->in_final = true;
    double timeout = hb->final_timeout < 0 ? 1.0 : hb->final_timeout;
    bool registered = hb->stats.registrations > 0;
    pthread_mutex_unlock(&hb->lock);
    if (timeout <= 0) return;
    struct timespec until = flowctl_mono_in(timeout);
    call_out out = {0};
    flowctl_gate_enter();
    flowctl_hb_result r = do_beat(hb, cq, true, timeout, &out);
    flowctl_gate_leave();
    record(hb, r, false, &out);

    const flowctl_hb_plan *plan = hb->set.plan;
    struct timespec now = flowctl_mono_in(0);
    double left = (double)(until.tv_sec - now.tv_sec) + (double)(until.tv_nsec - now.tv_nsec) / 1e9;
    if (!plan->unregister_path || !registered || left <= 0.01) return;
    flowctl_bytes req;
    if (!flowctl_hb_encode_unregister(plan, hb->service_id, &req)) return;
    call_out uout = {0};
    reply_plan rp = {0, 0, 0};
    flowctl_gate_enter();
    r = hb_unary(hb, cq, plan->unregister_path, &req, &rp, left, false, &uout);
    flowctl_gate_leave();
    free(req.p);
    if (r != HB_OK) record(hb, r, false, &uout);
}

static void live_remove(heartbeat *hb);

static void *
hb_main(void *p)
{
    heartbeat *hb = p;
    flowctl_gate_enter();
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    flowctl_gate_leave();
    beat_loop(hb, cq);
    final_calls(hb, cq);
    flowctl_gate_enter();
    flowctl_cq_destroy(cq);
    flowctl_channel_unref(hb->ch); /* the thread's reference */
    flowctl_gate_leave();
    pthread_mutex_lock(&hb->lock);
    hb->finished = true;
    pthread_cond_broadcast(&hb->cond);
    pthread_mutex_unlock(&hb->lock);
    live_remove(hb);
    hb_unref(hb);
    return NULL;
}

/* ---- 5. live list ------------------------------------------------------- */

static void
live_add(heartbeat *hb)
{
    pthread_mutex_lock(&live_lock);
    hb->next = live_head;
    hb->prev = NULL;
    if (live_head) live_head->prev = hb;
    live_head = hb;
    pthread_mutex_unlock(&live_lock);
}

static void
live_remove(heartbeat *hb)
{
    pthread_mutex_lock(&live_lock);
    if (hb->prev) hb->prev->next = hb->next;
    else if (live_head == hb) live_head = hb->next;
    if (hb->next) hb->next->prev = hb->prev;
    hb->prev = hb->next = NULL;
    pthread_cond_broadcast(&live_cond);
    pthread_mutex_unlock(&live_lock);
}

/* Asks the thread to stop: cancels the call in flight (not the final beat). (L) held by caller. */
static void
request_stop_locked(heartbeat *hb, double final_timeout)
{
    if (!hb->stop_requested) {
        hb->stop_requested = true;
        hb->final_timeout = final_timeout;
        if (hb->current && !hb->in_final) grpc_call_cancel(hb->current, NULL);
    }
    pthread_cond_broadcast(&hb->cond);
}

/* Starts the thread (it takes no signals: Ruby's handlers belong to Ruby's threads). */
int
flowctl_hb_start(heartbeat *hb, flowctl_channel *ch)
{
    hb->ch = ch;
    flowctl_channel_ref(ch);
    atomic_fetch_add(&hb->refs, 1); /* the thread's */
    live_add(hb);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int err = pthread_create(&hb->thread, NULL, hb_main, hb);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        live_remove(hb);
        flowctl_channel_unref(ch);
        atomic_fetch_sub(&hb->refs, 1);
        hb->finished = true;
        return err;
    }
    hb->started = true;
    return 0;
}

void
flowctl_hb_stop_all_request(double final_timeout)
{
    pthread_mutex_lock(&live_lock);
    for (heartbeat *hb = live_head; hb; hb = hb->next) {
        pthread_mutex_lock(&hb->lock);
        request_stop_locked(hb, final_timeout);
        pthread_mutex_unlock(&hb->lock);
    }
    pthread_mutex_unlock(&live_lock);
}

void *
flowctl_hb_all_wait_nogvl(void *p)
{
    flowctl_hb_all_wait *a = p;
    pthread_mutex_lock(&live_lock);
    while (live_head && !a->interrupted) {
        if (pthread_cond_timedwait(&live_cond, &live_lock, &a->until) == ETIMEDOUT) break;
    }
    pthread_mutex_unlock(&live_lock);
    return NULL;
}

void
flowctl_hb_all_wait_ubf(void *p)
{
    flowctl_hb_all_wait *a = p;
    pthread_mutex_lock(&live_lock);
    a->interrupted = true;
    pthread_cond_broadcast(&live_cond);
    pthread_mutex_unlock(&live_lock);
}

int
flowctl_hb_live_count(void)
{
    int n = 0;
    pthread_mutex_lock(&live_lock);
    for (heartbeat *hb = live_head; hb; hb = hb->next) n++;
    pthread_mutex_unlock(&live_lock);
    return n;
}

/* Fork hook (evict): a beat that is still inside gRPC a moment after the gate closed is
 * cancelled, so that it leaves gRPC at once. */
static void
hb_fork_evict(void)
{
    pthread_mutex_lock(&live_lock);
    for (heartbeat *hb = live_head; hb; hb = hb->next) {
        pthread_mutex_lock(&hb->lock);
        if (hb->current) grpc_call_cancel(hb->current, NULL);
        pthread_mutex_unlock(&hb->lock);
    }
    pthread_mutex_unlock(&live_lock);
}

/* Fork hook (child): the parent's threads do not exist here. Forget them without
 * touching their mutexes (they may be locked forever in this copy). */
static void
hb_fork_child(void)
{
    fork_generation++;
    pthread_mutex_init(&live_lock, NULL);
    live_head = NULL;
    flowctl_cond_init(&live_cond);
}

/* ---- 6. accessors for the binding ----------------------------------------- */

bool
flowctl_hb_started(const heartbeat *hb)
{
    return hb->started;
}

bool
flowctl_hb_joined(const heartbeat *hb)
{
    return hb->joined;
}

size_t
flowctl_hb_memsize(const heartbeat *hb)
{
    const flowctl_hb_plan *plan = hb->set.plan;
    return sizeof(*hb) + (plan ? sizeof(*plan) + plan->register_len : 0) + hb->set.n_headers * sizeof(grpc_metadata);
}

const flowctl_hb_plan *
flowctl_hb_plan_of(const heartbeat *hb)
{
    return hb->set.plan;
}

bool
flowctl_hb_wants_errors(const heartbeat *hb)
{
    return hb->set.want_errors;
}

void
flowctl_hb_set_status(heartbeat *hb, unsigned status)
{
    if (flowctl_hb_dead(hb)) {
        hb->status = status; /* no other thread in this child */
        return;
    }
    pthread_mutex_lock(&hb->lock);
    hb->status = status;
    pthread_mutex_unlock(&hb->lock);
}

void
flowctl_hb_service_id(heartbeat *hb, char *buf, size_t cap)
{
    bool dead = flowctl_hb_dead(hb);
    if (!dead) pthread_mutex_lock(&hb->lock);
    snprintf(buf, cap, "%s", hb->service_id);
    if (!dead) pthread_mutex_unlock(&hb->lock);
}

void
flowctl_hb_get_stats(heartbeat *hb, flowctl_hb_stats *out)
{
    if (flowctl_hb_dead(hb)) {
        *out = hb->stats; /* no other thread in this child */
        return;
    }
    pthread_mutex_lock(&hb->lock);
    *out = hb->stats;
    pthread_mutex_unlock(&hb->lock);
}

bool
flowctl_hb_running(heartbeat *hb)
{
    if (flowctl_hb_dead(hb)) return false;
    pthread_mutex_lock(&hb->lock);
    bool running = hb->started && !hb->stop_requested && !hb->finished;
    pthread_mutex_unlock(&hb->lock);
    return running;
}

void
flowctl_hb_request_stop(heartbeat *hb, double final_timeout)
{
    pthread_mutex_lock(&hb->lock);
    request_stop_locked(hb, final_timeout);
    pthread_mutex_unlock(&hb->lock);
}

bool
flowctl_hb_take_error(heartbeat *hb, flowctl_hb_error *out)
{
    bool got = false;
    pthread_mutex_lock(&hb->lock);
    if (hb->err_count > 0) {
        *out = hb->errors[hb->err_head];
        hb->err_head = (hb->err_head + 1) % ERR_RING;
        hb->err_count--;
        got = true;
    }
    pthread_mutex_unlock(&hb->lock);
    return got;
}

static bool
wait_done(const flowctl_hb_wait *w)
{
    return w->hb->finished || (w->for_error && w->hb->err_count > 0);
}

void *
flowctl_hb_wait_nogvl(void *p)
{
    flowctl_hb_wait *w = p;
    pthread_mutex_lock(&w->hb->lock);
    while (!wait_done(w) && !w->interrupted) {
        if (!w->until) {
            pthread_cond_wait(&w->hb->cond, &w->hb->lock);
        } else if (pthread_cond_timedwait(&w->hb->cond, &w->hb->lock, w->until) == ETIMEDOUT) {
            break;
        }
    }
    w->done = wait_done(w);
    pthread_mutex_unlock(&w->hb->lock);
    return NULL;
}

void
flowctl_hb_wait_ubf(void *p)
{
    flowctl_hb_wait *w = p;
    pthread_mutex_lock(&w->hb->lock);
    w->interrupted = true;
    pthread_cond_broadcast(&w->hb->cond);
    pthread_mutex_unlock(&w->hb->lock);
}

bool
flowctl_hb_join(heartbeat *hb, bool finished)
{
    if (hb->joined) return true; /* another Ruby thread joined it meanwhile */
    hb->joined = true;
    if (!finished) {
        pthread_detach(hb->thread); /* it frees itself whenever its call returns */
        return false;
    }
    pthread_join(hb->thread, NULL); /* it has finished: only its last few instructions remain */
    return true;
}

/* The owner (the Ruby object's dfree) lets go: never joins, never blocks. */
void
flowctl_hb_release(heartbeat *hb)
{
    if (flowctl_hb_dead(hb)) {
        hb_free_dead(hb);
        return;
    }
    pthread_mutex_lock(&hb->lock);
    request_stop_locked(hb, 1.0);
    bool detach = hb->started && !hb->joined;
    pthread_mutex_unlock(&hb->lock);
    /* the thread sends its final beat, frees its part and exits */
    if (detach) pthread_detach(hb->thread);
    hb_unref(hb);
}

void
init_flowctl_heartbeat(void)
{
    static const flowctl_fork_hooks hooks = {.name = "heartbeat", .evict = hb_fork_evict, .child = hb_fork_child};
    flowctl_cond_init(&live_cond);
    flowctl_fork_register(&hooks);
}
