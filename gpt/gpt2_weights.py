"""OpenAI GPT-2 weights in Hugging Face format (model.safetensors + config.json), in and out.

Hugging Face stores GPT-2's projections as Conv1D, whose weight is (in, out): the transpose
of nn.Linear's. No TensorFlow and no pickle are involved.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gpt.checkpoint import CheckpointError, save_tensors
from gpt.files import atomic_dir
from gpt.model import GPTConfig, GPTModel, pad_rows

# Our name -> (Hugging Face name, stored transposed as Conv1D)
_GLOBAL_KEYS = {
    "tok_emb.weight": ("wte.weight", False),
    "pos_emb.weight": ("wpe.weight", False),
    "final_norm.weight": ("ln_f.weight", False),
    "final_norm.bias": ("ln_f.bias", False),
}
_BLOCK_KEYS = {
    "norm1.weight": ("ln_1.weight", False),
    "norm1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True),
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.out_proj.weight": ("attn.c_proj.weight", True),
    "attn.out_proj.bias": ("attn.c_proj.bias", False),
    "norm2.weight": ("ln_2.weight", False),
    "norm2.bias": ("ln_2.bias", False),
    "ff.fc.weight": ("mlp.c_fc.weight", True),
    "ff.fc.bias": ("mlp.c_fc.bias", False),
    "ff.proj.weight": ("mlp.c_proj.weight", True),
    "ff.proj.bias": ("mlp.c_proj.bias", False),
}
_TANH_GELUS = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


def key_map(n_layers: int) -> dict[str, tuple[str, bool]]:
    """Every weight of our model mapped to its Hugging Face GPT-2 name (without 'transformer.')."""
    mapping = dict(_GLOBAL_KEYS)
    for i in range(n_layers):
        for ours, (theirs, transposed) in _BLOCK_KEYS.items():
            mapping[f"blocks.{i}.{ours}"] = (f"h.{i}.{theirs}", transposed)
    return mapping


def config_from_hf(hf: dict, drop_rate: float = 0.0) -> GPTConfig:
    """Our config for a Hugging Face GPT-2 config.json, refusing variants this model cannot express."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"config.json: model_type {hf.get('model_type')!r} is not gpt2")
    if hf.get("activation_function", "gelu_new") not in _TANH_GELUS:
        raise CheckpointError(f"config.json: activation_function {hf['activation_function']!r} is not supported")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise CheckpointError(f"config.json: layer_norm_epsilon {hf['layer_norm_epsilon']} is not 1e-5")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise CheckpointError(f"config.json: {flag}=true is not supported")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise CheckpointError(f"config.json: n_inner {hf['n_inner']} is not 4 * n_embd")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf["n_positions"],
        emb_dim=hf["n_embd"],
        n_heads=hf["n_head"],
        n_layers=hf["n_layer"],
        drop_rate=drop_rate,
        qkv_bias=True,
        tie_weights=hf.get("tie_word_embeddings", True),
    )


def load_hf_gpt2(path: str | os.PathLike, drop_rate: float = 0.0, pad_vocab_to: int = 1) -> GPTModel:
    """Build our GPTModel from a Hugging Face GPT-2 folder (model.safetensors + config.json).

    `pad_vocab_to` > 1 pads the embedding/head with zero rows (see GPTConfig.pad_vocab_to); the
    real rows are OpenAI's weights unchanged, so the logits are the same as without padding.
    """
    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: not found (a GPT-2 checkpoint needs config.json and model.safetensors)")
    cfg = replace(config_from_hf(json.loads((path / "config.json").read_text()), drop_rate), pad_vocab_to=pad_vocab_to)
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except SafetensorError as exc:
        raise CheckpointError(f"{path / 'model.safetensors'}: unreadable ({exc})") from exc
    # GPT2LMHeadModel prefixes 'transformer.'; OpenAI's hub files come from GPT2Model and do not.
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    model = GPTModel(cfg)
    state = {}
    for ours, (theirs, transposed) in key_map(cfg.n_layers).items():
        if theirs not in tensors:
            raise CheckpointError(f"{path / 'model.safetensors'}: missing tensor {theirs}")
        tensor = tensors[theirs]
        state[ours] = tensor.t().contiguous() if transposed else tensor
    if cfg.tie_weights:
        state["out_head.weight"] = state["tok_emb.weight"]
    elif "lm_head.weight" in tensors:
        state["out_head.weight"] = tensors["lm_head.weight"]
    else:
        raise CheckpointError(f"{path / 'model.safetensors'}: untied model without lm_head.weight")
    for key in ("tok_emb.weight", "out_head.weight"):
        state[key] = pad_rows(state[key], cfg.padded_vocab_size)
    model.load_state_dict(state, strict=True)
    return model


def hf_config(cfg: GPTConfig) -> dict:
    """A Hugging Face GPT-2 config.json for our config."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    }


def save_hf_gpt2(model: GPTModel, path: str | os.PathLike) -> Path:
    """Export our model in Hugging Face GPT-2 layout, loadable by `GPT2LMHeadModel.from_pretrained`.

    A model trained without q/k/v biases is exported with zero biases, which computes the same;
    a padded vocabulary is exported without its padding rows.
    """
    vocab = model.cfg.vocab_size
    ours = {k: v[:vocab] if k in ("tok_emb.weight", "out_head.weight") else v for k, v in model.state_dict().items()}
    tensors = {}
    for key, (theirs, transposed) in key_map(model.cfg.n_layers).items():
        tensor = ours.get(key)
        if tensor is None:  # attn.qkv.bias of a model without q/k/v bias
            tensor = torch.zeros(3 * model.cfg.emb_dim, dtype=ours["tok_emb.weight"].dtype)
        tensor = tensor.detach()
        tensors[f"transformer.{theirs}"] = (tensor.t() if transposed else tensor).contiguous()
    if not model.cfg.tie_weights:
        tensors["lm_head.weight"] = ours["out_head.weight"].detach().contiguous()
    with atomic_dir(path) as tmp:
        save_tensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(model.cfg), indent=2) + "\n")
    return Path(path)
