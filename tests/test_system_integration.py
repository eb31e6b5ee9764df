"""The files under system/: the kernel-install plugin, the Debian kernel hooks, the systemd
unit, the OpenRC and SysV init scripts, the man pages and `make install`.

Each hook runs under its real caller (kernel-install, run-parts, systemd-analyze, make). Only
our own command is replaced, by a recording fake: what is under test is the hook's contract
with its caller, and the arguments it hands to `kdump-mkinitrd`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kdump_mkinitrd import cli, config
from kdump_mkinitrd.image.inputs import read_record, record_path
from kdump_mkinitrd.schema import Field
from tests.conftest import Kernel
from tests.test_packaging import shipped_files

REPO = Path(__file__).resolve().parent.parent
SYSTEM = REPO / "system"
PLUGIN = SYSTEM / "kernel-install" / "60-kdump-mkinitrd.install"
POSTINST_D = SYSTEM / "debian" / "postinst.d"
POSTRM_D = SYSTEM / "debian" / "postrm.d"
UNIT = SYSTEM / "systemd" / "kdump-mkinitrd.service"
OPENRC = SYSTEM / "openrc" / "kdump-mkinitrd"
SYSVINIT = SYSTEM / "sysvinit" / "kdump-mkinitrd"
MAN8 = SYSTEM / "man" / "kdump-mkinitrd.8"
MAN5 = SYSTEM / "man" / "kdump-mkinitrd.yaml.5"
SHELL_SCRIPTS = (
    PLUGIN,
    POSTINST_D / "kdump-mkinitrd",
    POSTRM_D / "kdump-mkinitrd",
    OPENRC,
    SYSVINIT,
)

RUNNING = os.uname().release
OTHER = "6.1.0-99-kdumptest" if RUNNING != "6.1.0-99-kdumptest" else "6.1.0-98-kdumptest"
TIMEOUT = 60

FAKE_SOURCE = """\
#!{python}
# Stands in for kdump-mkinitrd: records each call, exits with the code rc.json gives.
import json, os, stat, sys
from pathlib import Path

args = sys.argv[1:]
command = args[0] if args else ""
try:
    st = os.fstat(0)
    null = os.stat("/dev/null")
    stdin_is_null = stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev
except OSError:
    stdin_is_null = None
record = {{
    "argv": args,
    "env": {{k: v for k, v in os.environ.items()
            if k.startswith(("KERNEL_INSTALL_", "DEB_MAINT_", "KDUMP_"))}},
    "stdin_is_null": stdin_is_null,
}}
with open({log!r}, "a") as f:
    f.write(json.dumps(record) + "\\n")
print("fake kdump-mkinitrd: " + command)  # on stdout: a Debian hook must keep it off its own
rc_file = Path({rc!r})
rc = json.loads(rc_file.read_text()).get(command, 0) if rc_file.exists() else 0
# A successful build writes its output, but only inside the test's directory.
if command == "build" and rc == 0 and "-o" in args:
    out = Path(args[args.index("-o") + 1])
    if str(out).startswith({root!r}):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("image built by the fake for " + args[args.index("-k") + 1] + "\\n")
