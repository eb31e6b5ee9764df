"""`kdump-mkinitrd import-config` on the peers' real files: the shipped default of Debian's
kdump-tools package, and configurations of kdump-utils, kdump-tools and SUSE kdump written
from their documented keys (tests/data/import/). Each case's config and report are compared
whole with tests/data/import/expected/, and every config written is read back by our loader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdump_mkinitrd import config as config_mod
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import defaulttarget
from kdump_mkinitrd.importing import command, kdumptools, kdumputils, shellfile
from kdump_mkinitrd.qemutest.testcache import downloaded_deb
from tests.conftest import REPO
from tests.import_golden import DATA, EXPECTED, cases, imported_in_namespace

CASES = cases()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    return imported_in_namespace(tmp_path_factory.mktemp("import"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_case_gives_the_expected_config_report_and_exit(
    name: str, results: dict[str, dict[str, object]]
) -> None:
    result = results[name]
    assert result["yaml"] == (EXPECTED / f"{name}.yaml").read_text()
    assert result["report"] == (EXPECTED / f"{name}.report").read_text()
    assert result["code"] == int((EXPECTED / f"{name}.code").read_text())
    if result["code"] != 1:
        # What the command writes is what a user's build would load.
        config_mod.parse(str(result["yaml"]), name)


def test_every_expected_file_belongs_to_a_case() -> None:
    names = {p.name.rsplit(".", 1)[0] for p in EXPECTED.iterdir()}
    assert names == set(CASES)


def import_config(*args: str, cwd: Path = DATA) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdump_mkinitrd.cli", "import-config", *args],
        capture_output=True, text=True, cwd=cwd, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def shipped_kdump_tools_default(tmp_path: Path) -> Path:
    """/etc/default/kdump-tools as Debian's package installs it (from its own template)."""
    tree = tmp_path / "kdump-tools"
    subprocess.run(["dpkg-deb", "-x", str(downloaded_deb("kdump-tools")), str(tree)], check=True)
    etc = tree / "etc" / "default"
    etc.mkdir(parents=True, exist_ok=True)
    default = etc / "kdump-tools"
    default.write_text((tree / "usr/share/kdump-tools/kdump-tools.conf").read_text())
    return default


