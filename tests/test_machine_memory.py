"""The crashed machine's memory, which `estimate` scales with: this host's real firmware map
and meminfo, sizes as users write them, and `estimate --memory` on a real image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kdump_mkinitrd.arming.crashmemory import BITMAP_CAP_MB, machine_terms
from kdump_mkinitrd.cli import main
from kdump_mkinitrd.hostscan.machinememory import (
    firmware_ram_bytes,
    meminfo_total_bytes,
    parse_size,
)
from tests.conftest import Kernel
from tests.test_build import build_args, write_config

MEMMAP = Path("/sys/firmware/memmap")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 << 20),
        ("64G", 64 << 30),
        ("1T", 1 << 40),
        ("1.5G", 3 << 29),
        ("4096", 4096),
        ("2GiB", 2 << 30),
        ("16g", 16 << 30),
    ],
)
def test_sizes_as_users_write_them(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "12X", "-1G", "1 G B"])
def test_a_bad_size_is_refused_with_examples(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


@pytest.mark.skipif(not MEMMAP.is_dir(), reason="this host's kernel has no firmware memory map")
def test_firmware_map_covers_what_the_kernel_manages() -> None:
    """The firmware's RAM is at least MemTotal (which leaves out the kernel's own reservations)
    and not far above it."""
    firmware = firmware_ram_bytes()
    total = meminfo_total_bytes()
    assert firmware is not None
    assert total <= firmware <= total * 1.15 + (256 << 20)


def test_firmware_map_counts_only_system_ram(tmp_path: Path) -> None:
    """A copy of this host's map with one RAM range relabelled loses exactly that range."""
    if not MEMMAP.is_dir():
        pytest.skip("this host's kernel has no firmware memory map")
    copy = tmp_path / "memmap"
    for entry in MEMMAP.iterdir():
        (copy / entry.name).mkdir(parents=True)
        for name in ("type", "start", "end"):
            shutil.copyfile(entry / name, copy / entry.name / name)
    ram = [e for e in copy.iterdir() if (e / "type").read_text().strip() == "System RAM"]
    first = ram[0]
    size = int((first / "end").read_text(), 16) - int((first / "start").read_text(), 16) + 1
    whole = firmware_ram_bytes(copy)
    assert whole == firmware_ram_bytes()
    (first / "type").write_text("Reserved\n")
    assert firmware_ram_bytes(copy) == (whole or 0) - size
    assert firmware_ram_bytes(tmp_path / "missing") is None


def test_bitmaps_grow_with_the_machine_up_to_the_cap() -> None:
    """Two bits per 4 KiB page: 64 KiB per GiB; 32 MiB covers 512 GiB, beyond which
    makedumpfile makes more passes instead."""
    assert machine_terms(1 << 30)[0] == 1 / 16
    assert machine_terms(64 << 30)[0] == 4
    assert machine_terms(512 << 30)[0] == BITMAP_CAP_MB
    assert machine_terms(4 << 40)[0] == BITMAP_CAP_MB


def test_estimate_for_other_machines(
    kernel61: Kernel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "k.img"
    assert main(build_args(kernel61, write_config(tmp_path), image)) == 0
    capsys.readouterr()
    figures = {}
    for size in ("1G", "64G", "1T"):
        assert main(["estimate", "--image", str(image), "--memory", size, "--json"]) in (0, 1)
        figures[size] = json.loads(capsys.readouterr().out)
    assert figures["1G"]["machine_gib"] == 1
    assert figures["1T"]["machine_gib"] == 1024
    assert figures["1T"]["bitmap_mb"] == BITMAP_CAP_MB
    assert figures["1G"]["total_mb"] <= figures["64G"]["total_mb"] <= figures["1T"]["total_mb"]
    assert figures["1T"]["total_mb"] >= figures["1G"]["total_mb"] + BITMAP_CAP_MB - 8
    assert main(["estimate", "--image", str(image), "--memory", "12X"]) == 1
    assert "--memory: '12X' is not a size" in capsys.readouterr().err
