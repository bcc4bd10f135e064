/*
 * beat_table.c — flowctl.v1 heartbeats answered on the server's acceptor thread, without Ruby.
 *
 * The embedded control plane (lib/flowctl/control_plane/store.rb) owns every component and
 * every rule. It publishes here, per component, what a heartbeat that changes nothing but
 * metrics and time needs: the status stored (as flowctl.v1's HealthStatus), the metrics (keys
 * and values, to count them against the limits), when persistence last noted it; and for the
 * whole table the limits (metrics per component, bytes per metric, bytes the registry may
 * still grow by, persistence's refresh interval). A HeartbeatRequest is taken in here
 * (flowctl_beat_table_apply: true, and the server replies Empty + OK at once) only when
 *   - its bytes are plainly a HeartbeatRequest: fields 1 (service_id, valid UTF-8), 2 (status,
 *     a varint) at most once each, 3 (metrics) at most BT_MAX_METRICS entries, each exactly one
 *     key and one value (valid UTF-8), no key twice, no other field;
 *   - the id is published; the status is HEALTH_STATUS_UNKNOWN (keep) or the stored one;
 *   - no metric is over max_metric_bytes, the component stays within max_metrics, a growth of
 *     the metrics fits the room;
 *   - persistence does not owe the component a write (now - saved_at < refresh).
 * Anything else returns false and the call goes to the Ruby handler as before, which gives
 * the same answer it always gave (NOT_FOUND, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, a decode
 * error, a status change with its notes). What is taken in is merged into the entry (values,
 * last heartbeat, count, growth) and the entry goes on the dirty list; Ruby folds those
 * changes into its store before it reads or changes anything (flowctl_beat_table_drain), and
 * takes an entry out before it changes the entry itself (flowctl_beat_table_take), publishing
 * it again afterwards: between the two, that component's heartbeats go to Ruby, which waits
 * for the store's lock. So every heartbeat is ordered with every other change.
 *
 * One mutex guards the table; nothing allocates a Ruby object or waits under it. Ids are
 * found through a keyed hash (SipHash-1-3, a random key per table): ids come from clients.
 */
#include "flowctl.h"
#include "wire.h"
#include <sys/random.h>
#include <time.h>

#define BT_MAX_METRICS 64      /* metrics in one request taken in here (more: Ruby) */
#define BT_MAX_SCAN 4096       /* request metrics x component metrics compared at most */
#define BT_OBJECT 40           /* Store::OBJECT: a Ruby object slot, counted per key and value */
#define BT_NOT_STRING 8        /* Store#metric_bytes: a value that is not a String counts 8 */

typedef struct bt_metric {
    char *key, *val; /* val NULL: not a String in Ruby */
    uint32_t klen, vlen;
    uint64_t hash;
    bool dirty; /* changed since Ruby last took the entry's changes */
} bt_metric;

typedef struct bt_entry {
    struct bt_entry *next;         /* hash chain */
    struct bt_entry *dnext, *dprev; /* dirty list */
    uint64_t hash;
    size_t idlen;
    int status;       /* HealthStatus stored, or -1: only HEALTH_STATUS_UNKNOWN beats are taken in */
    int64_t saved_at; /* persistence last noted it (ns) */
    int64_t last;     /* last heartbeat taken in (ns since the epoch) */
    uint64_t beats;   /* heartbeats taken in since Ruby took the changes */
    int64_t growth;   /* bytes the metrics grew by since then */
    bool dirty;
    bool held;        /* Ruby is changing it (hold .. release): its heartbeats are Ruby's */
    bt_metric *m;
    uint32_t nm, cap;
    char id[]; /* in the entry: one cache miss less per lookup */
} bt_entry;

struct flowctl_beat_table {
    pthread_mutex_t mu;
    bt_entry **buckets;
    size_t nbuckets, n;
    bt_entry *dirty;
    uint64_t k0, k1;
    int64_t room;    /* bytes the registry may still grow by, as Ruby last said (minus what it took since) */
    int64_t growth;  /* bytes grown here that Ruby has not taken yet */
    int64_t refresh; /* persistence's refresh interval (ns), 0: none */
    uint32_t max_metrics, max_metric_bytes;
    _Atomic uint64_t answered;
    _Atomic int refs;
};

