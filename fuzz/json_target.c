/*
 * json_target.c — libFuzzer target: the input read as proto3 JSON of every message type.
 *
 * The first byte of an input picks the message class (fuzz/json_classes.rb: the seed's
 * protocol, flowctl.v1, and the specs' JSON fixtures: every field type, oneofs, the
 * well-known types), the rest is the JSON text.
 * Checks:
 *   - Klass.decode_json(text) returns a message or raises Flowctl::DecodeError, with
 *     and without ignore_unknown_fields: true (which accepts at least as much); any
 *     other exception, and any ASan/UBSan/LSan report, is a bug;
 *   - an accepted message prints (to_json), its text reads back to the same message,
 *     and that copy prints what upb prints after reading the same text (the copy's maps
 *     are in the text's order: printed again, the order of a map of several entries
 *     can change, as it does in upb);
 *   - the reference, google-protobuf (upb) with the classes protoc generated from the same
 *     protos (spec/gen, spec/gen/official_v1, the fixtures' descriptor sets),
 *     reads that text to the same message (compared through the binary format), and
 *     where upb and flowctl both accept the input, they read the same message.
 *     Where they differ on accepting the input it is counted and printed at exit: upb
 *     is laxer on some inputs (a field given twice, dates past the end of a month, hour
 *     24, a string that is no number in a double...) and stricter on others (numbers
 *     in exponent form inside strings for integers). google-protobuf 3.21.12 itself
 *     crashes (stack overflow, SEGV in protobuf_c.so) on a bytes field whose JSON string
 *     holds bytes above 0x7f, so a text flowctl rejected is given to upb only when it is
 *     all ASCII (the rest is counted as not compared). upb also reads a negative Duration
 *     under one second ("-0.5s") as positive, and reads an integer written as a bare
 *     JSON number through a double (18446744073709425 -> ...424; flowctl reads it
 *     exactly, as a quoted one): a text with either that upb reads otherwise is counted,
 *     not a bug.
 *   - the C reader (ext/flowctl/json_read.c) and the Ruby decoder: what the C reader
 *     reads, the Ruby decoder reads to the same message (the C reader only ever gives
 *     up, never differs); the C printer (json_write.c) prints what the Ruby encoder
 *     prints; where upb and flowctl both accept the input, flowctl prints the text upb
 *     prints for what it read, byte for byte (map order included; inputs where upb
 *     cannot print or is known to differ are counted).
 */
#include "fuzz_ruby.h"
#include <sanitizer/lsan_interface.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static ID id_decode_json, id_to_json, id_encode, id_decode, id_call;
static VALUE allowed_decode[2];
static VALUE classes[FUZZ_MAX_CLASSES], official[FUZZ_MAX_CLASSES];
static int n_classes;
static VALUE ignoring; /* ->(k, t) { k.decode_json(t, ignore_unknown_fields: true) } */
static unsigned long inputs, accepted, rejected, ignoring_accepted, upb_both, upb_only, flowctl_only, upb_skipped,
    upb_negative_duration, upb_rounded, read_in_c, printed_same, upb_cannot_print;
static VALUE c_read, ruby_read, ruby_print; /* lambdas: json_read.c, the Ruby decoder, the Ruby encoder */
static VALUE negative_duration; /* /"-0+(\.[0-9]*)?s"/ : upb drops its sign */
static VALUE long_number;       /* a bare number of 16 digits or more: upb reads it through a double */

