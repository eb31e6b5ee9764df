"""Host-only detection of the NIC behind each network target, on this machine's own routing
table and sysfs and in network namespaces the tests make. Detection only asks the kernel
(`ip route get`, sysfs, /proc/net/vlan); nothing is sent anywhere."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from kdump_mkinitrd.arming.sshsetup import ensure_key
from kdump_mkinitrd.config import parse
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import hostonly
from kdump_mkinitrd.hostscan.hostonly import NetworkPath
from kdump_mkinitrd.image import inputs
from kdump_mkinitrd.image.assemble import MANIFEST_PATH
from kdump_mkinitrd.image.build import BuildRequest, build, write_image
from kdump_mkinitrd.image.compress import Compression, decompress
from kdump_mkinitrd.image.cpio import Entry, read_newc
from kdump_mkinitrd.image.features import discover
from kdump_mkinitrd.image.inspect_image import LoadedImage, load_image
from tests.conftest import REPO, Kernel
from tests.test_network_netns import UNAVAILABLE, Netns, needs_vlan

needs_netns = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")

# Runs inside a namespace: /sys/class/net and /proc/net/vlan there are the namespace's own
# (`ip netns exec` mounts a fresh sysfs), which no call from this process could show.
IN_NAMESPACE = textwrap.dedent("""\
    import dataclasses, json, logging, sys
    sys.path.insert(0, sys.argv[1])
    from kdump_mkinitrd.hostscan import hostonly
    from kdump_mkinitrd.image import inputs
    from kdump_mkinitrd.config import parse
    from kdump_mkinitrd.errors import KdumpError
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = parse(sys.argv[2], "kdump.yaml")
    try:
        found = hostonly.detect(config)
    except KdumpError as exc:
        print(json.dumps({"error": str(exc)}))
        raise SystemExit(0)
    print(json.dumps({
        "paths": [dataclasses.asdict(p) for p in found.network],
        "modules": found.modules,
        "network": dataclasses.asdict(found.config.network),
    }, default=str))
""")


def detect_in(namespace: Netns, config_text: str) -> tuple[dict[str, Any], str]:
    run = namespace.run(sys.executable, "-c", IN_NAMESPACE, str(REPO), config_text)
    return json.loads(run.stdout), run.stderr


def ssh_config(host: str, network: str = "") -> str:
    return f"targets:\n  - {{type: ssh, host: 'root@{host}'}}\n" + network


def default_route() -> tuple[str, str] | None:
    """(gateway, interface) of this host's IPv4 default route, if it has one via a gateway."""
    shown = subprocess.run(["ip", "-json", "-4", "route", "show", "default"], capture_output=True,
                           text=True, check=True, timeout=30).stdout  # fmt: skip
    routes = [r for r in json.loads(shown) if "gateway" in r]
    return (routes[0]["gateway"], routes[0]["dev"]) if routes else None


def drivers_above(device: Path) -> list[str]:
    """The modules sysfs shows bound along the way from `device` up to /sys/devices."""
    found = []
    while device != Path("/sys/devices") and Path("/sys/devices") in device.parents:
        if (device / "driver" / "module").exists():
            found.append(os.path.basename(os.readlink(device / "driver" / "module")))
        device = device.parent
    return found


@pytest.fixture
def namespace() -> Iterator[Netns]:
    made = Netns("hostonly")
    yield made
    made.delete()


def veth_in(namespace: Netns) -> None:
    namespace.ip("link", "add", "kd-a", "type", "veth", "peer", "name", "kd-b")
    for name in ("kd-a", "kd-b"):
        namespace.ip("link", "set", name, "up")


@needs_netns
def test_veth_route_has_no_device_and_no_driver(namespace: Netns) -> None:
    veth_in(namespace)
    namespace.ip("addr", "add", "10.77.0.2/24", "dev", "kd-a")
    found, log = detect_in(namespace, ssh_config("10.77.0.1"))
    [path] = found["paths"]
    mac = namespace.run("cat", "/sys/class/net/kd-a/address").stdout.strip()
    assert path == {
        "server": "10.77.0.1", "address": "10.77.0.1", "interface": "kd-a", "parent": "kd-a",
        "vlan": None, "mac": mac, "device": None, "modules": [],
    }  # fmt: skip
    assert found["modules"] == []
    # A veth is gone in the capture kernel, so its MAC is not made the one to look for.
    assert found["network"]["mac"] is None and found["network"]["vlan"] is None
    assert "routes via kd-a, and kd-a has no device (a virtual interface)" in log


