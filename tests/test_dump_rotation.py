"""keep, min_free and the dump directory's name, run by the real busybox sh on real
directories and filesystems: the functions on their own, and through the capture path
(kdump_capture_on) that the disk and NFS targets run."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdump_mkinitrd.capture.vmcore_json import base_record, problems
from tests.test_capture_lib_sh import capture_hooks, mounted, needs_root, run_sh, use_vmcore
from tests.test_vmcore import prb_core

LONG_SOURCE = "nas.example.org:/srv/crash/exports/kdump-shared-by-several-hosts"


def own_record(hostname: str, crash_time: int | None, indent: int | None = 2) -> str:
    record = base_record("static", hostname, "disk:/dev/vdb")
    record.update({"collector": "dd", "format": "elf", "dump_level": 31,
                   "kernel_release": "6.1.0-test", "crash_time": crash_time,
                   "vmcore_size": 1, "sha256": "0" * 64})  # fmt: skip
    return json.dumps(record, indent=indent) + "\n"


def make_dump(parent: Path, name: str, *, complete: bool = True, record: str | None = None) -> Path:
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / ("vmcore" if complete else "vmcore.incomplete")).write_bytes(b"x")
    if record is not None:
        (folder / "vmcore.json").write_text(record)
    return folder


def lib(keep: int = 0, min_free: int = 0, hostname: str = "web1", **kwargs: object) -> str:
    text = f"capture: {{keep: {keep}, min_free: {min_free}}}\n"
    return capture_hooks(text, hostname=hostname, **kwargs)  # type: ignore[arg-type]


# What a shared export holds: web1's own dumps, whose crash times (in vmcore.json) do not
# follow their names, beside everything keep must never touch.
OWN = {  # name: crash_time
    "web1-2026-01-03-00:00:00": 1767398400,  # 3 Jan
    "web1-2026-01-01-00:00:00": 1767484800,  # 4 Jan: a clock that was wrong at capture
    "web1-2026-01-02-00:00:00.1": None,  # no crash time: the name's stamp, 2 Jan, counts
    "web1-2026-01-05-00:00:00": 1767571200,  # 5 Jan
}
FOREIGN = {
    "alpha-2026-01-01-00:00:00": True,  # another host, sorting first
    "web1-foo-2026-01-01-00:00:00": True,  # host web1-foo, not web1
    "127.0.0.1-2026-01-01-00:00:00": False,  # another tool's folder (no vmcore.json)
    "web1-2025-12-31-00:00:00": False,  # named like web1's, vmcore.json not this tool's
    "web1-2025-12-30-00:00:00.x": True,  # not a name kdump_new_dump_dir makes
    "web1-notadate": True,
}


def shared_export(parent: Path) -> None:
    for name, crash_time in OWN.items():
        make_dump(parent, name, record=own_record("web1", crash_time))
    make_dump(parent, "web1-2025-01-01-00:00:00", complete=False,
              record=own_record("web1", 1))  # fmt: skip
    for name, ours in FOREIGN.items():
        host = name.rsplit("-2", 1)[0]
        make_dump(parent, name, record=own_record(host, 1) if ours else '{"sha256": "x"}')
    # A link named like one of web1's dumps, to a complete dump elsewhere.
    elsewhere = make_dump(parent.parent, "elsewhere", record=own_record("web1", 1))
    (parent / "web1-2025-06-01-00:00:00").symlink_to(elsewhere)


NEVER_PRUNED = [*FOREIGN, "web1-2025-01-01-00:00:00", "web1-2025-06-01-00:00:00"]
KEPT_ALWAYS = sorted([*NEVER_PRUNED, "web1-2026-02-01-00:00:00"])


@pytest.mark.parametrize(("keep", "own_left"), [
    (1, []),  # only the new one
    (2, ["web1-2026-01-05-00:00:00"]),
    (3, ["web1-2026-01-01-00:00:00", "web1-2026-01-05-00:00:00"]),  # 4 Jan beats 3 Jan
    (4, ["web1-2026-01-01-00:00:00", "web1-2026-01-03-00:00:00", "web1-2026-01-05-00:00:00"]),
    (0, list(OWN)),
    (9, list(OWN)),
])  # fmt: skip
def test_keep_prunes_only_this_hosts_own_dumps_oldest_crash_first(
    keep: int, own_left: list[str], tmp_path: Path
) -> None:
    parent = tmp_path / "crash dir"  # a space, to prove nothing is word-split
    shared_export(parent)
    new = make_dump(parent, "web1-2026-02-01-00:00:00", record=own_record("web1", 1769904000))
    result = run_sh(tmp_path, lib(keep) + f'kdump_prune "{parent}" "{new}"\n')
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in parent.iterdir()) == sorted(KEPT_ALWAYS + own_left)
    assert (tmp_path / "elsewhere" / "vmcore").is_file()


def test_keep_reads_records_on_one_line(tmp_path: Path) -> None:
    """A record written by another program (a test fault, a migration) may be compact JSON."""
    parent = tmp_path / "crash"
    for name, crash_time in (("web1-2026-01-01-00:00:00", 30), ("web1-2026-01-02-00:00:00", 10),
                             ("web1-2026-01-03-00:00:00", 20)):  # fmt: skip
        make_dump(parent, name, record=own_record("web1", crash_time, indent=None))
    new = make_dump(parent, "web1-2026-01-04-00:00:00", record=own_record("web1", 40, None))
    result = run_sh(tmp_path, lib(2) + f'kdump_prune "{parent}" "{new}"\n')
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in parent.iterdir()) == [
        "web1-2026-01-01-00:00:00", "web1-2026-01-04-00:00:00"
    ]  # fmt: skip


def test_keep_with_a_hostname_full_of_pattern_characters(tmp_path: Path) -> None:
    parent = tmp_path / "crash"
    for name in ("w*[a]?-2026-01-01-00:00:00", "wX[a]?-2026-01-02-00:00:00",
                 "w*a?-2026-01-03-00:00:00", "w*[a]?-2026-01-04-00:00:00"):  # fmt: skip
        make_dump(parent, name, record=own_record(name[:-20], 1))
    new = make_dump(parent, "w*[a]?-2026-01-05-00:00:00", record=own_record("w*[a]?", 2))
    result = run_sh(tmp_path, lib(2, hostname="w*[a]?") + f'kdump_prune "{parent}" "{new}"\n')
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in parent.iterdir()) == [
        "w*[a]?-2026-01-04-00:00:00", "w*[a]?-2026-01-05-00:00:00",
        "w*a?-2026-01-03-00:00:00", "wX[a]?-2026-01-02-00:00:00",
    ]  # fmt: skip


def test_min_free_refuses_a_full_target(tmp_path: Path) -> None:
    ok = run_sh(tmp_path, lib(min_free=1) + f'kdump_enough_space "{tmp_path}" && echo fits\n')
    assert "fits" in ok.stdout, ok.stdout + ok.stderr
    refused = run_sh(
        tmp_path, lib(min_free=10**9) + f'kdump_enough_space "{tmp_path}" || echo refused\n'
    )
    assert "refused" in refused.stdout and "min_free is 1000000000 MB" in refused.stdout


@needs_root
def test_min_free_with_a_long_mount_source(tmp_path: Path) -> None:
    """busybox df puts a long source on a line of its own; the free column must not move."""
    with mounted(LONG_SOURCE, tmp_path / "mnt", "-t", "tmpfs", "-o", "size=8m") as mnt:
        refused = run_sh(tmp_path, lib(min_free=16) + f'kdump_enough_space "{mnt}" || echo no\n')
        assert "no" in refused.stdout.split(), refused.stdout + refused.stderr
        assert "only 8 MB free on" in refused.stdout, refused.stdout
        fits = run_sh(tmp_path, lib(min_free=4) + f'kdump_enough_space "{mnt}" && echo fits\n')
        assert "fits" in fits.stdout, fits.stdout + fits.stderr


@contextlib.contextmanager
def target(tmp: Path, source: str = "target", size: str = "64m") -> Iterator[Path]:
    """A mounted tmpfs, as a disk target is mounted before kdump_capture_on; the capture
    unmounts it, so it is bind-mounted from a folder the test then reads."""
    with mounted(source, tmp / "fs", "-t", "tmpfs", "-o", f"size={size}") as fs:
        (tmp / "mnt").mkdir()
        yield fs


def capture_on(tmp: Path, script: str, fs: Path, core: Path) -> str:
    # The bind mount is made inside the capture's own mount namespace; it unmounts it.
    result = run_sh(tmp, script + use_vmcore() + f'mount -o bind "{fs}" "{tmp}/mnt" && '
                    f'kdump_capture_on "{tmp}/mnt" /crash; echo "status $?"\n', core)  # fmt: skip
    return result.stdout + result.stderr


@needs_root
def test_the_capture_applies_keep(tmp_path: Path) -> None:
    core = tmp_path / "vmcore"
    core.write_bytes(prb_core(fill=True))
    with target(tmp_path) as fs:
        shared_export(fs / "crash")
        before = {p.name for p in (fs / "crash").iterdir()}
        out = capture_on(tmp_path, lib(2), fs, core)
        assert "status 0" in out, out
        new = sorted({p.name for p in (fs / "crash").iterdir()} - before)
        assert len(new) == 1, new
        dump = fs / "crash" / new[0]
        assert (dump / "vmcore").read_bytes() == core.read_bytes()
        record = json.loads((dump / "vmcore.json").read_text())
        assert problems(record) == [] and record["crash_time"] == 1700000000
        assert (dump / "kdump-init.log").is_file()
        names = sorted(p.name for p in (fs / "crash").iterdir())
        assert names == sorted([*NEVER_PRUNED, "web1-2026-01-05-00:00:00", new[0]])
        assert "keep=2: removing the oldest dump of web1" in out


@needs_root
def test_the_capture_applies_min_free_on_a_long_source(tmp_path: Path) -> None:
    core = tmp_path / "vmcore"
    core.write_bytes(prb_core(fill=True))
    with target(tmp_path, LONG_SOURCE, "8m") as fs:
        out = capture_on(tmp_path, lib(min_free=16), fs, core)
        assert "status 1" in out and "min_free is 16 MB" in out, out
        assert list(fs.iterdir()) == []  # refused before anything was written


def stamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%d-%H:%M:%S", time.gmtime(epoch))


@needs_root
def test_a_taken_name_gets_the_next_number(tmp_path: Path) -> None:
    """Every name of the next two minutes is taken, and its .1 too: the new dump goes to .2,
    nothing that was there is touched, and keep counts the numbered dump as web1's own."""
    core = tmp_path / "vmcore"
    core.write_bytes(prb_core(fill=True))
    with target(tmp_path) as fs:
        now = time.time()
        taken = [f"web1-{stamp(now + s)}{n}" for s in range(-5, 120) for n in ("", ".1")]
        for name in taken:
            make_dump(fs / "crash", name, record=own_record("web1", int(now) - 10**6))
        out = capture_on(tmp_path, lib(len(taken) + 1), fs, core)
        assert "status 0" in out, out
        new = sorted(set(p.name for p in (fs / "crash").iterdir()) - set(taken))
        assert len(new) == 1 and new[0].endswith(".2"), new
        assert new[0][:-2] in taken
        assert (fs / "crash" / new[0] / "vmcore").read_bytes() == core.read_bytes()
        for name in taken:
            assert (fs / "crash" / name / "vmcore").read_bytes() == b"x"
        # keep: one fewer than there are now; the oldest crash goes, never the new one.
        oldest = min(taken)
        make_dump(fs / "crash", "web1-2000-01-01-00:00:00.2", record=own_record("web1", 1))
        script = lib(len(taken) + 1) + f'kdump_prune "{fs}/crash" "{fs}/crash/{new[0]}"\n'
        result = run_sh(tmp_path, script)
        assert not (fs / "crash" / "web1-2000-01-01-00:00:00.2").exists(), result.stdout
        assert (fs / "crash" / new[0]).is_dir() and (fs / "crash" / oldest).is_dir()
