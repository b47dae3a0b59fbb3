"""Stage `evaluate`: validation loss and perplexity of the pretrained model, plus generations for fixed prompts."""
from __future__ import annotations

import math
import time
from pathlib import Path

import mlflow
import torch

from gpt.checkpoint import load_model
from gpt.data import load_tokens
from gpt.files import atomic_write_json, sha256_file
from gpt.generate import generate_text
from gpt.runtime import pick_device
from gpt.tokenizer import load_tokenizer
from gpt.train import evaluate_loss, window_losses
from pipeline.core.catalog import STAGES, command_line
from pipeline.core.layout import BPE_DIR, PRETRAIN_TOKENS
from pipeline.core.params import DEVICE, Float, Int, List, Section, Str, load_params
from pipeline.registry.policy import standard_error
from pipeline.registry.tracking import (LOGGING_PARAMS, log_path, log_step_metrics, model_names, project_tracking,
                                       stage_run, tag_model_version)
from pipeline.registry.versions import DIGEST_TAG, evaluation_tags, find_version, output_digest

STAGE = STAGES["evaluate"]
MODEL = STAGES[STAGE.evaluates].model  # the model this stage measures
SAMPLES_FILE = MODEL.samples.path
PARAMS = {
    "evaluate": Section(
        batch_size=Int(low=1),
        max_batches=Int(low=1, optional=True),
        prompts=List(Str(), min_items=1),
        max_new_tokens=Int(low=1),
        temperature=Float(0, 10, bounds="(]"),
        top_k=Int(low=1, optional=True),
        top_p=Float(0, 1, bounds="(]", optional=True),
        seed=Int(low=0),
        device=DEVICE,
    ),
    **LOGGING_PARAMS,
}


def val_scores(model, tokens, batch_size: int, max_batches: int | None) -> dict[str, float]:
    """The mean loss over the windows of `tokens`, its standard error (promote's noise) and the tokens/s."""
    start = time.perf_counter()
    losses = window_losses(model, tokens, batch_size, max_batches)
    return {"val_loss": sum(losses) / len(losses), "val_loss_se": standard_error(losses),
            "eval_tokens_per_s": round(len(losses) * model.cfg.context_length / (time.perf_counter() - start), 1)}


def main(params_path: Path) -> None:
    params = load_params(params_path, PARAMS)
    tracking = project_tracking(params_path)
    cfg = params["evaluate"]
    device = pick_device(cfg["device"])
    model = load_model(MODEL.folder, device, drop_rate=0.0).eval()
    tokenizer = load_tokenizer(BPE_DIR)
    digest = output_digest(MODEL.folder)  # what a registered version of this model is tagged with
    # The run opens before any output is written: an unreachable tracking server leaves the old ones.
    with stage_run(STAGE.name, cfg, {"val.bin": sha256_file(PRETRAIN_TOKENS / "val.bin")}, tracking):
        val = val_scores(model, load_tokens(PRETRAIN_TOKENS / "val.bin"), cfg["batch_size"], cfg["max_batches"])
        train_loss = evaluate_loss(model, load_tokens(PRETRAIN_TOKENS / "train.bin"), cfg["batch_size"],
                                   cfg["max_batches"])

        generator = torch.Generator(device=device).manual_seed(cfg["seed"])
        samples = []
        start, new_tokens = time.perf_counter(), 0
        for prompt in cfg["prompts"]:
            greedy = generate_text(model, tokenizer, prompt, cfg["max_new_tokens"])
            sampled = generate_text(model, tokenizer, prompt, cfg["max_new_tokens"], temperature=cfg["temperature"],
                                    top_k=cfg["top_k"], top_p=cfg["top_p"], generator=generator)
            new_tokens += len(tokenizer.encode(greedy, allowed_special="all"))
            new_tokens += len(tokenizer.encode(sampled, allowed_special="all"))
            samples.append({"prompt": prompt, "greedy": greedy, "sampled": sampled})
        metrics = {
            **val,
            "val_perplexity": math.exp(val["val_loss"]),
            "train_loss": train_loss,
            "generation_tokens_per_s": round(new_tokens / (time.perf_counter() - start), 1),
        }
        for sample in samples:
            print(f"--- {sample['prompt']!r}\n greedy:  {sample['greedy']!r}\n sampled: {sample['sampled']!r}")
        atomic_write_json(SAMPLES_FILE, samples)
        log_step_metrics(metrics, step=0)
        log_path(SAMPLES_FILE)
        # The registry entry of the evaluated model carries its evaluation, for review. A registry that lost
        # it gets it back, with these tags from this stage's report, from promote (pipeline.registry.versions).
        name = model_names(tracking)[MODEL.role]
        version = find_version(mlflow.MlflowClient(), name, digest)
        if version is not None:
            tag_model_version(name, version.version, evaluation_tags(metrics))
    STAGE.write_results({**metrics, DIGEST_TAG: digest})


if __name__ == "__main__":
    command_line("evaluate", main)
