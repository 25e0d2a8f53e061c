"""The contrastive fine-tuning loop: optimizer, schedule, precision, accumulation, checkpoints.

One `Trainer` serves one process; under torchrun each process runs one, and they meet in
the loss's feature gather and DDP's gradient averaging. Checkpoints are written by rank 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from cnclip import atomic
from cnclip.errors import CNClipError
from cnclip.model.clip import CNClipModel
from cnclip.model.runtime import cpu_has_fast_bf16
from cnclip.train.data import Pair, PairDataset, collate_pairs, unique_image_batches
from cnclip.train.distributed import DistInfo, all_reduce_mean, barrier
from cnclip.train.loss import ContrastiveLoss

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
MAX_LOGIT_SCALE = math.log(100.0)  # the official models sit at this clamp: logit scale 100


@dataclass
class TrainOptions:
    """Everything that shapes a run; `main` fills it from the command line."""

    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (over all epochs)
    batch_size: int = 64  # per process and per accumulation micro-batch
    accum_freq: int = 1  # micro-batches per optimizer step (GradCache: exact large-batch loss)
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: int = 100  # linear warm-up steps, then cosine decay to zero
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float | None = None  # max global grad norm; None: no clipping
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    lock_image: bool = False
    lock_image_unlocked: int = 0  # with lock_image: last N ViT layer groups stay trainable
    lock_text: bool = False
    lock_text_unlocked: int = 0  # with lock_text: last N BERT layers stay trainable
    grad_checkpointing: bool = False
    gather_with_grad: bool = True
    eval_every: int | None = None  # steps; None: at the end of every epoch
    save_every: int = 500  # steps between resumable checkpoints (also at every epoch end)
    log_every: int = 10
    workers: int = 2
    seed: int = 0
    draft: bool = True  # JPEG draft decoding, as when indexing

    def check(self) -> None:
        for name in ("epochs", "batch_size", "accum_freq", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise CNClipError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise CNClipError(f"unknown precision {self.precision!r}; choose auto, fp32, bf16 or fp16")
        if not self.lr > 0:
            raise CNClipError(f"--lr must be positive, not {self.lr}")


@dataclass
class Progress:
    """Where a run stands; saved with every checkpoint so that a resumed run carries on exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # optimizer steps already taken in `epoch`
    best_score: float | None = None
    best_step: int | None = None
    unreadable: int = 0  # images that failed to decode during training
    pairs_seen: int = 0
    history: list[dict] = field(default_factory=list)  # eval results, for the plot and summary


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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on gains, biases, norms and the logit scale (1-d or scalar)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

    return factor


