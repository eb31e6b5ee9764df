"""The Python stage packed as a squashfs (kdump_mkinitrd.image.stagepack): the same files as
the plain packing, the same bytes from the same inputs, in a real image, and in a real
capture kernel both when it mounts and when it cannot (the static capture saves the dump)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from kdump_mkinitrd.config import parse
from kdump_mkinitrd.hostscan.elfdeps import ElfResolver
from kdump_mkinitrd.image import stagepack
from kdump_mkinitrd.image.assemble import PACKAGE_DIR
from kdump_mkinitrd.image.build import BuildRequest, build
from kdump_mkinitrd.image.compress import decompress
from kdump_mkinitrd.image.cpio import read_newc
from kdump_mkinitrd.image.plan import ImagePlan
from kdump_mkinitrd.image.pystage import PythonStage, add_python_stage
from kdump_mkinitrd.qemutest.run import Options, Report, run_qemu_test
from tests.conftest import Kernel
from tests.imagerun import unsquash
from tests.test_capture_lib_sh import capture_hooks, run_sh, use_vmcore
from tests.test_vmcore import prb_core

INTERPRETER = "/usr/bin/python3.11"
ENTRY = "capture.stage"
FEATURE = "python-stage"
UNSQUASHFS = shutil.which("unsquashfs") or "unsquashfs"


@pytest.fixture(autouse=True)
def squashfs_tools() -> None:
    assert stagepack.mksquashfs() and shutil.which(UNSQUASHFS), (
        "squashfs-tools is a build dependency (Makefile DEBS)"
    )


def pack(packing: str, cache: Path) -> tuple[ImagePlan, str]:
    plan = ImagePlan()
    stage = add_python_stage(
        plan, INTERPRETER, ENTRY, PACKAGE_DIR, FEATURE, ElfResolver(), cache_dir=cache,
        packing=packing,
    )  # fmt: skip
    return plan, stage.squashfs


def host_path(path: str) -> str:
    """`path` through the build host's top-level links (/lib -> usr/lib), as the image has them."""
    top, _, rest = path.lstrip("/").partition("/")
    if os.path.islink("/" + top):
        top = os.path.normpath(os.readlink("/" + top))
    return f"/{top}/{rest}" if rest else f"/{top}"


def test_squashfs_holds_exactly_what_the_plain_packing_puts_in_the_image(tmp_path: Path) -> None:
    plain, _ = pack("plain", tmp_path / "cache")
    squashed, member = pack("squashfs", tmp_path / "cache")
    expected = {
        e.path if e.path.startswith("/") else "/" + e.path: (e.kind, e.mode, e.data)
        for e in plain.entries()[0]
        if e.kind in ("file", "symlink")
    }
    items = {i.path: i for i in squashed.items() if i.kind != "dir"}
    # The image itself holds one file for the whole stage, and not the interpreter.
    assert list(items) == [stagepack.IMAGE_PATH] == [member]
    got = unsquash(items[member].data, tmp_path)
    # The same zip members; inside the squashfs stored rather than deflated.
    zips = [path for path in got if path.endswith(".zip")]
    assert len(zips) == 1
    assert zip_members(got.pop(zips[0])[2]) == zip_members(expected.pop(zips[0])[2])
    assert got == expected
    assert os.path.realpath(INTERPRETER) in got


def zip_members(blob: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_same_files_give_the_same_squashfs_bytes_cold_and_from_the_cache(tmp_path: Path) -> None:
    members = [
        stagepack.Member("/usr/bin/tool", b"\x7fELF" + bytes(range(256)) * 64, 0o755),
        stagepack.Member("/usr/lib/python3.11.zip", os.urandom(100_000)),
        stagepack.Member("/usr/bin/tool3", b"tool", symlink=True),
    ]
    first = stagepack.squash(members, tmp_path / "a")
    second = stagepack.squash(list(reversed(members)), tmp_path / "b")
    assert first == second
    cached = list((tmp_path / "a").glob("pystage-*.squashfs"))
    assert len(cached) == 1 and cached[0].read_bytes() == first
    # The cache answers for the same files: a doctored entry is what comes back.
    cached[0].write_bytes(b"from the cache")
    assert stagepack.squash(members, tmp_path / "a") == b"from the cache"
    changed = [members[0], stagepack.Member("/usr/lib/python3.11.zip", b"other"), members[2]]
    assert stagepack.squash(changed, tmp_path / "a") != first


def test_real_image_carries_the_stage_as_one_squashfs_and_mounts_it(
    kernel61: Kernel, tmp_path: Path
) -> None:
    config = parse(
        "targets: [{type: disk, device: UUID=2f6e0c1a-1111-4222-8333-944455556666, "
        "fstype: ext4}]\nkernel_modules: [virtio_blk]\ncapture: {stage: python}\n",
        "kdump.yaml",
    )
    image = tmp_path / "kdump.img"
    build(config, BuildRequest(kernel61.kver, kernel61.kmoddir, image, kernel61.vmlinuz,
                               cache_dir=tmp_path / "cache"))  # fmt: skip
    members = {"/" + m.path: m for m in read_newc(decompress(image.read_bytes(), str(image)))}
    squashfs = members[host_path(stagepack.IMAGE_PATH)].data
    got = unsquash(squashfs, tmp_path)
    interpreters = [
        path
        for path, (_, _, data) in got.items()
        if re.search(r"/bin/python3\.\d+$", path) and data.startswith(b"\x7fELF")
    ]
    assert len(interpreters) == 1 and host_path(interpreters[0]) not in members
    # Nothing packed twice: a library the static part has stays out of the squashfs.
    assert "/usr/lib/x86_64-linux-gnu/libc.so.6" in members
    assert not {host_path(p) for p in got} & set(members)
    modules = [p for p in members if p.endswith(("/loop.ko", "/squashfs.ko"))]
    assert len(modules) == 2
    hook = members[host_path("/lib/kdump/hooks/30-capture-lib.sh")].data.decode()
    assert f"mount -t squashfs -o ro,nodev,nosuid {stagepack.IMAGE_PATH}" in hook
    # Every packed program and library is an input, so `build --if-needed` sees it change.
    recorded = json.loads(Path(f"{image}.inputs.json").read_text())["inputs"]
    packed_elves = [p for p, (_, _, data) in got.items() if data.startswith(b"\x7fELF")]
    assert len(packed_elves) > 1
    for path in packed_elves:
        assert any(os.path.samefile(path, host) for host in recorded if os.path.exists(host)), path
    # The zip inside is stored, not deflated: xz packs the bytecode, and imports need no zlib.
    zips = [data for p, (_, _, data) in got.items() if p.endswith(".zip")]
    assert len(zips) == 1
    with zipfile.ZipFile(io.BytesIO(zips[0])) as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}


