/*
 * cp_load.c — the load generator of bench/controlplane.rb: an operator's load on a control
 * plane, written on gRPC C core (no Ruby), so the server is what is measured.
 *
 *   cp_load seed|v1 TARGET COMPONENTS CONNECTIONS IN_FLIGHT SECONDS
 *
 * 1. registers COMPONENTS components ("bench-<n>") as one burst with IN_FLIGHT calls
 *    outstanding (RegisterProcessor or RegisterComponent), and checks that each one
 *    answered (a seed registration must say success: true);
 * 2. sends heartbeats round robin over those ids for SECONDS, IN_FLIGHT calls outstanding,
 *    spread over CONNECTIONS channels (each its own TCP connection), status HEALTHY and
 *    two metrics (ProcessorHeartbeat with map<string,double> or Heartbeat with
 *    map<string,string>).
 * Prints
 *   REGISTER <ok> <failed> <seconds>
 *   RESULT <ok heartbeats/s> <ok> <failed> <p50 us> <p99 us> <max us> <client CPU us per call>
 *   CODES <status>=<count> ...   (failed calls by gRPC status; a seed "success: false" is 99)
 *
 * bench/controlplane.rb builds it: cc -O2 bench/cp_load.c $(pkg-config --cflags --libs grpc)
 */
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_LAT_US 10000000  /* latencies above 10 s land in the last bucket */
#define NO_SUCCESS 99        /* a seed reply with success: false */

typedef struct {
    grpc_call *call;
    grpc_byte_buffer *send, *recv;
    grpc_metadata_array initial, trailing;
    grpc_status_code status;
    grpc_slice details;
    double started;
    bool registering;
} slot_t;

static bool v1;
static grpc_channel **channels;
static int nchannels;
static grpc_completion_queue *cq;
static unsigned *latency;            /* histogram by microsecond */
static long codes[100];

