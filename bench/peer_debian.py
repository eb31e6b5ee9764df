"""Ours next to Debian's kdump-tools on the same Debian 12 guest and the same crash.

Each tool's state is prepared once, on a qcow2 overlay of the kdump-tools guest image:
kdump-tools boots once, makes its initramfs-tools capture initrd in the guest and arms (its
debconf default, dumps to /var/crash); ours goes on an overlay of that (the admin switches as
our `register` tells: kdump-tools disabled, our .deb installed, a disk target on the root LV).
Both are powered off cleanly and never written again.

Every probe then boots a fresh overlay of a prepared disk with `crashkernel=XM` on the direct
kernel boot's command line, lets the tool arm at boot, crashes it with sysrq from the serial
root shell and counts a success only when the tool's "saved" line came and the rebooted system
finds a complete dump. So every probe starts from the same disk and no earlier dump disturbs
it. Each wait is bounded: a capture kernel that panics, runs out of memory or hangs ends the
probe as a failure and QEMU is killed.

The probe at the fixed crashkernel= the guest test uses (192M) gives the figures: capture
image size, seconds from the panic to the tool's "saved" line, and to the login prompt of the
rebooted system. The smallest crashkernel= that still saves the dump is bisected in 8M steps
between 64M and 192M with harness.bisect; every probe is in the results.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.qemutest.debian_guest import CRASHKERNEL, build_deb
from kdump_mkinitrd.qemutest.debian_guest_image import GuestImage
from tests.peer_kdump_guest import (
    DISABLE_KDUMP_TOOLS,
    OUR_CONFIG,
    OUR_IMAGE,
    OUR_SAVED,
    THEIR_IMAGE,
    THEIR_SAVED,
    Guest,
    boot,
    install_ours,
    kdump_tools_image,
)

RESULT_KEYS = ("peer_debian_kdump_tools", "ours_in_debian_guest")
KEYS = ("capture_image_bytes", "crashkernel_mb", "smallest_crashkernel_mb",
        "panic_to_dump_saved_s", "panic_to_login_s", "dump_saved")  # fmt: skip
HIGH_MB = int(CRASHKERNEL.rstrip("M"))  # known to work for both: checked first
LOW_MB = 64
STEP_MB = 8
BUDGET = 7  # probes per tool; 64..192 in 8M steps needs 6
CAPTURE_START_TIMEOUT = 90  # from the sysrq to the capture kernel's banner
CAPTURE_TIMEOUT = 240  # from that banner to the "saved" line (kdump-tools took 65 s at 192M)
LOGIN_TIMEOUT = 300  # from the "saved" line to the rebooted system's login
# After the capture kernel's banner: the end of a capture that saved nothing.
CAPTURE_FAILED = (r"Kernel panic - not syncing|\(automatic login\)|reboot: Restarting system"
                  r"|reboot: Power down|System halted")  # fmt: skip
OOM = re.compile(r"invoked oom-killer|Out of memory")
DEADLINE_ENV = "BENCH_PEER_DEADLINE"  # epoch seconds: no probe starts after it
NO_VERDICT = "harness_error"  # the harness lost the guest's shell: says nothing of the tool


@dataclass(frozen=True)
class Tool:
    key: str  # the results.json key
    name: str
    service: str
    saved: str  # the capture's own "dump saved" line on the serial console
    on_disk: Callable[[Guest], tuple[bool, str]]  # a complete dump, in the rebooted system


def _theirs_on_disk(guest: Guest) -> tuple[bool, str]:
    # kdump-config renames dump-incomplete to dump.STAMP (vmcore.STAMP when it fell back to
    # cp) once the copy is whole.
    code, said = guest.run("ls /var/crash/2*/")
    return code == 0 and re.search(r"^(dump|vmcore)\.\d+$", said, re.M) is not None, said


def _ours_on_disk(guest: Guest) -> tuple[bool, str]:
    said = guest.run("kdump-mkinitrd list-dumps --json /var/crash")[1]
    try:
        dumps = json.loads(said)
    except ValueError:
        dumps = []
    return any(d.get("state") == "complete" for d in dumps), said


THEIRS = Tool("peer_debian_kdump_tools", "kdump-tools (Debian 12)", "kdump-tools", THEIR_SAVED,
              _theirs_on_disk)  # fmt: skip
OURS = Tool("ours_in_debian_guest", "kdump-mkinitrd (our .deb)", "kdump-mkinitrd", OUR_SAVED,
            _ours_on_disk)  # fmt: skip


def overlay(backing: Path, path: Path) -> Path:
    path.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing.resolve()),
                    "-F", "qcow2", str(path)], check=True)  # fmt: skip
    return path


def _size(guest: Guest, path: str) -> int | None:
    code, said = guest.run(f"stat -L -c %s {path}")
    return int(said.split()[0]) if code == 0 else None


def _loaded(guest: Guest) -> bool:
    return guest.run("cat /sys/kernel/kexec_crash_loaded")[1].strip() == "1"


def _power_off(guest: Guest) -> None:
    """A clean shutdown, so the prepared disk is whole when QEMU exits."""
    guest.console.type("systemctl poweroff\n")
    guest.console.close(300)


def prepare(image: GuestImage, deb: Path, work: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The two prepared disks and what was learnt while making them."""
    theirs_disk = overlay(image.disk, work / "prepared-kdump-tools.qcow2")
    guest = boot(image, work / "prepare-kdump-tools", disk=theirs_disk)
    try:
        theirs = {"tool": THEIRS.name, "capture_image_bytes": _size(guest, THEIR_IMAGE)}
        assert _loaded(guest), "kdump-tools did not arm at its first boot"
    finally:
        _power_off(guest)
    ours_disk = overlay(theirs_disk, work / "prepared-ours.qcow2")
    guest = boot(image, work / "prepare-ours", disk=ours_disk)
    try:
        code, said = guest.run(DISABLE_KDUMP_TOOLS)
        assert code == 0, said
        code, said = install_ours(guest, deb)
        assert code == 0, said
        guest.run(f"printf '%s' {shlex.quote(OUR_CONFIG)} >> /etc/kdump-mkinitrd.yaml")
        # Rebuilt now for the config, so that no probe's boot rebuilds it.
        code, said = guest.run("systemctl restart kdump-mkinitrd", 1200)
        assert code == 0, said
        ours = {"tool": OURS.name, "capture_image_bytes": _size(guest, OUR_IMAGE)}
    finally:
        _power_off(guest)
    return {THEIRS.key: (theirs_disk, theirs), OURS.key: (ours_disk, ours)}


