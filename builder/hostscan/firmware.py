"""Find the firmware files kernel modules declare (``firmware=`` in ``.modinfo``).

The search follows the kernel's firmware loader: the directories
``updates/KVER``, ``updates``, ``KVER`` and the root itself, first for the plain
file in all of them, then ``.zst``, then ``.xz`` (the kernel only falls back to a
compressed name when no plain file exists anywhere).
"""

from __future__ import annotations

import io
import logging
import lzma
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import zstandard

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan.kmod import ModuleClosure

log = logging.getLogger(__name__)

DEFAULT_FIRMWARE_ROOT = Path("/lib/firmware")
COMPRESSED_SUFFIXES: tuple[str, ...] = (".zst", ".xz")


class FoundFirmware(NamedTuple):
    name: str  # as the module names it, which is also its path under /lib/firmware in the image
    path: Path  # the host file, possibly name + ".xz" or ".zst"
    module: str  # the module that needs it

    def read(self) -> bytes:
        """The bytes the image should hold: decompressed, as the kernel would load them."""
        return read_firmware(self.path)


class MissingFirmware(NamedTuple):
    name: str
    module: str


class FirmwareSet(NamedTuple):
    """Unpacks as ``found, missing``; a firmware needed by two modules appears twice."""

    found: list[FoundFirmware]
    missing: list[MissingFirmware]


def firmware_dirs(kver: str, root: Path = DEFAULT_FIRMWARE_ROOT) -> tuple[Path, ...]:
    return (root / "updates" / kver, root / "updates", root / kver, root)


def _is_safe_name(name: str) -> bool:
    # Names come from module metadata; an absolute path or ".." would escape root.
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts


def firmware_candidates(name: str, kver: str, root: Path = DEFAULT_FIRMWARE_ROOT) -> list[Path]:
    """Every path the kernel would try for ``name``, most preferred first."""
    if not _is_safe_name(name):
        return []
    dirs = firmware_dirs(kver, root)
    return [
        directory / (name + suffix) for suffix in ("", *COMPRESSED_SUFFIXES) for directory in dirs
    ]


def find_firmware(name: str, kver: str, root: Path = DEFAULT_FIRMWARE_ROOT) -> Path | None:
    """The file the kernel would load for firmware ``name``, or None."""
    for candidate in firmware_candidates(name, kver, root):
        if candidate.is_file():
            return candidate
    return None


def read_firmware(path: Path) -> bytes:
    """The firmware's bytes, decompressed when ``path`` ends in ``.xz`` or ``.zst``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KdumpError(f"cannot read firmware {path}: {exc.strerror}") from exc
    try:
        if path.name.endswith(".xz"):
            return lzma.decompress(raw)
        if path.name.endswith(".zst"):
            # Frames written by streaming tools may not record their size.
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as reader:
                return reader.read()
    except (lzma.LZMAError, zstandard.ZstdError) as exc:
        raise KdumpError(f"cannot decompress firmware {path}: {exc}") from exc
    return raw


def resolve_firmware(
    closure: ModuleClosure, kver: str, root: Path = DEFAULT_FIRMWARE_ROOT
) -> FirmwareSet:
    """Look up every firmware file the closure's modules declare.

    Missing firmware is logged as a warning and returned, never raised: many drivers
    list firmware for hardware variants the machine does not have.
    """
    found: list[FoundFirmware] = []
    missing: list[MissingFirmware] = []
    for module in closure.modules:
        for name in module.firmware:
            path = find_firmware(name, kver, root)
            if path is None:
                log.warning(
                    "firmware %s for kernel module %s not found under %s", name, module.name, root
                )
                missing.append(MissingFirmware(name, module.name))
            else:
                found.append(FoundFirmware(name, path, module.name))
    return FirmwareSet(found, missing)
