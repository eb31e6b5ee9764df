"""Config validation: every error names the file, the line and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.config import load, parse
from builder.errors import KdumpError

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
    assert config.compression == {"method": "zstd", "level": 9, "threads": 0}
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
