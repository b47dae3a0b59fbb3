"""Run by tests/test_ddp.py under `torchrun --nproc_per_node=2`: gpt.train.Trainer data-parallel.

Usage: ddp_worker.py OUT (an existing folder, shared by the ranks). Rank 0 writes checkpoints
under OUT/a and OUT/b, OUT/result.json (loss histories) and OUT/weights.safetensors:
  straight  - no dropout, grad_accum 2, to compare with one process;
  dropout   - dropout 0.1, uninterrupted;
  resumed   - dropout 0.1, crashed on every rank right after the step-3 checkpoint, then resumed
              by a fresh Trainer (other init seed); must equal `dropout` exactly, which needs each
              rank's own RNG state back.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from gpt import distributed
from gpt.checkpoint import weights_state_dict
from gpt.model import GPTConfig, GPTModel
from gpt.train import Trainer
from test_train import CFG, Crash, tokens


def train(drop_rate: float, checkpoint_dir: Path | None = None, crash_at: int | None = None,
          seed: int = 1) -> tuple[list[dict], GPTModel]:
    """CFG's run (grad_accum 2, checkpoints every 3 steps) of a micro model; (history, model)."""
    class Crashing(Trainer):
        def save_checkpoint(self) -> None:
            super().save_checkpoint()
            if self.state.step == crash_at:
                raise Crash

    torch.manual_seed(seed)
    model = GPTModel(GPTConfig.from_preset("micro", vocab_size=128, context_length=16, drop_rate=drop_rate))
    state = Crashing(model, tokens(), tokens(600, seed=9), CFG, checkpoint_dir).run()
    return state.history, model


def main(out: Path) -> None:
    distributed.setup(torch.device("cpu"))
    straight, model = train(0.0)
    histories = distributed.gather_to_main(straight)  # every rank must hold the same (global) curve
    dropout, _ = train(0.1, out / "a")
    try:
        train(0.1, out / "b", crash_at=3)
    except Crash:
        pass
    resumed, _ = train(0.1, out / "b", seed=99)
    if distributed.is_main():
        result = {"straight": straight, "dropout": dropout, "resumed": resumed,
                  "ranks_agree": all(h == straight for h in histories)}
        (out / "result.json").write_text(json.dumps(result))
        save_file(weights_state_dict(model), str(out / "weights.safetensors"))
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
