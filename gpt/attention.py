"""Causal multi-head self-attention, with an explicit path, an SDPA path and a KV cache."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt.cpu_kernels import causal_softmax_dropout
from gpt.dropout import Dropout
from gpt.native import applies


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to `max_length` tokens."""

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_length: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 pad: torch.Tensor | None = None):
        shape = (batch_size, n_heads, max_length, head_dim)
        # Uninitialised: only the first `length` positions, already written, are ever read.
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_length = max_length
        self.length = 0  # tokens already stored; advanced by the model after all layers ran
        # Left padding (batch,), for prompts of different lengths decoded together: row b's first pad[b]
        # slots hold no token of it, no query of it attends to them, and its positions start after them.
        self.pad = None if pad is None else pad.to(device)
        self._visible: tuple[int, int, torch.Tensor] | None = None  # (length, queries, mask): one per step, not per layer

    def visible(self, n_queries: int) -> torch.Tensor | None:
        """For padded rows, which cached slots each of the next `n_queries` queries may attend to
        (batch, 1, queries, keys), causal and past the row's padding; None without padding."""
        if self.pad is None:
            return None
        if self._visible is not None and self._visible[:2] == (self.length, n_queries):
            return self._visible[2]  # every layer of this step asks for the same mask
        end = self.length + n_queries
        slot = torch.arange(end, device=self.pad.device)
        query = slot[self.length :, None]
        # A padding slot's own query sees itself, so its (unused) softmax has one term, not a 0/0 nan.
        allowed = (slot <= query) & ((slot >= self.pad[:, None, None]) | (slot == query))
        self._visible = (self.length, n_queries, allowed.unsqueeze(1))
        return self._visible[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values for `layer`; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} tokens > its length {self.max_length}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class MultiHeadAttention(nn.Module):
    """Causal self-attention over `num_heads` heads with one fused q/k/v projection."""

    cpu_kernels: bool = False  # set by gpt.cpu_kernels.use_cpu_kernels: causal softmax + dropout in one C++ pass

    def __init__(self, d_in: int, d_out: int, context_length: int, num_heads: int,
                 dropout: float = 0.0, qkv_bias: bool = False, use_sdpa: bool = True):
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.d_out = d_out
        self.dropout = dropout
        self.use_sdpa = use_sdpa
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.attn_dropout = Dropout(dropout)
        self.register_buffer(
            "mask", torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1),
            persistent=False,
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        batch, n_tokens, _ = x.shape
        q, k, v = self.qkv(x).split(self.d_out, dim=2)
        # (batch, tokens, d_out) -> (batch, heads, tokens, head_dim)
        q, k, v = (t.view(batch, n_tokens, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        past, visible = 0, None
        if cache is not None:
            past, visible = cache.length, cache.visible(n_tokens)
            k, v = cache.append(layer, k, v)
        # SDPA's CPU kernels drop attention weights only on its unfused path, with torch's costly
        # per-element Bernoulli draws; the explicit path with gpt.dropout's cheaper masks is faster there
        # (docs/benchmarks.md). Masks from a generator of their own (gpt.dropout.use_masks) are drawn on
        # that path on any device.
        own_masks = x.device.type == "cpu" or self.attn_dropout.generator is not None
        if self.use_sdpa and not (self.training and self.dropout > 0 and own_masks):
            context = self._sdpa(q, k, v, past, visible)
        else:
            context = self._explicit(q, k, v, past, visible)
        context = context.transpose(1, 2).reshape(batch, n_tokens, self.d_out)
        return self.out_proj(context)

    def _causal_mask(self, past: int, n_queries: int) -> torch.Tensor:
        # Query i sits at absolute position past + i and may see keys 0..past + i.
        return self.mask[past : past + n_queries, : past + n_queries]

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int,
                  visible: torch.Tensor | None = None) -> torch.Tensor:
        batch, heads, n_queries, n_keys = *q.shape[:3], k.shape[2]
        queries = q.reshape(-1, n_queries, self.head_dim)
        keys_t = k.reshape(-1, n_keys, self.head_dim).transpose(1, 2)
        drop = self.attn_dropout
        if self.cpu_kernels and applies(q) and drop.training and drop.p > 0 and not drop.torch_masks \
                and past == 0 and visible is None:
            # Training: the kernel scales, masks and drops in one pass, and skips the hidden keys' exps.
            weights = causal_softmax_dropout(torch.bmm(queries, keys_t), 1 / math.sqrt(self.head_dim), drop)
            return weights.view(batch, heads, n_queries, n_keys) @ v
        hidden = self._causal_mask(past, n_queries) if visible is None else ~visible
        # One batched matmul makes the scaled, masked scores, the mask entering as its -inf/0 addend: one
        # pass over the scores instead of three (a division and a masked_fill were two more).
        mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))
        # A mask of one row per query (the causal one) broadcasts over the batch: expanded and reshaped it would
        # first be copied whole.
        addend = mask if mask.dim() == 2 else \
            mask.expand(batch, heads, n_queries, n_keys).reshape(-1, n_queries, n_keys)
        scores = torch.baddbmm(addend, queries, keys_t, alpha=1 / math.sqrt(self.head_dim))
        weights = drop(torch.softmax(scores.view(batch, heads, n_queries, n_keys), dim=-1))
        return weights @ v

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int,
              visible: torch.Tensor | None = None) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        if visible is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout)
        if past == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        if q.shape[2] == 1:  # one new token sees every cached key: no mask needed
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        # is_causal aligns the mask top-left, which is wrong when queries start at `past`.
        allowed = ~self._causal_mask(past, q.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
