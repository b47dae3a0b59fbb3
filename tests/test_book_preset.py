"""The `book` preset's first 10 training steps on the-verdict, against figures derived from its settings."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from gpt.data import load_tokens
from gpt.model import GPTModel
from gpt.tokenizer import load_tokenizer
from gpt.train import Trainer
from pipeline.corpus import write_corpus_tokens
from pipeline.presets import preset_params
from pipeline.stages.pretrain import model_config, train_config

REPO = Path(__file__).resolve().parents[1]
VOCAB = 50257


def test_first_ten_steps_start_at_the_init_loss_and_fall_to_the_unigram_entropy(mirror, tmp_path):
    params = preset_params("book", REPO / "params.yaml")[0]
    cfg = {**params["pretrain"], "max_steps": 10, "eval_every": 0, "sample_every": 0, "checkpoint_every": 0}
    corpus = params["tokenize"]["corpus"]
    write_corpus_tokens([mirror / "the-verdict.txt"], "text", load_tokenizer(mirror / "gpt2_bpe"),
                        corpus["train_ratio"], corpus["split"], tmp_path / "train.bin", tmp_path / "val.bin")
    train, val = load_tokens(tmp_path / "train.bin"), load_tokens(tmp_path / "val.bin")
    torch.manual_seed(cfg["seed"])
    model = GPTModel(model_config(cfg))
    losses = [record["loss"] for record in Trainer(model, train, val, train_config(cfg)).run().history]

    # Step 1 is the untrained model's loss. The final LayerNorm (weight 1, bias 0 at PyTorch's init)
    # gives each position a vector with mean square exactly 1; the untied head's weights are
    # U(-1/sqrt(768), 1/sqrt(768)), of variance 1/(3 * 768); so every logit is a sum of 768 terms of
    # total variance 1/3, close to N(0, 1/3). For V such logits, E[log sum exp] = ln V + 1/6 and the
    # target's logit averages 0: the loss is ln(50,257) + 1/6 = 10.99. The batch's 512 targets
    # average it with a spread of about sqrt(1/3 / 512) = 0.026; 0.1 is four of those.
    assert abs(losses[0] - (math.log(VOCAB) + 1 / 6)) < 0.1, losses

    # Ten steps (20 of the 18 train windows, one pass over the text) mostly teach the model how often
    # each token occurs: the loss falls most of the way from 10.99 to the unigram entropy of the train
    # tokens (6.01 nats for the-verdict's 4,612), and using the context to go far below it takes more
    # passes (the book's run is at 6.66 after 11 updates, 5.96 after 16).
    counts = np.bincount(np.asarray(train), minlength=VOCAB)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    assert abs(unigram - 6.01) < 0.01  # the-verdict as the book cuts it (90% of its characters)
    assert unigram - 0.5 < losses[-1] < unigram + 1.5, losses
    assert all(loss < losses[0] for loss in losses[1:]), losses  # every update helped from the start
