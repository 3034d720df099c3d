"""The contract every `VectorStore` implementation must pass.

A test module for a backend subclasses `StoreContract` and provides the
`store` and `reopen` fixtures; everything else is shared.
"""

from __future__ import annotations

import numpy as np
import pytest

from ragline.store.base import DocumentRecord, StoreError, VectorStore
from ragline.types import Chunk

DIM = 8


def vector(*hot: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[list(hot)] = 1.0
    return v / np.linalg.norm(v)


def record(doc_id: str, status: str = "indexed", error: str = "") -> DocumentRecord:
    return DocumentRecord(
        doc_id=doc_id, source=f"/docs/{doc_id}.md", root="/docs", size=10, mtime_ns=1,
        sha256="ab" * 32, fingerprint="fp", status=status, error=error,
    )


def chunks_for(doc_id: str, n: int, **meta) -> list[Chunk]:
    return [
        Chunk(f"{doc_id}-{i}", doc_id, f"text {doc_id} {i}", {"title": doc_id, "chunk_index": i, **meta})
        for i in range(n)
    ]


def put(store: VectorStore, doc_id: str, hots: list[int], **meta) -> None:
    store.upsert_document(record(doc_id), chunks_for(doc_id, len(hots), **meta), np.stack([vector(h) for h in hots]))


class StoreContract:
    def test_implements_protocol(self, store):
        assert isinstance(store, VectorStore)

    def test_empty_store_searches_to_nothing(self, store):
        assert store.search(vector(0), 5) == []
        assert store.count() == 0

    def test_search_ranks_by_cosine(self, store):
        put(store, "a", [0, 1])
        put(store, "b", [2])
        hits = store.search(vector(1), 3)
        assert [h.chunk.chunk_id for h in hits][0] == "a-1"
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert all(hits[i].score >= hits[i + 1].score for i in range(len(hits) - 1))
        assert hits[0].chunk.text == "text a 1" and hits[0].chunk.metadata["title"] == "a"

    def test_k_larger_than_index(self, store):
        put(store, "a", [0, 1])
        assert len(store.search(vector(0), 50)) == 2

    def test_upsert_replaces_a_documents_chunks(self, store):
        put(store, "a", [0, 1, 2])
        put(store, "a", [3])
        assert store.count() == 1
        assert [r.chunk_ids for r in store.documents()] == [["a-0"]]
        assert store.search(vector(3), 1)[0].chunk.chunk_id == "a-0"

    def test_delete_document_removes_chunks_and_manifest(self, store):
        put(store, "a", [0])
        put(store, "b", [1])
        store.delete_document("a")
        assert store.count() == 1
        assert [r.doc_id for r in store.documents()] == ["b"]
        assert {h.chunk.doc_id for h in store.search(vector(0), 5)} == {"b"}

    def test_manifest_keeps_failed_files_without_chunks(self, store):
        put(store, "a", [0])
        store.upsert_document(record("a", "failed", "corrupt PDF"), [], np.zeros((0, DIM), np.float32))
        (only,) = store.documents()
        assert (only.status, only.error, only.chunk_ids) == ("failed", "corrupt PDF", [])
        assert store.count() == 0

    def test_filters_equal_in_and_list_fields(self, store):
        put(store, "a", [0, 0], format="pdf", groups=["eng", "ops"])
        put(store, "b", [0], format="html", groups=["sales"])
        assert {h.chunk.doc_id for h in store.search(vector(0), 10, {"format": "pdf"})} == {"a"}
        assert store.count({"format": {"$in": ["html", "docx"]}}) == 1
        assert store.count({"groups": "ops"}) == 2
        assert store.count({"groups": {"$in": ["sales", "hr"]}}) == 1
        assert store.count({"format": "pdf", "groups": "sales"}) == 0
        assert store.search(vector(0), 10, {"format": {"$in": []}}) == []

    def test_list_fields_may_repeat_values(self, store):
        put(store, "a", [0], heading_path=["Decode", "Decode"])
        assert store.count({"heading_path": "Decode"}) == 1

    def test_filters_forget_deleted_and_replaced_chunks(self, store):
        put(store, "a", [0, 1], format="pdf")
        put(store, "b", [2], format="pdf")
        store.delete_document("a")
        put(store, "b", [2], format="html")
        assert store.count({"format": "pdf"}) == 0
        assert store.count({"format": "html"}) == 1

    def test_bad_filters_are_rejected(self, store):
        put(store, "a", [0])
        with pytest.raises(ValueError, match="only"):
            store.search(vector(0), 1, {"format": {"$gt": 1}})
        with pytest.raises(ValueError, match="plain metadata name"):
            store.count({"x') OR 1=1 --": 1})

    def test_dimension_mismatch_is_refused(self, store):
        put(store, "a", [0])
        with pytest.raises(StoreError, match="--full"):
            store.upsert_document(record("b"), chunks_for("b", 1), np.ones((1, DIM + 1), np.float32))

    def test_failed_write_leaves_the_old_version(self, store):
        put(store, "a", [0, 1])
        put(store, "b", [2])
        clash = chunks_for("a", 1) + [Chunk("b-0", "a", "duplicate id", {})]
        with pytest.raises(Exception):
            store.upsert_document(record("a"), clash, np.stack([vector(3), vector(4)]))
        assert sorted(r.chunk_ids == ["a-0", "a-1"] for r in store.documents() if r.doc_id == "a") == [True]
        assert store.count() == 3
        assert store.search(vector(1), 1)[0].chunk.chunk_id == "a-1"

    def test_meta_values(self, store):
        assert store.get_meta("missing") is None
        store.set_meta("embedder", "m1")
        assert store.get_meta("embedder") == "m1"

    def test_clear(self, store):
        put(store, "a", [0])
        store.set_meta("embedder", "m1")
        store.clear()
        assert store.count() == 0 and store.documents() == [] and store.get_meta("embedder") is None
        assert store.search(vector(0), 1) == []

    def test_persist_and_reopen(self, store, reopen):
        put(store, "a", [0, 1])
        store.persist()
        put(store, "b", [2])  # written after the snapshot: a reopened store must see it too
        store.delete_document("a")
        put(store, "c", [1])
        again = reopen()
        assert again.count() == 2
        assert [h.chunk.chunk_id for h in again.search(vector(1), 1)] == ["c-0"]
        assert {h.chunk.doc_id for h in again.search(vector(0), 5)} == {"b", "c"}

    def test_a_second_handle_sees_new_writes(self, store, reopen):
        reader = reopen()
        assert reader.search(vector(0), 1) == []
        put(store, "a", [0])
        assert reader.search(vector(0), 1)[0].chunk.chunk_id == "a-0"
        store.delete_document("a")
        assert reader.search(vector(0), 1) == []
