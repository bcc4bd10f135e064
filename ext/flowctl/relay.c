/*
 * relay.c — the pipeline runner's hops from one component to the next, without Ruby.
 *
 * Flowctl::Pipeline::Router moves each event from a producer (a source's StreamEvents
 * replies, a processor's Process replies) to the components that read it. Where a producer
 * has one reader and that reader has one producer (a chain), what the Router does per
 * event is small and fixed, and it is done here, on the producer's thread without the GVL,
 * on the bytes as gRPC delivered them (as forward.c moves them, through the pumps):
 *   - the event is skimmed (skim.c): bytes the decoder would refuse stop the relay as a
 *     read would have failed;
 *   - its id, type and whether its metadata has the failure key are read off the wire
 *     (field numbers from the message class, given by the binding);
 *   - a processor's reply acknowledges, by its id, what was written to that processor
 *     (its pending list, below);
 *   - an event that failed (the failure key) goes back to Ruby (RELAY_DIVERT), which sends
 *     it to the dead-letter sink; one of a type the reader does not take is dropped, counted;
 *   - the rest is remembered in the reader's pending list and written to its stream.
 * The policy (which hops relay, reconnection, replay, checkpoints, dead letters) is the
 * Router's; the binding is call.c (Native::Stream#relay) and relay_class.c.
 *
 * The pending lists (what a reader was written and has not acknowledged, with the gate the
 * relay writes through) are pending.c's.
 */
#include "flowctl.h"
#include "wire.h"

/* ---- reading an event off the wire ---------------------------------------------- */

/* Steps over the rest of a group whose start tag was read (nested ones too); false when
 * the data ends first or is malformed. */
static bool
skip_group(const uint8_t **p, const uint8_t *end)
{
    for (unsigned depth = 1; depth > 0;) {
        uint64_t tag, v;
        if (!wire_varint(p, end, &tag)) return false;
        switch (tag & 7) {
        case WT_VARINT:
            if (!wire_varint(p, end, &v)) return false;
            break;
        case WT_I64:
        case WT_I32: {
            size_t n = (tag & 7) == WT_I64 ? 8 : 4;
            if ((size_t)(end - *p) < n) return false;
            *p += n;
            break;
        }
        case WT_LEN:
            if (!wire_varint(p, end, &v) || v > (uint64_t)(end - *p)) return false;
            *p += v;
            break;
        case WT_SGROUP:
            depth++;
            break;
        case WT_EGROUP:
            depth--;
            break;
        default:
            return false;
        }
    }
    return true;
}

/* wire_next, except that a group (which the decoder skips as an unknown field, whatever its
 * number) is stepped over whole and given as a field of wire type WT_SGROUP. */
static bool
scan_next(const uint8_t **p, const uint8_t *end, wire_field *f)
{
    const uint8_t *start = *p;
    uint64_t tag;
    if (*p >= end || !wire_varint(p, end, &tag)) return false;
    if ((tag & 7) == WT_SGROUP) {
        f->number = (uint32_t)(tag >> 3);
        f->wt = WT_SGROUP;
        f->p = NULL;
        f->len = 0;
        return skip_group(p, end);
    }
    *p = start;
    return wire_next(p, end, f);
}

/* Does a metadata map entry (key 1, value 2) have the failure key? */
static bool
entry_is_failure(const flowctl_relay_fields *fs, const uint8_t *p, size_t len)
{
    const uint8_t *end = p + len;
    wire_field f;
    bool hit = false;
    while (scan_next(&p, end, &f)) {
        if (f.number == 1 && f.wt == WT_LEN) hit = f.len == fs->failure_key_len && memcmp(f.p, fs->failure_key, f.len) == 0;
    }
    return hit;
}

void
flowctl_relay_scan(const flowctl_relay_fields *fs, const uint8_t *p, size_t len, flowctl_relay_event *ev)
{
    const uint8_t *end = p + len;
    static const uint8_t empty[1];
    ev->id = ev->type = empty;
    ev->id_len = ev->type_len = 0;
    ev->failed = false;
    wire_field f;
    while (scan_next(&p, end, &f)) { /* skimmed (or pushed by Ruby): stops at malformed bytes */
        if (f.wt != WT_LEN) continue;
        if (f.number == fs->id) {
            ev->id = f.p;
            ev->id_len = f.len;
        } else if (f.number == fs->type) {
            ev->type = f.p;
            ev->type_len = f.len;
        } else if (f.number == fs->metadata && !ev->failed) {
            ev->failed = entry_is_failure(fs, f.p, f.len);
        }
    }
}

static bool
accepted(const flowctl_relay *r, const flowctl_relay_event *ev)
{
    if (r->ntypes == 0) return true;
    for (size_t i = 0; i < r->ntypes; i++) {
        if (r->type_lens[i] == ev->type_len && memcmp(r->types[i], ev->type, ev->type_len) == 0) return true;
    }
    return false;
}

/* ---- the loop --------------------------------------------------------------------- */

/* Reads and looks at the next event to write: false when the loop ends (r->result set).
 * ev points into *flat, which the caller unrefs. */
