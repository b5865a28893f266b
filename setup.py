"""Builds glide._native from native/*.c.

Flags are strict (-Wall -Wextra -Werror). GLIDE_SANITIZE=1 builds the
AddressSanitizer + UndefinedBehaviorSanitizer variant the test suite uses
(load it with LD_PRELOAD of libasan, see tests/run_sanitized.sh).
"""

import os

from setuptools import Extension, setup

SOURCES = [
    "native/crash_point.c",
    "native/crc32c.c",
    "native/wal_record.c",
    "native/wal.c",
    "native/block_index.c",
    "native/state_file.c",
    "native/volume.c",
    "native/checkpoint.c",
    "native/miss.c",
    "native/evict.c",
    "native/nbd_proto.c",
    "native/nbd_conn.c",
    "native/ublk.c",
    "native/mount_ns.c",
    "native/pack_build.c",
    "native/module.c",
]

cflags = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-pthread", "-fvisibility=hidden"]
ldflags = ["-pthread"]
if os.environ.get("GLIDE_SANITIZE") == "1":
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    cflags += ["-O1", "-g"] + san
    ldflags += san
else:
    cflags += ["-O2", "-g"]

setup(
    ext_modules=[
        Extension(
            "glide._native",
            sources=SOURCES,
            depends=[f for f in os.listdir("native") if f.endswith(".h")] if os.path.isdir("native") else [],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
            # uring: ublk rings (the C liburing: URING_CMD payloads); zstd and
            # xxhash: the pack builder (native/pack_build.c).
            libraries=["uring", "zstd", "xxhash"],
        )
    ]
)
