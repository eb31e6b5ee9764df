"""Loading the capture kernel: argument building, errno mapping, the kexec-tools fallback.

Most tests inject the syscall (a recorder with libc's contract: -1 and errno) and a fake
/sys/kernel tree, so they run anywhere without root. The last ones call the real syscall on
this machine and check that whatever its kernel says comes back as one of our KdumpErrors.
"""

from __future__ import annotations

import ctypes
import errno
import gzip
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kdump_mkinitrd.arming import kexec
from kdump_mkinitrd.arming.kexec import (
    KEXEC_FILE_ON_CRASH,
    KEXEC_FILE_UNLOAD,
    CmdlineBuffer,
    crash_status,
    load_crash_kernel,
    lockdown_mode,
    syscall_number,
    unload_crash_kernel,
)
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan.kernelimage import open_for_kexec
from kdump_mkinitrd.qemutest.guest_images import host_root_image
from kdump_mkinitrd.qemutest.qemu import Boot, default_accel, run
from tests.arm64_images import padded_image
from tests.conftest import Arm64Files, Kernel

MIB = 1 << 20
CMDLINE = 'console=ttyS0 irqpoll nr_cpus=1 foo="a b"'


@dataclass
class Call:
    number: int
    kernel_fd: int
    initrd_fd: int
    kernel: str | None  # what the fds pointed at during the call
    initrd: str | None
    kernel_content: bytes | None  # what the kernel could read from kernel_fd during the call
    cmdline_len: int
    cmdline: bytes | None  # the whole buffer, NUL included
    flags: int


@dataclass
class FakeSyscall:
    """libc's syscall(2) contract: 0, or -1 with errno set; records what it was given."""

    fail: int = 0
    on_call: list[Path] = field(default_factory=list)  # files to write "0" into (the kernel
    # freeing the loaded crash kernel)
    calls: list[Call] = field(default_factory=list)

    def __call__(
        self,
        number: int,
        kernel_fd: int,
        initrd_fd: int,
        cmdline_len: int,
        cmdline: CmdlineBuffer | None,
        flags: int,
    ) -> int:
        self.calls.append(
            Call(
                number,
                kernel_fd,
                initrd_fd,
                _fd_target(kernel_fd),
                _fd_target(initrd_fd),
                _fd_content(kernel_fd),
                cmdline_len,
                None if cmdline is None else cmdline.raw,
                flags,
            )
        )
        for path in self.on_call:
            path.write_text("0\n")
        if self.fail:
            ctypes.set_errno(self.fail)
            return -1
        return 0


def _fd_target(fd: int) -> str | None:
    return None if fd < 0 else os.readlink(f"/proc/self/fd/{fd}")


def _fd_content(fd: int) -> bytes | None:
    if fd < 0:
        return None
    out = bytearray()
    while chunk := os.pread(fd, 1 << 20, len(out)):
        out += chunk
    return bytes(out)


@dataclass
class FakeRun:
    returncode: int = 0
    stderr: str = ""
    raises: BaseException | None = None
    argvs: list[list[str]] = field(default_factory=list)
    pass_fds: list[tuple[int, ...]] = field(default_factory=list)
    kernels: list[bytes] = field(default_factory=list)  # what a decompressed kernel held

    def __call__(
        self, argv: Sequence[str], pass_fds: Sequence[int] = ()
    ) -> subprocess.CompletedProcess[str]:
        self.argvs.append(list(argv))
        self.pass_fds.append(tuple(pass_fds))
        for fd in pass_fds:
            self.kernels.append(Path(f"/proc/self/fd/{fd}").read_bytes())
        if self.raises is not None:
            raise self.raises
        return subprocess.CompletedProcess(list(argv), self.returncode, "", self.stderr)


