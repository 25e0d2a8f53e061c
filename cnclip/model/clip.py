"""The two-tower Chinese-CLIP model: open_clip image tower, transformers BERT text tower, shared space.

Parameter names equal the official checkpoints' (after their `module.` prefix), so an official
state dict loads with no renaming.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cnclip.errors import CNClipError
from cnclip.model.config import ModelConfig
from cnclip.model.tokenizer import Tokenizer, default_tokenizer, text_batches
from cnclip.model.transform import ImageTransform, load_image

if TYPE_CHECKING:
    from cnclip.model.runtime import Runtime

ImageInput = Image.Image | str | os.PathLike


def build_image_tower(config: ModelConfig) -> nn.Module:
    """open_clip's ViT or CLIP ModifiedResNet, configured like the official towers."""
    # imported here: open_clip pulls in torchvision and half of torch._dynamo (~3 s), which
    # commands that never build a model (help, listing, index status) should not pay for
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import QuickGELU, VisionTransformer

    v = config.vision
    if v.kind == "resnet":
        return ModifiedResNet(
            layers=list(v.layers), output_dim=config.embed_dim, heads=v.heads, image_size=v.image_size, width=v.width
        )
    return VisionTransformer(
        image_size=v.image_size,
        patch_size=v.patch_size,
        width=v.width,
        layers=v.layers,
        heads=v.heads,
        mlp_ratio=v.mlp_ratio,
        output_dim=config.embed_dim,
        act_layer=QuickGELU,  # the official ViTs were trained with OpenAI's QuickGELU, not exact GELU
    )


def build_text_tower(config: ModelConfig) -> nn.Module:
    """transformers' BertModel shaped like the official RoBERTa-wwm-ext tower, without a pooler."""
    from transformers import BertConfig, BertModel  # lazy for the same reason as open_clip above

    t = config.text
    bert = BertConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        intermediate_size=t.intermediate_size,
        hidden_act="gelu",
        max_position_embeddings=t.max_position_embeddings,
        type_vocab_size=t.type_vocab_size,
        layer_norm_eps=t.layer_norm_eps,
        pad_token_id=0,
    )
    # The official text tower has no pooler: the embedding is the [CLS] of the last hidden state.
    return BertModel(bert, add_pooling_layer=False)


def unit_rows(features: torch.Tensor) -> np.ndarray:
    """Features -> float32 numpy rows of unit length (normalized in fp32: bf16 rows are unit only to ~3 digits)."""
    return F.normalize(features.float(), dim=-1).cpu().numpy()


BF16_IMAGE_ROWS = 8


