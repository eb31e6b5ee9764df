"""`kdump-mkinitrd ssh-setup`: the key and pinned host keys an ssh target builds into the image.

It creates an ed25519 key without a passphrase (the capture kernel has nobody to type one)
if there is none, installs its public half in the server's ~/.ssh/authorized_keys over an
ordinary (interactive) ssh login, and records the server's host keys with ssh-keyscan into a
known_hosts file, which the image then trusts and nothing else.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.targets.sshkeys import (
    SSH_IDENTITY,
    SSH_KNOWN_HOSTS,
    known_hosts_name,
    split_destination,
)


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
