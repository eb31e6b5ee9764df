"""The Python stage's module finder: run as a script by the interpreter the image will hold,
it finds the standard-library modules the stage imports and answers with their bytecode.

pystage runs it as `INTERPRETER -S -s -X no_debug_ranges stagefinder.py`, so another Python
than the builder's is analysed against its own standard library and compiles its own
bytecode. That interpreter may be any Python from 3.8 and runs this file outside our package:
it imports the standard library only, keeps to syntax 3.8 reads, and its annotations stay
strings (`from __future__ import annotations`). The request is one JSON object on stdin
(entry, package_dir, exclude, extra); the answer is one stdout line, ANSWER and JSON, holding
either the modules found or {"error": message}.

For an image of another root tree (a sysroot, maybe of another architecture) the request also
names the root ("root") and the argv prefix that runs this interpreter ("runner": QEMU's
user-mode emulator for a foreign machine). The interpreter then sits at ROOT/usr/bin/...,
so its prefix and standard library are under ROOT; every path in the answer, and the file
names compiled into the bytecode, are given as the image will have them, without ROOT.
"""

from __future__ import annotations

import _imp
import ast
import base64
import contextlib
import json
import marshal
import modulefinder
import os
import subprocess
import sys
from importlib.util import MAGIC_NUMBER
from types import CodeType
from typing import IO, Any

ANSWER = "KDUMP-PYSTAGE-ANSWER "
PY_SOURCE = getattr(modulefinder, "_PY_SOURCE", 1)
# importlib puts the frozen _frozen_importlib(_external) under these names; never read.
ALIASES = ("importlib._bootstrap", "importlib._bootstrap_external")
IMPORT_ERRORS = frozenset(["ImportError", "ModuleNotFoundError", "Exception", "BaseException"])
# try/except* (3.11) has the fields of try/except, which is all the scan reads.
TRY_STATEMENTS: tuple[type[ast.Try], ...] = (ast.Try, getattr(ast, "TryStar", ast.Try))


class Refused(Exception):
    """The stage cannot be packed with this interpreter; the message says why."""


def is_stage(name: str, top: str) -> bool:
    """Whether module `name` belongs to the stage's top-level package `top`."""
    return name == top or name.startswith(top + ".")


def exclusion(name: str, exclude: list[str]) -> str | None:
    """The exclude entry covering `name`, or None."""
    for entry_name in exclude:
        if name == entry_name or name.startswith(entry_name + "."):
            return entry_name
    return None


def is_main_block(node: ast.stmt) -> bool:
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


def catches_import_error(handler: ast.ExceptHandler) -> bool:
    """Whether the handler swallows an ImportError (bare, or naming it or a base of it)."""
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in IMPORT_ERRORS for t in types)


def absolute(module: str | None, level: int, name: str, is_package: bool) -> str:
    """The absolute name `from {"." * level}{module} import ...` means inside module `name`."""
    if not level:
        return module or ""
    parts = name.split(".")
    base = parts[: len(parts) - level + (1 if is_package else 0)]
    return ".".join(base + ([module] if module else []))


def required_imports(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """Every dotted prefix of the names imported whenever the module is imported: at module
    level (class bodies and if/for/with blocks too), outside functions, outside try blocks
    whose handlers swallow ImportError, and outside except handlers."""
    found: set[str] = set()

    def visit(statements: list[ast.stmt], optional: bool) -> None:
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.Import):
                if not optional:
                    found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if not optional:
                    base = absolute(node.module, node.level or 0, name, is_package)
                    found.add(base)
                    found.update(base + "." + alias.name for alias in node.names)
            elif isinstance(node, TRY_STATEMENTS):
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
                if sys.version_info >= (3, 10) and isinstance(node, ast.Match):
                    for case in node.cases:
                        visit(case.body, optional)

    visit(tree.body, False)
    prefixes: set[str] = set()
    for full in found:
        parts = full.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return prefixes


# modulefinder sets these on its Module records; typeshed declares none of them.
def module_name(module: modulefinder.Module) -> str:
    name: str = module.__name__  # type: ignore[attr-defined]
    return name


def module_file(module: modulefinder.Module) -> str | None:
    path: str | None = module.__file__  # type: ignore[attr-defined]
    return path


def module_path(module: modulefinder.Module) -> list[str] | None:
    """The package's search path; None for a module that is not a package."""
    path: list[str] | None = module.__path__  # type: ignore[attr-defined]
    return path


