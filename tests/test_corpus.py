"""pipeline.data.corpus: streaming validation failures, and tokens equal to encode_ordinary of each document part."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from gpt.data import load_tokens
from gpt.tokenizer import END_OF_TEXT_ID, load_tokenizer
from pipeline.core.errors import DataError
import pipeline.data.corpus as corpus
from pipeline.data.corpus import check_corpus, describe_failure, write_corpus_tokens


@pytest.fixture(scope="module")
def enc(bpe_dir: Path):
    return load_tokenizer(bpe_dir)


def joined(enc, texts: list[str]) -> list[int]:
    """The reference: encode_ordinary of each text, <|endoftext|> between consecutive ones."""
    tokens: list[int] = []
    for index, text in enumerate(texts):
        if index:
            tokens.append(END_OF_TEXT_ID)
        tokens += enc.encode_ordinary(text)
    return tokens


def cut_reference(enc, texts: list[str], ratio: float) -> tuple[list[int], list[int]]:
    cuts = [int(ratio * len(text)) for text in texts]
    return (joined(enc, [t[:c] for t, c in zip(texts, cuts)]), joined(enc, [t[c:] for t, c in zip(texts, cuts)]))


def tokenize(tmp_path: Path, files: list[Path], enc, ratio: float = 0.9, split: str = "cut", field: str = "text",
             **kwargs) -> tuple[list[int], list[int], dict]:
    out = tmp_path / "out"
    stats = write_corpus_tokens(files, field, enc, ratio, split, out / "train.bin", out / "val.bin", **kwargs)
    return load_tokens(out / "train.bin").tolist(), load_tokens(out / "val.bin").tolist(), stats


def jsonl(path: Path, records: list, field: str = "text") -> list[str]:
    """Write records (strings become {field: string}) one per line; return the document texts."""
    lines = [json.dumps({field: r} if isinstance(r, str) else r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [r if isinstance(r, str) else r[field] for r in records]


# -- tokens equal encode_ordinary -----------------------------------------------------------------
@pytest.mark.parametrize("sizes", [{}, {"chunk_chars": 4099, "block_bytes": 10007}])
def test_tinyshakespeare_cut_equals_encode_ordinary(enc, mirror: Path, tmp_path: Path, sizes: dict):
    path = mirror / "tinyshakespeare.txt"
    text = path.read_text(encoding="utf-8")
    train, val, stats = tokenize(tmp_path, [path], enc, 0.9, **sizes)
    cut = int(0.9 * len(text))
    assert train == enc.encode_ordinary(text[:cut])
    assert val == enc.encode_ordinary(text[cut:])
    assert stats["documents"] == 1 and stats["bytes"] == len(text.encode("utf-8"))
    assert (stats["train_tokens"], stats["val_tokens"]) == (len(train), len(val))


def mixed_folder(root: Path, verdict: str) -> tuple[list[Path], list[str]]:
    """Every format, a custom text field, and documents that test the edges; files sorted by name."""
    root.mkdir()
    texts = [verdict[:3000], "# Notes\n\nÉté  <|endoftext|> stays text\n\n\n   indented\n"]
    (root / "a.txt").write_text(texts[0], encoding="utf-8")
    (root / "b.md").write_text(texts[1], encoding="utf-8")
    texts += jsonl(root / "c.jsonl", ["x", "", "two  spaces\n\n two", {"body": "lone \ud800 surrogate"},
                                      verdict[3000:9000], "日本語 テキスト\n"], field="body")
    with (root / "c.jsonl").open("a", encoding="utf-8") as handle:
        handle.write("\n   \n")  # blank lines are skipped
    (root / "d.txt.gz").write_bytes(gzip.compress(verdict[9000:].encode("utf-8")))
    texts.append(verdict[9000:])
    gz_docs = ["first\r\nsecond", "  leading spaces", "trailing spaces   "]
    (root / "e.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"body": t}) + "\n" for t in gz_docs).encode()))
    texts += gz_docs
    return sorted(root.iterdir()), texts


@pytest.mark.parametrize("sizes", [{}, {"chunk_chars": 7, "block_bytes": 5}])
def test_mixed_folder_equals_encode_ordinary(enc, mirror: Path, tmp_path: Path, sizes: dict):
    files, texts = mixed_folder(tmp_path / "corpus", (mirror / "the-verdict.txt").read_text(encoding="utf-8"))
    train, val, stats = tokenize(tmp_path, files, enc, 0.7, field="body", **sizes)
    assert (train, val) == cut_reference(enc, texts, 0.7)
    assert stats["documents"] == len(texts) == 12
    assert stats["bytes"] == sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


TRICKY = "a\n\n b   x\t\n  \ny \n\n\n  z  \u00a0 w\r\n\r\n v'" + "s  é\n \n" + "日本 \u3000 x\x1c y" + "   "


@pytest.mark.parametrize("chunk_chars, block_bytes", [(1, 1), (2, 3), (3, 2), (5, 7), (64, 11)])
@pytest.mark.parametrize("threads", [1, 3])
def test_chunk_and_block_boundaries_inside_whitespace_runs(enc, tmp_path: Path, chunk_chars: int, block_bytes: int,
                                                           threads: int):
    text = TRICKY * 40
    path = tmp_path / "tricky.txt"
    path.write_text(text, encoding="utf-8")
    for ratio in (0.5, 0.37):
        train, val, _ = tokenize(tmp_path, [path], enc, ratio, threads=threads, chunk_chars=chunk_chars,
                                 block_bytes=block_bytes)
        assert (train, val) == cut_reference(enc, [text], ratio)
    docs = jsonl(tmp_path / "tricky.jsonl", [TRICKY * k for k in range(1, 6)])
    train, val, _ = tokenize(tmp_path, [tmp_path / "tricky.jsonl"], enc, 0.5, threads=threads,
                             chunk_chars=chunk_chars, block_bytes=block_bytes)
    assert (train, val) == cut_reference(enc, docs, 0.5)


@pytest.mark.parametrize("chunk_chars", [1, 10, 1 << 18])
def test_end_of_text_in_documents_stays_ordinary_text(enc, tmp_path: Path, chunk_chars: int):
    # Batches are encoded with "<|endoftext|>" allowed as the separator; the text of documents must not be.
    docs = jsonl(tmp_path / "special.jsonl", ["ends with <|endof", "text|> starts it", "", "<|endoftext|>",
                                              "a <|endoftext|> b", "<|endoftext", "|>"])
    train, val, _ = tokenize(tmp_path, [tmp_path / "special.jsonl"], enc, 1.0, chunk_chars=chunk_chars)
    assert train == joined(enc, docs) and train.count(END_OF_TEXT_ID) == len(docs) - 1
    assert val == [END_OF_TEXT_ID] * (len(docs) - 1)  # every document's empty val side, joined


def goes_to_val(name: str, index: int, ratio: float) -> bool:
    """The documented rule: blake2b-64 of "<file name>\\n<index>" as a fraction of 2**64, val if >= ratio."""
    digest = hashlib.blake2b(f"{name}\n{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 >= ratio


def test_document_split_is_deterministic(enc, tmp_path: Path):
    root = tmp_path / "docs"
    root.mkdir()
    docs = jsonl(root / "many.jsonl", [f"Document {i}: " + "words and more words " * (i % 7) for i in range(300)])
    (root / "whole.txt").write_text("A whole file is one document.\n", encoding="utf-8")
    files = sorted(root.iterdir())
    first = tokenize(tmp_path, files, enc, 0.8, "document", chunk_chars=50)
    second = tokenize(tmp_path, files, enc, 0.8, "document")
    assert first[:2] == second[:2]
    named = [("many.jsonl", i, d) for i, d in enumerate(docs)] + [("whole.txt", 0, "A whole file is one document.\n")]
    train = [d for name, i, d in named if not goes_to_val(name, i, 0.8)]
    val = [d for name, i, d in named if goes_to_val(name, i, 0.8)]
    assert len(train) > 200 and len(val) > 20
    assert first[:2] == (joined(enc, train), joined(enc, val))
    assert first[2]["documents"] == 301


# -- validation ---------------------------------------------------------------------------------
def bad_corpus(root: Path) -> dict[str, Path]:
    root.mkdir()
    files = {
        "bad_utf8.txt": b"line one\nline two \xff\nthree\n",
        "binary.txt": b"abc\ndef\x00ghi\n",
        "empty.txt": b"",
        "blank.md": b"  \n\t\n",
        "cut_char.txt": b"ok\n\xe2\x82",  # ends inside a character
        "notes.jsonl": b"\n".join([
            b'{"text": "fine"}', b"", b'{"text": "broken', b"[1, 2]", b'{"other": "x"}', b'{"text": 5}',
            b'{"text": "  "}', b'{"text": "caf\xe9"}']) + b"\n",
        "not_gzip.txt.gz": b"plain text, not gzip",
        "truncated.jsonl.gz": gzip.compress(b'{"text": "a"}\n' * 100)[:-12],
        "slides.pdf": b"%PDF-1.4",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {name: root / name for name in files}


def test_each_validation_failure_names_file_and_line(enc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(corpus, "BLOCK_BYTES", 4)  # line numbers and offsets across block boundaries
    paths = bad_corpus(tmp_path / "bad")
    summary, failures = check_corpus(sorted(paths.values()), "text", enc, min_tokens=1)
    found = {(Path(f["file"]).name, f["line"], f["check"]) for f in failures}
    assert found == {
        ("bad_utf8.txt", 2, "utf8"), ("binary.txt", 2, "binary"), ("empty.txt", None, "empty_file"),
        ("blank.md", None, "empty_file"), ("cut_char.txt", 2, "utf8"), ("notes.jsonl", 3, "json"),
        ("notes.jsonl", 4, "not_object"), ("notes.jsonl", 5, "missing_field"), ("notes.jsonl", 6, "text_type"),
        ("notes.jsonl", 7, "empty_text"), ("notes.jsonl", 8, "utf8"), ("not_gzip.txt.gz", None, "gzip"),
        ("truncated.jsonl.gz", None, "gzip"), ("slides.pdf", None, "file_type"),
    }
    by_check = {(Path(f["file"]).name, f["check"]): f for f in failures}
    assert by_check[("bad_utf8.txt", "utf8")]["value"].startswith("byte 18:")
    assert by_check[("cut_char.txt", "utf8")]["value"].startswith("byte 3:")
    assert by_check[("binary.txt", "binary")]["value"] == "byte 7"
    assert describe_failure(by_check[("notes.jsonl", "missing_field")]) == f"{paths['notes.jsonl']} line 5: missing field 'text'"
    assert describe_failure(by_check[("empty.txt", "empty_file")]) == f"{paths['empty.txt']}: empty file"
    assert describe_failure(by_check[("slides.pdf", "file_type")]).endswith(
        "slides.pdf: unsupported file type; use .txt, .md, .jsonl or .gz of them")
    assert summary["files"] == 9 and summary["failures_total"] == len(failures) == 14


def test_failures_are_capped_but_counted(enc, tmp_path: Path):
    paths = bad_corpus(tmp_path / "bad")
    summary, failures = check_corpus(sorted(paths.values()), "text", enc, min_tokens=1, max_failures=3)
    assert len(failures) == 3 and summary["failures_total"] == 14


def test_a_clean_corpus_passes_with_its_summary(enc, mirror: Path, tmp_path: Path):
    files, texts = mixed_folder(tmp_path / "corpus", (mirror / "the-verdict.txt").read_text(encoding="utf-8"))
    summary, failures = check_corpus(files, "body", enc, min_tokens=100)
    assert [f["check"] for f in failures] == ["empty_text"]  # the "" document of c.jsonl
    assert summary["documents"] == len(texts) and summary["files"] == 5
    assert summary["chars"] == sum(len(t) for t in texts)


def test_min_tokens_counts_joined_documents_and_reports_too_few(enc, tmp_path: Path):
    docs = jsonl(tmp_path / "short.jsonl", ["hello world", "foo"])
    total = len(joined(enc, docs))
    summary, failures = check_corpus([tmp_path / "short.jsonl"], "text", enc, min_tokens=total + 1)
    assert failures == [{"file": None, "line": None, "check": "min_tokens",
                         "value": f"{total} tokens, fewer than pretrain.context_length + 1 = {total + 1}"}]
    summary, failures = check_corpus([tmp_path / "short.jsonl"], "text", enc, min_tokens=total)
    assert failures == [] and summary["tokens_counted"] == total


def test_min_tokens_stops_tokenizing_early(enc, mirror: Path, monkeypatch: pytest.MonkeyPatch):
    encoded = []

    def counting(enc, text):
        encoded.append(len(text))
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    monkeypatch.setattr(corpus, "encode_ids", counting)
    summary, failures = check_corpus([mirror / "tinyshakespeare.txt"], "text", enc, min_tokens=1000)
    assert failures == [] and summary["tokens_counted"] >= 1000
    assert sum(encoded) <= 2 * corpus.COUNT_CHUNK_CHARS < summary["chars"] // 4


# -- errors leave nothing behind ----------------------------------------------------------------
@pytest.mark.parametrize("bad_name, bad_data, message", [
    ("z.jsonl", b'{"text": "ok"}\n{"text": \n', "z.jsonl line 2: invalid JSON"),
    ("z.txt", b"fine\nfine\nnot \xc3\x28 fine\n", "z.txt line 3: not valid UTF-8 (byte 14:"),
    ("z.jsonl.gz", b"not gzip", "z.jsonl.gz: not valid gzip"),
    ("z.csv", b"a,b\n", "z.csv: unsupported file type"),
])
def test_an_error_leaves_no_output_and_no_temp_files(enc, mirror: Path, tmp_path: Path, bad_name: str,
                                                     bad_data: bytes, message: str):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text((mirror / "the-verdict.txt").read_text(encoding="utf-8") * 3, encoding="utf-8")
    (root / bad_name).write_bytes(bad_data)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        write_corpus_tokens(sorted(root.iterdir()), "text", enc, 0.9, "cut", out / "train.bin", out / "val.bin",
                            chunk_chars=500)
    assert not out.exists() or list(out.iterdir()) == []


def test_a_missing_file_is_a_failure_and_a_data_error(enc, tmp_path: Path):
    missing = tmp_path / "gone.txt"
    _, failures = check_corpus([missing], "text", enc, min_tokens=0)
    assert [describe_failure(f) for f in failures] == [f"{missing}: cannot be read (No such file or directory)"]
    with pytest.raises(DataError, match="gone.txt: cannot be read"):
        write_corpus_tokens([missing], "text", enc, 0.9, "cut", tmp_path / "out" / "t.bin", tmp_path / "out" / "v.bin")
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_arguments_are_refused(enc, tmp_path: Path):
    with pytest.raises(ValueError, match="split"):
        write_corpus_tokens([], "text", enc, 0.9, "random", tmp_path / "t.bin", tmp_path / "v.bin")
    with pytest.raises(ValueError, match="train_ratio"):
        write_corpus_tokens([], "text", enc, 1.5, "cut", tmp_path / "t.bin", tmp_path / "v.bin")
