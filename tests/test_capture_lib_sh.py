"""The init's capture library under the real busybox sh, on real files and filesystems.

The rendered hooks (capture-lib, disk-target, run-targets, and the init's device lookup)
run in a private mount namespace with a tmpfs over /run, as in the capture kernel: real
loop devices, real ext4, real makedumpfile and dd. The vmcore is a real ELF core built by
the vmcore tests, handed to the library through KDUMP_VMCORE in place of /proc/vmcore.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdump_mkinitrd import storage
from kdump_mkinitrd.capture.vmcore_json import problems
from kdump_mkinitrd.config import parse
from kdump_mkinitrd.image.pystage import PythonStage
from kdump_mkinitrd.image.render import render
from kdump_mkinitrd.image.resolve import CaptureSettings
from kdump_mkinitrd.paths import MODULES_DIR, TEMPLATES_DIR
from tests.test_vmcore import big_prb_core, prb_core

MAKEDUMPFILE = shutil.which("makedumpfile") or "/usr/bin/makedumpfile"
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="loop devices and mounts need root")

# Stands in for the init's own log() and fail(): the console line, and the log file the
# capture copies beside the dump.
HARNESS = """
log() { echo "kdump: $*"; echo "0.00 $*" >> "$KDUMP_LOG"; }
fail() { log "FAILED: $*"; exit 1; }
"""


def init_functions(*names: str) -> str:
    """Function definitions cut from the rendered init (which runs steps at top level)."""
    text = render(
        TEMPLATES_DIR / "init.sh.j2", {"config": parse("", "k.yaml"), "kver": "6.1.0-test"}
    )
    found = []
    for name in names:
        match = re.search(rf"^{name}\(\) {{\n.*?^}}\n", text, re.M | re.S)
        assert match, name
        found.append(match.group(0))
    return "".join(found)


def capture_hooks(
    config_text: str,
    *,
    hostname: str = "web1",
    collector: str = "native",
    python: PythonStage | None = None,
    modules: tuple[str, ...] = ("capture",),
    dump_level: int = 1,  # the synthetic cores have no mem_map for makedumpfile's filters
) -> str:
    """The hooks as build renders them, for this config."""
    config = parse(config_text, "k.yaml")
    flag = "-l" if collector == "makedumpfile" else ""
    capture = CaptureSettings(
        "python" if python else "static", collector, dump_level, "lzo" if flag else "none", flag,
        hostname, None, MAKEDUMPFILE if collector == "makedumpfile" else None,
    )  # fmt: skip
    context = {"config": config, "capture": capture, "python": python, "kver": "6.1.0-test",
               "layers": storage.shell_calls(config.targets)}  # fmt: skip
    parts = [render(MODULES_DIR / "capture" / "capture-lib.sh.j2", context)]
    if "disk" in modules:
        parts.append(render(MODULES_DIR / "disk" / "disk-target.sh.j2", context))
    if "run-targets" in modules:
        body = render(MODULES_DIR / "capture" / "run-targets.sh.j2", context)
        parts.append("run_targets() {\n" + body + "\n}\n")
    return "\n".join(parts)


def busybox_bin(tmp: Path) -> Path:
    """Every busybox applet as a program, first on PATH: the commands the image has."""
    folder = tmp / "busybox-bin"
    if not folder.is_dir():
        folder.mkdir()
        applets = subprocess.run(["/bin/busybox", "--list"], check=True, capture_output=True,
                                 text=True).stdout.split()  # fmt: skip
        for applet in applets:
            (folder / applet).symlink_to("/bin/busybox")
    return folder


def run_sh(
    tmp: Path, script: str, vmcore: Path | None = None, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """busybox sh in its own mount namespace, /run a fresh tmpfs as in the capture kernel."""
    log = tmp / "init.log"
    log.touch()
    path = tmp / "script.sh"
    head = f"KDUMP_LOG='{log}'\nDEVICE_TIMEOUT=1\nKDUMP_TARGET_NAME=t0\n"
    path.write_text(HARNESS + head + script)
    wrapped = f'mount -t tmpfs -o mode=0755 tmpfs /run && exec /bin/busybox sh "{path}"'
    env = {"PATH": f"{busybox_bin(tmp)}:/usr/sbin:/usr/bin:/sbin:/bin", "TZ": "UTC",
           "HOME": str(tmp), "KDUMP_VMCORE_FILE": str(vmcore or "")}  # fmt: skip
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "/bin/sh", "-c", wrapped],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def use_vmcore() -> str:
    """After the library's own KDUMP_VMCORE=/proc/vmcore, the test's core instead."""
    return 'KDUMP_VMCORE="$KDUMP_VMCORE_FILE"\n'


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    dev = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextlib.contextmanager
def mounted(source: str, target: Path, *args: str) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *args, source, str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def ext4_image(path: Path, size_mb: int) -> None:
    with path.open("wb") as f:
        f.truncate(size_mb << 20)
    # No journal: a data write error shows at fsync and never turns the filesystem read-only
    # while the collector still writes.
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal",
                    "-E", "lazy_itable_init=1", str(path)], check=True)  # fmt: skip


def records(tmp: Path) -> list[str]:
    return (tmp / "init.log").read_text().splitlines()


# -- item 2: a failing sync leaves the dump incomplete and the next target runs -------------

TWO_DISKS = """
targets:
  - {{type: disk, device: {bad}, fstype: ext4, path: /crash, mount_options: "errors=continue"}}
  - {{type: disk, device: {good}, fstype: ext4, path: /crash}}
