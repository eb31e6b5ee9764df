"""raw targets: the dump goes straight onto a block device, no filesystem (header, kernel log,
dump; layout in kdump_mkinitrd.dumps.rawrecovery). Template: modules.d/raw/."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from kdump_mkinitrd.schema import Checker, Field
from kdump_mkinitrd.targets.base import Target, check_device, register

DEFAULT_RECOVER_TO = "/var/crash"


@register
@dataclass(frozen=True, kw_only=True)
class RawTarget(Target):
    type: ClassVar[str] = "raw"
    schema: ClassVar[dict[str, Field]] = {
        # Where `register` at boot copies a complete dump out of the device.
        "recover_to": Field(str, default=DEFAULT_RECOVER_TO, absolute_path=True),
    }
    # Nothing to mount and no folder: no fstype, mount_options or path.
    takes: ClassVar[frozenset[str]] = frozenset({"device"})

    recover_to: str

    @classmethod
    def check(cls, checker: Checker, key: str, values: dict[str, Any]) -> None:
        cls.require(checker, key, values, "device")
        check_device(checker, f"{key}.device", values["device"])
