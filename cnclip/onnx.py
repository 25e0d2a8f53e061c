"""ONNX export of the two towers, and ONNX Runtime sessions that run them on the CPU.

Why: on CPUs without AMX, PyTorch's GEMMs on the few rows of a text query are inefficient;
ONNX Runtime's fused BERT graph ran a ViT-B-16 query in about a third of the time (20.9 vs
65.5 ms), with the same output (cosine 1.0 to fp32 PyTorch). See scripts/bench/query.py for the figures.

Exports have a dynamic batch axis (and a dynamic length axis for text), take what
`encode_image` / `encode_text` take, and return their un-normalized features.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CNClipError
from .model import CNClipModel

log = logging.getLogger(__name__)

TOWERS = ("image", "text")
OPSET = 17
CACHE_ENV = "CNCLIP_CACHE"


def cache_dir() -> Path:
    """Where derived files (exported towers) are kept: `$CNCLIP_CACHE`, else ~/.cache/cnclip."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cnclip")


class _Tower(nn.Module):
    """One tower of a model as a module of its own, so the exporter traces just that tower."""

    def __init__(self, model: CNClipModel, tower: str):
        super().__init__()
        self.model = model
        self.encode = model.encode_text if tower == "text" else model.encode_image

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.encode(inputs)


def _example_ids(model: CNClipModel) -> torch.Tensor:
    # Two rows of different lengths: the traced graph must contain the padding-mask path, which
    # transformers skips when a batch has no padding.
    ids = model.tokenizer(["一张照片", "海边的日落和沙滩上的脚印"])
    return ids[:, : int(ids.ne(model.tokenizer.pad_id).sum(1).max())]


def export_onnx(
    model: CNClipModel, folder: str | os.PathLike, towers: tuple[str, ...] = TOWERS, opset: int = OPSET
) -> dict[str, Path]:
    """Write `image.onnx` (pixels (N, 3, s, s) -> features (N, D)) and/or `text.onnx`
    (input_ids (N, L) int64, [PAD]=0 -> features (N, D)) into `folder`; returns their paths."""
    unknown = set(towers) - set(TOWERS)
    if unknown:
        raise CNClipError(f"unknown tower(s) {', '.join(sorted(unknown))}; choose from {', '.join(TOWERS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if model.dtype != torch.float32 or model.training:
        raise CNClipError("export a float32 model in eval mode (what load_model returns)")
    s = model.config.vision.image_size
    # The wrappers must be in eval mode: the exporter restores the wrapper's mode afterwards, and
    # a wrapper in training mode would leave `model` (its child) with dropout switched on.
    jobs = {
        "text": (_Tower(model, "text").eval(), _example_ids(model), "input_ids", {0: "batch", 1: "length"}),
        "image": (_Tower(model, "image").eval(), torch.zeros(2, 3, s, s), "pixels", {0: "batch"}),
    }
    out = {}
    for tower in towers:
        module, example, name, axes = jobs[tower]
        path = folder / f"{tower}.onnx"
        tmp = folder / f".{tower}.onnx.{os.getpid()}.tmp"
        fastpath = torch.backends.mha.get_fastpath_enabled()
        try:
            # nn.MultiheadAttention's fused inference kernel has no ONNX form; the plain path does.
            torch.backends.mha.set_fastpath_enabled(False)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings about Python values in transformers' code
                torch.onnx.export(
                    module,
                    (example,),
                    str(tmp),
                    input_names=[name],
                    output_names=["features"],
                    dynamic_axes={name: axes, "features": {0: "batch"}},
                    opset_version=opset,
                    dynamo=False,
                )
            os.replace(tmp, path)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
            tmp.unlink(missing_ok=True)
        out[tower] = path
    return out


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise CNClipError("onnxruntime is not installed; pip install onnxruntime") from e
    return onnxruntime


class OnnxTower:
    """An exported tower run by ONNX Runtime on the CPU: numpy in, float32 features (N, D) out."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        ort = _ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or _cores()
        options.log_severity_level = 3  # errors only: ORT's own warnings would land on the user's stderr
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for bad or truncated files
            raise CNClipError(f"{path} is not a readable ONNX model ({str(e).splitlines()[0]}); export it again") from e
        self.input_name = self.session.get_inputs()[0].name
        self.path = Path(path)

    def __call__(self, inputs: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.cpu().numpy()
        dtype = np.int64 if self.input_name == "input_ids" else np.float32
        return self.session.run(None, {self.input_name: np.ascontiguousarray(inputs, dtype=dtype)})[0]


def cached_tower(model: CNClipModel, tower: str, folder: str | os.PathLike | None = None) -> OnnxTower:
    """An ONNX Runtime session for `model`'s `tower`, exporting it on first use.

    Exports are kept under `folder` (default `cache_dir()/onnx`) by the model's weights digest,
    so a changed model never reuses another model's export.
    """
    root = Path(folder) if folder is not None else cache_dir() / "onnx"
    target = root / model.weights_digest()
    path = target / f"{tower}.onnx"
    if not path.exists():
        log.info("exporting the %s tower to %s (once per model)", tower, path)
        target.mkdir(parents=True, exist_ok=True)
        # Export into a private folder, then move: two processes exporting at once both succeed.
        with tempfile.TemporaryDirectory(dir=target) as tmp:
            os.replace(export_onnx(model, tmp, (tower,))[tower], path)
    return OnnxTower(path)
