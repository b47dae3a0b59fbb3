"""GPT-2 encoding of long texts in pieces: where text can be cut without changing its tokens, and ids without lists."""
from __future__ import annotations

import re
from typing import AbstractSet

import numpy as np
import tiktoken

DEFAULT_CHUNK_CHARS = 1 << 18
# Where a cut is safe: GPT-2's pre-tokenizer (no lookbehind) splits a whitespace run that is
# followed by a non-space into run[:-1] (via `\s+(?!\S)`) and a last character that starts
# the next piece (alone, or as the " " of " word"). Cutting just BEFORE that last character
# gives the same pieces on both sides, since run[:-1] at the end of a chunk is still one
# piece. Cutting anywhere else in the run is NOT safe: e.g. "a\n\n b" encodes "\n\n" as one
# token, but "a\n" + "\n b" does not. The last character is limited to " " or "\n", and the
# next one to Python's \S, which is stricter than the regex engine's \S inside tiktoken.
_SAFE_CUT = re.compile(r"[ \n](?=\S)")


def safe_cuts(text: str, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> list[int]:
    """Cut positions about every `chunk_chars` characters where encoding can be split.

    A cut needs the character after it, so the last character of `text` is never a cut: text
    read in blocks can be cut at these positions before the next block is known.
    """
    cuts, pos = [], chunk_chars
    while pos < len(text) and (found := _SAFE_CUT.search(text, pos)):
        cuts.append(found.start())
        pos = found.start() + chunk_chars
    return cuts


def encode_ids(enc: tiktoken.Encoding, text: str, special: AbstractSet[str] = frozenset()) -> np.ndarray:
    """Token ids (uint32) equal to `enc.encode_ordinary(text)`, made without a Python list of ints;
    only the special tokens named in `special` are encoded as such where their text appears.

    With no special token allowed, encode_to_numpy encodes "<|endoftext|>" in the text as
    ordinary text, as encode_ordinary does; disallowed_special=() skips its Python-side scan
    for special tokens, which would hold the GIL while other threads encode.
    """
    try:
        return enc.encode_to_numpy(text, allowed_special=special, disallowed_special=())
    except UnicodeEncodeError:
        # Lone surrogates (a JSON string may hold them): replaced the way encode_ordinary does.
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc.encode_to_numpy(text, allowed_special=special, disallowed_special=())
