"""Resolution: from config and selected features to the concrete host files the image needs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kdump_mkinitrd import storage
from kdump_mkinitrd.config import Config
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import kmod, modinfo
from kdump_mkinitrd.hostscan.elfdeps import BinaryClosure, ElfResolver
from kdump_mkinitrd.hostscan.firmware import FirmwareSet, resolve_firmware
from kdump_mkinitrd.hostscan.kmod import ModuleClosure, ModuleIndex, ResolvedModule
from kdump_mkinitrd.image import buildcache
from kdump_mkinitrd.image.buildcache import BlobStore
from kdump_mkinitrd.image.features import Feature
from kdump_mkinitrd.image.inputs import MODULE_INDEX_FILES
from kdump_mkinitrd.image.targetarch import Target, host_arch
from kdump_mkinitrd.targets import ImageFile, image_files


@dataclass(frozen=True)
class Busybox:
    path: str  # where it lives on the host (and in the image)
    applets: tuple[str, ...]  # image paths such as "/bin/sh", from `busybox --list-full`


MAKEDUMPFILE_FLAGS = {"zstd": "-z", "lzo": "-l", "zlib": "-c", "snappy": "-p", "none": ""}


@dataclass(frozen=True)
class CaptureSettings:
    """The capture decisions made at build time and baked into the image."""

    stage: str  # "python" | "static"
    collector: str  # "makedumpfile" | "native"
    dump_level: int
    compression: str  # makedumpfile's page compression
    makedumpfile_flag: str
    hostname: str
    python: str | None  # the interpreter to pack, for the Python stage
    makedumpfile: str | None  # its path, when it is the collector


@dataclass(frozen=True)
class Resolution:
    kver: str
    capture: CaptureSettings
    modules: ModuleClosure
    firmware: FirmwareSet
    binaries: dict[str, BinaryClosure]  # by the feature (or "config") that asked
    busybox: Busybox
    target_files: tuple[ImageFile, ...] = ()  # made by the target types from host files


def _makedumpfile_compression(
    target: Target, path: str, wanted: str, cache_dir: Path | None = None
) -> str:
    """Pick what this makedumpfile build supports: `-v` lists each codec as enabled or not."""
    binary = target.root / path.lstrip("/")

    def run() -> str:
        argv = [*target.command(path), "-v"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KdumpError(f"cannot run {' '.join(argv)}: {exc}") from None
        return done.stdout

    stdout = buildcache.program_output(cache_dir, binary, ["-v"], run)
    enabled = {"zlib", "none"} | {
        words[0] for words in map(str.split, stdout.splitlines())
        if len(words) == 2 and words[1] == "enabled"
    }  # fmt: skip
    if wanted == "auto":
        return next(c for c in ("zstd", "lzo", "zlib") if c in enabled)
    if wanted not in enabled:
        raise KdumpError(
            f"config key capture.compression: {binary} was built without {wanted} "
            f"(it supports {', '.join(sorted(enabled))})"
        )
    return wanted


def _dump_hostname(name: str) -> str:
    # A host without a name reports "(none)": not something to put in a directory name.
    clean = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("._")
    return clean if clean and name != "(none)" else "localhost"


def capture_settings(
    config: Config,
    resolver: ElfResolver,
    root: Path | Target,
    cache_dir: Path | None = None,
) -> CaptureSettings:
    """`root`: the target, or the root tree of a build for this host's architecture."""
    target = root if isinstance(root, Target) else Target(host_arch(), root)
    wanted = config.capture.collector
    found: str | None = None
    if wanted != "native":
        try:
            found = resolver.find_program("makedumpfile")
        except KdumpError:
            if wanted == "makedumpfile":
                raise KdumpError(
                    f"config key capture.collector is makedumpfile, but makedumpfile is not on "
                    f"{config.search_path} (Debian: apt-get install makedumpfile)"
                ) from None
    compression = "none"
    if found is not None:
        resolver.check_machine(found)
        compression = _makedumpfile_compression(
            target, found, config.capture.compression, cache_dir
        )
    stage = config.capture.stage
    python = None
    if stage == "python":
        if target.root == Path("/"):
            python = config.capture.python or os.path.realpath(sys.executable)
        else:
            # The builder's own interpreter is no part of another root: the root's python3.
            python = config.capture.python or "python3"
    return CaptureSettings(
        stage=stage,
        collector="makedumpfile" if found else "native",
        dump_level=config.capture.dump_level,
        compression=compression,
        makedumpfile_flag=MAKEDUMPFILE_FLAGS[compression],
        hostname=config.capture.hostname or _dump_hostname(socket.gethostname()),
        python=python,
        makedumpfile=found,
    )


def module_requests(config: Config, features: list[Feature]) -> list[tuple[str, str]]:
    requests = [request for f in features for request in f.kernel_module_requests(config)]
    requests += storage.kernel_module_requests(config.targets)
    requests += [(name, "config key kernel_modules") for name in config.kernel_modules]
    return requests


