"""A real boot: QEMU (TCG) runs a Debian kernel with our image; the init loads the modules,
finds the disk target by UUID through them, and, with no crash to save, powers off."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import zstandard

from kdump_mkinitrd.cli import main
from kdump_mkinitrd.image.compress import ZSTD_WINDOW_LOG, pieces
from kdump_mkinitrd.qemutest.qemu import Boot, default_accel, run
from tests.conftest import Kernel
from tests.test_build import DISK_CONFIG, UUID, build_args, write_config

pytestmark = pytest.mark.qemu


def ext4_disk(path: Path, uuid: str) -> Path:
    subprocess.run(["truncate", "-s", "64M", str(path)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", uuid, str(path)], check=True)
    return path


def frame_windows(blob: bytes) -> list[int]:
    """The window size each zstd frame of a compressed image declares."""
    windows = []
    while blob:
        windows.append(zstandard.get_frame_parameters(blob).window_size)
        unpacker = zstandard.ZstdDecompressor().decompressobj()
        unpacker.decompress(blob)
        blob = unpacker.unused_data
    return windows


def boot_image(kernel: Kernel, tmp_path: Path) -> str:
    image = tmp_path / "kdump.img"
    assert main(build_args(kernel, write_config(tmp_path, DISK_CONFIG), image)) == 0
    # Separately compressed cpio segments, concatenated: the kernel must unpack them all
    # (the modules and the init are in later segments than the directories).
    assert len(pieces(image.read_bytes())) > 1
    # Each frame asks the kernel's unpacker for a small window (its memory while unpacking).
    assert max(frame_windows(image.read_bytes())) <= 1 << ZSTD_WINDOW_LOG
    result = run(
        Boot(
            kernel=kernel.vmlinuz,
            initrd=image,
            cmdline="console=ttyS0 panic=-1 quiet",
            serial_log=tmp_path / "serial.log",
            disks=(ext4_disk(tmp_path / "target.img", UUID),),
            accel=default_accel(),
            timeout=180,
        )
    )
    assert not result.timed_out, result.log[-3000:]
    assert "Initramfs unpacking failed" not in result.log, result.log[-3000:]
    return result.log


@pytest.mark.parametrize("which", ["kernel61", "kernel612"])
def test_kernel_boots_our_image_and_loads_the_modules(
    which: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    kernel: Kernel = request.getfixturevalue(which)
    log = boot_image(kernel, tmp_path)
    assert "kdump: capture environment for kernel " + kernel.kver in log, log[-3000:]
    loaded = next(line for line in log.splitlines() if "kdump: kernel modules:" in line)
    # virtio_blk is a module on 6.1; on 6.12 some virtio pieces are built in.
    for name in ("ext4", "jbd2"):
        assert name in loaded.split(), loaded
    assert "kdump: block devices: vda" in log, log[-3000:]
    # TCG's default CPU has no SSE4.2, so the kernel refuses crc32c_intel (ENODEV): logged, not
    # fatal, and crc32c_generic serves instead. Nothing else may fail.
    refused = [line for line in log.splitlines() if "did not load" in line]
    assert all("crc32c_intel" in line for line in refused), refused
    assert "not found" not in log and "/init:" not in log, log[-3000:]
    # No crash came before this boot, so there is nothing to save: the init says so and runs
    # failure_action rather than writing an empty dump.
    assert "kdump: FAILED: /proc/vmcore is missing" in log
    assert "kdump: running failure_action poweroff" in log
