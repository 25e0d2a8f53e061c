"""Reference implementations the parity tests compare against: the official `cn_clip` model and
transformers' ChineseCLIPModel, built with random weights in a given cnclip shape."""

from __future__ import annotations

from pathlib import Path

import torch

from cnclip.model.config import ModelConfig


def official_model(config: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """cn_clip's CLIP in `config`'s shape, every weight random (no zero-init shortcuts)."""
    torch.manual_seed(seed)
    model = _official_clip(config)
    randomize(model)
    return model.eval()


def _official_clip(config: ModelConfig) -> torch.nn.Module:
    from cn_clip.clip.model import CLIP

    v, t = config.vision, config.text
    return CLIP(
        embed_dim=config.embed_dim,
        image_resolution=v.image_size,
        vision_layers=list(v.layers) if v.kind == "resnet" else v.layers,
        vision_width=v.width,
        vision_patch_size=v.patch_size,
        vision_head_width=v.head_width,
        vocab_size=t.vocab_size,
        text_attention_probs_dropout_prob=0.1,
        text_hidden_act="gelu",
        text_hidden_dropout_prob=0.1,
        text_hidden_size=t.hidden_size,
        text_initializer_range=0.02,
        text_intermediate_size=t.intermediate_size,
        text_max_position_embeddings=t.max_position_embeddings,
        text_num_attention_heads=t.heads,
        text_num_hidden_layers=t.layers,
        text_type_vocab_size=t.type_vocab_size,
    )


def randomize(model: torch.nn.Module) -> None:
    """Perturb every parameter and BatchNorm statistic so no code path hides behind a zero or one."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            p.add_(torch.randn_like(p) * 0.02)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def save_official_checkpoint(model: torch.nn.Module, path: Path, half: bool = False) -> Path:
    """Write `model` the way the official training code does: {'state_dict': {'module.' + key: ...}}."""
    state = {"module." + k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "step": 100, "name": "parity-test", "state_dict": state}, path)
    return path


def hf_model(config: ModelConfig, seed: int = 0):
    """transformers' ChineseCLIPModel in `config`'s (ViT) shape with random weights."""
    from transformers import ChineseCLIPConfig, ChineseCLIPModel

    from cnclip.model.hf_format import hf_config_dict

    torch.manual_seed(seed)
    model = ChineseCLIPModel(ChineseCLIPConfig.from_dict(hf_config_dict(config)))
    randomize(model)
    return model.eval()


def official_state_shapes(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The official model's state dict for `config`, as it appears in a checkpoint (call under meta)."""
    return {k: v for k, v in _official_clip(config).state_dict().items() if "bert.pooler" not in k}
