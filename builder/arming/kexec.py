"""Load (and unload) the capture kernel ourselves with kexec_file_load(2); no kexec-tools needed.

kexec_file_load takes file descriptors and lets the kernel parse, place and (under lockdown
or signature enforcement) verify the kernel image, so it is the only way to load a capture
kernel on a Secure Boot machine. kexec-tools (``kexec -p``, the older kexec_load(2), which
parses images in user space) is used only as a fallback when the kernel lacks the syscall or
cannot parse the image format itself, and only when the kernel is not locked down (lockdown
forbids kexec_load entirely).

Every failure becomes a :class:`~kdump_mkinitrd.errors.KdumpError` that says what to do. The
syscall, the kexec-tools runner and every /sys and /proc path are parameters so the tests
can drive each path without root, and so nothing assumes the machine it runs on.

Kernel behaviour worth knowing (kernel/kexec_file.c): a crash load *first frees* the loaded
capture kernel, so a failed load leaves none loaded; the error messages say so when it
happened.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from kdump_mkinitrd.arming.cmdline import normalise_arch
from kdump_mkinitrd.arming.kexectext import kexec_tools_setup
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan.kernelimage import KexecKernel, open_for_kexec, open_regular

KEXEC_FILE_UNLOAD = 0x1
KEXEC_FILE_ON_CRASH = 0x2
KEXEC_FILE_NO_INITRAMFS = 0x4

# kexec_file_load's number per architecture; 32-bit arm (and i386) have none.
SYSCALL_NUMBERS: dict[str, int] = {
    "x86_64": 320,
    "aarch64": 294,
    "riscv64": 294,
    "loongarch64": 294,
    "ppc64": 382,
    "ppc64le": 382,
    "s390x": 381,
}

SYSFS = Path("/sys/kernel")
PROCSYS = Path("/proc/sys/kernel")
PROC_STATUS = Path("/proc/self/status")
CAP_SYS_BOOT = 22
MIB = 1 << 20
KEXEC_TOOLS_TIMEOUT = 120  # seconds; kexec -p reads and places a few MB, it never takes long
# Where kexec-tools lives even when PATH (e.g. a non-login sudo) lacks the sbin directories.
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"

CmdlineBuffer = ctypes.Array[ctypes.c_char]
# Same contract as libc's syscall(2): (number, kernel_fd, initrd_fd, cmdline_len, cmdline,
# flags) → 0, or -1 with the error in ctypes.get_errno(). Tests pass a fake that records.
Syscall = Callable[[int, int, int, int, CmdlineBuffer | None, int], int]
# Runs kexec-tools: (argv, descriptors the program inherits under their own numbers) →
# finished process (stdout/stderr as text).
Runner = Callable[[Sequence[str], Sequence[int]], subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class CrashStatus:
    """The kernel's crash-kernel state from /sys/kernel."""

    loaded: bool  # a capture kernel is loaded (kexec_crash_loaded)
    reserved_bytes: int  # memory reserved by crashkernel= (kexec_crash_size)
    supported: bool = True  # False: the kernel has no crash dump support (files absent)


@dataclass(frozen=True)
class LoadResult:
    """What was loaded, how, and into how much reserved memory."""

    method: Literal["kexec_file_load", "kexec_load"]
    kernel: Path
    initrd: Path
    cmdline: str
    kernel_bytes: int  # what the kernel reads: the uncompressed size of a compressed kernel
    initrd_bytes: int
    reserved_bytes: int
    kernel_format: str = ""  # what the kernel file is (kernelimage.KernelFile.describe)
    fallback_reason: str | None = None  # why kexec_file_load was not used
    command: tuple[str, ...] | None = None  # the kexec-tools command, when it was used


# ---------------------------------------------------------------------------------------------
# Reading the kernel's state


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return int(text, 0) if text is not None else None
    except ValueError:
        return None


def crash_status(sysfs: Path = SYSFS) -> CrashStatus:
    """Whether a capture kernel is loaded and how much memory crashkernel= reserved."""
    reserved = _read_int(sysfs / "kexec_crash_size")
    loaded = _read_int(sysfs / "kexec_crash_loaded")
    if reserved is None:
        return CrashStatus(loaded=False, reserved_bytes=0, supported=False)
    return CrashStatus(loaded=bool(loaded), reserved_bytes=reserved)


def lockdown_mode(sysfs: Path = SYSFS) -> str | None:
    """The active lockdown mode ("none", "integrity", "confidentiality"); None without the LSM."""
    text = _read_text(sysfs / "security" / "lockdown")
    if text is None:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def _locked_down(sysfs: Path) -> str | None:
    """The lockdown mode if it forbids kexec_load, else None."""
    mode = lockdown_mode(sysfs)
    return mode if mode not in (None, "none") else None


