"""Shared fixtures: the real Debian kernels `make kernels` unpacks into the cache."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from kdump_mkinitrd.qemutest.run import Options, Report, run_qemu_test
from kdump_mkinitrd.qemutest.testcache import kernel_cache

REPO = Path(__file__).resolve().parent.parent
KERNEL_CACHE = kernel_cache()
KVER_61 = "6.1.0-56-amd64"
KVER_612 = "6.12.117+deb12-amd64"


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
