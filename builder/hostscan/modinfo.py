"""Read kernel module files: decompress them and parse their ``.modinfo`` section.

The image stores every module decompressed (busybox insmod cannot inflate), so
``module_bytes`` is also what the image writer uses to obtain the bytes.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from kdump_mkinitrd.errors import KdumpError

# Longest first so "x.ko.xz" is not mistaken for a plain ".ko" by a prefix test.
MODULE_SUFFIXES: tuple[str, ...] = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


@dataclass(frozen=True)
class ModInfo:
    """The key/value pairs of one module's ``.modinfo``, in file order (keys repeat)."""

    fields: tuple[tuple[str, str], ...]

    def values(self, key: str) -> tuple[str, ...]:
        return tuple(value for k, value in self.fields if k == key)

    def first(self, key: str) -> str | None:
        found = self.values(key)
        return found[0] if found else None

    @property
    def name(self) -> str | None:
        return self.first("name")

    @property
    def vermagic(self) -> str | None:
        return self.first("vermagic")

    @property
    def depends(self) -> tuple[str, ...]:
        # One "depends=" entry holding a comma-separated list, often empty.
        names: list[str] = []
        for value in self.values("depends"):
            names.extend(part.strip() for part in value.split(",") if part.strip())
        return tuple(names)

    @property
    def aliases(self) -> tuple[str, ...]:
        return self.values("alias")

    @property
    def softdeps(self) -> tuple[str, ...]:
        """Raw softdep strings such as ``"pre: crc32c post: foo"``; see ``parse_softdep``."""
        return self.values("softdep")

    @property
    def firmware(self) -> tuple[str, ...]:
        return self.values("firmware")


def module_stem(filename: str) -> str | None:
    """``"virtio-blk.ko.xz"`` -> ``"virtio-blk"``; None if the name is not a module file."""
    for suffix in MODULE_SUFFIXES:
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)]
    return None


def is_module_file(filename: str) -> bool:
    return module_stem(filename) is not None


def normalise_name(name: str) -> str:
    """Module names treat '-' and '_' as the same character; the kernel uses '_'."""
    return name.replace("-", "_")


def module_name_from_path(path: Path | str) -> str:
    """The normalised module name a file provides, from its file name alone."""
    # os.path, not Path: depmod's files name every module of the tree (14 000 on Debian).
    filename = os.path.basename(os.fspath(path))
    stem = module_stem(filename)
    if stem is None:
        raise KdumpError(f"{path} is not a kernel module file (.ko, .ko.xz, .ko.zst, .ko.gz)")
    return normalise_name(stem)


def plain_ko_path(relpath: str) -> str:
    """``kernel/fs/ext4/ext4.ko.xz`` -> ``kernel/fs/ext4/ext4.ko`` (how the image stores it)."""
    stem = module_stem(relpath)
    if stem is None:
        raise KdumpError(f"{relpath} is not a kernel module file (.ko, .ko.xz, .ko.zst, .ko.gz)")
    return stem + ".ko"


def _decompress_zstd(raw: bytes) -> bytes:
    # kmod-compressed modules may omit the content size from the frame header,
    # which the one-shot decompress() refuses; a stream reader copes with both.
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as reader:
        return reader.read()


def module_bytes(path: Path) -> bytes:
    """The decompressed ELF bytes of a module file, whatever its compression."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KdumpError(f"cannot read kernel module {path}: {exc.strerror}") from exc
    name = path.name
    try:
        if name.endswith(".ko.xz"):
            return lzma.decompress(raw)
        if name.endswith(".ko.zst"):
            return _decompress_zstd(raw)
        if name.endswith(".ko.gz"):
            return gzip.decompress(raw)
    except (lzma.LZMAError, zstandard.ZstdError, OSError, EOFError, zlib.error) as exc:
        raise KdumpError(f"cannot decompress kernel module {path}: {exc}") from exc
    return raw


def _parse_modinfo_stream(stream: BinaryIO, origin: str) -> ModInfo:
    try:
        elf = ELFFile(stream)
        # Stop at .modinfo instead of letting get_section_by_name map every section:
        # this is the hot loop of a full module scan.
        for section in elf.iter_sections():
            if section.name == ".modinfo":
                return ModInfo(_split_modinfo(section.data()))
    except (ELFError, ValueError, OSError) as exc:
        raise KdumpError(f"cannot parse kernel module {origin}: {exc}") from exc
    return ModInfo(())


def _split_modinfo(blob: bytes) -> tuple[tuple[str, str], ...]:
    fields: list[tuple[str, str]] = []
    for entry in blob.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep:
            # Author names and descriptions are not guaranteed to be UTF-8.
            fields.append((key.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
    return tuple(fields)


def parse_modinfo(data: bytes, origin: str = "<bytes>") -> ModInfo:
    """Parse the ``.modinfo`` section of decompressed module bytes."""
    return _parse_modinfo_stream(io.BytesIO(data), origin)


def read_modinfo(path: Path) -> ModInfo:
    """The ``.modinfo`` of a module file (``.ko``, ``.ko.xz``, ``.ko.zst`` or ``.ko.gz``)."""
    if path.name.endswith(".ko"):
        # Uncompressed: let pyelftools seek in the file rather than read megabytes.
        try:
            with path.open("rb") as stream:
                return _parse_modinfo_stream(stream, str(path))
        except OSError as exc:
            raise KdumpError(f"cannot read kernel module {path}: {exc.strerror}") from exc
    return parse_modinfo(module_bytes(path), str(path))


def parse_softdep(value: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split ``"pre: a b post: c"`` into ``(("a", "b"), ("c",))``.

    Words before any ``pre:``/``post:`` marker are ignored, as modprobe does (6.1's
    cifs declares ``softdep=gcm`` and modprobe loads nothing for it).
    """
    pre: list[str] = []
    post: list[str] = []
    target: list[str] | None = None
    for word in value.split():
        if word == "pre:":
            target = pre
        elif word == "post:":
            target = post
        elif target is not None:
            target.append(word)
    return tuple(pre), tuple(post)
