"""`kdump-mkinitrd qemu-test`: prove an image saves a real crash dump on a given kernel.

One QEMU guest boots the kernel with memory reserved by crashkernel=, arms the capture kernel
and our image, and crashes through sysrq; the capture kernel saves the dump and powers off.
A second short boot copies the target's dump directory out, and the host checks every file
and asks makedumpfile, an independent reader, for the same panic line.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import kdump_mkinitrd
from kdump_mkinitrd import config as config_mod
from kdump_mkinitrd.arming.cmdline import normalise_arch
from kdump_mkinitrd.arming.sshsetup import ensure_key
from kdump_mkinitrd.capture.filedigest import sha256_file
from kdump_mkinitrd.capture.vmcore_json import problems
from kdump_mkinitrd.config import Config
from kdump_mkinitrd.dumps import rawrecovery as raw
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image import targetarch
from kdump_mkinitrd.image.build import BuildRequest, build
from kdump_mkinitrd.progress import Progress
from kdump_mkinitrd.qemutest import faults, guest_traffic, layouts
from kdump_mkinitrd.qemutest.guest_images import host_root_image, utility_image
from kdump_mkinitrd.qemutest.nfsserver import TestNfsServer
from kdump_mkinitrd.qemutest.qemu import Boot, default_accel, run
from kdump_mkinitrd.qemutest.qemu import machine as guest_machine
from kdump_mkinitrd.qemutest.sshd import TestServer
from kdump_mkinitrd.targets import Target
from kdump_mkinitrd.targets.nfs import NfsTarget
from kdump_mkinitrd.targets.ssh import SshTarget

PANIC_LINE = "sysrq: Trigger a crash"
# What a capture kernel wants on its command line (issue: register builds this from the host's).
CAPTURE_CMDLINE = (
    "console=ttyS0 irqpoll nr_cpus=1 reset_devices cgroup_disable=memory "
    "transparent_hugepage=never novmcoredd panic=-1 acpi_no_memhotplug"
)
DEFAULT_CONFIG = """\
targets:
  - type: disk
    device: UUID={uuid}
    fstype: ext4
    path: /var/crash
kernel_modules: [virtio_blk, virtio_pci]
failure_action: poweroff
final_action: poweroff
device_timeout: 30
"""
# --target ssh: the guest dumps into a throwaway OpenSSH server on the host's 127.0.0.1, which
# QEMU's user-mode network shows the guest as 10.0.2.2. A config given with -c may use these
# placeholders; qemu-test fills them in for its own server and refuses any other ssh server.
GUEST_HOST = "10.0.2.2"
SSH_CONFIG = """\
targets:
  - type: ssh
    host: "@SSH_HOST@"
    port: @SSH_PORT@
    path: "@SSH_PATH@"
    identity: "@SSH_IDENTITY@"
    known_hosts: "@SSH_KNOWN_HOSTS@"
    client: "@SSH_CLIENT@"
kernel_modules: [virtio_pci, virtio_net]
failure_action: poweroff
final_action: poweroff
device_timeout: 30
"""
# --target nfs: the same for NFS-Ganesha in a network namespace of its own (nfsserver.py).
NFS_CONFIG = """\
targets:
  - type: nfs
    export: "@NFS_EXPORT@"
    path: /var/crash
