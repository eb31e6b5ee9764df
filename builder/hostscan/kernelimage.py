"""What a kernel image file is, and the uncompressed kernel kexec_file_load needs from it.

kexec_file_load parses the image in the kernel, and each architecture's parser takes only its
own raw format: an x86 bzImage, an uncompressed arm64 `Image` (arch/arm64/kernel/
kexec_image.c). Distributions' arm64 `vmlinuz` differ: Debian ships the raw Image, Ubuntu a
gzip-compressed Image, Fedora an EFI zboot image (a small EFI decompressor with the compressed
Image inside). A compressed one is decompressed here into a sealed memory file (memfd), whose
descriptor goes to the kernel, or, as /proc/self/fd/N, to kexec-tools.

Formats, with their sources:

- arm64 Image (Documentation/arch/arm64/booting.rst): a 64-byte header, le64 `image_size`
  (the size in memory, BSS included) at 16, the magic "ARM\\x64" (le32 0x644d5241) at 56. With
  the EFI stub it also starts with "MZ", so "MZ" alone says nothing.
- x86 bzImage (Documentation/arch/x86/boot.rst): "HdrS" at 0x202.
- EFI zboot (drivers/firmware/efi/libstub/zboot-header.S and Makefile.zboot): "MZ\\0\\0", the
  image type "zimg" at 4, le32 payload offset at 8 and le32 payload size at 12 (relative to
  the file's start), two reserved le32, then the NUL-terminated compression name at 24
  ("gzip", "zstd22", "lzma", "xzkern", "lz4", "lzo"; newer kernels offer only gzip and zstd,
  named "zstd").
  The payload is the Image padded with zeros to its `image_size` (Makefile.zboot's
  copy_and_pad), compressed; the size the non-gzip methods append after it is not counted in
  the payload size.
"""

from __future__ import annotations

import contextlib
import fcntl
import lzma
import os
import stat
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import zstandard

from kdump_mkinitrd.errors import KdumpError

ARM64_MAGIC = b"ARM\x64"
_ARM64_MAGIC_AT = 56
_BZIMAGE_MAGIC = b"HdrS"
_BZIMAGE_MAGIC_AT = 0x202
_GZIP_MAGIC = b"\x1f\x8b"
_ZBOOT_TYPE = b"zimg"
_ZBOOT_HEADER = struct.Struct("<2s2x4sII8x")  # "MZ", pad, "zimg", payload offset, size, reserved
_ZBOOT_COMP_AT = 24
_ZBOOT_COMP_MAX = 32  # the name ends before the PE magic at 0x38
# No kernel Image comes near this; it bounds what a corrupt or hostile payload can make us
# allocate.
MAX_IMAGE_BYTES = 512 << 20
_CHUNK = 4096  # input fed per decompressor call, so the output cap is checked as we go

# What kexec_file_load takes on each architecture, by `uname -m` (normalised).
_RAW_FORMAT = {"x86_64": "x86 bzImage", "aarch64": "arm64 Image"}


@dataclass(frozen=True)
class KernelFile:
    """What a kernel file is: its format and, when compressed, where its payload lies."""

    path: Path
    arch: str | None  # the machine the (uncompressed) kernel is for; None: not recognised
    compression: str | None = None  # gzip, zstd22, ...: the kernel is compressed
    zboot: bool = False  # an EFI zboot image (the payload is at payload_at, payload_bytes)
    payload_at: int = 0
    payload_bytes: int | None = None  # None: to the end of the file

    def describe(self) -> str:
        unknown = "kernel" if self.compression else "kernel image of an unrecognised format"
        raw = _RAW_FORMAT.get(self.arch or "", unknown)
        if self.zboot:
            return f"EFI zboot image ({self.compression}-compressed {raw})"
        if self.compression:
            return f"{self.compression}-compressed {raw}"
        return raw


def raw_arch(data: bytes | bytearray) -> str | None:
    """The machine an uncompressed kernel image is for, from its header; None if unknown."""
    if data[_ARM64_MAGIC_AT : _ARM64_MAGIC_AT + 4] == ARM64_MAGIC:
        return "aarch64"
    if data[_BZIMAGE_MAGIC_AT : _BZIMAGE_MAGIC_AT + 4] == _BZIMAGE_MAGIC:
        return "x86_64"
    return None