sys.exit(rc)
"""


@dataclass(frozen=True)
class Fake:
    """The recording stand-in for kdump-mkinitrd and the image directory the hooks use."""

    command: Path
    log: Path
    rc_file: Path
    image_dir: Path

    def calls(self) -> list[list[str]]:
        return [record["argv"] for record in self.records()]

    def records(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def exit_codes(self, **codes: int) -> None:
        self.rc_file.write_text(json.dumps(codes))

    def image(self, kver: str) -> Path:
        return self.image_dir / f"kdump-{kver}.img"

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment: nothing of the caller's KERNEL_INSTALL_* or DEB_MAINT_*."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LC_ALL": "C.UTF-8",
            "KDUMP_MKINITRD": str(self.command),
            "KDUMP_MKINITRD_IMAGE_DIR": str(self.image_dir),
        }
        env.update(extra)
        return env


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    command = bindir / "kdump-mkinitrd"
    log = tmp_path / "calls.jsonl"
    rc_file = tmp_path / "rc.json"
    command.write_text(
        FAKE_SOURCE.format(python=sys.executable, log=str(log), rc=str(rc_file), root=str(tmp_path))
    )
    command.chmod(0o755)
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    return Fake(command, log, rc_file, image_dir)


def _build_call(kver: str, kernel: Path | str, image: Path) -> list[str]:
    return [
        "build", "-k", kver, "--kernel", str(kernel), "-o", str(image), "--hostonly", "--if-needed"
    ]  # fmt: skip


def _register_call(kver: str, kernel: Path | str, image: Path) -> list[str]:
    return ["register", "-k", kver, "--kernel", str(kernel), "--image", str(image)]


# ---- the kernel-install plugin, called directly the way kernel-install calls it -------------


def _run_plugin(
    fake: Fake, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PLUGIN), *args],
        env=dict(env) if env is not None else fake.env(KERNEL_INSTALL_VERBOSE="0"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.fixture
def kernel_image(tmp_path: Path) -> Path:
    image = tmp_path / "src" / "vmlinuz"
    image.parent.mkdir()
    image.write_bytes(b"MZ not really a kernel\n")
    return image


def test_plugin_add_builds_the_image_outside_the_staging_area(
    fake: Fake, kernel_image: Path, tmp_path: Path
) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    env = fake.env(KERNEL_INSTALL_VERBOSE="0", KERNEL_INSTALL_STAGING_AREA=str(staging))
    entry_dir = tmp_path / "boot" / "token" / OTHER
    result = _run_plugin(fake, "add", OTHER, str(entry_dir), str(kernel_image), env=env)
    assert result.returncode == 0, result.stderr
    # Not the running kernel: built, never loaded.
    assert fake.calls() == [_build_call(OTHER, kernel_image, fake.image(OTHER))]
    assert fake.image(OTHER).read_text() == f"image built by the fake for {OTHER}\n"
    assert list(staging.iterdir()) == []
    assert not entry_dir.exists()
    assert result.stdout == ""  # quiet unless KERNEL_INSTALL_VERBOSE=1


def test_plugin_add_defaults_to_var_lib(fake: Fake, kernel_image: Path) -> None:
    env = fake.env(KERNEL_INSTALL_VERBOSE="0")
    del env["KDUMP_MKINITRD_IMAGE_DIR"]
    result = _run_plugin(fake, "add", OTHER, "/nonexistent/entry", str(kernel_image), env=env)
    assert result.returncode == 0, result.stderr
    (call,) = fake.calls()
    output = Path(call[call.index("-o") + 1])
    assert output == Path(f"/var/lib/kdump-mkinitrd/kdump-{OTHER}.img")
    assert not output.name.startswith("initrd")


@pytest.mark.parametrize("register_rc", [0, 3, 1])
def test_plugin_add_registers_the_running_kernel(
    fake: Fake, kernel_image: Path, register_rc: int
) -> None:
    fake.exit_codes(register=register_rc)
    result = _run_plugin(fake, "add", RUNNING, "/nonexistent/entry", str(kernel_image))
    # 3 (no crashkernel= reservation) is fine; a failed load is a loud warning, not a failed
    # kernel installation: the image is built and the boot-time service loads it.
    assert result.returncode == 0, result.stderr
    assert fake.calls() == [
        _build_call(RUNNING, kernel_image, fake.image(RUNNING)),
        _register_call(RUNNING, kernel_image, fake.image(RUNNING)),
    ]
    assert ("warning" in result.stderr) == (register_rc == 1)
    assert result.stdout == ""  # quiet unless KERNEL_INSTALL_VERBOSE=1


def test_plugin_build_failure_fails_and_keeps_the_old_image(fake: Fake, kernel_image: Path) -> None:
    fake.image(RUNNING).write_text("the old image\n")
    fake.exit_codes(build=1)
    result = _run_plugin(fake, "add", RUNNING, "/nonexistent/entry", str(kernel_image))
    assert result.returncode not in (0, 77)
    assert "failed" in result.stderr
    assert fake.calls() == [_build_call(RUNNING, kernel_image, fake.image(RUNNING))]  # no load
    assert fake.image(RUNNING).read_text() == "the old image\n"


def test_plugin_skips_when_no_target_is_configured(fake: Fake, kernel_image: Path) -> None:
    """build exits 4 when the config names no target: kdump is not set up, and a kernel
    installation must not fail for it (nor try to load an image that was not built)."""
    fake.exit_codes(build=4)
    result = _run_plugin(fake, "add", RUNNING, "/nonexistent/entry", str(kernel_image))
    assert result.returncode == 0, result.stderr
    assert "no dump target configured" in result.stderr
    assert fake.calls() == [_build_call(RUNNING, kernel_image, fake.image(RUNNING))]


def test_plugin_verbose_says_what_it_runs(fake: Fake, kernel_image: Path) -> None:
    env = fake.env(KERNEL_INSTALL_VERBOSE="1")
    result = _run_plugin(fake, "add", OTHER, "/nonexistent/entry", str(kernel_image), env=env)
    assert result.returncode == 0, result.stderr
    assert f"+{fake.command} build -k {OTHER} --kernel {kernel_image}" in result.stdout
    assert "fake kdump-mkinitrd: build" in result.stdout
    removed = _run_plugin(fake, "remove", OTHER, "/nonexistent/entry", env=env)
    assert f"Removing {fake.image(OTHER)}" in removed.stdout


def test_plugin_remove_deletes_exactly_that_image(fake: Fake) -> None:
    others = [
        fake.image(RUNNING),
        record_path(fake.image(RUNNING)),
        fake.image_dir / f"kdump-{OTHER}.img.bak",
        fake.image_dir / "notes.txt",
    ]
    gone = [fake.image(OTHER), record_path(fake.image(OTHER))]
    for path in [*gone, *others]:
        path.write_text("x")
    result = _run_plugin(fake, "remove", OTHER, "/nonexistent/entry")
    assert result.returncode == 0, result.stderr
    assert not any(path.exists() for path in gone)
    assert all(path.exists() for path in others)
    assert fake.calls() == []
    # Removing a kernel that has no image is fine too.
    assert _run_plugin(fake, "remove", OTHER, "/nonexistent/entry").returncode == 0


@pytest.mark.parametrize("kver", ["", "..", "../../etc/passwd", "a/b"])
def test_plugin_refuses_versions_that_name_other_files(
    fake: Fake, kernel_image: Path, kver: str, tmp_path: Path
) -> None:
    victim = tmp_path / "kdump-b.img"
    victim.write_text("x")
    assert _run_plugin(fake, "add", kver, "/e", str(kernel_image)).returncode == 1
    assert _run_plugin(fake, "remove", kver, "/e").returncode == 1
    assert fake.calls() == []
    assert victim.exists()


def test_plugin_fails_without_its_command_or_kernel(fake: Fake, kernel_image: Path) -> None:
    env = fake.env(KDUMP_MKINITRD=str(fake.command.parent / "missing"))
    result = _run_plugin(fake, "add", OTHER, "/e", str(kernel_image), env=env)
    assert result.returncode == 1
    assert "not found" in result.stderr
    assert _run_plugin(fake, "add", OTHER, "/e").returncode == 1
    assert _run_plugin(fake, "add", OTHER, "/e", "/nonexistent/vmlinuz").returncode == 1
    assert fake.calls() == []


def test_plugin_ignores_commands_it_does_not_know(fake: Fake) -> None:
    assert _run_plugin(fake, "inspect", OTHER, "/e").returncode == 0
    assert fake.calls() == []


# ---- the plugin under the real kernel-install, confined to tmp_path -------------------------


@dataclass(frozen=True)
class KernelInstall:
    env: dict[str, str]
    spy_log: Path
    tmpdir: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["kernel-install", *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    def spy(self) -> list[dict[str, Any]]:
        if not self.spy_log.exists():
            return []
        return [json.loads(line) for line in self.spy_log.read_text().splitlines()]


SPY_SOURCE = """\
#!{python}
# A plugin after ours: sees what is left in the staging area (files named initrd* there
# would become the boot initrd).
import json, os, sys
staging = os.environ.get("KERNEL_INSTALL_STAGING_AREA", "")
with open({log!r}, "a") as f:
    f.write(json.dumps({{
        "argv": sys.argv[1:],
        "staging": staging,
        "staged": sorted(os.listdir(staging)) if staging else None,
    }}) + "\\n")