kernel_modules: [virtio_pci, virtio_net]
failure_action: poweroff
final_action: poweroff
device_timeout: 30
"""
NETWORK = ("-netdev", "user,id=n0,ipv6=off", "-device", "virtio-net-pci,netdev=n0")
# --fault net-down: a NIC whose link is up, on a hub with nothing else on it.
DEAD_NETWORK = ("-netdev", "hubport,id=n0,hubid=0", "-device", "virtio-net-pci,netdev=n0")
# The virtual hardware qemu-test gives its guests: their drivers go into every image it builds,
# whatever the config names (a production config names its own host's, or none with
# --hostonly), or the capture kernel would see no disk at all.
MACHINE_DRIVERS = ("virtio_pci", "virtio_blk")
MACHINE_NIC_DRIVER = "virtio_net"
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}
LETTERS = "abcdefghijklmnop"  # the guest's virtio disks: /dev/vda, /dev/vdb...


@dataclass
class Options:
    kver: str
    kmoddir: Path
    kernel: Path
    config: Path | None = None
    memory: str = "1G"
    crashkernel: str = "256M"
    keep: Path | None = None
    append: str = ""  # extra capture-kernel arguments (tests use them to inject faults)
    # How the first guest arms the capture kernel: our own `register` (kexec_file_load), the
    # same after building the image inside the guest with --hostonly, or kexec-tools.
    first_stage: str = "register"
    fault: str | None = None  # a name from kdump_mkinitrd.qemutest.faults.FAULTS
    timeout: float = 600.0
    # disk: local disks for disk and raw targets; ssh: also a test OpenSSH server for ssh
    # ones; nfs: a test NFS server for nfs ones.
    target: str = "disk"
    nfs_protocols: str = "3, 4"  # what the test NFS server offers
    ssh_client: str = "openssh"  # the client that @SSH_CLIENT@ names
    storage: str | None = None  # a layout from kdump_mkinitrd.qemutest.layouts.LAYOUTS
    # The guest's architecture; another than the host's needs a `sysroot` of it (the programs
    # the images and the first stage's `register` run).
    arch: str = "x86_64"
    sysroot: Path | None = None
    progress: Progress = field(default_factory=Progress)  # silent unless given a stream


@dataclass
class Report:
    ok: bool = False
    workdir: str = ""
    dump_dir: str | None = None
    files: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    image_size: int = 0
    vmcore_size: int = 0
    stage: str | None = None
    serial_log: str = ""
    # QEMU's drivers that qemu-test added to the image because the config does not name them.
    machine_drivers: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        self.checks[name] = passed
        if not passed:
            self.problems.append(f"{name}: {detail}" if detail else name)

    def summary(self) -> str:
        lines = [f"qemu-test: {'PASS' if self.ok else 'FAIL'}"]
        lines.append("  timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        lines.append(f"  capture image: {self.image_size / 1e6:.2f} MB")
        if self.machine_drivers:
            lines.append(
                f"  added for QEMU's virtual hardware (not in the config): "
                f"{', '.join(self.machine_drivers)}"
            )
        if self.dump_dir:
            lines.append(
                f"  dump: {self.dump_dir} (vmcore {self.vmcore_size / 1e6:.1f} MB, "
                f"saved by the {self.stage} stage)"
            )
        lines.append(f"  serial log: {self.serial_log}")
        lines += [f"  check failed: {p}" for p in self.problems]
        return "\n".join(lines)


def _mb(size: str) -> int:
    units = {"K": 1 / 1024, "M": 1, "G": 1024}
    return (
        int(float(size[:-1]) * units[size[-1].upper()])
        if size[-1].isalpha()
        else int(size) // 2**20
    )


def _default_config(workdir: Path) -> Path:
    path = workdir / "kdump.yaml"
    path.write_text(DEFAULT_CONFIG.format(uuid=uuid.uuid4()))
    return path


def _mkfs_command(target: Target) -> list[str]:
    """mkfs for the target's filesystem with its UUID or LABEL, without the device."""
    assert target.fstype is not None
    cmd = list(MKFS[target.fstype])
    device = target.device or ""
    if device.startswith("UUID="):
        flag = {"ext4": ["-U"], "xfs": ["-m"], "btrfs": ["-U"]}[target.fstype]
        value = device[5:] if target.fstype != "xfs" else f"uuid={device[5:]}"
        cmd += [*flag, value]
    elif device.startswith("LABEL="):
        cmd += ["-L", device[6:]]
    return cmd


def _blank_disk(path: Path, size_mb: int) -> None:
    with path.open("wb") as disk:
        disk.truncate(size_mb * 2**20)


def _make_disk(path: Path, target: Target, size_mb: int) -> None:
    """A sparse disk image formatted as the target says: with its UUID or LABEL, or inside a
    GPT partition carrying its PARTUUID."""
    _blank_disk(path, size_mb)
    if target.type != "disk" or target.fstype is None:
        return
    cmd = _mkfs_command(target)
    device = target.device or ""
    if not device.startswith("PARTUUID="):
        subprocess.run([*cmd, str(path)], check=True, capture_output=True)
        return
    table = f"label: gpt\nstart=2048, type=linux, uuid={device[9:]}\n"
    subprocess.run(["sfdisk", "-q", str(path)], input=table, text=True, check=True,
                   capture_output=True)  # fmt: skip
    # mkfs cannot write at an offset for every filesystem: build it apart, then place it.
    part = path.with_suffix(".part")
    with part.open("wb") as f:
        f.truncate((size_mb - 2) * 2**20)
    subprocess.run([*cmd, str(part)], check=True, capture_output=True)
    subprocess.run(["dd", f"if={part}", f"of={path}", "bs=1M", "seek=1", "conv=notrunc,sparse",
                    "status=none"], check=True)  # fmt: skip
    part.unlink()


def _disk_size_mb(options: Options) -> int:
    # Room for an unfiltered copy of all guest memory, the worst case of the static fallback.
    return _mb(options.memory) + 512


def _first_stage_with_kexec_tools(options: Options, first: Path, image: Path) -> tuple[str, ...]:
    utility_image(
        first, options.kver, options.kmoddir, "first-stage.sh.j2",
        {"capture_cmdline": f"{CAPTURE_CMDLINE} {options.append}".strip()},
        programs=["kexec"],
        files={"/kdump/vmlinuz": options.kernel, "/kdump/capture.img": image},
    )  # fmt: skip
    return ()


