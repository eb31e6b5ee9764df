"""Storage layers under disk targets, on this host: the `stack` key and its located errors,
the LVM layer inferred from the device's name, what the image gets for a layer (and why), and
the rendered capture code that brings a layer up. Real LVM volumes: tests/test_lvm_guest.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kdump_mkinitrd import storage
from kdump_mkinitrd.cli import main
from kdump_mkinitrd.config import parse
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.features import discover, select
from kdump_mkinitrd.image.inspect_image import report
from kdump_mkinitrd.storage.lvm import LvmLayer, split_dm_name
from tests import init_sandbox
from tests.conftest import REPO, Kernel
from tests.test_build import build_args


def _disk(extra: str, device: str = "/dev/crashvg/dump") -> str:
    return f"targets:\n  - type: disk\n    device: {device}\n    fstype: ext4\n{extra}"


def _error(text: str) -> str:
    with pytest.raises(KdumpError) as err:
        parse(text, "k.yaml")
    return str(err.value)


def test_every_layer_type_has_its_feature_folder_and_shell_function() -> None:
    features = discover()
    assert "lvm" in storage.TYPES
    for name, kind in storage.TYPES.items():
        feature = features[kind.feature]
        assert feature.layer_types == (name,) and not feature.target_types
        hooks = [t for t in feature.templates if t.dst.startswith("/lib/kdump/hooks/")]
        assert [t.dst for t in hooks] == [f"/lib/kdump/hooks/30-{kind.feature}-layer.sh"]
        assert f"kdump_layer_{name}() {{" in hooks[0].src.read_text()


def test_a_feature_module_names_known_layer_types(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/module.yaml").write_text("name: mine\nwhen: {layer_types: [lvmm]}\n")
    with pytest.raises(KdumpError, match=r"'when: layer_types' names no storage layer type: "
                       r"lvmm \(known: .*lvm"):  # fmt: skip
        discover((tmp_path,))


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("    stack: [{type: lvm, vg: crashvg}]\n",
         "k.yaml:5: key 'targets[0].stack[0]': an lvm layer needs 'lv'"),
        ("    stack:\n      - type: lvm\n        vg: crashvg\n        lv: dump\n        uuid: x\n",
         "k.yaml:9: key 'targets[0].stack[0].uuid': unknown key"),
        ("    stack: [{type: lvm, vg: -crash, lv: dump}]\n",
         "k.yaml:5: key 'targets[0].stack[0].vg': not an LVM volume group name: '-crash'"),
        ("    stack: [{type: lvm, vg: crashvg, lv: pool_tdata}]\n",
         "k.yaml:5: key 'targets[0].stack[0].lv': 'pool_tdata' is one of LVM's internal"),
        ("    stack: [{type: zfs}]\n", "k.yaml:5: key 'targets[0].stack[0].type': expected one of"),
        ("    stack: [lvm]\n", "k.yaml:5: key 'targets[0].stack[0]': expected a mapping"),
        ("    stack: {type: lvm}\n", "k.yaml:5: key 'targets[0].stack': expected a list"),
        ("    stack:\n      - {type: lvm, vg: crashvg, lv: dump}\n"
         "      - {type: lvm, vg: crashvg, lv: dump}\n",
         "k.yaml:7: key 'targets[0].stack[1]': lvm crashvg/dump is in this stack twice"),
        ("    stack: [{type: lvm, vg: crashvg, lv: other}]\n",
         "k.yaml:5: key 'targets[0].stack[0]': the device /dev/crashvg/dump is lvm "
         "crashvg/dump, but the top layer is lvm crashvg/other"),
    ],
)  # fmt: skip
def test_stack_errors_name_file_line_and_key(extra: str, expected: str) -> None:
    assert _error(_disk(extra)).startswith(expected)


def test_only_disk_targets_take_a_stack() -> None:
    text = "targets:\n  - type: raw\n    device: /dev/vdb\n    stack: []\n"
    assert _error(text) == "k.yaml:4: key 'targets[0].stack': only disk targets take this key"


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("/dev/crashvg/dump", ("crashvg", "dump")),
        ("/dev/mapper/crashvg-dump", ("crashvg", "dump")),
        ("/dev/mapper/crash--vg-dump--1", ("crash-vg", "dump-1")),
        ("/dev/mapper/a---b", ("a-", "b")),
        ("/dev/vg.0/lv+1", ("vg.0", "lv+1")),
        ("/dev/disk/by-uuid/2f6e0e4c", None),
        ("/dev/md/kdumpmd", None),
        ("/dev/mapper/control", None),
        ("/dev/mapper/-x", None),
        ("/dev/vdb1", None),
        ("/dev/a/b/c", None),
        ("UUID=2f6e0e4c-8a53", None),
    ],
)
def test_lvm_layer_is_inferred_from_the_device_name(
    device: str, expected: tuple[str, str] | None
) -> None:
    target = parse(_disk("", device), "k.yaml").targets[0]
    layers = (LvmLayer(vg=expected[0], lv=expected[1]),) if expected else ()
    assert target.layers() == layers and not target.layers_given()


def test_given_stack_wins_and_an_empty_one_turns_inference_off() -> None:
    given = parse(_disk("    stack: [{type: lvm, vg: crashvg, lv: dump}]\n"), "k.yaml")
    assert given.targets[0].layers() == (LvmLayer(vg="crashvg", lv="dump"),)
    assert given.targets[0].layers_given()
    empty = parse(_disk("    stack: []\n", "/dev/mapper/mpath-a"), "k.yaml").targets[0]
    assert empty.layers() == () and empty.layers_given()
    on_uuid = _disk("    stack: [{type: lvm, vg: crashvg, lv: dump}]\n", "UUID=2f6e0e4c-8a53")
    assert parse(on_uuid, "k.yaml").targets[0].layers() == (LvmLayer(vg="crashvg", lv="dump"),)


def test_split_dm_name_inverts_dm_name() -> None:
    for vg, lv in [("vg", "lv"), ("a-b", "c"), ("a", "b-c"), ("x-", "y")]:
        layer = LvmLayer(vg=vg, lv=lv)
        assert split_dm_name(layer.dm_name) == (vg, lv), layer.dm_name


CONFIG = """\
targets:
  - {type: disk, device: /dev/crashvg/dump, fstype: ext4}
  - {type: disk, device: UUID=2f6e0e4c-8a53, fstype: xfs, stack: [{type: lvm, vg: vg1, lv: thin}]}
  - {type: disk, device: /dev/vdb1, fstype: ext4}
