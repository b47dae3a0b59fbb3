"""Stage `finetune_instruct`: finetune a base GPT on instructions, score its test responses, register `gpt-instruct`."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from gpt.checkpoint import save_model
from gpt.files import atomic_write_json, sha256_file
from gpt.finetune import select_trainable
from gpt.generate import BATCH_SIZE
from gpt.instruct import Example, device_loss, encode_example, make_batches, mean_loss, respond_all, rouge_l_f1, token_f1
from gpt.model import count_parameters
from gpt.runtime import pick_device
from gpt.tokenizer import load_tokenizer
from pipeline.core.catalog import STAGES, command_line
from pipeline.core.errors import DataError
from pipeline.core.layout import BPE_DIR, INSTRUCT_MODEL_DIR as MODEL_DIR, INSTRUCTION_TOKENS as SPLITS, PLOTS
from pipeline.core.params import Bool, Int, Section, load_params
from pipeline.registry.policy import standard_error
from pipeline.registry.tracking import LOGGING_PARAMS, log_history, log_path, project_tracking, stage_run
from pipeline.registry.versions import DIGEST_TAG, register_trained
from pipeline.training import judge
from pipeline.training.finetuning import COMMON_PARAMS, base_hash, load_base, report_trainable, train
from pipeline.training.plots import plot_curves, write_rows

STAGE = STAGES["finetune_instruct"]
RESPONSES_FILE = STAGE.model.samples.path
FIELDS = ("instruction", "input", "output")
PARAMS = {
    "finetune_instruct": Section(
        **COMMON_PARAMS,
        max_length=Int(low=2),
        mask_prompt=Bool(),
        max_new_tokens=Int(low=1),
        max_test_examples=Int(low=1, optional=True),
        judge=judge.JUDGE_SECTION,
    ),
    **LOGGING_PARAMS,
}


def read_split(name: str) -> list[dict]:
    """data/tokens/instruct/<name>.json: a list of records whose instruction, input and output are strings."""
    path = SPLITS / f"{name}.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; run the tokenize stage first")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: must be a non-empty list of records")
    for row, record in enumerate(records):
        if not isinstance(record, dict) or not all(isinstance(record.get(key), str) for key in FIELDS):
            raise DataError(f"{path}: record {row} needs string fields {', '.join(FIELDS)}")
    return records


def encode(tokenizer, records: list[dict]) -> list[Example]:
    """Token ids and prompt lengths of a split's records."""
    return [encode_example(tokenizer, r["instruction"], r["input"], r["output"]) for r in records]


def generate_responses(model, tokenizer, records: list[dict], max_new_tokens: int) -> list[dict]:
    """Greedy responses to `records`, each with its ROUGE-L and token F1 against the reference output."""
    responses: list[str] = []
    with tqdm(total=len(records), desc="responses", unit="example") as progress:
        for first in range(0, len(records), BATCH_SIZE):
            batch = records[first : first + BATCH_SIZE]
            responses += respond_all(model, tokenizer, [(r["instruction"], r["input"]) for r in batch], max_new_tokens)
            progress.update(len(batch))
    return [{"instruction": record["instruction"], "input": record["input"], "reference": record["output"],
             "response": response, "rouge_l_f1": rouge_l_f1(record["output"], response),
             "token_f1": token_f1(record["output"], response)} for record, response in zip(records, responses)]


def judge_responses(cfg: dict, responses: list[dict]) -> dict:
    """Add the judge's score to each response; return the mean over those it could score."""
    for item in tqdm(responses, desc="judge", unit="example"):
        item["judge_score"] = judge.score(cfg, item["instruction"], item["input"], item["reference"], item["response"])
    scores = [item["judge_score"] for item in responses if item["judge_score"] is not None]
    return {"judge_score": sum(scores) / len(scores) if scores else None, "judge_scored": len(scores)}


