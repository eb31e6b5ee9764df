"""Another kdump armed at boot: `register` leaves kdump to it, `status` says so.

The trees are laid out from Debian's real kdump-tools package as its maintainer scripts leave
them: /etc/default/kdump-tools is the package's template (postinst copies it with USE_KDUMP
from debconf, default 1), the unit and init script are the package's, and enabling it makes
the symlink deb-systemd-helper makes (the unit's WantedBy).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdump_mkinitrd.arming import registration
from kdump_mkinitrd.arming.peers import PeerArmed, armed_peers, refuse_if_peer_armed
from kdump_mkinitrd.qemutest.testcache import downloaded_deb

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def kdump_tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian's kdump-tools package, unpacked (downloaded once into the shared cache)."""
    tree = tmp_path_factory.mktemp("kdump-tools")
    subprocess.run(["dpkg-deb", "-x", str(downloaded_deb("kdump-tools")), str(tree)], check=True)
    return tree


def debian_host(pkg: Path, root: Path, defaults: str | None = None, enabled: bool = True,
                systemd: bool = True) -> Path:  # fmt: skip
    """A root with kdump-tools installed; `defaults` replaces the shipped /etc/default file."""
    template = (pkg / "usr/share/kdump-tools/kdump-tools.conf").read_text()
    (root / "etc/default").mkdir(parents=True)
    (root / "etc/default/kdump-tools").write_text(template if defaults is None else defaults)
    for rel in ("lib/systemd/system/kdump-tools.service", "etc/init.d/kdump-tools"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pkg / rel, root / rel)
    if systemd:
        (root / "run/systemd/system").mkdir(parents=True)
    if enabled:
        unit = (root / "lib/systemd/system/kdump-tools.service").read_text()
        wanted_by = re.search(r"^WantedBy=(\S+)", unit, re.M)
        assert wanted_by, unit
        wants = root / f"etc/systemd/system/{wanted_by[1]}.wants"
        wants.mkdir(parents=True)
        (wants / "kdump-tools.service").symlink_to("/lib/systemd/system/kdump-tools.service")
    return root


def shipped_with(pkg: Path, changes: dict[str, str]) -> str:
    """The shipped template with lines replaced: {old line: new line}."""
    text = (pkg / "usr/share/kdump-tools/kdump-tools.conf").read_text()
    for old, new in changes.items():
        assert f"\n{old}\n" in text, old
        text = text.replace(f"\n{old}\n", f"\n{new}\n")
    return text


def test_the_shipped_config_enabled_is_armed_with_its_local_target(
    kdump_tools: Path, tmp_path: Path
) -> None:
    root = debian_host(kdump_tools, tmp_path)
    [peer] = armed_peers(root)
    assert peer.name == "Debian's kdump-tools"
    assert peer.found == ("USE_KDUMP=1 in /etc/default/kdump-tools",
                          "kdump-tools.service enabled (basic.target.wants)")  # fmt: skip
    assert peer.target == "KDUMP_COREDIR=/var/crash"
    with pytest.raises(PeerArmed) as refused:
        refuse_if_peer_armed(root)
    message = str(refused.value)
    assert "\n" not in message
    assert "not loading a second capture kernel" in message
    assert "systemctl disable --now kdump-tools, set USE_KDUMP=0" in message


def test_a_remote_target_is_named(kdump_tools: Path, tmp_path: Path) -> None:
    defaults = shipped_with(kdump_tools, {'#NFS="<nfs mount>"': 'NFS="server:/export"'})
    [peer] = armed_peers(debian_host(kdump_tools, tmp_path, defaults))
    assert peer.target == "NFS=server:/export"
    assert "target NFS=server:/export" in peer.message()
    # savecore sends it to each remote target set
    defaults = shipped_with(kdump_tools, {'#FTP="<server>:<path>"': "FTP=ftp.example:/in"})
    defaults = defaults.replace('#NFS="<nfs mount>"', 'NFS="server:/export"')
    [peer] = armed_peers(debian_host(kdump_tools, tmp_path / "both", defaults))
    assert peer.target == "NFS=server:/export and FTP=ftp.example:/in"


@pytest.mark.parametrize(
    "line, armed",
    [
        ("USE_KDUMP=0", False),
        ("#USE_KDUMP=1", False),  # unset: kdump-config does not load
        ("USE_KDUMP=", False),
        ('USE_KDUMP="1"', True),
        ("USE_KDUMP='0'", False),
        ("export USE_KDUMP=1  # on", True),
        ("USE_KDUMP=1 true", False),  # a command's environment, not the file's
        ("USE_KDUMP=1; USE_KDUMP=0", False),  # the last one wins
    ],
)
def test_use_kdump_is_read_as_the_shell_reads_it(
    kdump_tools: Path, tmp_path: Path, line: str, armed: bool
) -> None:
    root = debian_host(kdump_tools, tmp_path, shipped_with(kdump_tools, {"USE_KDUMP=1": line}))
    assert bool(armed_peers(root)) is armed