def _has_cap_sys_boot(status: Path = PROC_STATUS) -> bool:
    """CAP_SYS_BOOT in our effective set: what the kernel checks, not merely uid 0."""
    text = _read_text(status) or ""
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_BOOT & 1)
    return os.geteuid() == 0


def syscall_number(machine: str | None = None) -> int | None:
    """kexec_file_load's number for *machine* (default: this one); None where it does not exist.

    A 32-bit process on a 64-bit kernel (uname says x86_64) uses the 32-bit syscall table,
    which has no kexec_file_load: calling 320 there would be another syscall entirely.
    """
    if machine is None:
        machine = platform.machine()
        if ctypes.sizeof(ctypes.c_void_p) != 8:
            return None
    return SYSCALL_NUMBERS.get(normalise_arch(machine))


def _libc_syscall(
    number: int,
    kernel_fd: int,
    initrd_fd: int,
    cmdline_len: int,
    cmdline: CmdlineBuffer | None,
    flags: int,
) -> int:
    """syscall(2) through ctypes, every argument widened to a C long as the kernel reads it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result: int = libc.syscall(
        ctypes.c_long(number),
        ctypes.c_long(kernel_fd),
        ctypes.c_long(initrd_fd),
        ctypes.c_ulong(cmdline_len),
        cmdline,
        ctypes.c_ulong(flags),
    )
    return result


def _kexec_file_load(
    syscall: Syscall,
    number: int,
    kernel_fd: int,
    initrd_fd: int,
    cmdline: bytes | None,
    flags: int,
) -> int:
    """Call kexec_file_load; 0 on success, else the errno.

    The command line goes over as a NUL-terminated buffer whose length counts the NUL: the
    kernel rejects (EINVAL) a buffer whose last byte is not NUL.
    """
    buffer = None if cmdline is None else ctypes.create_string_buffer(cmdline, len(cmdline) + 1)
    length = 0 if buffer is None else len(buffer)
    ctypes.set_errno(0)
    if syscall(number, kernel_fd, initrd_fd, length, buffer, flags) == 0:
        return 0
    return ctypes.get_errno() or errno.EIO


# ---------------------------------------------------------------------------------------------
# Messages


def _mib(size: int) -> str:
    return f"{size / MIB:.1f} MiB"


def _crashkernel_hint(suggest: str | None) -> str:
    return f"crashkernel={suggest}" if suggest else "crashkernel=SIZE"


def _no_support_error(sysfs: Path) -> KdumpError:
    if not sysfs.is_dir():
        return KdumpError(
            f"{sysfs} does not exist: sysfs is not mounted, so the crash kernel state "
            "cannot be read"
        )
    return KdumpError(
        f"this kernel has no crash dump support ({sysfs}/kexec_crash_size does not exist): it "
        "was built without CONFIG_CRASH_DUMP/CONFIG_KEXEC_FILE; boot a kernel that has them "
        "(every distribution kernel does)"
    )


def _no_reservation_error(suggest: str | None) -> KdumpError:
    return KdumpError(
        "no memory is reserved for a crash kernel (kexec_crash_size is 0): add "
        f"{_crashkernel_hint(suggest)} to the kernel command line (e.g. GRUB_CMDLINE_LINUX in "
        "/etc/default/grub, then update-grub or grub2-mkconfig) and reboot"
    )


@dataclass(frozen=True)
class _Attempt:
    """What the error messages need to know about one load."""

    kernel: Path
    initrd: Path
    cmdline_bytes: int  # including the NUL
    kernel_bytes: int
    initrd_bytes: int
    reserved_bytes: int
    suggest: str | None
    sysfs: Path
    procsys: Path

    def sizes(self) -> str:
        return (
            f"kernel {_mib(self.kernel_bytes)} + initramfs {_mib(self.initrd_bytes)} = "
            f"{_mib(self.kernel_bytes + self.initrd_bytes)}, reserved {_mib(self.reserved_bytes)}"
        )


def _eperm_reason(sysfs: Path, procsys: Path, *, loading: bool) -> str:
    """Which of the kernel's reasons for EPERM applies here, and what to do about it."""
    if not _has_cap_sys_boot():
        return (
            "loading a crash kernel needs CAP_SYS_BOOT: run as root (in a container, the "
            "container needs the capability too)"
        )
    if _read_int(procsys / "kexec_load_disabled") == 1:
        return (
            "kexec is disabled (kernel.kexec_load_disabled=1) and cannot be re-enabled without "
            "a reboot: remove the setting from /etc/sysctl.conf or /etc/sysctl.d/ and reboot"
        )
    if _read_int(procsys / "kexec_load_limit_panic") == 0:
        return (
            "the allowed number of crash kernel loads is used up "
            "(kernel.kexec_load_limit_panic=0, which can only be lowered): reboot"
        )
    mode = _locked_down(sysfs)
    if loading and mode:
        return (
            f"the kernel is locked down ({mode}, usually because Secure Boot is on) and refused "
            "an unsigned capture kernel: use a kernel signed by a key the running kernel "
            "trusts, such as the distribution's signed vmlinuz (/boot/vmlinuz-$(uname -r))"
        )
    return (
        "the kernel refused although we have CAP_SYS_BOOT, kexec is enabled and the kernel is "
        "not locked down: a seccomp filter (containers block kexec by default) or a security "
        "module (SELinux, IMA appraisal) forbade it; check the audit log"
    )


