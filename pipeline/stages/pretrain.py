"""Stage `pretrain`: train the GPT on the tokenized corpus, with resumable checkpoints and a loss curve."""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import fields
from pathlib import Path

import mlflow
import torch
from tqdm import tqdm

from gpt import distributed
from gpt.checkpoint import save_model
from gpt.data import load_tokens
from gpt.files import atomic_write_json, sha256_file
from gpt.generate import generate_text
from gpt.model import PRESETS, GPTConfig, GPTModel, count_parameters
from gpt.runtime import make_deterministic, pick_device, tune_malloc
from gpt.tokenizer import load_tokenizer
from gpt.train import EXECUTION_SETTINGS, Trainer, TrainConfig, TrainState
from pipeline.core.catalog import STAGES, command_line
from pipeline.core.layout import BASE_MODEL_DIR, BPE_DIR, DATA, PLOTS, PRETRAIN_TOKENS, SAMPLES
from pipeline.core.params import DEVICE, Bool, Int, Section, Str, config_specs, load_params
from pipeline.registry.tracking import LOGGING_PARAMS, log_history, log_path, project_tracking, stage_run
from pipeline.registry.versions import DIGEST_TAG, KERNELS_FACT, register_trained
from pipeline.training.plots import plot_curves, write_rows

STAGE = STAGES["pretrain"]
CHECKPOINTS = DATA / "checkpoints" / "pretrain"
SAMPLES_FILE = SAMPLES / "pretrain.json"
# Model sizes as a preset name, with these fields of GPTConfig that params may set (null sizes keep the preset's).
MODEL_FIELDS = ("context_length", "emb_dim", "n_layers", "n_heads", "drop_rate", "qkv_bias", "tie_weights", "init")
PRESET_SIZES = ("emb_dim", "n_layers", "n_heads")
# Every TrainConfig field is a param of the same name; their types and ranges come from the dataclasses.
PARAMS = {
    "pretrain": Section(
        model=Str(choices=tuple(PRESETS)),
        **{name: spec for name, spec in config_specs(GPTConfig, optional=PRESET_SIZES).items() if name in MODEL_FIELDS},
        **config_specs(TrainConfig),
        sample_every=Int(low=0),  # steps between greedy samples from sample_prompt (0: none)
        sample_prompt=Str(),
        sample_tokens=Int(low=1),
        device=DEVICE,
        pad_vocab=Bool(),  # GPTConfig.pad_vocab_to: 64 when true, else 1
        deterministic=Bool(),  # see gpt.runtime.make_deterministic
    ),
    **LOGGING_PARAMS,
}


def model_config(cfg: dict) -> GPTConfig:
    """The preset named by `model`, with context length, dropout, biases and any explicit sizes applied."""
    chosen = {name: cfg[name] for name in MODEL_FIELDS if not (name in PRESET_SIZES and cfg[name] is None)}
    try:
        return GPTConfig.from_preset(cfg["model"], pad_vocab_to=64 if cfg["pad_vocab"] else 1, **chosen)
    except ValueError as exc:
        raise ValueError(f"params.yaml: pretrain: {exc}") from None


def train_config(cfg: dict) -> TrainConfig:
    return TrainConfig(**{spec.name: cfg[spec.name] for spec in fields(TrainConfig)})


# Params that change how a run executes, not what it computes: a checkpoint resumes under any values.
RUN_SETTINGS = ("device", "deterministic", *EXECUTION_SETTINGS)


