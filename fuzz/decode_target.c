/*
 * decode_target.c — libFuzzer target: the input bytes decoded as every message type.
 *
 * The first byte of an input picks the message class, the rest is decoded.
 * Checks:
 *   - Klass.decode(bytes) returns a message or raises Flowctl::DecodeError; anything
 *     else, and any ASan/UBSan/LSan report, is a bug;
 *   - a decoded message re-encodes, decode(encode(x)) == x, and re-encoding gives the
 *     same bytes;
 *   - the reference, the official google-protobuf gem (upb) with the classes protoc
 *     generated from the same protos (spec/gen), accepts exactly what flowctl accepts,
 *     and what upb decoded, encoded by upb, decodes in flowctl to the same message.
 *     Known differences, counted and printed at exit (fuzz/README.md):
 *       - flowctl rejects a Timestamp outside years 1..9999 or with nanos outside
 *         0..999999999 (Ruby's Time could not give it back);
 *       - flowctl rejects a 10-byte varint whose last byte is above 1 (as protobuf-go
 *         does; upb and C++ drop the extra bits);
 *       - upb drops a map entry that holds unknown fields (it keeps the entry's bytes
 *         as an unknown field of the parent); flowctl, like C++ and protobuf-go, keeps
 *         the entry and skips its unknown fields. Such inputs are not given to upb at
 *         all: google-protobuf 3.21.12 segfaults on some of them;
 *       - nesting limits: flowctl allows 100 levels, upb 64 by default (upb is asked
 *         again with a higher recursion_limit before anything is called a bug);
 *   - protobuf-c's protobuf_c_message_unpack of the same bytes agrees on accept/reject
 *     wherever it agrees with upb; when both accept, what protobuf-c packs again decodes
 *     to the same message. Where protobuf-c and upb differ (protobuf-c accepts invalid
 *     UTF-8 and any Timestamp; it rejects a known field number with another wire type,
 *     except for bool fields, and groups) the case is counted and printed at exit.
 *   - skim.c (the check a forwarded message gets, without Ruby) accepts exactly what the
 *     decoder accepts, and says what the decoder says (the DecodeError's text ends with it).
 *   - Message#peek on a lazily decoded copy (an unknown 600-byte field in front makes it
 *     large) gives every field the value the decoder gives it.
 *   - every input is also decoded as a flowctl.v1.Event; when it is one, relay.c's scan (what
 *     the pipeline runner's relays read off the wire: id, type, whether the metadata has the
 *     failure key) agrees with the decoder.
 */
#include "fuzz_ruby.h"
#include <dlfcn.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static ID id_decode, id_encode, id_to_proto;

/* skim.c's flowctl_skim and its error (the layout of flowctl.h's flowctl_skim_error) */
typedef struct {
    const ProtobufCMessageDescriptor *desc;
    char why[160];
} skim_error;
static bool (*skim)(const ProtobufCMessageDescriptor *desc, const uint8_t *p, size_t len, skim_error *err);

/* The skim agrees with the decoder: the same verdict, and the decoder's words. */
static void
check_skim(const fuzz_class *c, const uint8_t *data, size_t size, VALUE m, VALUE err)
{
    skim_error e;
    bool ok = skim(c->desc, data, size, &e);
    if (ok != (m != Qundef))
        fuzz_bug("%s: skim %s what the decoder %s (%s)", c->desc->name, ok ? "accepted" : "refused",
                 ok ? "refused" : "accepted", ok ? "" : e.why);
    if (ok) return;
    const char *msg = fuzz_error_text(err);
    size_t n = strlen(e.why), len = strlen(msg);
    if (len < n + 2 || memcmp(msg + len - n, e.why, n) != 0)
        fuzz_bug("%s: the decoder said \"%s\", the skim \"%s\"", c->desc->name, msg, e.why);
}
/* relay.c's flowctl_relay_scan (the layouts of flowctl.h's flowctl_relay_fields and _event) */
typedef struct {
    uint32_t id, type, metadata;
    char failure_key[64];
    size_t failure_key_len;
} relay_fields;
typedef struct {
    const uint8_t *id, *type;
    size_t id_len, type_len;
    bool failed;
} relay_event;
static void (*relay_scan)(const relay_fields *fs, const uint8_t *p, size_t len, relay_event *ev);

