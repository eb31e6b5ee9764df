"""Find every file a program needs inside the initramfs, the way the dynamic loader would.

The image is built on one machine and run under the capture kernel, so we cannot ask the
loader (ldd) what it would load: we read PT_INTERP and the dynamic segment with pyelftools
and replay glibc's search rules ourselves, optionally inside a sysroot.  Only the ELF header,
the program headers, the dynamic segment and the strings it names are read, so even libc or
libLLVM cost a few dozen small reads.

Loader rules replayed here (glibc elf/dl-load.c):

* a DT_NEEDED name that matches a name or DT_SONAME already loaded in the process is reused;
* otherwise, if the needing object has no DT_RUNPATH, the DT_RPATH of that object and of each
  object that caused it to be loaded, up to the executable (an object that has DT_RUNPATH has
  its DT_RPATH ignored);
* then the DT_RUNPATH of the needing object only;
* then, unless the needing object is DF_1_NODEFLIB, the ld.so.conf directories (what
  ld.so.cache is built from) and the built-in default directories.

A candidate whose ELF class, byte order or machine differ from the program's is skipped.

The image has no ld.so.cache, through which the host's loader reads ld.so.conf: a library
found only in an ld.so.conf directory is placed in the image where its loader looks by
itself (the built-in directory libc.so.6 is in), and its own $ORIGIN is taken from there.

glibc before 2.34 keeps its NSS back ends in modules it loads with dlopen (libnss_files for
getpwuid, libnss_dns for host names), which no DT_NEEDED names: a process that maps such a
libc (told by the newest GLIBC_x.y version its libc.so.6 defines) gets them, found as libc
would find them.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import stat
from collections import deque
from collections.abc import Collection, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from elftools.common.exceptions import ELFError
from elftools.common.utils import parse_cstring_from_stream, struct_parse
from elftools.elf.elffile import ELFFile

from kdump_mkinitrd.errors import KdumpError

if TYPE_CHECKING:
    from kdump_mkinitrd.image.buildcache import StatCache

DEFAULT_SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

_ELF_MAGIC = b"\x7fELF"
# Linux gives up with ELOOP after 40 symlinks; use the same budget.
_MAX_SYMLINKS = 40
# The kernel reads at most this much of a script to find its "#!" line.
_SHEBANG_MAX = 256
_DF_1_NODEFLIB = 0x800
_GLIBC_VERSION = re.compile(r"GLIBC_(\d+(?:\.\d+)+)$")
# From 2.34 on, libc has files and dns built in; before, they are modules that glibc dlopens.
_NSS_BUILT_IN = (2, 34)
NSS_MODULES = ("libnss_files.so.2", "libnss_dns.so.2")
_EF_ARM_ABI_FLOAT_HARD = 0x400
_DST = re.compile(r"\$(?:\{(ORIGIN|LIB|PLATFORM)\}|(ORIGIN|LIB|PLATFORM)(?![A-Za-z0-9_]))")

# Debian multiarch triplets, keyed by (e_machine, ELF class, little endian).
_TRIPLETS: dict[tuple[str, int, bool], str] = {
    ("EM_X86_64", 64, True): "x86_64-linux-gnu",
    ("EM_X86_64", 32, True): "x86_64-linux-gnux32",
    ("EM_386", 32, True): "i386-linux-gnu",
    ("EM_AARCH64", 64, True): "aarch64-linux-gnu",
    ("EM_AARCH64", 64, False): "aarch64_be-linux-gnu",
    ("EM_PPC64", 64, True): "powerpc64le-linux-gnu",
    ("EM_PPC64", 64, False): "powerpc64-linux-gnu",
    ("EM_PPC", 32, False): "powerpc-linux-gnu",
    ("EM_S390", 64, False): "s390x-linux-gnu",
    ("EM_RISCV", 64, True): "riscv64-linux-gnu",
    ("EM_MIPS", 64, True): "mips64el-linux-gnuabi64",
    ("EM_MIPS", 64, False): "mips64-linux-gnuabi64",
    ("EM_MIPS", 32, True): "mipsel-linux-gnu",
    ("EM_MIPS", 32, False): "mips-linux-gnu",
    ("EM_LOONGARCH", 64, True): "loongarch64-linux-gnu",
    ("EM_SPARCV9", 64, False): "sparc64-linux-gnu",
    ("EM_ALPHA", 64, True): "alpha-linux-gnu",
}

# $PLATFORM is AT_PLATFORM, which the kernel picks at run time; only these machines report
# a constant value, so rpath entries using $PLATFORM elsewhere are dropped.
_PLATFORMS: dict[tuple[str, int], str] = {
    ("EM_X86_64", 64): "x86_64",
    ("EM_AARCH64", 64): "aarch64",
}


@dataclass(frozen=True)
class ElfFile:
    """A regular file to copy into the image."""

    path: str
    source: Path
    why: str


@dataclass(frozen=True)
class Symlink:
    """A symlink met while resolving a needed path; recreated as is in the image."""

    path: str
    target: str


@dataclass(frozen=True)
class BinaryClosure:
    """Everything needed to run the requested programs, in discovery order."""

    files: tuple[ElfFile, ...]
    symlinks: tuple[Symlink, ...]


@dataclass(frozen=True)
class _ElfInfo:
    elfclass: int
    little_endian: bool
    machine: str
    flags: int
    interpreter: str | None
    needed: tuple[str, ...]
    rpath: str | None
    runpath: str | None
    soname: str | None
    nodeflib: bool
    versions: tuple[str, ...] = ()  # symbol versions the object defines (DT_VERDEF)

    @property
    def abi(self) -> tuple[int, bool, str]:
        return (self.elfclass, self.little_endian, self.machine)

    @property
    def glibc_version(self) -> tuple[int, ...] | None:
        """For glibc's libc.so.6: its release, the newest GLIBC_x.y version it defines."""
        if self.soname != "libc.so.6":
            return None
        found = [_GLIBC_VERSION.match(v) for v in self.versions]
        numbers = [tuple(int(n) for n in m.group(1).split(".")) for m in found if m]
        return max(numbers) if numbers else None

    @property
    def needs_nss_modules(self) -> bool:
        version = self.glibc_version
        return version is not None and version < _NSS_BUILT_IN


