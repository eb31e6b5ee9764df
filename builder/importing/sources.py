"""A peer's configuration file as the importer reads it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdump_mkinitrd.errors import KdumpError


@dataclass(frozen=True)
class SourceFile:
    name: str  # as the report and the output's comments name it
    text: str

    @classmethod
    def read(cls, path: Path) -> SourceFile:
        try:
            return cls(str(path), path.read_text())
        except OSError as exc:
            raise KdumpError(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise KdumpError(f"{path}: not UTF-8 text") from None


def only_one(files: list[SourceFile], peer: str) -> list[SourceFile]:
    """The files of a peer that keeps its settings in one file."""
    if len(files) != 1:
        raise KdumpError(f"{peer} keeps its settings in one file; got {len(files)}")
    return files
