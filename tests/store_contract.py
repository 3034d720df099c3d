"""The contract every `VectorStore` implementation must pass.

A test module for a backend subclasses `StoreContract` and provides the
`store` and `reopen` fixtures; everything else is shared.

`text_vector` and `assert_hits_pair_right` make a wrong pairing of chunk and
vector visible: each chunk's vector is derived from its text, so every hit's
score must equal the query times the vector of the text it came back with.
The process tests (tests/test_store_processes.py) use them too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from ragline.store.base import (
    DEFAULT_TENANT,
    EVERYONE,
    MAX_IN_VALUES,
    DocumentRecord,
    FilterError,
    Scope,
    SearchRequest,
    StoreError,
    VectorStore,
)
from ragline.store.fusion import Fusion
from ragline.types import Chunk, Hit


EVERYTHING = Scope.everything()
"""The default tenant's documents, every group: the scope of checks that are not about access."""


def dense(vector: np.ndarray, k: int, filters: dict | None = None, scope: Scope = EVERYTHING) -> SearchRequest:
    """A dense search request, the shape most contract checks need."""
    return SearchRequest(scope, vector=vector, k=k, filters=filters)


def keyword(text: str, k: int = 5, filters: dict | None = None, scope: Scope = EVERYTHING) -> SearchRequest:
    return SearchRequest(scope, text=text, mode="keyword", k=k, filters=filters)


def ids(hits: list[Hit]) -> list[str]:
    return [hit.chunk.chunk_id for hit in hits]


DIM = 8