@dataclass(frozen=True)
class _Walked:
    """A path resolved inside the root: its symlink-free form and the links crossed."""

    real: str
    links: tuple[Symlink, ...]
    is_dir: bool
    is_reg: bool


@dataclass(frozen=True)
class _Loaded:
    """An object mapped in one simulated process."""

    found: str  # the path the loader opened; $ORIGIN of a library derives from it unresolved
    real: str
    info: _ElfInfo
    origin: str
    loader: _Loaded | None
    display: str


class _Accumulator:
    """Collects files and symlinks in first-seen order, without duplicates."""

    def __init__(self) -> None:
        self.files: dict[str, ElfFile] = {}
        self.symlinks: dict[str, Symlink] = {}

    def add_links(self, links: Iterable[Symlink]) -> None:
        for link in links:
            self.symlinks.setdefault(link.path, link)

    def add_file(self, path: str, source: Path, why: str) -> None:
        if path not in self.files:
            self.files[path] = ElfFile(path=path, source=source, why=why)

    def closure(self) -> BinaryClosure:
        return BinaryClosure(
            files=tuple(self.files.values()), symlinks=tuple(self.symlinks.values())
        )


def _multiarch_triplet(info: _ElfInfo) -> str | None:
    if info.machine == "EM_ARM" and info.elfclass == 32:
        # Both ARM ABIs share e_machine; the float ABI flag tells armhf from armel.
        hard = bool(info.flags & _EF_ARM_ABI_FLOAT_HARD)
        return "arm-linux-gnueabihf" if hard else "arm-linux-gnueabi"
    return _TRIPLETS.get((info.machine, info.elfclass, info.little_endian))


def _abi_text(info: _ElfInfo) -> str:
    order = "little" if info.little_endian else "big"
    return f"{info.machine} ({info.elfclass}-bit, {order}-endian)"


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part and part != "."]


def _join(directory: str, name: str) -> str:
    return "/" + name if directory == "/" else f"{directory}/{name}"


def _parent(path: str) -> str:
    # Physical "..": the parent of an already symlink-free path; ".." of "/" is "/".
    return posixpath.dirname(path) or "/"


def _read_cstring(stream: IO[bytes], offset: int) -> str:
    raw = parse_cstring_from_stream(stream, offset)
    if raw is None:
        raise ELFError(f"unterminated string at offset {offset}")
    return os.fsdecode(raw)


def _vaddr_to_offset(loads: list[Any], vaddr: int) -> int:
    for phdr in loads:
        if phdr["p_vaddr"] <= vaddr < phdr["p_vaddr"] + phdr["p_filesz"]:
            return int(vaddr - phdr["p_vaddr"] + phdr["p_offset"])
    raise ELFError(f"address {vaddr:#x} is not in any PT_LOAD segment")


