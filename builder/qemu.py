"""Booting a kernel and an image in QEMU with a serial log and a hard time limit."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from builder.errors import KdumpError


@dataclass(frozen=True)
class Boot:
    kernel: Path
    initrd: Path
    cmdline: str
    serial_log: Path
    memory: str = "512M"
    disks: tuple[Path, ...] = ()
    accel: str = "tcg"
    timeout: float = 120.0
    extra: tuple[str, ...] = ()
    # Pull the plug: kill QEMU as soon as the serial log shows any of these lines.
    kill_when: tuple[str, ...] = ()
    # Pull the network cable: take the NIC's link down (QEMU's monitor, set_link) as soon as
    # this says so (polled); the monitor listens on `monitor`.
    link_down_when: Callable[[], bool] | None = None
    monitor: Path | None = None
    # Runs QEMU through this command prefix (nsenter: the test NFS server's namespace).
    wrapper: tuple[str, ...] = ()


@dataclass
class BootResult:
    exit_code: int | None  # None when the time limit killed QEMU
    seconds: float
    log: str
    command: list[str] = field(default_factory=list)

    @property
    def timed_out(self) -> bool:
        return self.exit_code is None


def qemu_binary() -> str:
    found = shutil.which("qemu-system-x86_64")
    if found is None:
        raise KdumpError("qemu-system-x86_64 not found (Debian: apt-get install qemu-system-x86)")
    return found


def command(boot: Boot) -> list[str]:
    cmd = [
        *boot.wrapper,
        qemu_binary(),
        "-accel",
        boot.accel,
        "-m",
        boot.memory,
        "-smp",
        "1",
        "-display",
        "none",
        "-monitor",
        f"unix:{boot.monitor},server=on,wait=off" if boot.monitor else "none",
        "-no-reboot",
        "-nic",
        "none",
        "-serial",
        f"file:{boot.serial_log}",
        "-kernel",
        str(boot.kernel),
        "-initrd",
        str(boot.initrd),
        "-append",
        boot.cmdline,
    ]
    for disk in boot.disks:
        cmd += ["-drive", f"file={disk},if=virtio,format=raw,cache=unsafe"]
    return cmd + list(boot.extra)


def run(boot: Boot) -> BootResult:
    """Boot and wait for the guest to power off (-no-reboot turns reboots into exits too)."""
    cmd = command(boot)
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    code: int | None
    try:
        if boot.link_down_when and _wait_for(boot, proc, start, boot.link_down_when):
            _monitor(boot, "set_link n0 off")
        if boot.kill_when and _wait_for(boot, proc, start, partial(_logged, boot, boot.kill_when)):
            proc.kill()
        _, err = proc.communicate(timeout=max(boot.timeout - (time.monotonic() - start), 1))
        code = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        code = None
    seconds = time.monotonic() - start
    log = boot.serial_log.read_text(errors="replace") if boot.serial_log.exists() else ""
    if code not in (0, None):
        log += f"\n[qemu exited {code}: {err.decode(errors='replace').strip()}]\n"
    return BootResult(code, seconds, log, cmd)


def _logged(boot: Boot, markers: tuple[str, ...]) -> bool:
    text = boot.serial_log.read_text(errors="replace") if boot.serial_log.exists() else ""
    return any(marker in text for marker in markers)


def _wait_for(
    boot: Boot, proc: subprocess.Popen[bytes], start: float, ready: Callable[[], bool]
) -> bool:
    """Poll until `ready` says so; False when QEMU ended or time ran out."""
    while time.monotonic() - start < boot.timeout and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.05)
    return False


def _monitor(boot: Boot, command: str) -> None:
    """One command to QEMU's human monitor, once its prompt shows."""
    assert boot.monitor is not None
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(boot.monitor))
        said = b""
        while b"(qemu)" not in said:
            chunk = sock.recv(4096)
            if not chunk:
                raise KdumpError(f"QEMU's monitor closed before its prompt: {said!r}")
            said += chunk
        sock.sendall(command.encode() + b"\n")
        said = b""
        while b"(qemu)" not in said:  # the echo, any answer, then the next prompt
            chunk = sock.recv(4096)
            if not chunk:
                break
            said += chunk


def default_accel() -> str:
    """TCG unless asked: on our machines /dev/kvm exists but KVM guests hang at boot."""
    return os.environ.get("KDUMP_QEMU_ACCEL", "tcg")
