"""Reading an image back: every entry, and from its manifest why each piece is there."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.assemble import MANIFEST_PATH
from kdump_mkinitrd.image.compress import decompress
from kdump_mkinitrd.image.cpio import Member, read_newc


@dataclass(frozen=True)
class LoadedImage:
    members: list[Member]
    manifest: dict[str, Any]  # {} for an image built by something else
    unpacked_size: int


def load_image(image: Path) -> LoadedImage:
    try:
        blob = image.read_bytes()
    except OSError as exc:
        raise KdumpError(f"cannot read image {image}: {exc.strerror}") from None
    archive = decompress(blob, str(image))
    members = read_newc(archive)
    record = next((m for m in members if "/" + m.path == MANIFEST_PATH), None)
    if record is None:
        return LoadedImage(members, {}, len(archive))
    try:
        return LoadedImage(members, dict(json.loads(record.data)), len(archive))
    except ValueError as exc:
        raise KdumpError(f"{image}: manifest {MANIFEST_PATH} is not valid JSON: {exc}") from None


def read_manifest(image: Path) -> dict[str, Any]:
    return load_image(image).manifest


def report(image: Path) -> dict[str, Any]:
    loaded = load_image(image)
    members, data = loaded.members, loaded.manifest
    paths: dict[str, dict[str, str]] = data.get("paths", {})
    entries = []
    for m in members:
        path = "/" + m.path
        entry: dict[str, Any] = {
            "path": path,
            "type": m.kind,
            "mode": f"{m.mode:04o}",
            "size": len(m.data) if m.kind == "file" else 0,
        }
        if m.kind == "symlink":
            entry["target"] = m.data.decode(errors="replace")
        if m.kind in ("char", "block"):
            entry["rdev"] = list(m.rdev)
        if path in paths:
            entry.update(paths[path])
        entries.append(entry)
    return {
        "image": str(image),
        "kver": data.get("kver"),
        "features": [f["name"] for f in data.get("features", [])],
        "entries": entries,
        "kernel_modules": data.get("kernel_modules", []),
        "builtin_modules": data.get("builtin_modules", []),
        "firmware": data.get("firmware", []),
        "missing_firmware": data.get("missing_firmware", []),
        "binaries": data.get("binaries", []),
        "has_manifest": bool(data),
    }


def text(info: dict[str, Any]) -> str:
    lines = [
        f"Image: {info['image']}",
        f"Kernel: {info['kver']}",
        f"Features: {', '.join(info['features'])}",
        "",
    ]
    for e in info["entries"]:
        size = e["size"] if e["type"] == "file" else ""
        extra = f" -> {e['target']}" if "target" in e else ""
        why = f"  [{e['feature']}: {e['why']}]" if "feature" in e else ""
        lines.append(f"{e['type']:<7} {e['mode']} {size!s:>9} {e['path']}{extra}{why}")
    for title, key in (
        ("Kernel modules", "kernel_modules"),
        ("Firmware", "firmware"),
        ("Binaries", "binaries"),
    ):
        lines.append(f"\n{title} ({len(info[key])}):")
        lines += [f"  {item.get('name', item['path'])}: {item['why']}" for item in info[key]]
    if info["builtin_modules"]:
        lines.append(f"\nBuilt into the kernel: {', '.join(info['builtin_modules'])}")
    for fw in info["missing_firmware"]:
        lines.append(
            f"warning: firmware {fw['name']} of {fw['module']} was not found at build time"
        )
    return "\n".join(lines)
