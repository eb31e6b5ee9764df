"""Another kdump armed at boot on this host: Debian's kdump-tools, or the `kdump.service` of
Fedora's kdump-utils and SUSE's kdump.

Only one capture kernel can be loaded. When the admin configured and enabled another tool,
`register` leaves kdump to it rather than replace its target (often NFS or SSH) with ours,
and says how to switch. Everything here reads files under a root prefix and runs nothing, so
it holds at boot whichever of the two services starts first, and tests can point it at a tree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.importing import shellfile

DEBIAN_DEFAULTS = "etc/default/kdump-tools"
# `kdump-config savecore` sends the dump to each of these that is set, and to KDUMP_COREDIR on
# the local disk only when none is.
DEBIAN_REMOTE_KEYS = ("NFS", "SSH", "FTP")
KDUMP_CONF = "etc/kdump.conf"  # kdump-utils (Fedora, RHEL)
SUSE_SYSCONFIG = "etc/sysconfig/kdump"
KDUMP_CONF_TARGETS = ("raw", "nfs", "ssh", "ext2", "ext3", "ext4", "xfs", "btrfs", "virtiofs")


@dataclass(frozen=True)
class PeerKdump:
    """Another kdump that will arm (or has armed) the capture kernel at boot."""

    name: str
    found: tuple[str, ...]  # what says it is armed, in words
    target: str | None  # where its dumps go, as its config says it
    switch: str  # how to hand kdump over to us

    def message(self) -> str:
        facts = ", ".join([*self.found, *([f"target {self.target}"] if self.target else [])])
        return (f"{self.name} is armed here ({facts}): not loading a second capture kernel. "
                f"To switch to kdump-mkinitrd: {self.switch}")  # fmt: skip


class PeerArmed(KdumpError):
    """Another kdump is armed at boot: `register` leaves kdump to it (EXIT_PEER_ARMED)."""

    def __init__(self, peer: PeerKdump) -> None:
        super().__init__(peer.message())
        self.peer = peer


def armed_peers(root: Path = Path("/")) -> list[PeerKdump]:
    """The other kdumps enabled at boot under `root`, with their configs saying they arm."""
    return [p for p in (_debian_kdump_tools(root), _kdump_service(root)) if p is not None]


def refuse_if_peer_armed(root: Path = Path("/")) -> None:
    peers = armed_peers(root)
    if peers:
        raise PeerArmed(peers[0])


_CONFIGURE = (
    "configure /etc/kdump-mkinitrd.yaml (`kdump-mkinitrd import-config -o "
    "/etc/kdump-mkinitrd.yaml` carries this kdump's settings over)"
)


def shell_assignments(text: str) -> dict[str, str]:
    """The variables a file of shell assignments (like /etc/default/*) sets, as far as they
    can be read without running it (kdump_mkinitrd.importing.shellfile)."""
    return {s.name: s.value for s in shellfile.parse(text) if s.name and s.value is not None}


def _enabled(root: Path, unit: str, sysv: str | None) -> str | None:
    """How `unit` is enabled at boot under root, in words, or None. On systemd, a symlink in
    some /etc/systemd/system/*.wants (kdump-tools is wanted by basic.target) unless the unit is
    masked; without systemd running, the SysV start links of runlevels 2 to 5 (`update-rc.d`)."""
    units = root / "etc/systemd/system"
    if (root / "run/systemd/system").is_dir():  # how sd_booted(3) tells systemd runs
        if (units / unit).is_symlink() and (units / unit).resolve() == Path("/dev/null"):
            return None
        # Not glob("*.wants/unit"): it skips symlinks whose target is not under root.
        for wants in sorted(units.glob("*.wants")):
            if (wants / unit).is_symlink():
                return f"{unit} enabled ({wants.name})"
        return None
    if sysv is not None:
        for level in "2345":
            rc = root / f"etc/rc{level}.d"
            names = os.listdir(rc) if rc.is_dir() else []
            if any(re.fullmatch(rf"S\d\d{re.escape(sysv)}", name) for name in names):
                return f"/etc/init.d/{sysv} started in runlevel {level}"
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _debian_kdump_tools(root: Path) -> PeerKdump | None:
    text = _read(root / DEBIAN_DEFAULTS)
    if text is None:
        return None
    values = shell_assignments(text)
    # kdump-config's own test: unset, empty or "0" means it does not load.
    use = values.get("USE_KDUMP", "")
    if use in ("", "0"):
        return None
    enabled = _enabled(root, "kdump-tools.service", "kdump-tools")
    if enabled is None:
        return None
    remote = [f"{key}={values[key]}" for key in DEBIAN_REMOTE_KEYS if values.get(key)]
    local = f"KDUMP_COREDIR={values.get('KDUMP_COREDIR') or '/var/crash'}"
    target = " and ".join(remote) or local
    return PeerKdump(
        name="Debian's kdump-tools",
        found=(f"USE_KDUMP={use} in /{DEBIAN_DEFAULTS}", enabled),
        target=target,
        switch="systemctl disable --now kdump-tools, set USE_KDUMP=0 in "
        f"/{DEBIAN_DEFAULTS}, {_CONFIGURE}",
    )


def _kdump_service(root: Path) -> PeerKdump | None:
    """kdump.service: kdump-utils (/etc/kdump.conf) or SUSE's kdump (/etc/sysconfig/kdump)."""
    enabled = _enabled(root, "kdump.service", None)
    if enabled is None:
        return None
    conf = _read(root / KDUMP_CONF)
    target: str | None
    if conf is not None:
        name, target = "kdump-utils' kdump", _kdump_conf_target(conf)
    else:
        name = "SUSE's kdump" if (root / SUSE_SYSCONFIG).is_file() else "kdump.service"
        saved = shell_assignments(_read(root / SUSE_SYSCONFIG) or "").get("KDUMP_SAVEDIR")
        target = f"KDUMP_SAVEDIR={saved}" if saved else None
    return PeerKdump(
        name=name,
        found=(enabled,),
        target=target,
        switch=f"systemctl disable --now kdump, {_CONFIGURE}",
    )


def _kdump_conf_target(text: str) -> str:
    """The target line of a kdump.conf; without one kdump-utils dumps to the root filesystem."""
    path = "/var/crash"
    target = None
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == "path":
            path = words[1]
        elif len(words) >= 2 and words[0] in KDUMP_CONF_TARGETS and target is None:
            target = f"{words[0]} {words[1]}"
    return f"{target or 'root filesystem'}, path {path}"
