"""Embedding on a Ray cluster (or a local Ray instance): Ray Data decodes and embeds, shards land on disk.

The pipeline is Ray Data's: the files to embed (found and hashed by `Indexer`, exactly as in a
single-process run) → decode (CPU tasks) → embed (actors, one model each, on GPUs when the
cluster has them) → embedding shards of `shard_size` files written as Parquet → merged into
the SQLite catalog by `Indexer`, batch by batch, as in a single-process run.

Restartable: a shard's file name is a digest of the model, the decoding options and the content
hashes of its files, so a rerun (after a crash, or on a folder that grew) reads finished shards
back instead of recomputing them. On a multi-machine cluster `shard_dir` must be storage every
node and the driver can read.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnclip import atomic
from cnclip.errors import CNClipError
from cnclip.model.embed import EmbeddedBatch

if TYPE_CHECKING:
    from cnclip.model.encoder import Encoder

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".parquet"


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray: `address` None starts a local instance; `workers` embedding actors."""

    address: str | None = None
    workers: int = 2
    shard_size: int = 1024
    batch_size: int = 32
    shard_dir: str | None = None  # default: <index folder>/shards
    num_cpus: int | None = None  # for a local instance (tests: 2)
    gpus_per_worker: float = 0.0  # 1.0 puts each embedding actor on its own GPU
    device: str | None = None  # for the actors' model (default: cuda with gpus_per_worker, else cpu)
    backend: str | None = None  # as `--backend` (see cnclip.model.runtime)


@dataclass
class ShardReport:
    """What a run did with its shards: written now, or read back from an earlier run."""

    computed: int = 0
    reused: int = 0
    reused_files: int = 0  # decoded files in the reused shards


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data ships in the ray[data] extra)
    except ImportError as e:
        raise CNClipError("Ray is not installed; pip install 'cnclip[ray]' (ray[data] and pyarrow)") from e
    return ray


def shard_key(model_digest: str, options: str, digests: Sequence[str]) -> str:
    """The name of the shard holding `digests` (content hashes, in order) embedded by this model this way."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{model_digest}\n{options}\n".encode())
    for d in digests:
        h.update(d.encode() + b"\n")
    return h.hexdigest()


def write_shard(path: Path, digests: Sequence[str], paths: Sequence[str], vectors: np.ndarray, errors: Sequence[str]):
    """One shard as Parquet (digest, path, vector, error), written to a temporary name and renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    table = pa.table(
        {
            "digest": pa.array(list(digests), pa.string()),
            "path": pa.array([p.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for p in paths]),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
            "error": pa.array(list(errors), pa.string()),
        }
    )
    with atomic.replacing(path) as tmp:
        pq.write_table(table, tmp)


