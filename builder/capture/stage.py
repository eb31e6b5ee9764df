"""The Python capture stage: the careful part of saving a dump, run by the init in the
capture kernel as `python -m capture.stage --dir DIR ...`.

Steps, in order: read /proc/vmcore's headers and VMCOREINFO; write vmcore-dmesg.txt first
(small and most valuable); write the dump as vmcore.incomplete, fsync, rename to vmcore;
write vmcore.json. Any failure exits non-zero and the init's static capture takes over, so
nothing here needs to be clever about recovery: it must only never leave a half-written file
under a final name.

Imports are kept to os, struct, sys, time and hashlib: every module costs crash-kernel memory.
"""

from __future__ import annotations

import os
import sys
import time

from .dmesg import extract_dmesg
from .elfdump import write_elf_dump
from .filedigest import sha256_file
from .vmcore import Vmcore, VmcoreError
from .vmcore_json import base_record

try:
    # Only in images qemu-test builds: a production image's stage has no fault switches.
    from . import testswitches as _switches
except ImportError:
    _switches = None  # type: ignore[assignment]

VMCORE = "/proc/vmcore"


class StageError(Exception):
    """A step failed; the message is printed and the init falls back."""


class Console:
    """Lines to the console and to the init's log, prefixed like the init's own."""

    def __init__(self, log_path: str | None) -> None:
        self.log_path = log_path

    def say(self, text: str) -> None:
        line = f"kdump: {text}"
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        if self.log_path:
            try:
                with open(self.log_path, "a") as log:
                    log.write(f"{time.monotonic():.2f} {text}\n")
            except OSError:
                pass


def _json(value: object, indent: str = "") -> str:
    """JSON for the few types vmcore.json holds; the json module would pull in re."""
    inner = indent + "  "
    if isinstance(value, dict):
        items = [f'{inner}"{k}": {_json(v, inner)}' for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}" if items else "{}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if 0x20 <= ord(c) < 0x7F else f"\\u{ord(c):04x}" for c in text)
    return f'"{escaped}"'


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _run(argv: list[str]) -> int:
    """Run a program and wait; posix_spawn keeps subprocess (and its imports) out."""
    pid = os.posix_spawn(argv[0], argv, dict(os.environ))
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class Progress:
    """At most one console line a second: percent done and rate."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < 1.0 and done < total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-6) / 1e6
        percent = 100.0 * done / total if total else 100.0
        self.console.say(f"writing vmcore: {percent:5.1f}% {rate:.1f} MB/s")


def _collect(
    args: dict[str, str], core: Vmcore, partial: str, console: Console
) -> dict[str, object]:
    if args["collector"] != "makedumpfile":
        return _native(core, partial, console)
    argv = [args["makedumpfile"], *args["flag"].split(), "-d", args["dump_level"],
            "--message-level", "7", args.get("vmcore", VMCORE), partial]  # fmt: skip
    console.say("collector: " + " ".join(argv))
    status = _run(argv)
    if status != 0:
        # A kernel newer than the makedumpfile (Debian 12's 1.7.2 cannot read its arm64 6.12
        # kernel, 52-bit addresses) must still leave a dump: the whole ELF core, zero pages
        # left out, is bigger but readable by crash, drgn and makedumpfile of later versions.
        failed = f"makedumpfile failed with status {status}"
        console.say(f"{failed}: the native writer saves an ELF dump instead")
        if os.path.lexists(partial):
            os.unlink(partial)
        return dict(_native(core, partial, console), collector_error=failed)
    # makedumpfile never fsyncs: the data must be on disk before the rename says "done".
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"collector": "makedumpfile", "format": "kdump-compressed",
            "dump_level": int(args["dump_level"])}  # fmt: skip


def _native(core: Vmcore, partial: str, console: Console) -> dict[str, object]:
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    # The name must survive a power cut, so that a cut dump is found and marked incomplete.
    _fsync_dir(os.path.dirname(partial))
    try:
        result = write_elf_dump(core, fd, progress=Progress(console))
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"collector": "native", "format": "elf", "dump_level": 1,
            "pages_total": result.pages_total, "pages_zero_skipped": result.pages_zero}  # fmt: skip


def capture(args: dict[str, str], console: Console) -> dict[str, object]:
    """All four steps; returns the vmcore.json record."""
    directory = args["dir"]
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[name] = round(now - clock, 3)
        clock = now

    try:
        core = Vmcore.open(args.get("vmcore", VMCORE))
    except (VmcoreError, OSError) as exc:
        raise StageError(f"cannot read {VMCORE}: {exc}") from None
    lap("parse")
    # vmcore.json's fields: builder/capture/vmcore_json.py.
    record = base_record("python", args.get("hostname", ""), args.get("target", ""))
    record["kernel_release"] = core.osrelease
    record["crash_time"] = core.crashtime
    try:
        dmesg = extract_dmesg(core)
        _write_file(os.path.join(directory, "vmcore-dmesg.txt"), dmesg.encode(errors="replace"))
        record["dmesg_lines"] = dmesg.count("\n")
    except (VmcoreError, OSError) as exc:
        # The log is a bonus; the dump itself still matters more.
        console.say(f"warning: could not extract the kernel log: {exc}")
        record["dmesg_error"] = str(exc)
    lap("dmesg")
    partial = os.path.join(directory, "vmcore.incomplete")
    final = os.path.join(directory, "vmcore")
    if _switches is not None:
        _switches.at_dump_start(args, partial, console.say)
    try:
        record.update(_collect(args, core, partial, console))
    except (VmcoreError, OSError) as exc:
        raise StageError(f"writing the dump failed: {exc}") from None
    finally:
        core.close()
    os.rename(partial, final)
    _fsync_dir(directory)
    lap("dump")
    record["vmcore_size"] = os.stat(final).st_size
    record["sha256"] = sha256_file(final)
    lap("hash")
    record["timings"] = timings
    # Under its final name only when whole: a record is never half-written JSON.
    record_path = os.path.join(directory, "vmcore.json")
    _write_file(record_path + ".incomplete", _json(record).encode() + b"\n")
    os.rename(record_path + ".incomplete", record_path)
    _fsync_dir(directory)
    return record


def parse_args(argv: list[str]) -> dict[str, str]:
    """`--key value` pairs; argparse is left out for memory's sake."""
    if len(argv) % 2:
        raise StageError(f"arguments must come in --key value pairs: {argv}")
    args = {}
    for key, value in zip(argv[::2], argv[1::2], strict=True):
        if not key.startswith("--"):
            raise StageError(f"unexpected argument {key!r}")
        args[key[2:].replace("-", "_")] = value
    if "dir" not in args:
        raise StageError("--dir is required")
    args.setdefault("collector", "native")
    return args


def main(argv: list[str]) -> int:
    console = Console(None)
    try:
        args = parse_args(argv)
        console = Console(args.get("log"))
        failure = _switches.read(args) if _switches is not None else None
        if failure:
            raise StageError(failure)
        start = time.monotonic()
        record = capture(args, console)
        console.say(
            f"Python stage saved {record['vmcore_size']} bytes in {time.monotonic() - start:.1f}s"
        )
        return 0
    except StageError as exc:
        console.say(f"Python stage failed: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
