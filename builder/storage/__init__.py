"""Storage layer types as plug-ins: what may stand between a disk target's filesystem and the
disks (LVM, md RAID, LUKS). Each type is one module here (its keys, their checks, its name, how
host-only detection recognises it) and one feature module folder modules.d/FEATURE (its shell
function `kdump_layer_TYPE`, kernel modules and programs). Importing this package imports every
module in it; the code outside asks the registry, never a type by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.schema import Checker, Field
from kdump_mkinitrd.storage.base import REGISTERED, Layer

if TYPE_CHECKING:
    from kdump_mkinitrd.targets.base import Target

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

TYPES: dict[str, type[Layer]] = dict(sorted(REGISTERED.items()))
_OWNERS = {
    name: tuple(t for t, kind in TYPES.items() if name in kind.schema)
    for kind in TYPES.values()
    for name in kind.schema
}
# Deeper than any real stack (LUKS on LVM on RAID is three): a bound, not a policy.
MAX_DEPTH = 16


def schema() -> dict[str, Field]:
    """Every key a stack item may have: `type` and each layer type's own."""
    own = {name: spec for kind in TYPES.values() for name, spec in kind.schema.items()}
    return {"type": Field(str, required=True, choices=tuple(TYPES)), **own}


def check(checker: Checker, key: str, values: dict[str, Any]) -> None:
    """A stack item's keys once each passed its Field: only keys its type takes may be given,
    then the type's rules."""
    kind = TYPES[values["type"]]
    for name in values:
        if name == "type" or f"{key}.{name}" not in checker.lines or name in kind.schema:
            continue
        owners = " and ".join(_OWNERS.get(name, ()))
        raise checker.fail(f"{key}.{name}", f"only {owners} layers take this key")
    kind.check(checker, key, values)


def item(checker: Checker, key: str, data: Any) -> dict[str, Any]:
    """One stack item as the config gives it, checked: its keys' Fields, then `check`."""
    values = checker.mapping(data, schema(), key)
    check(checker, key, values)
    return values


def make(values: dict[str, Any]) -> Layer:
    return TYPES[values["type"]].make(values)


def infer(device: str | None) -> tuple[Layer, ...]:
    """The stack of a disk target without `stack`: the layer its device path names (a
    /dev/VG/LV or /dev/mapper/VG-LV names an LV), else none."""
    for kind in TYPES.values():
        layer = kind.from_device(device) if device else None
        if layer is not None:
            return (layer,)
    return ()


def shell_calls(targets: tuple[Target, ...]) -> list[list[tuple[Layer, tuple[str, ...]]]]:
    """For each target, its layers bottom first with the words the capture init passes to
    `kdump_layer_TYPE`; layers are numbered across the whole image (Layer.shell_args)."""
    calls: list[list[tuple[Layer, tuple[str, ...]]]] = []
    index = 0
    for target in targets:
        calls.append([])
        for layer in target.layers():
            calls[-1].append((layer, layer.shell_args(index)))
            index += 1
    return calls


def kernel_module_requests(targets: tuple[Target, ...]) -> list[tuple[str, str]]:
    """(module, why) for what each layer instance needs beyond its feature module's."""
    return [(module, f"feature {layer.feature} for {layer.name}")
            for target in targets for layer in target.layers()
            for module in layer.kernel_modules()]  # fmt: skip


@dataclass(frozen=True)
class Stack:
    """What stands under a block device: its layers, bottom first (all of a layer's lower
    layers come before it), and the devices at the bottom that no layer type recognised (the
    disks or partitions whose drivers the capture kernel needs, or an unknown virtual device)."""

    layers: tuple[Layer, ...]
    devices: tuple[Path, ...]


def walk(sysdir: Path) -> Stack:
    """Walk down from `sysdir` (a /sys/class/block/NAME entry) through every layer type's
    `detect` to the devices at the bottom."""
    layers: list[Layer] = []
    devices: list[Path] = []

    def visit(current: Path, depth: int) -> None:
        current = current.resolve()
        whole = current.parent if (current / "partition").exists() else current
        for kind in TYPES.values():
            found = kind.detect(whole)
            if found is None:
                continue
            if depth >= MAX_DEPTH:
                raise KdumpError(f"storage stacked deeper than {MAX_DEPTH} layers at {whole}")
            layer, below = found
            for lower in below:
                visit(lower, depth + 1)
            if layer not in layers:
                layers.append(layer)
            return
        if current not in devices:
            devices.append(current)

    visit(sysdir, 0)
    return Stack(tuple(layers), tuple(devices))


def detect_stack(device_sysdir: Path) -> tuple[Layer, ...]:
    """The layers under a block device, bottom first; () for a plain disk or partition."""
    return walk(device_sysdir).layers


__all__ = [
    "TYPES", "Layer", "Stack", "check", "detect_stack", "infer", "item",
    "kernel_module_requests", "make", "schema", "shell_calls", "walk",
]  # fmt: skip
