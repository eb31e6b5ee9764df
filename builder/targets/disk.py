"""disk targets: a local filesystem (ext4, xfs or btrfs) found by UUID=, LABEL=, PARTUUID= or a
/dev path; the dump goes into a fresh folder under `path`. Template: modules.d/disk/."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from kdump_mkinitrd.schema import Checker
from kdump_mkinitrd.targets.base import Target, check_device, check_mount_options, register


@register
@dataclass(frozen=True, kw_only=True)
class DiskTarget(Target):
    type: ClassVar[str] = "disk"
    takes: ClassVar[frozenset[str]] = frozenset({"device", "fstype", "path", "mount_options"})
    uses: ClassVar[frozenset[str]] = frozenset({"python-stage"})

    @classmethod
    def check(cls, checker: Checker, key: str, values: dict[str, Any]) -> None:
        cls.require(checker, key, values, "device")
        cls.require(checker, key, values, "fstype", " (ext4, xfs or btrfs)")
        check_device(checker, f"{key}.device", values["device"])
        check_mount_options(checker, f"{key}.mount_options", values["mount_options"])
