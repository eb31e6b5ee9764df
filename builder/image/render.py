"""Rendering the init and its hooks: every value a template prints is shell-quoted.

Quoting is not left to template authors: Jinja's `finalize` quotes each `{{ expression }}`,
so a config value can never become code in the init. A template that really means to print
shell text (a number, a fixed word chosen by the builder) wraps it in `Shell`.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import jinja2

from kdump_mkinitrd.errors import KdumpError


class Shell(str):
    """Text the builder itself vouches for as shell syntax: printed as is."""


def _finalize(value: Any) -> str:
    if isinstance(value, Shell):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return shlex.quote(str(value))


def _words(values: Any) -> Shell:
    """A list rendered as separately quoted shell words."""
    return Shell(" ".join(shlex.quote(str(v)) for v in values))


def render(template: Path, context: dict[str, Any]) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(template.parent)]),
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["words"] = _words
    try:
        return env.get_template(template.name).render(context)
    except jinja2.TemplateError as exc:
        line = getattr(exc, "lineno", None)
        where = f"{template}:{line}" if line else str(template)
        raise KdumpError(f"{where}: template error: {exc}") from None
