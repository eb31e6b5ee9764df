"""sha256 of a file, read in chunks: a vmcore can be larger than the memory that hashes it.

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
    fd = os.open(path, os.O_RDONLY)
    try:
        while left is None or left > 0:
            chunk = os.read(fd, CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()
