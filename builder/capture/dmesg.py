"""The kernel log (dmesg) of a crashed kernel, read from its vmcore in pure Python.

Supports the lockless printk ring buffer (Linux 5.10+, `SYMBOL(prb)`) and the older
variable-length record buffer (3.5 to 5.9, `SYMBOL(log_buf)`), using only the
addresses, sizes and offsets the crashed kernel exported in VMCOREINFO.  The output
format follows `makedumpfile --dump-dmesg`: "[%5lu.%06lu] text", continuation lines
of a multi-line record indented to the width of that prefix, bytes that are neither
printable ASCII nor whitespace written as \\xNN.
"""

from __future__ import annotations

import struct

from .vmcore import Vmcore, VmcoreError

DESC_RESERVED = 0
DESC_COMMITTED = 1
DESC_FINALIZED = 2
DESC_REUSABLE = 3
# Reading more than this for one log (descriptors + infos + text) means corrupt sizes.
DEFAULT_MAX_BYTES = 256 << 20

# isprint() or isspace() in the C locale: what makedumpfile copies through unchanged.
_PLAIN = bytes(range(0x20, 0x7F)) + b"\t\n\v\f\r"


def format_record(ts_nsec: int, text: bytes) -> str:
    """One record as makedumpfile prints it, with a trailing newline."""
    secs, nsec = divmod(ts_nsec, 1_000_000_000)
    prefix = f"[{secs:5d}.{nsec // 1000:06d}] "
    odd = text.translate(None, _PLAIN)
    if odd:
        # Few distinct odd bytes per record: one C-level replace each, no per-byte loop.
        for byte in set(odd):
            text = text.replace(bytes((byte,)), b"\\x%02x" % byte)
    line = text.decode("ascii")
    if "\n" in line:
        line = line.replace("\n", "\n" + " " * len(prefix))
    return prefix + line + "\n"


def _need(what: str, offset: int, width: int, limit: int) -> int:
    """`offset` if a field of `width` bytes there fits in a struct of `limit` bytes."""
    if offset < 0 or offset + width > limit:
        raise VmcoreError(
            f"VMCOREINFO layout: {what} (+{offset}, {width} bytes) is outside {limit}"
        )
    return offset


def lockless_records(core: Vmcore, max_bytes: int = DEFAULT_MAX_BYTES) -> list[tuple[int, bytes]]:
    """(ts_nsec, text) of every committed or finalized record of the 5.10+ ring buffer."""
    word = core.ptr_size
    ul = core.endian + ("I" if word == 4 else "Q")
    u32 = core.endian + "I"
    u16 = core.endian + "H"
    u64 = core.endian + "Q"

    rb_size = core.size("printk_ringbuffer")
    counter = core.offset("atomic_long_t.counter", 0)
    desc_ring = core.offset("printk_ringbuffer.desc_ring")
    text_ring = core.offset("printk_ringbuffer.text_data_ring")
    o_count_bits = _need(
        "count_bits", desc_ring + core.offset("prb_desc_ring.count_bits"), 4, rb_size
    )
    o_descs = _need("descs", desc_ring + core.offset("prb_desc_ring.descs"), word, rb_size)
    o_infos = _need("infos", desc_ring + core.offset("prb_desc_ring.infos"), word, rb_size)
    o_head = _need(
        "head_id", desc_ring + core.offset("prb_desc_ring.head_id") + counter, word, rb_size
    )
    o_tail = _need(
        "tail_id", desc_ring + core.offset("prb_desc_ring.tail_id") + counter, word, rb_size
    )
    o_size_bits = _need("size_bits", text_ring + core.offset("prb_data_ring.size_bits"), 4, rb_size)
    o_data = _need("data", text_ring + core.offset("prb_data_ring.data"), word, rb_size)

    desc_size = core.size("prb_desc")
    blk = core.offset("prb_desc.text_blk_lpos")
    o_state = _need("state_var", core.offset("prb_desc.state_var") + counter, word, desc_size)
    o_begin = _need("lpos.begin", blk + core.offset("prb_data_blk_lpos.begin"), word, desc_size)
    o_next = _need("lpos.next", blk + core.offset("prb_data_blk_lpos.next"), word, desc_size)

    info_size = core.size("printk_info")
    o_ts = _need("ts_nsec", core.offset("printk_info.ts_nsec"), 8, info_size)
    o_text_len = _need("text_len", core.offset("printk_info.text_len"), 2, info_size)

    # `prb` is a pointer variable (to printk_rb_static, or a bigger buffer set up at boot).
    rb = core.read(core.read_ulong(core.symbol("prb")), rb_size)
    (count_bits,) = struct.unpack_from(u32, rb, o_count_bits)
    (size_bits,) = struct.unpack_from(u32, rb, o_size_bits)
    (descs_addr,) = struct.unpack_from(ul, rb, o_descs)
    (infos_addr,) = struct.unpack_from(ul, rb, o_infos)
    (data_addr,) = struct.unpack_from(ul, rb, o_data)
    (head_id,) = struct.unpack_from(ul, rb, o_head)
    (tail_id,) = struct.unpack_from(ul, rb, o_tail)
    if count_bits > 31 or size_bits > 31:
        raise VmcoreError(f"printk ring buffer: implausible sizes 2^{count_bits}, 2^{size_bits}")
    count = 1 << count_bits
    ring = 1 << size_bits
    if count * (desc_size + info_size) + ring > max_bytes:
        raise VmcoreError(
            f"printk ring buffer: 2^{count_bits} records, 2^{size_bits} bytes is too big"
        )
    descs = core.read(descs_addr, count * desc_size)
    infos = core.read(infos_addr, count * info_size)
    text = core.read(data_addr, ring)

    sv_bits = word * 8
    id_mask = (1 << (sv_bits - 2)) - 1
    span = (head_id - tail_id) & id_mask
    if span >= count:
        # Cannot happen in a sane ring: show the newest `count` ids rather than loop for ages.
        tail_id = (head_id - count + 1) & id_mask
        span = count - 1

    records: list[tuple[int, bytes]] = []
    unpack_ul = struct.Struct(ul).unpack_from
    ident = tail_id
    for _ in range(span + 1):
        slot = ident & (count - 1)
        d = slot * desc_size
        (state_var,) = unpack_ul(descs, d + o_state)
        this = ident
        ident = (ident + 1) & id_mask
        if state_var & id_mask != this:
            continue  # the slot already holds another id
        if (state_var >> (sv_bits - 2)) not in (DESC_COMMITTED, DESC_FINALIZED):
            continue
        (begin,) = unpack_ul(descs, d + o_begin)
        (nxt,) = unpack_ul(descs, d + o_next)
        begin %= ring
        nxt %= ring
        if begin == nxt:
            continue  # data-less record (empty, or its text could not be stored)
        i = slot * info_size
        (text_len,) = struct.unpack_from(u16, infos, i + o_text_len)
        (ts_nsec,) = struct.unpack_from(u64, infos, i + o_ts)
        if begin > nxt:
            begin = 0  # a block that wraps is stored whole at the start of the ring
        begin += word  # the block starts with its descriptor id
        if begin <= nxt:
            text_len = min(text_len, nxt - begin)
        records.append((ts_nsec, text[begin : begin + text_len]))
    return records


