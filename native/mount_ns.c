/* The daemon's own mount namespace.
 *
 * A daemon that serves ublk devices must never wait on a filesystem mounted
 * on one of them: the I/O would come back to the daemon itself. So before
 * any thread exists it takes a private copy of the mount namespace (mounts
 * made afterwards, a guest filesystem on our device, do not propagate in)
 * and lazily detaches from its copy every mount whose device is a ublk
 * block device (one mounted before this daemon started: a restart, or a
 * crash and a new start, under a mounted filesystem). Without the detach,
 * the copy holds the filesystem after the operator unmounts it, and the
 * daemon's exit, which drops the last reference, writes the journal to a
 * device nobody serves any more: the exit hangs in D state.
 *
 * Keeps: the host's mounts are never touched (the detach is in our private
 * copy only); a mount we cannot read or detach is reported, not ignored.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <unistd.h>

#include "ublk.h"

/* mountinfo escapes space, tab, newline and backslash as \ooo. */
static void unescape(char *s) {
    char *out = s;
    for (char *in = s; *in;) {
        if (in[0] == '\\' && in[1] >= '0' && in[1] <= '3' && in[2] >= '0' && in[2] <= '7' &&
            in[3] >= '0' && in[3] <= '7') {
            *out++ = (char)((in[1] - '0') * 64 + (in[2] - '0') * 8 + (in[3] - '0'));
            in += 4;
        } else {
            *out++ = *in++;
        }
    }
    *out = '\0';
}

/* Whether block device maj:min is a ublk disk (/sys/dev/block/M:m -> .../ublkbN). */
static int is_ublk_disk(unsigned maj, unsigned min) {
    char link[64], target[PATH_MAX];
    snprintf(link, sizeof link, "/sys/dev/block/%u:%u", maj, min);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n <= 0) return 0;
    target[n] = '\0';
    const char *base = strrchr(target, '/');
    base = base ? base + 1 : target;
    /* A partition's parent directory is the disk: .../ublkb0/ublkb0p1. */
    return strncmp(base, "ublkb", 5) == 0;
}

/* Detaches every mount of a ublk disk in this (private) namespace. */
static int detach_ublk_mounts(char *msg, size_t len) {
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f) {
        snprintf(msg, len, "reading /proc/self/mountinfo: %s", strerror(errno));
        return -errno;
    }
    char line[4 * PATH_MAX];
    int rc = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned maj, min;
        char point[PATH_MAX];
        /* id parent maj:min root mount-point ... */
        if (sscanf(line, "%*u %*u %u:%u %*s %4095s", &maj, &min, point) != 3) continue;
        if (!is_ublk_disk(maj, min)) continue;
        unescape(point);
        if (umount2(point, MNT_DETACH) < 0 && errno != EINVAL && errno != ENOENT) {
            /* EINVAL/ENOENT: already gone with a parent detached before it. */
            snprintf(msg, len, "detaching %s (a ublk device's filesystem) from the daemon's "
                     "mount namespace: %s", point, strerror(errno));
            rc = -errno;
            break;
        }
    }
    fclose(f);
    return rc;
}

int glide_unshare_mounts(char *msg, size_t len) {
    if (unshare(CLONE_NEWNS) < 0) {
        snprintf(msg, len, "unshare(CLONE_NEWNS): %s", strerror(errno));
        return -errno;
    }
    /* Mounts made by others after this point (a guest filesystem on our own
     * device) must not propagate into our namespace. */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) {
        snprintf(msg, len, "making mounts private: %s", strerror(errno));
        return -errno;
    }
    return detach_ublk_mounts(msg, len);
}
