"""The crash-memory curve (`make bench`, `BENCH_ONLY=curve`): on guests of several memory
sizes, the smallest crashkernel= at which our static-stage and Python-stage images save the
dump, and the capture time of makedumpfile alone next to our Python stage's, with most of the
guest's memory filled with data the dump keeps (a brd ramdisk, see `harness.Fill`).

A size passes only if every one of `TRIES` boots at it saved the dump (the first failure ends
that size). Searches start near where they will land (each guest size from the next smaller
size's result) and step outwards 8M at a time (doubling the step after three moves) until the
answer is bracketed, then bisect. Independent guests run two at a time under a cap on their
total memory.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness
from harness import Kernel

STEP_MB = 8
TRIES = 3
SIZES_GIB = (1, 4, 16)
STAGES = ("static", "python")
# Where the 1 GiB searches start: the last single-try bisection's results (static 96-104M,
# Python 112M); the search never goes under BOTTOM_MB, where kexec could not even load the
# kernel in the last bench run.
START_MB = {"static": 96, "python": 112}
BOTTOM_MB = 64
TOP_MB = 512
BOOTS_PER_SEARCH = 15
TIMING_CRASHKERNEL_MB = 256
LANES = 2
MEMORY_CAP_GIB = 20  # of the host's 23 GiB: guests touch what is filled, plus their kernel


def timing_boots(memory_gib: int) -> int:
    """Boots of each kind for the capture time: 3, but 2 for the biggest guests, whose
    boots cost minutes each under TCG."""
    return 2 if memory_gib >= 16 else 3


def timeout_s(memory_gib: int) -> float:
    """A boot's time limit: generous against the time measured (1 GiB 21-32 s, 16 GiB
    about 185 s), so that only a hung guest reaches it."""
    return 180.0 + 30.0 * memory_gib


def disk_mib(memory_gib: int) -> int:
    """The sparse target disk: room for a dump of all of the guest's memory at the
    filled text's compression and more."""
    return 1536 + memory_gib * 512


# --- the search ----------------------------------------------------------------------------


@dataclass
class Attempt:
    """One boot at one crashkernel= size."""

    crashkernel_mb: int
    try_number: int
    passed: bool
    reason: str
    seconds: float
    fill: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["try"] = out.pop("try_number")
        return out


@dataclass
class Search:
    start_mb: int
    minimum_mb: int | None = None  # smallest size that passed every try
    failing_mb: int | None = None  # largest size that failed
    probes: list[Attempt] = field(default_factory=list)
    stopped: str | None = None  # why the search ended before it was complete

    @property
    def complete(self) -> bool:
        return (
            self.minimum_mb is not None
            and self.stopped is None
            and (self.minimum_mb <= BOTTOM_MB or self.failing_mb == self.minimum_mb - STEP_MB)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "start_mb": self.start_mb,
            "minimum_mb": self.minimum_mb,
            "failing_mb": self.failing_mb,
            "complete": self.complete,
            "stopped": self.stopped,
            "boots": len(self.probes),
            "probes": [p.as_dict() for p in self.probes],
        }


class Stop(Exception):
    """The search may not boot again (its budget is spent or the run's deadline passed)."""


