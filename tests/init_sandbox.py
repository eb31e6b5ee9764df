"""Render a config's init and hooks exactly as a build does, and run them under the real
static busybox `sh` in a chroot: a sandbox folder that holds busybox, the rendered files and
a small fake /proc, /sys and /dev. What would touch this machine (mount, insmod, ip, udhcpc,
the power actions) or needs a crash (makedumpfile reading /proc/vmcore, ssh to a server) is
replaced by a shell function; everything else (mkdir, dd, mv, stat, sha256sum, sed, cat, the
remote shell an ssh target's commands run in) is busybox doing the real work inside the
chroot. An ssh target's remote commands run through `sh -c` with the words joined by spaces,
as sshd hands them to the user's shell."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kdump_mkinitrd import __version__, storage
from kdump_mkinitrd.config import Config
from kdump_mkinitrd.image.features import discover, select
from kdump_mkinitrd.image.pystage import PythonStage
from kdump_mkinitrd.image.render import render
from kdump_mkinitrd.image.resolve import CaptureSettings

BUSYBOX = Path("/bin/busybox")
KVER = "6.1.0-test"
LOAD_LIST = "/lib/kdump/modules.load"
NICS = ("eth0", "ens3")  # the interfaces a generated config may name
VMCORE = b"ELF-ish test memory\n" * 500
# Functions defined before the init's own: they stand in for what needs a real machine.
STUBS = r"""
mount() { return 0; }
umount() { return 0; }
insmod() { return 0; }
sync() { return 0; }
poweroff() { echo "sandbox: poweroff $*"; }
reboot() { echo "sandbox: reboot $*"; }
halt() { echo "sandbox: halt $*"; }
setsid() { echo "sandbox: setsid $*"; }
udhcpc() { return 0; }
nslookup() { printf 'Server: 127.0.0.1\n\nName: %s\nAddress: 10.0.2.2\n' "$1"; }
ip() {
    case "$*" in
        # ip link add link PARENT name VLAN type vlan id N: the VLAN appears, with link.
        "link add link "*) mkdir -p "/sys/class/net/$6" && echo 1 > "/sys/class/net/$6/carrier" ;;
        "-4 addr show"*) echo "    inet 10.0.2.15/24 brd 10.0.2.255 scope global eth0" ;;
        route) echo "default via 10.0.2.2 dev eth0" ;;
    esac
    return 0
}
timeout() {
    [ "$1" = -s ] && shift 2
    shift
    "$@"
}
makedumpfile() {
    eval "last=\${$#}"
    case " $* " in
        *" --dump-dmesg "*) echo "sandbox kernel log" > "$last" ;;
        *" -F "*) cat /proc/vmcore ;;
        *) cat /proc/vmcore > "$last" ;;
    esac
}
# ssh and dbclient: the words after the host are the remote command line.
ssh() {
    while [ "$#" -gt 0 ] && [ "$1" != "$KDUMP_SSH_HOST" ]; do shift; done
    [ "$#" -gt 0 ] && shift
    sh -c "$*"
}
dbclient() { ssh "$@"; }
"""
# After the init's own functions: its device lookup reads real partition tables.
OVERRIDES = r"""
wait_for_device() { echo /dev/target; }
"""
# What busybox sh says about a script it cannot run (a syntax error, a bad number, a missing
# command), as opposed to a program's own complaint ("mkdir: can't create ...").
SHELL_ERROR = re.compile(r"^(sh|/[^:]*): (line \d+: |.*(bad number|out of range|not found))")


@dataclass
class Rendered:
    files: dict[str, str]  # image path -> text
    shell: list[str]  # the image paths that are shell scripts


def capture_settings(config: Config) -> CaptureSettings:
    collector = "native" if config.capture.collector == "native" else "makedumpfile"
    stage = config.capture.stage
    return CaptureSettings(
        stage, collector, config.capture.dump_level,
        "lzo" if collector == "makedumpfile" else "none",
        "-l" if collector == "makedumpfile" else "",
        config.capture.hostname or "localhost",
        "/usr/bin/python3" if stage == "python" else None,
        "/usr/sbin/makedumpfile" if collector == "makedumpfile" else None,
    )  # fmt: skip


def render_image(config: Config) -> Rendered:
    """Every template the build would render for `config`, with the same context."""
    capture = capture_settings(config)
    features = select(discover(), config, capture.stage, capture.collector)
    python = None
    if any(f.python_stage for f in features):
        command = ("/usr/bin/python3.11", "-S", "-m", "capture.stage")
        python = PythonStage(command[0], "/usr", "/usr/lib/python311.zip", (), (), command)
    context = {"version": __version__, "kver": KVER, "config": config, "capture": capture,
               "python": python, "features": [f.name for f in features], "modules": [],
               "load_list": LOAD_LIST, "layers": storage.shell_calls(config.targets)}  # fmt: skip
    files, shell = {}, []
    for feature in features:
        local = dict(context, feature=feature, targets=feature.targets(config))
        for template in feature.templates:
            files[template.dst] = render(template.src, local)
            if template.dst.endswith(".sh") or template.dst in (
                "/init",
                "/lib/kdump/udhcpc.script",
            ):
                shell.append(template.dst)
    return Rendered(files, shell)


def _place(root: Path, path: str, data: str | bytes) -> Path:
    dest = root / path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data.encode() if isinstance(data, str) else data)
    return dest


def _applets() -> list[str]:
    listing = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True,
                             timeout=60, check=True).stdout  # fmt: skip
    return [line.strip() for line in listing.splitlines() if line.strip()]


def make_sandbox(root: Path, rendered: Rendered) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _place(root, "/bin/busybox", BUSYBOX.read_bytes()).chmod(0o755)
    # Applet links, as the image has them (busybox finds itself without /proc/self/exe).
    for applet in _applets():
        link = root / applet
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    for path, text in rendered.files.items():
        _place(root, path, text)
    _place(root, LOAD_LIST, "")
    _place(root, "/proc/uptime", "12.34 5.67\n")
    _place(root, "/proc/vmcore", VMCORE)
    _place(root, "/proc/modules", "")
    # busybox df finds a path's file system through /proc/mounts.
    _place(root, "/proc/mounts", "/dev/root / ext4 rw 0 0\n")
    _place(root, "/proc/self/oom_score_adj", "0\n")
    for index, nic in enumerate(NICS):
        _place(root, f"/sys/class/net/{nic}/address", f"52:54:00:12:34:5{6 + index}\n")
        _place(root, f"/sys/class/net/{nic}/carrier", "1\n")
        (root / f"sys/class/net/{nic}/device").mkdir(exist_ok=True)
    (root / "sys/class/block").mkdir(parents=True, exist_ok=True)
    _place(root, "/dev/target", b"")
    for name in ("tmp", "run/kdump", "root", "etc"):
        (root / name).mkdir(parents=True, exist_ok=True)


def syntax_errors(root: Path, rendered: Rendered) -> dict[str, str]:
    """`sh -n` on every rendered shell script: path -> what busybox said."""
    found = {}
    for path in rendered.shell:
        run = subprocess.run(["chroot", str(root), "/bin/busybox", "sh", "-n", path],
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        if run.returncode != 0 or run.stderr:
            found[path] = run.stderr
    return found


def driver(rendered: Rendered, calls: str) -> str:
    """The init up to its hook loop, the overrides, the hooks but the target loop, then
    `calls`."""
    init = rendered.files["/init"]
    head, sep, _ = init.partition('\nlog "capture environment for kernel')
    assert sep, "the init's hook loop moved: update tests/init_sandbox.py"
    # Every hook but the target loop: `calls` tries the targets one by one itself (a raw
    # target tried twice would rightly refuse to overwrite its first, unrecovered dump).
    hooks = (
        "for hook in /lib/kdump/hooks/*.sh; do\n"
        '    case "$hook" in */60-run-targets.sh) continue ;; esac\n'
        '    . "$hook" || fail "step failed"\n'
        "done\n"
    )
    return STUBS + head + "\n" + OVERRIDES + hooks + calls


def run_sandbox(root: Path, script: str) -> subprocess.CompletedProcess[str]:
    _place(root, "/driver.sh", script)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
    return subprocess.run(["chroot", str(root), "/bin/busybox", "sh", "/driver.sh"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def shell_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if SHELL_ERROR.match(line)]


def remove(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)


def can_chroot() -> bool:
    return os.geteuid() == 0 and shutil.which("chroot") is not None
