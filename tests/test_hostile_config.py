"""Nothing in the config can run as code in the init: hostile strings in every value the
config passes into the rendered shell arrive as exactly one argument, byte for byte, and no
command but the intended ones runs. The hooks run under the real busybox sh; only commands
with side effects on this machine (mount, mkdir, makedumpfile, ...) are replaced by recorders."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdump_mkinitrd import storage
from kdump_mkinitrd.config import parse
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.render import render
from kdump_mkinitrd.image.resolve import CaptureSettings
from kdump_mkinitrd.paths import MODULES_DIR

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
    context = {"config": config, "capture": capture, "python": None, "kver": "6.1.0-test",
               "layers": storage.shell_calls(config.targets)}  # fmt: skip
    parts = []
    for folder, name in (("capture", "capture-lib.sh.j2"), ("disk", "disk-target.sh.j2"),
                         ("raw", "raw-target.sh.j2")):  # fmt: skip
        parts.append(render(MODULES_DIR / folder / name, context))
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


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=HOSTILE, export=HOSTILE, client=st.sampled_from(["openssh", "dropbear"]))
def test_hostile_paths_reach_nfs_and_the_ssh_remote_shell_intact(
    tmp_path: Path, path: str, export: str, client: str
) -> None:
    """An ssh target's path goes through two shells (the init's, then the server's, which
    gets the remote words joined by spaces): it must arrive as the same bytes, and run
    nothing. The init runs in a chroot sandbox (tests/init_sandbox.py) whose remote shell is
    busybox's `sh -c`, as sshd would run it."""
    from tests import init_sandbox

    if not init_sandbox.can_chroot():
        pytest.skip("needs root for chroot")
    path = "/" + path.replace("..", "_")
    export = "/" + export.replace("..", "_")
    text = yaml.safe_dump({
        "targets": [{"type": "ssh", "host": "kdump@10.0.2.2", "path": path, "client": client},
                    {"type": "nfs", "export": "nas.example.org:" + export, "path": path}],
        "capture": {"stage": "static", "collector": "makedumpfile", "hostname": "web1"},
    })  # fmt: skip
    config = parse(text, "hostile.yaml")
    root = tmp_path / os.urandom(4).hex()
    rendered = init_sandbox.render_image(config)
    init_sandbox.make_sandbox(root, rendered)
    # The nfs mount records its arguments: server:export must be one word, as given.
    calls = ('mount() { [ "$1" = -t ] && [ "$2" = nfs ] && printf "%s\\n" "$5" > /nfs-source; }\n'
             "KDUMP_TARGET_NAME=ssh\nkdump_target_0\necho \"sandbox: ssh $?\"\n"
             "KDUMP_TARGET_NAME=nfs\nkdump_target_1\necho \"sandbox: nfs $?\"\n")  # fmt: skip
    run = init_sandbox.run_sandbox(root, init_sandbox.driver(rendered, calls))
    try:
        assert init_sandbox.shell_errors(run.stderr) == [], run.stderr
        assert "sandbox: ssh 0" in run.stdout and "sandbox: nfs 0" in run.stdout, run.stdout
        assert not (root / "pwned").exists()
        remote = [p for p in (root / path.lstrip("/")).glob("web1-*") if (p / "vmcore").is_file()]
        assert remote  # (the init's own run of the targets made one too: a .1 beside it)
        assert (root / "nfs-source").read_text() == f"nas.example.org:{export}\n"
        local = root / f"run/kdump/mnt/1{path}"
        assert [p for p in local.glob("web1-*") if (p / "vmcore").is_file()]
    finally:
        init_sandbox.remove(root)


@pytest.mark.parametrize(
    ("network", "key"),
    [({"interface": "eth0;reboot"}, "network.interface"),
     ({"interface": "$(reboot)"}, "network.interface"),
     ({"mac": "52:54:00:12:34:5'"}, "network.mac"),
     ({"dhcp": False, "address": "10.0.2.15/24 ;reboot"}, "network.address"),
     ({"dhcp": False, "address": "10.0.2.15/24", "gateway": "`reboot`"}, "network.gateway"),
     ({"dns": ["10.0.2.3\nreboot"]}, "network.dns[0]")],
)  # fmt: skip
def test_hostile_network_values_are_refused(network: dict[str, object], key: str) -> None:
    """Network keys reach `ip` and resolv.conf: each takes only its own syntax, so nothing
    with a shell character gets that far."""
    text = yaml.safe_dump(
        {"targets": [{"type": "nfs", "export": "10.0.2.2:/srv"}], "network": network}
    )
    with pytest.raises(KdumpError, match=f"key '{re.escape(key)}'"):
        parse(text, "hostile.yaml")
