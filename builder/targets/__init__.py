"""Target types as plug-ins. Each type is one module here (disk, raw, nfs, ssh: its keys, their
checks, its name, what host-only detection and the image need for it) and one feature module
folder modules.d/TYPE (its shell template, kernel modules and programs). Importing this package
imports every module in it; the code outside asks the registry, never a type by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdump_mkinitrd.schema import Checker, Field
from kdump_mkinitrd.targets.base import NETWORK, REGISTERED, SHARED_SCHEMA, ImageFile, Target

if TYPE_CHECKING:
    from kdump_mkinitrd.config import Config

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

TYPES: dict[str, type[Target]] = dict(sorted(REGISTERED.items()))
_OWNER = {name: kind for kind in TYPES.values() for name in kind.schema}


def schema() -> dict[str, Field]:
    """Every key a target may have: `type`, the shared keys, and each type's own."""
    own = {name: spec for kind in TYPES.values() for name, spec in kind.schema.items()}
    return {"type": Field(str, required=True, choices=tuple(TYPES)), **SHARED_SCHEMA, **own}


def check(checker: Checker, key: str, values: dict[str, Any]) -> None:
    """A target's keys once each passed its Field: only keys its type takes may be given (a
    key is given when the file names it: defaults fill the others), then the type's rules."""
    kind = TYPES[values["type"]]
    for name in values:
        if f"{key}.{name}" not in checker.lines or name == "type":
            continue
        owner = _OWNER.get(name)
        if owner is not None and owner is not kind:
            raise checker.fail(f"{key}.{name}", f"only {owner.type} targets take this key")
        if name in SHARED_SCHEMA and name not in kind.takes:
            raise checker.fail(f"{key}.{name}", kind.refusal(name))
    kind.check(checker, key, values)


def make(values: dict[str, Any]) -> Target:
    return TYPES[values["type"]].make(values)


def network_types() -> tuple[str, ...]:
    return tuple(name for name, kind in TYPES.items() if NETWORK in kind.uses)


def image_files(config: Config, root: Path = Path("/")) -> tuple[ImageFile, ...]:
    """Every file the targets make for the image, in config order."""
    return tuple(f for i, t in enumerate(config.targets) for f in t.image_files(config, i, root))


__all__ = ["TYPES", "ImageFile", "Target", "check", "image_files", "make", "schema"]
