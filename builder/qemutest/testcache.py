"""Where the tests, qemu-test and the bench keep what is slow to make and the same every run:
Debian kernels, guest system images, downloaded packages, a chroot, a real vmcore.

One folder per machine, not per checkout, so that a fresh clone (as CI makes) or a git worktree
reuses them. Each entry is named by a digest of what made it; nothing a test proves is kept.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from kdump_mkinitrd.errors import KdumpError


def cache_root() -> Path:
    """$KDUMP_TEST_CACHE (the Makefile sets it), else $XDG_CACHE_HOME or ~/.cache, then
    kdump-mkinitrd-test."""
    chosen = os.environ.get("KDUMP_TEST_CACHE", "")
    if os.path.isabs(chosen):
        return Path(chosen)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "kdump-mkinitrd-test"


def kernel_cache() -> Path:
    """The unpacked Debian kernels (`make kernels`)."""
    chosen = os.environ.get("KDUMP_TEST_KERNEL_CACHE", "")
    return Path(chosen) if os.path.isabs(chosen) else cache_root() / "kernels"


def downloaded_deb(package: str) -> Path:
    """Debian's `package`, fetched once with `apt-get download` into the cache."""
    folder = cache_root() / "debs"
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    # A folder of its own: two parallel fetches never see each other's partial file.
    work = Path(tempfile.mkdtemp(prefix=".fetch.", dir=folder))
    try:
        work.chmod(0o777)  # apt-get download drops to _apt, which must be able to write here
        done = subprocess.run(["apt-get", "download", "-q", package], cwd=work,
                              capture_output=True, text=True)  # fmt: skip
        for deb in work.glob(f"{package}_*.deb"):
            os.replace(deb, folder / deb.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    found = sorted(folder.glob(f"{package}_*.deb"))
    if done.returncode != 0 or not found:
        raise KdumpError(f"apt-get download {package} failed: {done.stderr[-1000:]}")
    return found[-1]
