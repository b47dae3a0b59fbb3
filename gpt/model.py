"""The GPT model: a config dataclass with presets, transformer blocks, and size estimates."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from gpt.attention import KVCache, MultiHeadAttention
from gpt.cpu_kernels import gelu
from gpt.dropout import Dropout
from gpt.fields import bounded, check_fields
from gpt.loss import TiedGradient, head_cross_entropy, tied_lookup
from gpt.native import applies


# "gpt2": N(0, 0.02) weights with depth-scaled residual projections (GPT-2's recipe);
# "torch": PyTorch's default layer init, as the book's code uses.
INITS = ("gpt2", "torch")
FEW_ROWS = 64  # up to this many rows (batch x tokens), the head runs as weight @ hidden.T (GPTModel._head)


@dataclass(frozen=True)
class GPTConfig:
    """Architecture hyperparameters; names follow the book (emb_dim, n_heads, n_layers, drop_rate)."""

    vocab_size: int = bounded(50257, low=1)
    context_length: int = bounded(1024, low=1)
    emb_dim: int = bounded(768, low=1)
    n_heads: int = bounded(12, low=1)
    n_layers: int = bounded(12, low=1)
    drop_rate: float = bounded(0.1, low=0, high=1, bounds="[)")
    qkv_bias: bool = False
    tie_weights: bool = False
    use_sdpa: bool = True
    init: str = bounded("gpt2", choices=INITS)
    # Embedding/head rows rounded up to a multiple of this (64 suits GPU matmuls); the extra rows
    # are zeros that no token id reaches, and forward() drops their logits. 1: no padding.
    pad_vocab_to: int = bounded(1, low=1)

    def __post_init__(self):
        check_fields(self)
        if self.emb_dim % self.n_heads:
            raise ValueError(f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token embedding and output head: vocab_size rounded up to pad_vocab_to."""
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named preset (see PRESETS) with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


