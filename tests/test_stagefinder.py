"""kdump_mkinitrd.image.stagefinder's rules, tested in-process on real source text: which
imports always run, which exclusions hold, and that the file stays runnable by an older
interpreter outside our package. tests/test_pystage.py runs it as pystage does."""

from __future__ import annotations

import ast
import sys
import sysconfig
from pathlib import Path

import pytest

from kdump_mkinitrd.image import stagefinder
from kdump_mkinitrd.image.stagefinder import (
    Finder,
    absolute,
    catches_import_error,
    definitely_missing,
    exclusion,
    is_main_block,
    is_stage,
    required_imports,
    within,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FINDER_SOURCE = Path(stagefinder.__file__).read_text()


def required(source: str, name: str = "mod", is_package: bool = False) -> set[str]:
    return required_imports(ast.parse(source), name, is_package)


def statement(source: str) -> ast.stmt:
    return ast.parse(source).body[0]


def handlers(source: str) -> list[ast.ExceptHandler]:
    node = statement(source)
    assert isinstance(node, ast.Try), source
    return node.handlers


# --- imports that run whenever a module is imported ----------------------------------------


def test_required_imports_are_those_that_always_run() -> None:
    source = """\
import a.b
from c import d
if X:
    import in_if
else:
    import in_else
for x in y:
    import in_for
with z:
    import in_with
class C:
    import in_class
try:
    import guarded
except ImportError:
    import fallback
try:
    import unguarded
except ValueError:
    import in_handler
else:
    import in_else_of_try
finally:
    import in_finally
try:
    import in_try_with_bare_except
except:
    pass
def f():
    import in_function
async def g():
    import in_coroutine
"""
    assert required(source) == {
        "a", "a.b", "c", "c.d", "in_if", "in_else", "in_for", "in_with", "in_class",
        "unguarded", "in_else_of_try", "in_finally",
    }  # fmt: skip


def test_optional_blocks_stay_optional_inside() -> None:
    source = """\
try:
    if X:
        import deep
    try:
        import inner
    finally:
        import inner_finally
except (OSError, ModuleNotFoundError):
    pass
finally:
    import outer_finally
"""
    assert required(source) == {"outer_finally"}


def test_match_cases_and_except_star_are_followed() -> None:
    source = """\
match x:
    case 1:
        import in_case
    case _:
        import in_default
try:
    import grouped
except* ImportError:
    pass
try:
    import other_group
except* ValueError:
    import in_group_handler
"""
    assert required(source) == {"in_case", "in_default", "other_group"}


def test_relative_imports_are_made_absolute() -> None:
    assert required("from . import a\nfrom .. import b\n", "pkg.sub", is_package=True) == {
        "pkg", "pkg.sub", "pkg.sub.a", "pkg.b",
    }  # fmt: skip
    assert required("from . import a\nfrom .m import b\n", "pkg.mod") == {
        "pkg", "pkg.a", "pkg.m", "pkg.m.b",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("module", "level", "name", "is_package", "expected"),
    [
        ("os.path", 0, "pkg.mod", False, "os.path"),
        (None, 1, "pkg.mod", False, "pkg"),
        ("sib", 1, "pkg.mod", False, "pkg.sib"),
        ("sub", 1, "pkg", True, "pkg.sub"),
        (None, 2, "a.b.c", False, "a"),
        ("x", 2, "a.b", True, "a.x"),
    ],
)
def test_absolute(
    module: str | None, level: int, name: str, is_package: bool, expected: str
) -> None:
    assert absolute(module, level, name, is_package) == expected


def test_standard_library_sources() -> None:
    """What the module docstring of pystage promises, on this interpreter's own sources."""
    os_required = required((STDLIB / "os.py").read_text(), "os")
    assert {"abc", "sys", "stat", "_collections_abc", "posixpath"} <= os_required
    assert "subprocess" not in os_required  # only os.popen() imports it
    shutil_required = required((STDLIB / "shutil.py").read_text(), "shutil")
    assert {"os", "sys", "fnmatch", "errno"} <= shutil_required
    assert not {"zlib", "bz2", "lzma"} & shutil_required  # optional, behind except ImportError
    subprocess_required = required((STDLIB / "subprocess.py").read_text(), "subprocess")
    assert {"selectors", "signal", "threading", "_posixsubprocess"} <= subprocess_required
    assert "msvcrt" not in subprocess_required


# --- the small predicates --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "catches"),
    [
        ("try: pass\nexcept ImportError: pass", True),
        ("try: pass\nexcept ModuleNotFoundError as exc: pass", True),
        ("try: pass\nexcept (OSError, ImportError): pass", True),
        ("try: pass\nexcept Exception: pass", True),
        ("try: pass\nexcept BaseException: pass", True),
        ("try: pass\nexcept: pass", True),
        ("try: pass\nexcept ValueError: pass", False),
        ("try: pass\nexcept (OSError, KeyError): pass", False),
        ("try: pass\nexcept errors.ImportError: pass", False),
    ],
)
def test_catches_import_error(source: str, catches: bool) -> None:
    assert catches_import_error(handlers(source)[0]) is catches