@needs_netns
def test_vlan_route_gives_parent_vid_and_8021q(namespace: Netns) -> None:
    needs_vlan()
    veth_in(namespace)
    namespace.ip("link", "add", "link", "kd-a", "name", "kd-a.42", "type", "vlan", "id", "42")
    namespace.ip("link", "set", "kd-a.42", "up")
    namespace.ip("addr", "add", "10.77.0.2/24", "dev", "kd-a.42")
    found, _ = detect_in(namespace, ssh_config("10.77.0.1"))
    [path] = found["paths"]
    mac = namespace.run("cat", "/sys/class/net/kd-a/address").stdout.strip()
    assert (path["interface"], path["parent"], path["vlan"]) == ("kd-a.42", "kd-a", 42)
    assert (path["mac"], path["device"], path["modules"]) == (mac, None, [])
    assert found["modules"] == [
        ["8021q", "host-only: network target 10.77.0.1 via kd-a.42 (VLAN 42 on kd-a)"]
    ]
    assert found["network"]["vlan"] == 42 and found["network"]["mac"] is None


@needs_netns
def test_unresolvable_host_names_the_config_line(namespace: Netns) -> None:
    """In a namespace with no interface up, so the DNS query cannot leave it."""
    found, _ = detect_in(namespace, ssh_config("kdump-test.invalid"))
    assert found["error"].startswith(
        "kdump.yaml:2: --hostonly: network target kdump-test.invalid: cannot resolve "
        "'kdump-test.invalid' to an IPv4 address ("
    )
    assert "needs the interface that reaches it" in found["error"]
    found, _ = detect_in(namespace, "targets:\n  - type: nfs\n    export: nfs.invalid:/srv\n")
    assert found["error"].startswith("kdump.yaml:3: --hostonly: network target nfs.invalid: ")


@needs_netns
def test_no_route_names_the_config_line(namespace: Netns) -> None:
    found, _ = detect_in(namespace, ssh_config("192.0.2.7"))
    assert found["error"].startswith(
        "kdump.yaml:2: --hostonly: network target 192.0.2.7: no route to 192.0.2.7 on this host"
    )


def test_ipv6_literal_is_refused_without_a_lookup() -> None:
    config = parse(ssh_config("fe80::1"), "kdump.yaml")
    with pytest.raises(KdumpError, match=r"^kdump.yaml:2: .*fe80::1 is an IPv6 address; the "
                                         r"capture network is IPv4 only"):  # fmt: skip
        hostonly.detect(config)


def test_loopback_target_adds_nothing(caplog: pytest.LogCaptureFixture) -> None:
    config = parse(ssh_config("127.0.0.1"), "kdump.yaml")
    with caplog.at_level(logging.WARNING, logger="kdump_mkinitrd.hostscan.hostonly"):
        found = hostonly.detect(config)
    [path] = found.network
    assert (path.interface, path.mac, path.device, path.modules) == ("lo", None, None, ())
    assert found.modules == [] and found.config is config
    assert "network target 127.0.0.1 is this host (route via lo)" in caplog.text


def test_default_route_interface_of_this_host() -> None:
    route = default_route()
    if route is None:
        pytest.skip("this host has no IPv4 default route via a gateway")
    gateway, interface = route
    device = Path("/sys/class/net", interface, "device")
    if not device.exists():
        pytest.skip(f"{interface}, this host's default route, has no device (a virtual NIC)")
    path = hostonly.network_path(gateway, gateway)
    assert (path.interface, path.parent, path.vlan) == (interface, interface, None)
    assert path.mac == Path("/sys/class/net", interface, "address").read_text().strip()
    assert path.device == device.resolve()
    assert [m for m, _ in path.modules] == drivers_above(device.resolve())
    whys = [why for _, why in hostonly.network_modules(path)]
    assert all(w.startswith("host-only: driver ") and f"via {interface}" in w for w in whys)
    config = parse(ssh_config(gateway), "kdump.yaml")
    found = hostonly.detect(config)
    assert found.config.network.mac == path.mac
    assert config.network.mac is None  # the loaded config still says what the file said


