"""Shared fixtures: the real embedded model, loaded once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragline.config import EmbedderSettings

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"


@pytest.fixture(scope="session")
def embedder():
    from ragline.embed.sentence_transformer import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(EmbedderSettings())
