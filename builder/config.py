"""The YAML config: loaded with line numbers, checked against one declarative schema, frozen.

Every error names the file, the line and the key, so an admin can fix it without guessing.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kdump_mkinitrd.errors import KdumpError

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
    maximum: int | None = None  # what the capture kernel's tools and busybox sh can take
    shorthand: str | None = None  # a bare string item stands for {shorthand: string}


SSH_CLIENTS = ("openssh", "dropbear")

TARGET_SCHEMA: dict[str, Field] = {
    "type": Field(str, required=True, choices=TARGET_TYPES),
    "device": Field(str),
    "fstype": Field(str, choices=FSTYPES),
    "path": Field(str, default="/var/crash", absolute_path=True),
    "mount_options": Field(str, default="defaults"),
    # ssh targets: user@host, its port, and the key and pinned host keys built into the image
    # (defaults: what `kdump-mkinitrd ssh-setup` writes).
    "host": Field(str),
    "port": Field(int, minimum=1),
    "identity": Field(str, absolute_path=True),
    "known_hosts": Field(str, absolute_path=True),
    # The client in the image: OpenSSH's ssh, or dropbear's dbclient (a far smaller image).
    "client": Field(str, choices=SSH_CLIENTS),
    # nfs targets: server:/export; the dump goes to `path` below the export.
    "export": Field(str),
    # raw targets: where `register` at boot copies a complete dump out of the device.
    "recover_to": Field(str, absolute_path=True),
}
DEFAULT_RECOVER_TO = "/var/crash"

# Where `ssh-setup` keeps the key and the pinned host keys, and where the image holds them.
SSH_DIR = "/etc/kdump-mkinitrd/ssh"
SSH_IDENTITY = f"{SSH_DIR}/id_ed25519"
SSH_KNOWN_HOSTS = f"{SSH_DIR}/known_hosts"
NETWORK_TARGET_TYPES = ("ssh", "nfs")
# user@host for ssh: nothing that ssh could take for an option, no shell or ssh syntax.
_SSH_HOST = re.compile(
    r"(?:[A-Za-z0-9_][A-Za-z0-9._-]*@)?(?:[A-Za-z0-9][A-Za-z0-9.-]*|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)"
)
# server:/export for nfs: a host name or an IPv4 address (the capture network is IPv4 only).
_NFS_SERVER = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")
_MOUNT_OPTIONS = re.compile(r"[A-Za-z0-9_.=:/-]+(?:,[A-Za-z0-9_.=:/-]+)*")
_MAC = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")
_IFNAME = re.compile(r"[A-Za-z0-9_.:-]{1,15}")
_CONTROL = re.compile(r"[\x01-\x1f\x7f]")
# capture.hostname names each dump's folder (HOST-DATE) on every target and in recover-raw:
# one path component, what a host name may hold.
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?!\.)){0,63}")
_DEV_PATH = re.compile(r"/dev/[A-Za-z0-9._:+@=-]+(?:/[A-Za-z0-9._:+@=-]+)*")
_UUID = re.compile(r"[0-9A-Fa-f]+(?:-[0-9A-Fa-f]+)*")
# A GPT partition GUID, or an MBR disk signature and partition number: SSSSSSSS-NN.
_PARTUUID = re.compile(r"[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{2,3}|[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-"
                       r"[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})")  # fmt: skip
_IPV4 = r"(?:(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])"

NETWORK_SCHEMA: dict[str, Field] = {
    "interface": Field(str),  # by name (eth0, ens3), or:
    "mac": Field(str),  # by MAC address; neither: the first interface that is not loopback
    "dhcp": Field(bool),  # default: true unless a static address is given
    "address": Field(str),  # static IPv4 address with prefix: 192.0.2.10/24
    "gateway": Field(str),
    "dns": Field(list, default=[], items=str),
    # Seconds for the link, then for an address.
    "timeout": Field(int, default=30, minimum=1, maximum=3600),
    "vlan": Field(int, minimum=1),  # 802.1Q VLAN id on top of the interface
}

FILE_SCHEMA: dict[str, Field] = {
    "src": Field(str, required=True, absolute_path=True),
    "dst": Field(str, absolute_path=True),
}

COMPRESSION_SCHEMA: dict[str, Field] = {
    "method": Field(str, default="zstd", choices=("zstd", "gzip", "none")),
    # Above 19 zstd needs a window larger than a capture kernel can afford to unpack.
    "level": Field(int, default=9, minimum=1, maximum=19),
    "threads": Field(int, default=0, minimum=-1, maximum=256),
}

CAPTURE_SCHEMA: dict[str, Field] = {
    # python: the Python stage does the careful work, the static init falls back on its own;
    # static: no interpreter in the image at all (smallest image).
    "stage": Field(str, default="python", choices=("python", "static")),
    # auto: makedumpfile when the build host has it, else our native ELF writer.
    "collector": Field(str, default="auto", choices=("auto", "makedumpfile", "native")),
    # makedumpfile's -d: a bit mask of five page kinds to leave out (0..31).
    "dump_level": Field(int, default=31, minimum=0, maximum=31),
    # auto: the best that makedumpfile supports (zstd, else lzo).
    "compression": Field(
        str, default="auto", choices=("auto", "zstd", "lzo", "zlib", "snappy", "none")
    ),
    "python": Field(str),  # interpreter to pack; default: the one running the builder
    "hostname": Field(str),  # names dump directories; default: the build host's name
    # Refuse a disk target with less free space (MB) than this before writing anything.
    "min_free": Field(int, default=0, minimum=0, maximum=1 << 32),
    # After a dump is saved, keep at most this many complete dumps there (0: keep all).
    "keep": Field(int, default=0, minimum=0, maximum=100_000),
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
    "device_timeout": Field(int, default=30, minimum=1, maximum=3600),
    "compression": Field(dict, default={}, schema=COMPRESSION_SCHEMA),
    "capture": Field(dict, default={}, schema=CAPTURE_SCHEMA),
    "cmdline": Field(dict, default={}, schema=CMDLINE_SCHEMA),
    "busybox": Field(str, default="/bin/busybox", absolute_path=True),
    "search_path": Field(str, default="/usr/sbin:/usr/bin:/sbin:/bin"),
    "firmware_root": Field(str, default="/lib/firmware", absolute_path=True),
    "network": Field(dict, default={}, schema=NETWORK_SCHEMA),
}


@dataclass(frozen=True)
class Target:
    type: str
    device: str | None
    fstype: str | None
    path: str
    mount_options: str
    host: str | None = None
    port: int | None = None
    identity: str | None = None
    known_hosts: str | None = None
    client: str | None = None
    export: str | None = None
    recover_to: str | None = None

    @property
    def name(self) -> str:
        """How logs and vmcore.json name the target."""
        if self.type == "ssh":
            return f"ssh:{self.host}:{self.path}"
        if self.type == "nfs":
            return f"nfs:{self.export} {self.path}"
        return f"{self.type}:{self.device}"

    @property
    def nfs_server(self) -> str:
        return (self.export or "").rpartition(":/")[0]

    @property
    def nfs_path(self) -> str:
        return "/" + (self.export or "").rpartition(":/")[2]


@dataclass(frozen=True)
class ExtraFile:
    src: str
    dst: str


# One dataclass per config section, built from the schema's validated values: the schema
# stays the one place for keys, types, defaults and errors; tests/test_config.py checks
# that each class's fields and defaults follow it. Lists become tuples, so a frozen config
# holds nothing mutable.


@dataclass(frozen=True)
class CompressionConfig:
    """How the image itself is compressed (`compression`)."""

    method: str = "zstd"
    level: int = 9
    threads: int = 0


@dataclass(frozen=True)
class CaptureConfig:
    """How the capture kernel saves a dump (`capture`)."""

    stage: str = "python"
    collector: str = "auto"
    dump_level: int = 31
    compression: str = "auto"
    python: str | None = None
    hostname: str | None = None
    min_free: int = 0
    keep: int = 0


@dataclass(frozen=True)
class CmdlineConfig:
    """What changes on the capture kernel's command line (`cmdline`)."""

    append: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class NetworkConfig:
    """How the capture init brings up its interface (`network`)."""

    interface: str | None = None
    mac: str | None = None
    dhcp: bool | None = None  # parse settles it: true unless a static address is given
    address: str | None = None
    gateway: str | None = None
    dns: tuple[str, ...] = ()
    timeout: int = 30
    vlan: int | None = None


