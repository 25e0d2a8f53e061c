"""Evaluation: Recall@1/5/10 both ways on image-caption pairs, and zero-shot classification accuracy.

Follows the official Chinese-CLIP protocol; shared by `cnclip eval` and the trainer's validation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnclip.errors import CNClipError
from cnclip.model.embed import embed_files
from cnclip.model.transform import IMAGE_EXTENSIONS
from cnclip.model.zeroshot import PROMPT_TEMPLATES, label_embeddings
from cnclip.train.lines import read_lines
from cnclip.userpath import expand_user

if TYPE_CHECKING:
    from cnclip.model.clip import CNClipModel
    from cnclip.model.encoder import Encoder
    from cnclip.train.pairs import Pair

RECALL_AT = (1, 5, 10)  # the official Chinese-CLIP retrieval metrics
TOP_K = (1, 5)  # zero-shot accuracy
# Query rows scored per step, so that the float32 score block stays near 16 MiB whatever the sizes
# (5,000 images x 25,000 texts would be 500 MB at once).
_BLOCK_ELEMENTS = 1 << 22
_NORM_TOLERANCE = 1e-3

ProgressFn = Callable[[int, int], None]  # (images done, images total)


class EvaluationError(CNClipError, ValueError):
    """Evaluation input that cannot give a meaningful number: no pairs, mismatched shapes, bad labels."""


# -- metrics on features --------------------------------------------------------------------------


def match_ranks(
    queries: np.ndarray,
    candidates: np.ndarray,
    query_groups: np.ndarray,
    candidate_groups: np.ndarray,
    chunk_rows: int | None = None,
) -> np.ndarray:
    """int64 (Q,): for each query, the 0-based rank of its best-scoring matching candidate.

    A candidate matches a query when their group ids are equal; scores are dot products of the
    float32 rows. The rank is the number of non-matching candidates that score *at least as high*:
    ties count against the match, so a collapsed model whose vectors are all equal ranks every
    match last, not first. A query with no matching candidate gets rank C (a miss at every K).
    Queries are scored `chunk_rows` at a time (default: blocks of about 4M scores).
    """
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")
    step = chunk_rows or max(1, _BLOCK_ELEMENTS // max(len(candidates), 1))
    ranks = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), step):
        stop = min(start + step, len(queries))
        scores = queries[start:stop] @ candidates.T
        match = query_groups[start:stop, None] == candidate_groups[None, :]
        best = np.where(match, scores, -np.inf).max(axis=1, initial=-np.inf)
        ranks[start:stop] = np.count_nonzero((scores >= best[:, None]) & ~match, axis=1)
    return ranks


def retrieval_metrics(
    image_features: np.ndarray,
    text_features: np.ndarray,
    text_to_image: np.ndarray,
    *,
    chunk_rows: int | None = None,
) -> dict:
    """Recall@1/5/10 text->image and image->text, as fractions in [0, 1], and their mean ("MR").

    `image_features` (I, D) and `text_features` (T, D) have L2-normalized rows, so scores are
    cosines; `text_to_image` (T,) gives each text's image row. Text->image: a hit at K when the
    text's own image ranks in the top K of all I images. Image->text: a hit at K when *any* of
    the image's captions ranks in the top K of all T texts. Ties count against the hit (see
    `match_ranks`). Every image needs at least one caption.
    """
    images = _unit_rows("image_features", image_features)
    texts = _unit_rows("text_features", text_features)
    if images.shape[1] != texts.shape[1]:
        raise EvaluationError(
            f"image features are {images.shape[1]}-d but text features {texts.shape[1]}-d; embed both with one model"
        )
    owners = _owners(text_to_image, len(texts), len(images))
    image_ids = np.arange(len(images))
    t2i = _recalls(match_ranks(texts, images, owners, image_ids, chunk_rows))
    i2t = _recalls(match_ranks(images, texts, image_ids, owners, chunk_rows))
    return {"t2i": t2i, "i2t": i2t, "MR": float(np.mean([*t2i.values(), *i2t.values()]))}


def _recalls(ranks: np.ndarray) -> dict[str, float]:
    return {f"R@{k}": float(np.mean(ranks < k)) for k in RECALL_AT}


def _unit_rows(name: str, features: np.ndarray) -> np.ndarray:
    rows = np.ascontiguousarray(features, dtype=np.float32)
    if rows.ndim != 2 or len(rows) == 0:
        raise EvaluationError(f"{name} must be a non-empty (N, D) array, not shape {rows.shape}")
    if not np.isfinite(rows).all():
        raise EvaluationError(f"{name} holds NaN or infinite values; the model's output is broken")
    norms = np.linalg.norm(rows, axis=1)
    if np.abs(norms - 1).max() > _NORM_TOLERANCE:
        raise EvaluationError(f"{name} rows must be L2-normalized (as embed_images/embed_texts return them)")
    return rows


def _owners(text_to_image: np.ndarray, texts: int, images: int) -> np.ndarray:
    owners = np.asarray(text_to_image)
    if owners.shape != (texts,) or not np.issubdtype(owners.dtype, np.integer):
        raise EvaluationError(f"text_to_image must be {texts} integer image rows, not {owners.dtype} {owners.shape}")
    if owners.min() < 0 or owners.max() >= images:
        raise EvaluationError(f"text_to_image points outside the {images} images")
    captioned = np.bincount(owners, minlength=images)
    if not captioned.all():
        raise EvaluationError(
            f"image row {int(np.argmin(captioned))} has no caption; every image needs at least one text"
        )
    return owners


# -- image-caption pairs --------------------------------------------------------------------------


def embed_pairs(
    encoder: Encoder, pairs: Sequence[Pair], batch_size: int = 64, progress: ProgressFn | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Embed each distinct image once (first-seen order) and every caption.

    Returns (image_features (I, D), text_features (T, D), text_to_image (T,), failed): the
    captions of an image that cannot be decoded are left out, and `failed` names it as
    "path: reason". `progress(done, total)` is called after each batch of images.
    """
    paths = list(dict.fromkeys(p.image for p in pairs))
    if not paths:
        raise EvaluationError("no image-caption pairs to evaluate; check the data file")
    kept, image_features, failed = _embed_images(encoder, paths, batch_size, progress)
    row = {path: i for i, path in enumerate(kept)}
    captioned = [p for p in pairs if p.image in row]
    if not captioned:
        raise EvaluationError(f"none of the {len(paths)} images could be read, e.g. {failed[0]}")
    text_features = encoder.embed_texts([p.text for p in captioned], batch_size=batch_size)
    text_to_image = np.array([row[p.image] for p in captioned], dtype=np.int64)
    return image_features, text_features, text_to_image, failed