def test_debians_shipped_default_carries_over_whole(tmp_path: Path) -> None:
    default = shipped_kdump_tools_default(tmp_path)
    out = tmp_path / "kdump-mkinitrd.yaml"
    proc = import_config("--from", "kdump-tools", str(default), "-o", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 not carried over" in proc.stdout
    # /var/crash and nothing else: our own default target is the same, so no key is written.
    loaded = config_mod.load(out)
    assert loaded.targets == ()
    assert "USE_KDUMP" in proc.stdout and "KDUMP_COREDIR" in proc.stdout


def test_found_on_the_host_by_its_files(tmp_path: Path) -> None:
    default = shipped_kdump_tools_default(tmp_path)
    root = default.parent.parent.parent
    peer, files = command.detect(root)
    assert peer is kdumptools and files == [default]
    (root / "etc" / "kdump.conf").write_text("path /var/crash\n")
    with pytest.raises(KdumpError, match=r"more than one kdump.*choose with --from"):
        command.detect(root)
    (root / "etc" / "default" / "kdump-tools").unlink()
    peer, files = command.detect(root)
    assert peer is kdumputils and files == [root / "etc" / "kdump.conf"]


def test_without_any_peer_file_it_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(KdumpError, match=r"/etc/default/kdump-tools.*name the files"):
        command.detect(tmp_path)


def test_an_existing_output_is_kept_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "out.yaml"
    out.write_text("# mine\n")
    proc = import_config("--from", "kdump-tools", "kdump-tools/nfs-tuned.conf", "-o", str(out))
    assert proc.returncode == 1
    assert f"{out} exists" in proc.stderr
    assert out.read_text() == "# mine\n"
    proc = import_config("--from", "kdump-tools", "kdump-tools/nfs-tuned.conf", "-o", str(out),
                         "--force")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == (EXPECTED / "kdump-tools--nfs-tuned.yaml").read_text()
    assert proc.stdout.endswith(f"wrote {out} (checked by kdump-mkinitrd's config loader)\n")


def test_incomplete_import_exits_2_and_still_writes(tmp_path: Path) -> None:
    out = tmp_path / "out.yaml"
    proc = import_config("--from", "kdump-tools", "kdump-tools/ftp-and-ssh.conf", "-o", str(out))
    assert proc.returncode == 2
    assert "not carried over: FTP (kdump-tools/ftp-and-ssh.conf:4)" in proc.stdout
    assert config_mod.load(out).targets[0].type == "ssh"


def test_without_output_the_config_goes_to_stdout_and_the_report_to_stderr() -> None:
    proc = import_config("--from", "suse", "suse/nfs-qemu.conf")
    assert proc.returncode == 0
    assert proc.stdout == (EXPECTED / "suse--nfs-qemu.yaml").read_text()
    assert proc.stderr == (EXPECTED / "suse--nfs-qemu.report").read_text()


def test_json_report() -> None:
    proc = import_config("--from", "kdump-utils", "kdump-utils/nfs-ipv6.conf", "--json")
    assert proc.returncode == 2
    report = json.loads(proc.stdout)
    assert report["peer"] == "kdump-utils" and report["complete"] is False
    assert report["config"] == (EXPECTED / "kdump-utils--nfs-ipv6.yaml").read_text()
    nfs = report["outcomes"][0]
    assert nfs["key"] == "nfs" and nfs["line"] == 3 and nfs["outcome"] == "dropped"
    assert "IPv4" in nfs["note"] or "expected server:/path" in nfs["note"]


def test_files_need_a_peer_name_and_must_be_readable(tmp_path: Path) -> None:
    proc = import_config("kdump-tools/nfs-tuned.conf")
    assert proc.returncode == 1 and "--from" in proc.stderr
    proc = import_config("--from", "suse", str(tmp_path / "nope"))
    assert proc.returncode == 1 and f"cannot read {tmp_path / 'nope'}" in proc.stderr


def test_a_local_folder_is_pinned_to_the_filesystem_holding_it_on_this_host(
    tmp_path: Path,
) -> None:
    folder = "/var/tmp/kdump-import-test"
    conf = tmp_path / "kdump-tools"
    conf.write_text(f"KDUMP_COREDIR={folder}\n")
    proc = import_config("--from", "kdump-tools", str(conf), "-o", str(tmp_path / "out.yaml"))
    mounts = defaulttarget.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    try:
        target, where = defaulttarget.locate(folder, mounts)
    except defaulttarget.Unsuitable as exc:
        assert proc.returncode == 2
        assert f"not carried over: KDUMP_COREDIR ({conf}:1): {exc}" in proc.stdout
        return
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loaded = config_mod.load(tmp_path / "out.yaml").targets[0]
    assert (loaded.type, loaded.device, loaded.fstype, loaded.path) == (
        "disk", target.device, target.fstype, target.path,
    )  # fmt: skip
    assert f"pinned to {where} on this host now" in proc.stdout


def test_dump_to_rootfs_becomes_a_second_target_on_the_root_filesystem(tmp_path: Path) -> None:
    conf = "kdump-utils/xfs-label-rootfs-fallback.conf"
    proc = import_config("--from", "kdump-utils", conf, "-o", str(tmp_path / "out.yaml"))
    mounts = defaulttarget.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    try:
        root, where = defaulttarget.locate("/", mounts)
    except defaulttarget.Unsuitable as exc:
        assert proc.returncode == 2
        assert f"the root filesystem cannot be a second target: {exc}" in proc.stdout
        return
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, second = config_mod.load(tmp_path / "out.yaml").targets
    assert (first.device, first.fstype) == ("LABEL=crashdump", "xfs")
    assert (second.device, second.fstype, second.path) == (root.device, root.fstype, "/var/crash")
    assert f"pinned to {where}" in proc.stdout


def test_kdump_utils_hook_folders_run_in_their_order(tmp_path: Path) -> None:
    """kdump_pre, then kdump/pre.d beside kdump.conf; kdump/post.d, then kdump_post. Only
    executables count, as in kdump-utils."""
    conf = tmp_path / "kdump.conf"
    conf.write_text("kdump_pre /usr/local/bin/a\nkdump_post /usr/local/bin/z\n")
    for stage, names in (("pre.d", ("20-b", "10-a")), ("post.d", ("50-y",))):
        folder = tmp_path / "kdump" / stage
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_text("#!/bin/sh\n")
            (folder / name).chmod(0o755)
        (folder / "README").write_text("not a program\n")
    proc = import_config("--from", "kdump-utils", str(conf), "--json")
    hooks = config_mod.parse(json.loads(proc.stdout)["config"], "out").hooks
    pre_d, post_d = tmp_path / "kdump" / "pre.d", tmp_path / "kdump" / "post.d"
    assert [h.program for h in hooks.pre] == [
        "/usr/local/bin/a", str(pre_d / "10-a"), str(pre_d / "20-b"),
    ]  # fmt: skip
    assert [h.program for h in hooks.post] == [str(post_d / "50-y"), "/usr/local/bin/z"]


SHELL_TEXT = """\
A="a b"   # comment
export B='x $A'
C=a\\ b
D="one \\
two"
E=$A-${B}
F=$(hostname)
G=`id`
H=1 I=2
J=1 echo hi
if true; then
K=inside
fi
L=
M="lit \\$A \\"q\\""
N=$UNSET
"""


def test_shell_files_are_read_as_sh_would_without_running_anything() -> None:
    statements = shellfile.parse(SHELL_TEXT)
    values = {s.name: s.value for s in statements if s.name}
    assert values == {
        "A": "a b", "B": "x $A", "C": "a b", "D": "one two", "E": "a b-x $A", "F": None,
        "G": None, "H": "1", "I": "2", "J": None, "K": None, "L": "", "M": 'lit $A "q"',
        "N": None,
    }  # fmt: skip
    problems = {s.name or s.text: s.problem for s in statements if s.problem}
    assert "command or arithmetic substitution" in str(problems["F"])
    assert "command substitution" in str(problems["G"])
    assert problems["J"] == "the assignment is followed by a command"
    assert problems["K"] == "inside the block that starts on line 11, which sh may run or skip"
    assert problems["if true; then"].startswith("not an assignment")
    assert problems["N"] == "$UNSET is not set earlier in this file"
    # What sh itself makes of the same text, for the values it can read without running.
    script = SHELL_TEXT.replace("$(hostname)", "x").replace("`id`", "x") + (
        'printf "%s\\n" "$A" "$B" "$C" "$D" "$E" "$M"'
    )
    sh = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert sh.stdout.split("\n")[-7:-1] == [values[k] for k in "ABCDEM"]
