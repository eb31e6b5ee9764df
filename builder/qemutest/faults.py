"""`qemu-test --fault NAME`: crash a guest with something going wrong on purpose, and check
that what was designed to happen did (a fallback captured, failure_action ran, earlier dumps
stayed intact, an unfinished dump stayed marked incomplete).

Nothing here is in a real image by default: faults are made by the harness (disks, a killed
QEMU) or asked for on the capture kernel's command line, which only the harness sets.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kdump_mkinitrd.capture.filedigest import sha256_file
from kdump_mkinitrd.capture.testswitches import KILL_SWITCH, OOM_SWITCH
from kdump_mkinitrd.capture.vmcore_json import base_record
from kdump_mkinitrd.config import Config
from kdump_mkinitrd.dumps import rawrecovery as raw
from kdump_mkinitrd.dumps.listing import list_dumps
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan.elfdeps import ElfResolver
from kdump_mkinitrd.image.resolve import capture_settings
from kdump_mkinitrd.targets import Target

EARLIER = "earlier-2026-01-01-00:00:00"
# disk-full: what the filesystem has left for the capture; any dump of a guest is larger.
DISK_FULL_ROOM = 2**20
# second-crash: the second crash boots with its clock here (QEMU's RTC, on the guest's own
# clock), and the disk holds a folder for each second of the next COLLISION_WINDOW seconds:
# whatever second the capture names its dump after, that name is taken.
COLLISION_CLOCK = "2020-01-01T00:00:00"
COLLISION_WINDOW = 900
# io-error: the disk fails once this much more of it has been written than mkfs left.
IO_ERROR_AFTER = 8 * 2**20
STAMP = "%Y-%m-%d-%H:%M:%S"


@dataclass(frozen=True)
class Fault:
    name: str
    outcome: str  # what must happen, for the report and the README's table
    append: str = ""  # capture kernel arguments
    crashes: int = 1
    read_back: bool = True
    kill_when: tuple[str, ...] = ()  # power cut: QEMU is killed when the serial log shows one
    cut_network: bool = False  # the NIC's link goes down once the server holds part of the dump
    cut_disk: bool = False  # the first disk fails every request once part of the dump is on it
    clock: str = ""  # the last crash boots with its RTC here (-rtc base=, on the guest's clock)
    targets: tuple[str, ...] = ("disk",)  # the qemu-test --target values it works with
    # What the capture log must show, by --target, or --target/client where the ssh clients
    # word it differently ("*": the same for all).
    logged: tuple[tuple[str, str], ...] = ()
    # Stacked storage (--storage): the layouts it works with; the second member disk loses its
    # backend as the guest crashes (QEMU's drive_del: the capture kernel sees no sectors); a
    # second, plain target must take the dump.
    layouts: tuple[str, ...] = ()
    drop_member: bool = False
    next_target: bool = False

    def phrase(self, target: str) -> str:
        said = dict(self.logged)
        return said.get(target, said.get(target.partition("/")[0], said.get("*", "")))

    def machine(self, crash: int) -> tuple[str, ...]:
        """QEMU arguments for crash boot number `crash` (from 0)."""
        if self.clock and crash == self.crashes - 1:
            return ("-rtc", f"base={self.clock},clock=vm")
        return ()


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
          "dump untouched; a folder with the same name and stamp is never reused (.N)",
          crashes=2, clock=COLLISION_CLOCK),
    Fault("io-error", "the first disk fails every request (EIO) part-way through the dump: "
          "nothing on it is named complete, the log says why, the next target takes the dump",
          cut_disk=True),
    Fault("foreign-dumps", "the target holds other hosts' dumps, another tool's folder and "
          "this host's older ones; keep: 2 removes only this host's oldest"),
    Fault("raw-second-crash", "two crashes onto a raw target with no recover-raw between: "
          "the first dump stays on the device, the second goes to the next target",
          crashes=2),
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
    Fault("raid-degraded", "one RAID1 member is gone at crash time (QEMU's drive_del as the "
          "guest crashes): the array is started degraded and takes the dump",
          layouts=("raid1", "lvm-on-raid1"), drop_member=True,
          logged=(("*", "is DEGRADED"),)),
    Fault("pv-missing", "a PV of the target's volume group is gone at crash time: the LV is "
          "not activated, logged; the next target (a plain disk) takes the dump",
          layouts=("lvm", "lvm-thin", "luks-on-lvm"), drop_member=True, next_target=True,
          logged=(("*", "of its PVs"),)),
    Fault("luks-bad-key", "the kdump keyslot was removed after the image was built: the "
          "volume does not open, logged; the next target takes the dump",
          layouts=("luks", "luks-on-lvm"), next_target=True,
          logged=(("*", "the key file no longer opens"),)),
    Fault("thin-pool-full", "the thin pool has less free space than the dump may take: the "
          "target is refused before anything is written, logged; the next target takes it",
          layouts=("lvm-thin",), next_target=True, logged=(("*", "the dump may need up to"),)),
)}  # fmt: skip


def _ext4_with(target: Target, disk: Path, seed: Path, fault: Fault) -> None:
    """The target's ext4 made again (same UUID or LABEL, no blocks reserved) with the tree
    `seed` in it: mkfs.ext4 -d copies it in."""
    device = target.device or ""
    if target.type != "disk" or target.fstype != "ext4" or "=" not in device:
        raise KdumpError(f"--fault {fault.name} needs an ext4 disk target named by UUID= or "
                         "LABEL= first")  # fmt: skip
    flag = ["-U", device[5:]] if device.startswith("UUID=") else ["-L", device[6:]]
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", *flag, "-d", str(seed), str(disk)],
                   check=True, capture_output=True)  # fmt: skip


def _free_bytes(disk: Path) -> int:
    """What an ext4 image has free, as dumpe2fs reads its superblock."""
    text = subprocess.run(["dumpe2fs", "-h", str(disk)], check=True, capture_output=True,
                          text=True).stdout  # fmt: skip
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(fields["Free blocks"]) * int(fields["Block size"])


def _hostname(config: Config) -> str:
    """The name the image gives its dump directories, as the build decides it."""
    return capture_settings(config, ElfResolver(Path("/"), config.search_path), Path("/")).hostname


def _plant(folder: Path, hostname: str | None, when: str) -> str:
    """A complete dump as another crash left it: vmcore, and the vmcore.json this tool writes
    when it made the dump (on host `hostname`; None: another tool's folder, no record).
    Returns the vmcore's sha256."""
    folder.mkdir(parents=True, mode=0o700)
    vmcore = folder / "vmcore"
    vmcore.write_bytes(os.urandom(64 * 1024))
    if hostname is not None:
        record = base_record("python", hostname, "planted by qemu-test")
        record.update(collector="makedumpfile", format="kdump-compressed", dump_level=31,
                      kernel_release="6.1.0-56-amd64", vmcore_size=vmcore.stat().st_size,
                      sha256=sha256_file(vmcore),
                      crash_time=calendar.timegm(time.strptime(when, STAMP)))  # fmt: skip
        (folder / "vmcore.json").write_text(json.dumps(record, indent=2) + "\n")
    return sha256_file(vmcore)


@dataclass(frozen=True)
class Setup:
    """What a fault's preparation works on: the config, the first target and its disk, and a
    folder for the tree that mkfs.ext4 -d copies onto it."""

    fault: Fault
    config: Config
    target: Target
    disk: Path
    seed: Path

    @property
    def crash_dir(self) -> Path:
        """The target's dump folder inside the seed tree."""
        return self.seed / self.target.path.lstrip("/")

    def ext4(self) -> None:
        _ext4_with(self.target, self.disk, self.seed, self.fault)


def prepare(fault: Fault, config: Config, disks: list[Path], workdir: Path) -> dict[str, str]:
    """Change the first target's disk as the fault needs; returns facts the checks compare."""
    setup = Setup(fault, config, config.targets[0], disks[0], workdir / "seed")
    preparation = PREPARATIONS.get(fault.name)
    return preparation(setup) if preparation else {}


def _no_target(setup: Setup) -> dict[str, str]:
    with setup.disk.open("wb") as f:  # the same size, but nothing on it to find
        f.truncate(64 * 2**20)
    return {}


def _wrong_fs(setup: Setup) -> dict[str, str]:
    device = setup.target.device or ""
    uuid = device[5:] if device.startswith("UUID=") else None
    if setup.target.fstype != "xfs":
        other = ["mkfs.xfs", "-q", "-f", *(["-m", f"uuid={uuid}"] if uuid else ["-L", device[6:]])]
    else:
        other = ["mkfs.ext4", "-q", "-F", *(["-U", uuid] if uuid else ["-L", device[6:]])]
    subprocess.run([*other, str(setup.disk)], check=True, capture_output=True)
    return {}


def _disk_full(setup: Setup) -> dict[str, str]:
    """Small, with an earlier dump on it, and filled up but for DISK_FULL_ROOM: less than any
    dump takes, so the fault happens whatever size this crash's dump has."""
    earlier = setup.crash_dir / EARLIER
    earlier.mkdir(parents=True, exist_ok=True, mode=0o700)
    (earlier / "vmcore").write_bytes(os.urandom(2 * 2**20))
    (earlier / "vmcore.json").write_text(json.dumps({"sha256": sha256_file(earlier / "vmcore")}))
    with setup.disk.open("wb") as f:
        f.truncate(40 * 2**20)
    setup.ext4()
    (setup.seed / "filler").write_bytes(b"\xff" * (_free_bytes(setup.disk) - DISK_FULL_ROOM))
    setup.ext4()
    return {"earlier_sha256": sha256_file(earlier / "vmcore"), "free": str(_free_bytes(setup.disk))}


def _second_crash(setup: Setup) -> dict[str, str]:
    """A folder for every second of COLLISION_WINDOW from COLLISION_CLOCK on."""
    hostname = _hostname(setup.config)
    setup.crash_dir.mkdir(parents=True)
    start = calendar.timegm(time.strptime(COLLISION_CLOCK, "%Y-%m-%dT%H:%M:%S"))
    for second in range(COLLISION_WINDOW):
        stamp = time.strftime(STAMP, time.gmtime(start + second))
        (setup.crash_dir / f"{hostname}-{stamp}").mkdir(mode=0o700)
    setup.ext4()
    return {"hostname": hostname}


def _foreign_dumps(setup: Setup) -> dict[str, str]:
    if setup.config.capture.keep != 2:
        raise KdumpError("--fault foreign-dumps needs capture.keep: 2 in the config")
    hostname = _hostname(setup.config)
    facts = {"hostname": hostname, "removed": f"{hostname}-2024-01-01-00:00:00"}
    planted = {
        # Other hosts running this tool on the same export, one whose name starts with this
        # host's; another tool's folder (no vmcore.json).
        "alpha-2030-01-01-00:00:00": "alpha",
        "alpha-2020-01-01-00:00:00": "alpha",
        f"{hostname}-db-2019-01-01-00:00:00": f"{hostname}-db",
        "127.0.0.1-2021-05-05-10:00:00": None,
        # This host's own, the oldest first.
        f"{hostname}-2024-01-01-00:00:00": hostname,
        f"{hostname}-2025-01-01-00:00:00": hostname,
    }
    for name, host in planted.items():
        facts[f"planted:{name}"] = _plant(setup.crash_dir / name, host, name[-19:])
    # An unfinished dump of this host is evidence, never counted or removed.
    unfinished = setup.crash_dir / f"{hostname}-2023-01-01-00:00:00"
    unfinished.mkdir(mode=0o700)
    (unfinished / "vmcore.incomplete").write_bytes(os.urandom(4096))
    facts[f"planted:{unfinished.name}"] = ""
    setup.ext4()
    return facts


def _io_error(setup: Setup) -> dict[str, str]:
    if len(setup.config.targets) < 2:
        raise KdumpError("--fault io-error needs a second target to take the dump")
    # mkfs leaves the image sparse: what the guest writes from here on shows on the host.
    return {"cut_at_bytes": str(setup.disk.stat().st_blocks * 512 + IO_ERROR_AFTER)}


def _raw_second_crash(setup: Setup) -> dict[str, str]:
    if setup.target.type != "raw" or len(setup.config.targets) < 2:
        raise KdumpError("--fault raw-second-crash needs a raw target first and another target "
                         "after it")  # fmt: skip
    return {}


PREPARATIONS: dict[str, Callable[[Setup], dict[str, str]]] = {
    "no-target": _no_target,
    "wrong-fs": _wrong_fs,
    "disk-full": _disk_full,
    "second-crash": _second_crash,
    "foreign-dumps": _foreign_dumps,
    "io-error": _io_error,
    "raw-second-crash": _raw_second_crash,
}


def after_crash(fault: Fault, crash: int, disks: list[Path], facts: dict[str, str]) -> None:
    """Note what a crash left, before the next one (facts for the checks)."""
    if fault.name == "raw-second-crash" and crash == 0:
        header = raw.read_header(disks[0])
        facts["first_raw_header"] = json.dumps(header.fields if header else None)
        facts["first_raw_sha256"] = _raw_digest(disks[0])
    elif fault.name == "raw-second-crash":  # before the read-back's recover-raw clears it
        facts["raw_sha256_after"] = _raw_digest(disks[0])


def _raw_digest(disk: Path) -> str:
    """The raw target's header, kernel log and first 64 MiB of dump, as bytes."""
    return sha256_file(disk, limit=65 * 2**20)


def _dump_dirs(out: Path, target: int = 0) -> list[Path]:
    return sorted(p for p in out.glob(f"t{target}/*") if p.is_dir())


def _states(out: Path, target: int = 0) -> list[str]:
    where = out / f"t{target}"
    return [d.state for d in list_dumps(where)] if where.is_dir() else []


class Checks(Protocol):
    def check(self, name: str, passed: bool, detail: str = "") -> None: ...


def check(fault: Fault, logs: list[str], out: Path, facts: dict[str, str],
          report: Checks) -> Path | None:  # fmt: skip
    """Add the fault's own checks to the report, in place of a normal dump's; returns the
    dump the outcome saved, if any, for the full checks of a dump."""
    check_ = report.check
    log = logs[-1]
    failed = "kdump: running failure_action" in log
    if fault.targets != ("disk",):
        return _check_network_fault(fault, log, out, facts, report)
    if fault.layouts:
        return _check_storage_fault(fault, log, out, report)
    if fault.name in ("no-target", "wrong-fs"):
        phrase = "not found after" if fault.name == "no-target" else "cannot mount"
        check_("failure_logged", phrase in log, f"no {phrase!r} line")
        check_("failure_action_ran", failed)
        check_("no_dump_saved", "kdump: dump saved to target" not in log)
        return None
    dumps = _dump_dirs(out)
    if fault.name == "disk-full":
        check_("disk_left_less_than_any_dump", int(facts["free"]) <= 2 * DISK_FULL_ROOM,
               f"{facts['free']} bytes free")  # fmt: skip
        earlier = [d for d in dumps if d.name == EARLIER]
        check_("earlier_dump_intact", bool(earlier) and
               sha256_file(earlier[0] / "vmcore") == facts["earlier_sha256"])  # fmt: skip
        new = [d for d in dumps if d.name != EARLIER]
        check_("new_dump_dir_made", len(new) == 1)
        names = {p.name for p in new[0].iterdir()} if new else set()
        check_("partial_marked_incomplete", "vmcore" not in names and
               any(n.endswith("incomplete") for n in names), str(sorted(names)))  # fmt: skip
        check_("no_space_logged", "No space left on device" in log)
        check_("failure_logged", "capture failed" in log or "stage failed" in log)
        check_("failure_action_ran", failed)
        return None
    if fault.name == "second-crash":
        return _check_second_crash(logs, out, facts, report)
    if fault.name == "foreign-dumps":
        return _check_foreign_dumps(log, out, facts, report)
    if fault.name == "io-error":
        return _check_io_error(log, out, report)
    if fault.name == "raw-second-crash":
        return _check_raw_second_crash(logs, out, facts, report)
    states = _states(out)
    if fault.name == "power-cut":
        check_("earlier_complete_cut_incomplete", states == ["complete", "incomplete"], str(states))
        return dumps[0] if dumps else None
    # python-killed, oom
    check_("stage_killed_logged", "exit status 137" in log)
    if fault.name == "oom":
        # The kernel's choice must be the stage by its scores, not only by its size: the
        # stage +1000 (the kernel's own line says so) and the init, whose score its static
        # fallback inherits, exempt (-1000).
        scores = re.search(r"stage pid (\d+) oom_score_adj (\S+), init oom_score_adj (\S+)", log)
        killed = re.search(
            r"Out of memory: Killed process (\d+) \(python.*oom_score_adj:(\S+)", log
        )
        if killed is None or scores is None:
            check_("oom_killer_took_the_stage", False, "no kill or no stage scores logged")
        else:
            check_("oom_killer_took_the_stage", killed[1] == scores[1], killed[0])
            check_("oom_scores_stage_first_init_exempt",
                   (scores[2], killed[2], scores[3]) == ("1000", "1000", "-1000"),
                   f"{scores[0]}; {killed[0]}")  # fmt: skip
    # The stage's partial is gone before the fallback writes, so it cannot cost it the space.
    check_("stage_partial_removed_first", "removing the Python stage's vmcore.incomplete" in log
           and not any(out.rglob("vmcore.python-incomplete")))  # fmt: skip
    check_("fallback_ran", "static fallback runs" in log)
    check_("fallback_saved_the_dump", states == ["complete"], str(states))
    return dumps[0] if states == ["complete"] else None


def _check_second_crash(
    logs: list[str], out: Path, facts: dict[str, str], report: Checks
) -> Path | None:
    hostname = facts["hostname"]
    planted_names = re.compile(re.escape(hostname) + r"-2020-\d\d-\d\d-\d\d:\d\d:\d\d")
    dumps = _dump_dirs(out)
    planted = [d for d in dumps if planted_names.fullmatch(d.name)]
    made = [d for d in dumps if not planted_names.fullmatch(d.name)]
    states = [d.state for d in list_dumps(out / "t0") if Path(d.path) in made] if made else []
    report.check("two_dump_dirs", states == ["complete", "complete"], str(states))
    report.check("both_crashes_saved", all("kdump: dump saved to target" in e for e in logs))
    report.check("planted_folders_untouched",
                 len(planted) == COLLISION_WINDOW and not any(any(d.iterdir()) for d in planted),
                 f"{len(planted)} of {COLLISION_WINDOW} left empty")  # fmt: skip
    # The second crash's clock is in the planted window: its own name was taken.
    second = [d for d in made if d.name.startswith(f"{hostname}-2020-")]
    taken = second[0].name.rpartition(".")[0] if second else ""
    report.check("second_dump_took_a_dot_n_name",
                 bool(second) and second[0].name == f"{taken}.1" and (out / "t0" / taken).is_dir(),
                 f"{[d.name for d in made]}")  # fmt: skip
    return second[0] if second else None


def _check_foreign_dumps(log: str, out: Path, facts: dict[str, str], report: Checks) -> Path | None:
    hostname = facts["hostname"]
    planted = {k.partition(":")[2]: v for k, v in facts.items() if k.startswith("planted:")}
    left = {d.name: d for d in _dump_dirs(out)}
    kept = {name for name in planted if name != facts["removed"]}
    report.check("this_hosts_oldest_removed", facts["removed"] not in left, str(sorted(left)))
    report.check("the_others_kept", kept <= set(left), str(sorted(kept - set(left))))
    changed = [n for n in kept if n in left and planted[n]
               and sha256_file(left[n] / "vmcore") != planted[n]]  # fmt: skip
    report.check("the_others_untouched", not changed, str(changed))
    new = [d for name, d in left.items() if name not in planted]
    saved = len(new) == 1 and (new[0] / "vmcore").is_file()
    report.check("new_dump_saved", saved and new[0].name.startswith(f"{hostname}-"),
                 str([d.name for d in new]))  # fmt: skip
    report.check("removal_logged", facts["removed"] in log)
    return new[0] if len(new) == 1 else None


def _check_io_error(log: str, out: Path, report: Checks) -> Path | None:
    report.check("disk_failed_under_the_capture", "I/O error, dev vda" in log,
                 "the kernel logged no I/O error on vda")  # fmt: skip
    read_back = (out.parent / "read-back.log").read_text(errors="replace")
    report.check("failing_disk_read_back", "kdump-test: mounted /dev/vda" in read_back)
    named = sorted(str(p.relative_to(out)) for p in (out / "t0").rglob("vmcore")) \
        if (out / "t0").is_dir() else []  # fmt: skip
    report.check("nothing_complete_on_the_failing_disk", not named, str(named))
    report.check("target_gave_up_logged", "target 0 could not take the dump" in log)
    why = [line for line in log.splitlines() if "kdump:" in line and
           ("Input/output error" in line or "Read-only file system" in line)]  # fmt: skip
    report.check("console_says_why", bool(why), "no kdump: line names the I/O error")
    report.check("next_target_saved_the_dump", "kdump: dump saved to target 1" in log)
    states = _states(out, 1)
    report.check("next_target_holds_a_complete_dump", states == ["complete"], str(states))
    later = _dump_dirs(out, 1)
    return later[0] if len(later) == 1 else None


def _check_raw_second_crash(
    logs: list[str], out: Path, facts: dict[str, str], report: Checks
) -> Path | None:
    first = json.loads(facts["first_raw_header"])
    report.check("first_crash_saved_on_raw", bool(first) and first.get("state") == "complete"
                 and "kdump: dump saved to target 0" in logs[0], str(first))  # fmt: skip
    report.check("raw_refused_the_second_dump", "target 0 could not take the dump" in logs[1])
    report.check("second_went_to_the_next_target", "kdump: dump saved to target 1" in logs[1])
    # The raw device was recovered after both crashes (the read-back): its dump is the first.
    recovered = _dump_dirs(out, 0)
    stamp = first.get("stamp", "?") if first else "?"
    report.check(
        "first_dump_survived",
        len(recovered) == 1
        and recovered[0].name.endswith(stamp)
        and (recovered[0] / "vmcore").is_file(),
        str([d.name for d in recovered]),
    )
    report.check("raw_bytes_unchanged", facts.get("raw_sha256_after") == facts["first_raw_sha256"])
    states = _states(out, 1)
    report.check("next_target_holds_the_second", states == ["complete"], str(states))
    return recovered[0] if len(recovered) == 1 else None


def _check_network_fault(
    fault: Fault, log: str, out: Path, facts: dict[str, str], report: Checks
) -> Path | None:
    phrase = fault.phrase(facts["target"])
    report.check("failure_logged", phrase in log, f"no {phrase!r} line")
    report.check("network_target_gave_up", "target 0 could not take the dump" in log)
    saved = re.findall(r"kdump: dump saved to target (\d+)", log)
    dump = None
    if saved:
        later = out / f"t{saved[-1]}"
        states = [d.state for d in list_dumps(later)] if later.is_dir() else []
        report.check("next_target_saved_the_dump", states == ["complete"], str(states))
        dump = _dump_dirs(out, int(saved[-1]))[0] if states == ["complete"] else None
    else:
        report.check("failure_action_ran", "kdump: running failure_action" in log)
    written = sorted(p.name for p in Path(facts["server_dumps"]).rglob("vmcore*"))
    if fault.name == "net-lost":  # cut mid-stream: the kernel log and a partial file may stay
        report.check("no_complete_dump_on_the_server", "vmcore" not in written, str(written))
    else:
        report.check("nothing_written_on_the_server", not written, str(written))
    return dump


def _check_storage_fault(fault: Fault, log: str, out: Path, report: Checks) -> Path | None:
    phrase = fault.phrase("disk")
    said = [line for line in log.splitlines() if "kdump: " in line and phrase in line]
    report.check("failure_logged" if fault.next_target else "degraded_logged", bool(said),
                 f"no kdump: line with {phrase!r}")  # fmt: skip
    if fault.drop_member:
        # Its backend gone, the disk shows the capture kernel no sectors at all.
        report.check("member_gone_in_the_capture_kernel",
                     "[vdb] 0 512-byte logical blocks" in log, "vdb still had sectors")  # fmt: skip
    if not fault.next_target:
        report.check("dump_saved_on_the_degraded_array", "kdump: dump saved to target 0" in log)
        read_back = (out.parent / "read-back.log").read_text(errors="replace")
        # The member the capture could not use is stale now: the read-back starts without it.
        report.check("member_stale_after_the_capture", "started with 1 drive (out of 2)"
                     in read_back, "the read-back assembled both members")  # fmt: skip
        states = _states(out)
        report.check("degraded_array_holds_a_complete_dump", states == ["complete"], str(states))
        dumps = _dump_dirs(out)
        return dumps[0] if len(dumps) == 1 else None
    report.check("target_gave_up_logged", "target 0 could not take the dump" in log)
    written = sorted(str(p.relative_to(out)) for p in (out / "t0").rglob("vmcore*")) \
        if (out / "t0").is_dir() else []  # fmt: skip
    report.check("nothing_written_on_the_stacked_target", not written, str(written))
    report.check("next_target_saved_the_dump", "kdump: dump saved to target 1" in log)
    states = _states(out, 1)
    report.check("next_target_holds_a_complete_dump", states == ["complete"], str(states))
    later = _dump_dirs(out, 1)
    return later[0] if len(later) == 1 else None
