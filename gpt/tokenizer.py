"""GPT-2 BPE tokenizer built by tiktoken from local, sha256-verified encoder.json + vocab.bpe."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gpt.fetch import FetchError, Source, fetch, sha256_file

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256

# The hashes tiktoken itself checks for its "gpt2" encoding.
BPE_SOURCES = (
    Source(
        name="gpt2-encoder",
        urls=(
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
            "https://openaipublic.blob.core.windows.net/gpt-2/models/124M/encoder.json",
            "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2/124M/encoder.json",
        ),
        sha256="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        filename="encoder.json",
        mirror_path="gpt2_bpe/encoder.json",
    ),
    Source(
        name="gpt2-vocab",
        urls=(
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
            "https://openaipublic.blob.core.windows.net/gpt-2/models/124M/vocab.bpe",
            "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2/124M/vocab.bpe",
        ),
        sha256="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        filename="vocab.bpe",
        mirror_path="gpt2_bpe/vocab.bpe",
    ),
)

# GPT-2's pre-tokenization regex (the same split tiktoken's gpt2 encoding uses).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerError(RuntimeError):
    """The BPE files are missing or corrupt."""


def default_cache_dir() -> Path:
    """Where BPE files are cached: $GPT_CACHE_DIR or ~/.cache/llm-pipeline."""
    return Path(os.environ.get("GPT_CACHE_DIR", Path.home() / ".cache" / "llm-pipeline")) / "gpt2_bpe"


def load_tokenizer(bpe_dir: str | os.PathLike) -> tiktoken.Encoding:
    """Build the GPT-2 encoding from `bpe_dir/encoder.json` and `bpe_dir/vocab.bpe`.

    Both files are checked against their published sha256 first, so a truncated or edited
    file fails here with its path named rather than producing different token ids.
    """
    bpe_dir = Path(bpe_dir)
    return _load_verified(str(bpe_dir.resolve()))


@lru_cache(maxsize=4)
def _load_verified(bpe_dir: str) -> tiktoken.Encoding:
    paths = {}
    for source in BPE_SOURCES:
        path = Path(bpe_dir) / source.filename
        if not path.is_file():
            raise TokenizerError(f"{path}: missing GPT-2 BPE file (canonical URL: {source.urls[0]})")
        actual = sha256_file(path)
        if actual != source.sha256:
            raise TokenizerError(f"{path}: corrupt GPT-2 BPE file (sha256 {actual}, expected {source.sha256})")
        paths[source.filename] = str(path)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=paths["vocab.bpe"], encoder_json_file=paths["encoder.json"]
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
    )


def get_tokenizer(
    bpe_dir: str | os.PathLike | None = None,
    mirror: str | os.PathLike | None = None,
    offline: bool = False,
) -> tiktoken.Encoding:
    """The GPT-2 tokenizer, from `bpe_dir` if given, else from the cache filled once from
    the mirror folder (argument or $LLM_PIPELINE_MIRROR) or the canonical URLs."""
    if bpe_dir is not None:
        return load_tokenizer(bpe_dir)
    cache = default_cache_dir()
    mirror = mirror or os.environ.get("LLM_PIPELINE_MIRROR") or None
    try:
        for source in BPE_SOURCES:
            fetch(source, cache, mirror=mirror, offline=offline)
    except FetchError as exc:
        raise TokenizerError(str(exc)) from exc
    return load_tokenizer(cache)
