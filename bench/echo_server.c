/*
 * echo_server.c — a benchmark peer on gRPC C core, so that client figures are not
 * capped by a Ruby server. Any unary call gets a ProcessorHeartbeatResponse
 * {success: true, message: "ok"}; a call whose path ends in "/Process" is echoed
 * message by message. One thread, one completion queue, 127.0.0.1 and an ephemeral
 * port, printed as "PORT <n>" on stdout. Exits with its parent (PR_SET_PDEATHSIG).
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

enum stage { NEW, READ, WRITE, DONE };

typedef struct {
    enum stage stage;
    bool bidi;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    grpc_byte_buffer *msg;
    int cancelled;
} ctx;

static grpc_server *server;
static grpc_completion_queue *cq;
/* ProcessorHeartbeatResponse{success: true, message: "ok"} */
static const char reply[] = {0x08, 0x01, 0x12, 0x02, 'o', 'k'};

static void
request_next(void)
{
    ctx *c = calloc(1, sizeof(*c));
    c->stage = NEW;
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->md);
    grpc_server_request_call(server, &c->call, &c->details, &c->md, cq, cq, c);
}

static void
batch(ctx *c, grpc_op *ops, size_t n, enum stage next)
{
    c->stage = next;
    if (grpc_call_start_batch(c->call, ops, n, c, NULL) != GRPC_CALL_OK) abort();
}

static void
finish(ctx *c, grpc_byte_buffer *resp)
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
    c->msg = resp; /* destroyed when DONE */
    batch(c, ops, n, DONE);
}

static void
read_one(ctx *c, bool first)
{
    grpc_op ops[2];
    size_t n = 0;
    memset(ops, 0, sizeof(ops));
    if (first) ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[n].op = GRPC_OP_RECV_MESSAGE;
    ops[n++].data.recv_message.recv_message = &c->msg;
    batch(c, ops, n, READ);
}

static void
on_event(ctx *c, bool ok)
{
    switch (c->stage) {
    case NEW: {
        request_next();
        grpc_slice m = c->details.method;
        size_t len = GRPC_SLICE_LENGTH(m);
        c->bidi = len >= 8 && memcmp(GRPC_SLICE_START_PTR(m) + len - 8, "/Process", 8) == 0;
        read_one(c, true);
        break;
    }
    case READ: {
        grpc_byte_buffer *in = c->msg;
        c->msg = NULL;
        if (!c->bidi) {
            if (in) grpc_byte_buffer_destroy(in);
            grpc_slice s = grpc_slice_from_static_buffer(reply, sizeof(reply));
            finish(c, grpc_raw_byte_buffer_create(&s, 1));
        } else if (!ok || !in) {
            if (in) grpc_byte_buffer_destroy(in);
            finish(c, NULL);
        } else {
            grpc_op op;
            memset(&op, 0, sizeof(op));
            op.op = GRPC_OP_SEND_MESSAGE;
            op.data.send_message.send_message = in;
            c->msg = in;
            batch(c, &op, 1, WRITE);
        }
        break;
    }
    case WRITE:
        grpc_byte_buffer_destroy(c->msg);
        c->msg = NULL;
        if (ok) read_one(c, false);
        else finish(c, NULL);
        break;
    case DONE:
        if (c->msg) grpc_byte_buffer_destroy(c->msg);
        grpc_call_unref(c->call);
        grpc_call_details_destroy(&c->details);
        grpc_metadata_array_destroy(&c->md);
        free(c);
        break;
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
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type != GRPC_OP_COMPLETE) break;
        on_event(ev.tag, ev.success);
    }
    return 0;
}
