/*
 * wire.h — the protobuf wire format, written and read without Ruby.
 *
 * The writer (wbuf) is shared by convert.c (message classes) and the heartbeat
 * thread's encoder (heartbeat_wire.c). It writes into a buffer of fixed size; once that
 * is full it only counts, so a first pass can size the buffer of a second one. The
 * reader (wire_next) walks the fields of a message and never raises: it returns false
 * on malformed input, for native threads that cannot raise.
 */
#ifndef FLOWCTL_WIRE_H
#define FLOWCTL_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_SGROUP = 3, WT_EGROUP = 4, WT_I32 = 5 };

typedef struct {
    char *p;
    size_t len, cap;
    bool counting; /* out of room: only b->len advances */
} wbuf;

/* Where n bytes go, or NULL while only counting. */
static inline char *
wb_dst(wbuf *b, size_t n)
{
    if (b->counting || b->len + n > b->cap) {
        b->counting = true;
        b->len += n;
        return NULL;
    }
    char *d = b->p + b->len;
    b->len += n;
    return d;
}

static inline void
wb_byte(wbuf *b, uint8_t c)
{
    char *d = wb_dst(b, 1);
    if (d) *d = (char)c;
}

static inline void
wb_varint(wbuf *b, uint64_t v)
{
    uint8_t tmp[10], n = 0;
    while (v >= 0x80) { tmp[n++] = (uint8_t)(v | 0x80); v >>= 7; }
    tmp[n++] = (uint8_t)v;
    char *d = wb_dst(b, n);
    if (d) memcpy(d, tmp, n);
}

static inline void
wb_bytes(wbuf *b, const void *src, size_t n)
{
    char *d = wb_dst(b, n);
    if (d) memcpy(d, src, n);
}

static inline void
wb_fixed32(wbuf *b, uint32_t v)
{
    uint8_t x[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    wb_bytes(b, x, 4);
}

static inline void
wb_fixed64(wbuf *b, uint64_t v)
{
    uint8_t x[8];
    for (int i = 0; i < 8; i++) x[i] = (uint8_t)(v >> (8 * i));
    wb_bytes(b, x, 8);
}

/* A length-delimited value: its length and bytes, with one bounds check. */
static inline void
wb_lenbytes(wbuf *b, const char *src, size_t n)
{
    uint8_t tmp[10], vs = 0;
    uint64_t v = n;
    while (v >= 0x80) { tmp[vs++] = (uint8_t)(v | 0x80); v >>= 7; }
    tmp[vs++] = (uint8_t)v;
    char *d = wb_dst(b, vs + n);
    if (d) {
        memcpy(d, tmp, vs);
        memcpy(d + vs, src, n);
    }
}

static inline void
wb_tag(wbuf *b, uint32_t number, int wt)
{
    wb_varint(b, ((uint64_t)number << 3) | (uint64_t)wt);
}

static inline unsigned
varint_size(uint64_t v)
{
    unsigned n = 1;
    while (v >= 0x80) { v >>= 7; n++; }
    return n;
}

/* Length-delimited nesting: reserve one byte for the length, fix it up afterwards. */
static inline size_t
wb_open(wbuf *b)
{
    size_t at = b->len;
    wb_dst(b, 1);
    return at;
}

static inline void
wb_close(wbuf *b, size_t at)
{
    size_t n = b->len - at - 1;
    unsigned vs = varint_size(n);
    if (b->counting) {
        b->len += vs - 1;
        return;
    }
    if (vs > 1) {
        if (!wb_dst(b, vs - 1)) return; /* no room to move it: the second pass writes it */
        memmove(b->p + at + vs, b->p + at + 1, n);
    }
    uint8_t *p = (uint8_t *)b->p + at;
    while (n >= 0x80) { *p++ = (uint8_t)(n | 0x80); n >>= 7; }
    *p = (uint8_t)n;
}

/* One field read by wire_next: its number and wire type, and either its varint or
 * fixed value (v) or its bytes (p, len) for a length-delimited one. */
typedef struct {
    uint32_t number;
    int wt;
    uint64_t v;
    const uint8_t *p;
    size_t len;
} wire_field;

static inline bool
wire_varint(const uint8_t **p, const uint8_t *end, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t byte = *(*p)++;
        v |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *out = v;
            return true;
        }
    }
    return false;
}

/* Reads the field at *p (advancing it); false at the end of the data or when malformed.
 * Groups count as malformed: no message the native code reads has one. */
static inline bool
wire_next(const uint8_t **p, const uint8_t *end, wire_field *f)
{
    uint64_t tag;
    if (*p >= end || !wire_varint(p, end, &tag) || (tag >> 3) == 0 || (tag >> 3) > 536870911) return false;
    f->number = (uint32_t)(tag >> 3);
    f->wt = (int)(tag & 7);
    f->p = NULL;
    f->len = 0;
    f->v = 0;
    size_t fixed = f->wt == WT_I64 ? 8 : f->wt == WT_I32 ? 4 : 0;
    if (f->wt == WT_VARINT) return wire_varint(p, end, &f->v);
    if (fixed) {
        if ((size_t)(end - *p) < fixed) return false;
        for (size_t i = 0; i < fixed; i++) f->v |= (uint64_t)(*p)[i] << (8 * i);
        *p += fixed;
        return true;
    }
    if (f->wt != WT_LEN || !wire_varint(p, end, &f->v) || f->v > (uint64_t)(end - *p)) return false;
    f->p = *p;
    f->len = (size_t)f->v;
    *p += f->len;
    return true;
}

/* Strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF. */
static inline bool
wire_utf8_valid(const uint8_t *p, const uint8_t *end)
{
    while (p < end) {
        uint8_t c = *p;
        if (c < 0x80) {
            p++;
            continue;
        }
        size_t n = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
        if (n == 0 || (size_t)(end - p) < n) return false;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c == 0xE0) lo = 0xA0;
        else if (c == 0xED) hi = 0x9F;
        else if (c == 0xF0) lo = 0x90;
        else if (c == 0xF4) hi = 0x8F;
        if (p[1] < lo || p[1] > hi) return false;
        for (size_t i = 2; i < n; i++)
            if ((p[i] & 0xC0) != 0x80) return false;
        p += n;
    }
    return true;
}

#endif /* FLOWCTL_WIRE_H */
