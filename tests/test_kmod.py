"""Kernel module resolution on real Debian kernels.

The 6.1 tree is resolved three ways that must agree: from depmod's files (depmod run
on a throw-away tree that links to the cache), from the modules' own ``.modinfo``,
and by ``modprobe --show-depends`` on the depmod'ed tree.
"""

from __future__ import annotations

import gzip
import json
import logging
import lzma
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan.firmware import (
    FoundFirmware,
    MissingFirmware,
    find_firmware,
    read_firmware,
    resolve_firmware,
)
from kdump_mkinitrd.hostscan.kmod import ModuleClosure, ModuleIndex, ResolvedModule, normalise_alias
from kdump_mkinitrd.hostscan.modinfo import (
    ModInfo,
    module_bytes,
    module_name_from_path,
    parse_modinfo,
    parse_softdep,
    plain_ko_path,
    read_modinfo,
)
from kdump_mkinitrd.qemutest.testcache import kernel_cache

REPO = Path(__file__).resolve().parent.parent
KERNEL_CACHE = kernel_cache()
KVER_61 = "6.1.0-56-amd64"
KVER_612 = "6.12.117+deb12-amd64"

# A virtio block device as QEMU presents it: the PCI function is driven by
# virtio_pci, which then creates the virtio device that virtio_blk binds to.
VIRTIO_BLK_PCI = "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00"
VIRTIO_BLK_DEVICE = "virtio:d00000002v00001AF4"

MANY_REQUESTS = [
    ("ext4", "disk"),
    ("fs-xfs", "disk"),
    ("btrfs", "disk"),
    (VIRTIO_BLK_PCI, "disk"),
    ("virtio-blk", "disk"),
    ("nvme", "disk"),
    ("dm_crypt", "disk"),
    ("vfio", "test"),
    ("md5", "test"),
]


def _kmoddir(kver: str) -> Path:
    kmoddir = KERNEL_CACHE / kver / "lib" / "modules" / kver
    if not kmoddir.is_dir():
        pytest.skip(f"kernel {kver} is not unpacked in {KERNEL_CACHE}: run `make kernels`")
    return kmoddir


@pytest.fixture(scope="module")
def kmoddir61() -> Path:
    return _kmoddir(KVER_61)


@pytest.fixture(scope="module")
def kmoddir612() -> Path:
    return _kmoddir(KVER_612)


@dataclass(frozen=True)
class Trees:
    """Two views of the 6.1 modules: one depmod'ed, one as the package unpacks."""

    depmod_root: Path
    depmod_kmoddir: Path
    modinfo_kmoddir: Path
    cache_dir: Path


def _link_tree(root: Path, source: Path, kver: str) -> Path:
    """A tree under root sharing source's kernel/ (never written to) plus updates/."""
    kmoddir = root / "lib" / "modules" / kver
    kmoddir.mkdir(parents=True)
    (kmoddir / "kernel").symlink_to(source / "kernel")
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        shutil.copy2(source / name, kmoddir / name)
    # An updates/ copy must win over kernel/ in depmod, modprobe and the scan alike.
    (kmoddir / "updates").mkdir()
    shutil.copy2(source / "kernel/drivers/block/virtio_blk.ko", kmoddir / "updates")
    return kmoddir


def _run_depmod(root: Path, kver: str) -> None:
    subprocess.run(["depmod", "-b", str(root), kver], check=True, capture_output=True)


@pytest.fixture(scope="module")
def trees61(tmp_path_factory: pytest.TempPathFactory, kmoddir61: Path) -> Trees:
    if shutil.which("depmod") is None or shutil.which("modprobe") is None:
        pytest.skip("depmod/modprobe (kmod) are not installed on this host")
    base = tmp_path_factory.mktemp("kmod61")
    depmod_kmoddir = _link_tree(base / "depmod", kmoddir61, KVER_61)
    _run_depmod(base / "depmod", KVER_61)
    if "kernel/fs/ext4/ext4.ko:" not in (depmod_kmoddir / "modules.dep").read_text():
        # This depmod does not descend into a symlinked kernel/: hard links are as cheap.
        (depmod_kmoddir / "kernel").unlink()
        subprocess.run(
            ["cp", "-al", str(kmoddir61 / "kernel"), str(depmod_kmoddir / "kernel")], check=True
        )
        _run_depmod(base / "depmod", KVER_61)
    return Trees(
        depmod_root=base / "depmod",
        depmod_kmoddir=depmod_kmoddir,
        modinfo_kmoddir=_link_tree(base / "modinfo", kmoddir61, KVER_61),
        cache_dir=base / "cache",
    )


