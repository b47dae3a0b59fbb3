"""Our own model checkpoints: a folder with model.safetensors and config.json, no pickle."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from gpt.errors import CheckpointError
from gpt.files import atomic_dir, sha256_file

if TYPE_CHECKING:
    # torch is imported where weights are read or written: reading a config (the registry, `review`,
    # `promote`) must not pay seconds of torch's import.
    import torch

    from gpt.model import GPTModel

FORMAT = "llm-pipeline-gpt/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def weights_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's tensors, with a tied output head stored once (as the token embedding)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_weights:
        state.pop("out_head.weight")
    return state


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' save_file, raising a failed write (a full disk) as the OSError it is.

    safetensors reports I/O errors as SafetensorError with the errno only in its text; as an
    OSError, atomic_dir names the output and the stages report it in one line.
    """
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc


def save_model(model: GPTModel, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write `path/model.safetensors` and `path/config.json` atomically; return `path`.

    config.json holds the architecture, the weights' sha256 (so tampering is detected on
    load) and `extra`, any JSON-serialisable metadata the caller wants to keep with it.
    """
    with atomic_dir(path) as tmp:
        save_tensors(weights_state_dict(model), tmp / WEIGHTS, metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "model": model.cfg.to_dict(),
            "weights_sha256": sha256_file(tmp / WEIGHTS),
            "extra": extra or {},
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)


def read_config(path: str | os.PathLike) -> dict:
    """The parsed config.json of a checkpoint folder, checked for our format."""
    config_path = Path(path) / CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: checkpoint config not found")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: not an {FORMAT} checkpoint")
    return config


def load_state(path: str | os.PathLike, model: GPTModel) -> None:
    """Load a checkpoint's weights into an existing model, refusing another architecture."""
    from safetensors.torch import load_file

    from gpt.model import GPTConfig

    path = Path(path)
    config = read_config(path)
    saved = GPTConfig.from_dict(config["model"])
    for field in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_weights"):
        if getattr(saved, field) != getattr(model.cfg, field):
            raise CheckpointError(
                f"{path}: checkpoint has {field}={getattr(saved, field)}, model has {getattr(model.cfg, field)}"
            )
    weights_path = path / WEIGHTS
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: checkpoint weights not found")
    if sha256_file(weights_path) != config.get("weights_sha256"):
        raise CheckpointError(f"{weights_path}: sha256 does not match config.json (tampered or corrupt)")
    try:
        state = load_file(str(weights_path))
    except SafetensorError as exc:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({exc})") from exc
    expected = weights_state_dict(model)
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path}: keys do not fit the model (missing: {sorted(missing)[:3]}, unexpected: {sorted(unexpected)[:3]})"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{weights_path}: {key} has shape {tuple(tensor.shape)}, model expects {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False)  # strict=False only because a tied head is stored once


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", **config_overrides) -> GPTModel:
    """Build a model from a checkpoint folder's config and load its weights.

    `config_overrides` may change fields that do not affect the weights (drop_rate, use_sdpa).
    """
    from gpt.model import GPTConfig, GPTModel

    config = read_config(path)
    cfg = GPTConfig.from_dict({**config["model"], **config_overrides})
    model = GPTModel(cfg)
    load_state(path, model)
    return model.to(device)
