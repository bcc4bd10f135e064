/*
 * server_engine.h — the native server engine (server_engine.c), shared by its two Ruby
 * bindings: server.c (Flowctl::Native::Server) and server_call.c (Flowctl::Native::ServerCall).
 * Nothing here touches Ruby: the engine's threads (acceptor, watchdog) never hold the GVL,
 * and the bindings call it with or without the GVL as each function says.
 */
#ifndef FLOWCTL_SERVER_ENGINE_H
#define FLOWCTL_SERVER_ENGINE_H 1

#include "flowctl.h"
#include <pthread.h>

struct call_slot;

/* What completed on the server's notify_cq: a new call, or a batch of a unary call
 * (server_unary.c; SLOT_SEND: a worker handed its status over). Every tag on that queue but
 * the shutdown's is one of these. */
enum { SLOT_NEW, SLOT_RECV, SLOT_STATUS, SLOT_CLOSE, SLOT_SEND };
typedef struct {
    struct call_slot *slot;
    int kind;
} slot_tag;

#define FLOWCTL_MAX_UNARY 64       /* registered unary methods per server */

/* One accepted call (or one grpc_server_request_call waiting for one): its batches complete
 * on its own pump (pump.c), or, for a registered unary method (unary >= 0), on the server's
 * notify_cq, where the acceptor takes them (server_unary.c). */
typedef struct call_slot {
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    flowctl_pump pump;          /* the call's batches complete on pump.cq (pump.c) */
    bool status_sent;           /* the status batch completed: never cancel after that */
    struct call_slot *next;     /* handoff queue link, then the lingering list's */
    gpr_timespec wait_until;    /* queued with no idle worker: rejected after this */
    int64_t queued_us;          /* when it was queued (CLOCK_MONOTONIC) */
    bool handed;                /* (owner's mu) taken by a worker, not yet let go of (holding) */
    /* The status batch, started and left to complete while the call lingers (section 2b):
     * gRPC borrows the message and writes `cancelled` until the batch completes. */
    grpc_op status_ops[4];
    grpc_byte_buffer *status_msg;
    grpc_metadata *status_md;   /* the trailing metadata (malloc'd, slices owned) */
    size_t status_md_count;
    int close_cancelled;
    void *owner;                /* its server_t */
    int64_t linger_until_ms;    /* its peer has not taken the status by then: stuck */
    char *peer;                 /* grpc_call_get_peer, once lingering */
    /* a registered unary method's call (server_unary.c); the pump is unused */
    slot_tag t_new, t_recv, t_status, t_close, t_send;
    size_t n_status;            /* ops in status_ops, built by the worker, started by the acceptor */
    grpc_slice status_details;  /* the status's details, kept until the slot is freed */
    int unary;                  /* index in server_t.unary, or -1 */
    grpc_op recv_op;
    grpc_byte_buffer *payload;  /* the request message (NULL: none came), until the worker takes it */
    _Atomic int refs;           /* its batches on notify_cq + whoever holds it */
    bool watching;              /* RECV_CLOSE_ON_SERVER started before the status */
    atomic_bool closed;         /* ... and completed (close_cancelled tells how) */
    struct call_slot *fprev, *fnext; /* (mu) the server's list of unary statuses in flight */
} call_slot;