def evaluate_pairs(
    encoder: Encoder,
    pairs: Sequence[Pair],
    batch_size: int = 64,
    *,
    progress: ProgressFn | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> dict:
    """`retrieval_metrics` of `encoder` on `pairs`, plus "images" and "texts" evaluated and the
    number of images that "failed" to decode (each also passed to `on_skip` as "path: reason").
    A model being trained is evaluated through `Encoder.build(model)`, in eval mode."""
    image_features, text_features, text_to_image, failed = embed_pairs(encoder, pairs, batch_size, progress)
    _report_skipped(failed, on_skip)
    metrics = retrieval_metrics(image_features, text_features, text_to_image)
    return {**metrics, "images": len(image_features), "texts": len(text_features), "failed": len(failed)}


def compare_precisions(
    model: CNClipModel, pairs: Sequence[Pair], precision: str = "bf16", batch_size: int = 64, top: int = 10
) -> dict:
    """Search quality of `precision` against fp32 on real pairs: `retrieval_metrics` with both
    towers in fp32, both in `precision`, and each mixed way (an index built in one precision and
    searched in the other), plus the mean share of each caption's top-`top` images that the
    fp32 ranking and each other ranking agree on. `model` should be fp32 (it is not changed)."""
    from cnclip.model.calibrate import overlap
    from cnclip.model.encoder import Encoder
    from cnclip.model.runtime import Runtime

    image32, text32, owners, _ = embed_pairs(Encoder.build(model), pairs, batch_size)
    # resolved, not built: int8 runs the image tower in ONNX Runtime (and the text tower in fp32)
    other = Runtime.resolve(str(model.device), precision=precision).build(model)
    image_lo, text_lo, _, _ = embed_pairs(other, pairs, batch_size)
    combos = {
        "fp32": (image32, text32),
        precision: (image_lo, text_lo),
        f"{precision} images, fp32 text": (image_lo, text32),
        f"fp32 images, {precision} text": (image32, text_lo),
    }
    out = {}
    for name, (images, texts) in combos.items():
        out[name] = retrieval_metrics(images, texts, owners)
        out[name][f"top{top}_overlap"] = overlap(text32, image32, texts, images, top)
    return out


# -- zero-shot classification ---------------------------------------------------------------------


def zero_shot_accuracy(
    encoder: Encoder,
    folder: str | os.PathLike,
    labels: str | os.PathLike | None = None,
    *,
    batch_size: int = 64,
    templates: Sequence[str] = PROMPT_TEMPLATES,
    progress: ProgressFn | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> dict:
    """Top-1 and top-5 accuracy (fractions) of zero-shot labels on a folder-per-class dataset.

    `folder/<class>/...` holds each class's images (walked recursively; hidden files skipped).
    Label names come from the `labels` file (see `class_labels`), else the folder names; each
    label's prompts are averaged as `cnclip.zero_shot` does. Unreadable images are skipped,
    counted in "failed" and passed to `on_skip` as "path: reason". Ties count against the hit.
    """
    root = expand_user(folder)
    classes = class_folders(root)
    names = class_labels(classes, labels)
    paths, truth = [], []
    for index, name in enumerate(classes):
        found = _image_files(root / name)
        paths += found
        truth += [index] * len(found)
    if not paths:
        raise EvaluationError(f"{folder}: no image files in its class folders")
    label_vectors = label_embeddings(encoder, names, templates)
    kept, image_vectors, failed = _embed_images(encoder, paths, batch_size, progress)
    _report_skipped(failed, on_skip)
    if not kept:
        raise EvaluationError(f"none of the {len(paths)} images could be read, e.g. {failed[0]}")
    class_of = dict(zip(paths, truth, strict=True))
    ranks = match_ranks(image_vectors, label_vectors, np.array([class_of[p] for p in kept]), np.arange(len(classes)))
    accuracy = {f"top{k}": float(np.mean(ranks < k)) for k in TOP_K}
    return {**accuracy, "images": len(kept), "classes": len(classes), "failed": len(failed)}


def class_folders(folder: str | os.PathLike) -> list[str]:
    """The class folder names under `folder`, sorted (hidden ones left out)."""
    root = expand_user(folder)
    if not root.is_dir():
        raise EvaluationError(f"{folder} is not a folder; give a folder with one sub-folder of images per class")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise EvaluationError(f"{folder} has no class folders; put each class's images in a sub-folder")
    return classes


def class_labels(classes: Sequence[str], labels: str | os.PathLike | None = None) -> list[str]:
    """The label name of each class folder in `classes` (sorted folder names).

    Without a labels file, the folder names. A labels file (UTF-8) either maps folders to labels,
    one `folder<TAB>标签` per line, or lists the label names one per line in sorted folder order.
    """
    if labels is None:
        return list(classes)
    lines = read_lines(labels)
    tabbed = ["\t" in line for line in lines]
    if all(tabbed):
        names = _mapped_labels(labels, lines, classes)
    elif not any(tabbed):
        if len(lines) != len(classes):
            raise EvaluationError(
                f"{labels} lists {len(lines)} labels for {len(classes)} class folders; give one label per "
                "folder in sorted folder order, or map them as folder<TAB>label"
            )
        names = [line.strip() for line in lines]
    else:
        raise EvaluationError(f"{labels} mixes folder<TAB>label lines with plain labels; use one form")
    seen: dict[str, str] = {}
    for folder, name in zip(classes, names, strict=True):
        if name in seen:
            raise EvaluationError(f"{labels} gives {name} to both {seen[name]} and {folder}; labels must differ")
        seen[name] = folder
    return names


def _mapped_labels(labels: str | os.PathLike, lines: list[str], classes: Sequence[str]) -> list[str]:
    mapping: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        folder, _, name = (part.strip() for part in line.partition("\t"))
        if not folder or not name:
            raise EvaluationError(f"{labels}, line {number}: expected folder<TAB>label, got {line!r}")
        mapping[folder] = name
    missing = [c for c in classes if c not in mapping]
    if missing:
        raise EvaluationError(f"{labels} has no label for class folder(s) {', '.join(missing[:5])}")
    return [mapping[c] for c in classes]


def _image_files(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            os.path.join(dirpath, name)
            for name in sorted(filenames)
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        ]
    return found


# -- shared -----------------------------------------------------------------------------------------


def _embed_images(
    encoder: Encoder, paths: Sequence[str], batch_size: int, progress: ProgressFn | None
) -> tuple[list[str], np.ndarray, list[str]]:
    """The paths that decoded (in order), their unit rows, and "path: reason" for the others."""
    kept: list[str] = []
    chunks = [np.empty((0, encoder.embed_dim), dtype=np.float32)]
    failed: list[str] = []
    for batch in embed_files(encoder, paths, batch_size=batch_size):
        kept += batch.paths
        chunks.append(batch.vectors)
        # ImageError messages already start with the file name
        failed += [reason if reason.startswith(path) else f"{path}: {reason}" for path, reason in batch.failed]
        if progress is not None:
            progress(len(kept) + len(failed), len(paths))
    return kept, np.concatenate(chunks), failed


def _report_skipped(failed: list[str], on_skip: Callable[[str], None] | None) -> None:
    if on_skip is not None:
        for line in failed:
            on_skip(line)
