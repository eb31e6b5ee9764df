"""Booting a kernel and an image in QEMU with a serial log and a hard time limit."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kdump_mkinitrd.arming.cmdline import normalise_arch
from kdump_mkinitrd.errors import KdumpError


@dataclass(frozen=True)
class Machine:
    """A QEMU system emulator and the virtual board, CPU and console it gives a guest."""

    arch: str  # the kernel's name for the architecture (uname -m)
    program: str
    package: str  # the Debian package that has `program`
    board: tuple[str, ...]
    console: str  # the serial console's device name in the guest


MACHINES = {
    # QEMU's default PC board; the first serial port is the 16550 ttyS0.
    "x86_64": Machine("x86_64", "qemu-system-x86_64", "qemu-system-x86", (), "ttyS0"),
    # `virt`, the board made for virtual machines: virtio over PCIe, a PL011 serial port
    # (ttyAMA0) and a device tree QEMU writes, which kexec_file_load hands on to the capture
    # kernel. The kernel is booted directly (-kernel), without UEFI firmware: nothing here
    # needs EFI, and the firmware would add seconds to every boot under TCG. cortex-a57 is a
    # plain ARMv8.0 core, the model SUSE's kdump calibration uses: TCG emulates it much faster
    # than `-cpu max`, whose pointer authentication makes every function call costly.
    "aarch64": Machine(
        "aarch64",
        "qemu-system-aarch64",
        "qemu-system-arm",
        ("-M", "virt", "-cpu", "cortex-a57"),
        "ttyAMA0",
    ),
}


def machine(arch: str = "x86_64") -> Machine:
    """The QEMU machine for `arch` (``amd64``/``arm64`` are accepted, as Debian names them)."""
    name = normalise_arch(arch)
    if name not in MACHINES:
        raise KdumpError(f"qemu-test boots x86_64 and aarch64 guests, not {arch}")
    return MACHINES[name]


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
    # Break something under the running guest: send `monitor_command` to QEMU's monitor (on
    # `monitor`) once this says so (polled): `set_link n0 off` pulls the network cable,
    # `drive_del virtio0` makes the first disk fail every request with EIO.
    monitor_when: Callable[[], bool] | None = None
    monitor_command: str = "set_link n0 off"
    monitor: Path | None = None
    # Called with each line of the serial console as it arrives (progress for people).
    on_line: Callable[[str], None] | None = None
    # Runs QEMU through this command prefix (nsenter: the test NFS server's namespace).
    wrapper: tuple[str, ...] = ()
    arch: str = "x86_64"


@dataclass
class BootResult:
    exit_code: int | None  # None when the time limit killed QEMU
    seconds: float
    log: str
    command: list[str] = field(default_factory=list)

    @property
    def timed_out(self) -> bool:
        return self.exit_code is None


def qemu_binary(arch: str = "x86_64") -> str:
    wanted = machine(arch)
    found = shutil.which(wanted.program)
    if found is None:
        raise KdumpError(f"{wanted.program} not found (Debian: apt-get install {wanted.package})")
    return found


def command(boot: Boot) -> list[str]:
    cmd = [
        *boot.wrapper,
        qemu_binary(boot.arch),
        *machine(boot.arch).board,
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
    # QEMU's own messages go to a file, not a pipe: nothing reads a pipe while the guest runs.
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err)  # fmt: skip
        console = _Console(boot.serial_log, boot.on_line)
        code = _watch(boot, proc, start, console)
        console.finish()
        err.seek(0)
        message = err.read().decode(errors="replace").strip()
    seconds = time.monotonic() - start
    log = console.text
    if code not in (0, None):
        log += f"\n[qemu exited {code}: {message}]\n"
    return BootResult(code, seconds, log, cmd)


class _Console:
    """The serial log as it grows: its lines so far, each new one handed on as it comes."""

    def __init__(self, path: Path, on_line: Callable[[str], None] | None) -> None:
        self.path, self.on_line = path, on_line
        self.lines: list[str] = []
        self._offset, self._partial, self._checked = 0, b"", 0

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def _add(self, raw: bytes, end: str) -> None:
        line = raw.decode(errors="replace")
        self.lines.append(line + end)
        if self.on_line is not None:
            self.on_line(line.rstrip("\r"))

    def read(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        # Whole lines only, so that a marker split across two reads is still found.
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            self._add(line, "\n")

    def finish(self) -> None:
        """The last line, when the guest stopped before ending it."""
        self.read()
        if self._partial:
            self._add(self._partial, "")
            self._partial = b""

    def shows(self, markers: tuple[str, ...]) -> bool:
        """Whether a line that came since the last call holds one of `markers`."""
        new, self._checked = self.lines[self._checked :], len(self.lines)
        return any(marker in line for line in new for marker in markers)


def _watch(
    boot: Boot, proc: subprocess.Popen[bytes], start: float, console: _Console
) -> int | None:
    """Poll QEMU until it exits (its exit code) or the time limit kills it (None), reading
    the console and doing what `kill_when` and `monitor_when` ask on the way."""
    monitored = boot.monitor_when is None
    while True:
        try:
            return proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() - start > boot.timeout:
            proc.kill()
            proc.wait()
            return None
        console.read()
        if not monitored and boot.monitor_when is not None and boot.monitor_when():
            _monitor(boot, boot.monitor_command)
            monitored = True
        if boot.kill_when and console.shows(boot.kill_when):
            proc.kill()
            return proc.wait()


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
