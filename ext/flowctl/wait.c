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

grpc_event
flowctl_wait_tag(grpc_completion_queue *cq, void *tag, grpc_call *call, int *interrupted)
{
    struct pluck_arg a = {.cq = cq, .tag = tag, .call = call};
    atomic_init(&a.interrupted, false);
    rb_nogvl(pluck_nogvl, &a, pluck_ubf, &a, RB_NOGVL_INTR_FAIL);
    if (!a.ran) {
        /* An interrupt was already pending: cancel, then wait (briefly) with the GVL held. */
        atomic_store(&a.interrupted, true);
        if (call) grpc_call_cancel(call, NULL);
        pluck_nogvl(&a);
    }
    *interrupted = atomic_load(&a.interrupted);
    return a.ev;
}

void
flowctl_wait_finish(int interrupted)
{
    if (!interrupted) return;
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
