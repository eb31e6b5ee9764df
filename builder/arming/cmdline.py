"""The capture kernel's command line, derived from the running kernel's.

The capture kernel boots inside the small crashkernel= reservation, on one CPU, with the
first kernel's devices still running. So the first kernel's command line is taken
(``/proc/cmdline``), stripped of what only makes sense for the first boot or costs memory,
and extended with the settings every kdump implementation passes. :data:`REASONS` says why
for every argument added or removed; the README quotes it.

Parsing follows the kernel's own ``next_arg()``: arguments are separated by white space, a
double quote protects spaces (``foo="a b"`` or ``"foo=a b"``), and ``-`` and ``_`` are the
same character in a parameter name (``panic-on-warn`` is ``panic_on_warn``). A bare ``--``
ends the kernel's arguments; what follows goes to the first system's init and is dropped.

Order of work: drop from the current line (:data:`DROPPED`, then the caller's ``remove``),
add the kdump set (:func:`kdump_args`, also filtered by ``remove`` so one can opt out of a
default), add the caller's ``append``; a later occurrence of a key replaces an earlier one,
so each key appears once (keys in :data:`MULTI_VALUED`, like ``console=``, keep one copy of
each distinct value instead). Feeding the result back in gives the same result.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from kdump_mkinitrd.errors import KdumpError

# Removed from the current command line: key (or key pattern) → why. A pattern ending in
# ".*" matches a whole namespace. Keys are compared with "-" read as "_", like the kernel.
DROPPED: dict[str, str] = {
    "crashkernel": "reserves memory for a capture kernel; the capture kernel itself must not.",
    "elfcorehdr": "the kernel adds its own elfcorehdr= (where the old memory's ELF header is) "
    "when it loads a crash kernel; a stale one would point at the wrong place.",
    "root": "the capture image is self-contained and mounts its dump targets itself; "
    "root= would make the kernel wait for or mount the first system's root.",
    "rootflags": "belongs to root=, which is dropped.",
    "rootfstype": "belongs to root=, which is dropped.",
    "rootwait": "belongs to root=, which is dropped.",
    "rootdelay": "belongs to root=, which is dropped.",
    "nfsroot": "belongs to root=, which is dropped.",
    "ro": "mount flag for the first system's root, which the capture kernel does not mount.",
    "rw": "mount flag for the first system's root, which the capture kernel does not mount.",
    "init": "the first system's init; the capture image runs its own /init.",
    "rdinit": "would make the kernel run another program than the capture image's /init.",
    "initrd": "the boot loader's initrd path; kexec hands the capture image over directly.",
    "noinitrd": "would make the capture kernel ignore the capture image.",
    "BOOT_IMAGE": "set by the boot loader for the first kernel; it means nothing to the second.",
    "resume": "the capture kernel must never resume a hibernation image over the memory "
    "it is about to save.",
    "resume_offset": "belongs to resume=, which is dropped.",
    "rd.*": "dracut's root and device assembly (rd.lvm.lv, rd.luks.uuid, rd.break...); "
    "the capture image is not a dracut image and sets up its targets itself.",
    "netroot": "dracut's network root; the capture image mounts its targets itself.",
    "iscsi_initiator": "dracut's iSCSI root; the capture image mounts its targets itself.",
    "fcoe": "dracut's FCoE root; the capture image mounts its targets itself.",
    "systemd.*": "options for the first system's systemd (units, cgroups, logging); the "
    "capture image's init is not systemd.",
    "ignition.*": "Fedora CoreOS first-boot provisioning; it must not run in a crash.",
    "single": "a run level for the first system's init, which the capture image does not run.",
    "emergency": "a run level for the first system's init, which the capture image does not run.",
    "rescue": "a run level for the first system's init, which the capture image does not run.",
    "S": "a run level for the first system's init, which the capture image does not run.",
    "1": "a run level for the first system's init, which the capture image does not run.",
    "2": "a run level for the first system's init, which the capture image does not run.",
    "3": "a run level for the first system's init, which the capture image does not run.",
    "4": "a run level for the first system's init, which the capture image does not run.",
    "5": "a run level for the first system's init, which the capture image does not run.",
    "quiet": "the capture kernel's console output is often the only record of why a dump "
    "failed; keep it.",
    "splash": "boot splash of the first system; there is no splash in the capture image.",
    "rhgb": "Red Hat graphical boot; there is no splash in the capture image.",
    "plymouth.*": "boot splash of the first system; there is no splash in the capture image.",
    "panic_on_warn": "a warning in the capture kernel (common with half-reset hardware) "
    "must not end the dump.",
    "panic": "replaced by panic=10.",
    "hugepages": "reserves huge pages, which a 100 MB capture kernel cannot afford.",
    "hugepagesz": "belongs to hugepages=, which is dropped.",
    "default_hugepagesz": "belongs to hugepages=, which is dropped.",
    "hugetlb_cma": "replaced by hugetlb_cma=0.",
    "cma": "replaced by cma=0.",
    "kvm_cma_resv_ratio": "powerpc KVM's CMA reservation; replaced by kvm_cma_resv_ratio=0 there.",
    "swiotlb": "sizes the bounce buffer (64 MB by default on some machines); the "
    "first kernel's size does not fit the reservation.",
    "log_buf_len": "a large log buffer is memory the capture kernel does not have.",
    "slub_debug": "debug slab metadata costs memory the capture kernel does not have.",
    "slab_debug": "debug slab metadata costs memory the capture kernel does not have.",
    "nr_cpus": "replaced by nr_cpus=1.",
    "maxcpus": "the capture kernel brings up one CPU (nr_cpus=1).",
    "possible_cpus": "the capture kernel brings up one CPU (nr_cpus=1).",
    "isolcpus": "CPU isolation for the first system's CPUs; with one CPU it could leave "
    "no CPU for housekeeping.",
    "nohz_full": "CPU isolation for the first system's CPUs; with one CPU it could leave "
    "no CPU for housekeeping.",
    "rcu_nocbs": "CPU isolation for the first system's CPUs; meaningless with one CPU.",
    "irqaffinity": "IRQ placement for the first system's CPUs; meaningless with one CPU.",
    "mem": "limits the first kernel's memory; the capture kernel's memory is the reservation.",
    "memmap": "describes the first kernel's memory map; kexec gives the capture kernel its own.",
    "kvm.*": "tuning for running virtual machines, which the capture kernel does not do.",
    "kvm_intel.*": "tuning for running virtual machines, which the capture kernel does not do.",
    "kvm_amd.*": "tuning for running virtual machines, which the capture kernel does not do.",
    "fadump": "powerpc firmware-assisted dump is the first kernel's alternative to kdump; "
    "the capture kernel must not reserve memory for it.",
    "fadump_reserve_mem": "belongs to fadump=, which is dropped.",
    "vmcp_cma": "s390 z/VM CP command buffer (CMA); replaced by vmcp_cma=0 there.",
    "prot_virt": "s390 protected virtualisation host support reserves memory; the capture "
    "kernel runs no guests.",
    "zfcp.allow_lun_scan": "s390 zfcp LUN scanning would attach every LUN, costing time "
    "and memory; the capture image attaches what it needs.",
}

# Added for every architecture (unless listed in NOT_ON): argument → why.
COMMON_ADDED: dict[str, str] = {
    "irqpoll": "the first kernel's devices may still raise interrupts on lines the capture "
    "kernel has not set up; polling keeps shared lines working instead of disabling them.",
    "nr_cpus=1": "one CPU is enough to copy memory, and every further CPU costs per-CPU "
    "memory in the small reservation.",
    "reset_devices": "asks drivers to reset their hardware, which the crashed kernel left "
    "running mid-transfer.",
    "cgroup_disable=memory": "memory cgroup bookkeeping costs memory the reservation does "
    "not have.",
    "transparent_hugepage=never": "huge pages waste memory in a 100 MB kernel.",
    "novmcoredd": "device dumps appended to /proc/vmcore have no size limit and can use up "
    "the reservation.",
    "panic=10": "if the capture kernel itself panics, reboot after 10 s instead of hanging.",
    "hugetlb_cma=0": "no CMA area for huge pages in a 100 MB kernel.",
    "kfence.sample_interval=0": "KFENCE's pool and sampling are debugging the capture "
    "kernel does not need and memory it does not have.",
    "cma=0": "no contiguous memory area: it would be carved out of the reservation.",
    "initramfs_options=size=90%": "Linux 6.18+ lets the tmpfs the image is unpacked into "
    "use 90% of memory instead of 50%, so a smaller reservation suffices (older kernels "
    "ignore it).",
}

# Added on one architecture: architecture → {argument → why}.
ARCH_ADDED: dict[str, dict[str, str]] = {
    "x86_64": {
        "numa=off": "one node is enough, and NUMA set-up costs memory.",
        "acpi_no_memhotplug": "ACPI memory hot-plug would try to online the first kernel's memory.",
        "hest_disable": "ACPI HEST tables can be large (tens of MB) when parsed; error "
        "reporting is not needed to copy memory.",
        "nokaslr": "address randomisation gains nothing in a short-lived capture kernel and "
        "makes debugging it harder.",
        "pcie_ports=compat": "native PCIe port services (PME, AER, hot-plug, DPC) use up the "
        "one CPU's interrupt vectors on large machines and hang the capture kernel.",
        "mce=off": "a machine check from a half-reset device would abort the dump; the first "
        "kernel already reported the hardware's state.",
    },
    "aarch64": {
        "numa=off": "one node is enough, and NUMA set-up costs memory.",
        "swiotlb=noforce": "arm64 sets up a 64 MB bounce buffer at boot whenever memory lies "
        "beyond its DMA zone (as a crashkernel=...,high reservation does); 64 MB would not fit "
        "the reservation (kdump-utils passes the same on arm64).",
    },
    "ppc64le": {
        "numa=off": "one node is enough, and NUMA set-up costs memory.",
        "noirqdistrib": "keeps interrupts on the boot CPU, the only one running.",
        "ehea.use_mcs=0": "the eHEA network driver's multi-queue mode needs more CPUs and "
        "memory than the capture kernel has.",
        "kvm_cma_resv_ratio=0": "no CMA reservation for KVM guests.",
    },
    "s390x": {
        "numa=off": "one node is enough, and NUMA set-up costs memory.",
        "vmcp_cma=0": "no CMA area for z/VM CP command output.",
    },
}
ARCH_ADDED["ppc64"] = ARCH_ADDED["ppc64le"]

# Common arguments an architecture does without, as the distributions do: architecture →
# {argument → why not there}.
NOT_ON: dict[str, dict[str, str]] = {
    "s390x": {
        "irqpoll": "s390 has no interrupt lines to poll.",
        "reset_devices": "s390's channel subsystem resets devices itself.",
    },
    "aarch64": {
        "irqpoll": "arm64 interrupts come through the GIC, one line or message per device, so "
        "there are rarely shared lines to rescue by polling, and the polling has hung capture "
        "kernels: on AWS Graviton the capture kernel stalls with it (Fedora CoreOS issue "
        "#1187; kdump-utils leaves it out there), and Debian's kdump-tools passes only "
        "reset_devices nr_cpus=1 on arm64.",
    },
}

# Not added by capture_cmdline() (it needs the running machine's /proc/cpuinfo); callers
# on x86_64 append it with boot_cpu_apicid().
OPTIONAL_ADDED: dict[str, str] = {
    "disable_cpu_apicid": "x86: the capture kernel must not send INIT to the first kernel's "
    "boot CPU, which may reset the whole machine on some platforms.",
}

# Every argument we add or remove and why: what the README quotes.
REASONS: dict[str, str] = {
    **DROPPED,
    **COMMON_ADDED,
    **{arg: why for added in ARCH_ADDED.values() for arg, why in added.items()},
    **{f"{arch}: no {arg}": why for arch, left in NOT_ON.items() for arg, why in left.items()},
    **OPTIONAL_ADDED,
}

# Keys the kernel accepts several times with different values; each distinct value is kept
# (the last console= is /dev/console, so order matters and the last copy's place wins).
MULTI_VALUED = frozenset(
    {"console", "video", "acpi_osi", "modprobe.blacklist", "memmap", "ip", "nameserver"}
)

_ARCH_ALIASES = {
    "amd64": "x86_64",
    "x86-64": "x86_64",
    "arm64": "aarch64",
    "ppc64el": "ppc64le",
    "powerpc64le": "ppc64le",
    "powerpc64": "ppc64",
    "i486": "i386",
    "i586": "i386",
    "i686": "i386",
}


def normalise_arch(machine: str) -> str:
    """`uname -m` or a Debian architecture name → the kernel's name (``arm64`` → ``aarch64``)."""
    machine = machine.strip().lower()
    return _ARCH_ALIASES.get(machine, machine)


