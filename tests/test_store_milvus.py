"""`MilvusStore` on Milvus Lite: the store contract, plus what its versioned writes must guarantee.

No Milvus server runs here: a server URL goes through the same code, untested. Each test gets a Milvus Lite file
of its own under tmp_path.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from milvus_lite.server_manager import server_manager_instance
from store_contract import (
    EVERYTHING,
    StoreContract,
    assert_hits_pair_right,
    dense,
    handles,
    ids,
    keyword,
    put,
    put_texts,
    record,
    store_fixtures,
    text_vector,
    vector,
)
import test_store_search

from ragline.app import Ragline
from ragline.config import Settings, StoreSettings
from ragline.store import milvus
from ragline.store.base import DEFAULT_TENANT, Scope, SearchRequest, StoreError
from ragline.store.milvus import MilvusStore
from ragline.types import Chunk


# The store-generic checks of test_store_search.py, collected here again against this module's `store` fixture
# (not the ones about which query terms FTS5 scores: Milvus scores every term, see store/milvus.py).
test_a_hybrid_search_fuses_exactly_what_its_halves_find_alone = (
    test_store_search.test_a_hybrid_search_fuses_exactly_what_its_halves_find_alone
)
test_filtered_dense_search_is_exact_whether_it_gathers_or_scans = (
    test_store_search.test_filtered_dense_search_is_exact_whether_it_gathers_or_scans
)


@pytest.fixture
def opened(tmp_path):
    """Open stores on the test's Milvus Lite file (handles of this process share its server); all closed after."""
    with handles(lambda: MilvusStore(str(tmp_path / "milvus.db"), collection="test")) as open_store:
        yield open_store


store, reopen = store_fixtures()


class TestMilvusStore(StoreContract):
    """The whole contract, unchanged (the `store` and `reopen` fixtures above)."""


def stored_versions(store: MilvusStore, doc_id: str) -> set[str]:
    """The versions of `doc_id` that have rows in the chunks collection, current or not."""
    rows = store._client.query(store._chunks, filter=f'doc_id == "{doc_id}"', output_fields=["version"])
    return {row["version"] for row in rows}


class Killed(RuntimeError):
    """Stands for the process dying at that step."""


def kill_at(monkeypatch, store: MilvusStore, step: str) -> None:
    def die(*args, **kwargs):
        raise Killed(step)

    monkeypatch.setattr(store, step, die)


def test_a_write_killed_before_its_switch_leaves_the_old_version_whole_and_the_next_write_cleans_up(
    store, monkeypatch
):
    put_texts(store, "a", ["old tide one", "old tide two"])
    put_texts(store, "b", ["b tide"])
    kill_at(monkeypatch, store, "_switch")
    with pytest.raises(Killed):
        put_texts(store, "a", ["new tide one", "new tide two", "new tide three"])
    assert len(stored_versions(store, "a")) == 2  # the new rows are there, invisible
    monkeypatch.undo()
    assert [c.text for c in store.document_chunks("a")] == ["old tide one", "old tide two"]
    assert store.document("a").chunk_ids == ["a-0", "a-1"] and store.count() == 3
    for request in (keyword("tide", 10), dense(text_vector("new tide one"), 10)):
        assert sorted(ids(store.search(request))) == ["a-0", "a-1", "b-0"]
        assert all(hit.chunk.text.startswith(("old", "b")) for hit in store.search(request))
    assert store.count({"title": "a"}) == 2

    put_texts(store, "a", ["third tide"])
    assert len(stored_versions(store, "a")) == 1
    assert sorted(hit.chunk.text for hit in store.search(keyword("tide", 10))) == ["b tide", "third tide"]


def test_a_write_killed_after_its_switch_shows_the_new_version_and_persist_deletes_the_old(store, monkeypatch):
    put_texts(store, "a", ["old tide"])
    version = store.index_version()
    kill_at(monkeypatch, store, "_collect")
    with pytest.raises(Killed):
        put_texts(store, "a", ["new tide"])
    monkeypatch.undo()
    assert store.index_version() != version
    assert [hit.chunk.text for hit in store.search(keyword("tide"))] == ["new tide"]
    assert len(stored_versions(store, "a")) == 2
    store.persist()
    assert len(stored_versions(store, "a")) == 1
    assert [hit.chunk.text for hit in store.search(dense(text_vector("old tide"), 5))] == ["new tide"]


