/*
 * json_class.c — the Ruby binding of json_write.c (lib/flowctl/json.rb calls it):
 *
 *   Flowctl::Native.json_plan(klass, special, [[name, json_name], ...])
 *   Flowctl::Native.json_encode(msg, flags) -> String, nil or a Class
 *   Flowctl::Native.json_map_order([key bytes, ...]) -> [index, ...]
 *   Flowctl::Native.json_decode(klass, text) -> message, nil or a Class
 *
 * The Ruby layer decides the names and which classes are special; this file only
 * turns its arguments into C and the engine's result into Ruby.
 */
#include "flowctl.h"
#include "json_text.h"

#define JSON_STACK 4096

static const flowctl_class *
class_arg(VALUE klass)
{
    const flowctl_class *ci = RB_TYPE_P(klass, T_CLASS) ? flowctl_class_of(klass) : NULL;
    if (!ci) rb_raise(rb_eTypeError, "%+"PRIsVALUE" is not a message class", klass);
    return ci;
}

/* The index in ci->fields of the field named by a Symbol. */
static unsigned
field_index(const flowctl_class *ci, VALUE name)
{
    st_data_t i;
    if (!SYMBOL_P(name) || !st_lookup(ci->by_name, (st_data_t)SYM2ID(name), &i))
        rb_raise(rb_eArgError, "%+"PRIsVALUE" is not a field of %"PRIsVALUE, name, ci->klass);
    return (unsigned)i;
}

/*
 * call-seq: Flowctl::Native.json_plan(klass, special, [[name, json_name], ...]) -> nil
 *
 * What Flowctl::Native.json_encode prints for klass: its fields in the order given,
 * under their JSON names (Symbol .proto name, String JSON name; every field once);
 * special: the Ruby encoder prints this class (json_encode returns nil). Once per class.
 */
static VALUE
native_json_plan(VALUE mod, VALUE klass, VALUE special, VALUE names)
{
    const flowctl_class *ci = class_arg(klass);
    Check_Type(names, T_ARRAY);
    long n = RARRAY_LEN(names);
    if (n != (long)ci->n_fields)
        rb_raise(rb_eArgError, "%"PRIsVALUE" has %u fields (given %ld names)", klass, ci->n_fields, n);
    unsigned *index = ALLOCA_N(unsigned, n + 1);
    const char **json = ALLOCA_N(const char *, n + 1);
    for (long i = 0; i < n; i++) {
        VALUE row = rb_ary_entry(names, i);
        Check_Type(row, T_ARRAY);
        VALUE name = rb_ary_entry(row, 0), json_name = rb_ary_entry(row, 1);
        index[i] = field_index(ci, name);
        json[i] = StringValueCStr(json_name);
    }
    if (!flowctl_json_plan_add(ci, RTEST(special), index, json, (unsigned)n)) rb_memerror();
    RB_GC_GUARD(names);
    return Qnil;
}

/*
 * call-seq: Flowctl::Native.json_encode(msg, flags) -> String, nil or Class
 *
 * The proto3 JSON of msg (flags: 1 emit_defaults, 2 preserve_proto_fieldnames,
 * 4 format_enums_as_integers); nil when the Ruby encoder must print it (or name what is
 * wrong in it); a message class when that class needs its json_plan first.
 */
static VALUE
native_json_encode(VALUE mod, VALUE msg, VALUE flags)
{
    flowctl_msg_get(msg); /* TypeError for anything else */
    char stack[JSON_STACK];
    jbuf b = {.p = stack, .cap = sizeof(stack)};
    const flowctl_class *missing = NULL;
    flowctl_json_result r = flowctl_json_write(&b, msg, NUM2UINT(flags), &missing);
    VALUE out = Qnil;
    if (r == JSON_OK) out = rb_utf8_str_new(b.p, (long)b.len);
    else if (r == JSON_NO_PLAN) out = missing->klass;
    jb_free(&b);
    if (r == JSON_NO_MEMORY) rb_memerror();
    RB_GC_GUARD(msg);
    return out;
}

