"""An admin's switch from Debian's kdump-tools, end to end: its configuration with an NFS
target is imported, and the config written is built and proven by `kdump-mkinitrd qemu-test
--target nfs -c`: a guest crashes and the dump lands on the NFS server where kdump-tools would
have put it (the export's top folder), mounted with kdump-tools' NFS_TIMEO and NFS_RETRANS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, Kernel
from tests.import_golden import DATA


@pytest.mark.qemu
def test_a_kdump_tools_nfs_config_imported_saves_its_dump(kernel61: Kernel, tmp_path: Path) -> None:
    work = tmp_path / "work"
    export = work / "nfs" / "export"  # where qemu-test's NFS server exports from
    fixture = (DATA / "kdump-tools" / "nfs-qemu.conf").read_text()
    theirs = tmp_path / "kdump-tools"
    theirs.write_text(
        fixture.replace('NFS="10.0.2.2:/srv/nfs/crash"', f'NFS="10.0.2.2:{export}"')
        + 'NFS_TIMEO="50"\nNFS_RETRANS="2"\n'
    )
    ours = tmp_path / "kdump-mkinitrd.yaml"
    cli = [sys.executable, "-m", "kdump_mkinitrd.cli"]
    imported = subprocess.run(
        [*cli, "import-config", "--from", "kdump-tools", str(theirs), "-o", str(ours)],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert f"mapped: NFS ({theirs}:7) -> targets[0]" in imported.stdout

    proc = subprocess.run(
        [*cli, "qemu-test", "-k", kernel61.kver, "--kmoddir", str(kernel61.kmoddir),
         "--kernel", str(kernel61.vmlinuz), "--target", "nfs", "-c", str(ours),
         "--keep", str(work), "--json"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip
    report = json.loads(proc.stdout)
    assert report["ok"], proc.stdout[-3000:] + Path(report["serial_log"]).read_text()[-3000:]
    dump = Path(report["dump_dir"])
    assert dump.parent == export  # path: /, the export's top folder, as kdump-tools does
    record = json.loads((dump / "vmcore.json").read_text())
    assert record["complete"] is True
    assert record["target"] == f"nfs:10.0.2.2:{export} /"
    log = (dump / "kdump-init.log").read_text()
    assert "timeo=50" in log and "retrans=2" in log
    # The default failure_action and final_action (kdump-tools reboots), no poweroff needed.
    assert report["checks"]["guest_sent_only_to_the_test_servers"]
