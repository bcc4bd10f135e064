/*
 * fork.c — fork without stale gRPC state.
 *
 * gRPC core 1.51 supports fork only when GRPC_ENABLE_FORK_SUPPORT is set before
 * grpc_init: then grpc_prefork() stops its timer and executor threads, and
 * grpc_postfork_child() closes the parent's sockets in the child, gives it fresh
 * pollers and restarts its threads. Without that, the child shares the parent's
 * pollers and has none of its threads: calls in the child hang or steal the parent's
 * events. gRPC core refuses to prepare while another thread is inside gRPC, and then
 * the child cannot use gRPC at all.
 *
 * So:
 * - flowctl_fork_env() turns fork support on before grpc_init, and picks the "poll"
 *   poller (unless the user chose GRPC_ENABLE_FORK_SUPPORT / GRPC_POLL_STRATEGY). With
 *   the default epoll1 poller the parent and every child share one kernel epoll set
 *   whose registrations outlive the parent's sockets while a child still holds copies:
 *   measured here, forking a hundred times with a heartbeat and a stream alive crashed
 *   the parent in 19 of 20 runs ("Closure already scheduled" in LockfreeEvent::SetReady)
 *   and failed calls in children; with "poll", which keeps no such kernel state, 20 of
 *   20 runs were clean, at the same call rates (bench/rpc.rb).
 * - the gate (flowctl.h): before a fork no thread of ours stays inside gRPC: Ruby
 *   threads waiting on calls, heartbeat threads and server acceptors step out and
 *   wait, so gRPC core's handlers can run whatever the program is doing; after the
 *   fork they carry on in the parent. All of it runs in pthread_atfork handlers.
 * - in the child, objects from before the fork (channels, streams, servers) are left
 *   alone: using them raises IOError, freeing them frees memory only, and every socket
 *   gRPC core made for them is pointed at a dead socket before gRPC's threads start
 *   there, so the child can never read or write its parent's connections (below).
 * - files that keep threads or process-wide state (pump.c, heartbeat.c) register their
 *   own hooks (flowctl_fork_register): this file calls none of them by name, so the
 *   threading core depends one way: clock.c <- fork.c <- wait.c, pump.c, heartbeat.c.
 * gRPC core still skips its handlers when a thread that is not ours is inside gRPC
 * (the official grpc gem): the child is then told so by a Flowctl::Error from
 * flowctl_fork_check() (new channels, new heartbeats) instead of hanging.
 */
#include "flowctl.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <grpc/support/log.h>

#ifdef FLOWCTL_FORK_INTERNALS
/* libgrpc.so 1.51 exports these with C++ linkage (grpc/impl/codegen/fork.h lacks an
 * extern "C" guard), hence the mangled names. extconf.rb checks that they are there. */
void flowctl_grpc_prefork(void) __asm__("_Z12grpc_preforkv");
void flowctl_grpc_postfork_parent(void) __asm__("_Z20grpc_postfork_parentv");
void flowctl_grpc_postfork_child(void) __asm__("_Z19grpc_postfork_childv");
static const bool fork_internals = true;
#else
/*
 * Built without them (a libgrpc that does not export them, or --disable-fork-internals /
 * FLOWCTL_NO_GRPC_CXX=1): gRPC core cannot be prepared for a fork, so a forked child cannot
 * use gRPC (flowctl_fork_check says so) and keeps the parent's sockets open; the parent is
 * not affected. The rest of the gem works the same.
 */
static void flowctl_grpc_prefork(void) {}
static void flowctl_grpc_postfork_parent(void) {}
static void flowctl_grpc_postfork_child(void) {}
static const bool fork_internals = false;
#endif

pid_t flowctl_pid;
static bool fork_support; /* GRPC_ENABLE_FORK_SUPPORT was on when grpc_init ran */
static bool prepared;     /* fork_prepare ran grpc_prefork for the fork under way */
static atomic_bool skipped; /* ... and gRPC core said it skipped its handlers */
static const char *child_broken; /* in a child whose gRPC core was not prepared: why */

/* ---- the gate ------------------------------------------------------------ */

static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cond;  /* (gate_lock) the gate opened, or a thread left gRPC */
static bool gate_closed;          /* (gate_lock) a fork is being prepared */
static __thread unsigned gate_depth; /* this thread's nested stretches (the outermost one counts) */
static unsigned gate_inside;      /* (gate_lock) threads of ours inside gRPC now */

/* ---- fork hooks, registered by the files that need them ------------------- */

#define MAX_HOOKS 8
static const flowctl_fork_hooks *hooks[MAX_HOOKS];
static size_t n_hooks;

