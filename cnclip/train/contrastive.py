"""Contrastive fine-tuning (`cnclip train`): the image-text objective and `Trainer`, its run on the shared loop.

One `Trainer` serves one process; under torchrun each process runs one, and they meet in
the loss's feature gather and DDP's gradient averaging. Checkpoints are written by rank 0.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from cnclip.errors import CNClipError
from cnclip.model.clip import CNClipModel
from cnclip.train.batches import PairDataset, collate_pairs, unique_image_batches
from cnclip.train.distributed import DistInfo
from cnclip.train.loop import Loop, LoopOptions, MixedPrecision, Objective, StepLog, cosine_with_warmup
from cnclip.train.loop import Progress as LoopProgress
from cnclip.train.loss import ContrastiveLoss
from cnclip.train.pairs import Pair

MAX_LOGIT_SCALE = math.log(100.0)  # the official models sit at this clamp: logit scale 100

MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]  # one step's [(pixels, token ids), ...] in one process


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

    def global_batch(self, world_size: int) -> int:
        """Pairs per optimizer step, over all processes and micro-batches."""
        return self.batch_size * world_size * self.accum_freq


@dataclass
class Progress(LoopProgress):
    """The loop's progress (`seen` counts pairs over all processes) plus the images that would not decode."""

    unreadable: int = 0


