"""At `register` (the boot service): say which dumps the capture kernel saved since the last
report, so that the admin finds a crash in the journal without knowing where to look.

Dumps already reported are kept in a small state file, so each dump is announced once."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from kdump_mkinitrd.config import Config
from kdump_mkinitrd.dumps.listing import Dump, list_dumps
from kdump_mkinitrd.hostscan.defaulttarget import parse_mountinfo
from kdump_mkinitrd.hostscan.hostonly import device_node
from kdump_mkinitrd.output import write_atomic

DEFAULT_FOLDER = Path("/var/crash")  # also where recover-raw writes by default


def _mountpoint(device: Path) -> Path | None:
    try:
        rdev = device.stat().st_rdev
        mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return None
    for mount in mounts:
        if (mount.major, mount.minor) == (os.major(rdev), os.minor(rdev)):
            return Path(mount.mount_point)
    return None


def dump_folders(config: Config) -> list[Path]:
    """Where this host can see dumps: /var/crash, and the path of each target with a device
    and a path (a filesystem) that is mounted here."""
    folders = [DEFAULT_FOLDER]
    for target in config.targets:
        device, path = target.hostonly_device(), getattr(target, "path", None)
        if device is None or not path:
            continue
        mounted = _mountpoint(device_node(device[1]))
        if mounted is not None:
            folders.append(mounted / str(path).lstrip("/"))
    return list(dict.fromkeys(f.resolve() for f in folders if f.is_dir()))


def _describe(dump: Dump) -> str:
    record: dict[str, object] = {}
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((Path(dump.path) / "vmcore.json").read_text())
    crashed = record.get("crash_time")
    when = (time.strftime("crash time %Y-%m-%d %H:%M:%S UTC", time.gmtime(crashed))
            if isinstance(crashed, int) else "crash time unknown")  # fmt: skip
    return f"{dump.path} ({dump.vmcore_size / 2**20:.1f} MiB, {when})"


def announce_new_dumps(folders: list[Path], state: Path, out: TextIO = sys.stderr) -> list[Dump]:
    """Print one line per complete dump under `folders` not reported before; remember them
    in `state`."""
    try:
        reported = set(json.loads(state.read_text()))
    except (OSError, ValueError, TypeError):
        reported = set()
    new = []
    for folder in folders:
        with contextlib.suppress(OSError):
            new += [d for d in list_dumps(folder)
                    if d.state == "complete" and d.path not in reported]  # fmt: skip
    for dump in new:
        print(f"kdump-mkinitrd: a dump was saved by the capture kernel: {_describe(dump)}",
              file=out)  # fmt: skip
    if new:
        paths = sorted(reported | {d.path for d in new})
        state.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(state, (json.dumps(paths, indent=1) + "\n").encode(), 0o644)
    return new