class Finder(modulefinder.ModuleFinder):
    """modulefinder, refusing excluded modules where only a lazy or optional import reaches
    them, and skipping the `__main__` blocks of imported modules."""

    def __init__(self, path: list[str], entry: str, exclude: list[str]) -> None:
        modulefinder.ModuleFinder.__init__(self, path=path)
        self.entry = entry
        self.top = entry.partition(".")[0]
        self.exclude = exclude
        self.scanning: list[str] = []
        self.required: dict[str, set[str]] = {}
        self.importer: str | None = None
        self.importers: dict[str, str | None] = {}
        self.refused: set[str] = set()

    def scan_code(self, co: CodeType, m: modulefinder.Module) -> None:
        self.scanning.append(module_name(m))
        try:
            modulefinder.ModuleFinder.scan_code(self, co, m)
        finally:
            self.scanning.pop()

    def _safe_import_hook(
        self,
        name: str,
        caller: modulefinder.Module | None,
        fromlist: list[str] | None,
        level: int = -1,
    ) -> None:
        saved = self.importer
        self.importer = self.scanning[-1] if self.scanning else None
        try:
            # A name refused for one importer may be required by the next: retry it.
            for refused in self.refused:
                self.badmodules.pop(refused, None)
            # Undocumented, and so missing from typeshed's modulefinder.
            modulefinder.ModuleFinder._safe_import_hook(  # type: ignore[attr-defined]
                self, name, caller, fromlist, level
            )
        finally:
            self.importer = saved

    def find_module(
        self, name: str, path: str | None, parent: modulefinder.Module | None = None
    ) -> tuple[IO[Any] | None, str | None, tuple[str, str, int]]:
        fullname = module_name(parent) + "." + name if parent is not None else name
        if fullname in ALIASES:
            raise ImportError("aliased by importlib: " + fullname)
        entry_name = exclusion(fullname, self.exclude)
        importer = self.importer
        if entry_name is not None and importer is not None and not is_stage(importer, self.top):
            frozen = _imp.is_frozen(fullname)  # needs no file; only its lazy imports would count
            if frozen or (
                exclusion(importer, self.exclude) != entry_name
                and fullname not in self.required.get(importer, ())
            ):
                self.refused.add(fullname)
                raise ImportError("excluded: " + fullname)
        return modulefinder.ModuleFinder.find_module(self, name, path, parent)

    def add_module(self, fqname: str) -> modulefinder.Module:
        if fqname not in self.modules:
            self.importers[fqname] = self.importer
        return modulefinder.ModuleFinder.add_module(self, fqname)

    def load_module(
        self, fqname: str, fp: IO[str], pathname: str, file_info: tuple[str, str, str]
    ) -> modulefinder.Module:
        if file_info[2] != PY_SOURCE or fqname == self.entry:
            return modulefinder.ModuleFinder.load_module(self, fqname, fp, pathname, file_info)
        tree = ast.parse(fp.read(), pathname)
        tree.body = [node for node in tree.body if not is_main_block(node)]
        is_package = os.path.basename(pathname).startswith("__init__.")
        self.required[fqname] = required_imports(tree, fqname, is_package)
        code = compile(tree, pathname, "exec", dont_inherit=True)
        module = self.add_module(fqname)
        module.__file__ = pathname  # type: ignore[attr-defined]
        module.__code__ = code  # type: ignore[attr-defined]
        self.scan_code(code, module)
        return module


# The argv prefix that runs a program of the interpreter's machine (empty: run it directly),
# and the root tree the interpreter lives in ("" for the host's /); set from the request.
RUNNER: list[str] = []
ROOT = ""


def in_image(path: str) -> str:
    """`path` as the image will have it: without the root tree's prefix."""
    if not ROOT or not within(path, ROOT):
        return path
    relative = os.path.relpath(path, ROOT)
    return "/" if relative == "." else "/" + relative


def child(script: str, args: list[str] | None = None) -> list[str]:
    """The words `script` prints, run by this interpreter under the image's flags."""
    argv = RUNNER + [sys.executable, "-S", "-s", "-B", "-X", "utf8", "-c", script] + (args or [])
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


