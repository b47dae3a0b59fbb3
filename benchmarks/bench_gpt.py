"""Benchmark the gpt package on this machine: training and generation tokens/s for a preset.

    python benchmarks/bench_gpt.py --preset gpt2-small --batch-size 2 --context 256
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from gpt.generate import generate
from gpt.model import GPTConfig, GPTModel, count_parameters


def train_tokens_per_s(model: GPTModel, batch_size: int, context: int, steps: int, warmup: int) -> float:
    """Tokens/s of forward + backward + AdamW step on random tokens."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    model.train()
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.cfg.vocab_size, (batch_size, context + 1), generator=gen)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch_size * context / (time.perf_counter() - start)


def generate_tokens_per_s(model: GPTModel, new_tokens: int, use_cache: bool, prompt_len: int = 8) -> float:
    """Batch-1 greedy decoding tokens/s (prefill included, as a user would see it)."""
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    generate(model, prompt, 5, use_cache=use_cache)  # warm-up
    start = time.perf_counter()
    generate(model, prompt, new_tokens, use_cache=use_cache)
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=200)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset(args.preset, drop_rate=0.0))
    train = train_tokens_per_s(model, args.batch_size, args.context, args.steps, args.warmup)
    cached = generate_tokens_per_s(model, args.new_tokens, use_cache=True)
    uncached = generate_tokens_per_s(model, args.new_tokens, use_cache=False)

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"preset: {args.preset} ({count_parameters(model) / 1e6:.1f}M parameters), fp32, random weights")
    print("| measurement | setting | tokens/s |")
    print("|---|---|---:|")
    print(f"| training (fwd+bwd+AdamW) | batch {args.batch_size} x context {args.context} | {train:,.0f} |")
    print(f"| generation, KV cache | batch 1, {args.new_tokens} new tokens | {cached:,.1f} |")
    print(f"| generation, no cache | batch 1, {args.new_tokens} new tokens | {uncached:,.1f} |")
    print(f"KV cache speed-up: {cached / uncached:.1f}x")


if __name__ == "__main__":
    main()
