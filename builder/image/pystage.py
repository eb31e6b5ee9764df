"""Pack the Python capture stage: a build-host interpreter, the standard-library modules the
stage imports and nothing else, and the stage's own code.

Crash-kernel memory is scarce, so the module set is found, not guessed:

* The interpreter that will run in the image runs the finder itself (`_FINDER`, the stdlib
  `modulefinder` with refinements), so an interpreter of another version is analysed against
  its own standard library and compiles its own bytecode (its magic number by construction).
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
only PYTHONHOME is needed.

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
import os
import shutil
import subprocess
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan.elfdeps import ElfResolver
from kdump_mkinitrd.hostscan.kmod import default_cache_dir
from kdump_mkinitrd.image.plan import ImagePlan

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
_ANSWER = "KDUMP-PYSTAGE-ANSWER "
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
) -> PythonStage:
    """Add the interpreter, its libraries, the stage's modules and extension modules to
    `plan`; `package_dir` is the directory holding the stage's top-level package. The
    fault-test switches come along only with `test_switches`."""
    real = _real_interpreter(interpreter)
    _check_entry(entry)
    package_dir = package_dir.resolve()
    found = find_modules(real, entry, package_dir, exclude, cache_dir)
    zip_path = str(found["zip_path"])
    home = str(found["prefix"])
    if found["exec_prefix"] != found["prefix"]:
        home = f"{home}:{found['exec_prefix']}"
    sources: list[dict[str, Any]] = [
        s for s in found["sources"] if test_switches or s["name"] != TEST_SWITCHES_MODULE
    ]
    extensions: list[dict[str, Any]] = found["extensions"]

    members = [(str(s["arc"]), base64.b64decode(s["pyc"])) for s in sources]
    stdlib = sum(1 for s in sources if not s["stage"])
    plan.file(
        zip_path,
        feature,
        f"{stdlib} stdlib modules imported by {entry}, and the stage's own "
        f"{len(sources) - stdlib} modules",
        data=build_zip(members, deflate=bool(found["zlib"])),
    )

    whys = {real: f"interpreter for the capture stage {entry}"}
    for ext in extensions:
        whys[os.path.realpath(ext["file"])] = (
            f"extension module {ext['name']} imported by {ext['importer'] or entry}"
        )
    closure = resolver.resolve(
        [(real, f"the capture stage {entry}")]
        + [(str(ext["file"]), f"the capture stage {entry}") for ext in extensions]
    )
    for link in closure.symlinks:
        plan.symlink(link.path, link.target, feature, "symlink on the way to a Python stage file")
    for elf in closure.files:
        mode = elf.source.stat().st_mode & 0o7777
        plan.file(
            elf.path, feature, whys.get(elf.path, elf.why), source=elf.source, mode=mode, strip=True
        )

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
    )


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


def find_modules(
    interpreter: str,
    entry: str,
    package_dir: Path,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The finder's answer for `interpreter` (a real path), from the cache when nothing it
    depends on changed: the interpreter file, the stage's sources, `exclude`, this code."""
    excluded = sorted(set(exclude))
    key = _cache_key(interpreter, entry, package_dir, excluded)
    cache = (cache_dir or default_cache_dir()) / f"pystage-{key[:32]}.json"
    cached = _load_cache(cache, key)
    if cached is not None:
        return cached
    found = run_finder(interpreter, entry, package_dir, excluded)
    found["cache_key"] = key
    found["stdlib_stats"] = {
        str(item["file"]): _stat(str(item["file"]))
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
    interpreter: str, entry: str, package_dir: Path, exclude: Iterable[str]
) -> dict[str, Any]:
    """Run `_FINDER` with the interpreter itself: about half a second with DEFAULT_EXCLUDE,
    several seconds without, as modulefinder compiles every module it reaches."""
    request = {
        "entry": entry,
        "package_dir": str(package_dir),
        "exclude": sorted(set(exclude)),
        "extra": list(EXTRA_MODULES),
    }
    # A fixed hash seed and nothing from the caller's environment (PYTHONPATH, PYTHONHOME)
    # keep the analysis and the marshalled bytecode the same from build to build; no debug
    # ranges drops column tables that only caret tracebacks of source lines would use.
    argv = [interpreter, "-S", "-s", "-X", "no_debug_ranges", "-c", _FINDER]
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
    answer = next((line[len(_ANSWER) :] for line in lines if line.startswith(_ANSWER)), None)
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