"""


@needs_root
def test_failed_sync_is_not_saved_and_the_next_target_runs(tmp_path: Path) -> None:
    """Target 0 is a thin disk: an ext4 of 64 MiB whose backing file lives on a 12 MiB tmpfs.
    The collector's writes land in the page cache; writeback then gets EIO from the loop
    device (its backing file is out of space), and fsync reports it. Nothing on target 0 may
    be named complete and target 1 must take the dump."""
    core = tmp_path / "vmcore"
    core.write_bytes(big_prb_core())  # 24 MiB: more than the thin disk really holds
    with contextlib.ExitStack() as stack:
        backing = stack.enter_context(
            mounted("thin", tmp_path / "thin", "-t", "tmpfs", "-o", "size=12m")
        )
        ext4_image(backing / "disk.img", 64)
        bad = stack.enter_context(loop_device(backing / "disk.img"))
        ext4_image(tmp_path / "good.img", 64)
        good = stack.enter_context(loop_device(tmp_path / "good.img"))
        hooks = capture_hooks(TWO_DISKS.format(bad=bad, good=good),
                              modules=("capture", "disk", "run-targets"))  # fmt: skip
        functions = init_functions("wait_for_device")
        result = run_sh(tmp_path, functions + hooks + use_vmcore() + "run_targets\n", core)
        console = result.stdout
        assert "dump saved to target 0" not in console, console + result.stderr
        assert "dump saved to target 1" in console, console
        assert "sync of the dump failed" in console, console
        assert result.returncode == 0, console + result.stderr
        seen = stack.enter_context(mounted(bad, tmp_path / "seen-bad", "-o", "ro"))
        dumps = list((seen / "crash").iterdir())
        assert len(dumps) == 1
        names = sorted(p.name for p in dumps[0].iterdir())
        assert "vmcore" not in names and "vmcore.incomplete" in names, names
        assert "vmcore.json" not in names, names
        saved = stack.enter_context(mounted(good, tmp_path / "seen-good", "-o", "ro"))
        (dump,) = list((saved / "crash").iterdir())
        assert (dump / "vmcore").read_bytes() == core.read_bytes()
        record = json.loads((dump / "vmcore.json").read_text())
        assert problems(record) == []
        assert record["vmcore_size"] == core.stat().st_size
        assert record["crash_time"] is None  # big_prb_core has no CRASHTIME


# -- item 5: a killed Python stage's partial dump is removed before the fallback ----------

# The Python stage's process as the init sees it when the OOM killer or a signal ends it:
# partial output left behind, a non-zero exit. A shell program plays it (the real stage's
# own kill path runs in tests/test_faults_qemu.py's python-killed).
KILLED_STAGE = """#!/bin/sh
# argv: --dir DIR ...
dir=$2
head -c {partial} /dev/zero > "$dir/vmcore.incomplete"
printf 'the Python stage wrote this kernel log\\n' > "$dir/vmcore-dmesg.txt"
exit 137
"""


def killed_stage(tmp: Path, partial: int) -> PythonStage:
    program = tmp / "stage"
    program.write_text(KILLED_STAGE.format(partial=partial))
    program.chmod(0o755)
    return PythonStage(str(program), "/usr", "", (), (), (str(program),))


@needs_root
@pytest.mark.parametrize("collector", ["native", "makedumpfile"])
def test_fallback_removes_the_partial_and_keeps_the_stage_kernel_log(
    collector: str, tmp_path: Path
) -> None:
    """A 40 MiB tmpfs; the killed stage left 20 MiB; the fallback's copy needs 24 MiB."""
    core = tmp_path / "vmcore"
    core.write_bytes(big_prb_core() if collector == "native" else prb_core(fill=True))
    hooks = capture_hooks("capture: {keep: 0}\n", collector=collector,
                          python=killed_stage(tmp_path, 20 << 20))  # fmt: skip
    with mounted("tmpfs", tmp_path / "mnt", "-t", "tmpfs", "-o", "size=40m") as mnt:
        mnt.joinpath("crash").mkdir()
        result = run_sh(tmp_path, hooks + use_vmcore() +
                        f'kdump_capture "{mnt}/crash" && echo CAPTURED\n', core)  # fmt: skip
        console = result.stdout
        assert "CAPTURED" in console, console + result.stderr
        assert "removing the Python stage's vmcore.incomplete (20971520 bytes)" in console
        names = sorted(p.name for p in (mnt / "crash").iterdir())
        assert names == ["vmcore", "vmcore-dmesg.txt", "vmcore.json"], names
        dmesg = (mnt / "crash" / "vmcore-dmesg.txt").read_text()
        assert dmesg == "the Python stage wrote this kernel log\n"
        assert "could not extract the kernel log" not in console, console
        record = json.loads((mnt / "crash" / "vmcore.json").read_text())
        assert problems(record) == [], record
        if collector == "native":
            assert (mnt / "crash" / "vmcore").read_bytes() == core.read_bytes()
        else:
            assert record["crash_time"] == 1700000000  # read from the core's VMCOREINFO


