"""kexec-tools' missing `_text` on arm64 kernels without KALLSYMS_ALL, recovered from a real
kernel core's segments. /proc/kcore is one (missing on this host: containers hide it); a real
vmcore of a Debian kernel is another, with the same layout. The arm64 guests in
test_arm64_qemu.py prove the capture it makes possible on Debian's own arm64 kernel."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kdump_mkinitrd.arming.kexectext import kallsyms_with_text, kexec_tools_setup, text_from_kcore
from kdump_mkinitrd.capture.vmcore import Vmcore
from kdump_mkinitrd.errors import KdumpError
from tests.test_vmcore import real_vmcore

pytestmark = pytest.mark.qemu  # the real vmcore comes from a guest (cached by content)
__all__ = ["real_vmcore"]


KERNEL_TEXT_MAP = 0xFFFFFFFF80000000  # x86_64's __START_KERNEL_map


def _address(text: str, name: str) -> int:
    return next(int(w[0], 16) for w in map(str.split, text.splitlines()) if w[2:3] == [name])


def _stext(core: Path) -> int:
    with Vmcore.open(str(core)) as vmcore:
        return vmcore.symbol("_stext")


def _kernel_segment(core: Path, stext: int) -> int:
    """Independently of the code under test: the kernel image's segment, the PT_LOAD whose
    virtual addresses are outside the direct map and hold _stext (x86_64's kernel text)."""
    with Vmcore.open(str(core)) as vmcore:
        return next(s.vaddr for s in vmcore.loads if s.vaddr <= stext < s.vaddr + s.memsz
                    and s.vaddr >= KERNEL_TEXT_MAP)  # fmt: skip


def _kallsyms(tmp_path: Path, stext: int) -> Path:
    """A kallsyms as a kernel without KALLSYMS_ALL writes it: from _stext on, no _text."""
    path = tmp_path / "kallsyms"
    path.write_text(f"{stext:016x} T _stext\n{stext + 0x40:016x} T do_one_initcall\n"
                    f"{stext + 0x100000:016x} T _etext\n")  # fmt: skip
    return path


def test_text_is_the_start_of_the_segment_holding_stext(real_vmcore: Path) -> None:
    stext = _stext(real_vmcore)
    assert text_from_kcore(stext, real_vmcore) == _kernel_segment(real_vmcore, stext)


def test_a_kallsyms_without_text_gets_it_back(real_vmcore: Path, tmp_path: Path) -> None:
    stext = _stext(real_vmcore)
    hidden = _kallsyms(tmp_path, stext)
    patched = kallsyms_with_text(hidden, real_vmcore)
    assert patched is not None
    assert _address(patched, "_text") == _kernel_segment(real_vmcore, stext)
    assert patched.endswith(hidden.read_text())


def test_nothing_is_done_where_text_is_listed_or_not_arm64(tmp_path: Path) -> None:
    listed = tmp_path / "kallsyms"
    listed.write_text("ffff800080000000 T _text\nffff800080010000 T _stext\n")
    assert kallsyms_with_text(listed, tmp_path / "no-kcore") is None
    with kexec_tools_setup("x86_64", tmp_path / "none", tmp_path / "none") as setup:
        assert setup is None
    with kexec_tools_setup("aarch64", listed, tmp_path / "no-kcore") as setup:
        assert setup is None


def test_hidden_addresses_and_a_missing_kcore_are_clear_errors(tmp_path: Path) -> None:
    restricted = tmp_path / "kallsyms"
    restricted.write_text("0000000000000000 T _stext\n0000000000000000 T _etext\n")
    with pytest.raises(KdumpError, match="no _stext address"):
        kallsyms_with_text(restricted)
    with pytest.raises(KdumpError, match=r"cannot find the kernel's _text address: .*no-kcore"):
        kallsyms_with_text(_kallsyms(tmp_path, 0xFFFF800080010000), tmp_path / "no-kcore")


def test_the_child_sees_the_copy_and_nobody_else_does(real_vmcore: Path, tmp_path: Path) -> None:
    """A real private mount namespace: the child reads _text at the address found in the
    core through the very path it was missing from; this process still reads the original."""
    stext = _stext(real_vmcore)
    hidden = _kallsyms(tmp_path, stext)
    with kexec_tools_setup("aarch64", hidden, real_vmcore) as setup:
        assert setup is not None
        seen = subprocess.run(["grep", " _text$", str(hidden)], preexec_fn=setup,
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert int(seen.split()[0], 16) == _kernel_segment(real_vmcore, stext)
    assert " _text" not in hidden.read_text()
