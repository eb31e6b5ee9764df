"""The check that qemu-test's guests send packets to the test servers only: a real guest that
sends some elsewhere on purpose, recorded by QEMU's filter-dump, must be caught. (The network
runs of qemu-test assert the check passes: tests/test_ssh_qemu.py, tests/test_nfs_qemu.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from kdump_mkinitrd.qemutest.guest_images import utility_image
from kdump_mkinitrd.qemutest.guest_traffic import destinations_outside, recording
from kdump_mkinitrd.qemutest.qemu import Boot, default_accel, run
from kdump_mkinitrd.qemutest.run import GUEST_HOST
from tests.conftest import Kernel

pytestmark = pytest.mark.qemu


def test_packets_to_other_addresses_are_caught(kernel61: Kernel, tmp_path: Path) -> None:
    image = tmp_path / "stray.img"
    template = Path(__file__).parent / "data" / "stray-packets.sh.j2"
    utility_image(image, kernel61.kver, kernel61.kmoddir, str(template), {},
                  modules=["virtio_pci", "virtio_net"])  # fmt: skip
    pcap = tmp_path / "guest.pcap"
    # restrict=on: QEMU drops what the guest sends past its own network, so nothing leaves
    # this machine while the guest tries.
    result = run(
        Boot(
            kernel=kernel61.vmlinuz,
            initrd=image,
            cmdline="console=ttyS0 panic=-1 quiet",
            serial_log=tmp_path / "serial.log",
            accel=default_accel(),
            timeout=180,
            extra=("-netdev", "user,id=n0,ipv6=off,restrict=on",
                   "-device", "virtio-net-pci,netdev=n0", *recording(pcap)),
        )
    )  # fmt: skip
    assert "stray-packets: done" in result.log, result.log[-3000:]
    everything = destinations_outside(pcap, set())
    assert everything.get(GUEST_HOST, 0) >= 1, everything
    outside = destinations_outside(pcap, {GUEST_HOST})
    assert set(outside) == {"10.0.2.3", "192.0.2.1"}, outside
