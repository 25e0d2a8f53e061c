"""Option dataclasses from parsed arguments: one copy for every command."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from cnclip.options import options_from


@dataclass
class Shape:
    name: str
    width: int = 8
    device: str | None = "cpu"
    tags: list = field(default_factory=list)
    gpus: float = 0.0


def test_fields_come_from_the_namespace_overrides_win_and_none_keeps_the_default():
    args = argparse.Namespace(name="a", width=16, device=None, json=True, func=print, gpu_count=2.0)
    shape = options_from(args, Shape, gpus=args.gpu_count)
    assert shape == Shape(name="a", width=16, device="cpu", tags=[], gpus=2.0)
    assert options_from(args, Shape, device=None).device is None  # an override is taken as it is
