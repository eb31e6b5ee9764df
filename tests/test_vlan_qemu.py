"""The VLAN tests need a kernel that makes 802.1Q interfaces, which the build host's may not
(they skip there): run them again under a Debian kernel in QEMU, with 8021q and veth loaded
and this machine's root, read-only over 9p, as the guest's, so that the same test files, the
same Python and the same busybox run, with the guest's kernel doing the tagging."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Kernel
from tests.guest_pytest import passed_count, pytest_in_guest, scratch_folder

pytestmark = pytest.mark.qemu


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
    log = pytest_in_guest(kernel61, tmp_path, VLAN_TESTS, modules=["8021q", "veth"])
    # Every VLAN test ran and passed: none skipped for want of 802.1Q in this kernel.
    assert passed_count(log) == ["5"], log[-4000:]