# --- in a real capture kernel ----------------------------------------------------------------

CONFIG = """\
targets:
  - {type: disk, device: UUID=3c1f5e2a-2b4d-4e6f-8a0b-7c9d1e2f3a4b, fstype: ext4}
kernel_modules: [virtio_blk, virtio_pci]
failure_action: poweroff
final_action: poweroff
device_timeout: 30
"""


def qemu_run(kernel: Kernel, tmp_path: Path, append: str = "") -> tuple[Report, str, str]:
    path = tmp_path / "kdump.yaml"
    path.write_text(CONFIG)
    options = Options(kernel.kver, kernel.kmoddir, kernel.vmlinuz, config=path,
                      keep=tmp_path / "work", append=append)  # fmt: skip
    report = run_qemu_test(options)
    serial = Path(report.serial_log).read_text(errors="replace")
    assert report.ok, report.summary() + "\n" + serial[-4000:]
    assert report.dump_dir is not None
    log = (Path(report.dump_dir) / "kdump-init.log").read_text()
    return report, log, (Path(report.dump_dir) / "vmcore.json").read_text()


@pytest.mark.qemu
def test_stage_runs_from_the_mounted_squashfs(kernel61: Kernel, tmp_path: Path) -> None:
    _, log, record = qemu_run(kernel61, tmp_path)
    assert f"mounted the Python stage {stagepack.IMAGE_PATH}" in log
    assert '"stage": "python"' in record
    assert "fallback" not in log


@pytest.mark.qemu
def test_static_capture_saves_the_dump_when_the_squashfs_cannot_be_mounted(
    kernel61: Kernel, tmp_path: Path
) -> None:
    # The capture kernel refuses the squashfs module, as a kernel without it would.
    _, log, record = qemu_run(kernel61, tmp_path, append="module_blacklist=squashfs")
    assert f"cannot mount the Python stage {stagepack.IMAGE_PATH}: static capture only" in log
    assert "mounted the Python stage" not in log
    assert '"stage": "static"' in record


# --- a stage stalled on memory -----------------------------------------------------------

STALLED_STAGE = """#!/bin/sh
echo stalled-stage-started
exec sleep 600
"""


@pytest.mark.parametrize(("full", "stopped"), [("92.31", True), ("12.00", False)])
def test_stage_stalled_on_memory_is_stopped_and_the_fallback_saves_the_dump(
    full: str, stopped: bool, tmp_path: Path
) -> None:
    """Under the real busybox sh: the stage sleeps; the pressure file says whether all tasks
    wait on memory. A stall stops it and the static capture runs; no stall, no stop."""
    program = tmp_path / "stage"
    program.write_text(STALLED_STAGE if stopped else "#!/bin/sh\nsleep 40\nexit 3\n")
    program.chmod(0o755)
    stage = PythonStage(str(program), "/usr", "", (), (), (str(program),))
    psi = tmp_path / "memory"
    psi.write_text(
        f"some avg10={full} avg60=40.00 avg300=10.00 total=1\n"
        f"full avg10={full} avg60=30.00 avg300=9.00 total=1\n"
    )
    core = tmp_path / "vmcore"
    core.write_bytes(prb_core(fill=True))
    (tmp_path / "crash").mkdir()
    hooks = capture_hooks("capture: {keep: 0}\n", python=stage)
    result = run_sh(tmp_path, hooks + use_vmcore() + f"KDUMP_PSI='{psi}'\n"
                    f'kdump_capture "{tmp_path}/crash" && echo CAPTURED\n', core)  # fmt: skip
    console = result.stdout
    assert "CAPTURED" in console, console + result.stderr
    said = "the Python capture stage has been stalled on memory for 30 s: stopping it"
    assert (said in console) == stopped, console
    status = 137 if stopped else 3
    assert f"the Python capture stage failed (exit status {status}); static fallback" in console
    assert (tmp_path / "crash" / "vmcore").read_bytes() == core.read_bytes()
