"""Host-only detection: the kernel modules a target device needs, found from the device itself.

From the target's block device we walk sysfs up towards the root of the device tree; every
device on the way that is bound to a driver built as a module needs that module (disk, then
its controller, then the bus bridge). Walking from the target, not from the root filesystem,
is what makes a dump disk on another controller than / work.

A network target has no device of its own: the interface this host's routing table sends its
traffic through stands in for it (below a VLAN, the VLAN's parent), and its MAC and VLAN id
tell the capture init which interface to bring up when the config names none.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdump_mkinitrd import storage
from kdump_mkinitrd.config import Config
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.storage import Layer

log = logging.getLogger(__name__)

BY_KIND = {"UUID=": "by-uuid", "LABEL=": "by-label", "PARTUUID=": "by-partuuid"}


def device_node(spec: str, dev: Path = Path("/dev")) -> Path:
    """The /dev node a UUID=/LABEL=/PARTUUID=/path spec names on this host: udev's links when
    there are any, else blkid probing the devices itself (a host without udev, a rescue shell)."""
    for prefix, folder in BY_KIND.items():
        if spec.startswith(prefix):
            link = dev / "disk" / folder / spec[len(prefix) :]
            if link.exists() or shutil.which("blkid") is None:
                return link
            found = subprocess.run(["blkid", "-o", "device", "-t", spec], capture_output=True,
                                   text=True, timeout=60).stdout.split()  # fmt: skip
            return Path(found[0]) if found else link
    return Path(spec)


def _modules_on_path(sysdir: Path, sys_root: Path) -> list[tuple[str, str]]:
    found = []
    devices = sys_root / "devices"
    current = sysdir
    while current != devices and devices in current.parents:
        module = current / "driver" / "module"
        if module.exists():
            driver = os.path.basename(os.readlink(current / "driver"))
            found.append((os.path.basename(os.readlink(module)), f"{driver} at {current}"))
        current = current.parent
    return found


def _drivers_on_path(sysdir: Path, sys_root: Path) -> list[Path]:
    """Every device from `sysdir` up that a driver is bound to, built in or a module."""
    devices = sys_root / "devices"
    return [p for p in (sysdir, *sysdir.parents)
            if devices in p.parents and (p / "driver").exists()]  # fmt: skip


def stacked_kind(sysdir: Path) -> str | None:
    """What stacks a virtual block device on others, from the attributes its driver adds:
    device-mapper (LVM, LUKS, multipath...), md RAID, or a loop device over a file."""
    if (sysdir / "dm").is_dir():
        uuid = _read(sysdir / "dm" / "uuid")
        kind = "LUKS" if uuid.startswith("CRYPT-") else "LVM" if uuid.startswith("LVM-") else ""
        name = _read(sysdir / "dm" / "name")
        return f"a device-mapper device ({kind + ' ' if kind else ''}{name or sysdir.name})"
    if (sysdir / "md").is_dir():
        return f"an md RAID device ({sysdir.name}, {_read(sysdir / 'md' / 'level') or 'md'})"
    if (sysdir / "loop").is_dir():
        backing = _read(sysdir / "loop" / "backing_file")
        return f"a loop device ({sysdir.name} over {backing or 'a file'})"
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _block_device(sysdir: Path) -> Path:
    """The whole disk of a partition (its parent in sysfs), else the device itself."""
    return sysdir.parent if (sysdir / "partition").exists() else sysdir


@dataclass(frozen=True)
class DeviceStack:
    """What host-only detection found under one target's device."""

    index: int  # the target's, in config.targets
    key: str  # the config key of the device: targets[0].device
    device: str  # as the config gives it
    layers: tuple[Layer, ...]  # bottom first; () for a plain disk or partition
    devices: tuple[Path, ...]  # the sysfs dirs of the disks (or partitions) at the bottom

    def record(self) -> dict[str, Any]:
        """As the manifest keeps it: a layer's every field (a PV added, a member replaced, a
        keyslot gone changes it) and each bottom device's place in the device tree."""
        return {
            "key": self.key,
            "names": [x.name for x in self.layers],
            "layers": [{"type": x.type, **_plain(dataclasses.asdict(x))} for x in self.layers],
            "devices": [str(d) for d in self.devices],
        }


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, int | str | None) else str(v) for k, v in fields.items()}


