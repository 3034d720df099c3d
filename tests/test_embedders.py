"""The `Embedder` contract, run on the local model and on the OpenAI-compatible client.

The remote side is a real HTTP server on loopback whose `/v1/embeddings`
answers with the local model's vectors (unnormalized, shuffled by index), so
both implementations must agree; scripted failures test the retry policy.
"""

from __future__ import annotations

import numpy as np
import pytest
from scripted_llm_server import Reply, ScriptedLLMServer

from ragline.config import EmbedderSettings
from ragline.embed.base import Embedder, EmbedderError
from ragline.embed.openai_compat import OpenAIEmbedder

TEXTS = ["How do I install Ragline?", "Ray Serve scales model replicas.", "", "数据 naïve ünïcode"]


@pytest.fixture(scope="module")
def embeddings_server(embedder):
    def answer(body: dict) -> Reply:
        inputs = body["input"]
        vectors = embedder.embed_documents(inputs) * 3.0  # servers need not normalize
        data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
        return Reply(200, {"object": "list", "data": data[::-1], "model": body["model"]})

    with ScriptedLLMServer(fallback=answer) as server:
        yield server


def remote(server: ScriptedLLMServer, **overrides) -> OpenAIEmbedder:
    settings = EmbedderSettings(backend="openai", model="minilm", base_url=server.url, batch_size=3, **overrides)
    return OpenAIEmbedder(settings)


@pytest.fixture(params=["sentence-transformers", "openai"])
def any_embedder(request, embedder, embeddings_server):
    if request.param == "sentence-transformers":
        return embedder
    return remote(embeddings_server)


def test_protocol_shape_and_normalization(any_embedder):
    assert isinstance(any_embedder, Embedder)
    vectors = any_embedder.embed_documents(TEXTS)
    assert vectors.shape == (len(TEXTS), any_embedder.dim) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert any_embedder.embed_documents([]).shape == (0, any_embedder.dim)
    assert any_embedder.max_tokens > 0 and any_embedder.tokenizer.encode("hello").ids


def test_order_is_kept_and_batching_does_not_change_results(any_embedder):
    together = any_embedder.embed_documents(TEXTS)
    one_by_one = np.concatenate([any_embedder.embed_documents([t]) for t in TEXTS])
    assert np.allclose(together, one_by_one, atol=1e-4)


def test_similar_texts_score_higher(any_embedder):
    query = any_embedder.embed_queries(["installing the package"])[0]
    docs = any_embedder.embed_documents(["pip install ragline installs the package", "the cat sleeps on the rack"])
    assert docs[0] @ query > docs[1] @ query


def test_both_backends_agree(embedder, embeddings_server):
    assert np.allclose(embedder.embed_documents(TEXTS), remote(embeddings_server).embed_documents(TEXTS), atol=1e-4)


def test_prefixes_are_sent(embeddings_server):
    client = remote(embeddings_server, query_prefix="query: ", document_prefix="passage: ")
    embeddings_server.script()
    client.embed_queries(["q"])
    client.embed_documents(["d"])
    assert [r.body["input"] for r in embeddings_server.received] == [["query: q"], ["passage: d"]]


def test_transient_errors_are_retried(embeddings_server):
    client = remote(embeddings_server, dimensions=384)
    embeddings_server.script(Reply(503, {"error": "warming up"}), Reply(429, {}, headers={"Retry-After": "0"}))
    assert client.embed_documents(["retry me"]).shape == (1, 384)
    assert len(embeddings_server.received) == 3


def test_gives_up_after_the_last_try_with_the_reason(embeddings_server):
    client = remote(embeddings_server, dimensions=384)
    embeddings_server.script(*[Reply(503, {"error": {"message": "overloaded"}})] * 4)
    with pytest.raises(EmbedderError, match="failed after 4 tries: HTTP 503.*overloaded"):
        client.embed_documents(["x"])
    assert len(embeddings_server.received) == 4


def test_client_errors_fail_at_once_with_the_reason(embeddings_server):
    client = remote(embeddings_server, dimensions=384)
    embeddings_server.script(Reply(400, {"error": {"message": "input too long"}}))
    with pytest.raises(EmbedderError, match="HTTP 400.*input too long"):
        client.embed_documents(["x"])
    assert len(embeddings_server.received) == 1


def test_missing_base_url_is_a_config_error():
    with pytest.raises(EmbedderError, match="base_url"):
        OpenAIEmbedder(EmbedderSettings(backend="openai"))
