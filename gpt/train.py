"""Pretraining loop: AdamW, warmup + cosine schedule, clipping, accumulation, exact checkpoint resume."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gpt import distributed
from gpt.checkpoint import load_state, save_model, save_tensors
from gpt.cpu_kernels import use_cpu_kernels
from gpt.data import TokenWindowDataset, create_dataloader
from gpt.dropout import use_masks
from gpt.errors import CheckpointError, TrainingError, first_line
from gpt.fields import bounded, check_fields
from gpt.files import atomic_dir, sha256_file
from gpt.loss import IGNORE_INDEX, token_losses
from gpt.model import GPTModel
from gpt.native import build_failure
from gpt.runtime import PRECISIONS, autocast_dtype
# Import shim: the serving code of model versions registered before gpt.runtime existed imports it from here.
from gpt.runtime import pick_device  # noqa: F401

RANDOM_STREAMS = ("seeded", "book")
DROPOUT_MASKS = ("fast", "torch")
TRAINER_STATE = "trainer.json"
OPTIMIZER_STATE = "optimizer.safetensors"
MODEL_DIR = "model"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings; steps count optimizer updates."""

    lr: float = bounded(4e-4, low=0, high=1, bounds="(]")
    min_lr: float = bounded(4e-5, low=0, high=1)
    beta1: float = bounded(0.9, low=0, high=1, bounds="[)")  # AdamW's betas
    beta2: float = bounded(0.95, low=0, high=1, bounds="[)")
    weight_decay: float = bounded(0.1, low=0, high=1)
    weight_decay_all: bool = False  # decay biases and norm weights too, as the book's AdamW(model.parameters()) does
    warmup_steps: int = bounded(0, low=0)
    epochs: int = bounded(1, low=1)
    max_steps: int | None = bounded(None, low=1)  # overrides epochs when set
    batch_size: int = bounded(8, low=1)
    grad_accum: int = bounded(1, low=1)
    grad_clip: float | None = bounded(1.0, low=0, bounds="(]")
    stride: int | None = bounded(None, low=1)  # defaults to the context length (non-overlapping windows)
    eval_every: int = bounded(50, low=0)
    eval_batches: int | None = bounded(10, low=1)
    checkpoint_every: int = bounded(0, low=0)  # 0: only at the end
    seed: int = bounded(123, low=0)
    # "seeded": training reseeds the global generator with seed, each epoch's order is a permutation seeded
    # by seed + epoch, and evaluations use the first eval_batches batches in order, drawing nothing.
    # "book": the generator is used as the book's training loop (one process) uses it, from where the
    # caller left it (the book seeds, builds the model, trains): each epoch and each train estimate is a
    # new DataLoader(shuffle=True) iterator (two draws, then its permutation), each val estimate a new
    # unshuffled one (one draw), and evaluations come after update 1, 1 + eval_every, 1 + 2 * eval_every...
    random_stream: str = bounded("seeded", choices=RANDOM_STREAMS)
    dropout_masks: str = bounded("fast", choices=DROPOUT_MASKS)  # gpt.dropout's, or nn.Dropout's ("torch")
    # None: dropout masks come from the generator everything else draws from. A seed: gpt.dropout's masks
    # from a generator of their own (seed + rank), so they draw nothing from the global one, as the book's
    # code does on a GPU or a Mac (MPS), whose dropout uses the device's generator while the init and the
    # data order come from the CPU's.
    dropout_seed: int | None = bounded(None, low=0)
    # Speed settings (see EXECUTION_SETTINGS): a checkpoint resumes under other values of these.
    compile: bool = False  # torch.compile the model for training; falls back to eager if that fails
    precision: str = bounded("auto", choices=PRECISIONS)  # autocast dtype of forward + loss
    fused_adamw: bool | None = None  # None: fused on CPU and CUDA (False: the multi-tensor path, as plain AdamW)
    # GELU, dropout, the attention's softmax + dropout and the loss's exp in C++ kernels where they apply (CPU,
    # fp32; gpt.cpu_kernels), built on first use; their dropout masks are other masks of the same distribution.
    # False: PyTorch's ops and gpt.dropout's masks.
    cpu_kernels: bool = True

    def __post_init__(self):
        check_fields(self)
        if self.dropout_seed is not None and self.dropout_masks == "torch":
            raise ValueError("dropout_seed draws gpt.dropout's masks from a generator of their own; dropout_masks"
                             " torch draws nn.Dropout's from the global one: set dropout_masks fast or dropout_seed"
                             " null")


EXECUTION_SETTINGS = ("compile", "precision", "fused_adamw", "cpu_kernels")


