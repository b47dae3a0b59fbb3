"""gpt.loss: the chunked, fused LM head + cross-entropy equals the plain one, in values and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt.loss import IGNORE_INDEX, VOCAB_BLOCK, head_cross_entropy, token_losses
from gpt.model import GPTConfig, GPTModel
from gpt.train import batch_loss, evaluate_loss, window_losses


def plain_and_fused(hidden, weight, targets, chunk_rows, grads=(True, True), vocab_block=VOCAB_BLOCK):
    results = []
    for loss_fn in (lambda h, w: F.cross_entropy((h @ w.t()).flatten(0, 1), targets.flatten()),
                    lambda h, w: head_cross_entropy(h, w, targets, chunk_rows, vocab_block)):
        h, w = hidden.clone().requires_grad_(grads[0]), weight.clone().requires_grad_(grads[1])
        loss = loss_fn(h, w)
        (loss * 3).backward()  # a non-unit upstream gradient: backward must scale by it
        results.append((loss.detach(), h.grad, w.grad))
    return results


# Vocabulary blocks of 10 split the 97 logits of a row into ten blocks, the last of 7.
@pytest.mark.parametrize("chunk_rows,vocab_block", [(1, 10), (7, 10), (64, 97), (10_000, 10), (10_000, VOCAB_BLOCK)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_equal_the_plain_loss(chunk_rows, vocab_block, dtype):
    torch.manual_seed(chunk_rows)
    hidden, weight = torch.randn(3, 21, 16, dtype=dtype), torch.randn(97, 16, dtype=dtype)
    targets = torch.randint(0, 97, (3, 21))
    targets[0, :4] = IGNORE_INDEX  # padding, as instruction batches have
    (loss, grad_h, grad_w), (fused, fused_h, fused_w) = plain_and_fused(hidden, weight, targets, chunk_rows,
                                                                        vocab_block=vocab_block)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(fused, loss, **tol)
    torch.testing.assert_close(fused_h, grad_h, **tol)
    torch.testing.assert_close(fused_w, grad_w, **tol)
    assert fused_h[0, :4].abs().max() == 0  # ignored targets get no gradient


@pytest.mark.parametrize("vocab_block", [2, VOCAB_BLOCK])  # the top logit and the target in other blocks, or one
def test_a_target_far_below_the_top_logit_gets_its_exact_loss(vocab_block):
    # Target probabilities of e^-200 and e^-90 underflow fp32 (below its smallest normal, 1.2e-38): their
    # log cannot come from the softmax, only from the log-sum-exp minus the target's logit.
    hidden = torch.eye(4, 8).unsqueeze(0)
    weight = torch.zeros(5, 8)
    weight[0, :4] = 200.0  # token 0 scores 200 for every row
    weight[1, 2] = 110.0  # row 2 also gives token 1 a score of 110
    targets = torch.tensor([[1, 2, 1, 0]])
    (loss, grad_h, grad_w), (fused, fused_h, fused_w) = plain_and_fused(hidden, weight, targets, 2,
                                                                        vocab_block=vocab_block)
    torch.testing.assert_close(loss, torch.tensor((200 + 200 + 90 + 0) / 4))  # the rest of each softmax is ~e^-90
    torch.testing.assert_close(fused, loss)
    torch.testing.assert_close(fused_h, grad_h)
    torch.testing.assert_close(fused_w, grad_w)


def test_token_losses_are_the_unreduced_cross_entropy():
    torch.manual_seed(2)
    hidden, weight = torch.randn(4, 9, 16), torch.randn(97, 16)
    targets = torch.randint(0, 97, (4, 9))
    targets[1, 3:] = IGNORE_INDEX
    expected = F.cross_entropy((hidden @ weight.t()).transpose(1, 2), targets, reduction="none")  # 0 where ignored
    got = token_losses(hidden, weight, targets, chunk_rows=5, vocab_block=40)
    assert got.shape == targets.shape and not got.requires_grad
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("pad_vocab_to", [64, 1])  # 1: the token lookup adds into the loss's gradient (TiedGradient)
def test_the_model_with_targets_equals_its_logits_loss_tied_and_padded(pad_vocab_to):
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("micro", pad_vocab_to=pad_vocab_to, tie_weights=True, drop_rate=0.0)
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


def test_a_tied_weights_gradient_accumulates_over_backward_passes_and_respects_a_frozen_embedding():
    torch.manual_seed(2)
    model = GPTModel(GPTConfig.from_preset("micro", tie_weights=True, drop_rate=0.0)).double()
    weight = model.tok_emb.weight
    batches = [(torch.randint(0, 50257, (2, 12)), torch.randint(0, 50257, (2, 12))) for _ in range(2)]
    for inputs, targets in batches:  # two accumulated micro-batches, the plain way
        F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
    expected = weight.grad.clone()
    model.zero_grad()
    for inputs, targets in batches:
        model(inputs, targets=targets).backward()
    torch.testing.assert_close(weight.grad, expected, rtol=1e-10, atol=1e-12)
    assert (weight.grad[batches[0][0].flatten()] != 0).all()  # the lookup's rows are in it
    model.zero_grad()
    weight.requires_grad_(False)
    model(*batches[0][:1], targets=batches[0][1]).backward()
    assert weight.grad is None and model.blocks[0].ff.fc.weight.grad is not None


@pytest.mark.parametrize("grads", [(True, False), (False, True)])
def test_one_side_frozen_gets_no_gradient_and_the_other_the_plain_one(grads):
    """A frozen head (LoRA, last blocks) or a frozen trunk: only the trainable side gets a gradient."""
    torch.manual_seed(1)
    hidden, weight = torch.randn(1, 9, 8, dtype=torch.float64), torch.randn(13, 8, dtype=torch.float64)
    targets = torch.randint(0, 13, (1, 9))
    (loss, *plain), (fused, *mine) = plain_and_fused(hidden, weight, targets, 4, grads)
    torch.testing.assert_close(fused, loss)
    for wanted, expected, got in zip(grads, plain, mine):
        assert (got is None) == (not wanted)
        if wanted:
            torch.testing.assert_close(got, expected)


def test_no_gradients_wanted_computes_the_value_only():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight, targets = torch.randn(11, 8, requires_grad=True), torch.randint(0, 11, (5,))
    with torch.no_grad():
        fused = head_cross_entropy(hidden, weight, targets, chunk_rows=2)
    assert fused.grad_fn is None  # evaluation builds no graph (and makes no gradient)
    torch.testing.assert_close(fused, F.cross_entropy(hidden @ weight.t(), targets).detach())
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        head_cross_entropy(hidden, weight, targets, chunk_rows=0)
    with pytest.raises(ValueError, match="vocab_block must be >= 1"):
        token_losses(hidden, weight, targets, vocab_block=0)


def test_a_second_backward_is_refused():
    """The backward pass hands over the gradients it made (scaled in place), so it cannot run twice."""
    hidden = torch.randn(5, 8, requires_grad=True)
    weight, targets = torch.randn(11, 8, requires_grad=True), torch.randint(0, 11, (5,))
    loss = head_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs its backward once"):
        loss.backward()


def test_evaluation_losses_equal_the_logits_loss_of_each_window():
    """gpt.train.window_losses / evaluate_loss (through gpt.loss, no whole logits) against each window's
    plain cross-entropy; evaluate_loss is their mean, also when two ranks split the batches' rows."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("micro", context_length=16, pad_vocab_to=64, drop_rate=0.0)
    model = GPTModel(cfg).double()
    tokens = torch.randint(0, cfg.vocab_size, (16 * 7 + 1,)).numpy()
    windows = torch.as_tensor(tokens[:-1].reshape(7, 16)), torch.as_tensor(tokens[1:].reshape(7, 16))
    with torch.no_grad():
        expected = [F.cross_entropy(model(x[None])[0], y).item() for x, y in zip(*windows)]
    losses = window_losses(model, tokens, batch_size=3)
    assert losses == pytest.approx(expected, rel=1e-12)
    assert evaluate_loss(model, tokens, batch_size=3) == pytest.approx(sum(expected) / 7, rel=1e-12)
    assert window_losses(model, tokens, batch_size=3, max_batches=2) == pytest.approx(expected[:6], rel=1e-12)
    shards = [window_losses(model, tokens, 3, rank=rank, world_size=2) for rank in (0, 1)]
    assert sorted(shards[0] + shards[1]) == pytest.approx(sorted(expected), rel=1e-12)
    assert len(shards[0]) == 5 and len(shards[1]) == 2  # rows 0 and 2 of each batch of 3 (the last has one)
