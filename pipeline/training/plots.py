"""Plot data for DVC (CSV rows) and PNG pictures of training curves."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # stages run headless
import matplotlib.pyplot as plt  # noqa: E402

from gpt.files import atomic_write_bytes, atomic_write_text  # noqa: E402


def write_rows(path: Path, rows: Iterable[dict], columns: Sequence[str]) -> None:
    """Write the given columns of `rows` as CSV (DVC plots read it), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Save a figure as PNG, atomically, then close it."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_curves(path: Path, title: str, steps: list[dict], evals: list[dict]) -> None:
    """Per-step training loss with the periodic train/val evaluations, against steps and tokens."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="0.75", lw=1, label="batch loss")
    for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
        ax.plot([r["step"] for r in evals], [r[key] for r in evals], style, ms=3, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if steps and steps[-1].get("tokens_seen"):
        per_step = steps[-1]["tokens_seen"] / steps[-1]["step"]
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("tokens seen")
    save_figure(fig, path)


def plot_confusion(path: Path, title: str, confusion: list[list[int]], labels: Sequence[str]) -> None:
    """A confusion matrix as an annotated heat map: true class down, predicted class across.

    The figure grows with the number of classes so each cell keeps room for its count; long labels are
    shortened and the predicted ones slanted, so 10 classes stay legible.
    """
    n = len(labels)
    side = max(3.2, 0.55 * n + 1.6)
    fig, ax = plt.subplots(figsize=(side + 0.4, side))
    ax.imshow(confusion, cmap="Blues")
    peak = max(map(max, confusion)) or 1
    size = 10 if n <= 5 else 8
    for row, counts in enumerate(confusion):
        for col, count in enumerate(counts):
            ax.text(col, row, str(count), ha="center", va="center", fontsize=size,
                    color="white" if count > peak / 2 else "black")
    names = [label if len(label) <= 16 else label[:15] + "\u2026" for label in labels]
    slanted = n > 3 or any(len(name) > 6 for name in names)
    ax.set_xticks(range(n), names, rotation=45 if slanted else 0, ha="right" if slanted else "center",
                  rotation_mode="anchor")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    save_figure(fig, path)
