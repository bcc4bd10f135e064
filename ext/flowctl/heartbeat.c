/*
 * heartbeat.c — Flowctl::Heartbeat: registration and heartbeats from a native thread.
 *
 * Reading order:
 *   1. kinds[]       the one table: kind -> RPC paths, message descriptors, id field
 *   2. hb_config     the metrics a beat sends, immutable and refcounted: Ruby swaps a new
 *                    one in under the lock; the thread takes a ref (and the status name)
 *                    under the lock, so each beat sends a consistent snapshot
 *   3. build_*       requests built with protobuf-c reflection (field names, not structs)
 *   4. hb_unary      one unary call: create, one batch, pluck on the thread's own queue
 *   5. hb_main       the thread: register, beat, back off, re-register, final STOPPING beat
 *   6. live list     every running thread, for at_exit (stop_all) and fork (fork.c)
 *   7. Ruby binding  TypedData class, #stop, #stats, #metrics=, #status=, error events
 *
 * The thread is pure C: it never holds the GVL, never touches a VALUE and never
 * allocates Ruby objects. It owns malloc'd copies of everything it sends and a
 * reference on the flowctl_channel. The heartbeat struct is shared by the Ruby object
 * and the thread and refcounted: whichever lets go last frees it.
 */
#include "flowctl.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <grpc/support/alloc.h>

#include "common/common.pb-c.h"
#include "controlplane/controlplane.pb-c.h"
#include "google/protobuf/timestamp.pb-c.h"

static VALUE cHeartbeat;

/* ---- 1. kinds ------------------------------------------------------------ */

typedef struct hb_kind {
    const char *name; /* "processor": also the Ruby symbol */
    const char *register_path;
    const char *heartbeat_path;
    const ProtobufCMessageDescriptor *register_req, *register_resp, *beat_req, *beat_resp;
    const char *id_field; /* "processor_id" in both requests */
} hb_kind;

#define CP "/obsrvr.flow.controlplane.ControlPlane/"
#define KIND(n, N, desc)                                                                              \
    {                                                                                                 \
        n, CP "Register" N, CP N "Heartbeat", &obsrvr__flow__controlplane__register_##desc##_request__descriptor, \
            &obsrvr__flow__controlplane__register_##desc##_response__descriptor,                      \
            &obsrvr__flow__controlplane__##desc##_heartbeat_request__descriptor,                      \
            &obsrvr__flow__controlplane__##desc##_heartbeat_response__descriptor, n "_id"             \
    }
static const hb_kind kinds[] = {
    KIND("processor", "Processor", processor),
    KIND("source", "Source", source),
    KIND("consumer", "Consumer", consumer),
};
#undef KIND
#undef CP
#define KIND_COUNT (sizeof(kinds) / sizeof(kinds[0]))

/* ---- 2. config snapshot ------------------------------------------------- */

/* The metrics a beat sends. The status is a name from the HealthStatus enum descriptor
 * (static storage), so it is a plain pointer next to the config in the heartbeat. */

typedef struct hb_config {
    atomic_int refs;
    size_t n_metrics;
    char **keys;
    double *values;
} hb_config;

static void
config_unref(hb_config *c)
{
    if (!c || atomic_fetch_sub(&c->refs, 1) != 1) return;
    for (size_t i = 0; i < c->n_metrics; i++) free(c->keys[i]);
    free(c->keys);
    free(c->values);
    free(c);
}

/* ---- the shared state ----------------------------------------------------- */

#define ERR_RING 32
#define ERR_LEN 256

typedef struct hb_error {
    int code; /* grpc_status_code, or -1 when the control plane answered success: false */
    char message[ERR_LEN];
} hb_error;

typedef struct hb_counters {
    uint64_t sent, failed, consecutive, registrations;
    char last_error[ERR_LEN];
    bool has_success;
    struct timespec last_success;
} hb_counters;

typedef struct heartbeat {
    pthread_mutex_t lock; /* guards everything below marked (L) */
    pthread_cond_t cond;  /* (L) wakes the thread (stop) and the Ruby waiters (finished, errors) */
    pthread_t thread;
    atomic_int refs;      /* the Ruby object + the thread while it runs */
    unsigned generation;  /* fork generation it was started in: another one means "dead" */
    struct heartbeat *prev, *next; /* live list (live_lock) */

    /* set before the thread starts, read-only afterwards */
    const hb_kind *kind;
    flowctl_channel *ch;
    char *id;
    bool do_register;
    char *endpoint;
    size_t n_meta;
    char **meta_keys, **meta_values;
    grpc_metadata *headers;
    size_t n_headers;
    double interval, call_timeout;
    bool want_errors;

    /* (L) */
    hb_config *config;
    const char *status;
    grpc_call *current;   /* the call in flight, so stop can cancel it */
    bool started, stop_requested, in_final, finished, joined;
    double final_timeout;
    hb_counters stats;
    hb_error errors[ERR_RING];
    unsigned err_head, err_count;
} heartbeat;

static unsigned fork_generation;
static pthread_mutex_t live_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t live_cond;  /* (live_lock) a thread left the list */
static heartbeat *live_head;      /* (live_lock) */

static bool
hb_dead(const heartbeat *hb)
{
    return hb->generation != fork_generation;
}

static void
free_strv(char **v, size_t n)
{
    if (!v) return;
    for (size_t i = 0; i < n; i++) free(v[i]);
    free(v);
}

/* Frees the memory only: in a forked child the mutex, thread and channel are the parent's. */
static void
hb_free_memory(heartbeat *hb)
{
    free(hb->id);
    free(hb->endpoint);
    free_strv(hb->meta_keys, hb->n_meta);
    free_strv(hb->meta_values, hb->n_meta);
    free(hb->headers);
}

static void
hb_unref(heartbeat *hb)
{
    if (atomic_fetch_sub(&hb->refs, 1) != 1) return;
    if (!hb_dead(hb)) {
        for (size_t i = 0; i < hb->n_headers; i++) {
            grpc_slice_unref(hb->headers[i].key);
            grpc_slice_unref(hb->headers[i].value);
        }
        config_unref(hb->config);
        pthread_mutex_destroy(&hb->lock);
        pthread_cond_destroy(&hb->cond);
    }
    hb_free_memory(hb);
    free(hb);
}

/* ---- small helpers --------------------------------------------------------- */

