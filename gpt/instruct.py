"""Instruction finetuning pieces: the Alpaca-style prompt, padded batches with loss masks, and answer scores."""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, NamedTuple, Sequence

import torch

from gpt.data import EpochBatchSampler
from gpt.generate import generate_texts
from gpt.loss import IGNORE_INDEX  # targets gpt.train.batch_loss skips
from gpt.model import GPTModel
from gpt.tokenizer import END_OF_TEXT_ID
from gpt.train import batch_loss

INTRO = ("Below is an instruction that describes a task. "
         "Write a response that appropriately completes the request.")
RESPONSE_HEADER = "\n\n### Response:\n"


def format_input(instruction: str, input_text: str = "") -> str:
    """The instruction part of the prompt; the `### Input:` part appears only for a non-empty input."""
    text = f"{INTRO}\n\n### Instruction:\n{instruction}"
    return f"{text}\n\n### Input:\n{input_text}" if input_text else text


def format_prompt(instruction: str, input_text: str = "") -> str:
    """What the model sees before it answers: the instruction part and the response header."""
    return format_input(instruction, input_text) + RESPONSE_HEADER


class Example(NamedTuple):
    """Token ids of prompt + response (without the end-of-text) and how many of them are prompt."""

    ids: list[int]
    prompt_length: int


def encode_example(tokenizer, instruction: str, input_text: str, output: str) -> Example:
    """Encode prompt and response apart, so the prompt's tokens are exactly those seen at generation time."""
    # encode_ordinary: a literal "<|endoftext|>" in the data is text, never the padding id.
    prompt = tokenizer.encode_ordinary(format_prompt(instruction, input_text))
    return Example(prompt + tokenizer.encode_ordinary(output), len(prompt))


def collate(examples: Sequence[Example], max_length: int | None = None, mask_prompt: bool = False,
            pad_id: int = END_OF_TEXT_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of one batch, as the book builds them.

    Each sequence gets one end-of-text appended and is padded with it to the batch's longest;
    inputs are seq[:-1], targets seq[1:]. The first end-of-text stays a target (the model learns
    to stop), the padding after it becomes IGNORE_INDEX, and with `mask_prompt` so do the targets
    that predict prompt tokens. Both are then cut to `max_length` tokens.
    """
    width = max(len(example.ids) for example in examples)  # +1 end-of-text, -1 for the shift
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(examples):
        sequence = torch.tensor([*ids, pad_id], dtype=torch.long)
        inputs[row, : len(ids)] = sequence[:-1]
        targets[row, : len(ids)] = sequence[1:]
        if mask_prompt:
            targets[row, : prompt_length - 1] = IGNORE_INDEX
    return inputs[:, :max_length], targets[:, :max_length]


def make_batches(examples: Sequence[Example], batch_size: int, max_length: int | None = None,
                 mask_prompt: bool = False, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Collated batches in file order, or shuffled by `seed` (pass seed + epoch for a new order each epoch)."""
    sampler = EpochBatchSampler(len(examples), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
    return [collate([examples[i] for i in rows], max_length, mask_prompt) for rows in sampler]


def device_loss(model: GPTModel, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of one CPU batch, on the model's device; IGNORE_INDEX targets do not count."""
    device = next(model.parameters()).device
    inputs, targets = batch
    return batch_loss(model, inputs.to(device), targets.to(device))


@torch.no_grad()
def mean_loss(model: GPTModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The mean of the batches' mean losses, as the book's calc_loss_loader computes it."""
    was_training = model.training
    model.eval()
    losses = [device_loss(model, batch).item() for batch in batches]
    model.train(was_training)
    if not losses:
        raise ValueError("no batches to compute a loss on")
    return sum(losses) / len(losses)


def respond(model: GPTModel, tokenizer, instruction: str, input_text: str = "", max_new_tokens: int = 256,
            **sampling) -> str:
    """The model's response to an instruction (greedy unless `sampling` says otherwise), stopped at end-of-text."""
    return respond_all(model, tokenizer, [(instruction, input_text)], max_new_tokens, **sampling)[0]


def respond_all(model: GPTModel, tokenizer, requests: Sequence[tuple[str, str]], max_new_tokens: int = 256,
                **sampling) -> list[str]:
    """respond() to each (instruction, input) pair, decoded in batches (gpt.generate.generate_batch)."""
    prompts = [format_prompt(instruction, input_text) for instruction, input_text in requests]
    return [text.strip() for text in generate_texts(model, tokenizer, prompts, max_new_tokens, **sampling)]


def words(text: str) -> list[str]:
    """Lowercase alphanumeric runs: the tokenization rouge_score uses (without its optional stemming)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _f1(overlap: int, n_candidate: int, n_reference: int) -> float:
    if n_candidate == 0 or n_reference == 0:
        return float(n_candidate == n_reference)  # both empty is a perfect answer, one empty a miss
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_candidate, overlap / n_reference
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(reference: str, candidate: str) -> float:
    """ROUGE-L F1 (beta 1): the longest common word subsequence over candidate and reference lengths."""
    ref, cand = words(reference), words(candidate)
    return _f1(_lcs_length(ref, cand), len(cand), len(ref))


def token_f1(reference: str, candidate: str) -> float:
    """SQuAD-style F1 of the word multisets, ignoring order."""
    ref, cand = words(reference), words(candidate)
    return _f1(sum((Counter(ref) & Counter(cand)).values()), len(cand), len(ref))
