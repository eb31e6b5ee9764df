"""How the side-by-side bench reads a bisection's probes (bench/peer_debian.smallest), on the
probes of real `make bench` runs (Debian 6.1, bench/results.json's crash_memory part)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "bench")]
peer_debian: Any = importlib.import_module("peer_debian")


def probes(*seen: tuple[int, str]) -> list[dict[str, Any]]:
    return [{"crashkernel_mb": mb, "outcome": outcome} for mb, outcome in seen]


# The Python stage's search, in the order it probed.
PYTHON_STAGE = probes((256, "saved"), (96, "capture_failed"), (176, "saved"), (136, "saved"),
                      (112, "saved"), (104, "capture_failed"))  # fmt: skip
# The kernel floor's: 64M could not even be loaded, 80M ran out of memory.
FLOOR = probes((128, "saved"), (64, "load_failed"), (96, "saved"), (80, "capture_failed"),
               (88, "saved"))  # fmt: skip


def test_a_finished_search_gives_the_minimum_one_step_above_a_failure() -> None:
    assert peer_debian.smallest(PYTHON_STAGE) == {
        "smallest_crashkernel_mb": 112,
        "largest_failing_crashkernel_mb": 104,
        "bisection_complete": True,
    }
    assert peer_debian.smallest(FLOOR)["smallest_crashkernel_mb"] == 88
    assert peer_debian.smallest(FLOOR)["bisection_complete"] is True


def test_a_search_cut_short_says_so() -> None:
    assert peer_debian.smallest(PYTHON_STAGE[:3]) == {
        "smallest_crashkernel_mb": 176,
        "largest_failing_crashkernel_mb": 96,
        "bisection_complete": False,
    }


def test_no_success_gives_no_minimum() -> None:
    found = peer_debian.smallest([p for p in PYTHON_STAGE if p["outcome"] != "saved"])
    assert found["smallest_crashkernel_mb"] is None
    assert found["bisection_complete"] is False
