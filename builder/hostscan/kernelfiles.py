"""Where a kernel's image and build config live, whatever the distribution's layout.

Debian keeps `/boot/vmlinuz-KVER` and `/boot/config-KVER`; Fedora, Arch and systemd's layout
keep `/usr/lib/modules/KVER/vmlinuz` and `.../config`; Arch also installs `/boot/vmlinuz-linux`
(named after the package, `pkgbase`, not the release); a kernel-install plugin may be handed a
unified kernel image (UKI), a PE file whose `.linux` section holds the kernel. The running
kernel's config may only be in `/proc/config.gz`.

A kernel found under a name that does not carry its release (`vmlinuz-linux`) is accepted only
when the release written into the image itself is exactly KVER, so a stale or foreign kernel
is never paired with these modules.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import kernelimage
from kdump_mkinitrd.output import write_atomic

PROC_CONFIG = Path("/proc/config.gz")
BANNER = b"Linux version "
# The x86 boot protocol's setup header: "HdrS" at 0x202, the protocol version at 0x206 and,
# at 0x20e, the offset (from 0x200) of the NUL-terminated version string, whose first word is
# the release `uname -r` prints.
_HDRS_OFFSET = 0x202
_VERSION_PTR = 0x20E
_SETUP_BASE = 0x200


def release_of(data: bytes) -> str | None:
    """The release a kernel image says it is, or None when that cannot be read from it.

    An x86 bzImage names it in its setup header; an uncompressed image (an arm64 `Image`, a
    vmlinux) carries the banner `Linux version RELEASE (...`; a gzip-compressed Image or an
    EFI zboot image carries it inside the compressed payload, which is unpacked to read it."""
    data = kernelimage.uncompressed(data) or data
    if len(data) > _VERSION_PTR + 2 and data[_HDRS_OFFSET : _HDRS_OFFSET + 4] == b"HdrS":
        (pointer,) = struct.unpack_from("<H", data, _VERSION_PTR)
        start = _SETUP_BASE + pointer
        words = data[start : start + 256].split(b"\0", 1)[0].split()
        if pointer and words:
            return words[0].decode("ascii", "replace")
    at = data.find(BANNER)
    if at < 0:
        return None
    word = data[at + len(BANNER) : at + len(BANNER) + 256].split(b" ", 1)[0]
    return word.decode("ascii", "replace") or None


def embedded_release(path: Path) -> str | None:
    try:
        return release_of(path.read_bytes())
    except OSError:
        return None


def _pkgbase_images(kver: str, kmoddir: Path, boot_dir: Path) -> list[Path]:
    """Arch's images: `/boot/vmlinuz-PKGBASE`, PKGBASE read from the module tree when there,
    and any other `/boot/vmlinuz-linux*` (linux, linux-lts, linux-zen...)."""
    names = []
    try:
        pkgbase = (kmoddir / "pkgbase").read_text().strip()
    except OSError:
        pkgbase = ""
    if pkgbase and "/" not in pkgbase:
        names.append(boot_dir / f"vmlinuz-{pkgbase}")
    names += sorted(boot_dir.glob("vmlinuz-linux*"))
    return list(dict.fromkeys(names))


def find_kernel(
    kver: str, kmoddir: Path, boot_dir: Path = Path("/boot"), extracted: Path | None = None
) -> Path | None:
    """The kernel image of release `kver`: `/boot/vmlinuz-KVER`, `KMODDIR/vmlinuz`, an Arch
    `/boot/vmlinuz-PKGBASE` whose embedded release is KVER, then a kernel earlier taken out
    of a UKI (`extracted`). None when there is none."""
    for named in (boot_dir / f"vmlinuz-{kver}", kmoddir / "vmlinuz"):
        if named.is_file():
            return named
    for candidate in _pkgbase_images(kver, kmoddir, boot_dir):
        if candidate.is_file() and embedded_release(candidate) == kver:
            return candidate
    if extracted is not None and extracted.is_file() and embedded_release(extracted) == kver:
        return extracted
    return None


def find_config(
    kver: str,
    kernel_image: Path | None,
    kmoddir: Path | None = None,
    boot_dir: Path = Path("/boot"),
    proc_config: Path = PROC_CONFIG,
    running: str | None = None,
) -> Path | None:
    """The kernel's build config: beside the kernel image, `/boot/config-KVER`,
    `KMODDIR/config`, then `/proc/config.gz` when KVER is the running kernel."""
    candidates = []
    if kernel_image is not None:
        candidates.append(kernel_image.parent / f"config-{kver}")
    candidates.append(boot_dir / f"config-{kver}")
    if kmoddir is not None:
        candidates.append(kmoddir / "config")
    found = next((c for c in candidates if c.is_file()), None)
    if found is not None:
        return found
    if (running if running is not None else os.uname().release) == kver and proc_config.is_file():
        return proc_config
    return None


def read_config(path: Path) -> str:
    """A config's text; `/proc/config.gz` (or any gzip config) is unpacked."""
    data = path.read_bytes()
    if data.startswith(b"\x1f\x8b"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise KdumpError(f"{path}: corrupt gzip data: {exc}") from None
    return data.decode(errors="replace")


# PE/COFF (Microsoft's "PE Format" specification): "MZ", the offset of the PE header at 0x3c,
# "PE\0\0", the 20-byte COFF header (section count at +2, optional header size at +16), the
# optional header, then 40-byte section headers: name[8], VirtualSize, VirtualAddress,
# SizeOfRawData, PointerToRawData, ...
_COFF_SIZE = 20
_SECTION_SIZE = 40


def pe_sections(path: Path) -> dict[str, tuple[int, int]] | None:
    """Section name -> (file offset, size) of a PE file; None when it is not PE."""
    with path.open("rb") as f:
        dos = f.read(64)
        if len(dos) < 64 or dos[:2] != b"MZ":
            return None
        (pe_at,) = struct.unpack_from("<I", dos, 0x3C)
        f.seek(pe_at)
        head = f.read(4 + _COFF_SIZE)
        if len(head) < 4 + _COFF_SIZE or head[:4] != b"PE\0\0":
            return None
        count, = struct.unpack_from("<H", head, 4 + 2)  # fmt: skip
        opt_size, = struct.unpack_from("<H", head, 4 + 16)  # fmt: skip
        f.seek(pe_at + 4 + _COFF_SIZE + opt_size)
        table = f.read(count * _SECTION_SIZE)
    if len(table) < count * _SECTION_SIZE:
        raise KdumpError(f"{path}: PE section table is truncated")
    sections: dict[str, tuple[int, int]] = {}
    for i in range(count):
        raw_name, vsize, _vaddr, raw_size, raw_at = struct.unpack_from(
            "<8sIIII", table, i * _SECTION_SIZE
        )
        name = raw_name.rstrip(b"\0").decode("ascii", "replace")
        # The raw data is padded to the file alignment; VirtualSize is the content's length.
        size = min(vsize, raw_size) if vsize else raw_size
        sections.setdefault(name, (raw_at, size))
    return sections


def uki_kernel(path: Path) -> bytes | None:
    """The kernel inside a unified kernel image, or None when `path` is not a UKI (a plain
    bzImage is PE too, but has no `.linux` section)."""
    try:
        sections = pe_sections(path)
    except OSError as exc:
        raise KdumpError(f"cannot read {path}: {exc.strerror}") from None
    if sections is None or ".linux" not in sections:
        return None
    offset, size = sections[".linux"]
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise KdumpError(f"{path}: the .linux section runs past the end of the file")
    return data


def extracted_path(image: Path, kver: str) -> Path:
    """Where the kernel taken out of a UKI is kept: beside the capture image, never named
    initrd* or vmlinuz-* so that no boot loader or kernel-install plugin picks it up."""
    return image.parent / f"kdump-{kver}.linux"


def kernel_for_kexec(kernel: Path, kver: str, image: Path) -> Path:
    """`kernel` itself, or, for a UKI, its `.linux` kernel written beside the capture image
    (kexec_file_load takes a bzImage, not a UKI). The copy is rewritten only when its bytes
    change, and must say it is release KVER."""
    inner = uki_kernel(kernel)
    if inner is None:
        return kernel
    release = release_of(inner)
    if release != kver:
        raise KdumpError(
            f"the kernel in the UKI {kernel} is release {release or 'unknown'}, not {kver}"
        )
    out = extracted_path(image, kver)
    try:
        same = out.read_bytes() == inner
    except OSError:
        same = False
    if not same:
        write_atomic(out, inner, 0o644)
    return out
