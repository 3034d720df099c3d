"""Incremental ingest: new, changed, unchanged, deleted and failed files, end to end on the real model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ragline.app import Ragline
from ragline.config import DEFAULT_SECRET_EXCLUDES, Settings, SourceSettings
from ragline import pipeline
from ragline.ingest.sources import explicit_source
from ragline.pipeline import IngestError, document_id
from ragline.store.base import Scope

EVERYTHING = Scope.everything()


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

    def _make(embedder_settings: dict | None = None, data_dir: Path | None = None, **ingest) -> Ragline:
        settings = Settings(
            data_dir=data_dir or tmp_path / "index", ingest=ingest or {}, embedder=embedder_settings or {}
        )
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
    hit = app.retriever.search("how big should the embedding batch be?", k=1, scope=EVERYTHING).hits[0]
    assert hit.chunk.citation_url == "https://docs.example.org/guide/tuning.html#batch-size"
    assert hit.chunk.metadata["heading_path"] == ["Tuning", "Batch size"]
    assert hit.chunk.metadata["source"] == "guide/tuning.md"  # relative to its root: no host path


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
    texts = [h.chunk.text for h in app.retriever.search("what is the office pet called?", k=10, scope=EVERYTHING).hits]
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
    assert not any("Turing" in h.chunk.text for h in app.retriever.search("office cat", k=10, scope=EVERYTHING).hits)


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
    hit = app.retriever.search("office cat", k=1, scope=EVERYTHING).hits[0]
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


def test_a_touched_file_is_hashed_once_then_skipped_by_its_saved_mtime(corpus, make_app):
    app = make_app()
    app.indexer().run([SourceSettings(path=corpus)])
    notes = corpus / "notes.txt"
    os.utime(notes, ns=(notes.stat().st_atime_ns, notes.stat().st_mtime_ns + 5_000_000_000))
    assert app.indexer().run([SourceSettings(path=corpus)]).unchanged == 3
    record = next(r for r in app.store.documents() if r.doc_id == document_id("docs", "notes.txt"))
    assert record.mtime_ns == notes.stat().st_mtime_ns  # so the next run skips it without reading it


def test_documents_take_their_sources_access_and_a_change_of_it_alone_embeds_nothing(corpus, make_app, tmp_path):
    hr_docs = tmp_path / "hr"
    hr_docs.mkdir()
    (hr_docs / "pay.md").write_text("# Pay\n\nThe salary bands are reviewed every March by the board.\n")
    app = make_app()
    app.indexer().run([
        SourceSettings(path=corpus, tenant="acme", groups=["eng"]),
        SourceSettings(path=hr_docs, tenant="acme", groups=["hr"]),
    ])
    owners = {Path(r.source).name: (r.tenant, r.groups) for r in app.store.documents()}
    assert owners == {
        "install.md": ("acme", ["eng"]), "tuning.md": ("acme", ["eng"]), "notes.txt": ("acme", ["eng"]),
        "pay.md": ("acme", ["hr"]),
    }

    def sources_found(question: str, groups: set[str]) -> set[str]:
        hits = app.retriever.search(question, k=10, scope=Scope("acme", frozenset(groups))).hits
        return {Path(hit.chunk.metadata["source"]).name for hit in hits}

    assert "pay.md" not in sources_found("salary bands", {"eng"}) and "pay.md" in sources_found("salary bands", {"hr"})
    assert app.retriever.search("salary bands", k=10, scope=EVERYTHING).hits == []  # another tenant's documents
    rows = app.store._db.execute("SELECT seq, chunk_id, vector FROM chunks ORDER BY seq").fetchall()
    notes = corpus / "notes.txt"  # touched too: its content is hashed again, then found unchanged
    os.utime(notes, ns=(notes.stat().st_atime_ns, notes.stat().st_mtime_ns + 5_000_000_000))

    regrouped = [
        SourceSettings(path=corpus, tenant="acme", groups=["eng", "ops"]),
        SourceSettings(path=hr_docs, tenant="acme", groups=["*"]),
    ]
    report = app.indexer().run(regrouped)
    assert (report.new, report.changed, report.chunks, report.unchanged) == ([], [], 0, 4)
    assert sorted(Path(p).name for p in report.access_changed) == ["install.md", "notes.txt", "pay.md", "tuning.md"]
    assert app.store._db.execute("SELECT seq, chunk_id, vector FROM chunks ORDER BY seq").fetchall() == rows
    assert "pay.md" in sources_found("salary bands", {"eng"})
    assert "tuning.md" in sources_found("embedding batch size", {"ops"})
    assert app.indexer().run(regrouped).access_changed == []


def test_changing_the_document_prefix_reindexes(corpus, make_app):
    make_app().indexer().run([SourceSettings(path=corpus)])
    app = make_app({"document_prefix": "passage: "})
    report = app.indexer().run([SourceSettings(path=corpus)])
    assert len(report.changed) == 3 and report.unchanged == 0


@pytest.mark.parametrize("pattern", [".github/*", "./.github/*", ".github/workflows/*.md"])
def test_exclude_patterns_match_relative_paths_with_a_leading_dot(corpus, make_app, pattern):
    (corpus / ".github" / "workflows").mkdir(parents=True)
    (corpus / ".github" / "workflows" / "ci.md").write_text("# CI\n\nThe pipeline runs on every push.\n")
    app = make_app(exclude=[pattern, "./notes.txt"])  # the defaults (".*" among them) replaced
    report = app.indexer().run([SourceSettings(path=corpus)])
    indexed = {Path(p).relative_to(corpus).as_posix() for p in report.new}
    assert indexed == {"guide/install.md", "guide/tuning.md", ".hidden.md"}


def test_a_sync_of_the_configured_sources_drops_roots_no_longer_listed(corpus, make_app, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "extra.md").write_text("# Extra\n\nThe lighthouse keeper counts ships at dawn.\n")
    app = make_app()
    app.indexer().run([SourceSettings(path=corpus), SourceSettings(path=other)])
    report = app.indexer().run([SourceSettings(path=corpus)])  # explicit paths: only these roots are synced
    assert report.deleted == []
    report = app.indexer().run([SourceSettings(path=corpus)], prune_other_roots=True)  # ingest.sources
    assert [Path(p).name for p in report.deleted] == ["extra.md"]
    found = app.retriever.search("lighthouse keeper", k=10, scope=EVERYTHING).hits
    assert not any("lighthouse" in h.chunk.text for h in found)
    assert len(app.store.documents()) == 3


def test_a_file_name_that_is_not_utf8_is_indexed_like_any_other(corpus, make_app):
    name = os.fsdecode(b"caf\xe9-menu.txt")
    (corpus / name).write_text("The cafe menu lists espresso, cortado and flat white.\n")
    app = make_app()
    report = app.indexer().run([SourceSettings(path=corpus, url_template="https://x.org/{path}")])
    assert report.failed == [] and len(report.new) == 4
    hit = app.retriever.search("which coffees are on the menu?", k=1, scope=EVERYTHING).hits[0]
    assert hit.chunk.metadata["source"] == "caf\\xe9-menu.txt"
    assert hit.chunk.citation_url == "https://x.org/caf\\xe9-menu"
    (corpus / name).unlink()
    assert [Path(p).name for p in app.indexer().run([SourceSettings(path=corpus)]).deleted] == ["caf\\xe9-menu.txt"]


def test_an_embedding_error_fails_only_the_file_at_fault(corpus, make_app, embedder):
    from scripted_llm_server import Reply, ScriptedLLMServer

    from ragline.embed.openai_compat import OpenAIEmbedder

    def answer(body: dict) -> Reply:
        if any("TOO-LONG" in text for text in body["input"]):
            return Reply(400, {"error": {"message": "input too long for the model"}})
        vectors = embedder.embed_documents(body["input"])
        return Reply(200, {"data": [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]})

    (corpus / "guide" / "long.md").write_text("# Long\n\nTOO-LONG for the remote model, it says.\n")
    with ScriptedLLMServer(fallback=answer) as server:
        app = make_app({"backend": "openai", "model": "minilm", "base_url": server.url})
        app.__dict__["embedder"] = OpenAIEmbedder(app.settings.embedder)
        report = app.indexer().run([SourceSettings(path=corpus)])
    assert [(Path(p).name, "input too long" in reason) for p, reason in report.failed] == [("long.md", True)]
    assert sorted(Path(p).name for p in report.new) == ["install.md", "notes.txt", "tuning.md"]
    assert report.chunks == app.store.count() > 0


def test_an_unreachable_embedding_server_stops_the_run_without_failing_files(corpus, make_app, embedder):
    """A server that is down is no file's fault: the run ends with the reason, a re-run finishes the job."""
    from scripted_llm_server import Reply, ScriptedLLMServer

    from ragline.embed.openai_compat import OpenAIEmbedder

    up = {"answering": True}

    def answer(body: dict) -> Reply:
        if not up["answering"]:
            return Reply(503, {"error": {"message": "overloaded"}})
        vectors = embedder.embed_documents(body["input"])
        return Reply(200, {"data": [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]})

    with ScriptedLLMServer(fallback=answer) as server:
        settings = {"backend": "openai", "model": "minilm", "base_url": server.url, "dimensions": embedder.dim}
        app = make_app(settings)
        app.__dict__["embedder"] = OpenAIEmbedder(app.settings.embedder)
        up["answering"] = False
        with pytest.raises(IngestError, match="embedding server.*503"):
            app.indexer().run([SourceSettings(path=corpus)])
        assert [r for r in app.store.documents() if r.status == "failed"] == []
        up["answering"] = True
        report = app.indexer().run([SourceSettings(path=corpus)])
    assert report.failed == [] and len(report.new) == 3


