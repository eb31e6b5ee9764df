"""ElfResolver against the real dynamic loader, gcc-built fixtures and small sysroots.

The loader itself (LD_TRACE_LOADED_OBJECTS=1) is only used here, as the reference the
resolver must agree with.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.hostscan import elfdeps
from kdump_mkinitrd.hostscan.elfdeps import BinaryClosure, ElfResolver, Symlink

X86_64 = platform.machine() == "x86_64"
needs_x86_64 = pytest.mark.skipif(not X86_64, reason="fixture layout assumes x86_64 multiarch")

LEAF = "int leaf(void) { return 42; }\n"
MID = "int leaf(void);\nint mid(void) { return leaf(); }\n"
MAIN_LEAF = "int leaf(void);\nint main(void) { return leaf() == 42 ? 0 : 1; }\n"
MAIN_MID = "int mid(void);\nint main(void) { return mid() == 42 ? 0 : 1; }\n"
# No libc: sysroot fixtures then need nothing from the build host but what we copy.
START_LEAF = "int leaf(void);\nvoid _start(void) { leaf(); for (;;) {} }\n"
EM_AARCH64 = 183


# --- helpers -----------------------------------------------------------------------------


class Cc:
    """Compiles tiny C fixtures with the host gcc."""

    def __init__(self, tmp: Path) -> None:
        self.src = tmp / "src"
        self.src.mkdir()
        self.count = 0

    def _build(self, out: Path, code: str, flags: tuple[str, ...]) -> Path:
        self.count += 1
        source = self.src / f"f{self.count}.c"
        source.write_text(code)
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-o", str(out), str(source), *flags], check=True)
        return out

    def lib(self, out: Path, code: str, *flags: str) -> Path:
        return self._build(out, code, ("-shared", "-fPIC", *flags))

    def prog(self, out: Path, code: str, *flags: str) -> Path:
        return self._build(out, code, flags)


@pytest.fixture
def cc(tmp_path: Path) -> Cc:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    return Cc(tmp_path)


def has_interp(path: str) -> bool:
    with open(path, "rb") as stream:
        return any(seg["p_type"] == "PT_INTERP" for seg in ELFFile(stream).iter_segments())


def loader_view(program: str) -> tuple[list[str], set[str], int]:
    """Paths the real loader maps for ``program``, names it cannot find, and its exit code."""
    # A static binary would really run instead of being traced.
    assert has_interp(program), program
    done = subprocess.run(
        [program],
        env={"LD_TRACE_LOADED_OBJECTS": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    paths: list[str] = []
    missing: set[str] = set()
    for line in done.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith("linux-vdso"):
            continue
        if line.endswith("=> not found"):
            missing.add(line.split()[0])
            continue
        paths.append(line.split("=>", 1)[-1].rsplit(" (", 1)[0].strip())
    return paths, missing, done.returncode


def assert_matches_loader(
    program: Path | str, resolver: ElfResolver | None = None
) -> BinaryClosure:
    program = str(program)
    closure = (resolver or ElfResolver()).resolve([(program, "test")])
    paths, missing, code = loader_view(program)
    assert not missing and code == 0
    ours = {os.path.realpath(f.source) for f in closure.files}
    assert ours == {os.path.realpath(p) for p in paths} | {os.path.realpath(program)}
    return closure


def follow(path: str, closure: BinaryClosure) -> str:
    """Resolve ``path`` using only the closure's symlinks, as inside the image."""
    links = {link.path: link.target for link in closure.symlinks}
    pending = [part for part in path.split("/") if part]
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            resolved = resolved[:-1]
            continue
        candidate = "/" + "/".join([*resolved, part])
        if candidate not in links:
            resolved.append(part)
            continue
        hops += 1
        assert hops < 40, f"symlink loop in closure at {candidate}"
        target = links[candidate]
        if target.startswith("/"):
            resolved = []
        pending = [p for p in target.split("/") if p] + pending
    return "/" + "/".join(resolved)


def file_paths(closure: BinaryClosure) -> list[str]:
    return [f.path for f in closure.files]


