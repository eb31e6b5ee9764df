"""The cpio "newc" format the kernel unpacks as an initramfs: our own writer and reader.

Entries are written sorted by path so the same inputs always give the same bytes, with
uid/gid 0 and one mtime for everything. Regular files with identical content become hard
links, which the kernel's unpacker and GNU cpio both honour (data travels with the last link).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO, Literal

from construct import Bytes, Const, ExprAdapter, Struct

from kdump_mkinitrd.errors import KdumpError

Kind = Literal["file", "dir", "symlink", "char", "block"]

_TYPE_BITS: dict[str, int] = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
}
_KIND_OF_BITS = {bits: kind for kind, bits in _TYPE_BITS.items()}
TRAILER = "TRAILER!!!"
_ZERO_FIELDS = ("ino", "mode", "mtime", "rdevmajor", "rdevminor")
# Segments (see newc_segments) of about 1 to 4 MiB: small enough that a change recompresses
# little, large enough that zstd still finds most of what files share.
SEGMENT_MIN = 1 << 20
SEGMENT_MAX = 4 << 20
SEGMENT_CUT_ODDS = 8


def _hex8() -> ExprAdapter:
    """An unsigned integer stored as eight ASCII hex digits, as newc wants it."""
    return ExprAdapter(
        Bytes(8),
        decoder=lambda obj, ctx: int(obj, 16),
        encoder=lambda obj, ctx: b"%08X" % obj,
    )


HEADER = Struct(
    "magic" / Const(b"070701"),
    "ino" / _hex8(),
    "mode" / _hex8(),
    "uid" / _hex8(),
    "gid" / _hex8(),
    "nlink" / _hex8(),
    "mtime" / _hex8(),
    "filesize" / _hex8(),
    "devmajor" / _hex8(),
    "devminor" / _hex8(),
    "rdevmajor" / _hex8(),
    "rdevminor" / _hex8(),
    "namesize" / _hex8(),
    "check" / _hex8(),
)
HEADER_SIZE = 110


@dataclass(frozen=True)
class Entry:
    """One member of the archive. `data` holds file content, or the target of a symlink."""

    path: str
    kind: Kind
    mode: int = 0o644
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.path.startswith("/") or not self.path or ".." in self.path.split("/"):
            raise KdumpError(f"cpio entry path must be relative and stay inside: {self.path!r}")


@dataclass(frozen=True)
class Member:
    """An entry as read back, with the header fields a test or `inspect` wants to see."""

    path: str
    kind: Kind
    mode: int
    data: bytes
    rdev: tuple[int, int]
    ino: int
    nlink: int
    mtime: int
    uid: int
    gid: int


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _sort_key(path: str) -> tuple[str, ...]:
    # Sorting by components puts every directory before what it contains.
    return tuple(path.split("/"))


def _record(out: BinaryIO, name: str, fields: dict[str, int], data: bytes) -> None:
    encoded = name.encode() + b"\0"
    header = HEADER.build(
        dict(
            fields,
            uid=0,
            gid=0,
            devmajor=0,
            devminor=0,
            namesize=len(encoded),
            check=0,
            filesize=len(data),
        )
    )
    out.write(header + encoded + b"\0" * _pad4(HEADER_SIZE + len(encoded)))
    out.write(data + b"\0" * _pad4(len(data)))


def _content_key(entry: Entry) -> bytes | None:
    if entry.kind != "file" or not entry.data:
        return None
    return hashlib.sha256(entry.data).digest() + entry.mode.to_bytes(4, "little")


def _ordered(entries: Iterable[Entry]) -> list[Entry]:
    ordered = sorted(entries, key=lambda e: _sort_key(e.path))
    for before, entry in itertools.pairwise(ordered):
        if entry.path == before.path:
            raise KdumpError(f"two image entries claim the same path {entry.path!r}")
    return ordered


def _write_archive(ordered: list[Entry], out: BinaryIO, mtime: int) -> None:
    groups: dict[bytes, list[Entry]] = {}
    keys = [_content_key(entry) for entry in ordered]
    for entry, key in zip(ordered, keys, strict=True):
        if key is not None:
            groups.setdefault(key, []).append(entry)
    inode_of: dict[bytes, int] = {}
    for ino, (entry, key) in enumerate(zip(ordered, keys, strict=True), start=1):
        group = groups[key] if key is not None else [entry]
        # Identical files share the inode of the first; only the last carries the data.
        ino = inode_of.setdefault(key, ino) if key is not None else ino
        is_file = entry.kind == "file"
        _record(
            out,
            entry.path,
            {
                "ino": ino,
                "mode": _TYPE_BITS[entry.kind] | (entry.mode & 0o7777),
                "nlink": len(group) if is_file else (2 if entry.kind == "dir" else 1),
                "mtime": mtime,
                "rdevmajor": entry.rdev[0],
                "rdevminor": entry.rdev[1],
            },
            entry.data if not is_file or group[-1] is entry else b"",
        )
    _record(out, TRAILER, dict.fromkeys(_ZERO_FIELDS, 0) | {"nlink": 1}, b"")


def write_newc(entries: Iterable[Entry], out: BinaryIO, mtime: int = 0) -> None:
    """Write `entries` as one newc archive with a trailer. Duplicate paths are an error."""
    _write_archive(_ordered(entries), out, mtime)


def _boundary(path: str) -> bool:
    # Decided by the path alone, so that a file added or dropped moves only the cut next to
    # it and every other segment keeps its bytes (and its cached compressed form).
    return hashlib.sha256(path.encode()).digest()[0] < 256 // SEGMENT_CUT_ODDS


def newc_segments(entries: Iterable[Entry], mtime: int = 0) -> list[bytes]:
    """`entries` as a list of complete newc archives (each with its trailer) which, unpacked
    one after the other as the kernel does with concatenated archives, give the same tree as
    one archive. The first holds every directory, symlink and device node, so that each
    file's directory exists before any segment creates it; the files follow in path order,
    cut where a path's hash says so (once a segment holds SEGMENT_MIN bytes) or at
    SEGMENT_MAX bytes. Hard links stay inside a segment (the kernel forgets inode numbers
    at each trailer): identical files in two segments are stored twice."""
    ordered = _ordered(entries)
    segments = [[e for e in ordered if e.kind != "file"]]
    current: list[Entry] = []
    size = 0
    for entry in (e for e in ordered if e.kind == "file"):
        current.append(entry)
        size += HEADER_SIZE + len(entry.path) + len(entry.data)
        if size >= SEGMENT_MAX or (size >= SEGMENT_MIN and _boundary(entry.path)):
            segments.append(current)
            current, size = [], 0
    if current:
        segments.append(current)
    out = []
    for members in segments:
        buf = io.BytesIO()
        _write_archive(members, buf, mtime)
        out.append(buf.getvalue())
    return out


def _read_archive(blob: bytes, pos: int) -> tuple[list[Member], int]:
    """The members of the archive starting at `pos`, and where its trailer ends."""
    members: list[Member] = []
    while True:
        if pos + HEADER_SIZE > len(blob):
            raise KdumpError(f"cpio archive truncated at offset {pos} (no trailer)")
        try:
            header = HEADER.parse(blob[pos : pos + HEADER_SIZE])
        except Exception as exc:  # construct raises many types; all mean "not newc here"
            raise KdumpError(f"not a newc cpio header at offset {pos}: {exc}") from None
        name_start = pos + HEADER_SIZE
        name_end = name_start + header.namesize
        data_start = name_end + _pad4(HEADER_SIZE + header.namesize)
        data_end = data_start + header.filesize
        if header.namesize < 1 or data_end > len(blob):
            raise KdumpError(f"cpio entry at offset {pos} runs past the end of the archive")
        name = blob[name_start : name_end - 1].decode(errors="replace")
        pos = data_end + _pad4(header.filesize)
        if name == TRAILER:
            return members, pos
        kind = _KIND_OF_BITS.get(stat.S_IFMT(header.mode))
        if kind is None:
            raise KdumpError(f"cpio entry {name!r} has an unsupported type {header.mode:o}")
        members.append(
            Member(
                path=name,
                kind=kind,  # type: ignore[arg-type]
                mode=header.mode & 0o7777,
                data=blob[data_start:data_end],
                rdev=(header.rdevmajor, header.rdevminor),
                ino=header.ino,
                nlink=header.nlink,
                mtime=header.mtime,
                uid=header.uid,
                gid=header.gid,
            )
        )


def archive_end(blob: bytes) -> int:
    """Where the newc archive at the start of `blob` ends (after its trailer's padding)."""
    return _read_archive(blob, 0)[1]


def split_archives(blob: bytes) -> list[bytes]:
    """Each archive of concatenated newc archives, as the kernel reads them: zero bytes
    between archives are padding."""
    archives = []
    pos = 0
    while True:
        while pos < len(blob) and blob[pos] == 0:
            pos += 1
        if pos == len(blob):
            break
        _, end = _read_archive(blob, pos)
        archives.append(blob[pos:end])
        pos = end
    if not archives:
        raise KdumpError("no cpio archive: the data is empty")
    return archives


def read_newc(blob: bytes) -> list[Member]:
    """All members of one newc archive or of several concatenated ones, with hard-linked
    files given the content their inode carries (inode numbers count within an archive)."""
    result: list[Member] = []
    for archive in split_archives(blob):
        members, _ = _read_archive(archive, 0)
        content = {m.ino: m.data for m in members if m.kind == "file" and m.data}
        result += [
            Member(**{**m.__dict__, "data": content.get(m.ino, m.data)})
            if m.kind == "file" and m.nlink > 1
            else m
            for m in members
        ]
    return result