_Section = TypeVar("_Section")


def _section(kind: type[_Section], values: dict[str, Any]) -> _Section:
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


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
    compression: CompressionConfig
    capture: CaptureConfig
    cmdline: CmdlineConfig
    busybox: str
    search_path: str
    firmware_root: str
    network: NetworkConfig = field(default_factory=NetworkConfig)
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
        if target["type"] == "ssh":
            _check_ssh_target(checker, key, target)
        else:
            for name in ("host", "port", "identity", "known_hosts", "client"):
                if target[name] is not None:
                    raise checker.fail(f"{key}.{name}", "only ssh targets take this key")
        if target["type"] == "nfs":
            _check_nfs_target(checker, key, target)
        elif target["export"] is not None:
            raise checker.fail(f"{key}.export", "only nfs targets take this key")
        if target["type"] != "raw" and target["recover_to"] is not None:
            raise checker.fail(f"{key}.recover_to", "only raw targets take this key")
        if target["device"]:
            _check_device(checker, f"{key}.device", target["device"])
        if target["type"] == "disk" and not _MOUNT_OPTIONS.fullmatch(target["mount_options"]):
            options = target["mount_options"]
            raise checker.fail(
                f"{key}.mount_options", f"expected option[,option...]; got {options!r}"
            )
        if target["type"] == "raw":
            # The dump goes onto the device itself: nothing to mount, no folder.
            for name in ("fstype", "mount_options", "path"):
                if f"{key}.{name}" in checker.lines:
                    raise checker.fail(f"{key}.{name}", f"a raw target takes no {name!r}")
    _check_capture(checker, data["capture"])


