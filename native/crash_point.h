/* crash_point.h — named points where a test can make the daemon die.
 *
 * GLIDE_CRASH_POINT=<name> in the environment makes the process SIGKILL
 * itself the first time it reaches that point, so tests can prove recovery
 * from a crash between any two steps of an ordering (checkpoint, later the
 * flusher and the handoff). Read once; costs one pointer compare otherwise. */
#ifndef GLIDE_CRASH_POINT_H
#define GLIDE_CRASH_POINT_H

void crash_point(const char *name);

#endif
