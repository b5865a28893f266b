/* ublk.h — a volume exported as a kernel block device (/dev/ublkbN).
 *
 * Control commands go through /dev/ublk-control on an SQE128 io_uring; each
 * queue has one thread and one io_uring, because the kernel binds a queue to
 * the task that fetched it. Requests are served from the same volume (WAL,
 * index, cache file) as NBD; FLUSH and FUA complete from the WAL's group
 * commit without blocking the queue's other tags.
 *
 * Devices are added with USER_RECOVERY | USER_RECOVERY_REISSUE: when the
 * daemon dies the device stays (QUIESCED) with its I/O queued, and the next
 * daemon re-attaches it (START_USER_RECOVERY, FETCH every tag,
 * END_USER_RECOVERY). A device carries an owner tag (derived from the
 * volume's identity) in ublksrv_flags so that a daemon never adopts a device
 * it did not create for the same volume.
 */
#ifndef GLIDE_UBLK_H
#define GLIDE_UBLK_H

#include <stddef.h>
#include <stdint.h>

struct volume;
struct ublk_device;

struct ublk_config {
    int dev_id;            /* -1: let the kernel choose */
    int nr_queues;
    int depth;
    uint32_t max_io_bytes; /* per request */
    uint64_t owner_tag;    /* identifies the volume this device belongs to */
};

/* Create or re-attach the device. *recovered tells which happened. */
int ublk_attach(struct volume *v, const struct ublk_config *cfg, struct ublk_device **out, int *recovered,
                char *err, size_t errlen);
int ublk_device_id(const struct ublk_device *d);

/* Give the device the volume's current size (after volume_grow): 1 done, 0
 * when the kernel cannot (UBLK_U_CMD_UPDATE_SIZE is Linux 6.16+; 6.12 lacks
 * it), -errno with a reason in err. Connections and queues keep running. A
 * device that is smaller than its volume when a later daemon recovers it is
 * resized the same way, or refused with the reason on older kernels. */
int ublk_update_size(struct ublk_device *d, char *err, size_t errlen);

/* Stop serving but leave the device for the next daemon (QUIESCED). */
void ublk_detach(struct ublk_device *d);
/* Stop and delete the device (it disappears from /dev). */
int ublk_remove(struct ublk_device *d, char *err, size_t errlen);

/* Checks that ublk can work here; 0, or -errno with a reason in msg. */
int ublk_probe(char *msg, size_t len);

/* Unshare the mount namespace (before any thread exists) and detach from
 * the copy every ublk disk's mount, so the daemon never waits on a
 * filesystem mounted on its own device (native/mount_ns.c). */
int glide_unshare_mounts(char *msg, size_t len);

#endif
