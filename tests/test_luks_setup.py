"""`luks-setup` and the luks layer on real LUKS headers in plain files (cryptsetup formats,
adds keys to and dumps a file without device-mapper; opening needs it: test_luks_block.py)."""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import pytest

from kdump_mkinitrd import storage
from kdump_mkinitrd.arming.crashmemory import LUKS_OPEN_MB, estimate, luks_mb
from kdump_mkinitrd.cli import main
from kdump_mkinitrd.config import parse
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.cpio import Entry, Member, read_newc, write_newc
from kdump_mkinitrd.image.inspect_image import load_image, report
from kdump_mkinitrd.storage.base import Layer
from kdump_mkinitrd.storage.luks import LuksLayer, active_keyslots, cipher_modules, read_header
from kdump_mkinitrd.targets.disk import DiskTarget
from tests.conftest import Kernel
from tests.test_build import DISK_CONFIG, build_args, write_config

PASSPHRASE = "correct horse"


def _cryptsetup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["cryptsetup", *args], capture_output=True, text=True, timeout=120)


PBKDF2 = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")  # cheap: the test's own


def luks_format(device: Path | str, passphrase: Path, *options: str) -> None:
    """luksFormat with a passphrase keyslot (cheap PBKDF2 unless `options` say otherwise)."""
    passphrase.write_text(PASSPHRASE)
    made = _cryptsetup("luksFormat", "--batch-mode", *(options or PBKDF2), "--key-file",
                       str(passphrase), str(device))  # fmt: skip
    assert made.returncode == 0, made.stderr


def luks_volume(folder: Path, version: int = 2, *options: str) -> tuple[Path, Path]:
    """A LUKS volume in a file."""
    volume, passphrase = folder / f"luks{version}.img", folder / "passphrase"
    with volume.open("wb") as f:
        f.truncate(24 * 2**20)
    kdf = PBKDF2 if version == 2 else PBKDF2[2:]  # LUKS1 knows only PBKDF2
    luks_format(volume, passphrase, "--type", f"luks{version}", *kdf, *options)
    return volume, passphrase


def opens(volume: Path, key: Path, slot: int | None = None) -> bool:
    which = ("--key-slot", str(slot)) if slot is not None else ()
    args = ("open", "--test-passphrase", *which, "--key-file", str(key), str(volume))
    return _cryptsetup(*args).returncode == 0


def setup(volume: Path, passphrase: Path, key: Path, *more: str) -> int:
    return main(["luks-setup", str(volume), "--key-file", str(key), "--unlock-key-file",
                 str(passphrase), "--iter-time", "50", *more])  # fmt: skip


