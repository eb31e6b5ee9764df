"""`qemu-test --fault NAME`: crash a guest with something going wrong on purpose, and check
that what was designed to happen did (a fallback captured, failure_action ran, earlier dumps
stayed intact, an unfinished dump stayed marked incomplete).

Nothing here is in a real image by default: faults are made by the harness (disks, a killed
QEMU) or asked for on the capture kernel's command line, which only the harness sets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from builder.capture.testswitches import KILL_SWITCH, OOM_SWITCH
from builder.config import Config
from builder.dumps import list_dumps

EARLIER = "earlier-2026-01-01-00:00:00"


@dataclass(frozen=True)
class Fault:
    name: str
    outcome: str  # what must happen, for the report and the README's table
    append: str = ""  # capture kernel arguments
    crashes: int = 1
    read_back: bool = True
    kill_when: tuple[str, ...] = ()  # power cut: QEMU is killed when the serial log shows one
    cut_network: bool = False  # the NIC's link goes down once the server holds part of the dump
    targets: tuple[str, ...] = ("disk",)  # the qemu-test --target values it works with
    # What the capture log must show, by --target, or --target/client where the ssh clients
    # word it differently ("*": the same for all).
    logged: tuple[tuple[str, str], ...] = ()

    def phrase(self, target: str) -> str:
        said = dict(self.logged)
        return said.get(target, said.get(target.partition("/")[0], said.get("*", "")))


NETWORK_FAULT_OUTCOME = (
    ", logged; the next target takes the dump, else failure_action runs; nothing is written "
    "on the server"
)


FAULTS = {f.name: f for f in (
    Fault("no-target", "bounded wait for the device, a console line, failure_action; no dump",
          read_back=False),
    Fault("wrong-fs", "the mount fails with a console line, failure_action; no dump",
          read_back=False),
    Fault("disk-full", "the partial file stays named incomplete, the log says so, "
          "failure_action; the earlier dump on the disk is intact"),
    Fault("python-killed", "the Python stage is SIGKILLed mid-dump; the static fallback "
          "saves the dump", append=KILL_SWITCH),
    Fault("power-cut", "QEMU is killed while the dump is written: the earlier dump is intact, "
          "the cut one is incomplete and list-dumps says so", crashes=2,
          kill_when=("kdump: writing vmcore:", "kdump: collector:", "kdump: static capture:")),
    Fault("second-crash", "a second crash finds a dump in place: a new directory, the first "
          "dump untouched", crashes=2),
    Fault("oom", "the Python stage takes memory mid-dump until the kernel's OOM killer ends it "
          "(the init is exempt); the static fallback saves the dump", append=OOM_SWITCH),
    Fault("net-down", "the NIC has a link but nothing answers: DHCP gives up after "
          "network.timeout" + NETWORK_FAULT_OUTCOME, targets=("nfs", "ssh"),
          logged=(("*", "network: no DHCP lease"),)),
    Fault("server-down", "the server is not running: the mount or the ssh connection is "
          "refused" + NETWORK_FAULT_OUTCOME, targets=("nfs", "ssh"),
          logged=(("nfs", "nfs: mount failed"), ("ssh", "Connection refused"))),
    Fault("bad-hostkey", "the server's host key is not the pinned one: ssh refuses it"
          + NETWORK_FAULT_OUTCOME, targets=("ssh",),
          logged=(("ssh", "Host key verification failed"),
                  ("ssh/dropbear", "host key mismatch"))),
    Fault("key-refused", "the server does not take the image's key and offers passwords, "
          "which the image never answers from the dump stream: ssh is denied"
          + NETWORK_FAULT_OUTCOME, targets=("ssh",),
          logged=(("ssh", "Permission denied (publickey,password,keyboard-interactive)"),
                  ("ssh/dropbear", "Disconnect received"))),
    Fault("net-lost", "the network goes away while the dump streams (QEMU takes the NIC's "
          "link down): the stalled transfer is given up in bounded time (ssh keepalives, the "
          "NFS soft mount), logged; the next target takes the dump, else failure_action runs; "
          "nothing complete is left on the server", targets=("nfs", "ssh"), cut_network=True,
          logged=(("ssh", "Timeout, server"), ("ssh/dropbear", "Keepalive timeout"),
                  ("nfs", "no longer answers: giving it up"))),
)}  # fmt: skip


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(fault: Fault, config: Config, disks: list[Path], workdir: Path) -> dict[str, str]:
    """Change the first target's disk as the fault needs; returns facts the checks compare."""
    target, disk = config.targets[0], disks[0]
    device = target.device or ""
    if fault.name == "no-target":
        with disk.open("wb") as f:  # the same size, but nothing on it to find
            f.truncate(64 * 2**20)
    elif fault.name == "wrong-fs":
        flag = ["-m", f"uuid={device[5:]}"] if device.startswith("UUID=") else ["-L", device[6:]]
        other = (
            ["mkfs.xfs", "-q", "-f", *flag]
            if target.fstype != "xfs"
            else [
                "mkfs.ext4",
                "-q",
                "-F",
                *(["-U", device[5:]] if device.startswith("UUID=") else ["-L", device[6:]]),
            ]
        )
        subprocess.run([*other, str(disk)], check=True, capture_output=True)
    elif fault.name == "disk-full":
        # Small, with an earlier dump already on it (mkfs.ext4 -d copies a tree in).
        seed = workdir / "seed"
        earlier = seed / target.path.lstrip("/") / EARLIER
        earlier.mkdir(parents=True, exist_ok=True, mode=0o700)
        (earlier / "vmcore").write_bytes(os.urandom(2 * 2**20))
        (earlier / "vmcore.json").write_text(json.dumps({"sha256": _digest(earlier / "vmcore")}))
        with disk.open("wb") as f:
            f.truncate(40 * 2**20)
        flag = ["-U", device[5:]] if device.startswith("UUID=") else ["-L", device[6:]]
        subprocess.run(["mkfs.ext4", "-q", "-F", *flag, "-d", str(seed), str(disk)], check=True,
                       capture_output=True)  # fmt: skip
        return {"earlier_sha256": _digest(earlier / "vmcore")}
    return {}


