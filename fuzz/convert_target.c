/*
 * convert_target.c — libFuzzer target: random Ruby values given to message classes.
 *
 * The input is a little program. Its first byte picks a message class; then each
 * operation byte is followed by the bytes gen_value() reads to build the Ruby values
 * it needs: nil, booleans, Integers from small to huge and negative, Floats (NaN,
 * infinities, -0.0, float overflow), Strings in several encodings with valid and
 * broken contents, Symbols, nested Hashes and Arrays, Time (far past and future),
 * messages, and odd objects (BasicObject, Rational, Struct, objects with #to_time).
 *
 * Operations: Klass.new(hash), setters, msg[name] = v, to_proto, to_h/inspect/hash/dup,
 * setters on a frozen copy, in-place changes to the Hash/Array a field returned,
 * Klass.decode(v), Klass.encode(v), ==. Checks:
 *   - only TypeError, ArgumentError, RangeError, FrozenError (and Flowctl::DecodeError
 *     from decode) are raised; anything else, or any sanitizer report, is a bug;
 *   - a setter that raised left the message as it was;
 *   - a frozen message refuses every setter with FrozenError;
 *   - whatever to_proto returns decodes to an equal message, in flowctl, in protobuf-c
 *     and in google-protobuf (upb), and Klass.new(msg.to_h) == msg.
 */
#include "fuzz_ruby.h"
#include <math.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    const uint8_t *p, *end;
} src;

static VALUE allowed[6], allowed_decode[7], allowed_frozen[2];
static VALUE official[FUZZ_MAX_CLASSES];
static VALUE odd_objects, encodings, utf8_samples, enum_names;
static VALUE basic_object; /* only given to setters: Ruby itself cannot inspect an Array holding one */
static ID id_decode, id_encode, id_to_proto, id_to_h, id_new, id_aset, id_aref, id_dup, id_freeze;
static ID id_inspect, id_hash, id_eq, id_shovel, id_delete, id_clear, id_send;
static unsigned long ops_done, ops_raised, encodes_checked, pc_nul_strings;

static const char odd_rb[] =
    "class FuzzTimeish; def to_time = Time.at(12345, 678, :nsec); end\n"
    "class FuzzBadTimeish; def to_time = 'not a time'; end\n"
    "class FuzzString < String; end\n"
    "FuzzStruct = Struct.new(:a)\n"
    "[Object.new, FuzzTimeish.new, FuzzBadTimeish.new, FuzzString.new('sub'),\n"
    " FuzzStruct.new(1), Rational(1, 3), Complex(1, 2), (1..2), Object, Kernel, :sym.to_proc,\n"
    " 'frozen'.freeze, ''.b, 2**64, -(2**63) - 1, 1e400, -0.0, Float::NAN, Time.at(0).utc,\n"
    " Time.at(253402300799, 999999999, :nsec), Time.at(253402300800), Time.at(-62135596801),\n"
    " Time.at(-62135596800), Time.now.localtime('+05:30'), Time.at(1, Rational(1, 3), :nsec)]\n";

static unsigned
take(src *s)
{
    return s->p < s->end ? *s->p++ : 0;
}

static uint64_t
take64(src *s)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = v << 8 | take(s);
    return v;
}

static const int64_t boundaries[] = {
    0, 1, -1, 127, 128, -128, 255, 65535, INT32_MAX, (int64_t)INT32_MAX + 1, INT32_MIN,
    (int64_t)INT32_MIN - 1, UINT32_MAX, (int64_t)UINT32_MAX + 1, INT64_MAX, INT64_MIN,
    (int64_t)1 << 62, -((int64_t)1 << 62), ((int64_t)1 << 62) - 1, 253402300799, -62135596800,
};
#define N_BOUNDARIES (sizeof(boundaries) / sizeof(boundaries[0]))

static VALUE
shifted(VALUE base, unsigned shift)
{
    return rb_funcall(base, rb_intern("<<"), 1, INT2FIX(shift));
}

static VALUE
gen_integer(src *s, unsigned kind)
{
    switch (kind % 4) {
    case 0: return INT2FIX((int8_t)take(s));
    case 1: return LL2NUM((int64_t)take64(s));
    case 2: return LL2NUM(boundaries[take(s) % N_BOUNDARIES]);
    default: { /* beyond 64 bits, both signs */
        VALUE big = shifted(LL2NUM(boundaries[take(s) % N_BOUNDARIES] | 1), take(s) % 130);
        return take(s) & 1 ? rb_funcall(big, rb_intern("-@"), 0) : big;
    }
    }
}

