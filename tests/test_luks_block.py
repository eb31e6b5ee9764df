"""The capture kernel's side of a luks layer on real block devices: `kdump_layer_luks` (as the
image renders it, under busybox sh) opens the volume with the key file luks-setup made and
the image holds, the filesystem inside mounts, host-only detection recognises the opened
volume, a removed keyslot fails the layer with a clear line, and the dedicated keyslot opens
within a memory limit an argon2 keyslot cannot.

Opening needs device-mapper, which the build host's kernel may lack (those tests then skip
here): `test_luks_tests_pass_under_a_debian_kernel` runs them again under the Debian 6.1
kernel in QEMU, with this machine's root read-only over 9p, where none may skip."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kdump_mkinitrd import storage
from kdump_mkinitrd.arming.crashmemory import LUKS_OPEN_MB
from kdump_mkinitrd.cli import main
from kdump_mkinitrd.image.render import render
from kdump_mkinitrd.paths import MODULES_DIR
from kdump_mkinitrd.storage.luks import (
    DEFAULT_CIPHER,
    LuksLayer,
    cipher_modules,
    default_key_file,
    read_header,
)
from tests.conftest import Kernel
from tests.guest_pytest import has_device_mapper, passed_count, pytest_in_guest
from tests.test_hostonly_block import _loop, _sh
from tests.test_luks_setup import luks_format

MAPPED = "kdumptest-luks"
# What the capture kernel is told to spare for the key derivation is far less; this bounds
# cryptsetup as a whole (its libraries' page cache too).
MEMORY_LIMIT = 32 * 2**20


def _need_dm() -> None:
    if not has_device_mapper():
        pytest.skip("no device-mapper on this kernel (dmsetup version fails)")


def layer_sh(tmp_path: Path, *args: str, timeout: int = 3) -> tuple[int, str]:
    """Run the rendered kdump_layer_luks under busybox sh, as the capture init does."""
    script = tmp_path / "luks-layer.sh"
    script.write_text(render(MODULES_DIR / "luks" / "luks-layer.sh.j2", {}))
    log = tmp_path / "init.log"
    log.unlink(missing_ok=True)
    prelude = (
        'log() { echo "kdump: $*"; echo "$*" >> "$KDUMP_LOG"; }; . "$0"; kdump_layer_luks "$@"'
    )
    proc = subprocess.run(
        ["busybox", "sh", "-c", prelude, str(script), *args],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "KDUMP_LOG": str(log),
             "DEVICE_TIMEOUT": str(timeout)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return proc.returncode, log.read_text() if log.exists() else ""


def image_files(layer: LuksLayer, folder: Path) -> Path:
    """The layer's files as the image holds them (under `folder`); the key file's path."""
    for made in layer.image_files(0, 0, Path("/")):
        path = folder / made.path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(made.data)
        path.chmod(made.mode)
    return folder / layer.shell_args(0)[2].lstrip("/")


def test_a_missing_volume_fails_the_layer_in_bounded_time(tmp_path: Path) -> None:
    uuid = "00000000-1111-2222-3333-444444444444"
    status, log = layer_sh(tmp_path, uuid, MAPPED, str(tmp_path / "none.key"), timeout=1)
    assert status == 1
    assert f"luks: no device with LUKS UUID={uuid} after 1s" in log


def test_the_key_file_opens_the_volume_until_its_keyslot_is_removed(tmp_path: Path) -> None:
    _need_dm()
    with _loop(tmp_path, "volume.img", 40) as loop:
        passphrase = tmp_path / "passphrase"
        luks_format(loop, passphrase)
        _sh("cryptsetup", "open", "--key-file", str(passphrase), loop, "kdumptest-format")
        try:
            _sh("mkfs.ext4", "-q", "-L", "kdumpluks", "/dev/mapper/kdumptest-format")
        finally:
            _sh("cryptsetup", "close", "kdumptest-format")
        key = tmp_path / "keys" / "capture.key"
        assert main(["luks-setup", loop, "--key-file", str(key), "--unlock-key-file",
                     str(passphrase), "--iter-time", "100"]) == 0  # fmt: skip
        uuid = read_header(Path(loop)).uuid
        layer = LuksLayer(uuid=uuid, key_file=str(key))
        # Built where the device is visible: the cipher comes from its header.
        assert layer.kernel_modules() == cipher_modules(DEFAULT_CIPHER)
        in_image = image_files(layer, tmp_path / "image")

        status, log = layer_sh(tmp_path, uuid, MAPPED, str(in_image))
        assert status == 0, log
        assert f"luks: UUID={uuid} on {loop} is open as /dev/mapper/{MAPPED}" in log
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        try:
            _sh("mount", "-t", "ext4", f"/dev/mapper/{MAPPED}", str(mnt))
            (mnt / "written").write_text("through dm-crypt")
            _sh("umount", str(mnt))
            # Host-only detection: the opened volume is a luks layer over the loop device.
            dm = next(p.parent.parent.name for p in Path("/sys/block").glob("dm-*/dm/name")
                      if p.read_text().strip() == MAPPED)  # fmt: skip
            sysdir = Path("/sys/class/block", dm).resolve()
            lower = Path("/sys/class/block", Path(loop).name).resolve()
            detected = LuksLayer(uuid=uuid, key_file=default_key_file(uuid))
            assert LuksLayer.detect(sysdir) == (detected, [lower])
            assert storage.walk(sysdir) == storage.Stack((detected,), (lower,))
            # A second target on the same volume finds it open.
            status, log = layer_sh(tmp_path, uuid, "kdumptest-again", str(in_image))
            assert status == 0 and f"luks: UUID={uuid} is open already (/dev/{dm})" in log
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
            _sh("cryptsetup", "close", MAPPED)
        # The keyslot removed after the build: the layer fails, saying why.
        _sh("cryptsetup", "luksKillSlot", "--batch-mode", loop, "1")
        status, log = layer_sh(tmp_path, uuid, MAPPED, str(in_image))
        assert status == 1
        assert f"luks: the key file no longer opens UUID={uuid} on {loop} (keyslot 1)" in log
        assert not Path("/dev/mapper", MAPPED).exists()


def _cgroup(tmp_path: Path) -> Path:
    root = Path("/sys/fs/cgroup")
    if not (root / "cgroup.controllers").exists():
        subprocess.run(["mount", "-t", "cgroup2", "none", str(root)], capture_output=True)
    if "memory" not in (root / "cgroup.controllers").read_text().split():
        pytest.skip("no cgroup2 memory controller here")
    (root / "cgroup.subtree_control").write_text("+memory")
    group = root / f"kdumptest-{tmp_path.name}"
    group.mkdir()
    (group / "memory.max").write_text(str(MEMORY_LIMIT))
    if (group / "memory.swap.max").exists():
        (group / "memory.swap.max").write_text("0")
    return group


def test_the_dedicated_keyslot_opens_within_crash_memory(tmp_path: Path) -> None:
    _need_dm()
    with _loop(tmp_path, "argon2.img", 40) as loop:
        # LUKS2's default keyslot: argon2id, its memory cost cut to 64 MiB for the test's sake.
        passphrase = tmp_path / "passphrase"
        luks_format(loop, passphrase, "--pbkdf", "argon2id", "--pbkdf-memory", "65536",
                    "--pbkdf-parallel", "1", "--pbkdf-force-iterations", "4")  # fmt: skip
        assert read_header(Path(loop)).keyslots[0].memory_kib == 65536
        key = tmp_path / "capture.key"
        assert main(["luks-setup", loop, "--key-file", str(key), "--unlock-key-file",
                     str(passphrase), "--iter-time", "100"]) == 0  # fmt: skip
        group = _cgroup(tmp_path)

        def limited(*args: str) -> int:
            def enter() -> None:
                (group / "cgroup.procs").write_text("0")

            run = subprocess.run(["cryptsetup", *args], preexec_fn=enter, capture_output=True)
            return run.returncode

        try:
            assert limited("open", "--key-slot", "1", "--key-file", str(key), loop, MAPPED) == 0
            _sh("cryptsetup", "close", MAPPED)
            # 2985984 bytes under Debian 6.1 with cryptsetup 2.6.1: registration.LUKS_OPEN_MB.
            assert int((group / "memory.peak").read_text()) <= LUKS_OPEN_MB * 2**20
            # The limit bites: the argon2id keyslot cannot derive its key under it.
            assert limited("open", "--test-passphrase", "--key-slot", "0", "--key-file",
                           str(passphrase), loop) != 0  # fmt: skip
        finally:
            group.rmdir()


@pytest.mark.qemu
def test_luks_tests_pass_under_a_debian_kernel(kernel61: Kernel, tmp_path: Path) -> None:
    # Exactly what the luks feature module and layer load in the capture kernel.
    modules = ["dm-crypt", "algif_skcipher", *cipher_modules(DEFAULT_CIPHER), "loop", "ext4"]
    log = pytest_in_guest(kernel61, tmp_path, ["tests/test_luks_block.py"], modules=modules)
    assert passed_count(log) == ["3"], log[-4000:]
