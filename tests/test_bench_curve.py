"""The crash-memory curve's pure parts (bench/curve.py, bench/harness.py): the search with its
three-tries rule, the ramdisk fill's arithmetic, reading a probe's outcome off a real serial
log, running guests two at a time, and merging into results.json. The inputs are the figures
and log lines of real bench boots (Debian 6.1 under TCG)."""

from __future__ import annotations

import importlib
import math
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "bench")]
harness: Any = importlib.import_module("harness")
curve: Any = importlib.import_module("curve")

# A Python-stage boot of a 1 GiB guest at crashkernel=256M that saved its dump, and what its
# first stage printed after filling the ramdisk.
SAVED_1G = {
    "tool": "kdump-mkinitrd", "schema": 1, "stage": "python", "complete": True,
    "collector": "makedumpfile", "format": "kdump-compressed", "dump_level": 31,
    "vmcore_size": 83643761,
    "timings": {"parse": 0.003, "dmesg": 0.049, "dump": 3.048, "hash": 2.824},
}  # fmt: skip
FILLED_1G = "kdump-bench: filled mib=512 start=5.97 end=9.58 MemFree=141020 MemAvailable=91400 \n"
BANNER = (
    "[    0.000000] Linux version 6.1.0-56-amd64 (debian-kernel@lists.debian.org) (gcc-12 "
    "(Debian 12.2.0-14+deb12u1) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP "
    "PREEMPT_DYNAMIC Debian 6.1.192-2 (2026-11-16)\n"
)
FIRST_STAGE = (
    BANNER
    + "kdump-bench: first stage up, 268435456 bytes reserved\n"
    + "kdump-bench: capture kernel loaded\n"
    + FILLED_1G
    + "[   10.112233] sysrq: Trigger a crash\n"
    + "[   10.112301] Kernel panic - not syncing: sysrq triggered crash\n"
)


# --- the search ---------------------------------------------------------------------------


def threshold(minimum: int, flaky: dict[tuple[int, int], bool] | None = None) -> Any:
    """A boot that passes from `minimum` up, except where `flaky` says otherwise for a
    (size, try); it records the boots it was asked for."""
    seen: list[tuple[int, int]] = []

    def boot(mb: int, number: int) -> Any:
        seen.append((mb, number))
        passed = (flaky or {}).get((mb, number), mb >= minimum)
        return curve.Attempt(mb, number, passed, "ok" if passed else "OOM", 1.0)

    boot.seen = seen  # type: ignore[attr-defined]
    return boot


def test_a_search_started_at_its_answer_takes_three_passes_and_one_failure() -> None:
    # The Python stage's 1 GiB minimum of the last bench run: 112M, 104M ran out of memory.
    boot = threshold(112)
    found = curve.search(boot, 112)
    assert boot.seen == [(112, 1), (112, 2), (112, 3), (104, 1)]
    assert (found.minimum_mb, found.failing_mb, found.complete) == (112, 104, True)


def test_a_search_started_low_steps_up_one_step_at_a_time() -> None:
    # Failures are cheap (the capture kernel dies early), passes cost three boots.
    boot = threshold(112)
    found = curve.search(boot, 96)
    sizes = [mb for mb, number in boot.seen if number == 1]
    assert sizes == [96, 104, 112]
    assert (found.minimum_mb, found.failing_mb, found.complete) == (112, 104, True)
    assert len(found.probes) == 1 + 1 + 3


def test_a_start_far_off_doubles_the_step_then_bisects() -> None:
    boot = threshold(200)
    found = curve.search(boot, 96)
    sizes = [mb for mb, number in boot.seen if number == 1]
    # 8M steps three times, then 16, 32, 64: 216 passes; bisected down to 200.
    assert sizes == [96, 104, 112, 120, 136, 168, 232, 200, 184, 192]
    assert (found.minimum_mb, found.failing_mb, found.complete) == (200, 192, True)


def test_a_search_started_high_steps_down() -> None:
    boot = threshold(88)
    found = curve.search(boot, 112)
    sizes = [mb for mb, number in boot.seen if number == 1]
    assert sizes == [112, 104, 96, 88, 72, 80]  # the fourth move doubles the step
    assert (found.minimum_mb, found.failing_mb, found.complete) == (88, 80, True)


