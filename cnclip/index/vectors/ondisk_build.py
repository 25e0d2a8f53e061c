"""How an on-disk (OPQ+)IVF-PQ index is built: both passes over the input, the merge, then nprobe.

The build reads a re-readable stream of (ids, vectors) chunks twice: the first pass draws the
sample that trains the quantizers (cnclip.index.vectors.ondisk_train); the second encodes the
rows shard by shard into files, which are then written out together as one `.ivfdata` file of
inverted lists (cnclip.index.vectors.ondisk_files). The files the passes produce are keyed by
their content, so an interrupted build, run again, reuses its trained quantizers and every
finished shard. Nothing is loadable before META_FILE is renamed into place at the very end.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cnclip.errors import CNClipError
from cnclip.index.vectors.inputs import MISSING, as_ids, as_vectors
from cnclip.index.vectors.ondisk_files import BUILD_DIR, PREFIX, Shard, digest, write_arrays, write_files
from cnclip.index.vectors.ondisk_train import Plan, draw_sample, encode, noisy_queries, trained_index
from cnclip.index.vectors.threads import omp_threads
from cnclip.index.vectors.tuning import MIN_NPROBE, recall

__all__ = ["SHARD_ROWS", "Built", "Chunks", "Source", "as_source", "checked_ids", "choose_nprobe", "write_index_files"]

log = logging.getLogger(__name__)

# Rows encoded into one shard file. The shard's raw vectors are buffered before it is encoded
# (its key is a digest of them, so a rerun can skip it), which costs 4*dim bytes a row: 2 GB at
# 512-d. At 10^8 rows this makes 100 shards.
SHARD_ROWS = 1_000_000
# Rows scored at a time when the recall queries' exact top-10 is updated.
_TOPK_ROWS = 65_536

Chunks = Iterable[tuple[np.ndarray, np.ndarray]]
Source = Callable[[], Chunks] | Chunks

# -- input --------------------------------------------------------------------------------------


def as_source(chunks: Source) -> Callable[[], Chunks]:
    """`chunks` as a function that returns a fresh iterator each time (the build reads it twice)."""
    if callable(chunks):
        return chunks
    if iter(chunks) is chunks:
        raise CNClipError(
            "the on-disk build reads its input twice; pass a function returning a fresh iterator "
            "(e.g. catalog.file_vectors) or a list of (ids, vectors) chunks, not a one-shot iterator"
        )
    return lambda: iter(chunks)


def _validated(chunks: Chunks, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for chunk_ids, chunk_vectors in chunks:
        vectors = as_vectors(chunk_vectors, dim)
        ids = checked_ids(chunk_ids, vectors.shape[0])
        if ids.size:
            yield ids, vectors


def checked_ids(ids: np.ndarray, n: int) -> np.ndarray:
    """`ids` as int64, one per vector, none of them the id faiss marks empty results with."""
    ids = as_ids(ids, n)
    if (ids == MISSING).any():
        raise CNClipError(f"id {MISSING} is reserved (faiss marks empty results with it); use another id")
    return ids


# -- pass 2: shards -----------------------------------------------------------------------------


def _sorted_by_cell(cells: np.ndarray, ids: np.ndarray, codes: np.ndarray, nlist: int):
    order = np.argsort(cells, kind="stable")
    return np.bincount(cells, minlength=nlist).astype(np.int64), ids[order], codes[order]


class _Filler:
    """Pass 2: cuts the stream into shards of exactly `shard_rows` rows and encodes each one.

    Exact cuts make a shard's content, and so its key, independent of the input's chunking.
    Alongside, it collects every id and the exact top-10 of the recall queries.
    """

    def __init__(self, index: faiss.Index, index_key: str, plan: Plan, work: Path, total: int, queries: np.ndarray):
        self.index, self.index_key, self.plan, self.work = index, index_key, plan, work
        rows = min(plan.shard_rows, total)
        self.buf_ids = np.empty(rows, dtype=np.int64)
        self.buf_vectors = np.empty((rows, plan.dim), dtype=np.float32)
        self.fill = 0
        self.all_ids = np.empty(total, dtype=np.int64)
        self.n = 0
        self.total = total
        self.truth = _TopK(queries, 10)
        self.shards: list[Shard] = []
        self.reused = 0

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        m = ids.shape[0]
        if self.n + m > self.total:
            raise CNClipError(f"the source yielded more than total={self.total:,} rows; pass the true count")
        self.all_ids[self.n : self.n + m] = ids
        self.n += m
        self.truth.update(ids, vectors)
        start = 0
        while start < m:
            take = min(m - start, self.buf_ids.shape[0] - self.fill)
            self.buf_ids[self.fill : self.fill + take] = ids[start : start + take]
            self.buf_vectors[self.fill : self.fill + take] = vectors[start : start + take]
            self.fill += take
            start += take
            if self.fill == self.buf_ids.shape[0]:
                self.flush()

    def finish(self) -> np.ndarray:
        """Encode the last, partial shard; every id, sorted (checked unique)."""
        self.flush()
        if self.n == 0:
            raise CNClipError("there are no vectors to index (the second pass over the source was empty)")
        all_ids = np.sort(self.all_ids[: self.n])
        self.all_ids = self.buf_ids = self.buf_vectors = None
        if all_ids.size > 1 and (all_ids[1:] == all_ids[:-1]).any():
            raise CNClipError("ids must be unique; each catalog file id may appear once")
        return all_ids

    def flush(self) -> None:
        if self.fill == 0:
            return
        ids, vectors = self.buf_ids[: self.fill], self.buf_vectors[: self.fill]
        key = digest(self.index_key, ids, vectors)
        path = self.work / f"shard-{key}"
        if path.is_dir():
            self.reused += 1
            log.info("shard %d: reusing %s (%d rows)", len(self.shards), path.name, self.fill)
        else:
            cells, codes = encode(self.index, vectors)
            sizes, ids, codes = _sorted_by_cell(cells, ids, codes, self.plan.nlist)
            write_arrays(path, {"sizes": sizes, "ids": ids, "codes": codes})
            log.info("shard %d: encoded %d rows into %s", len(self.shards), self.fill, path.name)
        self.shards.append(Shard(path))
        self.fill = 0


class _TopK:
    """Running exact top-k (by inner product) of a few queries over a stream of chunks."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries, self.k = queries, k
        self.scores = np.empty((queries.shape[0], 0), dtype=np.float32)
        self.ids = np.empty((queries.shape[0], 0), dtype=np.int64)

    def update(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self.queries.shape[0] == 0:
            return
        if vectors.shape[0] > _TOPK_ROWS:  # bound the (queries x rows) score matrix
            for s in range(0, vectors.shape[0], _TOPK_ROWS):
                self.update(ids[s : s + _TOPK_ROWS], vectors[s : s + _TOPK_ROWS])
            return
        scores = self.queries @ vectors.T
        kk = min(self.k, scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        self.scores = np.concatenate([self.scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        self.ids = np.concatenate([self.ids, ids[top]], axis=1)
        if self.scores.shape[1] > self.k:
            keep = np.argpartition(-self.scores, self.k - 1, axis=1)[:, : self.k]
            self.scores = np.take_along_axis(self.scores, keep, axis=1)
            self.ids = np.take_along_axis(self.ids, keep, axis=1)


# -- the whole build ----------------------------------------------------------------------------


@dataclass
class Built:
    """What `write_index_files` wrote and measured: the files' names (header, lists, ids), the
    build's params so far, the held-out recall queries and the ids of their exact top-10."""

    files: dict[str, str]
    params: dict[str, Any]
    queries: np.ndarray
    truth: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


def write_index_files(
    folder: Path, source: Callable[[], Chunks], total: int, options: dict, target: float, rerank_factor: int
) -> Built:
    """Both passes and the merge, into `folder` (work files in its BUILD_DIR, reused by a rerun).

    `options` are `Plan.resolve`'s keyword arguments; the params returned hold the plan, what was
    reused and a first nprobe, which `choose_nprobe` then settles for `target` recall."""
    work = folder / BUILD_DIR
    work.mkdir(parents=True, exist_ok=True)
    for stale in [*work.glob(".*.tmp*"), *folder.glob(f".{PREFIX}*.tmp*")]:  # from a killed build
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    dim, seed = options["dim"], options["seed"]
    timings: dict[str, float] = {}

    t = time.perf_counter()
    plan = Plan.resolve(total, **options)
    n, sample = draw_sample(_validated(source(), dim), dim, plan.ntrain + plan.nqueries, total, seed)
    if n == 0:
        raise CNClipError("there are no vectors to index")
    if n < total:
        plan = Plan.resolve(n, **options)
    queries = noisy_queries(sample[plan.ntrain : plan.ntrain + plan.nqueries], seed)
    sample = sample[: plan.ntrain]
    timings["sample_s"] = time.perf_counter() - t

    t = time.perf_counter()
    index, index_key, trained_now = trained_index(plan, sample, work)
    del sample
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    filler = _Filler(index, index_key, plan, work, total, queries)
    for ids, vectors in _validated(source(), dim):
        filler.add(ids, vectors)
    all_ids = filler.finish()
    timings["fill_s"] = time.perf_counter() - t

    t = time.perf_counter()
    key = digest(index_key, *[shard.path.name for shard in filler.shards])
    names = write_files(folder, key, index, filler.shards, all_ids)
    timings["merge_s"] = time.perf_counter() - t

    params: dict[str, Any] = {
        **{k: v for k, v in asdict(plan).items() if k != "dim"},
        "code_size": int(faiss.extract_index_ivf(index).code_size),
        "built_ntotal": int(all_ids.size),
        "shards": len(filler.shards),
        "shards_reused": filler.reused,
        "trained_reused": not trained_now,
        "rerank_factor": rerank_factor,
        "target_recall": target,
        "nprobe": min(plan.nlist, MIN_NPROBE),
        "key": key,
    }
    return Built(names, params, queries, filler.truth.ids, timings)


# (queries, k, nprobe) -> PQ top-k (scores, ids) over every list: what a search ranks before re-ranking.
Candidates = Callable[[np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]


def choose_nprobe(
    candidates: Candidates, queries: np.ndarray, truth: np.ndarray, target: float, *, nlist: int, fetch: int
) -> tuple[int, float, dict[str, Any]]:
    """Double nprobe until the PQ candidates hold `target` of the exact top-10, then once more.

    The candidates (the top `fetch` = rerank_factor*10) are what exact re-ranking sorts, so this
    is the recall@10 a reranked search gets; without re-ranking the PQ codes' own error caps
    recall (0.75 at PQ64 on the 10^6 benchmark) and more cells do not raise it. The extra
    doubling is margin: real text queries sit further from the image vectors than the noisy
    image vectors measured here. Each step costs one search of the queries (~0.1 s at 10^6).
    Returns nprobe, the recall@10 without re-ranking there, and the params that record both.
    """
    nprobe = min(nlist, MIN_NPROBE)
    while True:
        _, found = candidates(queries, fetch, nprobe)
        at_10, low = recall(found[:, :10], truth)
        reranked, reranked_low = recall(found, truth)
        log.debug("nprobe=%d: recall@10 %.4f, re-ranked %.4f (>= %.4f)", nprobe, at_10, reranked, reranked_low)
        if reranked_low >= target or nprobe >= nlist:
            break
        nprobe = min(nlist, nprobe * 2)
    if nprobe < nlist:
        nprobe = min(nlist, nprobe * 2)
        _, found = candidates(queries, fetch, nprobe)
        (at_10, low), (reranked, reranked_low) = recall(found[:, :10], truth), recall(found, truth)
    if reranked_low < target:
        log.warning(
            "on-disk index: the top-%d PQ candidates hold only %.3f of the exact top-10 at nprobe=%d",
            fetch,
            reranked,
            nprobe,
        )
    log.info("on-disk index: nprobe=%d, recall@10 %.3f (%.3f with exact re-ranking)", nprobe, at_10, reranked)
    with omp_threads(1):
        times = []
        for q in queries[:20]:
            t = time.perf_counter()
            candidates(q[None, :], 10, nprobe)
            times.append(time.perf_counter() - t)
    params = dict(
        nprobe=nprobe,
        recall_queries=int(queries.shape[0]),
        recall_at_10_low=round(low, 4),
        recall_at_10_reranked=round(reranked, 4),
        recall_at_10_reranked_low=round(reranked_low, 4),
        search_ms_p50=round(float(np.median(times)) * 1e3, 3) if times else None,
    )
    return nprobe, at_10, params
