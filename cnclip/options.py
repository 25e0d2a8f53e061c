"""Option dataclasses filled from parsed command-line arguments: the one copy from an argparse Namespace
to `RayOptions`, `TrainOptions`, `PretrainOptions` and the like."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def options_from(args: object, cls: type[T], **overrides: Any) -> T:
    """A `cls` dataclass whose fields come from `overrides`, else from the attribute of `args` (an
    `argparse.Namespace`) of the same name; a field that `args` lacks or leaves None keeps its default."""
    names = [f.name for f in fields(cls) if f.init]
    values = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return cls(**(values | overrides))