/*
 * call-seq: Flowctl::Native.json_map_order([key, ...]) -> [index, ...]
 *
 * The order google-protobuf prints a map whose keys were inserted in the order given:
 * the indexes of the keys, first printed first. A key is given as its bytes (binary
 * String): a string key's, an integer key packed in native order at its C size (1 byte
 * for bool, 4 for the 32-bit types, 8 for the 64-bit ones). json_order.c says how.
 */
static VALUE
native_json_map_order(VALUE mod, VALUE keys)
{
    Check_Type(keys, T_ARRAY);
    long n = RARRAY_LEN(keys);
    VALUE held = rb_ary_new_capa(n); /* the Strings, kept while their bytes are used */
    json_key *k = ALLOC_N(json_key, n + 1);
    size_t *order = ALLOC_N(size_t, n + 1);
    for (long i = 0; i < n; i++) {
        VALUE s = rb_ary_entry(keys, i);
        if (!RB_TYPE_P(s, T_STRING)) {
            xfree(k);
            xfree(order);
            rb_raise(rb_eTypeError, "map keys must be given as Strings of bytes (given %"PRIsVALUE")", rb_obj_class(s));
        }
        rb_ary_push(held, s);
        k[i] = (json_key){RSTRING_PTR(s), (size_t)RSTRING_LEN(s)};
    }
    bool ok = json_upb_map_order(k, (size_t)n, order);
    VALUE out = ok ? rb_ary_new_capa(n) : Qnil;
    for (long i = 0; ok && i < n; i++) rb_ary_push(out, SIZET2NUM(order[i]));
    xfree(k);
    xfree(order);
    if (!ok) rb_memerror();
    RB_GC_GUARD(held);
    return out;
}

struct json_decode_args {
    const flowctl_class *ci;
    VALUE text;
    flowctl_json_result result;
    const flowctl_class *missing;
    VALUE out;
};

static VALUE
json_decode_protected(VALUE p)
{
    struct json_decode_args *a = (struct json_decode_args *)p;
    a->result = flowctl_json_read(a->ci, RSTRING_PTR(a->text), (size_t)RSTRING_LEN(a->text), &a->out, &a->missing);
    return Qnil;
}

/*
 * call-seq: Flowctl::Native.json_decode(klass, text) -> message, nil or Class
 *
 * A message of klass read from proto3 JSON text by json_read.c; nil when the Ruby
 * decoder must read the text (or name what is wrong with it); a message class when that
 * class needs its json_plan first. Raises nothing of its own: an error inside (a setter
 * refusing a value) gives nil too, so the Ruby decoder reports it.
 */
static VALUE
native_json_decode(VALUE mod, VALUE klass, VALUE text)
{
    struct json_decode_args a = {.ci = class_arg(klass), .text = text, .out = Qnil};
    Check_Type(text, T_STRING);
    int enc = ENCODING_GET(text);
    if (enc != rb_utf8_encindex() && enc != rb_ascii8bit_encindex()) return Qnil;
    int state = 0;
    rb_protect(json_decode_protected, (VALUE)&a, &state);
    if (state) {
        rb_set_errinfo(Qnil);
        return Qnil;
    }
    RB_GC_GUARD(text);
    if (a.result == JSON_NO_PLAN) return a.missing->klass;
    return a.result == JSON_OK ? a.out : Qnil;
}

void
init_flowctl_json_class(void)
{
    init_flowctl_json_write();
    rb_define_module_function(mFlowctlNative, "json_plan", native_json_plan, 3);
    rb_define_module_function(mFlowctlNative, "json_encode", native_json_encode, 2);
    rb_define_module_function(mFlowctlNative, "json_map_order", native_json_map_order, 1);
    rb_define_module_function(mFlowctlNative, "json_decode", native_json_decode, 2);
}
