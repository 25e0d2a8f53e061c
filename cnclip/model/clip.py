"""The two-tower Chinese-CLIP model: open_clip image tower, transformers BERT text tower, shared space.

Parameter names equal the official checkpoints' (after their `module.` prefix), so an official
state dict loads with no renaming.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from cnclip.errors import CNClipError
from cnclip.model.config import ModelConfig
from cnclip.model.tokenizer import Tokenizer, default_tokenizer

if TYPE_CHECKING:
    import numpy as np

    from cnclip.model.encoder import Encoder
    from cnclip.model.transform import ImageTransform


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


class CNClipModel(nn.Module):
    """Image and text towers projecting into one `embed_dim` space: tensors in, tensors out.

    Running it on images and strings (engines, precisions, numpy rows) is `cnclip.model.encoder.Encoder`'s job.
    """

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None = None, source: str | None = None):
        super().__init__()
        self.config = config
        self.visual = build_image_tower(config)
        self.bert = build_text_tower(config)
        self.text_projection = nn.Parameter(torch.empty(config.text.hidden_size, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if self.text_projection.device.type != "meta":
            nn.init.normal_(self.text_projection, std=config.text.hidden_size**-0.5)
        self.tokenizer = tokenizer or default_tokenizer()  # the vocabulary travels with the weights
        self.source = source  # what load_model was given, so indexes can reload it; None when built in memory

    # -- properties -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.text_projection.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype

    @property
    def image_dtype(self) -> torch.dtype:
        """The image tower's dtype (an encoder may run a copy of a tower in another one)."""
        return next(self.visual.parameters()).dtype

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
                values = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
                h.update(values.reshape(-1).view(torch.uint8).numpy())  # the bytes, without copying them
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

    # -- deprecated: running the model is `cnclip.model.encoder.Encoder`'s job ----------------------

    def __getstate__(self) -> dict:
        # copies and pickles leave out the deprecated `use_onnx` encoder: ONNX sessions do not copy
        state = dict(self.__dict__)
        state.pop("_onnx_encoder", None)
        return state

    def _deprecated(self, name: str, replacement: str) -> Encoder:
        warnings.warn(
            f"CNClipModel.{name} is deprecated and will be removed in the next release; use {replacement} "
            "(an Encoder from cnclip.load_encoder or Runtime.resolve().build(model))",
            DeprecationWarning,
            stacklevel=3,
        )
        encoder = self.__dict__.get("_onnx_encoder")
        if encoder is not None:
            return encoder
        from cnclip.model.encoder import Encoder  # encoder.py does not import this module: no circle

        return Encoder.build(self)  # the model as it is: its own towers, device and dtypes

    def embed_images(self, images: Sequence, batch_size: int = 32) -> np.ndarray:
        """Deprecated: `Encoder.embed_images`."""
        return self._deprecated("embed_images", "Encoder.embed_images").embed_images(images, batch_size)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Deprecated: `Encoder.embed_texts`."""
        return self._deprecated("embed_texts", "Encoder.embed_texts").embed_texts(texts, batch_size)

    @property
    def preprocess(self) -> ImageTransform:
        """Deprecated: `Encoder.preprocess`."""
        return self._deprecated("preprocess", "Encoder.preprocess").preprocess

    def use_onnx(
        self, towers: Sequence[str] = ("text",), folder: str | os.PathLike | None = None, int8: Sequence[str] = ()
    ) -> None:
        """Deprecated: `Runtime(..., onnx_towers=...).build(model)` (or `--backend onnx`). Makes the
        deprecated `embed_*` run `towers` in ONNX Runtime (`int8`: quantized); `towers=()` goes back to torch."""
        self._deprecated("use_onnx", "Runtime.build")
        self.__dict__.pop("_onnx_encoder", None)
        if towers or int8:
            from cnclip.model.encoder import Encoder

            precisions = {t: "int8" if t in int8 else "fp32" for t in ("image", "text")}
            self.__dict__["_onnx_encoder"] = Encoder.build(
                self, precisions=precisions, onnx_towers=tuple(towers), onnx_folder=folder
            )

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write a Hugging Face-compatible ChineseCLIP folder (ViT) or a cnclip folder (ResNet)."""
        from cnclip.model.hf_format import save_pretrained  # hf_format does not import this module

        return save_pretrained(self.state_dict(), self.config, self.tokenizer, folder)
