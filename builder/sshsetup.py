"""`kdump-mkinitrd ssh-setup`: the key and pinned host keys an ssh target builds into the image.

It creates an ed25519 key without a passphrase (the capture kernel has nobody to type one)
if there is none, installs its public half in the server's ~/.ssh/authorized_keys over an
ordinary (interactive) ssh login, and records the server's host keys with ssh-keyscan into a
known_hosts file, which the image then trusts and nothing else.

Also here: `TestServer`, a throwaway OpenSSH server on 127.0.0.1 that `qemu-test --target ssh`
and the tests dump into.
"""

from __future__ import annotations

import getpass
import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from builder.config import SSH_IDENTITY, SSH_KNOWN_HOSTS
from builder.errors import KdumpError

SSHD = Path("/usr/sbin/sshd")


@dataclass
class SetupResult:
    key: Path
    key_created: bool
    known_hosts: Path
    host_keys: list[str]  # the lines recorded
    fingerprints: list[str]
    installed: bool


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, text=True, **kwargs)  # type: ignore[call-overload,no-any-return]
    except FileNotFoundError:
        raise KdumpError(f"{cmd[0]} not found (Debian: apt-get install openssh-client)") from None


def ensure_key(path: Path, comment: str = "kdump-mkinitrd") -> bool:
    """An ed25519 key at `path` (mode 0600), made if missing; True when it was made now."""
    if path.exists():
        if not path.with_name(path.name + ".pub").exists():
            raise KdumpError(f"{path} exists but {path}.pub does not")
        return False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    proc = _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                capture_output=True)  # fmt: skip
    if proc.returncode != 0:
        raise KdumpError(f"ssh-keygen could not create {path}: {proc.stderr.strip()}")
    path.chmod(0o600)
    return True


def split_destination(destination: str) -> tuple[str | None, str]:
    user, _, host = destination.rpartition("@")
    return (user or None), host


def known_hosts_name(host: str, port: int) -> str:
    """How ssh looks a host up in known_hosts: `host`, or `[host]:port` off port 22."""
    return host if port == 22 else f"[{host}]:{port}"


def scan_host_keys(host: str, port: int, timeout: int = 10) -> list[str]:
    """The server's host keys as known_hosts lines (ssh-keyscan; comments dropped)."""
    proc = _run(["ssh-keyscan", "-p", str(port), "-T", str(timeout), "--", host],
                capture_output=True)  # fmt: skip
    lines = [
        line.strip()
        for line in proc.stdout.splitlines()
        if line.strip() and not line.startswith("#")
    ]
    if not lines:
        raise KdumpError(
            f"ssh-keyscan got no host key from {host} port {port}: "
            f"{proc.stderr.strip()[-300:] or 'no answer'}"
        )
    return sorted(lines)


def record_host_keys(path: Path, host: str, port: int, lines: list[str]) -> None:
    """Replace what `path` says about host:port with `lines`; keep every other host's keys."""
    name = known_hosts_name(host, port)
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            hosts = line.split(" ", 1)[0].split(",")
            if name not in hosts:
                kept.append(line)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept + lines))
    tmp.chmod(0o600)
    os.replace(tmp, path)


