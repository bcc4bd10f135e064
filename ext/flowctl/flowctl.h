/*
 * flowctl.h — the one internal header of the flowctl extension.
 *
 * Reading order: flowctl.c (Init) -> message.c/convert.c (messages) -> reflect.c -> json_text.h,
 * json_text.c, json_order.c -> json_write.c, json_read.c, json_class.c (proto3 JSON) -> status.c
 * -> metadata.c -> log.c -> clock.c -> fork.c (gate, fork hooks) -> wait.c -> watch.c -> channel.c -> call.c
 * -> fiber.c -> pump.c -> skim.c -> forward.c -> pending.c -> relay.c -> relay_class.c -> server_engine.h/.c -> server_unary.c -> server.c -> server_call.c -> wire.h
 * -> heartbeat_wire.c -> heartbeat.c -> heartbeat_class.c -> beat_table.c -> beat_table_class.c.
 *
 * Mechanism files return codes where they can; the Ruby-facing functions raise.
 */
#ifndef FLOWCTL_H
#define FLOWCTL_H

#include <ruby.h>
#include <ruby/encoding.h>
#include <ruby/thread.h>
#include <ruby/ractor.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <limits.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <grpc/support/log.h>
#include <grpc/support/time.h>
#include <protobuf-c/protobuf-c.h>

#include "generated/registry.h"
#include "generated/google/protobuf/timestamp.pb-c.h"

#ifndef HAVE_RB_GC_MARK_MOVABLE
#define rb_gc_mark_movable rb_gc_mark
#endif

/* ---- flowctl.c ---------------------------------------------------------- */
extern VALUE mFlowctl;       /* Flowctl */
extern VALUE mFlowctlNative; /* Flowctl::Native: primitives the Ruby layer builds on */
extern VALUE eFlowctlError;  /* Flowctl::Error < StandardError */
extern VALUE eFlowctlDecodeError;

/* Methods defined while this is on may be called from any Ractor (rb_ext_ractor_safe). */
static inline void
flowctl_ractor_safe(bool on)
{
#ifdef HAVE_RB_EXT_RACTOR_SAFE
    rb_ext_ractor_safe(on);
#else
    (void)on;
#endif
}

/* ---- message.c + convert.c: generic message classes from protobuf-c descriptors ---- */
enum flowctl_field_kind { FK_SINGULAR, FK_REPEATED, FK_MAP };

typedef struct flowctl_class flowctl_class;

/* One field of a message class, resolved once from its descriptor. */
typedef struct flowctl_field {
    const ProtobufCFieldDescriptor *fd;   /* the field (for a map: the repeated entry field) */
    const ProtobufCFieldDescriptor *elem; /* what one value is: fd, or the entry's value field */
    const ProtobufCFieldDescriptor *key;  /* map key field, NULL otherwise */
    enum flowctl_field_kind kind;
    bool packed;                          /* repeated scalar written packed */
    bool presence;                        /* proto3 `optional` scalar: nil means unset */
    bool timestamp;                       /* elem is google.protobuf.Timestamp (Ruby Time) */
    uint8_t tag[5], tag_len;              /* the field's key as written (number and wire type) */
    int ts_slot;                          /* singular Timestamp: its cached seconds/nanos, else -1 */
    ID id;
    VALUE sym;                            /* static Symbol: never moves, never collected */
    const char *name;
    const ProtobufCMessageDescriptor *sub_desc; /* elem's message type (not Timestamp) */
    unsigned oneof;                       /* members of one oneof share this number; 0: none */
} flowctl_field;

/* A generated message class: descriptor, Ruby class and field table. */
struct flowctl_class {
    const ProtobufCMessageDescriptor *desc;
    VALUE klass;              /* pinned (rb_gc_register_mark_object) */
    unsigned n_fields;
    flowctl_field *fields;    /* same order as desc->fields */
    unsigned *order;          /* field indexes by field number: the wire order */
    unsigned n_ts;            /* singular Timestamp fields (each has a cached timespec) */
    st_table *by_name;        /* ID of name -> index */
};

/*
 * A message object: its class and one VALUE per field (Qnil: an empty map/list not yet
 * built), then, for each singular Timestamp field, the seconds and nanos of its Time as
 * they were when set or decoded (a Time never changes its instant), so encoding needs
 * no call into Ruby's Time.
 * A large message decoded lazily holds its checked wire bytes in raw (a frozen String;
 * Qfalse once built) and its fields at their defaults until flowctl_msg_get builds them.
 */
typedef struct flowctl_msg {
    const flowctl_class *ci;
    VALUE raw;
    VALUE vals[];
} flowctl_msg;

static inline struct timespec *
flowctl_msg_ts(flowctl_msg *m, const flowctl_field *f)
{
    return (struct timespec *)(m->vals + m->ci->n_fields) + f->ts_slot;
}

void init_flowctl_message(void);
void init_flowctl_convert(void);
/* msg.to_proto: a binary String (raises naming the field on bad values). */
VALUE flowctl_message_encode(VALUE msg);
/* Klass.decode: raises Flowctl::DecodeError on garbage. */
VALUE flowctl_message_decode(VALUE klass, const uint8_t *data, size_t len);
/* The same from str, a frozen String that nothing else holds: a message of
 * FLOWCTL_LAZY_MIN bytes or more is checked now (DecodeError as above) and built when
 * first touched, from str, which it keeps (what google-protobuf does with its arena: no
 * Ruby object per field until one is read). Smaller ones are built at once: their fields
 * are nearly always read, and then the check and the copy are a cost (an echoed 274-byte
 * DataMessage: +12%). */
#define FLOWCTL_LAZY_MIN 512
VALUE flowctl_message_decode_own(VALUE klass, VALUE str);
/* The wire bytes of a message decoded lazily and not built since (frozen), else Qnil. */
VALUE flowctl_msg_lazy_bytes(VALUE msg);

/* message.c internals used by convert.c */
const flowctl_class *flowctl_class_of_desc(const ProtobufCMessageDescriptor *desc);
const flowctl_class *flowctl_class_of(VALUE klass);      /* NULL when not a message class */
flowctl_msg *flowctl_msg_get(VALUE msg);                 /* raises TypeError when not a message */
VALUE flowctl_msg_new(const flowctl_class *ci);          /* all fields at their defaults */
VALUE flowctl_field_default(const flowctl_field *f);
/* "int32", "string", ... by ProtobufCType (convert.c) */
extern const char *const flowctl_type_names[];
/* Stores v (not nil) in field i of a new, unfrozen message, v being what the setter's
 * conversion makes (frozen UTF-8 Strings, frozen binary ones for bytes, enum Symbols of
 * known values, Floats rounded to float, a Time in range, fresh Hash/Array of such
 * values); json_read.c builds such values. */
