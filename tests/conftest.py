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


def build_index(root: Path, files: dict[str, str], embedder, url_template: str | None = None) -> Path:
    """Write `files` under root/docs, index them with the shared model, return the index folder."""
    from ragline.app import Ragline
    from ragline.config import Settings, SourceSettings

    docs = root / "docs"
    for name, text in files.items():
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text(text)
    app = Ragline(Settings(data_dir=root / "index"))
    app.__dict__["embedder"] = embedder
    app.indexer().run([SourceSettings(path=docs, url_template=url_template)])
    app.close()
    return root / "index"