def test_links_out_of_the_folder_are_not_followed_and_loops_end(corpus, make_app, tmp_path):
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "salaries.txt").write_text("The secret salary table of the company.\n")
    (corpus / "leak.txt").symlink_to(outside / "salaries.txt")
    (corpus / "leakdir").symlink_to(outside, target_is_directory=True)
    (corpus / "guide" / "loop").symlink_to(corpus, target_is_directory=True)
    (corpus / "alias.txt").symlink_to(corpus / "notes.txt")  # inside the folder: followed
    app = make_app()
    report = app.indexer().run([SourceSettings(path=corpus)])
    skipped = {Path(p).name: reason for p, reason in report.skipped}
    assert set(skipped) == {"leak.txt", "leakdir", "loop"}
    assert "outside the ingested folder" in skipped["leak.txt"] and "outside" in skipped["leakdir"]
    assert "inside the ingested folder" in skipped["loop"]
    assert sorted(Path(p).name for p in report.new) == ["alias.txt", "install.md", "notes.txt", "tuning.md"]
    assert not any("salary" in h.chunk.text for h in app.retriever.search("salary table", k=10, scope=EVERYTHING).hits)


def test_secrets_are_skipped_by_name_and_private_keys_by_content(corpus, make_app):
    for name in ["id_rsa", ".env", "server.pem", "tls.key", "credentials", "store.p12", "deploy.txt"]:
        (corpus / name).write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n")
    (corpus / "passwords.md").write_text("# Passwords\n\nroot: hunter2\n")
    app = make_app(exclude_secrets=[*DEFAULT_SECRET_EXCLUDES, "passwords.*"])
    report = app.indexer().run([SourceSettings(path=corpus)])
    skipped = {Path(p).name for p, reason in report.skipped if "ingest.exclude_secrets" in reason}
    assert skipped == {"id_rsa", ".env", "server.pem", "tls.key", "credentials", "store.p12", "passwords.md"}
    assert [(Path(p).name, "private key" in reason) for p, reason in report.failed] == [("deploy.txt", True)]
    assert app.store.count({"source": "deploy.txt"}) == 0


