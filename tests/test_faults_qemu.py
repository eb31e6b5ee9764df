"""The fault matrix, end to end in QEMU: each `qemu-test --fault NAME` run must end in its
designed outcome, and qemu-test itself must check that outcome (not just a saved dump)."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.faults import FAULTS
from builder.qemutest import Options, run_qemu_test
from tests.conftest import Kernel

pytestmark = pytest.mark.qemu

CONFIG = """\
targets:
  - {type: disk, device: UUID=4e6f7a81-92a3-4b4c-8d5e-6f708192a3b4, fstype: ext4, path: /var/crash}
kernel_modules: [virtio_blk, virtio_pci]
failure_action: poweroff
final_action: poweroff
device_timeout: 5
"""
# The cut has to land while data is being written: the native writer takes seconds here.
SLOW_WRITER = "capture: {collector: native}\n"


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_ends_in_its_designed_outcome(fault: str, kernel61: Kernel, tmp_path: Path) -> None:
    config = tmp_path / "kdump.yaml"
    config.write_text(CONFIG + (SLOW_WRITER if fault == "power-cut" else ""))
    report = run_qemu_test(
        Options(kernel61.kver, kernel61.kmoddir, kernel61.vmlinuz, config=config,
                keep=tmp_path / "work", fault=fault, first_stage="kexec-tools")
    )  # fmt: skip
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "work").glob("serial*.log"))
    assert report.ok, report.summary() + "\n" + logs[-4000:]
    # The fault's own checks ran, not only the generic ones.
    assert set(report.checks) - {"capture_kernel_loaded", "capture_kernel_booted"}