/* A grpc_server, its acceptor and watchdog threads, and the calls handed to workers. */
typedef struct {
    grpc_server *server;
    grpc_completion_queue *notify_cq; /* registered with the server: new calls + shutdown */
    pthread_t acceptor;
    pthread_mutex_t mu;
    pthread_cond_t cond;              /* shutdown done, acceptor done */
    pthread_cond_t work;              /* workers: a call was queued, or the server shuts down */
    call_slot *queue_head, *queue_tail;
    int queued;
    int idle;                         /* Ruby workers waiting in Server#next_call */
    int max_waiting;                  /* calls that may wait for a worker beyond the idle ones */
    gpr_timespec max_wait;            /* how long such a call waits before RESOURCE_EXHAUSTED */
    int outstanding;                  /* grpc_server_request_call in flight */
    long accepted, rejected;
    /* calls whose status batch is in flight (2b): handed over by workers (linger_in, mu),
     * kept by the acceptor (lingering, acceptor only); n_lingering counts both (mu) */
    call_slot *linger_in, *lingering;
    int n_lingering;
    int64_t last_sweep_ms;
    int64_t write_timeout_ms;         /* a peer that takes nothing we send for this long is stuck */
    _Atomic long stuck_closed;        /* connections shut down as stuck (counted before the shutdown) */
    long unauthenticated;             /* calls refused for a missing or wrong token (mu) */
    long reset_early;                 /* calls the peer cancelled before a worker got them (mu) */
    flowctl_offenders offenders;      /* peers' refused or reset calls, per second (mu) */
    char shut_peers[8][64];           /* (mu) the last connections shut down: their queued calls are dropped */
    int shut_next;                    /* (mu) */
    long dropped;                     /* (mu) calls of a shut connection, dropped as they came */
    _Atomic long abusive_closed;      /* shut down for too many refused calls (counted before) */
    /* memory watch (acceptor only): RSS every WATCH_MS over the last WATCH_SAMPLES */
    size_t rss[8];
    int rss_next;
    int64_t last_watch_ms;
    size_t memory_burst;              /* RSS growth within the window that sheds a connection (0: off) */
    pthread_t watchdog;               /* runs watch_memory; the acceptor joins it when it ends */
    pthread_cond_t watchdog_wake;     /* (mu) shutdown ends the watchdog's pause (monotonic clock) */
    _Atomic int64_t acceptor_beat_ms; /* when the acceptor last came back from gRPC */
    clockid_t acceptor_clock;         /* the acceptor thread's CPU clock, once acceptor_clock_set */
    atomic_bool acceptor_clock_set;
    int64_t stall_beat_ms, stall_cpu_ms; /* watchdog: the beat it last saw, the acceptor's CPU then */
    _Atomic long stall_closed;        /* shut down while the acceptor was held (counted before) */
    _Atomic long idle_shed;           /* shut down near the descriptor limit (counted before) */
    int pending_ticks;                /* watchdog: checks in a row that found the listener not accepting */
    int64_t exhausted_ms;             /* watchdog: when descriptors last ran out (or nearly) */
    bool listener_stopped;            /* (mu) gRPC core stopped accepting on our port: see 2d */
    bool watchdog_running;
    _Atomic long memory_closed;       /* shut down for it (counted before) */
    char *auth_token;                 /* calls must carry "authorization: Bearer <it>" (NULL: any call) */
    size_t auth_len;
    int ports[8], n_ports;            /* the listening ports: a peer's connection is found by them */
    bool started, shutting_down, shutdown_done, acceptor_done, closed, orphaned;
    char shutdown_tag;                /* its address is the shutdown tag */
    pid_t pid;                        /* in a forked child the server is the parent's: leave it */
    /* registered unary methods (server_unary.c): their calls complete on notify_cq; fast: a
     * native answer tried on the acceptor before a worker (no answer: none) */
    struct { char *path; void *handle; flowctl_fast_unary fast; } unary[FLOWCTL_MAX_UNARY];
    long answered_natively;           /* (mu) unary calls the fast answer took */
    int n_unary;
    int awaiting;                     /* (mu) unary calls admitted, their request not yet read */
    int holding;                      /* (mu) calls taken by workers and not let go of yet */
    int signalled;                    /* (mu) idle workers woken, not yet awake */
    int64_t last_take_us;             /* (mu) when a worker last took a call */
    int64_t last_wake_us;             /* (mu) when an idle worker was last woken */
    call_slot *flying;                /* (mu) unary calls whose status is in flight (counted in n_lingering) */
} server_t;

/* Counters for Server#stats, read under the server's lock. */
typedef struct {
    long accepted, rejected, stuck_closed, unauthenticated, abusive_closed, memory_closed, stall_closed;
    long reset_early, idle_shed, dropped, answered_natively;
    int idle, queued, lingering;
    bool listener_stopped;
} flowctl_server_counts;

/* ---- slots ---- */
/* Frees a slot, cancelling its call when it never got a status (any thread, no GVL needed). */
void flowctl_slot_free(call_slot *s);
/* Builds the status batch in slot->status_ops (initial metadata when no reply carried it, the
 * last message (taken from *msg), the status with a copy of md, the close): how many ops, or 0
 * when out of memory. details must live until the batch completes or the call is freed. */
/* A refusal's batch in slot->status_ops (initial metadata, the status, the close): how many ops. */
size_t flowctl_slot_refusal_ops(call_slot *slot, grpc_status_code code, grpc_slice *details);
size_t flowctl_slot_status_ops(call_slot *slot, const flowctl_metadata *md, grpc_byte_buffer **msg,
                               grpc_status_code code, grpc_slice *details);

/* ---- the server (with the GVL unless said otherwise: none of these calls Ruby) ---- */
server_t *flowctl_server_new(void);                                 /* NULL: out of memory */
void flowctl_server_create(server_t *s, const grpc_channel_args *args);
int flowctl_server_start(server_t *s);                              /* 0, or an errno */
void flowctl_server_shutdown(server_t *s);                          /* idempotent */
void flowctl_server_shutdown_unstarted(server_t *s);
void flowctl_server_close(server_t *s);       /* after the acceptor is done: joins it, frees gRPC's part */
void flowctl_server_free(server_t *s);        /* never blocks; an acceptor still running frees s itself */
void flowctl_server_counts_get(server_t *s, flowctl_server_counts *out);

