"""The base model a finetuning stage starts from: this pipeline's `gpt-base`, or OpenAI GPT-2 weights."""
from __future__ import annotations

from pathlib import Path

from gpt.checkpoint import load_model
from gpt.fetch import sha256_file
from gpt.gpt2_weights import load_hf_gpt2
from gpt.model import GPTModel
from pipeline.common import RAW, DataError
from pipeline.params import Str
from pipeline.pretrain import MODEL_DIR

OPENAI_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
BASE = Str(choices=("pipeline", *OPENAI_MODELS))


def base_dir(name: str) -> Path:
    """Where the weights of base `name` live (data/models/base or data/raw/hf/<name>)."""
    return MODEL_DIR if name == "pipeline" else RAW / "hf" / name


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
