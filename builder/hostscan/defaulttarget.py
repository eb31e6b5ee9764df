"""The dump target of a config that names none: the filesystem that holds /var/crash on this
host, as a disk target dumping into /var/crash (what Debian's kdump-tools and Fedora's kdump
do). Its device, and the LVM/md/LUKS stack under it, are found the way host-only detection
finds them for a configured disk target.

A /var/crash that no capture kernel can write to (memory, a network or shared filesystem, a
filesystem type a disk target cannot mount) is refused with NoTarget (exit 4): kdump is then
not set up, which the kernel hooks skip instead of failing a kernel installation.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from kdump_mkinitrd.config import DEFAULT_PATH, Config, NoTarget, parse
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import hostonly
from kdump_mkinitrd.targets.base import FSTYPES, Target

CRASH_DIR = "/var/crash"

# What each kind of filesystem /var/crash may sit on means for a dump saved there.
_MEMORY = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})
_NETWORK = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre",
                      "afs", "ncpfs", "coda", "gfs2", "ocfs2", "beegfs", "gpfs"})  # fmt: skip
_SHARED = frozenset({"9p", "virtiofs", "vboxsf", "vmhgfs"})
_LAYERED = frozenset({"overlay", "aufs", "unionfs", "shiftfs"})

CONFIGURE = (
    "configure a target in {file}, e.g. targets: [{{type: disk, device: UUID=..., fstype: "
    "ext4}}] (a local filesystem), [{{type: nfs, export: server:/export}}] or [{{type: ssh, "
    "host: user@server}}]"
)


@dataclass(frozen=True)
class Mount:
    """One line of /proc/PID/mountinfo (proc(5))."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str  # the folder of the filesystem that is mounted here (bind mounts, subvolumes)
    mount_point: str
    fstype: str
    source: str
    super_options: str


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split()
        sep = fields.index("-", 6)  # optional fields (shared:N, master:N) end at "-"
        major, minor = fields[2].split(":")
        mounts.append(Mount(
            int(fields[0]), int(fields[1]), int(major), int(minor), _unescape(fields[3]),
            _unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2]),
            fields[sep + 3] if len(fields) > sep + 3 else "",
        ))  # fmt: skip
    return mounts


def holding_mount(mounts: list[Mount], path: str) -> Mount:
    """The mount that holds `path` (absolute, symlinks resolved): the deepest mount point
    above it, the last one mounted there when several are stacked."""
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.mount_point)):
            best = mount
    if best is None:
        raise KdumpError(f"no mount holds {path} in the mount table")
    return best


def path_in_filesystem(mount: Mount, path: str) -> tuple[str, str]:
    """(path inside the filesystem as the capture kernel mounts it, extra mount options):
    `path` below the mount point, under the folder the mount shows. A btrfs subvolume is
    mounted by its id, since the capture kernel would otherwise mount the default one."""
    below = posixpath.relpath(path, mount.mount_point)
    inside = posixpath.normpath(posixpath.join(mount.root, below))
    options = dict(o.partition("=")[::2] for o in mount.super_options.split(",") if o)
    subvol = options.get("subvol", "")
    if mount.fstype == "btrfs" and subvol not in ("", "/") and options.get("subvolid"):
        rest = posixpath.relpath(inside, subvol)
        inside = posixpath.normpath("/" + ("" if rest == "." else rest))
        return inside, f"subvolid={options['subvolid']}"
    return inside, ""


def _what(mount: Mount) -> str:
    """What /var/crash's filesystem is, for the refusal."""
    kind = mount.fstype
    if kind in _MEMORY:
        return f"{kind}, in memory: the reboot after a crash loses what is saved there"
    if kind in _NETWORK or kind.startswith("fuse."):
        name = kind.removeprefix("fuse.")
        return (f"{name} from {mount.source}, a network or user-space filesystem: as the default "
                "target only a local disk filesystem is taken")  # fmt: skip
    if kind in _SHARED:
        return f"{kind} ({mount.source}), shared from outside this machine with no block device"
    if kind in _LAYERED:
        return f"{kind}, a layered filesystem with no block device of its own"
    return (f"{kind} ({mount.source}), which a disk target cannot dump to (it mounts "
            f"{', '.join(FSTYPES)})")  # fmt: skip


def mount_device_node(mount: Mount, dev: Path, sys_root: Path) -> Path | None:
    """The block device of a mount: by its device number (mountinfo's source may be /dev/root),
    a device-mapper device by its /dev/mapper name; else the source when it is a device
    (btrfs reports an anonymous device number)."""
    entry = sys_root / "dev" / "block" / f"{mount.major}:{mount.minor}"
    if mount.major != 0 and entry.exists():
        sysdir = entry.resolve()
        dm_name = sysdir / "dm" / "name"
        name = dm_name.read_text().strip() if dm_name.exists() else ""
        for node in ([dev / "mapper" / name] if name else []) + [dev / sysdir.name]:
            if node.is_block_device():
                return node
    source = Path(mount.source)
    if mount.source.startswith("/dev/") and source.is_block_device():
        return source
    return None