def probe(tool: Tool, image: GuestImage, prepared: Path, work: Path, mb: int) -> dict[str, Any]:
    """One boot at crashkernel=`mb`M, one crash: the outcome (saved, load_failed,
    capture_failed, timeout, not_on_disk, boot_failed) and the seconds it took."""
    folder = work / tool.service / f"{mb}M"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    disk = overlay(prepared, folder / "disk.qcow2")
    started = time.monotonic()
    record: dict[str, Any] = {"crashkernel_mb": mb}
    try:
        guest = boot(image, folder, f"{mb}M", disk=disk)
    except KdumpError as exc:  # boot() killed QEMU
        record.update(outcome="boot_failed", detail=str(exc)[-300:])
    else:
        try:
            record.update(_crash(tool, guest))
        except KdumpError as exc:
            record.update(outcome=NO_VERDICT, detail=str(exc)[-300:])
        finally:
            guest.console.close(0)  # kills QEMU: the overlay is thrown away
    disk.unlink(missing_ok=True)
    record["seconds"] = round(time.monotonic() - started, 1)
    return record


def _crash(tool: Tool, guest: Guest) -> dict[str, Any]:
    if not _loaded(guest):
        # The tool's own words: systemd's lines about the unit say only that it failed.
        journal = f"journalctl -b -u {tool.service} --no-pager -o cat | grep -v '[.]service'"
        said = guest.run(f"{journal} | tail -n 4")[1]
        return {"outcome": "load_failed", "detail": said.strip()[-400:]}
    console = guest.console
    mark = console.mark()
    panicked = time.monotonic()
    console.type("echo c > /proc/sysrq-trigger\n")
    out: dict[str, Any] = {}
    try:
        banner, _ = console.wait_for(r"Linux version", mark, CAPTURE_START_TIMEOUT)
        n, found = console.wait_for(rf"({tool.saved})|{CAPTURE_FAILED}", banner, CAPTURE_TIMEOUT)
    except KdumpError as exc:
        gone = console.proc.poll() is not None
        out = {"outcome": "capture_failed" if gone else "timeout",
               "detail": str(exc).splitlines()[0][:200]}  # fmt: skip
        n = len(console.lines)
    else:
        if found.group(1) is None:
            out = {"outcome": "capture_failed", "detail": console.lines[n][1].strip()[:200]}
        else:
            out["panic_to_dump_saved_s"] = round(console.lines[n][0] - panicked, 1)
    capture = [line for _, line in console.lines[mark : n + 1]]
    out["oom"] = any(OOM.search(line) for line in capture)
    if out.get("outcome"):
        return out
    try:
        login = guest.shell.logged_in(n, LOGIN_TIMEOUT)
    except KdumpError as exc:
        return {**out, "outcome": "timeout", "detail": f"no login after the dump: {exc}"[:200]}
    out["panic_to_login_s"] = round(console.lines[login][0] - panicked, 1)
    complete, said = tool.on_disk(guest)
    out["outcome"] = "saved" if complete else "not_on_disk"
    out["detail"] = said.strip()[-300:]
    return out