def within(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def definitely_missing(finder: modulefinder.ModuleFinder, name: str) -> bool:
    """Whether `name` is no module, nor an attribute of a module or package found."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        found = finder.modules.get(".".join(parts[:i]))
        if found is None:
            continue
        if module_path(found) is None or found.starimports:  # type: ignore[attr-defined]
            return False  # an attribute of a module, or of a package with star imports
        return parts[i] not in found.globalnames  # type: ignore[attr-defined]
    return True


def find(request: dict[str, Any]) -> dict[str, Any]:
    """The answer to `request`: what the stage imports, as bytecode and extension modules."""
    global ROOT
    entry: str = request["entry"]
    RUNNER[:] = request.get("runner", [])
    ROOT = os.path.realpath(request["root"]) if request.get("root") else ""
    top = entry.partition(".")[0]
    package_dir = os.path.realpath(request["package_dir"])
    default_path = [p for p in sys.path if p]
    zips = [p for p in default_path if p.endswith(".zip")]
    major, minor = sys.version_info[:2]
    own_zip = os.path.join(sys.prefix, "lib", f"kdump-python{major}{minor}.zip")
    zip_path = zips[0] if zips else own_zip
    dirs = [os.path.realpath(p) for p in default_path if os.path.isdir(p)]
    # What starts before any code runs, under the image's -S -s and UTF-8 settings.
    startup = child(
        "import sys, _imp\nprint(' '.join(n for n in sys.modules if n != '__main__'"
        " and not _imp.is_builtin(n) and not _imp.is_frozen(n)))"
    )
    finder = Finder([package_dir, *default_path], entry, request["exclude"])
    try:
        finder.import_hook(entry)
    except ImportError:
        raise Refused(f"entry module {entry} not found in {package_dir}") from None
    entry_file = module_file(finder.modules[entry])
    if not entry_file or not within(os.path.realpath(entry_file), package_dir):
        raise Refused(f"entry module {entry} is not in {package_dir} (found {entry_file})")
    # zipimport reads deflated members with zlib, if the interpreter has it.
    try:
        import zlib  # noqa: F401

        roots = ["zlib"]
    except ImportError:
        roots = []
    # runpy runs -m; frozen since 3.11 but its imports (importlib, types, ...) are not.
    for root in roots + ["runpy"] + startup + request["extra"]:
        with contextlib.suppress(ImportError):  # a codec this interpreter lacks
            finder.import_hook(root)
    if "sysconfig" in finder.modules:
        # sysconfig imports its build-time data by a computed name.
        import sysconfig

        data_name = getattr(sysconfig, "_get_sysconfigdata_name", None)
        if data_name is not None:
            with contextlib.suppress(ImportError):
                finder.import_hook(data_name())
    probed: set[str] = set()
    while True:
        compiled = sorted(
            name
            for name, module in finder.modules.items()
            if name not in probed
            and module_path(module) is None
            and not (module_file(module) or "").endswith(".py")
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
        stage_callers = sorted(c for c in callers if is_stage(c, top))
        if stage_callers and definitely_missing(finder, name):
            problems.append(f"{name} (imported by {', '.join(stage_callers)})")
    if problems:
        raise Refused(
            "the stage imports modules this interpreter does not have: " + "; ".join(problems)
        )
    sources = []
    extensions = []
    for name in sorted(finder.modules):
        module = finder.modules[name]
        path = module_file(module)
        if not path or _imp.is_frozen(name):
            continue  # built in, or frozen into the interpreter
        real = os.path.realpath(path)
        stage = is_stage(name, top) and within(real, package_dir)
        if not stage and not any(within(real, d) for d in dirs):
            raise Refused(
                f"the stage imports {name} from {path}, which is neither the standard library"
                f" nor the stage package {top}: the capture stage may use the standard library"
                " only"
            )
        importer = finder.importers.get(name)
        if real.endswith(".py"):
            arc = name.replace(".", "/") + ("/__init__.py" if module_path(module) else ".py")
            with open(real, "rb") as handle:
                source = handle.read()
            # The whole source, __main__ block included, named as zipimport would name it.
            code = compile(source, in_image(zip_path) + "/" + arc, "exec", dont_inherit=True)
            pyc = MAGIC_NUMBER + bytes(12) + marshal.dumps(code)
            sources.append(
                {
                    "name": name,
                    "file": in_image(path),
                    "arc": arc + "c",
                    "stage": stage,
                    "importer": importer,
                    "pyc": base64.b64encode(pyc).decode(),
                }
            )
        elif stage:
            raise Refused(f"stage module {name} is {path}: the stage package must be pure Python")
        else:
            extensions.append({"name": name, "file": in_image(path), "importer": importer})
    return {
        "version": list(sys.version_info[:3]),
        "prefix": in_image(sys.prefix),
        "exec_prefix": in_image(sys.exec_prefix),
        "zip_path": in_image(zip_path),
        "pythonpath": zip_path not in default_path,
        "magic": MAGIC_NUMBER.hex(),
        "zlib": bool(roots),
        "startup": startup,
        "sources": sources,
        "extensions": extensions,
    }


def main() -> None:
    """Read the request from stdin and print the one answer line, whatever happens."""
    try:
        # Older interpreters run this file too: refuse them by name.
        if sys.version_info < (3, 8):  # noqa: UP036
            major, minor = sys.version_info[:2]
            raise Refused(
                f"it is Python {major}.{minor}; the capture stage needs Python 3.8 or newer"
            )
        reply = find(json.loads(sys.stdin.read()))
    except Refused as exc:
        reply = {"error": str(exc)}
    except BaseException as exc:
        reply = {"error": f"the module finder failed: {type(exc).__name__}: {exc}"}
    sys.stdout.write(ANSWER + json.dumps(reply) + "\n")


if __name__ == "__main__":
    # Run by path, Python puts this file's directory (our package) first on sys.path: none
    # of it is the standard library, so it must be neither searched nor taken for it.
    del sys.path[0]
    main()