def _read_dynamic(elf: ELFFile, stream: IO[bytes], dynamic: Any) -> list[tuple[Any, int]]:
    dyn = elf.structs.Elf_Dyn
    size = dyn.sizeof()
    entries: list[tuple[Any, int]] = []
    start = int(dynamic["p_offset"])
    for offset in range(start, start + int(dynamic["p_filesz"]) - size + 1, size):
        entry = struct_parse(dyn, stream, stream_pos=offset)
        if entry["d_tag"] == "DT_NULL":
            break
        entries.append((entry["d_tag"], int(entry["d_val"])))
    return entries


# Parsed ELF facts kept between builds, by file identity; a build sets it (None: parse).
INFO_CACHE: StatCache | None = None


def _cached_elf_info(host_path: str) -> _ElfInfo | None:
    cache = INFO_CACHE
    if cache is None:
        return _read_elf_info(host_path)
    st = os.stat(host_path)
    kept = cache.get(host_path, st)
    if isinstance(kept, dict):
        if not kept.get("elf"):
            return None
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in kept.items() if k != "elf"}  # fmt: skip
        return _ElfInfo(**fields)
    info = _read_elf_info(host_path)
    cache.put(host_path, st, {"elf": False} if info is None else {"elf": True, **asdict(info)})
    return info


def _read_elf_info(host_path: str) -> _ElfInfo | None:
    """Parse what the loader needs from an ELF file; None if the file is not ELF."""
    with open(host_path, "rb") as stream:
        if stream.read(4) != _ELF_MAGIC:
            return None
        stream.seek(0)
        elf = ELFFile(stream)
        phdr = elf.structs.Elf_Phdr
        phdrs = [
            struct_parse(phdr, stream, stream_pos=elf["e_phoff"] + i * elf["e_phentsize"])
            for i in range(elf.num_segments())
        ]
        interpreter: str | None = None
        entries: list[tuple[Any, int]] = []
        for header in phdrs:
            if header["p_type"] == "PT_INTERP":
                stream.seek(header["p_offset"])
                raw = stream.read(header["p_filesz"]).split(b"\0", 1)[0]
                interpreter = os.fsdecode(raw)
            elif header["p_type"] == "PT_DYNAMIC":
                entries = _read_dynamic(elf, stream, header)
        loads = [h for h in phdrs if h["p_type"] == "PT_LOAD"]
        strings = _dynamic_strings(stream, loads, entries)
        flags_1 = 0
        for tag, val in entries:
            if tag == "DT_FLAGS_1":
                flags_1 |= val
        return _ElfInfo(
            elfclass=elf.elfclass,
            little_endian=elf.little_endian,
            machine=str(elf["e_machine"]),
            flags=int(elf["e_flags"]),
            interpreter=interpreter,
            needed=tuple(strings.get("DT_NEEDED", [])),
            rpath=":".join(strings["DT_RPATH"]) if "DT_RPATH" in strings else None,
            runpath=":".join(strings["DT_RUNPATH"]) if "DT_RUNPATH" in strings else None,
            soname=strings["DT_SONAME"][0] if "DT_SONAME" in strings else None,
            nodeflib=bool(flags_1 & _DF_1_NODEFLIB),
            versions=_version_definitions(elf, stream, loads, entries),
        )


def _dynamic_strings(
    stream: IO[bytes], loads: list[Any], entries: list[tuple[Any, int]]
) -> dict[str, list[str]]:
    wanted = ("DT_NEEDED", "DT_RPATH", "DT_RUNPATH", "DT_SONAME")
    if not any(tag in wanted for tag, _ in entries):
        return {}
    strtab = next((val for tag, val in entries if tag == "DT_STRTAB"), None)
    if strtab is None:
        raise ELFError("dynamic segment has string entries but no DT_STRTAB")
    base = _vaddr_to_offset(loads, strtab)
    strings: dict[str, list[str]] = {}
    for tag, val in entries:
        if tag in wanted:
            strings.setdefault(str(tag), []).append(_read_cstring(stream, base + val))
    return strings