def smallest(probes: list[dict[str, Any]]) -> dict[str, Any]:
    """The smallest crashkernel= that saved, the largest below it that did not, and whether
    they are one step apart (the bisection ended) or the search was cut short."""
    saved = [p["crashkernel_mb"] for p in probes if p["outcome"] == "saved"]
    best = min(saved, default=None)
    failed = [p["crashkernel_mb"] for p in probes if p["outcome"] not in ("saved", NO_VERDICT)]
    failing = max((mb for mb in failed if best is None or mb < best), default=None)
    done = best is not None and failing is not None and best - failing <= STEP_MB
    return {"smallest_crashkernel_mb": best, "largest_failing_crashkernel_mb": failing,
            "bisection_complete": done}  # fmt: skip


def _deadline() -> float | None:
    value = os.environ.get(DEADLINE_ENV)
    return float(value) if value else None


def part_peer_debian(
    work: Path, progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    image = kdump_tools_image(log=work / "image-build.log")
    deb = build_deb(work / "deb")
    prepared = prepare(image, deb, work)
    out = {key: figures for key, (_, figures) in prepared.items()}
    tools = (THEIRS, OURS)
    for index, tool in enumerate(tools):
        disk, figures = prepared[tool.key]
        # Each tool gets an equal share of the time left; what one leaves goes to the next.
        deadline = _deadline()
        if deadline is not None:
            deadline = time.time() + (deadline - time.time()) / (len(tools) - index)
        probes: list[dict[str, Any]] = []
        figures.update(
            crashkernel_mb=HIGH_MB,
            probes=probes,
            smallest_crashkernel_note=(
                f"bisected in {STEP_MB}M steps between {LOW_MB}M and {HIGH_MB}M; every probe "
                "boots a fresh overlay of the prepared disk, arms at boot and crashes once"
            ),
        )

        def run(mb: int, tool: Tool = tool, disk: Path = disk,
                probes: list[dict[str, Any]] = probes, figures: dict[str, Any] = figures,
                deadline: float | None = deadline) -> harness.Probe:  # fmt: skip
            if deadline is not None and time.time() > deadline:
                raise RuntimeError(f"{DEADLINE_ENV} passed")
            record = probe(tool, image, disk, work, mb)
            probes.append(record)
            if record["outcome"] == NO_VERDICT:
                raise RuntimeError(f"probe at {mb}M: {record['detail']}")
            figures.update(smallest(probes))
            if mb == HIGH_MB:
                figures.update(
                    armed_at_boot=record["outcome"] != "load_failed",
                    dump_saved=record["outcome"] == "saved",
                    panic_to_dump_saved_s=record.get("panic_to_dump_saved_s"),
                    panic_to_login_s=record.get("panic_to_login_s"),
                )
            print(f"  peer {tool.service} {mb}M: {record['outcome']} ({record['seconds']:.0f}s)"
                  f" {record.get('detail', '')[:120]!r}", flush=True)  # fmt: skip
            if progress:
                progress(out)
            return harness.Probe(mb, record["outcome"] == "saved", record["seconds"],
                                 f"{record['outcome']}: {record.get('detail', '')}")  # fmt: skip

        search = harness.bisect(run, LOW_MB, HIGH_MB, step=STEP_MB, budget=BUDGET)
        if search.error:
            figures["bisection_error"] = search.error
    return out


def _probe_list(figures: dict[str, Any]) -> str:
    return ", ".join(f"{p['crashkernel_mb']}M {p['outcome']} ({p['seconds']:.0f} s)"
                     for p in figures.get("probes") or [])  # fmt: skip


def markdown(results: dict[str, Any]) -> list[str]:
    theirs = results.get("peer_debian_kdump_tools")
    ours = results.get("ours_in_debian_guest")
    if not theirs and not ours:
        return []
    lines = ["", "## Debian's kdump-tools side by side (Debian 12 guest, same crash)", ""]
    theirs, ours = theirs or {}, ours or {}
    errors = [f"error: {f['error']}" for f in (theirs, ours) if f.get("error")]
    if not any(key in f for f in (theirs, ours) for key in KEYS):
        return [*lines, *(errors[:1] or ["no figures"])]

    def cell(figures: dict[str, Any], key: str) -> str:
        value = figures.get(key)
        if value is None:
            return "-"
        if key == "capture_image_bytes":
            return f"{value / 1e6:.2f} MB"
        if key == "smallest_crashkernel_mb" and not figures.get("bisection_complete"):
            return f"{value} (search cut short)"
        return f"{value} s" if key.endswith("_s") else str(value)

    lines += ["| figure | kdump-tools | ours |", "| --- | --- | --- |"]
    lines += [f"| {key} | {cell(theirs, key)} | {cell(ours, key)} |" for key in KEYS]
    lines += ["", ours.get("smallest_crashkernel_note", "")]
    for name, figures in (("kdump-tools", theirs), ("ours", ours)):
        if figures.get("probes"):
            lines += ["", f"Probes, {name}: {_probe_list(figures)}."]
        if figures.get("bisection_error"):
            lines += ["", f"{name}'s search stopped: {figures['bisection_error']}"]
    return [*lines, *(["", *errors[:1]] if errors else [])]
