"""Training loop: learning, schedule, exact resume, non-finite loss."""
import numpy as np
import pytest
import torch

from gpt.checkpoint import CheckpointError
from gpt.model import GPTConfig, GPTModel
from gpt.train import Trainer, TrainConfig, TrainingError, lr_at


def tokens(n=3000, seed=0):
    # A learnable stream: a short repeating pattern with a little noise.
    rng = np.random.default_rng(seed)
    base = np.tile(np.arange(50, 80), n // 30 + 1)[:n]
    noise = rng.random(n) < 0.05
    return np.where(noise, rng.integers(0, 100, n), base).astype(np.uint16)


def new_model(seed=1):
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.from_preset("micro", vocab_size=128, context_length=16, drop_rate=0.1))


CFG = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=8, batch_size=4, grad_accum=2,
                  eval_every=4, eval_batches=2, checkpoint_every=3, seed=5)


class Crash(Exception):
    pass


def test_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    lrs = [lr_at(s, 20, cfg) for s in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[20] == pytest.approx(0.1)


def test_training_lowers_validation_loss():
    model = new_model()
    trainer = Trainer(model, tokens(), tokens(600, seed=9), TrainConfig(lr=3e-3, max_steps=30, batch_size=8,
                                                                       eval_every=30, eval_batches=4))
    before = trainer.evaluate()["val_loss"]
    state = trainer.run()
    assert state.history[-1]["val_loss"] < before - 1.0
    assert state.tokens_seen == 30 * 8 * 16


def test_resume_after_crash_is_exact(tmp_path):
    train, val = tokens(), tokens(600, seed=9)
    full = Trainer(new_model(), train, val, CFG, tmp_path / "full").run()
    reference = {k: v.clone() for k, v in full_model_state(tmp_path / "full").items()}

    def crash_at_3(kind, payload):
        if kind == "checkpoint" and payload["step"] == 3:
            raise Crash
    with pytest.raises(Crash):
        Trainer(new_model(), train, val, CFG, tmp_path / "resumed", on_event=crash_at_3).run()
    # A fresh process would build a fresh model (other init seed: the checkpoint must win).
    resumed = Trainer(new_model(seed=99), train, val, CFG, tmp_path / "resumed").run()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert resumed.history[-1]["val_loss"] == full.history[-1]["val_loss"]
    for key, value in full_model_state(tmp_path / "resumed").items():
        assert torch.equal(value, reference[key]), key


def full_model_state(checkpoint_dir):
    from gpt.checkpoint import load_model
    return load_model(checkpoint_dir / "model").state_dict()


def test_resume_with_other_settings_is_refused(tmp_path):
    train, val = tokens(), tokens(600, seed=9)
    Trainer(new_model(), train, val, CFG, tmp_path / "ckpt").run()
    other = TrainConfig(**{**CFG.__dict__, "lr": 1e-3})
    with pytest.raises(CheckpointError, match=r"other training settings \(lr\)"):
        Trainer(new_model(), train, val, other, tmp_path / "ckpt").run()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    train, val = tokens(), tokens(600, seed=9)
    model = new_model()

    def poison(kind, payload):
        if kind == "checkpoint" and payload["step"] == 3:
            with torch.no_grad():
                model.final_norm.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="non-finite training loss .* at step 4"):
        Trainer(model, train, val, CFG, tmp_path / "ckpt", on_event=poison).run()
    assert torch.isfinite(full_model_state(tmp_path / "ckpt")["final_norm.weight"]).all()


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="shorter than one window"):
        Trainer(new_model(), tokens(10), tokens(600), CFG)
