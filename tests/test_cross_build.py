"""Cross builds: an arm64 capture image built on this x86_64 host from a real arm64 sysroot
(Debian's packages, `make sysroot-arm64`) and Debian's arm64 kernel.

Every ELF file of the image, the Python stage's squashfs included, must be EM_AARCH64, and
the image's programs must start from the image alone: they run in a chroot of the unpacked
image under QEMU's user-mode emulator (copied into the chroot, static), so a library the
build forgot, or one of the host's, fails the test. A program of the wrong machine placed in
a copy of the sysroot is refused by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from kdump_mkinitrd.arming.crashmemory import KERNEL_FLOOR_MB, estimate
from kdump_mkinitrd.cli import main
from kdump_mkinitrd.config import load as load_config
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.build import BuildRequest, build
from kdump_mkinitrd.image.compress import decompress
from kdump_mkinitrd.image.cpio import Entry, read_newc, split_archives
from kdump_mkinitrd.image.elfstrip import loadable_only
from kdump_mkinitrd.image.verify import check_image, elf_machine
from tests import imagerun
from tests.conftest import KVER_ARM64, Kernel
from tests.crossroot import arm64_kernel, arm64_sysroot
from tests.test_build import BENCH_CONFIG

CONFIG = BENCH_CONFIG  # the bench's: its sizes compare with x86's figures there
QEMU_USER = "/usr/bin/qemu-aarch64-static"
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="unpacking device nodes and chroot need root (CI runs as root)"
)


@pytest.fixture(scope="module")
def sysroot() -> Path:
    return arm64_sysroot()


@pytest.fixture(scope="module")
def kernel() -> Path:
    return arm64_kernel()


def write_config(tmp: Path, stage: str, extra: str = "") -> Path:
    path = tmp / f"{stage}.yaml"
    path.write_text(CONFIG + f"capture: {{stage: {stage}}}\n" + extra)
    return path


def request(kernel: Path, output: Path, **more: object) -> BuildRequest:
    return BuildRequest(
        kver=KVER_ARM64,
        kmoddir=kernel / "lib/modules" / KVER_ARM64,
        output=output,
        kernel_image=kernel / "boot" / f"vmlinuz-{KVER_ARM64}",
        boot_dir=kernel / "boot",
        **more,  # type: ignore[arg-type]
    )


def cli(kernel: Path, config: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "-k", KVER_ARM64, "--kmoddir", str(kernel / "lib/modules" / KVER_ARM64),
            "--kernel", str(kernel / "boot" / f"vmlinuz-{KVER_ARM64}"),
            "-c", str(config), "-o", str(out), *extra]  # fmt: skip


def elf_machines(root: Path) -> dict[str, str]:
    """image path -> ELF machine of every regular file of an unpacked image."""
    found = {}
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        with open(path, "rb") as stream:
            machine = elf_machine(stream.read(64))
        if machine is not None:
            found["/" + str(path.relative_to(root))] = machine
    return found


def in_chroot(root: Path, *argv: str, env: dict[str, str] | None = None) -> str:
    """Run an image program under the emulator inside a chroot of the unpacked image."""
    shutil.copy(QEMU_USER, root / "qemu-aarch64")
    done = imagerun._chrooted(root, ["/qemu-aarch64", *argv], env or {"PATH": "/bin:/sbin"})
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return done.stdout


@needs_root
@pytest.mark.parametrize("stage", ["static", "python"])
def test_arm64_image_from_the_sysroot(
    stage: str, sysroot: Path, kernel: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"{stage}.img"
    # --arch given for one stage, read from the sysroot's busybox for the other.
    extra = ("--arch", "arm64") if stage == "python" else ()
    args = cli(kernel, write_config(tmp_path, stage), out, "--sysroot", str(sysroot), *extra)
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kver"] == KVER_ARM64
    root = imagerun.unpack(out, tmp_path / "root")  # the stage's squashfs too, by unsquashfs
    machines = elf_machines(root)
    assert machines and set(machines.values()) == {"EM_AARCH64"}, machines
    assert {"/bin/busybox", "/usr/bin/makedumpfile",
            "/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1"} <= set(machines)  # fmt: skip
    manifest = json.loads((root / "etc/kdump-mkinitrd/manifest.json").read_text())
    assert manifest["arch"] == "arm64"
    # Every program starts from what the image holds: the loader maps every library it needs.
    for program, dynamic in imagerun.programs(root).items():
        if dynamic:
            said = in_chroot(root, program, env={"LD_TRACE_LOADED_OBJECTS": "1"})
            assert "(0x" in said and "not found" not in said, f"{program}: {said}"
    assert in_chroot(root, "/bin/busybox", "echo", "from arm64").strip() == "from arm64"
    assert "zstd" in in_chroot(root, "/usr/bin/makedumpfile", "-v")
    if stage == "static":
        assert not (root / "lib/kdump/pystage.squashfs").exists()
        return
    # The interpreter is the sysroot's python3.11, as packed (only what loads kept).
    stage_root = root / "run/kdump/pystage"
    packed = (stage_root / "usr/bin/python3.11").read_bytes()
    wanted = loadable_only((sysroot / "usr/bin/python3.11").read_bytes())
    assert hashlib.sha256(packed).digest() == hashlib.sha256(wanted).digest()
    hook = (root / "lib/kdump/hooks/30-capture-lib.sh").read_text()
    assert "KDUMP_PYTHON=/usr/bin/python3.11" in hook
    # The stage imports in the image, as the init runs it: the sysroot's standard library
    # zipped at the interpreter's own path, bytecode named by image paths.
    said = in_chroot(
        root, "/usr/bin/python3.11", "-S", "-s", "-B", "-P", "-X", "frozen_modules=on", "-c",
        "import capture.stage, os, re; print(os.uname().machine, re.__file__, "
        "re.compile.__code__.co_filename, capture.stage.__file__)",
        env={"PYTHONHOME": "/usr", "PYTHONUTF8": "1"},
    )  # fmt: skip
    assert said.split() == [
        "aarch64",
        "/usr/lib/python311.zip/re/__init__.pyc",
        "/usr/lib/python311.zip/re/__init__.py",
        "/usr/lib/python311.zip/capture/stage.pyc",
    ], said
    assert str(sysroot) not in said


# The smallest crashkernel= at which `qemu-test --arch arm64` saved the dump with each stage
# (make bench BENCH_ONLY=arm64: Debian 6.1 arm64, 1 GiB guest, 8M steps; bench/results.json).
ARM64_MINIMA_MB = {"static": 64, "python": 72}


@pytest.mark.parametrize("stage", ["static", "python"])
def test_estimate_of_an_arm64_image_lands_above_its_measured_minimum(
    stage: str, sysroot: Path, kernel: Path, tmp_path: Path
) -> None:
    """arm64's own floor: the estimate is 8M to 24M above what the arm64 guest needed, as on
    x86_64, not the 48M above that x86_64's floor would give."""
    out = tmp_path / f"{stage}.img"
    args = cli(kernel, write_config(tmp_path, stage), out, "--sysroot", str(sysroot))
    assert main(args) == 0
    result = estimate(out, None, 2**30)
    assert result.floor_mb == KERNEL_FLOOR_MB["arm64"] < KERNEL_FLOOR_MB["amd64"]
    minimum = ARM64_MINIMA_MB[stage]
    assert minimum + 8 <= result.total_mb <= minimum + 24, result


