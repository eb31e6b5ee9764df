"""Post-build checks on the final entries, before anything is written: an image that could
not work in the capture kernel fails the build instead of failing at the worst moment.

Checked: every symlink leads to something in the image; every ELF program's interpreter and
every library it needs by name is in the image, in a directory the image's loader searches
without an ld.so.cache (the image has none): a run path of an object in the image, or a
built-in library directory; every kernel module's dependencies listed in the image's
modules.dep are in the image; every ELF file (program, library, kernel module) is of one
machine, the one the image is for when the build says.
"""

from __future__ import annotations

import posixpath
import re
import struct
from collections.abc import Iterable

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.cpio import Entry

_ELF64_LE = b"\x7fELF\x02\x01"
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NEEDED, _DT_STRTAB, _DT_RPATH, _DT_RUNPATH = 1, 5, 15, 29
# glibc's built-in directories, over the layouts it is built for (Debian's multiarch,
# lib64, plain lib); whichever one the image's loader uses, a library elsewhere with no run
# path naming its directory is found only through an ld.so.cache.
_BUILTIN_DIRS = ("/lib64", "/usr/lib64", "/lib", "/usr/lib")
# e_machine numbers, named as pyelftools (and so the resolver) names them.
MACHINES = {3: "EM_386", 62: "EM_X86_64", 40: "EM_ARM", 183: "EM_AARCH64", 21: "EM_PPC64",
            22: "EM_S390", 243: "EM_RISCV", 258: "EM_LOONGARCH"}  # fmt: skip
_MULTIARCH = re.compile(r"^/(usr/)?lib/[a-z0-9_]+-linux-gnu[a-z0-9_]*$")


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


def _elf_dynamic(data: bytes) -> tuple[str | None, list[tuple[int, str]]]:
    """PT_INTERP, and the dynamic entries that name strings (DT_NEEDED, run paths), from
    program headers alone (images carry no sections)."""
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
    named = (_DT_NEEDED, _DT_RPATH, _DT_RUNPATH)
    entries = [
        (tag, data[base + value : data.index(b"\0", base + value)].decode())
        for tag, value in tags
        if tag in named
    ]
    return interp, entries


def _run_path_dirs(path: str, entries: list[tuple[int, str]]) -> tuple[set[str], bool]:
    """Directories an object's run paths name ($ORIGIN taken as its directory in the image);
    and whether one uses a token this check cannot expand ($LIB, $PLATFORM)."""
    dirs: set[str] = set()
    opaque = False
    origin = posixpath.dirname("/" + path)
    for tag, text in entries:
        if tag not in (_DT_RPATH, _DT_RUNPATH):
            continue
        for entry in text.split(":"):
            entry = entry.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
            if "$" in entry:
                opaque = True
            elif entry.startswith("/"):
                dirs.add(posixpath.normpath(entry))
    return dirs, opaque


def _loader_finds(lib: str, dirs: Iterable[str], entries: dict[str, Entry]) -> bool:
    if "/" in lib:
        return _resolve(lib, entries) is not None
    return any(_resolve(posixpath.join(d, lib), entries) is not None for d in dirs)


def elf_machine(data: bytes) -> str | None:
    """The ELF machine of a file's bytes (EM_AARCH64, ...); None when it is not ELF."""
    if len(data) < 20 or not data.startswith(b"\x7fELF") or data[5] not in (1, 2):
        return None
    (number,) = struct.unpack_from("<H" if data[5] == 1 else ">H", data, 18)
    return MACHINES.get(number, f"e_machine {number}")


def _machine_problems(by_path: dict[str, Entry], machine: str | None) -> list[str]:
    found: dict[str, list[str]] = {}
    for path, entry in sorted(by_path.items()):
        # Firmware is code for a device's own processor, whatever the host CPU is.
        firmware = path.startswith(("lib/firmware/", "usr/lib/firmware/"))
        kind = elf_machine(entry.data) if entry.kind == "file" and not firmware else None
        if kind is not None:
            found.setdefault(kind, []).append("/" + path)
    wanted = machine or (max(found, key=lambda k: len(found[k])) if found else None)
    return [
        f"{', '.join(paths[:5])}{' and others' if len(paths) > 5 else ''} "
        f"{'is' if len(paths) == 1 else 'are'} {kind}, but the image is for {wanted}"
        for kind, paths in sorted(found.items())
        if kind != wanted
    ]


def check_image(entries: Iterable[Entry], machine: str | None = None) -> None:
    """`machine`: the ELF machine every ELF file must be (None: the one most of them are)."""
    by_path = {e.path: e for e in entries}
    problems = _machine_problems(by_path, machine)
    names: dict[str, list[str]] = {}
    for p in sorted(by_path):
        names.setdefault(posixpath.basename(p), []).append("/" + p)
    elves: dict[str, tuple[str | None, list[tuple[int, str]]]] = {}
    for path, entry in sorted(by_path.items()):
        if entry.kind == "symlink" and _resolve(path, by_path) is None:
            problems.append(f"/{path} -> {entry.data.decode()} leads nowhere in the image")
        if entry.kind != "file" or not entry.data.startswith(_ELF64_LE) or path.endswith(".ko"):
            continue
        try:
            elves[path] = _elf_dynamic(entry.data)
        except (struct.error, ValueError, UnicodeDecodeError):
            continue  # not a loadable ELF we can read; the loader would say more
    # A library may be found through the run path of whichever object loaded it (DT_RPATH
    # is inherited): any run path in the image counts, as do the built-in directories.
    search = set(_BUILTIN_DIRS)
    search |= {d for d in (posixpath.dirname("/" + p) for p in by_path) if _MULTIARCH.match(d)}
    opaque = False
    for path, (_, dynamic) in elves.items():
        dirs, unknown = _run_path_dirs(path, dynamic)
        search |= dirs
        opaque = opaque or unknown
    for path, (interp, dynamic) in elves.items():
        if interp and _resolve(interp, by_path) is None:
            problems.append(f"/{path} needs its interpreter {interp}, which is not in the image")
        for lib in (value for tag, value in dynamic if tag == _DT_NEEDED):
            if posixpath.basename(lib) not in names:
                problems.append(f"/{path} needs {lib}, which is not in the image")
            elif not opaque and not _loader_finds(lib, search, by_path):
                problems.append(
                    f"/{path} needs {lib}, which is only at"
                    f" {', '.join(names[posixpath.basename(lib)])}: the loader"
                    " does not look there without an ld.so.cache, which the image has not"
                )
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
