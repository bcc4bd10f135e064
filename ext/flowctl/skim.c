/*
 * skim.c — is this the wire format of a message of that type? Without Ruby, without allocating.
 *
 * Forwarded messages (forward.c) go from one call to the next as bytes; what the decoder
 * (convert.c, flowctl_decode_into) would refuse must still fail as it would have failed in
 * the process that forwards them. So this walks the bytes with the same checks in the same
 * order: field keys (at most 5 bytes, numbers 1 to 2^29-1), varints, fixed values, lengths
 * within the data, wire types (a known field number with another wire type is an unknown
 * field and skipped, as the decoder does), groups (matched, nested at most 100 deep), UTF-8
 * of string fields (strict, as Ruby's UTF-8 reads it), Timestamp ranges, messages nested at
 * most 100 deep; and writes the decoder's words for the first failure. Nothing is built.
 */
#include "flowctl.h"
#include "wire.h"
#include <stdarg.h>
#include <stdio.h>

#define MAX_DEPTH 100
#define TIMESTAMP_MIN (-62135596800LL)
#define TIMESTAMP_MAX (253402300799LL)

typedef struct {
    const uint8_t *p, *end;
} sbuf;

typedef struct {
    flowctl_skim_error *err;
    const ProtobufCMessageDescriptor *desc; /* the message being read (for the error) */
} skim;

static bool
fail(skim *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->err->why, sizeof(s->err->why), fmt, ap);
    va_end(ap);
    s->err->desc = s->desc;
    return false;
}

static bool
sk_varint(skim *s, sbuf *r, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (r->p >= r->end) return fail(s, "truncated input (varint)");
        uint8_t byte = *r->p++;
        if (shift == 63 && byte > 1) return fail(s, "malformed varint");
        v |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *out = v;
            return true;
        }
    }
    return fail(s, "malformed varint");
}

static bool
sk_fixed(skim *s, sbuf *r, unsigned n, uint64_t *out)
{
    if ((size_t)(r->end - r->p) < n) return fail(s, "truncated input (fixed32)"); /* the decoder reads fixed64 as two */
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++) v |= (uint64_t)r->p[i] << (8 * i);
    r->p += n;
    *out = v;
    return true;
}

static bool
sk_tag(skim *s, sbuf *r, uint64_t *tag)
{
    const uint8_t *start = r->p;
    if (!sk_varint(s, r, tag)) return false;
    if (r->p - start > 5) return fail(s, "malformed field key (%d bytes)", (int)(r->p - start));
    if ((*tag >> 3) == 0 || (*tag >> 3) > 536870911)
        return fail(s, "invalid field number %llu", (unsigned long long)(*tag >> 3));
    return true;
}

static bool
sk_len(skim *s, sbuf *r, const char *field, sbuf *sub)
{
    uint64_t n;
    if (!sk_varint(s, r, &n)) return false;
    if (n > (uint64_t)(r->end - r->p)) return fail(s, "truncated input (field '%s' is longer than the data)", field);
    sub->p = r->p;
    sub->end = r->p + n;
    r->p += n;
    return true;
}

static bool
sk_skip(skim *s, sbuf *r, int wt, uint32_t number, int depth)
{
    uint64_t v;
    sbuf sub = {NULL, NULL};
    switch (wt) {
    case WT_VARINT: return sk_varint(s, r, &v);
    case WT_I64: return sk_fixed(s, r, 8, &v);
    case WT_I32: return sk_fixed(s, r, 4, &v);
    case WT_LEN: return sk_len(s, r, "unknown", &sub);
    case WT_SGROUP:
        if (depth > MAX_DEPTH) return fail(s, "groups nested too deep");
        for (;;) {
            uint64_t tag;
            if (!sk_tag(s, r, &tag)) return false;
            if ((tag & 7) == WT_EGROUP) return (tag >> 3) == number || fail(s, "mismatched end of group");
            if (!sk_skip(s, r, (int)(tag & 7), (uint32_t)(tag >> 3), depth + 1)) return false;
        }
    default: return fail(s, "invalid wire type %d", wt);
    }
}

static bool sk_msg(skim *s, const ProtobufCMessageDescriptor *desc, sbuf *r, int depth);

static bool
sk_timestamp(skim *s, const char *field, sbuf r)
{
    int64_t sec = 0, nsec = 0;
    while (r.p < r.end) {
        uint64_t tag, v;
        if (!sk_tag(s, &r, &tag)) return false;
        int wt = (int)(tag & 7);
        uint32_t num = (uint32_t)(tag >> 3);
        if ((num != 1 && num != 2) || wt != WT_VARINT) {
            if (!sk_skip(s, &r, wt, num, 0)) return false;
            continue;
        }
        if (!sk_varint(s, &r, &v)) return false;
        if (num == 1) sec = (int64_t)v;
        else nsec = (int32_t)v;
    }
    /* a Timestamp seen twice is merged by the decoder; checking each on its own refuses
     * the same (what an earlier one set has passed already) */
    if (nsec < 0 || nsec > 999999999)
        return fail(s, "Timestamp field '%s' has nanos %lld outside 0..999999999", field, (long long)nsec);
    if (sec < TIMESTAMP_MIN || sec > TIMESTAMP_MAX)
        return fail(s, "Timestamp field '%s' has seconds %lld outside years 1..9999", field, (long long)sec);
    return true;
}

