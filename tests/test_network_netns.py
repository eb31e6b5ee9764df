"""The network hook, run for real: rendered from a real config by the network feature's own
module.yaml, sourced by busybox sh in a chroot that holds only static busybox and those files,
inside a network namespace joined by a veth pair to a second one where busybox udhcpd serves
a small range. The interfaces, the VLAN tagging, the DHCP exchange and the pings are the
kernel's and busybox's own; only `log` is the test's, writing to a file it reads back. Name
resolution runs in a whole built image unpacked, against a small DNS server on the far side."""

from __future__ import annotations

import functools
import ipaddress
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdump_mkinitrd.arming.sshsetup import ensure_key
from kdump_mkinitrd.config import parse
from kdump_mkinitrd.image.build import BuildRequest, build
from kdump_mkinitrd.image.features import discover
from kdump_mkinitrd.image.render import render
from tests import imagerun
from tests.conftest import Kernel

BUSYBOX = Path("/bin/busybox")
CLIENT_IF, SERVER_IF = "veth-c", "veth-s"
SERVER_ADDRESS, STATIC_ADDRESS = "10.42.0.1", "10.42.0.2"
POOL = [f"10.42.0.{n}" for n in range(100, 110)]
_serial = itertools.count()

# Sources every hook the way the init does, then makes the one call a network target makes.
HARNESS = """\
mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs dev /dev || exit 99
log() { echo "$*" >> /run/kdump/test.log; }
for hook in /lib/kdump/hooks/*.sh; do . "$hook"; done
kdump_network_up
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class Netns:
    """A network namespace of the test's own; deleting it takes its interfaces along."""

    def __init__(self, role: str) -> None:
        self.name = f"kdump-{role}-{os.getpid()}-{next(_serial)}"
        _ip("netns", "add", self.name)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _ip("-n", self.name, *args, check=check)

    def run(
        self, *command: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, *command], capture_output=True,
                              text=True, check=check, timeout=timeout)  # fmt: skip

    def delete(self) -> None:
        _ip("netns", "del", self.name, check=False)


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("chroot") is None:
        return "needs iproute2's ip and chroot"
    if not BUSYBOX.is_file():
        return f"needs the static busybox at {BUSYBOX} (Debian: busybox-static)"
    try:
        Netns("probe").delete()
    except subprocess.CalledProcessError as exc:
        return f"cannot create a network namespace: {exc.stderr.strip()}"
    return None


UNAVAILABLE = _unavailable()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")


@functools.cache
def vlan_unsupported() -> str | None:
    """Why this kernel makes no 802.1Q interfaces, or None when it does."""
    probe = Netns("vlanprobe")
    try:
        probe.ip("link", "add", "p0", "type", "veth", "peer", "name", "p1")
        made = probe.ip("link", "add", "link", "p0", "name", "p0.2", "type", "vlan", "id", "2",
                        check=False)  # fmt: skip
    finally:
        probe.delete()
    if made.returncode == 0:
        return None
    return (
        f"this kernel makes no 802.1Q interfaces ({made.stderr.strip()}): CONFIG_VLAN_8021Q "
        "is off or the 8021q module is missing"
    )


def needs_vlan() -> None:
    reason = vlan_unsupported()
    if reason is not None:
        pytest.skip(reason)


