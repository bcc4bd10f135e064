/*
 * log.c — where gRPC core's log lines go.
 *
 * gRPC core writes its log lines to stderr by default, from any thread. A library should
 * not print unasked, so here (gpr_set_log_function):
 *   - by default they are dropped;
 *   - when the user set GRPC_VERBOSITY (gRPC's own switch) they go to stderr, as gRPC
 *     would print them;
 *   - with Flowctl.logger set (lib/flowctl/logger.rb) they are queued here and a Ruby
 *     thread ("flowctl-log") hands them to the Logger: gRPC's threads never run Ruby.
 * The queue holds LOG_QUEUE lines; when the Ruby side does not keep up, newer lines are
 * dropped and counted (the next line delivered says how many).
 */
#include "flowctl.h"
#include <grpc/support/log.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define LOG_QUEUE 256

typedef struct {
    int severity;          /* gpr_log_severity */
    char *text;            /* "file:line] message", malloc'd */
} log_line;

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t log_cond;        /* (log_mu) a line was queued, or the reader is to stop */
static log_line queue[LOG_QUEUE];      /* (log_mu) a ring */
static unsigned q_head, q_len;         /* (log_mu) */
static unsigned long dropped;          /* (log_mu) lines lost to a full queue since the last one delivered */
static bool to_ruby;                   /* (log_mu) Flowctl.logger is set */
static bool reader_woken;              /* (log_mu) the reader's unblock function ran */
static int env_min = -1;               /* GRPC_VERBOSITY's severity, -1: unset */
static int ruby_min = GPR_LOG_SEVERITY_ERROR + 1; /* the Logger's severity (above ERROR: none) */

static int
verbosity_of(const char *v)
{
    if (!v || !*v) return -1;
    if (strcasecmp(v, "DEBUG") == 0) return GPR_LOG_SEVERITY_DEBUG;
    if (strcasecmp(v, "INFO") == 0) return GPR_LOG_SEVERITY_INFO;
    if (strcasecmp(v, "ERROR") == 0) return GPR_LOG_SEVERITY_ERROR;
    return GPR_LOG_SEVERITY_ERROR + 1; /* NONE, or anything else */
}

static void
to_stderr(gpr_log_func_args *a)
{
    static const char letters[] = "DIE";
    struct timespec t;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &t);
    localtime_r(&t.tv_sec, &tm);
    const char *file = strrchr(a->file, '/');
    fprintf(stderr, "%c%02d%02d %02d:%02d:%02d.%06ld %s:%d] %s\n", letters[a->severity % 3], tm.tm_mon + 1,
            tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, t.tv_nsec / 1000, file ? file + 1 : a->file, a->line,
            a->message);
}

static void
enqueue(gpr_log_func_args *a)
{
    const char *file = strrchr(a->file, '/');
    file = file ? file + 1 : a->file;
    size_t n = strlen(file) + strlen(a->message) + 24;
    char *text = malloc(n);
    if (!text) return;
    snprintf(text, n, "%s:%d] %s", file, a->line, a->message);
    pthread_mutex_lock(&log_mu);
    if (q_len < LOG_QUEUE) {
        queue[(q_head + q_len) % LOG_QUEUE] = (log_line){.severity = (int)a->severity, .text = text};
        q_len++;
        pthread_cond_signal(&log_cond);
        text = NULL;
    } else {
        dropped++;
    }
    pthread_mutex_unlock(&log_mu);
    free(text);
}

void
flowctl_log_line(gpr_log_func_args *a)
{
    int sev = (int)a->severity;
    if (env_min >= 0 && sev >= env_min) to_stderr(a);
    pthread_mutex_lock(&log_mu);
    bool queue_it = to_ruby && sev >= ruby_min;
    pthread_mutex_unlock(&log_mu);
    if (queue_it) enqueue(a);
}

/* gRPC's verbosity: the lowest severity anyone wants, and at most `cap` (gRPC skips
 * formatting the rest). */
void
flowctl_log_apply_verbosity(int cap)
{
    int min = cap;
    if (env_min >= 0 && env_min < min) min = env_min;
    if (to_ruby && ruby_min < min) min = ruby_min;
    gpr_set_log_verbosity((gpr_log_severity)min);
}

/* ---- the Ruby side --------------------------------------------------------- */

struct reader_wait {
    log_line line;
    bool got;
};

