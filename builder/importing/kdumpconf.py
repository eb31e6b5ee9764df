"""Directives read from kdump-utils' /etc/kdump.conf, split as kdump-utils splits them
(kdump-lib-initramfs.sh): a `#` starts a comment anywhere, even inside quotes; the first word
is the directive and the rest of the line its value, trimmed; a value that starts and ends
with a double quote loses that one pair. The file is never run, so nothing here expands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kdump_mkinitrd.importing.draft import Line


@dataclass(frozen=True)
class Directive:
    where: Line  # its text as written, without its comment
    key: str
    value: str  # "" when the directive has none

    @property
    def line(self) -> int:
        return self.where.number


def parse(text: str, file: str) -> list[Directive]:
    directives = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0]
        parts = line.strip().split(None, 1)
        if not parts:
            continue
        value = parts[1].strip() if len(parts) > 1 else ""
        if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
            value = value[1:-1]
        where = Line(file, number, re.sub(r"\s+", " ", line.strip()))
        directives.append(Directive(where, parts[0], value))
    return directives