@dataclass
class Host:
    sysfs: Path
    procsys: Path
    kernel: Path
    initrd: Path
    kexec: Path

    def set(self, name: str, value: str) -> None:
        path = self.sysfs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")

    def lockdown(self, mode: str) -> None:
        modes = ["none", "integrity", "confidentiality"]
        self.set("security/lockdown", " ".join(f"[{m}]" if m == mode else m for m in modes))


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    """A fake /sys/kernel with 256 MiB reserved and nothing loaded, and the files to load."""
    sysfs = tmp_path / "sys/kernel"
    procsys = tmp_path / "proc/sys/kernel"
    sysfs.mkdir(parents=True)
    procsys.mkdir(parents=True)
    (sysfs / "kexec_crash_size").write_text(f"{256 * MIB}\n")
    (sysfs / "kexec_crash_loaded").write_text("0\n")
    (procsys / "kexec_load_disabled").write_text("0\n")
    (procsys / "kexec_load_limit_panic").write_text("-1\n")
    kernel = tmp_path / "vmlinuz"
    initrd = tmp_path / "capture.img"
    kernel.write_bytes(b"K" * (3 * MIB))
    initrd.write_bytes(b"I" * (MIB // 2))
    fake_kexec = tmp_path / "bin/kexec"
    fake_kexec.parent.mkdir()
    fake_kexec.write_text("#!/bin/sh\nexit 1\n")
    fake_kexec.chmod(0o755)
    # EPERM diagnosis reads our capabilities; pretend we have CAP_SYS_BOOT unless told otherwise.
    monkeypatch.setattr(kexec, "_has_cap_sys_boot", lambda: True)
    return Host(sysfs, procsys, kernel, initrd, fake_kexec)


def _load(
    host: Host, syscall: FakeSyscall, run: FakeRun | None = None, **kw: object
) -> kexec.LoadResult:
    return load_crash_kernel(
        host.kernel,
        host.initrd,
        CMDLINE,
        machine=str(kw.pop("machine", "x86_64")),
        sysfs=host.sysfs,
        procsys=host.procsys,
        suggest="256M",
        syscall=syscall,
        kexec=str(kw.pop("kexec", host.kexec)),
        run=run or FakeRun(raises=AssertionError("kexec-tools must not run")),
    )


# ---------------------------------------------------------------------------------------------
# Argument building


def test_arguments_reach_the_syscall(host: Host) -> None:
    syscall = FakeSyscall()
    result = _load(host, syscall)
    [call] = syscall.calls
    assert call.number == 320
    assert call.kernel == str(host.kernel.resolve())
    assert call.initrd == str(host.initrd.resolve())
    # The kernel's values (include/uapi/linux/kexec.h), not the module's own names for them.
    assert call.flags == KEXEC_FILE_ON_CRASH == 0x2
    assert call.cmdline is not None
    assert call.cmdline_len == len(CMDLINE.encode()) + 1 == len(call.cmdline)
    assert call.cmdline[-1] == 0
    assert call.cmdline[:-1] == CMDLINE.encode()
    assert result.method == "kexec_file_load"
    assert result.fallback_reason is None and result.command is None
    assert (result.kernel_bytes, result.initrd_bytes) == (3 * MIB, MIB // 2)
    assert result.reserved_bytes == 256 * MIB
    # The descriptors are closed again.
    for fd in (call.kernel_fd, call.initrd_fd):
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.parametrize(
    ("machine", "number"),
    [
        ("x86_64", 320),
        ("amd64", 320),
        ("aarch64", 294),
        ("arm64", 294),
        ("riscv64", 294),
        ("loongarch64", 294),
        ("ppc64le", 382),
        ("ppc64", 382),
        ("s390x", 381),
        ("armv7l", None),
        ("i686", None),
    ],
)
def test_syscall_numbers(machine: str, number: int | None) -> None:
    assert syscall_number(machine) == number


def test_syscall_number_of_this_machine() -> None:
    assert syscall_number() == syscall_number(os.uname().machine)


def test_non_ascii_and_nul_in_cmdline(host: Host) -> None:
    syscall = FakeSyscall()
    load_crash_kernel(
        host.kernel, host.initrd, "x=é", machine="x86_64", sysfs=host.sysfs, syscall=syscall
    )
    assert syscall.calls[0].cmdline == "x=é".encode() + b"\0"
    with pytest.raises(KdumpError, match="NUL"):
        load_crash_kernel(
            host.kernel, host.initrd, "a\0b", machine="x86_64", sysfs=host.sysfs, syscall=syscall
        )


# ---------------------------------------------------------------------------------------------
# Checks before the syscall


def test_no_reservation(host: Host) -> None:
    host.set("kexec_crash_size", "0")
    syscall = FakeSyscall()
    with pytest.raises(KdumpError, match="no memory is reserved") as info:
        _load(host, syscall)
    assert "crashkernel=256M" in str(info.value) and "reboot" in str(info.value)
    assert not syscall.calls


def test_no_crash_dump_support(host: Host) -> None:
    (host.sysfs / "kexec_crash_size").unlink()
    (host.sysfs / "kexec_crash_loaded").unlink()
    with pytest.raises(KdumpError, match="no crash dump support"):
        _load(host, FakeSyscall())
    assert crash_status(host.sysfs) == kexec.CrashStatus(False, 0, supported=False)


def test_sysfs_not_mounted(host: Host, tmp_path: Path) -> None:
    with pytest.raises(KdumpError, match="not mounted"):
        load_crash_kernel(
            host.kernel, host.initrd, "", sysfs=tmp_path / "nowhere", syscall=FakeSyscall()
        )


def test_image_larger_than_reservation(host: Host) -> None:
    host.set("kexec_crash_size", str(2 * MIB))
    syscall = FakeSyscall()
    with pytest.raises(KdumpError, match="larger than the crash reservation") as info:
        _load(host, syscall)
    message = str(info.value)
    assert "kernel 3.0 MiB + initramfs 0.5 MiB = 3.5 MiB, reserved 2.0 MiB" in message
    assert "crashkernel=256M" in message
    assert not syscall.calls


def test_missing_files(host: Host, tmp_path: Path) -> None:
    host.kernel.unlink()
    with pytest.raises(KdumpError, match=r"kernel .*vmlinuz does not exist"):
        _load(host, FakeSyscall())
    host.kernel.mkdir()
    with pytest.raises(KdumpError, match="is not a regular file"):
        _load(host, FakeSyscall())


# ---------------------------------------------------------------------------------------------
# errno → message


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EKEYREJECTED, ["rejected", "signed by a key", "signed vmlinuz"]),
        (errno.ENOKEY, ["does not trust", "trusted keyrings"]),
        (errno.EBADMSG, ["malformed", "signed"]),
        (errno.ENODATA, ["no signature"]),
        (errno.EBUSY, ["another kexec load", "try again"]),
        (errno.EADDRNOTAVAIL, ["do not fit", "3.5 MiB", "reserved 256.0 MiB", "crashkernel=256M"]),
        (errno.ENOMEM, ["do not fit", "crashkernel=256M"]),
        (errno.EINVAL, ["command line is too long", f"{len(CMDLINE) + 1} bytes", "elfcorehdr"]),
        (errno.ETXTBSY, ["open for writing"]),
        (errno.EACCES, ["security policy"]),
        (errno.ENOENT, ["disappeared"]),
        (errno.EIO, [os.strerror(errno.EIO)]),
    ],
)
def test_errno_messages(host: Host, code: int, expected: list[str]) -> None:
    with pytest.raises(KdumpError) as info:
        _load(host, FakeSyscall(fail=code))
    message = str(info.value)
    assert f"({errno.errorcode[code]})" in message
    for text in expected:
        assert text in message


