"""Feature modules (`modules.d/NAME/module.yaml`): discovery, validation, selection and order.

A feature module declares what it puts in the image (kernel modules, binaries, files, device
nodes, directories, rendered templates) and when it applies; the core only reads these files.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdump_mkinitrd import storage
from kdump_mkinitrd.config import (
    CAPTURE_SCHEMA,
    HOOKS_SCHEMA,
    NETWORK_SCHEMA,
    TARGET_SCHEMA,
    Config,
)
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.cpio import Kind
from kdump_mkinitrd.paths import MODULES_DIR, TEMPLATES_DIR
from kdump_mkinitrd.targets import Target

_KEYS = {
    "name", "description", "depends", "when", "kernel_modules", "binaries", "files",
    "directories", "nodes", "host_symlinks", "templates", "python_stage",
}  # fmt: skip
_WHEN_KEYS = {
    "always", "target_types", "used_by_targets", "layer_types", "stage", "collector", "config_set",
}  # fmt: skip


@dataclass(frozen=True)
class Node:
    path: str
    kind: Kind  # "char" | "block"
    major: int
    minor: int
    mode: int


@dataclass(frozen=True)
class Template:
    src: Path
    dst: str
    mode: int


@dataclass(frozen=True)
class Entry:
    """A `kernel_modules` or `binaries` item: a name, or `{name: NAME, when: CONDITION}` for one
    the image needs only when a config key is set (`network.vlan`: 8021q) or when a target this
    feature serves has a field set so (`target.client=dropbear`: dbclient)."""

    name: str
    when: str | None = None

    def wanted(self, config: Config, targets: tuple[Target, ...]) -> bool:
        if self.when is None:
            return True
        section, _, key = self.when.partition(".")
        if section == "target":
            field, _, value = key.partition("=")
            return any(str(getattr(t, field)) == value for t in targets)
        return getattr(getattr(config, section), key) not in (None, "", (), False)

    def why(self, feature: str) -> str:
        if self.when is None:
            return f"feature {feature}"
        return f"feature {feature} ({self.when}{'' if '=' in self.when else ' is set'})"


@dataclass(frozen=True)
class Feature:
    name: str
    description: str
    folder: Path
    depends: tuple[str, ...]
    always: bool
    target_types: tuple[str, ...]
    used_by_targets: bool  # serves the targets whose type lists it in `uses` (network)
    layer_types: tuple[str, ...]  # serves the disk targets with a storage layer of these types
    when_stage: tuple[str, ...]
    when_collector: tuple[str, ...]
    when_config_set: tuple[Entry, ...]  # config keys (hooks.pre): any of them set
    # Each may hang on a condition; kernel modules may hold `{target.FIELD}` placeholders.
    kernel_modules: tuple[Entry, ...]
    binaries: tuple[Entry, ...]
    files: tuple[str, ...]
    directories: tuple[str, ...]
    nodes: tuple[Node, ...]
    host_symlinks: tuple[str, ...]
    templates: tuple[Template, ...]
    python_stage: str | None  # entry module of a Python stage this feature packs

    def targets(self, config: Config) -> tuple[Target, ...]:
        return tuple(
            t
            for t in config.targets
            if t.type in self.target_types
            or (self.used_by_targets and self.name in t.uses)
            or any(layer.type in self.layer_types for layer in t.layers())
        )

    def layers(self, config: Config) -> tuple[storage.Layer, ...]:
        """The storage layers this feature brings up, each once, in config order."""
        found: list[storage.Layer] = []
        for target in config.targets:
            found += [x for x in target.layers() if x.type in self.layer_types and x not in found]
        return tuple(found)

    def _why(self, entry: Entry, config: Config) -> str:
        """An entry's reason; a layer feature's names the layers that want it, which is what
        `inspect` shows beside each program and module ("feature lvm for lvm crashvg/dump")."""
        layers = self.layers(config)
        named = f" for {', '.join(x.name for x in layers)}" if layers else ""
        return entry.why(self.name) + named

    def applies(self, config: Config, stage: str, collector: str) -> bool:
        """`when` keys all have to hold; `always` alone means unconditionally."""
        if self.always:
            return True
        checks = []
        if self.target_types or self.used_by_targets or self.layer_types:
            checks.append(bool(self.targets(config)))
        if self.when_stage:
            checks.append(stage in self.when_stage)
        if self.when_collector:
            checks.append(collector in self.when_collector)
        if self.when_config_set:
            checks.append(any(e.wanted(config, ()) for e in self.when_config_set))
        return bool(checks) and all(checks)

    def kernel_module_requests(self, config: Config) -> list[tuple[str, str]]:
        """(module, why): `{target.fstype}`-style entries expand once per target this feature
        serves; an entry with `when` only while its condition holds."""
        targets = self.targets(config)
        out: list[tuple[str, str]] = []
        for entry in self.kernel_modules:
            if not entry.wanted(config, targets):
                continue
            if "{" not in entry.name:
                out.append((entry.name, self._why(entry, config)))
                continue
            for target in targets:
                value = entry.name.format_map({"target": target})
                if value and value != "None":
                    out.append((value, self._why(entry, config)))
        return out

    def binary_requests(self, config: Config) -> list[tuple[str, str]]:
        """(program, why) for the entries whose condition holds."""
        targets = self.targets(config)
        return [(e.name, self._why(e, config)) for e in self.binaries if e.wanted(config, targets)]


def _mode(value: object, default: int) -> int:
    # Modes are written as octal strings ("0644") so YAML's number rules cannot bite.
    if value is None:
        return default
    return int(str(value), 8)


def _fail(manifest: Path, message: str) -> KdumpError:
    return KdumpError(f"{manifest}: {message}")


def _str_list(manifest: Path, data: dict[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(manifest, f"key '{key}' must be a list of strings")
    return tuple(value)


# Config sections whose keys an entry may hang on.
_WHEN_SECTIONS = {"network": NETWORK_SCHEMA, "capture": CAPTURE_SCHEMA, "hooks": HOOKS_SCHEMA}


def _condition(manifest: Path, key: str, when: str) -> str:
    section, _, name = when.partition(".")
    if section == "target":
        field, equals, value = name.partition("=")
        if equals and value and field in TARGET_SCHEMA:
            return when
    elif name in _WHEN_SECTIONS.get(section, {}):
        return when
    known = ", ".join(f"{s}.KEY" for s in _WHEN_SECTIONS)
    raise _fail(manifest, f"{key}: when: {when!r} is neither a config key ({known}) nor "
                "target.FIELD=VALUE")  # fmt: skip


def _entries(manifest: Path, data: dict[str, Any], key: str) -> tuple[Entry, ...]:
    entries = []
    for item in data.get(key) or []:
        if isinstance(item, str):
            entries.append(Entry(item))
            continue
        if not isinstance(item, dict) or set(item) != {"name", "when"}:
            raise _fail(manifest, f"{key} items are names or {{name: ..., when: ...}}")
        entries.append(Entry(str(item["name"]), _condition(manifest, key, str(item["when"]))))
    return tuple(entries)


def _node(manifest: Path, item: dict[str, Any]) -> Node:
    kind = item.get("type")
    if kind not in ("char", "block"):
        raise _fail(
            manifest, f"node {item.get('path')!r}: type must be char or block, got {kind!r}"
        )
    mode = _mode(item.get("mode"), 0o600)
    return Node(item["path"], kind, int(item["major"]), int(item["minor"]), mode)


def _python_stage(manifest: Path, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("entry"), str):
        raise _fail(manifest, "'python_stage' must be a mapping with an 'entry' module name")
    return str(value["entry"])


def _load(folder: Path) -> Feature:
    manifest = folder / "module.yaml"
    try:
        # libyaml's loader when PyYAML has it: the same safe subset, parsed in C.
        data = yaml.load(manifest.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise _fail(manifest, f"malformed YAML: {exc}") from None
    if not isinstance(data, dict):
        raise _fail(manifest, "expected a mapping")
    for key in data:
        if key not in _KEYS:
            close = difflib.get_close_matches(key, sorted(_KEYS), n=1)
            raise _fail(
                manifest,
                f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""),
            )
    name = data.get("name")
    if name != folder.name:
        raise _fail(manifest, f"'name' must match the folder name {folder.name!r}, got {name!r}")
    when = data.get("when") or {"always": True}
    if not isinstance(when, dict) or set(when) - _WHEN_KEYS:
        raise _fail(manifest, f"'when' takes only {sorted(_WHEN_KEYS)}")
    if not isinstance(when.get("used_by_targets", False), bool):
        raise _fail(manifest, "'when: used_by_targets' must be true or false")
    unknown = set(_str_list(manifest, when, "layer_types")) - set(storage.TYPES)
    if unknown:
        known = ", ".join(storage.TYPES)
        raise _fail(manifest, "'when: layer_types' names no storage layer type: "
                    f"{', '.join(sorted(unknown))} (known: {known})")  # fmt: skip
    nodes = tuple(_node(manifest, n) for n in data.get("nodes") or [])
    templates = []
    for t in data.get("templates") or []:
        src = folder / t["src"]
        if not src.is_file():
            src = TEMPLATES_DIR / t["src"]
        if not src.is_file():
            raise _fail(manifest, f"template {t['src']!r} is neither in {folder} nor in templates/")
        templates.append(Template(src, t["dst"], _mode(t.get("mode"), 0o755)))
    return Feature(
        name=name,
        description=str(data.get("description", "")),
        folder=folder,
        depends=_str_list(manifest, data, "depends"),
        always=bool(when.get("always", False)),
        target_types=_str_list(manifest, when, "target_types"),
        used_by_targets=when.get("used_by_targets", False),
        layer_types=_str_list(manifest, when, "layer_types"),
        when_stage=_str_list(manifest, when, "stage"),
        when_collector=_str_list(manifest, when, "collector"),
        when_config_set=tuple(
            Entry(c, _condition(manifest, "when: config_set", c))
            for c in _str_list(manifest, when, "config_set")
        ),
        kernel_modules=_entries(manifest, data, "kernel_modules"),
        binaries=_entries(manifest, data, "binaries"),
        files=_str_list(manifest, data, "files"),
        directories=_str_list(manifest, data, "directories"),
        nodes=nodes,
        host_symlinks=_str_list(manifest, data, "host_symlinks"),
        templates=tuple(templates),
        python_stage=_python_stage(manifest, data.get("python_stage")),
    )


def discover(extra_dirs: tuple[Path, ...] = ()) -> dict[str, Feature]:
    """All feature modules; a folder in a later directory replaces one of the same name."""
    found: dict[str, Feature] = {}
    for directory in (MODULES_DIR, *extra_dirs):
        if not directory.is_dir():
            raise KdumpError(f"feature module directory {directory} does not exist")
        for folder in sorted(p for p in directory.iterdir() if (p / "module.yaml").is_file()):
            found[folder.name] = _load(folder)
    return found


def select(
    features: dict[str, Feature], config: Config, stage: str, collector: str
) -> list[Feature]:
    """The features that apply to this config plus what they depend on, dependencies first."""
    ordered: list[Feature] = []
    state: dict[str, str] = {}

    def visit(name: str, wanted_by: str) -> None:
        if name not in features:
            raise KdumpError(f"feature module {wanted_by!r} depends on unknown module {name!r}")
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise KdumpError(f"feature modules depend on each other in a cycle through {name!r}")
        state[name] = "visiting"
        for dep in features[name].depends:
            visit(dep, name)
        state[name] = "done"
        ordered.append(features[name])

    for name in sorted(features):
        if features[name].applies(config, stage, collector):
            visit(name, name)
    return ordered
