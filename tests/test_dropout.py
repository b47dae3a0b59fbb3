"""gpt.dropout: torch's dropout semantics with a cheaper mask, and attention that uses it on CPU."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gpt.attention import MultiHeadAttention
from gpt.dropout import LEVELS, Dropout, keep_scale, use_masks


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_each_of_the_four_lanes_drops_with_probability_p_and_the_mean_is_kept(p):
    torch.manual_seed(0)
    n = 400_000
    scale = keep_scale(torch.empty(n), p)
    dropped = round(p * LEVELS) / LEVELS
    assert scale.unique().tolist() == [0.0, pytest.approx(1 / (1 - dropped))]
    sigma = math.sqrt(p * (1 - p) / (n // 4))
    for lane in range(4):  # elements 0,4,8.. come from the lowest 16 bits of each draw, and so on
        rate = (scale[lane::4] == 0).float().mean().item()
        assert abs(rate - p) < 5 * sigma, (lane, rate)
    assert abs(scale.mean().item() - 1) < 5 * sigma / (1 - p)


def test_masks_repeat_under_a_seed_and_differ_between_seeds():
    x = torch.ones(3, 50)
    masks = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        masks.append(Dropout(0.3).train()(x))
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


def test_eval_and_zero_probability_are_the_identity_and_the_gradient_is_the_mask():
    x = torch.randn(4, 33, requires_grad=True)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    torch.manual_seed(1)
    y = Dropout(0.5).train()(x)
    y.sum().backward()
    torch.manual_seed(1)
    scale = keep_scale(x, 0.5)
    torch.testing.assert_close(y, x * scale)
    torch.testing.assert_close(x.grad, scale)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)


def test_attention_in_training_drops_attention_weights_with_the_same_mask():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 16, context_length=8, num_heads=2, dropout=0.4).train()
    x = torch.randn(3, 8, 16)
    torch.manual_seed(5)
    out = attn(x)
    # The same computation by hand: causal softmax of q k^T / sqrt(d), dropped with the mask the
    # seed gives, times v, heads joined, projected.
    q, k, v = (t.view(3, 8, 2, 8).transpose(1, 2) for t in attn.qkv(x).split(16, dim=2))
    scores = (q @ k.transpose(2, 3) / math.sqrt(8)).masked_fill(attn.mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    torch.manual_seed(5)
    weights = weights * keep_scale(weights, 0.4)
    expected = attn.out_proj((weights @ v).transpose(1, 2).reshape(3, 8, 16))
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, attn.eval()(x))  # dropout did act


def test_torch_masks_are_nn_dropouts_draw_for_draw():
    """use_masks(torch_masks=True): the masks of nn.Dropout from the same generator state (a model that must repeat
    another's random stream, as the book preset does), and back to keep_scale's when turned off."""
    model = nn.Sequential(Dropout(0.1), nn.Linear(8, 8), Dropout(0.3))
    reference = nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 8), nn.Dropout(0.3))
    reference[1].load_state_dict(model[1].state_dict())
    x = torch.randn(4, 16, 8)
    use_masks(model, torch_masks=True)
    torch.manual_seed(3)
    ours = model(x)
    torch.manual_seed(3)
    assert torch.equal(ours, reference(x))
    use_masks(model)
    torch.manual_seed(3)
    assert not torch.equal(model(x), ours)


def test_masks_from_a_generator_of_their_own_leave_the_global_one_alone():
    """use_masks(generator=g): keep_scale's masks drawn from g, the global generator untouched (as a GPU's
    dropout leaves the CPU generator); torch's masks cannot come from g."""
    model = nn.Sequential(Dropout(0.1), nn.Linear(8, 8), Dropout(0.3))
    x = torch.randn(4, 16, 8)
    use_masks(model, generator=torch.Generator().manual_seed(11))
    torch.manual_seed(3)
    out = model(x)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(3).get_state())
    g = torch.Generator().manual_seed(11)
    hidden = model[1](x * keep_scale(x, 0.1, g))
    assert torch.equal(out, hidden * keep_scale(hidden, 0.3, g))
    with pytest.raises(ValueError, match="global generator"):
        use_masks(model, torch_masks=True, generator=g)
