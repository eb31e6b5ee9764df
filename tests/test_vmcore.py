"""The capture stage's vmcore reader, dmesg extractor and ELF collector.

The synthetic cores built here are x86_64-shaped enough for Debian's makedumpfile to
read them as an independent reader: real 4-level page tables (1 GiB pages) for the
kernel map and the direct map, init_uts_ns, a FLATMEM mem_map, and a printk ring
buffer laid out with struct offsets chosen here and published through VMCOREINFO.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdump_mkinitrd.capture.dmesg import extract_dmesg, format_record, read_records
from kdump_mkinitrd.capture.elfdump import DumpResult, phnum_bound, verify_dump, write_elf_dump
from kdump_mkinitrd.capture.vmcore import Vmcore, VmcoreError, parse_notes
from kdump_mkinitrd.qemutest.run import Options, run_qemu_test
from kdump_mkinitrd.qemutest.testcache import cache_root
from tests.conftest import QEMU_TEST_ACTIONS, Kernel

REPO = Path(__file__).resolve().parent.parent
MAKEDUMPFILE = shutil.which("makedumpfile") or "/usr/bin/makedumpfile"
VMCORE_CACHE = cache_root() / "vmcores"

PAGE = 4096
KMAP = 0xFFFFFFFF80000000  # __START_KERNEL_map; phys_base is 0, so kernel vaddr = KMAP + paddr
DMAP = 0xFFFF888000000000  # PAGE_OFFSET of the direct map (4-level paging)
ID_MASK = (1 << 62) - 1
NO_LPOS = 0x3
COMMITTED, FINALIZED, RESERVED = 1, 2, 0

# Physical memory of the synthetic machine.
PGD, PUD = 0x1000, 0x2000
KIMG, KIMG_END = 0x10000, 0x1C000  # the "kernel image": variables, ring struct, descs, infos
RAM_SPLIT, RAM_FILE_END, RAM_END = 0x8000, 0x20000, 0x24000
V_PRB = KIMG + 0x0  # struct printk_ringbuffer *prb
V_MEM_MAP = KIMG + 0x8  # struct page *mem_map
V_LOG_BUF_LEN, V_FIRST_IDX, V_NEXT_IDX, V_LOG_BUF = (
    KIMG + 0x10,
    KIMG + 0x14,
    KIMG + 0x18,
    KIMG + 0x20,
)
UTS = KIMG + 0x100  # init_uts_ns (name first)
RB = KIMG + 0x400  # printk_rb_static
DESCS, INFOS = KIMG + 0x800, KIMG + 0xC00
TEXT_RING = 0x7E00  # in the direct map, across the RAM_SPLIT segment boundary
COUNT_BITS, SIZE_BITS = 4, 10

# The synthetic kernel's struct layout (deliberately not the real one).
RB_DESC_RING, RB_TEXT_RING, RB_SIZE = 8, 64, 112
DR_COUNT_BITS, DR_DESCS, DR_INFOS, DR_HEAD, DR_TAIL = 0, 8, 16, 24, 32
TR_SIZE_BITS, TR_DATA = 0, 8
DESC_SIZE, DESC_STATE, DESC_LPOS = 32, 8, 16
INFO_SIZE, INFO_TS, INFO_TEXT_LEN = 40, 8, 16

PRB_VMCOREINFO = f"""SYMBOL(prb)={KMAP + V_PRB:x}
SYMBOL(printk_rb_static)={KMAP + RB:x}
SIZE(printk_ringbuffer)={RB_SIZE}
OFFSET(printk_ringbuffer.desc_ring)={RB_DESC_RING}
OFFSET(printk_ringbuffer.text_data_ring)={RB_TEXT_RING}
SIZE(prb_desc_ring)=48
OFFSET(prb_desc_ring.count_bits)={DR_COUNT_BITS}
OFFSET(prb_desc_ring.descs)={DR_DESCS}
OFFSET(prb_desc_ring.infos)={DR_INFOS}
OFFSET(prb_desc_ring.head_id)={DR_HEAD}
OFFSET(prb_desc_ring.tail_id)={DR_TAIL}
SIZE(prb_desc)={DESC_SIZE}
OFFSET(prb_desc.state_var)={DESC_STATE}
OFFSET(prb_desc.text_blk_lpos)={DESC_LPOS}
SIZE(prb_data_blk_lpos)=16
OFFSET(prb_data_blk_lpos.begin)=0
OFFSET(prb_data_blk_lpos.next)=8
SIZE(printk_info)={INFO_SIZE}
OFFSET(printk_info.seq)=0
OFFSET(printk_info.ts_nsec)={INFO_TS}
OFFSET(printk_info.text_len)={INFO_TEXT_LEN}
SIZE(prb_data_ring)=32
OFFSET(prb_data_ring.size_bits)={TR_SIZE_BITS}
OFFSET(prb_data_ring.data)={TR_DATA}
SIZE(atomic_long_t)=8
OFFSET(atomic_long_t.counter)=0
"""


@dataclass
class Rec:
    ts: int
    text: bytes
    state: int = FINALIZED
    dataless: bool = False
    text_len: int | None = None  # what printk_info.text_len claims, if not len(text)
    stale: bool = False  # the desc slot holds an older id


RECORDS = [
    Rec(0, b"Linux version 6.0.0-synthetic (kdump@test) #1 SMP PREEMPT"),
    Rec(1_234_567, b"Command line: console=ttyS0 crashkernel=96M"),
    Rec(2_000_000_000, b"reserved, not committed yet", state=RESERVED),
    Rec(5_500_000_000, b"first line\nsecond line\nthird line"),  # wraps the text ring
    Rec(6_000_000_000, b"", dataless=True),
    Rec(7_000_001_000, b"tab\there, bell\x07, del\x7f"),
    Rec(8_000_000_000, b"still committed (not finalized)", state=COMMITTED),
    Rec(8_500_000_000, b"a stale descriptor", stale=True),
    Rec(9_000_000_000, b"truncated-text!!", text_len=300),
    Rec(123456_789_012_345, b"sysrq: Trigger a crash"),
    Rec(123456_800_000_000, b"Kernel panic - not syncing: sysrq triggered crash"),
]
EXPECTED_DMESG = (
    "[    0.000000] Linux version 6.0.0-synthetic (kdump@test) #1 SMP PREEMPT\n"
    "[    0.001234] Command line: console=ttyS0 crashkernel=96M\n"
    "[    5.500000] first line\n"
    "               second line\n"
    "               third line\n"
    "[    7.000001] tab\there, bell\\x07, del\\x7f\n"
    "[    8.000000] still committed (not finalized)\n"
    "[    9.000000] truncated-text!!\n"
    "[123456.789012] sysrq: Trigger a crash\n"
    "[123456.800000] Kernel panic - not syncing: sysrq triggered crash\n"
)


class Mem:
    """The synthetic machine's physical memory."""

    def __init__(self, size: int = RAM_END) -> None:
        self.b = bytearray(size)

    def put(self, paddr: int, data: bytes) -> None:
        self.b[paddr : paddr + len(data)] = data

    def u64(self, paddr: int, value: int) -> None:
        struct.pack_into("<Q", self.b, paddr, value)

    def u32(self, paddr: int, value: int) -> None:
        struct.pack_into("<I", self.b, paddr, value)

    def u16(self, paddr: int, value: int) -> None:
        struct.pack_into("<H", self.b, paddr, value)


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % 4)

    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def base_memory(release: str, size: int = RAM_END) -> tuple[Mem, str]:
    """Page tables, init_uts_ns and mem_map, with their VMCOREINFO lines."""
    mem = Mem(size)
    # PGD[273] (direct map) and PGD[511] (kernel map) -> one PUD with two 1 GiB pages at 0.
    mem.u64(PGD + 8 * ((DMAP >> 39) & 511), PUD | 0x63)
    mem.u64(PGD + 8 * ((KMAP >> 39) & 511), PUD | 0x63)
    mem.u64(PUD + 8 * ((DMAP >> 30) & 511), 0x0 | 0xE3)
    mem.u64(PUD + 8 * ((KMAP >> 30) & 511), 0x0 | 0xE3)
    uts = bytearray(390)
    for i, field in enumerate((b"Linux", b"synthetic", release.encode(), b"#1 SMP", b"x86_64")):
        uts[65 * i : 65 * i + len(field)] = field
    mem.put(UTS, bytes(uts))
    mem.u64(V_MEM_MAP, 0xFFFFEA0000000000)
    info = (
        f"OSRELEASE={release}\nPAGESIZE={PAGE}\n"
        f"SYMBOL(init_uts_ns)={KMAP + UTS:x}\nOFFSET(uts_namespace.name)=0\n"
        f"SYMBOL(_stext)={KMAP + KIMG:x}\nSYMBOL(init_top_pgt)={KMAP + PGD:x}\n"
        f"SYMBOL(mem_map)={KMAP + V_MEM_MAP:x}\n"
        "SIZE(page)=64\nOFFSET(page.flags)=0\nOFFSET(page._refcount)=52\nOFFSET(page.mapping)=24\n"
        "NUMBER(phys_base)=0\nNUMBER(pgtable_l5_enabled)=0\n"
        "NUMBER(KERNEL_IMAGE_SIZE)=1073741824\nKERNELOFFSET=0\n"
    )
    return mem, info


