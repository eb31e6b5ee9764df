"""Every capture stage x collector x target type builds on the real 6.1 kernel, and the image
passes the post-build check again when read back; combinations the capture cannot run are
config errors that name the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kdump_mkinitrd.arming.sshsetup import ensure_key
from kdump_mkinitrd.config import parse
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.build import BuildRequest, build
from kdump_mkinitrd.image.compress import decompress
from kdump_mkinitrd.image.cpio import Entry, read_newc
from kdump_mkinitrd.image.verify import check_image
from tests.conftest import Kernel

STAGES = ("python", "static")
COLLECTORS = ("auto", "makedumpfile", "native")
TARGETS = ("disk", "raw", "nfs", "ssh-openssh", "ssh-dropbear")


def _target(kind: str, tmp_path: Path) -> str:
    if kind == "disk":
        return "{type: disk, device: /dev/vda, fstype: ext4}"
    if kind == "raw":
        return "{type: raw, device: /dev/vdb}"
    if kind == "nfs":
        return "{type: nfs, export: '10.0.2.2:/srv/crash'}"
    client = kind.partition("-")[2]
    key = tmp_path / "id_ed25519"
    ensure_key(key)
    ensure_key(tmp_path / "host_key")
    blob = (tmp_path / "host_key.pub").read_text().split()[1]
    (tmp_path / "known_hosts").write_text(f"[10.0.2.2]:2222 ssh-ed25519 {blob}\n")
    return (f"{{type: ssh, host: kdump@10.0.2.2, port: 2222, client: {client}, "
            f"identity: {key}, known_hosts: {tmp_path / 'known_hosts'}}}")  # fmt: skip


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("collector", COLLECTORS)
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_collector_and_target_builds(
    stage: str, collector: str, target: str, kernel61: Kernel, tmp_path: Path
) -> None:
    if target == "ssh-dropbear":
        assert shutil.which("dbclient"), "dropbear-bin is a build dependency (Makefile DEBS)"
    text = (f"targets: [{_target(target, tmp_path)}]\nkernel_modules: [virtio_blk]\n"
            f"capture: {{stage: {stage}, collector: {collector}}}\n"
            "compression: {level: 1}\n")  # fmt: skip
    config = parse(text, "matrix.yaml")
    image = tmp_path / "kdump.img"
    request = BuildRequest(kernel61.kver, kernel61.kmoddir, image, kernel61.vmlinuz)
    report = build(config, request)
    members = read_newc(decompress(image.read_bytes(), str(image)))
    # What the build checked, once more on the bytes written.
    check_image(Entry(m.path, m.kind, m.mode, m.data, m.rdev) for m in members)
    names = {m.path for m in members}
    assert "init" in names and report.entries == len(members)
    # The collector asked for is the one the init runs.
    has_makedumpfile = any(n.endswith("/makedumpfile") for n in names)
    assert has_makedumpfile == (collector != "native")


@pytest.mark.parametrize(
    ("capture", "key", "message"),
    [
        ("{collector: native, compression: zstd}", "capture.compression",
         "the native collector writes uncompressed ELF"),
        ("{collector: native, dump_level: 31}", "capture.dump_level",
         "the native collector"),
    ],
)  # fmt: skip
def test_combinations_the_capture_cannot_run_are_config_errors(
    capture: str, key: str, message: str
) -> None:
    text = f"targets: [{{type: raw, device: /dev/vdb}}]\ncapture: {capture}\n"
    with pytest.raises(KdumpError, match=rf"^c\.yaml:2: key '{key}': .*{message}"):
        parse(text, "c.yaml")
