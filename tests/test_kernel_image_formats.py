"""Recognising kernel files and handing kexec the uncompressed kernel, with the real Debian
arm64 Image, the same gzip-compressed (Ubuntu's form) and in EFI zboot images (Fedora's form,
built by the kernel's documented layout in tests/arm64_images.py), damaged variants of each,
and the real x86 bzImage, which goes through unchanged."""

from __future__ import annotations

import fcntl
import gzip
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from kdump_mkinitrd.arming import kexec, registration
from kdump_mkinitrd.config import load
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import kernelimage
from kdump_mkinitrd.hostscan.kernelimage import KexecKernel, open_for_kexec
from kdump_mkinitrd.image import cpio
from kdump_mkinitrd.image.build import BuildRequest
from kdump_mkinitrd.qemutest.testcache import cache_root
from tests.arm64_images import padded_image, zboot
from tests.conftest import REPO, Arm64Files, Kernel
from tests.test_register_kernel import hook_build


def fd_bytes(kernel: KexecKernel) -> bytes:
    """Everything the descriptor holds, read as the kernel reads it (from offset 0)."""
    out = bytearray()
    while chunk := os.pread(kernel.fd, 1 << 20, len(out)):
        out += chunk
    return bytes(out)


def image_bytes(files: Arm64Files) -> bytes:
    return files.image.read_bytes()


def _must_fail(path: Path, machine: str, *expected: str) -> None:
    with pytest.raises(KdumpError) as info, open_for_kexec(path, machine):
        pytest.fail("opened")
    message = str(info.value)
    assert str(path) in message
    for text in expected:
        assert text in message


def test_the_image_is_what_debian_ships(arm64_files: Arm64Files) -> None:
    data = image_bytes(arm64_files)
    assert data[56:60] == b"ARM\x64" and data[:2] == b"MZ"  # an Image with the EFI stub
    (image_size,) = struct.unpack_from("<Q", data, 16)
    assert image_size > len(data)  # BSS: what a zboot payload is padded to


def test_plain_image_is_the_file_itself(arm64_files: Arm64Files) -> None:
    with open_for_kexec(arm64_files.image, "aarch64") as kernel:
        assert not kernel.in_memory
        assert kernel.file.describe() == "arm64 Image"
        assert os.readlink(f"/proc/self/fd/{kernel.fd}") == str(arm64_files.image.resolve())
        assert kernel.size == arm64_files.image.stat().st_size
        assert kernel.tool_path() == str(arm64_files.image)
    with pytest.raises(OSError):
        os.fstat(kernel.fd)


def test_x86_bzimage_is_unchanged(kernel61: Kernel) -> None:
    with open_for_kexec(kernel61.vmlinuz, "x86_64") as kernel:
        assert not kernel.in_memory and kernel.file.describe() == "x86 bzImage"
        assert fd_bytes(kernel) == kernel61.vmlinuz.read_bytes()


@pytest.mark.parametrize(
    ("which", "described", "padded"),
    [
        ("gzip", "gzip-compressed arm64 Image", False),
        ("zboot_gzip", "EFI zboot image (gzip-compressed arm64 Image)", True),
        ("zboot_zstd", "EFI zboot image (zstd22-compressed arm64 Image)", True),
    ],
)
def test_compressed_kernel_becomes_a_sealed_memfd(
    arm64_files: Arm64Files, which: str, described: str, padded: bool
) -> None:
    path: Path = getattr(arm64_files, which)
    image = image_bytes(arm64_files)
    # A zboot payload is the Image padded to its in-memory size (Makefile.zboot).
    expected = padded_image(image) if padded else image
    with open_for_kexec(path, "aarch64") as kernel:
        assert kernel.in_memory and kernel.file.describe() == described
        assert kernel.path == path
        assert os.readlink(f"/proc/self/fd/{kernel.fd}").startswith("/memfd:kdump-kernel:")
        content = fd_bytes(kernel)
        assert content == expected and kernel.size == len(expected)
        assert content[: len(image)] == image
        # Sealed: nothing can change the kernel between the check and the load.
        seals = fcntl.fcntl(kernel.fd, fcntl.F_GET_SEALS)
        for seal in (fcntl.F_SEAL_WRITE, fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_GROW):
            assert seals & seal
        with pytest.raises(PermissionError):
            os.pwrite(kernel.fd, b"x", 0)
        assert kernel.tool_path() == f"/proc/self/fd/{kernel.fd}"
    with pytest.raises(OSError):
        os.fstat(kernel.fd)


