"""Shared fixtures: the real Debian kernels `make kernels` unpacks into the cache."""

from __future__ import annotations

import gzip
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from kdump_mkinitrd.qemutest.run import Options, Report, run_qemu_test
from kdump_mkinitrd.qemutest.testcache import kernel_cache
from tests.arm64_images import zboot

REPO = Path(__file__).resolve().parent.parent
KERNEL_CACHE = kernel_cache()
KVER_61 = "6.1.0-56-amd64"
KVER_612 = "6.12.117+deb12-amd64"
KVER_ARM64 = "6.1.0-56-arm64"


def _duration_class(item: pytest.Item) -> int:
    """0: a whole Debian system or a test file rerun in a guest (minutes each); 1: another
    QEMU test; 2: the rest."""
    module = getattr(item, "module", None)
    if module is not None and (module.__name__.endswith("_guest")
                               or hasattr(module, "pytest_in_guest")):  # fmt: skip
        return 0
    return 1 if item.get_closest_marker("qemu") else 2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: pytest-xdist hands tests out in this order, and a multi-minute guest
    test started last would leave the other core idle at the end of `make test`."""
    items.sort(key=_duration_class)


@dataclass(frozen=True)
class Kernel:
    kver: str
    root: Path

    @property
    def kmoddir(self) -> Path:
        return self.root / "lib/modules" / self.kver

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.kver}"


def _kernel(kver: str) -> Kernel:
    kernel = Kernel(kver, KERNEL_CACHE / kver)
    if not kernel.vmlinuz.is_file():
        # `make test` fetches the kernels first; a missing one is a set-up failure, not a skip.
        pytest.fail(f"kernel {kver} is not unpacked in {KERNEL_CACHE}: run `make kernels`")
    return kernel


@pytest.fixture(scope="session")
def kernel61() -> Kernel:
    return _kernel(KVER_61)


@pytest.fixture(scope="session")
def kernel612() -> Kernel:
    return _kernel(KVER_612)


@pytest.fixture(scope="session")
def kernel_arm64() -> Kernel:
    """Debian's arm64 kernel; its vmlinuz is a plain (uncompressed) arm64 Image."""
    return _kernel(KVER_ARM64)


@dataclass(frozen=True)
class Arm64Files:
    """The real arm64 Image and the same kernel as other distributions ship it."""

    image: Path  # Debian: the Image itself
    gzip: Path  # Ubuntu: the Image gzip-compressed
    zboot_gzip: Path  # Fedora: EFI zboot, gzip payload
    zboot_zstd: Path  # EFI zboot, zstd payload (CONFIG_KERNEL_ZSTD)


@pytest.fixture(scope="session")
def arm64_files(kernel_arm64: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Arm64Files:
    out = tmp_path_factory.mktemp("arm64-kernels")
    image = kernel_arm64.vmlinuz.read_bytes()
    files = Arm64Files(kernel_arm64.vmlinuz, out / "vmlinuz.gz", out / "vmlinuz.zboot-gzip",
                       out / "vmlinuz.zboot-zstd")  # fmt: skip
    files.gzip.write_bytes(gzip.compress(image, compresslevel=6, mtime=0))
    files.zboot_gzip.write_bytes(zboot(image, "gzip"))
    files.zboot_zstd.write_bytes(zboot(image, "zstd22"))
    return files


# What a test's own config for qemu-test ends with.
QEMU_TEST_ACTIONS = "failure_action: poweroff\nfinal_action: poweroff\ndevice_timeout: 30\n"


def run_qemu_test_for(
    kernel: Kernel, tmp_path: Path, target: str, config: str | None = None, **options: Any
) -> Report:
    """qemu-test with its own test server for `target` (and its own config unless one is
    given); fails with the end of the serial log."""
    path = None
    if config is not None:
        path = tmp_path / "kdump.yaml"
        path.write_text(config + QEMU_TEST_ACTIONS)
    settings = Options(kernel.kver, kernel.kmoddir, kernel.vmlinuz, config=path,
                       keep=tmp_path / "work", target=target)  # fmt: skip
    report = run_qemu_test(replace(settings, **options))
    assert report.ok, report.summary() + "\n" + Path(report.serial_log).read_text()[-4000:]
    # Read from QEMU's record of every frame the guest's NIC sent.
    assert report.checks["guest_sent_only_to_the_test_servers"]
    return report
