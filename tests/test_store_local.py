"""`LocalStore`: the store contract, plus what its SQLite + snapshot design must guarantee."""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest
from store_contract import (
    StoreContract,
    assert_hits_pair_right,
    dense,
    fill_owners,
    put,
    put_texts,
    text_vector,
    vector,
    writer_commits_before_every_select,
)

from ragline.store.base import DEFAULT_TENANT, EVERYONE, Scope, SearchRequest
from ragline.store.local import LocalStore


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
