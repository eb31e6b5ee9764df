"""`qemu-test --storage LAYOUT`: a disk target on stacked storage (LVM, thin LVM, mdraid RAID1,
LUKS2, and stacks of them), built on blank virtual disks inside a guest.

This machine's kernel may have no device-mapper or md, so nothing here touches a block device
on the host: the stack is built by the first-stage guest (the host's lvm, mdadm and cryptsetup
over 9p, the Debian kernel's dm and md) just before it registers and crashes, and brought up
again by the read-back guest, which opens everything read-only and tars the dump out.

Every name is fixed and documented (README, "Stacked storage"), so that a config given with
-c can be checked against the layout: VG kdumpvg, LV dump, thin pool pool, array kdumpmd, and
the UUIDs below.
"""

from __future__ import annotations

import json
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdump_mkinitrd.config import Config
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.storage.luks import record_path
from kdump_mkinitrd.targets import Target

VG, LV, POOL, ARRAY = "kdumpvg", "dump", "pool", "kdumpmd"
# The name the harness's own guests open the LUKS volume as (the capture picks its own).
LUKS_NAME = "kdumptestluks"
# The thin pool: most of the VG (two member disks, each as large as a plain target's), or,
# for thin-pool-full, enough for mkfs (under 2 MiB) and far less than any dump's estimate.
FULL_POOL = "90%FREE"
TINY_POOL = "32M"
THIN_VIRTUAL = "2G"
# Kernel modules the harness's guests load to build and open any layout.
GUEST_MODULES = ("dm_mod", "dm_thin_pool", "dm_crypt", "md_mod", "raid1", "xts",
                 "algif_skcipher", "algif_hash")  # fmt: skip
# Without udev in the guests: libdevmapper makes its own /dev nodes; LVM writes no backups or
# archives on the read-only root, scans /dev itself and asks for no devices file.
ENVIRONMENT = ("DM_DISABLE_UDEV=1", "LVM_SYSTEM_DIR=/run/kdump-test-lvm")
LVM_CONF = """\
global { use_lvmlockd = 0 locking_dir = "/run/lock/lvm" }
backup { backup = 0 archive = 0 }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 }
"""


@dataclass(frozen=True)
class Layout:
    name: str
    layers: tuple[str, ...]  # bottom first: "raid", "lvm", "luks"
    fs_uuid: str
    thin: bool = False
    md_uuid: str = ""  # mdadm's form, xxxxxxxx:xxxxxxxx:xxxxxxxx:xxxxxxxx
    luks_uuid: str = ""

    @property
    def members(self) -> int:
        """Virtual disks under the stack: RAID1's two members, or two PVs, so that a missing
        one matters (the LV spans both), or the one disk LUKS sits on."""
        return 2 if {"raid", "lvm"} & set(self.layers) else 1

    def stack(self, key_file: Path | None) -> list[dict[str, str]]:
        """The disk target's `stack:` for this layout, bottom first."""
        items: list[dict[str, str]] = []
        for layer in self.layers:
            if layer == "raid":
                items.append({"type": "raid", "uuid": self.md_uuid, "name": ARRAY})
            elif layer == "lvm":
                items.append({"type": "lvm", "vg": VG, "lv": LV})
            else:
                items.append({"type": "luks", "uuid": self.luks_uuid})
                if key_file is not None:
                    items[-1]["key_file"] = str(key_file)
        return items


LAYOUTS = {layout.name: layout for layout in (
    Layout("lvm", ("lvm",), "6b0e3a52-7c1d-4e8f-9a2b-3c4d5e6f7a01"),
    Layout("lvm-thin", ("lvm",), "6b0e3a52-7c1d-4e8f-9a2b-3c4d5e6f7a02", thin=True),
    Layout("raid1", ("raid",), "6b0e3a52-7c1d-4e8f-9a2b-3c4d5e6f7a03",
           md_uuid="4b2d6e10:8a3c4f57:9e1b2d3c:4f5a6b03"),
    Layout("luks", ("luks",), "6b0e3a52-7c1d-4e8f-9a2b-3c4d5e6f7a04",
           luks_uuid="2f9c8e71-5d4a-4b3c-8e2f-1a0b9c8d7e04"),
    Layout("luks-on-lvm", ("lvm", "luks"), "6b0e3a52-7c1d-4e8f-9a2b-3c4d5e6f7a05",
           luks_uuid="2f9c8e71-5d4a-4b3c-8e2f-1a0b9c8d7e05"),
    Layout("lvm-on-raid1", ("raid", "lvm"), "6b0e3a52-7c1d-4e8f-9a2b-3c4d5e6f7a06",
           md_uuid="4b2d6e10:8a3c4f57:9e1b2d3c:4f5a6b06"),
)}  # fmt: skip


