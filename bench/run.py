"""`make bench`: our builder against dracut, and our capture against makedumpfile alone.

Parts (each records an error string in the JSON when it fails; the others still run):

* build: `kdump-mkinitrd build` (warm cache and cold, Debian's python3 packed) and dracut
  (with makedumpfile; our zstd settings, and its own --zstd) alternated, a warm-up then 5 runs
  each, median wall time, CPU time and peak RSS; `build --if-needed` no-op time;
* size: our image (static stage, Python stage, SSH target when implemented) next to dracut's,
  compressed and uncompressed;
* profile: where our build's time goes (the --json phases and a cProfile top-10);
* crash memory (skipped with BENCH_QUICK=1): the smallest crashkernel= at which qemu-test
  passes, for the static and the Python stage, and the kernel's own floor;
* capture (skipped with BENCH_QUICK=1): time to save the dump with our stage, makedumpfile
  alone and a raw read of /proc/vmcore, in the capture kernel;
* storage: for each layout of `qemu-test --storage`, the image's size and (not with
  BENCH_QUICK=1) the smallest crashkernel= at which qemu-test still saves and verifies the
  dump, each next to the plain disk's; `estimate`'s figure for each image beside it.

* peer debian (skipped with BENCH_QUICK=1): ours next to Debian's kdump-tools on the same Debian
  guest and the same crash (`bench/peer_debian.py`).

* arm64 (skipped with BENCH_QUICK=1): Debian's arm64 kernel in qemu-system-aarch64, images
  built here from an arm64 sysroot: sizes next to x86_64's, the smallest crashkernel= and the
  capture time (`bench/arm64.py`).

* curve (skipped with BENCH_QUICK=1): the smallest crashkernel= and the capture time on
  guests of 1, 4 and 16 GiB with most of their memory filled (`bench/curve.py`).

BENCH_ONLY=storage (or peer, curve, capture, arm64, or build: the build, size and profile
parts) runs only that part and merges it into the existing results.

Writes bench/results.json and bench/results.md and prints the table. Timings are noisy on a
shared 2-core machine: runs are alternated, medians reported, nothing asserted on time.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

import arm64  # noqa: E402
import curve  # noqa: E402
import harness  # noqa: E402
import peer_debian  # noqa: E402
from harness import Kernel  # noqa: E402

from kdump_mkinitrd.arming.crashmemory import estimate  # noqa: E402
from kdump_mkinitrd.config import load as load_config  # noqa: E402
from kdump_mkinitrd.qemutest import layouts  # noqa: E402
from kdump_mkinitrd.qemutest.run import DEFAULT_CONFIG  # noqa: E402
from kdump_mkinitrd.qemutest.testcache import cache_root, kernel_cache  # noqa: E402

BENCH = ROOT / "bench"
CACHE = ROOT / ".cache" / "bench"
BIN = Path(sys.executable).parent
CLI = BIN / "kdump-mkinitrd"
KERNEL_CACHE = kernel_cache()
KERNELS = ("6.1.0-56-amd64", "6.12.117+deb12-amd64")
RUNS = 5
DRACUT_DRIVERS = "virtio_blk virtio_pci ext4"
TARGET_UUID = "2f6e0c1a-1111-4222-8333-944455556666"
# The same default config `qemu-test` uses, with a fixed UUID so that runs compare.
CONFIG = DEFAULT_CONFIG.format(uuid=TARGET_UUID)
GOALS = {
    "build_ratio": 0.1,
    "build_ratio_cold": 0.1,
    "size_ratio_static": 0.2,
    "size_ratio_python": 0.6,
    "capture_ratio_makedumpfile": 1.1,
    "capture_ratio_stage_total": 1.15,
}
CRASH_SLACK_MB = 16
PYTHON_OVER_STATIC_MB = 8  # the Python stage's crash memory beyond the static image's
ESTIMATE_ABOVE_MB = (8, 24)  # where `estimate` lands above each measured minimum
# The stacked-storage part measures the Python stage (the default) and compares it with the
# plain disk's Python-stage figures: same kernel, same stage, only the stack differs.
STORAGE_STAGE = "python"
# BENCH_ONLY values: their part
ONLY_PARTS = {"storage": "storage", "peer": "peer debian", "curve": "curve", "build": "profile",
              "capture": "capture", "arm64": "arm64"}  # fmt: skip


# --- helpers -----------------------------------------------------------------------------


@dataclass
class Timed:
    wall: float
    cpu: float
    maxrss_kb: int
    status: int
    stdout: str
    stderr: str

    def check(self, what: str) -> Timed:
        if self.status != 0:
            tail = (self.stderr.strip() or self.stdout.strip())[-600:]
            raise RuntimeError(f"{what} exited {self.status}: {tail}")
        return self


def timed(cmd: list[str], timeout: float = 900.0, env: dict[str, str] | None = None) -> Timed:
    """Run `cmd`; wall time, and from wait4's rusage the CPU time and peak RSS (ru_maxrss:
    the largest resident set of the child or any descendant it waited for)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Timed(
            wall=wall,
            cpu=usage.ru_utime + usage.ru_stime,
            maxrss_kb=usage.ru_maxrss,
            status=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs == 0:
        return None
    return round(ours / theirs, 4)


def summarise(runs: list[Timed]) -> dict[str, Any]:
    return {
        "runs": len(runs),
        "wall_median_s": median([r.wall for r in runs]),
        "wall_s": [round(r.wall, 3) for r in runs],
        "cpu_median_s": median([r.cpu for r in runs]),
        "maxrss_median_kb": median([float(r.maxrss_kb) for r in runs]),
        "maxrss_max_kb": max((r.maxrss_kb for r in runs), default=None),
    }


def kernel(kver: str) -> Kernel:
    """The bench module tree: a hard-linked copy of the unpacked package with depmod run in
    it, so dracut and our builder both see modules.dep (Debian's package ships none)."""
    unpacked = KERNEL_CACHE / kver
    vmlinuz = unpacked / "boot" / f"vmlinuz-{kver}"
    source = unpacked / "lib" / "modules" / kver
    if not vmlinuz.is_file() or not source.is_dir():
        raise RuntimeError(f"kernel {kver} is not unpacked in {unpacked}; run `make kernels`")
    base = CACHE / "trees" / kver
    tree = base / "lib" / "modules" / kver
    if not (tree / "modules.dep").is_file():
        shutil.rmtree(base, ignore_errors=True)
        tree.parent.mkdir(parents=True)
        subprocess.run(["cp", "-al", str(source), str(tree)], check=True)
        subprocess.run(["depmod", "-b", str(base), kver], check=True, capture_output=True)
    return Kernel(kver, tree, vmlinuz)


def write_config(name: str, extra: str = "") -> Path:
    path = CACHE / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CONFIG + extra)
    return path


def python_config() -> Path:
    return write_config("python", "capture: {stage: python}\n")


def static_config() -> Path:
    return write_config("static", "capture: {stage: static}\n")


# The headline Python-stage figures pack the distribution's interpreter, as a Debian host's
# build does; the one running the builder (pyenv's here) is an extra row.
DEBIAN_PYTHON = Path("/usr/bin/python3")


def debian_python_config() -> Path:
    return write_config("python-debian", f"capture: {{stage: python, python: {DEBIAN_PYTHON}}}\n")


def ours_cmd(k: Kernel, config: Path, output: Path, *extra: str) -> list[str]:
    return [
        str(CLI),
        "build",
        "-k",
        k.kver,
        "--kmoddir",
        str(k.kmoddir),
        "--kernel",
        str(k.vmlinuz),
        "-c",
        str(config),
        "-o",
        str(output),
        "--json",
        *extra,
    ]