def test_eperm_without_cap_sys_boot(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kexec, "_has_cap_sys_boot", lambda: False)
    with pytest.raises(KdumpError, match="CAP_SYS_BOOT: run as root"):
        _load(host, FakeSyscall(fail=errno.EPERM))


def test_eperm_kexec_disabled(host: Host) -> None:
    (host.procsys / "kexec_load_disabled").write_text("1\n")
    with pytest.raises(KdumpError, match=r"kexec_load_disabled=1.*reboot"):
        _load(host, FakeSyscall(fail=errno.EPERM))


def test_eperm_load_limit(host: Host) -> None:
    (host.procsys / "kexec_load_limit_panic").write_text("0\n")
    with pytest.raises(KdumpError, match="kexec_load_limit_panic=0"):
        _load(host, FakeSyscall(fail=errno.EPERM))


@pytest.mark.parametrize("mode", ["integrity", "confidentiality"])
def test_eperm_lockdown(host: Host, mode: str) -> None:
    host.lockdown(mode)
    with pytest.raises(KdumpError, match=f"locked down \\({mode}.*Secure Boot.*signed"):
        _load(host, FakeSyscall(fail=errno.EPERM))


def test_eperm_other(host: Host) -> None:
    host.lockdown("none")
    with pytest.raises(KdumpError, match="seccomp"):
        _load(host, FakeSyscall(fail=errno.EPERM))


