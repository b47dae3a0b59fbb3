"""gpt.fast_decode: the fused C++ step gives the model's logits and cache, and generate uses it."""
import pytest
import torch

from gpt.attention import KVCache
from gpt.fast_decode import fused_step, use_fast_decode
from gpt.generate import generate, generate_batch
from gpt.lora import apply_lora
from gpt.model import GPTConfig, GPTModel
from gpt.native import load_kernel

# Odd widths (head_dim 7, vocab 101) exercise the kernel's loop tails; 2 threads split rows and heads.
ODD = dict(vocab_size=101, context_length=24, emb_dim=21, n_heads=3, n_layers=2, drop_rate=0.0)


def model_of(seed: int = 0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(**{**ODD, **overrides})).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor cannot go unnoticed
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.3 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module", autouse=True)
def kernel_on():
    # The CI machine has a C++ compiler: the kernel must build there, not silently fall back.
    assert use_fast_decode(model_of())


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "tie_weights": True}, {"pad_vocab_to": 64},
                                       {"use_sdpa": False}])
def test_step_matches_the_model_token_by_token(overrides):
    model = model_of(**overrides)
    assert use_fast_decode(model)
    step = fused_step(model)
    assert step is not None
    prompt = torch.randint(0, ODD["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref_cache, fused_cache = model.new_cache(1), model.new_cache(1)
        model(prompt, ref_cache), model(prompt, fused_cache)
        token = prompt[:, -1:]
        while ref_cache.length < ODD["context_length"]:  # up to the last position of the context
            expected = model(token, ref_cache)
            got = step(token, fused_cache)
            assert got.shape == expected.shape == (1, 1, ODD["vocab_size"])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert fused_cache.length == ref_cache.length
            for ref, fused in zip(ref_cache.keys + ref_cache.values, fused_cache.keys + fused_cache.values):
                torch.testing.assert_close(fused[:, :, : ref_cache.length], ref[:, :, : ref_cache.length])
            token = expected[:, -1:].argmax(-1)
        with pytest.raises(RuntimeError, match="slot 24 outside the context of 24"):
            step(token, fused_cache)


@pytest.mark.parametrize("rows", [4, 11])  # one part-filled group of eight inputs; a full group and a part
def test_a_batch_of_left_padded_rows_matches_the_model_step_by_step(rows):
    model = model_of(qkv_bias=True)
    assert use_fast_decode(model)
    step = fused_step(model)
    gen = torch.Generator().manual_seed(rows)
    lengths = [6, 2, 1, 5, 3, 6, 4, 1, 2, 6, 5][:rows]
    prompts = [torch.randint(0, ODD["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
    pad = torch.tensor([max(lengths) - n for n in lengths])
    ids = torch.tensor([[0] * int(n) + p for n, p in zip(pad, prompts)])
    with torch.inference_mode():
        ref_cache, fused_cache = model.new_cache(rows, pad=pad), model.new_cache(rows, pad=pad)
        model(ids, ref_cache), model(ids, fused_cache)
        token = torch.randint(0, ODD["vocab_size"], (rows, 1), generator=gen)
        for _ in range(6):
            expected = model(token, ref_cache)
            got = step(token, fused_cache)
            assert got.shape == (rows, 1, ODD["vocab_size"])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            token = expected[:, -1:].argmax(-1)


def test_batched_generation_with_the_kernel_gives_the_eager_tokens():
    model = model_of(seed=4)
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, ODD["vocab_size"], (n,), generator=gen).tolist() for n in (2, 7, 1, 5, 3, 6)]
    use_fast_decode(model, False)
    eager = generate_batch(model, prompts, 12, batch_size=6)
    assert use_fast_decode(model)
    assert generate_batch(model, prompts, 12, batch_size=6) == eager


def test_generate_takes_the_fused_step_and_decodes_the_same_tokens(monkeypatch):
    model = model_of(seed=3)
    prompt = torch.randint(0, ODD["vocab_size"], (1, 4), generator=torch.Generator().manual_seed(2))
    use_fast_decode(model, False)
    plain = generate(model, prompt, 30)  # runs past the context: the cropped window, uncached
    assert use_fast_decode(model)
    steps = []
    kernel = load_kernel("decode")  # the process's one build, which fused_step uses
    real = kernel.Decoder

    class Counting:
        def __init__(self, *args):
            self.decoder = real(*args)

        def step(self, *args):
            steps.append(args[1])
            return self.decoder.step(*args)
    monkeypatch.setattr(kernel, "Decoder", Counting)
    fast = generate(model, prompt, 30)
    assert torch.equal(fast, plain)
    assert steps == list(range(4, 24))  # every one-token step inside the context, and only those


def test_layouts_the_kernel_does_not_compute_fall_back():
    model = model_of()
    assert use_fast_decode(model)
    model.train()
    assert fused_step(model) is None  # dropout would be skipped
    model.eval()
    apply_lora(model, rank=2, alpha=4.0)
    assert fused_step(model) is None  # adapters are not in the kernel
    assert not use_fast_decode(model_of(), False)
    doubled = model_of().double()
    use_fast_decode(doubled)
    assert fused_step(doubled) is None
    prompt = torch.zeros(1, 3, dtype=torch.long)
    assert generate(doubled, prompt, 2).shape == (1, 5)


def test_kernel_refuses_bad_input():
    model = model_of()
    use_fast_decode(model)
    step = fused_step(model)
    cache = model.new_cache(1)
    with pytest.raises(RuntimeError, match="token id 101 out of range"):
        step(torch.tensor([[101]]), cache)
    wrong = KVCache(ODD["n_layers"], 1, ODD["n_heads"], ODD["context_length"], 7, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="caches must be contiguous float32"):
        step(torch.tensor([[1]]), wrong)
    assert cache.length == wrong.length == 0  # a refused step does not advance the cache
