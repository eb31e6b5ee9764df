"""Read an ELF64 kernel core (/proc/vmcore or a saved copy) in pure Python.

Runs in the capture initramfs: imports only os and struct.  Everything malformed or
unreadable in the input is reported as `VmcoreError`; no other exception type is meant
to escape for bad input (an OSError from the caller's own file descriptor aside).
"""

from __future__ import annotations

import os
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType

PT_LOAD = 1
PT_NOTE = 4
ET_CORE = 4
PN_XNUM = 0xFFFF
EHDR_SIZE = 64
PHDR_SIZE = 56
# e_machine values of 32-bit kernels that still write ELF64 vmcore headers (long is 4 bytes).
_ILP32_MACHINES = (3, 20, 40)  # EM_386, EM_PPC, EM_ARM
_MAX_PHNUM = 1 << 20
_MAX_NOTE_BYTES = 64 << 20
_MAX_READ = 1 << 31
_UNKNOWN_SIZE_CHUNK = 16 << 20


class VmcoreError(Exception):
    """The vmcore is malformed or truncated, or an address is not in it."""


class Segment:
    """One program header."""

    __slots__ = ("align", "filesz", "flags", "memsz", "offset", "paddr", "type", "vaddr")

    def __init__(
        self,
        type: int,
        flags: int,
        offset: int,
        vaddr: int,
        paddr: int,
        filesz: int,
        memsz: int,
        align: int,
    ) -> None:
        self.type = type
        self.flags = flags
        self.offset = offset
        self.vaddr = vaddr
        self.paddr = paddr
        self.filesz = filesz
        self.memsz = memsz
        self.align = align

    def __repr__(self) -> str:
        return (
            f"Segment(type={self.type}, offset={self.offset:#x}, vaddr={self.vaddr:#x}, "
            f"paddr={self.paddr:#x}, filesz={self.filesz:#x}, memsz={self.memsz:#x})"
        )


class Note:
    """One ELF note: name without its NUL, type, descriptor bytes."""

    __slots__ = ("desc", "name", "type")

    def __init__(self, name: bytes, type: int, desc: bytes) -> None:
        self.name = name
        self.type = type
        self.desc = desc

    def __repr__(self) -> str:
        return f"Note({self.name!r}, type={self.type}, {len(self.desc)} bytes)"


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse_notes(data: bytes, endian: str = "<") -> list[Note]:
    """Split the contents of a PT_NOTE segment into notes (4-byte aligned, ELF64 core style)."""
    notes: list[Note] = []
    hdr = struct.Struct(endian + "III")
    pos = 0
    end = len(data)
    while pos + 12 <= end:
        namesz, descsz, ntype = hdr.unpack_from(data, pos)
        if namesz == 0:
            break  # zero padding after the last note, as the kernel treats it
        desc_off = pos + 12 + _align4(namesz)
        desc_end = desc_off + descsz
        if desc_end > end:
            raise VmcoreError(f"note at +{pos:#x} runs past the end of its segment")
        name = data[pos + 12 : pos + 12 + namesz].split(b"\0", 1)[0]
        notes.append(Note(name, ntype, data[desc_off:desc_end]))
        pos = desc_off + _align4(descsz)
    return notes


def parse_vmcoreinfo(desc: bytes) -> dict[str, str]:
    """KEY=VALUE lines of a VMCOREINFO note; text after a NUL is ignored."""
    text = desc.split(b"\0", 1)[0].decode("latin-1")
    info: dict[str, str] = {}
    for line in text.split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            info[key.strip()] = value.strip()
    return info


