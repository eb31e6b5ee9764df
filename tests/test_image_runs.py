"""Every program of a built image starts inside a chroot of the unpacked image.

The chroot has only what the image has: its own loader and libraries, no ld.so.cache. This
is where a library the host's loader finds only through /etc/ld.so.conf (that is, through
ld.so.cache) would be missing under the capture kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from kdump_mkinitrd.arming.sshsetup import ensure_key
from kdump_mkinitrd.config import parse
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan.elfdeps import ElfResolver
from kdump_mkinitrd.image.assemble import MANIFEST_PATH
from kdump_mkinitrd.image.build import BuildRequest, build
from kdump_mkinitrd.image.compress import decompress
from kdump_mkinitrd.image.cpio import Entry, read_newc
from kdump_mkinitrd.image.verify import check_image
from tests import imagerun
from tests.conftest import Kernel
from tests.test_elfdeps import Cc, fake_glibc_root

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")

DISK = "  - {type: disk, device: /dev/vdb, fstype: ext4}\n"


def ssh_target(tmp_path: Path, client: str, root: Path = Path("/")) -> str:
    """An ssh target with a real key and a pinned host key, in `tmp_path` under `root`."""
    ensure_key(root / tmp_path.relative_to("/") / "id")
    blob = (root / tmp_path.relative_to("/") / "id.pub").read_text().split()[1]
    (root / tmp_path.relative_to("/") / "known_hosts").write_text(f"10.0.2.2 ssh-ed25519 {blob}\n")
    return (f"  - {{type: ssh, host: root@10.0.2.2, client: {client}, identity: {tmp_path}/id, "
            f"known_hosts: {tmp_path}/known_hosts}}\n")  # fmt: skip


def build_image(
    kernel: Kernel, tmp_path: Path, text: str, root: Path = Path("/")
) -> tuple[Path, dict[str, bool]]:
    """Build `text`, unpack the image; its root and its programs."""
    output = tmp_path / "kdump.img"
    request = BuildRequest(kernel.kver, kernel.kmoddir, output, kernel_image=kernel.vmlinuz,
                           root=root)  # fmt: skip
    build(parse(text, str(tmp_path / "kdump.yaml")), request)
    unpacked = imagerun.unpack(output, tmp_path / "unpacked")
    return unpacked, imagerun.programs(unpacked)


@pytest.mark.parametrize(
    ("name", "targets", "stage", "expected"),
    [
        ("static", DISK, "static", {"/usr/bin/busybox": False, "/usr/bin/makedumpfile": True}),
        ("python", DISK, "python", {"python3": True, "/usr/bin/makedumpfile": True}),
        ("openssh", "SSH:openssh", "static", {"/usr/bin/ssh": True}),
        ("dropbear", "SSH:dropbear", "static", {"/usr/bin/dbclient": True}),
    ],
)
def test_every_program_of_a_real_image_starts_in_its_chroot(
    name: str, targets: str, stage: str, expected: dict[str, bool], kernel61: Kernel,
    tmp_path: Path,
) -> None:  # fmt: skip
    if targets.startswith("SSH:"):
        targets = ssh_target(tmp_path, targets[4:])
    text = f"targets:\n{targets}kernel_modules: [virtio_blk]\ncapture: {{stage: {stage}}}\n"
    root, found = build_image(kernel61, tmp_path, text)
    for program, dynamic in expected.items():
        # python3: whichever interpreter the stage found on PATH, under its real name.
        hits = [p for p in found if p == program or os.path.basename(p).startswith(program)]
        assert [found[p] for p in hits] == [dynamic], (program, found)
    assert imagerun.failures(root, found) == []
    if name == "openssh":
        # ssh looks up its own user first (getpwuid through NSS), with the image's /etc only.
        done = imagerun.run_in(root, "/usr/bin/ssh", "-G", "root@10.0.2.2")
        assert done.returncode == 0, done.stderr
        assert "user root" in done.stdout
        assert "passwd: files\n" in (root / "etc/nsswitch.conf").read_text()


def copy_closure(root: Path, programs: list[str]) -> None:
    """The build host's programs with their loader and libraries, copied into `root` at the
    same paths (with the symlinks on the way), as a distribution would have installed them."""
    closure = ElfResolver().resolve([(p, "fixture") for p in programs])
    for link in closure.symlinks:
        dest = root / link.path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.is_symlink():
            dest.symlink_to(link.target)
    for item in closure.files:
        dest = root / item.path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(item.source, dest)


def test_a_library_found_only_through_ld_so_conf_starts_in_the_image(
    kernel61: Kernel, tmp_path: Path
) -> None:
    """A vendor library in /opt/vendor/lib, known to the loader only through ld.so.conf.d
    (like a locally built /usr/local/lib/libcrypto.so.3): the image, which has no
    ld.so.cache, must hold it where its loader looks by itself."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is missing: `make test` installs it (Makefile DEBS)")
    root = tmp_path / "root"
    for top in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64"):
        (root / top).mkdir(parents=True)
    for top in ("bin", "sbin", "lib", "lib64"):
        (root / top).symlink_to(f"usr/{top}")
    copy_closure(root, ["/usr/bin/busybox", "/usr/bin/makedumpfile"])
    src = tmp_path / "src"
    src.mkdir()
    # Vendor bundles find their own siblings through RUNPATH $ORIGIN.
    (src / "core.c").write_text("int core(void) { return 40; }\n")
    (src / "vendor.c").write_text("int core(void);\nint vendor(void) { return core() + 2; }\n")
    (src / "tool.c").write_text(
        "#include <stdio.h>\nint vendor(void);\n"
        'int main(void) { printf("%d\\n", vendor()); return 0; }\n'
    )
    lib = root / "opt/vendor/lib/libvendor.so.1"
    lib.parent.mkdir(parents=True)
    gcc = ["gcc", "-O2"]
    subprocess.run(
        [*gcc, "-shared", "-fPIC", "-Wl,-soname,libvendorcore.so.1", "-o",
         str(lib.parent / "libvendorcore.so.1"), str(src / "core.c")], check=True)  # fmt: skip
    subprocess.run(
        [*gcc, "-shared", "-fPIC", "-Wl,-soname,libvendor.so.1", "-o", str(lib),
         str(src / "vendor.c"), f"-L{lib.parent}", "-l:libvendorcore.so.1",
         "-Wl,--enable-new-dtags,-rpath,$ORIGIN"], check=True)  # fmt: skip
    (lib.parent / "libvendor.so").symlink_to("libvendor.so.1")
    subprocess.run(
        [*gcc, "-o", str(root / "usr/bin/vendor-tool"), str(src / "tool.c"),
         f"-L{lib.parent}", "-lvendor"], check=True)  # fmt: skip
    (root / "etc/ld.so.conf.d").mkdir(parents=True)
    (root / "etc/ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    (root / "etc/ld.so.conf.d/vendor.conf").write_text("/opt/vendor/lib\n")

    text = f"targets:\n{DISK}kernel_modules: [virtio_blk]\ncapture: {{stage: static}}\n"
    text += "binaries: [vendor-tool]\n"
    unpacked, found = build_image(kernel61, tmp_path, text, root)
    assert found.get("/usr/bin/vendor-tool") is True
    assert imagerun.failures(unpacked, found) == []
    # And it really runs there, with the vendor library.
    done = imagerun.run_in(unpacked, "/usr/bin/vendor-tool")
    assert (done.returncode, done.stdout) == (0, "42\n"), done.stderr


def test_the_build_refuses_a_library_only_an_ld_so_cache_would_find(
    kernel61: Kernel, tmp_path: Path
) -> None:
    """The post-build check knows the image has no ld.so.cache: a library present, but only
    in a directory no run path names and the loader does not search by itself, is refused."""
    output = tmp_path / "kdump.img"
    text = f"targets:\n{ssh_target(tmp_path, 'openssh')}capture: {{stage: static}}\n"
    build(parse(text, str(tmp_path / "kdump.yaml")), BuildRequest(
        kernel61.kver, kernel61.kmoddir, output, kernel_image=kernel61.vmlinuz))  # fmt: skip
    entries = [Entry(m.path, m.kind, m.mode, m.data, m.rdev)
               for m in read_newc(decompress(output.read_bytes(), str(output)))]  # fmt: skip
    check_image(entries)
    libcrypto = next(e for e in entries if e.path.endswith("/libcrypto.so.3"))
    moved = [e for e in entries if e is not libcrypto]
    moved.append(replace(libcrypto, path="usr/local/lib/libcrypto.so.3"))
    with pytest.raises(KdumpError, match=(
        r"/usr/bin/ssh needs libcrypto\.so\.3, which is only at /usr/local/lib/libcrypto\.so\.3:"
        r" the loader does not look there without an ld\.so\.cache")):  # fmt: skip
        check_image(moved)


def test_an_ssh_image_built_on_a_glibc_older_than_2_34_carries_its_nss_modules(
    kernel61: Kernel, tmp_path: Path
) -> None:
    """A build host whose libc.so.6 (a real gcc-built library defining glibc's versions up
    to GLIBC_2.31) keeps NSS in modules: the ssh image holds them, found where that libc
    would dlopen them, and an nsswitch.conf that uses only them."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is missing: `make test` installs it (Makefile DEBS)")
    root = tmp_path / "root"
    fake_glibc_root(Cc(tmp_path), root, "2.31")
    for name in ("ssh", "makedumpfile"):  # programs of that host, linked to its libc
        shutil.copy(root / "usr/bin/prog", root / "usr/bin" / name)
    shutil.copy("/usr/bin/busybox", root / "usr/bin/busybox")
    keys = Path("/etc/kdump-keys")
    (root / keys.relative_to("/")).mkdir(parents=True)
    text = f"targets:\n{ssh_target(keys, 'openssh', root)}capture: {{stage: static}}\n"
    unpacked, _ = build_image(kernel61, tmp_path, text, root)
    libdir = unpacked / "usr/lib/x86_64-linux-gnu"
    for name in ("libnss_files.so.2", "libnss_dns.so.2", "libresolv.so.2"):
        assert (libdir / name).is_file(), name
    conf = (unpacked / "etc/nsswitch.conf").read_text()
    assert "passwd: files\n" in conf and "hosts: files dns\n" in conf
    manifest = json.loads((unpacked / MANIFEST_PATH.lstrip("/")).read_text())
    why = manifest["paths"]["/usr/lib/x86_64-linux-gnu/libnss_files.so.2"]["why"]
    assert why.startswith("loaded with dlopen by glibc 2.31 (/usr/lib/x86_64-linux-gnu/libc.so.6)")