def set_machine(path: Path, machine: int) -> None:
    data = bytearray(path.read_bytes())
    data[18:20] = machine.to_bytes(2, "little")
    path.write_bytes(bytes(data))


# --- real binaries -----------------------------------------------------------------------


def real_binaries() -> list[str]:
    names = [
        "/usr/bin/ssh",
        "/usr/bin/makedumpfile",
        "/usr/bin/python3.11",
        "/usr/bin/zstd",
        "/usr/sbin/mkfs.xfs",
        # DT_RPATH $ORIGIN:$ORIGIN/../lib
        "/usr/lib/jvm/java-17-openjdk-amd64/bin/java",
    ]
    # DT_RUNPATH $ORIGIN/../lib, and its libraries again use $ORIGIN from a "bin/../lib" path.
    names += sorted(glob.glob("/root/.rustup/toolchains/*/bin/rustc"))[:1]
    return names


@pytest.mark.parametrize("program", real_binaries())
def test_real_binary_matches_loader(program: str) -> None:
    if not os.path.exists(program):
        pytest.skip(f"{program} not installed")
    closure = assert_matches_loader(program)
    for item in closure.files:
        assert item.path == os.path.realpath(item.path)
        assert item.source == Path(item.path)
    paths, _, _ = loader_view(program)
    reachable = set(file_paths(closure))
    for needed in [program, *paths]:
        assert follow(needed, closure) in reachable, needed
    for link in closure.symlinks:
        assert os.readlink(link.path) == link.target


def test_many_deps_have_a_root_and_chain() -> None:
    if not os.path.exists("/usr/bin/ssh"):
        pytest.skip("ssh not installed")
    closure = ElfResolver().resolve([("ssh", "test")])
    assert len(closure.files) > 8
    assert closure.files[0].why == "requested by test"
    assert closure.files[1].why == "interpreter of /usr/bin/ssh"
    assert any(f.why.startswith("needed by /usr/lib") for f in closure.files)


def test_usr_merged_symlinks() -> None:
    program = "/usr/bin/python3.11"
    if not os.path.exists(program):
        pytest.skip("python3.11 not installed")
    closure = ElfResolver().resolve([(program, "test")])
    interp = "/lib64/ld-linux-x86-64.so.2"
    if not os.path.islink("/lib64") or not os.path.exists(interp):
        pytest.skip("not a usr-merged x86_64 system")
    assert Symlink("/lib64", os.readlink("/lib64")) in closure.symlinks
    # Whatever the ld-linux link really is here, it is recorded where it sits in the image.
    real_dir = os.path.realpath("/lib64")
    in_image = os.path.join(real_dir, "ld-linux-x86-64.so.2")
    if os.path.islink(in_image):
        assert Symlink(in_image, os.readlink(in_image)) in closure.symlinks
    assert follow(interp, closure) == os.path.realpath(interp)
    assert os.path.realpath(interp) in file_paths(closure)


def test_static_and_dynamic() -> None:
    resolver = ElfResolver()
    if not os.path.exists("/bin/busybox"):
        pytest.skip("busybox not installed")
    assert resolver.is_static("/bin/busybox")
    assert resolver.is_static("busybox")
    if os.path.exists("/usr/bin/python3.11"):
        assert not resolver.is_static("/usr/bin/python3.11")
    closure = resolver.resolve([("/bin/busybox", "test")])
    assert file_paths(closure) == [os.path.realpath("/bin/busybox")]


def test_is_static_rejects_scripts(tmp_path: Path) -> None:
    script = tmp_path / "hello"
    script.write_text("#!/bin/sh\necho hello\n")
    with pytest.raises(KdumpError, match="not an ELF file"):
        ElfResolver().is_static(str(script))


def test_each_elf_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    programs = [
        p for p in ("/usr/bin/ssh", "/usr/bin/python3.11", "/usr/bin/zstd") if os.path.exists(p)
    ]
    if len(programs) < 2:
        pytest.skip("need two dynamic programs")
    calls: Counter[str] = Counter()
    real = elfdeps._read_elf_info

    def counting(host_path: str) -> object:
        calls[host_path] += 1
        return real(host_path)

    monkeypatch.setattr(elfdeps, "_read_elf_info", counting)
    resolver = ElfResolver()
    resolver.resolve([(p, "test") for p in programs])
    resolver.resolve([(p, "again") for p in programs])
    assert calls and max(calls.values()) == 1