def test_not_enabled_or_masked_is_not_armed(kdump_tools: Path, tmp_path: Path) -> None:
    assert armed_peers(debian_host(kdump_tools, tmp_path / "a", enabled=False)) == []
    masked = debian_host(kdump_tools, tmp_path / "b")
    (masked / "etc/systemd/system/kdump-tools.service").symlink_to("/dev/null")
    assert armed_peers(masked) == []


def test_without_systemd_the_sysv_start_links_decide(kdump_tools: Path, tmp_path: Path) -> None:
    root = debian_host(kdump_tools, tmp_path, enabled=False, systemd=False)
    for level in "2345":  # what `update-rc.d kdump-tools disable` leaves
        (root / f"etc/rc{level}.d").mkdir(parents=True)
        (root / f"etc/rc{level}.d/K01kdump-tools").symlink_to("../init.d/kdump-tools")
    assert armed_peers(root) == []
    (root / "etc/rc2.d/K01kdump-tools").rename(root / "etc/rc2.d/S01kdump-tools")
    [peer] = armed_peers(root)
    assert peer.found[1] == "/etc/init.d/kdump-tools started in runlevel 2"


def test_kdump_utils_enabled_is_armed(tmp_path: Path) -> None:
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    conf = "# kdump.conf\nnfs my.server:/export/tmp\npath /var/crash/here\ncore_collector cp\n"
    (tmp_path / "etc/kdump.conf").write_text(conf)
    assert armed_peers(tmp_path) == []  # installed, not enabled
    (wants / "kdump.service").symlink_to("/usr/lib/systemd/system/kdump.service")
    [peer] = armed_peers(tmp_path)
    assert peer.target == "nfs my.server:/export/tmp, path /var/crash/here"
    assert "systemctl disable --now kdump," in peer.message()


def cli(root: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "kdump.yaml"
    config.write_text("targets:\n  - {type: disk, device: LABEL=dumps, fstype: ext4}\n")
    env = {**os.environ, "KDUMP_MKINITRD_PEER_ROOT": str(root),
           "KDUMP_MKINITRD_STATE_DIR": str(tmp_path / "state")}  # fmt: skip
    command = [sys.executable, "-m", "kdump_mkinitrd.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, check=False)


def test_register_refuses_before_building_and_status_says_why(
    kdump_tools: Path, tmp_path: Path
) -> None:
    defaults = shipped_with(kdump_tools, {'#SSH="<user at server>"': "SSH=dumps@vault"})
    root = debian_host(kdump_tools, tmp_path / "root", defaults)
    image = tmp_path / "kdump.img"
    # A config naming no target: the refusal comes before any default target is picked.
    (tmp_path / "empty.yaml").write_text("# nothing configured\n")
    proc = cli(root, tmp_path, "register", "-c", str(tmp_path / "empty.yaml"),
               "--image", str(image))  # fmt: skip
    assert proc.returncode == registration.EXIT_PEER_ARMED == 5, proc.stderr
    assert proc.stderr == (
        "kdump-mkinitrd: Debian's kdump-tools is armed here (USE_KDUMP=1 in "
        "/etc/default/kdump-tools, kdump-tools.service enabled (basic.target.wants), target "
        "SSH=dumps@vault): not loading a second capture kernel. To switch to kdump-mkinitrd: "
        "systemctl disable --now kdump-tools, set USE_KDUMP=0 in /etc/default/kdump-tools, "
        "configure /etc/kdump-mkinitrd.yaml (`kdump-mkinitrd import-config -o "
        "/etc/kdump-mkinitrd.yaml` carries this kdump's settings over)\n"
    )
    assert not image.exists()

    status = cli(root, tmp_path, "status")
    assert status.returncode == 5
    assert "Debian's kdump-tools is armed here" in status.stdout
    info = json.loads(cli(root, tmp_path, "status", "--json").stdout)
    assert "target SSH=dumps@vault" in info["peer_armed"]

    # Its capture kernel is not ours to unload (package removal stops our unit).
    unregister = cli(root, tmp_path, "unregister")
    assert unregister.returncode == 0, unregister.stderr
    assert unregister.stdout == (
        "left the capture kernel loaded: Debian's kdump-tools armed it, not kdump-mkinitrd\n"
    )

    # Switched as the message says: register goes past the check.
    (root / "etc/systemd/system/basic.target.wants/kdump-tools.service").unlink()
    assert cli(root, tmp_path, "status").returncode != 5
    proc = cli(root, tmp_path, "register", "-c", str(tmp_path / "kdump.yaml"),
               "--image", str(image))  # fmt: skip
    assert proc.returncode != 5
    assert "kdump-tools" not in proc.stderr
