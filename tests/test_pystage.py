"""kdump_mkinitrd.image.pystage with real interpreters.

The packed stage runs in a chroot that holds only what the plan holds (plus the host's
usr-merge links), with only the environment PythonStage.env() names: a module the packer
missed cannot be found on the host, and a library the resolver missed cannot be loaded.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from kdump_mkinitrd.capture.dmesg import extract_dmesg
from kdump_mkinitrd.capture.vmcore import Vmcore
from kdump_mkinitrd.capture.vmcore_json import problems
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan.elfdeps import ElfResolver
from kdump_mkinitrd.image import pystage
from kdump_mkinitrd.image.assemble import PACKAGE_DIR
from kdump_mkinitrd.image.cpio import Entry, write_newc
from kdump_mkinitrd.image.plan import ImagePlan
from kdump_mkinitrd.image.pystage import PythonStage, add_python_stage, build_zip
from kdump_mkinitrd.paths import HARNESS_DIR

REPO = Path(__file__).resolve().parent.parent
HOST_PYTHON = os.path.realpath(sys.executable)
DEBIAN_PYTHON = "/usr/bin/python3.11"
CHROOT = shutil.which("chroot")
TIME = os.path.exists("/usr/bin/time")
MARKER = "KSTAGE-OK"
FEATURE = "python-stage"

INTERPRETERS = [
    pytest.param(HOST_PYTHON, id="host"),
    pytest.param(
        DEBIAN_PYTHON,
        id="debian",
        marks=pytest.mark.skipif(not os.path.exists(DEBIAN_PYTHON), reason="no Debian python"),
    ),
]
needs_chroot = pytest.mark.skipif(
    os.geteuid() != 0 or CHROOT is None, reason="running a stage in a chroot needs root"
)

STAGE_MAIN = """\
import hashlib
import json
import os
import struct
import sys
import time