def test_deterministic_without_duplicates() -> None:
    programs = [
        (p, "test") for p in ("/usr/bin/ssh", "/usr/bin/python3.11", "/usr/bin/zstd", "/bin/sh")
    ]
    programs = [(p, w) for p, w in programs if os.path.exists(p)]
    first = ElfResolver().resolve(programs)
    second = ElfResolver().resolve(list(programs) + list(programs))
    assert first == second
    assert len(set(file_paths(first))) == len(first.files)
    assert len({s.path for s in first.symlinks}) == len(first.symlinks)


# --- gcc fixtures against the loader -------------------------------------------------------


def test_origin_runpath(cc: Cc, tmp_path: Path) -> None:
    lib = cc.lib(tmp_path / "app/lib/libleaf.so", LEAF)
    prog = cc.prog(
        tmp_path / "app/bin/prog",
        MAIN_LEAF,
        f"-L{lib.parent}",
        "-lleaf",
        "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib",
    )
    closure = assert_matches_loader(prog)
    assert str(lib) in file_paths(closure)
    assert "needed by " + str(prog) in {f.why for f in closure.files}


def test_braced_origin_through_symlinked_program(cc: Cc, tmp_path: Path) -> None:
    lib = cc.lib(tmp_path / "app/lib/libleaf.so", LEAF)
    prog = cc.prog(
        tmp_path / "app/bin/prog",
        MAIN_LEAF,
        f"-L{lib.parent}",
        "-lleaf",
        "-Wl,--enable-new-dtags,-rpath,${ORIGIN}/../lib",
    )
    # $ORIGIN of the executable is the directory of its real path, not of the link.
    link = tmp_path / "elsewhere/prog"
    link.parent.mkdir()
    link.symlink_to("../app/bin/prog")
    closure = assert_matches_loader(link)
    assert Symlink(str(link), "../app/bin/prog") in closure.symlinks
    assert file_paths(closure)[0] == str(prog)
    assert str(lib) in file_paths(closure)


@needs_x86_64
def test_lib_token(cc: Cc, tmp_path: Path) -> None:
    lib = cc.lib(tmp_path / "app/lib/x86_64-linux-gnu/libleaf.so", LEAF)
    prog = cc.prog(
        tmp_path / "app/bin/prog",
        MAIN_LEAF,
        f"-L{lib.parent}",
        "-lleaf",
        "-Wl,-rpath,$ORIGIN/../$LIB",
    )
    assert str(lib) in file_paths(assert_matches_loader(prog))


def build_mid_chain(cc: Cc, tmp: Path, dtags: str) -> Path:
    """prog -> libmid (no search path) -> libleaf, with libleaf only on prog's path list."""
    cc.lib(tmp / "leaf/libleaf.so", LEAF)
    cc.lib(tmp / "libs/libmid.so", MID, f"-L{tmp}/leaf", "-lleaf")
    return cc.prog(
        tmp / "bin/prog",
        MAIN_MID,
        f"-L{tmp}/libs",
        "-lmid",
        f"-Wl,-rpath-link,{tmp}/leaf",
        f"-Wl,{dtags},-rpath,{tmp}/libs:{tmp}/leaf",
    )


def test_rpath_applies_to_indirect_deps(cc: Cc, tmp_path: Path) -> None:
    prog = build_mid_chain(cc, tmp_path, "--disable-new-dtags")
    closure = assert_matches_loader(prog)
    assert str(tmp_path / "leaf/libleaf.so") in file_paths(closure)


def test_runpath_does_not_apply_to_indirect_deps(cc: Cc, tmp_path: Path) -> None:
    prog = build_mid_chain(cc, tmp_path, "--enable-new-dtags")
    _, missing, _ = loader_view(str(prog))
    assert missing == {"libleaf.so"}
    with pytest.raises(KdumpError, match=r"libleaf\.so needed by .*/libs/libmid\.so"):
        ElfResolver().resolve([(str(prog), "test")])


