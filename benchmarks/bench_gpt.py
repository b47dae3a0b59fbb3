"""Benchmark the gpt package on this machine and print one markdown table.

    python benchmarks/bench_gpt.py                        # CPU, mini + gpt2-small, everything but dvc
    python benchmarks/bench_gpt.py --device cuda          # bf16 autocast, bf16 matmul peak
    python benchmarks/bench_gpt.py --dvc-repo PATH        # adds the no-op `dvc repro` row

Rows: the machine's measured matmul peak and memory bandwidth; training tokens/s and MFU (model
FLOPs utilization against that peak) of the real training step (gpt.train.Trainer: make_optimizer,
batch_loss, clipping, the precision/compile settings); batch-1 decoding tokens/s with and without
the KV cache against the memory-bandwidth bound; tokenization MB/s of the pipeline's path
(pipeline.data.corpus.write_corpus_tokens; benchmarks/bench_tokenize.py measures it on a 1 GB corpus)
against raw tiktoken; the seconds of a no-op `dvc repro`.
Definitions are printed under the table. Timings synchronize CUDA before reading the clock.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/bench_gpt.py` from anywhere
    sys.path.insert(0, str(REPO))

from gpt.fast_decode import use_fast_decode  # noqa: E402
from gpt.generate import generate, generate_batch  # noqa: E402
from gpt.model import GPTConfig, GPTModel  # noqa: E402
from gpt.runtime import PRECISIONS, autocast_dtype, pick_device, tune_malloc  # noqa: E402
from gpt.train import Trainer, TrainConfig  # noqa: E402
from pipeline.data.fetch import MIRROR_ENV  # noqa: E402

# Training shape per preset: (batch, context). mini is the preset; gpt2-small uses the
# same 2,048 tokens per step (its own context is 1024; 256 keeps a CPU step to ~10 s).
DEFAULT_SHAPE = (8, 256)  # batch x context; the shape for mini, used for every preset


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` timed calls (the least disturbed by other load)."""
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


# -- machine ------------------------------------------------------------------------------------
def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] | None = None,
                repeats: int | None = None) -> tuple[float, str]:
    """Best FLOP/s of large square matmuls (2 n^3 FLOPs each) in `dtype`, and the setting."""
    default_sizes, default_repeats, inner = ((4096, 8192), 5, 20) if device.type == "cuda" else ((2048, 3072), 3, 1)
    sizes, repeats = sizes or default_sizes, repeats or default_repeats
    best, best_n = 0.0, 0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)

        def run() -> None:
            for _ in range(inner):
                torch.mm(a, b, out=out)
        run()  # warm-up (threads, kernels, clocks)
        rate = 2 * n**3 * inner / best_seconds(run, device, repeats)
        if rate > best:
            best, best_n = rate, n
    return best, f"{str(dtype).removeprefix('torch.')} mm {best_n}x{best_n}, best of {repeats}"