def write_ring(
    mem: Mem,
    records: list[Rec],
    tail_id: int = ID_MASK - 2,
    text_ring: int = TEXT_RING,
    size_bits: int = SIZE_BITS,
) -> None:
    """Lay out `records` in the lockless ring (descs, infos, text ring) and printk_rb_static."""
    count, ring = 1 << COUNT_BITS, 1 << size_bits
    assert len(records) <= count
    lpos = 8 * ring - 192  # the first blocks sit near the end of the ring, later ones wrap
    for k, rec in enumerate(records):
        ident = (tail_id + k) & ID_MASK
        slot = ident % count
        desc, info = DESCS + slot * DESC_SIZE, INFOS + slot * INFO_SIZE
        if rec.dataless:
            begin = nxt = NO_LPOS
        else:
            size = 8 + len(rec.text) + (-(8 + len(rec.text)) % 8)
            begin = lpos
            at = begin % ring
            if at + size > ring:  # wraps: the whole block goes to the start of the ring
                mem.u64(text_ring + at, ident)
                nxt = begin - at + ring + size
                at = 0
            else:
                nxt = begin + size
            mem.u64(text_ring + at, ident)
            mem.put(text_ring + at + 8, rec.text)
            lpos = nxt
        sv_id = (ident - count) & ID_MASK if rec.stale else ident
        mem.u64(desc + DESC_STATE, (rec.state << 62) | sv_id)
        mem.u64(desc + DESC_LPOS, begin)
        mem.u64(desc + DESC_LPOS + 8, nxt)
        mem.u64(info, 1000 + k)  # seq
        mem.u64(info + INFO_TS, rec.ts)
        mem.u16(info + INFO_TEXT_LEN, len(rec.text) if rec.text_len is None else rec.text_len)
    head_id = (tail_id + len(records) - 1) & ID_MASK
    mem.u64(V_PRB, KMAP + RB)
    mem.u32(RB + RB_DESC_RING + DR_COUNT_BITS, COUNT_BITS)
    mem.u64(RB + RB_DESC_RING + DR_DESCS, KMAP + DESCS)
    mem.u64(RB + RB_DESC_RING + DR_INFOS, KMAP + INFOS)
    mem.u64(RB + RB_DESC_RING + DR_HEAD, head_id)
    mem.u64(RB + RB_DESC_RING + DR_TAIL, tail_id)
    mem.u32(RB + RB_TEXT_RING + TR_SIZE_BITS, size_bits)
    mem.u64(RB + RB_TEXT_RING + TR_DATA, DMAP + text_ring)