static void
print_stats(void)
{
    fprintf(stderr, "json_target: %lu inputs, %lu accepted, %lu rejected (DecodeError), "
                    "%lu accepted with ignore_unknown_fields\n", inputs, accepted, rejected, ignoring_accepted);
    fprintf(stderr, "json_target: google-protobuf: both accepted %lu (same message), only upb accepted %lu, "
                    "only flowctl accepted %lu, not given to upb (rejected and not ASCII, or a \\u escape past ASCII) %lu\n",
            upb_both, upb_only, flowctl_only, upb_skipped);
    fprintf(stderr, "json_target: google-protobuf read a negative Duration under 1 s as positive: %lu, "
                    "rounded a long bare number through a double: %lu\n", upb_negative_duration, upb_rounded);
    fprintf(stderr, "json_target: read in C %lu (the Ruby decoder read the same); both accepted and printed "
                    "byte for byte as upb %lu, upb could not print %lu\n", read_in_c, printed_same, upb_cannot_print);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_ruby_init(argc, argv);
    id_decode_json = rb_intern("decode_json");
    id_to_json = rb_intern("to_json");
    id_encode = rb_intern("encode");
    id_decode = rb_intern("decode");
    id_call = rb_intern("call");
    allowed_decode[0] = fuzz_eDecodeError;
    ignoring = rb_eval_string("->(k, t) { k.decode_json(t, ignore_unknown_fields: true) }");
    rb_gc_register_mark_object(ignoring);
    negative_duration = rb_eval_string("/\"-0+(\\.[0-9]*)?s\"/n");
    rb_gc_register_mark_object(negative_duration);
    long_number = rb_eval_string("/[:\\[,]\\s*-?(?:[0-9]\\.?){16,}/n");
    rb_gc_register_mark_object(long_number);
    c_read = rb_eval_string("->(k, t) { o = Flowctl::Native.json_decode(k, t); "
                            "(Flowctl::ProtoJSON.plan(o); o = Flowctl::Native.json_decode(k, t)) while o.is_a?(Class); o }");
    rb_gc_register_mark_object(c_read);
    ruby_read = rb_eval_string("->(k, t) { Flowctl::ProtoJSON.ruby_decode(k, t) }");
    rb_gc_register_mark_object(ruby_read);
    ruby_print = rb_eval_string("->(m) { Flowctl::ProtoJSON::Encoder.new({}).encode(m) }");
    rb_gc_register_mark_object(ruby_print);
    /* what Ruby allocates once here (classes, descriptors, caches) is never freed: made
     * with LeakSanitizer off, as fuzz_ruby.c does for the gem's start-up */
    __lsan_disable();
    rb_require(FUZZ_GEN "/../../fuzz/json_classes.rb");
    VALUE pairs = rb_funcall(rb_path2class("FuzzJSON"), rb_intern("pairs"), 0);
    rb_gc_register_mark_object(pairs);
    /* (an empty google.protobuf.Value has no JSON: such a warm-up call may raise) */
    rb_eval_string("FuzzJSON.pairs.each { |k, o| begin; k.decode_json(k.new.to_json); o.decode_json(o.encode_json(o.new)); "
                   "rescue StandardError, Google::Protobuf::ParseError; end }");
    fuzz_lsan_roots();
    __lsan_enable();
    n_classes = (int)RARRAY_LEN(pairs);
    if (n_classes == 0 || n_classes > FUZZ_MAX_CLASSES) fuzz_bug("json_target: %d classes", n_classes);
    for (int i = 0; i < n_classes; i++) {
        classes[i] = RARRAY_AREF(RARRAY_AREF(pairs, i), 0);
        official[i] = RARRAY_AREF(RARRAY_AREF(pairs, i), 1);
    }
    atexit(print_stats);
    return 0;
}

static const char *
name_of(int i)
{
    VALUE name = rb_funcall(classes[i], rb_intern("descriptor_name"), 0);
    return StringValueCStr(name);
}

/* What upb's message holds, as a flowctl message (through the binary format). */
static VALUE
from_upb(int i, VALUE upb_msg)
{
    VALUE err, bytes = fuzz_call(official[i], id_encode, 1, &upb_msg, &err);
    if (bytes == Qundef) fuzz_bug("%s: google-protobuf cannot encode what it read: %s", name_of(i), fuzz_error_text(err));
    VALUE m = fuzz_call(classes[i], id_decode, 1, &bytes, &err);
    if (m == Qundef) fuzz_bug("%s: flowctl cannot decode google-protobuf's bytes: %s", name_of(i), fuzz_error_text(err));
    return m;
}

