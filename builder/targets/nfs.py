"""nfs targets: an NFS export (server:/export) mounted by the capture kernel's own NFS client;
the dump goes into a fresh folder under `path` below the export. Template: modules.d/nfs/."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from kdump_mkinitrd.schema import Checker, Field, check_path
from kdump_mkinitrd.targets.base import NETWORK, Target, check_mount_options, register

# A host name or an IPv4 address (the capture network is IPv4 only).
_SERVER = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")


@register
@dataclass(frozen=True, kw_only=True)
class NfsTarget(Target):
    type: ClassVar[str] = "nfs"
    article: ClassVar[str] = "an"
    schema: ClassVar[dict[str, Field]] = {"export": Field(str)}  # server:/path
    takes: ClassVar[frozenset[str]] = frozenset({"path", "mount_options"})
    uses: ClassVar[frozenset[str]] = frozenset({NETWORK, "python-stage"})

    export: str

    @property
    def name(self) -> str:
        return f"nfs:{self.export} {self.path}"

    @property
    def nfs_server(self) -> str:
        return self.export.rpartition(":/")[0]

    @property
    def nfs_path(self) -> str:
        return "/" + self.export.rpartition(":/")[2]

    @classmethod
    def check(cls, checker: Checker, key: str, values: dict[str, Any]) -> None:
        cls.require(checker, key, values, "export", " (server:/path)")
        export = values["export"]
        server, sep, path = export.rpartition(":/")
        if not sep or not _SERVER.fullmatch(server):
            raise checker.fail(f"{key}.export", f"expected server:/path; got {export!r}")
        check_path(checker, f"{key}.export", "/" + path)
        check_mount_options(checker, f"{key}.mount_options", values["mount_options"])

    def hostonly_server(self) -> tuple[str, str] | None:
        return "export", self.nfs_server
