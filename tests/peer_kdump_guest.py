"""Debian's kdump-tools in the Debian guest, for the migration test and `make bench`.

The image is the Debian guest with kdump-tools installed as an admin does (`dpkg -i`, its
debconf default USE_KDUMP=1, its unit enabled by its own maintainer script). It is installed
after the kernel so no kernel hook makes its capture initrd in the build chroot, where
initramfs-tools' MODULES=dep would look at the build host's root: kdump-config makes it in the
guest at first boot, for the guest's root on LVM, as on a real host.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from kdump_mkinitrd.qemutest.debian_guest import CRASHKERNEL, SHARE, Console, GuestOptions, Shell
from kdump_mkinitrd.qemutest.debian_guest import _qemu as qemu_command
from kdump_mkinitrd.qemutest.debian_guest_image import (
    KVER,
    ROOT_DEVICE,
    GuestImage,
    debian_image,
)
from kdump_mkinitrd.qemutest.testcache import downloaded_deb

# kdump-tools' Depends that the base image lacks (dpkg -i installs no dependencies).
KDUMP_TOOLS_DEPS = ("file", "ucf", "linux-base", "bsdextrautils", "lsb-base")
OUR_CONFIG = (
    f"targets:\n  - {{type: disk, device: {ROOT_DEVICE}, fstype: ext4, path: /var/crash}}\n"
)
# What the admin does to switch, as register's refusal says (the config comes after our package).
DISABLE_KDUMP_TOOLS = (
    "systemctl disable --now kdump-tools && "
    "sed -i 's/^USE_KDUMP=1$/USE_KDUMP=0/' /etc/default/kdump-tools"
)
THEIR_IMAGE = f"/var/lib/kdump/initrd.img-{KVER}"
OUR_IMAGE = f"/var/lib/kdump-mkinitrd/kdump-{KVER}.img"
THEIR_SAVED = r"kdump-tools: saved vmcore in"
OUR_SAVED = r"kdump: dump saved to target"


def kdump_tools_image(log: Path | None = None) -> GuestImage:
    deb = downloaded_deb("kdump-tools")
    customize = (
        f'cp {shlex.quote(str(deb))} "$1/tmp/kdump-tools.deb"',
        # mmdebstrap's policy-rc.d keeps its init script from starting in the chroot.
        'chroot "$1" env DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/kdump-tools.deb',
        'rm "$1/tmp/kdump-tools.deb"',
        'test -L "$1/etc/systemd/system/basic.target.wants/kdump-tools.service"',
        'grep -qx USE_KDUMP=1 "$1/etc/default/kdump-tools"',
    )
    return debian_image(extra_packages=KDUMP_TOOLS_DEPS, customize=customize, log=log)


@dataclass
class Guest:
    """One QEMU process across the guest's boots, with a root shell."""

    console: Console
    shell: Shell
    share: Path
    notes: dict[str, str] = field(default_factory=dict)

    def run(self, command: str, timeout: float = 600) -> tuple[int, str]:
        step = self.shell.run(command, timeout)
        return step.code, step.output

    def reboot(self, timeout: float = 1500) -> None:
        mark = self.console.mark()
        self.console.type("systemctl reboot\n")
        self.shell.booted(mark, timeout)


def boot(
    image: GuestImage, workdir: Path, crashkernel: str = CRASHKERNEL, disk: Path | None = None
) -> Guest:
    """Boot `disk` (by default a fresh overlay of `image`) with `image`'s kernel up to its
    root shell; the caller closes `guest.console`."""
    share = workdir / "share"
    share.mkdir(parents=True, exist_ok=True)
    disk = disk or image.overlay(workdir / "root-overlay.qcow2")
    command = qemu_command(image, disk, share, GuestOptions(crashkernel=crashkernel))
    console = Console(command, workdir / "serial.log")
    guest = Guest(console, Shell(console, share), share)
    try:
        guest.shell.booted(0, 1800)
    except BaseException:
        stop(guest)
        raise
    return guest


def stop(guest: Guest) -> None:
    if guest.console.proc.poll() is None:
        guest.console.type("systemctl poweroff -f\n")
    guest.console.close(120)


def install_ours(guest: Guest, deb: Path) -> tuple[int, str]:
    (guest.share / deb.name).write_bytes(deb.read_bytes())
    return guest.run(f"dpkg -i {SHARE}/{deb.name}", 1200)