@pytest.mark.parametrize(
    ("mid_flags", "expected"),
    [
        pytest.param((), "leafA", id="no-path-inherits-prog-rpath"),
        pytest.param(("--disable-new-dtags", "leafB"), "leafB", id="own-rpath-first"),
        pytest.param(("--enable-new-dtags", "leafB"), "leafB", id="own-runpath"),
        pytest.param(("--enable-new-dtags", "empty"), None, id="runpath-hides-prog-rpath"),
    ],
)
def test_rpath_chain_and_runpath(
    cc: Cc, tmp_path: Path, mid_flags: tuple[str, ...], expected: str | None
) -> None:
    cc.lib(tmp_path / "leafA/libleaf.so", LEAF)
    cc.lib(tmp_path / "leafB/libleaf.so", LEAF)
    (tmp_path / "empty").mkdir()
    search = [f"-Wl,{mid_flags[0]},-rpath,{tmp_path}/{mid_flags[1]}"] if mid_flags else []
    cc.lib(tmp_path / "libs/libmid.so", MID, f"-L{tmp_path}/leafA", "-lleaf", *search)
    prog = cc.prog(
        tmp_path / "bin/prog",
        MAIN_MID,
        f"-L{tmp_path}/libs",
        "-lmid",
        f"-Wl,-rpath-link,{tmp_path}/leafA",
        f"-Wl,--disable-new-dtags,-rpath,{tmp_path}/libs:{tmp_path}/leafA",
    )
    if expected is None:
        assert loader_view(str(prog))[1] == {"libleaf.so"}
        with pytest.raises(KdumpError, match=r"libleaf\.so needed by"):
            ElfResolver().resolve([(str(prog), "test")])
        return
    closure = assert_matches_loader(prog)
    assert str(tmp_path / expected / "libleaf.so") in file_paths(closure)


def test_wrong_machine_candidate_is_skipped(cc: Cc, tmp_path: Path) -> None:
    good = cc.lib(tmp_path / "good/libleaf.so", LEAF)
    bad = tmp_path / "bad/libleaf.so"
    bad.parent.mkdir()
    shutil.copy(good, bad)
    set_machine(bad, EM_AARCH64)
    prog = cc.prog(
        tmp_path / "prog",
        MAIN_LEAF,
        f"-L{good.parent}",
        "-lleaf",
        f"-Wl,-rpath,{bad.parent}:{good.parent}",
    )
    closure = assert_matches_loader(prog)
    assert str(good) in file_paths(closure)
    assert str(bad) not in file_paths(closure)


def test_non_elf_candidate_is_an_error(cc: Cc, tmp_path: Path) -> None:
    good = cc.lib(tmp_path / "good/libleaf.so", LEAF)
    bad = tmp_path / "bad/libleaf.so"
    bad.parent.mkdir()
    bad.write_text("garbage\n")
    prog = cc.prog(
        tmp_path / "prog",
        MAIN_LEAF,
        f"-L{good.parent}",
        "-lleaf",
        f"-Wl,-rpath,{bad.parent}:{good.parent}",
    )
    assert loader_view(str(prog))[2] != 0  # the loader gives up too
    with pytest.raises(KdumpError, match=r"bad/libleaf\.so .*not an ELF file"):
        ElfResolver().resolve([(str(prog), "test")])


def test_nodeflib_skips_default_dirs(cc: Cc, tmp_path: Path) -> None:
    if not glob.glob("/usr/lib/*/libz.so.1") + glob.glob("/usr/lib*/libz.so.1"):
        pytest.skip("libz not installed")
    lib = cc.lib(
        tmp_path / "lib/libmid.so",
        "const char *zlibVersion(void);\nint mid(void) { return zlibVersion()[0]; }\n",
        "-l:libz.so.1",
        "-Wl,-z,nodefaultlib",
    )
    prog = cc.prog(
        tmp_path / "prog", MAIN_MID, f"-L{lib.parent}", "-lmid", f"-Wl,-rpath,{lib.parent}"
    )
    assert loader_view(str(prog))[1] == {"libz.so.1"}
    with pytest.raises(KdumpError, match=r"libz\.so\.1 needed by .*libmid\.so"):
        ElfResolver().resolve([(str(prog), "test")])


