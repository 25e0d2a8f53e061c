"""The masked-token objective: continued MLM pretraining of the text tower on a user's corpus (`cnclip pretrain-text`).

The CLIP model's own BERT is trained in place under an MLM head (the checkpoint's, when one is
given or saved beside the model, else a fresh one); the image tower is never touched. The result
is an ordinary model folder, so `cnclip train` and `cnclip index` take it like any other. Its data
(masking, packed blocks) is `cnclip.train.mlm_data`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cnclip import atomic
from cnclip.errors import CNClipError
from cnclip.model.checkpoint import create_model, load_model
from cnclip.model.clip import CNClipModel
from cnclip.train.distributed import DistInfo
from cnclip.train.loop import (
    Loop,
    LoopOptions,
    MixedPrecision,
    Objective,
    StepLog,
    find_checkpoint,
    linear_with_warmup,
    write_checkpoint,
)
from cnclip.train.mlm_data import IGNORE, Block, Masker, batch_rng, load_user_dict, mask_batch, pack_blocks, read_corpus
from cnclip.userpath import expand_user

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
        path = expand_user(opts.mlm_head)
        if path.is_dir():
            found = [path / n for n in (HEAD_FILE, "model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
            if not found:
                raise CNClipError(f"{path} holds no {HEAD_FILE}, model.safetensors or pytorch_model.bin")
            path = found[0]
        if not path.is_file():
            raise CNClipError(f"no MLM head checkpoint at {opts.mlm_head}; give a BERT checkpoint file or folder")
        return path
    if opts.model and (expand_user(opts.model) / HEAD_FILE).is_file():  # saved by an earlier run
        return expand_user(opts.model) / HEAD_FILE
    return None


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


class MaskedTokens(Objective):
    """The masked-language objective: whole-word masks over packed blocks, the text tower only."""

    best_metric = None  # the held-out figures are reported, not used to choose a checkpoint

    def __init__(
        self, model: CNClipModel, train: list[Block], val: list[Block], opts: PretrainOptions, amp: MixedPrecision
    ):
        self.model, self.train, self.val, self.opts, self.amp = model, train, val, opts, amp
        self.mlm = self.module = MaskedLM(model).to(amp.device)
        self.masker = Masker.for_tokenizer(model.tokenizer)
        self.pad_id = model.tokenizer.pad_id
        self.steps_per_epoch = math.ceil(len(train) / (opts.batch_size * opts.accum))

    def batches(self, epoch: int, first_step: int) -> Iterator[tuple[list[dict[str, torch.Tensor]], bool]]:
        """(one step's masked micro-batches, is the epoch's last step): a new order and new masks each epoch."""
        o = self.opts
        order = np.random.default_rng([o.seed, epoch]).permutation(len(self.train))
        for step in range(first_step, self.steps_per_epoch):
            micro = []
            for k in range(step * o.accum, (step + 1) * o.accum):
                chosen = [self.train[i] for i in order[k * o.batch_size : (k + 1) * o.batch_size]]
                if not chosen:
                    break
                micro.append(mask_batch(chosen, self.masker, batch_rng(o.seed, epoch, k), self.pad_id))
            yield micro, step == self.steps_per_epoch - 1

    def backward(self, micro: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor | None, int]:
        """Add the gradients of the mean masked-token loss; (mean over micro-batches or None, tokens)."""
        self.mlm.train()
        losses, tokens = [], 0
        for batch in micro:
            # A micro-batch without one masked token (blocks that are one long word such as a URL, or a
            # short last block whose words all exceed its 15 %) has nothing to predict: its cross-entropy
            # is 0/0, NaN. It is skipped rather than forced to mask something, which would mean a whole
            # block-long word (nothing left to predict it from) or cutting a word (no longer whole-word).
            if not bool((batch["labels"] != IGNORE).any()):
                continue
            batch = {k: v.to(self.amp.device) for k, v in batch.items()}
            with self.amp.autocast():
                loss = mlm_loss(self.mlm(batch["input_ids"], batch["attention_mask"]), batch["labels"])
            self.amp.backward(loss / self.opts.accum)
            losses.append(float(loss.detach()))
            tokens += int(batch["attention_mask"].sum())
        return (torch.tensor(float(np.mean(losses))) if losses else None), tokens

    def evaluate(self) -> dict:
        return evaluate_mlm(self.mlm, self.val, self.masker, self.pad_id)

    def state(self) -> dict:
        return {"head": self.mlm.head_state()}

    def load_state(self, state: dict, source: str) -> None:
        self.mlm.load_head(state["head"], source)

    def rows(self, log: StepLog) -> list[dict]:
        """One row per step; held-out figures ride along (the last ones are the summary's "after")."""
        row = {"step": log.step, "epoch": (log.step - 1) // self.steps_per_epoch, "loss": log.loss, "lr": log.lr}
        if log.rate is not None:
            row["tokens_per_s"] = log.rate
        if log.eval is not None and not log.done:
            row["val"] = _figures(log.eval)
        return [row]


def pretrain_text(opts: PretrainOptions, report: Callable[[str], None] = lambda line: None) -> PretrainSummary:
    """Run (or resume) MLM pretraining of the text tower; writes `opts.out`/model/ and returns a summary.

    `report` receives one-line progress messages (the CLI prints them).
    """
    out = expand_user(opts.out)
    if opts.batch_size < 1 or opts.accum < 1 or opts.epochs < 1:
        raise CNClipError("--batch-size, --accum and --epochs must be positive")
    torch.manual_seed(opts.seed)  # a fresh head's (or --from-scratch model's) initial weights
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load_user_dict(opts.user_dict)
    if next(read_corpus(opts.corpus), None) is None:  # corpus problems show before the model loads
        raise CNClipError(f"{opts.corpus} holds no text; give one document or sentence per line")
    resume_from = find_checkpoint(out) if opts.resume else None
    model = _load(opts, resume_from, device)
    train, val = _blocks(opts, model, report)
    model.visual.requires_grad_(False)  # only the text tower learns here
    amp = MixedPrecision(opts.precision, device)
    objective = MaskedTokens(model, train, val, opts, amp)
    loop = _loop(objective, opts, amp, out, report)
    evaluate = objective.evaluate if val else None
    summary = PretrainSummary(train_blocks=len(train), val_blocks=len(val))
    if resume_from is not None:
        loop.restore(resume_from)
        summary.resumed_from_step = loop.progress.step
        report(f"resumed from {resume_from} at step {loop.progress.step}")
    else:
        _start_head(objective.mlm, opts, report)
        if evaluate is not None:
            report(_format_eval("before", _figures(loop.evaluate(evaluate))))
    seen, seconds = loop.progress.seen, loop.train_seconds
    loop.run(evaluate)
    summary.tokens_per_second = (loop.progress.seen - seen) / max(loop.train_seconds - seconds, 1e-9)
    return _finish(loop, objective, out, summary, report)


def _load(opts: PretrainOptions, resume_from: Path | None, device: torch.device) -> CNClipModel:
    if resume_from is not None:
        return load_model(resume_from, device=device)
    if opts.from_scratch:
        return create_model(opts.model or "ViT-B-16", device=device)
    return load_model(opts.model, device=device)


def _blocks(
    opts: PretrainOptions, model: CNClipModel, report: Callable[[str], None]
) -> tuple[list[Block], list[Block]]:
    """The corpus packed into blocks for this text tower, split into (train, held out)."""
    max_positions = model.bert.config.max_position_embeddings
    max_length = opts.max_length or min(128, max_positions)
    if max_length > max_positions:
        raise CNClipError(f"--max-length {max_length} exceeds this text tower's {max_positions} positions")
    started = time.monotonic()
    blocks = pack_blocks(model.tokenizer, read_corpus(opts.corpus), max_length)
    if not blocks:
        raise CNClipError(f"{opts.corpus} holds no text; give one document or sentence per line")
    train, val = _split(blocks, opts)
    report(f"{len(blocks)} blocks of <= {max_length} tokens ({len(train)} train, {len(val)} held out) "
           f"in {time.monotonic() - started:.1f} s")  # fmt: skip
    return train, val


def _loop(
    objective: MaskedTokens, opts: PretrainOptions, amp: MixedPrecision, out: Path, report: Callable[[str], None]
) -> Loop:
    # --max-steps may end the run before the epochs do, or carry it past them
    total = objective.steps_per_epoch * opts.epochs if opts.max_steps is None else opts.max_steps
    loop_opts = LoopOptions(
        total_steps=total,
        schedule=linear_with_warmup(int(total * opts.warmup), total),
        lr=opts.lr,
        weight_decay=opts.weight_decay,
        grad_clip=opts.grad_clip,
        seed=opts.seed,
        log_every=opts.log_every,
        save_every=opts.save_every,
        eval_every=opts.eval_every,
        epoch_ends=False,  # held-out figures at the start, every --eval-every and at the end only
        options=asdict(opts),
        resume_keys=("batch_size", "accum", "seed", "max_length"),
    )
    return Loop(objective, loop_opts, amp, out, DistInfo(device=amp.device), on_event=_reporter(report, total))


def _start_head(mlm: MaskedLM, opts: PretrainOptions, report: Callable[[str], None]) -> None:
    head = _head_source(opts)
    if head is not None:
        mlm.load_head(_read_head_file(head), str(head))
        report(f"MLM head from {head}")
    else:
        report("MLM head: fresh (the checkpoint has none)")


def _finish(
    loop: Loop, objective: MaskedTokens, out: Path, summary: PretrainSummary, report: Callable[[str], None]
) -> PretrainSummary:
    """The summary, and the final model folder with the head beside it."""
    p, model = loop.progress, objective.model
    summary.steps, summary.tokens_seen = p.step, p.seen
    if p.history:  # the evaluation before the first step and the one after the last
        summary.before, summary.after = _figures(p.history[0]), _figures(p.history[-1])
        report(_format_eval("after", summary.after))
    model.eval()
    model.forget_weights_digest()
    final = write_checkpoint(model, out, "model", None)
    save_file(objective.mlm.head_state(), str(final / HEAD_FILE))
    summary.model_folder = str(final)
    atomic.write_text(out / "summary.json", json.dumps(asdict(summary), indent=2, ensure_ascii=False))
    return summary


def _reporter(report: Callable[[str], None], total: int) -> Callable[[dict], None]:
    """Report lines for metrics rows: the logged steps' loss and speed, held-out figures."""

    def show(row: dict) -> None:
        if "tokens_per_s" in row:
            loss = "-" if row["loss"] is None else f"{row['loss']:.3f}"  # None: no masked token in the step
            report(f"step {row['step']}/{total}  loss {loss}  {row['tokens_per_s']:.0f} tokens/s")
        if "val" in row:
            report(_format_eval(f"step {row['step']}", row["val"]))

    return show


def _figures(event: dict) -> dict:
    """An evaluation event's figures, without its kind, step and epoch."""
    return {k: v for k, v in event.items() if k not in ("kind", "step", "epoch")}


def _format_eval(label: str, result: dict) -> str:
    return (
        f"{label}: masked-token accuracy {100 * result['accuracy']:.1f}%, perplexity {result['perplexity']:.2f} "
        f"({result['masked_tokens']} masked tokens held out)"
    )
