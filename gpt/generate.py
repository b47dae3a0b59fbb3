"""Autoregressive text generation: greedy, temperature, top-k, top-p, with or without a KV cache."""
from __future__ import annotations

import torch

from gpt.fast_decode import fused_step
from gpt.model import GPTModel


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from last-position logits (batch, vocab); temperature 0 is greedy."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p (the top one always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs > top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def generate(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend token ids `idx` (batch, tokens) by up to `max_new_tokens`.

    The model sees at most its context length: longer inputs are cropped to the last
    `context_length` tokens. Generation stops once every row has produced `eos_id`; a finished
    row keeps `eos_id` as padding. With the cache, each step feeds one token; once the sequence
    no longer fits the context, every step re-reads the cropped window, exactly as without cache.
    A model given gpt.fast_decode.use_fast_decode takes its one-token steps in the fused kernel.
    """
    was_training = model.training
    model.eval()
    context = model.cfg.context_length
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cache = None
    step = fused_step(model, idx.shape[0]) if use_cache else None
    try:
        # Cheaper per op than no_grad (no version counters, no view tracking): a few % of a
        # one-token step, whose eager overhead is what keeps decoding under the bandwidth bound.
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                if use_cache and idx.shape[1] <= context:
                    if cache is None:
                        cache = model.new_cache(idx.shape[0])
                        logits = model(idx, cache)
                    else:
                        logits = (step or model)(idx[:, -1:], cache)
                else:
                    cache = None
                    logits = model(idx[:, -context:])
                next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
                if eos_id is not None:
                    next_id = next_id.masked_fill(finished.unsqueeze(1), eos_id)
                    finished |= next_id.squeeze(1) == eos_id
                idx = torch.cat([idx, next_id], dim=1)
                if eos_id is not None and bool(finished.all()):
                    break
    finally:
        model.train(was_training)
    return idx.clone()  # made outside inference mode: a normal tensor, usable in autograd later


def generate_text(model: GPTModel, tokenizer, prompt: str, max_new_tokens: int = 50, **kwargs) -> str:
    """Generate from a text prompt and return the new text, cut at the first end-of-text."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt, allowed_special={"<|endoftext|>"})
    if not ids:
        raise ValueError("prompt is empty")
    out = generate(model, torch.tensor([ids], device=device), max_new_tokens,
                   eos_id=kwargs.pop("eos_id", tokenizer.eot_token), **kwargs)
    new = out[0, len(ids):].tolist()
    if tokenizer.eot_token in new:
        new = new[: new.index(tokenizer.eot_token)]
    return tokenizer.decode(new)