/* At load, from an init_flowctl_* function (the GVL held, before any fork). */
void
flowctl_fork_register(const flowctl_fork_hooks *h)
{
    if (n_hooks == MAX_HOOKS) rb_raise(rb_eRuntimeError, "flowctl: too many fork hooks (%s)", h->name);
    hooks[n_hooks++] = h;
}

static void
run_close_hooks(void)
{
    for (size_t i = 0; i < n_hooks; i++)
        if (hooks[i]->close) hooks[i]->close();
}

static void
run_evict_hooks(void)
{
    for (size_t i = 0; i < n_hooks; i++)
        if (hooks[i]->evict) hooks[i]->evict();
}

static void
run_child_hooks(void)
{
    for (size_t i = 0; i < n_hooks; i++)
        if (hooks[i]->child) hooks[i]->child();
}

void
flowctl_gate_enter(void)
{
    if (gate_depth++ > 0) return; /* already inside: a fork waits for the outermost stretch */
    pthread_mutex_lock(&gate_lock);
    while (gate_closed) pthread_cond_wait(&gate_cond, &gate_lock);
    gate_inside++;
    pthread_mutex_unlock(&gate_lock);
}

bool
flowctl_gate_enter_unless(const atomic_bool *woken)
{
    if (gate_depth > 0) {
        gate_depth++;
        return true;
    }
    pthread_mutex_lock(&gate_lock);
    while (gate_closed && !atomic_load(woken)) {
        struct timespec t = flowctl_mono_in(0.02);
        pthread_cond_timedwait(&gate_cond, &gate_lock, &t);
    }
    bool in = !gate_closed;
    if (in) {
        gate_inside++;
        gate_depth = 1;
    }
    pthread_mutex_unlock(&gate_lock);
    return in;
}

void
flowctl_gate_leave(void)
{
    if (--gate_depth > 0) return;
    pthread_mutex_lock(&gate_lock);
    gate_inside--;
    if (gate_closed) pthread_cond_broadcast(&gate_cond);
    pthread_mutex_unlock(&gate_lock);
}

/* (gate_lock) true when every thread of ours left gRPC before `until`. */
static bool
gate_wait_empty(struct timespec until)
{
    while (gate_inside > 0)
        if (pthread_cond_timedwait(&gate_cond, &gate_lock, &until) == ETIMEDOUT) break;
    return gate_inside == 0;
}

/* Closes the gate and waits for our threads to leave gRPC: waits poll every 20 ms and
 * acceptors every 50 ms; after 0.2 s the evict hooks make the others leave (a heartbeat
 * cancels its beat). Gives up after
 * about `seconds` (gRPC core then finds a thread inside and skips its handlers). */
static void
gate_close(double seconds)
{
    pthread_mutex_lock(&gate_lock);
    gate_closed = true;
    pthread_mutex_unlock(&gate_lock);
    run_close_hooks();
    pthread_mutex_lock(&gate_lock);
    bool empty = gate_wait_empty(flowctl_mono_in(0.2));
    pthread_mutex_unlock(&gate_lock);
    if (empty) return;
    run_evict_hooks();
    pthread_mutex_lock(&gate_lock);
    gate_wait_empty(flowctl_mono_in(seconds));
    pthread_mutex_unlock(&gate_lock);
}

static void
gate_open(void)
{
    pthread_mutex_lock(&gate_lock);
    gate_closed = false;
    pthread_cond_broadcast(&gate_cond);
    pthread_mutex_unlock(&gate_lock);
}

static void
gate_init(void)
{
    flowctl_cond_init(&gate_cond);
}

/* In the child: the parent's threads do not exist here, whatever state they left. */
static void
gate_atfork_child(void)
{
    pthread_mutex_init(&gate_lock, NULL);
    gate_init();
    gate_closed = false;
    gate_inside = 0;
}

/* ---- gRPC core's own threads ----------------------------------------------------- */

/*
 * grpc_prefork() blocks new ExecCtxs, then joins the executor and timer threads. A
 * closure such a thread runs at that moment may open a nested ExecCtx (a call's last
 * unref offloaded to the executor does: ~FilterStackCall ->
 * grpc_client_security_context_destroy): it then waits for the fork forever, and the
 * join waits for it (seen here with a call in flight in another thread). So before
 * grpc_prefork, with our threads out of gRPC, we let those threads finish what they
 * were doing: until each sleeps and none has run for a millisecond (Linux /proc), at
 * most 100 ms.
 */