void flowctl_msg_put(VALUE msg, unsigned i, VALUE v);
/* After field i of a oneof was set: its siblings become unset. */
void flowctl_msg_clear_oneof(VALUE msg, flowctl_msg *m, unsigned i);

/*
 * Hash iteration on hot paths (convert.c, json_write.c): rb_hash_stlike_foreach (exported
 * by libruby, used when extconf finds it) skips rb_hash_foreach's rb_ensure frame, most of
 * the cost of a small map. The callback gets VALUEs as st_data_t and never changes the Hash.
 */
#ifdef HAVE_RB_HASH_STLIKE_FOREACH
int rb_hash_stlike_foreach(VALUE hash, st_foreach_callback_func *func, st_data_t arg);
#define flowctl_hash_each(h, fn, arg) rb_hash_stlike_foreach((h), (fn), (st_data_t)(arg))
#else
#define flowctl_hash_each(h, fn, arg) rb_hash_foreach((h), (int (*)(VALUE, VALUE, VALUE))(fn), (VALUE)(arg))
#endif

/* ---- descriptor.c: protobuf-c descriptors built at run time from descriptor sets ---- */
void init_flowctl_descriptor(void);
/* Every message and enum descriptor by full proto name (protoc-c's and built ones). */
void flowctl_descriptor_register(const char *full_name, const void *desc);
const void *flowctl_descriptor_lookup(const char *full_name); /* NULL when unknown */

/* convert.c: the one place where Ruby values meet protobuf fields (setters, encode, decode). */
VALUE flowctl_convert_field(const flowctl_class *ci, const flowctl_field *f, VALUE v);
void flowctl_field_tag(flowctl_field *f); /* fills f->tag for the wire */
VALUE flowctl_encode(const flowctl_class *ci, VALUE msg); /* binary String */
/* Encodes into buf: the length; *fits false when more than cap (buf then holds a part only). */
size_t flowctl_encode_to(const flowctl_class *ci, VALUE msg, char *buf, size_t cap, bool *fits);
void flowctl_decode_into(const flowctl_class *ci, VALUE msg, const uint8_t *p, size_t len);
void flowctl_decode_from(const flowctl_class *ci, VALUE msg, VALUE str); /* str frozen: large bytes values share it */
int flowctl_wire_type(int type); /* the wire type (wire.h WT_*) of a ProtobufCType */

/* message.c: what a descriptor is (shared with skim.c) */
bool flowctl_desc_is_map_entry(const ProtobufCMessageDescriptor *d); /* a map<,>'s entry message */
bool flowctl_field_is_timestamp(const ProtobufCFieldDescriptor *fd);   /* a google.protobuf.Timestamp field */

/* ---- skim.c: would the decoder take these bytes? (no Ruby, no allocation) ---- */
typedef struct flowctl_skim_error {
    const ProtobufCMessageDescriptor *desc; /* the (nested) message the decoder would name */
    char why[160];                          /* what it would say */
} flowctl_skim_error;
/* true when flowctl_decode_into would read p..len as a message of desc without raising. */
bool flowctl_skim(const ProtobufCMessageDescriptor *desc, const uint8_t *p, size_t len, flowctl_skim_error *err);

/* The checks of flowctl_decode_into (the same DecodeError), nothing built. */
void flowctl_decode_check(const flowctl_class *ci, const uint8_t *p, size_t len);

/* ---- reflect.c: a message class's field table for Ruby (descriptors, JSON) ---- */
void init_flowctl_reflect(void);

/* ---- json_write.c + json_class.c: proto3 JSON printed in C (json_text.h: the text) ---- */
enum { FLOWCTL_JSON_EMIT_DEFAULTS = 1, FLOWCTL_JSON_PROTO_NAMES = 2, FLOWCTL_JSON_ENUM_INTS = 4 };
typedef enum {
    JSON_OK,
    JSON_FALLBACK,  /* something only the Ruby encoder prints (or names as an error) */
    JSON_NO_PLAN,   /* a class whose JSON names Ruby has not given yet */
    JSON_NO_MEMORY
} flowctl_json_result;
/* What Ruby gave for one field of a class: printed as key ("\"jsonName\":") or proto_key. */
typedef struct flowctl_json_name {
    unsigned index;              /* into ci->fields / the message's vals */
    char *key, *proto_key;
    size_t key_len, proto_key_len;
} flowctl_json_name;
typedef struct flowctl_json_plan {
    bool special;                /* a well-known type: the Ruby layer reads and prints it */
    unsigned n;
    flowctl_json_name fields[];  /* declaration order */
} flowctl_json_plan;
struct jbuf;
/* A class's JSON field names in declaration order (index[i]: the field in ci->fields);
 * special: a well-known type the Ruby encoder prints. false when out of memory. */
bool flowctl_json_plan_add(const flowctl_class *ci, bool special, const unsigned *index, const char *const *json_names,
                           unsigned n);
const flowctl_json_plan *flowctl_json_plan_of(const flowctl_class *ci); /* NULL: none given yet */
/* msg's JSON into b; on JSON_NO_PLAN *missing is the class without a plan. */
flowctl_json_result flowctl_json_write(struct jbuf *b, VALUE msg, unsigned flags, const flowctl_class **missing);
void init_flowctl_json_write(void);
/* json_read.c: a message of ci from JSON text, or JSON_FALLBACK for anything the Ruby
 * decoder must read (or name as an error); may raise (only as a setter would). */
flowctl_json_result flowctl_json_read(const flowctl_class *ci, const char *text, size_t len, VALUE *out,
                                      const flowctl_class **missing);
void init_flowctl_json_class(void);