capture: {stage: static}
"""


def test_disk_template_brings_each_layer_up_before_it_waits_for_the_device() -> None:
    config = parse(CONFIG, "k.yaml")
    rendered = init_sandbox.render_image(config).files
    disk = rendered["/lib/kdump/hooks/40-disk-target.sh"]
    bodies = disk.split("kdump_target_")[1:]
    assert "kdump_stack_layer lvm crashvg dump;" in bodies[0]
    assert bodies[0].index("kdump_stack_layer") < bodies[0].index("wait_for_device")
    assert "kdump_stack_layer lvm vg1 thin;" in bodies[1]
    assert "kdump_stack_layer" not in bodies[2]
    assert "kdump_layer_lvm() {" in rendered["/lib/kdump/hooks/30-lvm-layer.sh"]
    # Without a layer the image has no LVM at all.
    plain = parse("targets: [{type: disk, device: /dev/vdb1, fstype: ext4}]\n", "k.yaml")
    features = select(discover(), plain, "static", "native")
    assert "lvm" not in [f.name for f in features]


def test_image_lvm_conf_is_valid_for_this_lvm(tmp_path: Path) -> None:
    """lvm itself checks every setting of the rendered lvm.conf (a misspelt one is an error)."""
    rendered = init_sandbox.render_image(parse(CONFIG, "k.yaml")).files
    (tmp_path / "lvm.conf").write_text(rendered["/etc/lvm/lvm.conf"])
    env = dict(os.environ, LVM_SYSTEM_DIR=str(tmp_path), LVM_SUPPRESS_FD_WARNINGS="1")
    run = subprocess.run(["lvm", "lvmconfig", "--validate"], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0 and "LVM configuration valid" in run.stdout, run
    merged = subprocess.run(["lvm", "lvmconfig", "--mergedconfig"], env=env, capture_output=True,
                            text=True, timeout=60).stdout  # fmt: skip
    for setting in (
        "metadata_read_only=1",
        "backup=0",
        "archive=0",
        "monitoring=0",
        "udev_sync=0",
        "use_lvmpolld=0",
        'locking_dir="/run/lvm/lock"',
        'thin_check_executable=""',
        'filter="r|.*|"',
        'activation_mode="complete"',
    ):
        assert setting in merged.replace(" ", ""), setting  # fmt: skip


def run_layer(
    config_text: str, script: str, tmp_path: Path, timeout: int = 2
) -> subprocess.CompletedProcess[str]:
    """The rendered capture library and layer hooks under busybox sh (DEVICE_TIMEOUT=timeout,
    the image's lvm.conf), then `script`."""
    rendered = init_sandbox.render_image(parse(config_text, "k.yaml")).files
    (tmp_path / "lvm").mkdir(exist_ok=True)
    (tmp_path / "lvm" / "lvm.conf").write_text(rendered.get("/etc/lvm/lvm.conf", ""))
    hooks = "".join(text for path, text in sorted(rendered.items())
                    if path.startswith("/lib/kdump/hooks/30-"))  # fmt: skip
    prelude = f'log() {{ echo "kdump: $*"; }}\nDEVICE_TIMEOUT={timeout}\n'
    body = f"{prelude}{hooks}\nKDUMP_LVM_SYSTEM_DIR={tmp_path / 'lvm'}\n{script}\n"
    return subprocess.run(["/bin/busybox", "sh", "-c", body], capture_output=True, text=True,
                          timeout=120 + 4 * timeout)  # fmt: skip


def test_a_layer_without_its_function_fails_the_target(tmp_path: Path) -> None:
    run = run_layer(CONFIG, 'kdump_stack_layer zfs tank/crash; echo "status=$?"', tmp_path)
    assert "kdump: this image has no kdump_layer_zfs: its feature module is missing" in run.stdout
    assert "status=1" in run.stdout


def test_lvm_layer_gives_up_on_a_missing_volume_group_in_bounded_time(tmp_path: Path) -> None:
    """No device here holds the VG: the function waits DEVICE_TIMEOUT and says so."""
    run = run_layer(CONFIG, 'kdump_stack_layer lvm novg dump; echo "status=$?"', tmp_path)
    assert "kdump: lvm: volume group novg not found on any device after 2s" in run.stdout, run
    assert "status=1" in run.stdout


@pytest.mark.parametrize(("vmcore_mb", "min_free", "expected"), [(0, 0, 1), (10, 5, 16)])
def test_dump_upper_bound_is_the_memory_size_plus_min_free(
    tmp_path: Path, vmcore_mb: int, min_free: int, expected: int
) -> None:
    vmcore = tmp_path / "vmcore"
    with vmcore.open("wb") as f:
        f.truncate(vmcore_mb * 2**20)
    config = CONFIG + f"capture: {{stage: static, min_free: {min_free}}}\n"
    config = config.replace("capture: {stage: static}\n", "")
    run = run_layer(config, f"KDUMP_VMCORE={vmcore}\nkdump_dump_upper_mb", tmp_path)
    assert run.stdout.strip() == str(expected), run


def test_inspect_names_the_layer_that_asked(
    kernel61: Kernel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "kdump.yaml"
    config.write_text(CONFIG + "kernel_modules: [virtio_blk]\n")
    image = tmp_path / "kdump.img"
    assert main(build_args(kernel61, config, image)) == 0
    info = report(image)
    why = "feature lvm for lvm crashvg/dump, lvm vg1/thin"
    modules = {m["name"]: m["why"] for m in info["kernel_modules"]}
    assert modules["dm_mod"] == f"requested as 'dm_mod' by {why}"
    assert modules["dm_thin_pool"] == f"requested as 'dm_thin_pool' by {why}"
    lvm = [b for b in info["binaries"] if b["path"].endswith("/lvm")]
    assert lvm and lvm[0]["why"] == f"requested by {why}" and lvm[0]["feature"] == "lvm"
    paths = {e["path"]: e for e in info["entries"]}
    assert paths["/etc/lvm/lvm.conf"]["feature"] == "lvm"
    hook = [e for p, e in paths.items() if p.endswith("/lib/kdump/hooks/30-lvm-layer.sh")]
    assert [e["feature"] for e in hook] == ["lvm"]
    capsys.readouterr()
    assert main(["inspect", str(image)]) == 0
    assert f"dm_mod: requested as 'dm_mod' by {why}" in capsys.readouterr().out


def test_storage_package_ships() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert '"kdump_mkinitrd.storage",' in text
