"""Benchmark streaming corpus tokenization (pipeline.data.corpus.write_corpus_tokens) against raw tiktoken; one markdown table.

    python benchmarks/bench_tokenize.py                    # a 1 GB corpus in a temp folder, removed afterwards
    python benchmarks/bench_tokenize.py --gb 4 --workdir /big/disk --keep

The corpus is built from the mirror's texts: their paragraphs shuffled with a fixed seed, again and
again, into three large .txt files and one .jsonl file (documents of a few dozen paragraphs). Raw
speed is one `enc.encode_ordinary` call on a sample of it on one thread; the ideal is that times
the core count. write_corpus_tokens (split="cut", 0.9) runs on the whole corpus in a subprocess,
which reports its own peak RSS (VmHWM). 1 MB = 1e6 bytes of UTF-8 text; RSS MB are MiB.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/bench_tokenize.py` from anywhere
    sys.path.insert(0, str(REPO))

from gpt.tokenizer import load_tokenizer  # noqa: E402
from pipeline.data.corpus import CHUNK_CHARS, write_corpus_tokens  # noqa: E402
from pipeline.data.encoding import safe_cuts  # noqa: E402
from pipeline.data.fetch import MIRROR_ENV  # noqa: E402

SOURCES = ("tinyshakespeare.txt", "the-verdict.txt")
SEED = 1234
TXT_FILES = 3  # plus one .jsonl file of the same size
PARAGRAPHS_PER_DOCUMENT = (5, 60)
SAMPLE_BYTES = 8_000_000  # the raw-speed sample: large enough that one call's fixed costs vanish


def paragraphs(mirror: Path) -> list[str]:
    """The non-blank paragraphs (blank-line separated) of the mirror's texts."""
    found = []
    for name in SOURCES:
        text = (mirror / name).read_text(encoding="utf-8")
        found += [part for part in text.split("\n\n") if part.strip()]
    return found


def write_txt(path: Path, parts: list[str], size: int, rng: random.Random) -> None:
    """A text file of about `size` bytes: the paragraphs, reshuffled on each pass."""
    written = 0
    with path.open("w", encoding="utf-8") as handle:
        while written < size:
            rng.shuffle(parts)
            block = "\n\n".join(parts) + "\n\n"
            handle.write(block)
            written += len(block.encode("utf-8"))


def write_jsonl(path: Path, parts: list[str], size: int, rng: random.Random) -> None:
    """A .jsonl file of about `size` bytes, one document of random paragraphs a line."""
    written = 0
    with path.open("w", encoding="utf-8") as handle:
        while written < size:
            line = json.dumps({"text": "\n\n".join(rng.sample(parts, rng.randint(*PARAGRAPHS_PER_DOCUMENT)))}) + "\n"
            handle.write(line)
            written += len(line)  # json.dumps escapes non-ASCII: characters are bytes


def build_corpus(folder: Path, mirror: Path, gigabytes: float) -> list[Path]:
    """Write the corpus files into `folder`; return them sorted."""
    folder.mkdir(parents=True)
    parts, rng = paragraphs(mirror), random.Random(SEED)
    size = int(gigabytes * 1e9 / (TXT_FILES + 1)) + 1
    for index in range(TXT_FILES):
        write_txt(folder / f"part{index}.txt", parts, size, rng)
    write_jsonl(folder / f"part{TXT_FILES}.jsonl", parts, size, rng)
    return sorted(folder.iterdir())


def sample_text(files: list[Path]) -> str:
    """The first SAMPLE_BYTES of the corpus, as text."""
    with files[0].open("rb") as handle:
        return handle.read(SAMPLE_BYTES).decode("utf-8", errors="ignore")  # ignore: a cut last character


def best_mb_per_s(n_bytes: int, fn: Callable[[], object]) -> float:
    """MB/s of the faster of two calls."""
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n_bytes / best / 1e6


def raw_single_core(enc, sample: str) -> float:
    """MB/s of one encode_ordinary call on the sample, on this thread."""
    enc.encode_ordinary(sample[:10_000])  # warm-up
    return best_mb_per_s(len(sample.encode("utf-8")), lambda: enc.encode_ordinary(sample))


