"""The machine an image is built for, and how the build runs that machine's programs.

A build reads facts from target programs by running them (`makedumpfile -v`, `busybox
--list-full`, the Python stage's module finder run by the stage's own interpreter). For
another architecture than the builder's they run under QEMU's user-mode emulation,
`qemu-ARCH-static -L ROOT ROOT/path/prog`: -L makes the emulated loader, its libraries and
every absolute path the program opens come from the sysroot first, so the program sees its
own libraries and data (the interpreter its own standard library) as it would on the target.
binfmt_misc is not needed (nor assumed: a build host or container often lacks it).
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from kdump_mkinitrd.errors import KdumpError


@dataclass(frozen=True)
class Arch:
    name: str  # Debian's name, as --arch takes it
    machine: str | None  # ELF e_machine, as pyelftools spells it (None: a host not listed)
    emulator: str  # QEMU's user-mode emulator for it
    # mksquashfs's BCJ filter for its code; none exists for arm64 (mksquashfs's "arm" is
    # 32-bit ARM's branch encoding only).
    bcj: str | None


ARCHES: dict[str, Arch] = {
    "amd64": Arch("amd64", "EM_X86_64", "qemu-x86_64-static", "x86"),
    "arm64": Arch("arm64", "EM_AARCH64", "qemu-aarch64-static", None),
}
_ALIASES = {"x86_64": "amd64", "aarch64": "arm64"}
_BY_MACHINE = {a.machine: a for a in ARCHES.values()}


def arch_named(name: str) -> Arch:
    arch = ARCHES.get(_ALIASES.get(name, name))
    if arch is None:
        raise KdumpError(
            f"unknown architecture {name!r} (known: {', '.join(sorted(ARCHES))}, "
            f"or {', '.join(sorted(_ALIASES))})"
        )
    return arch


def arch_of_machine(machine: str) -> Arch:
    arch = _BY_MACHINE.get(machine)
    if arch is None:
        raise KdumpError(f"no known architecture has ELF machine {machine}")
    return arch


def host_arch() -> Arch:
    """This host's architecture; one not in ARCHES still builds for itself, unchecked."""
    name = platform.machine()
    known = ARCHES.get(_ALIASES.get(name, name))
    return known or Arch(name, None, f"qemu-{name}-static", None)


@dataclass(frozen=True)
class Target:
    """The architecture an image is for and the root tree its programs come from."""

    arch: Arch
    root: Path = Path("/")

    @property
    def foreign(self) -> bool:
        return self.arch != host_arch()

    def command(self, path: str) -> list[str]:
        """The argv prefix that runs the target program at image path `path`."""
        host = os.path.join(os.fspath(self.root), path.lstrip("/"))
        if not self.foreign:
            return [host]
        emulator = shutil.which(self.arch.emulator)
        if emulator is None:
            raise KdumpError(
                f"building for {self.arch.name} on this {host_arch().name} host runs "
                f"{self.arch.name} programs of the sysroot (such as {path}) under QEMU's "
                f"user-mode emulation, and {self.arch.emulator} is not installed "
                "(Debian: apt-get install qemu-user-static)"
            )
        return [emulator, "-L", os.fspath(self.root), host]


def target_for(arch: str | None, root: Path, machine_of_root: str | None) -> Target:
    """The target a build is for: `arch` as given, else the machine the root's programs
    are (`machine_of_root`), else the builder's own. Programs of another machine under the
    root are refused by name when the build reads them."""
    if arch is None:
        return Target(arch_of_machine(machine_of_root) if machine_of_root else host_arch(), root)
    wanted = arch_named(arch)
    if wanted != host_arch() and root == Path("/"):
        raise KdumpError(
            f"--arch {wanted.name} is not this host's architecture "
            f"({host_arch().name}): give --sysroot, a root tree of {wanted.name} programs "
            "and libraries to build from (scripts/make-sysroot makes one)"
        )
    return Target(wanted, root)
