"""Hooks (config key `hooks`): config errors, what the image holds, and the rendered init
running them under the real busybox sh in a chroot (tests/init_sandbox.py): the order, the
argv, the environment, the timeout, and the log."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdump_mkinitrd.config import parse
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.image.compress import decompress
from kdump_mkinitrd.image.cpio import Member, read_newc
from kdump_mkinitrd.image.features import discover
from kdump_mkinitrd.image.render import render
from kdump_mkinitrd.paths import MODULES_DIR
from tests import init_sandbox
from tests.conftest import Kernel
from tests.test_build import build_args, run_cli, write_config
from tests.test_hostile_config import HOSTILE, LABEL

needs_chroot = pytest.mark.skipif(not init_sandbox.can_chroot(), reason="chroot needs root")

DISK = "targets: [{type: disk, device: /dev/vdb, fstype: ext4, path: /var/crash}]\n"
# The sandbox's stand-ins, but the real busybox timeout and setsid: the hooks need them.
STUBS = re.sub(r"^(setsid\(\) \{.*\}|timeout\(\) \{\n(?:    .*\n)*\})\n", "",
               init_sandbox.STUBS, flags=re.M)  # fmt: skip


def test_stubs_keep_only_what_needs_a_machine() -> None:
    assert "setsid()" in init_sandbox.STUBS and "timeout()" in init_sandbox.STUBS
    assert "setsid()" not in STUBS and "timeout()" not in STUBS and "mount()" in STUBS


@pytest.mark.parametrize(("text", "message"), [
    ("hooks:\n  pre:\n    - usr/sbin/x\n",
     "k.yaml:3: key 'hooks.pre[0].program': must be an absolute path, got 'usr/sbin/x'"),
    ("hooks:\n  post:\n    - {program: /x, args: [-v, 3]}\n",
     "k.yaml:3: key 'hooks.post[0].args[1]': expected a string, got 3"),
    ("hooks:\n  post:\n    - {args: [-v]}\n",
     "k.yaml:3: key 'hooks.post[0]': 'program' is required"),
    ("hooks:\n  pre:\n    - {program: /x, arg: [-v]}\n",
     "k.yaml:3: key 'hooks.pre[0].arg': unknown key (did you mean 'args'?)"),
    ("hooks:\n  timeout: 0\n", "k.yaml:2: key 'hooks.timeout': must be at least 1, got 0"),
    ("hooks:\n  timeout: 3601\n", "k.yaml:2: key 'hooks.timeout': must be at most 3600, got 3601"),
    ("hooks:\n  pre: /x\n", "k.yaml:2: key 'hooks.pre': expected a list, got '/x'"),
    ("hooks:\n  pre:\n    - \"/x\\n\"\n",
     "k.yaml:3: key 'hooks.pre[0].program': contains the control character '\\n'"),
])  # fmt: skip
def test_config_errors_name_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(KdumpError) as err:
        parse(text, "k.yaml")
    assert str(err.value) == message


def test_config_shape() -> None:
    config = parse(
        "hooks:\n"
        "  timeout: 7\n"
        "  pre:\n"
        "    - /usr/local/sbin/notify-crash\n"
        '    - {program: /usr/bin/logger, args: [-t, kdump, "capture starts"]}\n'
        "  post:\n"
        "    - /usr/local/sbin/after-dump\n",
        "k.yaml",
    )
    hooks = config.hooks
    assert hooks.timeout == 7
    assert [(h.program, h.args) for h in hooks.pre] == [
        ("/usr/local/sbin/notify-crash", ()),
        ("/usr/bin/logger", ("-t", "kdump", "capture starts")),
    ]
    assert [key for key, _ in hooks.all()] == ["hooks.pre[0]", "hooks.pre[1]", "hooks.post[0]"]
    assert config.line_of("hooks.pre[1]") == "k.yaml:5"
    assert parse("", "k.yaml").hooks.timeout == 60


def test_the_feature_is_left_out_without_hooks() -> None:
    plain = init_sandbox.render_image(parse(DISK, "k.yaml")).files
    assert "/lib/kdump/hooks/50-hooks.sh" not in plain
    assert "hook" not in plain["/lib/kdump/hooks/60-run-targets.sh"]
    assert "post_hooks" not in plain["/lib/kdump/hooks/30-capture-lib.sh"]
    only_post = init_sandbox.render_image(parse(DISK + "hooks: {post: [/x]}\n", "k.yaml")).files
    assert "/lib/kdump/hooks/50-hooks.sh" in only_post
    assert "kdump_pre_hooks" not in only_post["/lib/kdump/hooks/60-run-targets.sh"]


def _script(root: Path, path: str, body: str) -> None:
    host = root / path.lstrip("/")
    host.parent.mkdir(parents=True, exist_ok=True)
    host.write_text("#!/bin/sh\n" + body)
    host.chmod(0o755)


def _run_init(root: Path, config_text: str, after: str = "") -> tuple[str, str]:
    """The whole init with `config_text`'s hooks (the sandbox's stand-ins for a machine,
    `after` replacing init functions): its console output and its log."""
    rendered = init_sandbox.render_image(parse(config_text, "k.yaml"))
    init_sandbox.make_sandbox(root, rendered)
    # Hooks read /dev/null, as in the image (base's node, then devtmpfs).
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    assert init_sandbox.syntax_errors(root, rendered) == {}
    head, sep, tail = rendered.files["/init"].partition('\nlog "capture environment for kernel')
    assert sep, "the init's hook loop moved"
    script = STUBS + head + "\n" + init_sandbox.OVERRIDES + after + sep + tail
    run = init_sandbox.run_sandbox(root, script)
    assert init_sandbox.shell_errors(run.stderr) == [], run.stderr
    return run.stdout, (root / "run/kdump/init.log").read_text()


def _lines(log: str) -> list[str]:
    """The log without its uptime column."""
    return [line.split(" ", 1)[1] for line in log.splitlines()]


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    yield root
    init_sandbox.remove(root)


HOOKS = """\
hooks:
  timeout: 1
  pre:
    - /hooks/fails
    - /hooks/hangs
    - /hooks/missing
    - {program: /hooks/args, args: ["$(touch /tmp/pwned)", ";", "a  b", "`id`", "-", ""]}
  post:
    - {program: /hooks/post, args: [--flag]}