@pytest.mark.parametrize("comp_type", ["lzma", "xzkern", "zstd"])
def test_other_zboot_compressions(arm64_files: Arm64Files, tmp_path: Path, comp_type: str) -> None:
    image = image_bytes(arm64_files)
    path = tmp_path / "vmlinuz"
    path.write_bytes(zboot(image, comp_type))
    with open_for_kexec(path, "aarch64") as kernel:
        assert fd_bytes(kernel) == padded_image(image)


@pytest.mark.parametrize("comp_type", ["lz4", "lzo"])
def test_unsupported_zboot_compression_is_named(
    arm64_files: Arm64Files, tmp_path: Path, comp_type: str
) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(zboot(image_bytes(arm64_files)[:65536], comp_type, payload=b"\x02!L\x18" * 64))
    _must_fail(path, "aarch64", f"{comp_type} is not supported")


@pytest.mark.parametrize("which", ["gzip", "zboot_gzip", "zboot_zstd"])
def test_truncated_compressed_kernel(arm64_files: Arm64Files, tmp_path: Path, which: str) -> None:
    data: bytes = getattr(arm64_files, which).read_bytes()
    cut = tmp_path / "vmlinuz"
    cut.write_bytes(data[: len(data) // 2])
    # gzip: the stream ends early; zboot: the header's payload runs past the end of the file.
    _must_fail(cut, "aarch64", "truncated")


@pytest.mark.parametrize("comp_type", ["gzip", "zstd22"])
def test_zboot_payload_shorter_than_its_stream(
    arm64_files: Arm64Files, tmp_path: Path, comp_type: str
) -> None:
    data = bytearray(zboot(image_bytes(arm64_files), comp_type))
    (size,) = struct.unpack_from("<I", data, 12)
    struct.pack_into("<I", data, 12, size - 4096)
    path = tmp_path / "vmlinuz"
    path.write_bytes(data)
    _must_fail(path, "aarch64", "truncated")


@pytest.mark.parametrize("which", ["gzip", "zboot_gzip", "zboot_zstd"])
def test_corrupt_payload(arm64_files: Arm64Files, tmp_path: Path, which: str) -> None:
    data = bytearray(getattr(arm64_files, which).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    path = tmp_path / "vmlinuz"
    path.write_bytes(data)
    _must_fail(path, "aarch64", "corrupt")


def test_compressed_file_that_is_not_a_kernel(kernel_arm64: Kernel, tmp_path: Path) -> None:
    path = tmp_path / "vmlinuz"
    path.write_bytes(
        gzip.compress((kernel_arm64.root / "boot/System.map-6.1.0-56-arm64").read_bytes() * 1000)
    )
    _must_fail(path, "aarch64", "not a kernel Image")


def test_kernel_for_another_machine(
    arm64_files: Arm64Files, kernel61: Kernel, tmp_path: Path
) -> None:
    _must_fail(arm64_files.image, "x86_64", "arm64 Image", "not for this machine (x86_64)")
    _must_fail(arm64_files.zboot_zstd, "x86_64", "for aarch64", "(x86_64)")
    _must_fail(kernel61.vmlinuz, "aarch64", "x86 bzImage", "(aarch64)")


def test_unrecognised_format_is_left_to_the_kernel(tmp_path: Path) -> None:
    # ppc64's vmlinux, s390's image, a RISC-V Image: the kernel's own parser decides.
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF" + bytes(4092))
    with open_for_kexec(path, "ppc64le") as kernel:
        assert not kernel.in_memory and kernel.size == 4096


def test_uncompressed_for_release_checks(arm64_files: Arm64Files) -> None:
    image = image_bytes(arm64_files)
    assert kernelimage.uncompressed(arm64_files.gzip.read_bytes()) == image
    assert kernelimage.uncompressed(arm64_files.zboot_zstd.read_bytes()) == padded_image(image)
    assert kernelimage.uncompressed(image) is None  # not compressed
    assert kernelimage.uncompressed(arm64_files.gzip.read_bytes()[:100000]) is None


def test_sizes(arm64_files: Arm64Files) -> None:
    """The test files are what distributions ship: a compressed file a third of the Image."""
    image = arm64_files.image.stat().st_size
    for path in (arm64_files.gzip, arm64_files.zboot_gzip, arm64_files.zboot_zstd):
        assert path.stat().st_size < image // 2


def test_register_refuses_a_damaged_kernel_before_building(
    tmp_path: Path, kernel61: Kernel, arm64_files: Arm64Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`register` unpacks and checks the kernel before the build: a run bound to fail must not
    replace the image the kernel hook built."""
    sysfs = tmp_path / "sys/kernel"
    sysfs.mkdir(parents=True)
    (sysfs / "kexec_crash_size").write_text(f"{256 << 20}\n")
    (sysfs / "kexec_crash_loaded").write_text("0\n")
    monkeypatch.setattr(registration, "crash_status", lambda: kexec.crash_status(sysfs))
    _, config, image = hook_build(tmp_path, kernel61, kernel61.kmoddir)
    before = image.read_bytes()
    cut = tmp_path / "vmlinuz.gz"
    cut.write_bytes(arm64_files.gzip.read_bytes()[:-100])
    request = BuildRequest(kernel61.kver, kernel61.kmoddir, image, kernel_image=cut)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=/dev/vda1 crashkernel=256M\n")
    with pytest.raises(KdumpError) as info:
        registration.register(load(config), request, proc_cmdline=cmdline)
    assert str(cut) in str(info.value) and "truncated" in str(info.value)
    assert str(info.value).endswith(f"{image} was left as it was")
    assert image.read_bytes() == before


def test_a_payload_larger_than_any_kernel_is_refused(
    arm64_files: Arm64Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The limit (512 MiB) lowered below the real Image's 31 MiB, rather than a 512 MiB bomb.
    monkeypatch.setattr(kernelimage, "MAX_IMAGE_BYTES", 16 << 20)
    _must_fail(arm64_files.gzip, "aarch64", "unpacks to more than 16 MiB")


# ---------------------------------------------------------------------------------------------
# A real arm64 kernel: Debian's 6.1 arm64 in qemu-system-aarch64 loads what `register` hands it

# The shared arm64 tree's packages (the same list, so the cached tree is reused).
SYSROOT_PACKAGES = ("busybox-static", "makedumpfile", "kexec-tools", "python3", "python3-yaml",
                    "python3-jinja2", "python3-pyelftools", "python3-construct",
                    "python3-zstandard")  # fmt: skip
LIB_DIRS = ("lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu", "lib")

GUEST_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
PYTHONPATH=/py PYTHONDONTWRITEBYTECODE=1 /usr/bin/python3.11 /probe.py || echo "PROBE-FAILED"
poweroff -f
"""
GUEST_PROBE = """
import subprocess
from pathlib import Path
from kdump_mkinitrd.arming import kexec
def loaded():
    return Path("/sys/kernel/kexec_crash_loaded").read_text().strip()
for name in ("/vmlinuz.gz", "/vmlinuz.zboot"):
    direct = subprocess.run(["/sbin/kexec", "-p", "-c", name, "--initrd=/initrd"],
                            capture_output=True, text=True)
    print("PROBE-DIRECT", name, direct.returncode, "loaded=" + loaded(), flush=True)
    kexec.unload_crash_kernel(kexec="/sbin/kexec")
    result = kexec.load_crash_kernel(Path(name), Path("/initrd"), "console=ttyAMA0",
                                     kexec="/sbin/kexec")
    print("PROBE-LOAD", name, result.method, result.command[3], result.kernel_bytes,
          "loaded=" + loaded(), flush=True)
    print("PROBE-UNLOAD", kexec.unload_crash_kernel(kexec="/sbin/kexec"), loaded(), flush=True)
"""


def _needed(path: Path) -> list[str]:
    with path.open("rb") as f:
        dynamic = ELFFile(f).get_section_by_name(".dynamic")
        if not isinstance(dynamic, DynamicSection):
            return []
        return [str(tag.needed) for tag in dynamic.iter_tags("DT_NEEDED")]  # type: ignore[attr-defined]


def _library_closure(root: Path, programs: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    todo = list(programs)
    while todo:
        for name in _needed(todo.pop()):
            if name in found:
                continue
            path = next(root / d / name for d in LIB_DIRS if (root / d / name).exists())
            found[name] = path.resolve()
            todo.append(found[name])
    return found


def _arm64_probe_initramfs(root: Path, image: bytes, out: Path) -> None:
    """busybox, the sysroot's python3 with zstandard, kexec-tools and this checkout's package,
    the gzip and zboot forms of the Image, and a probe that loads each with load_crash_kernel."""
    entries: list[cpio.Entry] = []

    def add(path: str, data: bytes, mode: int = 0o644) -> None:
        entries.append(cpio.Entry(path, "file", mode, data))

    stdlib = root / "usr/lib/python3.11"
    dynload = sorted((stdlib / "lib-dynload").glob("*.so"))
    zstd = root / "usr/lib/python3/dist-packages/zstandard"
    programs = [root / "bin/busybox", root / "usr/bin/python3.11", root / "sbin/kexec"]
    for name, path in _library_closure(root, [*programs, *dynload, *zstd.glob("*.so")]).items():
        add(f"lib/aarch64-linux-gnu/{name}", path.read_bytes(), 0o755)
    add("lib/ld-linux-aarch64.so.1", (root / "lib/ld-linux-aarch64.so.1").read_bytes(), 0o755)
    for program in programs:
        add(str(program.relative_to(root)), program.read_bytes(), 0o755)
    skip = {"test", "idlelib", "tkinter", "ensurepip", "__pycache__", "turtledemo"}
    trees = [
        (stdlib, "usr/lib/python3.11"),
        (zstd, "py/zstandard"),
        (REPO / "builder", "py/kdump_mkinitrd"),
    ]
    for tree, dest in trees:
        for path in sorted(tree.rglob("*")):
            rel = path.relative_to(tree)
            if path.is_file() and not skip & set(rel.parts):
                add(f"{dest}/{rel}", path.read_bytes())
    add("init", GUEST_INIT.encode(), 0o755)
    add("probe.py", GUEST_PROBE.encode())
    add("vmlinuz.gz", gzip.compress(image, compresslevel=1, mtime=0))
    add("vmlinuz.zboot", zboot(image, "zstd22"))
    add("initrd", bytes(4096))
    dirs = {str(Path(e.path).parent) for e in entries} | {"proc", "sys", "dev", "bin", "sbin"}
    parents = {str(p) for d in dirs for p in [Path(d), *Path(d).parents] if str(p) != "."}
    entries += [cpio.Entry(d, "dir", 0o755) for d in sorted(parents)]
    with out.open("wb") as f:
        cpio.write_newc(entries, f)


@pytest.mark.qemu
def test_debian_arm64_kernel_loads_compressed_kernels(tmp_path: Path, kernel_arm64: Kernel) -> None:
    """Debian's arm64 kernels have no kexec_file_load (CONFIG_KEXEC_FILE is off in 6.1 and
    6.12), so on Debian `register` falls back to kexec-tools 2.0.25, which loads a gzip Image
    itself but cannot read an EFI zboot image: given the decompressed Image through
    /proc/self/fd/N, it crash-loads both."""
    make_sysroot = REPO / "scripts/make-sysroot"
    root = Path(subprocess.run(
        [str(make_sysroot), "arm64", str(cache_root() / "sysroots"), *SYSROOT_PACKAGES],
        check=True, capture_output=True, text=True,
    ).stdout.split()[-1])  # fmt: skip
    initramfs = tmp_path / "probe.cpio"
    _arm64_probe_initramfs(root, kernel_arm64.vmlinuz.read_bytes(), initramfs)
    serial = tmp_path / "serial.log"
    subprocess.run(
        ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57", "-m", "1024", "-smp", "1",
         "-nographic", "-no-reboot", "-nic", "none", "-kernel", str(kernel_arm64.vmlinuz),
         "-initrd", str(initramfs), "-append", "console=ttyAMA0 crashkernel=256M panic=-1",
         "-serial", f"file:{serial}", "-monitor", "none", "-display", "none"],
        check=True, timeout=600, capture_output=True,
    )  # fmt: skip
    log = serial.read_text(errors="replace").replace("\r", "")
    assert "PROBE-FAILED" not in log, log[-4000:]
    assert "PROBE-DIRECT /vmlinuz.gz 0 loaded=1" in log, log[-4000:]
    assert "PROBE-DIRECT /vmlinuz.zboot 255 loaded=0" in log, log[-4000:]
    image_bytes = kernel_arm64.vmlinuz.stat().st_size
    padded = len(padded_image(kernel_arm64.vmlinuz.read_bytes()))
    for name, size in (("/vmlinuz.gz", image_bytes), ("/vmlinuz.zboot", padded)):
        assert re.search(f"PROBE-LOAD {name} kexec_load /proc/self/fd/\\d+ {size} loaded=1", log), (
            log[-4000:]
        )
    assert log.count("PROBE-UNLOAD True 0") == 2, log[-4000:]