static double
clock_s(clockid_t id)
{
    struct timespec t;
    clock_gettime(id, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* ---- protobuf encoding by hand (a few fields) ---- */

static size_t
put_varint(unsigned char *p, unsigned long v)
{
    size_t n = 0;
    while (v >= 0x80) { p[n++] = (unsigned char)(v | 0x80); v >>= 7; }
    p[n++] = (unsigned char)v;
    return n;
}

static size_t
put_bytes(unsigned char *p, int field, const void *data, size_t len)
{
    size_t n = put_varint(p, (unsigned long)(field << 3 | 2));
    n += put_varint(p + n, len);
    memcpy(p + n, data, len);
    return n + len;
}

static size_t
put_str(unsigned char *p, int field, const char *s)
{
    return put_bytes(p, field, s, strlen(s));
}

/* map<string, double> (seed) or map<string, string> (v1) entry */
static size_t
put_metric(unsigned char *p, int field, const char *key, double value)
{
    unsigned char entry[128];
    size_t n = put_str(entry, 1, key);
    if (v1) {
        char text[32];
        snprintf(text, sizeof(text), "%.0f", value);
        n += put_str(entry + n, 2, text);
    } else {
        entry[n++] = 2 << 3 | 1;
        memcpy(entry + n, &value, 8);
        n += 8;
    }
    return put_bytes(p, field, entry, n);
}

static size_t
register_request(unsigned char *p, long i)
{
    char id[64];
    snprintf(id, sizeof(id), "bench-%ld", i);
    if (!v1) {
        size_t n = put_str(p, 1, id);
        n += put_str(p + n, 2, "127.0.0.1:9000");
        return n + put_bytes(p + n, 3, "\x0a\x04zone\x12\x01" "a", 9);
    }
    unsigned char info[256];
    size_t m = put_str(info, 1, id);
    m += put_str(info + m, 2, "bench processor");
    m += put_str(info + m, 4, "1.0.0");
    info[m++] = 5 << 3; info[m++] = 2; /* COMPONENT_TYPE_PROCESSOR */
    m += put_str(info + m, 6, "raw");
    m += put_str(info + m, 7, "bench.event");
    m += put_str(info + m, 8, "127.0.0.1:9000");
    return put_bytes(p, 1, info, m);
}

static size_t
heartbeat_request(unsigned char *p, long i, long seq)
{
    char id[64];
    snprintf(id, sizeof(id), "bench-%ld", i);
    size_t n = put_str(p, 1, id);
    if (v1) {
        p[n++] = 2 << 3; p[n++] = 2; /* HEALTH_STATUS_HEALTHY */
    } else {
        n += put_str(p + n, 4, "HEALTHY");
    }
    n += put_metric(p + n, 3, "events", (double)seq);
    n += put_metric(p + n, 3, "lag_ms", 3.0);
    return n;
}

/* ---- calls ---- */

static void
start_call(slot_t *s, long component, long seq, bool registering)
{
    unsigned char req[512];
    size_t len = registering ? register_request(req, component) : heartbeat_request(req, component, seq);
    const char *method = v1 ? (registering ? "/flowctl.v1.ControlPlaneService/RegisterComponent"
                                           : "/flowctl.v1.ControlPlaneService/Heartbeat")
                            : (registering ? "/obsrvr.flow.controlplane.ControlPlane/RegisterProcessor"
                                           : "/obsrvr.flow.controlplane.ControlPlane/ProcessorHeartbeat");
    grpc_slice body = grpc_slice_from_copied_buffer((const char *)req, len);
    s->send = grpc_raw_byte_buffer_create(&body, 1);
    grpc_slice_unref(body);
    s->recv = NULL;
    s->registering = registering;
    grpc_metadata_array_init(&s->initial);
    grpc_metadata_array_init(&s->trailing);
    s->call = grpc_channel_create_call(channels[(component + seq) % nchannels], NULL, 0, cq,
                                       grpc_slice_from_static_string(method), NULL,
                                       gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_seconds(30, GPR_TIMESPAN)),
                                       NULL);
    grpc_op ops[6];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = s->send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &s->initial;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &s->recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.status = &s->status;
    ops[5].data.recv_status_on_client.status_details = &s->details;
    ops[5].data.recv_status_on_client.trailing_metadata = &s->trailing;
    s->started = clock_s(CLOCK_MONOTONIC);
    if (grpc_call_start_batch(s->call, ops, 6, s, NULL) != GRPC_CALL_OK) {
        fprintf(stderr, "cp_load: grpc_call_start_batch failed\n");
        exit(1);
    }
}

/* A seed reply's success field (field 1, varint) is true. */
static bool
seed_success(grpc_byte_buffer *bb)
{
    if (!bb) return false;
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb)) return false;
    grpc_slice all = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    const unsigned char *p = GRPC_SLICE_START_PTR(all);
    size_t len = GRPC_SLICE_LENGTH(all), i = 0;
    bool ok = false;
    while (i < len) { /* skip fields until field 1 (register: 2) varint */
        unsigned key = p[i++];
        if ((key & 7) == 0) {
            unsigned long v = 0;
            int shift = 0;
            while (i < len && (p[i] & 0x80)) v |= (unsigned long)(p[i++] & 0x7f) << shift, shift += 7;
            if (i < len) v |= (unsigned long)p[i++] << shift;
            if (key >> 3 == 1 || key >> 3 == 2) ok = v == 1;
        } else if ((key & 7) == 2 && i < len) {
            size_t l = p[i++]; /* short strings only in these replies */
            if (l & 0x80) { l = (l & 0x7f) | (size_t)p[i++] << 7; }
            i += l;
        } else {
            break;
        }
    }
    grpc_slice_unref(all);
    return ok;
}

/* Ends a completed call: returns its code (0 ok). */
static int
end_call(slot_t *s)
{
    int code = (int)s->status;
    if (code == 0 && !v1 && !seed_success(s->recv)) code = NO_SUCCESS;
    double us = (clock_s(CLOCK_MONOTONIC) - s->started) * 1e6;
    if (!s->registering) latency[us < MAX_LAT_US ? (long)us : MAX_LAT_US - 1]++;
    grpc_byte_buffer_destroy(s->send);
    if (s->recv) grpc_byte_buffer_destroy(s->recv);
    grpc_slice_unref(s->details);
    grpc_metadata_array_destroy(&s->initial);
    grpc_metadata_array_destroy(&s->trailing);
    grpc_call_unref(s->call);
    return code;
}

