"""`QdrantStore` in the client's local mode: the store contract, plus what its versioned writes must guarantee.

No Qdrant server is installed here: a server URL takes the same code path, untested.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from store_contract import (
    EVERYTHING,
    StoreContract,
    dense,
    handles,
    ids,
    keyword,
    put_texts,
    record,
    store_fixtures,
    text_vector,
)

import test_store_search

from ragline.app import Ragline
from ragline.config import Settings, StoreSettings
from ragline.store import keywords, qdrant
from ragline.store.base import Scope, SearchRequest
from ragline.store.qdrant import QdrantStore
from ragline.types import Chunk


@pytest.fixture
def opened(tmp_path):
    """Open stores on the test's folder (handles of one process share its client); all closed afterwards."""
    with handles(lambda: QdrantStore(path=tmp_path / "qdrant")) as open_store:
        yield open_store


store, reopen = store_fixtures()


class TestQdrantStore(StoreContract):
    """The whole contract, unchanged (the `store` and `reopen` fixtures above)."""


# The store-generic checks of test_store_search.py, collected here again against this module's `store` fixture.
test_a_hybrid_search_fuses_exactly_what_its_halves_find_alone = (
    test_store_search.test_a_hybrid_search_fuses_exactly_what_its_halves_find_alone
)
test_filtered_dense_search_is_exact_whether_it_gathers_or_scans = (
    test_store_search.test_filtered_dense_search_is_exact_whether_it_gathers_or_scans
)


@pytest.mark.slow
def test_a_large_index_scores_only_the_informative_terms(store):
    """1,200 chunks, each committed on its own by local mode: 2 s on a quiet disk, 10-20 s on a busy one."""
    test_store_search.test_a_large_index_scores_only_the_informative_terms(store)


@pytest.mark.slow
def test_term_counts_follow_the_writes(store):
    test_store_search.test_term_counts_follow_the_writes(store)


def stored_points(store: QdrantStore, doc_id: str) -> list[tuple[str, str]]:
    """(version, text) of every point of `doc_id` in the chunk collection, current or not."""
    points, _ = store._client.scroll(
        store.chunks_collection, limit=1_000, with_payload=["doc_id", "version", "text"],
    )
    return sorted((p.payload["version"], p.payload["text"]) for p in points if p.payload["doc_id"] == doc_id)


class Killed(Exception):
    """What a kill between two steps of a write looks like to the test."""


def kill_at_the_switch(monkeypatch):
    """The next write stops after its new points are written, before its manifest point switches to them."""

    def killed(self, manifest):
        raise Killed

    monkeypatch.setattr(QdrantStore, "_switch", killed)


@pytest.mark.parametrize("write", ["upsert", "set_access"])
def test_a_write_killed_before_the_switch_leaves_the_old_version_whole(store, monkeypatch, write):
    put_texts(store, "a", ["a old tides 0", "a old tides 1"])
    put_texts(store, "b", ["b tides 0"])
    before = store.documents()
    version = store.index_version()
    kill_at_the_switch(monkeypatch)
    with pytest.raises(Killed):
        if write == "upsert":
            put_texts(store, "a", ["a new tides 0", "a new tides 1", "a new tides 2"])
        else:
            store.set_access("a", "acme", ["eng"])
    monkeypatch.undo()
    assert len({v for v, _ in stored_points(store, "a")}) == 2  # the new version's points are there, unswitched

    assert store.documents() == before and store.count() == 3
    for request in (dense(text_vector("q"), 10), keyword("tides", 10),
                    SearchRequest(EVERYTHING, text="tides", vector=text_vector("q"), mode="hybrid", k=10)):
        assert sorted(ids(store.search(request))) == ["a-0", "a-1", "b-0"]
        assert {hit.chunk.text for hit in store.search(request)} >= {"a old tides 0", "a old tides 1"}
    assert store.count(scope=Scope("acme", None)) == 0
    assert [c.text for c in store.document_chunks("a")] == ["a old tides 0", "a old tides 1"]
    assert store.index_version() != version  # the stale mark moved it; what readers see did not change

    put_texts(store, "a", ["a newest tides 0"])  # the next write of the document collects the leftovers
    assert [text for _, text in stored_points(store, "a")] == ["a newest tides 0"]
    assert store._stale_versions() == []


def test_persist_collects_what_a_killed_write_left(store, monkeypatch):
    put_texts(store, "a", ["a old 0"])
    kill_at_the_switch(monkeypatch)
    with pytest.raises(Killed):
        put_texts(store, "a", ["a new 0", "a new 1"])
    monkeypatch.undo()
    assert len(stored_points(store, "a")) == 3 and store._stale_versions()
    store.persist()
    assert [text for _, text in stored_points(store, "a")] == ["a old 0"] and store._stale_versions() == []
    assert [c.text for c in store.document_chunks("a")] == ["a old 0"]


