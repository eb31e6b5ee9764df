"""`qemu-test --guest debian`: our .deb on a real Debian 12 system (systemd, udev, root on
LVM), installed and used the way an admin does, in one QEMU process across its boots.

Boot 1: `dpkg -i` our package (its maintainer scripts and kernel hook run in the guest);
reboot. Boot 2: the service armed the capture kernel at boot; crash with sysrq. The capture
kernel saves the dump to /var/crash on the root LV and reboots; QEMU's direct kernel boot
starts boot 3, where our tooling finds and reports the dump, which is copied out and checked
on the host as every qemu-test dump is. Then a second kernel package comes and goes through
the kernel hooks, and our package is removed and purged.

The harness drives a root shell on the serial console (the image logs root in there); every
command's output and exit status come back through a 9p folder shared with the guest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.progress import Progress
from kdump_mkinitrd.qemutest.debian_guest_image import (
    KVER,
    ROOT_DEVICE,
    GuestImage,
    debian_image,
)
from kdump_mkinitrd.qemutest.qemu import default_accel, qemu_binary
from kdump_mkinitrd.qemutest.run import Report, verify_dump
from kdump_mkinitrd.qemutest.testcache import downloaded_deb

SECOND_KVER = "6.12.117+deb12-amd64"
SECOND_PACKAGE = f"linux-image-{SECOND_KVER}"
PACKAGE = "kdump-mkinitrd"
MEMORY = "1536M"
# The capture image with the Python stage needs 112-160M on the 6.1 kernel; the guest's
# host-only image also carries LVM.
CRASHKERNEL = "192M"
IMAGES = "/var/lib/kdump-mkinitrd"
SHARE = "/share"  # the guest's mount of the host folder


@dataclass
class GuestOptions:
    keep: Path | None = None
    memory: str = MEMORY
    crashkernel: str = CRASHKERNEL
    progress: Progress = field(default_factory=Progress)


@dataclass
class GuestReport(Report):
    figures: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lines = super().summary().splitlines()
        lines[0] = f"qemu-test --guest debian: {'PASS' if self.ok else 'FAIL'}"
        lines[1:1] = [f"  {k}: {v}" for k, v in self.figures.items()]
        return "\n".join(lines)


class Console:
    """QEMU with the guest's serial port on a pipe: the lines it printed (with the time each
    came), and typing into it."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log.open("wb")
        self._err = log.with_name("qemu-stderr.txt").open("wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err)  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        partial = b""
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.log.write(chunk)
            self.log.flush()
            *whole, partial = (partial + chunk).split(b"\n")
            with self._changed:
                now = time.monotonic()
                self.lines += [(now, w.decode(errors="replace").rstrip("\r")) for w in whole]
                self._changed.notify_all()
        with self._changed:
            if partial:
                self.lines.append((time.monotonic(), partial.decode(errors="replace")))
            self._changed.notify_all()

    def mark(self) -> int:
        with self._changed:
            return len(self.lines)

    def wait_for(self, pattern: str, since: int, timeout: float) -> tuple[int, re.Match[str]]:
        """The first line from index `since` on that matches `pattern`: its index and match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for n in range(since, len(self.lines)):
                    found = regex.search(self.lines[n][1])
                    if found:
                        return n, found
                since = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    why = "QEMU exited" if not self._reader.is_alive() else f"{timeout:.0f}s"
                    tail = "\n".join(line for _, line in self.lines[-40:])
                    raise KdumpError(f"waited for {pattern!r} in vain ({why}):\n{tail}")
                self._changed.wait(min(left, 1.0))

    def type(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def close(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        self.log.close()
        self._err.close()


@dataclass
class Step:
    code: int
    output: str


class Shell:
    """Commands in the guest's root shell: output and exit code come back through the share,
    so the console's echo and the kernel's messages on it never mix into them."""

    def __init__(self, console: Console, share: Path) -> None:
        self.console, self.share = console, share
        self.count = 0
        (share / "out").mkdir(exist_ok=True)

    def booted(self, since: int, timeout: float) -> str:
        """Wait for the root shell after line `since`, then for systemd to finish starting
        the system (the boot service with it); returns systemd's verdict (running,
        degraded)."""
        self.logged_in(since, timeout)
        return self.run("systemctl is-system-running --wait", timeout).output.strip()

    def logged_in(self, since: int, timeout: float) -> int:
        """Wait for the autologin after line `since`, then until the shell answers."""
        n, _ = self.console.wait_for(r"\(automatic login\)", since, timeout)
        for _ in range(30):
            self.count += 1
            self.console.type(f"printf '@@%s@@\\n' ready-{self.count}\n")
            try:
                self.console.wait_for(f"@@ready-{self.count}@@", n, 10)
            except KdumpError:
                continue
            # Package scripts see a terminal on stdin: no debconf question may wait on it.
            self.console.type("export DEBIAN_FRONTEND=noninteractive\n")
            self.run(f"mountpoint -q {SHARE} || {{ mkdir -p {SHARE} && mount -t 9p -o "
                     f"trans=virtio,version=9p2000.L,msize=262144 share {SHARE}; }}",
                     timeout=60, through_share=False)  # fmt: skip
            return n
        raise KdumpError("the guest's root shell never answered")

    def run(self, command: str, timeout: float = 300, through_share: bool = True) -> Step:
        self.count += 1
        n = self.count
        since = self.console.mark()
        where = f"{SHARE}/out/{n}"
        redirect = f" >{where} 2>&1" if through_share else ""
        self.console.type(f"( {command} ){redirect}; printf '@@%s %s@@\\n' done-{n} $?\n")
        _, found = self.console.wait_for(rf"@@done-{n} (\d+)@@", since, timeout)
        output = (self.share / "out" / str(n)).read_text(errors="replace") if redirect else ""
        return Step(int(found.group(1)), output)


def build_deb(outdir: Path) -> Path:
    """Our package, built fresh from this checkout with the project's own script."""
    checkout = Path(__file__).resolve().parents[2]
    script = checkout / "scripts" / "build-deb"
    if not script.is_file():
        raise KdumpError(f"{script} is missing: this checkout cannot build the .deb")
    outdir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([str(script), str(outdir)], capture_output=True, text=True)
    debs = sorted(outdir.glob(f"{PACKAGE}_*_all.deb"))
    if done.returncode != 0 or not debs:
        raise KdumpError(f"scripts/build-deb failed ({done.returncode}): {done.stderr[-2000:]}")
    return debs[-1]


