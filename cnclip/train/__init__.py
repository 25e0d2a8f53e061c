"""Contrastive fine-tuning: `main(argv)` is `cnclip train`; `Trainer` is the loop itself."""

from __future__ import annotations

from .main import main, train
from .trainer import Trainer, TrainOptions

__all__ = ["Trainer", "TrainOptions", "main", "train"]
