"""Any config that `parse` accepts renders an init the capture kernel can run: every rendered
script passes `sh -n` under the real busybox, and every target step, run in a chroot sandbox
(tests/init_sandbox.py), finishes without a shell error and leaves its dump where the config
says, under exactly the path bytes it names (through the ssh remote shell too), with a
vmcore.json that is valid JSON."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kdump_mkinitrd.config import Config, parse
from kdump_mkinitrd.errors import KdumpError
from tests import init_sandbox

pytestmark = pytest.mark.skipif(not init_sandbox.can_chroot(), reason="needs root for chroot")

# Shell's own characters: the permissive keys (paths, labels, export paths) take them all.
TOKENS = [
    *"ab/ '\"$()`;&|<>*?~{}!#\\=-%",
    "$(touch /pwned)",
    "`touch /pwned`",
    "'; touch /pwned; '",
]
HOSTILE = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=10).map("".join)
PATH = HOSTILE.map(lambda s: "/" + s.replace("..", "_"))
OPTIONS = st.one_of(
    st.just("defaults"),
    st.from_regex(r"[A-Za-z0-9_.=:/-]{1,8}(,[A-Za-z0-9_.=:/-]{1,8}){0,2}", fullmatch=True),
)
DEVICE = st.one_of(
    st.sampled_from(["/dev/vdb", "/dev/disk/by-id/virtio-crash", "UUID=2f6e0e4c-8a53-4bd8",
                     "PARTUUID=5a7b3c1d-0a"]),
    HOSTILE.map(lambda s: "LABEL=" + s.replace("/", "_")),
)  # fmt: skip


def _disk() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"type": st.just("disk"), "device": DEVICE, "fstype": st.sampled_from(["ext4", "xfs"])},
        optional={"path": PATH, "mount_options": OPTIONS},
    )


def _raw() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"type": st.just("raw"), "device": DEVICE})


def _nfs() -> st.SearchStrategy[dict[str, Any]]:
    server = st.sampled_from(["10.0.2.2", "nas.example.org"])
    export = st.builds(lambda s, p: f"{s}:{p}", server, PATH)
    return st.fixed_dictionaries(
        {"type": st.just("nfs"), "export": export},
        optional={"path": PATH, "mount_options": OPTIONS},
    )


def _ssh() -> st.SearchStrategy[dict[str, Any]]:
    host = st.sampled_from(["kdump@10.0.2.2", "backup.example.org", "a_b@h-1"])
    return st.fixed_dictionaries(
        {"type": st.just("ssh"), "host": host},
        optional={"port": st.integers(1, 65535), "path": PATH,
                  "client": st.sampled_from(["openssh", "dropbear"])},
    )  # fmt: skip


# Mostly host names, sometimes what parse must refuse (it names the dump folders).
HOSTNAME = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,30}", fullmatch=True),
    st.sampled_from(["web1.example.org", "a/b", "../x", "web 1", "..", "-rf"]),
)
NETWORK = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"interface": st.sampled_from(["eth0", "ens3"]), "dns": st.just([]),
                      "timeout": st.integers(1, 3600), "vlan": st.integers(1, 4094)}),
    st.fixed_dictionaries(
        {"dhcp": st.just(False), "address": st.just("10.0.2.15/24")},
        optional={"mac": st.just("52:54:00:12:34:56"), "gateway": st.just("10.0.2.2"),
                  "dns": st.lists(st.sampled_from(["10.0.2.3", "192.0.2.53"]), max_size=2)}),
)  # fmt: skip


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    targets = draw(st.lists(st.one_of(_disk(), _raw(), _nfs(), _ssh()), min_size=1, max_size=3))
    capture = draw(st.fixed_dictionaries(
        {"stage": st.sampled_from(["python", "static"]),
         "collector": st.sampled_from(["auto", "makedumpfile", "native"])},
        optional={"hostname": HOSTNAME,
                  "min_free": st.integers(0, 1), "keep": st.integers(0, 100_000)}))  # fmt: skip
    if capture["collector"] != "native":
        capture["dump_level"] = draw(st.integers(0, 40))
    data: dict[str, Any] = {
        "targets": targets,
        "capture": capture,
        "device_timeout": draw(st.one_of(st.integers(1, 3600), st.integers(1, 10**30))),
        "failure_action": draw(st.sampled_from(["reboot", "poweroff", "halt", "shell"])),
        "final_action": draw(st.sampled_from(["reboot", "poweroff", "halt", "shell"])),
    }
    if any(t["type"] in ("nfs", "ssh") for t in targets):
        data["network"] = draw(NETWORK)
    return data


def _where(config: Config, i: int) -> str:
    """The folder (inside the sandbox) that target i's dump folders go into."""
    target = config.targets[i]
    return target.path if target.type == "ssh" else f"/run/kdump/mnt/{i}{target.path}"


