"""gpt.loss: the chunked, fused LM head + cross-entropy equals the plain one, in values and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt.loss import IGNORE_INDEX, head_cross_entropy
from gpt.model import GPTConfig, GPTModel
from gpt.train import batch_loss


def plain_and_fused(hidden, weight, targets, chunk_rows):
    results = []
    for loss_fn in (lambda h, w: F.cross_entropy((h @ w.t()).flatten(0, 1), targets.flatten()),
                    lambda h, w: head_cross_entropy(h, w, targets, chunk_rows)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = loss_fn(h, w)
        (loss * 3).backward()  # a non-unit upstream gradient: backward must scale by it
        results.append((loss.detach(), h.grad, w.grad))
    return results


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_equal_the_plain_loss(chunk_rows, dtype):
    torch.manual_seed(chunk_rows)
    hidden, weight = torch.randn(3, 21, 16, dtype=dtype), torch.randn(97, 16, dtype=dtype)
    targets = torch.randint(0, 97, (3, 21))
    targets[0, :4] = IGNORE_INDEX  # padding, as instruction batches have
    (loss, grad_h, grad_w), (fused, fused_h, fused_w) = plain_and_fused(hidden, weight, targets, chunk_rows)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(fused, loss, **tol)
    torch.testing.assert_close(fused_h, grad_h, **tol)
    torch.testing.assert_close(fused_w, grad_w, **tol)
    assert fused_h[0, :4].abs().max() == 0  # ignored targets get no gradient


def test_the_model_with_targets_equals_its_logits_loss_tied_and_padded():
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("micro", pad_vocab_to=64, tie_weights=True, drop_rate=0.0)
    model = GPTModel(cfg).double()
    inputs, targets = torch.randint(0, cfg.vocab_size, (2, 12)), torch.randint(0, cfg.vocab_size, (2, 12))
    plain = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    plain.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    fused = batch_loss(model, inputs, targets)
    fused.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_no_gradients_wanted_computes_the_value_only():
    hidden, weight, targets = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    with torch.no_grad():
        fused = head_cross_entropy(hidden, weight, targets, chunk_rows=2)
    torch.testing.assert_close(fused, F.cross_entropy(hidden @ weight.t(), targets))
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        head_cross_entropy(hidden, weight, targets, chunk_rows=0)
