"""`ragline store migrate`: an index copied between stores searches as before, resumes, repairs and verifies.

The source index is built by a real ingest (three sources with their own
tenants and groups, and a file that fails to parse) with the default model;
pgvector targets are schemas of the session's PostgreSQL server
(tests/conftest.py `pgvector_url`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from ragline.app import Ragline
from ragline.cli import EXIT_RUN_FAILED, run
from ragline.config import ConfigError, Settings, SourceSettings, StoreSettings, with_store_url
from ragline.store.base import DEFAULT_TENANT, DocumentRecord, Scope, SearchRequest, VectorStore
from ragline.store.migrate import MigrationError, MigrationReport, migrate, verify
from ragline.types import Chunk

FILES = {
    "public/tides.md": "# Tides\n\n## Spring tides\n\nSpring tides follow the new and the full moon.\n\n"
                       "## Neap tides\n\nNeap tides come at the quarter moons, with the smallest range.\n",
    "public/reefs.md": "# Reefs\n\n## Coral\n\nCoral reefs grow in warm, shallow and clear water.\n",
    "public/broken.docx": "PK\x03\x04 not really a zip",
    "eng/deploy.md": "# Deploying\n\n## Rollback\n\nA failed deploy rolls back with `ragline_rollback --to last`.\n\n"
                     "## Canary\n\nA canary release reaches one percent of the traffic first.\n",
    "eng/oncall.md": "# On call\n\n## Paging\n\nThe pager rotates weekly; an alert pages the primary first.\n",
    "acme/moon.md": "# Moon\n\n## Phases\n\nThe moon shows its phases over a month of tides.\n",
}
SOURCES = {"public": (DEFAULT_TENANT, ["*"]), "eng": (DEFAULT_TENANT, ["eng"]), "acme": ("acme", ["*"])}
QUERIES = ["when are spring tides", "rollback after a failed deploy", "ragline_rollback", "moon phases and tides"]
SCOPES = [
    Scope.everything(), Scope(DEFAULT_TENANT, frozenset({"eng"})), Scope(DEFAULT_TENANT, frozenset()),
    Scope.everything("acme"), Scope.everything("initech"),
]
"""Every chunk of the default tenant, its engineers', its public ones only, another tenant's, a tenant with none."""
MODES = ("dense", "keyword", "hybrid")
SCORE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory, embedder) -> Path:
    """A local index of FILES (one of them failed), built once; tests copy from it and never write it."""
    root = tmp_path_factory.mktemp("migrate-source")
    for name, text in FILES.items():
        (root / "docs" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "docs" / name).write_text(text)
    app = Ragline(Settings(data_dir=root / "index"))
    app.__dict__["embedder"] = embedder
    report = app.indexer().run([
        SourceSettings(path=root / "docs" / name, tenant=tenant, groups=groups) for name, (tenant, groups) in SOURCES.items()
    ])
    app.close()
    assert len(report.failed) == 1 and report.chunks > 0
    return root / "index"


@pytest.fixture
def schemas(pgvector_url) -> Iterator[Callable[[], str]]:
    """Names of fresh pgvector schemas, dropped after the test."""
    import psycopg

    made = []

    def new() -> str:
        made.append(f"migrate_{uuid.uuid4().hex[:12]}")
        return made[-1]

    yield new
    with psycopg.connect(pgvector_url, autocommit=True) as conn:
        for schema in made:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def stores() -> Iterator[Callable[[Settings], VectorStore]]:
    """Open stores from settings through the composition root; all closed after the test."""
    opened: list[VectorStore] = []

    def open_store(settings: Settings) -> VectorStore:
        opened.append(Ragline(settings).store)
        return opened[-1]

    yield open_store
    for store in opened:
        store.close()


def local(path: Path) -> Settings:
    return Settings(data_dir=path)


def pgvector(url: str, schema: str, tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "pg-data", store=StoreSettings(backend="pgvector", url=url, db_schema=schema))


def contents(store: VectorStore) -> list[tuple[DocumentRecord, list[Chunk], np.ndarray]]:
    return [store.export_document(record.doc_id) for record in store.documents()]


def assert_same_contents(got: VectorStore, want: VectorStore) -> None:
    """Manifest rows (timestamps included), chunks and vectors (bit for bit), and the index's meta."""
    got_docs, want_docs = contents(got), contents(want)
    assert [record for record, _, _ in got_docs] == [record for record, _, _ in want_docs]
    for (record, got_chunks, got_vectors), (_, want_chunks, want_vectors) in zip(got_docs, want_docs):
        assert got_chunks == want_chunks, record.source
        assert len(got_vectors) == len(want_vectors), record.source
        if len(want_vectors):
            np.testing.assert_array_equal(got_vectors, want_vectors)
    for key in ("embedder", "last_ingest"):
        assert got.get_meta(key) == want.get_meta(key) is not None, key
    assert got.count() == want.count() and got.filter_fields() == want.filter_fields()


