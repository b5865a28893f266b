"""The kernel tier's VM: a Debian 6.12 kernel under QEMU (TCG) over the host's own root.

The build and CI machines' kernel has neither ublk nor nbd, so kernel-tier tests run a
bash script inside a throwaway VM instead (testing.md, "The kernel tier's VM"):

- The kernel is Debian bookworm's 6.12 image (`linux-image-6.12-amd64` names the current
  one), fetched with `apt-get download` and unpacked with `dpkg-deb -x`. The 6.1 default
  kernel has no ublk.
- The initramfs is built here, in Python: a static busybox (also from Debian), the few
  modules the tests need (decompressed, so busybox insmod can load them) and an /init
  that mounts the host root read-only over 9p, puts an overlay with a tmpfs upper layer on
  top and chroots into it. The project, its .venv and every host tool are then present in
  the guest unchanged, and nothing the guest does reaches the host's disk.
- A second, writable 9p share (a fresh directory per run) carries the script in and its
  output and exit status out. The serial console goes to a file for kernel messages.
- Optionally, raw image files on the host become virtio-blk disks (/dev/vda, /dev/vdb...),
  and a "power cut" SIGKILLs QEMU at a chosen moment (see run_in_vm): the image then holds
  exactly what the guest had written to its disk, while the results share, which goes
  straight to the host, keeps everything the guest wrote to it before the cut.
- Always TCG: /dev/kvm exists on these machines but nested KVM fails with emulation errors.
- run_in_vm(kernel_args=["glide.init=systemd", ...]) boots the host's systemd as PID 1 in
  the overlay instead of running the script from /init; systemd_vm.py builds on it.

Assets are cached under <repo>/.cache/vm/<kernel-version>/ (gitignored) and rebuilt only
when missing, so only the first run pays for the download (~110 MB) and unpacking.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import lzma
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache" / "vm"

# The meta-package always depends on the newest 6.12 image in bookworm(-security), so a
# kernel security update gives a new cache directory instead of a stale kernel.
KERNEL_META_PACKAGE = "linux-image-6.12-amd64"
BUSYBOX_PACKAGE = "busybox-static"

# Modules loaded at boot, in this order after their dependencies (read from each
# module's own modinfo, because the .deb ships no modules.dep: depmod runs at install).
# crc32c_generic is loaded explicitly because ext4 asks the crypto API for "crc32c" via
# request_module, and the guest has no modprobe that knows these modules.
# virtio_blk: the disks run_in_vm(disks=...) attaches (harmless when there are none).
BOOT_MODULES = (
    "netfs", "9pnet", "9pnet_virtio", "9p", "overlay",
    "crc32c_generic", "ext4", "ublk_drv", "nbd", "virtio_blk",
)

# Host packages the VM needs: QEMU itself, and the real clients the guest scripts run
# from the shared host root. scripts/test.sh installs them (same list).
HOST_PACKAGES = ("qemu-system-x86", "nbd-client", "e2fsprogs", "fio")

# Bump when the asset layout changes in a way the fingerprint below cannot see.
ASSET_FORMAT = 1

GUEST_RESULTS = "/run/glide-vm"  # where the results share is mounted inside the chroot
GUEST_PATH = (
    f"{REPO_ROOT}/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)


@dataclass(frozen=True)
class VmAssets:
    kernel_version: str  # e.g. "6.12.117+deb12-amd64"
    directory: Path
    vmlinuz: Path
    initramfs: Path


@dataclass(frozen=True)
class VmResult:
    returncode: int | None  # the script's exit status; None if it never finished
    output: str  # the script's combined stdout and stderr
    console: str  # the serial console: kernel messages and /init's own lines
    duration: float  # seconds from starting QEMU to its exit
    timed_out: bool
    # Power-cut runs (run_in_vm(power_cut=...)): seconds from starting QEMU to the moment
    # the cut was armed (its marker appeared) and to the SIGKILL; None if it never came.
    power_cut_armed_at: float | None = None
    power_cut_at: float | None = None

    @property
    def power_cut(self) -> bool:
        """Whether the run ended by the power cut (QEMU SIGKILLed by the host)."""
        return self.power_cut_at is not None

    def describe(self, tail: int = 12000) -> str:
        """A failure message: exit status, the script's output and the console's tail."""
        cut = "" if self.power_cut_at is None else f" power_cut_at={self.power_cut_at:.2f}s"
        return (
            f"VM script returncode={self.returncode} timed_out={self.timed_out} "
            f"duration={self.duration:.1f}s{cut}\n"
            f"--- script output (last {tail} chars) ---\n{self.output[-tail:]}\n"
            f"--- console (last 6000 chars) ---\n{self.console[-6000:]}"
        )


class VmError(RuntimeError):
    pass


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise VmError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def missing_host_tools() -> list[str]:
    """Host commands the VM and its scripts need that are not installed (HOST_PACKAGES).

    The guest runs the host's own binaries, so a client missing on the host is missing
    in the guest too; looked up with the guest's PATH, which has the sbin directories.
    """
    tools = ("qemu-system-x86_64", "apt-get", "apt-cache", "dpkg-deb", "nbd-client", "fio",
             "mkfs.ext4", "fsck.ext4")
    return [t for t in tools if shutil.which(t, path=GUEST_PATH) is None]


# --------------------------------------------------------------------------- assets


def _apt_cache_depends(package: str) -> str:
    return _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", package])


def current_kernel_package() -> str:
    """The image package the meta-package names now, e.g. linux-image-6.12.117+deb12-amd64.

    apt-cache answers from the local package lists; on a machine whose lists were never
    fetched (or were cleaned) it knows nothing, so update them once and ask again.
    """
    for attempt in range(2):
        try:
            out = _apt_cache_depends(KERNEL_META_PACKAGE)
            m = re.search(r"Depends: (linux-image-6\.12\.\S+-amd64)\s*$", out, re.M)
            if m:
                return m.group(1)
        except VmError:
            pass
        if attempt == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
    raise VmError(f"apt-cache does not know {KERNEL_META_PACKAGE}; is bookworm-security listed?")


def _cached_assets(directory: Path) -> VmAssets | None:
    version = directory.name
    assets = VmAssets(
        kernel_version=version,
        directory=directory,
        vmlinuz=directory / f"vmlinuz-{version}",
        initramfs=directory / "initramfs.cpio",
    )
    stamp = directory / "complete"
    if stamp.exists() and stamp.read_text().strip() == _fingerprint():
        if assets.vmlinuz.exists() and assets.initramfs.exists():
            return assets
    return None


def _fingerprint() -> str:
    """What the cached initramfs was built from: editing /init or the module list here
    makes the next run rebuild instead of silently booting the old initramfs."""
    spec = repr((ASSET_FORMAT, INIT_SCRIPT, BOOT_MODULES, GUEST_PATH, str(REPO_ROOT)))
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def ensure_assets() -> VmAssets:
    """The kernel and initramfs for the current Debian 6.12 kernel, built once and cached.

    If apt cannot be asked (no package lists, no network), the newest complete cache is
    used rather than failing: the tests only need *a* 6.12 kernel.
    """
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    try:
        package = current_kernel_package()
    except VmError:
        cached = [a for d in CACHE_DIR.iterdir() if d.is_dir() and (a := _cached_assets(d))]
        if cached:
            return max(cached, key=lambda a: a.directory.stat().st_mtime)
        raise
    version = package.removeprefix("linux-image-")
    directory = CACHE_DIR / version
    if (assets := _cached_assets(directory)) is not None:
        return assets
    # One builder at a time (parallel pytest workers, two terminals); the others wait and
    # then find the finished cache.
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (assets := _cached_assets(directory)) is None:
            try:
                _build_assets(package, version, directory)
            except VmError:
                # Stale package lists name a .deb the mirror no longer has (security
                # updates replace the image): refresh them and build what they name now.
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
                package = current_kernel_package()
                version = package.removeprefix("linux-image-")
                directory = CACHE_DIR / version
                _build_assets(package, version, directory)
            # Older kernels' caches are dead weight (~20 MB each) once a newer one exists.
            for old in CACHE_DIR.iterdir():
                if old.is_dir() and old != directory and not old.name.startswith("."):
                    shutil.rmtree(old, ignore_errors=True)
    assets = _cached_assets(directory)
    if assets is None:
        raise VmError(f"building the VM assets in {directory} left no complete cache")
    return assets


def _build_assets(package: str, version: str, directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="glide-vm-build-", dir=CACHE_DIR) as tmp:
        work = Path(tmp)
        # -o APT::Sandbox::User=root: apt's _apt user cannot write to this directory.
        _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", package, BUSYBOX_PACKAGE],
             cwd=work)
        kernel_deb = next(work.glob(f"{package}_*.deb"))
        busybox_deb = next(work.glob(f"{BUSYBOX_PACKAGE}_*.deb"))
        _run(["dpkg-deb", "-x", str(kernel_deb), str(work / "kernel")])
        _run(["dpkg-deb", "-x", str(busybox_deb), str(work / "busybox")])

        staging = work / "out"
        staging.mkdir()
        shutil.copy2(work / "kernel" / "boot" / f"vmlinuz-{version}", staging)
        shutil.copy2(work / "kernel" / "boot" / f"config-{version}", staging)

        moddir = work / "kernel" / "lib" / "modules" / version
        order = _module_load_order(moddir, BOOT_MODULES)
        busybox = (work / "busybox" / "bin" / "busybox").read_bytes()
        _write_initramfs(staging / "initramfs.cpio", busybox, order)
        (staging / "modules.txt").write_text("".join(f"{name}\n" for name, _ in order))
        (staging / "complete").write_text(_fingerprint() + "\n")
        # Atomic publish: a reader sees either no directory or a complete one.
        staging.rename(directory)


def _module_load_order(moddir: Path, wanted: Iterable[str]) -> list[tuple[str, bytes]]:
    """[(name, decompressed .ko)] for `wanted` plus dependencies, dependencies first."""
    paths = {
        p.name.removesuffix(".ko.xz").replace("-", "_"): p
        for p in (moddir / "kernel").rglob("*.ko.xz")
    }
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in paths:
            raise VmError(f"module {name} not found in {moddir} (built in? renamed?)")
        data = lzma.decompress(paths[name].read_bytes())
        # modinfo strings live NUL-separated in .modinfo: "depends=a,b".
        m = re.search(rb"\0depends=([^\0]*)\0", data)
        for dep in (m.group(1).decode().split(",") if m and m.group(1) else []):
            visit(dep)
        order.append((name, data))

    for name in wanted:
        visit(name)
    return order


# The VM's PID 1. Runs under busybox sh from the initramfs; everything after the chroot
# runs the host's own binaries. Any failure before the script still powers off and leaves
# a status, so the host never waits for its timeout on a broken boot.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
log() { echo "glide-vm: $*" > /dev/console; }
die() {
    log "FATAL: $*"
    echo "boot failed: $*" > /results/boot-error
    sync; poweroff -f; sleep 5; echo o > /proc/sysrq-trigger
}
while read -r m; do
    insmod "/modules/$m.ko" || die "insmod $m failed"
done < /modules/order
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /results \
    || die "cannot mount the results share"
# cache=loose: the host root does not change under a test run, and without it every
# path lookup is a 9p round trip, which makes Python start several times slower.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /lower \
    || die "cannot mount the host root"
mount -t tmpfs -o mode=0755 upper /upper || die "cannot mount the overlay's tmpfs"
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay \
    /newroot || die "cannot mount the overlay"
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
# A checkout under /tmp or /run (a CI clone, say) would vanish under these tmpfs mounts:
# carry the overlay's view of it across them.
keep=
case "REPO_ROOT/" in
    /tmp/*|/run/*) mkdir -p /keep && mount --bind "$R/REPO_ROOT" /keep && keep=1 ;;
esac
mount -t tmpfs -o mode=1777 tmp $R/tmp
mount -t tmpfs -o mode=0755 run $R/run
if [ -n "$keep" ]; then
    mkdir -p "$R/REPO_ROOT" && mount --move /keep "$R/REPO_ROOT" || die "cannot keep REPO_ROOT"
fi
# The host has no kmod, so the chroot has no insmod/rmmod: expose the initramfs (its
# busybox and decompressed modules) for scripts that reload a driver with other options.
mkdir -p $R/run/glide-vm-initramfs
mount --bind / $R/run/glide-vm-initramfs
mkdir -p $R/GUEST_RESULTS
mount --move /results $R/GUEST_RESULTS || die "cannot move the results share"
# No network device, but the daemon and its clients talk over 127.0.0.1.
ip link set lo up
hostname glide-vm
# Files the run adds to the guest's root (run_in_vm(files=...)): units, config files.
if [ -d $R/GUEST_RESULTS/rootfs ]; then
    cp -a $R/GUEST_RESULTS/rootfs/. $R/ || die "cannot copy the run's files into the root"
fi
# systemd as PID 1 instead of a script (systemd_vm.py): it boots the unit that
# systemd.unit= on the kernel command line names and runs the script from there.
case " $(cat /proc/cmdline) " in
*" glide.init=systemd "*)
    # Left in the overlay, /.dockerenv makes systemd believe it runs in a container
    # (it then ignores systemd.unit=).
    rm -f $R/.dockerenv
    # switch_root empties the initramfs: give kmod its own copy of busybox and modules.
    umount $R/run/glide-vm-initramfs
    mkdir -p $R/run/glide-vm-initramfs/bin
    cp /bin/busybox $R/run/glide-vm-initramfs/bin/ && cp -a /modules $R/run/glide-vm-initramfs/ \
        || die "cannot copy the initramfs tools"
    log "switching root to systemd"
    exec switch_root $R /lib/systemd/systemd
    ;;
esac
log "script starting"
chroot $R /usr/bin/env -i HOME=/root PATH=GUEST_PATH LANG=C.UTF-8 TERM=dumb \
    GLIDE_IN_VM=1 /bin/bash -c 'cd REPO_ROOT && exec /bin/bash GUEST_RESULTS/script.sh' \
    > $R/GUEST_RESULTS/output.log 2>&1 < /dev/null
echo $? > $R/GUEST_RESULTS/status.tmp
mv $R/GUEST_RESULTS/status.tmp $R/GUEST_RESULTS/status
log "script finished"
sync
umount $R/GUEST_RESULTS
poweroff -f
"""