static const char *const joined_threads[] = {"default-executo", "resolver-execut", "grpc_global_tim"};

static bool
joined_thread(const char *task)
{
    char path[64], comm[32] = "";
    snprintf(path, sizeof(path), "/proc/self/task/%s/comm", task);
    FILE *f = fopen(path, "r");
    if (!f) return false;
    bool found = fgets(comm, sizeof(comm), f) != NULL;
    fclose(f);
    if (!found) return false;
    comm[strcspn(comm, "\n")] = 0;
    for (size_t i = 0; i < sizeof(joined_threads) / sizeof(joined_threads[0]); i++)
        if (strcmp(comm, joined_threads[i]) == 0) return true;
    return false;
}

/* Adds the times the thread was scheduled to *runs; false when it is not asleep. */
static bool
thread_asleep(const char *task, unsigned long long *runs)
{
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/self/task/%s/stat", task);
    FILE *f = fopen(path, "r");
    if (!f) return true; /* gone */
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    const char *state = strrchr(buf, ')');
    bool asleep = !state || state[1] != ' ' || state[2] == 'S';
    snprintf(path, sizeof(path), "/proc/self/task/%s/schedstat", task);
    unsigned long long run_ns, wait_ns, slices;
    if ((f = fopen(path, "r"))) {
        if (fscanf(f, "%llu %llu %llu", &run_ns, &wait_ns, &slices) == 3) *runs += slices;
        fclose(f);
    }
    return asleep;
}

/* true when every executor and timer thread sleeps; *runs sums how often they ran. */
static bool
joined_threads_asleep(unsigned long long *runs)
{
    DIR *d = opendir("/proc/self/task");
    if (!d) return true; /* no /proc: nothing to watch */
    bool asleep = true;
    *runs = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] == '.' || !joined_thread(e->d_name)) continue;
        if (!thread_asleep(e->d_name, runs)) asleep = false;
    }
    closedir(d);
    return asleep;
}

static void
settle_grpc_threads(void)
{
    struct timespec limit = flowctl_mono_in(0.1), ms = {0, 1000000}, now;
    unsigned long long before, after;
    do {
        bool a = joined_threads_asleep(&before);
        nanosleep(&ms, NULL);
        if (a && joined_threads_asleep(&after) && before == after) return;
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while (now.tv_sec < limit.tv_sec || (now.tv_sec == limit.tv_sec && now.tv_nsec < limit.tv_nsec));
}

/* ---- the parent's sockets in a child ------------------------------------------- */

/*
 * A child inherits every socket of its parent, and gRPC core 1.51's poll poller closes
 * only some of them in the child (measured: a channel's TCP connection stayed open
 * there). The parent's transports live on in the child's copy of memory, and gRPC's
 * timers restart there: the client channel's backup poller (every 5 s) polls them. When
 * a reply to the parent was waiting in the socket at the fork, the child read it: the
 * parent's call never saw its reply and ended at its deadline (about once in 5,000
 * forks with calls in flight; spec/faults_fork_spec.rb).
 *
 * So every channel and server of ours carries a socket mutator (a gRPC core channel
 * arg; it changes nothing on the socket) whose only job is to note each socket gRPC
 * core makes: its number and inode. In the child, each noted number that still holds
 * that socket is pointed at a dead socket instead (dup3 of one end of a socketpair
 * whose other end is closed): the child can no longer read or write the parent's
 * connections, its stale copies of them see end-of-file, and the numbers stay taken so
 * that a stale copy never reaches a socket the child opens later.
 */

/* libgrpc 1.51's grpc_socket_mutator and its vtable (src/core/lib/iomgr/socket_mutator.h,
 * not installed); grpc_types.h declares the struct without its members. */
typedef struct {
    bool (*mutate_fd)(int fd, grpc_socket_mutator *m);
    int (*compare)(grpc_socket_mutator *a, grpc_socket_mutator *b);
    void (*destroy)(grpc_socket_mutator *m);
    bool (*mutate_fd_2)(const void *info, grpc_socket_mutator *m);
} socket_mutator_vtable;

struct grpc_socket_mutator {
    const socket_mutator_vtable *vtable;
    gpr_refcount refcount;
};

static pthread_mutex_t sockets_lock = PTHREAD_MUTEX_INITIALIZER;
static ino_t *socket_inode; /* (sockets_lock) by fd number: the socket gRPC made there, 0: none */
static size_t socket_slots;  /* (sockets_lock) */

#ifdef FLOWCTL_FORK_INTERNALS /* (without: no socket is noted, a child keeps its parent's) */
void flowctl_grpc_socket_mutator_init(grpc_socket_mutator *m, const socket_mutator_vtable *v)
    __asm__("_Z24grpc_socket_mutator_initP19grpc_socket_mutatorPK26grpc_socket_mutator_vtable");
grpc_arg flowctl_grpc_socket_mutator_to_arg(grpc_socket_mutator *m)
    __asm__("_Z26grpc_socket_mutator_to_argP19grpc_socket_mutator");

static bool
note_socket(int fd, grpc_socket_mutator *m)
{
    (void)m;
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) return true;
    pthread_mutex_lock(&sockets_lock);
    if ((size_t)fd >= socket_slots) {
        size_t n = socket_slots ? socket_slots : 64;
        while (n <= (size_t)fd) n *= 2;
        ino_t *grown = realloc(socket_inode, n * sizeof(ino_t));
        if (grown) {
            memset(grown + socket_slots, 0, (n - socket_slots) * sizeof(ino_t));
            socket_inode = grown;
            socket_slots = n;
        }
    }
    if ((size_t)fd < socket_slots) socket_inode[fd] = st.st_ino;
    pthread_mutex_unlock(&sockets_lock);
    return true; /* false would fail the connection */
}

