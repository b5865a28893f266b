/* ublk_uapi.h — the ublk driver's user API as of Linux 6.12, defined here
 * because bookworm's kernel headers are 6.1 (no recovery-reissue, no ioctl
 * encoding of every command). Values are the kernel's (uapi/linux/ublk_cmd.h). */
#ifndef GLIDE_UBLK_UAPI_H
#define GLIDE_UBLK_UAPI_H

#include <linux/types.h>
#include <sys/ioctl.h>

struct ublksrv_ctrl_cmd {
    __u32 dev_id;
    __u16 queue_id;
    __u16 len;
    __u64 addr;
    __u64 data[1];
    __u16 dev_path_len;
    __u16 pad;
    __u32 reserved;
};

struct ublksrv_ctrl_dev_info {
    __u16 nr_hw_queues;
    __u16 queue_depth;
    __u16 state;
    __u16 pad0;
    __u32 max_io_buf_bytes;
    __u32 dev_id;
    __s32 ublksrv_pid;
    __u32 pad1;
    __u64 flags;
    __u64 ublksrv_flags; /* ours: the kernel stores and returns it untouched */
    __u32 owner_uid;
    __u32 owner_gid;
    __u64 reserved1;
    __u64 reserved2;
};

struct ublksrv_io_desc {
    __u32 op_flags; /* op: bits 0-7, flags: bits 8-31 */
    __u32 nr_sectors;
    __u64 start_sector;
    __u64 addr;
};

struct ublksrv_io_cmd {
    __u16 q_id;
    __u16 tag;
    __s32 result;
    __u64 addr;
};

struct ublk_param_basic {
    __u32 attrs;
    __u8 logical_bs_shift;
    __u8 physical_bs_shift;
    __u8 io_opt_shift;
    __u8 io_min_shift;
    __u32 max_sectors;
    __u32 chunk_sectors;
    __u64 dev_sectors;
    __u64 virt_boundary_mask;
};

struct ublk_param_discard {
    __u32 discard_alignment;
    __u32 discard_granularity;
    __u32 max_discard_sectors;
    __u32 max_write_zeroes_sectors;
    __u16 max_discard_segments;
    __u16 reserved0;
};

struct ublk_param_devt {
    __u32 char_major, char_minor, disk_major, disk_minor;
};

struct ublk_param_zoned {
    __u32 max_open_zones, max_active_zones, max_zone_append_sectors;
    __u8 reserved[20];
};

/* 6.12's layout ends here; `len` tells the kernel how much we pass. */
struct ublk_params {
    __u32 len;
    __u32 types;
    struct ublk_param_basic basic;
    struct ublk_param_discard discard;
    struct ublk_param_devt devt;
    struct ublk_param_zoned zoned;
};

#define UBLK_PARAM_TYPE_BASIC (1 << 0)
#define UBLK_PARAM_TYPE_DISCARD (1 << 1)
#define UBLK_PARAM_TYPE_DEVT (1 << 2)

#define UBLK_ATTR_READ_ONLY (1 << 0)
#define UBLK_ATTR_ROTATIONAL (1 << 1)
#define UBLK_ATTR_VOLATILE_CACHE (1 << 2)
#define UBLK_ATTR_FUA (1 << 3)

#define UBLK_U_CMD_GET_DEV_INFO _IOR('u', 0x02, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_ADD_DEV _IOWR('u', 0x04, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_DEL_DEV _IOWR('u', 0x05, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_DEV _IOWR('u', 0x06, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_STOP_DEV _IOWR('u', 0x07, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_SET_PARAMS _IOWR('u', 0x08, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_PARAMS _IOR('u', 0x09, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_USER_RECOVERY _IOWR('u', 0x10, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_END_USER_RECOVERY _IOWR('u', 0x11, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_FEATURES _IOR('u', 0x13, struct ublksrv_ctrl_cmd)
/* Linux 6.16+ (not in 6.12, whose dispatcher answers -EOPNOTSUPP): the new
 * capacity in sectors in data[0]; GET_FEATURES shows UBLK_F_UPDATE_SIZE. */
#define UBLK_U_CMD_UPDATE_SIZE _IOWR('u', 0x15, struct ublksrv_ctrl_cmd)

#define UBLK_U_IO_FETCH_REQ _IOWR('u', 0x20, struct ublksrv_io_cmd)
#define UBLK_U_IO_COMMIT_AND_FETCH_REQ _IOWR('u', 0x21, struct ublksrv_io_cmd)

#define UBLK_IO_RES_OK 0
#define UBLK_IO_RES_ABORT (-ENODEV)

#define UBLK_F_USER_RECOVERY (1ULL << 3)
#define UBLK_F_USER_RECOVERY_REISSUE (1ULL << 4)
#define UBLK_F_CMD_IOCTL_ENCODE (1ULL << 6)
#define UBLK_F_UPDATE_SIZE (1ULL << 10)

#define UBLK_S_DEV_DEAD 0
#define UBLK_S_DEV_LIVE 1
#define UBLK_S_DEV_QUIESCED 2

#define UBLK_IO_OP_READ 0
#define UBLK_IO_OP_WRITE 1
#define UBLK_IO_OP_FLUSH 2
#define UBLK_IO_OP_DISCARD 3
#define UBLK_IO_OP_WRITE_SAME 4
#define UBLK_IO_OP_WRITE_ZEROES 5
#define UBLK_IO_F_FUA (1U << 13)
#define UBLK_IO_F_NOUNMAP (1U << 15)

#define UBLK_MAX_QUEUE_DEPTH 4096
#define UBLKSRV_CMD_BUF_OFFSET 0

#endif
