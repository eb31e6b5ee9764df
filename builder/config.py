"""The YAML config: loaded with line numbers, checked against one declarative schema, frozen.

Every error names the file, the line and the key, so an admin can fix it without guessing.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from builder.errors import KdumpError

DEFAULT_PATH = Path("/etc/kdump-mkinitrd.yaml")

TARGET_TYPES = ("disk", "raw", "nfs", "ssh")
FSTYPES = ("ext4", "xfs", "btrfs")
ACTIONS = ("reboot", "poweroff", "halt", "shell")


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
    shorthand: str | None = None  # a bare string item stands for {shorthand: string}


TARGET_SCHEMA: dict[str, Field] = {
    "type": Field(str, required=True, choices=TARGET_TYPES),
    "device": Field(str),
    "fstype": Field(str, choices=FSTYPES),
    "path": Field(str, default="/var/crash", absolute_path=True),
    "mount_options": Field(str, default="defaults"),
}

FILE_SCHEMA: dict[str, Field] = {
    "src": Field(str, required=True, absolute_path=True),
    "dst": Field(str, absolute_path=True),
}

COMPRESSION_SCHEMA: dict[str, Field] = {
    "method": Field(str, default="zstd", choices=("zstd", "gzip", "none")),
    "level": Field(int, default=9, minimum=1),
    "threads": Field(int, default=0, minimum=-1),
}

CAPTURE_SCHEMA: dict[str, Field] = {
    # python: the Python stage does the careful work, the static init falls back on its own;
    # static: no interpreter in the image at all (smallest image).
    "stage": Field(str, default="python", choices=("python", "static")),
    # auto: makedumpfile when the build host has it, else our native ELF writer.
    "collector": Field(str, default="auto", choices=("auto", "makedumpfile", "native")),
    "dump_level": Field(int, default=31, minimum=0),
    # auto: the best that makedumpfile supports (zstd, else lzo).
    "compression": Field(
        str, default="auto", choices=("auto", "zstd", "lzo", "zlib", "snappy", "none")
    ),
    "python": Field(str),  # interpreter to pack; default: the one running the builder
    "hostname": Field(str),  # names dump directories; default: the build host's name
}

CMDLINE_SCHEMA: dict[str, Field] = {
    "append": Field(list, default=[], items=str),  # added to the capture kernel's command line
    "remove": Field(list, default=[], items=str),  # taken out (by key, or key=value)
}

SCHEMA: dict[str, Field] = {
    "targets": Field(list, default=[], items=TARGET_SCHEMA),
    "kernel_modules": Field(list, default=[], items=str),
    "binaries": Field(list, default=[], items=str),
    "files": Field(list, default=[], items=FILE_SCHEMA, shorthand="src"),
    "failure_action": Field(str, default="reboot", choices=ACTIONS),
    "final_action": Field(str, default="reboot", choices=ACTIONS),
    "device_timeout": Field(int, default=30, minimum=1),
    "compression": Field(dict, default={}, schema=COMPRESSION_SCHEMA),
    "capture": Field(dict, default={}, schema=CAPTURE_SCHEMA),
    "cmdline": Field(dict, default={}, schema=CMDLINE_SCHEMA),
    "busybox": Field(str, default="/bin/busybox", absolute_path=True),
    "search_path": Field(str, default="/usr/sbin:/usr/bin:/sbin:/bin"),
    "firmware_root": Field(str, default="/lib/firmware", absolute_path=True),
}


@dataclass(frozen=True)
class Target:
    type: str
    device: str | None
    fstype: str | None
    path: str
    mount_options: str


@dataclass(frozen=True)
class ExtraFile:
    src: str
    dst: str


@dataclass(frozen=True)
class Config:
    source: str  # the file it came from, or "<defaults>"
    text: str  # the exact bytes read, recorded in the image manifest
    targets: tuple[Target, ...]
    kernel_modules: tuple[str, ...]
    binaries: tuple[str, ...]
    files: tuple[ExtraFile, ...]
    failure_action: str
    final_action: str
    device_timeout: int
    compression: dict[str, Any]
    capture: dict[str, Any]
    cmdline: dict[str, Any]
    busybox: str
    search_path: str
    firmware_root: str
    lines: dict[str, int] = field(default_factory=dict, compare=False)

    def line_of(self, key: str) -> str:
        """`file:line` of a dotted key, for errors raised after validation."""
        return f"{self.source}:{self.lines.get(key, 0)}"


class _Located:
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


class _Checker:
    def __init__(self, source: str, lines: dict[str, int]) -> None:
        self.source = source
        self.lines = lines

    def fail(self, key: str, message: str) -> KdumpError:
        line = self.lines.get(key)
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
        if isinstance(value, str):
            if "\0" in value:
                raise self.fail(key, "contains a NUL byte")
            if spec.absolute_path:
                _check_path(self, key, value)
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


def _check_path(checker: _Checker, key: str, value: str) -> None:
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


def _cross_checks(checker: _Checker, data: dict[str, Any]) -> None:
    """Rules that span keys: what each target type needs."""
    for i, target in enumerate(data["targets"]):
        key = f"targets[{i}]"
        if target["type"] in ("disk", "raw") and not target["device"]:
            raise checker.fail(key, f"a {target['type']} target needs 'device'")
        if target["type"] == "disk" and not target["fstype"]:
            raise checker.fail(key, "a disk target needs 'fstype' (ext4, xfs or btrfs)")
        device = target["device"]
        if device and not device.startswith(("/dev/", "UUID=", "LABEL=", "PARTUUID=")):
            raise checker.fail(
                f"{key}.device", f"expected UUID=, LABEL=, PARTUUID= or a /dev path; got {device!r}"
            )


def parse(text: str, source: str) -> Config:
    """Validate config text; `source` names it in errors."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise KdumpError(f"{where}: malformed YAML: {problem}") from None
    located = _Located(source)
    data = located.value(root, "") if root is not None else {}
    checker = _Checker(source, located.lines)
    values = checker.mapping(data, SCHEMA, "")
    _cross_checks(checker, values)
    return Config(
        source=source,
        text=text,
        targets=tuple(Target(**t) for t in values["targets"]),
        kernel_modules=tuple(values["kernel_modules"]),
        binaries=tuple(values["binaries"]),
        files=tuple(ExtraFile(src=f["src"], dst=f["dst"] or f["src"]) for f in values["files"]),
        failure_action=values["failure_action"],
        final_action=values["final_action"],
        device_timeout=values["device_timeout"],
        compression=values["compression"],
        capture=values["capture"],
        cmdline=values["cmdline"],
        busybox=values["busybox"],
        search_path=values["search_path"],
        firmware_root=values["firmware_root"],
        lines=located.lines,
    )


def load(path: Path | None) -> Config:
    """Read the config file; the default path may be absent (defaults apply), a given one not."""
    if path is None:
        if not DEFAULT_PATH.exists():
            return parse("", "<defaults>")
        path = DEFAULT_PATH
    try:
        text = path.read_text()
    except OSError as exc:
        raise KdumpError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KdumpError(f"{path}: config is not UTF-8 text") from None
    return parse(text, str(path))
