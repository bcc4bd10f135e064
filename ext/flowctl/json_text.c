/*
 * json_text.c — the scalar forms of proto3 JSON as google-protobuf 3.21 (upb) prints
 * them, into a jbuf (json_text.h). A leaf: no Ruby, nothing of ours.
 */
#include "json_text.h"
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

bool
jb_grow(jbuf *b, size_t more)
{
    if (b->failed) return false;
    size_t cap = b->cap * 2;
    while (cap < b->len + more) cap *= 2;
    char *p = b->heap ? realloc(b->p, cap) : malloc(cap);
    if (!p) {
        b->failed = true;
        return false;
    }
    if (!b->heap) memcpy(p, b->p, b->len);
    b->p = p;
    b->cap = cap;
    b->heap = true;
    return true;
}

void
jb_free(jbuf *b)
{
    if (b->heap) free(b->p);
    b->heap = false;
}

/* 1 for the bytes a JSON string cannot hold as they are: controls, '"' and '\\'. */
static const uint8_t needs_escape[256] = {
    [0 ... 0x1f] = 1, ['"'] = 1, ['\\'] = 1,
};

void
jb_string(jbuf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const uint8_t *u = (const uint8_t *)s;
    jb_char(b, '"');
    size_t i = 0, run = 0; /* bytes from run to i need no escape: written in one piece */
    for (;;) {
        while (i < n && !needs_escape[u[i]]) i++;
        jb_put(b, s + run, i - run);
        if (i == n) break;
        unsigned char c = u[i++];
        run = i;
        switch (c) {
        case '"': jb_lit(b, "\\\""); break;
        case '\\': jb_lit(b, "\\\\"); break;
        case '\n': jb_lit(b, "\\n"); break;
        case '\r': jb_lit(b, "\\r"); break;
        case '\t': jb_lit(b, "\\t"); break;
        case '\f': jb_lit(b, "\\f"); break;
        case '\b': jb_lit(b, "\\b"); break;
        default: {
            char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            jb_put(b, esc, 6);
        }
        }
    }
    jb_char(b, '"');
}

void
jb_base64(jbuf *b, const uint8_t *s, size_t n)
{
    static const char digits[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t need = (n + 2) / 3 * 4 + 2;
    if (b->len + need > b->cap && !jb_grow(b, need)) return;
    char *d = b->p + b->len;
    *d++ = '"';
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = ((uint32_t)s[i] << 16) | ((uint32_t)s[i + 1] << 8) | s[i + 2];
        *d++ = digits[v >> 18];
        *d++ = digits[(v >> 12) & 63];
        *d++ = digits[(v >> 6) & 63];
        *d++ = digits[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)s[i] << 16 | (i + 1 < n ? (uint32_t)s[i + 1] << 8 : 0);
        *d++ = digits[v >> 18];
        *d++ = digits[(v >> 12) & 63];
        *d++ = i + 1 < n ? digits[(v >> 6) & 63] : '=';
        *d++ = '=';
    }
    *d++ = '"';
    b->len = (size_t)(d - b->p);
}

static bool
special(jbuf *b, double d)
{
    if (isnan(d)) jb_lit(b, "\"NaN\"");
    else if (isinf(d)) d > 0 ? jb_lit(b, "\"Infinity\"") : jb_lit(b, "\"-Infinity\"");
    else return false;
    return true;
}

void
jb_double(jbuf *b, double d)
{
    if (special(b, d)) return;
    char s[40];
    int n = snprintf(s, sizeof(s), "%.15g", d);
    if (strtod(s, NULL) != d) n = snprintf(s, sizeof(s), "%.17g", d);
    jb_put(b, s, (size_t)n);
}

/* Whether text reads back (as a float) to the float d holds. */
static bool
float_reads_back(const char *s, double d)
{
    double x = strtod(s, NULL);
    if (fabs(x) > FLT_MAX) return false;
    return (double)(float)x == d;
}

void
jb_float(jbuf *b, double d)
{
    if (special(b, d)) return;
    char s[40];
    int n = snprintf(s, sizeof(s), "%.6g", d);
    if (!float_reads_back(s, d)) n = snprintf(s, sizeof(s), "%.9g", d);
    jb_put(b, s, (size_t)n);
}

void
jb_int(jbuf *b, int64_t v, bool quoted)
{
    char s[24];
    int n = snprintf(s, sizeof(s), quoted ? "\"%lld\"" : "%lld", (long long)v);
    jb_put(b, s, (size_t)n);
}

void
jb_uint(jbuf *b, uint64_t v, bool quoted)
{
    char s[24];
    int n = snprintf(s, sizeof(s), quoted ? "\"%llu\"" : "%llu", (unsigned long long)v);
    jb_put(b, s, (size_t)n);
}

/* Year, month and day of a day count from 1970-01-01 (proleptic Gregorian). */
static void
civil_from_days(int64_t days, int64_t *y, unsigned *m, unsigned *d)
{
    days += 719468;
    int64_t era = (days >= 0 ? days : days - 146096) / 146097;
    unsigned doe = (unsigned)(days - era * 146097);
    unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    unsigned mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (int64_t)yoe + era * 400 + (*m <= 2);
}

#define TIMESTAMP_MIN (-62135596800LL) /* 0001-01-01T00:00:00Z */
#define TIMESTAMP_MAX (253402300799LL) /* 9999-12-31T23:59:59Z */

bool
jb_timestamp(jbuf *b, int64_t sec, long nsec)
{
    if (sec < TIMESTAMP_MIN || sec > TIMESTAMP_MAX || nsec < 0 || nsec > 999999999) return false;
    int64_t days = sec >= 0 ? sec / 86400 : -((-sec + 86399) / 86400);
    int64_t rest = sec - days * 86400, y;
    unsigned m, d;
    civil_from_days(days, &y, &m, &d);
    char s[48];
    int n = snprintf(s, sizeof(s), "\"%04lld-%02u-%02uT%02u:%02u:%02u", (long long)y, m, d,
                     (unsigned)(rest / 3600), (unsigned)(rest / 60 % 60), (unsigned)(rest % 60));
    if (nsec == 0) n += snprintf(s + n, sizeof(s) - (size_t)n, "Z\"");
    else if (nsec % 1000000 == 0) n += snprintf(s + n, sizeof(s) - (size_t)n, ".%03ldZ\"", nsec / 1000000);
    else if (nsec % 1000 == 0) n += snprintf(s + n, sizeof(s) - (size_t)n, ".%06ldZ\"", nsec / 1000);
    else n += snprintf(s + n, sizeof(s) - (size_t)n, ".%09ldZ\"", nsec);
    jb_put(b, s, (size_t)n);
    return true;
}