static VALUE
gen_float(src *s)
{
    static const double specials[] = {0.0, -0.0, INFINITY, -INFINITY, NAN, 1e308, 3.4028234663852886e38,
                                      3.5e38, 5e-324, 1e-46, 0.1, -1.5};
    unsigned k = take(s);
    if (k & 1) return DBL2NUM(specials[(k >> 1) % (sizeof(specials) / sizeof(specials[0]))]);
    uint64_t bits = take64(s);
    double d;
    memcpy(&d, &bits, 8);
    return DBL2NUM(d);
}

static VALUE
gen_string(src *s)
{
    unsigned len = take(s) % 48, how = take(s);
    VALUE str;
    if (how % 4 == 0) { /* valid UTF-8 pieces, sometimes broken at the end */
        str = rb_utf8_str_new(NULL, 0);
        for (unsigned i = 0; i < len % 6; i++) {
            VALUE piece = RARRAY_AREF(utf8_samples, take(s) % RARRAY_LEN(utf8_samples));
            rb_str_cat(str, RSTRING_PTR(piece), RSTRING_LEN(piece));
        }
        if (how & 0x10) rb_str_cat(str, "\xE2\x82", 2); /* truncated sequence */
    } else {
        char buf[48];
        for (unsigned i = 0; i < len; i++) buf[i] = (char)take(s);
        str = rb_str_new(buf, len);
        rb_enc_associate(str, rb_to_encoding(RARRAY_AREF(encodings, (how >> 2) % RARRAY_LEN(encodings))));
    }
    if (how & 0x80) rb_obj_freeze(str);
    return str;
}

static VALUE
sym_body(VALUE str)
{
    return rb_str_intern(str);
}

static VALUE
gen_symbol(src *s, const fuzz_class *c)
{
    unsigned k = take(s);
    if (k % 4 == 0) return RARRAY_AREF(enum_names, take(s) % RARRAY_LEN(enum_names));
    if (k % 4 != 1 && RARRAY_LEN(c->fields)) return RARRAY_AREF(c->fields, take(s) % RARRAY_LEN(c->fields));
    int state = 0;
    VALUE sym = rb_protect(sym_body, gen_string(s), &state);
    if (state) {
        fuzz_after_jump();
        rb_set_errinfo(Qnil);
        return ID2SYM(rb_intern("not_a_field"));
    }
    return sym;
}

static VALUE gen_value(src *s, const fuzz_class *c, int depth);

/* A key for Klass.new: mostly the class's field names, as Symbols or Strings. */
static VALUE
gen_key(src *s, const fuzz_class *c)
{
    unsigned k = take(s);
    if (k % 8 < 5 && RARRAY_LEN(c->fields)) {
        VALUE sym = RARRAY_AREF(c->fields, take(s) % RARRAY_LEN(c->fields));
        return k % 8 == 4 ? rb_sym2str(sym) : sym;
    }
    if (k % 8 == 5) return gen_string(s);
    if (k % 8 == 6) return gen_symbol(s, c);
    return gen_value(s, c, 3);
}

struct hash_set {
    VALUE h, k, v;
};

static VALUE
hash_set_body(VALUE p)
{
    struct hash_set *a = (struct hash_set *)p;
    return rb_hash_aset(a->h, a->k, a->v);
}

static void
hash_put(VALUE h, VALUE k, VALUE v)
{
    struct hash_set a = {h, k, v};
    int state = 0;
    rb_protect(hash_set_body, (VALUE)&a, &state); /* BasicObject keys have no #hash */
    if (state) {
        fuzz_after_jump();
        rb_set_errinfo(Qnil);
    }
}

static VALUE
gen_hash(src *s, const fuzz_class *c, int depth, int field_keys)
{
    VALUE h = rb_hash_new();
    unsigned n = take(s) % 5;
    for (unsigned i = 0; i < n; i++) {
        VALUE k = field_keys ? gen_key(s, c) : (take(s) % 4 ? gen_string(s) : gen_value(s, c, depth + 1));
        hash_put(h, k, gen_value(s, c, depth + 1));
    }
    return h;
}

static VALUE
gen_message(src *s, int depth)
{
    const fuzz_class *c = &fuzz_classes[take(s) % fuzz_n_classes];
    VALUE arg = gen_hash(s, c, depth + 1, 1), err;
    VALUE m = fuzz_call(c->klass, id_new, 1, &arg, &err);
    return m == Qundef ? rb_class_new_instance(0, NULL, c->klass) : m;
}