def search(
    boot: Callable[[int, int], Attempt],
    start_mb: int,
    step: int = STEP_MB,
    tries: int = TRIES,
    bottom: int = BOTTOM_MB,
    top: int = TOP_MB,
    budget: int = BOOTS_PER_SEARCH,
    stop: Callable[[], str | None] = lambda: None,
) -> Search:
    """The smallest size (multiple of `step`) at which `tries` boots all pass, from
    `start_mb`: it steps away from the start by `step` (three times, then doubling the step:
    the start is meant to be close) until a failing size lies below a passing one, then
    bisects between them. `boot(mb, try_number)` boots once."""
    out = Search(start_mb)

    def passes(mb: int) -> bool:
        for number in range(1, tries + 1):
            why = stop() or (
                f"budget of {budget} boots spent" if len(out.probes) >= budget else None
            )
            if why:
                raise Stop(why)
            attempt = boot(mb, number)
            out.probes.append(attempt)
            if not attempt.passed:
                out.failing_mb = max(out.failing_mb or 0, mb)
                return False
        out.minimum_mb = mb if out.minimum_mb is None else min(out.minimum_mb, mb)
        return True

    low: int | None = None  # largest failing
    high: int | None = None  # smallest passing
    mb = min(max(start_mb // step * step, bottom), top)
    try:
        if passes(mb):
            high = mb
        else:
            low = mb
        moves = 0

        def gap() -> int:
            return step if moves < 3 else step * 2 ** (moves - 2)

        while high is None:
            assert low is not None
            if low >= top:
                out.stopped = f"fails even at {top}M"
                return out
            mb = min(low + gap(), top)
            if passes(mb):
                high = mb
            else:
                low = mb
            moves += 1
        while low is None:
            if high <= bottom:
                return out  # nothing smaller can be loaded at all
            mb = max(high - gap(), bottom)
            if passes(mb):
                high = mb
            else:
                low = mb
            moves += 1
        while high - low > step:
            mid = max(low + (high - low) // 2 // step * step, low + step)
            if passes(mid):
                high = mid
            else:
                low = mid
    except Stop as why:
        out.stopped = str(why)
    except Exception as exc:  # a broken boot ends the search; what it found so far stays
        out.stopped = f"{type(exc).__name__}: {exc}"
    return out


# --- running guests two at a time ----------------------------------------------------------


@dataclass
class Job:
    name: str
    memory_gib: int
    run: Callable[[], None]
    after: tuple[str, ...] = ()  # names of jobs that must have finished first


def run_jobs(jobs: Sequence[Job], lanes: int = LANES, memory_cap_gib: int = MEMORY_CAP_GIB
             ) -> dict[str, str]:  # fmt: skip
    """Run `jobs` on `lanes` threads: each free lane takes the first job in `jobs`' order
    whose predecessors have finished and whose guest fits beside the running ones under
    `memory_cap_gib` (one job alone always fits). Returns the errors by job name."""
    pending = list(jobs)
    names = {j.name for j in jobs}
    finished: set[str] = set()
    running: dict[str, int] = {}
    errors: dict[str, str] = {}
    lock = threading.Condition()

    def ready(job: Job) -> bool:
        deps = all(d in finished or d not in names for d in job.after)
        fits = not running or sum(running.values()) + job.memory_gib <= memory_cap_gib
        return deps and fits

    def lane() -> None:
        while True:
            with lock:
                while True:
                    if not pending:
                        return
                    job = next((j for j in pending if ready(j)), None)
                    if job is not None:
                        break
                    lock.wait()
                pending.remove(job)
                running[job.name] = job.memory_gib
            try:
                job.run()
            except Exception as exc:
                errors[job.name] = f"{type(exc).__name__}: {exc}"
            with lock:
                del running[job.name]
                finished.add(job.name)
                lock.notify_all()

    threads = [threading.Thread(target=lane, name=f"curve-lane-{i}") for i in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


# --- one guest size's entry ----------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def size_entry(
    memory_gib: int,
    searches: dict[str, Search],
    makedumpfile_runs: list[dict[str, Any]],
    stage_runs: list[dict[str, Any]],
    estimates: dict[str, int | None],
) -> dict[str, Any]:
    """What results.json's `by_guest_memory` says about one guest size."""
    mdf_ok = [r for r in makedumpfile_runs if r.get("status") == 0]
    stage_ok = [r for r in stage_runs if r.get("stage") == "python" and r.get("timings")]
    fills = [
        f
        for f in (
            *(r.get("fill") for r in [*makedumpfile_runs, *stage_runs]),
            *(p.fill for s in searches.values() for p in s.probes),
        )
        if f
    ]
    minimum = {stage: s.minimum_mb if s.complete else None for stage, s in searches.items()}
    return {
        "memory_gib": memory_gib,
        "crashkernel_min_static_mb": minimum.get("static"),
        "crashkernel_min_python_mb": minimum.get("python"),
        "python_over_static_mb": (
            None
            if minimum.get("static") is None or minimum.get("python") is None
            else minimum["python"] - minimum["static"]  # type: ignore[operator]
        ),
        "estimate_static_mb": estimates.get("static"),
        "estimate_python_mb": estimates.get("python"),
        "capture_crashkernel_mb": TIMING_CRASHKERNEL_MB,
        "capture_s_makedumpfile": _median([r["seconds"] for r in mdf_ok]),
        "capture_s_stage_total": _median([sum(r["timings"].values()) for r in stage_ok]),
        "capture_s_stage_dump": _median([r["timings"]["dump"] for r in stage_ok]),
        "capture_boots": {"makedumpfile": len(mdf_ok), "python_stage": len(stage_ok)},
        "vmcore_mb": _median([r["vmcore_size"] / 2**20 for r in stage_ok]),
        "makedumpfile_dump_mb": _median([r["size"] / 2**20 for r in mdf_ok if r.get("size")]),
        "fill_mib": fills[0]["fill_mib"] if fills else None,
        "fill_share": round(fills[0]["fill_mib"] / (memory_gib * 1024), 3) if fills else None,
        "fill_s_median": _median([f["fill_s"] for f in fills]),
        "searches": {stage: s.as_dict() for stage, s in searches.items()},
        "capture_runs": {"makedumpfile": makedumpfile_runs, "python_stage": stage_runs},
    }


def merge(results: dict[str, Any], meta: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """Put this run's entries into `results['by_guest_memory']` (sorted by memory; a size
    measured now replaces the same size's older entry, other sizes stay) and its meta into
    `results['curve']`."""
    kept = {e["memory_gib"]: e for e in results.get("by_guest_memory") or []}
    kept.update({e["memory_gib"]: e for e in entries})
    results["by_guest_memory"] = [kept[g] for g in sorted(kept)]
    results["curve"] = meta


# --- estimate ------------------------------------------------------------------------------


def estimate_mb(cli: Path, command: list[str], image: Path, memory_gib: int) -> int | None:
    """`kdump-mkinitrd estimate` for a machine of `memory_gib`, when the CLI can be told
    the memory size (`--memory`); None otherwise. `command` is the build's kernel and
    config arguments."""
    help_text = subprocess.run([str(cli), "estimate", "--help"], capture_output=True, text=True)
    if "--memory" not in help_text.stdout:
        return None
    # Exit 1 only says the host's own reservation is too small; the JSON is still there.
    out = subprocess.run(
        [str(cli), "estimate", *command, "--image", str(image), "--memory", f"{memory_gib}G",
         "--json"], capture_output=True, text=True,
    )  # fmt: skip
    try:
        return int(json.loads(out.stdout)["total_mb"])
    except (ValueError, KeyError, TypeError):
        return None


# --- the part ------------------------------------------------------------------------------


def part_curve(
    kernel: Kernel,
    work: Path,
    images: dict[str, Path],
    makedumpfile_args: list[str],
    device_uuid: str,
    estimates: dict[int, dict[str, int | None]],
    sizes: Sequence[int] = SIZES_GIB,
    deadline: float | None = None,
    progress: Callable[[list[dict[str, Any]]], None] = lambda entries: None,
    lanes: int = LANES,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the curve; returns its meta and one entry per guest size. `images`: our
    static-stage and Python-stage images; `deadline` (time.monotonic()): no boot starts
    after it."""
    shutil.rmtree(work, ignore_errors=True)
    sizes = sorted(sizes)  # each search starts from the next smaller guest's result
    searches: dict[int, dict[str, Search]] = {g: {} for g in sizes}
    mdf_runs: dict[int, list[dict[str, Any]]] = {g: [] for g in sizes}
    stage_runs: dict[int, list[dict[str, Any]]] = {g: [] for g in sizes}
    lock = threading.Lock()
    saving = threading.Lock()  # both lanes report progress; one write of results at a time

    def report() -> None:
        with saving:
            progress(entries())

    def stop() -> str | None:
        if deadline is not None and time.monotonic() > deadline:
            return "the run's deadline passed"
        return None

    def entries() -> list[dict[str, Any]]:
        with lock:
            return [
                size_entry(
                    g,
                    dict(searches[g]),
                    list(mdf_runs[g]),
                    list(stage_runs[g]),
                    estimates.get(g, {}),
                )
                for g in sizes
            ]

    def log(text: str) -> None:
        print(f"  curve {text}", flush=True)

    def boot_dir(*parts: str) -> Path:
        path = work.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def drop_images(path: Path) -> None:
        """The boot's images and seed go; its serial log stays."""
        for big in [*path.glob("*.img"), path / "fill-seed"]:
            big.unlink(missing_ok=True)

    def search_job(stage: str, index: int) -> Callable[[], None]:
        gib = sizes[index]
        fill = harness.Fill(harness.fill_mib(gib * 1024))

        def boot(mb: int, number: int) -> Attempt:
            path = boot_dir(f"{gib}G", stage, f"{mb}M-try{number}")
            run = harness.crash_to_disk(
                kernel, path, images[stage], device_uuid, crashkernel_mb=mb,
                memory_mib=gib * 1024, fill=fill, disk_mib=disk_mib(gib),
                timeout=timeout_s(gib),
            )  # fmt: skip
            drop_images(path)
            passed, reason = harness.crash_outcome(run, stage)
            log(f"{gib}G {stage} {mb}M try {number}: {'pass' if passed else 'FAIL'} "
                f"({run.seconds:.0f}s) {reason}")  # fmt: skip
            return Attempt(mb, number, passed, reason, round(run.seconds, 1), run.fill)

        def job() -> None:
            before = searches[sizes[index - 1]].get(stage) if index else None
            start = START_MB[stage]
            if before is not None and before.minimum_mb is not None:
                start = before.minimum_mb  # needs grow with memory: never smaller
            found = search(boot, start, stop=stop)
            with lock:
                searches[gib][stage] = found
            report()

        return job

    def timing_job(gib: int, kind: str, number: int) -> Callable[[], None]:
        fill = harness.Fill(harness.fill_mib(gib * 1024))

        def job() -> None:
            if stop():
                return
            path = boot_dir(f"{gib}G", "capture", f"{kind}-{number}")
            common: dict[str, Any] = {
                "crashkernel_mb": TIMING_CRASHKERNEL_MB, "memory_mib": gib * 1024, "fill": fill,
                "disk_mib": disk_mib(gib), "timeout": timeout_s(gib),
            }  # fmt: skip
            try:
                if kind == "makedumpfile":
                    runs = harness.capture_timing(kernel, path, makedumpfile_args, rounds=1,
                                                  raw_read=False, **common)  # fmt: skip
                    record = next(r for r in runs if r["kind"] == "makedumpfile")
                    record["fill"] = runs[0].get("fill")
                    record["boot_seconds"] = runs[0].get("boot_seconds")
                else:
                    record = harness.ours_capture(kernel, path, images["python"], device_uuid,
                                                  **common)  # fmt: skip
            except Exception as exc:
                record = {"error": f"{type(exc).__name__}: {exc}"}
            drop_images(path)
            record["boot"] = number
            shown = ("seconds", "timings", "vmcore_size", "size", "error", "boot_seconds")
            said = json.dumps({k: v for k, v in record.items() if k in shown})
            log(f"{gib}G capture {kind} #{number}: {said}")
            with lock:
                (mdf_runs if kind == "makedumpfile" else stage_runs)[gib].append(record)
            report()

        return job

    def capture_jobs(gib: int) -> list[Job]:
        out = []
        for number in range(timing_boots(gib)):
            kinds = ("makedumpfile", "python")
            for kind in kinds if number % 2 == 0 else kinds[::-1]:  # alternated
                out.append(Job(f"capture {gib}G {kind} #{number}", gib,
                               timing_job(gib, kind, number)))  # fmt: skip
        return out

    # Order is priority: a free lane takes the first job that is ready and fits. The
    # biggest guest's capture boots need nothing and go first, so that its lane is busy
    # while the smaller sizes' searches give its searches their start.
    biggest = max(sizes)
    jobs = capture_jobs(biggest)
    for index, gib in enumerate(sizes):
        for stage in STAGES:
            after = (f"search {sizes[index - 1]}G {stage}",) if index else ()
            jobs.append(Job(f"search {gib}G {stage}", gib, search_job(stage, index), after))
    for gib in sorted(sizes, reverse=True)[1:]:
        jobs += capture_jobs(gib)
    started, started_at = time.monotonic(), time.strftime("%Y-%m-%d %H:%M:%S %z")
    errors = run_jobs(jobs, lanes)
    meta = {
        "kver": kernel.kver,
        "step_mb": STEP_MB,
        "tries_per_size": TRIES,
        "sizes_gib": list(sizes),
        "start_mb_1gib": START_MB,
        "capture_crashkernel_mb": TIMING_CRASHKERNEL_MB,
        "capture_boots_per_kind": {str(g): timing_boots(g) for g in sizes},
        "lanes": lanes,
        "memory_cap_gib": MEMORY_CAP_GIB,
        "capture_cmdline": harness.capture_cmdline(),
        "makedumpfile_args": makedumpfile_args,
        "started": started_at,
        "seconds": round(time.monotonic() - started, 1),
        "deadline_passed": stop() is not None,
        "job_errors": errors,
    }
    return meta, entries()


# --- report --------------------------------------------------------------------------------


def _cell(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.2f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def markdown(results: dict[str, Any]) -> list[str]:
    """The curve's section of results.md."""
    lines = ["", "## Crash memory by guest memory (`bench/curve.py`)", ""]
    entries = results.get("by_guest_memory")
    meta = results.get("curve") or {}
    if not entries:
        return [*lines, f"error: {meta['error']}" if meta.get("error") else "not measured"]
    boots_text = ", ".join(
        f"{n} boots at {g} GiB" for g, n in (meta.get("capture_boots_per_kind") or {}).items()
    )
    lines += [
        f"{meta.get('kver', '?')}, TCG, 1 vCPU; smallest crashkernel= in {STEP_MB}M steps, "
        f"{meta.get('tries_per_size', TRIES)} boots per size (a size passes only if all "
        "did); capture time at "
        f"crashkernel={meta.get('capture_crashkernel_mb', TIMING_CRASHKERNEL_MB)}M "
        f"(median of {boots_text} per kind). "
        "Before the crash the first stage fills a brd ramdisk with text the dump keeps; "
        "`estimate` is `kdump-mkinitrd estimate --memory` (- where the CLI has no such option)."
        + (" Still running." if meta.get("running") else ""),
        "",
        "| guest | filled | static min | Python min | Python - static | estimate static, "
        "Python | makedumpfile alone | our stage: total (dump step) | vmcore | boots |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        searches = e.get("searches", {})
        boots = sum(s.get("boots", 0) for s in searches.values()) + sum(
            (e.get("capture_boots") or {}).values()
        )
        notes = [
            f"{stage} search stopped: {s['stopped']}"
            for stage, s in searches.items()
            if s.get("stopped")
        ]
        mins = [
            _cell(e.get(f"crashkernel_min_{stage}_mb"), "M")
            + ("" if (searches.get(stage) or {}).get("complete") else " (incomplete)")
            for stage in STAGES
        ]
        fill = (
            f"{e['fill_mib']} MiB ({e['fill_share']:.0%}) in {_cell(e.get('fill_s_median'), ' s')}"
            if e.get("fill_mib")
            else "-"
        )
        lines.append(
            f"| {e['memory_gib']} GiB | {fill} | {mins[0]} | {mins[1]} | "
            f"{_cell(e.get('python_over_static_mb'), 'M')} | "
            f"{_cell(e.get('estimate_static_mb'), 'M')}, "
            f"{_cell(e.get('estimate_python_mb'), 'M')} | "
            f"{_cell(e.get('capture_s_makedumpfile'), ' s')} | "
            f"{_cell(e.get('capture_s_stage_total'), ' s')} "
            f"({_cell(e.get('capture_s_stage_dump'), ' s')}) | "
            f"{_cell(e.get('vmcore_mb'), ' MiB')} | {boots}"
            + (f"; {'; '.join(notes)}" if notes else "")
            + " |"
        )
    probes = []
    for e in entries:
        for stage, s in e.get("searches", {}).items():
            seen = ", ".join(
                f"{p['crashkernel_mb']}M#{p['try']} {'ok' if p['passed'] else p['reason']}"
                for p in s.get("probes", [])
            )
            probes.append(f"- {e['memory_gib']} GiB, {stage}: {seen or 'no probes'}")
    return [*lines, "", "Probes (size#try, in order):", "", *probes]