def _refuse_stacked(where: str, device: str, bottom: Path, stack: storage.Stack) -> None:
    """A device at the bottom of the walk that is itself virtual: no layer type handles it."""
    stacked = stacked_kind(_block_device(bottom))
    if not stacked:
        return
    # The capture init brings up only what kdump_mkinitrd.storage has a layer type for.
    under = f" under {', '.join(x.name for x in reversed(stack.layers))}" if stack.layers else ""
    raise KdumpError(
        f"{where}: --hostonly: target device {device} is {'on ' if under else ''}{stacked}"
        f"{under}; storage layers of types {', '.join(storage.TYPES)} are supported, this "
        "kind is not supported yet: dump to a plain disk or partition, a raw partition, nfs "
        "or ssh"
    )


def target_stacks(
    config: Config, dev: Path = Path("/dev"), sys_root: Path = Path("/sys")
) -> list[DeviceStack]:
    """For every target with a device of its own, the storage stack under it, walked down
    through each layer type's `detect` to the disks; a target device missing here is an
    error, and so is a virtual device no layer type handles."""
    found = []
    for i, target in enumerate(config.targets):
        spec = target.hostonly_device()
        if spec is None:
            continue
        key, device = spec
        where = config.line_of(f"targets[{i}].{key}")
        node = device_node(device, dev)
        if not node.exists():
            raise KdumpError(
                f"{where}: --hostonly: target device {device} does not exist on this host "
                f"({node} is missing)"
            )
        name = node.resolve().name
        sysdir = (sys_root / "class" / "block" / name).resolve()
        if not sysdir.exists() and node.is_block_device():
            # Without udev, /dev/mapper/VG-LV is a node of its own, not a link to ../dm-N.
            rdev = node.stat().st_rdev
            sysdir = (sys_root / "dev" / "block" / f"{os.major(rdev)}:{os.minor(rdev)}").resolve()
        if not sysdir.exists():
            raise KdumpError(
                f"--hostonly: {node} ({name}) has no entry under {sys_root}/class/block"
            )
        stack = storage.walk(sysdir)
        # What the target type cannot do at all comes before what lies under the layers.
        if stack.layers and not target.takes_stack:
            raise KdumpError(
                f"{where}: --hostonly: target device {device} is on "
                f"{', '.join(x.name for x in reversed(stack.layers))}; {target.article} "
                f"{target.type} target cannot bring storage layers up, a disk target can"
            )
        for bottom in stack.devices:
            _refuse_stacked(where, device, bottom, stack)
        found.append(DeviceStack(i, f"targets[{i}].{key}", device, stack.layers, stack.devices))
    return found


def stack_modules(config: Config, stacks: list[DeviceStack],
                  sys_root: Path = Path("/sys")) -> list[tuple[str, str]]:  # fmt: skip
    """(module, why) for the drivers above every disk at the bottom of every stack."""
    requests = []
    for stack in stacks:
        where, device = config.line_of(stack.key), stack.device
        under = f" under {stack.layers[-1].name}" if stack.layers else ""
        for bottom in stack.devices:
            if not _drivers_on_path(bottom, sys_root):
                # Silence here would give an image that waits device_timeout for a disk it
                # has no driver for.
                raise KdumpError(
                    f"{where}: --hostonly: target device {device} ({bottom}{under}): no driver "
                    "is bound to it or to any device above it in sysfs, so the capture kernel "
                    "could not reach it; build with --no-hostonly and name its drivers in "
                    "kernel_modules"
                )
            for module, at in _modules_on_path(bottom, sys_root):
                requests.append((module, f"host-only: driver {at} for target {device}{under}"))
    return requests


