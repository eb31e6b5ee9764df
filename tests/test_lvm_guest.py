"""Real LVM under the capture's lvm layer and host-only detection: linear, striped and thin
volumes on virtio disks, built with this machine's lvm2. The build host's kernel may have no
device-mapper, so `test_lvm_tests_pass_in_a_guest` runs this file under the Debian 6.1 kernel
in QEMU (this machine's root read-only over 9p), where no test may skip. The tests only touch
disks whose virtio serial says they are this test's (kdump-lvm-N)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdump_mkinitrd.config import parse
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import hostonly
from kdump_mkinitrd.image import build
from kdump_mkinitrd.storage.lvm import LvmLayer
from tests.conftest import Kernel
from tests.guest_pytest import (
    SetupLvm,
    blank_disks,
    disks_by_serial,
    has_device_mapper,
    passed_count,
    pytest_in_guest,
)
from tests.test_storage import run_layer

SERIALS = ("kdump-lvm-0", "kdump-lvm-1", "kdump-lvm-2")
DISK_MB = 64
CONFIG = "targets: [{type: disk, device: /dev/kdumpvg/dump, fstype: ext4}]\n"


class Lvm(SetupLvm):
    def __call__(self, *args: str) -> str:
        run = self.run(*args)
        assert run.returncode == 0, run
        return run.stdout.strip()

    def layer(self, vg: str, lv: str, vmcore_mb: int = 8) -> tuple[int, str]:
        """The image's kdump_layer_lvm, as the capture init runs it; (status, its log)."""
        vmcore = self.tmp / "vmcore"
        with vmcore.open("wb") as f:
            f.truncate(vmcore_mb * 2**20)
        script = f'KDUMP_VMCORE={vmcore}\nkdump_stack_layer lvm {vg} {lv}\necho "status=$?"\n'
        run = run_layer(CONFIG, script, self.tmp / "capture", timeout=3)
        status = run.stdout.rsplit("status=", 1)[-1].strip()
        return int(status), run.stdout + run.stderr


def active() -> set[str]:
    """The device-mapper devices now up, by name."""
    return {p.read_text().strip() for p in Path("/sys/block").glob("dm-*/dm/name")}


@pytest.fixture
def lvm(tmp_path: Path) -> Iterator[Lvm]:
    disks = disks_by_serial(SERIALS)
    if len(disks) != len(SERIALS) or not has_device_mapper():
        pytest.skip("needs device-mapper and the virtio disks kdump-lvm-0..2 "
                    "(test_lvm_tests_pass_in_a_guest runs this file where they are)")  # fmt: skip
    (tmp_path / "capture").mkdir()
    tool = Lvm(disks, tmp_path)
    yield tool
    ours = ("kdumpvg", "othervg")
    for vg in ours:
        tool.run("vgchange", "-q", "-an", vg)
    # What lvm could not take down (a VG whose PV a test wiped): top volumes first, a pass
    # removes what nothing else holds open; then lvm's /dev/VG links.
    for _ in range(4):
        for name in sorted(n for n in active() if n.startswith(tuple(f"{vg}-" for vg in ours))):
            subprocess.run(["dmsetup", "remove", name], capture_output=True, timeout=60)
    for vg in ours:
        shutil.rmtree(f"/dev/{vg}", ignore_errors=True)
    for disk in disks:
        with open(disk, "r+b") as f:
            f.write(bytes(2**20))
    assert not active()


def _vg(lvm: Lvm, *disks: str, name: str = "kdumpvg") -> None:
    lvm("pvcreate", "-q", "-y", *disks)
    lvm("vgcreate", "-q", name, *disks)


def test_linear_lv_comes_up_alone(lvm: Lvm) -> None:
    d0, d1, d2 = lvm.disks
    _vg(lvm, d0, d1)
    _vg(lvm, d2, name="othervg")
    lvm("lvcreate", "-q", "-n", "dump", "-L", "40M", "kdumpvg")
    lvm("lvcreate", "-q", "-n", "other", "-L", "8M", "kdumpvg")
    lvm("lvcreate", "-q", "-n", "x", "-L", "8M", "othervg")
    lvm("vgchange", "-q", "-an", "kdumpvg", "othervg")
    seqno = lvm("vgs", "--noheadings", "-o", "vg_seqno", "kdumpvg")
    status, log = lvm.layer("kdumpvg", "dump")
    assert status == 0, log
    assert active() == {"kdumpvg-dump"}, log
    assert Path("/dev/mapper/kdumpvg-dump").is_block_device()
    assert Path("/dev/kdumpvg/dump").resolve() == Path("/dev/mapper/kdumpvg-dump").resolve()
    # Only the VG's own PVs were let through the filter.
    assert f"kdump: lvm: activating kdumpvg/dump on {d0} {d1} \n" in log, log
    # Nothing was written: the VG's metadata is as it was, and the image's lvm.conf
    # (metadata_read_only, no backup or archive) left no files.
    assert lvm("vgs", "--noheadings", "-o", "vg_seqno", "kdumpvg") == seqno
    assert sorted(p.name for p in (lvm.tmp / "capture" / "lvm").iterdir()) == ["lvm.conf"]
    # A second target on the same LV finds it up already.
    assert lvm.layer("kdumpvg", "dump")[0] == 0