/* ---- the keyed hash (SipHash-1-3) ---- */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND(v0, v1, v2, v3)                                                                 \
    do {                                                                                       \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                              \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                                 \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                                 \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                              \
    } while (0)

static uint64_t
bt_hash(const flowctl_beat_table *t, const uint8_t *p, size_t len)
{
    uint64_t v0 = t->k0 ^ 0x736f6d6570736575ULL, v1 = t->k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = t->k0 ^ 0x6c7967656e657261ULL, v3 = t->k1 ^ 0x7465646279746573ULL;
    const uint8_t *end = p + (len & ~(size_t)7);
    for (; p < end; p += 8) {
        uint64_t m;
        memcpy(&m, p, 8); /* little-endian hosts only matter for the distribution, not correctness */
        v3 ^= m;
        SIPROUND(v0, v1, v2, v3);
        v0 ^= m;
    }
    uint64_t b = (uint64_t)len << 56;
    for (size_t i = 0; i < (len & 7); i++) b |= (uint64_t)p[i] << (8 * i);
    v3 ^= b;
    SIPROUND(v0, v1, v2, v3);
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND(v0, v1, v2, v3);
    SIPROUND(v0, v1, v2, v3);
    SIPROUND(v0, v1, v2, v3);
    return v0 ^ v1 ^ v2 ^ v3;
}

/* ---- life ---- */

flowctl_beat_table *
flowctl_beat_table_new(uint32_t max_metrics, uint32_t max_metric_bytes)
{
    flowctl_beat_table *t = calloc(1, sizeof(*t));
    if (!t) return NULL;
    t->nbuckets = 64;
    t->buckets = calloc(t->nbuckets, sizeof(bt_entry *));
    if (!t->buckets) {
        free(t);
        return NULL;
    }
    uint64_t key[2];
    if (getrandom(key, sizeof(key), GRND_NONBLOCK) != (ssize_t)sizeof(key)) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        key[0] = (uint64_t)ts.tv_nsec * 0x9E3779B97F4A7C15ULL ^ (uint64_t)(uintptr_t)t;
        key[1] = (uint64_t)ts.tv_sec ^ (uint64_t)getpid() << 32;
    }
    t->k0 = key[0];
    t->k1 = key[1];
    t->max_metrics = max_metrics;
    t->max_metric_bytes = max_metric_bytes;
    t->room = INT64_MAX / 2;
    pthread_mutex_init(&t->mu, NULL);
    atomic_store(&t->refs, 1);
    return t;
}

static void
entry_free(bt_entry *e)
{
    if (!e) return;
    for (uint32_t i = 0; i < e->nm; i++) {
        free(e->m[i].key);
        free(e->m[i].val);
    }
    free(e->m);
    free(e);
}

void
flowctl_beat_table_ref(flowctl_beat_table *t)
{
    atomic_fetch_add(&t->refs, 1);
}

void
flowctl_beat_table_unref(flowctl_beat_table *t)
{
    if (!t || atomic_fetch_sub(&t->refs, 1) != 1) return;
    for (size_t i = 0; i < t->nbuckets; i++) {
        while (t->buckets[i]) {
            bt_entry *e = t->buckets[i];
            t->buckets[i] = e->next;
            entry_free(e);
        }
    }
    free(t->buckets);
    pthread_mutex_destroy(&t->mu);
    free(t);
}

size_t
flowctl_beat_table_memsize(flowctl_beat_table *t)
{
    return sizeof(*t) + t->nbuckets * sizeof(bt_entry *) + t->n * sizeof(bt_entry);
}

void
flowctl_beat_table_limits(flowctl_beat_table *t, int64_t room, int64_t refresh)
{
    pthread_mutex_lock(&t->mu);
    t->room = room;
    t->refresh = refresh;
    pthread_mutex_unlock(&t->mu);
}

uint64_t flowctl_beat_table_answered(flowctl_beat_table *t) { return atomic_load(&t->answered); }

size_t
flowctl_beat_table_size(flowctl_beat_table *t)
{
    pthread_mutex_lock(&t->mu);
    size_t n = t->n;
    pthread_mutex_unlock(&t->mu);
    return n;
}

