"""The fault matrix, end to end in QEMU: each `qemu-test --fault NAME` run must end in its
designed outcome, and qemu-test itself must check that outcome (not just a saved dump)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdump_mkinitrd.qemutest.faults import FAULTS
from kdump_mkinitrd.qemutest.run import Options, run_qemu_test
from tests.conftest import Kernel

pytestmark = pytest.mark.qemu

DISK = "  - {type: disk, device: UUID=4e6f7a81-92a3-4b4c-8d5e-6f708192a3b4, fstype: ext4, path: /var/crash}\n"  # noqa: E501
ACTIONS = """\
kernel_modules: [virtio_blk, virtio_pci]
failure_action: poweroff
final_action: poweroff
device_timeout: 5
"""
CONFIG = "targets:\n" + DISK + ACTIONS
# The cut has to land while data is being written: the native writer takes seconds here.
SLOW_WRITER = "capture: {collector: native}\n"
NETWORK_TARGET = {
    "nfs": '{type: nfs, export: "@NFS_EXPORT@"}',
    "ssh": '{type: ssh, host: "@SSH_HOST@", port: @SSH_PORT@, path: "@SSH_PATH@", '
    'identity: "@SSH_IDENTITY@", known_hosts: "@SSH_KNOWN_HOSTS@", client: "@SSH_CLIENT@"}',
}
FALLBACK_DISK = (
    "  - {type: disk, device: UUID=5a6b7c8d-9eaf-4b1c-9d2e-3f4a5b6c7d8e, fstype: ext4}\n"
)
# Disk faults whose outcome needs more than the one disk target.
DISK_CONFIGS = {
    "power-cut": CONFIG + SLOW_WRITER,
    "io-error": "targets:\n" + DISK + FALLBACK_DISK + ACTIONS,
    "foreign-dumps": CONFIG + "capture: {keep: 2}\n",
    "raw-second-crash": "targets:\n  - {type: raw, device: /dev/vda}\n" + FALLBACK_DISK + ACTIONS,
}
# The faults whose outcome is a saved dump: qemu-test checks that dump in full as well.
SAVE_A_DUMP = {"python-killed", "oom", "power-cut", "second-crash", "io-error", "foreign-dumps",
               "raw-second-crash"}  # fmt: skip
# Network faults: some with a local disk after the network target, some with nothing after it;
# the ssh ones that the client itself meets (refusals) once for each client.
NETWORK_CASES = [
    ("net-down", "nfs", True), ("net-down", "ssh", False),
    ("server-down", "nfs", False), ("server-down", "ssh", True),
    ("bad-hostkey", "ssh", True), ("key-refused", "ssh", False),
    ("server-down", "ssh/dropbear", False), ("bad-hostkey", "ssh/dropbear", False),
    ("key-refused", "ssh/dropbear", True),
    ("net-lost", "nfs", True), ("net-lost", "ssh", False), ("net-lost", "ssh/dropbear", True),
]  # fmt: skip
# Storage faults run on their stacked layouts in tests/test_storage_qemu.py.
CASES = [
    (f, "disk", False)
    for f in sorted(FAULTS)
    if FAULTS[f].targets == ("disk",) and not FAULTS[f].layouts
]


def network_config(target: str, fallback: bool) -> str:
    return (
        f"targets:\n  - {NETWORK_TARGET[target]}\n"
        + (FALLBACK_DISK if fallback else "")
        + "kernel_modules: [virtio_blk, virtio_pci, virtio_net]\nnetwork: {timeout: 5}\n"
        + "failure_action: poweroff\nfinal_action: poweroff\ndevice_timeout: 5\n"
    )


def test_every_network_fault_is_run_for_each_of_its_targets() -> None:
    assert {(f, t.partition("/")[0]) for f, t, _ in NETWORK_CASES} == {
        (f, t) for f in FAULTS for t in FAULTS[f].targets if t != "disk"
    }


@pytest.mark.parametrize(("fault", "target", "fallback"), CASES + NETWORK_CASES)
def test_fault_ends_in_its_designed_outcome(
    fault: str, target: str, fallback: bool, kernel61: Kernel, tmp_path: Path
) -> None:
    config = tmp_path / "kdump.yaml"
    target, _, client = target.partition("/")
    if target == "disk":
        config.write_text(DISK_CONFIGS.get(fault, CONFIG))
    else:
        config.write_text(network_config(target, fallback))
    report = run_qemu_test(
        Options(kernel61.kver, kernel61.kmoddir, kernel61.vmlinuz, config=config,
                keep=tmp_path / "work", fault=fault, first_stage="kexec-tools", target=target,
                ssh_client=client or "openssh")
    )  # fmt: skip
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "work").glob("serial*.log"))
    assert report.ok, report.summary() + "\n" + logs[-4000:]
    # The fault's own checks ran, not only the generic ones.
    assert set(report.checks) - {"capture_kernel_loaded", "capture_kernel_booted"}
    if target != "disk":
        assert ("next_target_saved_the_dump" in report.checks) == fallback
    if fault in SAVE_A_DUMP or fallback:
        # The dump the outcome saved is named, and it passed every check of a normal dump.
        assert report.dump_dir is not None and report.checks["makedumpfile_agrees"]
    else:
        assert report.dump_dir is None
    if (fault, target) == ("server-down", "nfs"):
        # Refused at once, so every version is tried before the target is given up.
        assert logs.count("kdump: nfs: mount failed") == 4, logs[-4000:]
