"""The same inputs give the same image bytes wherever the code, the config and the image live.

Each build runs in its own process, from its own copy of the source tree (as from two
checkouts of one commit, with fresh mtimes), with its own config path, output path and
PYTHONHASHSEED. What `build --if-needed` needs to notice a change (host paths, mtimes) lives
beside the image, and it still notices one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdump_mkinitrd.image.inputs import read_record, record_path
from tests.conftest import REPO, Kernel

CONFIG = """\
targets:
  - {type: disk, device: /dev/vdb, fstype: ext4}
kernel_modules: [virtio_blk, virtio_pci]
compression: {level: 3}
capture: {stage: STAGE}
"""


def checkout(dest: Path) -> Path:
    """A copy of the source tree as a checkout would give it: other path, new mtimes."""
    for top in ("builder", "modules.d", "templates"):
        shutil.copytree(
            REPO / top,
            dest / top,
            copy_function=shutil.copy,  # not copy2: a checkout's files are new
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    return dest


def clone(dest: Path) -> Path:
    """A git clone of this checkout's commit: the code as committed, at its own path."""
    if not (REPO / ".git").exists():
        pytest.fail(f"{REPO} is not a git checkout; the copied trees test the same thing")
    done = subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(dest)],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dest


def import_path(tree: Path) -> Path:
    """A folder for PYTHONPATH that imports kdump_mkinitrd from `tree`'s builder/ (the
    editable install would import this checkout's instead)."""
    folder = tree / ".import"
    folder.mkdir(exist_ok=True)
    link = folder / "kdump_mkinitrd"
    if not link.is_symlink():
        link.symlink_to("../builder")
    return folder


def build(
    tree: Path, kernel: Kernel, config: Path, output: Path, seed: str, *extra: str
) -> dict[str, object]:
    args = ["build", "-k", kernel.kver, "--kmoddir", str(kernel.kmoddir),
            "--kernel", str(kernel.vmlinuz), "-c", str(config), "-o", str(output), "--json",
            *extra]  # fmt: skip
    env = dict(
        os.environ,
        PYTHONPATH=str(import_path(tree)),
        PYTHONHASHSEED=seed,
        PYTHONDONTWRITEBYTECODE="1",
    )
    done = subprocess.run(
        [sys.executable, "-m", "kdump_mkinitrd.cli", *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    if not report["up_to_date"]:
        # This build really ran from its own tree, and its record beside the image says so.
        recorded = read_record(output)
        assert recorded is not None
        assert str(tree / "builder" / "cli.py") in recorded["inputs"]
        assert recorded["config_source"] == str(config)
    return report


@pytest.mark.parametrize("stage", ["static", "python"])
def test_same_bytes_from_two_checkouts_and_two_config_paths(
    stage: str, kernel61: Kernel, tmp_path: Path
) -> None:
    text = CONFIG.replace("STAGE", stage)
    one, two = checkout(tmp_path / "one"), checkout(tmp_path / "elsewhere" / "two")
    config_one = tmp_path / "kdump.yaml"
    config_two = tmp_path / "etc" / "kdump-mkinitrd" / "config.yaml"
    config_two.parent.mkdir(parents=True)
    config_one.write_text(text)
    config_two.write_text(text)
    image_one, image_two = tmp_path / "a.img", tmp_path / "out" / "b.img"
    image_two.parent.mkdir()
    build(one, kernel61, config_one, image_one, "1")
    build(two, kernel61, config_two, image_two, "4242")
    assert image_one.read_bytes() == image_two.read_bytes()

    # --if-needed still sees nothing changed, then a changed template of this checkout.
    again = build(one, kernel61, config_one, image_one, "7", "--if-needed")
    assert again["up_to_date"] is True
    template = one / "modules.d" / "disk" / "disk-target.sh.j2"
    template.write_text(template.read_text() + "# changed\n")
    again = build(one, kernel61, config_one, image_one, "8", "--if-needed")
    assert again["rebuilt_because"] == [f"{template} changed"]
    assert image_one.read_bytes() != image_two.read_bytes()
    # The other checkout's image is untouched by all this and still up to date.
    again = build(two, kernel61, config_two, image_two, "9", "--if-needed")
    assert again["up_to_date"] is True


def test_if_needed_trusts_no_record_it_cannot_tie_to_the_image(
    kernel61: Kernel, tmp_path: Path
) -> None:
    """The record beside the image is only believed for the image bytes it was written for."""
    tree = checkout(tmp_path / "tree")
    config = tmp_path / "kdump.yaml"
    config.write_text(CONFIG.replace("STAGE", "static"))
    image, other = tmp_path / "a.img", tmp_path / "b.img"
    build(tree, kernel61, config, image, "1")
    config.write_text(config.read_text() + "device_timeout: 20\n")
    build(tree, kernel61, config, other, "2")
    # An older build's image copied over this one: its own manifest is fine, the record is not.
    shutil.copy(other, image)
    again = build(tree, kernel61, config, image, "3", "--if-needed")
    assert again["rebuilt_because"] == [f"{image} is not the image recorded in "
                                        f"{record_path(image)}"]  # fmt: skip
    assert build(tree, kernel61, config, image, "4", "--if-needed")["up_to_date"] is True
    record_path(image).unlink()
    again = build(tree, kernel61, config, image, "5", "--if-needed")
    assert again["rebuilt_because"] == [f"no record of its inputs at {record_path(image)}"]


def test_same_bytes_from_two_git_clones_of_one_commit(kernel61: Kernel, tmp_path: Path) -> None:
    """Two clones of the same commit (as committed: the copies above test the working tree),
    each building with its own code, config path and hash seed."""
    one, two = clone(tmp_path / "a" / "clone"), clone(tmp_path / "bb" / "other-clone")
    config_one, config_two = tmp_path / "a" / "kdump.yaml", tmp_path / "bb" / "k.yaml"
    for config in (config_one, config_two):
        config.write_text(CONFIG.replace("STAGE", "python"))
    build(one, kernel61, config_one, tmp_path / "one.img", "11")
    build(two, kernel61, config_two, tmp_path / "two.img", "12")
    assert (tmp_path / "one.img").read_bytes() == (tmp_path / "two.img").read_bytes()
