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

/* One accepted call (or one grpc_server_request_call waiting for one): its batches complete
 * on its own pump (pump.c). */
typedef struct call_slot {
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    flowctl_pump pump;          /* the call's batches complete on pump.cq (pump.c) */
    bool status_sent;           /* the status batch completed: never cancel after that */
    struct call_slot *next;     /* handoff queue link, then the lingering list's */
    gpr_timespec wait_until;    /* queued with no idle worker: rejected after this */
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
    long stuck_closed;                /* connections shut down as stuck (mu) */
    long unauthenticated;             /* calls refused for a missing or wrong token (mu) */
    long reset_early;                 /* calls the peer cancelled before a worker got them (mu) */
    flowctl_offenders offenders;      /* peers' refused or reset calls, per second (mu) */
    char shut_peers[8][64];           /* (mu) the last connections shut down: their queued calls are dropped */
    int shut_next;                    /* (mu) */
    long dropped;                     /* (mu) calls of a shut connection, dropped as they came */
    long abusive_closed;              /* connections shut down for too many refused calls (mu) */
    /* memory watch (acceptor only): RSS every WATCH_MS over the last WATCH_SAMPLES */
    size_t rss[8];
    int rss_next;
    int64_t last_watch_ms;
    size_t memory_burst;              /* RSS growth within the window that sheds a connection (0: off) */
    pthread_t watchdog;               /* runs watch_memory; the acceptor joins it when it ends */
    pthread_cond_t watchdog_wake;     /* (mu) shutdown ends the watchdog's pause (monotonic clock) */
    _Atomic int64_t acceptor_beat_ms; /* when the acceptor last came back from gRPC */
    long stall_closed;                /* connections shut down while the acceptor was held (mu) */
    long idle_shed;                   /* connections shut down near the descriptor limit (mu) */
    int pending_ticks;                /* watchdog: checks in a row that found the listener not accepting */
    int64_t exhausted_ms;             /* watchdog: when descriptors last ran out (or nearly) */
    bool listener_stopped;            /* (mu) gRPC core stopped accepting on our port: see 2d */
    bool watchdog_running;
    long memory_closed;               /* connections shut down for it (mu) */
    char *auth_token;                 /* calls must carry "authorization: Bearer <it>" (NULL: any call) */
    size_t auth_len;
    int ports[8], n_ports;            /* the listening ports: a peer's connection is found by them */
    bool started, shutting_down, shutdown_done, acceptor_done, closed, orphaned;
    char shutdown_tag;                /* its address is the shutdown tag */
    pid_t pid;                        /* in a forked child the server is the parent's: leave it */
} server_t;

/* Counters for Server#stats, read under the server's lock. */
typedef struct {
    long accepted, rejected, stuck_closed, unauthenticated, abusive_closed, memory_closed, stall_closed;
    long reset_early, idle_shed, dropped;
    int idle, queued, lingering;
    bool listener_stopped;
} flowctl_server_counts;

/* ---- slots ---- */
/* Frees a slot, cancelling its call when it never got a status (any thread, no GVL needed). */
void flowctl_slot_free(call_slot *s);
/* Builds the status batch in slot->status_ops (initial metadata when no reply carried it, the
 * last message (taken from *msg), the status with a copy of md, the close): how many ops, or 0
 * when out of memory. details must live until the batch completes or the call is freed. */
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
/* A taken call the peer reset while it waited: counted, and freed; true if so. */
bool flowctl_server_drop_reset(server_t *s, call_slot *slot);
/* Shutting down with no call left to take. */
bool flowctl_server_drained(server_t *s);

/* Any thread: the call's status batch is in flight; the acceptor frees it when done (2b). */
void flowctl_server_linger(server_t *s, call_slot *slot);
/* A refused or reset call: its peer is counted, and shut down when it floods. */
void flowctl_server_offense(server_t *s, call_slot *slot);

/* ---- server_call.c (the binding of a call, used by server.c's next_call) ---- */
VALUE flowctl_server_call_wrap(call_slot *slot); /* the object owns the slot from here on */

#endif
