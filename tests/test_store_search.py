"""How `LocalStore` searches a large index: which query terms it scores, filtered scans, hybrid halves side by side."""

from __future__ import annotations

import numpy as np
import pytest
from store_contract import (
    EVERYTHING,
    dense,
    ids,
    keyword,
    put_texts,
    record,
    text_vector,
    writer_commits_before_every_select,
)

from ragline.store import keywords
from ragline.store.base import SearchRequest
from ragline.store.fusion import Fusion, fuse
from ragline.store.local import LocalStore
from ragline.types import Chunk

BIG = 1_200
"""Chunks in the large index: above keywords.COMMON_FLOOR, so that common terms are left out."""


@pytest.fixture
def store(tmp_path):
    store = LocalStore(tmp_path / "index")
    yield store
    store.close()


def scored(hits) -> list[tuple[str, float]]:
    return [(hit.chunk.chunk_id, round(hit.score, 5)) for hit in hits]


def test_common_terms_are_left_out_and_rare_ones_kept_in_query_order():
    counts = {"alpha": 5_000, "beta": 40, "gamma": 900, "zzz": 0}
    assert keywords.scored_terms(["alpha", "beta", "zzz", "gamma"], counts, 1_000) == ["beta", "gamma"]


def test_a_query_of_common_terms_keeps_its_rarest_one():
    counts = {"alpha": 5_000, "beta": 3_000, "delta": 3_000, "zzz": 0}
    assert keywords.scored_terms(["alpha", "delta", "beta", "zzz"], counts, 1_000) == ["delta"]
    assert keywords.scored_terms(["zzz"], counts, 1_000) == []


def test_the_cutoff_is_a_share_of_a_large_index_and_never_below_the_floor():
    assert keywords.common_cutoff(10) == keywords.COMMON_FLOOR
    assert keywords.common_cutoff(1_000_000) == int(keywords.COMMON_SHARE * 1_000_000) > keywords.COMMON_FLOOR


def fill_big(store: LocalStore) -> None:
    """`alpha` in every chunk, `beta` in a third, `gamma` in 30, `delta` in three quarters."""
    texts = [
        f"alpha filler{i}" + " beta" * (i % 3 == 0) + " gamma" * (i % 40 == 0) + " delta" * (i % 4 != 0)
        for i in range(BIG)
    ]
    put_texts(store, "big", texts)


def test_a_large_index_scores_only_the_informative_terms(store):
    fill_big(store)
    assert scored(store.search(keyword("alpha gamma", 20))) == scored(store.search(keyword("gamma", 20)))
    assert scored(store.search(keyword("alpha beta gamma", 20))) == scored(store.search(keyword("beta gamma", 20)))
    only_common = store.search(keyword("alpha", 5))
    assert len(only_common) == 5 and all("alpha" in hit.chunk.text for hit in only_common)


def test_term_counts_follow_the_writes(store):
    """`delta` is scored in 900 of 1,200 chunks; 200 more make it too common (1,100 > 1,000): stale counts would not see it."""
    fill_big(store)
    before = store.search(keyword("delta gamma", 40))
    assert any("gamma" not in hit.chunk.text for hit in before)  # delta alone matched: it was scored
    put_texts(store, "more", [f"delta extra{i}" for i in range(200)])
    assert scored(store.search(keyword("delta gamma", 40))) == scored(store.search(keyword("gamma", 40)))


def test_filtered_dense_search_is_exact_whether_it_gathers_or_scans(store):
    rng = np.random.default_rng(3)
    put_texts(store, "gone", ["removed first, so that seqs do not start at 1"])
    store.delete_document("gone")
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = [Chunk(f"d-{i:03d}", "d", f"text {i}", {"bucket": i % 10}) for i in range(300)]
    store.upsert_document(record("d"), chunks, vectors)
    query = text_vector("query")
    for buckets in ([3], [3, 5], list(range(8))):  # a tenth and a fifth of the rows are gathered; 80% scanned
        allowed = [i for i in range(300) if i % 10 in buckets]
        expected = sorted(allowed, key=lambda i: -float(vectors[i] @ query))[:7]
        hits = store.search(dense(query, 7, {"bucket": {"$in": buckets}}))
        assert ids(hits) == [f"d-{i:03d}" for i in expected]


@pytest.mark.parametrize("method", ["rrf", "convex"])
@pytest.mark.parametrize("filters", [None, {"section": {"$in": ["s1", "s2"]}}])
def test_a_hybrid_search_fuses_exactly_what_its_halves_find_alone(store, method, filters):
    """The dense half runs on a worker thread beside the keyword query: the result is that of the two, in turn."""
    rng = np.random.default_rng(5)
    words = ["tide", "moon", "orbit", "read_csv", "os.path.join", "pool", "future", "thread"]
    for doc in range(6):
        texts = [" ".join(rng.choice(words, 4)) + f" note{doc}{i}" for i in range(20)]
        put_texts(store, f"doc{doc}", texts, section=f"s{doc % 3}")
    fusion = Fusion(method=method, dense_weight=1.5)
    for text in ("tide orbit", "read_csv pool", "os.path.join"):
        vector = text_vector(text)
        hybrid = store.search(SearchRequest(EVERYTHING, text=text, vector=vector, mode="hybrid", k=6, fusion=fusion,
                                            filters=filters))
        halves = [store.search(SearchRequest(EVERYTHING, text=text, vector=vector, mode=mode, k=6, filters=filters))
                  for mode in ("dense", "keyword")]
        expected = fuse(halves, (fusion.dense_weight, fusion.keyword_weight), method, fusion.rrf_k, 6)
        assert [(hit.chunk.chunk_id, hit.score) for hit in hybrid] == [(hit.chunk.chunk_id, hit.score) for hit in expected]


def test_a_hybrid_search_sees_one_committed_state(tmp_path):
    """Another handle commits before every statement of the reader's; both halves still come from one state."""
    writer, reader = LocalStore(tmp_path / "index"), LocalStore(tmp_path / "index")
    put_texts(writer, "a", ["a v0 tide 0", "a v0 tide 1"])
    put_texts(writer, "b", ["b tide 0"])
    with writer_commits_before_every_select(reader, writer, lambda v: [f"a v{v} tide {i}" for i in range(1 + v % 4)]) as commits:
        for round_ in range(5):
            request = SearchRequest(EVERYTHING, text="tide", vector=text_vector(f"query {round_}"), mode="hybrid", k=10,
                                    with_vectors=True)
            hits = reader.search(request)
            assert hits and len({hit.chunk.text.split()[1] for hit in hits if hit.chunk.doc_id == "a"}) == 1
            for hit in hits:
                assert np.allclose(hit.vector, text_vector(hit.chunk.text))
    assert len(commits) >= 10
    writer.close(), reader.close()
