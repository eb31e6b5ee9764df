"""Target types are plug-ins: every registered type has its feature folder and template, the
generic code names targets through the registry, and a new type added as one Python module and
one modules.d folder (in a copy of the tree, nothing else edited) is parsed, checked with
located errors, named, and built into a real image with what it asks for."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdump_mkinitrd.arming import kexec, registration
from kdump_mkinitrd.arming.sshsetup import ensure_key
from kdump_mkinitrd.config import TARGET_TYPES, load, parse
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.build import BuildRequest, build
from kdump_mkinitrd.image.features import discover
from kdump_mkinitrd.targets import TYPES
from tests import init_sandbox
from tests.conftest import Kernel

REPO = Path(__file__).resolve().parent.parent

# One target of each type; a new type adds its own here.
EXAMPLES = {
    "disk": "{type: disk, device: UUID=2f6e0e4c-8a53, fstype: ext4}",
    "raw": "{type: raw, device: /dev/vdb}",
    "nfs": "{type: nfs, export: '10.0.2.2:/srv/crash'}",
    "ssh": "{type: ssh, host: kdump@10.0.2.2, path: /srv/crash}",
}


def test_every_type_has_an_example_here() -> None:
    assert set(EXAMPLES) == set(TYPES) == set(TARGET_TYPES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_type_has_its_feature_folder_and_template(name: str) -> None:
    feature = discover()[name]
    assert feature.folder == REPO / "modules.d" / name
    assert feature.target_types == (name,)
    # A local target first, so that the type's own target is number 1 in run-targets.
    config = parse(
        f"targets:\n  - {EXAMPLES['raw']}\n  - {EXAMPLES[name]}\ncapture: {{stage: static}}\n",
        "k.yaml",
    )
    target = config.targets[1]
    assert type(target) is TYPES[name] and target.type == name
    rendered = init_sandbox.render_image(config).files
    hooks = [t.dst for t in feature.templates if t.dst.startswith("/lib/kdump/hooks/")]
    assert hooks and "kdump_target_1() {" in "".join(rendered[h] for h in hooks)
    run_targets = rendered["/lib/kdump/hooks/60-run-targets.sh"]
    assert f"KDUMP_TARGET_NAME={target.name}\n" in run_targets.replace("'", "")
    # The network comes with the types that use it, and only then.
    assert ("/lib/kdump/hooks/20-network.sh" in rendered) == target.network


def test_feature_modules_serve_the_types_that_use_them(tmp_path: Path) -> None:
    """network and python-stage name no type: each type lists them in `uses`."""
    features = discover()
    for feature in ("network", "python-stage"):
        users = {n for n, kind in TYPES.items() if feature in kind.uses}
        assert features[feature].used_by_targets and users
        config = parse("targets:\n" + "".join(f"  - {EXAMPLES[n]}\n" for n in TYPES), "k.yaml")
        assert {t.type for t in features[feature].targets(config)} == users
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/module.yaml").write_text("name: mine\nwhen: {used_by_targets: yes please}\n")
    with pytest.raises(KdumpError, match="'when: used_by_targets' must be true or false"):
        discover((tmp_path,))


def test_foreign_keys_name_the_type_that_takes_them() -> None:
    for name, kind in TYPES.items():
        for key, spec in kind.schema.items():
            other = "raw" if name != "raw" else "disk"
            # A value its Field takes, so that only the type can refuse it.
            value = (spec.choices[0] if spec.choices else 1 if spec.kind is int
                     else "[]" if spec.kind is list else "/x")  # fmt: skip
            text = f"targets:\n  - {EXAMPLES[other][:-1]}, {key}: {value}}}\n"
            with pytest.raises(KdumpError) as err:
                parse(text, "k.yaml")
            expected = f"k.yaml:2: key 'targets[0].{key}': only {name} targets take this key"
            assert str(err.value) == expected


def test_status_names_every_target_by_its_display_name(
    tmp_path: Path, kernel61: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status` lists ssh and nfs targets with their host and export, as the logs do."""
    key = tmp_path / "id_ed25519"
    ensure_key(key)
    ensure_key(tmp_path / "host_key")
    host_blob = (tmp_path / "host_key.pub").read_text().split()[1]
    (tmp_path / "known_hosts").write_text(f"10.0.2.2 ssh-ed25519 {host_blob}\n")
    config_path = tmp_path / "kdump.yaml"
    config_path.write_text(
        f"targets:\n  - {EXAMPLES['raw']}\n  - {EXAMPLES['nfs']}\n"
        f"  - {{type: ssh, host: kdump@10.0.2.2, path: /srv/crash, identity: {key}, "
        f"known_hosts: {tmp_path / 'known_hosts'}}}\n"
        "kernel_modules: [virtio_net]\ncapture: {stage: static}\n"
    )
    image = tmp_path / "kdump.img"
    request = BuildRequest(kernel61.kver, kernel61.kmoddir, image, kernel61.vmlinuz)
    build(load(config_path), request)
    state = tmp_path / "state"
    state.mkdir()
    (state / "loaded.json").write_text(json.dumps(dict(
        kver=kernel61.kver, kernel=str(kernel61.vmlinuz), image=str(image),
        kmoddir=str(kernel61.kmoddir), config=str(config_path), cmdline="", hostonly=False,
    )))  # fmt: skip
    monkeypatch.setenv("KDUMP_MKINITRD_STATE_DIR", str(state))
    sysfs = tmp_path / "sys/kernel"
    sysfs.mkdir(parents=True)
    (sysfs / "kexec_crash_size").write_text(f"{256 << 20}\n")
    (sysfs / "kexec_crash_loaded").write_text("1\n")
    monkeypatch.setattr(registration, "crash_status", lambda: kexec.crash_status(sysfs))
    code, info = registration.status(load)
    assert (code, info["stale_because"]) == (registration.EXIT_OK, [])
    assert info["targets"] == [
        "raw:/dev/vdb",
        "nfs:10.0.2.2:/srv/crash /var/crash",
        "ssh:kdump@10.0.2.2:/srv/crash",
    ]