static VALUE
gen_value(src *s, const fuzz_class *c, int depth)
{
    unsigned k = take(s);
    if (depth > 3) k %= 12; /* no more nesting */
    switch (k % 18) {
    case 0: return Qnil;
    case 1: return Qtrue;
    case 2: return Qfalse;
    case 3: case 4: return gen_integer(s, k >> 5);
    case 5: case 6: return gen_float(s);
    case 7: case 8: case 9: return gen_string(s);
    case 10: return gen_symbol(s, c);
    case 11: { /* Time, from year 1 to far beyond year 9999, both signs */
        int64_t sec = take(s) & 1 ? (int64_t)take64(s) >> (4 + take(s) % 60) : boundaries[take(s) % N_BOUNDARIES];
        if (sec > ((int64_t)1 << 59) || sec < -((int64_t)1 << 59)) sec /= 16;
        return rb_time_nano_new((time_t)sec, (long)(take64(s) % 1000000000));
    }
    case 12: return RARRAY_AREF(odd_objects, take(s) % RARRAY_LEN(odd_objects));
    case 13: case 14: return gen_hash(s, c, depth, 0);
    case 15: {
        VALUE a = rb_ary_new();
        for (unsigned i = take(s) % 5; i > 0; i--) rb_ary_push(a, gen_value(s, c, depth + 1));
        return a;
    }
    case 16: return gen_message(s, depth);
    default: return RARRAY_AREF(enum_names, take(s) % RARRAY_LEN(enum_names));
    }
}

/* ---- checks ---------------------------------------------------------------- */

static const char *
err_text(VALUE err)
{
    VALUE s = rb_sprintf("%"PRIsVALUE": %"PRIsVALUE, rb_obj_class(err), rb_funcall(err, rb_intern("message"), 0));
    return StringValueCStr(s);
}

/* Calls and accepts only the allowed exceptions; Qundef when one was raised. */
static VALUE
try_call(VALUE recv, ID mid, int argc, const VALUE *argv, const VALUE *ok, const char *what)
{
    VALUE err, r = fuzz_call(recv, mid, argc, argv, &err);
    ops_done++;
    if (r != Qundef) return r;
    ops_raised++;
    fuzz_expect(err, ok, what);
    return Qundef;
}

/* What to_proto wrote decodes to the same message everywhere. */
static void
check_encoding(const fuzz_class *c, int ci, VALUE m)
{
    VALUE bytes = try_call(m, id_to_proto, 0, NULL, allowed, "to_proto");
    if (bytes == Qundef) return;
    encodes_checked++;
    VALUE err, back = fuzz_call(c->klass, id_decode, 1, &bytes, &err);
    if (back == Qundef) fuzz_bug("%s: to_proto wrote what decode rejects (%s): %+"PRIsVALUE, c->desc->name, err_text(err), m);
    if (!fuzz_same_message(m, back))
        fuzz_bug("%s: decode(to_proto) differs:\n  set:     %+"PRIsVALUE"\n  decoded: %+"PRIsVALUE, c->desc->name, m, back);
    /* the same bytes again, unless values put in place into a returned Hash were
     * converted (then only the decoded copy must encode stably) */
    VALUE again_bytes = rb_funcall(back, id_to_proto, 0);
    VALUE ref = RTEST(rb_funcall(m, id_eq, 1, back)) ? bytes : rb_funcall(c->klass, id_decode, 1, again_bytes);
    if (ref != bytes) ref = rb_funcall(ref, id_to_proto, 0);
    if (!rb_str_equal(ref, again_bytes))
        fuzz_bug("%s: encoding is not stable for %+"PRIsVALUE, c->desc->name, m);

    ProtobufCMessage *pm = protobuf_c_message_unpack(c->desc, NULL, (size_t)RSTRING_LEN(bytes),
                                                     (const uint8_t *)RSTRING_PTR(bytes));
    if (!pm) fuzz_bug("%s: protobuf-c rejects what to_proto wrote for %+"PRIsVALUE, c->desc->name, m);
    VALUE again = rb_str_new(NULL, (long)protobuf_c_message_get_packed_size(pm));
    protobuf_c_message_pack(pm, (uint8_t *)RSTRING_PTR(again));
    protobuf_c_message_free_unpacked(pm, NULL);
    VALUE pc = fuzz_call(c->klass, id_decode, 1, &again, &err);
    if (pc == Qundef) fuzz_bug("%s: protobuf-c's copy of %+"PRIsVALUE" does not decode", c->desc->name, m);
    if (!fuzz_same_message(m, pc)) {
        /* protobuf-c keeps strings as C strings: it cuts them at the first NUL */
        VALUE ins = rb_funcall(m, id_inspect, 0);
        const char *text = StringValueCStr(ins);
        if (!strstr(text, "\\u0000") && !strstr(text, "\\x00"))
            fuzz_bug("%s: protobuf-c's copy differs from %+"PRIsVALUE, c->desc->name, m);
        pc_nul_strings++;
    }

    VALUE um = fuzz_call(official[ci], id_decode, 1, &bytes, &err);
    if (um == Qundef) fuzz_bug("%s: google-protobuf rejects what to_proto wrote (%s): %+"PRIsVALUE, c->desc->name, err_text(err), m);
    VALUE ub = rb_funcall(official[ci], id_encode, 1, um);
    VALUE u = fuzz_call(c->klass, id_decode, 1, &ub, &err);
    if (u == Qundef || !fuzz_same_message(m, u))
        fuzz_bug("%s: google-protobuf's copy differs from %+"PRIsVALUE, c->desc->name, m);
}

