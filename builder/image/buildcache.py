"""What one build computes that the next can reuse, stored under the cache directory.

Everything here is keyed by content (a digest of the bytes that went in, with the settings
that shaped the result), never by a path or a time, so a hit gives exactly the bytes a fresh
computation would: the image stays the same byte for byte with a cold or a warm cache.
A cache that cannot be read or written costs time on the next build, nothing else; an entry
whose stored digest does not match its bytes is a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Least recently used entries go first once a store holds more than this.
DEFAULT_LIMIT = 64 << 20
_DIGEST = 32


def cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return cache_dir
    # Imported here: resolving the default costs an import of kmod, which most callers have.
    from kdump_mkinitrd.hostscan.kmod import default_cache_dir

    return default_cache_dir()


def key_of(*parts: bytes | str) -> str:
    """A digest over `parts`, each length-prefixed so that no two lists give one key."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's content."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class BlobStore:
    """Byte strings by key, one file each, written atomically."""

    def __init__(self, directory: Path, limit: int = DEFAULT_LIMIT) -> None:
        self.directory = directory
        self.limit = limit
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.directory / key

    def get(self, key: str) -> bytes | None:
        return self.load(key, lambda data: data)

    def load(self, key: str, parse: Callable[[bytes], T | None]) -> T | None:
        """The entry under `key` as `parse` reads it; a miss when there is none, when it is
        damaged, or when `parse` finds it stale (None)."""
        path = self._path(key)
        try:
            stored = path.read_bytes()
        except OSError:
            self.misses += 1
            return None
        data = stored[_DIGEST:]
        if hashlib.sha256(data).digest() != stored[:_DIGEST]:
            log.warning("ignoring damaged cache entry %s", path)
            self.misses += 1
            return None
        value = parse(data)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: pruned last
        return value

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(hashlib.sha256(data).digest() + data)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot write cache entry %s: %s", path, exc)
            tmp.unlink(missing_ok=True)

    def prune(self) -> None:
        """Drop the least recently used entries until the store fits its limit."""
        try:
            entries = [(e.stat().st_mtime_ns, e.stat().st_size, e)
                       for e in os.scandir(self.directory)
                       if e.is_file() and not e.name.startswith(".")]  # fmt: skip
        except OSError:
            return
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.limit:
                break
            try:
                os.unlink(entry.path)
            except OSError:
                continue
            total -= size


def program_output(
    cache_dir: Path | None, program: Path, args: list[str], run: Callable[[], str]
) -> str:
    """What `run` prints about `program` (its applets, its features), from the cache when
    a program with the same content was asked the same before."""
    store = BlobStore(cache_root(cache_dir) / "programs")
    key = key_of("program output", file_digest(program), *args)
    cached = store.get(key)
    if cached is not None:
        return cached.decode()
    text = run()
    store.put(key, text.encode())
    store.prune()
    return text
