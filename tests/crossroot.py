"""The arm64 inputs of cross builds: the sysroot `make sysroot-arm64` records, and Debian's
arm64 kernel `make kernels-arm64` unpacks (for tests and qemu-test --arch arm64)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kdump_mkinitrd.qemutest.testcache import cache_root, kernel_cache
from tests.conftest import KVER_ARM64, REPO


def arm64_sysroot() -> Path:
    """The arm64 root tree: the path `make sysroot-arm64` recorded, made first if there is
    none yet (about 5 s when its .debs are cached)."""
    record = cache_root() / "sysroots" / "arm64.path"
    if record.is_file():
        path = Path(record.read_text().strip())
        if (path / ".complete").is_file():
            return path
    done = subprocess.run(
        ["make", "-s", "-C", str(REPO), "sysroot-arm64", f"KDUMP_TEST_CACHE={cache_root()}"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0 or not record.is_file():
        raise RuntimeError(f"make sysroot-arm64 failed: {done.stderr.strip()[-2000:]}")
    return Path(record.read_text().strip())


def arm64_kernel() -> Path:
    """The unpacked arm64 kernel package (boot/ and lib/modules/ under it)."""
    root = kernel_cache() / KVER_ARM64
    if not (root / "boot" / f"vmlinuz-{KVER_ARM64}").is_file():
        subprocess.run(["make", "-s", "-C", str(REPO), "kernels-arm64",
                        f"KDUMP_TEST_CACHE={cache_root()}"], check=True, timeout=1800)  # fmt: skip
    return root
