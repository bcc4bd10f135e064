/*
 * wait.c — every blocking wait of the extension: a pluck on a completion queue
 * without the GVL. An interrupt that raises cancels the call, and the wait goes on
 * until the batch's tag has completed, so no batch is left in flight when Ruby raises.
 */
#include "flowctl.h" /* Ruby's config.h defines _GNU_SOURCE: sched_getaffinity, CPU_COUNT */
#include <sched.h>
#include <time.h>

static VALUE eCancelled;

/*
 * How a wait is interrupted: the unblock function only sets a flag (so it is
 * async-signal-safe and Ruby needs no helper thread) and the pluck polls that flag
 * every POLL_MS. Back with the GVL, the pending interrupts are run: when one raises
 * (Thread#raise, kill, Timeout, a trap that raises) the call is cancelled, the wait
 * goes on until the tag completes, and flowctl_wait_finish re-raises it. When none
 * raises (Ruby calls unblock functions spuriously, and a trap may just log), the wait
 * simply resumes: the call is not cancelled.
 */
#define POLL_MS 20

struct pluck_arg {
    grpc_completion_queue *cq;
    void *tag;
    grpc_event ev;
    atomic_bool woken;
    unsigned spin_us;
};

/*
 * Spinning. On a machine whose CPUs sleep when idle (virtual ones above all), a thread that
 * sleeps until a reply arrives pays a cross-CPU wake-up: on this project's 2-vCPU machine a
 * loopback unary call went from 14k to 23k calls/s with gRPC C core alone when the caller
 * looked for the reply without sleeping for up to 50 us first. So a unary call whose channel
 * has been answering within the limit looks (non-blocking plucks, GVL released, inside the
 * fork gate) for about 1.5 times its recent round trip before it sleeps; a channel that
 * answers slower, or one with other unary calls waiting (they would spin against each
 * other), does not spin, and only so many threads spin at once (spin_slots_now). The cost
 * is the CPU of the spin, bounded by the limit.
 */
unsigned flowctl_spin_max_us = 100;

/* Spinning threads at a time: half the CPUs this process may run on (none on one CPU,
 * where a spinner only takes the CPU from the peer that is to answer). Re-read every 100 ms. */
static atomic_int spinners;
static atomic_ulong spins_started, spins_answered; /* Flowctl::Native.spin_stats */
static atomic_ulong cancel_waits; /* ... interrupted waits that let go of the GVL for the cancelled batch */
static atomic_int spin_slots;
static atomic_llong spin_slots_read_ms;

static int
spin_slots_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    long long ms = (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
    long long read = atomic_load(&spin_slots_read_ms);
    if (read == 0 || ms - read > 100) {
        cpu_set_t set;
        int cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
        atomic_store(&spin_slots, cpus / 2);
        atomic_store(&spin_slots_read_ms, ms);
    }
    return atomic_load(&spin_slots);
}

static void
spin_for(struct pluck_arg *a)
{
    if (atomic_fetch_add(&spinners, 1) >= spin_slots_now()) {
        atomic_fetch_sub(&spinners, 1);
        return;
    }
    if (!flowctl_gate_enter_unless(&a->woken)) {
        atomic_fetch_sub(&spinners, 1);
        return;
    }
    atomic_fetch_add(&spins_started, 1);
    gpr_timespec until = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_micros(a->spin_us, GPR_TIMESPAN));
    do {
        a->ev = grpc_completion_queue_pluck(a->cq, a->tag, gpr_inf_past(GPR_CLOCK_MONOTONIC), NULL);
    } while (a->ev.type == GRPC_QUEUE_TIMEOUT && !atomic_load(&a->woken) &&
             gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), until) < 0);
    flowctl_gate_leave();
    atomic_fetch_sub(&spinners, 1);
    if (a->ev.type != GRPC_QUEUE_TIMEOUT) atomic_fetch_add(&spins_answered, 1);
}

