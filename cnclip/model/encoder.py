"""`Encoder`: a model's towers run for inference — images and strings in, unit float32 numpy rows out.

It owns the tokenizer, the image preprocessing, one callable per tower (PyTorch or ONNX Runtime,
in the precision `cnclip.model.runtime.Runtime.build` chose once) and the identity an index records.
The model itself (`cnclip.model.clip`) only computes; building an encoder never changes it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cnclip.errors import CNClipError
from cnclip.model.config import ModelConfig
from cnclip.model.tokenizer import Tokenizer, text_batches
from cnclip.model.transform import ImageTransform, load_image

ImageInput = Image.Image | str | os.PathLike
Tower = Callable[[torch.Tensor], torch.Tensor]  # pixels (N, 3, s, s) or token ids (N, L) -> features (N, D)

TOWERS = ("image", "text")
# The dtype PyTorch holds a tower in: an int8 tower runs in ONNX Runtime, from the fp32 weights.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}
BF16_IMAGE_ROWS = 8


class TwoTowers(Protocol):
    """What an encoder needs of a model: `cnclip.model.clip.CNClipModel`, named by its shape so that
    this module does not import the model's (a model's deprecated helpers build encoders)."""

    config: ModelConfig
    tokenizer: Tokenizer
    source: str | None
    logit_scale: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    image_dtype: torch.dtype

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...

    def encode_text(self, token_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...

    def weights_digest(self) -> str: ...

    def named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]: ...

    def named_buffers(self) -> Iterable[tuple[str, torch.Tensor]]: ...


class RuntimeChoice(Protocol):
    """The choice an encoder was built from (`cnclip.model.runtime.Runtime`), as reports show it."""

    def describe(self) -> str: ...

    def to_dict(self) -> dict: ...


def unit_rows(features: torch.Tensor) -> np.ndarray:
    """Features -> float32 numpy rows of unit length (normalized in fp32: bf16 rows are unit only to ~3 digits)."""
    return F.normalize(features.float(), dim=-1).cpu().numpy()


def precision_name(dtype: torch.dtype) -> str:
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names.get(dtype, str(dtype).removeprefix("torch."))


class Encoder:
    """Runs a model: `embed_images` / `embed_texts` give L2-normalized float32 numpy rows;
    `image_features` / `text_features` take tensors a caller preprocessed itself.

    Build one with `Encoder.build` (or `Runtime.resolve(...).build(model)`, `cnclip.load_encoder`).
    `image_precision` ("fp32", "bf16", "fp16" or "int8") is what image vectors are computed in;
    indexes record it per vector.
    """

    def __init__(
        self,
        model: TwoTowers,
        image: Tower,
        text: Tower,
        *,
        device: str | torch.device = "cpu",
        precisions: Mapping[str, str] | None = None,
        onnx_towers: Sequence[str] = (),
        runtime: RuntimeChoice | None = None,
        digest: str | None = None,
    ):
        self.config = model.config
        self.tokenizer = model.tokenizer
        self.preprocess = ImageTransform(model.config.vision.image_size)
        self.source = model.source
        self.logit_scale = float(model.logit_scale.detach().float().exp())  # as `forward` returns it
        self.device = torch.device(device)
        self.precisions = {"image": "fp32", "text": "fp32"} | dict(precisions or {})
        self.onnx_towers = tuple(onnx_towers)
        self.runtime = runtime  # the concrete choice this encoder runs (None: built from the model as it is)
        self._image = image
        self._text = text
        self._digest = digest
        # the model only while its digest is still to compute: towers run from a converted copy
        # then leave the caller free to drop the original (a GPU run keeps no fp32 copy in RAM)
        self._model: TwoTowers | None = model if digest is None else None

    @classmethod
    def build(
        cls,
        model: TwoTowers,
        *,
        device: str | torch.device | None = None,
        precisions: Mapping[str, str] | None = None,
        onnx_towers: Sequence[str] = (),
        onnx_folder: str | os.PathLike | None = None,
        runtime: RuntimeChoice | None = None,
    ) -> Encoder:
        """An encoder running `model` on `device` (default: the model's), each tower in its precision
        (default: the model's dtypes), the `onnx_towers` in ONNX Runtime on the CPU (exported into
        `onnx_folder`, default the cache, on first use). `model` is left as it is: a tower that
        must run elsewhere or in another dtype runs from a converted copy of that tower."""
        unknown = set(onnx_towers) - set(TOWERS)
        if unknown:
            raise CNClipError(f"unknown tower(s) {', '.join(sorted(unknown))}; choose from image, text")
        device = _concrete(device if device is not None else model.device)
        chosen = {"image": precision_name(model.image_dtype), "text": precision_name(model.dtype)}
        chosen |= dict(precisions or {})
        if any(chosen[t] == "int8" and t not in onnx_towers for t in TOWERS):
            raise CNClipError("int8 runs in ONNX Runtime: name the tower in `towers` too")
        if onnx_towers and device.type != "cpu":
            raise CNClipError(f"ONNX Runtime runs here on the CPU; the model is on {device}")
        dtypes = {t: None if t in onnx_towers else DTYPES[chosen[t]] for t in TOWERS}
        runs = converted(model, device, dtypes)
        # of the weights as given (fp32 as loaded), before the original may be dropped
        digest = model.weights_digest() if runs is not model else None
        towers: dict[str, Tower] = {"image": runs.encode_image, "text": runs.encode_text}
        for tower in onnx_towers:
            towers[tower] = OnnxOnFirstUse(model, tower, onnx_folder, chosen[tower])
        return cls(
            model,
            towers["image"],
            towers["text"],
            device=device,
            precisions=chosen,
            onnx_towers=onnx_towers,
            runtime=runtime,
            digest=digest,
        )

    # -- identity ---------------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_precision(self) -> str:
        """ "fp32", "bf16", "fp16" or "int8": what image vectors are computed in (indexes record it per vector)."""
        return self.precisions["image"]

    @property
    def text_precision(self) -> str:
        return self.precisions["text"]

    def weights_digest(self) -> str:
        """The model's weights digest (fp32 values; an index compares it), computed once."""
        if self._digest is None:
            self._digest = self._model.weights_digest()
            self._model = None
        return self._digest

    def prepare(self, tower: str) -> None:
        """Export (and quantize) `tower` for ONNX Runtime now if it runs there, so that later
        processes find it in the cache; a PyTorch tower needs nothing."""
        runner = self._image if tower == "image" else self._text
        if isinstance(runner, OnnxOnFirstUse):
            runner.export()

    # -- tensors in, features out -----------------------------------------------------------------

    @torch.inference_mode()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, s, s) preprocessed pixels -> (N, embed_dim) un-normalized features."""
        if self.image_precision == "bf16" and self.device.type == "cpu":
            # bf16 on AMX ran fastest 8 images at a time (measured; larger runs spill its tile caches)
            n = BF16_IMAGE_ROWS
            return torch.cat([self._image(pixels[i : i + n]) for i in range(0, len(pixels), n)])
        return self._image(pixels)

    @torch.inference_mode()
    def text_features(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids padded with [PAD] -> (N, embed_dim) un-normalized features."""
        return self._text(token_ids)

    # -- Python objects in, numpy out -------------------------------------------------------------

    @torch.inference_mode()
    def embed_images(self, images: Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        """PIL images (or paths) -> float32 (N, embed_dim), rows L2-normalized."""
        out = np.empty((len(images), self.embed_dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            chunk = [
                img if isinstance(img, Image.Image) else load_image(img) for img in images[start : start + batch_size]
            ]
            out[start : start + len(chunk)] = unit_rows(self.image_features(self.preprocess.batch(chunk)))
        return out

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Strings -> float32 (N, embed_dim), rows L2-normalized (see `text_batches` for the batching)."""
        out = np.empty((len(texts), self.embed_dim), dtype=np.float32)
        for rows, ids in text_batches(self.tokenizer, texts, batch_size):
            out[rows] = unit_rows(self.text_features(torch.from_numpy(ids)))
        return out

    def __repr__(self) -> str:
        engines = {t: "onnx" if t in self.onnx_towers else "torch" for t in TOWERS}
        towers = ", ".join(f"{t}: {engines[t]} {self.precisions[t]}" for t in TOWERS)
        return f"Encoder({self.config.name or 'custom'} on {self.device}; {towers})"


class OnnxOnFirstUse:
    """A tower run by ONNX Runtime, exported (and quantized) on first call and cached by weights
    digest (`cnclip.model.onnx_export.cached_tower`): a tower never used costs nothing."""

    def __init__(self, model: TwoTowers, tower: str, folder: str | os.PathLike | None, precision: str):
        self.model, self.tower, self.folder, self.precision = model, tower, folder, precision
        self.session: Callable[[torch.Tensor], np.ndarray] | None = None

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.open()(inputs))

    def export(self) -> os.PathLike:
        """The exported (for int8: quantized) tower's path, made now if it is not in the cache."""
        from cnclip.model.onnx_export import export_cached, quantized_cached

        make = quantized_cached if self.precision == "int8" else export_cached
        return make(self.model, self.tower, self.folder)

    def open(self) -> Callable[[torch.Tensor], np.ndarray]:
        """The session, exported and opened now if it was not yet."""
        if self.session is None:
            from cnclip.model.onnx_export import cached_tower

            self.session = cached_tower(self.model, self.tower, self.folder, self.precision)
        return self.session


def converted(model: TwoTowers, device: torch.device, dtypes: Mapping[str, torch.dtype | None]) -> TwoTowers:
    """`model` with its parameters and buffers on `device`, each tower's floating ones in
    `dtypes[tower]` (None: as they are). Nothing changes: `model` itself. Else a copy that shares
    every tensor already right with `model`, which is left as it was.

    The image tower is `visual.*`; the rest (BERT, the text projection) is the text tower."""
    memo: dict[int, object] = {}
    changed = False
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        dtype = dtypes["image" if name.startswith("visual.") else "text"]
        if dtype is None or not tensor.is_floating_point():
            dtype = tensor.dtype
        if tensor.device == device and tensor.dtype == dtype:
            memo[id(tensor)] = tensor
            continue
        changed = True
        # each tensor cast once from the model's own (a round trip through bf16 would lose bits)
        moved = tensor.detach().to(device=device, dtype=dtype)
        memo[id(tensor)] = nn.Parameter(moved, requires_grad=False) if isinstance(tensor, nn.Parameter) else moved
    if not changed:
        return model
    memo[id(model.tokenizer)] = model.tokenizer  # shared: the copy reads the same vocabulary
    return copy.deepcopy(model, memo)


def _concrete(device: str | torch.device) -> torch.device:
    """A "cuda" device as its tensors report it ("cuda:0"), so that equal devices compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
