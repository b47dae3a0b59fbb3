"""Pretraining loop: AdamW, warmup + cosine schedule, clipping, accumulation, exact checkpoint resume."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gpt.atomic import atomic_dir
from gpt.checkpoint import load_state, save_model
from gpt.errors import CheckpointError, TrainingError
from gpt.data import TokenWindowDataset, create_dataloader
from gpt.model import GPTModel

TRAINER_STATE = "trainer.json"
OPTIMIZER_STATE = "optimizer.safetensors"
MODEL_DIR = "model"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings; steps count optimizer updates."""

    lr: float = 4e-4
    min_lr: float = 4e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 0
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 8
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    stride: int | None = None  # defaults to the context length (non-overlapping windows)
    eval_every: int = 50
    eval_batches: int | None = 10
    checkpoint_every: int = 0  # 0: only at the end
    seed: int = 123


@dataclass
class TrainState:
    """Everything besides weights and optimizer moments that an exact resume needs."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    history: list[dict] = field(default_factory=list)  # one entry per step: loss, lr, tokens


def pick_device(name: str = "auto") -> torch.device:
    """"auto" picks cuda, then mps, then cpu; a named device must be available."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if name not in available:
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    if not available[name]:
        raise ValueError(f"device {name!r} is not available on this machine")
    return torch.device(name)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only, not on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