def vector(*hot: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[list(hot)] = 1.0
    return v / np.linalg.norm(v)


def record(
    doc_id: str, status: str = "indexed", error: str = "", tenant: str = DEFAULT_TENANT,
    groups: list[str] | None = None,
) -> DocumentRecord:
    return DocumentRecord(
        doc_id=doc_id, source=f"/docs/{doc_id}.md", root="/docs", size=10, mtime_ns=1,
        sha256="ab" * 32, fingerprint="fp", status=status, error=error, tenant=tenant,
        groups=[EVERYONE] if groups is None else groups,
    )


def chunks_for(doc_id: str, n: int, **meta) -> list[Chunk]:
    return [
        Chunk(f"{doc_id}-{i}", doc_id, f"text {doc_id} {i}", {"title": doc_id, "chunk_index": i, **meta})
        for i in range(n)
    ]


def put(store: VectorStore, doc_id: str, hots: list[int], **meta) -> None:
    store.upsert_document(record(doc_id), chunks_for(doc_id, len(hots), **meta), np.stack([vector(h) for h in hots]))


@contextmanager
def handles(open_store: Callable[..., VectorStore]) -> Iterator[Callable[..., VectorStore]]:
    """A factory of handles on one index (a store module's `opened` fixture); every handle it opened is closed
    on exit."""
    stores: list[VectorStore] = []

    def _open(**options) -> VectorStore:
        stores.append(open_store(**options))
        return stores[-1]

    try:
        yield _open
    finally:
        for store in stores:
            store.close()


def store_fixtures():
    """A store module's `store` and `reopen` fixtures, over its `opened` fixture (made with `handles`):
    `store, reopen = store_fixtures()`."""

    @pytest.fixture
    def store(opened):
        return opened()

    @pytest.fixture
    def reopen(opened):
        return opened

    return store, reopen


def text_vector(text: str, dim: int = DIM) -> np.ndarray:
    """A unit vector that depends only on `text`: the vector a chunk with this text must come back with."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def put_texts(
    store: VectorStore, doc_id: str, texts: list[str], dim: int = DIM, owner: tuple[str, list[str]] | None = None,
    **meta,
) -> None:
    """Store `doc_id` as one chunk per text, each with its `text_vector`; `owner` is its (tenant, groups)."""
    chunks = [Chunk(f"{doc_id}-{i}", doc_id, text, {"title": doc_id, **meta}) for i, text in enumerate(texts)]
    vectors = np.stack([text_vector(text, dim) for text in texts]) if texts else np.zeros((0, dim), np.float32)
    tenant, groups = owner or (DEFAULT_TENANT, [EVERYONE])
    store.upsert_document(record(doc_id, tenant=tenant, groups=groups), chunks, vectors)


@contextmanager
def writer_commits_before_every_select(
    reader: VectorStore, writer: VectorStore, texts: Callable[[int], list[str]]
) -> Iterator[list[str]]:
    """While open, `writer` rewrites document "a" (version n: `texts(n)`) before every SELECT that `reader`
    runs (a store on SQLite: its `_db` connection); yields the statements it committed before."""
    commits: list[str] = []

    def commit_between_statements(sql: str) -> None:
        if sql.lstrip().upper().startswith("SELECT"):
            put_texts(writer, "a", texts(len(commits) + 1))
            commits.append(sql)

    reader._db.set_trace_callback(commit_between_statements)  # type: ignore[attr-defined]
    try:
        yield commits
    finally:
        reader._db.set_trace_callback(None)  # type: ignore[attr-defined]


def pairing_errors(hits: list[Hit], query: np.ndarray, k: int) -> list[str]:
    """What is wrong with a search's hits: a score that is not query·text_vector(text), bad order, repeats."""
    dim = len(query)
    errors = [f"{len(hits)} hits for k={k}"] if len(hits) > k else []
    for hit in hits:
        expected = float(query @ text_vector(hit.chunk.text, dim))
        if abs(hit.score - expected) > 1e-5:
            errors.append(f"{hit.chunk.chunk_id} {hit.chunk.text!r} scored {hit.score}, its vector gives {expected}")
    if [h.score for h in hits] != sorted((h.score for h in hits), reverse=True):
        errors.append("hits are not ranked by score")
    if len({h.chunk.chunk_id for h in hits}) != len(hits):
        errors.append("a chunk came back twice")
    return errors


def assert_hits_pair_right(hits: list[Hit], query: np.ndarray, k: int) -> None:
    assert pairing_errors(hits, query, k) == []


KEYWORD_TEXTS = {
    "pandas": ["Use read_csv to load a comma separated file into a DataFrame.", "Plot a frame with matplotlib."],
    "paths": ["Join path parts with os.path.join, which picks the right separator.", "Walk a tree of files."],
    "pool": ["Set max_workers to bound the threads an executor starts.", "A future holds a pending result."],
}


class KeywordContract:
    """What keyword and hybrid search must do in every store (mixed into a store's test class)."""

    def fill(self, store: VectorStore) -> None:
        for doc_id, texts in KEYWORD_TEXTS.items():
            put_texts(store, doc_id, texts, section=doc_id)

    @pytest.mark.parametrize("query", ["read_csv", "read csv", "pandas.read_csv", "How do I read a CSV?"])
    def test_an_identifier_matches_as_a_whole_and_by_its_parts(self, store, query):
        self.fill(store)
        assert ids(store.search(keyword(query, 1))) == ["pandas-0"]

    @pytest.mark.parametrize("query", ["os.path.join", "path join", "max_workers", "max workers"])
    def test_dotted_and_snake_case_names_match(self, store, query):
        self.fill(store)
        want = "paths-0" if "join" in query else "pool-0"
        assert ids(store.search(keyword(query, 1))) == [want]

    def test_the_exact_spelling_ranks_above_its_parts_alone(self, store):
        put_texts(store, "exact", ["call read_csv here"])
        put_texts(store, "parts", ["read the csv spec first"])
        assert ids(store.search(keyword("read_csv", 2))) == ["exact-0", "parts-0"]

    def test_stop_words_do_not_decide_the_ranking(self, store):
        put_texts(store, "wordy", ["how do I do it, and what is it, and how is it to be done, and why"])
        put_texts(store, "topic", ["Checkpoints are saved with the orbax manager."])
        assert ids(store.search(keyword("how do I save a checkpoint?", 1))) == ["topic-0"]

    def test_the_heading_path_weighs_more_than_the_body(self, store):
        chunks = [
            Chunk("body-0", "body", "a passing mention of logging among other things here", {"heading_path": ["Install"]}),
            Chunk("head-0", "head", "configure handlers and levels here", {"heading_path": ["Logging", "Setup"]}),
        ]
        for chunk in chunks:
            store.upsert_document(record(chunk.doc_id), [chunk], np.stack([vector(0)]))
        assert ids(store.search(keyword("logging", 2)))[0] == "head-0"

    def test_replaced_and_deleted_documents_leave_the_keyword_index(self, store):
        self.fill(store)
        put_texts(store, "pandas", ["Nothing about files any more."])
        assert store.search(keyword("read_csv")) == []
        store.delete_document("paths")
        assert store.search(keyword("os.path.join")) == []
        assert ids(store.search(keyword("max_workers", 1))) == ["pool-0"]

    def test_a_failed_write_leaves_no_keyword_trace(self, store):
        self.fill(store)
        bad = [Chunk("odd-0", "odd", "zygomorphic flowers", {})]
        with pytest.raises(StoreError):
            store.upsert_document(record("odd"), bad, np.ones((1, DIM + 1), np.float32))
        assert store.search(keyword("zygomorphic")) == []

    def test_keyword_search_honours_filters(self, store):
        self.fill(store)
        assert store.search(keyword("read_csv", 5, {"section": "paths"})) == []
        assert ids(store.search(keyword("join", 5, {"section": {"$in": ["paths", "pool"]}}))) == ["paths-0"]

    def test_a_query_of_punctuation_finds_nothing_and_does_not_fail(self, store):
        self.fill(store)
        for text in ['"', "?!*", "OR AND NEAR(", "-read_csv"]:
            store.search(keyword(text))

    def test_hybrid_fuses_the_dense_and_keyword_lists(self, store):
        self.fill(store)
        only_dense = text_vector(KEYWORD_TEXTS["pool"][1])  # the vector of "A future holds ..."
        hits = store.search(SearchRequest(EVERYTHING, text="read_csv", vector=only_dense, mode="hybrid", k=2))
        assert set(ids(hits)) == {"pool-1", "pandas-0"}
        assert ids(store.search(SearchRequest(EVERYTHING, text="read_csv", vector=only_dense, mode="hybrid", k=1,
                                              fusion=Fusion(keyword_weight=2.0)))) == ["pandas-0"]
        assert ids(store.search(SearchRequest(EVERYTHING, text="read_csv", vector=only_dense, mode="hybrid", k=1,
                                              fusion=Fusion(method="convex", dense_weight=2.0)))) == ["pool-1"]

    def test_hits_carry_their_vectors_when_asked(self, store):
        self.fill(store)
        request = SearchRequest(
            EVERYTHING, text="read_csv", vector=text_vector("x"), mode="hybrid", k=6, with_vectors=True
        )
        for hit in store.search(request):
            assert np.allclose(hit.vector, text_vector(hit.chunk.text))
        assert all(hit.vector is None for hit in store.search(keyword("read_csv")))

    def test_equal_scores_rank_by_chunk_id_whatever_the_order_of_writing(self, store):
        """A resumed or rebuilt index must answer exactly like an uninterrupted one."""
        for doc_id in ("z", "a", "m"):
            put_texts(store, doc_id, ["the same sentence about tides"])
        for request in (keyword("tides", 3), dense(text_vector("the same sentence about tides"), 3),
                        SearchRequest(EVERYTHING, text="tides", vector=text_vector("x"), mode="hybrid", k=3)):
            assert ids(store.search(request)) == ["a-0", "m-0", "z-0"]

    def test_document_chunks_come_in_reading_order(self, store):
        self.fill(store)
        assert [c.text for c in store.document_chunks("paths")] == KEYWORD_TEXTS["paths"]
        assert store.document_chunks("missing") == []

    def test_export_document_returns_what_was_stored(self, store):
        texts = ["first passage about tides", "second passage about reefs", "third"]
        put_texts(store, "doc", texts, owner=("acme", ["eng", "ops"]), page=3, tags=["x", "y"])
        put_texts(store, "empty", [])
        record_, chunks, vectors = store.export_document("doc")
        assert (record_.doc_id, record_.tenant, record_.groups) == ("doc", "acme", ["eng", "ops"])
        assert record_.chunk_ids == ["doc-0", "doc-1", "doc-2"] == [chunk.chunk_id for chunk in chunks]
        assert [chunk.text for chunk in chunks] == texts
        assert chunks[0].metadata == {"title": "doc", "page": 3, "tags": ["x", "y"]}
        assert vectors.dtype == np.float32 and vectors.shape == (3, DIM)
        np.testing.assert_array_equal(vectors, np.stack([text_vector(text) for text in texts]))
        empty_record, empty_chunks, empty_vectors = store.export_document("empty")
        assert (empty_record.doc_id, empty_chunks, len(empty_vectors)) == ("empty", [], 0)
        assert store.export_document("missing") is None


OWNERS = {  # doc_id: (tenant, groups)
    "acme-all": ("acme", [EVERYONE]),
    "acme-eng": ("acme", ["eng"]),
    "acme-ops": ("acme", ["ops"]),
    "acme-eng-ops": ("acme", ["eng", "ops"]),
    "acme-admins": ("acme", []),
    "globex-all": ("globex", [EVERYONE]),
    "globex-eng": ("globex", ["eng"]),
}
"""Two tenants with a group of the same name, overlapping groups, documents for everyone and for admins only."""
PARTS = 3
SCOPES = [
    Scope("acme", frozenset({"eng"})),
    Scope("acme", frozenset({"ops"})),
    Scope("acme", frozenset({"eng", "ops"})),
    Scope("acme", frozenset({"hr"})),
    Scope("acme", frozenset()),
    Scope("acme", None),
    Scope("globex", frozenset({"eng"})),
    Scope("globex", None),
    Scope("initech", None),
    Scope(DEFAULT_TENANT, None),
]
MODES = ("dense", "keyword", "hybrid")


def put_owned(store: VectorStore, doc_id: str, tenant: str, groups: list[str]) -> None:
    """PARTS chunks that all hold the word "tides", each with its `text_vector`; parts alternate even and odd."""
    texts = [f"tides of {doc_id} part {i}" for i in range(PARTS)]
    chunks = [Chunk(f"{doc_id}-{i}", doc_id, text, {"title": doc_id, "part": ("even", "odd")[i % 2]})
              for i, text in enumerate(texts)]
    vectors = np.stack([text_vector(text) for text in texts])
    store.upsert_document(record(doc_id, tenant=tenant, groups=groups), chunks, vectors)


def fill_owners(store: VectorStore) -> None:
    for doc_id, (tenant, groups) in OWNERS.items():
        put_owned(store, doc_id, tenant, groups)


def readable(scope: Scope, owners: dict[str, tuple[str, list[str]]] = OWNERS) -> set[str]:
    """The documents `scope` may read, by the rule itself (`Scope.allows`)."""
    return {doc_id for doc_id, (tenant, groups) in owners.items() if scope.allows(tenant, groups)}


def everywhere(scope: Scope, k: int = 50, **options) -> list[SearchRequest]:
    """The same search in each mode: every chunk of the access fixture matches the text."""
    vector = text_vector("tides")
    return [SearchRequest(scope, text="tides", vector=vector, mode=mode, k=k, **options) for mode in MODES]


def docs_found(store: VectorStore, scope: Scope) -> set[str]:
    return {hit.chunk.doc_id for request in everywhere(scope) for hit in store.search(request)}


class AccessContract:
    """Access scopes, applied inside every search, count and manifest read (mixed into a store's test class)."""

    @pytest.mark.parametrize("mode", MODES)
    def test_a_search_returns_everything_its_scope_may_read_and_nothing_else(self, store, mode):
        fill_owners(store)
        for scope in SCOPES:
            (request,) = [r for r in everywhere(scope) if r.mode == mode]
            hits = store.search(request)  # k is above what any scope may read
            assert {hit.chunk.doc_id for hit in hits} == readable(scope), scope
            assert len(hits) == PARTS * len(readable(scope)), scope

    @pytest.mark.parametrize("mode", MODES)
    def test_scope_and_filters_both_hold(self, store, mode):
        fill_owners(store)
        eng = Scope("acme", frozenset({"eng"}))
        (request,) = [r for r in everywhere(eng, filters={"part": "odd"}) if r.mode == mode]
        assert {(hit.chunk.doc_id, hit.chunk.metadata["part"]) for hit in store.search(request)} == {
            (doc_id, "odd") for doc_id in readable(eng)
        }
        (outside,) = [r for r in everywhere(eng, filters={"title": "globex-eng"}) if r.mode == mode]
        assert store.search(outside) == []
        assert store.count({"part": "odd"}, eng) == len(readable(eng))
        assert store.count({"title": {"$in": ["acme-ops", "acme-eng"]}}, eng) == PARTS

    def test_counts_and_the_manifest_are_scoped(self, store):
        fill_owners(store)
        for scope in SCOPES:
            assert store.count(scope=scope) == PARTS * len(readable(scope)), scope
            records = store.documents(scope)
            assert {r.doc_id for r in records} == readable(scope), scope
            assert all(len(r.chunk_ids) == PARTS for r in records)
        assert {r.doc_id for r in store.documents()} == set(OWNERS) and store.count() == PARTS * len(OWNERS)
        both = store.document("acme-eng-ops")
        assert (both.tenant, sorted(both.groups), both.chunk_ids) == ("acme", ["eng", "ops"], [
            f"acme-eng-ops-{i}" for i in range(PARTS)
        ])
        assert store.document("missing") is None

    def test_set_access_changes_who_reads_at_once_and_leaves_the_vectors(self, store):
        fill_owners(store)
        acme, eng, ops = Scope("acme", None), Scope("acme", frozenset({"eng"})), Scope("acme", frozenset({"ops"}))

        def stored(scope: Scope) -> dict[str, tuple[Chunk, bytes]]:
            hits = store.search(SearchRequest(scope, vector=text_vector("q"), k=50, with_vectors=True))
            return {hit.chunk.chunk_id: (hit.chunk, np.asarray(hit.vector, np.float32).tobytes()) for hit in hits}

        before, record_before = stored(acme), store.document("acme-eng")
        store.set_access("acme-eng", "acme", ["ops"])
        assert "acme-eng" not in docs_found(store, eng) and "acme-eng" in docs_found(store, ops)
        assert stored(acme) == before  # the same chunks, with byte-identical vectors
        moved = store.document("acme-eng")
        assert (moved.tenant, moved.groups) == ("acme", ["ops"])
        assert (moved.chunk_ids, moved.sha256, moved.fingerprint, moved.status) == (
            record_before.chunk_ids, record_before.sha256, record_before.fingerprint, record_before.status,
        )

        store.set_access("acme-eng", "globex", [EVERYONE])  # to another tenant
        assert "acme-eng" not in docs_found(store, acme) | {r.doc_id for r in store.documents(acme)}
        assert "acme-eng" in docs_found(store, Scope("globex", frozenset()))
        assert store.count(scope=Scope("globex", None)) == PARTS * 3
        store.set_access("acme-eng", "acme", [])  # admins only
        assert "acme-eng" not in docs_found(store, Scope("acme", frozenset({"eng", "ops"})))
        assert "acme-eng" in docs_found(store, acme)

    def test_set_access_of_an_unknown_or_malformed_document_is_refused(self, store):
        fill_owners(store)
        version = store.index_version()
        with pytest.raises(StoreError, match="missing"):
            store.set_access("missing", "acme", [EVERYONE])
        for tenant, groups in (("", [EVERYONE]), ("acme", "eng"), ("acme", ["eng", ""])):
            with pytest.raises(ValueError):
                store.set_access("acme-eng", tenant, groups)
        assert store.index_version() == version
        assert docs_found(store, Scope("acme", frozenset({"eng"}))) == readable(Scope("acme", frozenset({"eng"})))

    def test_an_upsert_replaces_access_and_a_delete_removes_it(self, store):
        fill_owners(store)
        eng = Scope("acme", frozenset({"eng"}))
        put_owned(store, "acme-eng", "acme", ["ops"])
        assert "acme-eng" not in docs_found(store, eng) | {r.doc_id for r in store.documents(eng)}
        store.delete_document("acme-eng-ops")
        assert docs_found(store, eng) == {"acme-all"} and store.count(scope=eng) == PARTS

    def test_the_index_version_changes_with_every_write_of_chunks_or_access_and_only_then(self, store):
        versions = [store.index_version()]
        put_owned(store, "acme-eng", "acme", ["eng"])
        versions.append(store.index_version())
        for request in everywhere(Scope("acme", frozenset({"eng"}))):
            store.search(request)
        store.count(), store.documents(), store.document("acme-eng"), store.filter_fields()
        assert store.index_version() == versions[-1]
        store.set_access("acme-eng", "acme", ["ops"])
        versions.append(store.index_version())
        put_owned(store, "acme-eng", "acme", ["ops"])
        versions.append(store.index_version())
        store.delete_document("acme-eng")
        versions.append(store.index_version())
        assert len(set(versions)) == len(versions) and all(isinstance(v, str) and v for v in versions)

    def test_scope_holds_across_handles_persists_and_reopens(self, store, reopen):
        fill_owners(store)
        eng = Scope("acme", frozenset({"eng"}))
        reader = reopen()
        assert docs_found(reader, eng) == readable(eng)
        store.persist()
        store.set_access("acme-eng", "acme", ["ops"])  # after the snapshot, and after the reader's last search
        assert docs_found(reader, eng) == readable(eng) - {"acme-eng"}
        again = reopen()
        assert docs_found(again, eng) == readable(eng) - {"acme-eng"}
        assert again.document("acme-eng").groups == ["ops"]
        again.persist()
        assert docs_found(reopen(), eng) == readable(eng) - {"acme-eng"}

    def test_a_search_must_say_who_is_reading(self):
        with pytest.raises(TypeError):
            SearchRequest(vector=vector(0), k=1)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="Scope"):
            SearchRequest("acme", vector=vector(0), k=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="frozenset"):
            SearchRequest(Scope("acme", {"eng"}), vector=vector(0), k=1)  # type: ignore[arg-type]