def test_a_delete_killed_after_the_tombstone_is_finished_by_persist(store, monkeypatch):
    put_texts(store, "a", ["a 0", "a 1"])
    put_texts(store, "b", ["b 0"])
    monkeypatch.setattr(QdrantStore, "_collect", lambda self, doc_id: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        store.delete_document("a")
    monkeypatch.undo()
    assert [r.doc_id for r in store.documents()] == ["b"] and store.count() == 1 and store.document("a") is None
    assert ids(store.search(dense(text_vector("a 0"), 5))) == ["b-0"]
    store.persist()
    assert stored_points(store, "a") == [] and store._manifest("a") is None


def test_points_of_a_version_the_manifest_does_not_name_are_dropped_and_the_list_read_deeper(store):
    """What a reader meets when a write it did not see marked stale is under way: those points never show."""
    put_texts(store, "a", [f"a tide {i}" for i in range(3)])
    query = text_vector("q")
    intruders = [(Chunk(f"x-{i}", "a", f"intruder tide {i}", {}), (query * (1 - i / 100)).tolist(), None)
                 for i in range(qdrant.TIE_SLACK + 10)]
    store._write_points("a", "unswitched", "default", ["*"], intruders)  # nearer the query than every real chunk
    hits = store.search(dense(query, 2))
    assert len(hits) == 2 and all(hit.chunk.text.startswith("a tide") for hit in hits)
    assert sorted(ids(store.search(keyword("tide", 5)))) == ["a-0", "a-1", "a-2"]


def test_a_closed_store_reopens_with_its_documents_fields_and_meta(tmp_path):
    first = QdrantStore(path=tmp_path / "qdrant")
    put_texts(first, "a", ["tides of a"], page=3)
    first.set_meta("embedder", "m1")
    version = first.index_version()
    first.close()
    again = QdrantStore(path=tmp_path / "qdrant")
    assert [r.doc_id for r in again.documents()] == ["a"] and again.filter_fields() == {"title": "str", "page": "int"}
    assert again.get_meta("embedder") == "m1" and again.index_version() == version
    assert ids(again.search(keyword("tides"))) == ["a-0"] and again.count({"page": 3}) == 1
    again.close()


def test_a_second_process_is_told_the_folder_is_in_use(store, tmp_path):
    put_texts(store, "a", ["tides"])
    script = (
        "import sys\nfrom pathlib import Path\nfrom ragline.store.base import StoreError\n"
        "from ragline.store.qdrant import QdrantStore\n"
        "try:\n    QdrantStore(path=Path(sys.argv[1]))\nexcept StoreError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "qdrant")], capture_output=True, text=True,
                          timeout=120)
    assert "is open in another process" in done.stdout and "store.url" in done.stdout, done.stderr


def test_local_mode_applies_the_idf_modifier(store):
    """Qdrant multiplies each stored BM25 value by ln(1 + (N - n + 0.5) / (n + 0.5)) of the collection."""
    put_texts(store, "rare", ["zygote"])
    for i in range(4):
        put_texts(store, f"other{i}", [f"tides {i}"])
    (hit,) = store.search(keyword("zygote"))
    indices, values = qdrant.keyword_vector("zygote", {"title": "rare"})
    weight = values[indices.index(qdrant.term_id(keywords.porter_stems(["zygote"])[0][0]))]
    assert hit.score == pytest.approx(math.log(1 + (5 - 1 + 0.5) / (1 + 0.5)) * weight, rel=1e-5)


def test_terms_are_stemmed_alike_on_both_sides_and_headings_weigh_more():
    indices, values = qdrant.keyword_vector("Checkpoints saved", {"heading_path": ["Saving"]})
    weights = dict(zip(indices, values))
    expected = [qdrant.term_id("save"), qdrant.term_id("checkpoint")]
    assert qdrant.query_term_ids("how do I save a checkpoint?") == expected
    assert weights[qdrant.term_id("save")] > weights[qdrant.term_id("checkpoint")]  # in the heading and the body


def test_the_app_opens_the_store_its_settings_name(tmp_path):
    settings = Settings(data_dir=tmp_path, store=StoreSettings(backend="qdrant", collection="docs"))
    app = Ragline(settings)
    assert isinstance(app.store, QdrantStore) and app.store.chunks_collection == "docs_chunks"
    put_texts(app.store, "a", ["tides"])
    app.close()
    again = QdrantStore("docs", path=tmp_path / "qdrant")
    assert again.count() == 1
    again.close()


def test_vectors_come_back_bit_for_bit(store):
    vectors = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)  # not unit: kept as given
    store.upsert_document(record("a"), [Chunk(f"a-{i}", "a", f"t {i}", {}) for i in range(3)], vectors)
    np.testing.assert_array_equal(store.export_document("a")[2], vectors)
