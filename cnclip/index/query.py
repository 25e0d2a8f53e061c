"""Combined queries: texts and images added and subtracted on unit embeddings, as in rclip's
`"猫" + "狗" - "草地"`. This module owns the terms, the command line's `A + B - C` and `TEXT:WEIGHT`
syntax, and the arithmetic; `Index.search_combined` supplies each term's vector."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cnclip.errors import QueryError
from cnclip.model.zeroshot import check_query

TEXT, IMAGE, FILE = "text", "image", "file"
KINDS = (TEXT, IMAGE, FILE)
MAX_TERMS = 16  # each text or unindexed image term runs a tower once
# An operator is a lone + or - with whitespace on both sides, so "Wi-Fi", "C++" or "-10度" stay text.
# The lookahead leaves the space after it to the next operator: "猫 + - 狗" is caught as an empty term.
_OPERATOR = re.compile(r"\s+([+-])(?=\s)")
# inf and nan count as numbers here, so that "夜景:inf" is refused as a weight rather than read as text
_WEIGHT = re.compile(
    r"^(.*?):\s*([+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?|inf(?:inity)?|nan))\s*$", re.DOTALL | re.IGNORECASE
)
# A sum shorter than this share of its weights has cancelled out: its direction is rounding noise.
_CANCELLED = 1e-4

# (1, D) vector of a term, and the path of an indexed file it came from (left out of the results).
TermVector = tuple[np.ndarray, str | None]


@dataclass(frozen=True)
class Term:
    """One part of a combined query and its weight (negative: subtracted).

    `kind` is "text" (a query string), "image" (a path or a PIL image; an indexed path reuses its
    stored vector) or "file" (a catalog file id, as search results carry)."""

    kind: str
    value: str | int | os.PathLike | Image.Image
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise QueryError(f"unknown query term kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if not math.isfinite(self.weight) or self.weight == 0:
            raise QueryError(f"the weight of {self.label()} is {self.weight}; give a non-zero number")
        if self.kind == FILE and (isinstance(self.value, bool) or not isinstance(self.value, int)):
            raise QueryError(f"a file term takes a file id (an integer), not {self.value!r}")

    def label(self) -> str:
        """How the term reads in a title: the text, the image's file name, or #ID."""
        if self.kind == TEXT:
            return str(self.value)
        if self.kind == FILE:
            return f"#{self.value}"
        return os.path.basename(self.value) if isinstance(self.value, str | os.PathLike) else "图片"


def has_operators(query: str) -> bool:
    """Whether a query string holds ` + ` or ` - ` (with spaces around), i.e. asks for arithmetic."""
    return _OPERATOR.search(query.strip()) is not None


def split_weight(text: str) -> tuple[str, float]:
    """`"夜景:0.5"` -> ("夜景", 0.5); text without a trailing `:NUMBER` keeps weight 1."""
    found = _WEIGHT.match(text)
    if found is None:
        return text, 1.0
    weight = float(found.group(2))
    if not (math.isfinite(weight) and weight > 0):
        raise QueryError(f"the weight in {text!r} must be a number above 0; subtract with ' - ' or --not instead")
    return found.group(1).strip(), weight


def parse_query(query: str) -> list[Term]:
    """Text terms of `"猫 + 狗:0.5 - 草地"`: operators need spaces around them; `:W` weighs a term."""
    parts = _OPERATOR.split(query.strip())
    signs = [1.0] + [1.0 if op == "+" else -1.0 for op in parts[1::2]]
    terms = []
    for sign, part in zip(signs, parts[0::2], strict=True):
        if not part.strip():
            example = "e.g. 猫 + 狗 - 草地"
            raise QueryError(f"{query.strip()!r} has an empty term; write a term between operators, {example}")
        text, weight = split_weight(part.strip())
        terms.append(Term(TEXT, check_query(text), sign * weight))
    return terms


def image_term(path: str, sign: float = 1.0) -> Term:
    """An image term from the command line: `FILE` or `FILE:W` (a path that exists as given is never split)."""
    text, weight = (path, 1.0) if os.path.exists(path) else split_weight(path)
    return Term(IMAGE, text, sign * weight)


def build_terms(
    query: str | None,
    images: Sequence[str] = (),
    not_texts: Sequence[str] = (),
    not_images: Sequence[str] = (),
) -> list[Term]:
    """The terms of a command-line search. A lone text or image is taken as it is (no operators, no
    weight), so a plain search stays a plain search; otherwise every part may carry `:W`."""
    if query is not None and not (images or not_texts or not_images or has_operators(query)):
        return [Term(TEXT, check_query(query))]
    if query is None and len(images) == 1 and not (not_texts or not_images):
        return [Term(IMAGE, images[0])]
    terms = parse_query(query) if query is not None else []
    terms += [image_term(path) for path in images]
    for text in not_texts:
        text, weight = split_weight(text)
        terms.append(Term(TEXT, check_query(text), -weight))
    terms += [image_term(path, -1.0) for path in not_images]
    check_terms(terms)
    return terms


def check_terms(terms: Sequence[Term]) -> None:
    """A usable combination: 1 to MAX_TERMS terms, at least one of them added rather than subtracted."""
    if not terms:
        raise QueryError("the combined query has no terms; give a text or an image to look for")
    if len(terms) > MAX_TERMS:
        raise QueryError(f"the combined query has {len(terms)} terms; use at most {MAX_TERMS}")
    if all(t.weight < 0 for t in terms):
        raise QueryError("the combined query only subtracts; add a text or an image to look for")


def combine(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The (1, D) unit float32 vector along sum(weight_i * unit(vectors_i)) for (n, D) `vectors`;
    QueryError when the terms cancel out (e.g. 猫 - 猫), leaving no direction to search."""
    vectors = np.asarray(vectors, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != w.size or w.size == 0:
        raise QueryError(f"{w.size} weights for vectors of shape {vectors.shape}; give one weight per vector")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise QueryError("a query term has an all-zero embedding; leave that term out")
    total = (w[:, None] * (vectors / norms)).sum(axis=0)
    length = float(np.linalg.norm(total))
    if length <= _CANCELLED * float(np.abs(w).sum()):
        raise QueryError("the combined query cancels out (its terms sum to nothing); change a term or a weight")
    return (total / length).astype(np.float32)[None, :]


def combine_terms(
    terms: Sequence[Term],
    text: Callable[[str], np.ndarray],
    image: Callable[[object], TermVector],
    file: Callable[[int], TermVector],
) -> tuple[np.ndarray, set[str]]:
    """The combined (1, D) query vector of `terms`, and the paths of the indexed files among them.

    `text` gives a (1, D) text embedding; `image` and `file` give (vector, indexed path or None)."""
    check_terms(terms)
    vectors, own = [], set()
    for term in terms:
        if term.kind == TEXT:
            vector, path = text(term.value), None
        else:
            vector, path = (file if term.kind == FILE else image)(term.value)
        vectors.append(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        if path is not None:
            own.add(path)
    return combine(np.concatenate(vectors), [t.weight for t in terms]), own


def describe(terms: Sequence[Term]) -> str:
    """A one-line title, e.g. `猫 + 狗:0.5 - 草地`."""
    parts = []
    for i, term in enumerate(terms):
        sign = ("- " if i == 0 else " - ") if term.weight < 0 else ("" if i == 0 else " + ")
        size = abs(term.weight)
        parts.append(sign + term.label() + ("" if size == 1 else f":{size:g}"))
    return "".join(parts)
