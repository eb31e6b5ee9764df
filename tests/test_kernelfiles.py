"""Kernel discovery on fake trees of each distribution's layout, with the real Debian kernels:
Debian's /boot, Fedora/Arch/systemd's /usr/lib/modules/KVER, Arch's /boot/vmlinuz-linux
matched by the release written in the image, /proc/config.gz, and a UKI (a real systemd-boot
stub with the real kernel added as its .linux section by objcopy)."""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kdump_mkinitrd.cli import _request, parser
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import kernelfiles
from kdump_mkinitrd.image import compress
from tests.conftest import Arm64Files, Kernel

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")  # Debian's systemd-boot-efi


def tree(tmp_path: Path, kernel: Kernel) -> tuple[Path, Path]:
    """An empty /boot and a module tree linked to the real one (no vmlinuz, no config)."""
    boot = tmp_path / "boot"
    boot.mkdir(parents=True)
    kmoddir = tmp_path / "usr/lib/modules" / kernel.kver
    kmoddir.mkdir(parents=True)
    for entry in kernel.kmoddir.iterdir():
        (kmoddir / entry.name).symlink_to(entry)
    return boot, kmoddir


def kconfig(kernel: Kernel) -> Path:
    return kernel.root / "boot" / f"config-{kernel.kver}"


def make_uki(tmp_path: Path, kernel: Kernel) -> Path:
    uki = tmp_path / "uki.efi"
    subprocess.run(
        ["objcopy", "--add-section", f".linux={kernel.vmlinuz}", "--change-section-vma",
         ".linux=0x2000000", "--set-section-flags", ".linux=data,readonly", str(STUB), str(uki)],
        check=True, capture_output=True,
    )  # fmt: skip
    return uki


def test_release_written_in_the_real_images(kernel61: Kernel, kernel612: Kernel) -> None:
    assert kernelfiles.embedded_release(kernel61.vmlinuz) == kernel61.kver
    assert kernelfiles.embedded_release(kernel612.vmlinuz) == kernel612.kver
    # An uncompressed image (arm64 Image, vmlinux) is read by its banner.
    banner = b"\0" * 64 + b"Linux version 6.1.0-56-arm64 (debian-kernel@lists.debian.org) #1"
    assert kernelfiles.release_of(banner) == "6.1.0-56-arm64"
    assert kernelfiles.release_of(b"\0" * 4096) is None


def test_release_seen_through_compressed_arm64_kernels(arm64_files: Arm64Files) -> None:
    """Ubuntu's gzip Image and Fedora's zboot image carry the banner inside the payload."""
    for path in (arm64_files.image, arm64_files.gzip, arm64_files.zboot_gzip,
                 arm64_files.zboot_zstd):  # fmt: skip
        assert kernelfiles.embedded_release(path) == "6.1.0-56-arm64", path
    # A damaged payload says nothing rather than something wrong.
    assert kernelfiles.release_of(arm64_files.gzip.read_bytes()[:1000000]) is None


def test_arch_style_compressed_arm64_kernel_is_found(
    tmp_path: Path, kernel_arm64: Kernel, arm64_files: Arm64Files
) -> None:
    boot, kmoddir = tree(tmp_path, kernel_arm64)
    shutil.copy(arm64_files.zboot_zstd, boot / "vmlinuz-linux")
    assert kernelfiles.find_kernel(kernel_arm64.kver, kmoddir, boot) == boot / "vmlinuz-linux"
    assert kernelfiles.find_kernel("6.1.0-55-arm64", kmoddir, boot) is None


def test_debian_layout(tmp_path: Path, kernel61: Kernel) -> None:
    boot, kmoddir = tree(tmp_path, kernel61)
    (boot / kernel61.vmlinuz.name).symlink_to(kernel61.vmlinuz)
    (boot / f"config-{kernel61.kver}").symlink_to(kconfig(kernel61))
    assert kernelfiles.find_kernel(kernel61.kver, kmoddir, boot) == boot / kernel61.vmlinuz.name
    found = kernelfiles.find_config(kernel61.kver, None, kmoddir, boot, running="other")
    assert found == boot / f"config-{kernel61.kver}"


def test_systemd_layout(tmp_path: Path, kernel61: Kernel) -> None:
    """Fedora, Arch and systemd keep both under /usr/lib/modules/KVER; /boot has neither."""
    boot, kmoddir = tree(tmp_path, kernel61)
    shutil.copy(kernel61.vmlinuz, kmoddir / "vmlinuz")
    shutil.copy(kconfig(kernel61), kmoddir / "config")
    assert kernelfiles.find_kernel(kernel61.kver, kmoddir, boot) == kmoddir / "vmlinuz"
    kernel = kmoddir / "vmlinuz"
    found = kernelfiles.find_config(kernel61.kver, kernel, kmoddir, boot, running="other")
    assert found == kmoddir / "config"
    # The build reads it there too: the zstd check sees the real config.
    assert compress.kernel_config(kernel61.kver, kernel, boot, kmoddir) == kmoddir / "config"


