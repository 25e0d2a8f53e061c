"""Deprecated alias, kept for one release: the masked-token objective (`cnclip pretrain-text`) is
`cnclip.train.mlm` now; import from there."""

from __future__ import annotations

from cnclip.train.mlm import (
    HEAD_FILE,
    MaskedLM,
    PretrainOptions,
    PretrainSummary,
    evaluate_mlm,
    mlm_loss,
    pretrain_text,
)

__all__ = ["HEAD_FILE", "MaskedLM", "PretrainOptions", "PretrainSummary", "evaluate_mlm", "mlm_loss", "pretrain_text"]