def identify(path: Path, head: bytes, size: int) -> KernelFile:
    """Recognise a kernel file from its first bytes (at least 1 KiB, when the file has them)
    and its size. A zboot header that points outside the file is an error naming it."""
    if head[:2] == b"MZ" and head[4:8] == _ZBOOT_TYPE and len(head) >= _ZBOOT_COMP_AT:
        _mz, _type, offset, length = _ZBOOT_HEADER.unpack_from(head)
        name = head[_ZBOOT_COMP_AT : _ZBOOT_COMP_AT + _ZBOOT_COMP_MAX].split(b"\0", 1)[0]
        compression = name.decode("ascii", "replace") or "(none named)"
        if offset < _ZBOOT_HEADER.size or length == 0 or offset + length > size:
            raise KdumpError(
                f"{path} is an EFI zboot image whose payload ({length} bytes at {offset}) "
                f"lies outside the file ({size} bytes): the file is truncated or corrupt"
            )
        return KernelFile(path, None, compression, True, offset, length)
    if head.startswith(_GZIP_MAGIC):
        return KernelFile(path, None, "gzip")
    return KernelFile(path, raw_arch(head))


# ---------------------------------------------------------------------------------------------
# Decompression


class _Decompressor(Protocol):
    """What zlib's, zstandard's and lzma's streaming decompressors have in common."""

    @property
    def eof(self) -> bool: ...

    def decompress(self, data: bytes) -> bytes: ...


def _feed(d: _Decompressor, data: bytes, path: Path, what: str) -> tuple[bytearray, bool]:
    """Unpack *data* up to the end of its first stream (the kernel's decompressors stop there
    too); the output and whether the stream ended."""
    out = bytearray()
    for at in range(0, len(data), _CHUNK):
        out += d.decompress(data[at : at + _CHUNK])
        if len(out) > MAX_IMAGE_BYTES:
            raise KdumpError(
                f"{path}: the {what} payload unpacks to more than {MAX_IMAGE_BYTES >> 20} MiB, "
                "which no kernel is: the file is corrupt"
            )
        if d.eof:
            break
    return out, d.eof


# The zboot names (and "gzip" for a gzip file) → a new decompressor. zlib's gzip mode and
# zstd's (with the checksum `zstd` writes by default) and xz's checks catch a corrupt payload.
_DECOMPRESSORS: dict[str, Callable[[], _Decompressor]] = {
    "gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "zstd": lambda: zstandard.ZstdDecompressor().decompressobj(),
    "zstd22": lambda: zstandard.ZstdDecompressor().decompressobj(),
    "lzma": lambda: lzma.LZMADecompressor(format=lzma.FORMAT_ALONE),
    "xzkern": lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ),
}
_CORRUPT = (zlib.error, zstandard.ZstdError, lzma.LZMAError, EOFError)


def decompress(kernel: KernelFile, data: bytes) -> bytes:
    """The uncompressed kernel inside *data* (the whole file *kernel* describes), checked to
    be a kernel image whose architecture the header names; errors name the file."""
    assert kernel.compression is not None
    make = _DECOMPRESSORS.get(kernel.compression)
    what = kernel.describe()
    if make is None:
        raise KdumpError(
            f"{kernel.path} ({what}): {kernel.compression} is not supported (gzip, zstd, lzma "
            "and xz are); decompress it yourself and give the Image with --kernel"
        )
    end = None if kernel.payload_bytes is None else kernel.payload_at + kernel.payload_bytes
    try:
        out, ended = _feed(make(), data[kernel.payload_at : end], kernel.path, what)
    except _CORRUPT as exc:
        raise KdumpError(f"{kernel.path}: the {what} is corrupt: {exc}") from None
    if not ended:
        raise KdumpError(
            f"{kernel.path}: the {kernel.compression} data of the {what} ends before its "
            "stream does: the file is truncated"
        )
    if raw_arch(out) is None:
        raise KdumpError(
            f"{kernel.path}: the {kernel.compression}-compressed payload is not a kernel Image "
            "(no arm64 or x86 boot header in it)"
        )
    return bytes(out)