static bool
same_bytes(VALUE str, const uint8_t *p, size_t len)
{
    return (size_t)RSTRING_LEN(str) == len && memcmp(RSTRING_PTR(str), p, len) == 0;
}

static VALUE event_class; /* Flowctl::V1::Event (loaded at run time from protocols.pb, not in the registry) */
static unsigned long relay_scans;

/* Every input that decodes as a flowctl.v1.Event: the relay's scan agrees with the decoder. */
static void
check_relay_scan(VALUE str, const uint8_t *data, size_t size)
{
    VALUE err, m = fuzz_call(event_class, id_decode, 1, &str, &err);
    if (m == Qundef) return;
    static const relay_fields fs = {.id = 1, .type = 2, .metadata = 4, .failure_key = "flowctl.error", .failure_key_len = 13};
    relay_event ev;
    relay_scan(&fs, data, size, &ev);
    relay_scans++;
    VALUE id = rb_funcall(m, rb_intern("id"), 0), type = rb_funcall(m, rb_intern("type"), 0);
    VALUE meta = rb_funcall(m, rb_intern("metadata"), 0);
    bool failed = RTEST(rb_funcall(meta, rb_intern("key?"), 1, rb_str_new_cstr("flowctl.error")));
    if (!same_bytes(id, ev.id, ev.id_len)) fuzz_bug("relay scan: id %.*s, the decoder %+"PRIsVALUE, (int)ev.id_len, ev.id, id);
    if (!same_bytes(type, ev.type, ev.type_len))
        fuzz_bug("relay scan: type %.*s, the decoder %+"PRIsVALUE, (int)ev.type_len, ev.type, type);
    if (failed != ev.failed) fuzz_bug("relay scan: failure key %s, the decoder's metadata %+"PRIsVALUE, ev.failed ? "seen" : "not seen", meta);
}
static VALUE allowed_decode[2];
static ID id_peek, id_aref, id_fields, id_new;
static VALUE peek_pad; /* field 1000, length-delimited, 600 bytes: unknown to every class */

/* Each field peeked from a lazy copy of the input equals what decoding gave it (compared
 * as one-field messages: NaN equals NaN, maps by content). */
static void
check_peek(const fuzz_class *c, VALUE eager, const uint8_t *data, size_t size)
{
    VALUE str = rb_str_dup(peek_pad), err;
    rb_str_cat(str, (const char *)data, (long)size);
    VALUE lazy = fuzz_call(c->klass, id_decode, 1, &str, &err);
    if (lazy == Qundef) fuzz_bug("%s: an unknown field in front made it fail: %s", c->desc->name, fuzz_error_text(err));
    VALUE fields = rb_funcall(c->klass, id_fields, 0);
    for (long k = 0; k < RARRAY_LEN(fields); k++) {
        VALUE name = RARRAY_AREF(fields, k);
        VALUE got = fuzz_call(lazy, id_peek, 1, &name, &err);
        if (got == Qundef) fuzz_bug("%s: peek(:%"PRIsVALUE") raised %s", c->desc->name, name, fuzz_error_text(err));
        VALUE want = rb_funcall(eager, id_aref, 1, name);
        VALUE a = rb_hash_new(), b = rb_hash_new();
        rb_hash_aset(a, name, got);
        rb_hash_aset(b, name, want);
        if (!fuzz_same_message(rb_funcall(c->klass, id_new, 1, a), rb_funcall(c->klass, id_new, 1, b)))
            fuzz_bug("%s: peek(:%"PRIsVALUE") gave %+"PRIsVALUE", the decoder %+"PRIsVALUE, c->desc->name, name, got, want);
    }
    RB_GC_GUARD(str);
}
static VALUE official[FUZZ_MAX_CLASSES];

/* how often flowctl and protobuf-c disagreed, and why (printed at exit) */
enum { PC_LAX_UTF8, PC_LAX_TIMESTAMP, PC_LAX_OTHER, PC_STRICT, PC_OTHER_VALUE, PC_REASONS };
static const char *const pc_reason_names[PC_REASONS] = {
    "protobuf-c accepted invalid UTF-8", "protobuf-c accepted a Timestamp out of range",
    "protobuf-c accepted what upb rejects too (field numbers past 2^29-1, ...)",
    "protobuf-c rejected what upb accepts (a known field number with another wire type, groups)",
    "protobuf-c decoded another value than upb (a bool field read from another wire type)",
};
static unsigned long pc_reasons[PC_REASONS], inputs, accepted, rejected;

