"""Pretraining corpora as streams: .txt/.md/.jsonl files (or .gz of them) validated, then tokenized on every core."""
from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import os
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import tiktoken

from gpt.files import atomic_file
from gpt.tokenizer import END_OF_TEXT, END_OF_TEXT_ID, TOKEN_DTYPE
from pipeline.core.errors import DataError
from pipeline.data.encoding import encode_ids, safe_cuts

WHOLE_FILE_SUFFIXES = (".txt", ".md")  # the whole file is one document
LINES_SUFFIX = ".jsonl"  # one JSON object, one document, per line
SPLITS = ("cut", "document")
BLOCK_BYTES = 1 << 22  # read size of whole-file documents
READ_BUFFER = 1 << 20  # buffer of the line reader of .jsonl files
CHUNK_CHARS = 1 << 18  # text per encoding task: its overhead is noise, and a 1 MB file still fills 4 threads
COUNT_CHUNK_CHARS = 1 << 16  # text per step of the min_tokens count, small so that it stops early
IN_FLIGHT_PER_THREAD = 3  # tasks queued per encoding thread: keeps threads busy, memory bounded

# How describe_failure words each check; `value` is the failure's detail.
PHRASES = {
    "file_type": "unsupported file type; use .txt, .md, .jsonl or .gz of them",
    "unreadable": "cannot be read ({value})",
    "gzip": "not valid gzip ({value})",
    "empty_file": "empty file",
    "binary": "binary file (NUL byte at {value})",
    "utf8": "not valid UTF-8 ({value})",
    "json": "invalid JSON ({value})",
    "not_object": "not a JSON object (got {value})",
    "missing_field": "missing field '{value}'",
    "text_type": "field {value}, not a string",
    "empty_text": "empty text in field '{value}'",
    "min_tokens": "corpus too short: {value}",
}


class _Problem(Exception):
    """A failure found while reading a file; the reader that knows the line fills it in."""

    def __init__(self, check: str, value: str | None = None, line: int | None = None):
        super().__init__(check)
        self.check, self.value, self.line = check, value, line

    def failure(self, path: Path) -> dict:
        return {"file": str(path), "line": self.line, "check": self.check, "value": self.value}


def describe_failure(failure: dict) -> str:
    """One failure as one line, e.g. `notes/a.jsonl line 3: missing field 'text'` or `notes/b.txt: empty file`."""
    phrase = PHRASES[failure["check"]].format(value=failure["value"])
    if failure["file"] is None:
        return phrase
    where = failure["file"] if failure["line"] is None else f"{failure['file']} line {failure['line']}"
    return f"{where}: {phrase}"


def document_format(path: Path) -> str:
    """'whole' (.txt, .md: one document) or 'lines' (.jsonl), looking under a .gz suffix."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        suffix = Path(path.stem).suffix.lower()
    if suffix in WHOLE_FILE_SUFFIXES:
        return "whole"
    if suffix == LINES_SUFFIX:
        return "lines"
    raise _Problem("file_type", "".join(path.suffixes) or path.name)


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn the errors of reading `path` into _Problems: a broken .gz, or a file that cannot be opened."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise _Problem("gzip", str(exc) or type(exc).__name__) from None
    except OSError as exc:
        raise _Problem("unreadable", exc.strerror or str(exc)) from None


def _open(path: Path) -> BinaryIO:
    # A big buffer: each refill releases and retakes the GIL, which the encoding threads also want.
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb", buffering=READ_BUFFER)


def _blocks(path: Path, block_bytes: int) -> Iterator[bytes]:
    """The file's (decompressed) bytes in blocks."""
    with _reading(path), _open(path) as handle:
        while block := handle.read(block_bytes):
            yield block


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line with its newline) of the file's (decompressed) bytes."""
    with _reading(path), _open(path) as handle:
        yield from enumerate(handle, 1)