def test_failed_load_says_the_old_kernel_is_gone(host: Host) -> None:
    host.set("kexec_crash_loaded", "1")
    # The kernel frees the loaded capture kernel before it parses the new one.
    syscall = FakeSyscall(fail=errno.EADDRNOTAVAIL, on_call=[host.sysfs / "kexec_crash_loaded"])
    with pytest.raises(KdumpError, match="none is loaded now"):
        _load(host, syscall)


def test_failed_load_without_an_old_kernel_says_nothing_about_it(host: Host) -> None:
    with pytest.raises(KdumpError) as info:
        _load(host, FakeSyscall(fail=errno.EADDRNOTAVAIL))
    assert "loaded now" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# The kexec-tools fallback


@pytest.mark.parametrize(("code", "why"), [(errno.ENOSYS, "ENOSYS"), (errno.ENOEXEC, "ENOEXEC")])
@pytest.mark.parametrize("lockdown", [None, "none"])
def test_fallback_to_kexec_tools(host: Host, code: int, why: str, lockdown: str | None) -> None:
    if lockdown:
        host.lockdown(lockdown)
    run = FakeRun()
    result = _load(host, FakeSyscall(fail=code), run)
    expected = [
        str(host.kexec),
        "-p",
        "-c",
        str(host.kernel),
        f"--initrd={host.initrd}",
        f"--append={CMDLINE}",
    ]
    assert run.argvs == [expected]
    assert result.method == "kexec_load"
    assert result.command == tuple(expected)
    assert result.fallback_reason is not None and why in result.fallback_reason


def test_no_syscall_on_this_architecture_falls_back(host: Host) -> None:
    run = FakeRun()
    syscall = FakeSyscall()
    result = _load(host, syscall, run, machine="armv7l")
    assert not syscall.calls
    assert result.method == "kexec_load"
    assert result.fallback_reason is not None and "armv7l" in result.fallback_reason


@pytest.mark.parametrize("mode", ["integrity", "confidentiality"])
@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOEXEC])
def test_no_fallback_under_lockdown(host: Host, mode: str, code: int) -> None:
    host.lockdown(mode)
    run = FakeRun()
    with pytest.raises(KdumpError, match=f"forbidden while the kernel is locked down \\({mode}\\)"):
        _load(host, FakeSyscall(fail=code), run)
    assert not run.argvs


def test_fallback_without_kexec_tools(host: Host, tmp_path: Path) -> None:
    with pytest.raises(KdumpError, match="not installed: install kexec-tools"):
        _load(host, FakeSyscall(fail=errno.ENOSYS), FakeRun(), kexec=tmp_path / "none/kexec")


def test_fallback_failure_shows_kexec_output(host: Host) -> None:
    run = FakeRun(returncode=1, stderr="Cannot determine the file type of vmlinuz\n")
    with pytest.raises(KdumpError, match="Cannot determine the file type") as info:
        _load(host, FakeSyscall(fail=errno.ENOEXEC), run)
    assert "ENOEXEC" in str(info.value)


@pytest.mark.parametrize(
    "raises", [OSError(errno.ENOEXEC, "Exec format error"), subprocess.TimeoutExpired("k", 1)]
)
def test_fallback_runner_errors(host: Host, raises: BaseException) -> None:
    with pytest.raises(KdumpError, match="kexec"):
        _load(host, FakeSyscall(fail=errno.ENOSYS), FakeRun(raises=raises))


def test_kexec_found_in_sbin_without_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(kexec, "_SBIN_PATH", str(tmp_path / "sbin"))
    (tmp_path / "sbin").mkdir()
    program = tmp_path / "sbin/kexec"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    assert kexec._find_kexec("kexec") == str(program)
    assert kexec._find_kexec(str(tmp_path / "missing")) is None


# ---------------------------------------------------------------------------------------------
# arm64 kernels: the Image as shipped by Debian, Ubuntu (gzip) and Fedora (EFI zboot)


def _arm64_load(host: Host, kernel: Path, syscall: FakeSyscall, run: FakeRun) -> kexec.LoadResult:
    host.set("kexec_crash_size", str(512 * MIB))
    return load_crash_kernel(
        kernel, host.initrd, CMDLINE, machine="aarch64", sysfs=host.sysfs,
        procsys=host.procsys, suggest="512M", syscall=syscall, kexec=str(host.kexec), run=run,
    )  # fmt: skip