# -- item 13: MBR PARTUUID=SIGNATURE-NN with NN in hex ---------------------------------

MBR_TABLE = "label: dos\nlabel-id: 0x5eed1234\n" + "".join(
    # Four primaries would leave no room: one primary, then an extended partition holding 15
    # logical ones, numbered 5 to 19 as Linux numbers them.
    line + "\n"
    for line in ["start=2048, size=2048, type=83", "start=4096, type=5"]
    + ["size=2048, type=83"] * 15
)


@needs_root
@pytest.mark.parametrize(("number", "suffix"), [(1, "01"), (10, "0a"), (16, "10"), (19, "13")])
def test_mbr_partuuid_suffix_is_hex(number: int, suffix: str, tmp_path: Path) -> None:
    image = tmp_path / "mbr.img"
    with image.open("wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(image)], input=MBR_TABLE, text=True, check=True,
                   capture_output=True)  # fmt: skip
    dev = subprocess.run(["losetup", "-f", "--show", "-P", str(image)], check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        # This kernel may leave the scan to user space: partx adds the partitions.
        subprocess.run(["partx", "-a", dev], check=False, capture_output=True)
        part = f"{dev}p{number}"
        # What util-linux computes as its PARTUUID, in the kernel's own "%08x-%02x".
        blkid = subprocess.run(["blkid", "-p", "-o", "export", part], check=True,
                               capture_output=True, text=True).stdout  # fmt: skip
        assert f"PART_ENTRY_UUID=5eed1234-{suffix}" in blkid.splitlines()
        functions = init_functions("read_hex", "le_number", "partition_name", "find_partuuid")
        result = run_sh(tmp_path, functions + f"find_partuuid 5eed1234-{suffix}\n")
        assert result.stdout.strip() == part, result.stdout + result.stderr
        upper = run_sh(tmp_path, functions + f"find_partuuid 5EED1234-{suffix.upper()}\n")
        assert upper.stdout.strip() == part, upper.stdout + upper.stderr
    finally:
        subprocess.run(["partx", "-d", dev], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", dev], check=False)
