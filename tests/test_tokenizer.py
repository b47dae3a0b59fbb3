"""GPT-2 BPE built from local verified files."""
import shutil

import pytest

from gpt.tokenizer import END_OF_TEXT_ID, TokenizerError, load_tokenizer


def test_known_ids(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert tok.encode("Hello, world") == [15496, 11, 995]
    assert tok.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [END_OF_TEXT_ID]
    assert tok.n_vocab == 50257


def test_special_token_refused_unless_allowed(bpe_dir):
    with pytest.raises(ValueError):
        load_tokenizer(bpe_dir).encode("<|endoftext|>")


def test_round_trip_on_real_text(bpe_dir, mirror):
    tok = load_tokenizer(bpe_dir)
    text = (mirror / "the-verdict.txt").read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert len(ids) == 5145  # the count the book prints for the-verdict
    assert tok.decode(ids) == text


def test_missing_file_is_named(bpe_dir, tmp_path):
    shutil.copy(bpe_dir / "encoder.json", tmp_path / "encoder.json")
    with pytest.raises(TokenizerError, match=r"vocab\.bpe: missing"):
        load_tokenizer(tmp_path)


def test_corrupt_file_is_named(bpe_dir, tmp_path):
    shutil.copy(bpe_dir / "encoder.json", tmp_path / "encoder.json")
    data = (bpe_dir / "vocab.bpe").read_bytes()
    (tmp_path / "vocab.bpe").write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenizerError, match=r"vocab\.bpe: corrupt"):
        load_tokenizer(tmp_path)