def _first_stage_with_register(
    options: Options,
    first: Path,
    image: Path,
    config_path: Path,
    network: bool,
    prepare: tuple[str, ...] = (),
) -> tuple[str, ...]:
    """The guest runs this very installation of kdump-mkinitrd from the host's root (9p);
    `prepare`, a command run first (--storage: build the stack on the blank disks)."""
    python, environment = _guest_python(options, first.parent)
    command = [
        python, "-m", "kdump_mkinitrd.cli", "register", "-k", options.kver,
        "--kmoddir", str(options.kmoddir.resolve()),
        "--kernel", str(options.kernel.resolve()),
        "-c", str(config_path.resolve()),
    ]  # fmt: skip
    if options.first_stage == "hostonly":
        # Built inside the guest, from what it sees: its kernel, its disks, its sysfs.
        command += ["--image", "/run/kdump-mkinitrd/capture.img", "--hostonly"]
    else:
        command += ["--image", str(image.resolve()), "--no-hostonly"]
    if options.append:
        command += ["--append", options.append]
    # `status` must then say: loaded, and the image up to date (exit 0), or the guest stops.
    status = [python, "-m", "kdump_mkinitrd.cli", "status"]
    return host_root_image(
        first, options.kver, options.kmoddir, [*([prepare] if prepare else []), command, status],
        crash=True, network=network,
        # Not /tmp: configs and work directories often live there on the host.
        writable=["/run"],
        environment=["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/run", "TMPDIR=/run",
                     "XDG_CACHE_HOME=/run/cache", "PYTHONDONTWRITEBYTECODE=1",
                     "KDUMP_MKINITRD_STATE_DIR=/run/kdump-mkinitrd", *environment],
        modules=["virtio_blk", *(["virtio_net"] if network else []),
                 *(layouts.GUEST_MODULES if prepare else [])],
        sysroot=options.sysroot,
    )  # fmt: skip


def _guest_python(options: Options, workdir: Path) -> tuple[str, list[str]]:
    """The interpreter the first stage runs kdump-mkinitrd with, and the environment it needs.
    A guest of the host's architecture runs the host's own; another runs the sysroot's
    python3, which finds this checkout's package through a folder on PYTHONPATH (the
    sysroot holds the package's dependencies, Debian's python3-* of that architecture)."""
    if options.sysroot is None:
        return sys.executable, []
    folder = workdir / "pythonpath"
    folder.mkdir(exist_ok=True)
    link = folder / "kdump_mkinitrd"
    link.unlink(missing_ok=True)
    link.symlink_to(Path(kdump_mkinitrd.__file__).resolve().parent)
    return "/usr/bin/python3", [f"PYTHONPATH={folder}"]


def _cmdline(options: Options, rest: str) -> str:
    return f"console={guest_machine(options.arch).console} {rest}"


def _capture_boot(
    options: Options,
    workdir: Path,
    image: Path,
    disks: list[Path],
    config_path: Path,
    network: tuple[str, ...] = (),
    serial_log: str = "serial.log",
    kill_when: tuple[str, ...] = (),
    monitor_when: Callable[[], bool] | None = None,
    monitor_command: str = "",
    wrapper: tuple[str, ...] = (),
    on_line: Callable[[str], None] | None = None,
    machine: tuple[str, ...] = (),
    prepare: tuple[str, ...] = (),
) -> tuple[str, float]:
    first = workdir / "first-stage.img"
    if options.first_stage == "kexec-tools":
        extra = _first_stage_with_kexec_tools(options, first, image)
    else:
        extra = _first_stage_with_register(
            options, first, image, config_path, bool(network), prepare
        )
    if network:
        # Proof of where the guest sent packets.
        network += guest_traffic.recording(workdir / Path(serial_log).with_suffix(".pcap"))
    result = run(
        Boot(
            kernel=options.kernel,
            initrd=first,
            cmdline=_cmdline(options, f"crashkernel={options.crashkernel} panic=-1"),
            serial_log=workdir / serial_log,
            memory=options.memory,
            disks=tuple(disks),
            accel=default_accel(),
            timeout=options.timeout,
            extra=extra + network + machine,
            arch=options.arch,
            kill_when=kill_when,
            monitor_when=monitor_when,
            monitor_command=monitor_command,
            monitor=workdir / "monitor.sock" if monitor_when else None,
            wrapper=wrapper,
            on_line=on_line,
        )
    )
    return result.log, result.seconds


def _read_back(options: Options, config: Config, workdir: Path, disks: list[Path]) -> Path:
    """Boot once more to tar the disk targets' dump directories onto a scratch disk."""
    readable = [(t, d) for t, d in zip(config.targets, disks, strict=True) if t.type == "disk"]
    scratch = workdir / "read-back.tar"
    with scratch.open("wb") as f:
        f.truncate((_disk_size_mb(options) + 64) * 2**20)
    context = {
        "disks": [
            {
                "index": disks.index(d),
                "fstype": t.fstype,
                "path": t.path,
                "device": f"/dev/vd{LETTERS[disks.index(d)]}"
                + ("1" if (t.device or "").startswith("PARTUUID=") else ""),
            }
            for t, d in readable
        ],
        "out_device": f"/dev/vd{LETTERS[len(disks)]}",
    }
    fstypes = sorted({t.fstype for t, _ in readable if t.fstype})
    image = workdir / "read-back.img"
    utility_image(image, options.kver, options.kmoddir, "read-back.sh.j2", context,
                  modules=["virtio_blk", "virtio_pci", *fstypes],
                  root=options.sysroot or Path("/"))  # fmt: skip
    result = run(
        Boot(
            kernel=options.kernel,
            initrd=image,
            cmdline=_cmdline(options, "panic=-1 quiet"),
            serial_log=workdir / "read-back.log",
            disks=(*disks, scratch),
            accel=default_accel(),
            timeout=300,
            arch=options.arch,
        )
    )
    if "kdump-test: read-back done" not in result.log:
        raise KdumpError(f"the read-back boot failed; see {workdir / 'read-back.log'}")
    out = workdir / "dumps"
    with tarfile.open(scratch) as tar:
        tar.extractall(out, filter="tar")
    scratch.unlink()
    return out


