/* LD_PRELOAD shim: CLOCK_REALTIME reads an hour ahead of the kernel's, in this process only. A
 * deadline computed from it and handed to the kernel (pthread_cond_timedwait on the default
 * clock) then lies an hour late, as after the wall clock stepped back an hour (an NTP step, a
 * VM restored from a snapshot). Every other clock is untouched. For the test that the daemon's
 * timed waits do not depend on the wall clock. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <time.h>

int
clock_gettime(clockid_t id, struct timespec *ts)
{
    static int (*real)(clockid_t, struct timespec *);
    int r;

    if (real == NULL)
        real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    r = real(id, ts);
    if (r == 0 && id == CLOCK_REALTIME)
        ts->tv_sec += 3600;
    return r;
}