def with_detected_stacks(config: Config, stacks: list[DeviceStack]) -> Config:
    """The config with each target's stack as detected: a stack the file gives must name the
    same layers (by name: the file may add what sysfs cannot know, such as a key file); one
    inferred from the device's name gives way to what is really there."""
    changed = list(config.targets)
    for stack in stacks:
        index = stack.index
        target = config.targets[index]
        if not target.takes_stack:
            continue
        have = target.layers()
        if target.layers_given():
            names, found = [x.name for x in have], [x.name for x in stack.layers]
            if sorted(names) != sorted(found) or names[-1:] != found[-1:]:
                key = f"targets[{index}].stack"
                raise KdumpError(
                    f"{config.line_of(key)}: --hostonly: key '{key}' names "
                    f"[{', '.join(names)}], but under {stack.device} this host "
                    f"has [{', '.join(found) or 'no storage layers'}] (bottom first)"
                )
            continue
        if have != stack.layers:
            log.info("host-only: target %s is on %s", stack.device,
                     ", ".join(x.name for x in stack.layers) or "no storage layers")  # fmt: skip
            changed[index] = target.with_layers(stack.layers)
    if changed == list(config.targets):
        return config
    return dataclasses.replace(config, targets=tuple(changed))


@dataclass(frozen=True)
class NetworkPath:
    """How this host reaches one network target."""

    server: str  # as the config names it
    address: str  # the IPv4 address it resolved to
    interface: str  # the one the route leaves by: eth0.42, eth0, lo
    parent: str  # the VLAN's parent, else the interface itself
    vlan: int | None
    mac: str | None  # the parent's; None when it has none (loopback, tun)
    device: Path | None  # the parent's device in sysfs; None for a virtual interface
    modules: tuple[tuple[str, str], ...]  # (module, where) from that device up to the root

    @property
    def via(self) -> str:
        if self.vlan is None:
            return self.interface
        return f"{self.interface} (VLAN {self.vlan} on {self.parent})"


def network_servers(config: Config) -> list[tuple[str, str]]:
    """(config key, host) for each network target: the server its type names (an ssh target's
    user@host, an nfs target's server:/path)."""
    found = []
    for i, target in enumerate(config.targets):
        server = target.hostonly_server()
        if server is not None:
            found.append((f"targets[{i}].{server[0]}", server[1]))
    return found