def test_a_zip_bomb_is_refused_from_its_directory_before_parsing(corpus, make_app):
    import zipfile

    from docx import Document as WordDocument

    bomb = corpus / "bomb.docx"
    WordDocument().save(bomb)
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("word/media/padding.xml", b"<a/>" * 1_000_000)  # 4 MB that deflate to a few KB
    app = make_app(max_unzipped_mb=2)
    reasons = dict(app.indexer().run([SourceSettings(path=corpus)]).failed)
    assert "over the 2 MB limit (ingest.max_unzipped_mb)" in reasons[str(bomb)]
    app = make_app(max_zip_ratio=50)
    reasons = dict(app.indexer().run([SourceSettings(path=corpus)], full=True).failed)
    assert "(ingest.max_zip_ratio)" in reasons[str(bomb)]


def test_a_page_is_indexed_again_when_only_a_file_it_includes_changes_appears_or_goes(corpus, make_app):
    page = corpus / "guide" / "config.md"
    page.write_text("# Config\n\n```{include} snippets/port.md\n```\n\n```{include} snippets/later.md\n```\n")
    (corpus / "guide" / "snippets").mkdir()
    snippet = corpus / "guide" / "snippets" / "port.md"
    snippet.write_text("The server listens on port 8080.\n")
    app = make_app(exclude=["**/snippets/**"])  # the snippets are only read through the page
    source = SourceSettings(path=corpus)

    def page_text() -> str:
        record = next(r for r in app.store.documents() if r.source.endswith("config.md"))
        return " ".join(chunk.text for chunk in app.store.document_chunks(record.doc_id))

    app.indexer().run([source])
    assert "port 8080" in page_text()
    assert app.indexer().run([source]).changed == []  # nothing changed: the page is not parsed again

    snippet.write_text("The server listens on port 9090.\n")
    report = app.indexer().run([source])
    assert [Path(p).name for p in report.changed] == ["config.md"]
    assert "port 9090" in page_text() and "port 8080" not in page_text()

    (corpus / "guide" / "snippets" / "later.md").write_text("Timeouts are set in seconds.\n")  # was missing
    assert [Path(p).name for p in app.indexer().run([source]).changed] == ["config.md"]
    assert "Timeouts are set in seconds" in page_text()

    snippet.unlink()
    assert [Path(p).name for p in app.indexer().run([source]).changed] == ["config.md"]
    assert "port 9090" not in page_text()


