"""What an image was built from, and whether any of it changed since.

Each input is recorded with its size, mtime and sha256. The up-to-date check stats every
input and hashes only those whose stat changed, so a no-op check never re-reads the module
tree: that is what keeps `build --if-needed` and `register` fast at every boot.

Host paths and mtimes depend on where the code, the config and the kernel live, not on what
they hold, so they stay out of the image (whose bytes must be the same wherever it is built):
they go to a record beside it, IMAGE.inputs.json, which also holds the image's own digest.
A missing record, or one written for other image bytes, means a rebuild, never a wrong
"up to date".
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kdump_mkinitrd import __version__
from kdump_mkinitrd.image.buildcache import StatCache
from kdump_mkinitrd.output import write_atomic
from kdump_mkinitrd.paths import HARNESS_DIR, PACKAGE_DIR, TEMPLATES_DIR

# depmod's files decide the module closure as much as the modules themselves.
MODULE_INDEX_FILES = (
    "modules.dep", "modules.alias", "modules.softdep", "modules.builtin",
    "modules.builtin.modinfo", "modules.order",
)  # fmt: skip
RECORD_SUFFIX = ".inputs.json"


class DigestCache(StatCache):
    """sha256 of files by their stat identity (see StatCache): a build rehashes only what
    changed since the last."""

    def digest(self, path: Path, st: os.stat_result, data: bytes | None) -> str:
        known = self.get(path, st)
        if not isinstance(known, str):
            known = hashlib.sha256(path.read_bytes() if data is None else data).hexdigest()
            self.put(path, st, known)
        return known


# In memory only, until a build opens the one in its cache folder (use_digests).
_digests = DigestCache()


def use_digests(cache: DigestCache) -> DigestCache:
    global _digests
    _digests = cache
    return cache


def record(path: Path, data: bytes | None = None) -> dict[str, Any]:
    """Stat and digest of one input; `data` saves a second read when the caller has it."""
    st = path.stat()
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": _digests.digest(path, st, data),
    }


def code_files(feature_dirs: Iterable[Path]) -> list[Path]:
    """The builder's own code (not the QEMU test harness), the feature modules and the
    templates an image depends on."""
    files = [p for p in PACKAGE_DIR.rglob("*.py") if not p.is_relative_to(HARNESS_DIR)]
    for directory in (*feature_dirs, TEMPLATES_DIR):
        files += [p for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(files)


def extra_inputs(
    feature_dirs: Iterable[Path], kmoddir: Path, kernel: Path | None, kconfig: Path | None
) -> list[Path]:
    paths = code_files(feature_dirs)
    paths += [kmoddir / name for name in MODULE_INDEX_FILES if (kmoddir / name).is_file()]
    paths += [p for p in (kernel, kconfig) if p is not None and p.is_file()]
    return paths


def changed(inputs: dict[str, dict[str, Any]]) -> list[str]:
    """Inputs that differ from their record: stat first, digest only when stat moved."""
    reasons = []
    for name, old in sorted(inputs.items()):
        path = Path(name)
        try:
            st = path.stat()
        except OSError:
            reasons.append(f"{name} is gone")
            continue
        if (st.st_size, st.st_mtime_ns) == (old.get("size"), old.get("mtime_ns")):
            continue
        if record(path)["sha256"] != old.get("sha256"):
            reasons.append(f"{name} changed")
    return reasons


def record_path(image: Path) -> Path:
    """Where the record of `image`'s inputs lives: beside it."""
    return image.with_name(image.name + RECORD_SUFFIX)


def write_record(image: Path, image_bytes: bytes, build: dict[str, Any]) -> None:
    """Record, beside the image just written, what a later up-to-date check needs."""
    data = {"image": record(image, image_bytes), **build}
    write_atomic(record_path(image), (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def read_record(image: Path) -> dict[str, Any] | None:
    """The record beside `image`; None when there is none or it cannot be read."""
    try:
        data = json.loads(record_path(image).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stale_reasons(
    manifest: dict[str, Any], build: dict[str, Any] | None, image: Path, expected: dict[str, Any]
) -> list[str]:
    """Why an image no longer matches what a build now would use; empty when up to date.
    `manifest` is the one inside the image, `build` the record beside it."""
    reasons = []
    if manifest.get("builder_version") != __version__:
        reasons.append(
            f"built by kdump-mkinitrd {manifest.get('builder_version')}, not {__version__}"
        )
    for key in ("kver", "kernel_sha256", "hostonly", "arch"):
        if manifest.get(key) != expected[key]:
            reasons.append(f"{key} was {manifest.get(key)!r}, now {expected[key]!r}")
    if manifest.get("config", {}).get("text") != expected["config_text"]:
        reasons.append(f"config {expected['config_source']} changed")
    if build is None:
        return [*reasons, f"no record of its inputs at {record_path(image)}"]
    was = build.get("image")
    if not isinstance(was, dict) or changed({str(image): was}):
        # Copied over, or written by a build whose record never made it: trust neither.
        return [*reasons, f"{image} is not the image recorded in {record_path(image)}"]
    if build.get("kmoddir") != expected["kmoddir"]:
        reasons.append(f"kmoddir was {build.get('kmoddir')!r}, now {expected['kmoddir']!r}")
    if build.get("feature_dirs") != expected["feature_dirs"]:
        reasons.append("the feature module directories changed")
    recorded = build.get("inputs")
    if not isinstance(recorded, dict) or not recorded:
        reasons.append(f"{record_path(image)} lists no inputs")
    else:
        reasons += changed(recorded)
    return reasons
