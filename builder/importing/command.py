"""`kdump-mkinitrd import-config`: read a peer's kdump configuration, write ours, and report
what was mapped, what changes in meaning and what was not carried over.

Exit 0 when every key was carried over (mapped, or mapped with a change the report names),
2 when one was not, 1 on an error (nothing is written then, and an existing output file is
never replaced unless --force says so).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from kdump_mkinitrd import config as config_mod
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.importing import kdumptools, kdumputils, suse, yamlout
from kdump_mkinitrd.importing.draft import KINDS, Draft, Outcome
from kdump_mkinitrd.importing.sources import SourceFile
from kdump_mkinitrd.output import write_atomic

PEERS: dict[str, ModuleType] = {m.NAME: m for m in (kdumputils, kdumptools, suse)}
EXIT_INCOMPLETE = 2


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "import-config",
        help="write a kdump-mkinitrd config from kdump-utils', kdump-tools' or SUSE kdump's",
    )
    p.add_argument(
        "--from",
        dest="peer",
        choices=tuple(PEERS),
        help="whose files these are (default: look for them on this host)",
    )
    p.add_argument(
        "files",
        nargs="*",
        type=Path,
        metavar="FILE",
        help="the peer's files (default: where the peer keeps them)",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="OUT.yaml",
        help="write the config here (default: standard output)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def detect(root: Path = Path("/")) -> tuple[ModuleType, list[Path]]:
    """The one peer whose files this host has, and those files."""
    found = []
    for peer in PEERS.values():
        files = peer.present(root)
        if files:
            found.append((peer, files))
    if not found:
        looked = ", ".join(dict.fromkeys(str(f) for peer in PEERS.values() for f in peer.FILES))
        raise KdumpError(
            f"no kdump configuration of another kdump on this host (looked for "
            f"{looked}); name the files, with --from"
        )
    if len(found) > 1:
        names = "; ".join(f"{p.TITLE}: {', '.join(map(str, f))}" for p, f in found)
        raise KdumpError(f"found the files of more than one kdump ({names}): choose with --from")
    return found[0]


def run(peer: ModuleType, paths: list[Path]) -> tuple[Draft, str]:
    """The draft and our config's text, checked by our own config loader."""
    files = peer.arrange([SourceFile.read(p) for p in paths])
    draft = Draft()
    peer.translate_files(files, draft)
    header = [
        f"kdump-mkinitrd config imported from {peer.TITLE} by `kdump-mkinitrd import-config`:",
        *(f"  {f.name}" for f in files),
        "Above each key: the line it came from. `import-config` reports what was not carried",
        "over or changes in meaning; see kdump-mkinitrd.yaml(5).",
    ]
    return draft, yamlout.render(draft, header)


def in_file_order(draft: Draft, paths: list[Path]) -> list[Outcome]:
    order = {str(p): n for n, p in enumerate(paths)}
    return sorted(draft.outcomes, key=lambda o: (order.get(o.line.file, len(order)), o.line.number))


def report_lines(peer: ModuleType, paths: list[Path], draft: Draft) -> list[str]:
    lines = [f"read {peer.TITLE}: " + ", ".join(map(str, paths))]
    for o in in_file_order(draft, paths):
        into = f" -> {', '.join(o.into)}" if o.into else ""
        note = f": {o.note}" if o.note else ""
        lines.append(f"  {KINDS[o.kind]}: {o.key} ({o.line}){into}{note}")
    counts = {kind: sum(o.kind == kind for o in draft.outcomes) for kind in KINDS}
    lines.append(", ".join(f"{n} {KINDS[k]}" for k, n in counts.items()))
    return lines


def command(args: argparse.Namespace) -> int:
    if args.files and not args.peer:
        raise KdumpError("name whose files these are with --from " + "|".join(PEERS))
    if args.peer:
        peer = PEERS[args.peer]
        paths = list(args.files) or peer.present(Path("/"))
        if not paths:
            raise KdumpError(
                f"{peer.TITLE}'s files are not on this host: "
                f"{', '.join(map(str, peer.FILES))}; name them"
            )
    else:
        peer, paths = detect()
    out: Path | None = args.output
    if out is not None and out.exists() and not args.force:
        raise KdumpError(f"{out} exists; the import never replaces a file unless --force")
    draft, text = run(peer, paths)
    name = str(out) if out is not None else "the imported config"
    config_mod.parse(text, name)  # the errors a user would get; raises before writing
    if out is not None:
        write_atomic(out, text.encode(), mode=0o644)
    if args.json:
        print(
            json.dumps(
                {
                    "peer": peer.NAME,
                    "files": [str(p) for p in paths],
                    "output": str(out) if out is not None else None,
                    "config": text,
                    "complete": draft.complete,
                    "outcomes": [
                        {
                            "key": o.key,
                            "file": o.line.file,
                            "line": o.line.number,
                            "text": o.line.text,
                            "outcome": o.kind,
                            "into": list(o.into),
                            "note": o.note,
                        }
                        for o in draft.outcomes
                    ],
                },
                indent=2,
            )
        )
    else:
        if out is None:
            sys.stdout.write(text)
        report = sys.stderr if out is None else sys.stdout
        for line in report_lines(peer, paths, draft):
            print(line, file=report)
        if out is not None:
            print(f"wrote {out} (checked by kdump-mkinitrd's config loader)", file=report)
    return 0 if draft.complete else EXIT_INCOMPLETE
