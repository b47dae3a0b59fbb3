"""Stage `pretrain`: train the GPT on the tokenized corpus, with resumable checkpoints and a loss curve."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from gpt import distributed
from gpt.checkpoint import save_model
from gpt.data import load_tokens
from gpt.files import atomic_write_json, sha256_file
from gpt.generate import generate_text
from gpt.model import INITS, PRESETS, GPTConfig, GPTModel, count_parameters
from gpt.tokenizer import load_tokenizer
from gpt.train import (EXECUTION_SETTINGS, PRECISIONS, Trainer, TrainConfig, make_deterministic, pick_device,
                       tune_malloc)
from pipeline.layout import BASE_MODEL_DIR, BPE_DIR, DATA, PLOTS, PRETRAIN_TOKENS, SAMPLES
from pipeline.params import CONTEXT_LENGTH, DEVICE, Bool, Float, Int, Section, Str, load_params
from pipeline.plots import plot_curves, write_rows
from pipeline.stages import STAGES, command_line
from pipeline.tracking import MLFLOW_SECTION, log_gpt_model, log_history, log_path, stage_run

STAGE = STAGES["pretrain"]
CHECKPOINTS = DATA / "checkpoints" / "pretrain"
SAMPLES_FILE = SAMPLES / "pretrain.json"
PARAMS = {
    "pretrain": Section(
        model=Str(choices=tuple(PRESETS)),
        context_length=CONTEXT_LENGTH,
        emb_dim=Int(low=1, optional=True),
        n_layers=Int(low=1, optional=True),
        n_heads=Int(low=1, optional=True),
        drop_rate=Float(0, 1, bounds="[)"),
        qkv_bias=Bool(),
        tie_weights=Bool(),
        init=Str(choices=INITS),
        batch_size=Int(low=1),
        epochs=Int(low=1),
        max_steps=Int(low=1, optional=True),
        lr=Float(0, 1, bounds="(]"),
        min_lr=Float(0, 1),
        beta1=Float(0, 1, bounds="[)"),
        beta2=Float(0, 1, bounds="[)"),
        weight_decay=Float(0, 1),
        warmup_steps=Int(low=0),
        grad_clip=Float(low=0, bounds="(]", optional=True),
        grad_accum=Int(low=1),
        stride=Int(low=1, optional=True),
        eval_every=Int(low=0),
        eval_batches=Int(low=1, optional=True),
        sample_every=Int(low=0),
        sample_prompt=Str(),
        sample_tokens=Int(low=1),
        checkpoint_every=Int(low=0),
        seed=Int(low=0),
        device=DEVICE,
        compile=Bool(),
        precision=Str(choices=PRECISIONS),
        fused_adamw=Bool(optional=True),
        pad_vocab=Bool(),
        deterministic=Bool(),
    ),
    "mlflow": MLFLOW_SECTION,
}


def model_config(cfg: dict) -> GPTConfig:
    """The preset named by `model`, with context length, dropout, biases and any explicit sizes applied."""
    sizes = {k: cfg[k] for k in ("emb_dim", "n_layers", "n_heads") if cfg[k] is not None}
    try:
        return GPTConfig.from_preset(cfg["model"], context_length=cfg["context_length"], drop_rate=cfg["drop_rate"],
                                     qkv_bias=cfg["qkv_bias"], tie_weights=cfg["tie_weights"], init=cfg["init"],
                                     pad_vocab_to=64 if cfg["pad_vocab"] else 1, **sizes)
    except ValueError as exc:
        raise ValueError(f"params.yaml: pretrain: {exc}") from None


def train_config(cfg: dict) -> TrainConfig:
    return TrainConfig(
        lr=cfg["lr"], min_lr=cfg["min_lr"], betas=(cfg["beta1"], cfg["beta2"]), weight_decay=cfg["weight_decay"],
        warmup_steps=cfg["warmup_steps"], epochs=cfg["epochs"], max_steps=cfg["max_steps"],
        batch_size=cfg["batch_size"], grad_accum=cfg["grad_accum"], grad_clip=cfg["grad_clip"],
        stride=cfg["stride"], eval_every=cfg["eval_every"], eval_batches=cfg["eval_batches"],
        checkpoint_every=cfg["checkpoint_every"], seed=cfg["seed"],
        compile=cfg["compile"], precision=cfg["precision"], fused_adamw=cfg["fused_adamw"],
    )


def run_digest(cfg: dict, data_hashes: dict[str, str]) -> str:
    """Identifies a training run: same params and data resume the same checkpoint folder."""
    keyed = {k: v for k, v in cfg.items() if k not in ("device", "deterministic") and k not in EXECUTION_SETTINGS}
    blob = json.dumps({"params": keyed, "data": data_hashes}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def main(params_path: Path) -> None:
    params = load_params(params_path, PARAMS)
    cfg = params["pretrain"]
    if cfg["deterministic"]:
        make_deterministic()  # before the first matmul, which is when MKL reads its settings
    tune_malloc()  # reuse freed logits memory instead of page-faulting it in every step (same results)
    # Under `torchrun --nproc_per_node=N -m pipeline.stages.pretrain` this joins the DDP group (gloo on CPU,
    # nccl on cuda:LOCAL_RANK); rank 0 alone writes outputs, logs and checkpoints.
    device = distributed.setup(pick_device(cfg["device"]))
    main_rank = distributed.is_main()
    train_tokens, val_tokens = load_tokens(PRETRAIN_TOKENS / "train.bin"), load_tokens(PRETRAIN_TOKENS / "val.bin")
    data_hashes = {name: sha256_file(PRETRAIN_TOKENS / name) for name in ("train.bin", "val.bin")}
    checkpoint_dir = CHECKPOINTS / run_digest(cfg, data_hashes)
    torch.manual_seed(cfg["seed"])
    model = GPTModel(model_config(cfg)).to(device)
    tokenizer = load_tokenizer(BPE_DIR)
    samples: list[dict] = []
    trainer = Trainer(model, train_tokens, val_tokens, train_config(cfg), checkpoint_dir)
    bar = tqdm(total=trainer.total_steps, desc="pretrain", unit="step", disable=not main_rank)

    def on_event(kind: str, record: dict) -> None:
        if kind == "resume":
            bar.write(f"resuming from the checkpoint at step {record['step']} ({record['path']})")
        elif kind == "step":
            bar.n = record["step"]
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", refresh=True)
            if cfg["sample_every"] and record["step"] % cfg["sample_every"] == 0:
                text = generate_text(model, tokenizer, cfg["sample_prompt"], cfg["sample_tokens"])
                samples.append({"step": record["step"], "prompt": cfg["sample_prompt"], "text": text})
                bar.write(f"step {record['step']}: {cfg['sample_prompt']}{text!r}")
        elif kind == "eval":
            bar.write(f"step {record['step']}: train loss {record['train_loss']:.3f}, val loss {record['val_loss']:.3f}")

    trainer.on_event = on_event  # the trainer calls it on rank 0 only
    if not main_rank:
        trainer.run()  # the other ranks train their shares; rank 0 writes everything
        return
    with stage_run("pretrain", cfg, data_hashes, params["mlflow"]):
        try:
            state = trainer.run()
        finally:
            bar.close()
        history = state.history
        final = history[-1]
        metrics = {
            "train_loss": final.get("train_loss"),
            "val_loss": final.get("val_loss"),
            "last_batch_loss": final["loss"],
            "steps": state.step,
            "epochs": round(state.step * trainer.cfg.grad_accum / trainer.batches_per_epoch, 3),
            "tokens_seen": state.tokens_seen,
            "wall_time_s": round(state.elapsed_s, 2),
            "tokens_per_s": round(state.tokens_seen / max(state.elapsed_s, 1e-9), 1),
            "parameters": count_parameters(model),
            "device": device.type,
            "processes": trainer.world_size,
        }
        save_model(model, BASE_MODEL_DIR, extra={"stage": "pretrain", "metrics": metrics, "data": data_hashes})
        write_rows(PLOTS / "pretrain_loss.csv", history, ("step", "loss", "lr", "tokens_seen"))
        evals = [h for h in history if "val_loss" in h]
        write_rows(PLOTS / "pretrain_eval.csv", evals, ("step", "tokens_seen", "train_loss", "val_loss"))
        plot_curves(PLOTS / "pretrain_loss.png", "Pretraining loss", history, evals)
        atomic_write_json(SAMPLES_FILE, samples)
        log_history(history)
        for path in (PLOTS / "pretrain_loss.png", PLOTS / "pretrain_loss.csv", SAMPLES_FILE):
            log_path(path)
        version = log_gpt_model(BASE_MODEL_DIR, BPE_DIR, STAGE.model.name, metrics=metrics)
        metrics["registered_version"] = int(version.version)
        atomic_write_json(STAGE.metrics, metrics)
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
