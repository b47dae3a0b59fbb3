"""The LM head and cross-entropy fused, chunk by chunk, so the tokens x vocab logits never exist whole."""
from __future__ import annotations

import torch

CHUNK_ROWS = 1024  # tokens per chunk: 1024 x 50,257 fp32 logits are 206 MB; fewer chunks re-read the
                   # weight gradient less often, and 512-2048 measured alike on CPU (README, Benchmarks)
IGNORE_INDEX = -100  # F.cross_entropy's default: targets equal to it count for nothing


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (hidden @ weight.T) against targets, over the targets that are not IGNORE_INDEX.
    The gradients are computed in the forward pass, chunk by chunk, while each chunk's logits are at hand
    (softmax minus one-hot, over the number of counted targets), and the backward pass only scales them:
    peak memory is one chunk's logits instead of all of them."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        counted = targets != IGNORE_INDEX
        n = counted.sum()  # 0 gives nan, as F.cross_entropy does
        want_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        # Softmax and sums in at least fp32, whatever the matmuls ran in.
        exact = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=exact, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[start : start + chunk_rows]
            scale = counted[start : start + chunk_rows].unsqueeze(1).to(exact)  # 1 counted, 0 ignored
            target = targets[start : start + chunk_rows].unsqueeze(1).clamp_min(0)
            log_probs = torch.log_softmax((rows @ weight.t()).to(exact), dim=1)
            total -= (log_probs.gather(1, target) * scale).sum()
            if not want_grads:
                continue
            # d(loss)/d(logits) = (softmax - one-hot) / n per counted row; the 1/n and the mask are applied
            # to the small (rows x d) sides of the matmuls, not to the (rows x vocab) probabilities.
            probs = log_probs.exp_()  # in place: one pass over the chunk
            probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
            probs = probs.to(hidden.dtype)
            scale = (scale / n).to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(probs, weight, out=grad_hidden[start : start + chunk_rows]).mul_(scale)
            if grad_weight is not None:
                grad_weight.addmm_(probs.t(), rows * scale)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss,
                None if grad_weight is None else grad_weight * grad_loss, None, None)


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, targets) (mean over the targets that are not IGNORE_INDEX; hidden
    [..., d], weight [vocab, d], targets [...] of class ids) to float rounding, values and gradients,
    without the whole logits tensor."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return _ChunkedHeadCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                          chunk_rows)
