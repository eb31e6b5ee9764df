"""SUSE's kdump: /etc/sysconfig/kdump, a shell file whose KDUMP_SAVEDIR names the targets as
URLs (file://, nfs://, ssh://, sftp://, ...).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from kdump_mkinitrd.importing import translate
from kdump_mkinitrd.importing.draft import EMPTY, Draft, Kind, Line
from kdump_mkinitrd.importing.sources import SourceFile, only_one

NAME = "suse"
TITLE = "SUSE kdump"
FILES = (Path("/etc/sysconfig/kdump"),)

_FORMATS = {"compressed": "zlib", "lzo": "lzo", "snappy": "snappy", "zstd": "zstd"}
_YES = ("yes", "true", "1")
_NO = ("no", "false", "0")
_NETWORK_KEYS = ("KDUMP_NETCONFIG", "KDUMP_NET_TIMEOUT")

# Keys with nothing to carry when they hold one of these values; else why not.
_NEUTRAL: dict[str, tuple[tuple[str, ...], str, str]] = {
    "KDUMP_KERNELVER": (
        ("",),
        "the capture kernel is the one the image is built for",
        "a kernel of your choosing is built for with `build --kver`",
    ),
    "KDUMP_COMMANDLINE": (
        ("",),
        "kdump-mkinitrd derives the capture command line from the running one",
        "the whole command line cannot be replaced; change it "
        "with cmdline.append and cmdline.remove",
    ),
    "KEXEC_OPTIONS": (("",), "", "kdump-mkinitrd takes no extra kexec arguments"),
    "KDUMP_VERBOSE": (
        (),
        "SUSE's logging; kdump-mkinitrd logs to the console and to the init "
        "log kept beside the dump",
        "",
    ),
    "KDUMPTOOL_FLAGS": ((), "deprecated in SUSE kdump, which ignores it", ""),
    "KDUMP_CONTINUE_ON_ERROR": (
        ("true", "yes", "1", ""),
        "kdump-mkinitrd goes on after an error: the next target, the static capture",
        "SUSE opens a debug shell at each error; kdump-mkinitrd goes on "
        "to the next target and runs failure_action (shell opens one) "
        "when none takes the dump",
    ),
    "KDUMP_COPY_KERNEL": ((), "deprecated in SUSE kdump, which ignores it", ""),
    "KDUMP_FADUMP": (
        ("no", "false", ""),
        "",
        "firmware-assisted dump (powerpc) is not supported; kdump-mkinitrd does kdump",
    ),
    "KDUMP_FADUMP_SHELL": (
        ("no", "false", ""),
        "",
        "firmware-assisted dump (powerpc) is not supported",
    ),
    "KDUMP_AUTO_RESIZE": (
        ("no", "false", "0", ""),
        "",
        "kdump-mkinitrd never changes the "
        "reservation; `kdump-mkinitrd estimate` says what to reserve",
    ),
    "KDUMP_CRASHKERNEL": (
        ("",),
        "",
        "kdump-mkinitrd never changes crashkernel=: keep the boot "
        "loader's as SUSE set it; `kdump-mkinitrd estimate` says what to "
        "reserve",
    ),
    "KDUMP_UPDATE_BOOTLOADER": (
        ("no", "false", "0", ""),
        "",
        "kdump-mkinitrd never changes the boot loader's crashkernel=",
    ),
    "MAKEDUMPFILE_OPTIONS": (
        ("",),
        "",
        "kdump-mkinitrd runs makedumpfile with the dump level and compression only",
    ),
    "KDUMP_TRANSFER": (("",), "", "deprecated in SUSE kdump; there is no counterpart"),
}
_NOTIFY = re.compile(r"KDUMP_(?:SMTP|NOTIFICATION)_[A-Z_]+")


KEYS = frozenset(
    {
        *_NEUTRAL,
        "KDUMP_SAVEDIR",
        "KDUMP_SSH_IDENTITY",
        "KDUMP_DUMPLEVEL",
        "KDUMP_DUMPFORMAT",
        "KDUMP_KEEP_OLD_DUMPS",
        "KDUMP_FREE_DISK_SIZE",
        "KDUMP_PRESCRIPT",
        "KDUMP_POSTSCRIPT",
        "KDUMP_REQUIRED_PROGRAMS",
        "KDUMP_COMMANDLINE_APPEND",
        "KDUMP_IMMEDIATE_REBOOT",
        "KDUMP_NETCONFIG",
        "KDUMP_NET_TIMEOUT",
        "KDUMP_HOST_KEY",
        "KDUMP_CPUS",
    }
)


def present(root: Path) -> list[Path]:
    """/etc/sysconfig/kdump alone (kdump-utils keeps one too, beside /etc/kdump.conf)."""
    sysconfig = root / FILES[0].relative_to("/")
    if (root / "etc/kdump.conf").exists() or not sysconfig.is_file():
        return []
    return [sysconfig]


def arrange(files: list[SourceFile]) -> list[SourceFile]:
    return only_one(files, TITLE)


def translate_files(files: list[SourceFile], draft: Draft) -> None:
    (source,) = files
    values = translate.read_shell_file(source, draft, KEYS)
    targets = _targets(values, draft)
    networked = any(t["type"] in ("nfs", "ssh") for t in targets)
    for key, (value, line) in values.items():
        if key in ("KDUMP_SAVEDIR", "KDUMP_SSH_IDENTITY", "KDUMP_DUMPLEVEL", "KDUMP_DUMPFORMAT"):
            continue
        if value == "":
            draft.map(key, line, {}, EMPTY)
        elif key in _NETWORK_KEYS and not networked:
            draft.map(key, line, {}, "no target needs the network")
        elif key in _NEUTRAL:
            neutral, same, why = _NEUTRAL[key]
            if not neutral or value in neutral:
                draft.map(key, line, {}, same or "the default: nothing to carry over")
            else:
                draft.drop(key, line, why)
        elif _NOTIFY.fullmatch(key):
            if value:
                draft.drop(
                    key,
                    line,
                    "e-mail notification is not supported; a post hook (hooks.post) can send one",
                )
            else:
                draft.map(key, line, {}, EMPTY)
        else:
            _setting(draft, key, line, value)
    _dump(draft, values)


def _setting(draft: Draft, key: str, line: Line, value: str) -> None:
    if key == "KDUMP_KEEP_OLD_DUMPS":
        _keep(draft, key, line, value)
    elif key == "KDUMP_FREE_DISK_SIZE":
        if value == "0":
            draft.map(key, line, {"capture.min_free": 0}, "no check")
        elif value.isdigit():
            draft.change(
                key,
                line,
                {"capture.min_free": int(value)},
                "SUSE checks the space left after the dump and deletes the new dump "
                "when it is short; kdump-mkinitrd refuses a disk target with less free "
                "space before it writes anything",
            )
        else:
            draft.drop(key, line, f"{value!r} is not a number of megabytes")
    elif key == "KDUMP_CPUS":
        if value in ("", "1"):
            draft.map(key, line, {}, "kdump-mkinitrd boots the capture kernel with nr_cpus=1")
        else:
            draft.change(
                key,
                line,
                {},
                f"SUSE boots the capture kernel with nr_cpus={value} "
                "and threads makedumpfile over them; kdump-mkinitrd boots one CPU "
                "(each costs crash memory): add nr_cpus=N to cmdline.append for more",
            )
    elif key in ("KDUMP_PRESCRIPT", "KDUMP_POSTSCRIPT"):
        _hook(draft, key, line, value)
    elif key == "KDUMP_REQUIRED_PROGRAMS":
        values = {draft.add("binaries", p, line): p for p in value.split()}
        draft.map(key, line, values, "" if values else EMPTY)
    elif key == "KDUMP_COMMANDLINE_APPEND":
        translate.apply_cmdline_append(draft, key, line, value.split())
    elif key == "KDUMP_IMMEDIATE_REBOOT":
        if value.lower() in (*_YES, ""):
            draft.map(key, line, {"final_action": "reboot"})
        elif value.lower() in _NO:
            draft.change(
                key,
                line,
                {"final_action": "shell"},
                "SUSE stays in the capture "
                "system; kdump-mkinitrd starts a shell on the console, whose exit "
                "reboots",
            )
        else:
            draft.drop(key, line, f"expected yes or no; got {value!r} (SUSE warns and reboots)")
    elif key == "KDUMP_NETCONFIG":
        _netconfig(draft, key, line, value)
    elif key == "KDUMP_NET_TIMEOUT":
        if value.isdigit() and 1 <= int(value) <= 3600:
            draft.change(
                key,
                line,
                {"network.timeout": int(value)},
                "SUSE pings the server "
                "this long; kdump-mkinitrd waits this long for the link, then for an "
                "address",
            )
        elif value == "0":
            draft.change(
                key,
                line,
                {},
                "SUSE does not ping the server; kdump-mkinitrd still "
                "waits for the network (network.timeout, 30 s)",
            )
        else:
            draft.drop(key, line, f"expected seconds from 1 to 3600; got {value!r}")
    elif key == "KDUMP_HOST_KEY":
        if value == "*":
            draft.drop(
                key,
                line,
                "SUSE then accepts any host key; kdump-mkinitrd always checks "
                "it against the target's known_hosts (`kdump-mkinitrd ssh-setup` pins "
                "it)",
            )
        elif value:
            draft.drop(
                key,
                line,
                "kdump-mkinitrd pins host keys in the ssh target's "
                "known_hosts file: `kdump-mkinitrd ssh-setup USER@HOST` writes it, or add "
                f"the line `HOST {value}` there",
            )
        else:
            draft.map(key, line, {}, "empty: kdump-mkinitrd pins the host key in known_hosts")
    else:
        draft.drop(key, line, "not a setting SUSE kdump reads")


def _targets(values: dict[str, tuple[str, Line]], draft: Draft) -> list[dict[str, Any]]:
    made: list[dict[str, Any]] = []
    identity = values.get("KDUMP_SSH_IDENTITY")
    # Relative names are under root's ~/.ssh; SUSE offers every key, ssh takes the first.
    keys = [
        k if k.startswith("/") else f"/root/.ssh/{k}"
        for k in (identity[0].split() if identity else [])
    ]
    if "KDUMP_SAVEDIR" not in values:
        return made
    saved, line = values["KDUMP_SAVEDIR"]
    target, note, kind = _url(saved or "/var/crash")  # one URL, spaces and all
    if target and target["type"] == "ssh":
        if keys:
            target["identity"] = keys[0]
        else:
            note += (
                "; SUSE offers root's id_rsa, id_dsa, id_ecdsa and id_ed25519: the "
                "target uses the key `kdump-mkinitrd ssh-setup` writes"
            )
    why = translate.target_problem(target) if target else ""
    if target is None or why:
        draft.drop("KDUMP_SAVEDIR", line, why or note)
    elif not target:
        draft.map("KDUMP_SAVEDIR", line, {}, note)
    else:
        draft.map("KDUMP_SAVEDIR", line, {"targets[0]": target}, note, kind=kind)
        made.append(target)
    if identity is not None:
        ssh = [i for i, t in enumerate(draft.data.get("targets", [])) if t["type"] == "ssh"]
        if not ssh and identity[0]:
            draft.drop("KDUMP_SSH_IDENTITY", identity[1], "no ssh or sftp target")
        elif not keys:
            draft.map("KDUMP_SSH_IDENTITY", identity[1], {}, EMPTY)
        else:
            into = {f"targets[{i}].identity": keys[0] for i in ssh}
            extra = f"only the first key is used ({keys[0]})" if len(keys) > 1 else ""
            draft.map(
                "KDUMP_SSH_IDENTITY",
                identity[1],
                into,
                extra,
                kind="changed" if extra else "mapped",
            )
    return made


def _url(url: str) -> tuple[dict[str, Any] | None, str, Kind]:
    """A target from one KDUMP_SAVEDIR URL: (target, note, kind); {} for the default folder,
    None (and why) when there is none. Schemes as SUSE reads them: any case, scp:// is
    sftp://, smb:// is cifs://."""
    if url.startswith("/"):
        url = "file://" + url
    parts = urlsplit(url)
    scheme = {"scp": "sftp", "smb": "cifs"}.get(parts.scheme.lower(), parts.scheme.lower())
    path = posixpath.normpath(unquote(parts.path) or "/")
    if scheme == "file":
        target, note = translate.local_folder(path)
        return target, note, "changed" if target else "mapped"
    if scheme == "nfs":
        if not parts.hostname:
            return None, f"{url}: no server", "dropped"
        return (
            {"type": "nfs", "export": f"{parts.hostname}:{path}", "path": "/"},
            "SUSE mounts the path (the export or a folder in it) and saves into it, as "
            "path: / does",
            "mapped",
        )
    if scheme in ("ssh", "sftp"):
        if not parts.hostname:
            return None, f"{url}: expected {scheme}://[USER@]HOST[:PORT]/PATH", "dropped"
        if parts.password:
            return (
                None,
                (
                    f"{scheme}:// with a password: kdump-mkinitrd logs in with a key only "
                    "(a password in the image is readable by anyone who can read it)"
                ),
                "dropped",
            )
        user = parts.username or "root"
        ssh: dict[str, Any] = {"type": "ssh", "host": f"{user}@{parts.hostname}", "path": path}
        if parts.port:
            ssh["port"] = parts.port
        note = (
            "the server's host key must be in the target's known_hosts (`kdump-mkinitrd "
            "ssh-setup` pins it)"
        )
        if scheme == "sftp":
            note = "written over ssh, not sftp: the server must let the user run a shell; " + note
        return ssh, note, "changed"
    return (
        None,
        (f"{scheme}:// targets are not supported; use a local folder (file://), nfs:// or ssh://"),
        "dropped",
    )


