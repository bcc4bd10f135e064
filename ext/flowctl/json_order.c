/*
 * json_order.c — the order in which google-protobuf 3.21 prints a map's entries.
 *
 * upb keeps every map in a string-keyed hash table and its JSON printer walks that
 * table's slots from first to last, so the text follows the table, not the order the
 * entries came in. To print the same bytes we lay the keys out as upb would and read
 * the slots back. What upb 3.21 does, as measured against the installed gem
 * (spec/message_json_order_spec.rb compares thousands of maps of every key type):
 *   - a key is hashed as bytes (a string's; an integer's in memory, 1, 4 or 8 bytes)
 *     with a wyhash-style hash, seed 0 (the same in every process), cut to 32 bits;
 *   - the table starts with 8 slots and doubles when an insert finds it holding
 *     85% of its slots (6 of 8, 13 of 16, ...), re-inserting in slot order;
 *   - an entry's main slot is hash & (slots - 1). When it is taken, a free slot is
 *     searched for after it, then from the start. If the occupant sits in its own main
 *     slot, the new entry goes to the free slot, second in the occupant's chain;
 *     otherwise the occupant moves to the free slot and the new entry takes its place.
 * A leaf: no Ruby, nothing of ours.
 */
#include "json_text.h"
#include <stdlib.h>

static const uint64_t SALT[5] = {
    0x243F6A8885A308D3ULL, 0x13198A2E03707344ULL, 0xA4093822299F31D0ULL,
    0x082EFA98EC4E6C89ULL, 0x452821E638D01377ULL,
};

static uint64_t
load64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static uint64_t
load32(const char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The 128-bit product of a and b, its halves folded together. */
static uint64_t
mix(uint64_t a, uint64_t b)
{
    unsigned __int128 prod = (unsigned __int128)a * b;
    return (uint64_t)prod ^ (uint64_t)(prod >> 64);
}

static uint32_t
key_hash(const char *p, size_t len)
{
    uint64_t state = SALT[0];
    const uint64_t total = len;
    if (len > 64) {
        uint64_t other = state;
        do {
            state = mix(load64(p) ^ SALT[1], load64(p + 8) ^ state) ^ mix(load64(p + 16) ^ SALT[2], load64(p + 24) ^ state);
            other = mix(load64(p + 32) ^ SALT[3], load64(p + 40) ^ other) ^ mix(load64(p + 48) ^ SALT[4], load64(p + 56) ^ other);
            p += 64;
            len -= 64;
        } while (len > 64);
        state ^= other;
    }
    for (; len > 16; p += 16, len -= 16) state = mix(load64(p) ^ SALT[1], load64(p + 8) ^ state);
    uint64_t a = 0, b = 0;
    if (len > 8) {
        a = load64(p);
        b = load64(p + len - 8);
    } else if (len > 3) {
        a = load32(p);
        b = load32(p + len - 4);
    } else if (len > 0) {
        a = ((uint64_t)(uint8_t)p[0] << 16) | ((uint64_t)(uint8_t)p[len >> 1] << 8) | (uint8_t)p[len - 1];
    }
    return (uint32_t)mix(mix(a ^ SALT[1], b ^ state), SALT[1] ^ total);
}

#define EMPTY UINT32_MAX
#define SCRATCH 512 /* uint32_t words on the stack: maps of up to 54 entries need no malloc */

typedef struct {
    uint32_t size, count, max;
    uint32_t *entry;        /* slot -> index of the key there, or EMPTY */
    uint32_t *next;         /* slot -> next slot of its chain, or EMPTY */
    const uint32_t *hash;   /* key index -> its hash */
} table;

/* The table at 2 * size words of mem. */
static void
table_init(table *t, uint32_t size, uint32_t *mem)
{
    t->size = size;
    t->count = 0;
    t->max = (uint32_t)((double)size * 0.85);
    t->entry = mem;
    t->next = mem + size;
    for (uint32_t i = 0; i < 2 * size; i++) mem[i] = EMPTY;
}

static uint32_t
free_slot_after(const table *t, uint32_t from)
{
    for (uint32_t s = from + 1; s < t->size; s++)
        if (t->entry[s] == EMPTY) return s;
    for (uint32_t s = 0; s < t->size; s++)
        if (t->entry[s] == EMPTY) return s;
    return EMPTY; /* cannot happen: the table is never full */
}

static void
table_put(table *t, uint32_t key)
{
    uint32_t mask = t->size - 1, main = t->hash[key] & mask;
    t->count++;
    if (t->entry[main] == EMPTY) {
        t->entry[main] = key;
        t->next[main] = EMPTY;
        return;
    }
    uint32_t spare = free_slot_after(t, main);
    uint32_t head = t->hash[t->entry[main]] & mask; /* where the occupant's chain starts */
    if (head == main) {
        t->entry[spare] = key;
        t->next[spare] = t->next[main];
        t->next[main] = spare;
        return;
    }
    t->entry[spare] = t->entry[main];
    t->next[spare] = t->next[main];
    uint32_t s = head;
    while (t->next[s] != main) s = t->next[s];
    t->next[s] = spare;
    t->entry[main] = key;
    t->next[main] = EMPTY;
}

/* Doubles the table into mem, re-inserting its keys in slot order (as upb resizes). */
static void
table_grow(table *t, uint32_t *mem)
{
    table bigger = {.hash = t->hash};
    table_init(&bigger, t->size * 2, mem);
    for (uint32_t s = 0; s < t->size; s++)
        if (t->entry[s] != EMPTY) table_put(&bigger, t->entry[s]);
    *t = bigger;
}

bool
json_upb_map_order(const json_key *keys, size_t n, size_t *order)
{
    if (n < 2) {
        if (n == 1) order[0] = 0;
        return true;
    }
    if (n >= UINT32_MAX / 8) return false;
    uint32_t last = 8; /* the size the table ends at */
    while ((uint32_t)((double)last * 0.85) < n) last *= 2;
    /* the hashes, then two areas for tables (one grows into the other), each 2 * last words */
    size_t words = n + 4 * (size_t)last;
    uint32_t stack[SCRATCH], *mem = words <= SCRATCH ? stack : malloc(words * sizeof(uint32_t));
    if (!mem) return false;
    uint32_t *hash = mem, *area[2] = {mem + n, mem + n + 2 * last};
    int cur = 0;
    table t = {.hash = hash};
    table_init(&t, 8, area[cur]);
    for (uint32_t i = 0; i < n; i++) {
        hash[i] = key_hash(keys[i].p, keys[i].len);
        if (t.count == t.max) table_grow(&t, area[cur ^= 1]);
        table_put(&t, i);
    }
    size_t out = 0;
    for (uint32_t s = 0; s < t.size; s++)
        if (t.entry[s] != EMPTY) order[out++] = t.entry[s];
    if (mem != stack) free(mem);
    return true;
}