# --- errors ------------------------------------------------------------------------------


def test_unknown_program() -> None:
    resolver = ElfResolver(search_path="/usr/bin:/bin")
    with pytest.raises(KdumpError, match=r"no-such-kdump-tool.*/usr/bin:/bin"):
        resolver.find_program("no-such-kdump-tool")
    with pytest.raises(KdumpError, match="no-such-kdump-tool"):
        resolver.resolve([("no-such-kdump-tool", "test")])
    with pytest.raises(KdumpError, match="/nonexistent/tool"):
        resolver.find_program("/nonexistent/tool")
    with pytest.raises(KdumpError, match="absolute"):
        resolver.find_program("bin/sh")


def test_missing_library(cc: Cc, tmp_path: Path) -> None:
    lib = cc.lib(tmp_path / "lib/libleaf.so", LEAF)
    prog = cc.prog(
        tmp_path / "prog", MAIN_LEAF, f"-L{lib.parent}", "-lleaf", f"-Wl,-rpath,{lib.parent}"
    )
    lib.unlink()
    with pytest.raises(KdumpError, match=rf"libleaf\.so needed by {re.escape(str(prog))}"):
        ElfResolver().resolve([(str(prog), "test")])


def test_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(KdumpError, match="loop"):
        ElfResolver().resolve([(str(tmp_path / "a"), "test")])


def test_find_program_follows_path_order() -> None:
    if not os.path.exists("/usr/bin/python3.11"):
        pytest.skip("python3.11 not installed")
    assert ElfResolver().find_program("python3.11") == "/usr/bin/python3.11"
    assert ElfResolver(search_path="/bin:/usr/bin").find_program("python3.11") == "/bin/python3.11"


# --- scripts -----------------------------------------------------------------------------


def test_shell_script_pulls_in_its_interpreter(tmp_path: Path) -> None:
    script = tmp_path / "hello"
    script.write_text("#!/bin/sh -e\necho hello\n")
    closure = ElfResolver().resolve([(str(script), "the test")])
    assert closure.files[0].path == str(script)
    assert closure.files[0].why == "requested by the test"
    shell = os.path.realpath("/bin/sh")
    assert shell in file_paths(closure)
    assert follow("/bin/sh", closure) == shell
    assert any(f.why == f"interpreter of {script}" for f in closure.files)


def test_env_script_pulls_in_the_program(tmp_path: Path) -> None:
    if not os.path.exists("/usr/bin/python3.11"):
        pytest.skip("python3.11 not installed")
    script = tmp_path / "tool"
    script.write_text("#!/usr/bin/env python3.11\nprint('hi')\n")
    paths = file_paths(ElfResolver().resolve([(str(script), "test")]))
    assert os.path.realpath("/usr/bin/env") in paths
    assert "/usr/bin/python3.11" in paths


# --- sysroots ----------------------------------------------------------------------------


def make_usr_merged_root(root: Path, triplet: str) -> None:
    for name in ("bin", "lib", "lib64", "sbin"):
        (root / "usr" / name).mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(f"usr/{name}")
    (root / "usr/lib" / triplet).mkdir()
    (root / "etc/ld.so.conf.d").mkdir(parents=True)