def main() -> int:
    data = struct.pack("<QQ", 1, 2) + b"kdump" * 1000
    record = {"sha256": hashlib.sha256(data).hexdigest(), "pid": os.getpid() > 0,
              "t": time.monotonic() > 0, "argv": sys.argv[1:]}
    text = json.dumps(record, sort_keys=True)
    assert json.loads(text) == record
    print(text)
    print("KSTAGE-OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
"""


# --- helpers -----------------------------------------------------------------------------


def write_stage(base: Path, main: str = STAGE_MAIN, name: str = "kstage") -> Path:
    """A stage package `name` with `name.main`; returns the directory holding it."""
    package = base / name
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""A test capture stage."""\n')
    (package / "main.py").write_text(main)
    return base


def pack(
    interpreter: str,
    entry: str,
    package_dir: Path,
    cache_dir: Path,
    exclude: tuple[str, ...] = pystage.DEFAULT_EXCLUDE,
) -> tuple[ImagePlan, PythonStage]:
    plan = ImagePlan()
    # Every file in the plan, where a chroot can run it (the squashfs packing of the same
    # files is compared with this one in test_pystage_squashfs).
    stage = add_python_stage(
        plan, interpreter, entry, package_dir, FEATURE, ElfResolver(), exclude, cache_dir,
        packing="plain",
    )  # fmt: skip
    return plan, stage


def materialize(plan: ImagePlan, root: Path) -> None:
    """Write the plan into `root`, as the kernel would unpack the image."""
    for name in ("bin", "lib", "lib64", "sbin"):
        # The host's usr-merge links, so /lib64/ld-linux-x86-64.so.2 resolves in the chroot.
        if os.path.islink(f"/{name}"):
            os.symlink(os.readlink(f"/{name}"), root / name)
    for item in plan.items():
        path = root / item.path.lstrip("/")
        if item.kind == "dir":
            path.mkdir(exist_ok=True)
        elif item.kind == "symlink":
            if not path.is_symlink():
                os.symlink(item.data.decode(), path)
        elif item.source is not None:
            # A hard link is cheap, but only a copy may get a mode the host file lacks.
            try:
                if item.source.stat().st_mode & 0o7777 != item.mode:
                    raise OSError("mode differs")
                os.link(item.source, path)
            except OSError:
                shutil.copyfile(item.source, path)
                os.chmod(path, item.mode)
        else:
            path.write_bytes(item.data)
            os.chmod(path, item.mode)


@dataclass(frozen=True)
class Run:
    status: int
    out: str
    err: str
    max_rss_kib: int | None


def run_in_chroot(root: Path, argv: list[str], env: dict[str, str]) -> Run:
    """Run argv under chroot with exactly `env`.

    The peak RSS comes from GNU time when it is there: rusage of a child forked straight from
    pytest would count the pytest pages the child had before exec.
    """
    assert CHROOT is not None
    with tempfile.TemporaryDirectory() as tmp:
        rss = Path(tmp) / "rss"
        timer = ["/usr/bin/time", "-f", "%M", "-o", str(rss)] if TIME else []
        done = subprocess.run(
            [*timer, CHROOT, str(root), *argv], env=env, capture_output=True, text=True
        )
        peak = int(rss.read_text().split()[-1]) if TIME else None
    return Run(done.returncode, done.stdout, done.stderr, peak)


def flags(stage: PythonStage) -> list[str]:
    """The command without `-m entry`: to run other code the same way."""
    assert stage.command[-2] == "-m"
    return list(stage.command[:-2])


def not_from_disk(interpreter: str, names: list[str]) -> set[str]:
    """Those of `names` the interpreter has built in or frozen."""
    script = (
        "import sys, _imp\n"
        "print(' '.join(n for n in sys.argv[1:] if _imp.is_builtin(n) or _imp.is_frozen(n)))\n"
    )
    done = subprocess.run(
        [interpreter, "-S", "-c", script, *names], capture_output=True, text=True, check=True
    )
    return set(done.stdout.split())


def stage_bytes(plan: ImagePlan) -> tuple[int, int]:
    """Bytes the stage adds unpacked, and as a zstd -12 newc archive of just those files."""
    entries: list[Entry] = plan.entries()[0]
    raw = io.BytesIO()
    write_newc(entries, raw)
    total = sum(len(e.data) for e in entries if e.kind == "file")
    return total, len(zstandard.ZstdCompressor(level=12).compress(raw.getvalue()))


def zip_of(plan: ImagePlan, stage: PythonStage) -> bytes:
    return next(item.data for item in plan.items() if item.path == stage.zip_path)


def snapshot(plan: ImagePlan) -> list[tuple[str, str, int, bytes]]:
    """Everything the writer would put in the image, content included."""
    return [(e.path, e.kind, e.mode, e.data) for e in plan.entries()[0]]


# --- the stage runs with nothing but what was packed ---------------------------------------


@needs_chroot
@pytest.mark.parametrize("interpreter", INTERPRETERS)
def test_stage_runs_in_chroot_with_only_what_was_packed(interpreter: str, tmp_path: Path) -> None:
    package_dir = write_stage(tmp_path / "src")
    started = time.monotonic()
    plan, stage = pack(interpreter, "kstage.main", package_dir, tmp_path / "cache")
    cold = time.monotonic() - started
    root = tmp_path / "root"
    root.mkdir()
    materialize(plan, root)

    run = run_in_chroot(root, [*stage.command, "--dir", "/x"], stage.env())
    assert run.status == 0, run.err
    assert MARKER in run.out
    assert '"argv": ["--dir", "/x"]' in run.out
    assert run.err == ""  # no "Could not find platform libraries" or similar warnings

    # -X importtime lists every import attempted. All came from the zip, the lib-dynload
    # copies or the interpreter itself, except optional imports of excluded modules (hashlib
    # tries _hashlib and falls back), which failed as intended.
    timed = run_in_chroot(
        root, [*flags(stage), "-X", "importtime", "-m", "kstage.main"], stage.env()
    )
    assert timed.status == 0, timed.err
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", timed.err, re.M)
    assert "kstage" in imported and "json.decoder" in imported  # kstage.main runs as __main__
    missing = set(imported) - set(stage.modules) - not_from_disk(stage.interpreter, imported)
    assert missing == {"_hashlib"}

    # The pieces, where the init expects them.
    assert stage.interpreter == os.path.realpath(interpreter)
    assert stage.zip_path.startswith(stage.home + "/") and stage.zip_path.endswith(".zip")
    assert "PYTHONPATH" not in stage.env()
    assert all(path.startswith(stage.home + "/") for path in stage.extensions)
    items = {item.path: item for item in plan.items()}
    assert items[stage.interpreter].why == "interpreter for the capture stage kstage.main"
    assert {"kstage", "kstage.main", "hashlib", "json", "encodings.utf_8"} <= set(stage.modules)
    # Excluded, frozen or built in: none of these is worth crash-kernel memory here.
    for name in ("os", "codecs", "_hashlib", "ssl", "subprocess", "logging", "unicodedata"):
        assert name not in stage.modules, name
    names = zipfile.ZipFile(io.BytesIO(zip_of(plan, stage))).namelist()
    assert names == sorted(names) and all(n.endswith(".pyc") for n in names)

    total, compressed = stage_bytes(plan)
    print(
        f"\n[{interpreter}] modules={len(stage.modules)} (extensions {len(stage.extensions)})"
        f" zip={len(zip_of(plan, stage))} total={total} zstd12={compressed}"
        f" peak_rss={run.max_rss_kib} KiB cold_pack={cold:.2f}s"
    )
    assert len(stage.modules) < 70
    assert len(zip_of(plan, stage)) < 1_200_000


def synthetic_vmcore() -> bytes | None:
    """A small ELF vmcore with a kernel log, from the vmcore tests if they provide one."""
    try:
        module = importlib.import_module("tests.test_vmcore")
    except ImportError:
        return None
    make = getattr(module, "prb_core", None)
    return make() if callable(make) else None


@needs_chroot
@pytest.mark.parametrize("interpreter", INTERPRETERS)
def test_real_capture_stage_in_chroot(interpreter: str, tmp_path: Path) -> None:
    for entry in ("capture.dmesg", "capture.stage"):
        plan, stage = pack(interpreter, entry, REPO / "builder", tmp_path / "cache")
        root = tmp_path / entry
        root.mkdir()
        materialize(plan, root)
        code = f"import {entry} as m; print('IMPORTED', m.__name__)"
        run = run_in_chroot(root, [*flags(stage), "-c", code], stage.env())
        assert run.status == 0, run.err
        assert f"IMPORTED {entry}" in run.out
        core = synthetic_vmcore() if entry == "capture.stage" else None
        if core is not None:
            # The whole stage, as the init runs it, on a vmcore the vmcore tests build.
            (root / "proc").mkdir()
            (root / "proc" / "cmdline").write_text("console=ttyS0\n")
            (root / "proc" / "vmcore").write_bytes(core)
            (root / "dump").mkdir()
            run = run_in_chroot(root, [*stage.command, "--dir", "/dump"], stage.env())
            assert run.status == 0, run.out + run.err
            assert (root / "dump" / "vmcore").is_file()
            assert (root / "dump" / "vmcore-dmesg.txt").is_file()
        total, compressed = stage_bytes(plan)
        print(
            f"\n[{interpreter}] {entry}{' (ran on a synthetic vmcore)' if core else ''}:"
            f" modules={len(stage.modules)} zip={len(zip_of(plan, stage))} total={total}"
            f" zstd12={compressed} peak_rss={run.max_rss_kib} KiB"
        )


@needs_chroot
def test_stage_writes_an_elf_dump_when_makedumpfile_fails(tmp_path: Path) -> None:
    """Debian's real makedumpfile, packed with its libraries as an image packs it, refuses the
    synthetic vmcore ("Can't get necessary symbols for excluding free pages"; 1.7.2 refuses an
    arm64 6.12 kernel likewise): the stage still leaves a dump, the native writer's ELF core,
    and says why in vmcore.json."""
    core = synthetic_vmcore()
    assert core is not None
    plan, stage = pack(DEBIAN_PYTHON, "capture.stage", REPO / "builder", tmp_path / "cache")
    closure = ElfResolver().resolve([("makedumpfile", "test")])
    for link in closure.symlinks:
        if not plan.has(link.path):  # libz and libc come with the interpreter already
            plan.symlink(link.path, link.target, "test", "symlink on the way")
    for elf in closure.files:
        if not plan.has(elf.path):
            plan.file(elf.path, "test", elf.why, source=elf.source, mode=0o755)
    root = tmp_path / "root"
    root.mkdir()
    materialize(plan, root)
    (root / "proc").mkdir()
    (root / "proc" / "vmcore").write_bytes(core)
    (root / "dump").mkdir()
    (root / "tmp").mkdir()
    makedumpfile = ElfResolver().find_program("makedumpfile")
    run = run_in_chroot(root, [*stage.command, "--dir", "/dump", "--collector", "makedumpfile",
                               "--makedumpfile", makedumpfile, "--flag", "-l",
                               "--dump-level", "31"], stage.env())  # fmt: skip
    assert run.status == 0, run.out + run.err
    assert "makedumpfile failed with status" in run.out + run.err
    record = json.loads((root / "dump" / "vmcore.json").read_text())
    assert (record["collector"], record["format"]) == ("native", "elf")
    assert record["collector_error"].startswith("makedumpfile failed with status ")
    assert not problems(record)
    assert not (root / "dump" / "vmcore.incomplete").exists()
    with Vmcore.open(str(root / "dump" / "vmcore")) as saved:
        assert "Linux version" in extract_dmesg(saved)


# A stage importing an excluded module gets it: exclusion only stops what the standard
# library would import lazily. Each module on its own, so one cannot mask another's needs.
@needs_chroot
@pytest.mark.parametrize(
    "module",
    [
        "subprocess",
        "logging",
        "dataclasses",
        "pathlib",
        "tempfile",
        "argparse",
        "datetime",
        "decimal",
        "pickle",
        "socket",
        "traceback",
        "functools",
    ],
)
def test_stage_importing_a_module_gets_what_it_needs(module: str, tmp_path: Path) -> None:
    main = f"import {module}\nprint('{MARKER}', {module}.__name__)\n"
    package_dir = write_stage(tmp_path / "src", main)
    plan, stage = pack(HOST_PYTHON, "kstage.main", package_dir, tmp_path / "cache")
    root = tmp_path / "root"
    root.mkdir()
    materialize(plan, root)
    run = run_in_chroot(root, list(stage.command), stage.env())
    assert run.status == 0, run.err
    assert f"{MARKER} {module}" in run.out


def test_subprocess_is_packed_only_when_the_stage_imports_it(tmp_path: Path) -> None:
    plain = write_stage(tmp_path / "a", "import os\nimport hashlib\n")
    _, stage = pack(HOST_PYTHON, "kstage.main", plain, tmp_path / "cache")
    assert "subprocess" not in stage.modules  # os.popen's lazy import is not followed
    assert "_hashlib" not in stage.modules
    assert {"_sha256", "_md5"} & set(stage.modules) or "_sha256" in sys.builtin_module_names

    runs = write_stage(tmp_path / "b", "import subprocess\n")
    _, stage = pack(sys.executable, "kstage.main", runs, tmp_path / "cache")
    # A venv's python is a link: the real interpreter and its own prefix are packed.
    assert stage.interpreter == HOST_PYTHON
    assert stage.home.split(":")[0] == sys.base_prefix
    # What subprocess imports at module level comes along; what it never imports does not.
    assert {"subprocess", "selectors", "threading", "signal"} <= set(stage.modules)
    assert "asyncio" not in stage.modules


# --- reproducible output and the cache -----------------------------------------------------


@pytest.fixture
def finder_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The entries the module finder really ran for, in order (not those the cache answered)."""
    runs: list[str] = []
    real_run_finder = pystage.run_finder

    def counting(interpreter: str, entry: str, *args: Any) -> dict[str, Any]:
        runs.append(entry)
        return real_run_finder(interpreter, entry, *args)

    monkeypatch.setattr(pystage, "run_finder", counting)
    return runs


def test_same_inputs_same_bytes_and_second_run_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package_dir = write_stage(tmp_path / "src")
    started = time.monotonic()
    first, _ = pack(HOST_PYTHON, "kstage.main", package_dir, tmp_path / "cache-a")
    cold = time.monotonic() - started
    second, _ = pack(HOST_PYTHON, "kstage.main", package_dir, tmp_path / "cache-b")

    def no_finder(*args: object) -> dict[str, object]:
        raise AssertionError("the module finder ran although nothing changed")

    monkeypatch.setattr(pystage, "run_finder", no_finder)
    started = time.monotonic()
    cached, _ = pack(HOST_PYTHON, "kstage.main", package_dir, tmp_path / "cache-a")
    warm = time.monotonic() - started
    print(f"\ncold pack {cold:.2f}s, cached pack {warm:.3f}s")
    assert snapshot(first) == snapshot(second) == snapshot(cached)
    assert warm < cold


def test_changed_stage_source_reruns_the_finder(tmp_path: Path) -> None:
    package_dir = write_stage(tmp_path / "src")
    _, before = pack(HOST_PYTHON, "kstage.main", package_dir, tmp_path / "cache")
    assert "base64" not in before.modules
    main = package_dir / "kstage" / "main.py"
    main.write_text("import base64\n" + main.read_text())
    _, after = pack(HOST_PYTHON, "kstage.main", package_dir, tmp_path / "cache")
    assert "base64" in after.modules


def test_capture_stage_cache_follows_its_sources_not_the_harness(
    tmp_path: Path, finder_runs: list[str]
) -> None:
    """Packed from a copy of the package as the build packs it: the stage's own files are in
    the cache key, the QEMU harness beside them is not."""
    package_dir = tmp_path / "package"
    shutil.copytree(PACKAGE_DIR, package_dir, ignore=shutil.ignore_patterns("__pycache__"))
    harness_file = package_dir / HARNESS_DIR.relative_to(PACKAGE_DIR) / "run.py"
    stage_file = package_dir / "capture" / "stage.py"
    first, _ = pack(HOST_PYTHON, "capture.stage", package_dir, tmp_path / "cache")
    assert finder_runs == ["capture.stage"]
    harness_file.write_text(harness_file.read_text() + "\n# edited\n")
    after_harness, _ = pack(HOST_PYTHON, "capture.stage", package_dir, tmp_path / "cache")
    assert finder_runs == ["capture.stage"]  # from the cache
    assert snapshot(after_harness) == snapshot(first)
    stage_file.write_text(stage_file.read_text() + "\n# edited\n")
    pack(HOST_PYTHON, "capture.stage", package_dir, tmp_path / "cache")
    assert finder_runs == ["capture.stage", "capture.stage"]


def test_changed_finder_reruns_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, finder_runs: list[str]
) -> None:
    """The finder's own bytes are in the cache key; a copy outside our package runs as well."""
    finder = tmp_path / "elsewhere" / "stagefinder.py"
    finder.parent.mkdir()
    shutil.copyfile(pystage._FINDER, finder)
    monkeypatch.setattr(pystage, "_FINDER", finder)
    package_dir = write_stage(tmp_path / "src")
    pack(HOST_PYTHON, "kstage.main", package_dir, tmp_path / "cache")
    pack(HOST_PYTHON, "kstage.main", package_dir, tmp_path / "cache")
    assert finder_runs == ["kstage.main"]
    finder.write_text(finder.read_text() + "\n# edited\n")
    pack(HOST_PYTHON, "kstage.main", package_dir, tmp_path / "cache")
    assert finder_runs == ["kstage.main", "kstage.main"]


def test_zip_is_deflated_because_memory_holds_it_unpacked(tmp_path: Path) -> None:
    package_dir = write_stage(tmp_path / "src")
    plan, stage = pack(HOST_PYTHON, "kstage.main", package_dir, tmp_path / "cache")
    deflated = zip_of(plan, stage)
    archive = zipfile.ZipFile(io.BytesIO(deflated))
    assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    # zipimport needs zlib: built in, or packed from lib-dynload.
    assert "zlib" in stage.modules or "zlib" in sys.builtin_module_names
    stored = build_zip([(i.filename, archive.read(i)) for i in archive.infolist()], deflate=False)
    zstd = zstandard.ZstdCompressor(level=12)
    stored_z, deflated_z = len(zstd.compress(stored)), len(zstd.compress(deflated))
    print(
        f"\nstored zip {len(stored)} -> zstd {stored_z}; deflated zip {len(deflated)}"
        f" -> zstd {deflated_z}"
    )
    # Stored would compress better inside the zstd image, but the capture kernel holds the
    # compressed image and the unpacked files at once, and keeps the unpacked ones.
    assert stored_z < deflated_z
    assert deflated_z + len(deflated) < stored_z + len(stored)
    assert build_zip([("b.pyc", b"2"), ("a.pyc", b"1")]) == build_zip(
        [("a.pyc", b"1"), ("b.pyc", b"2")]
    )


# --- errors users see ------------------------------------------------------------------------


@pytest.mark.parametrize("interpreter", ["/nonexistent/bin/python3.11", "kdump-no-such-python"])
def test_missing_interpreter_is_named(interpreter: str, tmp_path: Path) -> None:
    package_dir = write_stage(tmp_path / "src")
    with pytest.raises(KdumpError, match=re.escape(interpreter)):
        pack(interpreter, "kstage.main", package_dir, tmp_path / "cache")


def test_interpreter_that_is_not_python_is_named(tmp_path: Path) -> None:
    package_dir = write_stage(tmp_path / "src")
    true = os.path.realpath(shutil.which("true") or "/bin/true")
    with pytest.raises(KdumpError, match=rf"{re.escape(true)} .*Python 3\.8 or newer"):
        pack(true, "kstage.main", package_dir, tmp_path / "cache")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("kstage.nope", "entry module kstage.nope not found"),
        ("nosuchpkg.main", "no package or module 'nosuchpkg'"),
        ("kstage..main", "not a module name"),
    ],
)
def test_missing_entry_module_is_named(entry: str, message: str, tmp_path: Path) -> None:
    package_dir = write_stage(tmp_path / "src")
    with pytest.raises(KdumpError, match=re.escape(message)):
        pack(HOST_PYTHON, entry, package_dir, tmp_path / "cache")


