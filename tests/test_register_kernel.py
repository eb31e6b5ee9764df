"""`register` at boot and the kernel image: a run that cannot load must not rebuild (and so
overwrite) the image the kernel hook built, and the kernel the hook was handed must be found
again at boot, wherever the distribution keeps it, so the image is not seen as stale. Real
images built for the real Debian kernel; /sys/kernel is a fake tree with 256 MiB reserved."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kdump_mkinitrd.arming import kexec, registration
from kdump_mkinitrd.cli import _request, main, parser
from kdump_mkinitrd.config import load
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.build import BuildRequest, stale_reasons
from tests.conftest import Kernel

CONFIG = "targets:\n  - {type: raw, device: /dev/vdb}\ncapture: {stage: static}\n"


@pytest.fixture
def reserved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sysfs = tmp_path / "sys/kernel"
    sysfs.mkdir(parents=True)
    (sysfs / "kexec_crash_size").write_text(f"{256 << 20}\n")
    (sysfs / "kexec_crash_loaded").write_text("0\n")
    monkeypatch.setattr(registration, "crash_status", lambda: kexec.crash_status(sysfs))


def hook_build(tmp_path: Path, kernel: Kernel, kmoddir: Path) -> tuple[Path, Path, Path]:
    """What the kernel hook does: build with the kernel image it was handed."""
    handed = tmp_path / "staging" / "linux"
    handed.parent.mkdir()
    shutil.copy(kernel.vmlinuz, handed)
    config = tmp_path / "kdump.yaml"
    config.write_text(CONFIG)
    image = tmp_path / "images" / f"kdump-{kernel.kver}.img"
    args = ["build", "-k", kernel.kver, "--kmoddir", str(kmoddir), "--kernel", str(handed),
            "-c", str(config), "-o", str(image)]  # fmt: skip
    assert main(args) == 0
    return handed, config, image


def test_register_without_a_kernel_image_leaves_the_image_alone(
    tmp_path: Path, kernel61: Kernel, reserved: None
) -> None:
    handed, config, image = hook_build(tmp_path, kernel61, kernel61.kmoddir)
    before = image.read_bytes()
    handed.unlink()
    # What `register` at boot asks for when no layout has the kernel image.
    request = BuildRequest(kernel61.kver, kernel61.kmoddir, image, kernel_image=None)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=/dev/vda1 crashkernel=256M\n")
    with pytest.raises(KdumpError) as exc:
        registration.register(load(config), request, proc_cmdline=cmdline)
    assert image.read_bytes() == before
    assert str(exc.value).startswith(f"no kernel image for {kernel61.kver} (looked for ")
    assert f"give --kernel; {image} was left as it was" in str(exc.value)


def test_the_hooks_kernel_is_found_again_at_boot(tmp_path: Path, kernel61: Kernel) -> None:
    """kernel-install hands the hook a kernel somewhere; at boot `register` finds the same
    kernel in /usr/lib/modules/KVER/vmlinuz: by content it is the same, so nothing is stale."""
    kmoddir = tmp_path / "usr/lib/modules" / kernel61.kver
    kmoddir.mkdir(parents=True)
    for entry in kernel61.kmoddir.iterdir():
        (kmoddir / entry.name).symlink_to(entry)
    shutil.copy(kernel61.vmlinuz, kmoddir / "vmlinuz")
    _, config, image = hook_build(tmp_path, kernel61, kmoddir)
    args = parser().parse_args(["register", "-k", kernel61.kver, "--kmoddir", str(kmoddir),
                                "--image", str(image), "-c", str(config)])  # fmt: skip
    request = _request(args, args.image, False)
    assert request.kernel_image is not None
    assert request.kernel_image.read_bytes() == kernel61.vmlinuz.read_bytes()
    assert stale_reasons(load(config), request) == []


def test_register_on_a_kernel_without_crash_support_leaves_the_image_alone(
    tmp_path: Path, kernel61: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed, config, image = hook_build(tmp_path, kernel61, kernel61.kmoddir)
    before = image.read_bytes()
    # The admin changed the config since (the image is stale), but this kernel cannot load one.
    config.write_text(CONFIG + "device_timeout: 20\n")
    sysfs = tmp_path / "sys/kernel"
    sysfs.mkdir(parents=True)  # no kexec_crash_size: built without CONFIG_CRASH_DUMP
    monkeypatch.setattr(registration, "crash_status", lambda: kexec.crash_status(sysfs))
    request = BuildRequest(kernel61.kver, kernel61.kmoddir, image, kernel_image=handed)
    assert stale_reasons(load(config), request) != []
    with pytest.raises(KdumpError, match="no crash dump support"):
        registration.register(load(config), request)
    assert image.read_bytes() == before
