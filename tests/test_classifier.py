"""gpt.classifier: padding, the classifying token, metrics, truncation, save/load, and LoRA finetuning."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import flip_last_byte
from torch import nn

from gpt.checkpoint import save_model
from gpt.classifier import (
                            ClassifierSpec,
                            add_class_head,
                            classification_logits,
                            classification_metrics,
                            classify_texts,
                            collate,
                            confusion_matrix,
                            encode_texts,
                            load_classifier,
                            pad_batch,
                            predict_logits,
                            save_classifier,
                            )
from gpt.errors import CheckpointError
from gpt.finetune import FinetuneConfig, fit, select_trainable
from gpt.lora import merge_lora
from gpt.model import GPTConfig, GPTModel
from gpt.tokenizer import END_OF_TEXT_ID, load_tokenizer

LABELS = ("ham", "spam")


def micro_classifier() -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("micro", context_length=16, drop_rate=0.0))
    return add_class_head(model, 2).eval()


def test_class_head_unties_and_has_two_outputs():
    model = micro_classifier()
    assert model.out_head.weight.shape == (2, 32) and model.out_head.bias is not None
    assert model.out_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    assert model.cfg.tie_weights is False


def test_pad_batch_and_collate():
    ids, lengths = pad_batch([[1, 2, 3], [4]], 5)
    assert ids.tolist() == [[1, 2, 3, END_OF_TEXT_ID, END_OF_TEXT_ID], [4] + [END_OF_TEXT_ID] * 4]
    assert lengths.tolist() == [3, 1]
    with pytest.raises(ValueError, match="sequence 0 has 6 tokens"):
        pad_batch([[1] * 6], 5)
    assert collate([[1, 2, 3], [4]], ClassifierSpec(LABELS, "last", 8))[0].shape == (2, 8)
    assert collate([[1, 2, 3], [4]], ClassifierSpec(LABELS, "last_nonpad", 8))[0].shape == (2, 3)


def test_positions_pick_the_right_token():
    model = micro_classifier()
    texts = [[5, 6, 7, 8], [9, 10]]
    ids, lengths = pad_batch(texts, 6)
    hidden = model.hidden_states(ids)
    last = classification_logits(model, ids, lengths, "last")
    assert torch.allclose(last, model.out_head(hidden[:, -1]))
    nonpad = classification_logits(model, ids, lengths, "last_nonpad")
    # The last real token's logits must not depend on the padding after it.
    for row, seq in enumerate(texts):
        alone = classification_logits(model, torch.tensor([seq]), torch.tensor([len(seq)]), "last")
        assert torch.allclose(nonpad[row], alone[0], atol=1e-6)
    with pytest.raises(ValueError, match="unknown classifying position 'first'"):
        classification_logits(model, ids, lengths, "first")


def test_binary_metrics_on_a_hand_made_confusion():
    targets = [0] * 52 + [1] * 48
    predictions = [0] * 50 + [1] * 2 + [0] * 5 + [1] * 43
    confusion = confusion_matrix(targets, predictions, 2)
    assert confusion == [[50, 2], [5, 43]]
    scores = classification_metrics(confusion, LABELS)
    assert scores["accuracy"] == pytest.approx(0.93)
    spam = scores["per_class"]["spam"]
    assert spam["precision"] == pytest.approx(43 / 45) and spam["recall"] == pytest.approx(43 / 48)
    assert spam["f1"] == pytest.approx(2 * 43 / (2 * 43 + 2 + 5)) and spam["support"] == 48
    assert scores["macro_f1"] == pytest.approx((2 * 50 / (2 * 50 + 2 + 5) + 2 * 43 / (2 * 43 + 2 + 5)) / 2)


def test_multiclass_metrics_on_a_hand_made_confusion():
    # true down, predicted across:  a  b  c
    confusion = [[5, 1, 0],   # a: 6 true
                 [2, 3, 1],   # b: 6 true
                 [0, 0, 0]]   # c: never true, never predicted
    scores = classification_metrics(confusion, ("a", "b", "c"))
    assert scores["accuracy"] == pytest.approx(8 / 12)
    assert scores["per_class"]["a"] == pytest.approx({"precision": 5 / 7, "recall": 5 / 6, "f1": 10 / 13,
                                                      "support": 6})
    assert scores["per_class"]["b"] == pytest.approx({"precision": 3 / 4, "recall": 3 / 6, "f1": 0.6, "support": 6})
    # Every ratio of a class with no true and no predicted rows is undefined, so 0; it still counts in the mean.
    assert scores["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert scores["macro_precision"] == pytest.approx((5 / 7 + 3 / 4) / 3)
    assert scores["macro_recall"] == pytest.approx((5 / 6 + 1 / 2) / 3)
    assert scores["macro_f1"] == pytest.approx((10 / 13 + 0.6) / 3)
    assert classification_metrics([[0, 0], [0, 0]], LABELS)["accuracy"] == 0.0
    with pytest.raises(ValueError, match="2 rows for 3 labels"):
        classification_metrics([[1, 0], [0, 1]], ("a", "b", "c"))


def test_truncation_keeps_the_first_tokens_and_empty_text_is_an_error(bpe_dir: Path):
    tokenizer = load_tokenizer(bpe_dir)
    text = "one two three four five six <|endoftext|>"
    full = tokenizer.encode(text, disallowed_special=())
    assert encode_texts(tokenizer, [text], 3) == [full[:3]]
    assert END_OF_TEXT_ID not in full  # special-token text is read as plain text
    with pytest.raises(ValueError, match=r"^row 2: empty text"):
        encode_texts(tokenizer, ["fine", "  \n"], 8)


def test_classify_texts_gives_labels_and_probabilities(bpe_dir: Path):
    labels, probabilities = classify_texts(micro_classifier(), load_tokenizer(bpe_dir), ["hi there", "WIN " * 40],
                                           ClassifierSpec(LABELS, "last_nonpad", 16))
    assert len(labels) == 2 and set(labels) <= set(LABELS)
    assert probabilities.shape == (2, 2) and torch.allclose(probabilities.sum(-1), torch.ones(2))


def test_save_load_round_trip_and_tampering_refused(tmp_path: Path):
    model, spec = micro_classifier(), ClassifierSpec(LABELS, "last", 12)
    save_classifier(model, spec, tmp_path / "clf")
    loaded, loaded_spec = load_classifier(tmp_path / "clf")
    assert loaded_spec == spec
    texts = [[1, 2, 3], [4, 5]]
    assert torch.equal(predict_logits(loaded, texts, spec), predict_logits(model, texts, spec))

    flip_last_byte(tmp_path / "clf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_classifier(tmp_path / "clf")

    save_model(GPTModel(GPTConfig.from_preset("micro")), tmp_path / "lm")
    with pytest.raises(CheckpointError, match="not a classifier"):
        load_classifier(tmp_path / "lm")


def test_lora_mode_trains_only_adapters_and_head(tmp_path: Path):
    model = micro_classifier()
    select_trainable(model, "lora", lora_rank=2, lora_alpha=4.0, always=[model.out_head])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("out_head.") for name in trainable)
    assert {"out_head.weight", "out_head.bias"} <= trainable
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (8, 6), generator=generator)
    targets = (ids[:, -1] % 2).long()

    def batches(epoch):
        yield ids, torch.full((8,), 6), targets

    def loss_fn(net, batch):
        return nn.functional.cross_entropy(classification_logits(net, batch[0], batch[1]), batch[2])

    fit(model.train(), batches, loss_fn, FinetuneConfig(lr=1e-2, epochs=3))
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    spec = ClassifierSpec(LABELS, "last", 6)
    before = predict_logits(model, ids.tolist(), spec)
    merge_lora(model)
    save_classifier(model, spec, tmp_path / "clf")
    assert torch.allclose(predict_logits(load_classifier(tmp_path / "clf")[0], ids.tolist(), spec), before, atol=1e-5)


def test_fit_keeps_lr_constant_unless_min_lr_asks_for_warmup_and_cosine():
    model = micro_classifier()
    ids = torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(0))

    def batches(epoch):
        return [(ids, torch.full((4,), 6), ids[:, -1] % 2)] * 5

    def loss_fn(net, batch):
        return nn.functional.cross_entropy(classification_logits(net, batch[0], batch[1]), batch[2])

    constant = fit(model, batches, loss_fn, FinetuneConfig(lr=1e-3, epochs=2, eval_every=0))
    assert [r["lr"] for r in constant] == [1e-3] * 10
    cosine = fit(model, batches, loss_fn, FinetuneConfig(lr=1e-3, min_lr=1e-5, warmup_steps=2, epochs=2, eval_every=0))
    lrs = [r["lr"] for r in cosine]
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3])  # linear warmup, then the peak
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # then decays every step
    assert 1e-5 < lrs[-1] < 1e-4  # towards min_lr, which it reaches after the last step