def _signature_reason(code: int) -> str:
    detail = {
        errno.ENODATA: "the image carries no signature",
        errno.ENOKEY: "it is signed by a key the kernel does not trust",
        errno.EKEYREJECTED: "its signature was rejected",
        errno.EBADMSG: "its signature is malformed",
        errno.ENOPKG: "its signature uses an algorithm this kernel cannot check",
    }[code]
    return (
        f"the kernel requires a signed capture kernel and {detail}: the capture kernel must be "
        "signed by a key in the kernel's trusted keyrings (built-in, secondary, or the platform "
        "keyring/MOK); with Secure Boot use the distribution's signed vmlinuz"
    )


_SIGNATURE_ERRNOS = (errno.ENODATA, errno.ENOKEY, errno.EKEYREJECTED, errno.EBADMSG, errno.ENOPKG)


def _load_reason(code: int, attempt: _Attempt) -> str:
    """Why kexec_file_load failed with *code*, and what to do."""
    if code == errno.EPERM:
        return _eperm_reason(attempt.sysfs, attempt.procsys, loading=True)
    if code in _SIGNATURE_ERRNOS:
        return _signature_reason(code)
    if code in (errno.EADDRNOTAVAIL, errno.ENOMEM):
        return (
            "the capture kernel and initramfs do not fit the crash reservation "
            f"({attempt.sizes()}; the kernel also needs room to decompress and run): reserve "
            f"more with a larger {_crashkernel_hint(attempt.suggest)} and reboot, or build a "
            "smaller image"
        )
    if code == errno.EBUSY:
        return "another kexec load or unload is running right now (a kdump service?): try again"
    if code == errno.EINVAL:
        return (
            f"the kernel rejected the arguments; most often the command line is too long: it is "
            f"{attempt.cmdline_bytes} bytes and the kernel adds elfcorehdr= (about 30 bytes) to "
            "it, within 2048 on x86 and most architectures; shorten it (remove= in the config)"
        )
    if code == errno.ETXTBSY:
        return f"{attempt.kernel} or {attempt.initrd} is open for writing (still being built?)"
    if code == errno.EACCES:
        return "a security policy (IMA appraisal, an LSM) refused to let the kernel read the files"
    if code == errno.EFBIG:
        return "the kernel or initramfs is larger than the kernel accepts (4 GiB)"
    if code == errno.ENOENT:
        return f"{attempt.kernel} or {attempt.initrd} disappeared while loading"
    return os.strerror(code)


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


# ---------------------------------------------------------------------------------------------
# Loading


def _check_reservation(sysfs: Path, suggest: str | None) -> CrashStatus:
    status = crash_status(sysfs)
    if not status.supported:
        raise _no_support_error(sysfs)
    if status.reserved_bytes == 0:
        raise _no_reservation_error(suggest)
    return status


def _encode_cmdline(cmdline: str) -> bytes:
    raw = cmdline.encode()
    if b"\0" in raw:
        raise KdumpError("the capture command line contains a NUL character")
    return raw


def _unloaded_note(before: CrashStatus, sysfs: Path) -> str:
    """The kernel frees the loaded capture kernel before trying a new one: say so."""
    if before.loaded and not crash_status(sysfs).loaded:
        return (
            " (the capture kernel loaded before this attempt has been unloaded: none is loaded now)"
        )
    return ""


