"""QEMU pieces of the benchmark: crash-memory probes (qemu-test, and the kernel's own floor
with a do-nothing capture image) and capture timing (makedumpfile alone and a raw read of
/proc/vmcore, timed inside the capture kernel).

Every guest is a TCG guest (1 GiB unless told) that arms a capture kernel with `kexec -s -p`,
optionally fills a ramdisk so that the dump has something in it, crashes through sysrq and lets
the capture kernel run an image; only the capture image differs.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdump_mkinitrd.qemutest import run as qemutest
from kdump_mkinitrd.qemutest.guest_images import utility_image
from kdump_mkinitrd.qemutest.qemu import Boot, default_accel, run

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
FLOOR_MARKER = "kdump-bench: floor marker reached"
FIRST_CMDLINE = "console=ttyS0 crashkernel={mb}M panic=-1"


def capture_cmdline() -> str:
    """The capture kernel's command line that qemu-test's guest gets from `register` (derived
    from the first kernel's), so the floor and the timing boots match qemu-test's; older
    trees without kdump_mkinitrd.arming.cmdline used qemu-test's fixed line."""
    try:
        from kdump_mkinitrd.arming.cmdline import capture_cmdline as derive

        return derive(FIRST_CMDLINE.format(mb=256), "x86_64")
    except ImportError:
        return str(
            getattr(
                qemutest,
                "CAPTURE_CMDLINE",
                "console=ttyS0 irqpoll nr_cpus=1 reset_devices cgroup_disable=memory "
                "transparent_hugepage=never novmcoredd panic=-1 acpi_no_memhotplug",
            )
        )


@dataclass(frozen=True)
class Kernel:
    kver: str
    kmoddir: Path
    vmlinuz: Path


@dataclass
class Probe:
    crashkernel_mb: int
    passed: bool
    seconds: float
    detail: str = ""
    stage: str | None = None


@dataclass
class Bisection:
    minimum_mb: int | None = None
    failing_mb: int | None = None  # the largest value seen failing
    probes: list[Probe] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bisect(
    probe: Callable[[int], Probe],
    low: int,
    high: int,
    step: int = 8,
    bottom: int = 32,
    top: int = 1024,
    budget: int = 12,
) -> Bisection:
    """Smallest passing value, in `step` MB, between a failing `low` and a passing `high`.
    Both ends are checked first and moved if they are wrong; at most `budget` probes."""
    out = Bisection()

    def check(mb: int) -> bool:
        if len(out.probes) >= budget:
            raise RuntimeError(f"probe budget of {budget} spent")
        result = probe(mb)
        out.probes.append(result)
        return result.passed

    try:
        while not check(high):
            if high >= top:
                out.error = f"fails even at {high}M"
                return out
            low, high = high, min(high * 2, top)
        while check(low):
            high = low
            if low <= bottom:
                out.minimum_mb = low
                return out
            low = max(bottom, low - 4 * step)
        while high - low > step:
            mid = low + (high - low) // 2 // step * step
            mid = max(mid, low + step)
            if check(mid):
                high = mid
            else:
                low = mid
        out.minimum_mb, out.failing_mb = high, low
    except Exception as exc:  # a broken probe ends the search, the result says why
        out.error = f"{type(exc).__name__}: {exc}"
        passing = [p.crashkernel_mb for p in out.probes if p.passed]
        failing = [p.crashkernel_mb for p in out.probes if not p.passed]
        out.minimum_mb = min(passing) if passing else None
        out.failing_mb = max(failing) if failing else None
    return out


@functools.cache
def qemu_test_args(cli: Path) -> tuple[str, ...]:
    """Extra qemu-test arguments: the kexec-tools first stage where the CLI offers it, with
    the derived capture command line appended. Its default first stage runs our `register`
    in the guest from the host's live tree, which rebuilds (and fails on the read-only 9p
    mount) whenever a builder source changed since the host built the image: with other
    engineers editing the tree, that fails at random. Where the image is loaded from does not
    change what the capture kernel has to fit into its reservation."""
    text = subprocess.run([str(cli), "qemu-test", "--help"], capture_output=True, text=True)
    if "--first-stage" not in text.stdout or "kexec-tools" not in text.stdout:
        return ()
    base = set(str(getattr(qemutest, "CAPTURE_CMDLINE", "")).split())
    extra = [a for a in capture_cmdline().split() if a not in base and not a.startswith("console=")]
    return ("--first-stage", "kexec-tools", "--append", " ".join(extra))


def qemu_test(
    cli: Path,
    kernel: Kernel,
    config: Path,
    crashkernel_mb: int,
    workdir: Path,
    want_stage: str,
    timeout: float = 300.0,
    extra: tuple[str, ...] = (),
    first_stage: bool = True,
) -> tuple[Probe, dict[str, Any]]:
    """One `kdump-mkinitrd qemu-test` run (`extra`: more of its arguments, e.g. --storage;
    `first_stage`: arm with kexec-tools where the CLI offers it, see qemu_test_args);
    passes when every check passed and the dump was saved by `want_stage` (a Python-stage
    image whose stage died passes only on the static fallback, which is not what its crash
    memory is measured for)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(cli), "qemu-test", "-k", kernel.kver, "--kmoddir", str(kernel.kmoddir),
        "--kernel", str(kernel.vmlinuz), "-c", str(config), "--memory", "1G",
        "--crashkernel", f"{crashkernel_mb}M", "--keep", str(workdir), "--json",
        "--timeout", str(int(timeout)), *(qemu_test_args(cli) if first_stage else ()), *extra,
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * 2 + 120)
    seconds = time.monotonic() - start
    (workdir / "qemu-test.out").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-300:]
        return Probe(crashkernel_mb, False, seconds, f"no JSON report: {tail}"), {}
    stage = report.get("stage")
    passed = bool(report.get("ok")) and stage == want_stage
    if passed:
        detail = "ok"
    elif report.get("ok"):
        detail = f"checks passed but the dump was saved by the {stage} stage"
    else:
        detail = "; ".join(report.get("problems", []))[:300] or "failed"
    if not report.get("ok"):
        detail += _oom_hint(workdir / "serial.log")
    return Probe(crashkernel_mb, passed, seconds, detail, stage), report


def _oom_hint(serial: Path) -> str:
    text = serial.read_text(errors="replace") if serial.exists() else ""
    for needle, hint in (
        ("Out of memory", " [OOM in the capture kernel]"),
        ("Initramfs unpacking failed", " [initramfs unpacking failed]"),
        ("FAILED to load", " [kexec load failed]"),
        ("Kernel panic", " [capture kernel panicked]"),
    ):
        if needle in text:
            return hint
    return ""


def dump_record(report: dict[str, Any]) -> dict[str, Any] | None:
    """vmcore.json of the dump a qemu-test run copied out."""
    dump_dir = report.get("dump_dir")
    if not dump_dir:
        return None
    path = Path(dump_dir) / "vmcore.json"
    if not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def cleanup(workdir: Path) -> None:
    """Drop the big files of a finished probe (disks, dumps); logs and reports stay."""
    for pattern in ("*.img", "dumps/*/*/vmcore", "*.tar", "*.part"):
        for path in workdir.glob(pattern):
            if path.is_file():
                path.unlink()


SEED_MIB = 1


@dataclass(frozen=True)
class Copy:
    """One dd inside the ramdisk, in MiB: `count` from `source` to `offset`."""

    source: int
    offset: int
    count: int


@dataclass(frozen=True)
class Fill:
    """`mib` of the first stage's ramdisk filled with text: a seed, then doubling copies."""

    mib: int
    seed_mib: int = SEED_MIB

    @property
    def copies(self) -> list[Copy]:
        """Each copy puts the filled part (or what is still missing) right behind itself,
        so `mib` takes about log2(mib / seed) dd runs rather than one per MiB."""
        done, out = min(self.seed_mib, self.mib), []
        while done < self.mib:
            count = min(done, self.mib - done)
            out.append(Copy(0, done, count))
            done += count
        return out


def fill_mib(memory_mib: int, reserved_mib: int = 256, share: float = 0.7,
             headroom_mib: int = 256) -> int:  # fmt: skip
    """How much to fill: `share` of the guest's RAM, but leave the crash reservation (the
    largest a curve run uses) and `headroom_mib` for the first kernel itself, its initramfs
    (which holds the capture image and kernel) and kexec's buffers."""
    return max(0, min(int(memory_mib * share), memory_mib - reserved_mib - headroom_mib))


def fill_seed(mib: int = SEED_MIB) -> bytes:
    """Numbered lines of text, so that the pages compress the way text does (neither zero
    pages nor one byte repeated) and no two lines in a page are the same."""
    lines, size, n = [], 0, 0
    while size < mib * 2**20:
        line = f"kdump-bench fill line {n:08d}: the quick brown fox jumps over the lazy dog\n"
        lines.append(line)
        size, n = size + len(line), n + 1
    return "".join(lines).encode()[: mib * 2**20]


_FILLED = re.compile(r"kdump-bench: filled mib=(\d+) start=([\d.]+) end=([\d.]+)(.*)")


def filled(log: str) -> dict[str, Any] | None:
    """What the first stage says it filled: MiB, seconds, and free memory after."""
    match = _FILLED.search(log)
    if match is None:
        return None
    after = dict(w.split("=", 1) for w in match.group(4).split() if "=" in w)
    return {
        "fill_mib": int(match.group(1)),
        "fill_s": round(float(match.group(3)) - float(match.group(2)), 2),
        "mem_free_after_kib": int(after["MemFree"]) if "MemFree" in after else None,
        "mem_available_after_kib": int(after["MemAvailable"]) if "MemAvailable" in after else None,
    }


def _crash_boot(
    kernel: Kernel,
    capture_image: Path,
    crashkernel_mb: int,
    workdir: Path,
    disks: tuple[Path, ...] = (),
    timeout: float = 240.0,
    memory_mib: int = 1024,
    fill: Fill | None = None,
) -> tuple[str, float, bool]:
    """First stage arms `capture_image`, fills a ramdisk if told, and crashes; returns the
    serial log, seconds and whether the time limit killed QEMU."""
    first = workdir / "first-stage.img"
    files = {"/kdump/vmlinuz": kernel.vmlinuz, "/kdump/capture.img": capture_image}
    if fill is not None:
        seed = workdir / "fill-seed"
        seed.write_bytes(fill_seed(fill.seed_mib))
        files["/kdump/fill-seed"] = seed
    utility_image(
        first, kernel.kver, kernel.kmoddir, str(TEMPLATES / "first-stage.sh.j2"),
        {"capture_cmdline": capture_cmdline(), "fill": fill}, programs=["kexec"],
        modules=["brd"] if fill is not None else (), files=files,
    )  # fmt: skip
    result = run(
        Boot(
            kernel=kernel.vmlinuz,
            initrd=first,
            cmdline=FIRST_CMDLINE.format(mb=crashkernel_mb),
            serial_log=workdir / f"serial-{crashkernel_mb}M.log",
            memory=f"{memory_mib}M",
            disks=disks,
            accel=default_accel(),
            timeout=timeout,
            # Only a capture kernel says so (the first one's panic=-1 kexecs instead): it
            # panicked, and would sit out its panic=10 before QEMU exits.
            kill_when=("Rebooting in ",),
        )
    )
    return result.log, result.seconds, result.timed_out


def floor_probe(kernel: Kernel, workdir: Path) -> Callable[[int], Probe]:
    """A probe for the kernel's own floor: the capture image only prints a marker."""
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "floor.img"
    utility_image(image, kernel.kver, kernel.kmoddir, str(TEMPLATES / "floor-init.sh.j2"), {})

    def probe(mb: int) -> Probe:
        log, seconds, timed_out = _crash_boot(kernel, image, mb, workdir, timeout=180)
        if FLOOR_MARKER in log:
            line = next(x for x in log.splitlines() if FLOOR_MARKER in x)
            return Probe(mb, True, seconds, line.split(";", 1)[-1].strip())
        if "FAILED to load" in log:
            detail = "kexec could not load the capture kernel into the reservation"
        elif timed_out:
            detail = "timed out before the marker"
        else:
            detail = "the capture kernel did not reach the marker" + _oom_hint(
                workdir / f"serial-{mb}M.log"
            )
        return Probe(mb, False, seconds, detail)

    return probe


def floor_image_size(workdir: Path) -> int:
    return (workdir / "floor.img").stat().st_size


_RESULT = re.compile(r"kdump-bench: result (.*)")


def _target_disk(disk: Path, mib: int, uuid: str | None = None) -> None:
    """A sparse ext4 disk image of `mib` MiB (only what is written takes space)."""
    with disk.open("wb") as f:
        f.truncate(mib * 2**20)
    uuid_args = ["-U", uuid] if uuid else []
    subprocess.run(["mkfs.ext4", "-q", "-F", *uuid_args, str(disk)], check=True,
                   capture_output=True)  # fmt: skip


def capture_timing(
    kernel: Kernel,
    workdir: Path,
    makedumpfile_args: list[str],
    rounds: int = 3,
    crashkernel_mb: int = 256,
    memory_mib: int = 1024,
    fill: Fill | None = None,
    raw_read: bool = True,
    disk_mib: int = 1536,
    timeout: float = 600.0,
) -> list[dict[str, Any]]:
    """Boot once, crash, and in the capture kernel time `rounds` alternations of a raw read
    of /proc/vmcore to /dev/null (unless not `raw_read`) and makedumpfile alone writing to
    an ext4 disk. With `fill`, the first result carries what the first stage filled."""
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "timing.img"
    utility_image(
        image, kernel.kver, kernel.kmoddir, str(TEMPLATES / "capture-timing.sh.j2"),
        {"rounds": rounds, "makedumpfile": makedumpfile_args, "raw_read": raw_read},
        modules=["virtio_blk", "virtio_pci", "ext4"], programs=["makedumpfile"],
    )  # fmt: skip
    disk = workdir / "target.img"
    _target_disk(disk, disk_mib)
    try:
        log, seconds, timed_out = _crash_boot(
            kernel, image, crashkernel_mb, workdir, disks=(disk,), timeout=timeout,
            memory_mib=memory_mib, fill=fill,
        )  # fmt: skip
    finally:
        disk.unlink(missing_ok=True)
    results: list[dict[str, Any]] = []
    for match in _RESULT.finditer(log):
        fields = dict(word.split("=", 1) for word in match.group(1).split() if "=" in word)
        results.append(
            {
                "kind": fields["kind"],
                "round": int(fields["round"]),
                "status": int(fields["status"]),
                "seconds": round(float(fields["end"]) - float(fields["start"]), 3),
                "seconds_with_sync": round(float(fields["synced"]) - float(fields["start"]), 3),
                "size": int(fields["size"]) if fields.get("size", "").isdigit() else None,
            }
        )
    if "kdump-bench: timing done" not in log:
        why = "timed out" if timed_out else "did not finish"
        raise RuntimeError(
            f"capture timing boot {why} ({len(results)} results); see {workdir}/serial-*.log"
        )
    if results:
        results[0]["boot_seconds"] = round(seconds, 1)
        if fill is not None:
            results[0]["fill"] = filled(log)
    return results


def _debugfs(disk: Path, request: str) -> str:
    out = subprocess.run(
        ["debugfs", "-R", request, str(disk)], capture_output=True, text=True, check=True
    )
    return out.stdout


@dataclass
class CrashRun:
    """One crash into a capture image that saves to an ext4 disk: the serial log, and the
    dump's vmcore.json when one was saved (None otherwise)."""

    log: str
    seconds: float
    timed_out: bool
    record: dict[str, Any] | None
    fill: dict[str, Any] | None


def crash_to_disk(
    kernel: Kernel,
    workdir: Path,
    image: Path,
    device_uuid: str,
    dump_path: str = "/var/crash",
    crashkernel_mb: int = 256,
    memory_mib: int = 1024,
    fill: Fill | None = None,
    disk_mib: int = 1536,
    timeout: float = 600.0,
) -> CrashRun:
    """Crash into our capture `image` with the same first stage as `capture_timing` (so the
    crashed kernel's memory, and so the dump, is the same kind), onto an ext4 disk with
    `device_uuid`; the dump's vmcore.json is read off the disk image with debugfs."""
    workdir.mkdir(parents=True, exist_ok=True)
    disk = workdir / "target.img"
    _target_disk(disk, disk_mib, device_uuid)
    try:
        log, seconds, timed_out = _crash_boot(
            kernel, image, crashkernel_mb, workdir, disks=(disk,), timeout=timeout,
            memory_mib=memory_mib, fill=fill,
        )  # fmt: skip
        names = [
            line.split("/")[5]
            for line in _debugfs(disk, f"ls -p {dump_path}").splitlines()
            if line.count("/") >= 6 and line.split("/")[5] not in (".", "..")
        ]
        record = None
        if len(names) == 1:
            text = _debugfs(disk, f"cat {dump_path}/{names[0]}/vmcore.json")
            record = json.loads(text) if text.strip() else None
        elif names:
            raise RuntimeError(f"expected one dump directory under {dump_path}, found {names}")
        return CrashRun(log, seconds, timed_out, record, filled(log))
    finally:
        disk.unlink(missing_ok=True)


def ours_capture(
    kernel: Kernel,
    workdir: Path,
    image: Path,
    device_uuid: str,
    dump_path: str = "/var/crash",
    crashkernel_mb: int = 256,
    memory_mib: int = 1024,
    fill: Fill | None = None,
    disk_mib: int = 1536,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """`crash_to_disk` that must save a dump: returns its vmcore.json (with `boot_seconds`
    and, with `fill`, what was filled)."""
    run_ = crash_to_disk(kernel, workdir, image, device_uuid, dump_path, crashkernel_mb,
                         memory_mib, fill, disk_mib, timeout)  # fmt: skip
    if run_.record is None:
        why = "timed out" if run_.timed_out else "no vmcore.json on the target"
        raise RuntimeError(f"our capture did not save the dump ({why}); see {workdir}")
    record = dict(run_.record, boot_seconds=round(run_.seconds, 1))
    if fill is not None:
        record["fill"] = run_.fill
    return record


def crash_outcome(run_: CrashRun, want_stage: str) -> tuple[bool, str]:
    """Whether `run_` saved a complete dump by `want_stage`, and if not why, from what the
    serial log shows (the capture kernel's part of it: after its own banner)."""
    log = run_.log
    banners = [m.start() for m in re.finditer(r"Linux version \d", log)]
    capture = log[banners[1] :] if len(banners) > 1 else ""
    record = run_.record or {}
    stage, size = record.get("stage"), record.get("vmcore_size") or 0
    if stage == want_stage and size > 0:
        return True, "ok"
    if "kdump-bench: FAILED to load the capture kernel" in log:
        return False, "kexec load failed"
    if "kdump-bench: FAILED to fill" in log:
        return False, "fill failed"
    found = [
        why
        for needle, why in (
            ("Initramfs unpacking failed", "initramfs unpack failed"),
            ("Out of memory", "OOM"),
            ("Kernel panic", "capture kernel panicked"),
        )
        if needle in capture
    ]
    if stage:  # a dump, but by the fallback or empty
        what = f"saved by the {stage} stage" if stage != want_stage else "empty vmcore"
        return False, "; ".join([*found[:1], what])
    if found:
        return False, found[0]
    if run_.timed_out:
        return False, "timeout"
    return False, "no dump saved" if capture else "capture kernel did not start"
