"""nn.Linear with an optional multi-threaded matrix-vector kernel for one-token decoding on CPU."""
from __future__ import annotations

import hashlib
import platform
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gpt.errors import first_line

KERNEL_SOURCE = Path(__file__).with_name("csrc") / "matvec.cpp"
_kernel = None  # the built extension module; None: not built yet, False: building failed here


def _cpu_tag() -> str:
    """A short tag of this CPU's instruction sets: the kernel is built with -march=native, so a
    build cache shared with another kind of CPU must not hand it this machine's binary."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def _load_kernel():
    """Build (first time: ~20 s, needs a C++ compiler; then cached by torch) and load the kernel."""
    from torch.utils.cpp_extension import load  # heavy import, only when asked for

    # -fopenmp: at::parallel_for is an inline OpenMP loop, serial without it. The extension then
    # needs libgomp.so.1, which resolves to the copy torch has already loaded: one thread pool.
    return load(name=f"gpt_matvec_{_cpu_tag()}", sources=[str(KERNEL_SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose `fast_matvec` flag sends a single fp32 input
    row on CPU, outside autograd, to the multi-threaded kernel; everything else is F.linear."""

    fast_matvec: bool = False  # set per module by use_fast_matvec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only the input is checked here (each weight access costs a module attribute lookup, and
        # decoding is bound by this per-call overhead); the kernel checks the weight and bias.
        if (self.fast_matvec and x.numel() == self.in_features and not torch.is_grad_enabled()
                and x.is_cpu and x.dtype == torch.float32):
            out = _kernel.matvec(self.weight, x.reshape(-1).contiguous(), self.bias)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_fast_matvec(model: nn.Module, enabled: bool = True) -> bool:
    """Turn the one-row kernel of every `Linear` in `model` on (or off); return whether it is on.

    PyTorch's own path for one row (MKL sgemv) runs on one thread at well under the memory
    bandwidth, and batch-1 decoding is almost nothing but these reads. The kernel is built on
    first use; if that fails (no compiler), warn once and keep F.linear. Outputs match F.linear to
    float rounding (the sum runs in another order), so greedy decoding can differ only on near-ties.
    """
    global _kernel
    if enabled and _kernel is None:
        try:
            _kernel = _load_kernel()
        except Exception as exc:  # no C++ compiler, unsupported platform, ...
            warnings.warn(f"fast matvec kernel unavailable ({type(exc).__name__}: {first_line(exc)}); using F.linear",
                          stacklevel=2)
            _kernel = False
    on = enabled and bool(_kernel)
    for module in model.modules():
        if isinstance(module, Linear):
            module.fast_matvec = on
    return on