/* Does text hold what upb is known to read otherwise: a negative Duration under one
 * second (read as positive) or a long bare number (read through a double)? */
static int
upb_reads_otherwise(VALUE text)
{
    VALUE bin = rb_str_new(RSTRING_PTR(text), RSTRING_LEN(text));
    ID match = rb_intern("match?");
    if (RTEST(rb_funcall(negative_duration, match, 1, bin))) {
        upb_negative_duration++;
        return 1;
    }
    if (RTEST(rb_funcall(long_number, match, 1, bin))) {
        upb_rounded++;
        return 1;
    }
    return 0;
}

static void check_same_print(int i, VALUE m, VALUE u, VALUE text);

/* m prints; the text reads back to m in flowctl and in upb, and the copy prints what upb
 * prints for the text. */
static void
check_roundtrip(int i, VALUE m)
{
    VALUE err, text = fuzz_call(m, id_to_json, 0, NULL, &err);
    if (text == Qundef) fuzz_bug("%s: a decoded message does not print: %s", name_of(i), fuzz_error_text(err));
    VALUE again = fuzz_call(classes[i], id_decode_json, 1, &text, &err);
    if (again == Qundef) fuzz_bug("%s: its own JSON %+"PRIsVALUE" does not read: %s", name_of(i), text, fuzz_error_text(err));
    if (!fuzz_same_message(m, again)) fuzz_bug("%s: decode_json(to_json(x)) != x for %+"PRIsVALUE, name_of(i), m);
    VALUE text2 = fuzz_call(again, id_to_json, 0, NULL, &err);
    if (text2 == Qundef) fuzz_bug("%s: the copy read from %+"PRIsVALUE" does not print", name_of(i), text);
    VALUE ruby_text = fuzz_call(ruby_print, id_call, 1, &m, &err);
    if (ruby_text == Qundef)
        fuzz_bug("%s: the C printer wrote %+"PRIsVALUE", the Ruby encoder raised %s", name_of(i), text, fuzz_error_text(err));
    if (!rb_str_equal(text, ruby_text))
        fuzz_bug("%s: the C printer wrote %+"PRIsVALUE", the Ruby encoder %+"PRIsVALUE, name_of(i), text, ruby_text);
    VALUE u = fuzz_call(official[i], id_decode_json, 1, &text, &err);
    if (u == Qundef) fuzz_bug("%s: google-protobuf rejects flowctl's JSON %+"PRIsVALUE": %s", name_of(i), text, fuzz_error_text(err));
    if (!fuzz_same_message(m, from_upb(i, u)) && !upb_reads_otherwise(text))
        fuzz_bug("%s: google-protobuf reads flowctl's JSON %+"PRIsVALUE" differently", name_of(i), text);
    /* The copy's maps hold their entries in the order of the text, which is upb's order
     * of m's: printed again they may come in another order, the one upb prints after
     * reading the same text. */
    if (!rb_str_equal(text, text2)) check_same_print(i, again, u, text);
}

/* What the C reader reads, the Ruby decoder reads to the same message; decode_json
 * (either of them) agrees with the Ruby decoder on accepting. */
static void
check_c_reader(int i, VALUE *args, VALUE m)
{
    VALUE err, ours = fuzz_call(c_read, id_call, 2, args, &err);
    if (ours == Qundef) fuzz_bug("%s: Flowctl::Native.json_decode raised: %s", name_of(i), fuzz_error_text(err));
    VALUE theirs = fuzz_call(ruby_read, id_call, 2, args, &err);
    if (theirs == Qundef) fuzz_expect(err, allowed_decode, "the Ruby decoder");
    if ((theirs == Qundef) != (m == Qundef))
        fuzz_bug("%s: decode_json and the Ruby decoder disagree on accepting %+"PRIsVALUE, name_of(i), args[1]);
    if (NIL_P(ours)) return;
    read_in_c++;
    if (theirs == Qundef)
        fuzz_bug("%s: the C reader read %+"PRIsVALUE", which the Ruby decoder rejects: %s", name_of(i), args[1],
                 fuzz_error_text(err));
    if (!fuzz_same_message(ours, theirs))
        fuzz_bug("%s: the C reader and the Ruby decoder read %+"PRIsVALUE" differently:\n  C: %+"PRIsVALUE
                 "\n  Ruby: %+"PRIsVALUE, name_of(i), args[1], ours, theirs);
}