@pytest.fixture(scope="module")
def depmod61(trees61: Trees) -> ModuleIndex:
    return ModuleIndex.load(KVER_61, trees61.depmod_kmoddir, trees61.cache_dir)


@pytest.fixture(scope="module")
def modinfo61(trees61: Trees) -> ModuleIndex:
    return ModuleIndex.load(KVER_61, trees61.modinfo_kmoddir, trees61.cache_dir)


@pytest.fixture(scope="module", params=["depmod", "modinfo"])
def index61(request: pytest.FixtureRequest) -> ModuleIndex:
    index: ModuleIndex = request.getfixturevalue(f"{request.param}61")
    return index


@pytest.fixture(scope="module")
def index612(tmp_path_factory: pytest.TempPathFactory, kmoddir612: Path) -> ModuleIndex:
    return ModuleIndex.load(KVER_612, kmoddir612, tmp_path_factory.mktemp("cache612"))


Portable = tuple[
    tuple[tuple[str, str, tuple[str, ...], tuple[str, ...], str], ...], tuple[str, ...]
]


def _portable(closure: ModuleClosure) -> Portable:
    """Everything but the host path, which differs between the two trees."""
    modules = tuple((m.name, m.relpath, m.depends, m.firmware, m.why) for m in closure.modules)
    return modules, closure.builtin


def _resolve_one(index: ModuleIndex, request: str) -> ModuleClosure:
    return index.resolve([(request, "test")])


def _modprobe(trees: Trees, request: str, tmp_path: Path) -> tuple[list[str], set[str]]:
    """(relpaths modprobe would insmod, in its order; names it reports as built-in)."""
    confdir = tmp_path / "modprobe.d"  # keeps the host's modprobe.d out of the comparison
    confdir.mkdir(exist_ok=True)
    command = ["modprobe", "-C", str(confdir), "--show-depends", "-d", str(trees.depmod_root)]
    shown = subprocess.run(
        [*command, "-S", KVER_61, request], check=True, capture_output=True, text=True
    ).stdout
    inserted: list[str] = []
    builtin: set[str] = set()
    for line in shown.splitlines():
        kind, target = line.split()[:2]
        if kind == "builtin":
            builtin.add(target)
            continue
        assert kind == "insmod", line
        relpath = Path(target).relative_to(trees.depmod_kmoddir).as_posix()
        # kmod prints a module again after its softdep post modules (vfio, vfio_iommu_type1,
        # vfio): the first insmod is the one that counts.
        if relpath not in inserted:
            inserted.append(relpath)
    return inserted, builtin


def _assert_deps_first(order: list[str], closure: ModuleClosure) -> None:
    position = {name: index for index, name in enumerate(order)}
    for module in closure.modules:
        for dep in module.depends:
            assert position[dep] < position[module.name], f"{dep} must load before {module.name}"


# --- the three ways agree -------------------------------------------------------------


def test_index_source(depmod61: ModuleIndex, modinfo61: ModuleIndex) -> None:
    assert depmod61.source == "depmod"
    assert modinfo61.source == "modinfo"


@pytest.mark.parametrize(
    "request_text",
    ["ext4", "virtio_blk", "virtio_pci", "fs-xfs", "crypto-crc32c", VIRTIO_BLK_PCI, "md5"],
)
def test_depmod_and_modinfo_agree(
    depmod61: ModuleIndex, modinfo61: ModuleIndex, request_text: str
) -> None:
    from_depmod = _resolve_one(depmod61, request_text)
    assert from_depmod.modules or from_depmod.builtin
    assert _portable(from_depmod) == _portable(_resolve_one(modinfo61, request_text))