def _calls(config: Config) -> str:
    lines = []
    for i, target in enumerate(config.targets):
        if target.type == "raw":
            # Every device is /dev/target here: empty it, as if each raw target had its own
            # (a raw device refuses to overwrite a complete dump nobody recovered).
            lines.append(": > /dev/target")
        lines += [f"KDUMP_TARGET_NAME={shlex.quote(target.name)}", "KDUMP_TARGET_PROBE=",
                  "KDUMP_TARGET_GONE=", f"kdump_target_{i}",
                  f'echo "sandbox: target {i} $?"']  # fmt: skip
    return "\n".join(lines) + "\n"


def check_config_runs(data: dict[str, Any], root: Path) -> None:
    try:
        config = parse(yaml.safe_dump(data), "generated.yaml")
    except KdumpError:
        assume(False)  # refused with a located error: nothing to render
        return
    rendered = init_sandbox.render_image(config)
    init_sandbox.make_sandbox(root, rendered)
    assert init_sandbox.syntax_errors(root, rendered) == {}
    run = init_sandbox.run_sandbox(root, init_sandbox.driver(rendered, _calls(config)))
    assert init_sandbox.shell_errors(run.stderr) == [], run.stderr
    assert not (root / "pwned").exists()
    for i, target in enumerate(config.targets):
        assert f"sandbox: target {i} 0" in run.stdout, run.stdout + run.stderr
        if target.type == "raw":
            header = (root / "dev/target").read_bytes()[:4096]
            assert header.startswith(b"KDUMP-MKINITRD-RAW 1\nstate=complete\n")
            continue
        # The dump folder is where the path says, byte for byte, and holds a whole dump.
        base = root / _where(config, i).lstrip("/")
        hostname = config.capture.hostname or "localhost"
        dumps = sorted(p for p in base.glob(f"{hostname}-*") if (p / "vmcore").is_file())
        assert dumps, (target, sorted(os.listdir(root)), run.stdout[-3000:])
        # ssh targets may share a folder: this one's dump is the one its record names.
        records = {json.loads((d / "vmcore.json").read_text())["target"]: d for d in dumps}
        assert target.name in records, (target.name, list(records))
        assert (records[target.name] / "vmcore").read_bytes() == init_sandbox.VMCORE


SLOW_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=60, deadline=None, suppress_health_check=SLOW_OK)
@given(data=configs())
def test_every_accepted_config_renders_an_init_that_runs(
    data: dict[str, Any], tmp_path: Path
) -> None:
    root = tmp_path / os.urandom(4).hex()
    try:
        check_config_runs(data, root)
    finally:
        init_sandbox.remove(root)


def test_the_sandbox_sees_a_shell_error(tmp_path: Path) -> None:
    """The check above would notice a broken step: an unquoted number test on an empty value."""
    config = parse("targets: [{type: raw, device: /dev/vdb}]\n", "k.yaml")
    rendered = init_sandbox.render_image(config)
    init_sandbox.make_sandbox(tmp_path, rendered)
    run = init_sandbox.run_sandbox(tmp_path, init_sandbox.driver(rendered, '[ "" -lt 1 ]\n'))
    assert init_sandbox.shell_errors(run.stderr) == ["sh: bad number"]