def build_elf(mem: Mem, vmcoreinfo: str, file_end: int = RAM_FILE_END) -> bytes:
    """ET_CORE: PT_NOTE (CORE/NT_PRSTATUS, VMCOREINFO), kernel-image PT_LOAD, two RAM PT_LOADs."""
    notes = _note(b"CORE", 1, struct.pack("<12xI", 1) + bytes(320)) + _note(
        b"VMCOREINFO", 0, vmcoreinfo.encode()
    )
    # (vaddr, paddr, file bytes, memsz)
    loads = [
        (KMAP + KIMG, KIMG, bytes(mem.b[KIMG:KIMG_END]), KIMG_END - KIMG),
        (DMAP, 0, bytes(mem.b[:RAM_SPLIT]), RAM_SPLIT),
        (DMAP + RAM_SPLIT, RAM_SPLIT, bytes(mem.b[RAM_SPLIT:file_end]), len(mem.b) - RAM_SPLIT),
    ]
    phnum = 1 + len(loads)
    notes_off = 64 + 56 * phnum
    offset = -(-(notes_off + len(notes)) // PAGE) * PAGE
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    out = bytearray(
        ident + struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 0, 0, 0)
    )
    out += struct.pack("<IIQQQQQQ", 4, 0, notes_off, 0, 0, len(notes), len(notes), 0)
    data = b""
    for vaddr, paddr, blob, memsz in loads:
        out += struct.pack("<IIQQQQQQ", 1, 7, offset + len(data), vaddr, paddr, len(blob), memsz, 0)
        data += blob
    out += notes
    out += bytes(offset - len(out))
    return bytes(out + data)


def prb_core(records: list[Rec] = RECORDS, extra_info: str = "", fill: bool = False) -> bytes:
    mem, info = base_memory("6.0.0-synthetic")
    write_ring(mem, records)
    if fill:
        # Some non-zero pages among the zero ones for the collector.
        rnd = random.Random(7)
        for paddr in (0x3000, 0x5000, 0x6000, 0x1D000, 0x1F000):
            mem.put(paddr, rnd.randbytes(PAGE))
        mem.put(0x1E800, b"half a page")
    return build_elf(mem, info + PRB_VMCOREINFO + "CRASHTIME=1700000000\n" + extra_info)


BIG_RAM, BIG_RING, BIG_SIZE_BITS = 24 << 20, 0x400000, 16


def big_prb_core(seed: int = 11) -> bytes:
    """24 MiB of RAM (1 MiB more mapped than in the file), a 64 KiB text ring that is mostly
    zero pages, and data pages scattered in runs of every length around it."""
    mem, info = base_memory("6.0.0-synthetic", BIG_RAM + (1 << 20))
    write_ring(mem, RECORDS, text_ring=BIG_RING, size_bits=BIG_SIZE_BITS)
    rnd = random.Random(seed)
    pfn = 0x100
    while pfn < BIG_RAM // PAGE:
        run = rnd.choice((1, 1, 2, 3, 8, 15, 16, 17, 40, 300))
        near_ring = BIG_RING // PAGE - 300 <= pfn <= (BIG_RING + (1 << BIG_SIZE_BITS)) // PAGE
        if not near_ring and rnd.random() < 0.5:
            mem.put(pfn * PAGE, rnd.randbytes(run * PAGE)[: BIG_RAM - pfn * PAGE])
        pfn += run
    return build_elf(mem, info + PRB_VMCOREINFO, file_end=BIG_RAM)


# The 3.5-5.9 layout:
# struct printk_log {u64 ts_nsec; u16 len, text_len, dict_len; u8 facility, level}.
LOG_BUF = 0x18000
LOG_BUF_LEN = 0x400


def log_buf_core() -> tuple[bytes, str]:
    mem, info = base_memory("5.4.0-synthetic")
    texts = [
        (1_000_000, b"old-style log buffer"),
        (2_000_000, b"two\nlines"),
        (3_000_000, b"this one wraps to the start of the buffer"),
        (4_000_000, b"last"),
    ]
    idx = LOG_BUF_LEN - 120  # start near the end so the third record wraps
    first = idx
    for ts, text in texts:
        length = 16 + len(text) + 4  # 4 bytes of dict
        length += -length % 8
        if idx + length + 16 > LOG_BUF_LEN:  # the kernel keeps room for the marker
            mem.put(LOG_BUF + idx, bytes(16))  # len 0: end-of-buffer marker
            idx = 0
        rec = struct.pack("<QHHHBB", ts, length, len(text), 4, 0, 6) + text + b"DICT"
        mem.put(LOG_BUF + idx, rec)
        idx += length
    mem.u64(V_LOG_BUF, KMAP + LOG_BUF)
    mem.u32(V_LOG_BUF_LEN, LOG_BUF_LEN)
    mem.u32(V_FIRST_IDX, first)
    mem.u32(V_NEXT_IDX, idx)
    info += (
        f"SYMBOL(log_buf)={KMAP + V_LOG_BUF:x}\nSYMBOL(log_buf_len)={KMAP + V_LOG_BUF_LEN:x}\n"
        f"SYMBOL(log_first_idx)={KMAP + V_FIRST_IDX:x}\nSYMBOL(clear_idx)={KMAP + V_FIRST_IDX:x}\n"
        f"SYMBOL(log_next_idx)={KMAP + V_NEXT_IDX:x}\nSIZE(printk_log)=16\n"
        "OFFSET(printk_log.ts_nsec)=0\nOFFSET(printk_log.len)=8\nOFFSET(printk_log.text_len)=10\n"
        "OFFSET(printk_log.dict_len)=12\n"
    )
    expected = (
        "[    0.001000] old-style log buffer\n"
        "[    0.002000] two\n"
        "               lines\n"
        "[    0.003000] this one wraps to the start of the buffer\n"
        "[    0.004000] last\n"
    )
    return build_elf(mem, info), expected