def log_buf_records(core: Vmcore, max_bytes: int = DEFAULT_MAX_BYTES) -> list[tuple[int, bytes]]:
    """(ts_nsec, text) of the records of the 3.5-5.9 `log_buf` (struct printk_log)."""
    u16 = core.endian + "H"
    u64 = core.endian + "Q"
    hdr = core.size("printk_log")
    o_ts = _need("printk_log.ts_nsec", core.offset("printk_log.ts_nsec"), 8, hdr)
    o_len = _need("printk_log.len", core.offset("printk_log.len"), 2, hdr)
    o_text_len = _need("printk_log.text_len", core.offset("printk_log.text_len"), 2, hdr)

    buf_addr = core.read_ulong(core.symbol("log_buf"))
    buf_len = core.read_u32(core.symbol("log_buf_len"))
    first = core.read_u32(core.symbol("log_first_idx"))
    last = core.read_u32(core.symbol("log_next_idx"))
    if not 0 < buf_len <= max_bytes:
        raise VmcoreError(f"log_buf: implausible length {buf_len}")
    buf = core.read(buf_addr, buf_len)

    records: list[tuple[int, bytes]] = []
    idx = first
    for _ in range(buf_len // hdr + 2):
        if idx == last or idx + hdr > buf_len:
            break
        (length,) = struct.unpack_from(u16, buf, idx + o_len)
        if length == 0:
            # End-of-buffer marker: the record continues at the start.
            idx = 0
            (length,) = struct.unpack_from(u16, buf, o_len)
            if length == 0:
                break
        (text_len,) = struct.unpack_from(u16, buf, idx + o_text_len)
        (ts_nsec,) = struct.unpack_from(u64, buf, idx + o_ts)
        start = idx + hdr
        records.append((ts_nsec, buf[start : start + text_len]))
        idx += length
    return records


def read_records(core: Vmcore, max_bytes: int = DEFAULT_MAX_BYTES) -> list[tuple[int, bytes]]:
    """The log records, oldest first, from whichever buffer layout the kernel has."""
    try:
        if core.has("SYMBOL(prb)"):
            return lockless_records(core, max_bytes)
        if core.has("SYMBOL(log_buf)") and core.has("SYMBOL(log_first_idx)"):
            return log_buf_records(core, max_bytes)
    except (struct.error, ValueError, OverflowError, IndexError) as e:
        raise VmcoreError(f"corrupt printk buffer: {e}") from None
    raise VmcoreError("VMCOREINFO has neither SYMBOL(prb) nor SYMBOL(log_buf)/log_first_idx")


def extract_dmesg(core: Vmcore, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The kernel log as `makedumpfile --dump-dmesg` writes it, "\\n" line ends."""
    return "".join(format_record(ts, text) for ts, text in read_records(core, max_bytes))