static double
percentile(long total, double q)
{
    long want = (long)(q * (double)total), seen = 0;
    for (long us = 0; us < MAX_LAT_US; us++) {
        seen += latency[us];
        if (seen > want) return (double)us;
    }
    return MAX_LAT_US;
}

int
main(int argc, char **argv)
{
    if (argc != 7 || (strcmp(argv[1], "seed") != 0 && strcmp(argv[1], "v1") != 0)) {
        fprintf(stderr, "usage: cp_load seed|v1 TARGET COMPONENTS CONNECTIONS IN_FLIGHT SECONDS\n");
        return 2;
    }
    v1 = strcmp(argv[1], "v1") == 0;
    long components = atol(argv[3]);
    nchannels = atoi(argv[4]);
    int inflight = atoi(argv[5]);
    double seconds = atof(argv[6]);
    if (components < 1 || nchannels < 1 || inflight < 1) return 2;
    latency = calloc(MAX_LAT_US, sizeof(*latency));
    slot_t *slots = calloc((size_t)inflight, sizeof(*slots));
    grpc_init();
    cq = grpc_completion_queue_create_for_next(NULL);
    channels = calloc((size_t)nchannels, sizeof(*channels));
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    for (int i = 0; i < nchannels; i++) {
        /* a local subchannel pool each: one TCP connection per channel */
        grpc_arg args[2] = {{GRPC_ARG_INTEGER, "grpc.use_local_subchannel_pool", {.integer = 1}},
                            {GRPC_ARG_INTEGER, "cp_load.channel", {.integer = i}}};
        grpc_channel_args ca = {2, args};
        channels[i] = grpc_channel_create(argv[2], creds, &ca);
    }
    grpc_channel_credentials_release(creds);

    /* 1. the registration burst */
    double t0 = clock_s(CLOCK_MONOTONIC);
    long next = 0, done = 0, reg_ok = 0, reg_failed = 0;
    for (int i = 0; i < inflight && next < components; i++) start_call(&slots[i], next++, 0, true);
    while (done < components) {
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        slot_t *s = ev.tag;
        int code = end_call(s);
        if (code == 0) reg_ok++;
        else { reg_failed++; codes[code]++; }
        done++;
        if (next < components) start_call(s, next++, 0, true);
    }
    printf("REGISTER %ld %ld %.3f\n", reg_ok, reg_failed, clock_s(CLOCK_MONOTONIC) - t0);
    fflush(stdout); /* the driver reads the server's CPU between the phases */
    memset(latency, 0, MAX_LAT_US * sizeof(*latency));

    /* 2. heartbeats */
    long ok = 0, failed = 0, seq = 0, pending = 0;
    t0 = clock_s(CLOCK_MONOTONIC);
    double c0 = clock_s(CLOCK_PROCESS_CPUTIME_ID), stop_at = t0 + seconds;
    for (int i = 0; i < inflight; i++, seq++, pending++) start_call(&slots[i], seq % components, seq / components, false);
    bool stopping = false;
    while (pending > 0) {
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        slot_t *s = ev.tag;
        int code = end_call(s);
        pending--;
        if (code == 0) ok++;
        else { failed++; codes[code]++; }
        if (!stopping && (ok + failed) % 64 == 0 && clock_s(CLOCK_MONOTONIC) >= stop_at) stopping = true;
        if (!stopping) {
            start_call(s, seq % components, seq / components, false);
            seq++;
            pending++;
        }
    }
    double dt = clock_s(CLOCK_MONOTONIC) - t0, cpu = clock_s(CLOCK_PROCESS_CPUTIME_ID) - c0;
    long total = ok + failed;
    printf("RESULT %.0f %ld %ld %.0f %.0f %.0f %.2f\n", (double)ok / dt, ok, failed, percentile(total, 0.5),
           percentile(total, 0.99), percentile(total, 0.999999999), cpu / (double)total * 1e6);
    printf("CODES");
    for (int c = 0; c < 100; c++)
        if (codes[c]) printf(" %d=%ld", c, codes[c]);
    printf("\n");
    for (int i = 0; i < nchannels; i++) grpc_channel_destroy(channels[i]);
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type != GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
    grpc_shutdown();
    return 0;
}
