"""Resolution: from config and selected features to the concrete host files the image needs."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from builder.config import Config
from builder.elfdeps import BinaryClosure, ElfResolver
from builder.errors import KdumpError
from builder.features import Feature
from builder.firmware import FirmwareSet, resolve_firmware
from builder.kmod import ModuleClosure, ModuleIndex


@dataclass(frozen=True)
class Busybox:
    path: str  # where it lives on the host (and in the image)
    applets: tuple[str, ...]  # image paths such as "/bin/sh", from `busybox --list-full`


@dataclass(frozen=True)
class Resolution:
    kver: str
    modules: ModuleClosure
    firmware: FirmwareSet
    binaries: dict[str, BinaryClosure]  # by the feature (or "config") that asked
    busybox: Busybox


def module_requests(config: Config, features: list[Feature]) -> list[tuple[str, str]]:
    requests = [
        (name, f"feature {f.name}") for f in features for name in f.kernel_module_requests(config)
    ]
    requests += [(name, "config key kernel_modules") for name in config.kernel_modules]
    return requests


def _busybox(resolver: ElfResolver, config: Config, root: Path) -> Busybox:
    path = resolver.find_program(config.busybox)
    if not resolver.is_static(path):
        raise KdumpError(
            f"{path} is dynamically linked; the capture init needs a static busybox "
            "(Debian: apt-get install busybox-static), set with config key 'busybox'"
        )
    try:
        listing = subprocess.run(
            [str(root / path.lstrip("/")), "--list-full"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KdumpError(f"cannot list the applets of {path}: {exc}") from None
    applets = tuple(sorted("/" + line.strip() for line in listing.splitlines() if line.strip()))
    return Busybox(path, applets)


def resolve(
    config: Config,
    features: list[Feature],
    kver: str,
    kmoddir: Path,
    cache_dir: Path | None = None,
    root: Path = Path("/"),
) -> Resolution:
    index = ModuleIndex.load(kver, kmoddir, cache_dir=cache_dir)
    modules = index.resolve(module_requests(config, features))
    firmware = resolve_firmware(modules, kver, root / config.firmware_root.lstrip("/"))
    resolver = ElfResolver(root=root, search_path=config.search_path)
    wanted = {f.name: [(name, f"feature {f.name}") for name in f.binaries] for f in features}
    wanted["config"] = [(name, "config key binaries") for name in config.binaries]
    binaries = {who: resolver.resolve(programs) for who, programs in wanted.items() if programs}
    return Resolution(kver, modules, firmware, binaries, _busybox(resolver, config, root))