static void *
reader_wait_nogvl(void *p)
{
    struct reader_wait *w = p;
    pthread_mutex_lock(&log_mu);
    while (q_len == 0 && to_ruby && !reader_woken) pthread_cond_wait(&log_cond, &log_mu);
    reader_woken = false;
    if (q_len > 0) {
        w->line = queue[q_head];
        q_head = (q_head + 1) % LOG_QUEUE;
        q_len--;
        w->got = true;
    }
    pthread_mutex_unlock(&log_mu);
    return NULL;
}

static void
reader_ubf(void *p)
{
    (void)p;
    pthread_mutex_lock(&log_mu);
    reader_woken = true;
    pthread_cond_broadcast(&log_cond);
    pthread_mutex_unlock(&log_mu);
}

/*
 * call-seq:
 *   Flowctl::Native.log_next -> [severity, text, dropped] or nil
 *
 * Waits (without the GVL) for gRPC core's next log line: severity 0 (debug), 1 (info) or
 * 2 (error), "file:line] message", and how many lines were dropped before it. nil when
 * the logger was unset, or when an interrupt came (the caller loops).
 */
static VALUE
native_log_next(VALUE mod)
{
    struct reader_wait w = {.got = false};
    rb_thread_call_without_gvl(reader_wait_nogvl, &w, reader_ubf, NULL);
    if (!w.got) return Qnil;
    VALUE text = rb_utf8_str_new_cstr(w.line.text);
    free(w.line.text);
    pthread_mutex_lock(&log_mu);
    unsigned long lost = dropped;
    dropped = 0;
    pthread_mutex_unlock(&log_mu);
    return rb_ary_new_from_args(3, INT2FIX(w.line.severity), text, ULONG2NUM(lost));
}

/*
 * call-seq:
 *   Flowctl::Native.log_to_ruby(severity) -> nil
 *
 * severity 0..2: queue gRPC core's lines from that severity up for log_next; nil: stop
 * (the queue is emptied and a waiting log_next returns nil).
 */
static VALUE
native_log_to_ruby(VALUE mod, VALUE severity)
{
    int sev = NIL_P(severity) ? GPR_LOG_SEVERITY_ERROR + 1 : NUM2INT(severity);
    if (sev < GPR_LOG_SEVERITY_DEBUG || sev > GPR_LOG_SEVERITY_ERROR + 1)
        rb_raise(rb_eArgError, "gRPC log severity must be 0 (debug), 1 (info) or 2 (error) (given %d)", sev);
    pthread_mutex_lock(&log_mu);
    to_ruby = sev <= GPR_LOG_SEVERITY_ERROR;
    ruby_min = sev;
    if (!to_ruby) {
        for (; q_len > 0; q_len--, q_head = (q_head + 1) % LOG_QUEUE) free(queue[q_head].text);
        dropped = 0;
    }
    pthread_cond_broadcast(&log_cond);
    pthread_mutex_unlock(&log_mu);
    flowctl_log_apply_verbosity(GPR_LOG_SEVERITY_ERROR);
    return Qnil;
}

/* call-seq: Flowctl::Native.log_test(severity, message) -> nil (logs through gRPC core, for the specs) */
static VALUE
native_log_test(VALUE mod, VALUE severity, VALUE message)
{
    int sev = NUM2INT(severity);
    if (sev < GPR_LOG_SEVERITY_DEBUG || sev > GPR_LOG_SEVERITY_ERROR)
        rb_raise(rb_eArgError, "gRPC log severity must be 0 (debug), 1 (info) or 2 (error) (given %d)", sev);
    gpr_log(__FILE__, __LINE__, (gpr_log_severity)sev, "%s", StringValueCStr(message));
    return Qnil;
}

void
flowctl_log_atfork_child(void)
{
    pthread_mutex_init(&log_mu, NULL);
    flowctl_cond_init(&log_cond);
}

void
init_flowctl_log(void)
{
    static const flowctl_fork_hooks hooks = {.name = "log", .child = flowctl_log_atfork_child};
    flowctl_fork_register(&hooks);
    flowctl_cond_init(&log_cond);
    env_min = verbosity_of(getenv("GRPC_VERBOSITY"));
    gpr_set_log_function(flowctl_log_line);
    flowctl_log_apply_verbosity(GPR_LOG_SEVERITY_ERROR);
    rb_define_module_function(mFlowctlNative, "log_next", native_log_next, 0);
    rb_define_module_function(mFlowctlNative, "log_to_ruby", native_log_to_ruby, 1);
    rb_define_module_function(mFlowctlNative, "log_test", native_log_test, 2);
}