def _path(vlan: int | None = None, device: bool = True, interface: str = "eth0") -> NetworkPath:
    return NetworkPath("backup", "192.0.2.9", interface, "eth0", vlan, "52:54:00:12:34:56",
                       Path("/sys/devices/pci0000:00/0000:00:03.0/virtio0") if device else None,
                       ())  # fmt: skip


@pytest.mark.parametrize(
    ("network", "paths", "expected"),
    [
        # Nothing named: the parent's MAC, and the VLAN the route goes through.
        ("", [_path(vlan=7)], {"mac": "52:54:00:12:34:56", "vlan": 7}),
        # What the config names wins: a name or a MAC leaves the choice alone.
        ("network: {interface: eno1}\n", [_path(vlan=7)], {"interface": "eno1", "vlan": None}),
        ("network: {mac: '52:54:00:aa:bb:cc'}\n", [_path()], {"mac": "52:54:00:aa:bb:cc"}),
        # ... and a VLAN given stays, while the MAC is still filled in.
        ("network: {vlan: 5}\n", [_path(vlan=7)], {"mac": "52:54:00:12:34:56", "vlan": 5}),
        # A virtual parent (bond, veth) does not exist in the capture kernel: only the VLAN.
        ("", [_path(vlan=7, device=False)], {"mac": None, "vlan": 7}),
        # The first target that leaves this host decides.
        ("", [_path(interface="lo"), _path()], {"mac": "52:54:00:12:34:56", "vlan": None}),
    ],
    ids=["open", "interface-named", "mac-named", "vlan-named", "virtual-parent", "lo-first"],
)
def test_detected_nic_fills_only_what_the_config_left_open(
    network: str, paths: list[NetworkPath], expected: dict[str, Any]
) -> None:
    config = parse(ssh_config("backup") + network, "kdump.yaml")
    before = asdict(config.network)
    updated = hostonly.with_detected_nic(config, paths)
    assert {k: getattr(updated.network, k) for k in expected} == expected
    assert asdict(config.network) == before
    assert (updated.text, updated.targets) == (config.text, config.targets)


def _files(tmp_path: Path, host: str) -> str:
    """A real key, and a known_hosts line pinning `host` (the build refuses an unpinned one)."""
    ensure_key(tmp_path / "id")
    blob = (tmp_path / "id.pub").read_text().split()[1]
    (tmp_path / "known_hosts").write_text(f"{host} ssh-ed25519 {blob}\n")
    return f"identity: {tmp_path}/id, known_hosts: {tmp_path}/known_hosts"


def _build(kernel: Kernel, tmp_path: Path, text: str, hostonly_build: bool) -> LoadedImage:
    output = tmp_path / "kdump.img"
    request = BuildRequest(kernel.kver, kernel.kmoddir, output, kernel_image=kernel.vmlinuz,
                           hostonly=hostonly_build)  # fmt: skip
    build(parse(text, str(tmp_path / "kdump.yaml")), request)
    return load_image(output)


def _hook(image: LoadedImage) -> str:
    # Under usr/ when the build host is usr-merged (lib is then a symlink in the image).
    hook = "lib/kdump/hooks/20-network.sh"
    return next(m.data.decode() for m in image.members if m.path in (hook, "usr/" + hook))


def test_configured_vlan_brings_8021q(kernel61: Kernel, tmp_path: Path) -> None:
    text = (
        f"targets:\n  - {{type: ssh, host: root@192.0.2.9, {_files(tmp_path, '192.0.2.9')}}}\n"
        "network: {interface: eth0, vlan: 7}\ncapture: {stage: static}\n"
    )
    image = _build(kernel61, tmp_path, text, hostonly_build=False)
    whys = {m["name"]: m["why"] for m in image.manifest["kernel_modules"]}
    assert whys["8021q"] == ("requested as '8021q' by feature network (network.vlan is set)")
    assert "KDUMP_NET_VLAN=7\n" in _hook(image)


def test_hostonly_build_renders_the_detected_nic(kernel61: Kernel, tmp_path: Path) -> None:
    route = default_route()
    if route is None or not Path("/sys/class/net", route[1], "device").exists():
        pytest.skip("this host has no default route through an interface with a device")
    gateway, interface = route
    mac = Path("/sys/class/net", interface, "address").read_text().strip()
    text = f"targets:\n  - {{type: ssh, host: root@{gateway}, {_files(tmp_path, gateway)}}}\n" \
           "capture: {stage: static}\n"  # fmt: skip
    image = _build(kernel61, tmp_path, text, hostonly_build=True)
    assert f"KDUMP_NET_MAC={mac}\n" in _hook(image)
    assert "KDUMP_NET_IFACE=''\n" in _hook(image) and "KDUMP_NET_VLAN=''\n" in _hook(image)
    assert image.manifest["config"]["text"] == text  # the file as written, not the filled copy
    modules = {m["name"]: m["why"] for m in image.manifest["kernel_modules"]}
    for name in drivers_above(Path("/sys/class/net", interface, "device").resolve()):
        assert f"for network target {gateway} via {interface}" in modules[name]


