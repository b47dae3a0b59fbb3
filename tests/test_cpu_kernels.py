"""gpt.cpu_kernels: the fused C++ training kernels equal PyTorch's ops to float rounding (values and gradients),
and their dropout masks follow gpt.dropout's rule on bits of their own that repeat under a seed."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from gpt.cpu_kernels import causal_softmax_dropout, exp_rows_, gelu, mask_bits, use_cpu_kernels
from gpt.dropout import LEVELS, Dropout, kept_above, mask_seed
from gpt.loss import head_cross_entropy
from gpt.model import GPTConfig, GPTModel
from gpt.train import Trainer, TrainConfig


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    assert use_cpu_kernels(torch.nn.Module())  # builds them (cached by torch after the first time)


def test_gelu_equals_torchs_tanh_gelu_values_and_gradients():
    torch.manual_seed(0)
    x = (torch.randn(3, 37, 101) * 4).requires_grad_()  # odd sizes: the loops' tails; large values: exp's range
    ours = gelu(x)
    (grad_ours,) = torch.autograd.grad(ours, x, torch.ones_like(ours) * 0.7)
    theirs = F.gelu(x, approximate="tanh")
    (grad_theirs,) = torch.autograd.grad(theirs, x, torch.ones_like(theirs) * 0.7)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-5)


def kernel_mask(seed: int, like: torch.Tensor, p: float) -> torch.Tensor:
    """The mask (0 or the kept scale) of the kernels' dropout `seed`, from their bits and gpt.dropout's rule."""
    lowest_kept, scale = kept_above(p)
    return (mask_bits(seed, like.numel()).view(like.shape) >= lowest_kept).float() * scale


def test_causal_softmax_dropout_equals_the_masked_softmax_times_its_mask_values_and_gradients():
    torch.manual_seed(1)
    scores = torch.randn(2, 3, 19, 19, requires_grad=True)  # raw q.k; 19 keys: the loops' tails
    dropout = Dropout(0.3).train()
    upstream = torch.randn(2, 3, 19, 19)

    torch.manual_seed(5)
    ours = causal_softmax_dropout(scores, 0.125, dropout)
    (grad_ours,) = torch.autograd.grad(ours, scores, upstream)
    torch.manual_seed(5)
    seed = mask_seed()  # the seed it drew
    hidden = torch.triu(torch.ones(19, 19, dtype=torch.bool), 1)
    theirs = torch.softmax((scores * 0.125).masked_fill(hidden, float("-inf")), dim=-1) * kernel_mask(seed, scores, 0.3)
    (grad_theirs,) = torch.autograd.grad(theirs, scores, upstream)

    assert torch.equal(ours == 0, theirs == 0)  # the same elements dropped, and hidden keys weigh exactly 0
    assert (ours[..., ~hidden] == 0).float().mean() > 0.25  # dropout acted on the visible ones
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kernel_dropout_drops_p_in_every_lane_and_its_gradient_is_the_same_mask(p):
    dropout = Dropout(p).train()
    use_cpu_kernels(dropout)
    x = torch.rand(1001, 64) + 0.5  # no zeros of its own; 1001 x 64: pieces of 4096 and a tail
    x.requires_grad_()
    torch.manual_seed(7)
    out = dropout(x)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    lowest_kept, scale = kept_above(p)
    dropped = (out == 0).view(-1)
    for lane in range(4):  # each of a 64-bit word's four 16-bit lanes drops its share
        assert abs(dropped[lane::4].float().mean().item() - (lowest_kept + LEVELS // 2) / LEVELS) < 0.01
    torch.testing.assert_close(out, x.detach() * grad)  # the backward pass remade the forward's mask
    torch.testing.assert_close(grad.unique(), torch.tensor([0.0, scale]))
    torch.manual_seed(7)
    assert torch.equal(dropout(x), out)  # repeats under a seed
    assert not torch.equal(dropout(x), out)  # and the next draw is another mask


def test_exp_rows_gives_the_shifted_exps_their_maxima_and_sums():
    torch.manual_seed(2)
    block = torch.randn(5, 2051) * 30  # differences beyond exp's clamp at -80 vanish, as they do in fp32
    tops, sums = exp_rows_(ours := block.clone())
    torch.testing.assert_close(tops, block.amax(dim=1, keepdim=True), rtol=0, atol=0)
    theirs = (block - tops).exp()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(sums, theirs.sum(dim=1, keepdim=True), rtol=1e-6, atol=0)


def test_the_fused_loss_with_the_kernels_exp_equals_the_plain_loss():
    torch.manual_seed(3)
    hidden = torch.randn(300, 24, requires_grad=True)
    weight = torch.randn(1000, 24, requires_grad=True)
    targets = torch.randint(0, 1000, (300,))
    targets[::7] = -100  # ignored
    ours = head_cross_entropy(hidden, weight, targets, chunk_rows=128, vocab_block=300, fused_exp=True)
    grads_ours = torch.autograd.grad(ours, (hidden, weight))
    theirs = F.cross_entropy(hidden @ weight.t(), targets)
    grads_theirs = torch.autograd.grad(theirs, (hidden, weight))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def tiny_run(cpu_kernels: bool, drop_rate: float) -> tuple[list[float], torch.Tensor]:
    cfg = GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=drop_rate)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    tokens = np.random.default_rng(0).integers(0, 300, 2000).astype(np.uint16)
    losses: list[float] = []
    train = TrainConfig(batch_size=4, max_steps=6, eval_every=0, checkpoint_every=0, cpu_kernels=cpu_kernels)
    Trainer(model, tokens, tokens[:200], train,
            on_event=lambda kind, rec: losses.append(rec["loss"]) if kind == "step" else None).run()
    return losses, model.blocks[0].ff.fc.weight.detach()


def test_training_with_the_kernels_follows_torchs_ops_to_float_rounding_and_repeats():
    """Without dropout, six updates of a small GPT with the kernels stay within float noise of PyTorch's ops
    (GELU, the loss's exp); with dropout (masks of their own bits) the run repeats exactly under its seed and
    off they are PyTorch's ops again."""
    (with_kernels, weight), (without, weight_without) = tiny_run(True, 0.0), tiny_run(False, 0.0)
    assert not torch.equal(weight, weight_without)  # the kernels did run (rounding differs)
    torch.testing.assert_close(weight, weight_without, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(with_kernels, without, rtol=1e-5)
    dropped, dropped_weight = tiny_run(True, 0.1)
    again, again_weight = tiny_run(True, 0.1)
    assert dropped == again and torch.equal(dropped_weight, again_weight)
    assert dropped != with_kernels
    assert tiny_run(False, 0.1)[0] == tiny_run(False, 0.1)[0]


def test_the_kernels_are_switched_on_per_model_and_leave_other_dtypes_to_torch():
    model = GPTModel(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    assert use_cpu_kernels(model)
    assert model.cpu_kernels and model.blocks[0].ff.cpu_kernels and model.blocks[0].attn.cpu_kernels
    assert model.drop_emb.cpu_kernels
    ids = torch.randint(0, 50, (2, 8))
    model.double()  # float64: PyTorch's ops, no error
    assert model(ids, targets=ids).dtype == torch.float64
    assert not use_cpu_kernels(model, False)
    assert not model.blocks[0].ff.cpu_kernels


def test_a_trainer_says_whether_the_kernels_ran_and_one_line_why_not(tmp_path):
    """In a fresh process whose build cache is empty and whose C++ compiler is missing: one stderr line names
    the kernel and why, training goes on with PyTorch's ops, and the Trainer reports "unavailable (...)";
    where the kernels build it reports "on", and "off" where the config turns them off."""
    code = ("import numpy as np, torch\nfrom gpt.model import GPTConfig, GPTModel\n"
            "from gpt.train import Trainer, TrainConfig\n"
            "tokens = np.arange(400, dtype=np.uint16) % 50\n"
            "for on in (True, False):\n"
            "    model = GPTModel(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))\n"
            "    train = TrainConfig(batch_size=2, max_steps=1, eval_every=0, cpu_kernels=on)\n"
            "    trainer = Trainer(model, tokens, tokens[:100], train)\n"
            "    trainer.run()\n"
            "    print(trainer.cpu_kernels)\n")
    missing = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": str(tmp_path / "no-such-c++")}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=missing, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    unavailable, off = result.stdout.splitlines()
    assert unavailable.startswith("unavailable (") and off == "off"
    said = [line for line in result.stderr.splitlines() if "unavailable" in line]
    assert said == [f"gpt: C++ kernel train_ops {unavailable}; using PyTorch's ops"]
    assert "Traceback" not in result.stderr
    model = GPTModel(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    tokens = np.arange(400, dtype=np.uint16) % 50
    assert Trainer(model, tokens, tokens[:100], TrainConfig(batch_size=2, max_steps=1)).cpu_kernels == "on"
