"""`kdump-mkinitrd list-dumps DIR`: what a dump directory tree holds after the reboot, and
which dumps did not finish (a power cut or a full disk leaves `vmcore.incomplete` behind)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from kdump_mkinitrd.errors import KdumpError


@dataclass(frozen=True)
class Dump:
    path: str
    state: str  # "complete" (vmcore is there) | "incomplete" (it never got renamed into place)
    vmcore_size: int
    stage: str | None
    recorded_size_matches: bool | None  # vmcore.json's size against the file, when both exist


def _one(directory: Path) -> Dump:
    final, partial = directory / "vmcore", directory / "vmcore.incomplete"
    record: dict[str, object] = {}
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((directory / "vmcore.json").read_text())
    if final.is_file():
        size = final.stat().st_size
        matches = record.get("vmcore_size") == size if record else None
        return Dump(
            str(directory), "complete", size, str(record.get("stage")) if record else None, matches
        )
    # A cut can lose even the partial file's name; without vmcore the dump did not finish.
    size = partial.stat().st_size if partial.is_file() else 0
    return Dump(str(directory), "incomplete", size, None, None)


def list_dumps(parent: Path) -> list[Dump]:
    """Every dump directory directly under `parent`, oldest first (names sort by time)."""
    if not parent.is_dir():
        raise KdumpError(f"{parent} is not a directory")
    return [_one(d) for d in sorted(parent.iterdir()) if d.is_dir()]