def _write_initramfs(path: Path, busybox: bytes, modules: list[tuple[str, bytes]]) -> None:
    """An uncompressed newc cpio archive, written directly so no cpio tool or root is
    needed (device nodes included). Uncompressed: the kernel reads it as is, and under
    TCG decompression would cost more than the few MB it saves."""
    init = (INIT_SCRIPT.replace("GUEST_RESULTS", GUEST_RESULTS)
            .replace("GUEST_PATH", GUEST_PATH).replace("REPO_ROOT", str(REPO_ROOT)))
    entries: list[tuple[str, int, bytes, int, int]] = []  # name, mode, data, rdev maj/min

    def add_dir(name: str) -> None:
        entries.append((name, stat.S_IFDIR | 0o755, b"", 0, 0))

    def add_file(name: str, data: bytes, perm: int = 0o644) -> None:
        entries.append((name, stat.S_IFREG | perm, data, 0, 0))

    for d in ("bin", "dev", "proc", "sys", "lower", "upper", "newroot", "results", "modules"):
        add_dir(d)
    # The kernel opens /dev/console for PID 1 before /init can mount devtmpfs.
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", 5, 1))
    add_file("bin/busybox", busybox, 0o755)
    add_file("init", init.encode(), 0o755)
    add_file("modules/order", "".join(f"{n}\n" for n, _ in modules).encode())
    for name, data in modules:
        add_file(f"modules/{name}.ko", data)

    with open(path, "wb") as f:
        for ino, (name, mode, data, rmaj, rmin) in enumerate(entries, start=1):
            _cpio_entry(f, ino, name, mode, data, rmaj, rmin)
        _cpio_entry(f, 0, "TRAILER!!!", 0, b"", 0, 0)


