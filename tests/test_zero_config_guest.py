"""Zero config on real stacked storage: /var/crash on an LVM volume, on LVM over md RAID1, and
on tmpfs, with the real command reading the real /proc/self/mountinfo. Each case runs in a
private mount namespace (unshare -m) where /var is a tmpfs to mount things on; the machine's
own /var is never touched. The build host's kernel may have no device-mapper or md, so
`test_zero_config_tests_pass_in_a_guest` runs this file under the Debian 6.1 kernel in QEMU
(this machine's root read-only over 9p), where no test may skip. The tests only touch disks
whose virtio serial says they are this test's (kdump-zc-N)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdump_mkinitrd.config import DEFAULT_PATH
from kdump_mkinitrd.image.inspect_image import load_image
from kdump_mkinitrd.qemutest.testcache import cache_root
from tests.conftest import REPO, Kernel
from tests.guest_pytest import (
    SetupLvm,
    blank_disks,
    disks_by_serial,
    has_device_mapper,
    passed_count,
    pytest_in_guest,
)

SERIALS = ("kdump-zc-0", "kdump-zc-1", "kdump-zc-2")
DISK_MB = 48
# A config that names no target; no Python stage and no compression keep the guest's build
# short (minutes under TCG).
CONFIG = "# kdump-mkinitrd: no target here\ncompression: {method: none}\ncapture: {stage: static}\n"
# What the command line decides for a config, without building: the default target as json.
DECIDE = """\
import json, sys
from pathlib import Path
from kdump_mkinitrd import config
from kdump_mkinitrd.hostscan import defaulttarget
loaded, line = defaulttarget.with_default(config.load(Path(sys.argv[1])))
t = loaded.targets[0]
print(json.dumps({"line": line, "device": t.device, "path": t.path,
                  "layers": [x.name for x in t.layers()]}))
"""
# The builder's per-module .modinfo cache for the guest's build (XDG_CACHE_HOME): made on the
# build host before the guest boots, as scanning the tree's 4000 modules over 9p under TCG
# takes minutes. The builder checks each entry against the module's size and mtime.
MODINFO_CACHE = cache_root() / "zero-config-guest"
VGS = ("zcvg", "zcraid")
MD = "/dev/md/zcmd"
MD_ENV = {**os.environ, "MDADM_NO_UDEV": "1"}


class Storage(SetupLvm):
    """The test's disks, lvm and mdadm, and what they made, taken down at the end."""

    def lvm(self, *args: str, check: bool = True) -> str:
        run = self.run(*args)
        assert run.returncode == 0 or not check, run
        return run.stdout.strip()

    def volume(self, vg: str, pvs: list[str]) -> str:
        """An ext4 LV `crash` in a new VG on `pvs`; its /dev/mapper node."""
        self.lvm("pvcreate", "-q", "-y", *pvs)
        self.lvm("vgcreate", "-q", vg, *pvs)
        self.lvm("lvcreate", "-q", "-n", "crash", "-L", "24M", vg)
        node = f"/dev/mapper/{vg}-crash"
        _sh("mkfs.ext4", "-q", "-F", node)
        return node

    def close(self) -> None:
        for vg in VGS:
            self.lvm("vgchange", "-q", "-an", vg, check=False)
        for vg in VGS:
            shutil.rmtree(f"/dev/{vg}", ignore_errors=True)
        if Path(MD).exists():
            subprocess.run(["mdadm", "--stop", MD], capture_output=True, timeout=60, env=MD_ENV)
        for disk in self.disks:
            subprocess.run(["mdadm", "--zero-superblock", disk], capture_output=True,
                           timeout=60, env=MD_ENV)  # fmt: skip
            with open(disk, "r+b") as f:
                f.write(bytes(2**20))


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120,
                          env=MD_ENV).stdout  # fmt: skip


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    disks = disks_by_serial(SERIALS)
    if len(disks) != len(SERIALS) or not has_device_mapper() or os.geteuid() != 0:
        pytest.skip("needs root, device-mapper and the virtio disks kdump-zc-0..2 (the guest "
                    "test test_zero_config_tests_pass_in_a_guest has them)")  # fmt: skip
    tool = Storage(disks, tmp_path)
    yield tool
    tool.close()