class CNClipModel(nn.Module):
    """Image and text towers projecting into one `embed_dim` space.

    `encode_image` / `encode_text` work on tensors; `embed_images` / `embed_texts` take PIL images
    and strings and return L2-normalized float32 numpy rows.
    """

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.config = config
        self.visual = build_image_tower(config)
        self.bert = build_text_tower(config)
        self.text_projection = nn.Parameter(torch.empty(config.text.hidden_size, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if self.text_projection.device.type != "meta":
            nn.init.normal_(self.text_projection, std=config.text.hidden_size**-0.5)
        self.tokenizer = tokenizer or default_tokenizer()
        self.preprocess = ImageTransform(config.vision.image_size)
        self.source: str | None = None  # what load_model was given (set there), so indexes can reload it
        self.runtime: Runtime | None = None  # how it runs, once `Runtime.apply` made it so
        # Set by `use_onnx`: towers embed_* runs through ONNX Runtime (export folder per tower), the
        # ones of them quantized to int8, and their sessions, opened on first use.
        self._onnx_towers: dict[str, str | os.PathLike | None] = {}
        self._int8_towers: frozenset[str] = frozenset()
        self._runners: dict[str, Callable[[torch.Tensor], np.ndarray]] = {}

    # -- properties -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.text_projection.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype

    @property
    def image_dtype(self) -> torch.dtype:
        """The image tower's dtype: the towers may run in different precisions (see `Runtime.apply`)."""
        return next(self.visual.parameters()).dtype

    @property
    def image_precision(self) -> str:
        """ "fp32", "bf16", "fp16" or "int8": what image vectors are computed in (indexes record it per vector)."""
        if "image" in self._int8_towers:
            return "int8"
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        return names.get(self.image_dtype, str(self.image_dtype).removeprefix("torch."))

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def weights_digest(self) -> str:
        """Hex digest of the weights' values (fp32, name order): the same for a .pt and its converted folder.

        Computed once and cached: indexes record it so vectors from different models never mix.
        """
        if getattr(self, "_digest", None) is None:
            h = hashlib.blake2b(digest_size=16)
            for name, tensor in sorted(self.state_dict().items()):
                if not tensor.is_floating_point():  # BatchNorm's step counters say nothing about the function
                    continue
                h.update(name.encode())
                values = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
                h.update(values.reshape(-1).view(np.uint8))  # the bytes, without copying them
            self._digest = h.hexdigest()
        return self._digest

    def forget_weights_digest(self) -> None:
        """Drop the cached digest after the weights changed (training), so it is computed afresh."""
        self._digest = None

    # -- tensors in, tensors out ----------------------------------------------------------------

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(N, 3, s, s) preprocessed pixels -> (N, embed_dim) image features."""
        features = self.visual(pixels.to(device=self.device, dtype=self.image_dtype))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, token_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(N, L) token ids, padded with [PAD] -> (N, embed_dim) text features."""
        token_ids = token_ids.to(self.device)
        mask = token_ids.ne(self.tokenizer.pad_id)
        hidden = self.bert(input_ids=token_ids, attention_mask=mask).last_hidden_state
        features = hidden[:, 0, :] @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self, image: torch.Tensor | None = None, text: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Normalized (image_features, text_features, logit_scale.exp()); either input may be None."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()

    # -- Python objects in, numpy out -------------------------------------------------------------

    def use_onnx(
        self, towers: Sequence[str] = ("text",), folder: str | os.PathLike | None = None, int8: Sequence[str] = ()
    ) -> None:
        """Run `embed_texts` (and/or `embed_images`) through ONNX Runtime on the CPU.

        Each tower is exported once per model (cached by weights digest, see `cnclip.model.onnx_export`) and its
        session opened when the tower is first used, so a tower that is never used costs nothing.
        The output equals the torch towers' to float32 rounding; the towers also named in `int8`
        run quantized (faster on CPUs, close but not equal). `towers=()` goes back to torch.
        """
        unknown = (set(towers) | set(int8)) - {"image", "text"}
        if unknown:
            raise CNClipError(f"unknown tower(s) {', '.join(sorted(unknown))}; choose from image, text")
        if set(int8) - set(towers):
            raise CNClipError("int8 runs in ONNX Runtime: name the tower in `towers` too")
        if towers and self.device.type != "cpu":
            raise CNClipError(f"ONNX Runtime runs here on the CPU; the model is on {self.device}")
        self._onnx_towers = {tower: folder for tower in towers}
        self._int8_towers = frozenset(int8)
        self._runners = {}

    @property
    def onnx_towers(self) -> tuple[str, ...]:
        """The towers `use_onnx` switched to ONNX Runtime."""
        return tuple(self._onnx_towers)

    def _runner(self, tower: str) -> Callable[[torch.Tensor], np.ndarray] | None:
        towers = self._onnx_towers
        if tower not in towers:
            return None
        if tower not in self._runners:
            from cnclip.model.onnx_export import cached_tower

            precision = "int8" if tower in self._int8_towers else "fp32"
            self._runners[tower] = cached_tower(self, tower, towers[tower], precision)
        return self._runners[tower]

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        runner = self._runner("image")
        if runner is not None:
            return torch.from_numpy(runner(pixels))
        if self.image_dtype == torch.bfloat16 and self.device.type == "cpu":
            # bf16 on AMX ran fastest 8 images at a time (measured; larger runs spill its tile caches)
            n = BF16_IMAGE_ROWS
            return torch.cat([self.encode_image(pixels[i : i + n]) for i in range(0, len(pixels), n)])
        return self.encode_image(pixels)

    def _text_features(self, token_ids: torch.Tensor) -> torch.Tensor:
        runner = self._runner("text")
        return torch.from_numpy(runner(token_ids)) if runner else self.encode_text(token_ids)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        """PIL images (or paths) -> float32 (N, embed_dim), rows L2-normalized."""
        out = np.empty((len(images), self.embed_dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            chunk = [
                img if isinstance(img, Image.Image) else load_image(img) for img in images[start : start + batch_size]
            ]
            out[start : start + len(chunk)] = unit_rows(self._image_features(self.preprocess.batch(chunk)))
        return out

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Strings -> float32 (N, embed_dim), rows L2-normalized (see `text_batches` for the batching)."""
        out = np.empty((len(texts), self.embed_dim), dtype=np.float32)
        for rows, ids in text_batches(self.tokenizer, texts, batch_size):
            out[rows] = unit_rows(self._text_features(torch.from_numpy(ids)))
        return out

    # -- training helpers -----------------------------------------------------------------------

    def lock_image_tower(self, unlocked_groups: int = 0) -> None:
        """Freeze the image tower, leaving the last `unlocked_groups` layer groups trainable (ViT)."""
        if self.config.vision.kind == "vit":
            self.visual.lock(unlocked_groups=unlocked_groups)
            return
        if unlocked_groups:
            raise CNClipError("--lock-image-unlocked needs a ViT image tower; ResNet towers lock whole (use 0)")
        for p in self.visual.parameters():
            p.requires_grad = False

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        """Freeze the text tower (BERT and its projection), leaving the last `unlocked_layers` BERT
        layers, and then the projection too, trainable."""
        for p in self.bert.parameters():
            p.requires_grad = False
        # like the image tower, whose projection lives inside it and locks with it
        self.text_projection.requires_grad = unlocked_layers > 0
        if unlocked_layers > 0:
            for layer in self.bert.encoder.layer[-unlocked_layers:]:
                for p in layer.parameters():
                    p.requires_grad = True

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        # transformers 5 renamed gradient_* to activation_checkpointing_* (the old names warn)
        prefix = "activation" if hasattr(self.bert, "activation_checkpointing_enable") else "gradient"
        getattr(self.bert, f"{prefix}_checkpointing_{'enable' if enable else 'disable'}")()

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write a Hugging Face-compatible ChineseCLIP folder (ViT) or a cnclip folder (ResNet)."""
        from cnclip.model.hf_format import save_pretrained

        return save_pretrained(self, folder)
