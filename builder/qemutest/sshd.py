"""A throwaway OpenSSH server on 127.0.0.1 that `qemu-test --target ssh` and the tests dump
into, and stopping the processes of test servers."""

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

from kdump_mkinitrd.arming.sshsetup import ensure_key
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.targets.sshkeys import known_hosts_name

SSHD = Path("/usr/sbin/sshd")


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
            logged = log.tell()
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        # sshd's own line, not a connection: under parallel tests a connection could reach
        # another test's server that took the same port between free_port() and this bind.
        listening = f"Server listening on 127.0.0.1 port {self.port}.".encode()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with self.log.open("rb") as log:
                log.seek(logged)
                if listening in log.read():
                    return self
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