def test_persist_deletes_a_never_finished_version_only_once_it_is_old(store, monkeypatch):
    put_texts(store, "a", ["old tide"])
    kill_at(monkeypatch, store, "_switch")
    with pytest.raises(Killed):
        put_texts(store, "a", ["new tide"])
    monkeypatch.undo()
    store.persist()  # it may be another process's write in flight
    assert len(stored_versions(store, "a")) == 2
    monkeypatch.setattr(milvus, "LEFTOVER_AGE_S", 0.0)
    store.persist()
    assert len(stored_versions(store, "a")) == 1
    assert [hit.chunk.text for hit in store.search(keyword("tide"))] == ["old tide"]


def test_stale_rows_crowding_the_top_are_read_past(store, monkeypatch):
    """Ten killed writes of `a` hold the best matches; the search still returns k current chunks."""
    put_texts(store, "b", [f"b tide {i}" for i in range(5)])
    put_texts(store, "a", ["a tide"])
    kill_at(monkeypatch, store, "_switch")
    for attempt in range(10):
        with pytest.raises(Killed):
            put_texts(store, "a", [f"tide tide tide {attempt} {i}" for i in range(8)])
    monkeypatch.undo()
    hits = store.search(keyword("tide", 3))
    assert len(hits) == 3 and all(not hit.chunk.text.startswith("tide tide") for hit in hits)


HOSTILE = ['it"s', "back\\slash", '" or 1==1 or "', "x\") or (tenant != \"", "line\nbreak", "tab\there", "'single'"]


def test_hostile_filter_values_match_only_themselves(store):
    for number, value in enumerate(HOSTILE):
        put(store, f"d{number}", [number % 8], label=value, labels=[value, "common"])
    put(store, "plain", [0], label="plain", labels=["plain"])
    for value in HOSTILE:
        assert store.count({"label": value}) == 1, value
        assert store.count({"labels": value}) == 1, value
        assert store.count({"label": value + "x"}) == 0, value
        hits = store.search(dense(text_vector("q"), 20, {"label": {"$in": [value, "nothing"]}}))
        assert [hit.chunk.metadata["label"] for hit in hits] == [value]
    assert store.count({"label": '" or 1==1'}) == 0 and store.count({"labels": "common"}) == len(HOSTILE)


def test_a_hostile_scope_reads_nothing(store):
    put(store, "a", [0])
    for tenant in ['default" or tenant != "', "default\\", 'x" or 1==1 or "']:
        scope = Scope(tenant, None)
        assert store.count(scope=scope) == 0 and store.documents(scope) == []
        assert store.search(dense(vector(0), 5, scope=scope)) == []
    assert store.search(dense(vector(0), 5, scope=Scope(DEFAULT_TENANT, frozenset({'*" or 1==1 or "'})))) != []


def test_data_survives_the_server_stopping(tmp_path):
    """The last handle's close stops the file's server; a new one reads everything back."""
    path = str(tmp_path / "milvus.db")
    first = MilvusStore(path)
    put_texts(first, "a", ["tide of a", "reef of a"], page=3)
    first.set_meta("embedder", "m1")
    version = first.index_version()
    first.close()
    assert os.path.abspath(path) not in server_manager_instance._servers
    again = MilvusStore(path)
    try:
        assert again.count() == 2 and again.get_meta("embedder") == "m1" and again.index_version() == version
        assert ids(again.search(keyword("reef"))) == ["a-1"] and again.filter_fields()["page"] == "int"
    finally:
        again.close()


OPEN_IN_ANOTHER_PROCESS = """
import sys
from ragline.store.base import StoreError
from ragline.store.milvus import MilvusStore
try:
    MilvusStore(sys.argv[1]).close()
except StoreError as exc:
    print(exc)
    sys.exit(3)
"""


def open_elsewhere(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", OPEN_IN_ANOTHER_PROCESS, path], capture_output=True, text=True,
                          timeout=120)


def test_a_second_process_cannot_open_the_file_until_the_first_closes_it(tmp_path):
    path = str(tmp_path / "milvus.db")
    store = MilvusStore(path)
    try:
        refused = open_elsewhere(path)
        assert refused.returncode == 3 and "open in another process" in refused.stdout, refused.stderr[-2000:]
    finally:
        store.close()
    assert open_elsewhere(path).returncode == 0


def test_the_last_close_stops_the_server_and_leaves_no_process(tmp_path):
    path = str(tmp_path / "milvus.db")
    stores = [MilvusStore(path) for _ in range(2)]
    put(stores[0], "a", [0])
    stores[0].close()
    assert stores[1].count() == 1  # the other handle still has its server
    stores[1].close()
    assert os.path.abspath(path) not in server_manager_instance._servers
    children = subprocess.run(["ps", "--ppid", str(os.getpid()), "-o", "comm="], capture_output=True, text=True)
    assert "milvus" not in children.stdout


