"""The Hugging Face ChineseCLIP folder layout: tensor names both ways, `config.json`, and writing a model folder.

A ViT model is saved as a folder that transformers' `ChineseCLIPModel` and cnclip both load; a
ResNet model, which transformers has no class for, keeps cnclip's naming. Either way
`cnclip_config.json` records the exact shape.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file as save_safetensors

from cnclip import atomic
from cnclip.errors import CheckpointError
from cnclip.model.config import ModelConfig
from cnclip.model.tokenizer import Tokenizer
from cnclip.model.transform import OPENAI_MEAN, OPENAI_STD

CNCLIP_CONFIG = "cnclip_config.json"
WEIGHTS_FILE = "model.safetensors"
# Keys the official and HF checkpoints carry that no forward pass reads.
_IGNORED = re.compile(r"(^|\.)(pooler\.|position_ids$|token_type_ids$)|num_batches_tracked$")

StateDict = dict[str, torch.Tensor]


def save_pretrained(state: StateDict, config: ModelConfig, tokenizer: Tokenizer, folder: str | os.PathLike) -> Path:
    """Write a model (its `state_dict()`, `config` and `tokenizer`) to `folder`.

    ViT models get a Hugging Face ChineseCLIP folder (`config.json`, `model.safetensors` in HF
    naming, `vocab.txt`, tokenizer and preprocessor configs) that `ChineseCLIPModel` and cnclip
    both load; ResNet models, which transformers has no class for, keep cnclip's naming. Either
    way `cnclip_config.json` records the exact shape.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items() if not _IGNORED.search(k)}
    if cfg.vision.kind == "vit":
        state = native_to_hf(state, cfg)
        atomic.write_json(folder / "config.json", hf_config_dict(cfg))
    with atomic.replacing(folder / WEIGHTS_FILE) as tmp:
        save_safetensors(state, str(tmp), metadata={"format": "pt"})
    with atomic.replacing(folder / "vocab.txt") as tmp:
        shutil.copyfile(tokenizer.vocab_path, tmp)
    atomic.write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": True,
            "model_max_length": cfg.context_length,
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
        },
    )
    size = {"height": cfg.vision.image_size, "width": cfg.vision.image_size}
    atomic.write_json(
        folder / "preprocessor_config.json",
        {
            # squash to (s, s), no crop: the official preprocessing (HF's hub configs centre-crop instead)
            "image_processor_type": "ChineseCLIPImageProcessor",
            "processor_class": "ChineseCLIPProcessor",
            "do_resize": True,
            "size": size,
            "resample": 3,
            "do_center_crop": False,
            "crop_size": size,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(OPENAI_MEAN),
            "image_std": list(OPENAI_STD),
            "do_convert_rgb": True,
        },
    )
    atomic.write_json(folder / CNCLIP_CONFIG, cfg.to_dict())
    return folder


# Native <-> Hugging Face names for the ViT tower; {i} is the layer index.
_VIT_NAMES = [
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.{p}", "vision_model.pre_layrnorm.{p}"),
    ("visual.ln_post.{p}", "vision_model.post_layernorm.{p}"),
    ("visual.transformer.resblocks.{i}.ln_1.{p}", "vision_model.encoder.layers.{i}.layer_norm1.{p}"),
    ("visual.transformer.resblocks.{i}.ln_2.{p}", "vision_model.encoder.layers.{i}.layer_norm2.{p}"),
    ("visual.transformer.resblocks.{i}.attn.out_proj.{p}", "vision_model.encoder.layers.{i}.self_attn.out_proj.{p}"),
    ("visual.transformer.resblocks.{i}.mlp.c_fc.{p}", "vision_model.encoder.layers.{i}.mlp.fc1.{p}"),
    ("visual.transformer.resblocks.{i}.mlp.c_proj.{p}", "vision_model.encoder.layers.{i}.mlp.fc2.{p}"),
]


