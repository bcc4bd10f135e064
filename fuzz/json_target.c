/*
 * json_target.c — libFuzzer target: the input read as proto3 JSON of every message type.
 *
 * The first byte of an input picks the message class, the rest is the JSON text.
 * Checks:
 *   - Klass.decode_json(text) returns a message or raises Flowctl::DecodeError, with
 *     and without ignore_unknown_fields: true (which accepts at least as much); any
 *     other exception, and any ASan/UBSan/LSan report, is a bug;
 *   - an accepted message prints (to_json), its text reads back to the same message
 *     and prints the same text again;
 *   - the reference, google-protobuf (upb) with spec/gen's classes of the same protos,
 *     reads that text to the same message (compared through the binary format), and
 *     where upb and flowctl both accept the input, they read the same message.
 *     Where they differ on accepting the input it is counted and printed at exit: upb
 *     is laxer on some inputs (a field given twice, dates past the end of a month, hour
 *     24, a string that is no number in a double...) and stricter on others (numbers
 *     in exponent form inside strings for integers).
 */
#include "fuzz_ruby.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static ID id_decode_json, id_to_json, id_encode, id_decode, id_call;
static VALUE allowed_decode[2];
static VALUE official[FUZZ_MAX_CLASSES];
static VALUE ignoring; /* ->(k, t) { k.decode_json(t, ignore_unknown_fields: true) } */
static unsigned long inputs, accepted, rejected, ignoring_accepted, upb_both, upb_only, flowctl_only;

static void
print_stats(void)
{
    fprintf(stderr, "json_target: %lu inputs, %lu accepted, %lu rejected (DecodeError), "
                    "%lu accepted with ignore_unknown_fields\n", inputs, accepted, rejected, ignoring_accepted);
    fprintf(stderr, "json_target: google-protobuf: both accepted %lu (same message), only upb accepted %lu, "
                    "only flowctl accepted %lu\n", upb_both, upb_only, flowctl_only);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_ruby_init(argc, argv);
    fuzz_load_official();
    id_decode_json = rb_intern("decode_json");
    id_to_json = rb_intern("to_json");
    id_encode = rb_intern("encode");
    id_decode = rb_intern("decode");
    id_call = rb_intern("call");
    allowed_decode[0] = fuzz_eDecodeError;
    ignoring = rb_eval_string("->(k, t) { k.decode_json(t, ignore_unknown_fields: true) }");
    rb_gc_register_mark_object(ignoring);
    for (int i = 0; i < fuzz_n_classes; i++) {
        official[i] = fuzz_official_class(fuzz_classes[i].desc->name);
        rb_gc_register_mark_object(official[i]);
    }
    atexit(print_stats);
    return 0;
}

/* What upb's message holds, as a flowctl message (through the binary format). */
static VALUE
from_upb(const fuzz_class *c, int i, VALUE upb_msg)
{
    VALUE err, bytes = fuzz_call(official[i], id_encode, 1, &upb_msg, &err);
    if (bytes == Qundef) fuzz_bug("%s: google-protobuf cannot encode what it read: %s", c->desc->name, fuzz_error_text(err));
    VALUE m = fuzz_call(c->klass, id_decode, 1, &bytes, &err);
    if (m == Qundef) fuzz_bug("%s: flowctl cannot decode google-protobuf's bytes: %s", c->desc->name, fuzz_error_text(err));
    return m;
}

/* m prints; the text reads back to m in flowctl and in upb, and prints the same again. */
static void
check_roundtrip(const fuzz_class *c, int i, VALUE m)
{
    VALUE err, text = fuzz_call(m, id_to_json, 0, NULL, &err);
    if (text == Qundef) fuzz_bug("%s: a decoded message does not print: %s", c->desc->name, fuzz_error_text(err));
    VALUE again = fuzz_call(c->klass, id_decode_json, 1, &text, &err);
    if (again == Qundef) fuzz_bug("%s: its own JSON %+"PRIsVALUE" does not read: %s", c->desc->name, text, fuzz_error_text(err));
    if (!fuzz_same_message(m, again)) fuzz_bug("%s: decode_json(to_json(x)) != x for %+"PRIsVALUE, c->desc->name, m);
    VALUE text2 = fuzz_call(again, id_to_json, 0, NULL, &err);
    if (text2 == Qundef || !rb_str_equal(text, text2))
        fuzz_bug("%s: printing the copy changed the text %+"PRIsVALUE, c->desc->name, text);
    VALUE u = fuzz_call(official[i], id_decode_json, 1, &text, &err);
    if (u == Qundef) fuzz_bug("%s: google-protobuf rejects flowctl's JSON %+"PRIsVALUE": %s", c->desc->name, text, fuzz_error_text(err));
    if (!fuzz_same_message(m, from_upb(c, i, u)))
        fuzz_bug("%s: google-protobuf reads flowctl's JSON %+"PRIsVALUE" differently", c->desc->name, text);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    int i = data[0] % fuzz_n_classes;
    const fuzz_class *c = &fuzz_classes[i];
    VALUE err, text = rb_utf8_str_new((const char *)data + 1, (long)size - 1);
    inputs++;

    VALUE m = fuzz_call(c->klass, id_decode_json, 1, &text, &err);
    if (m == Qundef) {
        fuzz_expect(err, allowed_decode, "decode_json");
        rejected++;
    } else {
        accepted++;
        check_roundtrip(c, i, m);
    }

    VALUE args[2] = {c->klass, text};
    VALUE lax = fuzz_call(ignoring, id_call, 2, args, &err);
    if (lax == Qundef) {
        fuzz_expect(err, allowed_decode, "decode_json(ignore_unknown_fields: true)");
        if (m != Qundef) fuzz_bug("%s: ignore_unknown_fields rejects what the strict read accepts", c->desc->name);
    } else {
        ignoring_accepted++;
        check_roundtrip(c, i, lax);
        if (m != Qundef && !fuzz_same_message(m, lax))
            fuzz_bug("%s: ignore_unknown_fields read another message from a text without unknown fields", c->desc->name);
    }

    VALUE u = fuzz_call(official[i], id_decode_json, 1, &text, &err);
    if (u == Qundef) {
        if (m != Qundef) flowctl_only++;
    } else if (m == Qundef) {
        upb_only++;
    } else {
        upb_both++;
        VALUE theirs = from_upb(c, i, u);
        if (!fuzz_same_message(m, theirs))
            fuzz_bug("%s: flowctl and google-protobuf read %+"PRIsVALUE" differently:\n  flowctl: %+"PRIsVALUE
                     "\n  upb: %+"PRIsVALUE, c->desc->name, text, m, theirs);
    }
    fuzz_gc_tick();
    return 0;
}
