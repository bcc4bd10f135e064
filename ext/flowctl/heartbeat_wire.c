/*
 * heartbeat_wire.c — what the heartbeat thread sends and how it reads the answers.
 *
 * No protocol lives here: a plan (flowctl.h, built by lib/flowctl/heartbeat*.rb) names
 * the field numbers and value types of one protocol's heartbeat and unregister
 * requests and of its replies. The register request comes encoded by Ruby. Fields are
 * written in field number order, proto3 defaults left out, as protoc-generated code
 * writes them. Pure C: no Ruby, no gRPC; the thread calls it without any lock.
 */
#include "flowctl.h"
#include "wire.h"

static void
free_strv(char **v, size_t n)
{
    if (!v) return;
    for (size_t i = 0; i < n; i++) free(v[i]);
    free(v);
}

void
flowctl_hb_plan_free(flowctl_hb_plan *plan)
{
    if (!plan) return;
    free(plan->register_path);
    free(plan->beat_path);
    free(plan->unregister_path);
    free(plan->register_req);
    free(plan->forgot_details);
    free_strv(plan->status_names, plan->n_statuses);
    free(plan->status_numbers);
    free(plan);
}

/* ---- writing --------------------------------------------------------------- */

static void
put_string(wbuf *b, uint32_t number, const char *s)
{
    size_t n = s ? strlen(s) : 0;
    if (!number || n == 0) return;
    wb_tag(b, number, WT_LEN);
    wb_lenbytes(b, s, n);
}

static void
put_varint(wbuf *b, uint32_t number, uint64_t v)
{
    if (!number || v == 0) return;
    wb_tag(b, number, WT_VARINT);
    wb_varint(b, v);
}

/* A double is left out only when all its bits are zero (-0.0 is written). */
static void
put_double(wbuf *b, uint32_t number, double d)
{
    uint64_t bits;
    memcpy(&bits, &d, sizeof(bits));
    if (!number || bits == 0) return;
    wb_tag(b, number, WT_I64);
    wb_fixed64(b, bits);
}

static void
put_metrics(wbuf *b, const flowctl_hb_plan *plan, const flowctl_hb_config *c)
{
    for (size_t i = 0; i < c->n_metrics; i++) {
        wb_tag(b, plan->beat_metrics, WT_LEN);
        size_t at = wb_open(b);
        put_string(b, 1, c->keys[i]);
        if (plan->metric_strings) put_string(b, 2, c->texts[i]);
        else put_double(b, 2, c->values[i]);
        wb_close(b, at);
    }
}

/* google.protobuf.Timestamp: always present (a message), its zero fields left out. */
static void
put_timestamp(wbuf *b, uint32_t number, const struct timespec *t)
{
    wb_tag(b, number, WT_LEN);
    size_t at = wb_open(b);
    put_varint(b, 1, (uint64_t)(int64_t)t->tv_sec);
    put_varint(b, 2, (uint64_t)(int64_t)t->tv_nsec);
    wb_close(b, at);
}

struct beat {
    const flowctl_hb_plan *plan;
    const char *id;
    const flowctl_hb_config *c;
    unsigned status;
    const struct timespec *now;
};

enum part { PART_ID, PART_STATUS, PART_METRICS, PART_TIMESTAMP };

static void
put_part(wbuf *b, const struct beat *m, enum part part)
{
    const flowctl_hb_plan *plan = m->plan;
    switch (part) {
    case PART_ID: put_string(b, plan->beat_id, m->id); break;
    case PART_STATUS:
        if (plan->status_enum) put_varint(b, plan->beat_status, (uint64_t)(int64_t)plan->status_numbers[m->status]);
        else put_string(b, plan->beat_status, plan->status_names[m->status]);
        break;
    case PART_METRICS: if (plan->beat_metrics) put_metrics(b, plan, m->c); break;
    case PART_TIMESTAMP: if (plan->beat_timestamp) put_timestamp(b, plan->beat_timestamp, m->now); break;
    }
}

/* The parts in field number order. */
static void
write_beat(wbuf *b, const void *p)
{
    const struct beat *m = p;
    uint32_t numbers[4] = {m->plan->beat_id, m->plan->beat_status, m->plan->beat_metrics, m->plan->beat_timestamp};
    enum part order[4] = {PART_ID, PART_STATUS, PART_METRICS, PART_TIMESTAMP};
    for (int i = 1; i < 4; i++) {
        for (int j = i; j > 0 && numbers[order[j - 1]] > numbers[order[j]]; j--) {
            enum part t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    }
    for (int i = 0; i < 4; i++) put_part(b, m, order[i]);
}

struct unregister {
    const flowctl_hb_plan *plan;
    const char *id;
};

static void
write_unregister(wbuf *b, const void *p)
{
    const struct unregister *m = p;
    put_string(b, m->plan->unreg_id, m->id);
}

/* Two passes: the first counts, the second writes into a buffer of that size. */
static bool
encode(void (*write)(wbuf *, const void *), const void *msg, flowctl_bytes *out)
{
    wbuf b = {NULL, 0, 0, false};
    write(&b, msg);
    size_t n = b.len;
    char *p = malloc(n ? n : 1);
    if (!p) return false;
    b = (wbuf){p, 0, n, false};
    write(&b, msg);
    out->p = (uint8_t *)p;
    out->len = n;
    return true;
}

bool
flowctl_hb_encode_beat(const flowctl_hb_plan *plan, const char *id, const flowctl_hb_config *c, unsigned status,
                       const struct timespec *now, flowctl_bytes *out)
{
    struct beat m = {plan, id, c, status, now};
    return encode(write_beat, &m, out);
}

bool
flowctl_hb_encode_unregister(const flowctl_hb_plan *plan, const char *id, flowctl_bytes *out)
{
    struct unregister m = {plan, id};
    return encode(write_unregister, &m, out);
}

/* ---- reading ------------------------------------------------------------- */

static void
copy_text(char *dst, size_t cap, const wire_field *f)
{
    size_t n = f->len < cap - 1 ? f->len : cap - 1;
    memcpy(dst, f->p, n);
    dst[n] = 0;
}

flowctl_hb_result
flowctl_hb_read_reply(const uint8_t *p, size_t len, uint32_t success_field, uint32_t message_field, uint32_t id_field,
                      char *message, size_t cap, char **id)
{
    const uint8_t *end = p + len;
    bool success = false;
    wire_field f;
    if (cap) message[0] = 0;
    if (id) *id = NULL;
    while (wire_next(&p, end, &f)) {
        if (f.number == success_field && f.wt == WT_VARINT) success = f.v != 0;
        else if (f.number == message_field && f.wt == WT_LEN && cap) copy_text(message, cap, &f);
        else if (f.number == id_field && f.wt == WT_LEN && id && f.len > 0 && !memchr(f.p, 0, f.len)) {
            free(*id);
            *id = strndup((const char *)f.p, f.len);
        }
    }
    if (p != end) {
        if (id) {
            free(*id);
            *id = NULL;
        }
        return HB_FAILED;
    }
    return success_field && !success ? HB_REJECTED : HB_OK;
}
