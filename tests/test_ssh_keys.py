"""The key and pinned host keys an ssh target builds in, for OpenSSH's client and dropbear's:
real keys from ssh-keygen, real known_hosts files (hashed, lists, wildcards, markers), real
dropbearconvert, and images whose built-in files the real dbclient then logs in with."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kdump_mkinitrd.arming.sshsetup import ensure_key
from kdump_mkinitrd.config import parse
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.build import BuildRequest, build
from kdump_mkinitrd.image.inspect_image import LoadedImage, load_image
from kdump_mkinitrd.image.render import render
from kdump_mkinitrd.paths import MODULES_DIR
from kdump_mkinitrd.qemutest.sshd import TestServer
from kdump_mkinitrd.targets import image_files
from kdump_mkinitrd.targets.sshkeys import image_paths, pinned_lines
from tests.conftest import Kernel


def _blob(key: Path) -> str:
    return key.with_name(key.name + ".pub").read_text().split()[1]


def _hashed(name: str, line_rest: str, tmp_path: Path) -> str:
    """`name`'s line as OpenSSH hashes it (ssh-keygen -H, HashKnownHosts)."""
    path = tmp_path / "hashed_known_hosts"
    path.write_text(f"{name} {line_rest}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(path)], check=True, capture_output=True)
    line = path.read_text().strip()
    assert line.startswith("|1|") and name not in line
    return line


def test_pinned_lines_follow_openssh_host_patterns(tmp_path: Path) -> None:
    ensure_key(tmp_path / "a")
    rest = f"ssh-ed25519 {_blob(tmp_path / 'a')}"
    text = "\n".join([
        "# a comment",
        f"other.example {rest}",
        _hashed("[10.0.2.2]:2222", rest, tmp_path),
        "backup,[10.0.2.2]:2222 ssh-rsa AAAAB3NzaC1yc2E",
        f"10.0.2.* {rest}",  # a wildcard: port 22 only
        f"@cert-authority [10.0.2.2]:2222 ssh-ed25519 {_blob(tmp_path / 'a')}",
        f"*,![10.0.2.2]:2222 {rest}",  # negated for exactly this host
    ])  # fmt: skip
    openssh = pinned_lines(text, "10.0.2.2", 2222, "openssh")
    assert len(openssh) == 3 and openssh[0].startswith("|1|")
    assert openssh[1].startswith("backup,") and openssh[2].startswith("@cert-authority")
    # dbclient needs the bare host first on each line and knows no markers.
    assert pinned_lines(text, "10.0.2.2", 2222, "dropbear") == [
        f"10.0.2.2 {rest}",
        "10.0.2.2 ssh-rsa AAAAB3NzaC1yc2E",
    ]
    assert pinned_lines(text, "10.0.2.2", 22, "openssh") == [
        f"10.0.2.* {rest}",
        f"*,![10.0.2.2]:2222 {rest}",
    ]
    assert pinned_lines(text, "10.0.2.3", 2222, "dropbear") == [f"10.0.2.3 {rest}"]
    # Host names match without regard to case, hashed ones too (ssh hashes the lowercased
    # name); dbclient gets the name as the config spells it, which is what it compares.
    names = f"Backup.Example {rest}\n" + _hashed("[backup.example]:2222", rest, tmp_path)
    assert pinned_lines(names, "BACKUP.example", 22, "dropbear") == [f"BACKUP.example {rest}"]
    assert pinned_lines(names, "backup.EXAMPLE", 2222, "openssh") == [names.splitlines()[1]]


def _config(tmp_path: Path, client: str, host: str = "10.0.2.2", port: int = 2222) -> str:
    key = tmp_path / "id_ed25519"
    ensure_key(key)
    if not (tmp_path / "known_hosts").exists():
        ensure_key(tmp_path / "host_key")
        name = f"[{host}]:{port}" if port != 22 else host
        host_blob = _blob(tmp_path / "host_key")
        (tmp_path / "known_hosts").write_text(
            f"elsewhere ssh-ed25519 {_blob(key)}\n{name} ssh-ed25519 {host_blob}\n"
        )
    return (
        f"targets:\n  - type: ssh\n    host: kdump@{host}\n    port: {port}\n"
        f"    identity: {key}\n    known_hosts: {tmp_path / 'known_hosts'}\n"
        f"    client: {client}\n"
        "kernel_modules: [virtio_net]\ncapture: {stage: static}\n"
    )


def test_dropbear_key_is_converted_and_keeps_the_same_public_key(tmp_path: Path) -> None:
    config = parse(_config(tmp_path, "dropbear"), str(tmp_path / "kdump.yaml"))
    key, known = image_files(config)
    assert (key.path, known.path) == image_paths(0)
    assert key.data != (tmp_path / "id_ed25519").read_bytes()  # not OpenSSH's format
    converted = tmp_path / "converted"
    converted.write_bytes(key.data)
    public = subprocess.run(["dropbearkey", "-y", "-f", str(converted)], check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    assert _blob(tmp_path / "id_ed25519") in public
    host_blob = _blob(tmp_path / "host_key")
    assert known.data.decode() == f"10.0.2.2 ssh-ed25519 {host_blob}\n"
    assert key.origin == tmp_path / "id_ed25519"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            "unpinned",
            "known_hosts': {tmp}/known_hosts pins no host key dbclient can use for "
            "[10.0.2.2]:2222; record it with: kdump-mkinitrd ssh-setup kdump@10.0.2.2 -p 2222",
        ),
        ("only-revoked", "known_hosts pins no host key for [10.0.2.2]:2222"),
        ("no-key", "key 'targets[0].identity': cannot read {tmp}/id_ed25519: No such file"),
        ("bad-key", "key 'targets[0].identity': dropbearconvert cannot convert {tmp}/id_ed25519"),
    ],
)
def test_unusable_key_material_stops_the_build(tmp_path: Path, change: str, message: str) -> None:
    text = _config(tmp_path, "dropbear")
    if change == "unpinned":
        (tmp_path / "known_hosts").write_text("elsewhere ssh-ed25519 AAAA\n")
    elif change == "only-revoked":
        (tmp_path / "known_hosts").write_text("@revoked [10.0.2.2]:2222 ssh-ed25519 AAAA\n")
        text = text.replace("client: dropbear", "client: openssh")
    elif change == "no-key":
        (tmp_path / "id_ed25519").unlink()
    else:
        (tmp_path / "id_ed25519").write_text("not a key\n")
    config = parse(text, str(tmp_path / "kdump.yaml"))
    with pytest.raises(KdumpError) as err:
        image_files(config)
    assert str(err.value).startswith(f"{tmp_path}/kdump.yaml:")
    assert message.format(tmp=tmp_path) in str(err.value)


