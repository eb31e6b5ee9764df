"""Post-build checks on the final entries, before anything is written: an image that could
not work in the capture kernel fails the build instead of failing at the worst moment.

Checked: every symlink leads to something in the image; every ELF program's interpreter and
every library it needs by name is in the image; every kernel module's dependencies listed in
the image's modules.dep are in the image.
"""

from __future__ import annotations

import posixpath
import struct
from collections.abc import Iterable

from builder.cpio import Entry
from builder.errors import KdumpError

_ELF64_LE = b"\x7fELF\x02\x01"
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NEEDED, _DT_STRTAB = 1, 5


def _resolve(path: str, entries: dict[str, Entry], depth: int = 0) -> Entry | None:
    """Follow symlinks inside the image, for every component, as the kernel would."""
    if depth > 40:
        return None
    parts = [p for p in path.split("/") if p]
    current = ""
    for i, part in enumerate(parts):
        current = posixpath.join(current, part) if current else part
        entry = entries.get(current)
        if entry is None:
            return None
        if entry.kind == "symlink":
            target = entry.data.decode()
            base = "" if target.startswith("/") else posixpath.dirname(current)
            rest = "/".join(parts[i + 1 :])
            joined = posixpath.normpath(posixpath.join("/", base, target, rest)).lstrip("/")
            return _resolve(joined, entries, depth + 1)
    return entries.get(current)


def _elf_needs(data: bytes) -> tuple[str | None, list[str]]:
    """PT_INTERP and DT_NEEDED names, from program headers alone (images carry no sections)."""
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", data, 32)[0],
        *struct.unpack_from("<HH", data, 54),
    )
    loads, dynamic, interp = [], None, None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
        elif p_type == _PT_INTERP:
            interp = data[p_offset : p_offset + p_filesz].split(b"\0", 1)[0].decode()
    if dynamic is None:
        return interp, []
    tags = [
        struct.unpack_from("<qQ", data, off)
        for off in range(dynamic[0], dynamic[0] + dynamic[1], 16)
    ]
    strtab = next((value for tag, value in tags if tag == _DT_STRTAB), None)
    if strtab is None:
        return interp, []
    base = next(
        (off + strtab - vaddr for vaddr, off, size in loads if vaddr <= strtab < vaddr + size), None
    )
    if base is None:
        return interp, []
    names = [
        data[base + value : data.index(b"\0", base + value)].decode()
        for tag, value in tags
        if tag == _DT_NEEDED
    ]
    return interp, names


def check_image(entries: Iterable[Entry]) -> None:
    by_path = {e.path: e for e in entries}
    problems = []
    names = {posixpath.basename(p) for p in by_path}
    for path, entry in sorted(by_path.items()):
        if entry.kind == "symlink" and _resolve(path, by_path) is None:
            problems.append(f"/{path} -> {entry.data.decode()} leads nowhere in the image")
        if entry.kind != "file" or not entry.data.startswith(_ELF64_LE) or path.endswith(".ko"):
            continue
        try:
            interp, needed = _elf_needs(entry.data)
        except (struct.error, ValueError, UnicodeDecodeError):
            continue  # not a loadable ELF we can read; the loader would say more
        if interp and _resolve(interp, by_path) is None:
            problems.append(f"/{path} needs its interpreter {interp}, which is not in the image")
        problems += [
            f"/{path} needs {lib}, which is not in the image" for lib in needed if lib not in names
        ]
    for path, entry in by_path.items():
        if path.endswith("/modules.dep"):
            root = posixpath.dirname(path)
            for line in entry.data.decode().splitlines():
                for dep in line.replace(":", " ").split():
                    if _resolve(posixpath.join(root, dep), by_path) is None:
                        problems.append(
                            f"kernel module /{root}/{dep} is listed in modules.dep but missing"
                        )
    if problems:
        raise KdumpError("the image would not work:\n  " + "\n  ".join(problems[:20]))