/* ---- clock.c: monotonic time (a leaf: depends on nothing of ours) ------- */
/* A condition variable whose timed waits use CLOCK_MONOTONIC. */
void flowctl_cond_init(pthread_cond_t *cond);
/* Starts main(NULL) on a detached thread named name; false when it could not start. */
bool flowctl_thread_detached(void *(*main)(void *), const char *name);
int64_t flowctl_mono_ms(void);                           /* CLOCK_MONOTONIC in milliseconds */
struct timespec flowctl_ts_add(struct timespec t, double seconds);
struct timespec flowctl_mono_in(double seconds);         /* CLOCK_MONOTONIC, seconds from now */
bool flowctl_mono_passed(const struct timespec *until);
gpr_timespec flowctl_deadline_in(double seconds);         /* a gRPC deadline, seconds from now */

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
/* As flowctl_wait_tag, first looking for the completion without sleeping for up to spin_us
 * microseconds (a reply that comes that fast then costs no wake-up; see wait.c). */
grpc_event flowctl_wait_tag_spin(grpc_completion_queue *cq, void *tag, grpc_call *call, int *interrupted,
                                 unsigned spin_us);
/* The spin limit: FLOWCTL_SPIN_US, default 100; 0 turns spinning off. */
extern unsigned flowctl_spin_max_us;
/* Raises the pending interrupt (or Flowctl::Cancelled when there is none left to raise). */
void flowctl_wait_finish(int interrupted);
/* Back with the GVL after an unblocked wait: runs this thread's pending interrupts.
 * true when one raises; it is kept for flowctl_wait_finish (the caller first makes sure
 * nothing is in flight). false: nothing to raise, go on waiting. */
bool flowctl_wait_interrupted(void);
/* Counts an interrupted wait that lets go of the GVL to wait for its cancelled batch. */
void flowctl_wait_note_cancel_wait(void);
/* Shuts down and destroys a pluck queue that has nothing in flight. */
void flowctl_cq_destroy(grpc_completion_queue *cq);
/* Ruby String <-> grpc_byte_buffer. */
grpc_byte_buffer *flowctl_buffer_from_str(VALUE str);
/* A String's bytes, or a message encoded straight into gRPC's memory (no String in between). */
grpc_byte_buffer *flowctl_buffer_from_value(VALUE str_or_msg);
VALUE flowctl_str_from_buffer(grpc_byte_buffer *buf); /* binary String; does not destroy buf */
/* A buffer's bytes in one piece: gRPC's own slice when it holds them in one, else a copy
 * (*flat: unref it). False when gRPC cannot read it. No Ruby: for native threads too. */
bool flowctl_buffer_flat(grpc_byte_buffer *bb, grpc_slice *flat, const uint8_t **p, size_t *len);
/* The message of class klass in buf, decoded from gRPC's own memory (no String in between);
 * destroys buf, also when decoding raises (Flowctl::DecodeError). */
VALUE flowctl_decode_buffer(VALUE klass, grpc_byte_buffer *buf);

/* ---- log.c: gRPC core's log lines (dropped, stderr when asked, or Flowctl.logger) ---- */
void init_flowctl_log(void);
void flowctl_log_line(gpr_log_func_args *args); /* the gpr log function */
void flowctl_log_apply_verbosity(int cap);        /* gRPC's verbosity: what is wanted, at most cap */
void flowctl_log_atfork_child(void);

/* ---- watch.c: a shared `next` queue and its thread (fiber calls complete there) ---- */
/* A tag on the shared queue of watch.c: its thread calls on_done(tag, success). */
typedef struct flowctl_cq_tag {
    void (*on_done)(struct flowctl_cq_tag *tag, bool ok);
} flowctl_cq_tag;
void init_flowctl_watch(void);
typedef struct flowctl_channel flowctl_channel;
/* The shared `next` queue (the thread started), or NULL when no thread could start. */
grpc_completion_queue *flowctl_watch_cq(void);
/* Wakes the thread (fork.c: after closing the gate, so that it steps out of gRPC). */
void flowctl_watch_kick(void);
void flowctl_watch_atfork_child(void);

/* ---- chanargs.c: channel args (a Hash Flowctl::ChannelArgs.normalize made) ---- */
/* Fills args (room for RHASH_SIZE(hash) entries; the strings stay the Hash's: keep it
 * alive while they are used) and returns how many; nil gives none. */
size_t flowctl_channel_args_fill(VALUE hash, grpc_arg *args);

/* ---- channel.c: grpc_channel + credentials ---------------------------------- */
/* A call in flight on a channel, listed so that closing the channel cancels it. */
typedef struct flowctl_tracked {
    grpc_call *call;
    flowctl_channel *ch;        /* referenced while listed; NULL when not listed */
    struct flowctl_tracked *prev, *next;
} flowctl_tracked;

struct flowctl_channel {
    grpc_channel *channel;      /* NULL once closed */
    char *target;
    atomic_int refs;            /* the Ruby object holds one; each heartbeat thread one more */
    atomic_bool closed;
    pid_t pid;                  /* creator: in a forked child the channel is dead (fork.c) */
    atomic_uint unary_us;       /* recent unary round trips, microseconds (moving average; 0: none yet) */
    atomic_int unary_inflight;  /* unary calls waiting on this channel now */
    pthread_mutex_t calls_mu;   /* guards calls */
    flowctl_tracked *calls;     /* Ruby's calls in flight (unary and streams) */
};

void init_flowctl_channel(void);
/* Before grpc_init: gRPC's backup poller polls idle connections every 10 ms (unless the
 * environment sets GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS). */
void flowctl_channel_env(void);
/* The channel of a Flowctl::Native::Channel (raises IOError when closed). */
flowctl_channel *flowctl_channel_get(VALUE rb_channel);
void flowctl_channel_ref(flowctl_channel *ch);
void flowctl_channel_unref(flowctl_channel *ch);     /* destroys the channel at zero; never blocks long */
/* Lists call (referencing ch) until untrack; closing the channel cancels what is listed. */
void flowctl_channel_track(flowctl_channel *ch, flowctl_tracked *t, grpc_call *call);
void flowctl_channel_untrack(flowctl_tracked *t); /* before grpc_call_unref; idempotent */

/* ---- pump.c: the engine of a bidi stream ------------------------------------ */
#define PUMP_SENDQ 64             /* messages written and not yet taken by gRPC */
#define PUMP_RECVQ 64             /* messages read ahead ... */
#define PUMP_RECV_BYTES (4 << 20) /* ... or this many bytes of them */
#define PUMP_UNLIMITED UINT_MAX   /* a read budget: read ahead for as long as the stream lasts */

