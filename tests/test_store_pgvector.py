"""`PgVectorStore`: the store contract against a real PostgreSQL 18 + pgvector, plus what its design must guarantee.

Each test gets a schema of its own in the session's server (tests/conftest.py `pgvector_url`).
"""

from __future__ import annotations

import uuid

import numpy as np
import psycopg
import pytest
from pydantic import ValidationError
from store_contract import (
    EVERYTHING,
    StoreContract,
    assert_hits_pair_right,
    dense,
    handles,
    ids,
    put,
    put_texts,
    record,
    store_fixtures,
    text_vector,
)

# The store-generic checks of test_store_search.py and test_store_filters.py, collected here again against this
# module's `store` fixture.
from test_store_filters import test_cli_filter_on_an_int_field_matches, test_the_retriever_refuses_k_below_one  # noqa: F401
from test_store_search import (  # noqa: F401
    test_a_hybrid_search_fuses_exactly_what_its_halves_find_alone,
    test_a_large_index_scores_only_the_informative_terms,
    test_filtered_dense_search_is_exact_whether_it_gathers_or_scans,
    test_term_counts_follow_the_writes,
)

from ragline.app import Ragline
from ragline.cli import run
from ragline.config import Settings, StoreSettings
from ragline.store import pgvector
from ragline.store.base import DEFAULT_TENANT, EVERYONE, Scope, SearchRequest, StoreError
from ragline.store.pgvector import PgVectorStore
from ragline.types import Chunk


@pytest.fixture
def schema_name(pgvector_url):
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pgvector_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@pytest.fixture
def opened(pgvector_url, schema_name):
    """Open stores on the test's schema (each with a pool of its own); all closed afterwards."""
    with handles(lambda **options: PgVectorStore(pgvector_url, schema_name, **{"pool_size": 2, **options})) as open_store:
        yield open_store


store, reopen = store_fixtures()


class TestPgVectorStore(StoreContract):
    """The whole contract, unchanged (the `store` and `reopen` fixtures above)."""


def explain(url: str, schema: str, sql: str, params: dict) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT set_config('search_path', %s || ', public', false)", (schema,))
        cursor = psycopg.ClientCursor(conn)
        cursor.execute("EXPLAIN " + sql, params)
        return "\n".join(row[0] for row in cursor.fetchall())


def random_unit_vectors(count: int, dim: int = 8, seed: int = 11) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_an_unfiltered_dense_search_walks_the_hnsw_index(store, pgvector_url, schema_name):
    vectors = random_unit_vectors(5_000)
    chunks = [Chunk(f"d-{i:04d}", "d", f"text {i}", {"title": "d"}) for i in range(len(vectors))]
    store.upsert_document(record("d"), chunks, vectors)
    with psycopg.connect(pgvector_url, autocommit=True) as conn:
        conn.execute(f"ANALYZE {schema_name}.chunks")
    params = {"query": pgvector._vector_text(text_vector("q")), "depth": 10 + pgvector.TIE_SLACK}
    assert "chunks_embedding" in explain(pgvector_url, schema_name, pgvector.dense_sql([], exact=False), params)
    assert "chunks_embedding" not in explain(pgvector_url, schema_name, pgvector.dense_sql([], exact=True), params)
    query = text_vector("q")
    hits = store.search(dense(query, 10))
    best = np.argsort(-(vectors @ query))[:10]
    assert len(set(ids(hits)) & {f"d-{i:04d}" for i in best}) >= 9  # approximate, but close


BOARD = Scope("acme", frozenset({"board"}))


def fill_near_and_far(store: PgVectorStore, query: np.ndarray) -> np.ndarray:
    """2,000 chunks near `query` that BOARD may not read, and 5 far from it that it may; returns the 5 vectors."""
    near = random_unit_vectors(2_000) * 0.1 + query
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    common = [Chunk(f"common-{i:04d}", "common", f"common {i}", {}) for i in range(len(near))]
    store.upsert_document(record("common", tenant="acme", groups=["staff"]), common, near)
    rare_texts = [f"rare {i}" for i in range(5)]
    far = np.stack([0.05 * text_vector(text) - query for text in rare_texts])
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    rare = [Chunk(f"rare-{i}", "rare", text, {}) for i, text in enumerate(rare_texts)]
    store.upsert_document(record("rare", tenant="acme", groups=["board"]), rare, far)
    return far


