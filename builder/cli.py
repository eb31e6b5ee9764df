"""The `kdump-mkinitrd` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdump_mkinitrd import config as config_mod
from kdump_mkinitrd.arming import lukssetup
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import defaulttarget, kernelfiles
from kdump_mkinitrd.image.build import BuildRequest, build
from kdump_mkinitrd.image.inspect_image import report, text
from kdump_mkinitrd.importing import command as import_command
from kdump_mkinitrd.paths import HARNESS_DIR
from kdump_mkinitrd.targets.ssh import SSH_CLIENTS
from kdump_mkinitrd.targets.sshkeys import SSH_IDENTITY, SSH_KNOWN_HOSTS

if TYPE_CHECKING:
    from kdump_mkinitrd.progress import Progress

DEFAULT_IMAGE_DIR = Path("/var/lib/kdump-mkinitrd")
SUBCOMMANDS = (
    "build", "inspect", "qemu-test", "recover-raw", "register", "unregister", "status", "estimate",
    "ssh-setup", "luks-setup", "list-dumps", "import-config",
)  # fmt: skip


# The QEMU test harness is not part of an installed kdump-mkinitrd (wheel, make install).
NO_HARNESS = (
    "qemu-test needs the QEMU test harness, which runs from a source checkout only (make venv "
    "there); this installation does not include it"
)


def default_output(kver: str) -> Path:
    # Outside /boot and never named initrd*, so no boot loader takes it for a boot initrd.
    return DEFAULT_IMAGE_DIR / f"kdump-{kver}.img"


def _add_kernel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", "--kver", help="kernel version (default: the running kernel)")
    p.add_argument("--kmoddir", type=Path, help="module tree (default: /lib/modules/KVER)")
    p.add_argument(
        "--kernel",
        type=Path,
        help="kernel image or UKI (default: found under /boot or /lib/modules/KVER); its "
        "config-KVER is read beside it",
    )
    p.add_argument(
        "-c", "--config", type=Path, help=f"config file (default {config_mod.DEFAULT_PATH})"
    )
    p.add_argument(
        "--modules-dir",
        type=Path,
        action="append",
        default=[],
        help="extra feature module directory (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable report")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kdump-mkinitrd",
        description="Build and inspect kdump capture initramfs images. "
        "Also: kdump-mkinitrd OUTPUT KVER (mkdumprd style).",
    )
    top.add_argument("-v", "--verbose", action="store_true")
    sub = top.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a capture image")
    _add_kernel_args(b)
    b.add_argument(
        "--hostonly",
        action="store_true",
        help="also include the drivers sysfs shows under each target device on this host",
    )
    b.add_argument(
        "--if-needed",
        action="store_true",
        help="rebuild only when an input changed since the existing image",
    )
    b.add_argument(
        "-o",
        "--output",
        type=Path,
        help="image path (default /var/lib/kdump-mkinitrd/kdump-KVER.img)",
    )
    b.add_argument(
        "--sysroot",
        type=Path,
        help="take every program and library from this root tree instead of / (default "
        "kmoddir SYSROOT/lib/modules/KVER, kernel and its config under SYSROOT/boot)",
    )
    b.add_argument(
        "--arch",
        help="build for this architecture (arm64, amd64; default: the sysroot's, read from "
        "its busybox, else this host's); another than this host's needs --sysroot, whose "
        "programs the build runs under qemu-user-static",
    )
    q = sub.add_parser(
        "qemu-test",
        help="crash a QEMU guest and check that the image saves the dump",
        add_help=False,
    )
    q.add_argument("-h", "--help", action=_QemuTestHelp)
    _add_kernel_args(q)
    q.add_argument("--memory", default="1G", help="guest memory (default 1G)")
    q.add_argument(
        "--crashkernel", default="256M", help="crashkernel= for the guest (default 256M)"
    )
    q.add_argument("--keep", type=Path, help="work in DIR and keep everything there")
    q.add_argument("--append", default="", help="extra capture kernel command line arguments")
    q.add_argument(
        "--first-stage",
        choices=("register", "hostonly", "kexec-tools"),
        default="register",
        help="how the first guest arms the capture kernel: our register (default), our register "
        "after building the image in the guest with --hostonly, or kexec-tools",
    )
    q.add_argument(
        "--fault",
        help="make something go wrong on purpose and check the designed outcome (the faults "
        "are listed below)",
    )
    q.add_argument("--timeout", type=float, default=600.0, help="seconds before QEMU is killed")
    q.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,  # not given here: the top-level -v stands
        help="progress on stderr even with --json",
    )
    q.add_argument(
        "--target",
        choices=("disk", "ssh", "nfs"),
        default="disk",
        help="disk: local disks for disk and raw targets (default); ssh: also start a test "
        "OpenSSH server on 127.0.0.1 for ssh targets (a -c config names it with @SSH_HOST@, "
        "@SSH_PORT@, @SSH_PATH@, @SSH_IDENTITY@, @SSH_KNOWN_HOSTS@, @SSH_CLIENT@); nfs: also "
        "start a test NFS server (v3 and v4) for nfs targets (a -c config names its export "
        "@NFS_EXPORT@)",
    )
    q.add_argument(
        "--ssh-client",
        choices=SSH_CLIENTS,
        default="openssh",
        help="with --target ssh: the client the image dumps with (fills @SSH_CLIENT@)",
    )
    h = sub.add_parser(
        "ssh-setup",
        help="make the key an ssh target uses, install it on the server, pin its host keys",
    )
    h.add_argument("destination", help="user@host")
    h.add_argument("-p", "--port", type=int, default=22)
    h.add_argument(
        "--key",
        type=Path,
        default=Path(SSH_IDENTITY),
        help=f"private key (default {SSH_IDENTITY}; made if missing)",
    )
    h.add_argument(
        "--known-hosts",
        type=Path,
        default=Path(SSH_KNOWN_HOSTS),
        help=f"pinned host keys (default {SSH_KNOWN_HOSTS})",
    )
    h.add_argument(
        "--no-install",
        action="store_true",
        help="do not log in to append the public key to ~/.ssh/authorized_keys",
    )
    h.add_argument(
        "-o",
        "--ssh-option",
        action="append",
        default=[],
        help="extra ssh -o option for the login that installs the key (repeatable)",
    )
    lukssetup.add_parser(sub)
    import_command.add_parser(sub)
    g = sub.add_parser("register", help="build if needed, then load the capture kernel (kexec)")
    _add_kernel_args(g)
    g.add_argument(
        "--image", type=Path, help="capture image (default /var/lib/kdump-mkinitrd/kdump-KVER.img)"
    )
    g.add_argument(
        "--hostonly",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="detect target drivers here (default: on for the running kernel)",
    )
    g.add_argument(
        "--append", action="append", default=[], help="extra capture kernel argument (repeatable)"
    )
    sub.add_parser("unregister", help="unload the capture kernel")
    s = sub.add_parser("status", help="is a capture kernel loaded, and is its image up to date")
    s.add_argument("--json", action="store_true")
    s.add_argument("-c", "--config", type=Path, help=argparse.SUPPRESS)
    e = sub.add_parser("estimate", help="how much crashkernel= memory the capture needs")
    _add_kernel_args(e)
    e.add_argument(
        "--image", type=Path, help="capture image (default /var/lib/kdump-mkinitrd/kdump-KVER.img)"
    )
    e.add_argument(
        "--memory",
        metavar="SIZE",
        help="the memory of the machine to estimate for, e.g. 64G or 1T (default: this one's)",
    )
    ld = sub.add_parser("list-dumps", help="which dumps under a directory finished, which did not")
    ld.add_argument("directory", type=Path)
    ld.add_argument("--json", action="store_true")
    r = sub.add_parser("recover-raw", help="write a dump from a raw target out as a directory")
    r.add_argument("device", type=Path)
    r.add_argument("directory", type=Path)
    q.add_argument(
        "--storage",
        metavar="LAYOUT",
        help="a disk target on stacked storage, built in the first guest: lvm, lvm-thin, "
        "raid1, luks, luks-on-lvm, lvm-on-raid1 (README: the layouts' fixed names)",
    )
    q.add_argument(
        "--guest",
        choices=("debian",),
        help="debian: install our .deb in a real Debian 12 guest (systemd, root on LVM; image "
        "built once with mmdebstrap and cached), crash it, and check the dump its boot service "
        "reports; also a second kernel package through the hooks, then removal and purge",
    )
    q.add_argument(
        "--arch",
        default=os.uname().machine,
        help="the guest's architecture: x86_64 or arm64 (aarch64); default this host's",
    )
    q.add_argument(
        "--sysroot",
        type=Path,
        help="a root tree of the guest's architecture the images and the guest's register "
        "take their programs from (needed for another architecture than this host's)",
    )
    i = sub.add_parser("inspect", help="list an image's contents and why each piece is there")
    i.add_argument("image", type=Path)
    i.add_argument("--json", action="store_true")
    return top


class _QemuTestHelp(argparse.Action):
    """qemu-test's -h/--help: the usual help, then the faults. They live in the harness, which
    is imported only now, so that no other command loads it."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS) -> None:
        super().__init__(
            option_strings, dest, nargs=0, default=argparse.SUPPRESS,
            help="show this help message and the faults, and exit",
        )  # fmt: skip

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
        values: Any, option_string: str | None = None,
    ) -> None:  # fmt: skip
        parser.print_help()
        if _have_harness():
            from kdump_mkinitrd.qemutest.faults import FAULTS

            width = shutil.get_terminal_size().columns - 2
            print("\nfaults (--fault NAME): what must happen")
            for name, fault in FAULTS.items():
                print(textwrap.fill(f"{name}: {fault.outcome}", width, initial_indent="  ",
                                    subsequent_indent="      "))  # fmt: skip
        else:
            print(f"\n{NO_HARNESS}.")
        parser.exit()