def load_crash_kernel(
    kernel: Path | KexecKernel,
    initrd: Path,
    cmdline: str,
    *,
    machine: str | None = None,
    sysfs: Path = SYSFS,
    procsys: Path = PROCSYS,
    suggest: str | None = None,
    syscall: Syscall | None = None,
    kexec: str = "kexec",
    run: Runner | None = None,
) -> LoadResult:
    """Load *kernel* + *initrd* as the crash (capture) kernel with *cmdline*.

    *kernel* is a kernel file (an x86 bzImage, an arm64 Image, a gzip-compressed Image or an
    EFI zboot image; see kernelimage) or one already opened by kernelimage.open_for_kexec.
    *suggest* is a crashkernel= value to recommend when the reservation is missing or too
    small. kexec_file_load is tried first; on ENOSYS/ENOEXEC (or an architecture without it)
    ``kexec -p`` from kexec-tools (program *kexec*, run through *run*) is the fallback,
    unless the kernel is locked down.
    """
    raw = _encode_cmdline(cmdline)
    arch = normalise_arch(machine or platform.machine())
    # The files first: a typo in a path is the quicker fix than a reboot for crashkernel=.
    with contextlib.ExitStack() as stack:
        if isinstance(kernel, Path):
            kernel = stack.enter_context(open_for_kexec(kernel, arch))
        initrd_fd, initrd_bytes = stack.enter_context(open_regular(initrd, "initramfs"))
        before = _check_reservation(sysfs, suggest)
        attempt = _Attempt(
            kernel=kernel.path,
            initrd=initrd,
            cmdline_bytes=len(raw) + 1,
            kernel_bytes=kernel.size,
            initrd_bytes=initrd_bytes,
            reserved_bytes=before.reserved_bytes,
            suggest=suggest,
            sysfs=sysfs,
            procsys=procsys,
        )
        if kernel.size + initrd_bytes > before.reserved_bytes:
            raise KdumpError(
                f"the capture kernel and initramfs are larger than the crash reservation "
                f"({attempt.sizes()}): reserve more with a larger "
                f"{_crashkernel_hint(suggest)} and reboot, or build a smaller image"
            )
        number = syscall_number(machine)
        code = errno.ENOSYS
        if number is not None:
            code = _kexec_file_load(
                syscall or _libc_syscall, number, kernel.fd, initrd_fd, raw, KEXEC_FILE_ON_CRASH
            )
        result = LoadResult(
            method="kexec_file_load",
            kernel=kernel.path,
            initrd=initrd,
            cmdline=cmdline,
            kernel_bytes=kernel.size,
            initrd_bytes=initrd_bytes,
            reserved_bytes=before.reserved_bytes,
            kernel_format=kernel.file.describe(),
        )
        if code == 0:
            return result
        if code not in (errno.ENOSYS, errno.ENOEXEC):
            raise KdumpError(
                f"kexec_file_load of {kernel.path} ({kernel.file.describe()}) failed "
                f"({_errno_name(code)}): {_load_reason(code, attempt)}"
                f"{_unloaded_note(before, sysfs)}"
            )
        reason = _fallback_reason(code, number, machine)
        try:
            # Still inside the with: a decompressed kernel lives only as long as its memfd.
            with kexec_tools_setup(arch) if run is None else contextlib.nullcontext() as setup:
                runner = run or functools.partial(_run, setup=setup)
                command = _kexec_tools_load(attempt, kernel, cmdline, reason, kexec, runner)
        except KdumpError as exc:
            raise KdumpError(f"{exc}{_unloaded_note(before, sysfs)}") from None
    return replace(result, method="kexec_load", fallback_reason=reason, command=command)


def _fallback_reason(code: int, number: int | None, machine: str | None) -> str:
    if number is None:
        arch = normalise_arch(machine or platform.machine())
        return f"kexec_file_load does not exist on {arch} (or in a 32-bit process)"
    if code == errno.ENOSYS:
        return "this kernel has no kexec_file_load (ENOSYS: built without CONFIG_KEXEC_FILE)"
    return "kexec_file_load does not understand this kernel image format (ENOEXEC)"


# ---------------------------------------------------------------------------------------------
# The kexec-tools fallback


def _run(
    argv: Sequence[str], pass_fds: Sequence[int] = (), setup: Callable[[], None] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=KEXEC_TOOLS_TIMEOUT,
        check=False,
        pass_fds=tuple(pass_fds),
        preexec_fn=setup,  # arm64: the kallsyms kexec-tools needs (kexectext)
    )


def _find_kexec(kexec: str) -> str | None:
    if "/" in kexec:
        return kexec if os.access(kexec, os.X_OK) else None
    path = os.environ.get("PATH", "")
    return shutil.which(kexec, path=f"{path}:{_SBIN_PATH}" if path else _SBIN_PATH)


