"""sha256 of a file, read in chunks: a vmcore can be larger than the memory that hashes it.

The capture stage hashes the dump it has just written, and in a small capture kernel most of
it has already left the page cache, so the hash waits on the disk as much as it computes:
asking for the next chunk before hashing this one (POSIX_FADV_WILLNEED starts the read and
returns) lets the disk and the hash overlap.

It lives in the capture package because that imports nothing else of ours while everything
else may import it: the capture stage, raw recovery and the QEMU harness share this one.
"""

from __future__ import annotations

import hashlib
import os

CHUNK = 4 << 20


def sha256_file(path: str | os.PathLike[str], limit: int | None = None) -> str:
    """Hex sha256 of the file, or of its first `limit` bytes."""
    digest = hashlib.sha256()
    left = limit
    offset = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while left is None or left > 0:
            _read_ahead(fd, offset + CHUNK)
            chunk = os.read(fd, CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            offset += len(chunk)
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _read_ahead(fd: int, offset: int) -> None:
    # Not contextlib.suppress: the capture stage imports nothing it can do without.
    try:  # noqa: SIM105
        os.posix_fadvise(fd, offset, CHUNK, os.POSIX_FADV_WILLNEED)
    except OSError:  # a pipe or a filesystem without readahead: plain reads still work
        pass