def _qemu(image: GuestImage, disk: Path, share: Path, options: GuestOptions) -> list[str]:
    # No -no-reboot: a reboot (ours, or the capture kernel's final action) starts the guest's
    # own kernel again through QEMU's direct kernel boot, as firmware would.
    return [
        qemu_binary(), "-accel", default_accel(), "-m", options.memory, "-smp", "1",
        "-display", "none", "-monitor", "none", "-nic", "none", "-serial", "stdio",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"root={ROOT_DEVICE} ro console=ttyS0 crashkernel={options.crashkernel} "
                   "panic=10",
        "-drive", f"file={disk},if=virtio,format=qcow2,cache=unsafe",
        "-virtfs", f"local,path={share},mount_tag=share,security_model=none",
    ]  # fmt: skip


def run_debian_guest(options: GuestOptions) -> GuestReport:
    workdir = options.keep or Path(tempfile.mkdtemp(prefix="kdump-qemu-debian-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = GuestReport(workdir=str(workdir), serial_log=str(workdir / "serial.log"))
    report.figures.update(memory=options.memory, crashkernel=options.crashkernel)
    progress = options.progress
    started = time.monotonic()

    def timed(name: str, since: float) -> float:
        now = time.monotonic()
        report.timings[name] = round(now - since, 1)
        return now

    progress.phase("guest image (built once, then cached)")
    t = time.monotonic()
    image = debian_image(log=workdir / "image-build.log")
    t = timed("guest_image", t)
    share = workdir / "share"
    share.mkdir(exist_ok=True)
    progress.phase("building our .deb")
    deb = build_deb(workdir / "deb")
    (share / deb.name).write_bytes(deb.read_bytes())
    kernel_deb = downloaded_deb(SECOND_PACKAGE)
    (share / kernel_deb.name).write_bytes(kernel_deb.read_bytes())
    report.figures["deb"] = deb.name
    t = timed("deb", t)
    disk = image.overlay(workdir / "root-overlay.qcow2")
    console = Console(_qemu(image, disk, share, options), Path(report.serial_log))
    try:
        _session(console, Shell(console, share), report, options, deb, kernel_deb, share)
        console.close(timeout=120)  # the session ends with a poweroff
    finally:
        console.close(timeout=0)  # kills QEMU if it still runs (a step failed or hung)
        disk.unlink(missing_ok=True)
    report.timings["total"] = round(time.monotonic() - started, 1)
    report.ok = bool(report.checks) and all(report.checks.values())
    progress.done()
    return report


def _session(
    console: Console,
    shell: Shell,
    report: GuestReport,
    options: GuestOptions,
    deb: Path,
    kernel_deb: Path,
    share: Path,
) -> None:
    progress = options.progress
    check = report.check

    def step(name: str, command: str, timeout: float = 300) -> Step:
        done = shell.run(command, timeout)
        check(name, done.code == 0, f"exit {done.code}: {done.output.strip()[-1500:]}")
        return done

    progress.phase("boot 1: systemd comes up")
    start = time.monotonic()
    report.figures["boot_1_state"] = shell.booted(0, 900)
    report.timings["boot_1"] = round(time.monotonic() - start, 1)

    progress.phase("boot 1: dpkg -i our package")
    t = time.monotonic()
    step("dpkg_install", f"dpkg -i {SHARE}/{deb.name}", 900)
    report.timings["dpkg_install"] = round(time.monotonic() - t, 1)
    step("service_enabled", "systemctl is-enabled kdump-mkinitrd")
    image = f"{IMAGES}/kdump-{KVER}.img"
    size = step("image_built", f"stat -c %s {image}")
    if size.code == 0:
        report.image_size = int(size.output.split()[0])
    estimate = shell.run(f"kdump-mkinitrd estimate -k {KVER} --image {image}")
    report.figures["estimate"] = (estimate.output.strip().splitlines() or ["?"])[0]

    progress.phase("boot 2: reboot; the service arms the capture kernel at boot")
    mark, t = console.mark(), time.monotonic()
    console.type("systemctl reboot\n")
    report.figures["boot_2_state"] = shell.booted(mark, 900)
    report.timings["boot_2"] = round(time.monotonic() - t, 1)
    report.figures["boot_2_systemd"] = shell.run("systemd-analyze").output.strip()
    step("service_active_at_boot", "systemctl is-active kdump-mkinitrd")
    loaded = shell.run("cat /sys/kernel/kexec_crash_loaded")
    check("capture_kernel_loaded_at_boot", loaded.output.strip() == "1", loaded.output)
    journal = shell.run("journalctl -b -u kdump-mkinitrd --no-pager")
    (share / "journal-boot2.txt").write_text(journal.output)
    # No target configured: zero-config's default, the root LV's /var/crash, and it says so.
    default = [line for line in journal.output.splitlines() if "dumping to /var/crash on" in line]
    check("zero_config_default_target", bool(default), journal.output[-800:])
    if default:
        report.figures["default_target"] = default[0].split(": ", 2)[-1]
    if loaded.output.strip() != "1":  # a crash now would only hang or reboot
        console.type("systemctl poweroff\n")
        return

    progress.phase("crash (sysrq); the capture kernel saves the dump to the root LV")
    mark, crashed = console.mark(), time.monotonic()
    console.type("echo c > /proc/sysrq-trigger\n")
    login = shell.logged_in(mark, 900)
    back = time.monotonic()
    report.figures["boot_3_state"] = shell.run(
        "systemctl is-system-running --wait", 900
    ).output.strip()
    report.timings["boot_3_service_done"] = round(time.monotonic() - back, 1)
    # Boot 3 starts at the last kernel banner before its login; everything from the panic
    # to there is the capture (its kernel's boot, the dump, its reboot).
    banners = [n for n in range(mark, login) if "Linux version" in console.lines[n][1]]
    boot3 = console.lines[banners[-1]][0] if banners else back
    report.timings["capture"] = round(boot3 - crashed, 1)
    report.timings["boot_3"] = round(back - boot3, 1)
    report.timings["panic_to_login"] = round(back - crashed, 1)
    check("capture_kernel_booted", len(banners) >= 2, f"{len(banners)} kernel banners")

    progress.phase("boot 3: the dump is reported and copied out")
    listed = step("list_dumps", "kdump-mkinitrd list-dumps --json /var/crash")
    try:
        dumps = json.loads(listed.output)
    except ValueError:
        dumps = []
    complete = [d for d in dumps if d.get("state") == "complete"]
    check("list_dumps_shows_complete_dump", len(complete) == 1, listed.output[-500:])
    journal = shell.run("journalctl -b -u kdump-mkinitrd --no-pager")
    (share / "journal-boot3.txt").write_text(journal.output)
    saved = [line for line in journal.output.splitlines()
             if "a dump was saved by the capture kernel" in line]  # fmt: skip
    check("journal_reports_saved_dump", bool(saved), journal.output[-800:])
    if saved:
        report.figures["journal"] = saved[0].split(": ", 1)[-1]
    if complete:
        name = Path(complete[0]["path"]).name
        step("dump_copied_out", f"mkdir -p {SHARE}/crash && cp -a {complete[0]['path']} "
                                f"{SHARE}/crash/")  # fmt: skip
        if (share / "crash" / name).is_dir():
            verify_dump(share / "crash" / name, report)

    progress.phase(f"boot 3: a second kernel package ({SECOND_KVER}) through the hooks")
    second = f"{IMAGES}/kdump-{SECOND_KVER}.img"
    # The kernel package's own initramfs-tools hook would build a boot initrd for a kernel
    # this run never boots, minutes under TCG (over ten with MODULES=most): run-parts skips
    # a hook that is not executable, so only ours (and depmod's) run.
    shell.run(
        "chmod -x /etc/kernel/postinst.d/initramfs-tools /etc/kernel/postrm.d/initramfs-tools"
    )
    t = time.monotonic()
    step("second_kernel_installs", f"dpkg -i {SHARE}/{kernel_deb.name}", 1200)
    report.timings["second_kernel_install"] = round(time.monotonic() - t, 1)
    size = step("second_kernel_image_built", f"stat -c %s {second}")
    if size.code == 0:
        report.figures["second_kernel_image_size"] = int(size.output.split()[0])
    step("second_kernel_removes", f"dpkg -r {SECOND_PACKAGE}", 600)
    step("second_kernel_image_removed", f"test ! -e {second}")

    progress.phase("boot 3: removing and purging our package")
    step("dpkg_remove", f"dpkg -r {PACKAGE}", 300)
    loaded = shell.run("cat /sys/kernel/kexec_crash_loaded")
    check("capture_kernel_unloaded_on_remove", loaded.output.strip() == "0", loaded.output)
    left = shell.run(f"ls {IMAGES}/*.img")
    check("images_removed", left.code != 0, left.output)
    step("dpkg_purge", f"dpkg -P {PACKAGE}", 300)
    step("config_purged", "test ! -e /etc/kdump-mkinitrd.yaml")
    kept = shell.run("ls /var/crash/*/vmcore")
    check("dumps_kept_after_purge", kept.code == 0 and bool(kept.output.strip()), kept.output)
    console.type("systemctl poweroff\n")
