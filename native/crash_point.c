/* crash_point.c — see crash_point.h. */
#include "crash_point.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *armed(void) {
    static const char *point;
    static int loaded;
    if (!__atomic_load_n(&loaded, __ATOMIC_ACQUIRE)) {
        point = getenv("GLIDE_CRASH_POINT");
        __atomic_store_n(&loaded, 1, __ATOMIC_RELEASE);
    }
    return point;
}

void crash_point(const char *name) {
    const char *p = armed();
    if (p && strcmp(p, name) == 0) kill(getpid(), SIGKILL);
}
