"""Compressing the archive so the capture kernel can unpack it, and undoing that for `inspect`."""

from __future__ import annotations

import gzip
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import zstandard

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import kernelfiles

log = logging.getLogger(__name__)

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
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
                self.level, threads=self.threads, write_content_size=True, write_checksum=True
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


def decompress(blob: bytes, source: str = "image") -> bytes:
    """Undo whatever compression the image uses, recognised by its magic number."""
    try:
        if blob.startswith(ZSTD_MAGIC):
            return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
        if blob.startswith(GZIP_MAGIC):
            return gzip.decompress(blob)
    except (zstandard.ZstdError, OSError, EOFError) as exc:
        raise KdumpError(f"{source}: corrupt compressed data: {exc}") from None
    if blob.startswith(b"070701"):
        return blob
    raise KdumpError(f"{source}: not a zstd, gzip or plain newc cpio image")
