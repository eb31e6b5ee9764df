"""The one chunked sha256 of a file, which the capture stage, raw recovery and the harness use."""

import hashlib
import os
import threading
from pathlib import Path

import pytest

from kdump_mkinitrd.capture.filedigest import CHUNK, sha256_file


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 7])
def test_whole_file(tmp_path: Path, size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    path = tmp_path / "f"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("limit", [0, 5, CHUNK, CHUNK + 3, 10 * CHUNK])
def test_first_bytes(tmp_path: Path, limit: int) -> None:
    data = bytes(i % 253 for i in range(CHUNK + 100))
    path = tmp_path / "f"
    path.write_bytes(data)
    assert sha256_file(path, limit=limit) == hashlib.sha256(data[:limit]).hexdigest()


def test_a_file_without_readahead(tmp_path: Path) -> None:
    """A FIFO refuses posix_fadvise (ESPIPE): the digest is still read and right."""
    data = bytes(i % 241 for i in range(CHUNK + 11))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(data))
    writer.start()
    try:
        assert sha256_file(fifo) == hashlib.sha256(data).hexdigest()
    finally:
        writer.join()
