"""The LM head and cross-entropy fused, chunk by chunk, so the tokens x vocab logits never exist whole."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt.cpu_kernels import exp_rows_
from gpt.native import applies

CHUNK_ROWS = 1024  # tokens per chunk: 1024 x 50,257 fp32 logits are 206 MB; fewer chunks re-read the
                   # weight gradient less often (chunk sizes compared: docs/benchmarks.md)
VOCAB_BLOCK = 2048  # logits are made this many vocabulary columns at a time, each block a contiguous
                    # (rows x 2048) product: MKL writes such blocks faster than one whole-vocabulary
                    # product, and an 8 MB block is still in cache for its exp (docs/benchmarks.md)
IGNORE_INDEX = -100  # F.cross_entropy's default: targets equal to it count for nothing


def _chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int, vocab_block: int,
             want_hidden: bool, want_weight: bool,
             fused_exp: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(the cross-entropy of each row of hidden @ weight.T against its target, 0 where the target is
    IGNORE_INDEX; the gradient of their mean over the counted targets for hidden if wanted, for weight
    if wanted), one chunk of rows at a time, each chunk's logits one block of vocabulary columns at a
    time. The gradients are made while the chunk's logits are at hand (softmax minus one-hot, over the
    number of counted targets). fused_exp: each block's maxima, exp and sums in one C++ pass (gpt.cpu_kernels)."""
    counted = targets != IGNORE_INDEX
    n = counted.sum()  # 0 gives nan, as F.cross_entropy does
    # Not zero-filled: the first chunk and the first block write their parts with out= (a fill of the
    # weight's size each step saved).
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.empty_like(weight) if want_weight else None
    # Softmax and sums in at least fp32, whatever the matmuls ran in.
    exact = torch.promote_types(hidden.dtype, torch.float32)
    losses = torch.empty(hidden.shape[0], dtype=exact, device=hidden.device)
    block_starts = range(0, weight.shape[0], vocab_block)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = hidden[start : start + chunk_rows]
        target = targets[start : start + chunk_rows].clamp_min(0)
        # Each block becomes exp(logits - its row maxima) in place, while it is in cache; the rows' sums
        # of those and the targets' logits are kept.
        blocks, block_tops, block_sums = [], [], []
        target_logits = torch.zeros(rows.shape[0], dtype=exact, device=hidden.device)
        for block_start in block_starts:
            block = (rows @ weight[block_start : block_start + vocab_block].t()).to(exact)
            column = target - block_start
            inside = (column >= 0) & (column < block.shape[1])
            target_logits += block.gather(1, column.clamp(0, block.shape[1] - 1).unsqueeze(1)).squeeze(1) * inside
            if fused_exp and applies(block):
                top, block_sum = exp_rows_(block)
            else:
                top = block.amax(dim=1, keepdim=True)
                block_sum = block.sub_(top).exp_().sum(dim=1, keepdim=True)
            blocks.append(block)
            block_tops.append(top)
            block_sums.append(block_sum)
        top = torch.cat(block_tops, dim=1).amax(dim=1, keepdim=True)
        rescales = [torch.exp(block_top - top) for block_top in block_tops]  # a block's exps onto the row maximum
        total = sum(block_sum * rescale for block_sum, rescale in zip(block_sums, rescales))
        # log-sum-exp minus the target's logit, as F.cross_entropy: exact for targets of any probability.
        scale = counted[start : start + chunk_rows].to(exact)  # 1 counted, 0 ignored
        losses[start : start + chunk_rows] = ((top + total.log()).squeeze(1) - target_logits) * scale
        if not (want_hidden or want_weight):
            continue
        # d(loss)/d(logits) = (softmax - one-hot) / n per counted row. The softmax's per-row factors (and 1/n
        # and the mask) scale each block in one pass; the one-hot part is subtracted on the small sides.
        scale = (scale / n).unsqueeze(1)
        for block_start, block, rescale in zip(block_starts, blocks, rescales):
            probs = block.mul_(rescale * scale / total).to(hidden.dtype)
            block_weight = weight[block_start : block_start + vocab_block]
            if grad_hidden is not None:
                _add_product(grad_hidden[start : start + chunk_rows], probs, block_weight, block_start == 0)
            if grad_weight is not None:
                _add_product(grad_weight[block_start : block_start + vocab_block], probs.t(), rows, start == 0)
        scale = scale.to(hidden.dtype)
        if grad_hidden is not None:
            grad_hidden[start : start + chunk_rows] -= weight[target] * scale
        if grad_weight is not None:
            grad_weight.index_add_(0, target, rows * -scale)
    return losses, grad_hidden, grad_weight


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """out = a @ b when first, else out += a @ b."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def _check_sizes(chunk_rows: int, vocab_block: int) -> None:
    for name, value in (("chunk_rows", chunk_rows), ("vocab_block", vocab_block)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _mean(losses: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return losses.sum() / (targets != IGNORE_INDEX).sum()


class TiedGradient:
    """For a head tied to the token embedding: the weight's gradient the fused loss makes in its forward pass,
    which the token lookup's backward pass (tied_lookup) then adds its rows into, in place. Autograd would
    otherwise make the lookup's gradient as a zero-filled matrix of the weight's size and add the two: a fill
    and an add of the head's size every step. One per forward pass."""

    def __init__(self):
        self.grad: torch.Tensor | None = None


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, tied: TiedGradient) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.tied, ctx.weight_shape = tied, weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[1]:
            return None, None, None
        (ids,) = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.tied.grad is None:  # the loss made no gradient for the weight: the lookup's own, as autograd's
            return None, grad.new_zeros(ctx.weight_shape).index_add_(0, ids.reshape(-1), rows), None
        # The loss's backward ran first (it is the graph's last node) and handed on ctx.tied.grad, which autograd
        # gives the parameter only once every use of the weight is done, this one included: adding in place here
        # is what it would have added.
        ctx.tied.grad.index_add_(0, ids.reshape(-1), rows)
        ctx.tied.grad = None  # one reference fewer: the parameter can then take the matrix over instead of copying it
        return None, None, None