def test_a_size_that_fails_any_try_counts_as_failing_and_ends_at_once() -> None:
    # The static stage: 96M passed in one bench run and failed in a rerun.
    boot = threshold(96, flaky={(96, 2): False})
    found = curve.search(boot, 96)
    assert boot.seen[:2] == [(96, 1), (96, 2)]  # no third try after a failure
    assert (96, 3) not in boot.seen
    assert (found.minimum_mb, found.failing_mb) == (104, 96)
    assert [p.as_dict()["try"] for p in found.probes] == [1, 2, 1, 2, 3]


def test_a_search_stopped_by_the_deadline_keeps_what_it_found() -> None:
    boot = threshold(112)
    stops = iter([None, None, None, None, "the run's deadline passed"])
    found = curve.search(boot, 96, stop=lambda: next(stops, "the run's deadline passed"))
    assert found.stopped == "the run's deadline passed"
    assert found.complete is False
    assert found.as_dict()["complete"] is False
    assert found.failing_mb == 104 and found.minimum_mb is None


def test_a_search_within_its_budget_of_boots() -> None:
    found = curve.search(threshold(400), 96, budget=6)
    assert len(found.probes) == 6
    assert found.stopped == "budget of 6 boots spent"


def test_a_search_that_never_passes_says_so() -> None:
    found = curve.search(threshold(10_000), 96, top=128)
    assert found.minimum_mb is None and found.stopped == "fails even at 128M"


def test_a_search_that_passes_at_the_bottom_ends_there() -> None:
    found = curve.search(threshold(0), 72, bottom=64)
    assert found.minimum_mb == 64 and found.complete is True


# --- the fill -----------------------------------------------------------------------------


def test_fill_sizes_leave_the_reservation_and_the_first_kernel_room() -> None:
    # Measured: a 1 GiB guest with crashkernel=256M has 578 MiB available before the fill;
    # 624 MiB hung the first stage, 512 MiB left 89 MiB.
    assert harness.fill_mib(1024) == 512
    assert harness.fill_mib(4096) == 2867
    assert harness.fill_mib(16384) == 11468
    for gib in (1, 4, 16):
        share = harness.fill_mib(gib * 1024) / (gib * 1024)
        assert 0.5 <= share <= 0.75


def test_the_doubling_copies_fill_exactly_the_ramdisk_from_its_filled_part() -> None:
    for mib in (1, 2, 3, 512, 2867, 11468):
        fill = harness.Fill(mib)
        filled = fill.seed_mib
        for copy in fill.copies:
            assert copy.source == 0 and copy.offset == filled
            assert copy.count <= filled  # it copies only what is filled already
            filled += copy.count
        assert filled == mib
        assert len(fill.copies) <= math.ceil(math.log2(mib)) if mib > 1 else not fill.copies
    assert len(harness.Fill(11468).copies) == 14


def test_the_seed_is_a_mebibyte_of_text_that_compresses_like_text() -> None:
    seed = harness.fill_seed()
    assert len(seed) == 2**20
    pages = [seed[i : i + 4096] for i in range(0, len(seed), 4096)]
    assert len(set(pages)) == len(pages)  # no two pages alike, none of zeros
    ratio = len(zlib.compress(pages[1])) / 4096
    assert 0.05 < ratio < 0.5


def test_the_fill_line_is_read_back() -> None:
    assert harness.filled(FIRST_STAGE) == {
        "fill_mib": 512,
        "fill_s": 3.61,
        "mem_free_after_kib": 141020,
        "mem_available_after_kib": 91400,
    }
    assert harness.filled(BANNER) is None


# --- a probe's outcome ----------------------------------------------------------------------


def crash(log: str, record: dict[str, Any] | None, timed_out: bool = False) -> Any:
    return harness.CrashRun(log, 30.0, timed_out, record, harness.filled(log))


def test_a_dump_saved_by_the_wanted_stage_passes() -> None:
    assert harness.crash_outcome(crash(FIRST_STAGE + BANNER, SAVED_1G), "python") == (True, "ok")


