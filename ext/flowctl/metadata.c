/*
 * metadata.c — gRPC metadata (headers:) to and from Ruby Hashes, validated.
 */
#include "flowctl.h"

static VALUE
slice_str(grpc_slice s, rb_encoding *enc)
{
    return rb_enc_str_new((const char *)GRPC_SLICE_START_PTR(s), (long)GRPC_SLICE_LENGTH(s), enc);
}

VALUE
flowctl_metadata_to_hash(const grpc_metadata *md, size_t count)
{
    VALUE h = rb_hash_new();
    for (size_t i = 0; i < count; i++) {
        VALUE key = slice_str(md[i].key, rb_utf8_encoding());
        rb_encoding *enc = grpc_is_binary_header(md[i].key) ? rb_ascii8bit_encoding() : rb_utf8_encoding();
        VALUE val = slice_str(md[i].value, enc);
        VALUE prev = rb_hash_lookup2(h, key, Qundef);
        if (prev == Qundef) {
            rb_hash_aset(h, key, val);
        } else if (RB_TYPE_P(prev, T_ARRAY)) {
            rb_ary_push(prev, val);
        } else {
            rb_hash_aset(h, key, rb_ary_new_from_args(2, prev, val));
        }
    }
    return h;
}

static void
md_push(flowctl_metadata *m, grpc_slice key, VALUE val)
{
    if (!RB_TYPE_P(val, T_STRING)) {
        grpc_slice_unref(key);
        rb_raise(rb_eTypeError, "header %"PRIsVALUE" must be a String (given %"PRIsVALUE")",
                 rb_str_new((const char *)GRPC_SLICE_START_PTR(key), (long)GRPC_SLICE_LENGTH(key)),
                 rb_obj_class(val));
    }
    grpc_slice value = grpc_slice_from_copied_buffer(RSTRING_PTR(val), (size_t)RSTRING_LEN(val));
    if (!grpc_is_binary_header(key) && !grpc_header_nonbin_value_is_legal(value)) {
        VALUE k = rb_str_new((const char *)GRPC_SLICE_START_PTR(key), (long)GRPC_SLICE_LENGTH(key));
        grpc_slice_unref(key);
        grpc_slice_unref(value);
        rb_raise(rb_eArgError, "header %"PRIsVALUE" has a value that is not printable ASCII "
                 "(use a key ending in -bin for binary values)", k);
    }
    if (m->count == m->capa) {
        m->capa = m->capa ? m->capa * 2 : 4;
        m->md = ruby_xrealloc2(m->md, m->capa, sizeof(grpc_metadata));
    }
    memset(&m->md[m->count], 0, sizeof(grpc_metadata));
    m->md[m->count].key = key;
    m->md[m->count].value = value;
    m->count++;
}

static grpc_slice
md_key(VALUE k)
{
    if (SYMBOL_P(k)) k = rb_sym2str(k);
    if (!RB_TYPE_P(k, T_STRING))
        rb_raise(rb_eTypeError, "header names must be String or Symbol (given %"PRIsVALUE")", rb_obj_class(k));
    grpc_slice key = grpc_slice_from_copied_buffer(RSTRING_PTR(k), (size_t)RSTRING_LEN(k));
    if (RSTRING_LEN(k) == 0 || !grpc_header_key_is_legal(key) || RSTRING_PTR(k)[0] == ':') {
        grpc_slice_unref(key);
        rb_raise(rb_eArgError, "invalid header name %+"PRIsVALUE" (lowercase letters, digits, '-', '_' and '.' only)", k);
    }
    return key;
}

struct from_hash_arg {
    VALUE hash;
    flowctl_metadata *out;
};

static int
md_each(VALUE k, VALUE v, VALUE arg)
{
    flowctl_metadata *m = (flowctl_metadata *)arg;
    if (RB_TYPE_P(v, T_ARRAY)) {
        for (long i = 0; i < RARRAY_LEN(v); i++) md_push(m, md_key(k), RARRAY_AREF(v, i));
    } else {
        md_push(m, md_key(k), v);
    }
    return ST_CONTINUE;
}

static VALUE
from_hash_body(VALUE a)
{
    struct from_hash_arg *arg = (struct from_hash_arg *)a;
    rb_hash_foreach(arg->hash, md_each, (VALUE)arg->out);
    return Qnil;
}

void
flowctl_metadata_from_hash(VALUE hash, flowctl_metadata *out)
{
    out->md = NULL;
    out->count = out->capa = 0;
    if (NIL_P(hash)) return;
    if (!RB_TYPE_P(hash, T_HASH))
        rb_raise(rb_eTypeError, "headers: must be a Hash (given %"PRIsVALUE")", rb_obj_class(hash));
    struct from_hash_arg arg = {hash, out};
    int state = 0;
    rb_protect(from_hash_body, (VALUE)&arg, &state);
    if (state) {
        flowctl_metadata_free(out);
        rb_jump_tag(state);
    }
}

void
flowctl_metadata_free(flowctl_metadata *m)
{
    for (size_t i = 0; i < m->count; i++) {
        grpc_slice_unref(m->md[i].key);
        grpc_slice_unref(m->md[i].value);
    }
    ruby_xfree(m->md);
    m->md = NULL;
    m->count = m->capa = 0;
}

/*
 * call-seq: Flowctl::Native.validate_headers(hash) -> hash
 *
 * Raises ArgumentError/TypeError naming the first bad header; used by the Ruby layer
 * to check per-client headers once, up front.
 */
static VALUE
native_validate_headers(VALUE mod, VALUE hash)
{
    flowctl_metadata m;
    flowctl_metadata_from_hash(hash, &m);
    flowctl_metadata_free(&m);
    return hash;
}

void
init_flowctl_metadata(void)
{
    rb_define_module_function(mFlowctlNative, "validate_headers", native_validate_headers, 1);
}
