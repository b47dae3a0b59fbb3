"""The `book` preset's chapter 5 curve over several seeds, beside the book's published run (docs/book-preset.md).

    python benchmarks/book_curve.py --seeds 123,1,2                # the preset as it is
    python benchmarks/book_curve.py --seeds 123,1,2 --set weight_decay_all=false
    python benchmarks/book_curve.py --seeds 123 --dropout-seeds 1,2,3   # the notebook run's data order

Trains what `llm-pipeline preset apply book && dvc repro pretrain` trains: params.yaml's
pretrain section with the book preset laid over it (then any --set), on the-verdict from the mirror,
cut 90/10 as the tokenize stage cuts it, once per seed. At some of the book's evaluation points it records
the losses of every train window and of the val windows (drawing no random numbers, so the runs
train exactly as the stage does) and the trainer's own train estimate, and prints per step and seed:
  train_estimate - gpt.train.Trainer.evaluate's: under the preset's random_stream book, the book's
                   (5 batches of a freshly shuffled loader, drawn from the same generator); under
                   seeded, the first 5 batches in order (train_first, as evaluations then fall on
                   other steps)
  train_all      - the loss the estimates estimate
  val            - the val windows (2)
and the book's published figures (Raschka, "Build a Large Language Model (From Scratch)", ch. 5,
the chapter's notebook output, 10 epochs). The book counts its first update as step 0 and
evaluates every 5 steps from there, so step s is after s + 1 updates; this script evaluates after
the same updates and labels the rows with the book's step numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from statistics import mean

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gpt.data import load_tokens  # noqa: E402
from gpt.model import GPTModel  # noqa: E402
from gpt.runtime import tune_malloc  # noqa: E402
from gpt.tokenizer import load_tokenizer  # noqa: E402
from gpt.train import Trainer, window_losses  # noqa: E402
from pipeline.core.presets import overlay, preset_params  # noqa: E402
from pipeline.data.corpus import write_corpus_tokens  # noqa: E402
from pipeline.data.fetch import MIRROR_ENV  # noqa: E402
from pipeline.stages.pretrain import model_config, train_config  # noqa: E402

# The book's published runs of this setting, train / val loss by its step numbers: the chapter 5 notebook's
# run (made on a Mac's GPU, MPS: docs/book-preset.md), at the points issue 20 quotes and steps 0 and 10, as its log
# prints them, and the run the printed chapter quotes (steps 0, 10 and 85 of those it prints).
BOOK = {0: (9.817, 9.924), 10: (6.619, 7.042), 20: (5.524, 6.508), 40: (3.879, 6.130), 60: (2.104, 6.133),
        75: (1.059, 6.251), 85: (0.569, 6.373)}
PRINTED = {0: (9.781, 9.933), 10: (6.661, 7.048), 85: (0.391, 6.452)}
STEPS = tuple(BOOK)  # the book's step numbers evaluated (an evaluation of every window costs ~1/3 of a step's time)


def book_config(changes: list[str]) -> dict:
    """params.yaml with the book preset and `changes` (pretrain KEY=YAML) over it."""
    params = preset_params("book", REPO / "params.yaml")[0]
    for change in changes:
        key, _, value = change.partition("=")
        overlay(params["pretrain"], {key: yaml.safe_load(value)})
    return params


def corpus_tokens(params: dict, mirror: Path, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """the-verdict cut as the tokenize stage cuts it (the preset's train_ratio and split)."""
    corpus = params["tokenize"]["corpus"]
    write_corpus_tokens([mirror / "the-verdict.txt"], "text", load_tokenizer(mirror / "gpt2_bpe"),
                        corpus["train_ratio"], corpus["split"], out / "train.bin", out / "val.bin")
    return load_tokens(out / "train.bin"), load_tokens(out / "val.bin")


def run(cfg: dict, seed: int, train: np.ndarray, val: np.ndarray) -> tuple[dict[int, dict[str, float]], list[float]]:
    """One training run of the preset with `seed`: the losses at STEPS (the book's numbering: step s is
    after s + 1 updates), and every step's batch loss."""
    # eval_every stays: under random_stream book the trainer's evaluations draw from the generator as the
    # book's do, so they are part of the run being measured.
    cfg = {**cfg, "seed": seed, "sample_every": 0, "checkpoint_every": 0}
    tag = f"seed {seed}" + ("" if cfg.get("dropout_seed") is None else f" dropout seed {cfg['dropout_seed']}")
    torch.manual_seed(seed)
    model = GPTModel(model_config(cfg))
    trainer = Trainer(model, train, val, train_config(cfg))
    batch, batches = cfg["batch_size"], cfg["eval_batches"]
    curve: dict[int, dict[str, float]] = {}

    def on_event(kind: str, record: dict) -> None:
        step = record["step"] - 1  # the book's numbering
        if step not in STEPS:
            return
        if kind == "step":  # these evaluations draw no random numbers: the run trains as the stage does
            windows = window_losses(model, train, batch)  # every train window, in order
            curve[step] = {"train_first": mean(windows[: batch * batches]), "train_all": mean(windows),
                           "val": mean(window_losses(model, val, batch))}
        elif kind == "eval":  # the trainer's own estimate: under random_stream book, the book's
            curve[step]["train_estimate"] = record["train_loss"]
            print(f"{tag} step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in curve[step].items()), flush=True)
    trainer.on_event = on_event
    return curve, [record["loss"] for record in trainer.run().history]


def table(curves: dict[int, dict[int, dict[str, float]]], label: str = "seeds") -> str:
    """Per step: the preset's train estimate and the val loss of every run, their range, and the book's runs;
    `label` names what the runs' keys are (seeds, or dropout seeds)."""
    seeds = list(curves)
    lines = []
    for key, column, name in (("train_estimate", 0, "train loss (the preset's estimate)"), ("val", 1, "val loss")):
        lines += [f"| book step | {name}, {label} {' / '.join(map(str, seeds))} | min-max | book, notebook run | "
                  "book, printed run |", "|---:|---|---|---:|---:|"]
        for step in sorted(next(iter(curves.values()))):
            values = [curves[seed][step].get(key, curves[seed][step].get("train_first")) for seed in seeds]
            low, high = min(values), max(values)
            notebook, printed = (run[step][column] if step in run else None for run in (BOOK, PRINTED))
            inside = "" if notebook is None else (" (brackets the notebook run)" if low <= notebook <= high else " (**not**)")
            lines.append(f"| {step} | {' / '.join(f'{v:.3f}' for v in values)} | {low:.3f}-{high:.3f}{inside} | "
                         f"{'' if notebook is None else f'{notebook:.3f}'} | {'' if printed is None else printed} |")
        lines.append("")
    return "\n".join(lines)


def merged(paths: list[Path]) -> tuple[dict[int, dict[int, dict[str, float]]], str]:
    """The curves of earlier runs' --json files, by seed (one run per seed, e.g. run in parallel), and what
    their keys are."""
    curves: dict[int, dict[int, dict[str, float]]] = {}
    labels = set()
    for path in paths:
        saved = json.loads(path.read_text())
        labels.add(saved.get("label", "seeds"))
        for seed, curve in saved["curves"].items():
            curves[int(seed)] = {int(step): losses for step, losses in curve.items()}
    if len(labels) > 1:
        raise SystemExit(f"--merge: the files vary {' and '.join(sorted(labels))}; merge one kind at a time")
    return curves, labels.pop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="123,1,2", help="comma-separated seeds (default 123,1,2)")
    parser.add_argument("--dropout-seeds", help="comma-separated: train with the first of --seeds (its init and "
                        "data order) and dropout masks from a generator of their own seeded with each, as the "
                        "book's code draws them on a GPU or a Mac (sets dropout_masks fast)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a pretrain param over the preset, e.g. weight_decay_all=false (repeatable)")
    parser.add_argument("--mirror", type=Path, default=Path(os.environ.get(MIRROR_ENV) or REPO.parent / "shared" / "datasets"),
                        help="the dataset mirror with the-verdict.txt and gpt2_bpe/ (default $LLM_PIPELINE_MIRROR)")
    parser.add_argument("--json", type=Path, help="also write the curves here")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON", help="print the tables of earlier "
                        "runs' --json files together (one per seed) instead of training")
    args = parser.parse_args()
    if args.merge:
        print(table(*merged(args.merge)))
        return
    tune_malloc()
    params = book_config(args.set)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        train, val = corpus_tokens(params, args.mirror, Path(tmp))
        if args.dropout_seeds:
            label = f"dropout seeds (seed {seeds[0]})"
            runs = {k: run({**params["pretrain"], "dropout_masks": "fast", "dropout_seed": k}, seeds[0], train, val)
                    for k in map(int, args.dropout_seeds.split(","))}
        else:
            label, runs = "seeds", {seed: run(params["pretrain"], seed, train, val) for seed in seeds}
    curves = {seed: curve for seed, (curve, _) in runs.items()}
    print(f"\nbook preset{' with ' + ', '.join(args.set) if args.set else ''}; {label} {', '.join(map(str, runs))}\n")
    print(table(curves, label))
    if args.json:
        args.json.write_text(json.dumps({"set": args.set, "label": label, "curves": curves,
                                         "batch_losses": {seed: losses for seed, (_, losses) in runs.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