def test_arch_vmlinuz_linux_is_matched_by_its_release(
    tmp_path: Path, kernel61: Kernel, kernel612: Kernel
) -> None:
    boot, kmoddir = tree(tmp_path, kernel61)
    _, kmoddir612 = tree(tmp_path / "612", kernel612)
    # linux is the 6.1 kernel (as pkgbase says), linux-lts the 6.12 one (no pkgbase file).
    shutil.copy(kernel61.vmlinuz, boot / "vmlinuz-linux")
    shutil.copy(kernel612.vmlinuz, boot / "vmlinuz-linux-lts")
    (kmoddir / "pkgbase").write_text("linux\n")
    assert kernelfiles.find_kernel(kernel61.kver, kmoddir, boot) == boot / "vmlinuz-linux"
    assert kernelfiles.find_kernel(kernel612.kver, kmoddir612, boot) == boot / "vmlinuz-linux-lts"
    # A vmlinuz-linux of another release is never taken for this one: after an upgrade whose
    # modules are not installed yet, pairing them would boot a kernel with the wrong modules.
    (boot / "vmlinuz-linux-lts").unlink()
    assert kernelfiles.find_kernel(kernel612.kver, kmoddir612, boot) is None
    (kmoddir / "pkgbase").write_text("linux-lts\n")  # says lts, but the image is 6.1
    shutil.copy(kernel612.vmlinuz, boot / "vmlinuz-linux")
    assert kernelfiles.find_kernel(kernel61.kver, kmoddir, boot) is None


def test_proc_config_gz_only_for_the_running_kernel(tmp_path: Path, kernel61: Kernel) -> None:
    boot, kmoddir = tree(tmp_path, kernel61)
    text = kconfig(kernel61).read_text()
    proc = tmp_path / "proc/config.gz"
    proc.parent.mkdir()
    proc.write_bytes(gzip.compress(text.replace("CONFIG_RD_ZSTD=y", "# no zstd").encode()))
    kver = kernel61.kver
    assert kernelfiles.find_config(kver, None, kmoddir, boot, proc, running="6.99") is None
    found = kernelfiles.find_config(kver, None, kmoddir, boot, proc, running=kver)
    assert found == proc
    # Read unpacked: the kernel cannot unpack zstd, so the build falls back to gzip.
    method, note = compress.choose(compress.Compression("zstd", 9, 0), found)
    assert method.method == "gzip" and note is not None and str(proc) in note
    # A config file of this release wins over the running kernel's.
    (boot / f"config-{kver}").symlink_to(kconfig(kernel61))
    assert kernelfiles.find_config(kver, None, kmoddir, boot, proc, running=kver) != proc


def test_uki_kernel_is_its_linux_section(tmp_path: Path, kernel61: Kernel) -> None:
    uki = make_uki(tmp_path, kernel61)
    assert kernelfiles.uki_kernel(uki) == kernel61.vmlinuz.read_bytes()
    # A bzImage is a PE file too (the EFI stub), but has no .linux section: not a UKI.
    assert kernelfiles.uki_kernel(kernel61.vmlinuz) is None
    assert kernelfiles.uki_kernel(kconfig(kernel61)) is None


def test_a_uki_handed_to_build_is_loaded_as_its_kernel(tmp_path: Path, kernel61: Kernel) -> None:
    uki = make_uki(tmp_path, kernel61)
    image = tmp_path / "images/kdump.img"
    args = parser().parse_args(["build", "-k", kernel61.kver, "--kmoddir", str(kernel61.kmoddir),
                                "--kernel", str(uki), "-o", str(image)])  # fmt: skip
    request = _request(args, args.output, False)
    inner = kernelfiles.extracted_path(image, kernel61.kver)
    assert request.kernel_image == inner == tmp_path / f"images/kdump-{kernel61.kver}.linux"
    assert inner.read_bytes() == kernel61.vmlinuz.read_bytes()
    mtime = inner.stat().st_mtime_ns
    assert _request(args, args.output, False).kernel_image == inner
    assert inner.stat().st_mtime_ns == mtime  # unchanged bytes are not rewritten
    # At boot, `register` without --kernel finds it beside the image.
    boot, kmoddir = tree(tmp_path / "host", kernel61)
    assert kernelfiles.find_kernel(kernel61.kver, kmoddir, boot, inner) == inner


def test_a_uki_of_another_release_is_refused(tmp_path: Path, kernel612: Kernel) -> None:
    uki = make_uki(tmp_path, kernel612)
    image = tmp_path / "kdump.img"
    with pytest.raises(
        KdumpError, match=re.escape(f"release {kernel612.kver}, not 6.1.0-56-amd64")
    ):
        kernelfiles.kernel_for_kexec(uki, "6.1.0-56-amd64", image)
    assert not kernelfiles.extracted_path(image, "6.1.0-56-amd64").exists()


def test_truncated_pe_is_an_error(tmp_path: Path, kernel61: Kernel) -> None:
    uki = make_uki(tmp_path, kernel61)
    cut = tmp_path / "cut.efi"
    cut.write_bytes(uki.read_bytes()[:200_000])
    with pytest.raises(KdumpError, match="runs past the end of the file"):
        kernelfiles.uki_kernel(cut)


def test_kernel_install_remove_deletes_the_kernel_taken_from_a_uki(tmp_path: Path) -> None:
    plugin = (
        Path(__file__).resolve().parent.parent / "system/kernel-install/60-kdump-mkinitrd.install"
    )
    images = tmp_path / "images"
    images.mkdir()
    for name in ("kdump-6.1.0-56-amd64.img", "kdump-6.1.0-56-amd64.linux", "kdump-6.2.linux"):
        (images / name).write_text("x")
    env = {"PATH": "/usr/bin:/bin", "KDUMP_MKINITRD_IMAGE_DIR": str(images)}
    proc = subprocess.run([str(plugin), "remove", "6.1.0-56-amd64", "/nonexistent"], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in images.iterdir()) == ["kdump-6.2.linux"]
