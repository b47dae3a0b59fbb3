"""GPT model: presets, shapes, parameter counts, tying, memory estimate."""
import pytest
import torch

from gpt.model import PRESETS, GPTConfig, GPTModel, count_parameters, memory_estimate


@pytest.mark.parametrize(
    "preset, expected",
    # Published GPT-2 sizes with a tied head: 124M, 355M, 774M, 1558M.
    [("gpt2-small", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_gpt2_parameter_counts(preset, expected):
    with torch.device("meta"):  # no memory needed to count
        model = GPTModel(GPTConfig.from_preset(preset))
    assert count_parameters(model) == expected


def test_untied_head_adds_vocab_times_width():
    cfg = GPTConfig.from_preset("micro")
    tied = count_parameters(GPTModel(cfg))
    untied = count_parameters(GPTModel(GPTConfig.from_preset("micro", tie_weights=False)))
    assert untied - tied == cfg.vocab_size * cfg.emb_dim


def test_forward_shapes_and_context_limit():
    model = GPTModel(GPTConfig.from_preset("micro"))
    logits = model(torch.randint(0, 50257, (2, 10)))
    assert logits.shape == (2, 10, 50257)
    with pytest.raises(ValueError, match="exceeds the context length 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_tied_head_shares_storage_and_trains_once():
    model = GPTModel(GPTConfig.from_preset("micro"))
    assert model.out_head.weight is model.tok_emb.weight
    loss = model(torch.randint(0, 50257, (1, 8))).sum()
    loss.backward()
    assert model.tok_emb.weight.grad is not None


def test_sdpa_and_explicit_models_agree():
    torch.manual_seed(0)
    a = GPTModel(GPTConfig.from_preset("micro", drop_rate=0.0)).eval()
    b = GPTModel(GPTConfig.from_preset("micro", drop_rate=0.0, use_sdpa=False)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 50257, (2, 20))
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


def test_memory_estimate_counts_adamw_state():
    model = GPTModel(GPTConfig.from_preset("micro"))
    est = memory_estimate(model)
    assert est["weights"] == count_parameters(model) * 4
    assert est["total"] == 4 * est["weights"]
    assert memory_estimate(model, training=False)["total"] == est["weights"]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="emb_dim .* divisible by n_heads"):
        GPTConfig(emb_dim=100, n_heads=3)
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({"emb_dims": 3})
    assert GPTConfig.from_dict(PRESETS["mini"].to_dict()) == PRESETS["mini"]