def test_the_app_opens_milvus_lite_under_data_dir(tmp_path):
    settings = Settings(data_dir=tmp_path, store=StoreSettings(backend="milvus", collection="docs"))
    app = Ragline(settings)
    try:
        assert isinstance(app.store, MilvusStore) and app.store.uri == str(tmp_path / "milvus.db")
        put(app.store, "a", [0])
        assert app.store.count(scope=EVERYTHING) == 1
    finally:
        app.close()


def test_a_url_that_is_neither_a_server_nor_a_file_is_refused(tmp_path):
    settings = Settings(data_dir=tmp_path, store=StoreSettings(backend="milvus", url="postgresql://x/y"))
    with pytest.raises(StoreError, match=r"http\(s\)://"):
        MilvusStore.from_settings(settings)


WRITE_AND_WAIT = """
import sys, time
sys.path.insert(0, sys.argv[2])
from store_contract import put_texts
from ragline.store.milvus import MilvusStore
store = MilvusStore(sys.argv[1])
put_texts(store, "a", ["tide of a", "reef of a"])
print("written", flush=True)
time.sleep(600)
"""


def test_a_write_survives_its_process_being_killed(tmp_path):
    """SIGKILL after an upsert returned: the write is durable (Milvus Lite's log) and the file's lock is free."""
    path = str(tmp_path / "milvus.db")
    writer = subprocess.Popen([sys.executable, "-c", WRITE_AND_WAIT, path, os.path.dirname(__file__)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert writer.stdout.readline().strip() == "written"
    finally:
        writer.kill()
        writer.wait(timeout=60)
    store = MilvusStore(path)
    try:
        assert store.document("a").chunk_ids == ["a-0", "a-1"] and ids(store.search(keyword("reef"))) == ["a-1"]
    finally:
        store.close()


def test_a_search_shows_one_whole_version_of_a_document_written_between_its_calls(opened):
    """Before every search call of the reader's, another handle rewrites `a`, then leaves a second rewrite in
    flight (its rows written, its switch not yet made): each answer holds all of one version of `a` and nothing
    else of it, every hit paired with its own vector."""
    writer, reader = opened(), opened()
    put_texts(writer, "a", ["a v0 tide 0", "a v0 tide 1"])
    put_texts(writer, "b", ["b tide 0"])
    writes = []
    search, switch = reader._client.search, writer._switch

    def in_flight(*args, **kwargs):
        raise Killed("in flight")

    def write_first(*args, **kwargs):
        version = len(writes) + 1
        put_texts(writer, "a", [f"a v{version} tide {i}" for i in range(1 + version % 3)])
        writer._switch = in_flight
        with pytest.raises(Killed):
            put_texts(writer, "a", [f"a v{version}x tide {i}" for i in range(4)])
        writer._switch = switch
        writes.append(version)
        return search(*args, **kwargs)

    reader._client.search = write_first
    for round_ in range(4):
        query = text_vector(f"query {round_}")
        for mode in ("dense", "hybrid"):
            request = SearchRequest(EVERYTHING, text="tide", vector=query, mode=mode, k=10, with_vectors=True)
            hits = reader.search(request)
            of_a = [hit.chunk.text for hit in hits if hit.chunk.doc_id == "a"]
            versions = {text.split()[1] for text in of_a}
            assert len(versions) <= 1 and "x" not in "".join(versions), of_a
            assert not of_a or len(of_a) == 1 + int(versions.pop()[1:]) % 3, of_a
            assert "b-0" in ids(hits)
            for hit in hits:
                assert np.allclose(hit.vector, text_vector(hit.chunk.text))
            if mode == "dense":
                assert_hits_pair_right(hits, query, 10)
    assert len(writes) >= 12


@pytest.mark.slow
def test_reads_past_the_query_window_see_every_row(store):
    """17,000 chunks: more than one Milvus query returns (16,384), so manifest and chunk reads page through."""
    count = 17_000
    vectors = np.stack([text_vector(f"v{i}") for i in range(count)])
    chunks = [Chunk(f"big-{i:05d}", "big", f"tide {i}", {"part": i % 2}) for i in range(count)]
    store.upsert_document(record("big"), chunks, vectors)
    assert store.document("big").chunk_ids == [chunk.chunk_id for chunk in chunks]
    assert store.count({"part": 1}) == count // 2 and store.count() == count
    put_texts(store, "big", ["tide replaced"])
    store.persist()
    assert store._client.query(store._chunks, filter='doc_id == "big"', output_fields=["count(*)"])[0]["count(*)"] == 1
