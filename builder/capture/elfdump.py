"""The native collector: copy a vmcore as ELF64, leaving out all-zero pages.

Each input PT_LOAD becomes a sequence of output PT_LOADs that maps exactly the same
virtual and physical ranges: data segments (p_filesz == p_memsz) for runs of pages
that hold data, and segments with p_filesz 0 (only p_memsz) for the runs of zero pages
left out, which every reader (makedumpfile, crash, gdb, our Vmcore) reads as zeros.
Zero runs shorter than `merge_pages` are written as data to keep the number of program
headers small; the threshold grows when needed to keep e_phnum below 65535.  PT_NOTEs
are copied unchanged and come first.

Why not a data segment with p_memsz > p_filesz for the zeros that follow it:
makedumpfile 1.7.2 mmap()s the file from a page to p_offset + p_memsz and caches that
window as physically contiguous, so the zeros would be read from the next segment's
data.  The zero-only segments get p_offset = the end of the data for the same reason
(makedumpfile's own -E output uses 0, whose window would cover the headers and data).

The output must be seekable: the headers are written last, into space reserved for
the most segments the input could produce.  Imports only os, struct and time.
"""

from __future__ import annotations

import os
import struct
import time

from .vmcore import EHDR_SIZE, PHDR_SIZE, PT_LOAD, PT_NOTE, Segment, Vmcore, VmcoreError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    ProgressFn = Callable[[int, int], None]

CHUNK_SIZE = 4 << 20
MERGE_PAGES = 16
MAX_PHNUM = 0xFFFE  # 0xFFFF is PN_XNUM
PROGRESS_INTERVAL = 0.25  # seconds


class DumpResult:
    """What `write_elf_dump` did."""

    __slots__ = (
        "bytes_read",
        "bytes_written",
        "merge_pages",
        "output_size",
        "pages_total",
        "pages_zero",
        "segments",
    )

    def __init__(self) -> None:
        self.bytes_read = 0  # input PT_LOAD bytes read
        self.bytes_written = 0  # bytes written to the output (headers, notes, data)
        self.output_size = 0  # size of the output file (reserved header space included)
        self.pages_total = 0  # input pages scanned (p_filesz, rounded up per segment)
        self.pages_zero = 0  # all-zero pages left out of the output
        self.segments = 0  # output PT_LOADs
        self.merge_pages = 0  # zero runs shorter than this were written as data

    def __repr__(self) -> str:
        return (
            f"DumpResult(read={self.bytes_read}, written={self.bytes_written}, "
            f"pages={self.pages_total}, zero_skipped={self.pages_zero}, "
            f"segments={self.segments}, merge_pages={self.merge_pages})"
        )


