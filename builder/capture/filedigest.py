"""sha256 of a file, read in chunks: a vmcore can be larger than the memory that hashes it.

The capture stage hashes the dump it has just written, and in a small capture kernel most of
it has already left the page cache, so the hash waits on the disk as much as it computes:
asking for the next 4 MiB before hashing these (POSIX_FADV_WILLNEED starts the read and
returns) lets the disk and the hash overlap.

It lives in the capture package because that imports nothing else of ours while everything
else may import it: the capture stage, raw recovery and the QEMU harness share this one.
"""

from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 20
READ_AHEAD = 4 * CHUNK


def sha256_file(path: str | os.PathLike[str], limit: int | None = None) -> str:
    """Hex sha256 of the file, or of its first `limit` bytes.

    One buffer is read into again and again: a new bytes object per chunk would hold two
    chunks at once at each step, memory a capture kernel near its limit does not have."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(CHUNK))
    left = limit
    offset = 0
    with open(path, "rb", buffering=0) as file:
        fd = file.fileno()
        while left is None or left > 0:
            if offset % READ_AHEAD == 0:
                _read_ahead(fd, offset + READ_AHEAD)
            got = file.readinto(buffer if left is None else buffer[: min(CHUNK, left)])
            if not got:
                break
            offset += got
            digest.update(buffer[:got])
            if left is not None:
                left -= got
    return digest.hexdigest()


def _read_ahead(fd: int, offset: int) -> None:
    # Not contextlib.suppress: the capture stage imports nothing it can do without.
    try:  # noqa: SIM105
        os.posix_fadvise(fd, offset, READ_AHEAD, os.POSIX_FADV_WILLNEED)
    except OSError:  # a pipe or a filesystem without readahead: plain reads still work
        pass
