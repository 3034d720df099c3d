"""Any store at 100k or 1M chunks: build, memory, dense latency, recall against exact search, concurrency.

    python benchmarks/stores.py --store local [--chunks 100000] [--queries 200]
    python benchmarks/stores.py --store pgvector --url postgresql://postgres@127.0.0.1:5432/postgres
    python benchmarks/stores.py --store qdrant          # the client's local mode under the data dir
    python benchmarks/stores.py --store milvus          # Milvus Lite
    python benchmarks/stores.py --data-dir /tmp/bench-1m --chunks 1000000        # build once, keep it
    python benchmarks/stores.py --data-dir /tmp/bench-1m --chunks 1000000 --reuse --set local_ann_ef_search=256

The store is built the way the app builds it (`registry.resolve("store",
name).from_settings(Settings(...))`), so every backend of the VectorStore
protocol plugs in. Vectors are clustered random unit vectors (each
document of DOC_SIZE chunks draws one of chunks/CHUNKS_PER_CLUSTER topic
centres; a vector is its centre plus noise, so neighbours are close but
not trivially so, as with real embeddings), texts are short Zipf-drawn
word lists for the keyword side, and every chunk carries `bucket` (0–99),
so `{"bucket": b}` is a 1% filter (query i filters on bucket i % 100, so a
store that memoises a filter's rows per state gets at most half its
queries from that memo at 200 queries). It prints build time (upserts, then
`persist()`), the process's memory (RssAnon: private; RssFile: mapped
files, shared with other processes through the page cache) before and
after opening a reader and searching, the data dir's size on disk, p50/p99
latency of top-10 dense searches unfiltered and under the 1% filter,
recall@10 of both against exact search (brute-force NumPy over the same
vectors), and queries/s with 1 and 2 client threads. The baseline in the
same run is that exact NumPy search itself (matrix product and top-10 over
the vectors in memory). Queries are drawn from the same distribution as
the vectors (fresh points near a random centre).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ragline import registry
from ragline.config import Settings
from ragline.store.base import DocumentRecord, Scope, SearchRequest
from ragline.types import Chunk

DIM = 384
DOC_SIZE = 20
CHUNKS_PER_CLUSTER = 500
NOISE = 0.7
"""Per-dimension noise around a centre of unit per-dimension scale: cosine ≈ 0.67 within a topic."""
WORDS_PER_CHUNK = 24
VOCABULARY = [f"w{i}" if i % 7 else f"get_w{i}_value" for i in range(20_000)]
ZIPF = 1 / np.arange(1, len(VOCABULARY) + 1)
ZIPF /= ZIPF.sum()
BUCKETS = 100


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def memory() -> dict[str, int]:
    """This process's resident memory in MiB: private (RssAnon) and mapped files (RssFile)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) // 1024 for name in ("RssAnon", "RssFile")}


