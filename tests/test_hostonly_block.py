"""Host-only detection on real block devices: a target on device-mapper, md RAID or a loop
device is refused at build time (the capture init cannot assemble a stack yet), and so is a
target with no driver anywhere above it in sysfs; a disk behind a driver gives its modules.

The build host's kernel may lack device-mapper, md or brd (these tests then skip there):
`test_block_tests_pass_under_a_debian_kernel` runs them all again under the Debian 6.1
kernel in QEMU, with this machine's root read-only over 9p, where none may skip."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdump_mkinitrd.config import parse
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import hostonly
from tests.conftest import Kernel
from tests.guest_pytest import has_device_mapper, passed_count, pytest_in_guest


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


def _config(device: str, kind: str = "disk") -> str:
    fstype = ", fstype: ext4" if kind == "disk" else ""
    return f"# hostonly\ntargets:\n  - {{type: {kind}, device: {device}{fstype}}}\n"


def _refusal(device: str, kind: str = "disk") -> str:
    with pytest.raises(KdumpError) as err:
        hostonly.detect(parse(_config(device, kind), "kdump.yaml"))
    message = str(err.value)
    assert message.startswith("kdump.yaml:3: --hostonly: target device " + device), message
    return message


@contextlib.contextmanager
def _loop(tmp_path: Path, name: str, size_mb: int = 8) -> Iterator[str]:
    if shutil.which("losetup") is None or not Path("/dev/loop-control").exists():
        pytest.skip("no loop devices on this kernel")
    backing = tmp_path / name
    with backing.open("wb") as f:
        f.truncate(size_mb * 2**20)
    device = _sh("losetup", "--find", "--show", str(backing)).strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False, timeout=60)


def test_loop_device_target_is_refused(tmp_path: Path) -> None:
    with _loop(tmp_path, "backing.img") as device:
        message = _refusal(device)
    assert f"is a loop device ({Path(device).name} over {tmp_path / 'backing.img'})" in message
    assert "not supported yet" in message


def test_device_mapper_target_is_refused(tmp_path: Path) -> None:
    if not has_device_mapper():
        pytest.skip("no device-mapper on this kernel (dmsetup version fails)")
    with _loop(tmp_path, "pv.img") as loop:
        sectors = _sh("blockdev", "--getsz", loop).strip()
        # A linear table over the loop device, as LVM makes; the uuid says who made it.
        _sh("dmsetup", "create", "kdumptest", "-u", "LVM-kdumptestvg-crash", "--table",
            f"0 {sectors} linear {loop} 0")  # fmt: skip
        try:
            dm = next(p.parent.parent.name for p in Path("/sys/block").glob("dm-*/dm/name")
                      if p.read_text().strip() == "kdumptest")  # fmt: skip
            message = _refusal(f"/dev/{dm}")
        finally:
            subprocess.run(["dmsetup", "remove", "kdumptest"], check=False, timeout=60)
    assert "is a device-mapper device (LVM kdumptest)" in message
    assert "not supported yet" in message


def test_md_raid_target_is_refused(tmp_path: Path) -> None:
    if not Path("/proc/mdstat").exists() or shutil.which("mdadm") is None:
        pytest.skip("no md RAID on this kernel (/proc/mdstat) or no mdadm")
    with _loop(tmp_path, "a.img", 24) as a, _loop(tmp_path, "b.img", 24) as b:
        _sh("mdadm", "--create", "/dev/md/kdumptest", "--run", "--level=1", "--raid-devices=2",
            "--metadata=1.2", "--assume-clean", a, b)  # fmt: skip
        try:
            md = Path("/dev/md/kdumptest").resolve()
            message = _refusal(str(md), kind="raw")
        finally:
            subprocess.run(["mdadm", "--stop", "/dev/md/kdumptest"], check=False, timeout=60)
    # The array is a raid layer now; a raw target writes the device itself and brings no
    # layer up, so it is refused before the loop devices under the array are looked at.
    assert f"target device {md} is on raid " in message
    assert "a raw target cannot bring storage layers up, a disk target can" in message


def test_block_device_without_driver_is_refused() -> None:
    """brd's RAM disks hang off /sys/devices/virtual with no driver bound: the general case
    of a device host-only detection finds no driver for."""
    if not Path("/dev/ram0").is_block_device():
        pytest.skip("no brd RAM disk on this kernel (/dev/ram0)")
    message = _refusal("/dev/ram0", kind="raw")
    assert "(/sys/devices/virtual/block/ram0): no driver is bound to it" in message
    assert "--no-hostonly" in message and "kernel_modules" in message


def test_disk_behind_a_driver_gives_its_modules() -> None:
    if not Path("/dev/vda").is_block_device():
        pytest.skip("no virtio disk /dev/vda here")
    found = hostonly.detect(parse(_config("/dev/vda", "raw"), "kdump.yaml"))
    # A driver built into the kernel is found too, and needs no module.
    module = Path("/sys/module/virtio_blk/initstate").exists()
    assert ("virtio_blk" in {name for name, _ in found.modules}) == module


GUEST_TESTS = 5


@pytest.mark.qemu
def test_block_tests_pass_under_a_debian_kernel(kernel61: Kernel, tmp_path: Path) -> None:
    disk = tmp_path / "vda.img"
    with disk.open("wb") as f:
        f.truncate(2**20)
    log = pytest_in_guest(
        kernel61, tmp_path, ["tests/test_hostonly_block.py"],
        modules=["dm_mod", "md_mod", "raid1", "loop", "brd", "virtio_blk"],
        extra=("-drive", f"file={disk},if=virtio,format=raw"),
    )  # fmt: skip
    # Every test ran and passed: none skipped for want of dm, md or brd in this kernel.
    assert passed_count(log) == [str(GUEST_TESTS)], log[-4000:]
