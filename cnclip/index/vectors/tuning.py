"""How the approximate kinds train and tune themselves: k-means settings, the recall target and its measurement.

Each ANN build scores its own recall@10 against exact search on a sample of the indexed vectors
(with a little noise added, so a query is near but not on a stored point) and widens nprobe until
the estimate minus two standard errors reaches TARGET_RECALL.
"""

from __future__ import annotations

import math

import numpy as np

# Recall@10 against exact search that an ANN build must measure before it settles on nprobe.
TARGET_RECALL: float = 0.95
# k-means iterations when training coarse quantizers (see cnclip.index.vectors.memory_build
# for the measurements)
KMEANS_ITER = 10
# faiss's k-means wants at least this many training points per centroid (it warns below).
MIN_TRAIN_PER_LIST = 39
# the smallest nprobe a build starts from
MIN_NPROBE = 8
RECALL_QUERIES = 200
# Norm of the isotropic noise added to sampled vectors to make recall queries: each query
# keeps cosine ~0.96 with the point it came from, so its neighbours are shuffled a little
# instead of the stored point being a trivial first hit.
QUERY_NOISE = 0.3


def recall(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Mean recall of `found` against `truth` rows, and that mean minus two standard errors."""
    if truth.size == 0:
        return 1.0, 1.0
    per_query = np.array([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)])
    mean = float(per_query.mean())
    return mean, mean - 2.0 * float(per_query.std()) / math.sqrt(len(per_query))