def finetune(model, examples: dict[str, list[Example]], val_batches: list, cfg: dict, batching: dict) -> list[dict]:
    """Train on the train split (shuffled per epoch), scoring train and val at each evaluation; fit()'s history."""
    train_eval = make_batches(examples["train"], **batching)[: cfg["eval_batches"]]

    def epoch_batches(epoch: int) -> list:
        return make_batches(examples["train"], **batching, shuffle=True, seed=cfg["seed"] + epoch, drop_last=True)

    def evaluate() -> dict[str, float]:
        return {"train_loss": mean_loss(model, train_eval), "val_loss": mean_loss(model, val_batches)}

    return train(model, cfg, "finetune_instruct", epoch_batches, device_loss, evaluate,
                 cfg["epochs"] * (len(examples["train"]) // cfg["batch_size"]),
                 lambda r: f"train loss {r['train_loss']:.3f}, val loss {r['val_loss']:.3f}")


def response_scores(model, tokenizer, records: dict[str, list[dict]], cfg: dict) -> tuple[list[dict], dict]:
    """(the greedy test responses with their scores; the mean ROUGE-L F1 of the val and test responses with
    their standard errors (promote's noise), the test token F1 and judge score, and the generation time)."""
    model.eval()
    started = time.perf_counter()
    val, test = (generate_responses(model, tokenizer, records[split][: cfg["max_test_examples"]], cfg["max_new_tokens"])
                 for split in ("val", "test"))
    generation_s = time.perf_counter() - started
    judged = judge_responses(cfg["judge"], test) if cfg["judge"]["enabled"] else {}
    scores = {}
    for prefix, responses in (("val_", val), ("", test)):
        rouge = [r["rouge_l_f1"] for r in responses]
        scores.update({f"{prefix}rouge_l_f1": sum(rouge) / len(rouge), f"{prefix}rouge_l_f1_se": standard_error(rouge)})
    return test, {
        **scores,
        "token_f1": sum(r["token_f1"] for r in test) / len(test),
        "responses_scored": len(test),
        "test_examples": len(records["test"]),
        **judged,
        "generation_wall_time_s": round(generation_s, 2),
    }


def write_curves(history: list[dict]) -> None:
    """The loss curve with its evaluations (CSV for `dvc plots`, one PNG)."""
    write_rows(PLOTS / "instruct_loss.csv", history, ("step", "epoch", "loss", "examples_seen", "train_loss", "val_loss"))
    plot_curves(PLOTS / "instruct_loss.png", "Instruction finetuning loss", history,
                [h for h in history if "val_loss" in h])


def main(params_path: Path) -> None:
    params = load_params(params_path, PARAMS)
    tracking = project_tracking(params_path)
    cfg = params["finetune_instruct"]
    if cfg["judge"]["enabled"]:
        judge.check_reachable(cfg["judge"]["url"], cfg["judge"]["timeout_s"])
    device = pick_device(cfg["device"])
    records = {name: read_split(name) for name in ("train", "val", "test")}
    tokenizer = load_tokenizer(BPE_DIR)
    data_hashes = {**{f"{name}.json": sha256_file(SPLITS / f"{name}.json") for name in records},
                   "base": base_hash(cfg["base"])}

    torch.manual_seed(cfg["seed"])  # LoRA's adapter init draws from it
    model = load_base(cfg["base"], cfg["drop_rate"]).to(device)
    # Positions beyond the base's context do not exist, so longer examples are cut to it.
    max_length = min(cfg["max_length"], model.cfg.context_length)
    select_trainable(model, cfg["trainable"], cfg["n_blocks"], cfg["lora_rank"], cfg["lora_alpha"])
    trainable = report_trainable(model, cfg["trainable"])
    examples = {name: encode(tokenizer, split) for name, split in records.items()}
    batching = {"batch_size": cfg["batch_size"], "max_length": max_length, "mask_prompt": cfg["mask_prompt"]}
    if len(examples["train"]) < cfg["batch_size"]:
        raise DataError(f"{SPLITS / 'train.json'}: {len(examples['train'])} records, fewer than "
                        f"finetune_instruct.batch_size={cfg['batch_size']}")
    val_batches = make_batches(examples["val"], **batching)
    val_loss_before = mean_loss(model, val_batches)
    sizes = {f"{name}.json": f"{len(split)} examples" for name, split in records.items()}
    with stage_run("finetune_instruct", cfg, data_hashes, tracking, sizes):
        history = finetune(model, examples, val_batches, cfg, batching)
        responses, scores = response_scores(model, tokenizer, records, cfg)
        evals = [h for h in history if "val_loss" in h]
        metrics = {
            "base": cfg["base"], "trainable": cfg["trainable"], "trainable_parameters": trainable,
            "parameters": count_parameters(model), "max_length": max_length, "val_loss_before": val_loss_before,
            "train_loss": evals[-1]["train_loss"], "val_loss": evals[-1]["val_loss"],
            "test_loss": mean_loss(model, make_batches(examples["test"], **batching)),
            **scores, "steps": history[-1]["step"], "train_wall_time_s": round(history[-1]["elapsed_s"], 2),
            "device": device.type,
        }
        save_model(model, MODEL_DIR, extra={"stage": "finetune_instruct", "base": cfg["base"], "data": data_hashes,
                                            "sizes": sizes, "metrics": metrics})
        atomic_write_json(RESPONSES_FILE, responses)
        write_curves(history)
        log_history(history)
        for path in (RESPONSES_FILE, PLOTS / "instruct_loss.csv", PLOTS / "instruct_loss.png"):
            log_path(path)
        # The base's sha256 reaches the version with the run's data tags; `champion` is the promote stage's.
        version = register_trained(STAGE, tracking)
        STAGE.write_results({**metrics, DIGEST_TAG: version.tags[DIGEST_TAG]})


if __name__ == "__main__":
    command_line("finetune_instruct", main)