def tiktoken_batch(enc, sample: str, threads: int) -> float:
    """MB/s of tiktoken's own encode_ordinary_batch on the sample cut at safe places (the chunks
    write_corpus_tokens encodes): what a thread pool reaches on this machine at this moment."""
    bounds = [0, *safe_cuts(sample, CHUNK_CHARS), len(sample)]
    chunks = [sample[start:end] for start, end in zip(bounds, bounds[1:])]
    return best_mb_per_s(len(sample.encode("utf-8")), lambda: enc.encode_ordinary_batch(chunks, num_threads=threads))


def run_child(workdir: Path, bpe_dir: Path) -> tuple[dict, float]:
    """write_corpus_tokens on the corpus in a subprocess: its stats (with peak_rss_mb) and its CPU seconds."""
    result = subprocess.run([sys.executable, __file__, "--child", str(workdir), "--mirror", str(bpe_dir.parent)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bench_tokenize: the tokenizing subprocess failed:\n{result.stderr}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the only child
    return json.loads(result.stdout), usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float | None:
    """This process's peak RSS since its exec (VmHWM; Linux only, else None).

    Not getrusage's ru_maxrss: it keeps what the process held before exec, which for a child is
    the parent's whole memory, shared at fork.
    """
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return None


def child(workdir: Path, bpe_dir: Path) -> None:
    """The subprocess: tokenize workdir/corpus into workdir/tokens and print the stats as JSON."""
    files = sorted((workdir / "corpus").iterdir())
    stats = write_corpus_tokens(files, "text", load_tokenizer(bpe_dir), 0.9, "cut", workdir / "tokens" / "train.bin",
                                workdir / "tokens" / "val.bin")
    print(json.dumps({**stats, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="corpus size in GB (1e9 bytes; default 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to make the temp folder (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and token files")
    parser.add_argument("--mirror", type=Path, default=Path(os.environ.get(MIRROR_ENV) or REPO.parent / "shared" / "datasets"),
                        help="dataset mirror with the texts and gpt2_bpe/ (default $LLM_PIPELINE_MIRROR)")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    bpe_dir = args.mirror / "gpt2_bpe"
    if args.child is not None:
        child(args.child, bpe_dir)
        return
    cores = os.cpu_count() or 1  # write_corpus_tokens's default thread count
    workdir = Path(tempfile.mkdtemp(prefix="bench_tokenize.", dir=args.workdir))
    try:
        files = build_corpus(workdir / "corpus", args.mirror, args.gb)
        corpus_bytes = sum(path.stat().st_size for path in files)
        enc, sample = load_tokenizer(bpe_dir), sample_text(files)
        raw = raw_single_core(enc, sample)
        batch = tiktoken_batch(enc, sample, cores)
        load_before = os.getloadavg()[0]
        stats, cpu_seconds = run_child(workdir, bpe_dir)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    ideal = raw * cores
    print("| corpus GB | raw single-core MB/s | cores | ideal MB/s | streaming MB/s | ratio to ideal | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {corpus_bytes / 1e9:.2f} | {raw:.1f} | {cores} | {ideal:.1f} | {stats['mb_per_s']:.1f} | "
          f"{stats['mb_per_s'] / ideal:.2f} | {'n/a' if stats['peak_rss_mb'] is None else round(stats['peak_rss_mb'])} |")
    print(f"\n{stats['documents']:,} documents, {stats['train_tokens']:,} train + {stats['val_tokens']:,} val tokens "
          f"in {stats['seconds']:.1f} s (write_corpus_tokens, split=cut 0.9, {cores} threads), using "
          f"{cpu_seconds:.1f} CPU-seconds: {stats['bytes'] / 1e6 / cpu_seconds:.1f} MB per CPU-second.")
    # Other processes on the machine take cores from the threads: the load says how much.
    print(f"Load average (1 min) {load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after, on {cores} cores; "
          f"tiktoken's encode_ordinary_batch on {cores} threads reached {batch:.1f} MB/s on the sample just before.")


if __name__ == "__main__":
    main()
