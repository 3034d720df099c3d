"""Latency of reranking 20 candidates on CPU with a MiniLM-sized cross-encoder.

    python benchmarks/rerank_latency.py [--candidates 20] [--tokens 200] [--repeats 50]

No reranker weights ship with Ragline, so the cross-encoder is the bundled
embedding model (all-MiniLM-L6-v2) with a fresh one-score head, saved to a
temporary folder and loaded through `CrossEncoderReranker`: the cost of a
model of that size (what `ragline tune` trains), not its quality. Also timed:
truncation to 128 tokens, and a 3-layer model (the first 3 layers of the same
one), the two ways to trade quality for speed. Passages are ~`--tokens`-token
windows of the sample Python docs. Prints p50/p99 in milliseconds beside the
baseline of the same run: the bi-encoder embedding the same query and
passages, the work a reranker adds to.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import lxml.html
from search_latency import percentiles

from ragline.config import EmbedderSettings
from ragline.embed.sentence_transformer import SentenceTransformerEmbedder, resolve_model_dir
from ragline.retrieve.rerank import CrossEncoderReranker
from ragline.types import Chunk, Hit

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "python-docs" / "library"
QUERY = "How do I read a JSON file into a Python dict?"


def passages(tokenizer, count: int, tokens: int) -> list[str]:
    """`count` windows of `tokens` tokens of real documentation text."""
    words = []
    for page in sorted(SAMPLES.glob("*.html")):
        words += lxml.html.fromstring(page.read_bytes()).text_content().split()
    texts, start = [], 0
    while len(texts) < count:
        end = start + tokens
        while len(tokenizer.encode(" ".join(words[start:end]), add_special_tokens=False).ids) > tokens:
            end -= 5
        texts.append(" ".join(words[start:end]))
        start = end
    return texts


def time_calls(call, repeats: int) -> list[float]:
    call()  # warm-up: first-call allocations and lazy loading
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    import torch
    from sentence_transformers import CrossEncoder
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # the new head and dropped layers are intended: no load report

    embedder = SentenceTransformerEmbedder(EmbedderSettings())
    texts = passages(embedder.tokenizer, args.candidates, args.tokens)
    hits = [
        Hit(Chunk(f"c{i}", "d", text, {"heading_path": ("json", f"Part {i}")}), 0.0) for i, text in enumerate(texts)
    ]
    results: dict[str, object] = {
        "candidates": len(hits),
        "mean_passage_tokens": round(
            sum(len(embedder.tokenizer.encode(h.chunk.embed_text).ids) for h in hits) / len(hits), 1
        ),
        "torch_threads": torch.get_num_threads(),
    }
    source = str(resolve_model_dir(EmbedderSettings().model))
    for layers, max_length in ((6, None), (6, 128), (3, None)):
        with tempfile.TemporaryDirectory() as folder:
            config = {"num_hidden_layers": layers}  # fewer layers: the first ones of the same model
            CrossEncoder(source, num_labels=1, local_files_only=True, config_kwargs=config).save_pretrained(folder)
            reranker = CrossEncoderReranker(folder, batch_size=args.candidates, max_length=max_length)
            samples = time_calls(partial(reranker.rerank, QUERY, hits), args.repeats)
            results[f"rerank_{layers}_layers_max_length_{max_length or 'model'}"] = percentiles(samples)
    documents = [hit.chunk.embed_text for hit in hits]
    results["baseline_bi_encoder_query_and_passages"] = percentiles(
        time_calls(lambda: (embedder.embed_queries([QUERY]), embedder.embed_documents(documents)), args.repeats)
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
