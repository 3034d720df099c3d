"""Concurrent queries are embedded in shared calls, each caller getting exactly its own rows."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ragline.embed.batching import BatchingEmbedder, QueryBatcher


def test_concurrent_callers_share_encodes_and_get_their_own_vectors(embedder):
    calls: list[int] = []
    started = threading.Event()
    release = threading.Event()

    def encode(texts):
        calls.append(len(texts))
        if len(calls) == 1:  # hold the first encode until every other caller has queued behind it
            started.set()
            release.wait(30)
        return embedder.embed_queries(texts)

    batcher = QueryBatcher(encode)
    questions = [f"how do I read file number {n}?" for n in range(12)]
    with ThreadPoolExecutor(12) as pool:
        first = pool.submit(batcher, questions[:1])
        assert started.wait(30)
        rest = [pool.submit(batcher, [question]) for question in questions[1:]]
        while sum(len(texts) for texts, _ in batcher._queue) < 11:
            threading.Event().wait(0.01)
        release.set()
        vectors = [first.result(30), *(future.result(30) for future in rest)]
    assert calls == [1, 11]  # the lone first query went at once; the eleven that waited went together
    expected = embedder.embed_queries(questions)
    for row, vector in zip(expected, vectors):
        assert vector.shape == (1, embedder.dim)
        np.testing.assert_allclose(vector[0], row, atol=1e-5)


def test_an_encode_that_fails_fails_its_callers_and_the_next_ones_still_work(embedder):
    def encode(texts):
        if any("boom" in text for text in texts):
            raise ValueError("the model rejected an input")
        return embedder.embed_queries(texts)

    batcher = QueryBatcher(encode)
    with pytest.raises(ValueError, match="rejected"):
        batcher(["boom"])
    assert batcher(["fine"]).shape == (1, embedder.dim)
    assert batcher([]).shape == (0, embedder.dim)


def test_the_batching_embedder_is_the_model_for_everything_but_query_batching(embedder):
    batching = BatchingEmbedder(embedder)
    assert (batching.name, batching.dim, batching.max_tokens) == (embedder.name, embedder.dim, embedder.max_tokens)
    np.testing.assert_allclose(batching.embed_queries(["json"]), embedder.embed_queries(["json"]), atol=1e-6)
    np.testing.assert_array_equal(batching.embed_documents(["json"]), embedder.embed_documents(["json"]))
