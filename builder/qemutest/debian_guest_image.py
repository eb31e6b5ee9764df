"""A real Debian 12 system for `qemu-test --guest debian`: built once with mmdebstrap from
Debian's registry and cached, its root filesystem on LVM, booted with QEMU's direct kernel boot
from its own kernel and initramfs-tools initrd.

The build host's kernel may have no device-mapper, so the LVM disk is made inside a helper
guest that boots the guest's own kernel with the host's root over 9p (host_root_image), where
pvcreate, lvcreate and mkfs.ext4 work and the mmdebstrap tarball is unpacked onto the LV.

The cache folder is keyed by everything that makes the image: the package lists, the
customization hooks and this file's own source. Runs boot a qcow2 overlay over the cached
disk, so no run ever writes to the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.qemutest.guest_images import host_root_image
from kdump_mkinitrd.qemutest.layouts import ENVIRONMENT, LVM_CONF
from kdump_mkinitrd.qemutest.qemu import Boot, default_accel, run
from kdump_mkinitrd.qemutest.testcache import cache_root

KVER = "6.1.0-56-amd64"  # the tests' kernel (also unpacked in .cache/kernels)
VG, LV = "guestvg", "root"
ROOT_DEVICE = f"/dev/mapper/{VG}-{LV}"
HOSTNAME = "kdumpguest"
DISK_SIZE = "6G"  # sparse; room for a second kernel and dumps of a 1.5 GiB guest
SUITES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# A booting systemd system on LVM, and everything our .deb depends on, so that `dpkg -i` of
# it works offline in the guest.
PACKAGES = (
    "systemd", "systemd-sysv", "udev", "kmod", "lvm2", "initramfs-tools", f"linux-image-{KVER}",
    "python3", "python3-jinja2", "python3-yaml", "python3-pyelftools", "python3-construct",
    "python3-zstandard", "busybox-static", "makedumpfile", "kexec-tools",
)  # fmt: skip
# The guest as the harness needs it: root on the LV, a root shell on the serial console,
# reboots through the firmware (QEMU's direct kernel boot), no timers waking it up.
FILES = {
    "/etc/fstab": f"{ROOT_DEVICE} / ext4 errors=remount-ro 0 1\n",
    "/etc/hostname": f"{HOSTNAME}\n",
    "/etc/hosts": f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n",
    "/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf": (
        "[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --noclear "
        "--keep-baud 115200,57600,38400,9600 %I $TERM\n"
    ),
    "/root/.inputrc": "set enable-bracketed-paste off\n",
}


def file_hook(path: str, text: str) -> str:
    """An mmdebstrap hook that writes `text` to `path` in the guest."""
    folder = shlex.quote(str(Path(path).parent))
    return f'mkdir -p "$1"{folder} && printf %s {shlex.quote(text)} > "$1"{shlex.quote(path)}'


BASE_HOOKS = (
    *(file_hook(path, text) for path, text in FILES.items()),
    'f="$1/etc/default/kexec"; [ ! -e "$f" ] || sed -i "s/^LOAD_KEXEC=.*/LOAD_KEXEC=false/" "$f"',
    'chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer '
    "fstrim.timer",
    'chroot "$1" passwd -d root',
)


@dataclass(frozen=True)
class GuestImage:
    """A cached image: `disk` is never written (boot an overlay), `kernel` and `initrd` are
    the guest's own from /boot, for QEMU's direct kernel boot."""

    folder: Path
    kver: str = KVER

    @property
    def disk(self) -> Path:
        return self.folder / "root.qcow2"

    @property
    def kernel(self) -> Path:
        return self.folder / f"vmlinuz-{self.kver}"

    @property
    def initrd(self) -> Path:
        return self.folder / f"initrd.img-{self.kver}"

    def overlay(self, path: Path) -> Path:
        """A fresh qcow2 overlay at `path` over the cached disk: what a run boots."""
        path.unlink(missing_ok=True)
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.disk), "-F", "qcow2",
              str(path)])  # fmt: skip
        return path


def default_cache() -> Path:
    return Path(os.environ.get("KDUMP_TEST_GUEST_CACHE") or cache_root() / "guests")


def cache_key(extra_packages: Sequence[str], customize: Sequence[str]) -> str:
    inputs = {
        "suites": SUITES,
        "packages": sorted({*PACKAGES, *extra_packages}),
        "hooks": [*BASE_HOOKS, *customize],
        "builder": Path(__file__).read_text(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def debian_image(
    extra_packages: Sequence[str] = (),
    customize: Sequence[str] = (),
    cache: Path | None = None,
    log: Path | None = None,
) -> GuestImage:
    """The cached image with `extra_packages` installed too and `customize` run after ours
    (mmdebstrap --customize-hook shell commands on the build host; "$1" is the guest's root
    folder; `chroot "$1" CMD` runs CMD in it). Built when missing: minutes."""
    cache = cache or default_cache()
    key = cache_key(extra_packages, customize)
    image = GuestImage(cache / f"debian12-{key}")
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f"debian12-{key}.lock"):
        if (image.folder / "manifest.json").is_file():
            return image
        work = Path(tempfile.mkdtemp(prefix=f"debian12-{key}.", dir=cache))
        try:
            _build(image, work, [*PACKAGES, *extra_packages], [*BASE_HOOKS, *customize], log)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return image


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder per image at a time (worktrees share the cache); the others wait and then
    find it built."""
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _run(cmd: list[str], log: Path | None = None) -> None:
    out = log.open("ab") if log else subprocess.DEVNULL
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT if log else subprocess.PIPE)  # fmt: skip
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    if done.returncode != 0:
        said = (done.stderr or b"").decode(errors="replace")[-2000:]
        where = f" (see {log})" if log else ""
        raise KdumpError(f"{shlex.join(cmd[:3])} ... failed with {done.returncode}{where} {said}")