/* An extra batch someone waits for (on that waiter's stack). */
typedef struct flowctl_pump_extra {
    void *tag;
    bool done, ok;
    struct flowctl_pump_extra *next;
} flowctl_pump_extra;

typedef struct flowctl_pump {
    grpc_call *call;
    grpc_completion_queue *cq;   /* for next; NULL once destroyed */
    pthread_mutex_t mu;          /* guards everything below */
    pthread_cond_t cond;         /* the poller handled an event or stepped out */
    bool polling;                /* a thread is inside grpc_completion_queue_next */
    int waiters;
    grpc_byte_buffer *sendq[PUMP_SENDQ];
    unsigned send_head, send_len;
    grpc_op send_ops[2];         /* [SEND_INITIAL_METADATA,] SEND_MESSAGE, or SEND_CLOSE_FROM_CLIENT */
    grpc_byte_buffer *send_msg;  /* the message in flight (NULL: the close) */
    bool send_inflight, send_failed, close_wanted, close_done;
    bool send_initial_md;        /* a server's: the first send batch carries the initial metadata */
    grpc_byte_buffer *recvq[PUMP_RECVQ];
    unsigned recv_head, recv_len;
    size_t recv_bytes;
    grpc_op recv_op;
    grpc_byte_buffer *recv_buf;
    unsigned recv_budget;        /* receives that may still start (PUMP_UNLIMITED: any) */
    bool recv_inflight, recv_eof, recv_failed;
    grpc_op initial_op;
    grpc_metadata_array initial_md;
    bool initial_inflight, initial_done;
    flowctl_pump_extra *extras;
    int extras_inflight;
    int64_t send_timeout_ms;     /* a wait on sends the peer does not take gives up after it (0: never) */
    int64_t send_progress_ms;    /* CLOCK_MONOTONIC: when a send last completed */
    bool send_timed_out;         /* a wait on sends gave up: the call was cancelled */
    flowctl_pump_extra close_extra; /* a server's RECV_CLOSE_ON_SERVER, started early (watch_close) */
    grpc_op close_op;
    int close_cancelled;
    bool close_watching;
    _Atomic int64_t last_write_ns; /* CLOCK_MONOTONIC: the last write (a burst: writes closer than PUMP_BURST_NS);
                                    * the driver reads it without mu */
    int64_t hint_since_ns;       /* the first message gRPC holds back (GRPC_WRITE_BUFFER_HINT) since the last flush */
    struct flowctl_pump *drive_next; /* the driver's list (pump.c: drive_mu) */
    int64_t drive_at_ns;         /* (drive_mu) when the driver looks at it */
    bool drive_listed, drive_gone;
    unsigned drive_busy;         /* (drive_mu) the driver's looks in a row that found the writer at its burst */
} flowctl_pump;

void init_flowctl_pump(void);

/* The int-returning calls wait without the GVL and return 1 when an interrupt that
 * raises came (the call is cancelled, nothing in flight): let go of what you hold,
 * then flowctl_wait_finish(1). */
void flowctl_pump_init(flowctl_pump *p, grpc_call *call, grpc_completion_queue *cq);
/* Starts reading: up to `budget` messages ahead of the reader (PUMP_UNLIMITED for a
 * stream), and for a client the initial metadata. Any thread (no GVL needed). */
void flowctl_pump_start_reading(flowctl_pump *p, bool initial_metadata, unsigned budget);
/* Raises the budget (PUMP_UNLIMITED: read ahead from now on). */
void flowctl_pump_read_more(flowctl_pump *p, unsigned budget);
/* Waits until every queued message has gone to gRPC. */
int flowctl_pump_flush(flowctl_pump *p);
/* true (once) when the initial metadata still has to be sent: the caller sends it. */
bool flowctl_pump_take_initial_md(flowctl_pump *p);
/* For native threads: starts a batch nobody waits for by tag, and drains (waits until
 * nothing is in flight) until a monotonic deadline; false when that passed first. */
bool flowctl_pump_start(flowctl_pump *p, const grpc_op *ops, size_t n);
bool flowctl_pump_drain(flowctl_pump *p, gpr_timespec until);
/* For native threads: takes what has completed without waiting; true when nothing is
 * in flight any more. */
bool flowctl_pump_collect(flowctl_pump *p);
/* Waits until the batches started with flowctl_pump_start have completed (bounded as sends). */
int flowctl_pump_wait_extras(flowctl_pump *p);
/* Waits on sends (write, flush, close_write, run) give up after ms without progress:
 * the call is cancelled, the send fails and flowctl_pump_send_timed_out tells why. */
void flowctl_pump_set_send_timeout(flowctl_pump *p, int64_t ms);
bool flowctl_pump_send_timed_out(flowctl_pump *p);
/* After a server's status: writes from now on fail (a writer waiting for room wakes and
 * fails), without cancelling the call (which could reset the stream before the status). */
void flowctl_pump_close_sends(flowctl_pump *p);
/* Queues a message (waits while the queue is full); *failed: the call is over. The pump
 * owns bb (destroys it when it is not sent). */
int flowctl_pump_write(flowctl_pump *p, grpc_byte_buffer *bb, bool *failed);
/* Half-closes after the queued messages; waits until gRPC has taken them all. */
int flowctl_pump_close_write(flowctl_pump *p);
/* The next message (the caller destroys it), or NULL at the end of the stream. */
int flowctl_pump_read(flowctl_pump *p, grpc_byte_buffer **out);
int flowctl_pump_wait_initial(flowctl_pump *p);
/* Runs another batch and waits for it; *ok its success. Raises if gRPC refuses it. */
int flowctl_pump_run(flowctl_pump *p, const grpc_op *ops, size_t n, bool *ok);
bool flowctl_pump_send_failed(flowctl_pump *p);
/* A server's: starts RECV_CLOSE_ON_SERVER now (once), so that a client that cancels or
 * goes away is seen while the handler neither reads nor writes. finish then waits for it
 * instead of adding the op to the status batch. GVL held. */
void flowctl_pump_watch_close(flowctl_pump *p);
/* With the GVL, without waiting: takes what has completed; true when the client has
 * cancelled or gone away (known only once watch_close was started). before_write: the
 * caller is about to write; in a burst of writes it only looks at what is known (the
 * writes themselves collect completions), so a burst costs no poll per message. */
