"""Process-group helpers for data-parallel training under torchrun (DDP: gloo on CPU, nccl on CUDA).

Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) nothing here starts a process
group: `setup` returns its device unchanged, the rank is 0 and the world size 1, so a plain
`python` run takes exactly the single-process code path.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def launched() -> bool:
    """Whether torchrun (or another launcher setting RANK and WORLD_SIZE) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun; return this rank's device.

    CPU uses gloo; CUDA uses nccl with device cuda:LOCAL_RANK (one GPU per process). Without
    torchrun's environment this does nothing and returns `device`.
    """
    if not launched() or is_initialized():
        return device
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} needs a GPU of its own, but this machine has "
                             f"{torch.cuda.device_count()}; start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise ValueError(f"distributed training runs on cpu (gloo) or cuda (nccl), not {device.type}")
    return device


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Processes training together; 1 without a process group. Refuses a torchrun launch of
    several processes that never called `setup`, which would train N separate copies."""
    if is_initialized():
        return dist.get_world_size()
    if launched() and int(os.environ["WORLD_SIZE"]) > 1:
        raise RuntimeError(f"started by torchrun with WORLD_SIZE={os.environ['WORLD_SIZE']} but the process group "
                           "is not set up; call gpt.distributed.setup(device) first")
    return 1


def is_main() -> bool:
    """Rank 0: the one process that logs and writes files."""
    return rank() == 0


def _reduce_device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64); unchanged without a process group."""
    if not is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_reduce_mean(value: float) -> float:
    """Mean of `value` over all ranks; unchanged without a process group."""
    if not is_initialized():
        return value
    return all_reduce_sum([value])[0] / dist.get_world_size()


def gather_to_main(obj: Any) -> list[Any] | None:
    """Rank 0 gets every rank's `obj` (index = rank), the others None; [obj] without a process group."""
    if not is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel when a process group is up, else `model` itself.

    Parameters and buffers are broadcast from rank 0 when wrapping; buffers are not re-broadcast
    on each forward (the model's only buffer is the constant causal mask).
    """
    if not is_initialized():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


def grad_sync(model: torch.nn.Module, sync: bool):
    """Context for one micro-batch's forward and backward: a DDP model all-reduces gradients only
    when `sync` (the last micro-batch of an accumulated step); anything else is unaffected.
    Looks through torch.compile's wrapper to the DDP module it compiled."""
    ddp = getattr(model, "_orig_mod", model)
    if sync or not isinstance(ddp, DistributedDataParallel):
        return nullcontext()
    return ddp.no_sync()


def shutdown() -> None:
    """Leave the process group (if any); safe to call more than once."""
    if is_initialized():
        dist.destroy_process_group()
