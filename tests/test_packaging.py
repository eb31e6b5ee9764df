"""kdump-mkinitrd as pip installs it: the wheel holds the package and its data and no QEMU
harness, and installed (not editable) into a fresh venv it builds a real image; the command
line imports the harness only for `qemu-test`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from kdump_mkinitrd.image.inputs import read_record
from kdump_mkinitrd.qemutest.faults import FAULTS
from kdump_mkinitrd.qemutest.testcache import cache_root
from tests.conftest import Kernel

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
HARNESS = "kdump_mkinitrd.qemutest"
NO_HARNESS = "runs from a source checkout only"
TIMEOUT = 300
PIP = [sys.executable, "-m", "pip"]
# A raw target (static capture) and a disk target (the Python stage, packed from the
# installed kdump_mkinitrd.capture).
CONFIG = """\
targets:
  - {type: disk, device: /dev/vdb, fstype: ext4}
  - {type: raw, device: /dev/vdc}
kernel_modules: [virtio_blk, virtio_pci]
"""


def shipped_files(modules_d: str, templates: str) -> set[str]:
    """What an installation must hold, relative to where the package's folder goes: builder/
    as kdump_mkinitrd/ without the harness, and modules.d and templates as named here."""
    tops = {"builder": "kdump_mkinitrd", "modules.d": modules_d, "templates": templates}
    return {
        f"{to}/{p.relative_to(REPO / top).as_posix()}"
        for top, to in tops.items()
        for p in (REPO / top).rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and not p.is_relative_to(REPO / "builder" / "qemutest")
    }


def _run(args: Sequence[object], cwd: Path) -> subprocess.CompletedProcess[str]:
    # Nothing may put this checkout before an installed copy.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def _kernel_args(kernel: Kernel) -> list[str]:
    return ["-k", kernel.kver, "--kmoddir", str(kernel.kmoddir), "--kernel", str(kernel.vmlinuz)]


def _ok(ran: subprocess.CompletedProcess[str]) -> str:
    assert ran.returncode == 0, f"{ran.args}: {ran.stdout}\n{ran.stderr}"
    return ran.stdout


def _wheelhouse(tmp: Path) -> Path:
    """Wheels of the runtime dependencies, fetched once per dependency list and interpreter
    into .cache, so that later runs install offline."""
    deps = PYPROJECT["project"]["dependencies"]
    material = json.dumps([deps, sys.implementation.cache_tag, platform.machine()])
    house = cache_root() / "wheelhouse" / hashlib.sha256(material.encode()).hexdigest()[:16]
    if not house.is_dir():
        house.parent.mkdir(parents=True, exist_ok=True)
        fetching = Path(tempfile.mkdtemp(dir=house.parent, prefix=".fetching-"))
        try:
            _ok(_run([*PIP, "wheel", "-q", "-w", fetching, *deps], tmp))
            with contextlib.suppress(OSError):  # another run got there first
                fetching.rename(house)
        finally:
            shutil.rmtree(fetching, ignore_errors=True)
    return house


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (setuptools' build/ would otherwise land in
    the checkout, and stale files in it could end up in the wheel)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for name in ("pyproject.toml", "README.md"):
        source.mkdir(exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    for name in ("builder", "modules.d", "templates"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    # The venv's own setuptools (a test dependency): no download at test time.
    build = [*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", source]
    _ok(_run(build, tmp))
    (built,) = (tmp / "dist").glob("kdump_mkinitrd-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed, not editable; its dependencies come from
    wheels, never from this checkout's venv."""
    tmp = tmp_path_factory.mktemp("venv")
    venv = tmp / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", venv], tmp))
    house = _wheelhouse(tmp)
    install = [*PIP, "--python", venv / "bin/python", "install", "-q", "--no-index"]
    _ok(_run([*install, "--find-links", house, wheel], tmp))
    return venv