# Our image is compressed with zstd level 9 on one thread (config compression: level 9,
# threads 0); dracut's --zstd means `zstd -15 -q -T0` (level 15, every core). The headline
# compares like with like; dracut's own --zstd is an extra row.
SAME_ZSTD = "zstd -9 --single-thread -q"
# Debian's dracut has no kdump module (Fedora's kexec-tools ships 99kdumpbase): our image holds
# makedumpfile and its libraries, so dracut's is given the same program with --install, and
# dracut adds the libraries it needs.
MAKEDUMPFILE = "/usr/bin/makedumpfile"


def dracut_cmd(k: Kernel, output: Path, compress: str | None = SAME_ZSTD) -> list[str]:
    """dracut for the same kernel and drivers, with makedumpfile; `compress` None is
    dracut's own --zstd."""
    tmp = CACHE / "dracut-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return [
        "dracut",
        "--no-hostonly",
        "-m",
        "base",
        "--drivers",
        DRACUT_DRIVERS,
        "--install",
        MAKEDUMPFILE,
        *(["--compress", compress] if compress else ["--zstd"]),
        "--force",
        "--no-early-microcode",
        "--kver",
        k.kver,
        "--kmoddir",
        str(k.kmoddir),
        "--tmpdir",
        str(tmp),
        str(output),
        k.kver,
    ]


def cold_env(work: Path) -> dict[str, str]:
    """An environment whose cache folder (XDG_CACHE_HOME) is new and empty: a first build."""
    fresh = Path(tempfile.mkdtemp(prefix="cold-", dir=work))
    return dict(os.environ, XDG_CACHE_HOME=str(fresh))


def warm_env(work: Path) -> dict[str, str]:
    """The same cache folder for every warm run, filled by the warm-up build."""
    return dict(os.environ, XDG_CACHE_HOME=str(work / "warm-cache"))


def compile_builder() -> None:
    """Byte-compile the builder as an installed package is (dh-python compiles at install
    time): otherwise, with PYTHONDONTWRITEBYTECODE set, every run compiles every module."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "builder")],
                   check=True, capture_output=True)  # fmt: skip


def if_needed_supported() -> bool:
    out = subprocess.run([str(CLI), "build", "--help"], capture_output=True, text=True)
    return "--if-needed" in out.stdout


def uncompressed_size(image: Path) -> int:
    """Bytes of the cpio archive inside the image (zstd, gzip or none)."""
    magic = image.read_bytes()[:4]
    if magic == b"\x28\xb5\x2f\xfd":
        cmd = ["zstd", "-dc", str(image)]
    elif magic[:2] == b"\x1f\x8b":
        cmd = ["gzip", "-dc", str(image)]
    elif magic == b"0707":
        return image.stat().st_size
    else:
        raise RuntimeError(f"{image}: unknown compression (magic {magic.hex()})")
    total = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 20):
            total += len(chunk)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
    return total


def size_by_feature(image: Path) -> dict[str, Any]:
    """Uncompressed bytes of regular files per feature, and the five biggest files, from
    `kdump-mkinitrd inspect --json` (empty when inspect cannot say)."""
    out = subprocess.run([str(CLI), "inspect", "--json", str(image)], capture_output=True,
                         text=True)  # fmt: skip
    try:
        entries = json.loads(out.stdout)["entries"]
    except (ValueError, KeyError):
        return {}
    totals: dict[str, int] = {}
    files = [e for e in entries if e.get("type") == "file"]
    for e in files:
        totals[e.get("feature", "?")] = totals.get(e.get("feature", "?"), 0) + e["size"]
    biggest = sorted(files, key=lambda e: e["size"], reverse=True)[:5]
    return {
        "features": dict(sorted(totals.items(), key=lambda kv: -kv[1])),
        "biggest": {e["path"]: e["size"] for e in biggest},
    }


def tree_state() -> dict[str, Any]:
    """The commit and the uncommitted builder changes: others edit this tree while the bench
    runs, and a run that saw the builder change under it says so."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return out.stdout.rstrip()

    dirty = git("status", "--short", "--", "builder", "templates", "modules.d").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_builder_files": dirty}


def tool_version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or out.stderr.strip()).splitlines()[0] if out else None


# --- parts -------------------------------------------------------------------------------


BUILD_ROWS = {
    "ours": "ours (Python stage, Debian's python3), warm cache",
    "ours_cold": "ours (Python stage, Debian's python3), cold cache",
    "ours_static": "ours (static stage), warm cache",
    "ours_static_cold": "ours (static stage), cold cache",
    "ours_pyenv": "ours (Python stage, the builder's pyenv python), warm cache",
    "dracut": f"dracut + makedumpfile, `{SAME_ZSTD}` (our compression)",
    "dracut_zstd15": "dracut + makedumpfile, its own --zstd (`zstd -15 -q -T0`)",
    "if_needed": "ours `--if-needed` no-op",
}


def part_build(kver: str) -> dict[str, Any]:
    """Ours warm (the cache filled by a warm-up build) and cold (a new, empty cache folder
    for each run), dracut with our compression settings and with its own; alternated."""
    k = kernel(kver)
    work = CACHE / "build" / kver
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    compile_builder()
    configs = {"ours": debian_python_config(), "ours_static": static_config(),
               "ours_pyenv": python_config()}  # fmt: skip
    commands: dict[str, list[str]] = {}
    envs: dict[str, dict[str, str] | None] = {}
    for name, config in configs.items():
        commands[name] = ours_cmd(k, config, work / f"{name}.img")
        envs[name] = warm_env(work)
    for name in ("ours", "ours_static"):
        commands[f"{name}_cold"] = ours_cmd(k, configs[name], work / f"{name}-cold.img")
        envs[f"{name}_cold"] = None  # a new cache folder per run, made when it runs
    notes: list[str] = []
    dracut_error = None
    if shutil.which("dracut"):
        commands["dracut"] = dracut_cmd(k, work / "dracut.img")
        commands["dracut_zstd15"] = dracut_cmd(k, work / "dracut-zstd15.img", None)
        envs["dracut"] = envs["dracut_zstd15"] = None
    else:
        dracut_error = "dracut is not installed (Debian: dracut-core)"

    def run(name: str) -> Timed:
        env = envs[name] if not name.endswith("_cold") else cold_env(work)
        return timed(commands[name], env=env).check(name)

    for name in commands:  # warm-up, not counted: fills the warm cache and the page cache
        run(name)
    runs: dict[str, list[Timed]] = {name: [] for name in commands}
    names = list(commands)
    for i in range(RUNS):
        order = names[i % len(names) :] + names[: i % len(names)]  # rotate: drift cancels out
        for name in order:
            runs[name].append(run(name))
    result: dict[str, Any] = {name: summarise(rs) for name, rs in runs.items()}
    for name in ("ours", "ours_cold", "ours_static", "ours_static_cold"):
        phases: dict[str, list[float]] = {}
        reports = [json.loads(r.stdout) for r in runs[name]]
        for report in reports:
            for phase, seconds in report.get("seconds", {}).items():
                phases.setdefault(phase, []).append(seconds)
        result[name]["phases_median_s"] = {p: median(v) for p, v in phases.items()}
        result[name]["segments_reused"] = [r.get("segments_reused") for r in reports]
        phase_sum = sum(v for v in result[name]["phases_median_s"].values() if v is not None)
        wall = result[name]["wall_median_s"]
        result[name]["outside_phases_s"] = round(wall - phase_sum, 4) if wall else None
    same = [(work / n).read_bytes() for n in ("ours.img", "ours-cold.img")]
    result["warm_cold_same_bytes"] = same[0] == same[1]
    if dracut_error:
        result["dracut"] = result["dracut_zstd15"] = {"error": dracut_error}
    dracut = result["dracut"]
    for ours, theirs, key in (
        ("ours", "dracut", "ratio_wall"),
        ("ours_cold", "dracut", "ratio_wall_cold"),
        ("ours_static", "dracut", "ratio_wall_static"),
        ("ours_static_cold", "dracut", "ratio_wall_static_cold"),
        ("ours", "dracut_zstd15", "ratio_wall_vs_dracut_zstd15"),
        ("ours_cold", "dracut_zstd15", "ratio_wall_cold_vs_dracut_zstd15"),
    ):
        result[key] = ratio(result[ours]["wall_median_s"], result[theirs].get("wall_median_s"))
    result["ratio_cpu"] = ratio(result["ours"]["cpu_median_s"], dracut.get("cpu_median_s"))
    result["ratio_cpu_cold"] = ratio(
        result["ours_cold"]["cpu_median_s"], dracut.get("cpu_median_s")
    )
    result["ratio_maxrss"] = ratio(
        result["ours"]["maxrss_median_kb"], dracut.get("maxrss_median_kb")
    )
    # The no-op rebuild: the image from the last run is current, so --if-needed has nothing to do.
    if if_needed_supported():
        timed(commands["ours"], env=envs["ours"]).check("ours before --if-needed")
        noop = [timed([*commands["ours"], "--if-needed"], env=envs["ours"]).check("--if-needed")
                for _ in range(RUNS)]  # fmt: skip
        reports = [json.loads(r.stdout) for r in noop]
        result["if_needed"] = summarise(noop)
        result["if_needed"]["all_up_to_date"] = all(r.get("up_to_date") for r in reports)
        result["if_needed"]["rebuilt_because"] = [r.get("rebuilt_because") for r in reports]
        for r in reports:
            if not r.get("up_to_date"):
                why = ", ".join(r.get("rebuilt_because") or []) or "no reason given"
                notes.append(f"{kver}: a --if-needed run rebuilt (because: {why[:200]})")
    else:
        result["if_needed"] = None
        notes.append("build --if-needed is not in this CLI yet: no-op time not measured")
    shutil.rmtree(work, ignore_errors=True)  # the cold runs' cache folders
    result["notes"] = notes
    result["commands"] = {name: " ".join(cmd) for name, cmd in commands.items()}
    return result


