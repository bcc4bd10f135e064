/*
 * wait.c — every blocking wait of the extension: a pluck on a completion queue
 * without the GVL. An interrupt that raises cancels the call, and the wait goes on
 * until the batch's tag has completed, so no batch is left in flight when Ruby raises.
 */
#include "flowctl.h"

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
};

/* The tag raised by a pending interrupt of this thread, kept for flowctl_wait_finish. */
static __thread int pending_state;

/* Each pluck is a stretch inside gRPC of at most POLL_MS, through the fork gate. */
static void *
pluck_polling(void *p)
{
    struct pluck_arg *a = p;
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
    struct pluck_arg a = {.cq = cq, .tag = tag};
    *interrupted = 0;
    for (;;) {
        atomic_store(&a.woken, false);
        a.ev.type = GRPC_QUEUE_TIMEOUT;
        rb_nogvl(pluck_polling, &a, pluck_ubf, &a, RB_NOGVL_INTR_FAIL | RB_NOGVL_UBF_ASYNC_SAFE);
        if (a.ev.type != GRPC_QUEUE_TIMEOUT) return a.ev;
        if (!flowctl_wait_interrupted()) continue; /* nothing to raise: keep waiting */
        if (call) grpc_call_cancel(call, NULL);
        /* cancelled: the tag completes promptly; no unblock function, it must complete */
        rb_nogvl(pluck_until_done, &a, NULL, NULL, 0);
        *interrupted = 1;
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
flowctl_cond_init(pthread_cond_t *cond)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(cond, &a);
    pthread_condattr_destroy(&a);
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

void
init_flowctl_wait(void)
{
    eCancelled = rb_const_get(mFlowctl, rb_intern("Cancelled"));
}