def test_the_reasons_a_probe_fails() -> None:
    loaded_not = FIRST_STAGE.replace(
        "kdump-bench: capture kernel loaded", "kdump-bench: FAILED to load the capture kernel"
    )
    oom = (
        FIRST_STAGE
        + BANNER
        + "[    2.901122] Out of memory and no killable processes...\n"
        + "[    2.901500] Kernel panic - not syncing: System is deadlocked on memory\n"
    )
    unpack = FIRST_STAGE + BANNER + "[    0.912000] Initramfs unpacking failed: write error\n"
    fallback = FIRST_STAGE + BANNER + "[    3.100000] Out of memory: Killed process 93 (python3)\n"
    cases = [
        (crash(loaded_not, None), "kexec load failed"),
        (crash(oom, None), "OOM"),
        (crash(unpack, None), "initramfs unpack failed"),
        (crash(fallback, dict(SAVED_1G, stage="static")), "OOM; saved by the static stage"),
        (crash(FIRST_STAGE + BANNER, None, timed_out=True), "timeout"),
        (crash(FIRST_STAGE, None), "capture kernel did not start"),
        (crash(FIRST_STAGE + BANNER, None), "no dump saved"),
        (crash(FIRST_STAGE + BANNER, dict(SAVED_1G, vmcore_size=0)), "empty vmcore"),
    ]
    for run, reason in cases:
        assert harness.crash_outcome(run, "python") == (False, reason)
    # The first kernel's own panic (the sysrq crash) is not the capture kernel's.
    assert "Kernel panic" in FIRST_STAGE
    assert harness.crash_outcome(crash(FIRST_STAGE + BANNER, None), "python")[1] != (
        "capture kernel panicked"
    )


# --- guests two at a time -----------------------------------------------------------------


def test_jobs_run_two_at_a_time_after_their_predecessors_and_under_the_memory_cap() -> None:
    lock = threading.Lock()
    running: dict[str, int] = {}
    peak: list[int] = []
    order: list[str] = []

    def job(name: str, gib: int) -> Any:
        def run() -> None:
            with lock:
                running[name] = gib
                peak.append(sum(running.values()))
                order.append(name)
            time.sleep(0.02)
            with lock:
                del running[name]

        return curve.Job(name, gib, run)

    jobs = [
        job("capture 16G a", 16),
        job("capture 16G b", 16),
        job("search 1G", 1),
        curve.Job("search 4G", 4, job("search 4G", 4).run, after=("search 1G",)),
        curve.Job("search 16G", 16, job("search 16G", 16).run, after=("search 4G",)),
        job("capture 4G", 4),
    ]
    errors = curve.run_jobs(jobs, lanes=2, memory_cap_gib=20)
    assert errors == {}
    assert sorted(order) == sorted(j.name for j in jobs)
    assert max(peak) <= 20  # two 16 GiB guests never together
    assert order.index("search 4G") > order.index("search 1G")
    assert order.index("search 16G") > order.index("search 4G")
    assert order[:2] == ["capture 16G a", "search 1G"]  # the second 16G waits, a small one runs


def test_a_failing_job_is_reported_and_its_followers_still_run() -> None:
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("qemu-system-x86_64 not found")

    errors = curve.run_jobs(
        [curve.Job("a", 1, broken), curve.Job("b", 1, lambda: ran.append("b"), after=("a",))]
    )
    assert errors == {"a": "RuntimeError: qemu-system-x86_64 not found"}
    assert ran == ["b"]


# --- results ------------------------------------------------------------------------------


def an_entry(gib: int, python_min: int = 112) -> Any:
    searches = {
        "static": curve.search(threshold(96), 96),
        "python": curve.search(threshold(python_min), python_min),
    }
    for s in searches.values():
        for p in s.probes:
            p.fill = harness.filled(FILLED_1G)
    mdf = [{"kind": "makedumpfile", "round": 0, "status": 0, "seconds": 2.71,
            "seconds_with_sync": 2.9, "size": 80123456, "boot": 0,
            "fill": harness.filled(FILLED_1G)}]  # fmt: skip
    stage = [dict(SAVED_1G, boot=0), dict(SAVED_1G, boot=1, vmcore_size=83650000)]
    return curve.size_entry(gib, searches, mdf, stage, {"static": None, "python": None})


