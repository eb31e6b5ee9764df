"""The image plan: every path the image will hold, what it is, and which feature put it there.

Resolution fills the plan; the writer only reads it. Paths are absolute in the image. A path
whose directory is a symlink in the plan (`/lib` -> `usr/lib` on a usr-merged host) is stored
under the symlink's target, as the kernel's unpacker would place it.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.cpio import Entry, Kind
from kdump_mkinitrd.image.elfstrip import loadable_only
from kdump_mkinitrd.image.inputs import record


@dataclass(frozen=True)
class Planned:
    path: str
    kind: Kind
    mode: int
    feature: str
    why: str
    source: Path | None = None  # a host file whose content is copied
    data: bytes = b""  # generated content, or a symlink's target
    rdev: tuple[int, int] = (0, 0)
    strip: bool = False  # an ELF program or library: keep only what the loader maps
    origins: tuple[Path, ...] = ()  # the host files generated `data` came from (inputs)

    def same_as(self, other: Planned) -> bool:
        return (self.kind, self.mode, self.source, self.data, self.rdev) == (
            other.kind,
            other.mode,
            other.source,
            other.data,
            other.rdev,
        )


class ImagePlan:
    def __init__(self) -> None:
        self._items: dict[str, Planned] = {}

    def _add(self, item: Planned) -> None:
        if not item.path.startswith("/") or ".." in item.path.split("/"):
            raise KdumpError(f"feature {item.feature!r} asked for a bad image path {item.path!r}")
        old = self._items.get(item.path)
        if old is None:
            self._items[item.path] = item
        elif not old.same_as(item) and not (old.kind == item.kind == "dir"):
            raise KdumpError(
                f"image path {item.path} is claimed twice: by {old.feature} ({old.why}) and by "
                f"{item.feature} ({item.why})"
            )

    def file(
        self,
        path: str,
        feature: str,
        why: str,
        *,
        source: Path | None = None,
        data: bytes = b"",
        mode: int = 0o644,
        strip: bool = False,
        origins: tuple[Path, ...] = (),
    ) -> None:
        self._add(
            Planned(
                path,
                "file",
                mode,
                feature,
                why,
                source=source,
                data=data,
                strip=strip,
                origins=origins,
            )
        )

    def directory(self, path: str, feature: str, why: str, mode: int = 0o755) -> None:
        self._add(Planned(path, "dir", mode, feature, why))

    def symlink(self, path: str, target: str, feature: str, why: str) -> None:
        self._add(Planned(path, "symlink", 0o777, feature, why, data=target.encode()))

    def node(self, path: str, kind: Kind, rdev: tuple[int, int], mode: int, feature: str) -> None:
        self._add(Planned(path, kind, mode, feature, "device node", rdev=rdev))

    def has(self, path: str) -> bool:
        return path in self._items

    def _canonical(self, path: str) -> str:
        """Follow symlinks in the plan for every directory component of `path`."""
        parts = [p for p in path.split("/") if p]
        resolved = "/"
        for depth, part in enumerate(parts):
            candidate = posixpath.join(resolved, part)
            link = self._items.get(candidate)
            last = depth == len(parts) - 1
            hops = 0
            while not last and link is not None and link.kind == "symlink":
                hops += 1
                if hops > 40:
                    raise KdumpError(f"symlink loop in the image at {candidate}")
                target = link.data.decode()
                candidate = posixpath.normpath(posixpath.join(posixpath.dirname(candidate), target))
                link = self._items.get(candidate)
            resolved = candidate
        return resolved

    def items(self) -> list[Planned]:
        """The final plan: paths canonical, parent directories present, sorted."""
        out: dict[str, Planned] = {}
        for item in self._items.values():
            canonical = self._canonical(item.path)
            placed = replace(item, path=canonical)
            old = out.get(canonical)
            if old is not None and not old.same_as(placed) and old.kind != "dir":
                raise KdumpError(
                    f"image paths {old.path} and {item.path} land on the same place {canonical}"
                    f" ({old.feature}: {old.why}; {item.feature}: {item.why})"
                )
            if old is None or old.kind == "dir":
                out[canonical] = placed
        for path in list(out):
            parent = posixpath.dirname(path)
            while parent != "/" and parent not in out:
                out[parent] = Planned(parent, "dir", 0o755, out[path].feature, f"holds {path}")
                parent = posixpath.dirname(parent)
        return [out[p] for p in sorted(out, key=lambda p: p.split("/"))]

    def entries(self) -> tuple[list[Entry], dict[str, dict[str, Any]]]:
        """cpio entries, and a record of every host file they came from: the one place
        content is read."""
        result = []
        inputs: dict[str, dict[str, Any]] = {}
        for item in self.items():
            data = item.data
            try:
                if item.kind == "file" and item.source is not None:
                    data = item.source.read_bytes()
                    inputs[str(item.source)] = record(item.source, data)
                    if item.strip:
                        data = loadable_only(data)
                else:
                    for origin in item.origins:
                        inputs[str(origin)] = record(origin)
            except OSError as exc:
                host = exc.filename or item.source
                raise KdumpError(
                    f"cannot read {host} for {item.path} ({item.feature}: {item.why}):"
                    f" {exc.strerror}"
                ) from None
            result.append(Entry(item.path.lstrip("/"), item.kind, item.mode, data, item.rdev))
        return result, inputs
