"""SSH targets: a real crash in QEMU dumped over user-mode networking into a real OpenSSH
server on 127.0.0.1 (the guest's 10.0.2.2), and the config rules for ssh targets and the
network. A wrong host key, a refused key and a server that is down are faults of
tests/test_faults_qemu.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kdump_mkinitrd.arming.sshsetup import setup
from kdump_mkinitrd.cli import main
from kdump_mkinitrd.config import parse
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.inspect_image import load_image
from kdump_mkinitrd.qemutest.sshd import TestServer
from kdump_mkinitrd.targets.ssh import SshTarget
from kdump_mkinitrd.targets.sshkeys import image_paths
from tests.conftest import Kernel, run_qemu_test_for

CLIENT_PROGRAMS = {"openssh": "ssh", "dropbear": "dbclient"}


@pytest.mark.qemu
@pytest.mark.parametrize("client", ["openssh", "dropbear"])
def test_ssh_target_end_to_end(kernel61: Kernel, tmp_path: Path, client: str) -> None:
    report = run_qemu_test_for(kernel61, tmp_path, "ssh", ssh_client=client)
    assert report.dump_dir is not None
    dump = Path(report.dump_dir)
    # The files are on the host side, written by the test sshd.
    assert dump.parent == tmp_path / "work" / "ssh-dumps"
    assert {f["name"] for f in report.files} == {
        "vmcore", "vmcore-dmesg.txt", "vmcore.json", "kdump-init.log",
    }  # fmt: skip
    assert all(f["mode"] == "0600" for f in report.files)
    record = json.loads((dump / "vmcore.json").read_text())
    assert record["format"] == "kdump-compressed-flattened"
    assert record["collector"] == "makedumpfile"
    assert record["target"].startswith("ssh:") and record["target"].endswith(str(dump.parent))
    assert report.checks["makedumpfile_rebuilds_flattened"]
    log = (dump / "kdump-init.log").read_text()
    assert "network: udhcpc: lease bound: 10.0.2.15/24 on eth0" in log
    assert f"client {client}" in log and "ssh capture saved" in log
    # The image holds no other client, so this one took the dump.
    image = load_image(tmp_path / "work" / "capture.img")
    programs = {m.path.rpartition("/")[2] for m in image.members if "bin/" in m.path}
    assert programs & set(CLIENT_PROGRAMS.values()) == {CLIENT_PROGRAMS[client]}
    # OpenSSH's calls share the first one's connection: one login for the whole dump.
    logins = (tmp_path / "work" / "sshd" / "sshd.log").read_text().count("Accepted publickey")
    assert logins == 1 if client == "openssh" else logins > 1
    print(report.summary())


SSH = "targets:\n  - {type: ssh, host: kdump@backup.example, path: /srv/crash}\n"


def test_ssh_target_defaults() -> None:
    config = parse(SSH, "k.yaml")
    target = config.targets[0]
    assert isinstance(target, SshTarget)
    assert (target.host, target.port, target.path) == ("kdump@backup.example", 22, "/srv/crash")
    # The documented defaults (README, kdump-mkinitrd.yaml(5)), where ssh-setup writes.
    assert (target.identity, target.known_hosts) == (
        "/etc/kdump-mkinitrd/ssh/id_ed25519",
        "/etc/kdump-mkinitrd/ssh/known_hosts",
    )
    assert target.device is None and target.fstype is None and target.client == "openssh"
    assert config.network.dhcp is True


def test_ssh_target_paths_match_the_template() -> None:
    text = (Path(__file__).parent.parent / "modules.d/ssh/ssh-target.sh.j2").read_text()
    key, known = image_paths(3)
    assert key == "/etc/kdump-mkinitrd/ssh/3/id_ed25519"
    assert known == "/etc/kdump-mkinitrd/ssh/3/known_hosts"
    assert '"/etc/kdump-mkinitrd/ssh"' in text and '"/id_ed25519"' in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("targets:\n  - {type: ssh, path: /x}\n", "key 'targets[0]': an ssh target needs 'host'"),
        (
            "targets:\n  - {type: ssh, host: -oProxyCommand=x}\n",
            "key 'targets[0].host': expected user@host",
        ),
        ("targets:\n  - {type: ssh, host: 'a b'}\n", "key 'targets[0].host': expected user@host"),
        ("targets:\n  - {type: ssh, host: h, port: 70000}\n", "must be at most 65535"),
        ("targets:\n  - {type: ssh, host: h, port: 0}\n", "must be at least 1"),
        (
            "targets:\n  - {type: ssh, host: h, device: /dev/vda}\n",
            "key 'targets[0].device': an ssh target takes no 'device'",
        ),
        (
            "targets:\n  - {type: ssh, host: h, identity: id}\n",
            "key 'targets[0].identity': must be an absolute path",
        ),
        (
            "targets:\n  - {type: disk, device: /dev/vda, fstype: ext4, host: h}\n",
            "key 'targets[0].host': only ssh targets take this key",
        ),
        (
            "targets:\n  - {type: nfs, export: 'h:/x', client: dropbear}\n",
            "key 'targets[0].client': only ssh targets take this key",
        ),
        (
            "targets:\n  - {type: ssh, host: h, client: putty}\n",
            "key 'targets[0].client': expected one of openssh, dropbear",
        ),
        (SSH + "network: {mac: 'zz'}\n", "key 'network.mac': expected aa:bb:cc:dd:ee:ff"),
        (SSH + "network: {interface: eth0, mac: '52:54:00:12:34:56'}\n", "not both"),
        (SSH + "network: {dhcp: false}\n", "dhcp: false needs a static 'address'"),
        (SSH + "network: {address: 10.0.0.2}\n", "key 'network.address': expected a.b.c.d/nn"),
        (SSH + "network: {dhcp: true, address: 10.0.0.2/24}\n", "needs dhcp: false"),
        (SSH + "network: {address: 10.0.0.2/24, dns: [x]}\n", "key 'network.dns[0]'"),
        ("network: {interface: eth0}\n", "key 'network': no target needs the network"),
    ],
)
def test_ssh_and_network_config_errors(text: str, message: str) -> None:
    with pytest.raises(KdumpError) as err:
        parse(text, "k.yaml")
    assert message in str(err.value)


def test_static_network_config() -> None:
    config = parse(
        SSH + "network: {interface: ens3, address: 192.0.2.10/24, gateway: 192.0.2.1, "
        "dns: [192.0.2.53]}\n",
        "k.yaml",
    )
    assert config.network.dhcp is False
    assert config.network.address == "192.0.2.10/24"


def test_ssh_setup_pins_the_servers_host_key(tmp_path: Path) -> None:
    """Against a real sshd on 127.0.0.1: a new key, and known_hosts holding exactly the
    server's host key under [127.0.0.1]:PORT (installing the key needs a login: not here)."""
    with TestServer(tmp_path / "server") as server:
        result = setup(
            "root@127.0.0.1",
            server.port,
            key=tmp_path / "client" / "id_ed25519",
            known_hosts=tmp_path / "client" / "known_hosts",
            install=False,
        )
        assert result.key_created and result.key.stat().st_mode & 0o777 == 0o600
        assert result.known_hosts.read_text() == server.known_hosts_line("127.0.0.1") + "\n"
        assert len(result.fingerprints) == 1 and "ED25519" in result.fingerprints[0]
        # Run again: the key is kept and the host's line replaced, not duplicated.
        again = setup("root@127.0.0.1", server.port, key=result.key,
                      known_hosts=result.known_hosts, install=False)  # fmt: skip
        assert not again.key_created
        assert result.known_hosts.read_text().count("\n") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="the server's private home needs root")