def test_depmod_and_modinfo_agree_on_many_requests(
    depmod61: ModuleIndex, modinfo61: ModuleIndex
) -> None:
    assert _portable(depmod61.resolve(MANY_REQUESTS)) == _portable(modinfo61.resolve(MANY_REQUESTS))


@pytest.mark.parametrize(
    "request_text",
    [
        "ext4",
        "virtio_blk",
        "virtio_pci",
        "fs-xfs",
        "crypto-crc32c",
        VIRTIO_BLK_PCI,
        "md5",
        "crypto-md5",
        "crypto-sha256",
        "vfio",
    ],
)
def test_matches_modprobe(
    trees61: Trees, depmod61: ModuleIndex, request_text: str, tmp_path: Path
) -> None:
    inserted, builtin = _modprobe(trees61, request_text, tmp_path)
    closure = _resolve_one(depmod61, request_text)
    assert sorted(m.relpath for m in closure.modules) == sorted(inserted)
    assert set(closure.builtin) == builtin
    # Orders may legitimately differ; both must load every module after its deps.
    _assert_deps_first([module_name_from_path(path) for path in inserted], closure)


# --- lookups ---------------------------------------------------------------------------


def test_request_by_fs_alias(index61: ModuleIndex) -> None:
    closure = index61.resolve([("fs-xfs", "disk")])
    by_name = {m.name: m for m in closure.modules}
    assert by_name["xfs"].why == "requested as 'fs-xfs' by disk"
    assert by_name["xfs"].relpath == "kernel/fs/xfs/xfs.ko"
    assert by_name["libcrc32c"].why == "dependency of xfs"


def test_alias_matching_several_modules_includes_all(index61: ModuleIndex) -> None:
    closure = _resolve_one(index61, "crypto-crc32c")
    assert set(closure.names()) == {"crc32c_generic", "crc32c_intel"}


def test_modalias_requests(index61: ModuleIndex) -> None:
    pci = _resolve_one(index61, VIRTIO_BLK_PCI)
    assert pci.names()[-1] == "virtio_pci"
    assert pci.modules[-1].why == f"requested as {VIRTIO_BLK_PCI!r} by test"
    device = _resolve_one(index61, VIRTIO_BLK_DEVICE)
    assert device.names()[-1] == "virtio_blk"
    assert device.modules[-1].relpath == "updates/virtio_blk.ko"


def test_dash_and_underscore_are_the_same_name(index61: ModuleIndex) -> None:
    dashed = _resolve_one(index61, "virtio-blk")
    assert dashed.names() == _resolve_one(index61, "virtio_blk").names()
    assert dashed.modules[-1].why == "requested as 'virtio-blk' by test"


def test_builtin_requests_are_satisfied(index61: ModuleIndex) -> None:
    for request_text in ("md5", "crypto-md5"):
        closure = _resolve_one(index61, request_text)
        assert closure.modules == ()
        assert closure.builtin == ("md5",)
    # A module alias beats a built-in one, as in modprobe.
    sha256 = _resolve_one(index61, "crypto-sha256")
    assert sha256.names() == ("sha256_ssse3",)
    assert sha256.builtin == ()


def test_missing_module_names_request_and_kernel(index61: ModuleIndex) -> None:
    with pytest.raises(KdumpError) as info:
        index61.resolve([("ext4", "disk"), ("nosuchmod", "disk")])
    message = str(info.value)
    assert "'nosuchmod'" in message
    assert KVER_61 in message
    assert str(index61.kmoddir) in message


def test_missing_kmoddir(tmp_path: Path) -> None:
    with pytest.raises(
        KdumpError, match=rf"{re.escape(str(tmp_path / 'nope'))}.*{re.escape(KVER_61)}"
    ):
        ModuleIndex.load(KVER_61, tmp_path / "nope", tmp_path / "cache")


def test_unresolvable_softdep_is_a_warning(
    index61: ModuleIndex, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="kdump_mkinitrd.hostscan.kmod"):
        closure = _resolve_one(index61, "vfio")
    assert "vfio_iommu_spapr_tce" in caplog.text
    names = closure.names()
    assert names.index("vfio_iommu_type1") > names.index("vfio")
    assert closure.modules[names.index("vfio_iommu_type1")].why == "softdep post of vfio"


