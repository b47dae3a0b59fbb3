"""Benchmark the fused LM head + loss (gpt.loss) against the plain logits path; print a markdown table.

    python benchmarks/bench_loss.py          # chunk sizes, then peak memory of a mini training step

Rows: seconds of the head and loss alone (forward + backward, 2,048 tokens x 384 x 50,257, best of 4)
per chunk size and for the plain path; then, each in a fresh process, the peak RSS and the best step
time of the mini model's training step (batch 8 x 256, fp32, dropout 0.1, AdamW) with either loss.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/bench_loss.py` from anywhere
    sys.path.insert(0, str(REPO))

from gpt.loss import head_cross_entropy  # noqa: E402
from gpt.model import GPTConfig, GPTModel  # noqa: E402
from gpt.runtime import tune_malloc  # noqa: E402
from gpt.train import TrainConfig, make_optimizer  # noqa: E402

TOKENS, WIDTH, VOCAB = 2048, 384, 50257
CHUNKS = (128, 256, 512, 1024, 2048)


def best_seconds(loss_fn, hidden: torch.Tensor, weight: torch.Tensor, repeats: int = 4) -> float:
    best = float("inf")
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        loss_fn().backward()
        best = min(best, time.perf_counter() - start)
    return best


def head_rows() -> list[str]:
    torch.manual_seed(0)
    hidden = torch.randn(TOKENS, WIDTH, requires_grad=True)
    weight = (torch.randn(VOCAB, WIDTH) * 0.02).requires_grad_()
    targets = torch.randint(0, VOCAB, (TOKENS,))
    rows = [f"| head + loss, plain logits | {best_seconds(lambda: F.cross_entropy(hidden @ weight.t(), targets), hidden, weight):.3f} s |"]
    for chunk in CHUNKS:
        seconds = best_seconds(lambda: head_cross_entropy(hidden, weight, targets, chunk), hidden, weight)
        rows.append(f"| head + loss, fused, {chunk} rows a chunk | {seconds:.3f} s |")
    return rows


def training_step(plain: bool, steps: int) -> str:
    """One process's measurement (peak RSS is per process)."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("mini", context_length=256, drop_rate=0.1))
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4))
    inputs, targets = (torch.randint(0, model.cfg.vocab_size, (8, 256)) for _ in range(2))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        if plain:
            loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        else:
            loss = model(inputs, targets=targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (f"| mini training step, {'plain logits' if plain else 'fused'} | {min(times[1:]):.3f} s, "
            f"{8 * 256 / min(times[1:]):.0f} tokens/s, peak RSS {peak_mb / 1024:.2f} GB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="training steps per process (the first is not timed)")
    parser.add_argument("--step", choices=("plain", "fused"), help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    tune_malloc()
    if args.step:
        print(training_step(args.step == "plain", args.steps))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n| measurement | result |\n|---|---|")
    for row in head_rows():
        print(row, flush=True)
    for mode in ("plain", "fused"):
        subprocess.run([sys.executable, __file__, "--step", mode, "--steps", str(args.steps)], check=True)


if __name__ == "__main__":
    main()
