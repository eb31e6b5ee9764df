"""`kdump-mkinitrd luks-setup`: the key file a luks layer opens its volume with in the capture
kernel, in a keyslot of its own whose key derivation fits crash memory.

The key derivation is PBKDF2 (HMAC-SHA256), not argon2id with a small memory cost: a KDF only
slows down guessing a low-entropy passphrase, and this key is 512 random bits, which nobody
can guess however cheap each guess is. PBKDF2 needs no memory beyond cryptsetup itself (the
capture kernel has about 100 MB, LUKS2's default argon2id asks for up to 1 GiB), no parallel
lanes (argon2 benchmarks with up to 4 threads here and runs them one after the other on the
capture kernel's single CPU), and LUKS1 headers take it too. Its iteration count is what
cryptsetup benchmarks for --iter-time on this machine, which is also the one that captures.

The existing passphrase (or key) that authorises the new keyslot is asked for by cryptsetup
itself, on the terminal, or read from --unlock-key-file. A key file is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.storage.luks import (
    KEY_DIR,
    Header,
    cryptsetup,
    default_key_file,
    read_header,
    read_record,
    record_path,
)

KEY_BYTES = 64
ITER_TIME_MS = 1000  # cryptsetup's own default is 2000: the capture should not wait for it


@dataclass(frozen=True)
class SetupResult:
    device: str
    uuid: str
    luks_version: int
    keyslot: int
    kdf: dict[str, object]
    key_file: str
    record: str


def _where(device: Path) -> str:
    return f"luks-setup {device}"


def _header(device: Path) -> Header:
    try:
        return read_header(device)
    except KdumpError as exc:
        raise KdumpError(f"luks-setup: {exc}") from None


def _write_key(path: Path) -> None:
    """A fresh random key at `path`, mode 0600, in a folder only root can enter; O_EXCL, so
    an existing key (one an image may already hold) is never replaced."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, mode=0o700)
        path.parent.chmod(0o700)  # whatever the umask
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KdumpError(
            f"{path} exists already and is never overwritten (an image may hold it): remove the "
            "keyslot it opens first (luks-setup --remove), or give another --key-file"
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(KEY_BYTES))
        f.flush()
        os.fsync(f.fileno())


def _cryptsetup(args: list[str], device: Path, what: str, interactive: bool = False) -> None:
    """Run cryptsetup; `interactive`: on the terminal, so it can ask for a passphrase."""
    proc = subprocess.run(
        [cryptsetup(), *args], capture_output=not interactive, text=True, check=False
    )
    if proc.returncode != 0:
        said = " ".join(f"{proc.stdout or ''} {proc.stderr or ''}".split())
        # cryptsetup's exit status 2: no keyslot took the passphrase or key given.
        why = "the existing passphrase or key was not accepted; " if proc.returncode == 2 else ""
        reason = said or ("see cryptsetup's message above" if interactive else "no message")
        raise KdumpError(f"{_where(device)}: {what} failed (exit status {proc.returncode}): "
                         f"{why}{reason}")  # fmt: skip


def setup(
    device: Path,
    key_file: Path | None = None,
    unlock_key_file: Path | None = None,
    iter_time_ms: int = ITER_TIME_MS,
) -> SetupResult:
    before = _header(device)
    path = key_file or Path(default_key_file(before.uuid))
    _write_key(path)
    args = ["luksAddKey", "--batch-mode", "--pbkdf", "pbkdf2", "--hash", "sha256",
            "--iter-time", str(iter_time_ms)]  # fmt: skip
    if unlock_key_file is not None:
        args += ["--key-file", str(unlock_key_file)]
    try:
        _cryptsetup([*args, str(device), str(path)], device, "cryptsetup luksAddKey",
                    interactive=unlock_key_file is None)  # fmt: skip
    except BaseException:
        path.unlink()  # no keyslot opens it: nothing may think it does
        raise
    after = _header(device)
    added = sorted(set(after.keyslots) - set(before.keyslots))
    if len(added) != 1:
        raise KdumpError(f"{_where(device)}: expected one new keyslot, the header shows {added}")
    return _record(device, after, added[0], path, iter_time_ms)


