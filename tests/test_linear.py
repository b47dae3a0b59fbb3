"""gpt.linear: the one-row CPU kernel matches F.linear, stays out of autograd, and decodes the same tokens."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt.generate import generate
from gpt.linear import Linear, use_fast_matvec
from gpt.model import GPTConfig, GPTModel


@pytest.fixture(scope="module")
def kernel_on():
    # The CI machine has a C++ compiler: the kernel must build there, not silently fall back.
    assert use_fast_matvec(nn.Sequential(), True)


@pytest.mark.parametrize("rows, cols, bias", [(5, 37, True), (64, 16, False), (1000, 3, True), (2304, 768, True)])
def test_kernel_matches_f_linear(kernel_on, rows, cols, bias):
    torch.manual_seed(0)
    layer = Linear(cols, rows, bias=bias)
    x = torch.randn(1, 1, cols)
    expected = F.linear(x, layer.weight, layer.bias)
    assert use_fast_matvec(layer) and layer.fast_matvec
    with torch.no_grad():
        got = layer(x)
    assert got.shape == (1, 1, rows)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, torch.zeros_like(got))


def test_grad_mode_and_batches_keep_f_linear(kernel_on):
    torch.manual_seed(0)
    layer = Linear(8, 4)
    use_fast_matvec(layer)
    x = torch.randn(1, 8)
    out = layer(x)  # grad enabled: the autograd path
    out.sum().backward()
    assert layer.weight.grad is not None and torch.allclose(layer.weight.grad, x.expand(4, 8))
    batch = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(batch), F.linear(batch, layer.weight, layer.bias))


def test_same_parameters_and_state_dict_as_nn_linear():
    layer, plain = Linear(6, 3), nn.Linear(6, 3)
    plain.load_state_dict(layer.state_dict())
    assert list(layer.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    assert isinstance(layer, nn.Linear)


def test_greedy_decoding_is_unchanged(kernel_on):
    torch.manual_seed(3)
    model = GPTModel(GPTConfig.from_preset("tiny", drop_rate=0.0)).eval()
    prompt = torch.randint(0, 50257, (1, 5), generator=torch.Generator().manual_seed(1))
    plain = generate(model, prompt, 25)
    assert use_fast_matvec(model)
    assert all(m.fast_matvec for m in model.modules() if isinstance(m, Linear))
    fast = generate(model, prompt, 25)
    use_fast_matvec(model, False)
    assert torch.equal(fast, plain)
    assert not any(m.fast_matvec for m in model.modules() if isinstance(m, Linear))


def test_kernel_refuses_a_weight_it_cannot_read(kernel_on):
    layer = Linear(8, 4).double()  # cast after the kernel was turned on
    use_fast_matvec(layer)
    with torch.no_grad(), pytest.raises(RuntimeError, match="weight must be a contiguous 2-D float32 CPU tensor"):
        layer(torch.randn(1, 8))  # fp32 input, fp64 weight: F.linear would refuse it too
    with torch.no_grad():
        assert layer(torch.randn(1, 8, dtype=torch.float64)).dtype == torch.float64  # fp64 input: F.linear