def _build(
    image: GuestImage, work: Path, packages: list[str], hooks: list[str], log: Path | None
) -> None:
    started = time.monotonic()
    log = log or work / "build.log"
    tarball, boot = work / "rootfs.tar", work / "kernel"
    # The guest's kernel, modules and initrd come out too: the helper guest boots them.
    copy_out = f'mkdir -p {boot} && cp -a "$1/boot" "$1/lib/modules" {boot}/'
    _run(["mmdebstrap", "--variant=minbase", "--mode=root",
          "--aptopt=APT::Install-Recommends \"false\"",
          "--include=" + ",".join(packages),
          *[f"--customize-hook={hook}" for hook in [*hooks, copy_out]],
          "bookworm", str(tarball), *SUITES], log)  # fmt: skip
    seconds_mmdebstrap = time.monotonic() - started
    raw = work / "root.raw"
    _run(["qemu-img", "create", "-q", "-f", "raw", str(raw), DISK_SIZE])
    _make_lvm_disk(work, boot, tarball, raw)
    _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "root.qcow2")])
    staged = work / "image"
    staged.mkdir()
    (work / "root.qcow2").rename(staged / "root.qcow2")
    for name in (f"vmlinuz-{KVER}", f"initrd.img-{KVER}"):
        shutil.copy2(boot / "boot" / name, staged / name)
    manifest = {
        "packages": packages,
        "hooks": hooks,
        "root": ROOT_DEVICE,
        "kver": KVER,
        "seconds_mmdebstrap": round(seconds_mmdebstrap, 1),
        "seconds_total": round(time.monotonic() - started, 1),
    }
    (staged / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    staged.rename(image.folder)


def _make_lvm_disk(work: Path, boot: Path, tarball: Path, disk: Path) -> None:
    """The helper guest: LVM and ext4 on the blank disk, the tarball unpacked onto the LV."""
    script = work / "make-disk.sh"
    script.write_text("\n".join([
        "set -eu",
        "export " + " ".join(ENVIRONMENT),
        "mkdir -p /run/kdump-test-lvm /run/lock/lvm /run/guestroot",
        f"cat > /run/kdump-test-lvm/lvm.conf <<'EOF'\n{LVM_CONF}EOF",
        "pvcreate -ff -y /dev/vda",
        f"vgcreate {VG} /dev/vda",
        f"lvcreate -y -n {LV} -l 100%FREE {VG}",
        f"mkfs.ext4 -q -L root /dev/{VG}/{LV}",
        f"mount -t ext4 /dev/{VG}/{LV} /run/guestroot",
        f"tar -xpf {shlex.quote(str(tarball))} -C /run/guestroot --numeric-owner",
        "umount /run/guestroot",
        f"vgchange -an {VG}",
        "sync",
        "echo 'kdump-test: guest disk made'",
    ]) + "\n")  # fmt: skip
    initrd = work / "helper.img"
    kmoddir = boot / "modules" / KVER
    args = host_root_image(
        initrd, KVER, kmoddir, [["sh", str(script)]], crash=False, writable=["/run"],
        environment=["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        modules=["dm_mod", "ext4", "crc32c_generic", "virtio_blk"],
    )  # fmt: skip
    result = run(
        Boot(
            kernel=boot / "boot" / f"vmlinuz-{KVER}",
            initrd=initrd,
            cmdline="console=ttyS0 panic=-1",
            serial_log=work / "make-disk.log",
            memory="1G",
            disks=(disk,),
            accel=default_accel(),
            timeout=1200,
            extra=args,
        )
    )
    if "kdump-test: guest disk made" not in result.log:
        raise KdumpError("the helper guest could not make the LVM disk:\n" + result.log[-3000:])