def test_stage_importing_a_missing_module_is_named(tmp_path: Path) -> None:
    package_dir = write_stage(tmp_path / "src", "import kdump_no_such_module\n")
    with pytest.raises(KdumpError, match=r"kdump_no_such_module \(imported by kstage\.main\)"):
        pack(HOST_PYTHON, "kstage.main", package_dir, tmp_path / "cache")


def test_finder_sees_neither_its_own_directory_nor_the_callers_pythonpath(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run by path, the finder's directory (our package) would lead its sys.path, and the
    builder's environment may carry a PYTHONPATH: neither is the stage interpreter's."""
    finder = pystage._FINDER
    beside = min(p.stem for p in finder.parent.glob("[a-z]*.py") if p != finder)
    elsewhere = tmp_path / "pythonpath"
    elsewhere.mkdir()
    (elsewhere / "kdump_on_pythonpath.py").write_text("X = 1\n")
    monkeypatch.setenv("PYTHONPATH", str(elsewhere))
    for module in (beside, "kdump_on_pythonpath"):
        package_dir = write_stage(tmp_path / module, f"import {module}\n")
        with pytest.raises(KdumpError, match=rf"{module} \(imported by kstage\.main\)"):
            pack(HOST_PYTHON, "kstage.main", package_dir, tmp_path / "cache")


def test_stage_importing_outside_the_standard_library_is_refused(tmp_path: Path) -> None:
    package_dir = write_stage(tmp_path / "src", "import helper\n")
    (package_dir / "helper.py").write_text("X = 1\n")
    with pytest.raises(KdumpError, match=r"helper .*standard library only"):
        pack(HOST_PYTHON, "kstage.main", package_dir, tmp_path / "cache")
