"""Disk targets on stacked storage, end to end in QEMU: `qemu-test --storage LAYOUT` builds
the stack on blank disks in the first guest, the capture kernel brings it up and saves the
dump, a read-back guest opens it again, and the dump gets every check of a plain disk's.
The faults of stacked storage end in their designed outcomes.

Each run is three TCG boots (build+crash, capture, read-back): one run per layout and per
fault, each checking as much as it can, and the host-only variant on the deepest stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.qemutest.faults import FAULTS
from kdump_mkinitrd.qemutest.layouts import LAYOUTS
from kdump_mkinitrd.qemutest.run import Options, Report, run_qemu_test
from tests.conftest import Kernel

STORAGE_FAULTS = [
    ("raid-degraded", "lvm-on-raid1"),
    ("pv-missing", "luks-on-lvm"),
    ("luks-bad-key", "luks"),
    ("thin-pool-full", "lvm-thin"),
]
HOSTONLY_LAYOUT = "lvm-on-raid1"


def storage_run(kernel: Kernel, tmp_path: Path, layout: str, **kwargs: object) -> Report:
    options = Options(kernel.kver, kernel.kmoddir, kernel.vmlinuz, keep=tmp_path / "work",
                      storage=layout, **kwargs)  # type: ignore[arg-type]  # fmt: skip
    report = run_qemu_test(options)
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "work").glob("*.log"))
    assert report.ok, report.summary() + "\n" + logs[-6000:]
    return report


def test_every_storage_fault_is_run() -> None:
    assert {f for f, _ in STORAGE_FAULTS} == {f for f in FAULTS if FAULTS[f].layouts}
    assert all(layout in FAULTS[f].layouts for f, layout in STORAGE_FAULTS)


def test_a_config_must_use_the_layouts_names(kernel61: Kernel, tmp_path: Path) -> None:
    """With -c the config's stack is checked against the layout before anything boots."""
    config = tmp_path / "kdump.yaml"
    config.write_text(
        "targets:\n  - {type: disk, device: UUID=6b0e3a52-7c1d-4e8f-9a2b-3c4d5e6f7a01, "
        "fstype: ext4, stack: [{type: lvm, vg: crashvg, lv: dump}]}\n"
    )
    options = Options(kernel61.kver, kernel61.kmoddir, kernel61.vmlinuz, config=config,
                      keep=tmp_path / "work", storage="lvm")  # fmt: skip
    with pytest.raises(KdumpError, match=r"targets\[0\]\.stack\[0\]\.vg: --storage lvm names "
                       r"it 'kdumpvg'.*'crashvg'"):  # fmt: skip
        run_qemu_test(options)
    assert not list((tmp_path / "work").glob("*.img"))


@pytest.mark.qemu
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_takes_the_dump(layout: str, kernel61: Kernel, tmp_path: Path) -> None:
    """The deepest stack runs host-only: no stack and no drivers in the config, the guest
    builds its own image with --hostonly and detection walks LVM and RAID1 down to the
    virtio disks (raid-degraded runs the same layout from a config's stack)."""
    hostonly = layout == HOSTONLY_LAYOUT
    report = storage_run(kernel61, tmp_path, layout,
                         first_stage="hostonly" if hostonly else "register")  # fmt: skip
    serial = Path(report.serial_log).read_text(errors="replace")
    assert f"kdump-test: storage layout {layout} built" in serial
    assert "kdump: dump saved to target 0" in serial
    assert report.checks["makedumpfile_agrees"] and report.stage == "python"
    # The image brought each layer up, bottom first.
    said = [serial.find(f"kdump: {layer}") for layer in LAYOUTS[layout].layers]
    assert -1 not in said and said == sorted(said), (said, serial[-4000:])
    if hostonly:
        config = (tmp_path / "work" / "kdump.yaml").read_text()
        assert "stack" not in config and "kernel_modules" not in config
        assert "rebuilt the image: no image at /run/kdump-mkinitrd/capture.img" in serial
        for module in ("virtio_blk", "raid1", "dm_mod"):
            assert f"kdump: loaded kernel module {module}" in serial


@pytest.mark.qemu
@pytest.mark.parametrize(("fault", "layout"), STORAGE_FAULTS)
def test_storage_fault_ends_in_its_designed_outcome(
    fault: str, layout: str, kernel61: Kernel, tmp_path: Path
) -> None:
    report = storage_run(kernel61, tmp_path, layout, fault=fault)
    # The fault's own checks ran, and the dump its outcome saved passed a normal dump's.
    assert {"failure_logged", "degraded_logged"} & set(report.checks)
    assert report.dump_dir is not None and report.checks["makedumpfile_agrees"]
    if FAULTS[fault].next_target:
        assert report.checks["next_target_saved_the_dump"]
        assert report.checks["nothing_written_on_the_stacked_target"]
    else:
        assert report.checks["member_stale_after_the_capture"]