@dataclass(frozen=True)
class Arg:
    """One command-line argument: its text as written, its normalised key and its value."""

    text: str
    key: str
    value: str | None

    @property
    def identity(self) -> tuple[str, str | None]:
        """What makes two arguments the same one: the key, plus the value for multi-valued keys."""
        return (self.key, self.value if self.key in MULTI_VALUED else None)


def normalise_key(key: str) -> str:
    """The kernel compares parameter names with '-' and '_' as the same character."""
    return key.replace("-", "_")


def split_cmdline(text: str) -> list[str]:
    """Split like the kernel's next_arg(): white space separates, double quotes protect it.

    An unterminated quote is closed at the end of its argument: the kernel would have read
    the rest of the line as one value, and re-emitted unclosed it would swallow every
    argument we add after it.
    """
    args: list[str] = []
    current: list[str] = []
    in_quote = False
    for char in text:
        if char == '"':
            in_quote = not in_quote
        elif char.isspace() and not in_quote:
            if current:
                args.append("".join(current))
                current = []
            continue
        current.append(char)
    if current:
        if in_quote:
            current.append('"')
        args.append("".join(current))
    return args


def parse_arg(text: str) -> Arg:
    """``foo="a b"`` → Arg(key="foo", value="a b"); a flag has value None."""
    bare = text[1:] if text.startswith('"') else text
    key, sep, value = bare.partition("=")
    if not sep:
        return Arg(text, normalise_key(key.rstrip('"')), None)
    if value.startswith('"'):
        value = value[1:]
    if value.endswith('"'):
        value = value[:-1]
    return Arg(text, normalise_key(key), value)


