"""Search latency of the embedded store at 10k and 100k chunks (synthetic vectors and text).

    python benchmarks/search_latency.py [--sizes 10000 100000] [--queries 200]

Prints p50/p99 in milliseconds of top-10 dense, keyword (FTS5 BM25) and
hybrid (both, fused with RRF) searches, of a hybrid search with a
metadata filter and of one in the scope of one access group of four (a
quarter of the documents; the others search the whole tenant), through the store's public `search` call (read
transaction, refresh check and SQLite row fetch included), beside the
baseline of the same run: the bare NumPy floor (matrix product and top-10
on the same vectors in memory), so what the store adds is visible. Chunk
texts are ~120 words drawn from a Zipf-distributed vocabulary of 30,000
(words and snake_case identifiers), and each query is 6 words of one chunk
plus 3 stop words, so keyword search does real work. Each mode gets queries
of its own, so that a mode timed later does not find every term counted
already (the store counts a term's chunks once per generation); a common
word still comes up often, as in real traffic. The query embedding is
timed apart, once, on the real model, since it is the same at any index size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ragline.config import EmbedderSettings
from ragline.store.base import DocumentRecord, Scope, SearchRequest
from ragline.store.local import LocalStore
from ragline.types import Chunk

DIM = 384
DOC_SIZE = 50
WORDS_PER_CHUNK = 120
VOCABULARY = [f"w{i}" if i % 7 else f"get_w{i}_value" for i in range(30_000)]
ZIPF = 1 / np.arange(1, len(VOCABULARY) + 1)
ZIPF /= ZIPF.sum()
GROUPS = 4
"""Each document is readable by one of GROUPS access groups, in turn."""


def passages(rng: np.random.Generator, n: int) -> list[str]:
    words = rng.choice(len(VOCABULARY), (n, WORDS_PER_CHUNK), p=ZIPF)
    return [" ".join(VOCABULARY[i] for i in row) for row in words]


def fill(store: LocalStore, n: int, rng: np.random.Generator) -> np.ndarray:
    """Write `n` chunks in documents of DOC_SIZE; return their vectors, for the NumPy baseline."""
    written = []
    for start in range(0, n, DOC_SIZE):
        doc_id = f"doc{start // DOC_SIZE}"
        vectors = rng.standard_normal((DOC_SIZE, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        chunks = [
            Chunk(f"{doc_id}-{i}", doc_id, text, {"format": "html" if i % 10 else "pdf", "chunk_index": i})
            for i, text in enumerate(passages(rng, DOC_SIZE))
        ]
        record = DocumentRecord(doc_id, f"/{doc_id}", "/", 1, 1, "x", "fp", groups=[f"g{start // DOC_SIZE % GROUPS}"])
        store.upsert_document(record, chunks, vectors)
        written.append(vectors)
    store.persist()
    return np.concatenate(written)


def time_numpy_floor(matrix: np.ndarray, queries: np.ndarray) -> list[float]:
    samples = []
    for query in queries:
        started = time.perf_counter()
        scores = matrix @ query
        top = np.argpartition(-scores, 9)[:10]
        top[np.argsort(-scores[top])]
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def percentiles(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(samples, 50)), 2), "p99_ms": round(float(np.percentile(samples, 99)), 2)}


def time_searches(store: LocalStore, requests: list[SearchRequest]) -> list[float]:
    samples = []
    for request in requests:
        started = time.perf_counter()
        store.search(request)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def query_texts(store: LocalStore, n: int, rng: np.random.Generator) -> list[str]:
    """Six words of a random stored chunk and three stop words, as a user's question would mix them."""
    texts = []
    for _ in range(n):
        words = store.document_chunks(f"doc{rng.integers(store.count() // DOC_SIZE)}")[0].text.split()
        texts.append("how do I " + " ".join(rng.choice(words, 6)))
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((args.queries, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    results = {}
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            store = LocalStore(Path(tmp))
            matrix = fill(store, size, rng)
            reopened = LocalStore(Path(tmp))
            started = time.perf_counter()
            reopened.search(SearchRequest(Scope.everything(), vector=queries[0], k=10))
            open_ms = (time.perf_counter() - started) * 1000

            def requests(mode: str, filters=None, scope: Scope = Scope.everything()) -> list[SearchRequest]:
                texts = query_texts(reopened, len(queries), rng)
                return [
                    SearchRequest(scope, text=t, vector=q, mode=mode, k=10, filters=filters)
                    for t, q in zip(texts, queries)
                ]

            results[size] = {
                "first_search_after_open_ms": round(open_ms, 1),
                "dense": percentiles(time_searches(reopened, requests("dense"))),
                "keyword": percentiles(time_searches(reopened, requests("keyword"))),
                "hybrid": percentiles(time_searches(reopened, requests("hybrid"))),
                "hybrid_with_filter": percentiles(time_searches(reopened, requests("hybrid", {"format": "pdf"}))),
                "hybrid_in_one_group": percentiles(
                    time_searches(reopened, requests("hybrid", scope=Scope("default", frozenset({"g0"}))))
                ),
                "baseline_numpy_floor": percentiles(time_numpy_floor(matrix, queries)),
            }
            store.close()
            reopened.close()

    from ragline.embed.sentence_transformer import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(EmbedderSettings())
    embedder.embed_queries(["warm-up"])
    samples = []
    for _ in range(50):
        started = time.perf_counter()
        embedder.embed_queries(["how do I pretty-print JSON with indentation?"])
        samples.append((time.perf_counter() - started) * 1000)
    results["query_embedding"] = percentiles(samples)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