def _version_definitions(
    elf: ELFFile, stream: IO[bytes], loads: list[Any], entries: list[tuple[Any, int]]
) -> tuple[str, ...]:
    """Names of the symbol versions an object defines (DT_VERDEF; only libraries have it)."""
    tags = dict(entries)
    if "DT_VERDEF" not in tags or "DT_STRTAB" not in tags:
        return ()
    strtab = _vaddr_to_offset(loads, tags["DT_STRTAB"])
    verdef, verdaux = elf.structs.Elf_Verdef, elf.structs.Elf_Verdaux
    offset = _vaddr_to_offset(loads, tags["DT_VERDEF"])
    names: list[str] = []
    for _ in range(tags.get("DT_VERDEFNUM", 0)):
        entry = struct_parse(verdef, stream, stream_pos=offset)
        if entry["vd_cnt"]:
            aux = struct_parse(verdaux, stream, stream_pos=offset + entry["vd_aux"])
            names.append(_read_cstring(stream, strtab + aux["vda_name"]))
        if not entry["vd_next"]:
            break
        offset += entry["vd_next"]
    return tuple(names)


def _read_shebang(host_path: str) -> list[str] | None:
    with open(host_path, "rb") as stream:
        head = stream.read(_SHEBANG_MAX)
    if not head.startswith(b"#!"):
        return None
    return os.fsdecode(head[2:].split(b"\n", 1)[0]).split()


def _env_target(words: list[str]) -> str | None:
    """The program "#!/usr/bin/env [-S] [VAR=x] prog" runs, if the interpreter is env."""
    if not words or posixpath.basename(words[0]) != "env":
        return None
    return next((w for w in words[1:] if not w.startswith("-") and "=" not in w), None)


