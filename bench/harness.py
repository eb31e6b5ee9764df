"""QEMU pieces of the benchmark: crash-memory probes (qemu-test, and the kernel's own floor
with a do-nothing capture image) and capture timing (makedumpfile alone and a raw read of
/proc/vmcore, timed inside the capture kernel).

Every guest is a 1 GiB TCG guest that arms a capture kernel with `kexec -s -p`, crashes through
sysrq and lets the capture kernel run an image; only the capture image differs.
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
) -> tuple[Probe, dict[str, Any]]:
    """One `kdump-mkinitrd qemu-test` run (`extra`: more of its arguments, e.g. --storage);
    passes when every check passed and the dump was saved by `want_stage` (a Python-stage
    image whose stage died passes only on the static fallback, which is not what its crash
    memory is measured for)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(cli), "qemu-test", "-k", kernel.kver, "--kmoddir", str(kernel.kmoddir),
        "--kernel", str(kernel.vmlinuz), "-c", str(config), "--memory", "1G",
        "--crashkernel", f"{crashkernel_mb}M", "--keep", str(workdir), "--json",
        "--timeout", str(int(timeout)), *qemu_test_args(cli), *extra,
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


def _crash_boot(
    kernel: Kernel,
    capture_image: Path,
    crashkernel_mb: int,
    workdir: Path,
    disks: tuple[Path, ...] = (),
    timeout: float = 240.0,
) -> tuple[str, float, bool]:
    """First stage arms `capture_image` and crashes; returns the serial log, seconds and
    whether the time limit killed QEMU."""
    first = workdir / "first-stage.img"
    utility_image(
        first, kernel.kver, kernel.kmoddir, str(TEMPLATES / "first-stage.sh.j2"),
        {"capture_cmdline": capture_cmdline()}, programs=["kexec"],
        files={"/kdump/vmlinuz": kernel.vmlinuz, "/kdump/capture.img": capture_image},
    )  # fmt: skip
    result = run(
        Boot(
            kernel=kernel.vmlinuz,
            initrd=first,
            cmdline=FIRST_CMDLINE.format(mb=crashkernel_mb),
            serial_log=workdir / f"serial-{crashkernel_mb}M.log",
            memory="1G",
            disks=disks,
            accel=default_accel(),
            timeout=timeout,
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


def capture_timing(
    kernel: Kernel,
    workdir: Path,
    makedumpfile_args: list[str],
    rounds: int = 3,
    crashkernel_mb: int = 256,
) -> list[dict[str, Any]]:
    """Boot once, crash, and in the capture kernel time `rounds` alternations of a raw read
    of /proc/vmcore to /dev/null and makedumpfile alone writing to an ext4 disk."""
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "timing.img"
    utility_image(
        image, kernel.kver, kernel.kmoddir, str(TEMPLATES / "capture-timing.sh.j2"),
        {"rounds": rounds, "makedumpfile": makedumpfile_args},
        modules=["virtio_blk", "virtio_pci", "ext4"], programs=["makedumpfile"],
    )  # fmt: skip
    disk = workdir / "target.img"
    with disk.open("wb") as f:
        f.truncate(1536 * 2**20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disk)], check=True, capture_output=True)
    try:
        log, _, timed_out = _crash_boot(
            kernel, image, crashkernel_mb, workdir, disks=(disk,), timeout=600
        )
    finally:
        disk.unlink(missing_ok=True)
    results = []
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
    return results


def _debugfs(disk: Path, request: str) -> str:
    out = subprocess.run(
        ["debugfs", "-R", request, str(disk)], capture_output=True, text=True, check=True
    )
    return out.stdout


def ours_capture(
    kernel: Kernel,
    workdir: Path,
    image: Path,
    device_uuid: str,
    dump_path: str = "/var/crash",
    crashkernel_mb: int = 256,
) -> dict[str, Any]:
    """Crash into our capture `image` with the same first stage as `capture_timing` (so the
    crashed kernel's memory, and so the dump, is the same kind), onto an ext4 disk with
    `device_uuid`; returns the dump's vmcore.json, read off the disk image with debugfs."""
    workdir.mkdir(parents=True, exist_ok=True)
    disk = workdir / "target.img"
    with disk.open("wb") as f:
        f.truncate(1536 * 2**20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", device_uuid, str(disk)], check=True,
                   capture_output=True)  # fmt: skip
    try:
        log, seconds, timed_out = _crash_boot(
            kernel, image, crashkernel_mb, workdir, disks=(disk,), timeout=600
        )
        if "kdump: dump saved to target" not in log:
            why = "timed out" if timed_out else "no 'dump saved' line"
            raise RuntimeError(f"our capture did not save the dump ({why}); see {workdir}")
        names = [
            line.split("/")[5]
            for line in _debugfs(disk, f"ls -p {dump_path}").splitlines()
            if line.count("/") >= 6 and line.split("/")[5] not in (".", "..")
        ]
        if len(names) != 1:
            raise RuntimeError(f"expected one dump directory under {dump_path}, found {names}")
        record: dict[str, Any] = json.loads(
            _debugfs(disk, f"cat {dump_path}/{names[0]}/vmcore.json")
        )
        record["boot_seconds"] = round(seconds, 1)
        return record
    finally:
        disk.unlink(missing_ok=True)
