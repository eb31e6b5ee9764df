"""`kdump-mkinitrd build` and `inspect` on a real Debian kernel, read back by real tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kdump_mkinitrd.arming.crashmemory import estimate
from kdump_mkinitrd.cli import main
from kdump_mkinitrd.config import load as load_config
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.compress import decompress
from kdump_mkinitrd.image.cpio import Entry, read_newc, split_archives
from kdump_mkinitrd.image.verify import check_image
from kdump_mkinitrd.qemutest import layouts
from tests.conftest import Kernel

UUID = "2f6e0e4c-8a53-4bd8-9b5c-0c0a3cf0f3a1"
DISK_CONFIG = f"""\
targets:
  - type: disk
    device: UUID={UUID}
    fstype: ext4
kernel_modules: [virtio_blk, virtio_pci]
failure_action: poweroff
final_action: poweroff
device_timeout: 20
compression: {{level: 3}}
capture: {{stage: static}}
"""


def write_config(tmp_path: Path, text: str = DISK_CONFIG) -> Path:
    path = tmp_path / "kdump.yaml"
    path.write_text(text)
    return path


def build_args(kernel: Kernel, config: Path, output: Path, *extra: str) -> list[str]:
    return [
        "build",
        "-k",
        kernel.kver,
        "--kmoddir",
        str(kernel.kmoddir),
        "--kernel",
        str(kernel.vmlinuz),
        "-c",
        str(config),
        "-o",
        str(output),
        *extra,
    ]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def built(kernel61: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("built")
    image = tmp / "kdump.img"
    assert main(build_args(kernel61, write_config(tmp), image)) == 0
    return image


def test_image_is_zstd_newc_readable_by_gnu_cpio(built: Path) -> None:
    assert built.stat().st_mode & 0o777 == 0o600
    # zstd undoes the concatenated frames into concatenated archives, which cpio and bsdtar
    # read one at a time (each stops at its trailer).
    raw = subprocess.run(["zstd", "-dc", str(built)], capture_output=True, check=True).stdout
    archives = split_archives(raw)
    assert len(archives) > 1
    listing = []
    tar: list[str] = []
    for archive in archives:
        listing += subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True,
                                  check=True).stdout.decode().split()  # fmt: skip
        tar += subprocess.run(["bsdtar", "-tf", "-"], input=archive, capture_output=True,
                              check=True).stdout.decode().split()  # fmt: skip
    assert "init" in listing
    assert "usr/bin/busybox" in listing
    assert "bin" in listing  # the usr-merge symlink, as on the host
    assert "usr/lib/modules/6.1.0-56-amd64/kernel/fs/ext4/ext4.ko" in listing  # /lib -> usr/lib
    assert sorted(tar) == sorted(listing)
    assert sorted(listing) == sorted(m.path for m in read_newc(decompress(built.read_bytes())))


def test_inspect_says_why_each_piece_is_there(
    built: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(["inspect", str(built), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    by_path = {e["path"]: e for e in info["entries"]}
    assert by_path["/init"]["feature"] == "base"
    assert by_path["/dev/console"]["type"] == "char" and by_path["/dev/console"]["rdev"] == [5, 1]
    assert by_path["/bin"]["type"] == "symlink"
    modules = {m["name"]: m for m in info["kernel_modules"]}
    assert {"ext4", "jbd2", "mbcache", "virtio_blk", "virtio_pci"} <= set(modules)
    assert "disk" in modules["ext4"]["why"]
    assert "kernel_modules" in modules["virtio_blk"]["why"]
    assert "ext4" in modules["jbd2"]["why"]
    assert info["binaries"][0]["path"].endswith("busybox")
    # The load order file lists every shipped module, each after its dependencies.
    raw = read_newc(decompress(built.read_bytes()))
    order = next(m for m in raw if m.path.endswith("kdump/modules.load")).data.decode().split("\n")
    names = [line.split()[0] for line in order if line]
    assert names.index("jbd2") < names.index("ext4")
    assert names.index("virtio_ring") < names.index("virtio_blk")
    code, text, _ = run_cli(["inspect", str(built)], capsys)
    assert "ext4" in text and "[base: " in text


def test_two_builds_are_byte_identical(kernel61: Kernel, tmp_path: Path, built: Path) -> None:
    again = tmp_path / "again.img"
    assert main(build_args(kernel61, built.parent / "kdump.yaml", again)) == 0
    assert again.read_bytes() == built.read_bytes()


def test_mtime_comes_from_source_date_epoch(
    kernel61: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    image = tmp_path / "k.img"
    assert main(build_args(kernel61, write_config(tmp_path), image)) == 0
    assert {m.mtime for m in read_newc(decompress(image.read_bytes()))} == {1700000000}


def test_failed_build_leaves_old_image(
    kernel61: Kernel, tmp_path: Path, built: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "k.img"
    shutil.copy(built, image)
    before = image.read_bytes()
    bad = write_config(tmp_path, DISK_CONFIG.replace("virtio_pci]", "virtio_pci, no_such_mod]"))
    code, _, err = run_cli(build_args(kernel61, bad, image), capsys)
    assert code == 1
    assert "no_such_mod" in err and kernel61.kver in err
    assert image.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_config_names_file_line_and_key(
    kernel61: Kernel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write_config(tmp_path, DISK_CONFIG.replace("fstype: ext4", "fstype: ext5"))
    code, _, err = run_cli(build_args(kernel61, bad, tmp_path / "k.img"), capsys)
    assert code == 1
    assert f"{bad}:4: key 'targets[0].fstype'" in err
    assert not (tmp_path / "k.img").exists()


def test_gzip_when_the_kernel_cannot_unpack_zstd(
    kernel61: Kernel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    vmlinuz = boot / kernel61.vmlinuz.name
    vmlinuz.symlink_to(kernel61.vmlinuz)
    kconfig = (kernel61.root / "boot" / f"config-{kernel61.kver}").read_text()
    assert "CONFIG_RD_ZSTD=y" in kconfig
    (boot / f"config-{kernel61.kver}").write_text(
        kconfig.replace("CONFIG_RD_ZSTD=y", "# CONFIG_RD_ZSTD is not set")
    )
    image = tmp_path / "k.img"
    args = build_args(kernel61, write_config(tmp_path), image)
    args[args.index("--kernel") + 1] = str(vmlinuz)
    code, out, _ = run_cli([*args, "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["compression"] == "gzip"
    assert "CONFIG_RD_ZSTD" in report["notes"][0]
    assert image.read_bytes()[:2] == b"\x1f\x8b"


def test_mkdumprd_style_arguments(
    kernel61: Kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "k.img"
    config = write_config(tmp_path)
    code = main([str(image), kernel61.kver, "--kmoddir", str(kernel61.kmoddir), "-c", str(config)])
    assert code == 0
    assert read_newc(decompress(image.read_bytes()))


def test_if_needed_rebuilds_only_when_an_input_changed(
    kernel61: Kernel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "k.img"
    config = write_config(tmp_path)
    extra = tmp_path / "features"
    shutil.copytree(Path(__file__).resolve().parent.parent / "modules.d" / "disk", extra / "disk")
    args = [*build_args(kernel61, config, image, "--json"), "--modules-dir", str(extra)]

    def if_needed() -> dict[str, object]:
        code, out, _ = run_cli([*args, "--if-needed"], capsys)
        assert code == 0
        return dict(json.loads(out))

    assert if_needed()["rebuilt_because"] == [f"no image at {image}"]
    first = image.read_bytes()
    assert if_needed()["up_to_date"] is True
    assert image.read_bytes() == first
    # A new mtime with the same content is not a change.
    os.utime(config)
    assert if_needed()["up_to_date"] is True
    # A feature module's template is an input too.
    template = extra / "disk" / "disk-target.sh.j2"
    template.write_text(template.read_text() + "# changed\n")
    report = if_needed()
    assert report["up_to_date"] is False
    assert report["rebuilt_because"] == [f"{template} changed"]
    config.write_text(config.read_text() + "# edited\n")
    assert if_needed()["rebuilt_because"] == [f"config {config} changed"]


def test_post_build_check_refuses_an_image_that_cannot_work(built: Path) -> None:
    members = read_newc(decompress(built.read_bytes()))
    entries = [Entry(m.path, m.kind, m.mode, m.data, m.rdev) for m in members]
    check_image(entries)  # the real image passes

    def without(suffix: str) -> list[Entry]:
        kept = [e for e in entries if not e.path.endswith(suffix)]
        assert len(kept) == len(entries) - 1
        return kept

    with pytest.raises(KdumpError, match=r"needs libc\.so\.6, which is not in the image"):
        check_image(without("/libc.so.6"))
    with pytest.raises(KdumpError, match=r"jbd2\.ko is listed in modules\.dep but missing"):
        check_image(without("/jbd2.ko"))
    with pytest.raises(KdumpError, match=r"/bin/nothing -> /usr/bin/missing leads nowhere"):
        check_image([*entries, Entry("bin/nothing", "symlink", 0o777, b"/usr/bin/missing")])


# The smallest crashkernel= that saved the dump in 3 boots of 3 (make bench BENCH_ONLY=curve,
# Debian 6.1, TCG guests with a filled ramdisk; bench/results.json "by_guest_memory"), by
# guest memory in GiB, for bench's config (qemu-test's, Debian's python3 for the stage).
CURVE_MINIMA_MB = {("static", 1): 96, ("static", 4): 96, ("static", 16): 96,
                   ("python", 1): 104, ("python", 4): 104, ("python", 16): 104}  # fmt: skip
BENCH_CONFIG = """\
targets:
  - {type: disk, device: UUID=2f6e0c1a-1111-4222-8333-944455556666, fstype: ext4, path: /var/crash}