def assert_finds_every_rare_chunk_in_order(store: PgVectorStore, query: np.ndarray, far: np.ndarray) -> None:
    hits = store.search(dense(query, 10, scope=BOARD))
    exact = np.argsort(-(far @ query))
    assert ids(hits) == [f"rare-{i}" for i in exact]
    assert np.allclose([hit.score for hit in hits], (far @ query)[exact], atol=1e-5)


@pytest.mark.parametrize("exact_search_rows", [20_000, 0])
def test_a_selective_scope_finds_every_chunk_it_may_read(opened, exact_search_rows):
    """Ranked exactly because the scope allows few chunks (20,000), or by the approximate query (0)."""
    store = opened(exact_search_rows=exact_search_rows)
    query = text_vector("q")
    far = fill_near_and_far(store, query)
    assert_finds_every_rare_chunk_in_order(store, query, far)
    hybrid = store.search(SearchRequest(BOARD, text="rare", vector=query, mode="hybrid", k=10))
    assert sorted(ids(hybrid)) == [f"rare-{i}" for i in range(5)]


def test_a_graph_walk_that_comes_back_short_is_redone_exactly(opened, caplog):
    """The planner made to walk the HNSW graph for a selective scope, and the walk cut short: the exact ranking
    that follows still finds every chunk the scope may read."""
    store = opened(exact_search_rows=0, pool_size=1)
    query = text_vector("q")
    far = fill_near_and_far(store, query)
    with store._pool.connection() as conn:  # the store's only connection: these settings hold for its searches
        for setting in ("enable_seqscan = off", "enable_bitmapscan = off", "enable_sort = off",
                        "hnsw.max_scan_tuples = 1"):
            conn.execute(f"SET {setting}")
    with caplog.at_level("INFO", logger="ragline.store.pgvector"):
        assert_finds_every_rare_chunk_in_order(store, query, far)
    assert "the HNSW walk found 0 of 5 allowed chunks" in caplog.text


def test_two_stores_with_pools_of_their_own_see_each_others_commits(opened):
    first, second = opened(), opened()
    put(first, "a", [0])
    assert ids(second.search(dense(text_vector("x"), 5))) == ["a-0"]
    put_texts(second, "b", ["tides of b"])
    assert {hit.chunk.doc_id for hit in first.search(dense(text_vector("x"), 5))} == {"a", "b"}
    second.set_access("a", "acme", ["eng"])
    assert first.count(scope=EVERYTHING) == 1 and first.count(scope=Scope("acme", None)) == 1
    assert first.index_version() == second.index_version()
    first.delete_document("b")
    assert second.documents() == first.documents() and [r.doc_id for r in second.documents()] == ["a"]


