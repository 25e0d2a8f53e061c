"""The contrastive loss, alone and gathered across two gloo processes."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cnclip.train.loss import ContrastiveLoss


def _by_hand(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    logits = scale * image @ text.T
    n = logits.shape[0]
    i2t = -sum(math.log(torch.softmax(logits[i], 0)[i]) for i in range(n)) / n
    t2i = -sum(math.log(torch.softmax(logits[:, i], 0)[i]) for i in range(n)) / n
    return (i2t + t2i) / 2


def test_loss_equals_the_formula_and_prefers_matching_pairs():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(6, 8), dim=-1)
    text = F.normalize(torch.randn(6, 8), dim=-1)
    loss = ContrastiveLoss()(image, text, torch.tensor(10.0))
    assert abs(float(loss) - _by_hand(image.double(), text.double(), 10.0)) < 1e-5
    matched = ContrastiveLoss()(image, image, torch.tensor(10.0))
    assert float(matched) < float(loss)


class _Towers(nn.Module):
    """Two linear 'towers' and a logit scale: the loss's gradient path without a real model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(12, 8)
        self.text = nn.Linear(10, 8)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, y):
        return F.normalize(self.image(x), dim=-1), F.normalize(self.text(y), dim=-1), self.logit_scale.exp()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 12, generator=g), torch.randn(8, 10, generator=g)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, world_size: int, init_file: str, with_grad: bool, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = DistributedDataParallel(_Towers())
        x, y = _batch()
        n = x.shape[0] // world_size
        image, text, scale = model(x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
        loss = ContrastiveLoss(rank, world_size, gather_with_grad=with_grad)(image, text, scale)
        loss.backward()
        out[rank] = (loss.item(), _grads(model.module))
    finally:
        dist.destroy_process_group()


def _distributed(tmp_path, with_grad: bool) -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, str(tmp_path / f"init-{with_grad}"), with_grad, out), nprocs=2, join=True)
        return dict(out)


def test_two_gloo_processes_equal_one_process_on_the_combined_batch(tmp_path):
    single = _Towers()
    x, y = _batch()
    loss = ContrastiveLoss()(*single(x, y))
    loss.backward()
    want = _grads(single)

    out = _distributed(tmp_path, with_grad=True)
    for rank in (0, 1):
        got_loss, got = out[rank]
        assert abs(got_loss - loss.item()) < 1e-6
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5)

    # without the gradient through the gather, each process only sees its own slice: the towers
    # get 1/2 of the gradient, the logit scale (in every logit of both processes) all of it
    out = _distributed(tmp_path, with_grad=False)
    for rank in (0, 1):
        got_loss, got = out[rank]
        assert abs(got_loss - loss.item()) < 1e-6
        for name, g in want.items():
            torch.testing.assert_close(got[name], g if name == "logit_scale" else g / 2, atol=1e-6, rtol=1e-5)
