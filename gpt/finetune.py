"""A small finetuning loop shared by the classification and instruction heads: choose what trains, then fit."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch
from torch import nn

from gpt.errors import TrainingError
from gpt.fields import bounded, check_fields
from gpt.lora import apply_lora
from gpt.model import GPTModel
from gpt.train import lr_at, make_optimizer

TRAINABLE = ("all", "last_blocks", "lora")


@dataclass(frozen=True)
class FinetuneConfig:
    """Optimisation settings; `eval_every` counts optimizer steps (0: once per epoch).

    The learning rate warms up linearly over `warmup_steps` (0: none), then stays at `lr` when
    `min_lr` is None (the book) or decays along a cosine to `min_lr` at the last step.
    """

    lr: float = bounded(5e-5, low=0, high=1, bounds="(]")
    min_lr: float | None = bounded(None, low=0, high=1)
    warmup_steps: int = bounded(0, low=0)
    weight_decay: float = bounded(0.1, low=0, high=1)
    epochs: int = bounded(5, low=1)
    grad_clip: float | None = bounded(None, low=0, bounds="(]")
    eval_every: int = bounded(50, low=0)
    seed: int = bounded(123, low=0)
    beta1: float = bounded(0.9, low=0, high=1, bounds="[)")  # AdamW's defaults, as the book uses
    beta2: float = bounded(0.999, low=0, high=1, bounds="[)")
    fused_adamw: bool | None = None  # see gpt.train.TrainConfig
    weight_decay_all: bool = False  # see gpt.train.TrainConfig

    def __post_init__(self):
        check_fields(self)


def select_trainable(model: GPTModel, mode: str, n_blocks: int = 1, lora_rank: int = 8, lora_alpha: float = 16.0,
                     always: Iterable[nn.Module] = ()) -> None:
    """Freeze the model except what `mode` trains; modules in `always` (a new head) always train.

    all: every parameter. last_blocks: the last `n_blocks` transformer blocks and the final
    norm (the book's choice for classification with n_blocks=1). lora: rank-`lora_rank`
    adapters on every block's linear layers, base weights frozen.
    """
    if mode not in TRAINABLE:
        raise ValueError(f"unknown trainable mode {mode!r}; choose one of {', '.join(TRAINABLE)}")
    if mode == "lora":
        apply_lora(model, lora_rank, lora_alpha)
    else:
        if mode == "last_blocks" and not 1 <= n_blocks <= len(model.blocks):
            raise ValueError(f"n_blocks must be in [1, {len(model.blocks)}], got {n_blocks}")
        train_all = mode == "all"
        for param in model.parameters():
            param.requires_grad = train_all
        if not train_all:
            for module in [*model.blocks[-n_blocks:], model.final_norm]:
                for param in module.parameters():
                    param.requires_grad = True
    for module in always:
        for param in module.parameters():
            param.requires_grad = True


def fit(
    model: nn.Module,
    batches: Callable[[int], Iterable],
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    cfg: FinetuneConfig,
    evaluate: Callable[[], dict[str, float]] | None = None,
    on_event: Callable[[str, dict], None] | None = None,
) -> list[dict]:
    """Train with AdamW for cfg.epochs; `batches(epoch)` yields one epoch's batches, `loss_fn(model,
    batch)` gives a scalar loss. Returns one record per step, with `evaluate()`'s results added
    every cfg.eval_every steps and at the end of each epoch."""
    on_event = on_event or (lambda kind, payload: None)
    optimizer = make_optimizer(model, cfg)
    schedule = replace(cfg, min_lr=cfg.lr if cfg.min_lr is None else cfg.min_lr)
    torch.manual_seed(cfg.seed)
    history: list[dict] = []
    step, started, seen = 0, time.perf_counter(), 0
    model.train()
    for epoch in range(cfg.epochs):
        batch_list = list(batches(epoch))
        total_steps = len(batch_list) * cfg.epochs  # every epoch has as many batches as this one
        for index, batch in enumerate(batch_list):
            lr = lr_at(step, total_steps, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = loss_fn(model, batch)
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingError(f"non-finite finetuning loss ({value}) at step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            optimizer.step()
            step += 1
            seen += len(batch[0])
            record = {"step": step, "epoch": epoch + 1, "loss": value, "lr": lr,
                      "examples_seen": seen,
                      "elapsed_s": time.perf_counter() - started}
            history.append(record)
            on_event("step", record)
            end_of_epoch = index == len(batch_list) - 1
            if evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or end_of_epoch):
                model.eval()
                with torch.no_grad():
                    record.update(evaluate())
                model.train()
                on_event("eval", record)
    return history