def _cpio_entry(
    f: BinaryIO, ino: int, name: str, mode: int, data: bytes, rmaj: int, rmin: int
) -> None:
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmaj, rmin, len(name) + 1, 0)
    header = b"070701" + b"".join(b"%08X" % v for v in fields)
    f.write(header + name.encode() + b"\0")
    f.write(b"\0" * (-(len(header) + len(name) + 1) % 4))
    f.write(data)
    f.write(b"\0" * (-len(data) % 4))


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class PowerCut:
    """When run_in_vm pulls the plug: SIGKILL QEMU `delay` seconds after the file `marker`
    appears in the results share (the guest script creates it, e.g. once its load is
    running), or `delay` seconds after QEMU started if `marker` is None."""

    delay: float
    marker: str | None = None


def _qemu_opt(value: str) -> str:
    """A value inside a QEMU -drive/-virtfs option list: commas are doubled."""
    return value.replace(",", ",,")


def run_in_vm(
    script: str,
    timeout: float,
    memory_mib: int = 2048,
    cpus: int = 2,
    assets: VmAssets | None = None,
    *,
    disks: Sequence[Path] = (),
    power_cut: PowerCut | None = None,
    results_dir: Path | None = None,
    files: Mapping[str, str] | None = None,
    kernel_args: Sequence[str] = (),
) -> VmResult:
    """Boot a VM, run `script` with bash as root in /work/main inside it, power off.

    The script sees the host's root read-only under a tmpfs overlay (so writes vanish with
    the VM), with proc, sys, devtmpfs, /tmp and /run mounted, loopback up, and the boot
    modules loaded (guest.sh's `kmod` reloads one with other parameters). QEMU is killed
    if the whole run exceeds `timeout` seconds.

    disks: raw image files on the host, attached in order as /dev/vda, /dev/vdb... with
    virtio-blk and cache=writeback: QEMU writes through the host's page cache and tells
    the guest the disk has a volatile write cache (so the guest sends FLUSH), and a write
    counts as done for the guest once QEMU's pwrite returned. Killing QEMU therefore keeps
    exactly what the guest had written to its disk and loses what it had not: its own
    page cache and the requests still in flight. That is a power cut of the guest (not of
    a disk with a volatile cache: completed but unflushed writes survive it).

    power_cut: SIGKILL QEMU at that moment (see PowerCut). The result then has
    returncode None (unless the script finished first) and power_cut_at set.

    results_dir: use this directory (created if missing, must be empty) as the results
    share and leave it behind, so the caller can read what the guest wrote there (files
    the script wrote to GUEST_RESULTS reach the host as each write returns: 9p without a
    cache mode is write-through). By default it is a temporary directory removed after.

    files: {absolute guest path: text} written into the guest's root (its overlay) before
    anything runs, mode 0644: configuration, systemd units.

    kernel_args: appended to the kernel command line. `glide.init=systemd` (with
    `systemd.unit=NAME`) boots systemd as PID 1 instead of running the script directly:
    see systemd_vm.py, which supplies the unit that runs the script.
    """
    assets = assets or ensure_assets()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VmError("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    for disk in disks:
        if not Path(disk).is_file():
            raise VmError(f"disk image {disk} is not a file")
    with contextlib.ExitStack() as stack:
        if results_dir is None:
            results = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="glide-vm-")))
        else:
            results = results_dir
            results.mkdir(parents=True, exist_ok=True)
            if any(results.iterdir()):
                raise VmError(f"results directory {results} is not empty")
        (results / "script.sh").write_text(script)
        for arg in kernel_args:
            if not arg or any(c.isspace() or c == '"' for c in arg):
                raise VmError(f"kernel_args: {arg!r} cannot be passed on the command line")
        for guest_path, text in (files or {}).items():
            if not guest_path.startswith("/") or ".." in Path(guest_path).parts:
                raise VmError(f"files: {guest_path!r} is not an absolute guest path")
            target = results / "rootfs" / guest_path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            target.chmod(0o644)
        console_path = results / "console.log"
        cmd = [
            qemu, "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-machine", "pc", "-accel", "tcg,thread=multi", "-cpu", "max",
            "-smp", str(cpus), "-m", str(memory_mib),
            "-kernel", str(assets.vmlinuz), "-initrd", str(assets.initramfs),
            # panic=-1 plus -no-reboot: a kernel panic ends QEMU at once instead of
            # leaving the host to wait for the timeout.
            "-append", " ".join(["console=ttyS0", "panic=-1", "oops=panic", "rdinit=/init",
                                 "loglevel=5", *kernel_args]),
            "-no-reboot",
            "-serial", f"file:{console_path}",
            # multidevs=remap: the host root spans several filesystems; without it, inode
            # numbers from different devices can collide in the guest.
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
            "multidevs=remap",
            "-virtfs", f"local,path={_qemu_opt(str(results))},mount_tag=results,"
            "security_model=none",
        ]
        for disk in disks:
            # aio=threads: each guest write is a pwrite from QEMU's thread pool, completed
            # to the guest after it returned, i.e. once the data is in the host's page
            # cache, where SIGKILL of QEMU cannot undo it.
            cmd += ["-drive", f"file={_qemu_opt(str(disk))},format=raw,if=virtio,"
                    "cache=writeback,aio=threads"]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_die_with_parent)
        cut_times: dict[str, float] = {}
        stop = threading.Event()
        watcher = None
        if power_cut is not None:
            watcher = threading.Thread(
                target=_power_cut_watch,
                args=(proc, results, power_cut, start, stop, cut_times),
                name="vm-power-cut", daemon=True,
            )
            watcher.start()
        timed_out = False
        try:
            qemu_out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            qemu_out, _ = proc.communicate()
        finally:
            stop.set()
            # Also on KeyboardInterrupt or pytest-timeout's exception: never leave a VM.
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if watcher is not None:
                watcher.join()
        duration = time.monotonic() - start
        cut_at = cut_times.get("cut")

        status_path = results / "status"
        returncode = int(status_path.read_text()) if status_path.exists() else None
        output_path = results / "output.log"
        output = output_path.read_text(errors="replace") if output_path.exists() else ""
        console = console_path.read_text(errors="replace") if console_path.exists() else ""
        if boot_error := _read(results / "boot-error"):
            console += f"\n[boot error] {boot_error}"
        if cut_at is not None:
            console += f"\n[power cut] the host SIGKILLed QEMU at {cut_at:.2f}s"
        elif proc.returncode != 0 and not timed_out:
            console += f"\n[qemu exited {proc.returncode}] {qemu_out}"
        if qemu_out.strip() and (cut_at is not None or proc.returncode == 0 or timed_out):
            console += f"\n[qemu] {qemu_out}"
        return VmResult(returncode, output, console, duration, timed_out,
                        power_cut_armed_at=cut_times.get("armed"), power_cut_at=cut_at)


