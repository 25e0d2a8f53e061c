"""Reading and writing weights: official `.pt` files, Hugging Face ChineseCLIP folders and hub ids,
and cnclip's own folders (`cnclip.model.download` fetches zoo names). Weights are data, never code:
safetensors or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from cnclip.errors import CheckpointError, ModelNotFoundError, VocabularyError
from cnclip.model.clip import CNClipModel
from cnclip.model.config import ModelConfig, TextConfig, VisionConfig, get_model_config, match_zoo
from cnclip.model.hf_format import _IGNORED, CNCLIP_CONFIG, WEIGHTS_FILE, _count, hf_to_native
from cnclip.model.tokenizer import Tokenizer
from cnclip.userpath import expand_user

if TYPE_CHECKING:
    from cnclip.model.encoder import Encoder

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-16"
MODEL_ENV = "CNCLIP_MODEL"
StateDict = dict[str, torch.Tensor]


# -- public entry points ----------------------------------------------------------------------------


def create_model(config: str | ModelConfig, device: str | torch.device = "cpu") -> CNClipModel:
    """A model with freshly initialized (random) weights, e.g. `create_model("tiny-vit")`."""
    if isinstance(config, str):
        config = get_model_config(config)
    return CNClipModel(config).to(device).eval()


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    *,
    config: str | ModelConfig | None = None,
) -> CNClipModel:
    """Load weights from a zoo name, an official `.pt`, a safetensors file, a folder, or a hub id.

    `name_or_path` defaults to `$CNCLIP_MODEL`, then "ViT-B-16". `config` names the shape the
    weights must have; by default it is read from the weights themselves. Returns an fp32 model in
    eval mode on `device`.
    """
    if name_or_path is None:
        name_or_path = os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    expected = get_model_config(config) if isinstance(config, str) else config
    source = str(name_or_path)
    # what to reload this model from later (an index records it): local paths absolutely
    local = expand_user(source)
    return _load(source, expected, device, str(local.resolve()) if local.exists() else source)


def load_encoder(
    name_or_path: str | os.PathLike | None = None,
    device: str | None = None,
    backend: str | None = None,
    precision: str | None = None,
) -> Encoder:
    """`load_model(name_or_path)` run the way `Runtime.resolve(device, backend, precision)` chooses
    (by default what suits this machine): an `Encoder`, whose `embed_images` / `embed_texts` return
    L2-normalized float32 numpy rows."""
    from cnclip.model.runtime import Runtime

    runtime = Runtime.resolve(device, backend, precision)  # a wrong choice is refused before loading
    return runtime.build(load_model(name_or_path))


def _load(source: str, expected: ModelConfig | None, device, record: str) -> CNClipModel:
    """The model at `source`, which remembers `record` as where it came from."""
    path = expand_user(source)
    if path.is_dir():
        return _load_folder(path, expected, device, record)
    if path.is_file():
        return _build(read_state_dict(path), expected, Tokenizer(), device, source, None, record)
    if _looks_like_path(source):
        raise ModelNotFoundError(f"no checkpoint file or folder at {source}")
    if source in _zoo_names():
        zoo = get_model_config(source)
        return _load(str(_fetch_official(zoo)), expected or zoo, device, record)
    if "/" in source:
        return _load_folder(_download_hf_repo(source), expected, device, record)
    get_model_config(source)  # raises the unknown-name error listing the zoo
    raise AssertionError("unreachable")


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Tensors from a checkpoint file, in cnclip's (the official) parameter naming."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); download it again")
    if path.suffix == ".safetensors":
        try:
            raw = load_safetensors(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({_first_line(e)}); download it again"
            ) from e
    else:
        raw = _torch_load(path)
    return to_native(_unwrap(raw, path))


# -- building -----------------------------------------------------------------------------------------


def _build(
    state: StateDict,
    expected: ModelConfig | None,
    tokenizer: Tokenizer,
    device,
    source: str,
    heads: tuple | None,
    record: str | None = None,
) -> CNClipModel:
    found = infer_config(state, source)
    if heads is not None:  # head counts come from a folder's config; weights can't reveal them
        found = dataclasses.replace(
            found,
            vision=dataclasses.replace(found.vision, head_width=heads[0]),
            text=dataclasses.replace(found.text, heads=heads[1]),
        )
    config = _check_shape(found, expected, source, heads_known=heads is not None)
    if tokenizer.vocab_size > config.text.vocab_size:
        raise VocabularyError(
            f"{tokenizer.vocab_path} has {tokenizer.vocab_size} tokens but {source} embeds only "
            f"{config.text.vocab_size}; use the vocab.txt that came with these weights"
        )
    # Build without allocating random weights, then adopt the checkpoint's tensors (mmap-backed when
    # the file allows it): loading a model then costs about one copy of the weights, not two.
    with torch.device("meta"):
        model = CNClipModel(config, tokenizer=tokenizer, source=record)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source} does not fit the {config.name or 'inferred'} shape: {_first_line(e)}") from e
    _materialize_buffers(model)
    return model.float().to(device).eval()


def _check_shape(found: ModelConfig, expected: ModelConfig | None, source: str, heads_known: bool) -> ModelConfig:
    zoo = match_zoo(found, ignore_heads=not heads_known)
    if expected is None:
        return zoo
    if expected.shape(ignore_heads=not heads_known) != found.shape(ignore_heads=not heads_known):
        raise CheckpointError(
            f"{source} holds a {describe(zoo)} model, not {describe(expected)}; "
            "name the matching model or leave the name out to use what the weights hold"
        )
    return expected


def describe(config: ModelConfig) -> str:
    """A short human description of a shape, e.g. 'ViT-B-16' or 'vit width 64, 2 layers, embed 32'."""
    if config.name:
        return config.name
    v = config.vision
    t = config.text
    return (
        f"{v.kind} width {v.width} layers {v.layers} image {v.image_size} / "
        f"text width {t.hidden_size} x {t.layers} / embed {config.embed_dim}"
    )


def _materialize_buffers(model: CNClipModel) -> None:
    # BERT's position/token-type index buffers are not saved in checkpoints; rebuild them for real.
    emb = model.bert.embeddings
    n = model.config.text.max_position_embeddings
    for name, value in (
        ("position_ids", torch.arange(n).unsqueeze(0)),
        ("token_type_ids", torch.zeros(1, n, dtype=torch.long)),
    ):
        if hasattr(emb, name):
            emb.register_buffer(name, value, persistent=False)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftovers:
        raise CheckpointError(f"checkpoint left tensors unset: {', '.join(leftovers[:5])}")


def infer_config(state: StateDict, source: str = "checkpoint") -> ModelConfig:
    """Read the model shape off the tensors of a native-named state dict."""
    try:
        embed_dim = state["text_projection"].shape[1]
        word = state["bert.embeddings.word_embeddings.weight"]
        text = TextConfig(
            vocab_size=word.shape[0],
            hidden_size=word.shape[1],
            layers=_count(state, r"bert\.encoder\.layer\.(\d+)\."),
            heads=word.shape[1] // 64,  # every published text tower uses 64-wide heads
            intermediate_size=state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
            max_position_embeddings=state["bert.embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=state["bert.embeddings.token_type_embeddings.weight"].shape[0],
        )
        if "visual.attnpool.c_proj.weight" in state:
            grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(
                kind="resnet",
                image_size=grid * 32,
                layers=tuple(_count(state, rf"visual\.layer{i}\.(\d+)\.") for i in range(1, 5)),
                width=state["visual.conv1.weight"].shape[0] * 2,
            )
        else:
            conv = state["visual.conv1.weight"]
            grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
            vision = VisionConfig(
                kind="vit",
                image_size=grid * conv.shape[-1],
                layers=_count(state, r"visual\.transformer\.resblocks\.(\d+)\."),
                width=conv.shape[0],
                patch_size=conv.shape[-1],
                mlp_width=None if mlp == 4 * conv.shape[0] else mlp,  # read off the weights, not assumed
            )
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{source} is not a Chinese-CLIP checkpoint (no {e} tensor)") from e
    return ModelConfig(embed_dim=embed_dim, vision=vision, text=text)


def _load_folder(folder: Path, expected: ModelConfig | None, device, record: str) -> CNClipModel:
    weights = next((folder / f for f in (WEIGHTS_FILE, "pytorch_model.bin") if (folder / f).is_file()), None)
    if weights is None:
        pts = sorted(folder.glob("*.pt"))
        if len(pts) == 1:
            return _load(str(pts[0]), expected, device, record)
        raise CheckpointError(
            f"{folder} has no {WEIGHTS_FILE} or pytorch_model.bin; point at the checkpoint file itself"
        )
    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        raise VocabularyError(
            f"{folder} has no vocab.txt; copy the vocab.txt that came with these weights into it "
            "(the standard Chinese BERT one is cnclip/model/resources/vocab.txt)"
        )
    heads = None
    if (folder / CNCLIP_CONFIG).is_file():
        own = ModelConfig.from_dict(json.loads((folder / CNCLIP_CONFIG).read_text("utf-8")))
        heads = (own.vision.head_width, own.text.heads)
        expected = expected or own
    elif (folder / "config.json").is_file():
        heads = _heads_from_hf_config(folder / "config.json")
    return _build(read_state_dict(weights), expected, Tokenizer(vocab), device, str(folder), heads, record)


def _heads_from_hf_config(path: Path) -> tuple[int, int] | None:
    try:
        hf = json.loads(path.read_text("utf-8"))
        v, t = hf["vision_config"], hf["text_config"]
        return v["hidden_size"] // v["num_attention_heads"], t["num_attention_heads"]
    except (KeyError, ValueError, TypeError):
        return None  # not a ChineseCLIP config; fall back to what the weights say


def _fetch_official(config: ModelConfig) -> Path:
    from cnclip.model.download import fetch_official

    def check(path: Path) -> None:  # refuse a downloaded file of another shape before it enters the cache
        found = match_zoo(infer_config(read_state_dict(path), config.official_file), ignore_heads=True)
        if found.shape(ignore_heads=True) != config.shape(ignore_heads=True):
            raise CheckpointError(f"it holds a {describe(found)} model, not {config.name}")

    return fetch_official(config, check=check)


def _download_hf_repo(repo_id: str) -> Path:
    for name in ("vocab.txt", "config.json"):
        local = _hub_file(repo_id, name, label=repo_id)
    try:
        _hub_file(repo_id, WEIGHTS_FILE, label=repo_id)
    except ModelNotFoundError:
        _hub_file(repo_id, "pytorch_model.bin", label=repo_id)
    return Path(local).parent


def _hub_file(repo_id: str, filename: str, label: str) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(repo_id, filename)
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"{label}: {filename} from {repo_id} is not in the local Hugging Face cache and the hub cannot be reached "
            "(a mirror: HF_ENDPOINT=https://hf-mirror.com); download it on a machine with internet and pass its "
            f"path (--model PATH or {MODEL_ENV}=PATH)"
        ) from e
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        raise ModelNotFoundError(f"{label}: no {filename} in Hugging Face repo {repo_id}") from e


# -- state-dict formats ------------------------------------------------------------------------------


def _torch_load(path: Path) -> object:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files can't be memory-mapped; read them plainly
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects besides tensors; cnclip loads weights only (never runs pickled code)"
        ) from e
    except Exception as e:  # garbage bytes reach the unpickler's internals (IndexError, KeyError, ...)
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch checkpoint ({_first_line(e)}); download it again"
        ) from e


def _unwrap(raw: object, path: Path) -> StateDict:
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]  # official training checkpoints: {"epoch", "name", "state_dict", ...}
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in raw.items()}


def to_native(state: StateDict) -> StateDict:
    """Any supported naming (official / cnclip, or Hugging Face ChineseCLIP) -> cnclip's naming."""
    state = {k: v for k, v in state.items() if not _IGNORED.search(k)}
    if any(k.startswith(("vision_model.", "text_model.")) for k in state):
        return hf_to_native(state)
    return state


# -- small helpers -------------------------------------------------------------------------------------


def _zoo_names() -> set[str]:
    from cnclip.model.config import available_models

    return set(available_models(include_tiny=True))


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith((".", "/", "~"))
        or source.endswith((".pt", ".pth", ".bin", ".safetensors"))
        or os.sep * 2 in source
    )


def _first_line(e: BaseException) -> str:
    """An exception's text folded onto one line (load_state_dict puts the useful part on line two)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 240 else text[:237] + "..."