def test_striped_lv_comes_up(lvm: Lvm) -> None:
    d0, d1, _ = lvm.disks
    _vg(lvm, d0, d1)
    lvm("lvcreate", "-q", "-n", "dump", "-i", "2", "-I", "64k", "-L", "32M", "kdumpvg")
    lvm("vgchange", "-q", "-an", "kdumpvg")
    status, log = lvm.layer("kdumpvg", "dump")
    assert status == 0 and active() == {"kdumpvg-dump"}, log
    table = subprocess.run(["dmsetup", "table", "kdumpvg-dump"], capture_output=True, text=True,
                           timeout=60).stdout  # fmt: skip
    assert " striped 2 128 " in table, table


def test_thin_lv_comes_up_with_its_pool_and_a_full_pool_is_refused(lvm: Lvm) -> None:
    d0, d1, _ = lvm.disks
    _vg(lvm, d0, d1)
    lvm("lvcreate", "-q", "--type", "thin-pool", "-n", "pool", "-L", "48M", "kdumpvg")
    lvm("lvcreate", "-q", "-n", "dump", "-V", "200M", "--thinpool", "pool", "kdumpvg")
    lvm("lvcreate", "-q", "-n", "other", "-V", "200M", "--thinpool", "pool", "kdumpvg")
    lvm("vgchange", "-q", "-an", "kdumpvg")
    status, log = lvm.layer("kdumpvg", "dump", vmcore_mb=8)
    assert status == 0, log
    assert "kdump: lvm: thin pool kdumpvg/pool has 48 MB free, the dump needs at most 9 MB" in log
    up = active()
    assert "kdumpvg-dump" in up and "kdumpvg-other" not in up, up
    assert up <= {"kdumpvg-dump", "kdumpvg-pool-tpool", "kdumpvg-pool_tdata",
                  "kdumpvg-pool_tmeta"}, up  # fmt: skip
    # More memory than the pool has room for: refused before anything is written, and the
    # volume goes down again.
    status, log = lvm.layer("kdumpvg", "dump", vmcore_mb=60)
    assert status == 1, log
    assert ("kdump: lvm: thin pool kdumpvg/pool has 48 MB free (0.00% used), the dump may "
            "need up to 61 MB (memory size plus min_free): refusing it rather than filling "
            "the pool") in log  # fmt: skip
    assert "kdumpvg-dump" not in active()
    # Another volume fills the pool: now even a small dump is refused.
    lvm("lvchange", "-q", "-ay", "kdumpvg/other")
    with open("/dev/kdumpvg/other", "wb") as f:
        for _ in range(44):
            f.write(b"\xa5" * 2**20)
        f.flush()
        os.fsync(f.fileno())
    lvm("lvchange", "-q", "-an", "kdumpvg/other")
    status, log = lvm.layer("kdumpvg", "dump", vmcore_mb=8)
    assert status == 1, log
    full = re.search(
        r"kdump: lvm: thin pool kdumpvg/pool has (\d+) MB free \((\d+)\.\d\d% used\)", log
    )
    assert full and int(full.group(1)) < 9 and int(full.group(2)) >= 90, log
    assert "refusing it rather than filling the pool" in log
    assert "kdumpvg-dump" not in active()


def test_missing_pv_fails_the_layer_with_a_clear_line(lvm: Lvm) -> None:
    d0, d1, _ = lvm.disks
    _vg(lvm, d0, d1)
    lvm("lvcreate", "-q", "-n", "dump", "-l", "100%VG", "kdumpvg")
    lvm("vgchange", "-q", "-an", "kdumpvg")
    with open(d1, "r+b") as f:  # its PV label and metadata gone: as if the disk were
        f.write(bytes(2**20))
    status, log = lvm.layer("kdumpvg", "dump")
    assert status == 1, log
    assert "kdump: lvm: volume group kdumpvg is missing 1 of its PVs after 3s" in log, log
    assert "kdump: lvm: cannot activate kdumpvg/dump: " in log, log
    assert not active()