TFTP_MODULE = '''\
"""tftp targets: a type that exists only in this test, to show what a new type is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kdump_mkinitrd.schema import Checker, Field
from kdump_mkinitrd.targets.base import NETWORK, ImageFile, Target, register

if TYPE_CHECKING:
    from kdump_mkinitrd.config import Config


@register
@dataclass(frozen=True, kw_only=True)
class TftpTarget(Target):
    type: ClassVar[str] = "tftp"
    schema: ClassVar[dict[str, Field]] = {"server": Field(str)}
    takes: ClassVar[frozenset[str]] = frozenset({"path"})
    uses: ClassVar[frozenset[str]] = frozenset({NETWORK})

    server: str

    @property
    def name(self) -> str:
        return f"tftp:{self.server}:{self.path}"

    @classmethod
    def check(cls, checker: Checker, key: str, values: dict[str, Any]) -> None:
        cls.require(checker, key, values, "server", " (a host)")

    def hostonly_server(self) -> tuple[str, str] | None:
        return "server", self.server

    def image_files(self, config: Config, index: int, root: Path) -> list[ImageFile]:
        data = f"{self.server}\\n".encode()
        origin = Path(config.source)
        return [ImageFile("tftp", f"/etc/tftp/{index}", data, origin, "tftp target server")]
'''
TFTP_MANIFEST = """\
name: tftp
description: Dump with busybox tftp (test only).
depends: [network, capture]
when:
  target_types: [tftp]
templates:
  - {src: tftp-target.sh.j2, dst: /lib/kdump/hooks/40-tftp-target.sh, mode: "0644"}
"""
TFTP_TEMPLATE = """\
{% for target in config.targets %}
{% if target.type == "tftp" %}
kdump_target_{{ loop.index0 }}() {
    kdump_network_up || return 1
    tftp -p -l /proc/vmcore -r {{ target.path }}/vmcore {{ target.server }}
}
{% endif %}
{% endfor %}
"""
# Runs in the copied tree: what the new type changed, as JSON.
PROBE = """\
import json, sys
from pathlib import Path
import kdump_mkinitrd
from kdump_mkinitrd import config as config_mod
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan.hostonly import network_servers
from kdump_mkinitrd.image.build import BuildRequest, build
from kdump_mkinitrd.image.inspect_image import load_image

kver, kmoddir, vmlinuz, work = sys.argv[1:]
out = {"package": kdump_mkinitrd.__file__, "types": list(config_mod.TARGET_TYPES), "errors": []}
for text in ("targets: [{type: tftp}]", "targets: [{type: raw, device: /dev/vdb, server: h}]"):
    try:
        config_mod.parse(text, "k.yaml")
    except KdumpError as exc:
        out["errors"].append(str(exc))
text = "targets: [{type: tftp, server: 10.0.2.2, path: /dumps}]\\ncapture: {stage: static}\\n"
(Path(work) / "kdump.yaml").write_text(text)
config = config_mod.load(Path(work) / "kdump.yaml")
out["name"] = config.targets[0].name
out["servers"] = network_servers(config)
image = Path(work) / "kdump.img"
build(config, BuildRequest(kver, Path(kmoddir), image, Path(vmlinuz)))
loaded = load_image(image)
out["paths"] = loaded.manifest["paths"]
out["features"] = [f["name"] for f in loaded.manifest["features"]]
out["server_file"] = next(m.data.decode() for m in loaded.members if m.path == "etc/tftp/0")
print(json.dumps(out))
"""


def test_a_new_type_is_one_module_and_one_folder(tmp_path: Path, kernel61: Kernel) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "builder", tree / "kdump_mkinitrd",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for data in ("modules.d", "templates"):
        shutil.copytree(REPO / data, tree / data)
    (tree / "kdump_mkinitrd/targets/tftp.py").write_text(TFTP_MODULE)
    (tree / "modules.d/tftp").mkdir()
    (tree / "modules.d/tftp/module.yaml").write_text(TFTP_MANIFEST)
    (tree / "modules.d/tftp/tftp-target.sh.j2").write_text(TFTP_TEMPLATE)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, kernel61.kver, str(kernel61.kmoddir),
         str(kernel61.vmlinuz), str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1"),
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["package"] == str(tree / "kdump_mkinitrd/__init__.py")
    assert out["types"] == ["disk", "nfs", "raw", "ssh", "tftp"]
    assert out["errors"] == [
        "k.yaml:1: key 'targets[0]': a tftp target needs 'server' (a host)",
        "k.yaml:1: key 'targets[0].server': only tftp targets take this key",
    ]
    assert out["name"] == "tftp:10.0.2.2:/dumps"
    assert out["servers"] == [["targets[0].server", "10.0.2.2"]]
    # Its template, the network it uses, and the file it made, each under its feature.
    # (/lib is a link to /usr/lib in the image, as on the host.)
    assert out["paths"]["/usr/lib/kdump/hooks/40-tftp-target.sh"]["feature"] == "tftp"
    assert out["paths"]["/etc/tftp/0"] == {"feature": "tftp", "why": "tftp target server"}
    assert {"tftp", "network"} <= set(out["features"])
    assert out["server_file"] == "10.0.2.2\n"
