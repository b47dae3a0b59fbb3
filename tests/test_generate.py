"""Generation: greedy, sampling filters, end-of-text, cropping, KV cache equivalence, batched prompts."""
import pytest
import torch

from gpt.generate import generate, generate_batch, generate_text, generate_texts, sample_next
from gpt.model import GPTConfig, GPTModel
from gpt.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(123)
    return GPTModel(GPTConfig.from_preset("micro", context_length=32)).eval()


@pytest.mark.parametrize("prompt_len, new", [(1, 20), (7, 60)])  # 7 + 60 overflows the 32-token context
def test_cache_and_no_cache_give_identical_greedy_tokens(model, prompt_len, new):
    idx = torch.randint(0, 50257, (2, prompt_len), generator=torch.Generator().manual_seed(0))
    cached = generate(model, idx, new, use_cache=True)
    plain = generate(model, idx, new, use_cache=False)
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached, plain)


def test_cache_and_no_cache_sample_identically_with_same_generator(model):
    idx = torch.tensor([[1, 2, 3]])
    a = generate(model, idx, 15, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(5))
    b = generate(model, idx, 15, temperature=1.0, top_k=50, use_cache=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_prompt_longer_than_context_is_cropped(model):
    idx = torch.randint(0, 50257, (1, 40))
    out = generate(model, idx, 3)
    assert out.shape == (1, 43)
    assert torch.equal(out[:, :40], idx)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9]])
    assert sample_next(logits).item() == 1


def test_top_k_keeps_only_k_best():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0, 4.8]])
    gen = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, temperature=5.0, top_k=2, generator=gen).item() for _ in range(200)}
    assert picks == {1, 2}


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    gen = torch.Generator().manual_seed(0)
    picks = {sample_next(probs.log(), temperature=1.0, top_p=0.7, generator=gen).item() for _ in range(300)}
    assert picks == {0, 1}  # 0.5 alone < 0.7, 0.5 + 0.3 covers it
    picks = {sample_next(probs.log(), temperature=1.0, top_p=0.4, generator=gen).item() for _ in range(50)}
    assert picks == {0}


def test_stops_when_every_row_emitted_eos(model):
    idx = torch.tensor([[5, 6], [7, 8]])
    first = generate(model, idx, 1)[:, -1]
    eos = int(first[0])
    out = generate(model, idx, 30, eos_id=eos)
    row0 = out[0, 2:].tolist()
    assert row0[0] == eos and set(row0) == {eos}  # finished rows are padded with eos
    if int(first[1]) == eos:
        assert out.shape[1] == 3


def test_generate_text_round_trip(model, bpe_dir):
    tok = load_tokenizer(bpe_dir)
    text = generate_text(model, tok, "Every effort moves you", max_new_tokens=5)
    assert isinstance(text, str) and "<|endoftext|>" not in text
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_text(model, tok, "")


def test_generate_restores_training_mode(model):
    model.train()
    generate(model, torch.tensor([[1]]), 2)
    assert model.training
    model.eval()


def test_output_is_a_normal_tensor_that_autograd_accepts(model):
    out = generate(model, torch.tensor([[1, 2, 3]]), 4, eos_id=0)
    assert not out.is_inference()
    model.train()
    model(out).sum().backward()  # embedding backward saves the ids: an inference tensor would fail here
    assert model.tok_emb.weight.grad is not None
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.fixture(scope="module")
def exact_model():
    # float64: batched and one-row matmuls sum in different orders, and in float64 that rounding
    # cannot flip a greedy choice, so the test can ask for identical tokens.
    torch.manual_seed(7)
    return GPTModel(GPTConfig.from_preset("micro", context_length=32)).double().eval()


def test_padded_rows_get_the_logits_of_their_unpadded_prompts(model):
    prompts = [[11, 12, 13, 14, 15], [21, 22], [31]]
    pad = torch.tensor([0, 3, 4])
    ids = torch.tensor([[0] * int(n) + p for n, p in zip(pad, prompts)])
    cache = model.new_cache(3, max_length=12, pad=pad)
    with torch.no_grad():
        padded = model(ids, cache)
        step = model(torch.tensor([[40], [41], [42]]), cache)  # one more token each, as decoding does
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt + [40 + row]]))
            torch.testing.assert_close(padded[row, -1], alone[0, -2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step[row, 0], alone[0, -1], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(padded).all()  # padding slots attend to themselves: no 0/0


@pytest.mark.parametrize("batch_size", [2, 8])
def test_batched_greedy_equals_one_prompt_at_a_time(exact_model, batch_size):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50257, (n,), generator=gen).tolist() for n in (3, 9, 1, 14, 6, 2, 9)]
    first = generate(exact_model, torch.tensor([prompts[0]]), 1)[0, -1].item()
    alone = []
    for prompt in prompts:
        out = generate(exact_model, torch.tensor([prompt]), 12, eos_id=first)[0, len(prompt):].tolist()
        alone.append(out[: out.index(first) + 1] if first in out else out)
    assert alone[0] == [first]  # the eos stop is exercised: a finished row waits for the others
    assert generate_batch(exact_model, prompts, 12, batch_size=batch_size, eos_id=first) == alone


def test_prompts_that_outgrow_the_context_are_cropped_one_at_a_time(exact_model):
    prompts = [list(range(1, 30)), [5, 6]]  # 29 + 8 > 32: decoded alone, cropped like generate
    alone = [generate(exact_model, torch.tensor([p]), 8)[0, len(p):].tolist() for p in prompts]
    assert generate_batch(exact_model, prompts, 8) == alone


def test_generate_texts_names_the_empty_prompt(model, bpe_dir):
    tok = load_tokenizer(bpe_dir)
    texts = generate_texts(model, tok, ["Every effort", "moves you"], max_new_tokens=4)
    assert texts == [generate_text(model, tok, p, max_new_tokens=4) for p in ("Every effort", "moves you")]
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        generate_texts(model, tok, ["a", ""])