def _member(image: LoadedImage, path: str) -> bytes:
    return next(m.data for m in image.members if m.path in (path, "usr/" + path))


def _build(kernel: Kernel, tmp_path: Path, text: str) -> LoadedImage:
    output = tmp_path / "kdump.img"
    request = BuildRequest(kernel.kver, kernel.kmoddir, output, kernel_image=kernel.vmlinuz)
    build(parse(text, str(tmp_path / "kdump.yaml")), request)
    return load_image(output)


def test_dropbear_image_logs_in_with_what_it_holds(kernel61: Kernel, tmp_path: Path) -> None:
    """The image holds dbclient and not ssh; the real dbclient, given the image's key and
    known_hosts, logs in to a real sshd, and refuses it once another host key is pinned."""
    with TestServer(tmp_path / "server") as server:
        work = tmp_path / "client"
        work.mkdir()
        (work / "known_hosts").write_text(server.known_hosts_line("127.0.0.1") + "\n")
        for name in ("id_ed25519", "id_ed25519.pub"):
            (work / name).write_bytes((server.directory / name).read_bytes())
        (work / "id_ed25519").chmod(0o600)
        image = _build(kernel61, tmp_path, _config(work, "dropbear", "127.0.0.1", server.port))
        paths = {m.path.removeprefix("usr/") for m in image.members}
        assert "bin/dbclient" in paths and "bin/ssh" not in paths
        assert not any("libcrypto" in p for p in paths)
        key_path, hosts_path = (p.lstrip("/") for p in image_paths(0))
        modes = {m.path.removeprefix("usr/"): m.mode & 0o777 for m in image.members}
        assert modes[key_path] == modes[hosts_path] == 0o600
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "known_hosts").write_bytes(_member(image, hosts_path))
        (tmp_path / "key").write_bytes(_member(image, key_path))

        def login() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["dbclient", "-i", str(tmp_path / "key"), "-p", str(server.port),
                 f"{server.user}@127.0.0.1", "echo logged-in"],
                env=dict(os.environ, HOME=str(home)), stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=60, start_new_session=True,
            )  # fmt: skip

        assert login().stdout == "logged-in\n"
        ensure_key(tmp_path / "other")
        (home / ".ssh" / "known_hosts").write_text(
            f"127.0.0.1 ssh-ed25519 {_blob(tmp_path / 'other')}\n"
        )
        refused = login()
        assert refused.returncode != 0 and "host key mismatch" in refused.stderr


def test_openssh_image_holds_ssh_and_only_this_hosts_pins(kernel61: Kernel, tmp_path: Path) -> None:
    image = _build(kernel61, tmp_path, _config(tmp_path, "openssh"))
    paths = {m.path.removeprefix("usr/") for m in image.members}
    assert "bin/ssh" in paths and "bin/dbclient" not in paths
    pinned = _member(image, image_paths(0)[1].lstrip("/")).decode()
    assert pinned == f"[10.0.2.2]:2222 ssh-ed25519 {_blob(tmp_path / 'host_key')}\n"
    assert (
        image.manifest["paths"][image_paths(0)[0]]["why"] == "ssh target 0 (openssh): private key"
    )