def _check_device(checker: _Checker, key: str, device: str) -> None:
    """A device spec the capture init can find: wait_for_device reads it as findfs's
    UUID=/LABEL=, a partition table's PARTUUID=, or a /dev node."""
    kind, _, value = device.partition("=")
    if device.startswith("/dev/"):
        ok = bool(_DEV_PATH.fullmatch(device)) and ".." not in device.split("/")
        expected = "a /dev path of plain names (no '..', no spaces)"
    elif kind == "UUID":
        ok, expected = bool(_UUID.fullmatch(value)), "UUID=hex digits and dashes"
    elif kind == "PARTUUID":
        ok = bool(_PARTUUID.fullmatch(value))
        expected = "PARTUUID=a GPT partition GUID or an MBR SSSSSSSS-NN"
    elif kind == "LABEL":
        # Host-only detection looks the label up as /dev/disk/by-label/LABEL.
        ok, expected = bool(value) and "/" not in value, "LABEL=a label without '/'"
    else:
        ok, expected = False, "UUID=, LABEL=, PARTUUID= or a /dev path"
    if not ok:
        raise checker.fail(key, f"expected {expected}; got {device!r}")


def _check_capture(checker: _Checker, capture: dict[str, Any]) -> None:
    hostname = capture["hostname"]
    if hostname is not None and not _HOSTNAME.fullmatch(hostname):
        raise checker.fail("capture.hostname", "names each dump's folder, so it must be a host "
                           "name: up to 64 letters, digits, '.', '_' or '-', starting with a "
                           f"letter or digit, no '..'; got {hostname!r}")  # fmt: skip
    if capture["collector"] == "native":
        # Our native writer copies memory as ELF and leaves out zero pages only (level 1).
        if capture["compression"] not in ("auto", "none"):
            method = capture["compression"]
            raise checker.fail("capture.compression", "the native collector writes uncompressed "
                               f"ELF; got {method!r} (use makedumpfile)")  # fmt: skip
        if "capture.dump_level" in checker.lines and capture["dump_level"] != 1:
            raise checker.fail("capture.dump_level", "the native collector leaves out zero pages "
                               f"only (dump_level 1); got {capture['dump_level']}")  # fmt: skip


def _check_ssh_target(checker: _Checker, key: str, target: dict[str, Any]) -> None:
    if not target["host"]:
        raise checker.fail(key, "an ssh target needs 'host' (user@host)")
    if not _SSH_HOST.fullmatch(target["host"]):
        raise checker.fail(f"{key}.host", f"expected user@host or host; got {target['host']!r}")
    for name in ("device", "fstype"):
        if target[name] is not None:
            raise checker.fail(f"{key}.{name}", "an ssh target takes no " + repr(name))
    if target["port"] is not None and target["port"] > 65535:
        raise checker.fail(f"{key}.port", f"must be at most 65535, got {target['port']}")
    if target["mount_options"] != "defaults":
        raise checker.fail(f"{key}.mount_options", "an ssh target mounts nothing")


def _check_nfs_target(checker: _Checker, key: str, target: dict[str, Any]) -> None:
    export = target["export"]
    if not export:
        raise checker.fail(key, "an nfs target needs 'export' (server:/path)")
    server, sep, path = export.rpartition(":/")
    if not sep or not _NFS_SERVER.fullmatch(server):
        raise checker.fail(f"{key}.export", f"expected server:/path; got {export!r}")
    _check_path(checker, f"{key}.export", "/" + path)
    for name in ("device", "fstype"):
        if target[name] is not None:
            raise checker.fail(f"{key}.{name}", "an nfs target takes no " + repr(name))
    options = target["mount_options"]
    if not _MOUNT_OPTIONS.fullmatch(options):
        raise checker.fail(f"{key}.mount_options", f"expected option[,option...]; got {options!r}")