def _in_namespace(setup: str, argv: list[str], env: dict[str, str] | None = None,
                  ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`argv` in a private mount namespace after `setup` (shell): the mounts go with it."""
    script = f'set -e\n{setup}\nexec "$@"'
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                           "sh", *argv], capture_output=True, text=True, timeout=900,
                          env=env)  # fmt: skip


def _build(kernel: Kernel, config: Path, image: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kdump_mkinitrd.cli", "build", "-k", kernel.kver,
            "--kmoddir", str(kernel.kmoddir), "--kernel", str(kernel.vmlinuz), "-c", str(config),
            "-o", str(image), *extra]  # fmt: skip


def _told(run: subprocess.CompletedProcess[str], config: Path) -> str:
    told = f"kdump-mkinitrd: no dump target configured in {config}"
    lines = [line for line in run.stderr.splitlines() if line.startswith(told)]
    assert len(lines) == 1, run
    return lines[0]


def _disk_target(image: Path) -> str:
    built = load_image(image)
    return next(m.data.decode() for m in built.members if m.path.endswith("-disk-target.sh"))


VAR_TMPFS = "mount -t tmpfs zc-var /var\n"


def test_var_crash_on_an_lv_is_the_default_with_its_lvm_layer(
    storage: Storage, kernel61: Kernel, tmp_path: Path
) -> None:
    node = storage.volume("zcvg", storage.disks[:1])
    uuid = _sh("blkid", "-o", "value", "-s", "UUID", node).strip()
    config, image = tmp_path / "k.yaml", tmp_path / "kdump.img"
    config.write_text(CONFIG)
    # /var/crash is the LV's mount point: the dumps go to its top folder.
    setup = f"{VAR_TMPFS}mkdir /var/crash\nmount -t ext4 {node} /var/crash\n"
    env = dict(os.environ, XDG_CACHE_HOME=str(MODINFO_CACHE))
    run = _in_namespace(setup, _build(kernel61, config, image, "--hostonly"), env)
    assert run.returncode == 0, run
    assert _told(run, config).endswith(
        f": dumping to /var/crash on {node} (ext4, on lvm zcvg/crash, UUID={uuid}, the "
        "filesystem holding /var/crash, path / in it)"
    ), run.stderr
    init = _disk_target(image)
    assert "kdump_stack_layer lvm zcvg crash" in init, init
    assert f"wait_for_device UUID={uuid} " in init and 'kdump_capture_on "$mnt" /\n' in init
    manifest = load_image(image).manifest
    assert [s["names"] for s in manifest["hostonly_detected"]["stacks"]] == [["lvm zcvg/crash"]]
    assert "dm_mod" in {m["name"] for m in manifest["kernel_modules"]}, manifest["kernel_modules"]


def test_var_on_lvm_over_md_with_no_var_crash_yet(storage: Storage, tmp_path: Path) -> None:
    """/var is an LV on a RAID1 array and /var/crash is not made yet: the default is /crash on
    /var's filesystem (the capture makes the folder, as kdump_new_dump_dir does mkdir -p),
    under both layers."""
    _sh("mdadm", "--create", MD, "--run", "--level", "1", "--raid-devices", "2",
        "--metadata=1.2", "--assume-clean", *storage.disks[1:])  # fmt: skip
    md_uuid = re.search(r"^MD_UUID=(.*)$", _sh("mdadm", "--detail", "--export", MD), re.M)
    assert md_uuid
    node = storage.volume("zcraid", [MD])
    uuid = _sh("blkid", "-o", "value", "-s", "UUID", node).strip()
    config = tmp_path / "k.yaml"
    config.write_text(CONFIG)
    # The decision only: test_var_crash_on_an_lv_... builds an image, and the md layer in
    # images is test_storage_raid's.
    run = _in_namespace(f"mount -t ext4 {node} /var\n", [sys.executable, "-c", DECIDE, str(config)])
    assert run.returncode == 0, run
    chosen = json.loads(run.stdout)
    assert chosen["line"] == (
        f"no dump target configured in {config}: dumping to /var/crash on {node} (ext4, on lvm "
        f"zcraid/crash on raid {md_uuid.group(1)}, UUID={uuid}, the filesystem holding "
        "/var/crash, path /crash in it)"
    )
    assert (chosen["device"], chosen["path"]) == (f"UUID={uuid}", "/crash")
    assert chosen["layers"] == [f"raid {md_uuid.group(1)}", "lvm zcraid/crash"]


def test_var_crash_on_tmpfs_is_refused_and_does_not_fail_a_kernel_install(
    kernel61: Kernel, tmp_path: Path
) -> None:
    """Needs no device-mapper: it runs on the build host too."""
    config, image = tmp_path / "k.yaml", tmp_path / "kdump.img"
    config.write_text(CONFIG)
    image.write_text("the image built before\n")
    setup = f"{VAR_TMPFS}mkdir /var/crash\nmount -t tmpfs zc-crash /var/crash\n"
    expected = (
        f"kdump-mkinitrd: error: no dump target configured in {config}, and the default, the "
        "filesystem holding /var/crash, cannot take a dump: /var/crash: tmpfs, in memory: the "
        f"reboot after a crash loses what is saved there; configure a target in {config}, e.g. "
    )
    build = _in_namespace(setup, _build(kernel61, config, image, "--hostonly"))
    register = _in_namespace(setup, [sys.executable, "-m", "kdump_mkinitrd.cli", "register",
                                     "-k", kernel61.kver, "--kmoddir", str(kernel61.kmoddir),
                                     "--kernel", str(kernel61.vmlinuz), "-c", str(config),
                                     "--image", str(image)])  # fmt: skip
    for run in (build, register):
        assert run.returncode == 4, run
        assert expected in run.stderr, run.stderr
        assert "{type: nfs, export: server:/export}" in run.stderr
    assert image.read_text() == "the image built before\n"
    # The Debian kernel hook with the real command and the default config path: no target
    # there, so kdump is not set up, which does not fail the kernel's installation.
    command = tmp_path / "kdump-mkinitrd"
    command.write_text(f'#!/bin/sh\nexec {sys.executable} -m kdump_mkinitrd.cli "$@"\n')
    command.chmod(0o755)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    hide = f"mount --bind {empty} {DEFAULT_PATH}\n" if DEFAULT_PATH.exists() else ""
    env = dict(os.environ, KDUMP_MKINITRD=str(command), KDUMP_MKINITRD_IMAGE_DIR=str(tmp_path))
    env.pop("DEB_MAINT_PARAMS", None)
    hook = REPO / "system" / "debian" / "postinst.d" / "kdump-mkinitrd"
    run = _in_namespace(setup + hide, [str(hook), kernel61.kver], env)
    assert run.returncode == 0, run
    assert f"no dump target configured in {DEFAULT_PATH}" in run.stderr
    assert "/var/crash: tmpfs, in memory" in run.stderr, run.stderr
    assert f"no kdump image for {kernel61.kver}" in run.stderr
    assert not (tmp_path / f"kdump-{kernel61.kver}.img").exists()


def test_var_crash_on_a_loop_device_is_refused(storage: Storage, kernel61: Kernel,
                                              tmp_path: Path) -> None:  # fmt: skip
    """A device no storage layer type handles: refused at once, as for a configured target."""
    backing = tmp_path / "crash.img"
    with backing.open("wb") as f:
        f.truncate(16 * 2**20)
    _sh("mkfs.ext4", "-q", "-F", str(backing))
    loop = _sh("losetup", "--find", "--show", str(backing)).strip()
    try:
        config, image = tmp_path / "k.yaml", tmp_path / "kdump.img"
        config.write_text(CONFIG)
        setup = f"{VAR_TMPFS}mkdir /var/crash\nmount -t ext4 {loop} /var/crash\n"
        run = _in_namespace(setup, _build(kernel61, config, image, "--hostonly"))
    finally:
        _sh("losetup", "-d", loop)
    assert run.returncode == 4, run
    assert (f"the filesystem holding /var/crash, cannot take a dump: {loop}: target device "
            f"UUID=") in run.stderr, run.stderr  # fmt: skip
    # (The kernel names the backing file from the guest's own root, where ours is /host.)
    assert f"is a loop device ({Path(loop).name} over " in run.stderr, run.stderr
    assert f"{backing.name}); storage layers of types " in run.stderr
    assert f"configure a target in {config}" in run.stderr and not image.exists()


GUEST_TESTS = 4


@pytest.mark.qemu
def test_zero_config_tests_pass_in_a_guest(kernel61: Kernel, tmp_path: Path) -> None:
    config = tmp_path / "warm.yaml"
    config.write_text(CONFIG + "targets: [{type: disk, device: /dev/vdz, fstype: ext4}]\n")
    warm = subprocess.run(_build(kernel61, config, tmp_path / "warm.img"), capture_output=True,
                          text=True, timeout=600, env=dict(os.environ,
                          XDG_CACHE_HOME=str(MODINFO_CACHE)))  # fmt: skip
    assert warm.returncode == 0, warm
    extra = blank_disks(tmp_path, SERIALS, DISK_MB)
    modules = ["dm_mod", "md_mod", "raid1", "loop", "ext4", "virtio_blk"]
    log = pytest_in_guest(kernel61, tmp_path, ["tests/test_zero_config_guest.py"], modules, extra)
    assert passed_count(log) == [str(GUEST_TESTS)], log[-4000:]