def read_shard(path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(digests, float32 vectors (n, dim), errors ('' where the file embedded)) of a shard file."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        vectors = table.column("vector").combine_chunks()
        dim = vectors.type.list_size
        array = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
        return table.column("digest").to_pylist(), array, table.column("error").to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise CNClipError(f"{path} is not a readable embedding shard ({e}); delete it and run again") from e


def _decode_batch(batch: dict[str, np.ndarray], image_size: int, max_pixels: int, draft: bool) -> dict:
    """Ray Data stage: paths -> preprocessed pixels, or an error line per file (CPU tasks)."""
    from cnclip.model.embed import decode_for_model

    pixels = np.zeros((len(batch["path"]), 3, image_size, image_size), dtype=np.float32)
    errors = []
    for i, path in enumerate(batch["path"]):
        result = decode_for_model(str(path), image_size, max_pixels, draft)
        if isinstance(result, str):
            errors.append(result)
        else:
            pixels[i] = result.numpy()
            errors.append("")
    return {**batch, "pixels": pixels, "error": np.array(errors, dtype=object)}


class _Embed:
    """Ray Data stage: one model per actor; pixels -> unit vectors (rows that failed to decode stay zero)."""

    def __init__(self, source: str, device: str, backend: str | None):
        from cnclip.model.checkpoint import load_model
        from cnclip.model.runtime import Runtime

        runtime = Runtime.resolve(device=device, backend=backend)
        self.encoder = runtime.build(load_model(source))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from cnclip.model.encoder import unit_rows

        ok = np.array([not e for e in batch["error"]], dtype=bool)
        vectors = np.zeros((len(ok), self.encoder.embed_dim), dtype=np.float32)
        if ok.any():
            vectors[ok] = unit_rows(self.encoder.image_features(torch.from_numpy(batch["pixels"][ok])))
        return {"path": batch["path"], "digest": batch["digest"], "shard": batch["shard"], "vector": vectors,
                "error": batch["error"]}  # fmt: skip


def embed_with_ray(
    encoder: Encoder,
    items: Sequence[tuple[str, str]],
    options: RayOptions,
    shard_dir: Path,
    *,
    max_pixels: int,
    draft: bool,
    report: ShardReport | None = None,
    on_shard: Callable[[str], None] | None = None,
) -> Iterator[EmbeddedBatch]:
    """Embed `items` ((path, content hash) pairs) on Ray, one `EmbeddedBatch` per shard, in order.

    Shards already in `shard_dir` are read back instead of computed. The actors load the model
    from `encoder.source` (a path or name every node can load). `on_shard(key)` runs after each
    shard is written (tests use it to interrupt a run).
    """
    if not items:
        return
    if not encoder.source:
        raise CNClipError("--ray needs a model the workers can load (a zoo name or a path), not one built in memory")
    report = report if report is not None else ShardReport()
    shard_dir.mkdir(parents=True, exist_ok=True)
    how = f"size={encoder.config.vision.image_size};max_pixels={max_pixels};draft={draft}"
    shards = []
    for start in range(0, len(items), options.shard_size):
        chunk = list(items[start : start + options.shard_size])
        key = shard_key(encoder.weights_digest(), how, [d for _, d in chunk])
        shards.append((key, chunk))
    pending = [(key, chunk) for key, chunk in shards if not (shard_dir / f"{key}{SHARD_SUFFIX}").is_file()]
    computed = _run_pipeline(encoder, pending, options, shard_dir, max_pixels, draft, on_shard)
    for key, chunk in shards:
        digests, vectors, errors = read_shard(shard_dir / f"{key}{SHARD_SUFFIX}")
        if key in computed:
            report.computed += 1
        else:
            report.reused += 1
            report.reused_files += sum(1 for e in errors if not e)
        by_digest = {d: (v, e) for d, v, e in zip(digests, vectors, errors, strict=True)}
        ok_paths, ok_vectors, failed = [], [], []
        for path, digest in chunk:
            vector, error = by_digest[digest]
            if error:
                failed.append((path, error))
            else:
                ok_paths.append(path)
                ok_vectors.append(vector)
        dim = encoder.embed_dim
        yield EmbeddedBatch(ok_paths, np.array(ok_vectors, dtype=np.float32).reshape(-1, dim), failed)


def _run_pipeline(encoder, pending, options: RayOptions, shard_dir, max_pixels, draft, on_shard) -> set[str]:
    """Run Ray Data over the files of the `pending` shards; write each shard as it completes."""
    if not pending:
        return set()
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"address": options.address} if options.address else {"num_cpus": options.num_cpus}
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, **kwargs)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset INFO lines would land on the user's stderr
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # shards complete one after another
        context.enable_progress_bars = False
        rows = [{"path": p, "digest": d, "shard": key} for key, chunk in pending for p, d in chunk]
        expected = {key: len(chunk) for key, chunk in pending}
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // options.batch_size))
        ds = ds.map_batches(
            _decode_batch,
            fn_kwargs={"image_size": encoder.config.vision.image_size, "max_pixels": max_pixels, "draft": draft},
            batch_size=options.batch_size,
            batch_format="numpy",
            num_cpus=1,
        )
        ds = ds.map_batches(
            _Embed,
            fn_constructor_args=(
                encoder.source,
                options.device or ("cuda" if options.gpus_per_worker else "cpu"),
                options.backend,
            ),
            batch_size=options.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=options.workers),
            num_gpus=options.gpus_per_worker or None,
        )
        buffers: dict[str, list] = {}
        done = set()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for path, digest, key, vector, error in zip(
                batch["path"], batch["digest"], batch["shard"], batch["vector"], batch["error"], strict=True
            ):
                buffers.setdefault(key, []).append((str(digest), str(path), vector, str(error)))
                if len(buffers[key]) == expected[key]:
                    rows_ = buffers.pop(key)
                    write_shard(
                        shard_dir / f"{key}{SHARD_SUFFIX}",
                        [r[0] for r in rows_],
                        [r[1] for r in rows_],
                        np.stack([r[2] for r in rows_]),
                        [r[3] for r in rows_],
                    )
                    done.add(key)
                    log.info("wrote shard %s (%d files)", key, len(rows_))
                    if on_shard is not None:
                        on_shard(key)
        if len(done) != len(pending):
            raise CNClipError(f"Ray returned {len(done)} of {len(pending)} shards; run again to finish the rest")
        return done
    finally:
        if started_here:
            ray.shutdown()