def _name_pairs(layers: int) -> list[tuple[str, str]]:
    pairs = []
    for native, hf in _VIT_NAMES:
        for p in ("weight", "bias"):
            for i in range(layers if "{i}" in native else 1):
                pairs.append((native.format(i=i, p=p), hf.format(i=i, p=p)))
    return pairs


def native_to_hf(state: StateDict, config: ModelConfig) -> StateDict:
    """cnclip (official) names -> Hugging Face ChineseCLIPModel names (ViT models only)."""
    out: StateDict = {}
    state = dict(state)
    for native, hf in _name_pairs(config.vision.layers):
        if native in state:
            out[hf] = state.pop(native)
    for i in range(config.vision.layers):
        block = f"visual.transformer.resblocks.{i}.attn"
        for kind in ("weight", "bias"):
            q, k, v = state.pop(f"{block}.in_proj_{kind}").chunk(3)
            for name, t in zip("qkv", (q, k, v), strict=True):
                out[f"vision_model.encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = t.contiguous()
    out["visual_projection.weight"] = state.pop("visual.proj").t().contiguous()
    out["text_projection.weight"] = state.pop("text_projection").t().contiguous()
    out["logit_scale"] = state.pop("logit_scale")
    for k in list(state):
        if k.startswith("bert."):
            out["text_model." + k[len("bert.") :]] = state.pop(k)
    if state:
        raise CheckpointError(f"no Hugging Face name for: {', '.join(sorted(state)[:5])}")
    return out


def hf_to_native(state: StateDict) -> StateDict:
    """Hugging Face ChineseCLIPModel names -> cnclip (official) names."""
    state = dict(state)
    layers = _count(state, r"vision_model\.encoder\.layers\.(\d+)\.")
    out: StateDict = {}
    for native, hf in _name_pairs(layers):
        if hf in state:
            out[native] = state.pop(hf)
    for i in range(layers):
        attn = f"vision_model.encoder.layers.{i}.self_attn"
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{attn}.{n}_proj.{kind}", None) for n in "qkv"]
            if any(p is None for p in parts):
                raise CheckpointError(f"Hugging Face checkpoint lacks {attn} q/k/v {kind}")
            out[f"visual.transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts)
    try:
        # contiguous: a transposed view would send matmuls down another kernel (last-bit differences)
        out["visual.proj"] = state.pop("visual_projection.weight").t().contiguous()
        out["text_projection"] = state.pop("text_projection.weight").t().contiguous()
        out["logit_scale"] = state.pop("logit_scale")
    except KeyError as e:
        raise CheckpointError(f"Hugging Face checkpoint lacks {e}") from e
    for k in list(state):
        if k.startswith("text_model."):
            out["bert." + k[len("text_model.") :]] = state.pop(k)
    if state:
        raise CheckpointError(f"unexpected tensors in Hugging Face checkpoint: {', '.join(sorted(state)[:5])}")
    return out


def hf_config_dict(config: ModelConfig) -> dict:
    """A transformers ChineseCLIPConfig for a ViT model, as a JSON-ready dict."""
    from transformers import ChineseCLIPConfig

    v, t = config.vision, config.text
    hf = ChineseCLIPConfig(
        text_config={
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "intermediate_size": t.intermediate_size,
            "hidden_act": "gelu",
            "max_position_embeddings": t.max_position_embeddings,
            "type_vocab_size": t.type_vocab_size,
            "layer_norm_eps": t.layer_norm_eps,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": v.width,
            "intermediate_size": v.mlp_width or v.width * 4,
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "projection_dim": config.embed_dim,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        projection_dim=config.embed_dim,
    )
    out = hf.to_dict()
    out["architectures"] = ["ChineseCLIPModel"]
    return out


def _count(state: StateDict, pattern: str) -> int:
    rx = re.compile(pattern)
    indices = {int(m.group(1)) for k in state if (m := rx.match(k))}
    return max(indices) + 1 if indices else 0