@dataclass
class Link:
    """Two namespaces joined by a veth pair: the capture side's end is `client_if`."""

    client: Netns
    server: Netns
    client_if: str
    work: Path
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def serve(self, vlan: int | None, dhcp: bool) -> str:
        """Address the server's end (or a VLAN on it) and, for dhcp, start udhcpd there."""
        iface = SERVER_IF
        if vlan is not None:
            iface = f"{SERVER_IF}.{vlan}"
            self.server.ip("link", "add", "link", SERVER_IF, "name", iface,
                           "type", "vlan", "id", str(vlan))  # fmt: skip
            self.server.ip("link", "set", iface, "up")
        self.server.ip("addr", "add", f"{SERVER_ADDRESS}/24", "dev", iface)
        if dhcp:
            conf = self.work / "udhcpd.conf"
            conf.write_text(
                f"interface {iface}\nstart {POOL[0]}\nend {POOL[-1]}\nmax_leases {len(POOL)}\n"
                f"lease_file {self.work}/udhcpd.leases\npidfile {self.work}/udhcpd.pid\n"
                f"option subnet 255.255.255.0\noption router {SERVER_ADDRESS}\n"
                f"option dns {SERVER_ADDRESS}\n"
            )
            command = ["ip", "netns", "exec", self.server.name, str(BUSYBOX), "udhcpd", "-f"]
            self.servers.append(subprocess.Popen([*command, str(conf)],
                                                 stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL))  # fmt: skip
        return iface

    def client_addresses(self, iface: str) -> list[str]:
        shown = json.loads(self.client.ip("-json", "-4", "addr", "show", "dev", iface).stdout)
        return [a["local"] for entry in shown for a in entry.get("addr_info", [])]

    def server_pings(self, address: str) -> bool:
        ping = self.server.run(str(BUSYBOX), "ping", "-c", "1", "-W", "3", address, check=False)
        return ping.returncode == 0


@pytest.fixture
def make_link(tmp_path: Path) -> Iterator[Callable[..., Link]]:
    made: list[Link] = []
    namespaces: list[Netns] = []

    def make(client_if: str = CLIENT_IF) -> Link:
        client = Netns("client")
        namespaces.append(client)
        server = Netns("server")
        namespaces.append(server)
        client.ip("link", "add", client_if, "type", "veth",
                  "peer", "name", SERVER_IF, "netns", server.name)  # fmt: skip
        server.ip("link", "set", SERVER_IF, "up")
        link = Link(client, server, client_if, tmp_path)
        made.append(link)
        return link

    yield make
    for link in made:
        for process in link.servers:
            process.terminate()
            process.wait(timeout=10)
    for namespace in namespaces:
        namespace.delete()


@pytest.fixture
def link(make_link: Callable[..., Link]) -> Link:
    return make_link()


@dataclass(frozen=True)
class Outcome:
    status: int
    log: str
    seconds: float


def capture_root(work: Path, network: dict[str, Any]) -> Path:
    """A chroot with busybox and the network feature's templates rendered from a real config,
    at the paths its module.yaml gives them in the image."""
    text = yaml.safe_dump(
        {"targets": [{"type": "ssh", "host": f"root@{SERVER_ADDRESS}"}], "network": network}
    )
    config = parse(text, "kdump.yaml")
    root = work / "root"
    for folder in ("bin", "dev", "run/kdump", "etc", "proc", "sys", "tmp"):
        (root / folder).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    for template in discover()["network"].templates:
        dst = root / template.dst.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(render(template.src, {"config": config}))
        dst.chmod(template.mode)
    (root / "run-hook.sh").write_text(HARNESS)
    return root


def bring_up(link: Link, network: dict[str, Any]) -> Outcome:
    """Run kdump_network_up in the client namespace; its exit status, log and duration."""
    root = capture_root(link.work, dict(network, interface=link.client_if))
    chroot = shutil.which("chroot") or "chroot"
    start = time.monotonic()
    run = link.client.run(chroot, str(root), "/bin/sh", "/run-hook.sh", check=False, timeout=120)
    seconds = time.monotonic() - start
    log_file = root / "run/kdump/test.log"
    log = log_file.read_text() if log_file.exists() else ""
    assert run.returncode != 99, f"the harness could not mount /proc, /sys, /dev: {run.stderr}"
    return Outcome(run.returncode, log + run.stderr, seconds)


def vlan_record(link: Link, iface: str) -> str:
    return link.client.run("cat", f"/proc/net/vlan/{iface}").stdout