def ssh_target_config(work: Path) -> tuple[Path | None, str]:
    """A config with one SSH target, filled from whatever fields the schema has, or why not."""
    from kdump_mkinitrd import config as config_mod

    if "ssh" not in getattr(config_mod, "TARGET_TYPES", ()):
        return None, "the config schema has no ssh target type"
    key = work / "id_ed25519"
    if not key.exists() and shutil.which("ssh-keygen"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
            check=True,
            capture_output=True,
        )
    known = work / "known_hosts"
    pub = key.with_suffix(".pub")
    host_key = pub.read_text().split()[:2] if pub.exists() else ["ssh-ed25519", "AAAA"]
    known.write_text(f"192.0.2.10 {' '.join(host_key)}\n")
    guesses: dict[str, Any] = {
        "host": "192.0.2.10",
        "server": "192.0.2.10",
        "address": "192.0.2.10",
        "user": "kdump",
        "username": "kdump",
        "port": 22,
        "destination": "kdump@192.0.2.10",
        "ssh": "kdump@192.0.2.10",
        "key": str(key),
        "identity": str(key),
        "identity_file": str(key),
        "sshkey": str(key),
        "ssh_key": str(key),
        "known_hosts": str(known),
        "host_key": " ".join(host_key),
    }
    schema = getattr(config_mod, "TARGET_SCHEMA", {})
    fields = {"type": "ssh", "path": "/var/crash"}
    for name, spec in schema.items():
        if name in fields or name in ("device", "fstype", "mount_options"):
            continue
        if name in guesses:
            fields[name] = guesses[name]
        elif getattr(spec, "required", False):
            fields[name] = "kdump@192.0.2.10"
    lines = "".join(f"    {k}: {json.dumps(v)}\n" for k, v in fields.items() if k != "type")
    text = CONFIG.replace(
        f"  - type: disk\n    device: UUID={TARGET_UUID}\n    fstype: ext4\n    path: /var/crash\n",
        f"  - type: ssh\n{lines}",
    )
    path = work / "ssh.yaml"
    path.write_text(text)
    try:
        config_mod.load(path)
    except Exception as exc:
        return None, f"the config schema rejects the ssh target: {exc}"
    return path, ""


def part_size(kver: str) -> dict[str, Any]:
    k = kernel(kver)
    work = CACHE / "size" / kver
    work.mkdir(parents=True, exist_ok=True)
    images: dict[str, Any] = {}
    configs: dict[str, Path | None] = {
        "ours_static": static_config(),
        "ours_python": debian_python_config(),
    }
    ssh_config, ssh_reason = ssh_target_config(work)
    configs["ours_ssh"] = ssh_config
    # Without capture.python the image packs the interpreter running the builder.
    if Path(sys.executable).resolve() != DEBIAN_PYTHON.resolve():
        configs["ours_python_pyenv"] = python_config()
    for name, config in configs.items():
        if config is None:
            images[name] = {"size": None, "note": ssh_reason}
            continue
        out = work / f"{name}.img"
        run = timed(ours_cmd(k, config, out))
        if run.status != 0:
            images[name] = {"size": None, "error": (run.stderr.strip() or run.stdout)[-400:]}
            continue
        report = json.loads(run.stdout)
        entry: dict[str, Any] = {
            "size": out.stat().st_size,
            "uncompressed_size": uncompressed_size(out),
            "compression": report.get("compression"),
            "entries": report.get("entries"),
            "kernel_modules": report.get("kernel_modules"),
            "features": report.get("features"),
        }
        entry["by_feature"] = size_by_feature(out)
        if name == "ours_ssh" and not any("ssh" in f for f in report.get("features", [])):
            entry = {
                "size": None,
                "note": "the config accepts type: ssh but no feature module serves ssh targets "
                f"yet (features: {', '.join(report.get('features', []))}); not measured",
            }
        images[name] = entry
    for name, compress in (("dracut", SAME_ZSTD), ("dracut_zstd15", None)):
        dracut_img = work / f"{name}.img"
        if shutil.which("dracut"):
            timed(dracut_cmd(k, dracut_img, compress)).check(name)
            images[name] = {
                "size": dracut_img.stat().st_size,
                "uncompressed_size": uncompressed_size(dracut_img),
                "compression": compress or "zstd -15 -q -T0 (dracut --zstd)",
            }
        else:
            images[name] = {"size": None, "error": "dracut is not installed"}
    theirs, theirs15 = images["dracut"], images["dracut_zstd15"]
    images["builder_python"] = str(Path(sys.executable).resolve())
    images["debian_python"] = str(DEBIAN_PYTHON.resolve())
    for name in ("ours_static", "ours_python", "ours_ssh", "ours_python_pyenv"):
        mine = images.get(name)
        if mine is None:
            continue
        mine["ratio"] = ratio(mine.get("size"), theirs.get("size"))
        mine["ratio_uncompressed"] = ratio(
            mine.get("uncompressed_size"), theirs.get("uncompressed_size")
        )
        mine["ratio_vs_dracut_zstd15"] = ratio(mine.get("size"), theirs15.get("size"))
    return images