@pytest.mark.parametrize("which", ["image", "gzip", "zboot_gzip", "zboot_zstd"])
def test_arm64_kernel_reaches_the_syscall_as_its_image(
    host: Host, arm64_files: Arm64Files, which: str
) -> None:
    path: Path = getattr(arm64_files, which)
    image = arm64_files.image.read_bytes()
    syscall = FakeSyscall()
    result = _arm64_load(host, path, syscall, FakeRun(raises=AssertionError("no kexec-tools")))
    [call] = syscall.calls
    assert call.number == 294  # aarch64's kexec_file_load
    assert call.kernel_content is not None
    # zboot compresses the Image padded with zeros to its in-memory size.
    expected = padded_image(image) if which.startswith("zboot") else image
    assert call.kernel_content == expected
    assert result.kernel == path and result.kernel_bytes == len(expected)
    if which == "image":
        assert call.kernel == str(path.resolve()) and result.kernel_format == "arm64 Image"
    else:
        assert call.kernel is not None and call.kernel.startswith("/memfd:")
        assert "compressed arm64 Image" in result.kernel_format
    with pytest.raises(OSError):  # the memfd is gone with the load
        os.fstat(call.kernel_fd)


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOEXEC])
def test_arm64_fallback_gets_the_decompressed_image(
    host: Host, arm64_files: Arm64Files, code: int
) -> None:
    run = FakeRun()
    syscall = FakeSyscall(fail=code)
    result = _arm64_load(host, arm64_files.zboot_zstd, syscall, run)
    [argv] = run.argvs
    fd = syscall.calls[0].kernel_fd
    assert argv[:4] == [str(host.kexec), "-p", "-c", f"/proc/self/fd/{fd}"]
    assert run.pass_fds == [(fd,)]
    assert run.kernels == [padded_image(arm64_files.image.read_bytes())]
    assert result.method == "kexec_load" and result.kernel == arm64_files.zboot_zstd


def test_arm64_fallback_with_a_plain_image_names_the_file(
    host: Host, arm64_files: Arm64Files
) -> None:
    run = FakeRun()
    _arm64_load(host, arm64_files.image, FakeSyscall(fail=errno.ENOEXEC), run)
    assert run.argvs[0][3] == str(arm64_files.image) and run.pass_fds == [()]


def test_a_child_process_reads_the_memfd(arm64_files: Arm64Files) -> None:
    """The real runner hands the descriptor on: a real program reads the Image through it."""
    with open_for_kexec(arm64_files.gzip, "aarch64") as kernel:
        done = kexec._run(["cmp", kernel.tool_path(), str(arm64_files.image)], (kernel.fd,))
    assert done.returncode == 0, done.stdout + done.stderr


def test_arm64_reservation_is_checked_against_the_uncompressed_size(
    host: Host, arm64_files: Arm64Files
) -> None:
    compressed = arm64_files.gzip.stat().st_size
    host.set("kexec_crash_size", str(compressed + MIB))  # room for the file, not the Image
    syscall = FakeSyscall()
    with pytest.raises(KdumpError, match="larger than the crash reservation") as info:
        load_crash_kernel(
            arm64_files.gzip, host.initrd, CMDLINE, machine="arm64", sysfs=host.sysfs,
            syscall=syscall,
        )  # fmt: skip
    assert f"kernel {arm64_files.image.stat().st_size / MIB:.1f} MiB" in str(info.value)
    assert not syscall.calls


def test_kernel_of_another_machine_is_refused_before_any_load(
    host: Host, arm64_files: Arm64Files, kernel61: Kernel
) -> None:
    syscall = FakeSyscall()
    with pytest.raises(KdumpError, match=r"kernel for aarch64, not for this machine \(x86_64\)"):
        load_crash_kernel(arm64_files.gzip, host.initrd, "", machine="x86_64",
                          sysfs=host.sysfs, syscall=syscall)  # fmt: skip
    with pytest.raises(KdumpError, match=r"x86 bzImage.*\(aarch64\)"):
        load_crash_kernel(kernel61.vmlinuz, host.initrd, "", machine="aarch64",
                          sysfs=host.sysfs, syscall=syscall)  # fmt: skip
    assert not syscall.calls


def test_errors_name_the_compressed_file(host: Host, arm64_files: Arm64Files) -> None:
    with pytest.raises(KdumpError) as info:
        _arm64_load(host, arm64_files.zboot_gzip, FakeSyscall(fail=errno.EKEYREJECTED), FakeRun())
    message = str(info.value)
    assert str(arm64_files.zboot_gzip) in message and "EFI zboot image" in message