enum { UPB_TIMESTAMP, UPB_VARINT, UPB_MAP_ENTRY, UPB_DEPTH, UPB_REASONS };
static const char *const upb_reason_names[UPB_REASONS] = {
    "flowctl rejected a Timestamp out of range", "flowctl rejected a 10-byte varint with bits past 64",
    "a map entry held unknown fields (upb drops such entries; not compared)", "upb's default nesting limit (64) was hit",
};
static unsigned long upb_reasons[UPB_REASONS];
static VALUE upb_opts_deep;

static void
print_stats(void)
{
    fprintf(stderr, "decode_target: %lu inputs, %lu decodes accepted, %lu rejected (DecodeError)\n",
            inputs, accepted, rejected);
    fprintf(stderr, "decode_target: %lu flowctl.v1.Event relay scans checked\n", relay_scans);
    for (int i = 0; i < UPB_REASONS; i++)
        fprintf(stderr, "decode_target: google-protobuf differs: %s: %lu\n", upb_reason_names[i], upb_reasons[i]);
    for (int i = 0; i < PC_REASONS; i++)
        fprintf(stderr, "decode_target: protobuf-c differs: %s: %lu\n", pc_reason_names[i], pc_reasons[i]);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_ruby_init(argc, argv);
    fuzz_load_official();
    skim = (bool (*)(const ProtobufCMessageDescriptor *, const uint8_t *, size_t, skim_error *))dlsym(RTLD_DEFAULT,
                                                                                                      "flowctl_skim");
    if (!skim) fuzz_bug("flowctl_skim is not in the loaded flowctl.so: %s", dlerror());
    relay_scan = (void (*)(const relay_fields *, const uint8_t *, size_t, relay_event *))dlsym(RTLD_DEFAULT,
                                                                                             "flowctl_relay_scan");
    if (!relay_scan) fuzz_bug("flowctl_relay_scan is not in the loaded flowctl.so: %s", dlerror());
    event_class = rb_path2class("Flowctl::V1::Event");
    rb_gc_register_mark_object(event_class);
    id_decode = rb_intern("decode");
    id_encode = rb_intern("encode");
    id_to_proto = rb_intern("to_proto");
    id_peek = rb_intern("peek");
    id_aref = rb_intern("[]");
    id_fields = rb_intern("fields");
    id_new = rb_intern("new");
    peek_pad = rb_str_new("\xc2\x3e\xd8\x04", 4);
    rb_str_resize(peek_pad, 604);
    memset(RSTRING_PTR(peek_pad) + 4, 'p', 600);
    rb_obj_freeze(peek_pad);
    rb_gc_register_mark_object(peek_pad);
    allowed_decode[0] = fuzz_eDecodeError;
    for (int i = 0; i < fuzz_n_classes; i++) {
        official[i] = fuzz_official_class(fuzz_classes[i].desc->name);
        rb_gc_register_mark_object(official[i]);
    }
    upb_opts_deep = rb_hash_new();
    rb_hash_aset(upb_opts_deep, ID2SYM(rb_intern("recursion_limit")), INT2FIX(1000));
    rb_gc_register_mark_object(upb_opts_deep);
    atexit(print_stats);
    return 0;
}

/* decode(encode(m)) == m, and encoding the copy gives the same bytes. */
static void
check_roundtrip(const fuzz_class *c, VALUE m)
{
    VALUE err, bytes = fuzz_call(m, id_to_proto, 0, NULL, &err);
    if (bytes == Qundef) fuzz_bug("%s: a decoded message does not encode: %s", c->desc->name, fuzz_error_text(err));
    VALUE again = fuzz_call(c->klass, id_decode, 1, &bytes, &err);
    if (again == Qundef) fuzz_bug("%s: its own encoding does not decode: %s", c->desc->name, fuzz_error_text(err));
    if (!fuzz_same_message(m, again)) fuzz_bug("%s: decode(encode(x)) != x for %+"PRIsVALUE, c->desc->name, m);
    if (!rb_str_equal(bytes, rb_funcall(again, id_to_proto, 0)))
        fuzz_bug("%s: re-encoding changed the bytes of %+"PRIsVALUE, c->desc->name, m);
}