# --- load order ------------------------------------------------------------------------


def test_every_module_loads_after_its_deps(index61: ModuleIndex) -> None:
    closure = index61.resolve(MANY_REQUESTS)
    names = list(closure.names())
    assert len(names) == len(set(names))
    _assert_deps_first(names, closure)
    # Softdep pre modules come first: crc32c before jbd2 and ext4 use it.
    for user in ("jbd2", "ext4"):
        assert names.index("crc32c_generic") < names.index(user)
        assert names.index("crc32c_intel") < names.index(user)
    assert closure.builtin == ("md5",)


def test_load_order_is_deterministic(index61: ModuleIndex) -> None:
    assert index61.resolve(MANY_REQUESTS) == index61.resolve(MANY_REQUESTS)
    assert _resolve_one(index61, "virtio_pci").names() == (
        "virtio_pci_legacy_dev",
        "virtio_pci_modern_dev",
        "virtio_ring",
        "virtio",
        "virtio_pci",
    )


def test_earlier_requests_load_first(index61: ModuleIndex) -> None:
    names = index61.resolve([("virtio_blk", "disk"), ("ext4", "disk")]).names()
    assert names[:3] == ("virtio_ring", "virtio", "virtio_blk")


# --- modules.dep -----------------------------------------------------------------------


def _parse_modules_dep(text: str) -> dict[str, list[str]]:
    parsed: dict[str, list[str]] = {}
    for line in text.splitlines():
        target, sep, deps = line.partition(":")
        assert sep, line
        parsed[target] = deps.split()
    return parsed


def test_modules_dep_lists_exactly_the_closure(trees61: Trees, depmod61: ModuleIndex) -> None:
    closure = depmod61.resolve(MANY_REQUESTS)
    ours = _parse_modules_dep(closure.modules_dep())
    assert list(ours) == [m.relpath for m in closure.modules]
    depmods = _parse_modules_dep((trees61.depmod_kmoddir / "modules.dep").read_text())
    position = {m.relpath: index for index, m in enumerate(closure.modules)}
    for relpath, deps in ours.items():
        assert set(deps) == set(depmods[relpath]), relpath
        # modprobe inserts a modules.dep list back to front.
        assert [position[dep] for dep in deps] == sorted(
            (position[dep] for dep in deps), reverse=True
        )


# --- compressed trees ------------------------------------------------------------------


def test_xz_tree_resolves_to_plain_ko(index612: ModuleIndex) -> None:
    assert index612.source == "modinfo"
    closure = index612.resolve([("virtio_blk", "disk"), ("ext4", "disk")])
    assert {"virtio_blk", "ext4", "jbd2"} <= set(closure.names())
    # This kernel builds the virtio core in, so virtio_blk needs no other module.
    assert _resolve_one(index612, "virtio").builtin == ("virtio",)
    for module in closure.modules:
        assert module.path.name.endswith(".ko.xz")
        assert module.relpath.endswith(".ko")
        assert module.relpath == plain_ko_path(module.path.relative_to(index612.kmoddir).as_posix())
        data = module_bytes(module.path)
        assert data[:4] == b"\x7fELF"
        info = parse_modinfo(data)
        assert info.name == module.name
        assert (info.vermagic or "").startswith(KVER_612 + " ")


def test_every_compression_decodes_the_same(kmoddir61: Path, tmp_path: Path) -> None:
    source = kmoddir61 / "kernel/drivers/block/virtio_blk.ko"
    plain = source.read_bytes()
    no_size = zstandard.ZstdCompressor(write_content_size=False)
    variants = {
        "virtio_blk.ko.xz": lzma.compress(plain, format=lzma.FORMAT_XZ),
        "virtio_blk.ko.zst": no_size.compress(plain),
        "virtio_blk.ko.gz": gzip.compress(plain),
    }
    expected = read_modinfo(source)
    assert expected.depends == ("virtio", "virtio_ring")
    for name, packed in variants.items():
        path = tmp_path / name
        path.write_bytes(packed)
        assert module_bytes(path) == plain
        assert read_modinfo(path) == expected
        assert module_name_from_path(path) == "virtio_blk"