@dataclass
class TrainState:
    """Everything besides weights and optimizer moments that an exact resume needs."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    history: list[dict] = field(default_factory=list)  # one entry per step: loss, lr, tokens
    order_seed: int | None = None  # random_stream book: the seed of the current epoch's permutation


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only, not on biases and norms (on every
    parameter with cfg.weight_decay_all)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2 or cfg.weight_decay_all], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2 and not cfg.weight_decay_all], "weight_decay": 0.0},
    ]
    # Fused: one kernel per step, several times faster on CPU than the multi-tensor path (docs/benchmarks.md);
    # its update differs from that path's in the last bits only.
    fused = cfg.fused_adamw if cfg.fused_adamw is not None else next(model.parameters()).device.type in ("cpu", "cuda")
    # Unfused: the multi-tensor (foreach) path, which computes exactly what the per-tensor default does.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused, foreach=None if fused else True)


def batch_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over a batch (targets equal to gpt.loss.IGNORE_INDEX count for nothing).
    In full precision the model fuses its head with the loss (gpt.loss); under autocast the loss is taken
    from the logits, as autocast's own cross-entropy runs it."""
    if torch.is_autocast_enabled(inputs.device.type):
        return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    return model(inputs, targets=targets)


@torch.no_grad()
def window_losses(model: GPTModel, tokens: np.ndarray, batch_size: int, max_batches: int | None = None,
                  stride: int | None = None, rank: int = 0, world_size: int = 1,
                  order_seed: int | None = None) -> list[float]:
    """The mean loss of each context-length window of `tokens` (every `stride` tokens, default a context
    apart; in order, or shuffled by a permutation seeded with `order_seed`) over the first `max_batches`
    batches; with `world_size` > 1, of this rank's rows rank::world_size of each batch. The losses come
    from gpt.loss.token_losses: no batch's logits are made."""
    context = model.cfg.context_length
    loader = create_dataloader(tokens, batch_size, context, stride or context, shuffle=order_seed is not None,
                               drop_last=False, order_seed=order_seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses: list[float] = []
    for i, (inputs, targets) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        inputs, targets = inputs[rank::world_size].to(device), targets[rank::world_size].to(device)
        if len(inputs):
            per_target = token_losses(model.hidden_states(inputs), model.head_weight, targets)
            losses += (per_target.sum(1) / (targets != IGNORE_INDEX).sum(1)).tolist()
    model.train(was_training)
    return losses


def loader_draws(shuffled: bool) -> int | None:
    """Draw from the global generator what a new torch DataLoader iterator draws: a base seed (for workers)
    and, for a shuffled one (RandomSampler), the seed of its permutation, which is returned."""
    torch.empty((), dtype=torch.int64).random_()
    return int(torch.empty((), dtype=torch.int64).random_().item()) if shuffled else None


def evaluate_loss(model: GPTModel, tokens: np.ndarray, batch_size: int, max_batches: int | None = None,
                  stride: int | None = None, rank: int = 0, world_size: int = 1,
                  order_seed: int | None = None) -> float:
    """Mean loss over the windows of window_losses (same arguments).

    With `world_size` > 1 every rank must call this: the sums and counts of the ranks' windows are
    all-reduced, so every rank gets the one-process mean.
    """
    losses = window_losses(model, tokens, batch_size, max_batches, stride, rank, world_size, order_seed)
    total, count = sum(losses), len(losses)
    if world_size > 1:
        total, count = distributed.all_reduce_sum([total, count])
    return total / count


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, per_param in state["state"].items()
        for name, value in per_param.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def _read_trainer_state(folder: Path) -> dict:
    """trainer.json of a checkpoint folder, after checking it parses and that the optimizer file it
    lists is the one written with it (a CheckpointError naming the bad file otherwise)."""
    path = folder / TRAINER_STATE
    try:
        trainer = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); delete the folder to start over") from None
    required = ("state", "train_config", "param_groups", "optimizer_sha256")
    if not isinstance(trainer, dict) or any(key not in trainer for key in required):
        raise CheckpointError(f"{path}: needs the keys {', '.join(required)}; delete the folder to start over")
    expected = trainer["optimizer_sha256"]
    optimizer = folder / OPTIMIZER_STATE
    if not optimizer.is_file() or sha256_file(optimizer) != expected:
        raise CheckpointError(f"{optimizer}: missing or its sha256 does not match {TRAINER_STATE} "
                              "(tampered or corrupt); delete the folder to start over")
    return trainer


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

    Under torchrun, after gpt.distributed.setup(), it trains data-parallel (DDP): every rank takes
    its batch_size / world_size rows of each global batch, gradients and the logged loss are
    averaged over ranks, so the loss curve is the one-process curve for the same batch_size. Only
    rank 0 writes checkpoints and receives events; every rank keeps the same state and history.
    Dropout masks differ per rank (each rank seeds seed + rank), as in any DDP run.
    """

    def __init__(self, model: GPTModel, train_tokens: np.ndarray, val_tokens: np.ndarray, cfg: TrainConfig,
                 checkpoint_dir: str | os.PathLike | None = None,
                 on_event: Callable[[str, dict], None] | None = None):
        self.model, self.cfg = model, cfg
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        if cfg.batch_size % self.world_size:  # the sampler checks too; this fails before any work is done
            raise TrainingError(f"batch_size {cfg.batch_size} must be divisible by the number of processes "
                                f"({self.world_size}): each takes an equal share of every batch")
        if cfg.random_stream == "book" and self.world_size > 1:
            raise TrainingError("random_stream book follows one process's training loop; use seeded for "
                                "data-parallel training")
        self.device = next(model.parameters()).device
        self.mask_generator = None if cfg.dropout_seed is None else \
            torch.Generator(self.device).manual_seed(cfg.dropout_seed + self.rank)
        use_masks(model, torch_masks=cfg.dropout_masks == "torch", generator=self.mask_generator)
        wanted = cfg.cpu_kernels and self.device.type == "cpu"  # not built where they cannot apply
        # Whether the C++ kernels run in this training: "on", "off", or "unavailable (why)" where they were asked
        # for but could not be built. A fact of the run, for its report; not of the model.
        if use_cpu_kernels(model, wanted):
            self.cpu_kernels = "on"
        else:
            self.cpu_kernels = f"unavailable ({build_failure('train_ops')})" if wanted else "off"
        self.is_main = distributed.is_main()
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
        self.autocast_dtype = autocast_dtype(cfg.precision, self.device)
        self.optimizer = make_optimizer(model, cfg)
        self.train_model = distributed.wrap(model, self.device)  # DDP under torchrun, else `model`
        self.state = TrainState()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _compile(self) -> None:
        """Swap in torch.compile of the training model, tried on one dummy forward + backward
        (compilers fail at the first call, not at torch.compile); on failure warn and stay eager."""
        if getattr(self.train_model, "_orig_mod", None) is not None:
            return  # already compiled
        rows = self.cfg.batch_size // self.world_size
        dummy = torch.zeros(rows, self.context, dtype=torch.long, device=self.device)
        was_training = self.model.training
        self.model.train()
        try:
            compiled = torch.compile(self.train_model)
            with self._autocast():
                loss = batch_loss(compiled, dummy, dummy)
            loss.backward()
        except Exception as exc:  # no C++ compiler, unsupported platform or op, ...
            print(f"warning: torch.compile failed ({type(exc).__name__}: {first_line(exc)}); training without it",
                  file=sys.stderr)
        else:
            self.train_model = compiled
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.train(was_training)

    def _emit(self, kind: str, payload: dict) -> None:
        if self.is_main:
            self.on_event(kind, payload)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write model, optimizer moments, RNG and loop position as one atomic folder."""
        if self.checkpoint_dir is None:
            return
        # Each rank's RNG state goes to rank 0, which alone writes (rank r > 0 as rng.*.rank<r>).
        ranks_rng = distributed.gather_to_main(self._rng_state()) if self.world_size > 1 else None
        if not self.is_main:
            return
        with atomic_dir(self.checkpoint_dir) as tmp:
            save_model(self.model, tmp / MODEL_DIR)
            tensors, groups = _optimizer_tensors(self.optimizer)
            tensors.update(self._rng_state())
            for r, states in enumerate(ranks_rng or ()):
                if r:
                    tensors.update({f"{key}.rank{r}": value for key, value in states.items()})
            save_tensors(tensors, tmp / OPTIMIZER_STATE)
            trainer = {"state": asdict(self.state), "train_config": asdict(self.cfg),
                       "optimizer_sha256": sha256_file(tmp / OPTIMIZER_STATE), **groups}
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer) + "\n")
        self._emit("checkpoint", {"step": self.state.step, "path": str(self.checkpoint_dir)})

    def _rng_state(self) -> dict[str, torch.Tensor]:
        states = {"rng.torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        if self.mask_generator is not None:
            states["rng.dropout"] = self.mask_generator.get_state()
        return states

    def load_checkpoint(self) -> bool:
        """Restore from `checkpoint_dir` if it holds a checkpoint; True when resumed."""
        if self.checkpoint_dir is None or not (self.checkpoint_dir / TRAINER_STATE).is_file():
            return False
        trainer = _read_trainer_state(self.checkpoint_dir)
        # Speed settings may change between runs; a key older checkpoints lack has its default.
        saved = dict(trainer["train_config"])
        if "betas" in saved:  # checkpoints before beta1/beta2 were fields of their own
            saved["beta1"], saved["beta2"] = saved.pop("betas")
        saved_cfg = {k: v for k, v in {**asdict(TrainConfig()), **saved}.items() if k not in EXECUTION_SETTINGS}
        current_cfg = {k: v for k, v in asdict(self.cfg).items() if k not in EXECUTION_SETTINGS}
        if saved_cfg != current_cfg:
            changed = sorted(k for k in saved_cfg if saved_cfg[k] != current_cfg.get(k))
            raise CheckpointError(
                f"{self.checkpoint_dir}: saved with other training settings ({', '.join(changed)}); "
                "delete it to start over"
            )
        load_state(self.checkpoint_dir / MODEL_DIR, self.model)
        tensors = load_file(str(self.checkpoint_dir / OPTIMIZER_STATE))  # its sha256 was checked above
        rng = {key: tensors.pop(key) for key in [k for k in tensors if k.startswith("rng.")]}
        # A rank missing from the checkpoint (saved by fewer processes) continues rank 0's stream.
        own = f".rank{self.rank}" if self.rank and f"rng.torch.rank{self.rank}" in rng else ""
        torch.set_rng_state(rng[f"rng.torch{own}"])
        if f"rng.cuda{own}" in rng:
            torch.cuda.set_rng_state(rng[f"rng.cuda{own}"], self.device)
        if self.mask_generator is not None:
            self.mask_generator.set_state(rng[f"rng.dropout{own}"])
        _load_optimizer(self.optimizer, {k: v.to(self.device) if not k.endswith(".step") else v
                                         for k, v in tensors.items()}, trainer["param_groups"])
        self.state = TrainState(**trainer["state"])
        self._emit("resume", {"step": self.state.step, "path": str(self.checkpoint_dir)})
        return True

    # -- the loop ------------------------------------------------------------------------------
    def _micro_batches(self):
        """Yield (inputs, targets) from the saved position onward, epoch after epoch."""
        while True:
            if self.cfg.random_stream == "book" and self.state.batch_in_epoch == 0:
                self.state.order_seed = loader_draws(shuffled=True)
            loader = create_dataloader(self.train_tokens, self.cfg.batch_size, self.context, self.stride,
                                       shuffle=True, drop_last=True, seed=self.cfg.seed,
                                       epoch=self.state.epoch, start_batch=self.state.batch_in_epoch,
                                       rank=self.rank, world_size=self.world_size,
                                       order_seed=self.state.order_seed)
            for inputs, targets in loader:
                self.state.batch_in_epoch += 1
                yield inputs.to(self.device), targets.to(self.device)
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def evaluate(self) -> dict[str, float]:
        args = (self.cfg.batch_size, self.cfg.eval_batches, self.stride)
        shard = {"rank": self.rank, "world_size": self.world_size}
        book = self.cfg.random_stream == "book"  # the book's estimates: new loader iterators, train shuffled
        train = evaluate_loss(self.model, self.train_tokens, *args, **shard,
                              order_seed=loader_draws(shuffled=True) if book else None)
        if book:
            loader_draws(shuffled=False)
        return {"train_loss": train, "val_loss": evaluate_loss(self.model, self.val_tokens, *args, **shard)}

    def _evaluation_due(self) -> bool:
        step, every = self.state.step, self.cfg.eval_every
        if not every:
            return False
        # The book counts its first update as step 0 and evaluates at multiples of eval_every from there.
        due = (step - 1) % every == 0 if self.cfg.random_stream == "book" else step % every == 0
        return due or step == self.total_steps

    def run(self) -> TrainState:
        """Train until total_steps; returns the final state (its history is the loss curve)."""
        if self.cfg.compile:
            self._compile()  # before seeding: its trial step must not shift the RNG streams
        resumed = self.load_checkpoint()
        if not resumed and self.cfg.random_stream == "seeded":
            torch.manual_seed(self.cfg.seed + self.rank)
        self.model.train()
        batches = self._micro_batches()
        started = time.perf_counter() - self.state.elapsed_s
        while self.state.step < self.total_steps:
            lr = lr_at(self.state.step, self.total_steps, self.cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(self.cfg.grad_accum):
                inputs, targets = next(batches)
                # Under DDP gradients are averaged over ranks once, on the last micro-batch.
                with distributed.grad_sync(self.train_model, micro == self.cfg.grad_accum - 1):
                    with self._autocast():
                        loss = batch_loss(self.train_model, inputs, targets) / self.cfg.grad_accum
                    loss.backward()
                loss_sum += loss.item()
                self.state.tokens_seen += inputs.numel() * self.world_size
            if self.world_size > 1:
                loss_sum = distributed.all_reduce_mean(loss_sum)  # the global batch's loss, same on every rank
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
            self._emit("step", record)
            last = self.state.step == self.total_steps
            if self._evaluation_due():
                record.update(self.evaluate())
                self._emit("eval", record)
            if last or (self.cfg.checkpoint_every and self.state.step % self.cfg.checkpoint_every == 0):
                self.save_checkpoint()
        return self.state
