"""Start every program of a built image inside a chroot of the unpacked image.

Inside the chroot only the image's own loader, libraries and /etc are seen, as under the
capture kernel: no ld.so.cache, no library of the build host. A dynamic program is started
through its loader in trace mode (LD_TRACE_LOADED_OBJECTS=1: the loader maps every library
it needs, as for a real start, and exits), which also covers programs that would need
arguments or hardware to run; a static one is run with --help, and only a failure to start
counts. GNU cpio unpacks the image, so the check does not trust our own reader either.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from elftools.elf.elffile import ELFFile

from kdump_mkinitrd.image import stagepack
from kdump_mkinitrd.image.compress import decompress
from kdump_mkinitrd.image.cpio import split_archives

_ELF_MAGIC = b"\x7fELF"
# Nothing of the build host's environment reaches the programs.
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}


def unpack(image: Path, dest: Path) -> Path:
    """The image's files under `dest` (needs root for its device nodes)."""
    dest.mkdir(parents=True, exist_ok=True)
    # The image is concatenated archives; cpio stops at each trailer, so one run per archive,
    # in order, as the kernel unpacks them.
    for archive in split_archives(decompress(image.read_bytes(), str(image))):
        subprocess.run(
            ["cpio", "-id", "--quiet", "--no-absolute-filenames"],
            input=archive,
            cwd=dest,
            check=True,
            timeout=120,
        )
    mount_stage(dest)
    return dest


def mount_stage(root: Path) -> None:
    """What the init does when the Python stage runs: its squashfs unpacked at the mount
    point (by unsquashfs, not our code) and each file linked at its build-host path."""
    squashfs = root / stagepack.IMAGE_PATH.lstrip("/")
    if not squashfs.is_file():
        return
    mount = root / stagepack.MOUNT_POINT.lstrip("/")
    mount.parent.mkdir(parents=True, exist_ok=True)  # the init's mkdir -p
    done = subprocess.run(["unsquashfs", "-no-xattrs", "-f", "-d", str(mount), str(squashfs)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for path in sorted(mount.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        link = root / path.relative_to(mount)
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        # Relative, so that it leads to the same file outside a chroot of `root` too.
        link.symlink_to(os.path.relpath(path, link.parent))


def unsquash(blob: bytes, tmp: Path) -> dict[str, tuple[str, int, bytes]]:
    """path -> (kind, mode, content or link target) of every file and link in a squashfs."""
    image = tmp / "stage.squashfs"
    image.write_bytes(blob)
    out = tmp / "unsquashed"
    subprocess.run(["unsquashfs", "-no-xattrs", "-d", str(out), str(image)], check=True,
                   capture_output=True)  # fmt: skip
    found = {}
    for path in out.rglob("*"):
        name = "/" + str(path.relative_to(out))
        if path.is_symlink():
            found[name] = ("symlink", 0o777, os.readlink(path).encode())
        elif path.is_file():
            found[name] = ("file", path.stat().st_mode & 0o7777, path.read_bytes())
    return found


def programs(root: Path) -> dict[str, bool]:
    """Every ELF program of the unpacked image (path inside it -> dynamic or static).
    Shared libraries and kernel modules are not programs: they have no entry of their own
    (libc.so.6 has a PT_INTERP and runs, so it counts)."""
    found: dict[str, bool] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file() or name.endswith(".ko"):
                continue
            with open(path, "rb") as stream:
                if stream.read(4) != _ELF_MAGIC:
                    continue
                stream.seek(0)
                elf = ELFFile(stream)
                kinds = {seg["p_type"] for seg in elf.iter_segments()}
                etype = elf["e_type"]
            inside = "/" + str(path.relative_to(root))
            if "PT_INTERP" in kinds:
                found[inside] = True
            elif etype == "ET_EXEC" and "PT_DYNAMIC" not in kinds:
                found[inside] = False
    return dict(sorted(found.items()))


def _chrooted(root: Path, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # chroot(2) in the child itself: with chroot(8) the loader's trace variable would trace
    # the host's chroot program instead.
    def enter() -> None:
        os.chroot(root)
        os.chdir("/")

    return subprocess.run(
        argv, env=env, preexec_fn=enter, capture_output=True, text=True, timeout=60, check=False
    )


def start(root: Path, program: str, dynamic: bool) -> str | None:
    """None when `program` starts inside the chroot; otherwise what went wrong."""
    try:
        if dynamic:
            done = _chrooted(root, [program], {**_ENV, "LD_TRACE_LOADED_OBJECTS": "1"})
        else:
            done = _chrooted(root, [program, "--help"], _ENV)
    except OSError as exc:  # no loader, not executable, bad format
        return f"{program}: cannot start: {exc}"
    said = (done.stdout + done.stderr).strip()
    # "(0x": the trace lines give load addresses, so the loader did trace rather than run.
    if dynamic and (done.returncode != 0 or "not found" in said or "(0x" not in said):
        return f"{program}: exit {done.returncode}: {said}"
    return None


def failures(root: Path, names: dict[str, bool] | None = None) -> list[str]:
    """What cannot start among `names` (default: every program of the image)."""
    names = programs(root) if names is None else names
    return [problem for p, dyn in names.items() if (problem := start(root, p, dyn)) is not None]


def run_in(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run one command inside the unpacked image, with no environment from the host."""
    return _chrooted(root, list(argv), _ENV)
