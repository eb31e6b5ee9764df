"""`kdump-mkinitrd qemu-test` as a program: what it prints on stdout and stderr when it
cannot even start its guest (a build error), with and without --json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, Kernel


def qemu_test(kernel: Kernel, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "kdump.yaml"
    # A driver no kernel has: the build fails before any guest boots.
    config.write_text(
        "targets:\n  - {type: disk, device: LABEL=dumps, fstype: ext4}\n"
        "kernel_modules: [no_such_driver_anywhere]\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "kdump_mkinitrd.cli", "qemu-test", "-k", kernel.kver,
         "--kmoddir", str(kernel.kmoddir), "--kernel", str(kernel.vmlinuz), "-c", str(config),
         "--keep", str(tmp_path / "work"), *args],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip


def test_json_reports_a_build_error_as_json(kernel61: Kernel, tmp_path: Path) -> None:
    proc = qemu_test(kernel61, tmp_path, "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    assert "no_such_driver_anywhere" in report["error"]
    # Quiet under --json: no progress lines for a program reading both streams.
    assert "qemu-test:" not in proc.stderr


def test_json_with_verbose_still_shows_progress(kernel61: Kernel, tmp_path: Path) -> None:
    proc = qemu_test(kernel61, tmp_path, "--json", "--verbose")
    assert json.loads(proc.stdout)["ok"] is False
    assert "qemu-test: building the capture image\n" in proc.stderr


def test_without_json_the_error_goes_to_stderr(kernel61: Kernel, tmp_path: Path) -> None:
    proc = qemu_test(kernel61, tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "qemu-test: building the capture image\n" in proc.stderr
    assert "kdump-mkinitrd: error:" in proc.stderr and "no_such_driver_anywhere" in proc.stderr


def test_another_architecture_says_what_it_needs_and_what_it_does_not_do(
    kernel61: Kernel, tmp_path: Path
) -> None:
    """Refused before anything is built or booted, each with what to do instead."""
    cases = [
        ((), "an aarch64 guest needs --sysroot"),
        (("--sysroot", str(tmp_path), "--first-stage", "kexec-tools"),
         "--first-stage kexec-tools arms x86_64 guests only"),
        (("--sysroot", str(tmp_path), "--fault", "net-down", "--target", "ssh"),
         "an aarch64 guest saves to plain disks"),
    ]  # fmt: skip
    for extra, message in cases:
        proc = qemu_test(kernel61, tmp_path, "--arch", "arm64", *extra)
        assert proc.returncode == 1, proc.stderr
        assert message in proc.stderr, proc.stderr
        assert "building the capture image" not in proc.stderr
    proc = qemu_test(kernel61, tmp_path, "--arch", "riscv64")
    assert proc.returncode == 1 and "boots x86_64 and aarch64 guests, not riscv64" in proc.stderr
