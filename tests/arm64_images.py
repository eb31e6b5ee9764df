"""The arm64 kernel files distributions ship, made from the real Debian arm64 `Image`.

Ubuntu's `vmlinuz` is the Image gzip-compressed; Fedora's is an EFI zboot image. The zboot
files here follow the kernel's own recipe (drivers/firmware/efi/libstub/Makefile.zboot and
zboot-header.S), written out independently of the code under test: the Image padded with
zeros to its in-memory size (le32 at 16, what `copy_and_pad` reads), compressed (every method
but gzip appends the uncompressed size as le32, which the header's payload size leaves out),
placed after a 4 KiB header and a stand-in for the EFI decompressor's code.
"""

from __future__ import annotations

import gzip
import lzma
import struct
from collections.abc import Callable

import zstandard

LINUX_PE_MAGIC = 0x818223CD  # include/linux/pe.h, at 0x38 in every EFI-stub kernel
PE_HEADER_AT = 0x40
HEADER_END = 0x1000  # .Lefi_header_end is 4 KiB aligned
STUB_CODE = 48 * 1024  # the decompressor's .text; its content is irrelevant to a loader


def padded_image(image: bytes) -> bytes:
    """vmlinux.bin: the Image padded to its image_size, as Makefile.zboot compresses it."""
    (size,) = struct.unpack_from("<I", image, 16)
    assert size >= len(image)
    return image + bytes(size - len(image))


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


def _lzma(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_ALONE, preset=0)


def _xz(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=0)


# zboot compression name → compressor. The names are Makefile.zboot's comp-type values.
COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": _gzip,
    "zstd22": _zstd,
    "zstd": _zstd,
    "lzma": _lzma,
    "xzkern": _xz,
}


def zboot(image: bytes, comp_type: str, payload: bytes | None = None) -> bytes:
    """An EFI zboot image of *image* compressed as *comp_type* (or carrying *payload*, the
    compressed bytes as given, for names no compressor here handles)."""
    vmlinux_bin = padded_image(image)
    data = COMPRESSORS[comp_type](vmlinux_bin) if payload is None else payload
    size_len = 0 if comp_type == "gzip" else 4
    gzdata = data + (struct.pack("<I", len(vmlinux_bin)) if size_len else b"")
    payload_at = HEADER_END + STUB_CODE  # .rodata, 8-byte aligned, starts with .gzdata
    header = bytearray(HEADER_END)
    struct.pack_into("<2s2x4sII8x", header, 0, b"MZ", b"zimg", payload_at, len(gzdata) - size_len)
    name = comp_type.encode() + b"\0"
    header[24 : 24 + len(name)] = name
    struct.pack_into("<II", header, 0x38, LINUX_PE_MAGIC, PE_HEADER_AT)
    struct.pack_into("<4sH", header, PE_HEADER_AT, b"PE\0\0", 0xAA64)  # IMAGE_FILE_MACHINE_ARM64
    body = bytes(header) + b"\xd5\x03\x20\x1f" * (STUB_CODE // 4) + gzdata  # arm64 NOPs
    return body + bytes(-len(body) % 4096)  # _etext and the data section are page aligned
