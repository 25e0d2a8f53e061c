"""Vector sets for index tests: clustered like real embeddings, catalog-like ids, brute-force truth."""

from __future__ import annotations

import numpy as np

DIM = 64


def clustered(n: int, dim: int = DIM, *, seed: int = 0, stream: int = 0, clusters: int = 200) -> np.ndarray:
    """L2-normalised mixture of Gaussians in a 16-d subspace: ANN-searchable like real embeddings."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, 16)))
    centers = rng.standard_normal((clusters, 16))
    r = np.random.default_rng([seed, stream])
    x = (centers[r.integers(0, clusters, n)] + 0.5 * r.standard_normal((n, 16))) @ basis.T
    x += 0.05 * r.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def catalog_ids(n: int, seed: int = 1) -> np.ndarray:
    """Arbitrary unique int64 ids (large, negative, unordered), as a catalog might hand out."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(-(2**40), 2**40, 2**20 + 7, dtype=np.int64), n, replace=False)
    return ids.astype(np.int64)


def brute_force(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist(), strict=True)]))
