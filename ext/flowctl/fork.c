/*
 * fork.c — fork without stale gRPC state.
 *
 * gRPC core 1.51 supports fork only when GRPC_ENABLE_FORK_SUPPORT is set before
 * grpc_init (and with the epoll1 or poll poller, epoll1 being the Linux default): then
 * grpc_prefork() stops its timer and executor threads, and grpc_postfork_child() gives
 * the child a fresh epoll set (closing the parent's sockets in the child) and restarts
 * its threads. Without that, the child shares the parent's epoll set and has none of
 * its threads: calls in the child hang or steal the parent's events. gRPC core also
 * refuses to prepare while another thread is inside gRPC (a server's request loop, a
 * call waiting in another thread): the child is then told so by a Flowctl::Error from
 * flowctl_fork_check() (new channels, new heartbeats) instead of hanging.
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
#include <string.h>
#include <strings.h>

#include <grpc/support/log.h>

/* libgrpc.so 1.51 exports these with C++ linkage (grpc/impl/codegen/fork.h lacks an
 * extern "C" guard), hence the mangled names. */
void flowctl_grpc_prefork(void) __asm__("_Z12grpc_preforkv");
void flowctl_grpc_postfork_parent(void) __asm__("_Z20grpc_postfork_parentv");
void flowctl_grpc_postfork_child(void) __asm__("_Z19grpc_postfork_childv");
void flowctl_gpr_default_log(gpr_log_func_args *args) __asm__("_Z15gpr_default_logP17gpr_log_func_args");

static bool fork_support; /* GRPC_ENABLE_FORK_SUPPORT was on when grpc_init ran */
static bool prepared;     /* before_fork ran grpc_prefork for the fork under way */
static atomic_bool skipped; /* ... and gRPC core said it skipped its handlers */
static int forward_min;   /* the GRPC_VERBOSITY the user asked for (3: none) */
static const char *child_broken; /* in a child whose gRPC core was not prepared: why */

/* grpc_prefork() returns nothing; the only sign that it refused (another thread was
 * inside gRPC) is an INFO log line. While it runs, log lines pass through here. */
static void
fork_log(gpr_log_func_args *a)
{
    if (a->message && strstr(a->message, "skipping fork() handlers")) atomic_store(&skipped, true);
    if ((int)a->severity >= forward_min) flowctl_gpr_default_log(a);
}

static int
user_verbosity(void)
{
    const char *v = getenv("GRPC_VERBOSITY");
    if (!v) return GPR_LOG_SEVERITY_ERROR;
    if (strcasecmp(v, "DEBUG") == 0) return GPR_LOG_SEVERITY_DEBUG;
    if (strcasecmp(v, "INFO") == 0) return GPR_LOG_SEVERITY_INFO;
    if (strcasecmp(v, "NONE") == 0) return GPR_LOG_SEVERITY_ERROR + 1;
    return GPR_LOG_SEVERITY_ERROR;
}

static void
prefork_watched(void)
{
    forward_min = user_verbosity();
    atomic_store(&skipped, false);
    gpr_set_log_verbosity(forward_min < GPR_LOG_SEVERITY_INFO ? GPR_LOG_SEVERITY_DEBUG : GPR_LOG_SEVERITY_INFO);
    gpr_set_log_function(fork_log);
    flowctl_grpc_prefork();
    gpr_set_log_function(flowctl_gpr_default_log);
    gpr_set_log_verbosity(forward_min > GPR_LOG_SEVERITY_ERROR ? GPR_LOG_SEVERITY_ERROR : (gpr_log_severity)forward_min);
}

void
flowctl_fork_check(void)
{
    if (child_broken) rb_raise(eFlowctlError, "gRPC cannot be used in this forked child: %s", child_broken);
}

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
    if (prepared) prefork_watched();
    return quiet && prepared && !atomic_load(&skipped) ? Qtrue : Qfalse;
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
    if (!fork_support) {
        child_broken = "gRPC fork support is off (GRPC_ENABLE_FORK_SUPPORT is set to something else than 1), "
                       "so gRPC core cannot run in a child; exec a new program instead";
    } else if (prepared && atomic_load(&skipped)) {
        child_broken = "when the process forked, another thread was inside gRPC (a running Flowctl::Server, "
                       "a call in progress in another thread, or the official grpc gem), so gRPC core could not "
                       "prepare for the fork; fork before starting servers and calls, or exec a new program";
    } else if (prepared) {
        flowctl_grpc_postfork_child();
    }
    prepared = false;
    return Qnil;
}

/* call-seq: Flowctl::Native.fork_usable? -> true or false (false in a child where gRPC cannot be used) */
static VALUE
native_fork_usable_p(VALUE mod)
{
    return child_broken ? Qfalse : Qtrue;
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
    rb_define_module_function(mFlowctlNative, "grpc_usable?", native_fork_usable_p, 0);
}
