"""The model zoo as data: one JSON file per model under `cnclip/model/configs/`, parsed into dataclasses."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from cnclip.errors import ModelNotFoundError

CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass(frozen=True)
class VisionConfig:
    kind: str  # "vit" (open_clip VisionTransformer) or "resnet" (CLIP's ModifiedResNet)
    image_size: int  # images are squashed to image_size x image_size
    layers: int | tuple[int, ...]  # ViT: transformer depth; ResNet: blocks per stage, e.g. (3, 4, 6, 3)
    width: int  # ViT: token width; ResNet: stem width (features are 32x this)
    head_width: int = 64  # heads = width // head_width; ViT-H uses 80, the only value weights can't reveal
    patch_size: int | None = None  # ViT only
    mlp_width: int | None = None  # ViT MLP hidden size; None: 4 x width, as in every published model

    def __post_init__(self) -> None:
        if self.kind not in ("vit", "resnet"):
            raise ValueError(f"vision.kind must be 'vit' or 'resnet', not {self.kind!r}")
        if self.kind == "vit" and not self.patch_size:
            raise ValueError("a ViT vision config needs patch_size")
        if isinstance(self.layers, list):  # JSON gives lists; keep the dataclass hashable
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def mlp_ratio(self) -> float:
        # open_clip builds int(width * mlp_ratio) features; the +0.5 keeps float rounding from losing one
        return (self.mlp_width + 0.5) / self.width if self.mlp_width else 4.0

    @property
    def heads(self) -> int:
        # CLIP's ResNet attention pool works on 32x the stem width
        feature_width = self.width * 32 if self.kind == "resnet" else self.width
        return feature_width // self.head_width


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 21128  # Chinese BERT WordPiece vocabulary
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12  # BERT's value; the official checkpoints were trained with it


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int  # size of the shared embedding space
    vision: VisionConfig
    text: TextConfig
    name: str | None = None  # zoo name when the shape matches one, else None
    context_length: int = 52  # [CLS] + 50 tokens + [SEP], as the official models were trained
    hub_repo: str | None = None  # where the published weights live on the Hugging Face hub
    modelscope_repo: str | None = None  # the same files on ModelScope (reachable from mainland China)
    official_file: str | None = None  # the official .pt file name inside hub_repo and modelscope_repo
    # What the official file must be, when known. The published SHA-256 digests and sizes could not be
    # looked up where this was written (no internet), so the zoo leaves them unset: downloads are then
    # checked against the size the server announces, the hub's own digest header and the weights' shape.
    sha256: str | None = None
    size: int | None = None  # bytes
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str | None = None) -> ModelConfig:
        """Build from the JSON layout used in `cnclip/model/configs/`."""
        data = dict(data)
        vision = VisionConfig(**data.pop("vision"))
        text = TextConfig(**data.pop("text"))
        data.setdefault("name", name)
        return cls(vision=vision, text=text, **data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["vision"]["layers"] = (
            list(self.vision.layers) if isinstance(self.vision.layers, tuple) else self.vision.layers
        )
        for key in ("extra", "modelscope_repo", "sha256", "size"):
            if not out[key]:  # left out when unset, so older cnclip versions still read these folders
                del out[key]
        if out["vision"]["mlp_width"] is None:  # likewise
            del out["vision"]["mlp_width"]
        return out

    def shape(self, ignore_heads: bool = False) -> tuple:
        """Everything that decides tensor shapes and the forward pass; names and hub fields excluded.

        `ignore_heads` drops the head counts, which weights alone cannot reveal.
        """
        vision, text = self.vision, self.text
        if ignore_heads:
            vision, text = dataclasses.replace(vision, head_width=0), dataclasses.replace(text, heads=0)
        return (self.embed_dim, vision, text, self.context_length)

    def with_name(self, name: str | None) -> ModelConfig:
        return dataclasses.replace(self, name=name)


@cache
def _zoo() -> dict[str, ModelConfig]:
    configs = [
        ModelConfig.from_dict(json.loads(path.read_text("utf-8")), name=path.stem) for path in CONFIG_DIR.glob("*.json")
    ]
    # smallest first, as users compare them: RN50, ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14
    configs.sort(key=lambda c: (c.vision.kind != "resnet", c.vision.width, c.vision.image_size))
    return {c.name: c for c in configs}


def available_models(include_tiny: bool = False) -> list[str]:
    """Names of the models in the zoo (the published shapes; `include_tiny` adds the test shapes)."""
    return [n for n in _zoo() if include_tiny or not n.startswith("tiny-")]


def get_model_config(name: str) -> ModelConfig:
    """The zoo config called `name` (e.g. "ViT-B-16")."""
    zoo = _zoo()
    if name not in zoo:
        raise ModelNotFoundError(
            f"unknown model {name!r}; known models: {', '.join(available_models())} "
            "(or pass a checkpoint path or Hugging Face id)"
        )
    return zoo[name]


def match_zoo(config: ModelConfig, ignore_heads: bool = False) -> ModelConfig:
    """The zoo config with the same shape as `config` (so it gains a name and head counts), else `config`."""
    for zoo_config in _zoo().values():
        if zoo_config.shape(ignore_heads) == config.shape(ignore_heads):
            return zoo_config
    return config