def _keep(draft: Draft, key: str, line: Line, value: str) -> None:
    if not re.fullmatch(r"-?[0-9]+", value) or int(value) < -1:
        draft.drop(key, line, f"expected -1, 0 or a number of dumps; got {value!r}")
        return
    n = int(value)
    if n == 0:
        draft.map(key, line, {"capture.keep": 0}, "keep every dump")
        return
    keep = 1 if n == -1 else n + 1
    draft.change(
        key,
        line,
        {"capture.keep": keep},
        f"SUSE keeps {max(n, 0)} old dumps and deletes the rest before it saves; "
        f"kdump-mkinitrd keeps {keep} (the new one too) and deletes the rest once the "
        "new dump is complete",
    )


def _dump(draft: Draft, values: dict[str, tuple[str, Line]]) -> None:
    """KDUMP_DUMPFORMAT and KDUMP_DUMPLEVEL together: raw and ELF become our native writer,
    which takes no dump level but 1."""
    native = False
    if "KDUMP_DUMPFORMAT" in values:
        value, line = values["KDUMP_DUMPFORMAT"]
        name = value.lower()
        if name in _FORMATS or name == "":
            draft.map(
                "KDUMP_DUMPFORMAT",
                line,
                {"capture.compression": _FORMATS.get(name, "zlib")},
                "SUSE writes it flattened; kdump-mkinitrd does not",
            )
        elif name in ("elf", "raw"):
            native = True
            what = "makedumpfile -E at the dump level" if name == "elf" else "cat /proc/vmcore"
            draft.change(
                "KDUMP_DUMPFORMAT",
                line,
                {"capture.collector": "native", "capture.dump_level": 1},
                f"SUSE's {value} is {what}; kdump-mkinitrd's native writer saves ELF "
                "leaving out zero pages only",
            )
        elif name == "none":
            draft.drop(
                "KDUMP_DUMPFORMAT",
                line,
                "no dump at all, only the kernel log: kdump-mkinitrd always saves a dump",
            )
        else:
            draft.change(
                "KDUMP_DUMPFORMAT",
                line,
                {"capture.compression": "zstd"},
                f"SUSE reads an unknown format {value!r} as zstd (makedumpfile -z)",
            )
    if "KDUMP_DUMPLEVEL" in values:
        value, line = values["KDUMP_DUMPLEVEL"]
        if native:
            draft.change(
                "KDUMP_DUMPLEVEL",
                line,
                {},
                "the native writer leaves out zero pages only (dump level 1)",
            )
        elif re.fullmatch(r"[0-9]+", value) and int(value) <= 31:
            draft.map("KDUMP_DUMPLEVEL", line, {"capture.dump_level": int(value)})
        else:
            draft.drop(
                "KDUMP_DUMPLEVEL",
                line,
                f"expected a dump level from 0 to 31; got {value!r} (SUSE then dumps at level 0)",
            )


