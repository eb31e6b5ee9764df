"""The Debian package as users get it: scripts/build-deb builds it with Debian's own tools from
a clean copy, lintian finds no error in it, it holds what `make install` lays out plus the
commented default config as a conffile, and dpkg, in a minimal Debian 12 chroot made by
mmdebstrap from Debian's packages, installs it (the launcher runs on Debian's python3 and
python3-* packages and builds a real image), removes it (the images go) and purges it (/etc
and the caches go); dumps under /var/crash stay through both.

Starting the service and unloading the capture kernel need a booted system with crash memory:
the Debian guest test (tests/test_debian_guest.py) covers those. The chroot has no /proc and
no /run/systemd, so the maintainer scripts take their "not booted" paths here and never touch
this host's kexec state.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from kdump_mkinitrd import config as config_mod
from kdump_mkinitrd.qemutest.testcache import cache_root
from tests.conftest import Kernel
from tests.test_packaging import shipped_files

REPO = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
DEB_NAME = f"kdump-mkinitrd_{VERSION}_all.deb"
DEFAULT_CONFIG = REPO / "system" / "kdump-mkinitrd.yaml"
PKGLIB = "usr/lib/kdump-mkinitrd"
SUITE = "bookworm"
# The chroot tarballs, keyed by what goes into them; shared between checkouts by the variable.
CHROOT_CACHE = cache_root() / "deb-chroot"
IMAGE_DIR = "var/lib/kdump-mkinitrd"
# What dpkg and the tool see in the chroot: root's own, not this test run's.
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8"}


def _run(
    args: Sequence[object], timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, check=False, env=env)  # fmt: skip


def _need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        # `make test` installs them: a missing one is a set-up failure, not a skip.
        pytest.fail(f"{' '.join(missing)} not installed (Debian: dpkg-dev debhelper dh-python "
                    "lintian mmdebstrap)")  # fmt: skip


def _git_status() -> str:
    return _run(["git", "-C", REPO, "status", "--porcelain", "--ignored=matching"]).stdout


@dataclass(frozen=True)
class Built:
    deb: Path
    changes: Path
    status_before: str
    status_after: str


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    _need("dpkg-buildpackage", "dh", "dh_python3")
    out = tmp_path_factory.mktemp("deb")
    before = _git_status()
    proc = _run([REPO / "scripts" / "build-deb", out])
    assert proc.returncode == 0, proc.stderr[-4000:]
    deb = Path(proc.stdout.strip())
    assert deb == out / DEB_NAME, proc.stdout
    assert deb.is_file()
    (changes,) = out.glob(f"kdump-mkinitrd_{VERSION}_*.changes")
    return Built(deb, changes, before, _git_status())


def test_build_leaves_the_tree_as_it_was(built: Built) -> None:
    assert built.status_after == built.status_before


def test_lintian_reports_no_error(built: Built) -> None:
    """On the .changes: the source package, the .deb and the .buildinfo. The overrides in
    debian/ say why each is there."""
    _need("lintian")
    proc = _run(["lintian", "--pedantic", "-I", "-E", "--tag-display-limit", "0", built.changes])
    tags = [line for line in proc.stdout.splitlines() if re.match(r"[EWIPX]: ", line)]
    errors = [line for line in tags if line.startswith("E: ")]
    assert not errors, "\n".join(tags)
    # lintian exits non-zero for an error tag or when it could not check at all; a .changes
    # naming a file that is not there is skipped with a message and exit 0.
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Skipping" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def _contents(deb: Path) -> dict[str, str]:
    """Path (without ./) -> the mode string of `dpkg-deb -c`."""
    listing = _run(["dpkg-deb", "-c", deb])
    assert listing.returncode == 0, listing.stderr
    entries = {}
    for line in listing.stdout.splitlines():
        mode, _owner, _size, _date, _time, name = line.split(None, 5)
        entries[name.split(" -> ")[0].removeprefix("./").rstrip("/")] = mode
    return entries


def test_package_holds_what_make_install_lays_out(built: Built) -> None:
    entries = _contents(built.deb)
    files = {p for p, mode in entries.items() if mode.startswith("-")}
    private = {p.removeprefix(PKGLIB + "/") for p in files if p.startswith(PKGLIB + "/")}
    # The package, modules.d and templates, side by side, and no QEMU harness.
    assert private == shipped_files("modules.d", "templates")
    executables = {
        "usr/bin/kdump-mkinitrd",
        "etc/kernel/postinst.d/kdump-mkinitrd",
        "etc/kernel/postrm.d/kdump-mkinitrd",
        "usr/lib/kernel/install.d/60-kdump-mkinitrd.install",
    }
    for path in executables:
        assert entries.get(path, "").startswith("-rwxr-xr-x"), (path, entries.get(path))
    for path in (
        "lib/systemd/system/kdump-mkinitrd.service",
        "usr/share/man/man8/kdump-mkinitrd.8.gz",
        "usr/share/man/man5/kdump-mkinitrd.yaml.5.gz",
        "etc/kdump-mkinitrd.yaml",
        "usr/share/doc/kdump-mkinitrd/copyright",
    ):
        assert entries.get(path, "").startswith("-rw-r--r--"), (path, entries.get(path))


def _field(deb: Path, name: str) -> str:
    proc = _run(["dpkg-deb", "-f", deb, name])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _names(relation: str) -> set[str]:
    """Package names in a Depends-style field, versions and architecture qualifiers dropped."""
    return {re.split(r"[\s(:]", alt.strip())[0] for part in relation.split(",")
            for alt in part.split("|") if alt.strip()}  # fmt: skip


def test_control_fields(built: Built) -> None:
    assert _field(built.deb, "Version") == VERSION
    assert _field(built.deb, "Architecture") == "all"
    depends = _field(built.deb, "Depends")
    assert "python3 (>= 3.11)" in depends
    assert _names(depends) >= {
        "python3", "python3-jinja2", "python3-yaml", "python3-pyelftools", "python3-construct",
        "python3-zstandard", "busybox-static", "makedumpfile",
    }  # fmt: skip
    # kexec_file_load(2) is called directly; kexec-tools is only the fallback loader.
    assert "kexec-tools" in _names(_field(built.deb, "Recommends"))
    # Without mksquashfs the Python stage is packed file by file, at more crash memory.
    assert "squashfs-tools" in _names(_field(built.deb, "Recommends"))
    assert "kexec-tools" not in _names(depends)
    # Only stacked or ssh targets need these on the build host.
    assert _names(_field(built.deb, "Suggests")) >= {"lvm2", "mdadm", "cryptsetup-bin"}


def _control_file(deb: Path, name: str, tmp_path: Path) -> str:
    proc = _run(["dpkg-deb", "-e", deb, tmp_path / "control"])
    assert proc.returncode == 0, proc.stderr
    return (tmp_path / "control" / name).read_text()


def test_conffiles(built: Built, tmp_path: Path) -> None:
    assert set(_control_file(built.deb, "conffiles", tmp_path).split()) == {
        "/etc/kdump-mkinitrd.yaml",
        "/etc/kernel/postinst.d/kdump-mkinitrd",
        "/etc/kernel/postrm.d/kdump-mkinitrd",
    }


def test_installed_paths_point_into_the_package(built: Built, tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert _run(["dpkg-deb", "-x", built.deb, root]).returncode == 0
    launcher = (root / "usr/bin/kdump-mkinitrd").read_text()
    # -I: neither the admin's environment nor their current directory chooses the code.
    assert launcher.startswith("#!/usr/bin/python3 -I\n")
    assert 'sys.path.insert(0, "/usr/lib/kdump-mkinitrd")' in launcher
    unit = (root / "lib/systemd/system/kdump-mkinitrd.service").read_text()
    assert "ExecStart=/usr/bin/kdump-mkinitrd register\n" in unit
    assert "ExecStop=/usr/bin/kdump-mkinitrd unregister\n" in unit
    assert "@" not in re.sub(r"(?m)^#.*$", "", unit)


# ---- the default config ------------------------------------------------------------------------

# A commented-out YAML line: '#' right before a key or list item, or before indentation; prose
# comments have '# ' followed by a word.
_COMMENTED_YAML = re.compile(r"^#(?=[A-Za-z_-]| {2})")


def test_default_config_sets_nothing() -> None:
    """Installed as it is, the config means what no config means: every default, and the
    default dump target (no configured one)."""
    text = DEFAULT_CONFIG.read_text()
    assert all(not line.strip() or line.startswith("#") for line in text.splitlines())
    parsed = config_mod.parse(text, "/etc/kdump-mkinitrd.yaml")
    no_file = config_mod.parse("", "<defaults>")
    assert parsed.targets == no_file.targets
    _assert_same_settings(parsed, no_file)


def test_default_config_examples_are_valid_and_show_the_defaults() -> None:
    """Uncommented once, the file is a valid config: one target of each type, example hooks,
    and every other key at the value the schema takes without it."""
    uncommented = "\n".join(
        _COMMENTED_YAML.sub("", line) for line in DEFAULT_CONFIG.read_text().splitlines()
    )
    parsed = config_mod.parse(uncommented, "uncommented")
    assert sorted(t.type for t in parsed.targets) == sorted(config_mod.TARGET_TYPES)
    assert parsed.hooks.pre and parsed.hooks.post
    assert parsed.hooks.timeout == config_mod.HooksConfig().timeout
    _assert_same_settings(parsed, config_mod.parse("", "<defaults>"), examples=("hooks",))


def _assert_same_settings(
    a: config_mod.Config, b: config_mod.Config, examples: tuple[str, ...] = ()
) -> None:
    for f in fields(config_mod.Config):
        if f.name not in ("source", "text", "lines", "targets", *examples):
            assert getattr(a, f.name) == getattr(b, f.name), f.name


# ---- dpkg in a Debian chroot ---------------------------------------------------------------


def _chroot_tarball(packages: list[str]) -> Path:
    """A minimal Debian 12 (essential packages, init-system-helpers for the unit's enable
    links, and the package's dependencies), made once per package set by mmdebstrap."""
    _need("mmdebstrap")
    spec = f"{SUITE} essential {' '.join(sorted(packages))}"
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    tarball = CHROOT_CACHE / f"{SUITE}-{key}.tar"
    if tarball.is_file():
        return tarball
    CHROOT_CACHE.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_name(f".{tarball.name}.{os.getpid()}.tmp")
    try:
        proc = _run(["mmdebstrap", "--variant=essential", "--format=tar",
                     "--include=" + ",".join(packages), SUITE, partial], timeout=1200)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        os.replace(partial, tarball)
    finally:
        partial.unlink(missing_ok=True)
    return tarball


@dataclass(frozen=True)
class Chroot:
    root: Path

    def run(self, *args: object) -> subprocess.CompletedProcess[str]:
        return _run(["chroot", self.root, *args], env=CHROOT_ENV)

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")


@pytest.fixture
def chroot(built: Built, tmp_path: Path) -> Chroot:
    if os.geteuid() != 0:
        pytest.skip("dpkg into a chroot needs root (make test runs as root in CI)")
    packages = sorted(_names(_field(built.deb, "Depends")) | {"init-system-helpers"})
    root = tmp_path / "root"
    root.mkdir()
    proc = _run(["tar", "-C", root, "-xf", _chroot_tarball(packages)])
    assert proc.returncode == 0, proc.stderr
    shutil.copy(built.deb, root / "tmp" / DEB_NAME)
    return Chroot(root)


DISK_CONFIG = """\
targets:
  - {type: disk, device: UUID=2f6e1c0a-6d3b-4d59-9a43-2b1f0c5e7d11, fstype: ext4}
"""


def test_dpkg_install_remove_purge(chroot: Chroot, kernel61: Kernel) -> None:
    installed = chroot.run("dpkg", "-i", f"/tmp/{DEB_NAME}")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # Not booted: the postinst says so and leaves loading to the service at the next boot.
    assert "the capture kernel is loaded at the next boot" in installed.stdout
    wants = chroot.path("/etc/systemd/system/multi-user.target.wants/kdump-mkinitrd.service")
    assert os.readlink(wants) == "/lib/systemd/system/kdump-mkinitrd.service"
    # dh_python3's py3compile: the package is byte-compiled by dpkg, not by the first run.
    assert chroot.path(f"/{PKGLIB}/kdump_mkinitrd/__pycache__").is_dir()

    for args in (["--help"], ["build", "--help"]):
        proc = chroot.run("kdump-mkinitrd", *args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("usage: kdump-mkinitrd"), proc.stdout

    # A real build on Debian's python3 and python3-* packages, the kernel from the test cache
    # bound in (unshare: the mount dies with the command, whatever happens).
    chroot.path("/etc/kdump-mkinitrd.yaml").write_text(DISK_CONFIG)
    kver = kernel61.kver
    chroot.path("/mnt/kernel").mkdir()
    image = f"/{IMAGE_DIR}/kdump-{kver}.img"
    built_image = _run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
         'mount --bind -o ro "$1" "$2/mnt/kernel" && shift 2 && exec chroot "$@"', "sh",
         kernel61.root, chroot.root, chroot.root,
         "env", *(f"{k}={v}" for k, v in CHROOT_ENV.items()),
         "kdump-mkinitrd", "build", "-k", kver,
         "--kmoddir", f"/mnt/kernel/lib/modules/{kver}",
         "--kernel", f"/mnt/kernel/boot/vmlinuz-{kver}", "-o", image],
    )  # fmt: skip
    assert built_image.returncode == 0, built_image.stderr[-4000:]
    images = chroot.path(f"/{IMAGE_DIR}")
    made = {p.name for p in images.iterdir()}
    assert made == {f"kdump-{kver}.img", f"kdump-{kver}.img.inputs.json"}
    cache = chroot.path("/var/cache/kdump-mkinitrd")
    assert any(cache.glob("pystage-*.json"))

    # What else the tools leave there: register's record (from an earlier boot), a UKI's
    # kernel, a build cut short; the admin's own note, ssh-setup's key and a saved dump.
    (images / "loaded.json").write_text("{}\n")
    os.utime(images / "loaded.json", (1000, 1000))
    (images / f"kdump-{kver}.linux").write_bytes(b"kernel")
    (images / f".kdump-{kver}.img.x1y2.tmp").write_bytes(b"partial")
    (images / "notes.txt").write_text("mine\n")
    ssh_key = chroot.path("/etc/kdump-mkinitrd/ssh/id_ed25519")
    ssh_key.parent.mkdir(parents=True)
    ssh_key.write_text("key\n")
    dump = chroot.path("/var/crash/host-2026-01-01-00:00:00/vmcore")
    dump.parent.mkdir(parents=True)
    dump.write_bytes(b"dump")

    removed = chroot.run("dpkg", "-r", "kdump-mkinitrd")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert {p.name for p in images.iterdir()} == {"notes.txt"}
    assert not chroot.path(f"/{PKGLIB}").exists()  # nor any __pycache__ left in it
    assert chroot.path("/etc/kdump-mkinitrd.yaml").read_text() == DISK_CONFIG
    assert ssh_key.is_file()
    assert dump.read_bytes() == b"dump"

    purged = chroot.run("dpkg", "-P", "kdump-mkinitrd")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    for gone in (
        "/etc/kdump-mkinitrd.yaml",
        "/etc/kdump-mkinitrd",
        f"/{IMAGE_DIR}",
        "/var/cache/kdump-mkinitrd",
        "/etc/kernel/postinst.d/kdump-mkinitrd",
    ):
        assert not chroot.path(gone).exists(), gone
    assert not wants.is_symlink()
    assert dump.read_bytes() == b"dump"
