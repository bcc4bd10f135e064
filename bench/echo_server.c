/*
 * echo_server.c — a benchmark peer on gRPC C core, so that client figures are not
 * capped by a Ruby server. Any unary call gets a ProcessorHeartbeatResponse
 * {success: true, message: "ok"}; a call whose path ends in "/Process" is echoed
 * message by message. One thread, one completion queue, 127.0.0.1 and an ephemeral
 * port, printed as "PORT <n>" on stdout. Exits with its parent (PR_SET_PDEATHSIG).
 * ECHO_DELAY_US=n holds each unary reply n microseconds (a server with latency).
 *
 * bench/rpc.rb builds it:  cc -O2 bench/echo_server.c $(pkg-config --cflags --libs grpc)
 */
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/byte_buffer.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

/* A bidi call keeps one receive in flight while it sends (gRPC allows one of each),
 * with up to QCAP received messages waiting to be echoed; a reply with more queued
 * behind it is sent with GRPC_WRITE_BUFFER_HINT, as a fast peer would. */
#define QCAP 64

enum kind { K_NEW, K_RECV, K_SEND, K_DONE };

struct ctx;
typedef struct {
    struct ctx *c;
    enum kind kind;
} tag_t;

typedef struct ctx {
    tag_t t_new, t_recv, t_send, t_done;
    bool bidi, recv_pending, send_pending, read_done, failed, finishing, status_done;
    int ops_out;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    grpc_byte_buffer *recv_msg, *sending, *resp;
    grpc_byte_buffer *queue[QCAP];
    int qhead, qlen;
    int cancelled;
} ctx;

static grpc_server *server;
static grpc_completion_queue *cq;
static long delay_us;

/* unary replies held back by ECHO_DELAY_US, in arrival order (same delay for all) */
#define HELD_MAX 4096
static struct held { gpr_timespec due; struct ctx *c; } held[HELD_MAX];
static int held_head, held_len;
static void finish(struct ctx *c, grpc_byte_buffer *resp);
/* ProcessorHeartbeatResponse{success: true, message: "ok"} */
static const char reply[] = {0x08, 0x01, 0x12, 0x02, 'o', 'k'};

static void
request_next(void)
{
    ctx *c = calloc(1, sizeof(*c));
    c->t_new = (tag_t){c, K_NEW};
    c->t_recv = (tag_t){c, K_RECV};
    c->t_send = (tag_t){c, K_SEND};
    c->t_done = (tag_t){c, K_DONE};
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->md);
    grpc_server_request_call(server, &c->call, &c->details, &c->md, cq, cq, &c->t_new);
}

static void
batch(ctx *c, grpc_op *ops, size_t n, tag_t *tag)
{
    c->ops_out++;
    if (grpc_call_start_batch(c->call, ops, n, tag, NULL) != GRPC_CALL_OK) abort();
}

static void
finish(struct ctx *c, grpc_byte_buffer *resp)
{
    grpc_op ops[3];
    size_t n = 0;
    memset(ops, 0, sizeof(ops));
    if (resp) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = resp;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n++].data.send_status_from_server.status = GRPC_STATUS_OK;
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n++].data.recv_close_on_server.cancelled = &c->cancelled;
    c->resp = resp;
    c->finishing = true;
    batch(c, ops, n, &c->t_done);
}

static void
start_recv(ctx *c, bool first)
{
    grpc_op ops[2];
    size_t n = 0;
    memset(ops, 0, sizeof(ops));
    if (first) ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[n].op = GRPC_OP_RECV_MESSAGE;
    ops[n++].data.recv_message.recv_message = &c->recv_msg;
    c->recv_pending = true;
    batch(c, ops, n, &c->t_recv);
}

static void
start_send(ctx *c)
{
    grpc_op op;
    memset(&op, 0, sizeof(op));
    c->sending = c->queue[c->qhead];
    c->qhead = (c->qhead + 1) % QCAP;
    c->qlen--;
    op.op = GRPC_OP_SEND_MESSAGE;
    op.data.send_message.send_message = c->sending;
    /* more replies queued: let the transport send them together (the last one flushes) */
    if (c->qlen > 0) op.flags = GRPC_WRITE_BUFFER_HINT;
    c->send_pending = true;
    batch(c, &op, 1, &c->t_send);
}