bool flowctl_pump_peer_gone(flowctl_pump *p, bool before_write);
/* After the status was sent (watch_close started): waits for the close; *cancelled. */
int flowctl_pump_wait_close(flowctl_pump *p, int *cancelled);
bool flowctl_pump_recv_failed(flowctl_pump *p);
/* Cancels (when asked), drains, frees the queues and the completion queue. */
void flowctl_pump_destroy(flowctl_pump *p, bool cancel_call);
/* For a native loop without the GVL (forward.c): as read and write, waiting until done or
 * *woken becomes true (false then: nothing taken; the caller still owns bb). A read that has
 * to wait first starts what push (when not NULL) has queued, without waiting on it. */
bool flowctl_pump_read_nogvl(flowctl_pump *p, grpc_byte_buffer **out, const atomic_bool *woken, flowctl_pump *push);
bool flowctl_pump_write_nogvl(flowctl_pump *p, grpc_byte_buffer *bb, bool *failed, const atomic_bool *woken);

/* ---- forward.c: one call's replies sent as another call's requests, as bytes ---- */
typedef enum {
    FWD_WOKEN,             /* the thread was woken (an interrupt?): the binding looks, then goes on */
    FWD_SOURCE_END,        /* the source ended (its status tells how) */
    FWD_DESTINATION_ENDED, /* the destination refused a write: it ended */
    FWD_BAD_MESSAGE        /* a message the decoder would refuse (bad says why); nothing more moved */
} flowctl_forward_result;
typedef struct flowctl_forward {
    flowctl_pump *src, *dst;
    const ProtobufCMessageDescriptor *desc; /* the messages' type, for skim.c (NULL: not checked) */
    grpc_byte_buffer *held;                 /* read, not yet written (woken meanwhile); the caller frees it */
    atomic_bool woken;
    flowctl_forward_result result;
    uint64_t moved;
    flowctl_skim_error bad;
} flowctl_forward;
/* The loop, for rb_nogvl (flowctl_forward_ubf wakes it); sets f->result. */
void *flowctl_forward_nogvl(void *f);
void flowctl_forward_ubf(void *f);

/* ---- pending.c: a reader's events written and not acknowledged (relay.c, relay_class.c) ---- */
typedef struct {
    grpc_byte_buffer *bb; /* a reference (grpc_byte_buffer_copy: no bytes copied) */
    char *id;
    size_t id_len, size;
    uint32_t hash; /* of the id */
} flowctl_pending_item;
typedef struct {
    uint32_t hash, seq; /* hash 0: empty; seq: the event's number (modulo 2^32) */
} flowctl_pending_slot;
/* A reader's events written and not acknowledged, oldest first, at most limit of them and
 * byte_limit bytes, indexed by id; a gate. */
typedef struct flowctl_pending {
    pthread_mutex_t mu; /* guards everything below */
    flowctl_pending_item *items;
    size_t cap, head, len, limit, bytes, byte_limit;
    uint64_t unprotected; /* let go past the limit: no longer replayable */
    uint64_t epoch;       /* bumped by shut and open */
    bool open;
    uint64_t head_seq;    /* the number of the oldest event (events pushed before it) */
    flowctl_pending_slot *index;
    size_t index_cap, index_used; /* a power of 2; slots not empty (stale ones too) */
} flowctl_pending;
enum { PENDING_OK, PENDING_SHUT, PENDING_NOMEM };
void flowctl_pending_init(flowctl_pending *p, size_t limit, size_t byte_limit); /* byte_limit 0: none */
void flowctl_pending_free(flowctl_pending *p);
/* Remembers bb (a reference) with its id; gated: only while open at epoch (else PENDING_SHUT). */
int flowctl_pending_push(flowctl_pending *p, grpc_byte_buffer *bb, const uint8_t *id, size_t id_len, bool gated,
                         uint64_t epoch);
/* Acknowledges the event with that id and every older one; how many went (0: no such id). */
size_t flowctl_pending_ack(flowctl_pending *p, const uint8_t *id, size_t id_len);
typedef struct {
    size_t len, bytes;
    uint64_t unprotected;
} flowctl_pending_counts;
flowctl_pending_counts flowctl_pending_count(flowctl_pending *p);
void flowctl_pending_clear(flowctl_pending *p);
/* References to every event (malloc'd array of *n, the caller destroys them); take: and forgets them. */
grpc_byte_buffer **flowctl_pending_copy(flowctl_pending *p, bool take, size_t *n);
void flowctl_pending_shut(flowctl_pending *p);
uint64_t flowctl_pending_open(flowctl_pending *p); /* the new epoch */

/* ---- relay.c: the pipeline runner's chain hops, as bytes (relay_class.c, call.c bind them) ---- */
/* The field numbers of the event message (from its class) and the metadata failure key. */
typedef struct {
    uint32_t id, type, metadata; /* string, string, map<string, string> */
    char failure_key[64];
    size_t failure_key_len;
} flowctl_relay_fields;
typedef struct {
    const uint8_t *id, *type; /* within the scanned bytes */
    size_t id_len, type_len;
    bool failed;              /* the metadata has the failure key */
} flowctl_relay_event;
/* Reads id, type and the failure key off an event's bytes (last one wins, as in the decoder). */
void flowctl_relay_scan(const flowctl_relay_fields *fs, const uint8_t *p, size_t len, flowctl_relay_event *ev);

