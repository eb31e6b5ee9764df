"""vmcore.json has one schema (builder/capture/vmcore_json.py), documented in kdump-mkinitrd(8):
every writer's output is checked against it, the failure paths included. The static shell
capture's own runs are in tests/test_capture_lib_sh.py and tests/test_dump_rotation.py;
ssh and the QEMU captures are checked by qemu-test's verify_dump."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdump_mkinitrd.capture.vmcore_json import FIELDS, base_record, problems
from kdump_mkinitrd.dumps.rawrecovery import HEADER_SIZE, MAGIC, recover
from tests.test_capture_lib_sh import capture_hooks, run_sh
from tests.test_vmcore import base_memory, build_elf, prb_core

REPO = Path(__file__).resolve().parent.parent
MAKEDUMPFILE = shutil.which("makedumpfile")
needs_makedumpfile = pytest.mark.skipif(MAKEDUMPFILE is None, reason="needs makedumpfile")


def test_schema_rejects_what_the_old_writers_wrote() -> None:
    # The static capture's record after a failed sync, before the fix: not even JSON.
    with pytest.raises(ValueError):
        json.loads('{"vmcore_size": ,\n "sha256": ""}')
    # recover-raw's old record: no hostname, crash time or tool, dump_level a string.
    old_raw = {"stage": "static", "complete": True, "collector": "dd", "format": "elf",
               "dump_level": "31", "kernel_release": "6.1", "vmcore_size": 1,
               "sha256": "0" * 64, "target": "raw:/dev/vdb"}  # fmt: skip
    found = problems(old_raw)
    assert "dump_level: string, expected integer" in found
    assert {"tool: missing", "hostname: missing", "crash_time: missing"} <= set(found)
    assert problems([]) == ["not an object but list"]
    good = base_record("static", "h", "t") | {
        "collector": "dd", "format": "elf", "dump_level": 0, "kernel_release": "r",
        "vmcore_size": 0, "sha256": "a" * 64, "crash_time": None}  # fmt: skip
    assert problems(good) == []
    assert problems(good | {"complete": 1}) == ["complete: integer, expected boolean"]
    assert problems(good | {"sha256": "A" * 64}) != []
    assert problems(good | {"extra": 1}) == ["extra: not in the schema"]
    assert problems(good | {"uptime_start": 3}) == []  # a whole number is a number too


# -- the Python stage -------------------------------------------------------------------------


def run_stage(tmp: Path, core: bytes, collector: str) -> subprocess.CompletedProcess[str]:
    (tmp / "vmcore").write_bytes(core)
    (tmp / "dump").mkdir()
    argv = [sys.executable, "-m", "kdump_mkinitrd.capture.stage", "--dir", str(tmp / "dump"),
            "--vmcore", str(tmp / "vmcore"), "--collector", collector, "--hostname", "web1",
            "--target", 'disk:"UUID=x"\\', "--makedumpfile", MAKEDUMPFILE or "",
            "--flag", "-l", "--dump-level", "1"]  # fmt: skip
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("collector", ["native", pytest.param("makedumpfile",
                                       marks=needs_makedumpfile)])  # fmt: skip
def test_python_stage_record(collector: str, tmp_path: Path) -> None:
    run = run_stage(tmp_path, prb_core(fill=True), collector)
    assert run.returncode == 0, run.stdout + run.stderr
    record = json.loads((tmp_path / "dump" / "vmcore.json").read_text())
    assert problems(record) == [], record
    assert record["stage"] == "python" and record["crash_time"] == 1700000000
    assert record["target"] == 'disk:"UUID=x"\\' and record["hostname"] == "web1"
    assert record["vmcore_size"] == (tmp_path / "dump" / "vmcore").stat().st_size


def test_python_stage_record_without_a_kernel_log(tmp_path: Path) -> None:
    """The failure path the stage survives: no printk symbols, so dmesg_error is recorded."""
    mem, info = base_memory("6.0.0-synthetic")
    run = run_stage(tmp_path, build_elf(mem, info), "native")
    assert run.returncode == 0, run.stdout + run.stderr
    record = json.loads((tmp_path / "dump" / "vmcore.json").read_text())
    assert problems(record) == [], record
    assert "dmesg_error" in record and record["crash_time"] is None


def test_python_stage_that_fails_leaves_no_record(tmp_path: Path) -> None:
    run = run_stage(tmp_path, b"not an ELF file", "native")
    assert run.returncode == 1
    assert not (tmp_path / "dump" / "vmcore.json").exists()


# -- the static shell capture's kdump_json (also the ssh target's) ---------------------------

# Any text a YAML config can hold (valid UTF-8, so no surrogates), NUL aside.
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=30)


@settings(max_examples=25, deadline=None)
@given(hostname=TEXT, target=TEXT)
def test_shell_record_is_valid_json_whatever_the_names(
    hostname: str, target: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("json")
    script = capture_hooks("", hostname=hostname) + (
        f"KDUMP_TARGET_NAME=$(cat '{tmp}/target')\n"
        f"kdump_json dd elf 123 {'ab' * 32} 1.25 7.50 1700000000\n"
    )
    (tmp / "target").write_text(target)
    run = run_sh(tmp, script)
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert problems(record) == [], record

    def flat(text: str) -> str:  # tabs and newlines become spaces, other controls go
        text = text.replace("\t", " ").replace("\n", " ")
        return "".join(c for c in text if ord(c) >= 0x20 and c != "\x7f")

    assert record["hostname"] == flat(hostname)
    assert record["target"] == flat(target).rstrip(" ") or record["target"] == flat(target)
    assert record["crash_time"] == 1700000000 and record["uptime_end"] == 7.5


@pytest.mark.parametrize("args", [
    ["dd", "elf", "", "ab" * 32, "1.0", "2.0", ""],  # stat failed: no size
    ["dd", "elf", "12", "", "1.0", "2.0", ""],  # sha256sum failed
    ["dd", "elf", "12", "xyz", "1.0", "2.0", ""],
    ["dd", "elf", "12", "ab" * 32, "", "2.0", ""],
    ["dd", "elf", "12", "ab" * 32, "1.0", "2.0", "soon"],
])  # fmt: skip
def test_shell_record_refuses_what_a_failed_step_gives(args: list[str], tmp_path: Path) -> None:
    words = " ".join(f"'{a}'" for a in args)
    run = run_sh(tmp_path, capture_hooks("") + f"kdump_json {words} || echo REFUSED\n")
    assert run.stdout == "REFUSED\n", run.stdout


# -- recover-raw ----------------------------------------------------------------------------


def raw_device(path: Path, core: bytes, state: str, fmt: str = "elf", **extra: str) -> None:
    """A raw target as the init's raw step leaves it: header, kernel log, then the dump."""
    fields = {"state": state, "hostname": "web1", "stamp": "2026-01-01-00:00:00",
              "kernel_release": "6.0.0-synthetic", "collector": "dd", "format": fmt,
              "dump_level": "31", "dump_offset": str(1 << 20), "dump_size": str(len(core)),
              "dmesg_offset": "4096", "dmesg_size": "6"} | extra  # fmt: skip
    header = "\n".join([MAGIC, *(f"{k}={v}" for k, v in fields.items())]) + "\n"
    with path.open("wb") as f:
        f.write(header.encode().ljust(HEADER_SIZE, b"\0"))
        f.write(b"dmesg\n")
        f.seek(1 << 20)
        f.write(core)