/* to_h, inspect, hash, dup; Klass.new(msg.to_h) == msg. */
static void
check_views(const fuzz_class *c, VALUE m)
{
    VALUE h = rb_funcall(m, id_to_h, 0);
    rb_funcall(m, id_inspect, 0);
    rb_funcall(m, id_hash, 0);
    VALUE d = rb_funcall(m, id_dup, 0);
    if (!fuzz_same_message(m, d)) fuzz_bug("%s: dup differs from %+"PRIsVALUE, c->desc->name, m);
    VALUE err, again = fuzz_call(c->klass, id_new, 1, &h, &err);
    if (again == Qundef) {
        /* only when a Hash or Array the message returned was given a bad value in place,
         * which to_proto refuses too */
        VALUE err2;
        if (fuzz_call(m, id_to_proto, 0, NULL, &err2) != Qundef)
            fuzz_bug("%s: new(to_h) raised %s for %+"PRIsVALUE, c->desc->name, err_text(err), m);
        fuzz_expect(err, allowed, "new(to_h)");
        return;
    }
    if (!fuzz_same_message(m, again)) fuzz_bug("%s: new(to_h) differs from %+"PRIsVALUE, c->desc->name, m);
}

/* A setter that raises leaves the message as it was. */
static void
set_checked(const fuzz_class *c, VALUE m, ID mid, int argc, const VALUE *argv)
{
    VALUE before = rb_funcall(m, id_dup, 0);
    if (try_call(m, mid, argc, argv, allowed, "a setter") == Qundef && !fuzz_same_message(m, before))
        fuzz_bug("%s: a setter raised and still changed the message: %+"PRIsVALUE, c->desc->name, m);
}