# ---------------------------------------------------------------------------------------------
# Unloading and status


def test_unload(host: Host) -> None:
    host.set("kexec_crash_loaded", "1")
    syscall = FakeSyscall()
    assert unload_crash_kernel(machine="aarch64", sysfs=host.sysfs, syscall=syscall) is True
    [call] = syscall.calls
    assert (call.number, call.kernel_fd, call.initrd_fd) == (294, -1, -1)
    assert (call.cmdline_len, call.cmdline) == (0, None)
    assert call.flags == KEXEC_FILE_UNLOAD | KEXEC_FILE_ON_CRASH == 0x1 | 0x2


def test_unload_when_nothing_is_loaded_does_nothing(host: Host) -> None:
    syscall = FakeSyscall()
    assert unload_crash_kernel(machine="x86_64", sysfs=host.sysfs, syscall=syscall) is False
    assert not syscall.calls


def test_unload_fallback(host: Host) -> None:
    host.set("kexec_crash_loaded", "1")
    run = FakeRun()
    assert unload_crash_kernel(
        machine="x86_64",
        sysfs=host.sysfs,
        syscall=FakeSyscall(fail=errno.ENOSYS),
        kexec=str(host.kexec),
        run=run,
    )
    assert run.argvs == [[str(host.kexec), "-p", "-u", "-c"]]


def test_unload_under_lockdown_has_no_fallback(host: Host) -> None:
    host.set("kexec_crash_loaded", "1")
    host.lockdown("integrity")
    run = FakeRun()
    with pytest.raises(KdumpError, match="forbidden while the kernel is locked down"):
        unload_crash_kernel(
            machine="x86_64",
            sysfs=host.sysfs,
            syscall=FakeSyscall(fail=errno.ENOSYS),
            kexec=str(host.kexec),
            run=run,
        )
    assert not run.argvs


