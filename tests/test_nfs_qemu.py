"""NFS targets: real crashes in QEMU dumped over user-mode networking into NFS-Ganesha (v4.2
found by negotiation, v3 asked for), which runs in a network namespace of its own; and the
config rules for nfs targets."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from kdump_mkinitrd.config import parse
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.qemutest.nfsserver import TestNfsServer
from kdump_mkinitrd.qemutest.run import Options, run_qemu_test
from kdump_mkinitrd.targets.nfs import NfsTarget
from tests.conftest import QEMU_TEST_ACTIONS, Kernel, run_qemu_test_for


def export_dir(tmp_path: Path) -> Path:
    return tmp_path / "work" / "nfs" / "export"


@pytest.mark.qemu
def test_nfs_negotiates_v4_and_the_python_stage_saves_the_dump(
    kernel61: Kernel, tmp_path: Path
) -> None:
    report = run_qemu_test_for(kernel61, tmp_path, "nfs")  # its own config: no version named
    assert report.dump_dir is not None
    dump = Path(report.dump_dir)
    # Written through the server: the files are in its exported folder on the host.
    assert dump.parent == export_dir(tmp_path) / "var" / "crash"
    assert {f["name"] for f in report.files} == {
        "vmcore", "vmcore-dmesg.txt", "vmcore.json", "kdump-init.log",
    }  # fmt: skip
    record = json.loads((dump / "vmcore.json").read_text())
    assert record["stage"] == "python"
    assert record["format"] == "kdump-compressed"
    assert record["target"] == f"nfs:10.0.2.2:{export_dir(tmp_path)} /var/crash"
    log = (dump / "kdump-init.log").read_text()
    # No vers= in the config: the newest version is tried first, and this server has it.
    assert "nfs: mounted 10.0.2.2:" in log and ",vers=4.2," in log
    assert "soft,proto=tcp,timeo=100,retrans=3" in log


@pytest.mark.qemu
def test_nfs_v3_with_the_static_capture(kernel61: Kernel, tmp_path: Path) -> None:
    report = run_qemu_test_for(
        kernel61,
        tmp_path,
        "nfs",
        """\
targets:
  - type: nfs
    export: "@NFS_EXPORT@"
    path: /dumps/here
    mount_options: vers=3,timeo=50
capture: {stage: static}
kernel_modules: [virtio_pci, virtio_net]
""",
        first_stage="kexec-tools",
    )
    assert report.dump_dir is not None
    dump = Path(report.dump_dir)
    assert dump.parent == export_dir(tmp_path) / "dumps" / "here"
    assert report.stage == "static"
    log = (dump / "kdump-init.log").read_text()
    # v3 goes through the server's rpcbind and mountd, as a client on a real network would.
    assert "mountvers=3" in log and ",vers=3," in log
    # The config's options come after the defaults, so they win.
    assert "timeo=50" in log and "timeo=100" not in log.split("nfs: mounted")[1]


@pytest.mark.qemu
def test_nfs_falls_back_to_v3_when_the_server_has_no_v4(kernel61: Kernel, tmp_path: Path) -> None:
    report = run_qemu_test_for(kernel61, tmp_path, "nfs", nfs_protocols="3",
                               first_stage="kexec-tools")  # fmt: skip
    assert report.dump_dir is not None
    log = (Path(report.dump_dir) / "kdump-init.log").read_text()
    tried = re.findall(r"nfs: mount -t nfs -o \S*,vers=([0-9.]+) ", log)
    assert tried == ["4.2", "4.1", "4.0", "3"]
    assert log.count("nfs: mount failed") == 3 and "mountvers=3" in log


def test_the_test_server_offers_v3_and_v4_only_inside_its_namespace(tmp_path: Path) -> None:
    with TestNfsServer(tmp_path / "nfs") as server:
        inside = subprocess.run([*server.netns(), "rpcinfo", "-p", "127.0.0.1"],
                                capture_output=True, text=True, check=True).stdout  # fmt: skip
        programs = {tuple(line.split()[:2]) for line in inside.splitlines()[1:]}
        assert {("100003", "3"), ("100003", "4"), ("100005", "3")} <= programs
        links = subprocess.run([*server.netns(), "ip", "-o", "link"], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
        pids = [p.pid for p in server.processes]
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )


def test_qemu_test_refuses_an_nfs_target_that_is_not_its_server(
    kernel61: Kernel, tmp_path: Path
) -> None:
    config = tmp_path / "kdump.yaml"
    config.write_text(
        "targets:\n  - {type: nfs, export: '192.0.2.1:/srv/crash'}\n" + QEMU_TEST_ACTIONS
    )
    options = Options(kernel61.kver, kernel61.kmoddir, kernel61.vmlinuz, config=config,
                      keep=tmp_path / "work", target="nfs")  # fmt: skip
    with pytest.raises(KdumpError, match="reaches only its own server: use export @NFS_EXPORT@"):
        run_qemu_test(options)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("{type: nfs}", "an nfs target needs 'export'"),
        ("{type: nfs, export: 'server/srv'}", "expected server:/path"),
        ("{type: nfs, export: 'a;b:/srv'}", "expected server:/path"),
        ("{type: nfs, export: 'server:/srv/../etc'}", "must not contain '..'"),
        ("{type: nfs, export: 's:/x', device: /dev/vda}", "an nfs target takes no 'device'"),
        ("{type: nfs, export: 's:/x', mount_options: 'vers=3 ro'}", "option[,option...]"),
        ("{type: nfs, export: 's:/x', mount_options: 'a,,b'}", "option[,option...]"),
        ("{type: disk, device: /dev/vda, fstype: ext4, export: 's:/x'}", "only nfs targets"),
    ],
)
def test_nfs_config_errors_name_the_key(target: str, message: str) -> None:
    with pytest.raises(KdumpError, match=r"k\.yaml:2: key 'targets\[0\]") as error:
        parse(f"targets:\n  - {target}\n", "k.yaml")
    assert message in str(error.value)


def test_nfs_target_fields() -> None:
    config = parse("targets:\n  - {type: nfs, export: 'nas.example:/srv/crash'}\n", "k.yaml")
    target = config.targets[0]
    assert isinstance(target, NfsTarget)
    assert (target.nfs_server, target.nfs_path, target.path) == (
        "nas.example", "/srv/crash", "/var/crash",
    )  # fmt: skip
    assert target.name == "nfs:nas.example:/srv/crash /var/crash"
    assert target.mount_options == "defaults"
