"""Continued masked-language-model pretraining of the text tower on a user's corpus (`cnclip pretrain-text`).

The CLIP model's own BERT is trained in place under an MLM head (the checkpoint's, when one is
given or saved beside the model, else a fresh one); the image tower is never touched. The result
is an ordinary model folder, so `cnclip train` and `cnclip index` take it like any other.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cnclip.errors import CNClipError
from cnclip.model.checkpoint import create_model, load_model
from cnclip.model.clip import CNClipModel
from cnclip.train.mlm import Block, Masker, batch_rng, load_user_dict, mask_batch, pack_blocks, read_corpus
from cnclip.train.trainer import STATE_FILE, find_checkpoint, param_groups, resolve_precision, write_checkpoint

log = logging.getLogger(__name__)

HEAD_FILE = "mlm_head.safetensors"  # saved beside the model, so a later run continues with the same head
VAL_SEED = 1234  # held-out masks are the same before and after training, so the figures compare


@dataclass
class PretrainOptions:
    corpus: str
    out: str
    model: str | None = None
    from_scratch: bool = False  # random weights in --model's zoo shape (tests, experiments)
    mlm_head: str | None = None  # a BERT checkpoint whose cls.predictions.* initialise the head
    user_dict: str | None = None
    max_length: int | None = None  # tokens per block; default min(128, the tower's positions)
    batch_size: int = 32
    accum: int = 1  # micro-batches per optimizer step: effective batch = batch_size x accum
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.06  # fraction of the optimizer steps
    grad_clip: float | None = 1.0
    precision: str = "auto"
    seed: int = 0
    val_fraction: float = 0.05
    max_val_blocks: int = 512
    eval_every: int | None = None  # optimizer steps between held-out evaluations (default: start and end)
    save_every: int = 200
    log_every: int = 10
    device: str | None = None
    resume: bool = True


@dataclass
class PretrainSummary:
    steps: int = 0
    tokens_seen: int = 0
    train_blocks: int = 0
    val_blocks: int = 0
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    tokens_per_second: float = 0.0
    model_folder: str = ""
    resumed_from_step: int | None = None


# The decoder's weight is the word-embedding matrix and its bias is predictions.bias: saved once, elsewhere.
_TIED = ("predictions.decoder.weight", "predictions.decoder.bias")


class MaskedLM(nn.Module):
    """The CLIP model's BERT (shared, trained in place) under a BERT MLM head with tied embeddings."""

    def __init__(self, model: CNClipModel):
        super().__init__()
        from transformers import BertForMaskedLM

        config = model.bert.config
        shell = BertForMaskedLM(config)
        self.bert = model.bert
        self.head = shell.cls  # transform (dense, GELU, LayerNorm) then the decoder
        self.head.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden)

    def head_state(self) -> dict[str, torch.Tensor]:
        """The head's own tensors (the decoder weight is the word embedding, saved with the model)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items() if k not in _TIED}

    def load_head(self, state: dict[str, torch.Tensor], source: str) -> None:
        state = {k.removeprefix("cls."): v for k, v in state.items() if k.startswith(("cls.", "predictions."))}
        for key in _TIED:
            state.pop(key, None)
        if not state:
            raise CNClipError(f"{source} has no MLM head (cls.predictions.* tensors); leave out --mlm-head")
        try:
            missing, unexpected = self.head.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise CNClipError(f"{source}: its MLM head has another shape than this text tower ({e})") from e
        missing = [k for k in missing if k not in _TIED]
        if missing or unexpected:
            raise CNClipError(f"{source}: MLM head tensors do not match (missing {missing}, unexpected {unexpected})")


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate_mlm(mlm: MaskedLM, blocks: list[Block], masker: Masker, pad_id: int, batch_size: int = 32) -> dict:
    """Masked-token accuracy and perplexity (exp of the mean cross-entropy) over `blocks`, fixed masks."""
    was_training = mlm.training
    mlm.eval()
    device = next(mlm.parameters()).device
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(blocks), batch_size):
        batch = mask_batch(blocks[start : start + batch_size], masker, batch_rng(VAL_SEED, 0, start), pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = mlm(batch["input_ids"], batch["attention_mask"]).float()
        chosen = batch["labels"] != -100
        n = int(chosen.sum())
        if n == 0:
            continue
        total_loss += float(nn.functional.cross_entropy(logits[chosen], batch["labels"][chosen], reduction="sum"))
        correct += int((logits[chosen].argmax(-1) == batch["labels"][chosen]).sum())
        count += n
    mlm.train(was_training)
    if count == 0:
        return {"masked_tokens": 0, "accuracy": float("nan"), "perplexity": float("nan"), "loss": float("nan")}
    loss = total_loss / count
    return {"masked_tokens": count, "accuracy": correct / count, "loss": loss, "perplexity": math.exp(min(loss, 50))}


def _read_head_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise several types for unreadable files
        raise CNClipError(f"{path} is not a readable checkpoint ({str(e).splitlines()[0]})") from e


def _head_source(opts: PretrainOptions) -> Path | None:
    if opts.mlm_head:
        path = Path(opts.mlm_head).expanduser()
        if path.is_dir():
            found = [path / n for n in (HEAD_FILE, "model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
            if not found:
                raise CNClipError(f"{path} holds no {HEAD_FILE}, model.safetensors or pytorch_model.bin")
            path = found[0]
        if not path.is_file():
            raise CNClipError(f"no MLM head checkpoint at {opts.mlm_head}; give a BERT checkpoint file or folder")
        return path
    if opts.model and (Path(opts.model).expanduser() / HEAD_FILE).is_file():  # saved by an earlier run
        return Path(opts.model).expanduser() / HEAD_FILE
    return None


def _lr_factor(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up, then linear decay to zero (the BERT/RoBERTa schedule)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _split(blocks: list[Block], opts: PretrainOptions) -> tuple[list[Block], list[Block]]:
    order = np.random.default_rng(opts.seed).permutation(len(blocks))
    n_val = min(opts.max_val_blocks, int(len(blocks) * opts.val_fraction)) if opts.val_fraction > 0 else 0
    if opts.val_fraction > 0 and len(blocks) >= 2:
        n_val = max(1, n_val)
    val = [blocks[i] for i in sorted(order[:n_val])]
    train = [blocks[i] for i in sorted(order[n_val:])]
    if not train:
        raise CNClipError(f"{opts.corpus} is too small: no training blocks left after the held-out slice")
    return train, val


def pretrain_text(opts: PretrainOptions, report: Callable[[str], None] = lambda line: None) -> PretrainSummary:
    """Run (or resume) MLM pretraining of the text tower; writes `opts.out`/model/ and returns a summary.

    `report` receives one-line progress messages (the CLI prints them).
    """
    out = Path(opts.out).expanduser()
    if opts.batch_size < 1 or opts.accum < 1 or opts.epochs < 1:
        raise CNClipError("--batch-size, --accum and --epochs must be positive")
    torch.manual_seed(opts.seed)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load_user_dict(opts.user_dict)
    if next(read_corpus(opts.corpus), None) is None:  # corpus problems show before the model loads
        raise CNClipError(f"{opts.corpus} holds no text; give one document or sentence per line")

    resume_from = find_checkpoint(out) if opts.resume else None
    if resume_from is not None:
        model = load_model(resume_from, device=device)
    elif opts.from_scratch:
        model = create_model(opts.model or "ViT-B-16", device=device)
    else:
        model = load_model(opts.model, device=device)
    tokenizer = model.tokenizer
    max_positions = model.bert.config.max_position_embeddings
    max_length = opts.max_length or min(128, max_positions)
    if max_length > max_positions:
        raise CNClipError(f"--max-length {max_length} exceeds this text tower's {max_positions} positions")

    started = time.monotonic()
    blocks = pack_blocks(tokenizer, read_corpus(opts.corpus), max_length)
    if not blocks:
        raise CNClipError(f"{opts.corpus} holds no text; give one document or sentence per line")
    train, val = _split(blocks, opts)
    report(f"{len(blocks)} blocks of <= {max_length} tokens ({len(train)} train, {len(val)} held out) "
           f"in {time.monotonic() - started:.1f} s")  # fmt: skip

    model.train()
    model.visual.requires_grad_(False)  # only the text tower learns here
    mlm = MaskedLM(model).to(device)
    masker = Masker.for_tokenizer(tokenizer)
    steps_per_epoch = math.ceil(len(train) / (opts.batch_size * opts.accum))
    total = steps_per_epoch * opts.epochs if opts.max_steps is None else opts.max_steps
    optimizer = torch.optim.AdamW(param_groups(mlm, opts.weight_decay), lr=opts.lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(int(total * opts.warmup), total))
    autocast = resolve_precision(opts.precision, device)
    scaler = torch.amp.GradScaler(enabled=autocast == torch.float16)

    summary = PretrainSummary(train_blocks=len(train), val_blocks=len(val))
    step = 0
    if resume_from is not None:
        state = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=True)
        mlm.load_head(state["head"], str(resume_from))
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, summary.before, summary.tokens_seen = state["step"], state["before"], state["tokens_seen"]
        summary.resumed_from_step = step
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        _truncate_metrics(out / "metrics.jsonl", step)  # rows past the checkpoint are about to be redone
        report(f"resumed from {resume_from} at step {step}")
    else:
        head = _head_source(opts)
        if head is not None:
            mlm.load_head(_read_head_file(head), str(head))
            report(f"MLM head from {head}")
        else:
            report("MLM head: fresh (the checkpoint has none)")
        summary.before = evaluate_mlm(mlm, val, masker, tokenizer.pad_id) if val else {}
        if val:
            report(_format_eval("before", summary.before))

    out.mkdir(parents=True, exist_ok=True)
    metrics = (out / "metrics.jsonl").open("a", encoding="utf-8")

    def save(name: str = "last") -> None:
        state = {
            "step": step,
            "head": mlm.head_state(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "before": summary.before,
            "tokens_seen": summary.tokens_seen,
            "options": asdict(opts),
            "rng": torch.get_rng_state(),  # dropout: a resumed run continues exactly as an uninterrupted one
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        }
        write_checkpoint(model, out, name, state)

    tick, tokens_since = time.monotonic(), 0
    run_tokens, run_started = 0, time.monotonic()
    try:
        while step < total:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            order = np.random.default_rng([opts.seed, epoch]).permutation(len(train))
            losses = []
            for micro in range(opts.accum):
                first = (in_epoch * opts.accum + micro) * opts.batch_size
                chosen = [train[i] for i in order[first : first + opts.batch_size]]
                if not chosen:
                    break
                batch = mask_batch(
                    chosen, masker, batch_rng(opts.seed, epoch, in_epoch * opts.accum + micro), tokenizer.pad_id
                )
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    loss = mlm_loss(mlm(batch["input_ids"], batch["attention_mask"]), batch["labels"])
                scaler.scale(loss / opts.accum).backward()
                losses.append(float(loss.detach()))
                n_tokens = int(batch["attention_mask"].sum())
                tokens_since += n_tokens
                run_tokens += n_tokens
                summary.tokens_seen += n_tokens
            if opts.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(mlm.parameters(), opts.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            row = {"step": step, "epoch": epoch, "loss": float(np.mean(losses)), "lr": schedule.get_last_lr()[0]}
            if step % opts.log_every == 0 or step == total:
                now = time.monotonic()
                row["tokens_per_s"] = tokens_since / max(now - tick, 1e-9)
                tick, tokens_since = now, 0
                report(f"step {step}/{total}  loss {row['loss']:.3f}  {row['tokens_per_s']:.0f} tokens/s")
            if opts.eval_every and step % opts.eval_every == 0 and val and step < total:
                row["val"] = evaluate_mlm(mlm, val, masker, tokenizer.pad_id)
                report(_format_eval(f"step {step}", row["val"]))
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if step % opts.save_every == 0 and step < total:
                save()
    finally:
        metrics.close()
    summary.steps = step
    summary.tokens_per_second = run_tokens / max(time.monotonic() - run_started, 1e-9)
    summary.after = evaluate_mlm(mlm, val, masker, tokenizer.pad_id) if val else {}
    if val:
        report(_format_eval("after", summary.after))
    save()
    model.eval()
    model.forget_weights_digest()
    final = out / "model"
    write_checkpoint(model, out, "model", None)
    save_file(mlm.head_state(), str(final / HEAD_FILE))
    summary.model_folder = str(final)
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2, ensure_ascii=False), encoding="utf-8")
    return summary


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text("utf-8").splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _format_eval(label: str, result: dict) -> str:
    return (
        f"{label}: masked-token accuracy {100 * result['accuracy']:.1f}%, perplexity {result['perplexity']:.2f} "
        f"({result['masked_tokens']} masked tokens held out)"
    )
