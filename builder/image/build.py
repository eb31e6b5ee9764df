"""One build, start to finish: config, then resolution, then the plan, then the writer."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdump_mkinitrd import targets
from kdump_mkinitrd.config import Config, require_targets
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import elfdeps, hostonly
from kdump_mkinitrd.hostscan.elfdeps import ElfResolver
from kdump_mkinitrd.image import buildcache, compress, inputs
from kdump_mkinitrd.image.assemble import (
    MANIFEST_PATH,
    BuildInputs,
    assemble,
    manifest,
    manifest_bytes,
)
from kdump_mkinitrd.image.buildcache import BlobStore
from kdump_mkinitrd.image.cpio import Entry, newc_segments
from kdump_mkinitrd.image.features import discover, select
from kdump_mkinitrd.image.inspect_image import read_manifest
from kdump_mkinitrd.image.resolve import capture_settings, resolve
from kdump_mkinitrd.image.targetarch import Target, target_for
from kdump_mkinitrd.image.verify import check_image
from kdump_mkinitrd.output import write_atomic
from kdump_mkinitrd.paths import MODULES_DIR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildRequest:
    kver: str
    kmoddir: Path
    output: Path
    kernel_image: Path | None = None
    modules_dirs: tuple[Path, ...] = ()
    cache_dir: Path | None = None
    root: Path = Path("/")
    boot_dir: Path = Path("/boot")
    hostonly: bool = False  # add the drivers sysfs shows under each target device
    test_switches: bool = False  # pack the Python stage's fault switches (qemu-test only)
    # The machine the image is for ("arm64", "amd64"); None: what the programs under `root`
    # are (its busybox), which is this host's for root /. Another machine needs a `root`
    # of its programs and libraries (a sysroot), which are then run under QEMU user mode.
    arch: str | None = None


@dataclass
class BuildReport:
    output: str
    kver: str
    size: int
    uncompressed_size: int
    compression: str
    entries: int
    kernel_modules: int
    firmware: int
    missing_firmware: int
    binaries: int
    features: list[str]
    notes: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    up_to_date: bool = False  # --if-needed found nothing changed and wrote nothing
    rebuilt_because: list[str] = field(default_factory=list)
    # Compressed cpio segments taken from the cache, and compressed by this build.
    segments_reused: int = 0
    segments_compressed: int = 0

    def summary(self) -> str:
        total = sum(self.seconds.values())
        if self.up_to_date:
            return f"{self.output}: up to date (kernel {self.kver}), checked in {total:.3f} s"
        return (
            f"{self.output}: {self.size / 1e6:.2f} MB {self.compression} "
            f"({self.uncompressed_size / 1e6:.2f} MB unpacked), {self.entries} entries, "
            f"{self.kernel_modules} kernel modules, {self.firmware} firmware files, "
            f"{self.binaries} binaries, kernel {self.kver}, {total:.2f} s"
        )


def source_date_epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH", "0")
    return int(value) if value.isdigit() else 0


def write_image(
    entries: list[Entry],
    method: compress.Compression,
    output: Path,
    lap: Callable[[str], None] = lambda _: None,
    store: BlobStore | None = None,
) -> tuple[int, bytes]:
    """cpio segments, each compressed (or taken from `store` when these bytes were
    compressed before), concatenated and written atomically; returns the unpacked size and
    the image."""
    segments = newc_segments(entries, mtime=source_date_epoch())
    lap("cpio")
    image = compress.compress_segments(segments, method, store)
    lap("compress")
    write_atomic(output, image)
    if store is not None:
        store.prune()
    lap("write")
    return sum(map(len, segments)), image


def _expected(config: Config, request: BuildRequest) -> dict[str, Any]:
    return {
        "kver": request.kver,
        "kmoddir": str(request.kmoddir),
        # By content: kernel-install and a boot-time register may name one kernel two ways.
        "kernel_sha256": inputs.record(request.kernel_image)["sha256"]
        if request.kernel_image
        else None,
        "config_text": config.text,
        "config_source": config.source,
        "feature_dirs": [str(d) for d in _feature_dirs(request)],
        "hostonly": request.hostonly,
        "arch": build_target(config, request).arch.name,
    }


def build_target(config: Config, request: BuildRequest) -> Target:
    """The machine and root tree `request` builds for; refuses another machine without a
    root tree of it."""
    machine = None
    if request.arch is None and request.root != Path("/"):
        machine = ElfResolver(request.root, config.search_path).machine_of(config.busybox)
    target = target_for(request.arch, request.root.resolve(), machine)
    if request.hostonly and target.foreign:
        raise KdumpError(
            "--hostonly detects the drivers of this host's devices, which an image for "
            f"another architecture ({target.arch.name}) cannot use"
        )
    return target


def _feature_dirs(request: BuildRequest) -> tuple[Path, ...]:
    return (MODULES_DIR, *request.modules_dirs)


def stale_reasons(config: Config, request: BuildRequest) -> list[str]:
    """Why the image at request.output needs a rebuild; empty when it is up to date."""
    if not request.output.exists():
        return [f"no image at {request.output}"]
    try:
        recorded = read_manifest(request.output)
    except KdumpError as exc:
        return [f"the existing image cannot be read: {exc}"]
    beside = inputs.read_record(request.output)
    reasons = inputs.stale_reasons(recorded, beside, request.output, _expected(config, request))
    if request.hostonly and not reasons:
        reasons = _hardware_moved(config, recorded)
    return reasons


def _detected(found: hostonly.Detection) -> dict[str, Any]:
    """What host-only detection decided, as the manifest records it."""
    return {
        "modules": sorted({name for name, _ in found.modules}),
        "network": {key: getattr(found.config.network, key) for key in ("mac", "vlan")},
        "stacks": [stack.record() for stack in found.stacks],
    }


def _stacks(records: list[dict[str, Any]]) -> str:
    """The recorded stacks in a line: key, layers top down, disks at the bottom."""
    return (
        "; ".join(
            f"{r.get('key')}: {' on '.join(r.get('names', [])[::-1]) or 'plain'} over "
            + ", ".join(d.rsplit("/", 1)[-1] for d in r.get("devices", []))
            for r in records
        )
        or "none"
    )


def _hardware_moved(config: Config, recorded: dict[str, Any]) -> list[str]:
    """A host-only image holds the drivers and NIC found when it was built: a disk or NIC
    moved to other hardware since needs a rebuild as much as a changed file does."""
    try:
        now = _detected(hostonly.detect(config))
    except KdumpError as exc:
        # At early boot a network target may not route yet: what was found then still holds.
        log.warning("host-only detection failed, keeping the image built earlier: %s", exc)
        return []
    was = recorded.get("hostonly_detected")
    if not isinstance(was, dict):
        return ["the image records no host-only detection"]
    reasons = []
    gone = sorted(set(was.get("modules", [])) - set(now["modules"]))
    new = sorted(set(now["modules"]) - set(was.get("modules", [])))
    if gone or new:
        reasons.append("host-only detection finds other drivers now: "
                       + ", ".join([f"+{m}" for m in new] + [f"-{m}" for m in gone]))  # fmt: skip
    if was.get("stacks", []) != now["stacks"]:
        before = _stacks(was.get("stacks", []))
        reasons.append(f"host-only detection finds other storage under the targets now: "
                       f"{_stacks(now['stacks'])}; was {before}")  # fmt: skip
    if was.get("network") != now["network"]:
        reasons.append(f"host-only detection picks another NIC now: {now['network']}, "
                       f"was {was.get('network')}")  # fmt: skip
    return reasons


def build(config: Config, request: BuildRequest, if_needed: bool = False) -> BuildReport:
    """Build the image for `config` and write it atomically; on any error nothing is written.
    With `if_needed`, first check the existing image's recorded inputs and stop if none moved.
    What this build learns about files (digests, ELF facts) is kept in the cache folder for
    the next; outside a build nothing is kept."""
    cache_root = buildcache.cache_root(request.cache_dir)
    digests = inputs.use_digests(inputs.DigestCache(cache_root / "digests.json"))
    elf_infos = elfdeps.INFO_CACHE = buildcache.StatCache(cache_root / "elfinfo.json")
    try:
        report = _build(config, request, if_needed, cache_root)
        digests.save()
        elf_infos.save()
        return report
    finally:
        inputs.use_digests(inputs.DigestCache())
        elfdeps.INFO_CACHE = None


def _build(config: Config, request: BuildRequest, if_needed: bool, cache_root: Path) -> BuildReport:
    require_targets(config)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 4)
        clock = now

    reasons = stale_reasons(config, request) if if_needed else []
    if if_needed and not reasons:
        lap("check")
        return BuildReport(
            str(request.output),
            request.kver,
            request.output.stat().st_size,
            0,
            "",
            0,
            0,
            0,
            0,
            0,
            [],
            [],
            seconds,
            up_to_date=True,
        )

    target = build_target(config, request)
    capture = capture_settings(
        config,
        ElfResolver(target.root, config.search_path, target.arch.machine),
        target,
        request.cache_dir,
    )
    feature_dirs = _feature_dirs(request)
    detected: list[tuple[str, str]] = []
    found = None
    if request.hostonly:
        # From here on the build, and so the rendered init, uses the config with the NIC that
        # detection found filled in where the file left it open.
        found = hostonly.detect(config)
        config, detected = found.config, found.modules
    # After detection: the storage layers it found select their feature modules too.
    features = select(discover(request.modules_dirs), config, capture.stage, capture.collector)
    resolution = resolve(
        config,
        features,
        capture,
        request.kver,
        request.kmoddir,
        request.cache_dir,
        target,
        detected,
    )
    lap("resolve")
    build_inputs = BuildInputs(
        request.kver,
        request.kmoddir,
        request.kernel_image,
        request.root,
        request.cache_dir,
        feature_dirs,
        request.hostonly,
        request.test_switches,
        target,
    )
    plan = assemble(config, features, resolution, build_inputs)
    entries, seen = plan.entries()
    kconfig = compress.kernel_config(
        request.kver, request.kernel_image, request.boot_dir, request.kmoddir
    )
    for path in inputs.extra_inputs(feature_dirs, request.kmoddir, request.kernel_image, kconfig):
        seen.setdefault(str(path), inputs.record(path))
    record = manifest(plan, config, features, resolution, build_inputs)
    if found is not None:
        record["hostonly_detected"] = _detected(found)
    entries.append(Entry(MANIFEST_PATH.lstrip("/"), "file", 0o644, manifest_bytes(record)))
    check_image(entries, target.arch.machine)
    lap("plan")
    requested = compress.Compression(
        config.compression.method, config.compression.level, config.compression.threads
    )
    method, note = compress.choose(requested, kconfig)
    notes = [note] if note else []
    if capture.stage == "python" and not any(f.python_stage for f in features):
        runners = " and ".join(n for n, t in targets.TYPES.items() if "python-stage" in t.uses)
        notes.append(f"no target here runs the Python stage (only {runners} targets do), "
                     "so the image has no interpreter")  # fmt: skip
    store = BlobStore(cache_root / "segments")
    unpacked, image = write_image(entries, method, request.output, lap, store)
    inputs.write_record(
        request.output,
        image,
        {
            "kmoddir": str(request.kmoddir),
            "kernel_image": str(request.kernel_image) if request.kernel_image else None,
            "config_source": config.source,
            "features": [{"name": f.name, "folder": str(f.folder)} for f in features],
            "feature_dirs": [str(d) for d in feature_dirs],
            "inputs": dict(sorted(seen.items())),
        },
    )
    return BuildReport(
        output=str(request.output),
        kver=request.kver,
        size=len(image),
        uncompressed_size=unpacked,
        compression=method.method,
        entries=len(entries),
        kernel_modules=len(resolution.modules.modules),
        firmware=len(resolution.firmware.found),
        missing_firmware=len(resolution.firmware.missing),
        binaries=1 + sum(len(c.files) for c in resolution.binaries.values()),
        features=[f.name for f in features],
        notes=notes,
        seconds=seconds,
        rebuilt_because=reasons,
        segments_reused=store.hits,
        segments_compressed=store.misses,
    )
