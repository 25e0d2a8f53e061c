"""The shared training loop on a toy objective: steps and epochs, schedule, evaluation and save
cadence, metrics rows, exact resume, steps that learn nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cnclip.errors import CNClipError
from cnclip.train.distributed import DistInfo
from cnclip.train.loop import (
    METRICS_FILE,
    STATE_FILE,
    Loop,
    LoopOptions,
    MixedPrecision,
    StepLog,
    cosine_with_warmup,
    find_checkpoint,
    truncate_metrics,
)

STEPS_PER_EPOCH, ACCUM = 5, 2


class ToyModel:
    """Stands in for a CNClipModel: a checkpoint is its module's weights."""

    def __init__(self, module: nn.Module):
        self.module = module

    def save_pretrained(self, folder: Path) -> None:
        torch.save(self.module.state_dict(), Path(folder) / "weights.pt")

    def forget_weights_digest(self) -> None:
        pass


class Toy:
    """Squares of a small net with dropout (so a resume must replay the dropout masks) on fixed data."""

    best_metric = "score"

    def __init__(self, amp: MixedPrecision, no_loss_at: int | None = None):
        torch.manual_seed(0)
        self.module = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
        self.model, self.amp, self.no_loss_at = ToyModel(self.module), amp, no_loss_at
        self.steps_after = 0  # saved and restored: the objective's own state

    def batches(self, epoch: int, first_step: int):
        data = torch.randn(STEPS_PER_EPOCH, ACCUM, 3, 4, generator=torch.Generator().manual_seed(epoch))
        for step in range(first_step, STEPS_PER_EPOCH):
            yield list(data[step]), step == STEPS_PER_EPOCH - 1

    def backward(self, micro: list[torch.Tensor]) -> tuple[torch.Tensor | None, int]:
        if self.steps_after + 1 == self.no_loss_at:
            return None, 0
        self.module.train()
        losses = [self.module(x).pow(2).mean() for x in micro]
        for loss in losses:
            self.amp.backward(loss / len(micro))
        return torch.stack(losses).mean().detach(), 3 * len(micro)

    def after_step(self) -> None:
        self.steps_after += 1

    def evaluate(self) -> dict:
        return {"score": -float(self.module[2].weight.norm())}

    def state(self) -> dict:
        return {"steps_after": self.steps_after}

    def load_state(self, state: dict, source: str) -> None:
        self.steps_after = state["steps_after"]

    def rows(self, log: StepLog) -> list[dict]:
        rows = [] if log.rate is None else [{"kind": "train", "step": log.step, "loss": log.loss, "lr": log.lr}]
        return rows + ([log.eval] if log.eval is not None else [])


def _loop(out: Path, events: list | None = None, no_loss_at: int | None = None, **options) -> tuple[Loop, Toy]:
    amp = MixedPrecision("fp32", torch.device("cpu"))
    toy = Toy(amp, no_loss_at)
    total = options.pop("total_steps", 2 * STEPS_PER_EPOCH)
    opts = LoopOptions(
        total_steps=total, schedule=cosine_with_warmup(2, total), lr=0.1, weight_decay=0.01, grad_clip=1.0,
        log_every=1, options={"seed": 0}, resume_keys=("seed",), **options,
    )  # fmt: skip
    return Loop(toy, opts, amp, out, DistInfo(), on_event=None if events is None else events.append), toy


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text("utf-8").splitlines()]


def test_steps_epochs_schedule_and_rows(tmp_path):
    events = []
    loop, toy = _loop(tmp_path, events)
    progress = loop.run()
    assert (progress.step, progress.epoch, progress.batch_in_epoch) == (10, 2, 0)
    assert progress.seen == 10 * 3 * ACCUM and toy.steps_after == 10
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 11)) and rows == events
    assert rows[0]["lr"] == pytest.approx(0.1) and rows[-1]["lr"] == 0.0  # warm-up, then cosine down to zero
    assert json.loads(torch.load(tmp_path / "last" / STATE_FILE, weights_only=True)["progress"])["step"] == 10


@pytest.mark.parametrize(
    ("options", "evaluated_at"),
    [
        ({}, [0, 5, 10]),  # before the first step, at each epoch's end, after the last
        ({"eval_every": 3}, [0, 3, 6, 9, 10]),
        ({"epoch_ends": False}, [0, 10]),
    ],
)
def test_evaluation_cadence_and_the_best_model(tmp_path, options, evaluated_at):
    loop, toy = _loop(tmp_path, **options)
    progress = loop.run(toy.evaluate)
    assert [e["step"] for e in progress.history] == evaluated_at
    assert [r["step"] for r in _rows(tmp_path) if r["kind"] == "eval"] == evaluated_at
    best = max(progress.history, key=lambda e: e["score"])
    assert (progress.best_step, progress.best_score) == (best["step"], best["score"])
    assert (tmp_path / "best" / "weights.pt").is_file() and not (tmp_path / "best" / STATE_FILE).exists()


def test_an_interrupted_run_resumes_exactly_and_writes_each_row_once(tmp_path):
    whole, _ = _loop(tmp_path / "whole", save_every=4)
    whole.run()

    class Killed(Exception):
        pass

    def kill_at_step_6(row: dict) -> None:
        if row["step"] == 6:
            raise Killed  # rows 5 and 6 are written, the last checkpoint is step 5's (epoch end)

    cut, _ = _loop(tmp_path / "cut", save_every=4)
    cut.on_event = kill_at_step_6
    with pytest.raises(Killed):
        cut.run()
    last = find_checkpoint(tmp_path / "cut")
    again, toy = _loop(tmp_path / "cut", save_every=4)
    toy.module.load_state_dict(torch.load(last / "weights.pt", weights_only=True))  # as the model would load
    again.restore(last)
    assert again.progress.step == toy.steps_after == 5
    again.run()
    for a, b in zip(whole.objective.module.parameters(), toy.module.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [r["step"] for r in _rows(tmp_path / "cut")] == list(range(1, 11))


def test_a_step_without_loss_changes_no_weight_but_moves_on(tmp_path):
    loop, toy = _loop(tmp_path, no_loss_at=3, total_steps=4)
    before = {}

    def keep(row: dict) -> None:
        before[row["step"]] = [p.detach().clone() for p in toy.module.parameters()]

    loop.on_event = keep
    loop.run()
    assert all(torch.equal(a, b) for a, b in zip(before[2], before[3], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(before[3], before[4], strict=True))
    rows = _rows(tmp_path)
    assert [r["loss"] is None for r in rows] == [False, False, True, False]
    assert rows[2]["lr"] != rows[1]["lr"]  # the schedule counts the step all the same


def test_truncating_metrics_keeps_rows_up_to_the_step_and_drops_a_torn_row(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 1, 2, 3)) + '{"step": 4, "lo', "utf-8")
    truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text("utf-8").splitlines()] == [0, 1, 2]


def test_resume_refuses_other_settings_and_older_state(tmp_path):
    loop, _ = _loop(tmp_path, total_steps=2)
    loop.run()
    other, _ = _loop(tmp_path)
    other.opts.options = {"seed": 1}
    with pytest.raises(CNClipError, match="seed=0, not 1"):
        other.restore(tmp_path / "last")
    state = torch.load(tmp_path / "last" / STATE_FILE, weights_only=True)
    del state["version"]
    torch.save(state, tmp_path / "last" / STATE_FILE)
    with pytest.raises(CNClipError, match="older cnclip"):
        _loop(tmp_path)[0].restore(tmp_path / "last")
