"""The gpt package's CUDA path, checked and timed on one GPU; run by benchmarks/gpu_check.sh.

    python benchmarks/gpu_check.py            # correctness on CUDA, then short bf16 pretraining runs
    torchrun --nproc_per_node=1 benchmarks/gpu_check.py --ddp   # one data-parallel run over nccl

Prints one markdown row per check (docs/benchmarks.md, "The GPU check"); exits non-zero if a check fails.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gpt import distributed  # noqa: E402
from gpt.generate import generate, generate_batch  # noqa: E402
from gpt.loss import head_cross_entropy  # noqa: E402
from gpt.model import GPTConfig, GPTModel  # noqa: E402
from gpt.train import Trainer, TrainConfig  # noqa: E402

CUDA = torch.device("cuda")


def row(check: str, result: str, ok: bool) -> bool:
    print(f"| {check} | {result} | {'pass' if ok else 'FAIL'} |", flush=True)
    return ok


def fused_loss_matches() -> bool:
    """gpt.loss on CUDA equals the plain logits loss in fp32 (values and gradients)."""
    torch.manual_seed(0)
    hidden = torch.randn(4, 300, 256, device=CUDA)
    weight = torch.randn(50257, 256, device=CUDA) * 0.05
    targets = torch.randint(0, 50257, (4, 300), device=CUDA)
    grads = []
    for loss_fn in (lambda h, w: F.cross_entropy((h @ w.t()).flatten(0, 1), targets.flatten()),
                    lambda h, w: head_cross_entropy(h, w, targets)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = loss_fn(h, w)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    errors = [(a - b).abs().max().item() for a, b in zip(*grads)]
    return row("fused LM head + cross-entropy, fp32 (4 x 300 tokens, vocab 50,257)",
               "max abs difference of loss, d/dhidden, d/dweight: " + ", ".join(f"{e:.1e}" for e in errors),
               all(e < 1e-4 for e in errors))


def batched_generation_matches() -> bool:
    """generate_batch on CUDA gives one-at-a-time greedy tokens (float64: no near-tie flips)."""
    torch.manual_seed(1)
    model = GPTModel(GPTConfig.from_preset("tiny", drop_rate=0.0)).to(CUDA).double().eval()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 50257, (n,), generator=gen).tolist() for n in (3, 17, 1, 9, 30, 5, 12, 2)]
    alone = [generate(model, torch.tensor([p], device=CUDA), 24)[0, len(p):].tolist() for p in prompts]
    same = generate_batch(model, prompts, 24, batch_size=8) == alone
    return row("batched greedy generation (8 prompts of 1-30 tokens, left-padded, one KV cache)",
               "same tokens as one prompt at a time" if same else "tokens differ", same)


def dropout_rate() -> bool:
    """gpt.dropout on CUDA (torch's fused kernel) drops about p of the elements and keeps the mean."""
    from gpt.dropout import Dropout

    out = Dropout(0.1).train()(torch.ones(4_000_000, device=CUDA))
    dropped, mean = (out == 0).float().mean().item(), out.mean().item()
    return row("dropout p=0.1 on CUDA", f"dropped {dropped:.4f}, mean {mean:.4f}",
               abs(dropped - 0.1) < 0.001 and abs(mean - 1) < 0.002)


def learnable_tokens(n: int, period: int = 4096) -> np.ndarray:
    """A random sequence of `period` token ids repeated: a model can learn it, so the loss must fall."""
    base = np.random.default_rng(0).integers(0, 50257, period)
    return np.resize(base, n).astype(np.uint16)


def short_pretraining(compile_model: bool, steps: int = 60) -> tuple[bool, float]:
    """mini, batch 16 x context 256, bf16 autocast, fused AdamW: tokens/s after 10 warm-up steps, and the loss."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("mini")).to(CUDA)
    cfg = TrainConfig(batch_size=16, max_steps=steps, lr=1e-3, warmup_steps=5, eval_every=0, checkpoint_every=0,
                      precision="bf16", fused_adamw=True, compile=compile_model)
    stamps: list[float] = []
    losses: list[float] = []

    def on_event(kind: str, record: dict) -> None:
        if kind == "step":
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            losses.append(record["loss"])
    tokens = learnable_tokens(steps * 16 * 256 + 1)
    Trainer(model, tokens, tokens[: 256 * 16 + 1], cfg, on_event=on_event).run()
    rate = (len(stamps) - 11) * 16 * 256 / (stamps[-1] - stamps[10])
    ok = losses[-1] < 0.5 * losses[0]
    mode = "compiled" if compile_model else "eager"
    row(f"short pretraining, mini, bf16 autocast + fused AdamW, {mode}, {steps} steps",
        f"{rate:,.0f} tokens/s; loss {losses[0]:.2f} -> {losses[-1]:.2f}", ok)
    return ok, rate


def ddp_run() -> bool:
    """One Trainer run under torchrun over nccl (gpt.distributed.setup picks it for CUDA)."""
    device = distributed.setup(CUDA)
    backend = torch.distributed.get_backend() if distributed.is_initialized() else "none"
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny")).to(device)
    cfg = TrainConfig(batch_size=8, max_steps=20, lr=1e-3, eval_every=10, checkpoint_every=0, precision="bf16")
    tokens = learnable_tokens(20 * 8 * 128 + 1)
    state = Trainer(model, tokens, tokens[: 8 * 128 + 1], cfg).run()
    first, last = state.history[0]["loss"], state.history[-1]["loss"]
    ok = True
    if distributed.is_main():
        ok = row(f"torchrun, {distributed.world_size()} process, DDP", f"backend {backend}; loss {first:.2f} -> {last:.2f}",
                 backend == "nccl" and last < first)
    distributed.shutdown()
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ddp", action="store_true", help="the torchrun check (start under torchrun)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible to torch")
    if args.ddp:
        sys.exit(0 if ddp_run() else 1)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| check | result | |\n|---|---|---|")
    results = [fused_loss_matches(), batched_generation_matches(), dropout_rate()]
    eager_ok, eager = short_pretraining(compile_model=False)
    compiled_ok, compiled = short_pretraining(compile_model=True)
    print(f"\ncompile: {compiled / eager:.2f}x the eager tokens/s")
    sys.exit(0 if all(results) and eager_ok and compiled_ok else 1)


if __name__ == "__main__":
    main()