def topic_centres(chunks: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((max(1, chunks // CHUNKS_PER_CLUSTER), DIM)).astype(np.float32)


def build(store, chunks: int, vectors_file: Path) -> np.ndarray:
    """Write `chunks` chunks in documents of DOC_SIZE; their vectors go to a memory-mapped file too (for the
    exact baseline, without counting them as this process's private memory)."""
    rng = np.random.default_rng(1)
    centres = topic_centres(chunks)
    vectors = np.lib.format.open_memmap(vectors_file, mode="w+", dtype=np.float32, shape=(chunks, DIM))
    buckets = np.arange(chunks) % BUCKETS
    for start in range(0, chunks, DOC_SIZE):
        doc_id = f"doc{start // DOC_SIZE}"
        size = min(DOC_SIZE, chunks - start)
        block = unit(centres[rng.integers(len(centres))] + NOISE * rng.standard_normal((size, DIM)))
        words = rng.choice(len(VOCABULARY), (size, WORDS_PER_CHUNK), p=ZIPF)
        batch = [
            Chunk(f"{doc_id}-{i}", doc_id, " ".join(VOCABULARY[w] for w in row),
                  {"title": doc_id, "bucket": int(buckets[start + i])})
            for i, row in enumerate(words)
        ]
        store.upsert_document(DocumentRecord(doc_id, f"/{doc_id}", "/", 1, 1, "x", "fp"), batch, block)
        vectors[start:start + size] = block
    vectors.flush()
    return vectors


def chunk_id(position: int) -> str:
    return f"doc{position // DOC_SIZE}-{position % DOC_SIZE}"


def exact_top(matrix: np.ndarray, query: np.ndarray, rows: np.ndarray | None = None) -> list[int]:
    """The baseline: brute-force top-10 positions by inner product (all rows, or `rows`)."""
    scores = (matrix if rows is None else matrix[rows]) @ query
    top = np.argpartition(-scores, 9)[:10]
    top = top[np.argsort(-scores[top])]
    return (top if rows is None else rows[top]).tolist()


def exact_baseline(vectors: np.ndarray, queries: np.ndarray) -> tuple[list, list, list, list]:
    """Latencies and answers of exact NumPy search, unfiltered and each query under its bucket filter, over the
    vectors in memory (the rows of each bucket known in advance, as an index would know them)."""
    matrix = np.array(vectors)
    in_bucket = [np.arange(b, len(matrix), BUCKETS) for b in range(BUCKETS)]
    baseline, truth = timed(lambda q: exact_top(matrix, q), queries)
    baseline_filtered, truth_filtered = timed(lambda iq: exact_top(matrix, iq[1], in_bucket[iq[0] % BUCKETS]),
                                              list(enumerate(queries)))
    return baseline, truth, baseline_filtered, truth_filtered


def timed(call, items) -> tuple[list[float], list]:
    samples, results = [], []
    for item in items:
        started = time.perf_counter()
        results.append(call(item))
        samples.append((time.perf_counter() - started) * 1000)
    return samples, results


def percentiles(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(samples, 50)), 2), "p99_ms": round(float(np.percentile(samples, 99)), 2)}


def recall(found: list[list[str]], truth: list[list[int]]) -> float:
    return round(float(np.mean([len(set(f) & {chunk_id(p) for p in t}) / 10 for f, t in zip(found, truth)])), 4)


def queries_per_second(store, requests: list[SearchRequest], threads: int) -> float:
    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        list(pool.map(store.search, requests))
        return round(len(requests) / (time.perf_counter() - started), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="local", help="a store backend name: local, pgvector, qdrant, milvus")
    parser.add_argument("--url", default=None, help="the store's URL (pgvector; a qdrant or milvus server)")
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--data-dir", type=Path, default=None, help="where to build (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="search what an earlier run built in --data-dir")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a store setting for this run, e.g. local_ann_ef_search=256 (repeatable)")
    args = parser.parse_args()
    if args.reuse and args.data_dir is None:
        parser.error("--reuse needs the --data-dir of an earlier run")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        vectors_file = data_dir.with_name(f"{data_dir.name}-vectors.npy")  # beside the store, not in it
        store_settings = {"backend": args.store, **({"url": args.url} if args.url else {}),
                          **dict(item.split("=", 1) for item in args.set)}
        settings = Settings(data_dir=data_dir, store=store_settings)

        def open_store():
            return registry.resolve("store", args.store).from_settings(settings)

        upsert_s = persist_s = None
        if args.reuse:
            vectors = np.load(vectors_file, mmap_mode="r")
        else:
            writer = open_store()
            writer.clear()
            started = time.perf_counter()
            vectors = build(writer, args.chunks, vectors_file)
            upsert_s = round(time.perf_counter() - started, 1)
            started = time.perf_counter()
            writer.persist()
            persist_s = round(time.perf_counter() - started, 1)
            writer.close()
            del writer
            gc.collect()

        rng = np.random.default_rng(2)
        centres = topic_centres(len(vectors))
        topics = centres[rng.integers(len(centres), size=args.queries)]
        queries = unit(topics + NOISE * rng.standard_normal(topics.shape))
        baseline, truth, baseline_filtered, truth_filtered = exact_baseline(vectors, queries)
        gc.collect()

        before = memory()
        started = time.perf_counter()
        reader = open_store()
        dense = [SearchRequest(Scope.everything(), vector=q, k=10) for q in queries]
        filtered = [SearchRequest(Scope.everything(), vector=q, k=10, filters={"bucket": i % BUCKETS})
                    for i, q in enumerate(queries)]
        reader.search(dense[0])
        open_ms = (time.perf_counter() - started) * 1000
        dense_ms, dense_hits = timed(reader.search, dense)
        filtered_ms, filtered_hits = timed(reader.search, filtered)
        after = memory()
        results = {
            "store": args.store, "chunks": len(vectors), "dim": DIM, "settings": args.set,
            "build": {"upserts_s": upsert_s, "persist_s": persist_s},
            "memory_mib": {"before_reader": before, "after_reader_searched": after,
                           "reader_private": after["RssAnon"] - before["RssAnon"]},
            "disk_mib": int(subprocess.run(["du", "-sm", str(data_dir)], capture_output=True, text=True,
                                           check=True).stdout.split()[0])
            if data_dir.exists() else "none under the data dir: the index lives in the server",
            "first_search_after_open_ms": round(open_ms, 1),
            "dense": {**percentiles(dense_ms), "recall_at_10": recall(
                [[h.chunk.chunk_id for h in hits] for hits in dense_hits], truth)},
            "dense_1pct_filter": {**percentiles(filtered_ms), "recall_at_10": recall(
                [[h.chunk.chunk_id for h in hits] for hits in filtered_hits], truth_filtered)},
            "qps_1_thread": queries_per_second(reader, dense, 1),
            "qps_2_threads": queries_per_second(reader, dense, 2),
            "baseline_exact_numpy": {"dense": percentiles(baseline), "dense_1pct_filter": percentiles(baseline_filtered)},
        }
        reader.close()
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
