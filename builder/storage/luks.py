"""luks layers: a LUKS1 or LUKS2 (dm-crypt) volume, opened in the capture kernel with a key
file built into the image (what `kdump-mkinitrd luks-setup` makes: a dedicated keyslot whose
key derivation fits crash memory). Feature module: modules.d/luks/.

The LUKS header is read at build time where the device is visible (`cryptsetup luksDump`):
it names the cipher, whose kernel modules the capture kernel must load itself (it has no
modprobe), and the key derivation of the keyslot the key file opens, which `estimate` counts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.schema import Checker, Field
from kdump_mkinitrd.storage.base import Layer, register
from kdump_mkinitrd.targets.base import ImageFile

KEY_DIR = "/etc/kdump-mkinitrd/luks"  # luks-setup's key files, one per LUKS UUID
IMAGE_KEY_DIR = "/etc/kdump/luks"  # where the image holds them
FEATURE = "luks"
# The LUKS2 default (and the only LUKS1 cipher anyone still makes), for a header that cannot
# be read at build time (the image is built for another machine).
DEFAULT_CIPHER = "aes-xts-plain64"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MAPPER = re.compile(r"[A-Za-z0-9_.+-]{1,127}")
# device-mapper's uuid of an opened LUKS volume: CRYPT-LUKS2-<UUID without dashes>-<name>.
_DM_UUID = re.compile(r"CRYPT-LUKS[12]-([0-9a-fA-F]{32})-.*")
# Cipher mode templates that are built on another one: the kernel instantiates xts(aes) from
# ecb(aes), adiantum from nhpoly1305.
_MODE_NEEDS = {"xts": ("ecb",), "lrw": ("ecb", "gf128mul"), "adiantum": ("nhpoly1305",)}


def default_key_file(uuid: str) -> str:
    return f"{KEY_DIR}/{uuid}.key"


def record_path(key_file: Path) -> Path:
    """luks-setup's record of a key file: the keyslot it opens and that slot's KDF."""
    return key_file.with_name(key_file.name + ".json")


def image_key_path(uuid: str) -> str:
    return f"{IMAGE_KEY_DIR}/{uuid}.key"


def cryptsetup() -> str:
    found = shutil.which("cryptsetup")
    if found is None:
        raise KdumpError(
            "cryptsetup not found (Debian: apt-get install cryptsetup-bin; Fedora: cryptsetup)"
        )
    return found


@dataclass(frozen=True)
class Keyslot:
    number: int
    kdf: str  # pbkdf2, argon2i, argon2id
    memory_kib: int  # argon2's memory cost; 0 for pbkdf2
    iterations: int  # pbkdf2's; argon2's time cost
    encryption: str  # the cipher of the keyslot's area (LUKS2), which cryptsetup decrypts


@dataclass(frozen=True)
class Header:
    version: int
    uuid: str
    cipher: str  # of the data: aes-xts-plain64
    keyslots: dict[int, Keyslot]


def _run(argv: list[str], device: Path) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise KdumpError(f"{device}: {' '.join(argv[1:3])} failed: "
                         f"{proc.stderr.strip() or f'exit {proc.returncode}'}")  # fmt: skip
    return proc.stdout


def read_header(device: Path) -> Header:
    """The LUKS header of `device` (a block device or an image file)."""
    tool = cryptsetup()
    if not device.exists():
        raise KdumpError(f"{device}: no such device or file")
    if subprocess.run([tool, "isLuks", str(device)], capture_output=True, timeout=60).returncode:
        raise KdumpError(f"{device}: not a LUKS device (cryptsetup isLuks says no)")
    dump = _run([tool, "luksDump", str(device)], device)
    fields = dict(re.findall(r"^([A-Za-z ]+):\s*(.*?)\s*$", dump, re.M))
    version, uuid = int(fields["Version"]), fields["UUID"].lower()
    if version == 1:
        # LUKS1: PBKDF2 only, one cipher for the data and the key material.
        cipher = f"{fields['Cipher name']}-{fields['Cipher mode']}"
        slots = {
            int(n): Keyslot(int(n), "pbkdf2", 0, int(iterations), cipher)
            for n, iterations in re.findall(
                r"^Key Slot (\d+): ENABLED\n\s*Iterations:\s*(\d+)", dump, re.M
            )
        }
        return Header(1, uuid, cipher, slots)
    meta = json.loads(_run([tool, "luksDump", "--dump-json-metadata", str(device)], device))
    segment = min(meta["segments"].items(), key=lambda item: int(item[0]))[1]
    slots = {}
    for n, slot in meta["keyslots"].items():
        kdf = slot.get("kdf", {})
        slots[int(n)] = Keyslot(
            int(n), str(kdf.get("type", "?")), int(kdf.get("memory", 0)),
            int(kdf.get("iterations", kdf.get("time", 0))),
            str(slot.get("area", {}).get("encryption", "")),
        )  # fmt: skip
    return Header(2, uuid, str(segment.get("encryption", DEFAULT_CIPHER)), slots)


def cipher_modules(cipher: str) -> tuple[str, ...]:
    """The crypto API aliases a dm-crypt cipher spec needs (cipher-chainmode-ivmode[:ivopts]):
    aes-xts-plain64 -> crypto-aes, crypto-xts, crypto-ecb. The capture kernel cannot load them
    on demand. A hash comes in only where the kernel uses it (essiv:sha256): LUKS's own
    hashes (PBKDF2, the anti-forensic splitter, the digest) are computed by cryptsetup."""
    if cipher.startswith("capi:") or cipher in ("", "cipher_null-ecb"):
        return ()
    parts = cipher.split("-")
    ciphers, mode = parts[0].split(","), parts[1] if len(parts) > 1 else "cbc"
    iv, _, ivopts = (parts[2] if len(parts) > 2 else "").partition(":")
    names = [*ciphers, mode, *_MODE_NEEDS.get(mode, ())]
    if iv == "essiv":
        names += ["essiv", ivopts or "sha256"]
    return tuple(dict.fromkeys(f"crypto-{n}" for n in names if n))


def find_device(uuid: str) -> Path | None:
    """The block device holding LUKS volume `uuid` on this host, if it is visible."""
    link = Path("/dev/disk/by-uuid") / uuid
    if link.exists():
        return link.resolve()
    blkid = shutil.which("blkid")
    if blkid is None:
        return None
    proc = subprocess.run([blkid, "-U", uuid], capture_output=True, text=True, timeout=60)
    found = proc.stdout.strip()
    return Path(found) if proc.returncode == 0 and found else None


def active_keyslots(device: Path) -> tuple[int, ...]:
    """The header's keyslots; () when it cannot be read here."""
    try:
        return tuple(sorted(read_header(device).keyslots))
    except KdumpError:
        return ()