def batch_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over a batch."""
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate_loss(model: GPTModel, tokens: np.ndarray, batch_size: int, max_batches: int | None = None,
                  stride: int | None = None) -> float:
    """Mean loss over the first `max_batches` windows-batches of `tokens`, in fixed order."""
    context = model.cfg.context_length
    loader = create_dataloader(tokens, batch_size, context, stride or context, shuffle=False, drop_last=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, (inputs, targets) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        total += batch_loss(model, inputs.to(device), targets.to(device)).item() * inputs.shape[0]
        count += inputs.shape[0]
    model.train(was_training)
    return total / count


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, per_param in state["state"].items()
        for name, value in per_param.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    for group in groups:
        group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


class Trainer:
    """Trains a GPTModel on flat token arrays; `run()` resumes from `checkpoint_dir` when one exists.

    `on_event(kind, payload)` receives "resume", "step", "eval" and "checkpoint" events, so callers can
    log or show progress without this loop knowing about them.
    """

    def __init__(self, model: GPTModel, train_tokens: np.ndarray, val_tokens: np.ndarray, cfg: TrainConfig,
                 checkpoint_dir: str | os.PathLike | None = None,
                 on_event: Callable[[str, dict], None] | None = None):
        self.model, self.cfg = model, cfg
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.context = model.cfg.context_length
        self.stride = cfg.stride or self.context
        self.dataset = TokenWindowDataset(train_tokens, self.context, self.stride)
        TokenWindowDataset(val_tokens, self.context, self.stride)  # fail now, not at the first eval
        self.batches_per_epoch = len(self.dataset) // cfg.batch_size
        if self.batches_per_epoch < cfg.grad_accum:
            raise TrainingError(
                f"training data gives {self.batches_per_epoch} batches of {cfg.batch_size}, "
                f"fewer than grad_accum={cfg.grad_accum}"
            )
        self.total_steps = cfg.max_steps or cfg.epochs * (self.batches_per_epoch // cfg.grad_accum)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.on_event = on_event or (lambda kind, payload: None)
        self.device = next(model.parameters()).device
        self.optimizer = make_optimizer(model, cfg)
        self.state = TrainState()

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write model, optimizer moments, RNG and loop position as one atomic folder."""
        if self.checkpoint_dir is None:
            return
        with atomic_dir(self.checkpoint_dir) as tmp:
            save_model(self.model, tmp / MODEL_DIR)
            tensors, groups = _optimizer_tensors(self.optimizer)
            tensors["rng.torch"] = torch.get_rng_state()
            if self.device.type == "cuda":
                tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
            save_file(tensors, str(tmp / OPTIMIZER_STATE))
            trainer = {"state": asdict(self.state), "train_config": asdict(self.cfg), **groups}
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer) + "\n")
        self.on_event("checkpoint", {"step": self.state.step, "path": str(self.checkpoint_dir)})

    def load_checkpoint(self) -> bool:
        """Restore from `checkpoint_dir` if it holds a checkpoint; True when resumed."""
        if self.checkpoint_dir is None or not (self.checkpoint_dir / TRAINER_STATE).is_file():
            return False
        trainer = json.loads((self.checkpoint_dir / TRAINER_STATE).read_text())
        saved_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in trainer["train_config"].items()}
        if saved_cfg != asdict(self.cfg):
            changed = sorted(k for k in saved_cfg if saved_cfg[k] != asdict(self.cfg).get(k))
            raise CheckpointError(
                f"{self.checkpoint_dir}: saved with other training settings ({', '.join(changed)}); "
                "delete it to start over"
            )
        load_state(self.checkpoint_dir / MODEL_DIR, self.model)
        tensors = load_file(str(self.checkpoint_dir / OPTIMIZER_STATE))
        torch.set_rng_state(tensors.pop("rng.torch"))
        if "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors.pop("rng.cuda"), self.device)
        _load_optimizer(self.optimizer, {k: v.to(self.device) if not k.endswith(".step") else v
                                         for k, v in tensors.items()}, trainer["param_groups"])
        self.state = TrainState(**trainer["state"])
        self.on_event("resume", {"step": self.state.step, "path": str(self.checkpoint_dir)})
        return True

    # -- the loop ------------------------------------------------------------------------------
    def _micro_batches(self):
        """Yield (inputs, targets) from the saved position onward, epoch after epoch."""
        while True:
            loader = create_dataloader(self.train_tokens, self.cfg.batch_size, self.context, self.stride,
                                       shuffle=True, drop_last=True, seed=self.cfg.seed,
                                       epoch=self.state.epoch, start_batch=self.state.batch_in_epoch)
            for inputs, targets in loader:
                self.state.batch_in_epoch += 1
                yield inputs.to(self.device), targets.to(self.device)
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def evaluate(self) -> dict[str, float]:
        args = (self.cfg.batch_size, self.cfg.eval_batches, self.stride)
        return {"train_loss": evaluate_loss(self.model, self.train_tokens, *args),
                "val_loss": evaluate_loss(self.model, self.val_tokens, *args)}

    def run(self) -> TrainState:
        """Train until total_steps; returns the final state (its history is the loss curve)."""
        resumed = self.load_checkpoint()
        if not resumed:
            torch.manual_seed(self.cfg.seed)
        self.model.train()
        batches = self._micro_batches()
        started = time.perf_counter() - self.state.elapsed_s
        while self.state.step < self.total_steps:
            lr = lr_at(self.state.step, self.total_steps, self.cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for _ in range(self.cfg.grad_accum):
                inputs, targets = next(batches)
                loss = batch_loss(self.model, inputs, targets) / self.cfg.grad_accum
                loss.backward()
                loss_sum += loss.item()
                self.state.tokens_seen += inputs.numel()
            if not math.isfinite(loss_sum):
                raise TrainingError(
                    f"non-finite training loss ({loss_sum}) at step {self.state.step + 1}; "
                    "the last checkpoint is kept — lower lr or check the data"
                )
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            self.state.elapsed_s = time.perf_counter() - started
            record = {"step": self.state.step, "loss": loss_sum, "lr": lr, "tokens_seen": self.state.tokens_seen}
            self.state.history.append(record)
            self.on_event("step", record)
            last = self.state.step == self.total_steps
            if self.cfg.eval_every and (self.state.step % self.cfg.eval_every == 0 or last):
                record.update(self.evaluate())
                self.on_event("eval", record)
            if last or (self.cfg.checkpoint_every and self.state.step % self.cfg.checkpoint_every == 0):
                self.save_checkpoint()
        return self.state
