"""Zero config: a config naming no target dumps to /var/crash on the filesystem that holds it,
or is refused (exit 4) when that filesystem cannot take a dump. The decision on mount tables
from real systems and on this machine's own, and the real command on this machine.
(tests/test_zero_config_guest.py: /var/crash on LVM, md and tmpfs under a Debian kernel.)"""

# ruff: noqa: E501 (mount table lines are kept whole, as the kernel prints them)

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdump_mkinitrd.config import DEFAULT_PATH, NoTarget, load, parse
from kdump_mkinitrd.hostscan import defaulttarget as dt
from kdump_mkinitrd.image.inspect_image import load_image
from kdump_mkinitrd.targets.base import FSTYPES
from tests.conftest import Kernel

# Lines as these systems print them (shortened to the mounts that matter).
DEBIAN_LVM_SEPARATE_VAR = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/debian--vg-root rw,errors=remount-ro
23 22 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
24 22 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
25 22 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=989716k,nr_inodes=247429,mode=755,inode64
27 22 0:24 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=202492k,mode=755,inode64
45 22 254:1 / /boot rw,relatime shared:29 - ext2 /dev/vda1 rw
47 22 253:2 / /var rw,relatime shared:31 - ext4 /dev/mapper/debian--vg-var rw
49 22 253:3 / /tmp rw,relatime shared:33 - ext4 /dev/mapper/debian--vg-tmp rw
"""  # fmt: skip
UBUNTU_BTRFS = """\
29 1 0:26 /@ / rw,relatime shared:1 - btrfs /dev/nvme0n1p2 rw,ssd,space_cache=v2,subvolid=256,subvol=/@
30 29 0:27 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
47 29 0:26 /@home /home rw,relatime shared:31 - btrfs /dev/nvme0n1p2 rw,ssd,space_cache=v2,subvolid=257,subvol=/@home
48 29 259:1 / /boot/efi rw,relatime shared:33 - vfat /dev/nvme0n1p1 rw,fmask=0077,dmask=0077
"""  # fmt: skip
OPENSUSE_BTRFS_VAR = """\
64 1 0:31 /@/.snapshots/1/snapshot / ro,relatime shared:1 - btrfs /dev/vda2 ro,space_cache=v2,subvolid=268,subvol=/@/.snapshots/1/snapshot
90 64 0:31 /@/var /var rw,relatime shared:40 - btrfs /dev/vda2 rw,space_cache=v2,subvolid=266,subvol=/@/var
"""  # fmt: skip
XFS_CRASH_MOUNT = """\
25 1 8:3 / / rw,relatime shared:1 - xfs /dev/sda3 rw,seclabel,attr2,inode64,noquota
61 25 8:17 / /var/crash rw,relatime shared:36 - xfs /dev/sdb1 rw,seclabel,attr2,inode64,noquota
62 25 8:18 / /mnt/dump\\040disk rw,relatime shared:37 - xfs /dev/sdb2 rw,attr2
"""  # fmt: skip
BIND_FROM_SRV = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw
70 22 253:0 /srv/dumps /var/crash rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw
"""  # fmt: skip
DOCKER = """\
1200 1100 0:120 / / rw,relatime master:500 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/ABC:/var/lib/docker/overlay2/l/DEF,upperdir=/var/lib/docker/overlay2/123/diff,workdir=/var/lib/docker/overlay2/123/work
1201 1200 0:123 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
1202 1200 0:124 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755,inode64
"""  # fmt: skip
TMPFS_CRASH = DEBIAN_LVM_SEPARATE_VAR + (
    "60 47 0:50 / /var/crash rw,nosuid,nodev,relatime shared:40 - tmpfs tmpfs rw,size=1024k\n"
)
NFS_VAR = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw
80 22 0:52 / /var rw,relatime shared:45 - nfs4 files.example.org:/exports/web1/var rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=192.0.2.20,local_lock=none,addr=192.0.2.10
"""  # fmt: skip
SSHFS_CRASH = BIND_FROM_SRV.splitlines()[0] + (
    "\n90 22 0:60 / /var/crash rw,nosuid,nodev,relatime shared:50 - fuse.sshfs "
    "dumps@backup:/srv/crash rw,user_id=0,group_id=0\n"
)
QEMU_9P_ROOT = "20 1 0:18 / / ro,relatime - 9p hostroot ro,access=client,trans=virtio\n"
CIFS_CRASH = BIND_FROM_SRV.splitlines()[0] + (
    "\n91 22 0:61 / /var/crash rw,relatime shared:51 - cifs //nas/crash rw,vers=3.1.1,"
    "cache=strict,username=kdump,uid=0,noforceuid,gid=0,noforcegid,addr=192.0.2.30\n"
)


@pytest.mark.parametrize(
    ("mountinfo", "device", "path", "options"),
    [
        # /var its own filesystem: /var/crash is /crash in it.
        (DEBIAN_LVM_SEPARATE_VAR, "/dev/mapper/debian--vg-var", "/crash", ""),
        # Root is the subvolume @, mounted by its id; the path is inside it.
        (UBUNTU_BTRFS, "/dev/nvme0n1p2", "/var/crash", "subvolid=256"),
        (OPENSUSE_BTRFS_VAR, "/dev/vda2", "/crash", "subvolid=266"),
        # /var/crash a mount point: the dumps go to that filesystem's top.
        (XFS_CRASH_MOUNT, "/dev/sdb1", "/", ""),
        # A bind mount of /srv/dumps: where it is inside the filesystem.
        (BIND_FROM_SRV, "/dev/mapper/vg-root", "/srv/dumps", ""),
    ],
)
def test_the_filesystem_and_path_of_var_crash(
    mountinfo: str, device: str, path: str, options: str
) -> None:
    mounts = dt.parse_mountinfo(mountinfo)
    mount = dt.holding_mount(mounts, "/var/crash")
    assert mount.source == device and mount.fstype in FSTYPES
    assert dt.path_in_filesystem(mount, "/var/crash") == (path, options)


def test_mountinfo_escapes_and_stacked_mounts() -> None:
    mounts = dt.parse_mountinfo(XFS_CRASH_MOUNT)
    assert dt.holding_mount(mounts, "/mnt/dump disk/x").source == "/dev/sdb2"
    assert dt.holding_mount(mounts, "/var/crashes").mount_point == "/"
    # Mounted over: the last mount at a point is the one that holds what is under it.
    stacked = dt.parse_mountinfo(XFS_CRASH_MOUNT + TMPFS_CRASH.splitlines()[-1] + "\n")
    assert dt.holding_mount(stacked, "/var/crash/a").fstype == "tmpfs"


@pytest.mark.parametrize(
    ("mountinfo", "says"),
    [
        (TMPFS_CRASH, "/var/crash: tmpfs, in memory: the reboot after a crash loses what is "
                      "saved there"),
        (DOCKER, "/var/crash is on /: overlay, a layered filesystem with no block device of its "
                 "own"),
        (NFS_VAR, "/var/crash is on /var: nfs4 from files.example.org:/exports/web1/var, a "
                  "network or user-space filesystem"),
        (SSHFS_CRASH, "/var/crash: sshfs from dumps@backup:/srv/crash, a network or user-space "
                      "filesystem"),
        (CIFS_CRASH, "/var/crash: cifs from //nas/crash, a network"),
        # Inside a chroot whose root is no mount point, no mount shows /.
        ("30 25 0:26 / /proc rw - proc proc rw\n", "no mount holds /var/crash in the mount "
                                                    "table (a chroot?)"),
        (QEMU_9P_ROOT, "/var/crash is on /: 9p (hostroot), shared from outside this machine "
                       "with no block device"),
    ],
)  # fmt: skip
def test_var_crash_that_cannot_take_a_dump_is_refused_with_what_to_configure(
    mountinfo: str, says: str
) -> None:
    if os.path.realpath("/var/crash") != "/var/crash":
        pytest.fail("these mount tables assume /var/crash is no symlink on this machine")
    for source, file in (("<defaults>", f"{DEFAULT_PATH} (no such file)"), ("k.yaml", "k.yaml")):
        with pytest.raises(NoTarget) as err:
            dt.choose(parse("", source), dt.parse_mountinfo(mountinfo))
        message = str(err.value)
        start = (f"no dump target configured in {file}, and the default, the filesystem holding "
                 "/var/crash, cannot take a dump: ")  # fmt: skip
        assert message.startswith(start), message
        assert says in message, message
        assert "type: disk" in message and "type: nfs" in message and "type: ssh" in message
        assert f"configure a target in {file.split()[0]}" in message


def _findmnt(path: str) -> tuple[str, str, str]:
    """util-linux's answer: (mount point, fstype, source) of the filesystem holding `path`."""
    out = subprocess.run(["findmnt", "-n", "-r", "-o", "TARGET,FSTYPE,SOURCE", "-T", path],
                         capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    target, fstype, source = out.splitlines()[-1].split(" ")
    unescape = dt._unescape
    return unescape(target), fstype, unescape(source).split("[", 1)[0]


def _nearest_existing(path: str) -> str:
    real = Path(os.path.realpath(path))
    while not real.exists():
        real = real.parent
    return str(real)


def test_this_machines_mount_table_agrees_with_findmnt() -> None:
    if shutil.which("findmnt") is None:
        pytest.fail("findmnt (util-linux) is missing")
    mounts = dt.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    assert mounts and any(m.mount_point == "/" for m in mounts)
    for path in ("/", "/proc/self", "/sys", "/dev", _nearest_existing("/var/crash")):
        mount = dt.holding_mount(mounts, os.path.realpath(path))
        point, fstype, _ = _findmnt(path)
        assert (mount.mount_point, mount.fstype) == (point, fstype), path
    root = dt.holding_mount(mounts, "/")
    node = dt.mount_device_node(root, Path("/dev"), Path("/sys"))
    if node is not None and root.major != 0:
        assert node.stat().st_rdev == os.makedev(root.major, root.minor)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kdump_mkinitrd.cli", *args],
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def _expected_here() -> tuple[bool, str, str]:
    """What this machine's /var/crash sits on, by findmnt: (can take a dump, fstype, source)."""
    _, fstype, source = _findmnt(_nearest_existing("/var/crash"))
    device = Path(source).is_block_device() if source.startswith("/dev/") else False
    return fstype in FSTYPES and device, fstype, source


@pytest.mark.parametrize("text", ["", "# all\n# commented\n", "targets: []\ncapture: {keep: 2}\n"])
def test_build_without_a_target_on_this_machine(
    text: str, kernel61: Kernel, tmp_path: Path
) -> None:
    """The real command, on this machine's own /var/crash: it picks that filesystem when it can
    take a dump and says so in one line, else refuses with exit 4 and writes nothing."""
    config = tmp_path / "k.yaml"
    config.write_text(text)
    image = tmp_path / "kdump.img"
    kernel = ["-k", kernel61.kver, "--kmoddir", str(kernel61.kmoddir),
              "--kernel", str(kernel61.vmlinuz)]  # fmt: skip
    run = _cli("build", *kernel, "-c", str(config), "-o", str(image), "--hostonly")
    ok, fstype, source = _expected_here()
    told = f"kdump-mkinitrd: no dump target configured in {config}"
    if not ok:
        assert run.returncode == 4, run
        assert f"{told}, and the default, the filesystem holding /var/crash, cannot take a " \
               "dump: " in run.stderr and fstype in run.stderr, run.stderr  # fmt: skip
        assert not image.exists()
        return
    assert run.returncode == 0, run
    lines = [line for line in run.stderr.splitlines() if line.startswith(told)]
    assert len(lines) == 1, run.stderr
    assert f": dumping to /var/crash on {source} ({fstype}" in lines[0], lines[0]
    assert "the filesystem holding /var/crash" in lines[0]
    built = load_image(image)
    init = next(m.data.decode() for m in built.members if m.path.endswith("-disk-target.sh"))
    target = lines[0].split(", UUID=", 1)[1].split(",")[0] if ", UUID=" in lines[0] else None
    device = f"UUID={target}" if target else source
    assert f"wait_for_device {device} " in init, init
    assert f"mount -t {fstype} " in init
    # The image records the default target with the config text: another default is another
    # image, and a second build finds this one up to date.
    assert built.manifest["config"]["text"].startswith(text)
    assert (
        f"# kdump-mkinitrd default target: disk:{device} {fstype} path "
        in (built.manifest["config"]["text"])
    )
    again = _cli("build", *kernel, "-c", str(config), "-o", str(image), "--hostonly",
                 "--if-needed")  # fmt: skip
    assert again.returncode == 0 and "up to date" in again.stdout, again
    # `status` of that image, as `register` would have recorded it: the same line, up to date.
    state = tmp_path / "state"
    state.mkdir()
    loaded = {"kver": kernel61.kver, "kernel": str(kernel61.vmlinuz), "image": str(image),
              "kmoddir": str(kernel61.kmoddir), "config": str(config), "cmdline": "",
              "hostonly": True}  # fmt: skip
    (state / "loaded.json").write_text(json.dumps(loaded))
    env = dict(os.environ, KDUMP_MKINITRD_STATE_DIR=str(state))
    status = subprocess.run([sys.executable, "-m", "kdump_mkinitrd.cli", "status"],
                            capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert "\nup to date\n" in status.stdout, status
    assert status.stdout.splitlines()[-1] == lines[0].removeprefix("kdump-mkinitrd: "), status
    assert f"targets: disk:{device}" in status.stdout


def test_build_with_no_config_file_names_the_default_path(kernel61: Kernel, tmp_path: Path) -> None:
    """Without -c: the default config path, absent on a machine where kdump is not set up."""
    image = tmp_path / "kdump.img"
    run = _cli("build", "-k", kernel61.kver, "--kmoddir", str(kernel61.kmoddir),
               "--kernel", str(kernel61.vmlinuz), "-o", str(image))  # fmt: skip
    if DEFAULT_PATH.exists() and load(None).targets:
        assert run.returncode == 0 and "no dump target configured" not in run.stderr, run
        return
    absent = "" if DEFAULT_PATH.exists() else " (no such file)"
    assert f"no dump target configured in {DEFAULT_PATH}{absent}" in run.stderr, run.stderr
    assert run.returncode == (0 if _expected_here()[0] else 4), run
