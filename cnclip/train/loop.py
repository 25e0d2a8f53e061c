"""The training loop both training commands share: optimizer, schedule, precision, steps, logging, checkpoints.

What a run learns is its `Objective` (contrastive pairs for `cnclip train`, masked tokens for
`cnclip pretrain-text`): its batches, its backward pass, what it adds to a checkpoint and how its
metrics rows read. Everything else is here, once: AdamW, the learning-rate schedule, autocast and
fp16's loss scaler, gradient clipping, step and epoch bookkeeping, logging with a rate, when to
evaluate and save, `metrics.jsonl`, and resuming exactly where a `last/` checkpoint stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from cnclip import atomic
from cnclip.errors import CNClipError
from cnclip.model.clip import CNClipModel
from cnclip.model.cpu import cpu_has_fast_bf16
from cnclip.train.distributed import DistInfo, all_reduce_mean, barrier

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
STATE_VERSION = 2  # 2: one state layout for both objectives, progress JSON with `seen`


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    if precision == "fp16" and device.type != "cuda":
        raise CNClipError("fp16 training needs a GPU; use --precision bf16 or fp32 on the CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float16


class MixedPrecision:
    """A run's autocast dtype on its device (None: plain fp32) and the loss scaler that fp16 needs."""

    def __init__(self, precision: str, device: torch.device):
        self.device = device
        self.dtype = resolve_precision(precision, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate `loss`, scaled when fp16 needs it."""
        self.scaler.scale(loss).backward()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on gains, biases, norms and the logit scale (1-d or scalar)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine decay to zero at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

    return factor


def linear_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up, then linear decay to zero at `total` (BERT's, RoBERTa's)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


@dataclass
class Progress:
    """Where a run stands; saved with every checkpoint so that a resumed run carries on exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # optimizer steps already taken in `epoch`
    seen: int = 0  # what the objective counts as trained on: pairs (all processes) or tokens
    best_score: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)  # evaluation events, for the plot and summary


@dataclass
class StepLog:
    """What one optimizer step (or the evaluation before the first) leaves to be written down."""

    step: int
    epoch: int  # the epoch the run is in after this step
    total: int  # the run's optimizer steps
    lr: float
    loss: float | None = None  # the mean over processes on logged steps; None: nothing was learned
    rate: float | None = None  # items per second of training since the last logged step; only when logged
    eval: dict | None = None  # this step's evaluation event, on the main process
    done: bool = False


class Objective(Protocol):
    """What one kind of training learns; `Loop` does the rest. Subclass it for the defaults."""

    model: CNClipModel  # what every checkpoint saves
    module: nn.Module  # what the optimizer trains: its parameters that require a gradient
    best_metric: str | None  # the evaluation figure whose maximum is kept as best/; None: no best/

    def batches(self, epoch: int, first_step: int) -> Iterator[tuple[Any, bool]]:
        """(one step's micro-batches, is the epoch's last step) for the steps of `epoch` from `first_step` on."""
        ...

    def backward(self, micro: Any) -> tuple[torch.Tensor | None, int]:
        """Add one step's gradients (they start at None); (the loss or None if nothing was learned, items)."""
        ...

    def after_step(self) -> None:
        """Called after every optimizer step (a clamp, say)."""

    def state(self) -> dict:
        """Tensors and numbers beside the optimizer's in a resumable checkpoint."""
        return {}

    def load_state(self, state: dict, source: str) -> None:
        """Take back what `state()` saved."""

    def rows(self, log: StepLog) -> list[dict]:
        """The `metrics.jsonl` rows for a step; each is also handed to the run's `on_event`."""
        ...


@dataclass
class LoopOptions:
    """How the shared loop runs; each command fills it from its own options."""

    total_steps: int
    schedule: Callable[[int], float]  # learning-rate factor per optimizer step
    lr: float
    weight_decay: float
    grad_clip: float | None = None  # max global grad norm; None: no clipping
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    eval_every: int | None = None  # steps between evaluations (there is always one after the last step)
    epoch_ends: bool = True  # save (and, without eval_every, evaluate) at the end of every epoch
    options: dict = field(default_factory=dict)  # the command's options, saved with each checkpoint
    resume_keys: tuple[str, ...] = ()  # options that must not change for a resume to continue exactly


