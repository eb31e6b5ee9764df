"""Every peer configuration under tests/data/import/ run through `import-config`, for
tests/test_import_config.py, which compares each result with its file in
tests/data/import/expected/.

Run as a program inside a mount namespace where /srv is a filesystem the test made and /var
is a tmpfs (see `imported_in_namespace`), so that the folders the fixtures name resolve the
same way on every host, whatever its own filesystems: `python -m tests.import_golden
OUT.json`. With `--write`, it writes the expected files instead (then read every change
before committing it).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

from kdump_mkinitrd import config as config_mod
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.importing import command

DATA = Path(__file__).resolve().parent / "data" / "import"
EXPECTED = DATA / "expected"
# The filesystem on /srv while the cases run: in the files, its loop device is @LOOP@
# (@LOOPNAME@) and the folder of its image @WORK@.
SRV_UUID = "0b5e2c3a-7d4f-4e1a-9c8b-6f5a4d3c2b1a"
LOCK = Path("/tmp/kdump-mkinitrd-import-golden.lock")


# Pins the root filesystem of the host it runs on: tests/test_import_config.py checks it alone.
HOST_DEPENDENT = ("xfs-label-rootfs-fallback.conf",)


def cases() -> dict[str, tuple[str, list[str]]]:
    """Case name → (peer, files relative to DATA)."""
    out: dict[str, tuple[str, list[str]]] = {}
    for peer in ("kdump-utils", "kdump-tools", "suse"):
        for conf in sorted((DATA / peer).glob("*.conf")):
            if conf.name not in HOST_DEPENDENT:
                out[f"{peer}--{conf.stem}"] = (peer, [f"{peer}/{conf.name}"])
    out["kdump-utils--default"] = (
        "kdump-utils",
        ["kdump-utils/default/kdump.conf", "kdump-utils/default/sysconfig-kdump"],
    )
    out["kdump-utils--ext4-uuid-hooks+sysconfig"] = (
        "kdump-utils",
        ["kdump-utils/ext4-uuid-hooks.conf", "kdump-utils/sysconfig-kdump-custom"],
    )
    out["suse--default"] = ("suse", ["suse/default/sysconfig-kdump"])
    return out


def run_case(peer: str, files: list[str]) -> dict[str, object]:
    """What `import-config --from PEER FILES` prints, run from DATA so that names are short."""
    module = command.PEERS[peer]
    paths = [Path(f) for f in files]
    try:
        draft, text = command.run(module, paths)
        config_mod.parse(text, "the imported config")
    except KdumpError as exc:
        return {"code": 1, "yaml": "", "report": f"error: {exc}\n"}
    report = "\n".join(command.report_lines(module, paths, draft)) + "\n"
    return {"code": 0 if draft.complete else 2, "yaml": text, "report": report}


def imported_in_namespace(work: Path) -> dict[str, dict[str, object]]:
    """Every case's result, run in a private mount namespace with a fresh ext4 (UUID
    SRV_UUID) on /srv and a tmpfs on /var, with @LOOP@ and @WORK@ for the ext4's loop device
    and folder."""
    image = work / "srv.img"
    with image.open("wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", SRV_UUID, str(image)], check=True)
    out = work / "results.json"
    script = (
        'set -e; mount --make-rprivate /; loop=$(losetup -f --show "$1"); '
        'mount "$loop" /srv; echo "$loop" > "$2.loop"; mount -t tmpfs tmpfs /var; '
        f'cd {DATA}; exec "{sys.executable}" -m tests.import_golden "$2"'
    )
    loop = out.with_suffix(".json.loop")
    # One run at a time on this machine: two filesystems with the same UUID at once would
    # let a lookup by UUID find the other run's device.
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _run_in_namespace(script, image, out, loop)
    device = loop.read_text().strip()
    text = out.read_text()
    text = text.replace(device, "@LOOP@").replace(Path(device).name, "@LOOPNAME@")
    text = text.replace(str(work), "@WORK@")
    results: dict[str, dict[str, object]] = json.loads(text)
    return results


def _run_in_namespace(script: str, image: Path, out: Path, loop: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    try:
        subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(image), str(out)],
                       check=True, env=env)  # fmt: skip
    finally:
        if loop.exists():
            subprocess.run(["losetup", "-d", loop.read_text().strip()], check=False)


def main(argv: list[str]) -> int:
    results = {name: run_case(peer, files) for name, (peer, files) in cases().items()}
    Path(argv[0]).write_text(json.dumps(results, indent=1))
    return 0


def write_expected(work: Path) -> None:
    """Write the expected files from this host's results."""
    EXPECTED.mkdir(exist_ok=True)
    for name, result in imported_in_namespace(work).items():
        for part in ("yaml", "report"):
            (EXPECTED / f"{name}.{part}").write_text(str(result[part]))
        (EXPECTED / f"{name}.code").write_text(f"{result['code']}\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write_expected(Path(sys.argv[2]))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
