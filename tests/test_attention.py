"""Causal multi-head attention: explicit and SDPA paths, causality, KV cache."""
import pytest
import torch

from gpt.attention import KVCache, MultiHeadAttention


def make_pair(qkv_bias: bool):
    torch.manual_seed(0)
    explicit = MultiHeadAttention(16, 16, context_length=12, num_heads=4, qkv_bias=qkv_bias, use_sdpa=False)
    sdpa = MultiHeadAttention(16, 16, context_length=12, num_heads=4, qkv_bias=qkv_bias, use_sdpa=True)
    sdpa.load_state_dict(explicit.state_dict())
    return explicit.eval(), sdpa.eval()


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_explicit_and_sdpa_paths_agree(qkv_bias):
    explicit, sdpa = make_pair(qkv_bias)
    x = torch.randn(3, 10, 16)
    torch.testing.assert_close(explicit(x), sdpa(x), atol=1e-6, rtol=1e-5)
    assert (explicit.qkv.bias is not None) == qkv_bias


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_future_tokens_do_not_leak(use_sdpa):
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 8, context_length=6, num_heads=2, use_sdpa=use_sdpa).eval()
    x = torch.randn(1, 6, 8)
    changed = x.clone()
    changed[:, 4:] = torch.randn(1, 2, 8)
    torch.testing.assert_close(attn(x)[:, :4], attn(changed)[:, :4])
    assert not torch.allclose(attn(x)[:, 4:], attn(changed)[:, 4:])


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_cached_chunks_equal_full_pass(use_sdpa):
    explicit, sdpa = make_pair(qkv_bias=True)
    attn = sdpa if use_sdpa else explicit
    x = torch.randn(2, 9, 16)
    cache = KVCache(n_layers=1, batch_size=2, n_heads=4, max_length=12, head_dim=4)
    parts = []
    for chunk in (x[:, :4], x[:, 4:5], x[:, 5:9]):  # prefill, one token, several tokens
        parts.append(attn(chunk, cache, layer=0))
        cache.length += chunk.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), attn(x), atol=1e-6, rtol=1e-5)


def test_cache_overflow_is_an_error():
    cache = KVCache(n_layers=1, batch_size=1, n_heads=1, max_length=3, head_dim=2)
    with pytest.raises(ValueError, match="overflow"):
        cache.append(0, torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 8, context_length=6, num_heads=2, dropout=0.5, use_sdpa=False)
    x = torch.randn(1, 6, 8)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn(x))


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, 10, context_length=4, num_heads=3)