def _line_at(path: Path, offset: int) -> int:
    """The 1-based line of byte `offset` of the (decompressed) file.

    Counted by reading the file again, only when a failure needs it: counting newlines on every
    block would cost the tokenizer's main thread more than decoding does.
    """
    line, seen = 1, 0
    for block in _blocks(path, BLOCK_BYTES):
        line += block.count(b"\n", 0, max(offset - seen, 0))
        seen += len(block)
        if seen >= offset:
            break
    return line


class _Utf8:
    """Strict incremental UTF-8 decoding of a file's blocks that names the byte and line of a bad byte."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self.offset = 0  # bytes before the next block

    def problem(self, check: str, offset: int, reason: str = "") -> _Problem:
        """A failure at byte `offset` of the file."""
        value = f"byte {offset}: {reason}" if reason else f"byte {offset}"
        return _Problem(check, value, _line_at(self._path, offset))

    def decode(self, block: bytes) -> str:
        """The text of the next block (a character cut by the block's end waits for the next one)."""
        pending = len(self._decoder.getstate()[0])  # bytes of a cut character, kept from the last block
        try:
            text = self._decoder.decode(block)
        except UnicodeDecodeError as exc:
            raise self.problem("utf8", self.offset - pending + exc.start, exc.reason) from None
        self.offset += len(block)
        return text

    def finish(self) -> None:
        """Fail if the file ends inside a character."""
        pending = len(self._decoder.getstate()[0])
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise self.problem("utf8", self.offset - pending + exc.start, exc.reason) from None


def _decoded(path: Path, block_bytes: int) -> Iterator[tuple[int, str]]:
    """(bytes, text) of each block of a whole-file document."""
    utf8 = _Utf8(path)
    for block in _blocks(path, block_bytes):
        yield len(block), utf8.decode(block)
    utf8.finish()


def _document_text(line: bytes, field: str, offset: int) -> str:
    """The text of one .jsonl line (which starts at byte `offset` of the file)."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Problem("utf8", f"byte {offset + exc.start}: {exc.reason}") from None
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as exc:
        raise _Problem("json", f"{exc.msg} at column {exc.colno}") from None
    if not isinstance(record, dict):
        raise _Problem("not_object", type(record).__name__)
    if field not in record:
        raise _Problem("missing_field", field)
    text = record[field]
    if not isinstance(text, str):
        raise _Problem("text_type", f"'{field}' is {type(text).__name__}")
    return text


def _documents(path: Path, field: str) -> Iterator[str]:
    """The text of each document of a .jsonl file; blank lines are skipped."""
    offset = 0
    for number, line in _lines(path):
        if not line.isspace():
            try:
                text = _document_text(line, field, offset)
            except _Problem as problem:
                problem.line = number
                raise
            yield text
        offset += len(line)


def _utf8_bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _is_blank(text: str) -> bool:
    return not text or text.isspace()


# -- validation ---------------------------------------------------------------------------------
class _TokenCount:
    """Tokens of the corpus (documents joined by one <|endoftext|>), counted only until `target`."""

    def __init__(self, enc: tiktoken.Encoding, target: int):
        self._enc, self._target = enc, target
        self.tokens, self._documents, self._carry = 0, 0, ""

    @property
    def done(self) -> bool:
        return self.tokens >= self._target

    def begin(self) -> None:
        """Start a document (dropping the uncounted rest of one that a failure cut short)."""
        self._carry = ""
        if not self.done:
            self.tokens += self._documents > 0  # the separator before it
            self._documents += 1

    def feed(self, text: str) -> None:
        """Count the document's next text, up to its last safe cut; the rest waits for more text."""
        if self.done:
            return
        text = self._carry + text
        bounds = [0, *safe_cuts(text, COUNT_CHUNK_CHARS)]
        for start, end in zip(bounds, bounds[1:]):
            self.tokens += len(encode_ids(self._enc, text[start:end]))
            if self.done:
                return
        self._carry = text[bounds[-1]:]

    def end(self) -> None:
        if not self.done:
            self.tokens += len(encode_ids(self._enc, self._carry))
        self._carry = ""


class _Report:
    """The summary and the first `max_failures` failures of a corpus check."""

    def __init__(self, max_failures: int):
        self.summary = {"files": 0, "documents": 0, "bytes": 0, "chars": 0, "failures_total": 0}
        self.failures: list[dict] = []
        self._max = max_failures

    def fail(self, failure: dict) -> None:
        self.summary["failures_total"] += 1
        if len(self.failures) < self._max:
            self.failures.append(failure)

    def count(self, key: str, amount: int) -> None:
        self.summary[key] += amount


def _check_whole_file(path: Path, report: _Report, count: _TokenCount) -> None:
    utf8, has_text = _Utf8(path), False
    count.begin()
    for block in _blocks(path, BLOCK_BYTES):
        nul = block.find(b"\0")
        if nul >= 0:
            # one failure for the file: the rest of a binary file would be noise
            raise utf8.problem("binary", utf8.offset + nul)
        text = utf8.decode(block)
        report.count("bytes", len(block))
        report.count("chars", len(text))
        has_text = has_text or not _is_blank(text)
        count.feed(text)
    utf8.finish()
    count.end()
    report.count("documents", 1)
    if not has_text:
        raise _Problem("empty_file")


def _check_lines_file(path: Path, field: str, report: _Report, count: _TokenCount) -> None:
    offset, has_text = 0, False
    for number, line in _lines(path):
        nul = line.find(b"\0")
        if nul >= 0:
            raise _Problem("binary", f"byte {offset + nul}", number)
        report.count("bytes", len(line))
        if not line.isspace():
            has_text = True
            try:
                text = _document_text(line, field, offset)
            except _Problem as problem:
                problem.line = number
                report.fail(problem.failure(path))
            else:
                report.count("documents", 1)
                report.count("chars", len(text))
                if _is_blank(text):
                    report.fail(_Problem("empty_text", field, number).failure(path))
                count.begin()
                count.feed(text)
                count.end()
        offset += len(line)
    if not has_text:
        raise _Problem("empty_file")


def check_corpus(files: list[Path], text_field: str, enc: tiktoken.Encoding, min_tokens: int,
                 max_failures: int = 20) -> tuple[dict, list[dict]]:
    """Check a corpus file by file, streaming; return (summary, the first `max_failures` failures).

    A failure is {"file", "line", "check", "value"} (see PHRASES and describe_failure). The summary
    counts files, documents, bytes (decompressed), chars (of document text), failures_total, and
    tokens_counted: the corpus is tokenized only until `min_tokens` tokens are seen, so a big corpus
    costs one read, not a tokenization.
    """
    report, count = _Report(max_failures), _TokenCount(enc, min_tokens)
    for path in files:
        report.count("files", 1)
        try:
            if document_format(path) == "whole":
                _check_whole_file(path, report, count)
            else:
                _check_lines_file(path, text_field, report, count)
        except _Problem as problem:
            report.fail(problem.failure(path))
    # Only when every file read cleanly: a broken file's missing tokens would say nothing more.
    if not count.done and not report.summary["failures_total"]:
        report.fail({"file": None, "line": None, "check": "min_tokens",
                     "value": f"{count.tokens} tokens, fewer than pretrain.context_length + 1 = {min_tokens}"})
    return {**report.summary, "tokens_counted": count.tokens}, report.failures


# -- tokenization -------------------------------------------------------------------------------
def _encode_batch(enc: tiktoken.Encoding, batch: list[str | None]) -> np.ndarray:
    """The tokens of a (non-empty) batch: each text encoded on its own, None standing for <|endoftext|>."""
    if not any(text is not None and END_OF_TEXT in text for text in batch):
        # One call for the whole batch, so a thread takes the GIL once, not once a document: with the
        # special token allowed, tiktoken encodes the text between two "<|endoftext|>" on its own and
        # puts END_OF_TEXT_ID for each, which is exactly the join. Texts at safe cuts join unchanged.
        joined = "".join(END_OF_TEXT if text is None else text for text in batch)
        return encode_ids(enc, joined, special={END_OF_TEXT}).astype(TOKEN_DTYPE)  # ids < 50,257 fit uint16
    # A document holding the text "<|endoftext|>" must have it encoded as ordinary text.
    parts = [np.array([END_OF_TEXT_ID], dtype=np.uint32) if text is None else encode_ids(enc, text)
             for text in batch]
    return np.concatenate(parts, dtype=TOKEN_DTYPE, casting="same_kind")


class _OrderedWriter:
    """Encodes batches on a thread pool and appends their tokens to the split files in submission order."""

    def __init__(self, enc: tiktoken.Encoding, pool: ThreadPoolExecutor, outputs: dict[str, BinaryIO],
                 in_flight: int):
        self._enc, self._pool, self._outputs, self._in_flight = enc, pool, outputs, in_flight
        self._pending: deque[tuple[str, Future]] = deque()
        self.tokens = dict.fromkeys(outputs, 0)

    def submit(self, split: str, batch: list[str | None]) -> None:
        self._pending.append((split, self._pool.submit(_encode_batch, self._enc, batch)))
        while len(self._pending) > self._in_flight:  # waiting here bounds the memory in flight
            self._write_oldest()

    def drain(self) -> None:
        while self._pending:
            self._write_oldest()

    def _write_oldest(self) -> None:
        split, future = self._pending.popleft()
        tokens = future.result()
        self._outputs[split].write(memoryview(tokens))
        self.tokens[split] += len(tokens)


class _SplitStream:
    """One split's documents, fed in pieces of text, sent to the writer in batches of about `chunk_chars`.

    A document's text is cut only at safe cuts (pipeline.data.encoding): what follows the last safe cut
    of the text seen so far is carried until more text, or the document's end, arrives.
    """

    def __init__(self, split: str, writer: _OrderedWriter, chunk_chars: int):
        self._split, self._writer, self._chunk_chars = split, writer, chunk_chars
        self._batch: list[str | None] = []
        self._batch_chars, self._carry, self._documents = 0, "", 0

    def begin(self) -> None:
        if self._documents:
            self._add(None)  # <|endoftext|> between documents
        self._documents += 1

    def feed(self, text: str) -> None:
        text = self._carry + text
        bounds = [0, *safe_cuts(text, self._chunk_chars)]
        for start, end in zip(bounds, bounds[1:]):
            self._add(text[start:end])
        self._carry = text[bounds[-1]:]

    def end(self) -> None:
        if self._carry:
            self._add(self._carry)
        self._carry = ""

    def flush(self) -> None:
        if self._batch:
            self._writer.submit(self._split, self._batch)
            self._batch, self._batch_chars = [], 0

    def _add(self, text: str | None) -> None:
        self._batch.append(text)
        self._batch_chars += len(text) if text else 0
        if self._batch_chars >= self._chunk_chars:
            self.flush()


def _goes_to_val(path: Path, index: int, train_ratio: float) -> bool:
    # split="document": blake2b of the file's name (not its folder, so the corpus splits the same
    # wherever it lies) and the document's index in the file, read as a fraction in [0, 1). It is
    # the same on every run, machine and Python (unlike hash()), and a document's side does not
    # depend on the other documents: adding a file or a line moves no earlier document.
    digest = hashlib.blake2b(f"{path.name}\n{index}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 >= train_ratio


def _split_at(texts: Iterator[str], cut: int) -> Iterator[tuple[int, str]]:
    """(0, text) for the characters before `cut`, (1, text) for the rest."""
    seen = 0
    for text in texts:
        before = min(max(cut - seen, 0), len(text))
        if before:
            yield 0, text[:before]
        if before < len(text):
            yield 1, text[before:]
        seen += len(text)


class _Tokenizer:
    """Routes each document, or each side of its cut, to the train or val stream."""

    def __init__(self, streams: dict[str, _SplitStream], text_field: str, train_ratio: float, split: str,
                 block_bytes: int):
        self._streams, self._field, self._ratio, self._split = streams, text_field, train_ratio, split
        self._block_bytes = block_bytes
        self.documents = self.bytes = 0

    def file(self, path: Path) -> None:
        try:
            if document_format(path) == "whole":
                self._whole_file(path)
            else:
                self._lines_file(path)
        except _Problem as problem:
            raise DataError(describe_failure(problem.failure(path))) from None

    def _whole_file(self, path: Path) -> None:
        if self._split == "document":
            streams = [self._streams["val" if _goes_to_val(path, 0, self._ratio) else "train"]]
            texts: Iterator[tuple[int, str]] = ((0, text) for text in self._read(path))
        else:
            # the cut needs the document's length first: a cheap pass that only decodes
            chars = sum(len(text) for _, text in _decoded(path, self._block_bytes))
            streams = [self._streams["train"], self._streams["val"]]
            texts = _split_at(self._read(path), int(self._ratio * chars))
        for stream in streams:
            stream.begin()
        for side, text in texts:
            streams[side].feed(text)
        for stream in streams:
            stream.end()
        self.documents += 1

    def _read(self, path: Path) -> Iterator[str]:
        for size, text in _decoded(path, self._block_bytes):
            self.bytes += size
            yield text

    def _lines_file(self, path: Path) -> None:
        for index, text in enumerate(_documents(path, self._field)):
            if self._split == "document":
                self._document(self._streams["val" if _goes_to_val(path, index, self._ratio) else "train"], text)
            else:
                cut = int(self._ratio * len(text))
                self._document(self._streams["train"], text[:cut])
                self._document(self._streams["val"], text[cut:])
            self.documents += 1
            self.bytes += _utf8_bytes(text)

    @staticmethod
    def _document(stream: _SplitStream, text: str) -> None:
        stream.begin()
        stream.feed(text)
        stream.end()


def write_corpus_tokens(files: list[Path], text_field: str, enc: tiktoken.Encoding, train_ratio: float,
                        split: str, train_path: Path, val_path: Path, threads: int | None = None, *,
                        chunk_chars: int = CHUNK_CHARS, block_bytes: int = BLOCK_BYTES) -> dict:
    """Tokenize the corpus into flat uint16 files `train_path` and `val_path`, streaming, on `threads` threads.

    Documents (files, then lines) are joined by <|endoftext|> within each split. split="cut" cuts
    every document at character int(train_ratio * len): the first part goes to train, the rest
    to val; split="document" sends each whole document to one side (see _goes_to_val). The
    tokens equal encode_ordinary of each part; both files appear together or, on an error, not at
    all. Returns documents, train_tokens, val_tokens, bytes (UTF-8 text encoded), seconds, mb_per_s.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= train_ratio <= 1:
        raise ValueError(f"train_ratio must be in [0, 1], got {train_ratio}")
    for path in files:  # an unsupported file fails before any work
        try:
            document_format(path)
        except _Problem as problem:
            raise DataError(describe_failure(problem.failure(path))) from None
    threads = threads or os.cpu_count() or 1
    start = time.perf_counter()
    # Measured with tiktoken 0.14: if the first thread ever to encode with `enc` is one of several
    # encoding at once, all of them run at about half speed for as long as it lives. One encode
    # here, on the calling thread, keeps the pool's threads at full speed.
    encode_ids(enc, "warm-up")
    with atomic_file(train_path) as train_tmp, atomic_file(val_path) as val_tmp, \
            open(train_tmp, "wb") as train_out, open(val_tmp, "wb") as val_out, \
            ThreadPoolExecutor(threads, thread_name_prefix="encode") as pool:
        writer = _OrderedWriter(enc, pool, {"train": train_out, "val": val_out}, IN_FLIGHT_PER_THREAD * threads)
        streams = {name: _SplitStream(name, writer, chunk_chars) for name in ("train", "val")}
        tokenizer = _Tokenizer(streams, text_field, train_ratio, split, block_bytes)
        for path in files:
            tokenizer.file(path)
        for stream in streams.values():
            stream.flush()
        writer.drain()
    seconds = time.perf_counter() - start
    return {"documents": tokenizer.documents, "train_tokens": writer.tokens["train"],
            "val_tokens": writer.tokens["val"], "bytes": tokenizer.bytes, "seconds": round(seconds, 3),
            "mb_per_s": round(tokenizer.bytes / 1e6 / max(seconds, 1e-9), 2)}
