"""Nothing in the config can run as code in the init: hostile strings in every value the
config passes into the rendered shell arrive as exactly one argument, byte for byte, and no
command but the intended ones runs. The hooks run under the real busybox sh; only commands
with side effects on this machine (mount, mkdir, makedumpfile, ...) are replaced by recorders."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.config import parse
from builder.errors import KdumpError
from builder.features import BUILTIN_DIR
from builder.render import render
from builder.resolve import CaptureSettings

RECORDED = ("mount", "umount", "mkdir", "mv", "makedumpfile", "dd", "sync", "cp", "stat",
            "sha256sum", "date", "uname", "wait_for_device")  # fmt: skip
# Shell functions win over busybox's built-in applets, so these record instead of acting.
OUTPUT = {"date": "2026-01-01-00:00:00", "stat": "42", "sha256sum": "0000  x",
          "uname": "6.1.0-test", "wait_for_device": "/dev/vdz"}  # fmt: skip
STUBS = "".join(
    f'{name}() {{ printf \'%s\\0\' $# {name} "$@" >> "$KDUMP_RECORD"; '
    f"{'echo ' + OUTPUT[name] if name in OUTPUT else ':'}; }}\n"
    for name in RECORDED
)
# Control characters and a '/' in a label or '..' in a path are config errors (see
# test_config), so every hostile string here is one that parse accepts.
TOKENS = [
    *"ab/ '\"$()`;&|<>*?~{}!#\\=-",
    "$(touch pwned)",
    "`touch pwned`",
    "'; touch pwned; '",
]
HOSTILE = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=12).map("".join)
LABEL = HOSTILE.map(lambda s: s.replace("/", "_"))
# What parse leaves open for these keys: still the characters that matter to mount and mkdir.
OPTIONS = st.from_regex(r"[A-Za-z0-9_.=:/-]{1,8}(,[A-Za-z0-9_.=:/-]{1,8}){0,3}", fullmatch=True)
HOSTNAME = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)


def render_hooks(device: str, path: str, options: str, hostname: str) -> str:
    text = yaml.safe_dump(
        {
            "targets": [
                {"type": "disk", "device": "LABEL=" + device, "fstype": "ext4",
                 "path": "/" + path.replace("..", "_"), "mount_options": options},
                {"type": "raw", "device": "LABEL=" + device},
            ],
        }
    )  # fmt: skip
    config = parse(text, "hostile.yaml")
    capture = CaptureSettings(
        "static", "makedumpfile", 31, "lzo", "-l", hostname, None, "/usr/bin/makedumpfile"
    )
    context = {"config": config, "capture": capture, "python": None, "kver": "6.1.0-test"}
    parts = []
    for folder, name in (("capture", "capture-lib.sh.j2"), ("disk", "disk-target.sh.j2"),
                         ("raw", "raw-target.sh.j2")):  # fmt: skip
        parts.append(render(BUILTIN_DIR / folder / name, context))
    return "\n".join(parts)


def run_hooks(tmp: Path, script: str, call: str) -> list[list[str]]:
    record = tmp / "record"
    record.write_bytes(b"")
    harness = "log() { :; }\nKDUMP_LOG=/nonexistent\nDEVICE_TIMEOUT=1\nKDUMP_TARGET_NAME=t\n"
    (tmp / "hooks.sh").write_text(STUBS + harness + script + "\n" + call + "\n")
    subprocess.run(["/bin/busybox", "sh", str(tmp / "hooks.sh")], cwd=tmp, check=False, timeout=30,
                   env={"PATH": "/nonexistent", "KDUMP_RECORD": str(record), "HOME": str(tmp)},
                   capture_output=True)  # fmt: skip
    # Each call is recorded as: argument count, name, arguments, each ending in NUL.
    tokens = record.read_text().split("\0")[:-1]
    calls = []
    while tokens:
        count = int(tokens[0])
        calls.append(tokens[1 : count + 2])
        tokens = tokens[count + 2 :]
    return calls


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(device=LABEL, path=HOSTILE, options=OPTIONS, hostname=HOSTNAME)
def test_hostile_values_stay_single_arguments(
    tmp_path: Path, device: str, path: str, options: str, hostname: str
) -> None:
    work = tmp_path / os.urandom(4).hex()
    work.mkdir()
    script = render_hooks(device, path, options, hostname)
    calls = run_hooks(work, script, "kdump_target_0")
    assert not (work / "pwned").exists()
    names = [c[0] for c in calls]
    assert set(names) <= set(RECORDED), names
    assert calls[0] == ["wait_for_device", "LABEL=" + device, "1"]
    mount = next(c for c in calls if c[0] == "mount")
    assert mount == ["mount", "-t", "ext4", "-o", options, "/dev/vdz", "/run/kdump/mnt/0"]
    target_path = "/" + path.replace("..", "_")
    mkdirs = [c for c in calls if c[0] == "mkdir"]
    assert mkdirs[-1] == [
        "mkdir",
        "-m",
        "0700",
        f"/run/kdump/mnt/0{target_path}/{hostname}-2026-01-01-00:00:00",
    ]
    assert any(c[0] == "makedumpfile" and c[-1].endswith("/vmcore.incomplete") for c in calls)
    raw = run_hooks(work, script, "kdump_target_1")
    assert not (work / "pwned").exists()
    assert raw[0] == ["wait_for_device", "LABEL=" + device, "1"]


def test_nul_and_long_values() -> None:
    with pytest.raises(KdumpError, match="NUL"):
        parse(yaml.safe_dump({"capture": {"hostname": "a\0b"}}), "nul.yaml")
    long = "x" * 100_000
    script = render_hooks(long, long, long, "h" * 64)
    assert script.count(long) >= 4  # rendered whole, each inside one quoted word
