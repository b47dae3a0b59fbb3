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


@pytest.mark.parametrize("tie", [True, False])
def test_padded_vocab_keeps_weights_and_logits(tie):
    torch.manual_seed(0)
    plain = GPTModel(GPTConfig.from_preset("micro", drop_rate=0.0, tie_weights=tie)).eval()
    torch.manual_seed(0)
    padded = GPTModel(GPTConfig.from_preset("micro", drop_rate=0.0, tie_weights=tie, pad_vocab_to=64)).eval()
    assert padded.cfg.padded_vocab_size == 50304 and padded.tok_emb.weight.shape == (50304, 32)
    assert padded.out_head.weight.shape == (50304, 32) and (padded.out_head.weight is padded.tok_emb.weight) is tie
    # Same seed, same real weights; the extra rows are zeros.
    for key, value in plain.state_dict().items():
        assert torch.equal(padded.state_dict()[key][: value.shape[0]], value), key
    assert not padded.tok_emb.weight[50257:].any() and not padded.out_head.weight[50257:].any()
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        expected, actual = plain(x), padded(x)
    assert actual.shape == (2, 20, 50257)  # padded ids are never predicted
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_padded_vocab_rows_stay_zero_in_training():
    model = GPTModel(GPTConfig.from_preset("micro", pad_vocab_to=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randint(0, 50257, (2, 16))
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not model.tok_emb.weight[50257:].any()


def test_padded_vocab_checkpoint_round_trip(tmp_path):
    from gpt.checkpoint import CheckpointError, load_model, load_state, save_model

    model = GPTModel(GPTConfig.from_preset("micro", drop_rate=0.0, pad_vocab_to=64)).eval()
    save_model(model, tmp_path / "ckpt")
    back = load_model(tmp_path / "ckpt").eval()
    assert back.cfg == model.cfg
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match="tok_emb.weight has shape"):
        load_state(tmp_path / "ckpt", GPTModel(GPTConfig.from_preset("micro")))
    with pytest.raises(ValueError, match=r"GPTConfig.pad_vocab_to must be >= 1, got 0"):
        GPTConfig(pad_vocab_to=0)


@pytest.mark.parametrize("batch,tokens", [(1, 1), (8, 1), (4, 16), (5, 13)])  # 1, 8, 64 rows: weight @ hidden.T
def test_the_head_of_a_few_rows_gives_the_linear_layers_logits(batch, tokens):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("micro", drop_rate=0.0, pad_vocab_to=64)).eval()
    idx = torch.randint(0, model.cfg.vocab_size, (batch, tokens))
    with torch.no_grad():
        logits = model(idx)
        expected = model.out_head(model.hidden_states(idx))[..., : model.cfg.vocab_size]
    assert logits.shape == (batch, tokens, model.cfg.vocab_size)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    if batch * tokens > 64:
        assert torch.equal(logits, expected)  # many rows: the linear layer itself


def test_an_unpadded_head_weight_is_the_parameter_itself():
    """No slice between the loss and an unpadded head (a slice's backward copies the gradient into a zero
    matrix of its size); a padded head gives its real rows."""
    model = GPTModel(GPTConfig.from_preset("micro", vocab_size=100))
    assert model.head_weight is model.out_head.weight
    padded = GPTModel(GPTConfig.from_preset("micro", vocab_size=100, pad_vocab_to=64))
    assert padded.head_weight.shape[0] == 100 and padded.out_head.weight.shape[0] == 128
