"""md RAID layers: the config's raid items (checked with located errors), and on real md arrays
over loop devices the capture init's `kdump_layer_raid` under busybox sh (it assembles only the
array asked for, degraded when a member is missing or failed, never when none is there, and
starts no resync) and host-only detection of an array (layer, level, members).

The build host's kernel may lack md (the array tests then skip there):
`test_raid_tests_pass_under_a_debian_kernel` runs them all again under the Debian 6.1 kernel
in QEMU, with this machine's root read-only over 9p, where none may skip."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdump_mkinitrd import storage
from kdump_mkinitrd.config import parse
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import hostonly
from kdump_mkinitrd.image import build
from kdump_mkinitrd.image.render import render
from kdump_mkinitrd.paths import MODULES_DIR
from kdump_mkinitrd.storage.raid import ANY_LEVEL, RaidLayer
from kdump_mkinitrd.targets.disk import DiskTarget
from tests.conftest import Kernel
from tests.guest_pytest import blank_disks, disks_by_serial, passed_count, pytest_in_guest

UUID = "0a1b2c3d:4e5f6071:8293a4b5:c6d7e8f9"
TEMPLATE = MODULES_DIR / "mdraid" / "mdraid-layer.sh.j2"
# The tests' own mdadm runs: no udev makes /dev/md/NAME in the guest (the layer says so itself).
ENV = {**os.environ, "MDADM_NO_UDEV": "1"}


def _config(stack: str) -> str:
    target = "  - type: disk\n    device: UUID=2f6e0e4c\n    fstype: ext4\n"
    return f"targets:\n{target}    stack: {stack}\n"


def _stack(stack: str) -> tuple[storage.Layer, ...]:
    target = parse(_config(stack), "k.yaml").targets[0]
    assert isinstance(target, DiskTarget)
    return target.stack


def test_raid_item_gives_a_layer_named_by_its_uuid() -> None:
    layers = _stack(f"[{{type: raid, uuid: '{UUID.upper()}'}}, {{type: raid, uuid: '{UUID[:-1]}0', "
                    "name: kdumpmd}]")  # fmt: skip
    first, second = layers
    assert isinstance(first, RaidLayer) and first.feature == "mdraid"
    # mdadm prints lower case: the capture compares its output with what the image holds.
    assert first.name == f"raid {UUID}"
    assert first.shell_args(3) == (UUID, "kdump-md-3")
    assert second.shell_args(0) == (f"{UUID[:-1]}0", "kdumpmd")
    # The UUID says which array it is; the name and the level do not.
    assert first == RaidLayer(uuid=UUID, md_name="md0", level="raid1")
    assert first != second


@pytest.mark.parametrize(
    ("stack", "key", "message"),
    [
        ("[{type: raid}]", "targets[0].stack[0]", "a raid layer needs 'uuid'"),
        ("[{type: raid, uuid: 0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9}]",
         "targets[0].stack[0].uuid", "that is the kernel's or a filesystem's form"),
        ("[{type: raid, uuid: '0a1b2c3d:4e5f6071:8293a4b5'}]",
         "targets[0].stack[0].uuid", "4 groups of 8 hex digits joined by ':'"),
        (f"[{{type: raid, uuid: '{UUID}', name: a/b}}]", "targets[0].stack[0].name",
         "expected an md array name"),
        (f"[{{type: raid, uuid: '{UUID}', name: -x}}]", "targets[0].stack[0].name",
         "not starting with '-'"),
        (f"[{{type: raid, uuid: '{UUID}', name: {'x' * 33}}}]", "targets[0].stack[0].name",
         "up to 32"),
        (f"[{{type: raid, uuid: '{UUID}', name: ..}}]", "targets[0].stack[0].name",
         "expected an md array name"),
        (f"[{{type: raid, uuid: '{UUID}', vg: crashvg}}]", "targets[0].stack[0].vg",
         "only lvm layers take this key"),
        (f"[{{type: raid, uuid: '{UUID}'}}, {{type: raid, uuid: '{UUID.upper()}', name: x}}]",
         "targets[0].stack[1]", f"raid {UUID} is in this stack twice"),
    ],
)  # fmt: skip
def test_raid_item_errors_are_located(stack: str, key: str, message: str) -> None:
    with pytest.raises(KdumpError) as err:
        parse(_config(stack), "k.yaml")
    text = str(err.value)
    assert text.startswith(f"k.yaml:5: key '{key}': "), text
    assert message in text, text


def test_kernel_modules_follow_the_level() -> None:
    assert RaidLayer(uuid=UUID, level="raid1").kernel_modules() == ("raid1",)
    assert RaidLayer(uuid=UUID, level="raid6").kernel_modules() == ("raid456",)
    assert RaidLayer(uuid=UUID, level="raid10").kernel_modules() == ("raid10",)
    # No array with this UUID on this host, and no level given: every level served.
    assert RaidLayer(uuid=UUID).kernel_modules() == ANY_LEVEL


def _layer(uuid: str, name: str, log: Path, timeout: int = 2) -> tuple[int, str]:
    """`kdump_layer_raid UUID NAME` as the image renders it, under busybox sh; (status, what
    it logged)."""
    script = (
        'log() { echo "kdump: $*"; echo "0.00 $*" >> "$KDUMP_LOG"; }\n'
        f"DEVICE_TIMEOUT={timeout}\n" + render(TEMPLATE, {}) + 'kdump_layer_raid "$@"\n'
    )
    run = subprocess.run(
        ["busybox", "sh", "-c", script, "sh", uuid, name],
        env={**os.environ, "KDUMP_LOG": str(log)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    logged = log.read_text() if log.exists() else ""
    log.unlink(missing_ok=True)
    return run.returncode, logged


def test_layer_without_any_member_fails_within_the_timeout(tmp_path: Path) -> None:
    """Real mdadm over this machine's real block devices: none holds this array."""
    if shutil.which("mdadm") is None or shutil.which("busybox") is None:
        pytest.skip("no mdadm or busybox here")
    status, logged = _layer(UUID, "kdump-md-0", tmp_path / "init.log", timeout=1)
    assert status == 1
    assert f"raid {UUID}: no member of the array found after 1s" in logged