@pytest.mark.parametrize("dhcp", [True, False], ids=["dhcp", "static"])
def test_address_on_the_vlan(link: Link, dhcp: bool) -> None:
    needs_vlan()
    link.serve(vlan=42, dhcp=dhcp)
    network: dict[str, Any] = {"vlan": 42, "timeout": 10}
    if not dhcp:
        network.update(dhcp=False, address=f"{STATIC_ADDRESS}/24", gateway=SERVER_ADDRESS)
    out = bring_up(link, network)
    assert out.status == 0, out.log
    vif = f"{CLIENT_IF}.42"
    record = vlan_record(link, vif)
    assert re.search(r"\bVID: 42\b", record) and re.search(rf"^Device: {CLIENT_IF}$", record, re.M)
    assert link.client_addresses(CLIENT_IF) == []  # the parent stays untagged and unaddressed
    [address] = link.client_addresses(vif)
    if dhcp:
        assert address in POOL
        assert f"network: udhcpc: lease bound: {address}/24 on {vif}" in out.log
    else:
        assert address == STATIC_ADDRESS
    assert f"network: link up on {CLIENT_IF}" in out.log
    assert f"network: VLAN 42 on {CLIENT_IF} is {vif}" in out.log
    assert f"network: link up on {vif}" in out.log
    assert f"network: {address}/24 on {vif}; default via {SERVER_ADDRESS} dev {vif}" in out.log
    assert link.server_pings(address)


def test_long_parent_name_gives_a_vlan_name(make_link: Callable[..., Link]) -> None:
    """PARENT.VID would pass the kernel's 15-byte limit on interface names."""
    needs_vlan()
    link = make_link("veth-kdump-cap0")  # 15 bytes already
    link.serve(vlan=4094, dhcp=True)
    out = bring_up(link, {"vlan": 4094, "timeout": 10})
    assert out.status == 0, out.log
    assert "network: VLAN 4094 on veth-kdump-cap0 is vlan4094" in out.log
    assert re.search(r"\bVID: 4094\b", vlan_record(link, "vlan4094"))
    [address] = link.client_addresses("vlan4094")
    assert address in POOL and link.server_pings(address)


def test_wrong_vlan_gets_no_lease_in_time(link: Link) -> None:
    """The server answers on VLAN 43 only: the client's VLAN 42 comes up, hears nothing, and
    the hook gives up within its timeout so that the next target can run."""
    needs_vlan()
    link.serve(vlan=43, dhcp=True)
    out = bring_up(link, {"vlan": 42, "timeout": 3})
    assert out.status == 1, out.log
    assert f"network: VLAN 42 on {CLIENT_IF} is {CLIENT_IF}.42" in out.log
    assert f"network: no DHCP lease on {CLIENT_IF}.42 within 3s" in out.log
    assert link.client_addresses(f"{CLIENT_IF}.42") == []
    assert out.seconds < 10, out.seconds


def test_kernel_without_8021q_fails_clearly(link: Link) -> None:
    """A capture kernel that cannot make the VLAN: one clear line, status 1, no fallback to
    the untagged parent even though a DHCP server answers there."""
    if vlan_unsupported() is None:
        pytest.skip("this kernel makes 802.1Q interfaces: the VLAN tests above run instead")
    link.serve(vlan=None, dhcp=True)
    out = bring_up(link, {"vlan": 42, "timeout": 3})
    assert out.status == 1, out.log
    assert f"network: cannot create VLAN 42 on {CLIENT_IF} as {CLIENT_IF}.42: " in out.log
    assert "(is the 8021q module loaded?)" in out.log
    assert link.client_addresses(CLIENT_IF) == []
    assert out.seconds < 5, out.seconds


@pytest.mark.parametrize("dhcp", [True, False], ids=["dhcp", "static"])
def test_address_without_vlan(link: Link, dhcp: bool) -> None:
    link.serve(vlan=None, dhcp=dhcp)
    network: dict[str, Any] = {"timeout": 10}
    if not dhcp:
        network.update(dhcp=False, address=f"{STATIC_ADDRESS}/24")
    out = bring_up(link, network)
    assert out.status == 0, out.log
    [address] = link.client_addresses(CLIENT_IF)
    assert address in POOL if dhcp else address == STATIC_ADDRESS
    assert "VLAN" not in out.log
    assert ipaddress.ip_address(address) in ipaddress.ip_network("10.42.0.0/24")
    assert link.server_pings(address)