static void
pump(ctx *c)
{
    if (c->failed) {
        while (c->qlen > 0) {
            grpc_byte_buffer_destroy(c->queue[c->qhead]);
            c->qhead = (c->qhead + 1) % QCAP;
            c->qlen--;
        }
    }
    if (c->finishing) return;
    if (!c->send_pending && c->qlen > 0) start_send(c);
    if (!c->failed && !c->read_done && !c->recv_pending && c->qlen < QCAP) start_recv(c, false);
    if ((c->read_done || c->failed) && !c->send_pending && c->qlen == 0) finish(c, NULL);
}

static void
on_recv(ctx *c, bool ok)
{
    grpc_byte_buffer *in = c->recv_msg;
    c->recv_msg = NULL;
    c->recv_pending = false;
    if (!c->bidi) {
        if (in) grpc_byte_buffer_destroy(in);
        if (delay_us > 0 && held_len < HELD_MAX) {
            gpr_timespec now = gpr_now(GPR_CLOCK_MONOTONIC);
            held[(held_head + held_len++) % HELD_MAX] =
                (struct held){gpr_time_add(now, gpr_time_from_micros(delay_us, GPR_TIMESPAN)), c};
            return;
        }
        grpc_slice s = grpc_slice_from_static_buffer(reply, sizeof(reply));
        finish(c, grpc_raw_byte_buffer_create(&s, 1));
        return;
    }
    if (ok && in) {
        c->queue[(c->qhead + c->qlen) % QCAP] = in;
        c->qlen++;
    } else {
        if (in) grpc_byte_buffer_destroy(in);
        c->read_done = true;
    }
    pump(c);
}

static void
on_event(tag_t *t, bool ok)
{
    ctx *c = t->c;
    switch (t->kind) {
    case K_NEW: {
        request_next();
        if (!ok) return;
        grpc_slice m = c->details.method;
        size_t len = GRPC_SLICE_LENGTH(m);
        c->bidi = len >= 8 && memcmp(GRPC_SLICE_START_PTR(m) + len - 8, "/Process", 8) == 0;
        start_recv(c, true);
        return;
    }
    case K_RECV:
        c->ops_out--;
        on_recv(c, ok);
        break;
    case K_SEND:
        c->ops_out--;
        c->send_pending = false;
        grpc_byte_buffer_destroy(c->sending);
        c->sending = NULL;
        if (!ok) c->failed = true;
        pump(c);
        break;
    case K_DONE:
        c->ops_out--;
        c->status_done = true;
        break;
    }
    if (c->status_done && c->ops_out == 0) {
        if (c->resp) grpc_byte_buffer_destroy(c->resp);
        grpc_call_unref(c->call);
        grpc_call_details_destroy(&c->details);
        grpc_metadata_array_destroy(&c->md);
        free(c);
    }
}

int
main(void)
{
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    grpc_init();
    server = grpc_server_create(NULL, NULL);
    cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(server, cq, NULL);
    grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
    int port = grpc_server_add_http2_port(server, "127.0.0.1:0", creds);
    grpc_server_credentials_release(creds);
    if (port <= 0) return 1;
    grpc_server_start(server);
    printf("PORT %d\n", port);
    fflush(stdout);
    for (int i = 0; i < 16; i++) request_next();
    const char *d = getenv("ECHO_DELAY_US");
    delay_us = d ? atol(d) : 0;
    for (;;) {
        gpr_timespec until = held_len ? held[held_head].due : gpr_inf_future(GPR_CLOCK_MONOTONIC);
        grpc_event ev = grpc_completion_queue_next(cq, until, NULL);
        if (ev.type == GRPC_OP_COMPLETE) on_event(ev.tag, ev.success);
        else if (ev.type != GRPC_QUEUE_TIMEOUT) break;
        gpr_timespec now = gpr_now(GPR_CLOCK_MONOTONIC);
        while (held_len && gpr_time_cmp(held[held_head].due, now) <= 0) {
            struct ctx *c = held[held_head].c;
            held_head = (held_head + 1) % HELD_MAX;
            held_len--;
            grpc_slice s = grpc_slice_from_static_buffer(reply, sizeof(reply));
            finish(c, grpc_raw_byte_buffer_create(&s, 1));
        }
    }
    return 0;
}
