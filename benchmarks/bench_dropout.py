"""What dropout costs a CPU training step, and what gpt.dropout saves (docs/benchmarks.md, "Training step").

    python benchmarks/bench_dropout.py

At the mini shape (batch 8 x context 256, 6 heads of 64) it times, forward + backward, best of
several: torch's dropout against gpt.dropout on one activation; attention with dropout through
SDPA's unfused CPU path (torch's Bernoulli masks), through the model's explicit path with
gpt.dropout, and SDPA's fused kernel without dropout (the floor); then whole training steps of the
mini model with dropout 0.1 and 0.0.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gpt.attention import MultiHeadAttention  # noqa: E402
from gpt.dropout import Dropout  # noqa: E402
from gpt.model import GPTConfig, GPTModel  # noqa: E402
from gpt.runtime import tune_malloc  # noqa: E402
from gpt.train import TrainConfig, batch_loss, make_optimizer  # noqa: E402

BATCH, CONTEXT = 8, 256


def best_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def forward_backward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        fn(x).sum().backward()
        x.grad = None
    return run


def attention_ms(dropout: float, explicit: bool) -> float:
    torch.manual_seed(0)
    attn = MultiHeadAttention(384, 384, CONTEXT, 6, dropout=dropout).train()
    x = torch.randn(BATCH, CONTEXT, 384, requires_grad=True)
    q, k, v = (t.view(BATCH, CONTEXT, 6, 64).transpose(1, 2).detach().requires_grad_()
               for t in attn.qkv(x).split(384, dim=2))
    if explicit:  # the model's path on CPU with dropout: gpt.dropout on the attention weights
        return best_ms(lambda: attn._explicit(q, k, v, 0).sum().backward())
    return best_ms(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True).sum().backward())


def step_ms(drop_rate: float) -> float:
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("mini", drop_rate=drop_rate))
    optimizer = make_optimizer(model, TrainConfig())
    ids = torch.randint(0, 50257, (BATCH, CONTEXT + 1))

    def step() -> None:
        batch_loss(model, ids[:, :-1], ids[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return best_ms(step, repeats=5)


def main() -> None:
    tune_malloc()
    x = torch.randn(BATCH, CONTEXT, 384, requires_grad=True)
    ours = Dropout(0.1).train()
    rows = [
        ("dropout 0.1 of 8 x 256 x 384, torch (F.dropout)", best_ms(forward_backward(lambda t: F.dropout(t, 0.1), x))),
        ("dropout 0.1 of 8 x 256 x 384, gpt.dropout", best_ms(forward_backward(ours, x))),
        ("attention, dropout 0.1, SDPA (unfused path, torch's masks)", attention_ms(0.1, explicit=False)),
        ("attention, dropout 0.1, explicit path + gpt.dropout (the model's)", attention_ms(0.1, explicit=True)),
        ("attention, no dropout, SDPA fused kernel (the floor)", attention_ms(0.0, explicit=False)),
        ("training step of mini, dropout 0.1", step_ms(0.1)),
        ("training step of mini, dropout 0.0", step_ms(0.0)),
    ]
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| forward + backward | ms (best) |\n|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:,.1f} |")


if __name__ == "__main__":
    main()
