"""Incremental ingest: new, changed, unchanged, deleted and failed files, end to end on the real model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ragline.app import Ragline
from ragline.config import Settings, SourceSettings
from ragline.pipeline import IngestError


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    (root / "guide").mkdir(parents=True)
    (root / "guide" / "install.md").write_text(
        "# Installing\n\n## From PyPI\n\nRun pip install ragline to get the package.\n\n"
        "## From source\n\nClone the repository and run pip install -e .\n"
    )
    (root / "guide" / "tuning.md").write_text(
        "# Tuning\n\n(batch-size)=\n## Batch size\n\nA larger embedding batch size raises throughput on CPUs.\n"
    )
    (root / "notes.txt").write_text("The office cat is called Turing and sleeps on the server rack.\n")
    (root / ".hidden.md").write_text("# Hidden\n\nnever indexed\n")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return root


@pytest.fixture
def make_app(tmp_path: Path, embedder):
    apps = []

    def _make(**ingest) -> Ragline:
        settings = Settings(data_dir=tmp_path / "index", ingest=ingest or {})
        app = Ragline(settings)
        app.__dict__["embedder"] = embedder  # share the session's loaded model
        apps.append(app)
        return app

    yield _make
    for app in apps:
        app.close()


def snapshot(app: Ragline) -> dict[str, tuple]:
    """Everything that defines the index, without timestamps."""
    return {
        r.source: (r.status, r.sha256, r.error, tuple(r.chunk_ids))
        for r in app.store.documents()
    }


def test_first_run_indexes_supported_files_with_urls(corpus, make_app):
    app = make_app()
    source = SourceSettings(path=corpus, url_template="https://docs.example.org/{path}.html")
    report = app.indexer().run([source])
    assert sorted(Path(p).name for p in report.new) == ["install.md", "notes.txt", "tuning.md"]
    assert report.unsupported == 1 and report.failed == [] and report.chunks == app.store.count() > 0
    hit = app.retriever.search("how big should the embedding batch be?", k=1).hits[0]
    assert hit.chunk.citation_url == "https://docs.example.org/guide/tuning.html#batch-size"
    assert hit.chunk.metadata["heading_path"] == ["Tuning", "Batch size"]
    assert hit.chunk.metadata["source"] == str(corpus / "guide" / "tuning.md")


def test_rerun_changes_nothing(corpus, make_app):
    app = make_app()
    app.indexer().run([SourceSettings(path=corpus)])
    before = snapshot(app)
    os.utime(corpus / "notes.txt")  # a new mtime with the same content is not a change
    report = app.indexer().run([SourceSettings(path=corpus)])
    assert (report.new, report.changed, report.deleted, report.chunks) == ([], [], [], 0)
    assert report.unchanged == 3
    assert snapshot(app) == before


def test_changed_file_replaces_its_chunks_and_deleted_file_disappears(corpus, make_app):
    app = make_app()
    app.indexer().run([SourceSettings(path=corpus)])
    before = snapshot(app)
    (corpus / "notes.txt").write_text("The office dog is called Hopper and guards the coffee machine.\n")
    (corpus / "guide" / "install.md").unlink()
    report = app.indexer().run([SourceSettings(path=corpus)])
    assert [Path(p).name for p in report.changed] == ["notes.txt"]
    assert [Path(p).name for p in report.deleted] == ["install.md"]
    after = snapshot(app)
    assert str(corpus / "guide" / "install.md") not in after
    assert after[str(corpus / "notes.txt")][3] != before[str(corpus / "notes.txt")][3]
    assert app.store.count() == sum(len(v[3]) for v in after.values())
    texts = [h.chunk.text for h in app.retriever.search("what is the office pet called?", k=10).hits]
    assert any("Hopper" in t for t in texts) and not any("Turing" in t for t in texts)
    assert not any("pip install" in t for t in texts)


def test_bad_files_are_reported_and_skipped(corpus, make_app):
    (corpus / "empty.md").write_text("")
    (corpus / "disguised.txt").write_bytes(b"\x00\x01\x02binary\x00" * 50)
    (corpus / "broken.pdf").write_bytes(b"%PDF-1.7\nthis is not really a pdf")
    (corpus / "huge.txt").write_text("word " * 300_000)
    app = make_app(max_file_mb=1)
    report = app.indexer().run([SourceSettings(path=corpus)])
    reasons = {Path(p).name: reason for p, reason in report.failed}
    assert set(reasons) == {"empty.md", "disguised.txt", "broken.pdf", "huge.txt"}
    assert "empty" in reasons["empty.md"]
    assert "binary" in reasons["disguised.txt"]
    assert "MB limit" in reasons["huge.txt"]
    assert len(report.new) == 3  # the good files are all indexed
    failed = {Path(r.source).name for r in app.store.documents() if r.status == "failed"}
    assert failed == set(reasons)


def test_a_file_that_turns_bad_loses_its_old_chunks(corpus, make_app):
    app = make_app()
    app.indexer().run([SourceSettings(path=corpus)])
    (corpus / "notes.txt").write_bytes(b"\x00" * 100)
    report = app.indexer().run([SourceSettings(path=corpus)])
    assert [Path(p).name for p, _ in report.failed] == ["notes.txt"]
    assert not any("Turing" in h.chunk.text for h in app.retriever.search("office cat", k=10).hits)


def test_full_rebuild_gives_the_same_index(corpus, make_app):
    app = make_app()
    app.indexer().run([SourceSettings(path=corpus)])
    before = snapshot(app)
    report = app.indexer().run([SourceSettings(path=corpus)], full=True)
    assert len(report.new) == 3 and report.unchanged == 0
    assert snapshot(app) == before


def test_changing_the_url_template_reindexes(corpus, make_app):
    app = make_app()
    app.indexer().run([SourceSettings(path=corpus)])
    report = app.indexer().run([SourceSettings(path=corpus, url_template="https://x.org/{path}")])
    assert len(report.changed) == 3
    hit = app.retriever.search("office cat", k=1).hits[0]
    assert hit.chunk.citation_url == "https://x.org/notes"


def test_missing_source_is_an_error_and_deletes_nothing(corpus, make_app, tmp_path):
    app = make_app()
    app.indexer().run([SourceSettings(path=corpus)])
    with pytest.raises(IngestError, match="does not exist"):
        app.indexer().run([SourceSettings(path=tmp_path / "nope")])
    assert len(app.store.documents()) == 3


def test_index_built_with_another_model_needs_full(corpus, make_app):
    app = make_app()
    app.indexer().run([SourceSettings(path=corpus)])
    app.store.set_meta("embedder", "some-other-model")
    with pytest.raises(IngestError, match="--full"):
        app.indexer().run([SourceSettings(path=corpus)])
    assert len(app.indexer().run([SourceSettings(path=corpus)], full=True).new) == 3
