/*
 * Init_flowctl: starts gRPC core once and lets each file define its part.
 */
#include "flowctl.h"
#include <dlfcn.h>

VALUE mFlowctl;
VALUE mFlowctlNative;
VALUE eFlowctlError;
VALUE eFlowctlDecodeError;

/*
 * Debian's gRPC core 1.51 locks through Abseil's Mutex, and Debian builds Abseil without
 * NDEBUG: every lock and every mutex destroyed goes through its deadlock detector (a graph
 * of lock order: 5-10% of a server's CPU per unary call). A release build of Abseil has it
 * off; so is it here, unless FLOWCTL_ABSL_DEADLOCK_DETECTION=1 (for debugging gRPC itself).
 * The function is looked up by its C++ name; another Abseil build simply keeps its default.
 */
static void
absl_deadlock_detection_off(void)
{
    const char *keep = getenv("FLOWCTL_ABSL_DEADLOCK_DETECTION");
    if (keep && strcmp(keep, "1") == 0) return;
    void (*set_mode)(int) = (void (*)(int))dlsym(
        RTLD_DEFAULT, "_ZN4absl7debian329SetMutexDeadlockDetectionModeENS0_15OnDeadlockCycleE");
    if (set_mode) set_mode(0); /* absl::OnDeadlockCycle::kIgnore */
}

void
Init_flowctl(void)
{
    flowctl_fork_env();
    flowctl_channel_env();
    absl_deadlock_detection_off();
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
    init_flowctl_relay_class();
    init_flowctl_fiber();
    init_flowctl_pump();
    init_flowctl_server();
    init_flowctl_server_call();
    init_flowctl_heartbeat();
    init_flowctl_heartbeat_class();
    init_flowctl_beat_table_class();
    init_flowctl_fork();
}