def config_text(layout: Layout, key_file: Path, hostonly: bool, fallback: bool) -> str:
    """The config qemu-test writes for a layout. Host-only: no stack (detection finds it) and
    no drivers, except that a LUKS layer still names its key file, which sysfs cannot show."""
    stack = layout.stack(key_file)
    if hostonly and "luks" not in layout.layers:
        stack = []
    lines = ["targets:",
             f"  - type: disk\n    device: UUID={layout.fs_uuid}\n    fstype: ext4\n"
             "    path: /var/crash"]  # fmt: skip
    if stack:
        lines.append("    stack:")
        lines += ["      - {" + ", ".join(f"{k}: {v}" for k, v in item.items()) + "}"
                  for item in stack]  # fmt: skip
    if fallback:  # a plain disk that takes the dump when the stacked target fails
        lines.append("  - {type: disk, device: UUID=6b0e3a52-7c1d-4e8f-9a2b-3c4d5e6f7aff, "
                     "fstype: ext4, path: /var/crash}")  # fmt: skip
    if not hostonly:
        lines.append("kernel_modules: [virtio_blk, virtio_pci]")
    lines += ["failure_action: poweroff", "final_action: poweroff", "device_timeout: 30", ""]
    return "\n".join(lines)


def _value(layer: object, key: str) -> Any:
    return getattr(layer, key, None)  # each layer type has its own fields


def check_config(layout: Layout, config: Config, config_path: Path, hostonly: bool) -> Target:
    """The config's first target must be the layout's: a disk target with its stack, named
    with the documented names (host-only: or with no stack, which detection then finds).
    Returns it."""
    where = f"{config_path}: targets[0]"
    target = config.targets[0] if config.targets else None
    if target is None or target.type != "disk":
        raise KdumpError(f"{where}: --storage {layout.name} needs a disk target first")
    found = list(target.layers())
    if hostonly and not found:
        return target
    wanted = layout.stack(None)
    found_types = [layer.type for layer in found]
    if found_types != [item["type"] for item in wanted]:
        raise KdumpError(
            f"{where}.stack: --storage {layout.name} builds "
            f"[{', '.join(i['type'] for i in wanted)}] (bottom first); the config has "
            f"[{', '.join(found_types)}]"
        )
    for n, (layer, item) in enumerate(zip(found, wanted, strict=True)):
        for key, value in item.items():
            if key in ("type", "name"):
                continue
            if _value(layer, key) != value:
                raise KdumpError(
                    f"{where}.stack[{n}].{key}: --storage {layout.name} names it {value!r} "
                    f"(the README's layout table); the config has {_value(layer, key)!r}"
                )
    return target


# The admin's keyslot costs little to derive under TCG; the kdump keyslot is added as
# luks-setup adds one (PBKDF2, SHA-256), with a fixed iteration count instead of luks-setup's
# timed one: TCG's timing means nothing.
LUKS_FORMAT = ("cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "argon2id",
               "--pbkdf-memory", "65536", "--pbkdf-force-iterations", "4",
               "--pbkdf-parallel", "1", "--uuid")  # fmt: skip
KDUMP_KEYSLOT = 1
KDUMP_KDF = {"type": "pbkdf2", "hash": "sha256", "iterations": 1000, "memory_kib": 0}
ADD_KDUMP_KEY = ("cryptsetup", "luksAddKey", "-q", "--key-slot", str(KDUMP_KEYSLOT),
                 "--pbkdf", "pbkdf2", "--hash", "sha256",
                 "--pbkdf-force-iterations", str(KDUMP_KDF["iterations"]))  # fmt: skip


def luks_key_file(layout: Layout, target: Target, workdir: Path) -> Path | None:
    """The kdump key file the LUKS layer uses: the config's, made here when it does not exist
    yet (64 random bytes, 0600, and luks-setup's record of the keyslot it opens)."""
    if "luks" not in layout.layers:
        return None
    luks = next((layer for layer in target.layers() if layer.type == "luks"), None)
    key = _value(luks, "key_file") if luks is not None else None
    path = Path(key) if key else workdir / "luks" / f"{layout.luks_uuid}.key"
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_bytes(secrets.token_bytes(64))
        path.chmod(0o600)
        record = {
            "uuid": layout.luks_uuid,
            "version": 2,
            "keyslot": KDUMP_KEYSLOT,
            "kdf": KDUMP_KDF,
            "key_file": str(path),
            "tool": "kdump-mkinitrd qemu-test",
        }
        record_path(path).write_text(json.dumps(record, indent=1) + "\n")
        record_path(path).chmod(0o600)
    return path


@dataclass(frozen=True)
class Scripts:
    """What the guests run: `build` makes the stack and its filesystem, then takes it down
    again (nothing cached, md marked clean); `read_back` opens it read-only and tars the dump
    directory out."""

    build: Path
    read_back: Path


def _q(*words: str | Path) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def passphrase_file(workdir: Path) -> Path:
    """The admin's passphrase (LUKS keyslot 0): what the read-back guest opens the volume with,
    so it can still read after --fault luks-bad-key removed the kdump keyslot."""
    path = workdir / "luks" / "passphrase"
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text("kdump-test-admin-passphrase")
        path.chmod(0o600)
    return path


def _prologue() -> list[str]:
    return [
        "#!/bin/sh",
        "set -eu",
        "export " + " ".join(ENVIRONMENT),
        "mkdir -p /run/kdump-test-lvm /run/lock/lvm /run/cryptsetup /run/mdadm",
        f"cat > /run/kdump-test-lvm/lvm.conf <<'EOF'\n{LVM_CONF}EOF",
    ]