@pytest.mark.parametrize("stage", ["static", "python"])
def test_cross_and_native_builds_share_one_cache(
    stage: str, sysroot: Path, kernel: Path, kernel61: Kernel, tmp_path: Path
) -> None:
    """Cache keys hold the machine: with one cache folder, an x86 build between two arm64
    builds changes nothing in the arm64 image, and the x86 image holds no arm64 file."""
    cache = tmp_path / "cache"
    extra = "" if stage == "static" else "capture: {stage: python, python: /usr/bin/python3}\n"
    config = load_config(write_config(tmp_path, stage))
    arm = request(kernel, tmp_path / "arm.img", root=sysroot, arch="arm64", cache_dir=cache)
    first = build(config, arm)
    x86_text = CONFIG + (extra or "capture: {stage: static}\n")
    (tmp_path / "x86.yaml").write_text(x86_text)
    x86 = BuildRequest(kernel61.kver, kernel61.kmoddir, tmp_path / "x86.img",
                       kernel61.vmlinuz, cache_dir=cache)  # fmt: skip
    build(load_config(tmp_path / "x86.yaml"), x86)
    arm_bytes = (tmp_path / "arm.img").read_bytes()
    again = build(config, arm)
    assert (tmp_path / "arm.img").read_bytes() == arm_bytes
    assert again.segments_compressed == 0 and first.size == again.size
    scripts = {}
    for image, machine in (
        (tmp_path / "arm.img", "EM_AARCH64"),
        (tmp_path / "x86.img", "EM_X86_64"),
    ):
        entries = [e for a in split_archives(decompress(image.read_bytes(), str(image)))
                   for e in read_newc(a)]  # fmt: skip
        kinds = {elf_machine(e.data) for e in entries if e.kind == "file"} - {None}
        assert kinds == {machine}, (image, kinds)
        # The init and its hooks are the same templates, rendered the same but for the kernel
        # release (the sysroot keeps /lib apart from /usr/lib; the merged host links them).
        scripts[machine] = {
            e.path.removeprefix("usr/"): e.data.replace(b"arm64", b"amd64")
            for e in entries
            if e.path == "init" or "lib/kdump/hooks/" in e.path
        }
    assert scripts["EM_AARCH64"] == scripts["EM_X86_64"]
    assert any(b"KDUMP_PYTHON=/usr/bin/python3.11" in text
               for text in scripts["EM_AARCH64"].values()) == (stage == "python")  # fmt: skip