def tied_lookup(ids: torch.Tensor, weight: torch.Tensor, tied: TiedGradient) -> torch.Tensor:
    """F.embedding(ids, weight) for a weight the fused loss (head_cross_entropy with the same `tied`) also uses as
    its head; the weight's two gradients are summed in one matrix, to float rounding."""
    return _TiedLookup.apply(ids, weight, tied)


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """_chunked as an autograd function: the forward pass makes the gradients its inputs need, and the
    backward pass only scales them, so peak memory is one chunk's logits instead of all of them."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                vocab_block: int, fused_exp: bool, tied: TiedGradient | None) -> torch.Tensor:
        losses, grad_hidden, grad_weight = _chunked(hidden, weight, targets, chunk_rows, vocab_block,
                                                    *ctx.needs_input_grad[:2], fused_exp)
        if tied is not None:
            tied.grad = grad_weight
        # Kept on ctx, not saved for backward: backward hands them on scaled in place, and the parameter
        # can take over the weight's gradient instead of copying a tensor of the head's size.
        ctx.grads = grad_hidden, grad_weight
        return _mean(losses, targets)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("the fused head + loss (gpt.loss) runs its backward once; retain_graph is not supported")
        grads, ctx.grads = ctx.grads, None
        return *(None if grad is None else grad.mul_(grad_loss) for grad in grads), None, None, None, None, None


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk_rows: int = CHUNK_ROWS, vocab_block: int = VOCAB_BLOCK, fused_exp: bool = False,
                       tied: TiedGradient | None = None) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, targets) (mean over the targets that are not IGNORE_INDEX; hidden
    [..., d], weight [vocab, d], targets [...] of class ids) to float rounding, values and gradients,
    without the whole logits tensor. Under torch.no_grad (evaluation) no gradient is made. fused_exp: see
    _chunked; tied: see TiedGradient."""
    # An autograd function sees requires_grad even under no_grad, so evaluation must bypass it.
    if not torch.is_grad_enabled():
        return _mean(token_losses(hidden, weight, targets, chunk_rows, vocab_block, fused_exp), targets)
    _check_sizes(chunk_rows, vocab_block)
    return _ChunkedHeadCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_rows,
                                          vocab_block, fused_exp, tied)


@torch.no_grad()
def token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 chunk_rows: int = CHUNK_ROWS, vocab_block: int = VOCAB_BLOCK,
                 fused_exp: bool = False) -> torch.Tensor:
    """The cross-entropy of each target (shaped like targets; 0 where it is IGNORE_INDEX), as
    F.cross_entropy(..., reduction="none") gives it, chunk by chunk; no gradient. For evaluation, whose
    windows each need their own mean: one call per batch keeps the matmuls large."""
    _check_sizes(chunk_rows, vocab_block)
    flat = _chunked(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_rows, vocab_block,
                    False, False, fused_exp)[0]
    return flat.view(targets.shape)
