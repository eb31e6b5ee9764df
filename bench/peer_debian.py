"""Ours next to Debian's kdump-tools on the same Debian 12 guest and the same crash.

One QEMU process: boot 1 (kdump-tools, as installed, armed at boot), crash, boot 2 (the admin
switches to ours: kdump-tools disabled, our package installed, a disk target on the root LV),
crash, boot 3. Both save to /var/crash on the root LV, at the same crashkernel=.

Figures: the capture image's size, seconds from the panic to the tool's "saved" line on the
serial console, and from the panic to the login prompt of the rebooted system. The smallest
crashkernel= is not bisected here (each probe is two TCG boots of a full Debian system): the
part records the reservation both ran at and says so.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from kdump_mkinitrd.qemutest.debian_guest import build_deb
from tests.peer_kdump_guest import (
    CRASHKERNEL,
    DISABLE_KDUMP_TOOLS,
    OUR_CONFIG,
    OUR_IMAGE,
    OUR_SAVED,
    THEIR_IMAGE,
    THEIR_SAVED,
    Guest,
    boot,
    install_ours,
    kdump_tools_image,
    stop,
)

KEYS = ("capture_image_bytes", "crashkernel_mb", "smallest_crashkernel_mb",
        "panic_to_dump_saved_s", "panic_to_login_s", "dump_saved")  # fmt: skip
NOT_BISECTED = (f"not bisected: one crash each at crashkernel={CRASHKERNEL} (each probe is two "
                "TCG boots of a full Debian system)")  # fmt: skip


def _size(guest: Guest, path: str) -> int | None:
    code, said = guest.run(f"stat -L -c %s {path}")
    return int(said.split()[0]) if code == 0 else None


def _loaded(guest: Guest) -> bool:
    return guest.run("cat /sys/kernel/kexec_crash_loaded")[1].strip() == "1"


def part_peer_debian(work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    image = kdump_tools_image(log=work / "image-build.log")
    deb = build_deb(work / "deb")
    theirs: dict[str, Any] = {"tool": "kdump-tools (Debian 12)"}
    ours: dict[str, Any] = {"tool": "kdump-mkinitrd (our .deb)"}
    guest = boot(image, work)
    try:
        theirs["armed_at_boot"] = _loaded(guest)
        theirs["capture_image_bytes"] = _size(guest, THEIR_IMAGE)
        theirs.update(guest.crash(THEIR_SAVED))
        theirs["dump_saved"] = guest.run("ls /var/crash/2*/dump.*")[0] == 0

        code, said = guest.run(DISABLE_KDUMP_TOOLS)
        assert code == 0, said
        code, said = install_ours(guest, deb)
        assert code == 0, said
        guest.run(f"printf '%s' {shlex.quote(OUR_CONFIG)} >> /etc/kdump-mkinitrd.yaml")
        code, said = guest.run("systemctl restart kdump-mkinitrd", 1200)
        assert code == 0, said
        ours["armed_at_boot"] = None  # armed by a restart, not at boot (the test covers boots)
        ours["armed"] = _loaded(guest)
        ours["capture_image_bytes"] = _size(guest, OUR_IMAGE)
        ours.update(guest.crash(OUR_SAVED))
        listed = guest.run("kdump-mkinitrd list-dumps --json /var/crash")[1]
        try:
            dumps = json.loads(listed)
        except ValueError:
            dumps = []
        ours["dump_saved"] = any(d.get("state") == "complete" for d in dumps)
    finally:
        stop(guest)
    for figures in (theirs, ours):
        figures["crashkernel_mb"] = int(CRASHKERNEL.rstrip("M"))
        figures["smallest_crashkernel_mb"] = None
        figures["smallest_crashkernel_note"] = NOT_BISECTED
    return {"peer_debian_kdump_tools": theirs, "ours_in_debian_guest": ours}


def markdown(results: dict[str, Any]) -> list[str]:
    theirs = results.get("peer_debian_kdump_tools")
    ours = results.get("ours_in_debian_guest")
    if not theirs and not ours:
        return []
    lines = ["", "## Debian's kdump-tools side by side (Debian 12 guest, same crash)", ""]
    if not ours or "error" in (theirs or {}):
        return [*lines, f"error: {(theirs or {}).get('error', 'no figures')}"]

    def cell(figures: dict[str, Any], key: str) -> str:
        value = figures.get(key)
        if value is None:
            return "-"
        if key == "capture_image_bytes":
            return f"{value / 1e6:.2f} MB"
        return f"{value} s" if key.endswith("_s") else str(value)

    lines += ["| figure | kdump-tools | ours |", "| --- | --- | --- |"]
    lines += [f"| {key} | {cell(theirs, key)} | {cell(ours, key)} |" for key in KEYS]
    return [*lines, "", ours.get("smallest_crashkernel_note", "")]