@needs_x86_64
def test_sysroot(cc: Cc, tmp_path: Path) -> None:
    root = tmp_path / "root"
    triplet = "x86_64-linux-gnu"
    make_usr_merged_root(root, triplet)
    # The interpreter is only copied, never run; any real ld.so will do.
    shutil.copy(os.path.realpath("/lib64/ld-linux-x86-64.so.2"), root / f"usr/lib/{triplet}")
    # An absolute link: it must resolve inside the root, not on the build host.
    (root / "usr/lib64/ld-linux-x86-64.so.2").symlink_to(f"/lib/{triplet}/ld-linux-x86-64.so.2")
    leaf = cc.lib(root / "opt/custom/lib/libleaf.so", LEAF, "-nostdlib")
    other = cc.lib(
        root / f"usr/lib/{triplet}/libother.so", "int other(void) { return 1; }\n", "-nostdlib"
    )
    cc.prog(
        root / "usr/bin/prog",
        START_LEAF,
        "-nostdlib",
        "-Wl,--no-as-needed",
        f"-L{leaf.parent}",
        "-lleaf",
        f"-L{other.parent}",
        "-l:libother.so",
    )
    (root / "etc/ld.so.conf").write_text("# local dirs\ninclude ld.so.conf.d/*.conf\n")
    (root / "etc/ld.so.conf.d/custom.conf").write_text(
        "/opt/custom/lib/\ninclude /etc/ld.so.conf\n"
    )
    (root / "etc/ld.so.conf.d/not-a-conf.txt").write_text("/nonexistent\n")

    resolver = ElfResolver(root=root)
    assert resolver.find_program("prog") == "/usr/bin/prog"
    closure = resolver.resolve([("/bin/prog", "test")])

    # libleaf.so is found only through ld.so.conf, that is through ld.so.cache on the host;
    # the image has no cache, so it goes where the image's loader looks by itself.
    assert file_paths(closure) == [
        "/usr/bin/prog",
        f"/usr/lib/{triplet}/ld-linux-x86-64.so.2",
        f"/usr/lib/{triplet}/libleaf.so",
        f"/usr/lib/{triplet}/libother.so",
    ]
    moved = closure.files[2]
    for item in closure.files:
        assert item.source == (leaf if item is moved else root / item.path.lstrip("/"))
        assert item.source.is_file()
    assert "found through /etc/ld.so.conf in /opt/custom/lib" in moved.why
    assert list(closure.symlinks) == [
        Symlink("/bin", "usr/bin"),
        Symlink("/lib64", "usr/lib64"),
        Symlink("/usr/lib64/ld-linux-x86-64.so.2", f"/lib/{triplet}/ld-linux-x86-64.so.2"),
        Symlink("/lib", "usr/lib"),
    ]
    assert follow("/lib64/ld-linux-x86-64.so.2", closure) in file_paths(closure)
    assert not resolver.is_static("prog")


def test_sysroot_for_another_machine(cc: Cc, tmp_path: Path) -> None:
    """An aarch64 program: multiarch dirs come from its ELF header, x86 candidates are skipped."""
    root = tmp_path / "root"
    triplet = "aarch64-linux-gnu"
    make_usr_merged_root(root, triplet)
    interp = root / f"usr/lib/{triplet}/ld-linux-aarch64.so.1"
    cc.lib(interp, "int ld(void) { return 0; }\n", "-nostdlib")
    (root / "usr/lib/ld-linux-aarch64.so.1").symlink_to(f"{triplet}/ld-linux-aarch64.so.1")
    x86_leaf = cc.lib(root / "opt/x86/libleaf.so", LEAF, "-nostdlib")
    arm_leaf = root / f"usr/lib/{triplet}/libleaf.so"
    shutil.copy(x86_leaf, arm_leaf)
    prog = cc.prog(
        root / "usr/bin/prog",
        START_LEAF,
        "-nostdlib",
        f"-L{x86_leaf.parent}",
        "-lleaf",
        "-Wl,--dynamic-linker=/lib/ld-linux-aarch64.so.1",
    )
    for path in (interp, arm_leaf, prog):
        set_machine(path, EM_AARCH64)
    (root / "etc/ld.so.conf").write_text("/opt/x86\n")

    closure = ElfResolver(root=root).resolve([("prog", "test")])
    assert file_paths(closure) == [
        "/usr/bin/prog",
        f"/usr/lib/{triplet}/ld-linux-aarch64.so.1",
        f"/usr/lib/{triplet}/libleaf.so",
    ]
    assert Symlink("/usr/lib/ld-linux-aarch64.so.1", f"{triplet}/ld-linux-aarch64.so.1") in (
        closure.symlinks
    )