def _dump_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("t0/*") if p.is_dir())


class Checks(Protocol):
    def check(self, name: str, passed: bool, detail: str = "") -> None: ...


def check(fault: Fault, logs: list[str], out: Path, facts: dict[str, str],
          report: Checks) -> None:  # fmt: skip
    """Add the fault's own checks to the report, in place of a normal dump's."""
    check_ = report.check
    log = logs[-1]
    failed = "kdump: running failure_action" in log
    if fault.targets != ("disk",):
        _check_network_fault(fault, log, out, facts, report)
        return
    if fault.name in ("no-target", "wrong-fs"):
        phrase = "not found after" if fault.name == "no-target" else "cannot mount"
        check_("failure_logged", phrase in log, f"no {phrase!r} line")
        check_("failure_action_ran", failed)
        check_("no_dump_saved", "kdump: dump saved to target" not in log)
        return
    dumps = _dump_dirs(out)
    if fault.name == "disk-full":
        earlier = [d for d in dumps if d.name == EARLIER]
        check_("earlier_dump_intact", bool(earlier) and
               _digest(earlier[0] / "vmcore") == facts["earlier_sha256"])  # fmt: skip
        new = [d for d in dumps if d.name != EARLIER]
        check_("new_dump_dir_made", len(new) == 1)
        names = {p.name for p in new[0].iterdir()} if new else set()
        check_("partial_marked_incomplete", "vmcore" not in names and
               any(n.endswith("incomplete") for n in names), str(sorted(names)))  # fmt: skip
        check_("failure_logged", "capture failed" in log or "stage failed" in log)
        check_("failure_action_ran", failed)
        return
    states = [d.state for d in list_dumps(out / "t0")] if (out / "t0").is_dir() else []
    if fault.name == "second-crash":
        check_("two_dump_dirs", states == ["complete", "complete"], str(states))
        check_("both_crashes_saved", all("kdump: dump saved to target" in entry for entry in logs))
    elif fault.name == "power-cut":
        check_("earlier_complete_cut_incomplete", states == ["complete", "incomplete"], str(states))
    elif fault.name in ("python-killed", "oom"):
        check_("stage_killed_logged", "exit status 137" in log)
        if fault.name == "oom":
            killed = re.search(r"Out of memory: Killed process \d+ \(python", log)
            check_("oom_killer_took_the_stage", killed is not None)
        check_("fallback_ran", "static fallback runs" in log)
        check_("fallback_saved_the_dump", states == ["complete"], str(states))


def _check_network_fault(
    fault: Fault, log: str, out: Path, facts: dict[str, str], report: Checks
) -> None:
    phrase = fault.phrase(facts["target"])
    report.check("failure_logged", phrase in log, f"no {phrase!r} line")
    report.check("network_target_gave_up", "target 0 could not take the dump" in log)
    saved = re.findall(r"kdump: dump saved to target (\d+)", log)
    if saved:
        later = out / f"t{saved[-1]}"
        states = [d.state for d in list_dumps(later)] if later.is_dir() else []
        report.check("next_target_saved_the_dump", states == ["complete"], str(states))
    else:
        report.check("failure_action_ran", "kdump: running failure_action" in log)
    written = sorted(p.name for p in Path(facts["server_dumps"]).rglob("vmcore*"))
    if fault.name == "net-lost":  # cut mid-stream: the kernel log and a partial file may stay
        report.check("no_complete_dump_on_the_server", "vmcore" not in written, str(written))
    else:
        report.check("nothing_written_on_the_server", not written, str(written))
