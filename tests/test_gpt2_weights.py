"""Hugging Face GPT-2 checkpoints load into our model with matching logits, and export back."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gpt.checkpoint import CheckpointError  # noqa: E402
from gpt.gpt2_weights import load_hf_gpt2, save_hf_gpt2  # noqa: E402
from gpt.model import GPTConfig, GPTModel  # noqa: E402


def small_hf_model(tie: bool = True):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50257, n_positions=64, n_embd=48, n_layer=3, n_head=4, tie_word_embeddings=tie,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random biases and norms, so a wrong mapping cannot hide behind zeros/ones
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.normal_(0.0, 0.2)
        if not tie:
            model.lm_head.weight.normal_(0.0, 0.02)
    return model


@pytest.mark.parametrize("pad", [1, 64])
@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_transformers(tmp_path, tie, pad):
    hf = small_hf_model(tie)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = load_hf_gpt2(tmp_path / "hf", pad_vocab_to=pad).eval()
    assert ours.cfg.tie_weights is tie and ours.cfg.qkv_bias and ours.cfg.pad_vocab_to == pad
    ids = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        actual = ours(ids)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4


def test_padded_load_is_exact(tmp_path):
    hf = small_hf_model(tie=False)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    plain = load_hf_gpt2(tmp_path / "hf").eval()
    padded = load_hf_gpt2(tmp_path / "hf", pad_vocab_to=64).eval()
    assert padded.tok_emb.weight.shape[0] == padded.out_head.weight.shape[0] == 50304
    for key, value in plain.state_dict().items():  # OpenAI's rows unchanged, zero rows after them
        assert torch.equal(padded.state_dict()[key][: value.shape[0]], value), key
    assert not padded.tok_emb.weight[50257:].any() and not padded.out_head.weight[50257:].any()
    ids = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(padded(ids), plain(ids), rtol=0, atol=1e-6)
    # Exported without the padding: the same file as the unpadded model's export.
    save_hf_gpt2(padded, tmp_path / "padded")
    save_hf_gpt2(plain, tmp_path / "plain")
    assert (tmp_path / "padded" / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "padded" / "config.json").read_text())["vocab_size"] == 50257


def test_export_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("micro", drop_rate=0.0, qkv_bias=True)).eval()
    save_hf_gpt2(model, tmp_path / "export")
    back = load_hf_gpt2(tmp_path / "export")
    for key, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    # transformers reads the export and computes the same logits.
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, 50257, (1, 30))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_export_without_qkv_bias_computes_the_same(tmp_path):
    model = GPTModel(GPTConfig.from_preset("micro", drop_rate=0.0)).eval()  # book style: no q/k/v bias
    save_hf_gpt2(model, tmp_path / "export")
    back = load_hf_gpt2(tmp_path / "export")
    ids = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids))


def test_unsupported_config_is_refused(tmp_path):
    model = GPTModel(GPTConfig.from_preset("micro", qkv_bias=True))
    save_hf_gpt2(model, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    config["activation_function"] = "relu"
    (tmp_path / "export" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="activation_function 'relu'"):
        load_hf_gpt2(tmp_path / "export")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        load_hf_gpt2(tmp_path)