def test_native_arch_builds_as_before(kernel61: Kernel, tmp_path: Path) -> None:
    """--arch naming this host's architecture, with no sysroot, is the plain build."""
    (tmp_path / "x86.yaml").write_text(CONFIG + "capture: {stage: static}\n")
    config = load_config(tmp_path / "x86.yaml")
    images = []
    for arch in (None, "amd64", "x86_64"):
        out = tmp_path / f"{arch}.img"
        build(config, BuildRequest(kernel61.kver, kernel61.kmoddir, out, kernel61.vmlinuz,
                                   cache_dir=tmp_path / "cache", arch=arch))  # fmt: skip
        images.append(out.read_bytes())
    assert images[0] == images[1] == images[2]


def overlay_copy(sysroot: Path, dest: Path) -> Path:
    """A copy of the sysroot made of hard links (cheap): replace files only by unlinking."""
    shutil.copytree(sysroot, dest, symlinks=True, copy_function=os.link)
    return dest


def replace_with(path: Path, source: str) -> None:
    path.unlink()
    shutil.copy2(source, path)


def test_wrong_machine_program_is_refused_by_name(
    sysroot: Path, kernel: Path, tmp_path: Path
) -> None:
    root = overlay_copy(sysroot, tmp_path / "sysroot")
    host = shutil.which("makedumpfile")  # the host's, x86 (`make test` installs it)
    assert host is not None
    replace_with(root / "usr/bin/makedumpfile", host)
    config = load_config(write_config(tmp_path, "static"))
    with pytest.raises(KdumpError) as err:
        build(config, request(kernel, tmp_path / "x.img", root=root, arch="arm64",
                              cache_dir=tmp_path / "cache"))  # fmt: skip
    said = str(err.value)
    assert f"{root}/usr/bin/makedumpfile" in said
    assert "EM_X86_64" in said and "EM_AARCH64" in said
    assert not (tmp_path / "x.img").exists()


def test_wrong_machine_busybox_is_refused_by_name(
    sysroot: Path, kernel: Path, tmp_path: Path
) -> None:
    """busybox decides the arch when none is given: --arch says what it must be."""
    root = overlay_copy(sysroot, tmp_path / "sysroot")
    replace_with(root / "bin/busybox", "/bin/busybox")
    config = load_config(write_config(tmp_path, "static"))
    with pytest.raises(KdumpError, match=rf"{root}/bin/busybox\) is an ELF file for EM_X86_64"):
        build(config, request(kernel, tmp_path / "x.img", root=root, arch="arm64",
                              cache_dir=tmp_path / "cache"))  # fmt: skip
    # Without --arch the sysroot's busybox says x86: the build is for amd64, and the arm64
    # makedumpfile is then the program of the wrong machine.
    with pytest.raises(KdumpError, match=r"usr/bin/makedumpfile\) is an ELF file for EM_AARCH64"):
        build(config, request(kernel, tmp_path / "x.img", root=root, cache_dir=tmp_path / "c2"))