/* Bytes another implementation wrote for what it decoded must decode in flowctl to m
 * (returns 0 when they decode to another message and !strict). */
static int
check_same(const fuzz_class *c, VALUE m, VALUE bytes, const char *who, int strict)
{
    VALUE err, theirs = fuzz_call(c->klass, id_decode, 1, &bytes, &err);
    if (theirs == Qundef)
        fuzz_bug("%s: flowctl rejects %s's encoding of what both decoded: %s", c->desc->name, who, fuzz_error_text(err));
    if (fuzz_same_message(m, theirs)) return 1;
    if (strict)
        fuzz_bug("%s: flowctl and %s decode differently:\n  flowctl: %+"PRIsVALUE"\n  %s: %+"PRIsVALUE,
                 c->desc->name, who, m, who, theirs);
    return 0;
}

static VALUE
protobuf_c_repack(const ProtobufCMessage *pm)
{
    size_t n = protobuf_c_message_get_packed_size(pm);
    VALUE bytes = rb_str_new(NULL, (long)n);
    if (protobuf_c_message_pack(pm, (uint8_t *)RSTRING_PTR(bytes)) != n) fuzz_bug("protobuf-c packed a wrong size");
    return bytes;
}

static int
timestamp_range_error(VALUE err)
{
    const char *msg = fuzz_error_text(err);
    return strstr(msg, "has nanos") || strstr(msg, "has seconds");
}

/* ---- a small wire scanner, only to recognise the known differences with upb ---- */

static int
rd_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    *v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (*p >= end) return 0;
        uint8_t b = *(*p)++;
        if (shift < 64) *v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) return 1;
    }
    return 0;
}

/* Skips one value of wire type wt (groups included); 0 on malformed input. */
static int
skip_value(const uint8_t **p, const uint8_t *end, int wt, int depth)
{
    uint64_t v;
    switch (wt) {
    case 0: return rd_varint(p, end, &v);
    case 1: if (end - *p < 8) return 0; *p += 8; return 1;
    case 5: if (end - *p < 4) return 0; *p += 4; return 1;
    case 2: if (!rd_varint(p, end, &v) || v > (uint64_t)(end - *p)) return 0; *p += v; return 1;
    case 3:
        if (depth > 200) return 0;
        for (;;) {
            if (!rd_varint(p, end, &v)) return 0;
            if ((v & 7) == 4) return 1;
            if (!skip_value(p, end, (int)(v & 7), depth + 1)) return 0;
        }
    default: return 0;
    }
}

static int
wire_type_of(const ProtobufCFieldDescriptor *fd)
{
    switch (fd->type) {
    case PROTOBUF_C_TYPE_SFIXED32: case PROTOBUF_C_TYPE_FIXED32: case PROTOBUF_C_TYPE_FLOAT: return 5;
    case PROTOBUF_C_TYPE_SFIXED64: case PROTOBUF_C_TYPE_FIXED64: case PROTOBUF_C_TYPE_DOUBLE: return 1;
    case PROTOBUF_C_TYPE_STRING: case PROTOBUF_C_TYPE_BYTES: case PROTOBUF_C_TYPE_MESSAGE: return 2;
    default: return 0;
    }
}

static int
is_map_entry(const ProtobufCFieldDescriptor *fd)
{
    if (fd->label != PROTOBUF_C_LABEL_REPEATED || fd->type != PROTOBUF_C_TYPE_MESSAGE) return 0;
    const ProtobufCMessageDescriptor *d = fd->descriptor;
    size_t n = strlen(d->short_name);
    return n > 5 && strcmp(d->short_name + n - 5, "Entry") == 0 && d->n_fields == 2;
}

/* Does a map entry of the message in [p, end) hold a field upb would call unknown? */
static int
map_entry_with_unknown(const ProtobufCMessageDescriptor *desc, const uint8_t *p, const uint8_t *end)
{
    uint64_t tag;
    while (p < end) {
        if (!rd_varint(&p, end, &tag)) return 0;
        const ProtobufCFieldDescriptor *fd = protobuf_c_message_descriptor_get_field(desc, (unsigned)(tag >> 3));
        const uint8_t *start = p;
        if (!skip_value(&p, end, (int)(tag & 7), 0)) return 0;
        if (!fd || (tag & 7) != 2 || !is_map_entry(fd)) continue;
        uint64_t n;
        if (!rd_varint(&start, end, &n)) return 0;
        const ProtobufCMessageDescriptor *entry = fd->descriptor;
        for (const uint8_t *q = start, *qe = start + n; q < qe;) {
            uint64_t t;
            if (!rd_varint(&q, qe, &t)) return 0;
            unsigned num = (unsigned)(t >> 3);
            if ((num != 1 && num != 2) || (int)(t & 7) != wire_type_of(&entry->fields[num - 1])) return 1;
            if (!skip_value(&q, qe, (int)(t & 7), 0)) return 0;
        }
    }
    return 0;
}

