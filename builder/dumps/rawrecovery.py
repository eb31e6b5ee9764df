"""`kdump-mkinitrd recover-raw DEVICE DIR`: turn a dump written onto a raw device back into
an ordinary dump directory, and clear the device's header only once that is safely done.

Layout written by the raw feature's init step: a text header in the first 4 KiB (magic line,
then key=value lines), the kernel log from 4 KiB, the dump from 1 MiB: an ELF vmcore of
`dump_size` bytes, or makedumpfile's flattened stream, which marks its own end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kdump_mkinitrd.capture.filedigest import sha256_file
from kdump_mkinitrd.capture.vmcore import Vmcore, VmcoreError
from kdump_mkinitrd.capture.vmcore_json import base_record
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan.hostonly import device_node
from kdump_mkinitrd.output import fsync_dir, write_atomic
from kdump_mkinitrd.targets import Target
from kdump_mkinitrd.targets.raw import RawTarget

MAGIC = "KDUMP-MKINITRD-RAW 1"
HEADER_SIZE = 4096
CHUNK = 4 << 20


@dataclass(frozen=True)
class RawHeader:
    fields: dict[str, str]

    @property
    def complete(self) -> bool:
        return self.fields.get("state") == "complete"

    def number(self, key: str) -> int:
        value = self.fields.get(key, "")
        if not value.isdigit():
            raise KdumpError(f"raw dump header: {key}={value!r} is not a number")
        return int(value)


def read_header(device: Path) -> RawHeader | None:
    """The header, or None when the device holds no raw dump (never written, or cleared)."""
    try:
        with device.open("rb") as f:
            block = f.read(HEADER_SIZE)
    except OSError as exc:
        raise KdumpError(f"cannot read {device}: {exc.strerror}") from None
    text = block.split(b"\0", 1)[0].decode(errors="replace")
    lines = text.splitlines()
    if not lines or lines[0] != MAGIC:
        return None
    fields = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    return RawHeader(fields)


def _copy_range(device: Path, offset: int, size: int, out: Path) -> str:
    digest = hashlib.sha256()
    with device.open("rb") as src, out.open("xb") as dst:
        os.fchmod(dst.fileno(), 0o600)
        src.seek(offset)
        left = size
        while left:
            chunk = src.read(min(CHUNK, left))
            if not chunk:
                raise KdumpError(f"{device} ends {left} bytes before the dump does")
            dst.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def _unflatten(device: Path, offset: int, out: Path) -> None:
    tool = shutil.which("makedumpfile")
    if tool is None:
        raise KdumpError("the raw dump is makedumpfile's flattened format: install makedumpfile")
    with device.open("rb") as src:
        src.seek(offset)
        proc = subprocess.run([tool, "-R", str(out)], stdin=src, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KdumpError(f"makedumpfile -R failed: {proc.stderr.strip()[-500:]}")
    os.chmod(out, 0o600)
    with out.open("rb") as f:
        os.fsync(f.fileno())


def _safe_name(value: str) -> str:
    """A header field as one path component: the header comes from a device, and nothing in
    it may name a folder outside the one the dump is recovered into."""
    name = value.replace("/", "_").replace("\0", "_")
    return "_" + name if name.startswith(".") or not name else name


def _new_dir(parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    candidate, n = parent / name, 1
    while candidate.exists():
        candidate, n = parent / f"{name}.{n}", n + 1
    candidate.mkdir(mode=0o700)
    # The new folder's name must be on disk before the device is cleared.
    fsync_dir(parent)
    return candidate


def _crash_time(vmcore: Path) -> int | None:
    """CRASHTIME from an ELF dump's VMCOREINFO; None when it cannot be read (a cut dump)."""
    try:
        with Vmcore.open(str(vmcore)) as core:
            return core.crashtime
    except (VmcoreError, OSError):
        return None


def _record(header: RawHeader, device: Path, vmcore: Path) -> dict[str, object]:
    """vmcore.json (builder/capture/vmcore_json.py) from what the raw header says."""
    record = base_record("static", header.fields.get("hostname", "unknown"), f"raw:{device}")
    record["complete"] = header.complete
    # The init's static capture wrote the device: makedumpfile's flattened stream (rebuilt
    # into kdump-compressed above) or a dd copy of /proc/vmcore.
    flattened = header.fields.get("format") == "flattened"
    record["collector"] = header.fields.get("collector") or ("makedumpfile" if flattened else "dd")
    record["format"] = "kdump-compressed" if flattened else "elf"
    # The init always writes dump_level; a header without one is read as "unknown: 0".
    level = header.fields.get("dump_level", "")
    record["dump_level"] = int(level) if level.isdigit() else 0
    record["kernel_release"] = header.fields.get("kernel_release", "")
    record["vmcore_size"] = vmcore.stat().st_size
    record["sha256"] = sha256_file(vmcore)
    record["crash_time"] = None if flattened else _crash_time(vmcore)
    record["recovered_from"] = str(device)
    return record