def _pages(nbytes: int, page: int) -> int:
    return -(-nbytes // page)


def phnum_bound(core: Vmcore, page: int, merge: int) -> int:
    """Most program headers `write_elf_dump` can emit for `core` with threshold `merge`.

    A data segment starts with a data page and ends only at a zero run of at least
    `merge` pages, so a data segment and the zero segment after it span at least
    merge + 1 pages; plus a data segment with its zero segment and a leading zero
    segment per input segment.
    """
    total = len(core.note_segments)
    for seg in core.loads:
        total += 3 + 2 * (_pages(seg.filesz, page) // (merge + 1))
    return total


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


class _Writer:
    """Output position and accounting shared by the per-segment scans."""

    def __init__(self, fd: int, pos: int, zero: bytes) -> None:
        self.fd = fd
        self.pos = pos
        self.zero = zero
        self.written = 0

    def write(self, data: bytes | memoryview) -> None:
        n = _pwrite_all(self.fd, data, self.pos)
        self.pos += n
        self.written += n

    def write_zeros(self, n: int) -> None:
        while n > 0:
            k = min(n, len(self.zero))
            self.write(memoryview(self.zero)[:k])
            n -= k

    def align(self, addr: int, page: int) -> None:
        """Leave a hole so that the file offset is congruent to `addr` modulo `page`."""
        self.pos += (addr - self.pos) % page


class _Scanner:
    """Scans input PT_LOADs chunk by chunk, writes the data, collects output PT_LOADs."""

    def __init__(
        self, core: Vmcore, out: _Writer, chunk_size: int, page: int, merge: int, result: DumpResult
    ) -> None:
        self.core = core
        self.out = out
        self.chunk_size = chunk_size
        self.page = page
        self.merge_bytes = merge * page
        self.result = result
        self.buf = bytearray(chunk_size)
        self.view = memoryview(self.buf)
        self.zero = out.zero[:chunk_size]
        self.loads_out: list[Segment] = []

    def _fill(self, offset: int, n: int) -> None:
        """Read `n` input bytes at `offset` into the chunk buffer."""
        got = 0
        while got < n:
            try:
                k = os.preadv(self.core.fd, [self.view[got:n]], offset + got)
            except OSError as e:
                raise VmcoreError(
                    f"{self.core.name}: reading offset {offset + got:#x}: {e.strerror}"
                ) from None
            if k <= 0:
                raise VmcoreError(f"{self.core.name}: truncated at offset {offset + got:#x}")
            got += k
        self.result.bytes_read += n

    def _emit(self, seg: Segment, start: int, offset: int, data_end: int, map_end: int) -> None:
        """Output PT_LOADs for input-relative [start, data_end) of data at file `offset`
        and [data_end, map_end) of left-out zeros (p_offset fixed up at the end)."""
        if data_end > start:
            size = data_end - start
            self.loads_out.append(
                Segment(
                    PT_LOAD,
                    seg.flags,
                    offset,
                    seg.vaddr + start,
                    seg.paddr + start,
                    size,
                    size,
                    seg.align,
                )
            )
        if map_end > data_end:
            self.loads_out.append(
                Segment(
                    PT_LOAD,
                    seg.flags,
                    -1,
                    seg.vaddr + data_end,
                    seg.paddr + data_end,
                    0,
                    map_end - data_end,
                    seg.align,
                )
            )

    def segment(self, seg: Segment) -> Iterator[None]:
        """Copy one input PT_LOAD; yields after each chunk (for progress reports)."""
        out = self.out
        buf = self.buf
        view = self.view
        zero = self.zero
        page = self.page
        zpage = zero[:page]
        merge_bytes = self.merge_bytes
        result = self.result
        filesz = seg.filesz
        cur: int | None = None  # relative start of the open output segment
        cur_off = 0  # its file offset
        data_end = 0  # relative end of the data written for it
        zrun: int | None = None  # relative start of a pending zero run

        base = 0
        while base < filesz:
            n = min(self.chunk_size, filesz - base)
            self._fill(seg.offset + base, n)
            if (buf == zero) if n == self.chunk_size else zero.startswith(view[:n]):
                if zrun is None:
                    zrun = base
                base += n
                yield
                continue
            pending: int | None = None  # relative start of bytes to write from this chunk
            off = 0
            while off < n:
                size = min(page, n - off)
                if (
                    buf.startswith(zpage, off, off + page)
                    if size == page
                    else buf.startswith(zpage[:size], off, off + size)
                ):
                    if zrun is None:
                        zrun = base + off
                    off += size
                    continue
                rel = base + off
                if zrun is not None:
                    if rel - zrun < merge_bytes:
                        # A short zero run: written as data.
                        if cur is None:  # only at the start of the segment (zrun == 0)
                            out.align(seg.vaddr + zrun, page)
                            cur, cur_off = zrun, out.pos
                        if zrun < base:
                            out.write_zeros(base - zrun)  # the part in earlier chunks
                            pending = base
                        elif pending is None:
                            pending = zrun
                    else:
                        if pending is not None:
                            out.write(view[pending - base : data_end - base])
                            pending = None
                        if cur is None:
                            # A long leading zero run: a segment without file data.
                            self._emit(seg, 0, out.pos, 0, rel)
                        else:
                            self._emit(seg, cur, cur_off, data_end, rel)
                        result.pages_zero += _pages(rel - zrun, page)
                        out.align(seg.vaddr + rel, page)
                        cur, cur_off = rel, out.pos
                        pending = rel
                    zrun = None
                elif cur is None:
                    out.align(seg.vaddr + rel, page)
                    cur, cur_off = rel, out.pos
                    pending = rel
                elif pending is None:
                    pending = rel
                data_end = rel + size
                off += size
            if pending is not None:
                out.write(view[pending - base : data_end - base])
            base += n
            yield

        if cur is None:
            # Nothing but zeros (or nothing in the file at all).
            self._emit(seg, 0, out.pos, 0, seg.memsz)
            result.pages_zero += _pages(filesz, page)
        else:
            self._emit(seg, cur, cur_off, data_end, seg.memsz)
            if zrun is not None:
                result.pages_zero += _pages(filesz - zrun, page)


def write_elf_dump(
    core: Vmcore,
    out_fd: int,
    *,
    progress: ProgressFn | None = None,
    chunk_size: int = CHUNK_SIZE,
    merge_pages: int = MERGE_PAGES,
    max_phnum: int = MAX_PHNUM,
) -> DumpResult:
    """Write an ELF64 copy of `core`, zero pages left out, to `out_fd` (seekable, from offset 0).

    `progress(bytes_done, bytes_total)` is called at most every PROGRESS_INTERVAL seconds
    and once at the end.  Malformed or truncated input raises VmcoreError; errors
    writing the output are OSErrors.
    """
    page = core.pagesize
    chunk_size = max(page, chunk_size - chunk_size % page)
    merge = max(1, merge_pages)
    pages_all = sum(_pages(s.filesz, page) for s in core.loads)
    while phnum_bound(core, page, merge) > max_phnum and merge <= pages_all:
        merge = merge * 2 + 1
    bound = phnum_bound(core, page, merge)
    if bound > max_phnum:
        raise VmcoreError(f"{core.name}: too many segments ({len(core.loads)}) for one ELF header")
    for seg in core.loads:
        if core.file_size and seg.offset + seg.filesz > core.file_size:
            raise VmcoreError(f"{core.name}: truncated: {seg!r} ends past the end of the file")
    try:
        os.lseek(out_fd, 0, os.SEEK_CUR)
    except OSError as e:
        raise VmcoreError(f"the output must be a seekable file ({e.strerror})") from None

    result = DumpResult()
    result.merge_pages = merge
    result.pages_total = pages_all

    # Layout: ELF header, room for `bound` program headers, notes, page-aligned data.
    notes_out: list[Segment] = []
    pos = EHDR_SIZE + bound * PHDR_SIZE
    note_blobs: list[tuple[int, bytes]] = []
    for seg in core.note_segments:
        blob = core.pread(seg.offset, seg.filesz, "notes")
        pos = (pos + 7) & ~7
        note_blobs.append((pos, blob))
        notes_out.append(
            Segment(PT_NOTE, seg.flags, pos, seg.vaddr, seg.paddr, len(blob), len(blob), seg.align)
        )
        pos += len(blob)
    pos = -(-pos // page) * page

    out = _Writer(out_fd, pos, bytes(chunk_size))
    for at, blob in note_blobs:
        out.written += _pwrite_all(out_fd, blob, at)

    total = sum(s.filesz for s in core.loads)
    scan = _Scanner(core, out, chunk_size, page, merge, result)
    last_report = time.monotonic()
    for seg in core.loads:
        for _ in scan.segment(seg):
            if progress is not None:
                now = time.monotonic()
                if now - last_report >= PROGRESS_INTERVAL and result.bytes_read < total:
                    last_report = now
                    progress(result.bytes_read, total)
    loads_out = scan.loads_out

    phdrs = notes_out + loads_out
    if len(phdrs) > bound:  # cannot happen: the bound is proven above
        raise VmcoreError(f"internal error: {len(phdrs)} program headers, {bound} reserved")
    end = out.pos
    for s in loads_out:
        if s.offset < 0:
            s.offset = end  # zero-only: an offset no data segment's extent reaches
    header = bytearray(EHDR_SIZE + len(phdrs) * PHDR_SIZE)
    header[:16] = core.ehdr[:16]
    endian = core.endian
    _type, machine, version, entry = struct.unpack_from(endian + "HHIQ", core.ehdr, 16)
    (flags,) = struct.unpack_from(endian + "I", core.ehdr, 48)
    struct.pack_into(
        endian + "HHIQQQIHHHHHH",
        header,
        16,
        _type,
        machine,
        version,
        entry,
        EHDR_SIZE,
        0,
        flags,
        EHDR_SIZE,
        PHDR_SIZE,
        len(phdrs),
        0,
        0,
        0,
    )
    phdr = struct.Struct(endian + "IIQQQQQQ")
    for i, s in enumerate(phdrs):
        phdr.pack_into(
            header,
            EHDR_SIZE + i * PHDR_SIZE,
            s.type,
            s.flags,
            s.offset,
            s.vaddr,
            s.paddr,
            s.filesz,
            s.memsz,
            s.align,
        )
    out.written += _pwrite_all(out_fd, header, 0)
    try:
        if os.fstat(out_fd).st_size > end:
            os.ftruncate(out_fd, end)
    except OSError:
        pass  # a block device: nothing to trim
    result.bytes_written = out.written
    result.output_size = end
    result.segments = len(loads_out)
    if progress is not None:
        progress(result.bytes_read, total)
    return result


def verify_dump(src: Vmcore, dst: Vmcore, chunk_size: int = CHUNK_SIZE) -> int:
    """Check that `dst` (from `write_elf_dump`) holds `src`: returns the bytes compared.

    The notes must be equal; every output PT_LOAD must lie inside an input PT_LOAD
    with the same virtual-to-physical shift; every input page must read the same at
    its physical address in `dst` (so every non-zero page is present and every page
    left out is zero).  A difference raises VmcoreError naming the first bad page.
    """
    if [(n.name, n.type, n.desc) for n in src.notes] != [
        (n.name, n.type, n.desc) for n in dst.notes
    ]:
        raise VmcoreError("the notes differ")
    for d in dst.loads:
        for s in src.loads:
            if (
                s.vaddr <= d.vaddr
                and d.vaddr + d.memsz <= s.vaddr + s.memsz
                and d.paddr - d.vaddr == s.paddr - s.vaddr
            ):
                break
        else:
            raise VmcoreError(f"output {d!r} is not inside any input segment")
    page = src.pagesize
    chunk_size = max(page, chunk_size - chunk_size % page)
    compared = 0
    for s in src.loads:
        base = 0
        while base < s.memsz:
            n = min(chunk_size, s.memsz - base)
            if base >= s.filesz:
                want = bytes(n)
            else:
                m = min(n, s.filesz - base)
                want = src.pread(s.offset + base, m)
                if m < n:
                    want += bytes(n - m)
            got = dst.read_phys(s.paddr + base, n)
            if got != want:
                for off in range(0, n, page):
                    if got[off : off + page] != want[off : off + page]:
                        raise VmcoreError(
                            f"page at physical address {s.paddr + base + off:#x} differs"
                        )
            compared += n
            base += n
    return compared
