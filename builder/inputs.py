"""What an image was built from, and whether any of it changed since.

Each input is recorded with its size, mtime and sha256. The up-to-date check stats every
input and hashes only those whose stat changed, so a no-op check never re-reads the module
tree: that is what keeps `build --if-needed` and `register` fast at every boot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from builder import __version__
from builder.features import BUILTIN_DIR

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = BUILTIN_DIR.parent / "templates"
# depmod's files decide the module closure as much as the modules themselves.
MODULE_INDEX_FILES = (
    "modules.dep", "modules.alias", "modules.softdep", "modules.builtin",
    "modules.builtin.modinfo", "modules.order",
)  # fmt: skip


def record(path: Path, data: bytes | None = None) -> dict[str, Any]:
    """Stat and digest of one input; `data` saves a second read when the caller has it."""
    st = path.stat()
    if data is None:
        data = path.read_bytes()
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def code_files(feature_dirs: Iterable[Path]) -> list[Path]:
    """The builder's own code, the feature modules and the templates an image depends on."""
    files = [p for p in PACKAGE_DIR.rglob("*.py")]
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


def stale_reasons(manifest: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Why an image no longer matches what a build now would use; empty when up to date."""
    reasons = []
    if manifest.get("builder_version") != __version__:
        reasons.append(
            f"built by kdump-mkinitrd {manifest.get('builder_version')}, not {__version__}"
        )
    for key in ("kver", "kmoddir", "kernel_sha256", "hostonly"):
        if manifest.get(key) != expected[key]:
            reasons.append(f"{key} was {manifest.get(key)!r}, now {expected[key]!r}")
    if manifest.get("config", {}).get("text") != expected["config_text"]:
        reasons.append(f"config {expected['config_source']} changed")
    if manifest.get("feature_dirs") != expected["feature_dirs"]:
        reasons.append("the feature module directories changed")
    recorded = manifest.get("inputs")
    if not isinstance(recorded, dict) or not recorded:
        reasons.append("the image records no inputs")
    else:
        reasons += changed(recorded)
    return reasons
