"""Compressing the archive so the capture kernel can unpack it, and undoing that for `inspect`."""

from __future__ import annotations

import gzip
import io
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import zstandard

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import kernelfiles
from kdump_mkinitrd.image.buildcache import BlobStore, key_of
from kdump_mkinitrd.image.cpio import archive_end

log = logging.getLogger(__name__)

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# The kernel's zstd unpacker allocates the frame's whole window while it unpacks the image,
# on top of the compressed and the unpacked image: at level 9 that is 4 MiB of a ~100 MB
# capture kernel. A 512 KiB window costs about 1% in size (make bench).
ZSTD_WINDOW_LOG = 19
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Compression:
    method: str  # "zstd" | "gzip" | "none"
    level: int
    threads: int

    def compress(self, data: bytes) -> bytes:
        if self.method == "zstd":
            # The kernel's zstd unpacker wants the content size and no dictionary; a single
            # frame with content size written lets it size its window from the header.
            params = zstandard.ZstdCompressionParameters.from_level(
                self.level,
                threads=self.threads,
                window_log=ZSTD_WINDOW_LOG,
                write_content_size=True,
                write_checksum=True,
            )
            return zstandard.ZstdCompressor(compression_params=params).compress(data)
        if self.method == "gzip":
            out = io.BytesIO()
            # mtime=0 keeps the gzip header reproducible.
            with gzip.GzipFile(
                fileobj=out, mode="wb", compresslevel=min(self.level, 9), mtime=0
            ) as gz:
                gz.write(data)
            return out.getvalue()
        return data

    def cache_key(self, data: bytes) -> str:
        """What decides the compressed bytes of `data`: the settings, the compressor's
        version (another version may choose other matches) and the content."""
        version = zstandard.ZSTD_VERSION if self.method == "zstd" else gzip.__name__
        window = ZSTD_WINDOW_LOG if self.method == "zstd" else ""
        settings = f"{self.method} {self.level} {self.threads} {window} {version}"
        return key_of(settings, data)


def compress_segments(
    segments: list[bytes], method: Compression, store: BlobStore | None = None
) -> bytes:
    """The segments compressed one by one and concatenated, as the kernel unpacks them; each
    compressed segment is taken from `store` when the same bytes were compressed before with
    the same settings, so a build recompresses only what changed."""
    if method.method == "none":
        return b"".join(segments)
    out = []
    for segment in segments:
        key = method.cache_key(segment) if store is not None else ""
        packed = store.get(key) if store is not None else None
        if packed is None:
            packed = method.compress(segment)
            if store is not None:
                store.put(key, packed)
        out.append(packed)
    return b"".join(out)


def kernel_config(
    kver: str,
    kernel_image: Path | None,
    boot_dir: Path = Path("/boot"),
    kmoddir: Path | None = None,
) -> Path | None:
    """The kernel's build config, wherever the distribution keeps it (see kernelfiles)."""
    return kernelfiles.find_config(kver, kernel_image, kmoddir, boot_dir)


def choose(requested: Compression, config: Path | None) -> tuple[Compression, str | None]:
    """Fall back to gzip when the kernel cannot unpack zstd; return a note saying so."""
    if requested.method != "zstd" or config is None:
        return requested, None
    options = kernelfiles.read_config(config)
    if "CONFIG_RD_ZSTD=y" in options.splitlines():
        return requested, None
    note = f"{config} lacks CONFIG_RD_ZSTD=y: compressing the image with gzip instead of zstd"
    log.warning(note)
    return Compression("gzip", 9, requested.threads), note


def _one_frame(blob: bytes, source: str) -> tuple[bytes, bytes]:
    """The first compressed (or plain) piece of `blob` undone, and the bytes after it."""
    if blob.startswith(ZSTD_MAGIC):
        unpacker = zstandard.ZstdDecompressor().decompressobj()
        data = unpacker.decompress(blob)
        if not unpacker.eof:
            raise EOFError("zstd frame ends early")
        return data, unpacker.unused_data
    if blob.startswith(GZIP_MAGIC):
        # zlib's gzip mode stops at the end of one member and leaves the rest unused.
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        data = inflater.decompress(blob)
        if not inflater.eof:
            raise EOFError("gzip member ends early")
        return data, inflater.unused_data
    if blob.startswith(b"070701"):
        end = archive_end(blob)
        return blob[:end], blob[end:]
    raise KdumpError(f"{source}: not a zstd, gzip or plain newc cpio image")


def pieces(blob: bytes, source: str = "image") -> list[bytes]:
    """Each compressed or plain piece of the image undone, in order: the kernel unpacks
    concatenated compressed and plain archives, and so do we."""
    out = []
    rest = blob
    try:
        while rest:
            data, rest = _one_frame(rest, source)
            out.append(data)
            rest = rest.lstrip(b"\0")  # the kernel skips zero padding between pieces
    except (zstandard.ZstdError, zlib.error, OSError, EOFError) as exc:
        raise KdumpError(f"{source}: corrupt compressed data: {exc}") from None
    if not out:
        raise KdumpError(f"{source}: not a zstd, gzip or plain newc cpio image")
    return out


def decompress(blob: bytes, source: str = "image") -> bytes:
    """The whole archive (or concatenated archives) inside the image."""
    return b"".join(pieces(blob, source))