def test_a_hybrid_search_sees_one_committed_state(opened, monkeypatch):
    """Another store commits before every SELECT of the reader's; both halves and the rows still come from one state."""
    writer, reader = opened(), opened()
    put_texts(writer, "a", ["a v0 tide 0", "a v0 tide 1"])
    put_texts(writer, "b", ["b tide 0"])
    commits: list[str] = []
    writing = False
    execute = psycopg.Cursor.execute

    def commit_before_selects(cursor, query, *args, **kwargs):
        nonlocal writing
        if not writing and str(query).lstrip().upper().startswith("SELECT"):
            writing = True
            try:
                version = len(commits) + 1
                put_texts(writer, "a", [f"a v{version} tide {i}" for i in range(1 + version % 4)])
            finally:
                writing = False
            commits.append(str(query))
        return execute(cursor, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", commit_before_selects)
    for round_ in range(5):
        request = SearchRequest(EVERYTHING, text="tide", vector=text_vector(f"query {round_}"), mode="hybrid", k=10,
                                with_vectors=True)
        hits = reader.search(request)
        assert hits and len({hit.chunk.text.split()[1] for hit in hits if hit.chunk.doc_id == "a"}) == 1
        for hit in hits:
            assert np.allclose(hit.vector, text_vector(hit.chunk.text))
    monkeypatch.undo()
    assert len(commits) >= 10


def test_a_dense_search_pairs_every_chunk_with_its_vector_while_another_store_writes(opened):
    writer, reader = opened(), opened()
    for version in range(4):
        put_texts(writer, "a", [f"a v{version} {i}" for i in range(1 + version)])
        put_texts(writer, "b", [f"b v{version} {i}" for i in range(3 - version)])
        query = text_vector(f"query {version}")
        assert_hits_pair_right(reader.search(dense(query, 10)), query, 10)


def test_the_app_opens_the_store_its_settings_name(pgvector_url, schema_name, tmp_path):
    settings = Settings(data_dir=tmp_path, store=StoreSettings(backend="pgvector", url=pgvector_url,
                                                               db_schema=schema_name))
    app = Ragline(settings)
    assert isinstance(app.store, PgVectorStore) and app.store.schema == schema_name
    put(app.store, "a", [0])
    app.close()
    again = PgVectorStore(pgvector_url, schema_name)
    assert again.count(scope=Scope(DEFAULT_TENANT, frozenset({EVERYONE}))) == 1
    again.close()


def test_settings_refuse_pgvector_without_a_url():
    with pytest.raises(ValidationError, match="store.url"):
        StoreSettings(backend="pgvector")
    with pytest.raises(ValidationError):
        StoreSettings(backend="pgvector", url="postgresql://x", db_schema="Robert'); DROP TABLE students;--")


def test_an_unreachable_server_fails_naming_where_it_looked():
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:1/nowhere"):
        PgVectorStore("postgresql://postgres@127.0.0.1:1/nowhere", connect_timeout_s=1)


@pytest.mark.parametrize("mode", ["dense", "keyword", "hybrid"])
def test_a_scope_that_reads_every_chunk_restricts_nothing(store, monkeypatch, mode):
    for doc_id in ("a", "b"):
        put_texts(store, doc_id, [f"tides of {doc_id}"])
    statements: list[str] = []
    execute = psycopg.Cursor.execute

    def traced(cursor, query, *args, **kwargs):
        statements.append(str(query))
        return execute(cursor, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", traced)
    for scope in (Scope.everything(), Scope(DEFAULT_TENANT, frozenset({"eng"}))):  # every document is for everyone
        request = SearchRequest(scope, text="tides", vector=text_vector("q"), mode=mode, k=5)
        assert {hit.chunk.doc_id for hit in store.search(request)} == {"a", "b"}
    ranking = [sql for sql in statements if "ORDER BY" in sql]
    assert ranking and not any("c.doc_id IN" in sql for sql in ranking)


def test_cli_search_with_an_unknown_field_fails_naming_the_known_ones(pgvector_url, schema_name, tmp_path,
                                                                       monkeypatch, capsys):
    """The command line opens the store its environment names (`RAGLINE_STORE__*`)."""
    monkeypatch.setenv("RAGLINE_DATA_DIR", str(tmp_path / "index"))
    monkeypatch.setenv("RAGLINE_STORE__BACKEND", "pgvector")
    monkeypatch.setenv("RAGLINE_STORE__URL", pgvector_url)
    monkeypatch.setenv("RAGLINE_STORE__DB_SCHEMA", schema_name)
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.chdir(tmp_path)
    store = PgVectorStore(pgvector_url, schema_name)
    put(store, "a", [0], page=3)
    store.close()
    assert run(["search", "anything", "--filter", "pagee=3"]) == 2
    error = capsys.readouterr().err
    assert "unknown filter field 'pagee'" in error and "page (int)" in error
