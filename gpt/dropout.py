"""Dropout with a mask that costs a fraction of torch's on CPU: 16 random bits per element, four per draw."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpt.native import applies, train_ops

LEVELS = 1 << 16  # an element is dropped when its 16 random bits fall in the lowest round(p * LEVELS) values
_LOWEST = -(1 << 15)


def random_bits(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """16 uniform random bits (an int16) for each element of `like`, shaped like it.

    torch's CPU dropout draws one Bernoulli sample per element; this draws 64 bits at a time from the
    same generator (torch.manual_seed makes it repeat) and reads them as four int16 lanes, one draw for
    four elements (what it saves: docs/benchmarks.md). The bits come from
    `generator` when given (on like's device), else from the global generator."""
    n = like.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device)
    bits.random_(-(1 << 63), None, generator=generator)  # from the lowest int64 and no upper bound: all 64 bits uniform
    return bits.view(torch.int16)[:n].view(like.shape)


def kept_above(p: float) -> tuple[int, float]:
    """(the lowest random_bits value of a kept element, the scale of a kept one) for dropout probability p:
    the lowest round(p * LEVELS) values drop, so the probability is p rounded to a multiple of 1/65,536,
    and a kept element is scaled by 1 / (1 - that probability)."""
    dropped = round(p * LEVELS)
    return _LOWEST + dropped, LEVELS / (LEVELS - dropped)


def keep_scale(like: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A tensor shaped and typed like `like`: 0 where an element is dropped (probability p, rounded to a
    multiple of 1/65,536), else 1 / (1 - that probability), so the expected output equals the input; from
    random_bits(like, generator)."""
    lowest_kept, scale = kept_above(p)
    # The comparison writes 1.0 / 0.0 straight into the mask's dtype (no bool tensor to convert), then one
    # in-place scale (no torch.where(keep, s, 0.0) pass making a new tensor).
    mask = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    torch.ge(random_bits(like, generator), lowest_kept, out=mask)
    return mask.mul_(scale)


def mask_seed(generator: torch.Generator | None = None) -> int:
    """One 64-bit draw from `generator` (else the global one): the seed of a mask the C++ kernels make
    (gpt/csrc/train_ops.cpp), so that their masks too repeat under torch.manual_seed."""
    return int(torch.empty((), dtype=torch.int64).random_(-(1 << 63), None, generator=generator))


class _KernelDropout(torch.autograd.Function):
    """x times a mask the kernel makes from its seed, in one pass; the backward pass remakes the same mask
    from the seed instead of keeping it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, lowest_kept: int, scale: float) -> torch.Tensor:
        ctx.mask = seed, lowest_kept, scale
        return train_ops().dropout(x.contiguous(), seed, lowest_kept, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return train_ops().dropout(grad.contiguous(), *ctx.mask), None, None, None


class Dropout(nn.Module):
    """nn.Dropout's behaviour (zero each element with probability p in training, scale the rest up; the
    identity in eval); on CPU, or on any device with a generator of its own, its mask comes from
    keep_scale, elsewhere (or with torch_masks) from torch's own dropout, whose masks are nn.Dropout's,
    draw for draw."""

    torch_masks: bool = False  # set per model by use_masks
    generator: torch.Generator | None = None
    cpu_kernels: bool = False  # set by gpt.cpu_kernels.use_cpu_kernels: masks made in the kernel (_KernelDropout)

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.torch_masks or (x.device.type != "cpu" and self.generator is None):
            return F.dropout(x, self.p, training=True)
        if self.cpu_kernels and applies(x):
            return _KernelDropout.apply(x, mask_seed(self.generator), *kept_above(self.p))
        return x * keep_scale(x, self.p, self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_masks(model: nn.Module, *, torch_masks: bool = False, generator: torch.Generator | None = None) -> None:
    """Choose where every Dropout of `model` draws its masks: torch_masks gives nn.Dropout's from the global
    generator (slower on CPU; a run that must repeat another nn.Dropout model's masks needs them), else
    keep_scale's, from `generator` when given (so that the masks draw nothing from the global generator,
    as on a GPU, whose dropout has a generator of its own), else from the global one."""
    if torch_masks and generator is not None:
        raise ValueError("torch's masks come from the global generator; a generator of their own needs keep_scale's")
    for module in model.modules():
        if isinstance(module, Dropout):
            module.torch_masks, module.generator = torch_masks, generator