def read_record(key_file: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(record_path(key_file).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@register
@dataclass(frozen=True, kw_only=True)
class LuksLayer(Layer):
    type: ClassVar[str] = "luks"
    feature: ClassVar[str] = FEATURE
    schema: ClassVar[dict[str, Field]] = {
        "uuid": Field(str),
        # Where luks-setup put the key file: the default needs the UUID, so it is filled in
        # `make`.
        "key_file": Field(str, absolute_path=True),
        "name": Field(str),  # the dm name to open it as; the capture kernel's own choice
    }

    uuid: str
    # The storage is the volume: the config's key file and dm name (`name:`; `name` is what
    # logs call a layer) do not make another layer, so a detected stack agrees with the config.
    key_file: str = field(compare=False)
    mapper: str | None = field(default=None, compare=False)
    # Host-only detection's record of the header's keyslots: one removed or added changes the
    # record, so `build --if-needed` rebuilds (and finds a recorded keyslot gone).
    keyslots: tuple[int, ...] = field(default=(), compare=False)

    @classmethod
    def check(cls, checker: Checker, key: str, values: dict[str, Any]) -> None:
        uuid = values["uuid"]
        if uuid is None:
            raise checker.fail(key, "a luks layer needs 'uuid' (cryptsetup luksUUID DEVICE)")
        if not _UUID.fullmatch(uuid.lower()):
            raise checker.fail(f"{key}.uuid", f"expected a LUKS UUID (8-4-4-4-12 hex digits); "
                               f"got {uuid!r}")  # fmt: skip
        name = values["name"]
        if name is not None and (not _MAPPER.fullmatch(name) or name in (".", "..")):
            raise checker.fail(f"{key}.name", f"expected a device-mapper name (letters, digits, "
                               f"'_', '.', '+', '-'); got {name!r}")  # fmt: skip

    @classmethod
    def make(cls, values: dict[str, Any]) -> Self:
        uuid = values["uuid"].lower()
        return cls(uuid=uuid, key_file=values["key_file"] or default_key_file(uuid),
                   mapper=values["name"])  # fmt: skip

    @property
    def name(self) -> str:
        return f"luks {self.uuid}"

    def shell_args(self, index: int) -> tuple[str, ...]:
        return (self.uuid, self.mapper or f"kdump-luks-{index}", image_key_path(self.uuid))

    def _header(self) -> Header | None:
        device = find_device(self.uuid)
        return read_header(device) if device is not None else None

    def kernel_modules(self) -> tuple[str, ...]:
        header = self._header()
        ciphers = [header.cipher] if header else [DEFAULT_CIPHER]
        # cryptsetup decrypts the keyslot's area with the kernel's crypto too.
        ciphers += [s.encryption for s in header.keyslots.values()] if header else []
        return tuple(dict.fromkeys(m for c in ciphers for m in cipher_modules(c)))

    def key_derivation(self, key_file: Path) -> dict[str, Any]:
        """Which keyslot the capture tries and what its key derivation costs: the slot
        luks-setup recorded, checked against the header where the device is visible. Without
        a record, cryptsetup tries every slot, so the dearest counts."""
        record = read_record(key_file) or {}
        number = record.get("keyslot")
        number = number if isinstance(number, int) else None
        header = self._header()
        if header is None:
            kdf = record.get("kdf") or {}
            return {"keyslot": number, "kdf": kdf.get("type"), "memory_kib": kdf.get("memory_kib")}
        if number is not None and number not in header.keyslots:
            raise KdumpError(f"luks {self.uuid}: keyslot {number}, which {key_file} was made "
                             "for, is no longer in the LUKS header (removed?): run `kdump-"
                             "mkinitrd luks-setup` again")  # fmt: skip
        slots = [header.keyslots[number]] if number is not None else header.keyslots.values()
        return {"keyslot": number, "kdf": ",".join(sorted({s.kdf for s in slots})),
                "memory_kib": max((s.memory_kib for s in slots), default=0)}  # fmt: skip

    def image_files(self, target_index: int, layer_index: int, root: Path) -> tuple[ImageFile, ...]:
        host = root / self.key_file.lstrip("/")
        try:
            key = host.read_bytes()
        except OSError as exc:
            raise KdumpError(f"luks {self.uuid}: cannot read the key file {self.key_file}: "
                             f"{exc.strerror} (make it with `kdump-mkinitrd luks-setup "
                             "DEVICE`)") from None  # fmt: skip
        # The capture opens only this keyslot (the others' argon2 may not fit); `estimate`
        # counts its key derivation.
        info = {"uuid": self.uuid, **self.key_derivation(host)}
        path = image_key_path(self.uuid)
        return (
            ImageFile(FEATURE, path, key, host, f"{self.name}: key file", mode=0o600),
            # From luks-setup's record when there is one: a new record means a rebuild.
            ImageFile(FEATURE, path.removesuffix(".key") + ".json",
                      (json.dumps(info, indent=1) + "\n").encode(),
                      record_path(host) if record_path(host).exists() else host,
                      f"{self.name}: its keyslot and key derivation", mode=0o600),
        )  # fmt: skip

    @classmethod
    def detect(cls, sysdir: Path) -> tuple[Self, list[Path]] | None:
        found = _DM_UUID.fullmatch(_read(sysdir / "dm" / "uuid"))
        if found is None:
            return None
        h = found.group(1).lower()
        uuid = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        slaves = sysdir / "slaves"
        below = [s.resolve() for s in sorted(slaves.iterdir())] if slaves.is_dir() else []
        # Identity is the UUID: the host's dm name and key file are not the stack's.
        slots = active_keyslots(Path("/dev", below[0].name)) if len(below) == 1 else ()
        return cls(uuid=uuid, key_file=default_key_file(uuid), keyslots=slots), below
