/*
 * flowctl.h — the one internal header of the flowctl extension.
 *
 * Reading order: flowctl.c (Init) -> message.c/convert.c (messages) -> status.c
 * -> metadata.c -> wait.c -> channel.c -> call.c -> server.c -> heartbeat.c.
 *
 * Mechanism files return codes where they can; the Ruby-facing functions raise.
 */
#ifndef FLOWCTL_H
#define FLOWCTL_H

#include <ruby.h>
#include <ruby/encoding.h>
#include <ruby/thread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <protobuf-c/protobuf-c.h>

#include "generated/registry.h"

#ifndef HAVE_RB_GC_MARK_MOVABLE
#define rb_gc_mark_movable rb_gc_mark
#endif

/* ---- flowctl.c ---------------------------------------------------------- */
extern VALUE mFlowctl;       /* Flowctl */
extern VALUE mFlowctlNative; /* Flowctl::Native: primitives the Ruby layer builds on */
extern VALUE eFlowctlError;  /* Flowctl::Error < StandardError */
extern VALUE eFlowctlDecodeError;

/* ---- message.c: generic message classes from protobuf-c descriptors ----- */
void init_flowctl_message(void);
/* The Ruby class of a message descriptor (Qnil when it has none). */
VALUE flowctl_message_class(const ProtobufCMessageDescriptor *desc);
/* Descriptor of a message class (raises TypeError when klass is not one). */
const ProtobufCMessageDescriptor *flowctl_message_class_descriptor(VALUE klass);
/* msg.to_proto: a binary String (raises naming the field on bad values). */
VALUE flowctl_message_encode(VALUE msg);
/* Klass.decode: raises Flowctl::DecodeError on garbage. */
VALUE flowctl_message_decode(VALUE klass, const uint8_t *data, size_t len);

/* ---- status.c: grpc_status_code -> Flowctl::RPCError subclasses --------- */
void init_flowctl_status(void);
/* Builds (does not raise) the RPCError subclass for code with details and trailing metadata. */
VALUE flowctl_status_error(grpc_status_code code, VALUE details, VALUE metadata);
NORETURN(void flowctl_raise_status(grpc_status_code code, VALUE details, VALUE metadata));

/* ---- metadata.c: gRPC metadata <-> Ruby Hash ---------------------------- */
void init_flowctl_metadata(void);
/* Hash of String => String (or Array of String when a key repeats); "-bin" values stay binary. */
VALUE flowctl_metadata_to_hash(const grpc_metadata *md, size_t count);
/* Validates keys/values of a Ruby Hash (ArgumentError/TypeError naming the key) and fills md.
 * The slices are owned by md; release them with flowctl_metadata_free. */
typedef struct flowctl_metadata {
    grpc_metadata *md;
    size_t count;
    size_t capa;
} flowctl_metadata;
void flowctl_metadata_from_hash(VALUE hash, flowctl_metadata *out);
void flowctl_metadata_free(flowctl_metadata *m);

/* ---- wait.c: interruptible waits on a completion queue ------------------ */
void init_flowctl_wait(void);
/*
 * Waits for `tag` on the pluck queue `cq` without the GVL. When the Ruby thread is
 * interrupted (Thread#raise, kill, Timeout, Ctrl-C) the call is cancelled and the wait
 * goes on until the tag has completed, so no batch is ever left in flight. Interrupts
 * that raise nothing (spurious wake-ups, a trap that only logs) leave the call alone.
 * Returns the event; *interrupted tells whether an interrupt cancelled the call. After
 * releasing its resources (C only: no Ruby code in between) the caller must call
 * flowctl_wait_finish(interrupted), which raises that interrupt.
 */
grpc_event flowctl_wait_tag(grpc_completion_queue *cq, void *tag, grpc_call *call, int *interrupted);
/* Raises the pending interrupt (or Flowctl::Cancelled when there is none left to raise). */
void flowctl_wait_finish(int interrupted);
/* Shuts down and destroys a pluck queue that has nothing in flight. */
void flowctl_cq_destroy(grpc_completion_queue *cq);
/* Ruby String <-> grpc_byte_buffer. */
grpc_byte_buffer *flowctl_buffer_from_str(VALUE str);
VALUE flowctl_str_from_buffer(grpc_byte_buffer *buf); /* binary String; does not destroy buf */

/* ---- channel.c: grpc_channel + credentials + channel args --------------- */
typedef struct flowctl_channel {
    grpc_channel *channel;      /* NULL once closed */
    char *target;
    atomic_int refs;            /* the Ruby object holds one; each heartbeat thread one more */
    atomic_bool closed;
} flowctl_channel;

void init_flowctl_channel(void);
/* The channel of a Flowctl::Native::Channel (raises IOError when closed). */
flowctl_channel *flowctl_channel_get(VALUE rb_channel);
void flowctl_channel_ref(flowctl_channel *ch);
void flowctl_channel_unref(flowctl_channel *ch);     /* destroys the channel at zero; never blocks long */

/* ---- call.c, server.c, heartbeat.c --------------------------------------- */
void init_flowctl_call(void);
void init_flowctl_server(void);
void init_flowctl_heartbeat(void);

#endif /* FLOWCTL_H */