TEMPLATE = "https://docs.example.org/{path}.html"
QUESTIONS = ["how big should the embedding batch be?", "what is the office cat called?", "install from source"]


def hits_of(app: Ragline) -> list[list[tuple]]:
    return [
        [(h.chunk.chunk_id, h.chunk.doc_id, h.chunk.text, h.chunk.citation_url, round(h.score, 5))
         for h in app.retriever.search(question, k=5, scope=EVERYTHING).hits]
        for question in QUESTIONS
    ]


def test_the_same_corpus_under_two_absolute_paths_gets_the_same_ids_and_hits(corpus, make_app, tmp_path):
    first, second = tmp_path / "home" / "a" / "docs", tmp_path / "srv" / "docs"  # one label: "docs"
    shutil.copytree(corpus, first)
    shutil.copytree(corpus, second)
    apps = [make_app(data_dir=tmp_path / "one"), make_app(data_dir=tmp_path / "two")]
    for app, root in zip(apps, (first, second)):
        assert len(app.indexer().run([SourceSettings(path=root, url_template=TEMPLATE)]).new) == 3
    ids = [{r.doc_id: tuple(r.chunk_ids) for r in app.store.documents()} for app in apps]
    assert ids[0] == ids[1] and len(ids[0]) == 3
    assert ids[0][document_id("docs", "guide/tuning.md")]  # the label and the path from the root, nothing else
    assert hits_of(apps[0]) == hits_of(apps[1]) and all(hits_of(apps[0]))


def test_a_moved_corpus_with_a_url_template_is_followed_without_embedding_again(corpus, make_app, tmp_path):
    app = make_app()
    assert len(app.indexer().run([SourceSettings(path=corpus, url_template=TEMPLATE)]).new) == 3
    rows = app.store._db.execute("SELECT chunk_id, vector FROM chunks ORDER BY chunk_id").fetchall()
    before = hits_of(app)
    moved = tmp_path / "elsewhere" / "docs"
    shutil.copytree(corpus, moved)  # mtimes kept
    shutil.rmtree(corpus)
    os.utime(moved / "notes.txt")  # a new mtime, the same content: hashed, found unchanged
    report = app.indexer().run([SourceSettings(path=moved, url_template=TEMPLATE)])
    assert (report.new, report.changed, report.deleted, report.failed, report.chunks) == ([], [], [], [], 0)
    assert report.unchanged == 3
    assert app.store._db.execute("SELECT chunk_id, vector FROM chunks ORDER BY chunk_id").fetchall() == rows
    assert hits_of(app) == before
    assert {r.root for r in app.store.documents()} == {str(moved)}  # the manifest follows the move
    assert all(Path(r.source).is_relative_to(moved) for r in app.store.documents())

    (moved / "guide" / "install.md").unlink()  # gone from the new place: deleted by its label and path
    report = app.indexer().run([SourceSettings(path=moved, url_template=TEMPLATE)])
    assert [Path(p).name for p in report.deleted] == ["install.md"] and report.unchanged == 2


def test_a_moved_corpus_drops_the_files_it_left_behind(corpus, make_app, tmp_path):
    app = make_app()
    app.indexer().run([SourceSettings(path=corpus, url_template=TEMPLATE)])
    moved = tmp_path / "new" / "docs"
    shutil.move(corpus, moved)
    (moved / "notes.txt").unlink()
    report = app.indexer().run([SourceSettings(path=moved, url_template=TEMPLATE)])
    assert report.deleted == [str(corpus / "notes.txt")] and report.unchanged == 2
    assert sorted(Path(r.source).name for r in app.store.documents()) == ["install.md", "tuning.md"]