def _elsewhere(tmp_path: Path) -> str:
    """known_hosts that pins only another host: the target's name is in it nowhere."""
    return f"backup.example ssh-ed25519 {_blob(tmp_path / 'elsewhere')}\n"


def _capture_against(server: TestServer, tmp_path: Path, client: str, pinned: bool) -> str:
    """The image's own ssh library (rendered from the template, run by busybox sh) dumps to a
    real sshd on 127.0.0.1 with the image's key; known_hosts pins the server's host key, or
    pins only another host. Returns the log; /proc/vmcore is absent here, so a login that
    gets through leaves a dump folder with a `vmcore.incomplete` on the server."""
    work = tmp_path / "client"
    work.mkdir()
    for name in ("id_ed25519", "id_ed25519.pub"):
        (work / name).write_bytes((server.directory / name).read_bytes())
    (work / "id_ed25519").chmod(0o600)
    config = parse(_config(work, client, "127.0.0.1", server.port), str(work / "kdump.yaml"))
    (work / "known_hosts").write_text(server.known_hosts_line("127.0.0.1") + "\n")
    key, known = image_files(config)
    image = tmp_path / "image"
    image.mkdir()
    (image / "id_ed25519").write_bytes(key.data)
    (image / "id_ed25519").chmod(0o600)
    ensure_key(tmp_path / "elsewhere")
    (image / "known_hosts").write_bytes(known.data if pinned else _elsewhere(tmp_path).encode())
    library = render(MODULES_DIR / "ssh" / "ssh-target.sh.j2", {"config": config})
    settings = {
        "HOME": tmp_path / "home", "KDUMP_SSH_ERR": tmp_path / "ssh.err",
        "KDUMP_SSH_HOST": f"{server.user}@127.0.0.1", "KDUMP_SSH_PORT": server.port,
        "KDUMP_SSH_CLIENT": client, "KDUMP_SSH_PATH": tmp_path / "server-dumps",
        "KDUMP_SSH_IDENTITY": image / "id_ed25519", "KDUMP_SSH_KNOWN_HOSTS": image / "known_hosts",
        "KDUMP_SSH_CONTROL": tmp_path / "control", "DEVICE_TIMEOUT": 20,
        "KDUMP_HOSTNAME": "web1", "KDUMP_COLLECTOR": "dd", "KDUMP_LOG": tmp_path / "init.log",
    }  # fmt: skip
    script = tmp_path / "run.sh"
    script.write_text(
        'log() { echo "kdump: $*" >> "$KDUMP_TEST_LOG"; }\n'
        + library
        + "".join(f"{name}='{value}'\n" for name, value in settings.items())
        + 'kdump_ssh_capture\nlog "capture status $?"\nkdump_ssh_close\n'
    )
    (tmp_path / "init.log").write_text("")
    subprocess.run(
        ["/bin/busybox", "sh", str(script)],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "KDUMP_TEST_LOG": str(tmp_path / "log")},
        stdin=subprocess.DEVNULL, capture_output=True, timeout=120, start_new_session=True,
    )  # fmt: skip
    return (tmp_path / "log").read_text()


@pytest.mark.parametrize("client", ["openssh", "dropbear"])
@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unknown-host"])
def test_ssh_client_refuses_a_host_it_has_no_pin_for(
    tmp_path: Path, client: str, pinned: bool
) -> None:
    """A server whose host key the image does not pin at all is refused before anything is
    written, and its key is not learnt (as StrictHostKeyChecking=accept-new, or dbclient
    answering its own prompt, would). The pinned case shows the same harness gets through."""
    with TestServer(tmp_path / "server") as server:
        log = _capture_against(server, tmp_path, client, pinned)
    written = sorted(p.name for p in (tmp_path / "server-dumps").rglob("*"))
    if pinned:
        assert "kdump: ssh dump directory: " in log, log
        assert "vmcore.incomplete" in written, (written, log)
        assert "kdump: capture status 1" in log  # no /proc/vmcore on this machine
        return
    assert "kdump: capture status 1" in log, log
    assert "cannot create a dump directory" in log, log
    assert not (tmp_path / "server-dumps").exists(), written
    refusal = "Host key verification failed" if client == "openssh" else "not in the trusted"
    assert refusal in log, log
    # Nothing learnt: neither the image's pins nor dbclient's own copy of them changed.
    assert (tmp_path / "image" / "known_hosts").read_text() == _elsewhere(tmp_path)
    if client == "dropbear":
        assert (tmp_path / "home" / ".ssh" / "known_hosts").read_text() == _elsewhere(tmp_path)
