"""ONNX export of the two towers, and the per-model cache of exports (run by `cnclip.model.onnx_runtime`).

Why: on CPUs without AMX, PyTorch's GEMMs on the few rows of a text query are inefficient;
ONNX Runtime's fused BERT graph ran a ViT-B-16 query in about a third of the time (20.9 vs
65.5 ms), with the same output (cosine 1.0 to fp32 PyTorch). See scripts/bench/query.py for the figures.

Exports have a dynamic batch axis (and a dynamic length axis for text), take what
`encode_image` / `encode_text` take, and return their un-normalized features.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from cnclip import atomic
from cnclip.errors import CNClipError
from cnclip.model.onnx_runtime import (
    CACHE_ENV,
    TEXT_TOKENIZER,
    OnnxTower,
    cache_dir,
    export_folder,
    save_text_tokenizer,
)

# The `model` arguments are `cnclip.model.clip.CNClipModel`s, typed as modules: the model does not
# know about ONNX, and this module does not import the model's.

__all__ = [
    "CACHE_ENV",
    "IMAGE_ROWS_PER_RUN",
    "OnnxTower",
    "cache_dir",
    "cached_tower",
    "export_cached",
    "export_onnx",
    "quantized_cached",
]

log = logging.getLogger(__name__)

TOWERS = ("image", "text")
OPSET = 17
# Images per session.run for the image tower. Measured on the build machine (ViT-B-16, 2 cores,
# scripts/bench/embed.py): runs of 1-8 images went ~4.6 images/s, one run of 32 ~4.2, as the
# activations of a few images stay in cache; the output does not depend on the split.
IMAGE_ROWS_PER_RUN = 4


class _Tower(nn.Module):
    """One tower of a model as a module of its own, so the exporter traces just that tower."""

    def __init__(self, model: nn.Module, tower: str):
        super().__init__()
        self.model = model
        self.encode = model.encode_text if tower == "text" else model.encode_image

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.encode(inputs)


def _example_ids(model: nn.Module) -> torch.Tensor:
    # Two rows of different lengths: the traced graph must contain the padding-mask path, which
    # transformers skips when a batch has no padding.
    ids = model.tokenizer(["一张照片", "海边的日落和沙滩上的脚印"])
    return ids[:, : int(ids.ne(model.tokenizer.pad_id).sum(1).max())]


def export_onnx(
    model: nn.Module, folder: str | os.PathLike, towers: tuple[str, ...] = TOWERS, opset: int = OPSET
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
        # A private folder per export: past 2 GB of weights (ViT-H-14's image tower) the exporter
        # writes one external file per tensor beside the model, and those must not litter `folder`.
        tmp = Path(tempfile.mkdtemp(prefix=f".{tower}.", dir=folder))
        fastpath = torch.backends.mha.get_fastpath_enabled()
        try:
            # nn.MultiheadAttention's fused inference kernel has no ONNX form; the plain path does.
            torch.backends.mha.set_fastpath_enabled(False)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings about Python values in transformers' code
                torch.onnx.export(
                    module,
                    (example,),
                    str(tmp / path.name),
                    input_names=[name],
                    output_names=["features"],
                    dynamic_axes={name: axes, "features": {0: "batch"}},
                    opset_version=opset,
                    dynamo=False,
                )
            _gather_external_data(tmp / path.name)
            _move_model(tmp / path.name, path)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
            shutil.rmtree(tmp, ignore_errors=True)
        out[tower] = path
    return out


def _gather_external_data(path: Path) -> None:
    """Rewrite a model whose tensors lie in many external files to use one file, `<name>.data`.

    Streams tensor by tensor, so a model past protobuf's 2 GB limit is never held twice in memory.
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return
    data_name = f"{path.name}.data"
    with open(path.parent / f"{data_name}.part", "wb") as out:
        for tensor in external:
            info = {e.key: e.value for e in tensor.external_data}
            with open(path.parent / info["location"], "rb") as src:
                src.seek(int(info.get("offset", 0)))
                left = int(info["length"]) if "length" in info else -1  # -1: to the end of the file
                out.seek(-out.tell() % 64, os.SEEK_CUR)  # 64-byte aligned, so ORT can map tensors in place
                offset = out.tell()
                while left and (chunk := src.read(1 << 24 if left < 0 else min(1 << 24, left))):
                    out.write(chunk)
                    left -= len(chunk) if left > 0 else 0
                length = out.tell() - offset
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    os.replace(path.parent / f"{data_name}.part", path.parent / data_name)
    onnx.save(proto, str(path))


