"""End to end on arm64: Debian 12's arm64 kernel in qemu-system-aarch64, the capture image built
on this x86_64 host from an arm64 sysroot, armed by our own `register` running in the guest
(the sysroot's python3), a real sysrq crash, the dump saved to ext4 on virtio and read back:
our pure-Python reader's kernel log in the guest, and the arm64 makedumpfile run on this host
under qemu-user as the independent reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdump_mkinitrd.arming.cmdline import ARCH_ADDED, kdump_args
from kdump_mkinitrd.qemutest.run import Options, Report, run_qemu_test
from tests.conftest import KVER_ARM64, QEMU_TEST_ACTIONS
from tests.crossroot import arm64_kernel, arm64_sysroot

pytestmark = pytest.mark.qemu

CONFIG = """\
targets:
  - {type: disk, device: UUID=%s, fstype: ext4}
kernel_modules: [virtio_blk, virtio_pci]
"""


def arm64_qemu_test(tmp_path: Path, uuid: str, append: str = "") -> tuple[Report, str]:
    root = arm64_kernel()
    path = tmp_path / "kdump.yaml"
    path.write_text(CONFIG % uuid + QEMU_TEST_ACTIONS)
    options = Options(KVER_ARM64, root / "lib/modules" / KVER_ARM64,
                      root / "boot" / f"vmlinuz-{KVER_ARM64}", config=path, keep=tmp_path / "w",
                      append=append, arch="arm64", sysroot=arm64_sysroot())  # fmt: skip
    report = run_qemu_test(options)
    log = Path(report.serial_log).read_text(errors="replace")
    assert report.ok, report.summary() + "\n" + log[-5000:]
    return report, log


def _record(report: Report) -> dict[str, object]:
    assert report.dump_dir is not None
    return dict(json.loads((Path(report.dump_dir) / "vmcore.json").read_text()))


def test_arm64_python_stage_saves_a_dump_registered_in_the_guest(tmp_path: Path) -> None:
    report, log = arm64_qemu_test(tmp_path, "3a1b2c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d")
    # Checked by qemu-test: vmcore, vmcore.json schema, sha256, the panic line in
    # vmcore-dmesg.txt, and the arm64 makedumpfile reading the same panic line on the host.
    assert _record(report)["stage"] == "python"
    assert "makedumpfile_agrees" not in " ".join(report.problems)
    # Our register, in the guest: Debian's arm64 kernel has no kexec_file_load, so it loads
    # through kexec-tools, which gets the _text address this kernel's kallsyms hides.
    assert "capture kernel " in log and " loaded with " in log
    assert " by kexec_load (kexec-tools): this kernel has no kexec_file_load" in log
    assert "Can't get the symbol of _text" not in log
    capture_line = next(line for line in log.splitlines() if "Kernel command line: " in line
                        and "nr_cpus=1" in line)  # fmt: skip
    args = capture_line.split("Kernel command line: ", 1)[1].split()
    assert "console=ttyAMA0" in args
    for arg in kdump_args("aarch64"):
        assert arg in args, arg
    for x86_only in set(ARCH_ADDED["x86_64"]) - set(ARCH_ADDED["aarch64"]):
        assert x86_only not in args, x86_only
    assert "irqpoll" not in args
    assert "\nup to date\n" in log.replace("\r", "")


def test_arm64_static_fallback_when_the_python_stage_fails(tmp_path: Path) -> None:
    report, _ = arm64_qemu_test(
        tmp_path, "4b2c3d5e-6f70-4b8c-9dae-1f2a3b4c5d6e", append="kdump_mkinitrd.fail_stage=1"
    )
    assert _record(report)["stage"] == "static"
    assert report.dump_dir is not None
    init_log = (Path(report.dump_dir) / "kdump-init.log").read_text()
    assert "the Python capture stage failed" in init_log and "static fallback runs" in init_log
