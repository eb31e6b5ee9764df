"""Debian's and Ubuntu's kdump-tools: /etc/default/kdump-tools, a shell file that kdump-config
sources. Meanings as kdump-tools 1.8 gives them (its kdump-config and its shipped default).
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

from kdump_mkinitrd.importing import translate
from kdump_mkinitrd.importing.draft import EMPTY, Draft, Kind, Line
from kdump_mkinitrd.importing.sources import SourceFile, only_one

NAME = "kdump-tools"
TITLE = "Debian's kdump-tools"
FILES = (Path("/etc/default/kdump-tools"),)

# kdump-config's own defaults for the keys whose meaning depends on one another.
_COREDIR = "/var/crash"
_SSH_KEY = "/root/.ssh/kdump_id_rsa"
_WHOLE_FILE = ("bzip2", "gzip", "lz4", "xz")
_ACTIONS = {
    "reboot": "reboot",
    "poweroff": "poweroff",
    "halt": "halt",
    "sh": "shell",
    "bash": "shell",
    "ash": "shell",
    "dash": "shell",
}

# Keys with nothing to carry over, and why; a value other than the peer's default is reported.
_PLUMBING = {
    "KDUMP_KERNEL": (
        "/var/lib/kdump/vmlinuz",
        "the capture kernel is the kernel the image is "
        "built for (build --kver); kdump-tools' link to it has no counterpart",
    ),
    "KDUMP_INITRD": (
        "/var/lib/kdump/initrd.img",
        "kdump-mkinitrd builds and loads its own capture image",
    ),
}
_NOT_CARRIED = {
    "KDUMP_KEXEC_ARGS": "kdump-mkinitrd loads with kexec_file_load, or kexec-tools' kexec_load "
    "where a kernel lacks it; it takes no extra kexec arguments",
    "KDUMP_CMDLINE": "kdump-mkinitrd derives the capture command line from the running one; "
    "change it with cmdline.append and cmdline.remove",
    "FTP": "FTP is not supported: it sends the dump, and any password, unencrypted; use an ssh "
    "or nfs target",
    "FTP_USER": "FTP is not supported",
    "FTP_PASSWORD": "FTP is not supported (and a password in a capture image is readable by "
    "anyone who can read the image)",
    "FTP_PORT": "FTP is not supported",
    "NFS_MOUNT_RETRY": "kdump-mkinitrd retries the mount until device_timeout runs out",
    "SSH_KDUMP_RETRY": "kdump-mkinitrd waits for the network for network.timeout seconds",
    "KDUMP_SYSCTL": "sysctls for the first kernel (when to panic) are the admin's, not the "
    "capture image's",
}


# Keys carried over with the targets they make.
_WITH_TARGETS = ("NFS", "SSH", "SSH_KEY", "NFS_TIMEO", "NFS_RETRANS")
KEYS = frozenset(
    {
        *_PLUMBING,
        *_NOT_CARRIED,
        *_WITH_TARGETS,
        "KDUMP_COREDIR",
        "USE_KDUMP",
        "MAKEDUMP_ARGS",
        "KDUMP_COMPRESSION",
        "KDUMP_NUM_DUMPS",
        "KDUMP_DUMP_DMESG",
        "KDUMP_FAIL_CMD",
        "KDUMP_CMDLINE_APPEND",
        "HOSTTAG",
    }
)


def present(root: Path) -> list[Path]:
    return [root / f.relative_to("/") for f in FILES if (root / f.relative_to("/")).is_file()]


def arrange(files: list[SourceFile]) -> list[SourceFile]:
    return only_one(files, TITLE)


def translate_files(files: list[SourceFile], draft: Draft) -> None:
    (source,) = files
    _translate(translate.read_shell_file(source, draft, KEYS), draft)


def _translate(values: dict[str, tuple[str, Line]], draft: Draft) -> None:
    coredir = values["KDUMP_COREDIR"][0] if "KDUMP_COREDIR" in values else ""
    coredir = coredir or _COREDIR  # empty is unset to kdump-config
    targets = _targets(values, draft, coredir)
    for key, (value, line) in values.items():
        if key == "KDUMP_COREDIR" or (value and key in _WITH_TARGETS):
            continue  # carried with the targets
        if value == "":
            draft.map(key, line, {}, EMPTY)
        elif key == "USE_KDUMP":
            if value == "1":
                draft.map(
                    key,
                    line,
                    {},
                    "kdump-mkinitrd.service loads the capture kernel at boot once enabled",
                )
            else:
                draft.drop(
                    key,
                    line,
                    "the importer does not switch kdump off: leave "
                    "kdump-mkinitrd.service disabled to keep it off",
                )
        elif key in _PLUMBING:
            default, why = _PLUMBING[key]
            if value == default:
                draft.map(key, line, {}, why)
            else:
                draft.drop(
                    key,
                    line,
                    f"{why}; a kernel of your choosing is built for with "
                    "`kdump-mkinitrd build --kver`",
                )
        elif key in _NOT_CARRIED:
            draft.drop(key, line, _NOT_CARRIED[key])
        elif key == "MAKEDUMP_ARGS":
            translate.apply_collector(draft, key, line, value.split(), _FLAT)
        elif key == "KDUMP_COMPRESSION" and value not in _WHOLE_FILE:
            draft.map(
                key,
                line,
                {},
                f"kdump-tools refuses {value!r} and compresses nothing "
                "beyond makedumpfile's own compression",
            )
        elif key == "KDUMP_COMPRESSION":
            draft.change(
                key,
                line,
                {},
                f"kdump-tools compresses the whole dump file with "
                f"{value} after makedumpfile; kdump-mkinitrd compresses each page "
                "inside the dump (capture.compression) instead, so the dump opens in "
                "crash and makedumpfile as it is, with no unpacking",
            )
        elif key == "KDUMP_NUM_DUMPS":
            _keep(draft, key, line, value, any(t["type"] != "disk" for t in targets))
        elif key == "KDUMP_DUMP_DMESG":
            if value == "1":
                draft.map(key, line, {}, "kdump-mkinitrd always saves vmcore-dmesg.txt")
            else:
                draft.change(
                    key,
                    line,
                    {},
                    "kdump-mkinitrd always saves the kernel log (vmcore-dmesg.txt) beside the dump",
                )
        elif key == "KDUMP_FAIL_CMD":
            _fail_cmd(draft, key, line, value)
        elif key == "KDUMP_CMDLINE_APPEND":
            translate.apply_cmdline_append(draft, key, line, value.split())
        elif key == "HOSTTAG":
            _hosttag(draft, key, line, value, bool(targets))
        else:
            draft.drop(key, line, "not a kdump-tools setting that kdump-config reads")


_FLAT = (
    "kdump-tools adds -F, so its dumps are flattened (read after makedumpfile -R); "
    "kdump-mkinitrd's are not, except on the way to an ssh target"
)


def _targets(
    values: dict[str, tuple[str, Line]], draft: Draft, coredir: str
) -> list[dict[str, Any]]:
    """kdump-config saves to SSH, then NFS; or, with neither, to KDUMP_COREDIR locally."""
    made: list[dict[str, Any]] = []
    values = {k: v for k, v in values.items() if v[0]}  # empty is unset to kdump-config
    remote = [k for k in ("SSH", "NFS") if k in values]
    coredir_line = values.get("KDUMP_COREDIR", (None, None))[1]
    also = "; kdump-tools saves to SSH and to NFS, kdump-mkinitrd to the first that takes it"
    for key in remote:
        value, line = values[key]
        n = len(draft.data.get("targets", []))
        path = f"targets[{n}]"
        if key == "SSH":
            keyfile = values.get("SSH_KEY", (_SSH_KEY, None))
            target = {"type": "ssh", "host": value, "path": coredir, "identity": keyfile[0]}
            note = (
                "the server's host key must be in the target's known_hosts (`kdump-mkinitrd "
                "ssh-setup` pins it), as kdump-tools needs it in root's"
            )
            if _refused(draft, key, line, target):
                continue
            draft.change(key, line, {path: target}, note + (also if len(remote) > 1 else ""))
            if keyfile[1] is not None:
                draft.map("SSH_KEY", keyfile[1], {f"{path}.identity": keyfile[0]})
            else:
                draft.set(f"{path}.identity", keyfile[0], line)
        else:
            target = {"type": "nfs", "export": value, "path": "/"}
            if _refused(draft, key, line, target):
                continue
            note = (
                "kdump-tools mounts the export on KDUMP_COREDIR and saves into its top "
                "folder, as path: / does"
            )
            draft.map(key, line, {path: target}, note + (also if len(remote) > 1 else ""))
            options = [
                f"{opt}={values[k][0]}"
                for k, opt in (("NFS_TIMEO", "timeo"), ("NFS_RETRANS", "retrans"))
                if k in values
            ]
            for k in ("NFS_TIMEO", "NFS_RETRANS"):
                if k in values:
                    draft.map(k, values[k][1], {f"{path}.mount_options": ",".join(options)})
        if coredir_line is not None and key == "SSH":
            draft.origins.setdefault(f"{path}.path", []).append(coredir_line)
        made.append(target)
    carried = {o.key for o in draft.outcomes}
    for extra, needs in (("SSH_KEY", "SSH"), ("NFS_TIMEO", "NFS"), ("NFS_RETRANS", "NFS")):
        if extra in values and extra not in carried:
            draft.drop(extra, values[extra][1], f"no {needs} target")
    if coredir_line is not None:
        if remote:
            what = "the folder on the ssh server" if "SSH" in remote else "where NFS is mounted"
            draft.map("KDUMP_COREDIR", coredir_line, {}, f"{what}, carried with the target")
        else:
            _local(draft, coredir_line, coredir)
    return made


def _refused(draft: Draft, key: str, line: Line, target: dict[str, Any]) -> bool:
    why = translate.target_problem(target)
    if why:
        draft.drop(key, line, why)
    return bool(why)


def _local(draft: Draft, line: Line, coredir: str) -> None:
    target, note = translate.local_folder(posixpath.normpath(coredir))
    if target is None:
        draft.drop("KDUMP_COREDIR", line, note)
    elif not target:
        draft.map("KDUMP_COREDIR", line, {}, note)
    else:
        n = len(draft.data.get("targets", []))
        draft.change("KDUMP_COREDIR", line, {f"targets[{n}]": target}, note)


def _keep(draft: Draft, key: str, line: Line, value: str, remote: bool) -> None:
    if not value.isdigit():
        draft.drop(key, line, f"{value!r} is not a number of dumps")
        return
    note = (
        "kdump-tools purges only local dumps; kdump-mkinitrd keeps at most this many on "
        "every target"
        if remote
        else ""
    )
    kind: Kind = "changed" if remote and value != "0" else "mapped"
    draft.map(key, line, {"capture.keep": int(value)}, note, kind=kind)


def _fail_cmd(draft: Draft, key: str, line: Line, value: str) -> None:
    # kdump-tools runs "$KDUMP_FAIL_CMD" unquoted: split into words, no shell syntax at all.
    words = value.split()
    action = _ACTIONS.get(posixpath.basename(words[0])) if words else None
    if action is None:
        draft.drop(
            key,
            line,
            f"{value!r} is a command; failure_action is reboot, poweroff, "
            "halt or shell: for anything else write a post hook (hooks.post), which runs "
            "with status 1 when no target took the dump",
        )
        return
    rest = " ".join(words[1:])
    note = f"ignored {rest!r}: kdump-mkinitrd forces the action itself" if rest else ""
    if action == "shell":
        note = "a busybox shell on the console; exiting it reboots"
        draft.change(key, line, {"failure_action": action}, note)
        return
    draft.map(key, line, {"failure_action": action}, note)


def _hosttag(draft: Draft, key: str, line: Line, value: str, remote: bool) -> None:
    # kdump-config reads anything but "hostname" as ip.
    if value == "hostname":
        draft.map(
            key,
            line,
            {},
            "kdump-mkinitrd names dump folders HOST-DATE with the host name (capture.hostname)",
        )
    else:
        draft.change(
            key,
            line,
            {},
            "kdump-mkinitrd names dump folders HOST-DATE with the host "
            "name (capture.hostname), not the IP address"
            + ("" if remote else "; kdump-tools uses it only for remote targets"),
        )
