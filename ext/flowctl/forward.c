/*
 * forward.c — the replies of one call sent as the requests of another, without Ruby.
 *
 * `consumer.consume(processor.process(source.stream_events(req)))` hands the replies of a
 * call straight to another call. Decoded into Ruby objects and encoded again (twice per
 * event in that line), they would cost most of the wiring process's CPU and a GVL hand-off
 * per message between a writer thread and a reader. Here one thread without the GVL takes
 * each message's byte buffer off the source's read-ahead (pump.c) and queues that same
 * buffer on the destination's send queue: no copy, no Ruby, the pumps' flow control on
 * both sides (the source reads ahead at most PUMP_RECVQ messages; a full send queue stops
 * the loop, so a slow destination slows the source through gRPC's flow control).
 *
 * Each message is skimmed first (skim.c): bytes the decoder would refuse stop the loop as
 * they would have stopped the Ruby path, with the decoder's words. The loop ends when the
 * source ends (its status is the binding's to read), the destination refuses a write (it
 * ended), a message is refused, or the thread is woken (an interrupt: the binding decides).
 * The binding (call.c, Flowctl::Native::Stream#forward) owns the calls and the policy.
 */
#include "flowctl.h"

/* Skims the buffer's bytes (gRPC's own slice when it holds the message in one). */
static bool
skim_buffer(const ProtobufCMessageDescriptor *desc, grpc_byte_buffer *bb, flowctl_skim_error *err)
{
    grpc_slice flat;
    const uint8_t *p;
    size_t len;
    if (!flowctl_buffer_flat(bb, &flat, &p, &len)) {
        snprintf(err->why, sizeof(err->why), "gRPC could not read a received message");
        err->desc = desc;
        return false;
    }
    bool ok = flowctl_skim(desc, p, len, err);
    grpc_slice_unref(flat);
    return ok;
}

void *
flowctl_forward_nogvl(void *arg)
{
    flowctl_forward *f = arg;
    for (;;) {
        grpc_byte_buffer *bb = f->held;
        f->held = NULL;
        if (!bb) {
            if (!flowctl_pump_read_nogvl(f->src, &bb, &f->woken, f->dst)) {
                f->result = FWD_WOKEN;
                return NULL;
            }
            if (!bb) {
                f->result = FWD_SOURCE_END;
                return NULL;
            }
            if (f->desc && !skim_buffer(f->desc, bb, &f->bad)) {
                grpc_byte_buffer_destroy(bb);
                f->result = FWD_BAD_MESSAGE;
                return NULL;
            }
        }
        bool failed;
        if (!flowctl_pump_write_nogvl(f->dst, bb, &failed, &f->woken)) {
            f->held = bb; /* written first when the loop goes on */
            f->result = FWD_WOKEN;
            return NULL;
        }
        if (failed) {
            grpc_byte_buffer_destroy(bb);
            f->result = FWD_DESTINATION_ENDED;
            return NULL;
        }
        f->moved++;
    }
}

void
flowctl_forward_ubf(void *arg)
{
    atomic_store(&((flowctl_forward *)arg)->woken, true);
}