typedef enum {
    RELAY_WOKEN,             /* an interrupt? the binding looks, then goes on */
    RELAY_SOURCE_END,        /* the producer's stream ended (its status tells how) */
    RELAY_DESTINATION_ENDED, /* a write to the reader failed: its stream is over (the event is pending) */
    RELAY_BAD_MESSAGE,       /* bytes the decoder would refuse (bad says why) */
    RELAY_DETACHED,          /* the reader's gate is shut (its link broke): held waits for the next link */
    RELAY_DIVERT,            /* held failed (the failure key): Ruby routes it */
    RELAY_LIMIT,             /* limit events remembered in this run (a sink's checkpoint is due) */
    RELAY_NOMEM
} flowctl_relay_result;
typedef struct flowctl_relay {
    /* per run, set by the binding */
    flowctl_pump *src, *dst;
    const ProtobufCMessageDescriptor *desc;
    flowctl_pending *ack;  /* the producer's own pending list, acknowledged by its replies (NULL: a source) */
    flowctl_pending *into; /* the reader's */
    uint64_t epoch;        /* the reader's gate epoch this run writes at */
    uint64_t limit;        /* events remembered before RELAY_LIMIT (0: no limit) */
    uint64_t pushed;       /* remembered in this run */
    atomic_bool woken;
    flowctl_relay_result result;
    flowctl_skim_error bad;
    /* kept across runs */
    flowctl_relay_fields fields;
    char **types;          /* the reader's input types (none: every type) */
    size_t *type_lens, ntypes;
    grpc_byte_buffer *held; /* read, not yet written (or diverted) */
    bool held_pushed;       /* held is remembered already, at held_epoch */
    uint64_t held_epoch;
    bool keep_last;         /* keep the last event read (a source's relay: its cursor) */
    grpc_byte_buffer *last;
    _Atomic uint64_t read, written, dropped;
} flowctl_relay;
void *flowctl_relay_nogvl(void *r); /* for rb_nogvl; flowctl_relay_ubf wakes it; sets r->result */
void flowctl_relay_ubf(void *r);
void flowctl_relay_free(flowctl_relay *r); /* what it holds (not the struct) */
void init_flowctl_relay_class(void);
/* The relay of a Flowctl::Native::Relay and the list of a Flowctl::Native::Pending (TypeError otherwise). */
flowctl_relay *flowctl_relay_get(VALUE relay);
flowctl_pending *flowctl_pending_get(VALUE pending);
VALUE flowctl_relay_message_class(VALUE relay);

/* ---- fiber.c: unary calls completed on watch.c's queue (Fiber schedulers) ---- */
void init_flowctl_fiber(void);
void flowctl_fiber_atfork_child(void);

/* ---- call.c, server.c, heartbeat.c --------------------------------------- */
void init_flowctl_call(void);
/* call.c: the six ops of a unary call (send metadata, message and half-close; receive metadata,
 * message and status), for call.c's own unary calls and fiber.c's. */
void flowctl_unary_ops(grpc_op ops[6], const flowctl_metadata *send_md, grpc_byte_buffer *send_buf,
                       grpc_metadata_array *recv_initial, grpc_byte_buffer **recv_buf, grpc_status_code *status,
                       grpc_slice *details, grpc_metadata_array *recv_trailing);
void init_flowctl_server(void);
void init_flowctl_server_call(void);
void init_flowctl_heartbeat(void);
void init_flowctl_heartbeat_class(void);

/* ---- the native heartbeat: heartbeat_wire.c, heartbeat.c, heartbeat_class.c ----
 * heartbeat_wire.c   the plan (what to send: paths, field numbers, value types; given by
 *                    Ruby) -> request bytes, and reply bytes -> outcome. No gRPC, no Ruby.
 * heartbeat.c        the engine: thread, schedule, backoff, re-registration, final beat,
 *                    config snapshot, live list, fork hooks. No Ruby.
 * heartbeat_class.c  Flowctl::Heartbeat: Ruby values -> plan and snapshot, stats, waits.
 */
#define HB_TEXT 256 /* error texts and reply messages kept by the thread */

/* One request/reply pair, read-only once the thread runs. Field numbers 0: absent. */
typedef struct flowctl_hb_plan {
    char *register_path, *beat_path, *unregister_path; /* unregister_path NULL: no such call */
    uint8_t *register_req;                /* the register request, encoded by Ruby */
    size_t register_len;
    bool register_first;                  /* register before the first beat (else only when forgotten) */
    uint32_t reg_success, reg_message, reg_service_id; /* register reply: bool, string, string */
    uint32_t beat_id, beat_status, beat_metrics, beat_timestamp; /* heartbeat request */
    bool status_enum;                     /* status as an enum varint, else its name as a string */
    bool metric_strings;                  /* map<string,string> metrics, else map<string,double> */
    uint32_t beat_success, beat_message;  /* heartbeat reply; beat_success 0: the status says it all */
    uint32_t unreg_id;                    /* unregister request: the service id */
    uint32_t forgot_codes;                /* bit (1 << code): with forgot_details in the details ... */
    char *forgot_details;                 /* ... the control plane forgot us: register again */
    size_t n_statuses;                    /* the HealthStatus values: name and number */
    char **status_names;
    int32_t *status_numbers;
    unsigned stopping;                    /* index of the final beat's status */
} flowctl_hb_plan;

/* What a beat sends besides status and time: immutable, refcounted, swapped under a lock. */
typedef struct flowctl_hb_config {
    atomic_int refs;
    size_t n_metrics;
    char **keys;
    double *values; /* map<string,double> */
    char **texts;   /* map<string,string> */
} flowctl_hb_config;

typedef struct flowctl_bytes {
    uint8_t *p; /* malloc'd */
    size_t len;
} flowctl_bytes;

typedef enum { HB_OK, HB_REJECTED, HB_FAILED } flowctl_hb_result;

void flowctl_hb_plan_free(flowctl_hb_plan *plan);
/* false when out of memory. */
bool flowctl_hb_encode_beat(const flowctl_hb_plan *plan, const char *id, const flowctl_hb_config *c,
                            unsigned status, const struct timespec *now, flowctl_bytes *out);
bool flowctl_hb_encode_unregister(const flowctl_hb_plan *plan, const char *id, flowctl_bytes *out);
/* A reply: HB_OK, HB_REJECTED (its success field is false; its message field goes to
 * message) or HB_FAILED (it does not decode). With id_field, *id gets that string field
 * (malloc'd; NULL when absent or empty). */
flowctl_hb_result flowctl_hb_read_reply(const uint8_t *p, size_t len, uint32_t success_field, uint32_t message_field,
                                        uint32_t id_field, char *message, size_t cap, char **id);

/* heartbeat.c: the engine. The struct is its own; the binding uses these functions. */
typedef struct flowctl_heartbeat flowctl_heartbeat;

typedef struct flowctl_hb_stats {
    uint64_t sent, failed, consecutive, registrations;
    char last_error[HB_TEXT];
    bool has_success;
    struct timespec last_success;
} flowctl_hb_stats;

typedef struct flowctl_hb_error {
    int code; /* grpc_status_code, or -1 when the control plane answered success: false */
    char message[HB_TEXT];
} flowctl_hb_error;

/* Everything a thread needs, owned by the heartbeat once created (freed on failure too). */
typedef struct flowctl_hb_settings {
    flowctl_hb_plan *plan;
    char *id;
    grpc_metadata *headers; /* slices owned */
    size_t n_headers;
    double interval, call_timeout;
    bool want_errors;
    flowctl_hb_config *config;
    unsigned status;
} flowctl_hb_settings;