def _hook(draft: Draft, key: str, line: Line, value: str) -> None:
    if not value:
        draft.map(key, line, {}, EMPTY)
        return
    item, why = translate.hook(value)
    if item is None:
        draft.drop(key, line, why)
        return
    stage = "pre" if key == "KDUMP_PRESCRIPT" else "post"
    if stage == "pre":
        draft.map(
            key,
            line,
            {draft.add("hooks.pre", item, line): item},
            "a failure is logged and the dump still runs, as in SUSE",
        )
    else:
        draft.change(
            key,
            line,
            {draft.add("hooks.post", item, line): item},
            "it also gets the dump's status as its last argument",
        )


def _netconfig(draft: Draft, key: str, line: Line, value: str) -> None:
    """`auto` or `IFACE:MODE`, either with `:force` (network for local targets too)."""
    spec = value.removesuffix(":force")
    forced = "; :force (network for local targets too) has no counterpart" if spec != value else ""
    if spec in ("auto", ""):
        draft.change(
            key,
            line,
            {},
            "SUSE copies the configuration of the interface of the "
            "default route; kdump-mkinitrd asks DHCP on the first interface unless "
            "the network section says otherwise" + forced,
        )
        return
    iface, _, mode = spec.partition(":")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", iface):
        draft.drop(key, line, f"{iface!r} is not an interface name")
    elif mode in ("dhcp", "dhcp4"):
        draft.map(
            key,
            line,
            {"network.interface": iface},
            "DHCP on this interface" + forced,
            kind="changed" if forced else "mapped",
        )
    elif mode == "auto":
        draft.change(
            key,
            line,
            {"network.interface": iface},
            "DHCP on this interface; SUSE guesses the mode from NetworkManager or wicked" + forced,
        )
    elif mode == "static":
        draft.drop(
            key,
            line,
            "SUSE copies the interface's current address; give it in the "
            f"network section: interface: {iface}, dhcp: false, address, gateway, dns",
        )
    else:
        draft.drop(
            key,
            line,
            f"{mode or 'no mode'}: kdump-mkinitrd's capture network is IPv4, "
            "by DHCP or a static address",
        )
