"""End to end: a real crash of a Debian kernel in QEMU, captured by our image, checked by
`qemu-test` (files, modes, vmcore.json, and makedumpfile reading the saved vmcore)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kdump_mkinitrd.capture.dmesg import extract_dmesg
from kdump_mkinitrd.capture.vmcore import Vmcore
from kdump_mkinitrd.qemutest.run import Options, Report, run_qemu_test
from tests.conftest import REPO, Kernel

pytestmark = pytest.mark.qemu

DRIVERS = "kernel_modules: [virtio_blk, virtio_pci]\n"
COMMON = """\
failure_action: poweroff
final_action: poweroff
device_timeout: 30
"""


def qemu_test(
    kernel: Kernel,
    tmp_path: Path,
    config: str,
    memory: str = "1G",
    crashkernel: str = "256M",
    append: str = "",
    first_stage: str = "register",
    drivers: str = DRIVERS,
    target: str = "disk",
) -> Report:
    path = tmp_path / "kdump.yaml"
    path.write_text(config + drivers + COMMON)
    options = Options(kernel.kver, kernel.kmoddir, kernel.vmlinuz, config=path, memory=memory,
                      crashkernel=crashkernel, keep=tmp_path / "work", append=append,
                      first_stage=first_stage, target=target)  # fmt: skip
    report = run_qemu_test(options)
    assert report.ok, report.summary() + "\n" + Path(report.serial_log).read_text()[-4000:]
    return report


def record(report: Report) -> dict[str, object]:
    assert report.dump_dir is not None
    return dict(json.loads((Path(report.dump_dir) / "vmcore.json").read_text()))


def init_log(report: Report) -> str:
    assert report.dump_dir is not None
    return (Path(report.dump_dir) / "kdump-init.log").read_text()


def test_ext4_by_uuid_python_stage_with_makedumpfile(kernel61: Kernel, tmp_path: Path) -> None:
    report = qemu_test(
        kernel61,
        tmp_path,
        """\
targets:
  - {type: disk, device: UUID=7d0c4e0a-5f7e-4c39-9d1a-1f6f2b0e9a11, fstype: ext4, path: /var/crash}
""",
    )
    data = record(report)
    assert data["stage"] == "python"
    assert data["collector"] == "makedumpfile" and data["format"] == "kdump-compressed"
    assert data["dump_level"] == 31
    assert data["kernel_release"] == kernel61.kver
    assert isinstance(data["crash_time"], int)
    timings = data["timings"]
    assert isinstance(timings, dict) and set(timings) >= {"parse", "dmesg", "dump", "hash"}
    assert {f["name"] for f in report.files} >= {
        "vmcore",
        "vmcore-dmesg.txt",
        "vmcore.json",
        "kdump-init.log",
    }
    assert "fallback" not in init_log(report)


def test_xfs_by_label_native_writer(kernel61: Kernel, tmp_path: Path) -> None:
    report = qemu_test(
        kernel61,
        tmp_path,
        """\
targets:
  - {type: disk, device: LABEL=dumps, fstype: xfs, path: /crash}
capture: {collector: native}
""",
        memory="512M",
        crashkernel="192M",
    )
    data = record(report)
    assert (data["stage"], data["collector"], data["format"]) == ("python", "native", "elf")
    # Zero pages are left out, so the file is smaller than guest memory.
    assert 0 < report.vmcore_size < 512 * 2**20
    assert "writing vmcore:" in Path(report.serial_log).read_text()
    # Our log extractor, run here on the saved ELF vmcore, agrees with makedumpfile line for line.
    assert report.dump_dir is not None
    vmcore = Path(report.dump_dir) / "vmcore"
    with Vmcore.open(str(vmcore)) as core:
        ours = extract_dmesg(core)
    theirs = tmp_path / "makedumpfile-dmesg.txt"
    subprocess.run(
        ["makedumpfile", "--dump-dmesg", str(vmcore), str(theirs)], check=True, capture_output=True
    )
    assert ours == theirs.read_text()
    assert ours == (Path(report.dump_dir) / "vmcore-dmesg.txt").read_text()


def test_btrfs_by_partuuid(kernel61: Kernel, tmp_path: Path) -> None:
    report = qemu_test(
        kernel61,
        tmp_path,
        """\
targets:
  - {type: disk, device: PARTUUID=3b8f0d6e-2a41-4c55-9e0f-8d7c6b5a4f32, fstype: btrfs, path: /d}
""",
    )
    assert record(report)["stage"] == "python"


def test_raw_target_and_recover_raw(kernel61: Kernel, tmp_path: Path) -> None:
    report = qemu_test(kernel61, tmp_path, "targets:\n  - {type: raw, device: /dev/vda}\n")
    assert report.checks["raw_header_cleared"]
    assert record(report)["format"] == "kdump-compressed"


def test_static_only_image(kernel61: Kernel, tmp_path: Path) -> None:
    report = qemu_test(
        kernel61,
        tmp_path,
        """\
targets:
  - {type: disk, device: UUID=0e5c6a1f-99b2-4d8e-a3c4-5b6d7e8f9a0b, fstype: ext4}
capture: {stage: static}
""",
    )
    assert record(report)["stage"] == "static"
    assert "Python" not in init_log(report)


def test_static_fallback_when_the_python_stage_fails(kernel61: Kernel, tmp_path: Path) -> None:
    report = qemu_test(
        kernel61,
        tmp_path,
        """\
targets:
  - {type: disk, device: UUID=5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d, fstype: ext4}
