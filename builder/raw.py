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
from dataclasses import dataclass
from pathlib import Path

from builder.capture.vmcore import Vmcore, VmcoreError
from builder.capture.vmcore_json import base_record
from builder.errors import KdumpError

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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _new_dir(parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    candidate, n = parent / name, 1
    while candidate.exists():
        candidate, n = parent / f"{name}.{n}", n + 1
    candidate.mkdir(mode=0o700)
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
    record["sha256"] = _sha256(vmcore)
    record["crash_time"] = None if flattened else _crash_time(vmcore)
    record["recovered_from"] = str(device)
    return record


def recover(device: Path, parent: Path) -> Path:
    """Write the dump out under `parent`; clear the header after a complete dump is safe."""
    header = read_header(device)
    if header is None:
        raise KdumpError(f"{device} holds no raw kdump dump (no {MAGIC!r} header)")
    name = f"{header.fields.get('hostname', 'unknown')}-{header.fields.get('stamp', 'unknown')}"
    out = _new_dir(parent, name)
    dmesg_size = header.number("dmesg_size")
    if dmesg_size:
        _copy_range(device, header.number("dmesg_offset"), dmesg_size, out / "vmcore-dmesg.txt")
    partial = out / "vmcore.incomplete"
    if header.fields.get("format") == "flattened":
        _unflatten(device, header.number("dump_offset"), partial)
    else:
        _copy_range(device, header.number("dump_offset"), header.number("dump_size"), partial)
    final = out / "vmcore"
    if header.complete:
        partial.rename(final)
    vmcore = final if header.complete else partial
    record = _record(header, device, vmcore)
    record_path = out / "vmcore.json"
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    record_path.chmod(0o600)
    dir_fd = os.open(out, os.O_RDONLY)
    os.fsync(dir_fd)
    os.close(dir_fd)
    if header.complete:
        # Only now is the dump safe elsewhere, so the device can take the next one.
        with device.open("r+b") as f:
            f.write(b"\0" * HEADER_SIZE)
            f.flush()
            os.fsync(f.fileno())
    return out