/* The tag raised by a pending interrupt of this thread, kept for flowctl_wait_finish. */
static __thread int pending_state;

/* Each pluck is a stretch inside gRPC of at most POLL_MS, through the fork gate. */
static void *
pluck_polling(void *p)
{
    struct pluck_arg *a = p;
    if (a->spin_us > 0) {
        spin_for(a);
        a->spin_us = 0; /* once per wait */
        if (a->ev.type != GRPC_QUEUE_TIMEOUT || atomic_load(&a->woken)) return NULL;
    }
    do {
        if (!flowctl_gate_enter_unless(&a->woken)) return NULL; /* woken while a fork was prepared */
        gpr_timespec d = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(POLL_MS, GPR_TIMESPAN));
        a->ev = grpc_completion_queue_pluck(a->cq, a->tag, d, NULL);
        flowctl_gate_leave();
    } while (a->ev.type == GRPC_QUEUE_TIMEOUT && !atomic_load(&a->woken));
    return NULL;
}

static void *
pluck_until_done(void *p)
{
    struct pluck_arg *a = p;
    flowctl_gate_enter();
    a->ev = grpc_completion_queue_pluck(a->cq, a->tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    flowctl_gate_leave();
    return NULL;
}

/* With the GVL, a few looks without waiting (a cancelled call's tag is usually there
 * already); true when the tag has completed. */
static bool
pluck_now(struct pluck_arg *a)
{
    for (int i = 0; i < 3; i++) {
        a->ev = grpc_completion_queue_pluck(a->cq, a->tag, gpr_inf_past(GPR_CLOCK_MONOTONIC), NULL);
        if (a->ev.type != GRPC_QUEUE_TIMEOUT) return true;
    }
    return false;
}

static void
pluck_ubf(void *p)
{
    struct pluck_arg *a = p;
    atomic_store(&a->woken, true);
}

static VALUE
check_ints(VALUE unused)
{
    rb_thread_check_ints();
    return Qnil;
}

bool
flowctl_wait_interrupted(void)
{
    int state = 0;
    rb_protect(check_ints, Qnil, &state);
    if (!state) return false;
    pending_state = state;
    return true;
}

grpc_event
flowctl_wait_tag(grpc_completion_queue *cq, void *tag, grpc_call *call, int *interrupted)
{
    return flowctl_wait_tag_spin(cq, tag, call, interrupted, 0);
}

grpc_event
flowctl_wait_tag_spin(grpc_completion_queue *cq, void *tag, grpc_call *call, int *interrupted, unsigned spin_us)
{
    struct pluck_arg a = {.cq = cq, .tag = tag, .spin_us = spin_us};
    *interrupted = 0;
    for (;;) {
        atomic_store(&a.woken, false);
        a.ev.type = GRPC_QUEUE_TIMEOUT;
        rb_nogvl(pluck_polling, &a, pluck_ubf, &a, RB_NOGVL_INTR_FAIL | RB_NOGVL_UBF_ASYNC_SAFE);
        if (a.ev.type != GRPC_QUEUE_TIMEOUT) return a.ev;
        if (!flowctl_wait_interrupted()) continue; /* nothing to raise: keep waiting */
        if (call) grpc_call_cancel(call, NULL);
        *interrupted = 1;
        /* Cancelled: the tag completes promptly, most often within the cancel itself. Look
         * for it before letting go of the GVL: with another Ruby thread busy, each time this
         * thread gives the GVL away it waits a scheduler quantum to get it back. */
        if (pluck_now(&a)) return a.ev;
        /* no unblock function: it must complete */
        flowctl_wait_note_cancel_wait();
        rb_nogvl(pluck_until_done, &a, NULL, NULL, 0);
        return a.ev;
    }
}

void
flowctl_wait_finish(int interrupted)
{
    if (!interrupted) return;
    int state = pending_state;
    pending_state = 0;
    if (state) rb_jump_tag(state);
    rb_raise(eCancelled, "call cancelled by an interrupt");
}

void
flowctl_cq_destroy(grpc_completion_queue *cq)
{
    if (!cq) return;
    grpc_completion_queue_shutdown(cq);
    grpc_completion_queue_destroy(cq);
}

grpc_byte_buffer *
flowctl_buffer_from_str(VALUE str)
{
    grpc_slice s = grpc_slice_from_copied_buffer(RSTRING_PTR(str), (size_t)RSTRING_LEN(str));
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

struct decode_arg {
    VALUE klass;
    grpc_byte_buffer *buf;
    grpc_byte_buffer_reader r;
    grpc_slice flat; /* the message in one piece when gRPC holds it in several */
    bool reading, flattened;
};

static VALUE
decode_body(VALUE arg)
{
    struct decode_arg *d = (struct decode_arg *)arg;
    if (!grpc_byte_buffer_reader_init(&d->r, d->buf)) rb_raise(eFlowctlError, "gRPC could not read a received message");
    d->reading = true;
    const grpc_slice_buffer *sb = &d->r.buffer_out->data.raw.slice_buffer; /* decompressed if it was */
    if (sb->length >= FLOWCTL_LAZY_MIN) { /* decoded lazily: the message keeps its own copy */
        VALUE str = rb_str_buf_new((long)sb->length);
        char *p = RSTRING_PTR(str);
        for (size_t i = 0; i < sb->count; i++) {
            memcpy(p, GRPC_SLICE_START_PTR(sb->slices[i]), GRPC_SLICE_LENGTH(sb->slices[i]));
            p += GRPC_SLICE_LENGTH(sb->slices[i]);
        }
        rb_str_set_len(str, (long)sb->length);
        return flowctl_message_decode_own(d->klass, rb_obj_freeze(str));
    }
    grpc_slice s;
    if (sb->count == 1) {
        s = sb->slices[0];
    } else {
        d->flat = grpc_byte_buffer_reader_readall(&d->r);
        d->flattened = true;
        s = d->flat;
    }
    return flowctl_message_decode(d->klass, GRPC_SLICE_START_PTR(s), GRPC_SLICE_LENGTH(s));
}

static VALUE
decode_release(VALUE arg)
{
    struct decode_arg *d = (struct decode_arg *)arg;
    if (d->flattened) grpc_slice_unref(d->flat);
    if (d->reading) grpc_byte_buffer_reader_destroy(&d->r);
    grpc_byte_buffer_destroy(d->buf);
    return Qnil;
}

VALUE
flowctl_decode_buffer(VALUE klass, grpc_byte_buffer *buf)
{
    struct decode_arg d = {.klass = klass, .buf = buf};
    return rb_ensure(decode_body, (VALUE)&d, decode_release, (VALUE)&d);
}

grpc_byte_buffer *
flowctl_buffer_from_value(VALUE v)
{
    if (RB_TYPE_P(v, T_STRING)) return flowctl_buffer_from_str(v);
    VALUE lazy = flowctl_msg_lazy_bytes(v); /* TypeError for anything else */
    if (!NIL_P(lazy)) return flowctl_buffer_from_str(lazy); /* untouched since decoded: its own bytes */
    const flowctl_msg *m = flowctl_msg_get(v);
    char stack[4096];
    bool fits;
    size_t len = flowctl_encode_to(m->ci, v, stack, sizeof(stack), &fits);
    if (!fits) { /* a large message: encoded into a String of its exact size */
        VALUE str = flowctl_encode(m->ci, v);
        grpc_byte_buffer *bb = flowctl_buffer_from_str(str);
        RB_GC_GUARD(str);
        return bb;
    }
    grpc_slice s = grpc_slice_from_copied_buffer(stack, len);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

bool
flowctl_buffer_flat(grpc_byte_buffer *bb, grpc_slice *flat, const uint8_t **p, size_t *len)
{
    grpc_byte_buffer_reader r;
    if (!grpc_byte_buffer_reader_init(&r, bb)) return false;
    const grpc_slice_buffer *sb = &r.buffer_out->data.raw.slice_buffer; /* decompressed if it was */
    *flat = sb->count == 1 ? grpc_slice_ref(sb->slices[0]) : grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    *p = GRPC_SLICE_START_PTR(*flat);
    *len = GRPC_SLICE_LENGTH(*flat);
    return true;
}

VALUE
flowctl_str_from_buffer(grpc_byte_buffer *buf)
{
    grpc_byte_buffer_reader r;
    if (!buf || !grpc_byte_buffer_reader_init(&r, buf)) return Qnil;
    size_t len = grpc_byte_buffer_length(buf);
    VALUE str = rb_str_buf_new((long)len);
    char *p = RSTRING_PTR(str);
    grpc_slice s;
    while (grpc_byte_buffer_reader_next(&r, &s)) {
        size_t n = GRPC_SLICE_LENGTH(s);
        memcpy(p, GRPC_SLICE_START_PTR(s), n);
        p += n;
        grpc_slice_unref(s);
    }
    grpc_byte_buffer_reader_destroy(&r);
    rb_str_set_len(str, (long)len);
    return str;
}

/*
 * call-seq:
 *   Flowctl.unary_spin_us -> Integer
 *   Flowctl.unary_spin_us = microseconds
 *
 * The most a unary call looks for its reply without sleeping (see above): 100 by default,
 * or FLOWCTL_SPIN_US; 0 turns spinning off. From 0 to 10000.
 */
static VALUE
spin_get(VALUE mod)
{
    return UINT2NUM(flowctl_spin_max_us);
}

static VALUE
spin_set(VALUE mod, VALUE us)
{
    if (!RB_INTEGER_TYPE_P(us))
        rb_raise(rb_eTypeError, "Flowctl.unary_spin_us must be an Integer number of microseconds (given %"PRIsVALUE")",
                 rb_obj_class(us));
    long v = NUM2LONG(us);
    if (v < 0 || v > 10000)
        rb_raise(rb_eArgError, "Flowctl.unary_spin_us must be from 0 to 10000 microseconds (given %ld)", v);
    flowctl_spin_max_us = (unsigned)v;
    return us;
}

void
flowctl_wait_note_cancel_wait(void)
{
    atomic_fetch_add(&cancel_waits, 1);
}

/* call-seq: Flowctl::Native.spin_stats -> {started: n, answered: n, cancel_waits: n} (process-wide, since load)
 *
 * cancel_waits: interrupted waits that had to let go of the GVL again to wait for their
 * cancelled batch (each costs one more GVL hand-off). */
static VALUE
spin_stats(VALUE mod)
{
    VALUE h = rb_hash_new();
    rb_hash_aset(h, ID2SYM(rb_intern("started")), ULONG2NUM(atomic_load(&spins_started)));
    rb_hash_aset(h, ID2SYM(rb_intern("answered")), ULONG2NUM(atomic_load(&spins_answered)));
    rb_hash_aset(h, ID2SYM(rb_intern("cancel_waits")), ULONG2NUM(atomic_load(&cancel_waits)));
    return h;
}

void
init_flowctl_wait(void)
{
    rb_define_module_function(mFlowctlNative, "spin_stats", spin_stats, 0);
    rb_define_module_function(mFlowctl, "unary_spin_us", spin_get, 0);
    rb_define_module_function(mFlowctl, "unary_spin_us=", spin_set, 1);
    eCancelled = rb_const_get(mFlowctl, rb_intern("Cancelled"));
    const char *spin = getenv("FLOWCTL_SPIN_US");
    if (spin && *spin) {
        char *end;
        unsigned long v = strtoul(spin, &end, 10);
        if (*end || v > 10000)
            rb_raise(rb_eArgError, "FLOWCTL_SPIN_US must be a number of microseconds from 0 to 10000 (given %s)", spin);
        flowctl_spin_max_us = (unsigned)v;
    }
}
