"""cnclip: Chinese-CLIP text-image retrieval.

model = cnclip.load_model("ViT-B-16")        # zoo name, .pt / .safetensors path, folder or hub id
vecs = model.embed_texts(["海边的日落"])        # float32 (N, D), rows L2-normalized
"""

from __future__ import annotations

from .checkpoint import create_model, load_model
from .config import ModelConfig, available_models, get_model_config
from .errors import CheckpointError, CNClipError, ImageError, ModelNotFoundError, VocabularyError
from .model import CNClipModel
from .search import Hit, Index, TextHit, zero_shot
from .tokenizer import Tokenizer, tokenize
from .transform import ImageTransform, load_image, preprocess

__version__ = "0.1.0"

__all__ = [
    "CNClipError",
    "Hit",
    "Index",
    "TextHit",
    "zero_shot",
    "CNClipModel",
    "CheckpointError",
    "ImageError",
    "ImageTransform",
    "ModelConfig",
    "ModelNotFoundError",
    "Tokenizer",
    "VocabularyError",
    "available_models",
    "create_model",
    "get_model_config",
    "load_image",
    "load_model",
    "preprocess",
    "tokenize",
]