def ipv4_of(host: str) -> str:
    """The IPv4 address of a host name or literal; the capture network speaks IPv4 only."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        # Checked here because getaddrinfo would take an IPv6 literal for a name to look up.
        if literal.version != 4:
            raise KdumpError(f"{host} is an IPv6 address; the capture network is IPv4 only")
        return host
    try:
        infos = socket.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise KdumpError(f"cannot resolve {host!r} to an IPv4 address ({reason})") from None
    return str(infos[0][4][0])


def route_interface(address: str) -> str:
    """The interface the routing table sends traffic for `address` through (nothing is sent)."""
    ip = shutil.which("ip")
    if ip is None:
        raise KdumpError("iproute2's ip is not installed; it tells which interface to use")
    run = subprocess.run([ip, "-json", "route", "get", address], capture_output=True,
                         text=True, timeout=30, check=False)  # fmt: skip
    if run.returncode != 0:
        raise KdumpError(f"no route to {address} on this host: {run.stderr.strip()}")
    routes = json.loads(run.stdout)
    if not routes or "dev" not in routes[0]:
        raise KdumpError(f"ip route get {address} named no interface: {run.stdout.strip()}")
    return str(routes[0]["dev"])


def vlan_of(interface: str, proc_net: Path = Path("/proc/net")) -> tuple[str, int] | None:
    """(parent, VLAN id) when `interface` is an 802.1Q VLAN, from the 8021q module's record of
    it (other stacked interfaces, macvlan or bonds, have lower_* links in sysfs too)."""
    try:
        record = (proc_net / "vlan" / interface).read_text()
    except FileNotFoundError:
        return None
    vid = re.search(r"\bVID: (\d+)", record)
    parent = re.search(r"^Device: (\S+)", record, re.MULTILINE)
    if vid is None or parent is None:
        raise KdumpError(f"{proc_net}/vlan/{interface} names no VID or no Device: {record!r}")
    return parent.group(1), int(vid.group(1))


def network_path(
    server: str,
    address: str,
    sys_root: Path = Path("/sys"),
    proc_net: Path = Path("/proc/net"),
) -> NetworkPath:
    """What carries traffic to `address` here: interface, VLAN, and the parent's MAC and
    drivers. /sys/class/net shows the network namespace of whoever mounted that sysfs."""
    interface = route_interface(address)
    vlan = vlan_of(interface, proc_net)
    parent, vid = vlan if vlan else (interface, None)
    net = sys_root / "class" / "net" / parent
    try:
        mac: str | None = (net / "address").read_text().strip().lower()
    except OSError:
        mac = None  # e.g. a VLAN whose parent is in another namespace
    if mac in ("", "00:00:00:00:00:00"):
        mac = None
    device = (net / "device").resolve() if (net / "device").exists() else None
    modules = tuple(_modules_on_path(device, sys_root)) if device else ()
    return NetworkPath(server, address, interface, parent, vid, mac, device, modules)


def network_paths(
    config: Config, sys_root: Path = Path("/sys"), proc_net: Path = Path("/proc/net")
) -> list[NetworkPath]:
    """One NetworkPath per network target, in config order."""
    paths = []
    for key, host in network_servers(config):
        try:
            paths.append(network_path(host, ipv4_of(host), sys_root, proc_net))
        except KdumpError as exc:
            raise KdumpError(
                f"{config.line_of(key)}: --hostonly: network target {host}: {exc}; host-only "
                "detection needs the interface that reaches it (or build with --no-hostonly "
                "and name the NIC driver in kernel_modules)"
            ) from None
    return paths


def network_modules(path: NetworkPath) -> list[tuple[str, str]]:
    """(module, why) for the drivers under a network path, and 8021q when it is a VLAN."""
    requests = [
        (module, f"host-only: driver {where} for network target {path.server} via {path.via}")
        for module, where in path.modules
    ]
    if path.vlan is not None:
        requests.append(("8021q", f"host-only: network target {path.server} via {path.via}"))
    if path.modules:
        return requests
    if path.interface == "lo":
        log.warning("host-only: network target %s is this host (route via lo): "
                    "no network driver added", path.server)  # fmt: skip
    elif path.device is None:
        log.warning("host-only: network target %s routes via %s, and %s has no device (a "
                    "virtual interface): no network driver added; name the capture kernel's "
                    "NIC driver in kernel_modules", path.server, path.via, path.parent)  # fmt: skip
    else:
        log.info("host-only: the drivers of %s (%s) are built into the kernel",
                 path.parent, path.device)  # fmt: skip
    return requests


def with_detected_nic(config: Config, paths: list[NetworkPath]) -> Config:
    """The config with network.mac (and network.vlan) filled in from the first network path,
    when the config names neither interface nor mac: what it names always wins. A copy, so
    the loaded config keeps saying what the file said."""
    net = config.network
    chosen = next((p for p in paths if p.interface != "lo"), None)
    if chosen is None or net.interface or net.mac:
        return config
    for other in paths:
        if other.interface != "lo" and (other.parent, other.vlan) != (chosen.parent, chosen.vlan):
            log.warning("host-only: network target %s routes via %s, but the capture init brings "
                        "up one interface: the one for %s, %s", other.server, other.via,
                        chosen.server, chosen.via)  # fmt: skip
    updates: dict[str, Any] = {}
    # A virtual interface does not exist in the capture kernel, so its MAC would match nothing.
    if chosen.device is not None and chosen.mac:
        updates["mac"] = chosen.mac
    if net.vlan is None and chosen.vlan is not None:
        updates["vlan"] = chosen.vlan
    if not updates:
        return config
    log.info("host-only: network target %s routes via %s: the capture init uses %s",
             chosen.server, chosen.via, updates)  # fmt: skip
    return dataclasses.replace(config, network=dataclasses.replace(net, **updates))


@dataclass(frozen=True)
class Detection:
    """What host-only detection found: the modules, the storage stacks under the targets'
    devices, and the config the image is built from (with those stacks and the NIC)."""

    config: Config
    modules: list[tuple[str, str]]
    network: tuple[NetworkPath, ...]
    stacks: tuple[DeviceStack, ...] = ()


def detect(
    config: Config,
    dev: Path = Path("/dev"),
    sys_root: Path = Path("/sys"),
    proc_net: Path = Path("/proc/net"),
) -> Detection:
    """Drivers for every target, local and network, the stacks under local targets, and the
    NIC the capture init should pick when the config leaves it open."""
    stacks = target_stacks(config, dev, sys_root)
    modules = stack_modules(config, stacks, sys_root)
    paths = network_paths(config, sys_root, proc_net)
    for path in paths:
        modules += network_modules(path)
    config = with_detected_stacks(config, stacks)
    return Detection(with_detected_nic(config, paths), modules, tuple(paths), tuple(stacks))
