"""Ingest of the Python docs with `engine: ray` against `engine: local`, on the same machine and pages.

    python benchmarks/ingest_ray.py [--docs /usr/share/doc/python3.11/html] [--limit N]
                                    [--parse-cpus 0.5] [--embed-cpus 1.5] [--embed-actors 1]

Prints, for each engine, chunks, wall seconds and chunks/s of a full ingest
(the driver's model already loaded; the Ray runtime already started, as a
cluster would be, but the embedding actors' model loads counted: each job
pays them), and end-to-end ÷ raw encode (the same chunk texts in one
`embed_documents` call); then ray ÷ local (target ≥ 0.8 on 2 cores: on one
machine Ray can only add overhead, so this measures it), and whether both
indexes hold the same chunk ids and return the same hits for the sample
questions. On 2 logical CPUs the defaults give the embedding actor 1.5 CPUs
(2 encoder threads, as the local engine's encoder has) and parse tasks 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import PYTHON_DOCS, PYTHON_DOCS_URL, require_python_docs

from ragline.app import Ragline
from ragline.config import Settings, SourceSettings
from ragline.store.base import Scope

QUESTIONS = Path(__file__).resolve().parent.parent / "samples" / "questions.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, default=PYTHON_DOCS)
    parser.add_argument("--limit", type=int, default=100, help="index only the first N pages (0: all)")
    parser.add_argument("--parse-cpus", type=float, default=0.5)
    parser.add_argument("--embed-cpus", type=float, default=1.5)
    parser.add_argument("--embed-actors", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray runtime")
    args = parser.parse_args()
    docs = require_python_docs(args.docs)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    work = Path(tempfile.mkdtemp(prefix="ragline-bench-ray-"))
    try:
        source_dir = copy_pages(docs, work / "docs", args.limit)
        ray_settings = {
            "parse_cpus": args.parse_cpus, "embed_cpus": args.embed_cpus, "embed_actors": args.embed_actors,
        }
        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        ray_start = time.perf_counter() - started
        apps = {engine: Ragline(Settings(data_dir=work / engine, engine=engine, ray=ray_settings))
                for engine in ("local", "ray")}
        embedder = apps["local"].embedder  # load the model before the clock starts
        embedder.embed_documents(["warm-up"])
        apps["ray"].__dict__["embedder"] = embedder
        figures: dict[str, dict] = {}
        for engine, app in apps.items():
            started = time.perf_counter()
            report = app.indexer().run([SourceSettings(path=source_dir, url_template=PYTHON_DOCS_URL)])
            figures[engine] = {"wall_s": time.perf_counter() - started, "chunks": report.chunks,
                               "failed": len(report.failed)}
        texts = [chunk.embed_text for record in apps["local"].store.documents()
                 for chunk in apps["local"].store.document_chunks(record.doc_id)]
        started = time.perf_counter()
        embedder.embed_documents(texts)
        raw = time.perf_counter() - started
        same_chunks = chunk_ids(apps["local"]) == chunk_ids(apps["ray"])
        questions = [line.strip() for line in QUESTIONS.read_text().splitlines() if line.strip()]
        same_hits = hits(apps["local"], questions) == hits(apps["ray"], questions)
        for app in apps.values():
            app.close()
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    result = {"pages": args.limit or "all", "ray_runtime_start_s": round(ray_start, 1), "raw_encode_s": round(raw, 1),
              "raw_chunks_per_s": round(len(texts) / raw, 1)}
    for engine, numbers in figures.items():
        result[engine] = {
            "chunks": numbers["chunks"], "failed": numbers["failed"], "wall_s": round(numbers["wall_s"], 1),
            "chunks_per_s": round(numbers["chunks"] / numbers["wall_s"], 1),
            "end_to_end_over_raw": round(raw / numbers["wall_s"], 3),
        }
    result["ray_over_local"] = round(figures["local"]["wall_s"] / figures["ray"]["wall_s"], 3)
    result["same_chunk_ids"] = same_chunks
    result["same_hits"] = same_hits
    result["ray_settings"] = ray_settings
    print(json.dumps(result, indent=2))


def copy_pages(docs: Path, target: Path, limit: int) -> Path:
    """The first `limit` pages (as benchmarks/ingest.py picks them) in a folder of their own; all: the docs."""
    if not limit:
        return docs
    pages = sorted(p for p in docs.rglob("*.html") if "_" not in p.parts[len(docs.parts)][:1])
    for page in pages[:limit]:
        copied = target / page.relative_to(docs)
        copied.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, copied)
    return target


def chunk_ids(app: Ragline) -> dict[str, list[str]]:
    return {record.source: list(record.chunk_ids) for record in app.store.documents()}


def hits(app: Ragline, questions: list[str]) -> list[list[str]]:
    return [[hit.chunk.chunk_id for hit in app.retriever.search(q, k=5, scope=Scope.everything()).hits]
            for q in questions]


if __name__ == "__main__":
    main()