/* ---- the hash table and the dirty list (t->mu held) ---- */

static bt_entry **
find_slot(flowctl_beat_table *t, uint64_t h, const char *id, size_t idlen)
{
    bt_entry **at = &t->buckets[h & (t->nbuckets - 1)];
    while (*at && !((*at)->hash == h && (*at)->idlen == idlen && memcmp((*at)->id, id, idlen) == 0)) at = &(*at)->next;
    return at;
}

static void
grow_buckets(flowctl_beat_table *t)
{
    size_t n = t->nbuckets * 2;
    bt_entry **b = calloc(n, sizeof(bt_entry *));
    if (!b) return; /* longer chains, still correct */
    for (size_t i = 0; i < t->nbuckets; i++) {
        while (t->buckets[i]) {
            bt_entry *e = t->buckets[i];
            t->buckets[i] = e->next;
            e->next = b[e->hash & (n - 1)];
            b[e->hash & (n - 1)] = e;
        }
    }
    free(t->buckets);
    t->buckets = b;
    t->nbuckets = n;
}

static void
mark_dirty(flowctl_beat_table *t, bt_entry *e)
{
    if (e->dirty) return;
    e->dirty = true;
    e->dprev = NULL;
    e->dnext = t->dirty;
    if (t->dirty) t->dirty->dprev = e;
    t->dirty = e;
}

static void
mark_clean(flowctl_beat_table *t, bt_entry *e)
{
    if (!e->dirty) return;
    if (e->dprev) e->dprev->dnext = e->dnext; else t->dirty = e->dnext;
    if (e->dnext) e->dnext->dprev = e->dprev;
    e->dnext = e->dprev = NULL;
    e->dirty = false;
}

/* The growth Ruby takes over: its count of bytes includes it from now on. */
static void
hand_over_growth(flowctl_beat_table *t, bt_entry *e)
{
    t->growth -= e->growth;
    t->room -= e->growth;
}

/* ---- a request ---- */

typedef struct {
    const uint8_t *k, *v;
    uint32_t klen, vlen;
    uint64_t hash;
} bt_kv;

typedef struct {
    const uint8_t *id;
    size_t idlen;
    uint64_t status;
    bool has_id, has_status;
    int n;
    bt_kv kv[BT_MAX_METRICS];
} bt_request;

/* A varint as the decoder reads it (convert.c, rd_varint): at most 10 bytes, the tenth 0 or 1. */
static bool
bt_varint(const uint8_t **p, const uint8_t *end, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 70 && *p < end; shift += 7) {
        uint8_t byte = *(*p)++;
        if (shift == 63 && byte > 1) return false;
        v |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *out = v;
            return true;
        }
    }
    return false;
}

/* The next field, with the decoder's checks (a key of at most 5 bytes, numbers 1 to 2^29-1,
 * a length within the data); only varint and length-delimited fields (others: false). */
static bool
bt_next(const uint8_t **p, const uint8_t *end, wire_field *f)
{
    const uint8_t *start = *p;
    uint64_t tag;
    if (!bt_varint(p, end, &tag) || *p - start > 5 || (tag >> 3) == 0 || (tag >> 3) > 536870911) return false;
    f->number = (uint32_t)(tag >> 3);
    f->wt = (int)(tag & 7);
    if (!bt_varint(p, end, &f->v)) return false;
    if (f->wt == WT_VARINT) return true;
    if (f->wt != WT_LEN || f->v > (uint64_t)(end - *p)) return false;
    f->p = *p;
    f->len = (size_t)f->v;
    *p += f->len;
    return true;
}

static bool
utf8_ok(const uint8_t *p, size_t len)
{
    return len < UINT32_MAX && wire_utf8_valid(p, p + len);
}

/* A map entry with exactly one key and one value. */
static bool
parse_metric(const uint8_t *p, const uint8_t *end, bt_kv *kv)
{
    bool k = false, v = false;
    wire_field f;
    while (p < end) {
        if (!bt_next(&p, end, &f) || f.wt != WT_LEN) return false;
        if (f.number == 1 && !k) {
            kv->k = f.p;
            kv->klen = (uint32_t)f.len;
            k = utf8_ok(f.p, f.len);
            if (!k) return false;
        } else if (f.number == 2 && !v) {
            kv->v = f.p;
            kv->vlen = (uint32_t)f.len;
            v = utf8_ok(f.p, f.len);
            if (!v) return false;
        } else {
            return false;
        }
    }
    return k && v;
}

