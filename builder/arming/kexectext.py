"""Give kexec-tools on arm64 the kernel's `_text` address when /proc/kallsyms hides it.

kexec-tools (2.0.25, Debian 12's) builds the capture kernel's ELF core header itself when it
loads with kexec_load, and on arm64 it derives the linear map's base (page_offset) and the
kernel image's mapping from `_text` in /proc/kallsyms. A kernel built without
CONFIG_KALLSYMS_ALL lists only the symbols from `_stext` on, so `_text` is missing: kexec-tools
then says "Can't get the symbol of _text to calculate page_offset", carries on with 0, and
writes program headers with wrong virtual addresses and a kernel-text segment of absurd size.
The capture kernel oopses reading /proc/vmcore and no dump is saved. Debian 12's arm64 6.1
kernel is such a kernel, and it has no kexec_file_load either (no CONFIG_KEXEC_FILE), so
kexec-tools is the only way to load it.

The address is not lost: /proc/kcore maps the kernel image (`_text` to `_end`) as one
segment, the one that holds `_stext`. kexec-tools then runs in a private mount namespace in
which a copy of /proc/kallsyms that also lists `_text` is bind-mounted over the real one;
nothing outside that one process sees a change.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from kdump_mkinitrd.capture.vmcore import Vmcore, VmcoreError
from kdump_mkinitrd.errors import KdumpError

KALLSYMS = Path("/proc/kallsyms")
KCORE = Path("/proc/kcore")
# <linux/sched.h>, <sys/mount.h>
_CLONE_NEWNS = 0x00020000
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000


def _symbol(text: str, name: str) -> int | None:
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[2] == name:
            value = int(words[0], 16)
            # kptr_restrict shows zeros to whoever may not see addresses.
            return value or None
    return None


def text_from_kcore(stext: int, kcore: Path = KCORE) -> int:
    """The start of /proc/kcore's segment that maps the kernel image holding `stext`."""
    try:
        with contextlib.closing(Vmcore.open(str(kcore), require_vmcoreinfo=False)) as core:
            image = [s for s in core.loads if s.vaddr <= stext < s.vaddr + s.memsz]
    except VmcoreError as exc:
        raise KdumpError(f"cannot find the kernel's _text address: {exc}") from None
    if not image:
        raise KdumpError(f"cannot find the kernel's _text address: no segment of {kcore} "
                         f"maps _stext ({stext:#x})")  # fmt: skip
    # Vmalloc and module areas hold the image too; its own segment is the smallest.
    return min(image, key=lambda s: s.memsz).vaddr


def kallsyms_with_text(kallsyms: Path = KALLSYMS, kcore: Path = KCORE) -> str | None:
    """A copy of `kallsyms` that also lists `_text`, or None when it needs none."""
    try:
        text = kallsyms.read_text(errors="replace")
    except OSError as exc:
        raise KdumpError(f"cannot read {kallsyms}: {exc.strerror}") from None
    if _symbol(text, "_text") is not None:
        return None
    stext = _symbol(text, "_stext")
    if stext is None:
        raise KdumpError(f"{kallsyms} shows no _stext address (kernel.kptr_restrict?): "
                         "kexec-tools could not build a correct dump header")  # fmt: skip
    return f"{text_from_kcore(stext, kcore):016x} T _text\n{text}"


def _private_bind(source: bytes, target: bytes) -> Callable[[], None]:
    """What the kexec-tools child runs before exec: a mount namespace of its own (private,
    so nothing propagates back) with `source` bound over `target`."""

    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(_CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "making / private")
        if libc.mount(source, target, None, _MS_BIND, None) != 0:
            raise OSError(ctypes.get_errno(), f"bind-mounting over {target.decode()}")

    return setup


@contextlib.contextmanager
def kexec_tools_setup(
    machine: str, kallsyms: Path = KALLSYMS, kcore: Path = KCORE
) -> Iterator[Callable[[], None] | None]:
    """A function to run in the kexec-tools child before exec, or None when none is needed:
    on aarch64 (`machine` as normalise_arch gives it) when `kallsyms` lacks `_text`."""
    if machine != "aarch64":
        yield None
        return
    patched = kallsyms_with_text(kallsyms, kcore)
    if patched is None:
        yield None
        return
    with tempfile.NamedTemporaryFile("w", prefix="kdump-kallsyms.", delete=True) as copy:
        copy.write(patched)
        copy.flush()
        yield _private_bind(os.fsencode(copy.name), os.fsencode(kallsyms))