class ElfResolver:
    """Resolves programs to the files and symlinks they need, as seen under ``root``."""

    def __init__(
        self,
        root: Path = Path("/"),
        search_path: str = DEFAULT_SEARCH_PATH,
        machine: str | None = None,
    ) -> None:
        self.root = root
        self.search_path = search_path
        # The ELF machine every program must be (None: whatever the first one is); a
        # program or library of another is refused by name rather than packed.
        self.machine = machine
        self._root_str = os.fspath(root)
        self._walks: dict[str, _Walked | None] = {}
        self._infos: dict[str, _ElfInfo | None] = {}
        self._conf_dirs: tuple[str, ...] | None = None
        self._lib_dsts: dict[tuple[int, bool, str], str] = {}
        self._builtin: dict[tuple[int, bool, str], _Walked] = {}

    # --- public API -------------------------------------------------------------------

    def find_program(self, name: str) -> str:
        """Absolute path of ``name`` on the target: kept as given, or looked up on PATH."""
        if "/" in name:
            if not name.startswith("/"):
                raise KdumpError(f"program path {name!r} must be absolute or a bare name")
            walked = self._walk(name)
            if walked is None or not walked.is_reg:
                raise KdumpError(f"program {name} not found{self._where()}")
            return name
        for directory in self.search_path.split(":"):
            # Empty or relative PATH entries mean the build's cwd, which has no meaning here.
            if not directory.startswith("/"):
                continue
            candidate = _join(directory.rstrip("/") or "/", name)
            walked = self._walk(candidate)
            if walked is not None and walked.is_reg and self._executable(walked.real):
                return candidate
        raise KdumpError(f"program {name!r} not found in PATH {self.search_path}{self._where()}")

    def resolve(
        self, programs: Iterable[tuple[str, str]], provided: Collection[str] = ()
    ) -> BinaryClosure:
        """Files and symlinks needed to run each (name or path, who asked for it).

        `provided`: paths the image has anyway (busybox's applets). A script interpreter
        there, or one `#!/usr/bin/env` names that is one of them, is not packed: a script's
        `#!/bin/sh` runs busybox sh, as the init does, rather than bringing dash over it."""
        names = {posixpath.basename(p) for p in provided}
        acc = _Accumulator()
        pending = deque((name, f"requested by {who}") for name, who in programs)
        done: set[str] = set()
        while pending:
            name, why = pending.popleft()
            path = self.find_program(name)
            if path in done:
                continue
            done.add(path)
            more = self._add_program(path, why, acc)
            pending.extend((n, w) for n, w in more if n not in provided and n not in names)
        return acc.closure()

    def real_path(self, name: str) -> str:
        """The symlink-free path of program `name` inside the root (links resolved there)."""
        return self._must_walk(self.find_program(name), "program").real

    def machine_of(self, name: str) -> str:
        """The ELF machine of program `name` (EM_AARCH64, EM_X86_64, ...)."""
        program = self.find_program(name)
        info = self._info(self._must_walk(program, "program").real)
        if info is None:
            raise KdumpError(f"{program} is not an ELF file{self._where()}")
        return info.machine

    def check_machine(self, name: str) -> None:
        """Refuse program `name` if it is an ELF file of another machine than the resolver's:
        before the build runs it, as much as before it packs it."""
        program = self.find_program(name)
        real = self._must_walk(program, "program").real
        info = self._info(real)
        if info is not None:
            self._check_machine(program, real, info)

    def is_static(self, path: str) -> bool:
        """True when the program needs neither an interpreter nor shared libraries."""
        program = self.find_program(path)
        real = self._must_walk(program, "program").real
        info = self._info(real)
        if info is None:
            raise KdumpError(f"{program} is not an ELF file{self._where()}")
        self._check_machine(program, real, info)
        return info.interpreter is None and not info.needed

    # --- programs -----------------------------------------------------------------------

    def _add_program(self, path: str, why: str, acc: _Accumulator) -> list[tuple[str, str]]:
        """Add one program; return further programs (script interpreters) it needs."""
        walked = self._must_walk(path, "program")
        acc.add_links(walked.links)
        info = self._info(walked.real)
        if info is not None:
            self._add_process(path, walked, info, why, acc)
            return []
        acc.add_file(walked.real, self._host(walked.real), why)
        words = self._shebang(walked.real)
        if not words:
            return []
        if not words[0].startswith("/"):
            raise KdumpError(f"script {path} names a relative interpreter {words[0]!r}")
        more = [(words[0], f"interpreter of {path}")]
        target = _env_target(words)
        if target is not None:
            # env looks the program up at run time; the build-time PATH is our best guess.
            more.append((target, f"run by env for {path}"))
        return more

    def _add_process(
        self, path: str, walked: _Walked, info: _ElfInfo, why: str, acc: _Accumulator
    ) -> None:
        """Simulate loading one program: names and loader links are per process."""
        self._check_machine(path, walked.real, info)
        acc.add_file(walked.real, self._host(walked.real), why)
        # The kernel hands the loader the resolved executable, so $ORIGIN of the program
        # is the directory of its real path (glibc reads /proc/self/exe).
        main = _Loaded(path, walked.real, info, _parent(walked.real), None, path)
        names: set[str] = set()
        by_real: dict[str, _Loaded] = {main.real: main}
        if info.interpreter is not None:
            interp = self._add_interpreter(path, info.interpreter, acc)
            by_real.setdefault(interp.real, interp)
            names.update(n for n in (interp.found, interp.info.soname) if n)
        queue = deque([main])
        while queue:
            obj = queue.popleft()
            dlopened = NSS_MODULES if obj.info.needs_nss_modules else ()
            for name in (*obj.info.needed, *dlopened):
                if name in names:
                    continue
                found, lib_walk, lib_info, conf = self._locate(name, obj, info)
                names.add(name)
                if lib_walk.real in by_real:
                    continue  # the loader notices the same file by inode and reuses it
                origin, path = _parent(found), lib_walk.real
                if conf:
                    # Its place in the image, so that its own $ORIGIN run paths are looked
                    # up there, as the image's loader will.
                    where, placed = origin, self._builtin_dir(info)
                    acc.add_links(placed.links)
                    origin = placed.real
                    path = _join(origin, posixpath.basename(found))
                lib = _Loaded(found, lib_walk.real, lib_info, origin, obj, path)
                by_real[lib.real] = lib
                if lib_info.soname:
                    names.add(lib_info.soname)
                names.add(found)
                why = f"needed by {obj.display}"
                if name in dlopened:
                    release = ".".join(map(str, obj.info.glibc_version or ()))
                    why = (f"loaded with dlopen by glibc {release} ({obj.display}) for "
                           "getpwuid and host names: before 2.34 NSS is in modules")  # fmt: skip
                if conf:
                    why += (f"; found through /etc/ld.so.conf in {where}, placed where the "
                            "image's loader looks without an ld.so.cache")  # fmt: skip
                else:
                    acc.add_links(lib_walk.links)
                acc.add_file(path, self._host(lib.real), why)
                queue.append(lib)

    def _builtin_dir(self, main: _ElfInfo) -> _Walked:
        """Where a library found only through /etc/ld.so.conf goes in the image.

        ld.so.conf is read through ld.so.cache, which the image does not have; the image's
        loader looks by itself only in its built-in directories. The one glibc's own
        libc.so.6 is in is one of them by definition (its slibdir); without a libc there,
        the first built-in directory that exists."""
        if main.abi not in self._builtin:
            default = self._default_dirs(main)
            chosen = None
            for directory in default:
                walked = self._walk(_join(directory, "libc.so.6"))
                if walked is not None and walked.is_reg:
                    info = self._info(walked.real)
                    if info is not None and info.abi == main.abi:
                        chosen = directory
                        break
            if chosen is None:
                chosen = next((d for d in default if self._is_dir(d)), None)
            if chosen is None:
                raise KdumpError(f"no library directory of the loader exists{self._where()}")
            placed = self._walk(chosen)
            assert placed is not None  # checked just above
            self._builtin[main.abi] = placed
        return self._builtin[main.abi]

    def _add_interpreter(self, program: str, interp: str, acc: _Accumulator) -> _Loaded:
        if not interp.startswith("/"):
            raise KdumpError(f"{program} names a relative ELF interpreter {interp!r}")
        walked = self._walk(interp)
        if walked is None or not walked.is_reg:
            raise KdumpError(f"interpreter {interp} of {program} not found{self._where()}")
        info = self._info(walked.real)
        if info is None:
            raise KdumpError(f"interpreter {interp} of {program} is not an ELF file")
        self._check_machine(f"interpreter {interp} of {program}", walked.real, info)
        acc.add_links(walked.links)
        acc.add_file(walked.real, self._host(walked.real), f"interpreter of {program}")
        # ld.so has no DT_NEEDED of its own; it only matters as an already loaded name.
        return _Loaded(interp, walked.real, info, _parent(interp), None, walked.real)

    # --- library search -----------------------------------------------------------------

    def _locate(
        self, name: str, obj: _Loaded, main: _ElfInfo
    ) -> tuple[str, _Walked, _ElfInfo, bool]:
        """Where the loader finds DT_NEEDED ``name`` of ``obj`` in a process of ``main``, and
        whether only an ld.so.conf directory (not a built-in one or a run path) has it."""
        expanded = self._expand(name, obj.origin, main) if "$" in name else name
        if expanded is None:
            raise KdumpError(f"cannot expand library name {name!r} needed by {obj.display}")
        if "/" in expanded:
            return (*self._locate_path(name, expanded, obj, main), False)
        tried: list[str] = []
        # Candidates the loader passes over for their ABI; named if nothing else is found.
        other_abi: list[str] = []
        conf_only = set(self._ld_so_conf_dirs()) - set(self._default_dirs(main))
        for directory, from_conf in self._search_dirs(obj, main):
            tried.append(directory)
            candidate = _join(directory, expanded)
            walked = self._walk(candidate)
            if walked is None or not walked.is_reg:
                continue
            info = self._info(walked.real)
            if info is None:
                # glibc stops with "invalid ELF header" here rather than searching on.
                raise KdumpError(
                    f"{candidate} (for {name} needed by {obj.display}) is not an ELF file"
                )
            if info.abi == main.abi:
                return candidate, walked, info, from_conf and directory in conf_only
            other_abi.append(f"{candidate} is {_abi_text(info)}")
        skipped = f" (skipped: {'; '.join(other_abi)})" if other_abi else ""
        raise KdumpError(
            f"library {name} needed by {obj.display} ({_abi_text(main)}) not found"
            f"{self._where()}; searched {':'.join(tried)}{skipped}"
        )

    def _locate_path(
        self, name: str, path: str, obj: _Loaded, main: _ElfInfo
    ) -> tuple[str, _Walked, _ElfInfo]:
        # A relative name with a slash is opened relative to the process's cwd.
        if not path.startswith("/"):
            raise KdumpError(f"{obj.display} needs {name!r}, a path relative to the cwd")
        walked = self._walk(path)
        info = self._info(walked.real) if walked is not None and walked.is_reg else None
        if walked is None or info is None:
            raise KdumpError(f"library {path} needed by {obj.display} not found or unusable")
        if info.abi != main.abi:
            raise KdumpError(
                f"library {path} needed by {obj.display} is {_abi_text(info)}, but the "
                f"program is {_abi_text(main)}{self._where()}"
            )
        return path, walked, info

    def _search_dirs(self, obj: _Loaded, main: _ElfInfo) -> Iterator[tuple[str, bool]]:
        """Directories in the loader's order, each with whether it comes from ld.so.conf
        (reached through ld.so.cache) rather than a run path; lazy, as most names hit early."""
        seen: set[str] = set()
        for directory, from_conf in self._search_dirs_raw(obj, main):
            if directory not in seen:
                seen.add(directory)
                yield directory, from_conf

    def _search_dirs_raw(self, obj: _Loaded, main: _ElfInfo) -> Iterator[tuple[str, bool]]:
        if obj.info.runpath is None:
            ancestor: _Loaded | None = obj
            while ancestor is not None:
                # glibc drops DT_RPATH of an object that also has DT_RUNPATH.
                if ancestor.info.rpath is not None and ancestor.info.runpath is None:
                    for d in self._expand_list(ancestor.info.rpath, ancestor.origin, main):
                        yield d, False
                ancestor = ancestor.loader
        if obj.info.runpath is not None:
            for d in self._expand_list(obj.info.runpath, obj.origin, main):
                yield d, False
        if obj.info.nodeflib:
            return
        for d in self._ld_so_conf_dirs():
            yield d, True
        for d in self._default_dirs(main):
            yield d, False

    def _expand_list(self, text: str, origin: str, main: _ElfInfo) -> Iterator[str]:
        for entry in text.split(":"):
            expanded = self._expand(entry, origin, main) if "$" in entry else entry
            # glibc ignores empty entries; relative ones depend on the cwd at run time.
            if expanded and expanded.startswith("/"):
                yield expanded.rstrip("/") or "/"

    def _expand(self, text: str, origin: str, main: _ElfInfo) -> str | None:
        """Substitute $ORIGIN, $LIB, $PLATFORM; None if a value is unknown."""
        unknown = False

        def value(match: re.Match[str]) -> str:
            nonlocal unknown
            token = match.group(1) or match.group(2)
            if token == "ORIGIN":
                return origin
            if token == "LIB":
                return self._lib_dst(main)
            platform = _PLATFORMS.get((main.machine, main.elfclass))
            if platform is None:
                unknown = True
                return ""
            return platform

        expanded = _DST.sub(value, text)
        return None if unknown else expanded

    def _lib_dst(self, main: _ElfInfo) -> str:
        """$LIB is fixed when glibc is built: lib/<triplet> on Debian, lib64 or lib elsewhere."""
        if main.abi not in self._lib_dsts:
            triplet = _multiarch_triplet(main)
            if triplet and self._is_dir(f"/usr/lib/{triplet}"):
                value = f"lib/{triplet}"
            elif main.elfclass == 64 and self._is_dir("/usr/lib64"):
                value = "lib64"
            else:
                value = "lib"
            self._lib_dsts[main.abi] = value
        return self._lib_dsts[main.abi]

    def _default_dirs(self, main: _ElfInfo) -> list[str]:
        triplet = _multiarch_triplet(main)
        dirs = [f"/lib/{triplet}", f"/usr/lib/{triplet}"] if triplet else []
        if main.elfclass == 64:
            dirs += ["/lib64", "/usr/lib64"]
        return [*dirs, "/lib", "/usr/lib"]

    # --- ld.so.conf ---------------------------------------------------------------------

    def _ld_so_conf_dirs(self) -> tuple[str, ...]:
        if self._conf_dirs is None:
            dirs: list[str] = []
            self._parse_conf("/etc/ld.so.conf", dirs, set())
            self._conf_dirs = tuple(dict.fromkeys(dirs))
        return self._conf_dirs

    def _parse_conf(self, path: str, dirs: list[str], seen: set[str]) -> None:
        walked = self._walk(path)
        if walked is None or not walked.is_reg or walked.real in seen:
            return  # the seen set stops include cycles
        seen.add(walked.real)
        with open(self._host(walked.real), encoding="utf-8", errors="replace") as stream:
            lines = stream.read().splitlines()
        for raw in lines:
            words = raw.split("#", 1)[0].split()
            if not words or words[0] == "hwcap":
                continue
            if words[0] == "include":
                for pattern in words[1:]:
                    if not pattern.startswith("/"):
                        # ldconfig resolves relative includes against the including file.
                        pattern = _join(posixpath.dirname(path), pattern)
                    for included in self._glob(pattern):
                        self._parse_conf(included, dirs, seen)
                continue
            line = raw.split("#", 1)[0].strip()
            if line.startswith("/"):
                dirs.append(line.rstrip("/") or "/")

    def _glob(self, pattern: str) -> list[str]:
        """Expand a shell pattern inside the root, following symlinks inside the root too."""
        matches = ["/"]
        for part in _components(pattern):
            if not any(ch in part for ch in "*?["):
                matches = [_join(base, part) for base in matches]
                continue
            expanded: list[str] = []
            for base in matches:
                for name in self._listdir(base):
                    hidden_ok = part.startswith(".")
                    if (hidden_ok or not name.startswith(".")) and fnmatch.fnmatchcase(name, part):
                        expanded.append(_join(base, name))
            matches = expanded
        return [m for m in matches if self._walk(m) is not None]

    def _listdir(self, path: str) -> list[str]:
        walked = self._walk(path)
        if walked is None or not walked.is_dir:
            return []
        try:
            return sorted(os.listdir(self._host(walked.real)))
        except OSError:
            return []

    # --- paths inside the root ----------------------------------------------------------

    def _host(self, path: str) -> Path:
        return Path(os.path.join(self._root_str, path.lstrip("/")))

    def _check_machine(self, what: str, real: str, info: _ElfInfo) -> None:
        if self.machine is not None and info.machine != self.machine:
            raise KdumpError(
                f"{what} ({self._host(real)}) is an ELF file for {info.machine}, but the "
                f"image is for {self.machine}: every program and library must come from "
                f"a root tree of that machine{self._where()}"
            )

    def _where(self) -> str:
        return "" if self._root_str == "/" else f" under root {self._root_str}"

    def _is_dir(self, path: str) -> bool:
        walked = self._walk(path)
        return walked is not None and walked.is_dir

    def _executable(self, real: str) -> bool:
        return bool(os.stat(self._host(real)).st_mode & 0o111)

    def _must_walk(self, path: str, what: str) -> _Walked:
        walked = self._walk(path)
        if walked is None or not walked.is_reg:
            raise KdumpError(f"{what} {path} not found or not a regular file{self._where()}")
        return walked

    def _walk(self, path: str) -> _Walked | None:
        return self._walk_depth("/" + "/".join(_components(path)), 0)

    def _walk_depth(self, path: str, depth: int) -> _Walked | None:
        """Resolve ``path`` component by component, as the kernel would under a chroot.

        Each component is resolved after its parent, so an absolute link target restarts at
        the root (not the build host's /) and ".." is taken after following links.
        """
        if path in self._walks:
            return self._walks[path]
        if depth > _MAX_SYMLINKS:
            raise KdumpError(
                f"too many levels of symlinks (a loop?) resolving {path}{self._where()}"
            )
        if path == "/":
            result: _Walked | None = _Walked("/", (), True, False)
        else:
            result = self._walk_last(path, depth)
        self._walks[path] = result
        return result

    def _walk_last(self, path: str, depth: int) -> _Walked | None:
        parent_path, name = posixpath.split(path)
        parent = self._walk_depth(parent_path, depth)
        if parent is None or not parent.is_dir:
            return None
        if name == "..":
            real = _parent(parent.real)
            return _Walked(real, parent.links, True, False)
        candidate = _join(parent.real, name)
        try:
            info = os.lstat(self._host(candidate))
        except OSError:
            return None  # like the loader, treat unreadable as absent and search on
        if not stat.S_ISLNK(info.st_mode):
            return _Walked(
                candidate, parent.links, stat.S_ISDIR(info.st_mode), stat.S_ISREG(info.st_mode)
            )
        target = os.readlink(self._host(candidate))
        link = Symlink(candidate, target)
        next_path = target if target.startswith("/") else _join(parent.real, target)
        resolved = self._walk_depth("/" + "/".join(_components(next_path)), depth + 1)
        if resolved is None:
            return None
        links = tuple(dict.fromkeys((*parent.links, link, *resolved.links)))
        return _Walked(resolved.real, links, resolved.is_dir, resolved.is_reg)

    # --- file contents ------------------------------------------------------------------

    def _info(self, real: str) -> _ElfInfo | None:
        """Parsed ELF facts for a symlink-free path, read at most once per resolver (and,
        with INFO_CACHE set, once until the file changes)."""
        if real not in self._infos:
            host = os.fspath(self._host(real))
            try:
                self._infos[real] = _cached_elf_info(host)
            except (ELFError, OSError) as exc:
                raise KdumpError(f"cannot read ELF file {real}{self._where()}: {exc}") from exc
        return self._infos[real]

    def _shebang(self, real: str) -> list[str] | None:
        try:
            return _read_shebang(os.fspath(self._host(real)))
        except OSError as exc:
            raise KdumpError(f"cannot read {real}{self._where()}: {exc}") from exc
