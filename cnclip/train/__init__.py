"""Training: contrastive fine-tuning (`cnclip train`), text-tower MLM pretraining, data, loss, evaluation.

`main(argv)` is `cnclip train`; `Trainer` (in `contrastive`) runs the contrastive objective. Both are
imported on first use, so that `cnclip.train.pairs` and friends load without the trainer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cnclip.train.contrastive import Trainer, TrainOptions
    from cnclip.train.main import main, train

_LAZY = {"main": "main", "train": "main", "Trainer": "contrastive", "TrainOptions": "contrastive"}

__all__ = ["Trainer", "TrainOptions", "main", "train"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cnclip.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cnclip.train.{module}"), name)
    # Importing cnclip.train.main binds the *submodule* to this package's `main`; the function wins,
    # or `from cnclip.train import main` would hand out the module.
    globals()[name] = value
    return value
