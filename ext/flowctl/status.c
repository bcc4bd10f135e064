/*
 * status.c — gRPC status codes as Ruby exceptions: Flowctl::RPCError and one
 * subclass per code (Flowctl::Unavailable, Flowctl::DeadlineExceeded, ...).
 */
#include "flowctl.h"

static VALUE eRPCError;
static VALUE status_classes[GRPC_STATUS_UNAUTHENTICATED + 1];
static ID id_code, id_details, id_metadata;

static const char *const status_names[][2] = {
    [GRPC_STATUS_OK] = {"OK", "Ok"},
    [GRPC_STATUS_CANCELLED] = {"CANCELLED", "Cancelled"},
    [GRPC_STATUS_UNKNOWN] = {"UNKNOWN", "Unknown"},
    [GRPC_STATUS_INVALID_ARGUMENT] = {"INVALID_ARGUMENT", "InvalidArgument"},
    [GRPC_STATUS_DEADLINE_EXCEEDED] = {"DEADLINE_EXCEEDED", "DeadlineExceeded"},
    [GRPC_STATUS_NOT_FOUND] = {"NOT_FOUND", "NotFound"},
    [GRPC_STATUS_ALREADY_EXISTS] = {"ALREADY_EXISTS", "AlreadyExists"},
    [GRPC_STATUS_PERMISSION_DENIED] = {"PERMISSION_DENIED", "PermissionDenied"},
    [GRPC_STATUS_RESOURCE_EXHAUSTED] = {"RESOURCE_EXHAUSTED", "ResourceExhausted"},
    [GRPC_STATUS_FAILED_PRECONDITION] = {"FAILED_PRECONDITION", "FailedPrecondition"},
    [GRPC_STATUS_ABORTED] = {"ABORTED", "Aborted"},
    [GRPC_STATUS_OUT_OF_RANGE] = {"OUT_OF_RANGE", "OutOfRange"},
    [GRPC_STATUS_UNIMPLEMENTED] = {"UNIMPLEMENTED", "Unimplemented"},
    [GRPC_STATUS_INTERNAL] = {"INTERNAL", "Internal"},
    [GRPC_STATUS_UNAVAILABLE] = {"UNAVAILABLE", "Unavailable"},
    [GRPC_STATUS_DATA_LOSS] = {"DATA_LOSS", "DataLoss"},
    [GRPC_STATUS_UNAUTHENTICATED] = {"UNAUTHENTICATED", "Unauthenticated"},
};

#define STATUS_COUNT ((int)(sizeof(status_names) / sizeof(status_names[0])))

static VALUE
class_for(int code)
{
    if (code > 0 && code < STATUS_COUNT) return status_classes[code];
    return status_classes[GRPC_STATUS_UNKNOWN];
}

static VALUE
error_message(int c, const char *name, VALUE details)
{
    VALUE msg = rb_sprintf("%d:%s", c, name);
    if (RSTRING_LEN(details) > 0) msg = rb_sprintf("%"PRIsVALUE": %"PRIsVALUE, msg, details);
    return msg;
}

static VALUE
default_code(VALUE klass)
{
    VALUE code = rb_const_get_at(klass, rb_intern("CODE"));
    return code;
}

/*
 * call-seq:
 *   Flowctl::NotFound.new(details = nil, metadata: {})   -> error
 *   Flowctl::RPCError.new(details = nil, code: 2, metadata: {})
 *
 * Handlers raise these to end a call with that status.
 */
static VALUE
rpc_error_initialize(int argc, VALUE *argv, VALUE self)
{
    VALUE details, opts, code = Qnil, metadata = Qnil;
    rb_scan_args(argc, argv, "01:", &details, &opts);
    if (!NIL_P(opts)) {
        ID keys[2] = {id_code, id_metadata};
        VALUE vals[2];
        rb_get_kwargs(opts, keys, 0, 2, vals);
        if (vals[0] != Qundef) code = vals[0];
        if (vals[1] != Qundef) metadata = vals[1];
    }
    if (NIL_P(code)) code = default_code(rb_obj_class(self));
    int c = NUM2INT(code);
    if (c < 0 || c >= STATUS_COUNT) rb_raise(rb_eArgError, "unknown gRPC status code %d", c);
    if (NIL_P(details)) details = rb_str_new_cstr("");
    StringValue(details);
    if (NIL_P(metadata)) metadata = rb_hash_new();
    Check_Type(metadata, T_HASH);

    VALUE msg = error_message(c, status_names[c][0], details);
    rb_call_super(1, &msg);
    rb_ivar_set(self, id_code, INT2FIX(c));
    rb_ivar_set(self, id_details, details);
    rb_ivar_set(self, id_metadata, metadata);
    return self;
}

