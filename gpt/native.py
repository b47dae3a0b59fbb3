"""The C++ kernels in gpt/csrc, built for this machine on first use and loaded once per process."""
from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from gpt.errors import first_line

if TYPE_CHECKING:  # torch is imported only when a kernel is built (dvc.yaml's generator reads CSRC without it)
    import torch

CSRC = Path(__file__).with_name("csrc")
# The process's one kernel cache, by kernel name: the module, or None where building failed (why in _failures).
_loaded: dict[str, ModuleType | None] = {}
_failures: dict[str, str] = {}


def _build_tag() -> str:
    """A short tag of this CPU's instruction sets and of the shared headers. The kernels are built with
    -march=native, so a build cache shared with another kind of CPU must not hand it this machine's binary;
    and torch's loader rebuilds when a source changes, not when a header it includes does."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
    headers = b"".join(path.read_bytes() for path in sorted(CSRC.glob("*.h")))
    return hashlib.sha256(flags.encode() + headers).hexdigest()[:10]


def load_kernel(name: str) -> ModuleType | None:
    """gpt/csrc/<name>.cpp as a Python module: built the first time (needs a C++ compiler and ninja; then
    cached by torch), loaded once per process. None, after one line on stderr saying why, where it cannot be
    built (build_failure(name) keeps the reason): callers keep PyTorch's path."""
    if name not in _loaded:
        from torch.utils.cpp_extension import load  # heavy import, only when asked for

        # torch runs ninja by name: find this environment's (the pinned package) even where it is not on PATH.
        here = str(Path(sys.executable).parent)
        if here not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join([here, os.environ.get("PATH", "")])
        try:
            # -fopenmp: at::parallel_for and the decoder's parallel region use OpenMP. The extension then
            # needs libgomp.so.1, which resolves to the copy torch has already loaded: one thread pool.
            _loaded[name] = load(name=f"gpt_{name}_{_build_tag()}", sources=[str(CSRC / f"{name}.cpp")],
                                 extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                 verbose=False)
        except Exception as exc:  # no C++ compiler, no ninja, unsupported platform, ...
            _failures[name] = f"{type(exc).__name__}: {first_line(exc)}"
            print(f"gpt: C++ kernel {name} unavailable ({_failures[name]}); using PyTorch's ops", file=sys.stderr,
                  flush=True)
            _loaded[name] = None
    return _loaded[name]


def build_failure(name: str) -> str | None:
    """Why kernel `name` could not be built in this process, or None (built, or not asked for yet)."""
    return _failures.get(name)


def train_ops() -> ModuleType | None:
    """The training kernels (gpt/csrc/train_ops.cpp), or None where they cannot be built."""
    return load_kernel("train_ops")


def applies(x: torch.Tensor) -> bool:
    """Whether the kernels can take `x`: they compute on float32 CPU tensors (float32 is torch's one 4-byte
    floating dtype)."""
    return x.device.type == "cpu" and x.dtype.is_floating_point and x.dtype.itemsize == 4
