"""The declarative schema the config is checked against: one `Field` per key, a YAML loader
that remembers each key's line, and the checker whose every error names file, line and key.

The config's sections and each target type (kdump_mkinitrd.targets) declare their keys with it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from kdump_mkinitrd.errors import KdumpError

_CONTROL = re.compile(r"[\x01-\x1f\x7f]")
_PARENT = re.compile(r"(\.[^.\[]*|\[\d+\])$")  # the last step of a dotted key


@dataclass(frozen=True)
class Field:
    """One key of the schema: its type, default and allowed values."""

    kind: type | tuple[type, ...]
    default: Any = None
    choices: tuple[Any, ...] = ()
    required: bool = False
    items: type | dict[str, Field] | None = None  # element type, or a schema for dict items
    schema: dict[str, Field] | None = None  # for nested mappings
    absolute_path: bool = False
    minimum: int | None = None
    maximum: int | None = None  # what the capture kernel's tools and busybox sh can take
    shorthand: str | None = None  # a bare string item stands for {shorthand: string}


class Located:
    """Turns a YAML node tree into plain values while remembering each key's line."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[str, int] = {}
        self._scalars = yaml.SafeLoader("")

    def value(self, node: yaml.Node, key: str) -> Any:
        self.lines.setdefault(key, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                name = self._scalars.construct_object(knode)
                if not isinstance(name, str):
                    raise KdumpError(
                        f"{self.source}:{knode.start_mark.line + 1}: key {name!r} must be a string"
                    )
                child = f"{key}.{name}" if key else name
                if name in out:
                    raise KdumpError(
                        f"{self.source}:{knode.start_mark.line + 1}: key '{child}' given twice"
                    )
                self.lines[child] = knode.start_mark.line + 1
                out[name] = self.value(vnode, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.value(item, f"{key}[{i}]") for i, item in enumerate(node.value)]
        return self._scalars.construct_object(node)


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        str: "a string",
        int: "an integer",
        list: "a list",
        dict: "a mapping",
        bool: "true/false",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


class Checker:
    def __init__(self, source: str, lines: dict[str, int]) -> None:
        self.source = source
        self.lines = lines

    def fail(self, key: str, message: str) -> KdumpError:
        line, parent = self.lines.get(key), key
        # A shorthand item ("- /usr/sbin/x" for {program: ...}) has no line for its own key:
        # the nearest enclosing key's line is where it is written.
        while line is None and (shorter := _PARENT.sub("", parent)) != parent:
            parent = shorter
            line = self.lines.get(parent)
        where = f"{self.source}:{line}" if line else self.source
        return KdumpError(f"{where}: key '{key}': {message}")

    def mapping(self, data: Any, schema: Mapping[str, Field], prefix: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.fail(prefix or "(top level)", f"expected a mapping, got {data!r}")
        for name in data:
            if name not in schema:
                key = f"{prefix}.{name}" if prefix else name
                close = difflib.get_close_matches(name, list(schema), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise self.fail(key, f"unknown key{hint}")
        out = {}
        for name, spec in schema.items():
            key = f"{prefix}.{name}" if prefix else name
            if name not in data or data[name] is None:
                if spec.required:
                    raise self.fail(prefix or name, f"'{name}' is required")
                out[name] = (
                    self.check(_copy(spec.default), spec, key) if spec.schema else spec.default
                )
                continue
            out[name] = self.check(data[name], spec, key)
        return out

    def check(self, value: Any, spec: Field, key: str) -> Any:
        # bool is an int to Python, never to a config reader.
        if not isinstance(value, spec.kind) or (isinstance(value, bool) and spec.kind is not bool):
            raise self.fail(key, f"expected {_type_name(spec.kind)}, got {value!r}")
        if spec.choices and value not in spec.choices:
            raise self.fail(
                key, f"expected one of {', '.join(map(str, spec.choices))}; got {value!r}"
            )
        if spec.minimum is not None and isinstance(value, int) and value < spec.minimum:
            raise self.fail(key, f"must be at least {spec.minimum}, got {value}")
        if spec.maximum is not None and isinstance(value, int) and value > spec.maximum:
            raise self.fail(key, f"must be at most {spec.maximum}, got {value}")
        if isinstance(value, str):
            if "\0" in value:
                raise self.fail(key, "contains a NUL byte")
            # The init logs line by line and writes vmcore.json with only \\ and " escaped;
            # no value needs a control character.
            control = _CONTROL.search(value)
            if control:
                raise self.fail(key, f"contains the control character {control.group()!r}")
            if spec.absolute_path:
                check_path(self, key, value)
        if spec.schema is not None:
            return self.mapping(value, spec.schema, key)
        if isinstance(value, list):
            if spec.shorthand:
                value = [{spec.shorthand: v} if isinstance(v, str) else v for v in value]
            return [self.item(v, spec.items, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    def item(self, value: Any, items: type | dict[str, Field] | None, key: str) -> Any:
        if isinstance(items, dict):
            return self.mapping(value, items, key)
        if items is not None:
            return self.check(value, Field(items), key)
        return value


def check_path(checker: Checker, key: str, value: str) -> None:
    if not value.startswith("/"):
        raise checker.fail(key, f"must be an absolute path, got {value!r}")
    if ".." in value.split("/"):
        raise checker.fail(key, f"must not contain '..', got {value!r}")


def _copy(value: Any) -> Any:
    return (
        dict(value)
        if isinstance(value, dict)
        else list(value)
        if isinstance(value, list)
        else value
    )