def test_ssh_setup_installs_the_key_once_and_the_key_logs_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kdump-mkinitrd ssh-setup` against a real sshd whose user's home is a folder of the
    test's: it logs in once (here with the server's already authorized key standing in for
    a password), appends the new public key to ~/.ssh/authorized_keys, and a second run adds
    nothing. Then the new key alone logs in, with only the pinned host keys trusted."""
    home = tmp_path / "home"
    with TestServer(tmp_path / "server", home=home) as server:
        key, known = tmp_path / "client" / "id_ed25519", tmp_path / "client" / "known_hosts"
        args = ["ssh-setup", f"{server.user}@127.0.0.1", "-p", str(server.port), "--key",
                str(key), "--known-hosts", str(known), "-o", f"IdentityFile={server.client_key}",
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"]  # fmt: skip
        assert main(args) == 0
        said = capsys.readouterr().out
        assert "(created)" in said and "installed " in said and "ED25519" in said
        public = key.with_name("id_ed25519.pub").read_text().strip()
        authorized = home / ".ssh" / "authorized_keys"
        assert authorized.read_text() == public + "\n"
        assert authorized.stat().st_mode & 0o077 == 0 and known.read_text().count("\n") == 1
        assert main(args) == 0
        assert authorized.read_text() == public + "\n" and "(existing)" in capsys.readouterr().out
        login = subprocess.run(
            ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
             "-o", f"UserKnownHostsFile={known}", "-o", "IdentitiesOnly=yes", "-i", str(key),
             "-p", str(server.port), f"{server.user}@127.0.0.1", "cat .ssh/authorized_keys"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert login.returncode == 0 and login.stdout == public + "\n", login.stderr
    assert server.log.read_text().count("Accepted publickey") == 3  # two set-ups, one login