def _record(device: Path, header: Header, slot: int, path: Path, iter_time: int) -> SetupResult:
    made = header.keyslots[slot]
    kdf = {"type": made.kdf, "hash": "sha256", "iterations": made.iterations,
           "iter_time_ms": iter_time, "memory_kib": made.memory_kib}  # fmt: skip
    record = record_path(path)
    result = SetupResult(str(device), header.uuid, header.version, slot, kdf, str(path),
                         str(record))  # fmt: skip
    data = dict(asdict(result), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                tool="kdump-mkinitrd luks-setup")  # fmt: skip
    tmp = record.with_name(record.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, record)
    return result


def remove(device: Path, key_file: Path | None = None) -> str:
    """Remove the keyslot the key file opens (cryptsetup luksRemoveKey needs no other
    passphrase: the key itself authorises it), then the key file and its record. Returns
    what was done."""
    header = _header(device)
    path = key_file or Path(default_key_file(header.uuid))
    if not path.exists():
        raise KdumpError(f"{_where(device)}: no key file {path} (give --key-file)")
    record = read_record(path) or {}
    slot = f"slot {record['keyslot']}" if "keyslot" in record else None
    tool = cryptsetup()
    # Whether the key still opens a keyslot (it may have been killed by hand); 2: none.
    test = subprocess.run(
        [tool, "open", "--test-passphrase", "--key-file", str(path), str(device)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if test.returncode == 0:
        # On the terminal: for the volume's last keyslot cryptsetup asks first.
        _cryptsetup(["luksRemoveKey", "--key-file", str(path), str(device)], device,
                    "cryptsetup luksRemoveKey", interactive=True)  # fmt: skip
        done = f"removed the keyslot {path} opened" + (f" ({slot})" if slot is not None else "")
    elif test.returncode == 2:
        done = f"{path} opened no keyslot of {device} any more"
    else:
        raise KdumpError(f"{_where(device)}: cannot test {path}: {test.stderr.strip()}")
    path.unlink()
    record_path(path).unlink(missing_ok=True)
    return f"{done}; deleted {path} and its record"


def add_parser(sub: Any) -> None:
    """The `luks-setup` subcommand, on the command line's subparsers."""
    p = sub.add_parser(
        "luks-setup",
        help="add a LUKS keyslot for the capture kernel (PBKDF2, fits crash memory) and its "
        "key file",
    )
    p.add_argument("device", type=Path, help="the LUKS volume's device")
    p.add_argument(
        "--key-file",
        type=Path,
        metavar="PATH",
        help=f"the new key file (default {KEY_DIR}/LUKS-UUID.key; never overwritten)",
    )
    p.add_argument(
        "--unlock-key-file",
        type=Path,
        metavar="PATH",
        help="an existing key that authorises the new keyslot (default: cryptsetup asks for a "
        "passphrase)",
    )
    p.add_argument("--iter-time", type=int, default=ITER_TIME_MS, help=argparse.SUPPRESS)
    p.add_argument(
        "--remove",
        action="store_true",
        help="remove the keyslot the key file opens, then the key file and its record",
    )


def command(args: argparse.Namespace) -> int:
    if args.remove:
        print(remove(args.device, args.key_file))
        return 0
    result = setup(args.device, args.key_file, args.unlock_key_file, args.iter_time)
    print(f"added keyslot {result.keyslot} ({result.kdf['type']}) to LUKS{result.luks_version} "
          f"{result.uuid} on {result.device}")  # fmt: skip
    print(f"key file: {result.key_file} (0600); record: {result.record}")
    flag = "" if args.key_file is None else f" --key-file {result.key_file}"
    print(f"config: stack: [{{type: luks, uuid: {result.uuid}}}]; remove it again with "
          f"kdump-mkinitrd luks-setup --remove{flag} {result.device}")  # fmt: skip
    return 0