def part_profile(kver: str) -> dict[str, Any]:
    """cProfile of one warm Python-stage build (Debian's python3 packed), run on the CLI
    module as `python -m cProfile`."""
    k = kernel(kver)
    work = CACHE / "profile"
    work.mkdir(parents=True, exist_ok=True)
    prof = work / "build.prof"
    cmd = [
        sys.executable,
        "-m",
        "cProfile",
        "-o",
        str(prof),
        "-m",
        "kdump_mkinitrd.cli",
        *ours_cmd(k, debian_python_config(), work / "ours.img")[1:],
    ]
    env = warm_env(work)
    compile_builder()
    timed(ours_cmd(k, debian_python_config(), work / "ours.img"), env=env).check("warm-up")
    timed(cmd, env=env).check("cProfile build")  # a warm build, like the timed ones
    stats = pstats.Stats(str(prof))
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    total = float(stats.total_tt)  # type: ignore[attr-defined]

    def where(key: tuple[str, int, str]) -> str:
        path, line, func = key
        short = path.split(str(ROOT) + "/", 1)[-1] if path.startswith(str(ROOT)) else path
        short = re.sub(r"^.*/(site-packages|python3\.\d+)/", "", short)
        return f"{short}:{line}({func})"

    def top(index: int) -> list[dict[str, Any]]:
        ordered = sorted(raw.items(), key=lambda item: item[1][index], reverse=True)
        rows = []
        for key, (_cc, nc, tt, ct, _) in ordered:
            if key[2] in (
                "<module>",
                "<built-in method builtins.exec>",
                "main",
                "_run_code",
                "_run_module_as_main",
                "run",
                "runctx",
                "_build",
            ):
                continue
            rows.append(
                {
                    "function": where(key),
                    "calls": nc,
                    "tottime_s": round(tt, 4),
                    "cumtime_s": round(ct, 4),
                }
            )
            if len(rows) == 10:
                break
        return rows

    # Where the time goes, by the outermost function of each piece of work.
    categories: dict[str, Callable[[str, str], bool]] = {
        "imports": lambda p, f: f == "_find_and_load" and "importlib" in p,
        "module resolution (kmod)": lambda p, f: (
            p.endswith("builder/hostscan/kmod.py") and f in ("load", "resolve")
        ),
        "ELF resolution (elfdeps)": lambda p, f: (
            p.endswith("builder/hostscan/elfdeps.py") and f == "resolve"
        ),
        "busybox applets": lambda p, f: (
            p.endswith("builder/image/resolve.py") and f == "find_busybox"
        ),
        "makedumpfile -v probe": lambda p, f: f == "_makedumpfile_compression",
        "python stage packing": lambda p, f: (
            p.endswith("builder/image/pystage.py") and f == "add_python_stage"
        ),
        "plan entries (read, strip, hash files)": lambda p, f: (
            p.endswith("builder/image/plan.py") and f == "entries"
        ),
        "module closure": lambda p, f: (
            p.endswith("builder/image/resolve.py") and f == "module_closure"
        ),
        "cpio writing": lambda p, f: p.endswith("builder/image/cpio.py") and f == "newc_segments",
        "compression (and segment cache)": lambda p, f: (
            p.endswith("builder/image/compress.py") and f == "compress_segments"
        ),
        "atomic write": lambda p, f: p.endswith("builder/output.py") and f == "write_atomic",
    }
    where_time: dict[str, float | None] = {}
    for name, match in categories.items():
        hits = [v[3] for (p, _, f), v in raw.items() if match(p, f)]
        where_time[name] = round(max(hits), 4) if hits else None
    return {
        "command": " ".join(cmd),
        "profile_file": str(prof),
        "total_s": round(total, 4),
        "where_cumulative_s": where_time,
        "top10_cumulative": top(3),
        "top10_tottime": top(2),
    }


def part_crash_memory(kver: str) -> dict[str, Any]:
    k = kernel(kver)
    work = CACHE / "crash" / kver
    shutil.rmtree(work, ignore_errors=True)
    out: dict[str, Any] = {"kver": kver, "memory": "1G", "step_mb": 8,
                           "floor_capture_cmdline": harness.capture_cmdline(),
                           "qemu_test_args": list(harness.qemu_test_args(CLI))}  # fmt: skip

    def stage_probe(name: str, config: Path) -> Callable[[int], harness.Probe]:
        def probe(mb: int) -> harness.Probe:
            probe_dir = work / name / f"{mb}M"
            result, _ = harness.qemu_test(CLI, k, config, mb, probe_dir, want_stage=name)
            harness.cleanup(probe_dir)
            print(
                f"  crash memory {name} {mb}M: {'pass' if result.passed else 'FAIL'} "
                f"({result.seconds:.0f}s) {result.detail}",
                flush=True,
            )
            return result

        return probe

    floor_probe = harness.floor_probe(k, work / "floor")

    def floor(mb: int) -> harness.Probe:
        result = floor_probe(mb)
        print(
            f"  crash memory floor {mb}M: {'pass' if result.passed else 'FAIL'} "
            f"({result.seconds:.0f}s) {result.detail}",
            flush=True,
        )
        return result

    searches: list[tuple[str, Callable[[int], harness.Probe], int, int]] = [
        ("floor", floor, 64, 128),
        ("static", stage_probe("static", static_config()), 96, 256),
        ("python", stage_probe("python", debian_python_config()), 96, 256),
    ]
    for name, probe, low, high in searches:
        try:
            out[name] = harness.bisect(probe, low, high).as_dict()
        except Exception as exc:
            out[name] = {"minimum_mb": None, "error": f"{type(exc).__name__}: {exc}"}
    out["floor"]["image_size"] = harness.floor_image_size(work / "floor")
    return out


def part_capture(kver: str) -> dict[str, Any]:
    """Our stage, our static capture, and makedumpfile alone / dd, each crashed into by the
    same busybox first stage (so the crashed kernel's memory is alike), 3 boots each,
    alternated."""
    from kdump_mkinitrd import config as config_mod
    from kdump_mkinitrd.hostscan.elfdeps import ElfResolver
    from kdump_mkinitrd.image.resolve import capture_settings

    k = kernel(kver)
    work = CACHE / "capture" / kver
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out: dict[str, Any] = {"kver": kver, "crashkernel_mb": 256, "memory": "1G",
                           "capture_cmdline": harness.capture_cmdline()}  # fmt: skip
    configs = {"python": debian_python_config(), "static": static_config()}
    images = {stage: work / f"ours-{stage}.img" for stage in configs}
    for stage, path in configs.items():
        timed(ours_cmd(k, path, images[stage])).check(f"build the {stage}-stage image")
    try:
        config = config_mod.load(configs["python"])
        settings = capture_settings(config, ElfResolver(Path("/"), config.search_path), Path("/"))
        mdf = [
            str(settings.makedumpfile or "makedumpfile"),
            *settings.makedumpfile_flag.split(),
            "-d",
            str(settings.dump_level),
            "--message-level",
            "7",
        ]
    except Exception as exc:
        mdf = ["makedumpfile", "-l", "-d", "31", "--message-level", "7"]
        out["makedumpfile_args_note"] = f"fell back to defaults: {exc}"
    out["makedumpfile_args"] = mdf
    runs: dict[str, list[dict[str, Any]]] = {"python": [], "static": [], "alone": []}
    kinds = list(runs)
    for i in range(3):
        for kind in kinds[i:] + kinds[:i]:
            boot_dir = work / f"{kind}-{i}"
            try:
                if kind == "alone":
                    for r in harness.capture_timing(k, boot_dir, mdf, rounds=1):
                        runs["alone"].append(dict(r, boot=i))
                    continue
                record = harness.ours_capture(k, boot_dir, images[kind], TARGET_UUID)
            except Exception as exc:
                runs[kind].append({"error": f"{type(exc).__name__}: {exc}"})
                continue
            timings = record.get("timings", {})
            entry: dict[str, Any] = {
                "vmcore_size": record.get("vmcore_size"),
                "collector": record.get("collector"),
                "stage": record.get("stage"),
            }
            if kind == "python" and record.get("stage") == "python":
                entry["dump_s"] = timings.get("dump")
                entry["total_s"] = round(sum(timings.values()), 3)
                entry["timings"] = timings
            elif kind == "static" and "uptime_end" in record:
                entry["total_s"] = round(record["uptime_end"] - record["uptime_start"], 3)
            else:
                entry["error"] = f"unexpected record from the {kind} image: {record}"
            runs[kind].append(entry)
        print(f"  capture round {i}: " + json.dumps({k_: v[-1:] for k_, v in runs.items()}),
              flush=True)  # fmt: skip
    out["ours_python_runs"] = runs["python"]
    out["ours_static_runs"] = runs["static"]
    out["alone_runs"] = runs["alone"]
    py_ok = [r for r in runs["python"] if "dump_s" in r]
    st_ok = [r for r in runs["static"] if "total_s" in r]
    out["ours_dump_median_s"] = median([r["dump_s"] for r in py_ok])
    out["ours_stage_total_median_s"] = median([r["total_s"] for r in py_ok])
    out["ours_static_total_median_s"] = median([r["total_s"] for r in st_ok])
    out["ours_vmcore_size"] = median([r["vmcore_size"] for r in py_ok])
    out["ours_static_vmcore_size"] = median([r["vmcore_size"] for r in st_ok])
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in runs["alone"]:
        if r.get("status") == 0:
            by_kind.setdefault(r["kind"], []).append(r)
    mdf_runs, dd_runs = by_kind.get("makedumpfile", []), by_kind.get("dd", [])
    out["makedumpfile_median_s"] = median([r["seconds"] for r in mdf_runs])
    out["makedumpfile_with_sync_median_s"] = median([r["seconds_with_sync"] for r in mdf_runs])
    out["makedumpfile_dump_size"] = median([r["size"] for r in mdf_runs])
    out["dd_median_s"] = median([r["seconds"] for r in dd_runs])
    out["proc_vmcore_size"] = dd_runs[0]["size"] if dd_runs else None
    out["ratio_dump_step"] = ratio(out["ours_dump_median_s"], out["makedumpfile_median_s"])
    out["ratio_stage_total"] = ratio(out["ours_stage_total_median_s"], out["makedumpfile_median_s"])
    out["ratio_static_total"] = ratio(
        out["ours_static_total_median_s"], out["makedumpfile_median_s"]
    )
    return out


