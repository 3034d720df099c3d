"""Encode rate of the onnx embedder (fp32 and int8) against PyTorch on the same chunks, same run.

    python benchmarks/embed_onnx.py [--docs /usr/share/doc/python3.11/html] [--chunks 2000] [--threads 1 2]

The chunks are real ones: the Python docs' HTML pages, loaded and chunked as
ingest does (the model's token limit, 32 tokens of overlap), in file order,
the first --chunks of them (the text the embedder sees: heading path first);
`--docs samples/python-docs` has 1,177.
Each backend encodes all of them in one `embed_documents` call at batch 64,
once per thread count, after a warm-up batch; the ONNX exports are made
before the clock starts (in a temporary cache folder unless --cache-dir).
Prints chunks/s, the ratio to PyTorch at the same thread count, and the
cosine (min, mean) of each row to PyTorch's. Target: int8 ≥ 2× PyTorch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import PYTHON_DOCS, require_python_docs

from ragline.config import EmbedderSettings, IngestSettings
from ragline.embed.onnx import OnnxEmbedder
from ragline.embed.sentence_transformer import SentenceTransformerEmbedder
from ragline.ingest.chunker import Chunker
from ragline.ingest.parse import ParseJob, parse_file

BATCH = 64


def chunk_texts(docs: Path, tokenizer, chunk_tokens: int, limit: int) -> list[str]:
    chunker = Chunker(tokenizer, chunk_tokens, overlap_tokens=32)
    texts: list[str] = []
    for page in sorted(docs.rglob("*.html")):
        source = str(page.relative_to(docs))
        result = parse_file(ParseJob(source, source, "", page.read_bytes(), str(docs)), IngestSettings(), chunker)
        texts += [chunk.embed_text for chunk in result.chunks]
        if len(texts) >= limit:
            break
    return texts[:limit]


def rate(encode, texts: list[str]) -> tuple[float, np.ndarray]:
    encode(texts[:BATCH])  # warm-up: first-call allocations and thread pools
    started = time.perf_counter()
    vectors = encode(texts)
    return len(texts) / (time.perf_counter() - started), vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, default=PYTHON_DOCS)
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cache-dir", type=Path, default=None, help="ONNX export cache (default: a fresh temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ragline-onnx-bench-") as scratch:
        run(require_python_docs(args.docs), args.chunks, args.threads, args.cache_dir or Path(scratch))


def run(docs: Path, limit: int, thread_counts: list[int], cache_dir: Path) -> None:
    pytorch = SentenceTransformerEmbedder(EmbedderSettings(batch_size=BATCH))
    texts = chunk_texts(docs, pytorch.tokenizer, pytorch.max_tokens, limit)
    tokens = [len(pytorch.tokenizer.encode(text).ids) for text in texts]
    print(f"{len(texts)} chunks from {docs}: {np.mean(tokens):.0f} tokens on average "
          f"(max {max(tokens)}, limit {pytorch.max_tokens}), batch {BATCH}")
    started = time.perf_counter()
    for precision in ("fp32", "int8"):
        OnnxEmbedder(EmbedderSettings(backend="onnx", precision=precision), cache_dir=cache_dir)
    print(f"exports made (or found) in {time.perf_counter() - started:.1f} s under {cache_dir}")

    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        baseline, reference = rate(pytorch.embed_documents, texts)
        rows.append({"backend": "pytorch", "threads": threads, "chunks_per_s": round(baseline, 1), "ratio": 1.0})
        for precision in ("fp32", "int8"):
            settings = EmbedderSettings(backend="onnx", precision=precision, threads=threads, batch_size=BATCH)
            chunks_per_s, vectors = rate(OnnxEmbedder(settings, cache_dir=cache_dir).embed_documents, texts)
            cosines = np.sum(vectors * reference, axis=1)  # both sides are unit vectors
            rows.append({
                "backend": f"onnx {precision}", "threads": threads, "chunks_per_s": round(chunks_per_s, 1),
                "ratio": round(chunks_per_s / baseline, 2),
                "cosine_min": round(float(cosines.min()), 5), "cosine_mean": round(float(cosines.mean()), 5),
            })

    print(f"{'backend':<10} {'threads':>7} {'chunks/s':>9} {'× pytorch':>9} {'cos min':>8} {'cos mean':>8}")
    for row in rows:
        print(f"{row['backend']:<10} {row['threads']:>7} {row['chunks_per_s']:>9} {row['ratio']:>9} "
              f"{row.get('cosine_min', ''):>8} {row.get('cosine_mean', ''):>8}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
