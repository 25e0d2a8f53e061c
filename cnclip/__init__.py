"""cnclip: Chinese-CLIP text-image retrieval.

encoder = cnclip.load_encoder("ViT-B-16")    # zoo name, .pt / .safetensors path, folder or hub id
vecs = encoder.embed_texts(["海边的日落"])      # float32 (N, D), rows L2-normalized
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from cnclip.errors import CheckpointError, CNClipError, ImageError, ModelNotFoundError, VocabularyError

# Names are imported on first use: `import cnclip` (and so every `cnclip` command) stays light, and
# a search answered by ONNX Runtime never loads torch, open_clip or transformers (~7 s).
_LAZY = {
    "create_model": "model.checkpoint",
    "load_model": "model.checkpoint",
    "load_encoder": "model.checkpoint",
    "Encoder": "model.encoder",
    "ModelConfig": "model.config",
    "available_models": "model.config",
    "get_model_config": "model.config",
    "CNClipModel": "model.clip",
    "Hit": "index.index",
    "Index": "index.index",
    "find_duplicates": "index.dupes",
    "TextHit": "model.zeroshot",
    "zero_shot": "model.zeroshot",
    "Tokenizer": "model.tokenizer",
    "tokenize": "model.tokenizer",
    "ImageTransform": "model.transform",
    "load_image": "model.transform",
    "preprocess": "model.transform",
}

if TYPE_CHECKING:
    from cnclip.index.dupes import find_duplicates
    from cnclip.index.index import Hit, Index
    from cnclip.model.checkpoint import create_model, load_encoder, load_model
    from cnclip.model.clip import CNClipModel
    from cnclip.model.config import ModelConfig, available_models, get_model_config
    from cnclip.model.encoder import Encoder
    from cnclip.model.tokenizer import Tokenizer, tokenize
    from cnclip.model.transform import ImageTransform, load_image, preprocess
    from cnclip.model.zeroshot import TextHit, zero_shot


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cnclip' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "CNClipError",
    "Hit",
    "Index",
    "TextHit",
    "zero_shot",
    "CNClipModel",
    "Encoder",
    "CheckpointError",
    "ImageError",
    "ImageTransform",
    "ModelConfig",
    "ModelNotFoundError",
    "Tokenizer",
    "VocabularyError",
    "available_models",
    "create_model",
    "find_duplicates",
    "get_model_config",
    "load_image",
    "load_encoder",
    "load_model",
    "preprocess",
    "tokenize",
]
