"""The `Embedder` protocol every embedding backend implements."""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from tokenizers import Tokenizer


class EmbedderError(RuntimeError):
    """The embedding model could not be loaded, did not answer, or rejected an input."""


class EmbedderUnavailable(EmbedderError):
    """The embedding service is unreachable or kept failing after its retries: no input is at fault."""


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to L2-normalized float32 vectors of a fixed size.

    `tokenizer` and `max_tokens` let the chunker size chunks in the model's
    own tokens, so nothing the model sees is silently truncated.
    """

    name: str
    dim: int
    max_tokens: int
    tokenizer: Tokenizer

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray: ...


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Scale rows to unit length so a dot product is the cosine similarity."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return vectors / norms


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer that counts every token: truncation and padding switched off."""
    tokenizer = Tokenizer.from_file(path)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer
