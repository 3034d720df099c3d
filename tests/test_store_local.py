"""`LocalStore`: the store contract, plus what its SQLite + snapshot design must guarantee."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading

import numpy as np
import pytest
from store_contract import (
    StoreContract,
    assert_hits_pair_right,
    chunks_for,
    dense,
    fill_owners,
    put,
    put_texts,
    record,
    text_vector,
    vector,
    writer_commits_before_every_select,
)

from ragline.store import ann
from ragline.store.base import DEFAULT_TENANT, EVERYONE, Scope, SearchRequest
from ragline.store.local import LocalStore, Tuning


class TestLocalStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        store = LocalStore(tmp_path / "index")
        yield store
        store.close()

    @pytest.fixture
    def reopen(self, tmp_path):
        opened = []

        def _reopen():
            opened.append(LocalStore(tmp_path / "index"))
            return opened[-1]

        yield _reopen
        for store in opened:
            store.close()


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


def vector_files(data_dir):
    return sorted((data_dir / "index").rglob("vectors.npy"))


def test_a_search_sees_one_committed_state(data_dir):
    """Another process commits before every statement the reader runs; each search still sees one state."""
    writer, reader = LocalStore(data_dir), LocalStore(data_dir)
    put_texts(writer, "a", ["a v0 0", "a v0 1"])
    put_texts(writer, "b", ["b 0"])
    with writer_commits_before_every_select(reader, writer, lambda v: [f"a v{v} {i}" for i in range(1 + v % 4)]) as commits:
        for round_ in range(5):
            query = text_vector(f"query {round_}")
            assert_hits_pair_right(reader.search(dense(query, 10)), query, 10)
    assert len(commits) >= 10
    final = reader.search(dense(text_vector("last"), 10))
    assert {h.chunk.text for h in final if h.chunk.doc_id == "a"} == {
        f"a v{len(commits)} {i}" for i in range(1 + len(commits) % 4)
    }
    writer.close(), reader.close()


def test_a_snapshot_torn_between_its_files_is_not_trusted(data_dir, tmp_path):
    """What a kill between the renames of a persist leaves: new labels beside the old vectors file."""
    store = LocalStore(data_dir)
    put_texts(store, "a", ["a old 0", "a old 1", "a old 2"])
    store.persist()
    (old_vectors,) = vector_files(data_dir)
    shutil.copy(old_vectors, tmp_path / "old-vectors.npy")
    put_texts(store, "a", ["a new 0", "a new 1", "a new 2"])
    store.persist()
    store.close()
    (new_vectors,) = vector_files(data_dir)
    shutil.copy(tmp_path / "old-vectors.npy", new_vectors)

    again = LocalStore(data_dir)
    query = text_vector("a new 1")
    hits = again.search(dense(query, 3))
    assert_hits_pair_right(hits, query, 3)
    assert hits[0].chunk.text == "a new 1"
    again.persist()  # and the next snapshot is right again
    again.close()
    third = LocalStore(data_dir)
    assert_hits_pair_right(third.search(dense(query, 3)), query, 3)
    third.close()


def test_a_damaged_snapshot_is_rebuilt_from_the_database(data_dir):
    store = LocalStore(data_dir)
    put_texts(store, "a", [f"a {i}" for i in range(4)])
    store.persist()
    store.close()
    (vectors,) = vector_files(data_dir)
    matrix = np.load(vectors)
    np.save(vectors, matrix[::-1])  # right shape, wrong rows

    again = LocalStore(data_dir)
    query = text_vector("a 2")
    hits = again.search(dense(query, 4))
    assert_hits_pair_right(hits, query, 4)
    assert hits[0].chunk.text == "a 2"
    again.close()


def test_persist_keeps_only_the_current_snapshot(data_dir):
    store = LocalStore(data_dir)
    for version in range(3):
        put_texts(store, "a", [f"a {version}"])
        store.persist()
    assert len(vector_files(data_dir)) == 1
    store.close()


def test_a_reader_behind_the_tombstone_compaction_rescans(data_dir):
    writer, reader = LocalStore(data_dir), LocalStore(data_dir)
    put(writer, "a", [0, 1])
    put(writer, "b", [2])
    assert {h.chunk.doc_id for h in reader.search(dense(vector(0), 5))} == {"a", "b"}
    writer.delete_document("a")
    writer.persist()  # drops the tombstones its snapshot covers, the ones the reader has not seen
    put(writer, "c", [0])
    assert {h.chunk.doc_id for h in reader.search(dense(vector(0), 5))} == {"b", "c"}
    assert reader.count() == 2
    writer.close(), reader.close()


def test_an_index_of_the_previous_version_is_upgraded(data_dir):
    """Its database learns its field types; its one-folder snapshot (here a wrong one) is ignored, then removed."""
    store = LocalStore(data_dir)
    put(store, "a", [0, 1], format="pdf", page=2)
    store.close()
    db = sqlite3.connect(data_dir / "store.sqlite")
    db.execute("DROP TABLE fields")
    db.execute("PRAGMA user_version = 0")
    db.commit()
    db.close()
    (data_dir / "index").mkdir()
    np.save(data_dir / "index" / "seqs.npy", np.array([1, 2]))
    np.save(data_dir / "index" / "vectors.npy", np.stack([vector(5), vector(6)]))
    (data_dir / "index" / "generation").write_text("whatever 99")

    again = LocalStore(data_dir)
    assert again.filter_fields() == {"title": "str", "chunk_index": "int", "format": "str", "page": "int"}
    assert again.count({"page": 2}) == 2
    assert [h.chunk.chunk_id for h in again.search(dense(vector(1), 1))] == ["a-1"]
    again.persist()
    assert not list((data_dir / "index").glob("*.npy")) and not (data_dir / "index" / "generation").exists()
    again.close()


def test_a_version_3_manifest_gains_the_dependencies_column(data_dir):
    store = LocalStore(data_dir)
    put(store, "a", [0])
    store.close()
    db = sqlite3.connect(data_dir / "store.sqlite")
    db.execute("ALTER TABLE documents DROP COLUMN dependencies")
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()

    again = LocalStore(data_dir)
    (only,) = again.documents()
    assert (only.doc_id, only.dependencies) == ("a", {})
    changed = again.documents()[0]
    changed.dependencies = {"inc.md": "1:2"}
    again.upsert_document(changed, [], np.zeros((0, 8), np.float32))
    assert again.documents()[0].dependencies == {"inc.md": "1:2"}
    again.close()


def test_a_version_4_index_gains_access_with_every_document_readable_by_its_default_tenant(data_dir):
    store = LocalStore(data_dir)
    put(store, "a", [0, 1])
    put(store, "b", [2])
    store.close()
    db = sqlite3.connect(data_dir / "store.sqlite")  # the tables as version 4 had them
    db.execute("DROP TABLE access")
    db.execute("DROP INDEX documents_tenant")
    db.execute("ALTER TABLE documents DROP COLUMN tenant")
    db.execute("ALTER TABLE documents DROP COLUMN groups")
    db.execute("PRAGMA user_version = 4")
    db.commit()
    db.close()

    again = LocalStore(data_dir)
    assert [(r.doc_id, r.tenant, r.groups) for r in again.documents()] == [
        ("a", DEFAULT_TENANT, [EVERYONE]), ("b", DEFAULT_TENANT, [EVERYONE]),
    ]
    assert again.count(scope=Scope(DEFAULT_TENANT, frozenset({"eng"}))) == 3
    assert again.search(dense(vector(0), 5, scope=Scope("acme", None))) == []
    again.set_access("a", "acme", ["eng"])
    assert {h.chunk.doc_id for h in again.search(dense(vector(0), 5, scope=Scope("acme", frozenset({"eng"}))))} == {"a"}
    again.close()
    assert LocalStore(data_dir).document("a").tenant == "acme"


def traced(store: LocalStore) -> list[str]:
    """The statements `store` runs from now on."""
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    return statements


def test_what_a_scope_may_read_is_looked_up_once_per_state_of_the_index(data_dir):
    writer, reader = LocalStore(data_dir), LocalStore(data_dir)
    fill_owners(writer)
    eng = Scope("acme", frozenset({"eng"}))
    statements = traced(reader)
    reader.search(dense(text_vector("q"), 5, scope=eng))
    assert sum("FROM access" in sql for sql in statements) == 1
    statements.clear()
    for _ in range(3):
        reader.search(dense(text_vector("q"), 5, scope=eng))
    assert not any("FROM access" in sql for sql in statements)
    writer.set_access("acme-eng", "acme", ["ops"])  # a new state: looked up again, by the new rule
    assert "acme-eng" not in {h.chunk.doc_id for h in reader.search(dense(text_vector("q"), 50, scope=eng))}
    assert sum("FROM access" in sql for sql in statements) == 1
    writer.close(), reader.close()


@pytest.mark.parametrize("mode", ["dense", "keyword", "hybrid"])
def test_a_scope_that_reads_every_chunk_restricts_nothing(data_dir, mode):
    store = LocalStore(data_dir)
    for doc_id in ("a", "b"):
        put_texts(store, doc_id, [f"tides of {doc_id}"])
    statements = traced(store)
    for scope in (Scope.everything(), Scope(DEFAULT_TENANT, frozenset({"eng"}))):  # every document is for everyone
        request = SearchRequest(scope, text="tides", vector=text_vector("q"), mode=mode, k=5)
        assert {hit.chunk.doc_id for hit in store.search(request)} == {"a", "b"}
    assert not any("chunks_fts.rowid) IN" in sql for sql in statements)
    store.close()


# -- the HNSW graph of large indexes (a small threshold keeps these fast) ---------------------------------

ANN_DIM = 48
ANN_ROWS = 3000
ANN_DOC = 20
SMALL_GRAPH = Tuning.of(ann_min_chunks=2000, ann_connectivity=16, ann_ef_construction=40, ann_ef_search=64,
                        exact_rows=200)


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    """Unit vectors near random `centres` (neighbours are close but not trivially so, as with embeddings)."""
    rows = centres[rng.integers(len(centres), size=n)] + 0.7 * rng.standard_normal((n, ANN_DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def fill_clustered(store: LocalStore, vectors: np.ndarray, first_doc: int = 0) -> None:
    """Documents of ANN_DOC chunks; chunk i of the run carries `bucket` i % 100 and `part` i % 2."""
    for start in range(0, len(vectors), ANN_DOC):
        doc_id = f"d{first_doc + start // ANN_DOC}"
        block = vectors[start:start + ANN_DOC]
        chunks = chunks_for(doc_id, len(block))
        for i, chunk in enumerate(chunks):
            chunk.metadata.update(bucket=(start + i) % 100, part=(start + i) % 2)
        store.upsert_document(record(doc_id), chunks, block)


@pytest.fixture
def ann_data():
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((30, ANN_DIM))
    return clustered(rng, ANN_ROWS, centres), clustered(rng, 40, centres)


@pytest.fixture
def graph_store(data_dir, ann_data):
    """A persisted index above the graph threshold."""
    store = LocalStore(data_dir, SMALL_GRAPH)
    fill_clustered(store, ann_data[0])
    store.persist()
    yield store
    store.close()


@pytest.fixture
def graph_walks(monkeypatch):
    """How many times a search walked the HNSW graph (the real one, counted)."""
    walks = []
    real = ann.candidates

    def counted(*args, **kwargs):
        walks.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ann, "candidates", counted)
    return walks


def exact_ids(vectors: np.ndarray, query: np.ndarray, k: int, rows: np.ndarray | None = None) -> list[str]:
    rows = np.arange(len(vectors)) if rows is None else rows
    best = rows[np.argsort(-(vectors[rows] @ query), kind="stable")[:k]]
    return [f"d{i // ANN_DOC}-{i % ANN_DOC}" for i in best]


def found_ids(store: LocalStore, query: np.ndarray, k: int, filters: dict | None = None) -> list[str]:
    return [hit.chunk.chunk_id for hit in store.search(dense(query, k, filters))]


def test_an_index_above_the_threshold_is_searched_through_its_graph(graph_store, ann_data, graph_walks):
    assert list((graph_store._snapshot_dir).rglob("graph.faiss"))
    reopened = LocalStore(graph_store._snapshot_dir.parent, SMALL_GRAPH)
    hits = reopened.search(dense(ann_data[1][0], 10))
    assert len(hits) == 10 and len(graph_walks) == 1
    for hit in hits:  # rescored exactly: each score is query · the chunk's float32 vector
        doc, i = hit.chunk.chunk_id[1:].split("-")
        assert hit.score == pytest.approx(float(ann_data[0][int(doc) * ANN_DOC + int(i)] @ ann_data[1][0]), abs=1e-5)
    reopened.close()


def test_an_index_below_the_threshold_has_no_graph_and_is_scanned(data_dir, ann_data, graph_walks):
    store = LocalStore(data_dir, Tuning.of(ann_min_chunks=ANN_ROWS + 1))
    fill_clustered(store, ann_data[0])
    store.persist()
    assert not list(data_dir.rglob("graph.faiss"))
    assert found_ids(store, ann_data[1][0], 10) == exact_ids(ann_data[0], ann_data[1][0], 10)
    assert not graph_walks
    store.close()


def test_the_graph_finds_what_exact_search_finds(graph_store, ann_data, graph_walks):
    vectors, queries = ann_data
    found = [set(found_ids(graph_store, query, 10)) & set(exact_ids(vectors, query, 10)) for query in queries]
    assert len(graph_walks) == len(queries)
    assert sum(len(both) for both in found) / (10 * len(queries)) >= 0.95


def test_rows_written_after_the_snapshot_are_found(graph_store, ann_data, graph_walks):
    vectors, queries = ann_data
    fill_clustered(graph_store, queries[:20], first_doc=ANN_ROWS // ANN_DOC)  # the queries themselves, as chunks
    for i, query in enumerate(queries[:20]):
        assert found_ids(graph_store, query, 1) == [f"d{ANN_ROWS // ANN_DOC}-{i}"]
    assert len(graph_walks) == 20
    graph_store.persist()  # now in the graph, extended
    reopened = LocalStore(graph_store._snapshot_dir.parent, SMALL_GRAPH)
    assert reopened._read_mirror().base.graph.ntotal == ANN_ROWS + 20
    assert found_ids(reopened, queries[3], 1) == [f"d{ANN_ROWS // ANN_DOC}-3"]
    reopened.close()


@pytest.mark.parametrize("deleted_docs, graph_rows", [
    (range(0, 40, 3), ANN_ROWS),  # 9% dead: the graph is extended, its dead rows masked
    (range(45), ANN_ROWS - 45 * ANN_DOC),  # 30%: rebuilt without them
])
def test_deleted_rows_are_never_returned(graph_store, ann_data, graph_walks, deleted_docs, graph_rows):
    vectors, queries = ann_data
    deleted = [f"d{i}" for i in deleted_docs]
    for doc_id in deleted:
        graph_store.delete_document(doc_id)
    probes = vectors[[i * ANN_DOC for i in deleted_docs]]  # each a deleted chunk's own vector

    def returned_docs(store: LocalStore) -> set[str]:
        return {hit.chunk.doc_id for probe in probes for hit in store.search(dense(probe, 30))}

    assert not returned_docs(graph_store) & set(deleted)
    fill_clustered(graph_store, queries[:20], first_doc=ANN_ROWS // ANN_DOC)
    graph_store.persist()
    reopened = LocalStore(graph_store._snapshot_dir.parent, SMALL_GRAPH)
    assert not returned_docs(reopened) & set(deleted)
    assert reopened._read_mirror().base.graph.ntotal == graph_rows + 20
    assert graph_walks and reopened.count() == ANN_ROWS + 20 - len(deleted) * ANN_DOC
    reopened.close()


@pytest.mark.parametrize("filters, rows", [
    ({"bucket": 7}, np.arange(7, ANN_ROWS, 100)),  # 30 rows: scanned exactly
    ({"part": 1}, np.arange(1, ANN_ROWS, 2)),  # 1500 rows, above exact_rows: the graph, walking only them
])
def test_a_filter_returns_the_best_of_the_rows_it_allows(graph_store, ann_data, filters, rows):
    vectors, queries = ann_data
    every = found_ids(graph_store, queries[0], 50, filters)
    assert len(every) == min(50, len(rows)) and set(every) <= set(exact_ids(vectors, queries[0], len(rows), rows))
    if len(rows) <= SMALL_GRAPH.exact_rows:
        assert every == exact_ids(vectors, queries[0], 50, rows)
    found = [set(found_ids(graph_store, query, 10, filters)) & set(exact_ids(vectors, query, 10, rows))
             for query in queries]
    assert sum(len(both) for both in found) / (10 * len(queries)) >= 0.95


@pytest.mark.parametrize("docs", [[9], list(range(100, 115))])  # 20 rows (scanned), 300 (the graph, restricted)
def test_a_scope_returns_the_best_chunks_it_may_read(graph_store, ann_data, docs, graph_walks):
    vectors, queries = ann_data
    for doc in docs:
        graph_store.set_access(f"d{doc}", "acme", ["eng"])
    rows = np.array([doc * ANN_DOC + i for doc in docs for i in range(ANN_DOC)])
    for query in queries[:5]:
        hits = [hit.chunk.chunk_id for hit in graph_store.search(dense(query, 10, scope=Scope("acme", frozenset({"eng"}))))]
        assert len(hits) == 10 and set(hits) <= {f"d{doc}-{i}" for doc in docs for i in range(ANN_DOC)}
        assert len(set(hits) & set(exact_ids(vectors, query, 10, rows))) >= 9
    assert bool(graph_walks) == (len(rows) > SMALL_GRAPH.exact_rows)


def test_a_damaged_graph_is_ignored_then_rebuilt(graph_store, ann_data, graph_walks, caplog):
    vectors, queries = ann_data
    data_dir = graph_store._snapshot_dir.parent
    graph_store.close()
    (graph,) = data_dir.rglob("graph.faiss")
    damaged = bytearray(graph.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    graph.write_bytes(bytes(damaged))

    with caplog.at_level(logging.WARNING):
        again = LocalStore(data_dir, SMALL_GRAPH)
        assert found_ids(again, queries[0], 10) == exact_ids(vectors, queries[0], 10)  # scanned exactly
    assert not graph_walks and any("search graph" in r.getMessage() for r in caplog.records)
    again.persist()
    again.close()
    rebuilt = LocalStore(data_dir, SMALL_GRAPH)
    assert rebuilt._read_mirror().base.graph is not None
    assert set(found_ids(rebuilt, queries[0], 10)) & set(exact_ids(vectors, queries[0], 10))
    assert graph_walks
    rebuilt.close()


def test_two_threads_searching_at_once_answer_as_one_would(graph_store, ann_data):
    _, queries = ann_data
    requests = [dense(query, 10, {"part": i % 2} if i % 3 == 0 else None) for i, query in enumerate(queries)]
    serial = [[(h.chunk.chunk_id, h.score) for h in graph_store.search(request)] for request in requests]
    answers: dict[int, list] = {}
    start = threading.Barrier(2)

    def search(thread: int) -> None:
        start.wait()
        for round_ in range(3):
            for i, request in enumerate(requests):
                answers[(thread, round_, i)] = [(h.chunk.chunk_id, h.score) for h in graph_store.search(request)]

    threads = [threading.Thread(target=search, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 2 * 3 * len(requests)
    assert all(answer == serial[i] for (_, _, i), answer in answers.items())


def test_a_reader_starts_from_a_newer_snapshot_once_it_has_loaded_it(graph_store, ann_data):
    vectors, queries = ann_data
    reader = LocalStore(graph_store._snapshot_dir.parent, SMALL_GRAPH)
    reader.search(dense(queries[0], 5))
    fill_clustered(graph_store, queries[:20], first_doc=ANN_ROWS // ANN_DOC)
    graph_store.persist()
    assert found_ids(reader, queries[4], 1) == [f"d{ANN_ROWS // ANN_DOC}-4"]  # from its delta; loads the new one
    reader._loader.submit(lambda: None).result()  # the background load is done
    assert found_ids(reader, queries[4], 1) == [f"d{ANN_ROWS // ANN_DOC}-4"]
    mirror = reader._read_mirror()
    assert (mirror.base.graph.ntotal, len(mirror.delta_seqs)) == (ANN_ROWS + 20, 0)
    reader.close()
