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

# The guest mounts a fresh tmpfs over one host folder for pytest's temporary files and HOME;
# it must hide neither the checkout nor the Python that runs it, wherever those live (people
# clone into /tmp to try a project).
SCRATCH_CHOICES = ("/run", "/var/tmp", "/tmp")


def scratch_folder(needed: list[Path]) -> str:
    for folder in SCRATCH_CHOICES:
        if not any(path.is_relative_to(folder) for path in needed):
            return folder
    raise AssertionError(f"every one of {SCRATCH_CHOICES} holds one of {needed}")


def test_scratch_folder_never_hides_the_checkout() -> None:
    assert scratch_folder([Path("/tmp/kdump-clone"), Path("/usr")]) == "/run"
    assert scratch_folder([Path("/run/user/0/kdump"), Path("/tmp/x")]) == "/var/tmp"
    assert scratch_folder([Path("/run/a"), Path("/var/tmp/b")]) == "/tmp"


VLAN_TESTS = [
    "tests/test_network_netns.py::test_address_on_the_vlan",
    "tests/test_network_netns.py::test_long_parent_name_gives_a_vlan_name",
    "tests/test_network_netns.py::test_wrong_vlan_gets_no_lease_in_time",
    "tests/test_hostonly_network.py::test_vlan_route_gives_parent_vid_and_8021q",
]


def test_vlan_tests_pass_under_a_debian_kernel(kernel61: Kernel, tmp_path: Path) -> None:
    needed = [REPO, Path(sys.executable).resolve(), Path(sys.prefix), Path(sys.base_prefix)]
    scratch = scratch_folder([path.resolve() for path in needed])
    # The guest's busybox prefers its own applets to the host's programs (its env has no -C).
    pytest_run = [
        "sh", "-c", 'cd "$0" && exec "$@"', str(REPO),
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", "--color=no",
        "-m", "not qemu", *VLAN_TESTS,
    ]  # fmt: skip
    image = tmp_path / "guest.img"
    boot_args = host_root_image(
        image, kernel61.kver, kernel61.kmoddir, [pytest_run], crash=False,
        writable=[scratch],
        environment=["PATH=/usr/sbin:/usr/bin:/sbin:/bin", f"HOME={scratch}",
                     f"TMPDIR={scratch}", "PYTHONDONTWRITEBYTECODE=1"],
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
