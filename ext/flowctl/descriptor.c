/*
 * descriptor.c — protobuf-c descriptors built at run time, from a description Ruby has
 * already checked (lib/flowctl/descriptors.rb reads a FileDescriptorSet, validates it
 * and resolves every name). This file only allocates, sorts and links; message.c then
 * builds classes from these descriptors exactly as from protoc-c's.
 *
 * Reading order: the name table, enums (values by number, by name, ranges), messages
 * (fields by number, by name, ranges), then Flowctl::Native.build_descriptors.
 *
 * Descriptors live as long as the process (as protoc-c's static ones do): classes made
 * from them are never removed, so nothing here is ever freed. Built descriptors are never
 * handed to protobuf-c's pack/unpack (their offsets describe no C struct); convert.c
 * encodes and decodes on its own and only uses the lookups below, which protobuf-c
 * implements over the sorted arrays and ranges built here.
 */
#include "flowctl.h"

/* full proto name -> const ProtobufCMessageDescriptor* or ProtobufCEnumDescriptor* (both
 * start with their magic, which tells them apart) */
static st_table *desc_by_name;
/* the batch being built: looked up before desc_by_name, registered there once all is linked */
static st_table *batch;

void
flowctl_descriptor_register(const char *full_name, const void *desc)
{
    st_insert(desc_by_name, (st_data_t)strdup(full_name), (st_data_t)desc);
}

const void *
flowctl_descriptor_lookup(const char *full_name)
{
    st_data_t d;
    if (batch && st_lookup(batch, (st_data_t)full_name, &d)) return (const void *)d;
    return st_lookup(desc_by_name, (st_data_t)full_name, &d) ? (const void *)d : NULL;
}

static char *
dup_str(VALUE s)
{
    StringValue(s);
    char *p = xmalloc((size_t)RSTRING_LEN(s) + 1);
    memcpy(p, RSTRING_PTR(s), (size_t)RSTRING_LEN(s));
    p[RSTRING_LEN(s)] = '\0';
    return p;
}

static const char *
short_name_of(const char *full)
{
    const char *dot = strrchr(full, '.');
    return dot ? dot + 1 : full;
}

/* Ranges of consecutive numbers, as protobuf-c's int_range_lookup reads them: one entry
 * per run {first number, index of its first element}, then {0, count}. nums is sorted. */
static ProtobufCIntRange *
build_ranges(const int *nums, unsigned n, unsigned *n_ranges)
{
    ProtobufCIntRange *r = xmalloc(sizeof(*r) * (n + 1));
    unsigned k = 0;
    for (unsigned i = 0; i < n; i++) {
        if (i == 0 || nums[i] != nums[i - 1] + 1) r[k++] = (ProtobufCIntRange){nums[i], i};
    }
    r[k] = (ProtobufCIntRange){0, n};
    *n_ranges = k;
    return r;
}

/* ---- enums ---------------------------------------------------------------- */

static int
cmp_value_number(const void *a, const void *b)
{
    int x = ((const ProtobufCEnumValue *)a)->value, y = ((const ProtobufCEnumValue *)b)->value;
    return (x > y) - (x < y);
}

static int
cmp_index_name(const void *a, const void *b)
{
    return strcmp(((const ProtobufCEnumValueIndex *)a)->name, ((const ProtobufCEnumValueIndex *)b)->name);
}

/* values: [[name, number], ...] (Ruby checked: names unique, numbers int32). Aliases (two
 * names, one number) keep the first name for the number, and both names for lookups. */
static ProtobufCEnumDescriptor *
build_enum(VALUE full_name, VALUE package, VALUE values)
{
    ProtobufCEnumDescriptor *ed = xcalloc(1, sizeof(*ed));
    long n = RARRAY_LEN(values);
    ProtobufCEnumValue *all = xcalloc(n ? (size_t)n : 1, sizeof(*all));
    for (long i = 0; i < n; i++) {
        VALUE v = rb_ary_entry(values, i);
        all[i].name = all[i].c_name = dup_str(rb_ary_entry(v, 0));
        all[i].value = NUM2INT(rb_ary_entry(v, 1));
    }
    ProtobufCEnumValueIndex *by_name = xcalloc(n ? (size_t)n : 1, sizeof(*by_name));
    ProtobufCEnumValue *uniq = xcalloc(n ? (size_t)n : 1, sizeof(*uniq));
    int *nums = xcalloc(n ? (size_t)n : 1, sizeof(int));
    /* stable: mergesort keeps the first name of a number first */
    ProtobufCEnumValue *sorted = xcalloc(n ? (size_t)n : 1, sizeof(*sorted));
    memcpy(sorted, all, sizeof(*all) * (size_t)n);
    for (long i = 1; i < n; i++) { /* insertion sort: stable, enums are small */
        ProtobufCEnumValue x = sorted[i];
        long j = i - 1;
        while (j >= 0 && cmp_value_number(&sorted[j], &x) > 0) { sorted[j + 1] = sorted[j]; j--; }
        sorted[j + 1] = x;
    }
    unsigned nu = 0;
    for (long i = 0; i < n; i++) {
        if (nu > 0 && uniq[nu - 1].value == sorted[i].value) continue;
        nums[nu] = sorted[i].value;
        uniq[nu++] = sorted[i];
    }
    for (long i = 0; i < n; i++) {
        unsigned k = 0;
        while (uniq[k].value != all[i].value) k++;
        by_name[i] = (ProtobufCEnumValueIndex){all[i].name, k};
    }
    qsort(by_name, (size_t)n, sizeof(*by_name), cmp_index_name);
    xfree(sorted);
    xfree(all);

    ed->magic = PROTOBUF_C__ENUM_DESCRIPTOR_MAGIC;
    ed->name = dup_str(full_name);
    ed->short_name = ed->c_name = short_name_of(ed->name);
    ed->package_name = dup_str(package);
    ed->n_values = nu;
    ed->values = uniq;
    ed->n_value_names = (unsigned)n;
    ed->values_by_name = by_name;
    ed->value_ranges = build_ranges(nums, nu, &ed->n_value_ranges);
    xfree(nums);
    return ed;
}