def _clear_header(device: Path) -> None:
    """Mark the raw dump recovered: the capture only refuses a device whose header says
    "complete", so a cleared one takes the next crash's dump."""
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\0" * HEADER_SIZE, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_out(device: Path, header: RawHeader, out: Path) -> None:
    """The dump, its kernel log and vmcore.json under `out`, each synced; `vmcore` is given
    its final name last, and only when the device says the dump is complete."""
    dmesg_size = header.number("dmesg_size")
    if dmesg_size:
        _copy_range(device, header.number("dmesg_offset"), dmesg_size, out / "vmcore-dmesg.txt")
    partial = out / "vmcore.incomplete"
    if header.fields.get("format") == "flattened":
        _unflatten(device, header.number("dump_offset"), partial)
    else:
        _copy_range(device, header.number("dump_offset"), header.number("dump_size"), partial)
    record = _record(header, device, partial)
    write_atomic(out / "vmcore.json", (json.dumps(record, indent=2) + "\n").encode())
    if header.complete:
        partial.rename(out / "vmcore")
    fsync_dir(out)


def recover(device: Path, parent: Path) -> Path:
    """Write the dump out under `parent`; clear the header once a complete dump is safe there.

    A recovery that fails part-way removes what it wrote (nothing may look like a dump) and
    leaves the device as it was, so that the dump can be recovered again."""
    header = read_header(device)
    if header is None:
        raise KdumpError(f"{device} holds no raw kdump dump (no {MAGIC!r} header)")
    host = _safe_name(header.fields.get("hostname", "unknown"))
    name = f"{host}-{_safe_name(header.fields.get('stamp', 'unknown'))}"
    try:
        out = _new_dir(parent, name)
    except OSError as exc:
        raise KdumpError(f"cannot make a folder under {parent}: {exc.strerror}") from None
    try:
        _write_out(device, header, out)
    except (OSError, KdumpError) as exc:
        shutil.rmtree(out, ignore_errors=True)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise KdumpError(
            f"recovering {device} into {out} failed ({why}): removed what was written; "
            f"the dump is still on {device}"
        ) from None
    if header.complete:
        # Only now is the dump safe elsewhere, so the device can take the next one.
        _clear_header(device)
    return out


@dataclass(frozen=True)
class Recovery:
    """What the boot-time pass did with one raw target."""

    target: str
    ok: bool  # False only when a complete dump could not be copied out
    message: str
    directory: str | None = None


def recover_targets(targets: Iterable[Target], dev: Path = Path("/dev")) -> list[Recovery]:
    """`register` at boot, as kdumpctl does: copy each raw target's complete dump into its
    `recover_to` folder, so the device is free for the next crash (the capture refuses to
    overwrite a complete dump nobody recovered). Incomplete dumps are left for the admin."""
    done = []
    for target in targets:
        if not isinstance(target, RawTarget) or not target.device:
            continue
        node = device_node(target.device, dev)
        parent = Path(target.recover_to)
        if not node.exists():
            done.append(Recovery(target.name, True, f"{node} is not there: nothing recovered"))
            continue
        try:
            header = read_header(node)
        except KdumpError as exc:
            done.append(Recovery(target.name, False, f"{exc}"))
            continue
        if header is None:
            continue
        stamp = header.fields.get("stamp", "unknown")
        if not header.complete:
            done.append(Recovery(target.name, True, (
                f"{node} holds an incomplete dump from {stamp} (its capture failed); left as "
                f"it is: `kdump-mkinitrd recover-raw {node} DIR` copies out what there is"
            )))  # fmt: skip
            continue
        try:
            out = recover(node, parent)
        except KdumpError as exc:
            done.append(Recovery(target.name, False, str(exc)))
            continue
        done.append(Recovery(target.name, True, f"recovered the dump on {node} into {out}",
                             str(out)))  # fmt: skip
    return done