def uncompressed(data: bytes, path: Path = Path("<kernel>")) -> bytes | None:
    """*data* unpacked when it is a compressed kernel (gzip, zboot); None when it is not, or
    when it cannot be unpacked."""
    try:
        kernel = identify(path, data[:1024], len(data))
        return decompress(kernel, data) if kernel.compression else None
    except KdumpError:
        return None


# ---------------------------------------------------------------------------------------------
# The descriptor kexec_file_load is given


@dataclass(frozen=True)
class KexecKernel:
    """An open kernel ready for kexec: the file itself (read-only) or a sealed memfd."""

    file: KernelFile
    fd: int
    size: int  # bytes the kernel will read (the uncompressed size)
    in_memory: bool  # fd is a memfd holding the decompressed kernel

    @property
    def path(self) -> Path:
        return self.file.path

    def tool_path(self) -> str:
        """The name kexec-tools opens: the file, or the memfd through /proc (pass fd on)."""
        return f"/proc/self/fd/{self.fd}" if self.in_memory else str(self.path)


def _check_machine(kernel: KernelFile, machine: str) -> None:
    if kernel.arch is None or kernel.arch == machine:
        return
    raise KdumpError(
        f"{kernel.path} ({kernel.describe()}) is a kernel for {kernel.arch}, not for this machine "
        f"({machine}): give this machine's kernel"
    )


def _memfd(name: str, data: bytes) -> int:
    """A memory file holding *data*, sealed so that nothing can change the checked kernel.

    memfd_create's descriptor is writable, yet kexec_file_load takes it: a file made by
    memfd_create counts no writer, so kernel_read_file()'s deny_write_access() passes (a
    Debian 6.1 guest crash-loads from it: tests/test_kexec.py).
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def open_for_kexec(path: Path, machine: str) -> Iterator[KexecKernel]:
    """Open *path* for loading on *machine* (normalised `uname -m`): the file itself when
    kexec_file_load takes it as it is, else its decompressed kernel in a sealed memfd. A
    kernel for another machine, or a compressed file that does not unpack to an Image, is an
    error naming the file, before anything is loaded. An unrecognised format is handed on as
    it is: the kernel's own parsers judge it (ENOEXEC then falls back to kexec-tools)."""
    with open_regular(path, "kernel") as (fd, size):
        kernel = identify(path, os.pread(fd, 1024, 0), size)
        if kernel.compression is None:
            _check_machine(kernel, machine)
            yield KexecKernel(kernel, fd, size, in_memory=False)
            return
        data = _read_all(fd, size, path)
        image = decompress(kernel, data)
        del data
        kernel = replace(kernel, arch=raw_arch(image))
        _check_machine(kernel, machine)
        try:
            memfd = _memfd(f"kdump-kernel:{path.name}", image)
        except OSError as exc:
            raise KdumpError(
                f"cannot hold the decompressed kernel of {path} in a memory file: {exc.strerror}"
            ) from None
        try:
            yield KexecKernel(kernel, memfd, len(image), in_memory=True)
        finally:
            os.close(memfd)


@contextlib.contextmanager
def open_regular(path: Path, what: str) -> Iterator[tuple[int, int]]:
    """Open *path* read-only; yield (fd, size). Missing or unreadable files name themselves."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KdumpError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise KdumpError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KdumpError(f"{what} {path} is not a regular file")
        yield fd, info.st_size
    finally:
        os.close(fd)


def _read_all(fd: int, size: int, path: Path) -> bytes:
    if size > MAX_IMAGE_BYTES:
        raise KdumpError(f"{path} is {size >> 20} MiB, larger than any kernel: not a kernel")
    chunks = []
    at = 0
    while at < size:
        chunk = os.pread(fd, size - at, at)
        if not chunk:
            raise KdumpError(f"{path} shrank while it was being read")
        chunks.append(chunk)
        at += len(chunk)
    return b"".join(chunks)