def test_wrong_machine_library_is_named(sysroot: Path, kernel: Path, tmp_path: Path) -> None:
    root = overlay_copy(sysroot, tmp_path / "sysroot")
    libz = root / "lib/aarch64-linux-gnu/libz.so.1"
    real = libz.resolve()
    replace_with(real, "/usr/lib/x86_64-linux-gnu/libz.so.1")
    config = load_config(write_config(tmp_path, "static"))
    with pytest.raises(KdumpError) as err:
        build(config, request(kernel, tmp_path / "x.img", root=root, arch="arm64",
                              cache_dir=tmp_path / "cache"))  # fmt: skip
    said = str(err.value)
    assert "libz.so.1 needed by /usr/bin/makedumpfile" in said
    assert "/lib/aarch64-linux-gnu/libz.so.1 is EM_X86_64" in said, said


def test_foreign_arch_needs_a_sysroot(
    kernel: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.img"
    assert main(cli(kernel, write_config(tmp_path, "static"), out, "--arch", "arm64")) != 0
    said = capsys.readouterr().err
    assert "--arch arm64 is not this host's architecture (amd64): give --sysroot" in said
    assert not out.exists()


def test_arch_and_sysroot_must_agree(sysroot: Path, kernel: Path, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "static"))
    wrong = (
        r"/usr/bin/makedumpfile \(.*\) is an ELF file for EM_AARCH64, but the image is for EM_X86"
    )
    with pytest.raises(KdumpError, match=wrong):
        build(config, request(kernel, tmp_path / "x.img", root=sysroot, arch="amd64"))


def test_missing_emulator_is_said(
    sysroot: Path, kernel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without qemu-user-static on PATH a cross build cannot read its programs' answers."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    config = load_config(write_config(tmp_path, "static"))
    with pytest.raises(KdumpError, match=r"qemu-aarch64-static is not installed \(Debian: apt"):
        build(config, request(kernel, tmp_path / "x.img", root=sysroot, arch="arm64",
                              cache_dir=tmp_path / "cache"))  # fmt: skip


def test_check_image_refuses_mixed_machines(sysroot: Path) -> None:
    arm = (sysroot / "bin/busybox").read_bytes()
    x86 = Path("/bin/busybox").read_bytes()
    entries = [Entry("bin/busybox", "file", 0o755, arm), Entry("bin/other", "file", 0o755, x86)]
    with pytest.raises(
        KdumpError, match=r"/bin/other is EM_X86_64, but the image is for EM_AARCH64"
    ):
        check_image(entries, "EM_AARCH64")
    check_image(entries[:1], "EM_AARCH64")
    with pytest.raises(
        KdumpError, match=r"/bin/busybox is EM_AARCH64, but the image is for EM_X86"
    ):
        check_image(entries[1:] + entries[:1] + [Entry("bin/x", "file", 0o755, x86)])


def test_firmware_comes_from_the_sysroot(sysroot: Path, kernel: Path, tmp_path: Path) -> None:
    """A firmware file r8169 names, placed in a copy of the sysroot: its bytes (not Realtek's)
    are what the image gets, whatever the host's /lib/firmware holds."""
    root = overlay_copy(sysroot, tmp_path / "sysroot")
    firmware = root / "lib/firmware/rtl_nic/rtl8168d-1.fw"
    firmware.parent.mkdir(parents=True)
    blob = (sysroot / ".packages").read_bytes()
    firmware.write_bytes(blob)
    config_text = CONFIG.replace("[virtio_blk, virtio_pci]", "[virtio_blk, virtio_pci, r8169]")
    (tmp_path / "nic.yaml").write_text(config_text + "capture: {stage: static}\n")
    config = load_config(tmp_path / "nic.yaml")
    out = tmp_path / "nic.img"
    report = build(config, request(kernel, out, root=root, arch="arm64", cache_dir=tmp_path / "c"))
    assert report.firmware == 1 and report.missing_firmware > 0
    entries = {e.path: e for a in split_archives(decompress(out.read_bytes(), str(out)))
               for e in read_newc(a)}  # fmt: skip
    assert entries["lib/firmware/rtl_nic/rtl8168d-1.fw"].data == blob
