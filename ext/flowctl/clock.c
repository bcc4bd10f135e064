/*
 * clock.c — monotonic time for the native threads and their condition variables, and
 * the start of a detached native thread.
 *
 * A leaf: it depends on nothing else of the extension, and the thread engines
 * (fork.c's gate, heartbeat.c, pump.c, wait.c) build on it.
 */
#include "flowctl.h"

#include <time.h>

void
flowctl_cond_init(pthread_cond_t *cond)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(cond, &a);
    pthread_condattr_destroy(&a);
}

bool
flowctl_thread_detached(void *(*main)(void *), const char *name)
{
    pthread_t t;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    bool started = pthread_create(&t, &a, main, NULL) == 0;
    pthread_attr_destroy(&a);
    if (started) pthread_setname_np(t, name);
    return started;
}

int64_t
flowctl_mono_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

struct timespec
flowctl_ts_add(struct timespec t, double seconds)
{
    double whole = (double)(time_t)seconds;
    t.tv_sec += (time_t)seconds;
    t.tv_nsec += (long)((seconds - whole) * 1e9);
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    return t;
}

struct timespec
flowctl_mono_in(double seconds)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return flowctl_ts_add(t, seconds);
}

bool
flowctl_mono_passed(const struct timespec *until)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec > until->tv_sec || (now.tv_sec == until->tv_sec && now.tv_nsec >= until->tv_nsec);
}

gpr_timespec
flowctl_deadline_in(double seconds)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_micros((int64_t)(seconds * 1e6), GPR_TIMESPAN));
}