def makedumpfile_alone_args() -> tuple[list[str], str | None]:
    """makedumpfile with the arguments our stage gives it (our default config), or the
    defaults and why they were used."""
    from kdump_mkinitrd import config as config_mod
    from kdump_mkinitrd.hostscan.elfdeps import ElfResolver
    from kdump_mkinitrd.image.resolve import capture_settings

    try:
        config = config_mod.load(python_config())
        settings = capture_settings(config, ElfResolver(Path("/"), config.search_path), Path("/"))
        level = ["-d", str(settings.dump_level), "--message-level", "7"]
        flag = settings.makedumpfile_flag.split()
        return [str(settings.makedumpfile or "makedumpfile"), *flag, *level], None
    except Exception as exc:
        return ["makedumpfile", "-l", "-d", "31", "--message-level", "7"], f"defaults: {exc}"


def part_curve(kver: str, progress: Callable[[list[dict[str, Any]]], None]) -> dict[str, Any]:
    """The crash-memory curve (bench/curve.py) for our static- and Python-stage images.
    BENCH_CURVE_SIZES (GiB, comma-separated; default 1,4,16), BENCH_CURVE_MINUTES (no boot
    starts after that many minutes; default 55) and BENCH_CURVE_LANES (guests at a time;
    default 2) bound it."""
    k = kernel(kver)
    work = CACHE / "curve" / kver
    sizes = [int(g) for g in os.environ.get("BENCH_CURVE_SIZES", "1,4,16").split(",") if g]
    minutes = float(os.environ.get("BENCH_CURVE_MINUTES", "55"))
    images_dir = CACHE / "curve-images" / kver
    images_dir.mkdir(parents=True, exist_ok=True)
    configs = {"static": static_config(), "python": debian_python_config()}
    images = {stage: images_dir / f"ours-{stage}.img" for stage in configs}
    estimates: dict[int, dict[str, int | None]] = {g: {} for g in sizes}
    for stage, config in configs.items():
        cmd = ours_cmd(k, config, images[stage])
        timed(cmd).check(f"build the {stage}-stage image")
        for g in sizes:  # the build's kernel and config arguments, without -o/--json
            estimates[g][stage] = curve.estimate_mb(CLI, cmd[2:-3], images[stage], g)
    mdf, note = makedumpfile_alone_args()
    meta, entries = curve.part_curve(
        k, work, images, mdf, TARGET_UUID, estimates, sizes,
        deadline=time.monotonic() + minutes * 60, progress=progress,
        lanes=int(os.environ.get("BENCH_CURVE_LANES", curve.LANES)),
    )  # fmt: skip
    meta.update(minutes=minutes, tree=tree_state(), image_sizes={
        stage: {"size": p.stat().st_size, "uncompressed_size": uncompressed_size(p)}
        for stage, p in images.items()
    })  # fmt: skip
    if note:
        meta["makedumpfile_args_note"] = note
    return {"meta": meta, "by_guest_memory": entries}


def storage_config(name: str, work: Path) -> Path:
    """The config `qemu-test --storage NAME` writes, with the Python stage named; for LUKS,
    the key file (and luks-setup's record) that qemu-test makes too."""
    layout = layouts.LAYOUTS[name]
    key_file = work / "luks" / f"{layout.luks_uuid}.key"
    text = layouts.config_text(layout, key_file, hostonly=False, fallback=False)
    path = CACHE / "configs" / f"storage-{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + f"capture: {{stage: {STORAGE_STAGE}}}\n")
    layouts.luks_key_file(layout, load_config(path).targets[0], work)
    return path


def image_figures(k: Kernel, config: Path, out: Path) -> dict[str, Any]:
    """Build an image; its sizes and `estimate`'s crashkernel= for it."""
    report = json.loads(timed(ours_cmd(k, config, out)).check(f"build {out.name}").stdout)
    return {
        "size": out.stat().st_size,
        "uncompressed_size": uncompressed_size(out),
        "features": report.get("features"),
        "estimate_mb": estimate(out, None).total_mb,
    }


def plain_crash_minimum(results: dict[str, Any], kver: str) -> tuple[int | None, str]:
    """The plain disk's smallest crashkernel= for the same stage and kernel, from the crash
    memory part (this run's, or with BENCH_ONLY the last full run's), and which run it was."""
    crash = results.get("crash_memory") or {}
    found = (crash.get(STORAGE_STAGE) or {}).get("minimum_mb")
    if crash.get("kver") != kver or not found:
        return None, "not measured"
    return found, f"the crash memory part of the run started {results['meta']['started']}"


