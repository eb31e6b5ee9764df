"""Config validation: every error names the file, the line and the key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest

from kdump_mkinitrd.config import (
    CAPTURE_SCHEMA,
    CMDLINE_SCHEMA,
    COMPRESSION_SCHEMA,
    HOOK_SCHEMA,
    HOOKS_SCHEMA,
    NETWORK_SCHEMA,
    SCHEMA,
    CaptureConfig,
    CmdlineConfig,
    CompressionConfig,
    Hook,
    HooksConfig,
    NetworkConfig,
    load,
    parse,
)
from kdump_mkinitrd.errors import KdumpError
from kdump_mkinitrd.schema import Field

GOOD = """\
targets:
  - type: disk
    device: UUID=2f6e0e4c-8a53-4bd8-9b5c-0c0a3cf0f3a1
    fstype: ext4
    path: /var/crash
kernel_modules: [virtio_blk, virtio_pci]
failure_action: poweroff
files:
  - /etc/hostname
  - {src: /etc/hosts, dst: /etc/hosts.copy}
"""


def test_good_config_parses_with_defaults() -> None:
    config = parse(GOOD, "k.yaml")
    assert config.targets[0].fstype == "ext4"
    assert config.targets[0].mount_options == "defaults"
    assert config.kernel_modules == ("virtio_blk", "virtio_pci")
    assert config.failure_action == "poweroff"
    assert config.final_action == "reboot"
    assert dataclasses.asdict(config.compression) == {"method": "zstd", "level": 9, "threads": 0}
    assert [(f.src, f.dst) for f in config.files] == [
        ("/etc/hostname", "/etc/hostname"),
        ("/etc/hosts", "/etc/hosts.copy"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "kernel_module: [ext4]\n",
            "k.yaml:1: key 'kernel_module': unknown key (did you mean 'kernel_modules'?)",
        ),
        (
            "failure_action: explode\n",
            "k.yaml:1: key 'failure_action': expected one of reboot, poweroff, halt, shell;"
            " got 'explode'",
        ),
        ("kernel_modules: ext4\n", "k.yaml:1: key 'kernel_modules': expected a list, got 'ext4'"),
        ("device_timeout: yes\n", "k.yaml:1: key 'device_timeout': expected an integer, got True"),
        (
            "targets:\n  - type: disk\n    device: /dev/vdb\n    fstype: ext5\n",
            "k.yaml:4: key 'targets[0].fstype': expected one of ext4, xfs, btrfs; got 'ext5'",
        ),
        (
            "targets:\n  - type: disk\n    device: /dev/vdb\n    fstype: xfs\n"
            "    path: /var/../etc\n",
            "k.yaml:5: key 'targets[0].path': must not contain '..'",
        ),
        (
            "targets:\n  - type: disk\n    fstype: xfs\n",
            "k.yaml:2: key 'targets[0]': a disk target needs 'device'",
        ),
        (
            "targets:\n  - type: disk\n    device: sda1\n    fstype: xfs\n",
            "k.yaml:3: key 'targets[0].device': expected UUID=",
        ),
        (
            "targets:\n  - {type: disk, device: /dev/vdb, fstype: xfs, colour: red}\n",
            "key 'targets[0].colour': unknown key",
        ),
        ("compression:\n  level: 0\n", "k.yaml:2: key 'compression.level': must be at least 1"),
        ("files: [etc/passwd]\n", "key 'files[0].src': must be an absolute path"),
        ("targets: [\n", "k.yaml:2: malformed YAML"),
        ("failure_action: a\nfailure_action: b\n", "k.yaml:2: key 'failure_action' given twice"),
        ("- 1\n", "k.yaml: key '(top level)': expected a mapping"),
    ],
)
def test_errors_name_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(KdumpError) as err:
        parse(text, "k.yaml")
    assert message in str(err.value)


def test_given_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(KdumpError, match=r"cannot read config .*nope\.yaml"):
        load(tmp_path / "nope.yaml")


def test_empty_file_means_defaults() -> None:
    config = parse("", "empty.yaml")
    assert config.targets == () and config.busybox == "/bin/busybox"


DISK = "targets:\n  - {type: disk, device: /dev/vdb, fstype: ext4"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # A folder name on every target and in recover-raw: one path component.
        ("capture:\n  hostname: a/b\n", "k.yaml:2: key 'capture.hostname': names each dump's"),
        ("capture:\n  hostname: web 1\n", "key 'capture.hostname'"),
        ("capture:\n  hostname: ..\n", "key 'capture.hostname'"),
        ("capture:\n  hostname: a..b\n", "key 'capture.hostname'"),
        ("capture:\n  hostname: -rf\n", "key 'capture.hostname'"),
        ("capture:\n  hostname: " + "h" * 65 + "\n", "key 'capture.hostname'"),
        # makedumpfile -d takes a five-bit mask.
        ("capture:\n  dump_level: 32\n", "k.yaml:2: key 'capture.dump_level': must be at most 31"),
        ("device_timeout: 100000000000000000000\n", "key 'device_timeout': must be at most"),
        ("compression: {level: 22}\n", "key 'compression.level': must be at most 19"),
        ("capture: {keep: 99999999999999999999}\n", "key 'capture.keep': must be at most"),
        ("capture: {min_free: 99999999999999999999}\n", "key 'capture.min_free': must be at"),
        # The init logs line by line; vmcore.json escapes only \ and ".
        (DISK + ', path: "/var/crash\\n"}\n', "key 'targets[0].path': contains the control"),
        ('cmdline: {append: ["a\\tb"]}\n', "key 'cmdline.append[0]': contains the control"),
        (DISK + ", mount_options: 'ro bad'}\n", "key 'targets[0].mount_options': expected"),
        ("targets:\n  - {type: disk, device: '/dev/../etc/x', fstype: ext4}\n",
         "key 'targets[0].device': expected a /dev path"),
        ("targets:\n  - {type: disk, device: '/dev/vd b', fstype: ext4}\n",
         "key 'targets[0].device': expected a /dev path"),
        ("targets:\n  - {type: disk, device: 'UUID=$(reboot)', fstype: ext4}\n",
         "key 'targets[0].device': expected UUID=hex"),
        ("targets:\n  - {type: disk, device: 'PARTUUID=1234', fstype: ext4}\n",
         "key 'targets[0].device': expected PARTUUID="),
        ("targets:\n  - {type: disk, device: 'LABEL=../../sda', fstype: ext4}\n",
         "key 'targets[0].device': expected LABEL="),
        ("targets:\n  - {type: raw, device: /dev/vdb, path: /x}\n",
         "k.yaml:2: key 'targets[0].path': a raw target takes no 'path'"),
        ("targets:\n  - {type: raw, device: /dev/vdb, fstype: ext4}\n",
         "key 'targets[0].fstype': a raw target takes no 'fstype'"),
        ("network: {timeout: 4000}\n", "key 'network.timeout': must be at most 3600"),
    ],
)  # fmt: skip
def test_values_the_capture_kernel_cannot_handle_are_refused(text: str, message: str) -> None:
    with pytest.raises(KdumpError) as err:
        parse(text, "k.yaml")
    assert message in str(err.value)


@pytest.mark.parametrize(
    "device",
    ["/dev/vdb", "/dev/disk/by-id/nvme-Samsung_SSD_970_S4EWNX0N123456-part1",
     "/dev/mapper/vg0-crash", "UUID=2f6e0e4c-8a53-4bd8-9b5c-0c0a3cf0f3a1", "UUID=ABCD-1234",
     "PARTUUID=5a7b3c1d-01", "PARTUUID=5a7b3c1d-0a", "LABEL=my dumps",
     "PARTUUID=2f6e0e4c-8a53-4bd8-9b5c-0c0a3cf0f3a1"],
)  # fmt: skip
def test_devices_the_init_can_find_are_accepted(device: str) -> None:
    config = parse(f"targets:\n  - {{type: disk, device: '{device}', fstype: ext4}}\n", "k.yaml")
    assert config.targets[0].device == device


def test_host_names_that_make_one_folder_are_accepted() -> None:
    for name in ("web1", "web1.example.org", "db_2-a", "h" * 64):
        assert parse(f"capture: {{hostname: {name}}}\n", "k.yaml").capture.hostname == name


@pytest.mark.parametrize("text", ["", "targets: []\n", "capture: {stage: static}\n"])
def test_no_target_refuses_build_and_register(text: str, tmp_path: Path) -> None:
    """An image without a target could only say so in the capture kernel: the library's build
    and register refuse it, with what to configure, and nothing is written. (The command line
    first gives such a config the default target: tests/test_zero_config.py.)"""
    from kdump_mkinitrd.arming.registration import register
    from kdump_mkinitrd.config import NoTarget
    from kdump_mkinitrd.image.build import BuildRequest, build

    image = tmp_path / "kdump.img"
    request = BuildRequest("6.1.0-test", tmp_path, image, None)
    for call in (lambda: build(parse(text, "k.yaml"), request),
                 lambda: register(parse(text, "k.yaml"), request)):  # fmt: skip
        with pytest.raises(NoTarget) as err:
            call()
        assert "no dump target is configured" in str(err.value)
        assert "add a 'targets' list to k.yaml" in str(err.value)
        assert not image.exists()


# Each section, its class, its schema, and a config text with what it changes from the defaults.
SECTIONS = [
    ("compression", CompressionConfig, COMPRESSION_SCHEMA,
     "compression: {method: gzip, level: 3}\n", {"method": "gzip", "level": 3}),
    ("capture", CaptureConfig, CAPTURE_SCHEMA,
     "capture: {stage: static, keep: 4, hostname: web1}\n",
     {"stage": "static", "keep": 4, "hostname": "web1"}),
    ("cmdline", CmdlineConfig, CMDLINE_SCHEMA,
     "cmdline: {append: [a=1, b], remove: [quiet]}\n",
     {"append": ("a=1", "b"), "remove": ("quiet",)}),
    ("network", NetworkConfig, NETWORK_SCHEMA,
     "targets: [{type: ssh, host: backup}]\nnetwork: {dns: [192.0.2.53]}\n",
     {"dns": ("192.0.2.53",)}),
    ("hooks", HooksConfig, HOOKS_SCHEMA,
     "hooks: {timeout: 5, post: [/a, {program: /b, args: [x]}]}\n",
     {"timeout": 5, "post": (Hook("/a"), Hook("/b", ("x",)))}),
]  # fmt: skip
# The class each list of mappings holds, whose fields follow the items' schema as well.
ITEM_CLASSES: list[tuple[type[Any], dict[str, Field]]] = [(Hook, HOOK_SCHEMA)]


def _follows(kind: type[Any], schema: dict[str, Field]) -> None:
    hints = typing.get_type_hints(kind)
    fields = dataclasses.fields(kind)
    assert [f.name for f in fields] == list(schema)
    for f in fields:
        spec = schema[f.name]
        assert isinstance(spec.kind, type)
        item: Any = spec.items
        if isinstance(spec.items, dict):  # a list of mappings: a tuple of their frozen class
            item = next(c for c, s in ITEM_CLASSES if s is spec.items)
            _follows(item, spec.items)
        else:
            assert item in (None, str)  # what sections hold
        # A list in the schema is a tuple of its items in the frozen section.
        expected: Any = tuple[item, ...] if spec.kind is list else spec.kind
        default = tuple(spec.default) if spec.kind is list else spec.default
        if spec.required:  # no default: every item gives it
            assert hints[f.name] == expected and f.default is dataclasses.MISSING, f.name
            continue
        assert hints[f.name] == (expected if default is not None else expected | None), f.name
        assert f.default == default, f.name


@pytest.mark.parametrize(("name", "kind", "schema", "text", "changes"), SECTIONS,
                         ids=[s[0] for s in SECTIONS])  # fmt: skip
def test_sections_are_frozen_dataclasses_that_follow_the_schema(
    name: str, kind: type[Any], schema: dict[str, Field], text: str, changes: dict[str, Any]
) -> None:
    assert SCHEMA[name].schema is schema
    _follows(kind, schema)
    fields = dataclasses.fields(kind)
    section = getattr(parse("", "k.yaml"), name)
    assert type(section) is kind
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(section, fields[0].name, None)
    assert getattr(parse(text, "k.yaml"), name) == dataclasses.replace(section, **changes)