static bool
next_event(flowctl_relay *r, grpc_byte_buffer **out, grpc_slice *flat, flowctl_relay_event *ev)
{
    for (;;) {
        grpc_byte_buffer *bb;
        if (!flowctl_pump_read_nogvl(r->src, &bb, &r->woken, r->dst)) {
            r->result = RELAY_WOKEN;
            return false;
        }
        if (!bb) {
            r->result = RELAY_SOURCE_END;
            return false;
        }
        atomic_fetch_add(&r->read, 1);
        const uint8_t *p;
        size_t len;
        if (!flowctl_buffer_flat(bb, flat, &p, &len)) {
            snprintf(r->bad.why, sizeof(r->bad.why), "gRPC could not read a received message");
            r->bad.desc = r->desc;
            grpc_byte_buffer_destroy(bb);
            r->result = RELAY_BAD_MESSAGE;
            return false;
        }
        if (!flowctl_skim(r->desc, p, len, &r->bad)) {
            grpc_slice_unref(*flat);
            grpc_byte_buffer_destroy(bb);
            r->result = RELAY_BAD_MESSAGE;
            return false;
        }
        flowctl_relay_scan(&r->fields, p, len, ev);
        if (r->ack && ev->id_len) flowctl_pending_ack(r->ack, ev->id, ev->id_len);
        if (r->keep_last) {
            if (r->last) grpc_byte_buffer_destroy(r->last);
            r->last = grpc_byte_buffer_copy(bb);
        }
        if (!ev->failed && accepted(r, ev)) {
            *out = bb;
            return true;
        }
        grpc_slice_unref(*flat);
        if (ev->failed) { /* Ruby sends it to the dead-letter sink */
            r->held = bb;
            r->held_pushed = false;
            r->result = RELAY_DIVERT;
            return false;
        }
        atomic_fetch_add(&r->dropped, 1);
        grpc_byte_buffer_destroy(bb);
    }
}

/* Remembers bb (its id: id, id_len) in the reader's pending list before it is written:
 * false (bb held, r->result set) at the run's limit, when the gate is shut or at another
 * epoch, or without memory. */
static bool
remember(flowctl_relay *r, grpc_byte_buffer *bb, const uint8_t *id, size_t id_len)
{
    int rc = r->limit && r->pushed >= r->limit ? -1 : flowctl_pending_push(r->into, bb, id, id_len, true, r->epoch);
    if (rc == PENDING_OK) {
        r->pushed++;
        return true;
    }
    r->held = bb;
    r->held_pushed = false;
    r->result = rc < 0 ? RELAY_LIMIT : rc == PENDING_SHUT ? RELAY_DETACHED : RELAY_NOMEM;
    return false;
}

/* remember for an event held from an earlier run (its id is read again). */
static bool
remember_held(flowctl_relay *r, grpc_byte_buffer *bb)
{
    grpc_slice flat;
    const uint8_t *p;
    size_t len;
    static const uint8_t none[1];
    flowctl_relay_event ev = {.id = none, .type = none};
    bool readable = flowctl_buffer_flat(bb, &flat, &p, &len); /* it was read once: it reads again */
    if (readable) flowctl_relay_scan(&r->fields, p, len, &ev);
    bool ok = remember(r, bb, ev.id, ev.id_len);
    if (readable) grpc_slice_unref(flat);
    return ok;
}

void *
flowctl_relay_nogvl(void *arg)
{
    flowctl_relay *r = arg;
    for (;;) {
        grpc_byte_buffer *bb = r->held;
        bool pushed = r->held_pushed;
        r->held = NULL;
        r->held_pushed = false;
        if (bb && pushed && r->held_epoch != r->epoch) { /* remembered on a link that broke since: it is replayed */
            grpc_byte_buffer_destroy(bb);
            continue;
        }
        if (!bb) {
            grpc_slice flat;
            flowctl_relay_event ev;
            if (!next_event(r, &bb, &flat, &ev)) return NULL;
            bool ok = remember(r, bb, ev.id, ev.id_len);
            grpc_slice_unref(flat);
            if (!ok) return NULL;
        } else if (!pushed && !remember_held(r, bb)) {
            return NULL;
        }
        bool failed;
        if (!flowctl_pump_write_nogvl(r->dst, bb, &failed, &r->woken)) {
            r->held = bb; /* remembered already: written first when the loop goes on at this epoch */
            r->held_pushed = true;
            r->held_epoch = r->epoch;
            r->result = RELAY_WOKEN;
            return NULL;
        }
        if (failed) { /* remembered: the Router replays it on the reader's next link */
            grpc_byte_buffer_destroy(bb);
            r->result = RELAY_DESTINATION_ENDED;
            return NULL;
        }
        atomic_fetch_add(&r->written, 1);
    }
}

void
flowctl_relay_ubf(void *arg)
{
    atomic_store(&((flowctl_relay *)arg)->woken, true);
}

void
flowctl_relay_free(flowctl_relay *r)
{
    if (r->held) grpc_byte_buffer_destroy(r->held);
    if (r->last) grpc_byte_buffer_destroy(r->last);
    r->held = r->last = NULL;
    for (size_t i = 0; i < r->ntypes; i++) free(r->types[i]);
    free(r->types);
    free(r->type_lens);
    r->types = NULL;
    r->type_lens = NULL;
    r->ntypes = 0;
}