def _parse(text: str, *, what: str) -> list[Arg]:
    """Parse command-line text; a bare ``--`` (arguments for init) is refused."""
    args = [parse_arg(token) for token in split_cmdline(text)]
    if any(arg.text == "--" for arg in args):
        raise KdumpError(f"{what}: '--' (arguments for init) is not supported in {text!r}")
    return args


def _kernel_args(current: str) -> list[Arg]:
    """The current command line's kernel arguments: everything before a bare ``--``."""
    tokens = split_cmdline(current)
    if "--" in tokens:
        tokens = tokens[: tokens.index("--")]
    return [parse_arg(token) for token in tokens]


@dataclass(frozen=True)
class _Matcher:
    """One removal rule: a key, a key=value, or a key pattern (``rd.*``)."""

    key: str
    value: str | None

    @classmethod
    def parse(cls, rule: str) -> _Matcher:
        arg = parse_arg(rule)
        return cls(arg.key, arg.value)

    def matches(self, arg: Arg) -> bool:
        if self.value is not None and arg.value != self.value:
            return False
        if any(char in self.key for char in "*?["):
            return fnmatchcase(arg.key, self.key)
        return arg.key == self.key


_BUILTIN_MATCHERS = tuple(_Matcher.parse(rule) for rule in DROPPED)