"""


@needs_chroot
def test_pre_hooks_fail_and_time_out_and_the_dump_still_runs(sandbox: Path) -> None:
    _script(sandbox, "/hooks/fails", "echo 'about to fail'\necho 'on stderr' >&2\nexit 3\n")
    # Ignores TERM, leaves a child behind that holds its output open: both must die.
    _script(sandbox, "/hooks/hangs", "trap '' TERM\nsleep 300 &\necho $! > /tmp/child\n"
            "echo 'hanging'\nwhile :; do sleep 1; done\n")  # fmt: skip
    _script(sandbox, "/hooks/args", "printf '[%s]\\n' \"$@\" > /tmp/args\n"
            "read -r line && echo \"stdin gave $line\"\n"
            "echo \"status env: ${KDUMP_DUMP_STATUS-unset}\"\n")  # fmt: skip
    _script(sandbox, "/hooks/post",
            'printf "%s|%s|%s\\n" "$*" "$KDUMP_DUMP_STATUS" "$KDUMP_DUMP_DIR" '
            '> "$KDUMP_DUMP_DIR/post-marker"\necho "post saw $1 $2"\n')  # fmt: skip
    out, log = _run_init(sandbox, DISK + HOOKS)
    lines = _lines(log)
    assert "pre hook 0 (/hooks/fails): about to fail" in lines
    assert "pre hook 0 (/hooks/fails): on stderr" in lines
    assert "pre hook 0 (/hooks/fails) failed: exit status 3" in lines
    assert "pre hook 1 (/hooks/hangs): hanging" in lines
    assert "pre hook 1 (/hooks/hangs) failed: killed after 1 s" in lines
    assert "pre hook 2 (/hooks/missing) failed: no such program in the image" in lines
    assert "pre hook 3 (/hooks/args) done" in lines
    assert "pre hook 3 (/hooks/args): status env: unset" in lines
    # stdin is /dev/null: read gets nothing.
    assert not any("stdin gave" in line for line in lines)
    # Config words stay words: nothing ran, nothing split or joined.
    args = (sandbox / "tmp/args").read_text()
    assert args == "[$(touch /tmp/pwned)]\n[;]\n[a  b]\n[`id`]\n[-]\n[]\n"
    assert not (sandbox / "tmp/pwned").exists()
    # The child the hung hook left went with it: gone, or dead and not yet reaped (this
    # machine's pid 1 may be slow to reap orphans).
    child = (sandbox / "tmp/child").read_text().strip()
    with contextlib.suppress(FileNotFoundError):
        assert Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    # In order, before the first target; the dump still saved; post hooks after it, with
    # the dump's folder, before final_action.
    order = [lines.index(x) for x in (
        "running pre hook 0 (/hooks/fails)", "running pre hook 3 (/hooks/args)",
        "trying target 0: disk:/dev/vdb", "running post hook 0 (/hooks/post)",
        "post hook 0 (/hooks/post) done", "dump saved to target 0",
    )]  # fmt: skip
    assert order == sorted(order)
    dumps = list((sandbox / "run/kdump/mnt/0/var/crash").iterdir())
    assert len(dumps) == 1 and (dumps[0] / "vmcore").read_bytes() == init_sandbox.VMCORE
    inside = "/" + str(dumps[0].relative_to(sandbox))
    assert (dumps[0] / "post-marker").read_text() == f"--flag 0|0|{inside}\n"
    assert "post hook 0 (/hooks/post): post saw --flag 0" in lines
    # The log kept beside the dump has what the post hook said.
    assert "post saw --flag 0" in (dumps[0] / "kdump-init.log").read_text()
    assert lines.count("running post hook 0 (/hooks/post)") == 1
    assert "kdump: pre hook 0 (/hooks/fails) failed: exit status 3" in out
    assert out.rstrip().endswith("sandbox: reboot -f")


@needs_chroot
def test_post_hooks_get_status_1_when_no_target_took_the_dump(sandbox: Path) -> None:
    _script(sandbox, "/hooks/post",
            'echo "args=$* status=$KDUMP_DUMP_STATUS dir=[$KDUMP_DUMP_DIR]"\nexit 1\n')  # fmt: skip
    config = DISK + "failure_action: poweroff\nhooks: {post: [/hooks/post]}\n"
    out, log = _run_init(sandbox, config, after="wait_for_device() { return 1; }\n")
    lines = _lines(log)
    assert "post hook 0 (/hooks/post): args=1 status=1 dir=[]" in lines
    assert "post hook 0 (/hooks/post) failed: exit status 1" in lines
    assert (
        lines.index("target 0 could not take the dump")
        < lines.index("running post hook 0 (/hooks/post)")
        < lines.index("FAILED: no target could take the dump")
    )
    assert "running failure_action poweroff" in lines
    assert "sandbox: poweroff -f" in out


def _image_paths(image: Path) -> dict[str, Member]:
    return {"/" + e.path.lstrip("/"): e for e in read_newc(decompress(image.read_bytes()))}


def test_image_holds_each_program_with_what_it_needs(
    kernel61: Kernel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elf = tmp_path / "hook-elf"
    shutil.copy2("/usr/bin/id", elf)  # dynamically linked: libc and friends come along
    bash_script = tmp_path / "hook-bash"
    bash_script.write_text("#!/bin/bash\necho from bash\n")
    sh_script = tmp_path / "hook-sh"
    sh_script.write_text("#!/bin/sh\necho from sh\n")
    for script in (bash_script, sh_script):
        script.chmod(0o755)
    text = (f"{DISK}capture: {{stage: static}}\nhooks:\n  pre: [{elf}, {sh_script}]\n"
            f"  post:\n    - {{program: {bash_script}, args: [x]}}\n")  # fmt: skip
    image = tmp_path / "kdump.img"
    assert run_cli(build_args(kernel61, write_config(tmp_path, text), image), capsys)[0] == 0
    paths = _image_paths(image)
    for program in (elf, bash_script, sh_script):
        assert str(program) in paths
    assert paths[str(sh_script)].data == sh_script.read_bytes()
    bash = os.path.realpath("/bin/bash")
    assert bash in paths
    libc = [p for p in paths if re.search(r"/libc\.so\.6$", p)]
    assert libc, "the ELF hook's libraries"
    # #!/bin/sh runs busybox sh, as the init does: the host's dash is not brought over it.
    assert "/usr/bin/dash" not in paths and paths["/usr/bin/sh"].data == b"/bin/busybox"
    assert "/usr/lib/kdump/hooks/50-hooks.sh" in paths  # /lib leads to usr/lib, as on the host
    code, out, _ = run_cli(["inspect", str(image), "--json"], capsys)
    assert code == 0
    why = {b["path"]: b["why"] for b in json.loads(out)["binaries"]}
    assert why[str(elf)] == "requested by config key hooks.pre[0]"
    assert why[str(sh_script)] == "requested by config key hooks.pre[1]"
    assert why[str(bash_script)] == "requested by config key hooks.post[0]"
    assert why[bash] == f"interpreter of {bash_script}"


@pytest.mark.parametrize("problem", ["missing", "not executable", "relative interpreter"])
def test_build_refuses_a_hook_it_cannot_pack(
    problem: str, kernel61: Kernel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hook = tmp_path / "hook"
    if problem != "missing":
        hook.write_text("#!bin/sh\n" if problem == "relative interpreter" else "#!/bin/sh\n")
        hook.chmod(0o755 if problem == "relative interpreter" else 0o644)
    text = f"{DISK}capture: {{stage: static}}\nhooks:\n  timeout: 5\n  post:\n    - {hook}\n"
    image = tmp_path / "kdump.img"
    code, _, err = run_cli(build_args(kernel61, write_config(tmp_path, text), image), capsys)
    assert code != 0 and not image.exists()
    if problem == "relative interpreter":
        assert f"script {hook} names a relative interpreter 'bin/sh'" in err
        return
    where = f"{tmp_path / 'kdump.yaml'}:6: key 'hooks.post[0]': "
    expected = {"missing": f"program {hook} not found",
                "not executable": f"{hook} is not executable on the build host"}  # fmt: skip
    assert where + expected[problem] in err


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=LABEL, args=st.lists(HOSTILE, max_size=4))
def test_hostile_programs_and_args_stay_single_arguments(
    tmp_path: Path, name: str, args: list[str]
) -> None:
    """Whatever the config says reaches the hook as argv, byte for byte: the program, its args
    and, for a post hook, the status; nothing else runs. The hook records its argv."""
    work = tmp_path / os.urandom(4).hex()
    work.mkdir()
    program = work / name
    program.write_text(f'#!/bin/sh\nprintf \'%s\\0\' "$0" $# "$@" >> {work}/record\n')
    program.chmod(0o755)
    hook = {"program": str(program), "args": args}
    text = yaml.safe_dump({"hooks": {"pre": [hook], "post": [hook]}})
    script = render(MODULES_DIR / "hooks" / "hooks.sh.j2", {"config": parse(text, "k.yaml")})
    harness = f"log() {{ :; }}\n{script}\nKDUMP_HOOK_OUT={work}/out\n"
    (work / "hooks.sh").write_text(harness + "kdump_pre_hooks\nkdump_post_hooks 1 ''\n")
    subprocess.run([str(init_sandbox.BUSYBOX), "sh", "hooks.sh"], cwd=work, check=True,
                   timeout=30, capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(work)})  # fmt: skip
    tokens = (work / "record").read_bytes().decode().split("\0")[:-1]
    calls = []
    while tokens:
        count = int(tokens[1])
        calls.append([tokens[0], *tokens[2 : count + 2]])
        tokens = tokens[count + 2 :]
    assert calls == [[str(program), *args], [str(program), *args, "1"]]
    assert not (work / "pwned").exists()


def test_config_set_names_config_keys_only(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "module.yaml").write_text("name: mine\nwhen:\n  config_set: [hooks.nope]\n")
    with pytest.raises(KdumpError) as err:
        discover((tmp_path,))
    assert "when: config_set: when: 'hooks.nope' is neither a config key" in str(err.value)
    (folder / "module.yaml").write_text("name: mine\nwhen:\n  config_set: [hooks.post]\n")
    mine = discover((tmp_path,))["mine"]
    assert not mine.applies(parse(DISK, "k.yaml"), "static", "native")
    assert mine.applies(parse(DISK + "hooks: {post: [/x]}\n", "k.yaml"), "static", "native")
