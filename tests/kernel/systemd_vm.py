"""The kernel tier's VM with a real systemd as PID 1, for tests of deploy/glidefs.service.

vm.py's /init normally chroots into the overlay and runs the test script with bash. With
`glide.init=systemd` on the kernel command line it instead switch_roots into the overlay
and execs the host's own /lib/systemd/systemd (Debian 12: systemd 252), which boots a
small test target instead of default.target:

- glide-test.target: DefaultDependencies=no; pulls only journald and glide-test.service.
- glide-test.service: a oneshot that runs the test script (as run_in_vm does: bash, cwd
  the repo, the venv first on PATH), leaves its output, status and the whole journal in
  the results share, then powers the VM off (SuccessAction=/FailureAction=).

Units under test are installed into the overlay's /etc/systemd/system, together with any
other files the test needs (run_in_vm(files=...)). glidefs_unit() gives deploy/
glidefs.service with its ExecStart pointing at this checkout's .venv. The guest script
sources systemd_guest.sh for its helpers; `record NAME CMD...` there keeps each step's
output, exit status and duration, which the host reads back as SystemdRun.steps.

The boot is TCG like every kernel-tier run: the script starts ~8 s after QEMU on an idle
host (~20 s on a busy one). The first `systemctl start` of a unit with default
dependencies pulls sysinit.target; the Debian units behind it (sysctl, tmpfiles, debugfs
mounts, time sync...) are masked by default (sysinit_units()), which saves ~10 s.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import vm

SYSTEMD = Path("/lib/systemd/systemd")
# The Debian package that provides SYSTEMD and systemctl/journalctl on the host (the guest
# runs the host's binaries). scripts/test.sh installs it.
HOST_PACKAGE = "systemd"

TEST_TARGET = "glide-test.target"
TEST_SERVICE = "glide-test.service"
UNIT_DIR = "/etc/systemd/system"
RESULTS = vm.GUEST_RESULTS
STEPS_DIR = f"{RESULTS}/steps"
RUNNER = "/usr/local/lib/glide-vm/run-test.sh"  # in the guest

# The unit this harness tests, and where deploy/glidefs.service expects the checkout.
DEPLOY_UNIT = vm.REPO_ROOT / "deploy" / "glidefs.service"
DEPLOY_PREFIX = "/opt/glidefs/"

# A test configuration for glidefs_unit() (at /etc/glidefs/glidefs.toml, where the unit
# reads it): two volumes, the NBD socket in the unit's runtime directory, the store
# outside the data directory so a fresh daemon on an empty one can read it back.
GLIDEFS_STORE = "/srv/glidefs-store"
GLIDEFS_CONFIG = f"""\
data_dir = "/var/lib/glidefs"

[nbd]
unix = "/run/glidefs/nbd.sock"
tcp = ""

[store]
kind = "local"
path = "{GLIDEFS_STORE}"

[[volume]]
name = "vm1"
size = "64M"

[[volume]]
name = "db1"
size = "32M"
"""

_TARGET = f"""\
[Unit]
Description=glidefs kernel-tier test (systemd_vm.py)
DefaultDependencies=no
Wants=systemd-journald.service {TEST_SERVICE}
AllowIsolate=yes
"""

_SERVICE = f"""\
[Unit]
Description=glidefs kernel-tier test script
DefaultDependencies=no
After=systemd-journald.service
# The host's timeout bounds the run; ending the VM at once keeps it short. Everything
# the run leaves has reached the host already (the results share is write-through).
SuccessAction=poweroff-immediate
FailureAction=poweroff-immediate

