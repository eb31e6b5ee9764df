"""`qemu-test --guest debian`: our .deb, built fresh, on a real Debian 12 system (systemd,
root on LVM): installed with dpkg, armed by its boot service, a sysrq crash saved to the root
LV by the capture kernel, reported after the reboot, checked on the host; a second kernel
package through the hooks; removal and purge. One QEMU run checks all of it (its boots are
the expensive part under TCG); the guest image is built once and cached."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kdump_mkinitrd.config import load
from kdump_mkinitrd.dumps.announce import announce_new_dumps, dump_folders
from kdump_mkinitrd.hostscan.defaulttarget import holding_mount, parse_mountinfo
from kdump_mkinitrd.qemutest.debian_guest import GuestOptions, run_debian_guest

# The checks the run must have made: a run that stopped early has fewer, and fails here even
# though everything it did check passed.
EXPECTED = (
    "dpkg_install", "service_enabled", "image_built", "service_active_at_boot",
    "capture_kernel_loaded_at_boot", "zero_config_default_target", "capture_kernel_booted",
    "list_dumps", "list_dumps_shows_complete_dump", "journal_reports_saved_dump", "dump_copied_out",
    "vmcore_present", "json_sha256_matches", "dmesg_has_panic", "makedumpfile_agrees",
    "second_kernel_installs", "second_kernel_image_built", "second_kernel_removes",
    "second_kernel_image_removed", "dpkg_remove", "capture_kernel_unloaded_on_remove",
    "images_removed", "dpkg_purge", "config_purged", "dumps_kept_after_purge",
)  # fmt: skip


@pytest.mark.qemu
def test_debian_guest_installs_crashes_and_reports(tmp_path: Path) -> None:
    report = run_debian_guest(GuestOptions(keep=tmp_path / "work"))
    print(report.summary())
    missing = [name for name in EXPECTED if name not in report.checks]
    assert report.ok and not missing, (
        f"{report.summary()}\nnot checked: {missing}\n"
        + Path(report.serial_log).read_text(errors="replace")[-6000:]
    )
    assert report.image_size > 0


def _dump(folder: Path, name: str, complete: bool) -> Path:
    dump = folder / name
    dump.mkdir(parents=True)
    (dump / ("vmcore" if complete else "vmcore.incomplete")).write_bytes(b"x" * 2**20)
    (dump / "vmcore.json").write_text(json.dumps({"vmcore_size": 2**20, "crash_time": 0}))
    return dump


def test_register_announces_each_saved_dump_once(tmp_path: Path) -> None:
    crash, state = tmp_path / "crash", tmp_path / "state" / "reported-dumps.json"
    first = _dump(crash, "2026-11-30-10:00:00", complete=True)
    _dump(crash, "2026-11-30-11:00:00", complete=False)
    said = io.StringIO()
    assert [d.path for d in announce_new_dumps([crash], state, said)] == [str(first)]
    assert said.getvalue() == (
        f"kdump-mkinitrd: a dump was saved by the capture kernel: {first} "
        "(1.0 MiB, crash time 1970-01-01 00:00:00 UTC)\n"
    )
    assert announce_new_dumps([crash], state, io.StringIO()) == []  # said once only
    second = _dump(crash, "2026-11-30-12:00:00", complete=True)
    assert [d.path for d in announce_new_dumps([crash], state, io.StringIO())] == [str(second)]


def test_dump_folders_has_a_disk_targets_folder_where_its_filesystem_is_mounted(
    tmp_path: Path,
) -> None:
    """A disk target's path is looked for under this host's own mount of its device: here the
    real filesystem holding tmp_path, named by its device node."""
    real = tmp_path.resolve()
    mount = holding_mount(parse_mountinfo(Path("/proc/self/mountinfo").read_text()), str(real))
    sysfs = Path(f"/sys/dev/block/{mount.major}:{mount.minor}")
    assert sysfs.exists() and mount.root == "/", f"{real} is on {mount}: not a block device's"
    node = Path("/dev") / sysfs.resolve().name
    config_file = tmp_path / "kdump.yaml"
    config_file.write_text(
        f"targets: [{{type: disk, device: {node}, fstype: {mount.fstype}, "
        f"path: /{real.relative_to(mount.mount_point)}}}]\n"
    )
    expected = [p.resolve() for p in (Path("/var/crash"), real) if p.is_dir()]
    assert dump_folders(load(config_file)) == expected
