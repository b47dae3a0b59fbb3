"""Sliding-window next-token dataset over a flat token array, and its DataLoader factory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gpt.files import atomic_file
from gpt.tokenizer import TOKEN_DTYPE


class TokenWindowDataset(Dataset):
    """Windows of `max_length` tokens every `stride` tokens; the target is the window shifted by one.

    `tokens` may be any 1-D integer array, including a read-only numpy memmap: windows are
    sliced lazily so a corpus larger than memory works.
    """

    def __init__(self, tokens: np.ndarray | torch.Tensor, max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length and stride must be >= 1, got {max_length} and {stride}")
        if len(tokens) < max_length + 1:
            raise ValueError(
                f"token array of length {len(tokens)} is shorter than one window + 1 ({max_length + 1})"
            )
        self.tokens = tokens
        self.max_length = max_length
        self.stride = stride
        self._count = (len(tokens) - max_length - 1) // stride + 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self._count:
            raise IndexError(index)
        start = index * self.stride
        chunk = self.tokens[start : start + self.max_length + 1]
        chunk = torch.as_tensor(np.asarray(chunk, dtype=np.int64))
        return chunk[:-1], chunk[1:]


def load_tokens(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a flat uint16 token file written by `save_tokens`."""
    return np.memmap(Path(path), dtype=TOKEN_DTYPE, mode="r")


def save_tokens(tokens: np.ndarray | list[int], path: str | os.PathLike) -> None:
    """Write token ids as raw uint16, atomically."""
    array = np.asarray(tokens)
    if array.size and (array.min() < 0 or array.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ValueError(f"{path}: token ids out of uint16 range")
    with atomic_file(path) as tmp:
        array.astype(TOKEN_DTYPE).tofile(tmp)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for one epoch, ordered by (seed, epoch) alone.

    Because the order is a pure function of seed and epoch, training can resume mid-epoch
    exactly: rebuild the sampler for the saved epoch and skip `start_batch` batches.

    With `world_size` > 1 (data-parallel training) every rank walks the same global batches of
    `batch_size` and yields only its contiguous share of each, `batch_size // world_size` rows,
    so the ranks together see exactly the batches one process would.
    """

    def __init__(self, n_items: int, batch_size: int, shuffle: bool = True, drop_last: bool = True,
                 seed: int = 123, epoch: int = 0, start_batch: int = 0, rank: int = 0, world_size: int = 1,
                 order_seed: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes ({world_size})")
        if world_size > 1 and not drop_last:
            raise ValueError("sharding batches across processes needs drop_last=True (equal shares)")
        self.n_items, self.batch_size = n_items, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        self.rank, self.world_size = rank, world_size
        self.order_seed = seed + epoch if order_seed is None else order_seed

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_items))
        generator = torch.Generator().manual_seed(self.order_seed)
        return torch.randperm(self.n_items, generator=generator).tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.n_items, self.batch_size)
        return max(0, full + (1 if rest and not self.drop_last else 0) - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for start in range(self.start_batch * self.batch_size, self.n_items, self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            if self.world_size > 1:
                share = self.batch_size // self.world_size
                batch = batch[self.rank * share : (self.rank + 1) * share]
            yield batch


def create_dataloader(
    tokens: np.ndarray | torch.Tensor,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 123,
    num_workers: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    order_seed: int | None = None,
) -> DataLoader:
    """A DataLoader of (inputs, targets) windows for one epoch; its order depends only on seed and epoch
    (or on `order_seed`, the permutation generator's seed, when given).

    `rank`/`world_size` shard each batch of `batch_size` across data-parallel processes (see
    EpochBatchSampler); sharding needs drop_last=True.
    """
    dataset = TokenWindowDataset(tokens, max_length, stride)
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle, drop_last, seed, epoch, start_batch,
                                rank, world_size, order_seed)
    # An own generator: otherwise each new iterator draws from the global RNG (for worker
    # seeds), which would shift dropout masks after a mid-epoch resume.
    generator = torch.Generator().manual_seed(seed + epoch)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, generator=generator)
