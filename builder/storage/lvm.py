"""lvm layers: a logical volume (linear, striped or thin) of a volume group. The capture kernel
activates only this LV (and its thin pool) with an lvm.conf made for the image.
Feature module: modules.d/lvm/."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from kdump_mkinitrd.schema import Checker, Field
from kdump_mkinitrd.storage.base import Layer, register

# LVM's rules for VG and LV names (lvm(8), VALID NAMES): these characters, no leading '-',
# not '.' or '..', at most 127 characters.
_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
# LV names LVM keeps for itself (lvm(8), VALID NAMES: it refuses to create them).
_RESERVED_LV = re.compile(
    r"snapshot|pvmove|.*_(?:cdata|cmeta|corig|iorig|mimage|mlog|pmspare|rimage|rmeta|tdata|"
    r"tmeta|vdata|vorigin).*"
)
# device-mapper's uuid of an LV's device: LVM-, the VG's uuid, the LV's uuid (32 characters
# each, no dashes), and for LVM's own internal layers a suffix (-tpool, -real, -cow...).
_DM_UUID = re.compile(r"LVM-([A-Za-z0-9]{32})([A-Za-z0-9]{32})(-.+)?")


# Folders udev and the kernel make under /dev: /dev/NAME/X there is no volume group's LV.
_NOT_VGS = frozenset({
    "block", "bsg", "bus", "char", "cpu", "disk", "dma_heap", "dri", "fd", "hugepages", "input",
    "mapper", "md", "mqueue", "net", "pts", "serial", "shm", "snd", "usb", "vfio", "vhost-net",
    "xen", "zvol",
})  # fmt: skip


def split_dm_name(name: str) -> tuple[str, str] | None:
    """(VG, LV) from a device-mapper name LVM made (/dev/mapper/VG-LV): a '-' inside either
    name is doubled; the first single '-' from the left separates them (lvm's own rule)."""
    i = 0
    while i < len(name):
        if name[i] == "-":
            if name[i + 1 : i + 2] == "-":
                i += 2
                continue
            vg, lv = name[:i].replace("--", "-"), name[i + 1 :].replace("--", "-")
            return (vg, lv) if vg and lv else None
        i += 1
    return None


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and name not in (".", "..")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _pvs(sysdir: Path, vg_uuid: str) -> list[Path]:
    """The devices under an LV that are not this VG's own (thin pool, its tdata and tmeta,
    snapshot origins...): its PVs, or the layer below them."""
    found: list[Path] = []
    slaves = sysdir / "slaves"
    for slave in sorted(slaves.iterdir()) if slaves.is_dir() else []:
        lower = slave.resolve()
        own = _DM_UUID.fullmatch(_read(lower / "dm" / "uuid"))
        below = _pvs(lower, vg_uuid) if own and own.group(1) == vg_uuid else [lower]
        found += [p for p in below if p not in found]
    return found


@register
@dataclass(frozen=True, kw_only=True)
class LvmLayer(Layer):
    type: ClassVar[str] = "lvm"
    feature: ClassVar[str] = "lvm"
    schema: ClassVar[dict[str, Field]] = {"vg": Field(str), "lv": Field(str)}

    vg: str
    lv: str

    @classmethod
    def check(cls, checker: Checker, key: str, values: dict[str, Any]) -> None:
        for name, what in (("vg", "volume group"), ("lv", "logical volume")):
            value = values[name]
            if value is None:
                raise checker.fail(key, f"an lvm layer needs {name!r} (the {what}'s name)")
            if not valid_name(value):
                raise checker.fail(
                    f"{key}.{name}",
                    f"not an LVM {what} name: {value!r} (letters, "
                    "digits, '+', '_', '.', '-', not starting with '-')",
                )
        if _RESERVED_LV.fullmatch(values["lv"]):
            raise checker.fail(
                f"{key}.lv",
                f"{values['lv']!r} is one of LVM's internal volumes, not one a filesystem lives on",
            )

    @property
    def name(self) -> str:
        return f"lvm {self.vg}/{self.lv}"

    @property
    def dm_name(self) -> str:
        """Its device-mapper name: /dev/mapper/VG-LV."""
        return f"{self.vg.replace('-', '--')}-{self.lv.replace('-', '--')}"

    def shell_args(self, index: int) -> tuple[str, ...]:
        return (self.vg, self.lv)

    @classmethod
    def from_device(cls, device: str) -> Self | None:
        parts = device.split("/")
        if len(parts) != 4 or parts[:2] != ["", "dev"] or parts[2] in _NOT_VGS - {"mapper"}:
            return None
        names = split_dm_name(parts[3]) if parts[2] == "mapper" else (parts[2], parts[3])
        if names is None or not (valid_name(names[0]) and valid_name(names[1])):
            return None
        return cls(vg=names[0], lv=names[1])

    @classmethod
    def detect(cls, sysdir: Path) -> tuple[Self, list[Path]] | None:
        uuid = _DM_UUID.fullmatch(_read(sysdir / "dm" / "uuid"))
        names = split_dm_name(_read(sysdir / "dm" / "name"))
        if uuid is None or names is None:
            return None
        return cls(vg=names[0], lv=names[1]), _pvs(sysdir, uuid.group(1))