class Contrastive(Objective):
    """The image-text contrastive objective on `pairs`, with GradCache accumulation."""

    best_metric = "MR"  # mean recall over both directions, as `evaluate_pairs` reports it

    def __init__(self, model: CNClipModel, pairs: list[Pair], opts: TrainOptions, dist: DistInfo, amp: MixedPrecision):
        self.model = self.module = model
        self.pairs, self.opts, self.dist, self.amp = pairs, opts, dist, amp
        self.progress = Progress()
        self.global_batch = opts.global_batch(dist.world_size)
        self.ddp = (
            DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
            if dist.distributed
            else None
        )
        self.loss_fn = ContrastiveLoss(dist.rank, dist.world_size, gather_with_grad=opts.gather_with_grad)
        self.dataset = PairDataset(pairs, model.config.vision.image_size, model.tokenizer, draft=opts.draft)

    # -- one step's gradients ------------------------------------------------------------------

    def _forward(self, pixels: torch.Tensor, ids: torch.Tensor):
        net = self.ddp if self.ddp is not None else self.model
        with self.amp.autocast():
            return net(image=pixels, text=ids)

    def backward(self, micro: MicroBatches) -> tuple[torch.Tensor, int]:
        """Add the gradients of the loss over all of `micro` [(pixels, ids), ...]; (loss, pairs in all processes).

        With several micro-batches the loss is the one of their union (GradCache): features are
        first computed without a graph, then each micro-batch is run again with one and
        back-propagated against the cached features of the others. The RNG state is replayed
        so the second pass draws the same dropout masks as the first.
        """
        self.model.train()
        self._keep_locked_towers_in_eval()
        device = self.dist.device
        micro = [(p.to(device, non_blocking=True), t.to(device, non_blocking=True)) for p, t in micro]
        pairs = sum(p.shape[0] for p, _ in micro) * self.dist.world_size
        if len(micro) > 1:
            return self._accumulated_backward(micro), pairs
        pixels, ids = micro[0]
        image, text, scale = self._forward(pixels, ids)
        loss = self.loss_fn(image, text, scale)
        self.amp.backward(loss)
        return loss, pairs

    def _accumulated_backward(self, micro: MicroBatches) -> torch.Tensor:
        images, texts, states = [], [], []
        with torch.no_grad():
            for pixels, ids in micro:
                states.append(_rng_state(self.dist.device))
                image, text, _ = self._forward(pixels, ids)
                images.append(image)
                texts.append(text)
        loss = torch.zeros(())
        for j, (pixels, ids) in enumerate(micro):
            _set_rng_state(states[j], self.dist.device)
            last = j == len(micro) - 1
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
                self.amp.backward(loss)
        return loss

    def _keep_locked_towers_in_eval(self) -> None:
        # A fully locked tower is a fixed feature extractor: dropout off, BatchNorm statistics frozen.
        if self.opts.lock_image and not self.opts.lock_image_unlocked:
            self.model.visual.eval()
        if self.opts.lock_text and not self.opts.lock_text_unlocked:
            self.model.bert.eval()

    def after_step(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # -- batches -------------------------------------------------------------------------------

    def batches(self, epoch: int, first_step: int) -> Iterator[tuple[MicroBatches, bool]]:
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

    def _equal_sizes(self, micro: MicroBatches) -> MicroBatches:
        # An unreadable image shrinks a micro-batch, but the feature gather needs equal sizes in
        # every process (and the cached features in every micro-batch): cut all to the smallest.
        n = min(p.shape[0] for p, _ in micro)
        if self.dist.distributed:
            t = torch.tensor([n], device=self.dist.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            n = int(t.item())
        return [(p[:n], t[:n]) for p, t in micro]

    # -- what is written down ------------------------------------------------------------------

    def rows(self, log: StepLog) -> list[dict]:
        rows = []
        if log.rate is not None:
            rows.append(
                {
                    "kind": "train",
                    "step": log.step,
                    "epoch": log.epoch,
                    "loss": round(log.loss, 6),
                    "lr": log.lr,
                    "logit_scale": round(float(self.model.logit_scale.detach().exp()), 4),
                    "pairs_per_s": round(log.rate, 2),
                    "total_steps": log.total,
                }
            )
        if log.eval is not None:
            rows.append(log.eval)
        return rows


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
        self.global_batch = opts.global_batch(dist.world_size)
        self.total_steps = _count_steps(pairs, opts, self.global_batch)
        self.amp = MixedPrecision(opts.precision, dist.device)
        _prepare(model, opts, dist)
        self.objective = Contrastive(model, pairs, opts, dist, self.amp)
        self.loop = Loop(
            self.objective,
            _loop_options(opts, self.total_steps),
            self.amp,
            self.out,
            dist,
            progress=self.objective.progress,
            on_event=on_event,
        )

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: plain fp32)."""
        return self.amp.dtype

    @property
    def progress(self) -> Progress:
        return self.objective.progress

    def _micro_batches(self, epoch: int, first_step: int) -> Iterator[tuple[MicroBatches, bool]]:
        return self.objective.batches(epoch, first_step)

    def backward(self, micro: MicroBatches) -> torch.Tensor:
        """Zero the gradients and fill them with those of the loss over all `micro`; returns the loss."""
        self.loop.optimizer.zero_grad(set_to_none=True)
        return self.objective.backward(micro)[0]

    def train_step(self, micro: MicroBatches) -> float:
        """One optimizer step over `micro` [(pixels, ids), ...]; returns the loss."""
        return self.loop.train_step(micro)[0]

    def run(self, evaluate: Callable[[CNClipModel], dict] | None = None) -> Progress:
        """Train until `epochs` or `max_steps`; evaluate, log and checkpoint along the way."""
        self.loop.run(None if evaluate is None else lambda: evaluate(self.model))
        if evaluate is None:
            self.save("best", with_state=False)  # without validation the final model is the best we know
        return self.progress

    def save(self, name: str, with_state: bool = True) -> Path | None:
        """Write `out/name/` (a model folder every command loads, plus the trainer state) atomically."""
        return self.loop.save(name, with_state)

    def restore(self, folder: Path) -> None:
        """Take optimizer, schedule, scaler and progress from a `last/` checkpoint (the weights
        were loaded with the model)."""
        self.loop.restore(folder)


def _count_steps(pairs: list[Pair], opts: TrainOptions, global_batch: int) -> int:
    """The run's optimizer steps: its epochs' real batches, or `max_steps` when that comes first."""
    # With images that repeat across captions an epoch has fewer batches than len(pairs) // global_batch,
    # and the cosine schedule must end where the run does.
    total = 0
    for epoch in range(opts.epochs):
        steps = len(unique_image_batches(pairs, global_batch, seed=opts.seed, epoch=epoch))
        if epoch == 0 and steps == 0:
            raise CNClipError(
                f"{len(pairs)} training pairs do not fill one step of {global_batch} distinct images "
                f"(batch size x processes x accumulation); lower --batch-size or add data"
            )
        total += steps
        if opts.max_steps is not None and total >= opts.max_steps:
            return opts.max_steps
    return total


def _loop_options(opts: TrainOptions, total_steps: int) -> LoopOptions:
    return LoopOptions(
        total_steps=total_steps,
        schedule=cosine_with_warmup(opts.warmup, total_steps),
        lr=opts.lr,
        weight_decay=opts.weight_decay,
        grad_clip=opts.grad_clip,
        betas=opts.betas,
        eps=opts.eps,
        seed=opts.seed,
        log_every=opts.log_every,
        save_every=opts.save_every,
        eval_every=opts.eval_every,
        options=asdict(opts),
        resume_keys=("batch_size", "accum_freq", "seed"),
    )


def _prepare(model: CNClipModel, opts: TrainOptions, dist: DistInfo) -> None:
    """Move `model` to its device and lock and checkpoint what `opts` say."""
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


def _rng_state(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
