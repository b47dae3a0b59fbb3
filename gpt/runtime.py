"""Process settings a run makes before it computes: device, autocast dtype, allocator, deterministic math."""
from __future__ import annotations

import ctypes
import os
import sys

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype forward + loss run in under autocast, or None for plain fp32.

    "auto" is bf16 on CUDA GPUs with native bf16 (Ampere and later), fp32 elsewhere; "bf16" is
    honoured on any device (on CPU it is only faster where the CPU has bf16 instructions).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return None


def tune_malloc() -> bool:
    """Make glibc keep large freed blocks for reuse; True when applied (Linux with glibc only).

    glibc serves each allocation above its mmap threshold (32 MiB at most by default) with a fresh
    mmap and unmaps it when freed, so the logits over 50k tokens and their gradient (hundreds of MB)
    are page-faulted in again at every step: high system time in every CPU training step (docs/benchmarks.md).
    This raises the mmap and trim thresholds in this process, as MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_ in the environment would; results are unchanged. Meant for a training
    process's entry point (the memory stays with the process until it exits).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        limit = 2**31 - 1  # mallopt takes an int
        # M_MMAP_THRESHOLD (older glibc caps it at 32 MiB: then M_MMAP_MAX = 0, no mmap), M_TRIM_THRESHOLD.
        return bool((libc.mallopt(-3, limit) or libc.mallopt(-4, 0)) and libc.mallopt(-1, limit))
    except (OSError, AttributeError):  # not glibc
        return False


def make_deterministic() -> None:
    """Make this process's CPU math repeat bit for bit from run to run (call before any matmul).

    Without it two runs of the same seed can differ in the last bit of a float: MKL chooses its
    kernels by CPU, buffer alignment and load (its "conditional numerical reproducibility" is off
    by default). This sets MKL_CBWR=AUTO,STRICT and MKL_DYNAMIC=FALSE, which MKL reads at its first
    call (values already in the environment win), and torch.use_deterministic_algorithms. The
    thread count must stay the same too: a reduction split over 1 or 2 threads rounds differently.
    """
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    torch.use_deterministic_algorithms(True)


def pick_device(name: str = "auto") -> torch.device:
    """"auto" picks cuda, then mps, then cpu; a named device must be available."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if name not in available:
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    if not available[name]:
        raise ValueError(f"device {name!r} is not available on this machine")
    return torch.device(name)
