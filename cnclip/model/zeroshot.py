"""Zero-shot labels and text queries: prompt templates, label embeddings, label probabilities for an image.

Torch-free at import: the encoder is passed in, so query checks cost nothing.
"""

from __future__ import annotations

import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cnclip.errors import QueryError
from cnclip.model.t2s import t2s_default, to_simplified_all

if TYPE_CHECKING:
    from PIL import Image

    from cnclip.model.encoder import Encoder

MAX_QUERY_CHARS = 1000  # the model reads 50 tokens; far longer input is a mistake, not a query
# Characters cnclip.model.tokenizer drops (besides whitespace and U+FFFD): a query of only these is no text.
_UNREAD_CATEGORIES = frozenset({"Cc", "Cf", "Mn"})
# Chinese prompt templates for zero-shot labels, averaged per label (the official evaluation does the same)
PROMPT_TEMPLATES = (
    "{}",
    "一张{}的照片。",
    "一张{}的图片。",
    "这是一张{}的照片。",
    "一张模糊的{}的照片。",
    "一张清晰的{}的照片。",
    "{}的特写照片。",
    "一张好看的{}的照片。",
)


@dataclass(frozen=True)
class TextHit:
    text: str
    score: float

    def to_dict(self) -> dict:
        return {"text": self.text, "score": self.score}


def zero_shot(
    encoder: Encoder,
    image: Image.Image,
    labels: Sequence[str],
    templates=PROMPT_TEMPLATES,
    t2s: bool | None = None,
) -> list[TextHit]:
    """Label probabilities for `image`, best first: each label's prompts are embedded, averaged and
    renormalized, then softmax over logit_scale x cosine. `t2s`: labels in Traditional characters
    are read as Simplified (default: `$CNCLIP_T2S`, else on)."""
    labels = [check_query(label) for label in labels]
    if not hasattr(encoder, "image_features"):  # a CNClipModel, as before encoders: deprecated
        from cnclip.model.encoder import Encoder

        warnings.warn("zero_shot takes an Encoder (cnclip.load_encoder); a model is deprecated", DeprecationWarning, 2)
        encoder = Encoder.build(encoder)
    text = label_embeddings(encoder, labels, templates, t2s=t2s)
    image_vec = encoder.embed_images([image])[0]
    logits = encoder.logit_scale * (text @ image_vec)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    return [TextHit(labels[i], float(probs[i])) for i in order]


def label_embeddings(
    encoder: Encoder, labels: Sequence[str], templates=PROMPT_TEMPLATES, t2s: bool | None = None
) -> np.ndarray:
    """float32 (len(labels), D) unit rows: each label's prompts embedded, averaged and renormalized."""
    if not labels:
        raise QueryError("no labels given; put one label per line in the labels file")
    if t2s_default() if t2s is None else t2s:
        labels = to_simplified_all(labels)
    prompts = [t.format(label) for label in labels for t in templates]
    text = encoder.embed_texts(prompts).reshape(len(labels), len(templates), -1).mean(axis=1)
    return text / np.linalg.norm(text, axis=1, keepdims=True)


def check_query(query: str) -> str:
    """Reject queries that cannot mean anything, with a message saying what to do."""
    if not isinstance(query, str) or not any(_is_read(ch) for ch in query):
        raise QueryError(
            "the query is empty (or only spaces, control or zero-width characters); type what you are looking "
            "for, e.g. 海边的日落"
        )
    if len(query) > MAX_QUERY_CHARS:
        raise QueryError(
            f"the query is {len(query):,} characters long; the model reads about 50 tokens, so keep it under "
            f"{MAX_QUERY_CHARS:,} characters"
        )
    return query.strip()


def _is_read(ch: str) -> bool:
    """Whether the tokenizer keeps `ch` (it drops whitespace, control and format characters, lone
    combining marks and U+FFFD)."""
    return not ch.isspace() and ch != "\ufffd" and unicodedata.category(ch) not in _UNREAD_CATEGORIES
