/*
 * wait.c — every blocking wait of the extension: a pluck on a completion queue
 * without the GVL whose unblock function cancels the call. The wait goes on until
 * the batch's tag has completed, so no batch is left in flight when Ruby raises.
 */
#include "flowctl.h"

static VALUE eCancelled;

struct pluck_arg {
    grpc_completion_queue *cq;
    void *tag;
    grpc_call *call;
    grpc_event ev;
    bool ran;
    atomic_bool interrupted;
};

static void *
pluck_nogvl(void *p)
{
    struct pluck_arg *a = p;
    a->ran = true;
    a->ev = grpc_completion_queue_pluck(a->cq, a->tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    return NULL;
}

static void
pluck_ubf(void *p)
{
    struct pluck_arg *a = p;
    atomic_store(&a->interrupted, true);
    if (a->call) grpc_call_cancel(a->call, NULL);
}

static VALUE
check_ints(VALUE unused)
{
    rb_thread_check_ints();
    return Qnil;
}

/* The state of an interrupt caught while re-waiting; only C runs until wait_finish uses it. */
static __thread int caught_state;

static void
cancel_and_wait(struct pluck_arg *a)
{
    atomic_store(&a->interrupted, true);
    if (a->call) grpc_call_cancel(a->call, NULL);
    pluck_nogvl(a); /* the tag completes promptly once the call is cancelled */
}

grpc_event
flowctl_wait_tag(grpc_completion_queue *cq, void *tag, grpc_call *call, int *interrupted)
{
    struct pluck_arg a = {.cq = cq, .tag = tag, .call = call};
    atomic_init(&a.interrupted, false);
    *interrupted = 0;
    for (;;) {
        rb_nogvl(pluck_nogvl, &a, pluck_ubf, &a, RB_NOGVL_INTR_FAIL);
        if (a.ran) break;
        /*
         * INTR_FAIL skips the wait for any pending interrupt flag, including the timer's
         * time-slice flag. A real interrupt (Thread#raise/kill, a signal): cancel, then wait.
         * Anything else: let Ruby process it and wait again.
         */
        if (rb_thread_interrupted(rb_thread_current())) {
            cancel_and_wait(&a);
            break;
        }
        int state = 0;
        rb_protect(check_ints, Qnil, &state);
        if (state) { /* an interrupt arrived while Ruby switched threads */
            cancel_and_wait(&a);
            caught_state = state;
            *interrupted = 2;
            return a.ev;
        }
    }
    *interrupted = atomic_load(&a.interrupted);
    return a.ev;
}

void
flowctl_wait_finish(int interrupted)
{
    if (!interrupted) return;
    if (interrupted == 2) {
        int state = caught_state;
        caught_state = 0;
        rb_jump_tag(state);
    }
    rb_thread_check_ints();
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
