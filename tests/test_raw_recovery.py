"""Getting a raw target's dump off the device: `recover-raw`, and `register` at boot doing it
for every raw target (as kdumpctl does) so the device is free for the next crash. The dumps
are written by the real capture hook (tests.test_raw_target); recovery runs against device
files and a real loop device. A recovery that fails must leave the dump on the device and
nothing that looks like a complete dump behind."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kdump_mkinitrd.cli import main
from kdump_mkinitrd.config import parse
from kdump_mkinitrd.dumps import rawrecovery as raw
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.targets.raw import RawTarget
from tests.conftest import REPO
from tests.test_raw_target import HOSTNAME, run_capture, vmcore, work  # noqa: F401

CAPTURE = 'kdump_raw_capture "$KDUMP_TEST_DEVS/first"'


def captured(work: Path, size: int = 1_200_000) -> tuple[Path, bytes]:  # noqa: F811
    """A device file holding a complete raw dump, and the dump's bytes."""
    dump = vmcore(work, "dump", size)
    proc = run_capture(work, ["first"], dump, CAPTURE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work / "dev/first", dump.read_bytes()


def test_recovery_marks_the_device_free_only_after_the_copy(work: Path) -> None:  # noqa: F811
    device, dump = captured(work)
    out = raw.recover(device, work / "crash")
    assert out.name.startswith(f"{HOSTNAME}-")
    assert (out / "vmcore").read_bytes() == dump
    assert not (out / "vmcore.incomplete").exists()
    record = json.loads((out / "vmcore.json").read_text())
    assert record["complete"] is True and record["vmcore_size"] == len(dump)
    assert raw.read_header(device) is None


def test_recovery_that_runs_out_of_space_leaves_the_dump_on_the_device(
    work: Path,  # noqa: F811
) -> None:
    device, _ = captured(work, 3_000_000)
    before = device.read_bytes()
    crash = work / "small"
    crash.mkdir()
    # The real command, into a 1 MiB tmpfs the 3 MB dump cannot fit in.
    command = (
        f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(crash))} || exit 99\n"
        f"{shlex.quote(sys.executable)} -m kdump_mkinitrd.cli recover-raw "
        f"{shlex.quote(str(device))} {shlex.quote(str(crash))}\n"
        f"echo rc=$?; ls -A {shlex.quote(str(crash))}\n"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", command],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode != 99, proc.stderr
    assert "rc=1" in proc.stdout
    assert "No space left on device" in proc.stderr
    assert f"the dump is still on {device}" in proc.stderr
    # Nothing left that could pass for a dump; the device as it was, still "complete".
    assert proc.stdout.split("rc=1", 1)[1].split() == []
    assert device.read_bytes() == before
    header = raw.read_header(device)
    assert header is not None and header.complete


def test_recovery_of_a_device_shorter_than_its_dump_fails_cleanly(
    work: Path,  # noqa: F811
) -> None:
    device, _ = captured(work)
    with device.open("r+b") as f:
        f.truncate(raw.HEADER_SIZE + 2 * 2**20 - 100_000)
    before = device.read_bytes()
    with pytest.raises(KdumpError, match=r"ends .* bytes before the dump does"):
        raw.recover(device, work / "crash")
    assert list((work / "crash").iterdir()) == []
    assert device.read_bytes() == before


def test_a_header_hostname_cannot_leave_the_folder(work: Path) -> None:  # noqa: F811
    device, dump = captured(work)
    block = bytearray(device.read_bytes()[: raw.HEADER_SIZE])
    text = bytes(block).split(b"\0", 1)[0].replace(b"hostname=web1\n", b"hostname=../..\n")
    device.write_bytes(text.ljust(raw.HEADER_SIZE, b"\0") + device.read_bytes()[raw.HEADER_SIZE :])
    out = raw.recover(device, work / "crash")
    assert out.parent == work / "crash"
    assert (out / "vmcore").read_bytes() == dump