def _run_kexec_tools(
    argv: Sequence[str], run: Runner, what: str, pass_fds: Sequence[int] = ()
) -> None:
    try:
        done = run(argv, pass_fds)
    except subprocess.TimeoutExpired:
        raise KdumpError(f"{what}: {argv[0]} did not finish in {KEXEC_TOOLS_TIMEOUT} s") from None
    except OSError as exc:
        raise KdumpError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        output = (done.stderr or done.stdout or "").strip().splitlines()
        detail = "; ".join(output[-3:]) or f"exit status {done.returncode}"
        raise KdumpError(f"{what}: {' '.join(argv[:2])} failed: {detail}")


def _kexec_tools_command(
    attempt: _Attempt, kernel: KexecKernel, cmdline: str, reason: str, kexec: str
) -> list[str]:
    mode = _locked_down(attempt.sysfs)
    if mode:
        raise KdumpError(
            f"cannot load {attempt.kernel}: {reason}, and the fallback, kexec-tools' "
            f"kexec_load, is forbidden while the kernel is locked down ({mode}): use a kernel "
            "whose image format kexec_file_load understands and that is signed by a key the "
            "kernel trusts, such as the distribution's signed vmlinuz"
        )
    program = _find_kexec(kexec)
    if program is None:
        raise KdumpError(
            f"cannot load {attempt.kernel}: {reason}, and kexec-tools ('{kexec}'), the "
            "fallback, is not installed: install kexec-tools"
        )
    # -c: use kexec_load; newer kexec-tools would otherwise try kexec_file_load again first.
    # A decompressed kernel goes as /proc/self/fd/N, the descriptor inherited under its number:
    # kexec-tools before 2.0.27 cannot unpack an EFI zboot image itself.
    return [
        program,
        "-p",
        "-c",
        kernel.tool_path(),
        f"--initrd={attempt.initrd}",
        f"--append={cmdline}",
    ]


def _kexec_tools_load(
    attempt: _Attempt, kernel: KexecKernel, cmdline: str, reason: str, kexec: str, run: Runner
) -> tuple[str, ...]:
    argv = _kexec_tools_command(attempt, kernel, cmdline, reason, kexec)
    pass_fds = (kernel.fd,) if kernel.in_memory else ()
    _run_kexec_tools(argv, run, f"{reason}; loading with kexec-tools instead", pass_fds)
    return tuple(argv)


# ---------------------------------------------------------------------------------------------
# Unloading


def unload_crash_kernel(
    *,
    machine: str | None = None,
    sysfs: Path = SYSFS,
    procsys: Path = PROCSYS,
    syscall: Syscall | None = None,
    kexec: str = "kexec",
    run: Runner | None = None,
) -> bool:
    """Unload the capture kernel; True if one was loaded before.

    kexec_file_load(-1, -1, 0, NULL, UNLOAD|ON_CRASH) unloads whichever syscall loaded it.
    Only without kexec_file_load does ``kexec -p -u`` (kexec_load) do it, and never under
    lockdown, which forbids kexec_load's unload too.
    """
    before = crash_status(sysfs)
    if not before.loaded and before.supported:
        return False  # nothing to do, and no need for CAP_SYS_BOOT to do it
    if not before.supported and sysfs.is_dir():
        return False  # no crash dump support: nothing can have been loaded
    number = syscall_number(machine)
    code = errno.ENOSYS
    if number is not None:
        code = _kexec_file_load(
            syscall or _libc_syscall, number, -1, -1, None, KEXEC_FILE_UNLOAD | KEXEC_FILE_ON_CRASH
        )
    if code == 0:
        return before.loaded
    if code != errno.ENOSYS:
        reason = (
            _eperm_reason(sysfs, procsys, loading=False)
            if code == errno.EPERM
            else "another kexec load or unload is running right now: try again"
            if code == errno.EBUSY
            else os.strerror(code)
        )
        raise KdumpError(f"unloading the capture kernel failed ({_errno_name(code)}): {reason}")
    mode = _locked_down(sysfs)
    if mode:
        raise KdumpError(
            "this kernel has no kexec_file_load, and kexec_load's unload is forbidden while the "
            f"kernel is locked down ({mode}): the capture kernel stays loaded until reboot"
        )
    program = _find_kexec(kexec)
    if program is None:
        raise KdumpError(
            f"this kernel has no kexec_file_load and kexec-tools ('{kexec}') is not installed: "
            "install kexec-tools to unload with kexec_load"
        )
    _run_kexec_tools([program, "-p", "-u", "-c"], run or _run, "unloading the capture kernel")
    return before.loaded