def test_another_folder_of_the_same_name_is_refused_while_the_first_is_still_there(corpus, make_app, tmp_path):
    """Two projects' `docs` folders are two sources: syncing the second must not delete the first's documents."""
    app = make_app()
    app.indexer().run([SourceSettings(path=corpus, url_template=TEMPLATE)])
    other = tmp_path / "project_b" / "docs"
    other.mkdir(parents=True)
    (other / "extra.md").write_text("# Extra\n\nThe lighthouse keeper counts ships at dawn.\n")
    with pytest.raises(IngestError, match=r"holds a source called 'docs' from .*still there: give this one another name"):
        app.indexer().run([SourceSettings(path=other)])
    assert len(app.store.documents()) == 3
    report = app.indexer().run([SourceSettings(path=other, name="project-b-docs")])
    assert len(report.new) == 1 and report.deleted == [] and len(app.store.documents()) == 4


def test_without_a_url_template_a_moved_corpus_is_indexed_again_for_its_file_urls(corpus, make_app, tmp_path):
    app = make_app()
    app.indexer().run([SourceSettings(path=corpus)])
    moved = tmp_path / "new" / "docs"
    shutil.move(corpus, moved)
    report = app.indexer().run([SourceSettings(path=moved)])
    assert len(report.changed) == 3 and report.deleted == [] and len(app.store.documents()) == 3
    hit = app.retriever.search("office cat", k=1, scope=EVERYTHING).hits[0]
    assert hit.chunk.citation_url == (moved / "notes.txt").as_uri()


def test_two_sources_with_one_label_are_refused_until_one_is_named(corpus, make_app, tmp_path):
    other = tmp_path / "other" / "docs"
    other.mkdir(parents=True)
    (other / "extra.md").write_text("# Extra\n\nThe lighthouse keeper counts ships at dawn.\n")
    with pytest.raises(ValueError, match="two sources are called 'docs'.*give one a `name:`"):
        Settings(ingest={"sources": [{"path": str(corpus)}, {"path": str(other)}]})
    app = make_app()
    with pytest.raises(IngestError, match="give one a `name:`"):
        app.indexer().run([SourceSettings(path=corpus), SourceSettings(path=other)])
    assert app.store.documents() == []
    named = [SourceSettings(path=corpus), SourceSettings(path=other, name="other-docs")]
    Settings(ingest={"sources": [source.model_dump() for source in named]})
    assert len(app.indexer().run(named).new) == 4


def test_a_pipeline_version_bump_reindexes_once_and_leaves_one_record_per_file(corpus, make_app, monkeypatch):
    app = make_app()
    with monkeypatch.context() as patched:  # an index built with another id scheme and pipeline version
        patched.setattr(pipeline, "PIPELINE_VERSION", "old")
        patched.setattr(pipeline, "document_id", lambda label, relative: "old-" + document_id(label, relative))
        assert len(app.indexer().run([SourceSettings(path=corpus)]).new) == 3
    report = app.indexer().run([SourceSettings(path=corpus)])
    assert len(report.new) == 3 and len(report.deleted) == 3
    records = app.store.documents()
    assert sorted(Path(r.source).name for r in records) == ["install.md", "notes.txt", "tuning.md"]
    assert not any(r.doc_id.startswith("old-") for r in records)
    assert app.store.count() == sum(len(r.chunk_ids) for r in records)
    assert app.indexer().run([SourceSettings(path=corpus)]).unchanged == 3


def test_a_path_inside_a_configured_source_keeps_its_ids_and_syncs_only_there(corpus, make_app):
    configured = [SourceSettings(path=corpus, tenant="acme", groups=["eng"], url_template=TEMPLATE)]
    app = make_app()
    app.indexer().run(configured)
    ids = {r.doc_id for r in app.store.documents()}
    (corpus / "guide" / "install.md").unlink()
    (corpus / "guide" / "faq.md").write_text("# FAQ\n\nThe answer to the usual question is forty-two.\n")
    (corpus / "notes.txt").unlink()  # outside the part synced: left as it is
    part = explicit_source(str(corpus / "guide"), None, configured)
    assert part.label == "docs" and part.tenant == "acme" and part.url_template == TEMPLATE
    report = app.indexer().run([part])
    assert [Path(p).name for p in report.new] == ["faq.md"] and report.unchanged == 1
    assert [Path(p).name for p in report.deleted] == ["install.md"]
    records = {r.doc_id: r for r in app.store.documents()}
    assert document_id("docs", "guide/faq.md") in records and document_id("docs", "notes.txt") in ids & set(records)
    assert records[document_id("docs", "guide/faq.md")].groups == ["eng"]
