"""Dropping what the dynamic loader never reads from an ELF program or library.

The loader maps only what program headers describe; section headers, symbol tables and
debug information after the last loadable byte are dead weight in a capture image (a pyenv
libpython carries 20 MB of them). We keep every byte any program header covers and cut the
rest, as `sstrip` does. Kernel modules are never passed here: the kernel reads sections.
"""

from __future__ import annotations

import struct

_ELF64_LE = b"\x7fELF\x02\x01"
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")


def loadable_only(data: bytes) -> bytes:
    """`data` cut after the last byte a program header covers; non-ELF64-LE data unchanged."""
    if not data.startswith(_ELF64_LE) or len(data) < _EHDR.size:
        return data
    fields = _EHDR.unpack_from(data)
    phoff, shoff, phentsize, phnum = fields[5], fields[6], fields[9], fields[10]
    if phnum == 0 or phentsize != _PHDR.size or phoff + phnum * phentsize > len(data):
        return data
    end = phoff + phnum * phentsize
    for i in range(phnum):
        p_offset, p_filesz = _PHDR.unpack_from(data, phoff + i * phentsize)[2:6:3]
        end = max(end, p_offset + p_filesz)
    if end >= len(data) or (shoff and shoff < end):
        return data
    # No section headers any more: say so, or tools would read garbage past the end.
    header = _EHDR.pack(*fields[:6], 0, *fields[7:11], 0, 0, 0)
    return header + data[_EHDR.size : end]
