"""Fedora's and RHEL's kdump-utils: /etc/kdump.conf (directives read by kdumpctl and mkdumprd)
and /etc/sysconfig/kdump (a shell file: the capture command line, kexec's arguments).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import defaulttarget
from kdump_mkinitrd.importing import kdumpconf, shellfile, translate
from kdump_mkinitrd.importing.draft import Draft, Kind, Line
from kdump_mkinitrd.importing.sources import SourceFile
from kdump_mkinitrd.targets.base import FSTYPES

NAME = "kdump-utils"
TITLE = "kdump-utils (Fedora, RHEL)"
FILES = (Path("/etc/kdump.conf"), Path("/etc/sysconfig/kdump"))

_PATH = "/var/crash"
_SSH_KEY = "/root/.ssh/kdump_id_rsa"
_ACTIONS = ("reboot", "halt", "poweroff", "shell")
# Filesystems a disk target mounts under another name, and ones it cannot mount.
_AS_EXT4 = ("ext2", "ext3")

_NOT_CARRIED = {
    "dracut_args": "kdump-mkinitrd does not run dracut: add drivers with kernel_modules, "
    "programs with binaries and files with files",
    "fence_kdump_args": "fence_kdump (telling a cluster's fencing agent that this node is "
    "dumping) is not supported",
    "fence_kdump_nodes": "fence_kdump (telling a cluster's fencing agent that this node is "
    "dumping) is not supported",
    "kdump_emergency": "no counterpart: when no target takes the dump, failure_action runs, "
    "and post hooks (hooks.post) run first with status 1",
}
# Directives whose default changes nothing here: (default value, why).
_DEFAULTS = {
    "force_rebuild": ("0", "kdump-mkinitrd rebuilds when an input of the image changed"),
    "force_no_rebuild": ("0", "kdump-mkinitrd rebuilds when an input of the image changed"),
    "auto_reset_crashkernel": (
        "no",
        "kdump-mkinitrd never changes crashkernel=; `kdump-mkinitrd estimate` says what to reserve",
    ),
}
_SYSCONFIG_PLUMBING = {
    "KDUMP_KERNELVER": "",
    "KDUMP_COMMANDLINE": "",
    "KEXEC_ARGS": "-s",
    "KDUMP_BOOTDIR": "/boot",
    "KDUMP_IMG": "vmlinuz",
    "KDUMP_IMG_EXT": "",
    "FADUMP_COMMANDLINE_APPEND": "",
    "MKDUMPRD_ARGS": "",
    "MKFADUMPRD_ARGS": "",
}
_LOG_LEVELS = ("KDUMP_STDLOGLVL", "KDUMP_SYSLOGLVL", "KDUMP_KMSGLOGLVL")


def present(root: Path) -> list[Path]:
    conf, sysconfig = (root / f.relative_to("/") for f in FILES)
    if not conf.is_file():
        return []
    return [conf] + ([sysconfig] if sysconfig.is_file() else [])


def _is_sysconfig(source: SourceFile) -> bool:
    statements = shellfile.parse(source.text)
    return bool(statements) and all(s.name is not None for s in statements)


def arrange(files: list[SourceFile]) -> list[SourceFile]:
    """kdump.conf first, then the sysconfig file (told apart by what they hold)."""
    confs = [f for f in files if not _is_sysconfig(f)]
    sysconfigs = [f for f in files if _is_sysconfig(f)]
    if len(confs) != 1 or len(sysconfigs) > 1:
        raise KdumpError(
            f"{TITLE}: expected kdump.conf and optionally /etc/sysconfig/kdump; "
            f"got {len(confs)} kdump.conf-style and {len(sysconfigs)} "
            "shell-style files"
        )
    return confs + sysconfigs


_TARGETS = ("raw", "ext2", "ext3", "ext4", "minix", "btrfs", "xfs", "nfs", "ssh", "virtiofs")
_DEPRECATED = {
    "net": "the nfs or ssh line names the server",
    "options": "pass a module's options with cmdline.append MODULE.PARAM=VALUE",
    "link_delay": "kdump-mkinitrd waits for the link for network.timeout seconds",
    "disk_timeout": "kdump-mkinitrd waits device_timeout seconds (default 30) for the dump device",
    "debug_mem_level": "kdump-utils' memory debugging of the capture kernel has no counterpart",
    "blacklist": "keep a module out with cmdline.append module_blacklist=NAME",
}


def _slot(key: str) -> str:
    """What a directive sets, as kdumpctl counts repeats: one target, `default` is
    failure_action."""
    return "a target" if key in _TARGETS else "failure_action" if key == "default" else key


def _unique(directives: list[kdumpconf.Directive], draft: Draft) -> list[kdumpconf.Directive]:
    """The directives kdumpctl would take: it refuses a config that sets anything twice or
    leaves a value empty. The capture side reads the last of a repeat, so that one is kept."""
    last = {_slot(d.key): d for d in directives}
    kept = []
    for d in directives:
        final = last[_slot(d.key)]
        if final is not d:
            draft.drop(
                d.key,
                d.where,
                f"kdumpctl refuses a config that sets {_slot(d.key)} "
                f"twice; line {final.line} (the last, which the capture kernel reads) is "
                "carried over instead",
            )
        elif not d.value:
            draft.drop(d.key, d.where, "kdumpctl refuses a directive without a value")
        else:
            kept.append(d)
    return kept


def translate_files(files: list[SourceFile], draft: Draft) -> None:
    conf = files[0]
    directives = _unique(kdumpconf.parse(conf.text, conf.name), draft)
    given = {d.key: d for d in directives}
    path = posixpath.normpath(given["path"].value) if "path" in given else _PATH
    target = _target(directives, draft, path)
    for d in directives:
        line = d.where
        if d.key in _TARGETS or d.key in ("path", "sshkey", "kdump_pre", "kdump_post"):
            continue  # with the target, and the hooks in their order below
        if d.key in ("extra_bins", "extra_modules"):
            ours = "kernel_modules" if d.key == "extra_modules" else "binaries"
            draft.map(d.key, line, {draft.add(ours, w, line): w for w in d.value.split()})
        elif d.key == "core_collector":
            _collector(draft, d, line, target)
        elif d.key in ("failure_action", "default"):
            _failure(draft, d, line, target, path)
        elif d.key == "final_action":
            if d.value in ("reboot", "halt", "poweroff"):
                draft.map(d.key, line, {"final_action": d.value})
            else:
                draft.drop(d.key, line, f"expected reboot, halt or poweroff; got {d.value!r}")
        elif d.key in _DEFAULTS:
            default, why = _DEFAULTS[d.key]
            if d.value == default:
                draft.map(d.key, line, {}, why)
            else:
                draft.drop(d.key, line, why)
        elif d.key in _NOT_CARRIED:
            draft.drop(d.key, line, _NOT_CARRIED[d.key])
        elif d.key in _DEPRECATED:
            draft.drop(
                d.key, line, "kdumpctl refuses this deprecated directive; " + _DEPRECATED[d.key]
            )
        else:
            draft.drop(d.key, line, "not a kdump.conf directive (kdumpctl refuses it)")
    _hooks(draft, given, Path(conf.name).parent / "kdump")
    for sysconfig in files[1:]:
        _sysconfig(sysconfig, draft)


def _target(
    directives: list[kdumpconf.Directive], draft: Draft, path: str
) -> dict[str, Any] | None:
    given = {d.key: d for d in directives}
    kinds = [d for d in directives if d.key in _TARGETS]
    path_line = given["path"].where if "path" in given else None
    made: dict[str, Any] | None = None
    if kinds:
        d = kinds[0]
        made = _one_target(draft, d, d.where, given.get("sshkey"))
        if made is not None and path_line is not None:
            if made["type"] == "raw":
                draft.change(
                    "path",
                    path_line,
                    {},
                    "kdumpctl copies a raw dump into this "
                    "folder at the next boot; kdump-mkinitrd's register copies it "
                    "into the raw target's recover_to (default /var/crash)",
                )
            else:
                draft.map("path", path_line, {"targets[0].path": path}, _PATH_MEANING[made["type"]])
    else:
        made = _local(draft, path, path_line)
    if "sshkey" in given and (made is None or made.get("type") != "ssh"):
        draft.drop("sshkey", given["sshkey"].where, "no ssh target")
    return made


_PATH_MEANING = {
    "disk": "the folder inside that filesystem, as in kdump-utils",
    "nfs": "the folder below the export, as in kdump-utils",
    "ssh": "the folder on the server",
}


def _one_target(
    draft: Draft,
    d: kdumpconf.Directive,
    line: Line,
    sshkey: kdumpconf.Directive | None,
) -> dict[str, Any] | None:
    if d.key in FSTYPES or d.key in _AS_EXT4:
        fstype = "ext4" if d.key in _AS_EXT4 else d.key
        target = {"type": "disk", "device": d.value, "fstype": fstype}
        note = f"mounted as ext4, whose driver reads {d.key}" if d.key in _AS_EXT4 else ""
        kind: Kind = "changed" if note else "mapped"
    elif d.key == "raw":
        target = {"type": "raw", "device": d.value}
        note = (
            "kdump-mkinitrd writes a header, the kernel log and the dump to the device; "
            "`register` copies a dump out at the next boot as kdumpctl does"
        )
        kind = "changed"
    elif d.key == "nfs":
        target, note, kind = {"type": "nfs", "export": d.value}, "", "mapped"
    elif d.key == "ssh":
        target = {"type": "ssh", "host": d.value, "identity": sshkey.value if sshkey else _SSH_KEY}
        note = (
            "the server's host key must be in the target's known_hosts (`kdump-mkinitrd "
            "ssh-setup` pins it), as kdump-utils' StrictHostKeyChecking=yes needs it in "
            "root's; the dump is saved as vmcore, not vmcore.flat"
        )
        kind = "changed"
    else:
        draft.drop(
            d.key,
            line,
            f"a {d.key} target is not supported (disk targets mount "
            f"{', '.join(FSTYPES)}); use a disk, nfs or ssh target",
        )
        return None
    why = translate.target_problem(target)
    if why:
        draft.drop(d.key, line, why)
        return None
    draft.map(d.key, line, {"targets[0]": target}, note, kind=kind)
    if sshkey is not None and target["type"] == "ssh":
        draft.map("sshkey", sshkey.where, {"targets[0].identity": sshkey.value})
    return target


def _local(draft: Draft, path: str, path_line: Line | None) -> dict[str, Any] | None:
    """No target line: the folder on the filesystem that holds it (mkdumprd finds it so)."""
    if path_line is None:
        return None  # /var/crash: our default target is the same
    target, note = translate.local_folder(path)
    if target is None:
        draft.drop("path", path_line, note)
    elif not target:
        draft.map("path", path_line, {}, note)
    else:
        draft.change("path", path_line, {"targets[0]": target}, note)
    return target or None


def _hooks(draft: Draft, given: dict[str, kdumpconf.Directive], folder: Path) -> None:
    """kdump_pre, then the executables in kdump/pre.d beside kdump.conf; the ones in post.d,
    then kdump_post (kdump-utils' order)."""
    for stage in ("pre", "post"):
        found = _hook_folder(folder / f"{stage}.d")
        directive = given.get(f"kdump_{stage}")
        items: list[tuple[str, Line, str, Kind, str]] = []
        for executable in found:
            note = (
                "run after kdump_pre; a failure is logged and the dump goes on, as in kdump-utils"
                if stage == "pre"
                else "gets the dump's status as $1, as in kdump-utils"
            )
            line = Line(str(executable), 1, f"an executable in {folder / f'{stage}.d'}")
            items.append((f"{stage}.d/{executable.name}", line, str(executable), "mapped", note))
        if directive is not None:
            line = directive.where
            if stage == "pre":
                kind: Kind = "changed"
                note = (
                    "kdump-utils skips the dump and runs final_action when kdump_pre fails; "
                    "kdump-mkinitrd logs the failure and still saves the dump"
                )
            else:
                kind, note = "mapped", "gets the dump's status as $1, as in kdump-utils"
            hook = (directive.key, line, directive.value, kind, note)
            items = [hook, *items] if stage == "pre" else [*items, hook]
        for key, line, program, kind, note in items:
            if not program.startswith("/"):
                draft.drop(key, line, f"{program!r} is not an absolute path")
                continue
            # kdump-utils runs the whole value as one program path, with no arguments.
            draft.map(
                key, line, {draft.add(f"hooks.{stage}", program, line): program}, note, kind=kind
            )


def _hook_folder(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and os.access(p, os.X_OK))


def _collector(
    draft: Draft, d: kdumpconf.Directive, line: Line, target: dict[str, Any] | None
) -> None:
    words = d.value.split()
    program = posixpath.basename(words[0]) if words else ""
    if program == "makedumpfile":
        streamed = target is not None and target["type"] in ("ssh", "raw")
        note = (
            "mkdumprd refuses to build for an ssh or raw target without -F; kdump-mkinitrd "
            "adds -F itself"
            if streamed and "-F" not in words
            else ""
        )
        translate.apply_collector(draft, d.key, line, words[1:], note)
    elif program in ("cp", "scp", "dd", "cat"):
        draft.change(
            d.key,
            line,
            {"capture.collector": "native", "capture.dump_level": 1},
            f"{program} copies all of memory; kdump-mkinitrd's native writer copies "
            "it as ELF leaving out only zero pages",
        )
    else:
        draft.drop(
            d.key,
            line,
            f"{program or 'an empty collector'} is not a collector "
            "kdump-mkinitrd runs (makedumpfile, or its native ELF writer)",
        )


def _failure(
    draft: Draft, d: kdumpconf.Directive, line: Line, target: dict[str, Any] | None, path: str
) -> None:
    old = "the old spelling of failure_action" if d.key == "default" else ""
    if d.value in _ACTIONS:
        note = "a busybox shell on the console; exiting it reboots" if d.value == "shell" else ""
        draft.map(
            d.key,
            line,
            {"failure_action": d.value},
            "; ".join(x for x in (note, old) if x),
            kind="changed" if d.value == "shell" else "mapped",
        )
        return
    if d.value != "dump_to_rootfs":
        draft.drop(
            d.key,
            line,
            f"expected reboot, halt, poweroff, shell or dump_to_rootfs; got {d.value!r}",
        )
        return
    if target is None:
        draft.map(
            d.key,
            line,
            {},
            "; ".join(
                x
                for x in (
                    f"with no target line the dump goes to the filesystem holding {path} already",
                    old,
                )
                if x
            ),
        )
        return
    try:
        root, where = defaulttarget.locate("/", translate.host_mounts())
    except defaulttarget.Unsuitable as exc:
        draft.drop(
            d.key, line, f"the root filesystem cannot be a second target: {exc}; configure one"
        )
        return
    second = translate.disk_values(root, path)
    n = len(draft.data.get("targets", []))
    draft.change(
        d.key,
        line,
        {f"targets[{n}]": second},
        f"a second target: {path} on the root filesystem, pinned to {where} on this "
        "host now; when it fails too, failure_action reboot runs" + (f"; {old}" if old else ""),
    )


_SYSCONFIG_KEYS = frozenset(
    {
        *_SYSCONFIG_PLUMBING,
        *_LOG_LEVELS,
        "KDUMP_COMMANDLINE_APPEND",
        "KDUMP_COMMANDLINE_REMOVE",
        "VMCORE_CREATION_NOTIFICATION",
    }
)


def _sysconfig(source: SourceFile, draft: Draft) -> None:
    for key, (value, line) in translate.read_shell_file(source, draft, _SYSCONFIG_KEYS).items():
        if key == "KDUMP_COMMANDLINE_APPEND":
            translate.apply_cmdline_append(draft, key, line, value.split())
        elif key == "KDUMP_COMMANDLINE_REMOVE":
            translate.apply_cmdline_remove(draft, key, line, value.split())
        elif key in _SYSCONFIG_PLUMBING:
            if value == _SYSCONFIG_PLUMBING[key]:
                draft.map(key, line, {}, "kdumpctl's own set-up, which kdump-mkinitrd does itself")
            elif key == "KEXEC_ARGS" and value in ("", "--kexec-file-syscall"):
                draft.map(key, line, {}, "kdump-mkinitrd loads with kexec_file_load first")
            else:
                draft.drop(
                    key,
                    line,
                    f"kdumpctl's {key} has no counterpart: kdump-mkinitrd "
                    "builds for a kernel with `build --kver` and derives the command "
                    "line from the running one",
                )
        elif key in _LOG_LEVELS:
            draft.map(
                key,
                line,
                {},
                "kdumpctl's logging; kdump-mkinitrd logs to the console "
                "and to the init log kept beside the dump",
            )
        elif key == "VMCORE_CREATION_NOTIFICATION":
            draft.map(
                key,
                line,
                {},
                "kdumpctl's notice of a new dump at boot; kdump-mkinitrd's "
                "register announces new dumps at boot too",
            )
        else:
            draft.drop(key, line, "not a setting kdump-utils reads")
