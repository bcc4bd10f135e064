/*
 * pending.c — a reader's events written and not acknowledged (flowctl_pending), without Ruby.
 *
 * The pipeline runner keeps one list per reader (a processor or a sink), so that what a
 * reader had not acknowledged when its link broke is written again on the next one (at least
 * once). relay.c pushes and acknowledges on a producer's thread without the GVL; the Ruby
 * paths do the same through relay_class.c.
 *
 * The list holds references to the events' byte buffers (no copy) with their ids, oldest
 * first, at most `limit` events and `byte_limit` bytes: past either the oldest are let go and
 * counted (they can no longer be replayed; the newest is always kept).
 *
 * An acknowledgement names an id: that event and every older one go. Replies usually come
 * in order and name the oldest, but a processor that renames events, fans one out to
 * several or filters some names ids that are not at the head or not in the list at all;
 * an index (id -> position, open addressing) finds them without walking the list, so an
 * acknowledgement costs the same whatever the list holds. Every event in the list has an
 * entry; entries of events gone from the front are stale (their position is before the head)
 * and are reused or dropped when the index is rebuilt (at half full, from the list).
 *
 * The gate: the Router shuts it when the reader's link breaks and opens it with a new
 * epoch once the replay is written on the next link; a relay remembers an event only while
 * the gate is open at the epoch its run started with (flowctl_pending_push's gated), so an
 * event is either in the list when it is replayed or held by the relay and written to the
 * new link after the replay, never lost between the two.
 */
#include "flowctl.h"

enum { INDEX_MIN = 64 };

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
    p->head_seq = 0;
    p->index = NULL;
    p->index_cap = p->index_used = 0;
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

/* ---- the index: id -> position ----------------------------------------------------- */

/* FNV-1a; never 0 (0 marks an empty slot). */
static uint32_t
id_hash(const uint8_t *id, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) h = (h ^ id[i]) * 16777619u;
    return h | 1;
}

/* The position (from the head) of the entry's event, or len when the entry is stale:
 * positions are kept modulo 2^32 (the index is rebuilt long before they wrap around). */
static size_t
entry_position(const flowctl_pending *p, const flowctl_pending_slot *s)
{
    uint32_t at = s->seq - (uint32_t)p->head_seq;
    return at < p->len ? at : p->len;
}

/* Enters the event at seq (mu held; the index has a free slot): in the first empty or stale
 * slot of its probe sequence. */
static void
index_put(flowctl_pending *p, uint32_t hash, uint32_t seq)
{
    size_t mask = p->index_cap - 1;
    for (size_t i = hash & mask;; i = (i + 1) & mask) {
        flowctl_pending_slot *s = &p->index[i];
        if (s->hash == 0) p->index_used++;
        if (s->hash == 0 || entry_position(p, s) == p->len) {
            s->hash = hash;
            s->seq = seq;
            return;
        }
    }
}

/* A new index of cap slots with every event of the list in it (mu held); false: no memory
 * (the old index stays). */
static bool
index_rebuild(flowctl_pending *p, size_t cap)
{
    if (cap == p->index_cap) {
        memset(p->index, 0, cap * sizeof(*p->index));
    } else {
        flowctl_pending_slot *slots = calloc(cap, sizeof(*slots));
        if (!slots) return false;
        free(p->index);
        p->index = slots;
        p->index_cap = cap;
    }
    p->index_used = 0;
    for (size_t i = 0; i < p->len; i++) {
        const flowctl_pending_item *it = item_at(p, i);
        index_put(p, it->hash, (uint32_t)(p->head_seq + i));
    }
    return true;
}

/* Room for one more entry (mu held): at most half the slots used, counting stale ones. */
static bool
index_reserve(flowctl_pending *p)
{
    if (p->index && (p->index_used + 1) * 2 <= p->index_cap) return true;
    size_t cap = INDEX_MIN;
    while (cap < (p->len + 1) * 4) cap *= 2;
    return index_rebuild(p, cap);
}

/* The position of the oldest event with that id, or len (mu held). */
static size_t
index_find(flowctl_pending *p, const uint8_t *id, size_t id_len)
{
    size_t found = p->len;
    if (!p->index) return found;
    uint32_t hash = id_hash(id, id_len);
    size_t mask = p->index_cap - 1;
    for (size_t i = hash & mask; p->index[i].hash != 0; i = (i + 1) & mask) {
        const flowctl_pending_slot *s = &p->index[i];
        if (s->hash != hash) continue;
        size_t at = entry_position(p, s);
        if (at >= found) continue;
        const flowctl_pending_item *it = item_at(p, at);
        if (it->id_len == id_len && memcmp(it->id, id, id_len) == 0) found = at;
    }
    return found;
}

/* ---- the list ------------------------------------------------------------------------ */

/* Lets go of the n oldest (mu held); their index entries become stale. */
static void
drop_front_locked(flowctl_pending *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        p->bytes -= item_at(p, i)->size;
        item_free(item_at(p, i));
    }
    p->head = p->cap ? (p->head + n) % p->cap : 0;
    p->len -= n;
    p->head_seq += n;
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
    free(p->index);
    p->items = NULL;
    p->index = NULL;
    p->cap = p->index_cap = 0;
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
    uint32_t hash = id_hash(id, id_len);
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
    if ((p->len == p->cap && !grow_locked(p)) || !index_reserve(p)) {
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
    it->hash = hash;
    index_put(p, hash, (uint32_t)(p->head_seq + p->len));
    p->bytes += size;
    p->len++;
    pthread_mutex_unlock(&p->mu);
    return PENDING_OK;
}

size_t
flowctl_pending_ack(flowctl_pending *p, const uint8_t *id, size_t id_len)
{
    pthread_mutex_lock(&p->mu);
    size_t n = 0;
    if (p->len > 0) {
        const flowctl_pending_item *oldest = item_at(p, 0);
        /* the usual case (replies in order): the oldest, without hashing */
        size_t at = oldest->id_len == id_len && memcmp(oldest->id, id, id_len) == 0 ? 0 : index_find(p, id, id_len);
        n = at < p->len ? at + 1 : 0;
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