def test_corrupt_module_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ko.xz"
    bad.write_bytes(b"not xz at all")
    with pytest.raises(KdumpError, match=r"bad\.ko\.xz"):
        module_bytes(bad)


def test_modinfo_fields() -> None:
    info = ModInfo((("depends", ""), ("alias", "a"), ("alias", "b"), ("softdep", "pre: x")))
    assert info.depends == ()
    assert info.aliases == ("a", "b")
    assert info.softdeps == ("pre: x",)
    assert info.name is None
    assert ModInfo((("depends", "virtio,virtio_ring"),)).depends == ("virtio", "virtio_ring")


def test_parse_softdep() -> None:
    assert parse_softdep("pre: crc32c post: foo bar") == (("crc32c",), ("foo", "bar"))
    assert parse_softdep("post: a pre: b c") == (("b", "c"), ("a",))
    # Words before any marker mean nothing to modprobe (6.1's cifs: softdep=gcm).
    assert parse_softdep("gcm") == ((), ())


def test_normalise_alias_keeps_bracket_ranges() -> None:
    assert normalise_alias("char-major-10-[0-9]*") == "char_major_10_[0-9]*"


# --- the modinfo scan cache ------------------------------------------------------------


def _small_tree(root: Path, source: Path) -> Path:
    """A few real modules, and a build/ link whose contents must never be indexed."""
    kmoddir = root / "lib" / "modules" / KVER_61
    (kmoddir / "kernel/drivers/block").mkdir(parents=True)
    shutil.copytree(source / "kernel/drivers/virtio", kmoddir / "kernel/drivers/virtio")
    shutil.copy2(source / "kernel/drivers/block/virtio_blk.ko", kmoddir / "kernel/drivers/block")
    for name in ("modules.builtin", "modules.builtin.modinfo"):
        shutil.copy2(source / name, kmoddir / name)
    headers = root / "headers"
    headers.mkdir()
    (headers / "ext4.ko").write_bytes(b"not a module")
    (kmoddir / "build").symlink_to(headers)
    return kmoddir


