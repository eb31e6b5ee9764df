"""The config an import builds, with where each of its values came from, and the outcome for
every key of the peer's files: mapped, mapped with a change in meaning, or not carried over.

Keys are written as the config loader names them in errors (`capture.keep`,
`targets[0].export`), so that a line of the report, a comment in the output and an error of
the loader all say the same thing.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["mapped", "changed", "dropped"]
KINDS: dict[Kind, str] = {
    "mapped": "mapped",
    "changed": "mapped with a change in meaning",
    "dropped": "not carried over",
}

# What an empty value means to every peer: the same as leaving the key out.
EMPTY = "empty: the same as not set"


@dataclass(frozen=True)
class Line:
    """A line of a peer's file."""

    file: str
    number: int
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.number}"


@dataclass(frozen=True)
class Outcome:
    key: str  # the peer's key, as its file spells it
    line: Line
    kind: Kind
    into: tuple[str, ...]  # our keys it set
    note: str  # mapped: anything worth knowing; changed: what changes; dropped: why, and what to do


_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _steps(path: str) -> list[str | int]:
    return [name if name else int(index) for name, index in _STEP.findall(path)]


@dataclass
class Draft:
    """Our config as plain data, in the order it will be written."""

    data: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, list[Line]] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)

    def get(self, path: str) -> Any:
        node: Any = self.data
        for step in _steps(path):
            if isinstance(step, int):
                if not isinstance(node, list) or step >= len(node):
                    return None
                node = node[step]
            else:
                if not isinstance(node, dict) or step not in node:
                    return None
                node = node[step]
        return node

    def _put(self, path: str, value: Any) -> None:
        steps = _steps(path)
        node: Any = self.data
        for step, nxt in itertools.pairwise(steps):
            empty: Any = [] if isinstance(nxt, int) else {}
            node = node[step] if isinstance(step, int) else node.setdefault(step, empty)
        last = steps[-1]
        if isinstance(last, int):
            if last == len(node):
                node.append(value)
            else:
                node[last] = value
        else:
            node[last] = value

    def set(self, path: str, value: Any, line: Line) -> None:
        """Set one of our keys (a later peer line replaces what an earlier one set)."""
        self._put(path, value)
        self.origins.setdefault(path, [])
        if line not in self.origins[path]:
            self.origins[path].append(line)

    def add(self, path: str, value: Any, line: Line) -> str:
        """Append to one of our lists; returns the new item's key."""
        items = self.get(path)
        key = f"{path}[{len(items) if isinstance(items, list) else 0}]"
        self.set(key, value, line)
        return key

    def record(self, kind: Kind, key: str, line: Line, into: tuple[str, ...], note: str) -> None:
        self.outcomes.append(Outcome(key, line, kind, into, note))

    def map(
        self, key: str, line: Line, values: dict[str, Any], note: str = "", kind: Kind = "mapped"
    ) -> None:
        """Carry a peer key over into one or more of ours, and record it."""
        for path, value in values.items():
            self.set(path, value, line)
        self.record(kind, key, line, tuple(values), note)

    def change(self, key: str, line: Line, values: dict[str, Any], note: str) -> None:
        self.map(key, line, values, note, kind="changed")

    def drop(self, key: str, line: Line, why: str) -> None:
        self.record("dropped", key, line, (), why)

    @property
    def complete(self) -> bool:
        return all(o.kind != "dropped" for o in self.outcomes)