# --- on real md arrays (a kernel with md: in the guest) ---


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120,
                          env=ENV).stdout  # fmt: skip


def _needs_md() -> None:
    if not Path("/proc/mdstat").exists() or shutil.which("mdadm") is None:
        pytest.skip("no md RAID on this kernel (/proc/mdstat) or no mdadm")
    if shutil.which("losetup") is None or not Path("/dev/loop-control").exists():
        pytest.skip("no loop devices on this kernel")


def _field(text: str, key: str) -> str:
    found = re.search(rf"^{key}=(.*)$", text, re.M)
    assert found, text
    return found.group(1)


class Arrays:
    """Loop devices and md arrays made for one test, all taken down at its end (the arrays
    that ran before it are left alone)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.loops: list[str] = []
        self.before = set(_running())

    def loop(self, size_mb: int = 24) -> str:
        backing = self.tmp_path / f"member{len(self.loops)}.img"
        with backing.open("wb") as f:
            f.truncate(size_mb * 2**20)
        device = _sh("losetup", "--find", "--show", str(backing)).strip()
        self.loops.append(device)
        return device

    def detach(self, device: str) -> None:
        _sh("losetup", "-d", device)
        self.loops.remove(device)

    def create(self, name: str, level: str, members: list[str], *extra: str,
               metadata: str = "1.2") -> str:  # fmt: skip
        """A new running array /dev/md/NAME; returns mdadm's UUID of it."""
        md = f"/dev/md/{name}"
        _sh("mdadm", "--create", md, "--run", "--level", level, "--raid-devices",
            str(len(members)), f"--metadata={metadata}", *extra, *members)  # fmt: skip
        return _field(_sh("mdadm", "--detail", "--export", md), "MD_UUID")

    def running(self) -> dict[str, str]:
        """mdN -> UUID of the arrays running now that did not before the test."""
        return {md: uuid for md, uuid in _running().items() if md not in self.before}

    def close(self) -> None:
        for md in self.running():
            subprocess.run(["mdadm", "--stop", f"/dev/{md}"], capture_output=True,
                           timeout=60, env=ENV)  # fmt: skip
        for device in self.loops:
            subprocess.run(["losetup", "-d", device], capture_output=True, timeout=60)