def test_sysroot_missing_program_names_root(tmp_path: Path) -> None:
    with pytest.raises(KdumpError, match=f"nothing-here.*{re.escape(str(tmp_path))}"):
        ElfResolver(root=tmp_path).find_program("nothing-here")


# --- glibc's NSS modules -------------------------------------------------------------------


def fake_glibc_root(cc: Cc, root: Path, release: str) -> Path:
    """A sysroot whose libc.so.6 is a real (gcc-built) library that defines glibc's symbol
    versions up to GLIBC_<release>, with NSS modules beside it as an older glibc has them."""
    triplet = "x86_64-linux-gnu"
    make_usr_merged_root(root, triplet)
    libdir = root / f"usr/lib/{triplet}"
    shutil.copy(os.path.realpath("/lib64/ld-linux-x86-64.so.2"), libdir)
    (root / "usr/lib64/ld-linux-x86-64.so.2").symlink_to(f"../lib/{triplet}/ld-linux-x86-64.so.2")
    nodes = ["2.2.5", "2.30", release]
    script = cc.src / f"libc-{release}.map"
    script.write_text(
        "".join(f"GLIBC_{v} {{ global: f{i}; }};\n" for i, v in enumerate(nodes))
        + "GLIBC_PRIVATE { global: private; local: *; };\n"
    )
    code = "".join(f"int f{i}(void) {{ return {i}; }}\n" for i in range(len(nodes)))
    code += "int private(void) { return 0; }\n"
    version_script = f"-Wl,--version-script={script}"
    libc = cc.lib(libdir / "libc.so.6", code, "-nostdlib", "-Wl,-soname,libc.so.6", version_script)
    link = ("-nostdlib", f"-L{libdir}", "-l:libc.so.6")
    cc.lib(libdir / "libresolv.so.2", "int res(void) { return 1; }\n", *link,
           "-Wl,-soname,libresolv.so.2")  # fmt: skip
    cc.lib(libdir / "libnss_files.so.2", "int files(void) { return 1; }\n", *link)
    cc.lib(libdir / "libnss_dns.so.2", "int dns(void) { return 1; }\n", *link,
           "-Wl,--no-as-needed", "-l:libresolv.so.2")  # fmt: skip
    cc.prog(root / "usr/bin/prog", "int f0(void);\nvoid _start(void) { f0(); for (;;) {} }\n",
            *link)  # fmt: skip
    return libc


@needs_x86_64
@pytest.mark.parametrize(("release", "modules"), [("2.31", True), ("2.33", True), ("2.34", False)])
def test_nss_modules_come_with_a_glibc_older_than_2_34(
    cc: Cc, tmp_path: Path, release: str, modules: bool
) -> None:
    root = tmp_path / "root"
    libc = fake_glibc_root(cc, root, release)
    closure = ElfResolver(root=root).resolve([("prog", "test")])
    triplet = "x86_64-linux-gnu"
    nss = [f"/usr/lib/{triplet}/{name}" for name in elfdeps.NSS_MODULES]
    expected = ["/usr/bin/prog", f"/usr/lib/{triplet}/ld-linux-x86-64.so.2",
                "/" + str(libc.relative_to(root))]  # fmt: skip
    if modules:
        # libnss_dns brings its own DT_NEEDED libresolv along.
        expected += [*nss, f"/usr/lib/{triplet}/libresolv.so.2"]
    assert file_paths(closure) == expected
    whys = {f.path: f.why for f in closure.files}
    for path in nss if modules else []:
        assert whys[path].startswith(f"loaded with dlopen by glibc {release} (")


def test_glibc_release_read_from_the_real_libc() -> None:
    """The release read from libc.so.6's version definitions is the one libc reports."""
    libc = os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6" if X86_64 else "/lib/libc.so.6")
    info = elfdeps._read_elf_info(libc)
    assert info is not None
    reported = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36", from gnu_get_libc_version
    assert reported is not None
    assert info.glibc_version == tuple(int(n) for n in reported.split()[1].split("."))
    # This build host's glibc has NSS built in: its ssh closure needs no modules.
    closure = ElfResolver().resolve([("/usr/bin/ssh", "test")])
    assert not [f for f in closure.files if "libnss_" in f.path]