def test_an_entry_has_the_figures_the_issue_asks_for() -> None:
    e = an_entry(1)
    assert e["memory_gib"] == 1
    assert (e["crashkernel_min_static_mb"], e["crashkernel_min_python_mb"]) == (96, 112)
    assert e["python_over_static_mb"] == 16
    assert e["capture_s_makedumpfile"] == 2.71
    assert e["capture_s_stage_total"] == round(0.003 + 0.049 + 3.048 + 2.824, 3)
    assert e["capture_s_stage_dump"] == 3.048
    assert e["vmcore_mb"] == round((83643761 + 83650000) / 2 / 2**20, 3)
    assert (e["fill_mib"], e["fill_share"], e["fill_s_median"]) == (512, 0.5, 3.61)
    assert e["estimate_static_mb"] is None
    assert e["searches"]["python"]["probes"][0] == {
        "crashkernel_mb": 112, "try": 1, "passed": True, "reason": "ok", "seconds": 1.0,
        "fill": harness.filled(FILLED_1G),
    }  # fmt: skip


def test_an_incomplete_search_gives_no_minimum() -> None:
    e = an_entry(1)
    searches = {"static": curve.search(threshold(96), 96, budget=2)}
    partial = curve.size_entry(1, searches, [], [], {})
    assert partial["crashkernel_min_static_mb"] is None
    assert partial["capture_s_makedumpfile"] is None and partial["fill_mib"] is None
    assert e["crashkernel_min_static_mb"] == 96


def test_merge_replaces_measured_sizes_and_keeps_the_rest_of_the_results() -> None:
    results: dict[str, Any] = {
        "build_ratio": 0.25,
        "by_guest_memory": [an_entry(1), an_entry(4, python_min=120)],
        "curve": {"kver": "6.1.0-56-amd64", "started": "before"},
    }
    curve.merge(results, {"kver": "6.1.0-56-amd64", "started": "now"},
                [an_entry(16, python_min=136), an_entry(4, python_min=128)])  # fmt: skip
    assert results["build_ratio"] == 0.25
    assert [e["memory_gib"] for e in results["by_guest_memory"]] == [1, 4, 16]
    assert [e["crashkernel_min_python_mb"] for e in results["by_guest_memory"]] == [112, 128, 136]
    assert results["curve"]["started"] == "now"


def test_the_markdown_table_has_a_row_per_size_and_every_probe() -> None:
    meta = {"kver": "6.1.0-56-amd64", "capture_crashkernel_mb": 256,
            "capture_boots_per_kind": {"1": 3, "16": 2}}  # fmt: skip
    results = {"curve": meta,
               "by_guest_memory": [an_entry(1), an_entry(16, python_min=136)]}  # fmt: skip
    text = "\n".join(curve.markdown(results))
    row = next(line for line in text.splitlines() if line.startswith("| 1 GiB |"))
    assert "| 96M | 112M | 16M |" in row and "512 MiB (50%)" in row and "2.71 s" in row
    assert "| 16 GiB |" in text
    assert "crashkernel=256M (median of 3 boots at 1 GiB, 2 boots at 16 GiB per kind)" in text
    assert "- 16 GiB, python: 136M#1 ok, 136M#2 ok, 136M#3 ok, 128M#1 OOM" in text
    assert "not measured" in "\n".join(curve.markdown({}))


def test_goal_rows_per_guest_size() -> None:
    """The issue's per-size goals: Python within 8M of static, `estimate` 8M to 24M above
    each minimum; a size not measured says so instead of passing."""
    run: Any = importlib.import_module("run")
    entries = [
        {"memory_gib": 1, "crashkernel_min_static_mb": 96, "crashkernel_min_python_mb": 104,
         "estimate_static_mb": 112, "estimate_python_mb": 136},
        {"memory_gib": 16, "crashkernel_min_static_mb": 104, "crashkernel_min_python_mb": 120,
         "estimate_static_mb": 104, "estimate_python_mb": None},
    ]  # fmt: skip
    rows = {r["metric"]: r for r in run.curve_goal_rows(entries)}
    assert rows["python_over_static_mb_1g"]["met"] is True
    assert rows["python_over_static_mb_16g"]["met"] is False
    assert rows["python_over_static_mb_16g"]["value"] == 16
    assert rows["estimate_above_min_static_1g"]["met"] is True
    assert rows["estimate_above_min_python_1g"]["met"] is False  # 32M above
    assert rows["estimate_above_min_static_16g"]["met"] is False  # not above at all
    assert rows["estimate_above_min_python_16g"]["met"] is None
