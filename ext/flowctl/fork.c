/*
 * fork.c — fork without stale gRPC state.
 *
 * gRPC core 1.51 supports fork only when GRPC_ENABLE_FORK_SUPPORT is set before
 * grpc_init (and with the epoll1 or poll poller, epoll1 being the Linux default): then
 * grpc_prefork() stops its timer and executor threads, and grpc_postfork_child() gives
 * the child a fresh epoll set (closing the parent's sockets in the child) and restarts
 * its threads. Without that, the child shares the parent's epoll set and has none of
 * its threads: calls in the child hang or steal the parent's events.
 *
 * So: flowctl_fork_env() turns fork support on before grpc_init (unless the user set
 * GRPC_ENABLE_FORK_SUPPORT), and lib/flowctl/heartbeat.rb hooks Process._fork to call
 * before_fork / after_fork_parent / after_fork_child. gRPC core skips its handlers
 * while any thread is inside gRPC, so before_fork first keeps the heartbeat threads
 * out of it. The heartbeat's own pthread_atfork child handler forgets the parent's
 * heartbeats whatever path the fork took.
 */
#include "flowctl.h"

#include <stdlib.h>
#include <strings.h>

/* libgrpc.so 1.51 exports these with C++ linkage (grpc/impl/codegen/fork.h lacks an
 * extern "C" guard), hence the mangled names. */
void flowctl_grpc_prefork(void) __asm__("_Z12grpc_preforkv");
void flowctl_grpc_postfork_parent(void) __asm__("_Z20grpc_postfork_parentv");
void flowctl_grpc_postfork_child(void) __asm__("_Z19grpc_postfork_childv");

static bool fork_support; /* GRPC_ENABLE_FORK_SUPPORT was on when grpc_init ran */
static bool prepared;     /* before_fork ran grpc_prefork for the fork under way */

void
flowctl_fork_env(void)
{
    setenv("GRPC_ENABLE_FORK_SUPPORT", "1", 0); /* 0: a user's own setting wins */
    const char *v = getenv("GRPC_ENABLE_FORK_SUPPORT");
    fork_support = v && (strcmp(v, "1") == 0 || strcasecmp(v, "true") == 0);
}

/*
 * call-seq: Flowctl::Native.before_fork -> true or false
 *
 * Keeps heartbeat threads out of gRPC (waiting at most about 2 s) and prepares gRPC
 * core. false when gRPC fork support is off or a heartbeat thread could not be stopped.
 */
static VALUE
native_before_fork(VALUE mod)
{
    bool quiet = flowctl_heartbeat_before_fork(2.0);
    prepared = fork_support;
    if (prepared) flowctl_grpc_prefork();
    return quiet && prepared ? Qtrue : Qfalse;
}

/* call-seq: Flowctl::Native.after_fork_parent -> nil */
static VALUE
native_after_fork_parent(VALUE mod)
{
    if (prepared) flowctl_grpc_postfork_parent();
    prepared = false;
    flowctl_heartbeat_after_fork_parent();
    return Qnil;
}

/* call-seq: Flowctl::Native.after_fork_child -> nil */
static VALUE
native_after_fork_child(VALUE mod)
{
    if (prepared) flowctl_grpc_postfork_child();
    prepared = false;
    return Qnil;
}

/* call-seq: Flowctl::Native.fork_support? -> true or false (gRPC core's fork support is on) */
static VALUE
native_fork_support_p(VALUE mod)
{
    return fork_support ? Qtrue : Qfalse;
}

void
init_flowctl_fork(void)
{
    rb_define_module_function(mFlowctlNative, "before_fork", native_before_fork, 0);
    rb_define_module_function(mFlowctlNative, "after_fork_parent", native_after_fork_parent, 0);
    rb_define_module_function(mFlowctlNative, "after_fork_child", native_after_fork_child, 0);
    rb_define_module_function(mFlowctlNative, "fork_support?", native_fork_support_p, 0);
}