@pytest.fixture
def attach() -> Iterator[Callable[[Path], Path]]:
    """Loop devices over device files, detached after the test."""
    nodes: list[str] = []

    def attach(path: Path) -> Path:
        node = subprocess.run(["losetup", "--find", "--show", str(path)], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        nodes.append(node)
        return Path(node)

    yield attach
    for node in nodes:
        subprocess.run(["losetup", "-d", node], check=False)


@pytest.fixture
def loop(work: Path, attach: Callable[[Path], Path]) -> tuple[Path, bytes]:  # noqa: F811
    """A loop device over a file the capture hook wrote a complete dump onto."""
    device, dump = captured(work)
    return attach(device), dump


def register_args(work: Path, config: str) -> list[str]:  # noqa: F811
    (work / "kdump.yaml").write_text(config)
    # No kernel image anywhere for this version: register fails, but only after recovering.
    return ["register", "-c", str(work / "kdump.yaml"), "-k", "0.0.0-no-such-kernel",
            "--kmoddir", str(work / "modules"), "--image", str(work / "kdump.img")]  # fmt: skip


def test_register_recovers_raw_targets_first(
    work: Path,  # noqa: F811
    loop: tuple[Path, bytes],
    capsys: pytest.CaptureFixture[str],
) -> None:
    node, dump = loop
    crash = work / "var-crash"
    config = f"targets:\n  - {{type: raw, device: {node}, recover_to: {crash}}}\n"
    assert main(register_args(work, config)) == 1
    err = capsys.readouterr().err
    (out,) = crash.iterdir()
    assert f"kdump-mkinitrd: raw target raw:{node}: recovered the dump on {node} into {out}" in err
    assert (out / "vmcore").read_bytes() == dump
    assert raw.read_header(node) is None
    # The next boot finds nothing to do.
    assert main(register_args(work, config)) == 1
    assert "recovered" not in capsys.readouterr().err
    assert len(list(crash.iterdir())) == 1


def test_register_says_when_a_raw_dump_could_not_be_recovered(
    work: Path,  # noqa: F811
    loop: tuple[Path, bytes],
    capsys: pytest.CaptureFixture[str],
) -> None:
    node, _ = loop
    blocker = work / "not-a-folder"
    blocker.write_text("")
    config = f"targets:\n  - {{type: raw, device: {node}, recover_to: {blocker}}}\n"
    assert main(register_args(work, config)) == 1
    err = capsys.readouterr().err
    assert (
        f"kdump-mkinitrd: error: raw target raw:{node}: cannot make a folder under {blocker}" in err
    )
    header = raw.read_header(node)
    assert header is not None and header.complete


def test_register_leaves_an_incomplete_dump_alone(
    work: Path,  # noqa: F811
    attach: Callable[[Path], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_capture(work, ["first"], None, CAPTURE).returncode == 1
    device = work / "dev/first"
    before = device.read_bytes()
    node = attach(device)
    config = f"targets:\n  - {{type: raw, device: {node}, recover_to: {work / 'crash'}}}\n"
    assert main(register_args(work, config)) == 1
    assert "holds an incomplete dump" in capsys.readouterr().err
    assert device.read_bytes() == before
    assert not (work / "crash").exists()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("{type: raw, device: /dev/vdb, recover_to: var/crash}",
         "raw.yaml:2: key 'targets[0].recover_to': must be an absolute path, got 'var/crash'"),
        ("{type: raw, device: /dev/vdb, recover_to: /var/../etc}",
         "raw.yaml:2: key 'targets[0].recover_to': must not contain '..'"),
        ("{type: disk, device: /dev/vdb, fstype: ext4, recover_to: /x}",
         "raw.yaml:2: key 'targets[0].recover_to': only raw targets take this key"),
        ("{type: raw, device: /dev/vdb, recover_to: 3}",
         "raw.yaml:2: key 'targets[0].recover_to': expected a string, got 3"),
    ],
)  # fmt: skip
def test_recover_to_is_validated(target: str, message: str) -> None:
    with pytest.raises(KdumpError) as exc:
        parse(f"targets:\n  - {target}\n", "raw.yaml")
    assert str(exc.value).startswith(message)


def test_recover_to_defaults_to_var_crash() -> None:
    config = parse("targets:\n  - {type: raw, device: /dev/vdb}\n", "raw.yaml")
    target = config.targets[0]
    assert isinstance(target, RawTarget) and target.recover_to == "/var/crash"
