"""Our YAML config from an import's draft, with a comment above each key naming the peer's
line it came from. PyYAML writes no comments, so the block layout is written here and only
scalars go through PyYAML (which quotes whatever YAML would otherwise read differently).
"""

from __future__ import annotations

from typing import Any

import yaml

from kdump_mkinitrd.config import SCHEMA
from kdump_mkinitrd.importing.draft import Draft


def scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...")


def _comments(draft: Draft, path: str, indent: str) -> list[str]:
    out = []
    for line in draft.origins.get(path, ()):
        text = " ".join(line.text.split())
        out.append(f"{indent}# {line}: {text}")
    return out


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _mapping(
    draft: Draft, data: dict[str, Any], path: str, indent: str, first_prefix: str | None = None
) -> list[str]:
    """Lines of a block mapping; `first_prefix` replaces the indent of its first key (a list
    item's "- "), whose comments then go above the item."""
    out: list[str] = []
    for n, (key, value) in enumerate(data.items()):
        lead = first_prefix if (n == 0 and first_prefix is not None) else indent
        out += _comments(draft, _child(path, key), indent if n else lead.replace("- ", "  "))
        out += _entry(draft, key, value, _child(path, key), indent, lead)
    return out


def _entry(draft: Draft, key: str, value: Any, path: str, indent: str, lead: str) -> list[str]:
    if isinstance(value, dict):
        if not value:
            return [f"{lead}{key}: {{}}"]
        return [f"{lead}{key}:", *_mapping(draft, value, path, indent + "  ")]
    if isinstance(value, list):
        if not value:
            return [f"{lead}{key}: []"]
        out = [f"{lead}{key}:"]
        for i, item in enumerate(value):
            item_path = f"{path}[{i}]"
            out += _comments(draft, item_path, indent + "  ")
            if isinstance(item, dict):
                out += _mapping(draft, item, item_path, indent + "    ", indent + "  - ")
            else:
                out.append(f"{indent}  - {scalar(item)}")
        return out
    return [f"{lead}{key}: {scalar(value)}"]


def render(draft: Draft, header: list[str]) -> str:
    """The config text: the header's comment lines, then the keys in the schema's order."""
    order = {name: n for n, name in enumerate(SCHEMA)}
    data = dict(sorted(draft.data.items(), key=lambda kv: order.get(kv[0], len(order))))
    lines = [f"# {h}" if h else "#" for h in header]
    body = _mapping(draft, data, "", "")
    return "\n".join(lines + body) + "\n"
