"""Hooks end to end: a real crash in QEMU, the hook programs written here on the host and
packed by the build; what they did read back from the target disk and the console."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdump_mkinitrd.qemutest.run import Options, Report, run_qemu_test
from tests.conftest import Kernel

pytestmark = pytest.mark.qemu

DISK = "targets:\n  - {type: disk, device: UUID=6a1f0d2e-3b4c-4d5e-8f60-718293a4b5c6, fstype: ext4, path: /var/crash}\n"  # noqa: E501
ACTIONS = """\
kernel_modules: [virtio_blk, virtio_pci]
failure_action: poweroff
final_action: poweroff
device_timeout: 5
"""


def _program(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _run(kernel: Kernel, tmp_path: Path, config: str, fault: str | None = None) -> Report:
    path = tmp_path / "kdump.yaml"
    path.write_text(config)
    report = run_qemu_test(
        Options(kernel.kver, kernel.kmoddir, kernel.vmlinuz, config=path, keep=tmp_path / "work",
                first_stage="kexec-tools", fault=fault)
    )  # fmt: skip
    assert report.ok, report.summary() + "\n" + Path(report.serial_log).read_text()[-4000:]
    return report


def test_failed_and_hung_pre_hooks_leave_the_dump_and_post_hooks_see_it(
    kernel61: Kernel, tmp_path: Path
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    fails = _program(hooks, "pre-fails", "echo 'pre hook here'\nexit 3\n")
    # Ignores TERM: the KILL after the grace ends it.
    hangs = _program(hooks, "pre-hangs", "trap '' TERM\necho 'hanging now'\n"
                     "while :; do sleep 1; done\n")  # fmt: skip
    post = _program(hooks, "post-marks", 'echo "status=$KDUMP_DUMP_STATUS args=$*" '
                    '> "$KDUMP_DUMP_DIR/post-marker"\nls "$KDUMP_DUMP_DIR" >> '
                    '"$KDUMP_DUMP_DIR/post-marker"\necho "marked $KDUMP_DUMP_DIR"\n'
                    'echo "oom_score_adj $(cat /proc/self/oom_score_adj)"\n')  # fmt: skip
    config = (f"{DISK}{ACTIONS}hooks:\n  timeout: 3\n  pre: [{fails}, {hangs}]\n"
              f"  post:\n    - {{program: {post}, args: [--from-test]}}\n")  # fmt: skip
    report = _run(kernel61, tmp_path, config)
    # The dump was saved and is complete (qemu-test checked it in full: vmcore, its record,
    # makedumpfile reading the panic back).
    assert report.checks["vmcore_present"] and report.checks["makedumpfile_agrees"]
    assert report.dump_dir is not None
    dump = Path(report.dump_dir)
    marker = (dump / "post-marker").read_text().splitlines()
    assert marker[0] == "status=0 args=--from-test 0"
    # The post hook ran with the dump whole in its folder, before the log was saved there.
    assert {"vmcore", "vmcore.json", "vmcore-dmesg.txt"} <= set(marker[1:])
    log = [line.split(" ", 1)[1] for line in (dump / "kdump-init.log").read_text().splitlines()]
    assert f"pre hook 0 ({fails}): pre hook here" in log
    assert f"pre hook 0 ({fails}) failed: exit status 3" in log
    assert f"pre hook 1 ({hangs}): hanging now" in log
    assert f"pre hook 1 ({hangs}) failed: killed after 3 s" in log
    inside = next(x for x in log if x.startswith(f"post hook 0 ({post}): marked "))
    assert inside.endswith(f"/var/crash/{dump.name}")
    assert f"post hook 0 ({post}) done" in log
    # The OOM killer takes a hook before anything else (the init is -1000).
    assert f"post hook 0 ({post}): oom_score_adj 1000" in log
    trying = next(x for x in log if x.startswith("trying target 0: "))
    order = [log.index(x) for x in (f"pre hook 1 ({hangs}) failed: killed after 3 s", trying,
                                    f"post hook 0 ({post}) done")]  # fmt: skip
    assert order == sorted(order)


def test_post_hooks_get_status_1_when_no_target_can_take_the_dump(
    kernel61: Kernel, tmp_path: Path
) -> None:
    post = _program(tmp_path, "post-says", 'echo "status=$KDUMP_DUMP_STATUS args=$* '
                    'dir=[$KDUMP_DUMP_DIR]"\n')  # fmt: skip
    config = f"{DISK}{ACTIONS}hooks:\n  post: [{post}]\n"
    # wrong-fs: the target's mount fails; qemu-test checks failure_action ran, no dump saved.
    report = _run(kernel61, tmp_path, config, fault="wrong-fs")
    assert report.checks["failure_action_ran"] and report.checks["no_dump_saved"]
    console = Path(report.serial_log).read_text(errors="replace")
    said = f"kdump: post hook 0 ({post}): status=1 args=1 dir=[]"
    assert said in console
    assert console.index(said) < console.index("kdump: running failure_action poweroff")
