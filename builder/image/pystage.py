"""Pack the Python capture stage: an interpreter (the build host's, or a sysroot's for another
root or machine), the standard-library modules the stage imports and nothing else, and the
stage's own code.

Crash-kernel memory is scarce, so the module set is found, not guessed:

* The interpreter that will run in the image runs the finder itself (`stagefinder`, the
  stdlib `modulefinder` with refinements), so an interpreter of another version is analysed
  against its own standard library and compiles its own bytecode (its magic number by
  construction).
* `modulefinder` follows every import it sees, including those in functions that never run
  and in `except ImportError:` fallbacks. `exclude` names modules not to follow there, but an
  import is always followed when it is certain to run (module level, outside try blocks that
  swallow ImportError and outside except handlers), when the stage's own code asks for it,
  or when it stays inside an excluded package the stage asked for. So an exclusion drops
  only what stdlib code imports lazily (in a function) or optionally; what is excluded must
  be something a capture stage never calls into (os.popen needs subprocess: a stage that
  runs programs imports subprocess itself, and then gets it).
* `if __name__ == "__main__":` blocks of modules that are only imported are not followed.
* What the interpreter loads before running anything (encodings and the codec it needs) is
  measured by starting it; modules written in C that import Python modules from their init
  (_decimal imports numbers, _pickle imports copyreg) are imported in a child to see what
  they pull in. Frozen modules (3.11: os, codecs, io, abc, stat, posixpath, runpy, ...) are
  part of the interpreter and never packed.

In the image the interpreter and its extension modules keep their host paths (RUNPATH and
$ORIGIN keep working, lib-dynload stays on the default sys.path); pure-Python modules go
into one zip at the interpreter's own default zip entry, `{prefix}/lib/python3XY.zip`, so
only PYTHONHOME is needed. All of it is packed into one squashfs that the init mounts when
the stage runs and links at those paths (`stagepack`, for the capture kernel's memory);
`packing="plain"` puts the files in the image itself.

The zip is ZIP_DEFLATED when the interpreter has zlib (zipimport needs it to read deflated
members). Stored members would make the zstd-compressed image about 50 kB smaller, but the
unpacked image is what stays in crash-kernel memory, and the capture kernel briefly holds
both: with Debian's python3.11 and the real stage, deflating makes the zip 258 kB instead of
785 kB and lowers compressed + unpacked by about 470 kB, for about 0.1 MB more peak RSS.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import shutil
import subprocess
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan.elfdeps import ElfResolver
from kdump_mkinitrd.hostscan.kmod import default_cache_dir
from kdump_mkinitrd.image import stagefinder, stagepack
from kdump_mkinitrd.image.elfstrip import loadable_only
from kdump_mkinitrd.image.plan import ImagePlan
from kdump_mkinitrd.image.targetarch import Target, host_arch

log = logging.getLogger(__name__)

# Module names (with their submodules) not followed when standard-library code imports them
# lazily or optionally; see the module docstring for what is always followed anyway.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    # OpenSSL: without _hashlib, hashlib uses its built-in _md5/_sha1/_sha256/_sha512/_blake2/
    # _sha3; libssl and libcrypto would add megabytes.
    "_hashlib",
    "ssl",
    # Compression behind optional imports of shutil, tarfile and zipfile (liblzma, libbz2).
    "bz2",
    "lzma",
    # Pure-Python fallbacks for C modules the interpreter has; other platforms' helpers.
    "_py_abc",
    "_pydecimal",
    "_pyio",
    "_aix_support",
    "_osx_support",
    "_bootsubprocess",
    "ntpath",
    "nturl2path",
    "encodings.mbcs",
    "encodings.oem",
    # Developer tools and introspection, reached through main()/_test() helpers, pretty
    # tracebacks (traceback -> ast) and docstring helpers (ast -> inspect -> dis -> argparse).
    "doctest",
    "unittest",
    "test",
    "pdb",
    "bdb",
    "pydoc",
    "pydoc_data",
    "code",
    "codeop",
    "cmd",
    "profile",
    "cProfile",
    "pstats",
    "trace",
    "tracemalloc",
    "timeit",
    "lib2to3",
    "distutils",
    "ensurepip",
    "venv",
    "idlelib",
    "py_compile",
    "compileall",
    "pickletools",
    "ast",
    "inspect",
    "dis",
    "argparse",
    # Terminals and GUIs: the stage has a console, not a user.
    "readline",
    "rlcompleter",
    "curses",
    "tkinter",
    "turtle",
    "turtledemo",
    "getpass",
    "webbrowser",
    # Network protocols, mail and markup.
    "http",
    "urllib.request",
    "urllib.response",
    "urllib.robotparser",
    "email",
    "mailbox",
    "mimetypes",
    "smtplib",
    "ftplib",
    "poplib",
    "imaplib",
    "nntplib",
    "telnetlib",
    "socketserver",
    "xmlrpc",
    "xml",
    "pyexpat",
    "plistlib",
    "html",
    "netrc",
    "cgi",
    "cgitb",
    "wsgiref",
    # Concurrency, and the process machinery os.popen() and platform import lazily (with
    # threading, selectors, signal and locale behind it): a stage that runs programs
    # imports subprocess itself and gets it.
    "asyncio",
    "concurrent",
    "multiprocessing",
    "subprocess",
    # Package metadata and resources, archives, databases, pickling, numerics.
    "importlib.metadata",
    "importlib.resources",
    "importlib.readers",
    "importlib.simple",
    "pkgutil",
    "zipfile",
    "tarfile",
    "sqlite3",
    "dbm",
    "shelve",
    "pickle",
    "decimal",
    "fractions",
    "statistics",
    # ctypes (libffi); logging (hashlib imports it only to report a missing hash);
    # traceback (imported lazily for coroutine warnings and a threading fallback: uncaught
    # exceptions are printed by the interpreter itself); unicodedata (re imports it for
    # \N{...} escapes; 1.2 MB in a debug-info build).
    "ctypes",
    "logging",
    "traceback",
    "unicodedata",
)

# Codecs are looked up by name at run time (open(path, encoding="ascii")), which no scanner
# sees; these two are a few kB each and what capture code decodes kernel text with.
EXTRA_MODULES: tuple[str, ...] = ("encodings.ascii", "encodings.latin_1")

# The stage's fault-test switches (fail, kill, OOM at will): packed only into images that
# qemu-test builds; the stage imports them optionally, so without them it runs as in production.
TEST_SWITCHES_MODULE = "capture.testswitches"

_CACHE_SCHEMA = 2
# Run as a script by the stage's interpreter; imported here only for its path and protocol.
_FINDER = Path(stagefinder.__file__)
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_FINDER_TIMEOUT = 600


@dataclass(frozen=True)
class PythonStage:
    """What the init needs to run the stage; every path is an image path."""

    interpreter: str  # the interpreter's real path on the host, and in the image
    home: str  # PYTHONHOME: its sys.prefix (":exec_prefix" appended if that differs)
    zip_path: str  # the zip of stdlib modules and stage code
    modules: tuple[str, ...]  # module names packed, zipped and extension modules (sorted)
    extensions: tuple[str, ...]  # image paths of the extension modules packed (sorted)
    command: tuple[str, ...]  # argv running the entry module; env() must be set
    pythonpath: str = ""  # set when zip_path is not on the interpreter's default sys.path
    squashfs: str = ""  # the image path of the squashfs holding all of the above, if packed so
    mount_point: str = stagepack.MOUNT_POINT

    def env(self) -> dict[str, str]:
        """The complete environment the init must give the interpreter."""
        env = {
            "PYTHONHOME": self.home,
            "PYTHONDONTWRITEBYTECODE": "1",
            # The capture kernel's locale is C: make stdio and file names UTF-8 regardless.
            "PYTHONUTF8": "1",
            # Lines reach the console and log before a reboot can lose a buffer.
            "PYTHONUNBUFFERED": "1",
        }
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        return env


def add_python_stage(
    plan: ImagePlan,
    interpreter: str,
    entry: str,
    package_dir: Path,
    feature: str,
    resolver: ElfResolver,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    cache_dir: Path | None = None,
    test_switches: bool = False,
    packing: str = "auto",
    target: Target | None = None,
) -> PythonStage:
    """Add the interpreter, its libraries, the stage's modules and extension modules to
    `plan`; `package_dir` is the directory holding the stage's top-level package. The
    fault-test switches come along only with `test_switches`. `packing`: "squashfs" (one
    compressed member the init mounts, see stagepack), "plain" (every file in the image),
    "auto" (squashfs when mksquashfs is installed). `target`: the machine and root tree the
    interpreter and its libraries come from (default: this host's /); its interpreter runs
    the finder, under QEMU's user-mode emulation for a foreign machine."""
    target = target or Target(host_arch(), resolver.root)
    real = _real_interpreter(interpreter, resolver)
    _check_entry(entry)
    package_dir = package_dir.resolve()
    found = find_modules(real, entry, package_dir, exclude, cache_dir, target)
    zip_path = str(found["zip_path"])
    home = str(found["prefix"])
    if found["exec_prefix"] != found["prefix"]:
        home = f"{home}:{found['exec_prefix']}"
    sources: list[dict[str, Any]] = [
        s for s in found["sources"] if test_switches or s["name"] != TEST_SWITCHES_MODULE
    ]
    extensions: list[dict[str, Any]] = found["extensions"]

    if packing == "auto":
        packing = "squashfs" if stagepack.mksquashfs() else "plain"
        if packing == "plain":
            log.warning("no mksquashfs (squashfs-tools): the Python stage is packed file by "
                        "file, which costs the capture kernel more memory")  # fmt: skip
    members = [(str(s["arc"]), base64.b64decode(s["pyc"])) for s in sources]
    stdlib = sum(1 for s in sources if not s["stage"])
    # Inside the squashfs the zip is stored: xz packs raw bytecode tighter than deflate's
    # output, the build skips deflate, and an import reads the page without inflating it.
    zip_data = build_zip(members, deflate=bool(found["zlib"]) and packing == "plain")
    zip_why = (
        f"{stdlib} stdlib modules imported by {entry}, and the stage's own "
        f"{len(sources) - stdlib} modules"
    )

    whys = {real: f"interpreter for the capture stage {entry}"}
    for ext in extensions:
        whys[resolver.real_path(str(ext["file"]))] = (
            f"extension module {ext['name']} imported by {ext['importer'] or entry}"
        )
    closure = resolver.resolve(
        [(real, f"the capture stage {entry}")]
        + [(str(ext["file"]), f"the capture stage {entry}") for ext in extensions]
    )
    squashfs = ""
    if packing == "squashfs":
        # What the image holds already (libc, which makedumpfile needs too) stays out.
        held = _held(plan)
        packed = [stagepack.Member(zip_path, zip_data)]
        packed += [
            stagepack.Member(link.path, link.target.encode(), symlink=True)
            for link in closure.symlinks
            if not held(link.path)
        ]
        packed += [_elf_member(elf.path, elf.source) for elf in closure.files if not held(elf.path)]
        squashfs = stagepack.IMAGE_PATH
        plan.file(
            squashfs,
            feature,
            f"the Python stage, mounted at {stagepack.MOUNT_POINT} when it runs: the "
            f"interpreter, {len(packed) - 1} other files and links, and the zip of {zip_why}",
            data=stagepack.squash(packed, cache_dir or default_cache_dir(), target.arch.bcj),
            # Every packed program and library is an input: a changed libpython or
            # extension module makes `build --if-needed` rebuild, as in the plain packing.
            origins=(
                _host(target, real),
                *(elf.source for elf in closure.files if not held(elf.path)),
            ),
        )
    elif packing == "plain":
        plan.file(zip_path, feature, zip_why, data=zip_data)
        for link in closure.symlinks:
            plan.symlink(
                link.path, link.target, feature, "symlink on the way to a Python stage file"
            )
        for elf in closure.files:
            mode = elf.source.stat().st_mode & 0o7777
            plan.file(
                elf.path, feature, whys.get(elf.path, elf.why), source=elf.source, mode=mode,
                strip=True,
            )  # fmt: skip
    else:
        raise KdumpError(f"unknown Python stage packing {packing!r}")

    command = [real, "-S", "-s", "-B"]
    if tuple(found["version"]) >= (3, 11):
        # -P: the current directory (a dump directory) is no place to import from. Frozen
        # os, codecs, io, ... are not in the zip: never let a dev-build check unfreeze them.
        command += ["-P", "-X", "frozen_modules=on"]
    return PythonStage(
        interpreter=real,
        home=home,
        zip_path=zip_path,
        modules=tuple(sorted({str(s["name"]) for s in sources + extensions})),
        extensions=tuple(sorted(str(ext["file"]) for ext in extensions)),
        command=(*command, "-m", entry),
        pythonpath=zip_path if found["pythonpath"] else "",
        squashfs=squashfs,
    )


def _elf_member(path: str, source: Path) -> stagepack.Member:
    try:
        return stagepack.Member(
            path, loadable_only(source.read_bytes()), source.stat().st_mode & 0o7777
        )
    except OSError as exc:
        raise KdumpError(f"cannot read {source} for the Python stage: {exc.strerror}") from None


def _held(plan: ImagePlan) -> Callable[[str], bool]:
    """Whether the plan holds a path, also through its directory links (/lib -> usr/lib)."""
    items = {item.path: item for item in plan.items()}

    def resolve(path: str, depth: int = 0) -> str:
        parts = [p for p in path.split("/") if p]
        current = "/"
        for i, part in enumerate(parts):
            current = posixpath.join(current, part)
            item = items.get(current)
            if item is not None and item.kind == "symlink" and depth < 40:
                target = posixpath.join(posixpath.dirname(current), item.data.decode())
                return resolve(posixpath.join(target, *parts[i + 1 :]), depth + 1)
        return posixpath.normpath(current)

    def held(path: str) -> bool:
        return resolve(path) in items

    return held


def build_zip(members: Iterable[tuple[str, bytes]], deflate: bool = True) -> bytes:
    """A zip whose bytes depend only on the members: sorted, one date, fixed attributes."""
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in sorted(members):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            info.compress_type = method
            archive.writestr(info, data, compresslevel=9 if deflate else None)
    return out.getvalue()


def _host(target: Target, path: str) -> Path:
    return target.root / path.lstrip("/")


def find_modules(
    interpreter: str,
    entry: str,
    package_dir: Path,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    cache_dir: Path | None = None,
    target: Target | None = None,
) -> dict[str, Any]:
    """The finder's answer for `interpreter` (a real path in `target`'s root), from the cache
    when nothing it depends on changed: the interpreter file, the stage's sources, `exclude`,
    this code."""
    target = target or Target(host_arch())
    excluded = sorted(set(exclude))
    key = _cache_key(interpreter, entry, package_dir, excluded, target)
    cache = (cache_dir or default_cache_dir()) / f"pystage-{key[:32]}.json"
    cached = _load_cache(cache, key, target)
    if cached is not None:
        return cached
    found = run_finder(interpreter, entry, package_dir, excluded, target)
    found["cache_key"] = key
    found["stdlib_stats"] = {
        str(item["file"]): _stat(_host(target, str(item["file"])))
        for item in found["sources"] + found["extensions"]
        if not item.get("stage")
    }
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(found, sort_keys=True))
        os.replace(tmp, cache)
    except OSError:
        # An unwritable cache costs time on the next build, nothing else.
        with contextlib.suppress(OSError):
            tmp.unlink()
    return found