def run_digest(cfg: dict, data_hashes: dict[str, str]) -> str:
    """Identifies a training run: same params and data resume the same checkpoint folder."""
    keyed = {k: v for k, v in cfg.items() if k not in RUN_SETTINGS}
    blob = json.dumps({"params": keyed, "data": data_hashes}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Progress:
    """The trainer's events on rank 0: a progress bar, evaluations, and greedy samples every `sample_every` steps."""

    def __init__(self, trainer: Trainer, cfg: dict):
        self.cfg, self.model, self.samples = cfg, trainer.model, []
        self.tokenizer = load_tokenizer(BPE_DIR)
        self.bar = tqdm(total=trainer.total_steps, desc="pretrain", unit="step", disable=not trainer.is_main)

    def __call__(self, kind: str, record: dict) -> None:
        cfg, bar = self.cfg, self.bar
        if kind == "resume":
            bar.write(f"resuming from the checkpoint at step {record['step']} ({record['path']})")
        elif kind == "step":
            bar.n = record["step"]
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", refresh=True)
            if cfg["sample_every"] and record["step"] % cfg["sample_every"] == 0:
                text = generate_text(self.model, self.tokenizer, cfg["sample_prompt"], cfg["sample_tokens"])
                self.samples.append({"step": record["step"], "prompt": cfg["sample_prompt"], "text": text})
                bar.write(f"step {record['step']}: {cfg['sample_prompt']}{text!r}")
        elif kind == "eval":
            bar.write(f"step {record['step']}: train loss {record['train_loss']:.3f}, val loss {record['val_loss']:.3f}")


def run_metrics(trainer: Trainer, state: TrainState) -> dict:
    """The numbers of a finished run, for the stage's report and the registered version."""
    final = state.history[-1]
    return {
        "train_loss": final.get("train_loss"),
        "val_loss": final.get("val_loss"),
        "last_batch_loss": final["loss"],
        "steps": state.step,
        "epochs": round(state.step * trainer.cfg.grad_accum / trainer.batches_per_epoch, 3),
        "tokens_seen": state.tokens_seen,
        "wall_time_s": round(state.elapsed_s, 2),
        "tokens_per_s": round(state.tokens_seen / max(state.elapsed_s, 1e-9), 1),
        "parameters": count_parameters(trainer.model),
        "device": trainer.device.type,
        "processes": trainer.world_size,
    }


def write_curves(history: list[dict]) -> None:
    """The loss curve and the evaluations (CSV for `dvc plots`, one PNG)."""
    evals = [h for h in history if "val_loss" in h]
    write_rows(PLOTS / "pretrain_loss.csv", history, ("step", "loss", "lr", "tokens_seen"))
    write_rows(PLOTS / "pretrain_eval.csv", evals, ("step", "tokens_seen", "train_loss", "val_loss"))
    plot_curves(PLOTS / "pretrain_loss.png", "Pretraining loss", history, evals)


def main(params_path: Path) -> None:
    params = load_params(params_path, PARAMS)
    tracking = project_tracking(params_path)
    cfg = params["pretrain"]
    if cfg["deterministic"]:
        make_deterministic()  # before the first matmul, which is when MKL reads its settings
    tune_malloc()  # reuse freed logits memory instead of page-faulting it in every step (same results)
    # Under `torchrun --nproc_per_node=N -m pipeline.stages.pretrain` this joins the DDP group (gloo on CPU,
    # nccl on cuda:LOCAL_RANK); rank 0 alone writes outputs, logs and checkpoints.
    device = distributed.setup(pick_device(cfg["device"]))
    train_tokens, val_tokens = load_tokens(PRETRAIN_TOKENS / "train.bin"), load_tokens(PRETRAIN_TOKENS / "val.bin")
    data_hashes = {name: sha256_file(PRETRAIN_TOKENS / name) for name in ("train.bin", "val.bin")}
    checkpoint_dir = CHECKPOINTS / run_digest(cfg, data_hashes)
    torch.manual_seed(cfg["seed"])
    model = GPTModel(model_config(cfg)).to(device)
    trainer = Trainer(model, train_tokens, val_tokens, train_config(cfg), checkpoint_dir)
    progress = trainer.on_event = Progress(trainer, cfg)  # the trainer calls it on rank 0 only
    if not trainer.is_main:
        trainer.run()  # the other ranks train their shares; rank 0 writes everything
        return
    sizes = {"train.bin": f"{len(train_tokens)} tokens", "val.bin": f"{len(val_tokens)} tokens"}
    with stage_run("pretrain", cfg, data_hashes, tracking, sizes):
        try:
            state = trainer.run()
        finally:
            progress.bar.close()
        metrics = run_metrics(trainer, state)
        save_model(model, BASE_MODEL_DIR, extra={"stage": "pretrain", "metrics": metrics, "data": data_hashes,
                                                 "sizes": sizes})
        write_curves(state.history)
        atomic_write_json(SAMPLES_FILE, progress.samples)
        log_history(state.history)
        for path in (PLOTS / "pretrain_loss.png", PLOTS / "pretrain_loss.csv", SAMPLES_FILE):
            log_path(path)
        # Whether the C++ kernels ran is a fact of this run, not of the model: the report, the run's params and
        # the version's tags (its model card) hold it; the model folder's config.json does not.
        facts = {KERNELS_FACT: trainer.cpu_kernels}
        mlflow.log_params(facts)
        version = register_trained(STAGE, tracking, facts)
        STAGE.write_results({**metrics, **facts, DIGEST_TAG: version.tags[DIGEST_TAG]})
    # Checkpoints of other params or data can never be resumed by this run. Dropped only now, so
    # a failed run with new params keeps the resume point of the old ones.
    for stale in CHECKPOINTS.glob("*"):
        if stale != checkpoint_dir:
            shutil.rmtree(stale, ignore_errors=True)


if __name__ == "__main__":
    try:
        command_line("pretrain", main)
    finally:
        distributed.shutdown()
