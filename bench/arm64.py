"""The arm64 part of `make bench`: Debian's arm64 kernel, an image built on this x86_64 host
from an arm64 sysroot (`build --arch arm64 --sysroot`), crashed in qemu-system-aarch64.

* size: the static and the Python-stage image for arm64 next to the same configs built for
  x86_64, compressed and unpacked, and the cross build's time (warm cache);
* crash memory: the smallest crashkernel= at which `qemu-test --arch arm64` passes with the
  dump saved by the wanted stage (1 GiB guest, 8M steps);
* capture: the stage's time to save the dump (the Python stage's own timings, the static
  stage's uptime from start to end) at crashkernel=256M, 3 boots each.

The arm64 guests run our `register` in the guest (the sysroot's python3); Debian's arm64
kernels have no kexec_file_load, so it loads through kexec-tools.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
from harness import Kernel

KVER = "6.1.0-56-arm64"
CRASHKERNEL_MB = 256
BOOTS = 3


def sysroot(cache_root: Path) -> Path:
    """The arm64 tree `make sysroot-arm64` recorded."""
    record = cache_root / "sysroots" / "arm64.path"
    try:
        path = Path(record.read_text().strip())
    except OSError:
        raise RuntimeError(f"no {record}: run `make sysroot-arm64`") from None
    if not (path / ".complete").is_file():
        raise RuntimeError(f"{path} (from {record}) is not a complete sysroot")
    return path


# run.py's ours_cmd: (kernel, config, output, extra arguments) -> `kdump-mkinitrd build --json`.
BuildCommand = Callable[..., list[str]]


def _build(
    build_cmd: BuildCommand, k: Kernel, config: Path, out: Path, cross: tuple[str, ...]
) -> dict[str, Any]:
    cmd = build_cmd(k, config, out, *cross)
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    report = json.loads(done.stdout)
    return {"size": report["size"], "uncompressed_size": report["uncompressed_size"],
            "entries": report["entries"], "seconds": round(seconds, 3)}  # fmt: skip


def _stage_seconds(record: dict[str, Any] | None, stage: str) -> float | None:
    if not record or record.get("stage") != stage:
        return None
    if stage == "python":
        return round(float(sum(record.get("timings", {}).values())), 3)
    if "uptime_end" in record:
        return round(float(record["uptime_end"]) - float(record["uptime_start"]), 3)
    return None


def part_arm64(
    cli: Path,
    work: Path,
    cache_root: Path,
    kernel: Callable[[str], Kernel],
    configs: dict[str, Path],
    x86: Kernel,
    build_cmd: BuildCommand,
) -> dict[str, Any]:
    """`configs`: stage name -> config (the same the x86 parts use)."""
    root = sysroot(cache_root)
    k = kernel(KVER)
    cross = ("--arch", "arm64", "--sysroot", str(root))
    out: dict[str, Any] = {
        "kver": KVER, "x86_kver": x86.kver, "sysroot": str(root),
        "machine": "qemu-system-aarch64 -M virt -cpu cortex-a57, TCG, direct kernel boot",
        "memory": "1G", "step_mb": 8, "crashkernel_mb": CRASHKERNEL_MB,
    }  # fmt: skip
    qemu_extra = ("--arch", "arm64", "--sysroot", str(root))
    for stage, config in configs.items():
        image = work / f"arm64-{stage}.img"
        _build(build_cmd, k, config, image, cross)  # warms the caches, as a rebuild finds them
        entry: dict[str, Any] = {"arm64": _build(build_cmd, k, config, image, cross),
                                 "x86_64": _build(build_cmd, x86, config, work / f"x86-{stage}.img",
                                                  ())}  # fmt: skip
        entry["size_ratio_to_x86"] = round(entry["arm64"]["size"] / entry["x86_64"]["size"], 3)

        def probe(mb: int, stage: str = stage, config: Path = config) -> harness.Probe:
            probe_dir = work / "crash" / stage / f"{mb}M"
            result, _ = harness.qemu_test(cli, k, config, mb, probe_dir, want_stage=stage,
                                          extra=qemu_extra, first_stage=False)  # fmt: skip
            harness.cleanup(probe_dir)
            print(f"  arm64 crash memory {stage} {mb}M: {'pass' if result.passed else 'FAIL'} "
                  f"({result.seconds:.0f}s) {result.detail}", flush=True)  # fmt: skip
            return result

        entry["crash_memory"] = harness.bisect(probe, 96, 256).as_dict()
        runs = []
        for n in range(BOOTS):
            boot_dir = work / "capture" / stage / str(n)
            result, report = harness.qemu_test(cli, k, config, CRASHKERNEL_MB, boot_dir,
                                               want_stage=stage, extra=qemu_extra,
                                               first_stage=False)  # fmt: skip
            record = harness.dump_record(report)
            runs.append({"passed": result.passed, "detail": result.detail,
                         "stage_s": _stage_seconds(record, stage),
                         "vmcore_size": record.get("vmcore_size") if record else None,
                         "crash_and_capture_s": report.get("timings", {}).get(
                             "crash_and_capture")})  # fmt: skip
            harness.cleanup(boot_dir)
            print(f"  arm64 capture {stage} boot {n}: {runs[-1]}", flush=True)
        entry["capture_runs"] = runs
        seconds = [r["stage_s"] for r in runs if r["stage_s"] is not None]
        entry["capture_median_s"] = statistics.median(seconds) if seconds else None
        out[stage] = entry
    return out


def _mb(size: Any) -> str:
    return f"{size / 1e6:.2f} MB" if isinstance(size, (int, float)) else "-"


def _s(value: Any) -> str:
    return f"{value:.2f} s" if isinstance(value, (int, float)) else "-"


def markdown(results: dict[str, Any]) -> list[str]:
    part = results.get("arm64")
    lines = ["", "## arm64 (`qemu-test --arch arm64`, built here from an arm64 sysroot)", ""]
    if not part:
        return [*lines, "not measured"]
    if "error" in part and "kver" not in part:
        return [*lines, f"error: {part['error']}"]
    lines += [
        f"{part['kver']} in {part['machine']}, {part['memory']} guest; images built on this "
        f"x86_64 host with `build --arch arm64 --sysroot`, next to the same config for "
        f"{part['x86_kver']}. Capture time: the stage's own time to save the dump at "
        f"crashkernel={part['crashkernel_mb']}M, median of {BOOTS} boots.",
        "",
        "| stage | arm64 image (unpacked) | x86_64 image (unpacked) | arm64/x86_64 | cross build "
        "(warm) | smallest crashkernel= | largest failing | capture | vmcore |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage in ("static", "python"):
        e = part.get(stage)
        if not e:
            continue
        a, x, crash = e["arm64"], e["x86_64"], e.get("crash_memory", {})
        sizes = [r["vmcore_size"] for r in e.get("capture_runs", []) if r.get("vmcore_size")]
        lines.append(
            f"| {stage} | {_mb(a['size'])} ({_mb(a['uncompressed_size'])}) | {_mb(x['size'])} "
            f"({_mb(x['uncompressed_size'])}) | {e['size_ratio_to_x86']:.3f}x | "
            f"{_s(a['seconds'])} | {crash.get('minimum_mb') or '-'}M | "
            f"{crash.get('failing_mb') or '-'}M | {_s(e.get('capture_median_s'))} | "
            f"{_mb(statistics.median(sizes)) if sizes else '-'} |"
        )
    return lines