def run_finder(
    interpreter: str,
    entry: str,
    package_dir: Path,
    exclude: Iterable[str],
    target: Target | None = None,
) -> dict[str, Any]:
    """Run stagefinder with the interpreter itself: about half a second with DEFAULT_EXCLUDE,
    several seconds without, as modulefinder compiles every module it reaches (about ten
    times that under QEMU's user-mode emulation, for another machine's interpreter)."""
    target = target or Target(host_arch())
    program = target.command(interpreter)
    request: dict[str, Any] = {
        "entry": entry,
        "package_dir": str(package_dir),
        "exclude": sorted(set(exclude)),
        "extra": list(EXTRA_MODULES),
    }
    if target.root != Path("/"):
        request["root"] = str(target.root)
        request["runner"] = program[:-1]
    # A fixed hash seed and nothing from the caller's environment (PYTHONPATH, PYTHONHOME)
    # keep the analysis and the marshalled bytecode the same from build to build; no debug
    # ranges drops column tables that only caret tracebacks of source lines would use.
    argv = [*program, "-S", "-s", "-X", "no_debug_ranges", str(_FINDER)]
    try:
        done = subprocess.run(
            argv,
            input=json.dumps(request).encode(),
            capture_output=True,
            env={"PYTHONHASHSEED": "0", "PYTHONUTF8": "1"},
            cwd="/",
            timeout=_FINDER_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise KdumpError(f"cannot run the Python stage interpreter {interpreter}: {exc}") from None
    lines = done.stdout.decode(errors="replace").splitlines()
    mark = stagefinder.ANSWER
    answer = next((line[len(mark) :] for line in lines if line.startswith(mark)), None)
    if answer is None:
        said = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        raise KdumpError(
            f"{interpreter} cannot run the Python stage's module finder; it must be Python 3.8"
            f" or newer (exit status {done.returncode}: {said[-1] if said else 'no output'})"
        )
    found: dict[str, Any] = json.loads(answer)
    if "error" in found:
        raise KdumpError(f"Python stage with {interpreter}: {found['error']}")
    return found


def _real_interpreter(interpreter: str, resolver: ElfResolver) -> str:
    """The real path of a program name or path; a venv's python is a link to the real one.
    In another root tree, both the lookup and the links are followed inside that tree."""
    if resolver.root != Path("/"):
        real = resolver.real_path(interpreter)
        resolver.check_machine(real)
        if not os.access(resolver.root / real.lstrip("/"), os.X_OK):
            raise KdumpError(
                f"Python interpreter {real} for the capture stage is not executable "
                f"under root {resolver.root}"
            )
        return real
    path = interpreter if "/" in interpreter else shutil.which(interpreter)
    if path is None or not os.path.isfile(path):
        raise KdumpError(f"Python interpreter {interpreter!r} for the capture stage not found")
    real = os.path.realpath(path)
    if not os.access(real, os.X_OK):
        raise KdumpError(f"Python interpreter {real} for the capture stage is not executable")
    return real


def _check_entry(entry: str) -> None:
    if not entry or not all(part.isidentifier() for part in entry.split(".")):
        raise KdumpError(f"Python stage entry {entry!r} is not a module name")


def _stage_sources(package_dir: Path, entry: str) -> dict[str, str]:
    """sha256 of every source file of the stage's top-level package (or module)."""
    top = entry.partition(".")[0]
    package = package_dir / top
    if package.is_dir():
        files = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    elif (package_dir / f"{top}.py").is_file():
        files = [package_dir / f"{top}.py"]
    else:
        raise KdumpError(
            f"Python stage entry {entry}: no package or module {top!r} in {package_dir}"
        )
    return {
        str(p.relative_to(package_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


def _stat(path: str | Path) -> list[int]:
    info = os.stat(path)
    return [info.st_mtime_ns, info.st_size]


def _cache_key(
    interpreter: str, entry: str, package_dir: Path, exclude: list[str], target: Target
) -> str:
    info = os.stat(_host(target, interpreter))
    material = {
        "schema": _CACHE_SCHEMA,
        "root": str(target.root),
        "machine": target.arch.machine,
        "finder": hashlib.sha256(_FINDER.read_bytes()).hexdigest(),
        "extra": list(EXTRA_MODULES),
        "interpreter": interpreter,
        "interpreter_stat": [info.st_mtime_ns, info.st_size],
        "entry": entry,
        "package_dir": str(package_dir),
        "exclude": exclude,
        "sources": _stage_sources(package_dir, entry),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _load_cache(path: Path, key: str, target: Target) -> dict[str, Any] | None:
    """The cached answer, if it is for `key` and no stdlib file it packs has changed."""
    try:
        found: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or found.get("cache_key") != key:
        return None
    stats: Mapping[str, list[int]] = found.get("stdlib_stats", {})
    try:
        if any(_stat(_host(target, file)) != stat for file, stat in stats.items()):
            return None
    except OSError:
        return None
    return found