static int
same_mutator(grpc_socket_mutator *a, grpc_socket_mutator *b)
{
    return a == b ? 0 : (a < b ? -1 : 1);
}

static void
keep_mutator(grpc_socket_mutator *m)
{
    (void)m; /* static: never freed */
}

static const socket_mutator_vtable noting_vtable = {note_socket, same_mutator, keep_mutator, NULL};
static grpc_socket_mutator noting_mutator;
static pthread_once_t noting_once = PTHREAD_ONCE_INIT;

static void
noting_init(void)
{
    flowctl_grpc_socket_mutator_init(&noting_mutator, &noting_vtable);
}
#endif

grpc_arg
flowctl_fork_socket_arg(void)
{
#ifdef FLOWCTL_FORK_INTERNALS
    pthread_once(&noting_once, noting_init);
    return flowctl_grpc_socket_mutator_to_arg(&noting_mutator);
#else
    return (grpc_arg){.type = GRPC_ARG_INTEGER, .key = "flowctl.no_socket_mutator", .value.integer = 1};
#endif
}

#define MAX_LISTENERS 64

/*
 * In the child (single-threaded, inside fork()): the parent's gRPC sockets go dead here.
 * gRPC core 1.51 gives a server's listening sockets to the mutator but not the
 * connections it accepts on them: those are found as the TCP sockets whose local port
 * is a noted listener's (no other socket can have it).
 */
static void
disown_parent_sockets(void)
{
    int dead[2];
    if (!socket_slots || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, dead) != 0) return;
    close(dead[1]);
    int ports[MAX_LISTENERS], n_ports = 0;
    for (size_t fd = 0; fd < socket_slots; fd++) {
        ino_t ino = socket_inode[fd];
        socket_inode[fd] = 0;
        struct stat st;
        if (!ino || (int)fd == dead[0] || fstat((int)fd, &st) != 0 || !S_ISSOCK(st.st_mode) || st.st_ino != ino)
            continue;
        int port;
        if (n_ports < MAX_LISTENERS && flowctl_conn_listening((int)fd) && (port = flowctl_conn_local_port((int)fd)) > 0)
            ports[n_ports++] = port;
        while (dup3(dead[0], (int)fd, O_CLOEXEC) < 0 && errno == EINTR) {}
    }
    DIR *d = n_ports ? opendir("/proc/self/fd") : NULL;
    for (struct dirent *e; d && (e = readdir(d));) {
        int fd = atoi(e->d_name);
        if (e->d_name[0] == '.' || fd == dirfd(d) || fd == dead[0] || flowctl_conn_listening(fd)) continue;
        int port = flowctl_conn_local_port(fd);
        for (int i = 0; port && i < n_ports; i++) {
            if (ports[i] != port) continue;
            while (dup3(dead[0], fd, O_CLOEXEC) < 0 && errno == EINTR) {}
            break;
        }
    }
    if (d) closedir(d);
    close(dead[0]);
}

/* ---- gRPC core's fork handlers ------------------------------------------------ */

/* grpc_prefork() returns nothing; the only sign that it refused (another thread was
 * inside gRPC) is an INFO log line. While it runs, log lines pass through here. */
static void
fork_log(gpr_log_func_args *a)
{
    if (a->message && strstr(a->message, "skipping fork() handlers")) atomic_store(&skipped, true);
    flowctl_log_line(a); /* where gRPC's lines go otherwise (log.c) */
}