/* ---- messages --------------------------------------------------------------- */

static int
cmp_field_number(const void *a, const void *b)
{
    uint32_t x = ((const ProtobufCFieldDescriptor *)a)->id, y = ((const ProtobufCFieldDescriptor *)b)->id;
    return (x > y) - (x < y);
}

static int
cmp_field_name(const void *a, const void *b, void *fields)
{
    const ProtobufCFieldDescriptor *fd = fields;
    return strcmp(fd[*(const unsigned *)a].name, fd[*(const unsigned *)b].name);
}

/* The shell of a message: names and fields with everything but their types' descriptors,
 * which link_message fills once every descriptor of the batch exists (types may refer to
 * each other, or to themselves). */
static ProtobufCMessageDescriptor *
build_message(VALUE full_name, VALUE package, VALUE fields)
{
    ProtobufCMessageDescriptor *md = xcalloc(1, sizeof(*md));
    long n = RARRAY_LEN(fields);
    ProtobufCFieldDescriptor *fds = xcalloc(n ? (size_t)n : 1, sizeof(*fds));
    for (long i = 0; i < n; i++) {
        VALUE f = rb_ary_entry(fields, i);
        fds[i].name = dup_str(rb_ary_entry(f, 0));
        fds[i].id = NUM2UINT(rb_ary_entry(f, 1));
        fds[i].label = (ProtobufCLabel)NUM2INT(rb_ary_entry(f, 2));
        fds[i].type = (ProtobufCType)NUM2INT(rb_ary_entry(f, 3));
        fds[i].flags = NUM2UINT(rb_ary_entry(f, 5));
        /* a oneof's members share a quantifier_offset in protoc-c's output; here it is the
         * oneof's index (with PROTOBUF_C_FIELD_FLAG_ONEOF), which message.c reads to clear a
         * member's siblings */
        VALUE oneof = rb_ary_entry(f, 6);
        fds[i].quantifier_offset = NIL_P(oneof) ? 0 : NUM2UINT(oneof);
    }
    qsort(fds, (size_t)n, sizeof(*fds), cmp_field_number);
    unsigned *by_name = xcalloc(n ? (size_t)n : 1, sizeof(unsigned));
    int *nums = xcalloc(n ? (size_t)n : 1, sizeof(int));
    for (long i = 0; i < n; i++) {
        by_name[i] = (unsigned)i;
        nums[i] = (int)fds[i].id;
    }
    qsort_r(by_name, (size_t)n, sizeof(unsigned), cmp_field_name, fds);

    md->magic = PROTOBUF_C__MESSAGE_DESCRIPTOR_MAGIC;
    md->name = dup_str(full_name);
    md->short_name = md->c_name = short_name_of(md->name);
    md->package_name = dup_str(package);
    md->sizeof_message = sizeof(ProtobufCMessage);
    md->n_fields = (unsigned)n;
    md->fields = fds;
    md->fields_sorted_by_name = by_name;
    md->field_ranges = build_ranges(nums, (unsigned)n, &md->n_field_ranges);
    xfree(nums);
    return md;
}

