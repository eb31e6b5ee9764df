"""What every storage layer type shares: the class each type extends and its registration.

A layer is one level of a disk target's `stack:` (bottom first): an LVM logical volume, an md
RAID array, a LUKS volume. A type is a frozen dataclass that extends `Layer` and registers
itself with `@register`: its class attributes say which keys it takes and which feature module
(modules.d/FEATURE) brings it up in the capture kernel; its methods check its config, name it,
give the words the capture init passes to `kdump_layer_TYPE`, and recognise it in sysfs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from kdump_mkinitrd.schema import Checker, Field
from kdump_mkinitrd.targets.base import ImageFile


@dataclass(frozen=True, kw_only=True)
class Layer:
    """One configured (or detected) layer; equal layers describe the same storage."""

    type: ClassVar[str]  # the stack item's `type:`
    feature: ClassVar[str]  # its feature module folder: modules.d/FEATURE
    schema: ClassVar[dict[str, Field]] = {}  # its keys besides `type`

    @classmethod
    def check(cls, checker: Checker, key: str, values: dict[str, Any]) -> None:
        """The rules across this type's keys, once each passed its Field; `key` is the stack
        item's (`targets[0].stack[1]`), errors name it or one of its keys."""

    @classmethod
    def make(cls, values: dict[str, Any]) -> Self:
        return cls(**{f.name: values[f.name] for f in fields(cls)})

    @property
    def name(self) -> str:
        """How logs and `inspect` name it: "lvm crashvg/dump", "raid <uuid>"."""
        raise NotImplementedError

    def shell_args(self, index: int) -> tuple[str, ...]:
        """The words after `kdump_layer_TYPE` in the capture init. `index` numbers the layers
        of the whole image (every target's stack in config order, bottom first, from 0), so a
        default name made from it (kdump-md-N) is never used twice in one image."""
        raise NotImplementedError

    def kernel_modules(self) -> tuple[str, ...]:
        """Modules this instance needs beyond its feature module's (luks: its cipher's)."""
        return ()

    def image_files(self, target_index: int, layer_index: int, root: Path) -> tuple[ImageFile, ...]:
        """Files made for this layer (layer `layer_index` of `config.targets[target_index]`'s
        stack) from host files under `root`: a LUKS key file."""
        return ()

    @classmethod
    def from_device(cls, device: str) -> Self | None:
        """The layer a target's device path names by itself (/dev/VG/LV: that LV), so that
        the target needs no `stack`; None when it names none of this type."""
        return None

    @classmethod
    def detect(cls, sysdir: Path) -> tuple[Self, list[Path]] | None:
        """The layer whose device is `sysdir` (/sys/class/block/NAME, resolved, of a whole
        block device), and the sysfs dirs of the devices just below it (LVM: its PVs, past
        LVM's own internal devices); None when the device is not of this type."""
        return None


REGISTERED: dict[str, type[Layer]] = {}

_Type = TypeVar("_Type", bound=type[Layer])


def register(cls: _Type) -> _Type:
    """Add a layer type. Types may share a key name (raid and luks both take `uuid`) only with
    the same Field, since one schema checks every stack item before its type's rules do."""
    if cls.type in REGISTERED or cls.type == "type" or "type" in cls.schema:
        raise ValueError(f"layer type {cls.type!r} is taken, or declares a 'type' key")
    for other in REGISTERED.values():
        for name, spec in cls.schema.items():
            if name in other.schema and other.schema[name] != spec:
                raise ValueError(
                    f"layer types {other.type} and {cls.type} declare {name!r} differently"
                )
    REGISTERED[cls.type] = cls
    return cls