def test_if_needed_rebuilds_when_hostonly_detection_moves(kernel61: Kernel, tmp_path: Path) -> None:
    """The image records what detection found; --if-needed (register at boot) detects again
    and rebuilds when the NIC or the drivers are no longer those, and only then."""
    route = default_route()
    if route is None or not Path("/sys/class/net", route[1], "device").exists():
        pytest.skip("this host has no default route through an interface with a device")
    gateway, interface = route
    mac = Path("/sys/class/net", interface, "address").read_text().strip()
    target = f"{{type: ssh, host: root@{gateway}, {_files(tmp_path, gateway)}}}"
    config = parse(f"targets:\n  - {target}\ncapture: {{stage: static}}\n", "k.yaml")
    output = tmp_path / "kdump.img"
    request = BuildRequest(kernel61.kver, kernel61.kmoddir, output, kernel_image=kernel61.vmlinuz,
                           hostonly=True)  # fmt: skip
    build(config, request)
    recorded = load_image(output).manifest["hostonly_detected"]
    drivers = drivers_above(Path("/sys/class/net", interface, "device").resolve())
    assert recorded["network"] == {"mac": mac, "vlan": None}
    assert set(drivers) <= set(recorded["modules"])
    assert build(config, request, if_needed=True).up_to_date
    # The same image as though built while another NIC carried the route.
    entries = [Entry(m.path, m.kind, m.mode, m.data, m.rdev)
               for m in read_newc(decompress(output.read_bytes(), str(output)))]  # fmt: skip
    at = next(i for i, e in enumerate(entries) if e.path == MANIFEST_PATH.lstrip("/"))
    earlier = json.loads(entries[at].data)
    earlier["hostonly_detected"]["network"]["mac"] = "52:54:00:00:00:01"
    entries[at] = replace(entries[at], data=json.dumps(earlier).encode())
    _, image = write_image(entries, Compression("zstd", 3, 0), output)
    beside = inputs.read_record(output)  # and the record beside it, for the new bytes
    assert beside is not None
    inputs.write_record(output, image, {k: v for k, v in beside.items() if k != "image"})
    again = build(config, request, if_needed=True)
    assert not again.up_to_date
    assert again.rebuilt_because == [
        f"host-only detection picks another NIC now: {{'mac': '{mac}', 'vlan': None}}, "
        "was {'mac': '52:54:00:00:00:01', 'vlan': None}"
    ]
    assert load_image(output).manifest["hostonly_detected"] == recorded


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ("{name: 8021q, when: network.vlan}", None),
        ("{name: 8021q, when: network.vlna}", "when: 'network.vlna' is neither a config key"),
        ("{name: 8021q, when: target.colour=red}", "nor target.FIELD=VALUE"),
        ("{name: 8021q}", "kernel_modules items are names or {name: ..., when: ...}"),
    ],
)
def test_a_module_yaml_entry_can_hang_on_a_config_key(
    tmp_path: Path, entry: str, error: str | None
) -> None:
    folder = tmp_path / "vlan-feature"
    folder.mkdir()
    (folder / "module.yaml").write_text(
        "name: vlan-feature\ndescription: test\nwhen: {always: true}\n"
        f"kernel_modules: [{entry}]\n"
    )
    if error is not None:
        with pytest.raises(KdumpError, match=re.escape(error)):
            discover((tmp_path,))
        return
    feature = discover((tmp_path,))["vlan-feature"]
    ssh = "targets:\n  - {type: ssh, host: k@192.0.2.7}\n"
    assert feature.kernel_module_requests(parse(ssh, "k.yaml")) == []
    with_vlan = parse(ssh + "network: {vlan: 9}\n", "k.yaml")
    assert feature.kernel_module_requests(with_vlan) == [
        ("8021q", "feature vlan-feature (network.vlan is set)")
    ]
