"""GPT-2 BPE tokenizer built by tiktoken from local, sha256-verified encoder.json + vocab.bpe."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gpt.errors import GPTError
from gpt.files import sha256_file

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 ids fit in 16 bits: how token files store them

# The GPT-2 BPE files by name, with the sha256 tiktoken itself checks for its "gpt2" encoding.
BPE_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

# GPT-2's pre-tokenization regex (the same split tiktoken's gpt2 encoding uses).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerError(GPTError):
    """The BPE files are missing or corrupt."""


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
    for name, expected in BPE_FILES.items():
        path = Path(bpe_dir) / name
        if not path.is_file():
            raise TokenizerError(f"{path}: missing GPT-2 BPE file (the download stage fetches it)")
        actual = sha256_file(path)
        if actual != expected:
            raise TokenizerError(f"{path}: corrupt GPT-2 BPE file (sha256 {actual}, expected {expected})")
        paths[name] = str(path)
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