"""


@pytest.fixture
def kernel_install(fake: Fake, tmp_path: Path) -> KernelInstall:
    """kernel-install with its configuration, $BOOT and staging area all inside tmp_path.

    systemd 252's kernel-install is a shell script; KERNEL_INSTALL_CONF_ROOT replaces
    /etc/kernel (install.conf and entry-token), install.conf sets BOOT_ROOT, MACHINE_ID and
    layout=other (so no entry directory is made), KERNEL_INSTALL_PLUGINS replaces the plugin
    directories, and TMPDIR holds the staging area it makes with mktemp.
    """
    if shutil.which("kernel-install") is None:
        pytest.skip("kernel-install is not installed")
    conf = tmp_path / "conf"
    boot = tmp_path / "boot"
    tmpdir = tmp_path / "tmpdir"
    for directory in (conf, boot, tmpdir):
        directory.mkdir()
    (conf / "install.conf").write_text(
        f"layout=other\nBOOT_ROOT={boot}\nMACHINE_ID=0123456789abcdef0123456789abcdef\n"
    )
    (conf / "entry-token").write_text("kdumptest\n")
    spy = tmp_path / "99-spy.install"
    spy_log = tmp_path / "spy.jsonl"
    spy.write_text(SPY_SOURCE.format(python=sys.executable, log=str(spy_log)))
    spy.chmod(0o755)
    plugins = f"{PLUGIN} {spy}"
    assert len(plugins.split()) == 2, "KERNEL_INSTALL_PLUGINS is split on whitespace"
    env = fake.env(
        KERNEL_INSTALL_CONF_ROOT=str(conf),
        KERNEL_INSTALL_PLUGINS=plugins,
        TMPDIR=str(tmpdir),
    )
    return KernelInstall(env, spy_log, tmpdir)


def test_kernel_install_add_and_remove(
    kernel_install: KernelInstall, fake: Fake, kernel_image: Path, tmp_path: Path
) -> None:
    added = kernel_install.run("-v", "add", OTHER, str(kernel_image))
    assert added.returncode == 0, added.stdout + added.stderr
    assert f"+{PLUGIN} add {OTHER}" in added.stdout
    assert f"+{fake.command} build -k {OTHER}" in added.stdout  # verbose reached the plugin
    assert fake.calls() == [_build_call(OTHER, kernel_image, fake.image(OTHER))]
    assert fake.records()[0]["env"]["KERNEL_INSTALL_VERBOSE"] == "1"
    assert fake.image(OTHER).is_file()
    # The plugin after ours still ran (we never return 77) and found nothing staged by us.
    (spied,) = kernel_install.spy()
    assert spied["argv"][:2] == ["add", OTHER]
    assert spied["staged"] == []
    assert Path(spied["staging"]).parent == kernel_install.tmpdir

    removed = kernel_install.run("remove", OTHER)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not fake.image(OTHER).exists()
    assert [s["argv"][:2] for s in kernel_install.spy()][1] == ["remove", OTHER]
    assert len(fake.calls()) == 1  # remove needs no command
    # Confined: the staging areas are gone, nothing was made under $BOOT.
    assert list(kernel_install.tmpdir.iterdir()) == []
    assert list((tmp_path / "boot").iterdir()) == []


def test_kernel_install_registers_the_running_kernel(
    kernel_install: KernelInstall, fake: Fake, kernel_image: Path
) -> None:
    fake.exit_codes(register=3)
    result = kernel_install.run("add", RUNNING, str(kernel_image))
    assert result.returncode == 0, result.stdout + result.stderr
    assert fake.calls() == [
        _build_call(RUNNING, kernel_image, fake.image(RUNNING)),
        _register_call(RUNNING, kernel_image, fake.image(RUNNING)),
    ]


def test_kernel_install_fails_when_the_build_fails(
    kernel_install: KernelInstall, fake: Fake, kernel_image: Path
) -> None:
    fake.exit_codes(build=1)
    result = kernel_install.run("add", OTHER, str(kernel_image))
    assert result.returncode != 0
    assert "building the kdump image" in result.stderr
    assert kernel_install.spy() == []  # kernel-install stops at the failing plugin
    assert not fake.image(OTHER).exists()


# ---- the Debian kernel hooks under the real run-parts --------------------------------------


@dataclass(frozen=True)
class HookRun:
    returncode: int
    stdout: str
    stderr: str


def _run_parts(
    hook_dir: Path, kver: str, env: dict[str, str], tmp_path: Path, image: str | None = None
) -> HookRun:
    """run-parts as a kernel package's maintainer script runs it, with a stdin that never
    ends: a hook that reads stdin would hang here until the timeout."""
    if shutil.which("run-parts") is None:
        pytest.skip("run-parts is not installed")
    out, err = tmp_path / "hook.stdout", tmp_path / "hook.stderr"
    argv = ["run-parts", "--report", "--exit-on-error", f"--arg={kver}"]
    argv.append(f"--arg={image if image is not None else f'/boot/vmlinuz-{kver}'}")
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [*argv, str(hook_dir)], env=env, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr
        )
        try:
            returncode = proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stdin is not None
            proc.stdin.close()
    return HookRun(returncode, out.read_text(), err.read_text())


def _with_params(env: dict[str, str], params: str | None) -> dict[str, str]:
    if params is not None:
        env["DEB_MAINT_PARAMS"] = params
    return env


@pytest.mark.parametrize(
    "params", [None, "", "configure 6.1.140-1", "'configure' '6.1.140-1'", "configure"]
)
def test_postinst_builds_on_configure(fake: Fake, tmp_path: Path, params: str | None) -> None:
    run = _run_parts(POSTINST_D, OTHER, _with_params(fake.env(), params), tmp_path)
    assert run.returncode == 0, run.stderr
    assert fake.calls() == [_build_call(OTHER, f"/boot/vmlinuz-{OTHER}", fake.image(OTHER))]
    assert run.stdout == ""  # the fake printed to stdout: the hook sent it to stderr
    assert "fake kdump-mkinitrd: build" in run.stderr
    assert all(record["stdin_is_null"] for record in fake.records())


@pytest.mark.parametrize(
    "params", ["abort-upgrade 6.1.140-1", "'abort-remove'", "triggered x", "abort-install"]
)
def test_postinst_ignores_other_maintainer_actions(fake: Fake, tmp_path: Path, params: str) -> None:
    run = _run_parts(POSTINST_D, OTHER, _with_params(fake.env(), params), tmp_path)
    assert (run.returncode, run.stdout, fake.calls()) == (0, "", [])


def test_postinst_registers_the_running_kernel(fake: Fake, tmp_path: Path) -> None:
    fake.exit_codes(register=3)
    env = fake.env(DEB_MAINT_PARAMS="configure 6.1.140-1")
    run = _run_parts(POSTINST_D, RUNNING, env, tmp_path)
    assert run.returncode == 0, run.stderr
    vmlinuz = f"/boot/vmlinuz-{RUNNING}"
    assert fake.calls() == [
        _build_call(RUNNING, vmlinuz, fake.image(RUNNING)),
        _register_call(RUNNING, vmlinuz, fake.image(RUNNING)),
    ]
    assert run.stdout == ""


def test_postinst_without_an_image_path_lets_the_builder_choose(fake: Fake, tmp_path: Path) -> None:
    env = fake.env()
    argv = ["run-parts", "--exit-on-error", f"--arg={OTHER}", str(POSTINST_D)]
    result = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT, check=False
    )
    assert result.returncode == 0, result.stderr
    image = str(fake.image(OTHER))
    assert fake.calls() == [["build", "-k", OTHER, "-o", image, "--hostonly", "--if-needed"]]


def test_postinst_build_failure_fails_and_keeps_the_old_image(fake: Fake, tmp_path: Path) -> None:
    fake.image(RUNNING).write_text("the old image\n")
    fake.exit_codes(build=1)
    run = _run_parts(POSTINST_D, RUNNING, fake.env(DEB_MAINT_PARAMS="configure"), tmp_path)
    assert run.returncode != 0
    assert "failed" in run.stderr
    assert [call[0] for call in fake.calls()] == ["build"]
    assert fake.image(RUNNING).read_text() == "the old image\n"
    assert run.stdout == ""


def test_postinst_skips_when_no_target_is_configured(fake: Fake, tmp_path: Path) -> None:
    fake.exit_codes(build=4)
    run = _run_parts(POSTINST_D, RUNNING, fake.env(DEB_MAINT_PARAMS="configure"), tmp_path)
    assert run.returncode == 0, run.stderr
    assert "no dump target configured" in run.stderr
    assert [call[0] for call in fake.calls()] == ["build"]  # and no register
    assert run.stdout == ""


def test_postinst_is_quiet_once_the_command_is_gone(fake: Fake, tmp_path: Path) -> None:
    # The hooks are conffiles: they stay after the package is removed but not purged.
    env = fake.env(KDUMP_MKINITRD=str(tmp_path / "removed" / "kdump-mkinitrd"))
    run = _run_parts(POSTINST_D, OTHER, env, tmp_path)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")


@pytest.mark.parametrize(
    ("params", "deleted"),
    [
        (None, True),
        ("", True),
        ("remove", True),
        ("'purge'", True),
        ("remove 6.1.140-1", True),
        ("upgrade 6.1.141-1", False),
        ("'failed-upgrade' '6.1.141-1'", False),
        ("abort-install", False),
        ("disappear", False),
    ],
)
def test_postrm_deletes_the_image_on_remove_and_purge(
    fake: Fake, tmp_path: Path, params: str | None, deleted: bool
) -> None:
    keep = [fake.image(RUNNING), record_path(fake.image(RUNNING)), fake.image_dir / "notes.txt"]
    uki_kernel = fake.image_dir / f"kdump-{OTHER}.linux"
    for path in [fake.image(OTHER), record_path(fake.image(OTHER)), uki_kernel, *keep]:
        path.write_text("x")
    run = _run_parts(POSTRM_D, OTHER, _with_params(fake.env(), params), tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""
    assert fake.image(OTHER).exists() is not deleted
    assert record_path(fake.image(OTHER)).exists() is not deleted
    assert uki_kernel.exists() is not deleted
    assert all(path.exists() for path in keep)
    assert fake.calls() == []


# ---- the systemd unit -------------------------------------------------------------------


def _unit_entries(text: str) -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key}", []).append(value)
    return entries


def test_unit_contract() -> None:
    entries = _unit_entries(UNIT.read_text())
    assert entries["Unit.ConditionKernelCommandLine"] == ["crashkernel"]
    assert "local-fs.target" in entries["Unit.After"][0].split()
    mounts = entries["Unit.RequiresMountsFor"][0].split()
    assert {"/etc/kdump-mkinitrd.yaml", "/var/lib/kdump-mkinitrd", "/boot"} <= set(mounts)
    assert entries["Service.Type"] == ["oneshot"]
    assert entries["Service.RemainAfterExit"] == ["yes"]
    assert entries["Service.ExecStart"] == ["@BINDIR@/kdump-mkinitrd register"]
    assert entries["Service.ExecStop"] == ["@BINDIR@/kdump-mkinitrd unregister"]
    assert entries["Install.WantedBy"] == ["multi-user.target"]


def _verify(unit_text: str, tmp_path: Path, bindir: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on the unit with @BINDIR@ replaced; MANPATH holds our pages,
    so its Documentation=man: references are checked too."""
    man = tmp_path / "man"
    for page, section in ((MAN8, "man8"), (MAN5, "man5")):
        (man / section).mkdir(parents=True, exist_ok=True)
        shutil.copy(page, man / section / page.name)
    unit = tmp_path / "units" / UNIT.name
    unit.parent.mkdir(exist_ok=True)
    unit.write_text(unit_text.replace("@BINDIR@", str(bindir)))
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        env={**os.environ, "MANPATH": str(man)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_unit_passes_systemd_analyze_verify(fake: Fake, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = _verify(UNIT.read_text(), tmp_path, fake.command.parent)
    assert result.returncode == 0, result.stderr
    assert UNIT.name not in result.stderr, result.stderr
    # The check has teeth: a missing command is an error.
    missing = _verify(UNIT.read_text(), tmp_path, tmp_path / "nowhere")
    assert missing.returncode != 0


# ---- the OpenRC and SysV init scripts ------------------------------------------------------


def _crashkernel_on_cmdline() -> bool:
    words = Path("/proc/cmdline").read_text().split()
    return any(w == "crashkernel" or w.startswith("crashkernel=") for w in words)


OPENRC_STUBS = """
ebegin() { echo "* $*"; }
eend() { [ "$1" -eq 0 ] || echo "failed: $2"; return "$1"; }
einfo() { echo "* $*"; }
ewarn() { echo "* WARNING: $*"; }
"""


def _openrc(fake: Fake, action: str) -> subprocess.CompletedProcess[str]:
    """openrc-run is not here: source the script into sh with the e* helpers stubbed and run
    one of its functions the way openrc-run would."""
    script = f'{OPENRC_STUBS}\n. "$1"\ncommand="$2"\n{action}\n'
    return subprocess.run(
        ["sh", "-c", script, "sh", str(OPENRC), str(fake.command)],
        env=fake.env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_openrc_script(fake: Fake) -> None:
    depend = _openrc(fake, "need() { echo need $*; }; after() { :; }; depend")
    assert depend.stdout.split() == ["need", "localmount"]
    assert _openrc(fake, "stop").returncode == 0
    assert fake.calls() == [["unregister"]]
    fake.exit_codes(unregister=1)
    assert _openrc(fake, "stop").returncode == 1
    if _crashkernel_on_cmdline():
        pytest.skip("crashkernel= is on this machine's command line")
    start = _openrc(fake, "start")
    assert start.returncode == 0
    assert "crashkernel= is not on the kernel command line" in start.stdout
    assert fake.calls() == [["unregister"], ["unregister"]]  # start registered nothing


def _sysvinit(fake: Fake, action: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SYSVINIT), action],
        env=fake.env(SYSTEMCTL_SKIP_REDIRECT="1", **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_sysvinit_lsb_header() -> None:
    text = SYSVINIT.read_text()
    header = text[text.index("### BEGIN INIT INFO") : text.index("### END INIT INFO")]
    fields = dict(
        (m.group(1), m.group(2).strip()) for m in re.finditer(r"^# ([\w-]+):\s*(.*)$", header, re.M)
    )
    assert fields["Provides"] == "kdump-mkinitrd"
    assert "$local_fs" in fields["Required-Start"].split()
    assert fields["Default-Start"].split() == ["2", "3", "4", "5"]
    assert fields["Short-Description"]


@pytest.mark.parametrize(("status_rc", "lsb_rc"), [(0, 0), (2, 3), (4, 0), (1, 4)])
def test_sysvinit_status_maps_to_lsb_codes(fake: Fake, status_rc: int, lsb_rc: int) -> None:
    fake.exit_codes(status=status_rc)
    result = _sysvinit(fake, "status")
    assert result.returncode == lsb_rc
    assert fake.calls() == [["status"]]
    assert ("stale" in result.stdout + result.stderr) == (status_rc == 4)


def test_sysvinit_start_stop_restart(fake: Fake, tmp_path: Path) -> None:
    assert _sysvinit(fake, "stop").returncode == 0
    assert fake.calls() == [["unregister"]]
    bad = _sysvinit(fake, "frobnicate")
    assert bad.returncode == 2
    assert "Usage:" in bad.stderr
    gone = _sysvinit(fake, "start", KDUMP_MKINITRD=str(tmp_path / "removed"))
    assert (gone.returncode, gone.stdout, gone.stderr) == (0, "", "")
    if _crashkernel_on_cmdline():
        pytest.skip("crashkernel= is on this machine's command line")
    for action in ("start", "restart", "force-reload"):
        result = _sysvinit(fake, action)
        assert result.returncode == 0, result.stderr
        assert "crashkernel= is not on the kernel command line" in result.stdout
    # restart and force-reload unloaded first; nothing was registered.
    assert fake.calls() == [["unregister"], ["unregister"], ["unregister"]]


# ---- every shell script -----------------------------------------------------------------


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(SYSTEM)))
def test_shell_script_syntax_and_mode(script: Path) -> None:
    result = subprocess.run(
        ["sh", "-n", str(script)], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert result.returncode == 0, result.stderr
    first = script.read_text().splitlines()[0]
    assert first == ("#!/sbin/openrc-run" if script == OPENRC else "#!/bin/sh")
    assert script.stat().st_mode & 0o111 == 0o111, "run-parts and kernel-install skip it"


# ---- the man pages ------------------------------------------------------------------------


def _schema_keys(schema: Mapping[str, Field]) -> Iterator[str]:
    for name, field in schema.items():
        yield name
        nested = field.schema if field.schema is not None else field.items
        if isinstance(nested, dict):
            yield from _schema_keys(nested)


def test_man_pages_render_cleanly() -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    for page in (MAN8, MAN5):
        result = subprocess.run(
            ["groff", "-man", "-ww", "-z", str(page)],
            env={**os.environ, "LC_ALL": "C.UTF-8"},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert (result.returncode, result.stderr) == (0, ""), page


def test_man_pages_cover_the_commands_and_the_config_schema() -> None:
    man8 = MAN8.read_text()
    subparsers = next(
        a for a in cli.parser()._actions if a.dest == "command" and a.choices is not None
    )
    assert subparsers.choices is not None
    commands = {*subparsers.choices, "register", "unregister", "status", "estimate"}
    for command in commands:
        assert re.search(rf"^\.B {re.escape(command.replace('-', chr(92) + '-'))}\b", man8, re.M), (
            command
        )
    man5 = MAN5.read_text()
    for key in _schema_keys(config.SCHEMA):
        assert re.search(rf"^\.B {key}$", man5, re.M), f"config key {key} is not documented"


def test_man_page_lists_every_fault() -> None:
    from kdump_mkinitrd.qemutest.faults import FAULTS

    man8 = MAN8.read_text()
    for fault in FAULTS.values():
        name = re.escape(fault.name.replace("-", chr(92) + "-"))
        assert re.search(rf"^\.BR? {name}\b", man8, re.M), (
            f"--fault {fault.name} is not in the man page"
        )


# ---- make install -------------------------------------------------------------------------


def _make_install(*variables: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(
        ["make", "--no-print-directory", "-s", "install", *variables],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        check=False,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_make_install_lays_out_the_tree(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    result = _make_install(
        f"DESTDIR={dest}", "PREFIX=/usr", f"INSTALL_PYTHON={sys.executable}", "INSTALL_SYSVINIT=yes"
    )
    assert result.returncode == 0, result.stderr
    expected = {
        "usr/bin/kdump-mkinitrd": 0o755,
        "usr/lib/kernel/install.d/60-kdump-mkinitrd.install": 0o755,
        "etc/kernel/postinst.d/kdump-mkinitrd": 0o755,
        "etc/kernel/postrm.d/kdump-mkinitrd": 0o755,
        "etc/init.d/kdump-mkinitrd": 0o755,
        "usr/lib/systemd/system/kdump-mkinitrd.service": 0o644,
        "usr/share/man/man8/kdump-mkinitrd.8": 0o644,
        "usr/share/man/man5/kdump-mkinitrd.yaml.5": 0o644,
        "usr/lib/kdump-mkinitrd/kdump_mkinitrd/cli.py": 0o644,
        "usr/lib/kdump-mkinitrd/modules.d/base/module.yaml": 0o644,
        "usr/lib/kdump-mkinitrd/templates/init.sh.j2": 0o644,
    }
    assert {name: _mode(dest / name) for name in expected} == expected
    # As the Makefile's comment lays it out: the package as kdump_mkinitrd (builder/ without the
    # QEMU test harness), modules.d and templates beside it.
    lib = dest / "usr/lib/kdump-mkinitrd"
    installed = {p.relative_to(lib).as_posix() for p in lib.rglob("*") if p.is_file()}
    assert installed == shipped_files("modules.d", "templates")
    assert {p.name for p in lib.iterdir()} == {"kdump_mkinitrd", "modules.d", "templates"}
    assert not [p for p in dest.rglob("*") if "qemutest" in p.name]
    # No test server either (the test sshd once lived in the production sshsetup.py).
    servers = re.compile(r"^class \w*(Server|Sshd)\b|sshd_config|ganesha", re.M)
    assert not [p for p in lib.rglob("*.py") if servers.search(p.read_text())]
    for path in dest.rglob("*"):
        if path.is_file():
            assert "@BINDIR@" not in path.read_text(errors="replace"), path
            assert "@PKGLIBDIR@" not in path.read_text(errors="replace"), path
    launcher = (dest / "usr/bin/kdump-mkinitrd").read_text()
    assert launcher.splitlines()[0] == f"#!{sys.executable} -I"
    assert 'sys.path.insert(0, "/usr/lib/kdump-mkinitrd")' in launcher.splitlines()
    # The launcher runs the staged tree once pointed at it. Its qemu-test finds no harness,
    # which the checkout (in this venv, editable) has: the staged tree is what ran.
    staged = tmp_path / "kdump-mkinitrd"
    staged.write_text(launcher.replace('"/usr/lib/kdump-mkinitrd"', repr(str(lib))))
    staged.chmod(0o755)
    for args, code in ((["--help"], 0), (["qemu-test", "-k", "6.1.0-1-amd64"], 1)):
        ran = subprocess.run([str(staged), *args], capture_output=True, text=True,
                             timeout=TIMEOUT, check=False)  # fmt: skip
        assert ran.returncode == code, ran.stderr
    assert ran.stderr.startswith("kdump-mkinitrd: error: qemu-test needs the QEMU test harness")
    unit = _unit_entries((dest / "usr/lib/systemd/system/kdump-mkinitrd.service").read_text())
    assert unit["Service.ExecStart"] == ["/usr/bin/kdump-mkinitrd register"]
    assert (
        "KDUMP_MKINITRD:-/usr/bin/kdump-mkinitrd"
        in (dest / "etc/init.d/kdump-mkinitrd").read_text()
    )
    # No OpenRC script beside the SysV one: they share /etc/init.d/kdump-mkinitrd.
    assert (dest / "etc/init.d/kdump-mkinitrd").read_text().startswith("#!/bin/sh\n")


def test_make_install_openrc_instead(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    result = _make_install(
        f"DESTDIR={dest}",
        "PREFIX=/usr",
        "INSTALL_OPENRC=yes",
        "INSTALL_SYSTEMD=no",
        "INSTALL_DEBIAN_HOOKS=no",
        "INSTALL_KERNEL_INSTALL=no",
    )
    assert result.returncode == 0, result.stderr
    script = (dest / "etc/init.d/kdump-mkinitrd").read_text()
    assert script.startswith("#!/sbin/openrc-run\n")
    assert 'command="/usr/bin/kdump-mkinitrd"' in script
    assert not (dest / "etc/kernel").exists()
    assert not (dest / "usr/lib/systemd").exists()
    assert not (dest / "usr/lib/kernel").exists()
    both = _make_install(
        f"DESTDIR={tmp_path / 'both'}", "INSTALL_OPENRC=yes", "INSTALL_SYSVINIT=yes"
    )
    assert both.returncode != 0
    assert "pick one" in both.stderr
    assert not (tmp_path / "both").exists()


def test_installed_command_runs_from_its_own_tree(tmp_path: Path, kernel61: Kernel) -> None:
    """Installed for real under a prefix in tmp_path (no DESTDIR): the launcher must run the
    installed builder, which must find modules.d and templates beside it."""
    prefix = tmp_path / "prefix"
    result = _make_install(
        f"PREFIX={prefix}",
        f"SYSCONFDIR={prefix}/etc",
        f"KERNELINSTALLDIR={prefix}/lib/kernel/install.d",
        f"INSTALL_PYTHON={sys.executable}",
    )
    assert result.returncode == 0, result.stderr
    command = prefix / "bin" / "kdump-mkinitrd"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(command), *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
        )

    for args in (["--help"], ["inspect", "--help"]):
        ran = run(*args)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.startswith("usage: kdump-mkinitrd")
    assert run("qemu-test").stderr.startswith("kdump-mkinitrd: error: qemu-test needs the QEMU")
    # Which kdump_mkinitrd did the launcher import? (The venv also has the checkout, editable.)
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{str(command)!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(command)!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sys.modules['kdump_mkinitrd'].__file__, file=sys.stderr)\n"
    )
    where = subprocess.run(
        [sys.executable, "-I", "-c", probe],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert where.stderr.strip() == str(prefix / "lib/kdump-mkinitrd/kdump_mkinitrd/__init__.py")
    # A real build with the installed tree: its feature modules and templates are found.
    image = tmp_path / "kdump.img"
    config_file = tmp_path / "kdump.yaml"
    config_file.write_text("targets: [{type: raw, device: /dev/vdb}]\ncapture: {stage: static}\n")
    built = run(
        "build",
        "-k",
        kernel61.kver,
        "--kmoddir",
        str(kernel61.kmoddir),
        "--kernel",
        str(kernel61.vmlinuz),
        "-c",
        str(config_file),
        "-o",
        str(image),
    )
    assert built.returncode == 0, built.stderr
    listed = run("inspect", str(image))
    assert listed.returncode == 0, listed.stderr
    # The image's manifest names the feature modules and templates it was built from.
    # (Host paths are kept beside the image, in the record `build --if-needed` reads.)
    recorded = read_record(image)
    assert recorded is not None
    installed = prefix / "lib/kdump-mkinitrd"
    assert recorded["feature_dirs"] == [str(installed / "modules.d")]
    assert str(installed / "templates/init.sh.j2") in recorded["inputs"]
    source_tree = tuple(str(REPO / top) + "/" for top in ("builder", "modules.d", "templates"))
    assert not [name for name in recorded["inputs"] if name.startswith(source_tree)]
    assert str(installed / "kdump_mkinitrd/cli.py") in recorded["inputs"]