def find_busybox(
    resolver: ElfResolver, busybox: str, root: Path | Target, cache_dir: Path | None = None
) -> Busybox:
    target = root if isinstance(root, Target) else Target(host_arch(), root)
    path = resolver.find_program(busybox)
    if not resolver.is_static(path):
        raise KdumpError(
            f"{path} is dynamically linked; the capture init needs a static busybox "
            "(Debian: apt-get install busybox-static), set with config key 'busybox'"
        )
    host = target.root / path.lstrip("/")

    def run() -> str:
        try:
            return subprocess.run([*target.command(path), "--list-full"], check=True,
                                  capture_output=True, text=True, timeout=60).stdout  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            raise KdumpError(f"cannot list the applets of {path}: {exc}") from None

    listing = buildcache.program_output(cache_dir, host, ["--list-full"], run)
    applets = tuple(sorted("/" + line.strip() for line in listing.splitlines() if line.strip()))
    return Busybox(path, applets)


def hook_requests(config: Config, resolver: ElfResolver) -> list[tuple[str, str]]:
    """(program, why) for each hook; one the build host lacks, or cannot run, is refused with
    the hook's config key and line."""
    requests = []
    for key, hook in config.hooks.all():
        try:
            real = resolver.root / resolver.real_path(hook.program).lstrip("/")
        except KdumpError as exc:
            raise KdumpError(f"{config.line_of(key)}: key '{key}': {exc}") from None
        if not os.access(real, os.X_OK):
            raise KdumpError(f"{config.line_of(key)}: key '{key}': {hook.program} is not "
                             "executable on the build host")  # fmt: skip
        requests.append((hook.program, f"config key {key}"))
    return requests


def _closure_key(kver: str, kmoddir: Path, requests: list[tuple[str, str]]) -> str | None:
    """What decides a depmod'ed tree's closure: depmod's files, the requests and the code
    that resolves; None for a tree depmod never saw (kmod caches its own scan of those)."""
    try:
        index = [(kmoddir / name).read_bytes() if (kmoddir / name).exists() else b"-"
                 for name in MODULE_INDEX_FILES]  # fmt: skip
        code = [Path(m.__file__ or "").read_bytes() for m in (kmod, modinfo, sys.modules[__name__])]
    except OSError:
        return None
    if index[0] == b"-":
        return None
    return buildcache.key_of("modules", kver, str(kmoddir.absolute()), json.dumps(requests),
                             *index, *code)  # fmt: skip


def _closure_json(closure: ModuleClosure) -> bytes:
    modules = []
    for m in closure.modules:
        st = m.path.stat()
        modules.append({"name": m.name, "path": str(m.path), "relpath": m.relpath,
                        "depends": m.depends, "firmware": m.firmware, "why": m.why,
                        "stat": [st.st_size, st.st_mtime_ns]})  # fmt: skip
    return json.dumps({"modules": modules, "builtin": closure.builtin}).encode()


def _closure_from_json(data: bytes) -> ModuleClosure | None:
    """The cached closure, unless one of its modules changed since (each is read for its
    dependencies and firmware, which depmod's files do not say all of)."""
    try:
        stored = json.loads(data)
        modules = []
        for m in stored["modules"]:
            st = os.stat(m["path"])
            if [st.st_size, st.st_mtime_ns] != m["stat"]:
                return None
            modules.append(ResolvedModule(
                m["name"], Path(m["path"]), m["relpath"], tuple(m["depends"]),
                tuple(m["firmware"]), m["why"]))  # fmt: skip
        return ModuleClosure(tuple(modules), tuple(stored["builtin"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def module_closure(
    kver: str,
    kmoddir: Path,
    requests: list[tuple[str, str]],
    cache_dir: Path | None = None,
    store: BlobStore | None = None,
) -> ModuleClosure:
    """The modules `requests` need, from `store` (by default the one under the cache
    directory) when the tree and the requests are the same as a build's before."""
    key = _closure_key(kver, kmoddir, requests)
    store = store or BlobStore(buildcache.cache_root(cache_dir) / "modules")
    closure = store.load(key, _closure_from_json) if key else None
    if closure is None:
        closure = ModuleIndex.load(kver, kmoddir, cache_dir=cache_dir).resolve(requests)
        if key:
            store.put(key, _closure_json(closure))
            store.prune()
    return closure


def resolve(
    config: Config,
    features: list[Feature],
    capture: CaptureSettings,
    kver: str,
    kmoddir: Path,
    cache_dir: Path | None = None,
    root: Path | Target = Path("/"),
    detected: list[tuple[str, str]] | None = None,
) -> Resolution:
    """`detected`: (module, why) pairs found on the host, for host-only images."""
    target = root if isinstance(root, Target) else Target(host_arch(), root)
    root = target.root
    requests = module_requests(config, features) + (detected or [])
    modules = module_closure(kver, kmoddir, requests, cache_dir)
    firmware = resolve_firmware(modules, kver, root / config.firmware_root.lstrip("/"))
    resolver = ElfResolver(root, config.search_path, target.arch.machine)
    wanted = {f.name: f.binary_requests(config) for f in features}
    wanted["config"] = [(name, "config key binaries") for name in config.binaries]
    wanted["hooks"] = hook_requests(config, resolver)
    busybox = find_busybox(resolver, config.busybox, target, cache_dir)
    provided = (busybox.path, *busybox.applets)
    binaries = {
        who: resolver.resolve(programs, provided) for who, programs in wanted.items() if programs
    }
    return Resolution(
        kver, capture, modules, firmware, binaries, busybox, image_files(config, root)
    )
