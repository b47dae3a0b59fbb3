"""GPT-2 BPE built from local verified files."""
import shutil

import pytest

from gpt.tokenizer import END_OF_TEXT_ID, TokenizerError, get_tokenizer, load_tokenizer


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


def test_cache_is_filled_from_mirror_once(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path / "cache"))
    tok = get_tokenizer(mirror=mirror, offline=True)
    assert tok.encode("Hello, world") == [15496, 11, 995]
    assert (tmp_path / "cache" / "gpt2_bpe" / "vocab.bpe").is_file()
    # Second call needs neither mirror nor network.
    assert get_tokenizer(offline=True).encode("Hello") == [15496]


def test_offline_without_files_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LLM_PIPELINE_MIRROR", raising=False)
    with pytest.raises(TokenizerError, match="encoder.json.*offline"):
        get_tokenizer(offline=True)