@dataclass(frozen=True)
class Storage:
    """A --storage run: the layout, the disks under its stack, and the guests' scripts."""

    layout: layouts.Layout
    members: list[Path]
    scripts: layouts.Scripts


def _storage_config(options: Options, workdir: Path, fault: faults.Fault | None) -> Path:
    """The config qemu-test writes for --storage (with a plain second disk when the fault
    needs the next target), or the -c one."""
    if options.config is not None:
        return options.config.resolve()
    layout = layouts.LAYOUTS[options.storage or ""]
    path = workdir / "kdump.yaml"
    key_file = workdir / "luks" / f"{layout.luks_uuid}.key"
    hostonly = options.first_stage == "hostonly"
    fallback = bool(fault and fault.next_target)
    path.write_text(layouts.config_text(layout, key_file, hostonly, fallback))
    return path


def _storage(options: Options, config: Config, config_path: Path, workdir: Path,
             fault: faults.Fault | None) -> tuple[Storage, list[Path]]:  # fmt: skip
    """Checks the config against the layout and writes the guests' scripts; returns them and
    each target's disk (the stacked target's: its first member)."""
    layout = layouts.LAYOUTS[options.storage or ""]
    hostonly = options.first_stage == "hostonly"
    stacked = layouts.check_config(layout, config, config_path, hostonly)
    if fault is not None and fault.next_target and len(config.targets) < 2:
        raise KdumpError(f"{config_path}: --fault {fault.name} needs a second target to take "
                         "the dump")  # fmt: skip
    if any(t.type != "disk" for t in config.targets[1:]):
        raise KdumpError(f"{config_path}: with --storage, the targets after the stacked one "
                         "must be disk targets")  # fmt: skip
    key_file = layouts.luks_key_file(layout, stacked, workdir)
    members = [workdir / f"member{i}.img" for i in range(layout.members)]
    others = [workdir / f"target{i}.img" for i in range(1, len(config.targets))]
    mkfs = _mkfs_command(stacked)
    if stacked.fstype == "ext4":  # write little: the thin pool may be small on purpose
        mkfs += ["-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"]
    letter = {disk: f"/dev/vd{LETTERS[n]}" for n, disk in enumerate([*members, *others])}
    scripts = layouts.write_scripts(
        layout, workdir, [letter[m] for m in members], mkfs, key_file,
        fault.name if fault else None,
        [(letter[d], t.fstype or "", t.path or "") for t, d in zip(config.targets[1:], others,
                                                                    strict=True)],
        f"/dev/vd{LETTERS[len(members) + len(others)]}", stacked.path or "",
        keep_up=hostonly,
    )  # fmt: skip
    return Storage(layout, members, scripts), [members[0], *others]


