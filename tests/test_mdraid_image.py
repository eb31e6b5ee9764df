"""An image with md RAID layers: the disk template brings each array up before the layers above
it and before it waits for the device, and the image holds mdadm, its libraries, md and the
RAID personalities, each with the layers that asked for it (what `inspect` shows)."""

from __future__ import annotations

from pathlib import Path

from kdump_mkinitrd.cli import main
from kdump_mkinitrd.config import parse
from kdump_mkinitrd.image.inspect_image import report
from kdump_mkinitrd.storage.raid import ANY_LEVEL
from tests import init_sandbox
from tests.conftest import Kernel
from tests.test_build import build_args

UUID = "0a1b2c3d:4e5f6071:8293a4b5:c6d7e8f9"
OTHER = "11111111:22222222:33333333:44444444"

IMAGE_CONFIG = f"""\
targets:
  - type: disk
    device: /dev/md/kdumpmd
    fstype: ext4
    stack: [{{type: raid, uuid: '{UUID}', name: kdumpmd}}]
  - type: disk
    device: /dev/crashvg/dump
    fstype: ext4
    stack: [{{type: raid, uuid: '{OTHER}'}}, {{type: lvm, vg: crashvg, lv: dump}}]
capture: {{stage: static}}
kernel_modules: [virtio_blk]
"""


def test_disk_template_assembles_the_array_before_the_layers_above() -> None:
    rendered = init_sandbox.render_image(parse(IMAGE_CONFIG, "k.yaml")).files
    bodies = rendered["/lib/kdump/hooks/40-disk-target.sh"].split("kdump_target_")[1:]
    assert f"kdump_stack_layer raid {UUID} kdumpmd;" in bodies[0]
    # Layers are numbered across the image: the second target's array is layer 1.
    raid, lvm = (bodies[1].index(f"kdump_stack_layer {call};")
                 for call in (f"raid {OTHER} kdump-md-1", "lvm crashvg dump"))  # fmt: skip
    assert raid < lvm < bodies[1].index("wait_for_device")
    assert "kdump_layer_raid() {" in rendered["/lib/kdump/hooks/30-mdraid-layer.sh"]


def test_image_holds_mdadm_and_the_personalities(kernel61: Kernel, tmp_path: Path) -> None:
    config = tmp_path / "kdump.yaml"
    config.write_text(IMAGE_CONFIG)
    image = tmp_path / "kdump.img"
    assert main(build_args(kernel61, config, image)) == 0
    info = report(image)
    why = f"feature mdraid for raid {UUID}, raid {OTHER}"
    modules = {m["name"]: m["why"] for m in info["kernel_modules"]}
    assert modules["md_mod"] == f"requested as 'md_mod' by {why}", modules
    # Neither array runs here: every personality issue 14 serves, and what they need.
    for personality in ANY_LEVEL:
        assert modules[personality].endswith(f"by feature mdraid for raid {UUID}"), modules
    assert "raid6_pq" in modules
    mdadm = [b for b in info["binaries"] if b["path"].endswith("/mdadm")]
    assert mdadm and mdadm[0]["why"] == f"requested by {why}" and mdadm[0]["feature"] == "mdraid"
    assert any("libudev.so" in b["path"] for b in info["binaries"]), info["binaries"]
    hooks = [e for e in info["entries"] if e["path"].endswith("/hooks/30-mdraid-layer.sh")]
    assert [e["feature"] for e in hooks] == ["mdraid"]