/* One value of type fd (its wire type already checked); field names the outer field. */
static bool
sk_value(skim *s, const ProtobufCFieldDescriptor *fd, const char *field, sbuf *r, int depth)
{
    uint64_t v;
    sbuf sub = {NULL, NULL};
    switch (fd->type) {
    case PROTOBUF_C_TYPE_STRING:
        if (!sk_len(s, r, field, &sub)) return false;
        return wire_utf8_valid(sub.p, sub.end) || fail(s, "invalid UTF-8 in string field '%s'", field);
    case PROTOBUF_C_TYPE_BYTES: return sk_len(s, r, field, &sub);
    case PROTOBUF_C_TYPE_MESSAGE:
        if (!sk_len(s, r, field, &sub)) return false;
        if (flowctl_field_is_timestamp(fd)) return sk_timestamp(s, field, sub);
        return sk_msg(s, fd->descriptor, &sub, depth + 1);
    case PROTOBUF_C_TYPE_DOUBLE: case PROTOBUF_C_TYPE_SFIXED64: case PROTOBUF_C_TYPE_FIXED64:
        return sk_fixed(s, r, 8, &v);
    case PROTOBUF_C_TYPE_FLOAT: case PROTOBUF_C_TYPE_SFIXED32: case PROTOBUF_C_TYPE_FIXED32:
        return sk_fixed(s, r, 4, &v);
    default: return sk_varint(s, r, &v);
    }
}

/* A map entry: key (1) and value (2), anything else skipped; errors name the map's message. */
static bool
sk_map_entry(skim *s, const ProtobufCFieldDescriptor *fd, sbuf r, int depth)
{
    const ProtobufCMessageDescriptor *entry = fd->descriptor;
    while (r.p < r.end) {
        uint64_t tag;
        if (!sk_tag(s, &r, &tag)) return false;
        int wt = (int)(tag & 7);
        uint32_t num = (uint32_t)(tag >> 3);
        const ProtobufCFieldDescriptor *kv = num == 1 ? &entry->fields[0] : num == 2 ? &entry->fields[1] : NULL;
        bool ok = !kv || wt != flowctl_wire_type(kv->type) ? sk_skip(s, &r, wt, num, depth)
                                                      : sk_value(s, kv, fd->name, &r, depth);
        if (!ok) return false;
    }
    return true;
}

static bool
sk_field(skim *s, const ProtobufCFieldDescriptor *fd, sbuf *r, int wt, int depth)
{
    int expected = flowctl_wire_type(fd->type);
    bool repeated = fd->label == PROTOBUF_C_LABEL_REPEATED;
    bool map = repeated && fd->type == PROTOBUF_C_TYPE_MESSAGE && flowctl_desc_is_map_entry(fd->descriptor);
    bool packed = repeated && !map && wt == WT_LEN && expected != WT_LEN;
    if (wt != expected && !packed) return sk_skip(s, r, wt, fd->id, depth);
    sbuf sub = {NULL, NULL};
    if (map) return sk_len(s, r, fd->name, &sub) && sk_map_entry(s, fd, sub, depth);
    if (packed) {
        if (!sk_len(s, r, fd->name, &sub)) return false;
        while (sub.p < sub.end)
            if (!sk_value(s, fd, fd->name, &sub, depth)) return false;
        return true;
    }
    return sk_value(s, fd, fd->name, r, depth);
}

static bool
sk_msg(skim *s, const ProtobufCMessageDescriptor *desc, sbuf *r, int depth)
{
    const ProtobufCMessageDescriptor *outer = s->desc;
    s->desc = desc;
    if (depth > MAX_DEPTH) return fail(s, "messages nested too deep");
    while (r->p < r->end) {
        uint64_t tag;
        if (!sk_tag(s, r, &tag)) return false;
        int wt = (int)(tag & 7);
        uint32_t num = (uint32_t)(tag >> 3);
        if (wt == WT_EGROUP) return fail(s, "unexpected end of group");
        const ProtobufCFieldDescriptor *fd = protobuf_c_message_descriptor_get_field(desc, num);
        if (!(fd ? sk_field(s, fd, r, wt, depth) : sk_skip(s, r, wt, num, depth))) return false;
    }
    s->desc = outer;
    return true;
}

bool
flowctl_skim(const ProtobufCMessageDescriptor *desc, const uint8_t *p, size_t len, flowctl_skim_error *err)
{
    skim s = {.err = err, .desc = desc};
    sbuf r = {p, p + len};
    return sk_msg(&s, desc, &r, 0);
}
