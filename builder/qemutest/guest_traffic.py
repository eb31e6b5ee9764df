"""Where a qemu-test guest sent packets, read from the capture QEMU's filter-dump writes.

The tests' network rule is that nothing leaves for any address but the test servers on the
host's loopback. QEMU's user-mode network would carry a guest's packets to anywhere (a DNS
query to 10.0.2.3 goes on to the host's resolver), so the run records every frame and the
check proves, packet by packet, that the guest never tried.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from pathlib import Path

from kdump_mkinitrd.errors import KdumpError

_PCAP_MAGIC = 0xA1B2C3D4
_LINKTYPE_ETHERNET = 1
# QEMU's NICs have 52:54:00 MACs; its user-mode network's own side uses 52:55:...
_GUEST_OUI = bytes.fromhex("525400")
_IPV4, _IPV6, _VLAN = 0x0800, 0x86DD, 0x8100
# Never routed past QEMU: DHCP's broadcasts and link-local multicast (IGMP, IPv6 ND/MLD).
_LINK_ONLY = [
    ipaddress.ip_network("255.255.255.255/32"),
    ipaddress.ip_network("224.0.0.0/24"),
    ipaddress.ip_network("ff02::/16"),
]


def recording(pcap: Path, netdev: str = "n0") -> tuple[str, ...]:
    """QEMU arguments that write every frame of `netdev` to `pcap`, cut to its headers."""
    return ("-object", f"filter-dump,id=dump0,netdev={netdev},file={pcap},maxlen=128")


def _frames(pcap: Path) -> Iterator[bytes]:
    try:
        data = pcap.read_bytes()
    except OSError as exc:
        raise KdumpError(f"cannot read the packet capture {pcap}: {exc.strerror}") from None
    if len(data) < 24:
        raise KdumpError(f"{pcap}: not a packet capture (too short)")
    for order in "<>":
        magic, _, _, _, _, _, linktype = struct.unpack_from(order + "IHHiIII", data)
        if magic == _PCAP_MAGIC:
            break
    else:
        raise KdumpError(f"{pcap}: not a pcap file")
    if linktype != _LINKTYPE_ETHERNET:
        raise KdumpError(f"{pcap}: link type {linktype}, expected Ethernet")
    offset = 24
    while offset + 16 <= len(data):
        _, _, stored, _ = struct.unpack_from(order + "IIII", data, offset)
        offset += 16
        yield data[offset : offset + stored]
        offset += stored


def _destination(frame: bytes) -> str | None:
    """The address an IP frame is for; None for other kinds (ARP never leaves the link)."""
    kind, at = struct.unpack_from(">H", frame, 12)[0], 14
    if kind == _VLAN:
        kind, at = struct.unpack_from(">H", frame, 16)[0], 18
    if kind == _IPV4 and len(frame) >= at + 20:
        return str(ipaddress.IPv4Address(frame[at + 16 : at + 20]))
    if kind == _IPV6 and len(frame) >= at + 40:
        return str(ipaddress.IPv6Address(frame[at + 24 : at + 40]))
    return None


def destinations_outside(pcap: Path, allowed: set[str]) -> dict[str, int]:
    """Each address the guest sent frames to that is neither allowed nor link-only, with how
    many frames went there."""
    outside: dict[str, int] = {}
    for frame in _frames(pcap):
        if len(frame) < 14 or frame[6:9] != _GUEST_OUI:
            continue
        address = _destination(frame)
        if address is None or address in allowed:
            continue
        if any(ipaddress.ip_address(address) in net for net in _LINK_ONLY):
            continue
        outside[address] = outside.get(address, 0) + 1
    return outside