class Trainer:
    """Trains `model` on `pairs` with options `opts` in process `dist` (rank, world size, device)."""

    def __init__(
        self,
        model: CNClipModel,
        pairs: list[Pair],
        opts: TrainOptions,
        out: Path,
        dist: DistInfo,
        *,
        on_event: Callable[[dict], None] | None = None,
    ):
        opts.check()
        self.model, self.pairs, self.opts, self.out, self.dist = model, pairs, opts, Path(out), dist
        self.on_event = on_event or (lambda event: None)
        self.global_batch = opts.batch_size * dist.world_size * opts.accum_freq
        self.steps_per_epoch = len(pairs) // self.global_batch
        if self.steps_per_epoch == 0:
            raise CNClipError(
                f"{len(pairs)} training pairs do not fill one step of {self.global_batch} "
                f"(batch size x processes x accumulation); lower --batch-size or add data"
            )
        self.total_steps = self.steps_per_epoch * opts.epochs
        if opts.max_steps is not None:
            self.total_steps = min(self.total_steps, opts.max_steps)
        self.amp_dtype = resolve_precision(opts.precision, dist.device)

        model.to(dist.device)
        if opts.lock_image:
            model.lock_image_tower(opts.lock_image_unlocked)
        if opts.lock_text:
            model.lock_text_tower(opts.lock_text_unlocked)
        if opts.grad_checkpointing:
            model.set_grad_checkpointing(True)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad and n != "logit_scale"]
        if not trainable:
            raise CNClipError("every parameter is locked; unlock a tower or some of its layers")
        self.ddp = (
            DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
            if dist.distributed
            else None
        )
        self.loss_fn = ContrastiveLoss(dist.rank, dist.world_size, gather_with_grad=opts.gather_with_grad)
        self.optimizer = torch.optim.AdamW(
            param_groups(model, opts.weight_decay), lr=opts.lr, betas=opts.betas, eps=opts.eps
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(opts.warmup, self.total_steps)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.dataset = PairDataset(pairs, model.config.vision.image_size, model.tokenizer, draft=opts.draft)
        self.progress = Progress()

    # -- one optimizer step --------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)

    def _forward(self, pixels: torch.Tensor, ids: torch.Tensor):
        net = self.ddp if self.ddp is not None else self.model
        with self._autocast():
            return net(image=pixels, text=ids)

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """One optimizer step over `micro_batches` [(pixels, ids), ...]; returns the loss.

        With several micro-batches the loss is the one of their union (GradCache): features are
        first computed without a graph, then each micro-batch is run again with one and
        back-propagated against the cached features of the others. The RNG state is replayed
        so the second pass draws the same dropout masks as the first.
        """
        loss = self.backward(micro_batches)
        if self.opts.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opts.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return float(loss.detach())

    def backward(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Zero the gradients and fill them with those of the loss over all `micro_batches`."""
        self.model.train()
        self._keep_locked_towers_in_eval()
        self.optimizer.zero_grad(set_to_none=True)
        device = self.dist.device
        micro_batches = [(p.to(device, non_blocking=True), t.to(device, non_blocking=True)) for p, t in micro_batches]
        if len(micro_batches) > 1:
            return self._accumulated_backward(micro_batches)
        pixels, ids = micro_batches[0]
        image, text, scale = self._forward(pixels, ids)
        loss = self.loss_fn(image, text, scale)
        self.scaler.scale(loss).backward()
        return loss

    def _accumulated_backward(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        images, texts, states = [], [], []
        with torch.no_grad():
            for pixels, ids in micro_batches:
                states.append(_rng_state(self.dist.device))
                image, text, _ = self._forward(pixels, ids)
                images.append(image)
                texts.append(text)
        loss = torch.zeros(())
        for j, (pixels, ids) in enumerate(micro_batches):
            _set_rng_state(states[j], self.dist.device)
            last = j == len(micro_batches) - 1
            # DDP averages gradients once, after the last micro-batch's backward
            sync = contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()
            with sync:
                image, text, scale = self._forward(pixels, ids)
                # logit_scale takes its gradient from one pass only, as in the single big batch; the
                # last one, so that DDP's synced backward sees a gradient for every parameter
                scale = scale if last else scale.detach()
                all_images = torch.cat(images[:j] + [image] + images[j + 1 :])
                all_texts = torch.cat(texts[:j] + [text] + texts[j + 1 :])
                loss = self.loss_fn(all_images, all_texts, scale)
                self.scaler.scale(loss).backward()
        return loss

    def _keep_locked_towers_in_eval(self) -> None:
        # A fully locked tower is a fixed feature extractor: dropout off, BatchNorm statistics frozen.
        if self.opts.lock_image and not self.opts.lock_image_unlocked:
            self.model.visual.eval()
        if self.opts.lock_text and not self.opts.lock_text_unlocked:
            self.model.bert.eval()

    # -- the loop ------------------------------------------------------------------------------

    def _micro_batches(
        self, epoch: int, first_step: int
    ) -> Iterator[tuple[list[tuple[torch.Tensor, torch.Tensor]], bool]]:
        """(this process's K micro-batches, is the epoch's last step) for the steps of `epoch`
        from `first_step` on. Every process builds the same global batches (same seed) and takes
        its slice, so no batch anywhere holds one image twice."""
        o, d = self.opts, self.dist
        steps = unique_image_batches(self.pairs, self.global_batch, seed=o.seed, epoch=epoch)
        sampler = []
        for batch in steps[first_step:]:
            for k in range(o.accum_freq):
                start = (k * d.world_size + d.rank) * o.batch_size
                sampler.append(batch[start : start + o.batch_size])
        if not sampler:
            return
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=collate_pairs,
            num_workers=o.workers,
            pin_memory=d.device.type == "cuda",
        )
        it = iter(loader)
        for step in range(first_step, len(steps)):
            micro = []
            for _ in range(o.accum_freq):
                pixels, ids, dropped = next(it)
                self.progress.unreadable += dropped
                micro.append((pixels, ids))
            yield self._equal_sizes(micro), step == len(steps) - 1

    def _equal_sizes(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # An unreadable image shrinks a micro-batch, but the feature gather needs equal sizes in
        # every process (and the cached features in every micro-batch): cut all to the smallest.
        n = min(p.shape[0] for p, _ in micro)
        if self.dist.distributed:
            t = torch.tensor([n], device=self.dist.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            n = int(t.item())
        return [(p[:n], t[:n]) for p, t in micro]

    def run(self, evaluate: Callable[[CNClipModel], dict] | None = None) -> Progress:
        """Train until `epochs` or `max_steps`; evaluate, log and checkpoint along the way."""
        p, o = self.progress, self.opts
        if evaluate is not None and p.step == 0 and not p.history:
            self._evaluate(evaluate)  # the starting point, so the curve shows what training changed
        start_time, start_pairs = time.perf_counter(), p.pairs_seen
        done = p.step >= self.total_steps or p.epoch >= o.epochs
        while not done:
            stepped = False
            for micro, epoch_end in self._micro_batches(p.epoch, p.batch_in_epoch):
                stepped = True
                torch.manual_seed(_step_seed(o.seed, p.step, self.dist.rank))  # dropout replays on resume
                loss = self.train_step(micro)
                p.step += 1
                p.batch_in_epoch += 1
                p.pairs_seen += sum(x.shape[0] for x, _ in micro) * self.dist.world_size
                if epoch_end:
                    p.epoch, p.batch_in_epoch = p.epoch + 1, 0
                done = p.step >= self.total_steps or p.epoch >= o.epochs
                if p.step % o.log_every == 0 or done:
                    rate = (p.pairs_seen - start_pairs) / max(time.perf_counter() - start_time, 1e-9)
                    self._log_train(all_reduce_mean(loss, self.dist), rate)
                if evaluate is not None and (
                    (o.eval_every and p.step % o.eval_every == 0) or (not o.eval_every and epoch_end) or done
                ):
                    self._evaluate(evaluate)
                if p.step % o.save_every == 0 or epoch_end or done:
                    self.save("last")
                if done:
                    break
            if not stepped:  # an epoch too small for one step (cannot happen after the size check)
                p.epoch, p.batch_in_epoch = p.epoch + 1, 0
                done = p.epoch >= o.epochs
        if evaluate is None:
            self.save("best", with_state=False)  # without validation the final model is the best we know
        self.model.forget_weights_digest()
        return p

    def _log_train(self, loss: float, rate: float) -> None:
        event = {
            "kind": "train",
            "step": self.progress.step,
            "epoch": self.progress.epoch,
            "loss": round(loss, 6),
            "lr": self.scheduler.get_last_lr()[0],
            "logit_scale": round(float(self.model.logit_scale.detach().exp()), 4),
            "pairs_per_s": round(rate, 2),
            "total_steps": self.total_steps,
        }
        self._record(event)

    def _evaluate(self, evaluate: Callable[[CNClipModel], dict]) -> None:
        p = self.progress
        if self.dist.is_main:
            self.model.eval()
            with torch.no_grad():
                metrics = evaluate(self.model)
            self.model.forget_weights_digest()
            event = {"kind": "eval", "step": p.step, "epoch": p.epoch, **metrics}
            p.history.append(event)
            self._record(event)
            if p.best_score is None or metrics["MR"] > p.best_score:
                p.best_score, p.best_step = metrics["MR"], p.step
                self.save("best", with_state=False)
        barrier(self.dist)

    def _record(self, event: dict) -> None:
        if not self.dist.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, ensure_ascii=False) + "\n")
        self.on_event(event)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, name: str, with_state: bool = True) -> Path | None:
        """Write `out/name/` (a model folder every command loads, plus the trainer state) atomically."""
        if not self.dist.is_main:
            return None
        state = None
        if with_state:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "progress": json.dumps(asdict(self.progress)),
                "options": json.dumps(asdict(self.opts)),
                "world_size": self.dist.world_size,
            }
        return write_checkpoint(self.model, self.out, name, state)

    def restore(self, folder: Path) -> None:
        """Take optimizer, schedule, scaler and progress from a `last/` checkpoint (the weights
        were loaded with the model)."""
        state = torch.load(folder / STATE_FILE, map_location=self.dist.device, weights_only=True)
        saved = json.loads(state["options"])
        for key in ("batch_size", "accum_freq", "seed"):
            if saved[key] != getattr(self.opts, key):
                raise CNClipError(
                    f"{folder} was trained with {key}={saved[key]}, not {getattr(self.opts, key)}; "
                    "resume with the same settings or start a new --out"
                )
        if state["world_size"] != self.dist.world_size:
            raise CNClipError(
                f"{folder} was trained with {state['world_size']} processes, not {self.dist.world_size}; "
                "resume with the same number or start a new --out"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**json.loads(state["progress"]))


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


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank) % (2**63)


def _rng_state(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
