"""LoRA adapters and the shared finetuning loop."""
import pytest
import torch
from torch import nn

from gpt.finetune import FinetuneConfig, fit, select_trainable
from gpt.lora import LoRALinear, apply_lora, merge_lora
from gpt.model import GPTConfig, GPTModel, count_parameters


def micro():
    torch.manual_seed(0)
    return GPTModel(GPTConfig.from_preset("micro", vocab_size=64, context_length=16, drop_rate=0.0))


def lm_batches(epoch):
    gen = torch.Generator().manual_seed(epoch)
    for _ in range(4):
        seq = torch.randint(0, 8, (4, 1), generator=gen) + torch.arange(9)  # easy: next = current + 1
        yield seq[:, :-1] % 64, seq[:, 1:] % 64


def lm_loss(model, batch):
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


def test_lora_starts_as_identity_and_merges_exactly():
    model = micro().eval()
    x = torch.randint(0, 64, (2, 10))
    before = model(x)
    assert apply_lora(model, rank=4, alpha=8) == 4 * len(model.blocks)
    torch.testing.assert_close(model(x), before)  # B starts at zero
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_()
    adapted = model(x)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x), adapted, atol=1e-4, rtol=1e-4)


def test_lora_trains_only_adapters_and_keeps_base_weights():
    model = micro()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    select_trainable(model, "lora", lora_rank=2, lora_alpha=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert count_parameters(model, trainable_only=True) == len(model.blocks) * 2 * (
        (32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    history = fit(model, lm_batches, lm_loss, FinetuneConfig(lr=1e-2, epochs=1, eval_every=0))
    assert history[-1]["loss"] < history[0]["loss"]
    state = model.state_dict()
    for key, value in base.items():
        lora_key = key.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(state.get(key, state.get(lora_key)), value), key
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_b"))
    merge_lora(model)
    assert set(model.state_dict()) == set(base)  # a plain model again


def test_last_blocks_mode_and_errors():
    model = micro()
    head = nn.Linear(32, 2)
    select_trainable(model, "last_blocks", n_blocks=1, always=[head])
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.1", "final_norm"}
    assert all(p.requires_grad for p in head.parameters())
    with pytest.raises(ValueError, match="n_blocks must be in"):
        select_trainable(micro(), "last_blocks", n_blocks=5)
    with pytest.raises(ValueError, match="unknown trainable mode"):
        select_trainable(micro(), "half")


def test_fit_lowers_loss_and_evaluates_each_epoch():
    model = micro()
    calls = []
    history = fit(model, lm_batches, lm_loss, FinetuneConfig(lr=3e-3, epochs=3, eval_every=0),
                  evaluate=lambda: calls.append(1) or {"val": 0.0})
    assert len(history) == 12 and len(calls) == 3
    assert [h["step"] for h in history if "val" in h] == [4, 8, 12]
    assert history[-1]["loss"] < history[0]["loss"]
