"""What every target type shares: the keys all types know, the class each type extends, and the
checks that more than one type uses.

A type is a frozen dataclass that extends `Target` and registers itself with `@register`: its
class attributes say which keys it takes, and its methods validate its config, name it, and
tell host-only detection and the image what it needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from kdump_mkinitrd.schema import Checker, Field

if TYPE_CHECKING:
    from kdump_mkinitrd.config import Config
    from kdump_mkinitrd.storage.base import Layer

FSTYPES = ("ext4", "xfs", "btrfs")
# The feature module (modules.d/network) that brings the capture kernel's network up.
NETWORK = "network"

# Keys every type knows: a type takes some (`takes`), and refuses the others when given.
SHARED_SCHEMA: dict[str, Field] = {
    "device": Field(str),
    "fstype": Field(str, choices=FSTYPES),
    "path": Field(str, default="/var/crash", absolute_path=True),
    "mount_options": Field(str, default="defaults"),
}

_MOUNT_OPTIONS = re.compile(r"[A-Za-z0-9_.=:/-]+(?:,[A-Za-z0-9_.=:/-]+)*")
_DEV_PATH = re.compile(r"/dev/[A-Za-z0-9._:+@=-]+(?:/[A-Za-z0-9._:+@=-]+)*")
_UUID = re.compile(r"[0-9A-Fa-f]+(?:-[0-9A-Fa-f]+)*")
# A GPT partition GUID, or an MBR disk signature and partition number: SSSSSSSS-NN.
_PARTUUID = re.compile(r"[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{2,3}|[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-"
                       r"[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})")  # fmt: skip


@dataclass(frozen=True)
class ImageFile:
    """A file a target puts into the image that no feature module can declare: it is made
    from host files the config names (an ssh target's key, converted for its client)."""

    feature: str  # the target's feature module, which `inspect` names as its source
    path: str  # in the image
    data: bytes
    origin: Path  # the host file it was made from
    why: str
    mode: int = 0o644


@dataclass(frozen=True, kw_only=True)
class Target:
    """One configured target. The shared keys a type does not take stay at their defaults."""

    type: ClassVar[str]  # the config's `type:` and the feature module folder modules.d/TYPE
    schema: ClassVar[dict[str, Field]] = {}  # the keys only this type takes
    takes: ClassVar[frozenset[str]] = frozenset()  # the shared keys it takes
    # Feature modules its capture step relies on beyond its own folder: `network`, and
    # `python-stage` for a type that saves through kdump_capture_on (which runs the stage).
    uses: ClassVar[frozenset[str]] = frozenset()
    article: ClassVar[str] = "a"  # "an ssh target"
    takes_stack: ClassVar[bool] = False  # storage layers under its device (`stack`)

    device: str | None
    fstype: str | None
    path: str
    mount_options: str

    @property
    def name(self) -> str:
        """How logs, vmcore.json and `status` name the target."""
        return f"{self.type}:{self.device}"

    @property
    def network(self) -> bool:
        return NETWORK in self.uses

    @classmethod
    def check(cls, checker: Checker, key: str, values: dict[str, Any]) -> None:
        """The rules across this type's keys, once each key passed its own Field."""

    @classmethod
    def refusal(cls, name: str) -> str:
        """The error for a shared key this type does not take."""
        return f"{cls.article} {cls.type} target takes no {name!r}"

    @classmethod
    def require(cls, checker: Checker, key: str, values: dict[str, Any], name: str,
                what: str = "") -> None:  # fmt: skip
        """Refuse a target of this type without `name`; `what` says what goes there."""
        if not values[name]:
            raise checker.fail(key, f"{cls.article} {cls.type} target needs {name!r}{what}")

    @classmethod
    def make(cls, values: dict[str, Any]) -> Self:
        return cls(**{f.name: values[f.name] for f in fields(cls)})

    def layers(self) -> tuple[Layer, ...]:
        """The storage layers under its device, bottom first, that the capture init brings up
        before it looks for the device (kdump_mkinitrd.storage)."""
        return ()

    def layers_given(self) -> bool:
        """Whether the config names its layers; else host-only detection may replace them."""
        return False

    def with_layers(self, layers: tuple[Layer, ...]) -> Self:
        """A copy on these layers (what host-only detection found), for a type that takes them."""
        raise TypeError(f"{self.type} targets take no storage layers")

    def hostonly_device(self) -> tuple[str, str] | None:
        """(key, device spec) whose drivers host-only detection finds from sysfs: the device
        of a type that takes one."""
        return ("device", self.device) if self.device else None

    def hostonly_server(self) -> tuple[str, str] | None:
        """(key, host) whose route host-only detection follows to the NIC and its drivers."""
        return None

    def image_files(self, config: Config, index: int, root: Path) -> list[ImageFile]:
        """Files made for this target (it is `config.targets[index]`) from host files under
        `root`; the feature module's files, programs and templates come from module.yaml."""
        return []


def check_device(checker: Checker, key: str, device: str) -> None:
    """A device spec the capture init can find: wait_for_device reads it as findfs's
    UUID=/LABEL=, a partition table's PARTUUID=, or a /dev node."""
    kind, _, value = device.partition("=")
    if device.startswith("/dev/"):
        ok = bool(_DEV_PATH.fullmatch(device)) and ".." not in device.split("/")
        expected = "a /dev path of plain names (no '..', no spaces)"
    elif kind == "UUID":
        ok, expected = bool(_UUID.fullmatch(value)), "UUID=hex digits and dashes"
    elif kind == "PARTUUID":
        ok = bool(_PARTUUID.fullmatch(value))
        expected = "PARTUUID=a GPT partition GUID or an MBR SSSSSSSS-NN"
    elif kind == "LABEL":
        # Host-only detection looks the label up as /dev/disk/by-label/LABEL.
        ok, expected = bool(value) and "/" not in value, "LABEL=a label without '/'"
    else:
        ok, expected = False, "UUID=, LABEL=, PARTUUID= or a /dev path"
    if not ok:
        raise checker.fail(key, f"expected {expected}; got {device!r}")


def check_mount_options(checker: Checker, key: str, options: str) -> None:
    if not _MOUNT_OPTIONS.fullmatch(options):
        raise checker.fail(key, f"expected option[,option...]; got {options!r}")


REGISTERED: dict[str, type[Target]] = {}


_Type = TypeVar("_Type", bound=type[Target])


def register(cls: _Type) -> _Type:
    """Add a target type; its own keys must be new, so that each names one type in errors."""
    known = set(SHARED_SCHEMA) | {"type"}
    for other in REGISTERED.values():
        known |= set(other.schema)
    if cls.type in REGISTERED or known & set(cls.schema):
        raise ValueError(f"target type {cls.type!r} is taken, or reuses keys of another type")
    REGISTERED[cls.type] = cls
    return cls