flowctl_hb_config *flowctl_hb_config_new(size_t n, bool strings); /* NULL when out of memory */
void flowctl_hb_config_unref(flowctl_hb_config *c);
void flowctl_hb_settings_free(flowctl_hb_settings *s);
flowctl_heartbeat *flowctl_hb_create(flowctl_hb_settings *s); /* takes s's contents; NULL: out of memory */
int flowctl_hb_start(flowctl_heartbeat *hb, flowctl_channel *ch); /* 0 or an errno */
void flowctl_hb_release(flowctl_heartbeat *hb); /* the owner lets go: stop, detach, unref; never blocks */
bool flowctl_hb_dead(const flowctl_heartbeat *hb); /* made before a fork: only memory here */
bool flowctl_hb_started(const flowctl_heartbeat *hb);
bool flowctl_hb_joined(const flowctl_heartbeat *hb); /* a stop joined or detached the thread */
size_t flowctl_hb_memsize(const flowctl_heartbeat *hb);
const flowctl_hb_plan *flowctl_hb_plan_of(const flowctl_heartbeat *hb);
void flowctl_hb_swap_config(flowctl_heartbeat *hb, flowctl_hb_config *c);
flowctl_hb_config *flowctl_hb_take_config(flowctl_heartbeat *hb, unsigned *status); /* a ref */
void flowctl_hb_set_status(flowctl_heartbeat *hb, unsigned status);
void flowctl_hb_service_id(flowctl_heartbeat *hb, char *buf, size_t cap);
void flowctl_hb_get_stats(flowctl_heartbeat *hb, flowctl_hb_stats *out);
bool flowctl_hb_running(flowctl_heartbeat *hb);
bool flowctl_hb_wants_errors(const flowctl_heartbeat *hb);
void flowctl_hb_request_stop(flowctl_heartbeat *hb, double final_timeout);
bool flowctl_hb_take_error(flowctl_heartbeat *hb, flowctl_hb_error *out);
/* Waits (a blocking function for rb_nogvl; flowctl_hb_wait_ubf unblocks it). */
typedef struct flowctl_hb_wait {
    flowctl_heartbeat *hb;
    bool for_error;               /* an error or the end, else the end only */
    const struct timespec *until; /* CLOCK_MONOTONIC, or NULL: no limit */
    bool interrupted, done;
} flowctl_hb_wait;
void *flowctl_hb_wait_nogvl(void *wait);
void flowctl_hb_wait_ubf(void *wait);
/* After a wait for the end: joins the finished thread, or detaches it (false) when it
 * has not finished. Once only: true when another caller did it first. */
bool flowctl_hb_join(flowctl_heartbeat *hb, bool finished);
/* Every heartbeat of this process: stop them all; count them. */
void flowctl_hb_stop_all_request(double final_timeout);
typedef struct flowctl_hb_all_wait {
    struct timespec until;
    bool interrupted;
} flowctl_hb_all_wait;
void *flowctl_hb_all_wait_nogvl(void *wait);
void flowctl_hb_all_wait_ubf(void *wait);
int flowctl_hb_live_count(void);

/* ---- auth.c: the bearer token check of a server --------------------------- */
/* True when md carries "authorization: Bearer <token>" (scheme in any case, constant time). */
bool flowctl_bearer_ok(const char *token, size_t len, const grpc_metadata_array *md);

/* ---- conn.c: a server's TCP connections (by local port) ------------------ */
/* Shuts down (shutdown(2), never close) the connections to ports whose remote address
 * is peer, written as grpc_call_get_peer writes it; returns how many. Each shutdown is
 * added to *tally (when not NULL) just before it is made. */
int flowctl_conn_shutdown(const char *peer, const int *ports, int n_ports, _Atomic long *tally);
/* The accepted connections on ports (listeners not counted); -1 when unknown. */
int flowctl_conn_count(const int *ports, int n_ports);
/* Shuts down the connection on ports that received the most bytes over the next ms
 * milliseconds (it sleeps that long); 1 when there was one. */
int flowctl_conn_shutdown_busiest(const int *ports, int n_ports, int ms, _Atomic long *tally);
/* The local port of a TCP socket (0 for anything else); true for a listening socket. */
int flowctl_conn_local_port(int fd);
bool flowctl_conn_listening(int fd);
/* 1 when a listener on ports has a connection waiting to be accepted, 0 when none has,
 * -1 when there is no listener. */
int flowctl_conn_listener_pending(const int *ports, int n_ports);
/* shutdown(2) on the listeners on ports: the port is free to listen on again. */
int flowctl_conn_close_listeners(const int *ports, int n_ports);
/* When fewer than limit/reserve_div (at least 16) descriptors are left below the soft
 * RLIMIT_NOFILE, shuts down the connections on ports idle longest (to half the reserve
 * more); returns how many. */
int flowctl_conn_shed_idle(const int *ports, int n_ports, int reserve_div, _Atomic long *tally);
/* Descriptors left below the soft RLIMIT_NOFILE (0 when none is left to count them). */
int flowctl_conn_fds_left(void);
/* This process's resident memory (0 when unknown). */
size_t flowctl_rss_bytes(void);
#define FLOWCTL_OFFENDERS 64
typedef struct flowctl_offender {
    uint64_t hash;     /* of the peer string */
    int64_t since_ms;  /* the one-second window's start */
    int count;
} flowctl_offender;
typedef struct flowctl_offenders {
    flowctl_offender e[FLOWCTL_OFFENDERS];
} flowctl_offenders;
/* Counts one offense of peer; true when that makes more than limit within a second
 * (the count starts again). One thread at a time. */
bool flowctl_conn_offend(flowctl_offenders *t, const char *peer, int64_t now_ms, int limit);

/* ---- beat_table.c: flowctl.v1 heartbeats answered without Ruby (no Ruby there) ---- */
/* A server's native answer to one registered unary method (server_unary.c): answer(ctx, bytes
 * of the request) true means "done: reply with an empty message and OK"; false leaves the
 * call to Ruby as if the hook were not there. release(ctx) when the server is freed. */
typedef struct flowctl_fast_unary {
    bool (*answer)(void *ctx, const uint8_t *p, size_t len);
    void (*release)(void *ctx);
    void *ctx;
} flowctl_fast_unary;

