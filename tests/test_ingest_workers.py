"""Parsing in worker processes: a file that hangs, eats memory or crashes its parser costs only that file.

The misbehaving loaders (tests/pathological_loaders.py) are registered through
`ingest.loader_modules`, so they run inside the real workers, under the real
time and memory budgets.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ragline.app import Ragline
from ragline.config import Settings, SourceSettings
from ragline.store.base import Scope, SearchRequest

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow


@pytest.fixture
def make_app(tmp_path: Path, embedder, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the workers import pathological_loaders from here
    apps = []

    def _make(name: str = "index", **ingest) -> Ragline:
        app = Ragline(Settings(data_dir=tmp_path / name, ingest=ingest))
        app.__dict__["embedder"] = embedder
        apps.append(app)
        return app

    yield _make
    for app in apps:
        app.close()


def write_corpus(root: Path, count: int) -> Path:
    for i in range(count):
        topic = ["cats", "compilers", "rivers", "tea", "volcanoes"][i % 5]
        (root / f"part{i // 7}").mkdir(parents=True, exist_ok=True)
        (root / f"part{i // 7}" / f"note{i:02d}.md").write_text(
            f"# Note {i} on {topic}\n\n## Facts\n\nFact number {i} about {topic} is worth remembering.\n\n"
            f"## More\n\n{topic.capitalize()} appear in note {i} again, with the word {'x' * (i % 9)}.\n"
        )
    return root


def test_pathological_files_are_killed_and_reported_while_the_rest_is_indexed(tmp_path, make_app):
    docs = write_corpus(tmp_path / "docs", 6)
    (docs / "loop.hang").write_text("a file a parser loops on\n")
    (docs / "bomb.hog").write_text("a file a parser inflates without bound\n")
    (docs / "odd.crash").write_text("a file a parser crashes on\n")
    app = make_app(loader_modules=["pathological_loaders"], file_timeout_s=2, file_memory_mb=256)
    report = app.indexer().run([SourceSettings(path=docs)])
    reasons = {Path(path).name: reason for path, reason in report.failed}
    assert set(reasons) == {"loop.hang", "bomb.hog", "odd.crash"}
    assert "ingest.file_timeout_s (2 s)" in reasons["loop.hang"]
    assert "ingest.file_memory_mb (256 MB)" in reasons["bomb.hog"]
    assert "crashed" in reasons["odd.crash"]
    assert len(report.new) == 6
    hit = app.retriever.search("fact about volcanoes", k=1, scope=Scope.everything()).hits[0]
    assert hit.chunk.metadata["source"] == "part0/note04.md"


def test_parallel_parsing_gives_exactly_the_index_of_a_serial_run(tmp_path, make_app):
    docs = write_corpus(tmp_path / "docs", 24)
    (docs / "part1" / "empty.md").write_text("")  # failures interleave with writes too
    serial = make_app("serial", parse_workers=1, embed_group_chunks=5)
    parallel = make_app("parallel", parse_workers=3, embed_group_chunks=5)
    serial.indexer().run([SourceSettings(path=docs)])
    parallel.indexer().run([SourceSettings(path=docs)])

    def rows(app: Ragline) -> list[tuple]:
        db = app.store._db  # the write order: chunk rows by sequence number
        return db.execute("SELECT seq, chunk_id, text FROM chunks ORDER BY seq").fetchall()

    assert rows(parallel) == rows(serial) and len(rows(serial)) >= 48
    request = SearchRequest(Scope.everything(), vector=serial.embedder.embed_queries(["rivers"])[0], k=10)
    assert [(h.chunk.chunk_id, h.score) for h in parallel.store.search(request)] == [
        (h.chunk.chunk_id, h.score) for h in serial.store.search(request)
    ]
