"""Rerun host test files under a Debian kernel in QEMU, for tests that need kernel features
the build host's kernel may lack (802.1Q, device-mapper, md): this machine's root, read-only
over 9p, is the guest's, so the same test files, Python and busybox run there."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from kdump_mkinitrd.qemutest.guest_images import host_root_image
from kdump_mkinitrd.qemutest.qemu import Boot, default_accel, run
from kdump_mkinitrd.qemutest.testcache import cache_root, kernel_cache
from tests.conftest import REPO, Kernel

# The guest mounts a fresh tmpfs over one host folder for pytest's temporary files and HOME;
# it must hide neither the checkout nor the Python that runs it, wherever those live (people
# clone into /tmp to try a project).
SCRATCH_CHOICES = ("/run", "/var/tmp", "/tmp")


def scratch_folder(needed: list[Path]) -> str:
    for folder in SCRATCH_CHOICES:
        if not any(path.is_relative_to(folder) for path in needed):
            return folder
    raise AssertionError(f"every one of {SCRATCH_CHOICES} holds one of {needed}")


def pytest_in_guest(
    kernel: Kernel,
    tmp_path: Path,
    tests: Sequence[str],
    modules: Sequence[str],
    extra: Sequence[str] = (),
) -> str:
    """Runs pytest on `tests` (not the qemu-marked ones) in the guest with `modules` loaded;
    returns the serial log after asserting that the run succeeded and nothing skipped."""
    # The host's test cache too: HOME is the scratch folder in the guest, so it is named.
    needed = [REPO, Path(sys.executable).resolve(), Path(sys.prefix), Path(sys.base_prefix),
              cache_root(), kernel_cache()]  # fmt: skip
    scratch = scratch_folder([path.resolve() for path in needed])
    # The guest's busybox prefers its own applets to the host's programs (its env has no -C).
    pytest_run = [
        "sh", "-c", 'cd "$0" && exec "$@"', str(REPO),
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", "--color=no",
        "-m", "not qemu", f"--basetemp={scratch}/pytest", *tests,
    ]  # fmt: skip
    image = tmp_path / "guest.img"
    boot_args = host_root_image(
        image, kernel.kver, kernel.kmoddir, [pytest_run], crash=False,
        writable=[scratch],
        environment=["PATH=/usr/sbin:/usr/bin:/sbin:/bin", f"HOME={scratch}",
                     f"TMPDIR={scratch}", "PYTHONDONTWRITEBYTECODE=1",
                     f"KDUMP_TEST_CACHE={cache_root()}",
                     f"KDUMP_TEST_KERNEL_CACHE={kernel_cache()}"],
        modules=list(modules),
    )  # fmt: skip
    result = run(
        Boot(
            kernel=kernel.vmlinuz,
            initrd=image,
            cmdline="console=ttyS0 panic=-1",
            serial_log=tmp_path / "serial.log",
            memory="1G",
            accel=default_accel(),
            timeout=600,
            extra=(*boot_args, *extra),
        )
    )
    log = result.log.replace("\r", "")
    assert "kdump-test: command succeeded" in log, log[-4000:]
    # pytest's own lines, not the kernel's: an OOM report or a stall warning on the same
    # console may say "skipped" too.
    run_log = log.split("kdump-test: running:")[-1]
    summaries = re.findall(r"^\d+ (?:passed|failed|skipped|error|deselected).* in [\d.]+s", run_log,
                           re.M)  # fmt: skip
    assert summaries, log[-4000:]
    assert not any("skipped" in line for line in summaries), log[-4000:]
    assert not re.search(r"^SKIPPED \[", run_log, re.M), log[-4000:]
    return log


def blank_disks(folder: Path, serials: Sequence[str], size_mb: int) -> list[str]:
    """QEMU arguments for one blank virtio disk per serial: guest tests find their disks by
    serial and touch no other."""
    args: list[str] = []
    for serial in serials:
        disk = folder / f"{serial}.img"
        with disk.open("wb") as f:
            f.truncate(size_mb * 2**20)
        args += ["-drive", f"file={disk},if=none,id={serial},format=raw",
                 "-device", f"virtio-blk-pci,drive={serial},serial={serial}"]  # fmt: skip
    return args


def passed_count(log: str) -> list[str]:
    """The counts on pytest's closing lines in the guest's log."""
    return re.findall(r"^(\d+) passed(?:, \d+ deselected)? in ", log, re.M)


# -- inside the guest ---------------------------------------------------------------------------


def disks_by_serial(serials: Sequence[str]) -> list[str]:
    """The guest's virtio disks blank_disks made, by serial, in that order: a guest test
    touches no other disk (on the build host none has these serials, so the list is short)."""
    found = {p.read_text().strip(): p.parent.name for p in Path("/sys/block").glob("vd*/serial")}
    return [f"/dev/{found[s]}" for s in serials if s in found]


def has_device_mapper() -> bool:
    if not shutil.which("dmsetup"):
        return False
    return subprocess.run(["dmsetup", "version"], capture_output=True, timeout=60).returncode == 0


# What guest tests use to make volumes: writes allowed, no udev in the guest, PVs on the
# test's virtio disks and on md arrays made on them.
SETUP_LVM_CONF = """\
devices { filter = [ "a|^/dev/vd|", "a|^/dev/md|", "r|.*|" ] use_devicesfile = 0
          obtain_device_list_from_udev = 0 hints = "none" md_component_detection = 1 }
global { locking_dir = "LOCKS" use_lvmpolld = 0 event_activation = 0 notify_dbus = 0 }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
backup { backup = 0 archive = 0 }
"""


class SetupLvm:
    """lvm as a guest test runs it to make its volumes: its own lvm.conf and locks under
    `tmp_path`, so nothing of the system's configuration or state is read or written."""

    def __init__(self, disks: list[str], tmp_path: Path) -> None:
        self.disks = disks
        self.tmp = tmp_path
        self.dir = tmp_path / "setup-lvm"
        (self.dir / "locks").mkdir(parents=True)
        (self.dir / "lvm.conf").write_text(SETUP_LVM_CONF.replace("LOCKS", str(self.dir / "locks")))

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, LVM_SYSTEM_DIR=str(self.dir), LVM_SUPPRESS_FD_WARNINGS="1")
        return subprocess.run(["lvm", *args], env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