@pytest.fixture
def read_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Paths whose .modinfo the index actually opens (the scan runs in threads)."""
    calls: list[Path] = []
    real: Callable[[Path], ModInfo] = read_modinfo

    def counting(path: Path) -> ModInfo:
        calls.append(path)
        return real(path)

    # kdump_mkinitrd.hostscan.kmod looks the name up at call time, from its scanning threads too.
    monkeypatch.setattr("kdump_mkinitrd.hostscan.kmod.read_modinfo", counting)
    yield calls


def test_name_requests_do_not_scan(kmoddir61: Path, tmp_path: Path, read_calls: list[Path]) -> None:
    kmoddir = _small_tree(tmp_path / "tree", kmoddir61)
    closure = ModuleIndex.load(KVER_61, kmoddir, tmp_path / "cache").resolve([("virtio_blk", "d")])
    assert closure.names() == ("virtio_ring", "virtio", "virtio_blk")
    assert sorted(path.name for path in read_calls) == [
        "virtio.ko",
        "virtio_blk.ko",
        "virtio_ring.ko",
    ]
    with pytest.raises(KdumpError, match="'ext4'"):
        ModuleIndex.load(KVER_61, kmoddir, tmp_path / "cache").resolve([("ext4", "d")])


def test_scan_cache_is_reused_and_refreshed(
    kmoddir61: Path, tmp_path: Path, read_calls: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    kmoddir = _small_tree(tmp_path / "tree", kmoddir61)
    cache_dir = tmp_path / "cache"
    module_files = sorted(kmoddir.glob("kernel/**/*.ko"))

    def resolve() -> ModuleClosure:
        index = ModuleIndex.load(KVER_61, kmoddir, cache_dir)
        return index.resolve([(VIRTIO_BLK_DEVICE, "disk")])

    first = resolve()
    assert first.names()[-1] == "virtio_blk"
    assert sorted(read_calls) == module_files
    (cache_file,) = cache_dir.iterdir()

    read_calls.clear()
    assert resolve() == first
    assert read_calls == []

    touched = kmoddir / "kernel/drivers/virtio/virtio.ko"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    read_calls.clear()
    assert resolve() == first
    assert read_calls == [touched]

    cache_file.write_text("{ not json")
    read_calls.clear()
    with caplog.at_level(logging.WARNING, logger="kdump_mkinitrd.hostscan.kmod"):
        assert resolve() == first
    assert "ignoring unreadable module cache" in caplog.text
    assert sorted(read_calls) == module_files
    assert len(json.loads(cache_file.read_text())["modules"]) == len(module_files)


def test_full_tree_second_load_uses_cache(
    trees61: Trees, modinfo61: ModuleIndex, read_calls: list[Path]
) -> None:
    expected = _resolve_one(modinfo61, "fs-xfs")  # the scan, once per test session
    read_calls.clear()
    again = ModuleIndex.load(KVER_61, trees61.modinfo_kmoddir, trees61.cache_dir)
    assert _resolve_one(again, "fs-xfs") == expected
    assert read_calls == []


# --- firmware --------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_firmware_search_order(tmp_path: Path) -> None:
    root = tmp_path / "firmware"
    kver = KVER_61
    places = [root / "updates" / kver, root / "updates", root / kver, root]
    for place in places:
        _write(place / "vendor/a.bin", str(place).encode())
    for place in places:
        assert find_firmware("vendor/a.bin", kver, root) == place / "vendor/a.bin"
        (place / "vendor/a.bin").unlink()
    assert find_firmware("vendor/a.bin", kver, root) is None

    # A plain file anywhere beats a compressed one anywhere; .zst beats .xz.
    _write(root / "updates" / kver / "b.bin.xz", lzma.compress(b"b-xz"))
    _write(root / "b.bin", b"b-plain")
    assert find_firmware("b.bin", kver, root) == root / "b.bin"
    _write(root / "c.bin.zst", zstandard.ZstdCompressor().compress(b"c-zst"))
    _write(root / "updates" / "c.bin.xz", lzma.compress(b"c-xz"))
    assert find_firmware("c.bin", kver, root) == root / "c.bin.zst"
    assert read_firmware(root / "c.bin.zst") == b"c-zst"
    assert read_firmware(root / "updates" / "c.bin.xz") == b"c-xz"


def test_firmware_names_cannot_escape_root(tmp_path: Path) -> None:
    _write(tmp_path / "secret", b"x")
    root = tmp_path / "firmware"
    root.mkdir()
    assert find_firmware("../secret", KVER_61, root) is None
    assert find_firmware(str(tmp_path / "secret"), KVER_61, root) is None


def test_resolve_firmware_of_a_real_module(
    index61: ModuleIndex, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    closure = _resolve_one(index61, "bnx2")
    (bnx2,) = (m for m in closure.modules if m.name == "bnx2")
    assert "bnx2/bnx2-mips-09-6.2.1b.fw" in bnx2.firmware
    root = tmp_path / "firmware"
    present = _write(root / "bnx2/bnx2-mips-09-6.2.1b.fw.xz", lzma.compress(b"mips"))
    with caplog.at_level(logging.WARNING, logger="kdump_mkinitrd.hostscan.firmware"):
        found, missing = resolve_firmware(closure, KVER_61, root)
    assert found == [FoundFirmware("bnx2/bnx2-mips-09-6.2.1b.fw", present, "bnx2")]
    assert found[0].read() == b"mips"
    expected_missing = [
        MissingFirmware(name, "bnx2") for name in bnx2.firmware if not name.endswith("09-6.2.1b.fw")
    ]
    assert missing == expected_missing
    for name, module in missing:
        assert f"firmware {name} for kernel module {module} not found" in caplog.text


def test_resolve_firmware_of_a_constructed_closure(tmp_path: Path) -> None:
    module = ResolvedModule(
        name="fake",
        path=tmp_path / "fake.ko",
        relpath="kernel/fake.ko",
        depends=(),
        firmware=("fw.bin",),
        why="test",
    )
    root = tmp_path / "firmware"
    path = _write(root / "updates" / "fw.bin", b"fw")
    result = resolve_firmware(ModuleClosure(modules=(module,), builtin=()), KVER_61, root)
    assert result.found == [FoundFirmware("fw.bin", path, "fake")]
    assert result.missing == []
