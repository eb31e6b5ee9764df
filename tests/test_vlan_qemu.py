"""The VLAN tests need a kernel that makes 802.1Q interfaces, which the build host's may not
(they skip there): run them again under a Debian kernel in QEMU, with 8021q and veth loaded
and this machine's root, read-only over 9p, as the guest's, so that the same test files, the
same Python and the same busybox run, with the guest's kernel doing the tagging."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from builder.guest_images import host_root_image
from builder.qemu import Boot, default_accel, run
from tests.conftest import REPO, Kernel

pytestmark = pytest.mark.qemu

VLAN_TESTS = [
    "tests/test_network_netns.py::test_address_on_the_vlan",
    "tests/test_network_netns.py::test_long_parent_name_gives_a_vlan_name",
    "tests/test_network_netns.py::test_wrong_vlan_gets_no_lease_in_time",
    "tests/test_hostonly_network.py::test_vlan_route_gives_parent_vid_and_8021q",
]


def test_vlan_tests_pass_under_a_debian_kernel(kernel61: Kernel, tmp_path: Path) -> None:
    # The guest's busybox prefers its own applets to the host's programs (its env has no -C).
    pytest_run = [
        "sh", "-c", 'cd "$0" && exec "$@"', str(REPO),
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", "--color=no",
        "-m", "not qemu", *VLAN_TESTS,
    ]  # fmt: skip
    image = tmp_path / "guest.img"
    boot_args = host_root_image(
        image, kernel61.kver, kernel61.kmoddir, [pytest_run], crash=False,
        writable=["/run", "/tmp"],
        environment=["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/run",
                     "PYTHONDONTWRITEBYTECODE=1"],
        modules=["8021q", "veth"],
    )  # fmt: skip
    result = run(
        Boot(
            kernel=kernel61.vmlinuz,
            initrd=image,
            cmdline="console=ttyS0 panic=-1",
            serial_log=tmp_path / "serial.log",
            memory="1G",
            accel=default_accel(),
            timeout=600,
            extra=boot_args,
        )
    )
    log = result.log.replace("\r", "")
    assert "kdump-test: command succeeded" in log, log[-4000:]
    # Every VLAN test ran and passed: none skipped for want of 802.1Q in this kernel.
    summary = re.findall(r"^(\d+) passed in ", log, re.M)
    assert summary == ["5"], log[-4000:]
    assert "skipped" not in log.split("kdump-test: running:")[-1]