def _real_interpreter(interpreter: str) -> str:
    """The real path of a program name or path; a venv's python is a link to the real one."""
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


def _stat(path: str) -> list[int]:
    info = os.stat(path)
    return [info.st_mtime_ns, info.st_size]


def _cache_key(interpreter: str, entry: str, package_dir: Path, exclude: list[str]) -> str:
    info = os.stat(interpreter)
    material = {
        "schema": _CACHE_SCHEMA,
        "finder": hashlib.sha256(_FINDER.encode()).hexdigest(),
        "extra": list(EXTRA_MODULES),
        "interpreter": interpreter,
        "interpreter_stat": [info.st_mtime_ns, info.st_size],
        "entry": entry,
        "package_dir": str(package_dir),
        "exclude": exclude,
        "sources": _stage_sources(package_dir, entry),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _load_cache(path: Path, key: str) -> dict[str, Any] | None:
    """The cached answer, if it is for `key` and no stdlib file it packs has changed."""
    try:
        found: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or found.get("cache_key") != key:
        return None
    stats: Mapping[str, list[int]] = found.get("stdlib_stats", {})
    try:
        if any(_stat(file) != stat for file, stat in stats.items()):
            return None
    except OSError:
        return None
    return found


# Runs in the stage's interpreter (any Python 3.8+: keep the syntax that old), reading the
# request as JSON on stdin and printing one answer line.
_FINDER = r'''
import ast
import base64
import json
import marshal
import modulefinder
import os
import subprocess
import sys

import _imp

ANSWER = "KDUMP-PYSTAGE-ANSWER "
PY_SOURCE = getattr(modulefinder, "_PY_SOURCE", 1)
# importlib puts the frozen _frozen_importlib(_external) under these names; never read.
ALIASES = ("importlib._bootstrap", "importlib._bootstrap_external")


def answer(obj):
    sys.stdout.write(ANSWER + json.dumps(obj) + "\n")
    sys.exit(0)


def fail(message):
    answer({"error": message})


if sys.version_info < (3, 8):
    fail("it is Python %d.%d; the capture stage needs Python 3.8 or newer"
         % sys.version_info[:2])

from importlib.util import MAGIC_NUMBER  # noqa: E402

request = json.loads(sys.stdin.read())
entry = request["entry"]
top = entry.partition(".")[0]
package_dir = os.path.realpath(request["package_dir"])
exclude = request["exclude"]


def is_stage(name):
    return name == top or name.startswith(top + ".")


def exclusion(name):
    """The exclude entry covering `name`, or None."""
    for entry_name in exclude:
        if name == entry_name or name.startswith(entry_name + "."):
            return entry_name
    return None


def is_main_block(node):
    """`if __name__ == "__main__":`, which does not run when the module is imported."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    if len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1


def catches_import_error(handler):
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    names = set(t.id for t in types if isinstance(t, ast.Name))
    return bool(names & set(["ImportError", "ModuleNotFoundError", "Exception", "BaseException"]))


def absolute(module, level, name, is_package):
    if not level:
        return module or ""
    parts = name.split(".")
    base = parts[: len(parts) - level + (1 if is_package else 0)]
    return ".".join(base + ([module] if module else []))


def required_imports(tree, name, is_package):
    """Every dotted prefix of the names imported whenever the module is imported: at module
    level (class bodies and if/for/with blocks too), outside functions, outside try blocks
    whose handlers swallow ImportError, and outside except handlers."""
    found = set()

    def visit(statements, optional):
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.Import):
                if not optional:
                    found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if not optional:
                    base = absolute(node.module, node.level, name, is_package)
                    found.add(base)
                    found.update(base + "." + alias.name for alias in node.names)
            elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
                guarded = optional or any(catches_import_error(h) for h in node.handlers)
                visit(node.body, guarded)
                visit(node.orelse, guarded)
                for handler in node.handlers:
                    visit(handler.body, True)
                visit(node.finalbody, optional)
            else:
                for field in ("body", "orelse"):
                    block = getattr(node, field, None)
                    if isinstance(block, list):
                        visit(block, optional)
                for case in getattr(node, "cases", None) or []:
                    visit(case.body, optional)

    visit(tree.body, False)
    prefixes = set()
    for full in found:
        parts = full.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return prefixes


class Finder(modulefinder.ModuleFinder):
    def __init__(self, path):
        modulefinder.ModuleFinder.__init__(self, path=path)
        self.scanning = []
        self.required = {}
        self.importer = None
        self.importers = {}
        self.refused = set()

    def scan_code(self, co, m):
        self.scanning.append(m.__name__)
        try:
            modulefinder.ModuleFinder.scan_code(self, co, m)
        finally:
            self.scanning.pop()

    def _safe_import_hook(self, name, caller, fromlist, level=-1):
        saved = self.importer
        self.importer = self.scanning[-1] if self.scanning else None
        try:
            # A name refused for one importer may be required by the next: retry it.
            for refused in self.refused:
                self.badmodules.pop(refused, None)
            modulefinder.ModuleFinder._safe_import_hook(self, name, caller, fromlist, level)
        finally:
            self.importer = saved

    def find_module(self, name, path, parent=None):
        fullname = parent.__name__ + "." + name if parent is not None else name
        if fullname in ALIASES:
            raise ImportError("aliased by importlib: " + fullname)
        entry_name = exclusion(fullname)
        importer = self.importer
        if entry_name is not None and importer is not None and not is_stage(importer):
            frozen = _imp.is_frozen(fullname)  # needs no file; only its lazy imports would count
            if frozen or (
                exclusion(importer) != entry_name
                and fullname not in self.required.get(importer, ())
            ):
                self.refused.add(fullname)
                raise ImportError("excluded: " + fullname)
        return modulefinder.ModuleFinder.find_module(self, name, path, parent)

    def add_module(self, fqname):
        if fqname not in self.modules:
            self.importers[fqname] = self.importer
        return modulefinder.ModuleFinder.add_module(self, fqname)

    def load_module(self, fqname, fp, pathname, file_info):
        if file_info[2] != PY_SOURCE or fqname == entry:
            return modulefinder.ModuleFinder.load_module(self, fqname, fp, pathname, file_info)
        tree = ast.parse(fp.read(), pathname)
        tree.body = [node for node in tree.body if not is_main_block(node)]
        is_package = os.path.basename(pathname).startswith("__init__.")
        self.required[fqname] = required_imports(tree, fqname, is_package)
        code = compile(tree, pathname, "exec", dont_inherit=True)
        module = self.add_module(fqname)
        module.__file__ = pathname
        module.__code__ = code
        self.scan_code(code, module)
        return module


def child(script, args=()):
    argv = [sys.executable, "-S", "-s", "-B", "-X", "utf8", "-c", script] + list(args)
    done = subprocess.run(argv, stdout=subprocess.PIPE, check=True, cwd="/")
    return done.stdout.decode().split()


LISTING = (
    "import sys, _imp\n"
    "before = set(sys.modules)\n"
    "for name in sys.argv[1:]:\n"
    "    try:\n"
    "        __import__(name)\n"
    "    except ImportError:\n"
    "        pass\n"
    "print(' '.join(sorted(n for n in set(sys.modules) - before if n != '__main__'\n"
    "    and n not in sys.argv[1:] and not _imp.is_builtin(n) and not _imp.is_frozen(n))))\n"
)


def within(path, directory):
    return os.path.commonpath([path, directory]) == directory


def definitely_missing(finder, name):
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        found = finder.modules.get(".".join(parts[:i]))
        if found is None:
            continue
        if found.__path__ is None or found.starimports:
            return False  # an attribute of a module, or of a package with star imports
        return parts[i] not in found.globalnames
    return True


def main():
    default_path = [p for p in sys.path if p]
    zips = [p for p in default_path if p.endswith(".zip")]
    zip_path = zips[0] if zips else os.path.join(
        sys.prefix, "lib", "kdump-python%d%d.zip" % sys.version_info[:2])
    dirs = [os.path.realpath(p) for p in default_path if os.path.isdir(p)]
    # What starts before any code runs, under the image's -S -s and UTF-8 settings.
    startup = child("import sys, _imp\nprint(' '.join(n for n in sys.modules if n != '__main__'"
                    " and not _imp.is_builtin(n) and not _imp.is_frozen(n)))")
    finder = Finder([package_dir] + default_path)
    try:
        finder.import_hook(entry)
    except ImportError:
        fail("entry module %s not found in %s" % (entry, package_dir))
    entry_file = finder.modules[entry].__file__
    if not entry_file or not within(os.path.realpath(entry_file), package_dir):
        fail("entry module %s is not in %s (found %s)" % (entry, package_dir, entry_file))
    # zipimport reads deflated members with zlib, if the interpreter has it.
    try:
        import zlib  # noqa: F401
        roots = ["zlib"]
    except ImportError:
        roots = []
    # runpy runs -m; frozen since 3.11 but its imports (importlib, types, ...) are not.
    for root in roots + ["runpy"] + startup + request["extra"]:
        try:
            finder.import_hook(root)
        except ImportError:
            pass  # a codec this interpreter lacks
    if "sysconfig" in finder.modules:
        # sysconfig imports its build-time data by a computed name.
        import sysconfig
        try:
            finder.import_hook(sysconfig._get_sysconfigdata_name())
        except (AttributeError, ImportError):
            pass
    probed = set()
    while True:
        compiled = sorted(
            name for name, module in finder.modules.items()
            if name not in probed and module.__path__ is None
            and not (module.__file__ or "").endswith(".py")
        )
        if not compiled:
            break
        probed.update(compiled)
        for name in child(LISTING, compiled):
            if name not in finder.modules:
                try:
                    finder.import_hook(name)
                except ImportError:
                    continue
                finder.importers[name] = "a module written in C"
    problems = []
    for name, callers in sorted(finder.badmodules.items()):
        stage_callers = sorted(c for c in callers if is_stage(c))
        if stage_callers and definitely_missing(finder, name):
            problems.append("%s (imported by %s)" % (name, ", ".join(stage_callers)))
    if problems:
        fail("the stage imports modules this interpreter does not have: " + "; ".join(problems))
    sources = []
    extensions = []
    for name in sorted(finder.modules):
        module = finder.modules[name]
        path = module.__file__
        if not path or _imp.is_frozen(name):
            continue  # built in, or frozen into the interpreter
        real = os.path.realpath(path)
        stage = is_stage(name) and within(real, package_dir)
        if not stage and not any(within(real, d) for d in dirs):
            fail("the stage imports %s from %s, which is neither the standard library nor the"
                 " stage package %s: the capture stage may use the standard library only"
                 % (name, path, top))
        importer = finder.importers.get(name)
        if real.endswith(".py"):
            arc = name.replace(".", "/") + ("/__init__.py" if module.__path__ else ".py")
            with open(real, "rb") as handle:
                source = handle.read()
            # The whole source, __main__ block included, named as zipimport would name it.
            code = compile(source, zip_path + "/" + arc, "exec", dont_inherit=True)
            pyc = MAGIC_NUMBER + bytes(12) + marshal.dumps(code)
            sources.append({"name": name, "file": path, "arc": arc + "c", "stage": stage,
                            "importer": importer, "pyc": base64.b64encode(pyc).decode()})
        elif stage:
            fail("stage module %s is %s: the stage package must be pure Python" % (name, path))
        else:
            extensions.append({"name": name, "file": path, "importer": importer})
    answer({
        "version": list(sys.version_info[:3]),
        "prefix": sys.prefix,
        "exec_prefix": sys.exec_prefix,
        "zip_path": zip_path,
        "pythonpath": zip_path not in default_path,
        "magic": MAGIC_NUMBER.hex(),
        "zlib": bool(roots),
        "startup": startup,
        "sources": sources,
        "extensions": extensions,
    })


try:
    main()
except SystemExit:
    raise
except BaseException as exc:
    fail("the module finder failed: %s: %s" % (type(exc).__name__, exc))
'''