def write_scripts(
    layout: Layout,
    workdir: Path,
    members: list[str],
    mkfs: list[str],
    key_file: Path | None,
    fault: str | None,
    read_back: list[tuple[str, str, str]],
    out_device: str,
    stacked_path: str,
    keep_up: bool,
) -> Scripts:
    """`members`: the guest's names of the member disks; `mkfs`: the filesystem's command
    without its device; `read_back`: (device, fstype, path) of the other disk targets in
    config order after the stacked one; `out_device`: the scratch disk for the tar; `keep_up`:
    leave the stack open after the build, for host-only detection to find it."""
    passphrase = passphrase_file(workdir) if "luks" in layout.layers else None
    build, up = _prologue(), _prologue()
    down: list[str] = []
    device = " ".join(members)
    for layer in layout.layers:
        if layer == "raid":
            build.append(
                _q("mdadm", "--create", f"/dev/md/{ARRAY}", "--run", "--assume-clean",
                   "--level=1", f"--raid-devices={len(device.split())}", "--metadata=1.2",
                   f"--name={ARRAY}", f"--uuid={layout.md_uuid}") + " " + device
            )  # fmt: skip
            # A member the capture found missing is stale now: start on the fresh one.
            up.append(_q("mdadm", "--assemble", "--run", "--readonly", f"/dev/md/{ARRAY}")
                      + " " + device)  # fmt: skip
            down.insert(0, _q("mdadm", "--stop", f"/dev/md/{ARRAY}"))
            device = f"/dev/md/{ARRAY}"
        elif layer == "lvm":
            build += [f"pvcreate -ff -y {device}", f"vgcreate {VG} {device}"]
            pool = TINY_POOL if fault == "thin-pool-full" else None
            if layout.thin:
                size = f"-L {pool}" if pool else f"-l {FULL_POOL}"
                build += [f"lvcreate -y --type thin-pool -n {POOL} {size} {VG}",
                          f"lvcreate -y --type thin -n {LV} -V {THIN_VIRTUAL} --thinpool {POOL} "
                          f"{VG}"]  # fmt: skip
            else:  # linear over every PV: a missing PV makes the LV incomplete
                build.append(f"lvcreate -y -n {LV} -l 100%FREE {VG}")
            up.append(_q("vgchange", "-ay", VG))
            down.insert(0, _q("vgchange", "-an", VG))
            device = f"/dev/{VG}/{LV}"
        else:
            assert key_file is not None and passphrase is not None
            # Slot 0: the admin's passphrase; slot 1: the kdump key file, as luks-setup adds it.
            build.append(f"{_q(*LUKS_FORMAT, layout.luks_uuid, '--key-file', passphrase)} {device}")
            build.append(f"{_q(*ADD_KDUMP_KEY, '--key-file', passphrase)} {device} {_q(key_file)}")
            if fault == "luks-bad-key":  # after the image was built with the key file in it
                build.append(f"cryptsetup luksKillSlot -q {device} {KDUMP_KEYSLOT}")
            build.append(_q("cryptsetup", "open", "--key-file", passphrase) + f" {device} "
                         + LUKS_NAME)  # fmt: skip
            up.append(_q("cryptsetup", "open", "--readonly", "--key-file", passphrase)
                      + f" {device} {LUKS_NAME}")  # fmt: skip
            down.insert(0, _q("cryptsetup", "close", LUKS_NAME))
            device = f"/dev/mapper/{LUKS_NAME}"
        build.append(f"echo 'kdump-test: storage layer {layer} up'")
    build += [
        _q(*mkfs) + f" {device}",
        "sync",
        "lvs -a 2>/dev/null || true",
        *([] if keep_up else down),
        f"echo 'kdump-test: storage layout {layout.name} built'",
    ]
    up += ["mkdir -p /run/out/t0 /run/mnt/t0",
           f"mount -o ro -t ext4 {device} /run/mnt/t0",
           f"echo 'kdump-test: mounted {device}'",
           "set +e",  # a failed target may have no dump folder: read the others still
           _q("mount", "--bind", f"/run/mnt/t0{stacked_path}", "/run/out/t0")]  # fmt: skip
    for n, (plain, fstype, path) in enumerate(read_back, start=1):
        up += [f"mkdir -p /run/out/t{n} /run/mnt/t{n}",
               f"mount -o ro -t {fstype} {plain} /run/mnt/t{n} && "
               + _q("mount", "--bind", f"/run/mnt/t{n}{path}", f"/run/out/t{n}")]  # fmt: skip
    # Nothing to take down: the guest only read, and powers off.
    up += [f"tar -cf {out_device} -C /run/out .", "sync", "echo 'kdump-test: read-back done'"]
    scripts = Scripts(workdir / "storage-build.sh", workdir / "storage-read-back.sh")
    scripts.build.write_text("\n".join(build) + "\n")
    scripts.read_back.write_text("\n".join(up) + "\n")
    return scripts