def results(store: VectorStore, embedder, modes=MODES) -> dict[tuple, list[tuple[str, float]]]:
    """(chunk id, score) of each query's hits in each mode and scope."""
    vectors = embedder.embed_queries(QUERIES)
    return {
        (query, mode, scope): [
            (hit.chunk.chunk_id, hit.score)
            for hit in store.search(SearchRequest(scope, query, vector, mode, k=5))
        ]
        for query, vector in zip(QUERIES, vectors) for mode in modes for scope in SCOPES
    }


def assert_same_results(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, want_hits in want.items():
        assert [cid for cid, _ in got[key]] == [cid for cid, _ in want_hits], key
        assert np.allclose([s for _, s in got[key]], [s for _, s in want_hits], atol=SCORE_TOLERANCE), key
    engineers, public = (want[(QUERIES[1], "dense", scope)] for scope in SCOPES[1:3])
    assert any(want.values()) and not all(want.values()) and engineers != public, "the scopes must restrict"


def test_local_to_pgvector_to_local_keeps_the_index_and_its_search_results(
    source_dir, pgvector_url, schemas, stores, tmp_path, embedder,
):
    source = stores(local(source_dir))
    pg = stores(pgvector(pgvector_url, schemas(), tmp_path))
    back = stores(local(tmp_path / "back"))

    there = migrate(source, pg)
    documents = len(source.documents())
    assert (there.documents, there.copied, there.unchanged, there.deleted) == (documents, documents, 0, [])
    assert there.chunks == source.count() > 0
    assert_same_contents(pg, source)
    again = migrate(pg, back)
    assert again.copied == documents and again.chunks == there.chunks
    assert_same_contents(back, source)

    assert_same_results(results(back, embedder), results(source, embedder))
    # Across stores only dense scores are the same quantity (keyword scoring is each store's own).
    assert_same_results(results(pg, embedder, ["dense"]), results(source, embedder, ["dense"]))


def test_pgvector_to_local_to_pgvector_keeps_the_index_and_its_search_results(
    source_dir, pgvector_url, schemas, stores, tmp_path, embedder,
):
    first = stores(pgvector(pgvector_url, schemas(), tmp_path))
    migrate(stores(local(source_dir)), first)
    middle = stores(local(tmp_path / "middle"))
    second = stores(pgvector(pgvector_url, schemas(), tmp_path))

    migrate(first, middle)
    report = migrate(middle, second)
    assert report.copied == len(first.documents()) and report.chunks == first.count()
    assert_same_contents(middle, first)
    assert_same_contents(second, first)
    assert_same_results(results(second, embedder), results(first, embedder))


class Interrupted(Exception):
    pass


def interrupt_after(documents: int):
    def progress(done: int, total: int, source: str) -> None:
        if done == documents:
            raise Interrupted(source)

    return progress


def extra_document(store: VectorStore) -> DocumentRecord:
    """A document in the target that the source does not hold, with a vector of the index's size."""
    dim = len(store.export_document(store.documents()[0].doc_id)[2][0])
    record = DocumentRecord("extra", "/elsewhere/extra.md", "/elsewhere", 1, 1, "x", "y", chunk_ids=["extra-0"])
    vector = np.zeros((1, dim), np.float32)
    vector[0, 0] = 1.0
    store.upsert_document(record, [Chunk("extra-0", "extra", "an extra chunk", {"title": "extra"})], vector)
    return record


def test_an_interrupted_migration_continues_rewrites_what_differs_and_deletes_extras(
    source_dir, pgvector_url, schemas, stores, tmp_path,
):
    source = stores(local(source_dir))
    target = stores(pgvector(pgvector_url, schemas(), tmp_path))
    records = source.documents()
    with pytest.raises(Interrupted):
        migrate(source, target, interrupt_after(3))
    assert {record.doc_id for record in target.documents()} == {record.doc_id for record in records[:3]}
    assert target.get_meta("embedder") == source.get_meta("embedder")
    assert target.get_meta("last_ingest") is None  # written once everything is over

    # Meanwhile one copied document changed in the target and one appeared that the source lacks.
    changed, chunks, vectors = target.export_document(records[0].doc_id)
    changed.size += 1
    target.upsert_document(changed, chunks, vectors)
    extra = extra_document(target)

    steps: list[tuple[int, int]] = []
    report = migrate(source, target, lambda done, total, _: steps.append((done, total)))
    assert (report.copied, report.unchanged, report.deleted) == (len(records) - 2, 2, [extra.source])
    assert steps == [(done, len(records)) for done in range(len(records) + 1)]
    assert target.document("extra") is None
    assert_same_contents(target, source)
    again = migrate(source, target)
    assert (again.copied, again.unchanged, again.deleted) == (0, len(records), [])


def test_the_count_check_fails_loudly_when_the_target_is_tampered_with(source_dir, stores, tmp_path):
    source = stores(local(source_dir))
    target = stores(local(tmp_path / "target"))
    victim = next(record for record in source.documents() if len(record.chunk_ids) > 1)
    gone = next(record for record in source.documents() if record.doc_id != victim.doc_id and record.chunk_ids)

    def tamper(done: int, total: int, _: str) -> None:  # something else writes to the target as it is filled
        if done == total:
            record, chunks, vectors = target.export_document(victim.doc_id)
            record.chunk_ids = record.chunk_ids[:1]
            target.upsert_document(record, chunks[:1], vectors[:1])
            target.delete_document(gone.doc_id)

    with pytest.raises(MigrationError) as failure:
        migrate(source, target, tamper)
    message = str(failure.value)
    total = source.count()
    assert f"1 documents missing ({gone.source})" in message
    assert f"{victim.source}: {len(victim.chunk_ids)} chunks in the source, 1 in the target" in message
    assert f"where the source counts {total}" in message and "Run the migration again" in message

    assert migrate(source, target).chunks == total  # the re-run repairs it
    verify(source, target)
    extra_document(target)
    with pytest.raises(MigrationError, match="1 documents the source does not hold \\(/elsewhere/extra.md\\)"):
        verify(source, target)


def test_a_target_of_another_embedding_model_is_refused_unless_forced(source_dir, stores, tmp_path):
    source = stores(local(source_dir))
    target = stores(local(tmp_path / "target"))
    target.set_meta("embedder", "another-model")
    record = DocumentRecord("old", "/old.md", "/", 1, 1, "x", "y")
    target.upsert_document(record, [Chunk("old-0", "old", "old text", {})], np.ones((1, 8), np.float32))

    with pytest.raises(MigrationError, match="embedding model 'another-model'.*--force"):
        migrate(source, target)
    assert target.document("old") is not None and target.get_meta("embedder") == "another-model"
    report = migrate(source, target, force=True)
    assert report.cleared and report.deleted == [] and report.copied == len(source.documents())
    assert_same_contents(target, source)


def test_an_empty_source_does_not_empty_the_target_unless_forced(source_dir, stores, tmp_path):
    """An empty source is most likely a mistake in the store settings, not a wish to delete everything."""
    target = stores(local(tmp_path / "target"))
    migrate(stores(local(source_dir)), target)
    documents = len(target.documents())
    empty = stores(local(tmp_path / "empty"))
    with pytest.raises(MigrationError, match=f"the source holds no documents and the target {documents}.*--force"):
        migrate(empty, target)
    assert len(target.documents()) == documents
    assert len(migrate(empty, target, force=True).deleted) == documents
    assert target.documents() == [] and target.count() == 0


@pytest.mark.parametrize("url, backend, where", [
    ("postgresql://u:p@db:5432/rag?schema=idx2", "pgvector", {"url": "postgresql://u:p@db:5432/rag",
                                                              "db_schema": "idx2"}),
    ("postgres://db/rag?sslmode=require", "pgvector", {"url": "postgres://db/rag?sslmode=require",
                                                       "db_schema": "ragline"}),
    ("qdrant+https://q.internal:6333?collection=docs2", "qdrant", {"url": "https://q.internal:6333",
                                                                   "collection": "docs2"}),
    ("qdrant:///srv/index", "qdrant", {"url": None, "data_dir": "/srv/index"}),
    ("milvus+http://m:19530?api_key=root:pw", "milvus", {"url": "http://m:19530", "api_key": "root:pw"}),
    ("milvus:///srv/milvus.db", "milvus", {"url": "/srv/milvus.db"}),
    ("/srv/milvus.db", "milvus", {"url": "/srv/milvus.db"}),
    ("local:///srv/index", "local", {"url": None, "data_dir": "/srv/index"}),
    ("/srv/other-index", "local", {"url": None, "data_dir": "/srv/other-index"}),
])
def test_store_urls_name_their_backend_and_place(url, backend, where):
    configured = Settings(data_dir=Path("/srv/here"), store=StoreSettings(collection="docs"))
    settings = with_store_url(configured, url)
    secrets = {"url": settings.store.url, "api_key": settings.store.api_key}
    got = {key: (secrets[key].get_secret_value() if secrets[key] else None) if key in secrets
           else str(settings.data_dir) if key == "data_dir" else getattr(settings.store, key) for key in where}
    assert settings.store.backend == backend and got == where
    if backend in ("qdrant", "milvus") and "collection" not in where:
        assert settings.store.collection == "docs"  # the configured one


def test_an_unknown_store_url_names_the_accepted_forms():
    with pytest.raises(ConfigError, match="unknown store URL scheme 'ftp'.*postgresql://.*local:///folder"):
        with_store_url(Settings(), "ftp://example.org/index")
    with pytest.raises(ConfigError, match="invalid pgvector store URL.*db_schema"):
        with_store_url(Settings(), "postgresql://db/rag?schema=Bad-Name")


@pytest.fixture
def cli_env(source_dir, monkeypatch, tmp_path):
    """The command line's config: the local source index."""
    monkeypatch.setenv("RAGLINE_DATA_DIR", str(source_dir))
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.chdir(tmp_path)


def summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_cli_migrates_to_pgvector_and_back_by_url(cli_env, source_dir, pgvector_url, schemas, stores, tmp_path,
                                                 monkeypatch, capsys):
    schema = schemas()
    documents = len(stores(local(source_dir)).documents())
    assert run(["store", "migrate", "--to", f"{pgvector_url}?schema={schema}", "--json"]) == 0
    report = summary(capsys)
    assert report["target"].startswith("pgvector at 127.0.0.1:") and report["target"].endswith(f"schema {schema}")
    assert (report["documents"], report["copied"], report["unchanged"]) == (documents, documents, 0)
    assert run(["store", "migrate", "--to", f"{pgvector_url}?schema={schema}", "--json"]) == 0
    assert summary(capsys)["unchanged"] == documents  # run again: nothing left to copy

    monkeypatch.setenv("RAGLINE_STORE__BACKEND", "pgvector")  # now the configured store is the pgvector one
    monkeypatch.setenv("RAGLINE_STORE__URL", pgvector_url)
    monkeypatch.setenv("RAGLINE_STORE__DB_SCHEMA", schema)
    assert run(["store", "migrate", "--to", f"local://{tmp_path / 'back'}"]) == 0
    printed = capsys.readouterr().out
    assert "store migration" in printed and "chunks (verified)" in printed
    assert_same_contents(stores(local(tmp_path / "back")), stores(local(source_dir)))


def test_cli_refuses_itself_bad_urls_and_another_model_with_clear_messages(cli_env, source_dir, stores, tmp_path,
                                                                          capsys):
    assert run(["store", "migrate", "--to", str(source_dir)]) == 2
    assert "names the configured store itself" in capsys.readouterr().err
    assert run(["store", "migrate", "--to", "ftp://example.org/x"]) == 2
    assert "unknown store URL scheme 'ftp'" in capsys.readouterr().err

    other = stores(local(tmp_path / "other"))
    other.set_meta("embedder", "another-model")
    other.upsert_document(DocumentRecord("old", "/old.md", "/", 1, 1, "x", "y"),
                          [Chunk("old-0", "old", "old text", {})], np.ones((1, 8), np.float32))
    other.close()
    assert run(["store", "migrate", "--to", str(tmp_path / "other")]) == EXIT_RUN_FAILED
    error = capsys.readouterr().err
    assert "embedding model 'another-model'" in error and "--force" in error
    assert run(["store", "migrate", "--to", str(tmp_path / "other"), "--force", "--json"]) == 0
    report = MigrationReport(**{key: value for key, value in summary(capsys).items()
                                if key not in ("source", "target")})
    assert report.cleared and report.copied == report.documents > 0