""",
        append="kdump_mkinitrd.fail_stage=1",
    )
    assert record(report)["stage"] == "static"
    log = init_log(report)
    assert "the Python capture stage failed" in log and "static fallback runs" in log


def test_register_through_kexec_file_load_in_the_guest(kernel61: Kernel, tmp_path: Path) -> None:
    """The default first stage runs our own `register` inside the guest (from the host's root
    over 9p): kexec_file_load, capture command line derived from the guest's /proc/cmdline."""
    report = qemu_test(
        kernel61,
        tmp_path,
        """\
targets:
  - {type: disk, device: UUID=1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f, fstype: ext4}
""",
    )
    log = Path(report.serial_log).read_text()
    assert "kdump-mkinitrd: error" not in log
    assert "capture kernel " in log and " loaded with " in log and " by kexec_file_load" in log
    capture_line = next(line for line in log.splitlines() if "Command line: elfcorehdr=" in line)
    for arg in ("irqpoll", "nr_cpus=1", "reset_devices", "novmcoredd"):
        assert arg in capture_line.split()
    assert "crashkernel=" not in capture_line
    # `status` in the guest, after register: loaded, reserved, and the image up to date.
    assert "capture kernel: loaded; reserved: 256 MB" in log
    assert "\nup to date\n" in log.replace("\r", "")


def test_hostonly_build_inside_the_guest(kernel61: Kernel, tmp_path: Path) -> None:
    """No drivers and no network settings in the config: the guest builds its own image with
    --hostonly, finding virtio_net from the interface that routes to the NFS server, and
    virtio_blk by walking sysfs up from the disk target; registers it, crashes, and the NFS
    server gets the dump."""
    report = qemu_test(
        kernel61,
        tmp_path,
        """\
targets:
  - {type: nfs, export: "@NFS_EXPORT@"}
  - {type: disk, device: LABEL=hostonly, fstype: ext4}
capture: {stage: static}
""",
        first_stage="hostonly",
        drivers="",
        target="nfs",
    )
    log = Path(report.serial_log).read_text()
    assert "rebuilt the image: no image at /run/kdump-mkinitrd/capture.img" in log
    assert "kdump: loaded kernel module virtio_blk" in log
    assert "kdump: loaded kernel module virtio_net" in log
    # Picked by the MAC that detection filled in, not as the first interface found.
    assert "kdump: network: using eth0 (52:54:00:12:34:56), asked for 52:54:00:12:34:56" in log
    assert "kdump: dump saved to target 0" in log
    assert report.dump_dir is not None and "/nfs/export/" in report.dump_dir


@dataclass(frozen=True)
class RunOutput:
    """What a qemu-test run printed, its exit code, and where its files are."""

    code: int
    stdout: str
    stderr: str
    workdir: Path


@pytest.fixture(scope="module")
def production_run(kernel61: Kernel, tmp_path_factory: pytest.TempPathFactory) -> RunOutput:
    """qemu-test as a user runs it with the config of a real host: drivers for that host's
    disks (AHCI, NVMe), none for QEMU's virtio disk, and the default actions."""
    tmp_path = tmp_path_factory.mktemp("production")
    config = tmp_path / "production.yaml"
    config.write_text(
        "targets:\n"
        "  - {type: disk, device: UUID=2b7e1d3c-4f5a-4b6c-8d7e-9f0a1b2c3d4e, fstype: ext4}\n"
        "kernel_modules: [ahci, nvme]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kdump_mkinitrd.cli", "qemu-test", "-k", kernel61.kver,
         "--kmoddir", str(kernel61.kmoddir), "--kernel", str(kernel61.vmlinuz),
         "-c", str(config), "--keep", str(tmp_path / "work")],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    return RunOutput(proc.returncode, proc.stdout, proc.stderr, tmp_path / "work")


def test_qemu_test_adds_qemus_drivers_to_a_production_config(production_run: RunOutput) -> None:
    run = production_run
    serial = (run.workdir / "serial.log").read_text(errors="replace")
    assert run.code == 0, run.stdout + run.stderr + serial[-4000:]
    assert "qemu-test: PASS" in run.stdout
    # The summary says what qemu-test added, and only what the config lacked.
    assert "added for QEMU's virtual hardware (not in the config): virtio_pci, virtio_blk" in (
        run.stdout
    )
    for module in ("ahci", "nvme", "virtio_blk"):
        assert f"kdump: loaded kernel module {module}\n" in serial.replace("\r", "")
    assert "kdump: dump saved to target 0" in serial


PHASES = [
    "building the capture image",
    "booting the first kernel",
    "loading the capture kernel",
    "crash: the capture kernel boots",
    "capture",
    "reading the dumps back",
    "checking the dump",
    "finished",
]


def test_qemu_test_shows_each_phase_on_stderr(production_run: RunOutput) -> None:
    lines = production_run.stderr.splitlines()
    detail = "qemu-test:   | "
    said = [line for line in lines if line.startswith("qemu-test: ") and detail not in line]
    assert [line.removeprefix("qemu-test: ").split(" (")[0] for line in said] == PHASES, (
        production_run.stderr
    )
    # Each line after the first says how long the phase before it took.
    for line, before in zip(said[1:], PHASES, strict=False):
        assert re.search(rf"\({re.escape(before)} took \d+\.\ds\)$", line), line
    # The capture kernel's own lines, as they came, inside the capture phase.
    start = lines.index(said[PHASES.index("capture")])
    end = lines.index(said[PHASES.index("capture") + 1])
    shown = lines[start + 1 : end]
    assert shown and all(line.startswith(detail + "kdump: ") for line in shown), shown
    assert detail + "kdump: dump saved to target 0" in shown
