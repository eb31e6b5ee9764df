"""Small helper images `qemu-test` boots around the capture image: the first stage that arms
kdump and crashes (or runs host programs under a guest kernel), and the read-back stage that
copies the saved dump out of the target disk.

They reuse the builder's own resolution and writer, so the harness exercises the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdump_mkinitrd.hostscan.elfdeps import ElfResolver
from kdump_mkinitrd.hostscan.kmod import ModuleIndex
from kdump_mkinitrd.image.assemble import add_binaries, add_feature_static, add_modules
from kdump_mkinitrd.image.build import write_image
from kdump_mkinitrd.image.compress import Compression
from kdump_mkinitrd.image.features import discover
from kdump_mkinitrd.image.plan import ImagePlan
from kdump_mkinitrd.image.render import render
from kdump_mkinitrd.image.resolve import find_busybox
from kdump_mkinitrd.image.targetarch import target_for

TEMPLATES = Path(__file__).resolve().parent / "templates"
FEATURE = "qemu-test"


def utility_image(
    output: Path,
    kver: str,
    kmoddir: Path,
    template: str,
    context: dict[str, Any],
    modules: Sequence[str] = (),
    programs: Sequence[str] = (),
    files: dict[str, Path] | None = None,
    root: Path = Path("/"),
) -> None:
    """An image whose /init is `template`; its programs come from `root` (a sysroot for a
    guest of another architecture)."""
    plan = ImagePlan()
    # The same skeleton as every capture image: the base feature's layout and device nodes.
    add_feature_static(plan, discover()["base"], root)
    target = target_for(None, root, ElfResolver(root).machine_of("/bin/busybox"))
    resolver = ElfResolver(root, machine=target.arch.machine)
    closures = {FEATURE: resolver.resolve([(p, FEATURE) for p in programs])} if programs else {}
    add_binaries(plan, find_busybox(resolver, "/bin/busybox", target), closures, root)
    if modules:
        index = ModuleIndex.load(kver, kmoddir)
        add_modules(plan, index.resolve([(m, FEATURE) for m in modules]), kver)
    for dst, src in (files or {}).items():
        plan.file(dst, FEATURE, "payload", source=src, mode=0o644)
    init = render(TEMPLATES / template, dict(context, kver=kver))
    plan.file("/init", FEATURE, f"rendered from {template}", data=init.encode(), mode=0o755)
    entries, _ = plan.entries()
    write_image(entries, Compression("zstd", 3, 0), output)


# Boot arguments that show the build host's root to a guest read-only over 9p.
HOST_ROOT = ("-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on")


def host_root_image(
    output: Path,
    kver: str,
    kmoddir: Path,
    commands: Sequence[Sequence[str]],
    *,
    crash: bool,
    writable: Sequence[str],
    environment: Sequence[str],
    network: bool = False,
    modules: Sequence[str] = (),
    sysroot: Path | None = None,
) -> tuple[str, ...]:
    """An image whose guest runs `commands` from the build host's root (chroot over 9p), then
    crashes (a first stage) or powers off; returns the QEMU arguments the boot needs. With a
    `sysroot` (a guest of another architecture), its /usr, /etc and /bin, /sbin, /lib come
    from there instead."""
    utility_image(
        output, kver, kmoddir, "first-stage-register.sh.j2",
        {"commands": commands, "crash": crash, "network": network, "writable": writable,
         "environment": environment, "sysroot": str(sysroot) if sysroot else ""},
        modules=["9p", "9pnet_virtio", "virtio_pci", *modules], root=sysroot or Path("/"),
    )  # fmt: skip
    return HOST_ROOT