@pytest.mark.parametrize("version", [2, 1])
def test_setup_adds_a_pbkdf2_keyslot_and_a_private_key_file(
    version: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    volume, passphrase = luks_volume(tmp_path, version)
    key = tmp_path / "keys" / "capture.key"
    assert setup(volume, passphrase, key) == 0
    header = read_header(volume)
    record = json.loads((tmp_path / "keys" / "capture.key.json").read_text())
    slot = record["keyslot"]
    assert slot == 1 and set(header.keyslots) == {0, 1}
    # The key derivation needs no memory: no argon2, whatever LUKS2 would pick by default.
    assert header.keyslots[slot].kdf == "pbkdf2" and header.keyslots[slot].memory_kib == 0
    assert record["kdf"]["type"] == "pbkdf2" and record["kdf"]["memory_kib"] == 0
    assert record["uuid"] == header.uuid and record["luks_version"] == version
    assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_size == 64
    assert key.parent.stat().st_mode & 0o777 == 0o700
    assert opens(volume, key, slot) and not opens(volume, key, 0)
    assert active_keyslots(volume) == (0, 1) and active_keyslots(tmp_path / "none") == ()
    assert f"added keyslot 1 (pbkdf2) to LUKS{version} {header.uuid}" in capsys.readouterr().out


def test_an_existing_key_file_is_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    volume, passphrase = luks_volume(tmp_path)
    key = tmp_path / "keys" / "capture.key"
    assert setup(volume, passphrase, key) == 0
    before = key.read_bytes()
    capsys.readouterr()
    assert setup(volume, passphrase, key) == 1
    assert f"{key} exists already and is never overwritten" in capsys.readouterr().err
    assert key.read_bytes() == before and set(read_header(volume).keyslots) == {0, 1}


def test_remove_takes_the_keyslot_and_the_key_file_away(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    volume, passphrase = luks_volume(tmp_path)
    key = tmp_path / "keys" / "capture.key"
    assert setup(volume, passphrase, key) == 0
    kept = tmp_path / "kept.key"
    kept.write_bytes(key.read_bytes())
    assert main(["luks-setup", str(volume), "--key-file", str(key), "--remove"]) == 0
    assert "removed the keyslot" in capsys.readouterr().out
    assert set(read_header(volume).keyslots) == {0}
    assert not key.exists() and not (tmp_path / "keys" / "capture.key.json").exists()
    assert not opens(volume, kept) and opens(volume, passphrase)
    # A keyslot killed by hand: --remove still clears the key file away.
    assert setup(volume, passphrase, key) == 0
    killed = _cryptsetup("luksKillSlot", "--key-file", str(passphrase), str(volume), "1")
    assert killed.returncode == 0, killed.stderr
    assert main(["luks-setup", str(volume), "--key-file", str(key), "--remove"]) == 0
    assert f"{key} opened no keyslot of {volume} any more" in capsys.readouterr().out
    assert not key.exists() and set(read_header(volume).keyslots) == {0}


def test_errors_name_the_device_and_the_cause(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    volume, passphrase = luks_volume(tmp_path)
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(2**20))
    key = tmp_path / "keys" / "capture.key"
    assert setup(plain, passphrase, key) == 1
    assert f"luks-setup: {plain}: not a LUKS device" in capsys.readouterr().err
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase")
    assert setup(volume, wrong, key) == 1
    err = capsys.readouterr().err
    assert (
        f"luks-setup {volume}: cryptsetup luksAddKey failed (exit status 2): the existing "
        "passphrase or key was not accepted" in err
    )
    # No key file is left that no keyslot opens.
    assert not key.exists() and set(read_header(volume).keyslots) == {0}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert setup(volume, passphrase, key) == 1
    assert "cryptsetup not found (Debian: apt-get install cryptsetup-bin" in capsys.readouterr().err


def test_the_header_names_the_cipher_modules(tmp_path: Path) -> None:
    volume, _ = luks_volume(tmp_path, 2, "--cipher", "aes-cbc-essiv:sha256")
    header = read_header(volume)
    assert header.cipher == "aes-cbc-essiv:sha256"
    assert cipher_modules(header.cipher) == ("crypto-aes", "crypto-cbc", "crypto-essiv",
                                             "crypto-sha256")  # fmt: skip
    assert cipher_modules("aes-xts-plain64") == ("crypto-aes", "crypto-xts", "crypto-ecb")
    assert cipher_modules("xchacha12,aes-adiantum-plain64") == (
        "crypto-xchacha12", "crypto-aes", "crypto-adiantum", "crypto-nhpoly1305",
    )  # fmt: skip


def _stack(item: str) -> str:
    target = "  - type: disk\n    device: UUID=1234\n    fstype: ext4\n"
    return f"targets:\n{target}    stack:\n      - {item}\n"


UUID = "b76ea54a-87bf-483b-acbc-d652ae058b1c"


def _layer(item: str) -> Layer:
    target = parse(_stack(item), "k.yaml").targets[0]
    assert isinstance(target, DiskTarget)
    return target.stack[0]


def test_config_layer_and_its_errors() -> None:
    layer = _layer(f"{{type: luks, uuid: {UUID.upper()}}}")
    assert isinstance(layer, LuksLayer) and layer.name == f"luks {UUID}"
    assert layer.shell_args(3) == (UUID, "kdump-luks-3", f"/etc/kdump/luks/{UUID}.key")
    assert layer.key_file == f"/etc/kdump-mkinitrd/luks/{UUID}.key"
    named = _layer(f"{{type: luks, uuid: {UUID}, name: crypt, key_file: /k}}")
    assert named.shell_args(0)[1:] == ("crypt", f"/etc/kdump/luks/{UUID}.key")
    # What host-only detection finds for this volume agrees with both.
    assert named == layer == LuksLayer(uuid=UUID, key_file="/elsewhere")
    for item, message in [
        ("{type: luks}", "k.yaml:6: key 'targets[0].stack[0]': a luks layer needs 'uuid'"),
        ("{type: luks, uuid: abcd-1234}", "key 'targets[0].stack[0].uuid': expected a LUKS UUID"),
        (f"{{type: luks, uuid: {UUID}, name: 'a b'}}", "stack[0].name': expected a device-"),
        (f"{{type: luks, uuid: {UUID}, key_file: k}}", "must be an absolute path"),
    ]:
        with pytest.raises(KdumpError, match=re.escape(message)):
            parse(_stack(item), "k.yaml")
    assert "luks" in storage.TYPES


def _members(entries: list[Entry]) -> list[Member]:
    out = io.BytesIO()
    write_newc(entries, out)
    return read_newc(out.getvalue())


def test_image_files_hold_the_key_and_what_estimate_counts(tmp_path: Path) -> None:
    volume, passphrase = luks_volume(tmp_path)
    key = tmp_path / "keys" / "capture.key"
    assert setup(volume, passphrase, key) == 0
    uuid = read_header(volume).uuid
    layer = LuksLayer(uuid=uuid, key_file=str(key))
    files = layer.image_files(0, 0, Path("/"))
    assert [(f.path, f.mode) for f in files] == [
        (f"/etc/kdump/luks/{uuid}.key", 0o600), (f"/etc/kdump/luks/{uuid}.json", 0o600)
    ]  # fmt: skip
    assert files[0].data == key.read_bytes()
    assert json.loads(files[1].data) == {"uuid": uuid, "keyslot": 1, "kdf": "pbkdf2",
                                         "memory_kib": 0}  # fmt: skip
    entries = [Entry(f.path.lstrip("/"), "file", f.mode, f.data) for f in files]
    assert luks_mb(_members(entries)) == LUKS_OPEN_MB
    # An argon2 keyslot costs its memory: 64 MiB here.
    argon = json.dumps({"uuid": uuid, "keyslot": 2, "kdf": "argon2id", "memory_kib": 65536})
    entries.append(Entry("etc/kdump/luks/other.json", "file", 0o600, argon.encode()))
    assert luks_mb(_members(entries)) == LUKS_OPEN_MB + 64 and luks_mb(_members(entries[:1])) == 0
    key.unlink()
    with pytest.raises(KdumpError, match=f"luks {uuid}: cannot read the key file {key}"):
        layer.image_files(0, 0, Path("/"))


def test_the_image_holds_the_key_cryptsetup_and_the_cipher_modules(
    kernel61: Kernel, tmp_path: Path
) -> None:
    volume, passphrase = luks_volume(tmp_path)
    key = tmp_path / "keys" / "capture.key"
    assert setup(volume, passphrase, key) == 0
    uuid = read_header(volume).uuid
    # The volume is a file here, so the build cannot see its header: the default cipher's
    # modules, and the key derivation luks-setup recorded.
    stack = f"{{type: luks, uuid: {uuid}, key_file: {key}}}"
    config = DISK_CONFIG.replace("    fstype: ext4\n", f"    fstype: ext4\n    stack: [{stack}]\n")
    image = tmp_path / "k.img"
    assert main(build_args(kernel61, write_config(tmp_path, config), image)) == 0
    assert image.stat().st_mode & 0o777 == 0o600
    info = report(image)
    entries = {e["path"]: e for e in info["entries"]}
    held = entries[f"/etc/kdump/luks/{uuid}.key"]
    assert (held["mode"], held["size"]) == ("0600", 64)
    assert "luks" in info["features"]
    assert any(path.endswith("/lib/kdump/hooks/30-luks-layer.sh") for path in entries)
    assert any(path.endswith("/cryptsetup") for path in entries)
    modules = {m["name"]: m for m in info["kernel_modules"]}
    assert {"dm_crypt", "xts", "ecb", "algif_skcipher"} <= set(modules), sorted(modules)
    assert f"luks {uuid}" in str(modules["xts"])
    loaded = load_image(image)
    assert luks_mb(loaded.members) == LUKS_OPEN_MB
    assert estimate(image, None).luks_mb == LUKS_OPEN_MB
    init = "\n".join(m.data.decode(errors="replace") for m in loaded.members
                     if "/kdump/hooks/" in m.path)  # fmt: skip
    assert f"kdump_stack_layer luks {uuid} kdump-luks-0 /etc/kdump/luks/{uuid}.key" in init
