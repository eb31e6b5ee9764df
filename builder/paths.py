"""Where the package's own files are: its code, the feature modules and the templates.

A wheel carries `modules.d` and `templates` inside the package (as `modules_d` and
`templates`); a source checkout and `make install` keep them beside the package's folder.
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# The QEMU test harness: never part of an image's inputs, and not shipped by `make install`.
HARNESS_DIR = PACKAGE_DIR / "qemutest"


def _data_dir(installed: str, checkout: str) -> Path:
    inside = PACKAGE_DIR / installed
    return inside if inside.is_dir() else PACKAGE_DIR.parent / checkout


MODULES_DIR = _data_dir("modules_d", "modules.d")
TEMPLATES_DIR = _data_dir("templates", "templates")