def bandwidths(device: torch.device) -> dict[str, float]:
    """Bytes/s of a large fp32 copy (bytes read + bytes written) and of a sum (bytes read)."""
    n_bytes = (2 << 30) if device.type == "cuda" else (512 << 20)
    x = torch.ones(n_bytes // 4, device=device)
    y = torch.empty_like(x)
    repeats = 10 if device.type == "cuda" else 5
    y.copy_(x), x.sum()  # warm-up: first touch of y's pages
    copy = 2 * n_bytes / best_seconds(lambda: y.copy_(x), device, repeats)
    read = n_bytes / best_seconds(lambda: x.sum(), device, repeats)
    return {"copy": copy, "read": read, "bytes": n_bytes}


# -- training -----------------------------------------------------------------------------------
def matmul_params(cfg: GPTConfig) -> int:
    """Weights that take part in matmuls: 12 d^2 per block (q/k/v, out, MLP in/out) + the LM head
    (vocab x d, counted once even when tied; the real vocabulary, not the padding). Embedding
    lookups, biases and norms are not matmuls and are left out."""
    return 12 * cfg.n_layers * cfg.emb_dim**2 + cfg.vocab_size * cfg.emb_dim


def train_flops_per_token(cfg: GPTConfig, context: int) -> float:
    """6 N (forward 2N + backward 4N) plus attention's 12 L T d (PaLM / nanoGPT convention)."""
    return 6 * matmul_params(cfg) + 12 * cfg.n_layers * context * cfg.emb_dim


def train_tokens_per_s(preset: str, batch: int, context: int, device: torch.device, steps: int, warmup: int,
                       settings: dict, step_peak: Callable[[], float] | None = None
                       ) -> tuple[float, GPTConfig, list[tuple[float, float]]]:
    """Tokens/s of gpt.train.Trainer's own step loop (data loading, forward + loss under the
    precision setting, backward, clipping, AdamW) on random tokens; the first `warmup` steps
    (and a compile's trial step) are not timed. With `step_peak`, it is called after each timed step,
    outside the step's time, and each step's (seconds, that peak) is returned too."""
    cfg = GPTConfig.from_preset(preset, context_length=context, pad_vocab_to=64 if settings["pad_vocab"] else 1)
    torch.manual_seed(0)
    model = GPTModel(cfg).to(device)
    total = warmup + steps
    rng = np.random.default_rng(0)
    train = rng.integers(0, cfg.vocab_size, total * batch * context + 1).astype(np.uint16)
    val = rng.integers(0, cfg.vocab_size, context + 1).astype(np.uint16)
    train_cfg = TrainConfig(batch_size=batch, max_steps=total, eval_every=0, checkpoint_every=0,
                            compile=settings["compile"], precision=settings["precision"],
                            fused_adamw=settings["fused_adamw"], cpu_kernels=settings["cpu_kernels"])
    ends: list[float] = []  # each step's end
    starts: list[float] = []  # the next step's start: the same moment, or after step_peak
    per_step: list[tuple[float, float]] = []

    def on_event(kind: str, record: dict) -> None:
        if kind == "step":
            sync(device)
            ends.append(time.perf_counter())
            if step_peak is not None:
                if len(ends) > max(warmup, 1):  # a timed step
                    per_step.append((ends[-1] - starts[-1], step_peak()))
                starts.append(time.perf_counter())
            else:
                starts.append(ends[-1])
    Trainer(model, train, val, train_cfg, on_event=on_event).run()
    first = warmup - 1 if warmup else 0  # the start of the first timed step is starts[first]
    seconds = sum(end - start for start, end in zip(starts[first:], ends[first + 1 :]))
    del model
    return (len(ends) - 1 - first) * batch * context / seconds, cfg, per_step


# -- decoding -----------------------------------------------------------------------------------
def decode_bytes_per_token(model: GPTModel) -> int:
    """Bytes of weights one decoding step must read: every parameter once (a tied head is the token
    embedding, read whole by the head matmul), but only one row of each embedding lookup table."""
    cfg, emb = model.cfg, model.tok_emb.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    row = cfg.emb_dim * emb.element_size()
    total -= model.pos_emb.weight.numel() * emb.element_size() - row
    if not cfg.tie_weights:
        total -= emb.numel() * emb.element_size() - row
    return total


def decode_tokens_per_s(model: GPTModel, prompt_len: int, new_tokens: int, use_cache: bool,
                        device: torch.device, repeats: int) -> float:
    """Steady-state batch-1 greedy decoding rate of gpt.generate.generate: (new - 1) tokens over
    the time of generate(new) minus that of generate(1), so the prompt's prefill cancels out."""
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    generate(model, prompt, 3, use_cache=use_cache)  # warm-up
    one = best_seconds(lambda: generate(model, prompt, 1, use_cache=use_cache), device, repeats)
    full = best_seconds(lambda: generate(model, prompt, new_tokens, use_cache=use_cache), device, repeats)
    return (new_tokens - 1) / max(full - one, 1e-9)


def batch_decode_tokens_per_s(model: GPTModel, batch: int, prompt_len: int, new_tokens: int, device: torch.device,
                              repeats: int) -> float:
    """Steady-state greedy tokens/s (all rows together) of gpt.generate.generate_batch on `batch` prompts
    whose lengths spread from half to one and a half times `prompt_len` (so rows are left-padded), prefill
    cancelled out as in decode_tokens_per_s. No eos: every row decodes every step."""
    gen = torch.Generator().manual_seed(2)
    lengths = np.linspace(prompt_len // 2, prompt_len * 3 // 2, batch).astype(int) if batch > 1 else [prompt_len]
    prompts = [torch.randint(0, model.cfg.vocab_size, (int(n),), generator=gen).tolist() for n in lengths]
    generate_batch(model, prompts, 3, batch_size=batch)  # warm-up
    one = best_seconds(lambda: generate_batch(model, prompts, 1, batch_size=batch), device, repeats)
    full = best_seconds(lambda: generate_batch(model, prompts, new_tokens, batch_size=batch), device, repeats)
    return batch * (new_tokens - 1) / max(full - one, 1e-9)


def decode_against_bound(model: GPTModel, prompt_len: int, new_tokens: int, device: torch.device, rounds: int,
                         per_token: int, seen: list[dict[str, float]]) -> tuple[float, float, float, list[float]]:
    """Cached decoding against the bandwidth it ran under: each round measures the bandwidths, times
    the decoding rate, measures them again, and is bounded by the better of its two measurements
    (this VM's bandwidth moves by up to 1.7x within minutes, so a bound from another moment can be
    off either way). Returns the median round's (tokens/s, copy bound, read bound) and every
    round's share of its copy bound; `seen` collects the bandwidth measurements."""
    results = []
    for _ in range(rounds):
        before = bandwidths(device)
        rate = decode_tokens_per_s(model, prompt_len, new_tokens, True, device, 1)
        after = bandwidths(device)
        seen += [before, after]
        copy, read = (max(before[name], after[name]) / per_token for name in ("copy", "read"))
        results.append((rate, copy, read))
    results.sort(key=lambda r: r[0] / r[1])
    return (*results[len(results) // 2], [rate / copy for rate, copy, _ in results])


# -- tokenization -------------------------------------------------------------------------------
def tokenization(text_path: Path, bpe_dir: Path, repeats: int) -> tuple[float, float, int]:
    """MB/s (UTF-8 bytes, 1 MB = 1e6 B) of the pipeline's corpus encoding (write_corpus_tokens, as
    the tokenize stage calls it: read, train/val cut, encode on every core, write both token files)
    and of raw tiktoken encode_ordinary of the same text with the same encoding."""
    from gpt.tokenizer import load_tokenizer
    from pipeline.data.corpus import write_corpus_tokens

    enc = load_tokenizer(bpe_dir)
    text = text_path.read_text(encoding="utf-8")
    n_bytes = len(text.encode("utf-8"))
    cpu = torch.device("cpu")
    enc.encode_ordinary(text)  # warm-up (regex compile, rank tables)
    raw = best_seconds(lambda: enc.encode_ordinary(text), cpu, repeats)
    with tempfile.TemporaryDirectory() as out:
        ours = best_seconds(lambda: write_corpus_tokens([text_path], "text", enc, 0.9, "cut", Path(out) / "train.bin",
                                                        Path(out) / "val.bin"), cpu, repeats)
    return n_bytes / ours / 1e6, n_bytes / raw / 1e6, n_bytes


# -- dvc ----------------------------------------------------------------------------------------
def dvc_noop(repo: Path, target: str | None, repeats: int) -> tuple[float | None, str]:
    """Seconds of `dvc repro [target]` when `dvc status` says nothing changed; else (None, why)."""
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
    if dvc is None:
        return None, "dvc not installed"
    targets = [target] if target else []
    status = subprocess.run([dvc, "status", *targets], cwd=repo, capture_output=True, text=True)
    if status.returncode != 0 or "up to date" not in status.stdout:
        changed = sum(1 for line in status.stdout.splitlines() if line.endswith(":") and not line.startswith("\t"))
        return None, f"not timed: the pipeline in {repo} is not up to date ({changed} stage(s) changed)"
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run([dvc, "repro", *targets], cwd=repo, capture_output=True, text=True)
        best = min(best, time.perf_counter() - start)
        if result.returncode != 0:
            return None, f"`dvc repro` failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}"
    return best, f"`dvc repro{' ' + target if target else ''}` in {repo}, best of {repeats}"


# -- table --------------------------------------------------------------------------------------
def fmt(value: float, unit: str, digits: int = 0) -> str:
    return f"{value:,.{digits}f} {unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default cpu)")
    parser.add_argument("--presets", default="mini,gpt2-small", help="training presets, comma-separated "
                        "(batch 8 x context 256 unless --train-shape says otherwise)")
    parser.add_argument("--train-shape", action="append", default=[], metavar="PRESET=BATCHxCONTEXT",
                        help="another training shape for a preset, e.g. gpt2-small=16x1024 (repeatable)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 3 on CPU, 20 on GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="as pretrain.precision")
    parser.add_argument("--compile", action="store_true", help="as pretrain.compile: true")
    parser.add_argument("--fused-adamw", choices=("auto", "true", "false"), default="auto",
                        help="as pretrain.fused_adamw (auto: fused on CPU and CUDA)")
    parser.add_argument("--pad-vocab", action="store_true", help="as pretrain.pad_vocab: true")
    parser.add_argument("--step-peaks", action="store_true",
                        help="also measure the matmul peak after every timed training step (outside its time) and "
                             "report the per-step MFU's median and range: the VM's speed drifts within minutes")
    parser.add_argument("--cpu-kernels", choices=("true", "false"), default="true",
                        help="as pretrain.cpu_kernels (true: GELU, softmax + dropout, the loss's exp in C++ on CPU)")
    parser.add_argument("--decode-preset", default="gpt2-small")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--decode-batches", type=lambda text: [int(v) for v in text.split(",")], default=[1, 8, 32],
                        help="batch sizes of the batched-decoding rows, comma-separated (default 1,8,32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 64 on CPU, 256 on GPU)")
    parser.add_argument("--mirror", type=Path, default=Path(os.environ.get(MIRROR_ENV) or REPO.parent / "shared" / "datasets"),
                        help="dataset mirror with tinyshakespeare.txt and gpt2_bpe/ (default $LLM_PIPELINE_MIRROR)")
    parser.add_argument("--dvc-repo", type=Path, default=None, help="a project checkout whose pipeline is up to "
                        "date (see benchmarks/dvc_scratch.py); without it the dvc row is skipped")
    parser.add_argument("--dvc-target", default=None, help="stage for `dvc repro` (default: the whole pipeline)")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out: train, decode, tokenize, dvc")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc's allocator as it is (the pretrain stage calls gpt.runtime.tune_malloc)")
    args = parser.parse_args()

    malloc_tuned = False if args.no_malloc_tuning else tune_malloc()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    gpu = device.type != "cpu"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    shapes: dict[str, tuple[int, int]] = {}
    for item in args.train_shape:
        try:
            preset, shape = item.split("=")
            shapes[preset] = tuple(int(v) for v in shape.lower().split("x"))
            assert len(shapes[preset]) == 2
        except (ValueError, AssertionError):
            parser.error(f"--train-shape {item!r}: expected PRESET=BATCHxCONTEXT, e.g. gpt2-small=16x1024")
    steps = args.steps or (20 if gpu else 3)
    # Three untimed steps: compiling takes them, and eagerly the heap grows to its peak over the first two
    # (a mini step on CPU page-faulted ~240k and ~96k times in them, then ~0): a long run is the steady state.
    warmup = args.warmup if args.warmup is not None else 3
    new_tokens = args.new_tokens or (256 if gpu else 64)
    repeats = 5 if gpu else 3
    fused = {"auto": None, "true": True, "false": False}[args.fused_adamw]
    kernels = args.cpu_kernels == "true"
    settings = {"precision": args.precision, "compile": args.compile, "fused_adamw": fused, "pad_vocab": args.pad_vocab,
                "cpu_kernels": kernels}
    train_dtype = autocast_dtype(args.precision, device) or torch.float32

    rows: list[tuple[str, str, str, str, str]] = []
    notes: list[str] = []
    peak, peak_setting = matmul_peak(device, train_dtype)
    rows.append(("matmul peak", peak_setting, fmt(peak / 1e9, "GFLOP/s"), "", ""))
    seen = [bandwidths(device)]  # every bandwidth measurement of the run (decoding measures more)
    bandwidth_rows = len(rows)  # filled in at the end

    if "train" not in skip:
        optim = "fused AdamW" if (fused if fused is not None else device.type in ("cpu", "cuda")) else "AdamW"
        mode = f"{str(train_dtype).removeprefix('torch.')}{' autocast' if train_dtype != torch.float32 else ''}, " \
               f"{'compiled' if args.compile else 'eager'}, {optim}{', vocab padded to 64' if args.pad_vocab else ''}" \
               f"{', C++ kernels' if kernels and device.type == 'cpu' else ''}"
        for preset in filter(None, (p.strip() for p in args.presets.split(","))):
            batch, context = shapes.get(preset, DEFAULT_SHAPE)
            step_peak = (lambda: matmul_peak(device, train_dtype, sizes=(3072,), repeats=2)[0]) if args.step_peaks \
                else None
            rate, cfg, per_step = train_tokens_per_s(preset, batch, context, device, steps, warmup, settings, step_peak)
            flops = train_flops_per_token(cfg, context)
            mfu = f"MFU {flops * rate / peak:.0%}"
            if per_step:
                ratios = sorted(flops * batch * context / seconds / step for seconds, step in per_step)
                mfu += f"; per step against the peak after it: median {statistics.median(ratios):.1%}, " \
                       f"{ratios[0]:.0%}-{ratios[-1]:.0%}"
            rows.append((f"training {preset}", f"batch {batch} x context {context}, {mode}, {steps} steps",
                         fmt(rate, "tokens/s"), f"{flops * rate / 1e9:,.0f} GFLOP/s ({flops / 1e6:,.0f} MFLOP/token)",
                         mfu))

    if "decode" not in skip:
        torch.manual_seed(0)
        model = GPTModel(GPTConfig.from_preset(args.decode_preset, drop_rate=0.0)).to(device).eval()
        per_token = decode_bytes_per_token(model)
        setting = f"batch 1, greedy, prompt {args.prompt_tokens} + {new_tokens} tokens, fp32"
        variants = [("KV cache", "PyTorch eager", False)]
        if device.type == "cpu" and use_fast_decode(model):
            variants.append(("KV cache + fast decode", "gpt.fast_decode step", True))
        rates: dict[bool, float] = {}
        for name, path, fast in variants:
            use_fast_decode(model, fast)
            rate, bound, read_bound, shares = decode_against_bound(model, args.prompt_tokens, new_tokens, device,
                                                                   repeats, per_token, seen)
            rates[fast] = rate
            rounds = ", ".join(f"{share:.0%}" for share in shares)
            rows.append((f"decoding {args.decode_preset}, {name}", f"{setting}, {path}", fmt(rate, "tokens/s", 1),
                         f"bound {bound:,.1f} tokens/s ({per_token / 1e6:,.1f} MB/token at the copy bandwidth); "
                         f"{rate / read_bound:.0%} of the read-bandwidth bound {read_bound:,.1f}; rounds {rounds}",
                         f"{rate / bound:.0%} of bound"))
        use_fast_decode(model, False)
        uncached = decode_tokens_per_s(model, args.prompt_tokens, new_tokens, False, device, max(1, repeats - 1))
        rows.append((f"decoding {args.decode_preset}, no cache", setting + ", PyTorch eager", fmt(uncached, "tokens/s", 1),
                     "KV cache, PyTorch eager", f"{uncached / rates[False]:.2f}x"))
        for name, path, fast in variants:
            use_fast_decode(model, fast)
            batch_rates = {size: batch_decode_tokens_per_s(model, size, args.prompt_tokens, new_tokens, device,
                                                           max(1, repeats - 1)) for size in args.decode_batches}
            smallest = min(batch_rates)
            for size, rate in batch_rates.items():
                lengths = f"{args.prompt_tokens // 2}-{args.prompt_tokens * 3 // 2}" if size > 1 else args.prompt_tokens
                rows.append((f"decoding {args.decode_preset}, batch {size}, {name}",
                             f"generate_batch, greedy, {size} prompt(s) of {lengths} tokens (left-padded) + "
                             f"{new_tokens} tokens, fp32, {path}", fmt(rate, "tokens/s", 1),
                             f"batch {smallest}: {batch_rates[smallest]:,.1f} tokens/s", f"{rate / batch_rates[smallest]:.1f}x"))
        kv_bytes = 2 * model.cfg.n_layers * model.cfg.emb_dim * 4 * (args.prompt_tokens + new_tokens)
        notes.append(f"KV-cache reads are not in the bound: at most {kv_bytes / 1e6:.1f} MB/token here "
                     f"({kv_bytes / per_token:.1%} of the weights).")
        del model

    if "tokenize" not in skip:
        text_path, bpe_dir = args.mirror / "tinyshakespeare.txt", args.mirror / "gpt2_bpe"
        if text_path.is_file() and bpe_dir.is_dir():
            ours, raw, n_bytes = tokenization(text_path, bpe_dir, 5)
            rows.append(("tokenization", f"write_corpus_tokens of tinyshakespeare.txt ({n_bytes / 1e6:.2f} MB), "
                         f"{os.cpu_count()} threads", fmt(ours, "MB/s", 1),
                         f"raw tiktoken encode_ordinary {raw:,.1f} MB/s", f"{ours / raw:.2f}x"))
        else:
            rows.append(("tokenization", f"skipped: {text_path} or {bpe_dir} missing (--mirror)", "", "", ""))

    if "dvc" not in skip:
        if args.dvc_repo is None:
            rows.append(("no-op `dvc repro`", "skipped: no --dvc-repo given", "", "", ""))
        else:
            seconds, setting = dvc_noop(args.dvc_repo.resolve(), args.dvc_target, 3)
            rows.append(("no-op `dvc repro`", setting, "" if seconds is None else fmt(seconds, "s", 2),
                         "target 5 s" if seconds is not None else "", ""))

    size = seen[0]["bytes"] >> 20
    rows[bandwidth_rows:bandwidth_rows] = [
        (f"memory bandwidth, {name}", f"fp32 {op} of {size} MiB: {unit} / s, best of {len(seen)} measurements",
         fmt(max(m[name] for m in seen) / 1e9, "GB/s", 1), f"lowest {min(m[name] for m in seen) / 1e9:.1f} GB/s", "")
        for name, op, unit in (("read", "sum", "bytes read"), ("copy", "copy", "(bytes read + written)"))]
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    malloc = [f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_")]
    malloc_text = "tune_malloc() applied" if malloc_tuned else "glibc defaults"
    print(f"machine: {name} ({device.type}), {threads} torch threads, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"allocator: {malloc_text}{' + ' + ' '.join(malloc) if malloc else ''}")
    print()
    print("| measurement | setting | result | reference | ratio |")
    print("|---|---|---:|---|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print("MFU = training FLOPs/s over the matmul peak above; FLOPs/token = 6 x matmul weights (12 L d^2 + the "
          "LM head's V d, tied or not; no embeddings, biases, norms) + 12 L T d for attention.")
    if "decode" not in skip:
        print("Decode bound = copy bandwidth (STREAM convention: bytes read + written per second) / bytes of weights "
              "one token must read (all parameters once, the tied head included; one row of each embedding "
              "table). Each decoding round is bounded by the better of two bandwidth measurements taken right before "
              "and after it; the row shows the median round and lists every round's share. Decoding rates are "
              "steady state, prefill excluded.")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
