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
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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
            with contextlib.suppress(OSError):  # a read-only mount refuses even this
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


class StatCache:
    """JSON values about files (a digest, parsed ELF facts), by each file's whole stat
    identity: device, inode, size, mtime and ctime. Writing a file moves its ctime, which no
    one can set back short of the clock, so an unchanged identity means unchanged content."""

    def __init__(self, path: Path | None = None, kept: int = 20000) -> None:
        self.path = path
        self.kept = kept
        self.hits = 0
        self._known: dict[str, Any] = {}
        self._used: dict[str, Any] = {}
        if path is not None:
            try:
                loaded = json.loads(path.read_text())
                if isinstance(loaded, dict):
                    self._known = loaded
            except (OSError, ValueError):
                pass

    @staticmethod
    def _key(path: Path | str, st: os.stat_result) -> str:
        return (f"{path}\0{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:"
                f"{st.st_ctime_ns}")  # fmt: skip

    def get(self, path: Path | str, st: os.stat_result) -> Any:
        """The value kept for this file as it is now; None when there is none."""
        key = self._key(path, st)
        value = self._known.get(key)
        if value is not None:
            self.hits += 1
            self._used[key] = value
        return value

    def put(self, path: Path | str, st: os.stat_result, value: Any) -> None:
        self._used[self._key(path, st)] = value

    def save(self) -> None:
        """Keep what earlier builds and this one used; past `kept` entries only what this
        one used, so the file does not grow with every kernel ever built."""
        merged = {**self._known, **self._used}
        if len(merged) > self.kept:
            merged = self._used
        if self.path is None or merged == self._known:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(merged))
            os.replace(tmp, self.path)
        except OSError:  # unwritable: costs time on the next build, no more
            with contextlib.suppress(OSError):  # a read-only mount refuses even this
                tmp.unlink(missing_ok=True)
