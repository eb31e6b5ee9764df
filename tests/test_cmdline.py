"""The capture kernel's command line: what is dropped, what is added, per architecture."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kdump_mkinitrd.arming.cmdline import (
    ARCH_ADDED,
    COMMON_ADDED,
    DROPPED,
    MULTI_VALUED,
    NOT_ON,
    REASONS,
    boot_cpu_apicid,
    capture_cmdline,
    kdump_args,
    normalise_arch,
    parse_arg,
    split_cmdline,
)
from kdump_mkinitrd.errors import KdumpError

FEDORA = (
    "BOOT_IMAGE=(hd0,gpt2)/vmlinuz-6.8.5-301.fc40.x86_64 "
    "root=UUID=4b2f0d3e-1c2a-4d5e-9f00-123456789abc ro rootflags=subvol=root "
    "rd.luks.uuid=luks-7d7c2d1e-0000-4000-8000-000000000001 rd.lvm.lv=fedora/swap "
    "rhgb quiet crashkernel=2G-64G:256M,64G-:512M console=tty0 console=ttyS0,115200n8\n"
)
DEBIAN = (
    "BOOT_IMAGE=/boot/vmlinuz-6.1.0-56-amd64 root=UUID=0e4a9f70-6b31-4c1a-9a53-3f0f2b9d4c11 "
    "ro quiet splash crashkernel=384M-:128M resume=UUID=aa-bb systemd.unit=graphical.target\n"
)
QUOTED = (
    'BOOT_IMAGE=/vmlinuz root=/dev/vda1 dyndbg="file drivers/usb/* +p" '
    '"acpi_osi=Windows 2020" quiet panic_on_warn=1 kvm-intel.nested=1 hugepages=512 '
    "nr_cpus=64 isolcpus=2-7 loglevel=4"
)
# A firecracker-style line: rdinit= and init arguments after "--" belong to the first boot.
FIRECRACKER = (
    "console=ttyS0 reboot=k panic=1 nomodule rdinit=/process_api -- --init-flag --addr 0.0.0.0"
)

X86_DEFAULTS = (
    "irqpoll nr_cpus=1 reset_devices cgroup_disable=memory transparent_hugepage=never "
    "novmcoredd panic=10 hugetlb_cma=0 kfence.sample_interval=0 cma=0 "
    "initramfs_options=size=90% numa=off acpi_no_memhotplug hest_disable nokaslr "
    "pcie_ports=compat mce=off"
)
ARCHES = ("x86_64", "aarch64", "ppc64le", "s390x", "riscv64", "loongarch64")


def test_fedora_x86_64() -> None:
    assert (
        capture_cmdline(FEDORA, "x86_64") == f"console=tty0 console=ttyS0,115200n8 {X86_DEFAULTS}"
    )


ARM64_DEFAULTS = (
    "nr_cpus=1 reset_devices cgroup_disable=memory transparent_hugepage=never "
    "novmcoredd panic=10 hugetlb_cma=0 kfence.sample_interval=0 cma=0 "
    "initramfs_options=size=90% numa=off swiotlb=noforce"
)
# Only on x86: ACPI memory hot-plug, HEST, PCIe port services, machine checks, APIC ids (and
# KASLR, whose x86 reason does not carry over).
X86_ONLY = ("acpi_no_memhotplug", "hest_disable", "nokaslr", "pcie_ports", "mce",
            "disable_cpu_apicid")  # fmt: skip


def test_debian_arm64_alias() -> None:
    assert capture_cmdline(DEBIAN, "arm64") == ARM64_DEFAULTS


def test_arm64_set() -> None:
    """The arm64 capture line from a Debian arm64 guest's own command line: console kept,
    the kdump set without irqpoll (it hangs some arm64 machines) and nothing x86-only."""
    current = "BOOT_IMAGE=/vmlinuz-6.1.0-56-arm64 root=/dev/vda1 ro console=ttyAMA0 quiet"
    out = capture_cmdline(current, "aarch64")
    assert out == f"console=ttyAMA0 {ARM64_DEFAULTS}"
    keys = {parse_arg(arg).key for arg in split_cmdline(out)}
    assert not keys & {*X86_ONLY, "irqpoll"}
    assert kdump_args("arm64") == kdump_args("aarch64") == ARM64_DEFAULTS.split()
    # irqpoll the first kernel itself runs with is the administrator's choice, and kept.
    assert "irqpoll" in capture_cmdline("irqpoll", "aarch64").split()


def test_left_out_arguments_say_why() -> None:
    for arch, left in NOT_ON.items():
        for arg in left:
            assert arg in COMMON_ADDED and arg not in kdump_args(arch)
            assert REASONS[f"{arch}: no {arg}"]
    assert "Graviton" in REASONS["aarch64: no irqpoll"]


def test_quoted_values_kept_as_written() -> None:
    out = capture_cmdline(QUOTED, "x86_64")
    assert out.startswith('dyndbg="file drivers/usb/* +p" "acpi_osi=Windows 2020" loglevel=4 ')
    for gone in ("panic_on_warn", "kvm-intel", "hugepages", "nr_cpus=64", "isolcpus", "quiet"):
        assert gone not in out
    assert out.count("nr_cpus=") == 1


def test_first_boot_init_arguments_dropped() -> None:
    out = capture_cmdline(FIRECRACKER, "x86_64")
    assert out == f"console=ttyS0 reboot=k nomodule {X86_DEFAULTS}"


@pytest.mark.parametrize(
    ("arch", "present", "absent"),
    [
        ("x86_64", ["nokaslr", "hest_disable", "pcie_ports=compat", "mce=off"], ["swiotlb"]),
        ("aarch64", ["numa=off", "swiotlb=noforce", "nr_cpus=1"], ["irqpoll", *X86_ONLY]),
        ("ppc64le", ["noirqdistrib", "numa=off", "kvm_cma_resv_ratio=0"], ["nokaslr"]),
        ("ppc64el", ["noirqdistrib"], []),
        ("s390x", ["vmcp_cma=0", "numa=off", "nr_cpus=1"], ["irqpoll", "reset_devices"]),
        ("riscv64", ["irqpoll", "nr_cpus=1", "cma=0"], ["numa=off", "nokaslr"]),
    ],
)
def test_per_architecture(arch: str, present: list[str], absent: list[str]) -> None:
    args = capture_cmdline(DEBIAN, arch).split()
    for arg in present:
        assert arg in args
    for arg in absent:
        assert not any(a == arg or a.startswith(arg + "=") for a in args)


def test_remove_by_key_value_and_pattern() -> None:
    current = "console=tty0 console=ttyS0 loglevel=7 foo.a=1 foo.b=2 bar=1"
    out = capture_cmdline(current, "x86_64", remove=["console=tty0", "loglevel", "foo.*"])
    assert out.split()[:2] == ["console=ttyS0", "bar=1"]
    assert "loglevel" not in out and "foo." not in out and "tty0" not in out


def test_remove_applies_to_the_defaults_too() -> None:
    out = capture_cmdline("", "x86_64", remove=["nokaslr", "mce", "panic=10"])
    assert "nokaslr" not in out.split() and "mce=" not in out and "panic=" not in out
    assert "numa=off" in out.split()


def test_append_comes_last_and_wins() -> None:
    out = capture_cmdline(
        "loglevel=3", "x86_64", append=["nr_cpus=2 root=/dev/vda1", 'x="1 2"', "loglevel=7"]
    )
    args = split_cmdline(out)
    assert args[-4:] == ["nr_cpus=2", "root=/dev/vda1", 'x="1 2"', "loglevel=7"]
    assert [a for a in args if a.startswith(("nr_cpus", "loglevel"))] == ["nr_cpus=2", "loglevel=7"]


def test_append_refuses_init_arguments() -> None:
    with pytest.raises(KdumpError, match="'--'"):
        capture_cmdline("", "x86_64", append=["-- single"])


def test_duplicates_later_wins_once() -> None:
    current = "loglevel=3 foo loglevel=7 foo transparent_hugepage=always numa=fake=4"
    args = capture_cmdline(current, "x86_64").split()
    assert args.count("foo") == 1
    assert [a for a in args if a.startswith("loglevel")] == ["loglevel=7"]
    assert [a for a in args if a.startswith("transparent_hugepage")] == [
        "transparent_hugepage=never"
    ]
    assert [a for a in args if a.startswith("numa")] == ["numa=off"]


def test_multi_valued_keys_keep_each_value_last_place() -> None:
    out = capture_cmdline("console=tty0 console=ttyS0 console=tty0", "x86_64")
    # The last console= is /dev/console: ttyS0 then tty0, as the kernel would have seen it.
    assert out.split()[:2] == ["console=ttyS0", "console=tty0"]


def test_dash_and_underscore_are_the_same() -> None:
    out = capture_cmdline(
        "panic-on-warn=1 kvm_intel.nested=1 transparent-hugepage=always", "x86_64"
    )
    assert "panic" not in out.replace("panic=10", "")
    assert "kvm" not in out
    assert "transparent-hugepage" not in out


def test_unterminated_quote_is_closed() -> None:
    out = capture_cmdline('foo="a b', "riscv64")
    assert split_cmdline(out)[0] == 'foo="a b"'
    assert "irqpoll" in split_cmdline(out)


def test_parse_arg_forms() -> None:
    assert parse_arg('foo="a b"').value == "a b"
    assert parse_arg('"foo=a b"').key == "foo"
    assert parse_arg('"foo=a b"').value == "a b"
    assert parse_arg("quiet").value is None
    assert parse_arg("initramfs_options=size=90%").value == "size=90%"
    assert parse_arg("kvm-intel.nested=1").key == "kvm_intel.nested"


@pytest.mark.parametrize("sample", [FEDORA, DEBIAN, QUOTED, FIRECRACKER, ""])
@pytest.mark.parametrize("arch", ARCHES)
def test_idempotent(sample: str, arch: str) -> None:
    append = ["nr_cpus=2", "loglevel=7", 'x="a b"']
    remove = ["nokaslr", "console=tty0"]
    once = capture_cmdline(sample, arch, append, remove)
    assert capture_cmdline(once, arch, append, remove) == once


_VALUES = st.one_of(
    st.none(), st.sampled_from(["0", "1", "off", "a b", "ttyS0", "size=90%", "x,y"])
)
_KEYS = st.sampled_from(
    [
        "console",
        "loglevel",
        "quiet",
        "root",
        "panic",
        "nr_cpus",
        "rd.lvm.lv",
        "foo",
        "numa",
        "systemd.unit",
        "cma",
        "irqpoll",
        "crashkernel",
        "transparent_hugepage",
        "bar-baz",
    ]
)


def _render(key: str, value: str | None) -> str:
    if value is None:
        return key
    return f'{key}="{value}"' if " " in value else f"{key}={value}"


@given(st.lists(st.tuples(_KEYS, _VALUES), max_size=12), st.sampled_from(ARCHES))
def test_property_idempotent_and_unique(args: list[tuple[str, str | None]], arch: str) -> None:
    current = " ".join(_render(key, value) for key, value in args)
    once = capture_cmdline(current, arch, append=["loglevel=7"], remove=["foo"])
    assert capture_cmdline(once, arch, append=["loglevel=7"], remove=["foo"]) == once
    parsed = [parse_arg(token) for token in split_cmdline(once)]
    identities = [arg.identity for arg in parsed]
    assert len(identities) == len(set(identities))
    single = [arg.key for arg in parsed if arg.key not in MULTI_VALUED]
    assert len(single) == len(set(single))


def test_every_argument_has_a_reason() -> None:
    for arch in ARCHES:
        for arg in kdump_args(arch):
            assert REASONS[arg]
    for key in DROPPED:
        assert REASONS[key]
    assert set(COMMON_ADDED) <= set(REASONS)
    assert all(set(added) <= set(REASONS) for added in ARCH_ADDED.values())


def test_normalise_arch() -> None:
    assert normalise_arch("amd64") == "x86_64"
    assert normalise_arch("ARM64") == "aarch64"
    assert normalise_arch("ppc64el") == "ppc64le"
    assert normalise_arch("i686") == "i386"


def test_boot_cpu_apicid() -> None:
    cpuinfo = (
        "processor\t: 0\nvendor_id\t: GenuineIntel\napicid\t\t: 4\ninitial apicid\t: 4\n\n"
        "processor\t: 1\ninitial apicid\t: 6\n"
    )
    assert boot_cpu_apicid(cpuinfo) == 4
    assert boot_cpu_apicid("processor\t: 0\nCPU implementer\t: 0x41\n") is None