# The published GPT-2 sizes (Radford et al. 2019; 124M/355M/774M/1558M), context 1024,
# with q/k/v biases and a tied output head as OpenAI trained them; plus small CPU presets.
PRESETS: dict[str, GPTConfig] = {
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12, qkv_bias=True, tie_weights=True),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16, qkv_bias=True, tie_weights=True),
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20, qkv_bias=True, tie_weights=True),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25, qkv_bias=True, tie_weights=True),
    "mini": GPTConfig(context_length=256, emb_dim=384, n_layers=6, n_heads=6, tie_weights=True),
    "tiny": GPTConfig(context_length=128, emb_dim=128, n_layers=4, n_heads=4, tie_weights=True),
    "micro": GPTConfig(context_length=64, emb_dim=32, n_layers=2, n_heads=2, tie_weights=True),
}


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with zero rows appended up to `rows` (the padded vocabulary); unchanged if it has them."""
    extra = rows - tensor.shape[0]
    return torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])]) if extra > 0 else tensor


class FeedForward(nn.Module):
    """Position-wise MLP: expand 4x, GELU (tanh form, as GPT-2), project back."""

    cpu_kernels: bool = False  # set by gpt.cpu_kernels.use_cpu_kernels: GELU in one C++ pass each way

    def __init__(self, emb_dim: int, drop_rate: float):
        super().__init__()
        self.fc = nn.Linear(emb_dim, 4 * emb_dim)
        self.gelu = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * emb_dim, emb_dim)
        self.dropout = Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(x)
        hidden = gelu(hidden) if self.cpu_kernels and applies(hidden) else self.gelu(hidden)
        return self.dropout(self.proj(hidden))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.attn = MultiHeadAttention(cfg.emb_dim, cfg.emb_dim, cfg.context_length, cfg.n_heads,
                                       cfg.drop_rate, cfg.qkv_bias, cfg.use_sdpa)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.ff = FeedForward(cfg.emb_dim, cfg.drop_rate)
        self.drop_shortcut = Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.drop_shortcut(self.attn(self.norm1(x), cache, layer))
        return x + self.ff(self.norm2(x))


class GPTModel(nn.Module):
    """Token + position embeddings, a stack of transformer blocks, final norm, output head."""

    fast_decode: bool = False  # set by gpt.fast_decode.use_fast_decode; read by gpt.generate.generate
    cpu_kernels: bool = False  # set by gpt.cpu_kernels.use_cpu_kernels: the fused loss's exp in one C++ pass

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.init == "gpt2":
            self.apply(self._init_weights)
            # Residual projections scaled down with depth so the residual stream's variance stays flat.
            for name, param in self.named_parameters():
                if name.endswith(("attn.out_proj.weight", "ff.proj.weight")):
                    nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.padded_vocab_size != cfg.vocab_size:
            self._pad_vocab_rows()
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def _pad_vocab_rows(self) -> None:
        # Padded after initialising the real rows, so a padded model draws the same random
        # numbers (and so has the same real weights) as an unpadded one built from the same seed.
        for module in (self.tok_emb, self.out_head):
            module.weight = nn.Parameter(pad_rows(module.weight, self.cfg.padded_vocab_size))
        self.tok_emb.num_embeddings = self.out_head.out_features = self.cfg.padded_vocab_size

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch_size: int, max_length: int | None = None, pad: torch.Tensor | None = None) -> KVCache:
        """An empty KV cache for this model and batch, of `max_length` tokens (default the context
        length), with left padding `pad` (batch,) when its rows' prompts differ in length."""
        param = self.tok_emb.weight
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.n_heads, max_length or self.cfg.context_length,
                       self.cfg.emb_dim // self.cfg.n_heads, device=param.device, dtype=param.dtype, pad=pad)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      tied: TiedGradient | None = None) -> torch.Tensor:
        """Final-norm hidden states (batch, tokens, emb_dim); extends `cache` when given. With `tied`, the token
        lookup adds its gradient into the one the fused loss makes for the tied head (gpt.loss.TiedGradient)."""
        n_tokens = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + n_tokens > self.cfg.context_length:
            raise ValueError(
                f"sequence of {start + n_tokens} tokens exceeds the context length {self.cfg.context_length}"
            )
        if cache is not None and cache.pad is not None:  # a padded row's positions start after its padding
            slots = torch.arange(start, start + n_tokens, device=idx.device)
            positions = self.pos_emb((slots - cache.pad[:, None]).clamp_min(0))
        else:  # positions start..start+n-1 are a slice of the table: a view, no index tensor or gather
            positions = self.pos_emb.weight[start : start + n_tokens]
        tokens = self.tok_emb(idx) if tied is None else tied_lookup(idx, self.tok_emb.weight, tied)
        x = self.drop_emb(tokens + positions)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += n_tokens
        return self.final_norm(x)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """out_head(hidden). With a few rows (decoding steps) it is computed as weight @ hidden.T: MKL
        streams the largest matrix of the model faster that way than as hidden @ weight.T
        (docs/benchmarks.md, batched decoding)."""
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.shape[0] > FEW_ROWS or self.out_head.bias is not None:
            return self.out_head(hidden)
        return torch.mm(self.out_head.weight, rows.t()).t().reshape(*hidden.shape[:-1], -1)

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head's rows of real token ids (padded rows are never predicted). Unpadded, the weight
        itself: the backward of even a whole-length slice fills a zero matrix of the head's size and
        copies the gradient into it: two passes over the head's size in every training step."""
        weight = self.out_head.weight
        return weight if weight.shape[0] == self.cfg.vocab_size else weight[: self.cfg.vocab_size]

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, tokens, vocab_size) for token ids (batch, tokens); with `targets` (batch, tokens),
        the mean next-token cross-entropy against them instead, computed by gpt.loss without the whole
        logits tensor (through forward, so DDP and torch.compile wrappers see it)."""
        # A head tied to the embedding (unpadded: the loss takes the weight itself) shares one gradient matrix.
        tied = TiedGradient() if targets is not None and torch.is_grad_enabled() and self.head_weight is \
            self.tok_emb.weight and not torch.compiler.is_compiling() else None
        hidden = self.hidden_states(idx, cache, tied)
        if targets is not None:
            return head_cross_entropy(hidden, self.head_weight, targets, fused_exp=self.cpu_kernels, tied=tied)
        logits = self._head(hidden)
        if logits.shape[-1] == self.cfg.padded_vocab_size != self.cfg.vocab_size:
            logits = logits[..., : self.cfg.vocab_size]  # padded ids are never predicted
        return logits


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; a tied head counts once (parameters() yields shared tensors once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def memory_estimate(model: nn.Module, training: bool = True) -> dict[str, int]:
    """Bytes for weights and, when training with AdamW, gradients and the two moment buffers.

    Activations are left out: they depend on batch size and context length.
    """
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    estimate = {"weights": weights}
    if training:
        estimate["gradients"] = weights
        estimate["adamw_state"] = 2 * weights
    estimate["total"] = sum(estimate.values())
    return estimate
