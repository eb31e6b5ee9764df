"""`estimate`: how much crashkernel= a capture image needs on a machine of a given size.

The model, term by term (MiB):

- the capture kernel's own floor, by the image's architecture (`KERNEL_FLOOR_MB`): on
  x86_64 a do-nothing init boots at 88M (80M fails); arm64's is fitted (below);
- the image twice: the kernel holds the compressed image while it unpacks it into the
  rootfs, so both count until the first is freed (every failure below the measured minima
  was the kernel running out of memory in that unpacking);
- the Python stage's heap beyond its files, `PYTHON_PEAK_MB` (its code is squashfs page cache
  the kernel can drop; in the guest its heap was about 4 MB while makedumpfile ran, and grew
  by 8 MB in the hash while that read 4 MiB chunks, which now reuse one 1 MiB buffer);
- makedumpfile's two page bitmaps, one bit each per 4 KiB page of the crashed machine: 64 KiB
  per GiB. makedumpfile sizes its cyclic buffer to what is free and makes more passes when
  the bitmaps do not fit, so beyond `BITMAP_CAP_MB` (512 GiB at once) the term stops
  growing and bigger machines pay in time, not memory;
- anything else that grows with the crashed machine (the capture kernel's view of
  /proc/vmcore, what makedumpfile reads per cycle): `PER_GIB_MB` per GiB, fitted to the
  curve below;
- working memory `WORKING_MB` (the page cache the dump passes through, slab), and a LUKS
  keyslot's key derivation when the image opens one;
- rounded up to the 8M steps the bench measures in.

Fit: `make bench BENCH_ONLY=curve` (Debian 6.1, TCG guests of 1, 4 and 16 GiB with 50-70% of
their memory in a filled ramdisk that the dump keeps, 8M steps, a size passing only if 3 of 3
boots saved the dump) measured the same minima at every size: static image (3.1 MB, 8.3 MB
unpacked) 96M, Python stage with Debian's python3 (5.9 MB, 11.2 MB unpacked) 104M; 88M and
96M ran out of memory. The curve is flat to 16 GiB, so `PER_GIB_MB` is 0 (8M steps cannot see
less than 0.5 MB per GiB); the bitmaps add 1 MB at 16 GiB, 4 MB at 64 GiB, 32 MB from 512
GiB. The estimate lands 16M above the static minima and 24M above the Python ones, within
the 8M to 24M the tests hold it to (tests/test_build.py).

arm64 (`make bench BENCH_ONLY=arm64`: Debian's 6.1 arm64 kernel in qemu-system-aarch64 -M virt,
1 GiB): the same configs' images, 0.93x the size, need 64M (static) and 72M (Python stage),
32M less than on x86_64 each; the arm64 floor is x86_64's less those 32M, which puts the
estimate 16M and 16M above the arm64 minima. An architecture not measured gets the highest
floor.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from kdump_mkinitrd.image.cpio import Member
from kdump_mkinitrd.image.inspect_image import load_image

KERNEL_FLOOR_MB = {"amd64": 88, "arm64": 56}
PYTHON_PEAK_MB = 8
WORKING_MB = 8
STEP_MB = 8
BITMAP_MB_PER_GIB = 1 / 16  # two bits per 4 KiB page
BITMAP_CAP_MB = 32
PER_GIB_MB = 0.0
# Opening a LUKS volume: cryptsetup itself with a PBKDF2 keyslot (2.85 MiB at most in a memory
# cgroup, Debian 6.1, cryptsetup 2.6.1: tests/test_luks_block.py), plus an argon2 keyslot's
# memory cost, read from the header at build time into the image (kdump_mkinitrd.storage.luks).
# Volumes are opened one after another.
LUKS_OPEN_MB = 3
LUKS_RECORDS = re.compile(r"etc/kdump/luks/[^/]+\.json")
GIB = 2**30


@dataclass(frozen=True)
class Estimate:
    image_mb: float
    unpacked_mb: float
    python_mb: int
    floor_mb: int
    working_mb: int
    total_mb: int
    reserved_mb: int | None
    luks_mb: int = 0  # the key derivation of the LUKS keyslots the capture opens
    machine_gib: float = 1.0  # the crashed machine's memory the estimate is for
    bitmap_mb: float = 0.0  # makedumpfile's page bitmaps for that memory
    per_gib_mb: float = 0.0  # the rest that grows with that memory

    @property
    def enough(self) -> bool | None:
        return None if self.reserved_mb is None else self.reserved_mb >= self.total_mb


def machine_terms(machine_bytes: int) -> tuple[float, float]:
    """(bitmap MiB, other per-GiB MiB) for a machine of `machine_bytes`."""
    gib = machine_bytes / GIB
    return min(gib * BITMAP_MB_PER_GIB, BITMAP_CAP_MB), gib * PER_GIB_MB


def estimate(image: Path, reserved_bytes: int | None, machine_bytes: int = GIB) -> Estimate:
    """crashkernel= needed by `image` on a machine with `machine_bytes` of RAM."""
    loaded = load_image(image)
    size = image.stat().st_size / 2**20
    unpacked = loaded.unpacked_size / 2**20
    features = {f["name"] for f in loaded.manifest.get("features", [])}
    # An image from before the manifest named its architecture gets the higher floor.
    floor = KERNEL_FLOOR_MB.get(loaded.manifest.get("arch", "amd64"), max(KERNEL_FLOOR_MB.values()))
    python = PYTHON_PEAK_MB if "python-stage" in features else 0
    luks = luks_mb(loaded.members)
    bitmap, per_gib = machine_terms(machine_bytes)
    total = floor + size + unpacked + python + WORKING_MB + luks + bitmap + per_gib
    return Estimate(
        image_mb=round(size, 2),
        unpacked_mb=round(unpacked, 2),
        python_mb=python,
        floor_mb=floor,
        working_mb=WORKING_MB,
        total_mb=int(math.ceil(total / STEP_MB) * STEP_MB),
        reserved_mb=None if reserved_bytes is None else reserved_bytes // 2**20,
        luks_mb=luks,
        machine_gib=round(machine_bytes / GIB, 2),
        bitmap_mb=round(bitmap, 3),
        per_gib_mb=round(per_gib, 3),
    )


def luks_mb(members: list[Member]) -> int:
    """The memory the dearest LUKS keyslot the image opens needs; 0 without LUKS."""
    costs = []
    for m in members:
        if LUKS_RECORDS.fullmatch(m.path):
            memory = json.loads(m.data).get("memory_kib") or 0
            costs.append(LUKS_OPEN_MB + math.ceil(int(memory) / 1024))
    return max(costs, default=0)
