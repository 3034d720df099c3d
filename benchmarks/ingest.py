"""Ingest throughput on the Python docs, against the raw encode rate of the same chunks.

    python benchmarks/ingest.py [--docs /usr/share/doc/python3.11/html] [--limit N]
                                [--backend sentence-transformers|onnx] [--precision fp32|int8]

Prints documents, sections, chunks, wall seconds and chunks/s of a full
ingest (model already loaded), then the raw encode rate of exactly those
chunk texts with the same model and batch size in one `embed_documents`
call, and the ratio end-to-end ÷ raw (target ≥ 0.85: on 2 CPU cores the
model is the physical limit). `--backend onnx` measures the same with the
ONNX Runtime embedder (its export is cached before the clock starts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import PYTHON_DOCS, PYTHON_DOCS_URL, require_python_docs

from ragline.app import Ragline
from ragline.config import Settings, SourceSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, default=PYTHON_DOCS)
    parser.add_argument("--limit", type=int, default=0, help="index only the first N pages (0: all)")
    parser.add_argument("--backend", default="sentence-transformers", choices=["sentence-transformers", "onnx"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8"], help="onnx only")
    args = parser.parse_args()
    docs = require_python_docs(args.docs)

    work = Path(tempfile.mkdtemp(prefix="ragline-bench-"))
    try:
        source_dir = docs
        if args.limit:
            source_dir = work / "docs"
            pages = sorted(p for p in docs.rglob("*.html") if "_" not in p.parts[len(docs.parts)][:1])
            for page in pages[: args.limit]:
                target = source_dir / page.relative_to(docs)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(page, target)
        embedder_settings = {"backend": args.backend, "precision": args.precision}
        app = Ragline(Settings(data_dir=work / "index", embedder=embedder_settings))
        embedder = app.embedder  # load the model before the clock starts
        embedder.embed_documents(["warm-up"])
        started = time.perf_counter()
        report = app.indexer().run([SourceSettings(path=source_dir, url_template=PYTHON_DOCS_URL)])
        wall = time.perf_counter() - started

        chunks = [chunk for record in app.store.documents() for chunk in app.store.document_chunks(record.doc_id)]
        texts = [chunk.embed_text for chunk in chunks]
        sections = len({(chunk.doc_id, chunk.metadata["anchor"]) for chunk in chunks})
        started = time.perf_counter()
        embedder.embed_documents(texts)
        raw = time.perf_counter() - started
        app.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    figures = {
        "documents": len(report.new),
        "failed": len(report.failed),
        "sections_with_text": sections,
        "chunks": report.chunks,
        "wall_s": round(wall, 1),
        "chunks_per_s": round(report.chunks / wall, 1),
        "raw_encode_s": round(raw, 1),
        "raw_chunks_per_s": round(len(texts) / raw, 1),
        "ratio_end_to_end_over_raw": round(raw / wall, 3),
        "batch_size": app.settings.embedder.batch_size,
        "embedder": app.embedder.name,
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