static struct timespec
ts_add(struct timespec t, double seconds)
{
    double whole = (double)(time_t)seconds;
    t.tv_sec += (time_t)seconds;
    t.tv_nsec += (long)((seconds - whole) * 1e9);
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    return t;
}

static struct timespec
mono_after(double seconds)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return ts_add(t, seconds);
}

static gpr_timespec
grpc_deadline(double seconds)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_micros((int64_t)(seconds * 1e6), GPR_TIMESPAN));
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

/* ---- 3. requests by reflection ------------------------------------------- */

static void *
field_at(ProtobufCMessage *m, const char *name, const ProtobufCFieldDescriptor **out)
{
    const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field_by_name(m->descriptor, name);
    if (out) *out = f;
    return (char *)m + f->offset;
}

static ProtobufCMessage *
msg_new(const ProtobufCMessageDescriptor *d)
{
    ProtobufCMessage *m = calloc(1, d->sizeof_message);
    if (m) protobuf_c_message_init(d, m);
    return m;
}

/* A map<string, X> field: fills n entries via fill(entry, i, ctx). The pointer array and
 * the entries are one allocation, freed with the message by msg_free. Strings are
 * borrowed from the heartbeat and its config, never copied. */
typedef void (*entry_fill)(ProtobufCMessage *entry, size_t i, const void *ctx);

static bool
set_map(ProtobufCMessage *m, const char *name, size_t n, entry_fill fill, const void *ctx)
{
    const ProtobufCFieldDescriptor *f;
    void **slot = field_at(m, name, &f);
    if (n == 0) return true;
    const ProtobufCMessageDescriptor *ed = f->descriptor;
    char *block = calloc(n, sizeof(void *) + ed->sizeof_message);
    if (!block) return false;
    ProtobufCMessage **ptrs = (ProtobufCMessage **)block;
    char *entries = block + n * sizeof(void *);
    for (size_t i = 0; i < n; i++) {
        ptrs[i] = (ProtobufCMessage *)(entries + i * ed->sizeof_message);
        protobuf_c_message_init(ed, ptrs[i]);
        fill(ptrs[i], i, ctx);
    }
    *(size_t *)((char *)m + f->quantifier_offset) = n;
    *slot = block;
    return true;
}

static void
msg_free(ProtobufCMessage *m, const char *map_name)
{
    if (!m) return;
    free(*(void **)field_at(m, map_name, NULL));
    free(m);
}

static void
fill_metric(ProtobufCMessage *e, size_t i, const void *ctx)
{
    const hb_config *c = ctx;
    *(char **)field_at(e, "key", NULL) = c->keys[i];
    *(double *)field_at(e, "value", NULL) = c->values[i];
}

static void
fill_meta(ProtobufCMessage *e, size_t i, const void *ctx)
{
    const heartbeat *hb = ctx;
    *(char **)field_at(e, "key", NULL) = hb->meta_keys[i];
    *(char **)field_at(e, "value", NULL) = hb->meta_values[i];
}

static ProtobufCMessage *
build_register(const heartbeat *hb)
{
    ProtobufCMessage *m = msg_new(hb->kind->register_req);
    if (!m) return NULL;
    *(char **)field_at(m, hb->kind->id_field, NULL) = hb->id;
    if (hb->endpoint) *(char **)field_at(m, "endpoint", NULL) = hb->endpoint;
    if (!set_map(m, "metadata", hb->n_meta, fill_meta, hb)) { free(m); return NULL; }
    return m;
}

static ProtobufCMessage *
build_beat(const heartbeat *hb, const hb_config *c, const char *status, Google__Protobuf__Timestamp *ts)
{
    ProtobufCMessage *m = msg_new(hb->kind->beat_req);
    if (!m) return NULL;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    ts->seconds = now.tv_sec;
    ts->nanos = (int32_t)now.tv_nsec;
    *(char **)field_at(m, hb->kind->id_field, NULL) = hb->id;
    *(char **)field_at(m, "status", NULL) = (char *)status;
    *(ProtobufCMessage **)field_at(m, "timestamp", NULL) = &ts->base;
    if (!set_map(m, "metrics", c->n_metrics, fill_metric, c)) { free(m); return NULL; }
    return m;
}

/* ---- 4. one unary call ----------------------------------------------------- */

typedef enum { HB_OK, HB_REJECTED, HB_FAILED } hb_result;

typedef struct call_out {
    grpc_status_code code;
    char error[ERR_LEN];
} call_out;