def fingerprints(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        proc = _run(["ssh-keygen", "-l", "-f", "-"], input=line + "\n", capture_output=True)
        out.append(proc.stdout.strip() if proc.returncode == 0 else line[:60])
    return out


def install_public_key(
    destination: str, port: int, key: Path, known_hosts: Path, options: tuple[str, ...] = ()
) -> None:
    """Append the public key to the server's ~/.ssh/authorized_keys (once), logging in the
    ordinary way (password or an existing key), checked against the host keys just pinned."""
    public = key.with_name(key.name + ".pub").read_text().strip()
    remote = (
        'umask 077; mkdir -p "$HOME/.ssh" && k=$(cat) && '
        '{ grep -qxF "$k" "$HOME/.ssh/authorized_keys" 2>/dev/null || '
        'printf "%s\\n" "$k" >> "$HOME/.ssh/authorized_keys"; }'
    )
    cmd = ["ssh", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
           "-p", str(port)]  # fmt: skip
    for option in options:
        cmd += ["-o", option]
    proc = _run([*cmd, "--", destination, remote], input=public + "\n")
    if proc.returncode != 0:
        raise KdumpError(
            f"could not install {key}.pub on {destination} (ssh exit {proc.returncode})"
        )


def setup(
    destination: str,
    port: int = 22,
    key: Path = Path(SSH_IDENTITY),
    known_hosts: Path = Path(SSH_KNOWN_HOSTS),
    install: bool = True,
    options: tuple[str, ...] = (),
) -> SetupResult:
    _, host = split_destination(destination)
    if not host or host.startswith("-"):
        raise KdumpError(f"not a destination: {destination!r} (expected user@host)")
    created = ensure_key(key)
    lines = scan_host_keys(host, port)
    record_host_keys(known_hosts, host, port, lines)
    if install:
        install_public_key(destination, port, key, known_hosts, options)
    return SetupResult(key, created, known_hosts, lines, fingerprints(lines), install)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """A test server's process: asked to end, killed if it has not within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TestServer:
    """A throwaway OpenSSH server on 127.0.0.1 only: its own host key, one authorized client
    key, its own config, pid file and log, all in `directory`. With `passwords` it also offers
    password logins, as many real servers do (no account here has a password that works). With
    `home` (root only) sshd and its sessions see that folder as the user's home directory, in a
    mount namespace of their own, and take keys from its .ssh/authorized_keys too: a login that
    writes there, as ssh-setup's does, touches nothing real."""

    directory: Path
    port: int = 0
    passwords: bool = False
    home: Path | None = None
    user: str = field(default_factory=getpass.getuser)
    process: subprocess.Popen[bytes] | None = None

    __test__ = False  # not a pytest class

    @property
    def host_key(self) -> Path:
        return self.directory / "ssh_host_ed25519_key"

    @property
    def client_key(self) -> Path:
        return self.directory / "id_ed25519"

    @property
    def log(self) -> Path:
        return self.directory / "sshd.log"

    def known_hosts_line(self, host: str) -> str:
        kind, blob = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"{known_hosts_name(host, self.port)} {kind} {blob}"

    def start(self) -> TestServer:
        if not SSHD.is_file():
            raise KdumpError(f"{SSHD} not found (Debian: apt-get install openssh-server)")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory.chmod(0o700)
        for key in (self.host_key, self.client_key):
            ensure_key(key, "kdump-mkinitrd-test")
        authorized = self.directory / "authorized_keys"
        shutil.copyfile(self.client_key.with_suffix(".pub"), authorized)
        authorized.chmod(0o600)
        if os.geteuid() == 0:
            # sshd refuses to start without its privilege separation directory.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.port = self.port or free_port()  # a restart keeps the port the image knows
        config = self.directory / "sshd_config"
        offered = "yes" if self.passwords else "no"
        config.write_text(
            f"ListenAddress 127.0.0.1\n"
            f"Port {self.port}\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.directory / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {authorized}{' .ssh/authorized_keys' if self.home else ''}\n"
            f"AllowUsers {self.user}\n"
            "StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
            f"PasswordAuthentication {offered}\nKbdInteractiveAuthentication {offered}\n"
            "AllowTcpForwarding no\nAllowAgentForwarding no\nX11Forwarding no\n"
            "PermitTunnel no\nPermitUserEnvironment no\nLogLevel VERBOSE\n"
        )
        command = [str(SSHD), "-D", "-e", "-f", str(config)]
        if self.home is not None:
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            real_home = pwd.getpwnam(self.user).pw_dir
            command = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                       'mount --bind "$0" "$1" && shift && exec "$@"',
                       str(self.home), real_home, *command]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise KdumpError(f"the test sshd did not start: {self.log.read_text()[-500:]}")

    def revoke_client_key(self) -> None:
        """From now on the server takes no key at all, and offers passwords instead."""
        self.stop()
        self.passwords = True
        self.start()
        (self.directory / "authorized_keys").write_text("")  # read at each login

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    def __enter__(self) -> TestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