/* Both read the text: flowctl prints what upb prints for it (maps in the text's order
 * on both sides, so in upb's table order on both). */
static void
check_same_print(int i, VALUE m, VALUE u, VALUE text)
{
    VALUE err, ours = fuzz_call(m, id_to_json, 0, NULL, &err);
    if (ours == Qundef) return; /* check_roundtrip reported it */
    VALUE theirs = fuzz_call(official[i], rb_intern("encode_json"), 1, &u, &err);
    if (theirs == Qundef || upb_reads_otherwise(text)) {
        upb_cannot_print++;
        return;
    }
    if (!rb_str_equal(ours, theirs))
        fuzz_bug("%s: read from %+"PRIsVALUE" flowctl prints %+"PRIsVALUE", google-protobuf %+"PRIsVALUE, name_of(i),
                 text, ours, theirs);
    printed_same++;
}

static int
all_ascii(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] > 0x7f) return 0;
    return 1;
}

/*
 * A \u escape of a character past ASCII (\u0080 and up). google-protobuf 3.21.12 (Debian's) dies
 * with SIGSEGV reading a bytes field's base64 that holds one ({"payload":"\u00ad"} for
 * flowctl.v1.Event): its base64 table is indexed with a signed char. Such texts are not given to it.
 */
static int
escapes_past_ascii(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i + 5 < n; i++) {
        if (p[i] != '\\') continue;
        if (p[i + 1] != 'u') { i++; continue; } /* an escaped character, maybe a backslash */
        if (!(p[i + 2] == '0' && p[i + 3] == '0' && p[i + 4] >= '0' && p[i + 4] <= '7')) return 1;
        i += 5;
    }
    return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    int i = data[0] % n_classes;
    VALUE err, text = rb_utf8_str_new((const char *)data + 1, (long)size - 1);
    inputs++;

    VALUE m = fuzz_call(classes[i], id_decode_json, 1, &text, &err);
    if (m == Qundef) {
        fuzz_expect(err, allowed_decode, "decode_json");
        rejected++;
    } else {
        accepted++;
        check_roundtrip(i, m);
    }

    VALUE args[2] = {classes[i], text};
    check_c_reader(i, args, m);
    VALUE lax = fuzz_call(ignoring, id_call, 2, args, &err);
    if (lax == Qundef) {
        fuzz_expect(err, allowed_decode, "decode_json(ignore_unknown_fields: true)");
        if (m != Qundef) fuzz_bug("%s: ignore_unknown_fields rejects what the strict read accepts", name_of(i));
    } else {
        ignoring_accepted++;
        check_roundtrip(i, lax);
        if (m != Qundef && !fuzz_same_message(m, lax))
            fuzz_bug("%s: ignore_unknown_fields read another message from a text without unknown fields", name_of(i));
    }

    if ((m == Qundef && !all_ascii(data + 1, size - 1)) || escapes_past_ascii(data + 1, size - 1)) {
        upb_skipped++;
        fuzz_gc_tick();
        return 0;
    }
    VALUE u = fuzz_call(official[i], id_decode_json, 1, &text, &err);
    if (u == Qundef) {
        if (m != Qundef) flowctl_only++;
    } else if (m == Qundef) {
        upb_only++;
    } else {
        upb_both++;
        VALUE theirs = from_upb(i, u);
        if (!fuzz_same_message(m, theirs) && !upb_reads_otherwise(text))
            fuzz_bug("%s: flowctl and google-protobuf read %+"PRIsVALUE" differently:\n  flowctl: %+"PRIsVALUE
                     "\n  upb: %+"PRIsVALUE, name_of(i), text, m, theirs);
        check_same_print(i, m, u, text);
    }
    fuzz_gc_tick();
    return 0;
}
