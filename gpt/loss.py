"""The LM head and cross-entropy fused, chunk by chunk, so the tokens x vocab logits never exist whole."""
from __future__ import annotations

import torch

CHUNK_ROWS = 1024  # tokens per chunk: 1024 x 50,257 fp32 logits are 206 MB; fewer chunks re-read the
                   # weight gradient less often, and 512-2048 measured alike on CPU (README, Benchmarks)
IGNORE_INDEX = -100  # F.cross_entropy's default: targets equal to it count for nothing


def _chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
             want_hidden: bool, want_weight: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(the cross-entropy of each row of hidden @ weight.T against its target, 0 where the target is
    IGNORE_INDEX; the gradient of their mean over the counted targets for hidden if wanted, for weight
    if wanted), one chunk of rows at a time. The gradients are made while each chunk's logits are at hand
    (softmax minus one-hot, over the number of counted targets)."""
    counted = targets != IGNORE_INDEX
    n = counted.sum()  # 0 gives nan, as F.cross_entropy does
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros_like(weight) if want_weight else None
    # Softmax and sums in at least fp32, whatever the matmuls ran in.
    exact = torch.promote_types(hidden.dtype, torch.float32)
    losses = torch.empty(hidden.shape[0], dtype=exact, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = hidden[start : start + chunk_rows]
        scale = counted[start : start + chunk_rows].unsqueeze(1).to(exact)  # 1 counted, 0 ignored
        target = targets[start : start + chunk_rows].unsqueeze(1).clamp_min(0)
        logits = (rows @ weight.t()).to(exact)
        # softmax is one pass over the chunk with one exp per logit; log_softmax and then exp for the
        # gradient took two of each (~40% more time for this part, README, Benchmarks).
        probs = torch.softmax(logits, dim=1)
        target_probs = probs.gather(1, target)
        row_losses = -target_probs.log()
        # A target probability below the smallest normal float has lost digits (or is 0, whose log is
        # -inf): those rows, almost never seen in practice, take the exact log-softmax instead.
        lost = (target_probs < torch.finfo(exact).tiny).squeeze(1)
        if lost.any():
            row_losses[lost] = -torch.log_softmax(logits[lost], dim=1).gather(1, target[lost])
        losses[start : start + chunk_rows] = (row_losses * scale).squeeze(1)
        if not (want_hidden or want_weight):
            continue
        # d(loss)/d(logits) = (softmax - one-hot) / n per counted row; the 1/n and the mask are applied
        # to the small (rows x d) sides of the matmuls, not to the (rows x vocab) probabilities.
        probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
        probs = probs.to(hidden.dtype)
        scale = (scale / n).to(hidden.dtype)
        if grad_hidden is not None:
            torch.mm(probs, weight, out=grad_hidden[start : start + chunk_rows]).mul_(scale)
        if grad_weight is not None:
            grad_weight.addmm_(probs.t(), rows * scale)
    return losses, grad_hidden, grad_weight


def _mean(losses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return losses.sum() / (targets != IGNORE_INDEX).sum()


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """_chunked as an autograd function: the forward pass makes the gradients its inputs need, and the
    backward pass only scales them, so peak memory is one chunk's logits instead of all of them."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        losses, grad_hidden, grad_weight = _chunked(hidden, weight, targets, chunk_rows, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_hidden, grad_weight)
        return _mean(losses, targets)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss,
                None if grad_weight is None else grad_weight * grad_loss, None, None)


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, targets) (mean over the targets that are not IGNORE_INDEX; hidden
    [..., d], weight [vocab, d], targets [...] of class ids) to float rounding, values and gradients,
    without the whole logits tensor. Under torch.no_grad (evaluation) no gradient is made."""
    # An autograd function sees requires_grad even under no_grad, so evaluation must bypass it.
    if not torch.is_grad_enabled():
        return _mean(token_losses(hidden, weight, targets, chunk_rows), targets)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return _ChunkedHeadCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_rows)


@torch.no_grad()
def token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """The cross-entropy of each target (shaped like targets; 0 where it is IGNORE_INDEX), as
    F.cross_entropy(..., reduction="none") gives it, chunk by chunk; no gradient. For evaluation, whose
    windows each need their own mean: one call per batch keeps the matmuls large."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    flat = _chunked(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_rows, False, False)[0]
    return flat.view(targets.shape)