[Service]
Type=oneshot
WorkingDirectory={vm.REPO_ROOT}
Environment="PATH={vm.GUEST_PATH}" HOME=/root LANG=C.UTF-8 TERM=dumb GLIDE_IN_VM=1
Environment=SYSTEMD_PAGER= SYSTEMD_COLORS=0 SYSTEMD_LESS=
ExecStart=/bin/bash {RUNNER}
StandardInput=null
StandardOutput=journal+console
TimeoutStartSec=infinity
"""

# Runs the script like vm.py's /init does, then leaves the journal next to its output.
_RUNNER = f"""\
mkdir -p {STEPS_DIR}
uptime() {{ local u; read -r u _ < /proc/uptime; echo "$u"; }}
echo "glide-vm: script starting under systemd at $(uptime)s" > /dev/console
bash {RESULTS}/script.sh > {RESULTS}/output.log 2>&1 < /dev/null
rc=$?
echo "glide-vm: script finished ($rc) at $(uptime)s" > /dev/console
journalctl --sync 2>/dev/null
journalctl -b --no-pager -o short-monotonic > {RESULTS}/journal.log 2>&1
echo "glide-vm: journal saved at $(uptime)s" > /dev/console
echo "$rc" > {RESULTS}/status.tmp && mv {RESULTS}/status.tmp {RESULTS}/status
sync
"""


@dataclass(frozen=True)
class Step:
    """One `record NAME CMD...` of the guest script."""

    name: str
    command: str
    returncode: int
    output: str
    seconds: float

    def properties(self) -> dict[str, str]:
        """The output of a `systemctl show` step as {property: value}."""
        return dict(line.split("=", 1) for line in self.output.splitlines() if "=" in line)


@dataclass(frozen=True)
class SystemdRun:
    result: vm.VmResult
    journal: str  # `journalctl -b` at the end of the script: every unit's log
    steps: dict[str, Step] = field(default_factory=dict)  # in the order they ran

    @property
    def returncode(self) -> int | None:
        return self.result.returncode

    def describe(self, tail: int = 12000) -> str:
        """A failure message: the VM's (output, console) plus the journal's tail."""
        return (f"{self.result.describe(tail)}\n"
                f"--- journal (last 8000 chars) ---\n{self.journal[-8000:]}")


def missing() -> str | None:
    """Why the systemd VM cannot run here, or None."""
    for tool in (str(SYSTEMD), "/bin/systemctl", "/bin/journalctl"):
        if not Path(tool).exists() and shutil.which(Path(tool).name, path=vm.GUEST_PATH) is None:
            return f"{tool} is missing; install the Debian package {HOST_PACKAGE}"
    return None


def sysinit_units() -> list[str]:
    """What sysinit.target pulls in on this host besides journald and other targets, plus
    what it pulls through generators and mounts (systemd-remount-fs, modprobe@): units the
    first `systemctl start` of a unit with default dependencies would start, none of
    which a glidefs test needs (mounts of debugfs and hugetlbfs, sysctl, tmpfiles, utmp,
    time sync). Masked, they save ~10 s of TCG CPU per run."""
    names = {"systemd-remount-fs.service", "modprobe@.service"}
    for wants in ("/lib/systemd/system/sysinit.target.wants",
                  "/etc/systemd/system/sysinit.target.wants"):
        d = Path(wants)
        if d.is_dir():
            names.update(p.name for p in d.iterdir())
    return sorted(n for n in names
                  if not n.endswith(".target") and n != "systemd-journald.service")


def glidefs_files(config: str = GLIDEFS_CONFIG) -> dict[str, str]:
    """run_under_systemd(files=...) for glidefs_unit(): its configuration file."""
    return {"/etc/glidefs/glidefs.toml": config}


def glidefs_unit(exec_start_args: str | None = None) -> str:
    """deploy/glidefs.service, with this checkout in place of /opt/glidefs/ (its venv's
    glidefs in ExecStart=). exec_start_args replaces what follows `glidefs` there."""
    text = DEPLOY_UNIT.read_text()
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("ExecStart=")]
    if len(starts) != 1 or DEPLOY_PREFIX not in lines[starts[0]]:
        raise vm.VmError(f"{DEPLOY_UNIT}: expected one ExecStart= under {DEPLOY_PREFIX}")
    if exec_start_args is not None:
        lines[starts[0]] = f"ExecStart={DEPLOY_PREFIX}.venv/bin/glidefs {exec_start_args}"
    return "\n".join(lines).replace(DEPLOY_PREFIX, f"{vm.REPO_ROOT}/") + "\n"


def run_under_systemd(
    script: str,
    timeout: float,
    units: Mapping[str, str] | None = None,
    files: Mapping[str, str] | None = None,
    assets: vm.VmAssets | None = None,
    *,
    kernel_args: Sequence[str] = (),
    memory_mib: int = 2048,
    cpus: int = 2,
    results_dir: Path | None = None,
    mask_sysinit: bool = True,
) -> SystemdRun:
    """Boot the VM with systemd as PID 1 and run `script` (bash, cwd the repo) from
    glide-test.service; power off when it ends.

    units: {name: text} installed in /etc/systemd/system (e.g. glidefs_unit()); an empty
    text masks that unit; "glidefs.service.d/NAME.conf" adds a drop-in.
    files: other {guest path: text} (config files).
    mask_sysinit: mask sysinit_units() (sysinit.target itself stays and is reached).
    results_dir: keep the results share there (output.log, journal.log, console.log,
    steps/) instead of a temporary directory, to look at a run afterwards.
    """
    why = missing()
    if why:
        raise vm.VmError(why)
    all_files = {
        f"{UNIT_DIR}/{TEST_TARGET}": _TARGET,
        f"{UNIT_DIR}/{TEST_SERVICE}": _SERVICE,
        RUNNER: _RUNNER,
    }
    if mask_sysinit:
        all_files.update({f"{UNIT_DIR}/{name}": "" for name in sysinit_units()})
    for name, text in (units or {}).items():
        parts = name.split("/")
        drop_in = len(parts) == 2 and parts[0].endswith(".d") and parts[1].endswith(".conf")
        if not (len(parts) == 1 or drop_in) or parts[0] in (TEST_TARGET, TEST_SERVICE):
            raise vm.VmError(f"units: bad unit name {name!r}")
        all_files[f"{UNIT_DIR}/{name}"] = text
    all_files.update(files or {})
    with contextlib.ExitStack() as stack:
        results = results_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="glide-vm-systemd-")))
        result = vm.run_in_vm(
            script, timeout=timeout, memory_mib=memory_mib, cpus=cpus, assets=assets,
            results_dir=results, files=all_files,
            kernel_args=["glide.init=systemd", f"systemd.unit={TEST_TARGET}",
                         "systemd.show_status=1", *kernel_args],
        )
        journal_path = results / "journal.log"
        journal = journal_path.read_text(errors="replace") if journal_path.exists() else ""
        return SystemdRun(result, journal, _read_steps(results / "steps"))


def _read_steps(directory: Path) -> dict[str, Step]:
    """The steps systemd_guest.sh's `record` left: NAME.json (command, status, seconds,
    start order) and NAME.out (combined output)."""
    steps: list[tuple[float, Step]] = []
    if directory.is_dir():
        for meta_path in directory.glob("*.json"):
            try:
                meta = json.loads(meta_path.read_text())
            except json.JSONDecodeError:
                continue  # the VM stopped while the step ran
            out = meta_path.with_suffix(".out")
            output = out.read_text(errors="replace") if out.exists() else ""
            step = Step(meta_path.stem, meta["command"], int(meta["rc"]), output,
                        float(meta["seconds"]))
            steps.append((float(meta["started"]), step))
    return {s.name: s for _, s in sorted(steps, key=lambda p: p[0])}