def _have_harness() -> bool:
    # Beside this very package: another kdump_mkinitrd on sys.path (an editable checkout in
    # the same venv) would lend its harness to an installed copy that has none.
    return HARNESS_DIR.is_dir()


def _mkdumprd_style(argv: list[str]) -> list[str]:
    """`kdump-mkinitrd OUTPUT KVER [options]` means `build -o OUTPUT -k KVER [options]`."""
    if len(argv) < 2 or argv[0] in SUBCOMMANDS or argv[0].startswith("-"):
        return argv
    if argv[1].startswith("-"):
        return argv
    return ["build", "-o", argv[0], "-k", argv[1], *argv[2:]]


def _load_config(path: Path | None, said: list[str] | None = None) -> config_mod.Config:
    """The config; one naming no target gets the default (the filesystem holding /var/crash),
    and a line on stderr that says so (kept in `said` instead when given)."""
    config, line = defaulttarget.with_default(config_mod.load(path))
    if line and said is None:
        print(f"kdump-mkinitrd: {line}", file=sys.stderr)
    elif line and said is not None:
        said.append(line)
    return config


def _build(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    request = _request(args, args.output, args.hostonly)
    result = build(config, request, if_needed=args.if_needed)
    if args.json:
        print(json.dumps(asdict(result), indent=1))
    else:
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        if args.if_needed and result.rebuilt_because:
            print("rebuilding: " + "; ".join(result.rebuilt_because[:5]), file=sys.stderr)
        print(result.summary())
    return 0


def _qemu_test(args: argparse.Namespace) -> int:
    """With --json, stdout gets one JSON object however the run ends: the report, or
    {"ok": false, "error": ...} when qemu-test could not run at all."""
    try:
        return _run_qemu_test(args)
    except Exception as exc:
        if not args.json:
            raise
        error = str(exc) if isinstance(exc, KdumpError) else f"{type(exc).__name__}: {exc}"
        print(json.dumps({"ok": False, "error": error}, indent=1))
        if not isinstance(exc, KdumpError):
            raise  # a bug: its traceback on stderr too
        return 1


def _run_qemu_test(args: argparse.Namespace) -> int:
    if not _have_harness():
        raise KdumpError(NO_HARNESS)
    from kdump_mkinitrd.progress import Progress
    from kdump_mkinitrd.qemutest import run as qemutest

    # Minutes of work: say what is going on, unless stdout is for a program.
    progress = Progress(sys.stderr if args.verbose or not args.json else None)
    if args.guest == "debian":
        return _qemu_test_debian(args, progress)
    kver = args.kver or os.uname().release
    kmoddir = args.kmoddir or Path("/lib/modules") / kver
    kernel = args.kernel or kernelfiles.find_kernel(kver, kmoddir) or Path(f"/boot/vmlinuz-{kver}")
    if not kernel.is_file():
        raise KdumpError(f"kernel image {kernel} does not exist (give --kernel)")
    qemutest.check_tools(args.arch)
    options = qemutest.Options(
        kver=kver,
        kmoddir=args.kmoddir or Path("/lib/modules") / kver,
        kernel=kernel,
        config=args.config,
        memory=args.memory,
        crashkernel=args.crashkernel,
        keep=args.keep,
        append=args.append,
        timeout=args.timeout,
        first_stage=args.first_stage,
        fault=args.fault,
        target=args.target,
        ssh_client=args.ssh_client,
        storage=args.storage,
        arch=args.arch,
        sysroot=args.sysroot,
        progress=progress,
    )
    report = qemutest.run_qemu_test(options)
    print(json.dumps(asdict(report), indent=1) if args.json else report.summary())
    return 0 if report.ok else 1


def _qemu_test_debian(args: argparse.Namespace, progress: Progress) -> int:
    from kdump_mkinitrd.qemutest import debian_guest

    report = debian_guest.run_debian_guest(
        debian_guest.GuestOptions(keep=args.keep, progress=progress)
    )
    print(json.dumps(asdict(report), indent=1) if args.json else report.summary())
    return 0 if report.ok else 1


def _ssh_setup(args: argparse.Namespace) -> int:
    from kdump_mkinitrd.arming import sshsetup

    result = sshsetup.setup(
        args.destination,
        args.port,
        key=args.key,
        known_hosts=args.known_hosts,
        install=not args.no_install,
        options=tuple(args.ssh_option),
    )
    print(f"key: {result.key} ({'created' if result.key_created else 'existing'})")
    print(f"pinned host keys of {args.destination} port {args.port} in {result.known_hosts}:")
    for line in result.fingerprints:
        print(f"  {line}")
    print("compare these fingerprints with the server's own (ssh-keygen -lf on its host keys)")
    if result.installed:
        print(f"installed {result.key}.pub in {args.destination}:~/.ssh/authorized_keys")
    return 0


def _request(args: argparse.Namespace, output: Path | None, hostonly: bool) -> BuildRequest:
    root: Path = getattr(args, "sysroot", None) or Path("/")
    arch: str | None = getattr(args, "arch", None)
    if root != Path("/") and not root.is_dir():
        raise KdumpError(f"--sysroot {root} is not a directory")
    if root != Path("/") and not args.kver:
        raise KdumpError("--sysroot needs -k KVER: the running kernel is not the sysroot's")
    kver = args.kver or os.uname().release
    kmoddir = args.kmoddir or root / "lib/modules" / kver
    boot_dir = root / "boot"
    output = output or default_output(kver)
    if args.kernel is None:
        # None when no layout has it: `build` can do without, `register` refuses early.
        kernel = kernelfiles.find_kernel(
            kver, kmoddir, boot_dir, extracted=kernelfiles.extracted_path(output, kver)
        )
    elif not args.kernel.is_file():
        raise KdumpError(f"kernel image {args.kernel} does not exist")
    else:
        kernel = kernelfiles.kernel_for_kexec(args.kernel, kver, output)
    return BuildRequest(
        kver=kver,
        kmoddir=kmoddir,
        output=output,
        kernel_image=kernel,
        modules_dirs=tuple(args.modules_dir),
        root=root,
        boot_dir=boot_dir,
        hostonly=hostonly,
        arch=arch,
    )


def _register(args: argparse.Namespace) -> int:
    from kdump_mkinitrd.arming import registration
    from kdump_mkinitrd.arming.peers import PeerArmed, refuse_if_peer_armed

    try:
        # Before the config: no default target is picked, said or refused on such a host.
        refuse_if_peer_armed(registration.peer_root())
    except PeerArmed as exc:
        print(f"kdump-mkinitrd: {exc}", file=sys.stderr)
        return registration.EXIT_PEER_ARMED
    kver = args.kver or os.uname().release
    # Host-only by default when arming the kernel that runs here: its devices are the truth.
    hostonly = args.hostonly if args.hostonly is not None else kver == os.uname().release
    config = _load_config(args.config)
    # First free the raw targets (as kdumpctl does at boot): a dump left on one would make the
    # next crash go elsewhere. Whatever happens to the load, this is worth doing.
    failed = _recover_raw_targets(config)
    request = _request(args, args.image, hostonly)
    try:
        loaded, rebuilt = registration.register(config, request, tuple(args.append))
    except registration.NoReservation as exc:
        print(f"kdump-mkinitrd: {exc}", file=sys.stderr)
        return registration.EXIT_ERROR if failed else registration.EXIT_NO_RESERVATION
    if rebuilt:
        print("rebuilt the image: " + "; ".join(rebuilt[:5]), file=sys.stderr)
    print(f"capture kernel {loaded.kernel} loaded with {loaded.image} by {loaded.method}")
    if args.json:
        print(json.dumps(asdict(loaded), indent=1))
    if failed:
        print(f"kdump-mkinitrd: error: the capture kernel is loaded, but {failed} raw "
              "target(s) still hold a dump that could not be recovered (see above)",
              file=sys.stderr)  # fmt: skip
        return registration.EXIT_ERROR
    return 0


def _recover_raw_targets(config: config_mod.Config) -> int:
    """Recover each raw target's complete dump; say what happened; count the failures."""
    from kdump_mkinitrd.dumps import rawrecovery as raw

    failed = 0
    for done in raw.recover_targets(config.targets):
        if done.ok:
            print(f"kdump-mkinitrd: raw target {done.target}: {done.message}", file=sys.stderr)
        else:
            failed += 1
            print(f"kdump-mkinitrd: error: raw target {done.target}: {done.message}",
                  file=sys.stderr)  # fmt: skip
    return failed


def _unregister(args: argparse.Namespace) -> int:
    from kdump_mkinitrd.arming import registration

    unloaded, peer = registration.unregister()
    if peer is not None:
        print(f"left the capture kernel loaded: {peer.name} armed it, not kdump-mkinitrd")
    else:
        print("capture kernel unloaded" if unloaded else "no capture kernel was loaded")
    return 0


def _status(args: argparse.Namespace) -> int:
    from kdump_mkinitrd.arming import registration

    said: list[str] = []
    code, info = registration.status(lambda path: _load_config(path, said))
    if said:
        info["default_target"] = said[-1]
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        state = "loaded" if info["loaded"] else "NOT loaded"
        print(f"capture kernel: {state}; reserved: {info['reserved_bytes'] // 2**20} MB")
        if "peer_armed" in info:
            print(info["peer_armed"])
        if "image" in info:
            print(f"image: {info['image']} (kernel {info['kernel']})")
            print(
                "up to date"
                if info["up_to_date"]
                else "STALE: " + "; ".join(info.get("stale_because", []))
            )
            print("targets: " + ", ".join(info.get("targets", [])))
        if said:
            print(said[-1])
    return code


def _estimate(args: argparse.Namespace) -> int:
    from kdump_mkinitrd.arming.crashmemory import estimate
    from kdump_mkinitrd.arming.kexec import crash_status
    from kdump_mkinitrd.hostscan.machinememory import machine_ram_bytes, parse_size

    request = _request(args, args.image, False)
    if not request.output.exists():
        raise KdumpError(f"no image at {request.output}: build it first")
    reserved = crash_status().reserved_bytes
    try:
        machine = parse_size(args.memory) if args.memory else machine_ram_bytes(reserved)
    except ValueError as exc:
        raise KdumpError(f"--memory: {exc}") from None
    result = estimate(request.output, reserved, machine)
    if args.json:
        print(json.dumps(dict(asdict(result), enough=result.enough), indent=1))
    else:
        print(
            f"crashkernel={result.total_mb}M needed for a machine with {result.machine_gib} GiB: "
            f"kernel floor {result.floor_mb}M + image {result.image_mb}M + unpacked "
            f"{result.unpacked_mb}M + Python stage {result.python_mb}M + working "
            f"{result.working_mb}M + page bitmaps {result.bitmap_mb}M"
            + (f" + per GiB {result.per_gib_mb}M" if result.per_gib_mb else "")
            + (f" + LUKS key derivation {result.luks_mb}M" if result.luks_mb else "")
        )
        if result.reserved_mb is not None:
            verdict = "enough" if result.enough else "NOT enough"
            print(f"reserved now: {result.reserved_mb}M ({verdict})")
    return 0 if result.enough is not False else 1


def _list_dumps(args: argparse.Namespace) -> int:
    from kdump_mkinitrd.dumps.listing import list_dumps

    found = list_dumps(args.directory)
    if args.json:
        print(json.dumps([asdict(d) for d in found], indent=1))
    for d in [] if args.json else found:
        print(f"{d.state:<10} {d.vmcore_size / 1e6:9.1f} MB  {d.path}")
    # Exit 2 tells a script that some dump never finished.
    return 2 if any(d.state == "incomplete" for d in found) else 0


def _recover_raw(args: argparse.Namespace) -> int:
    from kdump_mkinitrd.dumps import rawrecovery as raw

    out = raw.recover(args.device, args.directory)
    complete = (out / "vmcore").exists()
    print(f"{'recovered' if complete else 'INCOMPLETE dump recovered'} into {out}")
    return 0 if complete else 2


def _inspect(args: argparse.Namespace) -> int:
    info = report(args.image)
    print(json.dumps(info, indent=1) if args.json else text(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(_mkdumprd_style(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="kdump-mkinitrd: %(levelname)s: %(message)s",
    )
    try:
        commands = {
            "build": _build,
            "inspect": _inspect,
            "qemu-test": _qemu_test,
            "recover-raw": _recover_raw,
            "list-dumps": _list_dumps,
            "register": _register,
            "unregister": _unregister,
            "status": _status,
            "estimate": _estimate,
            "ssh-setup": _ssh_setup,
            "luks-setup": lukssetup.command,
            "import-config": import_command.command,
        }
        return commands[args.command](args)
    except KdumpError as exc:
        print(f"kdump-mkinitrd: error: {exc}", file=sys.stderr)
        return config_mod.EXIT_NO_TARGET if isinstance(exc, config_mod.NoTarget) else 1


if __name__ == "__main__":
    sys.exit(main())
