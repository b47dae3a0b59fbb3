"""Training's elementwise passes on CPU in fused C++ kernels (gpt/csrc/train_ops.cpp), switched on per model."""
from __future__ import annotations

import torch
from torch import nn

from gpt.dropout import Dropout, kept_above, mask_seed
from gpt.native import train_ops

# Between its matmuls a CPU training step spends its time in eager PyTorch's elementwise passes, several
# per result: GELU's forward and backward, the dropout masks' random bits, the attention's causal mask,
# softmax, dropout mask and product and their gradients, the LM head's row maxima, shift, exp and sums.
# The kernels make each in one pass over the data (what that saved: docs/benchmarks.md). They compute on
# float32 CPU tensors (gpt.native.applies); anything else keeps PyTorch's path.


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x)
        return train_ops().gelu_forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return train_ops().gelu_backward(grad.contiguous(), ctx.saved_tensors[0])


def gelu(x: torch.Tensor) -> torch.Tensor:
    """nn.GELU(approximate="tanh")(x) to float rounding, values and gradients."""
    return _Gelu.apply(x)


class _CausalSoftmaxDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, scale: float, seed: int, lowest_kept: int, keep: float) -> torch.Tensor:
        probs, dropped = train_ops().causal_softmax_dropout_forward(scores.contiguous(), scale, seed, lowest_kept,
                                                                     keep)
        ctx.save_for_backward(probs)
        ctx.args = scale, seed, lowest_kept, keep  # the backward pass remakes the mask from its seed
        return dropped

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dscores = train_ops().causal_softmax_dropout_backward(grad.contiguous(), ctx.saved_tensors[0], *ctx.args)
        return dscores, None, None, None, None


def causal_softmax_dropout(scores: torch.Tensor, scale: float, dropout: Dropout) -> torch.Tensor:
    """dropout(softmax(scores * scale + causal mask)) for raw attention scores q.k (..., n, n) of n tokens that
    attend to themselves and the tokens before them, and a training-mode gpt.dropout.Dropout with the kernels on:
    the softmax to float rounding, the mask gpt.dropout's rule applied to bits the kernel makes from one draw of
    the dropout's generator."""
    return _CausalSoftmaxDropout.apply(scores, scale, mask_seed(dropout.generator), *kept_above(dropout.p))


def exp_rows_(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """block (rows x columns) <- exp(block - its row maxima), in place; returns (the row maxima, the row sums
    of those exps), each (rows, 1)."""
    return tuple(train_ops().exp_rows_(block))


def mask_bits(seed: int, count: int) -> torch.Tensor:
    """The int16 random bits of the kernels' dropout mask `seed` for its first `count` elements."""
    return train_ops().mask_bits(seed, count)


def use_cpu_kernels(model: nn.Module, enabled: bool = True) -> bool:
    """Let `model`'s GELUs, dropouts, attention softmax with dropout and fused LM head + loss run in the kernels
    where they apply (training or not), or stop them; return whether they are on. The kernels are built on
    first use; if that fails (no C++ compiler), warn once and keep PyTorch's path."""
    on = enabled and train_ops() is not None
    for module in model.modules():
        if hasattr(module, "cpu_kernels"):
            module.cpu_kernels = on
    return on
