"""How much memory this machine has: what a crash would leave in /proc/vmcore.

The firmware's memory map (/sys/firmware/memmap, x86) lists the RAM ranges the capture
kernel's ELF headers will cover, crash reservation included; where it is missing (arm64
without it, containers) MemTotal plus the crash reservation is close enough (it misses the
kernel's own early reservations, a few MB).
"""

from __future__ import annotations

import re
from pathlib import Path

SIZE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*")
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """Bytes of `512M`, `64G`, `1T`, `1.5G` or a plain byte count (binary units)."""
    match = SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 512M, 64G, 1T)")
    return int(float(match[1]) * UNITS[match[2].upper()])


def firmware_ram_bytes(memmap: Path = Path("/sys/firmware/memmap")) -> int | None:
    """Sum of the firmware's "System RAM" ranges, or None without such a map."""
    total = 0
    try:
        entries = list(memmap.iterdir())
        for entry in entries:
            if (entry / "type").read_text().strip() != "System RAM":
                continue
            start = int((entry / "start").read_text(), 16)
            end = int((entry / "end").read_text(), 16)
            total += end - start + 1
    except (OSError, ValueError):
        return None
    return total or None


def meminfo_total_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"{meminfo} has no MemTotal line")


def machine_ram_bytes(reserved_bytes: int | None) -> int:
    """This machine's RAM: the firmware map, else MemTotal plus the crash reservation."""
    found = firmware_ram_bytes()
    if found is not None:
        return found
    return meminfo_total_bytes() + (reserved_bytes or 0)
