"""The Python stage as one compressed, read-only member of the image: a squashfs.

Crash-kernel memory is the limit, and a plain Python stage costs it three times: the kernel
holds the compressed image and the unpacked files at once while it unpacks (the capture
kernel ran out of memory there, at 104M on a 1 GiB guest, with the plain stage's 15.9 MB
unpacked), and the unpacked files then stay in the initramfs, which nothing can evict.
Packed as a squashfs, the stage is a single file of about a third of its size; the init
mounts it (loop and squashfs modules) only when the stage runs, and what the interpreter
reads of it is clean page cache that the kernel drops under pressure, so makedumpfile and
the dump's page cache get that memory back.

At the mount the init links each file of the squashfs at its build-host path (kept inside:
RUNPATH, $ORIGIN and PYTHONHOME keep working); a file the image already holds (a library
makedumpfile also needs) is not packed again. If the mount fails, the links are never made
and the static capture runs, as for any failure of the stage.

The squashfs is made by `mksquashfs` (squashfs-tools) with every time, owner and order fixed,
so the same files give the same bytes; it is cached under the build cache by the hash of the
files and the options, since xz takes seconds and a warm build must not.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kdump_mkinitrd.errors import KdumpError

# Where the init mounts the squashfs; the files are linked from their host paths to here.
MOUNT_POINT = "/run/kdump/pystage"
# The squashfs itself, in the image.
IMAGE_PATH = "/lib/kdump/pystage.squashfs"
# xz with a BCJ filter for the target's code (x86 for amd64) packs the interpreter and its
# libraries tightest; mksquashfs has none for arm64 (its "arm" filter is 32-bit ARM's branch
# encoding: on the arm64 stage it gave the same 2 519 040 bytes as none). The kernel's xz
# decompressor for squashfs needs one block (128K) of dictionary per CPU.
MKSQUASHFS_OPTIONS = (
    "-noappend",
    "-no-xattrs",
    "-all-root",
    "-all-time",
    "0",
    "-mkfs-time",
    "0",
    "-comp",
    "xz",
    "-b",
    "128K",
    "-quiet",
    "-no-progress",
)


def mksquashfs_options(bcj: str | None) -> tuple[str, ...]:
    return MKSQUASHFS_OPTIONS + (("-Xbcj", bcj) if bcj else ())


_CACHE_SCHEMA = 1


@dataclass(frozen=True)
class Member:
    """One path of the stage's tree: a file with its bytes, or a symlink with its target."""

    path: str  # absolute, as on the build host
    data: bytes
    mode: int = 0o644
    symlink: bool = False


def mksquashfs() -> str | None:
    return shutil.which("mksquashfs")


def squash(members: list[Member], cache_dir: Path, bcj: str | None = "x86") -> bytes:
    """The squashfs of `members`, from the cache when the same members were packed before;
    `bcj`: xz's branch filter for the members' machine code, if mksquashfs has one."""
    program = mksquashfs()
    if program is None:
        raise KdumpError("mksquashfs (squashfs-tools) is needed to pack the Python stage")
    options = mksquashfs_options(bcj)
    key = _key(members, program, options)
    cached = cache_dir / f"pystage-{key[:32]}.squashfs"
    with contextlib.suppress(OSError):
        return cached.read_bytes()
    with tempfile.TemporaryDirectory(prefix="kdump-pystage-") as tmp:
        tree = Path(tmp) / "tree"
        _write_tree(tree, members)
        out = Path(tmp) / "stage.squashfs"
        try:
            done = subprocess.run(
                [program, str(tree), str(out), *options],
                capture_output=True,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
            )
        except OSError as exc:
            raise KdumpError(f"cannot run {program}: {exc}") from None
        if done.returncode != 0:
            said = (done.stderr or done.stdout).decode(errors="replace").strip()
            raise KdumpError(f"mksquashfs failed packing the Python stage: {said[-400:]}")
        blob = out.read_bytes()
    tmp_cache = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp_cache.write_bytes(blob)
        os.replace(tmp_cache, cached)
    except OSError:
        # An unwritable cache costs time on the next build, nothing else.
        with contextlib.suppress(OSError):
            tmp_cache.unlink()
    return blob


def _write_tree(tree: Path, members: list[Member]) -> None:
    tree.mkdir(mode=0o755)
    for member in sorted(members, key=lambda m: m.path):
        path = tree / member.path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if member.symlink:
            path.symlink_to(member.data.decode())
        else:
            path.write_bytes(member.data)
            path.chmod(member.mode)
    # mkdir's mode goes through the umask: every directory gets the same mode whatever it is.
    for directory in [tree, *(p for p in tree.rglob("*") if p.is_dir() and not p.is_symlink())]:
        directory.chmod(0o755)


def _key(members: list[Member], program: str, options: tuple[str, ...]) -> str:
    version = subprocess.run([program, "-version"], capture_output=True).stdout[:200]
    digest = hashlib.sha256()
    digest.update(repr((_CACHE_SCHEMA, version, options)).encode())
    for member in sorted(members, key=lambda m: m.path):
        digest.update(repr((member.path, member.mode, member.symlink, len(member.data))).encode())
        digest.update(hashlib.sha256(member.data).digest())
    return digest.hexdigest()