def _read_back_storage(options: Options, workdir: Path, disks: list[Path],
                       storage: Storage) -> None:  # fmt: skip
    """A guest with the host's lvm, mdadm and cryptsetup opens the stack read-only and tars
    every disk target's dump folder onto a scratch disk."""
    scratch = workdir / "read-back.tar"
    _blank_disk(scratch, _disk_size_mb(options) + 64)
    image = workdir / "read-back.img"
    extra = host_root_image(
        image, options.kver, options.kmoddir, [["sh", str(storage.scripts.read_back)]],
        crash=False, writable=["/run"], environment=["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        modules=["virtio_blk", "ext4", "xfs", "btrfs", *layouts.GUEST_MODULES],
    )  # fmt: skip
    result = run(Boot(kernel=options.kernel, initrd=image, cmdline="console=ttyS0 panic=-1",
                      serial_log=workdir / "read-back.log", disks=(*disks, scratch),
                      accel=default_accel(), timeout=300, extra=extra))  # fmt: skip
    if "kdump-test: read-back done" not in result.log:
        raise KdumpError(f"the read-back boot failed; see {workdir / 'read-back.log'}")
    with tarfile.open(scratch) as tar:
        tar.extractall(workdir / "dumps", filter="tar")
    scratch.unlink()


def verify_dump(
    dump: Path, report: Report, makedumpfile: Sequence[str] = ("makedumpfile",)
) -> None:
    """Every check the issue names, against one dump directory copied out of the guest;
    `makedumpfile`, the independent reader's command (the guest architecture's)."""
    report.dump_dir = str(dump)
    report.check("dump_dir_mode_0700", dump.stat().st_mode & 0o777 == 0o700,
                 f"{dump.stat().st_mode & 0o777:o}")  # fmt: skip
    for f in sorted(dump.iterdir()):
        mode = f.stat().st_mode & 0o777
        report.files.append({"name": f.name, "size": f.stat().st_size, "mode": f"{mode:04o}"})
        report.check(f"mode_0600:{f.name}", mode == 0o600, f"{mode:o}")
    vmcore = dump / "vmcore"
    report.check("vmcore_present", vmcore.is_file(), "no vmcore (only an incomplete one?)")
    report.check("no_incomplete_file", not (dump / "vmcore.incomplete").exists())
    if not vmcore.is_file():
        return
    report.vmcore_size = vmcore.stat().st_size
    try:
        record = json.loads((dump / "vmcore.json").read_text())
    except (OSError, ValueError) as exc:
        report.check("vmcore_json_readable", False, str(exc))
        return
    report.stage = record.get("stage")
    # One schema for every writer (builder/capture/vmcore_json.py).
    report.check("vmcore_json_schema", not problems(record), "; ".join(problems(record)))
    report.check("json_size_matches", record.get("vmcore_size") == report.vmcore_size)
    report.check("json_sha256_matches", record.get("sha256") == sha256_file(vmcore))
    dmesg = dump / "vmcore-dmesg.txt"
    # A static image without makedumpfile copies /proc/vmcore with dd and has no log reader.
    if record.get("collector") != "dd":
        text = dmesg.read_text(errors="replace") if dmesg.is_file() else ""
        report.check("dmesg_has_panic", PANIC_LINE in text, f"{PANIC_LINE!r} not in {dmesg.name}")
    readable = vmcore
    if record.get("format") == "kdump-compressed-flattened":
        # A streamed dump (ssh, raw) is makedumpfile's flattened format: rebuild it first.
        readable = dump.parent / f"{dump.name}.rebuilt-vmcore"
        with vmcore.open("rb") as stream:
            proc = subprocess.run([*makedumpfile, "-R", str(readable)], stdin=stream,
                                  capture_output=True, text=True)  # fmt: skip
        report.check("makedumpfile_rebuilds_flattened", proc.returncode == 0,
                     proc.stderr.strip()[-300:])  # fmt: skip
    independent = dump.parent / f"{dump.name}.makedumpfile-dmesg.txt"
    proc = subprocess.run([*makedumpfile, "--dump-dmesg", str(readable), str(independent)],
                          capture_output=True, text=True)  # fmt: skip
    theirs = independent.read_text(errors="replace") if independent.exists() else ""
    report.check("makedumpfile_agrees", PANIC_LINE in theirs,
                 proc.stderr.strip()[-300:] or "no panic line")  # fmt: skip


@dataclass
class Servers:
    """The test servers qemu-test started for network targets (at most one of each)."""

    ssh: TestServer | None = None
    nfs: TestNfsServer | None = None

    def stop(self) -> None:
        for server in (self.ssh, self.nfs):
            if server is not None:
                server.stop()

    @property
    def dumps(self) -> Path:
        """Where the dumps a server took are on the host."""
        if self.nfs is not None:
            return self.nfs.export
        assert self.ssh is not None
        return self.ssh.directory.parent / "ssh-dumps"

    def break_for(self, fault: faults.Fault) -> None:
        """The server side of a network fault, made after the image is built."""
        if fault.name == "server-down":
            if self.ssh is not None:
                self.ssh.stop()
            if self.nfs is not None:
                self.nfs.stop_serving()
        elif fault.name == "key-refused" and self.ssh is not None:
            self.ssh.revoke_client_key()


def _streaming(dumps: Path) -> bool:
    """The server holds the first MiB of a dump that is still being written."""
    for path in dumps.rglob("vmcore.incomplete"):
        try:
            if path.stat().st_size > 2**20:
                return True
        except FileNotFoundError:  # renamed meanwhile: complete, too late to cut
            continue
    return False


def _server_config(options: Options, workdir: Path, servers: Servers) -> Path:
    """The config with the test servers' placeholders filled in."""
    text = (
        options.config.read_text()
        if options.config
        else (SSH_CONFIG if servers.ssh else NFS_CONFIG)
    )
    values: dict[str, str] = {}
    if servers.ssh is not None:
        (workdir / "ssh").mkdir(mode=0o700, exist_ok=True)
        known_hosts = workdir / "ssh" / "known_hosts"
        pinned = servers.ssh.known_hosts_line(GUEST_HOST)
        if options.fault == "bad-hostkey":  # pin a key the server does not have
            other = workdir / "ssh" / "other_host_key"
            ensure_key(other, "kdump-mkinitrd-test-wrong-key")
            name, kind, _ = pinned.split()
            pinned = f"{name} {kind} {other.with_suffix('.pub').read_text().split()[1]}"
        known_hosts.write_text(pinned + "\n")
        known_hosts.chmod(0o600)
        values |= {
            "@SSH_HOST@": f"{servers.ssh.user}@{GUEST_HOST}",
            "@SSH_PORT@": str(servers.ssh.port),
            "@SSH_PATH@": str(workdir / "ssh-dumps"),
            "@SSH_IDENTITY@": str(servers.ssh.client_key),
            "@SSH_KNOWN_HOSTS@": str(known_hosts),
            "@SSH_CLIENT@": options.ssh_client,
        }
    if servers.nfs is not None:
        values["@NFS_EXPORT@"] = f"{GUEST_HOST}:{servers.nfs.export}"
    text = re.sub("|".join(map(re.escape, values)), lambda m: values[m.group(0)], text)
    path = workdir / "kdump-test.yaml"
    path.write_text(text)
    return path


def _check_targets(options: Options, config: Config, config_path: Path, servers: Servers) -> None:
    """Every network target must name the server qemu-test started, so the guest never
    reaches anything else."""
    for i, target in enumerate(config.targets):
        if not target.network:
            continue
        if target.type != options.target:
            raise KdumpError(
                f"{config_path}: targets[{i}]: qemu-test makes local disks for disk and raw "
                "targets, and a test server for ssh or nfs targets only with --target ssh "
                "or --target nfs"
            )
        if (
            isinstance(target, SshTarget)
            and servers.ssh is not None
            and (target.host.rpartition("@")[2] != GUEST_HOST or target.port != servers.ssh.port)
        ):
            raise KdumpError(
                f"{config_path}: targets[{i}]: qemu-test --target ssh reaches only its own "
                "server: use host @SSH_HOST@ and port @SSH_PORT@"
            )
        if (
            isinstance(target, NfsTarget)
            and servers.nfs is not None
            and (target.export != f"{GUEST_HOST}:{servers.nfs.export}")
        ):
            raise KdumpError(
                f"{config_path}: targets[{i}]: qemu-test --target nfs reaches only its own "
                "server: use export @NFS_EXPORT@"
            )
    if not config.targets:
        raise KdumpError(f"{config_path}: no targets")


def _dump_parent(target: Target, out: Path) -> Path:
    """Where a target's dump directories are on the host after the run."""
    if isinstance(target, SshTarget):
        return Path(target.path)
    if isinstance(target, NfsTarget):  # the test server exports its own folder, root not squashed
        return Path(target.nfs_path + target.path)
    return out


def _saved_dump(log: str, config: Config, out: Path) -> Path | None:
    """The dump directory of the target the capture log says took the dump."""
    saved = re.findall(r"kdump: dump saved to target (\d+)", log)
    order = [int(saved[-1])] if saved else list(range(len(config.targets)))
    for i in order:
        target = config.targets[i]
        where = _dump_parent(target, out / f"t{i}")
        found = sorted(p for p in where.glob("*") if p.is_dir()) if where.is_dir() else []
        if found:
            return found[-1]
    return None


def run_qemu_test(options: Options) -> Report:
    # The guest's own `register` sees these paths through 9p: give both sides the same names.
    options = replace(options, kernel=options.kernel.resolve(), kmoddir=options.kmoddir.resolve())
    if options.fault:
        if options.fault not in faults.FAULTS:
            raise KdumpError(f"unknown fault {options.fault!r}; known: {', '.join(faults.FAULTS)}")
        if options.target not in faults.FAULTS[options.fault].targets:
            wanted = " or ".join(f"--target {t}" for t in faults.FAULTS[options.fault].targets)
            raise KdumpError(f"--fault {options.fault} needs {wanted}")
        append = f"{options.append} {faults.FAULTS[options.fault].append}".strip()
        options = replace(options, append=append)
    _check_storage(options)
    options = _check_arch(options)
    if options.storage and options.first_stage == "kexec-tools":
        # The stack is built by the first guest, from the host's tools: register's way.
        options = replace(options, first_stage="register")
    workdir = (
        options.keep or Path(tempfile.mkdtemp(prefix="kdump-qemu-test-", dir="/var/tmp"))
    ).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    servers = Servers()
    try:
        if options.target == "ssh":
            servers.ssh = TestServer(workdir / "sshd").start()
        elif options.target == "nfs":
            servers.nfs = TestNfsServer(workdir / "nfs", options.nfs_protocols).start()
        return _run(options, workdir, servers)
    finally:
        servers.stop()


def _check_storage(options: Options) -> None:
    fault = faults.FAULTS[options.fault] if options.fault else None
    if fault is not None and fault.layouts and options.storage not in fault.layouts:
        wanted = " or ".join(f"--storage {name}" for name in fault.layouts)
        raise KdumpError(f"--fault {fault.name} needs {wanted}")
    if options.storage is None:
        return
    if options.storage not in layouts.LAYOUTS:
        raise KdumpError(f"unknown storage layout {options.storage!r}; known: "
                         f"{', '.join(layouts.LAYOUTS)}")  # fmt: skip
    if fault is not None and not fault.layouts:
        raise KdumpError(f"--fault {fault.name} works on plain disks, not with --storage")
    if options.target != "disk":
        raise KdumpError("--storage makes local disks only: it takes no --target ssh or nfs")


def _check_arch(options: Options) -> Options:
    """A guest of another architecture than the host's: what qemu-test can do with it."""
    arch = guest_machine(options.arch).arch
    options = replace(options, arch=arch)
    if options.sysroot is not None:
        options = replace(options, sysroot=options.sysroot.resolve())
    if arch == normalise_arch(platform.machine()):
        return options
    if options.sysroot is None:
        raise KdumpError(f"an {arch} guest needs --sysroot: a root tree of {arch} programs "
                         "(`make sysroot-arm64` unpacks one from Debian's packages)")  # fmt: skip
    if options.first_stage == "kexec-tools":
        raise KdumpError(f"--first-stage kexec-tools arms {platform.machine()} guests only; an "
                         f"{arch} guest runs the sysroot's `register`")  # fmt: skip
    if options.storage or options.fault or options.target != "disk":
        raise KdumpError(f"an {arch} guest saves to plain disks: --storage, --fault and "
                         "--target ssh or nfs run on this host's architecture only")  # fmt: skip
    return options


def _with_machine_drivers(config: Config) -> tuple[Config, list[str]]:
    """The config with the drivers of QEMU's virtual hardware added; which it lacked."""
    network = any(t.network for t in config.targets)
    wanted = [*MACHINE_DRIVERS, *([MACHINE_NIC_DRIVER] if network else [])]
    added = [name for name in wanted if name not in config.kernel_modules]
    return replace(config, kernel_modules=(*config.kernel_modules, *added)), added


class _ConsolePhases:
    """A crash boot's console as progress: the first stage arming the capture kernel, the
    crash, then the capture kernel's own `kdump:` lines as they arrive."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress, self.label, self.capturing = progress, label, False

    def __call__(self, line: str) -> None:
        if "kdump-test: first stage up" in line:
            self.progress.phase(f"{self.label}loading the capture kernel")
        elif "kdump-test: crashing now" in line:
            self.progress.phase(f"{self.label}crash: the capture kernel boots")
        elif "kdump: " in line:
            if not self.capturing:
                self.capturing = True
                self.progress.phase(f"{self.label}capture")
            self.progress.detail(line[line.index("kdump: ") :])


def _written(disk: Path, allocated: int) -> bool:
    """The guest has written the disk image up to `allocated` bytes (it starts sparse)."""
    return disk.stat().st_blocks * 512 >= allocated


def _logged(log: Path, marker: str) -> bool:
    try:
        return marker in log.read_text(errors="replace")
    except FileNotFoundError:
        return False


def _breakage(
    fault: faults.Fault, servers: Servers, disks: list[Path], facts: dict[str, str]
) -> tuple[Callable[[], bool] | None, str]:
    """When, during the crash boot, QEMU's monitor breaks what the fault breaks, and how."""
    if fault.drop_member:  # the second member disk fails every request from the crash on
        serial = disks[0].parent / "serial.log"
        return partial(_logged, serial, "kdump-test: crashing now"), "drive_del virtio1"
    if fault.cut_network:  # the NIC's link goes down once the server holds part of the dump
        return partial(_streaming, servers.dumps), "set_link n0 off"
    if fault.cut_disk:  # the first disk fails every request once part of the dump is on it
        return partial(_written, disks[0], int(facts["cut_at_bytes"])), "drive_del virtio0"
    return None, ""


def _recover_raw_targets(config: Config, disks: list[Path], out: Path, report: Report) -> None:
    for i, (target, disk) in enumerate(zip(config.targets, disks, strict=True)):
        if target.type == "raw" and raw.read_header(disk) is not None:
            raw.recover(disk, out / f"t{i}")
            report.check("raw_header_cleared", raw.read_header(disk) is None)


def _run(options: Options, workdir: Path, servers: Servers) -> Report:
    progress = options.progress
    report = Report(workdir=str(workdir), serial_log=str(workdir / "serial.log"))
    fault = faults.FAULTS[options.fault] if options.fault else None
    if servers.ssh or servers.nfs:
        config_path = _server_config(options, workdir, servers)
    elif options.storage:
        config_path = _storage_config(options, workdir, fault)
    else:
        config_path = (options.config or _default_config(workdir)).resolve()
    config = config_mod.load(config_path)
    _check_targets(options, config, config_path, servers)
    storage = None
    if options.storage:  # before the build: it makes the LUKS key file the image holds
        storage, target_disks = _storage(options, config, config_path, workdir, fault)
    image = workdir / "capture.img"
    progress.phase("building the capture image")
    start = time.monotonic()
    config, report.machine_drivers = _with_machine_drivers(config)
    # The Python stage's fault switches come only in images built here, never in production.
    request = BuildRequest(options.kver, options.kmoddir, image, options.kernel, test_switches=True,
                           root=options.sysroot or Path("/"), arch=options.arch,
                           boot_dir=options.kernel.parent)  # fmt: skip
    built = build(config, request)
    report.timings["build"] = time.monotonic() - start
    report.image_size = built.size
    if storage is None:
        target_disks = [workdir / f"target{i}.img" for i in range(len(config.targets))]
        disks = target_disks
    else:  # blank members: the first guest builds the stack on them
        for member in storage.members:
            _blank_disk(member, _disk_size_mb(options))
        disks = [*storage.members, *target_disks[1:]]
    for target, disk in zip(config.targets, target_disks, strict=True):
        if storage is not None and disk == storage.members[0]:
            continue
        # A network target gets a tiny placeholder so that disk names stay in config order.
        network_target = target.network
        _make_disk(disk, target, 1 if network_target else _disk_size_mb(options))
    facts = faults.prepare(fault, config, disks, workdir) if fault else {}
    network: tuple[str, ...] = ()
    if any(t.network for t in config.targets):
        network = DEAD_NETWORK if options.fault == "net-down" else NETWORK
    if fault is not None and fault.targets != ("disk",):
        servers.break_for(fault)
        # The log line a fault leaves can depend on the ssh client: "ssh/dropbear".
        first = config.targets[0]
        client = first.client if isinstance(first, SshTarget) else None
        facts |= {
            "target": options.target + (f"/{client}" if client else ""),
            "server_dumps": str(servers.dumps),
        }
    wrapper = servers.nfs.netns() if servers.nfs else ()
    logs = []
    crashes = fault.crashes if fault else 1
    for n in range(crashes):
        last = n == crashes - 1
        label = f"crash {n + 1} of {crashes}: " if crashes > 1 else ""
        progress.phase(f"{label}booting the first kernel")
        monitor_when, monitor_command = (
            _breakage(fault, servers, disks, facts) if fault and last else (None, "")
        )
        log, seconds = _capture_boot(
            options, workdir, image, disks, config_path, network,
            serial_log="serial.log" if n == 0 else f"serial-{n + 1}.log",
            kill_when=fault.kill_when if fault and last else (),
            monitor_when=monitor_when, monitor_command=monitor_command,
            wrapper=wrapper, on_line=_ConsolePhases(progress, label),
            machine=fault.machine(n) if fault else (),
            prepare=("sh", str(storage.scripts.build)) if storage else (),
        )  # fmt: skip
        logs.append(log)
        if fault is not None:
            faults.after_crash(fault, n, disks, facts)
        report.timings["crash_and_capture" if n == 0 else f"crash_and_capture_{n + 1}"] = seconds
    if network == NETWORK:
        outside: dict[str, int] = {}
        for pcap in sorted(workdir.glob("serial*.pcap")):
            outside |= guest_traffic.destinations_outside(pcap, {GUEST_HOST})
        report.check("guest_sent_only_to_the_test_servers", not outside,
                     ", ".join(f"{n} frames to {a}" for a, n in outside.items()))  # fmt: skip
    report.check("capture_kernel_loaded", "kdump-test: capture kernel loaded" in log)
    report.check("capture_kernel_booted", "kdump: capture environment for kernel" in log)
    progress.phase("reading the dumps back")
    start = time.monotonic()
    out = workdir / "dumps"
    if storage is not None:
        _read_back_storage(options, workdir, disks, storage)
    elif fault is None or fault.read_back:
        if any(t.type == "disk" for t in config.targets):
            _read_back(options, config, workdir, disks)
        _recover_raw_targets(config, target_disks, out, report)
    report.timings["read_back"] = time.monotonic() - start
    if fault is not None:
        progress.phase("checking the fault's outcome")
        # The dump the fault's outcome saved (a fallback, the next target) is checked in full.
        dump = faults.check(fault, logs, out, facts, report)
    else:
        progress.phase("checking the dump")
        report.check("dump_saved", "kdump: dump saved to target" in log)
        dump = _saved_dump(log, config, out)
        report.check("dump_dir_found", dump is not None, f"nothing under {out} or the ssh paths")
    if dump is not None:
        verify_dump(dump, report, _makedumpfile(options))
    report.ok = not report.problems
    progress.done()
    if report.ok and options.keep is None:
        for disk in disks:
            disk.unlink()
    return report


def _makedumpfile(options: Options) -> list[str]:
    """makedumpfile reads only dumps of its own architecture: for another, the sysroot's,
    under QEMU's user-mode emulation on this host (no second boot)."""
    if options.sysroot is None:
        return ["makedumpfile"]
    machine = targetarch.arch_named(options.arch)
    return targetarch.Target(machine, options.sysroot).command("/usr/bin/makedumpfile")


def check_tools(arch: str = "x86_64") -> None:
    program = guest_machine(arch).program  # refuses an architecture qemu-test cannot boot
    # kexec-tools: the host's arms an x86_64 guest's --first-stage kexec-tools.
    native = ("kexec",) if program == "qemu-system-x86_64" else ()
    for tool in (program, "makedumpfile", "mkfs.ext4", *native):
        if shutil.which(tool) is None:
            raise KdumpError(f"qemu-test needs {tool}; run `make setup` (Debian packages)")