def _running() -> dict[str, str]:
    """mdN -> UUID of every array this kernel runs."""
    out = {}
    for md in sorted(Path("/sys/block").glob("md*")):
        detail = subprocess.run(["mdadm", "--detail", "--export", f"/dev/{md.name}"],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        if detail.returncode == 0 and "MD_UUID=" in detail.stdout:
            out[md.name] = _field(detail.stdout, "MD_UUID")
    return out


@contextlib.contextmanager
def _arrays(tmp_path: Path) -> Iterator[Arrays]:
    _needs_md()
    arrays = Arrays(tmp_path)
    try:
        yield arrays
    finally:
        arrays.close()


@contextlib.contextmanager
def _slow_resync() -> Iterator[None]:
    """Resync at 1 KiB/s: an array made and stopped meanwhile stays dirty, as after a crash."""
    limits = [Path(f"/proc/sys/dev/raid/speed_limit_{end}") for end in ("min", "max")]
    before = [limit.read_text() for limit in limits]
    for limit in limits:
        limit.write_text("1\n")
    try:
        yield
    finally:
        for limit, value in zip(limits, before, strict=True):
            limit.write_text(value)


def _with_file(md: str, mnt: Path, text: str) -> None:
    _sh("mkfs.ext4", "-q", "-F", md)
    mnt.mkdir(exist_ok=True)
    _sh("mount", md, str(mnt))
    (mnt / "data").write_text(text)
    _sh("umount", str(mnt))


def _read_back(md: str, mnt: Path, name: str = "data") -> str:
    mnt.mkdir(exist_ok=True)
    _sh("mount", md, str(mnt))
    try:
        text = (mnt / name).read_text()
        # The dump's writes: the array takes them.
        (mnt / "written").write_text("dump")
        _sh("sync")
    finally:
        _sh("umount", str(mnt))
    return text


def test_assembles_only_the_array_asked_for_and_starts_no_resync(tmp_path: Path) -> None:
    log = tmp_path / "init.log"
    with _arrays(tmp_path) as arrays:
        wanted = arrays.create("wanted", "1", [arrays.loop(), arrays.loop()], "--assume-clean")
        _with_file("/dev/md/wanted", tmp_path / "mnt", "on the mirror")
        _sh("mdadm", "--stop", "/dev/md/wanted")
        # The other array is mid-resync when it stops: dirty, as an array is after a crash.
        other_members = [arrays.loop(), arrays.loop()]
        with _slow_resync():
            other = arrays.create("other", "1", other_members)
            _sh("mdadm", "--stop", "/dev/md/other")
        assert arrays.running() == {}

        status, logged = _layer(wanted, "kdump-md-0", log)
        assert status == 0, logged
        md = Path("/dev/md/kdump-md-0").resolve().name
        assert f"raid {wanted}: /dev/md/kdump-md-0 is {md} (raid1, 2 members)" in logged
        assert arrays.running() == {md: wanted}
        assert _read_back("/dev/md/kdump-md-0", tmp_path / "mnt") == "on the mirror"
        # A later target on the same array finds it running, under the name it asks for.
        status, logged = _layer(wanted, "kdump-md-1", log)
        assert status == 0 and f"raid {wanted}: already running as /dev/{md}" in logged
        assert Path("/dev/md/kdump-md-1").resolve().name == md
        _sh("mdadm", "--stop", f"/dev/{md}")

        # The dirty array: started, written to, and still not resyncing.
        status, logged = _layer(other, "kdump-md-2", log)
        assert status == 0, logged
        sysdir = Path("/sys/block") / Path("/dev/md/kdump-md-2").resolve().name / "md"
        assert (sysdir / "resync_start").read_text().strip() != "none"  # resync is due
        with Path("/dev/md/kdump-md-2").open("r+b") as dev:
            dev.write(b"dump" * 1024)
            os.fsync(dev.fileno())
        assert (sysdir / "array_state").read_text().strip() in ("active", "clean")
        assert (sysdir / "sync_action").read_text().strip() == "frozen"
        # mdstat says resync=PENDING: due, and not running.
        assert (sysdir / "sync_completed").read_text().strip() == "none"
        _sh("mdadm", "--stop", "/dev/md/kdump-md-2")

        # Dirty and a mirror gone, as the raid-degraded fault leaves it: RAID1 still starts.
        arrays.detach(other_members[1])
        status, logged = _layer(other, "kdump-md-3", log)
        assert status == 0, logged
        assert "raid1) is DEGRADED: 1 of 2 members missing or failed" in logged


def test_degraded_array_still_starts(tmp_path: Path) -> None:
    log = tmp_path / "init.log"
    mnt = tmp_path / "mnt"
    with _arrays(tmp_path) as arrays:
        a, b = arrays.loop(), arrays.loop()
        uuid = arrays.create("mirror", "1", [a, b], "--assume-clean")
        _with_file("/dev/md/mirror", mnt, "both halves")
        # One member failed before the crash: it is still there, with a stale superblock.
        _sh("mdadm", "/dev/md/mirror", "--fail", b, "--remove", b)
        _sh("mount", "/dev/md/mirror", str(mnt))
        (mnt / "later").write_text("after the failure")
        _sh("umount", str(mnt))
        _sh("mdadm", "--stop", "/dev/md/mirror")

        status, logged = _layer(uuid, "failed", log)
        assert status == 0, logged
        assert f"raid {uuid}: /dev/md/failed (" in logged
        assert "raid1) is DEGRADED: 1 of 2 members missing or failed" in logged
        assert _read_back("/dev/md/failed", mnt, "later") == "after the failure"
        _sh("mdadm", "--stop", "/dev/md/failed")

        # One member absent: waited for up to DEVICE_TIMEOUT, then started without it.
        arrays.detach(b)
        status, logged = _layer(uuid, "missing", log)
        assert status == 0, logged
        assert f"raid {uuid}: 1 of 2 members found after 2s" in logged
        assert "is DEGRADED: 1 of 2 members missing or failed" in logged
        assert _read_back("/dev/md/missing", mnt) == "both halves"
        _sh("mdadm", "--stop", "/dev/md/missing")

        # None left: the layer fails with one clear line, and nothing stays assembled.
        arrays.detach(a)
        status, logged = _layer(uuid, "none", log)
        assert status == 1
        assert f"raid {uuid}: no member of the array found after 2s" in logged
        assert arrays.running() == {}


def test_raid5_with_a_member_missing_starts_unless_dirty(tmp_path: Path) -> None:
    log = tmp_path / "init.log"
    with _arrays(tmp_path) as arrays:
        members = [arrays.loop(), arrays.loop(), arrays.loop()]
        clean = arrays.create("clean5", "5", members, "--assume-clean")
        _sh("mdadm", "--stop", "/dev/md/clean5")
        arrays.detach(members[2])
        status, logged = _layer(clean, "r5", log)
        assert status == 0, logged
        assert "raid5) is DEGRADED: 1 of 3 members missing or failed" in logged
        _sh("mdadm", "--stop", "/dev/md/r5")

        # Dirty and degraded, RAID5's parity may not match its data: md will not start it
        # (mdadm says why), and the layer fails with the members free again. (--force: a
        # resync of every member, not mdadm's usual rebuild of the last one, which stays
        # clean.)
        members = [arrays.loop(), arrays.loop(), arrays.loop()]
        with _slow_resync():
            dirty = arrays.create("dirty5", "5", members, "--force")
            _sh("mdadm", "--stop", "/dev/md/dirty5")
        assert re.search(r"^ +State : active$", _sh("mdadm", "--examine", members[0]), re.M)
        arrays.detach(members[2])
        status, logged = _layer(dirty, "d5", log)
        assert status == 1, logged
        assert f"raid {dirty}: mdadm cannot start the array (exit status " in logged
        assert "not clean" in logged, logged  # mdadm's reason, in the same line
        assert arrays.running() == {}


def test_detection_gives_the_layer_and_its_members(tmp_path: Path) -> None:
    with _arrays(tmp_path) as arrays:
        a, b = arrays.loop(), arrays.loop()
        uuid = arrays.create("detected", "1", [a, b], "--assume-clean")
        sysdir = Path("/sys/class/block", Path("/dev/md/detected").resolve().name).resolve()
        found = RaidLayer.detect(sysdir)
        assert found is not None
        layer, below = found
        assert layer == RaidLayer(uuid=uuid)
        assert (layer.md_name, layer.level) == ("detected", "raid1")
        loops = sorted(Path("/sys/class/block", Path(d).name).resolve() for d in (a, b))
        assert sorted(below) == loops
        assert storage.walk(sysdir) == storage.Stack((layer,), tuple(below))
        # A config that names this array, built on this host, packs its personality only.
        assert RaidLayer(uuid=uuid).kernel_modules() == ("raid1",)
        # A loop device is none of md's.
        assert RaidLayer.detect(loops[0]) is None

        # 0.90 metadata: the kernel's uuid attribute orders the bytes otherwise than mdadm.
        old = arrays.create("old", "1", [arrays.loop(), arrays.loop()], "--assume-clean",
                            metadata="0.90")  # fmt: skip
        old_sys = Path("/sys/class/block", Path("/dev/md/old").resolve().name).resolve()
        assert (old_sys / "md" / "uuid").exists()
        found = RaidLayer.detect(old_sys)
        assert found is not None and found[0].uuid == old


SERIALS = ("kdump-raid-0", "kdump-raid-1")


def _sys(device: str) -> Path:
    return (Path("/sys/class/block") / Path(device).name).resolve()


def test_hostonly_walks_from_a_filesystem_on_an_array_to_its_disks(tmp_path: Path) -> None:
    disks = disks_by_serial(SERIALS)
    if len(disks) != len(SERIALS):
        pytest.skip("needs the virtio disks kdump-raid-0 and -1 (the guest test has them)")
    with _arrays(tmp_path) as arrays:
        uuid = arrays.create("kdumpmd", "1", disks, "--assume-clean")
        _sh("mkfs.ext4", "-q", "-F", "/dev/md/kdumpmd")
        fs = _sh("blkid", "-o", "value", "-s", "UUID", "/dev/md/kdumpmd").strip()
        config = parse(f"targets: [{{type: disk, device: UUID={fs}, fstype: ext4}}]\n", "k.yaml")
        found = hostonly.detect(config)
        (layer,) = found.config.targets[0].layers()
        assert layer == RaidLayer(uuid=uuid)
        # The capture makes /dev/md/kdumpmd too, and packs raid1 only.
        assert (layer.md_name, layer.kernel_modules()) == ("kdumpmd", ("raid1",))
        assert found.stacks[0].devices == tuple(_sys(d) for d in disks)
        if Path("/sys/module/virtio_blk/initstate").exists():
            whys = [why for name, why in found.modules if name == "virtio_blk"]
            assert whys and all(w.endswith(f" under raid {uuid}") for w in whys), found.modules
        # A member replaced means another image: `build --if-needed` sees the change.
        recorded = {"hostonly_detected": build._detected(found)}
        assert build._hardware_moved(config, recorded) == []
        _sh("mdadm", "/dev/md/kdumpmd", "--fail", disks[1], "--remove", disks[1])
        names = [Path(d).name for d in disks]
        assert build._hardware_moved(config, recorded) == [
            "host-only detection finds other storage under the targets now: targets[0].device: "
            f"raid {uuid} over {names[0]}; was targets[0].device: raid {uuid} over "
            f"{names[0]}, {names[1]}"
        ]
        # A stack the config gives must name the array that is there.
        wrong = (
            f"targets:\n  - type: disk\n    device: UUID={fs}\n    fstype: ext4\n"
            f"    stack: [{{type: raid, uuid: '{UUID}'}}]\n"
        )
        with pytest.raises(KdumpError) as err:
            hostonly.detect(parse(wrong, "k.yaml"))
        assert str(err.value) == (
            f"k.yaml:5: --hostonly: key 'targets[0].stack' names [raid {UUID}], but under "
            f"UUID={fs} this host has [raid {uuid}] (bottom first)"
        )


TESTS = 17  # every one in this file but the guest's own


@pytest.mark.qemu
def test_raid_tests_pass_under_a_debian_kernel(kernel61: Kernel, tmp_path: Path) -> None:
    extra = blank_disks(tmp_path, SERIALS, 32)
    log = pytest_in_guest(
        kernel61, tmp_path, ["tests/test_storage_raid.py"],
        modules=["md_mod", "raid1", "raid456", "loop", "ext4", "virtio_blk"], extra=extra,
    )  # fmt: skip
    # Every test ran and passed: none skipped for want of md in this kernel.
    assert passed_count(log) == [str(TESTS)], log[-4000:]