def _power_cut_watch(
    proc: subprocess.Popen[str],
    results: Path,
    cut: PowerCut,
    start: float,
    stop: threading.Event,
    times: dict[str, float],
) -> None:
    """run_in_vm's power-cut thread: wait for the marker, then the delay, then SIGKILL.

    Returns without killing if `stop` is set first (QEMU exited, or the run is over)."""
    armed = start
    if cut.marker is not None:
        marker = results / cut.marker
        while not marker.exists():
            if stop.wait(0.01):
                return
        armed = time.monotonic()
        times["armed"] = armed - start
    if stop.wait(max(0.0, armed + cut.delay - time.monotonic())):
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        times["cut"] = time.monotonic() - start


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL QEMU if the test process dies (even by kill -9),
    so an interrupted run cannot leave a VM burning CPU."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _read(path: Path) -> str:
    return path.read_text(errors="replace").strip() if path.exists() else ""


def guest_env_note() -> str:
    """One line for reports: what the VM is."""
    assets = ensure_assets()
    return f"Debian kernel {assets.kernel_version}, TCG, cache {assets.directory}"


if __name__ == "__main__":
    # Manual use: `python tests/kernel/vm.py 'uname -a; ls /dev/nbd0'`.
    import sys

    t0 = time.monotonic()
    built = ensure_assets()
    print(f"assets: {built.directory} ({time.monotonic() - t0:.1f}s)", file=sys.stderr)
    res = run_in_vm(" ".join(sys.argv[1:]) or "uname -a", timeout=300, assets=built)
    print(res.output, end="")
    print(f"[returncode={res.returncode} duration={res.duration:.1f}s "
          f"timed_out={res.timed_out}]", file=sys.stderr)
    if res.returncode != 0:
        print(res.console[-4000:], file=sys.stderr)
    raise SystemExit(1 if res.returncode is None else res.returncode)
