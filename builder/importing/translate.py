"""What the three peers' files share, translated once: makedumpfile's options, words for the
capture kernel's command line, a program to run as a hook, and a local folder to dump into.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
from collections.abc import Collection
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from kdump_mkinitrd import config
from kdump_mkinitrd.arming import cmdline
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import defaulttarget
from kdump_mkinitrd.importing import shellfile
from kdump_mkinitrd.importing.draft import EMPTY, Draft, Kind, Line
from kdump_mkinitrd.importing.sources import SourceFile
from kdump_mkinitrd.targets.base import Target

# makedumpfile's page compression flags → capture.compression.
COMPRESSION_FLAGS = {"c": "zlib", "l": "lzo", "p": "snappy", "z": "zstd"}
# Options that change nothing about what is saved, or that kdump-mkinitrd passes itself.
_HARMLESS = {
    "--message-level": "how much makedumpfile prints; kdump-mkinitrd chooses its own",
    "-D": "makedumpfile's debugging output",
    "-F": "kdump-mkinitrd streams with -F (flattened) to ssh targets itself, and writes "
    "files directly to the others",
}


@dataclass
class Collector:
    """What a makedumpfile command line says about the dump."""

    values: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # harmless options, and why
    refused: list[str] = field(default_factory=list)  # options that change the dump


def read_shell_file(
    source: SourceFile, draft: Draft, known: Collection[str]
) -> dict[str, tuple[str, Line]]:
    """The values a sourced shell file leaves set, by name, with their lines. What sh would
    not get from the file alone is reported here: statements that are not assignments, values
    that need something run, earlier assignments a later one replaces, and helper variables
    (unknown to the peer, expanded by other lines)."""
    statements = shellfile.parse(source.text)
    helpers = shellfile.helpers(statements)
    values: dict[str, tuple[str, Line]] = {}
    for st in statements:
        line = Line(source.name, st.line, st.text)
        if st.name is None:
            draft.drop(st.text.split()[0], line, st.problem or "")
        elif st.value is None:
            draft.drop(st.name, line, f"{st.problem}; write the value out")
        elif st.name in helpers and st.name not in known:
            draft.map(st.name, line, {}, f"a helper variable: line {helpers[st.name]} expands it")
        else:
            if st.name in values:
                draft.map(
                    st.name,
                    values[st.name][1],
                    {},
                    f"set again on line {st.line}: sh keeps the last",
                )
            values[st.name] = (st.value, line)
    return values


def makedumpfile_options(words: list[str]) -> Collector:
    """capture.dump_level and capture.compression from makedumpfile's options, as
    makedumpfile's getopt reads them (`-d 31`, `-d31`, `-cd 31`, `--dump-level 31`); no
    compression flag means an uncompressed dump."""
    out = Collector()
    compression = "none"
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        name, eq, attached = word.partition("=")
        if name == "--dump-level":
            level = attached if eq else (words[i] if i < len(words) else "")
            i += 0 if eq else 1
            _level(out, word, level)
        elif name in _HARMLESS:
            if name == "--message-level" and not eq:
                i += 1
            out.ignored.append(f"{name}: {_HARMLESS[name]}")
        elif word.startswith("-") and not word.startswith("--") and len(word) > 1:
            letters = word[1:]
            for n, letter in enumerate(letters):
                if letter in COMPRESSION_FLAGS:
                    compression = COMPRESSION_FLAGS[letter]
                elif letter == "d":
                    level = letters[n + 1 :] or (words[i] if i < len(words) else "")
                    if not letters[n + 1 :]:
                        i += 1
                    _level(out, word, level)
                    break
                elif f"-{letter}" in _HARMLESS:
                    out.ignored.append(f"-{letter}: {_HARMLESS[f'-{letter}']}")
                elif letter == "E":
                    out.refused.append(
                        "-E (ELF output): kdump-mkinitrd writes kdump-compressed "
                        "dumps with makedumpfile, or ELF with capture.collector: "
                        "native, which leaves out zero pages only"
                    )
                else:
                    out.refused.append(
                        f"-{letter}: kdump-mkinitrd runs makedumpfile with the "
                        "dump level and compression only"
                    )
        else:
            out.refused.append(
                f"{word}: kdump-mkinitrd runs makedumpfile with the dump level and compression only"
            )
    out.values["capture.compression"] = compression
    return out


def _level(out: Collector, word: str, level: str) -> None:
    if level.isdigit() and int(level) <= 31:
        out.values["capture.dump_level"] = int(level)
    else:
        out.refused.append(f"{word} {level}: not a dump level from 0 to 31")


def apply_collector(draft: Draft, key: str, line: Line, words: list[str], note: str = "") -> None:
    """Carry a makedumpfile command line over; what it cannot carry makes it `changed`."""
    found = makedumpfile_options(words)
    notes = [note] if note else []
    notes += [f"ignored {what}" for what in found.ignored]
    if found.refused:
        notes += [f"not carried over: {what}" for what in found.refused]
        draft.change(key, line, found.values, "; ".join(notes))
    else:
        draft.map(key, line, found.values, "; ".join(notes))


# Command-line words a peer adds for its own capture system, which ours has none of.
_PEER_ONLY = {
    "udev.*": "kdump-mkinitrd's capture image runs no udev",
}


def _host_arch() -> str:
    return cmdline.normalise_arch(platform.machine())


def apply_cmdline_append(draft: Draft, key: str, line: Line, words: list[str]) -> None:
    """Each word of a peer's extra capture command line: already ours, appended, or left out
    (what only the peer's capture system reads)."""
    arch = _host_arch()
    appended: list[str] = []
    notes: list[str] = []
    dropped: list[str] = []
    for word in words:
        arg = cmdline.parse_arg(word)
        peer_only = [why for rule, why in _PEER_ONLY.items() if fnmatchcase(arg.key, rule)]
        where = cmdline.standing(word, arch)
        if peer_only:
            dropped.append(f"{word} ({peer_only[0]})")
        elif where and where[0] == "added":
            notes.append(f"{word}: kdump-mkinitrd passes it already")
        elif where and any("*" in rule and fnmatchcase(arg.key, rule) for rule in cmdline.DROPPED):
            dropped.append(f"{word} ({where[1]})")
        elif where:
            appended.append(word)
            notes.append(
                f"{word}: kept, though kdump-mkinitrd takes the first kernel's "
                f"{arg.key} out ({where[1]})"
            )
        else:
            appended.append(word)
    values = {}
    for word in appended:
        path = draft.add("cmdline.append", word, line)
        values[path] = word
    if dropped:
        notes.append("left out: " + "; ".join(dropped))
    kind: Kind = "changed" if dropped else "mapped"
    draft.record(kind, key, line, tuple(values), "; ".join(notes) if words else EMPTY)


def apply_cmdline_remove(draft: Draft, key: str, line: Line, words: list[str]) -> None:
    arch = _host_arch()
    values = {}
    notes = []
    for word in words:
        where = cmdline.standing(word, arch)
        if where and where[0] == "removed":
            notes.append(f"{word}: kdump-mkinitrd removes it already")
            continue
        values[draft.add("cmdline.remove", word, line)] = word
    draft.record("mapped", key, line, tuple(values), "; ".join(notes) if words else EMPTY)


def hook(command: str) -> tuple[dict[str, Any] | str | None, str]:
    """A hook item from a command line the peer runs (split as sh splits plain words), or
    None and why not: shell syntax is never carried into our config, where nothing runs as
    shell code."""
    try:
        words = shlex.split(command)
    except ValueError as exc:
        return None, f"cannot split {command!r} into words: {exc}"
    special = [w for w in words if any(c in w for c in ";&|<>`$()*?")]
    if not words or special:
        return None, (
            f"{command!r} is shell code ({' '.join(special) or 'empty'}); "
            "kdump-mkinitrd runs hooks as programs, never through a shell: put the "
            "commands in a script and name the script"
        )
    program = words[0]
    if not program.startswith("/"):
        return None, (
            f"{program!r} is not an absolute path; name the program by its full "
            "path (the capture image holds it there)"
        )
    if len(words) == 1:
        return program, ""
    return {"program": program, "args": words[1:]}, ""


def host_mounts() -> list[defaulttarget.Mount]:
    return defaulttarget.parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def target_problem(target: dict[str, Any]) -> str:
    """Why our config loader refuses this target ("" when it takes it): a value the peer
    accepts that ours does not is reported, never written."""
    text = yaml.safe_dump({"targets": [target]}, default_flow_style=None, sort_keys=False)
    try:
        config.parse(text, "the target")
    except KdumpError as exc:
        why = re.sub(r"^the target(:\d+)?: key 'targets\[0\]\.?", "'", str(exc))
        return "kdump-mkinitrd's config refuses it: " + why.replace("'': ", "")
    return ""


def disk_values(target: Target, path: str) -> dict[str, Any]:
    """The config keys of a disk target found on this host, dumping into `path` in it."""
    values: dict[str, Any] = {
        "type": "disk",
        "device": target.device,
        "fstype": target.fstype,
        "path": path,
    }
    if target.mount_options != "defaults":
        values["mount_options"] = target.mount_options
    return values


def local_folder(folder: str) -> tuple[dict[str, Any] | None, str]:
    """A disk target for a local folder: none at all for /var/crash (our default target is
    the filesystem holding it, found at each build), else the filesystem holding it on this
    host now; or None and why it cannot be one."""
    if os.path.normpath(folder) == defaulttarget.CRASH_DIR:
        return {}, (
            "no target written: with none, kdump-mkinitrd dumps to the filesystem "
            "holding /var/crash, found again at each build"
        )
    try:
        target, where = defaulttarget.locate(folder, host_mounts())
    except defaulttarget.Unsuitable as exc:
        return None, (f"{exc}; configure a target (disk, nfs or ssh) for it")
    return disk_values(target, target.path), (
        f"pinned to {where} on this host now; the peer found the folder at each dump"
    )
