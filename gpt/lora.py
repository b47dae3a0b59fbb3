"""Low-rank adaptation (LoRA, Hu et al. 2021): frozen linear layers plus trainable rank-r updates."""
from __future__ import annotations

import math

import torch
from torch import nn

# The linear layers of a TransformerBlock that get adapters.
DEFAULT_TARGETS = ("attn.qkv", "attn.out_proj", "ff.fc", "ff.proj")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * x A B, with `base` frozen and B starting at zero (so y is unchanged at first)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(base.in_features, rank, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(rank, base.out_features, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        for param in base.parameters():
            param.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.lora_a @ self.lora_b)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (for export and fast inference)."""
        with torch.no_grad():
            self.base.weight += self.scaling * (self.lora_a @ self.lora_b).t()
        self.base.weight.requires_grad = True
        if self.base.bias is not None:
            self.base.bias.requires_grad = True
        return self.base


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS) -> int:
    """Freeze every parameter of `model`, wrap the target linears of each block with LoRA; return how many."""
    for param in model.parameters():
        param.requires_grad = False
    wrapped = 0
    for block in model.blocks:
        for path in targets:
            parent_name, name = path.rsplit(".", 1)
            parent = block.get_submodule(parent_name)
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
            wrapped += 1
    return wrapped


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA adapter back into its linear layer, leaving a plain model."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