/* flowctl against upb, the reference: the same verdict, the same message. */
static void
check_against_upb(int i, VALUE str, VALUE m, VALUE err, const uint8_t *data, size_t size)
{
    const fuzz_class *c = &fuzz_classes[i];
    /* upb handles such entries otherwise, and google-protobuf 3.21.12 (Debian 12) even
     * crashes on some of them (fuzz/README.md): not asked. */
    if (map_entry_with_unknown(c->desc, data, data + size)) {
        upb_reasons[UPB_MAP_ENTRY]++;
        return;
    }
    VALUE uerr, um = fuzz_call(official[i], id_decode, 1, &str, &uerr);
    if (m != Qundef && um == Qundef) {
        VALUE args[2] = {str, upb_opts_deep};
        um = fuzz_call(official[i], id_decode, 2, args, &uerr);
        if (um == Qundef)
            fuzz_bug("%s: flowctl accepts what google-protobuf rejects (%s): %+"PRIsVALUE, c->desc->name,
                     fuzz_error_text(uerr), m);
        upb_reasons[UPB_DEPTH]++;
    }
    if (m == Qundef && um != Qundef) {
        if (timestamp_range_error(err)) upb_reasons[UPB_TIMESTAMP]++;
        else if (strstr(fuzz_error_text(err), "malformed varint")) upb_reasons[UPB_VARINT]++;
        else
            fuzz_bug("%s: flowctl rejects what google-protobuf accepts: %s\n  google-protobuf: %+"PRIsVALUE,
                     c->desc->name, fuzz_error_text(err), um);
    }
    if (m != Qundef) check_same(c, m, rb_funcall(official[i], id_encode, 1, um), "google-protobuf", 1);
}

/* flowctl against protobuf-c, after upb agreed with flowctl: the differences left are
 * where protobuf-c differs from upb; they are counted by kind. */
static void
check_against_protobuf_c(const fuzz_class *c, const uint8_t *data, size_t size, VALUE m, VALUE err)
{
    ProtobufCMessage *pm = protobuf_c_message_unpack(c->desc, NULL, size, data);
    if (m != Qundef && pm) {
        if (!check_same(c, m, protobuf_c_repack(pm), "protobuf-c", 0)) pc_reasons[PC_OTHER_VALUE]++;
    } else if (m != Qundef) pc_reasons[PC_STRICT]++;  /* upb accepted it too (checked before) */
    else if (pm && strstr(fuzz_error_text(err), "invalid UTF-8")) pc_reasons[PC_LAX_UTF8]++;
    else if (pm && timestamp_range_error(err)) pc_reasons[PC_LAX_TIMESTAMP]++;
    else if (pm) pc_reasons[PC_LAX_OTHER]++; /* upb rejected it too (checked before) */
    if (pm) protobuf_c_message_free_unpacked(pm, NULL);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0) return 0;
    int i = data[0] % fuzz_n_classes;
    const fuzz_class *c = &fuzz_classes[i];
    data++, size--;
    VALUE str = rb_str_new((const char *)data, (long)size);
    inputs++;
    VALUE err = Qnil, m = fuzz_call(c->klass, id_decode, 1, &str, &err);
    if (m == Qundef) {
        fuzz_expect(err, allowed_decode, c->desc->name);
        rejected++;
    } else {
        accepted++;
        check_roundtrip(c, m);
        check_peek(c, m, data, size);
    }
    check_relay_scan(str, data, size);
    check_skim(c, data, size, m, err);
    check_against_upb(i, str, m, err, data, size);
    check_against_protobuf_c(c, data, size, m, err);
    RB_GC_GUARD(str);
    fuzz_gc_tick();
    return 0;
}
