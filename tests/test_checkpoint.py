"""Our safetensors + JSON checkpoints: round trip, atomicity, refusing bad files."""
import json

import pytest
import torch
from conftest import flip_last_byte

from gpt.checkpoint import CheckpointError, load_model, load_state, save_model
from gpt.model import GPTConfig, GPTModel


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("micro"))
    save_model(model, tmp_path / "ckpt", extra={"step": 7})
    loaded = load_model(tmp_path / "ckpt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded.out_head.weight is loaded.tok_emb.weight
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["extra"] == {"step": 7}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders left


def test_overwrite_replaces_whole_folder(tmp_path):
    save_model(GPTModel(GPTConfig.from_preset("micro")), tmp_path / "ckpt")
    model = GPTModel(GPTConfig.from_preset("micro"))
    save_model(model, tmp_path / "ckpt")
    assert torch.equal(load_model(tmp_path / "ckpt").tok_emb.weight, model.tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = GPTModel(GPTConfig.from_preset("micro"))
    save_model(model, tmp_path / "ckpt")
    import safetensors.torch  # gpt.checkpoint imports its writer when it writes

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="No space"):
        save_model(GPTModel(GPTConfig.from_preset("micro")), tmp_path / "ckpt")
    assert torch.equal(load_model(tmp_path / "ckpt").tok_emb.weight, model.tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: checkpoint config not found"):
        load_model(tmp_path / "nothing")


def test_other_architecture_is_refused(tmp_path):
    save_model(GPTModel(GPTConfig.from_preset("micro")), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="n_layers=2, model has 4"):
        load_state(tmp_path / "ckpt", GPTModel(GPTConfig.from_preset("micro", n_layers=4)))


def test_tampered_weights_are_refused(tmp_path):
    save_model(GPTModel(GPTConfig.from_preset("micro")), tmp_path / "ckpt")
    flip_last_byte(tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(CheckpointError, match="tampered or corrupt"):
        load_model(tmp_path / "ckpt")


def test_dropout_override_keeps_weights(tmp_path):
    model = GPTModel(GPTConfig.from_preset("micro", drop_rate=0.1))
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt", drop_rate=0.0)
    assert loaded.cfg.drop_rate == 0.0
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)
