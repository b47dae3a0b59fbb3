"""What the finetuning stages share: the base model, their common params, and training with progress."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from tqdm import tqdm

from gpt.checkpoint import load_model
from gpt.files import sha256_file
from gpt.finetune import TRAINABLE, FinetuneConfig, fit
from gpt.gpt2_weights import load_hf_gpt2
from gpt.lora import merge_lora
from gpt.model import GPTModel, count_parameters
from gpt.runtime import tune_malloc
from pipeline.core.errors import DataError
from pipeline.core.layout import BASE_MODEL_DIR, RAW
from pipeline.core.params import DEVICE, Float, Int, Str, config_specs

OPENAI_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
BASE = Str(choices=("pipeline", *OPENAI_MODELS))
# FinetuneConfig's fields that params set (AdamW's betas and fused_adamw keep their defaults).
SETTINGS = ("lr", "min_lr", "warmup_steps", "weight_decay", "epochs", "grad_clip", "eval_every", "seed")
# Params every finetuning stage has; a stage adds its own next to them in its Section.
COMMON_PARAMS = dict(
    base=BASE,
    drop_rate=Float(0, 1, bounds="[)"),
    trainable=Str(choices=TRAINABLE),
    n_blocks=Int(low=1),
    lora_rank=Int(low=1),
    lora_alpha=Float(low=0, bounds="(]"),
    batch_size=Int(low=1),
    eval_batches=Int(low=1, optional=True),
    device=DEVICE,
    **{name: spec for name, spec in config_specs(FinetuneConfig).items() if name in SETTINGS},
)


def base_dir(name: str) -> Path:
    """Where the weights of base `name` live (data/models/base or data/raw/hf/<name>)."""
    return BASE_MODEL_DIR if name == "pipeline" else RAW / "hf" / name


def load_base(name: str, drop_rate: float = 0.0) -> GPTModel:
    """Load base `name` with the given dropout; a clear error when its weights are absent."""
    folder = base_dir(name)
    if name == "pipeline":
        if not folder.is_dir():
            raise DataError(f"{folder} is missing; run the pretrain stage first")
        return load_model(folder, drop_rate=drop_rate)
    if not (folder / "model.safetensors").is_file():
        raise DataError(f"OpenAI weights {name} are not in {folder}; add {name} to download.hf_weights.models "
                        "and rerun the download stage (it needs the network or a mirror holding them)")
    return load_hf_gpt2(folder, drop_rate=drop_rate)


def base_hash(name: str) -> str:
    """sha256 of the base weights, for lineage tags."""
    return sha256_file(base_dir(name) / "model.safetensors")


def report_trainable(model: GPTModel, mode: str) -> int:
    """Print and return how many parameters train (LoRA trains a small fraction)."""
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    print(f"trainable parameters ({mode}): {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    return trainable


def settings(cfg: dict) -> FinetuneConfig:
    """The optimisation settings of a checked finetuning params section."""
    return FinetuneConfig(**{name: cfg[name] for name in SETTINGS})


def train(model: GPTModel, cfg: dict, stage: str, batches: Callable, loss_fn: Callable, evaluate: Callable,
          total_steps: int, describe_eval: Callable[[dict], str]) -> list[dict]:
    """fit() with a progress bar that prints each evaluation; LoRA adapters are merged afterwards,
    so what is saved is a plain model. Returns fit()'s per-step history."""
    tune_malloc()  # reuse freed logits memory instead of page-faulting it in every step (same results)
    bar = tqdm(total=total_steps, desc=stage, unit="step")

    def on_event(kind: str, record: dict) -> None:
        if kind == "step":
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        elif kind == "eval":
            bar.write(f"step {record['step']}: {describe_eval(record)}")

    try:
        history = fit(model, batches, loss_fn, settings(cfg), evaluate, on_event)
    finally:
        bar.close()
    if cfg["trainable"] == "lora":
        merge_lora(model)
    return history