@pytest.mark.parametrize(
    ("source", "is_main"),
    [
        ("if __name__ == '__main__':\n    main()", True),
        ("if '__main__' == __name__:\n    main()", True),
        ("if __name__ != '__main__':\n    main()", False),
        ("if __name__ == '__main__' and X:\n    main()", False),
        ("if __name__ == '__main__' == X:\n    main()", False),
        ("if name == '__main__':\n    main()", False),
        ("if __name__ == 'other':\n    main()", False),
        ("while __name__ == '__main__':\n    main()", False),
        ("main()", False),
    ],
)
def test_is_main_block(source: str, is_main: bool) -> None:
    assert is_main_block(statement(source)) is is_main


def test_exclusion_covers_the_name_and_its_submodules_only() -> None:
    exclude = ["email", "urllib.request"]
    assert exclusion("email", exclude) == "email"
    assert exclusion("email.mime.text", exclude) == "email"
    assert exclusion("emailx", exclude) is None
    assert exclusion("urllib.request", exclude) == "urllib.request"
    assert exclusion("urllib.parse", exclude) is None
    assert exclusion("urllib", exclude) is None


def test_stage_and_directory_membership() -> None:
    assert is_stage("capture", "capture") and is_stage("capture.stage", "capture")
    assert not is_stage("captures", "capture") and not is_stage("os", "capture")
    assert within("/usr/lib/python3.11/os.py", "/usr/lib/python3.11")
    assert not within("/usr/lib/python3.11x/os.py", "/usr/lib/python3.11")


# --- the Finder on real files ----------------------------------------------------------------


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


LIBRARY = {
    "lib_a.py": (
        "import lib_b\n"
        "try:\n    import lib_d\nexcept ImportError:\n    lib_d = None\n"
        "def lazy():\n    import lib_c\n"
        "if __name__ == '__main__':\n    import lib_main\n"
    ),
    "lib_b.py": "B = 1\n",
    "lib_c.py": "C = 1\n",
    "lib_d.py": "D = 1\n",
    "lib_main.py": "M = 1\n",
    "lib_pkg/__init__.py": "X = 1\n",
}


def finder_for(tmp_path: Path, stage_main: str, exclude: list[str]) -> Finder:
    stage = write(tmp_path / "stage", {"kst/__init__.py": "", "kst/main.py": stage_main})
    library = write(tmp_path / "lib", LIBRARY)
    finder = Finder([str(stage), str(library)], "kst.main", exclude)
    finder.import_hook("kst.main")
    return finder


def test_exclusion_drops_lazy_and_optional_imports_only(tmp_path: Path) -> None:
    exclude = ["lib_b", "lib_c", "lib_d", "lib_main"]
    finder = finder_for(tmp_path, "import lib_a\n", exclude)
    # lib_b is imported at module level: it runs, so it is followed although excluded.
    assert {"kst", "kst.main", "lib_a", "lib_b"} <= set(finder.modules)
    assert not {"lib_c", "lib_d", "lib_main"} & set(finder.modules)
    assert finder.importers["lib_b"] == "lib_a"
    # Nothing excluded, the same library reaches everything but the __main__ block.
    finder = finder_for(tmp_path / "all", "import lib_a\n", [])
    assert {"lib_b", "lib_c", "lib_d"} <= set(finder.modules)
    assert "lib_main" not in finder.modules


def test_what_the_stage_imports_itself_is_never_excluded(tmp_path: Path) -> None:
    finder = finder_for(tmp_path, "import lib_a\nimport lib_c\n", ["lib_c", "lib_d"])
    assert "lib_c" in finder.modules
    assert "lib_d" not in finder.modules


def test_definitely_missing(tmp_path: Path) -> None:
    finder = finder_for(
        tmp_path, "import lib_nope\nimport lib_pkg.nope\nfrom lib_pkg import X\n", []
    )
    assert definitely_missing(finder, "lib_nope")
    assert definitely_missing(finder, "lib_pkg.nope")  # a package without such a name
    assert not definitely_missing(finder, "lib_pkg.X")  # a name the package defines
    assert definitely_missing(finder, "lib_b.anything")  # nothing of it found
    finder.import_hook("lib_b")
    assert not definitely_missing(finder, "lib_b.anything")  # an attribute of a module


# --- what lets another interpreter run it as a script ----------------------------------------


def test_syntax_that_python_3_8_reads() -> None:
    tree = ast.parse(FINDER_SOURCE, feature_version=(3, 8))
    # Annotations (list[str], X | None) stay strings, so Python 3.8 never evaluates them.
    first = tree.body[1]
    assert isinstance(first, ast.ImportFrom) and first.module == "__future__"
    assert [alias.name for alias in first.names] == ["annotations"]


def test_imports_only_the_standard_library() -> None:
    """It runs outside our package, by path: nothing of ours can be imported there."""
    for node in ast.walk(ast.parse(FINDER_SOURCE)):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, ast.unparse(node)
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            assert name.partition(".")[0] in sys.stdlib_module_names, ast.unparse(node)
