"""Training loop: learning, schedule, exact resume, non-finite loss."""
import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gpt.checkpoint import CheckpointError
from gpt.data import TokenWindowDataset
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


def crash_at_3(kind, payload):
    """An on_event hook that stops training like a killed process, right after step 3's checkpoint."""
    if kind == "checkpoint" and payload["step"] == 3:
        raise Crash


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


# -- speed settings: compile, precision, fused AdamW ----------------------------------------------
SHORT = TrainConfig(lr=3e-3, max_steps=3, batch_size=4, eval_every=0, seed=5)


def losses(cfg, model_seed=1):
    return [h["loss"] for h in Trainer(new_model(model_seed), tokens(), tokens(600, seed=9), cfg).run().history]


class _FailsWhenCalled(torch.nn.Module):
    """What torch.compile returns where the compiler is missing: it fails at the first call."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        raise RuntimeError("C++ compiler not found\nmore details")


@pytest.mark.parametrize("failure", ["at_compile", "at_first_call"])
def test_compile_failure_warns_once_and_trains_eagerly(monkeypatch, capsys, failure):
    from dataclasses import replace

    eager = losses(SHORT)
    capsys.readouterr()

    def broken_compile(module, *args, **kwargs):
        if failure == "at_compile":
            raise RuntimeError("torch.compile is not supported on this platform")
        return _FailsWhenCalled(module)
    monkeypatch.setattr(torch, "compile", broken_compile)
    compiled = losses(replace(SHORT, compile=True))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: torch.compile failed (RuntimeError: ")
    assert lines[0].endswith("; training without it")
    assert compiled == eager  # the trial step ran before seeding: the eager run is the plain one


def test_precision_is_checked_and_resolved():
    from dataclasses import replace

    from gpt.runtime import autocast_dtype

    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        Trainer(new_model(), tokens(), tokens(600, seed=9), replace(SHORT, precision="fp16"))
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert losses(replace(SHORT, precision="fp32")) == losses(replace(SHORT, precision="auto"))  # auto: fp32 on CPU
    bf16 = losses(replace(SHORT, precision="bf16"))  # allowed on CPU when asked for
    assert all(np.isfinite(bf16)) and bf16 != losses(SHORT)


def test_precision_param_is_validated(tmp_path):
    import shutil

    from conftest import REPO, set_param
    from pipeline.core.params import ParamsError, load_params
    from pipeline.stages.pretrain import PARAMS, model_config, train_config

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    cfg = load_params(tmp_path / "params.yaml", PARAMS)["pretrain"]
    assert train_config(cfg).precision == "auto" and not train_config(cfg).compile
    assert model_config(cfg).pad_vocab_to == 1
    assert model_config({**cfg, "pad_vocab": True}).pad_vocab_to == 64
    set_param(tmp_path, "pretrain.precision", "fp16")
    with pytest.raises(ParamsError, match="pretrain.precision must be one of auto, fp32, bf16, got 'fp16'"):
        load_params(tmp_path / "params.yaml", PARAMS)


def test_resume_accepts_other_speed_settings(tmp_path):
    from dataclasses import replace

    train, val = tokens(), tokens(600, seed=9)
    full = Trainer(new_model(), train, val, CFG, tmp_path / "full").run()

    with pytest.raises(Crash):
        Trainer(new_model(), train, val, CFG, tmp_path / "resumed", on_event=crash_at_3).run()
    other = replace(CFG, precision="fp32", fused_adamw=True)  # the defaults on CPU, spelt out
    resumed = Trainer(new_model(seed=99), train, val, other, tmp_path / "resumed").run()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_the_optimizer_computes_what_plain_adamw_does():
    """fused_adamw false: exactly torch's plain per-tensor AdamW; the default (fused): the same update to
    float rounding."""
    from dataclasses import replace

    from gpt.train import make_optimizer

    def trained(cfg, plain=False):
        model = new_model()
        optimizer = make_optimizer(model, cfg)
        if plain:  # torch's own CPU default: one tensor at a time
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)
        x = torch.from_numpy(tokens(64).astype(np.int64)).view(4, 16)
        for _ in range(3):
            torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
            optimizer.step()
            optimizer.zero_grad()
        return optimizer, model.state_dict()

    fused, fused_state = trained(SHORT)
    multi_tensor, multi_tensor_state = trained(replace(SHORT, fused_adamw=False))
    _, plain_state = trained(SHORT, plain=True)
    assert fused.param_groups[0]["fused"] is True and multi_tensor.param_groups[0]["foreach"] is True
    assert all(torch.equal(multi_tensor_state[k], plain_state[k]) for k in plain_state)
    for k in plain_state:
        torch.testing.assert_close(fused_state[k], plain_state[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(fused_state[k], plain_state[k]) for k in plain_state)  # it is another kernel


def test_weight_decay_all_decays_biases_and_norms_as_the_book_does():
    from dataclasses import replace

    from gpt.train import make_optimizer

    model = new_model()
    vectors = {id(p) for p in model.parameters() if p.dim() < 2}  # biases and norm weights
    for decay_all in (False, True):
        optimizer = make_optimizer(model, replace(SHORT, weight_decay=0.1, weight_decay_all=decay_all))
        decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
        assert len(decayed) + len(vectors) * (not decay_all) == len(list(model.parameters()))
        assert bool(decayed & vectors) == decay_all


def test_tune_malloc_applies_on_glibc():
    import platform
    import subprocess
    import sys

    # In a child process: it changes the allocator of the whole process.
    result = subprocess.run([sys.executable, "-c", "from gpt.runtime import tune_malloc; print(tune_malloc())"],
                            capture_output=True, text=True, check=True)
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert result.stdout.strip() == str(glibc)


BOOK_ORDER = TrainConfig(**{**CFG.__dict__, "random_stream": "book", "dropout_masks": "torch"})


def test_the_book_stream_orders_as_the_dataloader_and_resumes_exactly(tmp_path):
    """random_stream book yields, epoch after epoch, the batches of torch's DataLoader(shuffle=True)
    over the same windows from the same global generator state; and a run that crashes resumes it exactly
    (here across epoch ends: 400 tokens are 6 batches an epoch, 8 steps of 2 take 16)."""
    train, val = tokens(400), tokens(600, seed=9)
    trainer = Trainer(new_model(), train, val, BOOK_ORDER)
    torch.manual_seed(7)
    ours = [inputs for inputs, _ in itertools.islice(trainer._micro_batches(), 12)]
    torch.manual_seed(7)
    loader = DataLoader(TokenWindowDataset(train, 16, 16), batch_size=4, shuffle=True, drop_last=True)
    theirs = [inputs for _ in range(2) for inputs, _ in loader]
    assert len(theirs) == 12 and all(torch.equal(a, b) for a, b in zip(ours, theirs))

    full = Trainer(new_model(), train, val, BOOK_ORDER, tmp_path / "full").run()

    with pytest.raises(Crash):
        Trainer(new_model(), train, val, BOOK_ORDER, tmp_path / "resumed", on_event=crash_at_3).run()
    resumed = Trainer(new_model(seed=99), train, val, BOOK_ORDER, tmp_path / "resumed").run()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for key, value in full_model_state(tmp_path / "resumed").items():
        assert torch.equal(value, full_model_state(tmp_path / "full")[key]), key


APART = TrainConfig(**{**BOOK_ORDER.__dict__, "dropout_masks": "fast", "dropout_seed": 4})


def test_dropout_seed_draws_the_masks_apart_and_resumes_exactly(tmp_path):
    """dropout_seed: the masks come from a generator of their own, so the global generator (init, the book
    stream's batch orders and estimates) is drawn exactly as in a run without dropout, as the book's code
    draws it on a GPU or a Mac; other dropout seeds give other masks; a crashed run resumes exactly."""
    train, val = tokens(400), tokens(600, seed=9)
    no_dropout = GPTModel(GPTConfig.from_preset("micro", vocab_size=128, context_length=16, drop_rate=0.0))
    no_dropout.load_state_dict(new_model().state_dict())
    torch.manual_seed(7)
    plain = Trainer(no_dropout, train, val, BOOK_ORDER).run()
    after_plain = torch.get_rng_state()
    model = new_model()
    torch.manual_seed(7)
    full = Trainer(model, train, val, APART, tmp_path / "full").run()
    assert torch.equal(torch.get_rng_state(), after_plain)  # the masks drew nothing from it
    assert [h["loss"] for h in full.history] != [h["loss"] for h in plain.history]  # but dropout acted
    other = Trainer(new_model(), train, val, TrainConfig(**{**APART.__dict__, "dropout_seed": 5})).run()
    assert [h["loss"] for h in other.history] != [h["loss"] for h in full.history]

    model = new_model()
    torch.manual_seed(7)
    with pytest.raises(Crash):
        Trainer(model, train, val, APART, tmp_path / "resumed", on_event=crash_at_3).run()
    resumed = Trainer(new_model(seed=99), train, val, APART, tmp_path / "resumed").run()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for key, value in full_model_state(tmp_path / "resumed").items():
        assert torch.equal(value, full_model_state(tmp_path / "full")[key]), key


def test_dropout_seed_with_torch_masks_is_refused():
    with pytest.raises(ValueError, match="dropout_seed"):
        TrainConfig(dropout_masks="torch", dropout_seed=1)
