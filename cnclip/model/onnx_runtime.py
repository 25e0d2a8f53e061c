"""Running exported towers with ONNX Runtime, without PyTorch.

Nothing here imports torch (~2.5 s) or builds a model (open_clip and transformers, ~5 s more):
a `cnclip search` whose text tower was exported before answers from ONNX Runtime, the
tokenizer and the vector index alone, in about a second instead of ~8 s. Exporting, which needs
the PyTorch model, lives in `cnclip.model.onnx_export`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnclip import atomic
from cnclip.errors import CNClipError
from cnclip.model.tokenizer import Tokenizer, text_batches

CACHE_ENV = "CNCLIP_CACHE"
TEXT_TOKENIZER = "text-tokenizer.json"  # beside text.onnx in the cache: how its queries are tokenized
# Part of every export's cache key: bump it whenever the export changes (opset, inputs, outputs, graph),
# so that a cnclip upgrade exports again instead of reusing stale files forever.
EXPORT_VERSION = 2


def cache_dir() -> Path:
    """Where derived files (exported towers) are kept: `$CNCLIP_CACHE`, else ~/.cache/cnclip."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cnclip")


def export_folder(digest: str, root: str | os.PathLike | None = None) -> Path:
    """The cache folder of the exports of the model whose weights digest is `digest`."""
    return (Path(root) if root is not None else cache_dir() / "onnx") / f"{digest}-v{EXPORT_VERSION}"


def _threads() -> int:
    # PyTorch's count when it is loaded: physical cores, or OMP_NUM_THREADS (which Ray sets per
    # actor), or what the user gave torch.set_num_threads. More threads than that only fight over
    # the same cores.
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise CNClipError("onnxruntime is not installed; pip install onnxruntime") from e
    return onnxruntime


class OnnxTower:
    """An exported tower run by ONNX Runtime on the CPU: numpy (or torch) in, float32 features (N, D) out.

    `rows_per_run` splits large batches into runs of that many rows (same output, better cache use).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, rows_per_run: int | None = None):
        ort = _ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or _threads()
        options.log_severity_level = 3  # errors only: ORT's own warnings would land on the user's stderr
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for bad or truncated files
            raise CNClipError(f"{path} is not a readable ONNX model ({str(e).splitlines()[0]}); export it again") from e
        self.input_name = self.session.get_inputs()[0].name
        self.path = Path(path)
        self.rows_per_run = rows_per_run

    def __call__(self, inputs) -> np.ndarray:
        if not isinstance(inputs, np.ndarray):  # a torch tensor
            inputs = inputs.cpu().numpy()
        dtype = np.int64 if self.input_name == "input_ids" else np.float32
        inputs = np.ascontiguousarray(inputs, dtype=dtype)
        if not len(inputs):  # some exported graphs cannot reshape an empty batch
            return np.zeros((0, self.session.get_outputs()[0].shape[-1]), dtype=np.float32)
        step = self.rows_per_run or len(inputs)
        starts = range(0, len(inputs), step)
        parts = [self.session.run(None, {self.input_name: inputs[i : i + step]})[0] for i in starts]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def save_text_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """Record beside an exported text tower how its input is tokenized (the vocabulary is copied)."""
    vocab = folder / "vocab.txt"
    if not vocab.exists():
        atomic.write_bytes(vocab, Path(tokenizer.vocab_path).read_bytes())
    atomic.write_json(folder / TEXT_TOKENIZER, {"vocab": "vocab.txt", "context_length": tokenizer.context_length})


class TextEncoder:
    """Text -> unit vectors from an exported text tower and its tokenizer, with no PyTorch model.

    Gives what `CNClipModel.embed_texts` gives with its text tower in ONNX Runtime (the same
    batching; rows equal to float32 rounding).
    """

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        try:
            spec = json.loads((folder / TEXT_TOKENIZER).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CNClipError(f"{folder} holds no usable text export ({e}); it is made again on next use") from e
        self.tokenizer = Tokenizer(folder / spec["vocab"], context_length=int(spec["context_length"]))
        self.tower = OnnxTower(folder / "text.onnx")

    @classmethod
    def cached(cls, digest: str, root: str | os.PathLike | None = None) -> TextEncoder | None:
        """The encoder of the model with weights digest `digest`, if its text tower was exported before."""
        folder = export_folder(digest, root)
        if not ((folder / "text.onnx").exists() and (folder / TEXT_TOKENIZER).exists()):
            return None
        try:
            return cls(folder)
        except CNClipError:
            return None  # unreadable: the caller loads the model instead, which says what is wrong

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Strings -> float32 (N, D), rows L2-normalized."""
        out = np.empty((len(texts), self.tower.session.get_outputs()[0].shape[-1]), dtype=np.float32)
        for rows, ids in text_batches(self.tokenizer, texts, batch_size):
            features = self.tower(ids)
            out[rows] = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        return out
