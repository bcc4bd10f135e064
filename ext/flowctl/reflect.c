/*
 * reflect.c — what a message class's fields are, read from its protobuf-c field
 * descriptors, for the Ruby layer (Flowctl::MessageDescriptor, proto3 JSON).
 *
 * One primitive, Flowctl::Native.message_fields(klass): a table, built fresh on each
 * call (lib/flowctl/descriptor.rb keeps it), with one row per field in declaration
 * order. Whatever built the ProtobufCMessageDescriptor (protoc-c output or a descriptor
 * set loaded at run time), the rows come from the same structs the codec uses.
 */
#include "flowctl.h"

static VALUE
type_sym(const ProtobufCFieldDescriptor *fd)
{
    return ID2SYM(rb_intern(flowctl_type_names[fd->type]));
}

/* [[name, number], ...] in declaration order; nil for a field that is not an enum. */
static VALUE
enum_values(const ProtobufCFieldDescriptor *fd)
{
    if (fd->type != PROTOBUF_C_TYPE_ENUM) return Qnil;
    const ProtobufCEnumDescriptor *ed = fd->descriptor;
    VALUE out = rb_ary_new_capa(ed->n_values);
    for (unsigned i = 0; i < ed->n_values; i++)
        rb_ary_push(out, rb_ary_new_from_args(2, rb_str_new_cstr(ed->values[i].name), INT2NUM(ed->values[i].value)));
    return out;
}

/* The full proto name of what one value is: a message or enum type; nil for scalars. */
static VALUE
type_name(const ProtobufCFieldDescriptor *fd)
{
    if (fd->type == PROTOBUF_C_TYPE_MESSAGE) return rb_str_new_cstr(((const ProtobufCMessageDescriptor *)fd->descriptor)->name);
    if (fd->type == PROTOBUF_C_TYPE_ENUM) return rb_str_new_cstr(((const ProtobufCEnumDescriptor *)fd->descriptor)->name);
    return Qnil;
}

/* The class of a message-typed value, nil for scalars, Timestamps (Time) and unresolved types. */
static VALUE
sub_class(const flowctl_field *f)
{
    if (!f->sub_desc) return Qnil;
    const flowctl_class *sub = flowctl_class_of_desc(f->sub_desc);
    return sub ? sub->klass : Qnil;
}

static const char *
kind_name(const flowctl_field *f)
{
    return f->kind == FK_MAP ? "map" : f->kind == FK_REPEATED ? "repeated" : "singular";
}

/* One row: see native_message_fields. */
static VALUE
field_row(const flowctl_field *f)
{
    VALUE row = rb_ary_new_capa(11);
    rb_ary_push(row, f->sym);
    rb_ary_push(row, UINT2NUM(f->fd->id));
    rb_ary_push(row, type_sym(f->elem));
    rb_ary_push(row, ID2SYM(rb_intern(kind_name(f))));
    rb_ary_push(row, f->key ? type_sym(f->key) : Qnil);
    rb_ary_push(row, f->presence ? Qtrue : Qfalse);
    rb_ary_push(row, type_name(f->elem));
    rb_ary_push(row, sub_class(f));
    rb_ary_push(row, enum_values(f->elem));
    rb_ary_push(row, f->packed ? Qtrue : Qfalse);
    rb_ary_push(row, f->oneof ? UINT2NUM(f->oneof) : Qnil);
    return row;
}

/*
 * call-seq: Flowctl::Native.message_fields(klass) -> [row, ...]
 *
 * One row per field of a message class, in declaration order:
 *   [name (Symbol), number, type (Symbol: :int64, :string, :enum, :message, ...; for a
 *    map the value's type), kind (:singular, :repeated or :map), key type (Symbol, maps
 *    only), presence (true for a proto3 `optional` scalar), type name (full proto name of
 *    a message or enum type, else nil), message class (nil for Timestamp and scalars),
 *    enum values ([[name, number], ...] or nil), packed, oneof (members of one oneof share
 *    this number; nil outside oneofs)]
 * TypeError when klass is not a message class.
 */
static VALUE
native_message_fields(VALUE mod, VALUE klass)
{
    const flowctl_class *ci = RB_TYPE_P(klass, T_CLASS) ? flowctl_class_of(klass) : NULL;
    if (!ci) rb_raise(rb_eTypeError, "%+"PRIsVALUE" is not a message class", klass);
    VALUE rows = rb_ary_new_capa(ci->n_fields);
    for (unsigned i = 0; i < ci->n_fields; i++) rb_ary_push(rows, field_row(&ci->fields[i]));
    return rows;
}

void
init_flowctl_reflect(void)
{
    rb_define_module_function(mFlowctlNative, "message_fields", native_message_fields, 1);
}
