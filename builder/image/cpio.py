"""The cpio "newc" format the kernel unpacks as an initramfs: our own writer and reader.

Entries are written sorted by path so the same inputs always give the same bytes, with
uid/gid 0 and one mtime for everything. Regular files with identical content become hard
links, which the kernel's unpacker and GNU cpio both honour (data travels with the last link).
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Iterable, Iterator
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


def write_newc(entries: Iterable[Entry], out: BinaryIO, mtime: int = 0) -> None:
    """Write `entries` as one newc archive with a trailer. Duplicate paths are an error."""
    ordered = sorted(entries, key=lambda e: _sort_key(e.path))
    groups: dict[bytes, list[Entry]] = {}
    previous = None
    for entry in ordered:
        if entry.path == previous:
            raise KdumpError(f"two image entries claim the same path {entry.path!r}")
        previous = entry.path
        key = _content_key(entry)
        if key is not None:
            groups.setdefault(key, []).append(entry)
    inode_of: dict[bytes, int] = {}
    for ino, entry in enumerate(ordered, start=1):
        key = _content_key(entry)
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


def iter_newc(blob: bytes) -> Iterator[Member]:
    """Read members up to the trailer; a truncated or corrupt archive raises KdumpError."""
    pos = 0
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
            return
        kind = _KIND_OF_BITS.get(stat.S_IFMT(header.mode))
        if kind is None:
            raise KdumpError(f"cpio entry {name!r} has an unsupported type {header.mode:o}")
        yield Member(
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


def read_newc(blob: bytes) -> list[Member]:
    """All members, with hard-linked files given the content their inode carries."""
    members = list(iter_newc(blob))
    content: dict[int, bytes] = {m.ino: m.data for m in members if m.kind == "file" and m.data}
    return [
        Member(**{**m.__dict__, "data": content.get(m.ino, m.data)})
        if m.kind == "file" and m.nlink > 1
        else m
        for m in members
    ]
