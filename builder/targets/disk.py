"""disk targets: a local filesystem (ext4, xfs or btrfs) found by UUID=, LABEL=, PARTUUID= or a
/dev path; the dump goes into a fresh folder under `path`. Optional `stack`: the storage layers
under the filesystem, bottom first (kdump_mkinitrd.storage), which the capture init brings up
before it waits for the device. Template: modules.d/disk/."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

# Only the module: storage imports targets.base, so its names are looked up at call time.
from kdump_mkinitrd import storage
from kdump_mkinitrd.schema import Checker, Field
from kdump_mkinitrd.targets.base import (
    ImageFile,
    Target,
    check_device,
    check_mount_options,
    register,
)

if TYPE_CHECKING:
    from kdump_mkinitrd.config import Config
    from kdump_mkinitrd.storage.base import Layer


@register
@dataclass(frozen=True, kw_only=True)
class DiskTarget(Target):
    type: ClassVar[str] = "disk"
    schema: ClassVar[dict[str, Field]] = {
        # Items are checked against the layer types' schema in `check`: a list of mappings.
        "stack": Field(list, items=dict),
    }
    takes: ClassVar[frozenset[str]] = frozenset({"device", "fstype", "path", "mount_options"})
    uses: ClassVar[frozenset[str]] = frozenset({"python-stage"})
    takes_stack: ClassVar[bool] = True

    stack: tuple[Layer, ...] = ()
    # Whether the config wrote `stack` (an empty list too); else it was inferred from the
    # device's name, and host-only detection may replace it with what it finds.
    stack_given: bool = False

    @classmethod
    def check(cls, checker: Checker, key: str, values: dict[str, Any]) -> None:
        cls.require(checker, key, values, "device")
        cls.require(checker, key, values, "fstype", " (ext4, xfs or btrfs)")
        check_device(checker, f"{key}.device", values["device"])
        check_mount_options(checker, f"{key}.mount_options", values["mount_options"])
        if values["stack"] is None:
            return
        values["stack"] = [
            storage.item(checker, f"{key}.stack[{i}]", layer)
            for i, layer in enumerate(values["stack"])
        ]
        made = [storage.make(v) for v in values["stack"]]
        for i, layer in enumerate(made):
            if layer in made[:i]:
                raise checker.fail(f"{key}.stack[{i}]", f"{layer.name} is in this stack twice")
        named = storage.infer(values["device"])
        if named and made and made[-1].type == named[0].type and made[-1] != named[0]:
            raise checker.fail(
                f"{key}.stack[{len(made) - 1}]",
                f"the device {values['device']} "
                f"is {named[0].name}, but the top layer is {made[-1].name}",
            )

    @classmethod
    def make(cls, values: dict[str, Any]) -> Self:
        given = values["stack"] is not None
        if given:
            stack = tuple(storage.make(v) for v in values["stack"])
        else:
            stack = storage.infer(values["device"])
        common = {k: values[k] for k in ("device", "fstype", "path", "mount_options")}
        return cls(**common, stack=stack, stack_given=given)

    def layers(self) -> tuple[Layer, ...]:
        return self.stack

    def layers_given(self) -> bool:
        return self.stack_given

    def with_layers(self, layers: tuple[Layer, ...]) -> Self:
        return dataclasses.replace(self, stack=layers)

    def image_files(self, config: Config, index: int, root: Path) -> list[ImageFile]:
        return [f for i, layer in enumerate(self.stack) for f in layer.image_files(index, i, root)]