class StoreContract(KeywordContract, AccessContract):
    def test_implements_protocol(self, store):
        assert isinstance(store, VectorStore)

    def test_empty_store_searches_to_nothing(self, store):
        assert store.search(dense(vector(0), 5)) == []
        assert store.count() == 0

    def test_search_ranks_by_cosine(self, store):
        put(store, "a", [0, 1])
        put(store, "b", [2])
        hits = store.search(dense(vector(1), 3))
        assert [h.chunk.chunk_id for h in hits][0] == "a-1"
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert all(hits[i].score >= hits[i + 1].score for i in range(len(hits) - 1))
        assert hits[0].chunk.text == "text a 1" and hits[0].chunk.metadata["title"] == "a"

    def test_k_larger_than_index(self, store):
        put(store, "a", [0, 1])
        assert len(store.search(dense(vector(0), 50))) == 2

    def test_upsert_replaces_a_documents_chunks(self, store):
        put(store, "a", [0, 1, 2])
        put(store, "a", [3])
        assert store.count() == 1
        assert [r.chunk_ids for r in store.documents()] == [["a-0"]]
        assert store.search(dense(vector(3), 1))[0].chunk.chunk_id == "a-0"

    def test_delete_document_removes_chunks_and_manifest(self, store):
        put(store, "a", [0])
        put(store, "b", [1])
        store.delete_document("a")
        assert store.count() == 1
        assert [r.doc_id for r in store.documents()] == ["b"]
        assert {h.chunk.doc_id for h in store.search(dense(vector(0), 5))} == {"b"}

    def test_manifest_keeps_failed_files_without_chunks(self, store):
        put(store, "a", [0])
        store.upsert_document(record("a", "failed", "corrupt PDF"), [], np.zeros((0, DIM), np.float32))
        (only,) = store.documents()
        assert (only.status, only.error, only.chunk_ids) == ("failed", "corrupt PDF", [])
        assert store.count() == 0

    def test_manifest_keeps_what_a_file_was_built_from(self, store):
        included = record("a")
        included.dependencies = {"snippets/port.md": "33:1700000000000000000", "later.md": "missing"}
        store.upsert_document(included, chunks_for("a", 1), np.stack([vector(0)]))
        (only,) = store.documents()
        assert only.dependencies == included.dependencies
        store.upsert_document(record("a"), chunks_for("a", 1), np.stack([vector(0)]))
        assert store.documents()[0].dependencies == {}

    def test_filters_equal_in_and_list_fields(self, store):
        put(store, "a", [0, 0], format="pdf", groups=["eng", "ops"])
        put(store, "b", [0], format="html", groups=["sales"])
        assert {h.chunk.doc_id for h in store.search(dense(vector(0), 10, {"format": "pdf"}))} == {"a"}
        assert store.count({"format": {"$in": ["html", "docx"]}}) == 1
        assert store.count({"groups": "ops"}) == 2
        assert store.count({"groups": {"$in": ["sales", "hr"]}}) == 1
        assert store.count({"format": "pdf", "groups": "sales"}) == 0
        assert store.search(dense(vector(0), 10, {"format": {"$in": []}})) == []

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

    def test_filter_fields_know_each_fields_type(self, store):
        assert store.filter_fields() == {}
        put(store, "a", [0], format="pdf", page=3, score=1, draft=True, groups=["eng"], nothing=None, nested={"a": 1})
        put(store, "b", [1], format="html", page=None, score=0.5, draft=False, groups=[])
        assert store.filter_fields() == {
            "title": "str", "chunk_index": "int", "format": "str", "page": "int",
            "score": "float", "draft": "bool", "groups": "list[str]",
        }
        store.clear()
        assert store.filter_fields() == {}

    def test_filters_match_typed_values(self, store):
        put(store, "a", [0], page=3, score=0.5, draft=True)
        put(store, "b", [1], page=4, score=2, draft=False)
        assert store.count({"page": 3}) == 1
        assert store.count({"page": {"$in": [3, 4]}}) == 2
        assert store.count({"score": 2}) == 1 and store.count({"score": 2.0}) == 1
        assert [h.chunk.doc_id for h in store.search(dense(vector(0), 5, {"draft": True}))] == ["a"]
        assert store.count({"draft": False}) == 1

    @pytest.mark.parametrize(
        "filters, problem",
        [
            ({"format": {"$gt": 1}}, r"\$in"),
            ({"format": ["pdf"]}, r"\$in"),
            ({"format": {"$in": [{"a": 1}]}}, "str"),
            ({"format": {"$in": "pdf"}}, "list"),
            ({"format": {"$in": ["pdf"] * (MAX_IN_VALUES + 1)}}, str(MAX_IN_VALUES)),
            ({"page": "3"}, "int"),
            ({"page": True}, "int"),
            ({"draft": 1}, "bool"),
            ({"format": None}, "str"),
            ({"formt": "pdf"}, "unknown"),
            ({"x') OR 1=1 --": 1}, "unknown"),
        ],
    )
    def test_bad_filters_are_rejected_naming_the_problem(self, store, filters, problem):
        put(store, "a", [0], format="pdf", page=3, draft=True)
        for call in (lambda: store.search(dense(vector(0), 1, filters)), lambda: store.count(filters)):
            with pytest.raises(FilterError, match=problem) as raised:
                call()
            assert isinstance(raised.value, ValueError)
            assert "known fields" in str(raised.value) and "page (int)" in str(raised.value)

    def test_in_lists_up_to_the_limit_are_accepted(self, store):
        put(store, "a", [0], format="pdf")
        assert store.count({"format": {"$in": [f"f{i}" for i in range(MAX_IN_VALUES - 1)] + ["pdf"]}}) == 1

    def test_k_below_one_is_refused(self, store):
        put(store, "a", [0, 1])
        for k in (0, -1):
            with pytest.raises(ValueError, match="k must be"):
                store.search(dense(vector(0), k))

    def test_touch_document_saves_size_and_mtime_only(self, store):
        put(store, "a", [0, 1])
        (before,) = store.documents()
        store.touch_document("a", 123, 456)
        (after,) = store.documents()
        assert (after.size, after.mtime_ns) == (123, 456)
        assert (after.sha256, after.fingerprint, after.status, after.chunk_ids) == (
            before.sha256, before.fingerprint, before.status, before.chunk_ids,
        )
        assert [h.chunk.chunk_id for h in store.search(dense(vector(1), 1))] == ["a-1"]
        with pytest.raises(StoreError, match="missing"):
            store.touch_document("missing", 1, 1)

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
        assert store.search(dense(vector(1), 1))[0].chunk.chunk_id == "a-1"

    def test_meta_values(self, store):
        assert store.get_meta("missing") is None
        store.set_meta("embedder", "m1")
        assert store.get_meta("embedder") == "m1"

    def test_clear(self, store):
        put(store, "a", [0])
        store.set_meta("embedder", "m1")
        store.clear()
        assert store.count() == 0 and store.documents() == [] and store.get_meta("embedder") is None
        assert store.search(dense(vector(0), 1)) == []

    def test_persist_and_reopen(self, store, reopen):
        put(store, "a", [0, 1])
        store.persist()
        put(store, "b", [2])  # written after the snapshot: a reopened store must see it too
        store.delete_document("a")
        put(store, "c", [1])
        again = reopen()
        assert again.count() == 2
        assert [h.chunk.chunk_id for h in again.search(dense(vector(1), 1))] == ["c-0"]
        assert {h.chunk.doc_id for h in again.search(dense(vector(0), 5))} == {"b", "c"}

    def test_replaced_documents_pair_right_across_persists_and_reopens(self, store, reopen):
        rng = np.random.default_rng(7)
        for version in range(6):
            for doc in "abc":
                n = int(rng.integers(0, 5))
                put_texts(store, doc, [f"{doc} v{version} {i}" for i in range(n)])
            if version % 2:
                store.persist()
            again = reopen()
            for handle in (store, again):
                query = text_vector(f"query {version}")
                hits = handle.search(dense(query, 4))
                assert_hits_pair_right(hits, query, 4)
                assert len(hits) == min(4, handle.count())

    def test_a_second_handle_sees_new_writes(self, store, reopen):
        reader = reopen()
        assert reader.search(dense(vector(0), 1)) == []
        put(store, "a", [0])
        assert reader.search(dense(vector(0), 1))[0].chunk.chunk_id == "a-0"
        store.delete_document("a")
        assert reader.search(dense(vector(0), 1)) == []

