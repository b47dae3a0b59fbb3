"""Autoregressive text generation: greedy, temperature, top-k, top-p, with or without a KV cache."""
from __future__ import annotations

from typing import Sequence

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
    pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Extend token ids `idx` (batch, tokens) by up to `max_new_tokens`.

    The model sees at most its context length: longer inputs are cropped to the last
    `context_length` tokens. Generation stops once every row has produced `eos_id`; a finished
    row keeps `eos_id` as padding. With the cache, each step feeds one token; once the sequence
    no longer fits the context, every step re-reads the cropped window, exactly as without cache.
    A model given gpt.fast_decode.use_fast_decode takes its one-token steps in the fused kernel.
    `pad` (batch,): row b's first pad[b] ids are left padding, not part of its prompt (generate_batch
    makes them); padded rows are decoded with the cache and must fit the context with the new tokens.
    """
    context = model.cfg.context_length
    if pad is not None and (not use_cache or idx.shape[1] + max_new_tokens > context):
        raise ValueError(f"padded rows need the KV cache and {idx.shape[1]} + {max_new_tokens} tokens "
                         f"within the context length {context}")
    was_training = model.training
    model.eval()
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cache = None
    step = fused_step(model) if use_cache else None
    try:
        # Cheaper per op than no_grad (no version counters, no view tracking), which counts in a
        # one-token step, whose eager overhead is what keeps decoding under the bandwidth bound.
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                if use_cache and idx.shape[1] <= context:
                    if cache is None:
                        # Only as long as this call can fill: batch x context slots would be GBs for gpt2-small.
                        cache = model.new_cache(idx.shape[0], min(context, idx.shape[1] + max_new_tokens), pad)
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


BATCH_SIZE = 16  # prompts decoded together by default (tokens/s by batch size: docs/benchmarks.md)


def generate_batch(model: GPTModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   batch_size: int = BATCH_SIZE, eos_id: int | None = None, **sampling) -> list[list[int]]:
    """The new ids for each prompt (up to and including its first `eos_id`), decoding up to `batch_size`
    prompts of different lengths together with one KV cache: each is left-padded to the longest of its
    batch, with positions that start after its padding and attention that never sees it, so greedy
    decoding gives the same tokens as one prompt at a time (to float rounding). Prompts are batched in
    order of length, so a batch pads little. Prompts that would outgrow the context are decoded one at
    a time, cropped as generate does."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    context = model.cfg.context_length
    results: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        longest = len(prompts[rows[-1]])
        if len(rows) == 1 or longest + max_new_tokens > context:
            batches = [([prompts[i]], [i], None) for i in rows]
        else:
            pad = torch.tensor([longest - len(prompts[i]) for i in rows])
            batches = [([[0] * int(n) + list(prompts[i]) for n, i in zip(pad, rows)], rows, pad)]
        for ids, indices, pad in batches:
            width = len(ids[0])
            out = generate(model, torch.tensor(ids, device=device), max_new_tokens, eos_id=eos_id, pad=pad, **sampling)
            for i, row in zip(indices, out[:, width:].tolist()):
                results[i] = row[: row.index(eos_id) + 1] if eos_id in row else row
    return results


def generate_texts(model: GPTModel, tokenizer, prompts: Sequence[str], max_new_tokens: int = 50,
                   **kwargs) -> list[str]:
    """The new text for each prompt, cut at the first end-of-text, decoded in batches (generate_batch)."""
    ids = [tokenizer.encode(prompt, allowed_special={"<|endoftext|>"}) for prompt in prompts]
    empty = [i for i, prompt_ids in enumerate(ids) if not prompt_ids]
    if empty:
        raise ValueError("prompt is empty" if len(ids) == 1 else f"prompt {empty[0] + 1} is empty")
    eot = kwargs.pop("eos_id", tokenizer.eot_token)
    new = generate_batch(model, ids, max_new_tokens, eos_id=eot, **kwargs)
    return [tokenizer.decode(row[:-1] if row[-1:] == [eot] else row) for row in new]


def generate_text(model: GPTModel, tokenizer, prompt: str, max_new_tokens: int = 50, **kwargs) -> str:
    """Generate from a text prompt and return the new text, cut at the first end-of-text."""
    return generate_texts(model, tokenizer, [prompt], max_new_tokens, **kwargs)[0]
