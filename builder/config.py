"""The YAML config: loaded with line numbers, checked against one declarative schema, frozen.

Every error names the file, the line and the key, so an admin can fix it without guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kdump_mkinitrd import targets
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.schema import Checker, Field, Located
from kdump_mkinitrd.targets import Target

DEFAULT_PATH = Path("/etc/kdump-mkinitrd.yaml")

ACTIONS = ("reboot", "poweroff", "halt", "shell")

# Each target type declares its keys and checks in kdump_mkinitrd.targets.
TARGET_TYPES = tuple(targets.TYPES)
TARGET_SCHEMA: dict[str, Field] = targets.schema()

_MAC = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")
_IFNAME = re.compile(r"[A-Za-z0-9_.:-]{1,15}")
# capture.hostname names each dump's folder (HOST-DATE) on every target and in recover-raw:
# one path component, what a host name may hold.
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?!\.)){0,63}")
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

# A program run in the capture kernel as argv (never through a shell), before or after the
# dump: builder/image/resolve.py copies it in with what it needs to run.
HOOK_SCHEMA: dict[str, Field] = {
    "program": Field(str, required=True, absolute_path=True),
    "args": Field(list, default=[], items=str),
}

HOOKS_SCHEMA: dict[str, Field] = {
    # Seconds each hook may run before it is killed.
    "timeout": Field(int, default=60, minimum=1, maximum=3600),
    "pre": Field(list, default=[], items=HOOK_SCHEMA, shorthand="program"),
    "post": Field(list, default=[], items=HOOK_SCHEMA, shorthand="program"),
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
    "hooks": Field(dict, default={}, schema=HOOKS_SCHEMA),
}


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


@dataclass(frozen=True)
class Hook:
    """One program of `hooks.pre` or `hooks.post`, with its arguments."""

    program: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class HooksConfig:
    """Programs the capture kernel runs before and after the dump (`hooks`)."""

    timeout: int = 60
    pre: tuple[Hook, ...] = ()
    post: tuple[Hook, ...] = ()

    def all(self) -> tuple[tuple[str, Hook], ...]:
        """(config key, hook) for every hook: `hooks.pre[0]`, ..., `hooks.post[0]`, ..."""
        return tuple(
            (f"hooks.{kind}[{i}]", hook)
            for kind, hooks in (("pre", self.pre), ("post", self.post))
            for i, hook in enumerate(hooks)
        )


def _hooks(values: dict[str, Any]) -> HooksConfig:
    def make(items: list[dict[str, Any]]) -> tuple[Hook, ...]:
        return tuple(Hook(h["program"], tuple(h["args"])) for h in items)

    return HooksConfig(values["timeout"], make(values["pre"]), make(values["post"]))


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
    hooks: HooksConfig = field(default_factory=HooksConfig)
    lines: dict[str, int] = field(default_factory=dict, compare=False)

    def line_of(self, key: str) -> str:
        """`file:line` of a dotted key, for errors raised after validation."""
        return f"{self.source}:{self.lines.get(key, 0)}"


def _cross_checks(checker: Checker, data: dict[str, Any]) -> None:
    """Rules that span keys: what each target type needs."""
    for i, target in enumerate(data["targets"]):
        targets.check(checker, f"targets[{i}]", target)
    _check_capture(checker, data["capture"])


def _check_capture(checker: Checker, capture: dict[str, Any]) -> None:
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


def _check_network(checker: Checker, net: dict[str, Any], has_network_target: bool) -> None:
    given = {k for k, v in net.items() if v not in (None, [], NETWORK_SCHEMA[k].default)}
    if given and not has_network_target:
        needs = ", ".join(targets.network_types())
        raise checker.fail("network", f"no target needs the network ({needs})")
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


def parse(text: str, source: str) -> Config:
    """Validate config text; `source` names it in errors."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise KdumpError(f"{where}: malformed YAML: {problem}") from None
    located = Located(source)
    data = located.value(root, "") if root is not None else {}
    checker = Checker(source, located.lines)
    values = checker.mapping(data, SCHEMA, "")
    _cross_checks(checker, values)
    _check_network(
        checker,
        values["network"],
        any(t["type"] in targets.network_types() for t in values["targets"]),
    )
    files = [ExtraFile(src=f["src"], dst=f["dst"] or f["src"]) for f in values["files"]]
    return Config(
        source=source,
        text=text,
        targets=tuple(targets.make(t) for t in values["targets"]),
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
        hooks=_hooks(values["hooks"]),
        lines=located.lines,
    )


class NoTarget(KdumpError):
    """No dump target: the config names none, and the default (the filesystem holding
    /var/crash, kdump_mkinitrd.hostscan.defaulttarget) cannot take a dump on this host. kdump
    is not set up (exit EXIT_NO_TARGET, so that the kernel hooks can skip the image instead of
    failing a kernel installation)."""


EXIT_NO_TARGET = 4


def require_targets(config: Config) -> None:
    """An image without a target can never save a dump: refuse to build one, and say what to
    configure. The command line gives a config without targets the default one first."""
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