typedef struct flowctl_beat_table flowctl_beat_table;
/* One metric as Ruby publishes it or takes it back: val NULL is a value that is not a String
 * in Ruby (a seed's double: 8 bytes in the registry's count, never sent back). */
typedef struct flowctl_beat_metric {
    char *key, *val;
    uint32_t klen, vlen;
} flowctl_beat_metric;
/* What the table took in for one component since Ruby last took it: the metrics that
 * changed (their current values), the last heartbeat's time, how many, and the bytes the
 * metrics grew by. */
typedef struct flowctl_beat_change {
    char *id;
    size_t idlen;
    int64_t last_ns;
    uint64_t beats;
    int64_t growth;
    flowctl_beat_metric *m;
    size_t n;
} flowctl_beat_change;

flowctl_beat_table *flowctl_beat_table_new(uint32_t max_metrics, uint32_t max_metric_bytes); /* NULL: no memory */
void flowctl_beat_table_ref(flowctl_beat_table *t);
void flowctl_beat_table_unref(flowctl_beat_table *t);
size_t flowctl_beat_table_memsize(flowctl_beat_table *t);
/* Any thread: a HeartbeatRequest's bytes; true when taken in (see beat_table.c for which). */
bool flowctl_beat_table_apply(flowctl_beat_table *t, const uint8_t *p, size_t len);
/* The hook a server calls (holds a reference until release). */
flowctl_fast_unary flowctl_beat_table_hook(flowctl_beat_table *t);
/* Publishes a component (replacing one of that id: take it first, or its changes are lost),
 * with copies of m, and the room (flowctl_beat_table_limits). false: out of memory. */
bool flowctl_beat_table_put(flowctl_beat_table *t, const char *id, size_t idlen, int status, int64_t saved_at,
                            const flowctl_beat_metric *m, size_t n, int64_t room);
/* Removes a component: 1 and its changes in *out (flowctl_beat_change_free) when it was there,
 * 0 when not, -1 when out of memory (nothing removed). */
int flowctl_beat_table_take(flowctl_beat_table *t, const char *id, size_t idlen, flowctl_beat_change *out);
/* A heartbeat through Ruby: hold stops the table taking the component's heartbeats in and
 * gives what it took in so far (0: not published, 1: nothing, 2: *out filled, -1: out of
 * memory, nothing done); release stores what Ruby changed (status, saved_at, the metrics it
 * merged: String values copied, val NULL for others) and the room, and takes heartbeats in
 * again. false: out of memory, the component is taken out of the table (Ruby's from then on). */
int flowctl_beat_table_hold(flowctl_beat_table *t, const char *id, size_t idlen, flowctl_beat_change *out);
bool flowctl_beat_table_release(flowctl_beat_table *t, const char *id, size_t idlen, int status, int64_t saved_at,
                                const flowctl_beat_metric *m, size_t n, int64_t room);
/* The changes of one component (idlen != (size_t)-1) or of all, each a copy; the table keeps them
 * published. How many in *out (malloc'd, NULL when none); -1: out of memory (nothing taken). */
long flowctl_beat_table_drain(flowctl_beat_table *t, const char *id, size_t idlen, flowctl_beat_change **out);
void flowctl_beat_change_free(flowctl_beat_change *c);
/* The bytes the registry may still grow by (its limit minus what it holds); persistence's
 * refresh interval (ns, 0: no persistence): a heartbeat due to be written is left to Ruby. */
void flowctl_beat_table_limits(flowctl_beat_table *t, int64_t room, int64_t refresh);
uint64_t flowctl_beat_table_answered(flowctl_beat_table *t); /* heartbeats taken in, ever */
size_t flowctl_beat_table_size(flowctl_beat_table *t);
/* beat_table_class.c: the table behind a Flowctl::Native::BeatTable (raises for anything else) */
flowctl_beat_table *flowctl_beat_table_of(VALUE obj);
void init_flowctl_beat_table_class(void);

/* ---- fork.c: fork handlers (pthread_atfork) and the gate ---------------- */
/* This process's id, kept by the fork handlers (getpid() is a system call). Objects
 * record it; in a forked child, those of the parent are left alone. */
extern pid_t flowctl_pid;
void flowctl_fork_env(void);
/* setenv(name, value) unless the environment sets name (to something not empty). */
void flowctl_default_env(const char *name, const char *value);
void init_flowctl_fork(void);
/*
 * Fork hooks, registered at load by the files that keep threads or process-wide state
 * (fork.c calls none of them by name). All run inside fork(), in pthread_atfork
 * handlers, in registration order; none may call Ruby or block on gRPC.
 *   evict   before a fork, when our threads have not left gRPC 0.2 s after the gate
 *           closed: make them leave (cancel what they wait for)
 *   child   in the child, before gRPC core restarts: forget the parent's threads and
 *           reinitialise the locks they may have held
 * Either may be NULL.
 */
typedef struct flowctl_fork_hooks {
    const char *name;
    void (*close)(void);  /* the gate just closed: wake a thread that waits inside gRPC without a time limit */
    void (*evict)(void);  /* 0.2 s later, threads still inside: make them leave */
    void (*child)(void);  /* in the child, before gRPC core's threads start again */
} flowctl_fork_hooks;
void flowctl_fork_register(const flowctl_fork_hooks *hooks);
/* Raises Flowctl::Error in a forked child where gRPC core could not be prepared. */
void flowctl_fork_check(void);
/* The channel arg every channel and server of ours carries: it tells fork.c which
 * sockets gRPC core made, so that a forked child can let go of its parent's. */
grpc_arg flowctl_fork_socket_arg(void);
/*
 * The gate: every stretch a thread of ours spends inside gRPC core without the GVL
 * (a wait on a queue, a heartbeat's call, the server's acceptor) is bracketed by
 * enter/leave, and each such stretch is bounded (waits poll every few ms). Before a
 * fork the gate closes: threads leave gRPC and wait at the gate, so that gRPC core's
 * fork handlers find nobody inside and can prepare (fork.c). Threads holding the GVL
 * need no gate: the forking thread holds it. Nested stretches of one thread count once.
 */
void flowctl_gate_enter(void);
/* As enter, but gives up (false) when *woken becomes true while the gate is closed. */
bool flowctl_gate_enter_unless(const atomic_bool *woken);
void flowctl_gate_leave(void);

#endif /* FLOWCTL_H */