def part_storage(
    kver: str,
    quick: bool,
    plain: tuple[int | None, str],
    progress: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Each `qemu-test --storage` layout: image sizes, `estimate`, and (not quick) the
    smallest crashkernel= by the crash-memory bisection, from just below the plain disk's
    minimum (a stacked image holds the plain one and more) up to `estimate`'s figure."""
    k = kernel(kver)
    work = CACHE / "storage" / kver
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out: dict[str, Any] = {"kver": kver, "stage": STORAGE_STAGE, "memory": "1G", "step_mb": 8,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                           "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                           "tree": tree_state(), "plain_crashkernel_source": plain[1],
                           "layouts": {}}  # fmt: skip
    plain_mb = plain[0]
    out["plain"] = image_figures(k, python_config(), work / "plain.img")
    out["plain"]["crashkernel_min_mb"] = plain_mb
    for name, layout in layouts.LAYOUTS.items():
        entry: dict[str, Any] = {"stack": list(layout.layers), "thin": layout.thin}
        out["layouts"][name] = entry
        try:
            config = storage_config(name, work)
            entry.update(image_figures(k, config, work / f"{name}.img"))
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            continue
        entry["size_ratio"] = ratio(entry["size"], out["plain"]["size"])
        entry["uncompressed_ratio"] = ratio(
            entry["uncompressed_size"], out["plain"]["uncompressed_size"]
        )
        if quick:
            continue

        def probe(mb: int, name: str = name, config: Path = config) -> harness.Probe:
            probe_dir = work / name / f"{mb}M"
            result, _ = harness.qemu_test(CLI, k, config, mb, probe_dir, want_stage=STORAGE_STAGE,
                                          extra=("--storage", name))  # fmt: skip
            harness.cleanup(probe_dir)
            print(
                f"  storage {name} {mb}M: {'pass' if result.passed else 'FAIL'} "
                f"({result.seconds:.0f}s) {result.detail}",
                flush=True,
            )
            return result

        low = plain_mb - 8 if plain_mb else 96
        high = max(entry["estimate_mb"], low + 8)
        search = harness.bisect(probe, low, high).as_dict()
        entry["crash_memory"] = search
        found = search["minimum_mb"]
        entry["crashkernel_min_mb"] = found
        entry["crashkernel_ratio"] = ratio(found, plain_mb)
        entry["estimate_covers"] = None if found is None else entry["estimate_mb"] >= found
        progress(out)
    return out


# --- report ------------------------------------------------------------------------------


def goal_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    labels = {
        "build_ratio": "build time, ours (warm) / dracut, same compression (6.1, median wall)",
        "build_ratio_cold": "build time, ours (cold cache) / dracut, same compression (6.1)",
        "size_ratio_static": "image size, static stage / dracut (6.1, zstd)",
        "size_ratio_python": "image size, Python stage / dracut (6.1, zstd)",
        "capture_ratio_makedumpfile": "capture time, our stage's dump step / makedumpfile alone",
        "capture_ratio_stage_total": "capture time, our whole stage / makedumpfile alone",
    }
    for key, goal in GOALS.items():
        value = results.get(key)
        row: dict[str, Any] = {
            "metric": key,
            "what": labels[key],
            "value": value,
            "goal": f"<= {goal}x",
        }
        if value is None:
            row.update(met=None, verdict="not measured")
        else:
            met = value <= goal
            how = f"{value / goal:.2f}x the goal" if not met else f"{goal / value:.2f}x inside"
            row.update(met=met, verdict=f"{'met' if met else 'MISSED'} ({how})")
        rows.append(row)
    floor = results.get("kernel_floor_mb")
    for stage in ("static", "python"):
        value = results.get(f"crashkernel_min_{stage}_mb")
        row = {
            "metric": f"crashkernel_min_{stage}_mb",
            "what": f"smallest crashkernel=, {stage} stage (MB)",
            "value": value,
            "goal": f"<= floor + {CRASH_SLACK_MB}M"
            + (f" = {floor + CRASH_SLACK_MB}M" if floor else ""),
        }
        if value is None or floor is None:
            row.update(met=None, verdict="not measured")
        else:
            over = value - (floor + CRASH_SLACK_MB)
            met = over <= 0
            row.update(
                met=met,
                verdict=f"{'met' if met else 'MISSED'} "
                f"({abs(over)}M {'inside' if met else 'over'})",
            )
        rows.append(row)
    rows += curve_goal_rows(results.get("by_guest_memory") or [])
    return rows


def curve_goal_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per guest size: the Python stage within PYTHON_OVER_STATIC_MB of the static image, and
    `estimate` between ESTIMATE_ABOVE_MB above each measured minimum."""
    low, high = ESTIMATE_ABOVE_MB

    def row(metric: str, what: str, value: int | None, goal: str, lo: int, hi: int,
            detail: str) -> dict[str, Any]:  # fmt: skip
        met = None if value is None else lo <= value <= hi
        verdict = "not measured" if met is None else f"{'met' if met else 'MISSED'} ({detail})"
        return {"metric": metric, "what": what, "value": value, "goal": goal, "met": met,
                "verdict": verdict}  # fmt: skip

    rows: list[dict[str, Any]] = []
    for e in entries:
        gib = e.get("memory_gib")
        static, python = e.get("crashkernel_min_static_mb"), e.get("crashkernel_min_python_mb")
        rows.append(row(
            f"python_over_static_mb_{gib}g",
            f"crash memory, Python stage minus static stage, {gib} GiB guest (MB)",
            None if static is None or python is None else python - static,
            f"<= {PYTHON_OVER_STATIC_MB}M", -(2**31), PYTHON_OVER_STATIC_MB,
            f"{python}M vs {static}M",
        ))  # fmt: skip
        for stage, minimum in (("static", static), ("python", python)):
            found = e.get(f"estimate_{stage}_mb")
            rows.append(row(
                f"estimate_above_min_{stage}_{gib}g",
                f"`estimate` above the smallest crashkernel=, {stage}, {gib} GiB (MB)",
                None if found is None or minimum is None else found - minimum,
                f"{low}M to {high}M", low, high, f"{found}M",
            ))  # fmt: skip
    return rows


def fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def mb(size: Any) -> str:
    return "-" if size is None else f"{size / 1e6:.2f} MB"


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# kdump-mkinitrd benchmark",
        "",
        f"{meta['started']}, {meta.get('duration_s', 0):.0f} s, "
        f"{'quick (no QEMU parts)' if meta['quick'] else 'full'}; {meta['cpus']} CPUs, "
        f"load {meta['loadavg_start']} at start; {meta.get('dracut') or 'no dracut'}. "
        "Medians of alternated runs; timings are noisy (shared machine, TCG guests).",
        *(
            [
                "",
                "Rerun alone since (BENCH_ONLY), replacing that run's figures: "
                + ", ".join(f"{part} {when}" for part, when in meta["reruns"].items())
                + ".",
            ]
            if meta.get("reruns")
            else []
        ),
        "",
        "## Goals",
        "",
        "| goal | value | target | verdict |",
        "| --- | --- | --- | --- |",
    ]
    for row in results["goals"]:
        lines.append(
            f"| {row['what']} | {fmt(row['value'], digits=3)} | {row['goal']} | {row['verdict']} |"
        )
    lines += [
        "",
        "## Build",
        "",
        "Same kernel and drivers; dracut's image holds makedumpfile as ours does (`--install "
        f"{MAKEDUMPFILE}`: Debian's dracut has no kdump module). `dracut` compresses as we do "
        f"(`{SAME_ZSTD}`), `dracut --zstd` is its own setting. Warm: our cache folder as the "
        "previous build left it; cold: a new, empty one (XDG_CACHE_HOME) for each run. The "
        "builder is byte-compiled first, as an installed package is.",
        "",
        "| kernel | builder | wall (median) | CPU | peak RSS | ratio to dracut | "
        "ratio to dracut --zstd |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kver, b in results["build"].items():
        if "error" in b and len(b) == 1:
            lines.append(f"| {kver} | error: {b['error'][:200]} | | | | | |")
            continue
        dracut_wall = b.get("dracut", {}).get("wall_median_s")
        dracut15_wall = b.get("dracut_zstd15", {}).get("wall_median_s")
        for name, label in BUILD_ROWS.items():
            s = b.get(name)
            if not s or "wall_median_s" not in s:
                note = (s or {}).get("error") or "not measured"
                lines.append(f"| {kver} | {label} | {note} | | | | |")
                continue
            lines.append(
                f"| {kver} | {label} | {fmt(s['wall_median_s'], ' s', 3)} | "
                f"{fmt(s['cpu_median_s'], ' s', 3)} | "
                f"{fmt((s['maxrss_median_kb'] or 0) / 1024, ' MB', 1)} | "
                f"{fmt(ratio(s['wall_median_s'], dracut_wall), 'x', 3)} | "
                f"{fmt(ratio(s['wall_median_s'], dracut15_wall), 'x', 3)} |"
            )
        if "warm_cold_same_bytes" in b:
            lines.append(f"| {kver} | warm and cold images the same bytes | "
                         f"{'yes' if b['warm_cold_same_bytes'] else 'NO'} | | | | |")  # fmt: skip
    lines += [
        "",
        "## Image size",
        "",
        "Ratios are to `dracut` (with makedumpfile, compressed as ours); the last column to "
        "`dracut_zstd15` (dracut's own --zstd). `ours_python` packs Debian's /usr/bin/python3, "
        "`ours_python_pyenv` the builder's interpreter.",
        "",
        "| kernel | image | compressed | uncompressed | ratio (compressed) | ratio (unc.) | "
        "ratio to dracut --zstd |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kver, images in results["size"].items():
        if "error" in images and len(images) == 1:
            lines.append(f"| {kver} | error: {images['error'][:200]} | | | | |")
            continue
        for name, s in images.items():
            if not isinstance(s, dict):
                continue
            if s.get("size") is None:
                why = s.get("note") or s.get("error") or ""
                lines.append(f"| {kver} | {name} | - ({why[:160]}) | | | |")
                continue
            lines.append(
                f"| {kver} | {name} | {mb(s['size'])} | {mb(s.get('uncompressed_size'))} | "
                f"{fmt(s.get('ratio'), 'x', 3)} | {fmt(s.get('ratio_uncompressed'), 'x', 3)} | "
                f"{fmt(s.get('ratio_vs_dracut_zstd15'), 'x', 3)} |"
            )
    first = results["size"].get(KERNELS[0], {})
    breakdown = []
    for name in ("ours_static", "ours_python", "ours_python_pyenv"):
        parts = (first.get(name) or {}).get("by_feature", {}).get("features")
        if parts:
            text = ", ".join(f"{f} {mb(v)}" for f, v in parts.items() if v)
            breakdown.append(f"- {name}: {text}")
    if breakdown:
        intro = (
            f"Uncompressed file bytes by feature ({KERNELS[0]}; `ours_python` packs Debian's "
            f"{first.get('debian_python', DEBIAN_PYTHON)}, `ours_python_pyenv` the "
            f"interpreter running the builder, {first.get('builder_python', '?')}):"
        )
        lines += ["", intro, "", *breakdown]
    crash = results.get("crash_memory")
    lines += ["", "## Crash memory (smallest crashkernel= that works, 1 GiB guest, 8M steps)", ""]
    if crash is None:
        lines.append("skipped (BENCH_QUICK=1)")
    elif "error" in crash and len(crash) == 1:
        lines.append(f"error: {crash['error']}")
    else:
        lines += [
            "| capture image | smallest passing | largest failing | probes |",
            "| --- | --- | --- | --- |",
        ]
        for name, label in (
            ("floor", "kernel floor (busybox, prints a marker)"),
            ("static", "ours, static stage"),
            ("python", "ours, Python stage"),
        ):
            s = crash.get(name, {})
            probes = ", ".join(
                f"{p['crashkernel_mb']}M {'ok' if p['passed'] else 'fail'}"
                for p in s.get("probes", [])
            )
            err = f" (error: {s['error']})" if s.get("error") else ""
            lines.append(
                f"| {label} | {fmt(s.get('minimum_mb'), 'M')} | "
                f"{fmt(s.get('failing_mb'), 'M')} | {probes}{err} |"
            )
    cap = results.get("capture")
    lines += ["", "## Capture (in the capture kernel, crashkernel=256M, 1 GiB guest)", ""]
    if cap is None:
        lines.append("skipped (BENCH_QUICK=1)")
    elif "error" in cap and len(cap) == 1:
        lines.append(f"error: {cap['error']}")
    else:
        mdf_s = cap.get("makedumpfile_median_s")
        lines += [
            "| what | seconds (median) | ratio to makedumpfile alone | dump size |",
            "| --- | --- | --- | --- |",
            f"| our Python stage, dump step | {fmt(cap.get('ours_dump_median_s'), ' s')} | "
            f"{fmt(cap.get('ratio_dump_step'), 'x', 3)} | {mb(cap.get('ours_vmcore_size'))} |",
            f"| our Python stage, all steps (parse, dmesg, dump, sha256) | "
            f"{fmt(cap.get('ours_stage_total_median_s'), ' s')} | "
            f"{fmt(cap.get('ratio_stage_total'), 'x', 3)} | |",
            f"| our static capture (dmesg, makedumpfile, sha256sum) | "
            f"{fmt(cap.get('ours_static_total_median_s'), ' s')} | "
            f"{fmt(cap.get('ratio_static_total'), 'x', 3)} | "
            f"{mb(cap.get('ours_static_vmcore_size'))} |",
            f"| makedumpfile alone (`{' '.join(cap.get('makedumpfile_args', []))}`) | "
            f"{fmt(mdf_s, ' s')} | 1.000x | {mb(cap.get('makedumpfile_dump_size'))} |",
            f"| makedumpfile alone + sync | {fmt(cap.get('makedumpfile_with_sync_median_s'), ' s')}"
            f" | {fmt(ratio(cap.get('makedumpfile_with_sync_median_s'), mdf_s), 'x', 3)} | |",
            f"| dd /proc/vmcore to /dev/null | {fmt(cap.get('dd_median_s'), ' s')} | "
            f"{fmt(ratio(cap.get('dd_median_s'), mdf_s), 'x', 3)} | "
            f"{mb(cap.get('proc_vmcore_size'))} read |",
        ]
    lines += curve.markdown(results)
    lines += storage_markdown(results.get("storage"))
    lines += arm64.markdown(results)
    lines += peer_debian.markdown(results)
    lines += ["", "## Where our build's time goes", ""]
    for kver, b in results["build"].items():
        for name in ("ours", "ours_cold", "ours_static", "ours_static_cold"):
            phases = b.get(name, {}).get("phases_median_s")
            if phases:
                parts = ", ".join(f"{p} {v:.3f} s" for p, v in phases.items() if v is not None)
                lines.append(
                    f"- {kver}, {BUILD_ROWS[name]}, `--json` phases (median): {parts}; outside "
                    f"the phases (interpreter start, imports, config): "
                    f"{fmt(b[name].get('outside_phases_s'), ' s', 3)}"
                )
    prof = results.get("profile")
    if prof and "where_cumulative_s" in prof:
        parts = ", ".join(f"{k} {v:.3f} s" for k, v in prof["where_cumulative_s"].items() if v)
        lines += [
            f"- cProfile of one Python-stage build ({prof['total_s']:.2f} s under the "
            f"profiler), cumulative: {parts}",
            "",
            "cProfile top 10 (cumulative):",
            "",
            "| function | calls | own s | cumulative s |",
            "| --- | --- | --- | --- |",
        ]
        for row in prof["top10_cumulative"]:
            lines.append(
                f"| `{row['function']}` | {row['calls']} | {row['tottime_s']:.3f} | "
                f"{row['cumtime_s']:.3f} |"
            )
        lines += [
            "",
            "cProfile top 10 (own time):",
            "",
            "| function | calls | own s | cumulative s |",
            "| --- | --- | --- | --- |",
        ]
        for row in prof["top10_tottime"]:
            lines.append(
                f"| `{row['function']}` | {row['calls']} | {row['tottime_s']:.3f} | "
                f"{row['cumtime_s']:.3f} |"
            )
    elif prof:
        lines.append(f"- profile error: {prof.get('error')}")
    errors = results.get("errors", {})
    if errors:
        lines += ["", "## Errors", ""] + [
            f"- {k}: {v.splitlines()[-1][:300]}" for k, v in errors.items()
        ]
    notes = [n for b in results["build"].values() for n in b.get("notes", [])]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in sorted(set(notes))]
    return "\n".join(lines) + "\n"


def storage_markdown(storage: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Stacked storage (`qemu-test --storage LAYOUT`)", ""]
    if storage is None:
        return [*lines, "not measured"]
    if "error" in storage and len(storage) == 1:
        return [*lines, f"error: {storage['error']}"]
    plain = storage["plain"]
    lines += [
        f"{storage['kver']}, {storage['stage']} stage, 1 GiB guest, 8M steps; run "
        f"{storage['started']} (load {storage['loadavg_start']}). Ratios are to the plain "
        f"disk's image and smallest crashkernel= (same kernel and stage; the plain figure: "
        f"{storage.get('plain_crashkernel_source', '?')}). `estimate` is "
        "`kdump-mkinitrd estimate` for the same image.",
        "",
        "| layout | stack (bottom first) | image | unpacked | ratio (image, unpacked) | "
        "smallest crashkernel= | largest failing | ratio | estimate | probes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| plain disk | - | {mb(plain['size'])} | {mb(plain['uncompressed_size'])} | 1.000x, "
        f"1.000x | {fmt(plain.get('crashkernel_min_mb'), 'M')} | | 1.000x | "
        f"{plain['estimate_mb']}M | |",
    ]
    for name, e in storage["layouts"].items():
        stack = " / ".join(e["stack"]) + (" (thin)" if e.get("thin") else "")
        if "size" not in e:
            lines.append(f"| {name} | {stack} | error: {e.get('error', '')[:200]} |")
            continue
        search = e.get("crash_memory") or {}
        probes = ", ".join(
            f"{p['crashkernel_mb']}M {'ok' if p['passed'] else 'fail'}"
            for p in search.get("probes", [])
        )
        if search.get("error"):
            probes += f" (error: {search['error'][:120]})"
        lines.append(
            f"| {name} | {stack} | {mb(e['size'])} | {mb(e['uncompressed_size'])} | "
            f"{fmt(e['size_ratio'], 'x', 3)}, {fmt(e['uncompressed_ratio'], 'x', 3)} | "
            f"{fmt(e.get('crashkernel_min_mb'), 'M')} | {fmt(search.get('failing_mb'), 'M')} | "
            f"{fmt(e.get('crashkernel_ratio'), 'x', 3)} | {e['estimate_mb']}M | "
            f"{probes or 'not measured (BENCH_QUICK=1)'} |"
        )
    return lines


def headline(results: dict[str, Any]) -> None:
    """The top-level keys the issue asks for, from the detailed parts."""
    first = KERNELS[0]
    build = results["build"].get(first, {})
    size = results["size"].get(first, {})
    results["build_ratio"] = build.get("ratio_wall")
    results["build_ratio_cold"] = build.get("ratio_wall_cold")
    results["build_ratio_vs_dracut_zstd15"] = build.get("ratio_wall_vs_dracut_zstd15")
    results["size_ratio_static"] = size.get("ours_static", {}).get("ratio")
    results["size_ratio_python"] = size.get("ours_python", {}).get("ratio")
    results["size_ratio_ssh"] = size.get("ours_ssh", {}).get("ratio")
    crash = results.get("crash_memory") or {}
    results["crashkernel_min_static_mb"] = crash.get("static", {}).get("minimum_mb")
    results["crashkernel_min_python_mb"] = crash.get("python", {}).get("minimum_mb")
    # The curve's 1 GiB guest is the same measure with 3 tries per size (and a filled
    # ramdisk): where it ran, it is the headline.
    one_gib = [e for e in results.get("by_guest_memory") or [] if e.get("memory_gib") == 1]
    for stage in ("static", "python") if one_gib else ():
        key = f"crashkernel_min_{stage}_mb"
        results[key] = one_gib[0].get(key) or results[key]
    results["kernel_floor_mb"] = crash.get("floor", {}).get("minimum_mb")
    capture = results.get("capture") or {}
    results["capture_ratio_makedumpfile"] = capture.get("ratio_dump_step")
    results["capture_ratio_makedumpfile_stage_total"] = capture.get("ratio_stage_total")
    results["capture_ratio_stage_total"] = capture.get("ratio_stage_total")
    if_needed = build.get("if_needed")
    results["if_needed_noop_s"] = if_needed.get("wall_median_s") if if_needed else None
    stacked = (results.get("storage") or {}).get("layouts", {})
    results["storage_crashkernel_min_mb"] = {
        name: e.get("crashkernel_min_mb") for name, e in stacked.items()
    }
    results["storage_crashkernel_ratio"] = {
        name: e.get("crashkernel_ratio") for name, e in stacked.items()
    }
    results["goals"] = goal_rows(results)


def save(results: dict[str, Any]) -> None:
    headline(results)
    (BENCH / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (BENCH / "results.md").write_text(markdown(results))


def main() -> int:
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    only = os.environ.get("BENCH_ONLY", "")
    if only not in ("", *ONLY_PARTS):
        print(f"bench: BENCH_ONLY={only!r}: only {', '.join(ONLY_PARTS)} can run alone",
              file=sys.stderr)  # fmt: skip
        return 2
    crash_kver = os.environ.get("BENCH_CRASH_KVER", KERNELS[0])
    CACHE.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "quick": quick,
            "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "dracut": tool_version(["dracut", "--version"]),
            "makedumpfile": tool_version(["makedumpfile", "-v"]),
            "kernels": list(KERNELS),
            "runs": RUNS,
            "tree_start": tree_state(),
        },
        "build": {},
        "size": {},
        "profile": None,
        "crash_memory": None,
        "capture": None,
        "storage": None,
        "errors": {},
    }
    if only:  # the other parts stay as the last full run left them
        results = json.loads((BENCH / "results.json").read_text())
        results["errors"].pop(ONLY_PARTS[only], None)
        results["meta"].setdefault("reruns", {})[only] = time.strftime("%Y-%m-%d %H:%M:%S %z")

    def part(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        print(f"bench: {name} ...", flush=True)
        t0 = time.monotonic()
        try:
            value = fn()
        except Exception as exc:
            results["errors"][name] = "".join(traceback.format_exception(exc))[-2000:]
            value = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"bench: {name} FAILED: {value['error']}", flush=True)
        results["meta"].setdefault("part_seconds", {})[name] = round(time.monotonic() - t0, 1)
        if not only:  # BENCH_ONLY keeps the full run's meta; its part records its own
            results["meta"]["duration_s"] = round(time.monotonic() - start, 1)
        return value

    for kver in KERNELS if only in ("", "build") else ():
        results["build"][kver] = part(f"build {kver}", functools.partial(part_build, kver))
        save(results)
        results["size"][kver] = part(f"size {kver}", functools.partial(part_size, kver))
        save(results)
    if only in ("", "build"):
        results["profile"] = part("profile", lambda: part_profile(KERNELS[0]))
        save(results)
    if not quick and not only:
        results["crash_memory"] = part("crash memory", lambda: part_crash_memory(crash_kver))
        save(results)
    if only == "capture" or not (quick or only):
        results["capture"] = part("capture", lambda: part_capture(crash_kver))
        save(results)
    plain = plain_crash_minimum(results, crash_kver)

    def storage_progress(partial: dict[str, Any]) -> None:
        results["storage"] = partial
        save(results)

    if only in ("", "storage"):
        results["storage"] = part("storage", lambda: part_storage(crash_kver, quick, plain,
                                                                  storage_progress))  # fmt: skip

    def peer_progress(partial: dict[str, Any]) -> None:
        results.update(partial)
        save(results)

    def curve_progress(entries: list[dict[str, Any]]) -> None:
        curve.merge(results, {"running": True}, entries)
        save(results)

    if only == "curve" or not (quick or only):
        found = part("curve", lambda: part_curve(crash_kver, curve_progress))
        # A failed part keeps the entries measured before it failed, and says why.
        curve.merge(results, found.get("meta") or found, found.get("by_guest_memory") or [])
        save(results)

    if only == "arm64" or not (quick or only):
        work = CACHE / "arm64"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        configs = {"static": static_config(), "python": debian_python_config()}
        results["arm64"] = part("arm64", lambda: arm64.part_arm64(
            CLI, work, cache_root(), kernel, configs, kernel(crash_kver), ours_cmd))  # fmt: skip
        save(results)

    if only == "peer" or not (quick or only):
        peer_work = CACHE / "peer-debian"
        peers = part("peer debian", lambda: peer_debian.part_peer_debian(peer_work, peer_progress))
        for key in peer_debian.RESULT_KEYS:
            # A failed part keeps what was measured before it failed, and says why.
            results[key] = peers.get(key) or {**(results.get(key) or {}), **peers}
    if not only:
        results["meta"]["duration_s"] = round(time.monotonic() - start, 1)
        results["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        results["meta"]["tree_end"] = tree_state()
    save(results)
    print()
    print((BENCH / "results.md").read_text())
    meta = results["meta"]
    seconds = meta["part_seconds"][ONLY_PARTS[only]] if only else meta["duration_s"]
    print(f"bench: wrote {BENCH / 'results.json'} and {BENCH / 'results.md'} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