def filesystem_uuid(node: Path, dev: Path) -> str | None:
    """The filesystem's UUID: udev's by-uuid link to `node`, else blkid's probe."""
    by_uuid = dev / "disk" / "by-uuid"
    if by_uuid.is_dir():
        for link in by_uuid.iterdir():
            if link.resolve() == node.resolve():
                return link.name
    if shutil.which("blkid") is None:
        return None
    run = subprocess.run(["blkid", "-o", "value", "-s", "UUID", str(node)], capture_output=True,
                         text=True, timeout=60, check=False)  # fmt: skip
    return run.stdout.strip() or None


def _refusal(told: str, crash_dir: str, file: object, why: str) -> NoTarget:
    return NoTarget(f"{told}, and the default, the filesystem holding {crash_dir}, cannot take "
                    f"a dump: {why}; " + CONFIGURE.format(file=file))  # fmt: skip


@dataclass(frozen=True)
class Default:
    """The default target and the line that says why and where the dumps go."""

    target: Target
    line: str


class Unsuitable(KdumpError):
    """The filesystem holding a folder cannot take a dump; the message says why."""


def locate(
    crash_dir: str,
    mounts: list[Mount],
    dev: Path = Path("/dev"),
    sys_root: Path = Path("/sys"),
) -> tuple[Target, str]:
    """The disk target that dumps into `crash_dir` on the filesystem holding it on these
    mounts, and what that filesystem is; Unsuitable when a capture kernel cannot write there."""
    # Symlinks resolved; a folder not made yet is on the filesystem of its nearest parent.
    real = os.path.realpath(crash_dir)
    try:
        mount = holding_mount(mounts, real)
    except KdumpError as exc:
        # In a chroot whose root is no mount point (a distribution image being made): no
        # filesystem to name, and kdump is set up when that system boots.
        raise Unsuitable(f"{exc} (a chroot?)") from None
    where = f"{crash_dir} is on {mount.mount_point}" if mount.mount_point != real else crash_dir
    if mount.fstype not in FSTYPES:
        raise Unsuitable(f"{where}: {_what(mount)}")
    node = mount_device_node(mount, dev, sys_root)
    if node is None:
        why = f"{mount.fstype} from {mount.source}, whose block device is not on this host"
        raise Unsuitable(f"{where}: {why}")
    path, options = path_in_filesystem(mount, real)
    uuid = filesystem_uuid(node, dev)
    values = {"type": "disk", "device": f"UUID={uuid}" if uuid else str(node),
              "fstype": mount.fstype, "path": path,
              "mount_options": options or "defaults"}  # fmt: skip
    try:
        # Through the config's own checks, as if the file had named it.
        text = yaml.safe_dump({"targets": [values]}, default_flow_style=None, sort_keys=False)
        probe = parse(text, "the default target")
        stacks = hostonly.target_stacks(probe, dev, sys_root)
    except KdumpError as exc:
        # Host-only detection's error without its config location, which no file has here.
        why = re.sub(r"^.*?--hostonly: ", "", str(exc))
        raise Unsuitable(f"{node}: {why}") from None
    target = hostonly.with_detected_stacks(probe, stacks).targets[0]
    layers = " on ".join(x.name for x in reversed(target.layers()))
    detail = ", ".join(x for x in (mount.fstype, layers and f"on {layers}",
                                   uuid and f"UUID={uuid}") if x)  # fmt: skip
    inside = f", path {path} in it" if path != crash_dir else ""
    return target, (f"{crash_dir} on {node} ({detail}, the filesystem holding "
                    f"{crash_dir}{inside})")  # fmt: skip


def choose(
    config: Config,
    mounts: list[Mount],
    crash_dir: str = CRASH_DIR,
    dev: Path = Path("/dev"),
    sys_root: Path = Path("/sys"),
) -> Default:
    """The disk target for `crash_dir` on these mounts, or NoTarget saying what to configure;
    `config` is the one that names no target."""
    absent = config.source == "<defaults>"
    file = DEFAULT_PATH if absent else config.source
    told = f"no dump target configured in {file}" + (" (no such file)" if absent else "")
    try:
        target, where = locate(crash_dir, mounts, dev, sys_root)
    except Unsuitable as exc:
        raise _refusal(told, crash_dir, file, str(exc)) from None
    return Default(target, f"{told}: dumping to {where}")


def with_default(
    config: Config,
    mountinfo: Path = Path("/proc/self/mountinfo"),
    dev: Path = Path("/dev"),
    sys_root: Path = Path("/sys"),
) -> tuple[Config, str | None]:
    """The config as it is when it names a target; else with the default target, and the line
    that says so. The target is also written into the config text as a comment: the image
    records that text, so an image built for another default is seen as stale."""
    if config.targets:
        return config, None
    chosen = choose(config, parse_mountinfo(mountinfo.read_text()), dev=dev,
                    sys_root=sys_root)  # fmt: skip
    t = chosen.target
    stack = ", ".join(x.name for x in t.layers())
    note = (f"\n# {chosen.line}\n# kdump-mkinitrd default target: {t.name} {t.fstype} "
            f"path {t.path} options {t.mount_options} stack [{stack}]\n")  # fmt: skip
    return dataclasses.replace(config, targets=(t,), text=config.text + note), chosen.line