def _fs_on(lvm: Lvm, device: str) -> str:
    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True,
                   timeout=120)  # fmt: skip
    uuid = subprocess.run(["blkid", "-o", "value", "-s", "UUID", device], check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()  # fmt: skip
    assert uuid
    return uuid


def _sys(disk: str) -> Path:
    return (Path("/sys/class/block") / Path(disk).name).resolve()


def _virtio_modules(found: hostonly.Detection, under: str) -> None:
    """The virtio disk driver below the stack, when it is a module, with the layer named."""
    if not Path("/sys/module/virtio_blk/initstate").exists():
        return
    whys = [why for name, why in found.modules if name == "virtio_blk"]
    assert whys and all(why.endswith(f" under {under}") for why in whys), found.modules


def test_hostonly_walks_from_a_filesystem_on_an_lv_to_the_disks(lvm: Lvm) -> None:
    d0, d1, d2 = lvm.disks
    _vg(lvm, d0, d1, d2)
    # On two of the three PVs: the third is the VG's, not the LV's.
    lvm("lvcreate", "-q", "-n", "dump", "-L", "80M", "kdumpvg", d0, d1)
    uuid = _fs_on(lvm, "/dev/kdumpvg/dump")
    config = parse(f"targets: [{{type: disk, device: UUID={uuid}, fstype: ext4}}]\n", "k.yaml")
    assert config.targets[0].layers() == ()
    found = hostonly.detect(config)
    assert found.config.targets[0].layers() == (LvmLayer(vg="kdumpvg", lv="dump"),)
    assert [s.devices for s in found.stacks] == [(_sys(d0), _sys(d1))]
    _virtio_modules(found, "lvm kdumpvg/dump")
    record = build._detected(found)["stacks"]
    assert record == [{"key": "targets[0].device", "names": ["lvm kdumpvg/dump"],
                       "layers": [{"type": "lvm", "vg": "kdumpvg", "lv": "dump"}],
                       "devices": [str(_sys(d0)), str(_sys(d1))]}]  # fmt: skip
    # The LV grows onto the third PV: a host-only image built before must be rebuilt.
    recorded = {"hostonly_detected": build._detected(found)}
    assert build._hardware_moved(config, recorded) == []
    lvm("lvextend", "-q", "-L", "+8M", "kdumpvg/dump", d2)
    reasons = build._hardware_moved(config, recorded)
    names = ", ".join(Path(d).name for d in (d0, d1, d2))
    assert reasons == [
        "host-only detection finds other storage under the targets now: targets[0].device: "
        f"lvm kdumpvg/dump over {names}; was targets[0].device: lvm kdumpvg/dump over "
        f"{Path(d0).name}, {Path(d1).name}"
    ], reasons
    # A stack the config gives must be the one that is there.
    wrong = (f"targets:\n  - type: disk\n    device: UUID={uuid}\n    fstype: ext4\n"
             "    stack: [{type: lvm, vg: kdumpvg, lv: other}]\n")  # fmt: skip
    with pytest.raises(KdumpError) as err:
        hostonly.detect(parse(wrong, "k.yaml"))
    assert str(err.value) == (
        "k.yaml:5: --hostonly: key 'targets[0].stack' names [lvm kdumpvg/other], but under "
        f"UUID={uuid} this host has [lvm kdumpvg/dump] (bottom first)"
    )
    # A raw target cannot bring an LV up.
    raw = "targets: [{type: raw, device: /dev/kdumpvg/dump}]\n"
    with pytest.raises(KdumpError, match="a raw target cannot bring storage layers up"):
        hostonly.detect(parse(raw, "k.yaml"))


def test_hostonly_sees_through_a_thin_pool_to_its_pvs(lvm: Lvm) -> None:
    d0, d1, _ = lvm.disks
    _vg(lvm, d0, d1)
    lvm("lvcreate", "-q", "--type", "thin-pool", "-n", "pool", "-L", "100M", "kdumpvg")
    lvm("lvcreate", "-q", "-n", "dump", "-V", "200M", "--thinpool", "pool", "kdumpvg")
    uuid = _fs_on(lvm, "/dev/kdumpvg/dump")
    found = hostonly.detect(parse(f"targets: [{{type: disk, device: UUID={uuid}, "
                                  "fstype: ext4}]\n", "k.yaml"))  # fmt: skip
    # The pool, its tpool, tdata and tmeta are LVM's own: the stack is the thin LV alone.
    assert found.config.targets[0].layers() == (LvmLayer(vg="kdumpvg", lv="dump"),)
    assert set(found.stacks[0].devices) == {_sys(d0), _sys(d1)}
    _virtio_modules(found, "lvm kdumpvg/dump")


GUEST_TESTS = 6


@pytest.mark.qemu
def test_lvm_tests_pass_in_a_guest(kernel61: Kernel, tmp_path: Path) -> None:
    extra = blank_disks(tmp_path, SERIALS, DISK_MB)
    modules = ["dm_mod", "dm_thin_pool", "virtio_blk"]
    log = pytest_in_guest(kernel61, tmp_path, ["tests/test_lvm_guest.py"], modules, extra)
    assert passed_count(log) == [str(GUEST_TESTS)], log[-4000:]