/* The Hash or Array a map/repeated field returned, changed in place. */
static void
mutate_container(src *s, const fuzz_class *c, VALUE m)
{
    if (!RARRAY_LEN(c->fields)) return;
    VALUE f = RARRAY_AREF(c->fields, take(s) % RARRAY_LEN(c->fields));
    VALUE v = rb_funcall(m, id_aref, 1, f);
    if (RB_TYPE_P(v, T_HASH) && !RB_OBJ_FROZEN(v)) {
        switch (take(s) % 3) {
        case 0: hash_put(v, take(s) % 2 ? gen_string(s) : gen_value(s, c, 2), gen_value(s, c, 2)); break;
        case 1: rb_hash_clear(v); break;
        default: hash_put(v, gen_string(s), take(s) % 2 ? rb_float_new(take(s)) : gen_string(s));
        }
    } else if (RB_TYPE_P(v, T_ARRAY) && !RB_OBJ_FROZEN(v)) {
        switch (take(s) % 3) {
        case 0: rb_ary_push(v, gen_value(s, c, 2)); break;
        case 1: rb_ary_clear(v); break;
        default: rb_ary_push(v, gen_string(s));
        }
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    src s = {data, data + size};
    int ci = (int)(take(&s) % fuzz_n_classes);
    const fuzz_class *c = &fuzz_classes[ci];
    VALUE m = rb_class_new_instance(0, NULL, c->klass);
    for (int n = 0; n < 24 && s.p < s.end; n++) {
        unsigned op = take(&s) % 11;
        switch (op) {
        case 0: {
            VALUE arg = gen_hash(&s, c, 0, 1);
            VALUE r = try_call(c->klass, id_new, 1, &arg, allowed, "Klass.new");
            if (r != Qundef) m = r;
            break;
        }
        case 1: case 2: {
            if (!RARRAY_LEN(c->setters)) break;
            VALUE v = op == 2 && take(&s) % 8 == 0 ? basic_object : gen_value(&s, c, 0);
            VALUE args[2] = {RARRAY_AREF(c->setters, take(&s) % RARRAY_LEN(c->setters)), v};
            set_checked(c, m, id_send, 2, args);
            break;
        }
        case 3: {
            VALUE args[2] = {take(&s) % 4 ? gen_key(&s, c) : gen_value(&s, c, 2), gen_value(&s, c, 0)};
            set_checked(c, m, id_aset, 2, args);
            break;
        }
        case 4: check_encoding(c, ci, m); break;
        case 5: check_views(c, m); break;
        case 6: {
            if (!RARRAY_LEN(c->setters)) break;
            VALUE frozen = rb_funcall(rb_funcall(m, id_dup, 0), id_freeze, 0);
            VALUE args[2] = {RARRAY_AREF(c->setters, take(&s) % RARRAY_LEN(c->setters)), gen_value(&s, c, 0)};
            if (try_call(frozen, id_send, 2, args, allowed_frozen, "a setter of a frozen message") != Qundef)
                fuzz_bug("%s: a frozen message accepted a setter", c->desc->name);
            check_encoding(c, ci, frozen);
            break;
        }
        case 7: mutate_container(&s, c, m); check_encoding(c, ci, m); break;
        case 8: {
            VALUE v = take(&s) % 2 ? gen_string(&s) : gen_value(&s, c, 0);
            try_call(c->klass, id_decode, 1, &v, allowed_decode, "Klass.decode");
            break;
        }
        case 9: {
            VALUE v = take(&s) % 2 ? gen_message(&s, 0) : gen_value(&s, c, 0);
            try_call(c->klass, id_encode, 1, &v, allowed, "Klass.encode");
            rb_funcall(m, id_eq, 1, v);
            break;
        }
        default:
            ci = (int)(take(&s) % fuzz_n_classes);
            c = &fuzz_classes[ci];
            m = rb_class_new_instance(0, NULL, c->klass);
        }
    }
    check_encoding(c, ci, m);
    RB_GC_GUARD(m);
    fuzz_gc_tick();
    return 0;
}

static void
print_stats(void)
{
    fprintf(stderr, "convert_target: %lu operations, %lu raised an allowed exception, %lu encodings cross-checked\n"
            "convert_target: protobuf-c cut a string at a NUL (C strings) %lu times\n",
            ops_done, ops_raised, encodes_checked, pc_nul_strings);
}

static VALUE
pinned(VALUE v)
{
    rb_gc_register_mark_object(v);
    return v;
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_ruby_init(argc, argv);
    fuzz_load_official();
    allowed[0] = rb_eTypeError;
    allowed[1] = rb_eArgError;
    allowed[2] = rb_eRangeError;
    allowed[3] = rb_eFrozenError;
    memcpy(allowed_decode, allowed, sizeof(allowed));
    allowed_decode[4] = fuzz_eDecodeError;
    allowed_frozen[0] = rb_eFrozenError;
    for (int i = 0; i < fuzz_n_classes; i++) official[i] = pinned(fuzz_official_class(fuzz_classes[i].desc->name));
    odd_objects = pinned(rb_eval_string(odd_rb));
    basic_object = pinned(rb_eval_string("BasicObject.new"));
    encodings = pinned(rb_eval_string("%w[UTF-8 ASCII-8BIT US-ASCII UTF-16LE UTF-32BE Shift_JIS ISO-8859-1 EUC-JP]"
                                      ".map { |n| Encoding.find(n) }"));
    utf8_samples = pinned(rb_eval_string("['a', 'é', '€', '😀', \"\\u{FFFF}\", \"\\u0000\", 'ß' * 3, 'key']"
                                      ".map { |s| s.b.force_encoding('UTF-8') }"));
    enum_names = pinned(rb_eval_string("Flowctl::Common::HealthStatus.values.keys + "
                                       "[:BOGUS, 'HEALTHY', 2, 7, -1]"));
    id_decode = rb_intern("decode");
    id_encode = rb_intern("encode");
    id_to_proto = rb_intern("to_proto");
    id_to_h = rb_intern("to_h");
    id_new = rb_intern("new");
    id_aset = rb_intern("[]=");
    id_aref = rb_intern("[]");
    id_dup = rb_intern("dup");
    id_freeze = rb_intern("freeze");
    id_inspect = rb_intern("inspect");
    id_hash = rb_intern("hash");
    id_eq = rb_intern("==");
    id_shovel = rb_intern("<<");
    id_delete = rb_intern("delete");
    id_clear = rb_intern("clear");
    id_send = rb_intern("public_send");
    atexit(print_stats);
    return 0;
}
