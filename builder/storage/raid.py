"""raid layers: an md RAID array (RAID1; RAID4/5/6 and RAID10 by the same code), named by
mdadm's array UUID. The capture kernel assembles only that array, degraded if a member is
missing or failed. Feature module: modules.d/mdraid/."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.schema import Checker, Field
from kdump_mkinitrd.storage.base import Layer, register

# mdadm's form of an array UUID, as `mdadm --detail` and mdadm.conf's ARRAY lines write it.
_UUID = re.compile(r"[0-9a-f]{8}(?::[0-9a-f]{8}){3}", re.I)
# The kernel's and blkid's form: a filesystem's UUID looks so, and is the usual mix-up.
_DASHED = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
# /dev/md/NAME: md's own names are at most 32 bytes (v1 metadata); no '/', no leading '-'.
_NAME = re.compile(r"[A-Za-z0-9_.+@=][A-Za-z0-9_.:+@=-]{0,31}")
# The kernel module of each md personality; RAID4, 5 and 6 share one.
PERSONALITIES = {
    "raid1": "raid1",
    "raid4": "raid456",
    "raid5": "raid456",
    "raid6": "raid456",
    "raid10": "raid10",
    "raid0": "raid0",
    "linear": "linear",
}
# Without the level (a config built away from the array): the levels issue 14 serves.
ANY_LEVEL = ("raid1", "raid10", "raid456")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _sysfs_uuid(mddir: Path) -> str | None:
    """The array UUID in mdadm's form from /sys/block/mdN/md/uuid, which the kernel prints as
    one 8-4-4-4-12 UUID of the same 16 bytes. mdadm prints v1.x metadata's bytes in order,
    but 0.90's as four native-endian words; None when the attribute is missing (before
    Linux 5.x) or the metadata is of another kind."""
    raw = _read(mddir / "uuid").replace("-", "").lower()
    version = _read(mddir / "metadata_version")
    if len(raw) != 32 or not (version.startswith("1.") or version == "0.90"):
        return None
    words = [raw[i : i + 8] for i in range(0, 32, 8)]
    if version == "0.90":
        words = ["".join(reversed([w[j : j + 2] for j in range(0, 8, 2)])) for w in words]
    return ":".join(words)


def _mdadm_uuid(device: Path) -> str | None:
    try:
        run = subprocess.run(["mdadm", "--detail", "--export", str(device)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"^MD_UUID=(\S+)$", run.stdout, re.M)
    return found.group(1).lower() if run.returncode == 0 and found else None


def array_uuid(sysdir: Path) -> str | None:
    """mdadm's UUID of the md array whose sysfs dir is `sysdir`."""
    return _sysfs_uuid(sysdir / "md") or _mdadm_uuid(Path("/dev") / sysdir.name)


def host_level(uuid: str, sys_block: Path = Path("/sys/block")) -> str | None:
    """The RAID level of the array with this UUID if this host runs it: a config built on
    the machine itself then packs one personality, not every one."""
    for sysdir in sorted(sys_block.glob("md*")):
        if (sysdir / "md").is_dir() and array_uuid(sysdir) == uuid:
            return _read(sysdir / "md" / "level") or None
    return None


def _dev_name(sysdir: Path) -> str | None:
    """The name the host gives the array (its /dev/md/NAME link, else mdN itself), so that a
    target named /dev/md/NAME or /dev/mdN finds the array the capture kernel assembles."""
    links = Path("/dev/md")
    for link in sorted(links.iterdir()) if links.is_dir() else []:
        if link.is_symlink() and link.resolve().name == sysdir.name and _NAME.fullmatch(link.name):
            return link.name
    return sysdir.name if re.fullmatch(r"md[0-9]+", sysdir.name) else None


@register
@dataclass(frozen=True, kw_only=True)
class RaidLayer(Layer):
    type: ClassVar[str] = "raid"
    feature: ClassVar[str] = "mdraid"
    schema: ClassVar[dict[str, Field]] = {"uuid": Field(str), "name": Field(str)}

    uuid: str  # mdadm's form, lower case
    # The config's `name:` (a field cannot be called `name`: that is the layer's log name).
    # Neither it nor the level tells which array this is: the UUID does, so equality (the
    # config's stack against the one detected) ignores them.
    md_name: str | None = field(default=None, compare=False)
    level: str | None = field(default=None, compare=False)  # "raid1"; known when detected

    @classmethod
    def check(cls, checker: Checker, key: str, values: dict[str, Any]) -> None:
        uuid, name = values["uuid"], values["name"]
        if uuid is None:
            raise checker.fail(key, "a raid layer needs 'uuid' (mdadm's array UUID, as "
                               "`mdadm --detail DEVICE` shows it)")  # fmt: skip
        if not _UUID.fullmatch(uuid):
            hint = ""
            if _DASHED.fullmatch(uuid):
                hint = (" (that is the kernel's or a filesystem's form; the array UUID is the "
                        "one `mdadm --detail DEVICE` shows)")  # fmt: skip
            raise checker.fail(
                f"{key}.uuid",
                f"expected mdadm's array UUID, 4 groups of 8 hex digits joined by ':'; "
                f"got {uuid!r}{hint}",
            )
        if name is not None and (not _NAME.fullmatch(name) or name in (".", "..")):
            raise checker.fail(
                f"{key}.name",
                f"expected an md array name for /dev/md/NAME (up to 32 letters, digits and "
                f"_.:+@=-, not starting with '-'); got {name!r}",
            )

    @classmethod
    def make(cls, values: dict[str, Any]) -> Self:
        return cls(uuid=str(values["uuid"]).lower(), md_name=values["name"])

    @property
    def name(self) -> str:
        return f"raid {self.uuid}"

    def shell_args(self, index: int) -> tuple[str, ...]:
        return (self.uuid, self.md_name or f"kdump-md-{index}")

    def kernel_modules(self) -> tuple[str, ...]:
        """The personality for its level (md_mod comes with the feature module)."""
        personality = PERSONALITIES.get(self.level or host_level(self.uuid) or "")
        return (personality,) if personality else ANY_LEVEL

    @classmethod
    def detect(cls, sysdir: Path) -> tuple[Self, list[Path]] | None:
        md = sysdir / "md"
        if not md.is_dir():
            return None
        metadata = _read(md / "metadata_version")
        if metadata.startswith("external:"):
            # Firmware RAID (IMSM, DDF) needs mdmon running to write its metadata: without
            # it in the capture kernel the first write to the array would hang.
            raise KdumpError(
                f"{sysdir.name} is an md array with external metadata ({metadata}, firmware "
                "RAID): the capture init assembles arrays with md's own metadata only"
            )
        uuid = array_uuid(sysdir)
        if uuid is None:
            raise KdumpError(f"{sysdir.name} is an md array whose UUID neither "
                             f"{md / 'uuid'} nor `mdadm --detail` gives")  # fmt: skip
        level = _read(md / "level") or None
        slaves = sysdir / "slaves"
        members = [s.resolve() for s in sorted(slaves.iterdir())] if slaves.is_dir() else []
        return cls(uuid=uuid, md_name=_dev_name(sysdir), level=level), members
