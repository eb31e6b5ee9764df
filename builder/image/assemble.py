"""From a resolution to an image plan: where each resolved piece goes, and why."""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdump_mkinitrd import __version__, storage
from kdump_mkinitrd.config import Config
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan.elfdeps import BinaryClosure, ElfResolver
from kdump_mkinitrd.hostscan.firmware import FoundFirmware
from kdump_mkinitrd.hostscan.kmod import ModuleClosure
from kdump_mkinitrd.hostscan.modinfo import module_bytes
from kdump_mkinitrd.image.features import Feature
from kdump_mkinitrd.image.inputs import record
from kdump_mkinitrd.image.plan import ImagePlan
from kdump_mkinitrd.image.render import render
from kdump_mkinitrd.image.resolve import Busybox, Resolution
from kdump_mkinitrd.image.targetarch import Target, host_arch

if TYPE_CHECKING:
    from kdump_mkinitrd.image.pystage import PythonStage

# The folder holding the `capture` package, which the image packs as the capture stage.
PACKAGE_DIR = Path(__file__).resolve().parent.parent

MANIFEST_PATH = "/etc/kdump-mkinitrd/manifest.json"
LOAD_LIST_PATH = "/lib/kdump/modules.load"


@dataclass(frozen=True)
class BuildInputs:
    """What the build was asked for, recorded in the manifest and given to templates."""

    kver: str
    kmoddir: Path
    kernel_image: Path | None
    root: Path
    cache_dir: Path | None
    feature_dirs: tuple[Path, ...]
    hostonly: bool
    test_switches: bool = False  # the Python stage's fault switches, for qemu-test only
    target: Target | None = None  # the machine the image is for (None: this host's)

    @property
    def machine(self) -> Target:
        return self.target or Target(host_arch(), self.root)