/* Without the GVL: waits until ready(s) or *stop (set by flowctl_server_interrupt) or the
 * timeout (< 0: none); ready(s) as it stands then. */
bool flowctl_server_wait(server_t *s, bool (*ready)(server_t *), double timeout, const bool *stop);
bool flowctl_server_shutdown_ready(server_t *s); /* every call ended after shutdown (s->mu held) */
bool flowctl_server_acceptor_ready(server_t *s); /* the acceptor thread has ended (s->mu held) */
/* Any thread: sets *stop and wakes every waiter of this server (an unblock function). */
void flowctl_server_interrupt(server_t *s, bool *stop);

/* Without the GVL: the next call for a worker (counted idle meanwhile), or NULL once the
 * server shuts down or *stop is set. */
call_slot *flowctl_server_take(server_t *s, const bool *stop);
/* With the GVL (never waits): a call already queued, or NULL. */
call_slot *flowctl_server_try_take(server_t *s);
/* A worker lets go of a call it took (any thread); the server may finish shutting down. */
void flowctl_server_unhand(server_t *s, call_slot *slot);
/* A taken call the peer reset while it waited: counted, and freed; true if so. */
bool flowctl_server_drop_reset(server_t *s, call_slot *slot);
/* Shutting down with no call left to take. */
bool flowctl_server_drained(server_t *s);

/* Any thread: the call's status batch is in flight; the acceptor frees it when done (2b). */
void flowctl_server_linger(server_t *s, call_slot *slot);
/* A refused or reset call: its peer is counted, and shut down when it floods. */
void flowctl_server_offense(server_t *s, call_slot *slot);

/* ---- unary calls (server_unary.c; no Ruby) ---- */
/* Before start: serve path's calls as unary ones; false when there are too many. */
bool flowctl_server_register_unary(server_t *s, const char *path);
/* Before start: a native answer for path's calls (a registered unary method), tried on the
 * acceptor before any worker sees them; the server releases it when freed. false: no such method. */
bool flowctl_server_answer_natively(server_t *s, const char *path, flowctl_fast_unary fast);
/* The registered methods' paths and native answers (server_release). */
void flowctl_server_unary_free(server_t *s);
/* Asks gRPC for the next call (method: an index in s->unary, or -1 for any other). */
bool flowctl_server_arm(server_t *s, int method);
/* The acceptor: a new unary call (admitted: its request is read), or a batch of one that completed. */
void flowctl_unary_accepted(server_t *s, call_slot *slot);
void flowctl_unary_event(server_t *s, slot_tag *tag, bool success);
/* The acceptor refuses a unary call: the status leaves on notify_cq, the slot is freed then. */
void flowctl_unary_reject(server_t *s, call_slot *slot, grpc_status_code code, const char *msg);
/* A worker's (GVL held, never waits): builds the status batch and hands the slot to the
 * acceptor, which starts it; false when gRPC refused it (the slot is released all the same). */
bool flowctl_unary_finish(call_slot *slot, const flowctl_metadata *md, grpc_byte_buffer **msg,
                          grpc_status_code code, grpc_slice *details);
/* Starts watching for the client's cancel (once); true once it came. */
bool flowctl_unary_peer_gone(call_slot *slot);
/* Whoever holds a slot lets go of it: a unary call is cancelled unless its status is on its
 * way, and freed once nothing of it is in flight; any other is freed. */
void flowctl_slot_release(call_slot *slot);
/* The acceptor's sweep: unary statuses past write_timeout get their peer shut down. */
void flowctl_unary_sweep(server_t *s, int64_t now);

/* ---- server_engine.c, for server_unary.c ---- */
/* Queues an admitted call for a worker (s->mu held); false when shutting down. */
bool flowctl_server_queue_locked(server_t *s, call_slot *slot);
/* After queueing (s->mu held): true when an idle worker is wanted (server_engine.c, 2): the
 * caller signals s->work once it has let go of s->mu. */
bool flowctl_server_wake_locked(server_t *s);
void flowctl_server_close_stuck(server_t *s, const char *peer);
void flowctl_server_unlinger(server_t *s); /* one lingering status fewer (mu taken) */

/* ---- server_call.c (the binding of a call, used by server.c's next_call) ---- */
VALUE flowctl_server_call_wrap(call_slot *slot); /* the object owns the slot from here on */

#endif
