/*
 * chanargs.c — a Ruby Hash of channel args into grpc_arg entries: the one converter for
 * clients (channel.c) and servers (server.c). Flowctl::ChannelArgs.normalize has checked
 * the Hash: String keys, Integer (C int) or String values.
 */
#include "flowctl.h"

struct fill {
    grpc_arg *args;
    size_t count;
};

static int
fill_each(VALUE k, VALUE v, VALUE p)
{
    struct fill *f = (struct fill *)p;
    grpc_arg *a = &f->args[f->count++];
    a->key = (char *)StringValueCStr(k);
    if (RB_INTEGER_TYPE_P(v)) {
        a->type = GRPC_ARG_INTEGER;
        a->value.integer = NUM2INT(v);
    } else {
        a->type = GRPC_ARG_STRING;
        a->value.string = (char *)StringValueCStr(v);
    }
    return ST_CONTINUE;
}

size_t
flowctl_channel_args_fill(VALUE hash, grpc_arg *args)
{
    if (NIL_P(hash)) return 0;
    Check_Type(hash, T_HASH);
    struct fill f = {.args = args, .count = 0};
    rb_hash_foreach(hash, fill_each, (VALUE)&f);
    return f.count;
}