def _move_model(src: Path, dst: Path) -> None:
    """Move an exported model (and its `.data` file, if any) into place; the model file goes last,
    so a reader that finds `dst` also finds its data."""
    data = src.with_name(f"{src.name}.data")
    if data.exists():
        atomic.publish(data, dst.with_name(f"{dst.name}.data"))
    else:
        dst.with_name(f"{dst.name}.data").unlink(missing_ok=True)  # left by an older, larger export
    atomic.publish(src, dst)


def export_cached(model: nn.Module, tower: str, folder: str | os.PathLike | None = None) -> Path:
    """The path of `model`'s exported `tower`, exporting it if this model has none yet.

    Exports are kept under `folder` (default `cache_dir()/onnx`) by the model's weights digest,
    so a changed model never reuses another model's export.
    """
    target = export_folder(model.weights_digest(), folder)
    path = target / f"{tower}.onnx"
    if not path.exists():
        log.info("exporting the %s tower to %s (once per model)", tower, path)
        target.mkdir(parents=True, exist_ok=True)
        # Export into a private folder, then move: two processes exporting at once both succeed.
        with tempfile.TemporaryDirectory(dir=target) as tmp:
            _move_model(export_onnx(model, tmp, (tower,))[tower], path)
    if tower == "text" and not (target / TEXT_TOKENIZER).exists():
        try:  # lets a later query run from this folder alone, without PyTorch (`cnclip.model.onnx_runtime.TextEncoder`)
            save_text_tokenizer(model.tokenizer, target)
        except OSError as e:
            log.warning("could not record the tokenizer beside %s: %s", path, e)
    return path


def quantized_cached(model: nn.Module, tower: str, folder: str | os.PathLike | None = None) -> Path:
    """The path of `model`'s `tower` in int8, made once per model from its fp32 export.

    ONNX Runtime's dynamic quantization: matrix weights stored as 8-bit integers, activations
    quantized per run from their own range, so nothing is calibrated on sample data. Signed
    weights in 7 bits (`reduce_range`): on AVX2 without VNNI the u8 x s8 products saturate at
    full 8 bits (a random ViT-B-16 image tower's lowest cosine to fp32 fell to 0.991), and with
    7 bits it was 0.99963 at 1.55x fp32's speed (unsigned weights: 0.99987 but 1.3x).
    """
    source = export_cached(model, tower, folder)
    path = source.with_name(f"{tower}.int8.onnx")
    if not path.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        log.info("quantizing the %s tower to %s (once per model)", tower, path)
        root = logging.getLogger()
        root.addFilter(_quiet_quantizer)  # it advises "pre-processing" on the user's stderr through the root logger
        try:
            with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
                out = Path(tmp) / path.name
                quantize_dynamic(source, out, weight_type=QuantType.QInt8, reduce_range=True)
                _move_model(out, path)
        finally:
            root.removeFilter(_quiet_quantizer)
    return path


def _quiet_quantizer(record: logging.LogRecord) -> bool:
    """Drop ONNX Runtime's quantizer advice, and only that, from the root logger."""
    return "pre-processing before quantization" not in record.getMessage()


def cached_tower(
    model: nn.Module, tower: str, folder: str | os.PathLike | None = None, precision: str = "fp32"
) -> OnnxTower:
    """An ONNX Runtime session for `model`'s `tower` in `precision` ("fp32" or "int8"), exported
    (and quantized) on first use (see `export_cached`, `quantized_cached`)."""
    if precision not in ("fp32", "int8"):
        raise CNClipError(f"ONNX Runtime runs fp32 or int8 here, not {precision}")
    path = quantized_cached(model, tower, folder) if precision == "int8" else export_cached(model, tower, folder)
    return OnnxTower(path, rows_per_run=IMAGE_ROWS_PER_RUN if tower == "image" else None)