class Loop:
    """Runs `objective` for `opts.total_steps` optimizer steps in process `dist`, writing to `out`.

    `on_event` gets every row written to metrics.jsonl (the main process writes them, and checkpoints).
    """

    def __init__(
        self,
        objective: Objective,
        opts: LoopOptions,
        amp: MixedPrecision,
        out: Path,
        dist: DistInfo,
        *,
        progress: Progress | None = None,
        on_event: Callable[[dict], None] | None = None,
    ):
        self.objective, self.opts, self.amp, self.out, self.dist = objective, opts, amp, Path(out), dist
        self.progress = progress if progress is not None else Progress()
        self.on_event = on_event or (lambda event: None)
        self.optimizer = torch.optim.AdamW(
            param_groups(objective.module, opts.weight_decay), lr=opts.lr, betas=opts.betas, eps=opts.eps
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, opts.schedule)
        self.train_seconds = 0.0  # spent on batches and steps, not on evaluation or checkpoints
        self._window = (0.0, 0)  # (train_seconds, progress.seen) at the last logged step

    # -- one optimizer step --------------------------------------------------------------------

    def train_step(self, micro: Any) -> tuple[float | None, int]:
        """One optimizer step over one step's micro-batches; returns (loss or None, items)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, items = self.objective.backward(micro)
        if loss is not None:  # None: no gradient anywhere, and fp16's scaler refuses to step without one
            scaler = self.amp.scaler
            if self.opts.grad_clip:
                scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.objective.module.parameters(), self.opts.grad_clip)
            scaler.step(self.optimizer)
            scaler.update()
        self.scheduler.step()
        self.objective.after_step()
        return (None if loss is None else float(loss.detach())), items

    # -- the loop ------------------------------------------------------------------------------

    def run(self, evaluate: Callable[[], dict] | None = None) -> Progress:
        """Train until `total_steps`; evaluate (when given `evaluate`), log and checkpoint along the way."""
        p = self.progress
        if evaluate is not None and p.step == 0 and not p.history:
            event = self.evaluate(evaluate)  # the starting point, so the curve shows what training changed
            self._record(StepLog(0, p.epoch, self.opts.total_steps, self.scheduler.get_last_lr()[0], eval=event))
        self._window = (self.train_seconds, p.seen)
        while p.step < self.opts.total_steps:
            stepped = False
            started = time.perf_counter()
            for micro, epoch_end in self.objective.batches(p.epoch, p.batch_in_epoch):
                stepped = True
                torch.manual_seed(step_seed(self.opts.seed, p.step, self.dist.rank))  # dropout replays on resume
                loss, items = self.train_step(micro)
                self.train_seconds += time.perf_counter() - started
                self._advance(items, epoch_end)
                self._after_step(loss, epoch_end, evaluate)
                if p.step >= self.opts.total_steps:
                    break
                started = time.perf_counter()
            if not stepped:  # an epoch too small for one step: go on with the next
                p.epoch, p.batch_in_epoch = p.epoch + 1, 0
        self.objective.model.forget_weights_digest()
        return p

    def _advance(self, items: int, epoch_end: bool) -> None:
        p = self.progress
        p.step, p.batch_in_epoch, p.seen = p.step + 1, p.batch_in_epoch + 1, p.seen + items
        if epoch_end:
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0

    def _after_step(self, loss: float | None, epoch_end: bool, evaluate: Callable[[], dict] | None) -> None:
        p, o = self.progress, self.opts
        done = p.step >= o.total_steps
        log = StepLog(p.step, p.epoch, o.total_steps, self.scheduler.get_last_lr()[0], loss=loss, done=done)
        if p.step % o.log_every == 0 or done:
            log.loss = None if loss is None else all_reduce_mean(loss, self.dist)
            log.rate = self._rate()
        each_epoch = o.epoch_ends and not o.eval_every and epoch_end
        if evaluate is not None and ((o.eval_every and p.step % o.eval_every == 0) or each_epoch or done):
            log.eval = self.evaluate(evaluate)
        self._record(log)
        if p.step % o.save_every == 0 or (o.epoch_ends and epoch_end) or done:
            self.save("last")

    def _rate(self) -> float:
        seconds, seen = self._window
        self._window = (self.train_seconds, self.progress.seen)
        return (self.progress.seen - seen) / max(self.train_seconds - seconds, 1e-9)

    def evaluate(self, evaluate: Callable[[], dict]) -> dict | None:
        """Run `evaluate` on the main process and note it in the history, keeping the best model;
        returns the evaluation event (None on the other processes)."""
        p, event = self.progress, None
        if self.dist.is_main:
            self.objective.module.eval()
            with torch.no_grad():
                metrics = evaluate()
            self.objective.model.forget_weights_digest()
            event = {"kind": "eval", "step": p.step, "epoch": p.epoch, **metrics}
            p.history.append(event)
            key = self.objective.best_metric
            if key is not None and (p.best_score is None or metrics[key] > p.best_score):
                p.best_score, p.best_step = metrics[key], p.step
                self.save("best", with_state=False)
        barrier(self.dist)
        return event

    def _record(self, log: StepLog) -> None:
        if not self.dist.is_main:
            return
        rows = self.objective.rows(log)
        if not rows:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        for row in rows:
            self.on_event(row)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, name: str, with_state: bool = True) -> Path | None:
        """Write `out/name/` (a model folder every command loads, plus the loop's state) atomically."""
        if not self.dist.is_main:
            return None
        state = None
        if with_state:
            state = {
                "version": STATE_VERSION,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.amp.scaler.state_dict(),
                "progress": json.dumps(asdict(self.progress)),
                "options": json.dumps(self.opts.options),
                "world_size": self.dist.world_size,
                **self.objective.state(),
            }
        return write_checkpoint(self.objective.model, self.out, name, state)

    def restore(self, folder: Path) -> None:
        """Carry on from a `last/` checkpoint (whose weights the model was loaded from): optimizer,
        schedule, scaler, progress and the objective's state; metrics rows past it are dropped."""
        state = torch.load(folder / STATE_FILE, map_location=self.dist.device, weights_only=True)
        self._check_resumable(state, folder)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.amp.scaler.load_state_dict(state["scaler"])
        for key, value in json.loads(state["progress"]).items():
            setattr(self.progress, key, value)  # in place: the objective may hold this object
        self.objective.load_state(state, str(folder))
        if self.dist.is_main:
            truncate_metrics(self.out / METRICS_FILE, self.progress.step)

    def _check_resumable(self, state: dict, folder: Path) -> None:
        if state.get("version") != STATE_VERSION:
            raise CNClipError(f"{folder} holds training state from an older cnclip; start a new --out or --no-resume")
        saved = json.loads(state["options"])
        for key in self.opts.resume_keys:
            if saved[key] != self.opts.options[key]:
                raise CNClipError(
                    f"{folder} was trained with {key}={saved[key]}, not {self.opts.options[key]}; "
                    "resume with the same settings or start a new --out"
                )
        if state["world_size"] != self.dist.world_size:
            raise CNClipError(
                f"{folder} was trained with {state['world_size']} processes, not {self.dist.world_size}; "
                "resume with the same number or start a new --out"
            )


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of `path` up to `step`: a resumed run is about to write the later ones again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text("utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a row torn by a kill mid-write is dropped
            if line.strip() and json.loads(line)["step"] <= step:
                kept.append(line + "\n")
    atomic.write_text(path, "".join(kept))


def write_checkpoint(model: CNClipModel, out: Path, name: str, state: dict | None) -> Path:
    """`out/name/` published as a whole: a kill at any moment leaves either the old or the new
    checkpoint complete (`find_checkpoint` also looks where the old one waits during the swap)."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic.replacing_folder(out / name) as tmp:
        model.save_pretrained(tmp)
        if state is not None:
            torch.save(state, tmp / STATE_FILE)
    return out / name


def find_checkpoint(out: Path, name: str = "last") -> Path | None:
    """The newest complete `name` checkpoint under `out`, if any."""
    for candidate in (out / name, atomic.previous_folder(out / name)):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one optimizer step in one process: dropout draws the same after a resume."""
    return (seed * 1_000_003 + step * 7_919 + rank) % (2**63)