static bool
duplicate_key(const bt_request *r, const bt_kv *kv)
{
    for (int i = 0; i < r->n; i++)
        if (r->kv[i].hash == kv->hash && r->kv[i].klen == kv->klen && memcmp(r->kv[i].k, kv->k, kv->klen) == 0)
            return true;
    return false;
}

static bool
parse_request(const flowctl_beat_table *t, const uint8_t *p, size_t len, bt_request *r)
{
    const uint8_t *end = p + len;
    wire_field f;
    r->has_id = r->has_status = false;
    r->status = 0;
    r->n = 0;
    r->id = p;
    r->idlen = 0;
    while (p < end) {
        if (!bt_next(&p, end, &f)) return false;
        if (f.number == 1 && f.wt == WT_LEN && !r->has_id) {
            r->id = f.p;
            r->idlen = f.len;
            r->has_id = true;
        } else if (f.number == 2 && f.wt == WT_VARINT && !r->has_status) {
            r->status = f.v;
            r->has_status = true;
        } else if (f.number == 3 && f.wt == WT_LEN && r->n < BT_MAX_METRICS) {
            bt_kv *kv = &r->kv[r->n];
            if (!parse_metric(f.p, f.p + f.len, kv)) return false;
            kv->hash = bt_hash(t, kv->k, kv->klen);
            if (duplicate_key(r, kv)) return false;
            r->n++;
        } else {
            return false;
        }
    }
    return r->has_id && utf8_ok(r->id, r->idlen);
}

/* ---- taking a heartbeat in ---- */

static int
find_metric(const bt_entry *e, const bt_kv *kv)
{
    for (uint32_t i = 0; i < e->nm; i++)
        if (e->m[i].hash == kv->hash && e->m[i].klen == kv->klen && memcmp(e->m[i].key, kv->k, kv->klen) == 0)
            return (int)i;
    return -1;
}

static int64_t
value_bytes(const bt_metric *m)
{
    return m->val ? (int64_t)m->vlen : BT_NOT_STRING;
}

static bool
reserve(bt_entry *e, uint32_t n)
{
    if (n <= e->cap) return true;
    uint32_t cap = e->cap ? e->cap : 4;
    while (cap < n) cap *= 2;
    bt_metric *m = realloc(e->m, cap * sizeof(bt_metric));
    if (!m) return false;
    e->m = m;
    e->cap = cap;
    return true;
}

static char *
copy_bytes(const void *p, size_t n)
{
    char *c = malloc(n + 1);
    if (c) memcpy(c, p, n);
    return c;
}

/* What each metric of the request does to the entry: at[i] its index (-1: a new key),
 * fresh[i] a copy to store (NULL: the value is unchanged or fits where the old one is). */
typedef struct {
    int at[BT_MAX_METRICS];
    char *fresh_key[BT_MAX_METRICS], *fresh_val[BT_MAX_METRICS];
} bt_plan;

static void
plan_free(bt_plan *pl, int n)
{
    for (int i = 0; i < n; i++) {
        free(pl->fresh_key[i]);
        free(pl->fresh_val[i]);
    }
}

/* Checks the request against the limits and makes every copy it needs: false leaves the
 * entry as it was. */
