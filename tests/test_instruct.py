"""gpt.instruct: prompt format, collate (padding, end-of-text, prompt mask, truncation), scores."""
from __future__ import annotations

import pytest
import torch

from gpt.instruct import (IGNORE_INDEX, Example, collate, encode_example, format_input, format_prompt,
                          make_batches, rouge_l_f1, token_f1)
from gpt.tokenizer import load_tokenizer

E = 50256  # <|endoftext|>, the padding id


def test_prompt_without_input_has_no_input_section():
    assert format_prompt("Name a color.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a color.\n\n### Response:\n")


def test_prompt_with_input():
    assert format_input("Fix the spelling.", "freind") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nFix the spelling.\n\n### Input:\nfreind")
    assert format_prompt("Fix the spelling.", "freind").endswith("### Input:\nfreind\n\n### Response:\n")


def test_encode_example_splits_prompt_and_response(bpe_dir):
    tokenizer = load_tokenizer(bpe_dir)
    example = encode_example(tokenizer, "Name a color.", "", "Blue.")
    prompt = tokenizer.encode_ordinary(format_prompt("Name a color."))
    assert example.prompt_length == len(prompt)
    assert example.ids == prompt + tokenizer.encode_ordinary("Blue.")


# The book's own collate example (chapter 7): three sequences of lengths 5, 2 and 3.
BOOK_BATCH = [Example([0, 1, 2, 3, 4], 2), Example([5, 6], 1), Example([7, 8, 9], 2)]


def test_collate_pads_with_end_of_text_and_ignores_the_rest_of_the_padding():
    inputs, targets = collate(BOOK_BATCH)
    assert torch.equal(inputs, torch.tensor([[0, 1, 2, 3, 4], [5, 6, E, E, E], [7, 8, 9, E, E]]))
    assert torch.equal(targets, torch.tensor([[1, 2, 3, 4, E], [6, E, -100, -100, -100], [8, 9, E, -100, -100]]))


def test_prompt_mask_changes_exactly_the_prompt_targets():
    plain = collate(BOOK_BATCH)[1]
    inputs, masked = collate(BOOK_BATCH, mask_prompt=True)
    assert torch.equal(inputs, collate(BOOK_BATCH)[0])
    # Targets predicting prompt tokens 1..prompt_length-1 go; the first prompt token is never a target.
    expected = plain.clone()
    expected[0, :1] = IGNORE_INDEX
    expected[2, :1] = IGNORE_INDEX
    assert torch.equal(masked, expected)
    assert torch.equal(masked[1], plain[1])  # prompt of one token: nothing to mask


def test_truncation_cuts_inputs_and_targets_to_max_length():
    inputs, targets = collate(BOOK_BATCH, max_length=3)
    assert torch.equal(inputs, torch.tensor([[0, 1, 2], [5, 6, E], [7, 8, 9]]))
    assert torch.equal(targets, torch.tensor([[1, 2, 3], [6, E, -100], [8, 9, E]]))
    assert collate(BOOK_BATCH, max_length=99)[0].shape == (3, 5)


def test_make_batches_keeps_order_or_shuffles_by_seed():
    examples = [Example([i, i], 1) for i in range(10)]
    plain = make_batches(examples, 4)
    assert [b[0].shape[0] for b in plain] == [4, 4, 2]
    assert plain[0][0][:, 0].tolist() == [0, 1, 2, 3]
    first = make_batches(examples, 4, shuffle=True, seed=1, drop_last=True)
    assert len(first) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, make_batches(examples, 4, shuffle=True, seed=1)))
    assert not torch.equal(first[0][0], make_batches(examples, 4, shuffle=True, seed=2)[0][0])


@pytest.mark.parametrize(("reference", "candidate", "rouge", "f1"), [
    ("The cat sat on the mat.", "The cat sat on the mat.", 1.0, 1.0),
    # LCS "the cat on the mat" = 5 of 6 words each way.
    ("The cat sat on the mat.", "the cat LAY on the mat", 5 / 6, 5 / 6),
    # Same words in another order: LCS "the cat sat" (or "on the mat") = 3 of 6; bag overlap 6 of 6.
    ("The cat sat on the mat.", "On the mat, the cat sat", 0.5, 1.0),
    # P = 1/3, R = 1: F1 = 2 * (1/3) / (4/3) = 0.5.
    ("Yes", "yes it is", 0.5, 0.5),
    ("a b c d", "d c b a", 0.25, 1.0),
    ("Jane Austen.", "Charles Dickens", 0.0, 0.0),
    ("", "", 1.0, 1.0),
    ("Blue.", "", 0.0, 0.0),
])
def test_rouge_l_and_token_f1_on_hand_checked_values(reference, candidate, rouge, f1):
    assert rouge_l_f1(reference, candidate) == pytest.approx(rouge)
    assert token_f1(reference, candidate) == pytest.approx(f1)


def test_token_f1_counts_repeated_words_once_per_occurrence():
    # reference {the: 2, cat: 1}, candidate {the: 4}: overlap 2, P = 2/4, R = 2/3, F1 = 4/7.
    assert token_f1("the the cat", "the the the the") == pytest.approx(4 / 7)
    assert rouge_l_f1("the the cat", "the the the the") == pytest.approx(4 / 7)

