/*
 * Init_flowctl: starts gRPC core once and lets each file define its part.
 */
#include "flowctl.h"

VALUE mFlowctl;
VALUE mFlowctlNative;
VALUE eFlowctlError;
VALUE eFlowctlDecodeError;

void
Init_flowctl(void)
{
    flowctl_fork_env();
    flowctl_channel_env();
    grpc_init();

    mFlowctl = rb_define_module("Flowctl");
    mFlowctlNative = rb_define_module_under(mFlowctl, "Native");
    eFlowctlError = rb_define_class_under(mFlowctl, "Error", rb_eStandardError);
    eFlowctlDecodeError = rb_define_class_under(mFlowctl, "DecodeError", eFlowctlError);

    init_flowctl_log();
    init_flowctl_status();
    init_flowctl_metadata();
    init_flowctl_wait();
    init_flowctl_watch();
    init_flowctl_descriptor();
    init_flowctl_message();
    init_flowctl_reflect();
    init_flowctl_json_class();
    init_flowctl_channel();
    init_flowctl_call();
    init_flowctl_fiber();
    init_flowctl_pump();
    init_flowctl_server();
    init_flowctl_server_call();
    init_flowctl_heartbeat();
    init_flowctl_heartbeat_class();
    init_flowctl_fork();
}