def test_unload_eperm(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    host.set("kexec_crash_loaded", "1")
    monkeypatch.setattr(kexec, "_has_cap_sys_boot", lambda: False)
    with pytest.raises(KdumpError, match="CAP_SYS_BOOT"):
        unload_crash_kernel(
            machine="x86_64", sysfs=host.sysfs, syscall=FakeSyscall(fail=errno.EPERM)
        )


def test_crash_status_and_lockdown(host: Host) -> None:
    assert crash_status(host.sysfs) == kexec.CrashStatus(loaded=False, reserved_bytes=256 * MIB)
    host.set("kexec_crash_loaded", "1")
    assert crash_status(host.sysfs).loaded
    assert lockdown_mode(host.sysfs) is None
    host.lockdown("integrity")
    assert lockdown_mode(host.sysfs) == "integrity"


# ---------------------------------------------------------------------------------------------
# The real syscall on this machine

REAL_SYSFS = Path("/sys/kernel")


def _skip_if_a_capture_kernel_is_loaded() -> None:
    # A crash load frees the loaded capture kernel first: never touch a working kdump set-up.
    if crash_status(REAL_SYSFS).loaded:
        pytest.skip("a capture kernel is loaded on this machine; a test load would unload it")


def test_real_syscall_reports_errno() -> None:
    """The ctypes path itself: invalid flags make the kernel fail before doing anything."""
    number = syscall_number()
    if number is None:
        pytest.skip("no kexec_file_load on this architecture")
    assert kexec._kexec_file_load(kexec._libc_syscall, number, -1, -1, None, 1 << 30) in (
        errno.ENOSYS,  # no CONFIG_KEXEC_FILE
        errno.EINVAL,  # the flags
        errno.EPERM,  # no CAP_SYS_BOOT, kexec disabled, or a seccomp filter
    )
    if not (REAL_SYSFS / "kexec_loaded").exists():  # no CONFIG_KEXEC_CORE at all
        assert kexec._kexec_file_load(kexec._libc_syscall, number, -1, -1, None, 0) == errno.ENOSYS


def test_real_load_gives_a_clear_error(tmp_path: Path) -> None:
    _skip_if_a_capture_kernel_is_loaded()
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not a kernel" * 100)
    status = crash_status(REAL_SYSFS)
    with pytest.raises(KdumpError) as info:
        load_crash_kernel(kernel, kernel, "console=ttyS0", suggest="256M")
    message = str(info.value)
    if not status.supported:
        assert "no crash dump support" in message
    elif status.reserved_bytes == 0:
        assert "no memory is reserved" in message and "crashkernel=256M" in message
    # With a reservation the bogus image fails as ENOEXEC, kexec-tools then fails too (or the
    # kernel says EPERM): any of our errors will do, as long as it is one.


def test_real_syscall_with_a_fake_reservation(host: Host) -> None:
    """The real kexec_file_load past our checks; kexec-tools is faked."""
    _skip_if_a_capture_kernel_is_loaded()
    if syscall_number() is None:
        pytest.skip("no kexec_file_load on this architecture")
    run = FakeRun()
    try:
        result = load_crash_kernel(
            host.kernel,
            host.initrd,
            "console=ttyS0",
            sysfs=host.sysfs,
            kexec=str(host.kexec),
            run=run,
        )
    except KdumpError as exc:  # e.g. EPERM without CAP_SYS_BOOT or in a container
        assert "kexec_file_load" in str(exc)
        return
    # 3 MiB of "K" is no kernel: either there is no syscall or it cannot parse the image.
    assert result.method == "kexec_load" and result.fallback_reason is not None
    assert "ENOSYS" in result.fallback_reason or "ENOEXEC" in result.fallback_reason
    if not (REAL_SYSFS / "kexec_loaded").exists():
        assert "ENOSYS" in result.fallback_reason
    assert run.argvs[0][:3] == [str(host.kexec), "-p", "-c"]


def test_real_unload_does_not_fail_when_nothing_is_loaded() -> None:
    _skip_if_a_capture_kernel_is_loaded()
    assert unload_crash_kernel() is False


# ---------------------------------------------------------------------------------------------
# A real kernel with a real reservation (this host has none): a Debian guest

GUEST_LOAD = """
import errno, os, sys
from pathlib import Path
from kdump_mkinitrd.arming import kexec
packed, initrd = map(Path, sys.argv[1:3])
# The gzip file itself is what the kernel cannot parse: the reason for the memfd.
with open(packed, "rb") as k, open(initrd, "rb") as i:
    code = kexec._kexec_file_load(kexec._libc_syscall, 320, k.fileno(), i.fileno(), b"x",
                                  kexec.KEXEC_FILE_ON_CRASH)
print("GUEST-RAW", errno.errorcode.get(code, code), flush=True)
result = kexec.load_crash_kernel(packed, initrd, "console=ttyS0 nr_cpus=1")
loaded = Path("/sys/kernel/kexec_crash_loaded").read_text().strip()
print("GUEST-LOAD", result.method, result.kernel_format, "loaded=" + loaded, flush=True)
"""


@pytest.mark.qemu
def test_a_real_kernel_crash_loads_a_decompressed_kernel_from_the_memfd(
    tmp_path: Path, kernel61: Kernel
) -> None:
    """x86's kexec_file_load takes no gzip (ENOEXEC), so a gzip-compressed bzImage goes through
    the same sealed memfd as a compressed arm64 Image: the guest's kernel crash-loads it."""
    packed = tmp_path / "vmlinuz.gz"
    packed.write_bytes(gzip.compress(kernel61.vmlinuz.read_bytes(), compresslevel=1, mtime=0))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(bytes(4096))
    script = tmp_path / "load.py"
    script.write_text(GUEST_LOAD)
    command = [sys.executable, str(script), str(packed), str(initrd)]
    image = tmp_path / "guest.img"
    boot_args = host_root_image(
        image, kernel61.kver, kernel61.kmoddir, [command], crash=False, writable=["/run"],
        environment=["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/run",
                     "PYTHONDONTWRITEBYTECODE=1"],
    )  # fmt: skip
    result = run(
        Boot(kernel=kernel61.vmlinuz, initrd=image, serial_log=tmp_path / "serial.log",
             cmdline="console=ttyS0 panic=-1 crashkernel=256M", memory="1G",
             accel=default_accel(), timeout=600, extra=boot_args)
    )  # fmt: skip
    log = result.log.replace("\r", "")
    assert "kdump-test: command succeeded" in log, log[-4000:]
    assert "GUEST-LOAD kexec_file_load gzip-compressed x86 bzImage loaded=1" in log, log[-4000:]
    assert "GUEST-RAW ENOEXEC" in log, log[-4000:]
