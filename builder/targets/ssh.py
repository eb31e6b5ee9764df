"""ssh targets: the dump streams over SSH to user@host:path through the client the target
names, with the key and the pinned host keys built into the image (kdump_mkinitrd.targets.
sshkeys). Template, programs and /etc files: modules.d/ssh/."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kdump_mkinitrd.schema import Checker, Field
from kdump_mkinitrd.targets.base import NETWORK, ImageFile, Target, register
from kdump_mkinitrd.targets.sshkeys import SSH_IDENTITY, SSH_KNOWN_HOSTS, target_files

if TYPE_CHECKING:
    from kdump_mkinitrd.config import Config

# OpenSSH's ssh, or dropbear's dbclient (a far smaller image).
SSH_CLIENTS = ("openssh", "dropbear")
# user@host: nothing that ssh could take for an option, no shell or ssh syntax.
_HOST = re.compile(
    r"(?:[A-Za-z0-9_][A-Za-z0-9._-]*@)?(?:[A-Za-z0-9][A-Za-z0-9.-]*|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)"
)


@register
@dataclass(frozen=True, kw_only=True)
class SshTarget(Target):
    type: ClassVar[str] = "ssh"
    article: ClassVar[str] = "an"
    # The key and pinned host keys default to what `kdump-mkinitrd ssh-setup` writes.
    schema: ClassVar[dict[str, Field]] = {
        "host": Field(str),  # user@host
        "port": Field(int, default=22, minimum=1, maximum=65535),
        "identity": Field(str, default=SSH_IDENTITY, absolute_path=True),
        "known_hosts": Field(str, default=SSH_KNOWN_HOSTS, absolute_path=True),
        "client": Field(str, default="openssh", choices=SSH_CLIENTS),
    }
    takes: ClassVar[frozenset[str]] = frozenset({"path"})
    uses: ClassVar[frozenset[str]] = frozenset({NETWORK})

    host: str
    port: int
    identity: str
    known_hosts: str
    client: str

    @property
    def name(self) -> str:
        return f"ssh:{self.host}:{self.path}"

    @classmethod
    def refusal(cls, name: str) -> str:
        return "an ssh target mounts nothing" if name == "mount_options" else super().refusal(name)

    @classmethod
    def check(cls, checker: Checker, key: str, values: dict[str, Any]) -> None:
        cls.require(checker, key, values, "host", " (user@host)")
        if not _HOST.fullmatch(values["host"]):
            raise checker.fail(f"{key}.host", f"expected user@host or host; got {values['host']!r}")

    def hostonly_server(self) -> tuple[str, str] | None:
        return "host", self.host.rpartition("@")[2]

    def image_files(self, config: Config, index: int, root: Path) -> list[ImageFile]:
        return target_files(config, index, self, root)
