"""The Python stage's fault-test switches (fail, kill, OOM at will) are only in images that
qemu-test builds: a production image, unpacked, holds none of their code; one built with
the request's test_switches flag (as qemu-test builds) does. That the switches still work
in a capture kernel is what tests/test_faults_qemu.py (python-killed, oom) and
tests/test_capture_qemu.py (-k fail) show."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from kdump_mkinitrd.config import parse
from kdump_mkinitrd.image.build import BuildRequest, build
from kdump_mkinitrd.image.inspect_image import load_image
from tests.conftest import Kernel
from tests.imagerun import unsquash

CONFIG = """\
targets:
  - {type: disk, device: /dev/vda, fstype: ext4}
kernel_modules: [virtio_blk]
capture: {stage: python}
compression: {level: 1}
"""
# What the switches are made of: the command-line words and the memory hog. (The stage's
# optional import names the module, which a production image does not have.)
MARKS = (b"fail_stage", b"kill_stage", b"oom_stage", b"exhaust_memory")


def _stage_zip(image: Path, tmp_path: Path) -> dict[str, bytes]:
    """The stage's zip, from inside the stage's squashfs (stagepack)."""
    loaded = load_image(image)
    squashfs = [m for m in loaded.members if m.path.endswith("/kdump/pystage.squashfs")]
    assert len(squashfs) == 1, [m.path for m in loaded.members if "kdump" in m.path]
    files = unsquash(squashfs[0].data, tmp_path)
    zips = [data for path, (_, _, data) in files.items() if path.endswith(".zip")]
    assert len(zips) == 1, list(files)
    with zipfile.ZipFile(io.BytesIO(zips[0])) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


@pytest.mark.parametrize("switches", [False, True])
def test_fault_switches_only_in_images_qemu_test_builds(
    switches: bool, kernel61: Kernel, tmp_path: Path
) -> None:
    image = tmp_path / "kdump.img"
    request = BuildRequest(kernel61.kver, kernel61.kmoddir, image, kernel61.vmlinuz,
                           test_switches=switches)  # fmt: skip
    build(parse(CONFIG, "kdump.yaml"), request)
    members = _stage_zip(image, tmp_path)
    assert "capture/stage.pyc" in members  # the stage itself is there either way
    found = {mark for data in members.values() for mark in MARKS if mark in data}
    if switches:
        assert "capture/testswitches.pyc" in members
        assert found == set(MARKS)
    else:
        assert not any("testswitches" in name for name in members)
        assert found == set(), found
    # Nothing else in the image carries them either (the init, the manifest's config).
    rest = b"".join(m.data for m in load_image(image).members if not m.path.endswith(".zip"))
    assert not any(mark in rest for mark in MARKS)