@pytest.mark.parametrize("state", ["complete", "incomplete"])
def test_recover_raw_record(state: str, tmp_path: Path) -> None:
    core = prb_core(fill=True)
    raw_device(tmp_path / "dev", core, state)
    out = recover(tmp_path / "dev", tmp_path / "crash")
    record = json.loads((out / "vmcore.json").read_text())
    assert problems(record) == [], record
    assert record["complete"] is (state == "complete")
    assert record["crash_time"] == 1700000000 and record["hostname"] == "web1"
    assert record["dump_level"] == 31 and record["recovered_from"] == str(tmp_path / "dev")


@needs_makedumpfile
def test_recover_raw_record_of_a_flattened_dump(tmp_path: Path) -> None:
    (tmp_path / "core").write_bytes(prb_core(fill=True))
    flat = subprocess.run([str(MAKEDUMPFILE), "-F", "-l", "-d", "1", str(tmp_path / "core")],
                          capture_output=True, check=True).stdout  # fmt: skip
    raw_device(tmp_path / "dev", flat, "complete", "flattened", collector="makedumpfile")
    out = recover(tmp_path / "dev", tmp_path / "crash")
    record = json.loads((out / "vmcore.json").read_text())
    assert problems(record) == [], record
    assert record["format"] == "kdump-compressed" and record["crash_time"] is None


# -- the man page lists exactly the schema's fields -----------------------------------------


def test_man_page_documents_every_field() -> None:
    page = (REPO / "system" / "man" / "kdump-mkinitrd.8").read_text()
    section = page.split(".SH VMCORE.JSON\n", 1)[1].split("\n.SH ", 1)[0]
    documented = re.findall(r"^\.TP\n\.B (\w+)$", section, re.M)
    assert documented == list(FIELDS)
    for name, (_types, required) in FIELDS.items():
        entry = section.split(f".TP\n.B {name}\n", 1)[1].split("\n.TP", 1)[0]
        assert ("optional" in entry.lower()) is not required, name
