"""Fused decoding steps on CPU: a whole GPTModel token step, for a batch of rows, in one C++ call (gpt/csrc/decode.cpp)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gpt.attention import KVCache
from gpt.model import GPTModel
from gpt.native import load_kernel

# A step: (token ids (batch, 1), cache) -> logits (batch, 1, vocab); advances the cache by one token.
Step = Callable[[torch.Tensor, KVCache], torch.Tensor]


def use_fast_decode(model: GPTModel, enabled: bool = True) -> bool:
    """Let gpt.generate.generate take `model`'s one-token steps on CPU in the fused kernel (or stop it);
    return whether it is on.

    A decoding step reads every weight once, so at batch 1 its limit is memory bandwidth; PyTorch's
    eager step falls well short of it (one-row matmuls on one thread, 330 dispatched ops per gpt2-small
    step), and at batch 8 its few-row matmuls stream the weights well below the bandwidth. The kernel is built on first use; if that fails (no C++ compiler), warn once and keep
    PyTorch's path. Logits match the model's to float rounding (sums run in another order), so greedy
    decoding can differ only on near-ties.
    """
    model.fast_decode = enabled and load_kernel("decode") is not None
    return model.fast_decode


def _weights(model: GPTModel) -> list[torch.Tensor] | None:
    """The model's tensors in the kernel's order, or None when its layout is not the plain GPT the
    kernel computes (adapters such as LoRA wrap a layer; other devices or dtypes)."""
    empty = torch.empty(0, dtype=torch.float32)  # an absent bias
    tensors = [model.tok_emb.weight, model.pos_emb.weight]
    layers: list[nn.Module] = []
    for block in model.blocks:
        layers += [block.norm1, block.attn.qkv, block.attn.out_proj, block.norm2, block.ff.fc, block.ff.proj]
    layers += [model.final_norm, model.out_head]
    for layer in layers:
        if type(layer) not in (nn.Linear, nn.LayerNorm):
            return None
        if isinstance(layer, nn.LayerNorm) and (layer.eps != model.final_norm.eps or layer.bias is None
                                                or layer.weight is None):
            return None
        tensors += [layer.weight, layer.bias if layer.bias is not None else empty]
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return None
    return [t.detach() for t in tensors]


def fused_step(model: GPTModel) -> Step | None:
    """A fused one-token step for `model` when use_fast_decode turned it on and it applies (CPU,
    fp32, a plain GPT layout; any batch, left-padded rows included); otherwise None: call the model."""
    if not (getattr(model, "fast_decode", False) and not model.training):
        return None
    tensors = _weights(model)
    if tensors is None:
        return None
    cfg = model.cfg
    # A padded vocabulary's extra rows are never predicted (GPTModel.forward drops their logits).
    head_rows = cfg.vocab_size if model.out_head.out_features == cfg.padded_vocab_size else model.out_head.out_features
    decoder = load_kernel("decode").Decoder(tensors, cfg.n_heads, head_rows, model.final_norm.eps)

    no_pad = torch.empty(0, dtype=torch.int64)

    def step(ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        pad = no_pad if cache.pad is None else cache.pad
        logits = decoder.step(ids.reshape(-1), cache.length, pad, cache.keys, cache.values)
        cache.length += 1
        return logits
    return step
