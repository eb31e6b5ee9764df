"""What one build leaves in the cache for the next: compressed cpio segments by content.

Real builds on a real Debian kernel, each with its own cache folder (XDG_CACHE_HOME): a warm
build reuses what a cold one compressed, a changed input recompresses only its own segments,
a damaged entry is not trusted, and the image is the same bytes whichever way it was made.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kdump_mkinitrd.cli import main
from kdump_mkinitrd.hostscan import elfdeps
from kdump_mkinitrd.image.buildcache import BlobStore, StatCache, program_output
from kdump_mkinitrd.image.compress import decompress
from kdump_mkinitrd.image.cpio import read_newc
from kdump_mkinitrd.image.inputs import DigestCache
from kdump_mkinitrd.image.resolve import module_closure
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


@pytest.fixture(scope="module")
def depmod_tree(kernel61: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernel's modules as a distribution installs them: depmod's files beside them."""
    base = tmp_path_factory.mktemp("depmod")
    tree = base / "lib" / "modules" / kernel61.kver
    tree.parent.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(kernel61.kmoddir), str(tree)], check=True)
    subprocess.run(["depmod", "-b", str(base), kernel61.kver], check=True, capture_output=True)
    return tree


REQUESTS = [("ext4", "a test"), ("virtio_blk", "a test")]


def test_module_closure_is_reused_until_the_tree_changes(
    kernel61: Kernel, depmod_tree: Path, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "modules")
    first = module_closure(kernel61.kver, depmod_tree, REQUESTS, store=store)
    assert (store.hits, store.misses) == (0, 1)
    assert {"ext4", "jbd2", "mbcache", "virtio_blk"} <= set(first.names())
    assert module_closure(kernel61.kver, depmod_tree, REQUESTS, store=store) == first
    assert store.hits == 1
    # Other requests are another entry, not the same one.
    module_closure(kernel61.kver, depmod_tree, REQUESTS[:1], store=store)
    assert store.misses == 2
    # A module in the closure rewritten (its dependencies may differ now): resolved again.
    jbd2 = next(m.path for m in first.modules if m.name == "jbd2")
    jbd2.write_bytes(jbd2.read_bytes())
    assert module_closure(kernel61.kver, depmod_tree, REQUESTS, store=store) == first
    assert store.misses == 3
    # depmod's files changed: another key.
    with (depmod_tree / "modules.alias").open("a") as f:
        f.write("alias test-only-alias ext4\n")
    module_closure(kernel61.kver, depmod_tree, REQUESTS, store=store)
    assert store.misses == 4 and len(list((tmp_path / "modules").iterdir())) == 3


def test_program_output_is_kept_by_the_program_content(tmp_path: Path) -> None:
    program = tmp_path / "tool"
    program.write_text("#!/bin/sh\necho one\n")
    runs: list[str] = []

    def run() -> str:
        text = subprocess.run([str(program)], capture_output=True, text=True).stdout
        runs.append(text)
        return text

    program.chmod(0o755)
    assert program_output(tmp_path, program, ["-v"], run) == "one\n"
    assert program_output(tmp_path, program, ["-v"], run) == "one\n"
    assert len(runs) == 1
    program.write_text("#!/bin/sh\necho two\n")
    assert program_output(tmp_path, program, ["-v"], run) == "two\n"
    assert len(runs) == 2


def test_digests_are_reused_until_the_file_changes_even_with_its_old_mtime(
    tmp_path: Path,
) -> None:
    data = tmp_path / "input.bin"
    data.write_bytes(b"first")
    store = tmp_path / "digests.json"
    cache = DigestCache(store)
    assert cache.digest(data, data.stat(), None) == hashlib.sha256(b"first").hexdigest()
    cache.save()
    again = DigestCache(store)
    assert again.digest(data, data.stat(), None) == hashlib.sha256(b"first").hexdigest()
    assert again.hits == 1
    # Same size, mtime put back: the ctime still moved, so the content is read again.
    old = data.stat()
    time.sleep(0.01)
    data.write_bytes(b"other")
    os.utime(data, ns=(old.st_atime_ns, old.st_mtime_ns))
    third = DigestCache(store)
    assert third.digest(data, data.stat(), None) == hashlib.sha256(b"other").hexdigest()
    assert third.hits == 0


def test_a_full_store_drops_the_least_recently_used_entries(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store", limit=2500)
    for age, key in enumerate(("old", "used", "new")):
        store.put(key, bytes([age]) * 1000)
        os.utime(store.directory / key, ns=(age * 10**9, age * 10**9))
    assert store.get("old") == bytes([0]) * 1000  # used now: the newest of the three
    store.prune()
    assert sorted(p.name for p in store.directory.iterdir()) == ["new", "old"]


def test_elf_facts_are_kept_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = tmp_path / "makedumpfile"
    shutil.copy2("/usr/bin/makedumpfile", program)
    text = tmp_path / "script"
    text.write_text("#!/bin/sh\n")
    fresh = elfdeps._read_elf_info(str(program))
    assert fresh is not None and "libc.so.6" in fresh.needed
    store = tmp_path / "elfinfo.json"
    first = StatCache(store)
    monkeypatch.setattr(elfdeps, "INFO_CACHE", first)
    assert elfdeps._cached_elf_info(str(program)) == fresh
    assert elfdeps._cached_elf_info(str(text)) is None
    first.save()
    second = StatCache(store)
    monkeypatch.setattr(elfdeps, "INFO_CACHE", second)
    assert elfdeps._cached_elf_info(str(program)) == fresh
    assert elfdeps._cached_elf_info(str(text)) is None
    assert second.hits == 2
    # Another program in its place: parsed again, not taken from the cache.
    shutil.copy2("/usr/bin/busybox", program)
    static = elfdeps._cached_elf_info(str(program))
    assert static is not None and static.needed == () and second.hits == 2
