"""The symmetric contrastive (InfoNCE) loss, with features gathered across processes.

Distributed without depending on it: `rank` and `world_size` are arguments; only
`cnclip.train.distributed` reads the environment.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_features(
    image: torch.Tensor, text: torch.Tensor, *, rank: int, world_size: int, with_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's (image, text) features concatenated in rank order: (world_size * n, d) each.

    `with_grad` sends gradients back through the gather, so each process's loss has the full
    gradient and DDP's averaging gives exactly the single-process gradient of the combined batch.
    Without it only this process's slice carries gradient (the others are constants): cheaper,
    and the towers' gradients come out 1/world_size of that (the logit scale's stays whole), a
    scale AdamW all but ignores.
    """
    if world_size == 1:
        return image, text
    if with_grad:
        return _GatherWithGrad.apply(image, rank, world_size), _GatherWithGrad.apply(text, rank, world_size)
    images = [torch.empty_like(image) for _ in range(world_size)]
    texts = [torch.empty_like(text) for _ in range(world_size)]
    dist.all_gather(images, image)
    dist.all_gather(texts, text)
    images[rank], texts[rank] = image, text  # keep the autograd link for the local slice
    return torch.cat(images), torch.cat(texts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient for this process's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]  # every process holds the same number of rows
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None


class ContrastiveLoss(nn.Module):
    """Mean of image->text and text->image cross-entropy over `logit_scale x cosine` logits.

    Row i of the image and text features is a matching pair; every other row of the (gathered)
    batch is a negative. Features should be L2-normalized.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, gather_with_grad: bool = True):
        super().__init__()
        self.rank, self.world_size, self.gather_with_grad = rank, world_size, gather_with_grad

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        if image_features.shape != text_features.shape:
            raise ValueError(
                f"image features {tuple(image_features.shape)} and text features "
                f"{tuple(text_features.shape)} must pair up row by row"
            )
        images, texts = gather_features(
            image_features, text_features, rank=self.rank, world_size=self.world_size, with_grad=self.gather_with_grad
        )
        logits = logit_scale * images @ texts.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        # cross-entropy in fp32: under autocast the logits may be bf16/fp16
        logits = logits.float()
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
