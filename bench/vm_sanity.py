"""Sanity figures for the kernel devices, measured inside the kernel tier's VM.

The VM runs under QEMU/TCG (software emulation), so these numbers prove that
/dev/ublkbN and /dev/nbd0 move data at all, not how fast glidefs is: they are
printed labelled as TCG sanity figures and never compared with anything.

    .venv/bin/python bench/vm_sanity.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "kernel"))

import vm  # noqa: E402

FIO = ("fio --name=s --filename={dev} --ioengine=io_uring --direct=1 --rw={rw} --bs=4k "
       "--iodepth=32 --size=64M --time_based --runtime=5 --output-format=json")

SCRIPT = f"""
source tests/kernel/guest.sh
start_glidefs /tmp/gd --nbd-tcp 127.0.0.1:10809 --volume vol0:256M --ublk vol0:0
nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol0 -b 4096 > /dev/null
for dev in /dev/ublkb0 /dev/nbd0; do
  for rw in randwrite randread; do
    echo "RESULT $dev $rw $({FIO.format(dev="$dev", rw="$rw")} | tr -d '\\n')"
  done
done
nbd-client -d /dev/nbd0 > /dev/null
stop_glidefs
"""


def main() -> int:
    result = vm.run_in_vm(SCRIPT, timeout=600)
    if result.returncode != 0:
        print(result.describe(), file=sys.stderr)
        return 1
    print("Kernel devices under QEMU/TCG (software CPU emulation): sanity figures only")
    print("| device | 4 KiB QD32 | IOPS (TCG sanity) |")
    print("|---|---|---:|")
    for line in result.output.splitlines():
        m = re.match(r"RESULT (\S+) (\S+) (.*)$", line)
        if not m:
            continue
        job = json.loads(m.group(3))["jobs"][0]
        side = "write" if "write" in m.group(2) else "read"
        print(f"| {m.group(1)} | {m.group(2)} | {job[side]['iops']:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