static void
prefork_watched(void)
{
    atomic_store(&skipped, false);
    flowctl_log_apply_verbosity(GPR_LOG_SEVERITY_INFO);
    gpr_set_log_function(fork_log);
    flowctl_grpc_prefork();
    gpr_set_log_function(flowctl_log_line);
    flowctl_log_apply_verbosity(GPR_LOG_SEVERITY_ERROR);
}

void
flowctl_fork_check(void)
{
    if (child_broken) rb_raise(eFlowctlError, "gRPC cannot be used in this forked child: %s", child_broken);
}

/* A user's own setting wins; an empty one counts as unset. */
void
flowctl_default_env(const char *name, const char *value)
{
    const char *v = getenv(name);
    if (!v || !*v) setenv(name, value, 1);
}

void
flowctl_fork_env(void)
{
    flowctl_pid = getpid();
    flowctl_default_env("GRPC_ENABLE_FORK_SUPPORT", "1");
    flowctl_default_env("GRPC_POLL_STRATEGY", "poll");
    const char *v = getenv("GRPC_ENABLE_FORK_SUPPORT");
    fork_support = v && (strcmp(v, "1") == 0 || strcasecmp(v, "true") == 0);
}

/*
 * The fork handlers (pthread_atfork), so they run inside fork() itself: between
 * prepare and parent/child no other Ruby thread can run (the forking thread holds the
 * GVL throughout), and none can call into gRPC core while its ExecCtx is blocked
 * (that would wait inside gRPC holding the GVL: a deadlock once anything else wanted
 * the GVL, as a Process._fork hook allowed). Whatever calls fork() is covered.
 */
static void
fork_prepare(void)
{
    if (!fork_internals) { /* nothing to prepare gRPC core with: the child will not use it */
        pthread_mutex_lock(&sockets_lock);
        return;
    }
    gate_close(2.0);
    prepared = fork_internals && fork_support && !child_broken;
    if (prepared) {
        settle_grpc_threads();
        prefork_watched();
    }
    pthread_mutex_lock(&sockets_lock); /* no socket is noted halfway through the fork */
}

static void
fork_parent(void)
{
    pthread_mutex_unlock(&sockets_lock);
    if (prepared) flowctl_grpc_postfork_parent();
    prepared = false;
    gate_open();
}

static void
fork_child(void)
{
    flowctl_pid = getpid();
    pthread_mutex_unlock(&sockets_lock);
    disown_parent_sockets(); /* before gRPC core's threads start again in this child */
    gate_atfork_child();
    run_child_hooks();
    if (child_broken) {
        /* a child of a child that could not use gRPC: nor can this one */
    } else if (!fork_internals) {
        child_broken = "this build of flowctl has no gRPC core fork support (libgrpc's grpc_prefork family was not "
                       "found when it was compiled, or it was built with FLOWCTL_NO_GRPC_CXX=1), so gRPC core cannot "
                       "run in a child; exec a new program instead";
    } else if (!fork_support) {
        child_broken = "gRPC fork support is off (GRPC_ENABLE_FORK_SUPPORT is set to something else than 1), "
                       "so gRPC core cannot run in a child; exec a new program instead";
    } else if (atomic_load(&skipped)) {
        child_broken = "when the process forked, a thread was inside gRPC core that flowctl could not move out "
                       "(the official grpc gem, or a flowctl call that stayed inside for 2 s), so gRPC core could "
                       "not prepare for the fork; fork before using such threads, or exec a new program";
    } else {
        flowctl_grpc_postfork_child();
    }
    prepared = false;
}

/* call-seq: Flowctl::Native.fork_usable? -> true or false (false in a child where gRPC cannot be used) */
static VALUE
native_fork_usable_p(VALUE mod)
{
    return child_broken ? Qfalse : Qtrue;
}

/* call-seq: Flowctl::Native.fork_internals? -> true or false (built with gRPC core's fork handlers) */
static VALUE
native_fork_internals_p(VALUE mod)
{
    return fork_internals ? Qtrue : Qfalse;
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
    gate_init();
    if (pthread_atfork(fork_prepare, fork_parent, fork_child) != 0)
        rb_raise(rb_eRuntimeError, "flowctl: pthread_atfork failed");
    rb_define_module_function(mFlowctlNative, "fork_support?", native_fork_support_p, 0);
    rb_define_module_function(mFlowctlNative, "fork_internals?", native_fork_internals_p, 0);
    rb_define_module_function(mFlowctlNative, "grpc_usable?", native_fork_usable_p, 0);
}