def kdump_args(arch: str) -> list[str]:
    """The arguments every capture kernel on *arch* gets, before the caller's append."""
    arch = normalise_arch(arch)
    skipped = NOT_ON.get(arch, {})
    common = [arg for arg in COMMON_ADDED if arg not in skipped]
    return common + list(ARCH_ADDED.get(arch, {}))


def standing(word: str, arch: str) -> tuple[str, str] | None:
    """Where one argument stands in the capture command line we make on *arch* before any
    config: ("added", why) when it is one of the kdump arguments, ("removed", why) when the
    first kernel's copy of it is dropped; None when neither (`import-config` asks)."""
    arg = parse_arg(word)
    arch = normalise_arch(arch)
    added = {parse_arg(text).identity: text for text in kdump_args(arch)}
    if added.get(arg.identity) == arg.text:
        text = added[arg.identity]
        return "added", COMMON_ADDED.get(text) or ARCH_ADDED[arch][text]
    for rule, why in DROPPED.items():
        if _Matcher.parse(rule).matches(arg):
            return "removed", why
    return None


def _user_matchers(remove: Sequence[str]) -> list[_Matcher]:
    return [_Matcher.parse(token) for rule in remove for token in split_cmdline(rule)]


def _dedupe(args: Iterable[Arg]) -> list[Arg]:
    """Keep the last occurrence of each argument, in the place of that last occurrence."""
    ordered = list(args)
    last = {arg.identity: index for index, arg in enumerate(ordered)}
    return [arg for index, arg in enumerate(ordered) if last[arg.identity] == index]


def capture_cmdline(
    current: str,
    arch: str,
    append: Sequence[str] = (),
    remove: Sequence[str] = (),
) -> str:
    """The capture kernel's command line from the running kernel's (``/proc/cmdline``).

    *remove* items are keys (drop every occurrence), ``key=value`` (drop that value only) or
    patterns (``rd.*``); they apply to the current line and to the kdump defaults. *append*
    items are command-line text (one item may hold several arguments; quote values with
    spaces); they come last and win over anything earlier with the same key.
    """
    user = _user_matchers(remove)
    dropping = [*_BUILTIN_MATCHERS, *user]
    kept = [arg for arg in _kernel_args(current) if not any(m.matches(arg) for m in dropping)]
    defaults = [
        arg
        for arg in (parse_arg(text) for text in kdump_args(arch))
        if not any(m.matches(arg) for m in user)
    ]
    extra = [arg for item in append for arg in _parse(item, what="append")]
    return " ".join(arg.text for arg in _dedupe([*kept, *defaults, *extra]))


_APICID = re.compile(r"^(processor|initial apicid)\s*:\s*(\d+)\s*$", re.MULTILINE)


def boot_cpu_apicid(cpuinfo: str) -> int | None:
    """x86: the initial APIC id of processor 0 in /proc/cpuinfo text, for disable_cpu_apicid=."""
    processor: int | None = None
    for field, number in _APICID.findall(cpuinfo):
        if field == "processor":
            processor = int(number)
        elif processor == 0:
            return int(number)
    return None
