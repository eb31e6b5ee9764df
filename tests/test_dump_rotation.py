"""keep and min_free, run by the real busybox sh on real directories."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from builder.config import parse
from builder.features import BUILTIN_DIR
from builder.render import render
from builder.resolve import CaptureSettings


def capture_lib(keep: int, min_free: int) -> str:
    config = parse(f"capture: {{keep: {keep}, min_free: {min_free}}}\n", "k.yaml")
    capture = CaptureSettings("static", "native", 31, "none", "", "h", None, None)
    context = {"config": config, "capture": capture, "python": None}
    return render(BUILTIN_DIR / "capture" / "capture-lib.sh.j2", context)


def sh(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/busybox", "sh", "-c", "log() { echo \"$*\"; }\n" + script],
                          cwd=cwd, capture_output=True, text=True, timeout=30)  # fmt: skip


def make_dumps(parent: Path, states: dict[str, bool]) -> None:
    for name, complete in states.items():
        (parent / name).mkdir(parents=True)
        (parent / name / ("vmcore" if complete else "vmcore.incomplete")).write_bytes(b"x")


@pytest.mark.parametrize(("keep", "left"), [
    (2, ["a-3", "a-4", "a-5"]),  # the two newest complete ones, and the incomplete a-3
    (1, ["a-3", "a-5"]),
    (0, ["a-1", "a-2", "a-3", "a-4", "a-5"]),
    (9, ["a-1", "a-2", "a-3", "a-4", "a-5"]),
])  # fmt: skip
def test_keep_removes_only_the_oldest_complete_dumps(
    keep: int, left: list[str], tmp_path: Path
) -> None:
    dumps = tmp_path / "crash dir"  # a space, to prove nothing is word-split
    make_dumps(dumps, {"a-1": True, "a-2": True, "a-3": False, "a-4": True, "a-5": True})
    # a-5 is the dump just written: it counts, and is never removed.
    result = sh(capture_lib(keep, 0) + f'kdump_prune "{dumps}" "{dumps}/a-5"\n', tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dumps.iterdir()) == left


def test_min_free_refuses_a_full_target(tmp_path: Path) -> None:
    ok = sh(capture_lib(0, 1) + f'kdump_enough_space "{tmp_path}" && echo fits\n', tmp_path)
    assert "fits" in ok.stdout
    refused = sh(
        capture_lib(0, 10**9) + f'kdump_enough_space "{tmp_path}" || echo refused\n', tmp_path
    )
    assert "refused" in refused.stdout and "min_free is 1000000000 MB" in refused.stdout