kernel_modules: [virtio_blk, virtio_pci]
failure_action: poweroff
final_action: poweroff
device_timeout: 30
"""


@pytest.mark.parametrize("stage", ["static", "python"])
def test_estimate_lands_8m_to_24m_above_each_measured_minimum(
    stage: str, kernel61: Kernel, tmp_path: Path
) -> None:
    image = tmp_path / "k.img"
    python = ", python: /usr/bin/python3" if stage == "python" else ""
    text = BENCH_CONFIG + f"capture: {{stage: {stage}{python}}}\n"
    assert main(build_args(kernel61, write_config(tmp_path, text), image)) == 0
    for (measured_stage, gib), minimum in CURVE_MINIMA_MB.items():
        if measured_stage != stage:
            continue
        result = estimate(image, 128 * 2**20, gib * 2**30)
        assert result.total_mb % 8 == 0
        assert minimum + 8 <= result.total_mb <= minimum + 24, (gib, result)
        assert result.python_mb == (8 if stage == "python" else 0)
    # Beyond what was measured the page bitmaps keep the estimate growing, up to their cap.
    assert estimate(image, None, 1 << 40).total_mb >= estimate(image, None, 1 << 30).total_mb + 24


# The smallest crashkernel= at which `qemu-test --storage LAYOUT` passed with the Python stage
# (make bench BENCH_ONLY=storage, Debian 6.1, 1 GiB guest; bench/results.json, "storage").
STORAGE_MINIMA_MB = {"lvm": 120, "lvm-thin": 120, "raid1": 112, "luks": 120, "luks-on-lvm": 128,
                     "lvm-on-raid1": 128}  # fmt: skip


@pytest.mark.parametrize("name", list(layouts.LAYOUTS))
def test_estimate_covers_each_storage_layout(name: str, kernel61: Kernel, tmp_path: Path) -> None:
    """The image bench measures for the layout (qemu-test's config, Python stage): the
    estimate is at or above the measured minimum (and not far above), and every layout has
    one."""
    layout = layouts.LAYOUTS[name]
    key_file = tmp_path / "luks" / f"{layout.luks_uuid}.key"
    text = layouts.config_text(layout, key_file, hostonly=False, fallback=False)
    config = write_config(tmp_path, text + "capture: {stage: python}\n")
    layouts.luks_key_file(layout, load_config(config).targets[0], tmp_path)
    image = tmp_path / "k.img"
    assert main(build_args(kernel61, config, image)) == 0
    minimum = STORAGE_MINIMA_MB[name]
    assert minimum <= estimate(image, None).total_mb <= minimum + 24


@pytest.mark.parametrize(
    ("targets", "interpreter"),
    [
        ("  - {type: raw, device: /dev/vdb}\n", False),
        ("  - {type: raw, device: /dev/vdb}\n  - {type: disk, device: /dev/vdc, fstype: ext4}\n",
         True),
    ],
)  # fmt: skip
def test_python_stage_only_when_a_target_runs_it(
    targets: str, interpreter: bool, kernel61: Kernel, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Raw (and ssh) targets stream from the static init: the default stage: python leaves
    the interpreter out unless a disk or nfs target is there to run it, and says so."""
    image = tmp_path / "k.img"
    config = write_config(tmp_path, f"targets:\n{targets}kernel_modules: [virtio_blk]\n")
    assert main(build_args(kernel61, config, image)) == 0
    names = {e.path for e in read_newc(decompress(image.read_bytes(), str(image)))}
    # The interpreter and its libraries travel in the stage's squashfs (stagepack).
    assert any(n.endswith("/kdump/pystage.squashfs") for n in names) == interpreter
    assert ("no target here runs the Python stage" in capsys.readouterr().err) != interpreter