/* Fills each message- or enum-typed field's descriptor from the type name Ruby resolved. */
static void
link_message(ProtobufCMessageDescriptor *md, VALUE fields)
{
    ProtobufCFieldDescriptor *fds = (ProtobufCFieldDescriptor *)md->fields;
    for (long i = 0; i < RARRAY_LEN(fields); i++) {
        VALUE f = rb_ary_entry(fields, i), type_name = rb_ary_entry(f, 4);
        if (NIL_P(type_name)) continue;
        const ProtobufCFieldDescriptor *key = protobuf_c_message_descriptor_get_field(md, NUM2UINT(rb_ary_entry(f, 1)));
        const void *d = flowctl_descriptor_lookup(StringValueCStr(type_name));
        if (!d) rb_raise(rb_eArgError, "%s: type %s is not defined", md->name, StringValueCStr(type_name));
        uint32_t magic = *(const uint32_t *)d;
        bool want_enum = key->type == PROTOBUF_C_TYPE_ENUM;
        if (magic != (want_enum ? PROTOBUF_C__ENUM_DESCRIPTOR_MAGIC : PROTOBUF_C__MESSAGE_DESCRIPTOR_MAGIC))
            rb_raise(rb_eArgError, "%s.%s: %s is not %s", md->name, key->name, StringValueCStr(type_name),
                     want_enum ? "an enum" : "a message");
        fds[key - fds].descriptor = d;
    }
}

static void
check_new(VALUE name)
{
    if (flowctl_descriptor_lookup(StringValueCStr(name))) rb_raise(rb_eArgError, "%"PRIsVALUE" is defined already", name);
}

static VALUE
build_batch(VALUE args)
{
    VALUE enums = rb_ary_entry(args, 0), messages = rb_ary_entry(args, 1);
    for (long i = 0; i < RARRAY_LEN(enums); i++) {
        VALUE e = rb_ary_entry(enums, i);
        check_new(rb_ary_entry(e, 0));
        ProtobufCEnumDescriptor *ed = build_enum(rb_ary_entry(e, 0), rb_ary_entry(e, 1), rb_ary_entry(e, 2));
        st_insert(batch, (st_data_t)ed->name, (st_data_t)ed);
    }
    long n = RARRAY_LEN(messages);
    VALUE holder = rb_str_tmp_new((long)sizeof(ProtobufCMessageDescriptor *) * (n ? n : 1));
    ProtobufCMessageDescriptor **mds = (ProtobufCMessageDescriptor **)RSTRING_PTR(holder);
    for (long i = 0; i < n; i++) {
        VALUE m = rb_ary_entry(messages, i);
        check_new(rb_ary_entry(m, 0));
        mds[i] = build_message(rb_ary_entry(m, 0), rb_ary_entry(m, 1), rb_ary_entry(m, 2));
        st_insert(batch, (st_data_t)mds[i]->name, (st_data_t)mds[i]);
    }
    for (long i = 0; i < n; i++) link_message(mds[i], rb_ary_entry(rb_ary_entry(messages, i), 2));
    RB_GC_GUARD(holder);
    return Qnil;
}

static int
register_each(st_data_t name, st_data_t desc, st_data_t arg)
{
    flowctl_descriptor_register((const char *)name, (const void *)desc);
    return ST_CONTINUE;
}

static VALUE
end_batch(VALUE ok)
{
    /* all or nothing: a batch that failed leaves no descriptor behind (its memory is lost,
     * which only a bug in the Ruby checks can cause) */
    if (RTEST(ok)) st_foreach(batch, register_each, 0);
    st_free_table(batch);
    batch = NULL;
    return Qnil;
}

/*
 * call-seq:
 *   Flowctl::Native.build_descriptors(enums, messages) -> nil
 *
 * enums: [[full_name, package, [[value_name, number], ...]], ...]
 * messages: [[full_name, package, [[name, number, label, type, type_name_or_nil, flags, oneof], ...]], ...]
 * with protobuf-c's label, type and flag numbers. Ruby has checked every name, number and
 * reference (Flowctl::Descriptors); a type name that is not defined still raises ArgumentError
 * here, before anything is registered.
 */
static VALUE
native_build_descriptors(VALUE mod, VALUE enums, VALUE messages)
{
    Check_Type(enums, T_ARRAY);
    Check_Type(messages, T_ARRAY);
    if (batch) rb_raise(eFlowctlError, "descriptors are being built already");
    batch = st_init_strtable();
    int state = 0;
    rb_protect(build_batch, rb_assoc_new(enums, messages), &state);
    end_batch(state ? Qfalse : Qtrue);
    if (state) rb_jump_tag(state);
    return Qnil;
}

/* call-seq: Flowctl::Native.descriptor_kind("flowctl.v1.Event") -> :message, :enum or nil */
static VALUE
native_descriptor_kind(VALUE mod, VALUE name)
{
    const void *d = flowctl_descriptor_lookup(StringValueCStr(name));
    if (!d) return Qnil;
    return ID2SYM(rb_intern(*(const uint32_t *)d == PROTOBUF_C__ENUM_DESCRIPTOR_MAGIC ? "enum" : "message"));
}

void
init_flowctl_descriptor(void)
{
    desc_by_name = st_init_strtable();
    rb_define_module_function(mFlowctlNative, "build_descriptors", native_build_descriptors, 2);
    rb_define_module_function(mFlowctlNative, "descriptor_kind", native_descriptor_kind, 1);
}
