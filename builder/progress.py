"""Progress of long work for people watching: one line on stderr as each phase starts, saying
how long the one before took. Silent when given no stream (--json, tests)."""

from __future__ import annotations

import time
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, prefix: str = "qemu-test") -> None:
        self.stream, self.prefix = stream, prefix
        self.current: str | None = None
        self._since = time.monotonic()

    def _say(self, text: str) -> None:
        if self.stream is not None:
            print(f"{self.prefix}: {text}", file=self.stream, flush=True)

    def phase(self, name: str) -> None:
        """`name` starts now; the phase before it ends."""
        now = time.monotonic()
        took = f" ({self.current} took {now - self._since:.1f}s)" if self.current else ""
        self._say(f"{name}{took}")
        self.current, self._since = name, now

    def detail(self, text: str) -> None:
        """A line of what the current phase shows (the capture kernel's own log)."""
        self._say(f"  | {text}")

    def done(self) -> None:
        """The last phase ends."""
        if self.current is not None:
            self._say(f"finished ({self.current} took {time.monotonic() - self._since:.1f}s)")
            self.current = None