def test_wheel_holds_the_package_and_its_data_and_no_harness(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    files = {n for n in names if not n.startswith("kdump_mkinitrd-")}  # not the .dist-info
    assert files == shipped_files("kdump_mkinitrd/modules_d", "kdump_mkinitrd/templates")
    for needed in ("kdump_mkinitrd/cli.py", "kdump_mkinitrd/capture/stage.py",
                   "kdump_mkinitrd/modules_d/base/module.yaml",
                   "kdump_mkinitrd/templates/init.sh.j2"):  # fmt: skip
        assert needed in files
    assert not [n for n in names if n.startswith("kdump_mkinitrd/qemutest")]
    assert {n.partition("/")[0] for n in files} == {"kdump_mkinitrd"}  # no `builder`


def test_installed_wheel_builds_and_inspects_an_image(
    venv: Path, kernel61: Kernel, tmp_path: Path
) -> None:
    site = next(venv.glob("lib/python3*/site-packages"))
    probe = "import kdump_mkinitrd; print(kdump_mkinitrd.__file__)"
    where = _ok(_run([venv / "bin/python", "-c", probe], tmp_path))
    assert where.strip() == str(site / "kdump_mkinitrd/__init__.py")
    assert not (site / "kdump_mkinitrd/qemutest").exists()
    command = venv / "bin/kdump-mkinitrd"
    (tmp_path / "kdump.yaml").write_text(CONFIG)
    kernel = _kernel_args(kernel61)
    built = _run([command, "build", *kernel, "-c", "kdump.yaml", "-o", "kdump.img"], tmp_path)
    assert built.returncode == 0, built.stderr
    assert "kdump.img:" in built.stdout
    image = tmp_path / "kdump.img"
    assert image.stat().st_size > 0
    report = json.loads(_ok(_run([command, "inspect", "--json", "kdump.img"], tmp_path)))
    assert report["kver"] == kernel61.kver
    assert {"disk", "raw", "python-stage"} <= set(report["features"])
    paths = {entry["path"] for entry in report["entries"]}
    assert "/init" in paths
    # Its feature modules, templates and capture stage came from the installed package.
    recorded = read_record(image)
    assert recorded is not None
    assert recorded["feature_dirs"] == [str(site / "kdump_mkinitrd/modules_d")]
    assert str(site / "kdump_mkinitrd/templates/init.sh.j2") in recorded["inputs"]
    assert str(site / "kdump_mkinitrd/capture/stage.py") in recorded["inputs"]
    sources = tuple(f"{REPO / top}/" for top in ("builder", "modules.d", "templates"))
    assert not [name for name in recorded["inputs"] if name.startswith(sources)]
    assert _ok(_run([command, "inspect", "kdump.img"], tmp_path)).startswith("Image: kdump.img")


def test_installed_wheel_says_qemu_test_needs_a_checkout(
    venv: Path, kernel61: Kernel, tmp_path: Path
) -> None:
    command = venv / "bin/kdump-mkinitrd"
    kernel = _kernel_args(kernel61)
    args = [command, "qemu-test", *kernel]
    ran = _run(args, tmp_path)
    assert ran.returncode == 1
    assert "Traceback" not in ran.stderr
    assert ran.stderr.startswith("kdump-mkinitrd: error: qemu-test needs the QEMU test harness")
    assert NO_HARNESS in ran.stderr
    as_json = _run([*args, "--json"], tmp_path)
    assert as_json.returncode == 1 and "Traceback" not in as_json.stderr
    assert NO_HARNESS in json.loads(as_json.stdout)["error"]
    helped = _run([command, "qemu-test", "--help"], tmp_path)
    assert _ok(helped).startswith("usage: kdump-mkinitrd qemu-test")
    assert NO_HARNESS in helped.stdout


# ---- the command line loads the harness only for qemu-test ---------------------------------


def _imported(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    ran = _run([sys.executable, "-X", "importtime", "-m", "kdump_mkinitrd.cli", *args], tmp_path)
    names = {
        line.rpartition("|")[2].strip()
        for line in ran.stderr.splitlines()
        if line.startswith("import time:")
    }
    return ran, names


@pytest.mark.parametrize(
    "args",
    [["--help"], ["build", "--help"], ["inspect", "--help"], ["status"], ["list-dumps", "."]],
)
def test_other_commands_import_no_harness_module(tmp_path: Path, args: list[str]) -> None:
    ran, imported = _imported(tmp_path, *args)
    assert "Traceback" not in ran.stderr
    if args[-1] == "--help":
        assert _ok(ran).startswith("usage: kdump-mkinitrd")
    assert "kdump_mkinitrd.image.build" in imported  # the command line did load
    assert not [name for name in imported if name.startswith(HARNESS)]


def test_qemu_test_help_loads_the_harness_and_lists_the_faults(tmp_path: Path) -> None:
    ran, imported = _imported(tmp_path, "qemu-test", "--help")
    out = _ok(ran)
    assert f"{HARNESS}.faults" in imported
    assert out.startswith("usage: kdump-mkinitrd qemu-test")
    listed = " ".join(out.partition("\nfaults (--fault NAME): what must happen\n")[2].split())
    for name, fault in FAULTS.items():
        assert f"{name}: {' '.join(fault.outcome.split())}" in listed