static bool
plan_metrics(flowctl_beat_table *t, bt_entry *e, const bt_request *r, bt_plan *pl, int64_t *growth)
{
    uint32_t added = 0;
    int64_t g = 0;
    for (int i = 0; i < r->n; i++) {
        const bt_kv *kv = &r->kv[i];
        if ((uint64_t)kv->klen + kv->vlen > t->max_metric_bytes) return false;
        pl->at[i] = find_metric(e, kv);
        if (pl->at[i] < 0) {
            added++;
            g += (int64_t)kv->klen + kv->vlen + 2 * BT_OBJECT;
        } else {
            g += (int64_t)kv->vlen - value_bytes(&e->m[pl->at[i]]);
        }
    }
    if ((uint64_t)e->nm + added > t->max_metrics) return false;
    if (g > 0 && t->growth + g > t->room) return false;
    if (!reserve(e, e->nm + added)) return false;
    memset(pl->fresh_key, 0, sizeof(char *) * (size_t)r->n);
    memset(pl->fresh_val, 0, sizeof(char *) * (size_t)r->n);
    for (int i = 0; i < r->n; i++) {
        const bt_kv *kv = &r->kv[i];
        const bt_metric *m = pl->at[i] < 0 ? NULL : &e->m[pl->at[i]];
        bool in_place = m && m->val && m->vlen == kv->vlen;
        if (m && in_place) continue;
        if ((!m && !(pl->fresh_key[i] = copy_bytes(kv->k, kv->klen))) ||
            !(pl->fresh_val[i] = copy_bytes(kv->v, kv->vlen))) {
            plan_free(pl, i + 1);
            return false;
        }
    }
    *growth = g;
    return true;
}

static void
commit_metrics(bt_entry *e, const bt_request *r, bt_plan *pl)
{
    for (int i = 0; i < r->n; i++) {
        const bt_kv *kv = &r->kv[i];
        bt_metric *m;
        if (pl->at[i] < 0) {
            m = &e->m[e->nm++];
            *m = (bt_metric){.key = pl->fresh_key[i], .klen = kv->klen, .hash = kv->hash, .dirty = true};
            m->val = pl->fresh_val[i];
            m->vlen = kv->vlen;
            continue;
        }
        m = &e->m[pl->at[i]];
        if (pl->fresh_val[i]) { /* a new length, or a value that was not a String */
            free(m->val);
            m->val = pl->fresh_val[i];
            m->vlen = kv->vlen;
            m->dirty = true;
        } else if (memcmp(m->val, kv->v, kv->vlen) != 0) {
            memcpy(m->val, kv->v, kv->vlen);
            m->dirty = true;
        }
    }
}

static bool
apply_locked(flowctl_beat_table *t, const bt_request *r, uint64_t h, int64_t now)
{
    bt_entry *e = *find_slot(t, h, (const char *)r->id, r->idlen);
    if (!e || e->held) return false;
    if (r->status != 0 && (e->status < 0 || r->status != (uint64_t)e->status)) return false;
    if (t->refresh > 0 && now - e->saved_at >= t->refresh) return false;
    if ((uint64_t)e->nm * (uint64_t)r->n > BT_MAX_SCAN) return false;
    bt_plan pl;
    int64_t g = 0;
    if (r->n > 0 && !plan_metrics(t, e, r, &pl, &g)) return false;
    if (r->n > 0) commit_metrics(e, r, &pl);
    e->last = now;
    e->beats++;
    e->growth += g;
    t->growth += g;
    mark_dirty(t, e);
    return true;
}

bool
flowctl_beat_table_apply(flowctl_beat_table *t, const uint8_t *p, size_t len)
{
    bt_request r;
    if (!parse_request(t, p, len, &r)) return false;
    uint64_t h = bt_hash(t, r.id, r.idlen);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts); /* Store#now: CLOCK_REALTIME in ns */
    int64_t now = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    pthread_mutex_lock(&t->mu);
    bool ok = apply_locked(t, &r, h, now);
    pthread_mutex_unlock(&t->mu);
    if (ok) atomic_fetch_add(&t->answered, 1);
    return ok;
}

static bool
hook_answer(void *ctx, const uint8_t *p, size_t len)
{
    return flowctl_beat_table_apply(ctx, p, len);
}

static void
hook_release(void *ctx)
{
    flowctl_beat_table_unref(ctx);
}

flowctl_fast_unary
flowctl_beat_table_hook(flowctl_beat_table *t)
{
    flowctl_beat_table_ref(t);
    return (flowctl_fast_unary){.answer = hook_answer, .release = hook_release, .ctx = t};
}

/* ---- Ruby's side: publish, take, drain ---- */

static bool merge_one(flowctl_beat_table *t, bt_entry *e, const flowctl_beat_metric *in);