class Vmcore:
    """An ELF64 core file opened on a file descriptor.

    `read(vaddr, size)` and `read_phys(paddr, size)` go through the PT_LOAD segments;
    bytes between p_filesz and p_memsz read as zeros.  The VMCOREINFO note is parsed
    into `vmcoreinfo` with typed helpers (`symbol`, `size`, `offset`, ...).
    """

    def __init__(
        self,
        fd: int,
        name: str = "vmcore",
        *,
        require_vmcoreinfo: bool = True,
    ) -> None:
        self.fd = fd
        self.name = name
        self._owned = False
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            raise VmcoreError(f"{name}: cannot stat: {e.strerror}") from None
        # /proc/vmcore and saved copies report their size; 0 means unknown (devices, pipes).
        self.file_size: int = size if size > 0 else 0

        ehdr = self.pread(0, EHDR_SIZE, "ELF header")
        if ehdr[:4] != b"\x7fELF":
            raise VmcoreError(f"{name}: not an ELF file")
        if ehdr[4] != 2:
            raise VmcoreError(f"{name}: not ELF64 (class {ehdr[4]})")
        if ehdr[5] == 1:
            self.endian = "<"
        elif ehdr[5] == 2:
            self.endian = ">"
        else:
            raise VmcoreError(f"{name}: bad ELF data encoding {ehdr[5]}")
        self.ehdr = ehdr
        (
            e_type,
            self.machine,
            _version,
            _entry,
            phoff,
            shoff,
            _flags,
            _ehsize,
            phentsize,
            phnum,
            _shentsize,
            _shnum,
            _shstrndx,
        ) = struct.unpack_from(self.endian + "HHIQQQIHHHHHH", ehdr, 16)
        if e_type != ET_CORE:
            raise VmcoreError(f"{name}: ELF type {e_type} is not ET_CORE")
        self.ptr_size = 4 if self.machine in _ILP32_MACHINES else 8
        if phnum == PN_XNUM:
            # The real count is in section header 0's sh_info.
            if not shoff:
                raise VmcoreError(f"{name}: e_phnum is PN_XNUM but there is no section header")
            (phnum,) = struct.unpack(self.endian + "I", self.pread(shoff + 44, 4, "sh_info"))
        if phnum == 0:
            raise VmcoreError(f"{name}: no program headers")
        if phentsize < PHDR_SIZE:
            raise VmcoreError(f"{name}: e_phentsize {phentsize} is too small")
        if phnum > _MAX_PHNUM or phnum * phentsize > _MAX_NOTE_BYTES:
            raise VmcoreError(
                f"{name}: {phnum} program headers of {phentsize} bytes is implausible"
            )
        table = self.pread(phoff, phnum * phentsize, "program headers")

        phdr = struct.Struct(self.endian + "IIQQQQQQ")
        self.segments: list[Segment] = []
        for i in range(phnum):
            seg = Segment(*phdr.unpack_from(table, i * phentsize))
            if seg.type == PT_LOAD and seg.filesz > seg.memsz:
                raise VmcoreError(f"{name}: PT_LOAD {i} has p_filesz > p_memsz")
            self.segments.append(seg)
        self.loads = [s for s in self.segments if s.type == PT_LOAD]
        self.note_segments = [s for s in self.segments if s.type == PT_NOTE]

        self.notes: list[Note] = []
        total = 0
        for seg in self.note_segments:
            total += seg.filesz
            if total > _MAX_NOTE_BYTES:
                raise VmcoreError(f"{name}: notes larger than {_MAX_NOTE_BYTES} bytes")
            blob = self.pread(seg.offset, seg.filesz, "notes")
            try:
                self.notes.extend(parse_notes(blob, self.endian))
            except VmcoreError as e:
                raise VmcoreError(f"{name}: {e}") from None

        self.vmcoreinfo: dict[str, str] = {}
        self.vmcoreinfo_raw = b""
        for note in self.notes:
            if note.name == b"VMCOREINFO":
                self.vmcoreinfo_raw = note.desc
                self.vmcoreinfo = parse_vmcoreinfo(note.desc)
                break
        else:
            if require_vmcoreinfo:
                raise VmcoreError(f"{name}: no VMCOREINFO note")

        self._index: dict[bool, tuple[list[int], list[int], list[Segment]]] = {}
        self._last: dict[bool, Segment] = {}

    # -- file handling -------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, require_vmcoreinfo: bool = True) -> Vmcore:
        """Open `path` read-only; the returned object owns (and closes) the descriptor."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise VmcoreError(f"{path}: {e.strerror}") from None
        try:
            core = cls(fd, path, require_vmcoreinfo=require_vmcoreinfo)
        except BaseException:
            os.close(fd)
            raise
        core._owned = True
        return core

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Vmcore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def pread(self, offset: int, size: int, what: str = "data") -> bytes:
        """Exactly `size` bytes at file `offset`, or VmcoreError (truncated file, I/O error)."""
        if size <= 0:
            return b""
        if offset < 0 or (self.file_size and offset + size > self.file_size):
            raise VmcoreError(
                f"{self.name}: {what} at offset {offset:#x}+{size:#x} is past the end of the file"
            )
        parts: list[bytes] = []
        got = 0
        while got < size:
            want = size - got
            if not self.file_size:
                want = min(want, _UNKNOWN_SIZE_CHUNK)
            try:
                block = os.pread(self.fd, want, offset + got)
            except OSError as e:
                raise VmcoreError(
                    f"{self.name}: reading {what} at offset {offset + got:#x}: {e.strerror}"
                ) from None
            except (OverflowError, ValueError) as e:
                raise VmcoreError(f"{self.name}: {what} at offset {offset:#x}: {e}") from None
            if not block:
                raise VmcoreError(
                    f"{self.name}: {what} at offset {offset + got:#x}: end of the file"
                )
            parts.append(block)
            got += len(block)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- VMCOREINFO ----------------------------------------------------------------------

    def has(self, key: str) -> bool:
        """Whether VMCOREINFO has `key` (e.g. "SYMBOL(prb)")."""
        return key in self.vmcoreinfo

    def _int(self, key: str, base: int, default: int | None) -> int:
        value = self.vmcoreinfo.get(key)
        if value is None:
            if default is None:
                raise VmcoreError(f"{self.name}: VMCOREINFO has no {key}")
            return default
        try:
            if base == 0:
                low = value.lower()
                if low.startswith(("0x", "-0x")):
                    return int(low, 16)
                return int(low, 10)
            return int(value, base)
        except ValueError:
            raise VmcoreError(f"{self.name}: VMCOREINFO {key}={value!r} is not a number") from None

    def symbol(self, name: str, default: int | None = None) -> int:
        """SYMBOL(name): an address (hex without 0x)."""
        return self._int(f"SYMBOL({name})", 16, default)

    def size(self, name: str, default: int | None = None) -> int:
        """SIZE(name): sizeof the type, decimal."""
        return self._int(f"SIZE({name})", 10, default)

    def offset(self, name: str, default: int | None = None) -> int:
        """OFFSET(struct.field), decimal."""
        return self._int(f"OFFSET({name})", 10, default)

    def length(self, name: str, default: int | None = None) -> int:
        """LENGTH(name): array length, decimal."""
        return self._int(f"LENGTH({name})", 10, default)

    def number(self, name: str, default: int | None = None) -> int:
        """NUMBER(name): decimal, or hex with 0x."""
        return self._int(f"NUMBER({name})", 0, default)

    @property
    def osrelease(self) -> str:
        return self.vmcoreinfo.get("OSRELEASE", "")

    @property
    def pagesize(self) -> int:
        """PAGESIZE, 4096 when absent."""
        size = self._int("PAGESIZE", 10, 4096)
        if size < 512 or size > (1 << 24) or size & (size - 1):
            raise VmcoreError(f"{self.name}: implausible PAGESIZE {size}")
        return size

    @property
    def crashtime(self) -> int | None:
        """CRASHTIME (seconds since the epoch), None when absent."""
        if "CRASHTIME" not in self.vmcoreinfo:
            return None
        return self._int("CRASHTIME", 10, None)

    @property
    def kerneloffset(self) -> int:
        """KERNELOFFSET (the KASLR shift, hex), 0 when absent."""
        return self._int("KERNELOFFSET", 16, 0)

    # -- memory --------------------------------------------------------------------------

    def _lookup(self, addr: int, phys: bool) -> Segment | None:
        last = self._last.get(phys)
        if last is not None:
            start = last.paddr if phys else last.vaddr
            if start <= addr < start + last.memsz:
                return last
        index = self._index.get(phys)
        if index is None:
            segs = sorted(
                (s for s in self.loads if s.memsz),
                key=lambda s: s.paddr if phys else s.vaddr,
            )
            starts = [s.paddr if phys else s.vaddr for s in segs]
            maxend: list[int] = []
            top = 0
            for s, start in zip(segs, starts, strict=True):
                top = max(top, start + s.memsz)
                maxend.append(top)
            index = self._index[phys] = (starts, maxend, segs)
        starts, maxend, segs = index
        lo, hi = 0, len(starts)
        while lo < hi:
            mid = (lo + hi) // 2
            if starts[mid] <= addr:
                lo = mid + 1
            else:
                hi = mid
        # Segments may overlap (kernel text and RAM): walk back while one could still reach.
        i = lo - 1
        while i >= 0 and maxend[i] > addr:
            s = segs[i]
            if addr < starts[i] + s.memsz:
                self._last[phys] = s
                return s
            i -= 1
        return None

    def _read(self, addr: int, size: int, phys: bool) -> bytes:
        if size < 0 or size > _MAX_READ:
            raise VmcoreError(f"{self.name}: read of {size} bytes refused")
        parts: list[bytes] = []
        while size > 0:
            seg = self._lookup(addr, phys)
            if seg is None:
                kind = "physical" if phys else "virtual"
                raise VmcoreError(f"{self.name}: {kind} address {addr:#x} is not in the dump")
            rel = addr - (seg.paddr if phys else seg.vaddr)
            n = min(size, seg.memsz - rel)
            if rel < seg.filesz:
                m = min(n, seg.filesz - rel)
                parts.append(self.pread(seg.offset + rel, m, f"memory at {addr:#x}"))
                if n > m:
                    parts.append(bytes(n - m))
            else:
                parts.append(bytes(n))
            addr += n
            size -= n
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def read(self, vaddr: int, size: int) -> bytes:
        """`size` bytes at kernel virtual address `vaddr` (through PT_LOAD p_vaddr)."""
        return self._read(vaddr, size, False)

    def read_phys(self, paddr: int, size: int) -> bytes:
        """`size` bytes at physical address `paddr` (through PT_LOAD p_paddr)."""
        return self._read(paddr, size, True)

    def is_mapped(self, vaddr: int) -> bool:
        return self._lookup(vaddr, False) is not None

    def read_ulong(self, vaddr: int) -> int:
        """A C `unsigned long` (4 or 8 bytes depending on the machine)."""
        fmt = self.endian + ("I" if self.ptr_size == 4 else "Q")
        return int(struct.unpack(fmt, self.read(vaddr, self.ptr_size))[0])

    def read_u32(self, vaddr: int) -> int:
        return int(struct.unpack(self.endian + "I", self.read(vaddr, 4))[0])

    def read_u64(self, vaddr: int) -> int:
        return int(struct.unpack(self.endian + "Q", self.read(vaddr, 8))[0])
