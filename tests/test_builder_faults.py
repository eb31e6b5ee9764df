"""Bad input to the builder: a clear error naming the file, line and key or the missing
piece, exit status 1, and the image that was already there byte for byte unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdump_mkinitrd.cli import main
from tests.conftest import Kernel
from tests.test_build import DISK_CONFIG, build_args, write_config

FIRMWARE_CONFIG = DISK_CONFIG.replace("kernel_modules: [virtio_blk, virtio_pci]",
                                      "kernel_modules: [virtio_blk, virtio_pci, e100]")  # fmt: skip


@pytest.fixture(scope="module")
def good_image(kernel61: Kernel, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    tmp = tmp_path_factory.mktemp("good")
    assert main(build_args(kernel61, write_config(tmp), tmp / "k.img")) == 0
    return (tmp / "k.img").read_bytes()


CASES = {
    "malformed YAML": (DISK_CONFIG + "targets: [\n", ["kdump.yaml:12: malformed YAML"]),
    "wrong type": (DISK_CONFIG.replace("device_timeout: 20", "device_timeout: soon"),
                   ["kdump.yaml:8: key 'device_timeout': expected an integer"]),
    "unknown key": (DISK_CONFIG + "final_acton: halt\n",
                    ["kdump.yaml:11: key 'final_acton': unknown key",
                     "(did you mean 'final_action'?)"]),
    "bad enum": (DISK_CONFIG.replace("failure_action: poweroff", "failure_action: explode"),
                 ["kdump.yaml:6: key 'failure_action': expected one of"]),
    "path escapes": (DISK_CONFIG.replace("fstype: ext4", "fstype: ext4\n    path: /var/../../etc"),
                     ["kdump.yaml:5: key 'targets[0].path': must not contain '..'"]),
    "missing module": (DISK_CONFIG.replace("virtio_pci]", "virtio_pci, not_a_module]"),
                       ["not_a_module", "6.1.0-56-amd64"]),
    "missing binary": (DISK_CONFIG + "binaries: [no-such-program]\n",
                       ["no-such-program"]),
    "missing extra file": (DISK_CONFIG + "files: [/etc/no-such-file]\n",
                           ["/etc/no-such-file", "does not exist"]),
}  # fmt: skip


def run_build(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_faults_leave_the_image_alone(
    case: str,
    kernel61: Kernel,
    tmp_path: Path,
    good_image: bytes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text, expected = CASES[case]
    image = tmp_path / "k.img"
    image.write_bytes(good_image)
    code, err = run_build(build_args(kernel61, write_config(tmp_path, text), image), capsys)
    assert code == 1
    for part in expected:
        assert part in err, err
    assert "Traceback" not in err
    assert image.read_bytes() == good_image
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.img", "kdump.yaml"]


def test_missing_kernel_tree_and_image(kernel61: Kernel, tmp_path: Path, good_image: bytes,
                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    image = tmp_path / "k.img"
    image.write_bytes(good_image)
    args = build_args(kernel61, write_config(tmp_path), image)
    args[args.index("--kmoddir") + 1] = str(tmp_path / "nope")
    code, err = run_build(args, capsys)
    assert code == 1 and str(tmp_path / "nope") in err and kernel61.kver in err
    args = build_args(kernel61, write_config(tmp_path), image)
    args[args.index("--kernel") + 1] = str(tmp_path / "vmlinuz-nope")
    code, err = run_build(args, capsys)
    assert code == 1 and "vmlinuz-nope does not exist" in err
    assert image.read_bytes() == good_image


def test_unreadable_firmware(kernel61: Kernel, tmp_path: Path, good_image: bytes,
                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    firmware = tmp_path / "firmware"
    # A regular file whose read fails even for root (EIO at offset 0).
    (firmware / "e100").mkdir(parents=True)
    (firmware / "e100" / "d101m_ucode.bin").symlink_to("/proc/self/mem")
    image = tmp_path / "k.img"
    image.write_bytes(good_image)
    config = write_config(tmp_path, FIRMWARE_CONFIG + f"firmware_root: {firmware}\n")
    code, err = run_build(build_args(kernel61, config, image), capsys)
    assert code == 1
    assert "cannot read firmware" in err and "e100" in err
    assert image.read_bytes() == good_image


def test_missing_firmware_is_only_a_warning(
    kernel61: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path, FIRMWARE_CONFIG + f"firmware_root: {tmp_path}\n")
    assert main(build_args(kernel61, config, tmp_path / "k.img")) == 0
    assert "firmware e100/d101m_ucode.bin for kernel module e100 not found" in caplog.text


def test_hostonly_target_device_missing(kernel61: Kernel, tmp_path: Path, good_image: bytes,
                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    image = tmp_path / "k.img"
    image.write_bytes(good_image)
    args = [*build_args(kernel61, write_config(tmp_path), image), "--hostonly"]
    code, err = run_build(args, capsys)
    assert code == 1
    assert "kdump.yaml:3: --hostonly: target device UUID=" in err and "does not exist" in err
    assert image.read_bytes() == good_image