def _host(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def add_feature_static(plan: ImagePlan, feature: Feature, root: Path) -> None:
    """What module.yaml declares outright: directories, nodes, host symlinks, files."""
    for directory in feature.directories:
        plan.directory(directory, feature.name, "declared in module.yaml")
    for node in feature.nodes:
        plan.node(node.path, node.kind, (node.major, node.minor), node.mode, feature.name)
    for path in feature.host_symlinks:
        host = _host(root, path)
        # Mirror the host's usr-merge so that library paths resolve the same way inside.
        if host.is_symlink():
            link = os.readlink(host)
            plan.symlink(path, link, feature.name, "mirrors the build host")
            # The folder the link leads to exists even when nothing fills it (a static-only
            # image has nothing in /usr/lib64): a dangling link fails the post-build check.
            inside = posixpath.normpath(posixpath.join(posixpath.dirname(path), link))
            plan.directory(inside, feature.name, f"{path} leads here, as on the build host")
        else:
            plan.directory(path, feature.name, "mirrors the build host")
    for path in feature.files:
        _copy_host_file(plan, root, path, path, feature.name, "declared in module.yaml")


def _copy_host_file(
    plan: ImagePlan, root: Path, src: str, dst: str, feature: str, why: str
) -> None:
    host = _host(root, src)
    if not host.is_file():
        raise KdumpError(f"file {src} ({feature}: {why}) does not exist on the build host")
    mode = host.stat().st_mode & 0o7777
    plan.file(dst, feature, why, source=host, mode=mode)


def add_modules(plan: ImagePlan, modules: ModuleClosure, kver: str) -> None:
    base = f"/lib/modules/{kver}"
    for mod in modules.modules:
        feature = "kernel-modules"
        if mod.path.suffix == ".ko":
            plan.file(f"{base}/{mod.relpath}", feature, mod.why, source=mod.path)
        else:
            # busybox insmod reads plain ELF: unpack .ko.xz/.zst/.gz now rather than at boot.
            plan.file(
                f"{base}/{mod.relpath}",
                feature,
                mod.why,
                data=module_bytes(mod.path),
                origins=(mod.path,),
            )
    plan.file(
        f"{base}/modules.dep",
        "kernel-modules",
        "dependencies of the included modules",
        data=modules.modules_dep().encode(),
    )
    order = "".join(f"{m.name} {m.relpath}\n" for m in modules.modules)
    plan.file(
        LOAD_LIST_PATH, "kernel-modules", "load order, dependencies first", data=order.encode()
    )


def _read_firmware(fw: FoundFirmware) -> bytes:
    try:
        return fw.read()
    except OSError as exc:
        raise KdumpError(
            f"cannot read firmware {fw.path} (needed by {fw.module}): {exc.strerror}"
        ) from None


def _add_firmware(plan: ImagePlan, resolution: Resolution) -> None:
    for fw in resolution.firmware.found:
        plan.file(
            f"/lib/firmware/{fw.name}",
            "kernel-modules",
            f"firmware of {fw.module}",
            data=_read_firmware(fw),
            origins=(fw.path,),
        )


def add_binaries(
    plan: ImagePlan, busybox: Busybox, closures: dict[str, BinaryClosure], root: Path
) -> None:
    """Busybox, its applet links, and each feature's programs with their libraries."""
    why = "static busybox runs the init"
    plan.file(busybox.path, "base", why, source=_host(root, busybox.path), mode=0o755)
    real = set()
    for feature, closure in closures.items():
        for link in closure.symlinks:
            plan.symlink(link.path, link.target, feature, "symlink on the way to a needed file")
        for elf in closure.files:
            mode = elf.source.stat().st_mode & 0o7777
            plan.file(elf.path, feature, elf.why, source=elf.source, mode=mode, strip=True)
            real.add(elf.path)
    for applet in busybox.applets:
        if applet != busybox.path and applet not in real and not plan.has(applet):
            plan.symlink(applet, busybox.path, "base", "busybox applet")


def _add_python_stages(
    plan: ImagePlan,
    config: Config,
    features: list[Feature],
    resolution: Resolution,
    inputs: BuildInputs,
) -> PythonStage | None:
    stage = None
    for feature in features:
        if feature.python_stage and resolution.capture.python:
            # Imported here: a static-only build never needs the stage packer.
            from kdump_mkinitrd.image.pystage import add_python_stage

            target = inputs.machine
            resolver = ElfResolver(target.root, config.search_path, target.arch.machine)
            stage = add_python_stage(
                plan,
                resolution.capture.python,
                feature.python_stage,
                PACKAGE_DIR,
                feature.name,
                resolver,
                cache_dir=inputs.cache_dir,
                test_switches=inputs.test_switches,
                target=target,
            )
    return stage


def template_context(
    config: Config,
    features: list[Feature],
    resolution: Resolution,
    inputs: BuildInputs,
    python: PythonStage | None,
) -> dict[str, Any]:
    return {
        "version": __version__,
        "kver": inputs.kver,
        "config": config,
        "capture": resolution.capture,
        "python": python,
        "features": [f.name for f in features],
        "modules": resolution.modules.modules,
        "load_list": LOAD_LIST_PATH,
        # Per target: its storage layers with the words for kdump_stack_layer.
        "layers": storage.shell_calls(config.targets),
    }


def _add_templates(plan: ImagePlan, features: list[Feature], context: dict[str, Any]) -> None:
    for feature in features:
        local = dict(context, feature=feature, targets=feature.targets(context["config"]))
        for template in feature.templates:
            text = render(template.src, local)
            plan.file(
                template.dst,
                feature.name,
                f"rendered from {template.src.name}",
                data=text.encode(),
                mode=template.mode,
            )


def manifest(
    plan: ImagePlan,
    config: Config,
    features: list[Feature],
    resolution: Resolution,
    inputs: BuildInputs,
) -> dict[str, Any]:
    """What `inspect` shows and later rebuild checks read: contents and reasons. Nothing
    here names a host path or a time, so the same inputs give the same image wherever the
    code, the config and the image live; the paths and stats of the inputs that `build
    --if-needed` checks are kept beside the image (kdump_mkinitrd.image.inputs.write_record)."""
    paths = {i.path: {"feature": i.feature, "why": i.why} for i in plan.items()}
    paths[MANIFEST_PATH] = {"feature": "base", "why": "what is in this image and why"}
    return {
        "builder_version": __version__,
        "kver": inputs.kver,
        "kernel_sha256": record(inputs.kernel_image)["sha256"] if inputs.kernel_image else None,
        "config": {"text": config.text},
        "features": [{"name": f.name} for f in features],
        "paths": paths,
        "kernel_modules": [
            {"name": m.name, "path": f"/lib/modules/{inputs.kver}/{m.relpath}", "why": m.why}
            for m in resolution.modules.modules
        ],
        "builtin_modules": list(resolution.modules.builtin),
        "firmware": [
            {"name": fw.name, "path": f"/lib/firmware/{fw.name}", "why": f"firmware of {fw.module}"}
            for fw in resolution.firmware.found
        ],
        "missing_firmware": [{"name": n, "module": m} for n, m in resolution.firmware.missing],
        "binaries": [{"path": resolution.busybox.path, "why": "static busybox runs the init"}]
        + [
            {"path": e.path, "why": e.why, "feature": feature}
            for feature, closure in resolution.binaries.items()
            for e in closure.files
        ],
        "hostonly": inputs.hostonly,
        "test_switches": inputs.test_switches,
        "arch": inputs.machine.arch.name,
    }


def assemble(
    config: Config, features: list[Feature], resolution: Resolution, inputs: BuildInputs
) -> ImagePlan:
    plan = ImagePlan()
    for feature in features:
        add_feature_static(plan, feature, inputs.root)
    for extra in config.files:
        _copy_host_file(plan, inputs.root, extra.src, extra.dst, "config", "config key files")
    for made in resolution.target_files:
        plan.file(made.path, made.feature, made.why, data=made.data, mode=made.mode,
                  origins=(made.origin,))  # fmt: skip
    add_binaries(plan, resolution.busybox, resolution.binaries, inputs.root)
    add_modules(plan, resolution.modules, inputs.kver)
    _add_firmware(plan, resolution)
    python = _add_python_stages(plan, config, features, resolution, inputs)
    _add_templates(plan, features, template_context(config, features, resolution, inputs, python))
    plan.directory(posixpath.dirname(MANIFEST_PATH), "base", "holds the manifest")
    return plan


def manifest_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