@contextmanager
def memcore(data: bytes) -> Iterator[Vmcore]:
    """A Vmcore over an in-memory file."""
    fd = os.memfd_create("vmcore")
    try:
        os.write(fd, data)
        yield Vmcore(fd)
    finally:
        os.close(fd)


def makedumpfile_dmesg(core: Path, tmp: Path) -> str:
    out = tmp / f"{core.name}.dmesg"
    proc = subprocess.run(
        [MAKEDUMPFILE, "--dump-dmesg", str(core), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out.read_text(errors="surrogateescape")


needs_makedumpfile = pytest.mark.skipif(
    not os.access(MAKEDUMPFILE, os.X_OK), reason="makedumpfile is not installed"
)


# -- the reader -----------------------------------------------------------------------------


def test_headers_notes_and_vmcoreinfo() -> None:
    with memcore(prb_core()) as core:
        assert core.machine == 62 and core.endian == "<" and core.ptr_size == 8
        assert [n.name for n in core.notes] == [b"CORE", b"VMCOREINFO"]
        assert core.notes[0].type == 1 and len(core.notes[0].desc) == 336
        assert len(core.loads) == 3 and len(core.note_segments) == 1
        assert core.osrelease == "6.0.0-synthetic"
        assert core.pagesize == 4096
        assert core.crashtime == 1700000000
        assert core.kerneloffset == 0
        assert core.symbol("prb") == KMAP + V_PRB
        assert core.size("printk_info") == INFO_SIZE
        assert core.offset("printk_info.text_len") == INFO_TEXT_LEN
        assert core.number("phys_base") == 0
        assert core.number("missing", 5) == 5
        with pytest.raises(VmcoreError, match="LENGTH"):
            core.length("nothing")


def test_vmcoreinfo_number_forms() -> None:
    extra = "NUMBER(hex)=0x1F\nNUMBER(neg)=-3\nLENGTH(arr)=12\nNUMBER(bad)=zz\n"
    with memcore(prb_core(extra_info=extra)) as core:
        assert core.number("hex") == 31
        assert core.number("neg") == -3
        assert core.length("arr") == 12
        with pytest.raises(VmcoreError, match="not a number"):
            core.number("bad")


def test_read_virtual_physical_and_across_segments() -> None:
    data = prb_core()
    mem, _ = base_memory("6.0.0-synthetic")
    write_ring(mem, RECORDS)
    with memcore(data) as core:
        # Kernel map and direct map reach the same bytes.
        assert (
            core.read(KMAP + RB, RB_SIZE)
            == core.read(DMAP + RB, RB_SIZE)
            == mem.b[RB : RB + RB_SIZE]
        )
        # Across the boundary of two contiguous PT_LOADs.
        assert core.read(DMAP + RAM_SPLIT - 100, 200) == mem.b[RAM_SPLIT - 100 : RAM_SPLIT + 100]
        assert core.read_phys(RAM_SPLIT - 8, 16) == mem.b[RAM_SPLIT - 8 : RAM_SPLIT + 8]
        # Between p_filesz and p_memsz: zeros; past p_memsz: not mapped.
        assert core.read(DMAP + RAM_FILE_END - 4, 8) == mem.b[
            RAM_FILE_END - 4 : RAM_FILE_END
        ] + bytes(4)
        assert core.read_phys(RAM_END - 16, 16) == bytes(16)
        with pytest.raises(VmcoreError, match="not in the dump"):
            core.read(DMAP + RAM_END - 4, 8)
        with pytest.raises(VmcoreError, match="not in the dump"):
            core.read(0x1234, 1)
        assert core.read_ulong(KMAP + V_PRB) == KMAP + RB
        assert core.read(DMAP, 0) == b""


def test_malformed_headers() -> None:
    good = prb_core()
    cases = {
        "not an ELF": b"\x7fELG" + good[4:],
        "not ELF64": good[:4] + b"\x01" + good[5:],
        "ELF header": good[:40],
        "ET_CORE": good[:16] + struct.pack("<H", 2) + good[18:],
        "program headers": good[:200],
    }
    for message, data in cases.items():
        with pytest.raises(VmcoreError, match=message), memcore(data):
            pass
    # A note that claims more bytes than its segment has.
    notes_off = 64 + 56 * 4
    bad = bytearray(good)
    struct.pack_into("<I", bad, notes_off + 4, 100000)
    with pytest.raises(VmcoreError, match="runs past"), memcore(bytes(bad)):
        pass
    # No VMCOREINFO note.
    bad = bytearray(good)
    at = bad.index(b"VMCOREINFO")
    bad[at : at + 10] = b"VMCOREINFX"
    with pytest.raises(VmcoreError, match="no VMCOREINFO"), memcore(bytes(bad)):
        pass


def test_parse_notes_padding_and_alignment() -> None:
    blob = _note(b"A", 7, b"xyz") + _note(b"LONGERNAME", 8, b"12345") + bytes(24)
    notes = parse_notes(blob)
    assert [(n.name, n.type, n.desc) for n in notes] == [
        (b"A", 7, b"xyz"),
        (b"LONGERNAME", 8, b"12345"),
    ]


def test_open_path(tmp_path: Path) -> None:
    path = tmp_path / "core"
    path.write_bytes(prb_core())
    with Vmcore.open(str(path)) as core:
        assert core.osrelease == "6.0.0-synthetic"
    assert core.fd == -1
    with pytest.raises(VmcoreError, match="No such file"):
        Vmcore.open(str(tmp_path / "missing"))


def test_pn_xnum_program_header_count() -> None:
    """e_phnum 0xffff: the count is in section header 0's sh_info."""
    data = bytearray(_flat_core(b"\x01" * PAGE))
    shoff = len(data)
    data += struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 2, 0, 0)  # sh_info = 2
    struct.pack_into("<Q", data, 40, shoff)  # e_shoff
    struct.pack_into("<HHH", data, 58, 64, 1, 0)  # e_shentsize, e_shnum, e_shstrndx
    struct.pack_into("<H", data, 56, 0xFFFF)  # e_phnum = PN_XNUM
    with memcore(bytes(data)) as core:
        assert len(core.loads) == 1
        assert core.read_phys(0x100000, 4) == b"\x01" * 4


# -- dmesg ----------------------------------------------------------------------------------


def test_dmesg_lockless_ring() -> None:
    with memcore(prb_core()) as core:
        assert extract_dmesg(core) == EXPECTED_DMESG
        records = read_records(core)
        assert records[3] == (7_000_001_000, b"tab\there, bell\x07, del\x7f")


def test_dmesg_log_buf_layout() -> None:
    data, expected = log_buf_core()
    with memcore(data) as core:
        assert extract_dmesg(core) == expected


def test_format_record() -> None:
    assert format_record(0, b"x") == "[    0.000000] x\n"
    assert format_record(99_999_999_999_999, b"a\nb") == "[99999.999999] a\n               b\n"
    assert format_record(1_000_000_000_000_000, b"") == "[1000000.000000] \n"
    assert format_record(1, b"\x00\xe9\\") == "[    0.000000] \\x00\\xe9\\\n"


def test_dmesg_without_printk_symbols() -> None:
    mem, info = base_memory("6.0.0-synthetic")
    with memcore(build_elf(mem, info)) as core, pytest.raises(VmcoreError, match="SYMBOL"):
        extract_dmesg(core)


def test_dmesg_implausible_ring_sizes() -> None:
    mem, info = base_memory("6.0.0-synthetic")
    write_ring(mem, RECORDS)
    mem.u32(RB + RB_DESC_RING + DR_COUNT_BITS, 40)
    with (
        memcore(build_elf(mem, info + PRB_VMCOREINFO)) as core,
        pytest.raises(VmcoreError, match="implausible"),
    ):
        extract_dmesg(core)
    mem.u32(RB + RB_DESC_RING + DR_COUNT_BITS, 24)
    with (
        memcore(build_elf(mem, info + PRB_VMCOREINFO)) as core,
        pytest.raises(VmcoreError, match="too big"),
    ):
        extract_dmesg(core)


def test_dmesg_runaway_ids_are_bounded() -> None:
    mem, info = base_memory("6.0.0-synthetic")
    write_ring(mem, RECORDS)
    mem.u64(RB + RB_DESC_RING + DR_TAIL, 5)  # head - tail is ~2^62
    with memcore(build_elf(mem, info + PRB_VMCOREINFO)) as core:
        start = time.monotonic()
        text = extract_dmesg(core)
        assert time.monotonic() - start < 1
        # The newest 2^COUNT_BITS ids are tried; the ones that are in the ring are found.
        assert text.endswith("[123456.800000] Kernel panic - not syncing: sysrq triggered crash\n")


def test_dmesg_layout_outside_struct() -> None:
    bad = PRB_VMCOREINFO.replace(f"SIZE(prb_desc)={DESC_SIZE}", "SIZE(prb_desc)=20")
    mem, info = base_memory("6.0.0-synthetic")
    write_ring(mem, RECORDS)
    with memcore(build_elf(mem, info + bad)) as core, pytest.raises(VmcoreError, match="outside"):
        extract_dmesg(core)


@needs_makedumpfile
def test_makedumpfile_agrees_on_lockless_ring(tmp_path: Path) -> None:
    path = tmp_path / "prb.core"
    path.write_bytes(prb_core())
    assert makedumpfile_dmesg(path, tmp_path) == EXPECTED_DMESG


@needs_makedumpfile
def test_makedumpfile_agrees_on_log_buf(tmp_path: Path) -> None:
    data, expected = log_buf_core()
    path = tmp_path / "logbuf.core"
    path.write_bytes(data)
    assert makedumpfile_dmesg(path, tmp_path) == expected


@needs_makedumpfile
def test_makedumpfile_differs_only_in_escaping_high_bytes(tmp_path: Path) -> None:
    """makedumpfile 1.7.2 hands a signed char to "\\x%02x": \\xffffffc3 where we print \\xc3."""
    path = tmp_path / "utf8.core"
    path.write_bytes(prb_core([Rec(1000, "café".encode()), Rec(2000, b"nul\x00byte")]))
    ours = "[    0.000001] caf\\xc3\\xa9\n[    0.000002] nul\\x00byte\n"
    with Vmcore.open(str(path)) as core:
        assert extract_dmesg(core) == ours
    assert makedumpfile_dmesg(path, tmp_path).replace("\\xffffff", "\\x") == ours


# -- the collector --------------------------------------------------------------------------


def _dump(src: Path, dst: Path, **kwargs: int) -> tuple[DumpResult, list[tuple[int, int]]]:
    calls: list[tuple[int, int]] = []
    with Vmcore.open(str(src)) as core:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            result = write_elf_dump(
                core, fd, progress=lambda done, total: calls.append((done, total)), **kwargs
            )
        finally:
            os.close(fd)
    return result, calls


def test_elfdump_leaves_out_zero_pages(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.core", tmp_path / "out.core"
    src.write_bytes(prb_core(fill=True))
    result, calls = _dump(src, dst, merge_pages=2)
    with Vmcore.open(str(src)) as a, Vmcore.open(str(dst)) as b:
        assert verify_dump(a, b) == sum(s.memsz for s in a.loads)
        assert extract_dmesg(b) == EXPECTED_DMESG
        assert b.notes[0].desc == a.notes[0].desc and b.vmcoreinfo == a.vmcoreinfo
        assert b.segments[0].type == 4  # notes first
        for seg in b.loads:
            assert seg.filesz in (0, seg.memsz)
            assert seg.filesz == 0 or seg.offset % PAGE == seg.vaddr % PAGE
        total_pages = sum(-(-s.filesz // PAGE) for s in a.loads)
        assert result.pages_total == total_pages
        assert 0 < result.pages_zero < total_pages
        assert result.segments == len(b.loads) > len(a.loads)
    assert calls[-1] == (result.bytes_read, result.bytes_read)
    assert dst.stat().st_size < src.stat().st_size


def test_elfdump_chunk_boundaries_and_merging(tmp_path: Path) -> None:
    """Zero runs across chunk boundaries, short runs merged, a partial last page."""
    rnd = random.Random(3)
    pattern = "DDZZZDZDDDDZZZZZZZZZZZZZZZZZZZZZZZZZZZZDZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZD"
    body = b"".join(rnd.randbytes(PAGE) if c == "D" else bytes(PAGE) for c in pattern) + b"tail"
    for lead in (0, 3, 40):
        data = bytes(lead * PAGE) + body
        src = tmp_path / f"in{lead}.core"
        src.write_bytes(_flat_core(data, extra_memsz=3 * PAGE))
        for chunk_pages in (1, 2, 5, 64):
            for merge in (1, 4, 16):
                dst = tmp_path / f"out{lead}-{chunk_pages}-{merge}.core"
                result, _ = _dump(src, dst, chunk_size=chunk_pages * PAGE, merge_pages=merge)
                with Vmcore.open(str(src)) as a, Vmcore.open(str(dst)) as b:
                    verify_dump(a, b)
                    assert len(b.loads) <= phnum_bound(a, PAGE, merge)
                    written = sum(s.filesz for s in b.loads)
                    skipped = result.pages_zero
                    assert written == len(data) - skipped * PAGE


def _flat_core(data: bytes, extra_memsz: int = 0, vmcoreinfo: str = "PAGESIZE=4096\n") -> bytes:
    """One PT_NOTE and one PT_LOAD of `data` at physical 0x100000."""
    notes = _note(b"VMCOREINFO", 0, vmcoreinfo.encode())
    offset = PAGE
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    out = bytearray(
        ident + struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56, 2, 0, 0, 0)
    )
    out += struct.pack("<IIQQQQQQ", 4, 0, 64 + 112, 0, 0, len(notes), len(notes), 0)
    out += struct.pack(
        "<IIQQQQQQ", 1, 7, offset, DMAP + 0x100000, 0x100000, len(data), len(data) + extra_memsz, 0
    )
    out += notes
    out += bytes(offset - len(out))
    return bytes(out) + data


def test_elfdump_all_zero_and_empty_segments(tmp_path: Path) -> None:
    for name, data, memsz in (("zero", bytes(10 * PAGE), 0), ("empty", b"", 5 * PAGE)):
        src, dst = tmp_path / f"{name}.core", tmp_path / f"{name}.out"
        src.write_bytes(_flat_core(data, extra_memsz=memsz))
        result, _ = _dump(src, dst)
        with Vmcore.open(str(src)) as a, Vmcore.open(str(dst)) as b:
            verify_dump(a, b)
            assert [(s.filesz, s.memsz) for s in b.loads] == [(0, len(data) + memsz)]
        assert result.pages_zero == len(data) // PAGE


def test_elfdump_header_bound_with_alternating_pages(tmp_path: Path) -> None:
    """One data page, then 20 zero pages, over and over: the merge threshold must grow."""
    rnd = random.Random(5)
    unit = 21
    data = b"".join(rnd.randbytes(PAGE) + bytes(20 * PAGE) for _ in range(200))
    src = tmp_path / "alt.core"
    src.write_bytes(_flat_core(data))
    dst = tmp_path / "alt16.out"
    result, _ = _dump(src, dst)  # default merge of 16 pages: every run splits
    with Vmcore.open(str(src)) as a, Vmcore.open(str(dst)) as b:
        verify_dump(a, b)
        assert [s.filesz for s in b.loads] == [PAGE, 0] * 200
    for limit in (50, 10, 4):
        dst = tmp_path / f"alt{limit}.out"
        result, _ = _dump(src, dst, max_phnum=limit)
        with Vmcore.open(str(src)) as a, Vmcore.open(str(dst)) as b:
            verify_dump(a, b)
            assert len(b.segments) <= limit
            assert result.merge_pages >= unit - 1
    # Past 65534 headers it would need PN_XNUM: the bound is kept for a real-size case too.
    with Vmcore.open(str(src)) as a:
        assert phnum_bound(a, PAGE, 16) >= 200


def test_elfdump_refuses_pipe_and_truncated_input(tmp_path: Path) -> None:
    src = tmp_path / "in.core"
    data = prb_core(fill=True)
    src.write_bytes(data)
    r, w = os.pipe()
    try:
        with Vmcore.open(str(src)) as core, pytest.raises(VmcoreError, match="seekable"):
            write_elf_dump(core, w)
    finally:
        os.close(r)
        os.close(w)
    short = tmp_path / "short.core"
    short.write_bytes(data[: len(data) - 3 * PAGE])
    with Vmcore.open(str(short)) as core:
        fd = os.open(tmp_path / "short.out", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(VmcoreError, match="truncated"):
                write_elf_dump(core, fd)
        finally:
            os.close(fd)


def test_verify_catches_a_missing_page(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.core", tmp_path / "out.core"
    src.write_bytes(prb_core(fill=True))
    _dump(src, dst)
    with Vmcore.open(str(dst)) as b:
        seg = next(s for s in b.loads if s.filesz)
    raw = bytearray(dst.read_bytes())
    raw[seg.offset + 100] ^= 0xFF
    dst.write_bytes(bytes(raw))
    with (
        Vmcore.open(str(src)) as a,
        Vmcore.open(str(dst)) as b,
        pytest.raises(VmcoreError, match="differs"),
    ):
        verify_dump(a, b)


@needs_makedumpfile
def test_makedumpfile_reads_the_collector_output(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.core", tmp_path / "out.core"
    src.write_bytes(prb_core(fill=True))
    _dump(src, dst, merge_pages=1)
    assert makedumpfile_dmesg(src, tmp_path) == EXPECTED_DMESG
    assert makedumpfile_dmesg(dst, tmp_path) == EXPECTED_DMESG


@needs_makedumpfile
@pytest.mark.parametrize(("merge", "chunk"), [(16, 4 << 20), (1, 64 << 10), (300, 1 << 20)])
def test_makedumpfile_reads_a_bigger_collector_output(
    tmp_path: Path, merge: int, chunk: int
) -> None:
    """A text ring with left-out zero pages inside it, many segments, 4 MiB mmap windows."""
    src, dst = tmp_path / "big.core", tmp_path / "big.out"
    src.write_bytes(big_prb_core())
    result, _ = _dump(src, dst, merge_pages=merge, chunk_size=chunk)
    with Vmcore.open(str(src)) as a, Vmcore.open(str(dst)) as b:
        verify_dump(a, b)
        assert extract_dmesg(a) == extract_dmesg(b) == EXPECTED_DMESG
        ring_pages = range(BIG_RING, BIG_RING + (1 << BIG_SIZE_BITS), PAGE)
        assert any(b.read_phys(p, PAGE) == bytes(PAGE) for p in ring_pages)
    assert result.segments > 10 and result.pages_zero > 0
    assert makedumpfile_dmesg(src, tmp_path) == EXPECTED_DMESG
    assert makedumpfile_dmesg(dst, tmp_path) == EXPECTED_DMESG


CRASH = shutil.which("crash")


@pytest.mark.skipif(CRASH is None, reason="crash is not installed")
def test_crash_reads_log_buf_from_input_and_collector_output(tmp_path: Path) -> None:
    """crash --log needs no vmlinux for the log_buf layout (8.0 cannot do the lockless one)."""
    data, expected = log_buf_core()
    src, dst = tmp_path / "logbuf.core", tmp_path / "logbuf.out"
    src.write_bytes(data)
    _dump(src, dst, merge_pages=1)
    for path in (src, dst):
        proc = subprocess.run(
            [str(CRASH), "--log", str(path)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == expected


GDB = shutil.which("gdb")


@pytest.mark.skipif(GDB is None, reason="gdb is not installed")
def test_gdb_reads_the_collector_output(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.core", tmp_path / "out.core"
    src.write_bytes(prb_core(fill=True))
    _dump(src, dst, merge_pages=1)
    # Kernel data, the text ring across two input segments, a left-out zero page, data.
    addrs = [KMAP + V_PRB, DMAP + TEXT_RING + 0x1F8, DMAP + 0x4000, DMAP + 0x1D000, DMAP + 0x23000]
    proc = subprocess.run(
        [
            str(GDB),
            "-nx",
            "-batch",
            "-ex",
            "set architecture i386:x86-64",
            "-ex",
            f"core-file {dst}",
        ]
        + [arg for a in addrs for arg in ("-ex", f"x/2xg {a:#x}")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    got = [
        [int(w, 16) for w in line.split(":")[1].split()]
        for line in proc.stdout.splitlines()
        if line.startswith("0xf") and ":" in line
    ]
    with Vmcore.open(str(src)) as core:
        want = [list(struct.unpack("<QQ", core.read(a, 16))) for a in addrs]
    assert got == want, proc.stdout + proc.stderr
    assert any(w != [0, 0] for w in want) and [0, 0] in want


# -- hostile input --------------------------------------------------------------------------

SMALL_CORE = prb_core()


def _survive(data: bytes) -> None:
    fd = os.memfd_create("hostile")
    try:
        os.write(fd, data)
        try:
            core = Vmcore(fd)
            text = extract_dmesg(core, max_bytes=1 << 22)
        except VmcoreError:
            return
        assert isinstance(text, str)
        out = os.memfd_create("out")
        try:
            write_elf_dump(core, out)
        except VmcoreError:
            pass
        finally:
            os.close(out)
    finally:
        os.close(fd)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=len(SMALL_CORE)))
def test_hostile_truncation(length: int) -> None:
    _survive(SMALL_CORE[:length])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            # Mostly the headers, notes and the printk structures; sometimes anywhere.
            st.one_of(
                st.integers(0, 0x1000),
                st.integers(PAGE, PAGE + (KIMG_END - KIMG)),
                st.integers(0, len(SMALL_CORE) - 1),
            ),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_hostile_corruption(changes: list[tuple[int, int]]) -> None:
    data = bytearray(SMALL_CORE)
    for pos, value in changes:
        data[pos] = value
    _survive(bytes(data))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_hostile_ring_fields(data: st.DataObject) -> None:
    """Garbage in the ring buffer's own fields: ids, lpos values, sizes, lengths."""
    mem, info = base_memory("6.0.0-synthetic")
    write_ring(mem, RECORDS)
    fields = [RB + RB_DESC_RING + o for o in (DR_HEAD, DR_TAIL, DR_DESCS)]
    fields += [
        DESCS + i * DESC_SIZE + o for i in range(16) for o in (DESC_STATE, DESC_LPOS, DESC_LPOS + 8)
    ]
    fields += [INFOS + i * INFO_SIZE + INFO_TEXT_LEN for i in range(16)]
    for _ in range(data.draw(st.integers(1, 8))):
        mem.u64(data.draw(st.sampled_from(fields)), data.draw(st.integers(0, 2**64 - 1)))
    mem.u32(RB + RB_DESC_RING + DR_COUNT_BITS, data.draw(st.sampled_from([0, 1, 4, 5, 12, 31, 32])))
    mem.u32(RB + RB_TEXT_RING + TR_SIZE_BITS, data.draw(st.sampled_from([0, 3, 4, 10, 11, 31])))
    _survive(build_elf(mem, info + PRB_VMCOREINFO))


# -- what the capture modules import ---------------------------------------------------------

ALLOWED = ("os", "struct", "sys", "time", "errno", "__future__")


def test_capture_modules_import_only_the_allowed_stdlib() -> None:
    """Beyond the allowed modules (and what they pull in themselves), only the capture package."""
    code = (
        "import sys\n"
        f"import {', '.join(ALLOWED)}\n"
        "before = set(sys.modules)\n"
        "import capture.vmcore, capture.dmesg, capture.elfdump\n"
        "print('\\n'.join(sorted(set(sys.modules) - before)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=REPO / "builder",
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO / "builder")},
    )
    new = set(proc.stdout.split())
    assert new == {"capture", "capture.vmcore", "capture.dmesg", "capture.elfdump"}


# -- a real vmcore from a QEMU crash ------------------------------------------------------------

# A crash of a real Debian kernel, copied byte for byte (dd) from the capture kernel's
# /proc/vmcore: an ssh target with the native collector streams it as ELF into the test sshd
# (ssh and nfs make images that build with any stage). One guest boot gives it; it is kept under
# .cache/vmcores, named by a digest of everything that made it, so a later session reuses it
# only while the kernel, the image's inputs and the crash are the same.
REAL_VMCORE_CONFIG = """\
targets:
  - {type: ssh, host: "@SSH_HOST@", port: @SSH_PORT@, path: "@SSH_PATH@",
     identity: "@SSH_IDENTITY@", known_hosts: "@SSH_KNOWN_HOSTS@", client: "@SSH_CLIENT@"}
kernel_modules: [virtio_pci, virtio_net]
capture: {collector: native}
"""
# A small guest keeps the copy small (about its memory less the reservation).
REAL_VMCORE_MEMORY, REAL_VMCORE_CRASHKERNEL = "512M", "192M"
IMAGE_INPUTS = ("builder", "modules.d", "templates")


def _real_vmcore_key(kernel: Kernel) -> str:
    digest = hashlib.sha256()
    digest.update(f"{kernel.kver}\n{REAL_VMCORE_CONFIG}{QEMU_TEST_ACTIONS}".encode())
    digest.update(f"{REAL_VMCORE_MEMORY} {REAL_VMCORE_CRASHKERNEL} kexec-tools\n".encode())
    digest.update(kernel.vmlinuz.read_bytes())
    for folder in IMAGE_INPUTS:
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(f"{path.relative_to(REPO)}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:32]


@pytest.fixture(scope="module")
def real_vmcore(kernel61: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cached = VMCORE_CACHE / f"{_real_vmcore_key(kernel61)}.vmcore"
    if cached.is_file():
        return cached
    work = tmp_path_factory.mktemp("real-vmcore")
    (work / "kdump.yaml").write_text(REAL_VMCORE_CONFIG + QEMU_TEST_ACTIONS)
    report = run_qemu_test(
        Options(kernel61.kver, kernel61.kmoddir, kernel61.vmlinuz, config=work / "kdump.yaml",
                keep=work / "work", target="ssh", memory=REAL_VMCORE_MEMORY,
                crashkernel=REAL_VMCORE_CRASHKERNEL, first_stage="kexec-tools")
    )  # fmt: skip
    assert report.ok, report.summary() + "\n" + Path(report.serial_log).read_text()[-4000:]
    assert report.dump_dir is not None
    dump = Path(report.dump_dir)
    record = json.loads((dump / "vmcore.json").read_text())
    assert (record["collector"], record["format"]) == ("dd", "elf"), record
    VMCORE_CACHE.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(cached.name + f".{os.getpid()}.incomplete")
    shutil.move(dump / "vmcore", partial)
    os.replace(partial, cached)
    # Those of older inputs would never be read again: each is some hundred MB.
    for old in VMCORE_CACHE.glob("*.vmcore"):
        if old != cached:
            old.unlink(missing_ok=True)
    return cached


@pytest.mark.qemu
@needs_makedumpfile
def test_real_vmcore_dmesg_matches_makedumpfile(real_vmcore: Path, tmp_path: Path) -> None:
    with Vmcore.open(str(real_vmcore)) as core:
        ours = extract_dmesg(core)
    theirs = makedumpfile_dmesg(real_vmcore, tmp_path)
    assert ours == theirs
    assert ours.startswith("[    0.000000] Linux version ")
    assert "sysrq: Trigger a crash" in ours


@pytest.mark.qemu
@needs_makedumpfile
def test_real_vmcore_collector_output(real_vmcore: Path, tmp_path: Path) -> None:
    dst = tmp_path / "vmcore"
    result, _ = _dump(real_vmcore, dst)
    with Vmcore.open(str(real_vmcore)) as a, Vmcore.open(str(dst)) as b:
        verify_dump(a, b)
        assert extract_dmesg(b) == extract_dmesg(a)
        assert b.vmcoreinfo == a.vmcoreinfo
    assert result.pages_zero > 0 and len(b.segments) < 1000
    assert makedumpfile_dmesg(dst, tmp_path) == makedumpfile_dmesg(real_vmcore, tmp_path)
