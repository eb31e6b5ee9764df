"""`register`, `unregister`, `status` and `estimate`: arming the capture kernel on this host.

`register` rebuilds the image when it is missing or stale, derives the capture command line
from the running kernel's, and loads both with kexec_file_load. A small state file records
what was loaded, so `status` can say which image and kernel are armed and whether the image
is still up to date with its inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdump_mkinitrd.arming.cmdline import capture_cmdline, normalise_arch
from kdump_mkinitrd.arming.crashmemory import estimate
from kdump_mkinitrd.arming.kexec import crash_status, load_crash_kernel, unload_crash_kernel
from kdump_mkinitrd.arming.peers import PeerKdump, armed_peers
from kdump_mkinitrd.config import Config, require_targets
from kdump_mkinitrd.dumps.announce import announce_new_dumps, dump_folders
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan.kernelimage import open_for_kexec
from kdump_mkinitrd.image.build import BuildRequest, build, stale_reasons
from kdump_mkinitrd.image.inspect_image import read_manifest
from kdump_mkinitrd.output import write_atomic

# Exit codes scripts can rely on (also in the man page).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NOT_LOADED = 2
EXIT_NO_RESERVATION = 3
EXIT_STALE = 4
EXIT_PEER_ARMED = 5  # another kdump (Debian's kdump-tools, kdump.service) is armed at boot


def state_dir() -> Path:
    return Path(os.environ.get("KDUMP_MKINITRD_STATE_DIR", "/var/lib/kdump-mkinitrd"))


@dataclass(frozen=True)
class Loaded:
    """What `register` loaded, for `status`."""

    kver: str
    kernel: str
    image: str
    kmoddir: str
    config: str | None
    cmdline: str
    hostonly: bool
    # How it was loaded: "kexec_file_load", or "kexec_load (kexec-tools): why" (state files
    # written before this field read as "").
    method: str = ""


def peer_root() -> Path:
    """Where other kdumps' configs and enabled units are looked for (a tree, in tests)."""
    return Path(os.environ.get("KDUMP_MKINITRD_PEER_ROOT", "/"))


def _state_file() -> Path:
    return state_dir() / "loaded.json"


def read_loaded() -> Loaded | None:
    try:
        return Loaded(**json.loads(_state_file().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def register(
    config: Config,
    request: BuildRequest,
    append: tuple[str, ...] = (),
    proc_cmdline: Path = Path("/proc/cmdline"),
) -> tuple[Loaded, list[str]]:
    """Rebuild if needed, then load. Returns what was loaded and why it was rebuilt."""
    with contextlib.suppress(OSError):  # saying so must never keep the capture kernel off
        announce_new_dumps(dump_folders(config), state_dir() / "reported-dumps.json")
    require_targets(config)  # before anything else: such an image could never save a dump
    status = crash_status()
    if status.supported and status.reserved_bytes == 0:
        suggestion = estimate(request.output, None).total_mb if request.output.exists() else None
        hint = f"crashkernel={suggestion}M" if suggestion else "crashkernel= (see `estimate`)"
        raise NoReservation(
            "no memory is reserved for a capture kernel (/sys/kernel/kexec_crash_size is 0): "
            f"add {hint} to the kernel command line and reboot"
        )
    # Everything a load needs is checked before the build: a run bound to fail must not
    # replace a working image (at boot, the one the kernel hook built with the right kernel).
    if not status.supported:
        raise KdumpError(
            "this kernel has no crash dump support (/sys/kernel/kexec_crash_size is missing), "
            f"so nothing can be loaded; {request.output} was left as it was"
        )
    kernel = request.kernel_image
    if kernel is None:
        raise KdumpError(
            f"no kernel image for {request.kver} (looked for /boot/vmlinuz-{request.kver}, "
            f"{request.kmoddir}/vmlinuz, /boot/vmlinuz-linux*): give --kernel; "
            f"{request.output} was left as it was"
        )
    try:
        proc_text = proc_cmdline.read_text()
    except OSError as exc:
        raise KdumpError(f"cannot read {proc_cmdline}: {exc.strerror}") from None
    machine = normalise_arch(os.uname().machine)
    cmdline = capture_cmdline(
        proc_text, machine,
        append=[*config.cmdline.append, *append], remove=config.cmdline.remove,
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        # Opened (and a compressed kernel unpacked and checked) before the build, once.
        try:
            opened = stack.enter_context(open_for_kexec(kernel, machine))
        except KdumpError as exc:
            raise KdumpError(f"{exc}; {request.output} was left as it was") from None
        report = build(config, request, if_needed=True)
        suggest = f"{estimate(request.output, None).total_mb}M"
        result = load_crash_kernel(
            opened, request.output, cmdline, machine=machine, suggest=suggest
        )
    loaded = Loaded(
        kver=request.kver,
        kernel=str(kernel),
        image=str(request.output),
        kmoddir=str(request.kmoddir),
        config=None if config.source == "<defaults>" else config.source,
        cmdline=cmdline,
        hostonly=request.hostonly,
        method=result.method
        + (f" (kexec-tools): {result.fallback_reason}" if result.fallback_reason else ""),
    )
    write_atomic(_state_file(), (json.dumps(asdict(loaded), indent=1) + "\n").encode(), 0o644)
    return loaded, report.rebuilt_because


class NoReservation(KdumpError):
    """crashkernel= reserved nothing: there is nothing to arm (exit 3, not a failure)."""


def unregister() -> tuple[bool, PeerKdump | None]:
    """Unload; True when a capture kernel was loaded before. A capture kernel another armed
    kdump loaded (we loaded none) is left as it is, and that kdump is returned."""
    peers = armed_peers(peer_root())
    if peers and read_loaded() is None:
        return False, peers[0]
    was_loaded = unload_crash_kernel()
    with contextlib.suppress(FileNotFoundError):
        _state_file().unlink()
    return was_loaded, None


def status(config_loader: Any) -> tuple[int, dict[str, Any]]:
    """Exit code and the facts: loaded, reservation, image, kernel, freshness, targets."""
    crash = crash_status()
    info: dict[str, Any] = {"loaded": crash.loaded, "reserved_bytes": crash.reserved_bytes}
    loaded = read_loaded()
    if loaded is not None:
        info.update(asdict(loaded))
        image = Path(loaded.image)
        try:
            config = config_loader(Path(loaded.config) if loaded.config else None)
            request = BuildRequest(loaded.kver, Path(loaded.kmoddir), image, Path(loaded.kernel),
                                   hostonly=loaded.hostonly)  # fmt: skip
            info["stale_because"] = stale_reasons(config, request)
            manifest = read_manifest(image)
            info["targets"] = [t.name for t in config.targets]
            info["image_features"] = [f["name"] for f in manifest.get("features", [])]
        except KdumpError as exc:
            info["stale_because"] = [str(exc)]
    info["up_to_date"] = loaded is not None and not info.get("stale_because")
    peers = armed_peers(peer_root())
    if peers:
        info["peer_armed"] = peers[0].message()
        return EXIT_PEER_ARMED, info
    if not crash.loaded:
        return EXIT_NOT_LOADED, info
    if loaded is not None and not info["up_to_date"]:
        return EXIT_STALE, info
    return EXIT_OK, info