def _check_network(checker: _Checker, net: dict[str, Any], has_network_target: bool) -> None:
    given = {k for k, v in net.items() if v not in (None, [], NETWORK_SCHEMA[k].default)}
    if given and not has_network_target:
        raise checker.fail("network", "no target needs the network (ssh, nfs)")
    if net["interface"] is not None and net["mac"] is not None:
        raise checker.fail("network.mac", "give 'interface' or 'mac', not both")
    if net["interface"] is not None and not _IFNAME.fullmatch(net["interface"]):
        raise checker.fail("network.interface", f"not an interface name: {net['interface']!r}")
    if net["vlan"] is not None and net["vlan"] > 4094:
        raise checker.fail("network.vlan", f"must be at most 4094, got {net['vlan']}")
    if net["mac"] is not None and not _MAC.fullmatch(net["mac"]):
        raise checker.fail("network.mac", f"expected aa:bb:cc:dd:ee:ff; got {net['mac']!r}")
    static = net["address"] is not None
    if net["dhcp"] is None:
        net["dhcp"] = not static
    if net["dhcp"] and (static or net["gateway"] is not None):
        raise checker.fail("network.dhcp", "a static address or gateway needs dhcp: false")
    if not net["dhcp"] and not static:
        raise checker.fail("network.address", "dhcp: false needs a static 'address' (a.b.c.d/nn)")
    if static and not re.fullmatch(_IPV4 + r"/(?:3[0-2]|[12]?[0-9])", net["address"]):
        raise checker.fail("network.address", f"expected a.b.c.d/nn; got {net['address']!r}")
    for key, value in [("gateway", net["gateway"])] + [
        (f"dns[{i}]", v) for i, v in enumerate(net["dns"])
    ]:
        if value is not None and not re.fullmatch(_IPV4, value):
            raise checker.fail(f"network.{key}", f"expected an IPv4 address; got {value!r}")


def _targets(values: list[dict[str, Any]]) -> tuple[Target, ...]:
    out = []
    for t in values:
        if t["type"] == "ssh":
            t = dict(
                t,
                port=t["port"] or 22,
                identity=t["identity"] or SSH_IDENTITY,
                known_hosts=t["known_hosts"] or SSH_KNOWN_HOSTS,
                client=t["client"] or "openssh",
            )
        if t["type"] == "raw":
            t = dict(t, recover_to=t["recover_to"] or DEFAULT_RECOVER_TO)
        out.append(Target(**t))
    return tuple(out)


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
    _check_network(
        checker,
        values["network"],
        any(t["type"] in NETWORK_TARGET_TYPES for t in values["targets"]),
    )
    targets = _targets(values["targets"])
    files = [ExtraFile(src=f["src"], dst=f["dst"] or f["src"]) for f in values["files"]]
    return Config(
        source=source,
        text=text,
        targets=targets,
        kernel_modules=tuple(values["kernel_modules"]),
        binaries=tuple(values["binaries"]),
        files=tuple(files),
        failure_action=values["failure_action"],
        final_action=values["final_action"],
        device_timeout=values["device_timeout"],
        compression=_section(CompressionConfig, values["compression"]),
        capture=_section(CaptureConfig, values["capture"]),
        cmdline=_section(CmdlineConfig, values["cmdline"]),
        busybox=values["busybox"],
        search_path=values["search_path"],
        firmware_root=values["firmware_root"],
        network=_section(NetworkConfig, values["network"]),
        lines=located.lines,
    )


class NoTarget(KdumpError):
    """The config names no dump target: kdump is not configured yet (exit EXIT_NO_TARGET, so
    that the kernel hooks can skip the image instead of failing a kernel installation)."""


EXIT_NO_TARGET = 4


def require_targets(config: Config) -> None:
    """An image without a target can never save a dump: refuse to build one (until a default
    target exists), and say what to configure."""
    if config.targets:
        return
    where = config.line_of("targets") if "targets" in config.lines else config.source
    file = DEFAULT_PATH if config.source == "<defaults>" else config.source
    raise NoTarget(
        f"{where}: no dump target is configured, so the capture kernel could save nothing: "
        f"add a 'targets' list to {file}"
        " (or give a config with -c), e.g. targets: [{type: disk, device: UUID=..., fstype: ext4}]"
        "; target types: " + ", ".join(TARGET_TYPES)
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