bool
flowctl_beat_table_put(flowctl_beat_table *t, const char *id, size_t idlen, int status, int64_t saved_at,
                       const flowctl_beat_metric *m, size_t n, int64_t room)
{
    bt_entry *e = calloc(1, sizeof(*e) + idlen + 1);
    if (!e) return false;
    memcpy(e->id, id, idlen);
    e->idlen = idlen;
    e->hash = bt_hash(t, (const uint8_t *)id, idlen);
    e->status = status;
    e->saved_at = saved_at;
    bool ok = reserve(e, (uint32_t)n);
    for (size_t i = 0; i < n && ok; i++) ok = merge_one(t, e, &m[i]);
    if (!ok) {
        entry_free(e);
        return false;
    }
    pthread_mutex_lock(&t->mu);
    t->room = room;
    bt_entry **at = find_slot(t, e->hash, id, idlen);
    bt_entry *old = *at;
    if (old) {
        *at = old->next;
        mark_clean(t, old);
        hand_over_growth(t, old);
        t->n--;
    }
    e->next = t->buckets[e->hash & (t->nbuckets - 1)];
    t->buckets[e->hash & (t->nbuckets - 1)] = e;
    if (++t->n > t->nbuckets) grow_buckets(t);
    pthread_mutex_unlock(&t->mu);
    entry_free(old);
    return true;
}

void
flowctl_beat_change_free(flowctl_beat_change *c)
{
    for (size_t i = 0; i < c->n; i++) {
        free(c->m[i].key);
        free(c->m[i].val);
    }
    free(c->m);
    free(c->id);
    memset(c, 0, sizeof(*c));
}

/* The entry's changes as copies (t->mu held); false: out of memory (nothing taken). */
static bool
copy_change(const bt_entry *e, flowctl_beat_change *c)
{
    memset(c, 0, sizeof(*c));
    size_t n = 0;
    for (uint32_t i = 0; i < e->nm; i++) n += e->m[i].dirty;
    c->id = copy_bytes(e->id, e->idlen);
    c->m = n ? calloc(n, sizeof(flowctl_beat_metric)) : NULL;
    if (!c->id || (n && !c->m)) {
        flowctl_beat_change_free(c);
        return false;
    }
    for (uint32_t i = 0; i < e->nm; i++) {
        const bt_metric *m = &e->m[i];
        if (!m->dirty) continue;
        flowctl_beat_metric *out = &c->m[c->n++];
        *out = (flowctl_beat_metric){.key = copy_bytes(m->key, m->klen), .val = copy_bytes(m->val, m->vlen),
                                     .klen = m->klen, .vlen = m->vlen};
        if (!out->key || !out->val) {
            flowctl_beat_change_free(c);
            return false;
        }
    }
    c->idlen = e->idlen;
    c->last_ns = e->last;
    c->beats = e->beats;
    c->growth = e->growth;
    return true;
}

/* Ruby has the entry's changes now (t->mu held). */
static void
changes_taken(flowctl_beat_table *t, bt_entry *e)
{
    for (uint32_t i = 0; i < e->nm; i++) e->m[i].dirty = false;
    hand_over_growth(t, e);
    e->beats = 0;
    e->growth = 0;
    mark_clean(t, e);
}

int
flowctl_beat_table_take(flowctl_beat_table *t, const char *id, size_t idlen, flowctl_beat_change *out)
{
    uint64_t h = bt_hash(t, (const uint8_t *)id, idlen);
    pthread_mutex_lock(&t->mu);
    bt_entry **at = find_slot(t, h, id, idlen);
    bt_entry *e = *at;
    if (e && !copy_change(e, out)) {
        pthread_mutex_unlock(&t->mu);
        return -1;
    }
    if (e) {
        *at = e->next;
        t->n--;
        mark_clean(t, e);
        hand_over_growth(t, e);
    }
    pthread_mutex_unlock(&t->mu);
    entry_free(e);
    return e ? 1 : 0;
}

