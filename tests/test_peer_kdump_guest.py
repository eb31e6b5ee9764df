"""Migration on a real Debian 12 system: Debian's kdump-tools installed, configured with an NFS
target and armed at boot; then our package comes. Ours must not load a second capture kernel
or replace the admin's target: it says why at boot and in `status`, and arms once the admin
switched as its message says.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from kdump_mkinitrd.arming.registration import EXIT_PEER_ARMED
from kdump_mkinitrd.qemutest.debian_guest import build_deb
from tests.peer_kdump_guest import (
    DISABLE_KDUMP_TOOLS,
    OUR_CONFIG,
    boot,
    install_ours,
    kdump_tools_image,
    stop,
)

NFS = "10.0.2.2:/srv/crash"  # never reached: kdump-tools checks it only in the capture kernel
REFUSAL = "Debian's kdump-tools is armed here"
READY = re.compile(r"current state\s*:\s*ready to kdump")  # not "Not ready to kdump"


@pytest.mark.qemu
def test_ours_leaves_kdump_to_armed_kdump_tools_until_switched(tmp_path: Path) -> None:
    image = kdump_tools_image(log=tmp_path / "image-build.log")
    deb = build_deb(tmp_path / "deb")
    guest = boot(image, tmp_path)
    try:
        # Boot 1: kdump-tools made its capture initrd in the guest and loaded it.
        assert guest.run("cat /sys/kernel/kexec_crash_loaded")[1].strip() == "1"
        said = guest.run("kdump-config status")[1]
        assert READY.search(said), said
        # The admin's remote target.
        code, said = guest.run(f"sed -i 's|^#NFS=.*|NFS=\"{NFS}\"|' /etc/default/kdump-tools "
                               f"&& grep -x 'NFS=\"{NFS}\"' /etc/default/kdump-tools")  # fmt: skip
        assert code == 0, said
        code, said = install_ours(guest, deb)
        assert code == 0, said
        assert REFUSAL in guest.run("journalctl -u kdump-mkinitrd --no-pager -o cat")[1]
        code, said = guest.run(f"printf '%s' {shlex.quote(OUR_CONFIG)} >> /etc/kdump-mkinitrd.yaml")
        assert code == 0, said

        guest.reboot()
        # Boot 2: kdump-tools armed again; ours refused, naming the target, and loaded nothing.
        assert guest.run("cat /sys/kernel/kexec_crash_loaded")[1].strip() == "1"
        assert READY.search(guest.run("kdump-config status")[1])
        journal = guest.run("journalctl -b -u kdump-mkinitrd --no-pager -o cat")[1]
        refusals = [line for line in journal.splitlines() if REFUSAL in line]
        assert len(refusals) == 1, journal
        assert f"target NFS={NFS}" in refusals[0]
        assert "systemctl disable --now kdump-tools" in refusals[0]
        assert guest.run("test -e /var/lib/kdump-mkinitrd/loaded.json")[0] != 0
        code, said = guest.run("kdump-mkinitrd status")
        assert code == EXIT_PEER_ARMED, said
        assert REFUSAL in said

        # The switch, as the message says: ours arms.
        code, said = guest.run(DISABLE_KDUMP_TOOLS)
        assert code == 0, said
        assert guest.run("cat /sys/kernel/kexec_crash_loaded")[1].strip() == "0"
        code, said = guest.run("systemctl restart kdump-mkinitrd", 1200)
        assert code == 0, said + guest.run("journalctl -b -u kdump-mkinitrd --no-pager")[1]
        assert guest.run("cat /sys/kernel/kexec_crash_loaded")[1].strip() == "1"
        code, said = guest.run("kdump-mkinitrd status")
        assert code == 0, said
        assert "kdump-tools" not in said
    finally:
        stop(guest)