static grpc_byte_buffer *
pack(const ProtobufCMessage *m)
{
    size_t len = protobuf_c_message_get_packed_size(m);
    grpc_slice s = grpc_slice_malloc(len);
    protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

/* The reply's success and message fields; HB_FAILED when it does not decode. */
static hb_result
unpack_reply(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb, call_out *out)
{
    grpc_slice s = grpc_empty_slice();
    grpc_byte_buffer_reader r;
    if (bb && grpc_byte_buffer_reader_init(&r, bb)) {
        s = grpc_byte_buffer_reader_readall(&r);
        grpc_byte_buffer_reader_destroy(&r);
    }
    ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
    grpc_slice_unref(s);
    if (!m) {
        out->code = GRPC_STATUS_INTERNAL;
        snprintf(out->error, ERR_LEN, "%s: the reply does not decode", d->name);
        return HB_FAILED;
    }
    protobuf_c_boolean ok = *(protobuf_c_boolean *)field_at(m, "success", NULL);
    const char *msg = *(char **)field_at(m, "message", NULL);
    hb_result res = ok ? HB_OK : HB_REJECTED;
    if (!ok) snprintf(out->error, ERR_LEN, "control plane answered success: false (%s)", msg && *msg ? msg : "no message");
    protobuf_c_message_free_unpacked(m, NULL);
    return res;
}

static void
set_current(heartbeat *hb, grpc_call *call)
{
    pthread_mutex_lock(&hb->lock);
    hb->current = call;
    /* a stop that came before the call existed cancels it now (the final beat is exempt) */
    if (call && hb->stop_requested && !hb->in_final) grpc_call_cancel(call, NULL);
    pthread_mutex_unlock(&hb->lock);
}

/*
 * wait_for_ready: the call waits (until its deadline) for the channel to connect instead
 * of failing at once while the channel is in TRANSIENT_FAILURE. That is also what makes
 * reconnection prompt: while this thread plucks, it polls the connection attempt; with
 * no thread polling, gRPC core only notices a finished connect from its backup poller
 * (every 5 s). The final STOPPING beat fails fast instead.
 * While such a call waits on a channel in TRANSIENT_FAILURE, the channel's reconnect
 * backoff is reset every NUDGE_MS: gRPC's backoff (1 s, growing) would otherwise keep a
 * control plane that came back waiting for the next attempt, up to two beat intervals
 * (spec/faults_controlplane_spec.rb saw 2.1 s at a 1 s interval). A refused connection
 * costs little; this lasts only while a beat waits.
 */
#define NUDGE_MS 200
#define GATE_STEP_MS 20 /* a beat's wait looks at its queue this often, out of the fork gate in between */

static hb_result
hb_unary(heartbeat *hb, grpc_completion_queue *cq, const char *path, const ProtobufCMessage *req,
         const ProtobufCMessageDescriptor *resp_desc, double timeout, bool wait_for_ready, call_out *out)
{
    grpc_slice method = grpc_slice_from_static_string(path);
    grpc_call *call = grpc_channel_create_call(hb->ch->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method, NULL,
                                               grpc_deadline(timeout), NULL);
    grpc_byte_buffer *send = pack(req), *recv = NULL;
    grpc_metadata_array init_md, trail_md;
    grpc_metadata_array_init(&init_md);
    grpc_metadata_array_init(&trail_md);
    grpc_slice details = grpc_empty_slice();
    grpc_status_code status = GRPC_STATUS_UNKNOWN;

    grpc_op ops[6] = {
        {.op = GRPC_OP_SEND_INITIAL_METADATA,
         .flags = wait_for_ready ? GRPC_INITIAL_METADATA_WAIT_FOR_READY : 0,
         .data.send_initial_metadata = {.count = hb->n_headers, .metadata = hb->headers}},
        {.op = GRPC_OP_SEND_MESSAGE, .data.send_message.send_message = send},
        {.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT},
        {.op = GRPC_OP_RECV_INITIAL_METADATA, .data.recv_initial_metadata.recv_initial_metadata = &init_md},
        {.op = GRPC_OP_RECV_MESSAGE, .data.recv_message.recv_message = &recv},
        {.op = GRPC_OP_RECV_STATUS_ON_CLIENT,
         .data.recv_status_on_client = {.trailing_metadata = &trail_md, .status = &status, .status_details = &details}},
    };
    set_current(hb, call);
    grpc_call_error err = grpc_call_start_batch(call, ops, 6, call, NULL);
    if (err == GRPC_CALL_OK) {
        for (unsigned turn = 1;
             grpc_completion_queue_pluck(cq, call, grpc_deadline(GATE_STEP_MS / 1000.0), NULL).type == GRPC_QUEUE_TIMEOUT;
             turn++) {
            /* Step out of gRPC between looks (the caller's stretch is the outermost one): a
             * fork being prepared passes here with the beat still in flight, instead of
             * cancelling it. A control plane in this process cannot answer before the fork
             * is done (its handler needs the GVL the forking thread holds): it was cancelled,
             * 4-12 beats failed per 80 forks. Out of gRPC the beat is not "current": the
             * fork's cancel (flowctl_heartbeat_cancel_calls) is for threads stuck inside. */
            set_current(hb, NULL);
            flowctl_gate_leave();
            flowctl_gate_enter();
            set_current(hb, call);
            if (turn % (NUDGE_MS / GATE_STEP_MS) == 0 && wait_for_ready &&
                grpc_channel_check_connectivity_state(hb->ch->channel, 0) == GRPC_CHANNEL_TRANSIENT_FAILURE)
                grpc_channel_reset_connect_backoff(hb->ch->channel);
        }
    } else {
        status = GRPC_STATUS_INTERNAL;
    }
    set_current(hb, NULL);

    hb_result res = HB_FAILED;
    out->code = status;
    if (status == GRPC_STATUS_OK) {
        res = unpack_reply(resp_desc, recv, out);
    } else {
        char *d = grpc_slice_to_c_string(details);
        snprintf(out->error, ERR_LEN, "%s: %d (%s)", path, (int)status, *d ? d : "no details");
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

/* ---- 5. the thread -------------------------------------------------------- */

/* A consistent snapshot of what the next beat sends. */
static hb_config *
config_take(heartbeat *hb, const char **status)
{
    pthread_mutex_lock(&hb->lock);
    hb_config *c = hb->config;
    atomic_fetch_add(&c->refs, 1);
    *status = hb->status;
    pthread_mutex_unlock(&hb->lock);
    return c;
}

static hb_result
do_register(heartbeat *hb, grpc_completion_queue *cq, call_out *out)
{
    ProtobufCMessage *req = build_register(hb);
    if (!req) {
        snprintf(out->error, ERR_LEN, "out of memory");
        out->code = GRPC_STATUS_RESOURCE_EXHAUSTED;
        return HB_FAILED;
    }
    hb_result r = hb_unary(hb, cq, hb->kind->register_path, req, hb->kind->register_resp, hb->call_timeout, true, out);
    msg_free(req, "metadata");
    return r;
}

static hb_result
do_beat(heartbeat *hb, grpc_completion_queue *cq, const char *status_override, double timeout, call_out *out)
{
    const char *status;
    hb_config *c = config_take(hb, &status);
    Google__Protobuf__Timestamp ts = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
    ProtobufCMessage *req = build_beat(hb, c, status_override ? status_override : status, &ts);
    hb_result r = HB_FAILED;
    if (req) {
        r = hb_unary(hb, cq, hb->kind->heartbeat_path, req, hb->kind->beat_resp, timeout, !status_override, out);
        msg_free(req, "metrics");
    } else {
        snprintf(out->error, ERR_LEN, "out of memory");
        out->code = GRPC_STATUS_RESOURCE_EXHAUSTED;
    }
    config_unref(c);
    return r;
}

/* Updates the stats (L) and queues the error for the on_error thread. */
static void
record(heartbeat *hb, hb_result r, bool registration, const call_out *out)
{
    pthread_mutex_lock(&hb->lock);
    hb_counters *st = &hb->stats;
    if (r == HB_OK) {
        if (registration) st->registrations++;
        else st->sent++;
        st->consecutive = 0;
        st->has_success = true;
        clock_gettime(CLOCK_REALTIME, &st->last_success);
    } else {
        st->failed++;
        st->consecutive++;
        snprintf(st->last_error, ERR_LEN, "%s", out->error);
        if (hb->want_errors) {
            if (hb->err_count == ERR_RING) {
                hb->err_head = (hb->err_head + 1) % ERR_RING;
                hb->err_count--;
            }
            hb_error *e = &hb->errors[(hb->err_head + hb->err_count++) % ERR_RING];
            e->code = r == HB_REJECTED ? -1 : (int)out->code;
            snprintf(e->message, ERR_LEN, "%s", out->error);
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

static const char *status_stopping;

static void live_remove(heartbeat *hb);

/* The pause after a failure: min(interval, 0.1s * 2^(n-1)) * jitter(0.5..1). */
static double
backoff(const heartbeat *hb, unsigned failures, uint64_t *rng)
{
    unsigned shift = failures > 0 ? failures - 1 : 0;
    double b = 0.1 * (double)(1u << (shift < 20 ? shift : 20));
    return (b < hb->interval ? b : hb->interval) * jitter(rng);
}

/* Registers (when asked, and again whenever a beat is answered success: false), beats
 * at once, then every interval from the start of the previous beat. Failures back off;
 * only a beat that the control plane accepts resets the backoff. */
static void
beat_loop(heartbeat *hb, grpc_completion_queue *cq)
{
    uint64_t rng = (uint64_t)(uintptr_t)hb ^ (uint64_t)time(NULL) ^ 0x9e3779b97f4a7c15ULL;
    bool need_register = hb->do_register;
    unsigned failures = 0;
    for (;;) {
        call_out out = {0};
        struct timespec started = mono_after(0);
        hb_result r;
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
                continue; /* beat at once */
            }
        } else {
            r = do_beat(hb, cq, NULL, hb->call_timeout, &out);
            flowctl_gate_leave();
            record(hb, r, false, &out);
            if (r == HB_REJECTED) need_register = true; /* it forgot us: register again */
        }
        struct timespec until;
        if (r == HB_OK) {
            failures = 0;
            until = ts_add(started, hb->interval);
        } else {
            failures = failures < 30 ? failures + 1 : failures;
            until = mono_after(backoff(hb, failures, &rng));
        }
        if (sleep_or_stop(hb, until)) return;
    }
}

/* The final STOPPING beat, bounded by the deadline the stop asked for. */
static void
final_beat(heartbeat *hb, grpc_completion_queue *cq)
{
    pthread_mutex_lock(&hb->lock);
    hb->in_final = true;
    double timeout = hb->final_timeout < 0 ? 1.0 : hb->final_timeout;
    pthread_mutex_unlock(&hb->lock);
    if (timeout <= 0) return;
    call_out out = {0};
    flowctl_gate_enter();
    hb_result r = do_beat(hb, cq, status_stopping, timeout, &out);
    flowctl_gate_leave();
    record(hb, r, false, &out);
}

static void *
hb_main(void *p)
{
    heartbeat *hb = p;
    flowctl_gate_enter();
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    flowctl_gate_leave();
    beat_loop(hb, cq);
    final_beat(hb, cq);
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

/* ---- 6. live list ------------------------------------------------------- */

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

/* Before a fork (fork.c): a beat that is still inside gRPC after a moment is cancelled,
 * so that it leaves gRPC at once. */
void
flowctl_heartbeat_cancel_calls(void)
{
    pthread_mutex_lock(&live_lock);
    for (heartbeat *hb = live_head; hb; hb = hb->next) {
        pthread_mutex_lock(&hb->lock);
        if (hb->current) grpc_call_cancel(hb->current, NULL);
        pthread_mutex_unlock(&hb->lock);
    }
    pthread_mutex_unlock(&live_lock);
}

/* In the child after fork: the parent's threads do not exist here. Forget them without
 * touching their mutexes (they may be locked forever in this copy). */
static void
hb_atfork_child(void)
{
    fork_generation++;
    pthread_mutex_init(&live_lock, NULL);
    live_head = NULL;
    flowctl_cond_init(&live_cond);
}

/* ---- 7. Ruby binding ------------------------------------------------------- */

typedef struct {
    heartbeat *hb; /* NULL until initialized */
} hb_wrapper;

static void
hb_wrapper_free(void *p)
{
    hb_wrapper *w = p;
    heartbeat *hb = w->hb;
    if (hb && hb_dead(hb)) {
        /* a forked child's copy: no thread and no lock to respect, only memory */
        config_unref(hb->config);
        hb_free_memory(hb);
        free(hb);
        ruby_xfree(w);
        return;
    }
    if (hb) {
        pthread_mutex_lock(&hb->lock);
        request_stop_locked(hb, 1.0);
        bool detach = hb->started && !hb->joined;
        pthread_mutex_unlock(&hb->lock);
        /* never join here: the thread sends its final beat, frees its part and exits */
        if (detach) pthread_detach(hb->thread);
    }
    if (hb) hb_unref(hb);
    ruby_xfree(w);
}

static size_t
hb_wrapper_size(const void *p)
{
    const hb_wrapper *w = p;
    return sizeof(*w) + (w->hb ? sizeof(heartbeat) : 0);
}

static const rb_data_type_t hb_type = {
    .wrap_struct_name = "Flowctl::Heartbeat",
    .function = {.dmark = NULL, .dfree = hb_wrapper_free, .dsize = hb_wrapper_size},
    /* dfree takes a mutex held only for a few instructions and never calls Ruby */
    .flags = RUBY_TYPED_FREE_IMMEDIATELY,
};

static VALUE
hb_alloc(VALUE klass)
{
    hb_wrapper *w;
    return TypedData_Make_Struct(klass, hb_wrapper, &hb_type, w);
}

static heartbeat *
hb_get(VALUE self)
{
    hb_wrapper *w = rb_check_typeddata(self, &hb_type);
    if (!w->hb) rb_raise(rb_eRuntimeError, "heartbeat not started");
    return w->hb;
}

/* Strings the thread sends must be valid UTF-8 without NUL bytes (protobuf string fields). */
static void
check_str(VALUE str, const char *what)
{
    StringValue(str);
    if (memchr(RSTRING_PTR(str), 0, (size_t)RSTRING_LEN(str)))
        rb_raise(rb_eArgError, "%s must not contain NUL bytes (given %+"PRIsVALUE")", what, str);
    rb_encoding *enc = rb_enc_get(str);
    bool utf8ish = enc == rb_utf8_encoding() || enc == rb_usascii_encoding() ||
                   (enc == rb_ascii8bit_encoding() && rb_enc_str_asciionly_p(str));
    if (!utf8ish || rb_enc_str_coderange(str) == ENC_CODERANGE_BROKEN)
        rb_raise(rb_eArgError, "%s must be valid UTF-8 (given %+"PRIsVALUE" in %s)", what, str, rb_enc_name(enc));
}

static char *
xstrdup_checked(VALUE str, const char *what)
{
    check_str(str, what);
    char *s = strndup(RSTRING_PTR(str), (size_t)RSTRING_LEN(str));
    if (!s) rb_raise(rb_eNoMemError, "flowctl: out of memory");
    return s;
}

static VALUE
to_name(VALUE v, const char *what)
{
    if (SYMBOL_P(v)) return rb_sym2str(v);
    if (!RB_TYPE_P(v, T_STRING))
        rb_raise(rb_eTypeError, "%s must be a String or Symbol (given %"PRIsVALUE")", what, rb_obj_class(v));
    return v;
}

static const char *
status_name(VALUE v)
{
    VALUE s = to_name(v, "status");
    const ProtobufCEnumDescriptor *d = &obsrvr__flow__common__health_status__descriptor;
    for (unsigned i = 0; i < d->n_values; i++) {
        if ((size_t)RSTRING_LEN(s) == strlen(d->values[i].name) &&
            strncasecmp(RSTRING_PTR(s), d->values[i].name, (size_t)RSTRING_LEN(s)) == 0)
            return d->values[i].name;
    }
    rb_raise(rb_eArgError, "unknown status %+"PRIsVALUE" (expected one of UNKNOWN, STARTING, HEALTHY, UNHEALTHY, STOPPING)",
             v);
}

/* Building a config allocates with malloc while Ruby may raise: keep it reachable for cleanup. */
struct config_build {
    hb_config *c;
    VALUE metrics;
};

static int
metric_each(VALUE k, VALUE v, VALUE p)
{
    hb_config *c = (hb_config *)p;
    VALUE name = to_name(k, "metric name");
    if (!rb_obj_is_kind_of(v, rb_cNumeric))
        rb_raise(rb_eTypeError, "metric %+"PRIsVALUE" must be Numeric (given %"PRIsVALUE")", name, rb_obj_class(v));
    double d = NUM2DBL(v);
    c->keys[c->n_metrics] = xstrdup_checked(name, "metric name");
    c->values[c->n_metrics++] = d;
    return ST_CONTINUE;
}

static VALUE
config_build_body(VALUE p)
{
    struct config_build *b = (struct config_build *)p;
    if (!NIL_P(b->metrics)) rb_hash_foreach(b->metrics, metric_each, (VALUE)b->c);
    return Qnil;
}

static hb_config *
config_new(VALUE metrics)
{
    if (!NIL_P(metrics) && !RB_TYPE_P(metrics, T_HASH))
        rb_raise(rb_eTypeError, "metrics must be a Hash of name => Numeric (given %"PRIsVALUE")", rb_obj_class(metrics));
    long n = NIL_P(metrics) ? 0 : RHASH_SIZE(metrics);
    hb_config *c = calloc(1, sizeof(*c));
    if (c) {
        atomic_init(&c->refs, 1);
        c->keys = calloc((size_t)n + 1, sizeof(char *));
        c->values = calloc((size_t)n + 1, sizeof(double));
    }
    if (!c || !c->keys || !c->values) {
        config_unref(c);
        rb_raise(rb_eNoMemError, "flowctl: out of memory");
    }
    struct config_build b = {c, metrics};
    int state = 0;
    rb_protect(config_build_body, (VALUE)&b, &state);
    if (!state && c->n_metrics != (size_t)n) {
        config_unref(c);
        rb_raise(rb_eRuntimeError, "metrics changed while being read");
    }
    if (state) {
        config_unref(c);
        rb_jump_tag(state);
    }
    return c;
}

/* Swaps in a new config; the old one is released outside the lock. */
static void
config_swap(heartbeat *hb, hb_config *c)
{
    pthread_mutex_lock(&hb->lock);
    hb_config *old = hb->config;
    hb->config = c;
    pthread_mutex_unlock(&hb->lock);
    config_unref(old);
}

static const hb_kind *
kind_for(VALUE sym)
{
    VALUE s = to_name(sym, "kind");
    for (size_t i = 0; i < KIND_COUNT; i++) {
        if ((size_t)RSTRING_LEN(s) == strlen(kinds[i].name) && memcmp(RSTRING_PTR(s), kinds[i].name, strlen(kinds[i].name)) == 0)
            return &kinds[i];
    }
    rb_raise(rb_eArgError, "unknown heartbeat kind %+"PRIsVALUE" (expected :processor, :source or :consumer)", sym);
}

static int
meta_each(VALUE k, VALUE v, VALUE p)
{
    heartbeat *hb = (heartbeat *)p;
    VALUE key = to_name(k, "register metadata key");
    VALUE val = to_name(v, "register metadata value");
    check_str(key, "register metadata key");
    check_str(val, "register metadata value");
    hb->meta_keys[hb->n_meta] = xstrdup_checked(key, "register metadata key");
    hb->meta_values[hb->n_meta] = xstrdup_checked(val, "register metadata value");
    hb->n_meta++;
    return ST_CONTINUE;
}

struct init_args {
    heartbeat *hb;
    VALUE channel, kind, id, interval, status, metrics, reg, headers, timeout, want_errors;
};

static VALUE
init_body(VALUE p)
{
    struct init_args *a = (struct init_args *)p;
    heartbeat *hb = a->hb;
    hb->kind = kind_for(a->kind);
    hb->id = xstrdup_checked(to_name(a->id, "id"), "id");
    if (!*hb->id) rb_raise(rb_eArgError, "id must not be empty");
    hb->interval = NUM2DBL(a->interval);
    hb->call_timeout = NUM2DBL(a->timeout);
    if (!(hb->interval > 0) || hb->interval > 86400.0)
        rb_raise(rb_eArgError, "interval must be > 0 and at most one day (given %"PRIsVALUE")", a->interval);
    if (!(hb->call_timeout > 0)) rb_raise(rb_eArgError, "timeout must be > 0 (given %"PRIsVALUE")", a->timeout);
    hb->want_errors = RTEST(a->want_errors);
    if (!NIL_P(a->reg)) {
        /* [endpoint, metadata] */
        Check_Type(a->reg, T_ARRAY);
        VALUE ep = rb_ary_entry(a->reg, 0), md = rb_ary_entry(a->reg, 1);
        hb->do_register = true;
        hb->endpoint = xstrdup_checked(NIL_P(ep) ? rb_str_new_cstr("") : ep, "register endpoint");
        if (!NIL_P(md)) {
            Check_Type(md, T_HASH);
            long n = RHASH_SIZE(md);
            hb->meta_keys = calloc((size_t)n + 1, sizeof(char *));
            hb->meta_values = calloc((size_t)n + 1, sizeof(char *));
            if (!hb->meta_keys || !hb->meta_values) rb_raise(rb_eNoMemError, "flowctl: out of memory");
            rb_hash_foreach(md, meta_each, (VALUE)hb);
        }
    }
    flowctl_metadata md;
    flowctl_metadata_from_hash(a->headers, &md);
    hb->headers = calloc(md.count + 1, sizeof(grpc_metadata));
    if (!hb->headers) {
        flowctl_metadata_free(&md);
        rb_raise(rb_eNoMemError, "flowctl: out of memory");
    }
    for (size_t i = 0; i < md.count; i++) {
        hb->headers[i].key = grpc_slice_ref(md.md[i].key);
        hb->headers[i].value = grpc_slice_ref(md.md[i].value);
    }
    hb->n_headers = md.count;
    flowctl_metadata_free(&md);
    hb->status = status_name(a->status);
    hb->config = config_new(a->metrics);
    return Qnil;
}

static heartbeat *
hb_new(void)
{
    heartbeat *hb = calloc(1, sizeof(*hb));
    if (!hb) rb_raise(rb_eNoMemError, "flowctl: out of memory");
    atomic_init(&hb->refs, 1);
    hb->generation = fork_generation;
    pthread_mutex_init(&hb->lock, NULL);
    flowctl_cond_init(&hb->cond);
    hb->final_timeout = -1;
    return hb;
}

/*
 * call-seq:
 *   heartbeat.__send__(:start_native, channel, kind, id, interval, status, metrics, register, headers, timeout, errors)
 *
 * Starts the native thread. register is nil or [endpoint, metadata_hash]; errors tells
 * whether failures are queued for #next_error. The Ruby layer (Heartbeat#initialize)
 * checks the keywords and calls this once.
 */
static VALUE
hb_start_native(VALUE self, VALUE channel, VALUE kind, VALUE id, VALUE interval, VALUE status, VALUE metrics,
                VALUE reg, VALUE headers, VALUE timeout, VALUE want_errors)
{
    hb_wrapper *w = rb_check_typeddata(self, &hb_type);
    if (w->hb) rb_raise(rb_eRuntimeError, "heartbeat already started");
    flowctl_fork_check();
    flowctl_channel *ch = flowctl_channel_get(channel);
    heartbeat *hb = hb_new();
    struct init_args a = {hb, channel, kind, id, interval, status, metrics, reg, headers, timeout, want_errors};
    int state = 0;
    rb_protect(init_body, (VALUE)&a, &state);
    if (state) {
        hb_unref(hb);
        rb_jump_tag(state);
    }
    hb->ch = ch;
    flowctl_channel_ref(ch);
    w->hb = hb;
    atomic_fetch_add(&hb->refs, 1); /* the thread's */
    live_add(hb);
    /* the thread takes no signals: Ruby's handlers belong to Ruby's threads */
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
        rb_syserr_fail(err, "flowctl: cannot start the heartbeat thread");
    }
    hb->started = true;
    return self;
}

/* call-seq: heartbeat.metrics = {"name" => Numeric} — what the next beats send */
static VALUE
hb_set_metrics(VALUE self, VALUE metrics)
{
    heartbeat *hb = hb_get(self);
    hb_config *c = config_new(metrics);
    if (hb_dead(hb)) {
        config_unref(c);
        return metrics;
    }
    config_swap(hb, c);
    return metrics;
}

/* call-seq: heartbeat.native_set_status("HEALTHY") — a HealthStatus name; Heartbeat#status= checks it first */
static VALUE
hb_set_status(VALUE self, VALUE status)
{
    heartbeat *hb = hb_get(self);
    const char *s = status_name(status);
    if (hb_dead(hb)) return status;
    pthread_mutex_lock(&hb->lock);
    hb->status = s;
    pthread_mutex_unlock(&hb->lock);
    return status;
}

/* call-seq: heartbeat.status -> String (what the next beat sends) */
static VALUE
hb_status(VALUE self)
{
    heartbeat *hb = hb_get(self);
    if (hb_dead(hb)) return rb_str_new_cstr(hb->status);
    pthread_mutex_lock(&hb->lock);
    const char *s = hb->status;
    pthread_mutex_unlock(&hb->lock);
    return rb_str_new_cstr(s);
}

/* call-seq: heartbeat.metrics -> Hash (what the next beat sends) */
static VALUE
hb_metrics(VALUE self)
{
    heartbeat *hb = hb_get(self);
    const char *unused;
    hb_config *c = hb_dead(hb) ? hb->config : config_take(hb, &unused);
    VALUE h = rb_hash_new();
    for (size_t i = 0; i < c->n_metrics; i++)
        rb_hash_aset(h, rb_utf8_str_new_cstr(c->keys[i]), DBL2NUM(c->values[i]));
    if (!hb_dead(hb)) config_unref(c);
    return h;
}

static VALUE
stats_hash(const hb_counters *hb)
{
    VALUE h = rb_hash_new();
    rb_hash_aset(h, ID2SYM(rb_intern("sent")), ULL2NUM(hb->sent));
    rb_hash_aset(h, ID2SYM(rb_intern("failed")), ULL2NUM(hb->failed));
    rb_hash_aset(h, ID2SYM(rb_intern("consecutive_failures")), ULL2NUM(hb->consecutive));
    rb_hash_aset(h, ID2SYM(rb_intern("last_error")), hb->last_error[0] ? rb_str_new_cstr(hb->last_error) : Qnil);
    rb_hash_aset(h, ID2SYM(rb_intern("last_success_at")),
                 hb->has_success ? rb_time_timespec_new(&hb->last_success, INT_MAX) : Qnil);
    rb_hash_aset(h, ID2SYM(rb_intern("registrations")), ULL2NUM(hb->registrations));
    return h;
}

/*
 * call-seq: heartbeat.stats -> Hash
 *
 * {sent:, failed:, consecutive_failures:, last_error:, last_success_at:, registrations:}
 */
static VALUE
hb_stats_get(VALUE self)
{
    heartbeat *hb = hb_get(self);
    if (hb_dead(hb)) return stats_hash(&hb->stats); /* no other thread in this child */
    hb_counters copy;
    pthread_mutex_lock(&hb->lock);
    copy = hb->stats;
    pthread_mutex_unlock(&hb->lock);
    return stats_hash(&copy);
}

/* call-seq: heartbeat.running? -> true or false */
static VALUE
hb_running_p(VALUE self)
{
    heartbeat *hb = hb_get(self);
    if (hb_dead(hb)) return Qfalse;
    pthread_mutex_lock(&hb->lock);
    bool running = hb->started && !hb->stop_requested && !hb->finished;
    pthread_mutex_unlock(&hb->lock);
    return running ? Qtrue : Qfalse;
}

/* ---- waiting without the GVL --------------------------------------------- */

struct hb_wait {
    heartbeat *hb;
    bool (*done)(heartbeat *);
    const struct timespec *until; /* CLOCK_MONOTONIC, or NULL: no limit */
    bool interrupted;
};

static void *
hb_wait_nogvl(void *p)
{
    struct hb_wait *w = p;
    pthread_mutex_lock(&w->hb->lock);
    while (!w->done(w->hb) && !w->interrupted) {
        if (!w->until) {
            pthread_cond_wait(&w->hb->cond, &w->hb->lock);
        } else if (pthread_cond_timedwait(&w->hb->cond, &w->hb->lock, w->until) == ETIMEDOUT) {
            break;
        }
    }
    pthread_mutex_unlock(&w->hb->lock);
    return NULL;
}

static void
hb_wait_ubf(void *p)
{
    struct hb_wait *w = p;
    pthread_mutex_lock(&w->hb->lock);
    w->interrupted = true;
    pthread_cond_broadcast(&w->hb->cond);
    pthread_mutex_unlock(&w->hb->lock);
}

static bool
check_done(heartbeat *hb, bool (*done)(heartbeat *))
{
    pthread_mutex_lock(&hb->lock);
    bool d = done(hb);
    pthread_mutex_unlock(&hb->lock);
    return d;
}

static bool
passed(const struct timespec *until)
{
    struct timespec now = mono_after(0);
    return now.tv_sec > until->tv_sec || (now.tv_sec == until->tv_sec && now.tv_nsec >= until->tv_nsec);
}

/* Waits (GVL released, interruptible: a pending interrupt is raised) until done(hb) or
 * until `until` has passed (NULL: no limit). Returns done(hb). */
static bool
hb_wait(heartbeat *hb, bool (*done)(heartbeat *), const struct timespec *until)
{
    while (!check_done(hb, done)) {
        if (until && passed(until)) return false;
        struct hb_wait w = {hb, done, until, false};
        rb_nogvl(hb_wait_nogvl, &w, hb_wait_ubf, &w, 0);
        rb_thread_check_ints();
    }
    return true;
}

static bool
is_finished(heartbeat *hb)
{
    return hb->finished;
}

static bool
has_error_or_finished(heartbeat *hb)
{
    return hb->err_count > 0 || hb->finished;
}

/*
 * call-seq: heartbeat.native_stop(timeout = 1.0) -> true or false  (Heartbeat#stop)
 *
 * Sends a final STOPPING beat (bounded by timeout seconds) and joins the thread.
 * Idempotent. Returns at once in a forked child (the thread is the parent's). Never
 * waits more than timeout + 2 seconds: a thread that has not finished by then (gRPC
 * core not answering at all) is detached and false is returned.
 */
static VALUE
hb_stop(int argc, VALUE *argv, VALUE self)
{
    VALUE timeout;
    rb_scan_args(argc, argv, "01", &timeout);
    double t = NIL_P(timeout) ? 1.0 : NUM2DBL(timeout);
    if (!(t >= 0)) rb_raise(rb_eArgError, "timeout must be >= 0");
    heartbeat *hb = hb_get(self);
    if (hb_dead(hb) || !hb->started) return Qtrue;
    pthread_mutex_lock(&hb->lock);
    request_stop_locked(hb, t);
    pthread_mutex_unlock(&hb->lock);
    if (hb->joined) return Qtrue;
    struct timespec until = mono_after(t + 2.0);
    bool finished = hb_wait(hb, is_finished, &until);
    if (hb->joined) return Qtrue; /* another Ruby thread joined it meanwhile */
    hb->joined = true;
    if (!finished) {
        pthread_detach(hb->thread); /* it frees itself whenever its call returns */
        return Qfalse;
    }
    pthread_join(hb->thread, NULL); /* it has finished: only its last few instructions remain */
    return Qtrue;
}

/*
 * call-seq: heartbeat.next_error -> Flowctl::Error or nil
 *
 * Blocks (without the GVL) until the thread records a failure and returns it as an
 * exception object (not raised): a Flowctl::RPCError subclass for a failed call, a
 * Flowctl::Error when the control plane answered success: false. nil once the thread
 * has finished and every error was taken. Used by the on_error: thread.
 */
static VALUE
hb_next_error(VALUE self)
{
    heartbeat *hb = hb_get(self);
    if (hb_dead(hb) || !hb->want_errors) return Qnil;
    hb_wait(hb, has_error_or_finished, NULL);
    hb_error e;
    bool got = false;
    pthread_mutex_lock(&hb->lock);
    if (hb->err_count > 0) {
        e = hb->errors[hb->err_head];
        hb->err_head = (hb->err_head + 1) % ERR_RING;
        hb->err_count--;
        got = true;
    }
    pthread_mutex_unlock(&hb->lock);
    if (!got) return Qnil;
    VALUE msg = rb_str_new_cstr(e.message);
    if (e.code < 0) return rb_exc_new_str(eFlowctlError, msg);
    return flowctl_status_error((grpc_status_code)e.code, msg, Qnil);
}

/* ---- at_exit ------------------------------------------------------------- */

struct stop_all_arg {
    struct timespec until;
    bool interrupted;
};

static void *
stop_all_nogvl(void *p)
{
    struct stop_all_arg *a = p;
    pthread_mutex_lock(&live_lock);
    while (live_head && !a->interrupted) {
        if (pthread_cond_timedwait(&live_cond, &live_lock, &a->until) == ETIMEDOUT) break;
    }
    pthread_mutex_unlock(&live_lock);
    return NULL;
}

static void
stop_all_ubf(void *p)
{
    struct stop_all_arg *a = p;
    pthread_mutex_lock(&live_lock);
    a->interrupted = true;
    pthread_cond_broadcast(&live_cond);
    pthread_mutex_unlock(&live_lock);
}

/*
 * call-seq: Flowctl::Heartbeat.stop_all(timeout = 1.0) -> Integer
 *
 * Stops every heartbeat thread of this process (also those whose Heartbeat was
 * garbage collected) and waits at most about timeout + 1 seconds for them. Returns the
 * number of threads still running (0 normally). Registered with at_exit.
 */
static VALUE
hb_stop_all(int argc, VALUE *argv, VALUE klass)
{
    VALUE timeout;
    rb_scan_args(argc, argv, "01", &timeout);
    double t = NIL_P(timeout) ? 1.0 : NUM2DBL(timeout);
    if (!(t >= 0)) rb_raise(rb_eArgError, "timeout must be >= 0");
    pthread_mutex_lock(&live_lock);
    for (heartbeat *hb = live_head; hb; hb = hb->next) {
        pthread_mutex_lock(&hb->lock);
        request_stop_locked(hb, t);
        pthread_mutex_unlock(&hb->lock);
    }
    pthread_mutex_unlock(&live_lock);
    struct stop_all_arg a = {.until = mono_after(t + 1.0)};
    rb_nogvl(stop_all_nogvl, &a, stop_all_ubf, &a, 0);
    int left = 0;
    pthread_mutex_lock(&live_lock);
    for (heartbeat *hb = live_head; hb; hb = hb->next) left++;
    pthread_mutex_unlock(&live_lock);
    return INT2FIX(left);
}

/* call-seq: Flowctl::Heartbeat.live_count -> Integer (threads running in this process) */
static VALUE
hb_live_count(VALUE klass)
{
    int n = 0;
    pthread_mutex_lock(&live_lock);
    for (heartbeat *hb = live_head; hb; hb = hb->next) n++;
    pthread_mutex_unlock(&live_lock);
    return INT2FIX(n);
}

/* call-seq: Flowctl::Heartbeat.statuses -> ["UNKNOWN", "STARTING", ...] (from the HealthStatus enum) */
static VALUE
hb_statuses(VALUE klass)
{
    const ProtobufCEnumDescriptor *d = &obsrvr__flow__common__health_status__descriptor;
    VALUE a = rb_ary_new_capa(d->n_values);
    for (unsigned i = 0; i < d->n_values; i++) rb_ary_push(a, rb_obj_freeze(rb_str_new_cstr(d->values[i].name)));
    return rb_obj_freeze(a);
}

static const char *
enum_name(const ProtobufCEnumDescriptor *d, int value)
{
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(d, value);
    if (!v) rb_raise(rb_eRuntimeError, "flowctl: HealthStatus has no value %d", value);
    return v->name;
}

/* Every field the thread sets by name must exist: checked once at load. */
static void
check_kinds(void)
{
    static const char *const beat_fields[] = {"timestamp", "metrics", "status"};
    static const char *const reply_fields[] = {"success", "message"};
    for (size_t i = 0; i < KIND_COUNT; i++) {
        const hb_kind *k = &kinds[i];
        const ProtobufCMessageDescriptor *replies[] = {k->register_resp, k->beat_resp};
        if (!protobuf_c_message_descriptor_get_field_by_name(k->register_req, k->id_field) ||
            !protobuf_c_message_descriptor_get_field_by_name(k->register_req, "endpoint") ||
            !protobuf_c_message_descriptor_get_field_by_name(k->register_req, "metadata") ||
            !protobuf_c_message_descriptor_get_field_by_name(k->beat_req, k->id_field))
            rb_raise(rb_eRuntimeError, "flowctl: %s messages do not have the fields heartbeat.c expects", k->name);
        for (size_t f = 0; f < 3; f++)
            if (!protobuf_c_message_descriptor_get_field_by_name(k->beat_req, beat_fields[f]))
                rb_raise(rb_eRuntimeError, "flowctl: %s has no field %s", k->beat_req->name, beat_fields[f]);
        for (size_t r = 0; r < 2; r++)
            for (size_t f = 0; f < 2; f++)
                if (!protobuf_c_message_descriptor_get_field_by_name(replies[r], reply_fields[f]))
                    rb_raise(rb_eRuntimeError, "flowctl: %s has no field %s", replies[r]->name, reply_fields[f]);
    }
}

void
init_flowctl_heartbeat(void)
{
    check_kinds();
    status_stopping = enum_name(&obsrvr__flow__common__health_status__descriptor,
                                OBSRVR__FLOW__COMMON__HEALTH_STATUS__STOPPING);
    flowctl_cond_init(&live_cond);
    pthread_atfork(NULL, NULL, hb_atfork_child);

    cHeartbeat = rb_define_class_under(mFlowctl, "Heartbeat", rb_cObject);
    rb_define_alloc_func(cHeartbeat, hb_alloc);
    rb_define_private_method(cHeartbeat, "start_native", hb_start_native, 10);
    rb_define_method(cHeartbeat, "metrics=", hb_set_metrics, 1);
    rb_define_method(cHeartbeat, "metrics", hb_metrics, 0);
    rb_define_private_method(cHeartbeat, "native_set_status", hb_set_status, 1);
    rb_define_method(cHeartbeat, "status", hb_status, 0);
    rb_define_method(cHeartbeat, "stats", hb_stats_get, 0);
    rb_define_method(cHeartbeat, "running?", hb_running_p, 0);
    rb_define_private_method(cHeartbeat, "native_stop", hb_stop, -1);
    rb_define_method(cHeartbeat, "next_error", hb_next_error, 0);
    rb_define_singleton_method(cHeartbeat, "stop_all", hb_stop_all, -1);
    rb_define_singleton_method(cHeartbeat, "live_count", hb_live_count, 0);
    rb_define_singleton_method(cHeartbeat, "statuses", hb_statuses, 0);
}
