"""Fault-test switches of the Python stage, read from the capture kernel's command line: only
images that qemu-test builds carry this module (BuildRequest.test_switches), so a production
stage never acts on these words, whoever puts them on its command line.

They exercise the static fallback: fail at once, die of SIGKILL as the dump starts, or take
memory as the dump starts until the kernel's OOM killer ends the stage (the init makes the
stage its choice)."""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # typing would cost the capture kernel memory; mypy knows the idiom
if TYPE_CHECKING:
    from collections.abc import Callable

FAIL_SWITCH = "kdump_mkinitrd.fail_stage=1"
KILL_SWITCH = "kdump_mkinitrd.kill_stage=1"
OOM_SWITCH = "kdump_mkinitrd.oom_stage=1"
SIGKILL = 9  # the signal module would pull in enum


def read(args: dict[str, str], cmdline: str = "/proc/cmdline") -> str | None:
    """Marks kill/oom in `args`; returns why the stage must fail at once, or None."""
    try:
        with open(cmdline) as text:
            switches = text.read().split()
    except OSError as exc:
        return f"cannot read {cmdline}: {exc}"
    if KILL_SWITCH in switches:
        args["kill"] = "1"
    if OOM_SWITCH in switches:
        args["oom"] = "1"
    if FAIL_SWITCH in switches:
        return f"{FAIL_SWITCH} is on the kernel command line"
    return None


def at_dump_start(args: dict[str, str], partial: str, say: Callable[[str], None]) -> None:
    """Where the dump would start: leave `partial` behind as a killed stage would, then die."""
    if args.get("kill") != "1" and args.get("oom") != "1":
        return
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    if args.get("kill") == "1":
        os.kill(os.getpid(), SIGKILL)
    exhaust_memory(say)


def exhaust_memory(say: Callable[[str], None]) -> None:
    """Touch ever more memory until the kernel's OOM killer takes this process."""
    say(f"taking memory until the OOM killer acts ({OOM_SWITCH})")
    # What the kernel weighs, for qemu-test to check against the process it kills: the init
    # makes this stage the first choice and itself (and so its fallback) exempt.
    scores = []
    for pid in ("self", "1"):
        try:
            with open(f"/proc/{pid}/oom_score_adj") as f:
                scores.append(f.read().strip())
        except OSError as exc:
            scores.append(f"unreadable ({exc.strerror})")
    say(f"stage pid {os.getpid()} oom_score_adj {scores[0]}, init oom_score_adj {scores[1]}")
    hoard = []
    while True:
        try:
            hoard.append(b"\x01" * (1 << 20))  # filled, so every page is really there
        except MemoryError:
            time.sleep(0.01)  # refused by the allocator: wait for the kernel to pick a victim
