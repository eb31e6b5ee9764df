"""What one build leaves in the cache for the next: compressed cpio segments by content.

Real builds on a real Debian kernel, each with its own cache folder (XDG_CACHE_HOME): a warm
build reuses what a cold one compressed, a changed input recompresses only its own segments,
a damaged entry is not trusted, and the image is the same bytes whichever way it was made.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdump_mkinitrd.cli import main
from kdump_mkinitrd.image.compress import decompress
from kdump_mkinitrd.image.cpio import read_newc
from tests.conftest import Kernel
from tests.test_build import DISK_CONFIG, build_args, write_config


def build(
    kernel: Kernel,
    config: Path,
    output: Path,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> dict[str, object]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert main(build_args(kernel, config, output, "--json")) == 0
    report: dict[str, object] = json.loads(capsys.readouterr().out)
    return report


def segments(cache: Path) -> list[Path]:
    return sorted((cache / "kdump-mkinitrd" / "segments").iterdir())


def test_warm_build_reuses_every_segment_and_gives_the_same_bytes(
    kernel61: Kernel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path)
    cache = tmp_path / "cache"
    cold = build(kernel61, config, tmp_path / "cold.img", cache, monkeypatch, capsys)
    count = cold["segments_compressed"]
    assert isinstance(count, int) and count > 1 and cold["segments_reused"] == 0
    assert len(segments(cache)) == count
    warm = build(kernel61, config, tmp_path / "warm.img", cache, monkeypatch, capsys)
    assert (warm["segments_reused"], warm["segments_compressed"]) == (count, 0)
    assert (tmp_path / "warm.img").read_bytes() == (tmp_path / "cold.img").read_bytes()


def test_a_changed_input_recompresses_only_its_segments(
    kernel61: Kernel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = tmp_path / "cache"
    build(kernel61, write_config(tmp_path), tmp_path / "a.img", cache, monkeypatch, capsys)
    # Another config: the rendered init and the manifest change, the big host files do not.
    other = tmp_path / "other"
    other.mkdir()
    changed = write_config(other, DISK_CONFIG.replace("device_timeout: 20", "device_timeout: 45"))
    warm = build(kernel61, changed, tmp_path / "b.img", cache, monkeypatch, capsys)
    reused, compressed = warm["segments_reused"], warm["segments_compressed"]
    assert isinstance(reused, int) and isinstance(compressed, int)
    assert reused > 0 and 0 < compressed < reused
    fresh = build(kernel61, changed, tmp_path / "c.img", tmp_path / "fresh", monkeypatch, capsys)
    assert fresh["segments_reused"] == 0
    assert (tmp_path / "b.img").read_bytes() == (tmp_path / "c.img").read_bytes()
    init = {m.path: m.data for m in read_newc(decompress((tmp_path / "b.img").read_bytes()))}
    assert b"45" in init["etc/kdump-mkinitrd/manifest.json"]


def test_a_damaged_cache_entry_is_not_used(
    kernel61: Kernel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path)
    cache = tmp_path / "cache"
    cold = build(kernel61, config, tmp_path / "cold.img", cache, monkeypatch, capsys)
    damaged = segments(cache)[0]
    blob = bytearray(damaged.read_bytes())
    blob[-1] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    warm = build(kernel61, config, tmp_path / "warm.img", cache, monkeypatch, capsys)
    assert warm["segments_compressed"] == 1
    assert warm["segments_reused"] == cold["segments_compressed"] - 1  # type: ignore[operator]
    assert (tmp_path / "warm.img").read_bytes() == (tmp_path / "cold.img").read_bytes()
