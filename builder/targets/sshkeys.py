"""The key and pinned host keys each ssh target puts in the image, in its client's format.

OpenSSH's ssh reads both as `ssh-setup` wrote them. Dropbear's dbclient (2022.83) reads
neither: its key must be converted (dropbearconvert), and it takes a known_hosts line only when
the line begins with exactly the host name it was given, so hashed names, name lists and
`[host]:port` are rewritten to that. For either client the image holds only the lines that pin
this target's host, and a target whose known_hosts pins nothing for it stops the build: in the
capture kernel that host would be refused (and dbclient would spin asking a terminal it lacks).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.targets.base import ImageFile

if TYPE_CHECKING:
    from kdump_mkinitrd.config import Config
    from kdump_mkinitrd.targets.ssh import SshTarget

# Where `ssh-setup` keeps the key and the pinned host keys, and where the image holds them.
SSH_DIR = "/etc/kdump-mkinitrd/ssh"
SSH_IDENTITY = f"{SSH_DIR}/id_ed25519"
SSH_KNOWN_HOSTS = f"{SSH_DIR}/known_hosts"


def split_destination(destination: str) -> tuple[str | None, str]:
    user, _, host = destination.rpartition("@")
    return (user or None), host


def known_hosts_name(host: str, port: int) -> str:
    """How ssh looks a host up in known_hosts: `host`, or `[host]:port` off port 22."""
    return host if port == 22 else f"[{host}]:{port}"


def image_paths(index: int) -> tuple[str, str]:
    """Where target `index`'s private key and pinned host keys live inside the image."""
    return f"{SSH_DIR}/{index}/id_ed25519", f"{SSH_DIR}/{index}/known_hosts"


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):  # HashKnownHosts: |1|base64 salt|base64 HMAC-SHA1(name)
        try:
            salt, digest = (base64.b64decode(p) for p in pattern[3:].split("|", 1))
        except (ValueError, binascii.Error):
            return False
        return hmac.compare_digest(hmac.new(salt, name.encode(), "sha1").digest(), digest)
    # OpenSSH wildcards are * and ? only: "[host]:port" is literal, not a character class;
    # and patterns match without regard to case, as ssh lowercases the name it looks up.
    wildcards = re.escape(pattern.lower()).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(wildcards, name) is not None


def _names_host(field: str, name: str) -> bool:
    """OpenSSH's rule for a host field: some pattern matches and no negated one does."""
    matched = False
    for pattern in field.split(","):
        if pattern.startswith("!"):
            if _pattern_matches(pattern[1:], name):
                return False
        elif _pattern_matches(pattern, name):
            matched = True
    return matched


def pinned_lines(text: str, host: str, port: int, client: str) -> list[str]:
    """The known_hosts lines that pin host:port, as `client` must read them."""
    name = known_hosts_name(host.lower(), port)
    out = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        marker = words.pop(0) if words[0].startswith("@") else None
        if len(words) < 3 or not _names_host(words[0], name):
            continue
        if client == "openssh":
            out.append(line.strip())
        elif marker is None:  # dbclient knows neither @cert-authority nor @revoked
            out.append(f"{host} {words[1]} {words[2]}")
    return out


def _where(config: Config, index: int, key: str) -> str:
    dotted = f"targets[{index}].{key}"
    return f"{config.line_of(dotted if dotted in config.lines else f'targets[{index}]')}: " + (
        f"key '{dotted}'"
    )


def _read(config: Config, index: int, key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KdumpError(
            f"{_where(config, index, key)}: cannot read {path}: {exc.strerror} "
            "(kdump-mkinitrd ssh-setup makes it)"
        ) from None


def _dropbear_key(config: Config, index: int, source: Path) -> bytes:
    converter = shutil.which("dropbearconvert")
    if converter is None:
        raise KdumpError(
            f"{_where(config, index, 'client')}: dropbear's key format needs dropbearconvert "
            "on the build host (Debian: apt-get install dropbear-bin)"
        )
    with tempfile.TemporaryDirectory(prefix="kdump-dropbear-") as tmp:  # made mode 0700
        out = Path(tmp) / "key"
        proc = subprocess.run([converter, "openssh", "dropbear", str(source), str(out)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        if proc.returncode != 0 or not out.is_file():
            said = (proc.stderr or proc.stdout).strip().splitlines()
            raise KdumpError(
                f"{_where(config, index, 'identity')}: dropbearconvert cannot convert {source}: "
                + (said[-1] if said else f"exit status {proc.returncode}")
            )
        return out.read_bytes()


def target_files(config: Config, index: int, target: SshTarget, root: Path) -> list[ImageFile]:
    """The key and pinned host keys of ssh target `index`, ready for the image (mode 0600)."""
    key_path, hosts_path = image_paths(index)
    identity = root / target.identity.lstrip("/")
    known_hosts = root / target.known_hosts.lstrip("/")
    key = _read(config, index, "identity", identity)
    if target.client == "dropbear":
        key = _dropbear_key(config, index, identity)
    text = _read(config, index, "known_hosts", known_hosts).decode(errors="replace")
    _, host = split_destination(target.host)
    lines = pinned_lines(text, host, target.port, target.client)
    if all(line.startswith("@revoked") for line in lines):  # none, or none that trusts
        raise KdumpError(
            f"{_where(config, index, 'known_hosts')}: {known_hosts} pins no host key "
            f"{'dbclient can use ' if target.client == 'dropbear' else ''}for "
            f"{known_hosts_name(host, target.port)}; record it with: kdump-mkinitrd ssh-setup "
            f"{target.host} -p {target.port} --known-hosts {target.known_hosts}"
        )
    why = f"ssh target {index} ({target.client})"
    return [
        ImageFile(target.type, key_path, key, identity, f"{why}: private key", 0o600),
        ImageFile(target.type, hosts_path, "".join(f"{x}\n" for x in lines).encode(),
                  known_hosts, f"{why}: the pinned host keys, nothing else trusted", 0o600),
    ]  # fmt: skip
