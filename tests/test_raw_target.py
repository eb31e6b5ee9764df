"""The raw target's capture, rendered and run under the real busybox sh against device files:
a complete dump that nobody recovered is never overwritten (a crash loop would otherwise
destroy the first, usually the valuable, dump), the next target takes the dump instead, and
`recover-raw` frees the device for the next crash.

The hooks run in a private mount namespace with a tmpfs on /run and on /proc, whose `vmcore`
is the test's own bytes; the only stand-in is `wait_for_device`, which maps the config's
/dev/NAME onto a device file in the test's folder (the init's real one waits for udev)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from kdump_mkinitrd.config import Config, parse
from kdump_mkinitrd.dumps import rawrecovery as raw
from kdump_mkinitrd.image.render import render
from kdump_mkinitrd.image.resolve import CaptureSettings
from kdump_mkinitrd.paths import MODULES_DIR

DEVICE_SIZE = 8 << 20
HOSTNAME = "web1"

HARNESS = """\
log() { echo "kdump: $*"; }
fail() { log "FAILED: $*"; exit 1; }
wait_for_device() { [ -e "$KDUMP_TEST_DEVS${1#/dev}" ] && echo "$KDUMP_TEST_DEVS${1#/dev}"; }
DEVICE_TIMEOUT=1
"""


def raw_config(devices: list[str]) -> Config:
    text = "targets:\n" + "".join(f"  - {{type: raw, device: /dev/{d}}}\n" for d in devices)
    return parse(text, "raw.yaml")


def render_hooks(devices: list[str]) -> str:
    capture = CaptureSettings("static", "native", 31, "none", "", HOSTNAME, None, None)
    context = {"config": raw_config(devices), "capture": capture, "python": None, "kver": "6.1"}
    return "\n".join(
        render(MODULES_DIR / folder / name, context)
        for folder, name in (("capture", "capture-lib.sh.j2"), ("raw", "raw-target.sh.j2"))
    )


def run_capture(
    tmp: Path, devices: list[str], vmcore: Path | None, call: str
) -> subprocess.CompletedProcess[str]:
    """`call` after the hooks are sourced, as the init runs them, with `vmcore` (or nothing)
    as /proc/vmcore. `run-targets` runs the init's step that tries the targets in order."""
    hooks = tmp / "hooks.sh"
    hooks.write_text(HARNESS + render_hooks(devices))
    if call == "run-targets":
        step = tmp / "run-targets.sh"
        context = {"config": raw_config(devices)}
        step.write_text(render(MODULES_DIR / "capture" / "run-targets.sh.j2", context))
        call = f". {shlex.quote(str(step))}"
    setup = "mount -t tmpfs tmpfs /run && mkdir /run/kdump && mount -t tmpfs tmpfs /proc"
    if vmcore is not None:
        setup += f" && cp {shlex.quote(str(vmcore))} /proc/vmcore"
    script = f"{setup} || exit 99\n. {shlex.quote(str(hooks))}\n{call}\n"
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "/bin/busybox", "sh", "-c", script],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "KDUMP_TEST_DEVS": str(tmp / "dev")},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode != 99, proc.stderr
    return proc


@pytest.fixture
def work(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.fail("these tests mount tmpfs in a private mount namespace: run them as root")
    devs = tmp_path / "dev"
    devs.mkdir()
    for name in ("first", "second"):
        with (devs / name).open("wb") as f:
            f.truncate(DEVICE_SIZE)
    return tmp_path


def vmcore(tmp: Path, name: str, size: int) -> Path:
    path = tmp / name
    path.write_bytes(os.urandom(size))
    return path


def test_a_complete_dump_nobody_recovered_is_never_overwritten(work: Path) -> None:
    device = work / "dev/first"
    first, second = vmcore(work, "a", 1_500_000), vmcore(work, "b", 900_000)
    saved = run_capture(work, ["first"], first, 'kdump_raw_capture "$KDUMP_TEST_DEVS/first"')
    assert saved.returncode == 0, saved.stdout + saved.stderr
    header = raw.read_header(device)
    assert header is not None and header.complete
    stamp = header.fields["stamp"]
    before = device.read_bytes()

    again = run_capture(work, ["first"], second, 'kdump_raw_capture "$KDUMP_TEST_DEVS/first"')
    assert again.returncode == 1
    assert (
        f"kdump: raw target {device} holds a complete dump that was never recovered "
        f"({HOSTNAME}-{stamp}): not overwriting it\n"
    ) in again.stdout
    assert device.read_bytes() == before

    out = raw.recover(device, work / "crash")
    assert (out / "vmcore").read_bytes() == first.read_bytes()
    assert raw.read_header(device) is None
    # Recovered, the device takes the next crash's dump.
    third = run_capture(work, ["first"], second, 'kdump_raw_capture "$KDUMP_TEST_DEVS/first"')
    assert third.returncode == 0, third.stdout + third.stderr
    out = raw.recover(device, work / "crash")
    assert (out / "vmcore").read_bytes() == second.read_bytes()


def test_the_next_target_takes_the_dump(work: Path) -> None:
    first, second = work / "dev/first", work / "dev/second"
    old, new = vmcore(work, "old", 700_000), vmcore(work, "new", 1_100_000)
    assert (
        run_capture(work, ["first"], old, 'kdump_raw_capture "$KDUMP_TEST_DEVS/first"').returncode
        == 0
    )
    before = first.read_bytes()
    proc = run_capture(work, ["first", "second"], new, "run-targets")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    refusal = next(i for i, line in enumerate(lines) if "never recovered" in line)
    assert lines[refusal + 1 :][:3] == [
        "kdump: target 0 could not take the dump",
        "kdump: trying target 1: raw:/dev/second",
        f"kdump: raw target /dev/second is {second}",
    ]
    assert "kdump: dump saved to target 1" in lines
    assert first.read_bytes() == before
    assert (raw.recover(first, work / "crash") / "vmcore").read_bytes() == old.read_bytes()
    assert (raw.recover(second, work / "crash") / "vmcore").read_bytes() == new.read_bytes()


def test_an_incomplete_dump_does_not_block_the_device(work: Path) -> None:
    device = work / "dev/first"
    # No /proc/vmcore: the copy fails and the header says "incomplete".
    failed = run_capture(work, ["first"], None, 'kdump_raw_capture "$KDUMP_TEST_DEVS/first"')
    assert failed.returncode == 1
    header = raw.read_header(device)
    assert header is not None and header.fields["state"] == "incomplete"
    dump = vmcore(work, "a", 600_000)
    saved = run_capture(work, ["first"], dump, 'kdump_raw_capture "$KDUMP_TEST_DEVS/first"')
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert (raw.recover(device, work / "crash") / "vmcore").read_bytes() == dump.read_bytes()


def test_an_unreadable_header_is_not_written_over(work: Path) -> None:
    device = work / "dev/first"
    device.unlink()
    device.mkdir()  # root may read any file, but dd cannot read a directory
    dump = vmcore(work, "a", 100_000)
    proc = run_capture(work, ["first"], dump, 'kdump_raw_capture "$KDUMP_TEST_DEVS/first"')
    assert proc.returncode == 1
    assert (
        f"kdump: raw target {device}: cannot read its header: not overwriting what it may hold"
        in proc.stdout
    )