/* call-seq: error.code -> Integer (the gRPC status code) */
static VALUE rpc_error_code(VALUE self) { return rb_ivar_get(self, id_code); }
/* call-seq: error.details -> String */
static VALUE rpc_error_details(VALUE self) { return rb_ivar_get(self, id_details); }
/* call-seq: error.metadata -> Hash (the trailing metadata) */
static VALUE rpc_error_metadata(VALUE self) { return rb_ivar_get(self, id_metadata); }

/*
 * call-seq: Flowctl::RPCError.for_code(14) -> Flowctl::Unavailable
 */
static VALUE
rpc_error_for_code(VALUE klass, VALUE code)
{
    return class_for(NUM2INT(code));
}

/* What a peer sent as details, as valid UTF-8 (invalid bytes become U+FFFD). */
static VALUE
scrubbed(VALUE details)
{
    if (NIL_P(details)) return rb_str_new_cstr("");
    details = rb_str_dup(details);
    rb_enc_associate(details, rb_utf8_encoding());
    if (rb_enc_str_coderange(details) != ENC_CODERANGE_BROKEN) return details;
    VALUE clean = rb_str_scrub(details, Qnil);
    return NIL_P(clean) ? details : clean;
}

/*
 * The error for a status a peer sent: its details scrubbed to valid UTF-8; a code
 * outside 0..16 gives a Flowctl::RPCError carrying that code ("42:UNKNOWN_CODE").
 */
VALUE
flowctl_status_error(grpc_status_code code, VALUE details, VALUE metadata)
{
    details = scrubbed(details);
    if (NIL_P(metadata)) metadata = rb_hash_new();
    bool known = (int)code >= 0 && (int)code < STATUS_COUNT;
    VALUE kw = rb_hash_new();
    rb_hash_aset(kw, ID2SYM(id_code), INT2FIX(known ? (int)code : GRPC_STATUS_UNKNOWN));
    rb_hash_aset(kw, ID2SYM(id_metadata), metadata);
    VALUE args[2] = {details, kw};
    if (known) return rb_class_new_instance_kw(2, args, class_for(code), RB_PASS_KEYWORDS);
    /* RPCError.new refuses such a code (a handler must use a real one): built as UNKNOWN,
     * then given the code the peer sent */
    VALUE err = rb_class_new_instance_kw(2, args, eRPCError, RB_PASS_KEYWORDS);
    rb_ivar_set(err, id_code, INT2NUM((int)code));
    rb_ivar_set(err, rb_intern("mesg"), error_message((int)code, "UNKNOWN_CODE", details));
    return err;
}

void
flowctl_raise_status(grpc_status_code code, VALUE details, VALUE metadata)
{
    rb_exc_raise(flowctl_status_error(code, details, metadata));
}

void
init_flowctl_status(void)
{
    id_code = rb_intern("code");
    id_details = rb_intern("details");
    id_metadata = rb_intern("metadata");

    eRPCError = rb_define_class_under(mFlowctl, "RPCError", eFlowctlError);
    rb_define_const(eRPCError, "CODE", INT2FIX(GRPC_STATUS_UNKNOWN));
    flowctl_ractor_safe(true); /* ivars of the error and the frozen table below: any Ractor */
    rb_define_method(eRPCError, "initialize", rpc_error_initialize, -1);
    rb_define_method(eRPCError, "code", rpc_error_code, 0);
    rb_define_method(eRPCError, "details", rpc_error_details, 0);
    rb_define_method(eRPCError, "metadata", rpc_error_metadata, 0);
    rb_define_singleton_method(eRPCError, "for_code", rpc_error_for_code, 1);
    flowctl_ractor_safe(false);

    VALUE names = rb_hash_new();
    for (int c = 1; c < STATUS_COUNT; c++) {
        status_classes[c] = rb_define_class_under(mFlowctl, status_names[c][1], eRPCError);
        rb_define_const(status_classes[c], "CODE", INT2FIX(c));
        rb_hash_aset(names, INT2FIX(c), ID2SYM(rb_intern(status_names[c][0])));
    }
    status_classes[GRPC_STATUS_OK] = eRPCError;
    rb_hash_aset(names, INT2FIX(0), ID2SYM(rb_intern("OK")));
    rb_define_const(eRPCError, "CODE_NAMES", rb_obj_freeze(names));
}