long
flowctl_beat_table_drain(flowctl_beat_table *t, const char *id, size_t idlen, flowctl_beat_change **out)
{
    *out = NULL;
    pthread_mutex_lock(&t->mu);
    bt_entry *one = NULL;
    if (idlen != (size_t)-1) {
        one = *find_slot(t, bt_hash(t, (const uint8_t *)id, idlen), id, idlen);
        if (!one || !one->dirty) {
            pthread_mutex_unlock(&t->mu);
            return 0;
        }
    }
    size_t n = 0;
    if (one) n = 1;
    else for (bt_entry *e = t->dirty; e; e = e->dnext) n++;
    flowctl_beat_change *c = n ? calloc(n, sizeof(*c)) : NULL;
    size_t k = 0;
    bool ok = n == 0 || c != NULL;
    for (bt_entry *e = one ? one : t->dirty; ok && e && k < n; e = one ? NULL : e->dnext) ok = copy_change(e, &c[k++]);
    if (ok) { /* all copied: now they are Ruby's */
        bt_entry *next;
        for (bt_entry *e = one ? one : t->dirty; e; e = next) {
            next = one ? NULL : e->dnext;
            changes_taken(t, e);
        }
    }
    pthread_mutex_unlock(&t->mu);
    if (!ok) {
        for (size_t i = 0; i < k; i++) flowctl_beat_change_free(&c[i]);
        free(c);
        return -1;
    }
    *out = c;
    return (long)n;
}

/* ---- a heartbeat through Ruby: hold, change, release ---- */

int
flowctl_beat_table_hold(flowctl_beat_table *t, const char *id, size_t idlen, flowctl_beat_change *out)
{
    uint64_t h = bt_hash(t, (const uint8_t *)id, idlen);
    pthread_mutex_lock(&t->mu);
    bt_entry *e = *find_slot(t, h, id, idlen);
    int found = !e ? 0 : !e->dirty ? 1 : copy_change(e, out) ? 2 : -1;
    if (found > 0) {
        if (found == 2) changes_taken(t, e);
        e->held = true;
    }
    pthread_mutex_unlock(&t->mu);
    return found;
}

/* Stores one metric as Ruby merged it (not dirty: Ruby has it); false: out of memory. */
static bool
merge_one(flowctl_beat_table *t, bt_entry *e, const flowctl_beat_metric *in)
{
    bt_kv kv = {.k = (const uint8_t *)in->key, .klen = in->klen};
    kv.hash = bt_hash(t, kv.k, kv.klen);
    int at = find_metric(e, &kv);
    char *val = NULL;
    if (in->val && !(at >= 0 && e->m[at].val && e->m[at].vlen == in->vlen)) {
        if (!(val = copy_bytes(in->val, in->vlen))) return false;
    }
    if (at < 0) {
        char *key = copy_bytes(in->key, in->klen);
        if (!key || !reserve(e, e->nm + 1)) {
            free(key);
            free(val);
            return false;
        }
        e->m[e->nm++] = (bt_metric){.key = key, .klen = in->klen, .hash = kv.hash, .val = val, .vlen = in->vlen};
        return true;
    }
    bt_metric *m = &e->m[at];
    if (!in->val) { /* not a String: counted as 8 bytes, never sent back */
        free(m->val);
        m->val = NULL;
        m->vlen = 0;
    } else if (val) {
        free(m->val);
        m->val = val;
        m->vlen = in->vlen;
    } else {
        memcpy(m->val, in->val, in->vlen);
    }
    return true;
}

bool
flowctl_beat_table_release(flowctl_beat_table *t, const char *id, size_t idlen, int status, int64_t saved_at,
                           const flowctl_beat_metric *m, size_t n, int64_t room)
{
    uint64_t h = bt_hash(t, (const uint8_t *)id, idlen);
    pthread_mutex_lock(&t->mu);
    t->room = room;
    bt_entry **at = find_slot(t, h, id, idlen);
    bt_entry *e = *at;
    bool ok = true;
    if (e) {
        e->held = false;
        e->status = status;
        e->saved_at = saved_at;
        for (size_t i = 0; i < n && ok; i++) ok = merge_one(t, e, &m[i]);
        if (!ok) { /* its metrics here are not Ruby's: out of the table, its heartbeats are Ruby's */
            *at = e->next;
            t->n--;
            mark_clean(t, e); /* held: nothing came in since hold */
        }
    }
    pthread_mutex_unlock(&t->mu);
    if (!ok) entry_free(e);
    return ok;
}