# A DNS server for the far side: every A query for NAME gets ADDRESS, anything else an empty
# answer; each question is logged. Enough for the resolvers in the image (glibc's, busybox's).
DNS_SERVER = """\
import socket, struct, sys
name, address, log = sys.argv[1:4]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((address, 53))
print("ready", flush=True)
while True:
    query, peer = sock.recvfrom(512)
    labels, i = [], 12
    while query[i]:
        labels.append(query[i + 1:i + 1 + query[i]].decode())
        i += 1 + query[i]
    qtype = struct.unpack(">H", query[i + 1:i + 3])[0]
    asked = ".".join(labels)
    with open(log, "a") as out:
        out.write(f"{asked} {qtype}\\n")
    known = asked == name and qtype == 1
    answer = b"\\xc0\\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(address)
    header = struct.pack(">HHHHHH", struct.unpack(">H", query[:2])[0], 0x8180, 1, int(known), 0, 0)
    sock.sendto(header + query[12:i + 5] + (answer if known else b""), peer)
"""

NAME_HARNESS = """\
mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs dev /dev || exit 99
mkdir -p /run/kdump
log() { echo "$*" >> /run/kdump/test.log; }
for hook in /lib/kdump/hooks/*-network.sh /lib/kdump/hooks/*-target.sh; do . "$hook"; done
kdump_network_up || exit 1
echo "nfs address: $(kdump_nfs_addr {name})"
ssh -v -F /dev/null -o BatchMode=yes -o ConnectTimeout=5 -p 9 root@{name} true 2>&1 | grep Connect
dbclient -y -p 9 root@{name} true 2>&1 </dev/null || true
"""


def test_targets_named_by_host_resolve_through_the_leases_dns(
    link: Link, kernel61: Kernel, tmp_path: Path
) -> None:
    """A real image for an nfs and an ssh target named by host, unpacked and run in the client
    namespace: DHCP names the DNS server, the udhcpc script writes resolv.conf, and the NFS
    hook (busybox nslookup) and both ssh clients (glibc's resolver) find the server by name."""
    link.serve(vlan=None, dhcp=True)
    name = "dumps.kdump.test"
    dns_log = tmp_path / "dns.log"
    dns = subprocess.Popen(["ip", "netns", "exec", link.server.name, sys.executable, "-c",
                            DNS_SERVER, name, SERVER_ADDRESS, str(dns_log)],
                           stdout=subprocess.PIPE)  # fmt: skip
    link.servers.append(dns)
    assert dns.stdout is not None and dns.stdout.readline() == b"ready\n"
    keys = tmp_path / "keys"
    ensure_key(keys / "id_ed25519")
    (keys / "known_hosts").write_text(f"{name} {(keys / 'id_ed25519.pub').read_text()}")
    targets = [{"type": "nfs", "export": f"{name}:/srv"}]
    targets += [{"type": "ssh", "host": f"root@{name}", "identity": str(keys / "id_ed25519"),
                 "known_hosts": str(keys / "known_hosts"), "client": client}
                for client in ("openssh", "dropbear")]  # fmt: skip
    text = yaml.safe_dump({"targets": targets, "network": {"interface": link.client_if},
                           "capture": {"stage": "static"}})  # fmt: skip
    image = tmp_path / "kdump.img"
    request = BuildRequest(kernel61.kver, kernel61.kmoddir, image, kernel_image=kernel61.vmlinuz)
    build(parse(text, str(tmp_path / "kdump.yaml")), request)
    root = imagerun.unpack(image, tmp_path / "root")
    assert not (root / "etc/resolv.conf").exists()
    (root / "run-hook.sh").write_text(NAME_HARNESS.replace("{name}", name))
    run = link.client.run(shutil.which("chroot") or "chroot", str(root), "/bin/sh",
                          "/run-hook.sh", check=False, timeout=120)  # fmt: skip
    said = run.stdout + run.stderr + (root / "run/kdump/test.log").read_text()
    assert run.returncode == 0, said
    assert f"nameserver {SERVER_ADDRESS}" in (root / "etc/resolv.conf").read_text()
    assert f"nfs address: {SERVER_ADDRESS}\n" in run.stdout
    # Nothing listens on port 9 over there: refused, which only an address can be.
    assert f"Connecting to {name} [{SERVER_ADDRESS}] port 9." in run.stdout
    assert "ssh: connect to host" in run.stdout and "Connection refused" in run.stdout
    assert f"dbclient: Connection to root@{name}:9 exited: Connect failed: Connection refused" in (
        run.stdout
    )
    asked = dns_log.read_text().splitlines()
    assert f"{name} 1" in asked and all(line.startswith(name) for line in asked)
