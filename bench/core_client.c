/*
 * core_client.c — the reference client of bench/rpc.rb: the same calls written directly
 * on gRPC C core, no Ruby at all. Its rates are the ceiling any binding of gRPC core
 * can reach against the same server on the same machine.
 *
 *   core_client unary TARGET SECONDS   sequential ProcessorHeartbeat calls
 *   core_client bidi  TARGET SECONDS   Process streams of 2000 1 KiB messages, one send and
 *                                      one receive in flight, GRPC_WRITE_BUFFER_HINT while
 *                                      more are to be sent
 * Prints "RESULT <operations per second> <process CPU microseconds per operation>".
 *
 * bench/rpc.rb builds it:  cc -O2 bench/core_client.c $(pkg-config --cflags --libs grpc)
 */
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/byte_buffer.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define STREAM_MESSAGES 2000

static double
clock_s(clockid_t id)
{
    struct timespec t;
    clock_gettime(id, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static grpc_event
wait_next(grpc_completion_queue *cq)
{
    return grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
}

static grpc_byte_buffer *
buffer(const char *data, size_t len)
{
    grpc_slice s = grpc_slice_from_copied_buffer(data, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

/* One unary ProcessorHeartbeat call, all six ops in one batch. */
static void
unary_call(grpc_channel *ch, grpc_completion_queue *cq)
{
    /* ProcessorHeartbeatRequest{processor_id: "bench", status: "HEALTHY"} */
    static const char req[] = "\x0a\x05" "bench" "\x22\x07" "HEALTHY";
    grpc_call *call = grpc_channel_create_call(
        ch, NULL, 0, cq, grpc_slice_from_static_string("/obsrvr.flow.controlplane.ControlPlane/ProcessorHeartbeat"),
        NULL, gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_seconds(5, GPR_TIMESPAN)), NULL);
    grpc_byte_buffer *send = buffer(req, sizeof(req) - 1), *recv = NULL;
    grpc_metadata_array initial, trailing;
    grpc_metadata_array_init(&initial);
    grpc_metadata_array_init(&trailing);
    grpc_status_code status;
    grpc_slice details;
    grpc_op ops[6];
    memset(ops, 0, sizeof(ops));
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &initial;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.status = &status;
    ops[5].data.recv_status_on_client.status_details = &details;
    ops[5].data.recv_status_on_client.trailing_metadata = &trailing;
    grpc_call_start_batch(call, ops, 6, ops, NULL);
    wait_next(cq);
    if (status != GRPC_STATUS_OK) {
        fprintf(stderr, "core_client: call failed with status %d\n", status);
        exit(1);
    }
    grpc_byte_buffer_destroy(send);
    if (recv) grpc_byte_buffer_destroy(recv);
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&initial);
    grpc_metadata_array_destroy(&trailing);
    grpc_call_unref(call);
}

/* A Process stream of STREAM_MESSAGES messages; returns the replies received. */
static long
bidi_stream(grpc_channel *ch, grpc_completion_queue *cq)
{
    static char payload[1030];
    memset(payload, 'x', sizeof(payload));
    grpc_call *call = grpc_channel_create_call(
        ch, NULL, 0, cq, grpc_slice_from_static_string("/obsrvr.flow.processor.ProcessorService/Process"), NULL,
        gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    grpc_metadata_array initial, trailing;
    grpc_metadata_array_init(&initial);
    grpc_metadata_array_init(&trailing);
    grpc_byte_buffer *recv = NULL, *send = NULL;
    grpc_op start[2], recv_op, send_op, end[2];
    memset(start, 0, sizeof(start));
    start[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    start[1].op = GRPC_OP_RECV_INITIAL_METADATA;
    start[1].data.recv_initial_metadata.recv_initial_metadata = &initial;
    grpc_call_start_batch(call, start, 2, start, NULL);
    memset(&recv_op, 0, sizeof(recv_op));
    recv_op.op = GRPC_OP_RECV_MESSAGE;
    recv_op.data.recv_message.recv_message = &recv;
    grpc_call_start_batch(call, &recv_op, 1, &recv_op, NULL);
    long sent = 0, received = 0, pending = 2; /* start + recv */
    bool sending = false;
    while (received < STREAM_MESSAGES || pending > 0) {
        if (!sending && sent < STREAM_MESSAGES) {
            memset(&send_op, 0, sizeof(send_op));
            send_op.op = GRPC_OP_SEND_MESSAGE;
            send_op.data.send_message.send_message = send = buffer(payload, sizeof(payload));
            if (sent + 1 < STREAM_MESSAGES) send_op.flags = GRPC_WRITE_BUFFER_HINT;
            grpc_call_start_batch(call, &send_op, 1, &send_op, NULL);
            sending = true;
            pending++;
        }
        grpc_event ev = wait_next(cq);
        pending--;
        if (ev.tag == &send_op) {
            grpc_byte_buffer_destroy(send);
            sending = false;
            sent++;
        } else if (ev.tag == &recv_op) {
            if (!recv) break;
            grpc_byte_buffer_destroy(recv);
            recv = NULL;
            if (++received < STREAM_MESSAGES) {
                grpc_call_start_batch(call, &recv_op, 1, &recv_op, NULL);
                pending++;
            }
        }
    }
    grpc_status_code status;
    grpc_slice details;
    memset(end, 0, sizeof(end));
    end[0].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    end[1].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    end[1].data.recv_status_on_client.status = &status;
    end[1].data.recv_status_on_client.status_details = &details;
    end[1].data.recv_status_on_client.trailing_metadata = &trailing;
    grpc_call_start_batch(call, end, 2, end, NULL);
    while (wait_next(cq).tag != end) {
    }
    grpc_slice_unref(details);
    grpc_metadata_array_destroy(&initial);
    grpc_metadata_array_destroy(&trailing);
    grpc_call_unref(call);
    return received;
}

int
main(int argc, char **argv)
{
    if (argc != 4 || (strcmp(argv[1], "unary") != 0 && strcmp(argv[1], "bidi") != 0)) {
        fprintf(stderr, "usage: core_client unary|bidi TARGET SECONDS\n");
        return 2;
    }
    bool bidi = strcmp(argv[1], "bidi") == 0;
    double seconds = atof(argv[3]);
    grpc_init();
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    grpc_channel *ch = grpc_channel_create(argv[2], creds, NULL);
    grpc_channel_credentials_release(creds);
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    for (int i = 0; i < 200; i++) unary_call(ch, cq); /* connect and warm up */
    double t0 = clock_s(CLOCK_MONOTONIC), c0 = clock_s(CLOCK_PROCESS_CPUTIME_ID);
    long n = 0;
    while (clock_s(CLOCK_MONOTONIC) - t0 < seconds) {
        if (bidi) {
            n += bidi_stream(ch, cq);
        } else {
            unary_call(ch, cq);
            n++;
        }
    }
    double dt = clock_s(CLOCK_MONOTONIC) - t0, cpu = clock_s(CLOCK_PROCESS_CPUTIME_ID) - c0;
    printf("RESULT %.0f %.2f\n", (double)n / dt, cpu / (double)n * 1e6);
    grpc_channel_destroy(ch);
    grpc_completion_queue_shutdown(cq);
    while (wait_next(cq).type != GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cq);
    grpc_shutdown();
    return 0;
}
