"""Host-only detection: the kernel modules a target device needs, found from the device itself.

From the target's block device we walk sysfs up towards the root of the device tree; every
device on the way that is bound to a driver built as a module needs that module (disk, then
its controller, then the bus bridge). Walking from the target, not from the root filesystem,
is what makes a dump disk on another controller than / work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from builder.config import Config
from builder.errors import KdumpError

BY_KIND = {"UUID=": "by-uuid", "LABEL=": "by-label", "PARTUUID=": "by-partuuid"}


def device_node(spec: str, dev: Path = Path("/dev")) -> Path:
    """The /dev node a UUID=/LABEL=/PARTUUID=/path spec names on this host: udev's links when
    there are any, else blkid probing the devices itself (a host without udev, a rescue shell)."""
    for prefix, folder in BY_KIND.items():
        if spec.startswith(prefix):
            link = dev / "disk" / folder / spec[len(prefix) :]
            if link.exists() or shutil.which("blkid") is None:
                return link
            found = subprocess.run(["blkid", "-o", "device", "-t", spec], capture_output=True,
                                   text=True, timeout=60).stdout.split()  # fmt: skip
            return Path(found[0]) if found else link
    return Path(spec)


def _modules_on_path(sysdir: Path, sys_root: Path) -> list[tuple[str, str]]:
    found = []
    devices = sys_root / "devices"
    current = sysdir
    while current != devices and devices in current.parents:
        module = current / "driver" / "module"
        if module.exists():
            driver = os.path.basename(os.readlink(current / "driver"))
            found.append((os.path.basename(os.readlink(module)), f"{driver} at {current}"))
        current = current.parent
    return found


def target_modules(
    config: Config, dev: Path = Path("/dev"), sys_root: Path = Path("/sys")
) -> list[tuple[str, str]]:
    """(module, why) for every local target; a target device missing here is an error."""
    requests = []
    for i, target in enumerate(config.targets):
        if target.type not in ("disk", "raw") or not target.device:
            continue
        node = device_node(target.device, dev)
        if not node.exists():
            raise KdumpError(
                f"{config.line_of(f'targets[{i}].device')}: --hostonly: target device "
                f"{target.device} does not exist on this host ({node} is missing)"
            )
        name = node.resolve().name
        sysdir = (sys_root / "class" / "block" / name).resolve()
        if not sysdir.exists():
            raise KdumpError(
                f"--hostonly: {node} ({name}) has no entry under {sys_root}/class/block"
            )
        for module, where in _modules_on_path(sysdir, sys_root):
            requests.append((module, f"host-only: driver {where} for target {target.device}"))
    return requests
