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
 * The pending list (flowctl_pending) is a reader's events written and not acknowledged:
 * references to their byte buffers (no copy), with their ids, oldest first, at most `limit`
 * events and `byte_limit` bytes (past either the oldest are let go and counted: they can no
 * longer be replayed; the newest is always kept). It has a gate:
 * the Router shuts it when the reader's link breaks and opens it with a new epoch once the
 * replay is written on the next link; the relay remembers an event only while the gate is
 * open at the epoch its run started with, so an event is either in the list when it is
 * replayed or held by the relay and written to the new link after the replay, never lost
 * between the two.
 */
#include "flowctl.h"
#include "wire.h"

/* ---- the pending list ---------------------------------------------------------- */

void
flowctl_pending_init(flowctl_pending *p, size_t limit, size_t byte_limit)
{
    pthread_mutex_init(&p->mu, NULL);
    p->items = NULL;
    p->cap = p->head = p->len = 0;
    p->limit = limit ? limit : 1;
    p->byte_limit = byte_limit ? byte_limit : SIZE_MAX;
    p->bytes = 0;
    p->unprotected = 0;
    p->epoch = 0;
    p->open = false;
}

static void
item_free(flowctl_pending_item *it)
{
    if (it->bb) grpc_byte_buffer_destroy(it->bb);
    free(it->id);
    it->bb = NULL;
    it->id = NULL;
}

static flowctl_pending_item *
item_at(flowctl_pending *p, size_t i)
{
    return &p->items[(p->head + i) % p->cap];
}

/* Lets go of the n oldest (mu held). */
static void
drop_front_locked(flowctl_pending *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        p->bytes -= item_at(p, i)->size;
        item_free(item_at(p, i));
    }
    p->head = p->cap ? (p->head + n) % p->cap : 0;
    p->len -= n;
}

void
flowctl_pending_clear(flowctl_pending *p)
{
    pthread_mutex_lock(&p->mu);
    drop_front_locked(p, p->len);
    pthread_mutex_unlock(&p->mu);
}

void
flowctl_pending_free(flowctl_pending *p)
{
    flowctl_pending_clear(p);
    free(p->items);
    p->items = NULL;
    p->cap = 0;
    pthread_mutex_destroy(&p->mu);
}

static bool
grow_locked(flowctl_pending *p)
{
    size_t cap = p->cap ? p->cap * 2 : 64;
    if (cap > p->limit) cap = p->limit;
    flowctl_pending_item *items = malloc(cap * sizeof(*items));
    if (!items) return false;
    for (size_t i = 0; i < p->len; i++) items[i] = *item_at(p, i);
    free(p->items);
    p->items = items;
    p->cap = cap;
    p->head = 0;
    return true;
}

int
flowctl_pending_push(flowctl_pending *p, grpc_byte_buffer *bb, const uint8_t *id, size_t id_len, bool gated,
                     uint64_t epoch)
{
    char *copy = malloc(id_len + 1);
    grpc_byte_buffer *ref = copy ? grpc_byte_buffer_copy(bb) : NULL;
    if (!ref) {
        free(copy);
        return PENDING_NOMEM;
    }
    memcpy(copy, id, id_len);
    copy[id_len] = '\0';
    size_t size = grpc_byte_buffer_length(ref);
    pthread_mutex_lock(&p->mu);
    if (gated && (!p->open || p->epoch != epoch)) {
        pthread_mutex_unlock(&p->mu);
        grpc_byte_buffer_destroy(ref);
        free(copy);
        return PENDING_SHUT;
    }
    while (p->len > 0 && (p->len >= p->limit || p->bytes > p->byte_limit || size > p->byte_limit - p->bytes)) {
        /* the oldest can no longer be replayed */
        drop_front_locked(p, 1);
        p->unprotected++;
    }
    if (p->len == p->cap && !grow_locked(p)) {
        pthread_mutex_unlock(&p->mu);
        grpc_byte_buffer_destroy(ref);
        free(copy);
        return PENDING_NOMEM;
    }
    flowctl_pending_item *it = item_at(p, p->len);
    it->bb = ref;
    it->id = copy;
    it->id_len = id_len;
    it->size = size;
    p->bytes += size;
    p->len++;
    pthread_mutex_unlock(&p->mu);
    return PENDING_OK;
}

size_t
flowctl_pending_ack(flowctl_pending *p, const uint8_t *id, size_t id_len)
{
    size_t n = 0;
    pthread_mutex_lock(&p->mu);
    for (size_t i = 0; i < p->len; i++) { /* the usual case: the oldest (replies in order) */
        flowctl_pending_item *it = item_at(p, i);
        if (it->id_len == id_len && memcmp(it->id, id, id_len) == 0) {
            n = i + 1;
            break;
        }
    }
    drop_front_locked(p, n);
    pthread_mutex_unlock(&p->mu);
    return n;
}

flowctl_pending_counts
flowctl_pending_count(flowctl_pending *p)
{
    pthread_mutex_lock(&p->mu);
    flowctl_pending_counts c = {.len = p->len, .bytes = p->bytes, .unprotected = p->unprotected};
    pthread_mutex_unlock(&p->mu);
    return c;
}

grpc_byte_buffer **
flowctl_pending_copy(flowctl_pending *p, bool take, size_t *n)
{
    pthread_mutex_lock(&p->mu);
    grpc_byte_buffer **out = malloc((p->len ? p->len : 1) * sizeof(*out));
    *n = 0;
    if (out) {
        for (size_t i = 0; i < p->len; i++) out[i] = grpc_byte_buffer_copy(item_at(p, i)->bb);
        *n = p->len;
        if (take) drop_front_locked(p, p->len);
    }
    pthread_mutex_unlock(&p->mu);
    return out;
}

void
flowctl_pending_shut(flowctl_pending *p)
{
    pthread_mutex_lock(&p->mu);
    p->open = false;
    p->epoch++;
    pthread_mutex_unlock(&p->mu);
}

uint64_t
flowctl_pending_open(flowctl_pending *p)
{
    pthread_mutex_lock(&p->mu);
    p->open = true;
    uint64_t epoch = ++p->epoch;
    pthread_mutex_unlock(&p->mu);
    return epoch;
}

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
