/*
 * json_text.h — proto3 JSON text without Ruby: a growing byte buffer, the scalar forms
 * google-protobuf 3.21 (upb) prints (json_text.c), and the order upb's maps iterate
 * their entries in (json_order.c). Leaves: they depend on nothing of ours.
 */
#ifndef FLOWCTL_JSON_TEXT_H
#define FLOWCTL_JSON_TEXT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* Starts in a caller's (stack) array and moves to malloc'd memory when that is full;
 * `failed` once memory ran out (what is written after that is dropped). */
typedef struct jbuf {
    char *p;
    size_t len, cap;
    bool heap, failed;
} jbuf;

bool jb_grow(jbuf *b, size_t more);
void jb_free(jbuf *b);

static inline void
jb_put(jbuf *b, const char *s, size_t n)
{
    if (b->len + n > b->cap && !jb_grow(b, n)) return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static inline void
jb_char(jbuf *b, char c)
{
    if (b->len + 1 > b->cap && !jb_grow(b, 1)) return;
    b->p[b->len++] = c;
}

#define jb_lit(b, s) jb_put((b), (s), sizeof(s) - 1)

/* A JSON string ("..."): upb's escapes (\" \\ \b \f \n \r \t, \u00xx for the other
 * controls); s must be valid UTF-8. */
void jb_string(jbuf *b, const char *s, size_t n);
/* Standard base64 with padding, in quotes. */
void jb_base64(jbuf *b, const uint8_t *s, size_t n);
/* A double as upb prints it: %.15g, or %.17g when that does not read back; NaN and the
 * infinities quoted ("NaN", "Infinity", "-Infinity"). */
void jb_double(jbuf *b, double d);
/* A float field's value (a double holding a float): %.6g, or %.9g when that does not read
 * back as the same float. */
void jb_float(jbuf *b, double d);
void jb_int(jbuf *b, int64_t v, bool quoted);
void jb_uint(jbuf *b, uint64_t v, bool quoted);
/* A Timestamp as upb prints it: "YYYY-MM-DDTHH:MM:SS[.fff|.ffffff|.fffffffff]Z" (quoted);
 * false (nothing written) outside years 1 to 9999 or for nanos outside 0..999999999. */
bool jb_timestamp(jbuf *b, int64_t sec, long nsec);

/*
 * The order in which google-protobuf 3.21 (upb) iterates, and so prints, a map whose n
 * entries were inserted in the order given (upb's strtable: its hash of the key's bytes,
 * chained scatter with Brent's variation, 8 slots to start, doubling at 85% load). A
 * key is its bytes: a string's, or an integer's in native byte order and its C size
 * (4 for the 32-bit types, 8 for the 64-bit ones, 1 for bool). order[i] gets the index
 * of the i-th entry printed. false when out of memory.
 */
typedef struct {
    const char *p;
    size_t len;
} json_key;
bool json_upb_map_order(const json_key *keys, size_t n, size_t *order);

#endif /* FLOWCTL_JSON_TEXT_H */
