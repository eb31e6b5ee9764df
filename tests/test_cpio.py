"""The newc writer against real readers: GNU cpio, bsdtar, and our own reader."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.cpio import Entry, newc_segments, read_newc, split_archives, write_newc

SAMPLE = [
    Entry("bin", "dir", 0o755),
    Entry("bin/busybox", "file", 0o755, b"\x7fELF" + bytes(range(256)) * 3),
    Entry("bin/sh", "symlink", 0o777, b"busybox"),
    Entry("dev", "dir", 0o755),
    Entry("dev/console", "char", 0o600, rdev=(5, 1)),
    Entry("dev/null", "char", 0o666, rdev=(1, 3)),
    Entry("etc", "dir", 0o755),
    Entry("etc/a.conf", "file", 0o644, b"same content\n"),
    Entry("etc/b.conf", "file", 0o644, b"same content\n"),
    Entry("etc/empty", "file", 0o600, b""),
    Entry("init", "file", 0o755, b"#!/bin/sh\necho hi\n"),
]


def archive(entries: list[Entry], mtime: int = 0) -> bytes:
    out = io.BytesIO()
    write_newc(entries, out, mtime=mtime)
    return out.getvalue()


def test_round_trip_keeps_every_field() -> None:
    members = {m.path: m for m in read_newc(archive(SAMPLE, mtime=1234))}
    assert set(members) == {e.path for e in SAMPLE}
    for entry in SAMPLE:
        got = members[entry.path]
        assert (got.kind, got.mode, got.data, got.rdev) == (
            entry.kind,
            entry.mode,
            entry.data,
            entry.rdev,
        )
        assert (got.uid, got.gid, got.mtime) == (0, 0, 1234)


def test_identical_files_become_hard_links() -> None:
    members = {m.path: m for m in read_newc(archive(SAMPLE))}
    assert members["etc/a.conf"].ino == members["etc/b.conf"].ino
    assert members["etc/a.conf"].nlink == 2
    assert members["init"].ino != members["etc/a.conf"].ino


def test_same_input_same_bytes_in_any_order() -> None:
    assert archive(SAMPLE) == archive(list(reversed(SAMPLE)))


def test_directories_come_before_their_contents() -> None:
    paths = [m.path for m in read_newc(archive(list(reversed(SAMPLE))))]
    for i, path in enumerate(paths):
        parent = os.path.dirname(path)
        assert not parent or paths.index(parent) < i


def test_duplicate_and_escaping_paths_are_refused() -> None:
    with pytest.raises(KdumpError, match="same path"):
        archive([Entry("a", "file"), Entry("a", "file", data=b"x")])
    with pytest.raises(KdumpError, match="inside"):
        Entry("../etc/passwd", "file")


def test_truncated_archive_is_an_error() -> None:
    blob = archive(SAMPLE)
    with pytest.raises(KdumpError, match=r"truncated|past the end"):
        read_newc(blob[: len(blob) // 2])


def test_gnu_cpio_extracts_what_we_wrote(tmp_path: Path) -> None:
    blob = archive(SAMPLE)
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=blob, capture_output=True, check=True)
    assert sorted(listing.stdout.decode().split()) == sorted(e.path for e in SAMPLE)
    # Device nodes need privileges we do not assume; extract the rest.
    regular = archive([e for e in SAMPLE if e.kind != "char"])
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames"], input=regular, cwd=out, check=True
    )
    assert (out / "bin/busybox").read_bytes() == SAMPLE[1].data
    assert os.readlink(out / "bin/sh") == "busybox"
    assert (out / "etc/b.conf").read_bytes() == b"same content\n"
    assert (out / "etc/a.conf").stat().st_ino == (out / "etc/b.conf").stat().st_ino
    assert (out / "init").stat().st_mode & 0o777 == 0o755


def test_bsdtar_lists_types_and_devices() -> None:
    listing = subprocess.run(
        ["bsdtar", "-tvf", "-"], input=archive(SAMPLE), capture_output=True, check=True
    ).stdout.decode()
    lines = {
        line.split()[-1] if "->" not in line else line.split()[-3]: line
        for line in listing.splitlines()
    }
    assert lines["dev/console"].startswith("crw-------")
    assert lines["bin/sh"].startswith("lrwxrwxrwx")
    assert lines["bin"].startswith("drwxr-xr-x")


names = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=12).filter(
        lambda s: s not in (".", "..")
    ),
    min_size=1,
    max_size=3,
).map("/".join)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(names, st.binary(max_size=300), min_size=1, max_size=12))
def test_round_trip_any_files(files: dict[str, bytes]) -> None:
    # A path that is also another's directory cannot be a file; keep only leaves.
    leaves = {p: d for p, d in files.items() if not any(q.startswith(p + "/") for q in files)}
    entries = [Entry(p, "file", 0o640, d) for p, d in leaves.items()]
    back = {m.path: m.data for m in read_newc(archive(entries))}
    assert back == leaves


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_reader_never_crashes_on_garbage(blob: bytes) -> None:
    with contextlib.suppress(KdumpError):
        read_newc(b"070701" + blob)


def big_tree(count: int = 40, size: int = 300_000) -> list[Entry]:
    """Files enough for several segments; content differs per file and is not all zeros."""
    entries = [Entry("lib", "dir", 0o755), Entry("lib/mods", "dir", 0o755),
               Entry("bin", "symlink", 0o777, b"lib")]  # fmt: skip
    for i in range(count):
        data = (f"module {i}\n".encode() * (size // 10))[:size]
        entries.append(Entry(f"lib/mods/m{i:03}.ko", "file", 0o644, data))
    entries.append(Entry("lib/mods/copy-of-m000.ko", "file", 0o644, entries[3].data))
    return entries


def test_segments_unpack_to_the_same_tree_as_one_archive(tmp_path: Path) -> None:
    entries = big_tree()
    segments = newc_segments(entries, mtime=77)
    assert len(segments) > 2
    # Directories, symlinks and nodes come first, so every file's folder exists before it.
    assert {m.kind for m in read_newc(segments[0])} == {"dir", "symlink"}
    joined = b"".join(segments)
    assert split_archives(joined) == segments
    ours = {m.path: (m.kind, m.mode, m.data, m.mtime) for m in read_newc(joined)}
    single = {m.path: (m.kind, m.mode, m.data, m.mtime) for m in read_newc(archive(entries, 77))}
    assert ours == single
    # GNU cpio, given each archive in turn into one folder, builds the same tree.
    out = tmp_path / "x"
    out.mkdir()
    for segment in segments:
        subprocess.run(["cpio", "-id", "--quiet"], input=segment, cwd=out, check=True)
    for entry in entries:
        if entry.kind == "file":
            assert (out / entry.path).read_bytes() == entry.data
    assert os.readlink(out / "bin") == "lib"


def test_a_changed_file_changes_only_its_own_segment() -> None:
    entries = big_tree()
    before = newc_segments(entries)
    changed = [e if e.path != "lib/mods/m020.ko" else Entry(e.path, "file", 0o644, b"new")
               for e in entries]  # fmt: skip
    after = newc_segments(changed)
    assert len(before) == len(after)
    differing = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert len(differing) == 1
    assert b"lib/mods/m020.ko" in after[differing[0]]


def test_hard_links_stay_inside_a_segment() -> None:
    # Identical files in one segment share an inode; the kernel forgets inodes at each
    # trailer, so each segment numbers its own from 1 and carries its own data.
    linked = 0
    for segment in newc_segments(big_tree()):
        members = {m.path: m for m in read_newc(segment)}
        by_ino: dict[int, set[bytes]] = {}
        for m in members.values():
            by_ino.setdefault(m.ino, set()).add(m.data)
        assert all(len(contents) == 1 for contents in by_ino.values())
        if "lib/mods/m000.ko" in members:
            copy, first = members["lib/mods/copy-of-m000.ko"], members["lib/mods/m000.ko"]
            assert (copy.ino, copy.nlink) == (first.ino, 2)
            linked += 1
    assert linked == 1
